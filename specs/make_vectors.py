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
from crdtbook import check_attested as crdtbook_check_attested
from crdtbook._engine import REASONS, STATUSES
from crdtbook._limits import MAX_INT
from crdtbook._ops import (
    SIGNATURE_DOMAIN,
    CancelAllBody,
    CancelBody,
    HeartbeatBody,
    OrderBody,
    ReconfigBody,
    sign_op,
)

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
    return cbor2.dumps(_state_items("crdtbook/state/v1", market, replica), canonical=True)


def _state_items(domain: str, market: Market, replica: Replica) -> list[Any]:
    """protocol.md section 9's state array (both versions share it but for the domain)."""
    book = replica.book()

    def side(levels: Any) -> list[Any]:
        return [[lv.price, [[o.order_id, o.remaining] for o in lv.orders]] for lv in levels]

    orders = [
        [o.id, STATUSES.index(o.status), o.remaining, o.filled, o.closed, REASONS.index(o.reason)]
        for o in sorted(replica.orders(), key=lambda o: o.id)
    ]
    fills = [[f.taker, f.maker, f.price, f.quantity] for f in replica.fills()]
    return [domain, market.id, side(book.bids), side(book.asks), fills, orders]


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


# -- finality.json (protocol version 2: witnessed markets) ---------------------------------------

WITNESSED_SIGNATURE_DOMAIN = b"crdtbook/op/v2\x00"
WITNESSED_MARKET_DOMAIN = "crdtbook/market/v2"
BATCH_DOMAIN = b"crdtbook/batch/v2\x00"
RECONFIG_DOMAIN = b"crdtbook/reconfig/v2\x00"
STP_CODE = {"expire_maker": 0, "expire_taker": 1, "expire_both": 2}
W_NAMES = {11: "w1", 12: "w2", 13: "w3", 14: "w4", 6: "mallory"}
W1, W2, W3, W4 = (ident(i) for i in (11, 12, 13, 14))
MALLORY = ident(6)
V2_LABEL = {**LABEL, **{ident(i).public_key: name for i, name in W_NAMES.items()}}


def finality_identities_json() -> list[Json]:
    names = {**NAMES, **W_NAMES}
    return [
        {"name": name, "seed": (bytes([i]) * 32).hex(), "public_key": ident(i).public_key.hex()}
        for i, name in sorted(names.items())
    ]


def witnessed_market_json(m: Market) -> Json:
    definition = cbor2.dumps(
        [WITNESSED_MARKET_DOMAIN, m.name, m.tick, m.lot, list(m.witnesses)], canonical=True
    )
    assert hashlib.sha256(definition).digest() == m.id, "market id disagrees with the spec"
    assert Market.parse(m.spec) == m
    return {
        "name": m.name,
        "tick": m.tick,
        "lot": m.lot,
        "witnesses": [k.hex() for k in m.witnesses],
        "spec": m.spec,
        "definition": definition.hex(),
        "id": m.id.hex(),
    }


def wire_body_v2(body: Any) -> list[Any]:
    """A version-2 body as specs/finality.md 3.1 writes it."""
    if isinstance(body, OrderBody):
        return [0, SIDE_CODE[body.side], body.price, body.quantity, TIF_CODE[body.tif], body.tag,
                STP_CODE[body.stp]]
    if isinstance(body, CancelBody):
        return [1, body.order_id]
    if isinstance(body, HeartbeatBody):
        return [2, body.time_ms]
    if isinstance(body, ReconfigBody):
        return [3, body.epoch, list(body.witnesses), [list(a) for a in body.approvals]]
    assert isinstance(body, CancelAllBody)
    return [4, body.prefix]


def build_v2(identity: Identity, market: Market, seq: int, lamport: int,
             parents: Sequence[bytes], body: Any) -> Op:
    """Sign a version-2 op from the spec; check it equals what the reference produces."""
    parents = sorted(parents)
    payload = payload_bytes(
        [2, market.id, identity.public_key, seq, lamport, parents, wire_body_v2(body)]
    )
    raw = assemble(payload, identity.sign(WITNESSED_SIGNATURE_DOMAIN + payload))
    reference = sign_op(identity, market.id, seq, lamport, tuple(parents), body, 2)
    assert reference.raw == raw, "version-2 encoder disagrees with the reference"
    op = decode(raw)
    assert op.id == hashlib.sha256(raw).digest() and op.version == 2
    return op


