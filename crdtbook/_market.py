"""Markets: a name, a tick size, a lot size and, for a witnessed market, its witnesses; and the
exact conversion to integers.

Inside the core, prices are integer ticks and quantities integer lots. The market id is a hash of
the market's full definition, so two nodes that disagree on tick, lot or witnesses never mix ops.
A market without witnesses speaks protocol version 1 (its fills are never final); one with
witnesses speaks version 2 (specs/finality.md), where fills become final.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Final

import cbor2
import nacl.bindings

from ._errors import OffLot, OffTick
from ._limits import MAX_INT, MAX_MARKET_NAME, MAX_WITNESSES, PROTOCOL_VERSION, WITNESSED_VERSION

__all__ = ["DEFAULT_MARKETS", "Market"]

_MARKET_DOMAIN: Final = "crdtbook/market/v1"
_WITNESSED_MARKET_DOMAIN: Final = "crdtbook/market/v2"
_KEY_BYTES: Final = 32


def _witness_keys(witnesses: Iterable[bytes | str]) -> tuple[bytes, ...]:
    """32-byte keys (bytes or hex), sorted and checked: the canonical witness set."""
    keys = []
    for key in witnesses:
        if isinstance(key, str):
            try:
                key = bytes.fromhex(key.strip())
            except ValueError:
                raise ValueError(f"witness {key!r} is not a hex ed25519 public key") from None
        if not isinstance(key, bytes) or len(key) != _KEY_BYTES:
            raise ValueError("a witness is a 32-byte ed25519 public key (64 hex digits)")
        # A key that is no curve point (or a small-order one) can never sign: such a witness
        # would stall finality for ever, so the definition is refused outright.
        if not nacl.bindings.crypto_core_ed25519_is_valid_point(key):
            raise ValueError(f"witness {key.hex()[:16]}... is not a valid ed25519 public key")
        keys.append(key)
    if len(set(keys)) != len(keys):
        raise ValueError("a witness is named twice")
    if len(keys) > MAX_WITNESSES:
        raise ValueError(f"a market has at most {MAX_WITNESSES} witnesses, not {len(keys)}")
    return tuple(sorted(keys))


_NAME_FORBIDDEN: Final = frozenset(":/ \t\r\n")
#: How a price or quantity may be written: Decimal's own grammar (a sign, a point, an exponent
#: as programs print them: "1.5E+2") less what it also reads and an order should not: "1_0"
#: (as 10) and digits of other scripts ("１００"). Spaces around it are ignored.
_PLAIN_DECIMAL: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
#: Bounds on a tick or lot (far beyond any real market's: prices and sizes are integers of
#: ticks and lots below 2**63 anyway).
_MAX_EXPONENT: Final = 40
_MAX_DIGITS: Final = 40


def _check_spelling(text: object, what: str, error: type[ValueError]) -> None:
    """Raise ``error`` for a string Decimal would read but ``_PLAIN_DECIMAL`` refuses."""
    if isinstance(text, str) and not _PLAIN_DECIMAL.fullmatch(text.strip()):
        raise error(
            f"{what} {text[:40]!r} is not a decimal number in ASCII digits (1000, 0.25, "
            "2.5E+3; no '_' separators)"
        )


def _canonical_decimal(text: str | Decimal, what: str) -> Decimal:
    _check_spelling(text, what, ValueError)
    try:
        value = Decimal(text) if isinstance(text, Decimal) else Decimal(str(text).strip())
    except (InvalidOperation, ValueError, TypeError):
        raise ValueError(f"{what} {text!r} is not a decimal number") from None
    if not value.is_finite() or value <= 0:
        raise ValueError(f"{what} must be a positive decimal number, got {text!r}")
    # Its plain spelling is part of the market id: "1e999999" would spell a million digits
    # (and "1e99999999" overflow the decimal context), so a definition must stay short.
    if not -_MAX_EXPONENT <= value.adjusted() <= _MAX_EXPONENT or (
        len(value.normalize().as_tuple().digits) > _MAX_DIGITS
    ):
        raise ValueError(
            f"{what} {str(text)[:40]!r} is out of range: at most {_MAX_DIGITS} significant "
            f"digits, between 1e-{_MAX_EXPONENT} and 1e{_MAX_EXPONENT}"
        )
    return value


def _plain(value: Decimal) -> str:
    """'0.0100' -> '0.01', '1E+2' -> '100': one spelling per value (part of the market id)."""
    text = format(value.normalize(), "f")
    return text


class Market:
    """A market definition. Immutable; equal markets have equal ids.

    Args:
        name: a short ticker, e.g. ``"BTC-USD"`` (no ``:``, ``/`` or spaces, at most 32 chars).
        tick: the price increment as a decimal string, e.g. ``"0.01"``.
        lot: the quantity increment as a decimal string, e.g. ``"0.0001"``.
        witnesses: ed25519 public keys (bytes or hex) of the market's witnesses, whose
            heartbeats make fills final (specs/finality.md). None: protocol version 1, where no
            fill is ever final.
    """

    __slots__ = ("_lot", "_tick", "id", "lot", "name", "tick", "version", "witnesses")

    name: str
    tick: str
    lot: str
    id: bytes
    #: The genesis witnesses, sorted (empty for a version-1 market).
    witnesses: tuple[bytes, ...]
    #: The protocol version its ops carry: 1 without witnesses, 2 with.
    version: int
    _tick: Decimal
    _lot: Decimal

    def __init__(
        self,
        name: str,
        tick: str | Decimal,
        lot: str | Decimal,
        witnesses: Iterable[bytes | str] = (),
    ) -> None:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_MARKET_NAME:
            raise ValueError(f"market name must be 1 to {MAX_MARKET_NAME} characters")
        if any(c in _NAME_FORBIDDEN or not c.isprintable() for c in name):
            raise ValueError(f"market name {name!r} may not contain ':', '/' or spaces")
        tick_d = _canonical_decimal(tick, "tick")
        lot_d = _canonical_decimal(lot, "lot")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_tick", tick_d)
        object.__setattr__(self, "_lot", lot_d)
        object.__setattr__(self, "tick", _plain(tick_d))
        object.__setattr__(self, "lot", _plain(lot_d))
        keys = _witness_keys(witnesses)
        object.__setattr__(self, "witnesses", keys)
        object.__setattr__(self, "version", WITNESSED_VERSION if keys else PROTOCOL_VERSION)
        if keys:
            fields: list[object] = [_WITNESSED_MARKET_DOMAIN, name, self.tick, self.lot, list(keys)]
        else:  # version 1, byte for byte as it always was
            fields = [_MARKET_DOMAIN, name, self.tick, self.lot]
        object.__setattr__(self, "id", hashlib.sha256(cbor2.dumps(fields, canonical=True)).digest())

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError("Market is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Market) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        extra = f", witnesses={len(self.witnesses)}" if self.witnesses else ""
        return f"Market({self.name!r}, tick={self.tick!r}, lot={self.lot!r}{extra})"

    @property
    def witnessed(self) -> bool:
        """Whether fills can become final here (protocol version 2)."""
        return bool(self.witnesses)

    @property
    def spec(self) -> str:
        """``NAME:TICK:LOT``, or ``NAME:TICK:LOT:KEY,KEY,...`` (hex witness keys) for a witnessed
        market: the one string ``Market.parse`` reads and ``--market`` takes."""
        base = f"{self.name}:{self.tick}:{self.lot}"
        if not self.witnesses:
            return base
        return base + ":" + ",".join(key.hex() for key in self.witnesses)

    @classmethod
    def parse(cls, text: str) -> Market:
        """Read ``NAME`` (one of :data:`DEFAULT_MARKETS`), ``NAME:TICK:LOT``, or
        ``NAME:TICK:LOT:KEY,KEY,...`` with the witnesses' public keys in hex."""
        text = text.strip()
        parts = text.split(":")
        if len(parts) == 4:
            keys = [k for k in parts[3].split(",") if k.strip()]
            if not keys:
                raise ValueError(f"market {text!r} names no witness after the third ':'")
            return cls(parts[0], parts[1], parts[2], witnesses=keys)
        if len(parts) == 1:
            try:
                return DEFAULT_MARKETS[text]
            except KeyError:
                known = ", ".join(sorted(DEFAULT_MARKETS))
                raise ValueError(
                    f"unknown market {text!r}: use one of {known}, or NAME:TICK:LOT"
                ) from None
        if len(parts) != 3:
            raise ValueError(
                f"market {text!r} is not NAME, NAME:TICK:LOT or NAME:TICK:LOT:WITNESSES"
            )
        return cls(parts[0], parts[1], parts[2])

    # -- exact conversions -------------------------------------------------------------------

    def price_to_ticks(self, price: str | Decimal | int) -> int:
        """Human price -> integer ticks. Raises :class:`OffTick` naming the nearest valid prices."""
        return _to_units(price, self._tick, "price", "tick", OffTick)

    def qty_to_lots(self, quantity: str | Decimal | int) -> int:
        """Human quantity -> integer lots. Raises :class:`OffLot` naming the nearest valid ones."""
        return _to_units(quantity, self._lot, "quantity", "lot", OffLot)

    def ticks_to_price(self, ticks: int) -> str:
        return _plain_fixed(ticks * self._tick, self._tick)

    def lots_to_qty(self, lots: int) -> str:
        return _plain_fixed(lots * self._lot, self._lot)


