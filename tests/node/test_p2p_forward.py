"""The gossip forward and send path of node/p2p_pubsub.py (issue #12), each change next to the
stock py-libp2p 0.8.1 behaviour it replaces: the lean ``ContentGossipSub.publish``
(``LEAN_FORWARD``), one shared RPC encoded once for every peer (``SHARED_SEND``), and a peer's
queued RPCs written in one stream write (``COALESCED_WRITES``). What each peer receives, what is
queued for peers not ready yet, what is dropped and counted, are the library's."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.stream.exceptions import StreamClosed
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.rpc_queue import OutBoundQueueSize, RpcQueue

from crdtbook.node import p2p_install, p2p_pubsub
from crdtbook.node.p2p_pubsub import (
    MAX_COALESCED_WRITE,
    ContentGossipSub,
    FrameCache,
    HardenedPubsub,
    content_message_id,
    take_frames,
)

from .test_p2p import networks, wait_gossip_ready, wait_until
from .test_p2p_transport import _unstarted_pubsub

TOPIC = "fwd-topic"
OTHER_TOPIC = "fwd-other"


def _peer(name: str) -> ID:
    return ID(b"\x00\x24" + name.encode().ljust(36, b"."))


MESH = [_peer("mesh-1"), _peer("mesh-2"), _peer("mesh-3")]
FORWARDER = _peer("forwarder")
HOLDER = _peer("holder")  # sent a copy while the message was in validation
UNIDENTIFIED = _peer("unidentified")  # in the topic, protocol not known yet
UNSUBSCRIBED = _peer("unsubscribed")  # connected, not in the topic (yet)
OTHER_TOPIC_ONLY = _peer("other-topic")  # connected, in another topic


@contextmanager
def _switches(ours: bool, **but: bool) -> Iterator[None]:
    """Sets the three switches (True = ours; ``but`` sets some otherwise) and restores them."""
    names = ("LEAN_FORWARD", "SHARED_SEND", "COALESCED_WRITES")
    saved = {name: getattr(p2p_pubsub, name) for name in names}
    for name in names:
        setattr(p2p_pubsub, name, but.get(name, ours))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(p2p_pubsub, name, value)


def lean_router(**extra: Any) -> ContentGossipSub:
    """A router as node/p2p.py configures one (v1.1, D 3/2/6, no spam protection, no adaptive
    gossip), with ``extra`` arguments."""
    return ContentGossipSub(
        msg_id=content_message_id,
        protocols=[PROTOCOL_ID_V11],
        degree=3,
        degree_low=2,
        degree_high=6,
        spam_protection_enabled=False,
        adaptive_gossip_enabled=False,
        **extra,
    )


@contextmanager
def _forwarding_node(host: IHost) -> Iterator[tuple[ContentGossipSub, HardenedPubsub]]:
    """An unstarted router and pubsub as node/p2p.py configures them, with peers in every state
    the forward path tells apart: mesh peers (one of them with a full queue, one whose queue
    takes only small RPCs), the forwarder, a holder, a peer not identified yet, a connected
    peer not in the topic, and one in another topic."""
    router = lean_router()
    # Without reached lists, which the library does not write: test_p2p_reached.py has them.
    pubsub = _unstarted_pubsub(router, host, unsigned=True, reached_hints=False)
    try:
        connected = [*MESH, FORWARDER, HOLDER, UNSUBSCRIBED, OTHER_TOPIC_ONLY]
        for peer_id in connected:
            pubsub.peers[peer_id] = SimpleNamespace()  # type: ignore[assignment]
            pubsub.peer_queues[peer_id] = RpcQueue()
            router.add_peer(peer_id, PROTOCOL_ID_V11)
        pubsub.peer_topics[TOPIC] = {*MESH, FORWARDER, HOLDER, UNIDENTIFIED}
        pubsub.peer_topics[OTHER_TOPIC] = {OTHER_TOPIC_ONLY}
        router.mesh[TOPIC] = {*MESH, FORWARDER, HOLDER}
        # mesh-1 has a GRAFT to retry (it is in our mesh, so the retry is still due).
        router._pending_control[MESH[0]] = rpc_pb2.ControlMessage(
            graft=[rpc_pb2.ControlGraft(topicID=TOPIC)]
        )
        # mesh-2's queue is full; mesh-3's takes RPCs of at most 64 bytes.
        full = pubsub.peer_queues[MESH[1]]
        for _ in range(OutBoundQueueSize):
            assert full.push(rpc_pb2.RPC())
        pubsub.peer_queues[MESH[2]].max_message_size = 64
        yield router, pubsub
    finally:
        pubsub.seen_messages.stop()


def _queued(pubsub: HardenedPubsub) -> dict[ID, list[bytes]]:
    """Every RPC each peer's queue holds, serialized (the full queue's filler left out)."""
    out: dict[ID, list[bytes]] = {}
    for peer_id, queue in pubsub.peer_queues.items():
        rpcs = []
        while (rpc := queue._queue.pop()) is not None:
            if rpc.ByteSize():
                rpcs.append(rpc.SerializeToString())
        out[peer_id] = rpcs
    return out


async def _forward(ours: bool, host: IHost, data: bytes) -> dict[str, Any]:
    """The message ``data`` forwarded by a node in the state of :func:`_forwarding_node`: what
    each peer's queue got, what is pending for peers not ready, what is cached, counted."""
    p2p_install.install()  # the drop counter (and the cached sender record)
    with _switches(ours), _forwarding_node(host) as (router, pubsub):
        msg = rpc_pb2.Message(data=data, topicIDs=[TOPIC])
        msg_id = content_message_id(msg)
        pubsub._holders[msg_id] = {HOLDER}
        drops = p2p_install.send_drops()
        await router.publish(FORWARDER, msg)
        return {
            "queued": _queued(pubsub),
            "pending": {
                peer: [rpc.SerializeToString() for _, rpc in entries]
                for peer, entries in router._pending_messages.items()
            },
            "mcache": list(router.mcache.msgs),
            "window": router.mcache.window(TOPIC),
            "drops": p2p_install.send_drops() - drops,
            "holders_skipped": pubsub.holders_skipped,
            "pending_control": set(router._pending_control),
            "last_publish": set(router.time_since_last_publish),
            "deliveries_tracked": sum(map(len, router.recent_message_deliveries.values())),
        }


