"""Markets: exact conversion of human prices/quantities to ticks/lots, helpful OffTick/OffLot
messages, and a market id that depends on the whole definition (name, tick and lot)."""

from __future__ import annotations

import hashlib
import re
from decimal import Decimal

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples

from crdtbook import DEFAULT_MARKETS, Identity, Market, OffLot, OffTick

MAX_INT = 2**63 - 1
STEPS = ("1", "5", "0.5", "0.25", "0.01", "0.001", "0.0001", "0.005", "100", "0.00000001")

steps = st.sampled_from(STEPS).map(Decimal)
units = st.integers(1, 10**12) | st.integers(1, MAX_INT) | st.sampled_from((1, 2, 10, MAX_INT))


def spellings(value: Decimal) -> st.SearchStrategy[object]:
    """Ways a caller may write the same amount."""
    plain = format(value, "f")
    options: list[object] = [plain, f"  {plain} ", value, plain + "000" if "." in plain else plain]
    if "." not in plain:
        options += [plain + ".0", int(plain)]
    options.append(format(value.normalize(), "E"))
    return st.sampled_from(options)


NEAREST = re.compile(r"nearest valid: ([0-9.]+)(?: or ([0-9.]+))?$")


def named_nearest(message: str) -> list[Decimal]:
    match = NEAREST.search(message)
    assert match, message
    return [Decimal(x) for x in match.groups() if x is not None]


# -- exact conversion ---------------------------------------------------------------------------


@settings(max_examples=examples(3))
@given(tick=steps, lot=steps, n=units, data=st.data())
def test_on_tick_and_on_lot_values_convert_exactly(tick, lot, n, data):
    market = Market("M", tick, lot)
    price = data.draw(spellings(n * tick))
    quantity = data.draw(spellings(n * lot))
    assert market.price_to_ticks(price) == n
    assert market.qty_to_lots(quantity) == n
    # And back: the printed value has the step's decimals and converts to the same integer.
    assert Decimal(market.ticks_to_price(n)) == n * tick
    assert market.price_to_ticks(market.ticks_to_price(n)) == n
    assert market.qty_to_lots(market.lots_to_qty(n)) == n


@settings(max_examples=examples(3))
@given(tick=steps, n=st.integers(0, 10**9), frac=st.integers(1, 999))
def test_off_tick_names_the_nearest_prices(tick, n, frac):
    market = Market("M", tick, "1")
    price = n * tick + tick * Decimal(frac) / 1000
    with pytest.raises(OffTick) as info:
        market.price_to_ticks(format(price, "f"))
    nearest = named_nearest(str(info.value))
    expected = [n * tick, (n + 1) * tick] if n else [tick]
    assert nearest == expected
    assert all(v % tick == 0 and v > 0 for v in nearest)
    assert f"tick {format(tick.normalize(), 'f')}" in str(info.value)


@settings(max_examples=examples(3))
@given(lot=steps, n=st.integers(0, 10**9), frac=st.integers(1, 999))
def test_off_lot_names_the_nearest_quantities(lot, n, frac):
    market = Market("M", "1", lot)
    quantity = n * lot + lot * Decimal(frac) / 1000
    with pytest.raises(OffLot) as info:
        market.qty_to_lots(format(quantity, "f"))
    assert named_nearest(str(info.value)) == ([n * lot, (n + 1) * lot] if n else [lot])


def test_off_tick_and_off_lot_examples():
    btc = DEFAULT_MARKETS["BTC-USD"]  # tick 0.01, lot 0.0001
    with pytest.raises(OffTick, match=r"nearest valid: 100\.12 or 100\.13$"):
        btc.price_to_ticks("100.125")
    with pytest.raises(OffTick, match=r"nearest valid: 0\.01$"):
        btc.price_to_ticks("0.001")
    with pytest.raises(OffLot, match=r"nearest valid: 1\.2345 or 1\.2346$"):
        btc.qty_to_lots("1.23456")
    assert btc.price_to_ticks("100.12") == 10012
    assert btc.qty_to_lots("0.0001") == 1
    assert btc.ticks_to_price(10000) == "100.00"
    assert btc.lots_to_qty(12345) == "1.2345"
    assert issubclass(OffTick, ValueError) and issubclass(OffLot, ValueError)


@pytest.mark.parametrize(
    "value",
    [
        "0",
        "-1",
        "-0.01",
        "0.00",
        "abc",
        "",
        "NaN",
        "sNaN",
        "Infinity",
        "-inf",
        "1/2",
        True,
        False,
        None,
        [1],
    ],
)
def test_not_positive_or_not_a_number_is_refused(value):
    market = DEFAULT_MARKETS["BTC-USD"]
    with pytest.raises(OffTick):
        market.price_to_ticks(value)
    with pytest.raises(OffLot):
        market.qty_to_lots(value)


def test_largest_amount_and_one_more():
    market = Market("M", "0.01", "0.0001")
    assert market.price_to_ticks(Decimal(MAX_INT) * Decimal("0.01")) == MAX_INT
    assert market.qty_to_lots(format(Decimal(MAX_INT) * Decimal("0.0001"), "f")) == MAX_INT
    with pytest.raises(OffTick, match="too large"):
        market.price_to_ticks(Decimal(MAX_INT + 1) * Decimal("0.01"))
    with pytest.raises(OffLot, match="too large"):
        market.qty_to_lots(Decimal(MAX_INT + 1) * Decimal("0.0001"))


