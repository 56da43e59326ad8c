"""Checkpoints of the matched state, so that a restart need not match the whole log again.

A checkpoint is the engine's state after the first N ops of a replica's total order, with what
it takes to tell whether it still applies: the market id, N, and a fingerprint of those N op ids
in order. Restoring one (``Replica.restore``) installs that state when the restored log starts
with exactly those N ops, and matches only the ops after them. Anything else (another market,
another format version, a prefix that changed because a late op sorts inside it, a damaged or
unreadable blob) makes the checkpoint useless, never wrong: the replica then matches everything.

Only what cannot be rebuilt from the ops is stored. Order number k is the k-th order op of the
prefix in total order, so ids, ops and authors come from the ops; the blob holds the columns that
matching changes (remaining, filled, states), the fills as order numbers, one byte per cancel op
(effective or not), and each price level's live count and deque of order numbers (dead ones
included, as they stand). There is no undo tape: the restored replica has an undo floor at N (see
``Replica._rewind_to``).

Format (canonical CBOR map; every integer array is little-endian int64)::

    {"format": "crdtbook/checkpoint", "version": 1, "market": bytes(32), "ops": N,
     "prefix": sha256(PREFIX_DOMAIN || id_0 || ... || id_N-1),
     "state": {"remaining": i64[k], "filled": i64[k], "states": u8[k],
               "fills": i64[4f] (taker number, maker number, price, quantity per fill),
               "cancels": u8[c] (1: the cancel removed a rest; one per cancel op, in order),
               "bids": i64[...], "asks": i64[...] (per level: price, live, count, numbers...)},
     "sha256": sha256(canonical CBOR of the map without "sha256")}

Trust: the checksum catches a damaged file. The checks in ``_rebuild`` keep any blob, however
made, from making restore raise or installing a state that breaks what the engine relies on: an
order number out of range, a state that is no state, a live order missing from its level (or
on two, or resting the wrong quantity), wrong live counts, fills that do not add up to each
order's filled quantity, cancel records that do not match the cancelled orders, a crossed book.
They are cheap because they run over whole columns in C; checking every fill against the
matching rules would cost about what matching does. So a forged blob with a fresh checksum
could still describe a consistent but different history (say, a fill at another price): a
checkpoint has the trust of the store it sits in, whose ops are loaded without a signature
check too.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from itertools import compress, repeat
from operator import attrgetter, le, lt
from typing import Any, Final, NamedTuple

import cbor2
from sortedcontainers import SortedList

from ._engine import (
    _ASK,
    _BID,
    _CANCELLED,
    _DUPLICATE_REJECTED,
    _FOK_EXPIRED,
    _IOC_EXPIRED,
    _POST_ONLY_REJECTED,
    _SELF_TRADE_EXPIRED,
    FILLED,
    OPEN,
    PARTIALLY_FILLED,
    Engine,
    _Level,
)
from ._ops import BUY, SELL, CancelAllBody, CancelBody, Op, OrderBody

__all__ = [
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "encode_checkpoint",
    "install",
    "prefix_fingerprint",
    "read_checkpoint",
]

FORMAT: Final = "crdtbook/checkpoint"
#: Bump when the layout or the meaning of a field changes: other versions are ignored.
VERSION: Final = 2  # 2: cancel-all counts, duplicate client ids (protocol version 2)
PREFIX_DOMAIN: Final = b"crdtbook/checkpoint-prefix/v1\x00"

_KEYS: Final = frozenset(("format", "version", "market", "ops", "prefix", "state", "sha256"))
_STATE_KEYS: Final = frozenset(
    ("remaining", "filled", "states", "fills", "cancels", "cancel_alls", "bids", "asks")
)
#: Every state an order can end in (status | reason << 3), as bytes for ``bytes.translate``,
#: which deletes them and must leave nothing.
_VALID_STATES: Final = bytes(
    sorted(
        (
            OPEN,
            PARTIALLY_FILLED,
            FILLED,
            _CANCELLED,
            _IOC_EXPIRED,
            _FOK_EXPIRED,
            _POST_ONLY_REJECTED,
            _SELF_TRADE_EXPIRED,
            _DUPLICATE_REJECTED,
        )
    )
)
_BIG_ENDIAN: Final = sys.byteorder == "big"


_id_of = attrgetter("id")
_body_of = attrgetter("body")
_author_of = attrgetter("author")


class _Unusable(Exception):
    """The blob does not describe a state this replica can take over (why: the message)."""


def prefix_fingerprint(order: list[Op], n: int) -> bytes:
    """SHA-256 of the first ``n`` op ids in total order: equal exactly when the prefixes are."""
    return hashlib.sha256(PREFIX_DOMAIN + b"".join(map(_id_of, order[:n]))).digest()


def _pack(values: array[int]) -> bytes:
    if _BIG_ENDIAN:  # pragma: no cover - the machines we run on are little-endian
        values = array("q", values)
        values.byteswap()
    return values.tobytes()


def _unpack(data: object, count: int | None = None) -> array[int]:
    if type(data) is not bytes or len(data) % 8 or (count is not None and len(data) != 8 * count):
        raise _Unusable("an integer array has the wrong type or size")
    values = array("q")
    values.frombytes(data)
    if _BIG_ENDIAN:  # pragma: no cover
        values.byteswap()
    return values


def _checksum(fields: dict[str, Any]) -> bytes:
    return hashlib.sha256(cbor2.dumps(fields, canonical=True)).digest()


def encode_checkpoint(market_id: bytes, order: list[Op], n: int, engine: Engine) -> bytes:
    """The checkpoint of ``engine``, which must hold the state after exactly ``order[:n]``."""
    # Whole-column operations (map, zip, array slices) rather than a loop per fill: they iterate
    # in C, which matters at a few hundred thousand fills.
    number = engine.orders.__getitem__
    fill_list = engine.fills
    fills = array("q", bytes(32 * len(fill_list)))
    if fill_list:
        takers, makers, prices, quantities = zip(*fill_list, strict=True)
        fills[0::4] = array("q", map(number, takers))
        fills[1::4] = array("q", map(number, makers))
        fills[2::4] = array("q", prices)
        fills[3::4] = array("q", quantities)
    sides = []
    for levels in engine.levels:
        flat = array("q")
        for price, level in levels.items():
            flat.extend((price, level.live, len(level)))
            flat.extend(level)
        sides.append(_pack(flat))
    state = {
        "remaining": _pack(engine.remaining),
        "filled": _pack(engine.filled),
        "states": bytes(engine.states),
        "fills": _pack(fills),
        # The engine records cancels in the order it processes them: the total order.
        "cancels": bytes(engine.cancels.values()),
        # Likewise cancel-alls, each with how many orders it cancelled.
        "cancel_alls": _pack(array("q", engine.cancel_alls.values())),
        "bids": sides[0],
        "asks": sides[1],
    }
    fields: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "market": market_id,
        "ops": n,
        "prefix": prefix_fingerprint(order, n),
        "state": state,
    }
    fields["sha256"] = _checksum(fields)
    return bytes(cbor2.dumps(fields, canonical=True))


class Checkpoint(NamedTuple):
    """A checkpoint read and checked on its own (``read_checkpoint``), not yet against a log."""

    ops: int
    prefix: bytes
    state: dict[str, bytes]


def read_checkpoint(blob: object, market_id: bytes) -> Checkpoint | str:
    """The checkpoint in ``blob`` if it is one, intact, of this format and market, covering at
    least one op; else why not. Cheap (a CBOR parse and a hash): ``Replica.restore`` reads the
    blob before the ops, to match them at once when it is of no use. Never raises."""
    try:
        return _read(blob, market_id)
    except _Unusable as exc:
        return str(exc)
    except Exception:  # whatever a hostile blob makes cbor2 raise
        return "unreadable"


def install(checkpoint: Checkpoint, order: list[Op], client_ids: bool = False) -> Engine | str:
    """The engine after the first ``checkpoint.ops`` ops of ``order`` as the checkpoint holds
    it, if ``order`` starts with exactly the checkpointed ops and the state passes the checks
    of ``_rebuild``; else why not. Never raises."""
    n = checkpoint.ops
    try:
        if n > len(order) or prefix_fingerprint(order, n) != checkpoint.prefix:
            raise _Unusable("the log does not start with the checkpointed ops")
        return _rebuild(checkpoint.state, order, n, client_ids)
    except _Unusable as exc:
        return str(exc)
    except Exception:  # e.g. OverflowError from forged quantities: not usable either
        return "inconsistent"


def _read(blob: object, market_id: bytes) -> Checkpoint:
    if type(blob) is not bytes or not blob:
        raise _Unusable("empty")
    fields = cbor2.loads(blob)
    if type(fields) is not dict or set(fields) != _KEYS:
        raise _Unusable("not a checkpoint")
    if fields["format"] != FORMAT or type(fields["version"]) is not int:
        raise _Unusable("not a checkpoint")
    if fields["version"] != VERSION:
        raise _Unusable("another format or version")
    state = fields["state"]
    if type(state) is not dict or set(state) != _STATE_KEYS:
        raise _Unusable("not a checkpoint")
    if any(type(value) is not bytes for value in state.values()):
        raise _Unusable("not a checkpoint")
    for key in ("market", "prefix", "sha256"):
        if type(fields[key]) is not bytes:
            raise _Unusable("not a checkpoint")
    n = fields["ops"]
    if type(n) is not int:
        raise _Unusable("not a checkpoint")
    # Exactly the bytes the writer made: no trailing bytes, no other encoding of the same map.
    if cbor2.dumps(fields, canonical=True) != blob:
        raise _Unusable("not a canonical checkpoint")
    checksum = fields.pop("sha256")
    if _checksum(fields) != checksum:
        raise _Unusable("damaged: the checksum does not match")
    if fields["market"] != market_id:
        raise _Unusable("another market")
    if n <= 0:
        raise _Unusable("it covers no ops")
    return Checkpoint(n, fields["prefix"], state)


def _rebuild(state: dict[str, bytes], order: list[Op], n: int, client_ids: bool) -> Engine:
    """The engine after ``order[:n]`` as ``state`` describes it (``_Unusable`` if it breaks an
    invariant the engine relies on).

    Taking a state over must cost much less than matching the ops again, so the checks are the
    ones that run at C speed over the columns (whole-array counts, sums, minima) plus a Python
    loop over what rests on the book (a few thousand orders, not the log). Together they keep
    every order number in range and every live order on its own level exactly once with the
    right live counts (what matching and undo index by), every state a valid code, and the
    quantities, fills and cancels adding up; see the module docstring for what they cannot
    tell.
    """
    prefix = order[:n]
    is_order = list(map(isinstance, map(_body_of, prefix), repeat(OrderBody)))
    order_ops = list(compress(prefix, is_order))
    count = len(order_ops)
    remaining = _unpack(state["remaining"], count)
    filled = _unpack(state["filled"], count)
    states = bytearray(state["states"])
    if len(states) != count:
        raise _Unusable("order states of the wrong size")
    if states.translate(None, _VALID_STATES):
        raise _Unusable("an order state that is no state")
    live_orders = states.count(OPEN) + states.count(PARTIALLY_FILLED)
    if count and (min(remaining) < 0 or min(filled) < 0):
        raise _Unusable("a negative quantity")

    flat = _unpack(state["fills"])
    if len(flat) % 4:
        raise _Unusable("fills of the wrong size")
    takers, makers, prices, quantities = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
    if (
        flat
        and (
            min(makers) < 0
            or max(takers) >= count
            or min(quantities) <= 0
            or min(prices) <= 0
            or not all(map(lt, makers, takers))  # a maker rested before its taker came
            or not all(map(le, takers, takers[1:]))  # fills come taker by taker, in order
        )
    ):
        raise _Unusable("a fill out of range or out of order")
    # Each fill fills its taker and its maker: per order, the fills add up to what it filled.
    # (The one Python loop over a column: ~0.1 us per fill.)
    sums = [0] * count
    for taker, maker, quantity in zip(takers, makers, quantities, strict=True):
        sums[taker] += quantity
        sums[maker] += quantity
    if array("q", sums) != filled:
        raise _Unusable("fills do not add up to the filled quantities")

    ids = list(map(_id_of, order_ops))
    # Heartbeats and reconfigurations (version 2) change no order: only cancels have records.
    is_cancel = list(map(isinstance, map(_body_of, prefix), repeat(CancelBody)))
    cancel_ops = list(compress(prefix, is_cancel))
    flags = state["cancels"]
    if len(flags) != len(cancel_ops) or flags.translate(None, b"\x00\x01"):
        raise _Unusable("cancel records of the wrong size or out of range")
    # A cancelled order was cancelled by exactly one cancel (later ones find it finished).
    cancel_all_ops = list(compress(prefix, map(isinstance, map(_body_of, prefix),
                                               repeat(CancelAllBody))))
    counts = _unpack(state["cancel_alls"])
    if len(counts) != len(cancel_all_ops) or (counts and min(counts) < 0):
        raise _Unusable("cancel-all records of the wrong size or out of range")
    if flags.count(1) + sum(counts) != states.count(_CANCELLED):
        raise _Unusable("cancel records do not match the cancelled orders")

    # The book: every live order on the level of its own side and price, once, in time
    # priority (ascending numbers), resting what it did not fill; the only dead orders left in
    # a deque are cancelled ones; live counts right; not crossed.
    engine = Engine(client_ids)
    placed: set[int] = set()
    resting = 0
    for side, key in ((_BID, "bids"), (_ASK, "asks")):
        flat = _unpack(state[key])
        levels = engine.levels[side]
        side_name = BUY if side == _BID else SELL
        at = 0
        while at < len(flat):
            if at + 3 > len(flat):
                raise _Unusable("a level record cut short")
            price, live, size = flat[at], flat[at + 1], flat[at + 2]
            at += 3
            if price in levels or not 0 < live <= size <= len(flat) - at:
                raise _Unusable("a level record out of range")
            level = _Level(side, price)
            level.extend(flat[at : at + size])
            level.live = live
            at += size
            previous = -1
            for number in level:
                if not previous < number < count or number in placed:
                    raise _Unusable("a level holds an order out of range or twice")
                previous = number
                placed.add(number)
                body: OrderBody = order_ops[number].body  # type: ignore[assignment]
                if body.side != side_name or body.price != price:
                    raise _Unusable("an order on another order's level")
                if states[number] <= PARTIALLY_FILLED:
                    live -= 1
                    left = remaining[number]
                    if left <= 0 or filled[number] + left != body.quantity:
                        raise _Unusable("a resting order's quantities do not add up")
                    resting += left
                elif states[number] != _CANCELLED:
                    raise _Unusable("a finished order left on a level")
            if live != 0:
                raise _Unusable("a level's live count is wrong")
            levels[price] = level
    if sum(level.live for levels in engine.levels for level in levels.values()) != live_orders:
        raise _Unusable("a live order on no level")
    if sum(remaining) != resting:  # only resting orders have a remaining quantity
        raise _Unusable("a finished order with a remaining quantity")
    bids, asks = engine.levels
    if bids and asks and max(bids) >= min(asks):
        raise _Unusable("a crossed book")

    engine.orders = dict(zip(ids, range(count), strict=True))
    engine.ids = ids
    engine.ops = order_ops
    engine.authors = list(map(_author_of, order_ops))
    engine.remaining = remaining
    engine.filled = filled
    engine.states = states
    id_of = ids.__getitem__
    engine.fills = list(
        zip(map(id_of, takers), map(id_of, makers), prices, quantities, strict=True)
    )
    engine.cancels = dict(zip(map(_id_of, cancel_ops), map(bool, flags), strict=True))
    engine.cancel_alls = dict(zip(map(_id_of, cancel_all_ops), counts, strict=True))
    if engine.client_ids is not None:  # version 2: the first order of each (author, tag)
        for number, op in enumerate(order_ops):
            tag = op.body.tag  # type: ignore[union-attr]
            if tag is not None and states[number] != _DUPLICATE_REJECTED:
                if (op.author, tag) in engine.client_ids:
                    raise _Unusable("two orders holding one client order id")
                engine.client_ids[(op.author, tag)] = number
    engine.prices = (SortedList(bids), SortedList(asks))
    engine.best = [max(bids) if bids else None, min(asks) if asks else None]
    return engine
