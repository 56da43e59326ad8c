"""``crdtbook node`` refuses at start what can never work, and warns about what may not.

A refusal is one line on stderr and exit code 1, with no "ready" and no node left running;
an address that can be judged alone is refused before the home or the store is created.
Every node here is a real process on 127.0.0.1, bounded in time and always stopped.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from crdtbook.node.p2p import peer_id_of_seed

pytestmark = pytest.mark.timeout(90)

MARKET = "DEMO:1:1"
PEER = peer_id_of_seed(hashlib.sha256(b"some other node").digest())


def node_cmd(home: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "crdtbook.cli.app",
        "node",
        "--home",
        str(home),
        "--market",
        MARKET,
        *args,
    ]


def start_refused(home: Path, *args: str) -> str:
    """Run a node that must refuse to start; return its one-line reason."""
    # A node that starts after all is killed by the timeout (subprocess.run kills it).
    done = subprocess.run(node_cmd(home, *args), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "ready" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("crdtbook node: ")
    return lines[0]


@contextmanager
def listening_socket(*, reuseport: bool) -> Iterator[int]:
    """Another process's socket in LISTEN on a free loopback port; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:  # as a node of an earlier version listened
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def closed_port() -> int:
    """A loopback port nothing listens on (free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("reuseport", [True, False], ids=["owner-reuseport", "owner-plain"])
def test_port_in_use_is_refused(tmp_path: Path, reuseport: bool) -> None:
    home = tmp_path / "n"
    with listening_socket(reuseport=reuseport) as port:
        reason = start_refused(home, "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    assert reason == (
        f"crdtbook node: cannot listen on /ip4/127.0.0.1/tcp/{port}: address already in use"
    )
    assert not (home / "node.json").exists()
    assert not (home / "control.sock").exists()


def test_two_definitions_of_one_market_name_are_refused(tmp_path: Path) -> None:
    """Both started, and everything named WX went to one of them, labelled as the other."""
    home = tmp_path / "n"
    reason = start_refused(home, "--listen", "/ip4/127.0.0.1/tcp/0", "--market", "DEMO:1:10")
    assert reason.startswith("crdtbook node: two definitions of market DEMO (ids ")
    assert "a node follows one market per name" in reason
    assert not home.exists()  # judged alone: refused before the home or a key is made


def test_http_port_in_use_is_refused_in_one_line(tmp_path: Path) -> None:
    """Left to hypercorn, the bind failed inside the running node: exit 1 after ~150 lines of
    nested exception groups."""
    home = tmp_path / "n"
    with listening_socket(reuseport=False) as port:
        reason = start_refused(
            home, "--listen", "/ip4/127.0.0.1/tcp/0", "--http", f"127.0.0.1:{port}"
        )
    assert reason == (
        f"crdtbook node: cannot serve the HTTP API on 127.0.0.1:{port}: address already in use"
    )
    assert not (home / "node.json").exists()
    assert not (home / "control.sock").exists()


def test_http_and_p2p_on_one_port_is_refused_in_one_line(tmp_path: Path) -> None:
    """The HTTP socket listens before libp2p binds: only bound, it let libp2p take the port,
    and hypercorn's own listen then failed inside the running node as a traceback."""
    port = closed_port()
    reason = start_refused(
        tmp_path / "n", "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--http", f"127.0.0.1:{port}"
    )
    assert reason == (
        f"crdtbook node: cannot listen on /ip4/127.0.0.1/tcp/{port}: address already in use"
    )


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--bootstrap", "garbage"], "bootstrap address 'garbage' is not a multiaddr"),
        (
            ["--bootstrap", "/ip4/127.0.0.1/tcp/4001"],
            "bootstrap address '/ip4/127.0.0.1/tcp/4001' does not end in /p2p/<peer id>",
        ),
        (
            ["--bootstrap", f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER[:12]}"],
            "ends in a malformed peer id",
        ),
        (
            ["--listen", "/ip4/127.0.0.1/udp/4001"],
            "cannot listen on '/ip4/127.0.0.1/udp/4001': crdtbook listens on TCP only",
        ),
    ],
    ids=["garbage-bootstrap", "bootstrap-without-p2p", "bootstrap-bad-peer-id", "udp-listen"],
)
def test_unusable_address_is_refused_before_anything_opens(
    tmp_path: Path, args: list[str], reason: str
) -> None:
    home = tmp_path / "n"
    listen = [] if "--listen" in args else ["--listen", "/ip4/127.0.0.1/tcp/0"]
    assert reason in start_refused(home, *listen, *args)
    assert not home.exists()  # no home, no key, no store


def test_bootstrap_to_itself_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "n"
    home.mkdir(mode=0o700)
    seed = hashlib.sha256(b"this node").digest()
    key = home / "identity.key"
    key.write_bytes(seed)
    key.chmod(0o600)
    own = f"/ip4/127.0.0.1/tcp/4001/p2p/{peer_id_of_seed(seed)}"
    reason = start_refused(home, "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", own)
    assert "is this node itself" in reason
    assert not (home / "store.sqlite3").exists()


def test_unreachable_bootstrap_warns_without_verbose(tmp_path: Path) -> None:
    home = tmp_path / "n"
    bootstrap = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{PEER}"
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            node_cmd(home, "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", bootstrap),
            stdout=stdout,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 60
        while "still unreachable" not in err.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, err.read_text()
            time.sleep(0.1)
        warnings = [ln for ln in err.read_text().splitlines() if "still unreachable" in ln]
        assert len(warnings) == 1, err.read_text()
        assert " WARNING " in warnings[0] and bootstrap in warnings[0]
        assert "ready" in out.read_text()  # it runs: the peer may come up later
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert proc.returncode == 0
