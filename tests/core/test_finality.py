"""Witnessed markets (protocol version 2, specs/finality.md): what becomes final, what cannot
move it, who may witness, reconfiguration, equivocation, fairness inside a batch, the codec,
and markets without witnesses (never final).

The random-network version of these properties is test_finality_stateful.py."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cbor2
import pytest
from witnessed import (
    ADVERSARIES,
    GENESIS,
    PLAIN,
    TRADERS,
    WITNESSES,
    WMARKET,
    assert_final_book,
    assert_finality_consistent,
    assert_matches_reference_in_order,
    assert_scratch_equal_shuffled,
    final_fills,
    final_prefix,
    order_op,
    snapshot,
    sync,
)

from crdtbook import (
    BadSignature,
    BadWitness,
    Book,
    HeartbeatBody,
    Identity,
    InvalidOp,
    Market,
    Op,
    OrderBody,
    ReconfigBody,
    Replica,
    UnknownKind,
    WrongMarket,
    decode,
    encode,
)
from crdtbook._finality import check_approval
from crdtbook._ops import SIGNATURE_DOMAIN, SIGNATURE_DOMAINS, Body, reconfig_message, sign_op

A, B, C = GENESIS
D, E = WITNESSES[3:]
ALICE, BOB, CAROL, DAVE = TRADERS
MALLORY = ADVERSARIES[0]
BATCH_DOMAIN = b"crdtbook/batch/v2\x00"


# -- helpers ------------------------------------------------------------------------------------


def authored(
    replica: Replica, identity: Identity, body: Body, parents: Sequence[Op] | None = None
) -> Op:
    """A hand-signed op on ``identity``'s chain in ``replica``: its latest op as own parent,
    with ``parents`` (default: every head by someone else)."""
    key = identity.public_key
    mine = [op for op in replica.ops() if op.author == key]
    tip = max(mine, key=lambda o: o.seq, default=None)
    if parents is None:
        heads = [replica.get(h) for h in replica.heads()]
        parents = [op for op in heads if op is not None and op.author != key]
    chosen = list(parents) + ([tip] if tip is not None and tip not in parents else [])
    lamport = 1 + max((p.lamport for p in chosen), default=0)
    market = replica.market
    return sign_op(identity, market.id, 1 if tip is None else tip.seq + 1, lamport,
                   tuple(p.id for p in chosen), body, market.version)


def approvals(market: Market, epoch: int, witnesses: Sequence[Identity],
              approvers: Sequence[Identity], signer: Identity | None = None
              ) -> tuple[tuple[bytes, bytes], ...]:
    """Approvals by ``approvers`` (signed by ``signer`` instead, for a forgery)."""
    keys = tuple(sorted(w.public_key for w in witnesses))
    message = reconfig_message(market.id, epoch, keys)
    return tuple(sorted((a.public_key, (signer or a).sign(message)) for a in approvers))


def reconfig_body(market: Market, epoch: int, witnesses: Sequence[Identity],
                  approvers: Sequence[Identity], signer: Identity | None = None) -> ReconfigBody:
    keys = tuple(sorted(w.public_key for w in witnesses))
    return ReconfigBody(epoch, keys, approvals(market, epoch, witnesses, approvers, signer))


def homes(n: int = 3) -> list[Replica]:
    return [Replica(WMARKET) for _ in range(n)]


def beat(world: Sequence[Replica], witnesses: Sequence[Identity] = GENESIS,
         only_if_needed: bool = True) -> list[Op]:
    """Each witness heartbeats at its own replica (world[i] for witnesses[i]), then all sync."""
    beats = []
    for replica, witness in zip(world, witnesses, strict=False):
        if not only_if_needed or replica.needs_heartbeat(witness.public_key):
            beats.append(replica.heartbeat(witness))
    sync(world)
    return beats


def quiesce(world: Sequence[Replica], witnesses: Sequence[Identity] = GENESIS) -> None:
    """Heartbeats until no witness needs one (at most a few rounds)."""
    for _ in range(10):
        sync(world)
        if not beat(world, witnesses):
            return
    raise AssertionError("witnesses keep needing heartbeats")


def rank_by_spec(replica: Replica, op: Op) -> int:
    """An op's rank from specs/finality.md section 4, computed from public views only."""
    point = replica.placement(op.id)
    assert point is not None
    # The batch's counted heartbeats: a counted heartbeat is placed at its own Lamport time (one
    # that does not count is placed, if at all, by a later heartbeat: a larger time).
    beats = sorted(
        h.id for h in replica.ops()
        if h.kind == "heartbeat" and h.lamport == point and replica.placement(h.id) == point
    )
    seed = hashlib.sha256(BATCH_DOMAIN + b"".join(beats)).digest()
    value = int.from_bytes(hashlib.sha256(seed + op.id).digest()[:8], "big")
    for parent_id in op.parents:
        parent = replica.get(parent_id)
        assert parent is not None
        if replica.placement(parent_id) == point:
            value = max(value, rank_by_spec(replica, parent))
    return value


