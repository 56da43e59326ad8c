"""The node-process harness (node/procs.py) without starting a node: its command lines, the
JSON launcher's NodeConfig, identities made ahead, and stopping processes that ignore SIGINT."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from crdtbook.node import procs
from crdtbook.node.home import load_or_create_identity

pytestmark = pytest.mark.timeout(30)


def test_the_cli_command_listens_on_loopback_with_a_free_port(tmp_path: Path) -> None:
    node = procs.NodeProcess(tmp_path / "n", ["/ip4/127.0.0.1/tcp/9/p2p/X"], "M:1:1", verbose=2)
    cmd = node.command()
    assert cmd[:4] == [sys.executable, "-m", "crdtbook.cli.app", "node"]
    assert cmd[cmd.index("--listen") + 1] == "/ip4/127.0.0.1/tcp/0"
    assert cmd[cmd.index("--market") + 1] == "M:1:1"
    assert cmd.count("-v") == 2 and cmd[-2:] == ["--bootstrap", "/ip4/127.0.0.1/tcp/9/p2p/X"]
    assert node.log_path == tmp_path / "n.log"


def test_a_config_starts_through_run_node_with_its_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = procs.NodeProcess(
        tmp_path / "n",
        market="M:1:1",
        config={"sync_interval": 0.5, "network": {"heartbeat_interval": 0.2, "degree": 3}},
    )
    cmd = node.command()
    assert cmd[:3] == [sys.executable, "-m", "crdtbook.node.procs"]
    seen: dict[str, Any] = {}
    monkeypatch.setattr("crdtbook.node.app.run_node", lambda config: seen.setdefault("c", config))
    procs.run_from_json(cmd[3])
    config = seen["c"]
    assert (config.home, config.markets, config.sync_interval) == (tmp_path / "n", ["M:1:1"], 0.5)
    assert (config.network.heartbeat_interval, config.network.degree) == (0.2, 3)
    assert json.loads(cmd[3])["listen"] == [procs.LOOPBACK]


def test_an_identity_made_ahead_is_the_one_the_node_loads(tmp_path: Path) -> None:
    key = procs.make_identity(tmp_path / "n")
    identity, created = load_or_create_identity(tmp_path / "n")
    assert identity.public_key == key and not created
    assert (tmp_path / "n").stat().st_mode & 0o777 == 0o700


def test_stop_all_kills_what_ignores_sigint(tmp_path: Path) -> None:
    stubborn = (
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    nodes = [
        procs.NodeProcess(tmp_path / f"n{i}", command=[sys.executable, "-c", stubborn]).spawn()
        for i in range(2)
    ]
    for node in nodes:  # the child has set its handler once it says so (its log is a file)
        while "up" not in node.log():
            assert node.alive()
            time.sleep(0.01)
    procs.stop_all(nodes, grace=0.5)
    assert all(not node.alive() for node in nodes)
    assert all(node.proc is not None and node.proc.returncode == -9 for node in nodes)


def test_a_node_that_exits_at_once_says_why(tmp_path: Path) -> None:
    node = procs.NodeProcess(
        tmp_path / "n", command=[sys.executable, "-c", "raise SystemExit('no')"]
    )
    with pytest.raises(procs.NodeExited, match="no"):
        node.start(timeout=20)
    assert isinstance(node.proc, subprocess.Popen)
