"""The command line's side of fill finality (issue #8), against the fake node.

``market new`` and ``--market @FILE``, the witness key in ``id``, final/provisional marks in
``submit``, ``book``, ``fills``, ``orders``, ``order`` and ``status``, ``submit --wait-final``,
``reconfig approve`` / ``reconfig submit``, and a market without witnesses said plainly.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from crdtbook import Identity, Market
from crdtbook.cli import render
from crdtbook.cli.app import app

runner = CliRunner()

pytestmark = pytest.mark.timeout(30)


def valid_key(byte: int) -> str:
    """A real ed25519 public key (hex) from a fixed seed: a witness must be one."""
    return Identity.from_seed(bytes([byte]) * 32).public_key.hex()


def run(*args: str, columns: int = 160) -> Result:
    """Invoke the CLI in-process."""
    return runner.invoke(app, list(args), env={"COLUMNS": str(columns)})


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def node_home(tmp_path: Path, name: str, seed: bytes) -> tuple[Path, str]:
    """A node home holding an identity file; returns it and its witness key."""
    home = tmp_path / name
    home.mkdir()
    (home / "identity.key").write_bytes(seed)
    return home, Identity.from_seed(seed).public_key.hex()


def unwitnessed(samples: Any, fake_node: Any, name: str = "BTC-USD") -> None:
    """Make the fake node follow one market without witnesses."""
    status = fake_node.answers["status"]
    status["markets"][0].update(
        name=name,
        witnessed=False,
        finality="none",
        frontier=0,
        final_ops=0,
        final_fills=0,
        stalled_on=[],
        witnesses=[],
    )


# ------------------------------------------------------------------------------- market new


def test_market_new_prints_the_spec(tmp_path: Path) -> None:
    k1, k2 = valid_key(0x11), valid_key(0x22)
    res = run("market", "new", "BTC-EUR", "0.010", "0.0001", "--witness", k2, "-w", k1)
    assert res.exit_code == 0, res.output
    spec = Market("BTC-EUR", "0.01", "0.0001", witnesses=[k1, k2]).spec
    assert res.stdout == spec + "\n"
    keys = tuple(sorted((bytes.fromhex(k1), bytes.fromhex(k2))))
    assert Market.parse(res.stdout.strip()).witnesses == keys


def test_market_new_from_node_homes(tmp_path: Path) -> None:
    h1, key1 = node_home(tmp_path, "n1", b"\x01" * 32)
    h2, key2 = node_home(tmp_path, "n2", b"\x02" * 32)
    out = tmp_path / "x.market"
    res = run(
        "market", "new", "X", "1", "1", "--witness-home", str(h1), "--witness", str(h2),
        "--out", str(out),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    spec = Market("X", "1", "1", witnesses=[key1, key2]).spec
    assert res.stdout == spec + "\n"
    assert out.read_text() == spec + "\n"
    assert f"--market @{out}" in res.stderr


def test_market_new_json(tmp_path: Path) -> None:
    key = valid_key(0x33)
    res = run("market", "new", "X", "0.5", "2", "-w", key, "--json")
    assert res.exit_code == 0, res.output
    market = Market("X", "0.5", "2", witnesses=[key])
    assert json.loads(res.stdout) == {
        "name": "X",
        "tick": "0.5",
        "lot": "2",
        "id": market.id.hex(),
        "version": 2,
        "witnesses": [key],
        "spec": market.spec,
        "file": None,
    }


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["X", "1", "1"], "name at least one witness"),
        (["X", "1", "1", "-w", "abc"], "neither a 64-hex public key nor a node home"),
        (["X", "1", "1", "-w", valid_key(0x11), "-w", valid_key(0x11)], "named twice"),
        (["X", "0", "1", "-w", valid_key(0x11)], "tick must be a positive decimal"),
        (["X:Y", "1", "1", "-w", valid_key(0x11)], "may not contain"),
        (["X", "1", "1", "--witness-home", "/nonexistent-home"], "identity.key does not exist"),
    ],
)
def test_market_new_errors_are_one_line(args: list[str], text: str) -> None:
    res = run("market", "new", *args)
    assert res.exit_code == 2
    assert res.stdout == ""
    err = lines(res.stderr)
    assert len(err) == 1 and err[0].startswith("error: ") and text in err[0], err


def test_market_new_empty_home(tmp_path: Path) -> None:
    res = run("market", "new", "X", "1", "1", "--witness", str(tmp_path))
    assert res.exit_code == 2
    assert "crdtbook id --init --home" in res.stderr


# ------------------------------------------------------------------------------ --market @FILE


def fake_node_app(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace crdtbook.node.app with a recorder of the NodeConfig it is given."""
    seen: dict[str, Any] = {}

    class NodeConfig:
        def __init__(self, **kw: Any) -> None:
            self.__dict__.update(kw)

    def run_node(config: NodeConfig) -> int:
        seen["config"] = config
        return 0

    fake = types.ModuleType("crdtbook.node.app")
    fake.NodeConfig = NodeConfig  # type: ignore[attr-defined]
    fake.run_node = run_node  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "crdtbook.node.app", fake)
    return seen


