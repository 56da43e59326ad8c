"""The HTTP API's JSON shapes (specs/http-api.md): the control API's objects in ccxt's unified
field names. Pure functions over the control API's results, so the HTTP API says exactly what
the control API says, only spelled the way exchange tooling expects."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

__all__ = [
    "CCXT_STATUS",
    "CCXT_TIF",
    "TIF_FROM_CCXT",
    "error_body",
    "iso",
    "levels",
    "market_shape",
    "order_shape",
    "trade_id",
    "trade_shape",
]

#: Control API order status -> ccxt's. ccxt has no partially filled status: such an order is
#: open (its ``filled`` says how much); a post-only order that would have taken is rejected.
CCXT_STATUS: Final = {
    "open": "open",
    "partially_filled": "open",
    "filled": "closed",
    "cancelled": "canceled",
    "expired": "expired",
    "rejected": "rejected",
}
CCXT_TIF: Final = {"gtc": "GTC", "ioc": "IOC", "fok": "FOK", "post_only": "PO"}
TIF_FROM_CCXT: Final = {v: k for k, v in CCXT_TIF.items()}
#: Hex digits of each order id in a trade id: 64 bits each keeps ids short and collisions out
#: of reach (a fill is one taker meeting one maker, so the pair names it).
TRADE_ID_DIGITS: Final = 16


def iso(ms: int | None) -> str | None:
    """Epoch milliseconds as ISO 8601 UTC with milliseconds (``2026-12-02T08:27:42.123Z``)."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _timestamp(obj: dict[str, Any]) -> int | None:
    """The witnessed time once final (the same on every node), else this node's receipt time
    (None for a provisional op loaded from the store at start)."""
    witnessed = obj.get("witnessed_ms")
    return int(witnessed) if witnessed is not None else obj.get("received_ms")


def market_shape(entry: dict[str, Any], witnesses: list[str]) -> dict[str, Any]:
    """A control ``markets`` entry as a ccxt market. Names are BASE-QUOTE; one without a dash
    has no base/quote split (both are the name)."""
    name = entry["name"]
    base, dash, quote = name.partition("-")
    return {
        "id": name,
        "symbol": name,
        "base": base,
        "quote": quote if dash else name,
        "active": True,
        "precision": {"price": entry["tick"], "amount": entry["lot"]},
        "info": {
            "tick": entry["tick"],
            "lot": entry["lot"],
            "witnessed": entry["witnessed"],
            "witnesses": witnesses,
            "spec": entry["spec"],
            "id": entry["id"],
            "version": entry["version"],
            "frontier": entry["frontier"],
        },
    }


def order_shape(order: dict[str, Any], kind: str = "limit") -> dict[str, Any]:
    """A control order object as a ccxt order (the control object itself under ``info``).
    ``kind`` is "market" only in the answer to creating a market order: once placed, a market
    order is an IOC limit order at its protection price, and is read back as one."""
    stamp = _timestamp(order)
    tif = order["tif"]
    return {
        "id": order["id"],
        "clientOrderId": order["tag"],
        "timestamp": stamp,
        "datetime": iso(stamp),
        "symbol": order["market"],
        "type": kind,
        "side": order["side"],
        "price": order["price"],
        "amount": order["quantity"],
        "filled": order["filled"],
        "remaining": order["remaining"],
        "status": CCXT_STATUS.get(order["status"], order["status"]),
        "timeInForce": CCXT_TIF.get(tif, tif.upper()),
        "postOnly": tif == "post_only",
        "final": order["final"],
        "info": order,
    }


def trade_id(fill: dict[str, Any]) -> str:
    """A fill's id: the taker's and the maker's order ids, shortened (stable while the fill
    exists, unlike its index, which a reordering of provisional fills can move)."""
    return str(fill["taker"][:TRADE_ID_DIGITS] + fill["maker"][:TRADE_ID_DIGITS])


def trade_shape(fill: dict[str, Any], me: str | None = None) -> dict[str, Any]:
    """A control fill object as a ccxt trade. Public trades name the taker's order and say
    nothing of roles; with ``me`` (this node's key, for the private stream) ``order`` is this
    key's order in the fill and ``takerOrMaker`` its role."""
    role: str | None = None
    order = fill["taker"]
    if me is not None:
        if fill["taker_author"] == me:
            role = "taker"
        elif fill["maker_author"] == me:
            role, order = "maker", fill["maker"]
    stamp = _timestamp(fill)
    price, amount = fill["price"], fill["quantity"]
    return {
        "id": trade_id(fill),
        "order": order,
        "timestamp": stamp,
        "datetime": iso(stamp),
        "symbol": fill["market"],
        "side": fill["taker_side"] if role != "maker" else _other(fill["taker_side"]),
        "price": price,
        "amount": amount,
        "cost": _cost(price, amount),
        "takerOrMaker": role,
        "final": fill["final"],
        "info": fill,
    }


def _other(side: str) -> str:
    return "sell" if side == "buy" else "buy"


def _cost(price: str, amount: str) -> str:
    from decimal import Decimal

    return format(Decimal(price) * Decimal(amount), "f")


def levels(entries: list[dict[str, Any]]) -> list[list[str]]:
    """Control book levels as ``[[price, amount], ...]``."""
    return [[lv["price"], lv["quantity"]] for lv in entries]


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}
