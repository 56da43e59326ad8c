"""Tests for the control server (node/control.py) and the blocking client (node/client.py)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
import trio
from trio import TaskStatus

from crdtbook.node.client import ControlClient, NodeNotRunning, resolve_home
from crdtbook.node.control import (
    ControlSocketInUse,
    optional_param,
    require_param,
    serve_control,
    socket_path,
)
from crdtbook.node.control_errors import (
    BAD_REQUEST,
    INTERNAL,
    MAX_REQUEST_LINE_BYTES,
    NOT_FOUND,
    TIMEOUT,
    UNKNOWN_MARKET,
    UNKNOWN_METHOD,
    ControlError,
)

T = TypeVar("T")

# Every test is cut off well before pytest-timeout would fire.
TEST_DEADLINE = 10.0


class FakeHandler:
    """A ControlHandler with methods that exercise every server path."""

    def __init__(self) -> None:
        self.watchers: list[trio.MemorySendChannel[dict[str, Any]]] = []
        self.watch_started = trio.Event()
        self.watch_closed = trio.Event()
        self.end_watches = False

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        if method == "echo":
            return params
        if method in ("sleep", "submit"):  # submit: one that signs, answered late
            await trio.sleep(require_param(params, "seconds", float))
            return params.get("tag")
        if method == "fail":
            raise ControlError(NOT_FOUND, "no order matches 'abc'")
        if method == "fail_with_data":  # as submit's wait_final timeout: the order stands
            raise ControlError(TIMEOUT, "not final after 1 s", {"order": {"id": "ab"}})
        if method == "crash":
            raise RuntimeError("boom")
        if method == "bytes":
            return {"x": b"not json"}
        if method == "nan":
            return float("nan")
        if method == "repeat":
            return "x" * require_param(params, "n", int)
        if method == "typed":
            side = require_param(params, "side", str, choices=("buy", "sell"))
            depth = optional_param(params, "depth", int, 10)
            return {"side": side, "depth": depth}
        raise ControlError(UNKNOWN_METHOD, f"unknown method {method!r}")

    async def watch(self, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        market = optional_param(params, "market", str, "BTC-USD")
        if market != "BTC-USD":
            raise ControlError(UNKNOWN_MARKET, f"unknown market {market!r}")
        send, receive = trio.open_memory_channel[dict[str, Any]](1000)
        self.watchers.append(send)
        try:
            yield {"watching": market}
            self.watch_started.set()
            if self.end_watches:
                return
            async for event in receive:
                yield event
        finally:
            self.watchers.remove(send)
            self.watch_closed.set()

    def publish(self, event: dict[str, Any]) -> None:
        for send in self.watchers:
            send.send_nowait(event)


@pytest.fixture
def home() -> Iterator[Path]:
    # Short path: AF_UNIX socket paths are limited to ~107 bytes, pytest's tmp_path can be longer.
    base = tempfile.mkdtemp(prefix="cbt-")
    yield Path(base) / "home"
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def close_peers() -> AsyncIterator[None]:
    """Close every :class:`Peer` the test left open."""
    yield
    while Peer.opened:
        await Peer.opened.pop().aclose()


@pytest.fixture
async def handler(nursery: trio.Nursery, home: Path, close_peers: None) -> FakeHandler:
    h = FakeHandler()
    path = await nursery.start(serve_control, home, h)
    assert path == socket_path(home)
    return h


class Peer:
    """A raw protocol client on a trio socket stream."""

    #: Connections not closed yet (the ``close_peers`` fixture closes what a test leaves).
    opened: ClassVar[list[Peer]] = []

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, home: Path) -> Peer:
        peer = cls(await trio.open_unix_socket(os.fspath(socket_path(home))))
        cls.opened.append(peer)
        return peer

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(self, obj: Any) -> dict[str, Any]:
        await self.send(json.dumps(obj).encode() + b"\n")
        return await self.read()

    async def read(self) -> dict[str, Any]:
        line = await self.read_line()
        assert line is not None, "server closed the connection"
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    async def read_line(self) -> bytes | None:
        while b"\n" not in self.buf:
            data = await self.stream.receive_some(1 << 16)
            if not data:
                return None
            self.buf += data
        i = self.buf.index(b"\n")
        line = bytes(self.buf[:i])
        del self.buf[: i + 1]
        return line

    async def aclose(self) -> None:
        if self in Peer.opened:
            Peer.opened.remove(self)
        await self.stream.aclose()


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking client code in a worker thread; abandonable so fail_after still works."""
    return await trio.to_thread.run_sync(partial(fn, *args), abandon_on_cancel=True)


