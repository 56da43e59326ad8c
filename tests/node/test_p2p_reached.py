"""Reached lists and flood publishing (node/p2p_pubsub.py, issue #12): what a sender writes, what
a stock protobuf parser makes of it, what a forwarder skips, next to the stock behaviour (no
list, the mesh only) each replaces; then four real nodes, where every node reads one copy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.rpc_queue import RpcQueue

from crdtbook.node import p2p_install
from crdtbook.node.p2p_pubsub import (
    MAX_REACHED_TAGS,
    REACHED_KEY,
    REACHED_TAG_BYTES,
    ContentGossipSub,
    HardenedPubsub,
    content_message_id,
    peer_tag,
    reached_prefix,
    split_reached,
    split_tags,
)

from .test_p2p import FAST, networks, wait_gossip_ready, wait_until
from .test_p2p_forward import lean_router
from .test_p2p_transport import _unstarted_pubsub

TOPIC = "reached-topic"
#: The counters of ``status``'s ``network`` object, as specs/control-api.md lists them.
STATS_KEYS = {
    "peers",
    "routing_table",
    "banned",
    "rejected",
    "gossip_dropped",
    "gossip_send_dropped",
    "mesh_peers",
    "fanout_peers",
    "gossip_holders_skipped",
    "gossip_reached_skipped",
    "gossip_copies_in",
    "gossip_firsts_in",
}


def _peer(name: str) -> ID:
    """A peer id whose last bytes (its tag) tell it apart."""
    return ID(b"\x00\x24" + name.encode().rjust(36, b"."))


PEERS = [_peer(f"peer-{i}") for i in range(5)]
MESH = PEERS[:3]
FORWARDER = _peer("forwarder")
UNIDENTIFIED = _peer("unidentified")  # in the topic, protocol not known yet


def _rpc(data: bytes = b"an op batch") -> rpc_pb2.RPC:
    return rpc_pb2.RPC(publish=[rpc_pb2.Message(data=data, topicIDs=[TOPIC])])


def test_a_reached_list_is_a_field_a_stock_parser_skips() -> None:
    """The list goes before the RPC's own fields; protobuf (libp2p's generated class, as any
    other implementation's) reads the frame as the RPC without it."""
    body = _rpc().SerializeToString()
    tags = [bytes([i]) * REACHED_TAG_BYTES for i in range(3)]
    frame = reached_prefix(tags) + body
    assert frame.startswith(REACHED_KEY)
    assert rpc_pb2.RPC.FromString(frame).publish == _rpc().publish
    assert split_reached(frame) == (b"".join(tags), body)
    assert split_tags(b"".join(tags)) == tags
    assert split_reached(body) == (b"", body)
    # specs/protocol.md section 12's example, byte for byte.
    example = reached_prefix([bytes(range(8)), bytes(range(8, 16))])
    assert example.hex() == "8afcd91a10" + bytes(range(16)).hex()


def test_a_list_that_cannot_be_used_is_ignored_and_the_rpc_kept() -> None:
    """A list is only a hint: one that is not whole tags, or too long, is dropped and the RPC
    read; a field that runs past the frame leaves the frame to protobuf, which refuses it."""
    body = _rpc().SerializeToString()
    odd = REACHED_KEY + bytes([5]) + b"12345" + body
    assert split_reached(odd) == (b"", body)
    too_long = REACHED_KEY + bytes([0x88, 0x04]) + b"x" * 520 + body  # length 520 (varint)
    assert split_reached(too_long) == (b"", body)  # 520 bytes: 65 tags, over MAX_REACHED_TAGS
    past_the_end = REACHED_KEY + bytes([100]) + b"x" * 10
    assert split_reached(past_the_end) == (b"", past_the_end)
    assert reached_prefix([]) == b""
    many = [i.to_bytes(REACHED_TAG_BYTES, "big") for i in range(MAX_REACHED_TAGS + 10)]
    kept, _ = split_reached(reached_prefix(many + many[:3]) + body)
    assert split_tags(kept) == many[:MAX_REACHED_TAGS]  # distinct, in order, bounded


