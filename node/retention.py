"""Retention: pruning a witnessed market's archive after compactions (``--retention OPS``, #10).

A witnessed market compacts at points (node.service); the ops that leave memory stay in the
store as the replica's *archive* (``ops.compacted = 1``, with their final index), from which
the node answers late ops naming them, serves the prefix to joiners (node.join) and any
full-log sync. By default the node keeps all of it. With ``--retention OPS``, after each
compaction at point ``n`` it deletes from the store the archived ops whose final index is below
``n - OPS`` (:func:`prune`). ``OPS = 0`` keeps none of the archive (only what a restart and the
served snapshots need); there is no "off" value but the default.

What stays: the live ops (the replica's memory: never deleted), the kept ops of the points the
node serves (a joiner fetching the previous point's snapshot needs them), the compacted fills
and finished orders (``fills`` and ``order`` still answer for all history) and the snapshots.

What changes:

* The replica is told first (``Replica.forget_history``), before any row goes, so no op is ever
  judged against an archive that silently lacks what it names: an op whose verdict needs the
  pruned part (a copy of a pruned op, an op naming one as a parent, a cancel of an order that
  finished there) waits for the history, as at a node that joined from a snapshot.
* The pruning is recorded durably (a meta row, written in the first delete's transaction), so
  a restart restores with ``Replica.from_snapshot(..., history=False)``.
* The node serves no history (``no_history``: node.join checks ``has_history``, and the store's
  history read stops at the gap anyway), and a sync responder skips what it cannot find (the
  core's walk treats a compacted op missing from the archive as nothing to send).
* When ops wait for the pruned history, node.join fetches the prefix back from a peer that
  keeps it, checks it against the latest point's chain and archives it (:func:`restored`); the
  next compaction prunes again.
* Final is not replicated: a node cut off from the other witnesses finalises its own ops by its
  own heartbeats once theirs pass them, before they hold the ops. So it prunes only below the
  first of its own archived ops not yet acknowledged by every other witness in force
  (``Replica.first_unacknowledged_compacted``); deleting it would lose it for good (seen: a
  witness cut off for 40 s under load lost 109 of its ops, every later op of its waited for
  ever everywhere).
* A restart from the snapshot judges the ops after the point again. It prunes only when none of
  them would need the pruned history for that (``Replica.tail_needs_history``: a
  reconfiguration, an equivocating author's op...), and never their compacted parents
  (``Replica.tail_compacted_parents``): held on a restart, such an op and all that follows it
  turned ops the node had shown final provisional (seen: a witness killed after a
  reconfiguration showed 257 final fills before, 202 after, one of them another fill).

The deletes run in a worker thread in chunks of ``PRUNE_CHUNK_ROWS`` rows, each its own short
transaction, so an op write waits at most one chunk for the store. The SQLite file does not
shrink (freed pages are reused: it stops growing by the pruned amount).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final, NamedTuple

import trio

from crdtbook import Market, PointInfo, SnapshotRefused, read_point

from .store import OpStore

logger = logging.getLogger("crdtbook.node")

if TYPE_CHECKING:
    from .service import MarketState

__all__ = [
    "PRUNE_CHUNK_ROWS",
    "PruneState",
    "check_retention",
    "history_point",
    "kept_of_points",
    "meta_key",
    "prune",
    "read_state",
    "restored",
]

#: Prefix rows looked at per delete transaction: ~4k index walks and deletes, some tens of ms
#: on a laptop disk, so an op write waiting for the store lock waits about that long at most,
#: while a 50k-op point prunes in ~a dozen transactions (per-transaction cost stays small).
PRUNE_CHUNK_ROWS: Final = 4096

#: The meta row (per market) recording a pruning: ``b"<below> <pruned>"``.
_META_PREFIX: Final = "retention:"


class PruneState(NamedTuple):
    """What retention did to a market's archive, as recorded in the store."""

    #: The archive lacks (some) ops with a final index below this; 0: it holds the whole
    #: prefix (never pruned, or the history was fetched back since).
    below: int = 0
    #: Ops deleted by retention in all (a crash in the middle of a pruning may leave the last
    #: chunks uncounted: this is for ``status``, nothing depends on it).
    pruned: int = 0


def check_retention(value: int | None) -> int | None:
    """``--retention``'s value: None (keep everything) or an op count >= 0 (0: keep none of
    the archive). Raises ``ValueError`` for a negative one."""
    if value is not None and (type(value) is not int or value < 0):
        raise ValueError(f"--retention must be a number of ops >= 0, not {value!r}")
    return value


def meta_key(market: bytes) -> str:
    return _META_PREFIX + market.hex()


def read_state(store: OpStore, market: bytes) -> PruneState:
    """The market's recorded pruning (``PruneState()`` if none, or unreadable)."""
    raw = store.get_meta(meta_key(market))
    if raw is None:
        return PruneState()
    try:
        below, pruned = (int(part) for part in raw.split())
    except ValueError:  # our own row, damaged: assume the worst (pruned), fetched when needed
        return PruneState(1, 0)
    return PruneState(max(0, below), max(0, pruned))


def _encode(state: PruneState) -> bytes:
    return f"{state.below} {state.pruned}".encode()


