"""The control API's methods (specs/control-api.md) on top of the node service."""

from __future__ import annotations

import math
import os
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from itertools import islice
from typing import Any, Final, TypeVar

import trio

from crdtbook import (
    SIDES,
    STP_MODES,
    TIFS,
    BadCancel,
    BadWitness,
    Book,
    Fill,
    InvalidOp,
    Level,
    Market,
    OffLot,
    OffTick,
    OrderState,
    SigningWaits,
    __version__,
)

from .control import optional_param, require_param
from .control_errors import (
    AMBIGUOUS,
    BAD_APPROVAL,
    BAD_REQUEST,
    DUPLICATE_CLIENT_ID,
    EMPTY_BOOK,
    INVALID_OP,
    KEY_EQUIVOCATED,
    NO_MAJORITY,
    NOT_FOUND,
    NOT_OWNER,
    NOT_READY,
    NOT_WITNESS,
    NOT_WITNESSED,
    OFF_LOT,
    OFF_TICK,
    STORE_ERROR,
    STORE_FULL,
    TIMEOUT,
    UNKNOWN_MARKET,
    UNKNOWN_METHOD,
    ControlError,
    unknown_name,
)
from .derive import answered_from
from .finality import STALL_SECONDS, FinalityView
from .service import HISTORY_CHUNK, KeyEquivocated, MarketState, NodeService
from .store import CompactedFill, StoreWriteError

__all__ = ["ControlAdapter"]

# Sides, times in force and self-trade modes are the core's lists (crdtbook.SIDES, TIFS,
# STP_MODES): the API accepts them as spelled there, and with dashes (``post-only``), as the
# CLI types them.
_RESTING = ("open", "partially_filled")
#: At most ~20 watch events a second per client: changes in between are coalesced into one
#: event (with all their op ids), so a busy market does not hash its state on every op.
WATCH_MIN_INTERVAL = 0.05
#: The intervals a watch may ask for, in s: below 5 ms a stream's events would cost more than
#: the changes they carry; above 10 s a client could not tell a quiet market from a dead node.
WATCH_INTERVALS: Final = (0.005, 10.0)
#: ``orders`` without a limit lists every order in memory and at most this many of the newest
#: that compactions moved to the store (``more`` says whether older ones remain there): a busy
#: trader's history grows without bound, an answer must not.
ORDERS_FROM_STORE_MAX: Final = 1000
#: ``submit`` with ``wait_final``: how long to wait by default, and at most.
FINAL_TIMEOUT: Final = 30.0
FINAL_TIMEOUT_MAX: Final = 3600.0
#: A watch stream remembers at most this many of the provisional fills it sent (the newest), to
#: report those that a reordering revoked.
WATCH_PROVISIONAL_MAX: Final = 1000
#: Said wherever finality is shown for a market without witnesses.
NEVER_FINAL: Final = "never final: no witnesses"


#: Prices and sizes as text, and the ticks and lots of the texts requests give, per market id
#: (the id hashes tick and lot too): requests, replies and watch events carry the same few
#: prices and sizes over and over, and the core converts each through Decimal (~1 us warm,
#: several times that on a node that wakes for each request; an order shows 5, a fill 4). At
#: most this many of each are kept per market, then that cache starts over.
TEXT_CACHE_MAX: Final = 4096
_price_texts: dict[bytes, dict[int, str]] = {}
_size_texts: dict[bytes, dict[int, str]] = {}
_tick_counts: dict[bytes, dict[str, int]] = {}
_lot_counts: dict[bytes, dict[str, int]] = {}
_K = TypeVar("_K", int, str)
_V = TypeVar("_V", int, str)


def _remembered(
    caches: dict[bytes, dict[_K, _V]], m: Market, key: _K, convert: Callable[[_K], _V]
) -> _V:
    """``convert(key)`` for market ``m``, from its cache when it was asked before (only
    results are kept: a conversion that raises is tried again next time)."""
    cache = caches.get(m.id)
    if cache is None:
        cache = caches[m.id] = {}
    value = cache.get(key)
    if value is None:
        value = convert(key)
        if len(cache) >= TEXT_CACHE_MAX:
            cache.clear()
        cache[key] = value
    return value


def _price(m: Market, ticks: int) -> str:
    """``m.ticks_to_price(ticks)``, remembered."""
    return _remembered(_price_texts, m, ticks, m.ticks_to_price)


def _size(m: Market, lots: int) -> str:
    """``m.lots_to_qty(lots)``, remembered."""
    return _remembered(_size_texts, m, lots, m.lots_to_qty)


#: Node-local times of a compacted fill or order, as the store kept them: (received_ms,
#: witnessed_ms). The replica no longer knows them.
Times = tuple[int | None, int | None]


def order_json(
    ms: MarketState, order: OrderState, me: bytes, times: Times | None = None
) -> dict[str, Any]:
    m = ms.market
    return {
        "id": order.id.hex(),
        "market": m.name,
        "author": order.author.hex(),
        "side": order.side,
        "price": _price(m, order.price),
        "price_ticks": order.price,
        "quantity": _size(m, order.quantity),
        "quantity_lots": order.quantity,
        "remaining": _size(m, order.remaining),
        "remaining_lots": order.remaining,
        "filled": _size(m, order.filled),
        "filled_lots": order.filled,
        "tif": order.tif,
        "status": order.status,
        "reason": order.reason,
        "tag": order.tag,
        "mine": order.author == me,
        "lamport": order.lamport,
        "final": order.final,
        "client_id": order.tag if m.witnessed else None,
        **_times(ms, order.id, order.final, times),
    }


def _times(
    ms: MarketState, op_id: bytes, final: bool, times: Times | None = None
) -> dict[str, int | None]:
    """When this node first applied the op (Unix ms; None for ops loaded from its store at start)
    and, once final, the time its witnesses gave its batch (``times``: as the store kept them,
    for compacted history)."""
    if times is not None:
        return {"received_ms": times[0], "witnessed_ms": times[1] if final else None}
    return {
        "received_ms": ms.received_ms.get(op_id),
        "witnessed_ms": ms.replica.witnessed_time(op_id) if final else None,
    }


