"""Shared identities, world builders and checks for the witnessed-market (finality) tests.

A witnessed market's total order is not (Lamport, id): ops sort by heartbeat placement and a
batch rank (crdtbook/_finality.py). So the checks here feed the reference matcher the ops in the
replica's own order (``reference.replay_in_order``, with client ids) instead of
``reference.replay``, which sorts by (Lamport, id) itself, and the book invariants compare a
fill's maker and taker by their position in ``ops()``, not by Lamport time.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

from reference import LIVE, RefBook, replay_in_order

from crdtbook import Fill, Identity, Market, Op, OrderState, Replica
from crdtbook._ops import OrderBody, sign_op

#: Witness keys: the first three are the genesis witnesses, the others spares a
#: reconfiguration can add (a removed key is never added again).
WITNESSES: tuple[Identity, ...] = tuple(
    Identity.from_seed(bytes([0x61 + i]) * 32) for i in range(5)
)
TRADERS: tuple[Identity, ...] = tuple(Identity.from_seed(bytes([0x71 + i]) * 32) for i in range(4))
#: Keys that sign by hand, with whatever valid parents they like (or none: Lamport 1).
ADVERSARIES: tuple[Identity, ...] = tuple(
    Identity.from_seed(bytes([0x51 + i]) * 32) for i in range(2)
)
GENESIS = WITNESSES[:3]
WMARKET = Market("FIN", "1", "1", witnesses=[w.public_key for w in GENESIS])
#: The same market without witnesses (protocol version 1): another id.
PLAIN = Market("FIN", "1", "1")


def witnessed_market(*witnesses: Identity, name: str = "FIN") -> Market:
    return Market(name, "1", "1", witnesses=[w.public_key for w in witnesses])


def union(world: Iterable[Replica]) -> list[Op]:
    """Every op applied or waiting for parents somewhere (by id)."""
    seen: dict[bytes, Op] = {}
    for replica in world:
        for op in replica.ops():
            seen.setdefault(op.id, op)
        for ident in replica.pending_ids():
            seen.setdefault(ident, replica._pending[ident])
    return sorted(seen.values(), key=lambda o: o.id)


def sync(world: Sequence[Replica]) -> None:
    """Everyone gets everything (as bytes); nothing is refused or left waiting."""
    raws = [op.raw for op in union(world)]
    for replica in world:
        report = replica.apply_many(raws)
        assert not report.invalid, report.invalid
        assert replica.pending_count == 0


def give(dst: Replica, *sources: Replica) -> None:
    for source in sources:
        report = dst.apply_many(op.raw for op in source.ops())
        assert not report.invalid, report.invalid


def deliver_some(src: Replica, dst: Replica, rng: random.Random, keep: int) -> None:
    """A random subset (about ``keep`` percent) of ``src``'s ops, shuffled, as bytes."""
    raws = [op.raw for op in src.ops() if rng.randrange(100) < keep]
    rng.shuffle(raws)
    if rng.random() < 0.5:
        report = dst.apply_many(raws)
        assert not report.invalid, report.invalid
    else:
        for raw in raws:
            dst.apply(raw)


def order_op(identity: Identity, market: Market, parents: Sequence[Op], body: OrderBody,
             seq: int = 1) -> Op:
    """A hand-signed order with exactly these parents (none: Lamport 1)."""
    lamport = 1 + max((p.lamport for p in parents), default=0)
    return sign_op(identity, market.id, seq, lamport, tuple(p.id for p in parents), body,
                   market.version)


def fill_tuple(fill: Fill) -> tuple[Any, ...]:
    return tuple(fill)


def final_prefix(replica: Replica) -> list[bytes]:
    return [op.id for op in replica.ops()[: replica.final_count]]


def final_fills(replica: Replica) -> list[tuple[Any, ...]]:
    return [tuple(f) for f in replica.fills()[: replica.final_fill_count()]]