def test_node_market_from_file(
    monkeypatch: pytest.MonkeyPatch, fake_node: Any, samples: Any, tmp_path: Path
) -> None:
    seen = fake_node_app(monkeypatch)
    path = tmp_path / "demo.market"
    path.write_text(f"# written by crdtbook market new\n\n{samples.DEMO_SPEC}\n")
    res = run("node", "--home", str(tmp_path), "--market", f"@{path}", "--market", "BTC-USD")
    assert res.exit_code == 0, res.output
    assert seen["config"].markets == [samples.DEMO_SPEC, "BTC-USD"]


def test_node_heartbeat_interval(monkeypatch: pytest.MonkeyPatch, fake_node: Any) -> None:
    seen = fake_node_app(monkeypatch)
    assert run("node", "--home", "/h", "--heartbeat-interval", "0.1").exit_code == 0
    assert seen["config"].heartbeat_interval == 0.1
    assert run("node", "--home", "/h").exit_code == 0
    assert not hasattr(seen["config"], "heartbeat_interval")  # the node's default applies


@pytest.mark.parametrize(
    ("content", "text"),
    [(None, "does not exist"), ("", "holds no market definition"), ("A:1:1\nB:1:1\n", "2 lines")],
)
def test_node_market_file_errors(
    monkeypatch: pytest.MonkeyPatch, fake_node: Any, tmp_path: Path, content: str | None, text: str
) -> None:
    seen = fake_node_app(monkeypatch)
    path = tmp_path / "m.market"
    if content is not None:
        path.write_text(content)
    res = run("node", "--home", str(tmp_path), "--market", f"@{path}")
    assert res.exit_code == 2
    assert "config" not in seen
    err = lines(res.stderr)
    assert len(err) == 1 and text in err[0]


def test_client_market_from_file(fake_node: Any, samples: Any, tmp_path: Path) -> None:
    path = tmp_path / "demo.market"
    path.write_text(samples.DEMO_SPEC + "\n")
    res = run("book", "--market", f"@{path}")
    assert res.exit_code == 0, res.output
    assert fake_node.last("book") == {"market": "DEMO", "depth": 10}
    assert "markets" in [m for m, _ in fake_node.calls]  # the definition was checked
    res = run("fills", "--market", samples.DEMO_SPEC)  # the definition inline works too
    assert res.exit_code == 0, res.output
    assert fake_node.last("fills") == {"market": "DEMO", "limit": 20}
    res = run("submit", "buy", "5@100", "--market", f"@{path}")
    assert res.exit_code == 0, res.output
    assert fake_node.last("submit")["market"] == "DEMO"


def test_client_market_definition_mismatch(fake_node: Any, samples: Any, tmp_path: Path) -> None:
    path = tmp_path / "other.market"
    path.write_text(Market("DEMO", "1", "1", witnesses=[valid_key(0x77)]).spec)
    res = run("book", "--market", f"@{path}")
    assert res.exit_code == 1
    err = lines(res.stderr)
    assert len(err) == 1
    assert "follows a market named DEMO with another definition" in err[0]
    assert "book" not in [m for m, _ in fake_node.calls]


def test_client_market_file_missing(fake_node: Any, tmp_path: Path) -> None:
    res = run("orders", "--market", f"@{tmp_path / 'nope'}")
    assert res.exit_code == 2
    assert lines(res.stderr) == [f"error: market file {tmp_path / 'nope'} does not exist"]


