"""What the control server and the blocking client share, without importing trio.

The client (`crdtbook.node.client`) is meant for plain scripts and a fast-starting CLI, so the
protocol's error type and wire constants live here rather than in the trio server module.
See specs/control-api.md for the protocol.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable
from typing import Any, Final

# The longest request line the server reads is one of the shell's limits (node.limits).
from .limits import MAX_REQUEST_LINE_BYTES

__all__ = [
    "AMBIGUOUS",
    "BAD_APPROVAL",
    "BAD_REQUEST",
    "CONTROL_SOCKET_NAME",
    "DUPLICATE_CLIENT_ID",
    "EMPTY_BOOK",
    "ERROR_CODES",
    "INTERNAL",
    "INVALID_OP",
    "KEY_EQUIVOCATED",
    "MAX_REQUEST_LINE_BYTES",
    "NOT_FOUND",
    "NOT_OWNER",
    "NOT_READY",
    "NOT_WITNESS",
    "NOT_WITNESSED",
    "NO_MAJORITY",
    "OFF_LOT",
    "OFF_TICK",
    "STORE_ERROR",
    "STORE_FULL",
    "TIMEOUT",
    "UNKNOWN_MARKET",
    "UNKNOWN_METHOD",
    "ControlError",
    "unknown_name",
]

# File name of the control socket inside the node's home directory.
CONTROL_SOCKET_NAME: Final = "control.sock"


# Error codes (specs/control-api.md, "Error codes").
BAD_REQUEST: Final = "bad_request"  # malformed line, or missing / mistyped params
UNKNOWN_METHOD: Final = "unknown_method"
UNKNOWN_MARKET: Final = "unknown_market"
OFF_TICK: Final = "off_tick"  # price not a multiple of the market's tick
OFF_LOT: Final = "off_lot"  # quantity not a multiple of the market's lot
NOT_FOUND: Final = "not_found"  # no order matches the id
AMBIGUOUS: Final = "ambiguous"  # an id prefix matches several orders
NOT_OWNER: Final = "not_owner"  # cancelling an order this node's key did not sign
INVALID_OP: Final = "invalid_op"
TIMEOUT: Final = "timeout"  # submit with wait_final: the order is not final within the timeout
NOT_WITNESSED: Final = "not_witnessed"  # finality asked of a market without witnesses
NOT_WITNESS: Final = "not_witness"  # a witness's act by a key that is not a witness in force
NO_MAJORITY: Final = "no_majority"  # a reconfiguration without approvals from a majority
BAD_APPROVAL: Final = "bad_approval"  # an approval signature that does not verify for the set
#: submit with a client order id this node's key already used in the market (witnessed markets)
DUPLICATE_CLIENT_ID: Final = "duplicate_client_id"
#: a market order while the side of the book it would take from is empty
EMPTY_BOOK: Final = "empty_book"
#: the node cannot sign yet: it holds ops of its own key it has not applied (they wait for
#: parents or history); a new op would equivocate. Retry once they are applied.
NOT_READY: Final = "not_ready"
#: the node's key signed two different ops at one sequence number in the market (another node
#: runs with the same key, or this one lost ops it had sent): it signs only cancels there.
KEY_EQUIVOCATED: Final = "key_equivocated"
STORE_FULL: Final = "store_full"  # the node's store has no space left: nothing was done
STORE_ERROR: Final = "store_error"  # the node's store cannot be written (read-only, I/O error)
INTERNAL: Final = "internal"  # a bug in the node; details are in the node's log

ERROR_CODES: Final = frozenset(
    {
        BAD_REQUEST,
        UNKNOWN_METHOD,
        UNKNOWN_MARKET,
        OFF_TICK,
        OFF_LOT,
        NOT_FOUND,
        AMBIGUOUS,
        NOT_OWNER,
        INVALID_OP,
        TIMEOUT,
        NOT_WITNESSED,
        NOT_WITNESS,
        NO_MAJORITY,
        BAD_APPROVAL,
        DUPLICATE_CLIENT_ID,
        EMPTY_BOOK,
        NOT_READY,
        KEY_EQUIVOCATED,
        STORE_FULL,
        STORE_ERROR,
        INTERNAL,
    }
)


class ControlError(Exception):
    """An expected failure of a control request, sent to the client as ``{"code", "message"}``.

    Handlers raise it for anything the user can fix (bad params, unknown market, ...); the client
    re-raises it from the error response.  ``code`` is one of ERROR_CODES on the server side; the
    client keeps whatever code a (possibly newer) node sent.  ``message`` is one line a person
    can act on.
    """

    def __init__(self, code: str, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        #: What a script needs beyond the message, for the few errors after which something
        #: stands (``submit`` with ``wait_final`` timing out: the order, placed, provisional).
        self.data = data

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"

    def to_json(self) -> dict[str, Any]:
        """The ``error`` member of a response."""
        if self.data is None:
            return {"code": self.code, "message": self.message}
        return {"code": self.code, "message": self.message, "data": self.data}


def unknown_name(
    names: Iterable[str], known: Collection[str], what: str, where: str = ""
) -> str | None:
    """The message refusing the first of ``names`` not in ``known`` (None: all known), with
    the known name it is closest to: a misspelt field of an order must not be dropped quietly
    (``timeinforce`` placed a resting GTC where an IOC was meant)."""
    unknown = sorted(name for name in names if name not in known)
    if not unknown:
        return None
    name = str(unknown[0])
    close = difflib.get_close_matches(name.lower(), sorted(known, key=str.lower), n=1)
    if not close:  # a case slip: "timeinforce" for "timeInForce"
        lowered = {k.lower(): k for k in known}
        close = [lowered[m] for m in difflib.get_close_matches(name.lower(), list(lowered), n=1)]
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown {what} {name!r:.40}{where}{hint}; it takes {', '.join(sorted(known))}"
