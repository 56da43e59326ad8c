"""The store's disk fails under a running node: full, or read-only (issue #9).

What must hold: a client's ``submit`` gets one clear error (``store_full`` / ``store_error``),
nothing is acknowledged that was not stored, the node holds no op it has not stored, it does
not crash, and once the disk takes writes again it accepts ops and syncs what it missed.

In process (anywhere, fast): SQLite's ``max_page_count`` makes the store full exactly when a
test wants. With real node processes (root only, else skipped with the reason): the node's home
on a small tmpfs that a filler file fills, and on an ext4 loop filesystem that turns read-only
the way a failing disk makes it (``errors=remount-ro``, triggered through ext4's
``trigger_fs_error``). A filesystem cannot be remounted read-only while a process holds files
on it open for writing (the kernel says "busy"), so ``mount -o remount,ro`` and back is tried
with the node stopped: it refuses to start with one line, then starts and catches up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from crdtbook import Identity, Market
from crdtbook.node import service as service_module
from crdtbook.node.control_errors import STORE_ERROR, STORE_FULL, ControlError
from crdtbook.node.handler import ControlAdapter
from crdtbook.node.service import BAN_THRESHOLD, NodeService
from crdtbook.node.store import OpStore, StoreWriteError

from .harness import MARKET, NodeProcess, converged, wait_until
from .load import Load

pytestmark = pytest.mark.timeout(120)

UNLIMITED_PAGES = 4_294_967_294


# -- in process -----------------------------------------------------------------------------------


def _cap(store: OpStore) -> None:
    """Make the store full: it may not grow past its current size."""
    conn = store._conn
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


def _uncap(store: OpStore) -> None:
    conn = store._conn
    assert conn is not None
    conn.execute(f"PRAGMA max_page_count = {UNLIMITED_PAGES}")


def _stored_ids(store: OpStore, market: Market) -> set[bytes]:
    from crdtbook import op_id

    return {op_id(raw) for raw in store.load_market(market.id)}


def _order(i: int) -> dict[str, Any]:
    return {"side": "buy" if i % 2 else "sell", "price": str(90 + i % 20), "quantity": "1"}


class InProcessNode:
    def __init__(self, home: Path, fsync: bool = False) -> None:
        home.mkdir(mode=0o700)
        self.market = Market.parse(MARKET)
        self.store = OpStore.open(home, synchronous="FULL" if fsync else "NORMAL")
        self.service = NodeService(
            Identity.generate(), self.store, [self.market], publish_interval=0.0, fsync=fsync
        )
        self.service.load_from_store()
        self.adapter = ControlAdapter(self.service, lambda: {"peer_id": "me", "addrs": []})
        self.ms = next(iter(self.service.markets.values()))

    async def submit(self, i: int) -> str:
        result = await self.adapter.call("submit", _order(i))
        return str(result["order"]["id"])

    async def fill_store(self) -> tuple[list[str], ControlError]:
        """Submit until the capped store refuses: (ids acknowledged, the refusal)."""
        _cap(self.store)
        acked: list[str] = []
        for i in range(1000):
            try:
                acked.append(await self.submit(i))
            except ControlError as exc:
                return acked, exc
        raise AssertionError("the capped store never filled")

    def memory_is_disk(self) -> None:
        """The replica holds exactly the stored ops (applied or pending)."""
        held = {op.id for op in self.ms.replica.ops()} | set(self.ms.replica.pending_ids())
        assert held == _stored_ids(self.store, self.market)


def test_store_write_errors_are_typed_and_store_nothing(tmp_path: Path) -> None:
    market = Market.parse(MARKET)
    with OpStore.open(tmp_path, synchronous="NORMAL") as store:
        store.add_ops([(bytes([1]) * 32, market.id, 1, b"x" * 100)])
        _cap(store)
        batch = [(bytes([i]) * 32, market.id, i, os.urandom(1000)) for i in range(2, 200)]
        with pytest.raises(StoreWriteError) as info:
            store.add_ops(batch)
        assert info.value.reason == "full"
        assert "is full: no space left" in str(info.value) and "\n" not in str(info.value)
        assert store.count(market.id) == 1  # nothing of the batch, and still readable
        with pytest.raises(StoreWriteError):
            store.set_checkpoint(market.id, 1, os.urandom(100_000))
        _uncap(store)
        store.check_writable()
        assert store.add_ops(batch) == len(batch)


async def test_full_store_refuses_submit_and_forgets_the_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = InProcessNode(tmp_path / "home")
    acked, refusal = await node.fill_store()
    assert acked  # some fit before the cap bit
    assert refusal.code == STORE_FULL
    assert "is full" in refusal.message and "nothing was signed or sent" in refusal.message
    assert "\n" not in refusal.message
    # The op signed for the refused submit was applied before its write failed: the node
    # rebuilt the replica from the store, so it holds (shows, serves) only what is stored.
    node.memory_is_disk()
    stored = _stored_ids(node.store, node.market)
    assert {bytes.fromhex(i) for i in acked} <= stored
    last = node.ms.replica.get(bytes.fromhex(acked[-1]))
    assert last is not None
    # Now refused before anything is signed, and gossip refused for want of a disk counts
    # against no peer.
    before = len(node.ms.replica)
    with pytest.raises(ControlError) as info:
        await node.submit(1)
    assert info.value.code == STORE_FULL and len(node.ms.replica) == before
    assert not any(node.service.should_ban("peer") for _ in range(BAN_THRESHOLD * 2))
    fault = (await node.adapter.call("status", {}))["store_fault"]  # status says so too
    assert fault["reason"] == "full" and "is full" in fault["message"]

    # Space returns: the next submit goes through, at the sequence number the lost op had.
    _uncap(node.store)
    monkeypatch.setattr(service_module, "STORE_RETRY_INTERVAL", 0.0)
    again = await node.submit(2)
    op = node.ms.replica.get(bytes.fromhex(again))
    assert op is not None and op.seq == last.seq + 1
    assert node.service.store_fault is None
    assert (await node.adapter.call("status", {}))["store_fault"] is None
    assert {bytes.fromhex(i) for i in [*acked, again]} <= _stored_ids(node.store, node.market)
    node.memory_is_disk()
    node.store.close()


async def test_fsync_group_commit_failure_reaches_every_writer(tmp_path: Path) -> None:
    """With --fsync, concurrent writes share one commit; when it fails, every one of them must
    hear it (before the fix the others waited for ever)."""
    node = InProcessNode(tmp_path / "home", fsync=True)
    await node.fill_store()
    node.service.store_fault = None  # as if the disk filled up unseen: all sign, all write
    codes: list[str] = []

    async def one(i: int) -> None:
        try:
            await node.submit(i)
            codes.append("ok")
        except ControlError as exc:
            codes.append(exc.code)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
    assert codes == [STORE_FULL] * 8
    node.memory_is_disk()
    node.store.close()


async def test_gossip_and_sync_while_full_then_catch_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer's ops reach a node whose store is full: gossip is refused (not forwarded, no
    ban), a sync batch applied before its write failed is forgotten again; with space back,
    one sync brings everything."""
    full = InProcessNode(tmp_path / "full")
    peer = InProcessNode(tmp_path / "peer")
    await full.fill_store()
    for i in range(20):
        await peer.submit(i)
    raws = [op.raw for op in peer.ms.replica.ops()]
    from crdtbook.node.wire import encode_batch

    assert not await full.service.validate_gossip(full.ms, encode_batch(raws[:5]), "peer")
    assert not full.service.should_ban("peer")
    full.service.store_fault = None  # unseen: the sync batch is applied, then its write fails
    prepared = await full.service.prepare(full.ms, raws)
    with pytest.raises(StoreWriteError):
        await full.service.commit(full.ms, prepared, "peer")
    full.memory_is_disk()
    assert not any(op.id in full.ms.replica for op in peer.ms.replica.ops())

    _uncap(full.store)
    monkeypatch.setattr(service_module, "STORE_RETRY_INTERVAL", 0.0)
    prepared = await full.service.prepare(full.ms, raws)
    await full.service.commit(full.ms, prepared, "peer")
    assert all(op.id in full.ms.replica for op in peer.ms.replica.ops())
    full.memory_is_disk()
    for node in (full, peer):
        node.store.close()


