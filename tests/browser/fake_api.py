"""A fake node for the web view, inside the browser: Playwright answers the page's REST calls and
plays the node's side of its WebSocket (specs/http-api.md shapes), so a test decides exactly
what the page receives and when (a gap in the book stream, a revoked trade) without a node.

The page's files are served from node/web/ as the node serves them (``/`` and ``/static/``).
No socket is opened: requests to ``ORIGIN`` never leave the browser.
"""

from __future__ import annotations

import json
import mimetypes
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

WEB = Path(__file__).resolve().parents[2] / "node" / "web"
ORIGIN = "http://crdtbook.test"
TOKEN = "7e" * 32
SYMBOL = "BTC-USD"
ME = "4e6008b01b74e49e38d8b11392bfaccc7b5bff86ca2048cbb0f783633a61e2dd"
OTHER = "c9077518cfa438767ed68c718178cf1a92343d3c5ffc854f22658b65cba262f0"
PEER_ID = "12D3KooWQzY5Qx8R8mNhbTdcFvC7xg6Y7CVDNrr4D7WYxQrD9r3H"

Json = dict[str, Any]


def trade(tid: str, price: str, amount: str, side: str, ts: int, final: bool, index: int) -> Json:
    return {
        "id": tid,
        "order": tid * 4,
        "timestamp": ts,
        "datetime": None,
        "symbol": SYMBOL,
        "side": side,
        "price": price,
        "amount": amount,
        "cost": str(float(price) * float(amount)),
        "takerOrMaker": None,
        "final": final,
        "info": {"index": index},
    }


def order(oid: str, side: str, price: str, amount: str, ts: int, final: bool = False) -> Json:
    return {
        "id": oid,
        "clientOrderId": None,
        "timestamp": ts,
        "datetime": None,
        "symbol": SYMBOL,
        "type": "limit",
        "side": side,
        "price": price,
        "amount": amount,
        "filled": "0",
        "remaining": amount,
        "status": "open",
        "timeInForce": "GTC",
        "postOnly": False,
        "final": final,
        "info": {},
    }


