"""The node's HTTP and WebSocket API and web view (specs/http-api.md): starlette on hypercorn's
trio worker, in the node's own trio run.

Every request is answered by the control API's own logic (:class:`ControlAdapter`, in process),
its results respelled in ccxt's shapes (:mod:`.http_shapes`): the HTTP API can do nothing the
control socket cannot, and says the same. What is HTTP's own: the bearer token on trading and
private requests (:mod:`.http_auth`), the book stream's sequence numbers (:mod:`.http_feeds`),
coalescing pushes, and serving the web view's files from ``node/web/``.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from .control_errors import (
    AMBIGUOUS,
    BAD_REQUEST,
    DUPLICATE_CLIENT_ID,
    EMPTY_BOOK,
    INTERNAL,
    INVALID_OP,
    KEY_EQUIVOCATED,
    NOT_FOUND,
    NOT_OWNER,
    NOT_READY,
    NOT_WITNESS,
    NOT_WITNESSED,
    OFF_LOT,
    OFF_TICK,
    STORE_ERROR,
    STORE_FULL,
    TIMEOUT,
    UNKNOWN_MARKET,
    ControlError,
    unknown_name,
)
from .handler import ControlAdapter, fill_json, order_json
from .http_auth import TOKEN_FILE, check_token, is_loopback, load_or_create_token
from .http_feeds import BOOK_FEED_DEPTH, BookFeed, PrivateWatch
from .http_openapi import NEW_ORDER_FIELDS, openapi_document
from .http_shapes import (
    TIF_FROM_CCXT,
    error_body,
    iso,
    market_shape,
    order_shape,
    trade_id,
    trade_shape,
)
from .service import MarketState

if TYPE_CHECKING:
    from trio_typing import TaskStatus

__all__ = [
    "UNAUTHORIZED",
    "HttpApi",
    "HttpListenError",
    "bind_http",
    "create_app",
    "http_banner",
    "serve_http",
]

logger = logging.getLogger("crdtbook.node.http")

#: HTTP's own error code: a trading or private request without the right bearer token.
UNAUTHORIZED: Final = "unauthorized"
#: The control API's error codes as HTTP statuses (the code itself is in the body).
HTTP_STATUS: Final = {
    BAD_REQUEST: 400,
    OFF_TICK: 400,
    OFF_LOT: 400,
    AMBIGUOUS: 400,
    NOT_WITNESSED: 400,
    UNAUTHORIZED: 401,
    NOT_OWNER: 403,
    NOT_WITNESS: 403,
    NOT_FOUND: 404,
    UNKNOWN_MARKET: 404,
    DUPLICATE_CLIENT_ID: 409,
    KEY_EQUIVOCATED: 409,
    INVALID_OP: 422,
    EMPTY_BOOK: 422,
    INTERNAL: 500,
    NOT_READY: 503,
    STORE_ERROR: 503,
    TIMEOUT: 504,
    STORE_FULL: 507,
}
#: Largest request body read: an order is a few hundred bytes.
MAX_BODY_BYTES: Final = 64 * 1024
#: Largest WebSocket message taken from a client (subscriptions are tiny).
MAX_WS_MESSAGE_BYTES: Final = 64 * 1024
#: WebSocket connections served at once: each may hold subscriptions that cost a little per
#: change, so a node reachable from other machines bounds them (a dashboard or bot needs one).
MAX_WS_CONNECTIONS: Final = 256
#: The close code for a connection refused over that bound (RFC 6455 registry: "Try Again
#: Later").
WS_TRY_AGAIN_LATER: Final = 1013
#: Subscriptions one WebSocket connection may hold (4 channels x a few markets, with room).
MAX_SUBSCRIPTIONS: Final = 32
#: At most one push per channel per subscription this often (issue #11: 100 ms).
COALESCE_SECONDS: Final = 0.1
#: The status channel's period when nothing else prompts it.
STATUS_PERIOD: Final = 1.0
#: Bounds on list sizes a request may ask for.
MAX_BOOK_LIMIT: Final = BOOK_FEED_DEPTH
MAX_LIST_LIMIT: Final = 1000
#: Messages queued per WebSocket connection before its subscriptions wait for the client: a
#: slow client makes them compute their next update later (coalescing more), never buffer.
WS_QUEUE: Final = 8
#: Recent trades in the first message of a ``trades`` or ``private`` subscription.
SNAPSHOT_TRADES: Final = 50
#: Where the web view's files live (helper-web's node/web/): "/" is its index.html.
WEB_DIR: Final = Path(__file__).parent / "web"
CHANNELS: Final = ("book", "trades", "private", "status")


class HttpError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _error_response(code: str, message: str) -> JSONResponse:
    # A message may echo what the request held, and JSON text decodes "\ud800" to a lone
    # surrogate, which UTF-8 cannot encode: escaped here (it was a plain-text 500).
    text = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse(error_body(code, text), status_code=HTTP_STATUS.get(code, 400))


def _symbol_name(symbol: str | None) -> str | None:
    """A market name from a symbol: BTC-USD, or ccxt's BTC/USD (names never hold a slash)."""
    return None if symbol is None else symbol.strip().replace("/", "-")