# -- real processes on a real small filesystem ------------------------------------------------


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def _need_root_mount() -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root on Linux to mount a small filesystem for the node's home")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount not installed")


def _umount(point: Path) -> str:
    """Unmount (lazily if it is busy); returns what went wrong, or ""."""
    out = _run("umount", str(point))
    if out.returncode == 0:
        return ""
    users = _run("fuser", "-vm", str(point)) if shutil.which("fuser") else None
    _run("umount", "-l", str(point))
    return f"{out.stderr.strip()} {users.stderr.strip() if users else ''}"


@contextlib.contextmanager
def _private(directory: Path) -> Iterator[Path]:
    """``directory`` bound on itself as a private mount: filesystems mounted below it do not
    propagate into other mount namespaces (say, of ``ip netns exec`` processes that other tests
    run meanwhile), where a copy would keep them alive after this test unmounts them."""
    _need_root_mount()
    directory.mkdir()
    out = _run("mount", "--bind", str(directory), str(directory))
    if out.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {out.stderr.strip()}")
    try:
        _run("mount", "--make-private", str(directory))
        yield directory
    finally:
        _umount(directory)


@contextlib.contextmanager
def _tmpfs(point: Path, size: str) -> Iterator[Path]:
    _need_root_mount()
    point.mkdir()
    out = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(point))
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield point
    finally:
        _umount(point)


