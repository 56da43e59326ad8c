"""The node's wiring modules in process (issue #13): sync scheduling (node/sync_schedule.py),
gossip wiring (node/gossip.py), discovery (node/discovery.py), the summary line
(node/summary.py) and the status the wiring reports (node/app.py), each against ``FakeNet``, an
in-memory stand-in for the ``node.network.Network`` interface.

Two services over stores in ``tmp_path`` sync over trio in-memory stream pairs; timers run on
trio's autojump clock, so "4 s later" takes no real time; waits are on the services' events.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from crdtbook import op_id
from crdtbook.node.app import NodeConfig, _Node
from crdtbook.node.discovery import Discovery, rendezvous_key
from crdtbook.node.gossip import Gossip
from crdtbook.node.network import Network
from crdtbook.node.service import BAN_SECONDS, BAN_THRESHOLD, MarketState
from crdtbook.node.store import StoreWriteError
from crdtbook.node.summary import summary_line
from crdtbook.node.sync_schedule import NOT_FOLLOWING_BACKOFF, SyncScheduler
from crdtbook.node.wire import SYNC_PROTOCOL, SyncResponse, encode_batch, encode_response

from .test_hostile_inputs import BOB, MALLORY, V1, Node, order
from .test_service_inprocess import bare, chain
from .test_sync_inprocess import Frames

pytestmark = pytest.mark.timeout(20)

Handler = Callable[[Any], Awaitable[None]]


class FakeNet:
    """``Network`` in memory: linked FakeNets are each other's connected peers; a stream is a
    trio memory stream pair whose far end goes to the peer's handler (run in ``nursery``)."""

    def __init__(self, peer_id: str, nursery: trio.Nursery) -> None:
        self.peer_id = peer_id
        self.nursery = nursery
        self.peers: dict[str, FakeNet] = {}
        self.handlers: dict[str, Handler] = {}
        self.validators: dict[str, Callable[[bytes, str], Awaitable[bool]]] = {}
        self.subscribed: list[str] = []
        self.published: list[tuple[str, bytes]] = []
        self.opened: list[tuple[float, str]] = []
        self.rejects: list[tuple[str, str]] = []
        self.bans: list[tuple[str, float]] = []
        self.dialed: list[str] = []
        self.provided: list[str] = []
        self.providers: list[tuple[str, list[str]]] = []
        self.reject_hook: Callable[[str, str], None] | None = None
        self.events_in, self.events = trio.open_memory_channel[Any](16)

    # identity and peers
    def addrs(self) -> list[str]:
        return [f"/ip4/127.0.0.1/tcp/1/p2p/{self.peer_id}"]

    def connected_peers(self) -> list[str]:
        return list(self.peers)

    def peer_addrs(self, peer_id: str) -> list[str]:
        return self.peers[peer_id].addrs()

    def peer_events(self) -> trio.MemoryReceiveChannel[Any]:
        return self.events

    async def connect(self, multiaddr: str) -> str:
        self.dialed.append(multiaddr)
        return multiaddr.rsplit("/p2p/", 1)[-1]

    def stats(self) -> dict[str, int]:
        return {"rejected": len(self.rejects), "banned": len(self.bans)}

    # policy
    def on_reject(self, hook: Callable[[str, str], None] | None) -> None:
        self.reject_hook = hook

    def report_reject(self, peer_id: str, reason: str) -> None:
        self.rejects.append((peer_id, reason))
        if self.reject_hook is not None:
            self.reject_hook(peer_id, reason)

    def ban(self, peer_id: str, seconds: float) -> None:
        self.bans.append((peer_id, seconds))

    # gossip
    def set_validator(self, topic: str, fn: Callable[[bytes, str], Awaitable[bool]]) -> None:
        self.validators[topic] = fn

    async def subscribe(self, topic: str) -> trio.MemoryReceiveChannel[Any]:
        self.subscribed.append(topic)
        return trio.open_memory_channel[Any](1)[1]

    async def join(self, topic: str) -> None:
        self.subscribed.append(topic)

    async def publish(self, topic: str, data: bytes) -> None:
        self.published.append((topic, data))

    def gossip_peers(self, topic: str) -> list[str]:
        return list(self.peers)

    # streams
    def set_stream_handler(self, protocol_id: str, handler: Handler) -> None:
        self.handlers[protocol_id] = handler

    async def open_stream(self, peer_id: str, protocol_id: str) -> Frames:
        self.opened.append((trio.current_time(), peer_id))
        left, right = trio.testing.memory_stream_pair()
        ours, theirs = Frames(left), Frames(right)
        ours.peer_id, theirs.peer_id = peer_id, self.peer_id  # type: ignore[attr-defined]
        self.nursery.start_soon(self.peers[peer_id].handlers[protocol_id], theirs)
        return ours

    # discovery
    async def provide(self, key: str) -> bool:
        self.provided.append(key)
        return True

    async def find_providers(self, key: str) -> list[tuple[str, list[str]]]:
        return self.providers