def assert_total_order_by_spec(replica: Replica) -> None:
    """ops() is the sort by (placement, rank, lamport, id) of specs/finality.md section 4."""
    unplaced = 2**63

    def key(op: Op) -> tuple[int, int, int, bytes]:
        point = replica.placement(op.id)
        if point is None:
            return (unplaced, 0, op.lamport, op.id)
        return (point, rank_by_spec(replica, op), op.lamport, op.id)

    ops = replica.ops()
    assert ops == sorted(ops, key=key)


def assert_sound(replica: Replica) -> None:
    assert_finality_consistent(replica)
    assert_final_book(replica)
    assert_matches_reference_in_order(replica)
    assert_scratch_equal_shuffled(replica, __import__("random").Random(7))


# -- backdating ----------------------------------------------------------------------------


def test_a_backdated_order_cannot_take_a_final_fill() -> None:
    """Bob's fill is final everywhere; then Mallory's order from a fresh replica, with no
    parents (Lamport 1, the smallest key version 1 knows) arrives: it sorts after everything
    final, takes only what is left, and Bob keeps his fill, final."""
    world = homes()
    ra, rb, _ = world
    sell = ra.submit(ALICE, "sell", 100, 5)
    sync(world)
    buy = rb.submit(BOB, "buy", 100, 3)
    sync(world)
    quiesce(world)
    for r in world:
        assert r.final_fill_count() == r.fill_count == 1
        fill = r.fills()[0]
        assert (fill.taker, fill.maker, fill.quantity) == (buy.id, sell.id, 3)
        state = r.order(buy.id)
        assert state is not None and state.status == "filled" and state.final
    frontier = ra.frontier
    shown = {id(r): (final_prefix(r), final_fills(r)) for r in world}

    late = order_op(MALLORY, WMARKET, [], OrderBody("buy", 100, 5))
    assert late.lamport == 1 and not late.parents
    for r in world:
        r.apply(late.raw)
        assert r.ops()[-1] == late and r.placement(late.id) is None and not r.is_final(late.id)
        assert (final_prefix(r)[: len(shown[id(r)][0])], final_fills(r)) == shown[id(r)]
        assert r.fills()[0].taker == buy.id and r.final_fill_count() == 1
        mallory = r.order(late.id)
        assert mallory is not None and (mallory.filled, mallory.final) == (2, False)
        assert r.frontier == frontier
        assert all(r.needs_heartbeat(w.public_key) for w in GENESIS)
        assert_sound(r)

    quiesce(world)
    for r in world:
        placement = r.placement(late.id)
        assert placement is not None and placement > frontier
        assert r.is_final(late.id) and r.final_fill_count() == r.fill_count == 2
        assert r.fills()[0].taker == buy.id and r.fills()[1].taker == late.id
        assert (final_prefix(r)[: len(shown[id(r)][0])], final_fills(r)[:1]) == shown[id(r)]
        assert_sound(r)
    assert len({r.digest() for r in world}) == 1


def test_version_1_lets_the_same_backdated_order_take_the_fill() -> None:
    """The contrast: without witnesses the Lamport-1 order sorts first and takes the lots
    Bob's fill had (which is why version-1 fills are never final)."""
    r = Replica(PLAIN)
    r.submit(CAROL, "buy", 50, 1)
    sell = r.submit(ALICE, "sell", 100, 5)
    buy = r.submit(BOB, "buy", 100, 3)
    assert r.fills()[0].taker == buy.id and sell.lamport == 2
    late = order_op(MALLORY, PLAIN, [], OrderBody("buy", 100, 5))
    r.apply(late.raw)
    assert r.ops()[0] == late  # Lamport 1: before everything
    first = r.fills()[0]  # Alice's sell now meets Mallory's bid, not Bob's
    assert (first.taker, first.maker, first.quantity) == (sell.id, late.id, 5)
    state = r.order(buy.id)
    assert state is not None and state.filled == 0 and not state.final
    assert r.final_fill_count() == 0


# -- who may heartbeat ------------------------------------------------------------------------


def test_a_non_witness_cannot_author_a_heartbeat() -> None:
    r = Replica(WMARKET)
    r.submit(ALICE, "sell", 100, 1)
    before = snapshot(r)
    for identity in (MALLORY, ALICE, D):
        with pytest.raises(BadWitness):
            r.heartbeat(identity)
    assert snapshot(r) == before
    with pytest.raises(BadWitness):
        Replica(PLAIN).heartbeat(A)


