"""Compaction's promises one at a time (the stateful machine in test_compaction_stateful.py
checks them together): memory holds what compaction kept, a whole-log sync served from a
compacted replica sends every op without keeping what it read back, late copies are known, and
a market without witnesses never compacts."""

from __future__ import annotations

import random

from witnessed import GENESIS, PLAIN, TRADERS, WMARKET

from crdtbook import Op, Replica, ops_missing_for


class _Archive:
    def __init__(self) -> None:
        self.ops: dict[bytes, Op] = {}

    def get(self, ident: bytes) -> Op | None:
        return self.ops.get(ident)


def _compact(twin: Replica, archive: _Archive) -> None:
    """Compact ``twin`` and keep what left memory in its archive, as a node's store does."""
    before = dict(twin.applied_index)
    for ident in twin.compact().ops:
        archive.ops[ident] = before[ident]


def _trade(full: Replica, twin: Replica, archive: _Archive, steps: int, seed: int) -> None:
    rng = random.Random(seed)
    for step in range(steps):
        if step % 10 < 8:
            op = full.submit(rng.choice(TRADERS), rng.choice(("buy", "sell")),
                             rng.randint(97, 103), rng.randint(1, 4))
        else:
            op = full.heartbeat(GENESIS[step % 3])
        twin.apply(op.raw)
        if step % 97 == 96:
            _compact(twin, archive)


def test_compacted_replica_serves_a_whole_log_sync_without_growing() -> None:
    archive = _Archive()
    full, twin = Replica(WMARKET), Replica(WMARKET, archive=archive, point_interval=40)
    _trade(full, twin, archive, 1500, seed=1)
    _compact(twin, archive)
    held = len(twin.applied_index)
    assert twin.compacted_ops > 1000 and held < 300
    sent = ops_missing_for(twin.applied_index, twin.heads(), [])
    assert len(twin.applied_index) == held  # read back from the archive, not kept
    joiner = Replica(WMARKET)
    report = joiner.apply_many(op.raw for op in sent)
    assert not report.invalid and joiner.pending_count == 0
    assert joiner.digest() == full.digest() == twin.digest()


def test_late_copies_of_compacted_ops_are_known_and_change_nothing() -> None:
    archive = _Archive()
    full, twin = Replica(WMARKET), Replica(WMARKET, archive=archive, point_interval=40)
    _trade(full, twin, archive, 600, seed=2)
    digest = twin.digest()
    report = twin.apply_many(op.raw for op in full.ops())
    assert report.duplicates == len(full.ops()) and not report.applied
    assert twin.digest() == digest == full.digest()
    assert all(twin.is_final(op.id) for op in full.ops()[: full.final_count])


def test_a_market_without_witnesses_never_compacts() -> None:
    replica = Replica(PLAIN, archive=_Archive())
    for i in range(20):
        replica.submit(TRADERS[i % 2], ("buy", "sell")[i % 2], 100, 1)
    report = replica.compact()
    assert report.ops == [] and replica.compacted_ops == 0 and len(replica.ops()) == 20


def test_a_local_snapshot_of_another_market_or_damaged_or_without_its_ops_is_refused() -> None:
    """from_snapshot raises ValueError (the node then restores from the whole log) for a blob
    of another market, a damaged one, one whose kept ops are not given, and junk; a good one
    restores the same replica."""
    import pytest
    from witnessed import witnessed_market

    archive = _Archive()
    full, twin = Replica(WMARKET), Replica(WMARKET, archive=archive, point_interval=40)
    _trade(full, twin, archive, 400, seed=3)
    _compact(twin, archive)
    blob = twin.snapshot()
    live = [op.raw for op in twin.applied_index.values()]
    restored = Replica.from_snapshot(WMARKET, blob, live, archive=archive, point_interval=40)
    assert restored.digest() == twin.digest() == full.digest()

    other = witnessed_market(*GENESIS, name="OTHER")
    with pytest.raises(ValueError, match="another market"):
        Replica.from_snapshot(other, blob, live, archive=archive)
    damaged = bytearray(blob)
    damaged[len(damaged) // 2] ^= 0x01
    with pytest.raises(ValueError):
        Replica.from_snapshot(WMARKET, bytes(damaged), live, archive=archive)
    with pytest.raises(ValueError, match="not given"):
        Replica.from_snapshot(WMARKET, blob, live[: len(live) // 2], archive=archive)
    for junk in (b"", b"\xff" * 40, b"\xa0"):
        with pytest.raises(ValueError):
            Replica.from_snapshot(WMARKET, junk, live, archive=archive)
    with pytest.raises(ValueError):
        Replica.from_snapshot(PLAIN, blob, live, archive=archive)


def test_a_compactions_fills_and_orders_are_built_as_read_and_stay_as_they_were() -> None:
    """CompactReport.fills/orders are lazy sequences (a node reads them in its store thread):
    the same items however read (index, negative index, slice, iteration), and unchanged by
    the replica's later ops."""
    import pytest

    archive = _Archive()
    full, source = Replica(WMARKET), Replica(WMARKET)
    _trade(full, source, _Archive(), 300, seed=5)
    twin = Replica(WMARKET, archive=archive, point_interval=200)
    twin.apply_many(op.raw for op in full.ops())
    report = twin.compact()
    assert report.point >= 200 and len(report.fills) > 20 and len(report.orders) > 20
    for rows in (report.fills, report.orders):
        items = list(rows)
        assert len(items) == len(rows) and rows[:] == items and rows[1:3] == items[1:3]
        if items:
            assert rows[-1] == items[-1] and rows[0] == items[0]
        with pytest.raises(IndexError):
            rows[len(items)]
    assert all(o.final and o.status in ("filled", "cancelled", "expired", "rejected")
               for o in report.orders)
    before = (list(report.fills), list(report.orders))
    _trade(full, twin, archive, 300, seed=6)  # more ops, more compactions
    assert twin.compacted_ops > report.point
    assert (list(report.fills), list(report.orders)) == before
