"""Crash-safe SQLite store for verified ops (stdlib ``sqlite3`` only).

Why this shape:

* **One file** ``<home>/store.sqlite3`` in WAL mode.  WAL lets readers run while a batch commits
  and turns each commit into one sequential append (+ one fsync), the cheapest durable write
  SQLite offers.
* **Durability is the caller's choice.** The node acknowledges an op to a client, or forwards
  it to peers, only after :meth:`OpStore.add_ops` has returned. The node opens the store with
  ``synchronous=NORMAL`` (its default): in WAL mode a commit then reaches the OS, so a
  ``kill -9`` of the process loses nothing acknowledged, but power loss or an OS crash may lose
  the last commits (the WAL is fsynced at checkpoints). ``crdtbook node --fsync`` opens it with
  ``FULL``, which fsyncs the WAL on every commit (milliseconds each; batching, one transaction
  per ``add_ops`` call, amortises it). ``OpStore.open`` itself defaults to ``FULL``, the safe
  choice for other callers. ``python bench/bench_store.py`` measures both modes.
* **The store never decodes an op.**  The caller verifies signatures and extracts
  ``(id, market, lamport)``; the store keeps the raw bytes and hands them back in
  ``(lamport, id)`` order (``id`` compared bytewise, as SQLite compares BLOBs with ``memcmp``).
* **Synchronous API, thread-safe.**  The trio node calls it either inline (short reads) or,
  for batched writes whose fsync would stall the event loop, through
  ``await trio.to_thread.run_sync(store.add_ops, batch)``.  The connection is therefore opened
  with ``check_same_thread=False`` and every method holds one ``threading.Lock``, so calls from
  the loop thread and from worker threads never interleave on the connection.  Do not pass
  ``abandon_on_cancel=True``: the caller must learn whether the commit happened.  Mixing inline
  calls with worker-thread calls is safe but an inline call then waits (blocking the loop) for a
  worker's commit to finish.
* **Checkpoints** of derived state (one row per market in ``checkpoints``; ``upto`` holds how
  many leading ops of the market's total order it covers) only save work on restart: the blob
  says what it covers and the replica checks that before using it (``crdtbook._checkpoint``),
  so a stale, damaged or missing one costs a full replay, never a wrong book.
* **Compaction** (issue #10; witnessed markets only) never deletes an op: it marks the ops a
  replica let go of (``ops.compacted``), keeps the final fills and finished orders it dropped
  (``compacted_fills``, ``compacted_orders``: ``fills`` and ``order`` still answer for them) and
  the replica's snapshot (``snapshots``), all in ONE transaction (:meth:`OpStore.compact`). So a
  kill -9 at any moment leaves either the previous snapshot with its marks or the new one with
  its marks: a restart loads the snapshot plus every op not marked (:meth:`OpStore.load_market`
  with ``live_only``) and never misses an op nor replays one the snapshot holds. A partial index
  over the live ops keeps that load proportional to the live ops, not to history.
* **History and points** (schema 3, issue #10's joins): a compaction also records each prefix
  op's index in the market's final total order (``ops.final_idx``) and keeps the point blob
  (``points``: the latest two, so a joiner that was offered the previous one can still fetch
  it), so the node serves the prefix in order (:meth:`OpStore.history`) and snapshots of its
  points. A node that joined from a snapshot records the join (``joins``) and stores history it
  fetches later as *staged* (``compacted = 2``: neither live nor in the archive) until the whole
  prefix checks against the attested chain (:meth:`OpStore.finish_history`); a prefix that does
  not check is dropped (:meth:`OpStore.drop_history`), so unverified bytes never answer for a
  compacted op. Once it holds the prefix, the fills and finished orders derived from it go
  where a compaction puts its own (:meth:`OpStore.save_derived`, node.derive), and
  ``joins.derived`` (schema 5) records that it is done.
* **Retention** (``crdtbook node --retention OPS``, node.retention): after a compaction at
  point ``n``, a node may delete the archived ops whose final index is below ``n - OPS``
  (:meth:`OpStore.prune_history`, short chunked transactions); live and staged ops, the kept
  ops of the points served, the compacted fills and orders and the snapshots stay. SQLite
  reuses the freed pages (the file stops growing; it shrinks only with ``VACUUM``).
* **Versioned schema** with ``PRAGMA user_version`` and an ordered migration list, so later
  versions can upgrade old stores in place (and an older binary refuses a newer store).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, Self

from crdtbook import Fill, OrderState

__all__ = [
    "SCHEMA_VERSION",
    "STORE_FILENAME",
    "CompactedFill",
    "CompactedOrder",
    "JoinState",
    "MarketRecord",
    "OpStore",
    "Snapshot",
    "StoreError",
    "StoreWriteError",
    "Synchronous",
]

# Name of the store file inside a node's home directory.
STORE_FILENAME = "store.sqlite3"

# Version written to PRAGMA user_version once all migrations ran; bump it with each migration.
SCHEMA_VERSION = 5

# Rows fetched per lock acquisition by load_market: bounds memory (~1 MiB of 200-byte ops) and
# the time a streaming reader keeps writers waiting, while keeping per-query overhead small.
LOAD_CHUNK_ROWS = 4096

# How long (ms) a statement waits for another connection's lock (e.g. a second process reading
# the store) before failing with "database is locked".
BUSY_TIMEOUT_MS = 5000

# Accepted values of PRAGMA synchronous (see the module docstring for why FULL is the default).
Synchronous = Literal["FULL", "NORMAL", "EXTRA", "OFF"]

_SCHEMA_V1 = """
CREATE TABLE ops (
    id      BLOB PRIMARY KEY,
    market  BLOB NOT NULL,
    lamport INTEGER NOT NULL,
    raw     BLOB NOT NULL
);
CREATE INDEX ops_market_lamport_id ON ops (market, lamport, id);
CREATE TABLE markets (
    id   BLOB PRIMARY KEY,
    name TEXT,
    tick TEXT,
    lot  TEXT
);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB
);
-- Derived-state checkpoints: the matched state of `market` after its first `upto` ops in total
-- order (a count of ops, not a Lamport time). The node keeps one row per market.
CREATE TABLE checkpoints (
    market BLOB NOT NULL,
    upto   INTEGER NOT NULL,
    data   BLOB NOT NULL,
    PRIMARY KEY (market, upto)
);
"""


# Version 2 (issue #10): compaction. ADD COLUMN with a constant default rewrites no row, so an
# existing store upgrades in the time it takes to build the live-ops index once.
_SCHEMA_V2 = """
-- 1: the op left its market's replica in a compaction (it is kept: sync and audits need it).
ALTER TABLE ops ADD COLUMN compacted INTEGER NOT NULL DEFAULT 0;
-- What a restart from a snapshot reads: the ops not compacted, in (lamport, id) order.
CREATE INDEX ops_live ON ops (market, lamport, id) WHERE compacted = 0;
-- Final fills a replica dropped, by their global index in the market's fill sequence.
CREATE TABLE compacted_fills (
    market       BLOB NOT NULL,
    idx          INTEGER NOT NULL,
    taker        BLOB NOT NULL,
    maker        BLOB NOT NULL,
    price        INTEGER NOT NULL,
    quantity     INTEGER NOT NULL,
    taker_side   TEXT NOT NULL,
    taker_author BLOB NOT NULL,
    maker_author BLOB NOT NULL,
    received_ms  INTEGER,
    witnessed_ms INTEGER,
    PRIMARY KEY (market, idx)
) WITHOUT ROWID;
-- Final, finished orders a replica dropped (their state can never change again).
CREATE TABLE compacted_orders (
    market       BLOB NOT NULL,
    id           BLOB NOT NULL,
    author       BLOB NOT NULL,
    side         TEXT NOT NULL,
    price        INTEGER NOT NULL,
    quantity     INTEGER NOT NULL,
    remaining    INTEGER NOT NULL,
    filled       INTEGER NOT NULL,
    closed       INTEGER NOT NULL,
    status       TEXT NOT NULL,
    reason       TEXT,
    tif          TEXT NOT NULL,
    tag          TEXT,
    lamport      INTEGER NOT NULL,
    received_ms  INTEGER,
    witnessed_ms INTEGER,
    PRIMARY KEY (market, id)
) WITHOUT ROWID;
CREATE INDEX compacted_orders_tag ON compacted_orders (market, author, tag)
    WHERE tag IS NOT NULL;