def test_a_hand_signed_non_witness_heartbeat_moves_nothing() -> None:
    """Valid (anyone may sign one) but ignored: no placement, no frontier, no witness entry;
    the witnesses acknowledge it like an order."""
    r = Replica(WMARKET)
    sell = r.submit(ALICE, "sell", 100, 5)
    r.heartbeat(A)
    r.heartbeat(B)
    frontier, placements = r.frontier, {op.id: r.placement(op.id) for op in r.ops()}
    status = r.witness_status()
    assert frontier == 0  # C has not heartbeated
    for who, time_ms in ((MALLORY, 1), (ALICE, 0)):
        forged = authored(r, who, HeartbeatBody(time_ms))
        r.apply(forged.raw)
        assert forged in r.ops() and r.placement(forged.id) is None
        assert r.frontier == frontier and r.final_count == 0
        assert {op.id: r.placement(op.id) for op in r.ops() if op.id in placements} == placements
        assert r.witness_status() == status
        assert r.needs_heartbeat(C.public_key)
    # A signature by another key than the author's is no heartbeat at all.
    payload_author_c = authored(r, C, HeartbeatBody(5))
    stolen = bytearray(payload_author_c.raw)
    stolen[-64:] = MALLORY.sign(b"anything")
    with pytest.raises(BadSignature):
        decode(bytes(stolen))
    # C's real heartbeat moves the frontier; the ignored ones are placed like any op.
    r.heartbeat(C)
    assert r.frontier > 0 and r.is_final(sell.id)
    assert all(r.placement(op.id) is not None for op in r.ops())
    assert_sound(r)


# -- a dead witness, and reconfiguration ---------------------------------------------------------


def test_a_dead_witness_stalls_finality_but_not_trading_or_convergence() -> None:
    world = homes()
    ra, rb, _ = world
    ra.submit(ALICE, "sell", 100, 5)
    rb.submit(BOB, "buy", 100, 2)
    sync(world)
    quiesce(world)
    assert all(r.final_fill_count() == r.fill_count == 1 for r in world)
    frontier = ra.frontier
    # C dies. Trading goes on; A and B keep acknowledging.
    alive = [ra, rb]
    ra.submit(CAROL, "buy", 100, 2)
    rb.submit(DAVE, "sell", 99, 4)
    rb.submit(BOB, "buy", 101, 1)
    sync(world)
    for _ in range(3):
        beat(alive, (A, B))
        sync(world)
    for r in world:
        assert r.fill_count > 1 and r.final_fill_count() == 1
        assert r.frontier == frontier
        assert r.needs_heartbeat(C.public_key)
        assert not r.needs_heartbeat(A.public_key) and not r.needs_heartbeat(B.public_key)
        info = {w.key: w for w in r.witness_status()}
        assert info[C.public_key].heartbeat_lamport == frontier
        assert info[A.public_key].heartbeat_lamport > frontier
        assert_sound(r)
    assert len({r.digest() for r in world}) == 1

    # A majority (A signs, B approves at its own replica) removes C: finality resumes.
    keys = sorted([A.public_key, B.public_key])
    approval = rb.approve_reconfig(B, keys)
    op = ra.reconfigure(A, keys, {B.public_key: approval})
    assert op.kind == "reconfig" and ra.epoch == 1 and ra.witnesses() == frozenset(keys)
    assert ra.frontier >= frontier
    sync(world)
    quiesce(alive, (A, B))
    sync(world)
    for r in world:
        assert r.epoch == 1 and r.witnesses() == frozenset(keys)
        info = {w.key: w for w in r.witness_status()}
        assert not info[C.public_key].current and info[A.public_key].current
        assert r.final_fill_count() == r.fill_count > 1
        assert all(r.is_final(o.id) for o in r.ops() if o.kind != "heartbeat")
        assert not r.needs_heartbeat(C.public_key)  # not a witness any more
        assert_sound(r)
    assert len({r.digest() for r in world}) == 1


def test_an_added_witness_counts_from_its_reconfiguration_on() -> None:
    world = homes()
    ra, rb, _ = world
    ra.submit(ALICE, "sell", 100, 5)
    sync(world)
    quiesce(world)
    frontier = ra.frontier
    keys = sorted(w.public_key for w in (A, B, C, D))
    op = ra.reconfigure(A, keys, {B.public_key: rb.approve_reconfig(B, keys)})
    assert ra.frontier >= frontier  # A(D) = lamport(R) > L(A)
    sync(world)
    rd = Replica(WMARKET)
    rd.apply_many(o.raw for o in ra.ops())
    world.append(rd)
    ra.submit(BOB, "buy", 100, 1)
    sync(world)
    # A heartbeat of D signed before it held the reconfiguration would not count; one signed
    # now (R in its past) does.
    early = sign_op(D, WMARKET.id, 1, 1, (), HeartbeatBody(), WMARKET.version)
    ra.apply(early.raw)
    assert ra.placement(early.id) is None
    assert {w.key: w for w in ra.witness_status()}[D.public_key].heartbeat_seq == 0
    assert ra.needs_heartbeat(D.public_key)
    sync(world)
    quiesce(world, (A, B, C, D))
    for r in world:
        assert r.witnesses() == frozenset(keys) and r.epoch == 1
        info = {w.key: w for w in r.witness_status()}[D.public_key]
        assert info.heartbeat_seq >= 2 and info.heartbeat_lamport > op.lamport
        assert r.final_fill_count() == r.fill_count == 1
        assert_sound(r)


@pytest.fixture
def configured() -> tuple[Replica, list[Op]]:
    """A replica of the genesis witnesses with some trading and one heartbeat each."""
    r = Replica(WMARKET)
    r.submit(ALICE, "sell", 100, 5)
    r.submit(BOB, "buy", 100, 2)
    for w in GENESIS:
        r.heartbeat(w)
    return r, r.ops()


