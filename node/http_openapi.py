"""The HTTP API's OpenAPI 3.1 document, served at /openapi.json (specs/http-api.md).

Written by hand, beside the routes it describes: tests/node/test_http_api.py checks that every
route the app serves is here and every path here is served, and validates live responses
against these schemas.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["NEW_ORDER_FIELDS", "openapi_document"]

_DEC: Final = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$", "description": "a decimal"}
_HEX: Final = {"type": "string", "pattern": "^[0-9a-f]+$"}
_MS: Final = {"type": ["integer", "null"], "description": "epoch milliseconds"}
_ISO: Final = {"type": ["string", "null"], "description": "ISO 8601 UTC"}
_LEVELS: Final = {
    "type": "array",
    "items": {"type": "array", "prefixItems": [_DEC, _DEC], "minItems": 2, "maxItems": 2},
    "description": "[[price, amount], ...], best first",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
    }


_SCHEMAS: Final[dict[str, Any]] = {
    "Error": _obj(
        {
            "error": _obj(
                {
                    "code": {"type": "string", "description": "the control API's error code"},
                    "message": {"type": "string"},
                }
            )
        }
    ),
    "Market": _obj(
        {
            "id": {"type": "string"},
            "symbol": {"type": "string"},
            "base": {"type": "string"},
            "quote": {"type": "string"},
            "active": {"type": "boolean"},
            "precision": _obj({"price": _DEC, "amount": _DEC}),
            "info": _obj(
                {
                    "tick": _DEC,
                    "lot": _DEC,
                    "witnessed": {"type": "boolean"},
                    "witnesses": {"type": "array", "items": _HEX},
                    "spec": {"type": "string"},
                    "id": _HEX,
                    "version": {"type": "integer"},
                    "frontier": {"type": "integer"},
                },
            ),
        }
    ),
    "OrderBook": _obj(
        {
            "symbol": {"type": "string"},
            "bids": _LEVELS,
            "asks": _LEVELS,
            "nonce": {"type": "integer", "description": "the book stream's sequence number"},
            "timestamp": {"type": "integer"},
            "datetime": {"type": "string"},
            "final": _obj({"bids": _LEVELS, "asks": _LEVELS}),
            "witnessed": {"type": "boolean"},
        }
    ),
    "Trade": _obj(
        {
            "id": {"type": "string"},
            "order": _HEX,
            "timestamp": _MS,
            "datetime": _ISO,
            "symbol": {"type": "string"},
            "side": {"enum": ["buy", "sell"]},
            "price": _DEC,
            "amount": _DEC,
            "cost": _DEC,
            "takerOrMaker": {"enum": ["taker", "maker", None]},
            "final": {"type": "boolean"},
            "info": {"type": "object", "description": "the control API's fill object"},
        }
    ),
    "Order": _obj(
        {
            "id": _HEX,
            "clientOrderId": {"type": ["string", "null"]},
            "timestamp": _MS,
            "datetime": _ISO,
            "symbol": {"type": "string"},
            "type": {"enum": ["limit", "market"]},
            "side": {"enum": ["buy", "sell"]},
            "price": _DEC,
            "amount": _DEC,
            "filled": _DEC,
            "remaining": _DEC,
            "status": {"enum": ["open", "closed", "canceled", "expired", "rejected"]},
            "timeInForce": {"enum": ["GTC", "IOC", "FOK", "PO"]},
            "postOnly": {"type": "boolean"},
            "final": {"type": "boolean"},
            "info": {"type": "object", "description": "the control API's order object"},
        }
    ),
    "CreatedOrder": {
        "allOf": [
            _ref("Order"),
            _obj(
                {
                    "fills": {"type": "array", "items": _ref("Trade")},
                    "expired": {
                        "type": "array",
                        "items": _ref("Order"),
                        "description": "orders self-trade prevention expired",
                    },
                }
            ),
        ]
    },
    "OrderPage": _obj(
        {
            "orders": {"type": "array", "items": _ref("Order")},
            "next_cursor": {"type": ["string", "null"]},
        }
    ),
    "CancelAll": _obj(
        {
            "op": {
                "type": ["string", "null"],
                "description": "the cancel-all op's id; null in a market without witnesses, "
                "where each order gets its own cancel",
            },
            "cancelled": {"type": "array", "items": _HEX},
        }
    ),
    "NewOrder": _obj(
        {
            "symbol": {"type": "string"},
            "type": {"enum": ["limit", "market"]},
            "side": {"enum": ["buy", "sell"]},
            "amount": _DEC,
            "price": _DEC,
            "clientOrderId": {"type": "string"},
            "timeInForce": {"enum": ["GTC", "IOC", "FOK", "PO"]},
            "postOnly": {"type": "boolean"},
            "selfTradePrevention": {"enum": ["expire_maker", "expire_taker", "expire_both"]},
            "band": {"type": "string", "description": "market orders: protection, e.g. 1%"},
            "waitFinal": {
                "type": "boolean",
                "description": "answer once the order is final (witnessed markets; 504 timeout "
                "after 30 s, the order standing)",
            },
        },
        required=["side", "amount"],
    ),
    "Status": {
        "type": "object",
        "properties": {
            "peer_id": {"type": "string"},
            "addrs": {"type": "array", "items": {"type": "string"}},
            "peers": {"type": "array", "items": {"type": "object"}},
            "markets": {
                "type": "array",
                "items": {"type": "object", "required": ["name", "id", "finality", "witnesses"]},
                "description": "MarketStatus, as specs/control-api.md has it (digest null)",
            },
            "public_key": _HEX,
            "version": {"type": "string"},
            "network": {"type": "object"},
        },
        "required": ["peer_id", "addrs", "markets", "public_key", "version"],
        "description": "the control API's status result, digests null, without the node's pid",
    },
}


def _query(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


#: The fields ``POST /api/v1/orders`` reads; the API refuses any other (a misspelt field would
#: otherwise be ignored, and the order placed without it).
NEW_ORDER_FIELDS: Final = frozenset(_SCHEMAS["NewOrder"]["properties"])
_SCHEMAS["NewOrder"]["additionalProperties"] = False

_SYMBOL: Final = _query("symbol", {"type": "string"})
_ORDER_ID: Final = {"name": "order_id", "in": "path", "required": True, "schema": _HEX}
_ERRORS: Final = {
    "default": {
        "description": "an error",
        "content": {"application/json": {"schema": _ref("Error")}},
    }
}
_AUTH: Final[list[dict[str, list[str]]]] = [{"bearer": []}]


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {
        "200": {"description": description, "content": {"application/json": {"schema": schema}}},
        **_ERRORS,
    }


def _op(
    summary: str,
    responses: dict[str, Any],
    params: list[dict[str, Any]] | None = None,
    auth: bool = False,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = params
    if auth:
        op["security"] = _AUTH
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def openapi_document() -> dict[str, Any]:
    """The document (a fresh dict each call)."""
    # The bounds the routes enforce (http_api.MAX_BOOK_LIMIT, MAX_LIST_LIMIT; a cancel-all
    # prefix is at most 32 UTF-8 bytes, finality.md 3.1): a client generated from this
    # document then never sends what is refused.
    book_limit = _query("limit", {"type": "integer", "minimum": 1, "maximum": 500})
    limit = _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "crdtbook node HTTP API",
            "version": "1",
            "description": "A node's order books and its key's orders, in ccxt's unified "
            "shapes. Prices and amounts are decimal strings. See specs/http-api.md; the "
            "WebSocket at /ws is described there.",
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the node's <home>/http.token (`crdtbook token`)",
                }
            },
        },
        "paths": {
            "/api/v1/markets": {
                "get": _op("Markets", _ok({"type": "array", "items": _ref("Market")}))
            },
            "/api/v1/orderbook": {
                "get": _op("Order book", _ok(_ref("OrderBook")), [_SYMBOL, book_limit])
            },
            "/api/v1/trades": {
                "get": _op(
                    "Recent trades, oldest first",
                    _ok({"type": "array", "items": _ref("Trade")}),
                    [
                        _SYMBOL,
                        limit,
                        _query("since", {"type": "integer"}),
                        _query("start", {"type": "integer", "minimum": 0}),
                    ],
                )
            },
            "/api/v1/status": {"get": _op("Node status", _ok(_ref("Status")))},
            "/api/v1/orders": {
                "get": _op(
                    "This node's orders, newest first",
                    _ok(_ref("OrderPage")),
                    [
                        _SYMBOL,
                        _query("status", {"enum": ["open", "closed", "all"]}),
                        limit,
                        _query("cursor", {"type": "string"}),
                    ],
                    auth=True,
                ),
                "post": _op(
                    "Create an order", _ok(_ref("CreatedOrder")), auth=True, body=_ref("NewOrder")
                ),
                "delete": _op(
                    "Cancel all of this node's open orders (one op in a witnessed market)",
                    _ok(_ref("CancelAll")),
                    [_SYMBOL, _query("clientOrderIdPrefix", {"type": "string", "maxLength": 32})],
                    auth=True,
                ),
            },
            "/api/v1/orders/{order_id}": {
                "get": _op(
                    "One order (id or unique id prefix)",
                    _ok(_ref("Order")),
                    [_ORDER_ID, _SYMBOL],
                    auth=True,
                ),
                "delete": _op(
                    "Cancel one order", _ok(_ref("Order")), [_ORDER_ID, _SYMBOL], auth=True
                ),
            },
            "/openapi.json": {"get": _op("This document", _ok({"type": "object"}))},
            "/": {
                "get": {
                    "summary": "The web view",
                    "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
                }
            },
            "/static/{path}": {
                "get": {
                    "summary": "The web view's files",
                    "parameters": [
                        {
                            "name": "path",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {"200": {"description": "a file"}, "404": {"description": "none"}},
                }
            },
            "/ws": {
                "get": {
                    "summary": "WebSocket upgrade: book, trades, private and status streams "
                    "(specs/http-api.md)",
                    "responses": {"101": {"description": "switching protocols"}},
                }
            },
        },
    }
