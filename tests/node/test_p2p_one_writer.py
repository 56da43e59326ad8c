"""One writer per pubsub stream (node/p2p_pubsub.py, ``ONE_WRITER``), next to the stock
py-libp2p 0.8.1 behaviour it replaces.

A Yamux stream's write goes out a frame at a time, waiting for the peer's window between
frames. The library's replays to a new peer (gossipsub's ``send_recent_messages`` and
``flush_pending_messages``, through ``Pubsub.write_msg``) write to the peer's stream while the
peer's sending task writes its queue there too: with a slow reader the two writes interleave and
the peer reads garbage (seen as "pubsub RPC of 9846906971 bytes exceeds" and DecodeError with a
witness restarting under load). The stream here stands for such a Yamux stream: each write goes
out in two halves with a trip through the scheduler between them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import RpcQueue

from crdtbook.node.p2p_pubsub import take_frames

from .test_hostile_peer import TOPIC, raw_node, stock_pubsub
from .test_p2p_pubsub import hardened_pubsub

pytestmark = pytest.mark.timeout(30)


class _WindowedStream:
    """A peer's pubsub stream whose every write goes out in two halves, the writer waiting in
    between (for a window update, in Yamux)."""

    def __init__(self, peer_id: ID) -> None:
        self.muxed_conn = SimpleNamespace(peer_id=peer_id)
        self.out = bytearray()

    async def write(self, data: bytes) -> None:
        half = len(data) // 2
        self.out += data[:half]
        await trio.sleep(0)
        self.out += data[half:]

    def rpcs(self) -> list[rpc_pb2.RPC]:
        """The RPCs written, in order; raises if the bytes are not whole frames of RPCs."""
        buf = bytearray(self.out)
        frames = take_frames(buf, 1 << 24)
        assert not buf, "bytes left after the last whole frame"
        out = []
        for frame in frames:
            rpc = rpc_pb2.RPC()
            rpc.ParseFromString(frame)
            out.append(rpc)
        return out


def _rpc(fill: bytes, size: int) -> rpc_pb2.RPC:
    msg = rpc_pb2.Message(data=fill * size, topicIDs=[TOPIC], from_id=b"\x00", seqno=fill)
    return rpc_pb2.RPC(publish=[msg])


@asynccontextmanager
async def _peer_with_sending_task(
    make: Callable[[IHost, GossipSub], Pubsub],
) -> AsyncIterator[tuple[Pubsub, _WindowedStream, RpcQueue]]:
    """A pubsub with a (fake) peer whose stream is windowed and whose sending task runs."""
    async with raw_node(make) as node:
        peer = ID.from_pubkey(create_new_key_pair().public_key)
        stream = _WindowedStream(peer)
        queue = RpcQueue()
        pubsub: Any = node.pubsub
        pubsub.peers[peer] = stream
        pubsub.peer_queues[peer] = queue
        pubsub.peer_topics.setdefault(TOPIC, set()).add(peer)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pubsub.handle_sending_messages, peer, stream, queue)
            try:
                yield pubsub, stream, queue
            finally:
                queue.close()


async def _queued_and_replayed(make: Callable[[IHost, GossipSub], Pubsub]) -> _WindowedStream:
    """A queued RPC and a replayed one (``write_msg``, as the library's replays call it), at
    once; the stream once both are written (or 2 s)."""
    first, second = _rpc(b"a", 20_000), _rpc(b"b", 20_000)
    async with _peer_with_sending_task(make) as (pubsub, stream, queue):
        queue.push(first)
        await trio.sleep(0)  # the sending task is writing the first RPC's first half
        await pubsub.write_msg(stream, second)  # type: ignore[arg-type]
        whole = len(first.SerializeToString()) + len(second.SerializeToString()) + 6
        with trio.move_on_after(2):
            while len(stream.out) < whole:
                await trio.sleep(0.01)
    return stream


async def test_stock_replay_beside_the_sending_task_interleaves_the_peers_bytes() -> None:
    stream = await _queued_and_replayed(stock_pubsub)
    try:
        rpcs = stream.rpcs()
    except Exception:
        return  # garbage on the wire, as the peer saw it
    assert [r.publish[0].seqno for r in rpcs] != [b"a", b"b"]


async def test_ours_queues_the_replay_so_the_peer_reads_whole_rpcs() -> None:
    stream = await _queued_and_replayed(hardened_pubsub())
    assert [r.publish[0].seqno for r in stream.rpcs()] == [b"a", b"b"]


async def test_the_routers_replay_of_recent_messages_goes_through_the_queue() -> None:
    """gossipsub's ``send_recent_messages`` (a new peer, or a new subscription) reaches the
    stream through the peer's queue: nothing is written while the sending task is held up."""
    async with raw_node(hardened_pubsub()) as node:
        pubsub: Any = node.pubsub
        router: Any = pubsub.router
        peer = ID.from_pubkey(create_new_key_pair().public_key)
        stream = _WindowedStream(peer)
        queue = RpcQueue()
        pubsub.peers[peer] = stream
        pubsub.peer_queues[peer] = queue
        pubsub.peer_topics.setdefault(TOPIC, set()).add(peer)
        router.mcache.put(_rpc(b"r", 100).publish[0])
        await router.send_recent_messages(peer, TOPIC)
        assert len(queue) == 1
        assert not stream.out
        queue.close()


async def test_a_replay_to_a_stream_no_longer_the_peers_is_not_written() -> None:
    async with _peer_with_sending_task(hardened_pubsub()) as (pubsub, stream, queue):
        stale = _WindowedStream(stream.muxed_conn.peer_id)
        assert await pubsub.write_msg(stale, _rpc(b"s", 10)) is False  # type: ignore[arg-type]
        assert not stale.out
        assert len(queue) == 0
