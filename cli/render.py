"""Rich rendering of control-API results for people (``--json`` bypasses all of this).

Every function takes plain dicts shaped as in specs/control-api.md and returns a rich renderable (or
a list of lines); none of them talks to a node.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

Json = dict[str, Any]

#: How a finished order's ``reason`` is explained to a person.
REASONS: dict[str, str] = {
    "cancelled": "cancelled by its owner",
    "ioc_remainder": "immediate-or-cancel: the part that did not fill at once was dropped",
    "fok_unfillable": "fill-or-kill: the book could not fill it in full, nothing traded",
    "post_only_would_take": "post-only: it would have taken liquidity, so it was not placed",
    "self_trade": "self-trade prevention: it met an order from the same author",
}

STATUS_STYLE: dict[str, str] = {
    "open": "cyan",
    "partially_filled": "yellow",
    "filled": "green",
    "cancelled": "dim",
    "expired": "magenta",
    "rejected": "red",
}


def short(hex_id: str | None, n: int = 12) -> str:
    """The first ``n`` hex digits of an id (or ``-``)."""
    if not hex_id:
        return "-"
    return hex_id[:n]


def _dec_sum(values: Sequence[str]) -> str:
    """Sum decimal strings exactly; fall back to ``?`` if one does not parse."""
    try:
        total = sum((Decimal(v) for v in values), Decimal(0))
    except InvalidOperation:
        return "?"
    return format(total, "f")


def ago(ts: float | None, now: float | None = None) -> str:
    """``3s ago`` style age of a Unix time, or ``never``."""
    if ts is None:
        return "never"
    delta = max(0.0, (time.time() if now is None else now) - ts)
    return f"{duration(delta)} ago"


def duration(seconds: float) -> str:
    """A short human duration: ``4s``, ``2m 05s``, ``1h 02m``."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {(s % 3600) // 60:02d}m"


def status_text(status: str) -> Text:
    """An order status, coloured."""
    return Text(status.replace("_", " "), style=STATUS_STYLE.get(status, ""))


# ---------------------------------------------------------------------------------------- submit


def _fill_lines(fills: Sequence[Json], indent: str = "  ") -> list[Text]:
    lines = []
    for f in fills:
        line = Text(indent)
        line.append("fill ", style="green")
        line.append(f"{f['quantity']} @ {f['price']}", style="bold")
        line.append(f"  maker {short(f.get('maker'))}  #{f.get('index', '?')}", style="dim")
        lines.append(line)
    return lines


def submit_result(result: Json) -> RenderableType:
    """What happened to a submitted order, at once: id, outcome, and the fills it took."""
    order: Json = result["order"]
    fills: list[Json] = list(result.get("fills") or [])
    status = order.get("status", "?")
    side = order.get("side", "?")
    verb = "bought" if side == "buy" else "sold"
    head = Text()
    head.append("order ", style="dim")
    head.append(order.get("id", "?"), style="bold")
    desc = Text(
        f"{side} {order.get('quantity')} @ {order.get('price')} on {order.get('market')}"
        f" ({str(order.get('tif', 'gtc')).replace('_', '-')})"
    )
    if order.get("tag"):
        desc.append(f" tag {order['tag']}", style="dim")
    outcome = Text()
    n_fills = f"{len(fills)} fill" + ("" if len(fills) == 1 else "s")
    traded = _dec_sum([f["quantity"] for f in fills]) if fills else order.get("filled", "0")
    if status == "filled":
        outcome.append("filled: ", style="bold green")
        outcome.append(f"{verb} {traded} in {n_fills}")
    elif status == "partially_filled":
        outcome.append("partially filled: ", style="bold yellow")
        outcome.append(
            f"{verb} {traded} of {order.get('quantity')} in {n_fills}; "
            f"{order.get('remaining')} resting at {order.get('price')}"
        )
    elif status == "open":
        outcome.append("resting: ", style="bold cyan")
        outcome.append(f"{order.get('remaining')} @ {order.get('price')} is on the book")
    else:
        style = f"bold {STATUS_STYLE.get(status, '')}"
        outcome.append(f"{status.replace('_', ' ')}: ", style=style)
        reason = order.get("reason")
        outcome.append(REASONS.get(reason or "", reason or "no reason given"))
        if fills:
            outcome.append(f" ({verb} {traded} of {order.get('quantity')} first)")
    return Group(head, desc, outcome, *_fill_lines(fills))