def approval(identity: Identity, market: Market, epoch: int,
             witnesses: Sequence[bytes]) -> tuple[bytes, bytes]:
    message = RECONFIG_DOMAIN + cbor2.dumps([market.id, epoch, sorted(witnesses)],
                                            canonical=True)
    return identity.public_key, identity.sign(message)


class _WNode(_Node):
    """A peer of a witnessed market: authors version-2 ops with the spec's parent choice."""

    def sign(self, identity: Identity, body: Any) -> Op:
        """The op ``identity`` would author here next (not added to this view)."""
        pk = identity.public_key
        mine = [op for op in self.ops.values() if op.author == pk]
        tip = max(mine, key=lambda o: o.seq, default=None)
        parents = {h for h in self.heads() if self.ops[h].author != pk}
        if tip is not None:
            parents.add(tip.id)
        lamport = 1 + max((self.ops[p].lamport for p in parents), default=0)
        return build_v2(identity, self.market, 1 if tip is None else tip.seq + 1, lamport,
                        sorted(parents), body)

    def author(self, identity: Identity, body: Any) -> Op:
        op = self.sign(identity, body)
        self.ops[op.id] = op
        return op


def describe_v2(op: Op) -> str:
    who = V2_LABEL.get(op.author, op.author.hex()[:8])
    b = op.body
    if isinstance(b, OrderBody):
        tag = f" tag={b.tag!r}" if b.tag is not None else ""
        stp = f" {b.stp}" if b.stp != "expire_maker" else ""
        what = f"{b.side} {b.quantity}@{b.price} {b.tif}{tag}{stp}"
    elif isinstance(b, CancelBody):
        what = f"cancel {b.order_id.hex()[:12]}"
    elif isinstance(b, CancelAllBody):
        what = "cancel-all" + (f" prefix={b.prefix!r}" if b.prefix is not None else "")
    elif isinstance(b, HeartbeatBody):
        what = f"heartbeat t={b.time_ms}"
        if b.point:
            what += f" attesting the point at {b.point} ({b.point_hash.hex()[:8]})"
    else:
        assert isinstance(b, ReconfigBody)
        names = ",".join(V2_LABEL.get(k, k.hex()[:8]) for k in b.witnesses)
        what = f"reconfig epoch {b.epoch} -> {{{names}}}"
    return f"{who}#{op.seq} L{op.lamport} {what}"


def spec_ranks(replica: Replica) -> dict[bytes, int]:
    """Every placed op's rank, computed from specs/finality.md section 4 with public views only
    (placements): the generator's check on the reference's order."""
    ops = replica.ops()
    by_id = {op.id: op for op in ops}
    batches: dict[int, list[Op]] = {}
    for op in ops:
        point = replica.placement(op.id)
        if point is not None:
            batches.setdefault(point, []).append(op)
    ranks: dict[bytes, int] = {}
    for point, members in batches.items():
        # The counted heartbeats of the batch: a counted heartbeat is placed at its own Lamport
        # time; one that does not count is placed, if at all, by a later one (a larger time).
        beats = sorted(op.id for op in members if op.kind == "heartbeat" and op.lamport == point)
        seed = hashlib.sha256(BATCH_DOMAIN + b"".join(beats)).digest()
        for op in sorted(members, key=lambda o: (o.lamport, o.id)):
            value = int.from_bytes(hashlib.sha256(seed + op.id).digest()[:8], "big")
            for parent in op.parents:
                if replica.placement(parent) == point:
                    value = max(value, ranks[parent])
            ranks[op.id] = value
    assert all(i in by_id for i in ranks)
    return ranks


