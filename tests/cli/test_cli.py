"""Tests of the ``crdtbook`` command line.

Most go through typer's CliRunner with a fake control client (``fake_node``); a few run the real
console entry point in a subprocess; a few drive the real ``ControlClient`` against a fake socket
server (``socket_node``, skipped until ``crdtbook.node.client`` exists).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from crdtbook.cli.app import app

runner = CliRunner()


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    """Invoke the CLI in-process with a wide terminal so tables are not truncated."""
    return runner.invoke(app, list(args), env={"COLUMNS": "160", **(env or {})})


def lines(text: str) -> list[str]:
    """Non-empty lines of an output."""
    return [ln for ln in text.splitlines() if ln.strip()]


# ---------------------------------------------------------------------------------- submit


def test_submit_quantity_and_price(fake_node: Any) -> None:
    res = run("submit", "buy", "5", "100", "--market", "DEMO")
    assert res.exit_code == 0, res.output
    assert fake_node.last("submit") == {
        "market": "DEMO",
        "side": "buy",
        "price": "100",
        "quantity": "5",
        "tif": "gtc",
    }


def test_submit_qty_at_price(fake_node: Any) -> None:
    res = run("submit", "sell", "2.5@101.25")
    assert res.exit_code == 0, res.output
    params = fake_node.last("submit")
    assert (params["side"], params["quantity"], params["price"]) == ("sell", "2.5", "101.25")
    assert "market" not in params  # omitted: the node picks its only market


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["buy", "5@100", "101"], "not both"),
        (["buy", "5"], "QUANTITY@PRICE"),
        (["buy", "@100"], "both a quantity and a price"),
        (["hold", "5", "100"], "hold"),
    ],
)
def test_submit_bad_usage(fake_node: Any, args: list[str], hint: str) -> None:
    res = run("submit", *args)
    assert res.exit_code == 2
    assert hint in res.output
    assert fake_node.calls == []


@pytest.mark.parametrize(
    ("flag", "api"),
    [("gtc", "gtc"), ("ioc", "ioc"), ("fok", "fok"), ("post-only", "post_only"), ("IOC", "ioc")],
)
def test_submit_tif_mapping(fake_node: Any, flag: str, api: str) -> None:
    res = run("submit", "buy", "5@100", "--tif", flag, "--tag", "t1")
    assert res.exit_code == 0, res.output
    assert fake_node.last("submit")["tif"] == api
    assert fake_node.last("submit")["tag"] == "t1"


def test_submit_filled_output(fake_node: Any, samples: Any) -> None:
    res = run("submit", "buy", "5@100")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert samples.A in out  # the full order id, to copy
    assert "filled: bought 5 in 1 fill" in out
    assert "fill 5 @ 100" in out
    assert samples.B[:12] in out  # the maker


def test_submit_partial_output(fake_node: Any, samples: Any) -> None:
    fake_node.answers["submit"] = {
        "order": samples.order(status="partially_filled", filled="3", remaining="2"),
        "fills": [samples.fill(0, quantity="1"), samples.fill(1, quantity="2", price="99")],
    }
    out = run("submit", "buy", "5@100").stdout
    assert "partially filled: bought 3 of 5 in 2 fills; 2 resting at 100" in out
    assert "fill 2 @ 99" in out


def test_submit_resting_output(fake_node: Any, samples: Any) -> None:
    fake_node.answers["submit"] = {
        "order": samples.order(status="open", filled="0", remaining="5"),
        "fills": [],
    }
    out = run("submit", "buy", "5@100").stdout
    assert "resting: 5 @ 100 is on the book" in out


@pytest.mark.parametrize(
    ("status", "reason", "text"),
    [
        ("expired", "ioc_remainder", "expired: immediate-or-cancel"),
        ("expired", "fok_unfillable", "expired: fill-or-kill"),
        ("rejected", "post_only_would_take", "rejected: post-only"),
        ("expired", "self_trade", "expired: self-trade prevention"),
    ],
)
def test_submit_finished_with_reason(
    fake_node: Any, samples: Any, status: str, reason: str, text: str
) -> None:
    fake_node.answers["submit"] = {
        "order": samples.order(status=status, reason=reason, filled="0", remaining="0"),
        "fills": [],
    }
    res = run("submit", "buy", "5@100")
    assert res.exit_code == 0
    assert text in res.stdout


def test_submit_json_is_the_raw_result(fake_node: Any) -> None:
    res = run("submit", "buy", "5@100", "--json")
    assert res.exit_code == 0
    assert json.loads(res.stdout) == fake_node.answers["submit"]


def test_off_tick_error_is_one_line(fake_node: Any, samples: Any) -> None:
    msg = "price 100.5 is not a multiple of the tick 1 on DEMO; nearest valid: 100 or 101"
    fake_node.answers["submit"] = samples.ControlError("off_tick", msg)
    res = run("submit", "buy", "5", "100.5")
    assert res.exit_code == 1
    assert res.stdout == ""
    assert res.stderr == f"error: {msg} [off_tick]\n"


# ---------------------------------------------------------------------------------- cancel


def test_cancel(fake_node: Any, samples: Any) -> None:
    res = run("cancel", "A1A1A1")
    assert res.exit_code == 0, res.output
    assert fake_node.last("cancel") == {"order_id": "a1a1a1"}
    assert "cancelled" in res.stdout and samples.A in res.stdout
    assert "0 had filled, 5 no longer rests" in res.stdout


def test_cancel_not_effective(fake_node: Any, samples: Any) -> None:
    fake_node.answers["cancel"] = {
        "order": samples.order(),
        "cancel_id": samples.C,
        "effective": False,
    }
    res = run("cancel", "a1")
    assert "nothing to cancel" in res.stdout and "already filled" in res.stdout


def test_cancel_json_and_ambiguous(fake_node: Any, samples: Any) -> None:
    assert json.loads(run("cancel", "a1", "--json").stdout) == fake_node.answers["cancel"]
    fake_node.answers["cancel"] = samples.ControlError("ambiguous", "a matches 2 orders")
    res = run("cancel", "a")
    assert res.exit_code == 1
    assert res.stderr.strip() == "error: a matches 2 orders [ambiguous]"


# ------------------------------------------------------------------------------------ book


def test_book_ladder_order(fake_node: Any) -> None:
    res = run("book", "--market", "DEMO", "--depth", "5")
    assert res.exit_code == 0, res.output
    assert fake_node.last("book") == {"market": "DEMO", "depth": 5}
    out = res.stdout
    ladder = [ln.split() for ln in lines(out)]
    prices = [row[1] for row in ladder if len(row) >= 4 and row[1].isdigit()]
    assert prices == ["106", "105", "95", "94"]  # asks above, highest first; bids below
    pos = {p: out.index(f" {p} ") for p in prices}
    assert pos["105"] < out.index("spread 10") < pos["95"]
    assert "mid 100" in out
    assert "digest d4d4d4d4d4d4" in out
    # cumulative sizes: asks 2 then 2+3 (shown above it), bids 2 then 2+4
    rows = {row[1]: row[2:5] for row in ladder if len(row) >= 4 and row[1].isdigit()}
    assert rows["106"][:2] == ["3", "5"] and rows["105"][:2] == ["2", "2"]
    assert rows["95"][:2] == ["2", "2"] and rows["94"][:2] == ["4", "6"]


def test_book_empty(fake_node: Any) -> None:
    fake_node.answers["book"] = {
        "market": "DEMO",
        "bids": [],
        "asks": [],
        "best_bid": None,
        "best_ask": None,
        "spread": None,
        "mid": None,
        "digest": "00" * 32,
    }
    res = run("book")
    assert res.exit_code == 0
    assert "(empty book)" in res.stdout


def test_book_json(fake_node: Any, samples: Any) -> None:
    res = run("book", "--json")
    assert json.loads(res.stdout) == samples.BOOK
    assert fake_node.last("book") == {"depth": 10}


def test_book_watch_redraws_until_stream_ends(fake_node: Any) -> None:
    fake_node.events = [
        {"event": "update", "market": "DEMO", "ops": 10, "digest": "aa", "fills": []},
        {"event": "update", "market": "DEMO", "ops": 11, "digest": "bb", "fills": []},
    ]
    res = run("--home", "/h", "book", "--watch", "-m", "DEMO")
    assert [m for m, _ in fake_node.calls] == ["watch", "book", "book", "book"]
    assert fake_node.calls[0] == ("watch", {"market": "DEMO"})
    # the stream ending means the node went away: one line, exit 1
    assert res.exit_code == 1
    assert res.stderr == "error: the node at /h closed the watch stream (did it stop?)\n"


def test_book_watch_ctrl_c_exits_0(fake_node: Any) -> None:
    fake_node.events = [
        {"event": "update", "market": "DEMO", "ops": 10, "digest": "aa", "fills": []}
    ]
    fake_node.watch_error = KeyboardInterrupt()
    res = run("book", "--watch")
    assert res.exit_code == 0, res.output


def test_book_watch_json_lines(fake_node: Any, samples: Any) -> None:
    fake_node.events = [
        {"event": "update", "market": "DEMO", "ops": 10, "digest": "aa", "fills": []}
    ]
    fake_node.watch_error = KeyboardInterrupt()
    res = run("book", "--watch", "--json")
    assert res.exit_code == 0
    assert [json.loads(ln) for ln in lines(res.stdout)] == [samples.BOOK, samples.BOOK]


# ------------------------------------------------------------------- fills, orders, order


def test_fills(fake_node: Any) -> None:
    res = run("fills", "-m", "DEMO", "--limit", "5")
    assert res.exit_code == 0, res.output
    assert fake_node.last("fills") == {"market": "DEMO", "limit": 5}
    assert "fills on DEMO" in res.stdout
    assert json.loads(run("fills", "--json").stdout) == fake_node.answers["fills"]
    assert run("fills", "--start", "40", "-n", "10").exit_code == 0
    assert fake_node.last("fills") == {"limit": 10, "start": 40}
    assert run("fills", "--start", "-1").exit_code == 2  # refused before anything is asked
    # In the CLI's own words (the node's names its param `mine`).
    res = run("fills", "--start", "3", "--mine")
    assert res.exit_code == 2 and "--start pages through every fill" in res.stderr
    assert "--mine" in res.stderr
    # A start past the end said "no fills yet" of a market with fills.
    fake_node.answers["fills"] = {
        "market": "DEMO",
        "fills": [],
        "witnessed": True,
        "final_count": 13,
        "fill_count": 13,
    }
    res = run("fills", "--start", "100")
    assert "no fill from #100 on: DEMO has 13 fills (#0 to #12)" in res.stdout
    assert json.loads(run("fills", "--start", "100", "--json").stdout) == fake_node.answers["fills"]


def test_orders_mine_and_all(fake_node: Any, samples: Any) -> None:
    res = run("orders")
    assert res.exit_code == 0, res.output
    assert fake_node.last("orders") == {}
    assert samples.A[:12] in res.stdout and samples.B[:12] in res.stdout
    run("orders", "--all")
    assert fake_node.last("orders") == {"all": True}
    assert json.loads(run("orders", "--json").stdout) == fake_node.answers["orders"]


def test_orders_says_when_older_ones_are_not_listed(fake_node: Any, samples: Any) -> None:
    fake_node.answers["orders"] = {**fake_node.answers["orders"], "more": True}
    out = " ".join(run("orders", "--limit", "2").stdout.split())
    assert "older orders are not listed: crdtbook order ID shows any of them" in out
    fake_node.answers["orders"] = {**fake_node.answers["orders"], "more": False}
    assert "older orders" not in run("orders").stdout


def test_order(fake_node: Any, samples: Any) -> None:
    res = run("order", "a1a1")
    assert res.exit_code == 0, res.output
    assert fake_node.last("order") == {"order_id": "a1a1"}
    assert samples.A in res.stdout and "100  (100 ticks)" in res.stdout
    assert json.loads(run("order", "a1", "--json").stdout) == samples.order()


def test_order_not_found(fake_node: Any, samples: Any) -> None:
    fake_node.answers["order"] = samples.ControlError("not_found", "no order matches ff")
    res = run("order", "ff")
    assert res.exit_code == 1
    assert res.stderr == "error: no order matches ff [not_found]\n"


# --------------------------------------------------------------------------- status and id


def test_status(fake_node: Any, samples: Any) -> None:
    res = run("status")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "12D3KooWFakePeerOne" in out and "12D3KooWFakePeerTwo" in out
    assert "/ip4/127.0.0.1/tcp/40001" in out
    assert "never" in out  # last sync
    assert "d4d4d4d4d4d4" in out
    assert "pulled 12 sessions (3 ops gossip had not brought), served 40" in out
    assert "busy 32%, early publishing on" in out
    assert json.loads(run("status", "--json").stdout) == samples.STATUS


def test_status_says_when_the_node_cannot_sign_or_store(fake_node: Any, samples: Any) -> None:
    """A store that refuses writes, a key that equivocated and sync sessions refused for being
    busy are shown where an operator looks first (they were in the log only, or nowhere)."""
    status = copy.deepcopy(samples.STATUS)
    status["store_fault"] = {"reason": "full", "message": "the store's filesystem is full"}
    status["markets"][0]["key_equivocated"] = True
    status["markets"][0]["point_disputed"] = {"n": 3000, "attested_hash": "ab" * 32}
    status["sync_sessions"]["refused_busy"] = 7
    fake_node.answers["status"] = status
    res = run("status")
    assert res.exit_code == 0, res.output
    out = " ".join(res.stdout.split())
    assert "refuses writes (full): nothing new is signed or taken until it does" in out
    assert "the store's filesystem is full" in out
    assert "signed two different ops at one sequence number in DEMO" in out
    assert "7 refused (busy)" in out
    assert "at point 3000 is not the one a majority of the witnesses attest" in out
    assert json.loads(run("status", "--json").stdout) == status


def test_id(fake_node: Any, samples: Any) -> None:
    res = run("id")
    assert res.exit_code == 0
    assert "12D3KooWFakePeerOne" in res.stdout
    assert json.loads(run("id", "--json").stdout) == {
        "peer_id": samples.STATUS["peer_id"],
        "public_key": samples.ME,
        "addrs": samples.STATUS["addrs"],
        "running": True,
    }


def test_id_without_a_node_reads_or_creates_the_homes_key(fake_node: Any, tmp_path: Path) -> None:
    """A market's witnesses are named by key before any of them runs (README): with no node,
    `id` reads the home's key file, and --init creates it (what the node will use)."""
    fake_node.running = False
    home = tmp_path / "witness-a"
    res = run("--home", str(home), "id")
    assert res.exit_code == 2 and not home.exists()  # no key: nothing made without --init
    assert lines(res.stderr) == [
        f"error: no node is running at {home} and it has no key yet ({home}/identity.key); "
        f"create one with: crdtbook id --init --home {home} (or start the node: crdtbook node "
        f"--home {home})"
    ]
    res = run("--home", str(home), "id", "--init", "--json")
    assert res.exit_code == 0, res.output
    created = json.loads(res.stdout)
    assert created["running"] is False and created["addrs"] == []
    assert created["peer_id"].startswith("12D3KooW")
    assert (home / "identity.key").stat().st_mode & 0o777 == 0o600
    assert home.stat().st_mode & 0o777 == 0o700
    assert lines(res.stderr) == [
        f"created {home}/identity.key: a node started with --home {home} will use this key"
    ]
    again = run("--home", str(home), "id", "--init", "--json")  # the same key, not a new one
    assert json.loads(again.stdout) == created
    res = run("--home", str(home), "id")
    assert res.exit_code == 0
    assert f"witness key {created['public_key']}" in res.stdout
    assert "multiaddrs: none" in res.stdout
    assert "no node is running" in res.stderr
    (home / "identity.key").write_bytes(b"short")
    res = run("--home", str(home), "id")
    assert res.exit_code == 1 and "is not a 32-byte key file" in res.stderr


