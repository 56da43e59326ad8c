"""A joined market's past: the fills and finished orders before the point it joined from.

A node that joined a witnessed market from a point state (node.join) holds the matched state at
the point, not how it came about, so ``fills`` and ``order`` answered from the point on. Once
its store holds the prefix before that point (the history, fetched and checked), this derives
its fills and finished orders with the core (``crdtbook.PrefixDerivation``: the final engine fed
the prefix in total order, as every compacting replica did) and stores them as a compaction
stores its own (``OpStore.save_derived``). ``fills --limit N`` and ``order`` then answer for the
whole history, marked final.

Nothing unchecked is shown: a first pass over the prefix only checks that it derives the point
state (op count and running hash, fill and order counts, resting orders); the second writes the
rows, in chunks. Until both are done, paging through ``fills`` (``start``) begins at the join
point (``answered_from``). A mismatch (this node's code would derive another past than the
replicas that made the point) is logged once at ERROR, and ``status`` says ``inconsistent``;
nothing is written. A store that fails meanwhile leaves it ``failed``: tried again after
``DERIVE_RETRY`` (doubling up to ``DERIVE_RETRY_MAX``) while the history is held, and after
the next history fetch.

All of the work runs in a worker thread, a chunk (``DERIVE_CHUNK`` ops: the store read, the
decoding, the engine) at a time, and so do the reading of the point state and the final check,
which walk every resting order (seconds for a book of 200,000): the event loop only waits. It
holds the market's ``archive_lock``, so retention prunes nothing under it. Done once: the store
records it (``joins.derived``), and a restart in the middle starts again (the rows are the
same).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final

import trio

from crdtbook import Fill, InvalidOp, OrderState, PrefixDerivation, SnapshotRefused, decode

from .store import CompactedFill, CompactedOrder, StoreError

if TYPE_CHECKING:
    from .service import MarketState, NodeService

__all__ = [
    "DERIVE_CHUNK",
    "DERIVE_RETRY",
    "DERIVE_RETRY_MAX",
    "answered_from",
    "derive_due",
    "derive_joined_history",
    "derive_locked",
]

logger = logging.getLogger("crdtbook.node")

#: Prefix ops read and derived at a time, in a worker thread: one store read (~1 MB), the
#: decoding and the engine's work (~15 us an op: bench/bench_derive.py).
DERIVE_CHUNK: Final = 1000
#: A derivation that failed (the store refused a write) is tried again this long after, then
#: twice as long each time up to DERIVE_RETRY_MAX, while the history is held.
DERIVE_RETRY: Final = 30.0
DERIVE_RETRY_MAX: Final = 600.0


def answered_from(ms: MarketState) -> int:
    """The lowest fill index this node answers for in order: 0, but for a market joined from a
    point whose past is not derived yet (the point's fill count)."""
    if ms.join_info is None or ms.derive_state == "done":
        return 0
    return ms.join_fills


def derive_due(service: NodeService, ms: MarketState) -> bool:
    """Whether ``ms`` joined from a point, its store holds the whole prefix before it, and
    that prefix is not derived yet (nor found inconsistent, nor failed too recently)."""
    if ms.join_info is None or not ms.replica.has_history:
        return False  # (cheap: the history loop asks at every change of the market)
    if ms.derive_state == "failed" and trio.current_time() >= ms.derive_retry_at:
        ms.derive_state = None
    if ms.derive_state is not None:
        return False
    joined = service.store.join_state(ms.market.id)
    return joined is not None and joined.history >= joined.n > joined.derived


async def derive_joined_history(service: NodeService, ms: MarketState) -> bool:
    """Derive and store the fills and finished orders before ``ms``'s join point, if due (see
    the module docstring); True if it did."""
    async with ms.archive_lock:
        return await derive_locked(service, ms)


async def derive_locked(service: NodeService, ms: MarketState) -> bool:
    """``derive_joined_history`` for a caller that holds ``ms.archive_lock`` (a history fetch
    that just completed: before retention may prune what it brought)."""
    if not derive_due(service, ms):
        return False
    ms.derive_state = "deriving"
    outcome = "failed"
    try:
        outcome = await _derive(service, ms)
    finally:
        ms.derive_state = outcome
        if outcome == "failed":
            ms.derive_retry_at = trio.current_time() + ms.derive_delay
            ms.derive_delay = min(DERIVE_RETRY_MAX, ms.derive_delay * 2)
        ms.changed.set()  # what the market answers for changed (its past, its status)
        ms.changed = trio.Event()
    return outcome == "done"


async def _derive(service: NodeService, ms: MarketState) -> str:
    """Both passes; the outcome: "done", "inconsistent" or "failed" (tried again after
    ``DERIVE_RETRY`` and more, or after the next history fetch)."""
    store, market = service.store, ms.market
    joined = store.join_state(market.id)
    assert joined is not None
    n, blob = joined.n, joined.data
    started = time.monotonic()
    logger.info("%s: deriving the fills and orders of the %d ops before the join point",
                market.name, n)
    for writing in (False, True):
        try:
            derivation = await trio.to_thread.run_sync(PrefixDerivation, market, blob)
        except SnapshotRefused as exc:  # the store's own bytes, damaged on disk
            logger.warning("%s: the joined point does not read (%s)", market.name, exc)
            return "failed"
        try:
            while derivation.ops < n:
                count = await trio.to_thread.run_sync(
                    _derive_chunk, service, ms, derivation, n, writing
                )
                if not count:  # not held any more (retention pruned it): after the next fetch
                    logger.info("%s: the history before the join point is not held; its fills "
                                "and orders are not derived", market.name)
                    return "failed"
                ms.derive_progress = (derivation.ops + (n if writing else 0)) / (2 * n)
            last = await trio.to_thread.run_sync(derivation.finish)
            if writing:
                await trio.to_thread.run_sync(_save, service, ms, last, n)
        except SnapshotRefused as exc:
            logger.error("%s: the history before the join point does not derive the point state "
                         "it was checked against (%s); its fills and orders are not shown",
                         market.name, exc)
            return "inconsistent"
        except StoreError as exc:
            logger.warning("%s: could not store the derived history: %s", market.name, exc)
            return "failed"
        except InvalidOp as exc:  # the store's own bytes (they chained to the point): damaged
            logger.warning("%s: a stored op of the history does not decode: %s", market.name,
                           exc)
            return "failed"
    ms.derive_progress = 1.0
    logger.info("%s: derived %d fills and %d finished orders before the join point in %.1f s",
                market.name, derivation.fills, derivation.orders, time.monotonic() - started)
    return "done"


def _derive_chunk(
    service: NodeService, ms: MarketState, derivation: PrefixDerivation, n: int, writing: bool
) -> int:
    """One chunk, in a worker thread: read it, derive it and (``writing``) store its rows; how
    many ops it took (0: the store does not hold them)."""
    raws = service.store.history(
        ms.market.id, derivation.ops, min(DERIVE_CHUNK, n - derivation.ops)
    )
    if raws:
        derivation.feed(decode(raw, verify=False) for raw in raws)
        rows = derivation.take()
        if writing:
            _save(service, ms, rows, None)
    return len(raws)


def _save(
    service: NodeService,
    ms: MarketState,
    rows: tuple[int, list[Fill], list[OrderState]],
    done: int | None,
) -> None:
    start, fills, orders = rows
    service.store.save_derived(
        ms.market.id,
        [CompactedFill(i, f) for i, f in enumerate(fills, start)],
        [CompactedOrder(o) for o in orders],
        done,
    )