def _refused(r: Replica, op: Op, error: type[InvalidOp] = BadWitness) -> None:
    before = snapshot(r)
    with pytest.raises(error):
        r.precheck(op)
    with pytest.raises(error):
        r.apply(op.raw)
    assert snapshot(r) == before
    assert op.id not in r and r.is_invalid(op.id)
    with pytest.raises(error):  # and again, the same way
        r.apply(op.raw)


def test_reconfiguration_needs_a_majority(configured: tuple[Replica, list[Op]]) -> None:
    r, _ = configured
    keys = sorted([A.public_key, B.public_key])
    before = snapshot(r)
    with pytest.raises(BadWitness):
        r.reconfigure(A, keys)
    with pytest.raises(BadWitness):  # its own approval does not count twice
        r.reconfigure(A, keys, {A.public_key: r.approve_reconfig(A, keys)})
    assert snapshot(r) == before
    _refused(r, authored(r, A, reconfig_body(WMARKET, 1, (A, B), ())))
    _refused(r, authored(r, A, reconfig_body(WMARKET, 1, (A, B), (A,))))
    # Five witnesses need three.
    five = Market("FIN5", "1", "1", witnesses=[w.public_key for w in WITNESSES])
    r5 = Replica(five)
    r5.heartbeat(A)
    _refused(r5, authored(r5, A, reconfig_body(five, 1, (A, B, C, D), (B,))))
    r5.apply(authored(r5, A, reconfig_body(five, 1, (A, B, C, D), (B, C))).raw)
    assert r5.epoch == 1 and r5.witnesses() == frozenset(w.public_key for w in (A, B, C, D))


def test_reconfiguration_with_a_forged_approval_is_refused(
    configured: tuple[Replica, list[Op]],
) -> None:
    r, _ = configured
    keys = sorted([A.public_key, B.public_key])
    before = snapshot(r)
    forged = MALLORY.sign(reconfig_message(WMARKET.id, 1, tuple(keys)))
    with pytest.raises(BadWitness):
        r.reconfigure(A, keys, {B.public_key: forged})
    other_set = r.approve_reconfig(B, sorted([A.public_key, B.public_key, D.public_key]))
    with pytest.raises(BadWitness):  # B approved another set
        r.reconfigure(A, keys, {B.public_key: other_set})
    with pytest.raises(BadWitness):  # an approval by a key that is no witness
        r.reconfigure(A, keys, {MALLORY.public_key: MALLORY.sign(b"x" * 64)})
    with pytest.raises(BadWitness):
        r.approve_reconfig(MALLORY, keys)
    assert snapshot(r) == before
    # The same as signed ops, as a peer would send them.
    _refused(r, authored(r, A, reconfig_body(WMARKET, 1, (A, B), (B,), signer=MALLORY)))
    _refused(r, authored(r, A, reconfig_body(WMARKET, 1, (A, B), (MALLORY,))))
    other = ReconfigBody(1, tuple(keys), approvals(WMARKET, 1, (A, B, D), (B,)))
    _refused(r, authored(r, A, other))
    wrong_market = ReconfigBody(1, tuple(keys), approvals(PLAIN, 1, (A, B), (B,)))
    _refused(r, authored(r, A, wrong_market))
    # An author that is no witness, even with a majority of approvals.
    _refused(r, authored(r, MALLORY, reconfig_body(WMARKET, 1, (A, B), (A, B))))


def test_reconfiguration_with_a_wrong_epoch_is_refused(
    configured: tuple[Replica, list[Op]],
) -> None:
    r, _ = configured
    for epoch in (2, 3):  # no reconfiguration with epoch 1 in its past
        _refused(r, authored(r, A, reconfig_body(WMARKET, epoch, (A, B), (B,))))
    r.reconfigure(A, [A.public_key, B.public_key],
                  {B.public_key: r.approve_reconfig(B, [A.public_key, B.public_key])})
    assert r.epoch == 1
    # Epoch 1 again, with epoch 1 in its past.
    _refused(r, authored(r, B, reconfig_body(WMARKET, 1, (A, B, D), (A,))))
    # Epoch 3 skips 2.
    _refused(r, authored(r, B, reconfig_body(WMARKET, 3, (A, B, D), (A,))))
    # Epoch 2 is fine once epoch 1 is in its past.
    r.apply(authored(r, B, reconfig_body(WMARKET, 2, (A, B, D), (A,))).raw)
    assert r.epoch == 2 and r.witnesses() == frozenset(w.public_key for w in (A, B, D))


def test_a_removed_witness_is_never_added_again(configured: tuple[Replica, list[Op]]) -> None:
    r, _ = configured
    keys = [A.public_key, B.public_key]
    r.reconfigure(A, keys, {B.public_key: r.approve_reconfig(B, keys)})
    before = snapshot(r)
    back = [A.public_key, B.public_key, C.public_key]
    with pytest.raises(BadWitness):
        r.reconfigure(A, back, {B.public_key: r.approve_reconfig(B, back)})
    assert snapshot(r) == before
    _refused(r, authored(r, A, reconfig_body(WMARKET, 2, (A, B, C), (B,))))
    # ... and C, removed, can sign nothing that counts: no heartbeat through the API.
    with pytest.raises(BadWitness):
        r.heartbeat(C)
    with pytest.raises(BadWitness):
        r.approve_reconfig(C, keys)