def _witnessed_preimage(market: Market, replica: Replica) -> bytes:
    """The digest preimage of specs/finality.md section 6: protocol.md's book, the fills after
    the final ones, the orders not finished within the final prefix, then the frontier, the
    final op count and the running hash of the final op ids (what a compacted replica still
    has)."""
    _, _, bids, asks, fills, orders = _state_items("crdtbook/state/v2", market, replica)
    settled = {o.id for o in replica.orders() if o.final}
    final_count = replica.final_count
    chain = bytes(32)
    for op in replica.ops()[:final_count]:
        chain = hashlib.sha256(b"crdtbook/final-chain/v2\x00" + chain + op.id).digest()
    state = ["crdtbook/state/v2", market.id, bids, asks, fills[replica.final_fill_count():],
             [o for o in orders if o[0] not in settled], replica.frontier, final_count, chain]
    return cbor2.dumps(state, canonical=True)


def finality_state_json(replica: Replica) -> Json:
    """Everything a witnessed replica derives about order and finality, in readable form (what
    a finality case expects; tests/core/test_vectors.py compares a replica against it)."""
    ops = replica.ops()
    ranks = spec_ranks(replica)
    key = {op.id: (replica.placement(op.id) or 2**63, ranks.get(op.id, 0), op.lamport, op.id)
           for op in ops}
    assert ops == sorted(ops, key=lambda o: key[o.id]), "the reference's order is not the spec's"

    def levels(side: Any) -> list[Json]:
        return [
            {"price": lv.price, "quantity": lv.quantity,
             "orders": [{"order_id": o.order_id.hex(), "remaining": o.remaining}
                        for o in lv.orders]}
            for lv in side
        ]

    book, final_book = replica.book(), replica.final_book()
    fills = replica.fills()
    return {
        "total_order": [
            {
                "id": op.id.hex(),
                "placement": replica.placement(op.id),
                "rank": ranks.get(op.id, 0),
                "final": replica.is_final(op.id),
                "witnessed_time": replica.witnessed_time(op.id),
            }
            for op in ops
        ],
        "frontier": replica.frontier,
        "final_count": replica.final_count,
        "epoch": replica.epoch,
        "witnesses": [k.hex() for k in sorted(replica.witnesses())],
        "witness_status": [
            {"key": w.key.hex(), "heartbeat_lamport": w.heartbeat_lamport,
             "heartbeat_seq": w.heartbeat_seq, "current": w.current, "forked": w.forked}
            for w in replica.witness_status()
        ],
        "fills": [
            {"taker": f.taker.hex(), "maker": f.maker.hex(), "price": f.price,
             "quantity": f.quantity, "taker_side": f.taker_side,
             "final": i < replica.final_fill_count()}
            for i, f in enumerate(fills)
        ],
        "final_fill_count": replica.final_fill_count(),
        "orders": [
            {"id": o.id.hex(), "status": o.status, "reason": o.reason, "remaining": o.remaining,
             "filled": o.filled, "closed": o.closed, "final": o.final}
            for o in replica.orders()
        ],
        "book": {"bids": levels(book.bids), "asks": levels(book.asks)},
        "final_book": {"bids": levels(final_book.bids), "asks": levels(final_book.asks)},
        "digest": replica.digest().hex(),
    }


def _finality_case(name: str, text: str, market: Market, ops: list[Op],
                   refused: Sequence[tuple[str, Op, str]] = (),
                   stages: Sequence[tuple[str, list[Op]]] = ()) -> Json:
    delivery = _shuffled(ops)
    replica = Replica(market)
    for op in delivery:
        replica.apply(op.raw)  # children before parents wait, then are released
    assert replica.pending_count == 0 and len(replica) == len(ops)
    for order in (ops, list(reversed(ops))):  # every delivery order: the same replica
        other = Replica(market)
        report = other.apply_many(op.raw for op in order)
        assert not report.invalid
        assert other.ops() == replica.ops() and other.digest() == replica.digest()
    preimage = _witnessed_preimage(market, replica)
    assert hashlib.sha256(preimage).digest() == replica.digest()
    state = finality_state_json(replica)
    digest = state.pop("digest")
    refusals = []
    for why, op, error in refused:
        before = replica.digest()
        try:
            replica.apply(op.raw)
        except InvalidOp as exc:
            assert type(exc).__name__ == error, (why, type(exc).__name__)
        else:  # pragma: no cover - generator self-check
            raise AssertionError(f"{why}: accepted")
        assert replica.digest() == before
        refusals.append({"why": why, "label": describe_v2(op), "id": op.id.hex(),
                         "encoding": op.raw.hex(), "error": error})
    staged = []
    for what, some in stages:
        partial = Replica(market)
        report = partial.apply_many(op.raw for op in _shuffled(some))
        assert not report.invalid and partial.pending_count == 0
        staged.append({
            "description": what,
            "ops": [op.id.hex() for op in _shuffled(some)],
            "frontier": partial.frontier,
            "final_count": partial.final_count,
            "fill_count": partial.fill_count,
            "final_fill_count": partial.final_fill_count(),
            "needs_heartbeat": [k.hex() for k in sorted(partial.witnesses())
                                if partial.needs_heartbeat(k)],
        })
    labels = {op.id: describe_v2(op) for op in ops}
    case: Json = {
        "name": name,
        "description": text,
        "market": witnessed_market_json(market),
        "ops": [
            {"label": labels[op.id], "id": op.id.hex(), "encoding": op.raw.hex()}
            for op in delivery
        ],
        "expected": {**state, "state_encoding": preimage.hex(), "digest": digest},
    }
    if staged:
        case["stages"] = staged
    if refusals:
        case["refused"] = refusals
    return case


