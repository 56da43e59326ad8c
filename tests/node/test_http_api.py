"""The HTTP and WebSocket API (issue #11), in process: in-process nodes (tests/node/test_finality's
gossip stand-in) each serving the real app on hypercorn's trio worker on a free 127.0.0.1 port,
driven with httpx and trio-websocket. Also: the OpenAPI document against the served routes and
live responses, the token file, and ``--http`` parsing."""

from __future__ import annotations

import json
import os
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Mount, Route, WebSocketRoute
from trio_websocket import WebSocketConnection, open_websocket_url

from crdtbook import Fill, Market
from crdtbook.node.control_errors import BAD_REQUEST, ControlError
from crdtbook.node.http_api import (
    COALESCE_SECONDS,
    MAX_BOOK_LIMIT,
    MAX_LIST_LIMIT,
    _fills_message,
    create_app,
    http_banner,
    serve_http,
)
from crdtbook.node.http_auth import (
    TOKEN_FILE,
    is_loopback,
    load_or_create_token,
    parse_bind,
)
from crdtbook.node.http_feeds import PrivateWatch
from crdtbook.node.http_openapi import openapi_document
from crdtbook.node.store import CompactedFill

from .test_finality import Net, Node, identities, network, until, witnessed

pytestmark = pytest.mark.timeout(60)


class Api:
    """One in-process node's HTTP API: a client with and one without the token."""

    def __init__(self, node: Node, base: str, token: str) -> None:
        self.node, self.base, self.token = node, base, token
        self.ws_url = base.replace("http://", "ws://") + "/ws"
        self.auth = {"Authorization": f"Bearer {token}"}
        self.client = httpx.AsyncClient(base_url=base, timeout=10.0)

    async def get(self, path: str, auth: bool = True, **params: Any) -> Any:
        r = await self.client.get(path, params=params, headers=self.auth if auth else {})
        assert r.status_code == 200, r.text
        return r.json()

    async def post(self, path: str, body: Any) -> Any:
        r = await self.client.post(path, json=body, headers=self.auth)
        assert r.status_code == 200, r.text
        return r.json()

    async def delete(self, path: str, **params: Any) -> Any:
        r = await self.client.delete(path, params=params, headers=self.auth)
        assert r.status_code == 200, r.text
        return r.json()


@asynccontextmanager
async def serving(net: Net, node: Node, home: Path) -> AsyncIterator[Api]:
    host, port = await net.nursery.start(serve_http, node.adapter, home, "127.0.0.1", 0)
    api = Api(node, f"http://{host}:{port}", load_or_create_token(home))
    try:
        yield api
    finally:
        await api.client.aclose()


async def recv(ws: WebSocketConnection, timeout: float = 10.0) -> dict[str, Any]:
    with trio.fail_after(timeout):
        message = json.loads(await ws.get_message())
    assert isinstance(message, dict)
    return message


async def recv_channel(ws: WebSocketConnection, channel: str, **match: Any) -> dict[str, Any]:
    """The next message of ``channel`` (with the given fields), skipping others."""
    while True:
        message = await recv(ws)
        if "op" in message:  # a reply to a request, not a push
            continue
        if message.get("channel") == channel and all(message.get(k) == v for k, v in match.items()):
            return message


def order(side: str, price: str, amount: str, **extra: Any) -> dict[str, Any]:
    return {"symbol": "W", "type": "limit", "side": side, "price": price, "amount": amount, **extra}


# -- REST ----------------------------------------------------------------------------------------