# ----------------------------------------------------------------------------------------- id


def test_id_shows_the_witness_key_whole(fake_node: Any, samples: Any) -> None:
    res = run("id", columns=40)
    assert res.exit_code == 0, res.output
    assert f"witness key {samples.ME}" in res.stdout.splitlines()


def test_id_key_from_the_home_of_an_older_node(
    fake_node: Any, samples: Any, tmp_path: Path
) -> None:
    fake_node.answers["id"] = samples.ControlError("unknown_method", "unknown method 'id'")
    res = run("id", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["public_key"] == samples.ME  # from status
    assert [m for m, _ in fake_node.calls] == ["id", "status"]
    del fake_node.answers["status"]["author"]
    home, key = node_home(tmp_path, "n", b"\x05" * 32)
    res = run("--home", str(home), "id", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["public_key"] == key  # from the home's identity file


# ------------------------------------------------------------------------------------- submit


def test_submit_marks_provisional(fake_node: Any) -> None:
    res = run("submit", "buy", "5@100")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "provisional: filled: bought 5 in 1 fill" in out
    assert "#0  provisional" in out
    assert "not final yet" in out and "--wait-final" in out


def test_submit_wait_final(fake_node: Any, samples: Any) -> None:
    fake_node.answers["submit"] = {
        "order": samples.order(quantity="3", filled="3", final=True),
        "fills": [samples.fill(4, quantity="3", final=True)],
        "final": True,
    }
    res = run("submit", "buy", "3@101", "--wait-final", "--timeout", "5")
    assert res.exit_code == 0, res.output
    params = fake_node.last("submit")
    assert params["wait_final"] is True and params["timeout"] == 5.0
    assert fake_node.timeouts[-1] is not None and fake_node.timeouts[-1] > 5.0
    out = res.stdout
    assert "final: filled: bought 3 in 1 fill" in out
    assert "#4  final" in out
    assert "not final yet" not in out


def test_ctrl_c_while_waiting_says_the_order_may_stand(fake_node: Any) -> None:
    """Ctrl-C during --wait-final exited 130 without a word, though the order was sent (and
    likely signed): a user who submits again places a second order."""
    fake_node.answers["submit"] = KeyboardInterrupt()
    res = run("submit", "buy", "3@101", "--wait-final")
    assert res.exit_code == 130
    assert lines(res.stderr) == [
        "error: interrupted before the node answered: the order may have been placed all the "
        "same; `crdtbook orders` shows whether it was"
    ]


def test_submit_wait_final_on_an_order_left_resting_is_not_called_final(
    fake_node: Any, samples: Any
) -> None:
    """`final` there is the order op's: its place and what it took. Printed as "final:
    resting", the order then filled, which the spec says a final order never does."""
    fake_node.answers["submit"] = {
        "order": samples.order(status="open", filled="0", remaining="5", final=False),
        "fills": [],
        "final": True,
    }
    out = run("submit", "buy", "5@100", "--wait-final").stdout
    assert "placed for good, still live: resting: 5 @ 100 is on the book" in out
    assert "final: resting" not in out
    assert "can still be filled or cancelled" in out


def test_submit_wait_final_default_timeout(fake_node: Any) -> None:
    assert run("submit", "buy", "3@101", "--wait-final").exit_code == 0
    assert fake_node.last("submit")["timeout"] == 30.0
    run("submit", "buy", "3@101")
    assert "wait_final" not in fake_node.last("submit")
    assert "timeout" not in fake_node.last("submit")
    # --timeout alone was ignored without a word (as --band alone is not)
    calls = len(fake_node.calls)
    res = run("submit", "buy", "3@101", "--timeout", "5")
    assert res.exit_code == 2 and "--timeout goes with --wait-final" in res.stderr
    assert len(fake_node.calls) == calls  # nothing was sent


def test_submit_wait_final_timeout_is_one_line(fake_node: Any, samples: Any) -> None:
    msg = f"order {samples.A[:12]} is not final after 5 s: waiting on witness {samples.THIRD[:12]}"
    fake_node.answers["submit"] = samples.ControlError("timeout", msg)
    res = run("submit", "buy", "3@101", "--wait-final", "--timeout", "5")
    assert res.exit_code == 3  # placed, not final in time: not 1 (refused, nothing placed)
    assert res.stdout == ""  # (a node that sends no result with its error: only the line)
    err = lines(res.stderr)
    assert len(err) == 1
    assert err[0].startswith(f"error: {msg}; the order was placed")
    assert err[0].endswith(" [timeout]")  # the code ends the line, as every error's does


def test_submit_wait_final_timeout_prints_the_order_it_placed(
    fake_node: Any, samples: Any
) -> None:
    """The timeout exited 1 with nothing on stdout: the order's id was only inside the error
    line, and a script that retries on failure placed the order twice. Now the provisional
    result goes to stdout as without --wait-final, and the exit code is 3."""
    placed = {
        "order": samples.order(status="open", filled="0", remaining="3", final=False),
        "fills": [],
        "final": False,
        "self_trade_expired": [],
    }
    msg = f"order {samples.A} was submitted and stands, but is not final after 5 s"
    fake_node.answers["submit"] = samples.ControlError("timeout", msg, placed)
    res = run("submit", "buy", "3@101", "--wait-final", "--timeout", "5", "--json")
    assert res.exit_code == 3
    assert json.loads(res.stdout) == placed
    assert lines(res.stderr)[0].startswith(f"error: {msg}; the order was placed")
    res = run("submit", "buy", "3@101", "--wait-final", "--timeout", "5")
    assert res.exit_code == 3
    assert samples.A in res.stdout and "provisional: resting" in res.stdout


def test_submit_json_carries_final(fake_node: Any) -> None:
    res = run("submit", "buy", "5@100", "--json", "--wait-final")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == fake_node.answers["submit"]


def test_submit_never_final_market(fake_node: Any, samples: Any) -> None:
    unwitnessed(samples, fake_node)
    res = run("submit", "buy", "5@100")
    assert res.exit_code == 0, res.output
    assert "fills here are never final: DEMO has no witnesses" in res.stdout
    assert "not final yet" not in res.stdout and "provisional" not in res.stdout
    assert "filled: bought 5 in 1 fill" in res.stdout
    res = run("submit", "buy", "5@100", "--wait-final")
    assert res.exit_code == 1
    err = lines(res.stderr)
    assert len(err) == 1
    assert "fills here are never final: BTC-USD has no witnesses" in err[0]
    assert "wait_final" not in fake_node.last("submit")  # nothing was submitted that time


# --------------------------------------------------------------------------------------- book


def ladder_rows(out: str) -> dict[str, list[str]]:
    return {
        row[1]: row[2:]
        for row in (ln.split() for ln in lines(out))
        if len(row) >= 4 and row[1].isdigit()
    }


def test_book_marks_levels_and_frontier(fake_node: Any) -> None:
    res = run("book")
    assert res.exit_code == 0, res.output
    rows = ladder_rows(res.stdout)
    assert rows["106"][2] == "final" and rows["105"][2] == "final"
    assert rows["95"][2] == "provisional" and rows["94"][2] == "final"
    assert "frontier 41: 3 of 4 levels final" in res.stdout


def test_book_frontier_zero(fake_node: Any) -> None:
    book = fake_node.answers["book"]
    book["frontier"] = 0
    for lv in book["bids"] + book["asks"]:
        lv["final"] = False
    res = run("book")
    assert "frontier 0: nothing is final yet" in res.stdout
    assert all(r[2] == "provisional" for r in ladder_rows(res.stdout).values())


def test_book_never_final(fake_node: Any) -> None:
    book = fake_node.answers["book"]
    book.update(market="BTC-USD", witnessed=False, frontier=0)
    for lv in book["bids"] + book["asks"]:
        lv["final"] = False
    res = run("book")
    assert res.exit_code == 0, res.output
    assert res.stdout.count("fills here are never final: BTC-USD has no witnesses") == 1
    assert "provisional" not in res.stdout  # no column of marks that can never change


def test_book_json_unchanged(fake_node: Any, samples: Any) -> None:
    assert json.loads(run("book", "--json").stdout) == samples.BOOK


def test_track_fills_revokes_and_finalises(samples: Any) -> None:
    recent: list[dict[str, Any]] = []
    note = render.track_fills(recent, {"fills": [samples.fill(0), samples.fill(1)]})
    assert note == "" and [f["index"] for f in recent] == [0, 1]
    event = {
        "fills": [samples.fill(1, price="99")],
        "revoked": [samples.fill(1)],
        "became_final": [0, 1],
    }
    note = render.track_fills(recent, event)
    assert [(f["index"], f["price"], f["final"]) for f in recent] == [
        (0, "100", True),
        (1, "99", True),
    ]
    assert note.startswith("1 provisional fill revoked (#1)")
    for i in range(2, 9):
        render.track_fills(recent, {"fills": [samples.fill(i)]})
    assert [f["index"] for f in recent] == [4, 5, 6, 7, 8]


def test_book_watch_shows_revoked_and_final(fake_node: Any, samples: Any) -> None:
    fake_node.events = [
        {"event": "update", "market": "DEMO", "fills": [samples.fill(0), samples.fill(1)]},
        {
            "event": "update",
            "market": "DEMO",
            "fills": [],
            "revoked": [samples.fill(1)],
            "became_final": [0],
            "final_fill_count": 1,
        },
    ]
    fake_node.watch_error = KeyboardInterrupt()
    res = run("book", "--watch")
    assert res.exit_code == 0, res.output
    assert "1 provisional fill revoked (#1)" in res.stdout
    assert "buy 5 @ 100  final" in res.stdout


# -------------------------------------------------------------------------- fills and orders


def test_fills_column_and_caption(fake_node: Any) -> None:
    res = run("fills")
    assert res.exit_code == 0, res.output
    rows = [ln for ln in lines(res.stdout) if "a1a1a1a1a1a1" in ln]
    assert "final" in rows[0] and "provisional" not in rows[0]
    assert "provisional" in rows[1]
    assert "fill #0 is final; later fills are provisional" in res.stdout


def test_fills_never_final(fake_node: Any) -> None:
    data = fake_node.answers["fills"]
    data.update(market="BTC-USD", witnessed=False, final_count=0)
    res = run("fills")
    assert res.stdout.count("fills here are never final: BTC-USD has no witnesses") == 1
    assert "provisional" not in res.stdout
    data["fills"] = []
    res = run("fills")
    assert "no fills yet on BTC-USD" in res.stdout
    assert "fills here are never final: BTC-USD has no witnesses" in res.stdout


def test_fills_json_unchanged(fake_node: Any) -> None:
    assert json.loads(run("fills", "--json").stdout) == fake_node.answers["fills"]


def test_orders_marked(fake_node: Any, samples: Any) -> None:
    res = run("orders")
    assert res.exit_code == 0, res.output
    row_a = next(ln for ln in lines(res.stdout) if samples.A[:12] in ln)
    row_b = next(ln for ln in lines(res.stdout) if samples.B[:12] in ln)
    assert row_a.rstrip(" │").endswith("final")
    assert row_b.rstrip(" │").endswith("provisional")
    assert json.loads(run("orders", "--json").stdout) == fake_node.answers["orders"]


def test_orders_never_final(fake_node: Any, samples: Any) -> None:
    unwitnessed(samples, fake_node, name="DEMO")
    res = run("orders")
    assert res.stdout.count("fills here are never final: DEMO has no witnesses") == 1
    assert "provisional" not in res.stdout


def test_order_finality_row(fake_node: Any, samples: Any) -> None:
    assert "provisional: an order that sorts earlier" in run("order", "a1").stdout
    fake_node.answers["order"] = samples.order(final=True)
    assert "final: this state can never change again" in run("order", "a1").stdout
    fake_node.answers["order"] = samples.order(status="open", final=False)
    assert "provisional: the order is still live" in run("order", "a1").stdout
    unwitnessed(samples, fake_node, name="DEMO")
    assert "fills here are never final: DEMO has no witnesses" in run("order", "a1").stdout


# ------------------------------------------------------------------------------------- status


def test_status_finality(fake_node: Any, samples: Any) -> None:
    res = run("status", columns=80)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "DEMO finality: stalled" in out
    assert "frontier 41, epoch 0, 7 of 9 ops final, 1 of 2 fills final" in out
    for key in samples.WITNESSES:  # every witness key whole, on a line of its own
        assert key in [ln.strip() for ln in out.splitlines()]
    assert "STALLED: finality has waited for 1m 15s for its heartbeat" in out
    assert "this node" in out
    assert "crdtbook reconfig approve" in " ".join(out.split())  # (the hint may wrap)


def test_status_says_how_long_finality_waited_not_how_long_ago_the_last_heartbeat_was(
    fake_node: Any, samples: Any
) -> None:
    """A witness idle for 25 s, blocked 4 s after finality began waiting for it, read
    "STALLED: silent for 25s"; and a forked witness that heartbeats was called silent."""
    market = fake_node.answers["status"]["markets"][0]
    stalled = market["stalled_on"][0]
    for w in market["witnesses"]:
        if w["key"] == stalled:
            w.update(silent_s=25.0, waited_s=4.0)
    out = " ".join(run("status", columns=200).stdout.split())
    # (It read "silent for 4.0s" there and "silent 25s" in the hint below: a user's review.)
    assert "STALLED: finality has waited for 4.0s for its heartbeat" in out
    assert "last new one 25s ago" in out and "(silent 25s)" in out
    for w in market["witnesses"]:
        if w["key"] == stalled:
            w.update(forked=True)
    out = " ".join(run("status", columns=200).stdout.split())
    assert "STALLED: finality has waited for 4.0s; its heartbeats no longer count" in out


def test_status_pending_and_final(fake_node: Any) -> None:
    m = fake_node.answers["status"]["markets"][0]
    m.update(finality="pending", stalled_on=[])
    out = run("status").stdout
    assert "DEMO finality: pending (waiting on heartbeats that are due)" in out
    assert "STALLED" not in out
    m.update(finality="final", final_fills=2, final_ops=9)
    out = run("status").stdout
    assert "DEMO finality: final (everything is acknowledged)" in out
    assert "2 of 2 fills final" in out


def test_status_says_how_the_market_was_joined(fake_node: Any) -> None:
    m = fake_node.answers["status"]["markets"][0]
    m.update(join="snapshot", joined_from_point=40000, history="absent", history_wanted=0)
    out = " ".join(run("status").stdout.split())
    assert "joined from the snapshot at final op 40000, history before it absent" in out
    assert "(fetched when an op needs it, and in the background unless" in out
    assert "fills and order answer from the join point on" in out
    m.update(history="fetching", history_wanted=3)
    out = " ".join(run("status").stdout.split())
    assert "history before it fetching (fetched when an op needs it" in out
    assert "--no-history-backfill: 3 ops wait for it)" in out
    m.update(history="complete", history_derived="deriving", history_derived_progress=0.25)
    out = " ".join(run("status").stdout.split())
    assert "history before it complete; deriving its fills and orders (25%)" in out
    assert "fetched when" not in out
    m.update(history_derived="done")
    out = " ".join(run("status").stdout.split())
    assert "history before it complete; its fills and orders derived" in out
    m.update(history_derived="inconsistent")
    out = " ".join(run("status").stdout.split())
    assert "its history does not derive the point joined from" in out
    m.update(join="joining", joined_from_point=None)
    assert "joining: taking a snapshot from a peer" in run("status").stdout


def test_status_never_final_said_once(fake_node: Any, samples: Any) -> None:
    unwitnessed(samples, fake_node)
    out = run("status").stdout
    assert out.count("fills here are never final: BTC-USD has no witnesses") == 1
    assert "witnesses (" not in out
    assert json.loads(run("status", "--json").stdout) == fake_node.answers["status"]


# ------------------------------------------------------------------------------------ reconfig


def test_reconfig_approve(fake_node: Any, samples: Any, tmp_path: Path) -> None:
    home, key = node_home(tmp_path, "n", b"\x09" * 32)
    res = run("reconfig", "approve", "-m", "DEMO", "--witness", samples.ME, "--witness", str(home))
    assert res.exit_code == 0, res.output
    assert res.stdout == f"{samples.ME}:{samples.SIGNATURE}\n"
    assert fake_node.last("approve_reconfig") == {
        "market": "DEMO",
        "witnesses": [samples.ME, key],
    }
    res = run("reconfig", "approve", "-w", samples.ME, "--json")
    assert json.loads(res.stdout) == fake_node.answers["approve_reconfig"]


def test_reconfig_approve_refused(fake_node: Any, samples: Any) -> None:
    fake_node.answers["approve_reconfig"] = samples.ControlError(
        "bad_request", "this node is not a witness of DEMO"
    )
    res = run("reconfig", "approve", "-w", samples.ME)
    assert res.exit_code == 1
    assert res.stderr == "error: this node is not a witness of DEMO [bad_request]\n"
    res = run("reconfig", "approve")
    assert res.exit_code == 2
    assert len(lines(res.stderr)) == 1


def test_reconfig_submit(fake_node: Any, samples: Any) -> None:
    sig2 = "6f" * 64
    res = run(
        "reconfig", "submit", "--market", "DEMO", "-w", samples.ME, "-w", samples.OTHER,
        "--approval", f"{samples.ME}:{samples.SIGNATURE}", "--approval", f"{samples.OTHER}:{sig2}",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert fake_node.last("reconfigure") == {
        "market": "DEMO",
        "witnesses": [samples.ME, samples.OTHER],
        "approvals": [
            {"witness": samples.ME, "signature": samples.SIGNATURE},
            {"witness": samples.OTHER, "signature": sig2},
        ],
    }
    assert lines(res.stdout) == [
        "epoch 1: 2 witnesses in force",
        f"reconfiguration op {samples.C}",
    ]
    args = ["-w", samples.ME, "-a", f"{samples.ME}:{samples.SIGNATURE}", "--json"]
    assert json.loads(run("reconfig", "submit", *args).stdout) == {"op": samples.C, "epoch": 1}


@pytest.mark.parametrize(
    ("extra", "text"),
    [
        ([], "give the approvals"),
        (["-a", "zz:yy"], "is not KEY:SIGNATURE"),
        (["-a", "e5" * 32], "is not KEY:SIGNATURE"),
    ],
)
def test_reconfig_submit_usage_errors(
    fake_node: Any, samples: Any, extra: list[str], text: str
) -> None:
    res = run("reconfig", "submit", "-w", samples.ME, *extra)
    assert res.exit_code == 2
    err = lines(res.stderr)
    assert len(err) == 1 and text in err[0]
    assert "reconfigure" not in [m for m, _ in fake_node.calls]


def test_reconfig_submit_refused(fake_node: Any, samples: Any) -> None:
    fake_node.answers["reconfigure"] = samples.ControlError(
        "invalid_op", "2 of 3 witnesses must approve; got 1"
    )
    res = run("reconfig", "submit", "-w", samples.ME, "-a", f"{samples.ME}:{samples.SIGNATURE}")
    assert res.exit_code == 1
    assert res.stderr == "error: 2 of 3 witnesses must approve; got 1 [invalid_op]\n"


@pytest.mark.parametrize(
    "args",
    [
        ["submit", "buy", "5@100", "--wait-final"],
        ["reconfig", "approve", "-w", "e5" * 32],
        ["reconfig", "submit", "-w", "e5" * 32, "-a", "e5" * 32 + ":" + "5e" * 64],
        ["book", "--market", "DEMO:1:1"],
    ],
    ids=lambda a: " ".join(a)[:40],
)
def test_no_node_running(fake_node: Any, args: list[str]) -> None:
    fake_node.running = False
    res = run("--home", "/nowhere", *args)
    assert res.exit_code == 2
    err = lines(res.stderr)
    assert len(err) == 1 and "crdtbook node --home /nowhere" in err[0]


# ----------------------------------------------------------------- real wire, fake server


def test_real_client_wait_final(socket_node: Any, samples: Any) -> None:
    socket_node.answers["submit"] = {
        "order": samples.order(final=True),
        "fills": [samples.fill(final=True)],
        "final": True,
    }
    res = runner.invoke(
        app,
        [
            "--home",
            str(socket_node.home),
            "submit",
            "buy",
            "5@100",
            "--wait-final",
            "--timeout",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "final: filled: bought 5 in 1 fill" in res.stdout
    req = socket_node.requests[-1]
    assert req["method"] == "submit"
    assert req["params"]["wait_final"] is True and req["params"]["timeout"] == 2.0
