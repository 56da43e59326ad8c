"""What node/p2p_pubsub.py and node/p2p_install.py change in py-libp2p 0.8.1's gossip, each next
to the stock behaviour it replaces (issue #12): IHAVE ids the receiver can recognise, unsigned
messages (StrictNoSign), and the library patched only by an explicit install step (issue #13)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import MessageTooLarge
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.utils.varint import encode_varint_prefixed
from multiaddr import Multiaddr

from crdtbook.node.p2p import NetworkConfig, open_network
from crdtbook.node.p2p_pubsub import (
    ContentGossipSub,
    HardenedPubsub,
    content_message_id,
    has_envelope,
    take_frames,
)

from .test_hostile_peer import TOPIC, raw_node

ROUTER_ARGS = {
    "protocols": [PROTOCOL_ID_V11, PROTOCOL_ID],
    "degree": 6,
    "degree_low": 4,
    "degree_high": 12,
    "heartbeat_interval": 1,
    "spam_protection_enabled": False,
    "adaptive_gossip_enabled": False,
}


def _message(data: bytes) -> rpc_pb2.Message:
    """A message as a signing publisher builds it (from + seqno; the signature is irrelevant)."""
    return rpc_pb2.Message(
        data=data, topicIDs=[TOPIC], from_id=b"\x00\x24" + b"p" * 36, seqno=b"\x00" * 7 + b"\x01"
    )


@contextmanager
def _attached(router: GossipSub) -> Iterator[Pubsub]:
    """A pubsub (not running) with content message ids, attached to ``router``."""
    host = new_host(key_pair=create_new_key_pair())
    pubsub = Pubsub(host, router, msg_id_constructor=content_message_id)
    router.pubsub = pubsub
    try:
        yield pubsub
    finally:
        pubsub.seen_messages.stop()  # joins its sweeper thread


async def _iwant_after_ihave(router_class: type[GossipSub], **extra: object) -> list[bytes]:
    """The ids a receiver asks for (IWANT) when a peer advertises (IHAVE) a message it has
    already seen: the sender's message cache names the ids, the receiver checks its seen-cache."""
    sender = router_class(**ROUTER_ARGS, **extra)  # type: ignore[arg-type]
    receiver = router_class(**ROUTER_ARGS, **extra)  # type: ignore[arg-type]
    msg = _message(b"an op batch")
    asked: list[bytes] = []

    async def record_iwant(msg_ids: list[bytes], to_peer: ID) -> None:
        asked.extend(msg_ids)

    with _attached(sender):
        sender.mcache.put(msg)
        advertised = sender.mcache.window(TOPIC)
        with _attached(receiver) as pubsub:
            pubsub.seen_messages.add(content_message_id(msg))  # the receiver has it already
            receiver.emit_iwant = record_iwant  # type: ignore[method-assign]
            peer = ID(b"\x00\x24" + b"s" * 36)
            ihave = rpc_pb2.ControlIHave(topicID=TOPIC, messageIDs=advertised)
            await receiver.handle_ihave(ihave, peer)
    return asked


async def test_stock_ihave_names_ids_the_receiver_cannot_recognise() -> None:
    """Stock: the message cache keys by from + seqno whatever id function pubsub uses, so a
    receiver asks again for a message it has (each one a full copy sent over IWANT)."""
    asked = await _iwant_after_ihave(GossipSub)
    assert asked == [_message(b"an op batch").from_id + _message(b"an op batch").seqno]


async def test_content_cache_ihave_is_recognised() -> None:
    asked = await _iwant_after_ihave(ContentGossipSub, msg_id=content_message_id)
    assert asked == []


async def test_content_cache_serves_iwant_by_content_id() -> None:
    router = ContentGossipSub(**ROUTER_ARGS, msg_id=content_message_id)  # type: ignore[arg-type]
    msg = _message(b"wanted")
    router.mcache.put(msg)
    assert router.mcache.window(TOPIC) == [content_message_id(msg)]
    assert router.mcache.get(content_message_id(msg)) is msg


