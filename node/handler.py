"""The control API's methods (specs/control-api.md) on top of the node service."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from crdtbook import BadCancel, Fill, InvalidOp, OffLot, OffTick, OrderState, __version__

from .control import optional_param, require_param
from .control_errors import (
    AMBIGUOUS,
    BAD_REQUEST,
    INVALID_OP,
    NOT_FOUND,
    NOT_OWNER,
    OFF_LOT,
    OFF_TICK,
    UNKNOWN_MARKET,
    UNKNOWN_METHOD,
    ControlError,
)
from .service import MarketState, NodeService

__all__ = ["ControlAdapter"]

_TIFS = ("gtc", "ioc", "fok", "post_only")
#: At most ~20 watch events a second per client: changes in between are coalesced into one
#: event (with all their op ids), so a busy market does not hash its state on every op.
WATCH_MIN_INTERVAL = 0.05


def order_json(ms: MarketState, order: OrderState, me: bytes) -> dict[str, Any]:
    m = ms.market
    return {
        "id": order.id.hex(),
        "market": m.name,
        "author": order.author.hex(),
        "side": order.side,
        "price": m.ticks_to_price(order.price),
        "price_ticks": order.price,
        "quantity": m.lots_to_qty(order.quantity),
        "quantity_lots": order.quantity,
        "remaining": m.lots_to_qty(order.remaining),
        "remaining_lots": order.remaining,
        "filled": m.lots_to_qty(order.filled),
        "filled_lots": order.filled,
        "tif": order.tif,
        "status": order.status,
        "reason": order.reason,
        "tag": order.tag,
        "mine": order.author == me,
        "lamport": order.lamport,
    }


def fill_json(ms: MarketState, index: int, fill: Fill) -> dict[str, Any]:
    m = ms.market
    return {
        "index": index,
        "market": m.name,
        "taker": fill.taker.hex(),
        "maker": fill.maker.hex(),
        "taker_side": fill.taker_side,
        "price": m.ticks_to_price(fill.price),
        "price_ticks": fill.price,
        "quantity": m.lots_to_qty(fill.quantity),
        "quantity_lots": fill.quantity,
        "taker_author": fill.taker_author.hex(),
        "maker_author": fill.maker_author.hex(),
    }


class ControlAdapter:
    """Implements ``node.control.ControlHandler`` for a running node."""

    def __init__(
        self,
        service: NodeService,
        network_status: Callable[[], dict[str, Any]],
        block: Callable[[str | None, float], list[str]] | None = None,
    ) -> None:
        self.service = service
        self._network_status = network_status
        self._block_fn = block
        self._methods: dict[str, Callable[[dict[str, Any]], Any]] = {
            "status": self._status,
            "markets": self._markets,
            "submit": self._submit,
            "cancel": self._cancel,
            "book": self._book,
            "fills": self._fills,
            "order": self._order,
            "orders": self._orders,
            "block": self._block,
        }

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        fn = self._methods.get(method)
        if fn is None:
            known = ", ".join(sorted([*self._methods, "watch"]))
            raise ControlError(UNKNOWN_METHOD, f"unknown method {method!r}; known: {known}")
        result = fn(params)
        if hasattr(result, "__await__"):
            result = await result
        return result

    # -- helpers -----------------------------------------------------------------------------

    def _market(self, params: dict[str, Any]) -> MarketState:
        name = optional_param(params, "market", str, None)
        markets = self.service.by_name
        if name is None:
            if len(markets) == 1:
                return next(iter(markets.values()))
            raise ControlError(
                BAD_REQUEST, f"this node follows several markets; pick one of {', '.join(markets)}"
            )
        ms = markets.get(name)
        if ms is None:
            raise ControlError(
                UNKNOWN_MARKET,
                f"this node does not follow {name!r}; it follows {', '.join(markets)} "
                f"(start it with --market {name})",
            )
        return ms

    def _resolve_order(self, params: dict[str, Any]) -> tuple[MarketState, OrderState]:
        text = require_param(params, "order_id", str).strip().lower()
        if not text or any(c not in "0123456789abcdef" for c in text):
            raise ControlError(BAD_REQUEST, f"order id {text!r} is not hex")
        candidates = (
            [self._market(params)] if params.get("market") else list(self.service.markets.values())
        )
        matches: list[tuple[MarketState, OrderState]] = []
        for ms in candidates:
            if len(text) == 64:
                order = ms.replica.order(bytes.fromhex(text))
                if order is not None:
                    matches.append((ms, order))
                continue
            matches.extend((ms, o) for o in ms.replica.orders() if o.id.hex().startswith(text))
        if not matches:
            raise ControlError(NOT_FOUND, f"no order with id {text}")
        if len(matches) > 1:
            raise ControlError(
                AMBIGUOUS, f"id prefix {text} matches {len(matches)} orders; give more digits"
            )
        return matches[0]

    # -- methods -----------------------------------------------------------------------------

    def _status(self, params: dict[str, Any]) -> dict[str, Any]:
        net = self._network_status()
        # The digest hashes the whole derived state (tens of ms on a large book): a script
        # polling status can leave it out.
        with_digest = optional_param(params, "digest", bool, True)
        return {
            **net,
            "author": self.service.identity.public_key.hex(),
            "markets": [
                self._market_status(ms, with_digest) for ms in self.service.markets.values()
            ],
            "version": __version__,
            "uptime": time.time() - self.service.started,
            "pid": os.getpid(),
        }

    def _market_status(self, ms: MarketState, with_digest: bool = True) -> dict[str, Any]:
        r = ms.replica
        return {
            "name": ms.market.name,
            "id": ms.market.id.hex(),
            "tick": ms.market.tick,
            "lot": ms.market.lot,
            "ops": len(r),
            "pending": r.pending_count,
            "missing": len(r.missing()),
            "heads": [h.hex() for h in r.heads()],
            "digest": ms.digest().hex() if with_digest else None,
            "last_sync": ms.last_sync,
            "orders": r.order_count,
            "fills": r.fill_count,
            "refused": ms.refused,
        }

    def _markets(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "name": m.market.name,
                "id": m.market.id.hex(),
                "tick": m.market.tick,
                "lot": m.market.lot,
            }
            for m in self.service.markets.values()
        ]

    async def _submit(self, params: dict[str, Any]) -> dict[str, Any]:
        ms = self._market(params)
        side = require_param(params, "side", str, choices=("buy", "sell"))
        tif = optional_param(params, "tif", str, "gtc").replace("-", "_").lower()
        if tif not in _TIFS:
            raise ControlError(BAD_REQUEST, f"tif must be one of {', '.join(_TIFS)}, not {tif!r}")
        tag = optional_param(params, "tag", str, None)
        price_text = str(require_param(params, "price", str))
        qty_text = str(require_param(params, "quantity", str))
        try:
            price = ms.market.price_to_ticks(price_text)
        except OffTick as exc:
            raise ControlError(OFF_TICK, str(exc)) from None
        try:
            quantity = ms.market.qty_to_lots(qty_text)
        except OffLot as exc:
            raise ControlError(OFF_LOT, str(exc)) from None
        before = ms.replica.fill_count
        try:
            op = await self.service.submit(ms, side, price, quantity, tif, tag)
        except (InvalidOp, ValueError) as exc:
            raise ControlError(INVALID_OP, str(exc)) from None
        order = ms.replica.order(op.id)
        assert order is not None
        me = self.service.identity.public_key
        fills = [
            fill_json(ms, before + i, f)
            for i, f in enumerate(ms.replica.fills(before))
            if f.taker == op.id
        ]
        return {"order": order_json(ms, order, me), "fills": fills}

    async def _cancel(self, params: dict[str, Any]) -> dict[str, Any]:
        ms, order = self._resolve_order(params)
        me = self.service.identity.public_key
        if order.author != me:
            raise ControlError(
                NOT_OWNER, "this order was signed by another key; only its author can cancel it"
            )
        try:
            op = await self.service.cancel(ms, order.id)
        except BadCancel as exc:
            raise ControlError(INVALID_OP, str(exc)) from None
        now = ms.replica.order(order.id)
        assert now is not None
        return {
            "order": order_json(ms, now, me),
            "cancel_id": op.id.hex(),
            "effective": bool(ms.replica.cancel_effective(op.id)),
        }

    def _book(self, params: dict[str, Any]) -> dict[str, Any]:
        ms = self._market(params)
        depth = optional_param(params, "depth", int, 10)
        if depth < 1:
            raise ControlError(BAD_REQUEST, "depth must be at least 1")
        book = ms.replica.book(depth)
        m = ms.market

        def levels(side: tuple[Any, ...]) -> list[dict[str, Any]]:
            return [
                {
                    "price": m.ticks_to_price(lv.price),
                    "price_ticks": lv.price,
                    "quantity": m.lots_to_qty(lv.quantity),
                    "quantity_lots": lv.quantity,
                    "orders": len(lv.orders),
                }
                for lv in side
            ]

        bid, ask = book.best_bid, book.best_ask
        both = bid is not None and ask is not None
        return {
            "market": m.name,
            "bids": levels(book.bids),
            "asks": levels(book.asks),
            "best_bid": None if bid is None else m.ticks_to_price(bid),
            "best_ask": None if ask is None else m.ticks_to_price(ask),
            "spread": m.ticks_to_price(ask - bid) if both else None,  # type: ignore[operator]
            "mid": _mid(m.ticks_to_price(bid), m.ticks_to_price(ask)) if both else None,  # type: ignore[arg-type]
            "digest": ms.digest().hex(),
        }

    def _fills(self, params: dict[str, Any]) -> dict[str, Any]:
        ms = self._market(params)
        limit = optional_param(params, "limit", int, 100)
        if limit < 1:
            raise ControlError(BAD_REQUEST, "limit must be at least 1")
        start = max(0, ms.replica.fill_count - limit)
        fills = [fill_json(ms, start + i, f) for i, f in enumerate(ms.replica.fills(start))]
        return {"market": ms.market.name, "fills": fills}

    def _order(self, params: dict[str, Any]) -> dict[str, Any]:
        ms, order = self._resolve_order(params)
        return order_json(ms, order, self.service.identity.public_key)

    def _orders(self, params: dict[str, Any]) -> dict[str, Any]:
        ms = self._market(params)
        me = self.service.identity.public_key
        every = optional_param(params, "all", bool, False)
        orders = ms.replica.orders(None if every else me)
        return {"market": ms.market.name, "orders": [order_json(ms, o, me) for o in orders]}

    def _block(self, params: dict[str, Any]) -> dict[str, Any]:
        """Cut this node off from one peer (or every connected peer) for a while."""
        peer = optional_param(params, "peer_id", str, None)
        seconds = require_param(params, "seconds", float)
        if not 0 < seconds <= 24 * 3600:
            raise ControlError(BAD_REQUEST, "seconds must be in (0, 86400]")
        if self._block_fn is None:
            raise ControlError(BAD_REQUEST, "this node cannot block peers")
        return {"blocked": self._block_fn(peer, seconds), "seconds": seconds}

    async def watch(self, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        ms = self._market(params)
        with_digest = optional_param(params, "digest", bool, True)
        interval = optional_param(params, "interval", float, WATCH_MIN_INTERVAL)
        interval = min(max(interval, 0.005), 10.0)
        yield {"watching": ms.market.name}
        seen = ms.replica.fill_count
        async for applied, dropped in self.service.changes(ms, interval):
            count = ms.replica.fill_count
            start = min(seen, count)  # a late op may have rewound fills
            fills = [fill_json(ms, start + i, f) for i, f in enumerate(ms.replica.fills(start))]
            seen = count
            yield {
                "event": "update",
                "market": ms.market.name,
                "ops": len(ms.replica),
                "digest": ms.digest().hex() if with_digest else None,
                "fills": fills,
                "applied": [ident.hex() for ident in applied],
                "dropped": dropped,
            }


def _mid(bid: str, ask: str) -> str:
    from decimal import Decimal

    return str((Decimal(bid) + Decimal(ask)) / 2)
