"""The HTTP API on real node processes (issue #11): an order placed over HTTP on node A takes
an order resting at node B, and B's WebSocket streams show the trade (public) and B's side of
it (private); both nodes stop in order with WebSockets open."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from .harness import NodeProcess, wait_until

pytestmark = pytest.mark.timeout(120)

MARKET = "DEMO:1:1"


def http_base(node: NodeProcess) -> str:
    """The URL the node printed at start (it was given port 0: a free one)."""
    found = re.search(r"http api and web view on (http://[0-9.]+:\d+)/", node.log_path.read_text())
    assert found, node.log()
    return found.group(1)


def token(node: NodeProcess) -> str:
    return (node.home / "http.token").read_text().strip()


async def push(ws: WebSocketConnection, channel: str) -> dict[str, Any]:
    """The next push of ``channel`` (replies and other channels skipped)."""
    while True:
        with trio.fail_after(30):
            message = json.loads(await ws.get_message())
        if "op" not in message and message.get("channel") == channel:
            return dict(message)


async def test_order_over_http_on_a_fills_on_bs_websocket(tmp_path: Path) -> None:
    config = {"http": ["127.0.0.1", 0]}
    nodes: list[NodeProcess] = []
    try:
        a = NodeProcess(tmp_path / "a", market=MARKET, config=config)
        nodes.append(a)
        await trio.to_thread.run_sync(a.start)
        b = NodeProcess(tmp_path / "b", [a.addr], market=MARKET, config=config)
        nodes.append(b)
        await trio.to_thread.run_sync(b.start)
        await trio.to_thread.run_sync(
            lambda: wait_until(lambda: a.peers() >= 1 and b.peers() >= 1, 30, "peers")
        )
        base_a, base_b = http_base(a), http_base(b)
        auth_a = {"Authorization": f"Bearer {token(a)}"}
        auth_b = {"Authorization": f"Bearer {token(b)}"}
        url_b = base_b.replace("http://", "ws://") + "/ws"
        async with (
            httpx.AsyncClient(timeout=15) as client,
            open_websocket_url(url_b) as ws,
        ):
            await ws.send_message(json.dumps({"op": "auth", "token": token(b)}))
            for channel in ("trades", "private", "book"):
                await ws.send_message(
                    json.dumps({"op": "subscribe", "channel": channel, "symbol": "DEMO"})
                )
            assert (await push(ws, "trades"))["type"] == "snapshot"
            assert (await push(ws, "private"))["type"] == "snapshot"
            assert (await push(ws, "book"))["type"] == "snapshot"
            maker = await client.post(
                f"{base_b}/api/v1/orders",
                json={"symbol": "DEMO", "side": "sell", "price": "100", "amount": "3"},
                headers=auth_b,
            )
            assert maker.status_code == 200, maker.text
            # the ask reaches A by gossip; A's book says so
            with trio.fail_after(30):
                while True:
                    r = await client.get(f"{base_a}/api/v1/orderbook", params={"symbol": "DEMO"})
                    if r.json()["asks"] == [["100", "3"]]:
                        break
                    await trio.sleep(0.05)
            taker = await client.post(
                f"{base_a}/api/v1/orders",
                json={"symbol": "DEMO", "side": "buy", "price": "100", "amount": "2"},
                headers=auth_a,
            )
            assert taker.status_code == 200, taker.text
            (fill,) = taker.json()["fills"]
            # the trade on the public stream and B's side of it on the private one, in
            # whichever order the two pushes come
            public: list[dict[str, Any]] = []
            private: list[dict[str, Any]] = []
            while not (public and private):
                with trio.fail_after(30):
                    message = json.loads(await ws.get_message())
                if message.get("type") == "update":
                    public += message.get("trades", [])
                    private += message.get("fills", [])
            assert [t["id"] for t in public] == [fill["id"]]
            assert public[0]["price"] == "100" and public[0]["amount"] == "2"
            (maker_fill,) = private
            assert maker_fill["id"] == fill["id"] and maker_fill["takerOrMaker"] == "maker"
            assert maker_fill["order"] == maker.json()["id"]
            r = await client.get(f"{base_b}/api/v1/orders/{maker.json()['id']}", headers=auth_b)
            assert r.json()["filled"] == "2" and r.json()["status"] == "open"
            # stop both nodes with this WebSocket still open: each stops in order (exit 0)
            for node in nodes:
                code = await trio.to_thread.run_sync(node.stop)
                assert code in (0, None), node.log()
    finally:
        for node in nodes:
            await trio.to_thread.run_sync(node.stop)
