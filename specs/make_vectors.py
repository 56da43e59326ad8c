#!/usr/bin/env python3
"""Deterministic generator of the crdtbook protocol test vectors (specs/vectors/*.json).

    python specs/make_vectors.py            # rewrite specs/vectors/
    python specs/make_vectors.py --check    # exit 1 if the committed files differ

Every input is fixed: identities come from ``Identity.from_seed(bytes([i]) * 32)``, ed25519
signatures are deterministic (RFC 8032), the "shuffled" delivery order is a sort by a hash, and
nothing reads the clock or a random source, so every run writes byte-identical files.

Ops are built here from the spec's description (canonical CBOR of the 7-item payload, signed under
the domain prefix), independently of ``crdtbook``'s encoder, and each one is checked against
``crdtbook.decode``/``sign_op`` before it is written. Expected derived state comes from the
reference ``Replica``; the digest preimage is rebuilt from the public views and checked against
``Replica.digest()``. The DAGs are built with explicit parents (``_Node`` below), not with
``Replica.submit``, so the vectors do not depend on the reference's authoring policy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cbor2

from crdtbook import (
    DEFAULT_MARKETS,
    BloomFilter,
    Identity,
    InvalidOp,
    Market,
    Op,
    Replica,
    decode,
    ops_missing_for,
)
from crdtbook._engine import REASONS, STATUSES
from crdtbook._limits import MAX_INT
from crdtbook._ops import SIGNATURE_DOMAIN, CancelBody, OrderBody, sign_op

OUT_DIR = Path(__file__).resolve().parent / "vectors"

SIDE_CODE = {"buy": 0, "sell": 1}
TIF_CODE = {"gtc": 0, "ioc": 1, "fok": 2, "post_only": 3}

Json = dict[str, Any]


# -- identities --------------------------------------------------------------------------------


def ident(i: int) -> Identity:
    return Identity.from_seed(bytes([i]) * 32)


NAMES = {1: "alice", 2: "bob", 3: "carol", 4: "dave", 5: "erin"}
ALICE, BOB, CAROL, DAVE, ERIN = (ident(i) for i in range(1, 6))
LABEL = {ident(i).public_key: name for i, name in NAMES.items()}


def identities_json() -> list[Json]:
    return [
        {"name": name, "seed": (bytes([i]) * 32).hex(), "public_key": ident(i).public_key.hex()}
        for i, name in NAMES.items()
    ]


# -- an encoder written from the spec ------------------------------------------------------------


def wire_body(body: OrderBody | CancelBody) -> list[Any]:
    if isinstance(body, OrderBody):
        return [0, SIDE_CODE[body.side], body.price, body.quantity, TIF_CODE[body.tif], body.tag]
    return [1, body.order_id]


def payload_bytes(items: Sequence[Any]) -> bytes:
    return cbor2.dumps(list(items), canonical=True)


def assemble(payload: bytes, signature: bytes) -> bytes:
    """The 8-item op from the canonical 7-item payload: new array head, signature appended."""
    assert payload[0] == 0x87
    return b"\x88" + payload[1:] + b"\x58\x40" + signature


def build(
    identity: Identity,
    market: Market,
    seq: int,
    lamport: int,
    parents: Sequence[bytes],
    body: OrderBody | CancelBody,
) -> Op:
    """Sign an op from the spec; check it equals what the reference produces and decodes."""
    parents = sorted(parents)
    payload = payload_bytes(
        [1, market.id, identity.public_key, seq, lamport, parents, wire_body(body)]
    )
    raw = assemble(payload, identity.sign(SIGNATURE_DOMAIN + payload))
    reference = sign_op(identity, market.id, seq, lamport, tuple(parents), body)
    assert reference.raw == raw, "encoder disagrees with the reference"
    op = decode(raw)
    assert op.id == hashlib.sha256(raw).digest()
    return op


class _Node:
    """One peer's view of the DAG, authoring with explicit, spec-level parent choice:
    every head by another author, plus the author's own latest op."""

    def __init__(self, market: Market) -> None:
        self.market = market
        self.ops: dict[bytes, Op] = {}

    def learn(self, *others: _Node) -> None:
        for other in others:
            self.ops.update(other.ops)

    def heads(self) -> list[bytes]:
        named = {p for op in self.ops.values() for p in op.parents}
        return sorted(i for i in self.ops if i not in named)

    def author(self, identity: Identity, body: OrderBody | CancelBody) -> Op:
        pk = identity.public_key
        mine = [op for op in self.ops.values() if op.author == pk]
        tip = max(mine, key=lambda o: o.seq, default=None)
        parents = {h for h in self.heads() if self.ops[h].author != pk}
        if tip is not None:
            parents.add(tip.id)
        lamport = 1 + max((self.ops[p].lamport for p in parents), default=0)
        op = build(
            identity, self.market, 1 if tip is None else tip.seq + 1, lamport, sorted(parents), body
        )
        self.ops[op.id] = op
        return op