def _typed(net: FakeNet) -> Network:
    """FakeNet is a Network (checked here, where mypy would check a caller)."""
    return net


def _dir(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).mkdir(exist_ok=True)
    return tmp_path / name


def link(a: FakeNet, b: FakeNet) -> None:
    a.peers[b.peer_id] = b
    b.peers[a.peer_id] = a


@asynccontextmanager
async def two_nodes(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, FakeNet, FakeNet]]:
    """Services ``a`` (empty) and ``b``, on linked FakeNets; ``b`` serves sync."""
    async with (
        bare(_dir(tmp_path, "a")) as a,
        bare(_dir(tmp_path, "b")) as b,
        trio.open_nursery() as nursery,
    ):
        net_a, net_b = FakeNet("A", nursery), FakeNet("B", nursery)
        link(net_a, net_b)
        SyncScheduler(b.service, net_b).install()
        yield a, b, net_a, net_b
        nursery.cancel_scope.cancel()


async def _until_holds(ms: MarketState, count: int) -> None:
    while len(ms.replica) < count:
        await ms.changed.wait()


# -- sync scheduling -----------------------------------------------------------------------------


async def test_a_connected_peer_is_synced_at_once_not_at_the_next_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with two_nodes(tmp_path) as (a, b, net_a, _):
        await b.sync(V1, [op.raw for op in chain(BOB, 5)])
        scheduler = SyncScheduler(a.service, net_a, interval=4.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scheduler.run)
            started = trio.current_time()
            await net_a.events_in.send(SimpleNamespace(kind="connected", peer_id="B"))
            with trio.fail_after(1.0):  # well inside the 3.2-4.8 s of a scheduled round
                await _until_holds(a.ms(V1), 5)
            assert a.ms(V1).replica.digest() == b.ms(V1).replica.digest()
            assert [t - started < 1.0 for t, _ in net_a.opened] == [True]
            # Nothing left to get: the next sessions come on the schedule, not back to back.
            await trio.sleep(4.0 * 1.2 * 3)
            assert a.ms(V1).last_sync is not None
            assert 3 <= len(net_a.opened) <= 5
            assert not scheduler.syncing and scheduler.serving == 0
            # The totals status reports: every session counted once, the ops only the first
            # brought.
            assert scheduler.pulled_total == len(net_a.opened)
            assert scheduler.ops_pulled_total == 5 and scheduler.served_total == 0
            nursery.cancel_scope.cancel()


