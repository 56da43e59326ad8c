"""What node/p2p_install.py and node/p2p_pubsub.py change in py-libp2p 0.8.1's gossip transport
for issue #12, each next to the stock behaviour it replaces: locks taken without a scheduler trip
when free (``EagerLock``), Yamux frames written without a second trip, window updates in half
windows, no peer scoring without score parameters, no copy forwarded to a peer that sent one
while it was in validation (``skip_holders``), and validators awaited in the message's own task."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import libp2p.io.trio as libp2p_io_trio
import libp2p.stream_muxer.rw_lock as libp2p_rw_lock
import pytest
import trio
import trio.testing
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.exceptions import ValidationError
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

from crdtbook.node import p2p_install
from crdtbook.node.p2p_pubsub import ContentGossipSub, HardenedPubsub, content_message_id

from .test_p2p import FAST, TOPIC, networks, wait_gossip_ready, wait_until


async def _is_checkpoint(acquire: Callable[[], Awaitable[None]]) -> bool:
    """Whether ``acquire()`` of a free lock is a checkpoint: run in a cancelled scope, a
    checkpoint raises Cancelled (and so takes nothing); trio's scheduler trip comes with it."""
    with trio.CancelScope() as scope:
        scope.cancel()
        await acquire()
    return scope.cancelled_caught


async def test_free_trio_lock_is_a_checkpoint_an_eager_one_is_not() -> None:
    stock = trio.Lock()
    assert await _is_checkpoint(stock.acquire)
    assert not stock.locked()
    eager = p2p_install.EagerLock()
    assert not await _is_checkpoint(eager.acquire)
    assert eager.locked()
    eager.release()
    assert not eager.locked()
    semaphore = p2p_install.EagerSemaphore(1)
    assert not await _is_checkpoint(semaphore.acquire)
    assert semaphore.value == 0
    semaphore.release()
    assert semaphore.value == 1
    assert await _is_checkpoint(trio.Semaphore(1).acquire)


async def test_eager_lock_keeps_exclusion_and_waiters_first() -> None:
    """A held lock blocks; at release the longest waiter gets it, not a task that asks later
    (a free-looking lock with waiters is not free)."""
    lock = p2p_install.EagerLock()
    order: list[str] = []
    inside = 0

    async def user(name: str, hold: float) -> None:
        nonlocal inside
        async with lock:
            inside += 1
            assert inside == 1, "two tasks inside the lock"
            order.append(name)
            await trio.sleep(hold)
            inside -= 1

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(user, "first", 0.05)
            await trio.sleep(0.01)  # first holds it
            nursery.start_soon(user, "waiter", 0.0)
            await trio.sleep(0.01)  # waiter is parked
            await trio.sleep(0.05)  # first releases: ownership passes to waiter
            nursery.start_soon(user, "late", 0.0)
    assert order == ["first", "waiter", "late"]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery, lock:
            nursery.start_soon(user, "blocked", 0.0)
            await trio.sleep(0.02)
            assert order[-1] == "late"  # still waiting while we hold it
    assert order[-1] == "blocked"


async def test_install_makes_the_transport_locks_eager() -> None:
    """After install (open_network does it), the locks libp2p's transport objects create are
    eager; nothing else in libp2p changes."""
    p2p_install.install()
    stream = libp2p_io_trio.TrioTCPStream(None)  # type: ignore[arg-type]
    assert isinstance(stream.read_lock, p2p_install.EagerLock)
    assert isinstance(stream.write_lock, p2p_install.EagerLock)
    rw = libp2p_rw_lock.ReadWriteLock()
    async with rw.write_lock():
        pass
    async with rw.read_lock():
        pass
    assert libp2p_io_trio.trio.Event is trio.Event  # the rest of trio is trio's


async def _copies_back_to_the_holder(skip_holders: bool) -> int:
    """a - b - c, all in one mesh. a publishes; c accepts at once and forwards to b while b's
    validator is still running; then b accepts. Returns how many copies c read (stock: one from
    a and one from b, which forwards to c although c had sent it a copy). Without reached lists,
    which would tell c that b has a copy on its way (test_p2p_reached.py)."""
    config = replace(FAST, skip_holders=skip_holders, reached_hints=False)
    async with networks("hold-a", "hold-b", "hold-c", config=config) as [a, b, c]:
        await b.connect(a.addrs()[0])
        await c.connect(a.addrs()[0])
        await c.connect(b.addrs()[0])
        release_b = trio.Event()
        c_accepted = trio.Event()

        async def slow(data: bytes, from_peer: str) -> bool:
            await release_b.wait()
            return True

        async def fast(data: bytes, from_peer: str) -> bool:
            c_accepted.set()
            return True

        b.set_validator(TOPIC, slow)
        c.set_validator(TOPIC, fast)
        for net in (a, b, c):
            await net.join(TOPIC)
        await wait_gossip_ready([a, b, c], TOPIC)
        await wait_until(
            lambda: all(len(n._router.mesh.get(TOPIC, ())) == 2 for n in (a, b, c)), "full mesh"
        )
        await a.publish(TOPIC, b"an op batch")
        await c_accepted.wait()
        # c forwarded to b (its mesh, less a): wait until b has read that copy
        await wait_until(lambda: b.stats()["gossip_copies_in"] == 2, "c's copy at b")
        release_b.set()
        await wait_until(lambda: b.stats()["gossip_firsts_in"] == 1, "b's validation")
        # b forwards now (or not); a quiet period to let a copy arrive if one was sent
        await trio.sleep(0.3)
        assert b.stats()["gossip_holders_skipped"] == (1 if skip_holders else 0)
        return int(c.stats()["gossip_copies_in"])