def fill_json(
    ms: MarketState, index: int, fill: Fill, final: bool = False, times: Times | None = None
) -> dict[str, Any]:
    m = ms.market
    return {
        "index": index,
        "market": m.name,
        "taker": fill.taker.hex(),
        "maker": fill.maker.hex(),
        "taker_side": fill.taker_side,
        "price": _price(m, fill.price),
        "price_ticks": fill.price,
        "quantity": _size(m, fill.quantity),
        "quantity_lots": fill.quantity,
        "taker_author": fill.taker_author.hex(),
        "maker_author": fill.maker_author.hex(),
        "final": final,
        **_times(ms, fill.taker, final, times),
    }


def _hex_key(text: Any, what: str) -> bytes:
    """A 32-byte key (or a signature, ``size`` 64) from hex, else ``bad_request``."""
    return _hex_bytes(text, what, 32)


def _hex_bytes(text: Any, what: str, size: int) -> bytes:
    if not isinstance(text, str):
        raise ControlError(BAD_REQUEST, f"{what} must be a hex string, not {text!r:.60}")
    try:
        value = bytes.fromhex(text.strip())
    except ValueError:
        raise ControlError(BAD_REQUEST, f"{what} {text!r:.80} is not hex") from None
    if len(value) != size:
        raise ControlError(
            BAD_REQUEST,
            f"{what} must be {size} bytes ({2 * size} hex digits), not {len(value)} bytes",
        )
    return value