-- The latest snapshot of each market's compacted replica (Replica.snapshot), and how many ops
-- and fills had left memory when it was taken.
CREATE TABLE snapshots (
    market BLOB PRIMARY KEY,
    ops    INTEGER NOT NULL,
    fills  INTEGER NOT NULL,
    data   BLOB NOT NULL
);
"""


# Version 3 (issue #10, joins from a snapshot): the final order of the compacted prefix, the
# point blobs served to joiners, and this node's own join. ADD COLUMN with no default rewrites
# no row; the index is partial, so a store that never compacted pays nothing for it.
_SCHEMA_V3 = """
-- The op's index in its market's final total order (from 0), once a compaction placed it in
-- the compacted prefix or a history fetch brought it, NULL otherwise.
ALTER TABLE ops ADD COLUMN final_idx INTEGER;
-- What serving history reads: the prefix in order.
CREATE INDEX ops_final ON ops (market, final_idx) WHERE final_idx IS NOT NULL;
-- Point blobs (Replica.snapshot at point n) served to joiners: the latest two per market.
CREATE TABLE points (
    market BLOB NOT NULL,
    n      INTEGER NOT NULL,
    data   BLOB NOT NULL,
    PRIMARY KEY (market, n)
) WITHOUT ROWID;
-- A market this node joined from a snapshot: the point (n and its blob) and how many ops of
-- the prefix before it the store holds, checked, in order (n once the history is complete).
CREATE TABLE joins (
    market  BLOB PRIMARY KEY,
    n       INTEGER NOT NULL,
    data    BLOB NOT NULL,
    history INTEGER NOT NULL
);
"""

# Version 4: listing compacted orders (``orders``: the newest first, one author's or all). Each
# index costs one B-tree insert per compacted order, in the compaction's worker thread.
_SCHEMA_V4 = """
CREATE INDEX compacted_orders_author ON compacted_orders (market, author, lamport);
CREATE INDEX compacted_orders_lamport ON compacted_orders (market, lamport)
"""

# Version 5: a joined node derives the fills and finished orders of the history before its
# join point (node.derive); ``derived`` records that it did (n), so a restart does not again.
_SCHEMA_V5 = """
ALTER TABLE joins ADD COLUMN derived INTEGER NOT NULL DEFAULT 0
"""

#: ``ops.compacted`` values: 0 live (in the replica's memory), 1 compacted (the archive holds
#: it), 2 staged (history fetched from a peer, not checked yet: neither).
LIVE, COMPACTED, STAGED = 0, 1, 2

#: Point blobs kept per market: the latest (also the restart snapshot) and the one before, for a
#: joiner that was offered it just before this node compacted again.
POINTS_KEPT = 2


def _insert_rows(
    conn: sqlite3.Connection,
    conflict: Literal["REPLACE", "IGNORE"],
    market: bytes,
    fills: Iterable[CompactedFill],
    orders: Iterable[CompactedOrder],
) -> None:
    """Write compacted (or derived) fills and orders in the caller's transaction; a row already
    there is replaced or kept, as ``conflict`` says."""
    conn.executemany(
        f"INSERT OR {conflict} INTO compacted_fills (market, {_FILL_COLUMNS})"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(market, c.number, *c.fill, c.received_ms, c.witnessed_ms) for c in fills],
    )
    conn.executemany(
        f"INSERT OR {conflict} INTO compacted_orders (market, {_ORDER_COLUMNS})"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(market, *c.order[:13], c.received_ms, c.witnessed_ms) for c in orders],
    )


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``;``-separated statements inside the caller's transaction (``executescript`` would
    commit it first)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    """Create the initial schema in an empty database."""
    _run_script(conn, _SCHEMA_V1)


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Add compaction: the compacted mark, the live-ops index, compacted history, snapshots."""
    _run_script(conn, _SCHEMA_V2)


