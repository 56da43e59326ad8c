"""Witnessed markets (protocol version 2): where each op sorts, and which prefix is final.

specs/finality.md is the normative text; this module is its reference. In one paragraph:

A market may name **witnesses**. A witness's **heartbeat** op acknowledges its causal past. An
op's **placement** is the smallest Lamport time of a *counted* heartbeat that has the op in its
causal past (or itself is that heartbeat); an op no counted heartbeat has acknowledged yet is
unplaced (``UNPLACED``, after everything). Ops sort by ``(placement, rank, lamport, id)``, where
``rank`` is a hash of the op id keyed by the batch's heartbeats (which the op's author could not
know when signing), raised to the largest rank of its parents in the same batch, so the order
respects causality and no author picks its place inside a batch. The **frontier** is the
smallest, over the witnesses in force, of the Lamport time of the witness's latest counted
heartbeat: a witness's later heartbeats carry larger Lamport times, so no op unknown today can
ever be placed at or below it. Every op placed at or below the frontier is **final**: that
prefix of the total order, and all that matching derives from it, never changes.

A **reconfiguration** (signed by a majority of the witnesses in force) replaces the witness set
as a new epoch. A removed witness's heartbeats count up to the last one in the
reconfiguration's causal past (its *cut*), so a witness that is gone for good stops holding the
frontier back. A witness seen signing two ops at one sequence number (equivocation) counts only
below its fork.

Costs (n ops, t ops above the frontier, b ops in one batch):
- an ordinary op: its key (two dict lookups) and, when it sorts last, nothing else;
- a counted heartbeat: a walk over the ops it newly places, b hashes per batch it touches, a
  rewind of the provisional tail and a sort of it: O(t log t);
- a reconfiguration or a newly forked witness: everything recomputed, O(n log n) (rare).
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from heapq import heappop, heappush
from typing import Final, NamedTuple

import nacl.bindings
import nacl.exceptions

from ._errors import BadWitness
from ._ops import HeartbeatBody, Op, ReconfigBody, reconfig_message

__all__ = ["UNPLACED", "WitnessInfo", "Witnessing", "check_approval"]

#: The placement of an op that no counted heartbeat acknowledges yet: above every Lamport time.
UNPLACED: Final = 2**63
#: Domain of a batch's seed: SHA-256(BATCH_DOMAIN || sorted ids of its counted heartbeats).
BATCH_DOMAIN: Final = b"crdtbook/batch/v2\x00"
#: A key above every real key with the same placement (for bisecting to a placement's end).
_TOP: Final = (2**64, 2**63, b"\xff" * 33)

Key = tuple[int, int, int, bytes]


class WitnessInfo(NamedTuple):
    """One witness as this replica sees it."""

    key: bytes
    #: Lamport time and sequence number of its latest counted heartbeat (0: none yet).
    heartbeat_lamport: int
    heartbeat_seq: int
    #: In the witness set in force (False: removed by a reconfiguration).
    current: bool
    #: Seen signing two ops at one sequence number: its heartbeats count only below the fork.
    forked: bool


def check_approval(market_id: bytes, epoch: int, witnesses: Iterable[bytes], key: bytes,
                   signature: bytes) -> bool:
    """Whether ``signature`` is ``key``'s approval of ``witnesses`` as epoch ``epoch``."""
    message = reconfig_message(market_id, epoch, tuple(witnesses))
    try:
        nacl.bindings.crypto_sign_open(signature + message, key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
        return False
    return True


class Witnessing:
    """Placement, ranks and the frontier of one witnessed replica.

    It shares the replica's applied ops (``applied``) and reads its forks (``fork_at``); the
    replica owns the total order and the engine and asks this object for keys.
    """

    def __init__(
        self,
        market_id: bytes,
        genesis: tuple[bytes, ...],
        applied: Mapping[bytes, Op],
        fork_at: Mapping[bytes, int],
    ) -> None:
        self.market_id = market_id
        self.genesis = genesis
        self.applied = applied
        self.fork_at = fork_at
        self.placement: dict[bytes, int] = {}
        self.rank: dict[bytes, int] = {}
        #: placement -> ids of the ops placed there (a batch).
        self.batches: dict[int, set[bytes]] = {}
        #: Lamport time -> ids of the counted heartbeats with it (a batch's seed).
        self.heartbeats_at: dict[int, list[bytes]] = {}
        #: Every heartbeat applied (counted or not), for a recomputation.
        self.heartbeats: list[Op] = []
        #: witness -> its latest counted heartbeat.
        self.latest: dict[bytes, Op] = {}
        #: The chain of reconfigurations in force: reconfigs[e - 1] made epoch e.
        self.reconfigs: list[Op] = []
        #: Every valid reconfiguration by epoch (more than one at an epoch: lying witnesses).
        self.by_epoch: dict[int, list[Op]] = {}
        self.current: frozenset[bytes] = frozenset(genesis)
        #: witness -> Lamport time of the reconfiguration that added it (absent: genesis).
        self.added_at: dict[bytes, int] = {}
        #: removed witness -> highest sequence number of its that still counts (its cut).
        self.cut: dict[bytes, int] = {}
        #: added witness -> lowest seq of its ops known to have its adding reconfig in the past.
        self._proven_from: dict[bytes, int] = {}
        self._forks_seen: dict[bytes, int] = {}
        #: The frontier when the replica last compacted (0: never). Everything placed at or below
        #: it left memory but for a few kept ops; placements there are never recomputed, and the
        #: frontier never reads lower (a compacted replica cannot take back what was final).
        self.frozen = 0
        #: While a reconfiguration waits for the history the replica lacks (None: none waits),
        #: the frontier reads no higher than it did when the first began to wait: finality here
        #: counts the witness set without it, heartbeats of a witness it removes included, and
        #: if that witness still runs, what turned final here could differ from everyone's.
        self.cap: int | None = None

    # -- keys ------------------------------------------------------------------------------

    def key(self, op: Op) -> Key:
        ident = op.id
        return (self.placement.get(ident, UNPLACED), self.rank.get(ident, 0), op.lamport, ident)

    def frontier(self) -> int:
        """The Lamport time at and below which every placed op is final (0: nothing yet)."""
        lowest = UNPLACED
        for witness in self.current:
            latest = self.latest.get(witness)
            lamport = max(0 if latest is None else latest.lamport, self.added_at.get(witness, 0))
            if lamport < lowest:
                lowest = lamport
        lowest = 0 if lowest == UNPLACED else lowest
        cap = self.cap
        if cap is not None and lowest > cap:
            lowest = cap
        return lowest if lowest > self.frozen else self.frozen

    def final_count(self, order: list[Op]) -> int:
        """How many ops at the start of ``order`` (the total order) are final."""
        frontier = self.frontier()
        if not frontier:
            return 0
        return bisect_left(order, (frontier, *_TOP), key=self.key)

    def is_final(self, ident: bytes) -> bool:
        return self.placement.get(ident, UNPLACED) <= self.frontier()

    def epoch(self) -> int:
        return len(self.reconfigs)

    # -- what counts -------------------------------------------------------------------------

    def counts(self, op: Op) -> bool:
        """Whether heartbeat ``op`` places ops and speaks for its author in the frontier."""
        author = op.author
        if author not in self.added_at and author not in self.genesis:
            return False
        cut = self.cut.get(author)
        if cut is not None and op.seq > cut:
            return False
        fork = self.fork_at.get(author)
        if fork is not None and op.seq >= fork:
            return False
        if author in self.added_at:
            proven = self._proven_from.get(author)
            if proven is None or op.seq < proven:
                # Its heartbeats count once the reconfiguration that added it is in their past.
                if not self._in_past(op, self.reconfigs[self._added_epoch(author) - 1]):
                    return False
                self._proven_from[author] = op.seq
        return True

    def _added_epoch(self, author: bytes) -> int:
        for epoch, reconfig in enumerate(self.reconfigs, 1):
            body: ReconfigBody = reconfig.body  # type: ignore[assignment]
            if author in body.witnesses:
                previous = self.reconfigs[epoch - 2].body if epoch > 1 else None
                before = previous.witnesses if isinstance(previous, ReconfigBody) else self.genesis
                if author not in before:
                    return epoch
        raise AssertionError("an added witness has a reconfiguration that added it")

    def _in_past(self, op: Op, target: Op) -> bool:
        """Is ``target`` in ``op``'s causal past? A walk down to ``target``'s Lamport time."""
        applied, floor, goal = self.applied, target.lamport, target.id
        seen: set[bytes] = set()
        stack = list(op.parents)
        while stack:
            ident = stack.pop()
            if ident == goal:
                return True
            if ident in seen:
                continue
            seen.add(ident)
            try:
                parent = applied[ident]  # a compacted op comes back from the archive
            except KeyError:  # compacted, and not kept anywhere: below any live target
                continue
            if parent.lamport > floor:
                stack.extend(parent.parents)
        return False

    # -- validity of reconfigurations ----------------------------------------------------------

    def check_reconfig(self, op: Op) -> None:
        """Raise :class:`BadWitness` unless ``op`` is a valid reconfiguration given its past."""
        body: ReconfigBody = op.body  # type: ignore[assignment]
        epoch = body.epoch
        in_past = self._reconfigs_in_past(op)
        highest = max((r.body.epoch for r in in_past), default=0)  # type: ignore[union-attr]
        if highest != epoch - 1:
            raise BadWitness(
                f"a reconfiguration to epoch {epoch} must have the one to epoch {epoch - 1} in "
                f"its causal past, and none later (the latest in its past is epoch {highest})"
            )
        previous = [r for r in in_past if r.body.epoch == epoch - 1]  # type: ignore[union-attr]
        # Two at one epoch only if a witness lied; the one in force is the smaller id (as in
        # _winning_chain), never the first to arrive: the verdict must not depend on arrival.
        chain = self._chain_of(min(previous, key=lambda r: r.id)) if previous else []
        before = chain[-1].body.witnesses if chain else self.genesis  # type: ignore[union-attr]
        if op.author not in before:
            raise BadWitness("only a witness of the epoch it replaces can sign a reconfiguration")
        removed: set[bytes] = set()
        witnesses_so_far = self.genesis
        for reconfig in chain:
            new: tuple[bytes, ...] = reconfig.body.witnesses  # type: ignore[union-attr]
            removed |= set(witnesses_so_far) - set(new)
            witnesses_so_far = new
        if removed & set(body.witnesses):
            raise BadWitness("a removed witness cannot be added again (use a new key)")
        for key, signature in body.approvals:
            if key not in before or key == op.author:
                raise BadWitness("an approval must come from another witness of the epoch")
            if not check_approval(self.market_id, epoch, body.witnesses, key, signature):
                raise BadWitness(f"the approval of witness {key.hex()[:16]} does not verify")
        if 2 * (1 + len(body.approvals)) <= len(before):
            raise BadWitness(
                f"a reconfiguration needs a majority of the {len(before)} witnesses; it has "
                f"{1 + len(body.approvals)} (its author and {len(body.approvals)} approvals)"
            )

    def _reconfigs_in_past(self, op: Op) -> list[Op]:
        known = [r for rs in self.by_epoch.values() for r in rs]
        if not known:
            return []
        return [r for r in known if self._in_past(op, r)]

    def _chain_of(self, last: Op) -> list[Op]:
        """The reconfigurations from epoch 1 to ``last`` along ``last``'s past."""
        chain = [last]
        while chain[-1].body.epoch > 1:  # type: ignore[union-attr]
            below = [r for r in self._reconfigs_in_past(chain[-1])
                     if r.body.epoch == chain[-1].body.epoch - 1]  # type: ignore[union-attr]
            chain.append(min(below, key=lambda r: r.id))
        chain.reverse()
        return chain

    # -- admitting ops ---------------------------------------------------------------------

    def admitted(self, op: Op) -> tuple[bool, list[Op]]:
        """Note a newly applied op. Returns (recompute everything?, ops whose key may change:
        the heartbeat's newly placed ops and their batches)."""
        body = op.body
        author = op.author
        kind = type(body)
        if kind is HeartbeatBody:
            self.heartbeats.append(op)
        elif kind is ReconfigBody:
            self.by_epoch.setdefault(body.epoch, []).append(op)  # type: ignore[union-attr]
        recompute = False
        fork = self.fork_at.get(author)
        if fork is not None and self._forks_seen.get(author) != fork and (
            author in self.genesis or author in self.added_at
        ):
            self._forks_seen[author] = fork
            recompute = True  # a witness equivocated: what counts changed
        if kind is ReconfigBody:
            chain = self._winning_chain()
            if chain != self.reconfigs:
                self._install(chain)
                recompute = True
        if recompute:
            return True, []
        if kind is HeartbeatBody and self.counts(op):
            if op.lamport <= self.frozen:  # only a late copy of a compacted witness's past
                self._note_latest(op)
                return False, []
            return False, self._place_from(op)
        return False, []

    def _note_latest(self, heartbeat: Op) -> None:
        latest = self.latest.get(heartbeat.author)
        if latest is None or heartbeat.seq > latest.seq:
            self.latest[heartbeat.author] = heartbeat

    def _winning_chain(self) -> list[Op]:
        """The longest chain of reconfigurations, each in the next one's past; at an epoch with
        two (only lying witnesses make that), the lower op id."""
        chain: list[Op] = []
        epoch = 1
        while True:
            candidates = [r for r in self.by_epoch.get(epoch, ())
                          if not chain or self._in_past(r, chain[-1])]
            if not candidates:
                return chain
            chain.append(min(candidates, key=lambda r: r.id))
            epoch += 1

    def _install(self, chain: list[Op]) -> None:
        self.reconfigs = chain
        self.added_at = {}
        self.cut = {}
        self._proven_from = {}
        witnesses = self.genesis
        for reconfig in chain:
            body: ReconfigBody = reconfig.body  # type: ignore[assignment]
            for key in set(witnesses) - set(body.witnesses):
                self.cut[key] = self._last_seq_in_past(reconfig, key)
            for key in set(body.witnesses) - set(witnesses):
                self.added_at[key] = reconfig.lamport
            witnesses = body.witnesses
        self.current = frozenset(witnesses)

    def _last_seq_in_past(
        self, op: Op, author: bytes, read_back: dict[bytes, Op | None] | None = None
    ) -> int:
        """The highest sequence number of ``author``'s ops in ``op``'s past (0: none): a walk
        newest first that stops at the first op by ``author``.

        Compacted ops on the way are read back from the archive once each, and kept in
        ``read_back`` (pass one dict to several walks over the same past): an op is looked up
        once for its Lamport time and again when reached, and a node's archive read is a SQLite
        query and a decode. Reading each afresh, a walk over a cut's 19,000 compacted ops read
        the archive 110,000 times (bench: a pruning witness after a cut healed one way, 3.9 s
        on the event loop in a node)."""
        applied = self.applied
        memo: dict[bytes, Op | None] = {} if read_back is None else read_back

        def fetch(ident: bytes) -> Op | None:
            found = applied.get(ident)  # in memory (``get`` does not ask the archive)
            if found is None:
                if ident in memo:
                    return memo[ident]
                try:
                    found = applied[ident]  # read back from the archive
                except KeyError:  # compacted and not in the archive: walk past it
                    found = None
                memo[ident] = found
            return found

        def lamport_of(ident: bytes) -> int:
            found = fetch(ident)
            return 0 if found is None else found.lamport

        heap: list[tuple[int, bytes]] = [(-lamport_of(p), p) for p in op.parents]
        seen: set[bytes] = set()
        while heap:
            _, ident = heappop(heap)
            if ident in seen:
                continue
            seen.add(ident)
            ancestor = fetch(ident)
            if ancestor is None:
                continue
            if ancestor.author == author:
                return ancestor.seq
            for parent in ancestor.parents:
                if parent not in seen:
                    heappush(heap, (-lamport_of(parent), parent))
        return 0

    def _place_from(self, heartbeat: Op) -> list[Op]:
        """Place ``heartbeat``'s past at its Lamport time where that is lower than before.
        Returns the ops whose keys change (before they change: the caller reads old keys)."""
        lamport = heartbeat.lamport
        placement, applied = self.placement, self.applied
        moved: list[Op] = []
        stack = [heartbeat.id]
        seen: set[bytes] = set()
        while stack:
            ident = stack.pop()
            if ident in seen or placement.get(ident, UNPLACED) <= lamport:
                continue  # placed at or below: so is its whole past
            seen.add(ident)
            if ident not in applied:  # compacted (final): placed long ago, and so its past
                continue
            op = applied[ident]
            moved.append(op)
            stack.extend(op.parents)
        return moved

    def commit_placement(self, heartbeat: Op, moved: list[Op]) -> list[Op]:
        """Apply the placement ``_place_from`` found and re-rank the touched batches. Returns
        the ops of every touched batch (their keys may have changed)."""
        lamport = heartbeat.lamport
        placement, batches = self.placement, self.batches
        touched = {lamport}
        for op in moved:
            old = placement.get(op.id, UNPLACED)
            if old != UNPLACED:
                batch = batches[old]
                batch.discard(op.id)
                if batch:
                    touched.add(old)
                else:
                    del batches[old]
                    self.heartbeats_at.pop(old, None)
            placement[op.id] = lamport
            batches.setdefault(lamport, set()).add(op.id)
        self.heartbeats_at.setdefault(lamport, []).append(heartbeat.id)
        self._note_latest(heartbeat)
        members: list[Op] = []
        for point in touched:
            members += self._rank_batch(point)
        return members

    def _rank_batch(self, point: int) -> list[Op]:
        """Rank the ops placed at ``point``: parents in the batch first (ascending Lamport)."""
        applied, rank, placement = self.applied, self.rank, self.placement
        # specs/finality.md section 4: seed(P) = SHA-256(domain || sorted heartbeat ids), and
        # each op's hash SHA-256(seed(P) || op id), first 8 bytes big-endian.
        seed = hashlib.sha256(BATCH_DOMAIN + b"".join(sorted(self.heartbeats_at[point]))).digest()
        sha256 = hashlib.sha256
        ops = sorted((applied[i] for i in self.batches[point]), key=lambda o: (o.lamport, o.id))
        for op in ops:
            value = int.from_bytes(sha256(seed + op.id).digest()[:8], "big")
            for parent in op.parents:
                if placement.get(parent) == point:
                    parent_rank = rank[parent]
                    if parent_rank > value:
                        value = parent_rank
            rank[op.id] = value
        return ops

    def recompute(self) -> None:
        """Place and rank everything from the counted heartbeats (after a reconfiguration or a
        witness's fork changed what counts). After a compaction, what is placed at or below the
        frozen frontier stays where it is: it is final, and mostly no longer in memory."""
        frozen = self.frozen
        if frozen:
            kept = {i: p for i, p in self.placement.items() if p <= frozen}
            self.placement.clear()
            self.placement.update(kept)
            self.rank = {i: r for i, r in self.rank.items() if i in kept}
            self.batches = {p: b for p, b in self.batches.items() if p <= frozen}
            self.heartbeats_at = {p: h for p, h in self.heartbeats_at.items() if p <= frozen}
        else:
            self.placement.clear()
            self.rank.clear()
            self.batches.clear()
            self.heartbeats_at.clear()
        self.latest.clear()
        for heartbeat in sorted(self.heartbeats, key=lambda o: (o.lamport, o.id)):
            if self.counts(heartbeat):
                if heartbeat.lamport <= frozen:
                    self._note_latest(heartbeat)
                else:
                    self.commit_placement(heartbeat, self._place_from(heartbeat))

    def forget(self, ids: set[bytes], frontier: int) -> None:
        """Compaction: drop what is kept about ``ids`` (final ops leaving memory) and about the
        batches at or below ``frontier``, which becomes the frozen frontier."""
        self.frozen = max(self.frozen, frontier)
        placement, rank = self.placement, self.rank
        for ident in ids:
            placement.pop(ident, None)
            rank.pop(ident, None)
        frozen = self.frozen
        self.batches = {p: b for p, b in self.batches.items() if p > frozen}
        self.heartbeats_at = {p: h for p, h in self.heartbeats_at.items() if p > frozen}
        self.heartbeats = [h for h in self.heartbeats if h.id not in ids]

    # -- views -----------------------------------------------------------------------------

    def witnessed_time(self, ident: bytes) -> int | None:
        point = self.placement.get(ident)
        if point is None:
            return None
        applied = self.applied
        times = [
            t
            for h in self.heartbeats_at.get(point, ())
            if h in applied and (t := applied[h].body.time_ms)  # type: ignore[union-attr]
        ]
        return min(times) if times else None

    def witness_info(self) -> list[WitnessInfo]:
        keys = set(self.genesis) | set(self.added_at) | set(self.current)
        infos = []
        for key in sorted(keys):
            latest = self.latest.get(key)
            infos.append(
                WitnessInfo(
                    key,
                    0 if latest is None else latest.lamport,
                    0 if latest is None else latest.seq,
                    key in self.current,
                    key in self.fork_at,
                )
            )
        return infos

    def needs_heartbeat(self, witness: bytes, order: list[Op]) -> bool:
        """Whether ``witness`` has something to acknowledge: an op, other than a heartbeat of a
        witness in force, that is not placed at or below ``witness``'s latest counted heartbeat.
        The total order sorts by placement (unplaced last), so the last such op decides; the
        scan passes over the trailing heartbeats of witnesses in force (a few per interval;
        they need no acknowledgement, and acknowledging them would never end). A heartbeat by
        any other key, or by a removed or forked witness, is an op like an order here: it gets
        acknowledged (so it becomes final), and cannot make the scan long."""
        if witness not in self.current or witness in self.fork_at:
            return False
        latest = self.latest.get(witness)
        mine = 0 if latest is None else latest.lamport
        placement, current, forked = self.placement, self.current, self.fork_at
        for op in reversed(order):
            author = op.author
            if type(op.body) is HeartbeatBody and author in current and author not in forked:
                continue
            return placement.get(op.id, UNPLACED) > mine
        return False