def replay(ops: Iterable[Op]) -> RefBook:
    """The reference matcher fed ``ops`` in the given order, with version 2's client ids."""
    return replay_in_order(ops, client_ids=True)


def book_levels(book: Any) -> tuple[list[Any], list[Any]]:
    def side(levels: Iterable[Any]) -> list[Any]:
        return [
            (lv.price, lv.quantity, tuple((o.order_id, o.remaining) for o in lv.orders))
            for lv in levels
        ]

    return side(book.bids), side(book.asks)


def assert_matches_reference_in_order(replica: Replica) -> None:
    """Fills, book, order states and cancels equal the reference fed ``ops()`` in order."""
    ops = replica.ops()
    ref = replay(ops)
    assert [tuple(f) for f in replica.fills()] == [
        (f.taker, f.maker, f.price, f.quantity, f.taker_side, f.taker_author, f.maker_author)
        for f in ref.fills
    ]
    bids, asks = book_levels(replica.book())
    assert (bids, asks) == (ref.levels("buy"), ref.levels("sell"))
    states = {o.id: o for o in replica.orders()}
    assert set(states) == set(ref.orders)
    for ident, want in ref.orders.items():
        got = states[ident]
        assert (got.status, got.reason, got.remaining, got.filled, got.closed) == (
            want.status, want.reason, want.remaining, want.filled, want.closed,
        ), (got, want)
    for op in ops:
        if op.kind in ("cancel", "cancel_all"):
            assert replica.cancel_effective(op.id) == ref.cancels[op.id]


def assert_final_book(replica: Replica) -> None:
    """``final_book()``, the final fills and the final order states are what the final prefix
    alone derives (specs/finality.md section 6: an order is final iff it is in the final prefix
    and finished at its end)."""
    ref = replay(replica.ops()[: replica.final_count])
    assert book_levels(replica.final_book()) == (ref.levels("buy"), ref.levels("sell"))
    assert [(f.taker, f.maker, f.price, f.quantity) for f in replica.fills()][
        : replica.final_fill_count()
    ] == [(f.taker, f.maker, f.price, f.quantity) for f in ref.fills]
    for state in replica.orders():
        want = ref.orders.get(state.id)
        finished = want is not None and want.status not in LIVE
        assert state.final == finished, (state, want)
        if finished:
            assert want is not None
            assert (state.status, state.reason, state.remaining, state.filled, state.closed) == (
                want.status, want.reason, want.remaining, want.filled, want.closed,
            )


def assert_finality_consistent(replica: Replica) -> None:
    """The finality views agree with one another and with the total order."""
    ops = replica.ops()
    count = replica.final_count
    frontier = replica.frontier
    assert 0 <= count <= len(ops)
    assert (count == 0) or frontier > 0
    index = {op.id: i for i, op in enumerate(ops)}
    for i, op in enumerate(ops):
        placement = replica.placement(op.id)
        final = replica.is_final(op.id)
        assert final == (i < count), (i, count, op.kind)
        assert final == (placement is not None and placement <= frontier)
        if placement is not None:
            assert placement >= op.lamport
    # Placements never decrease along the total order; unplaced ops come last.
    placements = [replica.placement(op.id) for op in ops]
    keys = [2**63 if p is None else p for p in placements]
    assert keys == sorted(keys)
    # Parents come before their children.
    for op in ops:
        for parent in op.parents:
            assert index[parent] < index[op.id]
    fills = replica.fills()
    n_final = replica.final_fill_count()
    assert all(replica.is_final(f.taker) for f in fills[:n_final])
    assert not any(replica.is_final(f.taker) for f in fills[n_final:])
    for state in replica.orders():
        if state.final:
            assert state.status not in LIVE, state
            assert replica.is_final(state.id), state