# ------------------------------------------------------------------------ homes and errors


def test_home_precedence(fake_node: Any, tmp_path: Path) -> None:
    env_home, global_home, cmd_home = tmp_path / "env", tmp_path / "global", tmp_path / "cmd"
    run("status", env={"CRDTBOOK_HOME": str(env_home)})
    run("--home", str(global_home), "status", env={"CRDTBOOK_HOME": str(env_home)})
    run("--home", str(global_home), "status", "--home", str(cmd_home))
    run("status")
    assert fake_node.homes == [env_home, global_home, cmd_home, Path("/fake/default-home")]


COMMANDS = [
    ["submit", "buy", "5@100"],
    ["cancel", "abcd"],
    ["book"],
    ["book", "--watch"],
    ["fills"],
    ["orders"],
    ["order", "abcd"],
    ["status"],
    ["status", "--json"],
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a))
def test_no_node_running(fake_node: Any, args: list[str]) -> None:
    fake_node.running = False
    res = run("--home", "/nowhere", *args)
    assert res.exit_code == 2
    assert res.stdout == ""
    err = lines(res.stderr)
    assert len(err) == 1
    assert err[0].startswith("error: no crdtbook node is running at /nowhere")
    assert "crdtbook node --home /nowhere" in err[0]


def test_no_node_message_gets_a_hint(fake_node: Any, samples: Any) -> None:
    fake_node.answers["status"] = samples.NodeNotRunning("nothing listens on /x/control.sock")
    res = run("--home", "/x", "status")
    assert res.exit_code == 2
    assert res.stderr == (
        "error: nothing listens on /x/control.sock; start one with: crdtbook node --home /x\n"
    )