async def test_rest_trading_round_trip(tmp_path: Path) -> None:
    ids = identities(2)
    market = witnessed(ids[:1])
    async with network(tmp_path) as net:
        a, b = net.add(ids[0], market), net.add(ids[1], market)
        async with (
            serving(net, a, tmp_path / "n0") as api_a,
            serving(net, b, tmp_path / "n1") as api_b,
        ):
            (m,) = await api_a.get("/api/v1/markets", auth=False)
            assert (m["id"], m["symbol"], m["precision"]) == (
                "W",
                "W",
                {"price": "1", "amount": "1"},
            )
            assert m["info"]["witnessed"] is True and m["info"]["witnesses"] == [
                ids[0].public_key.hex()
            ]
            # trading and private reads need the token; public reads do not
            for method, path in (
                ("GET", "/api/v1/orders"),
                ("POST", "/api/v1/orders"),
                ("DELETE", "/api/v1/orders"),
                ("GET", "/api/v1/orders/ab"),
                ("DELETE", "/api/v1/orders/ab"),
            ):
                r = await api_a.client.request(method, path)
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
                r = await api_a.client.request(
                    method, path, headers={"Authorization": "Bearer " + "0" * 64}
                )
                assert r.status_code == 401
            empty = await api_a.get("/api/v1/orderbook", auth=False, symbol="W")
            assert empty["bids"] == [] and empty["asks"] == [] and empty["witnessed"] is True

            sell = await api_a.post(
                "/api/v1/orders", order("sell", "100", "5", clientOrderId="ask-1")
            )
            assert sell["status"] == "open" and sell["clientOrderId"] == "ask-1"
            assert (sell["price"], sell["amount"], sell["filled"], sell["remaining"]) == (
                "100",
                "5",
                "0",
                "5",
            )
            assert sell["timeInForce"] == "GTC" and sell["postOnly"] is False
            assert sell["fills"] == [] and sell["expired"] == []
            assert isinstance(sell["timestamp"], int) and sell["datetime"].endswith("Z")
            book = await api_a.get("/api/v1/orderbook", auth=False, symbol="W")
            assert book["asks"] == [["100", "5"]] and book["nonce"] > empty["nonce"]
            await until(lambda: b.ms.replica.order_count == 1)
            buy = await api_b.post("/api/v1/orders", order("buy", "101", "2"))
            assert buy["status"] == "closed" and buy["filled"] == "2"
            (fill,) = buy["fills"]
            assert (fill["price"], fill["amount"], fill["cost"]) == ("100", "2", "200")
            assert fill["takerOrMaker"] == "taker" and fill["order"] == buy["id"]
            await until(lambda: a.ms.replica.fill_count == 1)
            (trade,) = await api_a.get("/api/v1/trades", auth=False, symbol="W")
            assert trade["id"] == fill["id"] and trade["side"] == "buy"
            assert trade["takerOrMaker"] is None
            assert await api_a.get("/api/v1/trades", auth=False, symbol="W", since=2**60) == []
            paged = await api_a.get("/api/v1/trades", auth=False, symbol="W", start=0)
            assert [t["id"] for t in paged] == [trade["id"]]  # (it may have turned final since)
            assert await api_a.get("/api/v1/trades", auth=False, symbol="W", start=1) == []
            # market order with a band; then amounts as numbers are refused (floats lose digits)
            mkt = await api_b.post(
                "/api/v1/orders",
                {"symbol": "W", "type": "market", "side": "buy", "amount": "1", "band": "5%"},
            )
            assert mkt["type"] == "market" and mkt["timeInForce"] == "IOC" and mkt["filled"] == "1"
            r = await api_b.client.post(
                "/api/v1/orders", json=order("buy", 1.5, "1"), headers=api_b.auth
            )
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
            r = await api_b.client.post(
                "/api/v1/orders", json=order("buy", "1.5", "1"), headers=api_b.auth
            )
            assert r.status_code == 400 and r.json()["error"]["code"] == "off_tick"
            r = await api_b.client.post(
                "/api/v1/orders",
                json={**order("buy", "1", "1"), "symbol": "NOPE"},
                headers=api_b.auth,
            )
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_market"

            # orders: paging newest first, filters, one order, cancel, cancel-all by prefix
            for i in range(3):
                await api_a.post(
                    "/api/v1/orders", order("buy", str(90 + i), "1", clientOrderId=f"g-{i}")
                )
            page = await api_a.get("/api/v1/orders", symbol="W", limit=2)
            assert [o["price"] for o in page["orders"]] == ["92", "91"]
            rest = await api_a.get(
                "/api/v1/orders", symbol="W", limit=2, cursor=page["next_cursor"]
            )
            assert [o["price"] for o in rest["orders"]] == ["90", "100"]
            assert rest["next_cursor"] is None
            opened = await api_a.get("/api/v1/orders", symbol="W", status="open")
            assert len(opened["orders"]) == 4
            assert (await api_a.get("/api/v1/orders", symbol="W", status="closed"))["orders"] == []
            one = await api_a.get(f"/api/v1/orders/{sell['id'][:12]}", symbol="W")
            assert one["id"] == sell["id"] and one["filled"] == "3" and one["status"] == "open"
            r = await api_a.client.get(f"/api/v1/orders/{'f' * 64}", headers=api_a.auth)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            r = await api_b.client.delete(f"/api/v1/orders/{sell['id']}", headers=api_b.auth)
            assert r.status_code == 403 and r.json()["error"]["code"] == "not_owner"
            gone = await api_a.delete(f"/api/v1/orders/{sell['id']}", symbol="W")
            assert gone["status"] == "canceled" and gone["info"]["effective"] is True
            assert gone["info"]["cancel_final"] in (True, False)  # (its witness may have beat)
            cancelled = await api_a.delete("/api/v1/orders", symbol="W", clientOrderIdPrefix="g-")
            assert cancelled["op"] and len(cancelled["cancelled"]) == 3
            assert (await api_a.get("/api/v1/orders", symbol="W", status="open"))["orders"] == []

            status = await api_a.get("/api/v1/status", auth=False)
            assert status["markets"][0]["name"] == "W" and "pid" not in status
            r = await api_a.client.get("/api/v1/nothing")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_an_order_with_a_field_the_api_does_not_know_is_refused(tmp_path: Path) -> None:
    """`timeinforce` for `timeInForce` placed a resting GTC order where an IOC was meant."""
    ids = identities(1)
    async with network(tmp_path) as net:
        a = net.add(ids[0], Market("PLAIN", "0.5", "0.1"))
        async with serving(net, a, tmp_path / "n0") as api:
            typo = {"side": "sell", "price": "7", "amount": "0.1", "timeinforce": "IOC"}
            r = await api.client.post("/api/v1/orders", json=typo, headers=api.auth)
            assert r.status_code == 400
            error = r.json()["error"]
            assert error["code"] == "bad_request"
            assert "unknown field 'timeinforce' (did you mean timeInForce?)" in error["message"]
            assert a.ms.replica.order_count == 0  # nothing was signed
            # One market: the symbol may be left out (http-api.md, "Values").
            del typo["timeinforce"]
            placed = await api.post("/api/v1/orders", typo)
            assert placed["symbol"] == "PLAIN" and placed["status"] == "open"
            # The control API refuses the same for the methods that sign.
            with pytest.raises(ControlError) as err:
                await a.call("submit", side="buy", price="1", quantity="1", wait_finall=True)
            assert err.value.code == BAD_REQUEST
            assert "unknown param 'wait_finall' for submit (did you mean wait_final?)" in (
                err.value.message
            )
            assert a.ms.replica.order_count == 1


async def test_cancel_all_without_witnesses_cancels_one_by_one(tmp_path: Path) -> None:
    ids = identities(1)
    async with network(tmp_path) as net:
        a = net.add(ids[0], Market("PLAIN", "0.5", "0.1"))
        async with serving(net, a, tmp_path / "n0") as api:
            for price in ("1", "1.5"):
                await api.post(
                    "/api/v1/orders",
                    {
                        "symbol": "PLAIN",
                        "side": "buy",
                        "price": price,
                        "amount": "0.3",
                        "clientOrderId": "label",
                    },
                )
            # An empty order id is not cancel-all: no redirect from the trailing slash (it was
            # a 307 to DELETE /api/v1/orders, which a client following redirects then ran).
            for path in ("/api/v1/orders/", "/api/v1/orders/?symbol=PLAIN"):
                r = await api.client.delete(path, headers=api.auth, follow_redirects=True)
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            assert len((await api.get("/api/v1/orders", status="open"))["orders"]) == 2
            result = await api.delete("/api/v1/orders", symbol="PLAIN")
            assert result["op"] is None and len(result["cancelled"]) == 2
            book = await api.get("/api/v1/orderbook", auth=False)  # one market: symbol optional
            assert book["bids"] == [] and book["final"] == {"bids": [], "asks": []}


