"""The node's heart: replicas fed from gossip, sync and the owner, kept durable.

Every op that reaches the node is handled in two steps:

    prepare: id = sha256(bytes) -> known, pending or queued? stop (no decode, no verify);
             decode + verify once (worker threads for large batches: PyNaCl releases the GIL)
    commit:  apply to the replica (idempotent; parents missing -> pending), persist

Sync frames go through prepare then commit. Gossip takes a fast path, because libp2p validates
one message at a time per peer: its validator runs prepare, judges each op against the applied
log without applying it (``Replica.precheck``), persists, and only then accepts (forwards); an
apply task per market applies the queued ops in batches. Own ops are applied at once and
persisted before the owner gets an answer.

Gossip is best effort: the node batches its own ops into gossip messages, paced by the number of
topic peers under load; the sync protocol (node.sync) is what guarantees every op reaches every
peer.

Compaction (issue #10, witnessed markets only): at each *point* (the end of the first batch at
which the final count reaches a multiple of ``point_interval``, the same on every replica of
the market), the market's finality task compacts the replica (``Replica.compact``), and the
store marks the ops that left memory, keeps the final fills and finished orders that did, the
prefix ops' final indexes (served to joiners as history) and the point blob (the replica's
snapshot, also served to joiners: node.join), in one transaction. The store stays the
replica's archive (a late op naming a compacted op, a late duplicate). A restart loads the
snapshot plus the live ops, or the whole log if the snapshot does not restore.
``fills``/``order`` read compacted history from the store (``NodeService.fills`` and
``NodeService.order``). Markets without witnesses never compact:
nothing there is ever final.

Joins (node.join): a node whose store holds nothing of a witnessed market may start it from a
peer's snapshot (``adopt_snapshot``: ``Replica.from_snapshot`` without history), and fetch the
history later if an op needs it (``history_fetched`` once it is stored and checked).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Final

import trio

from crdtbook import (
    DEFAULT_POINT_INTERVAL,
    CompactReport,
    Fill,
    Identity,
    InvalidOp,
    Market,
    Op,
    OrderState,
    PointInfo,
    Replica,
    SigningWaits,
    SnapshotRefused,
    decode,
    op_id,
    point_fills,
    read_point,
)
from crdtbook._ops import decode_with_id  # the shell hashes received bytes once (prepare)

from . import retention as retention_
from .crash_gate import CRASH_SIGNING_WAIT
from .finality import HEARTBEAT_INTERVAL, FinalityTracker
from .headroom import LoopHeadroom
from .limits import GOSSIP_ENVELOPE_BYTES, GOSSIP_OP_OVERHEAD, MAX_GOSSIP_BYTES, MAX_WATCH_IDS
from .publish_schedule import next_publish, publish_interval, publish_period
from .store import (
    CompactedFill,
    CompactedOrder,
    OpStore,
    Snapshot,
    StoreError,
    StoreWriteError,
)
from .wire import MAX_BATCH_OPS, WireError, decode_batch, encode_batch

__all__ = ["IngestResult", "KeyEquivocated", "MarketState", "NodeService"]

logger = logging.getLogger("crdtbook.node")

#: ``await publish(topic, data)``: gossip one message (the network layer's publish).
PublishFn = Callable[[str, bytes], Awaitable[None]]

#: How long the first op of a gossip batch waits for company (ops submitted together).
FLUSH_DELAY: Final = 0.002
#: Default: adapt to the topic's peers (a number > 0 fixes the interval).
PUBLISH_INTERVAL: Final = -1.0
#: Seconds between copies of the store's WAL into its database, done in a worker thread
#: (``wal_checkpoint_loop``). At 1,000 ops/s, ~4 pages a commit, a second's WAL is a few MB.
WAL_CHECKPOINT_INTERVAL: Final = 1.0
#: Batches smaller than this are verified inline; larger ones in a worker thread.
THREAD_VERIFY_MIN: Final = 32
#: Worker threads one big batch is verified on (one per core is all that helps).
VERIFY_THREADS: Final = max(1, min(4, os.cpu_count() or 1))
#: Least time between two finality evaluations of a market (they follow changes).
FINALITY_CHECK_INTERVAL: Final = 0.05
#: Applied ops between two GC freezes (see NodeService.note_applied).
GC_FREEZE_EVERY: Final = 50_000
#: A witness whose key equivocated (``KeyEquivocated``) looks again this often whether it is
#: still due to heartbeat (it never will be able to: the loop just stays cheap).
KEY_EQUIVOCATED_RECHECK: Final = 10.0
#: A peer whose gossip is refused this many times within BAN_WINDOW is disconnected for
#: BAN_SECONDS. Honest peers never send invalid ops, so a small number is enough.
BAN_THRESHOLD: Final = 8
BAN_WINDOW: Final = 60.0
BAN_SECONDS: Final = 120.0
#: A checkpoint leaves out the newest ops of the log: a tenth of it, at most this many. A
#: restart matches them again, but with their undo records, so an op that arrives after the
#: restart and sorts among them (say one concurrent with the last ops before the stop) costs a
#: short rewind, where one sorting inside the checkpoint costs a rematch of the whole log.
#: (10k ops: some tens of ms of matching at start.)
CHECKPOINT_TAIL_MAX: Final = 10_000
#: While the store refuses writes (disk full, read-only), it is tried again at most this often;
#: in between, new ops (own, gossip, sync) are refused at once with the last error.
STORE_RETRY_INTERVAL: Final = 0.5
#: A witnessed market's replica is compacted at each point: every this many final ops (the
#: core's DEFAULT_POINT_INTERVAL; every node of a market must use the same, so only tests and
#: benches change it). It bounds memory (~0.8 KB an op: ~40 MB) above the live state, and each
#: compaction costs an O(ops in memory) pass in the core plus one store transaction marking
#: this many ops (some hundreds of ms, off the event loop, see bench/bench_memory.py), so not
#: much less either. A restart after a kill -9 replays at most about this many ops on top of
#: the snapshot.
POINT_INTERVAL: Final = DEFAULT_POINT_INTERVAL
#: Compacted fills read from the store per query when a reader walks back through history.
HISTORY_CHUNK: Final = 4096


def checkpoint_tail(ops: int) -> int:
    """How many of the newest ``ops`` a checkpoint leaves out (see CHECKPOINT_TAIL_MAX)."""
    return min(CHECKPOINT_TAIL_MAX, ops // 10)


def topic_for(market: Market) -> str:
    """One gossipsub topic per market, named from the market id."""
    return f"crdtbook/market/{market.id.hex()}"


class KeyEquivocated(Exception):
    """This node's key is seen signing two different ops at one sequence number in a market
    (``Replica.forked_authors``): another node runs with the same key (a copied home), or this
    node lost ops it had sent. Every further order would only widen the fork (and a forked
    witness's heartbeats count only below it), so the node signs no new orders, amends,
    heartbeats or reconfigurations in that market, only cancels (its resting orders must not be
    stuck: no other key can cancel them); the key is spent there. Not retried: the user must
    act."""


@dataclass
class MarketState:
    market: Market
    replica: Replica
    topic: str
    outbox: list[bytes] = field(default_factory=list)
    outbox_ready: trio.Event = field(default_factory=trio.Event)
    watchers: list[Watcher] = field(default_factory=list)
    last_sync: float | None = None
    #: When (trio time) a sync session of this market last began, and whether own signing
    #: stopped waiting for a first sync without one (node.crash_gate).
    last_sync_try: float | None = None
    crash_wait_over: bool = False
    #: This node's key signed two ops at one sequence number here (``KeyEquivocated``), said in
    #: the log once.
    key_equivocated: bool = False
    #: Compaction waits for a reconfiguration to apply (``NodeService.compaction_due``), said
    #: in the log once.
    compaction_waits: bool = False
    received: int = 0
    refused: int = 0
    #: Verified (and durable) ops from gossip waiting for the apply task, and their ids: known
    #: to the node, so they are never decoded or verified again.
    apply_queue: list[Op] = field(default_factory=list)
    queued: set[bytes] = field(default_factory=set)
    apply_ready: trio.Event = field(default_factory=trio.Event)
    #: Set (and replaced) whenever ops are applied: what heartbeats and finality waits wake on.
    changed: trio.Event = field(default_factory=trio.Event)
    #: When this node first applied (or authored) each op: op id -> Unix ms. Ops loaded from
    #: the store at start have none. Bounded by the log (one entry per applied op).
    received_ms: dict[bytes, int] = field(default_factory=dict)
    #: The store as the replica's archive (witnessed markets: those that compact), which also
    #: holds a compaction whose store write is under way.
    archive: StoreArchive | None = None
    #: Compactions saved, and the longest one took in the core (compact and snapshot, on the
    #: event loop) and in the store (a worker thread).
    compactions: int = 0
    compact_s_max: float = 0.0
    save_s_max: float = 0.0
    #: The replica's version when a compaction found no point to compact at (not tried again
    #: before something changes).
    compact_idle_version: int | None = None
    #: Joins (node.join). ``joining``: joining from a snapshot now (sync leaves the market
    #: alone); ``join_state``: None (never joined: started from its own store or empty
    #: without trying), "joining", "snapshot" (joined from one) or "full" (fell back to the full
    #: log); ``join_info``: the point joined from, whose prefix a history fetch completes.
    joining: bool = False
    join_state: str | None = None
    join_info: PointInfo | None = None
    history_fetching: bool = False
    #: The held frontier last stored (``NodeService._keep_frontier_cap``); None: none.
    kept_cap: int | None = None
    #: The history before the join point, derived (node.derive): None (not tried, or not
    #: joined), "deriving", "done", "failed" (tried again after ``derive_retry_at``, or after
    #: the next history fetch) or "inconsistent" (never shown); ``derive_progress``: of both
    #: passes, 0 to 1.
    derive_state: str | None = None
    derive_progress: float = 0.0
    #: After a failed derivation: when to try again, and the wait after that (node.derive).
    derive_retry_at: float = 0.0
    derive_delay: float = 30.0
    #: The fills before the point joined from (0 before a join): paging through ``fills``
    #: begins there until the past is derived (``node.derive.answered_from``).
    join_fills: int = 0
    #: Retention (node.retention): the node's ``--retention`` (None: keep the whole archive)
    #: and what it pruned of this market's archive (as recorded in the store).
    retention: int | None = None
    prune: retention_.PruneState = field(default_factory=retention_.PruneState)
    #: Retention waits for other witnesses to acknowledge this node's own archived ops.
    prune_waits: bool = False
    #: Held by a pruning and by a whole history fetch: they must not interleave (a fetch
    #: indexes stored ops as prefix ops that a pruning would delete under it).
    archive_lock: trio.Lock = field(default_factory=trio.Lock)
    finality: FinalityTracker = field(init=False)
    _digest: tuple[int, bytes] | None = None
    _point_hashes: tuple[int, list[tuple[int, bytes]]] | None = None

    def __post_init__(self) -> None:
        self.finality = FinalityTracker(self.market.name)
        self.finality.prime(self.replica)

    @property
    def joined_from(self) -> int | None:
        """The point this node joined the market from (None: it did not join from one)."""
        return None if self.join_info is None else self.join_info.n

    def history_held(self) -> bool:
        """Whether the store holds the whole compacted prefix (False: joined from a snapshot
        and the history is not fetched yet, or retention pruned it)."""
        return self.replica.has_history

    def join_status(self) -> dict[str, Any]:
        """The market's join fields of ``status``: joined_from_point (None: not joined from a
        snapshot), history ("complete", "fetching" or "absent") and join (how it started)."""
        if self.history_held():
            history = "complete"
        else:
            history = "fetching" if self.history_fetching else "absent"
        join = "joining" if self.joining else self.join_state
        return {
            "join": join,
            "joined_from_point": self.joined_from,
            "history": history,
            # Fills and orders before the join point (node.derive): None if not joined.
            "history_derived": (
                None if self.join_info is None else (self.derive_state or "not_yet")
            ),
            "history_derived_progress": round(self.derive_progress, 3),
            "history_wanted": self.replica.history_wanted,
            # Retention (node.retention): --retention (None: keep all) and ops it pruned.
            "retention": self.retention,
            "pruned_ops": self.prune.pruned,
        }

    def fills(self, start: int, stop: int | None = None) -> list[CompactedFill]:
        """Fills ``start`` to ``stop`` (global indexes; None: to the newest), each with the times
        the node knows for it: compacted ones from the store (or from a compaction being saved),
        the others from the replica."""
        replica = self.replica
        count = replica.fill_count
        stop = count if stop is None else min(stop, count)
        start = max(0, start)
        held = replica.compacted_fills
        out: list[CompactedFill] = []
        if start < held and self.archive is not None:
            saving = self.archive.saving
            upto = min(stop, held)
            in_store = upto if saving is None else min(upto, saving.fills_start)
            if start < in_store:
                out += self.archive.store.compacted_fills(self.market.id, start, in_store)
            if saving is not None and upto > saving.fills_start:
                low = max(start, saving.fills_start) - saving.fills_start
                out += saving.fill_rows(low, upto - saving.fills_start)
            start = held
        if start < stop:
            final = replica.final_fill_count()
            received = self.received_ms
            for i, fill in enumerate(replica.fills(start)[: stop - start], start):
                out.append(
                    CompactedFill(
                        i,
                        fill,
                        received.get(fill.taker),
                        replica.witnessed_time(fill.taker) if i < final else None,
                    )
                )
        return out

    def fill_list(self, start: int, stop: int | None = None) -> list[Fill]:
        """The fills alone (see :meth:`fills`)."""
        replica = self.replica
        if start >= replica.compacted_fills:  # the usual case: no store, no times
            fills = replica.fills(start)
            return list(fills if stop is None else fills[: max(0, stop - start)])
        return [c.fill for c in self.fills(start, stop)]

    def order_with_times(self, order_id: bytes) -> CompactedOrder | None:
        """An order by id with the times the node knows for it: from the replica, else (a
        compacted order) from a compaction being saved or the store."""
        order = self.replica.order(order_id)
        if order is not None:
            return CompactedOrder(order, self.received_ms.get(order_id), None)
        return self._compacted_order(order_id)

    def _compacted_order(self, order_id: bytes) -> CompactedOrder | None:
        if self.archive is None:
            return None
        saving = self.archive.saving
        found = None if saving is None else saving.order(order_id)
        if found is not None:
            return found
        return self.archive.store.compacted_order(self.market.id, order_id)

    def compacted_orders_newest(self, author: bytes | None, limit: int) -> list[CompactedOrder]:
        """The newest ``limit`` orders (``author``'s, or everyone's) that compactions took out
        of the replica, by Lamport time, oldest first: from a compaction being saved and from
        the store (a SQLite index walk of ``limit`` rows)."""
        if self.archive is None or limit <= 0:
            return []
        found = {
            row.order.id: row
            for row in self.archive.store.compacted_orders_newest(self.market.id, author, limit)
        }
        saving = self.archive.saving
        if saving is not None:
            for row in saving.order_rows():
                if author is None or row.order.author == author:
                    found[row.order.id] = row
        rows = sorted(found.values(), key=lambda row: (row.order.lamport, row.order.id))
        return rows[-limit:]

    def order_by_client_id(self, author: bytes, tag: str) -> OrderState | None:
        """``author``'s order with client id ``tag``, compacted or not."""
        order = self.replica.order_by_client_id(author, tag)
        if order is not None or self.archive is None:
            return order
        saving = self.archive.saving
        if saving is not None:
            for held in saving.orders:
                if held.author == author and held.tag == tag:
                    return held
        found = self.archive.store.compacted_order_by_tag(self.market.id, author, tag)
        return None if found is None else found.order

    def orders_with_prefix(self, prefix: str, limit: int) -> list[OrderState]:
        """Compacted orders whose hex id starts with ``prefix`` (at most ``limit``)."""
        if self.archive is None or not self.replica.compacted_ops:
            return []
        found = {
            c.order.id: c.order
            for c in self.archive.store.compacted_orders_with_prefix(self.market.id, prefix, limit)
        }
        saving = self.archive.saving
        if saving is not None:
            found.update((o.id, o) for o in saving.orders if o.id.hex().startswith(prefix))
        return list(found.values())[:limit]

    def digest(self) -> bytes:
        """The replica's digest, cached per state version (it hashes the whole state)."""
        version = (self.replica.version, len(self.replica))
        if self._digest is None or self._digest[0] != hash(version):
            self._digest = (hash(version), self.replica.digest())
        return self._digest[1]


