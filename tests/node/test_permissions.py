"""The control socket answers its owner only (issue #9).

The node checks at start that nobody else can write to its home (who can create files there can
plant a key or a store before it starts, or swap the control socket while it runs) and refuses
to start otherwise, with one line; the socket is created 0600 and checked after it is bound, so
a filesystem that ignores modes is refused too. Another user cannot connect (tried for real as
``nobody`` where the tests run as root).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from crdtbook.node import control
from crdtbook.node.control import check_home, serve_control, socket_path

from .harness import MARKET

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534


class Echo:
    async def call(self, method: str, params: dict[str, object]) -> object:
        return {"method": method}

    def watch(self, params: dict[str, object]) -> object:
        raise NotImplementedError


def _node(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "crdtbook.cli.app",
            "node",
            "--home",
            str(home),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--market",
            MARKET,
        ],
        capture_output=True,
        text=True,
        timeout=50,
    )


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777], ids=["0777", "0770", "1777"])
def test_node_refuses_a_home_others_can_write(tmp_path: Path, mode: int) -> None:
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(home, mode)
    out = _node(home)
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"{home} is writable by" in lines[0] and "chmod 700" in lines[0]
    assert list(home.iterdir()) == []  # refused before any key, store, lock or socket exists


def test_check_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    check_home(home)
    os.chmod(home, 0o755)  # others may read and enter: tightened by the server, not refused
    check_home(home)
    os.chmod(home, 0o720)
    with pytest.raises(PermissionError, match="writable by its group \\(mode 720\\)"):
        check_home(home)
    os.chmod(home, 0o702)
    with pytest.raises(PermissionError, match="writable by other users"):
        check_home(home)
    if os.geteuid() == 0:
        os.chmod(home, 0o700)
        os.chown(home, NOBODY, NOBODY)
        with pytest.raises(PermissionError, match="belongs to another user"):
            check_home(home)


async def test_socket_is_0600_and_home_tightened(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    async with trio.open_nursery() as nursery:
        path = await nursery.start(serve_control, home, Echo())
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
        nursery.cancel_scope.cancel()


async def test_socket_open_to_others_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that ignores modes (the socket stays 0777): the server refuses to serve
    and leaves no socket behind."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    real_chmod = os.chmod
    old = os.umask(0)
    try:
        monkeypatch.setattr(control.os, "umask", lambda mask: 0)
        monkeypatch.setattr(
            control.os,
            "chmod",
            lambda p, m, **kw: None if str(p).endswith(".sock") else real_chmod(p, m, **kw),
        )
        with pytest.raises(PermissionError, match="open to other users \\(mode 777"):
            await serve_control(home, Echo())
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert not socket_path(home).exists()


def _connect_as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
    script = (
        "import os, socket, sys\n"
        f"os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except PermissionError:\n"
        "    print('denied')\n"
        "else:\n"
        "    print('connected')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=30
    )


async def test_another_user_cannot_connect(tmp_path: Path) -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root to try the socket as another user")
    os.chmod(tmp_path, 0o711)  # let nobody reach the home
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    async with trio.open_nursery() as nursery:
        path = await nursery.start(serve_control, home, Echo())
        # The home (0700) stops nobody; so does the socket (0600) where the home is open.
        out = await trio.to_thread.run_sync(_connect_as_nobody, path)
        assert out.stdout.strip() == "denied", out
        os.chmod(home, 0o711)
        out = await trio.to_thread.run_sync(_connect_as_nobody, path)
        assert out.stdout.strip() == "denied", out
        # The owner connects.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(os.fspath(path))
        nursery.cancel_scope.cancel()