def _plain_fixed(value: Decimal, step: Decimal) -> str:
    """Print with as many decimals as the step has, so a ladder lines up: 100 -> '100.00'."""
    places = max(0, -int(step.normalize().as_tuple().exponent))
    return f"{value:.{places}f}"


def _to_units(
    value: str | Decimal | int,
    step: Decimal,
    what: str,
    unit: str,
    error: type[ValueError],
) -> int:
    if isinstance(value, bool):
        raise error(f"{what} must be a decimal number, got {value!r}")
    _check_spelling(value, what, error)
    try:
        amount = Decimal(value) if not isinstance(value, str) else Decimal(value.strip())
    except (InvalidOperation, ValueError, TypeError):
        raise error(f"{what} {value!r} is not a decimal number") from None
    if not amount.is_finite() or amount <= 0:
        raise error(f"{what} must be positive, got {value}")
    try:
        units, rest = divmod(amount, step)
    except ArithmeticError:  # decimal.InvalidOperation: beyond the context's precision
        raise error(f"{what} {value} is too large") from None
    if rest:
        low = units * step
        high = (units + 1) * step
        nearest = (
            f"{_plain_fixed(high, step)}"
            if units == 0
            else (f"{_plain_fixed(low, step)} or {_plain_fixed(high, step)}")
        )
        raise error(
            f"{what} {value} is not a multiple of the {unit} {_plain(step)}; "
            f"nearest valid: {nearest}"
        )
    result = int(units)
    if result == 0:  # e.g. 1e-99999999: below the decimal context, its remainder rounds to 0
        raise error(f"{what} {str(value)[:40]} is below one {unit} ({_plain(step)})")
    if result > MAX_INT:
        raise error(f"{what} {value} is too large (at most {MAX_INT} {unit}s)")
    return result


#: Markets a node can follow by name alone. Anything else is given as ``NAME:TICK:LOT``.
DEFAULT_MARKETS: Final[dict[str, Market]] = {
    m.name: m
    for m in (
        Market("BTC-USD", "0.01", "0.0001"),
        Market("ETH-USD", "0.01", "0.001"),
        Market("SOL-USD", "0.001", "0.01"),
        Market("DEMO", "1", "1"),
    )
}