def _int_param(
    request: Request, name: str, default: int | None, high: int | None = None
) -> int | None:
    """An integer query parameter; with ``high``, one in 1..high."""
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise HttpError(BAD_REQUEST, f"{name} must be an integer, not {text!r:.40}") from None
    if high is not None and not 1 <= value <= high:
        raise HttpError(BAD_REQUEST, f"{name} must be in 1..{high}, not {value}")
    return value


@dataclass
class HttpApi:
    """The API's state: the control adapter it answers with, the token, the book feeds."""

    adapter: ControlAdapter
    token: str
    feeds: dict[str, BookFeed] = field(default_factory=dict)
    #: WebSocket connections open now (bounded by MAX_WS_CONNECTIONS).
    ws_open: int = 0

    @property
    def me(self) -> bytes:
        return self.adapter.service.identity.public_key

    def market(self, symbol: str | None) -> MarketState:
        """The market a request names (optional when the node follows one), resolved as the
        control API does (same errors)."""
        return self.adapter._market({"market": _symbol_name(symbol)})

    def feed(self, ms: MarketState) -> BookFeed:
        feed = self.feeds.get(ms.market.name)
        if feed is None:
            feed = self.feeds[ms.market.name] = BookFeed(ms)
        return feed

    def authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and check_token(self.token, token)

    # -- REST --------------------------------------------------------------------------------

    async def markets(self, request: Request) -> Any:
        entries = await self.adapter.call("markets", {})
        by_name = self.adapter.service.by_name
        return [
            market_shape(e, sorted(k.hex() for k in by_name[e["name"]].replica.witnesses()))
            for e in entries
        ]

    async def orderbook(self, request: Request) -> Any:
        ms = self.market(request.query_params.get("symbol"))
        limit = _int_param(request, "limit", 50, MAX_BOOK_LIMIT)
        assert limit is not None
        feed = self.feed(ms)
        seq = feed.refresh()
        replica = ms.replica
        final = replica.final_book(limit) if replica.witnessed else None
        m = ms.market
        now = time.time_ns() // 1_000_000

        def final_side(side: Any) -> list[list[str]]:
            return [[m.ticks_to_price(lv.price), m.lots_to_qty(lv.quantity)] for lv in side]

        return {
            "symbol": m.name,
            "bids": feed.format(feed.bids, descending=True)[:limit],
            "asks": feed.format(feed.asks, descending=False)[:limit],
            "nonce": seq,
            "timestamp": now,
            "datetime": iso(now),
            "final": {
                "bids": final_side(final.bids) if final else [],
                "asks": final_side(final.asks) if final else [],
            },
            "witnessed": replica.witnessed,
        }

    async def trades(self, request: Request) -> Any:
        ms = self.market(request.query_params.get("symbol"))
        limit = _int_param(request, "limit", 100, MAX_LIST_LIMIT)
        since = _int_param(request, "since", None)
        start = _int_param(request, "start", None)
        params: dict[str, Any] = {"market": ms.market.name, "limit": limit}
        if start is not None:
            params["start"] = start
        result = await self.adapter.call("fills", params)
        trades = [trade_shape(f) for f in result["fills"]]
        if since is not None:
            trades = [t for t in trades if t["timestamp"] is not None and t["timestamp"] >= since]
        return trades

    async def status(self, request: Request) -> Any:
        status = await self.adapter.call("status", {"digest": False})
        status.pop("pid", None)  # the process is the operator's business, not the public's
        return status

    async def list_orders(self, request: Request) -> Any:
        ms = self.market(request.query_params.get("symbol"))
        which = request.query_params.get("status", "all")
        if which not in ("open", "closed", "all"):
            raise HttpError(BAD_REQUEST, f"status must be open, closed or all, not {which!r:.40}")
        limit = _int_param(request, "limit", 100, MAX_LIST_LIMIT)
        assert limit is not None
        cursor = request.query_params.get("cursor")
        result = await self.adapter.call(
            "orders", {"market": ms.market.name, "open": which == "open"}
        )
        orders = [order_shape(o) for o in reversed(result["orders"])]  # newest first
        if which == "closed":
            orders = [o for o in orders if o["status"] != "open"]
        start = 0
        if cursor:
            ids = [o["id"] for o in orders]
            if cursor in ids:
                start = ids.index(cursor) + 1
            else:
                start = await self._start_after(ms, cursor, orders)
        page = orders[start : start + limit]
        more = start + limit < len(orders)
        return {"orders": page, "next_cursor": page[-1]["id"] if more and page else None}

    async def _start_after(self, ms: MarketState, cursor: str, orders: list[dict[str, Any]]) -> int:
        """Where a page of ``orders`` (a filtered list, newest first) starts after ``cursor``,
        an order no longer in it: an open order that filled or was cancelled since the last
        page (a bot paging open orders met that with every fill). It pages on from where the
        cursor stands among all the orders."""
        every = await self.adapter.call("orders", {"market": ms.market.name, "open": False})
        rank = {o["id"]: n for n, o in enumerate(reversed(every["orders"]))}  # newest first
        at = rank.get(cursor)
        if at is None:
            raise HttpError(BAD_REQUEST, f"cursor {cursor!r:.80} is not an order of this list")
        return next((n for n, o in enumerate(orders) if rank.get(o["id"], -1) > at), len(orders))

    async def get_order(self, request: Request) -> Any:
        params = self._order_params(request)
        return order_shape(await self.adapter.call("order", params))

    async def create_order(self, request: Request) -> Any:
        body = await _json_body(request)
        refusal = unknown_name(body, NEW_ORDER_FIELDS, "field")
        if refusal is not None:
            raise HttpError(BAD_REQUEST, f"{refusal}; nothing was placed")
        symbol = body.get("symbol")
        ms = self.market(None if symbol is None else _require_str(body, "symbol"))
        kind = body.get("type", "limit")
        if kind not in ("limit", "market"):
            raise HttpError(BAD_REQUEST, f"type must be limit or market, not {kind!r:.40}")
        params: dict[str, Any] = {
            "market": ms.market.name,
            "side": _require_str(body, "side"),
            "quantity": _require_str(body, "amount"),
        }
        tif_text = body.get("timeInForce")
        post_only = body.get("postOnly")
        if post_only is not None and not isinstance(post_only, bool):
            # "true" or 1 was taken as false: the order could take where it was to rest.
            raise HttpError(BAD_REQUEST, "postOnly must be true or false; nothing was placed")
        if post_only is True:
            if tif_text not in (None, "PO"):
                raise HttpError(BAD_REQUEST, "postOnly is timeInForce PO: give one of them")
            tif_text = "PO"
        if tif_text is not None:
            tif = TIF_FROM_CCXT.get(str(tif_text).upper())
            if tif is None:
                raise HttpError(
                    BAD_REQUEST, f"timeInForce must be GTC, IOC, FOK or PO, not {tif_text!r:.40}"
                )
            params["tif"] = tif
        if kind == "market":
            params["market_order"] = True
            if body.get("price") is not None:
                raise HttpError(BAD_REQUEST, "a market order takes no price (it takes band)")
            if body.get("band") is not None:
                params["band"] = _require_str(body, "band")
        else:
            params["price"] = _require_str(body, "price")
        client_id = body.get("clientOrderId")
        if client_id is not None:
            # A witnessed market's client order id; elsewhere a free label (the tag).
            params["client_id" if ms.market.witnessed else "tag"] = _require_str(
                body, "clientOrderId"
            )
        if body.get("selfTradePrevention") is not None:
            params["stp"] = _require_str(body, "selfTradePrevention")
        wait_final = body.get("waitFinal", False)
        if not isinstance(wait_final, bool):
            raise HttpError(BAD_REQUEST, "waitFinal must be true or false")
        if wait_final:  # answer once the order is final (witnessed markets; 504 after 30 s)
            params["wait_final"] = True
        result = await self.adapter.call("submit", params)
        me = self.me.hex()
        shaped = order_shape(result["order"], kind)
        shaped["fills"] = [trade_shape(f, me) for f in result["fills"]]
        shaped["expired"] = [order_shape(o) for o in result["self_trade_expired"]]
        if "market_order" in result:
            shaped["info"] = {**shaped["info"], "market_order": result["market_order"]}
        return shaped

    async def cancel_order(self, request: Request) -> Any:
        result = await self.adapter.call("cancel", self._order_params(request))
        shaped = order_shape(result["order"])
        shaped["info"] = {
            **shaped["info"],
            "cancel_id": result["cancel_id"],
            "effective": result["effective"],
            "cancel_final": result["final"],
        }
        return shaped

    async def cancel_all(self, request: Request) -> Any:
        ms = self.market(request.query_params.get("symbol"))
        prefix = request.query_params.get("clientOrderIdPrefix") or None
        me = self.me
        resting = [
            o.id
            for o in ms.replica.orders(me)
            if o.status in ("open", "partially_filled")
            and (prefix is None or (o.tag or "").startswith(prefix))
        ]
        if not ms.market.witnessed:
            # No cancel-all op without witnesses (protocol version 1): one cancel per order.
            for order_id in resting:
                await self.adapter.call(
                    "cancel", {"market": ms.market.name, "order_id": order_id.hex()}
                )
            op = None
        else:
            params = {"market": ms.market.name, "prefix": prefix}
            op = (await self.adapter.call("cancel_all", params))["cancel_id"]
        cancelled = [
            order_id.hex()
            for order_id in resting
            if (o := ms.replica.order(order_id)) is not None and o.status == "cancelled"
        ]
        return {"op": op, "cancelled": cancelled}

    def _order_params(self, request: Request) -> dict[str, Any]:
        params: dict[str, Any] = {"order_id": request.path_params["order_id"]}
        symbol = _symbol_name(request.query_params.get("symbol"))
        if symbol:
            params["market"] = symbol
        return params

    # -- WebSocket ---------------------------------------------------------------------------

    async def websocket(self, ws: WebSocket) -> None:
        if self.ws_open >= MAX_WS_CONNECTIONS:
            # Accept, then close with 1013 and the reason: refusing the handshake instead reads
            # as HTTP 403 to the client, which says nothing of waiting (one handshake's cost).
            await ws.accept()
            await ws.close(
                code=WS_TRY_AGAIN_LATER,
                reason=f"this node serves {MAX_WS_CONNECTIONS} WebSocket connections at most: "
                "try again later",
            )
            return
        self.ws_open += 1
        try:
            await ws.accept()
            conn = _Connection(self, ws, self.authorized(ws.headers.get("authorization")))
            await conn.run()
        finally:
            self.ws_open -= 1


