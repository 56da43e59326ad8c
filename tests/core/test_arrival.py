"""Batches that arrive out of the total order, as gossip delivers them (issue #12).

``apply_many`` puts a batch's late ops into the total order in one merge at its end, after one
rewind (``Replica._place_late``). These tests mix what a node's apply loop gets: ops that sort
after everything, late ops, ops whose parents are missing (released later in the same batch or
in a later one), duplicates and invalid ops, between single applies; after every step the
replica must equal one derived from scratch, and ``fill_changes_since`` must name a fill index
at or below the first fill that changed.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    AUTHORS,
    MARKET,
    OTHER_MARKET,
    assert_matches_reference,
    assert_scratch_equal,
    examples,
    plans,
    run_plan,
    union_ops,
)

from crdtbook import Op, Replica


def first_difference(before: list[tuple[object, ...]], after: list[tuple[object, ...]]) -> int:
    """The lowest index at which two fill lists differ (len of the shorter if one extends the
    other)."""
    for index, (old, new) in enumerate(zip(before, after, strict=False)):
        if old != new:
            return index
    return min(len(before), len(after))


@settings(max_examples=examples(0.5))
@given(plan=plans(replicas=3, authors=4, max_steps=30), rng=st.randoms(use_true_random=False))
def test_any_arrival_in_batches_equals_scratch(plan, rng: random.Random) -> None:
    ops = union_ops(run_plan(plan, replicas=3))
    stream = [op.raw for op in ops]
    rng.shuffle(stream)  # not causal: some ops wait for parents that come later
    stream += [raw for raw in stream if rng.random() < 0.2]  # duplicates
    foreign_op = Replica(OTHER_MARKET).submit(AUTHORS[0], "buy", 100, 1)
    foreign = foreign_op.raw
    stream.insert(rng.randrange(len(stream) + 1), foreign)  # invalid here
    replica = Replica(MARKET)
    _, token = replica.fill_changes_since(None)
    i = 0
    while i < len(stream):
        before = [tuple(f) for f in replica.fills()]
        n = rng.randint(1, 8)
        chunk = stream[i : i + n]
        if n == 1 and chunk[0] != foreign:
            replica.apply(chunk[0])
        else:
            report = replica.apply_many(chunk)
            assert [ident for ident, _ in report.invalid] == (
                [foreign_op.id] if foreign in chunk else []
            )
        i += n
        assert_scratch_equal(replica)
        after = [tuple(f) for f in replica.fills()]
        low, token = replica.fill_changes_since(token)
        changed = first_difference(before, after)
        if changed < len(before):  # a fill was taken back: the watcher is told where
            assert low is not None and low <= changed
    assert replica.pending_count == 0
    assert replica.ops() == ops
    assert_matches_reference(replica)


@settings(max_examples=examples(0.3))
@given(plan=plans(replicas=3, authors=4, max_steps=30), rng=st.randoms(use_true_random=False))
def test_late_ops_then_ops_after_the_end_in_one_batch(plan, rng: random.Random) -> None:
    """A batch whose first op sorts before the matched tail and whose later ops sort after
    everything: all of them wait for the one merge, and the result is the total order."""
    ops = union_ops(run_plan(plan, replicas=3))
    if len(ops) < 4:
        return
    cut = rng.randrange(1, len(ops) - 1)
    held = ops[cut]  # applied last, though it sorts earlier
    replica = Replica(MARKET)
    early = [op for op in ops[:cut + 1] if op is not held]
    report = replica.apply_many([op.raw for op in early])
    assert not report.invalid
    rest = [held] + [op for op in ops[cut + 1 :]]
    report = replica.apply_many([op.raw for op in rest])
    assert not report.invalid and replica.pending_count == 0
    assert replica.ops() == ops
    assert_scratch_equal(replica)


@settings(max_examples=examples(0.3))
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(5, 60))
def test_witnessed_batches_equal_one_by_one(seed: int, steps: int) -> None:
    """A witnessed market: batches holding late ops and counted heartbeats (which re-sort the
    tail, so the batch's late ops are put in place first) end where applying the same ops one
    at a time, in a causal order, ends."""
    from witnessed import GENESIS, TRADERS, WMARKET, deliver_some

    rng = random.Random(seed)
    homes = [Replica(WMARKET) for _ in range(3)]
    for _ in range(steps):
        roll = rng.random()
        at = rng.randrange(3)
        if roll < 0.6:
            side = rng.choice(("buy", "sell"))
            homes[at].submit(TRADERS[at], side, rng.randint(97, 103), rng.randint(1, 5))
        elif roll < 0.8:
            witness = GENESIS[at]
            if homes[at].needs_heartbeat(witness.public_key):
                homes[at].heartbeat(witness)
        else:
            deliver_some(homes[rng.randrange(3)], homes[at], rng, rng.choice((30, 70, 100)))
    seen: dict[bytes, Op] = {}
    for home in homes:
        for op in home.ops():
            seen.setdefault(op.id, op)
    ops = sorted(seen.values(), key=lambda o: (o.lamport, o.id))  # a causal order
    one_by_one = Replica(WMARKET)
    for op in ops:
        assert one_by_one.apply(op.raw) == [op]
    stream = [op.raw for op in ops]
    rng.shuffle(stream)
    batched = Replica(WMARKET)
    i = 0
    while i < len(stream):
        n = rng.randint(1, 12)
        report = batched.apply_many(stream[i : i + n])
        assert not report.invalid
        i += n
    assert batched.pending_count == 0
    assert batched.ops() == one_by_one.ops()
    assert batched.digest() == one_by_one.digest()
    assert list(batched.fills()) == list(one_by_one.fills())
    assert batched.orders() == one_by_one.orders()
    assert (batched.frontier, batched.final_count, batched.final_fill_count()) == (
        one_by_one.frontier, one_by_one.final_count, one_by_one.final_fill_count()
    )
