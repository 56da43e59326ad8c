"""The send side of the transport, as node/p2p_install.py changes it for issue #12, next to the
stock behaviour it replaces: a TCP write the socket takes at once skips trio's scheduler trip
(one write in ``WRITES_PER_CHECKPOINT`` keeps it), with the library's bytes, order and errors."""

from __future__ import annotations

import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import libp2p.io.trio as libp2p_io_trio
import pytest
import trio
from libp2p.io.exceptions import ConnectionClosedError

from crdtbook.node import p2p_install

pytestmark = pytest.mark.timeout(20)

Write = Callable[[Any, bytes], Awaitable[None]]


def _writes() -> tuple[Write, Write]:
    """(stock, ours): the TCP stream's write as the library has it, and the eager one."""
    p2p_install.install()
    ours = libp2p_io_trio.TrioTCPStream.write
    return ours._crdtbook_original, ours  # type: ignore[attr-defined]


class _Rounds(trio.abc.Instrument):
    """Counts trio's scheduler rounds (each ends in an I/O wait or poll)."""

    def __init__(self) -> None:
        self.count = 0

    def before_io_wait(self, timeout: float) -> None:
        self.count += 1


async def _rounds_for_writes(write: Write, count: int) -> int:
    """Scheduler rounds while one task writes ``count`` small frames in a row."""
    left, right = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(left), trio.SocketStream(right)
    stream = libp2p_io_trio.TrioTCPStream(sender)
    rounds = _Rounds()
    async with sender, receiver:
        trio.lowlevel.add_instrument(rounds)
        try:
            for _ in range(count):
                await write(stream, b"x" * 100)
        finally:
            trio.lowlevel.remove_instrument(rounds)
    return rounds.count


async def test_a_write_the_socket_takes_costs_no_scheduler_trip_but_every_eighth() -> None:
    """Stock: every write is a checkpoint. Ours: one in WRITES_PER_CHECKPOINT, so a task writing
    frame after frame still yields every few frames."""
    stock, ours = _writes()
    writes = 8 * p2p_install.WRITES_PER_CHECKPOINT
    assert await _rounds_for_writes(stock, writes) >= writes
    rounds = await _rounds_for_writes(ours, writes)
    assert writes // p2p_install.WRITES_PER_CHECKPOINT <= rounds < writes // 2


async def test_concurrent_writes_past_a_full_socket_buffer_keep_each_write_whole() -> None:
    """Writers bigger than the socket's buffer (the direct write takes part, the library's path
    the rest) and small ones at once: each write's bytes arrive together, in one piece."""
    _, ours = _writes()
    left, right = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(left), trio.SocketStream(right)
    stream = libp2p_io_trio.TrioTCPStream(sender)
    rng = random.Random(3)
    pieces = [bytes([i]) * rng.choice((50, 3000, 600_000)) for i in range(1, 40)]
    got = bytearray()

    async def read_all() -> None:
        while True:
            data = await receiver.receive_some(1 << 16)
            if not data:
                return
            got.extend(data)

    async def write_some(mine: list[bytes]) -> None:
        for piece in mine:
            await ours(stream, piece)

    async with sender, receiver, trio.open_nursery() as readers:
        readers.start_soon(read_all)
        async with trio.open_nursery() as writers:
            for k in range(3):
                writers.start_soon(write_some, pieces[k::3])
        await sender.send_eof()
    assert len(got) == sum(map(len, pieces))
    # Each piece is a run of one byte value: runs in the stream are the pieces, whole.
    runs: list[bytes] = []
    start = 0
    for i in range(1, len(got) + 1):
        if i == len(got) or got[i] != got[start]:
            runs.append(bytes(got[start:i]))
            start = i
    assert sorted(runs) == sorted(pieces)


async def test_a_cancelled_task_writes_nothing_as_with_the_library() -> None:
    """The library's send checks for cancellation before it sends a byte; the direct write
    must not send a frame (or part of one) that the caller will never finish."""
    stock, ours = _writes()
    for write in (stock, ours):
        left, right = socket.socketpair()
        sender = trio.SocketStream(trio.socket.from_stdlib_socket(left))
        stream = libp2p_io_trio.TrioTCPStream(sender)
        for _ in range(p2p_install.WRITES_PER_CHECKPOINT):  # every count, eager or not
            with trio.CancelScope() as scope:
                scope.cancel()
                await write(stream, b"x" * 1000)
            assert scope.cancelled_caught
        right.setblocking(False)
        with pytest.raises(BlockingIOError):
            right.recv(1)  # nothing was sent
        await sender.aclose()
        right.close()


async def test_a_write_to_a_reset_peer_raises_as_the_library_does() -> None:
    _, ours = _writes()
    left, right = trio.socket.socketpair()
    sender = trio.SocketStream(left)
    stream = libp2p_io_trio.TrioTCPStream(sender)
    right.close()
    with pytest.raises(ConnectionClosedError):
        for _ in range(p2p_install.WRITES_PER_CHECKPOINT * 2):
            await ours(stream, b"x" * 1000)
    await sender.aclose()


async def test_a_write_to_a_locally_closed_stream_is_silent_as_the_library_makes_it() -> None:
    _, ours = _writes()
    left, right = trio.socket.socketpair()
    sender = trio.SocketStream(left)
    stream = libp2p_io_trio.TrioTCPStream(sender)
    await sender.aclose()
    for _ in range(p2p_install.WRITES_PER_CHECKPOINT * 2):
        await ours(stream, b"x")  # returns; nothing raised
    right.close()
