"""The bounds that keep a node's cost flat as the network grows (issue #12), in process: a sync
round pulls from a few peers, not all; a round started early asks only the peers it is for,
and heads a peer named are asked for again only if gossip has not brought them meanwhile; a
node with enough peers, or whose searches find nobody new, searches the DHT seldom."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from crdtbook.node import discovery as discovery_module
from crdtbook.node import sync_schedule
from crdtbook.node.discovery import (
    DISCOVERY_INTERVAL,
    ENOUGH_PEERS,
    SETTLED_SEARCH_INTERVAL,
    Discovery,
)
from crdtbook.node.sync_schedule import (
    SYNC_INTERVAL,
    SYNC_PEERS_PER_ROUND,
    UNKNOWN_HEADS_RECHECK,
    SyncScheduler,
)

PEERS = [f"peer-{i:02d}" for i in range(19)]  # a 20-node network, seen from one node


class Peers:
    """A network whose only state is who is connected (what the schedulers read)."""

    peer_id = "me"

    def __init__(self, peers: list[str]) -> None:
        self.peers = peers

    def connected_peers(self) -> list[str]:
        return list(self.peers)


async def test_a_sync_round_pulls_from_a_few_peers_and_an_early_one_from_its_own(
    autojump_clock: trio.abc.Clock,
) -> None:
    market = SimpleNamespace(market=SimpleNamespace(id=b"m" * 32, name="M"))
    service = SimpleNamespace(markets={b"m" * 32: market}, store_writable=lambda: True)
    scheduler = SyncScheduler(service, Peers(PEERS))  # type: ignore[arg-type]
    rounds: list[list[str]] = [[]]

    async def sync_one(peer: str, ms: object) -> None:
        rounds[-1].append(peer)
        scheduler.syncing.discard((peer, b"m" * 32))

    scheduler.sync_one = sync_one  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler._loop)
        scheduler.ask_soon("peer-07")  # e.g. it just connected
        await trio.testing.wait_all_tasks_blocked()
        rounds.append([])
        with trio.move_on_after(SYNC_INTERVAL * 1.3):  # one scheduled round (jittered)
            while not rounds[-1]:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    first, second = rounds
    # The early round (a peer connected) asks that peer; the scheduled one draws a few.
    assert first == ["peer-07"]
    assert len(set(second)) == len(second) == SYNC_PEERS_PER_ROUND


async def test_early_rounds_do_not_put_the_scheduled_one_off(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A peer asked for every half interval (as unknown heads under load would): each early
    round asks that peer only, and the scheduled rounds still come, each drawing a few. Before,
    every round drew a few, and restarting the timer at each early round would have left no
    scheduled round at all."""
    market = SimpleNamespace(market=SimpleNamespace(id=b"m" * 32, name="M"))
    service = SimpleNamespace(markets={b"m" * 32: market}, store_writable=lambda: True)
    scheduler = SyncScheduler(service, Peers(PEERS))  # type: ignore[arg-type]
    rounds: dict[float, list[str]] = {}

    async def sync_one(peer: str, ms: object) -> None:
        rounds.setdefault(trio.current_time(), []).append(peer)
        scheduler.syncing.discard((peer, b"m" * 32))

    scheduler.sync_one = sync_one  # type: ignore[method-assign]
    start = trio.current_time()
    early = [start + SYNC_INTERVAL / 2 * (i + 1) for i in range(8)]  # four intervals
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler._loop)
        for at in early:
            await trio.sleep_until(at)
            scheduler.ask_soon("peer-07")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    for at in early:
        assert rounds.pop(at) == ["peer-07"]
    assert len(rounds) >= 3  # scheduled rounds, 3.2-4.8 s apart, in 16 s
    assert all(len(peers) == SYNC_PEERS_PER_ROUND for peers in rounds.values())


class _Closing:
    async def close(self) -> None:
        pass

    async def reset(self) -> None:
        pass


