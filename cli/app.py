"""The ``crdtbook`` command line: parse, call the node's control API, render.

Talking to a node goes through :mod:`crdtbook.cli.connect` (the blocking ``ControlClient``);
drawing goes through :mod:`crdtbook.cli.render`. Nothing heavy (libp2p, trio) is imported at
module level, so ``crdtbook --help`` and every client command start fast.

Exit codes: 0 success; 1 the node answered with an error (one line on stderr, with its code);
2 no node is running at the chosen home (or a usage error); 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from crdtbook.cli import connect

HELP = """\
crdtbook: a peer-to-peer exchange order book.

Run a node with `crdtbook node`, then use the other commands to trade and inspect it. They talk to
the node over its local control socket (HOME/control.sock); pick the node with --home DIR or
$CRDTBOOK_HOME (default ~/.crdtbook). Try `crdtbook demo` for a 3-node network on this machine.

Every read command takes --json; the shapes are in specs/control-api.md ("CLI --json shapes").

Exit codes: 0 ok, 1 the node refused (reason on stderr), 2 no node running / usage error.
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


class Side(StrEnum):
    """Order side."""

    buy = "buy"
    sell = "sell"


class Tif(StrEnum):
    """Time in force, as typed on the command line (``post-only`` maps to ``post_only``)."""

    gtc = "gtc"
    ioc = "ioc"
    fok = "fok"
    post_only = "post-only"

    @property
    def api(self) -> str:
        """The control-API spelling."""
        return self.value.replace("-", "_")


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
        help="Market name; may be omitted when the node follows exactly one market.",
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


