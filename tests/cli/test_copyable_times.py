"""Times people can read and programs can parse (issue #11): `orders` and `fills` show when this
node received each order or fill and, once final, the time its witnesses gave it, in ISO 8601
UTC; --json keeps both as epoch milliseconds (null when unknown or not final)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from crdtbook.cli.app import app

runner = CliRunner()

pytestmark = pytest.mark.timeout(30)

RECEIVED = 1_764_660_000_123
WITNESSED = 1_764_660_001_456


def run(*args: str) -> Result:
    return runner.invoke(app, list(args), env={"COLUMNS": "250"})


def test_fills_show_received_and_witnessed_times(fake_node: Any, samples: Any) -> None:
    fake_node.answers["fills"]["fills"] = [
        samples.fill(0, final=True, received_ms=RECEIVED, witnessed_ms=WITNESSED),
        samples.fill(1, final=False, received_ms=RECEIVED + 1, witnessed_ms=None),
    ]
    out = run("fills").stdout
    assert "witnessed (UTC)" in out
    assert "2025-12-02T07:20:00.123Z" in out and "2025-12-02T07:20:01.456Z" in out
    row = next(line for line in out.splitlines() if "07:20:00.124Z" in line)
    assert " - " in row  # the provisional fill has no witnessed time yet
    fills = json.loads(run("fills", "--json").stdout)["fills"]
    assert [(f["received_ms"], f["witnessed_ms"]) for f in fills] == [
        (RECEIVED, WITNESSED),
        (RECEIVED + 1, None),
    ]


def test_orders_show_witnessed_time_once_final(fake_node: Any, samples: Any) -> None:
    fake_node.answers["orders"]["orders"] = [
        samples.order(final=True, received_ms=RECEIVED, witnessed_ms=WITNESSED)
    ]
    out = run("orders").stdout
    assert "witnessed (UTC)" in out and "2025-12-02T07:20:01.456Z" in out
    assert json.loads(run("orders", "--json").stdout)["orders"][0]["witnessed_ms"] == WITNESSED


def test_no_witnessed_column_before_anything_is_final(fake_node: Any, samples: Any) -> None:
    fake_node.answers["orders"]["orders"] = [samples.order(received_ms=RECEIVED, witnessed_ms=None)]
    out = run("orders").stdout
    assert "received (UTC)" in out and "witnessed (UTC)" not in out


@pytest.mark.parametrize("width", [60, 80, 100, 120])
def test_narrow_terminal_keeps_what_matters_and_says_what_it_left_out(
    fake_node: Any, samples: Any, width: int
) -> None:
    """Squeezed to fit, the table cut sides and prices to ``s…`` and ``6…`` below ~160 columns
    while the full timestamps kept their width; now the times make way first, and a line says
    so."""
    fake_node.answers["orders"]["orders"] = [
        samples.order(final=True, received_ms=RECEIVED, witnessed_ms=WITNESSED)
    ]
    fake_node.answers["fills"]["fills"] = [
        samples.fill(0, final=True, received_ms=RECEIVED, witnessed_ms=WITNESSED)
    ]
    order, fill = samples.order(), samples.fill(0)
    for command, musts in (
        ("orders", [order["side"], order["quantity"], order["price"], order["remaining"]]),
        ("fills", [fill["taker_side"], fill["quantity"], fill["price"]]),
    ):
        result = runner.invoke(app, [command], env={"COLUMNS": str(width)})
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert max(len(line) for line in out.splitlines()) <= width
        if width < 100:  # the essentials fit whole at 80 columns, each in a cell of its own
            row = next(line for line in out.splitlines() if line.startswith("│"))
            cells = [cell.strip() for cell in row.strip("│").split("│")]
            for value in musts:
                assert value in cells, (command, value, cells)
        if width < 120:  # the fills table fits whole from 120 columns on
            assert "not shown at this width: received (UTC)" in out
            assert "2025-12-02T07:20:00.123Z" not in out


def test_wide_terminal_shows_every_column(fake_node: Any, samples: Any) -> None:
    fake_node.answers["orders"]["orders"] = [
        samples.order(final=True, received_ms=RECEIVED, witnessed_ms=WITNESSED, tag="grid-1")
    ]
    out = run("orders").stdout
    for header in ("tif", "tag", "filled", "received (UTC)", "witnessed (UTC)"):
        assert header in out
    assert "not shown" not in out
