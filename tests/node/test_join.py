"""Joining a witnessed market from a snapshot (issue #10), in process: node/join.py's joiner and
server on the two ends of in-memory streams, each end a ``NodeService`` over a real store.

A witness node ``W`` compacts at points (a small interval); a second holder ``H`` has the same
ops. A joiner with an empty store asks them for offers, fetches the largest attested snapshot,
checks it and starts from it; sync (node/sync.py's pull and respond, in process too) brings
the rest, and the joiner ends with the witness's digest after receiving far fewer ops than the
history. A peer serving a forged, stale, foreign or unattested snapshot is refused (and counted,
but for unattested) and the joiner tries the other peer or falls back to the full log. History
is fetched on demand (an op naming an old compacted op) and checked against the attested chain.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from crdtbook import Identity, Market, Op, Replica
from crdtbook.node.derive import answered_from, derive_due, derive_joined_history
from crdtbook.node.join import Joiner
from crdtbook.node.join_wire import Offer
from crdtbook.node.p2p_errors import P2PError
from crdtbook.node.service import MarketState, NodeService
from crdtbook.node.store import STORE_FILENAME, OpStore, StoreWriteError
from crdtbook.node.sync import pull, respond

from .test_compaction import author as trading
from .test_sync_inprocess import Frames

pytestmark = pytest.mark.timeout(60)

WITNESS = Identity.from_seed(b"W" * 32)
TRADERS = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(4)]
MARKET = Market("JOIN", "1", "1", witnesses=(WITNESS.public_key,))
OTHER = Market("ELSE", "1", "1", witnesses=(WITNESS.public_key,))
#: Small, so a few hundred ops make several points.
INTERVAL = 100


def author(count: int, seed: int, market: Market = MARKET) -> list[Op]:
    """``count`` trader ops around a fixed price (test_compaction's, in this market)."""
    return trading(count, seed, market)


class Streams(Frames):
    """An in-memory frame stream whose failures are the network's (``P2PError``), as
    node/p2p.py's FrameStream reports them."""

    def __init__(self, stream: trio.abc.Stream, peer_id: str) -> None:
        super().__init__(stream)
        self.peer_id = peer_id

    async def read_frame(self, max_size: int, *, timeout: float | None = None) -> bytes:
        try:
            return await super().read_frame(max_size, timeout=timeout)
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise P2PError(f"stream ended: {exc!r}") from None

    async def write_frame(self, data: bytes, *, timeout: float | None = None) -> None:
        try:
            await super().write_frame(data, timeout=timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise P2PError(f"stream ended: {exc!r}") from None


class FakeNet:
    """The parts of node.network.Network a Joiner uses: peers are other nodes' Joiners, each
    stream served in the test's nursery."""

    def __init__(self, me: str, nursery: trio.Nursery) -> None:
        self.peer_id = me
        self.nursery = nursery
        self.peers: dict[str, Joiner] = {}
        self.rejects: list[tuple[str, str]] = []

    def connected_peers(self) -> list[str]:
        return list(self.peers)

    def set_stream_handler(self, protocol_id: str, handler: Any) -> None:
        pass

    def report_reject(self, peer_id: str, reason: str) -> None:
        self.rejects.append((peer_id, reason))

    async def open_stream(self, peer_id: str, protocol_id: str) -> Streams:
        left, right = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.peers[peer_id].serve, Streams(right, self.peer_id))
        return Streams(left, peer_id)


class Node:
    """A node in process: its service over a store in ``home``, its joiner on a FakeNet."""

    def __init__(
        self, home: Path, nursery: trio.Nursery, identity: Identity, name: str, join: str
    ) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.store = OpStore.open(home / STORE_FILENAME, synchronous="NORMAL")
        self.service = NodeService(identity, self.store, [MARKET], point_interval=INTERVAL)
        self.service.load_from_store()
        self.net = FakeNet(name, nursery)
        self.joiner = Joiner(self.service, self.net, mode=join, peer_wait=0.5)  # type: ignore[arg-type]
        self.joiner.install()

    @property
    def ms(self) -> MarketState:
        return self.service.by_name[MARKET.name]

    async def ingest(self, raws: list[bytes], source: str = "test") -> None:
        for start in range(0, len(raws), 200):
            prepared = await self.service.prepare(self.ms, raws[start : start + 200])
            await self.service.commit(self.ms, prepared, source)

    async def settle(self) -> None:
        """Compact at every point reached, as the finality task does."""
        while self.service.compaction_due(self.ms):
            await self.service.compact(self.ms)

    async def pull_from(self, other: Node) -> int:
        """One sync session: this node pulls from ``other``; the ops received."""
        left, right = trio.testing.memory_stream_pair()
        ours, theirs = Frames(left), Frames(right)
        ms, service = self.ms, self.service

        async def serve() -> None:
            await respond(theirs, lambda m: other.ms.replica if m == MARKET.id else None)
            await theirs.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            received, _ = await pull(
                ours,
                ms.replica,
                lambda raws: service.prepare(ms, raws),
                lambda prepared: service.commit(ms, prepared, other.name),
            )
        await ours.close()
        return received

    def close(self) -> None:
        self.store.close()


async def witness_feed(w: Node, ops: list[Op], batch: int = 40) -> None:
    """The witness takes ``ops`` in batches and heartbeats after each (so they turn final),
    compacting at points."""
    for start in range(0, len(ops), batch):
        await w.ingest([op.raw for op in ops[start : start + batch]])
        await w.service.heartbeat(w.ms)
        await w.settle()
    await w.service.heartbeat(w.ms)  # attests the latest point
    await w.settle()


def log_of(node: Node) -> list[bytes]:
    return list(node.store.load_market(MARKET.id))


@asynccontextmanager
async def network(
    tmp_path: Path, ops: int = 700
) -> AsyncIterator[tuple[Node, Node, Callable[..., Node]]]:
    """A witness W with ``ops`` trader ops (compacted at points), a holder H with the same
    log, and ``new(name, join=...)`` making further nodes (all closed at the end)."""
    nodes: list[Node] = []
    async with trio.open_nursery() as nursery:

        def new(name: str, join: str = "snapshot", identity: Identity | None = None) -> Node:
            node = Node(
                tmp_path / name,
                nursery,
                identity or Identity.from_seed(name.encode() * 32),
                name,
                join,
            )
            nodes.append(node)
            return node

        try:
            w = new("W", identity=WITNESS)
            w.ms.joining = False  # the market's first node: nobody to join from
            await witness_feed(w, author(ops, seed=7))
            h = new("H")
            h.ms.joining = False  # takes the whole log below
            log = log_of(w)
            for start in range(0, len(log), INTERVAL):  # compacting at each point, as W did
                await h.ingest(log[start : start + INTERVAL])
                await h.settle()
            assert h.ms.replica.point == w.ms.replica.point
            assert (w.ms.replica.point is not None) == (ops >= 2 * INTERVAL)
            yield w, h, new
        finally:
            for node in nodes:
                node.close()
            nursery.cancel_scope.cancel()


def connect(joiner: Node, *peers: Node) -> None:
    for peer in peers:
        joiner.net.peers[peer.name] = peer.joiner


async def test_joins_from_the_attested_snapshot_and_syncs_only_what_followed(
    tmp_path: Path,
) -> None:
    async with network(tmp_path) as (w, h, new):
        j = new("J")
        assert j.ms.joining  # witnessed, nothing stored: marked before sync runs
        connect(j, w, h)
        await j.joiner.join(j.ms)
        ms, point = j.ms, w.ms.replica.point
        assert point is not None
        assert ms.join_state == "snapshot" and ms.joined_from == point.n
        assert ms.join_status() == {
            "join": "snapshot",
            "joined_from_point": point.n,
            "history": "absent",
            "history_derived": "not_yet",
            "history_derived_progress": 0.0,
            "history_wanted": 0,
            "retention": None,
            "pruned_ops": 0,
        }
        assert not ms.joining and j.net.rejects == []
        # Sync brings what followed the point, not the history before it.
        received = await j.pull_from(w)
        assert received < len(w.ms.replica) - point.n + 50
        assert ms.replica.digest() == w.ms.replica.digest()
        assert len(ms.replica) == len(w.ms.replica)
        # The store took the join: a restart starts from the joined point, history absent.
        j.service.load_from_store()
        assert ms.replica.digest() == w.ms.replica.digest()
        assert ms.join_status()["history"] == "absent" and ms.joined_from == point.n
        # A node joining from the full log ends with the same digest.
        f = new("F", join="full")
        assert not f.ms.joining
        await f.pull_from(w)
        assert f.ms.replica.digest() == w.ms.replica.digest()
        assert f.ms.join_status() == {
            "join": None,
            "joined_from_point": None,
            "history": "complete",
            "history_derived": None,
            "history_derived_progress": 0.0,
            "history_wanted": 0,
            "retention": None,
            "pruned_ops": 0,
        }


class Tampering(Joiner):
    """A peer that serves what ``change`` makes of each frame it writes (by session kind)."""

    change: Callable[[str, bytes], bytes] = staticmethod(lambda kind, frame: frame)
    offer_change: Callable[[Offer], Offer] = staticmethod(lambda offer: offer)

    def offer(self, ms: MarketState) -> Offer:
        return self.offer_change(super().offer(ms))

    async def _write(self, stream: Any, frame: bytes) -> None:
        await super()._write(stream, self.change("frame", frame))


def tamper(node: Node, **changes: Any) -> Tampering:
    bad = Tampering(node.service, node.net)  # type: ignore[arg-type]
    for key, value in changes.items():
        setattr(bad, key, value)  # an instance attribute: called unbound
    node.joiner = bad
    return bad


def flip_blob_byte(kind: str, frame: bytes) -> bytes:
    """Change one byte inside a snapshot frame's blob part (the frame stays well formed)."""
    import cbor2

    data = cbor2.loads(frame)
    if isinstance(data, dict) and data.get("b"):
        blob = bytearray(data["b"])
        blob[len(blob) // 2] ^= 1
        data["b"] = bytes(blob)
        return cbor2.dumps(data)
    return frame


@pytest.fixture
def h_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Peers are tried in the order connected (H first), not shuffled."""
    monkeypatch.setattr("crdtbook.node.join.random.shuffle", lambda items: None)


async def test_a_forged_snapshot_is_refused_counted_and_another_peer_tried(
    tmp_path: Path, h_first: None
) -> None:
    async with network(tmp_path) as (w, h, new):
        tamper(h, change=flip_blob_byte)
        j = new("J")
        connect(j, h, w)
        await j.joiner.join(j.ms)
        assert j.net.rejects == [("H", "join-forged")]
        assert j.ms.join_state == "snapshot" and j.ms.joined_from == w.ms.replica.point.n  # type: ignore[union-attr]


async def test_a_stale_snapshot_is_refused_and_counted(tmp_path: Path, h_first: None) -> None:
    """H offers its latest point's n with the previous point's hash, and serves the previous
    point's blob: the bytes match the hash offered, but they are the state at another point."""
    async with network(tmp_path) as (w, h, new):
        points = h.store.points(MARKET.id)
        assert len(points) == 2
        (n_new, _), (n_old, blob_old) = points
        old_hash = hashlib.sha256(blob_old).digest()

        def offer_change(offer: Offer) -> Offer:
            return Offer([(n_new, old_hash)], offer.heartbeats, offer.reconfigs)

        bad = tamper(h, offer_change=offer_change)

        async def serve_snapshot(stream: Any, ms: MarketState, request: Any) -> None:
            request.point = n_old  # serves the previous point, asked for the latest
            await Joiner._serve_snapshot(bad, stream, ms, request)

        bad._serve_snapshot = serve_snapshot  # type: ignore[method-assign]
        j = new("J")
        connect(j, h, w)
        await j.joiner.join(j.ms)
        assert ("H", "join-stale") in j.net.rejects
        assert j.ms.join_state == "snapshot"


async def test_a_foreign_snapshot_is_refused_and_counted(tmp_path: Path, h_first: None) -> None:
    async with network(tmp_path) as (w, h, new):
        # A point of another market (same witness): H offers it as a larger point.
        other = Replica(OTHER, point_interval=INTERVAL)
        other.apply_many(author(300, seed=9, market=OTHER))
        for _ in range(3):
            other.heartbeat(WITNESS)
        other.compact()
        foreign = other.snapshot()
        digest = hashlib.sha256(foreign).digest()
        big = w.ms.replica.point.n + 1000  # type: ignore[union-attr]

        def offer_change(offer: Offer) -> Offer:
            return Offer([(big, digest), *offer.points], offer.heartbeats, offer.reconfigs)

        bad = tamper(h, offer_change=offer_change)

        async def serve_snapshot(stream: Any, ms: MarketState, request: Any) -> None:
            if request.point == big:
                from crdtbook.node.join_wire import SnapshotFrame, encode_snapshot

                await bad._write(stream, encode_snapshot(SnapshotFrame(foreign, [], False)))
                return
            await Joiner._serve_snapshot(bad, stream, ms, request)

        bad._serve_snapshot = serve_snapshot  # type: ignore[method-assign]
        j = new("J")
        connect(j, h, w)
        await j.joiner.join(j.ms)
        assert ("H", "join-foreign") in j.net.rejects
        assert j.ms.join_state == "snapshot" and j.ms.joined_from == w.ms.replica.point.n  # type: ignore[union-attr]


async def test_an_unattested_snapshot_is_refused_and_the_joiner_falls_back(
    tmp_path: Path,
) -> None:
    async with network(tmp_path) as (w, h, new):
        # H offers its points without the heartbeats that attest them: no majority.
        tamper(h, offer_change=lambda offer: Offer(offer.points, [], offer.reconfigs))
        j = new("J")
        connect(j, h)
        await j.joiner.join(j.ms)
        assert j.net.rejects == []  # not H's fault: its witnesses may not have heartbeated
        assert j.ms.join_state == "full" and j.ms.joined_from is None and not j.ms.joining
        await j.pull_from(w)
        assert j.ms.replica.digest() == w.ms.replica.digest()


async def test_no_point_yet_falls_back_at_once(tmp_path: Path) -> None:
    async with network(tmp_path, ops=40) as (w, h, new):
        j = new("J")
        connect(j, w, h)
        with trio.fail_after(0.4):  # before the peer wait ends: every peer said it has none
            await j.joiner.join(j.ms)
        assert j.ms.join_state == "full" and j.net.rejects == []


async def test_history_on_demand_releases_an_op_naming_a_compacted_parent(
    tmp_path: Path, h_first: None
) -> None:
    async with network(tmp_path) as (w, h, new):
        j = new("J")
        connect(j, h, w)
        await j.joiner.join(j.ms)
        await j.pull_from(w)
        point = j.ms.join_info
        assert point is not None
        # An op whose parent is an old op of the prefix, outside the kept set.
        log = [op for op in Replica.restore(MARKET, log_of(w), None, verify=False).ops()]
        old = next(op for op in log[: point.n // 2] if op.id not in set(point.kept))
        authoring = Replica(MARKET)
        authoring.apply_many(log[: log.index(old) + 1])
        late = authoring.submit(Identity.from_seed(b"L" * 32), "buy", 90, 1)
        assert old.id in late.parents
        await w.ingest([late.raw])
        assert late.id in w.ms.replica
        await j.ingest([late.raw])
        assert late.id not in j.ms.replica
        # Sync brings the parent (a prefix op): it waits for the history.
        for _ in range(3):
            await j.pull_from(w)
        assert j.ms.replica.history_wanted > 0

        # H serves history with one op changed: refused and counted; W's checks.
        def change(kind: str, frame: bytes) -> bytes:
            import cbor2

            data = cbor2.loads(frame)
            if isinstance(data, dict) and data.get("ops") and "i" in data:
                data["ops"][0] = log[-1].raw
                return cbor2.dumps(data)
            return frame

        tamper(h, change=change)
        connect(j, h)
        assert await j.joiner.fetch_history(j.ms) == "done"
        assert ("H", "join-history") in j.net.rejects
        assert late.id in j.ms.replica and j.ms.replica.has_history
        assert j.ms.join_status()["history"] == "complete"
        assert j.ms.replica.digest() == w.ms.replica.digest()
        # The history is served on from the joiner now, and its archive answers.
        assert j.store.history(MARKET.id, 0, 10) == [op.raw for op in log[:10]]
        assert j.store.get_raw(MARKET.id, old.id, compacted=True) == old.raw
        # A restart starts from the store's snapshot with the history held.
        digest = j.ms.replica.digest()
        j.service.load_from_store()
        assert j.ms.replica.has_history and j.ms.replica.digest() == digest
        assert j.ms.join_status()["history"] == "complete" and j.ms.joined_from == point.n


async def joined(new: Callable[..., Node], w: Node, *others: Node) -> Node:
    """A new node J joined from a snapshot (offered by ``w`` and ``others``) and synced from
    ``w``: the history before its point absent."""
    j = new("J")
    connect(j, w, *others)
    await j.joiner.join(j.ms)
    await j.pull_from(w)
    return j


def derived_of(node: Node) -> int:
    """``joins.derived`` of the node's store (0: not joined)."""
    joined = node.store.join_state(MARKET.id)
    return 0 if joined is None else joined.derived


def _past(node: Node) -> tuple[list[tuple[int, Any]], dict[bytes, Any]]:
    """A node's fills (global index, fill) and finished final orders, as ``fills`` and
    ``order`` answer them (the store's and the replica's), without the node-local times."""
    ms = node.ms
    fills = [(c.number, c.fill) for c in ms.fills(0)]
    orders = {}
    for c in node.store.compacted_orders_newest(MARKET.id, None, 10**6):
        orders[c.order.id] = c.order
    return fills, orders


async def test_a_joined_node_derives_the_fills_and_orders_before_its_point(
    tmp_path: Path,
) -> None:
    """Joined from a point, a node answers ``fills`` and ``order`` from the point on; once the
    history is fetched it derives what came before (node.derive): the witness's own fills and
    finished orders, marked done in the store, kept through a restart."""
    async with network(tmp_path) as (w, h, new):
        j = await joined(new, w, h)
        point = j.ms.join_info
        assert point is not None and j.ms.replica.compacted_fills > 0
        w_fills, w_orders = _past(w)
        j_fills, j_orders = _past(j)
        assert j_fills == w_fills[j.ms.replica.compacted_fills :] and j_orders == {}
        assert j.ms.join_status()["history_derived"] == "not_yet"
        # Paging (``fills`` with ``start``) begins at the join point until the past is derived,
        # also after a restart.
        assert answered_from(j.ms) == j.ms.replica.compacted_fills == len(w_fills)
        j.service.load_from_store()
        assert answered_from(j.ms) == len(w_fills)

        assert await j.joiner.fetch_history(j.ms) == "done"
        assert _past(j) == (w_fills, w_orders)
        assert len(w_orders) == j.ms.replica.compacted_orders
        status = j.ms.join_status()
        assert status["history_derived"] == "done" and status["history_derived_progress"] == 1
        assert derived_of(j) == point.n and answered_from(j.ms) == 0
        for order in list(w_orders.values())[:20]:  # ``order`` answers for them, final
            found = j.ms.order_with_times(order.id)
            assert found is not None and found.order == order and found.order.final
        # A restart: done, not derived again.
        j.service.load_from_store()
        assert j.ms.join_status()["history_derived"] == "done"
        assert _past(j) == (w_fills, w_orders)


async def test_a_joined_node_fetches_its_history_in_the_background(tmp_path: Path) -> None:
    """No op needs the history: the joiner fetches it ``backfill_after`` the join anyway, and
    derives its past."""
    async with network(tmp_path) as (w, h, new):
        j = new("J")
        j.joiner.backfill_after = 0.05
        connect(j, w, h)
        await j.joiner.join(j.ms)
        await j.pull_from(w)
        assert j.ms.replica.history_wanted == 0
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(j.joiner.history_loop, j.ms)
                while j.ms.derive_state != "done":
                    await j.ms.changed.wait()  # (a derivation ends with a change too)
                nursery.cancel_scope.cancel()
        assert j.ms.replica.has_history
        assert _past(j) == _past(w)


def test_a_background_fetch_nobody_serves_is_said_once_and_backs_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every peer pruned the history (here: no peer serves it): the background fetch is tried
    after 30 s, then 60, 120... up to 600 s apart, and said at INFO once."""
    import logging

    tries: list[float] = []

    async def main() -> None:
        async with network(tmp_path) as (w, _, new):
            j = await joined(new, w)
            j.net.peers.clear()  # nobody left to serve the history
            fetch = j.joiner._fetch_history

            async def counted(ms: MarketState, quiet: bool) -> Any:
                tries.append(trio.current_time())
                return await fetch(ms, quiet)

            j.joiner._fetch_history = counted  # type: ignore[method-assign]
            caplog.clear()
            with trio.move_on_after(3600):
                await j.joiner.history_loop(j.ms)

    with caplog.at_level(logging.INFO, logger="crdtbook.node"):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    gaps = [round(b - a) for a, b in itertools.pairwise(tries)]
    assert gaps[:5] == [60, 120, 240, 480, 600] and set(gaps[5:]) <= {600}, gaps
    said = [r for r in caplog.records if "in the background" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "INFO"


async def test_a_derivation_the_store_refused_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store refuses the derived rows once (a full disk): ``failed``, nothing marked done;
    once the retry time has come (``derive_retry_at``), ``derive_due`` says so, and the next
    try stores it all."""
    async with network(tmp_path) as (w, h, new):
        j = await joined(new, w, h)
        save = j.store.save_derived
        calls = []

        def refuse_once(*args: Any, **kwargs: Any) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise StoreWriteError("the op store is full", "full")
            save(*args, **kwargs)

        monkeypatch.setattr(j.store, "save_derived", refuse_once)
        assert await j.joiner.fetch_history(j.ms) == "done"
        assert j.ms.join_status()["history_derived"] == "failed"
        # A stored op that does not decode (a damaged file) fails it too, and crashes nothing.
        history = j.store.history
        monkeypatch.setattr(j.store, "history", lambda *a, **k: [b"\x88junk", *history(*a)])
        j.ms.derive_state = None
        assert not await derive_joined_history(j.service, j.ms)
        assert j.ms.join_status()["history_derived"] == "failed"
        monkeypatch.setattr(j.store, "history", history)
        assert derived_of(j) == 0 and not derive_due(j.service, j.ms)
        assert j.ms.derive_retry_at > trio.current_time() + 20  # DERIVE_RETRY later
        j.ms.derive_retry_at = trio.current_time()  # that time has come
        assert derive_due(j.service, j.ms)
        assert await derive_joined_history(j.service, j.ms)
        assert j.ms.join_status()["history_derived"] == "done"
        assert _past(j) == _past(w)


async def test_a_past_that_does_not_derive_the_point_is_not_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first pass only checks: a history that derives another state than the joined point
    (another node's code) writes nothing, logs once at ERROR and says so in ``status``."""
    from crdtbook import PrefixDerivation, SnapshotRefused

    def differs(self: PrefixDerivation) -> Any:
        raise SnapshotRefused("inconsistent", "derived from the history: 1 fill too many")

    monkeypatch.setattr(PrefixDerivation, "finish", differs)
    async with network(tmp_path) as (w, h, new):
        j = await joined(new, w, h)
        before = _past(j)
        assert await j.joiner.fetch_history(j.ms) == "done"
        assert j.ms.join_status()["history_derived"] == "inconsistent"
        assert _past(j) == before and derived_of(j) == 0
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "1 fill too many" in errors[0].getMessage()
        assert await j.joiner.fetch_history(j.ms) == "done"  # not tried again
        assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1


# -- hostile frames --------------------------------------------------------------------------


def test_join_frames_refuse_anything_out_of_shape() -> None:
    """Every decoder raises WireError (or JoinRefusal for a refusal) and nothing else, for
    junk, wrong types and sizes past the bounds."""
    import cbor2

    from crdtbook.node.join_wire import (
        MAX_OFFER_POINTS,
        SNAPSHOT_CHUNK_BYTES,
        JoinRefusal,
        JoinRequest,
        decode_history,
        decode_offer,
        decode_request,
        decode_snapshot,
        encode_refusal,
        encode_request,
    )
    from crdtbook.node.wire import WireError

    rng = random.Random(5)
    samples = [
        b"",
        b"\xff",
        cbor2.dumps([1, 2]),
        cbor2.dumps({"v": 2}),
        cbor2.dumps({"v": True, "k": "offer", "m": b"m" * 32}),
        cbor2.dumps({"v": 1, "k": "offer", "m": b"short"}),
        cbor2.dumps({"v": 1, "k": "nope", "m": b"m" * 32}),
        cbor2.dumps({"v": 1, "k": "history", "m": b"m" * 32, "n": -1, "i": 0}),
        cbor2.dumps({"v": 1, "k": "snapshot", "m": b"m" * 32, "n": 5, "h": b"x"}),
        cbor2.dumps({"v": 1, "p": [[1, b"h" * 32]] * (MAX_OFFER_POINTS + 1), "hb": [], "rc": []}),
        cbor2.dumps({"v": 1, "p": [[0, b"h" * 32]], "hb": [], "rc": []}),
        cbor2.dumps({"v": 1, "p": [], "hb": ["text"], "rc": []}),
        cbor2.dumps({"v": 1, "b": b"x" * (SNAPSHOT_CHUNK_BYTES + 1), "ops": [], "more": False}),
        cbor2.dumps({"v": 1, "b": b"", "ops": [b"x" * 5000], "more": False}),
        cbor2.dumps({"v": 1, "i": 0, "ops": [], "more": 1}),
        b"\x9f" * 100,  # deep nesting
    ]
    samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))) for _ in range(300)]
    for data in samples:
        for decoder in (decode_request, decode_offer, decode_snapshot, decode_history):
            with suppress(WireError, JoinRefusal):
                decoder(data)
    with pytest.raises(JoinRefusal) as refused:
        decode_offer(encode_refusal("no_point", "none"))
    assert refused.value.code == "no_point"
    request = JoinRequest("history", b"m" * 32, 10, start=3)
    assert decode_request(encode_request(request)) == request


async def test_a_malformed_request_is_counted_against_the_peer(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        node = Node(tmp_path / "n", nursery, WITNESS, "N", "snapshot")
        left, right = trio.testing.memory_stream_pair()
        client = Streams(left, "N")
        nursery.start_soon(node.joiner.serve, Streams(right, "X"))
        await client.write_frame(b"\x00junk")
        with pytest.raises(P2PError):
            await client.read_frame(1 << 20, timeout=5)
        assert node.net.rejects == [("X", "join-malformed")]
        # A market not followed: a typed refusal, not a count.
        from crdtbook.node.join_wire import JoinRefusal, JoinRequest, decode_offer, encode_request

        left, right = trio.testing.memory_stream_pair()
        client = Streams(left, "N")
        nursery.start_soon(node.joiner.serve, Streams(right, "X"))
        await client.write_frame(encode_request(JoinRequest("offer", b"z" * 32)))
        with pytest.raises(JoinRefusal):
            decode_offer(await client.read_frame(1 << 20, timeout=5))
        assert node.net.rejects == [("X", "join-malformed")]
        node.close()
        nursery.cancel_scope.cancel()


def test_the_largest_join_frames_fit_a_frame() -> None:
    """An offer at its bounds, a snapshot frame with a whole blob part, and history frames of
    the largest ops (cut as the server cuts them) all fit the frame bound."""
    from crdtbook import MAX_OP_BYTES
    from crdtbook.node.join import _op_batches
    from crdtbook.node.join_wire import (
        MAX_OFFER_HEARTBEATS,
        MAX_OFFER_POINTS,
        MAX_OFFER_RECONFIGS,
        SNAPSHOT_CHUNK_BYTES,
        SnapshotFrame,
        encode_history,
        encode_offer,
        encode_snapshot,
    )
    from crdtbook.node.join_wire import HistoryFrame as Frame
    from crdtbook.node.limits import MAX_FRAME_BYTES

    big = b"x" * MAX_OP_BYTES
    offer = Offer(
        [(1 << 40, b"h" * 32)] * MAX_OFFER_POINTS,
        [big] * MAX_OFFER_HEARTBEATS,
        [big] * MAX_OFFER_RECONFIGS,
    )
    assert len(encode_offer(offer)) <= MAX_FRAME_BYTES
    frame = SnapshotFrame(b"b" * SNAPSHOT_CHUNK_BYTES, [], True)
    assert len(encode_snapshot(frame)) <= MAX_FRAME_BYTES
    batches = _op_batches([big] * 5000)
    assert sum(map(len, batches)) == 5000
    for batch in batches:
        assert len(encode_history(Frame(1 << 40, batch, True))) <= MAX_FRAME_BYTES
        assert len(encode_snapshot(SnapshotFrame(b"", batch, True))) <= MAX_FRAME_BYTES


async def test_sessions_served_at_once_are_bounded_per_peer(tmp_path: Path) -> None:
    from crdtbook.node.join import MAX_SERVING_PER_PEER

    async with trio.open_nursery() as nursery:
        node = Node(tmp_path / "n", nursery, WITNESS, "N", "snapshot")
        clients = []
        for _ in range(MAX_SERVING_PER_PEER):  # sessions that never send their request
            left, right = trio.testing.memory_stream_pair()
            clients.append(left)
            nursery.start_soon(node.joiner.serve, Streams(right, "X"))
        await trio.testing.wait_all_tasks_blocked()
        assert node.joiner.serving == MAX_SERVING_PER_PEER
        left, right = trio.testing.memory_stream_pair()
        with trio.fail_after(5):
            await node.joiner.serve(Streams(right, "X"))  # one more: reset at once
        with pytest.raises(P2PError):
            await Streams(left, "N").read_frame(1 << 20, timeout=5)
        # Another peer is still served.
        left, right = trio.testing.memory_stream_pair()
        nursery.start_soon(node.joiner.serve, Streams(right, "Y"))
        await trio.testing.wait_all_tasks_blocked()
        assert node.joiner.serving == MAX_SERVING_PER_PEER + 1
        node.close()
        nursery.cancel_scope.cancel()
