"""A hostile raw-libp2p peer attacks a crdtbook Network; the Network must survive.

The attacker is a stock py-libp2p host + Pubsub that writes hand-made RPC frames straight
onto its pubsub stream to the target, so it can send what an honest implementation never
would.  After each attack an honest peer publishes a good message, which the target must
still deliver.  A control test shows the crafted message of pitfall 1 does kill a stock
libp2p Pubsub, so the protection is really exercised.
"""

from __future__ import annotations

import hashlib
import os
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import pytest
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX, signature_validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_varint_prefixed
from multiaddr import Multiaddr

from crdtbook.node.p2p import FrameStream, GossipMessage, NetworkConfig, open_network

TOPIC = "crdtbook/test/ops"
TARGET_CFG = NetworkConfig(
    heartbeat_interval=0.2,
    call_timeout=5.0,
    dial_timeout=5.0,
    max_message_size=16 * 1024,  # inbound RPC frame limit = 16 KiB + 64 KiB
)


@dataclass
class Raw:
    """A stock libp2p node the test drives by hand."""

    host: IHost
    pubsub: Pubsub

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    def signed(self, data: bytes, topic: str = TOPIC) -> rpc_pb2.Message:
        """A correctly signed message, exactly as ``Pubsub.publish`` builds it."""
        msg = rpc_pb2.Message(
            data=data,
            topicIDs=[topic],
            from_id=self.host.get_id().to_bytes(),
            seqno=os.urandom(8),
        )
        payload = PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString()
        msg.signature = self.host.get_private_key().sign(payload)
        msg.key = self.host.get_public_key().serialize()
        return msg

    def unsigned(self, data: bytes, topic: str = TOPIC) -> rpc_pb2.Message:
        """A message as a crdtbook node publishes it: data and topic, no envelope
        (gossipsub's StrictNoSign; node/p2p_pubsub.py)."""
        return rpc_pb2.Message(data=data, topicIDs=[topic])

    async def send_raw(self, target: str, frame_body: bytes) -> None:
        """Write one length-prefixed frame on our pubsub stream to ``target``."""
        target_id = ID.from_base58(target)
        await self.pubsub.wait_for_peer(target_id, timeout=5)
        # The target refuses an oversize frame from its length prefix and resets the stream,
        # which can reach us while we are still writing the body (1 run in 10 before).
        with suppress(StreamReset):
            await self.pubsub.peers[target_id].write(encode_varint_prefixed(frame_body))

    async def send(self, target: str, *msgs: rpc_pb2.Message) -> None:
        await self.send_raw(target, rpc_pb2.RPC(publish=list(msgs)).SerializeToString())


def stock_pubsub(host: IHost, router: GossipSub) -> Pubsub:
    return Pubsub(host, router, msg_id_constructor=lambda m: hashlib.sha256(m.data).digest())