async def test_no_copy_back_to_a_peer_that_sent_one_during_validation() -> None:
    with trio.fail_after(30):
        assert await _copies_back_to_the_holder(skip_holders=False) == 2  # stock py-libp2p
        assert await _copies_back_to_the_holder(skip_holders=True) == 1


def _unstarted_pubsub(router: GossipSub, host: Any = None, **kwargs: Any) -> HardenedPubsub:
    """A HardenedPubsub on ``host`` (default: a new one), not started (the caller stops its
    seen-cache thread)."""
    return HardenedPubsub(
        host if host is not None else new_host(key_pair=create_new_key_pair()),
        router,
        on_reject=lambda peer, why: None,
        deliver=lambda msg, forwarder: None,
        msg_id_constructor=content_message_id,
        **kwargs,
    )


async def test_nothing_from_a_blacklisted_peer_is_handled() -> None:
    """A banned peer's read loop lives until its stream is reset; a GRAFT or a subscription read
    in that window must not put it back into the mesh or the topic tables its teardown cleared
    (the library handles control messages without a blacklist check)."""
    router = GossipSub(protocols=[PROTOCOL_ID_V11], degree=4, degree_low=3, degree_high=6)
    pubsub = _unstarted_pubsub(router)
    router.pubsub = pubsub
    try:
        banned = ID(b"\x00\x24" + b"b" * 36)
        router.mesh[TOPIC] = set()
        router.peer_protocol[banned] = PROTOCOL_ID_V11
        pubsub.blacklisted_peers.add(banned)  # add_to_blacklist, less its teardown task
        rpc = rpc_pb2.RPC(
            subscriptions=[rpc_pb2.RPC.SubOpts(subscribe=True, topicid=TOPIC)],
            control=rpc_pb2.ControlMessage(graft=[rpc_pb2.ControlGraft(topicID=TOPIC)]),
        )
        stream = SimpleNamespace(metric_send_channel=None)
        await pubsub._handle_rpc(rpc, banned, stream, rpc.ByteSize())  # type: ignore[arg-type]
        assert banned not in router.mesh[TOPIC]
        assert banned not in pubsub.peer_topics.get(TOPIC, set())
    finally:
        pubsub.seen_messages.stop()


def test_default_peer_scores_gate_nothing_so_the_router_keeps_none() -> None:
    """Stock: a scorer with default parameters, whose gates pass every peer (score 0 against
    thresholds of -inf). Ours: no scorer (the router's own code skips every gate then)."""
    stock = GossipSub(protocols=[PROTOCOL_ID_V11], degree=4, degree_low=3, degree_high=6)
    assert stock.scorer is not None
    peer = ID(b"\x00\x24" + b"s" * 36)
    stock.scorer.penalize_behavior(peer, 10.0)  # weight 0: no effect
    assert stock.scorer.score(peer, [TOPIC]) == 0
    assert stock.scorer.allow_publish(peer, [TOPIC])
    assert stock.scorer.allow_gossip(peer, [TOPIC])
    assert not stock.scorer.is_graylisted(peer, [TOPIC])
    ours = ContentGossipSub(
        msg_id=content_message_id,
        protocols=[PROTOCOL_ID_V11],
        degree=4,
        degree_low=3,
        degree_high=6,
    )
    assert ours.scorer is None


async def test_yamux_frame_write_is_one_locked_write_without_a_second_trip() -> None:
    """Stock ``_write_frame`` writes, then checkpoints again (the socket send has already);
    ours only writes, the same bytes under the same lock."""
    p2p_install.install()
    written: list[bytes] = []

    class Conn:
        async def write(self, data: bytes) -> None:
            written.append(data)  # a send that happens not to checkpoint

    muxer = SimpleNamespace(
        _write_lock=p2p_install.EagerLock(),  # as Yamux creates it once installed
        secured_conn=Conn(),
        is_initiator_value=True,
    )
    frame = bytes(12) + b"payload"
    lean = Yamux._write_frame
    stock = lean._crdtbook_original  # type: ignore[attr-defined]
    assert await _is_checkpoint(lambda: stock(muxer, frame))  # the extra trip
    assert not await _is_checkpoint(lambda: lean(muxer, frame))
    assert written == [frame, frame]
    assert not muxer._write_lock.locked()