def cancel_result(result: Json) -> RenderableType:
    """The outcome of a cancel."""
    order: Json = result["order"]
    text = Text()
    if result.get("effective"):
        text.append("cancelled ", style="bold")
        text.append(order.get("id", "?"))
        try:
            unfilled = format(Decimal(order["quantity"]) - Decimal(order["filled"]), "f")
        except (KeyError, InvalidOperation):
            unfilled = "?"
        text.append(
            f"\n{order.get('side')} {order.get('quantity')} @ {order.get('price')} on "
            f"{order.get('market')}: {order.get('filled')} had filled, {unfilled} no longer rests"
        )
    else:
        text.append("nothing to cancel: ", style="bold yellow")
        text.append(f"order {order.get('id', '?')} is already ")
        text.append_text(status_text(order.get("status", "?")))
    text.append(f"\ncancel op {short(result.get('cancel_id'))}", style="dim")
    return text


# ------------------------------------------------------------------------------------------ book


def _cumulative(levels: Sequence[Json]) -> list[str]:
    out: list[str] = []
    running: list[str] = []
    for lvl in levels:
        running.append(lvl["quantity"])
        out.append(_dec_sum(running))
    return out


def book_ladder(book: Json, title: str | None = None, fills: Sequence[Json] = ()) -> Panel:
    """:func:`book_body` in a panel titled with the market."""
    return Panel(
        book_body(book, fills),
        title=title or str(book.get("market", "")),
        expand=False,
    )


def book_body(book: Json, fills: Sequence[Json] = (), digest: bool = True) -> Group:
    """A depth ladder: asks above (highest price at the top), spread/mid, bids below, digest.

    Columns are price, size, and cumulative size counted from the best price outward. ``fills``
    (the latest few) are listed underneath when given.
    """
    asks: list[Json] = list(book.get("asks") or [])
    bids: list[Json] = list(book.get("bids") or [])
    ask_cum = _cumulative(asks)
    bid_cum = _cumulative(bids)
    ask_rows = [(a["price"], a["quantity"], c) for a, c in zip(asks, ask_cum, strict=True)]
    bid_rows = [(b["price"], b["quantity"], c) for b, c in zip(bids, bid_cum, strict=True)]
    ask_rows.reverse()  # highest ask on top, best ask just above the spread line
    rows = ask_rows + bid_rows
    w_price = max([len("price"), *(len(r[0]) for r in rows)])
    w_size = max([len("size"), *(len(r[1]) for r in rows)])
    w_cum = max([len("total"), *(len(r[2]) for r in rows)])

    def table(header: bool) -> Table:
        t = Table(box=None, show_header=header, pad_edge=False, padding=(0, 1))
        t.add_column("price", justify="right", width=w_price)
        t.add_column("size", justify="right", width=w_size)
        t.add_column("total", justify="right", width=w_cum, style="dim")
        return t

    ask_t = table(True)
    for price, qty, cum in ask_rows:
        ask_t.add_row(Text(price, style="red"), qty, cum)
    bid_t = table(False)
    for price, qty, cum in bid_rows:
        bid_t.add_row(Text(price, style="green"), qty, cum)

    if book.get("spread") is not None:
        mid = Text(f"spread {book['spread']}  mid {book['mid']}", style="yellow")
    elif not asks and not bids:
        mid = Text("(empty book)", style="dim")
    else:
        mid = Text("(one-sided: no " + ("asks" if not asks else "bids") + ")", style="dim")
    width = w_price + w_size + w_cum + 4
    mid.align("center", max(width, len(mid.plain)))
    parts: list[RenderableType] = [ask_t, mid, bid_t]
    if digest:
        parts.append(Text(f"digest {short(book.get('digest'))}", style="dim"))
    if fills:
        parts.append(Text("last fills", style="bold"))
        for f in list(fills)[-5:]:
            parts.append(
                Text(f"{f.get('taker_side', '?'):>4} {f['quantity']} @ {f['price']}", style="dim")
            )
    return Group(*parts)


# ----------------------------------------------------------------------------- fills and orders


def fills_table(data: Json) -> RenderableType:
    """A table of fills, oldest first."""
    fills: list[Json] = list(data.get("fills") or [])
    if not fills:
        return Text(f"no fills yet on {data.get('market', '?')}", style="dim")
    t = Table(title=f"fills on {data.get('market', '?')}", title_justify="left")
    t.add_column("#", justify="right", style="dim")
    t.add_column("taker", justify="left")
    t.add_column("qty", justify="right")
    t.add_column("price", justify="right")
    t.add_column("taker id", style="dim")
    t.add_column("maker id", style="dim")
    for f in fills:
        side = f.get("taker_side", "?")
        t.add_row(
            str(f.get("index", "")),
            Text(side, style="green" if side == "buy" else "red"),
            f["quantity"],
            f["price"],
            short(f.get("taker")),
            short(f.get("maker")),
        )
    return t


