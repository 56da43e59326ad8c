"""Frames of the join protocol `/crdtbook/join/1.0.0` (CBOR maps, bounded; specs/join.md).

A node that joins a witnessed market from a snapshot asks its peers three things, each in a
session of its own (one stream: one request frame, then one or more response frames):

    {"v": 1, "k": "offer", "m": market}
        -> {"v": 1, "p": [[point, sha256 of its blob], ...], "hb": [heartbeat op bytes],
            "rc": [reconfiguration op bytes]}           (the newest point first; []: none)
    {"v": 1, "k": "snapshot", "m": market, "n": point, "h": hash}
        -> {"v": 1, "b": blob bytes, "ops": [kept op bytes], "more": bool}   (repeated)
    {"v": 1, "k": "history", "m": market, "n": point, "i": start}
        -> {"v": 1, "i": first index, "ops": [op bytes in total order], "more": bool} (repeated)
    any  -> {"v": 1, "err": code, "msg": text}                           refusal

Nothing here is trusted: the offer's heartbeats and reconfigurations are checked by the core
(``crdtbook.check_attested``), the blob by its hash and their attestation, the kept ops by their
ids (listed in the blob), the history by the attested chain (``crdtbook.HistoryCheck``). This
module only bounds sizes and shapes, so a peer's frame can cost at most what the bounds allow;
anything out of shape is a ``WireError`` (the peer is counted, as a malformed sync frame is).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

import cbor2

from crdtbook import MAX_OP_BYTES, MAX_WITNESSES

from .limits import MAX_BATCH_OPS, MAX_FRAME_BYTES
from .wire import WireError

__all__ = [
    "JOIN_PROTOCOL",
    "MAX_HISTORY_SESSION_OPS",
    "MAX_KEPT_OPS",
    "MAX_OFFER_HEARTBEATS",
    "MAX_OFFER_POINTS",
    "MAX_OFFER_RECONFIGS",
    "MAX_SNAPSHOT_BYTES",
    "SNAPSHOT_CHUNK_BYTES",
    "HistoryFrame",
    "JoinRefusal",
    "JoinRequest",
    "Offer",
    "SnapshotFrame",
    "decode_history",
    "decode_offer",
    "decode_request",
    "decode_snapshot",
    "encode_history",
    "encode_offer",
    "encode_refusal",
    "encode_request",
    "encode_snapshot",
]

JOIN_PROTOCOL: Final = "/crdtbook/join/1.0.0"

#: Heartbeats an offer carries: one per witness in force at the point, and the witnesses of
#: every epoch a reconfiguration chain passed through may have attested it; a few epochs' worth.
MAX_OFFER_HEARTBEATS: Final = 8 * MAX_WITNESSES
#: Points an offer names (a node keeps two; room for a later version to keep a few more).
MAX_OFFER_POINTS: Final = 4
#: Reconfigurations an offer carries: the whole chain from the market's genesis (one per epoch).
#: Witness sets change rarely (hours to years); a chain longer than this is refused, which
#: leaves such a market to the full-log join.
MAX_OFFER_RECONFIGS: Final = 512
#: A snapshot blob: counts, chain, resting orders (~100 B each), client ids (~60 B per tagged
#: order, held for ever, section 12), witness state and ~2,048+ kept ids. 256 MiB covers a
#: million resting orders and a million client ids at once; past it the joiner refuses (and
#: falls back to the full log) rather than hold more from a peer it does not trust yet.
MAX_SNAPSHOT_BYTES: Final = 256 * 1024 * 1024
#: Kept ops sent with a snapshot: the newest 2,048 final ops, every author's tip, the resting
#: orders' ops, the reconfigurations and the witnesses' heartbeats. Bounded like the blob.
MAX_KEPT_OPS: Final = 2_000_000
#: A snapshot frame's blob part (under MAX_FRAME_BYTES with room for its ops).
SNAPSHOT_CHUNK_BYTES: Final = 2 * 1024 * 1024
#: History ops one session serves (the joiner opens another for the rest, maybe with another
#: peer): ~50 MB of ops, tens of seconds at worst, so no session holds a peer for long.
MAX_HISTORY_SESSION_OPS: Final = 200_000

Kind = Literal["offer", "snapshot", "history"]


@dataclass
class JoinRequest:
    kind: Kind
    market: bytes
    point: int = 0  # snapshot, history: the point asked for
    hash: bytes = b""  # snapshot: its blob's sha256
    start: int = 0  # history: the first final index wanted


@dataclass
class Offer:
    points: list[tuple[int, bytes]]  # (n, sha256 of the blob), the newest first; []: none
    heartbeats: list[bytes] = field(default_factory=list)
    reconfigs: list[bytes] = field(default_factory=list)


@dataclass
class SnapshotFrame:
    blob: bytes
    ops: list[bytes]
    more: bool


@dataclass
class HistoryFrame:
    start: int
    ops: list[bytes]
    more: bool


class JoinRefusal(Exception):
    """The peer refused a join request (``code``: unknown_market, no_point, not_that_point,
    no_history, not_yet, bad_request; a code this node does not know is kept as it came)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _load(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_FRAME_BYTES:
        raise WireError("join frame too large")
    try:
        frame = cbor2.loads(data, max_depth=4)
    except Exception as exc:  # any decoder failure on hostile bytes
        raise WireError(f"join frame is not CBOR: {exc}") from None
    if type(frame) is not dict or type(frame.get("v")) is not int or frame["v"] != 1:
        raise WireError("join frame is not a version 1 map")
    return frame


def _load_answer(data: bytes) -> dict[str, Any]:
    frame = _load(data)
    if "err" in frame:
        raise JoinRefusal(str(frame.get("err"))[:64], str(frame.get("msg"))[:200])
    return frame


def _uint(value: Any, what: str) -> int:
    if type(value) is not int or value < 0 or value >= 1 << 63:
        raise WireError(f"join frame: {what} must be a non-negative integer")
    return value


def _hash(value: Any, what: str) -> bytes:
    if type(value) is not bytes or len(value) != 32:
        raise WireError(f"join frame: {what} must be 32 bytes")
    return value


def _ops(value: Any, most: int, what: str) -> list[bytes]:
    if type(value) is not list or len(value) > most:
        raise WireError(f"join frame: {what} must be a list of at most {most} ops")
    for op in value:
        if type(op) is not bytes or len(op) > MAX_OP_BYTES:
            raise WireError(f"join frame: an item of {what} is not an op's bytes")
    return value


def _more(frame: dict[str, Any]) -> bool:
    more = frame.get("more")
    if type(more) is not bool:
        raise WireError("join frame lacks 'more'")
    return more


def encode_request(req: JoinRequest) -> bytes:
    frame: dict[str, Any] = {"v": 1, "k": req.kind, "m": req.market}
    if req.kind != "offer":
        frame["n"] = req.point
    if req.kind == "snapshot":
        frame["h"] = req.hash
    if req.kind == "history":
        frame["i"] = req.start
    return cbor2.dumps(frame)


def decode_request(data: bytes) -> JoinRequest:
    frame = _load(data)
    kind = frame.get("k")
    market = _hash(frame.get("m"), "market")
    if kind == "offer":
        return JoinRequest("offer", market)
    if kind == "snapshot":
        return JoinRequest(
            "snapshot", market, _uint(frame.get("n"), "n"), _hash(frame.get("h"), "hash")
        )
    if kind == "history":
        return JoinRequest(
            "history", market, _uint(frame.get("n"), "n"), start=_uint(frame.get("i"), "i")
        )
    raise WireError("join request of no known kind")


def encode_refusal(code: str, message: str) -> bytes:
    return cbor2.dumps({"v": 1, "err": code, "msg": message})


def encode_offer(offer: Offer) -> bytes:
    points = [[n, digest] for n, digest in offer.points]
    return cbor2.dumps({"v": 1, "p": points, "hb": offer.heartbeats, "rc": offer.reconfigs})


def decode_offer(data: bytes) -> Offer:
    frame = _load_answer(data)
    items = frame.get("p")
    if type(items) is not list or len(items) > MAX_OFFER_POINTS:
        raise WireError(f"join frame: an offer names at most {MAX_OFFER_POINTS} points")
    points: list[tuple[int, bytes]] = []
    for item in items:
        if type(item) is not list or len(item) != 2:
            raise WireError("join frame: an offered point is [n, hash]")
        point = _uint(item[0], "n")
        if not point:
            raise WireError("join frame: an offered point is past at least one op")
        points.append((point, _hash(item[1], "hash")))
    return Offer(
        points,
        _ops(frame.get("hb"), MAX_OFFER_HEARTBEATS, "heartbeats"),
        _ops(frame.get("rc"), MAX_OFFER_RECONFIGS, "reconfigurations"),
    )


def encode_snapshot(frame: SnapshotFrame) -> bytes:
    return cbor2.dumps({"v": 1, "b": frame.blob, "ops": frame.ops, "more": frame.more})


def decode_snapshot(data: bytes) -> SnapshotFrame:
    frame = _load_answer(data)
    blob = frame.get("b")
    if type(blob) is not bytes or len(blob) > SNAPSHOT_CHUNK_BYTES:
        raise WireError(f"join frame: a blob part must be bytes, at most {SNAPSHOT_CHUNK_BYTES}")
    return SnapshotFrame(blob, _ops(frame.get("ops"), MAX_BATCH_OPS, "kept ops"), _more(frame))


def encode_history(frame: HistoryFrame) -> bytes:
    return cbor2.dumps({"v": 1, "i": frame.start, "ops": frame.ops, "more": frame.more})


def decode_history(data: bytes) -> HistoryFrame:
    frame = _load_answer(data)
    return HistoryFrame(
        _uint(frame.get("i"), "i"), _ops(frame.get("ops"), MAX_BATCH_OPS, "history"), _more(frame)
    )