# -- readable forms --------------------------------------------------------------------------


def body_json(op: Op) -> Json:
    b = op.body
    if isinstance(b, OrderBody):
        return {
            "kind": "order",
            "side": b.side,
            "price": b.price,
            "quantity": b.quantity,
            "tif": b.tif,
            "tag": b.tag,
        }
    return {"kind": "cancel", "order_id": b.order_id.hex()}


def op_json(op: Op, label: str) -> Json:
    payload = payload_bytes(
        [
            op.version,
            op.market_id,
            op.author,
            op.seq,
            op.lamport,
            list(op.parents),
            wire_body(op.body),
        ]
    )
    return {
        "label": label,
        "fields": {
            "version": op.version,
            "market_id": op.market_id.hex(),
            "author": op.author.hex(),
            "seq": op.seq,
            "lamport": op.lamport,
            "parents": [p.hex() for p in op.parents],
            "body": body_json(op),
            "signature": op.signature.hex(),
        },
        "payload": payload.hex(),
        "signed_message": (SIGNATURE_DOMAIN + payload).hex(),
        "encoding": op.raw.hex(),
        "id": op.id.hex(),
    }


def describe(op: Op) -> str:
    who = LABEL.get(op.author, op.author.hex()[:8])
    b = op.body
    if isinstance(b, OrderBody):
        tag = f" tag={b.tag!r}" if b.tag is not None else ""
        what = f"{b.side} {b.quantity}@{b.price} {b.tif}{tag}"
    else:
        what = f"cancel {b.order_id.hex()[:12]}"
    return f"{who}#{op.seq} L{op.lamport} {what}"


def market_json(m: Market) -> Json:
    return {"name": m.name, "tick": m.tick, "lot": m.lot, "id": m.id.hex()}


# -- market.json ------------------------------------------------------------------------------


def make_markets() -> Json:
    def entry(name: str, tick: str, lot: str) -> Json:
        m = Market(name, tick, lot)
        definition = cbor2.dumps(["crdtbook/market/v1", m.name, m.tick, m.lot], canonical=True)
        assert hashlib.sha256(definition).digest() == m.id
        return {
            "name": name,
            "tick_input": tick,
            "lot_input": lot,
            "tick": m.tick,
            "lot": m.lot,
            "definition": definition.hex(),
            "id": m.id.hex(),
        }

    defaults = [entry(m.name, m.tick, m.lot) for m in DEFAULT_MARKETS.values()]
    normalised = [
        entry("BTC-USD", "0.0100", "0.00010"),  # same market as the default: same id
        entry("X", "1E+2", "10"),
        entry("X", "100", "1e1"),  # same market as the line above
        entry("tiny", "0.00000001", "0.000000000000000001"),
        entry("\u00e9t\u00e9-EUR", "0.5", "2"),  # non-ASCII name: UTF-8 in the definition
    ]
    assert normalised[0]["id"] == defaults[0]["id"] and normalised[1]["id"] == normalised[2]["id"]
    refused = []
    for name, tick, lot, why in [
        ("", "1", "1", "empty name"),
        ("A" * 33, "1", "1", "name longer than 32 characters"),
        ("BTC/USD", "1", "1", "'/' in name"),
        ("BTC:USD", "1", "1", "':' in name"),
        ("BTC USD", "1", "1", "space in name"),
        ("BTC\u200bUSD", "1", "1", "non-printable character (U+200B, category Cf)"),
        ("OK", "0", "1", "tick not positive"),
        ("OK", "1", "-1", "lot not positive"),
        ("OK", "NaN", "1", "tick not finite"),
    ]:
        try:
            Market(name, tick, lot)
        except ValueError:
            refused.append({"name": name, "tick": tick, "lot": lot, "why": why})
        else:  # pragma: no cover - generator self-check
            raise AssertionError(f"market {name!r} should be refused")
    btc = DEFAULT_MARKETS["BTC-USD"]
    conversions = [
        {"market": "BTC-USD", "price": p, "ticks": btc.price_to_ticks(p)}
        for p in ("100.25", "0.01", "65000")
    ] + [
        {"market": "BTC-USD", "quantity": q, "lots": btc.qty_to_lots(q)} for q in ("0.0001", "1.5")
    ]
    return {
        "description": "Market definitions and ids: id = SHA-256(canonical CBOR of "
        '["crdtbook/market/v1", name, tick, lot]) with tick and lot in normalised form.',
        "markets": defaults + normalised,
        "refused": refused,
        "conversions": conversions,
    }