def test_a_removed_witness_heartbeat_is_acknowledged_like_any_op() -> None:
    """A removed witness that is still alive (it never learnt of its removal) signs another
    heartbeat. It counts for nothing; the witnesses in force acknowledge it like any op (as they
    do a non-witness's heartbeat), so it becomes final and cannot make the check scan it."""
    r = Replica(WMARKET)
    r.submit(ALICE, "sell", 100, 5)
    for w in GENESIS:
        r.heartbeat(w)
    home_of_c = Replica(WMARKET)
    home_of_c.apply_many(op.raw for op in r.ops())
    keys = [A.public_key, B.public_key]
    r.reconfigure(A, keys, {B.public_key: r.approve_reconfig(B, keys)})
    r.heartbeat(A)
    r.heartbeat(B)
    assert not r.needs_heartbeat(A.public_key) and not r.needs_heartbeat(B.public_key)
    late = home_of_c.heartbeat(C)
    r.apply(late.raw)
    assert r.placement(late.id) is None and r.frontier > 0
    assert r.needs_heartbeat(A.public_key) and r.needs_heartbeat(B.public_key)
    r.heartbeat(A)
    r.heartbeat(B)
    assert r.is_final(late.id)


def test_two_reconfigurations_at_one_epoch_do_not_split_replicas() -> None:
    """A approves two different epoch-1 sets (it lies): R1 = {A, B, C, D} signed by A, R2 =
    {A, B} signed by B. A replica holding both signs epoch 2 over the chain in force, and an
    order follows. Every replica must reach one verdict on every op, whatever order R1 and R2
    arrived in (specs/finality.md 3.3: each rule reads only R and its causal past)."""
    def keys(*ws: Identity) -> list[bytes]:
        return sorted(w.public_key for w in ws)

    r0, r1 = Replica(WMARKET), Replica(WMARKET)
    four, two, three = keys(A, B, C, D), keys(A, B), keys(A, B, D)
    first_set = r0.reconfigure(A, four, {B.public_key: r0.approve_reconfig(B, four)})
    second_set = r1.reconfigure(B, two, {A.public_key: r1.approve_reconfig(A, two)})
    r1.apply(first_set.raw)
    assert r1.witnesses() == frozenset(two) and second_set.id < first_set.id  # R2 in force
    epoch_2 = r1.reconfigure(A, three, {B.public_key: r1.approve_reconfig(B, three)})
    ask = r1.submit(ALICE, "sell", 100, 1)
    seen = set()
    for first, second in ((first_set, second_set), (second_set, first_set)):
        replica = Replica(WMARKET)
        report = replica.apply_many(op.raw for op in (first, second, epoch_2, ask))
        assert not report.invalid, [type(e).__name__ for _, e in report.invalid]
        seen.add((tuple(op.id for op in replica.ops()), replica.epoch, replica.digest()))
    assert len(seen) == 1


# -- equivocation -----------------------------------------------------------------------------


def test_an_equivocating_witness_is_reported_and_stops_counting() -> None:
    r = Replica(WMARKET)
    r.submit(ALICE, "sell", 100, 5)
    a1 = r.heartbeat(A)
    r.heartbeat(B)
    r.heartbeat(C)
    assert r.frontier == a1.lamport
    safe = final_prefix(r)  # placed at or below A's last heartbeat before its fork
    r.submit(BOB, "buy", 100, 3)
    a2 = r.heartbeat(A)
    r.heartbeat(B)
    r.heartbeat(C)
    assert r.frontier == a2.lamport and r.final_fill_count() == 1
    # A signs a second heartbeat at sequence 2 (on its seq-1 heartbeat only).
    fork = sign_op(A, WMARKET.id, 2, a1.lamport + 1, (a1.id,), HeartbeatBody(9),
                   WMARKET.version)
    assert fork.seq == a2.seq and fork.id != a2.id
    r.apply(fork.raw)
    assert r.forked_authors() == frozenset({A.public_key})
    info = {w.key: w for w in r.witness_status()}
    assert info[A.public_key].forked and not info[B.public_key].forked
    assert (info[A.public_key].heartbeat_seq, info[A.public_key].heartbeat_lamport) == (
        1, a1.lamport,
    )
    # What was placed at or below its last heartbeat before the fork stays where it was.
    assert r.frontier == a1.lamport
    assert final_prefix(r) == safe and r.ops()[: len(safe)] == [r.get(i) for i in safe]
    # Its heartbeats from the fork on no longer count: an order only A acknowledges stays
    # unplaced, and A is never asked for another heartbeat.
    late = r.submit(CAROL, "sell", 101, 1)
    after_fork = r.heartbeat(A)
    assert r.placement(late.id) is None and r.placement(after_fork.id) is None
    assert not r.needs_heartbeat(A.public_key) and r.needs_heartbeat(B.public_key)
    r.heartbeat(B)
    r.heartbeat(C)
    assert r.placement(late.id) is not None and r.frontier == a1.lamport  # stalled
    assert_sound(r)
    # A majority of the others removes A: finality resumes.
    keys = [B.public_key, C.public_key]
    r.reconfigure(B, keys, {C.public_key: r.approve_reconfig(C, keys)})
    r.heartbeat(B)
    r.heartbeat(C)
    assert r.frontier > a2.lamport
    assert all(r.is_final(o.id) for o in r.ops() if o.kind in ("order", "cancel"))
    assert r.final_fill_count() == r.fill_count
    assert_sound(r)


