"""Tests of ``crdtbook demo``.

The first group drives the demo's process management against ``fake_node.py`` (a stand-in node
process that speaks the control protocol), so start-up, convergence checks, failure paths and
cleanup (no process, port or temporary home left behind) are covered without libp2p. The last test
runs the real demo in a subprocess and is skipped until ``crdtbook.node.app`` imports.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from crdtbook import Market
from crdtbook.cli import connect, demo

FAKE_NODE = Path(__file__).with_name("fake_node.py")


def node_app_available() -> bool:
    """Whether the real node and its control client can be imported."""
    try:
        importlib.import_module("crdtbook.node.app")
        importlib.import_module("crdtbook.node.client")
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------- a minimal wire client


class WireError(Exception):
    """``ControlError`` stand-in."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class WireNotRunning(Exception):
    """``NodeNotRunning`` stand-in."""


class WireClient:
    """Just enough of ``ControlClient`` for the demo (used until node/client.py exists)."""

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / "control.sock"

    def call(self, method: str, **params: Any) -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise WireNotRunning(f"no node at {self.path}") from exc
        with sock, sock.makefile("rwb") as f:
            f.write(json.dumps({"id": 1, "method": method, "params": params}).encode() + b"\n")
            f.flush()
            reply = json.loads(f.readline())
        if "error" in reply:
            raise WireError(reply["error"]["code"], reply["error"]["message"])
        return reply["result"]


@pytest.fixture
def fake_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make the demo start ``fake_node.py`` processes (and talk to them)."""
    try:
        importlib.import_module("crdtbook.node.client")
    except ImportError:
        api = SimpleNamespace(
            ControlClient=WireClient,
            NodeNotRunning=WireNotRunning,
            ControlError=WireError,
            resolve_home=lambda home: Path(home),
        )
        monkeypatch.setattr(connect, "client_api", lambda: api)

    def cmd(home: Path, bootstrap: list[str], market: str) -> list[str]:
        args = [
            sys.executable,
            str(FAKE_NODE),
            "node",
            "--home",
            str(home),
            "--listen",
            demo.LISTEN,
            "--market",
            market,
        ]
        for addr in bootstrap:
            args += ["--bootstrap", addr]
        return args

    monkeypatch.setattr(demo, "_node_cmd", cmd)
    monkeypatch.setattr(demo, "STOP_GRACE", 3.0)
    yield


def run_json(capsys: pytest.CaptureFixture[str], **kw: Any) -> tuple[int, dict[str, Any]]:
    """Run the demo in-process with --json; return (exit code, summary)."""
    code = demo.run_demo(as_json=True, **kw)
    return code, json.loads(capsys.readouterr().out)


def assert_nothing_left(summary: dict[str, Any]) -> None:
    """Every node process is gone, its TCP port closed, its home removed."""
    assert summary["nodes"], "the summary should list the nodes it started"
    for entry in summary["nodes"]:
        with pytest.raises(ProcessLookupError):
            os.kill(entry["pid"], 0)
        assert not Path(entry["home"]).exists()
        assert not Path(entry["home"]).parent.exists()
        for addr in entry["addrs"] or []:
            port = int(re.search(r"/tcp/(\d+)", addr).group(1))  # type: ignore[union-attr]
            with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                pass


def assert_witnessed_by_every_node(summary: dict[str, Any]) -> None:
    """The demo market names every node's key as a witness, and the nodes were given it."""
    keys = [n["witness"] for n in summary["nodes"]]
    assert all(isinstance(k, str) and len(k) == 64 for k in keys), keys
    assert summary["witnesses"] == sorted(keys)
    assert Market.parse(summary["spec"]) == Market("DEMO", "1", "1", witnesses=keys)


def assert_all_final(summary: dict[str, Any]) -> None:
    """Every node reports every fill final."""
    assert summary["all_final"] is True
    assert summary["final_elapsed"] is not None
    for node in summary["nodes"]:
        assert node["fills"], node
        assert all(f["final"] is True for f in node["fills"]), node["fills"]
        assert node["final_fills"] == len(node["fills"])


