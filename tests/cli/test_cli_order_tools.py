"""The command line's order tools (issue #11), against the fake node: client order ids and
self-trade modes on ``submit`` (and the orders it expired), ``cancel --client-id`` and
``cancel --all [--prefix]``, ``order --client-id``, ``markets``, ``orders --open --limit``,
``fills --mine``, and timestamps (ISO 8601 for people, epoch ms in JSON)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from crdtbook.cli import render
from crdtbook.cli.app import app

runner = CliRunner()

pytestmark = pytest.mark.timeout(30)


def run(*args: str, columns: int = 200) -> Result:
    return runner.invoke(app, list(args), env={"COLUMNS": str(columns)})


def test_submit_sends_client_id_and_stp(fake_node: Any, samples: Any) -> None:
    result = run("submit", "buy", "5@100", "--client-id", "grid-1", "--stp", "expire-both")
    assert result.exit_code == 0, result.output
    sent = fake_node.last("submit")
    assert sent["client_id"] == "grid-1" and sent["stp"] == "expire_both"
    run("submit", "buy", "5@100")
    assert "client_id" not in fake_node.last("submit") and "stp" not in fake_node.last("submit")
    bad = run("submit", "buy", "5@100", "--stp", "expire-nobody")
    assert bad.exit_code == 2


def test_submit_names_orders_expired_by_self_trade(fake_node: Any, samples: Any) -> None:
    # As the node sends it: an ended order's remaining is 0; what rested was quantity less
    # filled (the line said "0 @ 100 no longer rests").
    maker = samples.order(
        id=samples.B, side="sell", status="expired", reason="self_trade", filled="2", remaining="0"
    )
    fake_node.answers["submit"] = {
        "order": samples.order(status="open", filled="0", remaining="5"),
        "fills": [],
        "final": False,
        "self_trade_expired": [maker],
    }
    result = run("submit", "buy", "5@100")
    assert result.exit_code == 0, result.output
    assert "expired by self-trade prevention" in result.output and samples.B in result.output
    assert "(3 @ 100 no longer rests)" in result.output
    taker = samples.order(status="expired", reason="self_trade", filled="0")
    fake_node.answers["submit"] = {
        "order": taker,
        "fills": [],
        "final": False,
        "self_trade_expired": [taker],
    }
    result = run("submit", "buy", "5@100", "--stp", "expire-taker")
    assert "this order itself" in result.output
    as_json = json.loads(run("submit", "buy", "5@100", "--json").output)
    assert as_json["self_trade_expired"][0]["id"] == samples.A


def test_refusals_are_clear(fake_node: Any, samples: Any) -> None:
    fake_node.answers["submit"] = samples.ControlError(
        "duplicate_client_id", "client id 'x' is already used by this node's order in DEMO"
    )
    result = run("submit", "buy", "5@100", "--client-id", "x")
    assert result.exit_code == 1
    assert "already used" in result.output and "[duplicate_client_id]" in result.output


def test_cancel_by_client_id_and_all(fake_node: Any, samples: Any) -> None:
    result = run("cancel", "--client-id", "grid-1")
    assert result.exit_code == 0, result.output
    assert fake_node.last("cancel") == {"client_id": "grid-1"}
    run("cancel", "A1B2")
    assert fake_node.last("cancel") == {"order_id": "a1b2"}
    result = run("cancel", "--all", "--prefix", "grid-")
    assert result.exit_code == 0, result.output
    assert fake_node.last("cancel_all") == {"prefix": "grid-"}
    assert "cancelled 2 orders" in result.output and samples.C in result.output
    as_json = json.loads(run("cancel", "--all", "--json").output)
    assert as_json["cancelled"] == 2
    for args in ((), ("A1", "--client-id", "x"), ("A1", "--all"), ("A1", "--prefix", "p")):
        bad = run("cancel", *args)
        assert bad.exit_code == 2, (args, bad.output)


def test_order_by_client_id_with_times(fake_node: Any, samples: Any) -> None:
    fake_node.answers["order"] = samples.order(
        client_id="grid-1", tag="grid-1", received_ms=1_764_660_000_123, witnessed_ms=None
    )
    result = run("order", "--client-id", "grid-1")
    assert result.exit_code == 0, result.output
    assert fake_node.last("order") == {"client_id": "grid-1"}
    assert "2025-12-02T07:20:00.123Z" in result.output and "not final" in result.output
    assert run("order").exit_code == 2


def test_markets(fake_node: Any, samples: Any) -> None:
    result = run("markets")
    assert result.exit_code == 0, result.output
    assert "DEMO" in result.output and "yes" in result.output and "41" in result.output
    assert json.loads(run("markets", "--json").output)[0]["spec"] == samples.DEMO_SPEC
    fake_node.answers["markets"] = [
        {"name": "BTC-USD", "id": "00" * 32, "tick": "0.01", "lot": "0.0001",
         "witnessed": False, "witnesses": 0, "frontier": 0}
    ]  # fmt: skip
    assert "never final" in run("markets").output


def test_markets_on_a_narrow_terminal_keep_every_field_whole(fake_node: Any) -> None:
    """At 80 columns the table squeezed tick, lot, witnessed, witnesses and frontier to
    nothing beside the 64-digit ids; now each market is a block of lines, its id whole."""
    fake_node.answers["markets"] = [
        {"name": "BTC-USD", "id": "ab" * 32, "tick": "0.01", "lot": "0.0001",
         "witnessed": False, "witnesses": 0, "frontier": 0},
        {"name": "WX", "id": "cd" * 32, "tick": "0.5", "lot": "1",
         "witnessed": True, "witnesses": 3, "frontier": 41},
    ]  # fmt: skip
    result = runner.invoke(app, ["markets"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    out = result.stdout.splitlines()
    assert max(map(len, out)) <= 80
    assert out == [
        "BTC-USD  tick 0.01  lot 0.0001  witnessed no (never final)",
        f"  id {'ab' * 32}",
        "WX  tick 0.5  lot 1  witnessed yes (3 witnesses, frontier 41)",
        f"  id {'cd' * 32}",
    ]


def test_orders_open_limit_and_fills_mine(fake_node: Any, samples: Any) -> None:
    fake_node.answers["orders"]["orders"][0]["received_ms"] = 1_764_660_000_123
    result = run("orders", "--open", "--limit", "5")
    assert result.exit_code == 0, result.output
    assert fake_node.last("orders") == {"open": True, "limit": 5}
    assert "2025-12-02T07:20:00.123Z" in result.output
    run("orders")
    assert fake_node.last("orders") == {}
    fake_node.answers["fills"]["fills"] = [samples.fill(0, received_ms=1_764_660_000_123)]
    result = run("fills", "--mine")
    assert result.exit_code == 0, result.output
    assert fake_node.last("fills") == {"limit": 20, "mine": True}
    assert "2025-12-02T07:20:00.123Z" in result.output


def test_iso_ms() -> None:
    assert render.iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert render.iso_ms(None) == "-" and render.iso_ms(True) == "-"
    assert render.iso_ms(10**20) == "-"


def test_market_order(fake_node: Any, samples: Any) -> None:
    fake_node.answers["submit"] = {
        "order": samples.order(tif="ioc", price="102", quantity="3", filled="3"),
        "fills": [samples.fill(0, quantity="3")],
        "final": False,
        "self_trade_expired": [],
        "market_order": {"reference": "100", "limit": "102", "band_pct": "2"},
    }
    result = run("submit", "buy", "3", "--market-order", "--band", "2%")
    assert result.exit_code == 0, result.output
    sent = fake_node.last("submit")
    assert sent["market_order"] is True and sent["band"] == "2%" and sent["tif"] == "ioc"
    assert "price" not in sent
    assert "market order: best 100, band 2%, limit 102" in result.output
    fake_node.answers["submit"] = samples.ControlError(
        "empty_book", "no asks on DEMO: a market buy has no price to start from"
    )
    refused = run("submit", "buy", "3", "--market-order")
    assert refused.exit_code == 1 and "no asks" in refused.output
    for args in (
        ("3@100", "--market-order"),
        ("3", "100", "--market-order"),
        ("3@1", "--band", "2"),
    ):
        assert run("submit", "buy", *args).exit_code == 2, args
    assert run("submit", "buy", "3", "--market-order", "--tif", "fok").exit_code == 2


def amended(samples: Any) -> dict[str, Any]:
    """An amend answer: order A cancelled, B resting at 101 in its place."""
    return {
        "cancel_id": samples.C,
        "cancelled": samples.order(status="cancelled", reason="cancelled", filled="0"),
        "effective": True,
        "order": samples.order(id=samples.B, status="open", price="101", filled="0"),
        "fills": [],
        "final": False,
        "self_trade_expired": [],
    }


def test_amend(fake_node: Any, samples: Any) -> None:
    fake_node.answers["amend"] = amended(samples)
    result = run("amend", "A1A1", "--price", "101", "--quantity", "2")
    assert result.exit_code == 0, result.output
    assert fake_node.last("amend") == {"order_id": "a1a1", "price": "101", "quantity": "2"}
    assert samples.A in result.output and samples.B in result.output and samples.C in result.output
    run("amend", "--client-id", "g1", "--price", "1", "--new-client-id", "g2")
    assert fake_node.last("amend") == {"client_id": "g1", "price": "1", "new_client_id": "g2"}
    as_json = json.loads(run("amend", "A1", "--price", "5", "--json").output)
    assert as_json["cancel_id"] == samples.C and as_json["order"]["id"] == samples.B
    assert run("amend", "A1").exit_code == 2
    assert run("amend", "--price", "5").exit_code == 2


def test_amend_on_a_market_without_witnesses_says_never_final(fake_node: Any, samples: Any) -> None:
    """amend printed the witnessed-market text ("until the witnesses' heartbeats acknowledge
    it ... --wait-final") on a market where --wait-final is refused."""
    fake_node.answers["status"]["markets"][0]["witnessed"] = False
    fake_node.answers["amend"] = amended(samples)
    result = run("amend", "A1A1", "--price", "101")
    assert result.exit_code == 0, result.output
    assert "fills here are never final: DEMO has no witnesses" in result.output
    assert "heartbeats" not in result.output and "provisional:" not in result.output


# -- cancels are provisional until final (a user's review, session 17) -----------------------


def test_a_cancel_not_final_is_marked_provisional(fake_node: Any, samples: Any) -> None:
    """`cancel` printed "cancelled ... no longer rests" unmarked, and in a race the order ended
    filled (a taker of another node sorted before the cancel): like an order's outcome, a
    cancel's is provisional until final."""
    cancelled = samples.order(status="cancelled", reason="cancelled", filled="0", remaining="0")

    def answer(order: dict[str, Any], effective: bool) -> dict[str, Any]:
        return {"order": order, "cancel_id": samples.C, "effective": effective, "final": False}

    fake_node.answers["cancel"] = answer(cancelled, True)
    result = run("cancel", "A1")
    assert result.exit_code == 0, result.output
    assert "provisional: cancelled" in result.output
    assert "an order that sorts before the cancel can still fill this order" in result.output
    fake_node.answers["cancel"]["final"] = True
    result = run("cancel", "A1")
    assert "final: cancelled" in result.output and "sorts before" not in result.output
    # Finished but not final: a cancel is signed all the same, and may yet take effect.
    fake_node.answers["cancel"] = answer(samples.order(), False)
    result = run("cancel", "A1")
    assert "provisional: nothing to cancel" in result.output
    assert "it can rest again, and this cancel then takes it off the book" in result.output
    # Without witnesses: never final, said once, no "provisional" mark.
    fake_node.answers["status"]["markets"][0]["witnessed"] = False
    fake_node.answers["cancel"] = answer(cancelled, True)
    result = run("cancel", "A1")
    assert "fills here are never final: DEMO has no witnesses" in result.output
    assert "provisional:" not in result.output and "heartbeats" not in result.output
    # Cancelled already by this node: nothing signed, and not called final.
    fake_node.answers["cancel"] = {**answer(cancelled, False), "cancel_id": None}
    result = run("cancel", "A1")
    assert "no new cancel signed" in result.output
    assert "no cancel can change it" not in result.output  # (not called final)


def test_amend_and_cancel_all_mark_their_cancel(fake_node: Any, samples: Any) -> None:
    fake_node.answers["amend"] = {**amended(samples), "cancel_final": False}
    result = run("amend", "A1A1", "--price", "101")
    assert result.exit_code == 0, result.output
    assert "provisional: cancelled" in result.output
    assert "sorts before the cancel" in result.output
    fake_node.answers["cancel_all"] = {
        "market": "DEMO",
        "cancel_id": samples.C,
        "prefix": "grid-",
        "cancelled": 0,
        "final": False,
    }
    result = run("cancel", "--all", "--prefix", "grid-")
    assert "provisional: cancelled 0 orders" in result.output
    # Orders rested, none with the prefix: "none was resting" said otherwise.
    assert "(none resting had one)" in result.output and "none was resting" not in result.output
    assert "not final yet" in result.output


@pytest.mark.parametrize(
    ("args", "method", "said"),
    [
        (("cancel", "A1"), "cancel", "the cancel may have taken effect all the same"),
        (("cancel", "--all"), "cancel_all", "the cancel-all may have taken effect all the same"),
        (
            ("amend", "A1", "--price", "107"),
            "amend",
            "the cancel and the new order may have been placed all the same",
        ),
    ],
)
def test_ctrl_c_during_a_signing_call_says_it_may_stand(
    fake_node: Any, args: tuple[str, ...], method: str, said: str
) -> None:
    """Ctrl-C during cancel, amend or cancel --all exited 130 without a word, and the node
    carried it out (seen with a node paused, then resumed): a user who re-places an amended
    order by hand holds two. submit already said so."""
    fake_node.answers[method] = KeyboardInterrupt()
    result = run(*args)
    assert result.exit_code == 130
    assert f"error: interrupted before the node answered: {said}" in result.output