# ------------------------------------------------------------------------------------ node


def test_node_delegates_to_run_node(monkeypatch: pytest.MonkeyPatch, fake_node: Any) -> None:
    seen: dict[str, Any] = {}

    class NodeConfig:
        def __init__(self, **kw: Any) -> None:
            self.__dict__.update(kw)

    def run_node(config: NodeConfig) -> int:
        seen["config"] = config
        return 3

    fake = types.ModuleType("crdtbook.node.app")
    fake.NodeConfig = NodeConfig  # type: ignore[attr-defined]
    fake.run_node = run_node  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "crdtbook.node.app", fake)

    res = run("node", "--home", "/h")
    assert res.exit_code == 3
    cfg = seen["config"]
    assert (cfg.home, cfg.listen, cfg.bootstrap, cfg.markets, cfg.verbose) == (
        Path("/h"),
        ["/ip4/0.0.0.0/tcp/4001"],
        [],
        [],
        0,
    )

    boot = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWX"
    args = ["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--listen", "/ip4/127.0.0.1/tcp/5"]
    args += ["--bootstrap", boot, "-m", "DEMO", "--market", "X:0.01:0.1", "-vv"]
    res = run(*args)
    cfg = seen["config"]
    assert cfg.listen == ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/5"]
    assert cfg.bootstrap == [boot]
    assert cfg.markets == ["DEMO", "X:0.01:0.1"]
    assert cfg.verbose == 2
    assert cfg.home == Path("/fake/default-home")


