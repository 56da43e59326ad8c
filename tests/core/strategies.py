"""Shared hypothesis strategies, world builders and checks for the core tests.

A *plan* is a list of plain tuples that drives several authors on several replicas:

- ``("submit", author, at, side, price, quantity, tif)``: ``author`` signs an order at replica
  ``at`` (normally the author's home replica, ``author % replicas``; a plan made with
  ``equivocate=True`` sometimes uses another replica, so one key signs at two places);
- ``("cancel", author, at, pick)``: ``author`` cancels one of its orders known at ``at``
  (``pick`` indexes them, finished or not, so cancels of finished orders happen too);
- ``("sync", src, dst, seed, keep)``: a random subset (about ``keep`` percent) of ``src``'s ops,
  in random order, as raw bytes, is given to ``dst`` (some may wait there for parents).

Plans are plain data, so hypothesis shrinks them well; ``run_plan`` turns one into replicas.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from reference import LIVE, replay

from crdtbook import BadCancel, Identity, Market, Op, Replica

MARKET = Market("TEST", "1", "1")
#: Same name, other lot: another market id.
OTHER_MARKET = Market("TEST", "1", "2")

AUTHORS: tuple[Identity, ...] = tuple(Identity.from_seed(bytes([0x41 + i]) * 32) for i in range(6))
SIDES = ("buy", "sell")
TIFS = ("gtc", "ioc", "fok", "post_only")
#: A narrow price band so that orders cross often.
PRICES = st.integers(min_value=97, max_value=103)
QUANTITIES = st.integers(min_value=1, max_value=6)

Plan = list[tuple[Any, ...]]


def examples(factor: float) -> int:
    """``factor`` times the active hypothesis profile's ``max_examples`` (at least 1), so a slow
    test can run fewer examples than a fast one while the profile stays the single knob."""
    return max(1, round(settings.default.max_examples * factor))


def home(author: int, replicas: int) -> int:
    return author % replicas


@st.composite
def plans(
    draw: st.DrawFn,
    *,
    replicas: int = 3,
    authors: int = 4,
    min_steps: int = 1,
    max_steps: int = 30,
    equivocate: bool = False,
) -> Plan:
    """A random plan (see the module docstring)."""
    steps = draw(st.integers(min_value=min_steps, max_value=max_steps))
    plan: Plan = []
    for _ in range(steps):
        kind = draw(st.sampled_from(("submit", "submit", "submit", "cancel", "sync")))
        if kind == "sync":
            src = draw(st.integers(0, replicas - 1))
            dst = (src + draw(st.integers(1, replicas - 1))) % replicas
            seed = draw(st.integers(0, 2**16))
            keep = draw(st.sampled_from((30, 60, 100)))
            plan.append(("sync", src, dst, seed, keep))
            continue
        author = draw(st.integers(0, authors - 1))
        at = home(author, replicas)
        if equivocate and draw(st.integers(0, 5)) == 0:
            at = draw(st.integers(0, replicas - 1))
        if kind == "submit":
            side = draw(st.sampled_from(SIDES))
            price = draw(PRICES)
            quantity = draw(QUANTITIES)
            tif = draw(st.sampled_from(TIFS))
            plan.append(("submit", author, at, side, price, quantity, tif))
        else:
            plan.append(("cancel", author, at, draw(st.integers(0, 20))))
    return plan


def deliver(
    src: Replica,
    dst: Replica,
    rng: random.Random,
    keep: int = 100,
    *,
    batch: bool | None = None,
) -> None:
    """Give ``dst`` a random subset of ``src``'s ops, shuffled, as raw bytes."""
    raws = [op.raw for op in src.ops() if rng.randrange(100) < keep]
    rng.shuffle(raws)
    if batch is None:
        batch = rng.random() < 0.5
    if batch:
        report = dst.apply_many(raws)
        assert not report.invalid, report.invalid
    else:
        for raw in raws:
            dst.apply(raw)


def cancel_targets(replica: Replica, author: Identity) -> list[bytes]:
    return [o.id for o in replica.orders(author.public_key)]


def run_step(world: list[Replica], step: tuple[Any, ...]) -> Op | None:
    """Run one plan step; returns the op it signed, if any."""
    kind = step[0]
    if kind == "submit":
        _, author, at, side, price, quantity, tif = step
        return world[at].submit(AUTHORS[author], side, price, quantity, tif)
    if kind == "cancel":
        _, author, at, pick = step
        targets = cancel_targets(world[at], AUTHORS[author])
        if not targets:
            return None
        try:
            return world[at].cancel(AUTHORS[author], targets[pick % len(targets)])
        except BadCancel:
            # Only possible when the key signed at two replicas and the order is on the other
            # branch of its history.
            return None
    _, src, dst, seed, keep = step
    deliver(world[src], world[dst], random.Random(seed), keep)
    return None


def run_plan(plan: Sequence[tuple[Any, ...]], replicas: int = 3) -> list[Replica]:
    world = [Replica(MARKET) for _ in range(replicas)]
    for step in plan:
        run_step(world, step)
    return world


def union_ops(world: Iterable[Replica]) -> list[Op]:
    """Every op applied at some replica, in total order."""
    seen: dict[bytes, Op] = {}
    for replica in world:
        for op in replica.ops():
            seen.setdefault(op.id, op)
    return sorted(seen.values(), key=lambda o: (o.lamport, o.id))


def random_causal_order(ops: list[Op], rng: random.Random) -> list[Op]:
    """A uniformly chosen next op among those whose parents are all placed (a random linear
    extension): every op is admitted at once, but often sorts before already applied ops."""
    placed: set[bytes] = set()
    waiting = list(ops)
    out = []
    while waiting:
        ready = [op for op in waiting if all(p in placed for p in op.parents)]
        op = rng.choice(ready)
        waiting.remove(op)
        placed.add(op.id)
        out.append(op)
    return out