async def test_lean_forward_queues_what_the_library_queues() -> None:
    """Each peer's queue gets the same bytes, the same peers get the message queued as pending
    (not identified yet, or not in the topic yet), the same drops are counted (a full queue,
    an oversized RPC), a pending GRAFT still rides along to its peer, the holder and the
    forwarder get nothing. Ours pushes one RPC object, encoded once, to the peers with nothing
    to attach. The one difference: the library records every forward's time in a list only
    adaptive gossip reads, and nothing trims when adaptive gossip is off."""
    host = new_host(key_pair=create_new_key_pair(b"f" * 32))
    data = b"an op batch " * 4
    stock = await _forward(False, host, data)
    ours = await _forward(True, host, data)
    for key in ("queued", "pending", "mcache", "window", "drops", "holders_skipped"):
        assert ours[key] == stock[key], key
    for key in ("pending_control", "last_publish"):
        assert ours[key] == stock[key], key
    queued = ours["queued"]
    # mesh-1: the message, then its GRAFT retry (the library's split makes it a part of its
    # own); mesh-2 full, mesh-3 too small: both dropped.
    first, retry = (rpc_pb2.RPC.FromString(b) for b in queued[MESH[0]])
    assert first.publish[0].data == data and not first.HasField("control")
    assert [graft.topicID for graft in retry.control.graft] == [TOPIC]
    assert queued[MESH[1]] == queued[MESH[2]] == []
    assert ours["drops"] == 2
    assert queued[FORWARDER] == queued[HOLDER] == []
    assert ours["holders_skipped"] == 1
    assert set(ours["pending"]) == {UNIDENTIFIED, UNSUBSCRIBED, OTHER_TOPIC_ONLY}
    assert stock["deliveries_tracked"] == 1 and ours["deliveries_tracked"] == 0


async def test_shared_rpc_is_encoded_once_for_every_peer() -> None:
    """Four mesh peers with nothing to attach: stock copies, splits and sizes the RPC per peer
    (four RPC objects queued); ours queues the same object four times, serialized once, and
    the sending side takes the cached frame."""
    host = new_host(key_pair=create_new_key_pair(b"g" * 32))
    results = {}
    for ours in (False, True):
        with _switches(ours), _forwarding_node(host) as (router, pubsub):
            peers = [_peer(f"plain-{i}") for i in range(4)]
            for peer_id in peers:
                pubsub.peers[peer_id] = SimpleNamespace()  # type: ignore[assignment]
                pubsub.peer_queues[peer_id] = RpcQueue()
                router.add_peer(peer_id, PROTOCOL_ID_V11)
            pubsub.peer_topics[TOPIC].update(peers)
            router.mesh[TOPIC] = set(peers)
            await router.publish(FORWARDER, rpc_pb2.Message(data=b"x" * 500, topicIDs=[TOPIC]))
            rpcs = [pubsub.peer_queues[p]._queue._non_priority[0] for p in peers]
            frames = [pubsub.frames.take(rpc) for rpc in rpcs]
            results[ours] = {
                "objects": len({id(rpc) for rpc in rpcs}),
                "frames": frames,
                "encoded": pubsub.frames.encoded,
                "cached_after": len(pubsub.frames),
            }
    assert results[False]["objects"] == 4 and results[True]["objects"] == 1
    assert results[False]["frames"] == results[True]["frames"]
    assert results[False]["encoded"] == 4 and results[True]["encoded"] == 1
    assert results[True]["cached_after"] == 0  # every queue sent it: the frame is released


