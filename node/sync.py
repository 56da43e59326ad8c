"""The sync protocol `/crdtbook/sync/1.0.0`: what guarantees delivery (gossip is best effort).

One session = one stream:

1. The initiator sends a request: the market, its heads, the ids it knows it lacks (parents of
   its pending ops) and a Bloom filter of its most recent ops.
2. The responder walks back from its own heads until every path meets the initiator's past
   (``crdtbook.ops_missing_for``), adds the needed ops it has, and streams the result in total
   order (parents first) in frames of at most ``MAX_BATCH_OPS`` ops, the last with more=false.
3. The initiator verifies and applies each frame as it arrives.

When little is missing this is one round trip; when much is, it is one walk and a stream at bulk
speed. A Bloom false positive or a concurrent change leaves the initiator with ops whose parents
are missing; its next session names them in ``need``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Final, Protocol, TypeVar
from weakref import WeakKeyDictionary

import trio

from crdtbook import BloomFilter, Op, Replica, SlidingBloom, ops_missing_for

from .limits import (
    BLOOM_RECENT_OPS,
    MAX_AUTHORS,
    MAX_BATCH_OPS,
    MAX_FRAME_BYTES,
    MAX_HELD,
    MAX_IDS,
)
from .wire import (
    SyncRequest,
    SyncResponse,
    WireError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)

__all__ = ["SyncStream", "build_request", "pull", "respond"]


P = TypeVar("P")

#: A frame in flight should not wait for ever on a stalled peer.
FRAME_TIMEOUT: Final = 20.0
#: Frames read ahead of the one being ingested: enough to keep the stream busy.
READ_AHEAD_FRAMES: Final = 2
#: Leave room under the frame limit for the CBOR envelope and the heads list.
_FRAME_BUDGET: Final = MAX_FRAME_BYTES - 64 * 1024


class SyncStream(Protocol):
    async def write_frame(self, data: bytes, *, timeout: float | None = None) -> None: ...
    async def read_frame(self, max_size: int, *, timeout: float | None = None) -> bytes: ...


#: Each replica's filter of its recent ops, updated from one request to the next rather than
#: built afresh (``SlidingBloom``: the same bits at a twentieth of the cost).
_recent_blooms: WeakKeyDictionary[Replica, SlidingBloom] = WeakKeyDictionary()


def build_request(replica: Replica, wanted: Iterable[bytes] = ()) -> SyncRequest:
    """What this replica has, in a few KB: heads, ids it lacks (missing parents and ``wanted``,
    e.g. heads a peer named last time), recent ops' Bloom filter, per-author sequence numbers."""
    bloom = None
    if len(replica):
        recent = _recent_blooms.get(replica)
        if recent is None:
            recent = _recent_blooms[replica] = SlidingBloom()
        start = max(0, len(replica) - BLOOM_RECENT_OPS)
        bloom = recent.filter_of(op.id for op in replica.iter_ops(start))
    need = replica.missing()
    need += [ident for ident in wanted if not replica.knows(ident)]
    pending = replica.pending_ids(MAX_HELD)
    return SyncRequest(
        replica.market.id,
        replica.heads()[:MAX_IDS],
        need[:MAX_IDS],
        bloom,
        replica.author_seqs(MAX_AUTHORS),
        BloomFilter.for_ids(pending) if pending else None,
    )


def _chunks(ops: list[Op]) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    size = 0
    for op in ops:
        # Rebuilt on each read (an Op holds no bytes): read it once. Rebuilding measured 0.7 us
        # an op, less than reading the store's copy (a SQLite lookup, several us), so the
        # responder re-encodes on purpose; the bytes are identical (canonical encoding).
        raw = op.raw
        if batch and (len(batch) >= MAX_BATCH_OPS or size + len(raw) > _FRAME_BUDGET):
            yield batch
            batch, size = [], 0
        batch.append(raw)
        size += len(raw)
    yield batch


