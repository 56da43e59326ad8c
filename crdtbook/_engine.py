"""Price-time priority matching with an undo journal.

The engine sees ops one at a time in the total order and keeps the matched book. Every mutation
it makes is written to the journal of the op being processed, as the instruction that reverses it,
so the replica can rewind the last k ops in O(k) when a late op sorts before them, and replay.

Data structures and costs (n resting orders, L price levels, m orders at one level):

- per side, ``levels: dict[price, _Level]`` (a deque of orders in time priority and a count of
  the live ones), and ``prices: SortedList`` of the prices that have a live order. Best price:
  O(1). New level: O(log L). Resting at an existing level: O(1). Taking from the front: O(1).
  Cancelling: O(1): the order is marked dead where it stands and dropped when matching reaches
  it (or with its level, once no live order is left there), so a long level never gets scanned.
- ``orders: dict[order id, _Order]``: every order ever seen, with its state.
- ``fills: list[Fill]`` in execution order.

Matching rules (specs/protocol.md, "Matching"):
  trades happen at the resting order's price; partial fills; a GTC remainder rests; an IOC
  remainder expires; a FOK order fills completely or not at all; a POST_ONLY order that would
  take is rejected; a cancel removes the rest of its order (a finished order: no-op).
  Self-trade prevention, "expire maker": when a taker meets a resting order of its own author, the
  resting order expires (reason ``self_trade``) and the taker goes on matching; a FOK order counts
  only other authors' liquidity when it decides whether it can fill.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final, NamedTuple

from sortedcontainers import SortedList

from ._ops import BUY, FOK, IOC, POST_ONLY, CancelBody, Op, OrderBody

__all__ = [
    "CANCELLED",
    "EXPIRED",
    "FILLED",
    "OPEN",
    "PARTIALLY_FILLED",
    "REASONS",
    "REJECTED",
    "STATUSES",
    "Engine",
    "Fill",
]

# Order statuses, as wire/digest codes (index) and names.
STATUSES: Final = ("open", "partially_filled", "filled", "cancelled", "expired", "rejected")
OPEN, PARTIALLY_FILLED, FILLED, CANCELLED, EXPIRED, REJECTED = range(6)
# Why an order stopped early. 0 means no reason (still live or completely filled).
REASONS: Final = (
    None,
    "cancelled",
    "ioc_remainder",
    "fok_unfillable",
    "post_only_would_take",
    "self_trade",
)
R_NONE, R_CANCELLED, R_IOC, R_FOK, R_POST_ONLY, R_SELF_TRADE = range(6)

_BID, _ASK = 0, 1

# Journal records. A journal is one flat list per op: each record's arguments, then its code,
# read backwards by undo. What an op did to its own order or cancel record, and resting its own
# order, is not journaled: undo reads it off the op and the order.
_J_RESTORE = 1  # order, remaining, filled, closed, status, reason: restore a maker's state
_J_PUSH_FRONT = 2  # level, order: undo taking an order off the front of a level
_J_PUT_LEVEL = 5  # side, price, level: undo removing a level
_J_DEL_FILL = 6  # (no arguments): undo appending a fill
_J_LIVE = 8  # level: undo an order at the level going dead


class Fill(NamedTuple):
    """One trade: ``taker`` and ``maker`` are order ids, ``price`` ticks, ``quantity`` lots."""

    taker: bytes
    maker: bytes
    price: int
    quantity: int
    taker_side: str
    taker_author: bytes
    maker_author: bytes


class _Order:
    """Mutable engine-side state of one order (the public view is ``OrderState``)."""

    __slots__ = (
        "author",
        "closed",
        "filled",
        "id",
        "lamport",
        "price",
        "quantity",
        "reason",
        "remaining",
        "side",
        "status",
        "tag",
        "tif",
    )

    def __init__(self, op: Op, body: OrderBody) -> None:
        self.id = op.id
        self.author = op.author
        self.lamport = op.lamport
        self.side = _BID if body.side == BUY else _ASK
        self.price = body.price
        self.quantity = body.quantity
        self.tif = body.tif
        self.tag = body.tag
        self.remaining = 0  # resting quantity
        self.filled = 0
        self.closed = 0  # cancelled, expired or rejected quantity
        self.status = OPEN
        self.reason = R_NONE


_new_fill = tuple.__new__


class _Level:
    """Orders at one price in time priority; dead ones (cancelled) may remain until reached."""

    __slots__ = ("live", "queue")

    def __init__(self) -> None:
        self.queue: deque[_Order] = deque()
        self.live = 0

    def orders(self) -> list[_Order]:
        return [o for o in self.queue if o.status <= PARTIALLY_FILLED]


class Engine:
    """The matched state of one market, fed ops in total order."""

    def __init__(self) -> None:
        self.orders: dict[bytes, _Order] = {}
        self.fills: list[Fill] = []
        #: cancel op id -> True if it removed a rest, False if the order was already finished.
        self.cancels: dict[bytes, bool] = {}
        self.levels: tuple[dict[int, _Level], dict[int, _Level]] = ({}, {})
        self.prices: tuple[SortedList, SortedList] = (SortedList(), SortedList())

    # -- forward -----------------------------------------------------------------------------

    def process(self, op: Op) -> list[Any] | None:
        """Apply one op that sorts after everything processed so far; return its undo journal:
        what it did to other orders, levels and fills, flat (each record's arguments, then its
        code), or None when it did nothing there. What it did to its own order or cancel record,
        and resting its own order, ``undo`` reads off the op and the order."""
        body = op.body
        if type(body) is OrderBody:
            return self._order(op, body)
        return self._cancel(op, body)  # type: ignore[arg-type]

    def _order(self, op: Op, body: OrderBody) -> list[Any] | None:
        taker = _Order(op, body)
        self.orders[taker.id] = taker
        side = taker.side
        opp = 1 - side
        opp_prices = self.prices[opp]
        limit = taker.price
        # Is the best opposing price within the taker's limit?
        if opp_prices:
            best = opp_prices[0] if opp == _ASK else opp_prices[-1]
            crosses = best <= limit if side == _BID else best >= limit
        else:
            crosses = False

        tif = body.tif
        if not crosses:
            if tif == IOC:
                self._close(taker, taker.quantity, EXPIRED, R_IOC)
            elif tif == FOK:
                self._close(taker, taker.quantity, EXPIRED, R_FOK)
            else:
                self._rest(taker, taker.quantity)
            return None
        if tif == POST_ONLY:
            self._close(taker, taker.quantity, REJECTED, R_POST_ONLY)
            return None
        if tif == FOK and not self._can_fill(taker):
            self._close(taker, taker.quantity, EXPIRED, R_FOK)
            return None

        journal: list[Any] = []
        remaining = self._match(taker, journal)
        if remaining == 0:
            taker.status = FILLED
        elif tif == IOC:
            self._close(taker, remaining, EXPIRED, R_IOC)
        else:  # GTC (FOK was checked to fill completely, POST_ONLY never reaches here)
            self._rest(taker, remaining)
        return journal or None

    def _close(self, order: _Order, quantity: int, status: int, reason: int) -> None:
        # Only for the taker being processed: it is new in this op, so undo deletes it whole.
        order.closed = quantity
        order.status = status
        order.reason = reason

    def _rest(self, order: _Order, quantity: int) -> None:
        # The last thing an op does; undo sees it on the order (remaining > 0) and reverses it.
        order.remaining = quantity
        order.status = PARTIALLY_FILLED if order.filled else OPEN
        side = order.side
        levels = self.levels[side]
        level = levels.get(order.price)
        if level is None:
            level = levels[order.price] = _Level()
            self.prices[side].add(order.price)
        level.queue.append(order)
        level.live += 1

    def _went_dead(self, side: int, price: int, level: _Level, journal: list[Any]) -> None:
        """One order at ``level`` stopped being live; drop the level when none is left."""
        level.live -= 1
        journal += (level, _J_LIVE)
        if level.live == 0:
            del self.levels[side][price]
            self.prices[side].remove(price)
            journal += (side, price, level, _J_PUT_LEVEL)

    def _can_fill(self, taker: _Order) -> bool:
        """FOK: is there enough liquidity from other authors within the limit?"""
        need = taker.quantity
        opp = 1 - taker.side
        levels = self.levels[opp]
        prices = self.prices[opp]
        walk = prices if opp == _ASK else reversed(prices)
        for price in walk:
            if (price > taker.price) if opp == _ASK else (price < taker.price):
                break
            for maker in levels[price].queue:
                if maker.status <= PARTIALLY_FILLED and maker.author != taker.author:
                    need -= maker.remaining
                    if need <= 0:
                        return True
        return False

    def _match(self, taker: _Order, journal: list[Any]) -> int:
        """Take liquidity; returns the taker's unfilled quantity."""
        remaining = taker.quantity
        opp = 1 - taker.side
        levels = self.levels[opp]
        prices = self.prices[opp]
        fills = self.fills
        while remaining and prices:
            price = prices[0] if opp == _ASK else prices[-1]
            if (price > taker.price) if opp == _ASK else (price < taker.price):
                break
            level = levels[price]
            queue = level.queue
            maker = queue[0]
            if maker.status > PARTIALLY_FILLED:  # cancelled where it stood: drop it now
                queue.popleft()
                journal += (level, maker, _J_PUSH_FRONT)
                continue
            journal += (
                maker,
                maker.remaining,
                maker.filled,
                maker.closed,
                maker.status,
                maker.reason,
                _J_RESTORE,
            )
            if maker.author == taker.author:
                # Self-trade prevention: expire the resting order, keep matching.
                maker.closed += maker.remaining
                maker.remaining = 0
                maker.status = EXPIRED
                maker.reason = R_SELF_TRADE
            else:
                quantity = min(remaining, maker.remaining)
                remaining -= quantity
                taker.filled += quantity
                maker.filled += quantity
                maker.remaining -= quantity
                maker.status = FILLED if maker.remaining == 0 else PARTIALLY_FILLED
                fills.append(
                    _new_fill(
                        Fill,
                        (
                            taker.id,
                            maker.id,
                            price,
                            quantity,
                            "buy" if taker.side == _BID else "sell",
                            taker.author,
                            maker.author,
                        ),
                    )
                )
                journal.append(_J_DEL_FILL)
            if maker.remaining == 0:
                queue.popleft()
                journal += (level, maker, _J_PUSH_FRONT)
                self._went_dead(opp, price, level, journal)
        return remaining

    def _cancel(self, op: Op, body: CancelBody) -> list[Any] | None:
        order = self.orders[body.order_id]  # validity guarantees it exists and precedes the cancel
        effective = order.status in (OPEN, PARTIALLY_FILLED)
        self.cancels[op.id] = effective
        if not effective:
            return None
        journal: list[Any] = [
            order,
            order.remaining,
            order.filled,
            order.closed,
            order.status,
            order.reason,
            _J_RESTORE,
        ]
        order.closed += order.remaining
        order.remaining = 0
        order.status = CANCELLED
        order.reason = R_CANCELLED
        side, price = order.side, order.price
        self._went_dead(side, price, self.levels[side][price], journal)
        return journal

    # -- backward ----------------------------------------------------------------------------

    def undo(self, op: Op, journal: list[Any] | None) -> None:
        """Reverse one op. Ops must be undone last first, exactly as they were processed."""
        if type(op.body) is not OrderBody:
            if journal:
                self._undo_journal(journal)
            del self.cancels[op.id]
            return
        order = self.orders[op.id]
        if order.remaining:  # the op's last step rested its order at the back of a level
            levels = self.levels[order.side]
            level = levels[order.price]
            level.queue.pop()
            level.live -= 1
            if not level.live:  # live levels have a live order: this one made the level
                del levels[order.price]
                self.prices[order.side].remove(order.price)
        if journal:
            self._undo_journal(journal)
        del self.orders[op.id]

    def _undo_journal(self, journal: list[Any]) -> None:
        i = len(journal)
        while i:
            i -= 1
            code = journal[i]
            if code == _J_DEL_FILL:
                self.fills.pop()
            elif code == _J_RESTORE:
                i -= 6
                order = journal[i]
                (
                    order.remaining,
                    order.filled,
                    order.closed,
                    order.status,
                    order.reason,
                ) = journal[i + 1 : i + 6]
            elif code == _J_PUSH_FRONT:
                i -= 2
                journal[i].queue.appendleft(journal[i + 1])
            elif code == _J_LIVE:
                i -= 1
                journal[i].live += 1
            elif code == _J_PUT_LEVEL:
                i -= 3
                side, price, level = journal[i], journal[i + 1], journal[i + 2]
                self.levels[side][price] = level
                self.prices[side].add(price)
            else:  # pragma: no cover - journal entries are only written above
                raise AssertionError(f"unknown journal code {code!r}")

    # -- views -------------------------------------------------------------------------------

    def side_levels(self, side: int, depth: int | None = None) -> list[tuple[int, list[_Order]]]:
        """The best ``depth`` levels of one side (all by default), best first, with their live
        orders in time priority."""
        prices = self.prices[side]
        count = len(prices) if depth is None else min(depth, len(prices))
        levels = self.levels[side]
        picked = [prices[-1 - i] for i in range(count)] if side == _BID else prices[:count]
        return [(price, levels[price].orders()) for price in picked]
