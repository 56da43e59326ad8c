"""The fast op codec against the reference one.

``decode`` runs a strict fixed-layout parser (``_decode_fast``) and falls back to the cbor2-based
reference (``_decode_slow``) for anything else; ``Op.raw``/``encode``/``sign_op`` use a
hand-written encoder. These tests hold them to the reference:

- Valid ops, encoded and signed independently (cbor2 + ed25519, not through ``_ops``): the fast
  parser accepts them, giving exactly the op ``_decode_slow`` gives; ``encode`` gives the bytes
  back; the hand-written encoder equals ``cbor2.dumps(..., canonical=True)``.
- Differential fuzzing: valid encodings mutated at the byte level (bit flips, inserts, deletes,
  truncation, trailing bytes), at the item level (longer heads, indefinite lengths, CBOR tags
  including stringref 25/256 and shared values 28/29, bignums and floats for integers, a random
  CBOR item in place of one), with out-of-range or ill-typed values, and random bytes. On each
  input ``decode`` and ``_decode_slow`` reach the same verdict (the same op, or the same error
  type and message), and ``_decode_fast`` accepts nothing the reference refuses.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import pickle
import re
import struct
from typing import Any

import cbor2
import pytest
from hypothesis import currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from strategies import AUTHORS, MARKET, examples

from crdtbook import (
    MAX_CLIENT_TAG_BYTES,
    MAX_OP_BYTES,
    MAX_PARENTS,
    BadParents,
    BadSignature,
    CancelBody,
    InvalidOp,
    MalformedOp,
    NonCanonical,
    Op,
    OrderBody,
    decode,
    encode,
    op_id,
)
from crdtbook._ops import (
    _PAYLOAD_START,
    _decode_fast,
    _decode_slow,
    _encode_chunks,
    _head,
    _uint,
    sign_op,
)

MAX_INT = 2**63 - 1
DOMAIN = b"crdtbook/op/v1\x00"
SIDES = ("buy", "sell")
TIFS = ("gtc", "ioc", "fok", "post_only")

# -- the reference: encoding and signing without crdtbook._ops ------------------------------------


def reference_op(payload_fields: list[Any], signer: int = 0) -> bytes:
    """The canonical op of seven wire fields, signed by ``AUTHORS[signer]`` (cbor2 + ed25519)."""
    payload = cbor2.dumps(payload_fields, canonical=True)
    signature = AUTHORS[signer].sign(DOMAIN + payload)
    return cbor2.dumps([*payload_fields, signature], canonical=True)


def op_fields(op: Op) -> tuple[Any, ...]:
    """Everything an op holds, with the types that matter (bool is not int, str subclasses...)."""
    body = op.body
    return (
        type(op),
        op.version,
        op.market_id,
        op.author,
        type(op.seq),
        op.seq,
        type(op.lamport),
        op.lamport,
        op.parents,
        tuple(type(p) for p in op.parents),
        type(body),
        tuple(type(x) for x in body),
        body,
        op.signature,
        op.id,
    )


def verdict(fn: Any, data: Any, verify: bool) -> tuple[Any, ...]:
    try:
        op = fn(data, verify=verify)
    except InvalidOp as exc:
        return ("refused", type(exc), str(exc))
    return ("accepted", op_fields(op))


def check_same_verdict(data: Any, verify: bool = False) -> str:
    """``decode`` and the fast parser agree with the reference on ``data``. Returns the verdict."""
    reference = verdict(_decode_slow, data, verify)
    assert verdict(decode, data, verify) == reference
    if isinstance(data, bytes):
        try:
            fast = _decode_fast(data, verify, None)
        except BadSignature as exc:  # the only error the fast parser may raise itself
            assert reference == ("refused", BadSignature, str(exc))
        else:
            if fast is not None:
                assert reference == ("accepted", op_fields(fast)), "fast parser accepted"
    if currently_in_test_context():  # hypothesis statistics: how often each verdict came up
        event(f"{reference[0]} {reference[1].__name__ if reference[0] == 'refused' else ''}")
    return str(reference[0])


# -- strategies -----------------------------------------------------------------------------------

ids = st.binary(min_size=32, max_size=32)
uints = st.one_of(
    st.integers(1, 30),
    st.integers(1, MAX_INT),
    st.sampled_from((23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, MAX_INT)),
)
tags = st.none() | st.text(max_size=MAX_CLIENT_TAG_BYTES).filter(
    lambda t: len(t.encode("utf-8")) <= MAX_CLIENT_TAG_BYTES
)
parent_counts = st.integers(0, 3) | st.sampled_from((0, 1, 2, 23, 24, 25, MAX_PARENTS))


@st.composite
def wire_bodies(draw: st.DrawFn) -> list[Any]:
    if draw(st.integers(0, 3)) == 0:
        return [1, draw(ids)]
    return [
        0,
        draw(st.integers(0, 1)),
        draw(uints),
        draw(uints),
        draw(st.integers(0, 3)),
        draw(tags),
    ]


@st.composite
def valid_payloads(draw: st.DrawFn) -> tuple[list[Any], int]:
    """Seven wire fields of a valid op, and which of AUTHORS signs it."""
    signer = draw(st.integers(0, len(AUTHORS) - 1))
    count = draw(parent_counts)
    if count <= 3:
        parents = sorted(draw(st.lists(ids, min_size=count, max_size=count, unique=True)))
    else:  # many distinct ids, without hypothesis having to find them one by one
        seed = draw(st.binary(max_size=8))
        parents = sorted(hashlib.sha256(seed + bytes([i])).digest() for i in range(count))
    return [
        1,
        draw(st.just(MARKET.id) | ids),
        AUTHORS[signer].public_key,
        draw(uints),
        draw(uints),
        parents,
        draw(wire_bodies()),
    ], signer


@st.composite
def valid_encodings(draw: st.DrawFn) -> bytes:
    payload, signer = draw(valid_payloads())
    return reference_op(payload, signer)


def to_body(wire: list[Any]) -> OrderBody | CancelBody:
    if wire[0] == 1:
        return CancelBody(wire[1])
    return OrderBody(SIDES[wire[1]], wire[2], wire[3], TIFS[wire[4]], wire[5])


# -- valid ops: the fast path gives the reference's op, the encoder the same bytes ----------------


@settings(max_examples=examples(2))
@given(payload=valid_payloads())
def test_fast_decode_equals_reference_on_valid_ops(payload):
    fields, signer = payload
    raw = reference_op(fields, signer)
    for verify in (False, True):
        fast = _decode_fast(raw, verify, None)
        assert fast is not None, "a valid op must take the fast path"
        slow = _decode_slow(raw, verify=verify)
        assert op_fields(fast) == op_fields(slow)
        assert op_fields(decode(raw, verify=verify)) == op_fields(slow)
    op = decode(raw)
    assert op.id == op_id(raw) == hashlib.sha256(raw).digest()
    assert encode(op) == op.raw == raw
    assert op.signature == raw[-64:] and len(op.signature) == 64
    assert op.body == to_body(fields[6]) and list(op.parents) == fields[5]
    assert pickle.loads(pickle.dumps(op)) == op


@settings(max_examples=examples(1))
@given(payload=valid_payloads())
def test_intern_id_is_applied_alike(payload):
    fields, signer = payload
    raw = reference_op(fields, signer)
    held = {p: bytes(bytearray(p)) for p in fields[5]}  # equal, but other objects
    calls: dict[str, list[bytes]] = {"fast": [], "slow": []}

    def interner(name: str) -> Any:
        def intern(ident: bytes) -> bytes:
            calls[name].append(ident)
            return held[ident]

        return intern

    fast = decode(raw, verify=False, intern_id=interner("fast"))
    slow = _decode_slow(raw, verify=False, intern_id=interner("slow"))
    assert calls["fast"] == calls["slow"] == fields[5]
    assert fast.parents == slow.parents
    assert all(p is held[p] for p in fast.parents)


@settings(max_examples=examples(2))
@given(payload=valid_payloads(), signature=st.binary(min_size=64, max_size=64))
def test_encoder_equals_cbor2_canonical(payload, signature):
    fields, _ = payload
    market_id, author, seq, lamport, parents, wire = fields[1:]
    body = to_body(wire)
    reference = cbor2.dumps(fields, canonical=True)
    chunks = _encode_chunks(_PAYLOAD_START, market_id, author, seq, lamport, parents, body)
    assert b"".join(chunks) == reference
    # A whole op: decode (verify=False) takes any signature; encode writes it back in place.
    raw = cbor2.dumps([*fields, signature], canonical=True)
    op = decode(raw, verify=False)
    assert encode(op) == raw


@given(
    value=st.integers(0, 2**64 - 1)
    | st.sampled_from((0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1))
)
def test_uint_equals_cbor2(value):
    assert _uint(value) == cbor2.dumps(value, canonical=True)


def test_array_and_text_heads_equal_cbor2():
    for n in range(MAX_PARENTS + 1):
        assert _head(4, n) == cbor2.dumps([0] * n, canonical=True)[: len(_head(4, n))]
    for n in range(MAX_CLIENT_TAG_BYTES + 1):
        assert _head(3, n) + b"a" * n == cbor2.dumps("a" * n, canonical=True)


@settings(max_examples=examples(1))
@given(payload=valid_payloads())
def test_sign_op_gives_the_reference_bytes(payload):
    fields, signer = payload
    _, market_id, _, seq, lamport, parents, wire = fields
    op = sign_op(AUTHORS[signer], market_id, seq, lamport, tuple(reversed(parents)), to_body(wire))
    assert op.raw == reference_op(fields, signer)  # ed25519 signing is deterministic


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 0},
        {"seq": -1},
        {"seq": MAX_INT + 1},
        {"seq": 2**64 - 1},
        {"seq": 2**64},
        {"seq": True},
        {"lamport": 0},
        {"lamport": 2**70},
        {"price": 0},
        {"price": -(2**70)},
        {"quantity": MAX_INT + 1},
        {"tag": "x" * (MAX_CLIENT_TAG_BYTES + 1)},
        {"tag": "\u00e9" * 17},
        {"market_id": b"\x00" * 31},
        {"market_id": bytearray(32)},
        {"market_id": bytearray(MARKET.id)},
        {"parents": (b"\x01" * 33,)},
        {"parents": tuple(hashlib.sha256(bytes([i])).digest() for i in range(MAX_PARENTS + 1))},
        {"order_id": b"\x00" * 31},
    ],
)
def test_sign_op_out_of_range_is_refused_as_the_reference_refuses(change):
    """Out of the hand-written encoder's domain, sign_op encodes with cbor2 as it always did:
    the same error, with the same message, as the reference decoder gives those bytes."""
    args: dict[str, Any] = {
        "market_id": MARKET.id,
        "seq": 3,
        "lamport": 4,
        "parents": (),
        "price": 100,
        "quantity": 5,
        "tag": None,
        "order_id": None,
    }
    args.update(change)
    if args["order_id"] is not None:
        body: Any = CancelBody(args["order_id"])
        wire: list[Any] = [1, args["order_id"]]
    else:
        body = OrderBody("buy", args["price"], args["quantity"], "gtc", args["tag"])
        wire = [0, 0, args["price"], args["quantity"], 0, args["tag"]]
    parents = sorted(args["parents"])
    author = AUTHORS[0].public_key
    reference = reference_op(
        [1, args["market_id"], author, args["seq"], args["lamport"], parents, wire]
    )

    def sign() -> Op:
        return sign_op(
            AUTHORS[0], args["market_id"], args["seq"], args["lamport"], args["parents"], body
        )

    try:
        expected = _decode_slow(reference, verify=False)
    except InvalidOp as exc:
        with pytest.raises(type(exc), match="^" + re.escape(str(exc)) + "$"):
            sign()
    else:  # e.g. a bytearray market id: cbor2 writes it as bytes, a valid op
        assert op_fields(sign()) == op_fields(expected)


def test_ops_hold_no_encoding():
    op = sign_op(AUTHORS[0], MARKET.id, 1, 1, (), OrderBody("buy", 100, 5, "gtc", "t"))
    assert "raw" not in Op.__slots__ and "signature" in Op.__slots__
    assert not hasattr(op, "__dict__")
    assert type(op) is Op
    with pytest.raises(AttributeError):
        op.signature = bytes(64)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        op.raw = b""  # type: ignore[misc]
    assert decode(op.raw) == op


# -- an independent CBOR writer with non-canonical forms ------------------------------------------
#
# Items are numbered in a pre-order walk; ``forms`` maps an item's number to how to write it
# instead of canonically. Every form writes the same data model value (cbor2 decodes it to an
# equal value, or refuses it), only in other bytes.

FORMS = (
    "wide",  # the next longer head for the integer or length
    "wide8",  # an 8-byte head
    "indefinite",  # arrays, byte and text strings: indefinite length (two chunks for strings)
    "tag",  # wrapped in a CBOR tag (number drawn separately)
    "bignum",  # an integer as tag 2 + bytes
    "float",  # an integer as a float, when exact
    "stringref",  # a string as tag 25 (a reference), with the op wrapped in tag 256
    "shared",  # wrapped in tag 28 (shareable)
    "sharedref",  # replaced by tag 29 (a reference to shareable value 0)
    "random",  # replaced by a random CBOR item (drawn separately)
)
TAG_NUMBERS = (0, 1, 2, 3, 21, 24, 25, 28, 29, 30, 35, 256, 258, 55799, 2**32)


def head(major: int, value: int, width: int | None = None) -> bytes:
    """A head with the shortest argument, or one of ``width`` bytes (0, 1, 2, 4, 8)."""
    if width is None:
        width = next(w for w in (0, 1, 2, 4, 8) if (value < 24 if w == 0 else value < 1 << 8 * w))
    if width == 0:
        return bytes([major << 5 | value])
    ai = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | ai]) + value.to_bytes(width, "big")


class Writer:
    def __init__(
        self, forms: dict[int, str], tag_number: int = 0, random_item: bytes = b""
    ) -> None:
        self.forms = forms
        self.tag_number = tag_number
        self.random_item = random_item
        self.position = 0
        self.stringref = False

    def head(self, major: int, value: int, form: str | None) -> bytes:
        if form == "wide":
            widths = [w for w in (1, 2, 4, 8) if value < 1 << 8 * w]
            shortest = 0 if value < 24 else widths[0]
            longer = [w for w in widths if w > shortest]
            return head(major, value, longer[0] if longer else None)
        if form == "wide8":
            return head(major, value, 8)
        return head(major, value)

    def item(self, x: Any) -> bytes:
        form = self.forms.get(self.position)
        self.position += 1
        if form == "tag":
            return head(6, self.tag_number) + self.plain(x, None)
        if form == "shared":
            return b"\xd8\x1c" + self.plain(x, None)
        if form == "sharedref":
            self.skip(x)
            return b"\xd8\x1d\x00"
        if form == "random":
            self.skip(x)
            return self.random_item
        if form == "stringref" and type(x) in (bytes, str):
            self.stringref = True
            self.skip(x)
            return b"\xd8\x19\x00"
        return self.plain(x, form)

    def skip(self, x: Any) -> None:
        """Number the items inside ``x`` as if written (so later positions keep their items)."""
        if type(x) in (list, tuple):
            for i in x:
                self.position += 1
                self.skip(i)

    def plain(self, x: Any, form: str | None) -> bytes:
        if x is None:
            return b"\xf6"
        if type(x) is bool:
            return b"\xf5" if x else b"\xf4"
        if type(x) is float:
            return b"\xfb" + struct.pack(">d", x)
        if type(x) is int:
            if form == "bignum" and x >= 0:
                data = x.to_bytes(max(1, (x.bit_length() + 7) // 8), "big")
                return b"\xc2" + head(2, len(data)) + data
            if form == "float" and x >= 0 and float(x) == x:
                return b"\xfb" + struct.pack(">d", float(x))
            return self.head(0, x, form) if x >= 0 else self.head(1, -1 - x, form)
        if type(x) in (bytes, str):
            major = 2 if type(x) is bytes else 3
            data = x if type(x) is bytes else x.encode("utf-8", "surrogatepass")
            if form == "indefinite":
                cut = len(data) // 2
                chunks = head(major, cut) + data[:cut] + head(major, len(data) - cut) + data[cut:]
                return bytes([major << 5 | 31]) + chunks + b"\xff"
            return self.head(major, len(data), form) + data
        if type(x) in (list, tuple):
            if form == "indefinite":
                return b"\x9f" + b"".join(self.item(i) for i in x) + b"\xff"
            return self.head(4, len(x), form) + b"".join(self.item(i) for i in x)
        raise TypeError(type(x))


def write(x: Any, forms: dict[int, str] | None = None, **kw: Any) -> bytes:
    w = Writer(forms or {}, **kw)
    data = w.item(x)
    return b"\xd9\x01\x00" + data if w.stringref else data


def count_items(x: Any) -> int:
    w = Writer({})
    w.item(x)
    return w.position


def test_the_writer_is_canonical_cbor():
    op = sign_op(AUTHORS[0], MARKET.id, 300, 70_000, (), OrderBody("sell", 2**40, 24, "fok", "é"))
    fields = cbor2.loads(op.raw)
    assert write(fields) == op.raw


# -- differential fuzzing -------------------------------------------------------------------------

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.binary(max_size=40)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=8)
        | st.dictionaries(st.integers(0, 9), children, max_size=3)
        | st.builds(cbor2.CBORTag, st.sampled_from(TAG_NUMBERS[:-1]), children)
    ),
    max_leaves=12,
)


def dumps(value: Any) -> bytes:
    try:
        return cbor2.dumps(value)
    except Exception:
        return b"\x80"


@st.composite
def item_variants(draw: st.DrawFn) -> bytes:
    """A valid op re-encoded with one to three items in a non-canonical form."""
    fields = cbor2.loads(draw(valid_encodings()))
    total = count_items(fields)
    positions = draw(st.lists(st.integers(0, total - 1), min_size=1, max_size=3, unique=True))
    forms = {p: draw(st.sampled_from(FORMS)) for p in positions}
    return write(
        fields,
        forms,
        tag_number=draw(st.sampled_from(TAG_NUMBERS)),
        random_item=dumps(draw(cbor_values)),
    )


#: Values that break one rule each (or none: some are valid, for the walk's sake).
ODD_VALUES = st.sampled_from(
    (
        0,
        1,
        2,
        3,
        4,
        23,
        24,
        -1,
        -(2**64),
        MAX_INT,
        MAX_INT + 1,
        2**64 - 1,
        True,
        False,
        None,
        1.0,
        b"",
        b"\x00" * 31,
        b"\x00" * 32,
        b"\x00" * 33,
        b"\x00" * 64,
        "",
        "x" * 32,
        "x" * 33,
        "\u00e9" * 16,
        "\u00e9" * 17,
        "\ud800",  # a lone surrogate: written as its (invalid) UTF-8 bytes
        [],
        [0],
        [1, b"\x00" * 32],
        [0, 0, 1, 1, 0, None],
        [0, 0, 1, 1, 0, None, 0],
        [2, 0],
    )
).map(copy.deepcopy)  # the lists get mutated below


@st.composite
def value_variants(draw: st.DrawFn) -> bytes:
    """A valid op with one or two items (at any depth) replaced by odd values, written
    canonically: only value rules (types, bounds, order, counts) can fail."""
    fields = cbor2.loads(draw(valid_encodings()))
    for _ in range(draw(st.integers(1, 2))):
        container: list[Any] = fields
        index = draw(st.integers(0, len(container) - 1))
        # Walk down into the parents or the body sometimes.
        while type(container[index]) is list and container[index] and draw(st.booleans()):
            container = container[index]
            index = draw(st.integers(0, len(container) - 1))
        how = draw(st.integers(0, 3))
        if how == 0:
            container[index] = draw(ODD_VALUES)
        elif how == 1 and type(container[index]) is list:
            del container[index][draw(st.integers(0, max(0, len(container[index]) - 1))) :]
        elif how == 2:
            container.insert(index, draw(ODD_VALUES))
        else:
            del container[index]
    if draw(st.booleans()) and len(fields) > 5 and type(fields[5]) is list and fields[5]:
        parents = fields[5]
        if draw(st.booleans()):  # a duplicate, kept in sorted order
            parents.insert(draw(st.integers(0, len(parents) - 1)), parents[0])
            parents.sort(key=lambda p: p if type(p) is bytes else b"")
        else:
            fields[5] = draw(st.permutations(parents))  # most likely unsorted
    return write(fields)


@st.composite
def byte_variants(draw: st.DrawFn) -> bytes:
    """A valid op with one to four byte-level mutations."""
    raw = bytearray(draw(valid_encodings()))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(("flip", "replace", "insert", "delete", "truncate", "append")))
        at = draw(st.integers(0, len(raw)))
        if how == "flip" and raw:
            bit = draw(st.integers(0, len(raw) * 8 - 1))
            raw[bit // 8] ^= 1 << (bit % 8)
        elif how == "replace":
            chunk = draw(st.binary(min_size=1, max_size=4))
            raw[at : at + len(chunk)] = chunk
        elif how == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif how == "delete":
            del raw[at : at + draw(st.integers(1, 4))]
        elif how == "truncate":
            del raw[at:]
        else:
            raw += draw(st.sampled_from((b"\x00", b"\xf6", b"\xff", b"\x80", bytes(raw))))
    return bytes(raw)


@settings(max_examples=examples(10))
@given(data=byte_variants())
def test_byte_mutations_same_verdict(data):
    check_same_verdict(data)


@settings(max_examples=examples(10))
@given(data=item_variants())
def test_non_canonical_items_same_verdict(data):
    check_same_verdict(data)  # a "random" item can make another valid op: no verdict assumed


@settings(max_examples=examples(10))
@given(data=value_variants())
def test_odd_values_same_verdict(data):
    check_same_verdict(data)


@settings(max_examples=examples(3))
@given(data=byte_variants() | item_variants() | value_variants())
def test_mutations_same_verdict_with_verification(data):
    check_same_verdict(data, verify=True)


@settings(max_examples=examples(5))
@given(
    data=st.binary(max_size=400)
    | st.builds(
        lambda head, tail: head + tail,
        st.sampled_from(
            (b"\x88", b"\x88\x01", b"\x88\x01\x58\x20" + bytes(32) + b"\x58\x20" + bytes(32))
        ),
        st.binary(max_size=300),
    )
)
def test_random_bytes_same_verdict(data):
    check_same_verdict(data)


@settings(max_examples=examples(3))
@given(value=cbor_values)
def test_random_cbor_same_verdict(value):
    check_same_verdict(dumps(value))


# -- deterministic cases: every item, every form --------------------------------------------------

SAMPLES = [
    sign_op(AUTHORS[0], MARKET.id, 3, 7, (), OrderBody("buy", 100, 5, "gtc", "tag-1")),
    sign_op(
        AUTHORS[1],
        MARKET.id,
        300,
        70_000,
        tuple(hashlib.sha256(bytes([i])).digest() for i in range(3)),
        OrderBody("sell", MAX_INT, 2**32, "post_only", "\u00e9" * 16),
    ),
    sign_op(
        AUTHORS[2],
        MARKET.id,
        2**40,
        25,
        tuple(hashlib.sha256(bytes([i])).digest() for i in range(24)),
        CancelBody(hashlib.sha256(b"x").digest()),
    ),
]


@pytest.mark.parametrize("sample", range(len(SAMPLES)))
@pytest.mark.parametrize("form", [f for f in FORMS if f not in ("random", "tag")])
def test_every_item_in_every_form_is_refused_alike(sample, form):
    op = SAMPLES[sample]
    fields = cbor2.loads(op.raw)
    same = 0
    for position in range(count_items(fields)):
        variant = write(fields, {position: form})
        if variant == op.raw:
            continue
        assert check_same_verdict(variant) == "refused"
        with contextlib.suppress(Exception):  # some forms are not even CBOR cbor2 reads
            same += cbor2.loads(variant) == fields
    if form in ("wide", "indefinite", "shared"):
        assert same, "some variants must decode to the very same values"


@pytest.mark.parametrize("number", TAG_NUMBERS)
def test_every_item_wrapped_in_a_tag_is_refused_alike(number):
    op = SAMPLES[1]
    fields = cbor2.loads(op.raw)
    for position in range(count_items(fields)):
        check_same_verdict(write(fields, {position: "tag"}, tag_number=number))


def test_stringref_and_shared_value_encodings_of_the_same_op_are_non_canonical():
    # A cancel of an op that is also its parent: the same 32 bytes twice, so references apply.
    parent = SAMPLES[0].id
    op = sign_op(AUTHORS[0], MARKET.id, 2, 8, (parent,), CancelBody(parent))
    raw = op.raw
    at = raw.index(b"\x58\x20" + parent, 70)  # the parent (after author); then the cancel
    later = raw.index(b"\x58\x20" + parent, at + 1)
    item = raw[at : at + 34]
    variants = [
        # stringref: the namespace (tag 256) around the op, the second string as a reference
        # (tag 25): index 2, after the market id and the author.
        (b"\xd9\x01\x00" + raw[:later] + b"\xd8\x19\x02" + raw[later + 34 :], NonCanonical),
        # shared values: the first string marked shareable (28), the second a reference 29(0).
        (
            raw[:at]
            + b"\xd8\x1c"
            + item
            + raw[at + 34 : later]
            + b"\xd8\x1d\x00"
            + raw[later + 34 :],
            NonCanonical,
        ),
        # a namespace or shareable mark alone, around the whole op
        (b"\xd9\x01\x00" + raw, NonCanonical),
        (b"\xd8\x1c" + raw, NonCanonical),
        # self-described CBOR (tag 55799): cbor2 gives the arrays under it as tuples, which the
        # reference refuses as not an array
        (b"\xd9\xd9\xf7" + raw, MalformedOp),
    ]
    for variant, error in variants:
        assert as_lists(cbor2.loads(variant)) == cbor2.loads(raw)  # the very same data
        assert check_same_verdict(variant) == "refused"
        with pytest.raises(error):
            decode(variant)


def as_lists(value: Any) -> Any:
    """cbor2 decodes arrays under some tags as tuples: the same data for these tests."""
    if type(value) in (list, tuple):
        return [as_lists(v) for v in value]
    return value


def test_parent_count_heads_at_the_boundaries():
    for count in (23, 24, MAX_PARENTS):
        parents = tuple(hashlib.sha256(i.to_bytes(2, "big")).digest() for i in range(count))
        op = sign_op(AUTHORS[0], MARKET.id, 1, 2, parents, OrderBody("buy", 1, 1))
        assert _decode_fast(op.raw, True, None) is not None
        fields = cbor2.loads(op.raw)
        # Items in pre-order: 0 the op, 1 version, 2 market, 3 author, 4 seq, 5 Lamport, 6 parents.
        for forms in ({6: "wide"}, {6: "wide8"}, {6: "indefinite"}):
            assert check_same_verdict(write(fields, forms)) == "refused"
    too_many = [hashlib.sha256(i.to_bytes(2, "big")).digest() for i in range(MAX_PARENTS + 1)]
    fields[5] = sorted(too_many)
    assert check_same_verdict(write(fields)) == "refused"


def test_unsorted_and_duplicate_parents_same_verdict():
    fields = cbor2.loads(SAMPLES[1].raw)
    a, b, c = fields[5]
    for parents in ([a, a], [a, a, b], [a, b, b], [a, b, b, c], [b, a], [a, c, b], [c, b, a]):
        fields[5] = parents
        assert check_same_verdict(write(fields)) == "refused"
        with pytest.raises(BadParents):
            decode(write(fields), verify=False)


def test_every_single_bit_flip_of_samples_same_verdict():
    accepted = 0
    for op in SAMPLES:
        for bit in range(len(op.raw) * 8):
            flipped = bytearray(op.raw)
            flipped[bit // 8] ^= 1 << (bit % 8)
            accepted += check_same_verdict(bytes(flipped)) == "accepted"
    assert accepted  # flips in ids and signatures keep a well-formed op (verify=False)


def test_every_truncation_and_trailing_byte_same_verdict():
    for op in SAMPLES:
        raw = op.raw
        for cut in range(len(raw)):
            assert check_same_verdict(raw[:cut]) == "refused"
        for extra in (b"\x00", b"\xf6", b"\xff", raw):
            assert check_same_verdict(raw + extra) == "refused"
    # Near the size limit, and past it.
    assert check_same_verdict(SAMPLES[0].raw + bytes(MAX_OP_BYTES)) == "refused"


def test_text_tag_edges_same_verdict():
    """Tags at the length limit, with every UTF-8 width, and invalid UTF-8 in a well-formed
    text string (which cbor2 refuses to decode)."""
    fields = cbor2.loads(SAMPLES[0].raw)
    texts: list[bytes] = [
        b"",
        b"a" * 23,
        b"a" * 24,
        b"a" * 32,
        b"a" * 33,
        "\U0010ffff\uffff\x00".encode(),
        b"\xc0\x80",  # overlong NUL
        b"\xed\xa0\x80",  # an encoded surrogate
        b"\xf4\x90\x80\x80",  # above U+10FFFF
        b"\xff",
        b"a\x80",
        b"\xe2\x82",  # truncated
    ]
    for text in texts:
        for width in (None, 1, 2):
            wire = fields[6]
            body = (
                head(4, 6)
                + b"".join(head(0, v) for v in wire[:5])
                + head(3, len(text), width)
                + text
            )
            payload_head = write(fields[:6])[1:]  # the six items before the body
            data = b"\x88" + payload_head + body + b"\x58\x40" + fields[7]
            check_same_verdict(data)