# -- ops.json ---------------------------------------------------------------------------------


def make_ops() -> Json:
    m = DEFAULT_MARKETS["BTC-USD"]
    out: list[Json] = []

    a1 = build(ALICE, m, 1, 1, [], OrderBody("buy", 6_500_000, 25_000, "gtc", "alice-0001"))
    out.append(op_json(a1, "GTC buy with an ASCII tag; no parents (seq 1, Lamport 1)"))
    b1 = build(BOB, m, 1, 1, [], OrderBody("sell", 6_500_100, 10_000, "ioc", None))
    out.append(op_json(b1, "IOC sell, no tag (null)"))
    c1 = build(CAROL, m, 1, 2, [a1.id], OrderBody("buy", 100, 5, "fok", ""))
    out.append(op_json(c1, "FOK buy, empty-string tag (distinct from null), one parent"))
    a2 = build(
        ALICE,
        m,
        2,
        3,
        [a1.id, b1.id, c1.id],
        OrderBody("sell", MAX_INT, 1, "post_only", "ordre-\u00e9t\u00e9-\u2713"),
    )
    out.append(
        op_json(
            a2,
            "POST_ONLY sell at the largest price (2**63-1, 8-byte head), "
            "non-ASCII tag, three parents (own seq 1 among them)",
        )
    )
    a3 = build(ALICE, m, 3, 4, [a2.id], CancelBody(a1.id))
    out.append(op_json(a3, "cancel of alice's first order (seq 1, on her own chain)"))
    d1 = build(DAVE, m, 1, 5, [a3.id], OrderBody("buy", 23, 24, "gtc", "x" * 32))
    out.append(
        op_json(
            d1,
            "GTC buy; price 23 (immediate), quantity 24 (1-byte head); 32-byte tag (the maximum)",
        )
    )
    e1 = build(ERIN, m, 1, 1, [], OrderBody("sell", 256, 65_536, "gtc", None))
    out.append(op_json(e1, "price 256 (2-byte head), quantity 65536 (4-byte head)"))
    return {
        "description": "Valid ops of market BTC-USD, each checkable alone with decode(). "
        "payload = canonical CBOR of the 7-item array; signed_message = "
        "'crdtbook/op/v1\\x00' || payload; encoding = the 8-item op; id = SHA-256(encoding).",
        "market": market_json(m),
        "identities": identities_json(),
        "ops": out,
    }


# -- scenario.json ----------------------------------------------------------------------------


def _shuffled(ops: list[Op]) -> list[Op]:
    """A fixed delivery order, unrelated to causality: by SHA-256("shuffle" || id)."""
    return sorted(ops, key=lambda o: hashlib.sha256(b"shuffle" + o.id).digest())


def _state_preimage(market: Market, replica: Replica) -> bytes:
    """The digest preimage, rebuilt from the public views as the spec describes it."""
    book = replica.book()

    def side(levels: Any) -> list[Any]:
        return [[lv.price, [[o.order_id, o.remaining] for o in lv.orders]] for lv in levels]

    orders = [
        [o.id, STATUSES.index(o.status), o.remaining, o.filled, o.closed, REASONS.index(o.reason)]
        for o in sorted(replica.orders(), key=lambda o: o.id)
    ]
    fills = [[f.taker, f.maker, f.price, f.quantity] for f in replica.fills()]
    state = ["crdtbook/state/v1", market.id, side(book.bids), side(book.asks), fills, orders]
    return cbor2.dumps(state, canonical=True)


def _expected(market: Market, replica: Replica, ops: list[Op]) -> Json:
    preimage = _state_preimage(market, replica)
    assert hashlib.sha256(preimage).digest() == replica.digest()
    state = state_json(replica)
    digest = state.pop("digest")  # keep the committed key order: encoding, then digest
    return {**state, "state_encoding": preimage.hex(), "digest": digest}


