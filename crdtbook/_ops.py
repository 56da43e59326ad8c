"""Ops and their canonical CBOR encoding.

An op on the wire is a CBOR array of eight items (see specs/protocol.md)::

    [version, market_id, author, seq, lamport, parents, body, signature]

The signature covers ``DOMAIN || canonical_cbor([version, market_id, author, seq, lamport,
parents, body])``; the op id is SHA-256 of the whole encoded op. Decoding checks every rule that
needs nothing but the op itself (shape, types, bounds, canonical form, signature); the rules that
need the op's causal past live in ``_validity``.

An :class:`Op` object can only come from :func:`decode` (which verified it) or from signing, so
code holding an ``Op`` never verifies it again.

Decoding has two paths and one verdict. Every valid op has the same fixed layout (the canonical
encoding of the types above), so :func:`decode` first tries a hand-written parser that accepts
exactly that layout and nothing else (``_decode_fast``). Whatever it does not accept goes to the
general path (``_decode_slow``: cbor2, the checks of protocol.md 4.6 in order, a re-encoding
check), which stays the reference: it alone decides and names every refusal. The fast parser may
only ever accept bytes the general path accepts, giving the same op; tests/core/test_codec_fast.py
checks that differentially on valid, mutated and random inputs.

An op holds its fields and signature, not its encoding: ``Op.raw`` rebuilds the bytes with the
hand-written encoder (about a microsecond) instead of every held op keeping ~250 bytes for life.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, cast

import cbor2
import nacl.bindings
import nacl.exceptions

from ._errors import (
    BadParents,
    BadSignature,
    LimitExceeded,
    MalformedOp,
    NonCanonical,
    UnknownKind,
)
from ._identity import Identity
from ._limits import (
    MAX_CLIENT_TAG_BYTES,
    MAX_INT,
    MAX_OP_BYTES,
    MAX_PARENTS,
    MAX_WITNESSES,
    PROTOCOL_VERSION,
    PROTOCOL_VERSIONS,
    WITNESSED_VERSION,
)

__all__ = [
    "BUY",
    "CANCEL",
    "CANCEL_ALL",
    "EXPIRE_BOTH",
    "EXPIRE_MAKER",
    "EXPIRE_TAKER",
    "FOK",
    "GTC",
    "HEARTBEAT",
    "IOC",
    "ORDER",
    "POST_ONLY",
    "RECONFIG",
    "SELL",
    "SIDES",
    "STP_MODES",
    "TIFS",
    "CancelAllBody",
    "CancelBody",
    "HeartbeatBody",
    "Op",
    "OrderBody",
    "ReconfigBody",
    "decode",
    "encode",
    "op_id",
    "reconfig_message",
    "sign_op",
]

#: Prefix of every signed message, so an op signature can never be replayed as anything else.
SIGNATURE_DOMAIN: Final = b"crdtbook/op/v1\x00"
#: The prefix by protocol version: a version-2 op's signature never verifies as version 1's.
SIGNATURE_DOMAINS: Final = {
    PROTOCOL_VERSION: SIGNATURE_DOMAIN,
    WITNESSED_VERSION: b"crdtbook/op/v2\x00",
}
#: Prefix of the message a witness signs to approve a reconfiguration (specs/finality.md).
RECONFIG_DOMAIN: Final = b"crdtbook/reconfig/v2\x00"

BUY: Final = "buy"
SELL: Final = "sell"
GTC: Final = "gtc"
IOC: Final = "ioc"
FOK: Final = "fok"
POST_ONLY: Final = "post_only"
ORDER: Final = "order"
CANCEL: Final = "cancel"
HEARTBEAT: Final = "heartbeat"
RECONFIG: Final = "reconfig"
CANCEL_ALL: Final = "cancel_all"
EXPIRE_MAKER: Final = "expire_maker"
EXPIRE_TAKER: Final = "expire_taker"
EXPIRE_BOTH: Final = "expire_both"
#: Self-trade prevention modes by wire code (version 2's order item 6; version 1 has only 0).
STP_MODES: Final = (EXPIRE_MAKER, EXPIRE_TAKER, EXPIRE_BOTH)

#: Wire codes. Append only: a code once given keeps its meaning in every later version.
_KIND_ORDER: Final = 0
_KIND_CANCEL: Final = 1
_KIND_HEARTBEAT: Final = 2  # version 2 only
_KIND_RECONFIG: Final = 3  # version 2 only
_KIND_CANCEL_ALL: Final = 4  # version 2 only
_STP_CODE: Final = {mode: i for i, mode in enumerate(STP_MODES)}
#: The vocabulary of orders, by wire code: the one list the shell and the CLI spell them from.
SIDES: Final = (BUY, SELL)
_SIDES: Final = SIDES
TIFS: Final = (GTC, IOC, FOK, POST_ONLY)
_SIDE_CODE: Final = {BUY: 0, SELL: 1}
_TIF_CODE: Final = {tif: i for i, tif in enumerate(TIFS)}

_ID_BYTES: Final = 32
_KEY_BYTES: Final = 32
_SIG_BYTES: Final = 64
#: CBOR header of a 64-byte byte string, the last item of every op.
_SIG_HEADER: Final = b"\x58\x40"
#: CBOR header of a 32-byte byte string: market id, author, each parent, a cancel's order id.
_B32_HEADER: Final = b"\x58\x20"


class OrderBody(NamedTuple):
    """A limit order: ``price`` in ticks, ``quantity`` in lots.

    ``tag``: the client's text for it; in version 2 it is the client order id, unique per
    author (a later order of the same author with the same tag is rejected).
    ``stp``: self-trade prevention when it meets its author's own resting order:
    ``expire_maker`` (version 1's only rule), ``expire_taker`` or ``expire_both`` (version 2).
    """

    side: str
    price: int
    quantity: int
    tif: str = GTC
    tag: str | None = None
    stp: str = "expire_maker"

    @property
    def kind(self) -> str:
        return ORDER


class CancelBody(NamedTuple):
    """Cancels the rest of ``order_id`` (an order of the same author in the cancel's past)."""

    order_id: bytes

    @property
    def kind(self) -> str:
        return CANCEL


class CancelAllBody(NamedTuple):
    """Cancels every resting order of its author at its place in the total order (version 2);
    with ``prefix``, only those whose client order id (tag) starts with it."""

    prefix: str | None = None

    @property
    def kind(self) -> str:
        return CANCEL_ALL


class HeartbeatBody(NamedTuple):
    """A witness's acknowledgement of everything in its causal past (version 2 only). It changes
    no order; it places ops in the total order and moves the finality frontier.

    ``time_ms``: the witness's clock when it signed (Unix milliseconds; 0: none given). The core
    never reads a clock: it only reports the earliest such time of a batch as the batch's
    witnessed time (``Replica.witnessed_time``); no order or match depends on it.

    ``point`` and ``point_hash`` (both or neither; 0 and ``b""``: none): the witness's
    attestation of a point of the final prefix, the SHA-256 of the point state after the first
    ``point`` ops of the total order (specs/finality.md section 13). Like the time, it changes
    no order; a joining node counts attestations to trust a snapshot."""

    time_ms: int = 0
    point: int = 0
    point_hash: bytes = b""

    @property
    def kind(self) -> str:
        return HEARTBEAT


class ReconfigBody(NamedTuple):
    """A change of a witnessed market's witnesses (version 2 only), taking effect as epoch
    ``epoch``. ``witnesses``: the new set, sorted. ``approvals``: ``(witness key, signature of
    reconfig_message(...))`` from current witnesses other than the author, sorted by key."""

    epoch: int
    witnesses: tuple[bytes, ...]
    approvals: tuple[tuple[bytes, bytes], ...]

    @property
    def kind(self) -> str:
        return RECONFIG


Body = OrderBody | CancelBody | CancelAllBody | HeartbeatBody | ReconfigBody


def reconfig_message(market_id: bytes, epoch: int, witnesses: Sequence[bytes]) -> bytes:
    """What a witness signs to approve making ``witnesses`` the set of epoch ``epoch``."""
    return RECONFIG_DOMAIN + cbor2.dumps([market_id, epoch, list(witnesses)], canonical=True)


class Op:
    """A signed, immutable op. Fields are readable by name; ``id`` is its 32-byte op id and
    ``raw`` its canonical encoding. Obtain ops from :func:`decode` or ``Replica.submit``/``cancel``.
    """

    __slots__ = (
        "author",
        "body",
        "id",
        "lamport",
        "market_id",
        "parents",
        "seq",
        "signature",
        "version",
    )

    version: int
    market_id: bytes
    author: bytes
    seq: int
    lamport: int
    parents: tuple[bytes, ...]
    body: Body
    #: The 64-byte ed25519 signature.
    signature: bytes
    id: bytes

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("ops come from crdtbook.decode() or Replica.submit()/cancel()")

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError("Op is immutable")

    def __delattr__(self, key: str) -> None:
        raise AttributeError("Op is immutable")

    @property
    def kind(self) -> str:
        return self.body.kind

    @property
    def raw(self) -> bytes:
        """The canonical encoding (the bytes ``id`` is the hash of). Rebuilt from the fields on
        every read, about a microsecond: holding it would cost ~250 bytes per op for the life of
        a log, and only gossip and sync need the bytes (a node's store keeps its own copy)."""
        return _encode_op(self)

    @property
    def key(self) -> tuple[int, bytes]:
        """Position in the total order: (Lamport time, op id)."""
        return (self.lamport, self.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Op) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return (
            f"Op({self.id.hex()[:12]} {self.kind} author={self.author.hex()[:8]} "
            f"seq={self.seq} lamport={self.lamport} body={self.body!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (decode, (self.raw,))


class _OpFields:
    """An op under construction: the same slots as :class:`Op` without its immutability.

    ``_new_op`` fills one with plain attribute stores, then turns it into an ``Op`` by setting
    its ``__class__`` (allowed because the slot layouts are identical). That is about three times
    cheaper than setting Op's slots through their descriptors, on the path of every decode.
    """

    __slots__ = Op.__slots__

    version: int
    market_id: bytes
    author: bytes
    seq: int
    lamport: int
    parents: tuple[bytes, ...]
    body: Body
    signature: bytes
    id: bytes


def _new_op(
    version: int,
    market_id: bytes,
    author: bytes,
    seq: int,
    lamport: int,
    parents: tuple[bytes, ...],
    body: Body,
    signature: bytes,
    ident: bytes,
) -> Op:
    op = _OpFields()
    op.version = version
    op.market_id = market_id
    op.author = author
    op.seq = seq
    op.lamport = lamport
    op.parents = parents
    op.body = body
    op.signature = signature
    op.id = ident
    op.__class__ = Op  # type: ignore[assignment]
    return cast(Op, op)


#: Market ids and author keys repeat across a log's ops: keep one bytes object per value. The
#: table only saves memory (values are equal either way); it is emptied when it fills.
_SHARED_KEYS: dict[bytes, bytes] = {}
_MAX_SHARED_KEYS: Final = 65_536


def _shared_key(value: bytes) -> bytes:
    shared = _SHARED_KEYS.get(value)
    if shared is None:
        if len(_SHARED_KEYS) >= _MAX_SHARED_KEYS:
            _SHARED_KEYS.clear()
        _SHARED_KEYS[value] = shared = value
    return shared


def op_id(raw: bytes) -> bytes:
    """The op id of encoded bytes: cheap, so a replica can skip ops it has before decoding."""
    return hashlib.sha256(raw).digest()


# -- the hand-written canonical encoder -----------------------------------------------------------
#
# Valid ops use a handful of CBOR heads, so their canonical encoding is written directly from
# byte-string pieces instead of through cbor2's generic encoder (several times slower, and now on
# the path of every ``Op.raw``). tests/core/test_codec_fast.py checks it against
# ``cbor2.dumps(..., canonical=True)``. Its domain is the fields of a valid op (``_encodable``);
# ``sign_op`` hands anything else to cbor2 as before, so that ``decode`` refuses it as before.


def _uint(value: int) -> bytes:
    """Canonical CBOR of an unsigned integer, 0 <= value < 2**64: the shortest head."""
    if value < 24:
        return _SMALL_UINTS[value]
    if value < 0x100:
        return bytes((0x18, value))
    if value < 0x1_0000:
        return _head_u16(0x19, value)
    if value < 0x1_0000_0000:
        return _head_u32(0x1A, value)
    return _head_u64(0x1B, value)


_SMALL_UINTS: Final = tuple(bytes((i,)) for i in range(24))
_head_u16 = struct.Struct(">BH").pack
_head_u32 = struct.Struct(">BI").pack
_head_u64 = struct.Struct(">BQ").pack


def _head(major: int, length: int) -> bytes:
    """Canonical head of an array (major 4) or text string (major 3) of ``length``."""
    head = _uint(length)
    return bytes((major << 5 | head[0],)) + head[1:]


_PARENTS_HEADS: Final = tuple(_head(4, n) for n in range(MAX_PARENTS + 1))
_TAG_HEADS: Final = tuple(_head(3, n) for n in range(MAX_CLIENT_TAG_BYTES + 1))
#: An order body's array head, kind and side: the encoding starts ``0x86 0x00 side``.
_ORDER_START: Final = {side: bytes((0x86, _KIND_ORDER, code)) for side, code in _SIDE_CODE.items()}
_TIF_BYTE: Final = {tif: _uint(code) for tif, code in _TIF_CODE.items()}
#: Version 2's order: ``0x87 0x00 side``, and its self-trade mode byte.
_ORDER_V2_START: Final = {
    side: bytes((0x87, _KIND_ORDER, code)) for side, code in _SIDE_CODE.items()
}
_STP_BYTE: Final = {mode: _uint(code) for mode, code in _STP_CODE.items()}
_NULL: Final = b"\xf6"
#: A cancel body up to its order id: array head, kind, the id's byte-string head.
_CANCEL_START: Final = bytes((0x82, _KIND_CANCEL)) + _B32_HEADER
#: The first bytes of every op (8-array head, version, market id head) and of every payload.
_OP_START: Final = b"\x88" + _uint(PROTOCOL_VERSION) + _B32_HEADER
_PAYLOAD_START: Final = b"\x87" + _OP_START[1:]
#: What precedes ``op_bytes[1:signature_head]`` in the message the signature covers.
_SIGNED_PREFIX: Final = SIGNATURE_DOMAIN + b"\x87"
#: The same, by version.
_OP_STARTS: Final = {v: b"\x88" + _uint(v) + _B32_HEADER for v in PROTOCOL_VERSIONS}
_PAYLOAD_STARTS: Final = {v: b"\x87" + _uint(v) + _B32_HEADER for v in PROTOCOL_VERSIONS}
_SIGNED_PREFIXES: Final = {v: SIGNATURE_DOMAINS[v] + b"\x87" for v in PROTOCOL_VERSIONS}
#: A heartbeat body up to its time: ``[2, time_ms]``.
_HEARTBEAT_START: Final = bytes((0x82, _KIND_HEARTBEAT))


def _encode_chunks(
    start: bytes,
    market_id: bytes,
    author: bytes,
    seq: int,
    lamport: int,
    parents: Sequence[bytes],
    body: Body,
) -> list[bytes]:
    """The canonical encoding of an op's first seven items as pieces to join, beginning with
    ``start`` (``_OP_START`` for an op, ``_PAYLOAD_START`` for the signed payload). The fields
    must be those of a valid op (see ``_encodable``); they are not checked here."""
    chunks = [start, market_id, _B32_HEADER, author, _uint(seq), _uint(lamport)]
    chunks.append(_PARENTS_HEADS[len(parents)])
    if parents:
        chunks.append(_B32_HEADER)
        chunks.append(_B32_HEADER.join(parents))
    if isinstance(body, OrderBody):
        side, price, quantity, tif, tag, stp = body
        if start[1] == WITNESSED_VERSION:  # 7 items: one more head, the mode after the tag
            chunks += (_ORDER_V2_START[side], _uint(price), _uint(quantity), _TIF_BYTE[tif])
        else:
            chunks += (_ORDER_START[side], _uint(price), _uint(quantity), _TIF_BYTE[tif])
        if tag is None:
            chunks.append(_NULL)
        else:
            text = tag.encode("utf-8")
            chunks += (_TAG_HEADS[len(text)], text)
        if start[1] == WITNESSED_VERSION:
            chunks.append(_STP_BYTE[stp])
    elif isinstance(body, CancelBody):
        chunks += (_CANCEL_START, body.order_id)
    elif isinstance(body, HeartbeatBody) and not body.point:
        chunks += (_HEARTBEAT_START, _uint(body.time_ms))
    else:  # a reconfiguration or cancel-all: rare, so cbor2's canonical encoder writes them
        chunks.append(cbor2.dumps(_body_to_wire(body, WITNESSED_VERSION), canonical=True))
    return chunks


def _encode_op(op: Op) -> bytes:
    chunks = _encode_chunks(
        _OP_STARTS[op.version], op.market_id, op.author, op.seq, op.lamport, op.parents, op.body
    )
    chunks += (_SIG_HEADER, op.signature)
    return b"".join(chunks)


def _is_uint(value: object) -> bool:
    return type(value) is int and 0 < value <= MAX_INT


def _is_id(value: object) -> bool:
    return type(value) is bytes and len(value) == _ID_BYTES


def _encodable(
    version: object,
    market_id: object,
    author: object,
    seq: object,
    lamport: object,
    parents: tuple[object, ...],
    body: object,
) -> bool:
    """Whether the fields are within a valid op's types and bounds: the hand-written encoder's
    domain. Never raises, whatever it is given."""
    if not (_is_id(market_id) and _is_id(author) and _is_uint(seq) and _is_uint(lamport)):
        return False
    if len(parents) > MAX_PARENTS or not all(_is_id(p) for p in parents):
        return False
    if version not in PROTOCOL_VERSIONS:
        return False
    if type(body) is CancelBody:
        return _is_id(body.order_id)
    if type(body) is HeartbeatBody:
        time_ms, point, point_hash = body
        if not (version == WITNESSED_VERSION and type(time_ms) is int and 0 <= time_ms <= MAX_INT):
            return False
        if point == 0 and point_hash == b"":
            return True
        return _is_uint(point) and _is_id(point_hash)
    if type(body) is not OrderBody:
        return False
    side, price, quantity, tif, tag, stp = body
    if not (type(side) is str and side in _SIDE_CODE and type(tif) is str and tif in _TIF_CODE):
        return False
    if stp != EXPIRE_MAKER and not (version == WITNESSED_VERSION and stp in _STP_CODE):
        return False
    if not (_is_uint(price) and _is_uint(quantity)):
        return False
    if tag is None:
        return True
    if type(tag) is not str:
        return False
    try:
        return len(tag.encode("utf-8")) <= MAX_CLIENT_TAG_BYTES
    except UnicodeEncodeError:  # lone surrogates: no UTF-8 form
        return False


def encode(op: Op) -> bytes:
    """The canonical encoding of ``op`` (the bytes its id is the hash of)."""
    return _encode_op(op)


# -- the cbor2 encoder: the reference, and sign_op's path for out-of-range fields -----------------


def _body_to_wire(body: Body, version: int) -> list[Any]:
    if isinstance(body, OrderBody):
        wire = [
            _KIND_ORDER,
            _SIDE_CODE[body.side],
            body.price,
            body.quantity,
            _TIF_CODE[body.tif],
            body.tag,
        ]
        if version == WITNESSED_VERSION:
            wire.append(_STP_CODE[body.stp])
        elif body.stp != EXPIRE_MAKER:
            raise ValueError(f"self-trade mode {body.stp!r} needs a witnessed (version 2) market")
        return wire
    if isinstance(body, CancelBody):
        return [_KIND_CANCEL, body.order_id]
    if isinstance(body, CancelAllBody):
        return [_KIND_CANCEL_ALL, body.prefix]
    if isinstance(body, HeartbeatBody):
        if body.point:
            return [_KIND_HEARTBEAT, body.time_ms, body.point, body.point_hash]
        return [_KIND_HEARTBEAT, body.time_ms]
    return [
        _KIND_RECONFIG,
        body.epoch,
        list(body.witnesses),
        [list(approval) for approval in body.approvals],
    ]


def _payload(
    version: int,
    market_id: bytes,
    author: bytes,
    seq: int,
    lamport: int,
    parents: tuple[bytes, ...],
    wire_body: list[Any],
) -> bytes:
    return cbor2.dumps(
        [version, market_id, author, seq, lamport, list(parents), wire_body],
        canonical=True,
    )


def sign_op(
    identity: Identity,
    market_id: bytes,
    seq: int,
    lamport: int,
    parents: tuple[bytes, ...],
    body: Body,
    version: int = PROTOCOL_VERSION,
) -> Op:
    """Build and sign an op. The result is checked exactly as a received op would be."""
    parents = tuple(sorted(parents))
    author = identity.public_key
    if _encodable(version, market_id, author, seq, lamport, parents, body):
        payload = b"".join(
            _encode_chunks(
                _PAYLOAD_STARTS[version], market_id, author, seq, lamport, parents, body
            )
        )
    else:
        # Not a valid op's fields: encode them with cbor2 as always, so that the decode below
        # refuses them with the same error as ever (or _body_to_wire raises as it always did).
        wire_body = _body_to_wire(body, version)
        payload = _payload(version, market_id, author, seq, lamport, parents, wire_body)
    signature = identity.sign(SIGNATURE_DOMAINS.get(version, SIGNATURE_DOMAIN) + payload)
    raw = b"\x88" + payload[1:] + _SIG_HEADER + signature
    # Signing goes through the same gate as the wire: a caller cannot make an op that peers refuse.
    return decode(raw, verify=False)


# -- decoding -------------------------------------------------------------------------------------


def decode(
    data: bytes,
    *,
    verify: bool = True,
    intern_id: Callable[[bytes], bytes] | None = None,
) -> Op:
    """Decode and check an encoded op.

    Args:
        data: the op's bytes, as produced by :func:`encode`.
        verify: check the signature. Only a caller that verified these exact bytes before (a
            local store of verified ops) may pass ``False``.
        intern_id: maps a parent id to an equal bytes object the caller already holds (a
            replica passes its own op ids), so a log does not keep each id twice.

    Returns:
        The op.

    Raises:
        InvalidOp: (a subclass naming what is wrong) for anything that is not a valid op;
            no other exception escapes for any input bytes.
    """
    if type(data) is not bytes:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MalformedOp(f"an op is bytes, not {type(data).__name__}")
        data = bytes(data)
    return _decode(data, verify, intern_id, None)


def decode_with_id(
    data: bytes, ident: bytes, intern_id: Callable[[bytes], bytes] | None = None
) -> Op:
    """:func:`decode` (verifying) for a caller that has just computed ``ident = op_id(data)``
    (a replica, to skip ops it holds before decoding them), so the bytes are hashed once."""
    return _decode(data, True, intern_id, ident)


def _decode(
    data: bytes,
    verify: bool,
    intern_id: Callable[[bytes], bytes] | None,
    ident: bytes | None,
) -> Op:
    op = _decode_fast(data, verify, intern_id, ident)
    if op is None:
        # Not the one layout of a valid op (or not valid): the reference path decides, and
        # names the error.
        op = _decode_slow(data, verify=verify, intern_id=intern_id)
    return op


#: The shortest valid op: no parents, one-byte integers, a heartbeat (``[2, 0]``, 3 bytes).
_MIN_OP_BYTES: Final = len(_OP_START) + 32 + 2 + 32 + 1 + 1 + 1 + 3 + 2 + _SIG_BYTES
#: Where the author's 32 bytes start, and where the items after it (seq, ...) start.
_AUTHOR_AT: Final = len(_OP_START) + 32 + 2
_SEQ_AT: Final = _AUTHOR_AT + 32
_u16_at = struct.Struct(">H").unpack_from
_u32_at = struct.Struct(">I").unpack_from
_u64_at = struct.Struct(">Q").unpack_from


def _long_uint(data: bytes, at: int) -> tuple[int, int]:
    """The integer 24..MAX_INT encoded canonically with a 1, 2, 4 or 8-byte argument (the
    fewest that hold it) at ``data[at]``, and the position after it; ``(0, at)`` for anything
    else. 0 is never a valid value of the fields read here, so it doubles as "no". Raises
    IndexError or struct.error past the end of ``data``."""
    head = data[at]
    # Most frequent first: seq, Lamport time and prices soon need 2 or 4 bytes.
    if head == 0x19:
        value: int = _u16_at(data, at + 1)[0]
        return (value, at + 3) if value >= 0x100 else (0, at)
    if head == 0x1A:
        value = _u32_at(data, at + 1)[0]
        return (value, at + 5) if value >= 0x1_0000 else (0, at)
    if head == 0x18:
        value = data[at + 1]
        return (value, at + 2) if value >= 24 else (0, at)
    if head == 0x1B:
        value = _u64_at(data, at + 1)[0]
        return (value, at + 9) if 0x1_0000_0000 <= value <= MAX_INT else (0, at)
    return (0, at)


#: (market id, author) by the 66 bytes that hold both in an op (with the author's head between
#: them): one slice and one lookup per decode, instead of two of each.
_SHARED_PAIRS: dict[bytes, tuple[bytes, bytes]] = {}


def _shared_pair(key: bytes) -> tuple[bytes, bytes]:
    if len(_SHARED_PAIRS) >= _MAX_SHARED_KEYS:
        _SHARED_PAIRS.clear()
    pair = _SHARED_PAIRS[key] = (_shared_key(key[:32]), _shared_key(key[34:]))
    return pair


def _decode_fast(
    data: bytes,
    verify: bool,
    intern_id: Callable[[bytes], bytes] | None,
    known_id: bytes | None = None,
) -> Op | None:
    """The op if ``data`` is exactly the canonical encoding of a valid op, else None (the
    caller then runs ``_decode_slow``, which names the error). Raises only ``BadSignature``, for
    a well-formed op whose signature does not verify: the verdict the slow path reaches too.

    Soundness over speed: every check below is an exact byte or range test of the one layout
    of a valid op::

        88 01 58 20 <market 32> 58 20 <author 32> <seq> <lamport>
        <parents head> (58 20 <id 32>)*   strictly ascending
        86 00 <side 0|1> <price> <quantity> <tif 0..3> (f6 | <text head> <utf-8>)
          | 82 01 58 20 <order id 32>
        58 40 <signature 64>              and nothing after it

    where every integer and length uses its shortest head. A position can run past the end
    on truncated input: reading a byte there raises IndexError (caught), a slice comes back
    short, and in any case the body then cannot end exactly at the signature head (the last
    check), which also bounds every slice taken to the bytes before the signature.
    """
    size = len(data)
    sig_at = size - 2 - _SIG_BYTES  # where the signature's byte-string head must be
    if not (
        _MIN_OP_BYTES <= size <= MAX_OP_BYTES
        and (data.startswith(_OP_START) or data.startswith(_OP_V2_START))
        and data[_AUTHOR_AT - 2] == 0x58
        and data[_AUTHOR_AT - 1] == 0x20
        and data[sig_at] == 0x58
        and data[sig_at + 1] == 0x40
    ):
        return None
    try:
        at = _SEQ_AT
        seq = data[at]
        if seq < 24:  # 0..23 sit in the head byte; 0 is refused below
            at += 1
        else:
            seq, at = _long_uint(data, at)
        lamport = data[at]
        if lamport < 24:
            at += 1
        else:
            lamport, at = _long_uint(data, at)
        if not (seq and lamport):
            return None

        count = data[at]
        if 0x80 <= count <= 0x97:  # an array of 0..23 items: the count is in the head byte
            count -= 0x80
            at += 1
        elif count == 0x98:  # 24..255 items: one argument byte
            count = data[at + 1]
            if count < 24:
                return None
            at += 2
        else:
            return None
        if count > MAX_PARENTS:
            return None
        parents: tuple[bytes, ...] = ()
        if count:
            ids = []
            previous = b""
            stop = at + 34 * count
            for i in range(at, stop, 34):  # each a 32-byte byte string, strictly ascending
                if data[i] != 0x58 or data[i + 1] != 0x20:
                    return None
                ident = data[i + 2 : i + 34]
                if ident <= previous:  # unsorted or a duplicate (b"" sorts below any id)
                    return None
                ids.append(ident)
                previous = ident
            parents = tuple(ids)
            at = stop

        head = data[at]
        body: Body
        if head == _ORDER_HEADS[data[1]]:  # an order: [0, side, price, quantity, tif, tag(, stp)]
            side = data[at + 2]
            if data[at + 1] != _KIND_ORDER or side > 1:
                return None
            at += 3
            price = data[at]
            if price < 24:
                at += 1
            else:
                price, at = _long_uint(data, at)
            quantity = data[at]
            if quantity < 24:
                at += 1
            else:
                quantity, at = _long_uint(data, at)
            tif = data[at]
            if not (price and quantity) or tif > 3:
                return None
            head = data[at + 1]
            at += 2
            tag: str | None
            if head == 0xF6:
                tag = None
            else:
                if 0x60 <= head <= 0x77:  # a text string of 0..23 bytes
                    length = head - 0x60
                elif head == 0x78:  # 24..255 bytes: one argument byte
                    length = data[at]
                    at += 1
                    if length < 24:
                        return None
                else:
                    return None
                if length > MAX_CLIENT_TAG_BYTES:
                    return None
                tag = data[at : at + length].decode("utf-8")  # strict, as cbor2 decodes text
                at += length
            stp = EXPIRE_MAKER
            if data[1] == WITNESSED_VERSION:
                code = data[at]
                if code > 2:
                    return None
                stp = STP_MODES[code]
                at += 1
            body = _new_tuple(OrderBody, (_SIDES[side], price, quantity, TIFS[tif], tag, stp))
        elif head == 0x82:  # a cancel: [1, order_id], or a heartbeat: [2, time_ms]
            if data.startswith(_CANCEL_START, at):
                body = _new_tuple(CancelBody, (data[at + 4 : at + 36],))
                at += 36
            elif data[at + 1] == _KIND_HEARTBEAT and data[1] == WITNESSED_VERSION:
                time_ms = data[at + 2]
                if time_ms < 24:
                    at += 3
                else:
                    time_ms, at = _long_uint(data, at + 2)
                    if not time_ms:
                        return None
                body = _new_tuple(HeartbeatBody, (time_ms, 0, b""))
            else:
                return None
        else:
            return None
        if at != sig_at:
            return None
    except (IndexError, struct.error, UnicodeDecodeError):
        return None

    keys = data[len(_OP_START) : _SEQ_AT]
    market_id, author = _SHARED_PAIRS.get(keys) or _shared_pair(keys)
    signature = data[sig_at + 2 :]
    version = data[1]
    if verify:
        prefix = _SIGNED_PREFIX if version == PROTOCOL_VERSION else _SIGNED_PREFIXES[version]
        try:
            nacl.bindings.crypto_sign_open(signature + prefix + data[1:sig_at], author)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
            raise BadSignature("signature does not verify against the author's key") from None
    if intern_id is not None and parents:
        parents = tuple(map(intern_id, parents))
    # _new_op, inlined: a call with nine arguments costs a tenth of this whole function.
    op = _OpFields()
    op.version = version
    op.market_id = market_id
    op.author = author
    op.seq = seq
    op.lamport = lamport
    op.parents = parents
    op.body = body
    op.signature = signature
    op.id = _sha256(data).digest() if known_id is None else known_id
    op.__class__ = Op  # type: ignore[assignment]
    return op  # type: ignore[return-value]  # (now an Op; typing.cast would cost a call)


_sha256 = hashlib.sha256
#: An order body's array head by version: 6 items in version 1, 7 (with stp) in version 2.
_ORDER_HEADS: Final = {PROTOCOL_VERSION: 0x86, WITNESSED_VERSION: 0x87}
_OP_V2_START: Final = _OP_STARTS[WITNESSED_VERSION]
# NamedTuple.__new__ is a Python function around tuple.__new__; calling the latter skips a frame.
_new_tuple = tuple.__new__


def _decode_body(wire: object, version: int = PROTOCOL_VERSION) -> Body:
    if type(wire) is not list or not wire or type(wire[0]) is not int:
        raise MalformedOp("op body must be an array starting with its kind code")
    kind = wire[0]
    if kind == _KIND_ORDER:
        stp = EXPIRE_MAKER
        if version == WITNESSED_VERSION:
            if len(wire) != 7:
                raise MalformedOp(
                    "a version-2 order body has 7 items: kind, side, price, quantity, tif, tag, "
                    "stp"
                )
            code = wire[6]
            if type(code) is not int or not 0 <= code < len(STP_MODES):
                raise MalformedOp(
                    "self-trade mode must be 0 expire_maker, 1 expire_taker or 2 expire_both"
                )
            stp = STP_MODES[code]
            wire = wire[:6]
        if len(wire) != 6:
            raise MalformedOp("an order body has 6 items: kind, side, price, quantity, tif, tag")
        _, side, price, quantity, tif, tag = wire
        if type(side) is not int or not 0 <= side < len(_SIDES):
            raise MalformedOp("order side must be 0 (buy) or 1 (sell)")
        if type(tif) is not int or not 0 <= tif < len(TIFS):
            raise MalformedOp("order time in force must be 0 gtc, 1 ioc, 2 fok or 3 post_only")
        if not _is_uint(price):
            raise LimitExceeded(f"order price must be an integer in 1..{MAX_INT} ticks")
        if not _is_uint(quantity):
            raise LimitExceeded(f"order quantity must be an integer in 1..{MAX_INT} lots")
        if tag is not None:
            if type(tag) is not str:
                raise MalformedOp("order tag must be a text string or null")
            if len(tag.encode("utf-8")) > MAX_CLIENT_TAG_BYTES:
                raise LimitExceeded(f"order tag is longer than {MAX_CLIENT_TAG_BYTES} bytes")
        return OrderBody(_SIDES[side], price, quantity, TIFS[tif], tag, stp)
    if kind == _KIND_CANCEL:
        if len(wire) != 2 or not _is_id(wire[1]):
            raise MalformedOp("a cancel body is [1, order_id] with a 32-byte order id")
        return CancelBody(wire[1])
    if version == WITNESSED_VERSION and kind == _KIND_HEARTBEAT:
        if len(wire) not in (2, 4):
            raise MalformedOp("a heartbeat body is [2, time_ms] or [2, time_ms, point, hash]")
        time_ms = wire[1]
        if type(time_ms) is not int or not 0 <= time_ms <= MAX_INT:
            raise LimitExceeded(f"a heartbeat's time must be an integer in 0..{MAX_INT} (ms)")
        if len(wire) == 2:
            return HeartbeatBody(time_ms)
        point, point_hash = wire[2], wire[3]
        if not _is_uint(point):
            raise LimitExceeded(f"a heartbeat's point must be an integer in 1..{MAX_INT}")
        if not _is_id(point_hash):
            raise MalformedOp("a heartbeat's point hash must be a 32-byte byte string")
        return HeartbeatBody(time_ms, point, point_hash)
    if version == WITNESSED_VERSION and kind == _KIND_RECONFIG:
        return _decode_reconfig(wire)
    if version == WITNESSED_VERSION and kind == _KIND_CANCEL_ALL:
        if len(wire) != 2:
            raise MalformedOp("a cancel-all body is [4, prefix]")
        prefix = wire[1]
        if prefix is not None:
            if type(prefix) is not str:
                raise MalformedOp("a cancel-all's prefix must be a text string or null")
            if len(prefix.encode("utf-8")) > MAX_CLIENT_TAG_BYTES:
                raise LimitExceeded(
                    f"a cancel-all's prefix is longer than {MAX_CLIENT_TAG_BYTES} bytes"
                )
        return CancelAllBody(prefix)
    raise UnknownKind(f"unknown op kind {kind} in a version {version} op")


def _decode_reconfig(wire: list[Any]) -> ReconfigBody:
    """``[3, epoch, [witness, ...], [[witness, signature], ...]]``: shapes and bounds only; the
    witness rules (who may sign, majorities, epochs) need the causal past (``_finality``)."""
    if len(wire) != 4:
        raise MalformedOp("a reconfiguration body is [3, epoch, witnesses, approvals]")
    _, epoch, witnesses, approvals = wire
    if not _is_uint(epoch):
        raise LimitExceeded(f"reconfiguration epoch must be an integer in 1..{MAX_INT}")
    if type(witnesses) is not list or not 0 < len(witnesses) <= MAX_WITNESSES:
        raise LimitExceeded(f"a reconfiguration names 1 to {MAX_WITNESSES} witnesses")
    if type(approvals) is not list or len(approvals) > MAX_WITNESSES:
        raise LimitExceeded(f"a reconfiguration carries at most {MAX_WITNESSES} approvals")
    for i, key in enumerate(witnesses):
        if not _is_id(key):
            raise MalformedOp("every witness is a 32-byte ed25519 public key")
        if i and witnesses[i - 1] >= key:
            raise MalformedOp("witnesses must be sorted ascending without duplicates")
    pairs = []
    for i, approval in enumerate(approvals):
        if (
            type(approval) is not list
            or len(approval) != 2
            or not _is_id(approval[0])
            or type(approval[1]) is not bytes
            or len(approval[1]) != _SIG_BYTES
        ):
            raise MalformedOp("an approval is [32-byte witness key, 64-byte signature]")
        if i and approvals[i - 1][0] >= approval[0]:
            raise MalformedOp("approvals must be sorted by witness key without duplicates")
        pairs.append((approval[0], approval[1]))
    return ReconfigBody(epoch, tuple(witnesses), tuple(pairs))


def _decode_slow(
    data: object,
    *,
    verify: bool = True,
    intern_id: Callable[[bytes], bytes] | None = None,
) -> Op:
    """The reference decoder (same contract as :func:`decode`): cbor2, then the checks of
    protocol.md 4.6 in their order, then a re-encoding check for canonical form. It handles
    every input ``_decode_fast`` does not accept, and tests compare the two on any input."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedOp(f"an op is bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_OP_BYTES:
        raise LimitExceeded(f"op is {len(data)} bytes, more than the limit of {MAX_OP_BYTES}")
    try:
        fields = cbor2.loads(data, max_depth=8)
    except Exception as exc:  # cbor2 raises several types on hostile input; all mean "not CBOR".
        raise MalformedOp(f"op is not valid CBOR: {exc}") from None
    if type(fields) is not list or len(fields) != 8:
        raise MalformedOp("an op is a CBOR array of 8 items")
    version, market_id, author, seq, lamport, parents, wire_body, signature = fields
    if type(version) is not int or version not in PROTOCOL_VERSIONS:
        known = " or ".join(map(str, PROTOCOL_VERSIONS))
        raise UnknownKind(f"op protocol version {version!r} is not {known}")
    if not _is_id(market_id):
        raise MalformedOp("market id must be 32 bytes")
    if type(author) is not bytes or len(author) != _KEY_BYTES:
        raise MalformedOp("author must be a 32-byte ed25519 public key")
    if not _is_uint(seq):
        raise LimitExceeded(f"sequence number must be an integer in 1..{MAX_INT}")
    if not _is_uint(lamport):
        raise LimitExceeded(f"Lamport time must be an integer in 1..{MAX_INT}")
    if type(parents) is not list:
        raise MalformedOp("parents must be an array of op ids")
    if len(parents) > MAX_PARENTS:
        raise LimitExceeded(f"an op has at most {MAX_PARENTS} parents, this one {len(parents)}")
    for i, parent in enumerate(parents):
        if not _is_id(parent):
            raise MalformedOp("every parent must be a 32-byte op id")
        if i and parents[i - 1] >= parent:
            raise BadParents("parents must be sorted ascending without duplicates")
    if type(signature) is not bytes or len(signature) != _SIG_BYTES:
        raise MalformedOp("signature must be 64 bytes")
    body = _decode_body(wire_body, version)
    try:
        payload = _payload(version, market_id, author, seq, lamport, tuple(parents), wire_body)
    except Exception as exc:  # defensive: types were checked above
        raise MalformedOp(f"op cannot be re-encoded: {exc}") from None
    if data != b"\x88" + payload[1:] + _SIG_HEADER + signature:
        raise NonCanonical("op is not in canonical CBOR form (re-encoding gives other bytes)")
    if verify:
        try:
            nacl.bindings.crypto_sign_open(signature + SIGNATURE_DOMAINS[version] + payload, author)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
            raise BadSignature("signature does not verify against the author's key") from None
    shared = _shared_key
    parent_ids = tuple(parents) if intern_id is None else tuple(intern_id(p) for p in parents)
    return _new_op(
        version,
        shared(market_id),
        shared(author),
        seq,
        lamport,
        parent_ids,
        body,
        signature,
        hashlib.sha256(data).digest(),
    )
