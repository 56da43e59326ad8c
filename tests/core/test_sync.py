"""The sync helpers: ``ops_missing_for``, ``BloomFilter`` and ``SlidingBloom``, over random DAGs.

- Without a filter the walk returns exactly our ops that are not in the causal past of the
  peer's heads we know (an independent graph search), in total order; so it never withholds an
  op the peer lacks, and when every head of the peer is known to us it is exactly what the peer
  lacks.
- With a filter built from the peer's ids it never returns an op the peer has; ops withheld by
  false positives are recovered by the peer asking for ``missing()`` (and for our unknown heads)
  by id, and the peer converges even with a saturated filter.
- ``limit`` gives the first ops of the full answer, which the peer can apply without pending.
"""

from __future__ import annotations

import hashlib
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import MARKET, examples, plans, run_plan, union_ops

from crdtbook import BloomFilter, Op, Replica, SlidingBloom, ops_missing_for


def closure(replica: Replica, heads: list[bytes]) -> set[bytes]:
    """Ids of the ops of ``replica`` that are ``heads`` (known ones) or their ancestors."""
    applied = replica.applied_index
    seen: set[bytes] = set()
    stack = [h for h in heads if h in applied]
    while stack:
        ident = stack.pop()
        if ident not in seen:
            seen.add(ident)
            stack.extend(applied[ident].parents)
    return seen


def missing(a: Replica, b: Replica, bloom: BloomFilter | None = None, limit: int | None = None):
    return ops_missing_for(a.applied_index, a.heads(), b.heads(), bloom, limit)


def lacks(a: Replica, b: Replica) -> list[Op]:
    return [op for op in a.ops() if op.id not in b]


def subset_replica(ops: list[Op], rng: random.Random, keep: int) -> Replica:
    """A replica given a random subset of ``ops`` (ops without their parents stay pending)."""
    replica = Replica(MARKET)
    chosen = [op.raw for op in ops if rng.randrange(100) < keep]
    rng.shuffle(chosen)
    replica.apply_many(chosen)
    return replica


def two_replicas(plan, data) -> tuple[Replica, Replica]:
    world = run_plan(plan, replicas=3)
    i = data.draw(st.integers(0, 2), label="a")
    j = (i + data.draw(st.integers(1, 2), label="b")) % 3
    return world[i], world[j]


# -- without a filter -------------------------------------------------------------------------


@settings(max_examples=examples(1.5))
@given(plan=plans(replicas=3, authors=4, max_steps=40), data=st.data())
def test_walk_returns_exactly_our_ops_outside_the_peers_known_past(plan, data):
    a, b = two_replicas(plan, data)
    got = missing(a, b)
    theirs = closure(a, b.heads())
    assert got == [op for op in a.ops() if op.id not in theirs]
    assert set(lacks(a, b)) <= set(got)  # never withholds what the peer lacks
    if all(h in a for h in b.heads()):
        assert got == lacks(a, b)
    before = b.digest()
    report = b.apply_many([op.raw for op in got])
    assert not report.invalid
    assert all(op.id in b for op in a.ops())
    if not got:
        assert b.digest() == before


@settings(max_examples=examples(1.5))
@given(
    plan=plans(replicas=3, authors=4, max_steps=40),
    seed=st.integers(0, 2**32),
    keep=st.sampled_from((0, 20, 50, 80, 100)),
)
def test_walk_is_exactly_what_a_behind_peer_lacks(plan, seed, keep):
    """The peer holds a random subset of our ops (some of them pending): every head it has is
    known to us, and the answer is exactly the ops it has not applied."""
    ops = union_ops(run_plan(plan, replicas=3))
    a = Replica(MARKET)
    a.apply_many([op.raw for op in ops])
    b = subset_replica(ops, random.Random(seed), keep)
    got = missing(a, b)
    assert got == lacks(a, b)
    assert ops_missing_for(a.applied_index, a.heads(), a.heads()) == []
    assert ops_missing_for(a.applied_index, [], b.heads()) == []
    b.apply_many([op.raw for op in got])
    assert b.digest() == a.digest() and b.pending_count == 0


def test_unknown_heads_of_the_peer_are_ignored():
    a, b = Replica(MARKET), Replica(MARKET)
    from strategies import AUTHORS

    x = a.submit(AUTHORS[0], "sell", 100, 1)
    b.apply(x.raw)
    y = b.submit(AUTHORS[1], "buy", 90, 1)  # b's only head, unknown to a
    assert missing(a, b) == [x]  # sent again: harmless, the peer counts a duplicate
    assert b.apply_many([x.raw]).duplicates == 1
    assert ops_missing_for(a.applied_index, a.heads(), [y.id, b"\x00" * 32]) == [x]
    # With the peer's filter the op it has is not sent.
    assert missing(a, b, BloomFilter.for_ids(b.applied_index)) == []