def kept_of_points(store: OpStore, market: Market) -> set[bytes]:
    """The kept ops of every point blob the store serves (the latest two): a snapshot served
    to a joiner carries them, so retention never deletes them."""
    keep: set[bytes] = set()
    for _n, blob in store.points(market.id):
        try:
            keep.update(read_point(market, blob).kept)
        except SnapshotRefused:  # our own bytes, damaged: it cannot be served anyway
            continue
    return keep


async def prune(
    store: OpStore, ms: MarketState, retention: int, author: bytes | None = None
) -> int:
    """After a compaction of ``ms`` at point ``n``: delete the archived ops with a final index
    below ``n - retention`` (but the kept ops of the points served), telling the replica first
    and recording it in the store. Returns how many ops were deleted (0: nothing to do).
    Raises what the store raises (``StoreWriteError``): the caller logs it, and the next
    compaction tries again (the replica already waits for what may be gone).

    Never ``author``'s (the node's key) archived ops that some other witness in force has not
    acknowledged, nor what follows the first of them in final order
    (``Replica.first_unacknowledged_compacted``): final does not mean its peers hold it (a node
    cut off from them finalises its own ops by its own heartbeats and the others' later ones),
    and deleting it would lose it for good, every later op naming it waiting for ever at every
    node. The next compaction prunes further."""
    point = ms.replica.point
    if point is None:
        return 0
    below = point.n - retention
    state = ms.prune
    if below <= state.below:
        return 0
    if ms.archive_lock.locked():  # a history fetch: it completes the archive; prune next time
        return 0
    if ms.replica.tail_needs_history():
        # A restart judges the ops after the point again, from the snapshot: one of them (a
        # reconfiguration, an equivocating author's op...) needs the history, and without it
        # the node held it and all after it, showing ops it had shown final as provisional
        # (fills with another taker, once another fill final). Pruned once a compaction
        # takes it into the prefix.
        (logger.debug if ms.prune_waits else logger.info)(
            "%s: not pruning yet: an op after the point (a reconfiguration, or an "
            "equivocating author's) would need the history to be judged again on a restart",
            ms.market.name,
        )
        ms.prune_waits = True
        return 0
    first = None if author is None else ms.replica.first_unacknowledged_compacted(author)
    if first is not None:
        index = store.final_index(ms.market.id, first)
        if index is not None and index < below:
            below = index  # keep it and what follows it in final order
            if below <= state.below:
                (logger.debug if ms.prune_waits else logger.info)(
                    "%s: not pruning yet: this node's own archived ops from final op %d on are "
                    "not acknowledged by every other witness (they may hold them only here)",
                    ms.market.name,
                    index,
                )
                ms.prune_waits = True  # said once at INFO until it prunes again
                return 0
    ms.prune_waits = False
    async with ms.archive_lock:
        return await _prune(store, ms, below)


async def _prune(store: OpStore, ms: MarketState, below: int) -> int:
    state = ms.prune
    market = ms.market
    keep = await trio.to_thread.run_sync(kept_of_points, store, market)
    # And the compacted parents of the ops after the point: a restart judges those ops again,
    # and one whose parent is gone waits for the history (with all after it), turning what the
    # node showed final provisional. They go once a compaction takes their children.
    keep |= ms.replica.tail_compacted_parents()
    # From 0, not from the previous ``below``: the kept ops of a point no longer served were
    # left then and go now. Deleted rows leave the index, so the walk costs what is left.
    start = 0
    # First the replica: from here on an op needing what goes waits for the history instead of
    # being judged against an archive that lacks it (a pruned op's copy would look new). The
    # prefix's author tips are recomputed at each pruning (a later point moved them).
    ms.replica.forget_history()
    ms.prune = PruneState(below, state.pruned)
    meta: tuple[str, bytes] | None = (meta_key(market.id), _encode(ms.prune))
    deleted = 0
    while start < below:
        count, start = await trio.to_thread.run_sync(
            store.prune_history, market.id, start, below, keep, PRUNE_CHUNK_ROWS, meta
        )
        meta = None  # the first transaction recorded it: a restart knows history is gone
        deleted += count
    ms.prune = PruneState(below, state.pruned + deleted)
    await trio.to_thread.run_sync(store.set_meta, meta_key(market.id), _encode(ms.prune))
    return deleted


def restored(store: OpStore, ms: MarketState) -> None:
    """The history of a pruned ``ms`` was fetched back and archived: the store holds the whole
    prefix again (until the next compaction prunes it)."""
    if ms.prune.below:
        # Nothing is pruned any more: the count starts again (kept, it counted the same ops
        # again at each pruning after a fetch, past the size of the whole log).
        ms.prune = PruneState(0, 0)
        store.set_meta(meta_key(ms.market.id), _encode(ms.prune))


def history_point(ms: MarketState) -> PointInfo | None:
    """The point whose prefix a history fetch must bring for ``ms``: the latest point compacted
    at once retention pruned the archive (a pruned node may lack any of the prefix), else the
    point it joined from (None: neither, nothing to fetch)."""
    if ms.prune.below:
        return ms.replica.point
    return ms.join_info
