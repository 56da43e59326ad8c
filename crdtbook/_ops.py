"""Ops and their canonical CBOR encoding.

An op on the wire is a CBOR array of eight items (see specs/protocol.md)::

    [version, market_id, author, seq, lamport, parents, body, signature]

The signature covers ``DOMAIN || canonical_cbor([version, market_id, author, seq, lamport,
parents, body])``; the op id is SHA-256 of the whole encoded op. Decoding checks every rule that
needs nothing but the op itself (shape, types, bounds, canonical form, signature); the rules that
need the op's causal past live in ``_validity``.

An :class:`Op` object can only come from :func:`decode` (which verified it) or from signing, so
code holding an ``Op`` never verifies it again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Final, NamedTuple

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
from ._limits import MAX_CLIENT_TAG_BYTES, MAX_INT, MAX_OP_BYTES, MAX_PARENTS, PROTOCOL_VERSION

__all__ = [
    "BUY",
    "CANCEL",
    "FOK",
    "GTC",
    "IOC",
    "ORDER",
    "POST_ONLY",
    "SELL",
    "TIFS",
    "CancelBody",
    "Op",
    "OrderBody",
    "decode",
    "encode",
    "op_id",
    "sign_op",
]

#: Prefix of every signed message, so an op signature can never be replayed as anything else.
SIGNATURE_DOMAIN: Final = b"crdtbook/op/v1\x00"

BUY: Final = "buy"
SELL: Final = "sell"
GTC: Final = "gtc"
IOC: Final = "ioc"
FOK: Final = "fok"
POST_ONLY: Final = "post_only"
ORDER: Final = "order"
CANCEL: Final = "cancel"

#: Wire codes. Append only: a code once given keeps its meaning in every later version.
_KIND_ORDER: Final = 0
_KIND_CANCEL: Final = 1
_SIDES: Final = (BUY, SELL)
TIFS: Final = (GTC, IOC, FOK, POST_ONLY)
_SIDE_CODE: Final = {BUY: 0, SELL: 1}
_TIF_CODE: Final = {tif: i for i, tif in enumerate(TIFS)}

_ID_BYTES: Final = 32
_KEY_BYTES: Final = 32
_SIG_BYTES: Final = 64
#: CBOR header of a 64-byte byte string, the last item of every op.
_SIG_HEADER: Final = b"\x58\x40"


class OrderBody(NamedTuple):
    """A limit order: ``price`` in ticks, ``quantity`` in lots."""

    side: str
    price: int
    quantity: int
    tif: str = GTC
    tag: str | None = None

    @property
    def kind(self) -> str:
        return ORDER


class CancelBody(NamedTuple):
    """Cancels the rest of ``order_id`` (an order of the same author in the cancel's past)."""

    order_id: bytes

    @property
    def kind(self) -> str:
        return CANCEL


Body = OrderBody | CancelBody


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
        "raw",
        "seq",
        "version",
    )

    version: int
    market_id: bytes
    author: bytes
    seq: int
    lamport: int
    parents: tuple[bytes, ...]
    body: Body
    raw: bytes
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
    def signature(self) -> bytes:
        """The 64-byte ed25519 signature: the last bytes of ``raw`` (not stored twice)."""
        return self.raw[-64:]

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


# Slot descriptors set fields without going through the immutable __setattr__.
_set_author = Op.__dict__["author"].__set__
_set_body = Op.__dict__["body"].__set__
_set_id = Op.__dict__["id"].__set__
_set_lamport = Op.__dict__["lamport"].__set__
_set_market_id = Op.__dict__["market_id"].__set__
_set_parents = Op.__dict__["parents"].__set__
_set_raw = Op.__dict__["raw"].__set__
_set_seq = Op.__dict__["seq"].__set__
_set_version = Op.__dict__["version"].__set__
_op_new = object.__new__


def _new_op(
    version: int,
    market_id: bytes,
    author: bytes,
    seq: int,
    lamport: int,
    parents: tuple[bytes, ...],
    body: Body,
    raw: bytes,
    ident: bytes,
) -> Op:
    op: Op = _op_new(Op)
    _set_version(op, version)
    _set_market_id(op, market_id)
    _set_author(op, author)
    _set_seq(op, seq)
    _set_lamport(op, lamport)
    _set_parents(op, parents)
    _set_body(op, body)
    _set_raw(op, raw)
    _set_id(op, ident)
    return op


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


def encode(op: Op) -> bytes:
    """The canonical encoding of ``op`` (the bytes its id is the hash of)."""
    return op.raw


def _body_to_wire(body: Body) -> list[Any]:
    if isinstance(body, OrderBody):
        return [
            _KIND_ORDER,
            _SIDE_CODE[body.side],
            body.price,
            body.quantity,
            _TIF_CODE[body.tif],
            body.tag,
        ]
    return [_KIND_CANCEL, body.order_id]


def _payload(
    market_id: bytes,
    author: bytes,
    seq: int,
    lamport: int,
    parents: tuple[bytes, ...],
    wire_body: list[Any],
) -> bytes:
    return cbor2.dumps(
        [PROTOCOL_VERSION, market_id, author, seq, lamport, list(parents), wire_body],
        canonical=True,
    )


def sign_op(
    identity: Identity,
    market_id: bytes,
    seq: int,
    lamport: int,
    parents: tuple[bytes, ...],
    body: Body,
) -> Op:
    """Build and sign an op. The result is checked exactly as a received op would be."""
    parents = tuple(sorted(parents))
    wire_body = _body_to_wire(body)
    payload = _payload(market_id, identity.public_key, seq, lamport, parents, wire_body)
    signature = identity.sign(SIGNATURE_DOMAIN + payload)
    raw = b"\x88" + payload[1:] + _SIG_HEADER + signature
    # Signing goes through the same gate as the wire: a caller cannot make an op that peers refuse.
    return decode(raw, verify=False)


def _is_uint(value: object) -> bool:
    return type(value) is int and 0 < value <= MAX_INT


def _is_id(value: object) -> bool:
    return type(value) is bytes and len(value) == _ID_BYTES


def _decode_body(wire: object) -> Body:
    if type(wire) is not list or not wire or type(wire[0]) is not int:
        raise MalformedOp("op body must be an array starting with its kind code")
    kind = wire[0]
    if kind == _KIND_ORDER:
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
        return OrderBody(_SIDES[side], price, quantity, TIFS[tif], tag)
    if kind == _KIND_CANCEL:
        if len(wire) != 2 or not _is_id(wire[1]):
            raise MalformedOp("a cancel body is [1, order_id] with a 32-byte order id")
        return CancelBody(wire[1])
    raise UnknownKind(f"unknown op kind {kind}: this node speaks protocol {PROTOCOL_VERSION}")


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
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise UnknownKind(f"op protocol version {version!r} is not {PROTOCOL_VERSION}")
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
    body = _decode_body(wire_body)
    try:
        payload = _payload(market_id, author, seq, lamport, tuple(parents), wire_body)
    except Exception as exc:  # defensive: types were checked above
        raise MalformedOp(f"op cannot be re-encoded: {exc}") from None
    if data != b"\x88" + payload[1:] + _SIG_HEADER + signature:
        raise NonCanonical("op is not in canonical CBOR form (re-encoding gives other bytes)")
    if verify:
        try:
            nacl.bindings.crypto_sign_open(signature + SIGNATURE_DOMAIN + payload, author)
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
        data,
        hashlib.sha256(data).digest(),
    )
