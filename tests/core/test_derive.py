"""Deriving a point's prefix (crdtbook._derive): a node that joined from a point state gets the
fills and finished orders before the point from the fetched history, the same rows every
compacting replica handed its node, or a refusal saying what differs."""

from __future__ import annotations

import random
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from witnessed import GENESIS, TRADERS, WMARKET, DictArchive

from crdtbook import Op, PrefixDerivation, Replica, SnapshotRefused, read_point
from crdtbook import _derive as derive_module
from crdtbook._engine import Fill
from crdtbook._state import OrderState

INTERVAL = 40


class _CompactingNode:
    """A replica compacting at every point as a node does, keeping what each compaction hands
    out: the prefix in total order, its fills by global index and its finished orders."""

    def __init__(self) -> None:
        self.archive = DictArchive()
        self.replica = Replica(WMARKET, archive=self.archive, point_interval=INTERVAL)
        self.prefix: list[Op] = []
        self.fills: dict[int, Fill] = {}
        self.orders: dict[bytes, OrderState] = {}

    def apply(self, ops: list[Op]) -> None:
        self.replica.apply_many(op.raw for op in ops)
        held = dict(self.replica.applied_index)
        report = self.replica.compact()
        if not report.point:
            return
        assert report.order_start == len(self.prefix)
        self.prefix += [held.get(i) or self.archive.ops[i] for i in report.order]
        for ident in report.ops:
            self.archive.ops[ident] = held[ident]
        self.fills.update(enumerate(report.fills, report.fills_start))
        self.orders.update((o.id, o) for o in report.orders)


def _trading(seed: int, steps: int) -> list[Op]:
    """Orders of every kind (tifs, client ids, self-trade modes), cancels, cancel-alls and the
    witnesses' heartbeats, made by one author replica (so every op is valid)."""
    rng = random.Random(seed)
    author = Replica(WMARKET)
    ops: list[Op] = []
    resting: list[tuple[Any, bytes]] = []
    for step in range(steps):
        roll = rng.random()
        trader = rng.choice(TRADERS)
        if step % 6 == 5:
            ops.append(author.heartbeat(GENESIS[step % 3]))
        elif roll < 0.1 and resting:
            ops.append(author.cancel(*resting.pop(rng.randrange(len(resting)))))
        elif roll < 0.13:
            ops.append(author.cancel_all(trader))
        else:
            op = author.submit(
                trader, rng.choice(("buy", "sell")), rng.randint(96, 104), rng.randint(1, 5),
                tif=rng.choice(("gtc", "gtc", "gtc", "ioc", "fok", "post_only")),
                tag=rng.choice((None, f"c{step}")),
                stp=rng.choice(("expire_maker", "expire_taker", "expire_both")),
            )
            ops.append(op)
            resting.append((trader, op.id))
    for _ in range(2):  # so that everything is final
        ops += [author.heartbeat(w) for w in GENESIS]
    return ops


def _derive(node: _CompactingNode, chunk: int) -> tuple[dict[int, Fill], dict[bytes, Any]]:
    derivation = PrefixDerivation(WMARKET, node.replica.snapshot())
    fills: dict[int, Fill] = {}
    orders: dict[bytes, OrderState] = {}
    for i in range(0, len(node.prefix), chunk):
        derivation.feed(node.prefix[i : i + chunk])
        start, got, finished = derivation.take()
        fills.update(enumerate(got, start))
        orders.update((o.id, o) for o in finished)
    start, got, finished = derivation.finish()
    fills.update(enumerate(got, start))
    orders.update((o.id, o) for o in finished)
    return fills, orders


def _node(seed: int, steps: int, batch: int) -> _CompactingNode:
    ops = _trading(seed, steps)
    node = _CompactingNode()
    for i in range(0, len(ops), batch):
        node.apply(ops[i : i + batch])
    assert node.replica.point is not None and node.replica.point.n >= 2 * INTERVAL
    return node


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    batch=st.integers(7, 90),
    chunk=st.integers(1, 200),
    compact_min=st.integers(1, 300),
)
def test_the_derived_prefix_is_what_every_compaction_handed_out(
    seed: int, batch: int, chunk: int, compact_min: int
) -> None:
    """Whatever the points, however the prefix is fed and however often the derivation's
    engine lets go of finished orders: the same fills (by global index) and finished orders as
    the replica's compactions, and as many as the point counts."""
    node = _node(seed, 260, batch)
    default = derive_module.COMPACT_MIN_ROWS
    derive_module.COMPACT_MIN_ROWS = compact_min  # type: ignore[misc]
    try:
        fills, orders = _derive(node, chunk)
    finally:
        derive_module.COMPACT_MIN_ROWS = default  # type: ignore[misc]
    assert fills == node.fills
    assert orders == node.orders
    assert len(fills) == node.replica.compacted_fills
    info = read_point(WMARKET, node.replica.snapshot())
    assert info.n == len(node.prefix)


def test_a_prefix_that_is_not_the_points_is_refused_saying_why() -> None:
    node = _node(7, 300, 50)
    blob = node.replica.snapshot()
    prefix = node.prefix

    def refusal(ops: list[Op]) -> str:
        derivation = PrefixDerivation(WMARKET, blob)
        with pytest.raises(SnapshotRefused) as refused:
            derivation.feed(ops)
            derivation.finish()
        assert refused.value.reason == "inconsistent"
        return str(refused.value)

    assert "ops where the point has" in refusal(prefix[:-1])
    assert "past the point's" in refusal([*prefix, prefix[0]])
    orders = [i for i, op in enumerate(prefix) if op.body.__class__.__name__ == "OrderBody"]
    a, b = orders[3], orders[4]
    swapped = list(prefix)
    swapped[a], swapped[b] = swapped[b], swapped[a]
    assert "running hash" in refusal(swapped)


def test_a_blob_that_is_not_a_point_state_is_refused() -> None:
    with pytest.raises(SnapshotRefused) as refused:
        PrefixDerivation(WMARKET, b"\xa0")
    assert refused.value.reason == "damaged"