@contextmanager
def _node(
    flood_publish_max: int, reached_hints: bool = True
) -> Iterator[tuple[ContentGossipSub, HardenedPubsub]]:
    """An unstarted router and pubsub with five peers in the topic, three of them (and the
    forwarder) in the mesh, and a peer in the topic whose protocol is not known yet."""
    p2p_install.install()
    router = lean_router(flood_publish_max=flood_publish_max)
    host = new_host(key_pair=create_new_key_pair(b"r" * 32))
    pubsub = _unstarted_pubsub(router, host, unsigned=True, reached_hints=reached_hints)
    router.pubsub = pubsub
    try:
        for peer_id in [*PEERS, FORWARDER]:
            pubsub.peers[peer_id] = SimpleNamespace()  # type: ignore[assignment]
            pubsub.peer_queues[peer_id] = RpcQueue()
            router.add_peer(peer_id, PROTOCOL_ID_V11)
        pubsub.peer_topics[TOPIC] = {*PEERS, FORWARDER, UNIDENTIFIED}
        router.mesh[TOPIC] = {*MESH, FORWARDER}
        yield router, pubsub
    finally:
        pubsub.seen_messages.stop()


def _sent(pubsub: HardenedPubsub) -> dict[ID, bytes]:
    """The frame each peer's queue got (the sending side's take), by peer."""
    out = {}
    for peer_id, queue in pubsub.peer_queues.items():
        if len(queue):
            rpc = queue._queue._non_priority[0]
            out[peer_id] = pubsub.frames.take(rpc)
    return out


def _tags_of(frame: bytes) -> set[bytes]:
    body = frame[1:] if frame[0] < 0x80 else frame[2:]  # the frame's length prefix
    tags, _ = split_reached(body)
    return set(split_tags(tags))


async def test_own_messages_flood_the_topic_and_name_everyone_reached() -> None:
    """Up to ``flood_publish_max`` topic peers, a node's own message goes to each of them (the
    library: its mesh), with a list naming itself and them; beyond it, the mesh. A peer whose
    protocol is not known yet gets it queued for later, as from the library, not sent too."""
    with _node(flood_publish_max=32) as (router, pubsub):
        await pubsub.publish(TOPIC, b"own batch")
        sent = _sent(pubsub)
        assert set(sent) == {*PEERS, FORWARDER}
        assert set(router._pending_messages) == {UNIDENTIFIED}
        assert len(set(sent.values())) == 1 and pubsub.frames.encoded == 1  # one for all
        tags = _tags_of(next(iter(sent.values())))
        assert tags == {peer_tag(p) for p in (*PEERS, FORWARDER, pubsub.my_id)}
    with _node(flood_publish_max=6) as (_, pubsub):  # seven topic peers: over the bound
        await pubsub.publish(TOPIC, b"own batch")
        assert set(_sent(pubsub)) == {*MESH, FORWARDER}
    with _node(flood_publish_max=0, reached_hints=False) as (_, pubsub):  # stock
        await pubsub.publish(TOPIC, b"own batch")
        sent = _sent(pubsub)
        assert set(sent) == {*MESH, FORWARDER}
        assert not any(_tags_of(frame) for frame in sent.values())


async def _forward_listed(flood_publish_max: int, hints: bool) -> tuple[set[ID], set[bytes], int]:
    """A message from the forwarder whose copy named two of the mesh peers, forwarded: the
    peers sent a copy, the tags of the list it carries, the forwards skipped for the list."""
    with _node(flood_publish_max=flood_publish_max, reached_hints=hints) as (router, pubsub):
        msg = rpc_pb2.Message(data=b"a forwarded batch", topicIDs=[TOPIC])
        pubsub._reached[content_message_id(msg)] = peer_tag(MESH[0]) + peer_tag(MESH[1])
        await router.publish(FORWARDER, msg)
        sent = _sent(pubsub)
        tags = set().union(*(_tags_of(frame) for frame in sent.values()))
        return set(sent), tags, pubsub.reached_skipped


async def test_a_forward_skips_the_peers_a_list_names_and_names_its_own() -> None:
    """Two of the three mesh peers named: the third gets it (the library: all three), with a
    list naming this node, the third and the forwarder, not the two (a list reaches one hop)."""
    peers, tags, skipped = await _forward_listed(flood_publish_max=32, hints=True)
    assert peers == {MESH[2]} and skipped == 2
    with _node(flood_publish_max=32) as (_, pubsub):
        me = pubsub.my_id
    assert tags == {peer_tag(p) for p in (me, MESH[2], FORWARDER)}
    assert await _forward_listed(flood_publish_max=32, hints=False) == (set(MESH), set(), 0)


async def test_a_topic_over_the_flood_bound_neither_honours_nor_writes_lists() -> None:
    """Seven topic peers, a bound of 6: gossipsub's mesh forwarding as before."""
    assert await _forward_listed(flood_publish_max=6, hints=True) == (set(MESH), set(), 0)


