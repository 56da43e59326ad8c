"""A stateful model of a small network: authors bound to replicas, random submits (all TIFs),
cancels of live and of finished orders, one key signing at two replicas (equivocation), partial
exchanges of ops (random subset, random order, as bytes), forged invalid ops, and late joiners.

After every step, each replica that changed is checked against derivation from scratch, against
the reference matcher and against the book invariants; after a full exchange every replica has
the same digest (and at teardown everything is exchanged once more and must converge). A replica
may restart at any step: restored from its checkpoint, it goes on with an undo floor.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from strategies import (
    AUTHORS,
    MARKET,
    PRICES,
    QUANTITIES,
    SIDES,
    TIFS,
    assert_invariants,
    assert_matches_reference,
    assert_scratch_equal,
    deliver,
    examples,
    exchange_all,
    home,
    union_ops,
)

from crdtbook import BadCancel, BadLamport, BadSequence, InvalidOp, Op, Replica
from crdtbook._ops import OrderBody, sign_op

N_REPLICAS = 3
N_AUTHORS = 4
MAX_REPLICAS = 5

author_ix = st.integers(0, N_AUTHORS - 1)
replica_ix = st.integers(0, MAX_REPLICAS - 1)


class Network(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.world: list[Replica] = [Replica(MARKET) for _ in range(N_REPLICAS)]
        self.signed: dict[bytes, Op] = {}
        self.dirty: set[int] = set(range(N_REPLICAS))
        self.converged = False

    # -- helpers ---------------------------------------------------------------------------

    def replica(self, index: int) -> tuple[int, Replica]:
        index %= len(self.world)
        return index, self.world[index]

    def touched(self, index: int) -> None:
        self.dirty.add(index)
        self.converged = False

    def equivocated(self, author: int) -> bool:
        key = AUTHORS[author].public_key
        seqs = Counter(op.seq for op in self.signed.values() if op.author == key)
        return any(n > 1 for n in seqs.values())

    def record(self, op: Op) -> None:
        self.signed[op.id] = op

    # -- rules -----------------------------------------------------------------------------

    @rule(
        author=author_ix,
        side=st.sampled_from(SIDES),
        price=PRICES,
        quantity=QUANTITIES,
        tif=st.sampled_from(TIFS),
    )
    def submit(self, author: int, side: str, price: int, quantity: int, tif: str) -> None:
        at, replica = self.replica(home(author, N_REPLICAS))
        before = len(replica)
        op = replica.submit(AUTHORS[author], side, price, quantity, tif)
        self.record(op)
        assert len(replica) == before + 1 and replica.ops()[-1] == op  # sorts last where signed
        state = replica.order(op.id)
        assert state is not None and state.quantity == quantity
        if tif == "post_only":
            assert state.filled == 0
        self.touched(at)

    @rule(
        orders=st.lists(
            st.tuples(author_ix, st.sampled_from(SIDES), PRICES, QUANTITIES, st.sampled_from(TIFS)),
            min_size=2,
            max_size=6,
        )
    )
    def burst(self, orders: list[tuple[int, str, int, int, str]]) -> None:
        """Several authors submit at their home replicas before anyone exchanges."""
        for author, side, price, quantity, tif in orders:
            self.submit(author, side, price, quantity, tif)

    @rule(
        author=author_ix,
        at=replica_ix,
        side=st.sampled_from(SIDES),
        price=PRICES,
        quantity=QUANTITIES,
        tif=st.sampled_from(TIFS),
    )
    def submit_elsewhere(
        self, author: int, at: int, side: str, price: int, quantity: int, tif: str
    ) -> None:
        """The same key signs at another replica: equivocation unless that replica is current."""
        at, replica = self.replica(at)
        self.record(replica.submit(AUTHORS[author], side, price, quantity, tif))
        if self.equivocated(author):
            event("a key signed two ops with one sequence number")
        self.touched(at)

    @rule(author=author_ix, at=st.none() | replica_ix, pick=st.integers(0, 50))
    def cancel_live(self, author: int, at: int | None, pick: int) -> None:
        at, replica = self.replica(home(author, N_REPLICAS) if at is None else at)
        key = AUTHORS[author].public_key
        live = [o for o in replica.orders(key) if o.status in ("open", "partially_filled")]
        if not live:
            return
        target = live[pick % len(live)]
        digest = replica.digest()
        try:
            op = replica.cancel(AUTHORS[author], target.id)
        except BadCancel:
            # Only an order on another branch of an equivocating key's history is out of reach.
            assert self.equivocated(author)
            assert replica.digest() == digest
            event("cancel of an order on another branch refused")
            return
        self.record(op)
        assert replica.cancel_effective(op.id) is True
        state = replica.order(target.id)
        assert state is not None
        assert (state.status, state.reason, state.remaining) == ("cancelled", "cancelled", 0)
        assert state.closed == target.closed + target.remaining
        self.touched(at)

    @rule(author=author_ix, at=replica_ix, price=PRICES, tif=st.sampled_from(("gtc", "post_only")))
    def fork_then_cancel_across(self, author: int, at: int, price: int, tif: str) -> None:
        """The key signs an order at another replica, that replica's ops reach the key's home
        replica, and the key tries to cancel the order from home. If home's history of the key
        forked, the order may be on the other branch: BadCancel, nothing changes."""
        at, elsewhere = self.replica(at)
        home_at, home_replica = self.replica(home(author, N_REPLICAS))
        identity = AUTHORS[author]
        op = elsewhere.submit(identity, "sell" if price > 100 else "buy", price, 1, tif)
        self.record(op)
        self.touched(at)
        deliver(elsewhere, home_replica, random.Random(0), 100, batch=True)
        self.touched(home_at)
        state = home_replica.order(op.id)
        assert state is not None
        if state.status not in ("open", "partially_filled"):
            return
        digest = home_replica.digest()
        try:
            cancel = home_replica.cancel(identity, op.id)
        except BadCancel:
            assert self.equivocated(author)
            assert home_replica.digest() == digest
            event("cancel of an order on another branch refused")
            return
        self.record(cancel)
        assert home_replica.cancel_effective(cancel.id) is True

    @rule(author=author_ix, pick=st.integers(0, 50))
    def cancel_finished(self, author: int, pick: int) -> None:
        at, replica = self.replica(home(author, N_REPLICAS))
        key = AUTHORS[author].public_key
        done = [o for o in replica.orders(key) if o.status not in ("open", "partially_filled")]
        if not done:
            return
        target = done[pick % len(done)]
        digest, fills = replica.digest(), replica.fill_count
        try:
            op = replica.cancel(AUTHORS[author], target.id)
        except BadCancel:
            assert self.equivocated(author)
            return
        self.record(op)
        assert replica.cancel_effective(op.id) is False
        assert replica.order(target.id) == target
        assert replica.digest() == digest and replica.fill_count == fills  # a no-op
        self.touched(at)

    @rule(
        src=replica_ix,
        dst=replica_ix,
        seed=st.integers(0, 2**16),
        keep=st.sampled_from((20, 50, 100)),
        batch=st.booleans(),
    )
    def exchange(self, src: int, dst: int, seed: int, keep: int, batch: bool) -> None:
        _, source = self.replica(src)
        dst, target = self.replica(dst)
        deliver(source, target, random.Random(seed), keep, batch=batch)
        if target.pending_count:
            event("ops wait for parents after a partial exchange")
        self.touched(dst)

    @rule()
    def full_exchange(self) -> None:
        exchange_all(self.world)
        self.dirty.update(range(len(self.world)))
        digests = {replica.digest() for replica in self.world}
        assert len(digests) == 1
        assert all(len(r) == len(self.signed) for r in self.world)
        self.converged = True

    @rule(seed=st.integers(0, 2**16))
    def late_joiner(self, seed: int) -> None:
        """A new replica that gets every op (duplicated, shuffled) equals the union's state."""
        if len(self.world) >= MAX_REPLICAS:
            return
        ops = union_ops(self.world)
        rng = random.Random(seed)
        raws = [op.raw for op in ops] * 2
        rng.shuffle(raws)
        fresh = Replica(MARKET)
        report = fresh.apply_many(raws)
        assert not report.invalid and fresh.pending_count == 0
        assert fresh.ops() == ops
        self.world.append(fresh)
        self.touched(len(self.world) - 1)

    @rule(at=replica_ix, tail=st.sampled_from((0, 0, 1, 4)), seed=st.integers(0, 2**16))
    def restart_from_checkpoint(self, at: int, tail: int, seed: int) -> None:
        """The replica restarts: restored from its checkpoint and the ops it held (applied and
        pending, shuffled), it is the same replica, and goes on from there, so later steps
        bring ops that sort after, inside the tail and below its undo floor."""
        at, replica = self.replica(at)
        blob = replica.checkpoint(tail)
        held = replica.ops() + [replica._pending[i] for i in replica.pending_ids()]
        random.Random(seed).shuffle(held)
        restored = Replica.restore(MARKET, held, blob)
        covered = max(replica.undo_floor, len(replica) - tail)
        assert restored.restore_report.from_checkpoint == covered
        assert restored.digest() == replica.digest()
        assert restored.ops() == replica.ops()
        assert restored.heads() == replica.heads()
        assert sorted(restored.pending_ids()) == sorted(replica.pending_ids())
        assert restored.missing() == replica.missing()
        self.world[at] = restored
        self.touched(at)
        if covered:
            event("a replica restarted from its checkpoint")

    @rule(
        at=replica_ix,
        author=author_ix,
        shift=st.sampled_from((-1, 1, 2)),
        wrong=st.sampled_from(("lamport", "seq")),
    )
    def forged_op_is_refused(self, at: int, author: int, shift: int, wrong: str) -> None:
        """An op with a bad Lamport time or sequence number changes nothing."""
        _, replica = self.replica(at)
        identity = AUTHORS[author]
        heads = [replica.get(h) for h in replica.heads()]
        own = [o for o in replica.ops() if o.author == identity.public_key]
        tip = max(own, key=lambda o: o.seq) if own else None
        parents = {h.id: h for h in heads if h is not None and h.author != identity.public_key}
        if tip is not None:
            parents[tip.id] = tip
        lamport = 1 + max((p.lamport for p in parents.values()), default=0)
        seq = 1 if tip is None else tip.seq + 1
        if wrong == "lamport":
            lamport += shift
            if lamport < 1:
                return
            error: type[InvalidOp] = BadLamport
        else:
            seq += shift
            if seq < 1:
                return
            error = BadSequence
        op = sign_op(identity, MARKET.id, seq, lamport, tuple(parents), OrderBody("buy", 100, 1))
        digest, size = replica.digest(), len(replica)
        try:
            replica.apply(op.raw)
        except error:
            pass
        else:  # pragma: no cover - reported by the assertion
            raise AssertionError(f"forged op with wrong {wrong} was accepted")
        assert replica.digest() == digest and len(replica) == size
        assert replica.is_invalid(op.id)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def derived_state_is_sound(self) -> None:
        for index in sorted(self.dirty):
            replica = self.world[index]
            if replica.restore_report.from_checkpoint and not replica.undo_floor:
                event("a late op sorted below a restored replica's undo floor")
            assert replica.pending_count == 0 or replica.missing()
            assert_invariants(replica)
            assert_scratch_equal(replica)
            assert_matches_reference(replica)
        self.dirty.clear()

    @invariant()
    def converged_after_full_exchange(self) -> None:
        if self.converged:
            assert len({replica.digest() for replica in self.world}) == 1

    def teardown(self) -> None:
        if not hasattr(self, "world"):
            return
        exchange_all(self.world)
        assert len({replica.digest() for replica in self.world}) == 1
        assert_matches_reference(self.world[0])


Network.TestCase.settings = settings(max_examples=examples(0.6))
TestNetwork = Network.TestCase