class ControlAdapter:
    """Implements ``node.control.ControlHandler`` for a running node."""

    def __init__(
        self,
        service: NodeService,
        network_status: Callable[[], dict[str, Any]],
        block: Callable[[str | None, float], list[str]] | None = None,
    ) -> None:
        self.service = service
        self._network_status = network_status
        self._block_fn = block
        self._methods: dict[str, Callable[[dict[str, Any]], Any]] = {
            "status": self._status,
            "markets": self._markets,
            "submit": self._submit,
            "cancel": self._cancel,
            "cancel_all": self._cancel_all,
            "amend": self._amend,
            "book": self._book,
            "fills": self._fills,
            "order": self._order,
            "orders": self._orders,
            "block": self._block,
            "id": self._id,
            "approve_reconfig": self._approve_reconfig,
            "reconfigure": self._reconfigure,
        }

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        fn = self._methods.get(method)
        if fn is None:
            known = ", ".join(sorted([*self._methods, "watch"]))
            raise ControlError(UNKNOWN_METHOD, f"unknown method {method!r}; known: {known}")
        _refuse_unknown_params(method, params)
        try:
            result = fn(params)
            if hasattr(result, "__await__"):
                result = await result
        except KeyEquivocated as exc:  # the key is spent in this market: the user must act
            raise ControlError(KEY_EQUIVOCATED, f"{exc}; nothing was signed") from None
        except SigningWaits as exc:  # own ops may be elsewhere: a new one would equivocate
            raise ControlError(NOT_READY, f"{exc}; nothing was signed") from None
        except StoreWriteError as exc:  # disk full or read-only: the node itself carries on
            raise ControlError(
                STORE_FULL if exc.reason == "full" else STORE_ERROR,
                f"{exc}; nothing was signed or sent: retry once the node's disk takes writes "
                "again (it resumes by itself)",
            ) from None
        return result

    # -- helpers -----------------------------------------------------------------------------

    def _market(self, params: dict[str, Any]) -> MarketState:
        name = optional_param(params, "market", str, None)
        markets = self.service.by_name
        if name is None:
            if len(markets) == 1:
                return next(iter(markets.values()))
            raise ControlError(
                BAD_REQUEST,
                f"this node follows several markets; name one of {', '.join(markets)} "
                "(--market in the CLI, symbol in the HTTP API)",
            )
        ms = markets.get(name)
        if ms is None:
            raise ControlError(
                UNKNOWN_MARKET,
                f"this node does not follow {name!r}; it follows {', '.join(markets)} "
                f"(start it with --market {name})",
            )
        return ms

    def _resolve_order(self, params: dict[str, Any]) -> tuple[MarketState, OrderState]:
        client_id = optional_param(params, "client_id", str, None)
        if client_id is not None:
            if params.get("order_id") is not None:
                raise ControlError(BAD_REQUEST, "give order_id or client_id, not both")
            return self._order_by_client_id(params, client_id)
        text = require_param(params, "order_id", str).strip().lower()
        if not text or any(c not in "0123456789abcdef" for c in text):
            raise ControlError(BAD_REQUEST, f"order id {text!r} is not hex")
        candidates = (
            [self._market(params)] if params.get("market") else list(self.service.markets.values())
        )
        matches: list[tuple[MarketState, OrderState]] = []
        for ms in candidates:
            if len(text) == 64:
                found = ms.order_with_times(bytes.fromhex(text))  # compacted ones too
                if found is not None:
                    matches.append((ms, found.order))
                continue
            by_id = {o.id: o for o in ms.orders_with_prefix(text, 2)}  # compacted ones
            by_id.update((o.id, o) for o in ms.replica.orders() if o.id.hex().startswith(text))
            matches.extend((ms, o) for o in by_id.values())
        if not matches:
            raise ControlError(NOT_FOUND, f"no order with id {text}")
        if len(matches) > 1:
            raise ControlError(
                AMBIGUOUS, f"id prefix {text} matches {len(matches)} orders; give more digits"
            )
        return matches[0]

    def _order_by_client_id(
        self, params: dict[str, Any], client_id: str
    ) -> tuple[MarketState, OrderState]:
        """This node's order carrying ``client_id`` (client ids are per author)."""
        ms = self._market(params)
        if not ms.market.witnessed:
            raise ControlError(
                NOT_WITNESSED,
                f"{ms.market.name} has no witnesses, so it has no client order ids (a tag there "
                "is a free label, not unique); use the order id",
            )
        order = ms.order_by_client_id(self.service.identity.public_key, client_id)
        if order is None:
            raise ControlError(
                NOT_FOUND, f"no order of this node's key with client id {client_id!r:.80}"
            )
        return ms, order

    def _witnessed_market(self, params: dict[str, Any]) -> MarketState:
        ms = self._market(params)
        if not ms.market.witnessed:
            raise ControlError(
                NOT_WITNESSED,
                f"{ms.market.name} has no witnesses ({NEVER_FINAL}); only a market defined "
                "with witnesses (NAME:TICK:LOT:KEY,...) has a witness set to change",
            )
        return ms

    def _finality(self, ms: MarketState) -> FinalityView:
        return ms.finality.evaluate(
            ms.replica, self.service.identity.public_key, trio.current_time()
        )

    def _witness_keys(self, params: dict[str, Any]) -> list[bytes]:
        keys = require_param(params, "witnesses", list)
        if not keys:
            raise ControlError(BAD_REQUEST, "witnesses must name at least one key")
        out = [_hex_key(k, "witness key") for k in keys]
        if len(set(out)) != len(out):
            raise ControlError(BAD_REQUEST, "witnesses names a key twice")
        return out

    # -- methods -----------------------------------------------------------------------------

    def _status(self, params: dict[str, Any]) -> dict[str, Any]:
        net = self._network_status()
        # The digest hashes the whole derived state (tens of ms on a large book): a script
        # polling status can leave it out.
        with_digest = optional_param(params, "digest", bool, True)
        return {
            **net,
            "author": self.service.identity.public_key.hex(),
            "markets": [
                self._market_status(ms, with_digest) for ms in self.service.markets.values()
            ],
            "public_key": self.service.identity.public_key.hex(),
            # null while the store takes writes; else why it refuses them (the node refuses new
            # ops meanwhile, its own and its peers', and resumes by itself).
            "store_fault": _store_fault(self.service.store_fault),
            "version": __version__,
            "uptime": time.time() - self.service.started,
            "pid": os.getpid(),
        }

    def _market_status(self, ms: MarketState, with_digest: bool = True) -> dict[str, Any]:
        r = ms.replica
        return {
            "name": ms.market.name,
            "id": ms.market.id.hex(),
            "tick": ms.market.tick,
            "lot": ms.market.lot,
            "ops": len(r),
            "pending": r.pending_count,
            "missing": len(r.missing()),
            "heads": [h.hex() for h in r.heads()],
            "digest": ms.digest().hex() if with_digest else None,
            "last_sync": ms.last_sync,
            "orders": r.order_count,
            "fills": r.fill_count,
            # Out of memory (compaction, witnessed markets only): the store answers for them.
            "compacted_ops": r.compacted_ops,
            "compacted_fills": r.compacted_fills,
            "refused": ms.refused,
            # This node's key signed two ops at one sequence number here: it signs only cancels.
            "key_equivocated": self.service.identity.public_key in r.forked_authors(),
            # Joins (node.join): joined_from_point, history ("complete" | "fetching" | "absent").
            **ms.join_status(),
            **self._finality_status(ms),
        }

    def _finality_status(self, ms: MarketState) -> dict[str, Any]:
        r = ms.replica
        view = self._finality(ms)
        return {
            "witnessed": r.witnessed,
            "frontier": r.frontier,
            "final_ops": r.final_count,
            "final_fills": r.final_fill_count(),
            "epoch": r.epoch,
            "finality": view.state,
            "stalled_on": [key.hex() for key in view.stalled_on],
            # This node's latest point, as a majority of the witnesses attest it when this
            # node's own state there differs (null: no such dispute): its state is wrong.
            "point_disputed": _disputed(ms),
            "witnesses": [
                {
                    "key": w.key.hex(),
                    "me": w.me,
                    "current": w.current,
                    "forked": w.forked,
                    "heartbeat_lamport": w.heartbeat_lamport,
                    "heartbeat_seq": w.heartbeat_seq,
                    "silent_s": None if w.silent_s is None else round(w.silent_s, 3),
                    "waited_s": None if w.waited_s is None else round(w.waited_s, 3),
                }
                for w in view.witnesses
            ],
        }

    def _markets(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "name": m.market.name,
                "id": m.market.id.hex(),
                "tick": m.market.tick,
                "lot": m.market.lot,
                "spec": m.market.spec,
                "version": m.market.version,
                "witnessed": m.market.witnessed,
                "witnesses": len(m.replica.witnesses()) if m.market.witnessed else 0,
                "frontier": m.replica.frontier,
            }
            for m in self.service.markets.values()
        ]

    async def _submit(self, params: dict[str, Any]) -> dict[str, Any]:
        ms = self._market(params)
        side = require_param(params, "side", str, choices=SIDES)
        tif = optional_param(params, "tif", str, "gtc").replace("-", "_").lower()
        if tif not in TIFS:
            raise ControlError(BAD_REQUEST, f"tif must be one of {', '.join(TIFS)}, not {tif!r}")
        tag, stp = self._tag_and_stp(ms, params)
        wait_final = optional_param(params, "wait_final", bool, False)
        timeout = optional_param(params, "timeout", float, FINAL_TIMEOUT)
        if not (math.isfinite(timeout) and 0 < timeout <= FINAL_TIMEOUT_MAX):
            raise ControlError(BAD_REQUEST, f"timeout must be in (0, {FINAL_TIMEOUT_MAX:.0f}] s")
        if wait_final and not ms.market.witnessed:
            raise ControlError(
                NOT_WITNESSED,
                f"{ms.market.name} has no witnesses, so its orders are {NEVER_FINAL}; "
                "submit without wait_final",
            )
        quantity = _lots(ms, str(require_param(params, "quantity", str)))
        protection: dict[str, str] | None = None
        if optional_param(params, "market_order", bool, False):
            if params.get("price") is not None:
                raise ControlError(BAD_REQUEST, "a market order takes no price (it takes band)")
            if tif not in ("gtc", "ioc"):
                raise ControlError(BAD_REQUEST, "a market order is immediate-or-cancel: no tif")
            tif = "ioc"
            band = optional_param(params, "band", str, "1%")
            price, protection = _market_order_price(ms, side, band)
        else:
            price = _ticks(ms, str(require_param(params, "price", str)))
        before = ms.replica.fill_count
        crossed = _crossed(ms, side, price, self.service.identity.public_key)
        try:
            op = await self.service.submit(ms, side, price, quantity, tif, tag, stp)
        except (InvalidOp, ValueError) as exc:
            raise ControlError(INVALID_OP, str(exc)) from None
        if wait_final:
            with trio.move_on_after(timeout):
                await self.service.wait_final(ms, op.id)
            if not ms.replica.is_final(op.id):
                # The order stands: the error carries its provisional result, so that a script
                # learns its id without parsing the message (and does not place it again).
                placed = self._placed(ms, op.id, _taken(ms, op.id, before), crossed)
                raise ControlError(TIMEOUT, self._not_final_message(ms, op.id, timeout), placed)
            taken = _fills_of(ms, op.id)
        else:
            taken = _taken(ms, op.id, before)
        result = self._placed(ms, op.id, taken, crossed)
        if protection is not None:
            result["market_order"] = protection
        return result

    def _placed(
        self,
        ms: MarketState,
        op_id: bytes,
        taken: list[tuple[int, Fill]],
        crossed: list[bytes],
    ) -> dict[str, Any]:
        """The ``submit`` result for the order ``op_id`` this node just placed (``crossed``: the
        resting orders its price reached just before, see :func:`_crossed`)."""
        me = self.service.identity.public_key
        found = ms.order_with_times(op_id)  # compacted already if it waited to be final
        assert found is not None
        order = found.order
        final_fills = ms.replica.final_fill_count()
        # Self-trade prevention: this node's makers the order expired (they rested where its
        # price reached and now are expired for self_trade), and the order itself when it
        # stopped there.
        expired = [
            o
            for o in map(ms.replica.order, crossed)
            if o is not None
            and o.author == me
            and o.status == "expired"
            and o.reason == "self_trade"
        ]
        if order.reason == "self_trade":
            expired.append(order)
        return {
            "order": order_json(ms, order, me),
            "fills": [fill_json(ms, i, f, i < final_fills) for i, f in taken],
            "final": ms.replica.is_final(op_id),
            "self_trade_expired": [order_json(ms, o, me) for o in expired],
        }

    def _tag_and_stp(self, ms: MarketState, params: dict[str, Any]) -> tuple[str | None, str]:
        """The new order's tag (``client_id`` is its name in a witnessed market) and self-trade
        mode, checked before anything is signed."""
        tag = optional_param(params, "tag", str, None)
        client_id = optional_param(params, "client_id", str, None)
        if client_id == "":
            raise ControlError(BAD_REQUEST, "client_id must not be empty (leave it out instead)")
        if client_id is not None:
            if tag is not None and tag != client_id:
                raise ControlError(
                    BAD_REQUEST, "client_id is the tag of a witnessed market's order: give one"
                )
            if not ms.market.witnessed:
                raise ControlError(
                    NOT_WITNESSED,
                    f"{ms.market.name} has no witnesses, so it has no client order ids (they "
                    "need protocol version 2); use tag for a free label",
                )
            tag = client_id
        stp = optional_param(params, "stp", str, "expire_maker").replace("-", "_").lower()
        if stp not in STP_MODES:
            raise ControlError(
                BAD_REQUEST, f"stp must be one of {', '.join(STP_MODES)}, not {stp!r:.40}"
            )
        if stp != "expire_maker" and not ms.market.witnessed:
            raise ControlError(
                NOT_WITNESSED,
                f"{ms.market.name} has no witnesses: its only self-trade mode is expire_maker "
                f"(stp {stp} needs a witnessed market, protocol version 2)",
            )
        me = self.service.identity.public_key
        if (
            tag is not None
            and ms.market.witnessed
            and ms.replica.order_by_client_id(me, tag) is not None
        ):
            raise ControlError(
                DUPLICATE_CLIENT_ID,
                f"client id {tag!r:.80} is already used by this node's order in "
                f"{ms.market.name}; client ids are unique per author (pick another)",
            )
        return tag, stp

    def _not_final_message(self, ms: MarketState, op_id: bytes, timeout: float) -> str:
        view = self._finality(ms)
        now = trio.current_time()
        waits = []
        for key in view.waiting_on:
            silent = ms.finality.silent_for(key, now)
            heard = (
                "no heartbeat seen since this node started"
                if silent is None
                else f"last heartbeat {silent:.1f} s ago"
            )
            me = "this node, " if key == self.service.identity.public_key else ""
            waits.append(f"{key.hex()[:16]} ({me}{heard})")
        waiting = "; ".join(waits) or "no witness (a reconfiguration may be under way)"
        stalled = (
            f"; finality is stalled (a witness silent for over {STALL_SECONDS:.0f} s stalls it "
            "until it returns or a majority of witnesses removes it)"
            if view.stalled_on
            else ""
        )
        return (
            f"order {op_id.hex()} was submitted and stands, but is not final after "
            f"{timeout:g} s: finality waits for heartbeats from {waiting}{stalled}"
        )

    async def _cancel(self, params: dict[str, Any]) -> dict[str, Any]:
        ms, order = self._resolve_order(params)
        me = self.service.identity.public_key
        if order.author != me:
            raise ControlError(
                NOT_OWNER, "this order was signed by another key; only its author can cancel it"
            )
        live = ms.replica.order(order.id)
        # The order's state must be final, not only its op: a resting order filled by a
        # taker not yet final can rest again if that taker moves, and the cancel then matters.
        if order.status not in _RESTING and (live is None or live.final):
            # Finished, and final (a compacted order is both): no cancel can change it, so
            # none is signed. (One was, and an order compacted at the latest point then had
            # no state to answer with: an internal error after the op was sent.)
            found = None if live is not None else ms.order_with_times(order.id)
            times = None if found is None else (found.received_ms, found.witnessed_ms)
            return {
                "order": order_json(ms, order, me, times),
                "cancel_id": None,
                "effective": False,
                "final": True,
            }
        if order.status == "cancelled":
            # By a cancel (or cancel-all) of this key, the only one whose cancels count, held
            # here: a new cancel would hold it in its past, so follow it in every order, and
            # find the order finished. Nothing to sign (a retry loop grew the log by one op a
            # call where nothing compacts); `final` says whether that cancellation is final.
            return {
                "order": order_json(ms, order, me),
                "cancel_id": None,
                "effective": False,
                "final": False,
            }
        try:
            op = await self.service.cancel(ms, order.id)
        except BadCancel as exc:
            raise ControlError(INVALID_OP, str(exc)) from None
        now = ms.replica.order(order.id)
        assert now is not None
        # ``effective`` is the cancel's effect in this node's order now; until the cancel is
        # final, a taker that sorts before it can still fill the order first (and never
        # without witnesses).
        return {
            "order": order_json(ms, now, me),
            "cancel_id": op.id.hex(),
            "effective": bool(ms.replica.cancel_effective(op.id)),
            "final": ms.replica.is_final(op.id),
        }

    async def _amend(self, params: dict[str, Any]) -> dict[str, Any]:
        """Cancel-replace one of this node's resting orders: a cancel and a new order (same
        side and time in force; new price and/or quantity) signed and sent together."""
        ms, old = self._resolve_order(params)
        me = self.service.identity.public_key
        if old.author != me:
            raise ControlError(
                NOT_OWNER, "this order was signed by another key; only its author can amend it"
            )
        if old.status not in _RESTING:
            raise ControlError(
                INVALID_OP,
                f"order {old.id.hex()} is {old.status.replace('_', ' ')}, not resting: there is "
                "nothing to amend (submit a new order)",
            )
        new_params = {k: v for k, v in params.items() if k in ("tag", "stp")}
        if params.get("new_client_id") == "":
            raise ControlError(
                BAD_REQUEST, "new_client_id must not be empty (leave it out instead)"
            )
        if params.get("new_client_id") is not None:
            new_params["client_id"] = params["new_client_id"]
        elif "tag" not in new_params and not ms.market.witnessed:
            new_params["tag"] = old.tag  # a free label there: it carries over
        tag, stp = self._tag_and_stp(ms, new_params)
        price_text = optional_param(params, "price", str, None)
        qty_text = optional_param(params, "quantity", str, None)
        if price_text is None and qty_text is None:
            raise ControlError(BAD_REQUEST, "amend needs a new price, a new quantity or both")
        price = old.price if price_text is None else _ticks(ms, price_text)
        quantity = old.remaining if qty_text is None else _lots(ms, qty_text)
        before = ms.replica.fill_count
        crossed = _crossed(ms, old.side, price, self.service.identity.public_key)
        try:
            cancel, new = await self.service.amend(ms, old.id, price, quantity, tag, stp)
        except (BadCancel, InvalidOp) as exc:
            raise ControlError(INVALID_OP, str(exc)) from None
        cancelled = ms.replica.order(old.id)
        assert cancelled is not None
        result: dict[str, Any] = {
            "cancel_id": cancel.id.hex(),
            "cancelled": order_json(ms, cancelled, me),
            "effective": bool(ms.replica.cancel_effective(cancel.id)),
            "cancel_final": ms.replica.is_final(cancel.id),
        }
        if new is None:  # refused after the cancel was signed: say so, the cancel stands
            raise ControlError(
                INVALID_OP,
                f"order {old.id.hex()} was cancelled (cancel op {cancel.id.hex()}) but the "
                "replacement could not be signed; submit it again",
            )
        return {**result, **self._placed(ms, new.id, _taken(ms, new.id, before), crossed)}

    async def _cancel_all(self, params: dict[str, Any]) -> dict[str, Any]:
        """One op cancelling every resting order of this node (with ``prefix``: whose client
        id starts with it) at its place in the total order."""
        ms = self._market(params)
        prefix = optional_param(params, "prefix", str, None)
        if not ms.market.witnessed:
            raise ControlError(
                NOT_WITNESSED,
                f"{ms.market.name} has no witnesses: cancel-all needs a witnessed market "
                "(protocol version 2); cancel its orders one by one",
            )
        try:
            op = await self.service.cancel_all(ms, prefix)
        except ValueError as exc:
            raise ControlError(BAD_REQUEST, str(exc)) from None
        except InvalidOp as exc:
            raise ControlError(INVALID_OP, str(exc)) from None
        return {
            "market": ms.market.name,
            "cancel_id": op.id.hex(),
            "prefix": prefix,
            "cancelled": ms.replica.cancelled_by(op.id) or 0,
            "final": ms.replica.is_final(op.id),
        }

    def _book(self, params: dict[str, Any]) -> dict[str, Any]:
        ms = self._market(params)
        depth = optional_param(params, "depth", int, 10)
        if depth < 1:
            raise ControlError(BAD_REQUEST, "depth must be at least 1")
        book = ms.replica.book(depth)
        m = ms.market
        final_bids, final_asks = _final_levels(ms, book, depth)

        def levels(side: tuple[Level, ...], final: dict[int, int]) -> list[dict[str, Any]]:
            return [
                {
                    "price": m.ticks_to_price(lv.price),
                    "price_ticks": lv.price,
                    "quantity": m.lots_to_qty(lv.quantity),
                    "quantity_lots": lv.quantity,
                    "orders": len(lv.orders),
                    "final": final.get(lv.price) == lv.quantity,
                }
                for lv in side
            ]

        bid, ask = book.best_bid, book.best_ask
        both = bid is not None and ask is not None
        return {
            "market": m.name,
            "bids": levels(book.bids, final_bids),
            "asks": levels(book.asks, final_asks),
            "best_bid": None if bid is None else m.ticks_to_price(bid),
            "best_ask": None if ask is None else m.ticks_to_price(ask),
            "spread": m.ticks_to_price(ask - bid) if both else None,  # type: ignore[operator]
            "mid": _mid(m.ticks_to_price(bid), m.ticks_to_price(ask)) if both else None,  # type: ignore[arg-type]
            "digest": ms.digest().hex(),
            "witnessed": ms.replica.witnessed,
            "frontier": ms.replica.frontier,
        }

    def _fills(self, params: dict[str, Any]) -> dict[str, Any]:
        ms = self._market(params)
        limit = optional_param(params, "limit", int, 100)
        if limit < 1:
            raise ControlError(BAD_REQUEST, "limit must be at least 1")
        mine = optional_param(params, "mine", bool, False)
        start = optional_param(params, "start", int, None)
        if start is not None and start < 0:
            raise ControlError(BAD_REQUEST, "start is a fill's index: 0 or more")
        if start is not None and mine:
            raise ControlError(BAD_REQUEST, "start pages through every fill; it does not "
                               "combine with mine")
        replica = ms.replica
        final = replica.final_fill_count()
        # Compacted fills come from the store, with the times it kept (ms.fills).
        if mine:
            found = self._my_fills(ms, limit)
        elif start is not None:
            # A joined node's past not derived yet: the pages begin at its join point.
            start = max(start, answered_from(ms))
            found = ms.fills(start, start + limit)
        else:
            found = ms.fills(replica.fill_count - limit)
        fills = [
            fill_json(ms, c.number, c.fill, c.number < final, (c.received_ms, c.witnessed_ms))
            for c in found
        ]
        return {
            "market": ms.market.name,
            "fills": fills,
            "witnessed": replica.witnessed,
            "final_count": final,
            "fill_count": replica.fill_count,
        }

    def _my_fills(self, ms: MarketState, limit: int) -> list[CompactedFill]:
        """The newest ``limit`` fills this node's key took part in (oldest first), scanning back
        from the newest fills in growing chunks (into compacted history, from the store)."""
        me = self.service.identity.public_key
        found: list[CompactedFill] = []
        high, step = ms.replica.fill_count, 256
        while high > 0 and len(found) < limit:
            low = max(0, high - step)
            chunk = ms.fills(low, high)
            for offset in range(len(chunk) - 1, -1, -1):
                fill = chunk[offset].fill
                if fill.taker_author == me or fill.maker_author == me:
                    found.append(chunk[offset])
                    if len(found) == limit:
                        break
            high, step = low, min(step * 2, HISTORY_CHUNK)
        return found[::-1]

    def _order(self, params: dict[str, Any]) -> dict[str, Any]:
        ms, order = self._resolve_order(params)
        found = None if ms.replica.order(order.id) else ms.order_with_times(order.id)
        times = None if found is None else (found.received_ms, found.witnessed_ms)
        return order_json(ms, order, self.service.identity.public_key, times)

    def _orders(self, params: dict[str, Any]) -> dict[str, Any]:
        ms = self._market(params)
        me = self.service.identity.public_key
        every = optional_param(params, "all", bool, False)
        only_open = optional_param(params, "open", bool, False)
        limit = optional_param(params, "limit", int, None)
        if limit is not None and limit < 1:
            raise ControlError(BAD_REQUEST, "limit must be at least 1")
        author = None if every else me
        orders = ms.replica.orders(author)
        if only_open:
            orders = [o for o in orders if o.status in _RESTING]
        more = limit is not None and len(orders) > limit
        if limit is not None:
            orders = orders[-limit:]  # the newest
        listed = [order_json(ms, o, me) for o in orders]
        # Finished, final orders a compaction took out of memory (witnessed markets) come from
        # the store, older than those in memory: the newest first, up to the limit (or
        # ORDERS_FROM_STORE_MAX), one more read to tell whether older ones remain.
        room = ORDERS_FROM_STORE_MAX if limit is None else limit - len(orders)
        if not only_open and not more:
            older = ms.compacted_orders_newest(author, room + 1)
            more = len(older) > room
            if room:
                listed[:0] = [
                    order_json(ms, row.order, me, (row.received_ms, row.witnessed_ms))
                    for row in older[-room:]
                ]
        return {"market": ms.market.name, "orders": listed, "more": more}

    def _block(self, params: dict[str, Any]) -> dict[str, Any]:
        """Cut this node off from one peer (or every connected peer) for a while."""
        peer = optional_param(params, "peer_id", str, None)
        seconds = require_param(params, "seconds", float)
        if not 0 < seconds <= 24 * 3600:
            raise ControlError(BAD_REQUEST, "seconds must be in (0, 86400]")
        if self._block_fn is None:
            raise ControlError(BAD_REQUEST, "this node cannot block peers")
        try:
            blocked = self._block_fn(peer, seconds)
        except ValueError as exc:  # not a peer id, or this node's own
            raise ControlError(BAD_REQUEST, f"cannot block {peer!r:.60}: {exc}") from None
        return {"blocked": blocked, "seconds": seconds}

    def _id(self, params: dict[str, Any]) -> dict[str, Any]:
        net = self._network_status()
        return {
            "peer_id": net.get("peer_id"),
            "addrs": net.get("addrs", []),
            "public_key": self.service.identity.public_key.hex(),
        }

    def _approve_reconfig(self, params: dict[str, Any]) -> dict[str, Any]:
        """This node's approval, as a witness in force, of a new witness set."""
        ms = self._witnessed_market(params)
        witnesses = self._witness_keys(params)
        me = self.service.identity.public_key
        current = ms.replica.witnesses()
        if me not in current:
            raise ControlError(
                NOT_WITNESS,
                f"this node's key {me.hex()[:16]} is not a witness of {ms.market.name} in force "
                f"(epoch {ms.replica.epoch}): only a witness in force can approve",
            )
        try:
            signature = self.service.approve_reconfig(ms, witnesses)
        except (BadWitness, ValueError) as exc:
            raise ControlError(BAD_REQUEST, f"cannot approve this witness set: {exc}") from None
        return {"witness": me.hex(), "signature": signature.hex(), "epoch": ms.replica.epoch + 1}

    async def _reconfigure(self, params: dict[str, Any]) -> dict[str, Any]:
        """Sign a reconfiguration to ``witnesses`` with other witnesses' approvals."""
        ms = self._witnessed_market(params)
        witnesses = self._witness_keys(params)
        raw = optional_param(params, "approvals", list, [])
        me = self.service.identity.public_key
        replica = ms.replica
        try:  # the set's own rules first: no approval can mend those
            replica.check_next_witnesses(witnesses)
        except ValueError as exc:  # BadWitness is one
            raise ControlError(BAD_REQUEST, f"not a valid witness set: {exc}") from None
        current = replica.witnesses()
        name, epoch = ms.market.name, replica.epoch
        if me not in current:
            raise ControlError(
                NOT_WITNESS,
                f"this node's key {me.hex()[:16]} is not a witness of {name} in force "
                f"(epoch {epoch}): only a witness in force can sign a reconfiguration",
            )
        approvals: dict[bytes, bytes] = {}
        for item in raw:
            if not isinstance(item, dict):
                raise ControlError(
                    BAD_REQUEST, 'each approval must be {"witness": hex, "signature": hex}'
                )
            key = _hex_key(item.get("witness"), "approval witness")
            approvals[key] = _hex_bytes(item.get("signature"), "approval signature", 64)
        approvals.pop(me, None)  # this node's own signature is the op's
        strangers = [key.hex()[:16] for key in approvals if key not in current]
        if strangers:
            raise ControlError(
                NOT_WITNESS,
                f"approval(s) from {', '.join(strangers)}: not witnesses of {name} in force "
                f"(epoch {epoch}); only the {len(current)} witnesses in force can approve",
            )
        if 2 * (1 + len(approvals)) <= len(current):
            need = len(current) // 2
            raise ControlError(
                NO_MAJORITY,
                f"a reconfiguration of {name} needs a majority of its {len(current)} witnesses: "
                f"this node's signature and {need} approval(s), not {len(approvals)}; get them "
                "with approve_reconfig at other witnesses' nodes",
            )
        try:
            op = await self.service.reconfigure(ms, witnesses, approvals)
        except BadWitness as exc:  # before ValueError: it is one
            raise ControlError(
                BAD_APPROVAL,
                f"{exc} (an approval is for one exact witness set at epoch {epoch + 1}: ask again "
                "with the same list)",
            ) from None
        except InvalidOp as exc:
            raise ControlError(INVALID_OP, str(exc)) from None
        except ValueError as exc:  # the set itself (e.g. more keys than a market may have)
            raise ControlError(BAD_REQUEST, f"not a valid witness set: {exc}") from None
        return {"op": op.id.hex(), "epoch": ms.replica.epoch}

    async def watch(self, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        ms = self._market(params)
        with_digest = optional_param(params, "digest", bool, True)
        interval = optional_param(params, "interval", float, WATCH_MIN_INTERVAL)
        if not (math.isfinite(interval) and WATCH_INTERVALS[0] <= interval <= WATCH_INTERVALS[1]):
            low, high = WATCH_INTERVALS
            raise ControlError(
                BAD_REQUEST, f"interval must be {low:g} to {high:g} s, not {interval:g}"
            )
        with_finalized = optional_param(params, "finalized", bool, False)
        yield {"watching": ms.market.name}
        sent = WatchedFills(ms)
        final_ops = ms.replica.final_count
        async for applied, dropped in self.service.changes(ms, interval):
            fills, revoked, became_final = sent.update()
            final = sent.final
            extra: dict[str, Any] = {}
            if with_finalized:  # the ids of the ops that became final (they never change)
                now_final = ms.replica.final_count
                newly = islice(ms.replica.iter_ops(final_ops), max(0, now_final - final_ops))
                extra["finalized"] = [op.id.hex() for op in newly]
                final_ops = max(final_ops, now_final)
            yield {
                "event": "update",
                "market": ms.market.name,
                "ops": len(ms.replica),
                "digest": ms.digest().hex() if with_digest else None,
                "fills": [fill_json(ms, i, f, i < final) for i, f in fills],
                "final_fill_count": final,
                "revoked": [fill_json(ms, i, f) for i, f in revoked],
                "became_final": became_final,
                "applied": [ident.hex() for ident in applied],
                "dropped": dropped,
                **extra,
            }


class WatchedFills:
    """The fills one watch stream has told its client about, to say what changed since.

    Fills below the final count never change. The others (provisional) can: a late op, or in a
    witnessed market a heartbeat batch, may reorder or remove them. The stream keeps the newest
    ``WATCH_PROVISIONAL_MAX`` provisional fills it sent (or that existed when it began) and on
    each update reports: the fills to (re)send, from the first new or changed index on; the
    provisional fills that are no longer at their index (``revoked``); and the indexes the client
    holds unchanged that became final (``became_final``)."""

    def __init__(self, ms: MarketState) -> None:
        self.ms = ms
        replica = ms.replica
        #: Which replica the token below is for (a reload replaces it), and the core's token
        #: that says from which index fills may have changed since the last update.
        self.replica = replica
        _, self.token = replica.fill_changes_since(None)
        self.seen = replica.fill_count
        self.final = replica.final_fill_count()
        low = max(self.final, self.seen - WATCH_PROVISIONAL_MAX)
        self.provisional: dict[int, Fill] = {
            low + i: fill for i, fill in enumerate(ms.fill_list(low))
        }
        #: The indexes of ``provisional``, ascending: an update then touches only the new,
        #: changed and dropped ones, not all WATCH_PROVISIONAL_MAX of them (a market without
        #: witnesses keeps that many for ever, and scanning and sorting them cost ~130 us per
        #: event, bench/bench_ingest.py).
        self.indexes: list[int] = list(self.provisional)

    def update(self) -> tuple[list[tuple[int, Fill]], list[tuple[int, Fill]], list[int]]:
        """(fills to send, revoked fills, indexes that became final), as (index, fill) pairs."""
        replica = self.ms.replica
        count = replica.fill_count
        final = min(count, max(self.final, replica.final_fill_count()))
        known, indexes = self.provisional, self.indexes
        token = self.token if replica is self.replica else None
        changed, self.token = replica.fill_changes_since(token)
        self.replica = replica
        # Fills below the lowest index a rewind took back are as they were: compare from there.
        first_changed = count if changed is None else changed
        low = min(self.seen, count, max(indexes[0] if indexes else count, first_changed))
        current = self.ms.fill_list(low)  # compacted meanwhile: from the store
        revoked = [
            (i, known[i])
            for i in indexes[bisect_left(indexes, low) :]
            if i >= count or current[i - low] != known[i]
        ]
        start = min(self.seen, count)
        if revoked:
            start = min(start, revoked[0][0])
        fills = [(i, current[i - low]) for i in range(start, count)]
        became_final = list(range(self.final, min(final, start)))
        # Forget the indexes that became final or are past the fills there are now.
        below, past = bisect_left(indexes, final), bisect_left(indexes, count)
        for i in indexes[:below]:
            del known[i]
        for i in indexes[past:]:
            del known[i]
        del indexes[past:]
        del indexes[:below]
        # Every fill sent that is not final is known from now on: the indexes from the first
        # of them to the newest are all held (those held before were below ``count`` too).
        first_kept = max(start, final)
        if first_kept < count:
            for i, fill in fills[first_kept - start :]:
                known[i] = fill
            del indexes[bisect_left(indexes, first_kept) :]
            indexes.extend(range(first_kept, count))
        excess = len(indexes) - WATCH_PROVISIONAL_MAX
        if excess > 0:  # the oldest go
            for i in indexes[:excess]:
                del known[i]
            del indexes[:excess]
        self.seen, self.final = count, final
        return fills, revoked, became_final


def _final_levels(ms: MarketState, book: Book, depth: int) -> tuple[dict[int, int], dict[int, int]]:
    """price -> size of the final book's levels, for every price ``book`` shows (bids, asks);
    empty maps in a market without witnesses (nothing is final there)."""
    replica = ms.replica
    if not replica.witnessed or not replica.frontier:
        return {}, {}
    final = replica.final_book(depth)

    def side(shown: tuple[Level, ...], kept: tuple[Level, ...], better: int) -> bool:
        # Every shown price is decided by the final book's top levels unless it lies past the
        # worst of them while they are a full ``depth`` (then that price may be further down).
        if len(kept) < depth or not shown:
            return True
        worst = kept[-1].price
        return all((lv.price - worst) * better >= 0 for lv in shown)

    if not (side(book.bids, final.bids, 1) and side(book.asks, final.asks, -1)):
        final = replica.final_book()
    return (
        {lv.price: lv.quantity for lv in final.bids},
        {lv.price: lv.quantity for lv in final.asks},
    )


def _fills_of(ms: MarketState, op_id: bytes) -> list[tuple[int, Fill]]:
    """(index, fill) of every fill the placed order ``op_id`` is in (as taker or maker), oldest
    first. Fills follow the total order, which sorts by placement first, and an order's fills
    all come at or after its own place: scan back from the newest fills, in growing chunks,
    until the fills of earlier batches."""
    replica = ms.replica
    place = replica.placement(op_id)
    if place is None:  # compacted since it turned final: it is placed at or below the frontier
        place = replica.frontier
    found: list[tuple[int, Fill]] = []
    high, step = replica.fill_count, 64
    while high > 0:
        low = max(0, high - step)
        chunk = ms.fill_list(low, high)
        for offset in range(len(chunk) - 1, -1, -1):
            fill = chunk[offset]
            if fill.taker == op_id or fill.maker == op_id:
                found.append((low + offset, fill))
                continue
            taker_place = replica.placement(fill.taker)
            if taker_place is not None and taker_place < place:
                return found[::-1]
        high, step = low, step * 2
    return found[::-1]


def _crossed(ms: MarketState, side: str, price: int, me: bytes) -> list[bytes]:
    """The ids of this node's resting orders a ``side`` order at ``price`` (ticks) can reach,
    in priority order: the only ones its self-trade prevention can expire."""
    return ms.replica.resting_reached(side, price, me)


def _taken(ms: MarketState, op_id: bytes, before: int) -> list[tuple[int, Fill]]:
    """(index, fill) of the fills the order ``op_id``, just placed, took as taker (``before``:
    the fill count just before it)."""
    start = min(before, ms.replica.fill_count)
    return [(start + i, f) for i, f in enumerate(ms.fill_list(start)) if f.taker == op_id]


#: The params of the methods that sign (ops, or a witness's approval). Any other name is
#: refused before anything is signed: a misspelt ``tif`` or ``wait_final`` would otherwise
#: place an order that is not the one meant (a resting GTC for an IOC), a misspelt
#: ``approvals`` sign a reconfiguration without them. Read methods ignore names they do not
#: know.
ORDER_ENTRY_PARAMS: Final[dict[str, frozenset[str]]] = {
    "submit": frozenset(
        {
            "market",
            "side",
            "price",
            "quantity",
            "tif",
            "tag",
            "client_id",
            "stp",
            "market_order",
            "band",
            "wait_final",
            "timeout",
        }
    ),
    "cancel": frozenset({"market", "order_id", "client_id"}),
    "amend": frozenset(
        {"market", "order_id", "client_id", "price", "quantity", "new_client_id", "tag", "stp"}
    ),
    "cancel_all": frozenset({"market", "prefix"}),
    "reconfigure": frozenset({"market", "witnesses", "approvals"}),
    "approve_reconfig": frozenset({"market", "witnesses"}),
}


def _disputed(ms: MarketState) -> dict[str, Any] | None:
    disputed = ms.finality.disputed
    if disputed is None or ms.replica.disputed_point() != disputed:
        return None
    return {"n": disputed[0], "attested_hash": disputed[1].hex()}


def _store_fault(fault: StoreWriteError | None) -> dict[str, str] | None:
    return None if fault is None else {"reason": fault.reason, "message": str(fault)}


def _refuse_unknown_params(method: str, params: dict[str, Any]) -> None:
    known = ORDER_ENTRY_PARAMS.get(method)
    refusal = None if known is None else unknown_name(params, known, "param", f" for {method}")
    if refusal is not None:
        raise ControlError(BAD_REQUEST, f"{refusal}; nothing was signed")


def _ticks(ms: MarketState, text: str) -> int:
    m = ms.market
    try:
        return _remembered(_tick_counts, m, text, m.price_to_ticks)
    except OffTick as exc:
        raise ControlError(OFF_TICK, str(exc)) from None


def _lots(ms: MarketState, text: str) -> int:
    m = ms.market
    try:
        return _remembered(_lot_counts, m, text, m.qty_to_lots)
    except OffLot as exc:
        raise ControlError(OFF_LOT, str(exc)) from None


#: A market order's protection band: at most this many percent past the best price.
MAX_BAND_PCT: Final = Decimal(50)


def _market_order_price(ms: MarketState, side: str, band: str) -> tuple[int, dict[str, str]]:
    """A market order's limit: the best opposite price moved ``band`` (percent, ``"2%"`` or
    ``"2"``) against the taker, rounded to the tick inward (a buy never pays more than the band
    allows, a sell never sells for less). Refused when that side of the book is empty."""
    text = band.strip().removesuffix("%").strip()
    try:
        pct = Decimal(text)
    except InvalidOperation:
        raise ControlError(BAD_REQUEST, f"band {band!r:.40} is not a percentage like 2%") from None
    if not (pct.is_finite() and 0 <= pct <= MAX_BAND_PCT):
        raise ControlError(
            BAD_REQUEST, f"band must be from 0% to {MAX_BAND_PCT}%, not {band!r:.40}"
        )
    book = ms.replica.book(1)
    best = book.best_ask if side == "buy" else book.best_bid
    if best is None:
        other = "asks" if side == "buy" else "bids"
        raise ControlError(
            EMPTY_BOOK,
            f"no {other} on {ms.market.name}: a market {side} has no price to start from "
            "(place a limit order instead)",
        )
    factor = (Decimal(100) + pct) / 100 if side == "buy" else (Decimal(100) - pct) / 100
    rounding = ROUND_FLOOR if side == "buy" else ROUND_CEILING
    ticks = max(1, int((best * factor).to_integral_value(rounding)))
    m = ms.market
    return ticks, {
        "reference": m.ticks_to_price(best),
        "limit": m.ticks_to_price(ticks),
        "band_pct": str(pct),
    }


def _mid(bid: str, ask: str) -> str:
    from decimal import Decimal

    return str((Decimal(bid) + Decimal(ask)) / 2)