def state_json(replica: Replica) -> Json:
    """Everything a replica derives, in readable form (what a scenario expects; the test suite
    compares the implementation's replica against it)."""
    book = replica.book()

    def levels(side: Any) -> list[Json]:
        return [
            {
                "price": lv.price,
                "quantity": lv.quantity,
                "orders": [
                    {"order_id": o.order_id.hex(), "remaining": o.remaining} for o in lv.orders
                ],
            }
            for lv in side
        ]

    cancels = [op for op in replica.ops() if isinstance(op.body, CancelBody)]
    return {
        "total_order": [op.id.hex() for op in replica.ops()],
        "heads": [h.hex() for h in replica.heads()],
        "fills": [
            {
                "taker": f.taker.hex(),
                "maker": f.maker.hex(),
                "price": f.price,
                "quantity": f.quantity,
                "taker_side": f.taker_side,
                "taker_author": f.taker_author.hex(),
                "maker_author": f.maker_author.hex(),
            }
            for f in replica.fills()
        ],
        "book": {"bids": levels(book.bids), "asks": levels(book.asks)},
        "orders": [
            {
                "id": o.id.hex(),
                "author": o.author.hex(),
                "side": o.side,
                "price": o.price,
                "quantity": o.quantity,
                "remaining": o.remaining,
                "filled": o.filled,
                "closed": o.closed,
                "status": o.status,
                "reason": o.reason,
                "tif": o.tif,
                "tag": o.tag,
                "lamport": o.lamport,
            }
            for o in replica.orders()
        ],
        "cancels": [
            {"id": c.id.hex(), "effective": replica.cancel_effective(c.id)} for c in cancels
        ],
        "digest": replica.digest().hex(),
    }


def _scenario_json(name: str, text: str, market: Market, ops: list[Op]) -> Json:
    replica = Replica(market)
    delivery = _shuffled(ops)
    report = replica.apply_many(op.raw for op in delivery)
    assert not report.invalid and replica.pending_count == 0 and len(replica) == len(ops)
    # Every order of delivery gives the same state.
    for order in (ops, list(reversed(ops))):
        other = Replica(market)
        for op in order:
            other.apply(op.raw)
        assert other.digest() == replica.digest()
    labels = {op.id: describe(op) for op in ops}
    return {
        "name": name,
        "description": text,
        "market": market_json(market),
        "identities": identities_json(),
        "ops": [
            {"label": labels[op.id], "id": op.id.hex(), "encoding": op.raw.hex()} for op in delivery
        ],
        "expected": _expected(market, replica, ops),
    }


def make_main_scenario() -> tuple[Json, list[Op]]:
    m = DEFAULT_MARKETS["DEMO"]
    na, nb, nc, nd, ne = (_Node(m) for _ in range(5))
    ops: list[Op] = []

    def add(node: _Node, who: Identity, body: OrderBody | CancelBody) -> Op:
        op = node.author(who, body)
        ops.append(op)
        return op

    def merge_all() -> None:
        for n in (na, nb, nc, nd, ne):
            for o in (na, nb, nc, nd, ne):
                n.learn(o)

    # Round 1: five peers, nothing seen (all Lamport 1). bob's sell and dave's buy cross at 100
    # whichever of them sorts first; erin rests an ask she will later fail to count for her FOK.
    a1 = add(na, ALICE, OrderBody("sell", 102, 10, "gtc", "a-1"))
    b1 = add(nb, BOB, OrderBody("sell", 100, 5, "gtc", None))
    add(nc, CAROL, OrderBody("buy", 98, 4, "gtc", None))
    add(nd, DAVE, OrderBody("buy", 100, 6, "gtc", "d-1"))
    add(ne, ERIN, OrderBody("sell", 102, 7, "gtc", None))
    # Partial exchange: alice+bob, carol+dave; erin stays alone.
    na.learn(nb)
    nb.learn(na)
    nc.learn(nd)
    nd.learn(nc)

    # Round 2 on partial views (concurrent).
    add(na, ALICE, OrderBody("sell", 101, 4, "post_only", None))  # rests: nothing crosses 101
    add(nc, CAROL, OrderBody("buy", 99, 3, "gtc", "c-2"))
    merge_all()

    # Round 3, all merged (concurrent at one Lamport time).
    add(nb, BOB, OrderBody("buy", 101, 16, "ioc", None))  # takes 101, remainder expires
    add(nd, DAVE, OrderBody("sell", 100, 3, "post_only", None))  # only dave's own bid at 100
    merge_all()

    # Round 4.
    add(nc, CAROL, OrderBody("sell", 98, 2, "gtc", None))  # fills dave, expires carol's bids
    add(ne, ERIN, OrderBody("buy", 20, 20, "fok", None))  # below every ask: expires at once
    merge_all()

    # Round 5: dave's FOK buy of 8 passes across two levels.
    add(nd, DAVE, OrderBody("buy", 102, 8, "fok", None))
    merge_all()

    # Round 6: erin's FOK buy of 5 at <= 102 counts only others' asks (alice's 2 left), not
    # her own 7 at 102: it fails, and leaves her ask alone.
    add(ne, ERIN, OrderBody("buy", 102, 5, "fok", "e-fok"))
    merge_all()

    # Round 7: alice cancels her partially filled ask; bob cancels his filled one (a no-op) and
    # then rests an ask; carol and dave rest orders away from the market.
    add(na, ALICE, CancelBody(a1.id))
    add(nb, BOB, CancelBody(b1.id))
    add(nb, BOB, OrderBody("sell", 110, 3, "gtc", None))
    add(nc, CAROL, OrderBody("buy", 97, 2, "post_only", None))
    add(nd, DAVE, OrderBody("sell", 105, 4, "gtc", None))
    merge_all()

    # Round 8: erin's GTC buy meets her own ask at 102 first (self-trade: her ask expires), then
    # takes dave's 4 at 105 and rests the rest, partially filled.
    add(ne, ERIN, OrderBody("buy", 105, 6, "gtc", None))
    merge_all()

    text = (
        "Five peers author concurrently over eight rounds with partial exchange; the ops are "
        "delivered in the listed (shuffled, non-causal) order. Expected state covers a "
        "crossing between concurrent Lamport-1 ops, partial fills, IOC remainder, POST_ONLY "
        "resting and rejected (own order only), self-trade prevention (expire maker), FOK "
        "unfillable below the book and FOK failing on own-only liquidity, a FOK fill, an "
        "effective cancel and a no-op cancel."
    )
    return _scenario_json("main", text, m, ops), ops


