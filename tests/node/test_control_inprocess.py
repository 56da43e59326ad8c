"""The control server's request/response path in process (issue #13): node/control.py's
connection task on one end of a trio in-memory stream, the node's real handler
(``ControlAdapter`` over a ``NodeService`` with a store in ``tmp_path``) behind it, a JSON-lines
client on the other end. No socket, no process. (tests/node/test_control.py covers the Unix
socket's life cycle and permissions with a fake handler.)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from crdtbook.node.control import _serve_connection
from crdtbook.node.control_errors import (
    BAD_REQUEST,
    INTERNAL,
    MAX_REQUEST_LINE_BYTES,
    UNKNOWN_METHOD,
)
from crdtbook.node.handler import ControlAdapter
from crdtbook.node.wire import encode_batch

from .test_hostile_inputs import BOB, V1, Node, order
from .test_service_inprocess import bare

pytestmark = pytest.mark.timeout(10)


class Client:
    """One control connection's client end: JSON lines out, JSON lines in."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def line(self) -> bytes | None:
        """The next line from the server (None once it closed the connection)."""
        with trio.fail_after(5):
            while b"\n" not in self._buf:
                chunk = await self.stream.receive_some()
                if not chunk:
                    return None
                self._buf += chunk
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf[:] = rest
        return line

    async def read(self) -> dict[str, Any]:
        line = await self.line()
        assert line is not None, "the server closed the connection"
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def call(self, request_id: int, method: str, **params: Any) -> dict[str, Any]:
        await self.send(
            json.dumps({"id": request_id, "method": method, "params": params}).encode() + b"\n"
        )
        return await self.read()


class Served:
    def __init__(self, node: Node, adapter: Any, nursery: trio.Nursery) -> None:
        self.node = node
        self.adapter = adapter
        self.nursery = nursery
        self.closed: list[trio.Event] = []

    def connect(self, handler: Any = None) -> Client:
        """A new connection, served by its own task as the listener would."""
        client, server = trio.testing.memory_stream_pair()
        done = trio.Event()
        self.closed.append(done)

        async def serve() -> None:
            try:
                await _serve_connection(server, handler=handler or self.adapter)  # type: ignore[arg-type]
            finally:
                done.set()

        self.nursery.start_soon(serve)
        return Client(client)


@asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with bare(tmp_path, publish_interval=0.0) as n:
        adapter = ControlAdapter(n.service, lambda: {"peer_id": "peer-test", "addrs": []})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(n.service.apply_loop, n.ms(V1))
            yield Served(n, adapter, nursery)
            nursery.cancel_scope.cancel()


BAD_LINES: list[tuple[bytes, int | None, str]] = [
    (b"this is not json\n", None, "not valid JSON"),
    (b"\xff\xfe\n", None, "not UTF-8"),
    (b"[1, 2]\n", None, "must be a JSON object"),
    (b'{"method": "status"}\n', None, 'integer "id"'),
    (b'{"id": true, "method": "status"}\n', None, 'integer "id"'),
    (b'{"id": 4}\n', 4, '"method"'),
    (b'{"id": 5, "method": "status", "params": [1]}\n', 5, '"params" must be a JSON object'),
    (b'{"id": 6, "method": "book", "params": {"depth": "ten"}}\n', 6, "'depth'"),
]


@pytest.mark.parametrize(
    ("line", "request_id", "says"),
    BAD_LINES,
    ids=["not-json", "not-utf8", "array", "no-id", "bool-id", "no-method", "params", "param"],
)
async def test_a_bad_request_line_is_answered_and_the_connection_goes_on(
    tmp_path: Path, line: bytes, request_id: int | None, says: str
) -> None:
    async with served(tmp_path) as s:
        client = s.connect()
        await client.send(line)
        reply = await client.read()
        assert reply["id"] == request_id
        assert reply["error"]["code"] == BAD_REQUEST and says in reply["error"]["message"]
        assert (await client.call(7, "id"))["result"]["peer_id"] == "peer-test"


async def test_an_oversize_line_is_refused_and_skipped(tmp_path: Path) -> None:
    async with served(tmp_path) as s:
        client = s.connect()
        await client.send(b'{"id": 1, "method": "status", "x": "' + b"a" * MAX_REQUEST_LINE_BYTES)
        reply = await client.read()
        assert reply["id"] is None and reply["error"]["code"] == BAD_REQUEST
        await client.send(b'aaaa"}\n\n')  # the rest of the oversize line, then a blank line
        assert (await client.call(2, "id"))["id"] == 2