async def _json_body(request: Request) -> dict[str, Any]:
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise HttpError(BAD_REQUEST, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(data or b"null")
    except ValueError as exc:
        raise HttpError(BAD_REQUEST, f"the body is not JSON: {exc}") from None
    except RecursionError:  # a few thousand nested brackets (well under MAX_BODY_BYTES)
        raise HttpError(BAD_REQUEST, "the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise HttpError(BAD_REQUEST, "the body must be a JSON object")
    return body


def _require_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise HttpError(BAD_REQUEST, f"missing field {name!r}")
    if isinstance(value, float | bool) or not isinstance(value, str | int):
        # Floats lose digits: prices and amounts are decimal strings (integers pass).
        raise HttpError(
            BAD_REQUEST, f"{name} must be a string (decimals as strings), not {value!r:.40}"
        )
    return str(value)


class _Connection:
    """One WebSocket client: a reader task for its requests, a task per subscription, and one
    writer that sends what they queue (so sends never interleave)."""

    def __init__(self, api: HttpApi, ws: WebSocket, authed: bool) -> None:
        self.api, self.ws, self.authed = api, ws, authed
        self.send_q, self.recv_q = trio.open_memory_channel[dict[str, Any]](WS_QUEUE)
        self.subs: dict[tuple[str, str | None], trio.CancelScope] = {}

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._writer)
            try:
                await self._reader()
            finally:
                nursery.cancel_scope.cancel()

    async def _writer(self) -> None:
        async with self.recv_q:
            async for message in self.recv_q:
                try:
                    await self.ws.send_text(json.dumps(message, separators=(",", ":")))
                except (WebSocketDisconnect, RuntimeError, OSError):
                    self.nursery.cancel_scope.cancel()
                    return

    async def _reader(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                text = (message.get("bytes") or b"").decode("utf-8", "replace")
            if len(text) > MAX_WS_MESSAGE_BYTES:
                await self._error(BAD_REQUEST, f"message over {MAX_WS_MESSAGE_BYTES} bytes")
                continue
            try:
                request = json.loads(text)
                if not isinstance(request, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                await self._error(BAD_REQUEST, f"messages are JSON objects: {exc}")
                continue
            except RecursionError:  # it closed the connection (1011) and its subscriptions
                await self._error(BAD_REQUEST, "the message is nested too deeply")
                continue
            try:
                await self._handle(request)
            except (ControlError, HttpError) as exc:
                await self._error(exc.code, exc.message, request)
            except Exception:  # a bug: this request fails, the connection and others go on
                logger.exception("WebSocket request %.200r failed", request)
                await self._error(INTERNAL, "a bug in the node; details are in its log", request)

    async def _error(self, code: str, message: str, request: Any = None) -> None:
        body = error_body(code, message)
        if isinstance(request, dict):
            body["request"] = {
                k: request[k]
                for k in ("op", "channel", "symbol")
                if isinstance(request.get(k), str | None) and k in request
            }
        await self.send_q.send(body)

    async def _handle(self, request: dict[str, Any]) -> None:
        op = request.get("op")
        if op == "auth":
            token = request.get("token")
            if not isinstance(token, str) or not check_token(self.api.token, token):
                raise HttpError(UNAUTHORIZED, "wrong token (see `crdtbook token` on the node)")
            self.authed = True
            await self.send_q.send({"op": "auth", "ok": True})
            return
        if op not in ("subscribe", "unsubscribe"):
            raise HttpError(BAD_REQUEST, "op must be subscribe, unsubscribe or auth")
        channel = request.get("channel")
        if channel not in CHANNELS:
            raise HttpError(BAD_REQUEST, f"channel must be one of {', '.join(CHANNELS)}")
        symbol = request.get("symbol")
        if symbol is not None and not isinstance(symbol, str):
            raise HttpError(BAD_REQUEST, "symbol must be a string")
        ms = None if channel == "status" else self.api.market(symbol)
        key = (channel, None if ms is None else ms.market.name)
        reply = {"op": f"{op}d", "channel": channel, "symbol": key[1]}
        if op == "unsubscribe":
            old = self.subs.pop(key, None)
            if old is not None:
                old.cancel()
            await self.send_q.send(reply)
            return
        # Every check before the running subscription of this key is replaced: a refused
        # request leaves the connection's state as it was (a bad `since` stopped the book).
        if channel == "private" and not self.authed:
            raise HttpError(UNAUTHORIZED, 'the private channel needs {"op": "auth"} first')
        if key not in self.subs and len(self.subs) >= MAX_SUBSCRIPTIONS:
            raise HttpError(BAD_REQUEST, f"at most {MAX_SUBSCRIPTIONS} subscriptions")
        since = request.get("since")
        if since is not None and (not isinstance(since, int) or isinstance(since, bool)):
            raise HttpError(BAD_REQUEST, "since must be an integer (the last u seen)")
        old = self.subs.pop(key, None)
        if old is not None:
            old.cancel()
        await self.send_q.send(reply)
        scope = trio.CancelScope()
        self.subs[key] = scope
        task: Callable[[], Awaitable[None]]
        if ms is None:
            task = self._status
        elif channel == "book":
            task = lambda: self._book(ms, since)  # noqa: E731
        elif channel == "trades":
            task = lambda: self._trades(ms)  # noqa: E731
        else:
            task = lambda: self._private(ms)  # noqa: E731
        self.nursery.start_soon(self._scoped, scope, task)

    async def _scoped(self, scope: trio.CancelScope, task: Callable[[], Awaitable[None]]) -> None:
        with scope:
            await task()

    async def _pushes(self, ms: MarketState) -> Any:
        """Wake after each change of ``ms``, at most every COALESCE_SECONDS. The event is
        taken before the caller reads the state, so no change is missed in between."""
        last = -math.inf
        while True:
            changed = ms.changed
            yield
            await changed.wait()
            await trio.sleep_until(last + COALESCE_SECONDS)
            last = trio.current_time()

    async def _book(self, ms: MarketState, since: int | None) -> None:
        feed = self.api.feed(ms)
        name = ms.market.name
        last: int | None = None
        async for _ in self._pushes(ms):
            seq = feed.refresh()
            resume = since if last is None else last
            delta = None if resume is None else feed.since(resume)
            if delta is None:
                await self.send_q.send(
                    {
                        "channel": "book",
                        "type": "snapshot",
                        "symbol": name,
                        "u": seq,
                        "bids": feed.format(feed.bids, descending=True),
                        "asks": feed.format(feed.asks, descending=False),
                    }
                )
                last = seq
            elif delta.bids or delta.asks or last is None:
                await self.send_q.send(
                    {
                        "channel": "book",
                        "type": "delta",
                        "symbol": name,
                        "U": delta.first,
                        "u": delta.last,
                        "pu": resume,
                        "bids": feed.format(delta.bids, descending=True),
                        "asks": feed.format(delta.asks, descending=False),
                    }
                )
                last = delta.last

    async def _trades(self, ms: MarketState) -> None:
        from .handler import WatchedFills

        sent: WatchedFills | None = None
        async for _ in self._pushes(ms):
            if sent is None:
                sent = WatchedFills(ms)
                recent = await self.api.adapter.call(
                    "fills", {"market": ms.market.name, "limit": SNAPSHOT_TRADES}
                )
                trades = [trade_shape(f) for f in recent["fills"]]
                await self.send_q.send(_trades_message("trades", ms, "snapshot", trades, [], []))
                continue
            fills, revoked, became_final = sent.update()
            message = _fills_message("trades", ms, sent.final, fills, revoked, became_final, None)
            if message is not None:
                await self.send_q.send(message)

    async def _private(self, ms: MarketState) -> None:
        me = self.api.me
        watch: PrivateWatch | None = None
        try:
            async for _ in self._pushes(ms):
                if watch is None:
                    watch = PrivateWatch(ms, me)
                    orders = await self.api.adapter.call(
                        "orders", {"market": ms.market.name, "open": True}
                    )
                    fills = await self.api.adapter.call(
                        "fills", {"market": ms.market.name, "mine": True, "limit": SNAPSHOT_TRADES}
                    )
                    message = _trades_message(
                        "private",
                        ms,
                        "snapshot",
                        [trade_shape(f, me.hex()) for f in fills["fills"]],
                        [],
                        [],
                    )
                    message["orders"] = [order_shape(o) for o in orders["orders"]]
                    await self.send_q.send(message)
                    continue
                changed, mine, revoked, became_final = watch.update()
                final = ms.replica.final_fill_count()
                update = _fills_message("private", ms, final, mine, revoked, became_final, me.hex())
                if update is None and not changed:
                    continue
                if update is None:
                    update = _trades_message("private", ms, "update", [], [], [])
                update["orders"] = [order_shape(order_json(ms, o, me)) for o in changed]
                await self.send_q.send(update)
        finally:
            if watch is not None:
                watch.close()

    async def _status(self) -> None:
        while True:
            status = await self.api.adapter.call("status", {"digest": False})
            status.pop("pid", None)
            await self.send_q.send({"channel": "status", **status})
            await trio.sleep(STATUS_PERIOD)


def _trades_message(
    channel: str,
    ms: MarketState,
    kind: str,
    trades: list[dict[str, Any]],
    revoked: list[str],
    became_final: list[str],
    final_times: dict[str, int] | None = None,
) -> dict[str, Any]:
    key = "fills" if channel == "private" else "trades"
    return {
        "channel": channel,
        "type": kind,
        "symbol": ms.market.name,
        key: trades,
        "revoked": revoked,
        "became_final": became_final,
        "final_times": final_times or {},
    }


def _fills_message(
    channel: str,
    ms: MarketState,
    final: int,
    fills: list[tuple[int, Any]],
    revoked: list[tuple[int, Any]],
    became_final: list[int],
    me: str | None,
) -> dict[str, Any] | None:
    """A trades/private update from WatchedFills' answer, or None when nothing changed. A
    revoked fill that is sent again (it moved, or changed) is not listed as revoked: clients
    replace trades by id."""
    if not (fills or revoked or became_final):
        return None
    sent = [trade_shape(fill_json(ms, i, f, i < final), me) for i, f in fills]
    ids = {t["id"] for t in sent}
    gone = [tid for _, f in revoked if (tid := trade_id(fill_json(ms, 0, f))) not in ids]
    finals: list[str] = []
    # A trade's time once final is its witnessed time, which a client holding it from before
    # does not have (it kept the receipt time: a web view showed that after the trade was final).
    final_times: dict[str, int] = {}
    if became_final:  # (consecutive indexes; compacted meanwhile: from the store, with times)
        rows = ms.fills(became_final[0], became_final[-1] + 1)
        for c in rows:
            times = (c.received_ms, c.witnessed_ms)
            shaped = trade_shape(fill_json(ms, c.number, c.fill, True, times))
            finals.append(shaped["id"])
            if shaped["timestamp"] is not None:
                final_times[shaped["id"]] = shaped["timestamp"]
    return _trades_message(channel, ms, "update", sent, gone, finals, final_times)


def _endpoint(
    api: HttpApi, fn: Callable[[Request], Awaitable[Any]], auth: bool, query: frozenset[str]
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            if auth and not api.authorized(request.headers.get("authorization")):
                raise HttpError(
                    UNAUTHORIZED,
                    "this request needs Authorization: Bearer <token> (`crdtbook token` on the "
                    "node prints it)",
                )
            # A misspelt parameter is refused, as a body's field is: taken as absent,
            # `clientOrderIDPrefix=grid-` cancelled every open order, not those of the grid.
            unknown = [name for name in request.query_params if name not in query]
            if unknown:
                refusal = (
                    unknown_name(unknown, query, "query parameter")
                    if query
                    else f"unknown query parameter {unknown[0]!r:.40}: this path takes none"
                )
                raise HttpError(BAD_REQUEST, f"{refusal}; nothing was done")
            return JSONResponse(await fn(request))
        except (ControlError, HttpError) as exc:
            response = _error_response(exc.code, exc.message)
            if exc.code == UNAUTHORIZED:  # RFC 9110 section 11.6.1: the scheme to use
                response.headers["WWW-Authenticate"] = "Bearer"
            return response
        except ClientDisconnect:  # gone mid-body: nobody to answer, and no bug of the node's
            logger.debug("HTTP %s %s: the client went away", request.method, request.url.path)
            return _error_response(BAD_REQUEST, "the client went away")
        except Exception:
            logger.exception("HTTP %s %s failed", request.method, request.url.path)
            return _error_response(INTERNAL, "a bug in the node; details are in its log")

    return endpoint


def create_app(adapter: ControlAdapter, token: str, web_dir: Path = WEB_DIR) -> Starlette:
    """The ASGI app: REST under /api/v1, the WebSocket at /ws, the web view at / and
    /static/, the OpenAPI document at /openapi.json."""
    api = HttpApi(adapter, token)

    documented = openapi_document()["paths"]

    def route(path: str, auth: bool, **by_method: Callable[[Request], Awaitable[Any]]) -> Route:
        """One route for every method of ``path`` (separate routes made a 405's Allow name
        only the first one's methods)."""
        endpoints: dict[str, Callable[[Request], Awaitable[Response]]] = {}
        for method, fn in by_method.items():
            # The query parameters it takes are those the OpenAPI document gives it: any
            # other is refused, and the document cannot drift from what is served.
            params = documented[path][method.lower()].get("parameters", [])
            query = frozenset(p["name"] for p in params if p["in"] == "query")
            endpoints[method] = _endpoint(api, fn, auth, query)

        async def dispatch(request: Request) -> Response:
            method = "GET" if request.method == "HEAD" else request.method
            return await endpoints[method](request)

        return Route(path, dispatch, methods=list(endpoints))

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def index(request: Request) -> Response:
        page = web_dir / "index.html"
        if page.is_file():
            return FileResponse(page)
        return HTMLResponse("<!doctype html><title>crdtbook</title><p>No web view installed.")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = NOT_FOUND if exc.status_code == 404 else BAD_REQUEST
        # With starlette's headers: a 405 names the methods the path takes (Allow, RFC 9110).
        return JSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    v1 = "/api/v1"
    routes = [
        route(f"{v1}/markets", False, GET=api.markets),
        route(f"{v1}/orderbook", False, GET=api.orderbook),
        route(f"{v1}/trades", False, GET=api.trades),
        route(f"{v1}/status", False, GET=api.status),
        route(
            f"{v1}/orders", True, GET=api.list_orders, POST=api.create_order, DELETE=api.cancel_all
        ),
        route(f"{v1}/orders/{{order_id}}", True, GET=api.get_order, DELETE=api.cancel_order),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        WebSocketRoute("/ws", api.websocket),
        Mount("/static", StaticFiles(directory=web_dir, check_dir=False), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    # No redirect from a path with a trailing slash to the one without: an empty order id made
    # `DELETE /api/v1/orders/` a 307 to `DELETE /api/v1/orders`, cancel-all, which a client
    # that follows redirects then ran. Every path is answered as written, else 404.
    app.router.redirect_slashes = False
    app.state.api = api
    return app


#: Connections the kernel queues before the server accepts them (hypercorn's default).
HTTP_BACKLOG: Final = 100


class HttpListenError(OSError):
    """The HTTP API's address cannot be listened on (in use, not of this machine): one line."""


def bind_http(host: str, port: int) -> socket.socket:
    """The HTTP API's socket, bound at once: a port in use or an address not of this machine
    is then a one-line error before the node starts. (Left to hypercorn, the bind failed inside
    the running node's nurseries, a traceback of nested exception groups.)"""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as hypercorn sets them
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        # Listening at once: a socket only bound does not keep another SO_REUSEADDR socket
        # (libp2p's, another node's) from taking the port before hypercorn listens.
        sock.listen(HTTP_BACKLOG)
    except OSError as exc:
        sock.close()
        shown = f"[{host}]" if ":" in host else host
        reason = (exc.strerror or str(exc)).lower()
        raise HttpListenError(f"cannot serve the HTTP API on {shown}:{port}: {reason}") from None
    return sock


async def serve_http(
    adapter: ControlAdapter,
    home: Path,
    host: str,
    port: int,
    *,
    sock: socket.socket | None = None,
    task_status: TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API on ``host:port`` until cancelled; hands back the (host, port) bound (port
    0 asks for a free one). ``sock``: already bound there (:func:`bind_http`), served and
    closed from then on. Makes ``<home>/http.token`` when absent."""
    from hypercorn.config import Config

    token = load_or_create_token(home)
    if sock is None:
        sock = bind_http(host, port)
    config = Config()
    config.errorlog = logger  # hypercorn's messages under the node's logging levels
    config.accesslog = None
    config.websocket_max_message_size = MAX_WS_MESSAGE_BYTES
    config.graceful_timeout = 1.0  # open WebSockets must not hold up the node's shutdown
    app = create_app(adapter, token)
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the descriptor from here
    async with trio.open_nursery() as nursery:
        bound: list[str] = await nursery.start(_serve, app, config)
        task_status.started((host, int(bound[0].rsplit(":", 1)[1])))


def http_banner(bound: tuple[str, int], home: Path) -> list[str]:
    """The node's start-up lines about its HTTP API (a warning when others can reach it)."""
    host, port = bound
    shown = f"[{host}]" if ":" in host else host
    lines = [
        f"  http api and web view on http://{shown}:{port}/ (token for trading: "
        f"{home / TOKEN_FILE}, or `crdtbook token`)"
    ]
    if not is_loopback(host):
        lines.append(
            f"  WARNING: the HTTP API listens on {host}, reachable from other machines: every "
            "trading and private request needs the bearer token (public market data does not), "
            "and requests travel unencrypted (put TLS in front of it to use it across networks)"
        )
    return lines


async def _serve(
    app: Starlette, config: Any, *, task_status: TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    from hypercorn.trio import serve

    await serve(app, config, task_status=task_status)  # type: ignore[arg-type]