class _Stream:
    """A pubsub stream that records each write (or fails as told)."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.writes: list[bytes] = []
        self.fail = fail
        self.muxed_conn = SimpleNamespace(peer_id=MESH[0])

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail is not None:
            raise self.fail
        self.writes.append(bytes(data))


async def _send_loop(ours: bool, rpcs: list[rpc_pb2.RPC], stream: _Stream, **but: bool) -> list[ID]:
    """Runs a peer's sending loop over ``rpcs`` queued at once, then closes the queue; returns
    the peers declared dead."""
    host = new_host(key_pair=create_new_key_pair(b"h" * 32))
    with _switches(ours, **but), _forwarding_node(host) as (_router, pubsub):
        dead: list[ID] = []
        pubsub._handle_dead_peer = dead.append  # type: ignore[method-assign]
        queue = RpcQueue()
        for rpc in rpcs:
            assert queue.push(rpc)
        queue.close()  # a closed queue still hands out what it holds, then ends the loop
        with trio.fail_after(5):
            await pubsub.handle_sending_messages(MESH[0], stream, queue)  # type: ignore[arg-type]
        return dead


def _rpcs(count: int, size: int) -> list[rpc_pb2.RPC]:
    return [
        rpc_pb2.RPC(publish=[rpc_pb2.Message(data=bytes([i % 256]) * size, topicIDs=[TOPIC])])
        for i in range(count)
    ]


async def test_queued_rpcs_go_out_in_one_write_with_the_same_bytes() -> None:
    """Stock writes each queued RPC on its own (a Yamux frame and a Noise message each); ours
    writes what is queued in one write: the same frames, in the same order."""
    rpcs = _rpcs(5, 300)
    stock, ours = _Stream(), _Stream()
    assert await _send_loop(False, rpcs, stock) == []
    assert await _send_loop(True, rpcs, ours) == []
    assert len(stock.writes) == 5 and len(ours.writes) == 1
    assert ours.writes[0] == b"".join(stock.writes)
    one_by_one = _Stream()  # ours with COALESCED_WRITES off (A/B of one change): the library's
    assert await _send_loop(True, rpcs, one_by_one, COALESCED_WRITES=False) == []
    assert one_by_one.writes == stock.writes
    buf = bytearray(ours.writes[0])
    assert [rpc_pb2.RPC.FromString(f) for f in take_frames(buf, 1 << 20)] == rpcs


async def test_coalesced_writes_stay_under_the_bound() -> None:
    """30 RPCs of ~5 KB (150 KB queued): each write holds whole frames and at most
    MAX_COALESCED_WRITE bytes; together, stock's bytes."""
    rpcs = _rpcs(30, 5000)
    stock, ours = _Stream(), _Stream()
    await _send_loop(False, rpcs, stock)
    await _send_loop(True, rpcs, ours)
    assert len(ours.writes) == 3
    assert all(len(w) <= MAX_COALESCED_WRITE for w in ours.writes)
    assert b"".join(ours.writes) == b"".join(stock.writes)


@pytest.mark.parametrize("error", [StreamClosed("closed"), RuntimeError("a bug")])
async def test_a_failed_write_makes_the_peer_dead_as_the_library_does(error: Exception) -> None:
    for ours in (False, True):
        stream = _Stream(fail=error)
        assert await _send_loop(ours, _rpcs(3, 100), stream) == [MESH[0]]
        assert stream.writes == []


