"""Points, attestations and joins from a point state (specs/finality.md section 13).

The twin machine in test_compaction_stateful.py checks that compacting, restarting and joining
change nothing a replica shows; these tests check the trust around a join: every replica at a
point writes the same bytes, witnesses attest them, and a joiner refuses a foreign, damaged,
forged, stale or unattested point state and history that does not chain to the point.
"""

from __future__ import annotations

import random
from contextlib import suppress
from typing import Any

import cbor2
import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from witnessed import (
    ADVERSARIES,
    GENESIS,
    TRADERS,
    WMARKET,
    cut_healed_one_way,
    witnessed_market,
)

from crdtbook import (
    WITNESSED_VERSION,
    HeartbeatBody,
    HistoryCheck,
    Op,
    OrderBody,
    Replica,
    SnapshotRefused,
    check_attested,
    read_point,
)
from crdtbook._ops import sign_op

INTERVAL = 50


class _Archive:
    def __init__(self) -> None:
        self.ops: dict[bytes, Op] = {}

    def get(self, ident: bytes) -> Op | None:
        return self.ops.get(ident)


class _Node:
    """A replica with its store: the archive of what it compacted, and the prefix in order."""

    def __init__(self) -> None:
        self.archive = _Archive()
        self.replica = Replica(WMARKET, archive=self.archive, point_interval=INTERVAL)
        self.prefix: list[bytes] = []  # op ids of the compacted prefix, in total order
        self.bodies: dict[bytes, Op] = {}

    def compact(self) -> None:
        held = dict(self.replica.applied_index)
        self.bodies.update(held)
        report = self.replica.compact()
        assert report.order_start == len(self.prefix)
        self.prefix += report.order
        for ident in report.ops:
            self.archive.ops[ident] = held[ident]


def _world(steps: int, seed: int) -> tuple[list[_Node], list[Op]]:
    """Three witness nodes given the same ops in different orders, heartbeating often."""
    rng = random.Random(seed)
    author = Replica(WMARKET)
    ops: list[Op] = []
    for step in range(steps):
        if step % 7 == 6:
            ops.append(author.heartbeat(GENESIS[step % 3]))
        else:
            ops.append(author.submit(rng.choice(TRADERS), rng.choice(("buy", "sell")),
                                     rng.randint(97, 103), rng.randint(1, 4)))
    for witness in GENESIS:  # so that everything is final
        ops.append(author.heartbeat(witness))
    for witness in GENESIS:
        ops.append(author.heartbeat(witness))
    nodes = []
    for i in range(3):
        node = _Node()
        shuffled = list(ops)
        # Any causally valid order: apply_many keeps what waits for parents.
        random.Random(seed * 10 + i).shuffle(shuffled)
        node.replica.apply_many(op.raw for op in shuffled)
        assert node.replica.pending_count == 0
        node.compact()
        nodes.append(node)
    return nodes, ops


def test_every_replica_at_a_point_writes_the_same_point_state() -> None:
    nodes, _ = _world(400, seed=1)
    blobs = {node.replica.snapshot() for node in nodes}
    assert len(blobs) == 1
    info = read_point(WMARKET, blobs.pop())
    assert info.n >= 300 and info == nodes[0].replica.point
    assert len(info.kept) < 200  # not the history


def _attest(nodes: list[_Node], witnesses: int) -> list[Op]:
    """``witnesses`` of the three sign a heartbeat at their own node after compacting."""
    return [nodes[i].replica.heartbeat(GENESIS[i]) for i in range(witnesses)]


def test_a_point_a_majority_of_witnesses_attests_otherwise_is_disputed() -> None:
    """A replica whose point state differs from the one a strict majority of the witnesses in
    force attest has derived something they did not (seen at a witness removed while it still
    ran: its late heartbeat counted at itself, and its compaction made that for good, digest
    apart from every other node's, nothing said). ``disputed_point`` names it (a node logs it
    once at ERROR: tests/node/test_finality.py)."""
    nodes, _ = _world(300, seed=3)
    a = nodes[0].replica
    point = a.point
    assert point is not None and a.disputed_point() is None
    other = bytes(32)

    def lie(i: int) -> Op:
        return nodes[i].replica._author(GENESIS[i], HeartbeatBody(0, point.n, other))

    a.apply(lie(1).raw)
    assert a.disputed_point() is None  # one of three
    a.apply(nodes[2].replica.heartbeat(GENESIS[2]).raw)  # attests a's own hash
    assert a.disputed_point() is None
    a.apply(lie(2).raw)
    assert a.disputed_point() == (point.n, other)  # two of three
    assert nodes[1].replica.disputed_point() is None  # its own hash is not in dispute there