def make_equivocation_scenario() -> tuple[Json, dict[str, Op]]:
    m = DEFAULT_MARKETS["DEMO"]
    x = build(ALICE, m, 1, 1, [], OrderBody("sell", 100, 5, "gtc", None))
    a2 = build(ALICE, m, 2, 2, [x.id], OrderBody("sell", 105, 1, "gtc", None))
    a2f = build(ALICE, m, 2, 2, [x.id], OrderBody("sell", 106, 2, "gtc", None))  # the fork
    b1 = build(BOB, m, 1, 3, [a2f.id], OrderBody("buy", 90, 1, "gtc", None))
    a3 = build(ALICE, m, 3, 4, [a2.id, b1.id], CancelBody(x.id))  # x is on both branches
    a3f = build(ALICE, m, 3, 3, [a2f.id], CancelBody(a2f.id))  # on the fork's own chain
    ops = [x, a2, a2f, b1, a3, a3f]
    text = (
        "alice equivocates: two different ops at seq 2, both on x (seq 1). Both branches are "
        "valid and applied. A cancel on either branch may name x; the fork's own seq-3 cancel "
        "may name the fork's seq-2 order. (invalid.json: a cancel on the first branch that "
        "names the fork's order, reachable only through bob's op, is BadCancel.)"
    )
    named = {"x": x, "a2": a2, "a2f": a2f, "b1": b1}
    return _scenario_json("equivocation", text, m, ops), named


# -- invalid.json -----------------------------------------------------------------------------


def _sign_items(identity: Identity, items: list[Any]) -> bytes:
    """An op from arbitrary payload items, signed by ``identity`` (whatever rule they break)."""
    payload = payload_bytes(items)
    return assemble(payload, identity.sign(SIGNATURE_DOMAIN + payload))


def _classify(raw: bytes, context: list[bytes], market: Market) -> tuple[str, str]:
    """(stage, error class) by the reference: stage 'decode' or 'apply'."""
    try:
        decode(raw)
    except InvalidOp as exc:
        return "decode", type(exc).__name__
    replica = Replica(market)
    replica.apply_many(context)
    try:
        replica.apply(raw)
    except InvalidOp as exc:
        return "apply", type(exc).__name__
    raise AssertionError("op unexpectedly valid")


