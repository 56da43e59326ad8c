"""``crdtbook node`` refuses at start what can never work.

A refusal is one line on stderr and exit code 1, with no "ready" and no node left running.
Every node here is a real process on 127.0.0.1, bounded in time and always stopped.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(90)

MARKET = "DEMO:1:1"


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