def test_witnesses_attest_their_point_and_a_majority_is_needed() -> None:
    nodes, _ = _world(300, seed=2)
    blob = nodes[0].replica.snapshot()
    info = read_point(WMARKET, blob)
    beats = _attest(nodes, 3)
    assert all((b.body.point, b.body.point_hash) == (info.n, info.hash) for b in beats)
    for beat in beats:
        nodes[0].replica.apply(beat.raw)
    assert {b.author for b in nodes[0].replica.attesting(info.n, info.hash)} == {
        w.public_key for w in GENESIS
    }
    assert check_attested(WMARKET, blob, [b.raw for b in beats[:2]], []) == info
    # A trader's heartbeat "attesting" the point is applied (as any heartbeat) and counts nil.
    fake = sign_op(TRADERS[0], WMARKET.id, 1, 1, (), HeartbeatBody(0, info.n, info.hash),
                   version=WITNESSED_VERSION)
    nodes[0].replica.apply(fake.raw)
    assert fake.author not in {b.author for b in nodes[0].replica.attesting(info.n, info.hash)}
    with pytest.raises(SnapshotRefused):
        check_attested(WMARKET, blob, [beats[0].raw, fake.raw], [])
    with pytest.raises(SnapshotRefused) as refused:
        check_attested(WMARKET, blob, [beats[0].raw], [])
    assert refused.value.reason == "unattested"
    # One witness's heartbeat twice is still one witness; a trader's "attestation" counts nil.
    with pytest.raises(SnapshotRefused):
        check_attested(WMARKET, blob, [beats[0].raw, beats[0].raw], [])


def _refit(blob: bytes, change: str) -> bytes:
    """``blob`` with one field changed and its checksum recomputed (a forger's blob)."""
    fields = cbor2.loads(blob)
    del fields["sha256"]
    if change == "book":
        fields["engine"]["orders"][0][1] += 1  # one more lot resting
    else:
        fields["counts"][1] += 1
    from crdtbook._snapshot import _checksum

    fields["sha256"] = _checksum(fields)
    return bytes(cbor2.dumps(fields, canonical=True))


def test_a_forged_damaged_foreign_or_stale_point_state_is_refused() -> None:
    nodes, _ = _world(300, seed=3)
    blob = nodes[0].replica.snapshot()
    info = read_point(WMARKET, blob)
    beats = [b.raw for b in _attest(nodes, 3)]
    for change in ("book", "counts"):
        forged = _refit(blob, change)
        read_point(WMARKET, forged)  # well formed: only the attestations tell
        with pytest.raises(SnapshotRefused) as refused:
            check_attested(WMARKET, forged, beats, [])
        assert refused.value.reason == "unattested"
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 1
    with pytest.raises(SnapshotRefused) as refused:
        check_attested(WMARKET, bytes(damaged), beats, [])
    assert refused.value.reason == "damaged"
    other = witnessed_market(*GENESIS, name="OTHER")
    with pytest.raises(SnapshotRefused) as refused:
        check_attested(other, blob, beats, [])
    assert refused.value.reason == "foreign"
    with pytest.raises(SnapshotRefused) as refused:
        check_attested(WMARKET, blob, beats, [], want=(info.n + 50, info.hash))
    assert refused.value.reason == "stale"
    for junk in (b"", b"\xa0", b"\xff" * 40):
        with pytest.raises(SnapshotRefused):
            read_point(WMARKET, junk)


def test_history_is_checked_against_the_points_chain() -> None:
    nodes, _ = _world(300, seed=4)
    node = nodes[0]
    info = read_point(WMARKET, node.replica.snapshot())
    history = [node.bodies[i].raw for i in node.prefix]
    check = HistoryCheck(info)
    for raw in history:
        check.feed(raw)
    check.done()
    for bad in (history[:-1], history[1:], history[:10] + history[11:10:-1] + history[11:],
                [history[0][:-1] + bytes([history[0][-1] ^ 1]), *history[1:]]):
        check = HistoryCheck(info)
        with pytest.raises(SnapshotRefused) as refused:
            for raw in bad:
                check.feed(raw)
            check.done()
        assert refused.value.reason == "forged"