def make_finality_main() -> Json:
    m = Market("WIT", "1", "1", witnesses=[w.public_key for w in (W1, W2, W3)])
    na, nb, nc, nd, ne = (_WNode(m) for _ in range(5))
    n1, n2, n3 = (_WNode(m) for _ in range(3))
    everyone = (na, nb, nc, nd, ne, n1, n2, n3)
    ops: list[Op] = []

    def add(node: _WNode, who: Identity, body: Any) -> Op:
        op = node.author(who, body)
        ops.append(op)
        return op

    def merge(*nodes: _WNode) -> None:
        for n in nodes:
            n.learn(*nodes)

    # Batch 1. alice's ask and carol's IOC bid are concurrent (Lamport 1): which comes first is
    # decided by their ranks in the batch, not by their ids. bob bids on top of alice's ask.
    alice_ask = add(na, ALICE, OrderBody("sell", 100, 6, "gtc", "a-1"))
    add(nc, CAROL, OrderBody("buy", 101, 2, "ioc", None))
    nb.learn(na)
    add(nb, BOB, OrderBody("buy", 100, 3, "gtc", "b-1"))
    for n in (n1, n2, n3):
        n.learn(na, nb, nc)
    # The three witnesses heartbeat at once (Lamport 3 each): one batch, seeded by all three.
    for n, w, t in ((n1, W1, 1_700_000_000_300), (n2, W2, 1_700_000_000_250), (n3, W3, 0)):
        add(n, w, HeartbeatBody(t))
    merge(*everyone)

    # Batch 2, concurrent again: dave rests a post-only ask, erin's expire_taker FOK, alice's
    # cancel-all of her tagged orders, bob's duplicate client id (rejected).
    add(nd, DAVE, OrderBody("sell", 101, 4, "post_only", None))
    add(ne, ERIN, OrderBody("buy", 101, 3, "fok", None, "expire_taker"))
    add(na, ALICE, CancelAllBody("a-"))
    add(nb, BOB, OrderBody("buy", 99, 1, "gtc", "b-1"))
    merge(na, nb, nd, ne, n1)
    add(n1, W1, HeartbeatBody(1_700_000_000_600))
    merge(na, nb, nd, ne, n1, n2)
    add(n2, W2, HeartbeatBody(1_700_000_000_650))
    merge(*everyone)
    add(n3, W3, HeartbeatBody(1_700_000_000_700))
    merge(*everyone)

    # Above the frontier: carol's order acknowledged by w1 alone (placed, not final) ...
    nc.learn(*everyone)
    add(nc, CAROL, OrderBody("buy", 101, 1, "gtc", "c-2"))
    n1.learn(nc)
    add(n1, W1, HeartbeatBody(1_700_000_000_900))
    # ... and mallory's order from a fresh replica, no parents, Lamport 1: in version 1 it would
    # sort before everything; here it is unplaced, after everything, and final fills stand.
    late = _WNode(m)
    add(late, MALLORY, OrderBody("buy", 101, 5, "gtc", None))
    text = (
        "A witnessed market (witnesses w1, w2, w3). Batch 1: alice's ask and carol's IOC bid are "
        "concurrent at Lamport 1 and sort by rank; bob bids on alice's ask; the three witnesses "
        "heartbeat at once. Batch 2: a post-only, an expire_taker FOK, a cancel-all by prefix, a "
        "duplicate client id; the witnesses heartbeat one after the other. Then carol's order "
        "acknowledged by w1 alone (placed above the frontier, not final) and mallory's order "
        "with no parents (Lamport 1), delivered last in spirit: unplaced, after everything. "
        "Ops are listed in a shuffled delivery order."
    )
    case = _finality_case("main", text, m, ops)
    expected = case["expected"]
    placements = [e["placement"] for e in expected["total_order"]]
    assert None in placements and any(p is not None and p > expected["frontier"]
                                       for p in placements)
    assert expected["total_order"][-1]["id"] == ops[-1].id.hex()  # mallory's, last
    assert 0 < expected["final_fill_count"] < len(expected["fills"])
    assert alice_ask.lamport == 1
    return case


