"""What a sync protocol needs from a replica, still without I/O.

A peer describes what it has by its heads and, optionally, a Bloom filter of the ids of its recent
ops (after Kleppmann and Howard, "Byzantine Eventual Consistency", arXiv 2012.00472). From that,
``ops_missing_for`` finds the ops the peer lacks by walking back from our heads in decreasing
Lamport time, and stops as soon as every path has reached the peer's causal past. The cost is
the size of the difference plus its frontier, not the size of the log.

A Bloom false positive makes us withhold an op the peer lacks (and its ancestors that only it
leads to); the peer then sees children whose parents are missing and asks for those ids, so
false positives cost a round trip, never correctness.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Container, Iterable, Mapping
from typing import Final

from ._ops import Op

__all__ = ["BloomFilter", "SlidingBloom", "ops_missing_for"]

_MAX_BLOOM_BYTES: Final = 1 << 20  # 1 MiB: 8M bits, ~800k ids at 1% false positives
_MAX_HASHES: Final = 16
#: Hash positions per id in ``BloomFilter.for_ids``: with 10 bits an id, ~1% false positives.
_FOR_IDS_HASHES: Final = 7
#: The two big-endian 32-bit words a and b at the start of an id (see ``BloomFilter``).
_two_words = struct.Struct(">II").unpack_from


class BloomFilter:
    """A Bloom filter over op ids. Op ids are SHA-256 outputs already, so no hashing is needed:
    with a = id[0:4] and b = id[4:8] | 1 (big-endian), position i is (a + i*b) mod size
    (double hashing), the same bits in every implementation."""

    __slots__ = ("bits", "hashes", "size")

    def __init__(self, size_bits: int, hashes: int, bits: bytes | None = None) -> None:
        if not 8 <= size_bits <= _MAX_BLOOM_BYTES * 8 or size_bits % 8:
            raise ValueError("a Bloom filter has a positive multiple of 8 bits, at most 8 Mi")
        if not 1 <= hashes <= _MAX_HASHES:
            raise ValueError(f"a Bloom filter uses 1 to {_MAX_HASHES} hash positions")
        if bits is not None and len(bits) != size_bits // 8:
            raise ValueError("Bloom filter bits do not match its size")
        self.size = size_bits
        self.hashes = hashes
        self.bits = bytearray(bits) if bits is not None else bytearray(size_bits // 8)

    @classmethod
    def for_ids(cls, ids: Iterable[bytes], *, bits_per_id: int = 10) -> BloomFilter:
        """A filter holding ``ids``; 10 bits per id with 7 hashes gives ~1% false positives."""
        id_list = list(ids)
        size = _size_for(len(id_list), bits_per_id)
        bloom = cls(size, _FOR_IDS_HASHES)
        # add(), inlined: a sync request builds this over thousands of ids, often per second.
        bits = bloom.bits
        unpack = _two_words
        for ident in id_list:
            a, b = unpack(ident)
            b |= 1
            for i in range(_FOR_IDS_HASHES):
                pos = (a + i * b) % size
                bits[pos >> 3] |= 1 << (pos & 7)
        return bloom

    def _positions(self, ident: bytes) -> list[int]:
        a = int.from_bytes(ident[0:4], "big")
        b = int.from_bytes(ident[4:8], "big") | 1
        return [(a + i * b) % self.size for i in range(self.hashes)]

    def add(self, ident: bytes) -> None:
        for pos in self._positions(ident):
            self.bits[pos >> 3] |= 1 << (pos & 7)

    def __contains__(self, ident: object) -> bool:
        if not isinstance(ident, bytes) or len(ident) < 8:
            return False
        bits = self.bits
        return all(bits[pos >> 3] & (1 << (pos & 7)) for pos in self._positions(ident))


def _size_for(count: int, bits_per_id: int) -> int:
    """Bits of ``BloomFilter.for_ids``'s filter for ``count`` ids: whole bytes, 64 at least."""
    return min(max(64, ((count * bits_per_id + 7) // 8) * 8), _MAX_BLOOM_BYTES * 8)


class SlidingBloom:
    """``BloomFilter.for_ids`` of a set of ids that changes a little between calls, kept up to
    date instead of rebuilt.

    A sync request carries the filter of the replica's newest ops (``BLOOM_RECENT_OPS``, 2,048:
    node/sync.py), and a node sends one to a few peers every few seconds. Built afresh, that is
    14,336 bit positions in pure Python, ~2 ms (py-spy put it at ~5% of a node's CPU in a
    20-node network, issue #12). Between two requests a few ops enter the window and as many
    leave, so this keeps, for each bit, how many ids of the set hash to it, and updates the
    counts and bits of the ids that entered or left only. The bits are those of ``for_ids``
    of the same ids, always: a filter is the OR of its members' positions, and a bit is set
    exactly while its count is positive. A call costs the set difference, ~0.1 ms for 2,048
    ids. Memory: one int per bit (20,480 for 2,048 ids)."""

    __slots__ = ("_bits", "_bits_per_id", "_counts", "_members", "_size")

    def __init__(self, bits_per_id: int = 10) -> None:
        self._bits_per_id = bits_per_id
        self._size = 0
        self._counts: list[int] = []
        self._bits = bytearray()
        self._members: set[bytes] = set()

    def filter_of(self, ids: Iterable[bytes]) -> BloomFilter:
        """The filter ``BloomFilter.for_ids(ids)`` returns (the same bits), from the last one."""
        current = set(ids)
        size = _size_for(len(current), self._bits_per_id)
        if size != self._size:  # another size: every position moves, start afresh
            self._size = size
            self._counts = [0] * size
            self._bits = bytearray(size // 8)
            self._members = set()
        counts, bits, unpack = self._counts, self._bits, _two_words
        for ident in self._members - current:
            a, b = unpack(ident)
            b |= 1
            for i in range(_FOR_IDS_HASHES):
                pos = (a + i * b) % size
                counts[pos] -= 1
                if not counts[pos]:
                    bits[pos >> 3] &= ~(1 << (pos & 7))
        for ident in current - self._members:
            a, b = unpack(ident)
            b |= 1
            for i in range(_FOR_IDS_HASHES):
                pos = (a + i * b) % size
                counts[pos] += 1
                bits[pos >> 3] |= 1 << (pos & 7)
        self._members = current
        return BloomFilter(size, _FOR_IDS_HASHES, bytes(bits))


_THEIRS = 1  # in the peer's causal past (or said to be, by the Bloom filter)
_OURS = 2  # reached from our heads only, so far


def ops_missing_for(
    applied: Mapping[bytes, Op],
    our_heads: Iterable[bytes],
    their_heads: Iterable[bytes],
    bloom: BloomFilter | None = None,
    limit: int | None = None,
    their_seqs: Mapping[bytes, int] | None = None,
    forked: Container[bytes] = (),
    held: Container[bytes] | None = None,
) -> list[Op]:
    """The ops we have that a peer with ``their_heads`` (and ``bloom``) lacks, in total order.

    Heads of theirs that we do not know are ignored (they are ops the peer will send us). With
    ``limit``, only the first ``limit`` ops in total order: a causally closed prefix, so the peer
    can apply them, send its new heads and get the rest.

    ``their_seqs`` (author -> highest sequence number the peer holds of that author) says the
    peer has every op of that author up to that seq: an author's ops form a chain, and a replica
    holds the causal past of all it holds. Authors in ``forked`` (seen equivocating here) are
    not judged by it. Like the Bloom filter it is a hint that may be wrong for an equivocation
    nobody has seen yet; the peer repairs that by asking for heads it does not know.

    ``held`` (e.g. a Bloom filter of the peer's pending ops) names ops the peer holds without
    their whole past: they are not sent, but the walk goes on through them, since some of their
    ancestors are exactly what the peer lacks.
    """
    mark: dict[bytes, int] = {}
    heap: list[tuple[int, bytes]] = []
    ours_queued = 0
    for head in their_heads:
        op = applied.get(head)
        if op is not None and head not in mark:
            mark[head] = _THEIRS
            heapq.heappush(heap, (-op.lamport, head))
    for head in our_heads:
        if head not in mark:
            mark[head] = _OURS
            ours_queued += 1
            heapq.heappush(heap, (-applied[head].lamport, head))

    missing: list[Op] = []
    while heap and ours_queued:
        _, ident = heapq.heappop(heap)
        op = applied[ident]
        flag = mark[ident]
        if flag == _OURS:
            ours_queued -= 1
            if (bloom is not None and ident in bloom) or (
                their_seqs is not None
                and their_seqs.get(op.author, 0) >= op.seq
                and op.author not in forked
            ):
                flag = _THEIRS
            elif held is None or ident not in held:
                missing.append(op)
        for parent in op.parents:
            seen = mark.get(parent)
            if seen is None:
                try:
                    lamport = applied[parent].lamport  # a compacted one: from the archive
                except KeyError:  # compacted and not archived: nothing of it to send
                    continue
                mark[parent] = flag
                if flag == _OURS:
                    ours_queued += 1
                heapq.heappush(heap, (-lamport, parent))
            elif seen == _OURS and flag == _THEIRS:
                mark[parent] = _THEIRS
                ours_queued -= 1
    missing.sort(key=lambda o: (o.lamport, o.id))
    return missing if limit is None else missing[:limit]