class Watcher:
    """One watch stream: a wake-up channel that coalesces, and the ids applied since."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[None](1)
        self.ids: list[bytes] = []
        self.dropped = 0

    def take(self) -> tuple[list[bytes], int]:
        ids, dropped = self.ids, self.dropped
        self.ids, self.dropped = [], 0
        return ids, dropped


class _Compaction:
    """One compaction on its way to the store: what left memory, readable until saved. Its
    rows are built as they are read (most in the store's worker thread, not on the event loop:
    ~70k of them per 50k ops)."""

    def __init__(
        self,
        report: CompactReport,
        received: _Fallback,
        witnessed: dict[bytes, int | None],
        snapshot: Snapshot,
    ) -> None:
        self.ops = report.ops
        self.ops_set = frozenset(report.ops)
        self.fills_start = report.fills_start
        self.fills = report.fills
        self.orders = report.orders
        #: The point compacted at and the prefix ops it added, in total order (``order_start``
        #: is the first one's final index): the store serves history from these.
        self.point = report.point
        self.order_start = report.order_start
        self.prefix_order = report.order
        #: The node-local times of what left memory (received: popped from the market's map).
        self._received = received
        self._witnessed = witnessed
        self.snapshot = snapshot
        self._by_id: dict[bytes, OrderState] | None = None

    def fill_rows(self, low: int = 0, high: int | None = None) -> Iterator[CompactedFill]:
        """Its fills ``low`` to ``high`` (positions in this compaction) as stored."""
        received, witnessed, start = self._received, self._witnessed, self.fills_start
        for i, fill in enumerate(self.fills[low:high], low):
            taker = fill.taker
            yield CompactedFill(start + i, fill, received.get(taker), witnessed.get(taker))

    def order_rows(self) -> Iterator[CompactedOrder]:
        received, witnessed = self._received, self._witnessed
        for order in self.orders:
            ident = order.id
            yield CompactedOrder(order, received.get(ident), witnessed.get(ident))

    def order(self, order_id: bytes) -> CompactedOrder | None:
        if self._by_id is None:
            self._by_id = {order.id: order for order in self.orders}
        order = self._by_id.get(order_id)
        if order is None:
            return None
        return CompactedOrder(order, self._received.get(order_id), self._witnessed.get(order_id))


class _Fallback:
    """Reads one map, then another where the first has no entry (``get`` only)."""

    def __init__(self, first: dict[bytes, int], then: dict[bytes, int]) -> None:
        self._first = first
        self._then = then

    def get(self, key: bytes) -> int | None:
        found = self._first.get(key)
        return self._then.get(key) if found is None else found


class StoreArchive:
    """A compacted replica's archive (``crdtbook.Replica``'s ``archive``): the node's store,
    which keeps every op. It answers only for ops a compaction took out of memory, as the core
    requires: those the store marked compacted, and those of a compaction whose store write is
    under way (``saving``, also what the market's history reads consult meanwhile)."""

    def __init__(self, store: OpStore, market: bytes) -> None:
        self.store = store
        self.market = market
        self.saving: _Compaction | None = None

    def get(self, ident: bytes) -> bytes | None:
        saving = self.saving
        if saving is not None and ident in saving.ops_set:
            return self.store.get_raw(self.market, ident)
        return self.store.get_raw(self.market, ident, compacted=True)


def _batch_length(outbox: list[bytes], most: int) -> int:
    """How many of the first ops in ``outbox`` make one gossip message: at most ``most`` ops, and
    within MAX_GOSSIP_BYTES once encoded (pubsub refuses a bigger message at publish), at least
    one (the core bounds an op far below that)."""
    head = outbox[:most]
    size = GOSSIP_ENVELOPE_BYTES + GOSSIP_OP_OVERHEAD * len(head) + sum(map(len, head))
    if size <= MAX_GOSSIP_BYTES:  # the usual case: ~250-byte ops, 2,000 of them ~0.5 MB
        return len(head)
    size = GOSSIP_ENVELOPE_BYTES
    for count, raw in enumerate(head):
        size += len(raw) + GOSSIP_OP_OVERHEAD
        if size > MAX_GOSSIP_BYTES:
            return max(1, count)
    return len(head)


@dataclass
class IngestResult:
    new: int = 0  # ops applied or pending now that were not known before
    duplicates: int = 0
    invalid: int = 0


@dataclass
class Prepared:
    """Ops verified by ``NodeService.prepare``, not yet applied."""

    ops: list[Op]
    result: IngestResult
    #: The bytes each op came as (an ``Op`` holds no copy; re-encoding it would cost more).
    raws: dict[bytes, bytes] = field(default_factory=dict)


def _decode_all(
    items: list[tuple[bytes, bytes]], intern_id: Callable[[bytes], bytes] | None = None
) -> list[Op | tuple[bytes, InvalidOp]]:
    """Decode and verify ``(raw, id)`` pairs whose ids ``prepare`` just hashed (to skip known
    ops before decoding): ``decode_with_id`` takes the id instead of hashing the bytes again."""
    out: list[Op | tuple[bytes, InvalidOp]] = []
    # Parents are mostly the ops just before in the same batch: share those ids too.
    local: dict[bytes, bytes] = {}

    def shared_id(ident: bytes) -> bytes:
        found = local.get(ident)
        if found is not None:
            return found
        return ident if intern_id is None else intern_id(ident)

    for raw, ident in items:
        try:
            op = decode_with_id(raw, ident, shared_id)
            local[op.id] = op.id
            out.append(op)
        except InvalidOp as exc:
            out.append((raw, exc))
    return out


async def _decode_parallel(
    raws: list[tuple[bytes, bytes]], intern_id: Callable[[bytes], bytes] | None = None
) -> list[Op | tuple[bytes, InvalidOp]]:
    """Decode and verify, off the event loop for big batches, on every core for bigger ones:
    PyNaCl releases the GIL while it verifies, and verification is the ingest ceiling."""
    if len(raws) < THREAD_VERIFY_MIN:
        return _decode_all(raws, intern_id)
    parts = max(1, min(VERIFY_THREADS, len(raws) // THREAD_VERIFY_MIN))
    size = -(-len(raws) // parts)
    chunks = [raws[i : i + size] for i in range(0, len(raws), size)]
    results: list[list[Op | tuple[bytes, InvalidOp]]] = [[] for _ in chunks]

    async def run(index: int) -> None:
        results[index] = await trio.to_thread.run_sync(_decode_all, chunks[index], intern_id)

    async with trio.open_nursery() as nursery:
        for index in range(len(chunks)):
            nursery.start_soon(run, index)
    return [item for part in results for item in part]


def _cap_key(market: bytes) -> str:
    """The meta key of a market's held frontier (``NodeService._keep_frontier_cap``)."""
    return "frontier_cap:" + market.hex()


def _read_cap(raw: bytes | None) -> tuple[int | None, list[bytes]]:
    """A held frontier as stored (``b"CAP ID..."``, ids in hex; empty: none): the frontier and
    the ids of the reconfigurations that waited. Anything else (our own row, damaged) reads as
    none: the restart then holds finality where its replay meets the reconfiguration."""
    parts = (raw or b"").split()
    if not parts:
        return None, []
    try:
        return int(parts[0]), [bytes.fromhex(part.decode()) for part in parts[1:]]
    except (ValueError, UnicodeDecodeError):
        return None, []


class _StoreWriter:
    """Makes ops durable before the node acknowledges or forwards them.

    Without ``fsync`` (the default) the store runs SQLite WAL with synchronous=NORMAL: a commit
    is in the OS before ``add_ops`` returns, so it survives the node being killed (kill -9) but
    not an OS crash or power loss. Such a commit takes ~50 us, so it runs inline: gossip
    validators (which libp2p runs one at a time per peer) never wait on a thread or a lock.

    With ``fsync`` (synchronous=FULL) every commit also reaches the disk, which takes
    milliseconds: commits then run on a worker thread, and concurrent writers share one
    transaction and one fsync (group commit).
    """

    def __init__(
        self,
        store: OpStore,
        fsync: bool,
        on_failure: Callable[[StoreWriteError, list[bytes]], None],
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self._store = store
        self._fsync = fsync
        #: True while a long transaction (a compaction's) holds the store: a write then waits
        #: for it in a worker thread, so the event loop runs on meanwhile.
        self._busy = busy
        self._queue: list[_Write] = []
        self._lock = trio.Lock()
        #: Called, before any other task runs, with the error and the ids of every op whose
        #: write failed (so the node can forget them before anyone sees them).
        self._on_failure = on_failure

    async def write(self, items: list[tuple[bytes, bytes, int, bytes]]) -> None:
        """Return once ``items`` are committed; raise ``StoreWriteError`` if they are not."""
        if not self._fsync:
            try:
                if self._busy():
                    await trio.to_thread.run_sync(self._store.add_ops, items)
                else:
                    self._store.add_ops(items)
            except StoreWriteError as exc:
                self._on_failure(exc, [item[0] for item in items])
                raise
            return
        mine = _Write(items)
        self._queue.append(mine)
        async with self._lock:
            if not mine.done.is_set():
                batch, self._queue = self._queue, []
                flat = [item for write in batch for item in write.items]
                try:
                    # Not abandon_on_cancel: we must know the commit happened before
                    # acknowledging.
                    await trio.to_thread.run_sync(self._store.add_ops, flat)
                except StoreWriteError as exc:
                    # The group failed, and so does every write queued meanwhile: the node
                    # forgets all their ops at once (they were signed or applied before the
                    # failure was known).
                    batch += self._queue
                    self._queue = []
                    for write in batch:
                        write.error = exc.copy()
                    self._on_failure(exc, [item[0] for write in batch for item in write.items])
                finally:
                    for write in batch:
                        write.done.set()
        await mine.done.wait()
        if mine.error is not None:
            raise mine.error


@dataclass
class _Write:
    """One caller's items in a group commit, and how it ended."""

    items: list[tuple[bytes, bytes, int, bytes]]
    done: trio.Event = field(default_factory=trio.Event)
    error: StoreWriteError | None = None


class NodeService:
    """Replicas, their durability and the owner's operations; no libp2p types in here."""

    def __init__(
        self,
        identity: Identity,
        store: OpStore,
        markets: list[Market],
        *,
        gossip_batch: int = MAX_BATCH_OPS,
        flush_delay: float = FLUSH_DELAY,
        publish_interval: float = PUBLISH_INTERVAL,
        fsync: bool = False,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        point_interval: int = POINT_INTERVAL,
        retention: int | None = None,
    ) -> None:
        self.identity = identity
        self.point_interval = point_interval
        #: Archived ops kept below each new point (node.retention); None: all of them.
        self.retention = retention_.check_retention(retention)
        self.heartbeat_interval = heartbeat_interval
        self.publish_interval = publish_interval
        self.gossip_batch = max(1, min(gossip_batch, MAX_BATCH_OPS))
        self.flush_delay = flush_delay
        #: Whether the node's loop has time to spare for the shorter publish period
        #: (node/publish_schedule.py); it judges only once registered as a trio instrument
        #: (node/app.py does), and is spare until then.
        self.headroom = LoopHeadroom()
        #: The wall clock the publish schedule's shared instants are taken on (tests set theirs).
        self.wall_clock: Callable[[], float] = time.time
        self.store = store
        self.markets: dict[bytes, MarketState] = {m.id: self._market_state(m) for m in markets}
        self.by_name: dict[str, MarketState] = {ms.market.name: ms for ms in self.markets.values()}
        #: Compactions being written to the store (see _StoreWriter's ``busy``).
        self._saving = 0
        self._writer = _StoreWriter(store, fsync, self._write_failed, lambda: self._saving > 0)
        #: Set while the store refuses writes (see ``_store_ready``); None when it takes them.
        self.store_fault: StoreWriteError | None = None
        self._store_tried = -float("inf")
        self._rejects: dict[str, deque[float]] = {}
        self.closing = False
        self.started = time.time()
        #: This start follows a machine crash that may have lost the store's last commits
        #: (node.crash_gate): own signing waits for a first sync of each market. Set by the app;
        #: ``crash_wait_from``: the trio time the wait is counted from.
        self.after_crash = False
        self.crash_wait_from = 0.0
        self._applied_since_freeze = 0

    def _market_state(self, market: Market) -> MarketState:
        if not market.witnessed:  # never compacts: needs no archive
            return MarketState(market, Replica(market), topic_for(market))
        archive = StoreArchive(self.store, market.id)
        replica = Replica(market, archive=archive, point_interval=self.point_interval)
        ms = MarketState(market, replica, topic_for(market), archive=archive)
        ms.retention = self.retention
        return ms

    def note_applied(self, count: int) -> None:
        """GC policy. A replica's state (ops, orders, journals) lives as long as the node and
        holds no reference cycles, yet CPython's cyclic GC re-scans it on every full collection:
        bench/bench_core.py measured that as over half the apply time at 200k ops. Every
        GC_FREEZE_EVERY applied ops, collect once (freeing real garbage cycles from trio or
        libp2p) and move what survived to the permanent generation, which the GC skips."""
        self._applied_since_freeze += count
        if self._applied_since_freeze >= GC_FREEZE_EVERY:
            self._applied_since_freeze = 0
            gc.collect()
            gc.freeze()

    # -- start-up ----------------------------------------------------------------------------

    def load_from_store(self, *, use_checkpoints: bool = True) -> dict[str, int]:
        """Rebuild every replica from the store: every stored op (verified before it was
        stored, so decoded without a second signature check), matched from the market's
        checkpoint where it still applies, else from scratch. Returns ops per market name."""
        loaded: dict[str, int] = {}
        for ms in self.markets.values():
            market = ms.market
            self.store.add_market(market.id, market.name, market.tick, market.lot)
            loaded[market.name] = self._restore(ms, use_checkpoints)
        return loaded

    def _restore(self, ms: MarketState, use_checkpoints: bool = True) -> int:
        """Replace ``ms``'s replica with one rebuilt from the store; returns its op count
        (compacted ones included). A compacted market starts from its snapshot and
        the live ops; if that fails, from the whole log."""
        market = ms.market
        started = time.monotonic()
        archive = ms.archive
        snapshot = None
        joined = None
        if archive is not None:
            # The new replica is the store's (a compaction still being saved is not in it,
            # or is and the snapshot says so): nothing to answer for from memory any more.
            archive.saving = None
            snapshot = self.store.get_snapshot(market.id)
            joined = self.store.join_state(market.id)
            ms.prune = retention_.read_state(self.store, market.id)
        # Joined from a snapshot: the store holds the prefix only once its history was fetched;
        # and not once retention pruned it.
        history = (joined is None or joined.history >= joined.n) and not ms.prune.below
        if joined is not None:
            ms.join_state = ms.join_state or "snapshot"
            try:
                ms.join_info = read_point(market, joined.data)
                ms.join_fills = point_fills(market, joined.data)
            except SnapshotRefused as exc:  # the store's own bytes: damaged on disk
                logger.warning("%s: the joined point does not read (%s)", market.name, exc)
            if joined.derived >= joined.n:
                ms.derive_state, ms.derive_progress = "done", 1.0
            if not history:  # a fetch the node did not finish: fetched again when needed
                self.store.drop_history(market.id, joined.n)
        # The cyclic GC off while loading: everything loaded lives on and holds no cycles,
        # yet collections would walk the growing log again and again. Afterwards the lot
        # goes straight to the permanent generation (a collection first would walk it all
        # once more, for the few cycles loading leaves: not worth it).
        gc.disable()
        try:
            replica = None
            if archive is not None and snapshot is not None:
                try:
                    replica = Replica.from_snapshot(
                        market,
                        snapshot.data,
                        self.store.load_market(market.id, live_only=True),
                        archive=archive,
                        verify=False,
                        point_interval=self.point_interval,
                        history=history,
                    )
                except ValueError as exc:  # the core's word for a blob it cannot use
                    logger.warning(
                        "%s: the snapshot does not restore (%s); replaying the whole log",
                        market.name,
                        exc,
                    )
            if replica is None:
                # The checkpoint is older than a snapshot whenever both exist: not used then.
                use = use_checkpoints and snapshot is None
                checkpoint = self.store.get_checkpoint(market.id) if use else None
                if not history:
                    logger.warning(
                        "%s: the store lacks history before the point (joined from a snapshot,"
                        " or pruned by --retention): the whole log replayed lacks it (ops naming"
                        " it wait for sync)",
                        market.name,
                    )
                replica = Replica.restore(
                    market,
                    self.store.load_market(market.id),
                    checkpoint,
                    verify=False,
                    archive=archive,
                    point_interval=self.point_interval,
                )
        finally:
            gc.freeze()
            gc.enable()
            self._applied_since_freeze = 0
        seconds = time.monotonic() - started
        self._hold_kept_frontier(ms, replica)
        ms.replica = replica
        ms._digest = None  # cached for the replica it replaces
        ms.finality.prime(replica)
        self._forget_evicted(ms)  # a store that held more orphans than the buffer does
        report = replica.restore_report
        for _, why in report.skipped[:10]:
            logger.warning("skipping a stored op that does not apply: %s", why)
        if len(report.skipped) > 10:
            logger.warning("... and %d more", len(report.skipped) - 10)
        covered = report.from_checkpoint
        compacted = replica.compacted_ops
        if compacted:
            how = f"snapshot of {compacted} compacted ops + {len(replica) - compacted} live ops"
        elif covered:
            how = f"checkpoint of {covered} ops + replay of {len(replica) - covered}"
        elif report.checkpoint_unused is None:
            how = "full replay (no checkpoint)"
        else:
            how = f"full replay (checkpoint not used: {report.checkpoint_unused})"
        logger.info("loaded %s: %d ops in %.2f s, %s", market.name, len(replica), seconds, how)
        return len(replica)

    def write_checkpoints(self) -> None:
        """Store a checkpoint of every market's matched state (on an orderly stop, once no
        task changes the replicas any more): the next start matches only what it lacks.

        Ops that gossip queued are applied first (they are stored already), so that the
        checkpoint covers them. The newest ops are left out (``checkpoint_tail``). A market that
        compacts (it has compacted, or has a snapshot in the store) is compacted instead: its
        next start reads the snapshot and the few live ops, and never the checkpoint."""
        for ms in self.markets.values():
            replica = ms.replica
            if ms.apply_queue:
                batch, ms.apply_queue = ms.apply_queue, []
                ms.queued.clear()
                replica.apply_many(batch)
            if ms.archive is not None and (
                replica.compacted_ops or self.store.get_snapshot(ms.market.id) is not None
            ):
                record = self._take_compaction(ms)
                if record is not None:  # else the stored snapshot is the latest point's
                    self._saved(ms, record, self._save_compaction(ms, record))
                continue
            if not len(replica):
                continue
            started = time.monotonic()
            tail = checkpoint_tail(len(replica))
            blob = replica.checkpoint(tail)
            covered = max(replica.undo_floor, len(replica) - tail)
            self.store.set_checkpoint(ms.market.id, covered, blob)
            logger.info(
                "checkpoint of %s: %d of %d ops, %d bytes, %.3f s",
                ms.market.name,
                covered,
                len(replica),
                len(blob),
                time.monotonic() - started,
            )

    # -- compaction (witnessed markets) ---------------------------------------------------------

    def compaction_due(self, ms: MarketState) -> bool:
        """Whether the replica's final ops reached its next point (witnessed markets; not
        while a compaction is being saved, nor while the store refuses writes, nor again
        before anything changed after one that found no point)."""
        archive = ms.archive
        if archive is None or archive.saving is not None or self.store_fault is not None:
            return False
        replica = ms.replica
        if ms.compact_idle_version == replica.version:
            return False
        interval = replica.point_interval
        if replica.final_count < (replica.compacted_ops // interval + 1) * interval:
            return False
        return not self._reconfiguration_waits(ms)

    def _reconfiguration_waits(self, ms: MarketState) -> bool:
        """No compaction while a reconfiguration waits for the history (a pruned or joined
        node): the final prefix here may count a witness it removes, and a compaction would make
        that for good (seen: a pruned witness that compacted so diverged from every node, its
        history fetch refused as forged by all; ``Replica.reconfiguration_waits_for_history``).
        Said once at INFO per wait."""
        if not ms.replica.reconfiguration_waits_for_history():
            ms.compaction_waits = False
            return False
        if not ms.compaction_waits:
            ms.compaction_waits = True
            logger.info(
                "%s: not compacting yet: a reconfiguration of the witnesses waits for the "
                "history before the point",
                ms.market.name,
            )
        return True

    async def compact(self, ms: MarketState) -> bool:
        """Compact the market's replica and record it in the store (in a worker thread: one
        transaction, which marks some ``compact_after`` ops). Returns whether it was saved. If
        the write fails, the replica is rebuilt from the store as it still is (compacted as of
        the previous snapshot), so memory and the store never disagree."""
        record = self._take_compaction(ms)
        if record is None:
            return False
        # A new point: the heartbeat task attests it (``_heartbeat_due``).
        ms.changed.set()
        ms.changed = trio.Event()
        self._saving += 1  # meanwhile, op writes wait for the store in threads, not the loop
        try:
            # Not abandon_on_cancel: the store lock must be released by the write itself.
            seconds = await trio.to_thread.run_sync(self._save_compaction, ms, record)
        except Exception as exc:  # never fatal: the node goes on with what the store has
            if isinstance(exc, StoreError):
                logger.warning("%s: compaction not saved (%s); reloading", ms.market.name, exc)
            else:
                logger.exception("%s: compaction not saved; reloading", ms.market.name)
            if isinstance(exc, StoreWriteError) and self.store_fault is None:
                self.store_fault = exc
                self._store_tried = time.monotonic()
            self._restore(ms)
            return False
        finally:
            self._saving -= 1
        self._saved(ms, record, seconds)
        if self.retention is not None:
            await self._prune(ms, self.retention)
        return True

    async def _prune(self, ms: MarketState, keep: int) -> None:
        """Retention after a compaction (node.retention): delete the archived ops more than
        ``keep`` final ops below the point. A failed write is logged; the next point retries."""
        self._saving += 1  # chunked deletes: op writes wait for the store in threads meanwhile
        started = time.perf_counter()
        try:
            deleted = await retention_.prune(self.store, ms, keep, self.identity.public_key)
        except StoreError as exc:
            logger.warning("%s: pruning the archive failed (%s)", ms.market.name, exc)
            return
        finally:
            self._saving -= 1
        if deleted:
            logger.info(
                "%s: retention pruned %d archived ops below final op %d in %.2f s",
                ms.market.name,
                deleted,
                ms.prune.below,
                time.perf_counter() - started,
            )

    def _take_compaction(self, ms: MarketState) -> _Compaction | None:
        """Compact the replica (synchronously, no task runs meanwhile) and return what left its
        memory with the snapshot, keeping it readable (``ms.archive.saving``) until saved; None
        when there was no new point to compact at."""
        replica, archive = ms.replica, ms.archive
        assert archive is not None, "only witnessed markets compact"
        if replica.reconfiguration_waits_for_history():  # as compaction_due (an orderly stop)
            return None
        started = time.perf_counter()
        # Witnessed times are read off placements, which the replica forgets for compacted ops:
        # read them first, for the orders among the final ops (fills name their takers), once
        # per placement (a heartbeat batch shares one time).
        first = replica.compacted_ops
        witnessed: dict[bytes, int | None] = {}
        by_place: dict[int | None, int | None] = {}
        for op in islice(replica.iter_ops(first), max(0, replica.final_count - first)):
            if op.kind == "order":
                place = replica.placement(op.id)
                if place not in by_place:
                    by_place[place] = replica.witnessed_time(op.id)
                witnessed[op.id] = by_place[place]
        report = replica.compact()
        if not report.point:
            ms.compact_idle_version = replica.version
            return None
        blob = replica.snapshot()
        received = ms.received_ms
        # The times of what left memory leave the market's map (fills' takers and orders still
        # in memory keep theirs there: read through it while saving).
        gone = {i: t for i in report.ops if (t := received.pop(i, None)) is not None}
        record = _Compaction(
            report,
            _Fallback(gone, received),
            witnessed,
            Snapshot(replica.compacted_ops, replica.compacted_fills, blob),
        )
        archive.saving = record
        ms._digest = None
        seconds = time.perf_counter() - started
        ms.compact_s_max = max(ms.compact_s_max, seconds)
        logger.info(
            "%s: compacted %d ops, %d fills, %d orders out of memory in %.2f s "
            "(%d ops compacted in all, %d after that point; snapshot %d bytes)",
            ms.market.name,
            len(report.ops),
            len(report.fills),
            len(report.orders),
            seconds,
            replica.compacted_ops,
            len(replica) - replica.compacted_ops,
            len(blob),
        )
        return record

    def _save_compaction(self, ms: MarketState, record: _Compaction) -> float:
        """Write one compaction to the store (one transaction; any thread); its seconds."""
        started = time.perf_counter()
        self.store.compact(
            ms.market.id,
            record.ops,
            record.fill_rows(),
            record.order_rows(),
            record.snapshot,
            point=record.point,
            order_start=record.order_start,
            order=record.prefix_order,
        )
        return time.perf_counter() - started

    def _saved(self, ms: MarketState, record: _Compaction, seconds: float) -> None:
        """A compaction is in the store: let go of it (on the event loop)."""
        if ms.archive is not None and ms.archive.saving is record:
            ms.archive.saving = None
        ms.compactions += 1
        ms.save_s_max = max(ms.save_s_max, seconds)
        logger.info("%s: compaction saved in %.2f s", ms.market.name, seconds)

    # -- joins (node.join) -------------------------------------------------------------------

    def needs_join(self, ms: MarketState) -> bool:
        """Whether ``ms`` is a witnessed market of which this node holds nothing (no op, no
        snapshot): one it may join from a peer's snapshot."""
        replica = ms.replica
        return (
            ms.archive is not None
            and not len(replica)
            and not replica.pending_count
            and self.store.get_snapshot(ms.market.id) is None
        )

    def point_hashes(self, ms: MarketState) -> list[tuple[int, bytes]]:
        """The points whose blobs the store holds for ``ms`` (served to joiners), ``(n,
        sha256)``, the newest first; cached until the replica's next point is saved."""
        latest = ms.replica.point
        key = 0 if latest is None else latest.n
        cached = ms._point_hashes
        if cached is not None and cached[0] == key:
            return cached[1]
        hashes = [(n, hashlib.sha256(b).digest()) for n, b in self.store.points(ms.market.id)]
        if ms.archive is None or ms.archive.saving is None:  # else the newest is not in yet
            ms._point_hashes = (key, hashes)
        return hashes

    async def adopt_snapshot(
        self, ms: MarketState, blob: bytes, info: PointInfo, kept: list[bytes]
    ) -> None:
        """Start ``ms`` from a checked snapshot (its point blob and kept ops' bytes) without
        its history, plus the ops the store took meanwhile (gossip, while joining). The join is
        stored first (one transaction), then the replica replaces the empty one, in one step
        of the event loop. Raises ``SnapshotRefused`` if the core cannot use the blob."""
        market = ms.market
        self._store_ready()
        live = self._after_point(ms, kept)
        try:
            replica = Replica.from_snapshot(
                market,
                blob,
                [*kept, *live],
                archive=ms.archive,
                verify=False,  # kept ops: authenticated by the ids the attested blob lists
                point_interval=self.point_interval,
                history=False,
            )
        except SnapshotRefused:
            raise
        except ValueError as exc:
            raise SnapshotRefused("damaged", str(exc)) from None
        items = []
        for raw in kept:
            op = decode(raw, verify=False)
            items.append((op.id, market.id, op.lamport, raw))
        snapshot = Snapshot(replica.compacted_ops, replica.compacted_fills, blob)
        self.store.save_join(market.id, items, snapshot, info.n)
        ms.replica = replica
        ms.apply_queue, ms.queued = [], set()  # all stored, so in ``live`` or dropped
        ms._digest = None
        ms._point_hashes = None
        ms.join_info = info
        ms.join_fills = replica.compacted_fills
        ms.join_state = "snapshot"
        ms.finality.prime(replica)
        self._forget_evicted(ms)
        self.notify(ms, [])

    def _after_point(self, ms: MarketState, kept: list[bytes]) -> list[bytes]:
        """The ops the store took while ``ms`` was joining (gossip: a new subscriber is sent
        the recent messages too), but for copies of ops before the point that the kept set
        lacks: an author's op at a sequence number at most its tip's in the kept set (every
        author's tip is kept). Those would wait for the history and make the node fetch it
        for nothing; they leave the store (a fork among them: sync brings it again)."""
        tips: dict[bytes, int] = {}
        kept_ids = set()
        for raw in kept:
            op = decode(raw, verify=False)
            kept_ids.add(op.id)
            tips[op.author] = max(tips.get(op.author, 0), op.seq)
        live: list[bytes] = []
        before: list[bytes] = []
        for raw in self.store.load_market(ms.market.id, live_only=True):
            op = decode(raw, verify=False)  # verified when stored
            if op.id not in kept_ids and op.seq <= tips.get(op.author, 0):
                before.append(op.id)
            else:
                live.append(raw)
        if before:
            self.store.delete_ops(before)
            logger.info(
                "%s: %d ops gossip brought while joining are from before the point; dropped",
                ms.market.name,
                len(before),
            )
        return live

    async def history_fetched(self, ms: MarketState, info: PointInfo | None = None) -> int:
        """The history of ``info`` (default: the joined point) is staged in the store and
        checked: archive it, and judge the ops that waited for it. Returns how many ops that
        applied. (A pruned node fetches the prefix of its latest point: node.retention.)"""
        info = info or ms.join_info
        assert info is not None, "only a joined or pruned market fetches history"
        await trio.to_thread.run_sync(self.store.finish_history, ms.market.id, info.n, info.kept)
        retention_.restored(self.store, ms)
        report = ms.replica.history_complete()
        applied = report.applied
        if applied:
            # An op that waited for the history may not be stored yet (the store keeps what
            # the replica holds): store them all (a repeat is ignored).
            await self._writer.write([(op.id, op.market_id, op.lamport, op.raw) for op in applied])
        self._forget_evicted(ms)
        if report.invalid:
            ms.refused += len(report.invalid)
            # Stored while they waited (commit and gossip keep ops held for the history): a
            # refusal leaves the store, as a refused pending op does.
            refused = [ident for ident, _ in report.invalid if ident is not None]
            try:
                self.store.delete_ops(refused)
            except StoreError as exc:  # kept: judged (and refused) again at the next start
                logger.warning("could not drop %d refused ops from the store: %s",
                               len(refused), exc)
        self.notify(ms, applied)
        self.note_applied(len(applied))
        return len(applied)

    # -- store faults ------------------------------------------------------------------------

    def _ready_to_sign(self, ms: MarketState, *, cancelling: bool = False) -> None:
        """Raise ``StoreWriteError`` while the store refuses writes; ``KeyEquivocated`` once
        this node's key signed two ops at one sequence number here (but for ``cancelling``);
        ``SigningWaits`` while the replica holds ops of this node's key it has not applied
        (e.g. after a restart, waiting for history): an op signed then would reuse one's
        sequence number, an equivocation that stalls finality for every node of a witnessed
        market."""
        self._store_ready()
        me = self.identity.public_key
        # Cancels still go with a spent key: its resting orders must not be stuck (a new key
        # cannot cancel them), and a cancel adds no exposure.
        if not cancelling and me in ms.replica.forked_authors():
            self._key_equivocated(ms)
        if self.after_crash and ms.last_sync is None and not ms.crash_wait_over:
            self._check_crash_wait(ms)
        ms.replica.check_can_sign(me)

    def _key_equivocated(self, ms: MarketState) -> None:
        """Raise ``KeyEquivocated`` for ``ms`` (the log says it once, at ERROR)."""
        message = (
            f"this node's key signed two different ops at one sequence number in "
            f"{ms.market.name} (another node runs with this key, e.g. from a copied home, or this "
            "node lost ops it had sent): it signs no new orders or heartbeats in this market, "
            "only cancels. Stop any other node using this home's identity.key; trade from a node "
            "with a new key (crdtbook id --init --home NEWDIR)"
        )
        if not ms.key_equivocated:
            ms.key_equivocated = True
            logger.error("%s", message)
        raise KeyEquivocated(message)

    def _check_crash_wait(self, ms: MarketState) -> None:
        """Raise ``SigningWaits`` while ``ms`` waits for its first sync after a crash
        (node.crash_gate): until a sync completes, or until ``CRASH_SIGNING_WAIT`` passed with
        no sync session begun for as long (no peer)."""
        now = trio.current_time()
        last_try = ms.last_sync_try
        quiet_since = self.crash_wait_from if last_try is None else last_try
        if now - quiet_since >= CRASH_SIGNING_WAIT:
            logger.warning(
                "%s: signing without a first sync after a crash: no peer answered for %.0f s; "
                "if a peer that comes back later holds an op this node lost, its key equivocates",
                ms.market.name,
                now - quiet_since,
            )
            ms.crash_wait_over = True
            return
        raise SigningWaits(
            "this node restarted after its machine crashed and may have lost its own last ops "
            "(the store commits without --fsync); peers may hold them, so it signs nothing in "
            f"{ms.market.name} until a sync with a peer completes (at most "
            f"{CRASH_SIGNING_WAIT:.0f} s with no peer): retry"
        )

    def _store_ready(self) -> None:
        """Raise ``StoreWriteError`` while the store refuses writes (disk full, read-only), so
        that nothing new is signed, applied or accepted that could not be stored. A known fault
        is tried again (one small write) at most every STORE_RETRY_INTERVAL."""
        fault = self.store_fault
        if fault is None:
            return
        now = time.monotonic()
        if now - self._store_tried < STORE_RETRY_INTERVAL:
            raise fault.copy()
        self._store_tried = now
        try:
            self.store.check_writable()
        except StoreWriteError as exc:
            self.store_fault = exc
            raise exc.copy() from None
        self.store_fault = None
        logger.warning(
            "the op store takes writes again: new ops are accepted, sync fetches what was missed"
        )

    def store_writable(self) -> bool:
        """False while the store refuses writes (tried again as ``_store_ready`` does): a sync
        pull then waits, since nothing it brought could be stored."""
        try:
            self._store_ready()
        except StoreWriteError:
            return False
        return True

    def _write_failed(self, exc: StoreWriteError, ids: list[bytes]) -> None:
        """The write of ``ids`` failed (the store writer calls this before any other task
        runs). New ops are refused from now on (``_store_ready``). A market whose replica holds
        any of these ops (own ops and sync are applied before they are stored) is rebuilt from
        the store at once, so that no task shows, serves or heartbeats over an op the node has
        not stored, and this node's next op may reuse a lost own op's sequence number: nobody
        saw that op. (With ``fsync`` the failed commit ran in a thread, and a sync answer may
        have sent such an op to a peer meanwhile: the window this leaves is that long.)"""
        if self.store_fault is None:
            logger.error("%s; refusing new ops until it takes writes again", exc)
        self.store_fault = exc
        self._store_tried = time.monotonic()
        for ms in self.markets.values():
            replica = ms.replica
            if any(replica.holds(ident) for ident in ids):
                ms.apply_queue, ms.queued = [], set()  # all stored: the store gives them back
                self._restore(ms)
                ms.changed.set()
                ms.changed = trio.Event()

    # -- ingest ------------------------------------------------------------------------------

    async def prepare(self, ms: MarketState, raws: list[bytes]) -> Prepared:
        """First half of ingest: skip known ops, decode and verify the rest (no state change
        but remembering invalid bytes), so a caller can verify one batch while the previous
        one commits."""
        result = IngestResult()
        replica = ms.replica
        fresh: list[tuple[bytes, bytes]] = []  # (raw, its id): hashed once, here
        seen: set[bytes] = set()
        queued = ms.queued
        for raw in raws:
            ident = op_id(raw)
            if replica.knows(ident) or ident in seen or ident in queued:
                if replica.is_invalid(ident):
                    result.invalid += 1
                else:
                    result.duplicates += 1
                continue
            seen.add(ident)
            fresh.append((raw, ident))
        ops: list[Op] = []
        raw_of: dict[bytes, bytes] = {}
        if fresh:
            decoded = await _decode_parallel(fresh, replica.intern_id)
            for (raw, ident), item in zip(fresh, decoded, strict=True):
                if isinstance(item, Op):
                    ops.append(item)
                    raw_of[ident] = raw
                else:  # never verify these bytes again
                    replica.remember_invalid(ident, item[1])
                    result.invalid += 1
        return Prepared(ops, result, raw_of)

    async def commit(self, ms: MarketState, prepared: Prepared, source: str) -> IngestResult:
        """Second half of ingest: apply verified ops, persist the new ones, tell watchers."""
        ops, result = prepared.ops, prepared.result
        if not ops:
            # Bytes that did not decode or verify (prepare) are refusals too: count them.
            ms.refused += result.invalid
            if result.invalid:
                logger.info("refused %d invalid ops from %s", result.invalid, source)
            return result
        self._store_ready()
        replica = ms.replica
        report = replica.apply_many(ops)
        self._forget_evicted(ms)
        result.invalid += len(report.invalid)
        result.duplicates += report.duplicates
        # Kept: what the replica holds, ops held for the history included (a restart holds
        # them again: a reconfiguration among them holds finality where it was).
        kept = [op for op in ops if replica.holds(op.id)]
        result.new = len(kept)
        if kept:
            raw_of = prepared.raws
            await self._writer.write(
                [(op.id, op.market_id, op.lamport, raw_of[op.id]) for op in kept]
            )
        ms.received += result.new
        ms.refused += result.invalid
        if result.invalid:
            logger.info("refused %d invalid ops from %s", result.invalid, source)
        if report.applied:
            self.notify(ms, report.applied)
            self.note_applied(len(report.applied))
        elif report.pending:
            self._held_for_history(ms)
        return result

    def _held_for_history(self, ms: MarketState) -> None:
        """Ops came and none applied (``notify`` woke nobody): if some wait for the history a
        pruned or joined replica lacks, wake node.join's history loop, which waits on
        ``changed``. Else a pruned witness whose restart found its own ops waiting never
        fetched it: every later op descends from what waits, so nothing applied again and
        nothing woke the loop (seen: stuck for good, finality stalled at every node)."""
        if not ms.replica.has_history and ms.replica.history_held:
            self._keep_frontier_cap(ms)  # a reconfiguration may have begun to wait
            ms.changed.set()
            ms.changed = trio.Event()

    async def validate_gossip(self, ms: MarketState, data: bytes, from_peer: str) -> bool:
        """Gossip validator: a message is forwarded only if every op in it is valid (or known),
        and only after the new ones are durable."""
        if self.closing:
            return False
        try:
            self._store_ready()
        except StoreWriteError:  # not stored, so not forwarded: sync brings it later
            return False  # (and it counts against no peer: see should_ban)
        try:
            raws = decode_batch(data)
        except WireError as exc:
            logger.info("refused a malformed gossip message from %s: %s", from_peer, exc)
            return False
        # Fast path: libp2p validates one message at a time per peer, so the validator only
        # verifies, judges what it can and persists; the apply task does the matching.
        prepared = await self.prepare(ms, raws)
        invalid = prepared.result.invalid
        replica = ms.replica
        accepted: list[Op] = []
        for op in prepared.ops:
            try:
                replica.precheck(op)  # False (parents not applied yet): judged on apply
            except InvalidOp as exc:
                replica.remember_invalid(op.id, exc)
                invalid += 1
                continue
            accepted.append(op)
        if accepted:
            raw_of = prepared.raws
            try:
                await self._writer.write(
                    [(op.id, op.market_id, op.lamport, raw_of[op.id]) for op in accepted]
                )
            except StoreWriteError:
                return False
            ms.apply_queue.extend(accepted)
            ms.queued.update(op.id for op in accepted)
            ms.apply_ready.set()
        if invalid:
            ms.refused += invalid
            logger.info("refused %d invalid ops from %s", invalid, from_peer)
        return invalid == 0

    async def apply_loop(self, ms: MarketState) -> None:
        """Apply what gossip validators queued, a batch at a time (one rewind per batch)."""
        while True:
            await ms.apply_ready.wait()
            ms.apply_ready = trio.Event()
            batch, ms.apply_queue = ms.apply_queue, []
            report = ms.replica.apply_many(batch)
            self._forget_evicted(ms)
            ms.queued.difference_update(op.id for op in batch)
            ms.received += len(batch)
            if report.invalid:
                ms.refused += len(report.invalid)
                logger.info("%d queued ops were invalid in context", len(report.invalid))
            if report.applied:
                self.notify(ms, report.applied)
                self.note_applied(len(report.applied))
            elif report.pending:
                self._held_for_history(ms)
            # No checkpoint here: the batch above never awaits, so nothing can have set the
            # fresh event meanwhile, and the wait above parks (the next step is the next
            # batch's wake-up; a checkpoint cost one more trip through trio's scheduler per
            # batch, ~0.66 task steps per op on five nodes at 500 ops/s).

    async def wal_checkpoint_loop(self) -> None:
        """Copy the store's WAL into its database every ``WAL_CHECKPOINT_INTERVAL`` seconds in
        a worker thread, so that no commit of the event loop's does it (the store's
        ``checkpoints_in_background``). A failure is logged and tried again next time: the
        WAL only grows meanwhile, and every commit still reaches it."""
        store = self.store
        try:
            store.checkpoints_in_background()
        except StoreError as exc:  # commits then checkpoint as SQLite does by default
            logger.warning("%s", exc)
            return
        while True:
            await trio.sleep(WAL_CHECKPOINT_INTERVAL)
            try:
                await trio.to_thread.run_sync(store.checkpoint_wal)
            except StoreError as exc:
                logger.warning("%s", exc)

    def _forget_evicted(self, ms: MarketState) -> None:
        """Pending ops the replica forgot (its bounded buffer was full) leave the store too:
        they are no verdict, sync brings them again once they can be applied, and a flood of
        orphans that never resolve must not grow the disk when it cannot grow memory. So do
        pending ops refused once judged (stored while pending, found invalid when their parents
        arrived): those are refusals, counted as such."""
        evicted = ms.replica.take_evicted()
        refused = ms.replica.take_refused_pending()
        if refused:
            ms.refused += len(refused)
            logger.info("refused %d ops that waited for their parents", len(refused))
        if not evicted and not refused:
            return
        try:
            self.store.delete_ops(evicted + refused)
        except StoreError as exc:  # kept on disk: reloaded as pending at the next start
            logger.warning(
                "could not drop %d evicted or refused ops from the store: %s",
                len(evicted) + len(refused),
                exc,
            )

    def should_ban(self, peer_id: str) -> bool:
        """Count one refusal against ``peer_id``; True when it crossed the ban threshold. Not
        while this node's store refuses writes: gossip is refused then for want of a disk, not
        for anything the peer did."""
        if self.store_fault is not None:
            return False
        now = trio.current_time()
        times = self._rejects.setdefault(peer_id, deque())
        times.append(now)
        while times and times[0] < now - BAN_WINDOW:
            times.popleft()
        if len(times) >= BAN_THRESHOLD:
            times.clear()
            return True
        return False

    # -- authoring ---------------------------------------------------------------------------

    async def submit(
        self,
        ms: MarketState,
        side: str,
        price: int,
        quantity: int,
        tif: str,
        tag: str | None,
        stp: str = "expire_maker",
    ) -> Op:
        self._ready_to_sign(ms)
        op = ms.replica.submit(self.identity, side, price, quantity, tif, tag, stp=stp)
        await self._publish_own(ms, op)
        return op

    async def amend(
        self,
        ms: MarketState,
        order_id: bytes,
        price: int,
        quantity: int,
        tag: str | None,
        stp: str = "expire_maker",
    ) -> tuple[Op, Op | None]:
        """Cancel-replace: sign a cancel of ``order_id`` and, right after it, a new order on the
        same side with the same time in force (``price``, ``quantity``, ``tag``), then store and
        send both together. Returns (cancel, new order); the new order is None if the replica
        refused to sign it (the cancel stands and is sent all the same)."""
        self._ready_to_sign(ms)
        replica = ms.replica
        cancel = replica.cancel(self.identity, order_id)  # BadCancel if it cannot
        old = replica.order(order_id)
        assert old is not None
        ops = [cancel]
        new: Op | None = None
        try:
            new = replica.submit(self.identity, old.side, price, quantity, old.tif, tag, stp=stp)
        except ValueError:
            pass
        else:
            ops.append(new)
        await self._writer.write([(op.id, op.market_id, op.lamport, op.raw) for op in ops])
        ms.outbox.extend(op.raw for op in ops)
        ms.outbox_ready.set()
        self.notify(ms, ops)
        return cancel, new

    async def cancel_all(self, ms: MarketState, prefix: str | None) -> Op:
        """Sign and send one cancel-all of this node's resting orders (witnessed markets)."""
        self._ready_to_sign(ms, cancelling=True)
        op = ms.replica.cancel_all(self.identity, prefix)
        await self._publish_own(ms, op)
        return op

    async def cancel(self, ms: MarketState, order_id: bytes) -> Op:
        self._ready_to_sign(ms, cancelling=True)
        op = ms.replica.cancel(self.identity, order_id)
        await self._publish_own(ms, op)
        return op

    async def heartbeat(self, ms: MarketState) -> Op:
        """Sign a heartbeat acknowledging everything the replica holds (this node must be a
        witness in force: else ``BadWitness``), and send it like any own op. It carries the
        node's wall clock, which becomes the batch's witnessed time (a label, never an input to
        the order)."""
        self._ready_to_sign(ms)
        op = ms.replica.heartbeat(self.identity, time_ms=time.time_ns() // 1_000_000)
        await self._publish_own(ms, op)
        return op

    def approve_reconfig(self, ms: MarketState, witnesses: list[bytes]) -> bytes:
        """This witness's signature approving ``witnesses`` as the next epoch's set."""
        return ms.replica.approve_reconfig(self.identity, witnesses)

    async def reconfigure(
        self, ms: MarketState, witnesses: list[bytes], approvals: dict[bytes, bytes]
    ) -> Op:
        """Sign and send a reconfiguration (with a majority's ``approvals``)."""
        self._ready_to_sign(ms)
        op = ms.replica.reconfigure(self.identity, witnesses, approvals)
        await self._publish_own(ms, op)
        return op

    async def wait_final(self, ms: MarketState, op_id: bytes) -> None:
        """Return once the op is final (wrap in a cancel scope: it may never be)."""
        while not ms.replica.is_final(op_id):
            await ms.changed.wait()

    async def heartbeat_loop(self, ms: MarketState) -> None:
        """While this node is a witness of the market in force: whenever there is something to
        acknowledge, wait ``heartbeat_interval`` (ops arriving meanwhile share the heartbeat),
        then heartbeat. Woken by applied ops only, so an idle market costs nothing. A failure is
        logged and retried after an interval; it never stops the node or its trading."""
        me = self.identity.public_key
        witness: bool | None = None
        waits_logged = False  # SigningWaits: said once at INFO, then at DEBUG
        while not self.closing:
            changed = ms.changed
            now_witness = me in ms.replica.witnesses()
            if now_witness != witness:
                if now_witness:
                    logger.info("%s: this node is a witness; heartbeating", ms.market.name)
                elif witness:
                    logger.info(
                        "%s: this node is no longer a witness (epoch %d); heartbeats stop",
                        ms.market.name,
                        ms.replica.epoch,
                    )
                witness = now_witness
            if not (now_witness and self._heartbeat_due(ms, me)):
                await changed.wait()
                continue
            await trio.sleep(self.heartbeat_interval)
            replica = ms.replica
            if self.closing or me not in replica.witnesses() or not self._heartbeat_due(ms, me):
                continue
            try:
                await self.heartbeat(ms)
            except StoreWriteError as exc:  # logged once as an error when the fault began
                logger.debug("%s: no heartbeat: %s", ms.market.name, exc)
                await trio.sleep(self.heartbeat_interval)
            except KeyEquivocated:  # logged once when found: the key is spent here
                await trio.sleep(KEY_EQUIVOCATED_RECHECK)
            except SigningWaits as exc:  # own ops held or maybe lost (a restart): not yet
                (logger.debug if waits_logged else logger.info)(
                    "%s: no heartbeat yet: %s",
                    ms.market.name,
                    exc,
                )
                waits_logged = True
                await trio.sleep(self.heartbeat_interval)
            except Exception:  # never fatal: finality waits, trading goes on
                logger.exception("%s: heartbeat failed; retrying", ms.market.name)
                await trio.sleep(self.heartbeat_interval)

    @staticmethod
    def _heartbeat_due(ms: MarketState, me: bytes) -> bool:
        """Something to acknowledge, or a point this witness has not attested yet (right after
        a compaction: a joiner trusts the point only once a majority attest it, and an idle
        market would otherwise leave it unattested until its next op)."""
        replica = ms.replica
        if replica.needs_heartbeat(me):
            return True
        point = replica.point
        if point is None:
            return False
        return all(op.author != me for op in replica.attesting(point.n, point.hash))

    async def finality_loop(self, ms: MarketState) -> None:
        """Re-evaluate a witnessed market's finality after changes and when a stall is due, so
        the log says when it stalls or resumes and when a witness equivocates."""
        me = self.identity.public_key
        while True:
            changed = ms.changed
            now = trio.current_time()
            view = ms.finality.evaluate(ms.replica, me, now)
            deadline = float("inf") if view.next_stall is None else view.next_stall + 0.01
            if self.compaction_due(ms):  # here: off the ingest path, and witnessed markets only
                await self.compact(ms)
                continue
            with trio.move_on_at(deadline):
                await changed.wait()
            await trio.sleep(FINALITY_CHECK_INTERVAL)  # coalesce a burst of changes

    async def _publish_own(self, ms: MarketState, op: Op) -> None:
        raw = op.raw
        await self._writer.write([(op.id, op.market_id, op.lamport, raw)])
        ms.outbox.append(raw)
        ms.outbox_ready.set()
        self.notify(ms, [op])

    def publish_interval_for(self, topic_peers: int) -> float:
        if self.publish_interval >= 0:
            return self.publish_interval
        return publish_interval(topic_peers)

    async def flush_loop(
        self, ms: MarketState, publish: PublishFn, topic_peers: Callable[[str], int]
    ) -> None:
        """Send the market's outbox as gossip batches, for ever, on the publish schedule
        (node/publish_schedule.py)."""
        last = -float("inf")
        while True:
            await ms.outbox_ready.wait()
            interval = self.publish_interval_for(topic_peers(ms.topic))
            spare = self.headroom.spare
            await trio.sleep_until(
                next_publish(
                    now=trio.current_time(),
                    last=last,
                    interval=interval,
                    period=publish_period(interval, spare),
                    wall=self.wall_clock(),
                    flush_delay=self.flush_delay,
                    on_grid=spare,
                )
            )
            last = trio.current_time()
            await self.flush(ms, publish)

    async def flush(self, ms: MarketState, publish: PublishFn) -> None:
        while ms.outbox:
            count = _batch_length(ms.outbox, self.gossip_batch)
            batch = ms.outbox[:count]
            del ms.outbox[:count]
            try:
                await publish(ms.topic, encode_batch(batch))
            except Exception as exc:  # gossip is best effort; sync delivers what this misses
                logger.warning("gossip publish on %s failed: %s", ms.market.name, exc)
        ms.outbox_ready = trio.Event()

    # -- the frontier a waiting reconfiguration holds, across restarts ----------------------

    def _keep_frontier_cap(self, ms: MarketState) -> None:
        """Store the frontier the replica holds while a reconfiguration waits for the history
        (``Replica.frontier_cap``; empty: none), before anything shows it: a restart holds it
        there again (``_hold_kept_frontier``) rather than where its replay meets the
        reconfiguration, lower. Written only when it changes (rare; else a comparison); a store
        that refuses it costs only that (logged)."""
        replica = ms.replica
        cap = replica.frontier_cap
        if cap == ms.kept_cap or self._saving:  # (a compaction's transaction holds the store:
            return  # the next notify writes it)
        # With the reconfigurations that wait: a restart holds it again only for the same wait.
        value = b"" if cap is None else b" ".join(
            [b"%d" % cap, *(i.hex().encode() for i in replica.waiting_reconfigurations())]
        )
        try:
            self.store.set_meta(_cap_key(ms.market.id), value)
        except StoreError as exc:
            logger.warning("%s: could not keep the held frontier: %s", ms.market.name, exc)
            return
        ms.kept_cap = cap

    def _hold_kept_frontier(self, ms: MarketState, replica: Replica) -> None:
        """A restart: hold the frontier where it was held before (``_keep_frontier_cap``), if
        a reconfiguration still waits for the history."""
        ms.kept_cap = None
        if not replica.witnessed:
            return
        stored, waited = _read_cap(self.store.get_meta(_cap_key(ms.market.id)))
        if stored is not None and any(replica.waits_for_history(i) for i in waited):
            replica.hold_frontier_at(stored)
            if replica.frontier_cap is not None:
                logger.info(
                    "%s: a reconfiguration waits for the history: finality held at %d, as "
                    "before the restart", ms.market.name, replica.frontier_cap
                )
        ms.kept_cap = stored  # what the store holds: notify writes the replica's if it differs

    # -- watchers ----------------------------------------------------------------------------

    def notify(self, ms: MarketState, applied: list[Op]) -> None:
        now_ms = time.time_ns() // 1_000_000
        received = ms.received_ms
        for op in applied:
            received.setdefault(op.id, now_ms)
        if ms.replica.witnessed:
            self._keep_frontier_cap(ms)
            ms.finality.observe(ms.replica, trio.current_time())
        ms.changed.set()
        ms.changed = trio.Event()
        for watcher in list(ms.watchers):
            room = MAX_WATCH_IDS - len(watcher.ids)
            watcher.ids.extend(op.id for op in applied[:room])
            watcher.dropped += max(0, len(applied) - room)
            try:
                watcher.send.send_nowait(None)
            except trio.WouldBlock:
                pass  # an update is already queued for this watcher: coalesce
            except trio.BrokenResourceError:
                ms.watchers.remove(watcher)

    async def changes(
        self, ms: MarketState, min_interval: float = 0.0
    ) -> AsyncIterator[tuple[list[bytes], int]]:
        """Yields (op ids applied since the last yield, ids dropped) once per batch of changes
        (coalesced), until the caller stops."""
        watcher = Watcher()
        ms.watchers.append(watcher)
        receive = watcher.receive
        try:
            async with receive:
                napped = False
                while True:
                    try:
                        # After the nap (a checkpoint) a change that came meanwhile is taken
                        # without the second trip through the scheduler trio's receive makes.
                        if napped:
                            try:
                                receive.receive_nowait()
                            except trio.WouldBlock:
                                await receive.receive()
                        else:
                            await receive.receive()
                    except trio.EndOfChannel:
                        return
                    yield watcher.take()
                    if min_interval:
                        await trio.sleep(min_interval)
                        napped = True
        finally:
            if watcher in ms.watchers:
                ms.watchers.remove(watcher)
            watcher.send.close()
