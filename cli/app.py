"""The ``crdtbook`` command line: parse, call the node's control API, render.

Talking to a node goes through :mod:`crdtbook.cli.connect` (the blocking ``ControlClient``);
drawing goes through :mod:`crdtbook.cli.render`. Nothing heavy (libp2p, trio) is imported at
module level, so ``crdtbook --help`` and every client command start fast.

Exit codes: 0 success; 1 the node answered with an error (one line on stderr, with its code);
2 no node is running at the chosen home (or a usage error); 3 ``submit --wait-final``: the order
was placed but is not final in time; 130 interrupted.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from crdtbook import SIDES, STP_MODES, TIFS
from crdtbook.cli import connect

HELP = """\
crdtbook: a peer-to-peer exchange order book.

Run a node with `crdtbook node`, then use the other commands to trade and inspect it. They talk to
the node over its local control socket (HOME/control.sock); pick the node with --home DIR or
$CRDTBOOK_HOME (default ~/.crdtbook). Try `crdtbook demo` for a 3-node network on this machine.

Every read command takes --json; the shapes are in specs/control-api.md ("CLI --json shapes").

Exit codes: 0 ok, 1 the node refused (reason on stderr), 2 no node running / usage error,
3 submit --wait-final placed the order but it is not final in time (printed as without it),
130 interrupted (a submit, cancel or amend may have taken effect: the message says how to check).
"""

app = typer.Typer(
    name="crdtbook",
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/4001"
#: How long ``submit --wait-final`` waits by default (the control API's default too).
WAIT_FINAL_TIMEOUT = 30.0
#: The exit code of ``submit --wait-final`` when the order was placed but is not final within
#: the timeout: not 1 (refused, nothing placed), so that a script that retries on failure does
#: not place the order twice.
NOT_FINAL_IN_TIME = 3
#: Extra seconds the client waits beyond a waiting call's own timeout.
CLIENT_GRACE = 10.0


def _choices(names: tuple[str, ...]) -> dict[str, str]:
    """Command-line choices for the core's ``names``, typed with dashes (``post-only`` for
    ``post_only``), as the command line spells every other word."""
    return {name: name.replace("_", "-") for name in names}


def api_name(choice: StrEnum) -> str:
    """The core's (and the control API's) name of a command-line choice: ``post-only`` ->
    ``post_only``."""
    return choice.value.replace("-", "_")


# The order vocabulary is the core's (crdtbook.SIDES, TIFS, STP_MODES): one list, spelled here
# with dashes. mypy cannot list the members of an Enum built from a computed mapping (hence the
# ignores); nothing below reads a member by attribute: ``Tif("gtc")``.
#: Order side.
Side = StrEnum("Side", _choices(SIDES))  # type: ignore[misc]
#: Time in force, as typed on the command line (``post-only`` maps to ``post_only``).
Tif = StrEnum("Tif", _choices(TIFS))  # type: ignore[misc]
#: Self-trade prevention mode, as typed on the command line.
Stp = StrEnum("Stp", _choices(STP_MODES))  # type: ignore[misc]
#: An order rests until filled or cancelled unless told otherwise.
DEFAULT_TIF = Tif("gtc")


# ------------------------------------------------------------------------------ shared options

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home",
        help="Node home directory (overrides the global --home / $CRDTBOOK_HOME).",
        show_default=False,
        file_okay=False,
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the raw result as JSON (shapes: see top-level help).")
]
MarketOpt = Annotated[
    str | None,
    typer.Option(
        "--market",
        "-m",
        help="Market name, or its definition (NAME:TICK:LOT[:WITNESSES], or @FILE holding it, "
        "checked against the node's); may be omitted when the node follows exactly one market.",
        show_default=False,
    ),
]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"crdtbook {version()}")
        raise typer.Exit(0)


def version() -> str:
    """The installed package version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v("crdtbook")
    except PackageNotFoundError:  # pragma: no cover - only when run from an uninstalled tree
        return "0.0.0+unknown"


@app.callback()
def _root(
    ctx: typer.Context,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            envvar="CRDTBOOK_HOME",
            help="Node home directory [default: ~/.crdtbook].",
            show_default=False,
            file_okay=False,
        ),
    ] = None,
    _version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    ctx.obj = {"home": home}