async def test_an_op_gossip_missed_arrives_on_the_next_scheduled_round(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with two_nodes(tmp_path) as (a, b, net_a, _):
        scheduler = SyncScheduler(a.service, net_a, interval=4.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scheduler.run)
            await trio.sleep(10)
            late = chain(BOB, 3)
            await b.sync(V1, [op.raw for op in late])  # b learns them; gossip never told a
            before = trio.current_time()
            with trio.fail_after(4.0 * 1.2 + 1):
                await _until_holds(a.ms(V1), 3)
            assert trio.current_time() - before <= 4.0 * 1.2 + 0.5
            nursery.cancel_scope.cancel()


async def test_a_peer_that_does_not_follow_the_market_is_left_alone_for_the_backoff(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with bare(_dir(tmp_path, "a")) as a, trio.open_nursery() as nursery:
        net_a, net_b = FakeNet("A", nursery), FakeNet("B", nursery)
        link(net_a, net_b)
        SyncScheduler(SimpleNamespace(markets={}), net_b).install()  # type: ignore[arg-type]
        scheduler = SyncScheduler(a.service, net_a, interval=4.0)
        nursery.start_soon(scheduler.run)
        await trio.sleep(NOT_FOLLOWING_BACKOFF - 10)
        assert len(net_a.opened) == 1, "asked again inside the back-off"
        await trio.sleep(20)
        assert len(net_a.opened) == 2, "not asked again once the back-off ended"
        scheduler.ask_soon("B")  # a reconnect: asked at once, back-off or not
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.01)
        assert len(net_a.opened) == 3
        assert not net_a.rejects  # not following is no offence
        nursery.cancel_scope.cancel()


async def test_invalid_ops_in_a_sync_frame_count_against_the_peer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    good = order(BOB, V1)
    forged = bytearray(order(MALLORY, V1, price=7).raw)
    forged[-1] ^= 1

    async def lying(stream: Any) -> None:
        await stream.read_frame(1 << 22)
        await stream.write_frame(
            encode_response(SyncResponse([good.raw, bytes(forged)], [], False))
        )

    async with bare(_dir(tmp_path, "a")) as a, trio.open_nursery() as nursery:
        net_a, net_b = FakeNet("A", nursery), FakeNet("B", nursery)
        link(net_a, net_b)
        net_b.set_stream_handler(SYNC_PROTOCOL, lying)
        scheduler = SyncScheduler(a.service, net_a)
        scheduler.syncing.add(("B", V1.id))
        await scheduler.sync_one("B", a.ms(V1))
        assert net_a.rejects == [("B", "sync-invalid")]
        assert a.ms(V1).replica.knows(good.id)
        assert a.ms(V1).replica.is_invalid(op_id(bytes(forged)))
        assert not scheduler.syncing
        nursery.cancel_scope.cancel()


async def test_a_store_that_fills_up_mid_session_is_no_bug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store refusing writes during a session (the disk filled up after it began) ends the
    session quietly: the service has said so once; an ERROR with a traceback per session would
    bury that line (test_disk.py's disk-full test saw it under load)."""
    caplog.set_level("DEBUG", logger="crdtbook.node")
    async with two_nodes(tmp_path) as (a, b, net_a, _):
        await b.sync(V1, [op.raw for op in chain(BOB, 3)])

        async def full(*args: Any) -> Any:
            raise StoreWriteError("the op store is full", "full")

        a.service.commit = full  # type: ignore[method-assign]
        scheduler = SyncScheduler(a.service, net_a)
        await scheduler.sync_one("B", a.ms(V1))
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert "not stored now" in caplog.text and not net_a.rejects


async def test_no_sync_while_the_store_refuses_writes(tmp_path: Path) -> None:
    async with two_nodes(tmp_path) as (a, _, net_a, _):
        a.service.store_writable = lambda: False  # type: ignore[method-assign]
        scheduler = SyncScheduler(a.service, net_a)
        await scheduler.sync_one("B", a.ms(V1))
        assert net_a.opened == []


# -- gossip wiring -------------------------------------------------------------------------------


async def test_gossip_joins_every_topic_and_ingests_through_the_validator(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with bare(tmp_path) as n, trio.open_nursery() as nursery:
        net = FakeNet("A", nursery)
        gossip = Gossip(n.service, net)
        await nursery.start(gossip.run)  # started: every topic joined
        ms = n.ms(V1)
        assert net.subscribed == [ms.topic] and set(net.validators) == {ms.topic}
        ops = chain(BOB, 2)
        assert await net.validators[ms.topic](encode_batch([o.raw for o in ops]), "B") is True
        assert [o.id for o in ms.apply_queue] == [o.id for o in ops]
        assert await net.validators[ms.topic](b"\xff junk", "M") is False
        nursery.cancel_scope.cancel()


async def test_a_peer_refused_too_often_is_banned(tmp_path: Path) -> None:
    async with bare(tmp_path) as n, trio.open_nursery() as nursery:
        net = FakeNet("A", nursery)
        await nursery.start(Gossip(n.service, net).run)
        for _ in range(BAN_THRESHOLD):
            net.report_reject("M", "gossip-invalid")
        assert net.bans == [("M", BAN_SECONDS)]
        nursery.cancel_scope.cancel()


async def test_flush_all_sends_what_the_outboxes_hold(tmp_path: Path) -> None:
    async with bare(tmp_path) as n, trio.open_nursery() as nursery:
        net = FakeNet("A", nursery)
        ms = n.ms(V1)
        ms.outbox = [o.raw for o in chain(BOB, 3)]
        await Gossip(n.service, net).flush_all()
        assert [topic for topic, _ in net.published] == [ms.topic] and not ms.outbox
        nursery.cancel_scope.cancel()


# -- discovery -----------------------------------------------------------------------------------


def _net_with_providers(nursery: trio.Nursery) -> FakeNet:
    """Node A, connected to C, whose DHT lists A itself, C and a new provider P (two addresses)."""
    net = FakeNet("A", nursery)
    link(net, FakeNet("C", nursery))
    net.providers = [
        ("A", ["/ip4/10.0.0.1/tcp/1"]),  # ourselves
        ("C", ["/ip4/10.0.0.3/tcp/1"]),  # connected already
        ("P", ["/ip4/10.0.0.2/tcp/1", "/ip4/10.0.0.2/tcp/2"]),
    ]
    return net


async def test_discovery_announces_and_dials_new_providers_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        net = _net_with_providers(nursery)
        discovery = Discovery(net, [V1.id], ["/ip4/10.0.0.9/tcp/1/p2p/B"], announce_interval=60)
        nursery.start_soon(discovery.run)
        await trio.testing.wait_all_tasks_blocked()
        assert net.provided == [rendezvous_key(V1.id)]
        # The bootstrap address as given, then the first address of the new provider with its
        # peer id appended (the dial succeeded, so not its second one).
        assert net.dialed == ["/ip4/10.0.0.9/tcp/1/p2p/B", "/ip4/10.0.0.2/tcp/1/p2p/P"]
        await trio.sleep(120)  # rounds settle at 10 s; announcements at 60 s
        assert 2 <= len(net.provided) <= 8
        nursery.cancel_scope.cancel()


async def test_a_search_counts_the_providers_it_connected_to(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """What paces the searches (node/discovery.py): new providers reached, not ourselves nor
    peers connected already."""
    async with trio.open_nursery() as nursery:
        net = _net_with_providers(nursery)
        discovery = Discovery(net, [V1.id], [])
        assert await discovery._dial_providers() == 1
        net.providers = net.providers[:2]
        assert await discovery._dial_providers() == 0
        nursery.cancel_scope.cancel()


# -- summary line and status ---------------------------------------------------------------------


async def test_the_summary_line_names_peers_and_each_market(tmp_path: Path) -> None:
    async with bare(tmp_path) as n:
        await n.sync(V1, [o.raw for o in chain(BOB, 2)])
        line = summary_line(n.service, peers=3, now=0.0)
        ms = n.ms(V1)
        assert line.endswith(
            f"peers=3 {V1.name} ops=2 pending=0 fills=0 digest={ms.digest().hex()[:12]}"
        )


async def test_status_reports_peers_and_sync_sessions(tmp_path: Path) -> None:
    async with two_nodes(tmp_path) as (a, _, net_a, _):
        node = _Node(NodeConfig(home=tmp_path), a.service, _typed(net_a))
        status = node.status()
        assert status["peer_id"] == "A"
        assert [p["peer_id"] for p in status["peers"]] == ["B"]
        assert status["sync_sessions"] == {
            "serving": 0,
            "pulling": 0,
            "served": 0,
            "pulled": 0,
            "ops_pulled": 0,
            "refused_busy": 0,
        }
        # Its headroom is not registered as an instrument here: no window judged yet.
        assert status["loop"] == {"busy": None, "early_publish": True}
        assert node.block(None, 5) == ["B"] and net_a.bans == [("B", 5)]


async def test_the_node_starts_every_service_answers_and_stops_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """_Node.run in process: topics joined, sync served, the control socket answering, the
    "ready" lines; then, on stop, the outboxes flushed and every task ended."""
    from crdtbook.node.client import ControlClient

    async with bare(_dir(tmp_path, "a")) as a, trio.open_nursery() as nursery:
        home = tmp_path / "node-home"  # the control socket's (the store is bare's)
        home.mkdir(mode=0o700)
        net = FakeNet("A", nursery)
        link(net, FakeNet("B", nursery))
        node = _Node(NodeConfig(home=home), a.service, _typed(net))
        stop, stopped = trio.Event(), trio.Event()

        async def run() -> None:
            await node.run(home, False, {V1.name: 0}, 0.0, stop.wait)
            stopped.set()

        nursery.start_soon(run)
        with trio.fail_after(10):
            while "ready" not in capsys.readouterr().out:
                await trio.sleep(0.01)  # stdout has no event to wait on
        ms = a.ms(V1)
        assert net.subscribed == [ms.topic] and SYNC_PROTOCOL in net.handlers

        def status() -> Any:
            with ControlClient(home, timeout=10) as client:
                return client.call("status", digest=False)

        answer = await trio.to_thread.run_sync(status)
        assert answer["peer_id"] == "A" and [p["peer_id"] for p in answer["peers"]] == ["B"]
        ms.outbox.append(order(BOB, V1).raw)  # queued, its flush not yet due
        stop.set()
        with trio.fail_after(10):
            await stopped.wait()
        assert "shutting down" in capsys.readouterr().out
        assert [topic for topic, _ in net.published] == [ms.topic] and not ms.outbox
        assert a.service.closing
        nursery.cancel_scope.cancel()
