"""Hostile ops at the node's two ingest paths, gossip (``validate_gossip`` + the apply task) and
sync (``prepare`` + ``commit``), and hostile sync requests at the responder, in process.

For every case: the input is refused with a typed error (the core's ``InvalidOp`` subclass is
remembered for its id), the refusal is counted (``MarketState.refused``, and a gossip message
with a refused op is rejected, which the network counts against the forwarder: see
test_hostile_node.py for that with real processes), the node keeps working, and no invalid op
enters the log or the store (the store, replayed into a fresh replica with every signature
checked, gives the same log).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from crdtbook import (
    BadCancel,
    BadLamport,
    BadSequence,
    BadSignature,
    BadWitness,
    Identity,
    InvalidOp,
    MalformedOp,
    Market,
    Op,
    Replica,
    UnknownKind,
    WrongMarket,
    op_id,
)
from crdtbook._ops import (
    CancelBody,
    HeartbeatBody,
    OrderBody,
    ReconfigBody,
    reconfig_message,
    sign_op,
)
from crdtbook.node.service import BAN_THRESHOLD, MarketState, NodeService
from crdtbook.node.store import OpStore
from crdtbook.node.sync import respond
from crdtbook.node.wire import (
    MAX_BATCH_OPS,
    MAX_FRAME_BYTES,
    SyncRequest,
    SyncResponse,
    WireError,
    decode_response,
    encode_batch,
    encode_request,
    encode_response,
)

pytestmark = pytest.mark.timeout(60)

ALICE = Identity.from_seed(b"a" * 32)
BOB = Identity.from_seed(b"b" * 32)
MALLORY = Identity.from_seed(b"m" * 32)
W1, W2, W3 = (Identity.from_seed(bytes([0x70 + i]) * 32) for i in range(3))
WITNESSES = tuple(sorted(w.public_key for w in (W1, W2, W3)))
V1 = Market("DEMO", "1", "1")
V2 = Market("DEMO", "1", "1", witnesses=WITNESSES)  # same name, version 2
OTHER = Market("OTHER", "1", "1")


@dataclass
class Node:
    service: NodeService
    store: OpStore

    def ms(self, market: Market) -> MarketState:
        return self.service.markets[market.id]

    async def gossip(self, market: Market, raws: list[bytes]) -> bool:
        """One gossip message through the validator, then the apply task catches up."""
        accepted = await self.service.validate_gossip(self.ms(market), encode_batch(raws), "m")
        await trio.testing.wait_all_tasks_blocked()
        return accepted

    async def sync(self, market: Market, raws: list[bytes]) -> None:
        ms = self.ms(market)
        await self.service.commit(ms, await self.service.prepare(ms, raws), "m")

    def check_log(self, market: Market) -> None:
        """The store holds exactly what the replica holds (applied or pending), and it replays
        into a fresh replica, every signature checked, with nothing refused."""
        ms = self.ms(market)
        stored = list(self.store.load_market(market.id))
        fresh = Replica(market)
        report = fresh.apply_many(stored)
        assert not report.invalid, report.invalid
        assert len(fresh) == len(ms.replica)
        assert fresh.digest() == ms.replica.digest()


@asynccontextmanager
async def node(tmp_path: Path, *markets: Market) -> AsyncIterator[Node]:
    store = OpStore.open(tmp_path / "home", synchronous="OFF")
    service = NodeService(ALICE, store, list(markets or (V1, V2, OTHER)))
    service.load_from_store()
    try:
        async with trio.open_nursery() as nursery:
            for ms in service.markets.values():
                nursery.start_soon(service.apply_loop, ms)
            yield Node(service, store)
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def order(
    who: Identity,
    market: Market,
    seq: int = 1,
    lamport: int = 1,
    parents: tuple[bytes, ...] = (),
    price: int = 100,
) -> Op:
    return sign_op(
        who, market.id, seq, lamport, parents, OrderBody("sell", price, 1), market.version
    )


def _with_signature(op: Op, signature: bytes) -> bytes:
    return op.raw[:-64] + signature


# -- cases: (name, builder(node state) -> hostile raws, expected error) -------------------------

# Each builder gets the ops the node already holds (one good order by Bob, applied first).


def forged_signature(good: Op) -> list[bytes]:
    raw = bytearray(order(MALLORY, V1, price=7).raw)
    raw[-1] ^= 1
    return [bytes(raw)]


def swapped_signatures(good: Op) -> list[bytes]:
    a, b = order(MALLORY, V1, price=1), order(MALLORY, V1, price=2)
    return [_with_signature(a, b.signature), _with_signature(b, a.signature)]


def signature_of_another_author(good: Op) -> list[bytes]:
    mine = order(MALLORY, V1, price=good.body.price)  # type: ignore[union-attr]
    return [_with_signature(mine, good.signature)]


def replayed_from_another_market(good: Op) -> list[bytes]:
    return [order(MALLORY, OTHER).raw]


def version1_op_into_version2_market(good: Op) -> list[bytes]:
    # Same name, same tick and lot, signed for the version 1 market (another id) and, forged,
    # with the version 2 market's id but version 1.
    return [
        order(MALLORY, V1, price=3).raw,
        sign_op(MALLORY, V2.id, 1, 1, (), OrderBody("sell", 3, 1), 1).raw,
    ]


def unknown_version(good: Op) -> list[bytes]:
    raw = bytearray(order(MALLORY, V1, price=4).raw)
    raw[1] = 0x07  # [7, market, ...]
    return [bytes(raw)]


def lamport_too_high(good: Op) -> list[bytes]:
    return [order(MALLORY, V1, 1, good.lamport + 7, (good.id,)).raw]


def lamport_too_low(good: Op) -> list[bytes]:
    return [order(MALLORY, V1, 1, good.lamport, (good.id,)).raw]


def sequence_gap(good: Op) -> list[bytes]:
    return [order(MALLORY, V1, 5, 1).raw]


def cancel_of_another_authors_order(good: Op) -> list[bytes]:
    body = CancelBody(good.id)
    return [sign_op(MALLORY, V1.id, 1, good.lamport + 1, (good.id,), body).raw]


def truncated_op(good: Op) -> list[bytes]:
    return [order(MALLORY, V1, price=5).raw[:-10]]


CASES: list[tuple[Callable[[Op], list[bytes]], type[InvalidOp]]] = [
    (forged_signature, BadSignature),
    (swapped_signatures, BadSignature),
    (signature_of_another_author, BadSignature),
    (replayed_from_another_market, WrongMarket),
    (version1_op_into_version2_market, WrongMarket),
    (unknown_version, UnknownKind),
    (lamport_too_high, BadLamport),
    (lamport_too_low, BadLamport),
    (sequence_gap, BadSequence),
    (cancel_of_another_authors_order, BadCancel),
    (truncated_op, MalformedOp),
]


@pytest.mark.parametrize("path", ["gossip", "sync"])
@pytest.mark.parametrize(("build", "error"), CASES, ids=[c[0].__name__ for c in CASES])
async def test_hostile_op_is_refused_counted_and_never_logged(
    tmp_path: Path, path: str, build: Callable[[Op], list[bytes]], error: type[InvalidOp]
) -> None:
    target = V2 if build is version1_op_into_version2_market else V1
    async with node(tmp_path) as n:
        good = order(BOB, target)
        assert await n.gossip(target, [good.raw])
        ms = n.ms(target)
        before = (len(ms.replica), ms.replica.digest(), ms.refused)
        hostile = build(good)
        if path == "gossip":
            assert not await n.gossip(target, hostile), "a message with an invalid op passed"
        else:
            await n.sync(target, hostile)
        replica = ms.replica
        assert ms.refused - before[2] == len(hostile)
        for raw in hostile:
            ident = op_id(raw)
            assert replica.is_invalid(ident)
            assert ident not in replica and not replica.is_pending(ident)
            assert not n.store.has(ident)
        # The typed verdict, as the core gives it for these bytes.
        fresh = Replica(target)
        fresh.apply_many([good.raw])
        with pytest.raises(error):
            for raw in hostile:
                fresh.apply(raw)
        assert (len(replica), replica.digest()) == before[:2]
        n.check_log(target)
        # The node still trades: an honest op goes through the same path.
        honest = order(ALICE, target, price=99)
        assert await n.gossip(target, [honest.raw])
        assert honest.id in ms.replica


async def test_oversize_ops_and_batches_are_refused_before_decoding(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        good = order(BOB, V1)
        big = good.raw + b"\x00" * 5000
        assert not await n.gossip(V1, [big])
        ms = n.ms(V1)
        message = encode_batch([good.raw] * (MAX_BATCH_OPS + 1))
        assert not await n.service.validate_gossip(ms, message, "m")
        assert not await n.service.validate_gossip(ms, b"\x9f" * 10_000, "m")  # nesting
        assert not await n.service.validate_gossip(ms, b"\x82\x01\x9b" + b"\xff" * 8, "m")
        assert len(ms.replica) == 0 and n.store.count(V1.id) == 0


async def test_repeated_refusals_cross_the_ban_threshold(tmp_path: Path) -> None:
    """The node's policy for the network's reject hook: the 8th refusal within a minute bans."""
    async with node(tmp_path) as n:
        verdicts = [n.service.should_ban("mallory") for _ in range(BAN_THRESHOLD)]
        assert verdicts == [False] * (BAN_THRESHOLD - 1) + [True]
        assert not n.service.should_ban("honest")


# -- witnessed markets: heartbeats and reconfigurations --------------------------------------


async def _witnessed_order(n: Node) -> Op:
    ms = n.ms(V2)
    placed = sign_op(BOB, V2.id, 1, 1, (), OrderBody("sell", 100, 1), 2)
    assert await n.gossip(V2, [placed.raw])
    assert ms.replica.frontier == 0
    return placed


@pytest.mark.parametrize("path", ["gossip", "sync"])
async def test_a_non_witness_heartbeat_is_valid_but_never_moves_the_frontier(
    tmp_path: Path, path: str
) -> None:
    async with node(tmp_path) as n:
        placed = await _witnessed_order(n)
        ms = n.ms(V2)
        beats = [
            sign_op(MALLORY, V2.id, 1, 2, (placed.id,), HeartbeatBody(123), 2),
            sign_op(BOB, V2.id, 2, 2, (placed.id,), HeartbeatBody(0), 2),
        ]
        raws = [b.raw for b in beats]
        if path == "gossip":
            assert await n.gossip(V2, raws)  # valid ops: forwarded
        else:
            await n.sync(V2, raws)
        assert all(b.id in ms.replica for b in beats)
        assert ms.replica.frontier == 0 and ms.replica.final_count == 0
        assert not ms.replica.is_final(placed.id)
        # Control: the witnesses' own heartbeats do move it.
        tip = max((b for b in beats), key=lambda o: o.lamport)
        honest = [
            sign_op(w, V2.id, 1, tip.lamport + 1, tuple(b.id for b in beats), HeartbeatBody(1), 2)
            for w in (W1, W2, W3)
        ]
        assert await n.gossip(V2, [h.raw for h in honest])
        assert ms.replica.is_final(placed.id)
        n.check_log(V2)


def _reconfig(
    author: Identity, epoch: int, keys: tuple[bytes, ...], approvals: dict[bytes, bytes], parent: Op
) -> Op:
    body = ReconfigBody(epoch, tuple(sorted(keys)), tuple(sorted(approvals.items())))
    return sign_op(author, V2.id, 1, parent.lamport + 1, (parent.id,), body, 2)


def _approve(who: Identity, epoch: int, keys: tuple[bytes, ...]) -> bytes:
    return who.sign(reconfig_message(V2.id, epoch, tuple(sorted(keys))))


NEW_SET = tuple(sorted((W1.public_key, W2.public_key)))
OTHER_SET = tuple(sorted((W1.public_key, MALLORY.public_key)))

RECONFIGS: dict[str, Callable[[Op], Op]] = {
    "by_a_non_witness": lambda p: _reconfig(
        MALLORY, 1, NEW_SET, {W2.public_key: _approve(W2, 1, NEW_SET)}, p
    ),
    "without_a_majority": lambda p: _reconfig(W1, 1, NEW_SET, {}, p),
    "forged_approval": lambda p: _reconfig(W1, 1, NEW_SET, {W2.public_key: os.urandom(64)}, p),
    "approval_of_another_set": lambda p: _reconfig(
        W1, 1, NEW_SET, {W2.public_key: _approve(W2, 1, OTHER_SET)}, p
    ),
    "approval_under_another_key": lambda p: _reconfig(
        W1, 1, NEW_SET, {W3.public_key: _approve(W2, 1, NEW_SET)}, p
    ),
    "approval_by_a_non_witness": lambda p: _reconfig(
        W1, 1, NEW_SET, {MALLORY.public_key: _approve(MALLORY, 1, NEW_SET)}, p
    ),
    "wrong_epoch": lambda p: _reconfig(
        W1, 2, NEW_SET, {W2.public_key: _approve(W2, 2, NEW_SET)}, p
    ),
    "approval_for_another_epoch": lambda p: _reconfig(
        W1, 1, NEW_SET, {W2.public_key: _approve(W2, 2, NEW_SET)}, p
    ),
}


@pytest.mark.parametrize("path", ["gossip", "sync"])
@pytest.mark.parametrize("case", sorted(RECONFIGS))
async def test_hostile_reconfiguration_is_refused(tmp_path: Path, case: str, path: str) -> None:
    async with node(tmp_path) as n:
        placed = await _witnessed_order(n)
        ms = n.ms(V2)
        bad = RECONFIGS[case](placed)
        refused = ms.refused
        if path == "gossip":
            assert not await n.gossip(V2, [bad.raw])
        else:
            await n.sync(V2, [bad.raw])
        assert ms.refused == refused + 1
        assert bad.id not in ms.replica and ms.replica.is_invalid(bad.id)
        assert not n.store.has(bad.id)
        assert ms.replica.epoch == 0 and ms.replica.witnesses() == frozenset(WITNESSES)
        fresh = Replica(V2)
        fresh.apply(placed.raw)
        with pytest.raises(BadWitness):
            fresh.apply(bad.raw)
        n.check_log(V2)


async def test_a_correct_reconfiguration_is_accepted(tmp_path: Path) -> None:
    """Control for the cases above: the same builder with a real majority works."""
    async with node(tmp_path) as n:
        placed = await _witnessed_order(n)
        good = _reconfig(W1, 1, NEW_SET, {W2.public_key: _approve(W2, 1, NEW_SET)}, placed)
        assert await n.gossip(V2, [good.raw])
        assert n.ms(V2).replica.epoch == 1
        assert n.ms(V2).replica.witnesses() == frozenset(NEW_SET)


# -- parents that never arrive -----------------------------------------------------------------


async def test_orphan_flood_keeps_the_pending_buffer_bounded_and_the_node_responsive(
    tmp_path: Path,
) -> None:
    """Ops whose parents never arrive (valid signatures, random parent ids): the pending buffer
    stays at its bound, evicting the oldest, and an honest op still applies at once."""
    bound, flood = 200, 2000
    async with node(tmp_path, V1) as n:
        ms = n.ms(V1)
        ms.replica = Replica(V1, max_pending=bound)
        orphans = [
            sign_op(MALLORY, V1.id, 2, 2, (os.urandom(32),), OrderBody("buy", 1 + i, 1)).raw
            for i in range(flood)
        ]
        for start in range(0, flood, 250):
            assert await n.gossip(V1, orphans[start : start + 250])  # valid, just early
        replica = ms.replica
        assert replica.pending_count <= bound
        assert replica.evicted == flood - replica.pending_count
        assert len(replica.missing()) <= bound
        started = time.monotonic()
        honest = order(ALICE, V1, price=50)
        assert await n.gossip(V1, [honest.raw])
        assert honest.id in replica and time.monotonic() - started < 1.0
        assert len(replica) == 1
        # The store forgets what the replica forgot: it stays bounded too (the validator
        # persists an orphan before forwarding it; the apply task drops the evicted ones).
        assert n.store.count(V1.id) == replica.pending_count + 1


# -- hostile sync requests at the responder --------------------------------------------------


class _Pipe:
    """A SyncStream stand-in: one request in, the responder's frames out."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.frames: list[bytes] = []

    async def read_frame(self, max_size: int, *, timeout: float | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        assert len(self.request) <= max_size
        return self.request

    async def write_frame(self, data: bytes, *, timeout: float | None = None) -> None:
        await trio.lowlevel.checkpoint()
        self.frames.append(data)


async def test_sync_requests_for_everything_are_served_in_bounded_frames(tmp_path: Path) -> None:
    """A request naming no heads asks for the whole log: it is streamed in frames within the
    frame and batch bounds; random heads and needed ids change nothing."""
    async with node(tmp_path, V1) as n:
        replica = n.ms(V1).replica
        for i in range(3000):
            replica.submit(
                ALICE if i % 2 else BOB, "buy" if i % 3 else "sell", 100 + i % 7, 1, "gtc", None
            )
        hostile = SyncRequest(
            V1.id, [os.urandom(32) for _ in range(4096)], [os.urandom(32) for _ in range(4096)]
        )
        for request in (SyncRequest(V1.id, []), hostile):
            pipe = _Pipe(encode_request(request))
            started = time.monotonic()
            sent, _ = await respond(pipe, lambda m: replica if m == V1.id else None)
            assert sent == len(replica)
            assert time.monotonic() - started < 5.0
            for frame in pipe.frames:
                assert len(frame) <= MAX_FRAME_BYTES
                assert len(decode_response(frame).ops) <= MAX_BATCH_OPS
        assert len(pipe.frames) >= 2


@pytest.mark.parametrize(
    "request_bytes",
    [b"", b"\xa0", b"\xa1av\x02", encode_request(SyncRequest(b"x" * 31, [])), b"\x9f" * 100],
    ids=["empty", "empty-map", "version-2", "short-market", "deep"],
)
async def test_malformed_sync_requests_raise_wire_error(
    tmp_path: Path, request_bytes: bytes
) -> None:
    async with node(tmp_path, V1) as n:
        replica = n.ms(V1).replica
        pipe = _Pipe(request_bytes)
        with pytest.raises(WireError):
            await respond(pipe, lambda m: replica)
        assert pipe.frames == []


async def test_sync_request_for_an_unknown_market_gets_a_refusal(tmp_path: Path) -> None:
    async with node(tmp_path, V1) as n:
        pipe = _Pipe(encode_request(SyncRequest(os.urandom(32), [])))
        assert await respond(pipe, lambda m: None) == (0, None)
        assert decode_response(pipe.frames[0]).error == "unknown_market"
        assert len(n.ms(V1).replica) == 0


class _StalledReader:
    """An inbound sync stream from ``peer`` asking for the whole log, whose reader never reads:
    every frame written blocks until ``release`` is set."""

    def __init__(self, peer: str, release: trio.Event) -> None:
        self.peer_id = peer
        self.release = release
        self.frames = 0
        self.was_reset = False

    async def read_frame(self, max_size: int, *, timeout: float | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return encode_request(SyncRequest(V1.id, []))

    async def write_frame(self, data: bytes, *, timeout: float | None = None) -> None:
        self.frames += 1
        await self.release.wait()

    async def reset(self) -> None:
        self.was_reset = True


async def test_a_peer_cannot_hold_more_sync_sessions_than_it_could_need(tmp_path: Path) -> None:
    """One peer opening many whole-log sessions that it never reads (Yamux allows 255 streams
    a connection, each a walk of the log and its frames): past one per market followed, plus
    one, its new streams are reset at once; other peers are still served, up to
    MAX_SYNC_SERVING sessions in all; and all are served again once the first ones end."""
    from crdtbook.node.sync_schedule import MAX_SYNC_SERVING, SyncScheduler

    async with node(tmp_path, V1, OTHER) as n:
        replica = n.ms(V1).replica
        for i in range(50):
            replica.submit(ALICE, "buy", 100 + i % 7, 1, "gtc", None)
        scheduler = SyncScheduler(n.service, _OnePeerNet())  # type: ignore[arg-type]
        release = trio.Event()
        per_peer = len(n.service.markets) + 1
        async with trio.open_nursery() as nursery:
            mallory = [_StalledReader("mallory", release) for _ in range(20)]
            for stream in mallory:
                nursery.start_soon(scheduler.serve, stream)
            await trio.testing.wait_all_tasks_blocked()
            # trio starts the tasks in no set order: which ones are served is not the point.
            assert sorted(s.frames for s in mallory) == [0] * (20 - per_peer) + [1] * per_peer
            assert all(s.was_reset == (s.frames == 0) for s in mallory)
            assert scheduler.serving == per_peer
            others = [_StalledReader(f"peer-{i}", release) for i in range(MAX_SYNC_SERVING)]
            for stream in others:
                nursery.start_soon(scheduler.serve, stream)
            await trio.testing.wait_all_tasks_blocked()
            served = MAX_SYNC_SERVING - per_peer
            assert sum(s.frames for s in others) == served
            assert sum(s.was_reset for s in others) == per_peer
            assert scheduler.serving == MAX_SYNC_SERVING
            assert scheduler.refused_busy_total == 20 - per_peer + per_peer
            release.set()
        assert scheduler.serving == 0
        again = _StalledReader("mallory", release)
        await scheduler.serve(again)
        assert again.frames == 1 and not again.was_reset


class _EmptyResponder:
    """A peer's sync stream that has nothing to give (it lacks the orphans' parents too)."""

    def __init__(self) -> None:
        self.requests = 0

    async def write_frame(self, data: bytes, *, timeout: float | None = None) -> None:
        self.requests += 1

    async def read_frame(self, max_size: int, *, timeout: float | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return encode_response(SyncResponse([], [], False))

    async def close(self) -> None:
        pass

    async def reset(self) -> None:
        pass


class _OnePeerNet:
    def __init__(self) -> None:
        self.stream = _EmptyResponder()

    async def open_stream(self, peer: str, protocol: str) -> _EmptyResponder:
        return self.stream


async def test_orphans_whose_parents_nobody_has_do_not_start_a_sync_storm(tmp_path: Path) -> None:
    """A few orphans (valid ops whose parents never arrive) kept two real nodes re-syncing
    back to back for ever (17.6% and 30.6% CPU against 1.2% idle, for 5 orphans): after every
    session ``missing()`` was still non-empty, and that alone asked for another one at once.
    A session that brought nothing must leave the next one to the sync interval."""
    from crdtbook.node.sync_schedule import SyncScheduler

    async with node(tmp_path, V1) as n:
        ms = n.ms(V1)
        orphan = sign_op(MALLORY, V1.id, 2, 2, (os.urandom(32),), OrderBody("buy", 1, 1)).raw
        assert await n.gossip(V1, [orphan])
        assert ms.replica.missing()
        net = _OnePeerNet()
        peer = SyncScheduler(n.service, net)  # type: ignore[arg-type]
        await peer.sync_one("peer", ms)
        assert net.stream.requests == 1
        assert not peer.sync_now.is_set(), "an empty session asked for another one at once"