# -- server: requests ----------------------------------------------------------------------------


async def test_round_trip(handler: FakeHandler, home: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        peer = await Peer.connect(home)
        params = {"a": 1, "b": ["x", None], "ü": "ß"}
        assert await peer.request({"id": 1, "method": "echo", "params": params}) == {
            "id": 1,
            "result": params,
        }
        # params may be omitted or null
        assert await peer.request({"id": 2, "method": "echo"}) == {"id": 2, "result": {}}
        assert await peer.request({"id": 3, "method": "echo", "params": None}) == {
            "id": 3,
            "result": {},
        }
        await peer.aclose()


async def test_pipelined_requests_answered_in_order(handler: FakeHandler, home: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        peer = await Peer.connect(home)
        lines = [
            {"id": 1, "method": "sleep", "params": {"seconds": 0.2, "tag": "slow"}},
            {"id": 2, "method": "echo", "params": {"n": 2}},
            {"id": 3, "method": "fail"},
            {"id": 4, "method": "sleep", "params": {"seconds": 0.01, "tag": "fast"}},
        ]
        await peer.send(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
        answers = [await peer.read() for _ in lines]
        assert [a["id"] for a in answers] == [1, 2, 3, 4]
        assert answers[0]["result"] == "slow"
        assert answers[2]["error"]["code"] == NOT_FOUND
        assert answers[3]["result"] == "fast"


async def test_pipelined_requests_each_yield_to_other_tasks(
    handler: FakeHandler, home: Path
) -> None:
    """A reply skips trio's send checkpoint only after a wait for its request: requests found
    already buffered (pipelined) still go through the scheduler one by one, so a client that
    pipelines cannot keep the node's other tasks from running."""
    rounds = 0  # trio's scheduler rounds: each ends in an I/O wait (or poll)

    class Rounds(trio.abc.Instrument):
        def before_io_wait(self, timeout: float) -> None:
            nonlocal rounds
            rounds += 1

    seen: list[int] = []
    real_call = handler.call

    async def counting_call(method: str, params: dict[str, Any]) -> Any:
        seen.append(rounds)
        return await real_call(method, params)

    handler.call = counting_call  # type: ignore[method-assign]
    instrument = Rounds()
    trio.lowlevel.add_instrument(instrument)
    try:
        with trio.fail_after(TEST_DEADLINE):
            peer = await Peer.connect(home)
            lines = [{"id": i, "method": "echo", "params": {"n": i}} for i in range(50)]
            await peer.send(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
            answers = [await peer.read() for _ in lines]
    finally:
        trio.lowlevel.remove_instrument(instrument)
    assert [a["id"] for a in answers] == list(range(50))
    # Between any two handler calls the connection's task went through the scheduler.
    assert all(b > a for a, b in itertools.pairwise(seen)), seen


async def test_a_reply_bigger_than_the_socket_buffer_arrives_whole(
    handler: FakeHandler, home: Path
) -> None:
    """The eager write takes what the socket buffer holds and leaves the rest to trio."""
    with trio.fail_after(TEST_DEADLINE):
        peer = await Peer.connect(home)
        reply = await peer.request({"id": 1, "method": "repeat", "params": {"n": 4_000_000}})
        assert reply == {"id": 1, "result": "x" * 4_000_000}
        assert (await peer.request({"id": 2, "method": "echo"}))["id"] == 2


async def test_connections_are_independent(handler: FakeHandler, home: Path) -> None:
    """A slow call on one connection does not delay another connection."""
    with trio.fail_after(TEST_DEADLINE):
        slow = await Peer.connect(home)
        await slow.send(b'{"id": 1, "method": "sleep", "params": {"seconds": 5}}\n')
        fast = await Peer.connect(home)
        with trio.fail_after(1):
            assert (await fast.request({"id": 9, "method": "echo"}))["id"] == 9


MALFORMED: list[tuple[bytes, int | None, str]] = [
    (b"not json", None, BAD_REQUEST),
    (b"{", None, BAD_REQUEST),
    (b"[1, 2]", None, BAD_REQUEST),
    (b'"a string"', None, BAD_REQUEST),
    (b"null", None, BAD_REQUEST),
    (b"\xff\xfe{}", None, BAD_REQUEST),
    (b"[" * 200_000, None, BAD_REQUEST),  # nesting deep enough for RecursionError
    (b'{"id": ' + b"9" * 5000 + b', "method": "echo"}', None, BAD_REQUEST),  # int too long
    (b'{"method": "echo"}', None, BAD_REQUEST),
    (b'{"id": "1", "method": "echo"}', None, BAD_REQUEST),
    (b'{"id": true, "method": "echo"}', None, BAD_REQUEST),
    (b'{"id": 1.5, "method": "echo"}', None, BAD_REQUEST),
    (b'{"id": 5}', 5, BAD_REQUEST),
    (b'{"id": 5, "method": 7}', 5, BAD_REQUEST),
    (b'{"id": 5, "method": ""}', 5, BAD_REQUEST),
    (b'{"id": 6, "method": "echo", "params": [1]}', 6, BAD_REQUEST),
    (b'{"id": 6, "method": "echo", "params": "x"}', 6, BAD_REQUEST),
    (b'{"id": 7, "method": "nope"}', 7, UNKNOWN_METHOD),
    (b'{"id": 8, "method": "crash"}', 8, INTERNAL),
    (b'{"id": 8, "method": "bytes"}', 8, INTERNAL),
    (b'{"id": 8, "method": "nan"}', 8, INTERNAL),
    (b'{"id": 9, "method": "typed", "params": {}}', 9, BAD_REQUEST),
    (b'{"id": 9, "method": "typed", "params": {"side": 1}}', 9, BAD_REQUEST),
    (b'{"id": 9, "method": "typed", "params": {"side": "up"}}', 9, BAD_REQUEST),
    (b'{"id": 9, "method": "typed", "params": {"side": "buy", "depth": "5"}}', 9, BAD_REQUEST),
    (b'{"id": 9, "method": "typed", "params": {"side": "buy", "depth": true}}', 9, BAD_REQUEST),
    (b'{"id": 9, "method": "sleep", "params": {"seconds": "soon"}}', 9, BAD_REQUEST),
]


@pytest.mark.parametrize(("line", "expected_id", "code"), MALFORMED)
async def test_malformed_requests_are_answered(
    handler: FakeHandler, home: Path, line: bytes, expected_id: int | None, code: str
) -> None:
    with trio.fail_after(TEST_DEADLINE):
        peer = await Peer.connect(home)
        await peer.send(line + b"\n")
        answer = await peer.read()
        assert answer["id"] == expected_id
        assert answer["error"]["code"] == code
        message = answer["error"]["message"]
        assert isinstance(message, str)
        assert message
        assert "\n" not in message
        # The connection stays open and usable.
        assert await peer.request({"id": 100, "method": "echo"}) == {"id": 100, "result": {}}


async def test_param_helpers_name_the_param(handler: FakeHandler, home: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        peer = await Peer.connect(home)
        answer = await peer.request({"id": 1, "method": "typed", "params": {"side": "up"}})
        assert "'side'" in answer["error"]["message"]
        assert "'buy'" in answer["error"]["message"]
        answer = await peer.request({"id": 2, "method": "typed", "params": {"side": "sell"}})
        assert answer["result"] == {"side": "sell", "depth": 10}
        answer = await peer.request({"id": 3, "method": "sleep", "params": {"seconds": 0}})
        assert answer == {"id": 3, "result": None}  # an int is a fine float


async def test_oversize_line_is_refused_and_skipped(handler: FakeHandler, home: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        peer = await Peer.connect(home)
        # Exactly at the limit is fine.
        head = b'{"id": 1, "method": "echo", "params": {"pad": "'
        tail = b'"}}'
        fits = head + b"x" * (MAX_REQUEST_LINE_BYTES - len(head) - len(tail)) + tail
        assert len(fits) == MAX_REQUEST_LINE_BYTES
        await peer.send(fits + b"\n")
        answer = await peer.read()
        assert answer["id"] == 1
        assert len(answer["result"]["pad"]) > MAX_REQUEST_LINE_BYTES - 100
        # One byte more is refused, and the rest of that line (sent later) is skipped.
        await peer.send(fits + b"x")
        answer = await peer.read()
        assert answer["id"] is None
        assert answer["error"]["code"] == BAD_REQUEST
        assert "longer than" in answer["error"]["message"]
        await peer.send(b"x" * (3 * MAX_REQUEST_LINE_BYTES) + b'"}}\n')
        assert await peer.request({"id": 2, "method": "echo"}) == {"id": 2, "result": {}}


async def test_blank_lines_crlf_and_final_line_without_newline(
    handler: FakeHandler, home: Path
) -> None:
    with trio.fail_after(TEST_DEADLINE):
        peer = await Peer.connect(home)
        await peer.send(b'\n  \r\n{"id": 1, "method": "echo"}\r\n{"id": 2, "method": "echo"}')
        await peer.stream.send_eof()  # half-close: the last line has no newline
        assert (await peer.read())["id"] == 1
        assert (await peer.read())["id"] == 2
        assert await peer.read_line() is None  # then the server closes


# -- server: watch -------------------------------------------------------------------------------


async def test_watch_stream_and_client_disconnect(handler: FakeHandler, home: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        peer = await Peer.connect(home)
        first = await peer.request({"id": 1, "method": "watch", "params": {}})
        assert first == {"id": 1, "result": {"watching": "BTC-USD"}}
        await handler.watch_started.wait()
        event = {"event": "update", "market": "BTC-USD", "ops": 3, "digest": "ab", "fills": []}
        handler.publish(event)
        handler.publish({**event, "ops": 4})
        assert await peer.read() == event
        assert (await peer.read())["ops"] == 4
        # Requests on a watching connection are refused, the stream goes on.
        answer = await peer.request({"id": 2, "method": "echo"})
        assert answer["id"] == 2
        assert answer["error"]["code"] == BAD_REQUEST
        assert (await peer.request(["junk"]))["id"] is None
        handler.publish({**event, "ops": 5})
        assert (await peer.read())["ops"] == 5
        # Client goes away: the handler's iterator is closed, the server keeps serving.
        await peer.aclose()
        await handler.watch_closed.wait()
        assert handler.watchers == []
        other = await Peer.connect(home)
        assert (await other.request({"id": 3, "method": "echo"}))["id"] == 3


async def test_watch_client_vanishes_while_server_sends(handler: FakeHandler, home: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        for _ in range(3):
            handler.watch_closed = trio.Event()
            handler.watch_started = trio.Event()
            peer = await Peer.connect(home)
            await peer.request({"id": 1, "method": "watch"})
            await handler.watch_started.wait()
            big = {"event": "update", "pad": "x" * 100_000}
            for _ in range(50):  # far more than the socket buffers hold
                handler.publish(big)
            await trio.sleep(0.01)
            await peer.aclose()
            await handler.watch_closed.wait()
        other = await Peer.connect(home)
        assert (await other.request({"id": 3, "method": "echo"}))["id"] == 3


async def test_watch_refused_keeps_connection(handler: FakeHandler, home: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        peer = await Peer.connect(home)
        answer = await peer.request({"id": 1, "method": "watch", "params": {"market": "X"}})
        assert answer["error"]["code"] == UNKNOWN_MARKET
        answer = await peer.request({"id": 2, "method": "watch", "params": {"market": 5}})
        assert answer["error"]["code"] == BAD_REQUEST
        assert (await peer.request({"id": 3, "method": "echo"}))["id"] == 3


async def test_watch_ended_by_node_closes_connection(handler: FakeHandler, home: Path) -> None:
    handler.end_watches = True
    with trio.fail_after(TEST_DEADLINE):
        peer = await Peer.connect(home)
        assert (await peer.request({"id": 1, "method": "watch"}))["result"] == {
            "watching": "BTC-USD"
        }
        assert await peer.read_line() is None
        await handler.watch_closed.wait()


# -- server: socket life cycle and abuse -----------------------------------------------------------


async def test_socket_and_home_modes(nursery: trio.Nursery, home: Path) -> None:
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    path = await nursery.start(serve_control, home, FakeHandler())
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700


async def test_creates_missing_home(nursery: trio.Nursery, home: Path) -> None:
    await nursery.start(serve_control, home / "deeper", FakeHandler())
    assert stat.S_IMODE(os.stat(home / "deeper").st_mode) == 0o700


async def test_socket_removed_on_exit(home: Path) -> None:
    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            path = await nursery.start(serve_control, home, FakeHandler())
            peer = await Peer.connect(home)  # an open connection does not block shutdown
            nursery.cancel_scope.cancel()
        assert not os.path.exists(path)
        await peer.aclose()


@pytest.mark.usefixtures("close_peers")
async def test_stale_socket_is_replaced(nursery: trio.Nursery, home: Path) -> None:
    home.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fspath(socket_path(home)))  # bound, never listening: like a crashed node's
    dead.close()
    await nursery.start(serve_control, home, FakeHandler())
    peer = await Peer.connect(home)
    assert (await peer.request({"id": 1, "method": "echo"}))["id"] == 1


async def test_live_socket_is_not_stolen(handler: FakeHandler, home: Path) -> None:
    with pytest.raises(ControlSocketInUse, match="already serving"):
        await serve_control(home, FakeHandler())
    peer = await Peer.connect(home)  # the first server is untouched
    assert (await peer.request({"id": 1, "method": "echo"}))["id"] == 1


async def test_refuses_non_socket_file(home: Path) -> None:
    home.mkdir(mode=0o700)
    socket_path(home).write_text("precious")
    with pytest.raises(FileExistsError):
        await serve_control(home, FakeHandler())
    assert socket_path(home).read_text() == "precious"


async def test_socket_path_too_long(home: Path) -> None:
    with pytest.raises(OSError, match="shorter home"):
        await serve_control(home / ("x" * 120), FakeHandler())


async def test_server_survives_abuse(handler: FakeHandler, home: Path) -> None:
    async def hit_and_run(i: int) -> None:
        peer = await Peer.connect(home)
        junk = [
            b"",
            b'{"id": 1, "method": "sleep", "params": {"seconds": 1}}\n',  # leave before answer
            b'{"id": 1, "meth',  # half a line
            b"\x00\xff" * 1000 + b"\n",
            b"x" * (MAX_REQUEST_LINE_BYTES + 10),  # oversize, then vanish
            b'{"id": 1, "method": "watch"}\n',  # leave a watch at once
            b'{"id": 1, "method": "crash"}\n' * 20,  # pipelined, never read
        ][i % 7]
        with trio.move_on_after(2):
            await peer.send(junk)
        await peer.aclose()

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            for i in range(70):
                nursery.start_soon(hit_and_run, i)
        for i in range(3):
            peer = await Peer.connect(home)
            assert (await peer.request({"id": i, "method": "echo"}))["id"] == i


# -- client ----------------------------------------------------------------------------------------


def test_resolve_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CRDTBOOK_HOME", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert resolve_home(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_home("~/x") == tmp_path / "user" / "x"
    assert resolve_home() == tmp_path / "env"
    monkeypatch.setenv("CRDTBOOK_HOME", "")
    assert resolve_home() == tmp_path / "user" / ".crdtbook"
    monkeypatch.delenv("CRDTBOOK_HOME")
    assert resolve_home(None) == tmp_path / "user" / ".crdtbook"
    monkeypatch.chdir(tmp_path)
    assert resolve_home("rel") == tmp_path / "rel"  # absolute, for messages


def test_client_without_node(home: Path) -> None:
    with pytest.raises(NodeNotRunning) as info:
        ControlClient(home)
    assert f"no crdtbook node is running at {home} (no control socket)" in str(info.value)
    assert f"Start one with: crdtbook node --home {home}" in str(info.value)
    # A socket file left behind by a dead node refuses connections.
    home.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.fspath(socket_path(home)))
    dead.close()
    with pytest.raises(NodeNotRunning, match="left over"):
        ControlClient(home)
    assert issubclass(NodeNotRunning, ConnectionError)


async def test_client_calls(handler: FakeHandler, home: Path) -> None:
    def script() -> None:
        with ControlClient(home) as client:
            assert client.call("echo", a=1, b="x") == {"a": 1, "b": "x"}
            assert client.call("echo", market=None, depth=3) == {"depth": 3}  # None dropped
            assert client.call("echo", method="m") == {"method": "m"}
            with pytest.raises(ControlError) as info:
                client.call("fail")
            assert info.value.code == NOT_FOUND
            assert info.value.message == "no order matches 'abc'"
            assert info.value.data is None
            with pytest.raises(ControlError) as info:
                client.call("fail_with_data")
            assert (info.value.code, info.value.data) == (TIMEOUT, {"order": {"id": "ab"}})
            with pytest.raises(ControlError) as info:
                client.call("crash")
            assert info.value.code == INTERNAL
            with pytest.raises(ControlError) as info:
                client.call("nope")
            assert info.value.code == UNKNOWN_METHOD
            assert client.call("echo", n=1) == {"n": 1}  # still usable after errors
            with pytest.raises(ValueError, match="watch"):
                client.call("watch")

    with trio.fail_after(TEST_DEADLINE):
        await in_thread(script)


async def test_client_timeout_then_reconnects(handler: FakeHandler, home: Path) -> None:
    def script() -> None:
        with ControlClient(home, timeout=0.3) as client:
            with pytest.raises(TimeoutError, match="did not answer") as late:
                client.call("sleep", seconds=3)
            assert "may have taken effect" not in str(late.value)  # it signs nothing
            # The late answer must not be mistaken for this one: a new connection is used.
            assert client.call("echo", n=2) == {"n": 2}
            # An answer lost for a method that signs: the op may stand, and retrying places
            # a second order, so the error says so.
            with pytest.raises(TimeoutError, match="did not answer") as lost:
                client.call("submit", seconds=3)
            assert "the submit may have taken effect all the same" in str(lost.value)

    with trio.fail_after(TEST_DEADLINE):
        await in_thread(script)


async def test_client_node_stops_mid_call(home: Path) -> None:
    # Only the server is cancelled: cancelling the whole nursery would also abandon the call
    # below in its thread, and the next call would then race it on the same client.
    server = trio.CancelScope()

    async def run_server(task_status: TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        with server:
            await serve_control(home, FakeHandler(), task_status=task_status)

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_server)
            client = await in_thread(ControlClient, home)

            async def stop_soon() -> None:
                await trio.sleep(0.2)
                server.cancel()

            nursery.start_soon(stop_soon)
            with pytest.raises(ConnectionError, match="closed the connection"):
                await in_thread(partial(client.call, "sleep", seconds=5))
        with pytest.raises(NodeNotRunning):
            await in_thread(partial(client.call, "echo"))  # reconnect finds no node
        client.close()


async def test_client_watch(handler: FakeHandler, home: Path) -> None:
    event = {"event": "update", "market": "BTC-USD", "ops": 1, "digest": "d", "fills": []}

    def consume() -> list[dict[str, Any]]:
        with ControlClient(home) as client, client.watch() as stream:
            assert stream.market == "BTC-USD"
            got = [next(stream), next(stream)]
            # The client's request connection is independent of the stream.
            assert client.call("echo", n=1) == {"n": 1}
            return got

    with trio.fail_after(TEST_DEADLINE):
        async with trio.open_nursery() as nursery:

            async def publish() -> None:
                await handler.watch_started.wait()
                handler.publish(event)
                handler.publish({**event, "ops": 2})

            nursery.start_soon(publish)
            got = await in_thread(consume)
        assert got == [event, {**event, "ops": 2}]
        await handler.watch_closed.wait()  # closing the stream ends the handler's iterator

        def refused() -> None:
            with ControlClient(home) as client, pytest.raises(ControlError) as info:
                client.watch("ETH-USD")
            assert info.value.code == UNKNOWN_MARKET

        await in_thread(refused)


async def test_client_watch_ends_when_node_ends_it(handler: FakeHandler, home: Path) -> None:
    handler.end_watches = True

    def consume() -> list[dict[str, Any]]:
        with ControlClient(home) as client:
            return list(client.watch())

    with trio.fail_after(TEST_DEADLINE):
        assert await in_thread(consume) == []


class OddWatchHandler(FakeHandler):
    """watch as a plain function that validates eagerly, and streams that fail midway."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode  # used when the request has no "mode" (ControlClient.watch sends none)

    def watch(self, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        mode = params.get("mode", self.mode)
        if mode == "refuse":
            raise ControlError(UNKNOWN_MARKET, "no market 'X'")
        if mode == "explode":
            raise RuntimeError("bug before the stream")
        return self._failing(mode)

    async def _failing(self, mode: object) -> AsyncIterator[dict[str, Any]]:
        yield {"watching": "BTC-USD"}
        yield {"event": "update", "ops": 1}
        if mode == "crash":
            raise RuntimeError("bug in the stream")
        raise ControlError(UNKNOWN_MARKET, "market was dropped")


@pytest.mark.parametrize(("mode", "code"), [("crash", INTERNAL), ("drop", UNKNOWN_MARKET)])
@pytest.mark.usefixtures("close_peers")
async def test_watch_failing_midway(
    nursery: trio.Nursery, home: Path, mode: str, code: str
) -> None:
    await nursery.start(serve_control, home, OddWatchHandler(mode))
    with trio.fail_after(TEST_DEADLINE):
        peer = await Peer.connect(home)
        for refused, refused_code in [("refuse", UNKNOWN_MARKET), ("explode", INTERNAL)]:
            answer = await peer.request({"id": 1, "method": "watch", "params": {"mode": refused}})
            assert answer["error"]["code"] == refused_code
        await peer.request({"id": 2, "method": "watch", "params": {"mode": mode}})
        assert await peer.read() == {"event": "update", "ops": 1}
        answer = await peer.read()
        assert answer["id"] == 2
        assert answer["error"]["code"] == code
        assert await peer.read_line() is None

        def consume() -> list[dict[str, Any]]:
            got: list[dict[str, Any]] = []
            with ControlClient(home) as client, pytest.raises(ControlError) as info:
                for event in client.watch():
                    got.append(event)
            assert info.value.code == code
            return got

        assert await in_thread(consume) == [{"event": "update", "ops": 1}]