def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    """Add joins: the prefix's final order, the point blobs, this node's join."""
    _run_script(conn, _SCHEMA_V3)


def _migrate_3_to_4(conn: sqlite3.Connection) -> None:
    """Index compacted orders by author and Lamport time, and by Lamport time (``orders``)."""
    _run_script(conn, _SCHEMA_V4)


def _migrate_4_to_5(conn: sqlite3.Connection) -> None:
    """Record whether a joined market's history before its point is derived (``joins``)."""
    _run_script(conn, _SCHEMA_V5)


# _MIGRATIONS[v] upgrades a store from user_version v to v + 1.  Append, never edit.
_MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _migrate_0_to_1,
    _migrate_1_to_2,
    _migrate_2_to_3,
    _migrate_3_to_4,
    _migrate_4_to_5,
)
assert len(_MIGRATIONS) == SCHEMA_VERSION


class StoreError(Exception):
    """The store file cannot be used (not a database, written by a newer version, ...)."""


class StoreWriteError(StoreError):
    """A write to the store failed and stored nothing of what it was given: the filesystem is
    full (``reason`` ``"full"``), read-only (``"read-only"``) or failing (``"io"``). The store
    stays open and readable; a later write succeeds once the cause is gone."""

    def __init__(self, message: str, reason: Literal["full", "read-only", "io"]) -> None:
        super().__init__(message)
        self.reason = reason

    def copy(self) -> StoreWriteError:
        """The same error as a fresh exception (to raise again without growing a traceback)."""
        return StoreWriteError(str(self), self.reason)


class MarketRecord(NamedTuple):
    """A market the node follows, as stored (tick and lot are decimal strings)."""

    id: bytes
    name: str
    tick: str
    lot: str


OpItem = tuple[bytes, bytes, int, bytes]
"""``(op id, market id, lamport, raw encoded op)`` as handed to :meth:`OpStore.add_ops`."""


class CompactedFill(NamedTuple):
    """A final fill a replica dropped: its global index, the fill, and the node-local times
    (when this node first applied the taker, the witnessed time of its batch; None if unknown)."""

    number: int  # global index in the market's fill sequence (``index`` is tuple's)
    fill: Fill
    received_ms: int | None = None
    witnessed_ms: int | None = None


class CompactedOrder(NamedTuple):
    """A final, finished order a replica dropped, with the same node-local times."""

    order: OrderState
    received_ms: int | None = None
    witnessed_ms: int | None = None


_FILL_COLUMNS = (
    "idx, taker, maker, price, quantity, taker_side, taker_author, maker_author,"
    " received_ms, witnessed_ms"
)
_ORDER_COLUMNS = (
    "id, author, side, price, quantity, remaining, filled, closed, status, reason, tif, tag,"
    " lamport, received_ms, witnessed_ms"
)


def _fill_row(row: Sequence[Any]) -> CompactedFill:
    idx, taker, maker, price, qty, side, taker_author, maker_author, received, witnessed = row
    fill = Fill(taker, maker, price, qty, side, taker_author, maker_author)
    return CompactedFill(idx, fill, received, witnessed)


def _order_row(row: Sequence[Any]) -> CompactedOrder:
    *fields, received, witnessed = row
    # Only final orders are compacted, so the stored state is final.
    return CompactedOrder(OrderState._make([*fields, True]), received, witnessed)


class Snapshot(NamedTuple):
    """A market's latest snapshot as stored by :meth:`OpStore.compact`."""

    ops: int  # ops that had left the replica's memory when it was taken
    fills: int  # fills that had
    data: bytes


class JoinState(NamedTuple):
    """A market this node joined from a snapshot (:meth:`OpStore.join_state`)."""

    n: int  # the point joined from: final ops before it
    data: bytes  # the point state's blob
    history: int  # prefix ops held, checked, in order (n: the whole prefix)
    derived: int  # n once the prefix's fills and orders are derived (:meth:`save_derived`)


