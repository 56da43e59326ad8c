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
- every order ever seen, numbered in the order it was processed (which is the total order):
  ``orders: dict[order id, number]``, and its state in columns indexed by that number: ``ids``,
  ``ops`` and ``authors`` lists, ``remaining`` and ``filled`` int64 arrays, and ``states``, a
  byte array of ``status | reason << 3`` (a live order has no reason, so ``state <=
  PARTIALLY_FILLED`` exactly when it is live). Side, price and quantity are the op's; the
  closed quantity is what neither filled nor rests. Levels hold order numbers. Undo of an
  order op pops the last row: ops are undone last first, so the columns are stacks.
- ``fills: list[tuple]`` in execution order, as plain ``(taker, maker, price, quantity)``
  tuples: the cyclic GC stops tracking a tuple of bytes and ints after its first look at it,
  where it would track a ``Fill`` (a tuple subclass) for ever. ``fill_views`` builds ``Fill``s.

Why it is shaped like this: the in-order path runs once per op on every node, and the cyclic
GC's cost grows with the number of container objects each op leaves behind, so an op leaves as
few as it can: none but a plain tuple per fill (which the GC stops tracking at its first look).
An order is a row in the columns, not an object (an object per order was 170k tracked objects
in a 200k-op log, and the collections they caused were a fifth of apply time); undo records go
on the shared tape rather than into a list per op.

Matching rules (specs/protocol.md, "Matching"):
  trades happen at the resting order's price; partial fills; a GTC remainder rests; an IOC
  remainder expires; a FOK order fills completely or not at all; a POST_ONLY order that would
  take is rejected; a cancel removes the rest of its order (a finished order: no-op).
  Self-trade prevention, "expire maker": when a taker meets a resting order of its own author, the
  resting order expires (reason ``self_trade``) and the taker goes on matching; a FOK order counts
  only other authors' liquidity when it decides whether it can fill.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Container
from typing import Any, Final, NamedTuple

from sortedcontainers import SortedList

from ._ops import (
    BUY,
    EXPIRE_BOTH,
    EXPIRE_MAKER,
    EXPIRE_TAKER,
    FOK,
    IOC,
    POST_ONLY,
    CancelAllBody,
    CancelBody,
    Op,
    OrderBody,
)

__all__ = [
    "CANCELLED",
    "COMPACTED",
    "EXPIRED",
    "FILLED",
    "OPEN",
    "PARTIALLY_FILLED",
    "REASONS",
    "REJECTED",
    "STATUSES",
    "Engine",
    "Fill",
    "OrderRow",
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
    "duplicate_client_id",
)
R_NONE, R_CANCELLED, R_IOC, R_FOK, R_POST_ONLY, R_SELF_TRADE, R_DUPLICATE = range(7)

_BID, _ASK = 0, 1
#: A client order id held by an order that compaction took out of memory (``Engine.compacted``).
COMPACTED: Final = -1

# States (status | reason << 3) of orders closed with a reason.
_IOC_EXPIRED: Final = EXPIRED | R_IOC << 3
_FOK_EXPIRED: Final = EXPIRED | R_FOK << 3
_POST_ONLY_REJECTED: Final = REJECTED | R_POST_ONLY << 3
_SELF_TRADE_EXPIRED: Final = EXPIRED | R_SELF_TRADE << 3
_CANCELLED: Final = CANCELLED | R_CANCELLED << 3
#: Version 2: a later order of an author that reuses one of its client order ids (tags).
_DUPLICATE_REJECTED: Final = REJECTED | R_DUPLICATE << 3

# Undo records on the tape: each record's arguments, then its code, read backwards by undo. A
# maker's state before a record is implied by its state after it (a live order has closed == 0
# and reason R_NONE; its status is OPEN or PARTIALLY_FILLED as its filled quantity says), so a
# record holds only what cannot be read back.
_J_FILL: Final = 1  # maker, quantity: a fill that left the maker resting
_J_FILL_POP: Final = 2  # maker, quantity: a fill that completed the maker (taken off its level)
_J_SELF_TRADE: Final = 3  # maker: expired by self-trade prevention (taken off its level)
_J_DEAD_POP: Final = 4  # maker: a cancelled order dropped from the front of its level
_J_PUT_LEVEL: Final = 5  # level: the level was removed when its last live order went
_J_CANCEL_ONE: Final = 6  # order: cancelled by a cancel-all (it stays in its deque, dead)