def make_finality_reconfig() -> Json:
    m = Market("WIT", "1", "1", witnesses=[w.public_key for w in (W1, W2, W3)])
    na, nb = _WNode(m), _WNode(m)
    n1, n2, n3 = (_WNode(m) for _ in range(3))
    everyone = (na, nb, n1, n2, n3)
    ops: list[Op] = []

    def add(node: _WNode, who: Identity, body: Any) -> Op:
        op = node.author(who, body)
        ops.append(op)
        return op

    def merge(*nodes: _WNode) -> None:
        for n in nodes:
            n.learn(*nodes)

    add(na, ALICE, OrderBody("sell", 100, 5, "gtc", None))
    merge(*everyone)
    for n, w in ((n1, W1), (n2, W2), (n3, W3)):
        add(n, w, HeartbeatBody(0))
    merge(*everyone)
    # w3 is gone from here on. Trading goes on; w1 and w2 acknowledge; the frontier stalls.
    add(nb, BOB, OrderBody("buy", 100, 2, "gtc", None))
    merge(nb, n1, n2)
    add(n1, W1, HeartbeatBody(0))
    add(n2, W2, HeartbeatBody(0))
    merge(na, nb, n1, n2)
    stalled = list(ops)
    # w1 replaces w3 by w4, with w2's approval (2 of 3), knowing w3's last heartbeat.
    new = sorted(w.public_key for w in (W1, W2, W4))
    body = ReconfigBody(1, tuple(new), (approval(W2, m, 1, new),))
    reconfig = add(n1, W1, body)
    merge(na, nb, n1, n2)
    n4 = _WNode(m)
    n4.learn(n1)
    add(n4, W4, HeartbeatBody(0))
    merge(na, nb, n1, n2, n4)
    add(n1, W1, HeartbeatBody(0))
    add(n2, W2, HeartbeatBody(0))
    merge(na, nb, n1, n2, n4)
    text = (
        "Reconfiguration: w3 heartbeats once and falls silent, which stalls the frontier while "
        "trading goes on; w1 signs epoch 1 = {w1, w2, w4} with w2's approval (a majority of "
        "three), w4 heartbeats with the reconfiguration in its past, and finality resumes. "
        "stages: what a replica given only the listed ops shows. refused: reconfigurations "
        "every replica holding these ops must refuse (BadWitness), changing nothing."
    )
    two = [w.public_key for w in (W1, W2)]
    back = [w.public_key for w in (W1, W2, W3, W4)]
    refused = [
        ("no majority: epoch 2 signed by w2 alone (1 of 3)",
         n1.sign(W2, ReconfigBody(2, tuple(sorted(two)), ())), "BadWitness"),
        ("a removed key added again: epoch 2 re-adds w3",
         n1.sign(W1, ReconfigBody(2, tuple(sorted(back)), (approval(W2, m, 2, back),))),
         "BadWitness"),
        ("wrong epoch: epoch 1 again, with epoch 1 in its past",
         n1.sign(W1, ReconfigBody(1, tuple(sorted(two)), (approval(W2, m, 1, two),))),
         "BadWitness"),
        ("forged approval: w2's key, signed by mallory",
         n1.sign(W1, ReconfigBody(2, tuple(sorted(two)),
                                  ((W2.public_key, approval(MALLORY, m, 2, two)[1]),))),
         "BadWitness"),
    ]
    stage = "w3 silent: the frontier stays at its last heartbeat; bob's fill is not final"
    case = _finality_case("reconfiguration", text, m, ops, refused, [(stage, stalled)])
    expected = case["expected"]
    stalled_json = case["stages"][0]
    assert stalled_json["fill_count"] == 1 and stalled_json["final_fill_count"] == 0
    assert stalled_json["needs_heartbeat"] == [W3.public_key.hex()]
    assert expected["epoch"] == 1 and reconfig.kind == "reconfig"
    assert expected["final_count"] == len(ops) - 2  # all but the last two heartbeats
    return case