# -- OpenAPI -------------------------------------------------------------------------------------


def test_openapi_names_every_route_and_only_those() -> None:
    doc = openapi_document()
    jsonschema.Draft202012Validator.check_schema({"components": doc["components"]})
    app = create_app(None, "0" * 64)  # type: ignore[arg-type]  # routes only
    served: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Route):
            served |= {(route.path, m.lower()) for m in route.methods or () if m != "HEAD"}
        elif isinstance(route, WebSocketRoute):
            served.add((route.path, "get"))
        elif isinstance(route, Mount):
            served.add((route.path + "/{path}", "get"))
    documented = {(path, m) for path, ops in doc["paths"].items() for m in ops}
    assert served == documented
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            secured = "security" in op
            private = path.startswith("/api/v1/orders")
            assert secured == private, (path, method)
    # The bounds it gives are those the routes enforce.
    for path, limit in (("/api/v1/orderbook", MAX_BOOK_LIMIT), ("/api/v1/trades", MAX_LIST_LIMIT)):
        params = {p["name"]: p for p in doc["paths"][path]["get"]["parameters"]}
        assert params["limit"]["schema"]["maximum"] == limit


def _check(doc: dict[str, Any], schema: dict[str, Any], value: Any) -> None:
    jsonschema.validate(value, {**schema, "components": doc["components"]})


async def test_live_responses_match_the_openapi_document(tmp_path: Path) -> None:
    ids = identities(1)
    doc = openapi_document()
    async with network(tmp_path) as net:
        a = net.add(ids[0], witnessed(ids))
        async with serving(net, a, tmp_path / "n0") as api:
            served = await api.get("/openapi.json", auth=False)
            assert served == json.loads(json.dumps(doc))
            await api.post("/api/v1/orders", order("sell", "10", "3", clientOrderId="x"))
            created = await api.post(
                "/api/v1/orders", order("buy", "10", "1", selfTradePrevention="expire_taker")
            )
            created2 = await api.post("/api/v1/orders", order("buy", "9", "1", postOnly=True))
            settled = await api.post(
                "/api/v1/orders", order("buy", "8", "1", timeInForce="IOC", waitFinal=True)
            )
            assert settled["final"] is True and settled["status"] == "expired"
            assert created2["timeInForce"] == "PO" and created2["postOnly"] is True
            calls: list[tuple[str, str, Any]] = [
                ("/api/v1/markets", "get", await api.get("/api/v1/markets")),
                ("/api/v1/orderbook", "get", await api.get("/api/v1/orderbook")),
                ("/api/v1/trades", "get", await api.get("/api/v1/trades")),
                ("/api/v1/status", "get", await api.get("/api/v1/status")),
                ("/api/v1/orders", "get", await api.get("/api/v1/orders")),
                ("/api/v1/orders", "post", created),
                (
                    "/api/v1/orders/{order_id}",
                    "get",
                    await api.get(f"/api/v1/orders/{created['id']}"),
                ),
                (
                    "/api/v1/orders/{order_id}",
                    "delete",
                    await api.delete(f"/api/v1/orders/{created2['id']}"),
                ),
                ("/api/v1/orders", "delete", await api.delete("/api/v1/orders")),
            ]
            for path, method, value in calls:
                schema = doc["paths"][path][method]["responses"]["200"]["content"][
                    "application/json"
                ]["schema"]
                _check(doc, schema, value)
            r = await api.client.get("/api/v1/orders")
            _check(doc, doc["components"]["schemas"]["Error"], r.json())
            r = await api.client.get("/")
            assert r.status_code == 200 and "html" in r.headers["content-type"]


# -- WebSocket -----------------------------------------------------------------------------------


def apply_levels(book: dict[str, str], changes: list[list[str]]) -> None:
    for price, amount in changes:
        if amount == "0":
            book.pop(price, None)
        else:
            book[price] = amount


async def test_ws_book_snapshot_deltas_and_resume(tmp_path: Path) -> None:
    ids = identities(1)
    async with network(tmp_path) as net:
        a = net.add(ids[0], witnessed(ids))
        async with serving(net, a, tmp_path / "n0") as api:
            await api.post("/api/v1/orders", order("buy", "10", "1"))
            async with open_websocket_url(api.ws_url) as ws:
                await ws.send_message(
                    json.dumps({"op": "subscribe", "channel": "book", "symbol": "W"})
                )
                assert (await recv(ws)) == {"op": "subscribed", "channel": "book", "symbol": "W"}
                snap = await recv(ws)
                assert snap["type"] == "snapshot" and snap["bids"] == [["10", "1"]]
                bids = dict(map(tuple, snap["bids"]))
                last = snap["u"]
                await api.post("/api/v1/orders", order("buy", "11", "2"))
                await api.post("/api/v1/orders", order("sell", "12", "1"))
                delta: dict[str, Any] = {}
                while "12" not in str(delta.get("asks")):
                    delta = await recv_channel(ws, "book")
                    assert delta["type"] == "delta" and delta["pu"] == last
                    assert delta["U"] == last + 1 and delta["u"] >= delta["U"]
                    apply_levels(bids, delta["bids"])
                    last = delta["u"]
                assert bids == {"10": "1", "11": "2"}
            # away: changes happen; back with since = the last u: deltas, not a snapshot
            await api.post("/api/v1/orders", order("sell", "11", "2"))  # takes the 11 bid
            async with open_websocket_url(api.ws_url) as ws:
                await ws.send_message(
                    json.dumps({"op": "subscribe", "channel": "book", "symbol": "W", "since": last})
                )
                resumed = await recv_channel(ws, "book")
                assert resumed["type"] == "delta" and resumed["pu"] == last
                apply_levels(bids, resumed["bids"])
                assert bids == {"10": "1"}
                book = await api.get("/api/v1/orderbook")
                assert book["nonce"] == resumed["u"] and book["bids"] == [["10", "1"]]
                # a since this feed never had (from before a restart): a fresh snapshot
                await ws.send_message(
                    json.dumps({"op": "subscribe", "channel": "book", "symbol": "W", "since": 5})
                )
                again = await recv_channel(ws, "book")
                assert again["type"] == "snapshot" and again["u"] == resumed["u"]


