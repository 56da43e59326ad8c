"""The replica: ops in, derived book out. The one class everything revolves around.

A replica holds one market's causal log (every valid op it was given), keeps the ops in the total
order (Lamport time, op id), and derives the matched state by replaying them through the
``Engine``. It does no I/O: whoever owns the sockets, the disk and the clock feeds it ops.

Costs (n applied ops):
- an op that sorts after everything applied: one dict insert, one list append, one match;
- an op that sorts k places from the end: k undos, a list insert (a memmove of n pointers,
  ~20 us at n = 200k), k + 1 matches;
- a batch (``apply_many``) rewinds once, to the earliest place any of its ops sorts, and puts
  the ops that sort before the end in place in one merge (not a bisect and an insert each);
- an op whose parents are missing: kept in a bounded pending buffer until they arrive.

Checkpoints (``checkpoint``, ``restore``): a restart applies the stored ops without matching them,
takes over the matched state of the first N from a checkpoint and matches only the rest. A
restored replica has no undo records for those N ops (the undo floor): an op that later sorts
among them makes the replica match everything from scratch once, so it ends where a replica that
applied the same ops one by one would.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Final, NamedTuple, Protocol, TypeVar, overload

from ._checkpoint import Checkpoint, encode_checkpoint, install, read_checkpoint
from ._engine import PARTIALLY_FILLED, Engine, Fill
from ._errors import BadCancel, BadWitness, InvalidOp, InvalidParent, SigningWaits, WrongMarket
from ._finality import UNPLACED, WitnessInfo, Witnessing, check_approval
from ._identity import Identity
from ._limits import MAX_CLIENT_TAG_BYTES, MAX_PARENTS
from ._market import Market
from ._ops import (
    BUY,
    EXPIRE_MAKER,
    SELL,
    STP_MODES,
    TIFS,
    Body,
    CancelAllBody,
    CancelBody,
    HeartbeatBody,
    Op,
    OrderBody,
    ReconfigBody,
    decode,
    decode_with_id,
    op_id,
    reconfig_message,
    sign_op,
)
from ._points import DEFAULT_POINT_INTERVAL, FINAL_CHAIN_DOMAIN, PointInfo, PrefixState
from ._state import Book, OrderState, book_view, order_state, state_digest, witnessed_digest
from ._validity import check_in_context, on_own_chain

__all__ = ["ApplyReport", "Archive", "CompactReport", "Replica", "RestoreReport", "Rows"]

_T = TypeVar("_T")

#: Ops waiting for parents. Enough for a gap of several seconds at thousands of ops/s; past it
#: the sync protocol offers the ops again once their parents are in.
DEFAULT_MAX_PENDING: Final = 100_000
#: A witnessed replica drops the undo records of final ops (nothing ever rewinds below the
#: frontier) once this many have piled up: the tape is the largest per-op structure (~140 B/op),
#: and trimming costs a pass over the provisional tail, so it is done in steps, not per op.
TRIM_FINAL_UNDO_AFTER: Final = 4096
#: Ids of evicted pending ops kept for ``take_evicted`` between two calls. One apply evicts at
#: most as many ops as it is given, and a node takes them after every batch (at most 2,000 ops:
#: a gossip message or a sync frame), so this bounds only a caller that never takes them.
MAX_EVICTED_REMEMBERED: Final = 10_000
#: Invalid op ids remembered so that a re-sent invalid op is refused without a signature check,
#: and its descendants are refused at once. Oldest forgotten first.
MAX_INVALID_REMEMBERED: Final = 10_000


#: Rewinds remembered for ``fill_changes_since`` (a watcher further behind compares everything).
MAX_FILL_REWINDS_REMEMBERED: Final = 1024
#: Compaction keeps this many of the newest ops of the prefix in memory (besides what it must
#: keep), or the point interval if smaller: an op in flight names recent ops as parents, and
#: finding them here costs no archive lookup (and a joiner, no wait for the history). Part of
#: the point state, so every replica of a market keeps the same.
KEEP_RECENT_FINAL: Final = 2048
#: Attested points remembered for ``attesting`` (a node offers its latest; the others are for
#: one that is a little behind or ahead). Oldest forgotten first.
MAX_POINTS_REMEMBERED: Final = 8


class Archive(Protocol):
    """Where a compacted replica finds an op it took out of memory (a node's store).

    ``get`` returns the op, or its encoded bytes (trusted: decoded without a signature check),
    for an op this replica compacted, and None for any other id. It must never answer for an op
    that was not compacted (say one still waiting for parents): the replica takes whatever it
    returns as final."""

    def get(self, ident: bytes) -> Op | bytes | None: ...


class _Applied(dict[bytes, Op]):
    """The applied ops by id. A miss (``applied[id]``; not ``in`` or ``get``) asks the archive,
    so the validity rules and the walks over the past read a compacted op as if it had never
    left. What the archive returns is not kept here (``id in applied`` stays false for it)."""

    __slots__ = ("hydrate",)

    def __init__(self) -> None:
        super().__init__()
        self.hydrate: Callable[[bytes], Op | None] | None = None

    def __missing__(self, ident: bytes) -> Op:
        hydrate = self.hydrate
        op = None if hydrate is None else hydrate(ident)
        if op is None:
            raise KeyError(ident)
        return op


class RestoreReport(NamedTuple):
    """What ``Replica.restore`` (or ``from_snapshot``) did, read off ``replica.restore_report``."""

    #: How many leading ops' matched state came from the checkpoint (0: none; everything was
    #: matched here).
    from_checkpoint: int
    #: Why a checkpoint given was not used (None: used, or none given).
    checkpoint_unused: str | None
    #: Ops refused, as ``(op id if known, why)``.
    skipped: tuple[tuple[bytes | None, InvalidOp], ...]


class Rows(Sequence[_T]):
    """A read-only sequence whose items are built as they are read: a compaction's fills and
    finished orders (~20k of each per point) are read in a node's store thread, so building
    them there keeps the compaction's pause on the event loop short (measured: 0.12 -> 0.05 s a
    point). What they are built from (the final engine at the point) is never changed again."""

    __slots__ = ("_count", "_make")

    def __init__(self, count: int, make: Callable[[int], _T]) -> None:
        self._count = count
        self._make = make

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> _T: ...
    @overload
    def __getitem__(self, index: slice) -> list[_T]: ...
    def __getitem__(self, index: int | slice) -> _T | list[_T]:
        if isinstance(index, slice):
            return [self._make(i) for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(index)
        return self._make(index)


class CompactReport(NamedTuple):
    """What one ``Replica.compact`` took out of memory (for a node to keep in its store)."""

    ops: list[bytes]  # ids of the ops that left memory (all final)
    fills_start: int  # global index of the first of ``fills``
    fills: Sequence[Fill]  # the final fills that left memory, in order (built as read)
    orders: Sequence[OrderState]  # the final, finished orders that left memory (same)
    #: The point compacted at (final ops before it; 0: none, nothing was done).
    point: int = 0
    #: The ids of the prefix ops this compaction added to it (from the previous point to this
    #: one) in total order; ``order[0]`` is final op number ``order_start`` (from 0). A node
    #: keeps these positions to serve the history in order.
    order_start: int = 0
    order: tuple[bytes, ...] = ()


class _Capture(NamedTuple):
    """The final state at a point, taken as the final engine passed it (``_advance_final``)."""

    local: int  # ops of ``_order`` before the point
    chain: bytes  # the running hash there
    engine: Engine  # the matched state there: resting orders only (``Engine.compacted``)
    fills: int  # the final engine's fills and order rows there
    rows: int
    placement: int  # of the point's batch


def _order_key(op: Op) -> tuple[int, bytes]:
    return (op.lamport, op.id)


class ApplyReport(NamedTuple):
    """What one ``apply_many`` call did."""

    applied: list[Op]  # newly applied ops (including released pending ones), in apply order
    pending: int  # ops of this call now waiting for parents
    duplicates: int  # ops already known (applied, pending or known invalid)
    invalid: list[tuple[bytes | None, InvalidOp]]  # (op id if known, why) for refused ops


class Replica:
    """One market's replicated book.

    Any two replicas given the same set of ops, in any order and with any repetition, have the
    same ``digest()``.
    """

    def __init__(
        self,
        market: Market,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        archive: Archive | None = None,
        point_interval: int = DEFAULT_POINT_INTERVAL,
    ) -> None:
        if type(point_interval) is not int or point_interval < 1:
            raise ValueError(f"point_interval must be a positive integer, not {point_interval!r}")
        self.market = market
        self._market_id = market.id
        self.max_pending = max_pending
        self._applied = _Applied()
        #: Compaction (witnessed markets): where compacted ops are found again, how many ops,
        #: fills and orders left memory, and what the final state was at that point.
        self._archive = archive
        self.compacted_ops = 0
        self.compacted_fills = 0
        self.compacted_orders = 0
        #: The largest Lamport time of a compacted op: only an op at or below it can be a late
        #: copy of one (``_accept`` asks the archive about those only).
        self._compacted_lamport = 0
        #: The matched state at the compaction point (resting orders only): what an engine
        #: starts from when it must start over.
        self._compact_base: Engine | None = None
        #: Rewinds that took fills back: how many so far, and the lowest fill index each left.
        self._fill_rewinds = 0
        self._fill_lows: deque[int] = deque(maxlen=MAX_FILL_REWINDS_REMEMBERED)
        self._chain_base = bytes(32)
        self._final_chain = bytes(32)
        #: Points (crdtbook._points): the interval, the count the next one must reach, the
        #: latest one the final engine passed and this replica has not compacted at yet, the
        #: latest one it compacted at with its point state, and what it carries of the prefix.
        self.point_interval = point_interval
        self._point_target = point_interval
        self._capture: _Capture | None = None
        self.point: PointInfo | None = None
        self._point_blob: bytes | None = None
        self._prefix = PrefixState()
        #: (n, hash) -> witness -> its heartbeat attesting that point (bounded).
        self._attestations: dict[tuple[int, bytes], dict[bytes, Op]] = {}
        #: False for a replica that joined from a point state and has not got the prefix's ops
        #: (its archive lacks them): ops whose verdict needs them wait in ``_history_wait``
        #: (``history_wanted``) until ``history_complete``. ``_point_seq``: each author's
        #: highest sequence number in the prefix (an op at or below it may be a copy of one).
        self._history = True
        self._point_seq: dict[bytes, int] = {}
        self._history_wait: dict[bytes, Op] = {}
        self._history_copies: set[bytes] = set()
        #: How many times this replica was told its archive lost ops (``forget_history``): an op
        #: parked before may wait for a parent that was present then (``_rewait``).
        self._forgets = 0
        self._order: list[Op] = []  # applied ops in total order
        #: During ``apply_many``: the batch's ops that sort before the end of ``_order``, and
        #: every op admitted after the first of them. They are put in place in one merge at the
        #: end of the batch (``_place_late``), after one rewind, instead of a bisect, a rewind
        #: and a list insert each (and before a counted heartbeat or a recomputation re-sorts
        #: the order). None outside ``apply_many``.
        self._late: list[Op] | None = None
        self._matched = 0  # how many of _order the engine has processed
        #: Where each matched op's undo records begin on the engine's tape (8 bytes per op, and
        #: no object: an array, not a list of ints).
        self._marks = array("q")
        self._engine = Engine(client_ids=market.witnessed)
        #: Ops below this position have no undo records (they came from a checkpoint): undoing
        #: one means deriving from scratch. 0 unless restored from a checkpoint.
        self._floor = 0
        #: While restoring: admit ops without matching them (``restore`` matches at the end).
        self._deferred = False
        #: What ``restore`` or ``from_snapshot`` did (all empty: this replica was not restored).
        self.restore_report = RestoreReport(0, None, ())
        self._heads: set[bytes] = set()
        self._pending: dict[bytes, Op] = {}
        self._waiting: dict[bytes, list[bytes]] = {}  # absent parent id -> pending child ids
        self._invalid: dict[bytes, InvalidOp] = {}
        self._author_tip: dict[bytes, Op] = {}  # author -> its applied op with the highest seq
        #: author -> its applied op last in the total order: what it authors on top of. The same
        #: op as the tip unless the author equivocated; then building on it keeps the new op
        #: last in the total order (it sees the author's every branch's Lamport time).
        self._author_latest: dict[bytes, Op] = {}
        self._fork_at: dict[bytes, int] = {}  # author -> lowest seq with two ops (equivocation)
        #: Bumped whenever derived state may have changed; cheap change detection for watchers.
        self.version = 0
        #: Pending ops forgotten because the buffer was full (oldest first; see ``_park``).
        self.evicted = 0
        #: Their ids, for a caller that keeps what it was given (a node's store) and wants to
        #: forget them too: ``take_evicted`` (bounded: MAX_EVICTED_REMEMBERED).
        self._evicted_ids: list[bytes] = []
        #: Ids of pending ops refused once judged (a parent turned out invalid, or the op did
        #: when its parents arrived), for the same caller: ``take_refused_pending`` (bounded too).
        self._refused_pending_ids: list[bytes] = []
        #: Placement and the finality frontier (witnessed markets only; specs/finality.md).
        self._fin = (
            Witnessing(market.id, market.witnesses, self._applied, self._fork_at)
            if market.witnessed
            else None
        )
        #: The matched state after the final prefix, fed each op once as it becomes final and
        #: never undone (witnessed markets). Final views read it in O(1) (counts, an order's
        #: finality) or O(book) (the final book), however long the provisional tail has grown
        #: while a witness is silent. Order numbers are the main engine's: both process the
        #: same prefix in the same order.
        self._final_engine = Engine(client_ids=True) if market.witnessed else None
        self._final_fed = 0  # how many ops of _order the final engine has processed
        self._placed_since_trim = False  # a counted heartbeat moved the frontier, maybe
        self._final_version = -1  # self.version when _final_fed was last brought up to date
        if self._fin is not None and archive is not None:
            self._applied.hydrate = self._hydrate

    def _hydrate(self, ident: bytes) -> Op | None:
        """A compacted op read back from the archive (final; not kept in memory)."""
        archive, fin = self._archive, self._fin
        if archive is None or fin is None or not self.compacted_ops:
            return None
        found = archive.get(ident)
        if found is None:
            return None
        op = found if isinstance(found, Op) else decode(bytes(found), verify=False)
        if op.id != ident or op.market_id != self._market_id:
            return None
        # Not kept: an op read back is needed for one verdict or one walk (a sync peer's walk
        # may read the whole history), so memory stays what compaction left. A walk knows such
        # an op by its absence from the applied ops after reading it: compacted, so placed.
        return op

    def _present(self, ident: bytes) -> bool:
        """Applied (in memory, or compacted and found in the archive)."""
        if ident in self._applied:
            return True
        return self.compacted_ops > 0 and self._hydrate(ident) is not None

    def _fresh_engine(self) -> Engine:
        """An engine at the start of ``_order``: empty, or the state at the compaction point."""
        base = self._compact_base
        return Engine(client_ids=self.market.witnessed) if base is None else base.compacted()

    # -- input -------------------------------------------------------------------------------

    def apply(self, item: Op | bytes) -> list[Op]:
        """Apply one op (an ``Op`` or its encoded bytes). Idempotent.

        Returns:
            The ops this call applied: ``[op]`` plus any pending ops it released, ``[]`` when the
            op was known already or now waits for missing parents (see ``missing()``).

        Raises:
            InvalidOp: the op is invalid (nothing changed).

        An op whose parents are missing waits in a bounded buffer (``max_pending``); when it is
        full the op that waited longest is forgotten (``evicted`` counts them).
        """
        op = self._accept(item)
        if op is None:
            return []
        if not self._history and self._needs_history(op):
            self._hold_for_history(op)
            return []
        applied: list[Op] = []
        try:
            if not self._admit(op):
                self._park(op)
                return []
            applied.append(op)
            if self._waiting:
                self._release(op, applied)
        finally:
            if self._matched != len(self._order):
                self._rematch()
            if self._placed_since_trim:
                self._trim_final_undo()
        self.version += 1
        return applied

    def apply_many(self, items: Iterable[Op | bytes]) -> ApplyReport:
        """Apply a batch, rewinding the matched state at most once. Never raises for bad ops:
        they are listed in the report."""
        applied: list[Op] = []
        pending = duplicates = 0
        invalid: list[tuple[bytes | None, InvalidOp]] = []
        late: list[Op] = []
        self._late = late
        try:
            for item in items:
                try:
                    op = self._accept(item)
                    if op is None:
                        duplicates += 1
                    elif not self._history and self._needs_history(op):
                        self._hold_for_history(op)
                        pending += 1
                    elif self._admit(op):
                        applied.append(op)
                        if self._waiting:
                            self._release(op, applied)
                    else:
                        self._park(op)
                        pending += 1
                except InvalidOp as exc:
                    ident = item.id if isinstance(item, Op) else op_id(bytes(item))
                    invalid.append((ident, exc))
        finally:
            self._late = None
            self._place_late(late)
            self._rematch()
            if self._placed_since_trim:
                self._trim_final_undo()
        if applied:
            self.version += 1
        return ApplyReport(applied, pending, duplicates, invalid)

    def _accept(self, item: Op | bytes) -> Op | None:
        """Decode if needed; None for an op already known."""
        if type(item) is Op:
            op = item
            ident = op.id
        else:
            raw = bytes(item)  # type: ignore[arg-type]
            ident = op_id(raw)
            if ident in self._applied or ident in self._pending:
                return None  # known: no decode, no second signature check
            known_bad = self._invalid.get(ident)
            if known_bad is not None:
                raise type(known_bad)(str(known_bad))
            try:
                op = decode_with_id(raw, ident, self.intern_id)
            except InvalidOp as exc:
                # These bytes are invalid for ever: refuse a resend without decoding again, and
                # every op waiting on them with it.
                self._reject_pending_descendants(ident, exc)
                raise
        if ident in self._applied or ident in self._pending or ident in self._history_wait:
            return None
        if (
            self.compacted_ops
            and op.lamport <= self._compacted_lamport
            and self._archive is not None
            and self._archive.get(ident) is not None
        ):
            return None  # a late copy of a compacted op
        if self._invalid:
            known_bad = self._invalid.get(ident)
            if known_bad is not None:
                raise type(known_bad)(str(known_bad))
        if op.market_id != self._market_id or op.version != self.market.version:
            wrong = WrongMarket(
                f"op is for market {op.market_id.hex()[:16]} (protocol version {op.version}), "
                f"this replica is {self.market.name} ({self.market.id.hex()[:16]}, version "
                f"{self.market.version})"
            )
            self._reject_pending_descendants(ident, wrong)
            raise wrong
        return op

    def precheck(self, op: Op) -> bool:
        """Judge ``op`` against the applied log without applying it (e.g. a gossip validator
        deciding whether to forward). True: valid, with every parent applied. False: no verdict
        now (some parent is not applied yet, or its verdict needs the history this replica
        lacks). Raises the ``InvalidOp`` it would raise on apply. Changes nothing."""
        if op.market_id != self.market.id or op.version != self.market.version:
            raise WrongMarket(f"op is not for market {self.market.name}")
        if not self._history and self._needs_history(op):
            # Judged on apply once the history is back (``apply`` holds it): its rules read the
            # prefix this replica lacks. Judged here, a valid reconfiguration was refused (its
            # walk could not reach the one before it) and its senders counted against.
            return False
        if check_in_context(op, self._applied, self._unique_at_seq):
            if self._fin is not None and type(op.body) is ReconfigBody:
                self._fin.check_reconfig(op)
            return True
        if any(p in self._invalid for p in op.parents if p not in self._applied):
            raise InvalidParent("a parent of this op is invalid")
        return False

    def _park(self, op: Op) -> None:
        """``op`` has parents that are not applied: refuse it if one is known invalid, else keep
        it pending until they arrive."""
        missing = [p for p in op.parents if not self._present(p)]
        if any(p in self._invalid for p in missing):
            bad_parent = InvalidParent("a parent of this op is invalid")
            self._reject_pending_descendants(op.id, bad_parent)
            raise bad_parent
        while len(self._pending) >= max(1, self.max_pending):
            self._evict_oldest_pending()
        self._pending[op.id] = op
        for parent in missing:
            self._waiting.setdefault(parent, []).append(op.id)

    def _evict_oldest_pending(self) -> None:
        """Forget the op that has waited longest for its parents (the buffer is full). It is
        not a verdict: the op is simply unknown again, and its children that wait for it now
        list it in ``missing()``, so sync fetches it once more when it can be applied. Oldest
        first, so that orphans that never resolve (a peer's flood) cannot hold the buffer."""
        ident, op = next(iter(self._pending.items()))
        del self._pending[ident]
        self._unwait(op)
        self.evicted += 1
        if len(self._evicted_ids) < MAX_EVICTED_REMEMBERED:
            self._evicted_ids.append(ident)

    def _unwait(self, op: Op) -> None:
        """Take a pending op that leaves the buffer off the waiting lists of its parents."""
        ident = op.id
        for parent in op.parents:
            waiters = self._waiting.get(parent)
            if waiters is not None and ident in waiters:
                waiters.remove(ident)
                if not waiters:
                    del self._waiting[parent]

    def take_evicted(self) -> list[bytes]:
        """The ids of the pending ops forgotten since the last call (a node deletes them from
        its store, so a flood of orphans does not grow the disk either)."""
        taken, self._evicted_ids = self._evicted_ids, []
        return taken

    def take_refused_pending(self) -> list[bytes]:
        """The ids of the ops refused since the last call after waiting in the pending buffer
        (so not in any ``ApplyReport.invalid``): a node that stored them deletes them."""
        taken, self._refused_pending_ids = self._refused_pending_ids, []
        return taken

    def _note_refused_pending(self, ident: bytes) -> None:
        if len(self._refused_pending_ids) < MAX_EVICTED_REMEMBERED:
            self._refused_pending_ids.append(ident)

    def _release(self, op: Op, applied: list[Op]) -> None:
        """Admit every pending op that ``op`` (just admitted) unblocks, and theirs in turn."""
        self._release_id(op.id, applied)

    def _release_id(self, ident: bytes, applied: list[Op]) -> None:
        ready = [ident]
        held = self._applied
        while ready:
            for child_id in self._waiting.pop(ready.pop(), ()):
                child = self._pending.get(child_id)
                if child is None:
                    continue
                parents = child.parents
                # The common case (all in memory) without a method call per parent; the archive
                # is asked only when one is not.
                if any(p not in held for p in parents) and not all(map(self._present, parents)):
                    if self._forgets:
                        self._rewait(child)
                    continue
                del self._pending[child_id]
                if not self._history and self._needs_history(child):
                    self._hold_for_history(child)
                    continue
                try:
                    admitted = self._admit(child)
                except InvalidOp as exc:
                    self._note_refused_pending(child_id)
                    self._reject_pending_descendants(child_id, exc)
                    continue
                if not admitted:  # (not expected: every parent was just found present)
                    self._park(child)
                    continue
                applied.append(child)
                ready.append(child_id)

    def _rewait(self, op: Op) -> None:
        """``op``, pending, still lacks a parent: make sure it waits for each one it lacks. It
        was put on the waiting lists of the parents it lacked when it was parked; a parent
        present then (compacted, in the archive) may have left since (``forget_history``: a
        node's retention pruned it), and without this the op would wait for nothing: never
        released, with every later op that descends from it (seen: a pruned witness stuck for
        good after fetching its history back, 35k ops pending and none missing). Only a
        replica that forgot history calls it: each list is searched, as ``_unwait`` does."""
        ident = op.id
        for parent in op.parents:
            if not self._present(parent):
                waiters = self._waiting.setdefault(parent, [])
                if ident not in waiters:
                    waiters.append(ident)

    def _admit(self, op: Op) -> bool:
        """Judge ``op`` and, when valid, add it to the log, matching it at once when it sorts
        after everything matched (the common case). False (nothing changed): a parent is
        missing. Raises (remembering the verdict) when it is invalid."""
        try:
            if not check_in_context(op, self._applied, self._unique_at_seq):
                return False
            if self._fin is not None and type(op.body) is ReconfigBody:
                self._fin.check_reconfig(op)
        except InvalidOp as exc:
            self._remember_invalid(op.id, exc)
            self._reject_pending_descendants(op.id, exc)
            raise
        ident = op.id
        self._applied[ident] = op
        heads = self._heads
        heads.difference_update(op.parents)
        heads.add(ident)
        author = op.author
        tip = self._author_tip.get(author)
        if (
            tip is not None
            and tip is self._author_latest[author]
            and op.seq == tip.seq + 1
            and tip.id in op.parents
        ):  # the author's next op on its one chain: the common case
            self._author_tip[author] = self._author_latest[author] = op
        else:
            self._track_author(op)
        if self._fin is not None:
            if type(op.body) is HeartbeatBody and op.body.point:
                self._note_attestation(op)
            self._place_witnessed(op)
            return True
        late = self._late
        if late:  # apply_many has ops to put in place at its end: this one goes with them
            late.append(op)
            return True
        order = self._order
        if order:
            last = order[-1]
            after = op.lamport > last.lamport or (op.lamport == last.lamport and ident > last.id)
        else:
            after = True
        if after:
            order.append(op)
            # Everything before it is matched: match it.
            if self._matched == len(order) - 1 and not self._deferred:
                engine = self._engine
                self._marks.append(len(engine.tape))
                engine.process(op)
                self._matched += 1
            return True
        if late is not None:  # in apply_many: placed at its end (``_place_late``)
            late.append(op)
            return True
        position = bisect_left(order, _order_key(op), key=_order_key)
        self._rewind_to(position)
        order.insert(position, op)
        return True

    def _place_late(self, late: list[Op]) -> None:
        """Put the late ops of ``apply_many`` (``_late``) into the total order, and empty the
        list: one rewind, to where the first of them sorts, and one merge of two sorted runs
        (the tail from there, and the late ops) by Timsort; ``_rematch`` matches the tail."""
        if not late:
            return
        key = _order_key if self._fin is None else self._fin.key
        late.sort(key=key)
        order = self._order
        position = bisect_left(order, key(late[0]), key=key)
        self._rewind_to(position)
        tail = order[position:]
        tail += late
        tail.sort(key=key)
        order[position:] = tail
        late.clear()

    def _place_witnessed(self, op: Op) -> None:
        """Put a just-admitted op of a witnessed market into the total order: at its key (the
        end, for an op no heartbeat has placed yet), or, for a counted heartbeat, re-sort the
        provisional tail after moving what it places (specs/finality.md)."""
        fin = self._fin
        assert fin is not None
        key = fin.key
        order = self._order
        recompute, moved = fin.admitted(op)
        late = self._late
        if late and (recompute or moved):
            # Keys change: the batch's late ops go in place first, so that the order holds
            # every admitted op whenever it is re-sorted.
            self._place_late(late)
        if recompute:  # a reconfiguration or a witness's fork changed what counts
            self._rewind_to(-1)
            self._final_engine = self._fresh_engine()  # rebuilt on the next final view
            self._final_chain = self._chain_base
            self._final_fed = 0
            self._final_version = -1
            fin.recompute()
            order.append(op)
            order.sort(key=key)
            return
        if not moved:
            if late:  # apply_many has late ops to put in place at its end: this one goes too
                late.append(op)
                return
            op_key = key(op)
            if not order or op_key > key(order[-1]):
                order.append(op)
                if self._matched == len(order) - 1 and not self._deferred:
                    engine = self._engine
                    self._marks.append(len(engine.tape))
                    engine.process(op)
                    self._matched += 1
                return
            if late is not None:  # in apply_many: placed at its end (``_place_late``)
                late.append(op)
                return
            position = bisect_left(order, op_key, key=key)
            self._rewind_to(position)
            order.insert(position, op)
            return
        # A counted heartbeat: everything it moves (all above it now) and its batch sort again.
        # Where the lowest of them sorts: one bisect for the smallest key (positions grow with
        # keys), not one per moved op (a heartbeat moves every op since the last one).
        lowest = (op.lamport, -1, 0, b"")
        for other in moved:
            if other is not op:
                other_key = key(other)
                if other_key < lowest:
                    lowest = other_key
        low = bisect_left(order, lowest, key=key)
        self._rewind_to(low)
        self._placed_since_trim = True
        fin.commit_placement(op, moved)
        tail = order[low:]
        tail.append(op)
        tail.sort(key=key)
        order[low:] = tail

    def _trim_final_undo(self) -> None:
        """Drop the undo records of final ops (witnessed markets): raise the undo floor to the
        final prefix. Only a lying witness could make the replica rewind below it, and then it
        derives from scratch, as below any floor."""
        self._placed_since_trim = False
        fin = self._fin
        if fin is None or self._deferred:
            return
        final = min(fin.final_count(self._order), self._matched)
        if final - self._floor < TRIM_FINAL_UNDO_AFTER:
            return
        marks = self._marks
        start = marks[final] if final < self._matched else len(self._engine.tape)
        del self._engine.tape[:start]
        if start:
            marks[final:] = array("q", [mark - start for mark in marks[final:]])
        self._floor = final

    def _track_author(self, op: Op) -> None:
        author = op.author
        tip = self._author_tip.get(author)
        if tip is None:
            self._author_latest[author] = self._author_tip[author] = op
            return
        latest = self._author_latest[author]
        if op.lamport > latest.lamport or (op.lamport == latest.lamport and op.id > latest.id):
            self._author_latest[author] = op
        # Without equivocation an author's ops form a chain and each new one extends the tip.
        if op.seq != tip.seq + 1 or tip.id not in op.parents:
            fork = self._fork_at.get(author)
            self._fork_at[author] = op.seq if fork is None else min(fork, op.seq)
        if op.seq > tip.seq:
            self._author_tip[author] = op

    def _unique_at_seq(self, author: bytes, seq: int) -> bool:
        fork = self._fork_at.get(author)
        return fork is None or seq < fork

    def remember_invalid(self, ident: bytes, exc: InvalidOp) -> None:
        """Record that the op with this id was refused (by a caller that decoded it itself), so
        a resend is refused without another signature check. Bounded; oldest forgotten first."""
        if ident not in self._applied and ident not in self._pending:
            self._remember_invalid(ident, exc)

    def _remember_invalid(self, ident: bytes, exc: InvalidOp) -> None:
        if len(self._invalid) >= MAX_INVALID_REMEMBERED:
            del self._invalid[next(iter(self._invalid))]
        self._invalid[ident] = exc

    def _reject_pending_descendants(self, ident: bytes, cause: InvalidOp) -> None:
        self._remember_invalid(ident, cause)
        doomed = [ident]
        while doomed:
            for child_id in self._waiting.pop(doomed.pop(), ()):
                child = self._pending.pop(child_id, None)
                if child is None:
                    continue
                self._note_refused_pending(child_id)
                self._unwait(child)
                self._remember_invalid(child_id, InvalidParent("an ancestor of this op is invalid"))
                doomed.append(child_id)

    # -- derivation --------------------------------------------------------------------------

    def _rewind_to(self, position: int) -> None:
        """Undo the matched ops at ``position`` and after, last first. Below the undo floor there
        is nothing to undo with: start over from an empty engine (``_rematch`` redoes it all)."""
        if position < self._floor:
            self._engine = self._fresh_engine()
            self._marks = array("q")
            self._matched = self._floor = 0
            self._note_fills_from(self.compacted_fills)
            return
        order, marks = self._order, self._marks
        fills = self._engine.fills
        before = len(fills)
        undo = self._engine.undo
        for index in range(self._matched - 1, position - 1, -1):
            undo(order[index], marks[index])
        if position < self._matched:
            del marks[position:]
            self._matched = position
        if len(fills) < before:
            self._note_fills_from(self.compacted_fills + len(fills))

    def _note_fills_from(self, low: int) -> None:
        """Fills from index ``low`` on were taken back (a rewind): remembered for
        ``fill_changes_since``, the newest ``MAX_FILL_REWINDS_REMEMBERED`` rewinds."""
        self._fill_rewinds += 1
        self._fill_lows.append(low)

    def fill_changes_since(self, token: int | None) -> tuple[int | None, int]:
        """(the lowest fill index a rewind took back since ``token``, or None if no fill was
        taken back; a token for the next call). Fills below that index are as they were: a
        watcher compares only from there. ``token`` None, or one too old to answer: 0 (compare
        everything)."""
        now = self._fill_rewinds
        if token is None or now - token > len(self._fill_lows):
            return 0, now
        if token == now:
            return None, now
        lows = self._fill_lows
        return min(lows[i] for i in range(len(lows) - (now - token), len(lows))), now

    def _rematch(self) -> None:
        if self._deferred:
            return
        order, marks = self._order, self._marks
        engine = self._engine
        tape, process = engine.tape, engine.process
        for index in range(self._matched, len(order)):
            marks.append(len(tape))
            process(order[index])
        self._matched = len(order)

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint(self, tail: int = 0) -> bytes:
        """A blob of the matched state after the first applied ops, for ``restore`` (format:
        ``crdtbook._checkpoint``). Its size and cost grow with the log: milliseconds per 10k ops.

        ``tail``: leave the last ``tail`` ops out (the blob covers at least the undo floor). A
        restore matches them again, but keeps their undo records, so a late op that sorts among
        them (one concurrent with the last ops, say) costs a short rewind, not a full rematch.
        """
        if tail < 0:
            raise ValueError(f"tail must be >= 0, not {tail}")
        order = self._order
        covered = max(self._floor, len(order) - tail)
        if self._fin is not None:  # only the final prefix: it never changes, so the blob holds
            covered = max(self._floor, min(covered, self._fin.final_count(order)))
        if covered >= self._matched:
            return encode_checkpoint(self._market_id, order, covered, self._engine)
        self._rewind_to(covered)  # at or above the floor: a real rewind, no rebuild
        try:
            return encode_checkpoint(self._market_id, order, covered, self._engine)
        finally:
            self._rematch()

    @property
    def undo_floor(self) -> int:
        """How many leading ops have no undo records (restored from a checkpoint and not
        rematched since); a checkpoint covers at least these."""
        return self._floor

    @classmethod
    def restore(
        cls,
        market: Market,
        ops: Iterable[Op | bytes],
        checkpoint: bytes | None,
        *,
        verify: bool = True,
        max_pending: int = DEFAULT_MAX_PENDING,
        archive: Archive | None = None,
        point_interval: int = DEFAULT_POINT_INTERVAL,
    ) -> Replica:
        """A replica holding ``ops`` (any order, repeats, ops still waiting for parents, ops
        newer than the checkpoint), equal to one that applied them one by one; matched from
        ``checkpoint`` where it covers the start of the log, else from scratch.

        Every op is judged as ``apply_many`` judges it; a refused one is skipped. ``checkpoint``
        may be None or any bytes: one that does not apply (another market or version, damaged,
        or a late op now sorts inside what it covers) is ignored. The replica's
        ``restore_report`` (a ``RestoreReport``) says how many ops the checkpoint covered, why
        it was not used, and which ops were skipped.

        ``verify=False`` skips the signature check of ops given as bytes: only for bytes the
        caller verified before (its own store). ``archive``: where the replica will find what
        it compacts later (see ``compact``); ``point_interval``: where it compacts.
        """
        replica = cls(market, max_pending=max_pending, archive=archive,
                      point_interval=point_interval)
        skipped: list[tuple[bytes | None, InvalidOp]] = []

        def decoded() -> Iterator[Op | bytes]:
            for item in ops:
                if verify or isinstance(item, Op):  # apply_many hashes, dedups and verifies
                    yield item
                    continue
                raw = bytes(item)
                try:
                    # Decoded one at a time as apply_many asks (in a store's total order,
                    # parents are applied first): parent ids share the applied ops' objects.
                    yield decode(raw, verify=False, intern_id=replica.intern_id)
                except InvalidOp as exc:
                    ident = op_id(raw)
                    replica._reject_pending_descendants(ident, exc)  # as apply_many would
                    skipped.append((ident, exc))

        # Admit every op first, then match (or take over the matched state of the first ones,
        # and match the rest). Even with nothing to take over, matching in a pass of its own
        # measured ~1 us/op cheaper than matching each op between decoding and admitting the
        # next (200k stored ops: 11.5 -> 10.6 us/op; a tighter loop for the interpreter).
        read = None if checkpoint is None else read_checkpoint(checkpoint, replica._market_id)
        replica._deferred = True
        try:
            report = replica.apply_many(decoded())
        finally:
            replica._deferred = False
        skipped.extend(report.invalid)
        from_checkpoint, unused = 0, None
        if isinstance(read, Checkpoint):
            engine = install(read, replica._order, market.witnessed)
            if isinstance(engine, Engine):
                replica._engine = engine
                replica._matched = replica._floor = read.ops
                replica._marks = array("q", bytes(8 * read.ops))  # never read: below the floor
                from_checkpoint = read.ops
                # A witnessed market's checkpoint covers final ops only: the final engine
                # starts from the same state (a second copy of it, as it will diverge).
                if replica._fin is not None and read.ops <= replica._advance_final_count():
                    final = install(read, replica._order, True)
                    if isinstance(final, Engine):
                        replica._final_engine = final
                        replica._final_fed = read.ops
                        # Points it covers are passed unseen: the first one is after it.
                        replica._point_target = replica._next_point_target(read.ops)
                        chain, sha256 = replica._final_chain, hashlib.sha256
                        for op in replica._order[: read.ops]:
                            chain = sha256(FINAL_CHAIN_DOMAIN + chain + op.id).digest()
                        replica._final_chain = chain
            else:
                unused = engine  # why not
        else:
            unused = read
        replica._rematch()
        replica.restore_report = RestoreReport(from_checkpoint, unused, tuple(skipped))
        return replica

    # -- compaction (witnessed markets; specs/finality.md, "Compaction") ---------------------

    def compact(self) -> CompactReport:
        """Take the final prefix up to the latest point (``crdtbook._points``) out of memory,
        but for the kept set: the prefix's heads, every author's tip, the witnesses' latest
        counted heartbeats, the reconfigurations, the resting orders and the newest
        ``KEEP_RECENT_FINAL`` ops of the prefix. Every view, verdict and digest stays as it
        was; a compacted op comes back from the archive when a late op names it. Then
        ``snapshot()`` is the point state, the same bytes on every replica at this point, and a
        witness attests its hash in its next heartbeats. Returns what left memory, for a node
        to keep (its store answers ``fills`` and ``order`` for it).

        A market without witnesses never compacts (nothing is final there), nor does a replica
        before its first point: an empty report. Costs O(ops in memory) once per point.
        """
        fin, final_engine = self._fin, self._final_engine
        empty = CompactReport([], self.compacted_fills, [], [])
        if fin is None or final_engine is None or self._deferred:
            return empty
        self._advance_final()
        capture = self._capture
        if capture is None:
            return empty
        if self._matched != len(self._order):
            self._rematch()
        order = self._order
        local = capture.local
        prefix_ops, tail = order[:local], order[local:]
        fills_start = self.compacted_fills
        fills = Rows(capture.fills, final_engine.fill_view)
        base = capture.engine
        numbers = final_engine.finished(capture.rows, base.orders)
        row = final_engine.row
        finished = Rows(len(numbers), lambda i: order_state(row(numbers[i]), True))
        counted = [i for p, ids in fin.heartbeats_at.items() if p <= capture.placement
                   for i in ids]
        prefix = self._prefix
        prefix.extend(prefix_ops, counted, min(KEEP_RECENT_FINAL, self.point_interval))
        keep = prefix.kept(base.ids)
        applied = self._applied
        live = {op.id for op in tail}
        gone = [ident for ident in applied if ident not in live and ident not in keep]
        for ident in gone:
            del applied[ident]
        self._compacted_lamport = prefix.lamport
        fin.forget(set(gone), capture.placement)
        start = self.compacted_ops
        self.compacted_ops += local
        self.compacted_fills += capture.fills
        self.compacted_orders += capture.rows - len(base.ids)
        self._compact_base = base
        self._engine = base.compacted()
        self._final_engine = base.compacted()
        self._chain_base = self._final_chain = capture.chain
        self._order = tail
        self._marks = array("q")
        self._matched = self._floor = self._final_fed = 0
        self._final_version = -1
        self._capture = None
        self._point_target = self._next_point_target(self.compacted_ops)
        if self._archive is not None:
            self._applied.hydrate = self._hydrate
        from ._snapshot import encode_point

        kept = {ident: fin.placement[ident] for ident in keep}
        counts = (self.compacted_ops, self.compacted_fills, self.compacted_orders,
                  prefix.lamport, capture.placement)
        blob = encode_point(self, prefix, counts, capture.chain, kept, base)
        self._point_blob = blob
        self.point = PointInfo(
            self.compacted_ops, hashlib.sha256(blob).digest(), capture.chain,
            tuple(sorted(kept)),
        )
        self._rematch()
        return CompactReport(
            gone, fills_start, fills, finished, self.compacted_ops, start,
            tuple(op.id for op in prefix_ops),
        )

    def snapshot(self) -> bytes:
        """The point state of the latest point this replica compacted at (``ValueError`` if
        none): with the ops it did not compact and the archive, ``from_snapshot`` restores this
        replica without replaying what was compacted; a joining node starts from it."""
        if self._point_blob is None:
            raise ValueError("only a witnessed replica that has compacted has a snapshot")
        return self._point_blob

    @classmethod
    def from_snapshot(
        cls,
        market: Market,
        blob: bytes,
        ops: Iterable[Op | bytes],
        *,
        archive: Archive | None,
        verify: bool = False,
        max_pending: int = DEFAULT_MAX_PENDING,
        point_interval: int = DEFAULT_POINT_INTERVAL,
        history: bool = True,
    ) -> Replica:
        """A replica restored from a point state (``snapshot()``), the kept ops it names, and
        any ops after the point (the ones not compacted when it was taken, and newer ones).

        ``history``: whether ``archive`` holds the prefix (a restart: the node's own store).
        A joining node passes False until it has fetched the prefix (``history_complete``);
        meanwhile an op whose verdict needs the prefix waits (``history_wanted``). Raises
        ``ValueError`` (``SnapshotRefused``) for a blob that is not a usable point state of
        this market (a restart then restores from the whole log)."""
        from ._snapshot import restore_snapshot

        replica = cls(market, max_pending=max_pending, archive=archive,
                      point_interval=point_interval)
        return restore_snapshot(replica, blob, ops, verify, history)

    # -- joins: attestations and the missing history -------------------------------------------

    def _note_attestation(self, op: Op) -> None:
        body = op.body
        fin = self._fin
        if type(body) is not HeartbeatBody or not body.point or fin is None:
            return
        if op.author not in fin.genesis and op.author not in fin.added_at:
            return  # only witnesses' count: anyone else's would only push theirs out
        key = (body.point, body.point_hash)
        held = self._attestations.get(key)
        if held is None:
            if len(self._attestations) >= MAX_POINTS_REMEMBERED:
                del self._attestations[min(self._attestations)]
            held = self._attestations[key] = {}
        mine = held.get(op.author)
        if mine is None or op.seq > mine.seq:
            held[op.author] = op

    def attesting(self, n: int, point_hash: bytes) -> list[Op]:
        """The heartbeats held that attest the point ``(n, point_hash)``: the latest of each
        witness (of any epoch: ``check_attested`` counts those in force at the point)."""
        return sorted(self._attestations.get((n, point_hash), {}).values(), key=lambda o: o.id)

    def disputed_point(self) -> tuple[int, bytes] | None:
        """A point this replica compacted at (its latest) that a strict majority of the
        witnesses in force attest with another hash: ``(n, the hash they attest)``, else None.
        Honest replicas holding the same ops compute the same point state, so this one's
        derived state is not theirs: it compacted a prefix they did not finalise (seen at a
        witness removed while it still ran: its own heartbeat past its cut counted here before
        it saw the removal, and the compaction made that for good). Nothing the core can undo;
        a node says so (node/finality.py). Cost: a look at the attestations remembered
        (``MAX_POINTS_REMEMBERED``)."""
        point = self.point
        if point is None or self._fin is None:
            return None
        current = self._fin.current
        for (n, digest), held in self._attestations.items():
            if (n == point.n and digest != point.hash
                    and 2 * len(current.intersection(held)) > len(current)):
                return n, digest
        return None

    @property
    def history_wanted(self) -> int:
        """Ops that wait for the compacted history, which this replica (joined from a point
        state) has not got, and matter: a node fetches the history when this is not 0, then
        calls ``history_complete``. Those are the ops held for what their rules read (a
        reconfiguration, a cancel, an added witness's heartbeat), and the possible copies of
        prefix ops that another op waits for. A possible copy nothing waits for is only held
        (``history_held``): a real copy changes nothing, and a fork of a prefix author's chain
        matters once a witness acknowledges it, when its heartbeat waits for it."""
        copies, waiting = self._history_copies, self._waiting
        if len(waiting) < len(copies):  # O(the smaller): a flood of copies costs nothing here
            waited = sum(1 for ident in waiting if ident in copies)
        else:
            waited = sum(1 for ident in copies if ident in waiting)
        return len(self._history_wait) - len(copies) + waited

    @property
    def history_held(self) -> int:
        """Every op held for the history (``history_wanted`` counts those that matter)."""
        return len(self._history_wait)

    @property
    def has_history(self) -> bool:
        """Whether the archive holds the whole compacted prefix (False: joined from a point
        state and not completed since)."""
        return self._history

    def _needs_history(self, op: Op, point_seq: Mapping[bytes, int] | None = None) -> bool:
        """Whether judging ``op`` (not applied, not in the archive) needs the prefix this
        replica lacks: it may be a copy of a prefix op (its author has ops up to at least its
        sequence number there: a copy, or a fork); it is a reconfiguration or a heartbeat of
        an added witness not yet proven (their rules walk the past, into the prefix); or a
        cancel whose target is not in memory. ``point_seq``: the prefix's author tips to judge
        by (default: those of the history this replica lacks)."""
        seqs = self._point_seq if point_seq is None else point_seq
        if op.seq <= seqs.get(op.author, 0):
            return True
        body = op.body
        if type(body) is ReconfigBody:
            return True
        if type(body) is CancelBody and all(p in self._applied for p in op.parents):
            # Its target may be a prefix order that was not kept (it had finished there), and
            # an equivocating author's chain is walked: both read the prefix. (With a parent
            # missing it waits for it first, and is asked again when released.)
            return body.order_id not in self._applied or op.author in self._fork_at
        fin = self._fin
        if type(body) is HeartbeatBody and fin is not None and op.author in fin.added_at:
            proven = fin._proven_from.get(op.author)
            return proven is None or op.seq < proven
        return False

    def _hold_for_history(self, op: Op) -> None:
        wait = self._history_wait
        if op.id not in wait and len(wait) >= max(1, self.max_pending):
            # Oldest first, as the pending buffer (sync brings it again), but a reconfiguration
            # last: while one waits, finality here is held (``_cap_frontier``), and a flood of
            # other ops needing the history must not lift that.
            oldest = next(
                (i for i, held in wait.items() if type(held.body) is not ReconfigBody),
                next(iter(wait)),
            )
            del wait[oldest]
            self._history_copies.discard(oldest)
            self.evicted += 1
            if len(self._evicted_ids) < MAX_EVICTED_REMEMBERED:
                self._evicted_ids.append(oldest)  # its node deletes it from its store too
        wait[op.id] = op
        if op.seq <= self._point_seq.get(op.author, 0):
            self._history_copies.add(op.id)  # held only as a possible copy (see history_wanted)
        self._cap_frontier()

    def _cap_frontier(self) -> None:
        """While a reconfiguration waits for the history, finality here does not advance
        (``Witnessing.cap``): it would count the witness set without it. Seen at pruned nodes
        holding the removal of a witness that was paused, not gone: its late heartbeats made
        other fills final there than everywhere else. Released by ``history_complete``."""
        fin = self._fin
        if fin is None:
            return
        if self.reconfiguration_waits_for_history():
            if fin.cap is None:
                fin.cap = fin.frontier()
        elif fin.cap is not None:
            fin.cap = None
            self.version += 1

    @property
    def frontier_cap(self) -> int | None:
        """While a reconfiguration waits for the history, the frontier this replica holds its
        finality at (``Witnessing.cap``); None otherwise. A node keeps it across a restart
        (``hold_frontier_at``)."""
        return None if self._fin is None else self._fin.cap

    def waiting_reconfigurations(self) -> list[bytes]:
        """The ids of the reconfigurations waiting for the history (sorted)."""
        return sorted(i for i, op in self._history_wait.items() if type(op.body) is ReconfigBody)

    def hold_frontier_at(self, cap: int) -> None:
        """Raise the held frontier to ``cap``, the ``frontier_cap`` this replica held before a
        restart for the same wait (a reconfiguration that waited then waits now: a node stores
        the cap with ``waiting_reconfigurations``). A restart replays the ops after the point in
        Lamport order and holds the frontier where the replay met the reconfiguration, which
        can be lower than before: what was shown final would read provisional until the
        history is back. Safe only for such a cap: it was this replica's frontier over ops it
        holds again, so nothing reads final that did not before the restart. Any other value
        could count the heartbeats of a witness the waiting reconfiguration removes. Never
        lowers the held frontier; ignored when nothing waits."""
        fin = self._fin
        if fin is None or fin.cap is None or cap <= fin.cap:
            return
        if self.reconfiguration_waits_for_history():
            fin.cap = cap
            self.version += 1

    def _prefix_tip_seqs(self) -> dict[bytes, int]:
        """Each author's highest sequence number in the compacted prefix."""
        return {author: op.seq for author, op in self._prefix.tips.items()}

    def forget_history(self) -> None:
        """The archive no longer holds the whole prefix (a node pruned its store): from now on
        the ops whose verdict needs what is gone wait for it, as at a node that joined from a
        point state, until ``history_complete``. (What the archive still holds is used.)"""
        if self.compacted_ops:
            self._history = False
            self._point_seq = self._prefix_tip_seqs()
            self._forgets += 1

    def history_complete(self) -> ApplyReport:
        """The archive now holds the whole prefix (a joining node fetched it and checked it
        with ``HistoryCheck``): judge the ops that waited for it, and those waiting on them."""
        self._history = True
        self._point_seq = {}
        waiting, self._history_wait = list(self._history_wait.values()), {}
        self._history_copies = set()
        self._cap_frontier()  # nothing waits for the history any more
        report = self.apply_many(waiting)
        # Ops pending on a parent that was in the prefix: that parent is in the archive now.
        released: list[Op] = []
        for parent in [p for p in self._waiting if self._present(p)]:
            if parent in self._waiting:
                self._release_id(parent, released)
        if released:
            self._rematch()
            self.version += 1
        return ApplyReport(report.applied + released, report.pending, report.duplicates,
                           report.invalid)

    # -- authoring ---------------------------------------------------------------------------

    def submit(
        self,
        identity: Identity,
        side: str,
        price: int,
        quantity: int,
        tif: str = "gtc",
        tag: str | None = None,
        *,
        stp: str = EXPIRE_MAKER,
    ) -> Op:
        """Sign a new order (price in ticks, quantity in lots), apply it and return it.

        ``tag``: the client's text; in a witnessed market the client order id, unique per
        author (refused here if this author already used it). ``stp``: self-trade
        prevention, ``expire_maker`` (the only mode of a market without witnesses),
        ``expire_taker`` or ``expire_both``.
        """
        if side not in (BUY, SELL):
            raise ValueError(f"side must be 'buy' or 'sell', not {side!r}")
        tif = tif.replace("-", "_").lower() if isinstance(tif, str) else tif
        if tif not in TIFS:
            raise ValueError(f"time in force must be one of {', '.join(TIFS)}, not {tif!r}")
        for name, value in (("price", price), ("quantity", quantity)):
            if type(value) is not int or value <= 0:
                raise ValueError(f"{name} must be a positive integer (ticks/lots), not {value!r}")
        stp = stp.replace("-", "_").lower() if isinstance(stp, str) else stp
        if stp not in STP_MODES:
            raise ValueError(f"self-trade mode must be one of {', '.join(STP_MODES)}, not {stp!r}")
        if stp != EXPIRE_MAKER and not self.market.witnessed:
            raise ValueError(
                f"self-trade mode {stp} needs a witnessed market (protocol version 2); "
                f"{self.market.name} has only expire_maker"
            )
        client_ids = self._engine.client_ids
        if client_ids is not None and tag is not None and (identity.public_key, tag) in client_ids:
            raise ValueError(f"client order id {tag!r} is already used by this key's order")
        return self._author(identity, OrderBody(side, price, quantity, tif, tag, stp))

    def cancel_all(self, identity: Identity, prefix: str | None = None) -> Op:
        """Sign one op that cancels every resting order of ``identity`` (whose client order id
        starts with ``prefix``, if given) at its place in the total order; apply and return it.
        Witnessed markets only (protocol version 2)."""
        if not self.market.witnessed:
            raise ValueError(
                f"cancel-all needs a witnessed market (protocol version 2); cancel "
                f"{self.market.name}'s orders one by one"
            )
        if prefix is not None and len(prefix.encode("utf-8")) > MAX_CLIENT_TAG_BYTES:
            raise ValueError(f"a client-id prefix is at most {MAX_CLIENT_TAG_BYTES} bytes")
        return self._author(identity, CancelAllBody(prefix))

    def order_by_client_id(self, author: bytes, client_id: str) -> OrderState | None:
        """The order that holds ``client_id`` for ``author`` (witnessed markets), or None."""
        client_ids = self._engine.client_ids
        number = None if client_ids is None else client_ids.get((author, client_id))
        if number is None or number < 0:  # < 0: held by an order compacted out of memory
            return None
        return order_state(self._engine.row(number), self._order_final(number))

    def cancel(self, identity: Identity, order_id: bytes) -> Op:
        """Sign a cancel of one of ``identity``'s orders, apply it and return it."""
        target = self._applied.get(order_id)
        if target is None or not isinstance(target.body, OrderBody):
            raise BadCancel(f"no order {order_id.hex()[:16]} in this replica")
        if target.author != identity.public_key:
            raise BadCancel("only an order's author can cancel it; this order is someone else's")
        tip = self._author_latest.get(identity.public_key)
        if not on_own_chain(tip, target, self._applied, self._unique_at_seq):
            raise BadCancel(
                "this order is on another branch of your key's history (the same key signed ops "
                "at two places at once), so no cancel from here can reach it"
            )
        return self._author(identity, CancelBody(order_id))

    def heartbeat(self, identity: Identity, *, time_ms: int = 0) -> Op:
        """Sign a heartbeat acknowledging everything this replica holds, apply it and return it.
        ``time_ms``: the caller's clock (Unix ms), reported as the batch's witnessed time.

        Raises:
            BadWitness: ``identity`` is not a witness of this market in force.
        """
        if self._fin is None:
            raise BadWitness(f"{self.market.name} has no witnesses: nothing is ever final there")
        if identity.public_key not in self._fin.current:
            raise BadWitness("this key is not a witness of the market (in the epoch in force)")
        if type(time_ms) is not int or time_ms < 0:
            raise ValueError(f"time_ms must be a non-negative integer, not {time_ms!r}")
        point = self.point
        if point is None:
            return self._author(identity, HeartbeatBody(time_ms))
        # It attests the latest point this replica compacted at (specs/finality.md 13).
        return self._author(identity, HeartbeatBody(time_ms, point.n, point.hash))

    def approve_reconfig(self, identity: Identity, witnesses: Iterable[bytes]) -> bytes:
        """A witness's approval (a signature) of ``witnesses`` as the next epoch's set, to hand
        to the witness that signs the reconfiguration."""
        keys = self._next_witnesses(witnesses)
        if identity.public_key not in self.witnesses():
            raise BadWitness("only a witness in force can approve a reconfiguration")
        return identity.sign(reconfig_message(self.market.id, self.epoch + 1, keys))

    def reconfigure(
        self,
        identity: Identity,
        witnesses: Iterable[bytes],
        approvals: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]] = (),
    ) -> Op:
        """Sign a reconfiguration making ``witnesses`` the set of the next epoch, with the other
        witnesses' ``approvals`` (key -> signature from ``approve_reconfig``); apply and return
        it. A removed witness's heartbeats count up to the last one this replica holds.

        Raises:
            BadWitness: not a witness, no majority, or an approval that does not verify.
        """
        keys = self._next_witnesses(witnesses)
        current = self.witnesses()
        if identity.public_key not in current:
            raise BadWitness("only a witness in force can sign a reconfiguration")
        pairs = dict(approvals.items() if isinstance(approvals, Mapping) else approvals)
        pairs.pop(identity.public_key, None)
        epoch = self.epoch + 1
        for key, signature in pairs.items():
            if key not in current:
                raise BadWitness(f"{key.hex()[:16]} is not a witness in force: no approval")
            if not check_approval(self.market.id, epoch, keys, key, signature):
                raise BadWitness(f"the approval of {key.hex()[:16]} does not verify for this set")
        if 2 * (1 + len(pairs)) <= len(current):
            raise BadWitness(
                f"a reconfiguration needs a majority of the {len(current)} witnesses: yours and "
                f"{len(current) // 2} approvals, not {len(pairs)}"
            )
        return self._author(identity, ReconfigBody(epoch, keys, tuple(sorted(pairs.items()))))

    def check_next_witnesses(self, witnesses: Iterable[bytes]) -> tuple[bytes, ...]:
        """``witnesses`` as the next epoch's set, sorted, or :class:`BadWitness` when no
        reconfiguration could make it so here (the set's own rules, before any signature)."""
        return self._next_witnesses(witnesses)

    def _next_witnesses(self, witnesses: Iterable[bytes]) -> tuple[bytes, ...]:
        if self._fin is None:
            raise BadWitness(f"{self.market.name} has no witnesses to reconfigure")
        from ._market import _witness_keys  # the same checks as a market definition's

        keys = _witness_keys(witnesses)
        if not keys:
            raise BadWitness("a witnessed market keeps at least one witness")
        # The rule check_reconfig applies to the op: refused here first, so that no witness
        # approves (or signs) a set no replica would accept.
        removed = {w.key for w in self._fin.witness_info() if not w.current}
        back = sorted(key.hex()[:16] for key in keys if key in removed)
        if back:
            raise BadWitness(
                f"a removed witness cannot be added again (use a new key): {', '.join(back)}"
            )
        return keys

    def acknowledged_seq(
        self, author: bytes, read_back: dict[bytes, Op | None] | None = None
    ) -> int | None:
        """The highest sequence number ``s`` such that ``author``'s op at ``s`` (and so each of
        its ops before it) is in the causal past of the latest counted heartbeat of every
        witness in force other than ``author``: each of those witnesses held it when it
        heartbeat. None: no such witness (or a market without witnesses).

        An op can be final without that: its placement is the Lamport time of the first counted
        heartbeat that has it, its author's own if the author is a witness, and the frontier
        passes it once the others heartbeat higher, whether or not they have the op. A node
        pruning its archive (retention) must not delete what only it holds, and an author cut
        off from its peers is the one that does. Cost: one walk per other witness, newest
        first, down to the first op by ``author`` (short while they acknowledge it); each
        compacted op on the way read back from the archive once for all of them (``read_back``
        keeps what was read, for the caller's next walk)."""
        fin = self._fin
        if fin is None:
            return None
        others = [w for w in fin.current if w != author]
        if not others:
            return None
        memo: dict[bytes, Op | None] = {} if read_back is None else read_back
        lowest: int | None = None
        for witness in others:
            heartbeat = fin.latest.get(witness)
            seq = 0 if heartbeat is None else fin._last_seq_in_past(heartbeat, author, memo)
            lowest = seq if lowest is None else min(lowest, seq)
        return lowest

    def tail_needs_history(self) -> bool:
        """Whether an applied op after the latest point would wait for the history were this
        replica without it (``forget_history``): a reconfiguration (its rules walk the past
        into the prefix), a possible copy of a prefix op (an equivocating author's), a cancel
        of an order not in memory, an added witness's heartbeat not yet proven. A restart from
        the snapshot judges the ops after the point again; one judged with the history and
        held without it is held with all that follows it, and ops the node showed final turn
        provisional. So a node keeps its history while this is true (node/retention.py).
        Cost: one look at each op after the point, once per pruning."""
        if self._fin is None or not self.compacted_ops:
            return False
        point_seq = self._prefix_tip_seqs()
        return any(self._needs_history(op, point_seq) for op in self._order)

    def reconfiguration_waits_for_history(self) -> bool:
        """Whether a reconfiguration waits for the history this replica lacks (joined from a
        point, or pruned). Until it applies, finality here counts the witness set without it,
        heartbeats of a witness it removes included: if that witness still runs (removing one
        assumes it is gone, specs/finality.md section 8), the final prefix here can differ from
        everyone's. A node then does not compact (node/service.py): once the reconfiguration
        applies the final prefix is recomputed and agrees again, where a compaction would have
        made the difference permanent. Cost: a look at each op waiting for the history."""
        return any(type(op.body) is ReconfigBody for op in self._history_wait.values())

    def tail_compacted_parents(self) -> set[bytes]:
        """The ids of the compacted parents of the applied ops after the latest point. A
        restart from the snapshot judges those ops again, and one whose parent is neither in
        memory nor in the archive waits for the history (``forget_history``): a node pruning
        its archive keeps these (node/retention.py). Cost: a look at each parent of each op
        after the point."""
        applied = self._applied  # (``in`` does not ask the archive)
        return {p for op in self._order for p in op.parents if p not in applied}

    def first_unacknowledged_compacted(self, author: bytes) -> bytes | None:
        """The id of ``author``'s op with the lowest sequence number among those some other
        witness in force has not acknowledged (``acknowledged_seq``) and this replica compacted
        out of memory; None if there is none. Its final index is the lowest of theirs (an
        author's ops follow its chain in the total order): a node pruning its archive keeps it
        and everything after it in final order. (Such ops still in memory are live: never
        pruned.) A walk down the author's chain from its tip to the first unacknowledged op,
        reading compacted ones back from the archive."""
        read_back: dict[bytes, Op | None] = {}  # compacted ops read, shared by the walks
        acked = self.acknowledged_seq(author, read_back)
        op = self._author_latest.get(author)
        if acked is None or op is None:
            return None
        memory = self._applied  # (``in`` and ``get`` do not ask the archive)

        def compacted(ident: bytes) -> Op | None:
            if ident not in read_back:
                read_back[ident] = self._hydrate(ident)
            return read_back[ident]

        lowest: bytes | None = None
        while op is not None and op.seq > acked:
            if op.id not in memory:
                lowest = op.id
            parents = op.parents
            # Its own parent among those in memory; else read back from the archive, which
            # also reads back other authors' compacted parents to see whose they are.
            op = next(
                (q for p in parents if (q := memory.get(p)) is not None and q.author == author),
                None,
            ) or next(
                (q for p in parents
                 if p not in memory and (q := compacted(p)) is not None and q.author == author),
                None,
            )
        return lowest

    def check_can_sign(self, author: bytes) -> None:
        """Raise :class:`SigningWaits` while this replica holds ops of ``author`` with a higher
        sequence number than its applied ones (waiting for their parents or for history): the
        next op signed here would reuse one of those numbers, an equivocation of the key.

        A node calls it before signing as itself; ``submit`` and the others do not, so that
        tests can still model a key signing at several replicas. Cost: a scan of the held ops,
        none in the common case (nothing held), up to the pending buffer's bound under a flood
        of orphans. (Kept per author instead, the marks grew with every key a peer parks.)"""
        if not self._pending and not self._history_wait:
            return
        held = max(
            (
                op.seq
                for op in itertools.chain(self._pending.values(), self._history_wait.values())
                if op.author == author
            ),
            default=0,
        )
        tip = self._author_tip.get(author)  # the highest seq applied, forked or not
        if held > (0 if tip is None else tip.seq):
            raise SigningWaits(
                f"this replica holds ops of this key up to sequence {held} that it has not "
                f"applied yet (they wait for their parents or for history); signing now would "
                "reuse a sequence number (an equivocation): retry once they are applied"
            )

    def _author(self, identity: Identity, body: Body) -> Op:
        author = identity.public_key
        tip = self._author_latest.get(author)
        # Heads by other authors, plus our own previous op (the sequence rule wants exactly one).
        others = [self._applied[h] for h in self._heads if self._applied[h].author != author]
        room = MAX_PARENTS - (tip is not None)
        if len(others) > room:
            others = sorted(others, key=lambda o: o.key, reverse=True)[:room]
        parents = [o.id for o in others]
        lamport = max((o.lamport for o in others), default=0)
        if tip is not None:
            parents.append(tip.id)
            lamport = max(lamport, tip.lamport)
        op = sign_op(
            identity,
            self.market.id,
            1 if tip is None else tip.seq + 1,
            lamport + 1,
            tuple(parents),
            body,
            self.market.version,
        )
        self.apply(op)
        return op

    # -- views -------------------------------------------------------------------------------

    def resting_reached(self, side: str, price: int, author: bytes | None = None) -> list[bytes]:
        """The ids of the resting orders (``author``'s only, if given) that a ``side`` order
        at ``price`` (ticks) would reach, in priority order: the only ones its self-trade
        prevention can expire. Reads the opposite side only as deep as the price reaches, and
        builds no book view (a node asks this on every submit)."""
        engine = self._engine
        ask = side == BUY  # a buy reaches the asks
        opposite = 1 if ask else 0
        levels, states, authors, ids = (
            engine.levels[opposite], engine.states, engine.authors, engine.ids,
        )
        prices = engine.prices[opposite]
        reached: list[bytes] = []
        for level_price in prices if ask else reversed(prices):
            if (level_price > price) if ask else (level_price < price):
                break
            reached.extend(
                ids[o]
                for o in levels[level_price]
                if states[o] <= PARTIALLY_FILLED and (author is None or authors[o] == author)
            )
        return reached

    def book(self, depth: int | None = None) -> Book:
        """Resting orders by level, best first; ``depth`` limits the levels per side."""
        return book_view(self._engine, depth)

    def fills(self, start: int = 0) -> Sequence[Fill]:
        """Fills in execution order (``start``: skip the first ones). Numbering is global: after
        a compaction the first ``compacted_fills`` are no longer here, and asking for them
        raises ``IndexError`` (a node answers those from its store)."""
        if start < self.compacted_fills:
            raise IndexError(
                f"fills before {self.compacted_fills} were compacted out of memory (asked from "
                f"{start})"
            )
        return self._engine.fill_views(start - self.compacted_fills)

    @property
    def order_count(self) -> int:
        """How many orders are applied (O(1), unlike ``len(orders())``)."""
        return self.compacted_orders + len(self._engine.orders)

    @property
    def fill_count(self) -> int:
        return self.compacted_fills + len(self._engine.fills)

    def order(self, order_id: bytes) -> OrderState | None:
        """The order's derived state, or None if no such order is applied."""
        number = self._engine.orders.get(order_id)
        if number is None:
            return None
        return order_state(self._engine.row(number), self._order_final(number))

    def orders(self, author: bytes | None = None) -> list[OrderState]:
        """Every order (or one author's) in memory, in the total order: after a compaction, the
        orders still resting at its point and all later ones."""
        engine = self._engine
        final = self._order_final
        # Order numbers follow the total order: they are given as orders are matched.
        return [
            order_state(engine.row(number), final(number))
            for number in range(len(engine.ids))
            if author is None or engine.authors[number] == author
        ]

    # -- finality (witnessed markets; specs/finality.md) ---------------------------------------

    @property
    def witnessed(self) -> bool:
        return self._fin is not None

    @property
    def frontier(self) -> int:
        """The finality frontier: a Lamport time at and below which every placed op is final
        (0: nothing final yet, and always 0 in a market without witnesses)."""
        return 0 if self._fin is None else self._fin.frontier()

    @property
    def final_count(self) -> int:
        """How many ops of the total order are final (the first ones; global numbering, so
        compacted ops count)."""
        return self.compacted_ops + self._advance_final()

    def is_final(self, op_id: bytes) -> bool:
        """Whether the op is applied and final: its place in the total order, and everything
        matching derived from the ops up to it, never change."""
        if self._fin is None:
            return False
        if op_id in self._applied:
            return self._fin.is_final(op_id)
        return (
            self.compacted_ops > 0
            and self._archive is not None
            and self._archive.get(op_id) is not None
        )

    def final_fill_count(self) -> int:
        """The first this many of ``fills()`` are final; the others are provisional."""
        if self._final_engine is None:
            return 0
        self._advance_final()
        return self.compacted_fills + len(self._final_engine.fills)

    def placement(self, op_id: bytes) -> int | None:
        """The Lamport time of the heartbeat batch the op is placed in (None: not placed yet,
        or a market without witnesses)."""
        if self._fin is None:
            return None
        value = self._fin.placement.get(op_id, UNPLACED)
        return None if value == UNPLACED else value

    def witnessed_time(self, op_id: bytes) -> int | None:
        """The earliest clock time (Unix ms) its witnesses gave among the heartbeats of the
        batch the op is placed in (None: not placed, or no witness gave a time). Final with the
        op: it is read off heartbeats at the op's placement, which never change below the
        frontier. A label for people, never an input to the order."""
        if self._fin is None:
            return None
        return self._fin.witnessed_time(op_id)

    @property
    def epoch(self) -> int:
        """How many reconfigurations are in force (0: the market's own witnesses)."""
        return 0 if self._fin is None else self._fin.epoch()

    def witnesses(self) -> frozenset[bytes]:
        """The witness keys in force (empty for a market without witnesses)."""
        return frozenset() if self._fin is None else self._fin.current

    def witness_status(self) -> list[WitnessInfo]:
        """Every witness, in force or removed, with its latest counted heartbeat."""
        return [] if self._fin is None else self._fin.witness_info()

    def needs_heartbeat(self, witness: bytes) -> bool:
        """Whether ``witness`` has something to acknowledge: an op (not a heartbeat) that is
        not placed at or below its latest heartbeat. A witness heartbeats only then, so an idle
        market costs nothing."""
        if self._fin is None:
            return False
        return self._fin.needs_heartbeat(witness, self._order)

    def final_book(self, depth: int | None = None) -> Book:
        """The book as it stands after the final prefix: what no valid op can change."""
        if self._final_engine is None:
            return Book((), ())
        self._advance_final()
        return book_view(self._final_engine, depth)

    def _advance_final(self) -> int:
        """Feed the final engine the ops that became final since it last looked; the final op
        count. Each op is matched there once, in order, and never undone."""
        fin, engine = self._fin, self._final_engine
        if fin is None or engine is None:
            return 0
        if self._final_version == self.version:
            return self._final_fed
        order = self._order
        count = fin.final_count(order)
        if count < self._final_fed:  # only a lying witness can take back what was final
            engine = self._final_engine = self._fresh_engine()
            self._final_chain = self._chain_base
            self._final_fed = 0
            self._capture = None
            self._point_target = self._next_point_target(self.compacted_ops)
        process = engine.process
        chain, sha256 = self._final_chain, hashlib.sha256
        # A point: the end of the first batch at which the count reaches the target. The final
        # prefix ends at a batch's end, so the last final op always ends its batch.
        first = self._point_target - self.compacted_ops - 1
        placement = fin.placement
        for index in range(self._final_fed, count):
            op = order[index]
            process(op)
            chain = sha256(FINAL_CHAIN_DOMAIN + chain + op.id).digest()
            if index >= first:
                point = placement[op.id]
                if index + 1 == count or placement[order[index + 1].id] != point:
                    self._capture = _Capture(
                        index + 1, chain, engine.compacted(), len(engine.fills),
                        len(engine.ids), point
                    )
                    self._point_target = self._next_point_target(self.compacted_ops + index + 1)
                    first = self._point_target - self.compacted_ops - 1
        self._final_chain = chain
        engine.tape.clear()  # nothing here is ever undone
        self._final_fed = count
        self._final_version = self.version
        return count

    def _next_point_target(self, count: int) -> int:
        """The count the first point after ``count`` final ops must reach."""
        return (count // self.point_interval + 1) * self.point_interval

    def _advance_final_count(self) -> int:
        """The final op count, without feeding the final engine (for ``restore``)."""
        return 0 if self._fin is None else self._fin.final_count(self._order)

    def _order_final(self, number: int) -> bool:
        """Order number ``number``'s state is final: it ended (filled, cancelled, expired,
        rejected) within the final prefix, so no later op can touch it."""
        engine = self._final_engine
        if engine is None:
            return False
        self._advance_final()
        return number < len(engine.ids) and engine.states[number] & 7 > 1

    def cancel_effective(self, cancel_id: bytes) -> bool | None:
        """True if the cancel (or cancel-all) removed a rest, False if there was nothing to
        remove, None if no such cancel is applied."""
        effective = self._engine.cancels.get(cancel_id)
        if effective is None:
            count = self._engine.cancel_alls.get(cancel_id)
            return None if count is None else count > 0
        return effective

    def cancelled_by(self, cancel_all_id: bytes) -> int | None:
        """How many orders a cancel-all cancelled (None: no such cancel-all applied)."""
        return self._engine.cancel_alls.get(cancel_all_id)

    def digest(self) -> bytes:
        """SHA-256 of the canonical encoding of book, fills and order states. A witnessed
        market's digest covers the final prefix by its running hash and the rest as state, so a
        compacted replica has the same digest as one that kept everything."""
        if self._fin is None or self._final_engine is None:
            return state_digest(self.market.id, self._engine)
        final = self._advance_final()
        return witnessed_digest(
            self.market.id,
            self._engine,
            self._final_engine,
            self._fin.frontier(),
            self.compacted_ops + final,
            self._final_chain,
        )

    def heads(self) -> list[bytes]:
        """Ids of applied ops that no applied op names as a parent, sorted."""
        return sorted(self._heads)

    def ops(self) -> list[Op]:
        """Every applied op in memory, in the total order (parents always before children):
        after a compaction, those after its point (``compacted_ops`` of them are not here)."""
        return list(self._order)

    def iter_ops(self, start: int = 0) -> Iterator[Op]:
        """The ops from global position ``start`` on (compacted ones skipped)."""
        order = self._order
        for index in range(max(0, start - self.compacted_ops), len(order)):
            yield order[index]

    def missing(self) -> list[bytes]:
        """Ids that pending ops name as parents and that this replica has never seen."""
        return sorted(p for p in self._waiting if p not in self._pending)

    def get(self, ident: bytes) -> Op | None:
        """An applied op by id."""
        return self._applied.get(ident)

    def knows(self, ident: bytes) -> bool:
        """Applied, pending, held for the history or known invalid: no need to fetch, decode or
        verify it again."""
        return (
            ident in self._applied
            or ident in self._pending
            or ident in self._invalid
            or ident in self._history_wait
        )

    def is_invalid(self, ident: bytes) -> bool:
        return ident in self._invalid

    def pending_ids(self, limit: int | None = None) -> list[bytes]:
        """Ids of ops waiting for parents (oldest first), e.g. for a sync request."""
        ids = list(self._pending)
        return ids if limit is None else ids[:limit]

    def is_pending(self, ident: bytes) -> bool:
        """Known and valid so far, but waiting for parents."""
        return ident in self._pending

    def waits_for_history(self, ident: bytes) -> bool:
        """Held until the history this replica lacks is back (its verdict needs it)."""
        return ident in self._history_wait

    def holds(self, ident: bytes) -> bool:
        """Applied, pending or held for the history: what a node's store keeps for this replica
        (a restart gives it back)."""
        return ident in self._applied or ident in self._pending or ident in self._history_wait

    def intern_id(self, ident: bytes) -> bytes:
        """The replica's own bytes object for an applied op's id (else ``ident``): pass it to
        ``decode(..., intern_id=...)`` so parent ids are not held twice."""
        op = self._applied.get(ident)
        return ident if op is None else op.id

    def author_seqs(self, limit: int | None = None) -> dict[bytes, int]:
        """Author -> highest applied sequence number, for authors never seen equivocating (for
        them this replica holds every op up to that seq). With ``limit``, the authors whose
        latest op is newest. A sync hint: see ``ops_missing_for``."""
        tips = [tip for author, tip in self._author_tip.items() if author not in self._fork_at]
        if limit is not None and len(tips) > limit:
            tips = sorted(tips, key=lambda op: op.key, reverse=True)[:limit]
        return {tip.author: tip.seq for tip in tips}

    def forked_authors(self) -> frozenset[bytes]:
        """Authors seen signing two ops at one sequence number (equivocation)."""
        return frozenset(self._fork_at)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def applied_index(self) -> dict[bytes, Op]:
        """Read-only use: every applied op by id (for the sync helpers)."""
        return self._applied

    def __len__(self) -> int:
        """How many ops are applied, compacted ones included."""
        return self.compacted_ops + len(self._order)

    def __contains__(self, ident: object) -> bool:
        return ident in self._applied

    def __repr__(self) -> str:
        return (
            f"Replica({self.market.name}, ops={len(self._order)}, "
            f"pending={len(self._pending)}, heads={len(self._heads)})"
        )