@contextlib.contextmanager
def _ext4(image: Path, point: Path, options: str = "errors=remount-ro") -> Iterator[str]:
    """A 16 MiB ext4 filesystem in a file on a loop device (yielded), mounted at ``point`` (no
    journal: it mounts again after an error without a replay). The loop device stays attached
    until the end, so the test can unmount and mount it again without racing its release."""
    _need_root_mount()
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.skip("mkfs.ext4 or losetup not installed (e2fsprogs, util-linux)")
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    out = _run("mkfs.ext4", "-q", "-m", "0", "-O", "^has_journal", str(image))
    if out.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {out.stderr.strip()}")
    out = _run("losetup", "--find", "--show", str(image))
    if out.returncode != 0:
        pytest.skip(f"no loop device here: {out.stderr.strip()}")
    device = out.stdout.strip()
    try:
        point.mkdir()
        out = _run("mount", "-o", options, device, str(point))
        if out.returncode != 0:
            pytest.skip(f"cannot mount an ext4 loop device here: {out.stderr.strip()}")
        os.chmod(point, 0o700)
        try:
            yield device
        finally:
            _umount(point)
    finally:
        _run("losetup", "-d", device)


def _fill(directory: Path) -> Path:
    """Write a filler file until the filesystem has no space left (to the last block)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 512):
            chunk = b"\0" * size
            try:
                while os.write(fd, chunk):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def _cli_submit(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crdtbook.cli.app", "submit", "buy", "1@100", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _start_pair(tmp_path: Path, home: Path, **kwargs: Any) -> tuple[NodeProcess, NodeProcess]:
    peer = NodeProcess(tmp_path / "peer").start()
    node = NodeProcess(home, [peer.addr], **kwargs)
    node.log_path = tmp_path / "node.log"  # never on the small filesystem
    try:
        node.start()
        wait_until(lambda: node.peers() >= 1 and peer.peers() >= 1, 20, "peers connected")
    except BaseException:
        node.stop()
        peer.stop()
        raise
    return peer, node


def _wait_converged(node: NodeProcess, peer: NodeProcess) -> None:
    try:
        wait_until(lambda: converged([node, peer]), 60, "the node to catch up")
    except AssertionError as exc:  # say where each stands
        states = [
            {k: n.market_status()[k] for k in ("ops", "pending", "missing", "heads", "digest")}
            for n in (node, peer)
        ]
        raise AssertionError(f"{exc}: {states}\n{node.log()}") from None


def _check_no_crash(node: NodeProcess, load: Load) -> None:
    assert node.proc is not None and node.proc.poll() is None, node.log()
    assert not [e for e in load.errors if e[0] not in (STORE_FULL, STORE_ERROR)], load.errors[:5]
    node.call("status")  # reads still served


def test_disk_full_under_load(tmp_path: Path) -> None:
    with _private(tmp_path / "fs") as base, _tmpfs(base / "small", "16m") as mnt:
        # Syncs every 0.5 s: several fall inside the fault.
        peer, node = _start_pair(tmp_path, mnt / "home", config={"sync_interval": 0.5})
        loads: list[Load] = []
        try:
            loads = [Load(node, 1), Load(peer, 2)]
            wait_until(lambda: len(loads[0].acked) >= 20, 20, "ops acknowledged")
            filler = _fill(mnt)
            loads[0].wait_errors(STORE_FULL, 5, 30)
            time.sleep(1.5)  # the peer's gossip and a few syncs meet the full store
            _check_no_crash(node, loads[0])
            _code, message = next(e for e in loads[0].errors if e[0] == STORE_FULL)
            assert "is full" in message and "\n" not in message
            cli = _cli_submit(node.home)
            assert cli.returncode == 1
            assert cli.stderr.strip().count("\n") == 0 and "[store_full]" in cli.stderr, cli

            filler.unlink()
            loads[0].ok_after = time.monotonic()
            assert loads[0].resumed.wait(20), loads[0].errors[-3:]
            for load in loads:
                load.stop()
            _wait_converged(node, peer)
            _check_no_crash(node, loads[0])
            # One error line when the fault began; no sync failure (with its traceback) for
            # each session meanwhile: a sync waits while nothing it brings could be stored.
            log = node.log_path.read_text(errors="replace")
            assert log.count("refusing new ops until it takes writes again") == 1, log[-3000:]
            assert "sync with" not in log and "Traceback" not in log, log[-3000:]
        finally:
            for load in loads:
                load.stop()
            node.stop()
            peer.stop()
        with OpStore.open(node.home) as store:
            stored = _stored_ids(store, Market.parse(MARKET))
        acked = {bytes.fromhex(i) for load in loads for i in load.acked}
        assert acked <= stored  # its own acknowledged ops, and the peer's it missed meanwhile


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_read_only_filesystem_under_load(tmp_path: Path, fsync: bool) -> None:
    """With --fsync every acknowledged op is on the disk itself when the filesystem fails.
    Without it (the default: durable across a crash of the node, not of the disk or the OS)
    the ops still in the page cache are lost from the node's own store, as on power loss;
    its peer got them by gossip, and the restarted node syncs them back."""
    with _private(tmp_path / "fs") as base, _ext4(tmp_path / "disk.img", base / "small") as device:
        mnt = base / "small"
        trigger = Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error")
        if not trigger.exists():
            pytest.skip(f"{trigger} missing: this kernel cannot fail an ext4 filesystem on cue")
        peer, node = _start_pair(tmp_path, mnt / "home", config={"fsync": fsync})
        loads: list[Load] = []
        try:
            loads = [Load(node, 3), Load(peer, 4)]
            wait_until(lambda: len(loads[0].acked) >= 20, 20, "ops acknowledged")
            trigger.write_text("crdtbook test: the disk fails\n")
            loads[0].wait_errors(STORE_ERROR, 5, 30)
            _check_no_crash(node, loads[0])
            _code, message = next(e for e in loads[0].errors if e[0] == STORE_ERROR)
            assert "read-only filesystem" in message and "\n" not in message, message
            cli = _cli_submit(node.home)
            assert cli.returncode == 1 and "[store_error]" in cli.stderr, cli
            assert cli.stderr.strip().count("\n") == 0
            for load in loads:
                load.stop()
            # ext4 keeps a filesystem that failed read-only until it is unmounted: stop the
            # node (in order: it must not crash on the way out either), mount it again.
            node.stop()
            assert node.proc is not None and node.proc.returncode == 0, node.log()
            assert not (why := _umount(mnt)), why
            _run("e2fsck", "-fy", device)
            out = _run("mount", device, str(mnt))
            assert out.returncode == 0, out.stderr
            # With nothing open on it, `mount -o remount,ro` works: the node refuses to start
            # on a read-only home, with one line.
            out = _run("mount", "-o", "remount,ro", str(mnt))
            assert out.returncode == 0, out.stderr
            refused = subprocess.run(
                NodeProcess(node.home, [peer.addr]).command(),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert refused.returncode != 0
            assert refused.stderr.strip().count("\n") == 0, refused.stderr
            assert "Read-only file system" in refused.stderr, refused.stderr
            # And back: read-write, the node starts and catches up with the peer; every
            # acknowledged op is in its store (with --fsync before it starts, too).
            assert _run("mount", "-o", "remount,rw", str(mnt)).returncode == 0
            acked = {bytes.fromhex(i) for i in loads[0].acked}
            with OpStore.open(node.home) as store:
                stored = _stored_ids(store, Market.parse(MARKET))
            if fsync:
                assert acked <= stored
            node = NodeProcess(node.home, [peer.addr])
            node.log_path = tmp_path / "node.log"
            node.start()
            _wait_converged(node, peer)
            node.stop()
            with OpStore.open(node.home) as store:
                assert acked <= _stored_ids(store, Market.parse(MARKET))
        finally:
            for load in loads:
                load.stop()
            node.stop()
            peer.stop()
