"""After a machine crash a node signs nothing in a market until it synced it (node/crash_gate.py).

Without ``--fsync`` a machine crash can lose the store's last commits: the node's own last ops,
which its peers may hold. Signing at once would reuse their sequence numbers (an equivocation of
the key). The run state in the store tells a crash of the machine (another boot id) from a kill
of the process (same boot: nothing lost) and from a stop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from crdtbook import Replica, SigningWaits
from crdtbook.node import crash_gate
from crdtbook.node.crash_gate import CRASH_SIGNING_WAIT, begin_run, end_run
from crdtbook.node.service import NodeService
from crdtbook.node.store import OpStore

from .test_hostile_inputs import ALICE, BOB, V1

pytestmark = pytest.mark.timeout(20)


@pytest.mark.parametrize(
    ("previous", "boot", "fsync", "lost"),
    [
        (None, "b1", False, False),  # a new store
        (b"stopped", "b2", False, False),  # stopped, then a reboot
        (b"running b1", "b1", False, False),  # killed (kill -9): the OS kept every commit
        (b"running b1", "b2", False, True),  # the machine went down with the node
        (b"running b1", "", False, True),  # no boot id to compare: assume the worst
        (b"garbage", "b1", False, True),
        (b"running b1", "b2", True, False),  # --fsync: every commit reached the disk
    ],
)
def test_which_starts_may_follow_lost_commits(
    previous: bytes | None, boot: str, fsync: bool, lost: bool
) -> None:
    assert crash_gate.may_have_lost_commits(previous, boot, fsync) is lost


def test_the_run_state_lives_in_the_store(tmp_path: Path) -> None:
    store = OpStore.open(tmp_path / "home", synchronous="OFF")
    try:
        assert begin_run(store, fsync=False, boot="b1") is False  # new
        assert begin_run(store, fsync=False, boot="b1") is False  # killed, same boot
        assert begin_run(store, fsync=False, boot="b2") is True  # a reboot while running
        end_run(store)
        assert begin_run(store, fsync=False, boot="b3") is False  # stopped first
    finally:
        store.close()


def test_this_machine_has_a_boot_id() -> None:
    if not crash_gate.BOOT_ID_PATH.exists():
        pytest.skip("no /proc/sys/kernel/random/boot_id on this system")
    assert len(crash_gate.boot_id()) >= 16
    assert crash_gate.boot_id(Path("/nonexistent/boot_id")) == ""


@asynccontextmanager
async def _after_crash(tmp_path: Path) -> AsyncIterator[NodeService]:
    store = OpStore.open(tmp_path / "home", synchronous="OFF")
    service = NodeService(ALICE, store, [V1])
    service.load_from_store()
    service.after_crash = True
    service.crash_wait_from = trio.current_time()
    try:
        yield service
    finally:
        store.close()


async def test_after_a_crash_signing_waits_for_a_first_sync(tmp_path: Path) -> None:
    async with _after_crash(tmp_path) as service:
        ms = service.by_name[V1.name]
        with pytest.raises(SigningWaits, match="until a sync with a peer completes"):
            await service.submit(ms, "buy", 100, 1, "gtc", None)
        assert len(ms.replica) == 0  # nothing signed
        ms.last_sync = 1.0  # a sync completed: whatever peers held of ours is back
        op = await service.submit(ms, "buy", 100, 1, "gtc", None)
        assert op.seq == 1


async def test_a_sync_brings_back_the_lost_op_before_the_next_is_signed(tmp_path: Path) -> None:
    """What the wait is for: the op the crash lost comes back, and the next takes seq 2."""
    lost = Replica(V1).submit(ALICE, "sell", 101, 1)  # signed, sent, then lost with the machine
    async with _after_crash(tmp_path) as service:
        ms = service.by_name[V1.name]
        with pytest.raises(SigningWaits):
            await service.submit(ms, "buy", 99, 1, "gtc", None)
        await service.commit(ms, await service.prepare(ms, [lost.raw]), "sync")
        ms.last_sync = 1.0
        op = await service.submit(ms, "buy", 99, 1, "gtc", None)
        assert op.seq == 2 and not ms.replica.forked_authors()


async def test_with_no_peer_signing_waits_at_most_the_bound(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with _after_crash(tmp_path) as service:
        ms = service.by_name[V1.name]
        await trio.sleep(CRASH_SIGNING_WAIT - 1)
        with pytest.raises(SigningWaits):
            await service.submit(ms, "buy", 100, 1, "gtc", None)
        ms.last_sync_try = trio.current_time()  # a peer: a session began (and failed)
        await trio.sleep(CRASH_SIGNING_WAIT - 1)
        with pytest.raises(SigningWaits):
            await service.submit(ms, "buy", 100, 1, "gtc", None)
        await trio.sleep(1)  # no session begun for the whole bound: no peer to wait for
        await service.submit(ms, "buy", 100, 1, "gtc", None)
        await service.submit(ms, "sell", 101, 1, "gtc", None)  # and it stays over


async def test_a_market_without_a_crash_signs_at_once(tmp_path: Path) -> None:
    store = OpStore.open(tmp_path / "home", synchronous="OFF")
    try:
        service = NodeService(BOB, store, [V1])
        service.load_from_store()
        await service.submit(service.by_name[V1.name], "buy", 100, 1, "gtc", None)
    finally:
        store.close()