def make_finality() -> Json:
    return {
        "description": "Witnessed markets (protocol version 2, specs/finality.md). Each case: "
        "the market (definition = canonical CBOR of ['crdtbook/market/v2', name, tick, lot, "
        "[witness keys]], id = SHA-256 of it), the ops in a shuffled delivery order, and what a "
        "replica given them in that order derives: the total order (placement: Lamport time of "
        "the batch, null if unplaced; rank per section 4; final), frontier, final_count, epoch, "
        "witnesses, fills with finality, orders, book and final book, state_encoding (digest "
        "preimage, section 6) and digest. Signed messages use 'crdtbook/op/v2\\x00'.",
        "identities": finality_identities_json(),
        "cases": [make_finality_main(), make_finality_reconfig()],
    }


# -- points.json (version 2: compaction points, point states, attestations) ---------------------


def make_points() -> Json:
    """One witnessed market traded past two points of a small interval; every replica that
    compacts there writes the same point state, and the witnesses attest it."""
    interval = 12
    m = Market("PTS", "1", "1", witnesses=[w.public_key for w in (W1, W2, W3)])
    author = Replica(m)
    ops: list[Op] = []
    traders = (ALICE, BOB, CAROL)
    for step in range(30):
        if step % 5 == 4:
            ops.append(author.heartbeat((W1, W2, W3)[step % 3], time_ms=1_700_000_000_000 + step))
        else:
            side = ("buy", "sell")[step % 2]
            ops.append(author.submit(traders[step % 3], side, 100 + step % 3, 1 + step % 4))
    for _ in range(2):
        for w in (W1, W2, W3):
            ops.append(author.heartbeat(w))
    blobs = set()
    for order in (ops, list(reversed(ops)), _shuffled(ops)):
        replica = Replica(m, point_interval=interval)
        assert not replica.apply_many(op.raw for op in order).invalid
        report = replica.compact()
        assert report.point and replica.point is not None
        blobs.add(replica.snapshot())
    assert len(blobs) == 1
    point = replica.point
    assert point is not None
    attesting = [replica.heartbeat(w, time_ms=1_700_000_100_000) for w in (W1, W2)]
    assert crdtbook_check_attested(m, blobs.pop(), [b.raw for b in attesting], []) == point
    return {
        "description": "Points (specs/finality.md section 13). A witnessed market's ops; a "
        "replica given them in any order, with the point interval below, compacts at the point "
        "(the end of the first batch at which the final count reaches a multiple of the "
        "interval: the last one reached is given) and writes the point state below, byte for "
        "byte; its SHA-256 is what witnesses attest. Then two of the three witnesses sign "
        "heartbeats [2, time_ms, n, hash] attesting it: a strict majority, so a joining node "
        "accepts the point state.",
        "identities": finality_identities_json(),
        "market": witnessed_market_json(m),
        "point_interval": interval,
        "ops": [{"label": describe_v2(op), "id": op.id.hex(), "encoding": op.raw.hex()}
                for op in _shuffled(ops)],
        "expected": {
            "n": point.n,
            "chain": point.chain.hex(),
            "kept": [i.hex() for i in point.kept],
            "point_state": replica.snapshot().hex(),
            "hash": point.hash.hex(),
        },
        "attestations": [{"label": describe_v2(b), "encoding": b.raw.hex()} for b in attesting],
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
        "finality.json": make_finality(),
        "points.json": make_points(),
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
