"""Price-time priority matching with an undo tape.

The engine sees ops one at a time in the total order and keeps the matched book. Every mutation
an op makes to something other than its own order is pushed on the undo tape (one flat list for
the whole engine, a stack), as the instruction that reverses it, so the replica can rewind the
last k ops in O(k) when a late op sorts before them, and replay. The caller remembers where each
op's records start (``len(engine.tape)`` before ``process``) and passes it back to ``undo``.

Data structures and costs (n resting orders, L price levels, m orders at one level):

- per side, ``levels: dict[price, _Level]`` (a deque of orders in time priority that also
  counts its live ones), and ``prices: SortedList`` of the prices that have a live order. Best
  price: O(1). New level: O(log L). Resting at an existing level: O(1). Taking from the front:
  O(1). Cancelling: O(1): the order is marked dead where it stands and dropped when matching
  reaches it (or with its level, once no live order is left there), so a long level never gets
  scanned.
- ``orders: dict[order id, _Order]``: every order ever seen, with its state.
- ``fills: list[tuple]`` in execution order, as plain ``(taker, maker, price, quantity)``
  tuples: the cyclic GC stops tracking a tuple of bytes and ints after its first look at it,
  where it would track a ``Fill`` (a tuple subclass) for ever. ``fill_views`` builds ``Fill``s.

Why it is shaped like this: the in-order path runs once per op on every node, and the cyclic
GC's cost grows with the number of container objects each op leaves behind, so an op leaves as
few as it can: one ``_Order`` (orders) and one plain tuple per fill. Its undo records go on the
shared tape rather than into a list of its own, which would be a tracked object per op (and
56 bytes of header).

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

# Undo records on the tape: each record's arguments, then its code, read backwards by undo. A
# maker's state before a record is implied by its state after it (a live order has closed == 0
# and reason R_NONE; its status is OPEN or PARTIALLY_FILLED as its filled quantity says), so a
# record holds only what cannot be read back.
_J_FILL: Final = 1  # maker, quantity: a fill that left the maker resting
_J_FILL_POP: Final = 2  # maker, quantity: a fill that completed the maker (taken off its level)
_J_SELF_TRADE: Final = 3  # maker: expired by self-trade prevention (taken off its level)
_J_DEAD_POP: Final = 4  # maker: a cancelled order dropped from the front of its level
_J_PUT_LEVEL: Final = 5  # level: the level was removed when its last live order went


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
    """Mutable engine-side state of one order (the public view is ``OrderState``). What never
    changes and the engine does not match on (quantity, tif, tag, Lamport time) is read from
    ``op``."""

    __slots__ = (
        "author",
        "closed",
        "filled",
        "id",
        "op",
        "price",
        "reason",
        "remaining",
        "side",
        "status",
    )

    def __init__(self, op: Op, side: int, price: int) -> None:
        self.op = op
        self.id = op.id
        self.author = op.author
        self.side = side
        self.price = price
        self.remaining = 0  # resting quantity
        self.filled = 0
        self.closed = 0  # cancelled, expired or rejected quantity
        self.status = OPEN
        self.reason = R_NONE

    @property
    def body(self) -> OrderBody:
        return self.op.body  # type: ignore[return-value]


class _Level(deque[_Order]):
    """Orders at one price in time priority; dead ones (cancelled) may remain until reached.
    ``live`` counts the others: the level exists while it is positive."""

    __slots__ = ("live", "price", "side")

    def __init__(self, side: int, price: int) -> None:
        super().__init__()
        self.side = side
        self.price = price
        self.live = 0

    def orders(self) -> list[_Order]:
        return [o for o in self if o.status <= PARTIALLY_FILLED]


class Engine:
    """The matched state of one market, fed ops in total order."""

    def __init__(self) -> None:
        self.orders: dict[bytes, _Order] = {}
        self.fills: list[tuple[bytes, bytes, int, int]] = []
        #: cancel op id -> True if it removed a rest, False if the order was already finished.
        self.cancels: dict[bytes, bool] = {}
        self.levels: tuple[dict[int, _Level], dict[int, _Level]] = ({}, {})
        self.prices: tuple[SortedList, SortedList] = (SortedList(), SortedList())
        #: Best bid and best ask (None: no level), kept with ``prices``: reading a SortedList's
        #: end is a Python call, and every order asks whether it crosses.
        self.best: list[int | None] = [None, None]
        #: Undo records of the processed ops, last op's last; see the module docstring.
        self.tape: list[Any] = []

    # -- forward -----------------------------------------------------------------------------

    def process(self, op: Op) -> None:
        """Apply one op that sorts after everything processed so far, pushing on the tape how to
        undo what it did to other orders, levels and fills. What it did to its own order or
        cancel record, ``undo`` reads off the op and the order."""
        body = op.body
        if type(body) is OrderBody:
            self._order(op, body)
        else:
            self._cancel(op, body)  # type: ignore[arg-type]

    def _order(self, op: Op, body: OrderBody) -> None:
        side = _BID if body.side == BUY else _ASK
        limit = body.price
        taker = _Order(op, side, limit)
        self.orders[taker.id] = taker
        # Is the best opposing price within the taker's limit?
        if side == _BID:
            best = self.best[_ASK]
            crosses = best is not None and best <= limit
        else:
            best = self.best[_BID]
            crosses = best is not None and best >= limit
        tif = body.tif
        quantity = body.quantity
        if not crosses:
            if tif == IOC:
                taker.closed, taker.status, taker.reason = quantity, EXPIRED, R_IOC
            elif tif == FOK:
                taker.closed, taker.status, taker.reason = quantity, EXPIRED, R_FOK
            else:
                self._rest(taker, quantity)
            return
        if tif == POST_ONLY:
            taker.closed, taker.status, taker.reason = quantity, REJECTED, R_POST_ONLY
            return
        if tif == FOK and not self._can_fill(taker, quantity):
            taker.closed, taker.status, taker.reason = quantity, EXPIRED, R_FOK
            return
        remaining = self._match(taker, quantity)
        if remaining == 0:
            taker.status = FILLED
        elif tif == IOC:
            taker.closed, taker.status, taker.reason = remaining, EXPIRED, R_IOC
        else:  # GTC (FOK was checked to fill completely, POST_ONLY never reaches here)
            self._rest(taker, remaining)

    def _rest(self, order: _Order, quantity: int) -> None:
        # The last thing an op does; undo sees it on the order (remaining > 0) and reverses it.
        order.remaining = quantity
        if order.filled:
            order.status = PARTIALLY_FILLED
        side = order.side
        levels = self.levels[side]
        level = levels.get(order.price)
        if level is None:
            level = levels[order.price] = _Level(side, order.price)
            self._add_price(side, order.price)
        level.append(order)
        level.live += 1

    def _can_fill(self, taker: _Order, need: int) -> bool:
        """FOK: is there enough liquidity from other authors within the limit?"""
        opp = 1 - taker.side
        levels = self.levels[opp]
        prices = self.prices[opp]
        walk = prices if opp == _ASK else reversed(prices)
        for price in walk:
            if (price > taker.price) if opp == _ASK else (price < taker.price):
                break
            for maker in levels[price]:
                if maker.status <= PARTIALLY_FILLED and maker.author != taker.author:
                    need -= maker.remaining
                    if need <= 0:
                        return True
        return False

    def _match(self, taker: _Order, remaining: int) -> int:
        """Take liquidity, best level first; returns the taker's unfilled quantity."""
        opp = 1 - taker.side
        levels = self.levels[opp]
        ask = opp == _ASK
        limit = taker.price
        author = taker.author
        taker_id = taker.id
        add_fill = self.fills.append
        record = self.tape.extend
        filled = 0
        best = self.best
        while remaining:
            price = best[opp]
            if price is None or ((price > limit) if ask else (price < limit)):
                break
            level = levels[price]
            while True:  # this level, front first, while it has live orders and we have need
                maker = level[0]
                if maker.status > PARTIALLY_FILLED:  # cancelled where it stood: drop it now
                    level.popleft()
                    record((maker, _J_DEAD_POP))
                    continue
                if maker.author == author:
                    # Self-trade prevention: expire the resting order, keep matching.
                    maker.closed = maker.remaining
                    maker.remaining = 0
                    maker.status = EXPIRED
                    maker.reason = R_SELF_TRADE
                    level.popleft()
                    record((maker, _J_SELF_TRADE))
                else:
                    available = maker.remaining
                    if remaining < available:
                        maker.remaining = available - remaining
                        maker.filled += remaining
                        maker.status = PARTIALLY_FILLED
                        add_fill((taker_id, maker.id, price, remaining))
                        record((maker, remaining, _J_FILL))
                        filled += remaining
                        remaining = 0
                        break  # the maker rests on: so does the level
                    maker.remaining = 0
                    maker.filled += available
                    maker.status = FILLED
                    level.popleft()
                    add_fill((taker_id, maker.id, price, available))
                    record((maker, available, _J_FILL_POP))
                    filled += available
                    remaining -= available
                level.live -= 1
                if not level.live:
                    del levels[price]
                    self._remove_price(opp, price)
                    record((level, _J_PUT_LEVEL))
                    break
                if not remaining:
                    break
        taker.filled = filled
        return remaining

    def _cancel(self, op: Op, body: CancelBody) -> None:
        order = self.orders[body.order_id]  # validity guarantees it exists and precedes the cancel
        effective = order.status <= PARTIALLY_FILLED
        self.cancels[op.id] = effective
        if not effective:
            return
        order.closed = order.remaining
        order.remaining = 0
        order.status = CANCELLED
        order.reason = R_CANCELLED
        side, price = order.side, order.price
        level = self.levels[side][price]
        level.live -= 1
        if not level.live:
            del self.levels[side][price]
            self._remove_price(side, price)
            self.tape += (level, _J_PUT_LEVEL)

    def _add_price(self, side: int, price: int) -> None:
        self.prices[side].add(price)
        best = self.best[side]
        if best is None or (price > best if side == _BID else price < best):
            self.best[side] = price

    def _remove_price(self, side: int, price: int) -> None:
        prices = self.prices[side]
        prices.remove(price)
        if price == self.best[side]:
            self.best[side] = (prices[-1] if side == _BID else prices[0]) if prices else None

    # -- backward ----------------------------------------------------------------------------

    def undo(self, op: Op, start: int) -> None:
        """Reverse one op, the last one processed (and not undone) whose records begin at
        ``tape[start]``. Ops must be undone last first, exactly as they were processed."""
        body = op.body
        if type(body) is not OrderBody:
            if len(self.tape) > start:
                self._undo_records(start)
            if self.cancels.pop(op.id):
                order = self.orders[body.order_id]  # type: ignore[union-attr]
                order.remaining = order.closed
                order.closed = 0
                order.status = PARTIALLY_FILLED if order.filled else OPEN
                order.reason = R_NONE
                self.levels[order.side][order.price].live += 1
            return
        order = self.orders.pop(op.id)
        if order.remaining:  # the op's last step rested its order at the back of a level
            levels = self.levels[order.side]
            level = levels[order.price]
            level.pop()
            level.live -= 1
            if not level.live:  # live levels have a live order: this one made the level
                del levels[order.price]
                self._remove_price(order.side, order.price)
        if len(self.tape) > start:
            self._undo_records(start)

    def _undo_records(self, start: int) -> None:
        """Undo the tape's records from its end back to ``start``, and drop them."""
        levels, fills = self.levels, self.fills
        journal = self.tape
        i = len(journal)
        while i > start:
            code = journal[i - 1]
            if code == _J_FILL:  # the maker kept resting: only its quantities change back
                maker, quantity = journal[i - 3], journal[i - 2]
                i -= 3
                maker.remaining += quantity
                maker.filled -= quantity
                maker.status = PARTIALLY_FILLED if maker.filled else OPEN
                fills.pop()
                continue
            if code == _J_PUT_LEVEL:
                level = journal[i - 2]
                i -= 2
                levels[level.side][level.price] = level
                self._add_price(level.side, level.price)
                continue
            # The rest took the maker off the front of its level: put it back there.
            if code == _J_FILL_POP:
                maker, quantity = journal[i - 3], journal[i - 2]
                i -= 3
                maker.remaining = quantity
                maker.filled -= quantity
                maker.status = PARTIALLY_FILLED if maker.filled else OPEN
                fills.pop()
            elif code == _J_SELF_TRADE:
                maker = journal[i - 2]
                i -= 2
                maker.remaining = maker.closed
                maker.closed = 0
                maker.status = PARTIALLY_FILLED if maker.filled else OPEN
                maker.reason = R_NONE
            elif code == _J_DEAD_POP:  # it stays dead: not counted live
                maker = journal[i - 2]
                i -= 2
                levels[maker.side][maker.price].appendleft(maker)
                continue
            else:  # pragma: no cover - journal entries are only written above
                raise AssertionError(f"unknown journal code {code!r}")
            level = levels[maker.side][maker.price]
            level.appendleft(maker)
            level.live += 1
        del journal[start:]

    # -- views -------------------------------------------------------------------------------

    def side_levels(self, side: int, depth: int | None = None) -> list[tuple[int, list[_Order]]]:
        """The best ``depth`` levels of one side (all by default), best first, with their live
        orders in time priority."""
        prices = self.prices[side]
        count = len(prices) if depth is None else min(depth, len(prices))
        levels = self.levels[side]
        picked = [prices[-1 - i] for i in range(count)] if side == _BID else prices[:count]
        return [(price, levels[price].orders()) for price in picked]

    def fill_views(self, start: int = 0) -> tuple[Fill, ...]:
        """The fills from ``start`` on, as ``Fill``s (side and authors read off the orders)."""
        orders = self.orders
        views = []
        for taker_id, maker_id, price, quantity in self.fills[start:]:
            taker = orders[taker_id]
            views.append(
                Fill(
                    taker_id,
                    maker_id,
                    price,
                    quantity,
                    "buy" if taker.side == _BID else "sell",
                    taker.author,
                    orders[maker_id].author,
                )
            )
        return tuple(views)
