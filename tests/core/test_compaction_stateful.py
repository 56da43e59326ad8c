"""Compaction at random points changes nothing a replica shows (issue #10).

The finality machine (test_finality_stateful.WitnessedNetwork: traders, witnesses with
reconfigurations, an adversary signing with any parents, partial deliveries, restarts) runs as
it is; beside every replica of its world runs a *twin* that compacts at random points, is
restarted from its snapshot, and is given the same ops (all of them again each time, so every
compacted op also comes back as a late duplicate). After every step each twin shows exactly what
its replica shows: digest, book, final book, counts, frontier, the fills still in memory, and
the orders still in memory. The adversary's ops name old parents, which a twin finds again in
its archive.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import invariant, rule
from test_finality_stateful import WitnessedNetwork
from witnessed import WMARKET

from crdtbook import Op, Replica, read_point

#: Small, so that the machine's short runs pass several points.
POINT_INTERVAL = 4


class _Archive:
    """What a node's store is to a compacted replica: the ops it compacted, by id."""

    def __init__(self) -> None:
        self.ops: dict[bytes, Op] = {}

    def get(self, ident: bytes) -> Op | None:
        return self.ops.get(ident)


class CompactingNetwork(WitnessedNetwork):
    def _twins(self) -> list[tuple[Replica, _Archive]]:
        twins: list[tuple[Replica, _Archive]] | None = getattr(self, "twins", None)
        if twins is None or len(twins) != len(self.world):
            twins = []
            for _ in self.world:
                archive = _Archive()
                replica = Replica(WMARKET, archive=archive, point_interval=POINT_INTERVAL)
                twins.append((replica, archive))
            self.twins = twins
        return twins

    def _feed(self, at: int) -> None:
        """Give twin ``at`` everything its replica holds (applied or waiting)."""
        replica = self.world[at]
        twin, _ = self._twins()[at]
        held = replica.ops() + [replica._pending[i] for i in replica.pending_ids()]
        report = twin.apply_many(op.raw for op in held)
        assert not report.invalid, report.invalid

    @rule(at=st.integers(0, 7))
    def compact(self, at: int) -> None:
        at %= len(self.world)
        self._feed(at)
        twin, archive = self._twins()[at]
        before = dict(twin.applied_index)
        fills_before = twin.fill_count
        report = twin.compact()
        if report.ops:
            event("a twin compacted ops out of memory")
        for ident in report.ops:
            archive.ops[ident] = before[ident]
        assert report.fills_start + len(report.fills) <= fills_before
        assert all(state.final for state in report.orders)

    @rule(at=st.integers(0, 7), seed=st.integers(0, 2**16))
    def settle_and_compact(self, at: int, seed: int) -> None:
        """Exchange and heartbeat until much is final, then compact (finality needs every
        witness in force to acknowledge, which random steps rarely reach)."""
        for _ in range(2):
            self.full_exchange()
            self.witness_round(seed)
        self.full_exchange()
        self.compact(at)

    @rule(at=st.integers(0, 7))
    def restart_twin(self, at: int) -> None:
        """The twin restarts from its last snapshot, its ops in memory and its archive."""
        at %= len(self.world)
        twin, archive = self._twins()[at]
        if not twin.compacted_ops:
            return
        blob = twin.snapshot()  # right after a compaction, as a node takes it
        live = list(twin.applied_index.values()) + [
            twin._pending[i] for i in twin.pending_ids()
        ]
        restored = Replica.from_snapshot(WMARKET, blob, [op.raw for op in live], archive=archive,
                                         point_interval=POINT_INTERVAL,
                                         history=twin.has_history)
        if restored.history_held:
            # Without its history (pruned, or joined), a restarted twin holds the forks of
            # prefix authors' chains it had applied, until it fetches the history: a node
            # fetches it for them (after a while); here at once.
            self._fetch_history(at, restored, archive)
        assert restored.digest() == twin.digest()
        event("a twin restarted from its snapshot")
        self.twins[at] = (restored, archive)

    @rule(at=st.integers(0, 7), seed=st.integers(0, 2**16))
    def settle_compact_and_join(self, at: int, seed: int) -> None:
        self.settle_and_compact(at, seed)
        self.join_twin(at)

    @rule(at=st.integers(0, 7))
    def join_twin(self, at: int) -> None:
        """The twin is replaced by a node that joins from its point state: the kept ops and
        the ops after the point, with no history (its archive is empty). It gets the prefix
        later, when an op needs it (the invariant completes it, as a node fetches it)."""
        at %= len(self.world)
        twin, archive = self._twins()[at]
        if not twin.compacted_ops:
            return
        blob = twin.snapshot()
        info = read_point(WMARKET, blob)
        held = twin.applied_index
        given = [held[i].raw for i in info.kept] + [op.raw for op in twin.ops()]
        joined_archive = _Archive()
        joiner = Replica.from_snapshot(WMARKET, blob, given, archive=joined_archive,
                                       point_interval=POINT_INTERVAL, history=False)
        assert not joiner.has_history
        # Unless an op waits: for the history (a fork of a prefix author's chain, a cancel of
        # an order finished there) or for a parent in the prefix that is not kept.
        if not joiner.history_held and not joiner.pending_count:
            assert joiner.digest() == twin.digest()
        # The history the joiner may fetch later: the prefix, as the twin compacted it.
        self.histories = getattr(self, "histories", {})
        self.histories[at] = {**self.histories.get(at, {}), **archive.ops}
        self._pruned().discard(at)
        self.twins[at] = (joiner, joined_archive)
        event("a twin joined from its point state")

    @rule(at=st.integers(0, 7))
    def prune_twin(self, at: int) -> None:
        """The twin's node prunes its store (``--retention 0``): the replica forgets its
        history, then the archive drops every compacted op. Ops that need one wait for the
        history, which the invariant fetches back as a node does."""
        at %= len(self.world)
        twin, archive = self._twins()[at]
        if not twin.compacted_ops:
            return
        self.histories = getattr(self, "histories", {})
        self.histories[at] = {**self.histories.get(at, {}), **archive.ops}
        twin.forget_history()
        archive.ops.clear()
        self._pruned().add(at)
        event("a twin pruned its archive")

    def _fetch_history(self, at: int, twin: Replica, archive: _Archive) -> None:
        """Twin ``at`` fetches its history back (as node.join does) and judges what waited."""
        archive.ops.update(getattr(self, "histories", {}).get(at, {}))
        twin.history_complete()
        self._pruned().discard(at)
        assert twin.history_held == twin.history_wanted == 0

    def _pruned(self) -> set[int]:
        """The twins that pruned their archive and have not fetched the history back."""
        pruned: set[int] | None = getattr(self, "pruned", None)
        if pruned is None:
            pruned = self.pruned = set()
        return pruned

    @invariant()
    def twins_show_the_same(self) -> None:
        if not hasattr(self, "world"):
            return
        for at, (twin, archive) in enumerate(self._twins()):
            self._feed(at)
            pruned = at in self._pruned()
            replica = self.world[at]
            forks = any(replica.get(ident) is not None for ident in twin._history_wait)
            if twin.history_wanted or (twin.history_held and (forks or not pruned)):
                # Ops wait for the history (copies of prefix ops, or ops whose verdict reads
                # it): fetch it, as a node does, and judge them. A node fetches at once for
                # history_wanted; for ops only held, after a while (a fork nobody
                # references): here at once for a joiner or for a fork the world applied, and
                # not for a pruned twin's copies, so that its pruned state lasts into later
                # steps (copies held meanwhile change nothing it shows).
                event("a twin waited for its history")
                self._fetch_history(at, twin, archive)
            # A pruned twin no longer knows its pruned ops: asked about one, it says not final
            # (as a node that pruned it, or joined after it, does).
            forgotten = getattr(self, "histories", {}).get(at, {}) if pruned else {}
            _same(replica, twin, forgotten)


def _same(replica: Replica, twin: Replica, forgotten: Mapping[bytes, Op] = {}) -> None:
    assert twin.digest() == replica.digest()
    assert twin.book() == replica.book()
    assert twin.final_book() == replica.final_book()
    assert twin.frontier == replica.frontier
    assert twin.final_count == replica.final_count
    assert twin.final_fill_count() == replica.final_fill_count()
    assert len(twin) == len(replica)
    assert twin.fill_count == replica.fill_count
    assert twin.order_count == replica.order_count
    start = twin.compacted_fills
    assert list(twin.fills(start)) == list(replica.fills(start))
    mine: dict[bytes, Any] = {o.id: o for o in twin.orders()}
    for order in replica.orders():
        if order.id in mine:
            assert mine[order.id] == order
        else:  # compacted: finished in the final prefix
            assert order.final
    for op in replica.ops()[-20:]:
        if op.id in forgotten and twin.get(op.id) is None:
            continue
        assert twin.is_final(op.id) == replica.is_final(op.id)


TestCompactingNetwork = CompactingNetwork.TestCase
TestCompactingNetwork.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