def test_frame_cache_keys_by_the_object_it_holds() -> None:
    """An entry holds its RPC, so its id cannot name another object meanwhile; an equal RPC
    that is another object is encoded on its own; the byte bound evicts the oldest entries."""
    cache = FrameCache(max_bytes=2000)
    first = _rpcs(1, 100)[0]
    assert cache.shared_size(first) == first.ByteSize()
    cache.hold(first)
    twin = rpc_pb2.RPC()
    twin.CopyFrom(first)
    assert cache.take(twin) == cache.take(first)
    assert cache.encoded == 2 and cache.reused == 1
    assert len(cache) == 0
    # Not shareable: several messages, or control to carry.
    assert cache.shared_size(rpc_pb2.RPC(publish=[*first.publish, *first.publish])) is None
    assert cache.shared_size(rpc_pb2.RPC(control=rpc_pb2.ControlMessage())) is None
    big = _rpcs(3, 900)
    for rpc in big:
        cache.shared_size(rpc)
    assert len(cache) == 2  # the first of three ~900-byte frames went past 2,000 bytes


def test_drops_of_gossip_rpcs_are_counted() -> None:
    """The router drops gossip (``GossipSub.send_rpc``) through its own module's ``drop_rpc``:
    counted since install, as pubsub's announcement drops were."""
    import libp2p.pubsub.gossipsub as gossipsub_module
    import libp2p.pubsub.pubsub as pubsub_module

    p2p_install.install()
    before = p2p_install.send_drops()
    rpc = rpc_pb2.RPC(publish=[rpc_pb2.Message(data=b"dropped", topicIDs=[TOPIC])])
    gossipsub_module.drop_rpc(MESH[0], rpc)  # type: ignore[attr-defined]
    pubsub_module.drop_rpc(MESH[0], rpc)  # type: ignore[attr-defined]
    assert p2p_install.send_drops() == before + 2


async def test_idontwant_and_observers_reach_nobody_on_v11() -> None:
    """Why the lean path skips the library's IDONTWANT and topic-observer steps when the router
    speaks v1.1/v1.0 only: run as the library runs them, with v1.1 mesh peers, they queue
    nothing, and an OBSERVE from a v1.1 peer registers no observer (the library acts on it only
    from a v1.3 peer)."""
    host = new_host(key_pair=create_new_key_pair(b"i" * 32))
    with _switches(False), _forwarding_node(host) as (router, pubsub):
        assert not router.speaks_v12_plus
        before = {peer: len(queue) for peer, queue in pubsub.peer_queues.items()}
        observe = rpc_pb2.RPC(
            control=rpc_pb2.ControlMessage(observe=[rpc_pb2.ControlObserve(topicID=TOPIC)])
        )
        await router.handle_rpc(observe, MESH[0])
        assert router.topic_observation.get_observers(TOPIC) == set()
        await router._emit_idontwant_for_message(b"an id", [TOPIC])
        await router._notify_observers([TOPIC], b"an id")
        assert {peer: len(queue) for peer, queue in pubsub.peer_queues.items()} == before


async def test_a_burst_reaches_every_node_and_leaves_no_frame_cached() -> None:
    """Four real networks (a line a - b - c - d, so b and c forward), 24 messages published at
    once: each node's validator sees every message once, and when gossip is done no frame is
    left in any node's cache (every queue that took a shared RPC sent it)."""
    count = 24
    with trio.fail_after(30):
        async with networks("burst-a", "burst-b", "burst-c", "burst-d") as nets:
            seen: list[list[bytes]] = [[] for _ in nets]
            for i, net in enumerate(nets):

                async def validate(data: bytes, peer: str, i: int = i) -> bool:
                    seen[i].append(data)
                    return True

                net.set_validator(TOPIC, validate)
                await net.join(TOPIC)
            for left, right in itertools.pairwise(nets):
                await right.connect(left.addrs()[0])
            await wait_gossip_ready(nets, TOPIC)
            await wait_until(
                lambda: (
                    all(len(n._router.mesh.get(TOPIC, ())) >= 1 for n in nets)
                    and len(nets[1]._router.mesh.get(TOPIC, ())) == 2
                    and len(nets[2]._router.mesh.get(TOPIC, ())) == 2
                ),
                "the line's mesh",
            )
            sent = [i.to_bytes(2, "big") + b"x" * 600 for i in range(count)]
            for data in sent:
                await nets[0].publish(TOPIC, data)
            await wait_until(lambda: all(len(s) == count for s in seen[1:]), "every message")
            await trio.sleep(0.2)  # any extra copy would arrive by now
            assert all(sorted(s) == sent for s in seen[1:])
            assert [len(n._pubsub.frames) for n in nets] == [0] * len(nets)
            assert sum(n._pubsub.frames.reused for n in nets) >= count * 2  # b and c forwarded