def make_invalid(main_ops: list[Op], fork: dict[str, Op]) -> Json:
    m = DEFAULT_MARKETS["DEMO"]
    other_market = DEFAULT_MARKETS["BTC-USD"]
    mid, pk = m.id, ALICE.public_key
    gtc = [0, 1, 100, 5, 0, None]
    good = build(ALICE, m, 1, 1, [], OrderBody("sell", 100, 5, "gtc", None))
    cases: list[Json] = []

    def case(
        name: str, raw: bytes, expect: str, context: Sequence[Op | bytes] = (), market: Market = m
    ) -> None:
        ctx = [c.raw if isinstance(c, Op) else c for c in context]
        stage, got = _classify(raw, ctx, market)
        # Version 2 made one version-1 case refused under another (informative) class; the file
        # keeps the class it was published with (tests/core/test_vectors.py says why).
        now = {"unknown protocol version 2": "MalformedOp"}.get(name, expect)
        assert got == now, f"{name}: reference says {got}, expected {now}"
        cases.append(
            {
                "name": name,
                "stage": stage,
                "error": expect,
                "context": [c.hex() for c in ctx],
                "encoding": raw.hex(),
                "id": hashlib.sha256(raw).hexdigest(),
            }
        )

    # Signature.
    flipped = bytearray(good.raw)
    flipped[-1] ^= 0x01
    case("signature: last byte flipped", bytes(flipped), "BadSignature")
    payload = payload_bytes([1, mid, pk, 1, 1, [], gtc])
    case(
        "signature: by another key than the author",
        assemble(payload, BOB.sign(SIGNATURE_DOMAIN + payload)),
        "BadSignature",
    )
    case(
        "signature: over the payload without the domain prefix",
        assemble(payload, ALICE.sign(payload)),
        "BadSignature",
    )
    small = bytes([1]) + bytes(31)  # the identity point: small order
    payload = payload_bytes([1, mid, small, 1, 1, [], gtc])
    case(
        "signature: small-order author key, R = identity, S = 0 "
        "(accepted by verifiers without small-order checks, e.g. ZIP-215; refused here)",
        assemble(payload, small + bytes(32)),
        "BadSignature",
    )
    sig = good.signature
    s_plus_l = int.from_bytes(sig[32:], "little") + 2**252 + 27742317777372353535851937790883648493
    if s_plus_l < 2**256:
        case(
            "signature: S replaced by S + L (non-canonical scalar)",
            good.raw[:-32] + s_plus_l.to_bytes(32, "little"),
            "BadSignature",
        )

    # Canonical form (signature over the canonical payload, so only the encoding is wrong).
    r = good.raw
    seq_at = r.index(pk) + len(pk)  # seq follows the author
    assert r[seq_at] == 0x01
    case(
        "non-canonical: seq 1 written with a 1-byte argument (0x18 0x01)",
        r[:seq_at] + b"\x18\x01" + r[seq_at + 1 :],
        "NonCanonical",
    )
    case(
        "non-canonical: op array of indefinite length (0x9f ... 0xff)",
        b"\x9f" + r[1:] + b"\xff",
        "NonCanonical",
    )
    case("non-canonical: trailing byte after the op", r + b"\x00", "NonCanonical")
    case(
        "non-canonical: market id as an indefinite-length byte string",
        r[:1] + r[1:2] + b"\x5f\x58\x20" + mid + b"\xff" + r[2 + 34 :],
        "NonCanonical",
    )

    # Parents.
    p_lo, p_hi = sorted([main_ops[0].id, main_ops[1].id])
    case(
        "parents: not sorted ascending",
        _sign_items(ALICE, [1, mid, pk, 1, 2, [p_hi, p_lo], gtc]),
        "BadParents",
    )
    case(
        "parents: duplicate",
        _sign_items(ALICE, [1, mid, pk, 1, 2, [p_lo, p_lo], gtc]),
        "BadParents",
    )

    # Limits.
    case("oversize: 4097 bytes (a 4000-byte tag)", _oversize(), "LimitExceeded")
    parents65 = sorted(hashlib.sha256(bytes([i])).digest() for i in range(65))
    case(
        "limit: 65 parents", _sign_items(ALICE, [1, mid, pk, 1, 2, parents65, gtc]), "LimitExceeded"
    )
    case(
        "limit: 33-byte tag",
        _sign_items(ALICE, [1, mid, pk, 1, 1, [], [0, 1, 100, 5, 0, "t" * 33]]),
        "LimitExceeded",
    )
    case(
        "limit: price 2**63",
        _sign_items(ALICE, [1, mid, pk, 1, 1, [], [0, 1, 2**63, 5, 0, None]]),
        "LimitExceeded",
    )
    case(
        "limit: quantity 0",
        _sign_items(ALICE, [1, mid, pk, 1, 1, [], [0, 1, 100, 0, 0, None]]),
        "LimitExceeded",
    )
    case("limit: seq 0", _sign_items(ALICE, [1, mid, pk, 0, 1, [], gtc]), "LimitExceeded")
    case("limit: Lamport time 0", _sign_items(ALICE, [1, mid, pk, 1, 0, [], gtc]), "LimitExceeded")

    # Kinds and versions.
    case(
        "unknown kind 2 (e.g. a future heartbeat)",
        _sign_items(ALICE, [1, mid, pk, 1, 1, [], [2]]),
        "UnknownKind",
    )
    case(
        "unknown protocol version 2", _sign_items(ALICE, [2, mid, pk, 1, 1, [], gtc]), "UnknownKind"
    )

    # Malformed.
    case("malformed: not CBOR (truncated op)", r[:-1], "MalformedOp")
    case("malformed: array of 7 items", payload_bytes([1, mid, pk, 1, 1, [], gtc]), "MalformedOp")
    case(
        "malformed: side 2",
        _sign_items(ALICE, [1, mid, pk, 1, 1, [], [0, 2, 100, 5, 0, None]]),
        "MalformedOp",
    )
    case(
        "malformed: tif 4",
        _sign_items(ALICE, [1, mid, pk, 1, 1, [], [0, 0, 100, 5, 4, None]]),
        "MalformedOp",
    )
    case(
        "malformed: tag is a byte string",
        _sign_items(ALICE, [1, mid, pk, 1, 1, [], [0, 0, 100, 5, 0, b"t"]]),
        "MalformedOp",
    )
    case(
        "malformed: cancel with a 31-byte order id",
        _sign_items(ALICE, [1, mid, pk, 1, 1, [], [1, bytes(31)]]),
        "MalformedOp",
    )
    case(
        "malformed: 31-byte author",
        _sign_items(ALICE, [1, mid, pk[:31], 1, 1, [], gtc]),
        "MalformedOp",
    )

    # Contextual rules (stage 'apply': decodes, refused by a replica holding the context).
    case(
        "wrong market: a BTC-USD op given to a DEMO replica",
        build(ALICE, other_market, 1, 1, [], OrderBody("sell", 100, 5, "gtc", None)).raw,
        "WrongMarket",
    )
    b1 = build(BOB, m, 1, 1, [], OrderBody("buy", 90, 1, "gtc", None))
    case(
        "Lamport: 3 with one parent at Lamport 1",
        build(ALICE, m, 1, 3, [b1.id], OrderBody("sell", 100, 5, "gtc", None)).raw,
        "BadLamport",
        [b1],
    )
    case(
        "Lamport: 2 with no parents",
        build(ALICE, m, 1, 2, [], OrderBody("sell", 100, 5, "gtc", None)).raw,
        "BadLamport",
    )
    case(
        "seq: 2 with no parent by the author",
        build(ALICE, m, 2, 2, [b1.id], OrderBody("sell", 100, 5, "gtc", None)).raw,
        "BadSequence",
        [b1],
    )
    case(
        "seq: 1 with a parent by the author",
        build(ALICE, m, 1, 2, [good.id], OrderBody("sell", 100, 5, "gtc", None)).raw,
        "BadSequence",
        [good],
    )
    g2 = build(ALICE, m, 2, 2, [good.id], OrderBody("sell", 101, 1, "gtc", None))
    case(
        "seq: 3 whose own parent has seq 1",
        build(ALICE, m, 3, 2, [good.id], OrderBody("sell", 100, 5, "gtc", None)).raw,
        "BadSequence",
        [good, g2],
    )
    x, a2, a2f, fb1 = fork["x"], fork["a2"], fork["a2f"], fork["b1"]
    case(
        "seq: two own-author parents (both forks at seq 2)",
        build(ALICE, m, 3, 3, [a2.id, a2f.id], OrderBody("sell", 100, 5, "gtc", None)).raw,
        "BadSequence",
        [x, a2, a2f],
    )
    case(
        "cancel: of another author's order",
        build(ALICE, m, 1, 2, [b1.id], CancelBody(b1.id)).raw,
        "BadCancel",
        [b1],
    )
    case(
        "cancel: of an order not in the replica",
        build(ALICE, m, 2, 2, [good.id], CancelBody(bytes(32))).raw,
        "BadCancel",
        [good],
    )
    c2 = build(ALICE, m, 2, 2, [good.id], CancelBody(good.id))
    case(
        "cancel: of a cancel",
        build(ALICE, m, 3, 3, [c2.id], CancelBody(c2.id)).raw,
        "BadCancel",
        [good, c2],
    )
    case(
        "cancel: by an equivocating author, of its other branch's order "
        "(in the causal past via bob's op, not on the cancel's own-author chain)",
        build(ALICE, m, 3, 4, [a2.id, fb1.id], CancelBody(a2f.id)).raw,
        "BadCancel",
        [x, a2, a2f, fb1],
    )
    bad_parent = build(ALICE, m, 1, 3, [b1.id], OrderBody("sell", 100, 5, "gtc", None))
    case(
        "invalid parent: a child of an op with a bad Lamport time",
        build(BOB, m, 2, 4, [b1.id, bad_parent.id], OrderBody("buy", 91, 1, "gtc", None)).raw,
        "InvalidParent",
        [b1, bad_parent],
    )
    return {
        "description": "Invalid ops. stage 'decode': decode() refuses the bytes alone; stage "
        "'apply': the bytes decode, and a fresh DEMO replica that was given the context ops "
        "(in order) refuses them. error: the reference's exception class.",
        "market": market_json(m),
        "identities": identities_json(),
        "cases": cases,
    }


