"""Hostile command-line input: market definitions (``--market``, ``@FILE``, ``market new``) that
are garbage, huge, endless or almost right are refused at once with one line, never read without
bound and never turned into a market."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from crdtbook import Identity, Market
from crdtbook.cli.app import app
from crdtbook.cli.markets import MAX_MARKET_FILE_BYTES, DefinitionError, load_market

pytestmark = pytest.mark.timeout(30)

KEYS = [Identity.from_seed(bytes([i]) * 32).public_key.hex() for i in range(1, 13)]
GOOD = Market("DEMO", "1", "1", witnesses=tuple(KEYS[:3])).spec


@pytest.mark.parametrize(
    "value",
    [
        "",
        ":",
        "::::",
        "DEMO:1",
        "DEMO:0:1",
        "DEMO:-1:1",
        "DEMO:1:1e999999",
        "DEMO:1:" + "9" * 5000,
        "X" * 100 + ":1:1",
        "DE\x00MO:1:1",
        "DEMO:1:1:",
        "DEMO:1:1:zz",
        "DEMO:1:1:" + KEYS[0][:-1],
        "DEMO:1:1:" + ",".join([KEYS[0], KEYS[0]]),
        "DEMO:1:1:" + ",".join(KEYS[:11]),  # more witnesses than MAX_WITNESSES
        GOOD + ":extra",
        "\u202eDEMO:1:1",
    ],
)
def test_bad_definitions_are_refused_in_one_line(value: str) -> None:
    with pytest.raises(DefinitionError) as info:
        load_market(value)
    assert "\n" not in str(info.value)


def test_a_good_definition_still_loads() -> None:
    assert load_market(GOOD).spec == GOOD


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom", "dir", "fifo", "huge", "binary"])
def test_market_files_that_are_not_definitions(tmp_path: Path, target: str) -> None:
    """An endless device, a FIFO nobody writes to, a directory, a huge or binary file: refused
    within a second, reading at most MAX_MARKET_FILE_BYTES."""
    path = Path(target)
    if target == "dir":
        path = tmp_path
    elif target == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)  # opening it for reading would block for ever
    elif target == "huge":
        path = tmp_path / "huge.market"
        path.write_text(GOOD + "\n" + "#" * (MAX_MARKET_FILE_BYTES * 4))
    elif target == "binary":
        path = tmp_path / "bin.market"
        path.write_bytes(b"\xff\xfe" + os.urandom(100))
    started = time.monotonic()
    with pytest.raises(DefinitionError) as info:
        load_market(f"@{path}")
    assert time.monotonic() - started < 1.0
    assert "\n" not in str(info.value)


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=200)
    | st.lists(st.sampled_from([*KEYS[:4], "DEMO", "1", ":", ","])).map("".join)
)
def test_any_text_is_a_market_or_a_value_error(text: str) -> None:
    try:
        market = Market.parse(text)
    except ValueError:
        return
    assert Market.parse(market.spec) == market


@pytest.mark.parametrize(
    "args",
    [
        ["market", "new", "DEMO", "1", "1", "--witness", "zz"],
        ["market", "new", "DEMO", "1", "1", *[a for k in KEYS[:11] for a in ("-w", k)]],
        ["market", "new", "D" * 500, "1", "1", "-w", KEYS[0]],
        ["market", "new", "DEMO", "0", "1", "-w", KEYS[0]],
        ["market", "new", "DEMO", "1", "1", "-w", KEYS[0], "--witness-home", "/nonexistent"],
    ],
)
def test_market_new_refuses_hostile_arguments(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1, result.output


@pytest.mark.parametrize(
    "value", ["1e-99999999", "1e99999999", "1e999999", "9" * 5000, "nan", "-0"]
)
def test_prices_and_quantities_out_of_any_range_are_refused(value: str) -> None:
    market = Market.parse("DEMO:0.01:0.0001")
    with pytest.raises(ValueError):
        market.price_to_ticks(value)
    with pytest.raises(ValueError):
        market.qty_to_lots(value)
