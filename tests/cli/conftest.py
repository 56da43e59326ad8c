"""Fixtures for the CLI tests: canned control-API values, a fake client, a fake socket server.

``fake_node`` replaces the control client module (``crdtbook.cli.connect.client_api``) with an
in-process fake that records every call and answers from a dict. ``socket_node`` instead serves
the real wire protocol (newline-delimited JSON on HOME/control.sock) from a thread, so the real
``crdtbook.node.client.ControlClient`` can be exercised without a node.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from crdtbook import Identity

Json = dict[str, Any]

A = "a1" * 32  # order ids / authors, 64 hex digits
B = "b2" * 32
C = "c3" * 32
# Witness keys must be real ed25519 public keys (a market definition refuses any other), so
# these three come from fixed seeds.
ME = Identity.from_seed(b"\xe5" * 32).public_key.hex()
OTHER = Identity.from_seed(b"\xf6" * 32).public_key.hex()
THIRD = Identity.from_seed(b"\x0a" * 32).public_key.hex()
DIGEST = "d4" * 32
SIGNATURE = "5e" * 64
#: The DEMO market the canned answers follow: witnessed by this node and two others.
WITNESSES = sorted([ME, OTHER, THIRD])
DEMO_SPEC = "DEMO:1:1:" + ",".join(WITNESSES)


def order(**over: Any) -> Json:
    """An Order as the control API returns it (DEMO market, tick 1, lot 1)."""
    o: Json = {
        "id": A,
        "market": "DEMO",
        "author": ME,
        "side": "buy",
        "price": "100",
        "price_ticks": 100,
        "quantity": "5",
        "quantity_lots": 5,
        "remaining": "0",
        "remaining_lots": 0,
        "filled": "5",
        "filled_lots": 5,
        "tif": "gtc",
        "status": "filled",
        "reason": None,
        "tag": None,
        "mine": True,
        "lamport": 7,
        "final": False,
    }
    o.update(over)
    return o


def fill(index: int = 0, **over: Any) -> Json:
    """A Fill as the control API returns it."""
    f: Json = {
        "index": index,
        "market": "DEMO",
        "taker": A,
        "maker": B,
        "taker_side": "buy",
        "price": "100",
        "price_ticks": 100,
        "quantity": "5",
        "quantity_lots": 5,
        "taker_author": ME,
        "maker_author": OTHER,
        "final": False,
    }
    f.update(over)
    return f


def level(price: int, qty: int, orders: int = 1, final: bool = True) -> Json:
    """A book Level."""
    return {
        "price": str(price),
        "price_ticks": price,
        "quantity": str(qty),
        "quantity_lots": qty,
        "orders": orders,
        "final": final,
    }


BOOK: Json = {
    "market": "DEMO",
    "bids": [level(95, 2, final=False), level(94, 4, 2)],
    "asks": [level(105, 2), level(106, 3)],
    "best_bid": "95",
    "best_ask": "105",
    "spread": "10",
    "mid": "100",
    "digest": DIGEST,
    "witnessed": True,
    "frontier": 41,
}


def witness(key: str, **over: Any) -> Json:
    """One witness of a MarketStatus."""
    w: Json = {
        "key": key,
        "me": key == ME,
        "current": True,
        "forked": False,
        "heartbeat_lamport": 41,
        "heartbeat_seq": 3,
        "silent_s": 0.4,
    }
    w.update(over)
    return w


STATUS: Json = {
    "peer_id": "12D3KooWFakePeerOne",
    "addrs": ["/ip4/127.0.0.1/tcp/40001/p2p/12D3KooWFakePeerOne"],
    "peers": [{"peer_id": "12D3KooWFakePeerTwo", "addrs": ["/ip4/127.0.0.1/tcp/40002"]}],
    "markets": [
        {
            "name": "DEMO",
            "id": "9a" * 32,
            "tick": "1",
            "lot": "1",
            "ops": 9,
            "pending": 0,
            "heads": ["7b" * 32],
            "digest": DIGEST,
            "last_sync": None,
            "orders": 6,
            "fills": 2,
            "witnessed": True,
            "frontier": 41,
            "final_ops": 7,
            "final_fills": 1,
            "epoch": 0,
            "finality": "stalled",
            "stalled_on": [THIRD],
            "witnesses": [
                witness(THIRD, heartbeat_lamport=12, heartbeat_seq=1, silent_s=75.0),
                witness(ME),
                witness(OTHER, heartbeat_lamport=40, heartbeat_seq=2, silent_s=1.2),
            ],
        }
    ],
    "author": ME,
    "version": "0.1.0",
    "uptime": 65.0,
    "pid": 4242,
    "sync_sessions": {"serving": 0, "pulling": 1, "served": 40, "pulled": 12, "ops_pulled": 3},
    "loop": {"busy": 0.32, "early_publish": True},
}


def default_answers() -> dict[str, Any]:
    """Fresh canned results for every method."""
    return copy.deepcopy(
        {
            "status": STATUS,
            "markets": [
                {
                    "name": "DEMO",
                    "id": demo_market_id(),
                    "tick": "1",
                    "lot": "1",
                    "spec": DEMO_SPEC,
                    "version": 2,
                    "witnessed": True,
                    "witnesses": 3,
                    "frontier": 41,
                }
            ],
            "submit": {
                "order": order(),
                "fills": [fill()],
                "final": False,
                "self_trade_expired": [],
            },
            "cancel_all": {
                "market": "DEMO",
                "cancel_id": C,
                "prefix": None,
                "cancelled": 2,
                "final": False,
            },
            "cancel": {
                "order": order(status="cancelled", reason="cancelled", filled="0", remaining="5"),
                "cancel_id": C,
                "effective": True,
            },
            "book": BOOK,
            "fills": {
                "market": "DEMO",
                "fills": [fill(0, final=True), fill(1, taker_side="sell")],
                "witnessed": True,
                "final_count": 1,
            },
            "orders": {
                "market": "DEMO",
                "orders": [order(final=True), order(id=B, status="open")],
            },
            "order": order(),
            "id": {
                "peer_id": STATUS["peer_id"],
                "addrs": STATUS["addrs"],
                "public_key": ME,
            },
            "approve_reconfig": {"witness": ME, "signature": SIGNATURE, "epoch": 1},
            "reconfigure": {"op": C, "epoch": 1},
        }
    )


def demo_market_id() -> str:
    """The id of the canned DEMO market (witnessed by WITNESSES), as the core computes it."""
    from crdtbook import Market

    return Market.parse(DEMO_SPEC).id.hex()


class FakeControlError(Exception):
    """Stands in for ``crdtbook.node.client.ControlError``."""

    def __init__(self, code: str, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class FakeNodeNotRunning(Exception):
    """Stands in for ``crdtbook.node.client.NodeNotRunning``."""


@dataclass
class FakeNode:
    """What the fake clients talk to: canned answers, recorded calls and homes."""

    answers: dict[str, Any] = field(default_factory=default_answers)
    calls: list[tuple[str, Json]] = field(default_factory=list)
    homes: list[Path] = field(default_factory=list)
    timeouts: list[float | None] = field(default_factory=list)
    events: list[Json] = field(default_factory=list)
    watch_error: BaseException | None = None
    running: bool = True

    def last(self, method: str) -> Json:
        """Params of the last call of ``method``."""
        for m, params in reversed(self.calls):
            if m == method:
                return params
        raise AssertionError(f"{method} was not called; calls: {self.calls}")


class FakeClient:
    """Same surface as ``ControlClient``: ``call`` and ``watch``."""

    def __init__(self, node: FakeNode, home: Path, timeout: float | None = None) -> None:
        self.node = node
        self.home = home
        self.timeout = timeout
        node.homes.append(home)
        node.timeouts.append(timeout)

    def _check(self) -> None:
        if not self.node.running:
            raise FakeNodeNotRunning(
                f"no crdtbook node is running at {self.home} "
                f"(start one with: crdtbook node --home {self.home})"
            )

    def call(self, method: str, **params: Any) -> Any:
        self._check()
        self.node.calls.append((method, params))
        answer = self.node.answers[method]
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):
            return answer(**params)
        return copy.deepcopy(answer)

    def watch(self, market: str | None = None) -> Iterator[Json]:
        # Like the real client: the request goes out (and is refused) at once, events later.
        self._check()
        self.node.calls.append(("watch", {"market": market}))
        return self._events(market)

    def _events(self, market: str | None) -> Iterator[Json]:
        yield from self.node.events
        if self.node.watch_error is not None:
            raise self.node.watch_error


@pytest.fixture
def fake_node(monkeypatch: pytest.MonkeyPatch) -> FakeNode:
    """Route the CLI to an in-process fake node."""
    from crdtbook.cli import connect

    node = FakeNode()
    api = SimpleNamespace(
        ControlClient=lambda home, timeout=None: FakeClient(node, Path(home), timeout),
        NodeNotRunning=FakeNodeNotRunning,
        ControlError=FakeControlError,
        resolve_home=lambda home: Path(home) if home is not None else Path("/fake/default-home"),
    )
    monkeypatch.setattr(connect, "client_api", lambda: api)
    monkeypatch.delenv("CRDTBOOK_HOME", raising=False)
    return node


# ------------------------------------------------------------------------- fake socket server


@dataclass
class SocketNode:
    """A thread serving the control protocol on ``home/control.sock`` from canned answers."""

    home: Path
    answers: dict[str, Any] = field(default_factory=default_answers)
    requests: list[Json] = field(default_factory=list)
    events: list[Json] = field(default_factory=list)

    def handle(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for raw in f:
                try:
                    req = json.loads(raw)
                except ValueError:
                    reply: Json = {"id": None, "error": {"code": "bad_request", "message": "json"}}
                    f.write(json.dumps(reply).encode() + b"\n")
                    f.flush()
                    continue
                self.requests.append(req)
                method = req.get("method")
                if method == "watch":
                    market = (req.get("params") or {}).get("market") or "DEMO"
                    lines = [{"id": req["id"], "result": {"watching": market}}, *self.events]
                    for line in lines:
                        f.write(json.dumps(line).encode() + b"\n")
                    f.flush()
                    return  # closing the stream ends the client's watch
                answer = self.answers.get(method)
                if isinstance(answer, FakeControlError):
                    reply = {
                        "id": req["id"],
                        "error": {"code": answer.code, "message": answer.message},
                    }
                elif answer is None:
                    reply = {
                        "id": req["id"],
                        "error": {"code": "unknown_method", "message": f"no method {method}"},
                    }
                else:
                    reply = {"id": req["id"], "result": answer}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()


@pytest.fixture
def socket_node(monkeypatch: pytest.MonkeyPatch) -> Iterator[SocketNode]:
    """A fake node speaking the real wire protocol (needs ``crdtbook.node.client``)."""
    pytest.importorskip("crdtbook.node.client")
    root = Path(tempfile.mkdtemp(prefix="cbk-", dir="/tmp"))  # short: AF_UNIX paths are limited
    home = root / "home"
    home.mkdir(mode=0o700)
    node = SocketNode(home=home)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(home / "control.sock"))
    os.chmod(home / "control.sock", 0o600)
    srv.listen(8)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=node.handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    monkeypatch.delenv("CRDTBOOK_HOME", raising=False)
    try:
        yield node
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            srv.shutdown(socket.SHUT_RDWR)
        srv.close()
        thread.join(timeout=5)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def samples() -> SimpleNamespace:
    """The sample builders and constants, for tests (conftest is not importable by name)."""
    return SimpleNamespace(
        order=order,
        fill=fill,
        level=level,
        witness=witness,
        BOOK=BOOK,
        STATUS=STATUS,
        A=A,
        B=B,
        C=C,
        ME=ME,
        OTHER=OTHER,
        THIRD=THIRD,
        WITNESSES=WITNESSES,
        DEMO_SPEC=DEMO_SPEC,
        SIGNATURE=SIGNATURE,
        DIGEST=DIGEST,
        ControlError=FakeControlError,
        NodeNotRunning=FakeNodeNotRunning,
    )
