"""The receive side of gossip, as node/p2p_install.py and node/p2p_pubsub.py change it for issue
#12, each next to the stock behaviour it replaces: TCP reads ahead of what is asked, a message
read is validated by its peer's read loop (no task of its own), and validation verdicts are
cached in O(1) with the library's rules."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import libp2p.io.trio as libp2p_io_trio
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.io.utils import read_exactly
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import ValidationCache, ValidationResult

from crdtbook.node import p2p_install, p2p_pubsub
from crdtbook.node.p2p_pubsub import LruValidationCache

from .test_p2p import TOPIC
from .test_p2p_transport import _unstarted_pubsub

Read = Callable[[Any, int | None], Awaitable[bytes]]


def _reads() -> tuple[Read, Read]:
    """(stock, ours): the TCP stream's read as the library has it, and with read-ahead."""
    p2p_install.install()
    ours = libp2p_io_trio.TrioTCPStream.read
    return ours._crdtbook_original, ours  # type: ignore[attr-defined]


async def _frames_read(read: Read, frames: list[bytes]) -> tuple[list[bytes], int]:
    """Send ``frames`` (2-byte length prefixed, as Noise frames) in one write over a socket pair
    and read them back as Noise does (``read_exactly`` of the prefix, then of the body) with
    ``read``; return the bodies and how many socket receives that took."""
    left, right = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(left), trio.SocketStream(right)
    stream = libp2p_io_trio.TrioTCPStream(receiver)
    receives = [0]
    receive_some = receiver.receive_some

    async def counted(max_bytes: int | None = None) -> bytes:
        receives[0] += 1
        return await receive_some(max_bytes)

    receiver.receive_some = counted  # type: ignore[method-assign]
    reader = SimpleNamespace(read=lambda n=None: read(stream, n))
    async with sender, receiver:
        await sender.send_all(b"".join(len(f).to_bytes(2, "big") + f for f in frames))
        bodies = []
        for _ in frames:
            length = int.from_bytes(await read_exactly(reader, 2), "big")  # type: ignore[arg-type]
            bodies.append(await read_exactly(reader, length))  # type: ignore[arg-type]
    return bodies, receives[0]


async def test_tcp_reads_ahead_one_receive_for_a_burst_of_frames() -> None:
    """Stock: two socket receives per Noise frame (its length, then its body), each a system
    call and a scheduler trip. Ours: one receive for every frame already waiting."""
    stock, ours = _reads()
    frames = [bytes([i]) * (2000 + i) for i in range(10)]
    stock_bodies, stock_receives = await _frames_read(stock, frames)
    our_bodies, our_receives = await _frames_read(ours, frames)
    assert stock_bodies == our_bodies == frames
    assert stock_receives == 2 * len(frames)
    assert our_receives == 1


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=12),
    asks=st.lists(st.one_of(st.none(), st.integers(1, 70_000)), min_size=1, max_size=40),
)
def test_read_ahead_returns_the_bytes_in_order_whatever_is_asked(
    chunks: list[bytes], asks: list[int | None]
) -> None:
    """Reads of any sizes (None: what is there) get back exactly the bytes sent, in order, each
    at most what was asked, whatever the sender's writes were (the bytes arrive as the kernel
    hands them over)."""
    _, ours = _reads()
    sent = b"".join(chunks)

    async def main() -> bytes:
        left, right = trio.socket.socketpair()
        sender, receiver = trio.SocketStream(left), trio.SocketStream(right)
        stream = libp2p_io_trio.TrioTCPStream(receiver)
        got = bytearray()
        async with sender, receiver:
            for chunk in chunks:
                await sender.send_all(chunk)
            await sender.send_eof()
            assert await ours(stream, 0) == b""  # (as the library: nothing asked, nothing read)
            i = 0
            while True:
                ask = asks[i % len(asks)]
                i += 1
                data = await ours(stream, ask)
                assert ask is None or len(data) <= ask
                if not data:
                    return bytes(got)
                got += data

    assert trio.run(main) == sent


async def test_read_ahead_keeps_the_order_with_readers_waiting_on_each_other() -> None:
    """Two tasks reading one stream at once (the lock serializes their receives): the bytes
    each gets, taken together in the order the reads returned, are the bytes sent."""
    _, ours = _reads()
    left, right = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(left), trio.SocketStream(right)
    stream = libp2p_io_trio.TrioTCPStream(receiver)
    sent = random.Random(7).randbytes(200_000)
    got: list[bytes] = []

    async def reader(ask: int) -> None:
        while True:
            data = await ours(stream, ask)
            if not data:
                return
            got.append(data)

    async with sender, receiver, trio.open_nursery() as nursery:
        nursery.start_soon(reader, 1000)
        nursery.start_soon(reader, 5)
        for i in range(0, len(sent), 7000):
            await sender.send_all(sent[i : i + 7000])
            await trio.sleep(0)
        await sender.send_eof()
    assert b"".join(got) == sent


