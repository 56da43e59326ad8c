"""Rich rendering of control-API results for people (``--json`` bypasses all of this).

Every function takes plain dicts shaped as in specs/control-api.md and returns a rich renderable (or
a list of lines); none of them talks to a node.

Text that another party chose (an order's tag, set by whoever placed the order; a peer's
addresses) goes through :func:`printable` (inside ``Text``) or :func:`inert` (where rich reads
markup, e.g. a table cell given as ``str``): it shows as the characters it is, never as rich
markup or terminal escape sequences.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.markup import escape
from rich.measure import Measurement
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
    "duplicate_client_id": "its client order id was already used by an earlier order of this key",
}

STATUS_STYLE: dict[str, str] = {
    "open": "cyan",
    "partially_filled": "yellow",
    "filled": "green",
    "cancelled": "dim",
    "expired": "magenta",
    "rejected": "red",
}


#: Characters a terminal acts on instead of showing: C0/C1 controls and DEL (ESC starts escape
#: sequences), format characters (bidi overrides can reorder what is shown), line and
#: paragraph separators, and lone surrogates (which cannot even be printed).
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def printable(value: object) -> str:
    """``value`` as text that shows as what it is: every control or format character becomes
    its escape (``\\x1b``, ``\\u202e``, ``\\U000e0001``); everything else is kept."""
    text = str(value)
    if text.isascii() and text.isprintable():
        return text
    return "".join(_escaped(c) if unicodedata.category(c) in _UNPRINTABLE else c for c in text)


def _escaped(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def inert(value: object) -> str:
    """:func:`printable`, with rich markup escaped: for strings that rich parses as markup."""
    return escape(printable(value))


def short(hex_id: str | None, n: int = 12) -> str:
    """The first ``n`` hex digits of an id (or ``-``)."""
    if not hex_id:
        return "-"
    return hex_id[:n]


def _unfilled(order: Json) -> str:
    """What of an order had not filled (quantity less filled): what a cancel or an expiry took
    off the book. (Its ``remaining`` is 0 once it ended.)"""
    try:
        return format(Decimal(order["quantity"]) - Decimal(order["filled"]), "f")
    except (KeyError, TypeError, InvalidOperation):
        return "?"


def _dec_sum(values: Sequence[str]) -> str:
    """Sum decimal strings exactly; fall back to ``?`` if one does not parse."""
    try:
        total = sum((Decimal(v) for v in values), Decimal(0))
    except InvalidOperation:
        return "?"
    return format(total, "f")


def iso_ms(ms: object) -> str:
    """Unix milliseconds as ISO 8601 UTC (``2026-12-02T07:41:06.123Z``); ``-`` when unknown."""
    from datetime import UTC, datetime

    if not isinstance(ms, int) or isinstance(ms, bool):
        return "-"
    try:
        moment = datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return "-"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


# -------------------------------------------------------------------------------------- finality

FINAL = "final"
PROVISIONAL = "provisional"
#: How each finality state of a market (``status``) reads, and its colour.
FINALITY_TEXT: dict[str, tuple[str, str]] = {
    "final": ("final", "green"),
    "pending": ("pending", "yellow"),
    "stalled": ("stalled", "bold red"),
    "none": ("never final", "dim"),
}


def finality_mark(final: object) -> Text:
    """``final`` (green) or ``provisional`` (yellow) for a fill, order or level; empty when the
    node did not say (an older node)."""
    if final is True:
        return Text(FINAL, style="green")
    if final is False:
        return Text(PROVISIONAL, style="yellow")
    return Text("")


def never_final(market: object) -> Text:
    """The plain statement for a market without witnesses."""
    return Text(f"fills here are never final: {market} has no witnesses", style="yellow")


def track_fills(recent: list[Json], event: Json, keep: int = 5) -> str:
    """Keep ``recent`` (the last fills a live view shows) true to a ``watch`` event: drop the
    fills it revokes, add its new ones, mark those that became final. Returns a note for the
    view ("" when nothing was revoked), so fill numbers never shift silently."""
    revoked = list(event.get("revoked") or [])
    gone = {f.get("index") for f in revoked}
    recent[:] = [f for f in recent if f.get("index") not in gone]
    recent.extend(dict(f) for f in event.get("fills") or [])
    became = set(event.get("became_final") or [])
    for f in recent:
        if f.get("index") in became:
            f["final"] = True
    del recent[:-keep]
    if not revoked:
        return ""
    n = len(revoked)
    return (
        f"{n} provisional fill{'' if n == 1 else 's'} revoked "
        f"(#{', #'.join(str(f.get('index')) for f in revoked)}): an order that sorts earlier "
        "changed the matching"
    )


# ---------------------------------------------------------------------------------------- submit


def _fill_lines(fills: Sequence[Json], indent: str = "  ", marks: bool = True) -> list[Text]:
    lines = []
    for f in fills:
        line = Text(indent)
        line.append("fill ", style="green")
        line.append(f"{f['quantity']} @ {f['price']}", style="bold")
        line.append(f"  maker {short(f.get('maker'))}  #{f.get('index', '?')}", style="dim")
        if marks and "final" in f:
            line.append("  ")
            line.append_text(finality_mark(f["final"]))
        lines.append(line)
    return lines


def submit_result(result: Json, witnessed: bool | None = None) -> RenderableType:
    """What happened to a submitted order, at once: id, outcome (marked final or provisional),
    and the fills it took. ``witnessed`` False says plainly that this market's fills are never
    final (None: not known)."""
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
        desc.append(f" tag {printable(order['tag'])}", style="dim")
    outcome = Text()
    final = result.get("final", order.get("final"))
    # With --wait-final, `final` says the order's op is final: its place and what it took. A
    # resting order can still be filled or cancelled, so its own state is not.
    placed_only = final is True and status in ("open", "partially_filled")
    if placed_only:
        outcome.append("placed for good, ", style="bold green")
        outcome.append("still live: ", style="bold yellow")
    elif final is True:
        outcome.append("final: ", style="bold green")
    elif final is False and witnessed is not False:  # (else: "never final" is said below)
        outcome.append("provisional: ", style="bold yellow")
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
    protection = result.get("market_order")
    if isinstance(protection, dict):
        desc.append(
            f" market order: best {protection.get('reference')}, band "
            f"{protection.get('band_pct')}%, limit {protection.get('limit')}",
            style="dim",
        )
    parts: list[RenderableType] = [
        head,
        desc,
        outcome,
        *_fill_lines(fills, marks=witnessed is not False),
        *_self_trade_lines(result.get("self_trade_expired") or [], order.get("id")),
    ]
    if witnessed is False:
        parts.append(never_final(order.get("market")))
    elif placed_only:
        parts.append(
            Text(
                "its place and the fills above are final; resting, it can still be filled or "
                "cancelled, and those fills are provisional until final (crdtbook order shows it)",
                style="dim",
            )
        )
    elif final is False:
        parts.append(
            Text(
                "not final yet: an order that sorts earlier can still change this until the "
                "witnesses' heartbeats acknowledge it (submit --wait-final waits for that)",
                style="dim",
            )
        )
    return Group(*parts)


def _cancel_mark(final: object, witnessed: bool | None) -> Text:
    """``final: `` or ``provisional: `` before what a cancel did, as ``submit`` marks an order's
    outcome (nothing when the node did not say, or in a market without witnesses, which says
    "never final" once instead)."""
    if final is True:
        return Text("final: ", style="bold green")
    if final is False and witnessed is not False:
        return Text("provisional: ", style="bold yellow")
    return Text()


#: Under a cancel that is not final yet (witnessed markets).
CANCEL_NOT_FINAL = (
    "not final yet: an order that sorts before the cancel can still fill this order first, "
    "until the witnesses' heartbeats acknowledge the cancel (`crdtbook order` shows the outcome)"
)


def amend_result(result: Json, witnessed: bool | None = None) -> RenderableType:
    """The outcome of a cancel-replace: the cancel, then the new order as ``submit`` shows it
    (``witnessed`` as there)."""
    old: Json = result.get("cancelled") or {}
    head = _cancel_mark(result.get("cancel_final"), witnessed)
    if result.get("effective"):
        head.append("cancelled ", style="bold")
        head.append(str(old.get("id", "?")))
        head.append(f" ({old.get('filled')} had filled)", style="dim")
    else:
        head.append("nothing to cancel: ", style="bold yellow")
        head.append(f"order {old.get('id', '?')} had already finished")
    head.append(f"\ncancel op {result.get('cancel_id')}", style="dim")
    parts: list[RenderableType] = [head]
    if result.get("cancel_final") is False and witnessed is not False:
        parts.append(Text(CANCEL_NOT_FINAL, style="dim"))
    return Group(*parts, Text("replaced by:", style="dim"), submit_result(result, witnessed))


def _self_trade_lines(expired: Sequence[Json], taker_id: object) -> list[Text]:
    """One line per order self-trade prevention expired as the submitted order matched."""
    lines = []
    for o in expired:
        line = Text("  ")
        line.append("expired by self-trade prevention: ", style="magenta")
        if o.get("id") == taker_id:
            line.append("this order itself (it met a resting order of this node)")
        else:
            line.append(f"own {o.get('side')} order {o.get('id')} ")
            line.append(f"({_unfilled(o)} @ {o.get('price')} no longer rests)", style="dim")
        lines.append(line)
    return lines


def cancel_all_result(result: Json) -> RenderableType:
    """The outcome of a cancel-all (a witnessed market's op), marked final or provisional."""
    n = int(result.get("cancelled") or 0)
    prefix = result.get("prefix")
    which = "" if prefix is None else f" with a client id starting {printable(prefix)!r}"
    text = _cancel_mark(result.get("final"), True)
    text.append(f"cancelled {n} order{'' if n == 1 else 's'}", style="bold" if n else "yellow")
    text.append(f" of this node on {result.get('market')}{which}")
    if not n:
        text.append(" (none was resting)" if prefix is None else " (none resting had one)")
    text.append(f"\ncancel-all op {result.get('cancel_id')}", style="dim")
    if result.get("final") is False:
        text.append(
            "\nnot final yet: orders that sort before it can still fill those orders first, "
            "until the witnesses' heartbeats acknowledge it",
            style="dim",
        )
    return text


def markets_table(markets: Sequence[Json]) -> RenderableType:
    """The markets the node follows: tick, lot, witnesses, finality frontier."""
    if not markets:
        return Text("this node follows no market", style="dim")
    t = Table(title="markets", title_justify="left")
    t.add_column("name", style="bold", no_wrap=True)
    t.add_column("tick", justify="right")
    t.add_column("lot", justify="right")
    t.add_column("witnessed")
    t.add_column("witnesses", justify="right")
    t.add_column("frontier", justify="right")
    t.add_column("id", style="dim", no_wrap=True)
    stacked = Text()
    for m in markets:
        witnessed = m.get("witnessed")
        said = "yes" if witnessed else ("no (never final)" if witnessed is False else "?")
        frontier = str(m.get("frontier", "?")) if witnessed else "-"
        row = (str(m.get("tick", "?")), str(m.get("lot", "?")), said, str(m.get("witnesses", "?")))
        t.add_row(inert(m.get("name", "?")), *row, frontier, str(m.get("id", "?")))
        # Too narrow for the table (its whole market ids are 64 digits): a block per market,
        # the id whole on a line of its own, to copy.
        stacked.append(("\n" if stacked.plain else "") + str(m.get("name", "?")), style="bold")
        stacked.append(f"  tick {row[0]}  lot {row[1]}  witnessed {said}")
        if witnessed:
            plural = "" if row[3] == "1" else "es"
            stacked.append(f" ({row[3]} witness{plural}, frontier {frontier})")
        stacked.append(f"\n  id {m.get('id', '?')}", style="dim")
    return FitOrStack(t, stacked)


def cancel_result(result: Json, witnessed: bool | None = None) -> RenderableType:
    """The outcome of a cancel, marked final or provisional (``witnessed`` as for
    :func:`submit_result`: False says once that nothing here is ever final)."""
    order: Json = result["order"]
    final = result.get("final")
    # (Nothing signed: the lines below say why, finished and final or cancelled already.)
    text = Text() if result.get("cancel_id") is None else _cancel_mark(final, witnessed)
    if result.get("effective"):
        text.append("cancelled ", style="bold")
        text.append(order.get("id", "?"))
        unfilled = _unfilled(order)
        text.append(
            f"\n{order.get('side')} {order.get('quantity')} @ {order.get('price')} on "
            f"{order.get('market')}: {order.get('filled')} had filled, {unfilled} no longer rests"
        )
    else:
        text.append("nothing to cancel: ", style="bold yellow")
        text.append(f"order {order.get('id', '?')} is already ")
        text.append_text(status_text(order.get("status", "?")))
    if result.get("cancel_id") is None:
        if final is False:  # cancelled already by this node: a new cancel would change nothing
            text.append(
                "\nno new cancel signed: it would come after this node's earlier one and "
                "change nothing",
                style="dim",
            )
            if witnessed is False:
                return Group(text, never_final(order.get("market")))
            text.append(
                "\nnot final yet: an order that sorts before that cancel can still fill it",
                style="dim",
            )
            return text
        text.append("\nfinal: no cancel can change it, so none was signed", style="dim")
        return text
    text.append(f"\ncancel op {short(result.get('cancel_id'))}", style="dim")
    if witnessed is False:
        return Group(text, never_final(order.get("market")))
    if final is False:
        if not result.get("effective"):  # signed all the same: the order's end may move
            return Group(
                text,
                Text(
                    "not final yet: if the order's fills move (an order that sorts earlier), "
                    "it can rest again, and this cancel then takes it off the book",
                    style="dim",
                ),
            )
        return Group(text, Text(CANCEL_NOT_FINAL, style="dim"))
    return text


# ------------------------------------------------------------------------------------------ book


def _cumulative(levels: Sequence[Json]) -> list[str]:
    out: list[str] = []
    running: list[str] = []
    for lvl in levels:
        running.append(lvl["quantity"])
        out.append(_dec_sum(running))
    return out


def book_ladder(
    book: Json, title: str | None = None, fills: Sequence[Json] = (), note: str = ""
) -> Panel:
    """:func:`book_body` in a panel titled with the market."""
    return Panel(
        book_body(book, fills, note=note),
        title=title or str(book.get("market", "")),
        expand=False,
    )


def frontier_line(book: Json) -> Text | None:
    """The finality line under a ladder: the frontier and how many levels are final, or that
    this market's fills are never final (None when the node does not say)."""
    witnessed = book.get("witnessed")
    if witnessed is False:
        return never_final(book.get("market", "?"))
    if witnessed is not True:
        return None
    levels = list(book.get("asks") or []) + list(book.get("bids") or [])
    n_final = sum(1 for lv in levels if lv.get("final") is True)
    frontier = book.get("frontier")
    if not frontier:
        return Text("frontier 0: nothing is final yet (no witness heartbeat so far)", style="dim")
    text = Text(f"frontier {frontier}", style="dim")
    if levels:
        text.append(": ", style="dim")
        style = "green" if n_final == len(levels) else "yellow"
        text.append(f"{n_final} of {len(levels)} levels final", style=style)
    return text


def book_body(book: Json, fills: Sequence[Json] = (), digest: bool = True, note: str = "") -> Group:
    """A depth ladder: asks above (highest price at the top), spread/mid, bids below, digest.

    Columns are price, size, cumulative size counted from the best price outward and, on a
    market with witnesses, whether the level is final (the final book has the same level with the
    same size) or provisional. Under it: the frontier (or that fills here are never final).
    ``fills`` (the latest few) are listed underneath when given, each marked too, with ``note``.
    """
    asks: list[Json] = list(book.get("asks") or [])
    bids: list[Json] = list(book.get("bids") or [])
    marks = book.get("witnessed") is True
    ask_cum = _cumulative(asks)
    bid_cum = _cumulative(bids)
    ask_rows = [
        (a["price"], a["quantity"], c, a.get("final")) for a, c in zip(asks, ask_cum, strict=True)
    ]
    bid_rows = [
        (b["price"], b["quantity"], c, b.get("final")) for b, c in zip(bids, bid_cum, strict=True)
    ]
    ask_rows.reverse()  # highest ask on top, best ask just above the spread line
    rows = ask_rows + bid_rows
    w_price = max([len("price"), *(len(r[0]) for r in rows)])
    w_size = max([len("size"), *(len(r[1]) for r in rows)])
    w_cum = max([len("total"), *(len(r[2]) for r in rows)])
    w_mark = max([len(FINAL), *(len(PROVISIONAL) for r in rows if r[3] is False)]) if marks else 0

    def table(header: bool) -> Table:
        t = Table(box=None, show_header=header, pad_edge=False, padding=(0, 1))
        t.add_column("price", justify="right", width=w_price)
        t.add_column("size", justify="right", width=w_size)
        t.add_column("total", justify="right", width=w_cum, style="dim")
        if marks:
            t.add_column("", justify="left", width=w_mark)
        return t

    def row(price: str, qty: str, cum: str, final: object, style: str) -> list[RenderableType]:
        cells: list[RenderableType] = [Text(price, style=style), qty, cum]
        if marks:
            cells.append(finality_mark(final))
        return cells

    ask_t = table(True)
    for price, qty, cum, final in ask_rows:
        ask_t.add_row(*row(price, qty, cum, final, "red"))
    bid_t = table(False)
    for price, qty, cum, final in bid_rows:
        bid_t.add_row(*row(price, qty, cum, final, "green"))

    if book.get("spread") is not None:
        mid = Text(f"spread {book['spread']}  mid {book['mid']}", style="yellow")
    elif not asks and not bids:
        mid = Text("(empty book)", style="dim")
    else:
        mid = Text("(one-sided: no " + ("asks" if not asks else "bids") + ")", style="dim")
    width = w_price + w_size + w_cum + 4 + (w_mark + 1 if marks else 0)
    mid.align("center", max(width, len(mid.plain)))
    parts: list[RenderableType] = [ask_t, mid, bid_t]
    finality = frontier_line(book)
    if finality is not None:
        parts.append(finality)
    if digest:
        parts.append(Text(f"digest {short(book.get('digest'))}", style="dim"))
    if fills or note:
        parts.append(Text("last fills", style="bold"))
        for f in list(fills)[-5:]:
            line = Text(
                f"{f.get('taker_side', '?'):>4} {f['quantity']} @ {f['price']}", style="dim"
            )
            if "final" in f and book.get("witnessed") is not False:
                line.append("  ")
                line.append_text(finality_mark(f["final"]))
            parts.append(line)
        if note:
            parts.append(Text(note, style="yellow"))
    return Group(*parts)


# ----------------------------------------------------------------------------- fills and orders


def fills_caption(data: Json) -> Text | None:
    """Which fills are final, from a ``fills`` result (None when the node does not say)."""
    witnessed = data.get("witnessed")
    if witnessed is False:
        return never_final(data.get("market", "?"))
    if witnessed is not True:
        return None
    n = int(data.get("final_count") or 0)
    if n == 0:
        return Text("no fill is final yet: every fill here is provisional", style="yellow")
    if n == 1:
        return Text("fill #0 is final; later fills are provisional", style="dim")
    return Text(f"fills #0 to #{n - 1} are final; later fills are provisional", style="dim")


def _any_witnessed_time(rows: Sequence[Json]) -> bool:
    """Whether any row has its witnessed time (it is final on a witnessed market): only then
    do the tables give the column (issue #11: the witnessed time once finality lands)."""
    return any(isinstance(r.get("witnessed_ms"), int) for r in rows)


def fills_table(data: Json) -> RenderableType:
    """A table of fills, oldest first, each marked final or provisional; on a narrow terminal
    without the received and then the witnessed times (:class:`FitColumns`)."""
    fills: list[Json] = list(data.get("fills") or [])
    caption = fills_caption(data)
    if not fills:
        count, start = data.get("fill_count"), data.get("start")
        if isinstance(count, int) and count > 0 and isinstance(start, int) and start >= count:
            empty = Text(
                f"no fill from #{start} on: {data.get('market', '?')} has {count} "
                f"fill{'' if count == 1 else 's'} (#0 to #{count - 1})",
                style="dim",
            )
        else:
            empty = Text(f"no fills yet on {data.get('market', '?')}", style="dim")
        return Group(empty, caption) if data.get("witnessed") is False and caption else empty
    marks = data.get("witnessed") is True or (
        data.get("witnessed") is None and any("final" in f for f in fills)
    )
    times = any("received_ms" in f for f in fills)
    witnessed_times = _any_witnessed_time(fills)

    def build(hide: frozenset[str]) -> Table:
        t = Table(title=f"fills on {data.get('market', '?')}", title_justify="left")
        t.add_column("#", justify="right", style="dim", no_wrap=True)
        t.add_column("taker", justify="left", no_wrap=True)
        t.add_column("qty", justify="right", no_wrap=True)
        t.add_column("price", justify="right", no_wrap=True)
        t.add_column("taker id", style="dim", no_wrap=True)
        t.add_column("maker id", style="dim", no_wrap=True)
        show_received = times and RECEIVED not in hide
        show_witnessed = witnessed_times and WITNESSED not in hide
        if show_received:
            t.add_column(RECEIVED, style="dim", no_wrap=True)
        if show_witnessed:
            t.add_column(WITNESSED, style="dim", no_wrap=True)
        if marks:
            t.add_column("final?", no_wrap=True)
        for f in fills:
            side = f.get("taker_side", "?")
            row: list[RenderableType] = [
                str(f.get("index", "")),
                Text(side, style="green" if side == "buy" else "red"),
                f["quantity"],
                f["price"],
                short(f.get("taker")),
                short(f.get("maker")),
            ]
            row += _tail_cells(f, show_received, show_witnessed, marks)
            t.add_row(*row)
        return t

    table = FitColumns(build, [RECEIVED, WITNESSED])
    return table if caption is None else Group(table, caption)


def _tail_cells(row: Json, received: bool, witnessed: bool, marks: bool) -> list[RenderableType]:
    """The cells the orders and fills tables end with: the times shown, then final or not."""
    cells: list[RenderableType] = []
    if received:
        cells.append(iso_ms(row.get("received_ms")))
    if witnessed:
        cells.append(iso_ms(row.get("witnessed_ms")))
    if marks:
        cells.append(finality_mark(row.get("final")))
    return cells


def orders_table(
    data: Json, everyone: bool = False, witnessed: bool | None = None
) -> RenderableType:
    """A table of orders (this node's, or every order with ``--all``), each marked final (its
    state can never change again) or provisional; ``witnessed`` False says once that fills on
    this market are never final instead. On a narrow terminal the received and witnessed times,
    then the tag and the time in force, make way for the rest (:class:`FitColumns`)."""
    orders: list[Json] = list(data.get("orders") or [])
    market = data.get("market", "?")
    if not orders:
        empty = Text(f"no {'' if everyone else 'own '}orders on {market}", style="dim")
        return Group(empty, never_final(market)) if witnessed is False else empty
    marks = witnessed is not False and any("final" in o for o in orders)
    times = any("received_ms" in o for o in orders)
    witnessed_times = _any_witnessed_time(orders)
    tagged = any(o.get("tag") for o in orders)

    def build(hide: frozenset[str]) -> Table:
        t = Table(title=f"{'all' if everyone else 'my'} orders on {market}", title_justify="left")
        t.add_column("id", style="bold", no_wrap=True)
        t.add_column("side", no_wrap=True)
        t.add_column("qty", justify="right", no_wrap=True)
        t.add_column("price", justify="right", no_wrap=True)
        show_filled = "filled" not in hide
        if show_filled:
            t.add_column("filled", justify="right", no_wrap=True)
        t.add_column("left", justify="right", no_wrap=True)
        show_tif = "tif" not in hide
        show_tag = tagged and "tag" not in hide  # no column when no order has a tag
        show_received = times and RECEIVED not in hide
        show_witnessed = witnessed_times and WITNESSED not in hide
        if show_tif:
            t.add_column("tif", no_wrap=True)
        t.add_column("status", no_wrap=True)
        if show_tag:
            t.add_column("tag", style="dim")
        if everyone:
            t.add_column("mine", no_wrap=True)
        if show_received:
            t.add_column(RECEIVED, style="dim", no_wrap=True)
        if show_witnessed:
            t.add_column(WITNESSED, style="dim", no_wrap=True)
        if marks:
            t.add_column("final?", no_wrap=True)
        for o in orders:
            row: list[RenderableType] = [
                short(o.get("id")),
                Text(o.get("side", "?"), style="green" if o.get("side") == "buy" else "red"),
                o.get("quantity", "?"),
                o.get("price", "?"),
            ]
            if show_filled:
                row.append(o.get("filled", "?"))
            row.append(o.get("remaining", "?"))
            if show_tif:
                row.append(str(o.get("tif", "?")).replace("_", "-"))
            row.append(status_text(o.get("status", "?")))
            if show_tag:
                row.append(inert(o.get("tag") or ""))
            if everyone:
                row.append("yes" if o.get("mine") else "")
            row += _tail_cells(o, show_received, show_witnessed, marks)
            t.add_row(*row)
        return t

    # The filled quantity goes last: qty and left give it.
    table = FitColumns(build, [RECEIVED, WITNESSED, "tif", "tag", "filled"])
    parts: list[RenderableType] = [table]
    if data.get("more"):
        parts.append(
            Text(
                "older orders are not listed: crdtbook order ID shows any of them",
                style="dim",
            )
        )
    if witnessed is False:
        parts.append(never_final(market))
    return Group(*parts) if len(parts) > 1 else table


def order_detail(order: Json, witnessed: bool | None = None) -> RenderableType:
    """Every field of one order, one per line, with whether its state is final."""
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
    if witnessed is False:
        t.add_row("finality", never_final(order.get("market")))
    elif order.get("final") is True:
        t.add_row("finality", Text("final: this state can never change again", style="green"))
    elif order.get("final") is False:
        t.add_row(
            "finality",
            Text(
                "provisional: "
                + (
                    "the order is still live"
                    if order.get("status") in ("open", "partially_filled")
                    else "an order that sorts earlier can still change this"
                ),
                style="yellow",
            ),
        )
    t.add_row("tag", inert(order.get("tag") or "-"))
    if order.get("client_id") is not None:
        t.add_row("client id", inert(order["client_id"]))
    if "received_ms" in order:
        t.add_row("received", iso_ms(order.get("received_ms")) + "  (by this node)")
    if "witnessed_ms" in order:
        when = order.get("witnessed_ms")
        t.add_row("witnessed", iso_ms(when) if when is not None else "- (not final)")
    t.add_row("lamport", str(order.get("lamport")))
    return t


# ------------------------------------------------------------------------------- status and id


def id_lines(status: Json) -> RenderableType:
    """The node's peer id, its witness key and its multiaddrs, each whole on a line of its own.

    The multiaddrs come last, one a line with no indent, so ``crdtbook id | tail -1`` is one
    whole multiaddr to give to ``--bootstrap``. Print with ``soft_wrap=True``: nothing is cut or
    wrapped, whatever the terminal's width.
    """
    text = Text()
    text.append("peer id ", style="bold")
    text.append(printable(status.get("peer_id")))
    if status.get("public_key"):
        text.append("\nwitness key ", style="bold")
        text.append(str(status["public_key"]))
    addrs = list(status.get("addrs") or [])
    text.append(f"\nmultiaddrs ({len(addrs)}):" if addrs else "\nmultiaddrs: none", style="bold")
    for addr in addrs:
        text.append("\n" + printable(addr))
    return text


class FitOrStack:
    """A table when it fits the width it is given at its natural size, else the same facts as
    ``stacked`` lines: a squeezed table would cut names and ids (``BTC-…``) to fit."""

    def __init__(self, table: Table, stacked: RenderableType) -> None:
        self.table = table
        self.stacked = stacked

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        natural = Measurement.get(console, options.update_width(_UNBOUNDED), self.table).maximum
        yield self.table if natural <= options.max_width else self.stacked


#: A width no terminal has, to measure a table's natural width without squeezing it.
_UNBOUNDED = 100_000

#: The time columns of the orders and fills tables (issue #11), the first to make way.
RECEIVED = "received (UTC)"
WITNESSED = "witnessed (UTC)"


class FitColumns:
    """A table built without its optional columns, least needed first, until it fits the
    width it is given at its natural size, with a line under it naming what was left out.

    Squeezed to fit, rich cuts every column alike: below ~160 columns the orders table showed
    ``s…`` for a side and ``6…`` for a price, while its two full timestamps kept their width;
    at 80 the columns that matter vanished. ``build(hide)`` makes the table without the
    columns named in ``hide``; ``optional`` is the order in which they go."""

    def __init__(self, build: Callable[[frozenset[str]], Table], optional: Sequence[str]) -> None:
        self.build = build
        self.optional = list(optional)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        unbounded = options.update_width(_UNBOUNDED)
        hidden: list[str] = []
        table = self.build(frozenset())
        for name in self.optional:
            if Measurement.get(console, unbounded, table).maximum <= options.max_width:
                break
            if not any(column.header == name for column in table.columns):
                continue  # not in this table (no tag anywhere, nothing final yet)
            hidden.append(name)
            table = self.build(frozenset(hidden))
        yield table
        if hidden:
            yield Text(
                f"not shown at this width: {', '.join(hidden)} (a wider terminal or --json "
                "shows them)",
                style="dim",
            )


def status_view(status: Json, now: float | None = None) -> RenderableType:
    """The node's identity, its peers, and per-market replication state.

    Peer ids, keys and multiaddrs are each whole on a line (print with ``soft_wrap=True``, so a
    narrow terminal or a pipe never cuts or wraps them); the markets table falls back to one
    block of lines per market where it would not fit (:class:`FitOrStack`).
    """
    head = Text()

    def field(label: str, value: str = "") -> None:
        head.append(("\n" if head.plain else "") + label, style="bold")
        if value:
            head.append(" " + value)

    field("peer id", printable(status.get("peer_id")))
    key = status.get("public_key") or status.get("author")
    if key:
        field("witness key", printable(key))
    addrs = [printable(a) for a in status.get("addrs") or []]
    field("addrs", "" if addrs else "-")
    for addr in addrs:
        head.append("\n  " + addr)
    peers: list[Json] = list(status.get("peers") or [])
    field("peers", str(len(peers)))
    for p in peers:  # what a peer announced about itself: its id, then its first address
        head.append("\n  " + printable(p.get("peer_id")))
        if p.get("addrs"):
            head.append("\n    " + printable(p["addrs"][0]), style="dim")
    extra = []
    if status.get("uptime") is not None:
        extra.append(f"uptime {duration(float(status['uptime']))}")
    if status.get("pid") is not None:
        extra.append(f"pid {status['pid']}")
    if status.get("version"):
        extra.append(f"version {printable(status['version'])}")
    if extra:
        field("node", "  ".join(extra))
    fault = status.get("store_fault")
    if isinstance(fault, dict):
        field("store")
        head.append(
            f" refuses writes ({printable(fault.get('reason'))}): nothing new is signed or "
            f"taken until it does; {printable(fault.get('message'))}",
            style="bold red",
        )
    sync = status.get("sync_sessions")
    if isinstance(sync, dict) and "pulled" in sync:  # totals: nodes since session 8 of #12
        field(
            "sync",
            f"pulled {sync.get('pulled')} sessions ({sync.get('ops_pulled')} ops gossip had not"
            f" brought), served {sync.get('served')}; now {sync.get('pulling')} pulling,"
            f" {sync.get('serving')} serving"
            + (f"; {sync['refused_busy']} refused (busy)" if sync.get("refused_busy") else ""),
        )
    loop = status.get("loop")
    if isinstance(loop, dict):
        busy = loop.get("busy")
        busy_s = f"{busy:.0%}" if isinstance(busy, int | float) else "-"
        early = "on" if loop.get("early_publish") else "off"
        field("loop", f"busy {busy_s}, early publishing {early}")

    columns: list[tuple[str, str]] = [
        ("market", "left"),
        ("tick", "right"),
        ("lot", "right"),
        ("ops", "right"),
        ("heads", "left"),
        ("pending", "right"),
        ("orders", "right"),
        ("fills", "right"),
        ("finality", "left"),
        ("last sync", "right"),
        ("digest", "left"),
    ]
    markets = Table(title="markets", title_justify="left")
    for col, just in columns:
        markets.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    stacked = Text()
    for m in status.get("markets") or []:
        heads: list[str] = list(m.get("heads") or [])
        heads_s = str(len(heads)) + (
            f" ({short(heads[0], 8)}{', …' if len(heads) > 1 else ''})" if heads else ""
        )
        pending = int(m.get("pending") or 0)
        cells: list[Text] = [
            Text(printable(m.get("name"))),
            Text(str(m.get("tick"))),
            Text(str(m.get("lot"))),
            Text(str(m.get("ops"))),
            Text(heads_s),
            Text(str(pending), style="yellow" if pending else ""),
            Text(str(m.get("orders", ""))),
            Text(str(m.get("fills", ""))),
            finality_cell(m),
            Text(ago(m.get("last_sync"), now)),
            Text(short(m.get("digest"))),
        ]
        markets.add_row(*cells)
        stacked.append(("\n" if stacked.plain else "") + "market ", style="bold")
        stacked.append_text(cells[0])
        for (col, _), cell in zip(columns[1:], cells[1:], strict=True):
            stacked.append(f"\n  {col} ", style="dim")
            stacked.append_text(cell)
    parts: list[RenderableType] = [
        head,
        FitOrStack(markets, Group(Text("markets", style="italic"), stacked)),
    ]
    for m in status.get("markets") or []:
        disputed = m.get("point_disputed")
        if isinstance(disputed, dict):
            parts.append(
                Text(
                    f"this node's state in {printable(m.get('name'))} at point "
                    f"{printable(disputed.get('n'))} is not the one a majority of the witnesses "
                    "attest: its book and fills differ from theirs (see the node's log)",
                    style="bold red",
                )
            )
        if m.get("key_equivocated"):
            parts.append(
                Text(
                    f"this node's key signed two different ops at one sequence number in "
                    f"{printable(m.get('name'))}: it signs only cancels there (another node runs "
                    "with this key?)",
                    style="bold red",
                )
            )
        parts.extend(finality_lines(m))
    return Group(*parts)


def _seconds(value: float) -> str:
    """``0.4s`` below ten seconds, else :func:`duration`."""
    return f"{value:.1f}s" if value < 10 else duration(value)


def finality_cell(m: Json) -> Text:
    """A market's finality state in one word (details under the table)."""
    state = m.get("finality")
    if state is None:
        return Text("-", style="dim")
    word, style = FINALITY_TEXT.get(str(state), (str(state), ""))
    return Text(word, style=style)


def finality_lines(m: Json) -> list[Text]:
    """A market's finality in full: its state and why, the frontier and epoch, and every witness
    with its whole key (never cut: the lines run past a narrow terminal rather than wrap)."""
    name = m.get("name", "?")
    state = m.get("finality")
    if state is None and m.get("witnessed") is None:
        return []  # an older node: it does not say
    if state == "none" or m.get("witnessed") is False:
        return [never_final(name)]
    word, style = FINALITY_TEXT.get(str(state), (str(state), ""))
    head = Text("\n")
    head.append(f"{name} finality: ", style="bold")
    head.append(word, style=style)
    why = {
        "final": "everything is acknowledged",
        "pending": "waiting on heartbeats that are due",
        "stalled": "a witness has been silent while something waits",
    }.get(str(state))
    if why:
        head.append(f" ({why})")
    head.append(
        f"\n  frontier {m.get('frontier', '?')}, epoch {m.get('epoch', '?')}, "
        f"{m.get('final_ops', '?')} of {m.get('ops', '?')} ops final, "
        f"{m.get('final_fills', '?')} of {m.get('fills', '?')} fills final",
        style="dim",
    )
    if m.get("joined_from_point") is not None:  # joined from a witnessed snapshot (#10)
        history = str(m.get("history", "?"))
        joined = (
            f"\n  joined from the snapshot at final op {printable(m['joined_from_point'])}, "
            f"history before it {printable(history)}"
        )
        if history != "complete":
            joined += " (fetched when an op needs it, and in the background unless the node "
            joined += "runs with --no-history-backfill"
            wanted = m.get("history_wanted") or 0
            joined += f": {printable(wanted)} ops wait for it)" if wanted else ")"
        derived = m.get("history_derived")
        if derived == "done":
            joined += "; its fills and orders derived"
        elif derived == "deriving":
            progress = float(m.get("history_derived_progress") or 0)
            joined += f"; deriving its fills and orders ({progress:.0%})"
        elif derived != "inconsistent":
            joined += "; fills and order answer from the join point on"
        head.append(joined, style="dim")
        if derived == "inconsistent":
            head.append(
                "\n  its history does not derive the point joined from: the fills and orders "
                "before it are not shown (see the node log)",
                style="bold red",
            )
    elif m.get("join") == "joining":
        head.append("\n  joining: taking a snapshot from a peer", style="dim")
    if m.get("retention") is not None:  # --retention: the store no longer keeps every op
        head.append(
            f"\n  retention {printable(m['retention'])} ops: {printable(m.get('pruned_ops', 0))} "
            f"compacted ops pruned from the store, history {printable(m.get('history', '?'))} "
            "(fills and orders are kept)",
            style="dim",
        )
    lines = [head]
    witnesses: list[Json] = list(m.get("witnesses") or [])
    stalled_on = set(m.get("stalled_on") or [])
    current = sum(1 for w in witnesses if w.get("current", True))
    lines.append(Text(f"  witnesses ({current} in force):", style="bold"))
    for w in witnesses:
        # The key alone on its line (4 + 64 columns), so it is never cut or wrapped.
        lines.append(Text("    " + str(w.get("key")), no_wrap=True, overflow="ignore"))
        line = Text("      ")
        tags = []
        if w.get("me"):
            tags.append(("this node", "bold"))
        if not w.get("current", True):
            tags.append(("removed", "dim"))
        if w.get("forked"):
            tags.append(("forked: it signed two ops at one sequence number", "bold red"))
        silent = w.get("silent_s")
        if w.get("key") in stalled_on:
            # How long finality has waited for it (an older node: since its last heartbeat).
            waited = w.get("waited_s", silent)
            for_how_long = "" if waited is None else f" for {_seconds(float(waited))}"
            if w.get("forked"):  # it may be heartbeating: only its heartbeats do not count
                what = f"STALLED: finality has waited{for_how_long}; its heartbeats no longer count"
            else:  # (waited, not silent: the line below and the hint give its silence)
                what = f"STALLED: finality has waited{for_how_long} for its heartbeat"
            tags.append((what, "bold red"))
        for tag, tag_style in tags:
            line.append(tag, style=tag_style)
            line.append("; ")
        lamport = int(w.get("heartbeat_lamport") or 0)
        if lamport:
            beat = f"heartbeat at lamport {lamport} (seq {w.get('heartbeat_seq')})"
            if silent is None:
                beat += ", not seen since this node started"
            else:
                beat += f", last new one {_seconds(float(silent))} ago"
        else:
            beat = "no heartbeat yet"
        line.append(beat, style="dim")
        lines.append(line)
    if stalled_on:
        silent_for: dict[str, float] = {
            str(w.get("key")): float(w["silent_s"])
            for w in witnesses
            if w.get("silent_s") is not None
        }
        who = ", ".join(
            short(k) + (f" (silent {_seconds(silent_for[k])})" if k in silent_for else "")
            for k in sorted(stalled_on)
        )
        lines.append(
            Text(
                f"  finality on {name} is stalled on {who}: if a witness is gone for good, a "
                "majority of the witnesses can remove it (crdtbook reconfig approve, then "
                "crdtbook reconfig submit)",
                style="yellow",
            )
        )
    return lines