# ------------------------------------------------------------------------------------ plumbing


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit with ``code``."""
    one_line = " ".join(str(message).split())
    typer.echo(f"error: {one_line}", err=True)
    raise typer.Exit(code)


def _home(ctx: typer.Context, home: Path | None) -> Path:
    if home is None and isinstance(ctx.obj, dict):
        home = ctx.obj.get("home")
    return connect.resolve_home(home)


@contextmanager
def node_errors(home: Path) -> Iterator[None]:
    """Turn client exceptions into one-line errors and exit codes (2 = no node, 1 = refused)."""
    try:
        api = connect.client_api()
    except ImportError as exc:
        fail(f"the node control client is not available ({exc})")
    try:
        yield
    except api.NodeNotRunning as exc:
        msg = str(exc) or f"no crdtbook node is running at {home}"
        if "crdtbook node" not in msg:
            msg += f"; start one with: crdtbook node --home {home}"
        fail(msg, 2)
    except api.ControlError as exc:
        code = getattr(exc, "code", None)
        message = getattr(exc, "message", None) or str(exc)
        fail(f"{message} [{code}]" if code else message, 1)
    except OSError as exc:
        fail(f"cannot talk to the node at {home}: {exc}", 1)


class Session:
    """One client to the chosen node: ``call`` leaves out ``None`` params and turns a market
    definition (``NAME:TICK:LOT[:WITNESSES]`` or ``@FILE``) into the name the node knows it by,
    after checking that the node follows that very market (same id)."""

    def __init__(self, client: connect.Client, home: Path) -> None:
        self.client = client
        self.home = home
        self._names: dict[str, str] = {}

    def call(self, method: str, **params: Any) -> Any:
        if isinstance(params.get("market"), str):
            params["market"] = self.market_name(params["market"])
        return self.client.call(method, **{k: v for k, v in params.items() if v is not None})

    def market_name(self, value: str) -> str:
        """The name to send for a ``--market`` value (exit 2 on a bad definition, 1 when the
        node follows a market of that name with another definition)."""
        from crdtbook.cli import markets

        if not markets.is_definition(value):
            return value
        if value in self._names:
            return self._names[value]
        try:
            market = markets.load_market(value)
        except markets.DefinitionError as exc:
            fail(str(exc), 2)
        followed = self.client.call("markets") or []
        entry = next((m for m in followed if m.get("name") == market.name), None)
        if entry is not None and entry.get("id") not in (None, market.id.hex()):
            fail(
                f"the node at {self.home} follows a market named {market.name} with another "
                f"definition (id {str(entry.get('id'))[:12]}, not {market.id.hex()[:12]}): check "
                "the tick, lot and witnesses"
            )
        self._names[value] = market.name
        return market.name


@contextmanager
def session(
    ctx: typer.Context, home: Path | None, timeout: float | None = None
) -> Iterator[Session]:
    """A :class:`Session` on the chosen node; any error exits cleanly (see :func:`node_errors`)."""
    resolved = _home(ctx, home)
    with node_errors(resolved):
        client = connect.open_client(resolved, timeout)
        try:
            yield Session(client, resolved)
        finally:
            connect.close_client(client)


def call(ctx: typer.Context, home: Path | None, method: str, **params: Any) -> Any:
    """Call one control method on the chosen node, exiting cleanly on any error."""
    with session(ctx, home) as node:
        return node.call(method, **params)


@contextmanager
def signing_call(what: str, check: str) -> Iterator[None]:
    """Around a call that signs an op (submit, cancel, amend, cancel-all): Ctrl-C while it
    waits for the node's answer exits 130 saying that the op may stand. The request was sent and
    perhaps signed; a user told nothing would do it again (a second order, a second replace)."""
    try:
        yield
    except KeyboardInterrupt:
        fail(
            f"interrupted before the node answered: {what} all the same; {check}",
            130,
        )


def market_entry(node: Session, name: str | None) -> dict[str, Any] | None:
    """The node's ``status`` entry for market ``name`` (its only market when None), or None.

    Used by the commands whose results do not say whether the market has witnesses (orders,
    order, submit), so they can say when fills there are never final.
    """
    api = connect.client_api()
    try:
        st = node.client.call("status", digest=False)
    except (api.ControlError, api.NodeNotRunning, OSError):
        return None
    ms: list[dict[str, Any]] = list((st or {}).get("markets") or [])
    if name is None:
        return ms[0] if len(ms) == 1 else None
    return next((m for m in ms if m.get("name") == name), None)


def witnessed(entry: dict[str, Any] | None) -> bool | None:
    """Whether a market status entry has witnesses (None: the node does not say)."""
    value = (entry or {}).get("witnessed")
    return value if isinstance(value, bool) else None


def emit(result: Any, as_json: bool, render: Callable[[Any], Any]) -> None:
    """Print ``result`` as JSON, or through ``render`` for people."""
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _console().print(render(result))


def split_qty_price(quantity: str, price: str | None) -> tuple[str, str]:
    """Accept ``QTY PRICE`` or a single ``QTY@PRICE``; return ``(qty, price)``."""
    if price is None:
        if "@" not in quantity:
            raise typer.BadParameter(
                "give QUANTITY PRICE or QUANTITY@PRICE (e.g. 5@100)", param_hint="QUANTITY"
            )
        qty, _, px = quantity.partition("@")
    else:
        if "@" in quantity:
            raise typer.BadParameter(
                "use either QUANTITY PRICE or QUANTITY@PRICE, not both", param_hint="QUANTITY"
            )
        qty, px = quantity, price
    qty, px = qty.strip(), px.strip()
    if not qty or not px:
        raise typer.BadParameter("both a quantity and a price are needed", param_hint="QUANTITY")
    return qty, px


# ------------------------------------------------------------------------------------ commands


@app.command()
def node(
    ctx: typer.Context,
    listen: Annotated[
        list[str] | None,
        typer.Option(
            "--listen",
            "-l",
            help=f"Multiaddr to listen on (repeatable) [default: {DEFAULT_LISTEN}]. "
            "Use /ip4/127.0.0.1/tcp/0 for a free local port.",
            show_default=False,
        ),
    ] = None,
    bootstrap: Annotated[
        list[str] | None,
        typer.Option(
            "--bootstrap",
            "-b",
            help="Multiaddr (ending in /p2p/PEER_ID) of a peer to join through (repeatable).",
            show_default=False,
        ),
    ] = None,
    market: Annotated[
        list[str] | None,
        typer.Option(
            "--market",
            "-m",
            help="Market to follow: NAME of a built-in market (BTC-USD, ETH-USD, SOL-USD, DEMO), "
            "NAME:TICK:LOT, a witnessed market NAME:TICK:LOT:KEY,KEY,... (see `crdtbook market "
            "new`), or @FILE holding one of those (repeatable) [default: the node's default "
            "market].",
            show_default=False,
        ),
    ] = None,
    home: HomeOpt = None,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More logging (-v, -vv).")
    ] = 0,
    fsync: Annotated[
        bool,
        typer.Option(
            "--fsync",
            help="Wait for the disk on every commit: acknowledged ops survive power loss, not "
            "only a crash of the node (slower: a few ms per commit instead of ~50 us).",
        ),
    ] = False,
    heartbeat_interval: Annotated[
        float | None,
        typer.Option(
            "--heartbeat-interval",
            metavar="SECONDS",
            min=0.0,
            max=60.0,
            help="In a market where this node is a witness: how long it waits, once there is "
            "something to acknowledge, before it heartbeats (ops arriving meanwhile share the "
            "heartbeat) [default: 0.25].",
            show_default=False,
        ),
    ] = None,
    join: Annotated[
        str,
        typer.Option(
            "--join",
            metavar="snapshot|full",
            help="How to start a witnessed market this node holds nothing of: from a snapshot "
            "that a majority of its witnesses attest, fetching the history before it in the "
            "background (snapshot; see --no-history-backfill), or from the whole log (full).",
        ),
    ] = "snapshot",
    retention: Annotated[
        int | None,
        typer.Option(
            "--retention",
            metavar="OPS",
            min=0,
            help="In witnessed markets, keep in the store only the OPS newest compacted ops "
            "before the latest compaction point and delete older ones (0: keep none of them; the "
            "point itself always keeps its newest ~2,000 ops and the resting orders, so small "
            "values differ little) [default: keep everything]. fills and order still answer "
            "for all history (compacted fills and orders are kept); the node then serves no "
            "history to joiners, and fetches it back from a peer when a late op needs it.",
            show_default=False,
        ),
    ] = None,
    history_backfill: Annotated[
        bool,
        typer.Option(
            "--history-backfill/--no-history-backfill",
            help="With --join snapshot, fetch the history before the join point in the "
            "background 30 s after joining, so that fills and order answer for all of it "
            "(derived from it and checked against the joined point). Without it they answer "
            "from the join point on.",
        ),
    ] = True,
    point_interval: Annotated[
        int | None,
        typer.Option(
            "--point-interval",
            min=1,
            hidden=True,  # every node of a market must use the same: tests and benches only
            help="Final ops between two compaction points of a witnessed market.",
        ),
    ] = None,
    http: Annotated[
        str | None,
        typer.Option(
            "--http",
            metavar="[HOST:]PORT",
            help="Also serve the HTTP/WebSocket API and the web view (specs/http-api.md) on "
            "PORT; HOST defaults to 127.0.0.1. Trading and private requests need the bearer "
            "token of `crdtbook token`; another HOST (e.g. 0.0.0.0) is reachable from other "
            "machines.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run a node in the foreground until Ctrl-C (SIGINT) or SIGTERM.

    It serves the control API on HOME/control.sock, so the other commands (in another terminal)
    can trade through it; with --http also an HTTP API and a web view (http://HOST:PORT/).

    Example: crdtbook node --listen /ip4/0.0.0.0/tcp/4001 --market DEMO:1:1 -v
    """
    from crdtbook.cli import markets

    resolved = _home(ctx, home)
    try:
        specs = [markets.market_text(value) for value in market or []]
    except markets.DefinitionError as exc:
        fail(str(exc), 2)
    try:
        from crdtbook.node.app import NodeConfig, run_node
    except ImportError as exc:
        fail(f"the node is not available in this install ({exc})")
    extra: dict[str, Any] = {}  # (typed: NodeConfig's fields are not all floats)
    if heartbeat_interval is not None:
        extra["heartbeat_interval"] = heartbeat_interval
    if join not in ("snapshot", "full"):
        fail(f"--join must be snapshot or full, not {join!r}", 2)
    if point_interval is not None:
        extra["point_interval"] = point_interval
    if retention is not None:
        extra["retention"] = retention
    if not history_backfill:
        extra["history_backfill"] = None
    if http is not None:
        from crdtbook.node.http_auth import parse_bind

        try:
            extra["http"] = parse_bind(http)
        except ValueError as exc:
            fail(str(exc), 2)
    config = NodeConfig(
        home=resolved,
        listen=list(listen or [DEFAULT_LISTEN]),
        bootstrap=list(bootstrap or []),
        markets=specs,
        verbose=verbose,
        fsync=fsync,
        join=join,
        **extra,
    )
    try:
        code = run_node(config)
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(int(code or 0))