def _oversize() -> bytes:
    m = DEFAULT_MARKETS["DEMO"]
    base = _sign_items(ALICE, [1, m.id, ALICE.public_key, 1, 1, [], [0, 1, 100, 5, 0, ""]])
    # Pad the tag until the op is exactly one byte over the limit.
    n = 4097 - len(base)
    while True:
        raw = _sign_items(ALICE, [1, m.id, ALICE.public_key, 1, 1, [], [0, 1, 100, 5, 0, "t" * n]])
        if len(raw) == 4097:
            return raw
        n += 4097 - len(raw)


# -- sync.json --------------------------------------------------------------------------------


def make_sync(main_ops: list[Op]) -> Json:
    m = DEFAULT_MARKETS["DEMO"]
    ids = [op.id for op in main_ops]
    positions = []
    for size, hashes, ident_ in [
        (64, 7, ids[0]),
        (1024, 3, ids[1]),
        (8, 16, ids[2]),
        (8 * 1024 * 1024, 7, ids[3]),
    ]:
        bloom = BloomFilter(size, hashes)
        positions.append(
            {
                "size_bits": size,
                "hashes": hashes,
                "id": ident_.hex(),
                "positions": bloom._positions(ident_),
            }
        )
    filled = BloomFilter.for_ids(ids[:6])
    assert all(i in filled for i in ids[:6])

    full = Replica(m)
    full.apply_many(op.raw for op in main_ops)
    # The peer has the first 9 ops authored (a causally closed prefix of the authoring order).
    peer = Replica(m)
    peer.apply_many(op.raw for op in main_ops[:9])
    missing = ops_missing_for(full.applied_index, full.heads(), peer.heads())
    bloom = BloomFilter.for_ids(op.id for op in main_ops[:9])
    missing_bloom = ops_missing_for(full.applied_index, full.heads(), [], bloom)
    return {
        "description": "Bloom filter bit positions and contents, and the missing-ops walk over "
        "the main scenario's ops.",
        "bloom_positions": positions,
        "bloom_for_ids": {
            "ids": [i.hex() for i in ids[:6]],
            "size_bits": filled.size,
            "hashes": filled.hashes,
            "bits": bytes(filled.bits).hex(),
        },
        "missing": {
            "our_heads": [h.hex() for h in full.heads()],
            "their_heads": [h.hex() for h in peer.heads()],
            "missing": [op.id.hex() for op in missing],
            "with_bloom_of_their_ops_and_no_heads": {
                "bloom_bits": bytes(bloom.bits).hex(),
                "size_bits": bloom.size,
                "hashes": bloom.hashes,
                "missing": [op.id.hex() for op in missing_bloom],
            },
        },
    }


# -- driver -----------------------------------------------------------------------------------


def render() -> dict[str, str]:
    """Every vector file's name and exact text."""
    main, main_ops = make_main_scenario()
    fork, named = make_equivocation_scenario()
    files = {
        "market.json": make_markets(),
        "ops.json": make_ops(),
        "scenario.json": {"scenarios": [main, fork]},
        "invalid.json": make_invalid(main_ops, named),
        "sync.json": make_sync(main_ops),
    }
    return {
        name: json.dumps(obj, indent=2, ensure_ascii=False) + "\n" for name, obj in files.items()
    }


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    rendered = render()
    if args.check:
        stale = [
            n
            for n, text in rendered.items()
            if not (args.out / n).exists() or (args.out / n).read_text(encoding="utf-8") != text
        ]
        for name in stale:
            out(f"stale: {args.out / name}")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (args.out / name).write_text(text, encoding="utf-8")
        out(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