def test_a_joiner_from_an_attested_point_equals_a_full_replica() -> None:
    """A node joins from node 0's point state and live ops, then takes everything after: the
    same digest as the nodes that hold all. An adversary's op naming an old compacted parent
    waits for the history, which the joiner fetches and checks, then applies it."""
    nodes, ops = _world(400, seed=5)
    source = nodes[0]
    blob = source.replica.snapshot()
    beats = _attest(nodes, 2)
    info = check_attested(WMARKET, blob, [b.raw for b in beats], [])
    kept = [source.replica.applied_index[i].raw for i in info.kept]
    live = [op.raw for op in source.replica.ops()]
    archive = _Archive()
    joiner = Replica.from_snapshot(WMARKET, blob, kept + live, archive=archive,
                                   point_interval=INTERVAL, history=False)
    full = Replica(WMARKET)
    full.apply_many(op.raw for op in ops)
    for beat in beats:
        full.apply(beat.raw)
        joiner.apply(beat.raw)
    assert joiner.digest() == full.digest() and joiner.pending_count == 0
    assert joiner.history_wanted == 0 and not joiner.has_history

    # An adversary's order naming the first op of the history as its parent (valid: any op).
    old = ops[0]
    body = OrderBody("sell", 99, 2, "gtc", None, "expire_maker")
    bad = sign_op(ADVERSARIES[0], WMARKET.id, 1, old.lamport + 1, (old.id,), body,
                  version=WITNESSED_VERSION)
    full.apply(bad.raw)
    joiner.apply(bad.raw)
    assert joiner.pending_count == 1 and joiner.missing() == [old.id]
    joiner.apply(old.raw)  # sync brings the parent: a prefix op, so it waits for the history
    assert joiner.history_wanted == 1 and joiner.history_held == 1
    # A copy of a prefix op nothing waits for is held, and asks for no history.
    joiner.apply(ops[1].raw)
    assert joiner.history_held == 2 and joiner.history_wanted == 1
    check = HistoryCheck(info)
    for ident in source.prefix:
        check.feed(source.bodies[ident].raw)
    check.done()
    archive.ops.update((i, source.bodies[i]) for i in source.prefix)
    joiner.history_complete()
    assert joiner.history_wanted == 0 and joiner.pending_count == 0 and joiner.has_history
    assert joiner.digest() == full.digest()


def test_a_replica_that_forgets_its_history_holds_what_needs_it_until_it_is_back() -> None:
    """A node that prunes its store (drops old compacted ops): what its archive still holds is
    used, an op naming a pruned op waits for the history, and all is as before once it is
    back."""
    nodes, ops = _world(300, seed=6)
    node = nodes[0]
    replica, archive = node.replica, node.archive
    pruned = {i: archive.ops.pop(i) for i in node.prefix[:100] if i in archive.ops}
    assert pruned
    replica.forget_history()
    assert not replica.has_history
    old = next(op for op in ops if op.id in pruned and op.body.kind == "order")
    body = OrderBody("buy", 98, 1, "gtc", None, "expire_maker")
    late = sign_op(ADVERSARIES[1], WMARKET.id, 1, old.lamport + 1, (old.id,), body,
                   version=WITNESSED_VERSION)
    full = Replica(WMARKET)
    full.apply_many(op.raw for op in ops)
    full.apply(late.raw)
    replica.apply(late.raw)
    assert replica.missing() == [old.id]
    replica.apply(old.raw)  # a peer sends the pruned parent: it waits for the history
    assert replica.history_wanted == 1
    kept_copy = ops[-1]  # a copy of an op the archive still holds is known at once
    assert replica.apply(kept_copy.raw) == [] and replica.history_held == 1
    archive.ops.update(pruned)
    replica.history_complete()
    assert replica.has_history and replica.pending_count == 0
    assert replica.digest() == full.digest()


