"""Checkpoints of derived state: ``Replica.checkpoint`` and ``Replica.restore``.

- Round trip: a replica restored from its own checkpoint (and its ops, in any order, as ops or
  bytes, with repeats and ops still waiting for parents) equals it, with or without a tail left
  out of the checkpoint.
- Restoring with more ops than were checkpointed equals applying them all normally: the
  checkpoint is used exactly when the log still starts with the checkpointed ops (new ops sort
  after them), and ignored when a late op sorts inside them.
- Late ops after a restore, sorting anywhere (below the undo floor too), keep incremental
  derivation equal to derivation from scratch.
- Damaged, foreign, truncated, random or re-signed inconsistent blobs are ignored (or, for a
  forged blob the cheap checks cannot tell, never make restore or later work raise).
"""

from __future__ import annotations

import random
from typing import Any

import cbor2
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from strategies import (
    AUTHORS,
    MARKET,
    OTHER_MARKET,
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
from crdtbook._checkpoint import FORMAT, VERSION, _checksum

# -- helpers ----------------------------------------------------------------------------------


def observable(replica: Replica) -> tuple[Any, ...]:
    """Everything a replica shows about its log and its derived state."""
    cancels = [
        (op.id, replica.cancel_effective(op.id)) for op in replica.ops() if op.kind == "cancel"
    ]
    return (
        replica.digest(),
        replica.book(),
        replica.fills(),
        replica.orders(),
        cancels,
        [op.id for op in replica.ops()],
        replica.heads(),
        sorted(replica.pending_ids()),
        replica.missing(),
        replica.author_seqs(),
        replica.forked_authors(),
    )


def held_ops(replica: Replica) -> list[Op]:
    """Applied and pending ops: what a node's store holds for it."""
    return replica.ops() + [op for op in replica._pending.values()]


def shuffled(ops: list[Op], rng: random.Random, form: str) -> list[Any]:
    """The ops with some repeated, shuffled, as ``Op``s or bytes."""
    items: list[Any] = ops + [rng.choice(ops) for _ in range(len(ops) // 4)] if ops else []
    rng.shuffle(items)
    if form == "bytes":
        return [op.raw for op in items]
    if form == "mixed":
        return [op.raw if rng.random() < 0.5 else op for op in items]
    return items


def resign(blob: bytes, **changes: Any) -> bytes:
    """The blob with top-level fields (or, as ``state_KEY``, state fields) replaced and a valid
    checksum again: what a forger, not a failing disk, makes."""
    fields = cbor2.loads(blob)
    del fields["sha256"]
    for key, value in changes.items():
        if key.startswith("state_"):
            fields["state"][key[6:]] = value
        else:
            fields[key] = value
    fields["sha256"] = _checksum(fields)
    return bytes(cbor2.dumps(fields, canonical=True))


def state_field(blob: bytes, key: str) -> bytes:
    return bytes(cbor2.loads(blob)["state"][key])


def a_world(plan: list[tuple[Any, ...]], full: bool) -> list[Replica]:
    world = run_plan(plan, replicas=3)
    if full:
        exchange_all(world)
    return world


# -- round trip -------------------------------------------------------------------------------


@settings(max_examples=examples(0.5))
@given(
    plan=plans(replicas=3, authors=4, max_steps=30),
    tail=st.integers(0, 6),
    form=st.sampled_from(("ops", "bytes", "mixed")),
    rng=st.randoms(use_true_random=False),
)
def test_restore_from_own_checkpoint_equals_original(plan, tail, form, rng):
    for replica in run_plan(plan, replicas=3):
        before = observable(replica)
        blob = replica.checkpoint(tail)
        assert observable(replica) == before  # leaving a tail out rewinds and rematches
        assert_scratch_equal(replica)
        restored = Replica.restore(MARKET, shuffled(held_ops(replica), rng, form), blob)
        covered = max(0, len(replica) - tail)
        assert restored.restore_report.from_checkpoint == covered
        assert restored.undo_floor == covered
        assert restored.restore_report.skipped == ()
        assert observable(restored) == before
        assert_matches_reference(restored)
        assert_invariants(restored)
        # The restored replica checkpoints again (from its undo floor on, without a rebuild).
        again = Replica.restore(MARKET, held_ops(restored), restored.checkpoint(tail))
        assert again.restore_report.from_checkpoint == covered
        assert observable(again) == before
        # A tail longer than the floor allows: the checkpoint covers the floor.
        floor_only = restored.checkpoint(len(restored) + 1)
        assert observable(restored) == before
        again = Replica.restore(MARKET, held_ops(restored), floor_only)
        assert again.restore_report.from_checkpoint == covered


def test_checkpoint_of_an_empty_replica():
    empty = Replica(MARKET)
    blob = empty.checkpoint()
    assert cbor2.loads(blob)["ops"] == 0
    restored = Replica.restore(MARKET, [], blob)
    assert restored.restore_report.from_checkpoint == 0
    assert observable(restored) == observable(empty)
    # An empty log's checkpoint covers nothing of a log that has ops: a full match.
    world = run_plan(
        [("submit", 0, 0, "buy", 100, 2, "gtc"), ("submit", 1, 1, "sell", 99, 1, "gtc")]
    )
    ops = union_ops(world)
    restored = Replica.restore(MARKET, ops, blob)
    expected = Replica(MARKET)
    expected.apply_many(ops)
    assert restored.restore_report.from_checkpoint == 0
    assert observable(restored) == observable(expected)
    # ... and a checkpoint is of no use to an empty log.
    assert Replica.restore(MARKET, [], expected.checkpoint()).restore_report.from_checkpoint == 0


def test_restore_without_checkpoint_and_verify_false():
    world = a_world(
        [("submit", a, a % 3, "buy" if a % 2 else "sell", 100, 3, "gtc") for a in range(4)], True
    )
    replica = world[0]
    raws = [op.raw for op in replica.ops()]
    for checkpoint in (None, b""):
        restored = Replica.restore(MARKET, raws, checkpoint, verify=False)
        assert restored.restore_report.from_checkpoint == 0
        assert observable(restored) == observable(replica)
    restored = Replica.restore(MARKET, raws, replica.checkpoint(), verify=False)
    assert restored.restore_report.from_checkpoint == len(replica)
    assert observable(restored) == observable(replica)


def test_invalid_ops_are_skipped_and_reported():
    world = a_world([("submit", a, a % 3, "sell", 100 + a, 1, "gtc") for a in range(3)], True)
    replica = world[0]
    raws = [op.raw for op in replica.ops()]
    garbage = b"\x88" + bytes(40)
    foreign = Replica(OTHER_MARKET).submit(AUTHORS[0], "buy", 100, 1).raw
    for verify in (True, False):
        restored = Replica.restore(
            MARKET, [garbage, *raws, foreign], replica.checkpoint(), verify=verify
        )
        assert len(restored.restore_report.skipped) == 2
        assert restored.restore_report.from_checkpoint == len(replica)
        assert observable(restored) == observable(replica)


def test_negative_tail_is_refused():
    with pytest.raises(ValueError):
        Replica(MARKET).checkpoint(-1)


# -- more ops than were checkpointed -----------------------------------------------------------


@settings(max_examples=examples(0.5))
@given(
    plan=plans(replicas=3, authors=4, max_steps=30),
    tail=st.sampled_from((0, 0, 2)),
    rng=st.randoms(use_true_random=False),
)
def test_restore_with_ops_sorting_after_and_inside_the_checkpoint(plan, tail, rng):
    """Each replica of a world checkpoints its partial view; restored with everything the world
    holds, it equals a replica that applied everything, and used its checkpoint exactly when
    the new ops all sort after the checkpointed ones."""
    world = run_plan(plan, replicas=3)
    everything = union_ops(world)
    expected = Replica(MARKET)
    expected.apply_many([op.raw for op in everything])
    for replica in world:
        blob = replica.checkpoint(tail)
        restored = Replica.restore(MARKET, shuffled(everything, rng, "bytes"), blob)
        assert observable(restored) == observable(expected)
        covered = max(0, len(replica) - tail)
        unchanged = [op.id for op in everything[:covered]] == [
            op.id for op in replica.ops()[:covered]
        ]
        assert restored.restore_report.from_checkpoint == (covered if unchanged else 0)
        event("checkpoint used" if restored.restore_report.from_checkpoint else "full match")
        assert_scratch_equal(restored)


@settings(max_examples=examples(0.5))
@given(plan=plans(replicas=3, authors=4, max_steps=30), rng=st.randoms(use_true_random=False))
def test_late_ops_after_restore_equal_scratch(plan, rng):
    """Restore from a checkpoint of a random causal prefix, then apply the other ops one by one
    or in batches: ops sorting below the undo floor make the replica match from scratch once,
    and after every step it equals derivation from scratch."""
    ops = union_ops(run_plan(plan, replicas=3))
    order = random_causal_order(ops, rng)
    split = rng.randint(0, len(order))
    first = Replica(MARKET)
    first.apply_many(order[:split])
    restored = Replica.restore(MARKET, first.ops(), first.checkpoint(rng.choice((0, 0, 1, 3))))
    rest = order[split:]
    while rest:
        size = rng.randint(1, 3)
        batch, rest = rest[:size], rest[size:]
        floor = restored.undo_floor
        below = any(sum(1 for held in restored.ops() if held.key < op.key) < floor for op in batch)
        report = restored.apply_many([op.raw for op in batch])
        assert not report.invalid and report.pending == 0
        if below:
            assert restored.undo_floor == 0
            event("a late op sorted below the undo floor")
        else:
            assert restored.undo_floor == floor
        assert_scratch_equal(restored)
    assert restored.ops() == ops
    assert_matches_reference(restored)


# -- damaged and hostile blobs -----------------------------------------------------------------


def _checkpointed(plan: list[tuple[Any, ...]]) -> tuple[Replica, bytes]:
    replica = a_world(plan, full=True)[0]
    return replica, replica.checkpoint()


def _assert_ignored(replica: Replica, blob: object, rng: random.Random) -> None:
    restored = Replica.restore(MARKET, shuffled(replica.ops(), rng, "ops"), blob)  # type: ignore[arg-type]
    assert restored.restore_report.from_checkpoint == 0
    assert observable(restored) == observable(replica)


busy_plans = plans(replicas=3, authors=4, min_steps=8, max_steps=30)


@settings(max_examples=examples(0.5))
@given(
    plan=busy_plans,
    damage=st.sampled_from(("bitflip", "bitflip", "truncate", "append", "random", "zeros")),
    rng=st.randoms(use_true_random=False),
)
def test_damaged_blobs_are_ignored(plan, damage, rng):
    replica, blob = _checkpointed(plan)
    if not len(replica):
        return
    if damage == "bitflip":
        bit = rng.randrange(8 * len(blob))
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        broken = bytes(bad)
    elif damage == "truncate":
        broken = blob[: rng.randrange(len(blob))]
    elif damage == "append":
        broken = blob + bytes([rng.randrange(256)])
    elif damage == "random":
        broken = rng.randbytes(rng.choice((1, 10, len(blob))))
    else:
        broken = bytes(len(blob))
    _assert_ignored(replica, broken, rng)


@settings(max_examples=examples(0.3))
@given(plan=busy_plans, rng=st.randoms(use_true_random=False))
def test_foreign_and_other_version_checkpoints_are_ignored(plan, rng):
    replica, blob = _checkpointed(plan)
    if not len(replica):
        return
    other = Replica(OTHER_MARKET)
    other.submit(AUTHORS[0], "buy", 100, 1)
    for bad in (
        other.checkpoint(),
        resign(blob, market=OTHER_MARKET.id),
        resign(blob, version=VERSION + 1),
        resign(blob, version=True),
        resign(blob, format=FORMAT + "/x"),
        resign(blob, ops=len(replica) + 1),
        resign(blob, ops=-1),
        resign(blob, ops=2**70),
        resign(blob, prefix=bytes(32)),
        resign(blob, state_remaining=state_field(blob, "remaining") + bytes(8)),
        resign(blob, state_states="text"),
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps({"format": FORMAT}),
        b"\x9f" * 1000,  # deep nesting
        b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff",  # a byte string longer than anything
        None,
        "not bytes",
    ):
        _assert_ignored(replica, bad, rng)


def _i64(values: list[int]) -> bytes:
    return b"".join(v.to_bytes(8, "little", signed=True) for v in values)


def _from_i64(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 8], "little", signed=True) for i in range(0, len(data), 8)]


@settings(max_examples=examples(0.5))
@given(plan=busy_plans, rng=st.randoms(use_true_random=False))
def test_forged_inconsistent_states_are_ignored(plan, rng):
    """Re-signed blobs whose state breaks an invariant the checks cover: each is ignored."""
    replica, blob = _checkpointed(plan)
    if not replica.order_count:
        return
    forged: list[bytes] = []

    def mutate_i64(key: str, index: int, value: int) -> None:
        values = _from_i64(state_field(blob, key))
        if values:
            values[index % len(values)] = value
            forged.append(resign(blob, **{f"state_{key}": _i64(values)}))

    count = replica.order_count
    # A quantity changed anywhere in the columns no longer adds up.
    for key in ("remaining", "filled"):
        index = rng.randrange(count)
        old = _from_i64(state_field(blob, key))[index]
        mutate_i64(key, index, old + rng.choice((1, -1, 7, -(2**40))))
    # Order states: a code that is none, or a live / cancelled order made finished (or back).
    states = bytearray(state_field(blob, "states"))
    index = rng.randrange(count)
    for code in (7, 255, 0 if states[index] > 1 else 2, 3 | 1 << 3):
        changed = bytearray(states)
        changed[index] = code
        forged.append(resign(blob, state_states=bytes(changed)))
    # Fills: a number out of range, a maker after its taker, a quantity changed.
    fills = _from_i64(state_field(blob, "fills"))
    if fills:
        at = 4 * rng.randrange(len(fills) // 4)
        for offset, value in ((0, count), (1, -1), (1, fills[at]), (3, fills[at + 3] + 1)):
            changed_fills = list(fills)
            changed_fills[at + offset] = value
            forged.append(resign(blob, state_fills=_i64(changed_fills)))
        forged.append(resign(blob, state_fills=_i64(fills[:-4])))
    # Cancels: a flag flipped or out of range.
    flags = bytearray(state_field(blob, "cancels"))
    if flags:
        index = rng.randrange(len(flags))
        for value in (flags[index] ^ 1, 2):
            changed_flags = bytearray(flags)
            changed_flags[index] = value
            forged.append(resign(blob, state_cancels=bytes(changed_flags)))
    # Levels: dropped, cut short, a live count changed, an order moved or doubled, crossed.
    for key in ("bids", "asks"):
        flat = _from_i64(state_field(blob, key))
        if not flat:
            continue
        price, live, size = flat[0], flat[1], flat[2]
        members = flat[3 : 3 + size]
        rest = flat[3 + size :]
        variants = [
            rest,  # a level with live orders gone
            flat[:-1],
            [price, live + 1, size, *members, *rest],
            [price, live, size + 1, *members, members[-1], *rest],
            [price + 1, live, size, *members, *rest],
            [price, live, size, *members, *rest, price, live, size, *members],
            [price, 0, size, *members, *rest],
            [price, live, size, *reversed(members), *rest] if size > 1 else flat[:2],
        ]
        other_key = "asks" if key == "bids" else "bids"
        variants_other = [[price, live, size, *members, *_from_i64(state_field(blob, other_key))]]
        for variant in variants:
            forged.append(resign(blob, **{f"state_{key}": _i64(variant)}))
        for variant in variants_other:  # the same orders on both sides: crossed, doubled
            forged.append(resign(blob, **{f"state_{other_key}": _i64(variant)}))
    for bad in forged:
        if bad != blob:  # a change that changed nothing (a cancelled order "cancelled")
            _assert_ignored(replica, bad, rng)


@settings(max_examples=examples(0.3))
@given(
    plan=busy_plans,
    key=st.sampled_from(("remaining", "filled", "states", "fills", "cancels", "bids", "asks")),
    rng=st.randoms(use_true_random=False),
)
def test_forged_blobs_never_make_restore_or_later_work_raise(plan, key, rng):
    """A re-signed blob with random changes in one state field: restore never raises, and if
    the checks could not tell (a forgery consistent with every invariant they cover), the
    restored replica still serves its views and goes on applying ops."""
    replica, blob = _checkpointed(plan)
    data = bytearray(state_field(blob, key))
    for _ in range(rng.randint(1, 3)):
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
    restored = Replica.restore(MARKET, replica.ops(), resign(blob, **{f"state_{key}": bytes(data)}))
    if restored.restore_report.from_checkpoint == 0:
        assert observable(restored) == observable(replica)
        return
    same = restored.digest() == replica.digest()  # mostly: the change changed nothing
    event(f"a forged {key} passed the checks ({'same' if same else 'another'} state)")
    observable(restored)
    for author in range(len(AUTHORS)):
        restored.submit(AUTHORS[author], "buy" if author % 2 else "sell", 100, 3)
        restored.orders()
        restored.digest()