@app.command()
def submit(
    ctx: typer.Context,
    side: Annotated[Side, typer.Argument(help="buy or sell.", show_default=False)],
    quantity: Annotated[
        str, typer.Argument(help="Quantity (decimal), or QTY@PRICE as one argument.")
    ],
    price: Annotated[
        str | None, typer.Argument(help="Limit price (decimal).", show_default=False)
    ] = None,
    market: MarketOpt = None,
    tif: Annotated[
        Tif,
        typer.Option(
            "--tif",
            help="Time in force: gtc rests until filled or cancelled; ioc fills what it can "
            "at once and drops the rest; fok fills in full at once or not at all; post-only "
            "only rests (rejected if it would trade at once).",
            case_sensitive=False,
        ),
    ] = DEFAULT_TIF,
    tag: Annotated[
        str | None,
        typer.Option(
            "--tag",
            help="Free-form label kept with the order (markets without witnesses; in a "
            "witnessed market the tag is the client order id, unique: see --client-id).",
        ),
    ] = None,
    client_id: Annotated[
        str | None,
        typer.Option(
            "--client-id",
            help="Client order id (witnessed markets): unique per key and market, for "
            "`cancel --client-id`, `order --client-id` and `cancel --all --prefix`.",
            show_default=False,
        ),
    ] = None,
    stp: Annotated[
        Stp | None,
        typer.Option(
            "--stp",
            help="Self-trade prevention when the order meets a resting order of this node: "
            "expire-maker (the default: the resting order expires), expire-taker (this order "
            "stops) or expire-both. Only expire-maker in a market without witnesses.",
            case_sensitive=False,
            show_default=False,
        ),
    ] = None,
    market_order: Annotated[
        bool,
        typer.Option(
            "--market-order",
            help="A market order: immediate-or-cancel at the best opposite price moved by --band "
            "(give QUANTITY only); refused when that side of the book is empty.",
        ),
    ] = False,
    band: Annotated[
        str | None,
        typer.Option(
            "--band",
            help="With --market-order: price protection, how far past the best price it may "
            "trade (percent, e.g. 2%; default 1%).",
            show_default=False,
        ),
    ] = None,
    wait_final: Annotated[
        bool,
        typer.Option(
            "--wait-final",
            help="Wait until the order's outcome is final (the market's witnesses acknowledged "
            "it, so no order can change it any more) and print that final outcome. Not final "
            "within --timeout: prints the provisional outcome (the order stands) and exits 3.",
        ),
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=0.1,
            max=3600.0,
            help="With --wait-final: seconds to wait before giving up (the order stays placed) "
            f"[default: {WAIT_FINAL_TIMEOUT:g}].",
            show_default=False,
        ),
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a limit order and show at once what happened to it.

    Examples: crdtbook submit buy 5 100 ; crdtbook submit sell 5@100 --tif ioc ;
    crdtbook submit buy 3@101 --wait-final --timeout 10 ;
    crdtbook submit buy 3 --market-order --band 2%

    Prints the order id, then whether it filled (with each fill), partially filled, is resting on
    the book, expired, or was rejected (with the reason), marked final or provisional: on a market
    with witnesses an outcome is provisional until their heartbeats acknowledge it (an order that
    sorts earlier can still change it), then final; on a market without witnesses it is never
    final. Quantities and prices are decimal strings in the market's units; the node checks them
    against the tick and lot. Orders that self-trade prevention expired (this node's resting
    orders the new one met, or the new one itself) are named.

    --json prints the node's result: {"order": Order, "fills": [Fill], "final": bool,
    "self_trade_expired": [Order]}; with --wait-final, when the order is not final in time, the
    same with "final": false (exit code 3; the reason on stderr).
    """
    from crdtbook.cli import render

    if market_order:
        if price is not None or "@" in quantity:
            fail("a market order takes a quantity only: its price comes from the book", 2)
        if api_name(tif) not in ("gtc", "ioc"):
            fail("a market order is immediate-or-cancel: leave out --tif", 2)
        qty, px, tif = quantity.strip(), None, Tif("ioc")
    else:
        if band is not None:
            fail("--band goes with --market-order", 2)
        qty, px = split_qty_price(quantity, price)
    if timeout is not None and not wait_final:
        fail("--timeout goes with --wait-final", 2)
    wait = WAIT_FINAL_TIMEOUT if timeout is None else timeout
    params: dict[str, Any] = {
        "market": market,
        "side": api_name(side),
        "price": px,
        "quantity": qty,
        "tif": api_name(tif),
        "tag": tag,
        "client_id": client_id,
        "stp": None if stp is None else api_name(stp),
    }
    if market_order:
        params.update(market_order=True, band=band)
    if wait_final:
        params.update(wait_final=True, timeout=wait)
    # The client waits a little longer than the node, so the node's own timeout error (which
    # says what finality waits for) is the one the user sees.
    with session(ctx, home, wait + CLIENT_GRACE if wait_final else None) as node:
        name = node.market_name(market) if market is not None else None
        entry = market_entry(node, name) if wait_final or not as_json else None
        if wait_final and witnessed(entry) is False:
            label = (entry or {}).get("name") or name or "this market"
            fail(
                f"fills here are never final: {label} has no witnesses, so --wait-final would "
                "wait forever (submit without it) [not_witnessed]"
            )
        try:
            with signing_call(
                "the order may have been placed", "`crdtbook orders` shows whether it was"
            ):
                result = node.call("submit", **params)
        except connect.client_api().ControlError as exc:
            if getattr(exc, "code", None) != "timeout":
                raise
            # Placed, not final in time: its provisional result goes to stdout as without
            # --wait-final (a script learns the id and does not place it again), exit 3.
            placed = getattr(exc, "data", None)
            if isinstance(placed, dict) and "order" in placed:
                emit(placed, as_json, lambda r: render.submit_result(r, witnessed=True))
            message = getattr(exc, "message", None) or str(exc)
            fail(
                f"{message}; the order was placed and may still turn final: `crdtbook orders` "
                "shows it, `crdtbook status` shows which witness is silent [timeout]",
                NOT_FINAL_IN_TIME,
            )
    emit(result, as_json, lambda r: render.submit_result(r, witnessed=witnessed(entry)))


ClientIdOpt = Annotated[
    str | None,
    typer.Option(
        "--client-id",
        help="This node's order with this client order id (instead of ORDER_ID).",
        show_default=False,
    ),
]


def one_order(order_id: str | None, client_id: str | None) -> dict[str, str]:
    """The params naming one order: ORDER_ID or --client-id, exactly one (else exit 2)."""
    if (order_id is None) == (client_id is None):
        fail("name the order by ORDER_ID or by --client-id (one of them)", 2)
    if client_id is not None:
        return {"client_id": client_id}
    assert order_id is not None
    return {"order_id": order_id.lower()}


@app.command()
def cancel(
    ctx: typer.Context,
    order_id: Annotated[
        str | None,
        typer.Argument(help="Order id, or any prefix of it that is unique.", show_default=False),
    ] = None,
    client_id: ClientIdOpt = None,
    every: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Cancel every resting order of this node on the market, in one op (witnessed "
            "markets).",
        ),
    ] = False,
    prefix: Annotated[
        str | None,
        typer.Option(
            "--prefix",
            help="With --all: only the orders whose client id starts with this.",
            show_default=False,
        ),
    ] = None,
    market: MarketOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel one of this node's resting orders (by id or --client-id), or all of them (--all).

    Examples: crdtbook cancel 3fa2 ; crdtbook cancel --client-id grid-7 ;
    crdtbook cancel --all --prefix grid-

    A cancel is provisional until it is final, like an order: until the witnesses'
    heartbeats acknowledge it, an order of another node that sorts before it can still fill
    the order first (`crdtbook order ID` shows what happened); without witnesses it is never
    final.

    --json prints {"order": Order, "cancel_id": hex or null, "effective": bool, "final": bool}
    (effective: whether the cancel takes the order off the book in this node's order now, false
    when the order had already finished; final: the cancel can no longer change; cancel_id null
    when no cancel could change the order, so nothing was signed: it is finished and final, or
    this node cancelled it already); with --all, {"market",
    "cancel_id": hex, "prefix", "cancelled": int, "final": bool}.
    """
    from crdtbook.cli import render

    if every:
        if order_id is not None or client_id is not None:
            fail("--all cancels every resting order: give no ORDER_ID or --client-id with it", 2)
        with session(ctx, home) as node, signing_call(
            "the cancel-all may have taken effect", "`crdtbook orders --open` shows what rests"
        ):
            result = node.call("cancel_all", prefix=prefix, market=market)
        emit(result, as_json, render.cancel_all_result)
        return
    if prefix is not None:
        fail("--prefix goes with --all", 2)
    params = one_order(order_id, client_id)
    with session(ctx, home) as node:
        with signing_call(
            "the cancel may have taken effect", "`crdtbook order ORDER_ID` shows whether it did"
        ):
            result = node.call("cancel", market=market, **params)
        # Whether the market has witnesses: without them a cancel is never final either.
        entry = None if as_json else market_entry(node, (result.get("order") or {}).get("market"))
    emit(result, as_json, lambda r: render.cancel_result(r, witnessed=witnessed(entry)))