# -- with a filter ----------------------------------------------------------------------------


def bloom_of(replica: Replica, bits_per_id: int) -> BloomFilter:
    return BloomFilter.for_ids(replica.applied_index, bits_per_id=bits_per_id)


def saturated(_: Replica) -> BloomFilter:
    return BloomFilter(64, 1, b"\xff" * 8)


def sync_until_converged(a: Replica, b: Replica, make_bloom, rounds: int) -> int:
    """A pull protocol: b sends heads and a filter; a sends ``ops_missing_for``; b then asks by
    id for ``missing()`` and for a's heads it does not know. Returns the rounds it took."""
    for round_ in range(1, rounds + 1):
        sent = missing(a, b, make_bloom(b))
        assert all(op.id not in b for op in sent)  # never an op the peer has
        report = b.apply_many([op.raw for op in sent])
        assert not report.invalid
        while True:
            wanted = [i for i in b.missing() if i in a]
            wanted += [h for h in a.heads() if not b.knows(h)]
            if not wanted:
                break
            report = b.apply_many([a.get(i).raw for i in wanted])
            assert not report.invalid
        if all(op.id in b for op in a.ops()):
            return round_
    raise AssertionError(f"not converged after {rounds} rounds")


@settings(max_examples=examples(1.5))
@given(
    plan=plans(replicas=3, authors=4, max_steps=40),
    data=st.data(),
    bits_per_id=st.sampled_from((1, 2, 4, 10)),
)
def test_bloom_never_sends_what_the_peer_has_and_requests_repair_false_positives(
    plan, data, bits_per_id
):
    a, b = two_replicas(plan, data)
    bloom = bloom_of(b, bits_per_id)
    got = missing(a, b, bloom)
    assert not any(op.id in b for op in got)
    assert set(got) <= set(missing(a, b))
    assert [op.key for op in got] == sorted(op.key for op in got)
    sync_until_converged(a, b, lambda r: bloom_of(r, bits_per_id), rounds=len(a) + 2)


@settings(max_examples=examples(0.5))
@given(plan=plans(replicas=3, authors=4, max_steps=30), data=st.data())
def test_converges_even_when_the_filter_claims_everything(plan, data):
    a, b = two_replicas(plan, data)
    assert missing(a, b, saturated(b)) == []
    sync_until_converged(a, b, saturated, rounds=2)


def test_false_positive_withholds_an_op_and_its_only_ancestors_until_asked():
    from strategies import AUTHORS

    a = Replica(MARKET)
    chain = [a.submit(AUTHORS[i % 2], "buy", 90 + i, 1) for i in range(6)]
    b = Replica(MARKET)
    b.apply(chain[0].raw)
    # Each op names the other author's head and its own previous op. A filter that (falsely)
    # claims chain[3] withholds it and everything only it leads to (chain[1..3]).
    bloom = BloomFilter.for_ids([chain[0].id])
    bloom.add(chain[3].id)
    got = missing(a, b, bloom)
    assert got == chain[4:]
    b.apply_many([op.raw for op in got])
    assert set(b.missing()) == {chain[2].id, chain[3].id}  # chain[4]'s parents
    rounds = 0
    while b.missing():
        b.apply_many([a.get(i).raw for i in b.missing()])
        rounds += 1
    assert rounds == 2 and b.digest() == a.digest()


# -- limit ------------------------------------------------------------------------------------


@settings(max_examples=examples(1))
@given(
    plan=plans(replicas=3, authors=4, max_steps=40),
    seed=st.integers(0, 2**32),
    limit=st.integers(1, 6),
)
def test_limit_gives_an_applicable_prefix(plan, seed, limit):
    ops = union_ops(run_plan(plan, replicas=3))
    a = Replica(MARKET)
    a.apply_many([op.raw for op in ops])
    b = subset_replica(ops, random.Random(seed), 40)
    full = missing(a, b)
    rounds = 0
    while True:
        prefix = missing(a, b, limit=limit)
        assert prefix == missing(a, b)[:limit]
        if not prefix:
            break
        report = b.apply_many([op.raw for op in prefix])
        assert report.pending == 0 and not report.invalid
        assert set(prefix) <= set(report.applied)
        rounds += 1
    assert rounds <= math.ceil(len(full) / limit)
    assert b.digest() == a.digest() and b.pending_count == 0