def test_an_op_whose_present_parent_is_pruned_while_it_waits_waits_for_it() -> None:
    """An op waits for one parent while another is compacted (present, in the archive); the
    node prunes that one, then the first arrives. Before: the op was listed under neither and
    waited for good, and with it every later op descending from it (a pruned witness, stuck
    after fetching its history back). Now it waits for the pruned parent: sync names it, the
    history brings it, and the op applies."""
    nodes, ops = _world(300, seed=6)
    node = nodes[0]
    replica, archive = node.replica, node.archive
    old = next(op for op in ops if op.id in node.prefix[:100] and op.body.kind == "order")
    tip = ops[-1]
    first = sign_op(ADVERSARIES[0], WMARKET.id, 1, tip.lamport + 1, (tip.id,),
                    OrderBody("sell", 103, 1, "gtc", None, "expire_maker"),
                    version=WITNESSED_VERSION)
    child = sign_op(ADVERSARIES[1], WMARKET.id, 1, first.lamport + 1, (old.id, first.id),
                    OrderBody("buy", 97, 1, "gtc", None, "expire_maker"),
                    version=WITNESSED_VERSION)
    full = Replica(WMARKET)
    full.apply_many(op.raw for op in [*ops, first, child])

    replica.apply(child.raw)
    assert replica.missing() == [first.id]  # ``old`` is compacted: present
    pruned = {i: archive.ops.pop(i) for i in node.prefix[:100] if i in archive.ops}
    replica.forget_history()
    replica.apply(first.raw)
    assert replica.pending_count == 1
    assert replica.missing() == [old.id]
    replica.apply(old.raw)  # sync brings it: a prefix op, so it waits for the history
    assert replica.history_wanted == 1
    archive.ops.update(pruned)
    replica.history_complete()
    assert replica.pending_count == 0 and replica.missing() == []
    assert replica.digest() == full.digest()


def test_a_cut_off_witness_finalises_its_own_ops_that_only_it_holds() -> None:
    """Witness a, cut off from b and c, signs orders and heartbeats; b and c heartbeat higher
    without them. a's ops are then final at a (their placement is a's heartbeat, the frontier
    passed it) though only a holds them: ``first_unacknowledged_compacted`` names the first of
    them, which a must not prune, nor anything after it (a node
    that did lost them for good, and every later op of a's waited for ever everywhere), until
    b and c have them and heartbeat."""
    a_key, b_key = (w.public_key for w in GENESIS[:2])
    archive = _Archive()
    a = Replica(WMARKET, archive=archive, point_interval=INTERVAL)
    b, c = Replica(WMARKET), Replica(WMARKET)
    for i in range(INTERVAL + 10):  # a alone: its orders and heartbeats
        a.submit(TRADERS[0] if i % 3 else GENESIS[0], "buy", 97, 1)
        if i % 5 == 0:
            a.heartbeat(GENESIS[0])
    assert a.acknowledged_seq(a_key) == 0
    assert a.first_unacknowledged_compacted(a_key) is None  # nothing compacted
    for _ in range(2 * INTERVAL):  # b and c, among themselves: higher Lamport times
        op = b.submit(TRADERS[1], "sell", 105, 1)
        c.apply(op.raw)
    for replica, witness in ((b, GENESIS[1]), (c, GENESIS[2])):
        replica.heartbeat(witness)
    # The cut heals one way first: a gets all of b's and c's (sync), they have none of a's.
    for op in b.ops() + c.ops():
        a.apply(op.raw)
    a.heartbeat(GENESIS[0])
    assert a.final_count > INTERVAL  # a's own ops are final at a
    held = dict(a.applied_index)
    everything = a.ops()
    report = a.compact()
    assert report.ops
    archive.ops.update((ident, held[ident]) for ident in report.ops)
    assert a.acknowledged_seq(a_key) == 0
    first = a.first_unacknowledged_compacted(a_key)  # b and c never had them
    assert first is not None and first in archive.ops
    # The lowest compacted one (seq 1, an order still resting, stays in memory: live).
    assert archive.ops[first].seq == min(
        op.seq for op in archive.ops.values() if op.author == a_key
    )
    assert b.acknowledged_seq(b_key) is not None
    # The cut heals: b and c get a's ops and heartbeat; now both hold every one of them.
    for op in everything:
        b.apply(op.raw)
        c.apply(op.raw)
    b_beat, c_beat = b.heartbeat(GENESIS[1]), c.heartbeat(GENESIS[2])
    a.apply(b_beat.raw)
    assert a.first_unacknowledged_compacted(a_key) == first  # c has not heartbeat yet
    a.apply(c_beat.raw)
    assert a.first_unacknowledged_compacted(a_key) is None
    assert a.acknowledged_seq(a_key) == a.author_seqs()[a_key]