async def test_an_unknown_method_names_the_known_ones(tmp_path: Path) -> None:
    async with served(tmp_path) as s:
        client = s.connect()
        reply = await client.call(3, "buy_everything")
        assert reply["id"] == 3 and reply["error"]["code"] == UNKNOWN_METHOD
        assert "'buy_everything'" in reply["error"]["message"]
        assert "submit" in reply["error"]["message"]


async def test_good_calls_trade_and_answer_in_request_order(tmp_path: Path) -> None:
    async with served(tmp_path) as s:
        client = s.connect()
        ms = s.node.ms(V1)
        sell = await client.call(1, "submit", side="sell", price="101", quantity="5")
        assert sell["id"] == 1 and sell["result"]["order"]["status"] == "open"
        assert len(ms.replica) == 1 and s.node.store.count(V1.id) == 1
        assert ms.outbox  # queued for gossip
        # Bob's sell at 100 arrives by gossip.
        bob = order(BOB, V1, price=100)
        assert await s.node.service.validate_gossip(ms, encode_batch([bob.raw]), "peer")
        await trio.testing.wait_all_tasks_blocked()
        assert bob.id in ms.replica
        # Pipelined: three requests in one write, answered in order.
        buy = {"side": "buy", "price": "100", "quantity": "1"}
        lines = [
            {"id": 10, "method": "submit", "params": buy},
            {"id": 11, "method": "book"},
            {"id": 12, "method": "nope"},
        ]
        await client.send(b"".join(json.dumps(r).encode() + b"\n" for r in lines))
        replies = [await client.read() for _ in lines]
        assert [r["id"] for r in replies] == [10, 11, 12]
        assert replies[0]["result"]["order"]["status"] == "filled"
        assert [f["price"] for f in replies[0]["result"]["fills"]] == ["100"]
        asks = replies[1]["result"]["asks"]
        assert [(lv["price"], lv["quantity"]) for lv in asks] == [("101", "5")]
        assert replies[2]["error"]["code"] == UNKNOWN_METHOD
        status = await client.call(13, "status")
        assert status["result"]["markets"][0]["ops"] == 3


async def test_a_handler_failure_is_an_internal_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        async def call(self, method: str, params: dict[str, Any]) -> Any:
            if method == "nan":
                return float("nan")  # not JSON
            raise KeyError("bug")

    async with served(tmp_path) as s:
        client = s.connect(Broken())
        reply = await client.call(1, "status")
        assert reply["error"]["code"] == INTERNAL and "'status'" in reply["error"]["message"]
        assert (await client.call(2, "nan"))["error"]["code"] == INTERNAL
        assert "control method 'status' failed" in caplog.text


async def test_a_client_leaving_ends_only_its_connection(tmp_path: Path) -> None:
    async with served(tmp_path) as s:
        first, second = s.connect(), s.connect()
        await first.stream.aclose()
        with trio.fail_after(5):
            await s.closed[0].wait()
        assert not s.closed[1].is_set()
        assert (await second.call(1, "id"))["id"] == 1


async def test_watch_streams_gossip_and_refuses_requests_on_its_connection(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as s:
        watching = s.connect()
        first = await watching.call(1, "watch", interval=0.005, digest=False)
        assert first == {"id": 1, "result": {"watching": "DEMO"}}
        # An op arrives by gossip: the apply task applies it and the watch reports it.
        op = order(BOB, V1)
        ms = s.node.ms(V1)
        assert await s.node.service.validate_gossip(ms, encode_batch([op.raw]), "peer")
        event = await watching.read()
        assert event["event"] == "update" and event["applied"] == [op.id.hex()]
        assert event["ops"] == 1
        reply = await watching.call(2, "status")
        assert reply["id"] == 2 and reply["error"]["code"] == BAD_REQUEST
        assert "watching" in reply["error"]["message"]
        # The client leaves: the server's watch ends and the watcher is gone.
        await watching.stream.aclose()
        with trio.fail_after(5):
            await s.closed[0].wait()
        assert ms.watchers == []


async def test_a_client_that_asks_and_vanishes_ends_only_its_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client sends a request and resets before the answer: its connection task ends without
    an error logged, and other connections carry on."""
    async with served(tmp_path) as s:
        gone = s.connect()
        await gone.send(b'{"id": 1, "method": "status"}\n')
        await trio.aclose_forcefully(gone.stream)
        with trio.fail_after(5):
            await s.closed[0].wait()
        other = s.connect()
        assert (await other.call(2, "id"))["id"] == 2
        assert "control connection failed" not in caplog.text