def call(ctx: typer.Context, home: Path | None, method: str, **params: Any) -> Any:
    """Call one control method on the chosen node, exiting cleanly on any error."""
    resolved = _home(ctx, home)
    with node_errors(resolved):
        client = connect.open_client(resolved)
        try:
            return client.call(method, **{k: v for k, v in params.items() if v is not None})
        finally:
            connect.close_client(client)


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
            help="Market to follow: NAME of a built-in market (BTC-USD, ETH-USD, SOL-USD, DEMO) "
            "or NAME:TICK:LOT (repeatable) [default: the node's default market].",
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
) -> None:
    """Run a node in the foreground until Ctrl-C (SIGINT) or SIGTERM.

    It serves the control API on HOME/control.sock, so the other commands (in another terminal)
    can trade through it.

    Example: crdtbook node --listen /ip4/0.0.0.0/tcp/4001 --market DEMO:1:1 -v
    """
    resolved = _home(ctx, home)
    try:
        from crdtbook.node.app import NodeConfig, run_node
    except ImportError as exc:
        fail(f"the node is not available in this install ({exc})")
    config = NodeConfig(
        home=resolved,
        listen=list(listen or [DEFAULT_LISTEN]),
        bootstrap=list(bootstrap or []),
        markets=list(market or []),
        verbose=verbose,
        fsync=fsync,
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
    ] = Tif.gtc,
    tag: Annotated[
        str | None, typer.Option("--tag", help="Free-form label kept with the order.")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a limit order and show at once what happened to it.

    Examples: crdtbook submit buy 5 100 ; crdtbook submit sell 5@100 --tif ioc

    Prints the order id, then whether it filled (with each fill), partially filled, is resting on
    the book, expired, or was rejected (with the reason). Quantities and prices are decimal strings
    in the market's units; the node checks them against the tick and lot.

    --json prints the node's result: {"order": Order, "fills": [Fill]}.
    """
    from crdtbook.cli import render

    qty, px = split_qty_price(quantity, price)
    result = call(
        ctx,
        home,
        "submit",
        market=market,
        side=side.value,
        price=px,
        quantity=qty,
        tif=tif.api,
        tag=tag,
    )
    emit(result, as_json, render.submit_result)


@app.command()
def cancel(
    ctx: typer.Context,
    order_id: Annotated[str, typer.Argument(help="Order id, or any prefix of it that is unique.")],
    market: MarketOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel one of this node's resting orders.

    --json prints {"order": Order, "cancel_id": hex, "effective": bool} (effective is false when
    the order had already finished).
    """
    from crdtbook.cli import render

    result = call(ctx, home, "cancel", order_id=order_id.lower(), market=market)
    emit(result, as_json, render.cancel_result)


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
    _watch_book(ctx, home, market, depth, as_json)


def _watch_book(
    ctx: typer.Context, home: Path | None, market: str | None, depth: int, as_json: bool
) -> None:
    """Redraw the book on each ``watch`` event; Ctrl-C ends it with exit code 0.

    The watch stream is opened before the first snapshot so no change falls between them. If the
    node closes the stream (it stopped), that is an error (exit 1).
    """
    from rich.live import Live

    from crdtbook.cli import render

    resolved = _home(ctx, home)
    recent: list[dict[str, Any]] = []
    with node_errors(resolved):
        client = connect.open_client(resolved)
        events: Any = None
        try:
            events = client.watch(market)
            params = {"market": market, "depth": depth}
            snapshot = client.call("book", **params)
            if as_json:
                typer.echo(json.dumps(snapshot))
                for event in events:
                    if event.get("event") == "update":
                        typer.echo(json.dumps(client.call("book", **params)))
            else:
                first = render.book_ladder(snapshot)
                with Live(first, console=_console(), auto_refresh=False) as live:
                    for event in events:
                        if event.get("event") != "update":
                            continue
                        recent.extend(event.get("fills") or [])
                        del recent[:-5]
                        snapshot = client.call("book", **params)
                        live.update(render.book_ladder(snapshot, fills=recent), refresh=True)
        except KeyboardInterrupt:
            return
        finally:
            connect.close_client(events)
            connect.close_client(client)
    fail(f"the node at {resolved} closed the watch stream (did it stop?)", 1)


@app.command()
def fills(
    ctx: typer.Context,
    market: MarketOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many, newest.")] = 20,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the last fills on a market, oldest first.

    --json prints the node's result: {"market": str, "fills": [Fill]}.
    """
    from crdtbook.cli import render

    emit(call(ctx, home, "fills", market=market, limit=limit), as_json, render.fills_table)


@app.command()
def orders(
    ctx: typer.Context,
    market: MarketOpt = None,
    everyone: Annotated[
        bool, typer.Option("--all", "-a", help="Every order on the market, not only this node's.")
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List this node's orders on a market (with --all, every order).

    --json prints the node's result: {"market": str, "orders": [Order]}.
    """
    from crdtbook.cli import render

    result = call(ctx, home, "orders", market=market, all=everyone or None)
    emit(result, as_json, lambda r: render.orders_table(r, everyone=everyone))


@app.command()
def order(
    ctx: typer.Context,
    order_id: Annotated[str, typer.Argument(help="Order id, or any prefix of it that is unique.")],
    market: MarketOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one order: price, quantity, filled, remaining, status and reason.

    --json prints the node's Order object.
    """
    from crdtbook.cli import render

    result = call(ctx, home, "order", order_id=order_id.lower(), market=market)
    emit(result, as_json, render.order_detail)


@app.command()
def status(ctx: typer.Context, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Show the node: identity, peers, and per-market replication state.

    Prints the peer id, listen addresses, connected peers, and per market: ops, DAG heads,
    pending (ops waiting for missing parents), orders, fills, last sync and the state digest.

    --json prints the node's status result unchanged.
    """
    from crdtbook.cli import render

    emit(call(ctx, home, "status"), as_json, render.status_view)


@app.command("id")
def id_(ctx: typer.Context, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Print the node's peer id and the multiaddrs it listens on (to give to --bootstrap).

    --json prints {"peer_id": str, "addrs": [str]}.
    """
    from crdtbook.cli import render

    st = call(ctx, home, "status")
    emit({"peer_id": st.get("peer_id"), "addrs": st.get("addrs") or []}, as_json, render.id_lines)


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
    """Run a local N-node network, trade on it concurrently, check every book agrees.

    Nodes listen on 127.0.0.1 (free ports), each with its own temporary home; nodes 2..N join
    through node 1. The script places a resting ladder, then at the same moment sends crossing
    orders and a cancel to different nodes; it waits until all digests agree and shows each node's
    book, fills and digest side by side. Every node is stopped and the temporary homes are removed
    before it exits (also on Ctrl-C).

    Exit 0 when all nodes agree, 1 otherwise.

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
