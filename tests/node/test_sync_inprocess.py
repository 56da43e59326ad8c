"""One sync session in process (issue #13): ``pull`` and ``respond`` (node/sync.py) on the two
ends of an in-memory stream, the initiator ingesting through ``NodeService.prepare`` and
``commit`` as the node does.

The responder holds a plain replica; the initiator is a service over a store in ``tmp_path``.
Frames cross a trio in-memory stream pair through ``Frames``, a stand-in for node/p2p.py's
FrameStream (length-prefixed frames, the same read_frame/write_frame/close/reset interface).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from crdtbook import Replica
from crdtbook.node.sync import MarketNotFollowed, build_request, pull, respond
from crdtbook.node.wire import MAX_BATCH_OPS, SyncResponse, decode_response, encode_response

from .test_hostile_inputs import ALICE, BOB, MALLORY, V1, Node, order
from .test_service_inprocess import bare, chain

pytestmark = pytest.mark.timeout(10)

StreamPair = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]
PAIRS: dict[str, StreamPair] = {
    "memory": trio.testing.memory_stream_pair,
    "lockstep": trio.testing.lockstep_stream_pair,
}


class Frames:
    """FrameStream's interface over a trio stream: 4-byte big-endian length, then the frame.
    Records the frames it writes."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self.written: list[bytes] = []

    async def write_frame(self, data: bytes, *, timeout: float | None = None) -> None:
        with trio.fail_after(20.0 if timeout is None else timeout):
            await self._stream.send_all(len(data).to_bytes(4, "big") + data)
        self.written.append(data)

    async def _fill(self, size: int) -> None:
        while len(self._buf) < size:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise EOFError("stream closed mid-frame")
            self._buf += chunk

    async def read_frame(self, max_size: int, *, timeout: float | None = None) -> bytes:
        with trio.fail_after(20.0 if timeout is None else timeout):
            await self._fill(4)
            size = int.from_bytes(self._buf[:4], "big")
            if size > max_size:
                raise ValueError(f"frame of {size} bytes exceeds {max_size}")
            await self._fill(4 + size)
            frame = bytes(self._buf[4 : 4 + size])
            del self._buf[: 4 + size]
            return frame

    async def close(self) -> None:
        await self._stream.aclose()

    async def reset(self) -> None:
        await trio.aclose_forcefully(self._stream)


async def session(
    n: Node, server: Replica, pair: StreamPair = trio.testing.memory_stream_pair, **kw: Any
) -> tuple[tuple[int, list[bytes]], tuple[int, bytes | None], Frames]:
    """One session: ``n`` pulls V1 from ``server``. Returns pull's and respond's results and
    the responder's end (its frames)."""
    ms = n.ms(V1)
    left, right = pair()
    ours, theirs = Frames(left), Frames(right)
    served: list[tuple[int, bytes | None]] = []

    async def serve() -> None:
        served.append(await respond(theirs, lambda m: server if m == server.market.id else None))
        await theirs.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        pulled = await pull(
            ours,
            ms.replica,
            lambda raws: n.service.prepare(ms, raws),
            lambda prepared: n.service.commit(ms, prepared, "peer"),
            **kw,
        )
    await ours.close()
    return pulled, served[0], theirs


def holding(*ops: Any) -> Replica:
    replica = Replica(V1)
    report = replica.apply_many(list(ops))
    assert not report.invalid and report.pending == 0
    return replica


async def test_an_empty_node_gets_everything_in_one_session(tmp_path: Any) -> None:
    ops = [*chain(BOB, 5), *chain(MALLORY, 4, first_price=200)]
    server = holding(*ops)
    async with bare(tmp_path) as n:
        (received, unknown), (sent, market), frames = await session(n, server)
        ms = n.ms(V1)
        assert (received, unknown) == (9, [])
        assert (sent, market) == (9, V1.id)
        assert len(frames.written) == 1 and decode_response(frames.written[0]).more is False
        assert ms.replica.digest() == server.digest()
        assert all(n.store.has(op.id) for op in ops)
        assert ms.received == 9 and ms.refused == 0
        n.check_log(V1)
        # A second session finds nothing missing.
        (received, unknown), (sent, _), _ = await session(n, server)
        assert (received, sent, unknown) == (0, 0, [])