async def test_ws_pushes_are_coalesced(tmp_path: Path) -> None:
    ids = identities(1)
    async with network(tmp_path) as net:
        a = net.add(ids[0], witnessed(ids))
        async with (
            serving(net, a, tmp_path / "n0") as api,
            open_websocket_url(api.ws_url) as ws,
        ):
            await ws.send_message(json.dumps({"op": "subscribe", "channel": "book"}))
            await recv(ws)
            last = (await recv(ws))["u"]
            count = 40
            stamps: list[float] = []
            bids: dict[str, str] = {}

            async def read() -> None:
                nonlocal last
                while len(bids) < count:
                    delta = await recv_channel(ws, "book")
                    assert delta["pu"] == last
                    last = delta["u"]
                    stamps.append(trio.current_time())
                    apply_levels(bids, delta["bids"])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                started = trio.current_time()
                for i in range(count):  # about 200 changes a second for 0.2 s
                    await a.call("submit", side="buy", price=str(100 + i), quantity="1")
                    await trio.sleep(0.005)
            # at most one push per 100 ms (the first may come at once): far fewer pushes
            # than changes. Counted, not timed apart: a busy client reads late, bunched.
            assert len(stamps) < count
            assert len(stamps) <= (stamps[-1] - started) / COALESCE_SECONDS + 2


async def test_ws_private_stream_needs_auth_and_sees_fills_become_final(tmp_path: Path) -> None:
    ids = identities(2)
    market = witnessed(ids[:1])
    async with network(tmp_path) as net:
        a, b = net.add(ids[0], market), net.add(ids[1], market)
        async with (
            serving(net, a, tmp_path / "n0") as api_a,
            serving(net, b, tmp_path / "n1") as api_b,
        ):
            maker = await api_a.post("/api/v1/orders", order("sell", "100", "3"))
            async with open_websocket_url(api_a.ws_url) as ws:
                sub = {"op": "subscribe", "channel": "private", "symbol": "W"}
                await ws.send_message(json.dumps(sub))
                denied = await recv(ws)
                assert denied["error"]["code"] == "unauthorized"
                await ws.send_message(json.dumps({"op": "auth", "token": "nope"}))
                assert (await recv(ws))["error"]["code"] == "unauthorized"
                await ws.send_message(json.dumps({"op": "auth", "token": api_a.token}))
                assert (await recv(ws)) == {"op": "auth", "ok": True}
                await ws.send_message(json.dumps(sub))
                await ws.send_message(json.dumps({"op": "subscribe", "channel": "trades"}))
                snap = await recv_channel(ws, "private", type="snapshot")
                assert [o["id"] for o in snap["orders"]] == [maker["id"]]
                await until(lambda: b.ms.replica.order_count == 1)
                taker = await api_b.post("/api/v1/orders", order("buy", "100", "2"))
                trade_id = taker["fills"][0]["id"]
                seen_fill = seen_final = seen_order = seen_trade = False
                while not (seen_fill and seen_final and seen_order and seen_trade):
                    message = await recv(ws)
                    if "op" in message:  # the trades subscription's reply
                        continue
                    if message.get("channel") == "trades" and message["type"] == "update":
                        seen_trade |= trade_id in [t["id"] for t in message["trades"]]
                    if message.get("channel") != "private":
                        continue
                    for fill in message["fills"]:
                        assert fill["id"] == trade_id and fill["takerOrMaker"] == "maker"
                        assert fill["side"] == "sell" and fill["order"] == maker["id"]
                        seen_fill = True
                        seen_final |= fill["final"]
                    seen_final |= trade_id in message["became_final"]
                    for o in message["orders"]:
                        if o["id"] == maker["id"] and o["filled"] == "2":
                            seen_order = True
                assert not message.get("revoked")


async def test_ws_bad_requests_keep_the_connection(tmp_path: Path) -> None:
    ids = identities(1)
    async with network(tmp_path) as net:
        a = net.add(ids[0], witnessed(ids))
        async with (
            serving(net, a, tmp_path / "n0") as api,
            open_websocket_url(
                api.ws_url, extra_headers=[(b"authorization", f"Bearer {api.token}".encode())]
            ) as ws,
        ):
            for bad, code in (
                ("not json", "bad_request"),
                ("[1]", "bad_request"),
                (json.dumps({"op": "dance"}), "bad_request"),
                (json.dumps({"op": "subscribe", "channel": "x"}), "bad_request"),
                (
                    json.dumps({"op": "subscribe", "channel": "book", "symbol": "Z"}),
                    "unknown_market",
                ),
                (
                    json.dumps({"op": "subscribe", "channel": "book", "since": "1"}),
                    "bad_request",
                ),
            ):
                await ws.send_message(bad)
                assert (await recv(ws))["error"]["code"] == code, bad
            # the header's token authorizes the private channel at once
            await ws.send_message(json.dumps({"op": "subscribe", "channel": "private"}))
            assert (await recv(ws))["op"] == "subscribed"
            assert (await recv(ws))["type"] == "snapshot"
            await ws.send_message(json.dumps({"op": "subscribe", "channel": "status"}))
            assert (await recv(ws))["op"] == "subscribed"
            status = await recv_channel(ws, "status")
            assert status["markets"][0]["name"] == "W"
            await ws.send_message(json.dumps({"op": "unsubscribe", "channel": "status"}))
            assert (await recv(ws))["op"] == "unsubscribed"