def orders_table(data: Json, everyone: bool = False) -> RenderableType:
    """A table of orders (this node's, or every order with ``--all``)."""
    orders: list[Json] = list(data.get("orders") or [])
    market = data.get("market", "?")
    if not orders:
        return Text(f"no {'' if everyone else 'own '}orders on {market}", style="dim")
    t = Table(title=f"{'all' if everyone else 'my'} orders on {market}", title_justify="left")
    t.add_column("id", style="bold")
    t.add_column("side")
    t.add_column("qty", justify="right")
    t.add_column("price", justify="right")
    t.add_column("filled", justify="right")
    t.add_column("left", justify="right")
    t.add_column("tif")
    t.add_column("status")
    t.add_column("tag", style="dim")
    if everyone:
        t.add_column("mine")
    for o in orders:
        row: list[RenderableType] = [
            short(o.get("id")),
            Text(o.get("side", "?"), style="green" if o.get("side") == "buy" else "red"),
            o.get("quantity", "?"),
            o.get("price", "?"),
            o.get("filled", "?"),
            o.get("remaining", "?"),
            str(o.get("tif", "?")).replace("_", "-"),
            status_text(o.get("status", "?")),
            o.get("tag") or "",
        ]
        if everyone:
            row.append("yes" if o.get("mine") else "")
        t.add_row(*row)
    return t


def order_detail(order: Json) -> RenderableType:
    """Every field of one order, one per line."""
    t = Table(box=None, show_header=False, padding=(0, 1))
    t.add_column(style="bold")
    t.add_column()
    t.add_row("id", order.get("id", "?"))
    t.add_row("market", str(order.get("market")))
    t.add_row("author", str(order.get("author")) + ("  (this node)" if order.get("mine") else ""))
    t.add_row("side", str(order.get("side")))
    t.add_row("price", f"{order.get('price')}  ({order.get('price_ticks')} ticks)")
    t.add_row("quantity", f"{order.get('quantity')}  ({order.get('quantity_lots')} lots)")
    t.add_row("filled", str(order.get("filled")))
    t.add_row("remaining", str(order.get("remaining")))
    t.add_row("tif", str(order.get("tif")).replace("_", "-"))
    st = status_text(order.get("status", "?"))
    if order.get("reason"):
        st.append(f"  ({REASONS.get(order['reason'], order['reason'])})", style="dim")
    t.add_row("status", st)
    t.add_row("tag", str(order.get("tag") or "-"))
    t.add_row("lamport", str(order.get("lamport")))
    return t


# ------------------------------------------------------------------------------- status and id


def id_lines(status: Json) -> RenderableType:
    """The node's peer id and the multiaddrs it listens on."""
    text = Text()
    text.append("peer id ", style="bold")
    text.append(str(status.get("peer_id")))
    for addr in status.get("addrs") or []:
        text.append("\n  " + addr)
    return text


def status_view(status: Json, now: float | None = None) -> RenderableType:
    """The node's identity, its peers, and per-market replication state."""
    head = Table(box=None, show_header=False, padding=(0, 1))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("peer id", str(status.get("peer_id")))
    head.add_row("addrs", "\n".join(status.get("addrs") or []) or "-")
    peers: list[Json] = list(status.get("peers") or [])
    peer_lines = [
        f"{p.get('peer_id')}" + (f"  {p['addrs'][0]}" if p.get("addrs") else "") for p in peers
    ]
    head.add_row("peers", f"{len(peers)}" + ("\n" + "\n".join(peer_lines) if peers else ""))
    extra = []
    if status.get("uptime") is not None:
        extra.append(f"uptime {duration(float(status['uptime']))}")
    if status.get("pid") is not None:
        extra.append(f"pid {status['pid']}")
    if status.get("version"):
        extra.append(f"version {status['version']}")
    if extra:
        head.add_row("node", "  ".join(extra))

    markets = Table(title="markets", title_justify="left")
    for col, just in [
        ("market", "left"),
        ("tick", "right"),
        ("lot", "right"),
        ("ops", "right"),
        ("heads", "left"),
        ("pending", "right"),
        ("orders", "right"),
        ("fills", "right"),
        ("last sync", "right"),
        ("digest", "left"),
    ]:
        markets.add_column(col, justify=just)  # type: ignore[arg-type]
    for m in status.get("markets") or []:
        heads: list[str] = list(m.get("heads") or [])
        heads_s = str(len(heads)) + (
            f" ({short(heads[0], 8)}{', …' if len(heads) > 1 else ''})" if heads else ""
        )
        pending = int(m.get("pending") or 0)
        markets.add_row(
            str(m.get("name")),
            str(m.get("tick")),
            str(m.get("lot")),
            str(m.get("ops")),
            heads_s,
            Text(str(pending), style="yellow" if pending else ""),
            str(m.get("orders", "")),
            str(m.get("fills", "")),
            ago(m.get("last_sync"), now),
            short(m.get("digest")),
        )
    return Group(head, markets)