class OpStore:
    """Durable, idempotent set of verified ops, grouped by market.

    Create with :meth:`OpStore.open`.  All methods are synchronous and thread-safe (see the
    module docstring); the instance is also a context manager that closes it.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        """Wrap an already configured connection; use :meth:`open` instead."""
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        self.path = path
        #: The connection that copies the WAL into the database (:meth:`checkpoint_wal`), its
        #: own so that the writers' lock is never held meanwhile; opened on first use.
        self._wal_conn: sqlite3.Connection | None = None
        self._wal_lock = threading.Lock()
        #: Whether the writers' commits leave WAL checkpoints to :meth:`checkpoint_wal`.
        self.background_checkpoints = False

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path | str, *, synchronous: Synchronous = "FULL") -> OpStore:
        """Open (creating and migrating if needed) the store.

        ``path`` is the database file, or a directory (a node home), in which case the file is
        ``<path>/store.sqlite3``.  The parent directory must exist.  After a crash, opening runs
        SQLite's WAL recovery, so a store killed at any moment opens with every committed batch.
        """
        path = Path(path)
        if path.is_dir():
            path = path / STORE_FILENAME
        if synchronous not in ("FULL", "NORMAL", "EXTRA", "OFF"):
            raise ValueError(f"synchronous must be FULL, NORMAL, EXTRA or OFF, not {synchronous!r}")
        try:
            # isolation_level=None: no implicit transactions; we issue BEGIN/COMMIT ourselves so
            # that one add_ops call is exactly one transaction.
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the op store {path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"cannot put the op store {path} in WAL mode (got {mode!r}); "
                    "is it on a network or read-only filesystem?"
                )
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            _migrate(conn, path)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"cannot use the op store {path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    def close(self) -> None:
        """Close the connection (idempotent).  A clean close also checkpoints the WAL."""
        with self._wal_lock:
            if self._wal_conn is not None:
                self._wal_conn.close()
                self._wal_conn = None
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- WAL checkpoints -------------------------------------------------------------------

    def checkpoints_in_background(self) -> None:
        """From now on a commit never copies the WAL into the database itself: the caller runs
        :meth:`checkpoint_wal` (in a worker thread) every so often instead.

        SQLite's default (``wal_autocheckpoint``, 1,000 pages) makes the commit that crosses
        the mark copy the WAL back and, with ``synchronous=NORMAL``, fsync it: measured on
        this machine, 26 commits in 5,000 single-op commits took 1-5 ms each, 42% of all
        the time spent committing, and each stalls the node's event loop, which commits
        inline. Durability is unchanged: a commit is in the WAL, which survives a kill -9 as
        before; what is fsynced at a checkpoint still is."""
        with self._lock:
            try:
                self._db().execute("PRAGMA wal_autocheckpoint = 0")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot configure the op store {self.path}: {exc}") from exc
            self.background_checkpoints = True

    def checkpoint_wal(self) -> tuple[int, int]:
        """Copy what the WAL holds into the database without waiting for readers or writers
        (``PRAGMA wal_checkpoint(PASSIVE)``) on a connection of its own; returns the WAL's
        frames and how many of them are now in the database. Blocking: call it from a worker
        thread. Failures are the store's errors (:class:`StoreError`)."""
        with self._wal_lock:
            if self._conn is None:
                raise StoreError(f"the op store {self.path} is closed")
            try:
                if self._wal_conn is None:
                    self._wal_conn = sqlite3.connect(
                        self.path, isolation_level=None, check_same_thread=False
                    )
                    self._wal_conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                _busy, frames, copied = self._wal_conn.execute(
                    "PRAGMA wal_checkpoint(PASSIVE)"
                ).fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot checkpoint the op store {self.path}: {exc}") from exc
        return int(frames), int(copied)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the op store {self.path} is closed")
        return self._conn

    # -- ops -------------------------------------------------------------------------------

    def add_ops(self, items: Iterable[OpItem]) -> int:
        """Store a batch of verified ops in one transaction; return how many were new.

        Ops already present (same id) are ignored, so replays and duplicate deliveries are
        harmless.  When this returns, the batch is committed (and, with ``synchronous=FULL``,
        fsynced): only then may the node acknowledge or forward these ops.  On error nothing of
        the batch is stored.  An empty batch costs nothing (no transaction, no fsync).
        """
        rows = [_check_item(item) for item in items]
        if not rows:
            return 0
        with self._lock, self._writing():
            conn = self._db()
            before = conn.total_changes
            conn.execute("BEGIN IMMEDIATE")
            try:
                # A staged history op (fetched, not checked yet) that the replica now holds
                # becomes live: it no longer depends on the history fetch succeeding.
                conn.executemany(
                    "INSERT INTO ops (id, market, lamport, raw) VALUES (?, ?, ?, ?)"
                    f" ON CONFLICT (id) DO UPDATE SET compacted = {LIVE}"
                    f" WHERE compacted = {STAGED}",
                    rows,
                )
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            return conn.total_changes - before

    def delete_ops(self, op_ids: Iterable[bytes]) -> int:
        """Forget ops by id (ops the node's replica forgot: pending ones evicted from its
        bounded buffer); return how many were stored. One transaction."""
        ids = [(_need_bytes("op id", ident),) for ident in op_ids]
        if not ids:
            return 0
        with self._lock, self._writing():
            conn = self._db()
            before = conn.total_changes
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("DELETE FROM ops WHERE id = ?", ids)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            return conn.total_changes - before

    def has(self, op_id: bytes) -> bool:
        """Whether an op with this id is stored."""
        with self._lock:
            row = self._db().execute("SELECT 1 FROM ops WHERE id = ?", (op_id,)).fetchone()
        return row is not None

    def load_market(self, market: bytes, *, live_only: bool = False) -> Iterator[bytes]:
        """Yield the raw ops of ``market`` in ``(lamport, id)`` order, streamed; with
        ``live_only``, only those no compaction marked (what a restart from the market's
        snapshot replays; read through the partial index of live ops, so history costs
        nothing).

        Rows are fetched ``LOAD_CHUNK_ROWS`` at a time (keyset pagination on the
        ``(market, lamport, id)`` index), so a million ops never sit in memory here, and the
        lock is released between chunks, so writers (even from the consuming thread) may run
        while the caller iterates.  Ops added during iteration appear if they sort after the
        last op already yielded.
        """
        live = " AND compacted = 0" if live_only else ""
        index = "ops_live" if live_only else "ops_market_lamport_id"
        last: tuple[int, bytes] | None = None
        while True:
            with self._lock:
                conn = self._db()
                if last is None:
                    rows = conn.execute(
                        f"SELECT lamport, id, raw FROM ops INDEXED BY {index}"
                        f" WHERE market = ?{live} ORDER BY lamport, id LIMIT ?",
                        (market, LOAD_CHUNK_ROWS),
                    ).fetchall()
                else:
                    rows = conn.execute(
                        f"SELECT lamport, id, raw FROM ops INDEXED BY {index}"
                        f" WHERE market = ?{live} AND (lamport, id) > (?, ?)"
                        " ORDER BY lamport, id LIMIT ?",
                        (market, last[0], last[1], LOAD_CHUNK_ROWS),
                    ).fetchall()
            for _lamport, _op_id, raw in rows:
                yield raw
            if len(rows) < LOAD_CHUNK_ROWS:
                return
            last = (rows[-1][0], rows[-1][1])

    def get_raw(self, market: bytes, op_id: bytes, *, compacted: bool = False) -> bytes | None:
        """The stored bytes of op ``op_id`` of ``market`` (with ``compacted``: only if marked
        compacted), or None. What a compacted replica asks its archive for: an op it let go of,
        named again by a late op or duplicate."""
        query = "SELECT raw FROM ops WHERE id = ? AND market = ?"
        if compacted:
            query += " AND compacted = 1"
        with self._lock:
            row = self._db().execute(query, (op_id, market)).fetchone()
        return None if row is None else bytes(row[0])

    def final_index(self, market: bytes, op_id: bytes) -> int | None:
        """Op ``op_id``'s index in ``market``'s final order, if the store has it (compacted or
        fetched history), else None."""
        with self._lock:
            row = self._db().execute(
                "SELECT final_idx FROM ops WHERE id = ? AND market = ?", (op_id, market)
            ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def count(self, market: bytes) -> int:
        """Number of stored ops of ``market`` (scans the market's index range)."""
        with self._lock:
            row = self._db().execute("SELECT count(*) FROM ops WHERE market = ?", (market,))
            return int(row.fetchone()[0])

    # -- markets and meta ------------------------------------------------------------------

    def add_market(self, market_id: bytes, name: str, tick: str, lot: str) -> bool:
        """Remember a followed market; return False if this id was already stored.

        A market id is derived from its parameters, so an existing row is left untouched.
        """
        with self._lock, self._writing():
            cur = self._db().execute(
                "INSERT OR IGNORE INTO markets (id, name, tick, lot) VALUES (?, ?, ?, ?)",
                (_need_bytes("market_id", market_id), name, tick, lot),
            )
            return cur.rowcount == 1

    def markets(self) -> list[MarketRecord]:
        """All stored markets, ordered by name."""
        with self._lock:
            rows = self._db().execute("SELECT id, name, tick, lot FROM markets ORDER BY name, id")
            return [MarketRecord(*row) for row in rows.fetchall()]

    def get_meta(self, key: str) -> bytes | None:
        """The value stored under ``key`` (node-level settings, e.g. the key id), or None."""
        with self._lock:
            row = self._db().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        """Durably store ``value`` under ``key`` (replacing any previous value)."""
        with self._lock, self._writing():
            self._db().execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, _need_bytes("value", value)),
            )

    # -- compaction ------------------------------------------------------------------------

    def compact(
        self,
        market: bytes,
        op_ids: Iterable[bytes],
        fills: Iterable[CompactedFill],
        orders: Iterable[CompactedOrder],
        snapshot: Snapshot,
        *,
        point: int = 0,
        order_start: int = 0,
        order: Sequence[bytes] = (),
    ) -> None:
        """Record one compaction of ``market``'s replica in ONE transaction: mark ``op_ids``
        compacted (they stay stored), keep the dropped final ``fills`` and finished ``orders``,
        and replace the market's snapshot. With ``point`` (the point compacted at; 0: none), the
        snapshot is that point's blob: it joins the served points (the latest POINTS_KEPT), and
        ``order`` (the prefix ops this compaction added, in total order, the first at global
        index ``order_start``) gets its final indexes, from which :meth:`history` serves. A
        crash at any moment leaves all of it or none (see the module docstring). Rewriting rows
        a previous compaction wrote is harmless (a retry after a failed write, or a compaction
        after a fallback to the full log)."""
        _need_bytes("market", market)
        _need_bytes("snapshot", snapshot.data)
        # One UPDATE per op: an op that leaves memory and joins the prefix at once (most do)
        # gets its mark and its index together (a B-tree walk each, ~10 us: ~50k per point).
        index_of = {ident: index for index, ident in enumerate(order, order_start)}
        marks = [(index_of.pop(_need_bytes("op id", i), None), i) for i in op_ids]
        indexes = [(index, ident) for ident, index in index_of.items()]
        with self._lock, self._writing():
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    f"UPDATE ops SET compacted = {COMPACTED},"
                    " final_idx = coalesce(?, final_idx) WHERE id = ?",
                    marks,
                )
                _insert_rows(conn, "REPLACE", market, fills, orders)
                conn.execute(
                    "INSERT OR REPLACE INTO snapshots (market, ops, fills, data)"
                    " VALUES (?, ?, ?, ?)",
                    (market, snapshot.ops, snapshot.fills, snapshot.data),
                )
                conn.executemany("UPDATE ops SET final_idx = ? WHERE id = ?", indexes)
                if point:
                    _keep_point(conn, market, point, snapshot.data)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

    def get_snapshot(self, market: bytes) -> Snapshot | None:
        """``market``'s latest snapshot (:meth:`compact`), or None."""
        with self._lock:
            row = (
                self._db()
                .execute("SELECT ops, fills, data FROM snapshots WHERE market = ?", (market,))
                .fetchone()
            )
        return None if row is None else Snapshot(int(row[0]), int(row[1]), bytes(row[2]))

    def compacted_count(self, market: bytes) -> int:
        """How many of ``market``'s stored ops are marked compacted (a scan: for tests and
        tools, not the hot path)."""
        with self._lock:
            row = self._db().execute(
                "SELECT count(*) FROM ops WHERE market = ? AND compacted = 1", (market,)
            )
            return int(row.fetchone()[0])

    def staged_count(self, market: bytes) -> int:
        """How many of ``market``'s stored ops are staged history (fetched, not checked yet; a
        scan: for tests and tools)."""
        with self._lock:
            row = self._db().execute(
                f"SELECT count(*) FROM ops WHERE market = ? AND compacted = {STAGED}", (market,)
            )
            return int(row.fetchone()[0])

    def compacted_fills(self, market: bytes, start: int, stop: int) -> list[CompactedFill]:
        """``market``'s compacted fills with global indexes in ``[start, stop)``, in order."""
        with self._lock:
            rows = (
                self._db()
                .execute(
                    f"SELECT {_FILL_COLUMNS} FROM compacted_fills"
                    " WHERE market = ? AND idx >= ? AND idx < ? ORDER BY idx",
                    (market, start, stop),
                )
                .fetchall()
            )
        return [_fill_row(row) for row in rows]

    def compacted_order(self, market: bytes, order_id: bytes) -> CompactedOrder | None:
        """A compacted order of ``market`` by its id, or None."""
        with self._lock:
            row = (
                self._db()
                .execute(
                    f"SELECT {_ORDER_COLUMNS} FROM compacted_orders WHERE market = ? AND id = ?",
                    (market, order_id),
                )
                .fetchone()
            )
        return None if row is None else _order_row(row)

    def compacted_order_by_tag(
        self, market: bytes, author: bytes, tag: str
    ) -> CompactedOrder | None:
        """The compacted order of ``author`` in ``market`` carrying client id ``tag`` (the
        newest, by Lamport time), or None."""
        with self._lock:
            row = (
                self._db()
                .execute(
                    f"SELECT {_ORDER_COLUMNS} FROM compacted_orders"
                    " WHERE market = ? AND author = ? AND tag = ? ORDER BY lamport DESC LIMIT 1",
                    (market, author, tag),
                )
                .fetchone()
            )
        return None if row is None else _order_row(row)

    def compacted_orders_newest(
        self, market: bytes, author: bytes | None, limit: int
    ) -> list[CompactedOrder]:
        """The newest ``limit`` compacted orders of ``market`` (``author``'s, or everyone's
        with None), by Lamport time, oldest first. An index walk from the newest end."""
        query = f"SELECT {_ORDER_COLUMNS} FROM compacted_orders WHERE market = ?"
        args: tuple[object, ...] = (market,)
        if author is not None:
            query += " AND author = ?"
            args += (author,)
        query += " ORDER BY lamport DESC, id DESC LIMIT ?"
        with self._lock:
            rows = self._db().execute(query, (*args, limit)).fetchall()
        return [_order_row(row) for row in reversed(rows)]

    def compacted_orders_with_prefix(
        self, market: bytes, prefix: str, limit: int
    ) -> list[CompactedOrder]:
        """At most ``limit`` compacted orders of ``market`` whose hex id starts with
        ``prefix`` (a range scan on the bytes of its even-length part)."""
        low = bytes.fromhex(prefix[: len(prefix) // 2 * 2])
        high = _next_prefix(low)
        query = f"SELECT {_ORDER_COLUMNS} FROM compacted_orders WHERE market = ? AND id >= ?"
        args: tuple[object, ...] = (market, low)
        if high is not None:
            query += " AND id < ?"
            args += (high,)
        found: list[CompactedOrder] = []
        with self._lock:
            cursor = self._db().execute(query + " ORDER BY id", args)
            for row in cursor:
                if bytes(row[0]).hex().startswith(prefix):
                    found.append(_order_row(row))
                    if len(found) >= limit:
                        break
            cursor.close()
        return found

    # -- history and points (joins) ---------------------------------------------------------

    def points(self, market: bytes) -> list[tuple[int, bytes]]:
        """``market``'s stored point blobs, ``(n, blob)``, the newest first."""
        with self._lock:
            rows = (
                self._db()
                .execute("SELECT n, data FROM points WHERE market = ? ORDER BY n DESC", (market,))
                .fetchall()
            )
        return [(int(n), bytes(data)) for n, data in rows]

    def get_raws(self, market: bytes, op_ids: Iterable[bytes]) -> list[bytes]:
        """The stored bytes of the ops of ``market`` among ``op_ids`` (live, compacted or
        staged; the ones not stored are left out), in the order asked."""
        out: list[bytes] = []
        with self._lock:
            conn = self._db()
            for ident in op_ids:
                row = conn.execute(
                    "SELECT raw FROM ops WHERE id = ? AND market = ?", (ident, market)
                ).fetchone()
                if row is not None:
                    out.append(bytes(row[0]))
        return out

    def history(
        self, market: bytes, start: int, limit: int, *, staged: bool = False
    ) -> list[bytes]:
        """The ops of ``market``'s compacted prefix from final index ``start`` on, in total
        order, at most ``limit``: stops early at a gap (an index the store does not hold, e.g.
        history a joined node has not fetched). Staged ops count only with ``staged``."""
        where = "" if staged else f" AND compacted != {STAGED}"
        with self._lock:
            rows = (
                self._db()
                .execute(
                    "SELECT final_idx, raw FROM ops INDEXED BY ops_final"
                    " WHERE market = ? AND final_idx IS NOT NULL AND final_idx >= ?"
                    f"{where} ORDER BY final_idx LIMIT ?",
                    (market, start, limit),
                )
                .fetchall()
            )
        out: list[bytes] = []
        for expected, (index, raw) in enumerate(rows, start):
            if index != expected:
                break
            out.append(bytes(raw))
        return out

    def prune_history(
        self,
        market: bytes,
        start: int,
        below: int,
        keep: Container[bytes],
        limit: int,
        meta: tuple[str, bytes] | None = None,
    ) -> tuple[int, int]:
        """Delete the archived (compacted) ops of ``market`` whose final index is in ``[start,
        below)``, but for those in ``keep`` (kept ops of the points served), looking at most
        ``limit`` rows: one short transaction (node.retention runs it chunk after chunk), which
        also stores the meta row ``meta`` if given. Live and staged ops are never deleted.
        Returns ``(ops deleted, the final index to go on from)``: ``below`` once done."""
        _need_bytes("market", market)
        with self._lock, self._writing():
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = conn.execute(
                    "SELECT final_idx, id, compacted FROM ops INDEXED BY ops_final"
                    " WHERE market = ? AND final_idx IS NOT NULL AND final_idx >= ?"
                    " AND final_idx < ? ORDER BY final_idx LIMIT ?",
                    (market, start, below, limit),
                ).fetchall()
                gone = [
                    (bytes(ident),)
                    for _, ident, mark in rows
                    if mark == COMPACTED and bytes(ident) not in keep
                ]
                conn.executemany("DELETE FROM ops WHERE id = ?", gone)
                if meta is not None:
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES (?, ?)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (meta[0], _need_bytes("value", meta[1])),
                    )
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        following = below if len(rows) < limit else int(rows[-1][0]) + 1
        return len(gone), following

    def save_join(
        self, market: bytes, items: Iterable[OpItem], snapshot: Snapshot, point: int
    ) -> None:
        """Record that this node joined ``market`` from the snapshot of ``point`` in ONE
        transaction: the kept ops ``items`` (live: what a restart hands the snapshot back),
        the snapshot (as a compaction stores it), the point blob (served to others) and the
        join itself, with no history held yet."""
        _need_bytes("market", market)
        _need_bytes("snapshot", snapshot.data)
        rows = [_check_item(item) for item in items]
        with self._lock, self._writing():
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO ops (id, market, lamport, raw) VALUES (?, ?, ?, ?)"
                    f" ON CONFLICT (id) DO UPDATE SET compacted = {LIVE}",
                    rows,
                )
                conn.execute(
                    "INSERT OR REPLACE INTO snapshots (market, ops, fills, data)"
                    " VALUES (?, ?, ?, ?)",
                    (market, snapshot.ops, snapshot.fills, snapshot.data),
                )
                _keep_point(conn, market, point, snapshot.data)
                conn.execute(
                    "INSERT OR REPLACE INTO joins (market, n, data, history) VALUES (?, ?, ?, 0)",
                    (market, point, snapshot.data),
                )
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

    def join_state(self, market: bytes) -> JoinState | None:
        """How this node joined ``market`` from a snapshot (:class:`JoinState`), else None."""
        with self._lock:
            row = (
                self._db()
                .execute(
                    "SELECT n, data, history, derived FROM joins WHERE market = ?", (market,)
                )
                .fetchone()
            )
        if row is None:
            return None
        return JoinState(int(row[0]), bytes(row[1]), int(row[2]), int(row[3]))

    def save_derived(
        self,
        market: bytes,
        fills: Sequence[CompactedFill],
        orders: Sequence[CompactedOrder],
        done: int | None = None,
    ) -> None:
        """Store fills and finished orders derived from the history before ``market``'s join
        point (node.derive), as a compaction stores its own, in one transaction; with
        ``done``, also record the derivation complete up to that point. A row already there
        stays (a derivation started again after a restart writes the same rows)."""
        with self._lock, self._writing():
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                _insert_rows(conn, "IGNORE", market, fills, orders)
                if done is not None:
                    conn.execute(
                        "UPDATE joins SET derived = ? WHERE market = ?", (done, market)
                    )
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

    def add_history(self, market: bytes, start: int, items: Sequence[OpItem]) -> None:
        """Stage history ops of ``market`` fetched from a peer, the first at final index
        ``start``, in one transaction: a new op is stored staged (neither live nor in the
        archive until :meth:`finish_history`), one already stored only gets its index."""
        rows = [(*_check_item(item), index) for index, item in enumerate(items, start)]
        if not rows:
            return
        with self._lock, self._writing():
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO ops (id, market, lamport, raw, compacted, final_idx)"
                    f" VALUES (?, ?, ?, ?, {STAGED}, ?)"
                    " ON CONFLICT (id) DO UPDATE SET final_idx = excluded.final_idx",
                    rows,
                )
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

    def finish_history(self, market: bytes, point: int, kept: Iterable[bytes]) -> int:
        """The staged history of ``market`` checked against its ``point``: the prefix becomes
        the archive (compacted), but for the ``kept`` ops (live: a restart hands them to the
        snapshot), and the join holds the whole prefix. Prefix ops stored live before (sync
        brought copies of them while the history was absent) are archived too. One
        transaction; returns how many ops were archived."""
        keep = [(_need_bytes("op id", ident),) for ident in kept]
        with self._lock, self._writing():
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(
                    f"UPDATE ops SET compacted = {COMPACTED} WHERE market = ?"
                    f" AND final_idx IS NOT NULL AND final_idx < ? AND compacted != {COMPACTED}",
                    (market, point),
                )
                conn.executemany(f"UPDATE ops SET compacted = {LIVE} WHERE id = ?", keep)
                conn.execute("UPDATE joins SET history = n WHERE market = ?", (market,))
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            return int(cur.rowcount)

    def drop_history(self, market: bytes, point: int) -> int:
        """Forget history of ``market`` fetched but not checked (it did not check, or a start
        finds it left over): staged ops leave the store, and stored ops lose indexes below
        ``point`` that only the fetch gave them. One transaction; returns the ops dropped."""
        with self._lock, self._writing():
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(
                    f"DELETE FROM ops WHERE market = ? AND compacted = {STAGED}", (market,)
                )
                conn.execute(
                    "UPDATE ops SET final_idx = NULL WHERE market = ? AND final_idx IS NOT NULL"
                    " AND final_idx < ?",
                    (market, point),
                )
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            return int(cur.rowcount)

    # -- checkpoints -----------------------------------------------------------------------

    def set_checkpoint(self, market: bytes, covered: int, data: bytes) -> None:
        """Replace ``market``'s derived-state checkpoint (``data``, covering the first
        ``covered`` ops of its total order) in one transaction: a crash at any moment leaves
        the previous checkpoint or this one, whole. It only saves work on restart, so it is
        never worth an fsync of its own beyond what ``synchronous`` gives every commit."""
        _need_bytes("market", market)
        _need_bytes("data", data)
        with self._lock, self._writing():
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                # The table's key allows one row per (market, upto); we keep one per market.
                conn.execute("DELETE FROM checkpoints WHERE market = ?", (market,))
                conn.execute(
                    "INSERT INTO checkpoints (market, upto, data) VALUES (?, ?, ?)",
                    (market, covered, data),
                )
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

    def get_checkpoint(self, market: bytes) -> bytes | None:
        """``market``'s checkpoint as stored by :meth:`set_checkpoint`, or None."""
        with self._lock:
            row = (
                self._db()
                .execute(
                    "SELECT data FROM checkpoints WHERE market = ? ORDER BY upto DESC LIMIT 1",
                    (market,),
                )
                .fetchone()
            )
        return None if row is None else bytes(row[0])

    def delete_checkpoint(self, market: bytes) -> None:
        """Forget ``market``'s checkpoint (the next start replays every op)."""
        with self._lock, self._writing():
            self._db().execute("DELETE FROM checkpoints WHERE market = ?", (market,))

    # -- write failures --------------------------------------------------------------------

    def check_writable(self) -> None:
        """One small committed write (the meta row ``write_check``); raises
        :class:`StoreWriteError` while the store cannot take writes (full, read-only)."""
        self.set_meta("write_check", b"")

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn SQLite's failure of a write (disk full, read-only or failing filesystem, a lock
        held too long) into a :class:`StoreWriteError` that says which, in one line."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            name = getattr(exc, "sqlite_errorname", "")
            reason: Literal["full", "read-only", "io"]
            why = None if name == "SQLITE_FULL" else _unwritable_dir(self.path.parent)
            if name == "SQLITE_FULL" or why == errno.ENOSPC:
                message, reason = "is full: no space left on its filesystem", "full"
            elif why == errno.EROFS or name.startswith("SQLITE_READONLY"):
                message, reason = "is on a read-only filesystem", "read-only"
            else:
                message, reason = "cannot be written", "io"
            raise StoreWriteError(f"the op store {self.path} {message} ({exc})", reason) from exc

    # -- maintenance -----------------------------------------------------------------------

    def integrity_check(self) -> str:
        """Run ``PRAGMA integrity_check`` (slow on big stores); ``"ok"`` when healthy."""
        with self._lock:
            rows = self._db().execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(row[0]) for row in rows)

    def schema_version(self) -> int:
        """The store's ``PRAGMA user_version``."""
        with self._lock:
            return int(self._db().execute("PRAGMA user_version").fetchone()[0])


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema to SCHEMA_VERSION, one transaction per step (crash-safe)."""
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the op store {path} has schema version {version}, newer than this crdtbook "
                    f"supports ({SCHEMA_VERSION}); upgrade crdtbook"
                )
            if version == SCHEMA_VERSION:
                conn.execute("COMMIT")
                return
            _MIGRATIONS[version](conn)
            # user_version lives in the database header, so it commits atomically with the step.
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _keep_point(conn: sqlite3.Connection, market: bytes, point: int, data: bytes) -> None:
    """Store ``market``'s point blob of ``point`` and forget all but the latest POINTS_KEPT
    (inside the caller's transaction)."""
    conn.execute(
        "INSERT OR REPLACE INTO points (market, n, data) VALUES (?, ?, ?)", (market, point, data)
    )
    conn.execute(
        "DELETE FROM points WHERE market = ? AND n NOT IN"
        " (SELECT n FROM points WHERE market = ? ORDER BY n DESC LIMIT ?)",
        (market, market, POINTS_KEPT),
    )


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back a failed write's transaction, if SQLite has not already: a rollback that fails
    too (the disk is gone) must not hide the first error."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _unwritable_dir(directory: Path) -> int | None:
    """Why files cannot be created in ``directory`` (an errno such as EROFS), or None. SQLite
    reports a write on a filesystem that turned read-only as a plain "disk I/O error"; this
    finds out which (only on that error path)."""
    probe = directory / f".write-check-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        return exc.errno
    try:
        os.write(fd, b"x")
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return None


def _next_prefix(prefix: bytes) -> bytes | None:
    """The least byte string greater than every string starting with ``prefix`` (None: none)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def _need_bytes(name: str, value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    return value


def _check_item(item: OpItem) -> OpItem:
    """Reject wrongly typed rows before they reach SQLite, which would store str as TEXT and
    silently break lookups by id."""
    op_id, market, lamport, raw = item
    if not (isinstance(op_id, bytes) and isinstance(market, bytes) and isinstance(raw, bytes)):
        raise TypeError("op id, market and raw must be bytes")
    if not isinstance(lamport, int) or isinstance(lamport, bool) or lamport < 0:
        raise TypeError(f"lamport must be a non-negative int, not {lamport!r}")
    return (op_id, market, lamport, raw)