class Fill(NamedTuple):
    """One trade: ``taker`` and ``maker`` are order ids, ``price`` ticks, ``quantity`` lots."""

    taker: bytes
    maker: bytes
    price: int
    quantity: int
    taker_side: str
    taker_author: bytes
    maker_author: bytes


class OrderRow(NamedTuple):
    """One order's row, as read by the views."""

    op: Op
    side: int
    price: int
    remaining: int
    filled: int
    closed: int
    status: int
    reason: int


class _Level(deque[int]):
    """Order numbers at one price in time priority; dead ones (cancelled) may remain until
    reached. ``live`` counts the others: the level exists while it is positive."""

    __slots__ = ("live", "price", "side")

    def __init__(self, side: int, price: int) -> None:
        super().__init__()
        self.side = side
        self.price = price
        self.live = 0


class Engine:
    """The matched state of one market, fed ops in total order.

    ``client_ids`` (version 2): an order whose tag an earlier order of its author already used
    is rejected (``duplicate_client_id``); ``client_ids`` maps (author, tag) to the order."""

    def __init__(self, client_ids: bool = False) -> None:
        self.orders: dict[bytes, int] = {}  # order id -> order number
        # The order columns (see the module docstring).
        self.ids: list[bytes] = []
        self.ops: list[Op] = []
        self.authors: list[bytes] = []
        self.remaining = array("q")  # resting quantity
        self.filled = array("q")
        self.states = bytearray()  # status | reason << 3
        self.fills: list[tuple[bytes, bytes, int, int]] = []
        #: cancel op id -> True if it removed a rest, False if the order was already finished.
        self.cancels: dict[bytes, bool] = {}
        #: cancel-all op id -> how many resting orders it cancelled (version 2).
        self.cancel_alls: dict[bytes, int] = {}
        #: (author, tag) -> the order that holds that client order id (version 2; else None).
        self.client_ids: dict[tuple[bytes, str], int] | None = {} if client_ids else None
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
        if type(body) is not OrderBody:
            if type(body) is CancelBody:
                self._cancel(op, body)
            elif type(body) is CancelAllBody:
                self._cancel_all(op, body)
            return  # a heartbeat or reconfiguration changes no order
        side = _BID if body.side == BUY else _ASK
        limit = body.price
        quantity = body.quantity
        tif = body.tif
        ident = op.id
        taker = len(self.ids)
        self.orders[ident] = taker
        self.ids.append(ident)
        self.ops.append(op)
        author = op.author
        self.authors.append(author)
        client_ids = self.client_ids
        if client_ids is not None and body.tag is not None:
            held = (author, body.tag)
            if held in client_ids:
                self._close_new(0, _DUPLICATE_REJECTED)
                return
            client_ids[held] = taker
        # Is the best opposing price within the taker's limit?
        if side == _BID:
            best = self.best[_ASK]
            crosses = best is not None and best <= limit
        else:
            best = self.best[_BID]
            crosses = best is not None and best >= limit
        if not crosses:
            if tif == IOC:
                self._close_new(0, _IOC_EXPIRED)
            elif tif == FOK:
                self._close_new(0, _FOK_EXPIRED)
            else:
                self._rest_new(taker, side, limit, 0, quantity)
            return
        if tif == POST_ONLY:
            self._close_new(0, _POST_ONLY_REJECTED)
            return
        stp = body.stp
        if tif == FOK and not self._can_fill(side, limit, author, quantity, stp):
            self._close_new(0, _FOK_EXPIRED)
            return
        left = self._match(ident, side, limit, author, quantity, stp)
        if left < 0:  # stopped at its author's own order (expire_taker, expire_both)
            self._close_new(quantity - ~left, _SELF_TRADE_EXPIRED)
            return
        if left == 0:
            self._close_new(quantity, FILLED)
        elif tif == IOC:
            self._close_new(quantity - left, _IOC_EXPIRED)
        else:  # GTC (FOK was checked to fill completely, POST_ONLY never reaches here)
            self._rest_new(taker, side, limit, quantity - left, left)

    def _close_new(self, filled: int, state: int) -> None:
        """Fill in the row of the order just added, finished on arrival."""
        self.remaining.append(0)
        self.filled.append(filled)
        self.states.append(state)

    def _rest_new(self, taker: int, side: int, price: int, filled: int, quantity: int) -> None:
        """Fill in the row of the order just added, which rests ``quantity``: the last thing
        an op does; undo sees it on the order (remaining > 0) and reverses it."""
        self.remaining.append(quantity)
        self.filled.append(filled)
        self.states.append(PARTIALLY_FILLED if filled else OPEN)
        levels = self.levels[side]
        level = levels.get(price)
        if level is None:
            level = levels[price] = _Level(side, price)
            self._add_price(side, price)
        level.append(taker)
        level.live += 1

    def _can_fill(self, side: int, limit: int, author: bytes, need: int, stp: str) -> bool:
        """FOK: is there enough liquidity from other authors within the limit? With
        expire_taker or expire_both, only the liquidity ahead of its author's first own order
        counts: the taker would stop there."""
        opp = 1 - side
        levels = self.levels[opp]
        prices = self.prices[opp]
        states, authors, remaining = self.states, self.authors, self.remaining
        walk = prices if opp == _ASK else reversed(prices)
        for price in walk:
            if (price > limit) if opp == _ASK else (price < limit):
                break
            for maker in levels[price]:
                if states[maker] <= PARTIALLY_FILLED:
                    if authors[maker] != author:
                        need -= remaining[maker]
                        if need <= 0:
                            return True
                    elif stp != EXPIRE_MAKER:
                        return False
        return False

    def _match(
        self, taker_id: bytes, side: int, limit: int, author: bytes, left: int, stp: str
    ) -> int:
        """Take liquidity, best level first; returns the taker's unfilled quantity, or its
        bitwise complement (negative) when self-trade prevention stopped the taker."""
        opp = 1 - side
        levels = self.levels[opp]
        ask = opp == _ASK
        states, authors, remaining = self.states, self.authors, self.remaining
        filled = self.filled
        add_fill = self.fills.append
        record = self.tape.extend
        best = self.best
        while left:
            price = best[opp]
            if price is None or ((price > limit) if ask else (price < limit)):
                break
            level = levels[price]
            while True:  # this level, front first, while it has live orders and we have need
                maker = level[0]
                if states[maker] > PARTIALLY_FILLED:  # cancelled where it stood: drop it now
                    level.popleft()
                    record((maker, _J_DEAD_POP))
                    continue
                if authors[maker] == author:
                    # Self-trade prevention: expire the resting order and keep matching
                    # (expire_maker); or stop the taker, expiring the maker too (expire_both)
                    # or not (expire_taker).
                    if stp == EXPIRE_TAKER:
                        return ~left
                    remaining[maker] = 0  # the rest is closed
                    states[maker] = _SELF_TRADE_EXPIRED
                    level.popleft()
                    record((maker, _J_SELF_TRADE))
                    if stp == EXPIRE_BOTH:
                        level.live -= 1
                        if not level.live:
                            del levels[price]
                            self._remove_price(opp, price)
                            record((level, _J_PUT_LEVEL))
                        return ~left
                else:
                    available = remaining[maker]
                    if left < available:
                        remaining[maker] = available - left
                        filled[maker] += left
                        states[maker] = PARTIALLY_FILLED
                        add_fill((taker_id, self.ids[maker], price, left))
                        record((maker, left, _J_FILL))
                        return 0  # the maker rests on: so does the level
                    remaining[maker] = 0
                    filled[maker] += available
                    states[maker] = FILLED
                    level.popleft()
                    add_fill((taker_id, self.ids[maker], price, available))
                    record((maker, available, _J_FILL_POP))
                    left -= available
                level.live -= 1
                if not level.live:
                    del levels[price]
                    self._remove_price(opp, price)
                    record((level, _J_PUT_LEVEL))
                    break
                if not left:
                    return 0
        return left

    def _cancel(self, op: Op, body: CancelBody) -> None:
        # Validity guarantees the order exists and precedes the cancel; one not here was
        # compacted out of memory (``compacted``), which only ever happens to finished orders.
        order = self.orders.get(body.order_id)
        effective = order is not None and self.states[order] <= PARTIALLY_FILLED
        self.cancels[op.id] = effective
        if order is None or not effective:
            return
        self.remaining[order] = 0  # the rest is closed
        self.states[order] = _CANCELLED
        side, price = self._place(order)
        level = self.levels[side][price]
        level.live -= 1
        if not level.live:
            del self.levels[side][price]
            self._remove_price(side, price)
            self.tape += (level, _J_PUT_LEVEL)

    def _cancel_all(self, op: Op, body: CancelAllBody) -> None:
        """Cancel every resting order of the op's author (whose tag starts with the prefix, if
        one is given). O(resting orders): it walks the book, not the history."""
        author, prefix = op.author, body.prefix
        states, authors, ops, tape = self.states, self.authors, self.ops, self.tape
        count = 0
        for side in (_BID, _ASK):
            levels = self.levels[side]
            for price in list(self.prices[side]):
                level = levels[price]
                for order in level:
                    if states[order] > PARTIALLY_FILLED or authors[order] != author:
                        continue
                    if prefix is not None:
                        tag = ops[order].body.tag  # type: ignore[union-attr]
                        if tag is None or not tag.startswith(prefix):
                            continue
                    self.remaining[order] = 0  # the rest is closed
                    states[order] = _CANCELLED
                    tape += (order, _J_CANCEL_ONE)
                    level.live -= 1
                    count += 1
                if not level.live:
                    del levels[price]
                    self._remove_price(side, price)
                    tape += (level, _J_PUT_LEVEL)
        self.cancel_alls[op.id] = count

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
            if type(body) is CancelAllBody:
                self._undo_records(start)
                del self.cancel_alls[op.id]
                return
            if type(body) is not CancelBody:
                return  # a heartbeat or reconfiguration did nothing
            if len(self.tape) > start:
                self._undo_records(start)
            if self.cancels.pop(op.id):
                order = self.orders[body.order_id]
                self._revive(order)
                side, price = self._place(order)
                self.levels[side][price].live += 1
            return
        del self.orders[op.id]  # the last order added: pop its row
        client_ids = self.client_ids
        if client_ids is not None and body.tag is not None:
            held = (op.author, body.tag)
            if client_ids.get(held) == len(self.ids) - 1:
                del client_ids[held]
        self.ids.pop()
        self.ops.pop()
        self.authors.pop()
        rested = self.remaining.pop()
        self.filled.pop()
        self.states.pop()
        if rested:
            side = _BID if body.side == BUY else _ASK
            price = body.price  # the op's last step rested its order at the back of a level
            levels = self.levels[side]
            level = levels[price]
            level.pop()
            level.live -= 1
            if not level.live:  # live levels have a live order: this one made the level
                del levels[price]
                self._remove_price(side, price)
        if len(self.tape) > start:
            self._undo_records(start)

    def _undo_records(self, start: int) -> None:
        """Undo the tape's records from its end back to ``start``, and drop them."""
        levels, fills, tape = self.levels, self.fills, self.tape
        remaining, filled, states = self.remaining, self.filled, self.states
        i = len(tape)
        while i > start:
            code = tape[i - 1]
            if code == _J_FILL:  # the maker kept resting: only its quantities change back
                maker, quantity = tape[i - 3], tape[i - 2]
                i -= 3
                remaining[maker] += quantity
                filled[maker] -= quantity
                states[maker] = PARTIALLY_FILLED if filled[maker] else OPEN
                fills.pop()
                continue
            if code == _J_PUT_LEVEL:
                level = tape[i - 2]
                i -= 2
                levels[level.side][level.price] = level
                self._add_price(level.side, level.price)
                continue
            # The rest took the maker off the front of its level: put it back there.
            if code == _J_FILL_POP:
                maker, quantity = tape[i - 3], tape[i - 2]
                i -= 3
                remaining[maker] = quantity
                filled[maker] -= quantity
                states[maker] = PARTIALLY_FILLED if filled[maker] else OPEN
                fills.pop()
            elif code == _J_SELF_TRADE:
                maker = tape[i - 2]
                i -= 2
                self._revive(maker)
            elif code == _J_DEAD_POP:  # it stays dead: not counted live
                maker = tape[i - 2]
                i -= 2
                side, price = self._place(maker)
                levels[side][price].appendleft(maker)
                continue
            elif code == _J_CANCEL_ONE:  # it never left its deque: live again where it stands
                order = tape[i - 2]
                i -= 2
                self._revive(order)
                side, price = self._place(order)
                levels[side][price].live += 1
                continue
            else:  # pragma: no cover - tape records are only written above
                raise AssertionError(f"unknown undo record {code!r}")
            side, price = self._place(maker)
            level = levels[side][price]
            level.appendleft(maker)
            level.live += 1
        del tape[start:]

    # -- compaction (witnessed markets) ------------------------------------------------------

    def compacted(self) -> Engine:
        """A new engine with the same book and nothing else: the live (resting) orders only,
        renumbered in their order (so two engines with the same state compact to the same
        numbers), no fills, no cancel records, no undo tape. Client order ids stay held for
        ever (version 2 never lets an author reuse one): a finished order's id maps to
        ``COMPACTED``. Costs O(orders) once; what stays is O(resting orders)."""
        new = Engine(client_ids=self.client_ids is not None)
        states, remaining, filled = self.states, self.remaining, self.filled
        renumber: dict[int, int] = {}
        for number in range(len(self.ids)):
            if states[number] <= PARTIALLY_FILLED and remaining[number] > 0:
                renumber[number] = len(new.ids)
                new.orders[self.ids[number]] = len(new.ids)
                new.ids.append(self.ids[number])
                new.ops.append(self.ops[number])
                new.authors.append(self.authors[number])
                new.remaining.append(remaining[number])
                new.filled.append(filled[number])
                new.states.append(states[number])
        for side in (_BID, _ASK):
            for price, level in self.levels[side].items():
                kept = _Level(side, price)
                kept.extend(renumber[o] for o in level if o in renumber)
                kept.live = len(kept)
                if kept.live:
                    new.levels[side][price] = kept
                    new._add_price(side, price)
        if self.client_ids is not None and new.client_ids is not None:
            new.client_ids.update(
                (held, renumber.get(number, COMPACTED)) for held, number in self.client_ids.items()
            )
        return new

    def finished(self, rows: int, resting: Container[bytes]) -> list[int]:
        """The numbers of the first ``rows`` orders that ended (filled, cancelled, expired,
        rejected) and are not in ``resting`` (the ids of this engine compacted: ``compacted``):
        what a compaction takes out of memory for good (``Replica.compact``; a joined node's
        past, crdtbook._derive)."""
        states, ids = self.states, self.ids
        return [n for n in range(rows) if states[n] > PARTIALLY_FILLED and ids[n] not in resting]

    # -- views -------------------------------------------------------------------------------

    def _place(self, order: int) -> tuple[int, int]:
        """Order number ``order``'s side and price."""
        body: OrderBody = self.ops[order].body  # type: ignore[assignment]
        return (_BID if body.side == BUY else _ASK), body.price

    def _revive(self, order: int) -> None:
        """Undo closing a live order (by a cancel or self-trade prevention): rest what was
        closed."""
        body: OrderBody = self.ops[order].body  # type: ignore[assignment]
        filled = self.filled[order]
        self.remaining[order] = body.quantity - filled
        self.states[order] = PARTIALLY_FILLED if filled else OPEN

    def row(self, order: int) -> OrderRow:
        """Order number ``order``'s row."""
        op = self.ops[order]
        body: OrderBody = op.body  # type: ignore[assignment]
        state = self.states[order]
        remaining, filled = self.remaining[order], self.filled[order]
        return OrderRow(
            op,
            _BID if body.side == BUY else _ASK,
            body.price,
            remaining,
            filled,
            body.quantity - filled - remaining,
            state & 7,
            state >> 3,
        )

    def side_levels(
        self, side: int, depth: int | None = None
    ) -> list[tuple[int, list[tuple[bytes, int]]]]:
        """The best ``depth`` levels of one side (all by default), best first, with their live
        orders in time priority as (order id, remaining)."""
        prices = self.prices[side]
        count = len(prices) if depth is None else min(depth, len(prices))
        levels = self.levels[side]
        picked = [prices[-1 - i] for i in range(count)] if side == _BID else prices[:count]
        ids, states, remaining = self.ids, self.states, self.remaining
        return [
            (
                price,
                [(ids[o], remaining[o]) for o in levels[price] if states[o] <= PARTIALLY_FILLED],
            )
            for price in picked
        ]

    def fill_view(self, index: int) -> Fill:
        """Fill number ``index`` as a ``Fill`` (what ``fill_views`` builds for each)."""
        taker_id, maker_id, price, quantity = self.fills[index]
        orders, authors = self.orders, self.authors
        taker = orders[taker_id]
        side = self.ops[taker].body.side  # type: ignore[union-attr]
        return Fill(taker_id, maker_id, price, quantity, side, authors[taker],
                    authors[orders[maker_id]])

    def fill_views(self, start: int = 0) -> tuple[Fill, ...]:
        """The fills from ``start`` on, as ``Fill``s (side and authors read off the orders)."""
        orders, authors = self.orders, self.authors
        views = []
        for taker_id, maker_id, price, quantity in self.fills[start:]:
            taker = orders[taker_id]
            views.append(
                Fill(
                    taker_id,
                    maker_id,
                    price,
                    quantity,
                    self.ops[taker].body.side,  # type: ignore[union-attr]
                    authors[taker],
                    authors[orders[maker_id]],
                )
            )
        return tuple(views)
