"""Frames the node sends: gossip batches and sync messages (CBOR, bounded).

Ops travel as their canonical encoding, the one encoding a valid op has (a receiver refuses any
other), so their ids survive every hop. Gossip sends the bytes an op was stored with; the sync
responder rebuilds them from the op it holds (``Op.raw``), which gives the same bytes.

Gossip message (one per flush of a market's outbound queue)::

    [1, [op_bytes, ...]]

Sync request (initiator -> responder) and response, each one length-prefixed frame::

    {"v": 1, "m": market_id, "h": [head ids], "n": [needed ids],
     "bf": bloom bits, "bk": bloom hash count, "vv": {author: seq},
     "pf": pending-ops bloom bits, "pk": its hash count}       request
    {"v": 1, "ops": [op_bytes, ...], "h": [head ids], "more": bool}   response
    {"v": 1, "err": code, "msg": text}                    refusal
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import cbor2

from crdtbook import MAX_OP_BYTES, BloomFilter

# The bounds are the shell's (node.limits), with their reasons; named here too for importers.
from .limits import (
    MAX_AUTHORS,
    MAX_BATCH_OPS,
    MAX_BLOOM_BYTES,
    MAX_FRAME_BYTES,
    MAX_GOSSIP_BYTES,
    MAX_IDS,
)

__all__ = [
    "GOSSIP_VERSION",
    "MAX_BATCH_OPS",
    "MAX_FRAME_BYTES",
    "SYNC_PROTOCOL",
    "SyncRequest",
    "SyncResponse",
    "WireError",
    "decode_batch",
    "decode_request",
    "decode_response",
    "encode_batch",
    "encode_request",
    "encode_response",
]

GOSSIP_VERSION: Final = 1
SYNC_PROTOCOL: Final = "/crdtbook/sync/1.0.0"


class WireError(ValueError):
    """A peer's frame that does not follow the format; the peer gets no further service."""


def encode_batch(ops: list[bytes]) -> bytes:
    return cbor2.dumps([GOSSIP_VERSION, ops])


def decode_batch(data: bytes) -> list[bytes]:
    if len(data) > MAX_GOSSIP_BYTES:  # pubsub carries no more; nor does a node's flush build it
        raise WireError("gossip message too large")
    try:
        frame = cbor2.loads(data, max_depth=4)
    except Exception as exc:  # any decoder failure on hostile bytes
        raise WireError(f"gossip message is not CBOR: {exc}") from None
    if (
        type(frame) is not list
        or len(frame) != 2
        or type(frame[0]) is not int  # 1.0 and True equal 1 in Python: not version 1
        or frame[0] != GOSSIP_VERSION
        or type(frame[1]) is not list
    ):
        raise WireError("gossip message is not [1, [ops]]")
    ops = frame[1]
    if len(ops) > MAX_BATCH_OPS:
        raise WireError(f"gossip batch of {len(ops)} ops exceeds {MAX_BATCH_OPS}")
    for op in ops:
        if type(op) is not bytes or len(op) > MAX_OP_BYTES:
            raise WireError("gossip batch item is not an op's bytes")
    return ops


@dataclass
class SyncRequest:
    market: bytes
    heads: list[bytes]
    need: list[bytes] = field(default_factory=list)
    bloom: BloomFilter | None = None
    seqs: dict[bytes, int] | None = None  # author -> highest seq held (non-equivocating)
    held: BloomFilter | None = None  # ops held without their whole past (pending)


@dataclass
class SyncResponse:
    ops: list[bytes]
    heads: list[bytes]
    more: bool
    error: str | None = None
    message: str = ""


def _ids(value: Any, what: str) -> list[bytes]:
    if type(value) is not list or len(value) > MAX_IDS:
        raise WireError(f"{what} must be a list of at most {MAX_IDS} ids")
    for item in value:
        if type(item) is not bytes or len(item) != 32:
            raise WireError(f"{what} must hold 32-byte ids")
    return value


def _load_map(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_FRAME_BYTES:
        raise WireError("sync frame too large")
    try:
        frame = cbor2.loads(data, max_depth=4)
    except Exception as exc:
        raise WireError(f"sync frame is not CBOR: {exc}") from None
    if type(frame) is not dict or type(frame.get("v")) is not int or frame["v"] != 1:
        raise WireError("sync frame is not a version 1 map")
    return frame


def encode_request(req: SyncRequest) -> bytes:
    frame: dict[str, Any] = {"v": 1, "m": req.market, "h": req.heads, "n": req.need}
    if req.bloom is not None:
        frame["bf"] = bytes(req.bloom.bits)
        frame["bk"] = req.bloom.hashes
    if req.seqs is not None:
        frame["vv"] = req.seqs
    if req.held is not None:
        frame["pf"] = bytes(req.held.bits)
        frame["pk"] = req.held.hashes
    return cbor2.dumps(frame)


def decode_request(data: bytes) -> SyncRequest:
    frame = _load_map(data)
    market = frame.get("m")
    if type(market) is not bytes or len(market) != 32:
        raise WireError("sync request names no market")
    bloom = _bloom(frame, "bf", "bk")
    held = _bloom(frame, "pf", "pk")
    seqs = frame.get("vv")
    if seqs is not None:
        if type(seqs) is not dict or len(seqs) > MAX_AUTHORS:
            raise WireError(f"sync request author summary must be a map of <= {MAX_AUTHORS}")
        for author, seq in seqs.items():
            if type(author) is not bytes or len(author) != 32 or type(seq) is not int or seq < 0:
                raise WireError("sync request author summary maps 32-byte keys to seqs")
    return SyncRequest(
        market, _ids(frame.get("h"), "heads"), _ids(frame.get("n", []), "need"), bloom, seqs, held
    )


def _bloom(frame: dict[str, Any], bits_key: str, hashes_key: str) -> BloomFilter | None:
    if bits_key not in frame:
        return None
    bits, hashes = frame.get(bits_key), frame.get(hashes_key)
    if type(bits) is not bytes or not 8 <= len(bits) <= MAX_BLOOM_BYTES:
        raise WireError("sync request Bloom filter has a bad size")
    if type(hashes) is not int:
        raise WireError("sync request Bloom filter has no hash count")
    try:
        return BloomFilter(len(bits) * 8, hashes, bits)
    except ValueError as exc:
        raise WireError(str(exc)) from None


def encode_response(resp: SyncResponse) -> bytes:
    if resp.error is not None:
        return cbor2.dumps({"v": 1, "err": resp.error, "msg": resp.message})
    return cbor2.dumps({"v": 1, "ops": resp.ops, "h": resp.heads, "more": resp.more})


def decode_response(data: bytes) -> SyncResponse:
    frame = _load_map(data)
    if "err" in frame:
        return SyncResponse([], [], False, str(frame.get("err"))[:64], str(frame.get("msg"))[:200])
    ops = frame.get("ops")
    if type(ops) is not list or len(ops) > MAX_BATCH_OPS:
        raise WireError("sync response ops must be a list within the batch bound")
    for op in ops:
        if type(op) is not bytes or len(op) > MAX_OP_BYTES:
            raise WireError("sync response item is not an op's bytes")
    more = frame.get("more")
    if type(more) is not bool:
        raise WireError("sync response lacks 'more'")
    return SyncResponse(ops, _ids(frame.get("h"), "heads"), more)