@asynccontextmanager
async def raw_node(
    make_pubsub: Callable[[IHost, GossipSub], Pubsub] = stock_pubsub,
) -> AsyncIterator[Raw]:
    """A libp2p host with gossipsub on a free loopback port; stock ``Pubsub`` unless
    ``make_pubsub`` builds another."""
    key_pair = create_new_key_pair()
    host = new_host(
        key_pair=key_pair,
        sec_opt={
            NOISE_ID: NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        },
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    router = GossipSub(
        protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=1,
        spam_protection_enabled=False,
        adaptive_gossip_enabled=False,
    )
    pubsub = make_pubsub(host, router)
    try:
        async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                async with background_trio_service(pubsub), background_trio_service(router):
                    await pubsub.wait_until_ready()
                    yield Raw(host, pubsub)
            finally:
                # Stopping the host leaves its connections' sockets to the garbage collector.
                with trio.move_on_after(5, shield=True):
                    await host.get_network().close()
    finally:
        pubsub.seen_messages.stop()


def forged_key_message() -> rpc_pb2.Message:
    """Pitfall 1: a hashed (sha256, not identity) ``from_id`` plus a garbage ``key``.
    libp2p cannot extract a key from the id, so it deserializes ``key`` and raises."""
    return rpc_pb2.Message(
        data=b"ok:forged",
        topicIDs=[TOPIC],
        from_id=b"\x12\x20" + hashlib.sha256(b"nobody").digest(),
        seqno=os.urandom(8),
        key=b"\xde\xad\xbe\xef not a key",
        signature=b"\x00" * 64,
    )


async def validate(data: bytes, from_peer: str) -> bool:
    """The target's validator: ``ok:`` payloads pass, ``boom`` makes it raise."""
    await trio.lowlevel.checkpoint()
    if data.startswith(b"boom"):
        raise ValueError("validator bug triggered by input")
    return data.startswith(b"ok:")


async def attack_garbage_data(h: Raw, target: str) -> None:
    await h.send(target, h.unsigned(os.urandom(300)))


async def attack_oversize(h: Raw, target: str) -> None:
    await h.send(target, h.unsigned(b"ok:" + b"x" * (200 * 1024)))


async def attack_forged_key(h: Raw, target: str) -> None:
    await h.send(target, forged_key_message())


async def attack_raising_validator(h: Raw, target: str) -> None:
    await h.send(target, h.unsigned(b"boom, the validator raises"))


async def attack_undecodable_rpc(h: Raw, target: str) -> None:
    await h.send_raw(target, b"\xff" * 64)


async def attack_control_garbage(h: Raw, target: str) -> None:
    ids = [os.urandom(32) for _ in range(3000)]
    control = rpc_pb2.ControlMessage(
        ihave=[rpc_pb2.ControlIHave(topicID=TOPIC, messageIDs=ids)],
        iwant=[rpc_pb2.ControlIWant(messageIDs=ids)],
        graft=[rpc_pb2.ControlGraft(topicID=t) for t in (TOPIC, "unknown", "")],
        prune=[
            rpc_pb2.ControlPrune(
                topicID=TOPIC,
                peers=[rpc_pb2.PeerInfo(peerID=os.urandom(40), signedPeerRecord=os.urandom(99))],
                backoff=2**64 - 1,
            )
        ],
    )
    subs = [rpc_pb2.RPC.SubOpts(subscribe=True, topicid="x" * 5000)]
    await h.send_raw(target, rpc_pb2.RPC(control=control, subscriptions=subs).SerializeToString())


async def attack_bad_signature(h: Raw, target: str) -> None:
    msg = h.signed(b"ok:tampered")
    msg.data = b"ok:tampered!"  # signature no longer matches
    await h.send(target, msg)


Attack = Callable[[Raw, str], Awaitable[None]]


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        (attack_garbage_data, "invalid"),
        (attack_oversize, None),  # libp2p resets the stream before parsing: no count
        (attack_forged_key, "signed"),  # any envelope field is refused (StrictNoSign)
        (attack_raising_validator, "validator-error"),
        (attack_undecodable_rpc, "malformed"),
        (attack_bad_signature, "signed"),
        (attack_control_garbage, None),  # handled by libp2p itself
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
async def test_target_survives_and_still_delivers(attack: Attack, reason: str | None) -> None:
    with trio.fail_after(15):
        async with (
            open_network(b"T" * 32, ["/ip4/127.0.0.1/tcp/0"], config=TARGET_CFG) as target,
            open_network(b"B" * 32, ["/ip4/127.0.0.1/tcp/0"], config=TARGET_CFG) as honest,
            raw_node() as hostile,
        ):
            reasons: list[tuple[str, str]] = []
            judged = trio.Event()  # the target refused something and said so

            def on_reject(peer: str, why: str) -> None:
                reasons.append((peer, why))
                judged.set()

            target.on_reject(on_reject)
            target.set_validator(TOPIC, validate)
            sub = await target.subscribe(TOPIC)
            await honest.subscribe(TOPIC)
            await honest.connect(target.addrs()[0])
            await hostile.host.connect(info_from_p2p_addr(Multiaddr(target.addrs()[0])))
            await _wait(lambda: target.peer_id in honest.gossip_peers(TOPIC))

            await attack(hostile, target.peer_id)
            if reason is not None:
                with trio.fail_after(5):
                    await judged.wait()  # processed (and, unprotected, it would have died)
            else:
                # libp2p drops these itself and says nothing we could wait on: a quiet period
                # in which an unprotected target would die (a refusal would show, and fail).
                await trio.sleep(0.3)

            await honest.publish(TOPIC, b"ok:good after attack")
            with trio.fail_after(5):
                got = await sub.receive()
            assert got == GossipMessage(TOPIC, b"ok:good after attack", honest.peer_id)
            with pytest.raises(trio.WouldBlock):
                sub.receive_nowait()  # the attack delivered nothing
            if reason is not None:
                assert reasons == [(hostile.peer_id, reason)]
                assert target.rejections(hostile.peer_id) == 1
            else:
                assert reasons == []
            assert target.rejections(honest.peer_id) == 0


async def test_reject_policy_can_ban_the_attacker() -> None:
    """The node's policy (here: ban on the 3rd reject) uses the mechanism provided."""
    with trio.fail_after(15):
        async with (
            open_network(b"T" * 32, ["/ip4/127.0.0.1/tcp/0"], config=TARGET_CFG) as target,
            raw_node() as hostile,
        ):

            def policy(peer: str, why: str) -> None:
                if target.rejections(peer) >= 3:
                    target.ban(peer, 60)

            target.on_reject(policy)
            target.set_validator(TOPIC, validate)
            sub = await target.subscribe(TOPIC)
            await hostile.host.connect(info_from_p2p_addr(Multiaddr(target.addrs()[0])))
            for i in range(3):
                await hostile.send(target.peer_id, hostile.unsigned(b"junk-%d" % i))
            await _wait(lambda: target.is_banned(hostile.peer_id))
            await _wait(lambda: hostile.peer_id not in target.connected_peers())
            # Reconnecting does not help: the connection is dropped again.
            with suppress(Exception):
                await hostile.host.connect(info_from_p2p_addr(Multiaddr(target.addrs()[0])))
            await trio.sleep(0.3)
            assert hostile.peer_id not in target.connected_peers()
            assert target.rejections(hostile.peer_id) == 3
            with pytest.raises(trio.WouldBlock):
                sub.receive_nowait()


def test_forged_key_message_breaks_stock_signature_validator() -> None:
    """The crafted message really triggers pitfall 1 (the stock validator raises)."""
    with pytest.raises(Exception):  # noqa: B017 - any exception is the bug
        signature_validator(forged_key_message())


@pytest.mark.parametrize(
    ("attack", "culprit"),
    [
        (attack_forged_key, "signature_validator"),  # pitfall 1
        (attack_undecodable_rpc, "continuously_read_stream"),  # DecodeError escapes
    ],
    ids=["forged_key", "undecodable_rpc"],
)
async def test_control_stock_pubsub_is_killed(attack: Attack, culprit: str) -> None:
    """Control: the same attacks against an unprotected stock Pubsub take its node
    down, so the survival tests above are meaningful."""
    leaves: list[BaseException] = []
    with trio.fail_after(15):
        try:
            async with raw_node() as victim, raw_node() as attacker:
                await victim.pubsub.subscribe(TOPIC)
                addr = str(victim.host.get_addrs()[0])
                await attacker.host.connect(info_from_p2p_addr(Multiaddr(addr)))
                await attack(attacker, victim.peer_id)
                # The crash ends this block at once; the bound only ends a survival (a failure).
                with trio.move_on_after(5):
                    await trio.sleep_forever()
        except BaseException as exc:  # whatever shape the crash takes
            leaves = list(_leaves(exc))
    frames = [f.name for leaf in leaves for f in traceback.extract_tb(leaf.__traceback__)]
    assert culprit in frames, f"stock Pubsub survived or died otherwise: {leaves!r}"


async def test_garbage_on_every_offered_protocol() -> None:
    """Open a stream on each protocol the target offers and write junk into it."""
    with trio.fail_after(15):
        async with (
            open_network(b"T" * 32, ["/ip4/127.0.0.1/tcp/0"], config=TARGET_CFG) as target,
            raw_node() as hostile,
        ):

            async def sync_handler(stream: FrameStream) -> None:
                await stream.read_frame(1024)  # junk raises FrameError/EOF: logged only

            target.set_stream_handler("/crdtbook/sync/1", sync_handler)
            sub = await target.subscribe(TOPIC)
            await hostile.host.connect(info_from_p2p_addr(Multiaddr(target.addrs()[0])))
            target_id = ID.from_base58(target.peer_id)
            await _wait(lambda: bool(hostile.host.get_peerstore().get_protocols(target_id)))
            protocols = hostile.host.get_peerstore().get_protocols(target_id)
            assert "/ipfs/kad/1.0.0" in protocols and "/meshsub/1.1.0" in protocols
            junk = (
                encode_varint_prefixed(b"\xff" * 64),
                b"\xff" * 64,
                encode_varint_prefixed(os.urandom(500)),
            )

            async def send_junk(protocol: str, payload: bytes) -> None:
                try:
                    stream = await hostile.host.new_stream(target_id, [TProtocol(protocol)])
                    await stream.write(payload)
                    # Wait until the target has read the junk and given up on the stream (EOF
                    # or a reset); bounded, for a handler that keeps waiting for more.
                    with trio.move_on_after(1):
                        while await stream.read(1024):
                            pass
                    await stream.close()
                except Exception:
                    pass  # the target may reset us: fine

            # All at once: each waits at most 1 s for the target, so the whole costs ~1 s.
            async with trio.open_nursery() as nursery:
                for protocol in protocols:
                    for payload in junk:
                        nursery.start_soon(send_junk, protocol, payload)
            # Still alive and serving: gossip from a fresh honest peer gets through.
            async with open_network(
                b"B" * 32, ["/ip4/127.0.0.1/tcp/0"], config=TARGET_CFG
            ) as honest:
                await honest.subscribe(TOPIC)
                await honest.connect(target.addrs()[0])
                await _wait(lambda: target.peer_id in honest.gossip_peers(TOPIC))
                await honest.publish(TOPIC, b"still alive")
                with trio.fail_after(5):
                    assert (await sub.receive()).data == b"still alive"


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


async def _wait(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