# -- token and --http ----------------------------------------------------------------------------


def test_token_file(tmp_path: Path) -> None:
    token = load_or_create_token(tmp_path)
    path = tmp_path / TOKEN_FILE
    assert len(token) == 64 and int(token, 16) >= 0
    assert path.stat().st_mode & 0o777 == 0o600
    os.chmod(path, 0o644)
    assert load_or_create_token(tmp_path) == token
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("garbage")
    with pytest.raises(ValueError, match="does not hold a token"):
        load_or_create_token(tmp_path)


def test_parse_bind() -> None:
    assert parse_bind("8080") == ("127.0.0.1", 8080)
    assert parse_bind("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_bind("[::1]:8080") == ("::1", 8080)
    assert parse_bind(":9") == ("127.0.0.1", 9)
    for bad in ("x", "1:2:x", "70000"):
        with pytest.raises(ValueError):
            parse_bind(bad)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


# -- trades/private updates from WatchedFills' answer --------------------------------------------


class _FakeReplica:
    def __init__(self, fills: list[Fill]) -> None:
        self.list = fills

    def fills(self, start: int = 0) -> list[Fill]:
        return self.list[start:]

    def witnessed_time(self, op_id: bytes) -> int:
        return 1_000


class _FakeMarketState:
    def __init__(self, fills: list[Fill]) -> None:
        self.market = Market("W", "1", "1")
        self.replica = _FakeReplica(fills)
        self.received_ms: dict[bytes, int] = {}

    def fill_list(self, start: int) -> list[Fill]:
        return self.replica.fills(start)

    def fills(self, start: int, stop: int) -> list[CompactedFill]:
        """With times, as the store keeps them: the witnessed time once final."""
        chunk = self.replica.fills(start)[: stop - start]
        return [CompactedFill(start + n, f, 500, 1_000) for n, f in enumerate(chunk)]


def _fill(taker: int, maker: int, qty: int = 1) -> Fill:
    return Fill(bytes([taker]) * 32, bytes([maker]) * 32, 100, qty, "buy", b"t" * 32, b"m" * 32)


def test_trade_updates_name_revoked_and_final_trades_by_id() -> None:
    f0, f1, f2, f3 = _fill(1, 9), _fill(2, 9), _fill(3, 9), _fill(4, 9)
    ms = _FakeMarketState([f0, f1, f3, f2])
    assert _fills_message("trades", ms, 0, [], [], [], None) is None  # type: ignore[arg-type]
    # f2 and f3 swapped places (a late op reordered them), f2 changed quantity, f1 became final
    # and f9 vanished: moved or changed trades are re-sent (clients replace by id), not revoked
    f2b = _fill(3, 9, qty=2)
    ms.replica.list = [f0, f1, f3, f2b]
    gone = _fill(7, 9)
    message = _fills_message(
        "trades",
        ms,  # type: ignore[arg-type]
        2,
        [(2, f3), (3, f2b)],
        [(2, f2), (3, f3), (4, gone)],
        [1],
        None,
    )
    assert message is not None and message["type"] == "update"
    assert [t["id"] for t in message["trades"]] == [trade_id_of(f3), trade_id_of(f2b)]
    assert message["trades"][1]["amount"] == "2" and message["trades"][0]["final"] is False
    assert message["revoked"] == [trade_id_of(gone)]
    assert message["became_final"] == [trade_id_of(f1)]
    # With its time once final (the witnessed one): a client held the receipt time.
    assert message["final_times"] == {trade_id_of(f1): 1_000}


def trade_id_of(fill: Fill) -> str:
    return fill.taker.hex()[:16] + fill.maker.hex()[:16]


async def test_private_watch_reports_exactly_the_orders_that_changed(tmp_path: Path) -> None:
    """PrivateWatch re-reads only the orders that can change, yet reports what a full scan of
    this key's orders would: new orders, fills (by others' orders too), cancels, cancel-alls,
    and orders becoming final."""
    ids = identities(2)
    market = witnessed(ids[:1])
    rng = random.Random(5)
    async with network(tmp_path) as net:
        a, b = net.add(ids[0], market), net.add(ids[1], market)
        watch = PrivateWatch(a.ms, a.key)
        last = {o.id: o for o in a.ms.replica.orders(a.key)}
        reported, saw_final = 0, False
        for _ in range(80):
            actor = rng.choice([a, b])
            action = rng.random()
            if action < 0.65:
                side = rng.choice(["buy", "sell"])
                price = str(rng.randint(97, 103))
                await actor.call("submit", side=side, price=price, quantity=str(rng.randint(1, 3)))
            elif action < 0.9:
                open_ids = [o["id"] for o in (await actor.call("orders", open=True))["orders"]]
                if open_ids:
                    await actor.call("cancel", order_id=rng.choice(open_ids))
            else:
                await actor.call("cancel_all")
            await trio.sleep(rng.choice([0, 0.005, 0.02]))
            changed = watch.update()[0]
            truth = {o.id: o for o in a.ms.replica.orders(a.key)}
            assert sorted(o.id for o in changed) == sorted(
                i for i, o in truth.items() if last.get(i) != o
            )
            assert all(truth[o.id] == o for o in changed)
            reported += len(changed)
            saw_final |= any(o.final for o in changed)
            last = truth
        await until(lambda: a.ms.replica.final_count >= len(a.ms.replica) - 4)
        changed = watch.update()[0]
        truth = {o.id: o for o in a.ms.replica.orders(a.key)}
        assert sorted(o.id for o in changed) == sorted(
            i for i, o in truth.items() if last.get(i) != o
        )
        assert reported > 40 and (saw_final or any(o.final for o in changed))
        watcher = watch._watcher
        watch.close()
        assert watcher not in a.ms.watchers


def test_token_command_and_the_start_up_warning(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from crdtbook.cli.app import app

    home = tmp_path / "home"
    runner = CliRunner()
    missing = runner.invoke(app, ["token", "--home", str(home)])
    assert missing.exit_code == 2 and "no node home" in missing.output  # as for no node
    home.mkdir(mode=0o700)
    first = runner.invoke(app, ["token", "--home", str(home)])
    assert first.exit_code == 0 and first.output.strip() == load_or_create_token(home)
    bad = runner.invoke(app, ["node", "--home", str(home), "--http", "host:port"])
    assert bad.exit_code == 2 and "[HOST:]PORT" in bad.output
    local = http_banner(("127.0.0.1", 8080), home)
    assert len(local) == 1 and "http://127.0.0.1:8080/" in local[0]
    wide = http_banner(("0.0.0.0", 8080), home)
    assert "WARNING" in wide[1] and "token" in wide[1] and "unencrypted" in wide[1]
    assert "http://[::]:8080/" in http_banner(("::", 8080), home)[0]


async def test_ws_book_deltas_rebuild_the_book_through_random_trading(tmp_path: Path) -> None:
    """A client that applies the deltas (and resumes with since after each reconnect) holds
    exactly GET /orderbook's book at the same sequence number, through random orders, cancels
    and takes from two keys."""
    ids = identities(2)
    market = witnessed(ids[:1])
    rng = random.Random(11)
    async with network(tmp_path) as net:
        a, b = net.add(ids[0], market), net.add(ids[1], market)
        async with serving(net, a, tmp_path / "n0") as api:
            bids: dict[str, str] = {}
            asks: dict[str, str] = {}
            last: int | None = None
            for session in range(4):
                async with open_websocket_url(api.ws_url) as ws:
                    sub: dict[str, Any] = {"op": "subscribe", "channel": "book"}
                    if last is not None:
                        sub["since"] = last
                    await ws.send_message(json.dumps(sub))
                    for _ in range(25):
                        actor = rng.choice([a, b])
                        if rng.random() < 0.8:
                            await actor.call(
                                "submit",
                                side=rng.choice(["buy", "sell"]),
                                price=str(rng.randint(95, 105)),
                                quantity=str(rng.randint(1, 4)),
                            )
                        else:
                            mine = (await actor.call("orders", open=True))["orders"]
                            if mine:
                                await actor.call("cancel", order_id=rng.choice(mine)["id"])
                        await trio.sleep(rng.choice([0, 0.01, 0.05]))
                    await until(lambda: a.ms.replica.order_count == b.ms.replica.order_count)
                    book = await api.get("/api/v1/orderbook", limit=500)
                    while last != book["nonce"]:
                        if last is not None and last > book["nonce"]:
                            # changed after the read (a heartbeat re-placed a batch): read again
                            book = await api.get("/api/v1/orderbook", limit=500)
                            continue
                        message = await recv_channel(ws, "book")
                        if message["type"] == "snapshot":
                            # only the very first subscription may start from a snapshot
                            assert session == 0 and last is None
                            bids = dict(map(tuple, message["bids"]))
                            asks = dict(map(tuple, message["asks"]))
                        else:
                            assert message["pu"] == last and message["U"] == last + 1
                            apply_levels(bids, message["bids"])
                            apply_levels(asks, message["asks"])
                        last = message["u"]
                    assert bids == dict(map(tuple, book["bids"]))
                    assert asks == dict(map(tuple, book["asks"]))
                # while away, the book changes
                await a.call("submit", side="buy", price=str(90 - session), quantity="1")


async def test_ws_connections_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_websocket import ConnectionClosed

    from crdtbook.node import http_api

    monkeypatch.setattr(http_api, "MAX_WS_CONNECTIONS", 2)
    ids = identities(1)
    async with network(tmp_path) as net:
        a = net.add(ids[0], witnessed(ids))
        async with serving(net, a, tmp_path / "n0") as api:
            async with open_websocket_url(api.ws_url), open_websocket_url(api.ws_url) as second:
                # One too many: closed at once with 1013 (try again later) and why.
                async with open_websocket_url(api.ws_url) as third:
                    with pytest.raises(ConnectionClosed) as closed:
                        await recv(third)
                    assert closed.value.reason.code == 1013
                    assert "try again later" in (closed.value.reason.reason or "")
                await second.send_message(json.dumps({"op": "subscribe", "channel": "status"}))
                assert (await recv(second))["op"] == "subscribed"
            # closed connections free their places
            with trio.fail_after(10):
                while True:
                    try:
                        async with open_websocket_url(api.ws_url) as ws:
                            await ws.send_message(
                                json.dumps({"op": "subscribe", "channel": "status"})
                            )
                            assert (await recv(ws))["op"] == "subscribed"
                            break
                    except ConnectionClosed:  # the server has not seen the closes yet
                        await trio.sleep(0.05)


# -- hostile input: never a 500, always the error shape -------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
_FIELD_VALUES = st.one_of(
    _JSON,
    st.sampled_from(["W", "w", "buy", "sell", "limit", "market", "GTC", "PO", "1", "0", "-1"]),
    st.sampled_from(["1e3", "0.5", "99999999999999999999", "expire_both", "5%", "200%", ""]),
)
_ORDER_BODIES = st.fixed_dictionaries(
    {},
    optional={
        k: _FIELD_VALUES
        for k in (
            "symbol",
            "type",
            "side",
            "amount",
            "price",
            "clientOrderId",
            "timeInForce",
            "postOnly",
            "selfTradePrevention",
            "band",
        )
    },
)
_QUERY = st.dictionaries(
    st.sampled_from(["symbol", "limit", "since", "status", "cursor", "clientOrderIdPrefix"]),
    st.text(max_size=12),
    max_size=4,
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    requests=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    ("GET", "/api/v1/orderbook"),
                    ("GET", "/api/v1/trades"),
                    ("GET", "/api/v1/orders"),
                    ("GET", "/api/v1/orders/ab"),
                    ("DELETE", "/api/v1/orders/00"),
                    ("DELETE", "/api/v1/orders"),
                    ("POST", "/api/v1/orders"),
                ]
            ),
            _QUERY,
            _ORDER_BODIES
            | _JSON
            | st.builds(
                order,
                st.sampled_from(["buy", "sell"]),
                st.sampled_from(["1", "2", "3"]),
                st.sampled_from(["1", "2"]),
            ),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_hostile_requests_get_errors_not_crashes(
    hostile_api: tuple[httpx.AsyncClient, dict[str, str]],
    requests: list[tuple[tuple[str, str], dict[str, str], Any]],
) -> None:
    client, auth = hostile_api
    doc = openapi_document()

    async def run() -> None:
        for (method, path), query, body in requests:
            kwargs: dict[str, Any] = {"params": query, "headers": auth}
            if method == "POST":
                kwargs["content"] = json.dumps(body)
            r = await client.request(method, path, **kwargs)
            assert r.status_code < 500, (method, path, query, body, r.text)
            statuses.add(r.status_code)
            if r.status_code >= 400:
                _check(doc, doc["components"]["schemas"]["Error"], r.json())

    trio.run(run)


#: Every status the hostile requests got (checked: they reached success paths too).
statuses: set[int] = set()


def test_hostile_requests_reached_success_paths() -> None:
    if not statuses:
        pytest.skip("runs after test_hostile_requests_get_errors_not_crashes only")
    assert 200 in statuses and 400 in statuses


@pytest.fixture
def hostile_api(tmp_path: Path) -> Iterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    """An app over one node's service in process (no server task: ASGI calls, fresh trio runs)."""
    from crdtbook.node.handler import ControlAdapter
    from crdtbook.node.service import NodeService
    from crdtbook.node.store import OpStore

    ids = identities(1)
    store = OpStore.open(tmp_path, synchronous="NORMAL")
    service = NodeService(ids[0], store, [witnessed(ids)], publish_interval=0.0)
    service.load_from_store()
    adapter = ControlAdapter(service, lambda: {"peer_id": "p", "addrs": []})
    app = create_app(adapter, "0" * 64)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node")
    try:
        yield client, {"Authorization": "Bearer " + "0" * 64}
    finally:
        store.close()


async def test_hostile_websocket_messages_get_errors_and_the_connection_lives(
    tmp_path: Path,
) -> None:
    rng = random.Random(3)
    weird: list[Any] = [None, 1, -1, 2**70, 1.5, True, "", "x" * 300, [], {}, ["book"], {"a": 1}]
    fields = {
        "op": ["subscribe"] * 6 + ["unsubscribe", "auth", *weird],
        "channel": ["book", "trades", "private", "status"] * 3 + weird,
        "symbol": ["W", "w", "W/", *weird],
        "since": [0, 2**63, -5, *weird],
        "token": ["0" * 64, *weird],
    }
    ids = identities(1)
    async with network(tmp_path) as net:
        a = net.add(ids[0], witnessed(ids))
        async with serving(net, a, tmp_path / "n0") as api, open_websocket_url(api.ws_url) as ws:
            errors: list[dict[str, Any]] = []

            async def read() -> None:
                while True:
                    reply = await recv(ws)
                    if "error" in reply:
                        errors.append(reply)
                    if reply.get("op") == "subscribed" and reply.get("channel") == "status":
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                for _ in range(1000):
                    message = {k: rng.choice(v) for k, v in fields.items() if rng.random() < 0.7}
                    if rng.random() < 0.1:
                        message = rng.choice(weird)
                    await ws.send_message(json.dumps(message))
                await ws.send_message(json.dumps({"op": "subscribe", "channel": "status"}))
            assert len(errors) > 100
            assert [e for e in errors if e["error"]["code"] == "internal"] == []


async def test_streams_and_reads_go_on_across_compactions(tmp_path: Path) -> None:
    """A witnessed market compacting under the streams (issue #10): the trades stream ends with
    exactly the trades GET /trades reads (partly from the store), the book stream with GET
    /orderbook's book, and nothing fails."""
    from .test_compaction import MARKET, Node, author

    node = Node(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_http, node.adapter, tmp_path, "127.0.0.1", 0)
            base = f"http://{host}:{port}"
            trades: dict[str, dict[str, Any]] = {}
            bids: dict[str, str] = {}
            asks: dict[str, str] = {}
            errors: list[Any] = []
            last_u = 0
            async with open_websocket_url(base.replace("http", "ws") + "/ws") as ws:

                async def read() -> None:
                    nonlocal last_u
                    while True:
                        message = json.loads(await ws.get_message())
                        if "error" in message:
                            errors.append(message)
                        elif "op" in message:  # subscribed
                            continue
                        elif message.get("channel") == "trades":
                            for t in message["trades"]:
                                trades[t["id"]] = t
                            for tid in message["revoked"]:
                                trades.pop(tid, None)
                            for tid in message["became_final"]:
                                trades[tid]["final"] = True
                        elif message.get("channel") == "book":
                            if message["type"] == "snapshot":
                                bids.clear(), asks.clear()
                            else:
                                assert message["pu"] == last_u
                            apply_levels(bids, message["bids"])
                            apply_levels(asks, message["asks"])
                            last_u = message["u"]

                for channel in ("trades", "book"):
                    sub = {"op": "subscribe", "channel": channel, "symbol": MARKET.name}
                    await ws.send_message(json.dumps(sub))
                async with (
                    httpx.AsyncClient(base_url=base, timeout=10) as client,
                    trio.open_nursery() as reading,
                ):
                    reading.start_soon(read)
                    ops = author(700, seed=4)
                    service, ms = node.service, node.ms
                    for start in range(0, len(ops), 100):
                        # ops arrive and are pushed provisional; then a heartbeat makes them
                        # final and a compaction takes them out of memory before the next push
                        raws = [op.raw for op in ops[start : start + 100]]
                        await service.commit(ms, await service.prepare(ms, raws), "test")
                        await trio.sleep(0.15)
                        await service.heartbeat(ms)
                        if service.compaction_due(ms):
                            assert await service.compact(ms)
                        await trio.sleep(0.15)
                    assert node.ms.compactions >= 2 and node.ms.replica.compacted_fills > 0
                    fills = node.ms.replica.fill_count
                    assert fills <= 1000
                    with trio.fail_after(10):
                        while len(trades) < fills or not all(t["final"] for t in trades.values()):
                            await trio.sleep(0.05)
                    r = await client.get("/api/v1/trades", params={"limit": 1000})
                    assert r.status_code == 200
                    assert {t["id"] for t in r.json()} == set(trades)
                    book = (await client.get("/api/v1/orderbook", params={"limit": 500})).json()
                    with trio.fail_after(10):
                        while last_u != book["nonce"]:
                            await trio.sleep(0.05)
                    assert bids == dict(map(tuple, book["bids"]))
                    assert asks == dict(map(tuple, book["asks"]))
                    assert errors == []
                    reading.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    finally:
        node.close()


# -- a schemathesis sweep and hand tests (session 17): each was a defect -------------------------


def test_swept_requests_are_refused_cleanly_and_change_nothing(
    hostile_api: tuple[httpx.AsyncClient, dict[str, str]],
) -> None:
    client, auth = hostile_api

    async def run() -> None:
        async def post(body: Any) -> httpx.Response:
            return await client.post("/api/v1/orders", content=json.dumps(body), headers=auth)

        async def open_ids() -> list[str]:
            r = await client.get("/api/v1/orders", params={"status": "open"}, headers=auth)
            return [o["id"] for o in r.json()["orders"]]

        ask = await post(order("sell", "10", "1", clientOrderId="ask-1"))
        assert ask.status_code == 200, ask.text
        # postOnly "true" or 1 was taken as false: the order took instead of resting.
        for value in ("true", 1, "yes", 0):
            r = await post(order("buy", "10", "1", postOnly=value))
            assert r.status_code == 400, (value, r.text)
            assert "postOnly must be true or false" in r.json()["error"]["message"]
        assert (await post(order("buy", "10", "1", postOnly=True))).json()["status"] == "rejected"
        # Deep nesting: a RecursionError, a 500 and a traceback.
        deep = "[" * 5000 + "]" * 5000
        r = await client.post("/api/v1/orders", content=deep, headers=auth)
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
        # A lone surrogate in a name the error echoes: a plain-text 500.
        r = await client.post(
            "/api/v1/orders",
            content='{"symbol": "W\\ud800", "side": "buy", "price": "1", "amount": "1"}',
            headers=auth,
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_market"
        # A misspelt query parameter was ignored: clientOrderIDPrefix cancelled every order.
        keep = await post(order("sell", "11", "1", clientOrderId="keep-1"))
        assert keep.status_code == 200
        r = await client.delete(
            "/api/v1/orders", params={"clientOrderIDPrefix": "ask-"}, headers=auth
        )
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "unknown query parameter 'clientOrderIDPrefix'" in message
        assert "did you mean clientOrderIdPrefix?" in message and "nothing was done" in message
        assert len(await open_ids()) == 2
        r = await client.get("/api/v1/markets", params={"x": "1"})
        assert r.status_code == 400 and "this path takes none" in r.json()["error"]["message"]
        # The open-orders cursor met an order that closed since the last page: a 400.
        first = await client.get(
            "/api/v1/orders", params={"status": "open", "limit": 1}, headers=auth
        )
        page = first.json()
        assert len(page["orders"]) == 1 and page["next_cursor"] == page["orders"][0]["id"]
        gone = await client.delete(f"/api/v1/orders/{page['next_cursor']}", headers=auth)
        assert gone.status_code == 200
        rest = await client.get(
            "/api/v1/orders",
            params={"status": "open", "limit": 1, "cursor": page["next_cursor"]},
            headers=auth,
        )
        assert rest.status_code == 200, rest.text
        assert [o["id"] for o in rest.json()["orders"]] == await open_ids()
        assert rest.json()["orders"][0]["id"] != page["next_cursor"]
        r = await client.get("/api/v1/orders", params={"cursor": "f" * 64}, headers=auth)
        assert r.status_code == 400 and "not an order of this list" in r.text
        # RFC 9110: a 405 names the methods (Allow), a 401 the scheme (WWW-Authenticate).
        r = await client.put("/api/v1/orders", headers=auth)
        assert r.status_code == 405 and set(r.headers["allow"].split(", ")) >= {"GET", "POST"}
        r = await client.get("/api/v1/orders")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"

    trio.run(run)


async def test_ws_refused_requests_leave_the_running_subscriptions(tmp_path: Path) -> None:
    """A re-subscribe refused for its `since` cancelled the running book subscription first;
    a deeply nested message closed the connection (1011) with all of them."""
    ids = identities(1)
    async with network(tmp_path) as net:
        a = net.add(ids[0], witnessed(ids))
        async with serving(net, a, tmp_path / "n0") as api, open_websocket_url(api.ws_url) as ws:
            await ws.send_message(json.dumps({"op": "subscribe", "channel": "book"}))
            assert (await recv(ws))["op"] == "subscribed"
            await recv_channel(ws, "book")  # the snapshot
            bad = {"op": "subscribe", "channel": "book", "since": "x"}
            await ws.send_message(json.dumps(bad))
            assert (await recv(ws))["error"]["code"] == "bad_request"
            await ws.send_message("[" * 3000 + "]" * 3000)
            error = await recv(ws)
            assert "nested too deeply" in error["error"]["message"]
            await a.call("submit", side="buy", price="90", quantity="1")
            update = await recv_channel(ws, "book")  # still subscribed
            assert update["type"] == "delta"