# -- fairness -----------------------------------------------------------------------------------


def test_the_order_inside_a_batch_is_neither_lamport_nor_id_order() -> None:
    """Concurrent orders placed in one batch sort by a rank their authors could not know:
    over many batches the op with the smallest id, or the smallest Lamport time, is not
    always first; the order is exactly the spec's (placement, rank, Lamport, id)."""
    batches = 40
    smallest_id_first = lowest_lamport_first = 0
    for n in range(batches):
        r = Replica(WMARKET)
        setup = r.submit(ALICE, "sell", 200, 1)
        r.heartbeat(A)  # places the setup order at 2
        anchor = r.get(r.heads()[0])
        assert anchor is not None
        traders = [Identity.from_seed(bytes([n, i]) * 16) for i in range(8)]
        concurrent = [
            order_op(t, WMARKET, [] if i % 2 else [anchor], OrderBody("buy", 90 + i, 1))
            for i, t in enumerate(traders)
        ]
        r.apply_many(op.raw for op in reversed(concurrent))
        r.heartbeat(B)  # one batch with all eight
        batch = [op for op in r.ops() if op in concurrent]
        assert len(batch) == 8 and len({r.placement(op.id) for op in batch}) == 1
        assert r.placement(setup.id) < r.placement(batch[0].id)  # type: ignore[operator]
        smallest_id_first += batch[0].id == min(op.id for op in concurrent)
        lowest_lamport_first += batch[0].lamport == 1
    # With a fair rank each is first about 1/8 resp. 1/2 of the time.
    assert 0 < smallest_id_first < batches // 2
    assert 0 < lowest_lamport_first < batches


def test_parents_in_the_batch_come_first() -> None:
    """A chain placed in one batch keeps its causal order (a child's rank is at least its
    parent's), whatever the hashes say."""
    for n in range(20):
        r = Replica(WMARKET)
        trader = Identity.from_seed(bytes([0xC0, n]) * 16)
        chain = [r.submit(trader, "buy", 90 + i, 1) for i in range(4)]
        others = [order_op(Identity.from_seed(bytes([0xD0, n, i, 0]) * 8), WMARKET,
                           [], OrderBody("sell", 110, 1)) for i in range(4)]
        r.apply_many(op.raw for op in others)
        r.heartbeat(C)
        positions = [r.ops().index(op) for op in chain]
        assert positions == sorted(positions)
        assert len({r.placement(op.id) for op in chain + others}) == 1


def test_batch_ranks_follow_the_spec_formula() -> None:
    """specs/finality.md section 4: seed(P) = SHA-256("crdtbook/batch/v2" || 0x00 || sorted
    heartbeat ids), rank(X) = uint64_be(SHA-256(seed(P) || X.id)[0:8]) (raised to its parents'
    in the batch). Two concurrent Lamport-1 orders and one heartbeat: the smallest case where
    the formula decides which order is the taker."""
    r = Replica(WMARKET)
    buy = order_op(Identity.from_seed(bytes([1]) * 32), WMARKET, [], OrderBody("buy", 100, 1))
    sell = order_op(Identity.from_seed(bytes([101]) * 32), WMARKET, [], OrderBody("sell", 100, 1))
    r.apply_many([buy.raw, sell.raw])
    beat_op = r.heartbeat(A)
    seed = hashlib.sha256(BATCH_DOMAIN + beat_op.id).digest()
    ranks = {op.id: int.from_bytes(hashlib.sha256(seed + op.id).digest()[:8], "big")
             for op in (buy, sell, beat_op)}
    first, second = sorted((buy, sell), key=lambda o: (ranks[o.id], o.lamport, o.id))
    assert [op.id for op in r.ops()[:2]] == [first.id, second.id]
    assert r.fills()[0].taker == second.id
    assert_total_order_by_spec(r)
    # The same on bigger batches, with chains inside the batch and several heartbeats.
    world = homes()
    for i, replica in enumerate(world):
        replica.submit(TRADERS[i], "buy" if i % 2 else "sell", 100, 2)
        replica.submit(TRADERS[i], "sell" if i % 2 else "buy", 101, 1)
    sync(world)
    quiesce(world)
    for replica in world:
        assert_total_order_by_spec(replica)


# -- markets without witnesses -----------------------------------------------------------------


