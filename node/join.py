"""Joining a witnessed market from a snapshot, serving joiners, and fetching history on demand.

Protocol `/crdtbook/join/1.0.0` (frames: ``node.join_wire``; spec: specs/join.md).

**Joining** (a node whose store holds nothing of a witnessed market, with ``--join snapshot``,
the default): sync leaves the market alone meanwhile (``MarketState.joining``). The node

1. waits for peers (at most ``JOIN_PEER_WAIT``) and asks each connected one for an *offer*:
   its latest points ``(n, hash)`` with the heartbeats it holds that attest them, and the
   reconfigurations of the market's witness chain;
2. tries the offered points from the largest ``n`` down: fetches the snapshot (the point blob
   and its kept ops) from a peer that offered it, and accepts it only if its SHA-256 is the
   offered hash and a strict majority of the witnesses in force at the point attest it
   (``crdtbook.check_attested``, which also checks the reconfiguration chain from the market's
   own witnesses). The kept ops are authenticated by their ids, which the blob lists;
3. builds ``Replica.from_snapshot(..., history=False)``, records the join in the store and
   hands the market back to sync, which then fetches only the ops after the point (the request's
   heads and author sequence numbers tell the peer where the joiner stands).

A snapshot that is refused (damaged, forged, stale, foreign) counts against the peer that sent
it (``Network.report_reject``, the ban counters gossip and sync use) and the next candidate is
tried; an unattested point is not the sender's fault (its witnesses may not have heartbeated
yet) and costs it nothing. With no acceptable point the node falls back to the full log.

**History on demand**: a joined replica lacks the prefix's ops. When an op's verdict needs them
(``Replica.history_wanted``), the node fetches the prefix in total order from peers, in
sessions of at most ``MAX_HISTORY_SESSION_OPS``, checks it against the point's chain
(``crdtbook.HistoryCheck``: the chain is attested, so no signature needs checking), stores it
staged, and on success archives it and releases the waiting ops
(``Replica.history_complete``). A peer whose history fails the check is counted and the fetch
starts over with another. A node whose retention pruned its archive (node.retention) fetches
the prefix of its latest point the same way; so does a node whose ops have only been held as
possible copies of prefix ops for ``HELD_HISTORY_FETCH_AFTER`` (see ``Joiner.history_loop``).

**Serving**: offers from the replica's points, snapshots from the store's point blobs (the
latest two), history from the store's record of the prefix's final order.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final, Literal

import trio

from crdtbook import (
    HistoryCheck,
    InvalidOp,
    Market,
    SnapshotRefused,
    check_attested,
    decode,
)
from crdtbook import read_point as core_read_point

from .derive import derive_due, derive_joined_history, derive_locked
from .join_wire import (
    JOIN_PROTOCOL,
    MAX_HISTORY_SESSION_OPS,
    MAX_KEPT_OPS,
    MAX_OFFER_HEARTBEATS,
    MAX_OFFER_RECONFIGS,
    MAX_SNAPSHOT_BYTES,
    SNAPSHOT_CHUNK_BYTES,
    HistoryFrame,
    JoinRefusal,
    JoinRequest,
    Offer,
    SnapshotFrame,
    decode_history,
    decode_offer,
    decode_request,
    decode_snapshot,
    encode_history,
    encode_offer,
    encode_refusal,
    encode_request,
    encode_snapshot,
)
from .limits import MAX_BATCH_OPS, MAX_FRAME_BYTES
from .network import FrameStreamLike, Network
from .p2p_errors import P2PError
from .retention import history_point
from .service import MarketState, NodeService
from .sync import FRAME_TIMEOUT
from .wire import WireError

__all__ = [
    "HELD_HISTORY_FETCH_AFTER",
    "HISTORY_FIRST_FRAME_TIMEOUT",
    "HISTORY_RETRY",
    "HISTORY_RETRY_BEHIND",
    "JOIN_MODES",
    "JOIN_PEER_WAIT",
    "MAX_CANDIDATES",
    "MAX_SNAPSHOT_TRIES",
    "OFFER_TIMEOUT",
    "SNAPSHOT_TIMEOUT",
    "Joiner",
]

logger = logging.getLogger("crdtbook.node")

#: ``--join``: from a witnessed snapshot (the default), or the whole log (as before #10).
JOIN_MODES: Final = ("snapshot", "full")
#: A joining node waits this long for a peer that offers something before it falls back to the
#: full log (which then waits for peers as sync always does).
JOIN_PEER_WAIT: Final = 30.0
#: While waiting for peers, connected peers are looked at this often (start-up only).
JOIN_POLL: Final = 0.1
#: One offer session (one small frame each way).
OFFER_TIMEOUT: Final = 10.0
#: One snapshot session: a blob of some MB and a few thousand kept ops.
SNAPSHOT_TIMEOUT: Final = 60.0
#: One history session (MAX_HISTORY_SESSION_OPS ops, each frame bounded by the frame timeout).
HISTORY_SESSION_TIMEOUT: Final = 120.0
#: Distinct points a joiner tries, and snapshot fetches in all: a hostile peer offering made-up
#: points costs the joiner this many fetches at most before it falls back to the full log.
MAX_CANDIDATES: Final = 4
MAX_SNAPSHOT_TRIES: Final = 6
#: After a history fetch failed with every peer, none of them merely lagging (no connected
#: peer holds the prefix: pruned or joined peers, ``no_history``; or older nodes, which said
#: ``no_history`` when they lagged too), try again after this long, doubling up to
#: HISTORY_RETRY_MAX while it keeps failing. A try costs each peer one short refusal.
HISTORY_RETRY: Final = 5.0
HISTORY_RETRY_MAX: Final = 30.0
#: A history session's first frame, within this long (the peer reads a few hundred KB from its
#: store; others follow within the frame timeout). Seen: a fetch that tried a paused peer first
#: waited out the 20 s frame timeout while a reconfiguration waited for it.
HISTORY_FIRST_FRAME_TIMEOUT: Final = 5.0
#: After a fetch in which some peer answered ``not_yet`` (it holds the history but has not
#: compacted as far as the point asked for: it lags, and will get there), try again this soon,
#: without backing off. The case: a pruned node whose point is ahead of its peers' (it compacted
#: further while they lagged); while its own ops wait for the history it heartbeats nothing, so
#: finality may stall at every node. With the backoff alone, recoveries took 61 s and over 128 s
#: after a 25 s cut (session 14). A try costs each such peer one stream and one short refusal.
HISTORY_RETRY_BEHIND: Final = 2.0
#: Ops held only as possible copies of prefix ops (``Replica.history_held`` > 0 while
#: ``history_wanted`` is 0) for this long make the node fetch the history too (see
#: ``Joiner.history_loop``). Long enough that the copies sync and gossip bring now and then
#: (most are judged duplicates once the history is here) do not each cost a fetch of the whole
#: prefix; short enough that a fork nobody names yet is judged within a few heartbeats' time.
HELD_HISTORY_FETCH_AFTER: Final = 30.0
#: A market joined from a point fetches the history before it this long after the join (or a
#: restart), if no op needed it sooner: its fills and orders before the point are derived from
#: it (node.derive), and the node can serve it to joiners. Late enough that a join's catch-up
#: (sync of what came after the point) is done first.
HISTORY_BACKFILL_AFTER: Final = 30.0
#: A background fetch that found no peer serving the history (or only peers that lag) is
#: tried again after twice ``HISTORY_BACKFILL_AFTER`` (60 s), then twice as long each time, up
#: to this (every peer may have pruned it: asking each of them every few seconds would cost
#: them a stream each for nothing). Retries log at DEBUG.
HISTORY_BACKFILL_RETRY_MAX: Final = 600.0
#: Join sessions served at once, in all and per peer (a snapshot or history session reads MBs
#: from the store): past them a request's stream is reset and the joiner tries another peer.
MAX_SERVING: Final = 8
MAX_SERVING_PER_PEER: Final = 2
#: A whole served session (a history session's MAX_HISTORY_SESSION_OPS ops at bulk speed take
#: seconds; a joiner that reads slower than this is dropped).
SERVE_SESSION_TIMEOUT: Final = HISTORY_SESSION_TIMEOUT
#: Points offered: the latest two (a witness attests the newest only after it compacted there,
#: so just after a point the previous one is the attested one).
POINTS_OFFERED: Final = 2
#: Room under the frame bound for the CBOR envelope of a frame of ops.
_FRAME_BUDGET: Final = MAX_FRAME_BYTES - 64 * 1024


#: What a history fetch came to (``Joiner.fetch_history``).
HistoryOutcome = Literal["done", "behind", "failed"]


@dataclass
class _Candidate:
    point: int
    hash: bytes
    peers: list[str] = field(default_factory=list)


@dataclass
class _Fetched:
    blob: bytes
    ops: list[bytes]


class Joiner:
    """The join protocol of one node: serves peers (:meth:`serve`), joins the markets marked
    ``joining`` and fetches history when a joined replica wants it (:meth:`run`)."""

    def __init__(
        self,
        service: NodeService,
        net: Network,
        *,
        mode: str = "snapshot",
        frame_timeout: float = FRAME_TIMEOUT,
        peer_wait: float = JOIN_PEER_WAIT,
        on_joined: Callable[[MarketState], None] = lambda ms: None,
        backfill_after: float | None = HISTORY_BACKFILL_AFTER,
    ) -> None:
        if mode not in JOIN_MODES:
            raise ValueError(f"join mode must be one of {JOIN_MODES}, not {mode!r}")
        self.service = service
        self.net = net
        self.mode = mode
        self.frame_timeout = frame_timeout
        self.peer_wait = peer_wait
        #: Called once a joining market is handed back to sync (joined or fallen back).
        self.on_joined = on_joined
        #: A market joined from a point fetches its history this long after the node started
        #: (or joined), if nothing asked for it sooner; None: only when ops need it.
        self.backfill_after = backfill_after
        #: Join sessions being served now, in all and per peer.
        self.serving = 0
        self._serving_peer: dict[str, int] = {}

    def install(self) -> None:
        """Serve the peers' join sessions, and mark the markets to join from a snapshot (before
        sync runs): witnessed markets of which the store holds nothing."""
        self.net.set_stream_handler(JOIN_PROTOCOL, self.serve)
        if self.mode != "snapshot":
            return
        for ms in self.service.markets.values():
            if self.service.needs_join(ms):
                ms.joining = True

    async def run(self) -> None:
        """Join the marked markets, then fetch history whenever a joined replica wants it."""
        async with trio.open_nursery() as nursery:
            for ms in self.service.markets.values():
                if ms.joining:
                    nursery.start_soon(self.join, ms)
                if ms.market.witnessed:
                    nursery.start_soon(self.history_loop, ms)

    # -- serving -----------------------------------------------------------------------------

    async def serve(self, stream: FrameStreamLike) -> None:
        """Answer one peer's join session (the network's handler for ``JOIN_PROTOCOL``), within
        SERVE_SESSION_TIMEOUT and the bounds on sessions served at once."""
        peer = stream.peer_id
        if self.serving >= MAX_SERVING or self._serving_peer.get(peer, 0) >= MAX_SERVING_PER_PEER:
            await self._reset_quietly(stream)  # busy: the joiner tries another peer or later
            return
        self.serving += 1
        self._serving_peer[peer] = self._serving_peer.get(peer, 0) + 1
        try:
            with trio.fail_after(SERVE_SESSION_TIMEOUT):
                await self._serve(stream)
        except WireError as exc:
            logger.info("join: malformed request from %s: %s", peer, exc)
            self.net.report_reject(peer, "join-malformed")
            await self._reset_quietly(stream)
        except (P2PError, trio.TooSlowError) as exc:  # gone, reset, stalled or too slow
            logger.debug("join: serving %s failed: %r", peer, exc)
            await self._reset_quietly(stream)
        except Exception:  # a bug or our store, not the peer: report it, keep serving others
            logger.exception("join: serving %s failed", peer)
            await self._reset_quietly(stream)
        finally:
            self.serving -= 1
            left = self._serving_peer.pop(peer) - 1
            if left:
                self._serving_peer[peer] = left

    async def _serve(self, stream: FrameStreamLike) -> None:
        request = decode_request(
            await stream.read_frame(MAX_FRAME_BYTES, timeout=self.frame_timeout)
        )
        ms = self.service.markets.get(request.market)
        if ms is None:
            await self._refuse(stream, "unknown_market", "not followed here")
        elif request.kind == "offer":
            await self._write(stream, encode_offer(self.offer(ms)))
        elif request.kind == "snapshot":
            await self._serve_snapshot(stream, ms, request)
        else:
            await self._serve_history(stream, ms, request)

    def offer(self, ms: MarketState) -> Offer:
        """What this node offers a joiner: its latest points with the heartbeats it holds that
        attest them, and the reconfiguration chain (kept ops: every replica holds them)."""
        replica = ms.replica
        latest = replica.point
        if latest is None:  # never compacted (a joining node has no point either)
            return Offer([])
        offered: list[tuple[int, bytes]] = []
        heartbeats: list[bytes] = []
        for n, digest in self.service.point_hashes(ms)[:POINTS_OFFERED]:
            attesting = replica.attesting(n, digest)
            if attesting or n == latest.n:  # the latest even unattested: the joiner judges
                offered.append((n, digest))
                heartbeats += [op.raw for op in attesting]
        applied = replica.applied_index
        reconfigs = []
        for ident in latest.kept:
            op = applied.get(ident)
            if op is not None and op.kind == "reconfig":
                reconfigs.append(op.raw)
        return Offer(offered, heartbeats[:MAX_OFFER_HEARTBEATS], reconfigs[:MAX_OFFER_RECONFIGS])

    async def _serve_snapshot(
        self, stream: FrameStreamLike, ms: MarketState, request: JoinRequest
    ) -> None:
        store, market = self.service.store, ms.market
        found = None
        for n, blob in store.points(market.id):
            if n == request.point and hashlib.sha256(blob).digest() == request.hash:
                found = blob
        if found is None:
            await self._refuse(stream, "not_that_point", f"no point at {request.point} here")
            return
        kept = core_read_point(market, found).kept
        raws = store.get_raws(market.id, kept)
        parts = [
            found[i : i + SNAPSHOT_CHUNK_BYTES] for i in range(0, len(found), SNAPSHOT_CHUNK_BYTES)
        ]
        for part in parts:
            await self._write(stream, encode_snapshot(SnapshotFrame(part, [], True)))
        batches = list(_op_batches(raws))
        for index, batch in enumerate(batches):
            more = index + 1 < len(batches)
            await self._write(stream, encode_snapshot(SnapshotFrame(b"", batch, more)))

    async def _serve_history(
        self, stream: FrameStreamLike, ms: MarketState, request: JoinRequest
    ) -> None:
        store, market = self.service.store, ms.market
        saved = self.service.point_hashes(ms)  # points whose compaction the store holds
        if not ms.history_held():
            await self._refuse(stream, "no_history", "the prefix asked for is not held here")
            return
        if not saved or request.point > saved[0][0]:
            newest = saved[0][0] if saved else 0
            await self._refuse(
                stream, "not_yet", f"compacted to {newest} here, not yet to {request.point}"
            )
            return
        start = request.start
        stop = min(request.point, start + MAX_HISTORY_SESSION_OPS)
        while start < stop:
            want = min(MAX_BATCH_OPS, stop - start)
            # A worker thread: a chunk is some hundred KB read from SQLite.
            raws = await trio.to_thread.run_sync(store.history, market.id, start, want)
            if len(raws) < want:
                await self._refuse(stream, "no_history", f"the prefix has a gap at {start}")
                return
            for batch in _op_batches(raws):
                more = start + len(batch) < stop
                await self._write(stream, encode_history(HistoryFrame(start, batch, more)))
                start += len(batch)
        if request.start >= stop:  # nothing asked: say so in one frame
            await self._write(stream, encode_history(HistoryFrame(request.start, [], False)))

    async def _write(self, stream: FrameStreamLike, frame: bytes) -> None:
        await stream.write_frame(frame, timeout=self.frame_timeout)

    async def _refuse(self, stream: FrameStreamLike, code: str, message: str) -> None:
        await self._write(stream, encode_refusal(code, message))

    async def _reset_quietly(self, stream: FrameStreamLike) -> None:
        with trio.CancelScope(deadline=trio.current_time() + self.frame_timeout, shield=True):
            await stream.reset()

    # -- joining -----------------------------------------------------------------------------

    async def join(self, ms: MarketState) -> None:
        """Join ``ms`` from a snapshot, or fall back to the full log; then hand it to sync.
        Never raises (a bug is logged and the market falls back)."""
        name = ms.market.name
        started = time.monotonic()
        ms.join_state = "joining"
        logger.info("%s: joining from a witnessed snapshot", name)
        joined = False
        try:
            joined = await self._join(ms)
        except Exception:  # a bug, not a peer: the full log still works
            logger.exception("%s: joining from a snapshot failed", name)
        finally:
            ms.joining = False
            if not joined:
                ms.join_state = "full"
                logger.info("%s: falling back to the full log", name)
            else:
                logger.info(
                    "%s: joined from the point at %d ops in %.2f s; syncing what followed",
                    name,
                    ms.joined_from or 0,
                    time.monotonic() - started,
                )
            self.on_joined(ms)

    async def _join(self, ms: MarketState) -> bool:
        deadline = trio.current_time() + self.peer_wait
        offers: dict[str, Offer] = {}
        asked: set[str] = set()  # each peer once: one that failed or refused is not pestered
        while not offers:
            peers = [p for p in self.net.connected_peers() if p not in asked]
            if peers:
                asked.update(peers)
                offers = await self._offers(ms, peers)
                if offers and not any(o.points for o in offers.values()):
                    logger.info("%s: no peer has a point yet", ms.market.name)
                    return False
            if offers or trio.current_time() >= deadline:
                break
            await trio.sleep(JOIN_POLL)
        candidates = _candidates(offers)
        if not candidates:
            return False
        heartbeats = _unique(raw for o in offers.values() for raw in o.heartbeats)
        reconfigs = _unique(raw for o in offers.values() for raw in o.reconfigs)
        tries = 0
        for candidate in candidates[:MAX_CANDIDATES]:
            peers = list(candidate.peers)
            random.shuffle(peers)
            for peer in peers:
                if tries >= MAX_SNAPSHOT_TRIES:
                    return False
                tries += 1
                try:
                    if await self._try_snapshot(ms, peer, candidate, heartbeats, reconfigs):
                        return True
                except SnapshotRefused as exc:
                    logger.info(
                        "%s: refused the snapshot at %d ops from %s: %s",
                        ms.market.name,
                        candidate.point,
                        peer,
                        exc,
                    )
                    if exc.reason == "unattested":
                        break  # the point's fault, not the peer's: try the next point
                    self.net.report_reject(peer, f"join-{exc.reason}")
        return False

    async def _offers(self, ms: MarketState, peers: list[str]) -> dict[str, Offer]:
        offers: dict[str, Offer] = {}

        async def ask(peer: str) -> None:
            try:
                with trio.fail_after(OFFER_TIMEOUT):
                    async with self._session(peer) as stream:
                        await self._write(
                            stream, encode_request(JoinRequest("offer", ms.market.id))
                        )
                        frame = await stream.read_frame(MAX_FRAME_BYTES, timeout=self.frame_timeout)
                        offers[peer] = decode_offer(frame)
            except WireError as exc:
                logger.info("join: malformed offer from %s: %s", peer, exc)
                self.net.report_reject(peer, "join-malformed")
            except JoinRefusal as exc:
                logger.debug("join: %s offers nothing: %s", peer, exc)
            except (P2PError, trio.TooSlowError) as exc:
                logger.debug("join: no offer from %s: %r", peer, exc)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)
        return {peer: offers[peer] for peer in peers if peer in offers}  # in the order asked

    async def _try_snapshot(
        self,
        ms: MarketState,
        peer: str,
        candidate: _Candidate,
        heartbeats: list[bytes],
        reconfigs: list[bytes],
    ) -> bool:
        """Fetch and check ``candidate`` from ``peer``; adopt it if it checks. False when the
        peer could not serve it (gone, refused, slow); ``SnapshotRefused`` when it is bad."""
        market = ms.market
        started = time.monotonic()
        try:
            with trio.fail_after(SNAPSHOT_TIMEOUT):
                fetched = await self._fetch_snapshot(market, peer, candidate)
        except JoinRefusal as exc:
            logger.info("%s: %s has no snapshot at %d: %s", market.name, peer, candidate.point, exc)
            return False
        except WireError as exc:
            raise SnapshotRefused("damaged", f"malformed frames: {exc}") from None
        except (P2PError, trio.TooSlowError) as exc:
            logger.info("%s: snapshot from %s failed: %r", market.name, peer, exc)
            return False
        logger.info(
            "%s: fetched the snapshot at %d ops from %s: %d bytes and %d ops in %.2f s",
            market.name,
            candidate.point,
            peer,
            len(fetched.blob),
            len(fetched.ops),
            time.monotonic() - started,
        )
        if hashlib.sha256(fetched.blob).digest() != candidate.hash:
            # A blob other than the one offered: refuse it before decoding anything in it.
            raise SnapshotRefused("forged", "its SHA-256 is not the hash offered")
        info = check_attested(
            market, fetched.blob, heartbeats, reconfigs, want=(candidate.point, candidate.hash)
        )
        kept = set(info.kept)
        ops: dict[bytes, bytes] = {}
        for raw in fetched.ops:
            ident = hashlib.sha256(raw).digest()
            if ident in kept:
                ops[ident] = raw
        if len(ops) != len(kept):
            raise SnapshotRefused(
                "damaged", f"{len(kept) - len(ops)} of the {len(kept)} kept ops are not given"
            )
        await self.service.adopt_snapshot(ms, fetched.blob, info, list(ops.values()))
        return True

    async def _fetch_snapshot(self, market: Market, peer: str, candidate: _Candidate) -> _Fetched:
        async with self._session(peer) as stream:
            request = JoinRequest("snapshot", market.id, candidate.point, candidate.hash)
            await self._write(stream, encode_request(request))
            blob = bytearray()
            ops: list[bytes] = []
            while True:
                frame = decode_snapshot(
                    await stream.read_frame(MAX_FRAME_BYTES, timeout=self.frame_timeout)
                )
                blob += frame.blob
                ops += frame.ops
                if len(blob) > MAX_SNAPSHOT_BYTES or len(ops) > MAX_KEPT_OPS:
                    raise WireError("the snapshot exceeds the joiner's bounds")
                if not frame.more:
                    return _Fetched(bytes(blob), ops)

    @asynccontextmanager
    async def _session(self, peer: str) -> AsyncIterator[FrameStreamLike]:
        """A join stream to ``peer``: closed when the session ends well, reset when it fails
        (so a half-read answer is never taken for the end of one)."""
        stream = await self.net.open_stream(peer, JOIN_PROTOCOL)
        try:
            yield stream
        except BaseException:
            await self._reset_quietly(stream)
            raise
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
            await stream.close()

    # -- history on demand -------------------------------------------------------------------

    async def history_loop(self, ms: MarketState) -> None:
        """Whenever the replica lacks the prefix (joined from a snapshot, or pruned by
        retention: node.retention) and ops wait for it, fetch it (for ever); a market joined
        from a snapshot also ``backfill_after`` its join, and derives its past (node.derive)."""
        delay = HISTORY_RETRY
        held_since: float | None = None  # since when ops have been held for the history
        behind = False  # the last fetch found a peer that lags (not_yet)
        # A market joined from a point fetches its history in the background after a while
        # (its fills and orders before the point are derived from it: node.derive).
        backfill_at: float | None = None
        backfill_tries = 0
        while True:
            changed = ms.changed
            replica = ms.replica
            if derive_due(self.service, ms):  # fetched before a restart, not derived yet
                await derive_joined_history(self.service, ms)
                continue
            if replica.has_history or history_point(ms) is None:
                held_since = None
                retry = ms.derive_retry_at if ms.derive_state == "failed" else float("inf")
                with trio.move_on_at(retry):  # a derivation that failed: tried again then
                    await changed.wait()
                continue
            now = trio.current_time()
            backfill = (
                self.backfill_after is not None and ms.join_info is not None
                and not ms.prune.below
            )
            if backfill and backfill_at is None:
                backfill_at = now + (self.backfill_after or 0.0)
            if not replica.history_held:
                held_since = None
            elif held_since is None:
                held_since = now
            # history_wanted: ops that matter wait (their rules read the prefix, or another op
            # waits for them). Ops only held as possible copies of prefix ops ask for nothing
            # at first (a real copy changes nothing, and fetching the prefix for each copy
            # would undo what a join or retention saves), but one of them may be a fork of a
            # prefix author's chain that nobody references yet: a replica with the history
            # applies it (evidence of equivocation, in the digest) and this one would hold it
            # for ever. So ops held for HELD_HISTORY_FETCH_AFTER make the node fetch too.
            needed = replica.history_wanted > 0 or (
                held_since is not None and now - held_since >= HELD_HISTORY_FETCH_AFTER
            )
            if needed:
                # Asked again every HISTORY_RETRY_BEHIND while a peer lags: said once.
                outcome = await self.fetch_history(ms, quiet=behind)
                behind = outcome == "behind"
                if outcome == "done":
                    delay = HISTORY_RETRY
                    held_since = None
                elif outcome == "behind":  # a peer will have it soon: no backing off
                    await trio.sleep(HISTORY_RETRY_BEHIND)
                else:
                    await trio.sleep(delay)
                    delay = min(HISTORY_RETRY_MAX, delay * 2)
                continue
            if backfill and backfill_at is not None and now >= backfill_at:
                # Nothing needs it: a failed try is said once and tried again less and less
                # often (every peer may have pruned it).
                # ("done": the loop waits for changes from now on; a peer that lags is waited
                # for as one that has none: nothing needs it soon)
                await self.fetch_history(ms, quiet=backfill_tries > 0)
                backfill_tries += 1
                backfill_at = trio.current_time() + min(
                    HISTORY_BACKFILL_RETRY_MAX,
                    max(HISTORY_RETRY_BEHIND, self.backfill_after or 0.0) * 2**backfill_tries,
                )
                continue
            wake = float("inf") if held_since is None else held_since + HELD_HISTORY_FETCH_AFTER
            if backfill and backfill_at is not None:
                wake = min(wake, backfill_at)
            with trio.move_on_at(wake):
                await changed.wait()

    async def fetch_history(self, ms: MarketState, *, quiet: bool = False) -> HistoryOutcome:
        """Fetch, check and store the prefix of the joined point (a pruned node: of its latest
        point); release what waited. Tries the connected peers in random order: ``"done"``
        once complete; else ``"behind"`` if some peer said it has not compacted that far yet
        (``not_yet``), ``"failed"`` if none did. ``quiet``: say the start at DEBUG (a retry).
        Once complete, a joined market's fills and orders before its point are derived from it
        (node.derive), before retention may prune it again."""
        async with ms.archive_lock:  # no pruning meanwhile (node.retention)
            outcome = await self._fetch_history(ms, quiet)
            if outcome == "done":
                if ms.derive_state == "failed":
                    ms.derive_state = None  # the history is back: try again
                await derive_locked(self.service, ms)
            return outcome

    async def _fetch_history(self, ms: MarketState, quiet: bool) -> HistoryOutcome:
        info = history_point(ms)
        assert info is not None
        name = ms.market.name
        ms.history_fetching = True
        started = time.monotonic()
        say = logger.debug if quiet else logger.info
        wanted = ms.replica.history_wanted
        if wanted:
            say("%s: %d ops wait for the %d ops of history before the point; fetching it",
                name, wanted, info.n)
        else:
            say("%s: fetching the %d ops of history before the point in the background",
                name, info.n)
        try:
            peers = self.net.connected_peers()
            random.shuffle(peers)
            check = HistoryCheck(info)
            behind = False
            for peer in peers:
                try:
                    await self._history_from(ms, peer, check)
                    if check.count < info.n:
                        continue  # a session ends after a bounded number of ops: another peer
                    check.done()  # SnapshotRefused("forged") unless it chains to the point
                except JoinRefusal as exc:
                    behind = behind or exc.code == "not_yet"
                    say("%s: %s serves no history: %s", name, peer, exc)
                    continue
                except (WireError, SnapshotRefused) as exc:
                    logger.info("%s: refused history from %s: %s", name, peer, exc)
                    self.net.report_reject(peer, "join-history")
                    await trio.to_thread.run_sync(
                        self.service.store.drop_history, ms.market.id, info.n
                    )
                    check = HistoryCheck(info)
                    continue
                except (P2PError, trio.TooSlowError) as exc:
                    logger.info("%s: history from %s failed: %r", name, peer, exc)
                    continue
                released = await self.service.history_fetched(ms, info)
                logger.info(
                    "%s: fetched the %d ops of history before the point in %.1f s; %d ops that "
                    "waited for it applied",
                    name,
                    info.n,
                    time.monotonic() - started,
                    released,
                )
                return "done"
            return "behind" if behind else "failed"
        finally:
            ms.history_fetching = False

    async def _history_from(self, ms: MarketState, peer: str, check: HistoryCheck) -> None:
        """Sessions with ``peer`` until the prefix is complete or it stops serving."""
        info = check.info
        market = ms.market
        store = self.service.store
        while check.count < info.n:
            before = check.count
            with trio.fail_after(HISTORY_SESSION_TIMEOUT):
                async with self._session(peer) as stream:
                    request = JoinRequest("history", market.id, info.n, start=check.count)
                    await self._write(stream, encode_request(request))
                    more = True
                    # A peer that answers nothing (paused, overloaded) is left for the next
                    # one sooner than the frame timeout: ops wait for this history meanwhile.
                    timeout = min(self.frame_timeout, HISTORY_FIRST_FRAME_TIMEOUT)
                    while more:
                        frame = decode_history(
                            await stream.read_frame(MAX_FRAME_BYTES, timeout=timeout)
                        )
                        timeout = self.frame_timeout
                        if frame.start != check.count:
                            raise WireError(f"history frame at {frame.start}, {check.count} due")
                        start = check.count
                        items = []
                        for raw in frame.ops:
                            ident = check.feed(raw)
                            try:
                                lamport = decode(raw, verify=False).lamport
                            except InvalidOp:  # chained bytes that are no op: forged
                                raise SnapshotRefused(
                                    "forged", "a history op does not decode"
                                ) from None
                            items.append((ident, market.id, lamport, raw))
                        await trio.to_thread.run_sync(store.add_history, market.id, start, items)
                        more = frame.more
            if check.count == before:
                return  # the peer has nothing more for us


def _op_batches(raws: list[bytes]) -> list[list[bytes]]:
    """``raws`` cut into frames of at most MAX_BATCH_OPS ops and _FRAME_BUDGET bytes."""
    out: list[list[bytes]] = []
    batch: list[bytes] = []
    size = 0
    for raw in raws:
        if batch and (len(batch) >= MAX_BATCH_OPS or size + len(raw) > _FRAME_BUDGET):
            out.append(batch)
            batch, size = [], 0
        batch.append(raw)
        size += len(raw)
    if batch or not out:
        out.append(batch)
    return out


def _candidates(offers: dict[str, Offer]) -> list[_Candidate]:
    """The points offered, the largest first, each with the peers that offered it."""
    by_point: dict[tuple[int, bytes], _Candidate] = {}
    for peer, offer in offers.items():
        for n, digest in offer.points:
            by_point.setdefault((n, digest), _Candidate(n, digest)).peers.append(peer)
    return sorted(by_point.values(), key=lambda c: (-c.point, -len(c.peers)))


def _unique(raws: Iterable[bytes]) -> list[bytes]:
    return list(dict.fromkeys(raws))