def test_stock_equivocation_check_drops_a_second_unsigned_message() -> None:
    """Stock: equivocation is judged by from + seqno, empty in unsigned messages, so every
    unsigned message after the first would be dropped; a content id cannot equivocate."""
    stock = GossipSub(**ROUTER_ARGS)  # type: ignore[arg-type]
    ours = ContentGossipSub(**ROUTER_ARGS, msg_id=content_message_id)  # type: ignore[arg-type]
    first, second = (rpc_pb2.Message(data=d, topicIDs=[TOPIC]) for d in (b"one", b"two"))
    assert stock._check_equivocation(first) and not stock._check_equivocation(second)
    assert ours._check_equivocation(first) and ours._check_equivocation(second)


async def test_published_gossip_carries_no_envelope() -> None:
    """Stock publishes sign (from, seqno, signature, key on every copy); the node's do not. A
    stock peer that does not insist on signatures sees exactly data and topic."""

    def lenient(host: object, router: GossipSub) -> Pubsub:
        return Pubsub(host, router, msg_id_constructor=content_message_id, strict_signing=False)  # type: ignore[arg-type]

    cfg = NetworkConfig(heartbeat_interval=0.2, call_timeout=5.0, dial_timeout=5.0)
    with trio.fail_after(20):
        async with (
            open_network(b"N" * 32, ["/ip4/127.0.0.1/tcp/0"], config=cfg) as node,
            raw_node(lenient) as peer,
        ):
            got: list[rpc_pb2.Message] = []

            def capture(forwarder: ID, msg: rpc_pb2.Message) -> bool:
                got.append(msg)
                return True

            peer.pubsub.set_topic_validator(TOPIC, capture, is_async_validator=False)
            sub = await peer.pubsub.subscribe(TOPIC)
            await node.subscribe(TOPIC)
            await peer.host.connect(info_from_p2p_addr(Multiaddr(node.addrs()[0])))
            await peer.pubsub.wait_for_subscription(ID.from_base58(node.peer_id), TOPIC, 10)
            # In the node's mesh, not only known to be subscribed: a message published before
            # the heartbeat grafts the peer goes to no one (and the test would wait for ever).
            while peer.peer_id not in node.gossip_peers(TOPIC) or not node.stats()["mesh_peers"]:
                await trio.sleep(0.05)  # (the Network offers no event for this)
            await node.publish(TOPIC, b"unsigned batch")
            msg = await sub.get()
            assert msg.data == b"unsigned batch"
            assert not has_envelope(msg) and list(msg.topicIDs) == [TOPIC]
            assert got and not any(has_envelope(m) for m in got)  # (copies may race)
            # What the stock publish of the same peer sends: the node refuses it ("signed").
            assert has_envelope(peer.signed(b"a stock publish"))


def test_hardened_unsigned_implies_no_strict_signing() -> None:
    host = new_host(key_pair=create_new_key_pair())
    router = ContentGossipSub(**ROUTER_ARGS, msg_id=content_message_id)  # type: ignore[arg-type]
    pubsub = HardenedPubsub(
        host,
        router,
        on_reject=lambda peer, why: None,
        deliver=lambda msg, forwarder: None,
        msg_id_constructor=content_message_id,
        unsigned=True,
    )
    try:
        assert pubsub.unsigned and not pubsub.strict_signing
    finally:
        pubsub.seen_messages.stop()


PROBE = r"""
import logging, os, sys
import libp2p.pubsub.pubsub as ps
import libp2p.transport.tcp.tcp as tcp
import libp2p.protocol_muxer.multiselect_communicator as ms
import libp2p.stream_muxer.yamux.yamux as yx
def state():
    return (os.environ.get("PY_YAMUX_RELEASE_ON_READ"), yx._py_yamux_env("RELEASE_ON_READ", "1"),
            logging.getLogger("libp2p").propagate,
            ps.maybe_consume_signed_record.__module__, ps.drop_rpc.__name__,
            tcp._set_reuse_flags.__name__, ms.read_delim.__module__)
stock = state()
import crdtbook.node.p2p
after_import = state()
from crdtbook.node import p2p_install
p2p_install.install()
p2p_install.install()
print(stock == after_import, state())
"""


