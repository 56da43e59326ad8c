"""What the HTTP API's WebSocket streams send (specs/http-api.md, "WebSocket"), sans I/O.

* :class:`BookFeed`, one per market: the book's top levels at a sequence number, and the
  recent deltas between sequence numbers, so that a client resumes from the last ``u`` it saw.
* :class:`PrivateWatch`, one per private subscription: which of this node's orders changed and
  which of its fills arrived, were revoked or became final since the last look.

Both are read on demand (after the node applied something, at most every coalescing interval),
so a market nobody watches costs nothing.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Final

from crdtbook import Fill, OrderState

from .handler import WatchedFills
from .service import MarketState

__all__ = ["BOOK_FEED_DEPTH", "BOOK_FEED_KEEP", "BookFeed", "Delta", "PrivateWatch"]

#: Levels per side the book stream follows. A client's book is the node's top levels: a level
#: pushed below them is removed (amount "0") and comes back when it rises again. Deep enough
#: for any ladder or depth chart; bounded so a deep book costs the same per update.
BOOK_FEED_DEPTH: Final = 500
#: Deltas kept for clients that resume with ``since``: at one delta per coalescing interval
#: (100 ms) about 100 s of a busy market; a client away longer gets a fresh snapshot.
BOOK_FEED_KEEP: Final = 1000

#: price ticks -> lots (0: the level is gone), for each side.
Levels = dict[int, int]


class Delta:
    """The change between sequence numbers ``first - 1`` and ``last``."""

    __slots__ = ("asks", "bids", "first", "last")

    def __init__(self, first: int, last: int, bids: Levels, asks: Levels) -> None:
        self.first, self.last, self.bids, self.asks = first, last, bids, asks


def _diff(old: Levels, new: Levels) -> Levels:
    changed = {price: lots for price, lots in new.items() if old.get(price) != lots}
    changed.update({price: 0 for price in old if price not in new})
    return changed


class BookFeed:
    """A market's book stream: a sequence number that grows by one with every change of the
    top ``depth`` levels seen by :meth:`refresh`, and the last ``keep`` changes.

    Sequence numbers start at the node's start time in microseconds, so that a ``since`` from
    before a restart of the node is never taken for one of this run's (it is older than every
    delta held, and gets a snapshot)."""

    def __init__(
        self, ms: MarketState, depth: int = BOOK_FEED_DEPTH, keep: int = BOOK_FEED_KEEP
    ) -> None:
        self.ms = ms
        self.depth = depth
        self.seq = time.time_ns() // 1000
        self.bids: Levels = {}
        self.asks: Levels = {}
        self._deltas: deque[Delta] = deque(maxlen=keep)
        self._version: tuple[int, int] | None = None

    def refresh(self) -> int:
        """Bring the feed up to the replica's book; returns the sequence number. O(depth)
        when the replica changed, O(1) otherwise."""
        replica = self.ms.replica
        version = (replica.version, len(replica))
        if version == self._version:
            return self.seq
        self._version = version
        book = replica.book(self.depth)
        bids = {lv.price: lv.quantity for lv in book.bids}
        asks = {lv.price: lv.quantity for lv in book.asks}
        bid_changes, ask_changes = _diff(self.bids, bids), _diff(self.asks, asks)
        if bid_changes or ask_changes:
            self.seq += 1
            self._deltas.append(Delta(self.seq, self.seq, bid_changes, ask_changes))
            self.bids, self.asks = bids, asks
        return self.seq

    def since(self, seq: int) -> Delta | None:
        """Every change after ``seq`` merged into one delta (``first`` = seq + 1, ``last`` =
        the current sequence number), or None when the feed no longer holds them all (or
        ``seq`` is not one of this feed's): the client needs a snapshot. Call after
        :meth:`refresh`; when nothing changed since ``seq`` the delta is empty."""
        if seq > self.seq:
            return None
        if seq == self.seq:
            return Delta(seq + 1, seq, {}, {})
        if not self._deltas or self._deltas[0].first > seq + 1:
            return None
        bids: Levels = {}
        asks: Levels = {}
        for delta in self._deltas:
            if delta.last > seq:
                bids.update(delta.bids)
                asks.update(delta.asks)
        return Delta(seq + 1, self.seq, bids, asks)

    def format(self, side: Levels, descending: bool) -> list[list[str]]:
        """``[[price, amount], ...]`` best first, as decimal strings."""
        m = self.ms.market
        return [
            [m.ticks_to_price(price), m.lots_to_qty(lots)]
            for price, lots in sorted(side.items(), reverse=descending)
        ]


class PrivateWatch:
    """One private subscription's view of this node's orders and fills in one market.

    Each :meth:`update` reports the orders of ``me`` whose state differs from what was last
    reported (new ones included), and of the fills this key took part in: the ones to (re)send,
    the revoked ones and the indexes that became final (see
    :class:`crdtbook.node.handler.WatchedFills`). Cost per update: O(this key's orders) plus
    the fills since the last one."""

    def __init__(self, ms: MarketState, me: bytes) -> None:
        self.ms = ms
        self.me = me
        self._fills = WatchedFills(ms)
        self._orders: dict[bytes, OrderState] = {o.id: o for o in ms.replica.orders(me)}

    def _mine(self, fill: Fill) -> bool:
        return fill.taker_author == self.me or fill.maker_author == self.me

    def update(
        self,
    ) -> tuple[list[OrderState], list[tuple[int, Fill]], list[tuple[int, Fill]], list[int]]:
        """(changed orders, fills to send, revoked fills, indexes that became final)."""
        changed = []
        for order in self.ms.replica.orders(self.me):
            if self._orders.get(order.id) != order:
                self._orders[order.id] = order
                changed.append(order)
        fills, revoked, became_final = self._fills.update()
        final_fills = self.ms.replica.fills(became_final[0]) if became_final else ()
        start = became_final[0] if became_final else 0
        mine_final = [i for i in became_final if self._mine(final_fills[i - start])]
        return (
            changed,
            [(i, f) for i, f in fills if self._mine(f)],
            [(i, f) for i, f in revoked if self._mine(f)],
            mine_final,
        )