def test_a_market_without_witnesses_is_never_final() -> None:
    r = Replica(PLAIN)
    sell = r.submit(ALICE, "sell", 100, 5)
    buy = r.submit(BOB, "buy", 100, 5)
    r.cancel(ALICE, sell.id)
    assert not PLAIN.witnessed and PLAIN.version == 1 and PLAIN.witnesses == ()
    assert not r.witnessed and r.fill_count == 1
    assert (r.frontier, r.final_count, r.final_fill_count(), r.epoch) == (0, 0, 0, 0)
    assert r.witnesses() == frozenset() and r.witness_status() == []
    assert all(not r.is_final(op.id) and r.placement(op.id) is None for op in r.ops())
    assert all(not o.final for o in r.orders())
    state = r.order(buy.id)
    assert state is not None and state.status == "filled" and not state.final
    assert r.final_book() == Book((), ())
    assert not r.needs_heartbeat(A.public_key)
    before = snapshot(r)
    with pytest.raises(BadWitness):
        r.heartbeat(A)
    with pytest.raises(BadWitness):
        r.approve_reconfig(A, [A.public_key])
    with pytest.raises(BadWitness):
        r.reconfigure(A, [A.public_key])
    with pytest.raises(ValueError):
        r.cancel_all(ALICE)
    assert snapshot(r) == before
    # Its digest is version 1's, byte for byte (specs/vectors/scenario.json pins it too).
    assert r.digest() == hashlib.sha256(_generator()._state_preimage(PLAIN, r)).digest()