class FakeNode:
    """Canned answers; ``ws`` is the page's WebSocket once it connects, ``sent`` what it sent."""

    def __init__(self) -> None:
        self.markets: list[Json] = [
            {
                "id": SYMBOL,
                "symbol": SYMBOL,
                "base": "BTC",
                "quote": "USD",
                "active": True,
                "precision": {"price": "0.5", "amount": "0.001"},
                "info": {
                    "tick": "0.5",
                    "lot": "0.001",
                    "witnessed": True,
                    "witnesses": [ME, OTHER],
                },
            }
        ]
        self.bids = [["100.5", "1.2"], ["100", "0.75"], ["99.5", "3"], ["98", "4.5"]]
        self.asks = [["101", "0.5"], ["101.5", "2.25"], ["102", "1"], ["104", "6"]]
        #: The final book: one bid and one ask level differ (they are provisional).
        self.final = {
            "bids": [["100", "0.75"], ["99.5", "3"], ["98", "4.5"]],
            "asks": [["101.5", "2.25"], ["102", "1"], ["104", "6"]],
        }
        self.trades = [
            trade("t1", "100.5", "0.2", "sell", 1_764_660_000_000, True, 0),
            trade("t2", "101", "0.1", "buy", 1_764_660_001_000, True, 1),
            trade("t3", "101", "0.4", "buy", 1_764_660_002_000, False, 2),
        ]
        self.orders = [order("a1" * 32, "buy", "100.5", "1.2", 1_764_660_003_000)]
        self.status: Json = {
            "peer_id": PEER_ID,
            "addrs": [f"/ip4/127.0.0.1/tcp/40001/p2p/{PEER_ID}"],
            "peers": [{"peer_id": "12D3KooWPeerTwo", "addrs": ["/ip4/127.0.0.1/tcp/40002"]}],
            "markets": [
                {
                    "name": SYMBOL,
                    "witnessed": True,
                    "finality": "pending",
                    "frontier": 41,
                    "epoch": 0,
                    "fills": 3,
                    "final_fills": 2,
                    "stalled_on": [],
                    "witnesses": [
                        {"key": ME, "me": True, "current": True, "silent_s": 0.2},
                        {"key": OTHER, "me": False, "current": True, "silent_s": 0.4},
                    ],
                }
            ],
        }
        self.seq = 1000
        self.ws: Any = None
        self.sent: list[Json] = []
        self.posted: list[Json] = []
        self.deleted: list[str] = []
        #: The answer to the next DELETE of one order, over the default (cancelled, provisional).
        self.cancel_answer: Json = {}
        #: Drop the next POST /orders without an answer (the connection broke).
        self.post_fails = False

    # ------------------------------------------------------------------------------ REST

    def install(self, page: Any) -> None:
        page.route(f"{ORIGIN}/**", self._http)
        page.route_web_socket(f"ws://{urlparse(ORIGIN).netloc}/ws", self._ws)

    def _http(self, route: Any) -> None:
        request = route.request
        url = urlparse(request.url)
        path = url.path
        if path == "/" or path.startswith("/static/"):
            file = WEB / ("index.html" if path == "/" else path.removeprefix("/static/"))
            if not file.is_file():
                route.fulfill(status=404, body="not found")
                return
            ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            if file.suffix in (".js", ".mjs"):
                ctype = "text/javascript"
            route.fulfill(status=200, body=file.read_bytes(), headers={"Content-Type": ctype})
            return
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if self.post_fails and request.method == "POST":
            route.abort()
            return
        authed = request.headers.get("authorization") == f"Bearer {TOKEN}"
        status, body = self.answer(
            request.method, path.removeprefix("/api/v1"), query, authed, request.post_data
        )
        route.fulfill(
            status=status, body=json.dumps(body), headers={"Content-Type": "application/json"}
        )

    def answer(
        self, method: str, path: str, query: dict[str, str], authed: bool, data: str | None
    ) -> tuple[int, Any]:
        if path == "/markets":
            return 200, self.markets
        if path == "/orderbook":
            return 200, {
                "symbol": SYMBOL,
                "bids": self.bids,
                "asks": self.asks,
                "nonce": self.seq,
                "final": self.final,
                "witnessed": True,
            }
        if path == "/trades":
            return 200, self.trades
        if path == "/status":
            return 200, self.status
        if not authed:
            return 401, {"error": {"code": "unauthorized", "message": "needs the token"}}
        if path == "/orders" and method == "POST":
            body = json.loads(data or "{}")
            self.posted.append(body)
            placed = order(
                "b2" * 32, body["side"], body.get("price", "0"), body["amount"], 1_764_660_009_000
            )
            placed["status"] = "closed"
            placed["filled"], placed["remaining"] = body["amount"], "0"
            placed["fills"] = [{"price": "101", "amount": body["amount"], "final": False}]
            placed["expired"] = [order("c3" * 32, "sell", "101", "0.3", 1_764_660_000_500)]
            return 200, placed
        if path == "/orders" and method == "DELETE":
            self.deleted.append(f"all {query.get('symbol')}")
            return 200, {"op": "c4" * 32, "cancelled": [o["id"] for o in self.orders]}
        if path.startswith("/orders/") and method == "DELETE":
            oid = path.removeprefix("/orders/")
            self.deleted.append(oid)
            gone = next(o for o in self.orders if o["id"] == oid)
            info = {"cancel_id": "cc" * 32, "effective": True, "cancel_final": False}
            return 200, {**gone, "status": "canceled", "remaining": "0", "info": info} | (
                self.cancel_answer
            )
        return 404, {"error": {"code": "not_found", "message": path}}

    # ------------------------------------------------------------------------- WebSocket

    def _ws(self, ws: Any) -> None:
        self.ws = ws
        ws.on_message(self._on_message)

    def _on_message(self, raw: str | bytes) -> None:
        msg = json.loads(raw)
        self.sent.append(msg)
        op, channel = msg.get("op"), msg.get("channel")
        if op == "auth":
            ok = msg.get("token") == TOKEN
            self.push(
                {"op": "auth", "ok": True}
                if ok
                else {"error": {"code": "unauthorized", "message": "wrong token"}}
            )
            return
        if op != "subscribe":
            return
        self.push({"op": "subscribed", "channel": channel, "symbol": msg.get("symbol")})
        if channel == "book":
            self.push(
                {
                    "channel": "book",
                    "type": "snapshot",
                    "symbol": SYMBOL,
                    "u": self.seq,
                    "bids": self.bids,
                    "asks": self.asks,
                }
            )
        elif channel == "trades":
            self.push(
                {
                    "channel": "trades",
                    "type": "snapshot",
                    "symbol": SYMBOL,
                    "trades": self.trades,
                    "revoked": [],
                    "became_final": [],
                }
            )
        elif channel == "private":
            self.push(
                {
                    "channel": "private",
                    "type": "snapshot",
                    "symbol": SYMBOL,
                    "orders": self.orders,
                    "fills": [],
                    "revoked": [],
                    "became_final": [],
                }
            )
        elif channel == "status":
            self.push({"channel": "status", **self.status})

    def push(self, msg: Json) -> None:
        self.ws.send(json.dumps(msg))

    def delta(self, bids: list[list[str]], asks: list[list[str]], skip: int = 0) -> int:
        """Push a book delta after the last one (``skip`` > 0 leaves a gap before it)."""
        pu = self.seq + skip
        self.seq = pu + 1
        self.push(
            {
                "channel": "book",
                "type": "delta",
                "symbol": SYMBOL,
                "U": self.seq,
                "u": self.seq,
                "pu": pu,
                "bids": bids,
                "asks": asks,
            }
        )
        return self.seq