@pytest.mark.parametrize("value", ["1e40", "123456789012345678901234567890", "1e30"])
def test_absurdly_large_amounts_raise_off_tick_not_a_decimal_error(value):
    """Beyond 28 significant digits of quotient, Decimal's divmod raises DivisionImpossible
    (decimal.InvalidOperation, not a ValueError); the conversion must still answer OffTick."""
    market = Market("M", "0.01", "0.0001")
    with pytest.raises(OffTick):
        market.price_to_ticks(value)
    with pytest.raises(OffLot):
        market.qty_to_lots(value)


def test_long_exact_decimals_are_exact():
    market = Market("M", "0.00000001", "1")
    assert market.price_to_ticks("12345678901.23456789") == 1234567890123456789
    with pytest.raises(OffTick):
        market.price_to_ticks("12345678901.234567891")
    with pytest.raises(OffTick):
        market.price_to_ticks("1.0000000000000000000000000000000001")


# -- market identity ----------------------------------------------------------------------------


def test_market_id_depends_on_name_tick_and_lot():
    base = Market("BTC-USD", "0.01", "0.0001")
    others = [
        Market("BTC-USD", "0.1", "0.0001"),
        Market("BTC-USD", "0.01", "0.001"),
        Market("BTC-USDT", "0.01", "0.0001"),
        Market("BTC-USD", "0.0001", "0.01"),  # tick and lot swapped
    ]
    assert len({base.id, *(m.id for m in others)}) == 1 + len(others)
    for other in others:
        assert other != base
    assert base == DEFAULT_MARKETS["BTC-USD"]


@pytest.mark.parametrize(
    ("tick", "lot"),
    [("0.010", "0.00010"), (Decimal("1E-2"), Decimal("0.0001")), (" 0.01 ", "1e-4")],
)
def test_market_id_does_not_depend_on_spelling(tick, lot):
    market = Market("BTC-USD", tick, lot)
    assert market.id == DEFAULT_MARKETS["BTC-USD"].id
    assert (market.tick, market.lot) == ("0.01", "0.0001")
    assert hash(market) == hash(DEFAULT_MARKETS["BTC-USD"])


def test_market_id_vector():
    """The id is SHA-256 of canonical CBOR ["crdtbook/market/v1", name, tick, lot]."""
    for market in DEFAULT_MARKETS.values():
        definition = ["crdtbook/market/v1", market.name, market.tick, market.lot]
        assert market.id == hashlib.sha256(cbor2.dumps(definition, canonical=True)).digest()
    assert Market("DEMO", "1E+2", "10").tick == "100"


def test_parse_and_spec():
    assert Market.parse("DEMO") is DEFAULT_MARKETS["DEMO"]
    market = Market.parse("XYZ-ABC:0.5:0.010")
    assert (market.name, market.tick, market.lot) == ("XYZ-ABC", "0.5", "0.01")
    assert market.spec == "XYZ-ABC:0.5:0.01"
    assert Market.parse(market.spec) == market
    for text in ("NOPE", "A:1", "A:1:1:1"):
        with pytest.raises(ValueError):
            Market.parse(text)


@pytest.mark.parametrize(
    ("name", "tick", "lot"),
    [
        ("", "1", "1"),
        ("x" * 33, "1", "1"),
        ("A B", "1", "1"),
        ("A/B", "1", "1"),
        ("A:B", "1", "1"),
        ("A\nB", "1", "1"),
        ("A\x00", "1", "1"),
        ("A", "0", "1"),
        ("A", "1", "-1"),
        ("A", "x", "1"),
        ("A", "1", "inf"),
        ("A", "nan", "1"),
    ],
)
def test_bad_market_definitions_are_refused(name, tick, lot):
    with pytest.raises(ValueError):
        Market(name, tick, lot)


def test_markets_are_immutable():
    market = DEFAULT_MARKETS["DEMO"]
    with pytest.raises(AttributeError):
        market.tick = "2"  # type: ignore[misc]


def test_a_witness_must_be_a_key_that_can_sign() -> None:
    """All-zero bytes, or any 32 bytes that are no point of the curve, could never heartbeat:
    such a market's finality would stall for ever, so its definition is refused."""
    good = Identity.from_seed(b"w" * 32).public_key
    for bad in (bytes(32), bytes([1]) + bytes(31), b"\xff" * 32):
        with pytest.raises(ValueError, match="not a valid ed25519 public key"):
            Market("X", "1", "1", witnesses=[good, bad])
    assert Market("X", "1", "1", witnesses=[good]).witnesses == (good,)


@pytest.mark.parametrize("value", ["1_000", "1_0", "1_0.5", "１００", "1 0", "1e1_0", "0x10"])
def test_no_separators_or_other_scripts_digits(value):
    """Decimal itself reads the first four ("1_0" as 10, full-width digits as ASCII): for an
    order's price or size each is far more likely a typo than a meaning."""
    market = DEFAULT_MARKETS["BTC-USD"]
    with pytest.raises(OffTick, match="not a decimal number in ASCII digits"):
        market.price_to_ticks(value)
    with pytest.raises(OffLot, match="not a decimal number in ASCII digits"):
        market.qty_to_lots(value)
    # What programs print stays readable: spaces around, a sign, an exponent, a bare point.
    for spelling in (" 100.50 ", "+100.5", "1.005E+2", "100.50", "100.5e0"):
        assert market.price_to_ticks(spelling) == 10050
    assert market.price_to_ticks(".5") == 50 and market.price_to_ticks("1.") == 100


@pytest.mark.parametrize("spec", ["X:1_0:1", "X:1:0_1", "X:１:1", "X:0.0_1:1"])
def test_a_definitions_tick_and_lot_take_no_separators_either(spec):
    with pytest.raises(ValueError, match="not a decimal number in ASCII digits"):
        Market.parse(spec)
    assert Market.parse("X:1E-2:1").tick == "0.01"  # as programs print it: the same market