@app.command()
def amend(
    ctx: typer.Context,
    order_id: Annotated[
        str | None,
        typer.Argument(help="Order id, or any prefix of it that is unique.", show_default=False),
    ] = None,
    client_id: ClientIdOpt = None,
    price: Annotated[
        str | None, typer.Option("--price", help="The new price.", show_default=False)
    ] = None,
    quantity: Annotated[
        str | None,
        typer.Option(
            "--quantity",
            help="The new order's quantity (default: what is left).",
            show_default=False,
        ),
    ] = None,
    new_client_id: Annotated[
        str | None,
        typer.Option(
            "--new-client-id",
            help="Client id of the new order (witnessed markets; a client id is never reused).",
            show_default=False,
        ),
    ] = None,
    market: MarketOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel-replace one of this node's resting orders in one step: a cancel and a new order on
    the same side (new --price and/or --quantity), signed and sent together.

    Example: crdtbook amend 3fa2 --price 101 --quantity 2

    --json prints {"cancel_id": hex, "cancelled": Order, "effective": bool, "cancel_final":
    bool, "order": Order, "fills": [Fill], "final": bool, "self_trade_expired": [Order]}
    (cancel_final: the cancel's, as cancel's final; final: the new order's, as submit's).
    """
    from crdtbook.cli import render

    if price is None and quantity is None:
        fail("give --price, --quantity or both", 2)
    params = one_order(order_id, client_id)
    with session(ctx, home) as node:
        with signing_call(
            "the cancel and the new order may have been placed",
            "`crdtbook orders --open` shows what rests",
        ):
            result = node.call(
                "amend",
                market=market,
                price=price,
                quantity=quantity,
                new_client_id=new_client_id,
                **params,
            )
        # Whether the market has witnesses, from the market the new order went to (the
        # result says which): a market without them is never final, and says so once.
        entry = None if as_json else market_entry(node, (result.get("order") or {}).get("market"))
    emit(result, as_json, lambda r: render.amend_result(r, witnessed=witnessed(entry)))


@app.command()
def book(
    ctx: typer.Context,
    market: MarketOpt = None,
    depth: Annotated[int, typer.Option("--depth", "-d", min=1, help="Levels per side.")] = 10,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Redraw live on every change until Ctrl-C.")
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the order book as a depth ladder.

    Asks are above (highest at the top), bids below (best first); columns are price, size, and
    the cumulative size from the best price outward. Between them: spread and mid. Below: the
    short digest of the book state (equal digests = equal books on different nodes).

    --json prints the node's book result; with --watch, one JSON book per line on every change.
    """
    from crdtbook.cli import render

    if not watch:
        emit(call(ctx, home, "book", market=market, depth=depth), as_json, render.book_ladder)
        return
    with _sigterm_as_interrupt():
        _watch_book(ctx, home, market, depth, as_json)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends a long-running command as Ctrl-C does: cleanly, with its last output
    written. (Killed by default, ``book --watch`` into a pipe left nothing: rich draws the
    live view there only when it ends.)"""
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _watch_book(
    ctx: typer.Context, home: Path | None, market: str | None, depth: int, as_json: bool
) -> None:
    """Redraw the book on each ``watch`` event; Ctrl-C ends it with exit code 0.

    The watch stream is opened before the first snapshot so no change falls between them. If the
    node closes the stream (it stopped), that is an error (exit 1).
    """
    from rich.live import Live

    from crdtbook.cli import render

    recent: list[dict[str, Any]] = []
    with session(ctx, home) as node:
        resolved = node.home
        client = node.client
        name = None if market is None else node.market_name(market)
        events: Any = None
        try:
            events = client.watch(name)
            params = {"market": name, "depth": depth}
            snapshot = node.call("book", **params)
            if as_json:
                typer.echo(json.dumps(snapshot))
                for event in events:
                    if event.get("event") == "update":
                        typer.echo(json.dumps(node.call("book", **params)))
            else:
                first = render.book_ladder(snapshot)
                with Live(first, console=_console(), auto_refresh=False) as live:
                    for event in events:
                        if event.get("event") != "update":
                            continue
                        note = render.track_fills(recent, event)
                        snapshot = node.call("book", **params)
                        ladder = render.book_ladder(snapshot, fills=recent, note=note)
                        live.update(ladder, refresh=True)
        except KeyboardInterrupt:
            return
        finally:
            connect.close_client(events)
    fail(f"the node at {resolved} closed the watch stream (did it stop?)", 1)


@app.command()
def fills(
    ctx: typer.Context,
    market: MarketOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many, newest.")] = 20,
    mine: Annotated[
        bool, typer.Option("--mine", help="Only fills this node's orders took part in.")
    ] = False,
    start: Annotated[
        int | None,
        typer.Option(
            "--start",
            min=0,
            help="Page through all fills: the --limit fills from this index on (the first "
            "fill is 0) instead of the newest.",
            show_default=False,
        ),
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the last fills on a market, oldest first, with when this node received each (UTC).

    --json prints the node's result: {"market": str, "fills": [Fill], "witnessed": bool,
    "final_count": int, "fill_count": int}; each Fill has its index, received_ms and
    witnessed_ms (Unix ms; witnessed_ms null until final; both null for fills derived from
    history fetched after a join).
    """
    from crdtbook.cli import render

    if start is not None and mine:
        fail("--start pages through every fill; it does not combine with --mine", 2)
    result = call(
        ctx, home, "fills", market=market, limit=limit, mine=mine or None, start=start
    )
    # (The start asked, for an empty page past the end: "no fill from #N on", not "no fills".)
    emit(result, as_json, lambda r: render.fills_table({**r, "start": start}))


@app.command()
def orders(
    ctx: typer.Context,
    market: MarketOpt = None,
    everyone: Annotated[
        bool, typer.Option("--all", "-a", help="Every order on the market, not only this node's.")
    ] = False,
    only_open: Annotated[
        bool, typer.Option("--open", help="Only resting orders (open or partially filled).")
    ] = False,
    limit: Annotated[
        int | None,
        typer.Option("--limit", "-n", min=1, help="Only the newest N.", show_default=False),
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List this node's orders on a market (with --all, every order).

    Each order is marked final (its state can never change again) or provisional.

    Finished orders that compactions moved to the node's store are listed first (at most
    the newest 1,000 without --limit).

    --json prints the node's result: {"market": str, "orders": [Order], "more": bool}.
    """
    from crdtbook.cli import render

    with session(ctx, home) as node:
        result = node.call(
            "orders", market=market, all=everyone or None, open=only_open or None, limit=limit
        )
        entry = None if as_json else market_entry(node, result.get("market"))
    emit(
        result,
        as_json,
        lambda r: render.orders_table(r, everyone=everyone, witnessed=witnessed(entry)),
    )


@app.command()
def order(
    ctx: typer.Context,
    order_id: Annotated[
        str | None,
        typer.Argument(help="Order id, or any prefix of it that is unique.", show_default=False),
    ] = None,
    client_id: ClientIdOpt = None,
    market: MarketOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one order: price, quantity, filled, remaining, status, reason and whether that state
    is final (can never change again) or provisional.

    --json prints the node's Order object.
    """
    from crdtbook.cli import render

    params = one_order(order_id, client_id)
    with session(ctx, home) as node:
        result = node.call("order", market=market, **params)
        entry = None if as_json else market_entry(node, result.get("market"))
    emit(result, as_json, lambda r: render.order_detail(r, witnessed=witnessed(entry)))


@app.command("markets")
def markets_(ctx: typer.Context, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List the markets the node follows: tick, lot, whether it has witnesses (and how many in
    force), the finality frontier, and the market id.

    --json prints the node's markets result: [{"name", "id", "tick", "lot", "spec", "version",
    "witnessed", "witnesses", "frontier"}].
    """
    from crdtbook.cli import render

    emit(call(ctx, home, "markets"), as_json, render.markets_table)


@app.command()
def status(ctx: typer.Context, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show the node: identity, peers, and per-market replication and finality state.

    Prints the peer id, witness key, listen addresses, connected peers, the sync sessions this
    node pulled and served (and the ops its pulls brought that gossip had not), how busy its event
    loop is and whether it publishes batches early (it does while the loop has time to spare),
    and per market: ops, DAG
    heads, pending (ops waiting for missing parents), orders, fills, last sync and the state
    digest; then finality: final (everything acknowledged), pending (heartbeats due) or stalled
    (a witness silent while something waits: which one, and for how long), the frontier, the
    epoch, and every witness with its full key.

    --json prints the node's status result unchanged.
    """
    from crdtbook.cli import render

    result = call(ctx, home, "status")
    if as_json:
        emit(result, True, render.status_view)
    else:
        # soft wrap: peer ids, keys and multiaddrs come out whole, for copying, whatever the width
        _console().print(render.status_view(result), soft_wrap=True)


@app.command()
def token(ctx: typer.Context, home: HomeOpt = None) -> None:
    """Print the bearer token of the node's HTTP API (HOME/http.token, made when absent).

    Send it as `Authorization: Bearer TOKEN` with every trading or private request to a node
    started with --http (and in the WebSocket's {"op": "auth", "token": TOKEN}). Whoever has it
    can trade with the node's key: keep it like the key. To change it, delete the file and
    restart the node.
    """
    from crdtbook.node.http_auth import load_or_create_token

    resolved = _home(ctx, home)
    if not resolved.is_dir():
        fail(
            f"no node home at {resolved}: start a node there first (crdtbook node --http PORT)", 2
        )
    try:
        typer.echo(load_or_create_token(resolved))
    except (ValueError, OSError) as exc:
        fail(str(exc))


@app.command("id")
def id_(
    ctx: typer.Context,
    home: HomeOpt = None,
    init: Annotated[
        bool,
        typer.Option(
            "--init",
            help="With no node running and no key in the home yet, create the key a node "
            "started there will use (and the home), so its witness key can go into a market "
            "definition before it ever runs.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print the node's peer id, its witness key (the public key to name it by in `crdtbook
    market new --witness`) and the multiaddrs it listens on (to give to --bootstrap).

    With no node running, the peer id and key come from the home's key file (no multiaddrs);
    --init creates that file first if there is none.

    --json prints {"peer_id": str, "public_key": hex, "addrs": [str], "running": bool}.
    """
    from crdtbook.cli import render

    api = connect.client_api()
    resolved = _home(ctx, home)
    st: dict[str, Any] | None = None
    with node_errors(resolved):
        try:
            client = connect.open_client(resolved)
            try:
                try:
                    st = client.call("id")
                except api.ControlError as exc:
                    if getattr(exc, "code", None) != "unknown_method":
                        raise
                    st = client.call("status", digest=False)  # an older node: no `id` method
            finally:
                connect.close_client(client)
        except api.NodeNotRunning:
            st = None  # read the key from the home instead
    if st is None:
        result = _id_from_home(resolved, init)
    else:
        key = st.get("public_key") or st.get("author")
        if not key:  # an older node still: read the key from its home
            from crdtbook.cli import markets

            with suppress(markets.DefinitionError):
                key = markets.home_public_key(resolved)
        result = {
            "peer_id": st.get("peer_id"),
            "public_key": key,
            "addrs": st.get("addrs") or [],
            "running": True,
        }
    if as_json:
        emit(result, True, render.id_lines)
    else:
        # soft wrap: the long ids and keys come out whole, for copying, whatever the width
        _console().print(render.id_lines(result), soft_wrap=True)


def _id_from_home(home: Path, init: bool) -> dict[str, Any]:
    """``id``'s result with no node running: from the home's key file, created with ``init``
    (a note on stderr says which); exit 2 when there is no key and no ``init``."""
    from crdtbook.node.home import (
        IDENTITY_FILE,
        load_identity,
        load_or_create_identity,
        peer_id_of_public_key,
    )

    path = home / IDENTITY_FILE
    try:
        identity = load_identity(home)
        if identity is None and init:
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
            identity, _ = load_or_create_identity(home)
            note = f"created {path}: a node started with --home {home} will use this key"
        else:
            note = (
                f"no node is running at {home}: its key from {path} (no multiaddrs until it runs)"
            )
    except (ValueError, OSError) as exc:
        fail(f"cannot read or create the key {path}: {exc}", 1)
    if identity is None:
        fail(
            f"no node is running at {home} and it has no key yet ({path}); create one with: "
            f"crdtbook id --init --home {home}  (or start the node: crdtbook node --home {home})",
            2,
        )
    typer.echo(note, err=True)
    key = identity.public_key
    return {
        "peer_id": peer_id_of_public_key(key),
        "public_key": key.hex(),
        "addrs": [],
        "running": False,
    }


# ---------------------------------------------------------------- market definitions, witnesses

market_app = typer.Typer(
    name="market",
    help="Define markets: `crdtbook market new` prints the definition --market takes.",
    no_args_is_help=True,
)
app.add_typer(market_app)

reconfig_app = typer.Typer(
    name="reconfig",
    help="Change a witnessed market's witnesses: a majority of the witnesses in force approve "
    "(`reconfig approve` on each), then one node submits (`reconfig submit`).",
    no_args_is_help=True,
)
app.add_typer(reconfig_app)

WitnessOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--witness",
        "-w",
        help="A witness: its 64-hex public key (`crdtbook id` shows a node's) or its node home "
        "directory (repeatable).",
        show_default=False,
    ),
]
WitnessHomeOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--witness-home",
        help="A witness named by its node home: the key is read from DIR/identity.key "
        "(repeatable).",
        show_default=False,
        file_okay=False,
    ),
]


def witness_keys(keys: list[str] | None, homes: list[Path] | None) -> list[str]:
    """The hex keys named by ``--witness`` and ``--witness-home`` (exit 2 on a bad one)."""
    from crdtbook.cli import markets

    try:
        out = [markets.witness_key(k) for k in keys or []]
        out += [markets.home_public_key(h) for h in homes or []]
    except markets.DefinitionError as exc:
        fail(str(exc), 2)
    if not out:
        fail("name at least one witness: --witness KEY or --witness-home DIR", 2)
    dup = sorted({k for k in out if out.count(k) > 1})
    if dup:
        fail(f"witness {dup[0]} is named twice", 2)
    return out


@market_app.command("new")
def market_new(
    name: Annotated[str, typer.Argument(help="Market name, e.g. BTC-EUR (no ':', '/', spaces).")],
    tick: Annotated[str, typer.Argument(help="Price increment, a decimal (e.g. 0.01).")],
    lot: Annotated[str, typer.Argument(help="Quantity increment, a decimal (e.g. 0.0001).")],
    witness: WitnessOpt = None,
    witness_home: WitnessHomeOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Also write the definition to FILE (then pass --market @FILE).",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the definition of a witnessed market: the one string --market takes.

    Fills on a market with witnesses become final once the witnesses' heartbeats acknowledge them
    (a market without witnesses, like the built-in BTC-USD, never has final fills). Every node of
    the market must use the same definition: the market id covers name, tick, lot and witnesses.

    Example: crdtbook market new BTC-EUR 0.01 0.0001 --witness-home ~/n1 --witness-home ~/n2
    --witness-home ~/n3 --out btc-eur.market ; crdtbook node --market @btc-eur.market

    --json prints {"name", "tick", "lot", "id": hex, "version": int, "witnesses": [hex], "spec",
    "file": str | null}.
    """
    from crdtbook import Market

    keys = witness_keys(witness, witness_home)
    try:
        market = Market(name, tick, lot, witnesses=keys)
    except ValueError as exc:
        fail(str(exc), 2)
    if out is not None:
        try:
            out.expanduser().write_text(market.spec + "\n", encoding="utf-8")
        except OSError as exc:
            fail(f"cannot write {out}: {exc}")
    if as_json:
        result = {
            "name": market.name,
            "tick": market.tick,
            "lot": market.lot,
            "id": market.id.hex(),
            "version": market.version,
            "witnesses": [k.hex() for k in market.witnesses],
            "spec": market.spec,
            "file": None if out is None else str(out.expanduser()),
        }
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(market.spec)
    if out is not None:
        typer.echo(f"wrote {out}: use --market @{out}", err=True)


@reconfig_app.command("approve")
def reconfig_approve(
    ctx: typer.Context,
    witness: WitnessOpt = None,
    witness_home: WitnessHomeOpt = None,
    market: MarketOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign this node's approval of a new witness set (this node must be a witness in force).

    Give the whole new set with --witness (keep the witnesses that stay, leave out the ones to
    remove, add new ones). Prints the approval token KEY:SIGNATURE on one line: hand it to the
    node that runs `crdtbook reconfig submit`.

    --json prints the node's result: {"witness": hex, "signature": hex, "epoch": int}.
    """
    keys = witness_keys(witness, witness_home)
    result = call(ctx, home, "approve_reconfig", market=market, witnesses=keys)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(f"{result['witness']}:{result['signature']}")


@reconfig_app.command("submit")
def reconfig_submit(
    ctx: typer.Context,
    approval: Annotated[
        list[str] | None,
        typer.Option(
            "--approval",
            "-a",
            help="An approval token KEY:SIGNATURE from `crdtbook reconfig approve` (repeatable; "
            "a majority of the witnesses in force is needed).",
            show_default=False,
        ),
    ] = None,
    witness: WitnessOpt = None,
    witness_home: WitnessHomeOpt = None,
    market: MarketOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace the witness set with the one given (--witness, the same set the approvals sign).

    Prints the new epoch and the id of the reconfiguration op. A witness that is gone for good
    stalls finality until it is removed this way.

    --json prints the node's result: {"op": hex, "epoch": int}.
    """
    from crdtbook.cli import markets

    keys = witness_keys(witness, witness_home)
    if not approval:
        fail("give the approvals: --approval KEY:SIGNATURE (from crdtbook reconfig approve)", 2)
    try:
        pairs = [markets.parse_approval(token) for token in approval]
    except markets.DefinitionError as exc:
        fail(str(exc), 2)
    approvals = [{"witness": k, "signature": sig} for k, sig in pairs]
    result = call(ctx, home, "reconfigure", market=market, witnesses=keys, approvals=approvals)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"epoch {result.get('epoch')}: {len(keys)} witnesses in force")
    typer.echo(f"reconfiguration op {result.get('op')}")


@app.command()
def demo(
    nodes: Annotated[
        int, typer.Option("--nodes", "-n", min=2, max=9, help="How many local nodes.")
    ] = 3,
    keep_running: Annotated[
        bool,
        typer.Option(
            "--keep-running/--no-keep-running",
            help="After the demo, keep the nodes up (and print their homes) until Ctrl-C.",
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for each phase.", min=1.0)
    ] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Run a local N-node network, trade on it concurrently, check every book agrees and every
    fill turns final.

    Nodes listen on 127.0.0.1 (free ports), each with its own temporary home and key; the DEMO
    market names every node as a witness. Nodes 2..N join through node 1. The script places a
    resting ladder, then at the same moment sends crossing orders and a cancel to different nodes;
    it waits until all digests agree, then until every node reports every fill final, and shows
    each node's book, fills (marked final) and digest side by side. Every node is stopped and the
    temporary homes are removed before it exits (also on Ctrl-C).

    Exit 0 when all nodes agree and every fill is final on every node, 1 otherwise.

    --json prints a summary (shape in specs/control-api.md, "CLI --json shapes").
    """
    from crdtbook.cli.demo import run_demo

    code = run_demo(nodes=nodes, keep_running=keep_running, timeout=timeout, as_json=as_json)
    raise typer.Exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point.

    Runs the app in non-standalone mode so that usage errors, like every other error, come out
    as one line on stderr (``error: ... (see: crdtbook submit --help)``, exit code 2).
    """
    try:
        rv = app(args=argv, prog_name="crdtbook", standalone_mode=False)
    except typer.Abort:
        sys.exit(1)
    except typer.TyperException as exc:  # click's ClickException / UsageError
        if type(exc).__name__ == "NoArgsIsHelpError":
            app(args=["--help"], prog_name="crdtbook")  # prints the help and exits 0
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        format_message = getattr(exc, "format_message", None)
        message = format_message() if callable(format_message) else str(exc)
        typer.echo(f"error: {' '.join(str(message).split())}{hint}", err=True)
        sys.exit(int(getattr(exc, "exit_code", 2)))
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
