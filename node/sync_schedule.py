"""When the node syncs, and with whom: the scheduler around the sync protocol (``node.sync``).

Gossip is best effort; sync is what guarantees every op reaches every peer. This module decides
when a session runs and what its outcome means; ``node.sync`` runs one session over a stream.

- Pulling: every ``SYNC_INTERVAL`` (jittered) ``SYNC_PEERS_PER_ROUND`` connected peers, drawn at
  random, are asked, per market, for what we lack; a peer is asked at once when it connects,
  and again at once after a session with it that made progress but left ops missing, and
  ``UNKNOWN_HEADS_RECHECK`` after one that named heads we do not know, if we still do not. Such
  a round between the scheduled ones asks those peers only. At most one session per
  (peer, market) at a time; a peer that said it does not follow a market is not asked about it
  for ``NOT_FOLLOWING_BACKOFF``.
- Serving: each inbound sync stream is answered by ``node.sync.respond``.
- Joins: a market joining from a snapshot (``MarketState.joining``, node.join) is not pulled
  until the join is done (else the whole log would stream in meanwhile); then every connected
  peer is asked at once (``ask_all``).
- Accountability: malformed frames and invalid ops count against the peer that sent them, as an
  invalid gossip message does (``Network.report_reject``).

Failures a peer or the network can cause are logged quietly (INFO/DEBUG); anything else is a
bug of ours, logged at ERROR with its traceback. None escapes: a task that raised would stop the
node.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Final

import trio

from crdtbook import Replica

from .network import FrameStreamLike, Network
from .service import IngestResult, MarketState, NodeService, Prepared
from .store import StoreWriteError
from .sync import FRAME_TIMEOUT, MarketNotFollowed, pull, respond
from .wire import SYNC_PROTOCOL, WireError

__all__ = [
    "FIRST_PULL_ALONE",
    "MAX_SYNC_SERVING",
    "NOT_FOLLOWING_BACKOFF",
    "SYNC_INTERVAL",
    "SYNC_PEERS_PER_ROUND",
    "SYNC_SESSION_TIMEOUT",
    "UNKNOWN_HEADS_RECHECK",
    "SyncScheduler",
]

logger = logging.getLogger("crdtbook.node")

#: Every this many seconds a few connected peers are asked for what we lack (plus a peer on
#: connect, and UNKNOWN_HEADS_RECHECK after a sync that named heads we still lack). Gossip
#: delivers nearly everything; this bounds
#: how long an op whose gossip was dropped takes. Measured, 5 nodes at 500 ops/s: going from 2 s
#: to 5 s cut node CPU per op by 9% (3.07 -> 2.80 ms, two runs each) and p99 from 254 to 214 ms;
#: 4 s keeps most of that saving with a shorter worst case for a dropped op.
SYNC_INTERVAL: Final = 4.0
#: Each wait is the interval times a factor drawn from this range, so that nodes started
#: together do not all sync at the same instant.
SYNC_JITTER: Final = (0.8, 1.2)
#: Each scheduled round pulls from this many connected peers, drawn at random, besides those
#: asked for (a new peer, one that named heads we still lack); a round started early for those
#: asks them only. Pulling from every peer made the sync's cost
#: per node grow with the network: in a 20-node network, 19 sessions pulled and 19 served per
#: round were a third of an idle node's CPU (py-spy, issue #12). Gossip delivers nearly every op;
#: an op it dropped is held by every other peer soon after, so any few of them bring it.
SYNC_PEERS_PER_ROUND: Final = 3
#: After a session whose peer named heads we do not know, wait this long and ask that peer
#: again only if some are still unknown. Under load those heads are ops gossip is still
#: bringing (tens of ms away): asking at once pulled them twice and chained sessions back to
#: back, each early round drawing SYNC_PEERS_PER_ROUND more peers (5 nodes at 2,000-2,500
#: ops/s: 1.7-2.8 sessions pulled per node per second against 0.75 scheduled, sync ~6% of node
#: CPU; 0.9 with this, bench/README.md #12 session 9).
UNKNOWN_HEADS_RECHECK: Final = 1.0
#: A whole sync session (a large catch-up streams many frames; each frame has its own bound).
SYNC_SESSION_TIMEOUT: Final = 120.0
#: Sync sessions served at once. Each walks the log on the event loop and, for a peer that
#: asks for everything, sends the whole log: the 255 streams Yamux allows a connection would
#: otherwise let one peer hold that many. Past the bound a new session's stream is reset; the
#: peer asks again in a later round. An honest peer pulls one session per market at a time
#: (``syncing``), so the bound per peer is the markets followed here, plus one (a session of a
#: connection being torn down may still run while the peer's new one starts).
MAX_SYNC_SERVING: Final = 32
#: After a peer says it does not follow a market, do not ask it again for this long.
NOT_FOLLOWING_BACKOFF: Final = 60.0
#: Until a market's first pull since the start has completed (a node that joined, restarted or
#: was cut off lacks everything its peers have since), pull it from one peer at a time, for up
#: to this long: the first session brings the log, the next ones only what it missed. Pulling
#: from every peer at once, a node joining a 43,100-op log took 197,400 ops over 4 peers (35 s).
#: Past this a slow first peer no longer holds the others back.
FIRST_PULL_ALONE: Final = 10.0


class SyncScheduler:
    """Pulls from a few connected peers on a schedule (and from peers asked for) and serves the
    peers' pulls.

    Run :meth:`run` in the node's nursery (it starts the schedule and follows peer events) and
    register :meth:`serve` as the network's handler for ``SYNC_PROTOCOL`` (:meth:`install`).
    """

    def __init__(
        self,
        service: NodeService,
        net: Network,
        *,
        interval: float = SYNC_INTERVAL,
        frame_timeout: float = FRAME_TIMEOUT,
        session_timeout: float = SYNC_SESSION_TIMEOUT,
    ) -> None:
        self.service = service
        self.net = net
        self.interval = interval
        self.frame_timeout = frame_timeout
        self.session_timeout = session_timeout
        #: (peer, market id) pairs being pulled now.
        self.syncing: set[tuple[str, bytes]] = set()
        #: Sync sessions being served now, in all and per peer; and the sessions refused for
        #: being past those bounds (MAX_SYNC_SERVING), since the start.
        self.serving = 0
        self._serving_peer: dict[str, int] = {}
        self.refused_busy_total = 0
        #: Totals since the start (status ``sync_sessions``): sessions this node pulled and
        #: served, and the ops its pulls brought (ops gossip had not delivered first).
        self.pulled_total = 0
        self.served_total = 0
        self.ops_pulled_total = 0
        self._not_following: dict[tuple[str, bytes], float] = {}
        #: Set to run the next round at once; replaced after each round.
        self.sync_now = trio.Event()
        #: Peers to ask next round even inside their not-following back-off.
        self._urgent: set[str] = set()
        #: Peers to ask next round, back-off kept (a session with them asks for another).
        self._again: set[str] = set()
        #: (peer, market) -> heads that peer named in its last answer and we did not get.
        self._wanted: dict[tuple[str, bytes], list[bytes]] = {}
        #: (peer, market) -> the unknown heads its last recheck was for: the same ones again
        #: are left to the schedule (a head nobody can give us must not re-ask every second).
        self._rechecked: dict[tuple[str, bytes], frozenset[bytes]] = {}
        #: Market id -> when its first pull (none completed yet) started; and the peers that
        #: round would have asked too, asked once it ends (FIRST_PULL_ALONE).
        self._first_pull: dict[bytes, float] = {}
        self._after_first: dict[bytes, set[str]] = {}

    def install(self) -> None:
        """Serve the peers' sync sessions (before the node says it is ready)."""
        self.net.set_stream_handler(SYNC_PROTOCOL, self.serve)

    async def run(self) -> None:
        """The schedule and the peer events that trigger it (runs until cancelled)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._peer_events)
            nursery.start_soon(self._loop)

    def ask_all(self) -> None:
        """Pull from every connected peer in the next round, and run it now (a join ended)."""
        self._urgent.update(self.net.connected_peers())
        self.sync_now.set()

    def ask_soon(self, peer: str) -> None:
        """Pull from ``peer`` in the next round, and run that round now."""
        self._urgent.add(peer)
        self.sync_now.set()

    def _ask_again(self, peer: str) -> None:
        """As ``ask_soon``, but the markets ``peer`` said it does not follow stay in their
        back-off: a session about one market must not re-ask it about the others each time."""
        self._again.add(peer)
        self.sync_now.set()

    # -- serving -----------------------------------------------------------------------------

    async def serve(self, stream: FrameStreamLike) -> None:
        """Answer one peer's session (the network's handler for ``SYNC_PROTOCOL``), within
        the bounds on sessions served at once (MAX_SYNC_SERVING)."""
        peer = stream.peer_id
        mine = self._serving_peer.get(peer, 0)
        if self.serving >= MAX_SYNC_SERVING or mine > len(self.service.markets):
            self.refused_busy_total += 1
            logger.debug("sync: %s has %d sessions served here: one more refused", peer, mine)
            await self._reset_quietly(stream)
            return
        self.serving += 1
        self.served_total += 1
        self._serving_peer[peer] = mine + 1
        try:
            await self._serve(stream)
        finally:
            self.serving -= 1
            left = self._serving_peer.pop(peer) - 1
            if left:
                self._serving_peer[peer] = left

    async def _serve(self, stream: FrameStreamLike) -> None:
        from .p2p import P2PError

        def replica_for(market_id: bytes) -> Replica | None:
            ms = self.service.markets.get(market_id)
            return None if ms is None else ms.replica

        try:
            # Bounded as a pulling session is: a peer that reads just fast enough to beat the
            # frame timeout would otherwise hold this session as long as it likes.
            with trio.move_on_after(self.session_timeout) as session:
                sent, _ = await respond(stream, replica_for, frame_timeout=self.frame_timeout)
                if sent:
                    logger.debug("sync: sent %d ops", sent)
            if session.cancelled_caught:
                logger.info(
                    "sync: serving %s took over %.0f s: session reset",
                    stream.peer_id,
                    self.session_timeout,
                )
                await self._reset_quietly(stream)
        except WireError as exc:
            logger.info("sync: malformed request from %s: %s", stream.peer_id, exc)
            self.net.report_reject(stream.peer_id, "sync-malformed")  # as gossip counts it
            await self._reset_quietly(stream)
        except P2PError as exc:  # the peer went away, reset the stream or stalled
            logger.debug("sync: serving %s failed: %r", stream.peer_id, exc)
            await self._reset_quietly(stream)
        except Exception:  # a bug, not the peer: report it, keep serving others
            logger.exception("sync: serving %s failed", stream.peer_id)
            await self._reset_quietly(stream)

    async def _reset_quietly(self, stream: FrameStreamLike) -> None:
        """After a failed session the framing is undefined: reset (not half-close) the stream,
        so its record leaves the connection now; bounded and shielded, as in ``sync_one``
        (FrameStream.reset never raises)."""
        with trio.CancelScope(deadline=trio.current_time() + self.frame_timeout, shield=True):
            await stream.reset()

    # -- pulling -----------------------------------------------------------------------------

    async def _peer_events(self) -> None:
        events = self.net.peer_events()
        async with events:
            async for event in events:
                if event.kind == "connected":
                    logger.info("peer connected: %s", event.peer_id)
                    self.ask_soon(event.peer_id)
                else:
                    logger.info("peer disconnected: %s", event.peer_id)

    async def _loop(self) -> None:
        async with trio.open_nursery() as nursery:
            scheduled = trio.current_time() + self.interval * random.uniform(*SYNC_JITTER)
            while True:
                with trio.move_on_at(scheduled):
                    await self.sync_now.wait()
                self.sync_now = trio.Event()
                urgent, self._urgent = self._urgent, set()
                again, self._again = self._again - urgent, set()
                now = trio.current_time()
                connected = self.net.connected_peers()
                drawn: list[str] = []
                if now >= scheduled:
                    # The scheduled round; one started early (ask_soon, _ask_again) asks its
                    # peers only, and does not put the next scheduled one off.
                    scheduled = now + self.interval * random.uniform(*SYNC_JITTER)
                    others = [p for p in connected if p not in urgent and p not in again]
                    drawn = random.sample(others, min(SYNC_PEERS_PER_ROUND, len(others)))
                asked = [p for p in connected if p in urgent or p in again]
                for peer in asked + drawn:
                    for ms in self.service.markets.values():
                        key = (peer, ms.market.id)
                        # A join (node.join) first. (getattr: stand-ins for a market's state,
                        # as tests/node/test_p2p_scale.py's, need not know joins.)
                        if key in self.syncing or getattr(ms, "joining", False):
                            continue
                        if self._not_following.get(key, 0) > now and peer not in urgent:
                            continue
                        if self._wait_for_first_pull(peer, ms, now):
                            continue
                        self.syncing.add(key)
                        nursery.start_soon(self._pull, peer, ms)

    def _wait_for_first_pull(self, peer: str, ms: MarketState, now: float) -> bool:
        """Whether ``peer`` must wait for the market's first pull (then it is asked when that
        ends); marks the start of a first pull otherwise. (getattr: stand-ins for a market's
        state in tests/node/test_p2p_scale.py count as synced.)"""
        if getattr(ms, "last_sync", 0.0) is not None:
            return False
        market_id = ms.market.id
        started = self._first_pull.get(market_id)
        if started is not None and now - started < FIRST_PULL_ALONE:
            self._after_first.setdefault(market_id, set()).add(peer)
            return True
        self._first_pull[market_id] = now
        return False

    async def _pull(self, peer: str, ms: MarketState) -> None:
        try:
            await self.sync_one(peer, ms)
        finally:
            market_id = ms.market.id
            self._first_pull.pop(market_id, None)
            for waiting in self._after_first.pop(market_id, ()):
                self._ask_again(waiting)

    async def sync_one(self, peer: str, ms: MarketState) -> None:
        """Pull one market from one peer (one session). Never raises; the caller marked
        ``(peer, market id)`` in ``syncing`` and this clears it at the session's end. After a
        session that named heads we lack, the task sleeps UNKNOWN_HEADS_RECHECK more (holding
        nothing) before it asks the peer again, if they are still unknown."""
        from .p2p import P2PError

        key = (peer, ms.market.id)
        recheck: list[bytes] = []
        try:
            if not self.service.store_writable():  # nothing pulled now could be stored
                return
            ms.last_sync_try = trio.current_time()
            with trio.move_on_after(self.session_timeout) as session:
                stream = await self.net.open_stream(peer, SYNC_PROTOCOL)
                pulled = False
                try:
                    received, unknown_heads = await pull(
                        stream,
                        ms.replica,
                        lambda raws: self.service.prepare(ms, raws),
                        lambda prepared: self._commit_counted(ms, prepared, peer),
                        self._wanted.pop(key, ()),
                        frame_timeout=self.frame_timeout,
                    )
                    pulled = True
                finally:
                    # Shielded: once the session's deadline passed, an unshielded close is
                    # cancelled at once and the stream stays open (the peer's writes pile up in
                    # the muxer). After a failure the framing is undefined: reset.
                    bound = self.frame_timeout
                    with trio.CancelScope(deadline=trio.current_time() + bound, shield=True):
                        await (stream.close() if pulled else stream.reset())
                ms.last_sync = time.time()
                self.pulled_total += 1
                self.ops_pulled_total += received
                if received:
                    logger.info("sync: %d ops from %s for %s", received, peer, ms.market.name)
                if unknown_heads:
                    self._wanted[key] = unknown_heads
                    heads = frozenset(unknown_heads)
                    if self._rechecked.get(key) != heads:
                        self._rechecked[key] = heads
                        recheck = unknown_heads
                else:
                    self._rechecked.pop(key, None)
                # Ask again at once only when this session made progress (a Bloom false
                # positive or a race), not for parents this peer lacks too: orphans whose
                # parents never arrive would otherwise re-sync back to back for ever.
                if received and ms.replica.missing():
                    self._ask_again(peer)
            if session.cancelled_caught:
                logger.info(
                    "sync with %s for %s stopped: over %.0f s",
                    peer,
                    ms.market.name,
                    self.session_timeout,
                )
        except StoreWriteError as exc:  # the disk filled up mid-session (the service says so)
            logger.debug("sync: %s's ops for %s not stored now: %s", peer, ms.market.name, exc)
        except MarketNotFollowed:
            self._not_following[key] = trio.current_time() + NOT_FOLLOWING_BACKOFF
        except WireError as exc:  # malformed frames
            logger.info("sync with %s failed: %s", peer, exc)
            self.net.report_reject(peer, "sync-malformed")
        except P2PError as exc:  # network errors, a peer going away or banned
            logger.debug("sync with %s failed: %r", peer, exc)
        except Exception:  # a bug or our store failing, not the peer: report it, go on
            logger.exception("sync with %s for %s failed", peer, ms.market.name)
        finally:
            self.syncing.discard(key)
        if recheck:
            await trio.sleep(UNKNOWN_HEADS_RECHECK)
            # Stored and waiting for the apply task counts as known: gossip brought it.
            queued = ms.queued
            if any(not ms.replica.knows(head) and head not in queued for head in recheck):
                self._ask_again(peer)

    async def _commit_counted(self, ms: MarketState, prepared: Prepared, peer: str) -> IngestResult:
        """Commit a sync frame's ops; invalid ones count against the peer that sent them, as
        an invalid op in a gossip message does."""
        result = await self.service.commit(ms, prepared, peer)
        if result.invalid:
            self.net.report_reject(peer, "sync-invalid")
        return result
