"""Fuzzing the node's frame parsers (node/wire.py, the length-prefixed FrameStream reader) and the
op decoder as the node calls it: whatever bytes a peer sends, a parser returns a well-typed value
or raises its one typed error, and never anything else. Bounded: ~2-4 s per test.

The longer, coverage-guided run of the same targets is bench/fuzz_atheris.py.
"""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdtbook import MAX_OP_BYTES, BloomFilter, Identity, InvalidOp, Market, decode
from crdtbook._ops import OrderBody, sign_op
from crdtbook.node.p2p import FrameError, FrameStream, StreamEOF
from crdtbook.node.wire import (
    MAX_BATCH_OPS,
    SyncRequest,
    SyncResponse,
    WireError,
    decode_batch,
    decode_request,
    decode_response,
    encode_batch,
    encode_request,
    encode_response,
)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MARKET = Market.parse("DEMO:1:1")
ALICE = Identity.from_seed(b"a" * 32)
GOOD_OP = sign_op(ALICE, MARKET.id, 1, 1, (), OrderBody("sell", 100, 1)).raw


def _valid_request() -> bytes:
    bloom = BloomFilter.for_ids([b"\x01" * 32, b"\x02" * 32])
    return encode_request(
        SyncRequest(MARKET.id, [b"\x03" * 32], [b"\x04" * 32], bloom, {ALICE.public_key: 3}, bloom)
    )


SEEDS = [
    encode_batch([GOOD_OP, GOOD_OP]),
    _valid_request(),
    encode_response(SyncResponse([GOOD_OP], [b"\x05" * 32], True)),
    encode_response(SyncResponse([], [], False, "unknown_market", "no")),
]

cbor_keys = st.sampled_from(["v", "m", "h", "n", "bf", "bk", "vv", "ops", "more", "err"]) | (
    st.integers(-5, 5) | st.binary(max_size=33) | st.text(max_size=4)
)
cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.binary(max_size=40)
    | st.text(max_size=10)
    | st.sampled_from(["v", "m", "h", "n", "bf", "bk", "vv", "pf", "pk", "ops", "more", "err"]),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            cbor_keys,
            inner,
            max_size=6,
        )
    ),
    max_leaves=25,
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "replace"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        elif kind == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 9))]
        elif kind == "truncate":
            del data[pos:]
        else:
            data[pos : pos + 1] = draw(
                st.sampled_from([b"\x9f", b"\xbf", b"\xff", b"\x5f", b"\xc6"])
            )
    return bytes(data)


def _decoders_hold(data: bytes) -> None:
    """Each parser returns its value with the documented types, or raises WireError."""
    try:
        ops = decode_batch(data)
    except WireError:
        pass
    else:
        assert len(ops) <= MAX_BATCH_OPS
        assert all(type(op) is bytes and len(op) <= MAX_OP_BYTES for op in ops)
    try:
        req = decode_request(data)
    except WireError:
        pass
    else:
        assert type(req.market) is bytes and len(req.market) == 32
        assert all(type(h) is bytes and len(h) == 32 for h in req.heads + req.need)
        for bloom in (req.bloom, req.held):
            assert bloom is None or isinstance(bloom, BloomFilter)
        assert req.seqs is None or all(type(s) is int and s >= 0 for s in req.seqs.values())
    try:
        resp = decode_response(data)
    except WireError:
        pass
    else:
        assert type(resp.more) is bool
        assert all(type(op) is bytes and len(op) <= MAX_OP_BYTES for op in resp.ops)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    _decoders_hold(data)


@FUZZ
@given(cbor_values)
def test_random_cbor(value: Any) -> None:
    _decoders_hold(cbor2.dumps(value))
    _decoders_hold(cbor2.dumps([1, value]))
    _decoders_hold(cbor2.dumps({"v": 1, "m": MARKET.id, "h": [], "ops": value, "n": value}))


@FUZZ
@given(mutated())
def test_mutated_valid_frames(data: bytes) -> None:
    _decoders_hold(data)


@pytest.mark.parametrize("depth", [5, 50, 10_000])
def test_deep_nesting_is_refused(depth: int) -> None:
    data = b"\x81" * depth + b"\x00"
    for decoder in (decode_batch, decode_request, decode_response):
        with pytest.raises(WireError):
            decoder(data)


def test_declared_huge_lengths_are_refused_without_allocating() -> None:
    for data in (
        b"\x82\x01\x9b\x7f\xff\xff\xff\xff\xff\xff\xff",  # [1, array of 2**63 items]
        b"\xa1\x61v\x5b\x7f\xff\xff\xff\xff\xff\xff\xff",  # {"v": 2**63-byte string}
        b"\x9f" * 4 + b"\xff" * 4,
    ):
        for decoder in (decode_batch, decode_request, decode_response):
            with pytest.raises(WireError):
                decoder(data)


def test_unknown_versions_are_refused() -> None:
    for version in (2, 1.0, True):
        with pytest.raises(WireError):
            decode_batch(cbor2.dumps([version, [GOOD_OP]]))
    for version in (0, 2, "1", 1.0, True, None):
        frame = cbor2.loads(_valid_request())
        frame["v"] = version
        with pytest.raises(WireError):
            decode_request(cbor2.dumps(frame))


def test_oversize_batches_are_refused() -> None:
    with pytest.raises(WireError, match="exceeds"):
        decode_batch(encode_batch([GOOD_OP] * (MAX_BATCH_OPS + 1)))
    with pytest.raises(WireError):
        decode_batch(encode_batch([b"x" * (MAX_OP_BYTES + 1)]))
    with pytest.raises(WireError):
        decode_response(encode_response(SyncResponse([GOOD_OP] * (MAX_BATCH_OPS + 1), [], False)))


# -- the op decoder as the node calls it ------------------------------------------------------


@FUZZ
@given(st.one_of(st.binary(max_size=600), mutated()))
def test_op_decoder_raises_only_invalid_op(data: bytes) -> None:
    try:
        op = decode(data)
    except InvalidOp:
        return
    assert op.raw == data  # only the canonical encoding of a valid op decodes


# -- the sync stream's length-prefixed frames (node/p2p.py FrameStream) ------------------------


class _ChunkStream:
    """An INetStream stand-in that returns the given chunks, then end of stream."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.pop(0) if self.chunks else b""


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=12), st.integers(0, 300))
def test_frame_reader_returns_frames_or_typed_errors(chunks: list[bytes], max_size: int) -> None:
    async def run() -> None:
        frames = FrameStream(_ChunkStream(chunks), "peer", "/test", 1.0)  # type: ignore[arg-type]
        total = 0
        while True:
            try:
                frame = await frames.read_frame(max_size)
            except StreamEOF:
                return
            except FrameError:  # includes FrameTooLarge
                return
            assert len(frame) <= max_size
            total += len(frame)
            assert total <= sum(map(len, chunks))

    trio.run(run)