async def _window_updates(update: Callable[..., Awaitable[None]], messages: int) -> list[int]:
    """The WINDOW_UPDATE increments a Yamux stream sends while its reader consumes ``messages``
    gossip messages of 2 KB one at a time, as ``YamuxStream.read`` does: the frame's bytes leave
    the receive window when they arrive and the buffer when they are read."""
    sent: list[int] = []
    conn = SimpleNamespace(stream_buffers={1: bytearray()}, rtt=lambda: 0.001)
    stream = YamuxStream(1, conn, is_initiator=False)  # type: ignore[arg-type]

    async def send_window_update(increment: int, skip_lock: bool = False) -> None:
        sent.append(increment)

    stream.send_window_update = send_window_update  # type: ignore[method-assign]
    for _ in range(messages):
        stream.recv_window -= 2048  # the data frame arrives
        conn.stream_buffers[1].extend(bytes(2048))
        del conn.stream_buffers[1][:]  # the reader takes it
        await update(stream, bytes_read=2048)
        # The sender may never have more in flight than the window it was granted.
        assert stream.recv_window >= 0
    return sent


async def test_yamux_returns_credit_in_half_windows_not_after_every_read() -> None:
    """Stock py-libp2p sends a WINDOW_UPDATE after every read of a small message (its "partial
    slack" branch): one extra Noise frame back per gossip message. Ours, as go-yamux, waits
    until half the window has been read: the same credit, in few frames."""
    p2p_install.install()
    ours = YamuxStream._auto_tune_and_send_window_update
    stock = ours._crdtbook_original  # type: ignore[attr-defined]
    messages = 200  # 400 KB: more than the 256 KiB window, so credit must come back
    stock_updates = await _window_updates(stock, messages)
    our_updates = await _window_updates(ours, messages)
    assert len(stock_updates) >= messages // 2  # (its window auto-tuning skips a few)
    assert 1 <= len(our_updates) <= 4
    # Each of ours returns at least half the initial window (the sender is never starved:
    # it gets credit back while it still holds half a window).
    assert all(increment >= 128 * 1024 for increment in our_updates)
    assert sum(our_updates) >= messages * 2048 - 128 * 1024


class _Spawns(trio.abc.Instrument):
    """Counts tasks spawned while installed."""

    def __init__(self) -> None:
        self.count = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.count += 1


async def test_validation_runs_in_the_message_task_with_the_library_verdicts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Stock ``validate_msg`` opens a nursery and spawns a task per message for its async
    validators; ours awaits them in the caller's task. The verdicts, the result cache, a
    validator that raises and one that outlives the timeout are the library's."""
    router = GossipSub(protocols=[PROTOCOL_ID_V11], degree=3, degree_low=2, degree_high=6)
    pubsub = _unstarted_pubsub(router, validation_timeout=1.0)
    verdicts = {b"good": True, b"bad": False}

    async def validator(forwarder: ID, msg: rpc_pb2.Message) -> bool:
        if msg.data == b"slow":
            await trio.sleep(10)
        if msg.data == b"boom":
            raise RuntimeError("a validator's bug")
        return verdicts[msg.data]

    pubsub.set_topic_validator(TOPIC, validator, is_async_validator=True)
    peer = ID(b"\x00\x24" + b"p" * 36)
    spawns = _Spawns()

    async def verdict(validate: Callable[..., Awaitable[None]], data: bytes) -> str:
        msg = rpc_pb2.Message(data=data, topicIDs=[TOPIC])
        pubsub.validation_cache.cache.clear()
        try:
            await validate(peer, msg)
        except ValidationError as exc:
            return "refused: " + str(exc).split(" ")[0]
        return "valid"

    try:
        stock = functools.partial(Pubsub.validate_msg, pubsub)
        ours = pubsub.validate_msg
        trio.lowlevel.add_instrument(spawns)
        try:
            results = {}
            for name, validate in (("stock", stock), ("ours", ours)):
                before = spawns.count
                results[name] = [await verdict(validate, d) for d in (b"good", b"bad")]
                results[name + " spawns"] = [spawns.count - before]
                results[name] += [await verdict(validate, d) for d in (b"boom", b"slow")]
        finally:
            trio.lowlevel.remove_instrument(spawns)
        assert results["stock"][0] == results["ours"][0] == "valid"
        assert all(r.startswith("refused") for r in results["stock"][1:] + results["ours"][1:])
        assert results["stock spawns"] == [2] and results["ours spawns"] == [0]
        # A refusal is cached: the same message again is refused without asking the validator.
        msg = rpc_pb2.Message(data=b"bad", topicIDs=[TOPIC])
        with pytest.raises(ValidationError):
            await ours(peer, msg)
        verdicts[b"bad"] = True
        with pytest.raises(ValidationError, match="cached"):
            await ours(peer, msg)
    finally:
        pubsub.seen_messages.stop()