def exchange_all(world: Sequence[Replica]) -> None:
    """Everyone gets everything (as bytes, in total order)."""
    everything = [op.raw for op in union_ops(world)]
    for replica in world:
        report = replica.apply_many(everything)
        assert not report.invalid, report.invalid
        assert replica.pending_count == 0


# -- checks -----------------------------------------------------------------------------------


def book_tuples(replica: Replica) -> tuple[list[Any], list[Any]]:
    book = replica.book()

    def side(levels: Iterable[Any]) -> list[Any]:
        return [
            (lv.price, lv.quantity, tuple((o.order_id, o.remaining) for o in lv.orders))
            for lv in levels
        ]

    return side(book.bids), side(book.asks)


def order_tuples(replica: Replica) -> list[tuple[Any, ...]]:
    return [(o.id, o.status, o.reason, o.remaining, o.filled, o.closed) for o in replica.orders()]


def assert_matches_reference(replica: Replica) -> None:
    """The replica's derived state equals the reference matcher fed the same ops."""
    ops = replica.ops()
    ref = replay(ops)
    assert [tuple(f) for f in replica.fills()] == [
        (f.taker, f.maker, f.price, f.quantity, f.taker_side, f.taker_author, f.maker_author)
        for f in ref.fills
    ]
    bids, asks = book_tuples(replica)
    assert bids == ref.levels("buy")
    assert asks == ref.levels("sell")
    states = {o.id: o for o in replica.orders()}
    assert set(states) == set(ref.orders)
    for ident, want in ref.orders.items():
        got = states[ident]
        assert (got.status, got.reason, got.remaining, got.filled, got.closed) == (
            want.status,
            want.reason,
            want.remaining,
            want.filled,
            want.closed,
        ), (got, want)
    for op in ops:
        if op.kind == "cancel":
            assert replica.cancel_effective(op.id) == ref.cancels[op.id]


def assert_scratch_equal(replica: Replica) -> None:
    """Incremental derivation equals derivation from scratch over the same total order."""
    fresh = Replica(replica.market)
    report = fresh.apply_many(replica.ops())
    assert not report.invalid and report.pending == 0
    assert len(fresh) == len(replica)
    assert fresh.ops() == replica.ops()
    assert fresh.fills() == replica.fills()
    assert fresh.book() == replica.book()
    assert fresh.orders() == replica.orders()
    assert fresh.digest() == replica.digest()


def assert_invariants(replica: Replica) -> None:
    """Book and order invariants that hold after any set of ops."""
    book = replica.book()
    if book.bids and book.asks:
        assert book.best_bid < book.best_ask, "crossed book"
    bid_prices = [lv.price for lv in book.bids]
    ask_prices = [lv.price for lv in book.asks]
    assert bid_prices == sorted(set(bid_prices), reverse=True)
    assert ask_prices == sorted(set(ask_prices))

    states = {o.id: o for o in replica.orders()}
    resting: dict[bytes, int] = {}
    for side, levels in (("buy", book.bids), ("sell", book.asks)):
        for lv in levels:
            assert lv.orders, "empty level"
            assert lv.quantity == sum(o.remaining for o in lv.orders)
            for o in lv.orders:
                state = states[o.order_id]
                assert (state.side, state.price) == (side, lv.price)
                assert o.remaining == state.remaining > 0
                assert o.order_id not in resting
                resting[o.order_id] = o.remaining

    for state in states.values():
        assert state.filled + state.remaining + state.closed == state.quantity, state
        assert min(state.filled, state.remaining, state.closed) >= 0
        live = state.status in LIVE
        assert live == (state.id in resting), state
        assert live == (state.remaining > 0), state
        if state.status == "open":
            assert state.filled == 0 and state.reason is None
        elif state.status == "partially_filled":
            assert state.filled > 0 and state.reason is None
        elif state.status == "filled":
            assert state.filled == state.quantity and state.reason is None
        elif state.status == "cancelled":
            assert state.reason == "cancelled" and state.closed > 0
        elif state.status == "expired":
            assert state.reason in ("ioc_remainder", "fok_unfillable", "self_trade")
            assert state.closed > 0
        else:
            assert state.status == "rejected", state
            assert state.reason == "post_only_would_take"
            assert state.filled == 0 and state.closed == state.quantity
        if state.tif == "fok":  # all or nothing, never rests
            assert (state.status, state.filled) in (("filled", state.quantity), ("expired", 0))
        if state.tif == "ioc":  # never rests
            assert state.status in ("filled", "expired")
        if state.tif == "post_only":  # never takes
            assert state.status != "rejected" or state.filled == 0

    filled: Counter[bytes] = Counter()
    for f in replica.fills():
        taker, maker = states[f.taker], states[f.maker]
        assert f.quantity > 0
        assert f.price == maker.price, "trade not at the maker's price"
        assert taker.side == f.taker_side != maker.side
        if taker.side == "buy":
            assert f.price <= taker.price
        else:
            assert f.price >= taker.price
        assert taker.tif != "post_only", "a POST_ONLY order took liquidity"
        assert (f.taker_author, f.maker_author) == (taker.author, maker.author)
        assert taker.author != maker.author, "self trade"
        assert (maker.lamport, maker.id) < (taker.lamport, taker.id)
        filled[f.taker] += f.quantity
        filled[f.maker] += f.quantity
    for state in states.values():
        assert filled[state.id] == state.filled, state