# ------------------------------------------------------------------ real wire, fake server


def test_real_client_against_fake_socket(socket_node: Any, samples: Any) -> None:
    home = str(socket_node.home)
    res = run("--home", home, "book", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == samples.BOOK
    req = socket_node.requests[-1]
    assert req["method"] == "book" and req["params"] == {"depth": 10}

    socket_node.answers["submit"] = samples.ControlError("off_lot", "quantity 0.5 is off the lot 1")
    res = run("--home", home, "submit", "buy", "0.5@100")
    assert res.exit_code == 1
    assert res.stderr == "error: quantity 0.5 is off the lot 1 [off_lot]\n"
    assert socket_node.requests[-1]["params"]["tif"] == "gtc"


def test_real_client_watch(socket_node: Any) -> None:
    socket_node.events = [
        {"event": "update", "market": "DEMO", "ops": 10, "digest": "aa", "fills": []},
    ]
    res = run("--home", str(socket_node.home), "book", "--watch", "--json")
    assert res.exit_code == 1  # the fake server closes the stream after its events
    assert len(lines(res.stdout)) == 2
    assert "closed the watch stream" in res.stderr


def test_real_client_no_node(tmp_path: Path) -> None:
    pytest.importorskip("crdtbook.node.client")
    res = run("--home", str(tmp_path), "status")
    assert res.exit_code == 2
    assert len(lines(res.stderr)) == 1
    assert "crdtbook node" in res.stderr


# ------------------------------------------------------------------------ real subprocesses


def cli(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m crdtbook.cli.app`` in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "CRDTBOOK_HOME"}
    if home is not None:
        env["CRDTBOOK_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "crdtbook.cli.app", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_subprocess_help() -> None:
    res = cli("--help")
    assert res.returncode == 0
    for command in ["node", "submit", "cancel", "book", "fills", "orders", "order", "status"]:
        assert command in res.stdout
    assert "demo" in res.stdout
    assert cli("submit", "--help").returncode == 0


def test_subprocess_version() -> None:
    res = cli("--version")
    assert res.returncode == 0
    assert res.stdout.startswith("crdtbook ")


def test_console_script_version() -> None:
    script = Path(sys.executable).parent / "crdtbook"
    if not script.exists():
        pytest.skip("console script not installed next to the interpreter")
    res = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("crdtbook ")


def test_subprocess_no_node(tmp_path: Path) -> None:
    pytest.importorskip("crdtbook.node.client")
    res = cli("book", home=tmp_path)
    assert res.returncode == 2
    assert res.stdout == ""
    err = lines(res.stderr)
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "crdtbook node" in err[0]


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["submit", "buy", "5"], "QUANTITY@PRICE"),
        (["submit", "hold", "5@1"], "'hold' is not one of"),
        (["bogus"], "No such command"),
        (["book", "--depth", "0"], "--depth"),
    ],
)
def test_subprocess_usage_error_is_one_line(args: list[str], text: str) -> None:
    res = cli(*args)
    assert res.returncode == 2
    assert res.stdout == ""
    err = lines(res.stderr)
    assert len(err) == 1 and err[0].startswith("error: ") and text in err[0]
    assert err[0].endswith("--help)")


def test_subprocess_no_args_shows_help() -> None:
    res = cli()
    assert res.returncode == 0
    assert "Usage: crdtbook" in res.stdout


def test_import_is_light() -> None:
    code = (
        "import sys, crdtbook.cli.app; "
        "bad = [m for m in ('libp2p', 'trio') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""
