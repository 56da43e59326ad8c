"""A stateful model of a witnessed market (specs/finality.md): what a replica once showed as final
never changes, at that replica or at any other.

The world: three witnesses, each heartbeating (and reconfiguring) only at its own replica, so
witnesses never equivocate; two or three traders at their own replicas submitting (every time in
force) and cancelling; an adversary that signs ops by hand with any valid parents it can see
(a random part of some replica's ops, or nothing at all: Lamport 1), as order or as heartbeat
(it is no witness), and hands them to some replicas; partial deliveries of random subsets in
random order; now and then a reconfiguration approved by a majority (a witness removed or a
spare key added); restarts from a checkpoint.

After every step, on every replica: the ids of its final prefix, its final fills and its final
order states extend what it showed before; its final prefix and every other replica's (now and
ever before) are prefixes of one another; ``final_book()`` is the book of the final prefix. Each
replica that changed also equals a fresh replica given its ops shuffled, and the reference
matcher fed its ops in its order. At teardown: full exchange and heartbeats until no witness
needs one; every replica has the same digest, every op but trailing heartbeats is final and so
is every fill; one round of heartbeats from all witnesses at once makes every op final.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from strategies import PRICES, QUANTITIES, SIDES, TIFS, examples
from witnessed import (
    ADVERSARIES,
    TRADERS,
    WITNESSES,
    WMARKET,
    assert_book_sound,
    assert_final_book,
    assert_finality_consistent,
    assert_matches_reference_in_order,
    assert_scratch_equal_shuffled,
    deliver_some,
    final_fills,
    final_orders,
    final_prefix,
    sync,
    union,
)

from crdtbook import BadWitness, Op, OrderState, Replica
from crdtbook._ops import (
    STP_MODES,
    CancelAllBody,
    HeartbeatBody,
    OrderBody,
    ReconfigBody,
    sign_op,
)

N_WITNESS_HOMES = 3
#: Client order ids (tags) from a small set, so that keys reuse them (the adversary does: its
#: later order with a used one is rejected, duplicate_client_id), and cancel-all prefixes match.
TAGS = st.sampled_from((None, None, "a1", "a2", "b1"))
MAX_RECONFIGS = 2



def witness_home(index: int) -> int:
    return index % N_WITNESS_HOMES


class WitnessedNetwork(RuleBasedStateMachine):
    @initialize(traders=st.integers(2, 3))
    def start(self, traders: int) -> None:
        self.market = WMARKET
        self.n_traders = traders
        #: replicas 0..2: witness homes; then one per trader.
        self.world: list[Replica] = [Replica(WMARKET) for _ in range(N_WITNESS_HOMES + traders)]
        self.signed: dict[bytes, Op] = {}
        self.adversary_ops: dict[bytes, list[Op]] = {a.public_key: [] for a in ADVERSARIES}
        self.reconfigs = 0
        self.used_witnesses = {w.public_key for w in WITNESSES[:3]}
        self.dirty: set[int] = set(range(len(self.world)))
        # What each replica showed as final (the longest so far), and across all replicas.
        self.shown_prefix: list[list[bytes]] = [[] for _ in self.world]
        self.shown_fills: list[list[tuple[Any, ...]]] = [[] for _ in self.world]
        self.shown_orders: list[dict[bytes, OrderState]] = [{} for _ in self.world]
        self.global_prefix: list[bytes] = []
        self.global_fills: list[tuple[Any, ...]] = []
        self.rng = random.Random(0)
        #: Witnesses gone for good (removed): they never sign again.
        self.gone: set[bytes] = set()
        self.clock = 1_700_000_000_000
        self.shown_times: list[dict[bytes, int | None]] = [{} for _ in self.world]

    # -- helpers ---------------------------------------------------------------------------

    def trader_home(self, trader: int) -> tuple[int, Replica]:
        at = N_WITNESS_HOMES + trader % self.n_traders
        return at, self.world[at]

    def record(self, op: Op) -> None:
        self.signed[op.id] = op

    # -- traders ---------------------------------------------------------------------------

    @rule(
        trader=st.integers(0, 2),
        side=st.sampled_from(SIDES),
        price=PRICES,
        quantity=QUANTITIES,
        tif=st.sampled_from(TIFS),
        tag=TAGS,
        stp=st.sampled_from(STP_MODES),
    )
    def submit(self, trader: int, side: str, price: int, quantity: int, tif: str,
               tag: str | None = None, stp: str = "expire_maker") -> None:
        at, replica = self.trader_home(trader)
        identity = TRADERS[trader % self.n_traders]
        if tag is not None and replica.order_by_client_id(identity.public_key, tag) is not None:
            return  # submit refuses a client id its key used: the adversary reuses them
        op = replica.submit(identity, side, price, quantity, tif, tag, stp=stp)
        self.record(op)
        state = replica.order(op.id)
        assert state is not None and not state.final  # nothing acknowledged it yet
        assert replica.placement(op.id) is None and not replica.is_final(op.id)
        self.dirty.add(at)

    @rule(
        orders=st.lists(
            st.tuples(st.integers(0, 2), st.sampled_from(SIDES), PRICES, QUANTITIES,
                      st.sampled_from(TIFS), TAGS),
            min_size=2,
            max_size=6,
        )
    )
    def burst(self, orders: list[tuple[int, str, int, int, str, str | None]]) -> None:
        """Several traders submit at their replicas before anyone exchanges: concurrent ops."""
        for trader, side, price, quantity, tif, tag in orders:
            self.submit(trader, side, price, quantity, tif, tag)

    @rule(trader=st.integers(0, 2), prefix=st.sampled_from((None, "a", "b", "a1")))
    def cancel_all(self, trader: int, prefix: str | None) -> None:
        at, replica = self.trader_home(trader)
        op = replica.cancel_all(TRADERS[trader % self.n_traders], prefix)
        self.record(op)
        self.dirty.add(at)

    @rule(trader=st.integers(0, 2), pick=st.integers(0, 50))
    def cancel(self, trader: int, pick: int) -> None:
        at, replica = self.trader_home(trader)
        identity = TRADERS[trader % self.n_traders]
        mine = replica.orders(identity.public_key)
        if not mine:
            return
        target = mine[pick % len(mine)]
        op = replica.cancel(identity, target.id)
        self.record(op)
        self.dirty.add(at)

    # -- the adversary -----------------------------------------------------------------------

    @rule(
        who=st.integers(0, len(ADVERSARIES) - 1),
        view=st.integers(0, 7),
        fresh=st.booleans(),
        keep=st.sampled_from((10, 30, 100)),
        own=st.sampled_from(("none", "latest", "any")),
        heartbeat=st.integers(0, 4),
        side=st.sampled_from(SIDES),
        price=PRICES,
        quantity=QUANTITIES,
        tif=st.sampled_from(TIFS),
        to=st.lists(st.integers(0, 7), min_size=1, max_size=4),
        seed=st.integers(0, 2**16),
        tag=TAGS,
        stp=st.sampled_from(STP_MODES),
    )
    def adversary_signs(
        self, who: int, view: int, fresh: bool, keep: int, own: str, heartbeat: int, side: str,
        price: int, quantity: int, tif: str, to: list[int], seed: int, tag: str | None, stp: str,
    ) -> None:
        """An op with any valid parents (from a partial view, or none at all: Lamport 1), at
        any time, possibly a second op at one sequence number (it is no witness)."""
        identity = ADVERSARIES[who]
        key = identity.public_key
        rng = random.Random(seed)
        seen = [] if fresh else self.world[view % len(self.world)].ops()
        others = [op for op in seen if op.author != key and rng.randrange(100) < keep]
        mine = [op for op in seen if op.author == key]
        parent_own: Op | None = None
        if mine and own == "latest":
            parent_own = max(mine, key=lambda o: o.seq)
        elif mine and own == "any":
            parent_own = rng.choice(mine)
        parents = others[:60] + ([parent_own] if parent_own is not None else [])
        lamport = 1 + max((p.lamport for p in parents), default=0)
        seq = 1 if parent_own is None else parent_own.seq + 1
        body = (
            HeartbeatBody(seed)
            if heartbeat == 0
            else CancelAllBody(tag)
            if heartbeat == 1
            else OrderBody(side, price, quantity, tif, tag, stp)
        )
        op = sign_op(identity, WMARKET.id, seq, lamport, tuple(p.id for p in parents), body,
                     WMARKET.version)
        if any(o.seq == seq for o in self.adversary_ops[key]):
            event("the adversary signed two ops at one sequence number")
        if lamport == 1:
            event("the adversary signed a Lamport-1 op")
        self.adversary_ops[key].append(op)
        self.record(op)
        for index in set(to):
            at = index % len(self.world)
            self.world[at].apply(op.raw)
            self.dirty.add(at)

    # -- witnesses ----------------------------------------------------------------------------

    @rule(witness=st.integers(0, len(WITNESSES) - 1), always=st.integers(0, 3))
    def heartbeat(self, witness: int, always: int) -> None:
        """A witness heartbeats at its home replica when that replica says it needs to (and
        now and then anyway). A removed witness is gone for good: it never signs again."""
        identity = WITNESSES[witness]
        if identity.public_key in self.gone:
            return
        at = witness_home(witness)
        replica = self.world[at]
        if identity.public_key not in replica.witnesses():
            try:
                replica.heartbeat(identity)
            except BadWitness:
                return
            raise AssertionError("a key not in force signed a heartbeat")
        needs = replica.needs_heartbeat(identity.public_key)
        if not needs and always:
            return
        self.clock += 250
        op = replica.heartbeat(identity, time_ms=self.clock)
        self.record(op)
        if not needs:
            event("a heartbeat with nothing to acknowledge")
        assert replica.placement(op.id) == op.lamport
        assert not replica.needs_heartbeat(identity.public_key)
        self.dirty.add(at)

    @rule(seed=st.integers(0, 2**16))
    def witness_round(self, seed: int) -> None:
        """Every witness that is due heartbeats, in random order, each at its home."""
        order = list(range(len(WITNESSES)))
        random.Random(seed).shuffle(order)
        for witness in order:
            self.heartbeat(witness, 1)

    @rule(signer=st.integers(0, 4), change=st.sampled_from(("remove", "add")),
          pick=st.integers(0, 4), approvals=st.integers(0, 4))
    def reconfigure(self, signer: int, change: str, pick: int, approvals: int) -> None:
        """A witness in force signs a new witness set at its home replica (from whatever it
        holds), approved by enough others for a majority. As specs/finality.md section 8 asks of
        approvers, a removed witness is gone for good from now on, and its last heartbeat is in
        the reconfiguration's past (its home replica's ops reach the signer first)."""
        if self.reconfigs >= MAX_RECONFIGS:
            return
        keys = [w.public_key for w in WITNESSES]
        live = [k for k in sorted(self.world[0].witnesses()) if k not in self.gone]
        identity = WITNESSES[keys.index(live[signer % len(live)])]
        at = witness_home(WITNESSES.index(identity))
        replica = self.world[at]
        if replica.epoch != self.reconfigs:
            return  # it has not seen the last reconfiguration: an honest witness waits
        current = sorted(replica.witnesses())
        if change == "remove":
            if len(current) <= 2:
                return
            removed = [k for k in current if k != identity.public_key][pick % (len(current) - 1)]
            new = [k for k in current if k != removed]
            report = replica.apply_many(
                op.raw for op in self.world[witness_home(keys.index(removed))].ops()
            )
            assert not report.invalid
            self.gone.add(removed)
        else:
            spares = [k for k in keys if k not in self.used_witnesses]
            if not spares:
                return
            new = sorted([*current, spares[pick % len(spares)]])
        others = [w for w in WITNESSES if w.public_key in current and w is not identity]
        need = len(current) // 2  # with the signer: a majority
        chosen = others[: need + approvals % (len(others) - need + 1)]
        signatures = {w.public_key: replica.approve_reconfig(w, new) for w in chosen}
        frontier = replica.frontier
        op = replica.reconfigure(identity, new, signatures)
        self.record(op)
        self.reconfigs += 1
        self.used_witnesses.update(new)
        assert replica.epoch == self.reconfigs
        assert replica.witnesses() == frozenset(new)
        assert replica.frontier >= frontier
        event(f"reconfiguration: {change}")
        self.dirty.add(at)

    # -- delivery and restarts ----------------------------------------------------------------

    @rule(src=st.integers(0, 7), dst=st.integers(0, 7), seed=st.integers(0, 2**16),
          keep=st.sampled_from((20, 50, 100)), batch=st.booleans())
    def exchange(self, src: int, dst: int, seed: int, keep: int, batch: bool) -> None:
        source = self.world[src % len(self.world)]
        dst %= len(self.world)
        target = self.world[dst]
        rng = random.Random(seed)
        raws = [op.raw for op in source.ops() if rng.randrange(100) < keep]
        rng.shuffle(raws)
        if batch:
            report = target.apply_many(raws)
            assert not report.invalid, report.invalid
        else:
            for raw in raws:
                target.apply(raw)
        if target.pending_count:
            event("ops wait for parents after a partial delivery")
        self.dirty.add(dst)

    @rule(seed=st.integers(0, 2**16), keep=st.sampled_from((30, 60, 90)))
    def gossip(self, seed: int, keep: int) -> None:
        """Every replica gets a random part of every other's ops, in random order."""
        rng = random.Random(seed)
        for dst in range(len(self.world)):
            for src in range(len(self.world)):
                if src != dst:
                    deliver_some(self.world[src], self.world[dst], rng, keep)
            if self.world[dst].pending_count:
                event("ops wait for parents after gossip")
        self.dirty.update(range(len(self.world)))

    @rule()
    def full_exchange(self) -> None:
        sync(self.world)
        self.dirty.update(range(len(self.world)))
        assert len({r.digest() for r in self.world}) == 1

    @rule(at=st.integers(0, 7), tail=st.sampled_from((0, 1, 5)), seed=st.integers(0, 2**16))
    def restart(self, at: int, tail: int, seed: int) -> None:
        """Restored from its checkpoint and its ops (shuffled), the replica is the same one."""
        at %= len(self.world)
        live = self.world[at]
        blob = live.checkpoint(tail)
        held = live.ops() + [live._pending[i] for i in live.pending_ids()]
        random.Random(seed).shuffle(held)
        restored = Replica.restore(WMARKET, [op.raw for op in held], blob)
        assert restored.restore_report.from_checkpoint <= live.final_count or (
            restored.restore_report.from_checkpoint == live.undo_floor
        )
        assert restored.ops() == live.ops()
        assert restored.digest() == live.digest()
        assert restored.heads() == live.heads()
        assert sorted(restored.pending_ids()) == sorted(live.pending_ids())
        assert (restored.frontier, restored.final_count, restored.final_fill_count()) == (
            live.frontier, live.final_count, live.final_fill_count(),
        )
        assert restored.orders() == live.orders()
        assert restored.witness_status() == live.witness_status()
        assert restored.epoch == live.epoch
        if restored.restore_report.from_checkpoint:
            event("a replica restarted from its checkpoint")
        self.world[at] = restored
        self.dirty.add(at)

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def final_never_changes(self) -> None:
        # Check everything first, record after: an invariant that fails changes no state, so a
        # replay of the failing example fails the same way.
        views = []
        agreed_prefix, agreed_fills = self.global_prefix, self.global_fills
        for at, replica in enumerate(self.world):
            prefix = final_prefix(replica)
            shown = self.shown_prefix[at]
            assert prefix[: len(shown)] == shown, "the final prefix changed"
            assert len(prefix) >= len(shown), "ops once final are no longer final"
            fills = final_fills(replica)
            shown_fills = self.shown_fills[at]
            assert fills[: len(shown_fills)] == shown_fills, "a final fill changed"
            assert len(fills) >= len(shown_fills), "fills once final are no longer final"
            for ident, state in self.shown_orders[at].items():
                assert replica.order(ident) == state, "a final order state changed"
            for ident, time in self.shown_times[at].items():
                assert replica.witnessed_time(ident) == time, "a final op's witnessed time moved"
            # Across replicas and time: one final order of ops, one of fills.
            short_ids, long_ids = sorted((prefix, agreed_prefix), key=len)
            assert long_ids[: len(short_ids)] == short_ids, "two replicas' final prefixes differ"
            agreed_prefix = long_ids
            short_fills, long_fills = sorted((fills, agreed_fills), key=len)
            assert long_fills[: len(short_fills)] == short_fills, "two replicas' final fills differ"
            agreed_fills = long_fills
            views.append((prefix, fills, final_orders(replica)))
        self.global_prefix, self.global_fills = agreed_prefix, agreed_fills
        for at, (prefix, fills, orders) in enumerate(views):
            self.shown_prefix[at] = prefix
            self.shown_fills[at] = fills
            self.shown_orders[at].update(orders)
            times = self.shown_times[at]
            for ident in prefix[len(times):]:
                times[ident] = self.world[at].witnessed_time(ident)

    @invariant()
    def derived_state_is_sound(self) -> None:
        for at in sorted(self.dirty):
            replica = self.world[at]
            frontier, count = replica.frontier, replica.final_count
            if replica.final_fill_count():
                event("a fill is final")
            if replica.final_fill_count() < replica.fill_count and replica.final_fill_count():
                event("final fills, then provisional ones")
            if any(op.lamport < frontier for op in replica.ops()[count:]):
                event("an op with a Lamport time below the frontier sorts after the final ops")
            assert_finality_consistent(replica)
            assert_final_book(replica)
            assert_book_sound(replica)
            assert_matches_reference_in_order(replica)
            assert_scratch_equal_shuffled(replica, self.rng)
        self.dirty.clear()

    def teardown(self) -> None:
        if not hasattr(self, "world"):
            return
        world = self.world
        event(f"ops signed: {min(len(self.signed) // 10 * 10, 50)}+")
        for _ in range(20):
            sync(world)
            current = sorted(world[0].witnesses())
            due = [
                w for w in WITNESSES
                if w.public_key in current
                and world[witness_home(WITNESSES.index(w))].needs_heartbeat(w.public_key)
            ]
            if not due:
                break
            for w in due:
                self.record(world[witness_home(WITNESSES.index(w))].heartbeat(w))
        else:  # pragma: no cover - reported by the assertion
            raise AssertionError("witnesses keep needing heartbeats")
        self.dirty.update(range(len(world)))
        self.final_never_changes()
        self.derived_state_is_sound()
        assert len({r.digest() for r in world}) == 1
        for replica in world:
            assert len(replica) == len(union(world))
            ops = replica.ops()
            assert all(replica.is_final(op.id) for op in ops if op.kind != "heartbeat")
            assert replica.final_fill_count() == replica.fill_count
            assert all(o.final for o in replica.orders() if o.status not in ("open",
                                                                             "partially_filled"))
        # All witnesses in force heartbeat at once, from the same ops: everything is final.
        everything = [op.raw for op in world[0].ops()]
        beats = []
        for key in sorted(world[0].witnesses()):
            witness = next(w for w in WITNESSES if w.public_key == key)
            clone = Replica(WMARKET)
            clone.apply_many(everything)
            beats.append(clone.heartbeat(witness).raw)
        for replica in world:
            replica.apply_many(beats)
        self.final_never_changes()
        for replica in world:
            assert replica.final_count == len(replica), (replica.final_count, len(replica))
            assert replica.final_fill_count() == replica.fill_count
            assert not any(replica.needs_heartbeat(k) for k in replica.witnesses())
        assert len({r.digest() for r in world}) == 1


