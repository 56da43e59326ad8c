"""The op codec: canonical CBOR, ids, signatures, bounds, and refusal of everything else.

- Round trip: any signable op decodes to the same fields; ``encode`` gives the signed bytes; the
  id is SHA-256 of them; an independent CBOR writer (below) reproduces the bytes exactly.
- Canonical form is unique: the same data with any one longer CBOR head, an indefinite-length
  item, trailing bytes, unsorted or duplicate parents is refused.
- Any flipped bit of a signed op is refused (hypothesis over the bit index).
- Random bytes, random CBOR and mutated ops make ``decode`` raise only ``InvalidOp`` subclasses.
- Each bound and shape rule raises its typed error; oversize input is refused.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import AUTHORS, MARKET, examples, run_plan, union_ops

from crdtbook import (
    MAX_CLIENT_TAG_BYTES,
    MAX_OP_BYTES,
    MAX_PARENTS,
    PROTOCOL_VERSION,
    BadParents,
    BadSignature,
    CancelBody,
    InvalidOp,
    LimitExceeded,
    MalformedOp,
    NonCanonical,
    Op,
    OrderBody,
    UnknownKind,
    decode,
    encode,
    op_id,
)
from crdtbook._ops import sign_op

MAX_INT = 2**63 - 1
SIG_DOMAIN = b"crdtbook/op/v1\x00"

# -- an independent canonical CBOR writer ---------------------------------------------------------
#
# Deterministic CBOR (RFC 8949 4.2.1) for the few types an op uses. ``widen`` names heads (by their
# position in a pre-order walk) to write with a longer argument than needed; ``indefinite`` does
# the same for arrays/byte strings to write with indefinite length.


class _Writer:
    def __init__(self, widen: set[int] = frozenset(), indefinite: set[int] = frozenset()) -> None:
        self.widen = widen
        self.indefinite = indefinite
        self.count = 0  # heads written so far (positions for widen/indefinite)

    def head(self, major: int, value: int) -> bytes:
        position = self.count
        self.count += 1
        # Every width that can hold the value, shortest first; widening takes the next one.
        widths: list[tuple[int, int]] = [(0, value)] if value < 24 else []
        widths += [(w, ai) for ai, w in ((24, 1), (25, 2), (26, 4), (27, 8)) if value < 1 << 8 * w]
        width, ai = widths[1] if position in self.widen and len(widths) > 1 else widths[0]
        if width == 0:
            return bytes([major << 5 | value])
        return bytes([major << 5 | ai]) + value.to_bytes(width, "big")

    def item(self, x: Any) -> bytes:
        if x is None:
            return b"\xf6"
        if type(x) is int:
            return self.head(0, x) if x >= 0 else self.head(1, -1 - x)
        if type(x) is bytes:
            position = self.count
            if position in self.indefinite:
                self.count += 1
                return b"\x5f" + self.head(2, len(x)) + x + b"\xff"
            return self.head(2, len(x)) + x
        if type(x) is str:
            data = x.encode("utf-8")
            return self.head(3, len(data)) + data
        if type(x) in (list, tuple):
            position = self.count
            if position in self.indefinite:
                self.count += 1
                return b"\x9f" + b"".join(self.item(i) for i in x) + b"\xff"
            return self.head(4, len(x)) + b"".join(self.item(i) for i in x)
        raise TypeError(type(x))


def write(x: Any, widen: set[int] = frozenset(), indefinite: set[int] = frozenset()) -> bytes:
    return _Writer(widen, indefinite).item(x)


def count_heads(x: Any) -> int:
    w = _Writer()
    w.item(x)
    return w.count


def wire_fields(op: Op, parents: list[bytes] | None = None) -> list[Any]:
    body = op.body
    if isinstance(body, OrderBody):
        wire_body: list[Any] = [
            0,
            ("buy", "sell").index(body.side),
            body.price,
            body.quantity,
            ("gtc", "ioc", "fok", "post_only").index(body.tif),
            body.tag,
        ]
    else:
        wire_body = [1, body.order_id]
    return [
        op.version,
        op.market_id,
        op.author,
        op.seq,
        op.lamport,
        list(op.parents if parents is None else parents),
        wire_body,
        op.signature,
    ]


def resign(fields: list[Any], identity_index: int = 0) -> bytes:
    """Canonical bytes of ``fields`` (a full 8-item op array) with a valid signature."""
    payload = cbor2.dumps(fields[:7], canonical=True)
    signature = AUTHORS[identity_index].sign(SIG_DOMAIN + payload)
    return cbor2.dumps([*fields[:7], signature], canonical=True)


# -- strategies -------------------------------------------------------------------------------

ids = st.binary(min_size=32, max_size=32)
uints = st.one_of(
    st.integers(1, 30),
    st.integers(1, MAX_INT),
    st.sampled_from((23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, MAX_INT)),
)
tags = st.none() | st.text(max_size=32).filter(
    lambda t: len(t.encode("utf-8")) <= MAX_CLIENT_TAG_BYTES
)
order_bodies = st.builds(
    OrderBody,
    side=st.sampled_from(("buy", "sell")),
    price=uints,
    quantity=uints,
    tif=st.sampled_from(("gtc", "ioc", "fok", "post_only")),
    tag=tags,
    stp=st.just("expire_maker"),  # version 1 has only this mode
)
bodies = order_bodies | st.builds(CancelBody, order_id=ids)


@st.composite
def signed_ops(draw: st.DrawFn) -> Op:
    identity = draw(st.sampled_from(AUTHORS))
    market_id = draw(st.just(MARKET.id) | ids)
    parents = draw(st.lists(ids, max_size=MAX_PARENTS, unique=True).map(tuple))
    return sign_op(identity, market_id, draw(uints), draw(uints), parents, draw(bodies))


def sample_op(body: Any = None, parents: tuple[bytes, ...] = ()) -> Op:
    body = body or OrderBody("buy", 100, 5, "gtc", "tag-1")
    return sign_op(AUTHORS[0], MARKET.id, 3, 7, parents, body)


PARENTS3 = tuple(hashlib.sha256(bytes([i])).digest() for i in range(3))


# -- round trip -------------------------------------------------------------------------------


@settings(max_examples=examples(2))
@given(op=signed_ops())
def test_round_trip(op):
    again = decode(op.raw)
    assert again == op
    assert encode(again) == op.raw == again.raw
    assert op.id == again.id == op_id(op.raw) == hashlib.sha256(op.raw).digest()
    for name in (
        "version",
        "market_id",
        "author",
        "seq",
        "lamport",
        "parents",
        "body",
        "signature",
    ):
        assert getattr(again, name) == getattr(op, name)
    assert again.parents == tuple(sorted(op.parents))
    assert again.key == (op.lamport, op.id)
    assert op.version == PROTOCOL_VERSION
    assert len(op.raw) <= MAX_OP_BYTES
    # An independent deterministic CBOR writer produces the very same bytes.
    assert write(wire_fields(op)) == op.raw
    assert pickle.loads(pickle.dumps(op)) == op


def test_sign_op_sorts_parents_and_signature_verifies():
    op = sample_op(parents=tuple(reversed(PARENTS3)))
    assert op.parents == tuple(sorted(PARENTS3))
    payload = op.raw[:-66]
    assert op.raw[-66:-64] == b"\x58\x40"
    assert decode(op.raw, verify=True) == op
    # The signature covers the domain-separated payload (array head 0x87 for 7 items).
    import nacl.bindings

    message = SIG_DOMAIN + b"\x87" + payload[1:]
    nacl.bindings.crypto_sign_open(op.signature + message, op.author)


def test_ops_are_immutable_and_only_come_from_decode_or_signing():
    op = sample_op()
    with pytest.raises(TypeError):
        Op()
    with pytest.raises(AttributeError):
        op.seq = 4  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del op.lamport
    assert op.kind == "order" and sample_op(CancelBody(op.id)).kind == "cancel"
    assert {op, decode(op.raw)} == {op}


@pytest.mark.parametrize("value", [1, 23, 24, 255, 256, 65535, 65536, 2**32, MAX_INT])
def test_integer_bounds_accepted(value):
    op = sign_op(AUTHORS[0], MARKET.id, value, value, (), OrderBody("sell", value, value))
    assert decode(op.raw).body.price == value


@pytest.mark.parametrize("value", [0, -1, MAX_INT + 1, 2**64 - 1])
def test_integer_bounds_refused(value):
    with pytest.raises(LimitExceeded):
        sign_op(AUTHORS[0], MARKET.id, 1, 1, (), OrderBody("sell", value, 1))
    with pytest.raises(LimitExceeded):
        sign_op(AUTHORS[0], MARKET.id, 1, 1, (), OrderBody("sell", 1, value))
    with pytest.raises(LimitExceeded):
        sign_op(AUTHORS[0], MARKET.id, value, 1, (), OrderBody("sell", 1, 1))
    with pytest.raises(LimitExceeded):
        sign_op(AUTHORS[0], MARKET.id, 1, value, (), OrderBody("sell", 1, 1))


def test_maximal_op_fits():
    parents = tuple(hashlib.sha256(i.to_bytes(2, "big")).digest() for i in range(MAX_PARENTS))
    tag = "\u00e9" * (MAX_CLIENT_TAG_BYTES // 2)  # 32 bytes of UTF-8
    op = sign_op(
        AUTHORS[0],
        MARKET.id,
        MAX_INT,
        MAX_INT,
        parents,
        OrderBody("buy", MAX_INT, MAX_INT, "post_only", tag),
    )
    assert len(op.raw) <= MAX_OP_BYTES
    assert decode(op.raw) == op


# -- canonical form ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [OrderBody("buy", 100, 5, "gtc", "tag-1"), CancelBody(PARENTS3[0])]
)
def test_every_longer_head_is_refused(body):
    op = sample_op(body, parents=PARENTS3)
    fields = wire_fields(op)
    assert write(fields) == op.raw
    heads = count_heads(fields)
    tested = 0
    for position in range(heads):
        variant = write(fields, widen={position})
        if variant == op.raw:
            continue  # an 8-byte argument has no longer form
        assert cbor2.loads(variant) == cbor2.loads(op.raw)  # the same data
        with pytest.raises(NonCanonical):
            decode(variant)
        tested += 1
    assert tested == heads  # this op has no 8-byte integers


@settings(max_examples=examples(1))
@given(op=signed_ops(), data=st.data())
def test_longer_head_refused_for_any_op(op, data):
    fields = wire_fields(op)
    position = data.draw(st.integers(0, count_heads(fields) - 1))
    variant = write(fields, widen={position})
    if variant == op.raw:
        return  # an 8-byte argument has no longer form
    with pytest.raises(NonCanonical):
        decode(variant)


def test_indefinite_lengths_are_refused():
    op = sample_op(parents=PARENTS3)
    fields = wire_fields(op)
    tested = 0
    for position in range(count_heads(fields)):
        variant = write(fields, indefinite={position})
        if variant == op.raw:
            continue  # that head was not an array or byte string
        assert cbor2.loads(variant) == cbor2.loads(op.raw)
        with pytest.raises(NonCanonical):
            decode(variant)
        tested += 1
    assert tested == 3 + 6  # 3 arrays (op, parents, body); 6 byte strings (2 keys, 3 parents, sig)


def test_trailing_bytes_are_refused():
    op = sample_op()
    for extra in (b"\x00", b"\xf6", op.raw):
        with pytest.raises(InvalidOp):
            decode(op.raw + extra)


def test_unsorted_or_duplicate_parents_are_refused():
    op = sample_op(parents=PARENTS3)
    for parents in (
        list(reversed(op.parents)),
        [op.parents[1], op.parents[0], op.parents[2]],
        [op.parents[0], op.parents[0], op.parents[1]],
        [op.parents[0], op.parents[0]],
    ):
        with pytest.raises(BadParents):
            decode(write(wire_fields(op, parents)))


def test_other_encodings_of_the_same_values_are_refused():
    op = sample_op()  # seq 3, Lamport 7
    fields = cbor2.loads(op.raw)
    seq_at = 2 + 34 + 34  # array head, version, market id, author
    assert op.raw[seq_at : seq_at + 2] == b"\x03\x07"
    # seq as a bignum (tag 2): the same integer, other bytes.
    variant = op.raw[:seq_at] + b"\xc2\x41\x03" + op.raw[seq_at + 1 :]
    assert cbor2.loads(variant) == fields
    with pytest.raises(NonCanonical):
        decode(variant)
    # A float Lamport time (half precision 7.0) is not an op's integer at all.
    variant = op.raw[: seq_at + 1] + b"\xf9\x47\x00" + op.raw[seq_at + 2 :]
    assert cbor2.loads(variant)[4] == 7.0
    with pytest.raises(LimitExceeded):
        decode(variant)


# -- signatures and bit flips -----------------------------------------------------------------


@settings(max_examples=examples(3))
@given(op=signed_ops(), data=st.data())
def test_any_flipped_bit_is_refused(op, data):
    bit = data.draw(st.integers(0, len(op.raw) * 8 - 1), label="bit")
    flipped = bytearray(op.raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(InvalidOp):
        decode(bytes(flipped))


def test_every_bit_of_one_op_is_covered():
    """Exhaustively, for one order and one cancel."""
    for op in (sample_op(parents=PARENTS3[:2]), sample_op(CancelBody(PARENTS3[2]))):
        for bit in range(len(op.raw) * 8):
            flipped = bytearray(op.raw)
            flipped[bit // 8] ^= 1 << (bit % 8)
            with pytest.raises(InvalidOp):
                decode(bytes(flipped))


def test_bad_signature_is_typed_and_verify_false_skips_only_the_signature():
    op = sample_op()
    forged = op.raw[:-1] + bytes([op.raw[-1] ^ 0x01])
    with pytest.raises(BadSignature):
        decode(forged)
    assert decode(forged, verify=False).body == op.body
    # Another key's signature over the same payload.
    fields = cbor2.loads(op.raw)
    fields[2] = AUTHORS[1].public_key
    with pytest.raises(BadSignature):
        decode(cbor2.dumps(fields, canonical=True))
    # A signature by the right key but without the domain prefix.
    payload = cbor2.dumps(fields[:7], canonical=True)
    fields[7] = AUTHORS[1].sign(payload)
    with pytest.raises(BadSignature):
        decode(cbor2.dumps(fields, canonical=True))
    fields[7] = AUTHORS[1].sign(SIG_DOMAIN + payload)
    assert decode(cbor2.dumps(fields, canonical=True)).author == AUTHORS[1].public_key


def test_a_non_point_author_key_is_refused_as_bad_signature():
    fields = cbor2.loads(sample_op().raw)
    fields[2] = b"\xff" * 32
    with pytest.raises(BadSignature):
        decode(cbor2.dumps(fields, canonical=True))


# -- hostile input: only InvalidOp ------------------------------------------------------------


def only_invalid_op(data: Any) -> None:
    try:
        decode(data)
    except InvalidOp:
        return
    raise AssertionError(f"decode accepted {data!r}")


@settings(max_examples=examples(5))
@given(data=st.binary(max_size=600))
def test_random_bytes_raise_only_invalid_op(data):
    only_invalid_op(data)


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.binary(max_size=40)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=9)
        | st.dictionaries(st.text(max_size=5) | st.integers(), children, max_size=3)
        | st.builds(
            cbor2.CBORTag,
            st.sampled_from((0, 1, 2, 3, 4, 5, 6, 24, 28, 29, 30, 258, 999)),
            children,
        )
    ),
    max_leaves=30,
)


def _dumps(value: Any) -> bytes:
    try:
        return cbor2.dumps(value)
    except Exception:
        return b"\x80"


@settings(max_examples=examples(5))
@given(value=cbor_values)
def test_random_cbor_raises_only_invalid_op(value):
    only_invalid_op(_dumps(value))


@settings(max_examples=examples(5))
@given(items=st.lists(cbor_values, min_size=8, max_size=8), data=st.data())
def test_random_eight_item_arrays_raise_only_invalid_op(items, data):
    # Mix in well-typed fields so that decoding gets past the first checks.
    op = sample_op(parents=PARENTS3[:1])
    good = cbor2.loads(op.raw)
    keep = data.draw(st.lists(st.booleans(), min_size=8, max_size=8))
    fields = [g if k else v for g, v, k in zip(good, items, keep, strict=True)]
    if all(keep):
        fields[6] = items[6]
    only_invalid_op(_dumps(fields))


@settings(max_examples=examples(5))
@given(data=st.data())
def test_mutated_ops_raise_only_invalid_op(data):
    op = data.draw(st.sampled_from(MUTATION_SEEDS))
    raw = bytearray(op.raw)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        how = data.draw(st.sampled_from(("replace", "insert", "delete")))
        chunk = data.draw(st.binary(min_size=1, max_size=8))
        if how == "replace":
            raw[at : at + len(chunk)] = chunk
        elif how == "insert":
            raw[at:at] = chunk
        else:
            del raw[at : at + len(chunk)]
    if bytes(raw) == op.raw:
        return
    only_invalid_op(bytes(raw))


MUTATION_SEEDS = [
    sample_op(),
    sample_op(parents=PARENTS3),
    sample_op(CancelBody(PARENTS3[0]), parents=PARENTS3[1:]),
    sample_op(OrderBody("sell", MAX_INT, 1, "fok", None)),
]


@pytest.mark.parametrize("value", ["text", 5, None, 1.5, [1, 2], object()])
def test_non_bytes_input_is_malformed(value):
    with pytest.raises(MalformedOp):
        decode(value)


def test_bytearray_and_memoryview_are_accepted():
    op = sample_op()
    assert decode(bytearray(op.raw)) == op
    assert decode(memoryview(op.raw)) == op


def test_historic_ops_from_a_real_history_survive_random_bit_flips():
    ops = union_ops(run_plan(PLAN_FOR_FLIPS, replicas=2))
    assert ops
    rng = random.Random(20240601)
    for op in ops:
        for bit in rng.sample(range(len(op.raw) * 8), 24):
            flipped = bytearray(op.raw)
            flipped[bit // 8] ^= 1 << (bit % 8)
            with pytest.raises(InvalidOp):
                decode(bytes(flipped))


PLAN_FOR_FLIPS = [
    ("submit", 0, 0, "sell", 100, 3, "gtc"),
    ("submit", 1, 1, "buy", 101, 2, "gtc"),
    ("sync", 0, 1, 1, 100),
    ("submit", 1, 1, "buy", 100, 2, "ioc"),
    ("cancel", 0, 0, 0),
    ("sync", 1, 0, 2, 100),
    ("submit", 0, 0, "buy", 99, 1, "post_only"),
]


# -- typed errors for each shape and bound rule -----------------------------------------------


def _fields() -> list[Any]:
    return cbor2.loads(sample_op(parents=PARENTS3).raw)


def _mutated(change: Any) -> bytes:
    fields = _fields()
    change(fields)
    return resign(fields)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda f: f.__setitem__(0, 3), UnknownKind),
        (lambda f: f.__setitem__(0, 0), UnknownKind),
        (lambda f: f.__setitem__(0, "1"), UnknownKind),
        (lambda f: f.__setitem__(1, b"\x00" * 31), MalformedOp),
        (lambda f: f.__setitem__(1, "m" * 32), MalformedOp),
        (lambda f: f.__setitem__(2, b"\x00" * 33), MalformedOp),
        (lambda f: f.__setitem__(3, 0), LimitExceeded),
        (lambda f: f.__setitem__(3, True), LimitExceeded),
        (lambda f: f.__setitem__(4, 2**63), LimitExceeded),
        (lambda f: f.__setitem__(4, -3), LimitExceeded),
        (lambda f: f.__setitem__(5, PARENTS3[0]), MalformedOp),
        (lambda f: f.__setitem__(5, [b"\x01" * 31]), MalformedOp),
        (
            lambda f: f.__setitem__(5, [hashlib.sha256(bytes([i])).digest() for i in range(65)]),
            None,
        ),  # sorted below
        (lambda f: f.__setitem__(6, []), MalformedOp),
        (lambda f: f.__setitem__(6, [2, 0]), UnknownKind),
        (lambda f: f.__setitem__(6, [0, 0, 1, 1, 0]), MalformedOp),
        (lambda f: f.__setitem__(6, [0, 2, 1, 1, 0, None]), MalformedOp),
        (lambda f: f.__setitem__(6, [0, 0, 1, 1, 4, None]), MalformedOp),
        (lambda f: f.__setitem__(6, [0, 0, 0, 1, 0, None]), LimitExceeded),
        (lambda f: f.__setitem__(6, [0, 0, 1, 2**63, 0, None]), LimitExceeded),
        (lambda f: f.__setitem__(6, [0, 0, 1, 1, 0, 7]), MalformedOp),
        (lambda f: f.__setitem__(6, [0, 0, 1, 1, 0, "x" * 33]), LimitExceeded),
        (lambda f: f.__setitem__(6, [0, 0, 1, 1, 0, "\u00e9" * 17]), LimitExceeded),
        (lambda f: f.__setitem__(6, [1, b"\x00" * 31]), MalformedOp),
        (lambda f: f.__setitem__(6, [1, b"\x00" * 32, 0]), MalformedOp),
        (lambda f: f.__setitem__(6, {"kind": 0}), MalformedOp),
    ],
)
def test_shape_and_bound_rules_raise_typed_errors(change, error):
    fields = _fields()
    change(fields)
    if error is None:  # too many parents
        fields[5] = sorted(fields[5])
        error = LimitExceeded
    with pytest.raises(error):
        decode(resign(fields))


@pytest.mark.parametrize("size", [7, 9])
def test_wrong_item_count_is_malformed(size):
    fields = _fields()
    fields = [*fields, 0] if size > 8 else fields[:size]
    with pytest.raises(MalformedOp):
        decode(cbor2.dumps(fields, canonical=True))


def test_bad_signature_length_is_malformed():
    fields = _fields()
    fields[7] = fields[7][:63]
    with pytest.raises(MalformedOp):
        decode(cbor2.dumps(fields, canonical=True))


def test_oversize_is_refused_before_decoding():
    with pytest.raises(LimitExceeded):
        decode(b"\x00" * (MAX_OP_BYTES + 1))
    op = sample_op()
    # A valid op padded past the limit: refused for size, not as trailing data.
    with pytest.raises(LimitExceeded):
        decode(op.raw + b"\x00" * (MAX_OP_BYTES + 1 - len(op.raw)))
    # A byte string declaring a huge length is refused, not allocated.
    with pytest.raises(InvalidOp):
        decode(b"\x88\x01\x5b" + (2**62).to_bytes(8, "big"))


VALID_ROOT = sign_op(AUTHORS[0], MARKET.id, 1, 1, (), OrderBody("sell", 100, 1))


@settings(max_examples=examples(2))
@given(
    data=st.binary(max_size=300)
    | st.builds(
        lambda op, cut: op.raw[: min(cut, len(op.raw) - 1)],
        st.sampled_from(MUTATION_SEEDS),
        st.integers(0, 300),
    )
)
def test_a_replica_given_garbage_raises_only_invalid_op_and_changes_nothing(data):
    from crdtbook import Replica

    replica = Replica(MARKET)
    assert replica.apply(VALID_ROOT.raw) == [VALID_ROOT]
    digest, size = replica.digest(), len(replica)
    with pytest.raises(InvalidOp):
        replica.apply(data)
    assert replica.apply_many([data, data]).applied == []
    assert (replica.digest(), len(replica), replica.pending_count) == (digest, size, 0)