def test_import_changes_nothing_install_changes_libp2p() -> None:
    """Importing node.p2p leaves logging and libp2p as they were; the install step (run when a
    network opens) makes every change, once however often it runs, and never the environment."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("PY_YAMUX_RELEASE_ON_READ", "LIBP2P_DEBUG")
    }
    probe = [sys.executable, "-c", PROBE]
    out = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=60, check=True)
    out = out.stdout.strip()
    assert out == (
        "True (None, '0', True, 'crdtbook.node.p2p_records', 'counting_drop_rpc', "
        "'set_reuse_addr_only', 'crdtbook.node.p2p_limits')"
    ), out  # the environment untouched; Yamux reads "0" (batched window updates) all the same


def test_has_envelope() -> None:
    assert not has_envelope(rpc_pb2.Message(data=b"x", topicIDs=[TOPIC]))
    for field in ("from_id", "seqno", "signature", "key"):
        assert has_envelope(rpc_pb2.Message(data=b"x", topicIDs=[TOPIC], **{field: b"\x01"}))


def _frame(body: bytes) -> bytes:
    return encode_varint_prefixed(body)


def test_take_frames_splits_what_is_complete_and_keeps_the_rest() -> None:
    buf = bytearray(_frame(b"a" * 200) + _frame(b"") + _frame(b"bc") + _frame(b"d" * 300)[:5])
    assert take_frames(buf, 1000) == [b"a" * 200, b"", b"bc"]
    assert bytes(buf) == _frame(b"d" * 300)[:5]
    buf += _frame(b"d" * 300)[5:]
    assert take_frames(buf, 1000) == [b"d" * 300] and buf == bytearray()
    with pytest.raises(MessageTooLarge):
        take_frames(bytearray(_frame(b"x" * 1001)[:3]), 1000)  # refused from its prefix
    with pytest.raises(ParseError):
        take_frames(bytearray(b"\xff" * 11), 1000)


class _Manager:
    """A service manager that records the tasks it is asked to start."""

    is_running = True

    def __init__(self) -> None:
        self.tasks: list[object] = []

    def run_task(self, fn: object, *args: object, **kwargs: object) -> None:
        self.tasks.append(args)


class _Stream:
    """A pubsub stream from ``peer`` that carries ``data``, then ends."""

    metric_send_channel = None

    def __init__(self, peer: ID, data: bytes) -> None:
        self.muxed_conn = type("Conn", (), {"peer_id": peer})()
        self._data = data

    async def read(self, n: int | None = None) -> bytes:
        if not self._data:
            raise StreamEOF("done")
        size = len(self._data) if n is None or n < 0 else n
        chunk, self._data = self._data[:size], self._data[size:]
        return chunk


@pytest.mark.parametrize("ours", [False, True], ids=["stock", "hardened"])
async def test_read_loop_starts_a_task_per_copy_only_in_the_stock_library(ours: bool) -> None:
    """Three copies of a message already seen, each in its own RPC: the stock loop starts a
    service task for each (to find in the task that it is a duplicate); ours starts none, and
    none for a new message either (the loop validates it itself: ``INLINE_VALIDATION``)."""
    router = ContentGossipSub(**ROUTER_ARGS, msg_id=content_message_id)  # type: ignore[arg-type]
    host = new_host(key_pair=create_new_key_pair())
    extra: dict[str, object] = {"on_reject": lambda p, w: None, "deliver": lambda m, f: None}
    cls = HardenedPubsub if ours else Pubsub
    pubsub = cls(host, router, msg_id_constructor=content_message_id, **extra if ours else {})  # type: ignore[arg-type]
    try:
        pubsub.subscribed_topics_receive[TOPIC] = object()  # type: ignore[assignment]
        manager = _Manager()
        pubsub._manager = manager  # type: ignore[assignment]
        seen = rpc_pb2.Message(data=b"seen", topicIDs=[TOPIC])
        new = rpc_pb2.Message(data=b"new", topicIDs=[TOPIC])
        pubsub.seen_messages.add(content_message_id(seen))
        rpcs = [rpc_pb2.RPC(publish=[seen]).SerializeToString()] * 3
        rpcs.append(rpc_pb2.RPC(publish=[new]).SerializeToString())
        stream = _Stream(ID(b"\x00\x24" + b"f" * 36), b"".join(_frame(r) for r in rpcs))
        await pubsub.continuously_read_stream(stream)  # type: ignore[arg-type]
        assert len(manager.tasks) == (0 if ours else 4)
    finally:
        pubsub.seen_messages.stop()