def test_the_acknowledgement_walks_read_each_compacted_op_back_once() -> None:
    """After a cut heals one way, the walks behind ``first_unacknowledged_compacted`` cross
    every op of the cut, most of them compacted. Each was read back from the archive about six
    times (once per child for its Lamport time, once when reached, again for each other
    witness): 110,000 reads for 19,000 compacted ops, 3.9 s on a node's event loop (a read is
    a SQLite query and a decode). Now once each for all the walks of one call."""
    a_key = GENESIS[0].public_key
    a, archive = cut_healed_one_way(INTERVAL, 8 * INTERVAL, INTERVAL)
    assert len(archive.ops) > 4 * INTERVAL
    first = a.first_unacknowledged_compacted(a_key)
    assert first is not None and archive.ops[first].author == a_key
    assert archive.reads and max(archive.reads.values()) == 1
    assert len(archive.reads) <= len(archive.ops)


def _mutate(value: Any, path: list[int], new: Any) -> Any:
    """``value`` (decoded CBOR) with the leaf reached by ``path`` (indexes taken modulo each
    container's size) replaced by ``new``."""
    if not path or not isinstance(value, (list, dict)) or not value:
        return new
    if isinstance(value, dict):
        keys = sorted(value, key=repr)
        key = keys[path[0] % len(keys)]
        return {**value, key: _mutate(value[key], path[1:], new)}
    index = path[0] % len(value)
    return [*value[:index], _mutate(value[index], path[1:], new), *value[index + 1:]]


_BLOB_CACHE: dict[str, tuple[bytes, list[bytes], list[bytes]]] = {}


def _valid_point() -> tuple[bytes, list[bytes], list[bytes]]:
    if "point" not in _BLOB_CACHE:
        nodes, _ = _world(150, seed=8)
        replica = nodes[0].replica
        blob = replica.snapshot()
        kept = [replica.applied_index[i].raw for i in read_point(WMARKET, blob).kept]
        beats = [b.raw for b in _attest(nodes, 3)]
        _BLOB_CACHE["point"] = (blob, kept, beats)
    return _BLOB_CACHE["point"]