async def test_a_peer_whose_queue_is_full_is_not_named() -> None:
    """Its copy is dropped, so the list must not tell others it has the message."""
    with _node(flood_publish_max=32) as (_, pubsub):
        full = pubsub.peer_queues[PEERS[4]]
        while full.push(rpc_pb2.RPC()):
            pass
        await pubsub.publish(TOPIC, b"own batch")
        frame = pubsub.frames.take(pubsub.peer_queues[PEERS[0]]._queue._non_priority[0])
        assert peer_tag(PEERS[4]) not in _tags_of(frame)
        assert peer_tag(PEERS[3]) in _tags_of(frame)


async def test_four_nodes_read_one_copy_each() -> None:
    """a - b - c - d, every pair connected. a's message reaches the three others from a itself
    (a flood), each reads that one copy and forwards it to nobody: the list names them all.
    Without lists nor flood (py-libp2p's behaviour), the mesh's forwards bring more copies."""
    copies: dict[bool, list[int]] = {}
    for hints in (True, False):
        config = replace(
            FAST,
            reached_hints=hints,
            flood_publish_max=32 if hints else 0,
            degree=3,
            degree_low=3,
            degree_high=6,
        )
        with trio.fail_after(30):
            names = [f"reach-{c}-{hints}" for c in "abcd"]
            async with networks(*names, config=config) as nets:
                for i, net in enumerate(nets):
                    for other in nets[i + 1 :]:
                        await net.connect(other.addrs()[0])
                for net in nets:
                    await net.join(TOPIC)
                await wait_gossip_ready(nets, TOPIC)
                await wait_until(
                    lambda: all(len(n._router.mesh.get(TOPIC, ())) == 3 for n in nets),
                    "full meshes",
                )
                await nets[0].publish(TOPIC, b"one batch")
                await wait_until(
                    lambda: all(n.stats()["gossip_firsts_in"] == 1 for n in nets[1:]),
                    "the batch at every node",
                )
                # Forwards follow validation at once: a quiet spell for any copy on its way
                # (no event marks an absence).
                await trio.sleep(0.3)
                copies[hints] = [n.stats()["gossip_copies_in"] for n in nets[1:]]
                if hints:
                    assert sum(n.stats()["gossip_reached_skipped"] for n in nets[1:]) == 6
                assert not any(n._pubsub._reached for n in nets)  # kept only in validation
                assert set(nets[0].stats()) == STATS_KEYS
    assert copies[True] == [1, 1, 1]
    assert sum(copies[False]) > 3


async def _down_the_line(lying: bool) -> tuple[int, int]:
    """a - h - b - c in a line (h lying or not); a publishes. Returns c's first receipts and
    b's forwards skipped for a list, once b has the message and a quiet spell has passed."""
    config = replace(FAST, degree=1, degree_low=1, degree_high=2)
    names = [f"lie-{c}-{lying}" for c in "ahbc"]
    async with networks(*names, config=config) as nets:
        a, h, b, c = nets
        await h.connect(a.addrs()[0])
        await b.connect(h.addrs()[0])
        await c.connect(b.addrs()[0])
        if lying:
            everyone = [net._id for net in nets]

            def lie(*_: object) -> bytes:
                return reached_prefix(peer_tag(peer) for peer in everyone)

            h._router._reached_list = lie  # type: ignore[method-assign]
        for net in nets:
            await net.join(TOPIC)
        await wait_gossip_ready(nets, TOPIC)
        await wait_until(
            lambda: (
                b._id in h._router.mesh.get(TOPIC, ()) and c._id in b._router.mesh.get(TOPIC, ())
            ),
            "h - b - c in the meshes",
        )
        await a.publish(TOPIC, b"down the line")
        await wait_until(lambda: b.stats()["gossip_firsts_in"] == 1, "the batch at b")
        await trio.sleep(0.3)  # a quiet spell for b's forward, if any (no event marks none)
        return c.stats()["gossip_firsts_in"], b.stats()["gossip_reached_skipped"]


async def test_a_lying_list_stops_only_the_forwards_it_names() -> None:
    """h, a hostile relay, writes lists naming every peer. b accepts and delivers a's message
    as ever but forwards it to nobody, so c's only gossip path is cut: the harm a neighbour that
    does not forward does anyway (a node's sync then brings it: the sync tests). With an honest
    h, c gets it."""
    with trio.fail_after(30):
        assert await _down_the_line(lying=True) == (0, 1)
        assert await _down_the_line(lying=False) == (1, 0)