# -- the Bloom filter itself ------------------------------------------------------------------


def spec_positions(ident: bytes, size: int, hashes: int) -> list[int]:
    a = int.from_bytes(ident[0:4], "big")
    b = int.from_bytes(ident[4:8], "big") | 1
    return [(a + i * b) % size for i in range(hashes)]


@settings(max_examples=examples(2))
@given(
    ids=st.lists(st.binary(min_size=32, max_size=32), max_size=60, unique=True),
    size=st.integers(1, 4096).map(lambda n: n * 8),
    hashes=st.integers(1, 16),
)
def test_bloom_sets_the_specified_bits_and_has_no_false_negatives(ids, size, hashes):
    bloom = BloomFilter(size, hashes)
    expected = bytearray(size // 8)
    for ident in ids:
        bloom.add(ident)
        for pos in spec_positions(ident, size, hashes):
            expected[pos // 8] |= 1 << (pos % 8)
    assert bytes(bloom.bits) == bytes(expected)
    assert all(ident in bloom for ident in ids)
    again = BloomFilter(size, hashes, bytes(bloom.bits))
    assert all(ident in again for ident in ids)


@settings(max_examples=examples(2))
@given(
    ids=st.lists(st.binary(min_size=32, max_size=32), max_size=200, unique=True),
    bits_per_id=st.integers(1, 20),
)
def test_bloom_for_ids_sets_what_add_sets(ids, bits_per_id):
    # for_ids inlines add() for speed: it must set exactly the specified bits.
    bloom = BloomFilter.for_ids(ids, bits_per_id=bits_per_id)
    expected = bytearray(bloom.size // 8)
    for ident in ids:
        for pos in spec_positions(ident, bloom.size, bloom.hashes):
            expected[pos // 8] |= 1 << (pos % 8)
    assert bytes(bloom.bits) == bytes(expected)


def test_bloom_sizing_and_false_positive_rate():
    rng = random.Random(7)
    ids = [rng.randbytes(32) for _ in range(3000)]
    bloom = BloomFilter.for_ids(ids)
    assert (bloom.size, bloom.hashes) == (30000, 7)
    assert BloomFilter.for_ids([]).size == 64
    assert BloomFilter.for_ids(ids[:3], bits_per_id=10).size == 64
    assert BloomFilter.for_ids(ids[:7], bits_per_id=10).size == 72  # ceil(70 / 8) * 8
    others = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(20000)]
    rate = sum(o in bloom for o in others) / len(others)
    assert rate < 0.03


@pytest.mark.parametrize(
    ("size", "hashes", "bits"),
    [
        (0, 1, None),
        (12, 1, None),
        (8 * 2**20 + 8, 1, None),
        (64, 0, None),
        (64, 17, None),
        (64, 1, b"\x00" * 7),
    ],
)
def test_bloom_refuses_bad_parameters(size, hashes, bits):
    with pytest.raises(ValueError):
        BloomFilter(size, hashes, bits)


def test_bloom_membership_of_odd_values():
    bloom = BloomFilter(64, 1, b"\xff" * 8)
    assert b"\x00" * 8 in bloom
    for value in (b"", b"\x00" * 7, "x" * 32, None, 5):
        assert value not in bloom


@settings(max_examples=150, deadline=None)
@given(
    sets=st.lists(
        st.lists(st.integers(0, 300), max_size=60, unique=True), min_size=1, max_size=12
    ),
)
def test_sliding_bloom_has_the_bits_for_ids_builds(sets: list[list[int]]) -> None:
    """A SlidingBloom given a sequence of id sets (ids entering and leaving, the set growing past
    a size step or shrinking back) answers each with exactly ``BloomFilter.for_ids``'s bits."""
    ids = [hashlib.sha256(i.to_bytes(2, "big")).digest() for i in range(301)]
    sliding = SlidingBloom()
    for chosen in sets:
        members = [ids[i] for i in chosen]
        got, want = sliding.filter_of(members), BloomFilter.for_ids(members)
        assert (got.size, got.hashes, bytes(got.bits)) == (want.size, want.hashes, bytes(want.bits))


def test_sliding_bloom_window_over_a_replica_log() -> None:
    """The use in node/sync.py: the newest ``window`` ids of a growing log, a few more each time
    (and one jump back to an older window: the bits still match)."""
    ids = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(5000)]
    sliding = SlidingBloom()
    window = 2048
    for end in [*range(1, 4000, 97), 2500, 5000]:
        recent = ids[max(0, end - window) : end]
        assert sliding.filter_of(recent).bits == BloomFilter.for_ids(recent).bits