def _scheduler_told_of(
    head: bytes, known: set[bytes], monkeypatch: pytest.MonkeyPatch
) -> tuple[SyncScheduler, SimpleNamespace]:
    """A scheduler with one peer, whose every session names ``head`` as a head we lack, and
    its market (``known``: the ids its replica knows)."""
    ms = SimpleNamespace(
        market=SimpleNamespace(id=b"m" * 32, name="M"),
        replica=SimpleNamespace(knows=known.__contains__, missing=list),
        queued=set(),
        last_sync=0.0,
    )
    service = SimpleNamespace(markets={b"m" * 32: ms}, store_writable=lambda: True)

    class Net(Peers):
        async def open_stream(self, peer: str, protocol: str) -> _Closing:
            return _Closing()

    async def pull(*args: object, **kwargs: object) -> tuple[int, list[bytes]]:
        return 0, [head]

    monkeypatch.setattr(sync_schedule, "pull", pull)
    return SyncScheduler(service, Net(["peer-01"])), ms  # type: ignore[arg-type]


async def _after_unknown_heads(arrives: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[bool, bool]:
    """One session whose peer names a head we lack; ``arrives``: gossip brings it meanwhile.
    Returns whether a round was asked for at once, and after UNKNOWN_HEADS_RECHECK."""
    head = b"h" * 32
    known: set[bytes] = set()
    scheduler, ms = _scheduler_told_of(head, known, monkeypatch)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.sync_one, "peer-01", ms)
        await trio.sleep(UNKNOWN_HEADS_RECHECK / 2)
        at_once = scheduler.sync_now.is_set()
        assert not scheduler.syncing  # the session's key is free while it waits
        if arrives:
            known.add(head)
        await trio.sleep(UNKNOWN_HEADS_RECHECK)
    return at_once, scheduler.sync_now.is_set()


