"""Copyable output (issue #11): `crdtbook id` and `crdtbook status` never cut or wrap a multiaddr,
a peer id or a key, in a pipe or in a narrow terminal.

Each test runs the real CLI as a process against the fake socket node (the real control client
and wire protocol), its output going to a pipe or to a pseudo-terminal 40 columns wide, the way
a person would copy from it.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from typing import Any

import pytest

#: A real-looking peer id and multiaddrs: long enough that 40 columns could only show them cut.
PEER_ID = "12D3KooWQzY5Qx8R8mNhbTdcFvC7xg6Y7CVDNrr4D7WYxQrD9r3H"
OTHER_PEER = "12D3KooWJbkH8hAm9LmZ3kGd8m4W5tj2vJv5xQ4Yb1FQoC2wTgZk"
ADDRS = [
    f"/ip4/127.0.0.1/tcp/40001/p2p/{PEER_ID}",
    f"/ip4/192.168.100.200/tcp/40001/p2p/{PEER_ID}",
]
MARKET = "BTC-USD"
NARROW = 40
#: Bound on one CLI run (it starts Python and talks to a local socket: well under a second).
RUN_TIMEOUT = 60.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def cli(home: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "crdtbook.cli.app", "--home", home, *args]


def env(columns: int = NARROW) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("CRDTBOOK_HOME", "LINES")}
    out["COLUMNS"] = str(columns)
    return out


def piped(home: str, *args: str, columns: int = NARROW) -> str:
    res = subprocess.run(
        cli(home, *args), capture_output=True, text=True, env=env(columns), timeout=RUN_TIMEOUT
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def in_terminal(home: str, *args: str, columns: int = NARROW) -> str:
    """Run the CLI with its stdout on a pseudo-terminal ``columns`` wide; its output without
    colour codes."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    e = env(columns)
    e.pop("COLUMNS")  # the terminal's own width decides
    e["TERM"] = "xterm-256color"
    proc = subprocess.Popen(cli(home, *args), stdout=follower, stderr=subprocess.PIPE, env=e)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(RUN_TIMEOUT) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
        if proc.stderr:
            proc.stderr.close()
    text = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    return _ANSI.sub("", text)


@pytest.fixture
def node(socket_node: Any, samples: Any) -> Any:
    status = dict(samples.STATUS)
    status.update(
        peer_id=PEER_ID,
        addrs=ADDRS,
        peers=[{"peer_id": OTHER_PEER, "addrs": [f"/ip4/127.0.0.1/tcp/40002/p2p/{OTHER_PEER}"]}],
        markets=[dict(status["markets"][0], name=MARKET)],
    )
    socket_node.answers["status"] = status
    socket_node.answers["id"] = {"peer_id": PEER_ID, "addrs": ADDRS, "public_key": samples.ME}
    return socket_node


def stripped(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines()]


@pytest.mark.parametrize("where", ["pipe", "terminal"])
def test_id_whole_in_narrow_output(node: Any, samples: Any, where: str) -> None:
    run = piped if where == "pipe" else in_terminal
    out = run(str(node.home), "id")
    lines = out.rstrip("\n").splitlines()
    assert f"peer id {PEER_ID}" in lines
    assert f"witness key {samples.ME}" in lines
    assert lines[-len(ADDRS) :] == ADDRS  # each alone on its line, unindented, never wrapped
    assert "…" not in out


def test_id_tail_is_one_whole_multiaddr(node: Any) -> None:
    """`crdtbook id | tail -1` prints a whole multiaddr, ready for --bootstrap."""
    command = " ".join(cli(str(node.home), "id")) + " | tail -1"
    res = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, env=env(), timeout=RUN_TIMEOUT
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == ADDRS[-1] + "\n"


@pytest.mark.parametrize("where", ["pipe", "terminal"])
def test_status_whole_in_narrow_output(node: Any, samples: Any, where: str) -> None:
    run = piped if where == "pipe" else in_terminal
    out = run(str(node.home), "status")
    lines = stripped(out)
    for whole in [*ADDRS, OTHER_PEER, f"/ip4/127.0.0.1/tcp/40002/p2p/{OTHER_PEER}"]:
        assert whole in lines, whole
    assert f"peer id {PEER_ID}" in lines
    assert f"witness key {samples.ME}" in lines
    assert f"market {MARKET}" in lines  # the table does not fit: one block per market
    for key in samples.WITNESSES:
        assert key in lines
    assert "…" not in out.replace(", …", "")  # (only the heads list says "and more")
    assert json_free(out)


def json_free(out: str) -> bool:
    """Readable output, not JSON (the test would pass trivially on --json)."""
    return not out.lstrip().startswith(("{", "["))


def test_status_wide_keeps_the_table(node: Any) -> None:
    out = piped(str(node.home), "status", columns=200)
    row = next(line for line in out.splitlines() if MARKET in line and "│" in line)
    assert "stalled" in row and "d4d4d4d4d4d4" in row
    assert f"market {MARKET}" not in stripped(out)
