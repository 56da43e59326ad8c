"""A witnessed replica drops the undo records of final ops (``TRIM_FINAL_UNDO_AFTER``): with a
tiny threshold, replicas that trim often must stay equal to ones that never trim and to
derivation from scratch, through partial deliveries, late ops, reorders by heartbeats and
checkpoint restores."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crdtbook._replica as replica_module
from crdtbook import Identity, Market, Replica

WITNESSES = [Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3)]
TRADERS = [Identity.from_seed(bytes([i]) * 32) for i in range(30, 34)]
MARKET = Market("TRIM", "1", "1", witnesses=[w.public_key for w in WITNESSES])


@contextmanager
def trim_after(ops: int) -> Iterator[None]:
    old = replica_module.TRIM_FINAL_UNDO_AFTER
    replica_module.TRIM_FINAL_UNDO_AFTER = ops  # type: ignore[misc]
    try:
        yield
    finally:
        replica_module.TRIM_FINAL_UNDO_AFTER = old  # type: ignore[misc]


def play(seed: int, steps: int) -> list[Replica]:
    rnd = random.Random(seed)
    replicas = [Replica(MARKET) for _ in WITNESSES]
    for _ in range(steps):
        i = rnd.randrange(3)
        roll = rnd.random()
        if roll < 0.6:
            side = rnd.choice(("buy", "sell"))
            price = rnd.randint(97, 101) if side == "buy" else rnd.randint(99, 103)
            replicas[i].submit(rnd.choice(TRADERS), side, price, rnd.randint(1, 4))
        elif roll < 0.75:
            replicas[i].heartbeat(WITNESSES[i])
        elif roll < 0.8:  # an op from nowhere: no parents, Lamport 1
            late = Replica(MARKET).submit(rnd.choice(TRADERS), "buy", 103, rnd.randint(1, 9))
            replicas[i].apply(late)
        else:
            ops = replicas[rnd.randrange(3)].ops()
            rnd.shuffle(ops)
            replicas[i].apply_many(ops[: rnd.randint(0, len(ops))])
    return replicas


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**6))
def test_trimming_undo_records_changes_nothing(seed: int) -> None:
    with trim_after(10**12):
        untrimmed = play(seed, 150)
    with trim_after(4):
        trimmed = play(seed, 150)
    for a, b in zip(untrimmed, trimmed, strict=True):
        assert [o.id for o in a.ops()] == [o.id for o in b.ops()]
        assert a.digest() == b.digest() and a.final_count == b.final_count
        assert b.undo_floor <= b.final_count
    # Everything everywhere: equal to each other and to a replica derived from scratch.
    everything = [op for r in trimmed for op in r.ops()]
    scratch = Replica(MARKET)
    random.Random(seed).shuffle(everything)
    for op in everything:
        scratch.apply(op)
    with trim_after(4):
        for r in trimmed:
            r.apply_many(everything)
    assert {r.digest() for r in trimmed} == {scratch.digest()}
    live = trimmed[0]
    raws = [op.raw for op in live.ops()]
    restored = Replica.restore(MARKET, raws, live.checkpoint(), verify=False)
    assert restored.digest() == live.digest()


def test_trimming_happens_and_frees_the_tape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replica_module, "TRIM_FINAL_UNDO_AFTER", 16)
    r = Replica(MARKET)
    for i in range(400):
        r.submit(TRADERS[i % 4], ("buy", "sell")[i % 2], 100, 1 + i % 3)
        if i % 20 == 19:
            for w in WITNESSES:
                r.heartbeat(w)
    assert r.undo_floor > 300 and r.undo_floor <= r.final_count
    assert len(r._engine.tape) < 100  # only the provisional tail's records remain