def _generator() -> Any:
    path = Path(__file__).resolve().parents[2] / "specs" / "make_vectors.py"
    spec = importlib.util.spec_from_file_location("make_vectors_for_finality", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- quiescence -----------------------------------------------------------------------------------


def test_once_no_witness_needs_a_heartbeat_every_order_and_fill_is_final() -> None:
    """Heartbeats only while something is unacknowledged: when they stop, every op but the
    witnesses' own trailing heartbeats is final (those become final with the next round, or at
    once when the witnesses heartbeat from the same ops)."""
    world = homes()
    ra, rb, rc = world
    ra.submit(ALICE, "sell", 100, 5)
    rb.submit(BOB, "buy", 100, 2)
    rc.submit(CAROL, "buy", 101, 2)
    for step in range(3):
        world[step].heartbeat(GENESIS[step])  # one after the other, each seeing the last
        sync(world)
    quiesce(world)
    for r in world:
        assert not any(r.needs_heartbeat(w.public_key) for w in GENESIS)
        assert all(r.is_final(op.id) for op in r.ops() if op.kind != "heartbeat")
        assert r.final_fill_count() == r.fill_count == 2
        assert all(o.final for o in r.orders() if o.status not in ("open", "partially_filled"))
        tail = r.ops()[r.final_count:]
        assert all(op.kind == "heartbeat" and op.author in r.witnesses() for op in tail)
    # All three heartbeat from the same ops: one batch, and everything is final.
    clones = [Replica(WMARKET) for _ in GENESIS]
    for clone in clones:
        clone.apply_many(op.raw for op in ra.ops())
    beats = [clone.heartbeat(w) for clone, w in zip(clones, GENESIS, strict=True)]
    assert len({b.lamport for b in beats}) == 1
    for r in world:
        r.apply_many(b.raw for b in beats)
        assert r.final_count == len(r) and r.frontier == beats[0].lamport
        assert_sound(r)
    assert len({r.digest() for r in world}) == 1


def test_witnessed_time_is_the_batch_earliest_nonzero_heartbeat_time() -> None:
    r = Replica(WMARKET)
    order = r.submit(ALICE, "sell", 100, 5)
    clones = [Replica(WMARKET) for _ in GENESIS]
    for clone in clones:
        clone.apply(order.raw)
    beats = [clone.heartbeat(w, time_ms=t) for clone, w, t in
             zip(clones, GENESIS, (0, 1_700_000_000_500, 1_700_000_000_200), strict=True)]
    assert r.witnessed_time(order.id) is None
    r.apply_many(b.raw for b in beats)
    assert r.witnessed_time(order.id) == 1_700_000_000_200 and r.is_final(order.id)
    assert Replica(PLAIN).witnessed_time(order.id) is None
    with pytest.raises(ValueError):
        r.heartbeat(A, time_ms=-1)


# -- the codec ------------------------------------------------------------------------------------


def _hand_signed(version: int, market_id: bytes, wire_body: list[Any], identity: Identity = A
                 ) -> bytes:
    payload = cbor2.dumps([version, market_id, identity.public_key, 1, 1, [], wire_body],
                          canonical=True)
    signature = identity.sign(SIGNATURE_DOMAINS.get(version, SIGNATURE_DOMAIN) + payload)
    return b"\x88" + payload[1:] + b"\x58\x40" + signature


def test_heartbeat_and_reconfiguration_round_trip_through_the_codec() -> None:
    r = Replica(WMARKET)
    r.submit(ALICE, "sell", 100, 5)
    beat_op = r.heartbeat(A, time_ms=1_700_000_000_123)
    keys = sorted([A.public_key, B.public_key])
    reconfig = r.reconfigure(A, keys, {B.public_key: r.approve_reconfig(B, keys)})
    for op in (beat_op, reconfig, sign_op(C, WMARKET.id, 1, 1, (), HeartbeatBody(), 2)):
        decoded = decode(op.raw)
        assert encode(decoded) == op.raw == encode(op)
        assert decoded.id == op.id == hashlib.sha256(op.raw).digest()
        assert (decoded.version, decoded.kind, decoded.body) == (2, op.kind, op.body)
        assert (decoded.author, decoded.seq, decoded.lamport, decoded.parents) == (
            op.author, op.seq, op.lamport, op.parents,
        )
    assert beat_op.body == HeartbeatBody(1_700_000_000_123) and beat_op.kind == "heartbeat"
    body = reconfig.body
    assert isinstance(body, ReconfigBody) and reconfig.kind == "reconfig"
    assert body.epoch == 1 and body.witnesses == tuple(keys)
    assert [k for k, _ in body.approvals] == [B.public_key]
    assert all(check_approval(WMARKET.id, 1, keys, k, s) for k, s in body.approvals)
    # The wire bodies are [2, time_ms] and [3, epoch, witnesses, approvals].
    assert cbor2.loads(beat_op.raw)[6] == [2, 1_700_000_000_123]
    assert cbor2.loads(reconfig.raw)[6] == [3, 1, keys, [list(a) for a in body.approvals]]


@pytest.mark.parametrize(
    "wire_body",
    [[2, 0], [2], [3, 1, [bytes(32)], []], [4, None]],
    ids=["heartbeat", "heartbeat-no-time", "reconfig", "cancel-all"],
)
def test_version_2_bodies_in_a_version_1_op_are_unknown_kinds(wire_body: list[Any]) -> None:
    raw = _hand_signed(1, PLAIN.id, wire_body)
    with pytest.raises(UnknownKind):
        decode(raw)
    r = Replica(PLAIN)
    with pytest.raises(UnknownKind):
        r.apply(raw)
    assert len(r) == 0


def test_sign_op_refuses_a_heartbeat_in_version_1() -> None:
    with pytest.raises(UnknownKind):
        sign_op(A, PLAIN.id, 1, 1, (), HeartbeatBody(), 1)


def test_ops_of_the_other_version_are_for_another_market() -> None:
    v2_in_v1 = sign_op(ALICE, PLAIN.id, 1, 1, (), OrderBody("buy", 100, 1), 2)
    v1_in_v2 = sign_op(ALICE, WMARKET.id, 1, 1, (), OrderBody("buy", 100, 1), 1)
    v2 = sign_op(ALICE, WMARKET.id, 1, 1, (), OrderBody("buy", 100, 1), 2)
    v1 = sign_op(ALICE, PLAIN.id, 1, 1, (), OrderBody("buy", 100, 1), 1)
    for market, op in ((PLAIN, v2_in_v1), (WMARKET, v1_in_v2), (PLAIN, v2), (WMARKET, v1)):
        r = Replica(market)
        with pytest.raises(WrongMarket):
            r.precheck(op)
        with pytest.raises(WrongMarket):
            r.apply(op.raw)
        with pytest.raises(WrongMarket):  # refused again, the same way
            r.apply(op.raw)
        assert len(r) == 0 and r.apply_many([v1 if market is PLAIN else v2]).applied
    # A version-2 signature never verifies as version 1's: the domains differ.
    relabelled = bytearray(v2.raw)
    assert relabelled[1] == 2
    relabelled[1] = 1
    with pytest.raises(InvalidOp):
        decode(bytes(relabelled))


# -- market definitions -------------------------------------------------------------------------


def test_a_witnessed_market_spec_round_trips() -> None:
    keys = [C.public_key, A.public_key, B.public_key]
    market = Market("FIN", "1.0", "1", witnesses=[k.hex() for k in keys])
    assert market.witnessed and market.version == 2
    assert market.witnesses == tuple(sorted(keys))
    assert market.spec == "FIN:1:1:" + ",".join(k.hex() for k in sorted(keys))
    parsed = Market.parse(market.spec)
    assert parsed == market and parsed.id == market.id and parsed.witnesses == market.witnesses
    assert Market.parse(" " + market.spec + " ") == market
    assert market == Market("FIN", "1", "1", witnesses=keys)  # bytes or hex, any order
    assert market.id == hashlib.sha256(
        cbor2.dumps(["crdtbook/market/v2", "FIN", "1", "1", sorted(keys)], canonical=True)
    ).digest()
    plain = Market("FIN", "1", "1")
    assert market.id != plain.id and plain.spec == "FIN:1:1" and Market.parse(plain.spec) == plain
    assert Market("FIN", "1", "1", witnesses=keys[:2]).id != market.id
    assert Market("FIN", "1", "1", witnesses=[*keys, D.public_key]).id != market.id
    assert Market.parse(WMARKET.spec) == WMARKET


@pytest.mark.parametrize(
    "spec",
    [
        "FIN:1:1:",
        "FIN:1:1:zz",
        "FIN:1:1:" + "ab" * 31,
        "FIN:1:1:" + ",".join([A.public_key.hex()] * 2),
        "FIN:1:1:" + ",".join(Identity.from_seed(bytes([i]) * 32).public_key.hex()
                              for i in range(11)),
    ],
    ids=["none", "not-hex", "31-bytes", "twice", "eleven"],
)
def test_bad_witness_lists_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        Market.parse(spec)