WitnessedNetwork.TestCase.settings = settings(
    max_examples=examples(0.4), stateful_step_count=50, deadline=None
)
TestWitnessedNetwork = WitnessedNetwork.TestCase


# -- lying witnesses: no finality promise, but replicas still converge --------------------------

lying_steps = st.lists(
    st.tuples(
        st.sampled_from(("order", "order", "beat", "beat", "reconfig", "deliver")),
        st.integers(0, 3),  # replica
        st.integers(0, 4),  # who
        st.integers(0, 2**16),  # anything else
    ),
    min_size=5,
    max_size=40,
)


@settings(max_examples=examples(1), deadline=None)
@given(steps=lying_steps, seed=st.integers(0, 2**16))
def test_lying_witnesses_cannot_split_replicas(steps: list[tuple[str, int, int, int]],
                                               seed: int) -> None:
    """Witnesses that heartbeat at several replicas (equivocation) and approve competing
    reconfigurations (two at one epoch) void the finality promise (specs/finality.md sections
    8-9), never convergence: every delivery order of the same ops gives one total order, one
    verdict on every op and one digest."""
    world = [Replica(WMARKET) for _ in range(4)]
    for kind, at, who, extra in steps:
        replica = world[at]
        rng = random.Random(extra)
        if kind == "order":
            replica.submit(TRADERS[who % 3], SIDES[extra % 2], 97 + extra % 7, 1 + extra % 4,
                           TIFS[extra % 4])
        elif kind == "beat":
            witness = WITNESSES[who]
            if witness.public_key in replica.witnesses():
                replica.heartbeat(witness)
        elif kind == "reconfig":
            current = sorted(replica.witnesses())
            signer = next(w for w in WITNESSES if w.public_key == current[who % len(current)])
            spares = [w.public_key for w in WITNESSES if w.public_key not in current]
            new = sorted(current[:-1] if extra % 2 and len(current) > 1 else
                         current + spares[:1])
            removed_before = {w.key for w in replica.witness_status() if not w.current}
            if not new or removed_before & set(new):
                continue
            others = [w for w in WITNESSES if w.public_key in current and w is not signer]
            approvals = {w.public_key: replica.approve_reconfig(w, new) for w in others}
            try:
                replica.reconfigure(signer, new, approvals)
            except BadWitness:
                # The replica refuses to sign what would be invalid, when witnesses lied: the
                # signer equivocated (it signed at two replicas at one sequence number) and
                # builds on its own branch, which may not reach the reconfiguration this
                # replica is at; or witnesses approved competing reconfigurations (two at one
                # epoch), and the chain in force here does not reach the latest one in this
                # replica's past (found by hypothesis: the check knew only the first lie).
                ops = union(world)
                signed = [op.seq for op in ops if op.author == signer.public_key]
                epochs = [op.body.epoch for op in ops if isinstance(op.body, ReconfigBody)]
                assert len(set(signed)) < len(signed) or len(set(epochs)) < len(epochs)
        else:
            deliver_some(world[who % 4], replica, rng, 50)
    ops = union(world)
    if not ops:
        return
    rng = random.Random(seed)
    reference = Replica(WMARKET)
    reference.apply_many(op.raw for op in ops)
    assert reference.pending_count == 0
    if reference.forked_authors() & {w.public_key for w in WITNESSES}:
        event("a witness equivocated")
    if reference.epoch:
        event("a reconfiguration is in force")
    epochs = [op.body.epoch for op in ops if isinstance(op.body, ReconfigBody)]
    if len(epochs) != len(set(epochs)):
        event("two reconfigurations at one epoch (lying approvers)")
    for _ in range(2):
        shuffled = [op.raw for op in ops]
        rng.shuffle(shuffled)
        one_by_one = Replica(WMARKET)
        for raw in shuffled:
            one_by_one.apply(raw)
        for other in (one_by_one, Replica.restore(WMARKET, shuffled, reference.checkpoint())):
            assert other.ops() == reference.ops()
            assert other.digest() == reference.digest()
            assert (other.frontier, other.final_count, other.epoch) == (
                reference.frontier, reference.final_count, reference.epoch,
            )
            assert other.witness_status() == reference.witness_status()
    assert_finality_consistent(reference)
    assert_final_book(reference)
    assert_matches_reference_in_order(reference)
