"""The two holes py-libp2p 0.8.1 leaves open before authentication, closed by node/p2p_limits.py.

1. Multistream-select messages are read without a cap: a raw TCP client (no key, no handshake)
   announces a 1 GiB message and streams bytes; the stock reader buffers what it gets.
2. One address can hold every inbound slot with idle TCP connections, so honest peers cannot
   connect.

Each is shown against the stock library (a control that fails the same check) and against the
node's network, which must drop the attacker at once and keep serving honest peers.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import pytest
import trio
from libp2p.io.exceptions import MessageTooLarge
from libp2p.utils.varint import read_delim as stock_read_delim

from crdtbook.node import p2p_install, p2p_limits
from crdtbook.node.p2p import FrameStream, Network, NetworkConfig, open_network

pytestmark = pytest.mark.timeout(60)

CFG = NetworkConfig(heartbeat_interval=0.5, dial_timeout=5.0, call_timeout=5.0)
GIB = 2**30


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class EndlessReader:
    """A peer that announced a 1 GiB multistream message and keeps sending 64 KiB chunks."""

    def __init__(self) -> None:
        self.head = _uvarint(GIB)
        self.consumed = 0
        self.largest_request = 0

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        self.largest_request = max(self.largest_request, n or 0)
        if self.head:
            chunk, self.head = self.head[:1], self.head[1:]
        else:
            chunk = b"A" * min(n or 65536, 65536)
        self.consumed += len(chunk)
        return chunk


async def test_stock_multistream_reader_buffers_what_a_peer_announces() -> None:
    """Control: the library's reader asks the socket for the announced GiB and buffers every
    chunk it gets (101 reads here) before it gives up."""
    reader = EndlessReader()
    with pytest.raises(Exception):  # noqa: B017 - it ends on its retry count, if at all
        await stock_read_delim(reader)
    assert reader.largest_request >= GIB
    assert reader.consumed > 6_000_000


async def test_capped_reader_refuses_before_reading_the_body() -> None:
    reader = EndlessReader()
    with pytest.raises(MessageTooLarge):
        await p2p_limits.read_delim_capped(reader)
    assert reader.consumed <= 10  # the varint, nothing more
    # Ordinary messages still pass.
    ok = _uvarint(len(b"/noise\n")) + b"/noise\n"

    class Once:
        async def read(self, n: int | None = None) -> bytes:
            nonlocal ok
            chunk, ok = ok[: n or len(ok)], ok[n or len(ok) :]
            return chunk

    assert await p2p_limits.read_delim_capped(Once()) == b"/noise"


def _endless_line(port: int, seconds: float) -> tuple[int, float | None]:
    """Announce a 1 GiB multistream line on a raw TCP connection and stream bytes into it, from a
    thread of its own (as a remote client would, not sharing the node's event loop). Returns
    (bytes the kernel accepted, seconds until the node dropped us, or None)."""
    pushed = 0
    started = time.monotonic()
    chunk = b"A" * 65536
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        try:
            sock.sendall(_uvarint(GIB))
            while time.monotonic() - started < seconds:
                pushed += sock.send(chunk)
        except OSError:  # reset or broken pipe: the node dropped us
            return pushed, time.monotonic() - started
    return pushed, None


def _port(net: Network) -> int:
    return int(net.addrs()[0].split("/tcp/")[1].split("/")[0])


async def test_endless_multistream_line_is_dropped_and_memory_stays_flat() -> None:
    async with open_network(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"], config=CFG) as target:
        before = _rss_bytes()
        results: list[tuple[int, float | None]] = []

        async def attack() -> None:
            results.append(await trio.to_thread.run_sync(_endless_line, _port(target), 3.0))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(attack)
        growth = _rss_bytes() - before
        for pushed, dropped_after in results:
            assert dropped_after is not None and dropped_after < 2.0, results
            assert pushed < 64 * 1024 * 1024  # what the kernel's socket buffers hold
        assert growth < 48 * 1024 * 1024, f"RSS grew by {growth / 1e6:.0f} MB"
        # The node still takes honest peers.
        async with open_network(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"], config=CFG) as honest:
            await honest.connect(target.addrs()[0])


async def _idle_connections(port: int, count: int) -> list[trio.socket.SocketType]:
    """TCP connections from 127.0.0.2 (another address than the honest peer's) that never
    send a byte."""
    socks = []
    for _ in range(count):
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.2", 0))
        await sock.connect(("127.0.0.1", port))
        socks.append(sock)
    return socks


@asynccontextmanager
async def _stock_library() -> AsyncIterator[None]:
    p2p_install.install()  # what opening a network does first (once per process)
    p2p_limits.uninstall()
    try:
        yield
    finally:
        p2p_limits.install()


async def _honest_dial_with_idle_flood(count: int) -> Exception | None:
    async with (
        open_network(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"], config=CFG) as target,
        open_network(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"], config=CFG) as honest,
    ):
        socks = await _idle_connections(_port(target), count)
        try:
            await trio.sleep(0.5)  # the node accepts them all
            try:
                await honest.connect(target.addrs()[0])
            except Exception as exc:
                return exc
            return None
        finally:
            for sock in socks:
                sock.close()


async def test_control_idle_connections_from_one_address_lock_out_the_stock_library() -> None:
    async with _stock_library():
        failure = await _honest_dial_with_idle_flood(300)
    assert failure is not None, "the stock library admitted the honest peer"


async def test_idle_connections_from_one_address_cannot_lock_out_honest_peers() -> None:
    assert await _honest_dial_with_idle_flood(300) is None


async def test_a_stream_flood_from_one_peer_is_bounded_and_others_are_served() -> None:
    """2,000 sync streams opened at once by one connected peer, none of which sends a frame:
    libp2p's Yamux admits 255 at a time per connection (the rest fail on the opener's side),
    memory stays flat, and an honest peer's stream is served at once."""
    opener = NetworkConfig(heartbeat_interval=0.5, call_timeout=2.0)
    async with (
        open_network(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"], config=CFG) as target,
        open_network(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"], config=opener) as mallory,
        open_network(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"], config=CFG) as honest,
    ):
        active = [0, 0]

        async def handler(stream: FrameStream) -> None:
            active[0] += 1
            active[1] = max(active[1], active[0])
            try:
                with trio.move_on_after(20):
                    await stream.read_frame(1024)
                await stream.write_frame(b"ok")
            finally:
                active[0] -= 1

        target.set_stream_handler("/test/sync", handler)
        await mallory.connect(target.addrs()[0])
        before = _rss_bytes()
        opened: list[FrameStream] = []

        async def open_one() -> None:
            with suppress(Exception):
                opened.append(await mallory.open_stream(target.peer_id, "/test/sync"))

        async with trio.open_nursery() as nursery:
            for _ in range(2000):
                nursery.start_soon(open_one)
        assert active[1] <= 256 and len(opened) <= 256
        assert _rss_bytes() - before < 64 * 1024 * 1024
        await honest.connect(target.addrs()[0])
        with trio.fail_after(5):
            stream = await honest.open_stream(target.peer_id, "/test/sync")
            await stream.write_frame(b"hi")
            assert await stream.read_frame(16) == b"ok"