def assert_book_sound(replica: Replica) -> None:
    """Book invariants that hold in any total order (no Lamport comparison)."""
    book = replica.book()
    if book.bids and book.asks:
        assert book.bids[0].price < book.asks[0].price, "crossed book"
    states = {o.id: o for o in replica.orders()}
    index = {op.id: i for i, op in enumerate(replica.ops())}
    for state in states.values():
        assert state.filled + state.remaining + state.closed == state.quantity, state
    for f in replica.fills():
        taker, maker = states[f.taker], states[f.maker]
        assert f.price == maker.price and taker.side == f.taker_side != maker.side
        assert taker.author != maker.author, "self trade"
        assert index[f.maker] < index[f.taker], "a maker after its taker in the total order"


def assert_scratch_equal_shuffled(replica: Replica, rng: random.Random) -> Replica:
    """A fresh replica given the same ops, shuffled, as bytes, derives the same everything."""
    raws = [op.raw for op in replica.ops()]
    rng.shuffle(raws)
    fresh = Replica(replica.market)
    report = fresh.apply_many(raws)
    assert not report.invalid and fresh.pending_count == 0
    assert fresh.ops() == replica.ops()
    assert fresh.digest() == replica.digest()
    assert list(fresh.fills()) == list(replica.fills())
    assert fresh.orders() == replica.orders()
    assert fresh.book() == replica.book()
    assert (fresh.frontier, fresh.final_count, fresh.final_fill_count(), fresh.epoch) == (
        replica.frontier, replica.final_count, replica.final_fill_count(), replica.epoch,
    )
    assert fresh.witness_status() == replica.witness_status()
    return fresh


def snapshot(replica: Replica) -> tuple[Any, ...]:
    """Everything a replica shows, for "this changed nothing" checks."""
    return (
        replica.digest(),
        [op.id for op in replica.ops()],
        replica.frontier,
        replica.final_count,
        replica.final_fill_count(),
        replica.epoch,
        replica.witnesses(),
        replica.witness_status(),
        replica.orders(),
    )


def final_orders(replica: Replica) -> dict[bytes, OrderState]:
    return {o.id: o for o in replica.orders() if o.final}


class DictArchive:
    """A compacted replica's archive in a dict, counting reads (a node's is its SQLite store,
    where each read is a query and a decode)."""

    def __init__(self) -> None:
        self.ops: dict[bytes, Op] = {}
        self.reads: dict[bytes, int] = {}

    def get(self, ident: bytes) -> Op | None:
        self.reads[ident] = self.reads.get(ident, 0) + 1
        return self.ops.get(ident)


def cut_healed_one_way(alone: int, others: int, interval: int) -> tuple[Replica, DictArchive]:
    """Witness ``GENESIS[0]``'s replica after a cut that healed one way: it signed ``alone``
    orders (and heartbeats) by itself while ``GENESIS[1]`` and ``[2]`` traded ``others``
    crossing orders among themselves (they finish, so compaction takes them); then it got all
    of theirs, heartbeat and compacted at every point (point interval ``interval``), its
    archive holding what left memory. They have none of its ops."""
    archive = DictArchive()
    a = Replica(WMARKET, archive=archive, point_interval=interval)
    b, c = Replica(WMARKET), Replica(WMARKET)
    for i in range(alone):
        a.submit(TRADERS[0] if i % 3 else GENESIS[0], "buy", 97, 1)
        if i % 5 == 0:
            a.heartbeat(GENESIS[0])
    for i in range(others):
        op = b.submit(TRADERS[1 + i % 2], "sell" if i % 2 else "buy", 100, 1)
        c.apply(op.raw)
        if i % 40 == 0:
            for mine, witness, other in ((b, GENESIS[1], c), (c, GENESIS[2], b)):
                other.apply(mine.heartbeat(witness).raw)
    for op in b.ops() + c.ops():
        a.apply(op.raw)
    a.heartbeat(GENESIS[0])
    while True:
        held = dict(a.applied_index)
        report = a.compact()
        if not report.ops:
            break
        archive.ops.update((ident, held[ident]) for ident in report.ops)
    archive.reads.clear()
    return a, archive
