"""The committed protocol vectors (specs/vectors/) against the implementation.

These files are the compatibility contract of specs/protocol.md: ids, encodings, signed messages,
market ids, the derived state of a scenario and the verdict on invalid ops. A code change that
makes any of these fail is a wire or derivation change: it needs a new protocol version, not new
vectors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any

import nacl.bindings
import pytest

import crdtbook
from crdtbook import (
    DEFAULT_MARKETS,
    BloomFilter,
    CancelBody,
    Identity,
    Market,
    OrderBody,
    Replica,
    decode,
    ops_missing_for,
)
from crdtbook._ops import SIGNATURE_DOMAIN, sign_op

SPECS = Path(__file__).resolve().parents[2] / "specs"
VECTORS = SPECS / "vectors"


@cache
def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def market_of(entry: dict[str, Any]) -> Market:
    market = Market(entry["name"], entry["tick"], entry["lot"])
    assert market.id.hex() == entry["id"]
    return market


def seeds(vectors: dict[str, Any]) -> dict[bytes, Identity]:
    out = {}
    for entry in vectors["identities"]:
        identity = Identity.from_seed(h(entry["seed"]))
        assert identity.public_key.hex() == entry["public_key"]
        out[identity.public_key] = identity
    return out


def body_of(fields: dict[str, Any]) -> OrderBody | CancelBody:
    if fields["kind"] == "order":
        return OrderBody(
            fields["side"], fields["price"], fields["quantity"], fields["tif"], fields["tag"]
        )
    assert fields["kind"] == "cancel"
    return CancelBody(h(fields["order_id"]))


# -- markets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", load("market.json")["markets"], ids=lambda e: e["name"])
def test_market_ids(entry: dict[str, Any]) -> None:
    market = Market(entry["name"], entry["tick_input"], entry["lot_input"])
    assert (market.tick, market.lot) == (entry["tick"], entry["lot"])
    assert hashlib.sha256(h(entry["definition"])).hexdigest() == entry["id"]
    assert market.id.hex() == entry["id"]
    if entry["name"] in DEFAULT_MARKETS and entry["tick_input"] == entry["tick"]:
        assert DEFAULT_MARKETS[entry["name"]].id.hex() == entry["id"]


@pytest.mark.parametrize("entry", load("market.json")["refused"], ids=lambda e: e["why"])
def test_market_refused(entry: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Market(entry["name"], entry["tick"], entry["lot"])


@pytest.mark.parametrize("entry", load("market.json")["conversions"], ids=str)
def test_market_conversions(entry: dict[str, Any]) -> None:
    market = DEFAULT_MARKETS[entry["market"]]
    if "price" in entry:
        assert market.price_to_ticks(entry["price"]) == entry["ticks"]
    else:
        assert market.qty_to_lots(entry["quantity"]) == entry["lots"]


# -- ops --------------------------------------------------------------------------------------

OPS = load("ops.json")


@pytest.mark.parametrize("entry", OPS["ops"], ids=lambda e: e["label"][:40])
def test_op_decodes_to_fields(entry: dict[str, Any]) -> None:
    raw = h(entry["encoding"])
    op = decode(raw)
    fields = entry["fields"]
    assert op.id.hex() == entry["id"] == hashlib.sha256(raw).hexdigest()
    assert crdtbook.encode(op) == raw
    assert op.version == fields["version"] == 1
    assert op.market_id.hex() == fields["market_id"] == OPS["market"]["id"]
    assert op.author.hex() == fields["author"]
    assert (op.seq, op.lamport) == (fields["seq"], fields["lamport"])
    assert [p.hex() for p in op.parents] == fields["parents"]
    assert op.body == body_of(fields["body"])
    assert op.kind == fields["body"]["kind"]
    assert op.signature.hex() == fields["signature"]


@pytest.mark.parametrize("entry", OPS["ops"], ids=lambda e: e["label"][:40])
def test_op_signed_message_and_layout(entry: dict[str, Any]) -> None:
    payload, raw = h(entry["payload"]), h(entry["encoding"])
    signature = h(entry["fields"]["signature"])
    assert h(entry["signed_message"]) == SIGNATURE_DOMAIN + payload
    assert SIGNATURE_DOMAIN == b"crdtbook/op/v1\x00"
    # The op is the payload with an 8-item head and the signature as a 64-byte string.
    assert payload[0] == 0x87
    assert raw == b"\x88" + payload[1:] + b"\x58\x40" + signature
    nacl.bindings.crypto_sign_open(
        signature + h(entry["signed_message"]), h(entry["fields"]["author"])
    )


@pytest.mark.parametrize("entry", OPS["ops"], ids=lambda e: e["label"][:40])
def test_op_encodes_from_fields(entry: dict[str, Any]) -> None:
    fields = entry["fields"]
    identity = seeds(OPS)[h(fields["author"])]
    op = sign_op(
        identity,
        h(fields["market_id"]),
        fields["seq"],
        fields["lamport"],
        tuple(h(p) for p in fields["parents"]),
        body_of(fields["body"]),
    )
    assert op.raw.hex() == entry["encoding"]
    assert op.id.hex() == entry["id"]


def test_ops_form_a_valid_dag() -> None:
    replica = Replica(market_of(OPS["market"]))
    report = replica.apply_many(h(e["encoding"]) for e in OPS["ops"])
    assert not report.invalid
    assert len(replica) == len(OPS["ops"])


# -- scenarios --------------------------------------------------------------------------------

SCENARIOS = load("scenario.json")["scenarios"]


@cache
def generator() -> Any:
    """specs/make_vectors.py as a module: its state_json says what a scenario expects."""
    spec = importlib.util.spec_from_file_location("make_vectors", SPECS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def state_of(replica: Replica) -> dict[str, Any]:
    return dict(generator().state_json(replica))


def check_scenario(scenario: dict[str, Any], replica: Replica) -> None:
    expected = dict(scenario["expected"])
    encoding = expected.pop("state_encoding")
    assert hashlib.sha256(h(encoding)).hexdigest() == expected["digest"]
    assert replica.pending_count == 0
    assert state_of(replica) == expected


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s["name"])
def test_scenario_one_by_one_in_delivery_order(scenario: dict[str, Any]) -> None:
    replica = Replica(market_of(scenario["market"]))
    for entry in scenario["ops"]:
        raw = h(entry["encoding"])
        assert hashlib.sha256(raw).hexdigest() == entry["id"]
        replica.apply(raw)  # children before parents wait, then are released
    check_scenario(scenario, replica)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s["name"])
def test_scenario_other_orders(scenario: dict[str, Any]) -> None:
    market = market_of(scenario["market"])
    raws = {e["id"]: h(e["encoding"]) for e in scenario["ops"]}
    in_total_order = [raws[i] for i in scenario["expected"]["total_order"]]
    for order in (
        in_total_order,
        list(reversed(in_total_order)),
        [h(e["encoding"]) for e in scenario["ops"]],
    ):
        replica = Replica(market)
        report = replica.apply_many(order + order)  # repetition is harmless
        assert not report.invalid and report.duplicates == len(order)
        check_scenario(scenario, replica)


def test_scenario_covers_the_matching_rules() -> None:
    """The main scenario keeps exercising every outcome the spec names."""
    main = next(s for s in SCENARIOS if s["name"] == "main")["expected"]
    outcomes = {(o["status"], o["reason"], o["tif"]) for o in main["orders"]}
    for needed in [
        ("filled", None, "fok"),
        ("expired", "fok_unfillable", "fok"),
        ("expired", "ioc_remainder", "ioc"),
        ("rejected", "post_only_would_take", "post_only"),
        ("open", None, "post_only"),
        ("expired", "self_trade", "gtc"),
        ("cancelled", "cancelled", "gtc"),
        ("partially_filled", None, "gtc"),
    ]:
        assert needed in outcomes, needed
    assert {c["effective"] for c in main["cancels"]} == {True, False}
    assert len({f["price"] for f in main["fills"]}) >= 3


# -- invalid ops ------------------------------------------------------------------------------

INVALID = load("invalid.json")


#: Version-1 cases whose refusal stays but whose reference class changed when version 2 came:
#: "version 2" was an unknown version; it is now the witnessed version, whose orders have seven
#: items (with a self-trade mode), so this version-2 op with a six-item order is malformed (it
#: was also signed under version 1's domain, which version 2 does not accept).
#: The refusal is normative, the class informative (protocol.md 4.6); the file stays as it was.
REFUSED_SINCE_VERSION_2_AS: dict[str, str] = {"unknown protocol version 2": "MalformedOp"}


@pytest.mark.parametrize("case", INVALID["cases"], ids=lambda c: c["name"][:60])
def test_invalid(case: dict[str, Any]) -> None:
    error = getattr(crdtbook, REFUSED_SINCE_VERSION_2_AS.get(case["name"], case["error"]))
    assert issubclass(error, crdtbook.InvalidOp)
    raw = h(case["encoding"])
    if case["stage"] == "decode":
        assert not case["context"]
        with pytest.raises(error):
            decode(raw)
        # A replica refuses it the same way and stays empty.
        replica = Replica(market_of(INVALID["market"]))
        with pytest.raises(error):
            replica.apply(raw)
        assert len(replica) == 0
        return
    decode(raw)  # the bytes alone are a well-formed, signed op
    replica = Replica(market_of(INVALID["market"]))
    replica.apply_many(h(c) for c in case["context"])
    before = replica.digest()
    with pytest.raises(error):
        replica.apply(raw)
    assert replica.digest() == before
    assert h(case["id"]) not in replica
    # Refused again, the same way, if offered again.
    with pytest.raises(error):
        replica.apply(raw)


# -- sync helpers -----------------------------------------------------------------------------

SYNC = load("sync.json")


@pytest.mark.parametrize("entry", SYNC["bloom_positions"], ids=lambda e: str(e["size_bits"]))
def test_bloom_positions(entry: dict[str, Any]) -> None:
    bloom = BloomFilter(entry["size_bits"], entry["hashes"])
    assert bloom._positions(h(entry["id"])) == entry["positions"]
    bloom.add(h(entry["id"]))
    for pos in entry["positions"]:
        assert bloom.bits[pos // 8] & (1 << (pos % 8))


def test_bloom_for_ids() -> None:
    entry = SYNC["bloom_for_ids"]
    bloom = BloomFilter.for_ids(h(i) for i in entry["ids"])
    assert (bloom.size, bloom.hashes) == (entry["size_bits"], entry["hashes"])
    assert bytes(bloom.bits).hex() == entry["bits"]


def test_missing_ops_walk() -> None:
    main = next(s for s in SCENARIOS if s["name"] == "main")
    replica = Replica(market_of(main["market"]))
    replica.apply_many(h(e["encoding"]) for e in main["ops"])
    entry = SYNC["missing"]
    assert [i.hex() for i in replica.heads()] == entry["our_heads"]
    missing = ops_missing_for(
        replica.applied_index, replica.heads(), [h(i) for i in entry["their_heads"]]
    )
    assert [op.id.hex() for op in missing] == entry["missing"]
    with_bloom = entry["with_bloom_of_their_ops_and_no_heads"]
    bloom = BloomFilter(with_bloom["size_bits"], with_bloom["hashes"], h(with_bloom["bloom_bits"]))
    missing = ops_missing_for(replica.applied_index, replica.heads(), [], bloom)
    assert [op.id.hex() for op in missing] == with_bloom["missing"]


# -- finality (protocol version 2) --------------------------------------------------------------

FINALITY = load("finality.json")
BATCH_DOMAIN = b"crdtbook/batch/v2\x00"


def witnessed_market_of(entry: dict[str, Any]) -> Market:
    market = Market(entry["name"], entry["tick"], entry["lot"],
                    witnesses=[h(k) for k in entry["witnesses"]])
    assert market.version == 2 and [k.hex() for k in market.witnesses] == entry["witnesses"]
    assert hashlib.sha256(h(entry["definition"])).hexdigest() == entry["id"] == market.id.hex()
    assert market.spec == entry["spec"] and Market.parse(entry["spec"]) == market
    return market


def spec_order_check(replica: Replica, total_order: list[dict[str, Any]]) -> None:
    """The expected ranks follow specs/finality.md section 4 from the expected placements, and
    the expected order is the sort by (placement, rank, Lamport, id)."""
    ops = {op.id.hex(): op for op in replica.ops()}
    placement = {e["id"]: e["placement"] for e in total_order}
    rank = {e["id"]: e["rank"] for e in total_order}
    for e in total_order:
        op = ops[e["id"]]
        point = e["placement"]
        if point is None:
            assert e["rank"] == 0 and not e["final"]
            continue
        beats = sorted(
            h(i) for i, p in placement.items()
            if p == point and ops[i].kind == "heartbeat" and ops[i].lamport == point
        )
        seed = hashlib.sha256(BATCH_DOMAIN + b"".join(beats)).digest()
        value = int.from_bytes(hashlib.sha256(seed + op.id).digest()[:8], "big")
        for parent in op.parents:
            if placement[parent.hex()] == point:
                value = max(value, rank[parent.hex()])
        assert e["rank"] == value, e
    unplaced = 2**63
    keys = [
        (unplaced if e["placement"] is None else e["placement"], e["rank"], ops[e["id"]].lamport,
         h(e["id"]))
        for e in total_order
    ]
    assert keys == sorted(keys)


def check_finality_case(case: dict[str, Any], replica: Replica) -> None:
    expected = dict(case["expected"])
    encoding = expected.pop("state_encoding")
    assert hashlib.sha256(h(encoding)).hexdigest() == expected["digest"]
    assert replica.digest().hex() == expected["digest"]
    assert replica.pending_count == 0
    order = expected["total_order"]
    assert [op.id.hex() for op in replica.ops()] == [e["id"] for e in order]
    for op, e in zip(replica.ops(), order, strict=True):
        assert replica.placement(op.id) == e["placement"]
        assert replica.is_final(op.id) == e["final"]
        assert replica.witnessed_time(op.id) == e["witnessed_time"]
    assert (replica.frontier, replica.final_count, replica.epoch) == (
        expected["frontier"], expected["final_count"], expected["epoch"],
    )
    assert sum(e["final"] for e in order) == replica.final_count
    assert sorted(k.hex() for k in replica.witnesses()) == expected["witnesses"]
    assert replica.final_fill_count() == expected["final_fill_count"]
    assert [f["final"] for f in expected["fills"]] == [
        i < replica.final_fill_count() for i in range(replica.fill_count)
    ]
    spec_order_check(replica, order)
    assert dict(generator().finality_state_json(replica)) == expected


@pytest.mark.parametrize("case", FINALITY["cases"], ids=lambda c: c["name"])
def test_finality_in_delivery_order(case: dict[str, Any]) -> None:
    """Fed one by one in the listed (shuffled) order to a fresh replica."""
    market = witnessed_market_of(case["market"])
    replica = Replica(market)
    for entry in case["ops"]:
        raw = h(entry["encoding"])
        assert hashlib.sha256(raw).hexdigest() == entry["id"]
        op = decode(raw)
        assert op.version == 2 and crdtbook.encode(op) == raw
        replica.apply(raw)
    check_finality_case(case, replica)
    for refused in case.get("refused", []):
        error = getattr(crdtbook, refused["error"])
        before = replica.digest()
        with pytest.raises(error):
            replica.apply(h(refused["encoding"]))
        assert replica.digest() == before and h(refused["id"]) not in replica


@pytest.mark.parametrize("case", FINALITY["cases"], ids=lambda c: c["name"])
def test_finality_in_other_orders(case: dict[str, Any]) -> None:
    market = witnessed_market_of(case["market"])
    raws = {e["id"]: h(e["encoding"]) for e in case["ops"]}
    in_total_order = [raws[e["id"]] for e in case["expected"]["total_order"]]
    for order in (in_total_order, list(reversed(in_total_order))):
        replica = Replica(market)
        report = replica.apply_many(order + order)
        assert not report.invalid and report.duplicates == len(order)
        check_finality_case(case, replica)


@pytest.mark.parametrize(
    "case", [c for c in FINALITY["cases"] if "stages" in c], ids=lambda c: c["name"]
)
def test_finality_stages(case: dict[str, Any]) -> None:
    market = witnessed_market_of(case["market"])
    raws = {e["id"]: h(e["encoding"]) for e in case["ops"]}
    for stage in case["stages"]:
        replica = Replica(market)
        report = replica.apply_many(raws[i] for i in stage["ops"])
        assert not report.invalid and replica.pending_count == 0
        assert (replica.frontier, replica.final_count, replica.fill_count) == (
            stage["frontier"], stage["final_count"], stage["fill_count"],
        )
        assert replica.final_fill_count() == stage["final_fill_count"]
        assert [k.hex() for k in sorted(replica.witnesses()) if replica.needs_heartbeat(k)] == (
            stage["needs_heartbeat"]
        )


def test_finality_main_case_covers_what_the_spec_promises() -> None:
    main = next(c for c in FINALITY["cases"] if c["name"] == "main")["expected"]
    order = main["total_order"]
    assert any(e["final"] for e in order)
    assert any(e["placement"] is not None and not e["final"] for e in order)  # above F
    assert order[-1]["placement"] is None  # the late Lamport-1 order: unplaced, last
    assert 0 < main["final_fill_count"] < len(main["fills"])
    assert {o["reason"] for o in main["orders"]} >= {"duplicate_client_id", "fok_unfillable"}
    assert any(o["final"] for o in main["orders"]) and not all(o["final"] for o in main["orders"])


# -- the generator ----------------------------------------------------------------------------


def test_generator_reproduces_committed_vectors() -> None:
    """specs/make_vectors.py, run now, writes exactly the committed files (no drift, no
    randomness)."""
    rendered = generator().render()
    assert sorted(rendered) == sorted(p.name for p in VECTORS.glob("*.json"))
    for name, text in rendered.items():
        assert (VECTORS / name).read_text(encoding="utf-8") == text, name


# -- points (protocol version 2, specs/finality.md section 13) -----------------------------------

POINTS = load("points.json")


def test_points_every_delivery_order_writes_the_listed_point_state() -> None:
    """A replica given the ops (listed, reversed) compacts at the listed point and writes the
    listed point state byte for byte; the listed heartbeats attest it, a majority."""
    market = witnessed_market_of(POINTS["market"])
    expected = POINTS["expected"]
    raws = [h(entry["encoding"]) for entry in POINTS["ops"]]
    for order in (raws, raws[::-1]):
        replica = Replica(market, point_interval=POINTS["point_interval"])
        assert not replica.apply_many(order).invalid
        replica.compact()
        blob = replica.snapshot()
        assert blob.hex() == expected["point_state"]
        assert hashlib.sha256(blob).hexdigest() == expected["hash"]
        point = replica.point
        assert point is not None
        assert (point.n, point.chain.hex()) == (expected["n"], expected["chain"])
        assert [i.hex() for i in point.kept] == expected["kept"]
    beats = [h(entry["encoding"]) for entry in POINTS["attestations"]]
    for raw in beats:
        body = decode(raw).body
        assert (body.point, body.point_hash.hex()) == (expected["n"], expected["hash"])
    info = crdtbook.check_attested(market, h(expected["point_state"]), beats, [])
    assert info.hash.hex() == expected["hash"]
    with pytest.raises(crdtbook.SnapshotRefused):
        crdtbook.check_attested(market, h(expected["point_state"]), beats[:1], [])