async def test_unknown_heads_are_asked_for_again_only_if_gossip_did_not_bring_them(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await _after_unknown_heads(arrives=True, monkeypatch=monkeypatch) == (False, False)
    assert await _after_unknown_heads(arrives=False, monkeypatch=monkeypatch) == (False, True)


async def test_a_settled_node_searches_the_dht_seldom(autojump_clock: trio.abc.Clock) -> None:
    searches: list[float] = []
    net = Peers(PEERS[: ENOUGH_PEERS - 1])
    found = Discovery(net, [b"m" * 32], [])  # type: ignore[arg-type]

    async def dial_providers() -> int:
        searches.append(trio.current_time())
        return 1  # a new provider each time: the small network is still growing

    async def announce() -> bool:
        return True

    found._dial_providers = dial_providers  # type: ignore[method-assign]
    found._announce = announce  # type: ignore[method-assign]
    with trio.move_on_after(60):
        await found.run()  # few peers: a search every round (every DISCOVERY_INTERVAL, settled)
    unsettled = len(searches)
    net.peers = PEERS  # now connected to enough peers
    searches.clear()
    with trio.move_on_after(SETTLED_SEARCH_INTERVAL * 3):
        await found.run()
    assert unsettled >= 60 / discovery_module.DISCOVERY_INTERVAL
    assert len(searches) <= 4  # the run's first round, then one per SETTLED_SEARCH_INTERVAL


async def test_a_small_network_node_searches_less_while_it_finds_nobody_new(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Fewer than ENOUGH_PEERS: a search every round while the network forms and searches find
    newcomers; after a search that finds none, the wait doubles from DISCOVERY_INTERVAL up to
    SETTLED_SEARCH_INTERVAL. A search that finds a newcomer brings back the normal pace."""
    searches: list[float] = []
    net = Peers(PEERS[:4])  # a 5-node market
    found = Discovery(net, [b"m" * 32], [])  # type: ignore[arg-type]
    finds = {1, 2, 3, 10}  # these searches (1-based) connect to a newcomer

    async def dial_providers() -> int:
        searches.append(trio.current_time())
        return 1 if len(searches) in finds else 0

    async def announce() -> bool:
        return True

    found._dial_providers = dial_providers  # type: ignore[method-assign]
    found._announce = announce  # type: ignore[method-assign]
    with trio.move_on_after(900):
        await found.run()
    gaps = [b - a for a, b in itertools.pairwise(searches)]
    # Forming rounds 0.5 s apart, doubling, while searches find newcomers.
    assert gaps[:3] == [0.5, 1.0, 2.0]
    # Then quiet: the next search a round >= 10 s later, then >= 20, 40, 60, 60 s...
    quiet = gaps[3:8]
    assert quiet == sorted(quiet) and quiet[0] >= DISCOVERY_INTERVAL
    assert quiet[-1] == SETTLED_SEARCH_INTERVAL
    # After the 10th search found a newcomer: the normal pace, then backing off again.
    assert gaps[9:12] == [DISCOVERY_INTERVAL, DISCOVERY_INTERVAL * 2, DISCOVERY_INTERVAL * 4]
    assert len(searches) < 900 / DISCOVERY_INTERVAL / 4  # 10 s a search was the old pace


async def test_the_same_unknown_heads_are_rechecked_once(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A head the peer names and nobody can give us (it never arrives): the first session asks
    again after the recheck, the next one, naming the same head, leaves it to the schedule."""
    scheduler, ms = _scheduler_told_of(b"h" * 32, set(), monkeypatch)
    asked = []
    for _ in range(2):
        await scheduler.sync_one("peer-01", ms)  # type: ignore[arg-type]
        asked.append(scheduler.sync_now.is_set())
        scheduler.sync_now = trio.Event()
    assert asked == [True, False]


async def test_a_session_asking_again_keeps_the_back_off_a_reconnect_skips(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A peer that said it does not follow a market is not asked about it again because a
    session about another market asked for more; a reconnect (ask_soon) still asks it."""
    market = SimpleNamespace(market=SimpleNamespace(id=b"m" * 32, name="M"))
    service = SimpleNamespace(markets={b"m" * 32: market}, store_writable=lambda: True)
    scheduler = SyncScheduler(service, Peers(["peer-01"]))  # type: ignore[arg-type]
    scheduler._not_following[("peer-01", b"m" * 32)] = trio.current_time() + 60
    asked: list[str] = []

    async def sync_one(peer: str, ms: object) -> None:
        asked.append(peer)
        scheduler.syncing.discard((peer, b"m" * 32))

    scheduler.sync_one = sync_one  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler._loop)
        scheduler._ask_again("peer-01")
        await trio.testing.wait_all_tasks_blocked()
        assert asked == []
        scheduler.ask_soon("peer-01")
        await trio.testing.wait_all_tasks_blocked()
        assert asked == ["peer-01"]
        nursery.cancel_scope.cancel()


async def test_a_market_never_pulled_is_pulled_from_one_peer_first(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A node that joined or restarted asks every peer at once (ask_all, or each peer as it
    connects): each session pulled the whole log (197,400 ops over 4 peers for a 43,100-op
    log). Until the market's first pull completes, one peer at a time (for up to
    FIRST_PULL_ALONE); then the others, at once, for what it missed."""
    market = SimpleNamespace(market=SimpleNamespace(id=b"m" * 32, name="M"), last_sync=None)
    service = SimpleNamespace(markets={b"m" * 32: market}, store_writable=lambda: True)
    scheduler = SyncScheduler(service, Peers(PEERS[:4]))  # type: ignore[arg-type]
    started: dict[str, float] = {}

    async def sync_one(peer: str, ms: SimpleNamespace) -> None:
        started[peer] = trio.current_time()
        await trio.sleep(2.0)  # the whole log, from this peer
        ms.last_sync = trio.current_time()
        scheduler.syncing.discard((peer, b"m" * 32))

    scheduler.sync_one = sync_one  # type: ignore[method-assign]
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler._loop)
        scheduler.ask_all()
        with trio.move_on_after(SYNC_INTERVAL * 0.7):  # before the first scheduled round
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()
    assert len(started) == 4
    first = [p for p, at in started.items() if at == t0]
    assert len(first) == 1
    assert sorted(at - t0 for p, at in started.items() if p not in first) == [2.0] * 3
