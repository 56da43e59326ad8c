"""NodeService's units in process (issue #13): the gossip validator, the apply task, prepare and
commit, ``Replica.precheck`` as the validator uses it, and the gossip flush loop.

A service over a store in ``tmp_path``, no network: gossip is a call of ``validate_gossip``,
publishing a fake that records what it is given. Timers run on trio's autojump clock; tasks are
waited on with ``wait_all_tasks_blocked`` or events, never with sleeps on the real clock.
Ops and the store check come from test_hostile_inputs.py.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import crdtbook.node.publish_schedule as schedule
import crdtbook.node.service as service_module
from crdtbook import BadLamport, InvalidOp, Op, op_id
from crdtbook.node.service import MarketState, NodeService, Watcher
from crdtbook.node.store import OpStore, StoreError
from crdtbook.node.wire import decode_batch, encode_batch

from .test_hostile_inputs import ALICE, BOB, MALLORY, V1, Node, order

pytestmark = pytest.mark.timeout(10)


@asynccontextmanager
async def bare(tmp_path: Path, **options: Any) -> AsyncIterator[Node]:
    """A service following V1 with no task running: the test starts what it needs."""
    store = OpStore.open(tmp_path / "home", synchronous="OFF")
    service = NodeService(ALICE, store, [V1], **options)
    service.load_from_store()
    try:
        yield Node(service, store)
    finally:
        store.close()


def chain(who: Any, n: int, first_price: int = 100) -> list[Op]:
    """``n`` orders by one author, each the parent of the next."""
    ops: list[Op] = []
    for i in range(n):
        parents = (ops[-1].id,) if ops else ()
        ops.append(order(who, V1, i + 1, i + 1, parents, price=first_price + i))
    return ops


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """The bytes the service decodes (and verifies), in order."""
    seen: list[bytes] = []
    real = service_module.decode_with_id

    def counting(raw: bytes, ident: bytes, *args: Any) -> Op:
        assert ident == op_id(raw)  # the id prepare hashed, handed over, not hashed again
        seen.append(raw)
        return real(raw, ident, *args)

    monkeypatch.setattr(service_module, "decode_with_id", counting)
    yield seen


# -- validate_gossip -------------------------------------------------------------------------


@pytest.mark.parametrize("fsync", [False, True], ids=["normal", "fsync"])
async def test_valid_batch_is_persisted_before_the_validator_accepts_it(
    tmp_path: Path, fsync: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with bare(tmp_path, fsync=fsync) as n:
        ms = n.ms(V1)
        ops = chain(BOB, 3)
        returned = trio.Event()
        stored_before_return: list[bool] = []
        real_add = n.store.add_ops

        def add_ops(items: Any) -> int:
            items = list(items)
            stored_before_return.append(not returned.is_set())
            return real_add(items)

        monkeypatch.setattr(n.store, "add_ops", add_ops)
        accepted = await n.service.validate_gossip(ms, encode_batch([o.raw for o in ops]), "bob")
        returned.set()
        assert accepted is True
        assert stored_before_return == [True]  # one write, done before the verdict
        assert all(n.store.has(o.id) for o in ops)
        # Accepted means durable and queued; the apply task (not running here) applies.
        assert [o.id for o in ms.apply_queue] == [o.id for o in ops]
        assert ms.queued == {o.id for o in ops} and ms.apply_ready.is_set()
        assert len(ms.replica) == 0
        assert (ms.refused, ms.received) == (0, 0)


async def test_invalid_op_rejects_the_message_and_is_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="crdtbook.node")
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        good = order(BOB, V1)
        forged = bytearray(order(MALLORY, V1, price=7).raw)
        forged[-1] ^= 1
        message = encode_batch([good.raw, bytes(forged)])
        assert await n.service.validate_gossip(ms, message, "mallory") is False
        assert ms.refused == 1
        assert ms.replica.is_invalid(op_id(bytes(forged)))
        assert not n.store.has(op_id(bytes(forged)))
        # The valid op of the same message is kept: durable and queued (the verdict is on the
        # message, which is not forwarded).
        assert n.store.has(good.id) and good.id in ms.queued
        assert "refused 1 invalid ops from mallory" in caplog.text
        # The same bytes again: known invalid, refused without another verification.
        assert await n.service.validate_gossip(ms, encode_batch([bytes(forged)]), "x") is False
        assert ms.refused == 2


@pytest.mark.parametrize(
    "data",
    [b"", b"not cbor \xff", encode_batch([])[:-1], b"\x82\x02\x80", b"\x82\x01\x81\x01"],
    ids=["empty", "garbage", "truncated", "version-2", "item-not-bytes"],
)
async def test_malformed_frame_is_rejected_before_any_op(
    tmp_path: Path, data: bytes, decoded: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="crdtbook.node")
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        assert await n.service.validate_gossip(ms, data, "mallory") is False
        assert decoded == [] and ms.apply_queue == [] and n.store.count(V1.id) == 0
        assert "refused a malformed gossip message from mallory" in caplog.text


async def test_known_queued_and_repeated_ops_are_skipped_without_decoding(
    tmp_path: Path, decoded: list[bytes]
) -> None:
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        a, b, c = chain(BOB, 3)
        assert await n.service.validate_gossip(ms, encode_batch([a.raw]), "p")
        assert decoded == [a.raw]
        # a is queued (not yet applied): known all the same.
        assert await n.service.validate_gossip(ms, encode_batch([a.raw, b.raw, b.raw]), "p")
        assert decoded == [a.raw, b.raw]  # b once, a not again
        ms.replica.apply_many(ms.apply_queue)  # what the apply task does
        ms.apply_queue, ms.queued = [], set()
        assert a.id in ms.replica and b.id in ms.replica
        assert await n.service.validate_gossip(ms, encode_batch([a.raw, b.raw, c.raw]), "p")
        assert decoded == [a.raw, b.raw, c.raw]
        assert [o.id for o in ms.apply_queue] == [c.id]


async def test_validator_refuses_everything_while_closing(tmp_path: Path) -> None:
    async with bare(tmp_path) as n:
        n.service.closing = True
        message = encode_batch([order(BOB, V1).raw])
        assert not await n.service.validate_gossip(n.ms(V1), message, "p")
        assert n.store.count(V1.id) == 0 and n.ms(V1).refused == 0


# -- Replica.precheck through the validator ----------------------------------------------------


async def test_precheck_refuses_an_op_invalid_against_the_applied_past(tmp_path: Path) -> None:
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        good = order(BOB, V1)
        ms.replica.apply(good.raw)
        # Valid signature, wrong Lamport time for its (applied) parent.
        bad = order(MALLORY, V1, 1, good.lamport, (good.id,))
        with pytest.raises(BadLamport):
            ms.replica.precheck(bad)
        assert not await n.service.validate_gossip(ms, encode_batch([bad.raw]), "mallory")
        assert ms.refused == 1
        assert ms.replica.is_invalid(bad.id)
        assert not n.store.has(bad.id) and ms.apply_queue == []


async def test_precheck_defers_an_op_whose_parents_are_not_applied(tmp_path: Path) -> None:
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        a, b = chain(BOB, 2)
        assert ms.replica.precheck(a) is True
        assert ms.replica.precheck(b) is False  # no verdict yet: forwarded, judged on apply
        assert await n.service.validate_gossip(ms, encode_batch([b.raw]), "p")
        assert n.store.has(b.id) and b.id in ms.queued
        # A child of a known-invalid op is refused at once.
        bad = order(MALLORY, V1, 1, 1, (), price=1)
        bad_raw = bytearray(bad.raw)
        bad_raw[-1] ^= 1
        assert not await n.service.validate_gossip(ms, encode_batch([bytes(bad_raw)]), "m")
        child = order(MALLORY, V1, 2, 2, (op_id(bytes(bad_raw)),), price=2)
        with pytest.raises(InvalidOp):
            ms.replica.precheck(child)
        assert not await n.service.validate_gossip(ms, encode_batch([child.raw]), "m")
        assert ms.refused == 2


# -- apply_loop --------------------------------------------------------------------------------


async def test_apply_loop_applies_queued_ops_in_one_batch_and_notifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        ops = chain(BOB, 4)
        for op in ops:  # four messages queue before the apply task runs
            assert await n.service.validate_gossip(ms, encode_batch([op.raw]), "p")
        batches: list[int] = []
        real = ms.replica.apply_many

        def apply_many(items: Any) -> Any:
            items = list(items)
            batches.append(len(items))
            return real(items)

        monkeypatch.setattr(ms.replica, "apply_many", apply_many)
        watcher = Watcher()
        ms.watchers.append(watcher)
        changed = ms.changed
        async with trio.open_nursery() as nursery:
            nursery.start_soon(n.service.apply_loop, ms)
            with trio.fail_after(2):
                await watcher.receive.receive()
            assert changed.is_set()
            assert batches == [4]
            assert watcher.take() == ([o.id for o in ops], 0)
            assert all(o.id in ms.replica for o in ops)
            assert ms.apply_queue == [] and ms.queued == set()
            assert (ms.received, ms.refused) == (4, 0)
            # More gossip wakes it again.
            extra = order(ALICE, V1, price=50)
            assert await n.service.validate_gossip(ms, encode_batch([extra.raw]), "p")
            with trio.fail_after(2):
                await watcher.receive.receive()
            assert batches == [4, 1] and watcher.take() == ([extra.id], 0)
            nursery.cancel_scope.cancel()
        n.check_log(V1)


async def test_apply_loop_counts_and_drops_a_deferred_op_found_invalid(tmp_path: Path) -> None:
    """An op whose parent is not applied passes the validator unjudged (precheck: False) and is
    stored; when its parent arrives it turns out invalid (Lamport not above its parent's): it is
    counted as refused and leaves the store. (It was neither, before Replica reported pending
    ops refused on release: ``take_refused_pending``.)"""
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        a = order(BOB, V1)
        bad = order(MALLORY, V1, 1, a.lamport, (a.id,))
        child = order(MALLORY, V1, 2, a.lamport + 1, (bad.id,), price=101)
        assert await n.service.validate_gossip(ms, encode_batch([bad.raw, child.raw]), "p")
        assert n.store.has(bad.id) and n.store.has(child.id)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(n.service.apply_loop, ms)
            await trio.testing.wait_all_tasks_blocked()
            assert ms.replica.is_pending(bad.id) and ms.replica.is_pending(child.id)
            assert await n.service.validate_gossip(ms, encode_batch([a.raw]), "p")
            await trio.testing.wait_all_tasks_blocked()
            assert a.id in ms.replica and ms.replica.is_invalid(bad.id)
            assert ms.replica.is_invalid(child.id)  # an ancestor is invalid
            assert ms.queued == set()
            nursery.cancel_scope.cancel()
        assert ms.refused == 2
        assert not n.store.has(bad.id) and not n.store.has(child.id)
        n.check_log(V1)


async def test_sync_counts_and_drops_a_pending_op_found_invalid(tmp_path: Path) -> None:
    """The same through prepare/commit: the op waits (stored) after one frame, its parent comes
    in the next."""
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        a = order(BOB, V1)
        bad = order(MALLORY, V1, 1, a.lamport, (a.id,))
        first = await n.service.commit(ms, await n.service.prepare(ms, [bad.raw]), "s")
        assert first.new == 1 and n.store.has(bad.id) and ms.replica.is_pending(bad.id)
        await n.service.commit(ms, await n.service.prepare(ms, [a.raw]), "s")
        assert ms.replica.is_invalid(bad.id) and ms.refused == 1
        assert not n.store.has(bad.id)
        n.check_log(V1)


# -- prepare / commit (the sync path) --------------------------------------------------------


async def test_prepare_skips_duplicates_and_remembers_invalid_bytes(
    tmp_path: Path, decoded: list[bytes]
) -> None:
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        a, b = chain(BOB, 2)
        ms.replica.apply(a.raw)
        truncated = order(MALLORY, V1, price=5).raw[:-10]
        prepared = await n.service.prepare(ms, [a.raw, b.raw, b.raw, truncated])
        assert [o.id for o in prepared.ops] == [b.id]
        assert prepared.raws == {b.id: b.raw}
        assert (prepared.result.duplicates, prepared.result.invalid) == (2, 1)
        assert decoded == [b.raw, truncated]
        assert ms.replica.is_invalid(op_id(truncated))
        assert len(ms.replica) == 1 and n.store.count(V1.id) == 0  # prepare changes no state
        # Invalid bytes again: counted invalid, never decoded again.
        again = await n.service.prepare(ms, [truncated])
        assert (again.ops, again.result.invalid, again.result.duplicates) == ([], 1, 0)
        assert decoded == [b.raw, truncated]


async def test_commit_applies_persists_and_notifies(tmp_path: Path) -> None:
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        a, b, c = chain(BOB, 3)
        watcher = Watcher()
        ms.watchers.append(watcher)
        # c's parent b is missing: c is kept pending, and stored too.
        result = await n.service.commit(ms, await n.service.prepare(ms, [a.raw, c.raw]), "sync")
        assert (result.new, result.duplicates, result.invalid) == (2, 0, 0)
        assert a.id in ms.replica and ms.replica.is_pending(c.id)
        assert n.store.has(a.id) and n.store.has(c.id)
        assert watcher.take() == ([a.id], 0)
        # b arrives: b and c apply; a again is a duplicate.
        result = await n.service.commit(ms, await n.service.prepare(ms, [a.raw, b.raw]), "sync")
        assert (result.new, result.duplicates) == (1, 1)
        assert c.id in ms.replica and not ms.replica.is_pending(c.id)
        assert sorted(watcher.take()[0]) == sorted([b.id, c.id])
        assert ms.received == 3 and ms.refused == 0
        n.check_log(V1)


async def test_commit_counts_invalid_bytes_found_by_prepare(tmp_path: Path) -> None:
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        junk = [b"\x00", order(MALLORY, V1).raw[:-1]]
        result = await n.service.commit(ms, await n.service.prepare(ms, junk), "sync")
        assert (result.new, result.invalid) == (0, 2)
        assert ms.refused == 2 and n.store.count(V1.id) == 0


async def test_commit_counts_ops_invalid_in_context(tmp_path: Path) -> None:
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        a = order(BOB, V1)
        bad = order(MALLORY, V1, 1, a.lamport, (a.id,))
        result = await n.service.commit(ms, await n.service.prepare(ms, [a.raw, bad.raw]), "s")
        assert (result.new, result.invalid) == (1, 1)
        assert ms.refused == 1 and not n.store.has(bad.id) and n.store.has(a.id)


# -- the gossip flush loop -----------------------------------------------------------------------


class Published:
    """A fake publish: what went out, when, and a channel to wait on it."""

    def __init__(self) -> None:
        self.log: list[tuple[float, list[bytes]]] = []
        self.send, self.receive = trio.open_memory_channel[tuple[float, list[bytes]]](100)

    async def __call__(self, topic: str, data: bytes) -> None:
        self.log.append((trio.current_time(), decode_batch(data)))
        self.send.send_nowait(self.log[-1])

    async def next(self) -> tuple[float, list[bytes]]:
        """The next message published (in order)."""
        return await self.receive.receive()


async def _submit(n: Node, ms: MarketState, price: int) -> bytes:
    op = await n.service.submit(ms, "sell", price, 1, "gtc", None)
    return op.raw


def grid_after(instant: float, period: float) -> float:
    """The first whole multiple of ``period`` at or after ``instant``."""
    return math.ceil(instant / period - 1e-9) * period


async def test_flush_loop_paces_batches_by_the_publish_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    interval, delay = 0.1, 0.002
    async with bare(tmp_path, publish_interval=interval, flush_delay=delay) as n:
        n.service.headroom.spare = False  # the period is then the interval, on its own phase
        ms = n.ms(V1)
        published = Published()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(n.service.flush_loop, ms, published, lambda _t: 3)
            await trio.sleep(1)
            # Idle: the first op waits only flush_delay, with whatever joins it meanwhile.
            start = trio.current_time()
            first = [await _submit(n, ms, 100), await _submit(n, ms, 101)]
            at, batch = await published.next()
            assert at == pytest.approx(start + delay) and batch == first
            # Busy (and no time to spare): the next op waits out the interval since the last
            # publish, and everything submitted during it goes out in one message.
            second = [await _submit(n, ms, 102)]
            await trio.sleep(0.05)
            second.append(await _submit(n, ms, 103))
            at2, batch = await published.next()
            assert at2 == pytest.approx(at + interval) and batch == second
            # And the next a whole interval after that.
            third = [await _submit(n, ms, 104)]
            at3, batch = await published.next()
            assert at3 == pytest.approx(at2 + interval) and batch == third
            # An op long after the last publish goes out after flush_delay again.
            await trio.sleep(5)
            start = trio.current_time()
            fourth = [await _submit(n, ms, 105)]
            at4, batch = await published.next()
            assert at4 == pytest.approx(start + delay) and batch == fourth
            times = [t for t, _ in published.log]
            assert all(b - a >= interval - 1e-9 for a, b in itertools.pairwise(times))
            assert len(published.log) == 4
            nursery.cancel_scope.cancel()


async def test_flush_loop_publishes_busy_batches_on_the_wall_clocks_grid_sooner_while_spare(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Busy with time to spare (node/headroom.py), the outbox goes out at whole multiples of
    PUBLISH_SPARE_FRACTION of the interval on the wall clock (so such nodes publish together);
    without, an interval after the last message."""
    interval, delay, offset = 0.4, 0.002, 1_000_000.013
    spare_period = schedule.publish_period(interval, spare=True)
    assert spare_period == pytest.approx(interval * schedule.PUBLISH_SPARE_FRACTION)
    async with bare(tmp_path, publish_interval=interval, flush_delay=delay) as n:
        n.service.wall_clock = lambda: trio.current_time() + offset
        ms = n.ms(V1)
        headroom = n.service.headroom  # never registered here: spare until the test says not
        assert headroom.spare
        published = Published()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(n.service.flush_loop, ms, published, lambda _t: 3)
            await _submit(n, ms, 100)
            last, _ = await published.next()
            price = 101
            for spare in (True, False, True):
                headroom.spare = spare
                for _ in range(3):
                    await trio.sleep(0.01)
                    raw = await _submit(n, ms, price)
                    price += 1
                    at, got = await published.next()
                    assert got == [raw]
                    if spare:
                        half = last + offset + spare_period / 2
                        due = grid_after(half, spare_period)
                        assert at + offset == pytest.approx(due, rel=0, abs=1e-6)
                    else:
                        assert at == pytest.approx(last + interval)
                    last = at
            nursery.cancel_scope.cancel()


async def test_flush_loop_interval_follows_topic_peers_and_splits_big_outboxes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with bare(tmp_path, gossip_batch=2) as n:  # publish_interval: adaptive
        n.service.headroom.spare = False
        ms = n.ms(V1)
        peers = [10]
        interval = n.service.publish_interval_for(10)
        assert interval == pytest.approx(10 * schedule.PUBLISH_INTERVAL_PER_PEER)
        published = Published()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(n.service.flush_loop, ms, published, lambda _t: peers[0])
            raws = [await _submit(n, ms, 100)]
            at, _ = await published.next()
            raws += [await _submit(n, ms, 101 + i) for i in range(5)]  # one flush, 3 messages
            batches = [await published.next() for _ in range(3)]
            assert [b for _, b in batches] == [raws[1:3], raws[3:5], raws[5:6]]
            assert all(t == pytest.approx(at + interval) for t, _ in batches)
            peers[0] = 50  # a bigger topic: a longer interval, up to the maximum
            late = trio.current_time()
            await _submit(n, ms, 200)
            at2, _ = await published.next()
            assert at2 == pytest.approx(max(late + n.service.flush_delay, batches[0][0] + 1.0))
            nursery.cancel_scope.cancel()


async def test_flush_survives_a_failing_publish(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with bare(tmp_path, publish_interval=0.0) as n:
        ms = n.ms(V1)
        calls: list[int] = []
        failed = trio.Event()
        published = Published()

        async def flaky(topic: str, data: bytes) -> None:
            calls.append(len(decode_batch(data)))
            if len(calls) == 1:
                failed.set()
                raise RuntimeError("no peers")
            await published(topic, data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(n.service.flush_loop, ms, flaky, lambda _t: 1)
            await _submit(n, ms, 100)
            await failed.wait()
            assert calls == [1] and "gossip publish on DEMO failed: no peers" in caplog.text
            raw = await _submit(n, ms, 101)
            assert (await published.next())[1] == [raw]
            nursery.cancel_scope.cancel()


async def test_wal_checkpoints_run_in_a_worker_thread_every_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node turns SQLite's auto-checkpoint off and copies the WAL from a worker thread once
    per ``WAL_CHECKPOINT_INTERVAL``; a failed copy is logged and tried again. (Real clock, a short
    interval: a MockClock jumps while a worker thread runs.)"""
    monkeypatch.setattr(service_module, "WAL_CHECKPOINT_INTERVAL", 0.02)
    async with bare(tmp_path) as n:
        store = n.service.store
        threads: list[int] = []
        third = trio.Event()
        real = store.checkpoint_wal
        token = trio.lowlevel.current_trio_token()

        def checkpoint() -> tuple[int, int]:
            threads.append(threading.get_ident())
            if len(threads) == 2:
                raise StoreError("disk trouble")
            if len(threads) == 3:
                trio.from_thread.run_sync(third.set, trio_token=token)
            return real()

        monkeypatch.setattr(store, "checkpoint_wal", checkpoint)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(n.service.wal_checkpoint_loop)
                await third.wait()
                nursery.cancel_scope.cancel()
        assert store.background_checkpoints
        assert len(threads) >= 3 and threading.get_ident() not in threads