async def test_a_message_read_is_validated_by_its_read_loop_not_a_task_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stock (and ``INLINE_VALIDATION = False``): each message first read from a peer starts a
    service task (``manager.run_task``). Ours: the read loop validates it itself, in its task,
    before it handles the rest of the RPC."""
    router = GossipSub(protocols=[PROTOCOL_ID_V11], degree=3, degree_low=2, degree_high=6)
    pubsub = _unstarted_pubsub(router)
    router.pubsub = pubsub
    started: list[Callable[..., Any]] = []
    pubsub._manager = SimpleNamespace(  # type: ignore[assignment]
        is_running=True, run_task=lambda fn, *args: started.append(fn)
    )
    pubsub.subscribed_topics_receive[TOPIC] = None  # type: ignore[assignment]
    ran_in: list[object] = []

    async def push(forwarder: ID, msg: rpc_pb2.Message, msg_id: bytes) -> None:
        ran_in.append(trio.lowlevel.current_task())
        pubsub._inflight.pop(msg_id, None)

    monkeypatch.setattr(pubsub, "_push_inflight", push)
    peer = ID(b"\x00\x24" + b"p" * 36)
    stream = SimpleNamespace(metric_send_channel=None)

    async def handle(data: bytes) -> None:
        rpc = rpc_pb2.RPC(publish=[rpc_pb2.Message(data=data, topicIDs=[TOPIC])])
        await pubsub._handle_rpc(rpc, peer, stream, rpc.ByteSize())  # type: ignore[arg-type]

    try:
        monkeypatch.setattr(p2p_pubsub, "INLINE_VALIDATION", False)
        await handle(b"one")
        assert len(started) == 1 and ran_in == []
        monkeypatch.setattr(p2p_pubsub, "INLINE_VALIDATION", True)
        await handle(b"two")
        assert len(started) == 1 and ran_in == [trio.lowlevel.current_task()]
    finally:
        pubsub.seen_messages.stop()


async def test_a_read_loop_yields_every_few_rpcs_that_need_no_await(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RPCs judged without an await (here: handled at once, as a duplicate or a malformed batch
    is) arriving in one chunk: the read loop still goes through trio's scheduler once per
    RPCS_PER_CHECKPOINT of them, so a peer cannot hold it for a whole receive window."""
    router = GossipSub(protocols=[PROTOCOL_ID_V11], degree=3, degree_low=2, degree_high=6)
    pubsub = _unstarted_pubsub(router)
    router.pubsub = pubsub
    pubsub._manager = SimpleNamespace(is_running=True)  # type: ignore[assignment]
    handled: list[int] = []
    rounds = [0]

    class Rounds(trio.abc.Instrument):
        def before_io_wait(self, timeout: float) -> None:
            rounds[0] += 1

    async def handle(*args: Any) -> None:  # no await: as a duplicate is judged
        handled.append(rounds[0])

    monkeypatch.setattr(pubsub, "_handle_rpc", handle)
    count = 4 * p2p_pubsub.RPCS_PER_CHECKPOINT
    body = rpc_pb2.RPC(publish=[rpc_pb2.Message(data=b"x", topicIDs=[TOPIC])]).SerializeToString()
    chunks = [bytes([len(body)]) + body] * count
    peer = ID(b"\x00\x24" + b"p" * 36)

    async def read(n: int) -> bytes:
        if chunks:
            data = b"".join(chunks)
            chunks.clear()
            return data  # every RPC in one chunk, returned without a checkpoint
        return b""

    stream = SimpleNamespace(muxed_conn=SimpleNamespace(peer_id=peer), read=read)
    instrument = Rounds()
    trio.lowlevel.add_instrument(instrument)
    try:
        await pubsub.continuously_read_stream(stream)  # type: ignore[arg-type]
    finally:
        trio.lowlevel.remove_instrument(instrument)
        pubsub.seen_messages.stop()
    assert len(handled) == count
    assert handled[-1] - handled[0] >= count // p2p_pubsub.RPCS_PER_CHECKPOINT - 1


def _result(t: float, ok: bool = True) -> ValidationResult:
    return ValidationResult(is_valid=ok, timestamp=t, error_message=None)


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["get", "put", "expire", "tick"]), st.integers(0, 9)),
        max_size=80,
    ),
    max_size=st.integers(1, 6),
)
def test_lru_validation_cache_answers_as_the_library_does(
    steps: list[tuple[str, int]], max_size: int
) -> None:
    """The same calls, at the same times, to the library's cache and to ours: the same answers
    and the same entries (which verdicts are kept and which were evicted, least recently used
    first, or expired)."""
    clock = [1000.0]
    stock, ours = ValidationCache(ttl=5, max_size=max_size), LruValidationCache(5, max_size)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("time.time", lambda: clock[0])
        for op, key in steps:
            msg_id = bytes([key])
            if op == "get":
                assert stock.get(msg_id) == ours.get(msg_id)
            elif op == "put":
                result = _result(clock[0], key % 2 == 0)
                stock.put(msg_id, result)
                ours.put(msg_id, result)
            elif op == "expire":
                stock.clear_expired()
                ours.clear_expired()
            else:
                clock[0] += key
            assert stock.cache == dict(ours.cache)
            assert stock.access_order == list(ours.cache)  # least recently used first
