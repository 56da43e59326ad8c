"""Property tests of convergence and derivation over random multi-author, multi-replica histories.

- Any permutation and duplication of a valid op set, given as raw bytes to several fresh
  replicas (through ``apply``, ``apply_many`` and chunked ``apply_many``), gives equal digests,
  the same total order, and the state the reference matcher derives.
- Also when a key signs at two replicas (equivocation).
- Incremental derivation (with rewinds) equals derivation from scratch, also when every op is
  admitted in a random causal order, one at a time, so that late ops keep sorting before the end.
- The book and order invariants hold at every replica, mid-history and after a full exchange.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    MARKET,
    assert_invariants,
    assert_matches_reference,
    assert_scratch_equal,
    examples,
    exchange_all,
    plans,
    random_causal_order,
    run_plan,
    union_ops,
)

from crdtbook import Op, Replica


def feed(replica: Replica, stream: list[bytes], mode: str, rng: random.Random) -> None:
    if mode == "apply":
        for raw in stream:
            replica.apply(raw)
    elif mode == "apply_many":
        report = replica.apply_many(stream)
        assert not report.invalid
    else:  # random chunks
        i = 0
        while i < len(stream):
            n = rng.randint(1, 8)
            report = replica.apply_many(stream[i : i + n])
            assert not report.invalid
            i += n


def shuffled_with_duplicates(raws: list[bytes], rng: random.Random) -> list[bytes]:
    stream = raws + [rng.choice(raws) for _ in range(rng.randint(0, len(raws)))] if raws else []
    rng.shuffle(stream)
    return stream


def check_convergence(ops: list[Op], rng: random.Random, copies: int = 4) -> list[Replica]:
    raws = [op.raw for op in ops]
    fresh = []
    for i in range(copies):
        replica = Replica(MARKET)
        mode = ("apply", "apply_many", "chunks")[i % 3]
        feed(replica, shuffled_with_duplicates(raws, rng), mode, rng)
        fresh.append(replica)
    first = fresh[0]
    for replica in fresh:
        assert replica.pending_count == 0
        assert replica.missing() == []
        assert len(replica) == len(ops)
        assert replica.ops() == ops  # the total order (Lamport, id)
        assert replica.heads() == first.heads()
        assert replica.digest() == first.digest()
        assert replica.fills() == first.fills()
        assert replica.book() == first.book()
    assert_matches_reference(first)
    assert_invariants(first)
    return fresh


@settings(max_examples=examples(1))
@given(plan=plans(replicas=3, authors=4, max_steps=40), rng=st.randoms(use_true_random=False))
def test_permutations_and_duplicates_converge(plan, rng):
    world = run_plan(plan, replicas=3)
    ops = union_ops(world)
    fresh = check_convergence(ops, rng)
    # The replicas that built the history converge to the same state after a full exchange.
    exchange_all(world)
    for replica in world:
        assert replica.digest() == fresh[0].digest()


@settings(max_examples=examples(0.75))
@given(
    plan=plans(replicas=3, authors=3, max_steps=40, equivocate=True),
    rng=st.randoms(use_true_random=False),
)
def test_equivocating_keys_still_converge(plan, rng):
    world = run_plan(plan, replicas=3)
    ops = union_ops(world)
    fresh = check_convergence(ops, rng, copies=3)
    exchange_all(world)
    for replica in world:
        assert replica.digest() == fresh[0].digest()
        assert_scratch_equal(replica)


@settings(max_examples=examples(1))
@given(plan=plans(replicas=4, authors=5, max_steps=40))
def test_every_replica_matches_reference_and_scratch_mid_history(plan):
    world = run_plan(plan, replicas=4)
    for replica in world:
        assert_matches_reference(replica)
        assert_scratch_equal(replica)
        assert_invariants(replica)
    exchange_all(world)
    digests = {replica.digest() for replica in world}
    assert len(digests) == 1
    assert_matches_reference(world[0])
    assert_invariants(world[0])


@settings(max_examples=examples(0.75))
@given(plan=plans(replicas=3, authors=4, max_steps=30), rng=st.randoms(use_true_random=False))
def test_incremental_equals_scratch_after_every_late_op(plan, rng):
    ops = union_ops(run_plan(plan, replicas=3))
    replica = Replica(MARKET)
    for op in random_causal_order(ops, rng):
        assert replica.apply(op.raw) == [op]
        assert_scratch_equal(replica)
    assert replica.ops() == ops
    assert_matches_reference(replica)


@settings(max_examples=examples(0.5))
@given(plan=plans(replicas=3, authors=4, max_steps=30), rng=st.randoms(use_true_random=False))
def test_batches_rewind_once_and_equal_scratch(plan, rng):
    """apply_many batches of late ops (a rewind to the earliest, one rematch) equal scratch."""
    ops = union_ops(run_plan(plan, replicas=3))
    order = random_causal_order(ops, rng)
    replica = Replica(MARKET)
    i = 0
    while i < len(order):
        n = rng.randint(1, 6)
        report = replica.apply_many([op.raw for op in order[i : i + n]])
        assert report.applied == order[i : i + n]
        assert report.pending == report.duplicates == 0 and not report.invalid
        assert_scratch_equal(replica)
        i += n
    assert replica.ops() == ops