def test_demo_agrees_and_cleans_up(
    fake_network: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NODE_MODE", "ok")
    code, summary = run_json(capsys, nodes=3, timeout=20)
    assert code == 0, summary
    assert summary["agree"] is True and summary["error"] is None
    assert_witnessed_by_every_node(summary)
    assert_all_final(summary)
    assert [len(n["fills"]) for n in summary["nodes"]] == [2, 2, 2]
    digests = {n["digest"] for n in summary["nodes"]}
    assert digests == {summary["digest"]}
    assert [n["node"] for n in summary["nodes"]] == [1, 2, 3]
    assert all(n["ops"] == 9 for n in summary["nodes"])  # 5 ladder + 3 race submits + 1 cancel
    subs = summary["submissions"]
    assert [s["phase"] for s in subs].count("race") == 4
    assert {s["node"] for s in subs} == {1, 2, 3}
    cancel = next(s for s in subs if s["method"] == "cancel")
    assert cancel["error"] is None and cancel["result"]["effective"] is True
    assert_nothing_left(summary)


def test_demo_fills_that_never_turn_final_exit_1(
    fake_network: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NODE_MODE", "nofinal")
    code, summary = run_json(capsys, nodes=2, timeout=2)
    assert code == 1
    assert summary["agree"] is True  # the books agree; the fills just never turn final
    assert summary["all_final"] is False and summary["final_elapsed"] is None
    assert all(f["final"] is False for n in summary["nodes"] for f in n["fills"])
    assert_nothing_left(summary)


def test_demo_human_output_when_not_final(
    fake_network: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NODE_MODE", "nofinal")
    monkeypatch.setenv("COLUMNS", "200")
    assert demo.run_demo(nodes=2, timeout=2) == 1
    out = capsys.readouterr().out
    assert "timed out after 2s waiting for every fill to turn final" in out
    assert "(stalled/stalled)" in out
    assert "all 2 nodes agree" in out
    assert "✗ not every fill is final on every node (node 1 0/2, node 2 0/2)" in out


def test_demo_disagreement_exits_1(
    fake_network: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NODE_MODE", "diverge")
    code, summary = run_json(capsys, nodes=2, timeout=2)
    assert code == 1
    assert summary["agree"] is False and summary["digest"] is None
    assert len({n["digest"] for n in summary["nodes"]}) == 2
    assert_nothing_left(summary)


def test_demo_node_that_dies(
    fake_network: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NODE_MODE", "die")
    code, summary = run_json(capsys, nodes=2, timeout=10)
    assert code == 1
    assert "node 1 exited with code 3" in summary["error"]
    assert_nothing_left(summary)


def test_demo_kills_a_node_that_ignores_sigint(
    fake_network: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NODE_MODE", "stubborn")
    code, summary = run_json(capsys, nodes=2, timeout=20)
    assert code == 0, summary
    assert_nothing_left(summary)


def test_demo_human_output(
    fake_network: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NODE_MODE", "ok")
    monkeypatch.setenv("COLUMNS", "200")
    assert demo.run_demo(nodes=2, timeout=20) == 0
    out = capsys.readouterr().out
    assert "all 2 nodes agree" in out
    assert "node 1" in out and "node 2" in out
    assert "witnessed by all 2 nodes" in out
    assert "the race (all sent at the same moment)" in out
    assert "waiting for every fill to turn final: final fills 2/2 2/2 (final/final)" in out
    assert re.search(r"5@100 +final", out), out  # each node's fills, marked final
    assert "2 of 2 fills final" in out
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    agree = next(i for i, ln in enumerate(lines) if "all 2 nodes agree" in ln)
    assert lines[agree + 1].startswith("✓ all 2 fills final on every node")
    assert "stopped 2 nodes" in out


# ------------------------------------------------------------------------------- real nodes


def _listening_ports() -> set[int]:
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.skipif(
    not node_app_available(), reason="crdtbook.node.app / .client do not import yet"
)
@pytest.mark.timeout(120)
def test_real_demo(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CRDTBOOK_HOME"}
    res = subprocess.run(
        [sys.executable, "-m", "crdtbook.cli.app", "demo", "--json", "--timeout", "45"],
        capture_output=True,
        text=True,
        env=env,
        timeout=115,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["agree"] is True
    digests = {n["digest"] for n in summary["nodes"]}
    assert len(digests) == 1 and None not in digests
    assert len(summary["nodes"]) == 3
    # Equal on every node but for received_ms: when that node received the taker (node-local).
    fills = [
        json.dumps(
            [{k: v for k, v in f.items() if k != "received_ms"} for f in n["fills"]], sort_keys=True
        )
        for n in summary["nodes"]
    ]
    assert len(set(fills)) == 1
    assert_witnessed_by_every_node(summary)
    assert_all_final(summary)  # the witnesses' heartbeats made every fill final on every node
    assert all(n["finality"] == "final" and n["frontier"] > 0 for n in summary["nodes"])
    assert_nothing_left(summary)
    ports = {
        int(m.group(1))
        for n in summary["nodes"]
        for a in n["addrs"]
        if (m := re.search(r"/tcp/(\d+)", a))
    }
    assert not ports & _listening_ports()
