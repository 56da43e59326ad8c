"""Read-only views of derived state, and its canonical digest."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final, NamedTuple

import cbor2

from ._engine import REASONS, STATUSES, Engine, Fill, OrderRow
from ._ops import OrderBody

__all__ = [
    "Book",
    "Fill",
    "Level",
    "OrderState",
    "RestingOrder",
    "book_view",
    "order_state",
    "state_digest",
    "witnessed_digest",
]

_STATE_DOMAIN: Final = "crdtbook/state/v1"
_WITNESSED_STATE_DOMAIN: Final = "crdtbook/state/v2"


class RestingOrder(NamedTuple):
    order_id: bytes
    remaining: int


class Level(NamedTuple):
    """A price level: ``price`` in ticks, ``quantity`` the sum of its orders' remaining lots."""

    price: int
    quantity: int
    orders: tuple[RestingOrder, ...]


class Book(NamedTuple):
    """Both sides, best level first."""

    bids: tuple[Level, ...]
    asks: tuple[Level, ...]

    @property
    def best_bid(self) -> int | None:
        return self.bids[0].price if self.bids else None

    @property
    def best_ask(self) -> int | None:
        return self.asks[0].price if self.asks else None


class OrderState(NamedTuple):
    """An order as derived now. ``quantity == filled + remaining + closed`` always holds.

    ``status`` is one of open, partially_filled, filled, cancelled, expired, rejected; ``reason``
    is None or one of cancelled, ioc_remainder, fok_unfillable, post_only_would_take, self_trade.
    """

    id: bytes
    author: bytes
    side: str
    price: int
    quantity: int
    remaining: int
    filled: int
    closed: int
    status: str
    reason: str | None
    tif: str
    tag: str | None
    lamport: int
    #: This state is final: no valid op can ever change it (a witnessed market's order that
    #: ended at or below the finality frontier). Always False in a market without witnesses.
    final: bool = False


def order_state(row: OrderRow, final: bool = False) -> OrderState:
    op = row.op
    body: OrderBody = op.body  # type: ignore[assignment]
    return OrderState(
        op.id,
        op.author,
        "buy" if row.side == 0 else "sell",
        row.price,
        body.quantity,
        row.remaining,
        row.filled,
        row.closed,
        STATUSES[row.status],
        REASONS[row.reason],
        body.tif,
        body.tag,
        op.lamport,
        final,
    )


def book_view(engine: Engine, depth: int | None = None) -> Book:
    sides = []
    for side in (0, 1):
        levels = []
        for price, orders in engine.side_levels(side, depth):
            resting = tuple(RestingOrder(order_id, remaining) for order_id, remaining in orders)
            levels.append(Level(price, sum(remaining for _, remaining in orders), resting))
        sides.append(tuple(levels))
    return Book(sides[0], sides[1])


def state_digest(market_id: bytes, engine: Engine, frontier: int | None = None) -> bytes:
    """SHA-256 of the canonical CBOR encoding of the whole derived state (specs: "Digest").
    A witnessed market's state (``frontier`` given) also covers its finality frontier."""

    def side(levels: Iterable[Level]) -> list[object]:
        return [[lv.price, [[o.order_id, o.remaining] for o in lv.orders]] for lv in levels]

    book = book_view(engine)
    orders = []
    for order_id, number in sorted(engine.orders.items()):
        row = engine.row(number)
        orders.append([order_id, row.status, row.remaining, row.filled, row.closed, row.reason])
    fills = [list(fill) for fill in engine.fills]  # taker, maker, price, quantity
    bids, asks = side(book.bids), side(book.asks)
    state: list[object] = [_STATE_DOMAIN, market_id, bids, asks, fills, orders]
    if frontier is not None:
        state[0] = _WITNESSED_STATE_DOMAIN
        state.append(frontier)
    return hashlib.sha256(cbor2.dumps(state, canonical=True)).digest()


def witnessed_digest(
    market_id: bytes,
    engine: Engine,
    final_engine: Engine,
    frontier: int,
    final_ops: int,
    final_chain: bytes,
) -> bytes:
    """A witnessed market's digest (specs/finality.md, "Digest"): the final prefix by its count
    and running hash (``final_chain``), the rest as state: the book, the fills after the final
    ones, and every order except those finished within the final prefix. It needs nothing that
    compaction drops, so a compacted replica and one that kept everything agree on it.

    ``engine`` and ``final_engine`` number orders alike (the final one processed a prefix of
    what the main one did, from the same starting state)."""

    def side(levels: Iterable[Level]) -> list[object]:
        return [[lv.price, [[o.order_id, o.remaining] for o in lv.orders]] for lv in levels]

    book = book_view(engine)
    final_states = final_engine.states
    settled = len(final_states)
    orders = []
    for order_id, number in sorted(engine.orders.items()):
        if number < settled and final_states[number] > 1:  # finished in the final prefix
            continue
        row = engine.row(number)
        orders.append([order_id, row.status, row.remaining, row.filled, row.closed, row.reason])
    fills = [list(fill) for fill in engine.fills[len(final_engine.fills) :]]
    state: list[object] = [
        _WITNESSED_STATE_DOMAIN,
        market_id,
        side(book.bids),
        side(book.asks),
        fills,
        orders,
        frontier,
        final_ops,
        final_chain,
    ]
    return hashlib.sha256(cbor2.dumps(state, canonical=True)).digest()