async def test_only_what_the_initiator_lacks_is_sent(tmp_path: Any) -> None:
    common = chain(BOB, 6)
    theirs = [order(MALLORY, V1, 1, 7, (common[-1].id,), price=300)]
    mine = order(ALICE, V1, 1, 7, (common[-1].id,), price=50)
    server = holding(*common, *theirs)
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        ms.replica.apply_many([*common, mine])
        (received, unknown), (sent, _), frames = await session(n, server)
        assert received == sent == 1 and unknown == []
        assert decode_response(frames.written[0]).ops == [theirs[0].raw]
        assert theirs[0].id in ms.replica and mine.id in ms.replica
        assert len(ms.replica) == len(server) + 1


async def test_pending_ops_name_their_missing_parents(tmp_path: Any) -> None:
    """An op held pending (its parent lost) is asked for in ``need`` and released."""
    a, b, c = chain(BOB, 3)
    server = holding(a, b, c)
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        ms.replica.apply_many([a, c])
        assert ms.replica.missing() == [b.id]
        assert build_request(ms.replica).need == [b.id]
        (received, _), _, _ = await session(n, server)
        assert received >= 1
        assert not ms.replica.is_pending(c.id) and len(ms.replica) == 3
        assert ms.replica.digest() == server.digest()


@pytest.mark.parametrize("pair", sorted(PAIRS))
async def test_a_long_log_streams_in_several_frames(tmp_path: Any, pair: str) -> None:
    server = Replica(V1)
    for i in range(MAX_BATCH_OPS + 300):
        server.submit(
            BOB if i % 2 else ALICE, "buy" if i % 3 else "sell", 90 + i % 20, 1, "gtc", None
        )
    async with bare(tmp_path) as n:
        (received, unknown), (sent, _), frames = await session(n, server, PAIRS[pair])
        assert received == sent == len(server) and unknown == []
        flags = [decode_response(f).more for f in frames.written]
        assert flags == [True] * (len(flags) - 1) + [False] and len(flags) >= 2
        assert n.ms(V1).replica.digest() == server.digest()
        assert n.store.count(V1.id) == len(server)


async def test_a_market_the_peer_does_not_follow(tmp_path: Any) -> None:
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        left, right = trio.testing.memory_stream_pair()
        ours, theirs = Frames(left), Frames(right)
        served: list[tuple[int, bytes | None]] = []

        async def serve() -> None:
            served.append(await respond(theirs, lambda m: None))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with pytest.raises(MarketNotFollowed):
                await pull(
                    ours,
                    ms.replica,
                    lambda raws: n.service.prepare(ms, raws),
                    lambda prepared: n.service.commit(ms, prepared, "peer"),
                )
        assert served == [(0, None)] and len(ms.replica) == 0


async def test_a_silent_peer_times_out_on_the_frame_timeout(
    tmp_path: Any, autojump_clock: trio.testing.MockClock
) -> None:
    async with bare(tmp_path) as n:
        left, _right = trio.testing.memory_stream_pair()  # the peer never answers
        ms = n.ms(V1)
        started = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await pull(
                Frames(left),
                ms.replica,
                lambda raws: n.service.prepare(ms, raws),
                lambda prepared: n.service.commit(ms, prepared, "peer"),
                frame_timeout=7.0,
            )
        assert trio.current_time() - started == pytest.approx(7.0)


async def test_invalid_ops_from_the_responder_are_refused(tmp_path: Any) -> None:
    """A lying responder: its frame carries a forged op next to a good one."""
    good = order(BOB, V1)
    forged = bytearray(order(MALLORY, V1, price=7).raw)
    forged[-1] ^= 1
    async with bare(tmp_path) as n:
        ms = n.ms(V1)
        left, right = trio.testing.memory_stream_pair()
        ours, theirs = Frames(left), Frames(right)

        async def liar() -> None:
            await theirs.read_frame(1 << 22)
            await theirs.write_frame(
                encode_response(SyncResponse([good.raw, bytes(forged)], [os.urandom(32)], False))
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(liar)
            received, unknown = await pull(
                ours,
                ms.replica,
                lambda raws: n.service.prepare(ms, raws),
                lambda prepared: n.service.commit(ms, prepared, "liar"),
            )
        assert received == 2 and len(unknown) == 1  # a head it names but never sent
        assert good.id in ms.replica and ms.refused == 1
        n.check_log(V1)