@settings(max_examples=150, deadline=None)
@given(
    path=st.lists(st.integers(0, 50), min_size=1, max_size=5),
    new=st.one_of(st.none(), st.integers(-(2**70), 2**70), st.binary(max_size=40),
                  st.text(max_size=5), st.lists(st.integers(), max_size=3),
                  st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
)
def test_a_point_state_changed_anywhere_is_refused_with_a_value_error(path: list[int],
                                                                      new: Any) -> None:
    """A well-formed blob (checksum recomputed) with any field changed: reading, checking
    attestations and restoring from it raise ValueError (SnapshotRefused) or work; nothing
    else escapes."""
    blob, kept, beats = _valid_point()
    fields = cbor2.loads(blob)
    del fields["sha256"]
    fields = _mutate(fields, path, new)
    if not isinstance(fields, dict):
        fields = {"junk": fields}
    from crdtbook._snapshot import _checksum

    fields["sha256"] = _checksum(fields)
    changed = bytes(cbor2.dumps(fields, canonical=True))
    if changed == blob:
        return  # the value was already that
    with suppress(ValueError):
        read_point(WMARKET, changed)
    with pytest.raises(SnapshotRefused):  # the witnesses attested the other bytes
        check_attested(WMARKET, changed, beats, [])
    with suppress(ValueError):
        Replica.from_snapshot(WMARKET, changed, kept, archive=None, point_interval=INTERVAL,
                              history=False)


def test_a_restart_keeps_the_frontier_a_waiting_reconfiguration_held() -> None:
    """A pruned replica holds a reconfiguration for its history, its frontier held where it was
    (``frontier_cap``). A restart replays the ops after the point in Lamport order and meets the
    reconfiguration before later heartbeats that had arrived sooner: the frontier it holds then
    is lower, and ops shown final before the restart would read provisional until the history
    is back. ``hold_frontier_at`` (the node keeps the cap in its store) puts it back."""
    nodes, _ = _world(300, seed=4)
    a, b, c = (node.replica for node in nodes)
    a.forget_history()
    keys = sorted(w.public_key for w in GENESIS[:2])  # GENESIS[2] removed
    approvals = {GENESIS[0].public_key: b.approve_reconfig(GENESIS[0], keys)}
    removal = b.reconfigure(GENESIS[1], keys, approvals)
    # Before the removal reaches a: orders and heartbeats of every witness from c, later in
    # Lamport time than the removal.
    more = [c.submit(TRADERS[0], "buy", 99, 1) for _ in range(30)]
    beats = [c.heartbeat(w) for w in GENESIS] + [c.heartbeat(w) for w in GENESIS]
    for op in more + beats:
        a.apply(op)
    assert min(beat.lamport for beat in beats) > removal.lamport
    assert a.apply(removal) == [] and a.reconfiguration_waits_for_history()
    cap = a.frontier_cap
    assert cap is not None and cap == a.frontier
    shown = a.final_count
    held = [removal, *a.ops()]
    kept = [nodes[0].archive.ops.get(i) or a.applied_index[i] for i in a.point.kept]

    def restart() -> Replica:
        again = Replica.from_snapshot(
            WMARKET, a.snapshot(), [op.raw for op in kept + held], archive=nodes[0].archive,
            point_interval=INTERVAL, history=False,
        )
        assert again.reconfiguration_waits_for_history() and removal.id not in again
        return again

    again = restart()
    assert again.frontier < cap and again.final_count < shown  # the limit
    again.hold_frontier_at(cap)
    assert again.frontier == cap and again.final_count == shown
    assert again.frontier_cap == cap
    again.hold_frontier_at(cap - 1)  # never lowers it
    assert again.frontier == cap
    # Nothing waits: a cap given is ignored (the frontier is the witnesses' alone).
    fresh = Replica(WMARKET)
    fresh.hold_frontier_at(10**9)
    assert fresh.frontier_cap is None and fresh.frontier == 0


def test_a_full_history_wait_evicts_other_ops_before_a_reconfiguration() -> None:
    """Ops held for the history are bounded (``max_pending``), oldest first, but a waiting
    reconfiguration goes last: it holds finality (``frontier_cap``), and a flood of other ops
    needing the history (here copies of prefix ops) must not lift that. Evicted ids are handed
    to the node (``take_evicted``), which deletes them from its store; held ops count as known
    (``knows``: sync does not fetch or verify them again)."""
    nodes, _ = _world(300, seed=4)
    a, b = nodes[0].replica, nodes[1].replica
    for ident in nodes[0].prefix[:6]:  # pruned: the archive no longer holds them
        nodes[0].archive.ops.pop(ident, None)
    a.forget_history()
    a.max_pending = 3
    keys = sorted(w.public_key for w in GENESIS[:2])
    approvals = {GENESIS[0].public_key: b.approve_reconfig(GENESIS[0], keys)}
    removal = b.reconfigure(GENESIS[1], keys, approvals)
    a.apply(removal)
    cap = a.frontier_cap
    assert cap is not None and a.waits_for_history(removal.id) and a.knows(removal.id)
    copies = [nodes[0].bodies[i] for i in nodes[0].prefix[:6] if i not in a]
    assert len(copies) >= 5
    a.take_evicted()
    for op in copies:
        a.apply(op)
    assert a.waiting_reconfigurations() == [removal.id] and a.frontier_cap == cap
    assert a.history_held == 3
    assert a.take_evicted() == [op.id for op in copies[: len(copies) - 2]]


def test_finality_does_not_advance_while_a_reconfiguration_waits_for_the_history() -> None:
    """At a replica without its history a reconfiguration waits for it (its rules walk into
    the prefix). Meanwhile finality there counted the witness set without it, heartbeats of
    a witness it removes included: pruned nodes holding the removal of a witness that was
    paused, not gone, showed other fills final than every other node (fault campaign). The
    frontier now stays where it was until the reconfiguration applies."""
    nodes, _ = _world(300, seed=4)
    a, b = nodes[0].replica, nodes[1].replica
    a.forget_history()
    keys = sorted(w.public_key for w in GENESIS[:2])  # GENESIS[2] removed
    approvals = {GENESIS[0].public_key: b.approve_reconfig(GENESIS[0], keys)}
    removal = b.reconfigure(GENESIS[1], keys, approvals)
    assert a.apply(removal) == [] and a.reconfiguration_waits_for_history()
    before = a.frontier
    # Ops and heartbeats that do not know the removal (signed at a third replica), the
    # removed witness's among them: without the cap they move the frontier here.
    c = nodes[2].replica
    more = [c.submit(TRADERS[0], "buy", 99, 1) for _ in range(5)]
    beats = [c.heartbeat(w) for w in GENESIS] + [c.heartbeat(w) for w in GENESIS]
    for op in more + beats:
        a.apply(op)
    assert a.frontier == before
    a.history_complete()  # the history is back: the removal applies, the cap goes
    assert removal.id in a and a.epoch == 1 and not a.reconfiguration_waits_for_history()
    assert a._fin is not None and a._fin.cap is None