def ops_for(replica: Replica, request: SyncRequest) -> list[Op]:
    """The ops to send for ``request``, in total order."""
    ops = ops_missing_for(
        replica.applied_index,
        replica.heads(),
        request.heads,
        request.bloom,
        their_seqs=request.seqs,
        forked=replica.forked_authors(),
        held=request.held,
    )
    applied = replica.applied_index
    # A needed op may be compacted: read back from the archive (``applied[...]`` does), so a
    # node that joined from a snapshot gets a prefix op that a late op names (it then waits
    # for the history there). An id held nowhere costs one store lookup on a compacted node.
    needed = []
    for ident in request.need:
        try:
            needed.append(applied[ident].id)
        except KeyError:
            continue
    if needed:
        # A needed op and the past of it the peer lacks. The walk above stops at a Bloom false
        # positive, and on a chain (one author's ops) everything below it is hidden; the same
        # filter would hide it again next time, so a fetch of the needed op alone would bring
        # one op per round trip. Walk from the needed ops without the filter.
        past = ops_missing_for(
            replica.applied_index,
            needed,
            request.heads,
            None,
            their_seqs=request.seqs,
            forked=replica.forked_authors(),
            held=request.held,
        )
        union = {op.id: op for op in ops}
        size = len(union)
        for op in [*past, *map(applied.__getitem__, needed)]:
            union.setdefault(op.id, op)
        if len(union) > size:
            ops = sorted(union.values(), key=lambda o: o.key)
    return ops


async def respond(
    stream: SyncStream,
    replicas: Callable[[bytes], Replica | None],
    *,
    frame_timeout: float = FRAME_TIMEOUT,
) -> tuple[int, bytes | None]:
    """Serve one session. Returns (ops sent, market id or None). Each frame read or written
    is bounded by ``frame_timeout``; the caller bounds the whole session."""
    request = decode_request(await stream.read_frame(MAX_FRAME_BYTES, timeout=frame_timeout))
    replica = replicas(request.market)
    if replica is None:
        await stream.write_frame(
            encode_response(SyncResponse([], [], False, "unknown_market", "not followed here")),
            timeout=frame_timeout,
        )
        return 0, None
    ops = ops_for(replica, request)
    heads = replica.heads()[:MAX_IDS]
    # Each frame's bytes are built as it goes out, not all before the first: a whole-log
    # session to a slow reader holds one frame's bytes, not the log's (the Op objects it sends
    # are the replica's own).
    chunks = _chunks(ops)
    chunk = next(chunks)
    for following in chunks:
        await stream.write_frame(
            encode_response(SyncResponse(chunk, heads, True)), timeout=frame_timeout
        )
        chunk = following
    await stream.write_frame(
        encode_response(SyncResponse(chunk, heads, False)), timeout=frame_timeout
    )
    return len(ops), request.market


class MarketNotFollowed(Exception):
    """The peer does not follow the market we asked about."""


async def pull(
    stream: SyncStream,
    replica: Replica,
    prepare: Callable[[list[bytes]], Awaitable[P]],
    commit: Callable[[P], Awaitable[object]],
    wanted: Iterable[bytes] = (),
    *,
    frame_timeout: float = FRAME_TIMEOUT,
) -> tuple[int, list[bytes]]:
    """Run one session as the initiator. Each received frame goes through ``prepare`` (verify)
    as it is read, then ``commit`` (apply, persist) in order: frame k+1 is verified while
    frame k commits.

    Each frame read or written is bounded by ``frame_timeout``; the caller bounds the whole
    session. Returns the number of ops received and the responder's heads that we still do not know
    (ops withheld by a wrong hint, or newer than its walk): name them in the next request.
    Raises ``MarketNotFollowed``, ``WireError``, the stream's errors or ``commit``'s (each as
    itself, not in an ExceptionGroup).
    """
    request = build_request(replica, wanted)
    await stream.write_frame(encode_request(request), timeout=frame_timeout)
    their_heads: list[bytes] = []
    received = 0
    # Read the next frame while the previous one is verified and applied (bulk catch-up).
    send, receive = trio.open_memory_channel[tuple[int, P]](READ_AHEAD_FRAMES)
    failure: list[Exception] = []  # raised after the nursery, not wrapped in an ExceptionGroup

    async def read_frames() -> None:
        async with send:
            try:
                while True:
                    frame = await stream.read_frame(MAX_FRAME_BYTES, timeout=frame_timeout)
                    response = decode_response(frame)
                    if response.error == "unknown_market":
                        raise MarketNotFollowed(response.message)
                    if response.error is not None:
                        raise WireError(f"peer refused sync: {response.error} {response.message}")
                    their_heads[:] = response.heads
                    if response.ops:
                        await send.send((len(response.ops), await prepare(response.ops)))
                    if not response.more:
                        return
            except Exception as exc:  # handed to the caller below
                failure.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_frames)
        async with receive:
            async for count, prepared in receive:
                received += count
                try:
                    await commit(prepared)
                except Exception as exc:  # e.g. the store refusing writes: as the reader's
                    failure.append(exc)
                    nursery.cancel_scope.cancel()
                    break
    if failure:
        raise failure[0]
    return received, [h for h in their_heads if not replica.knows(h)]
