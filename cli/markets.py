"""Market definitions and witness keys as the command line takes them.

``--market`` takes a built-in name, ``NAME:TICK:LOT``, ``NAME:TICK:LOT:KEY,KEY,...`` (a witnessed
market, :attr:`crdtbook.Market.spec`) or ``@FILE``, a file holding one of those (what
``crdtbook market new --out FILE`` writes). A witness is named by its 64-hex ed25519 public key or
by a node home, whose ``identity.key`` holds the node's seed (the witness key is the node's
signing key, the same key as its libp2p peer id).

Only the core (``crdtbook``: no libp2p, no trio) is imported here, and only when needed.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crdtbook import Market

__all__ = [
    "IDENTITY_FILE",
    "DefinitionError",
    "home_public_key",
    "is_definition",
    "load_market",
    "market_text",
    "parse_approval",
    "witness_key",
]

#: The node's seed in its home (as crdtbook.node.app writes it).
IDENTITY_FILE = "identity.key"
_HEX = frozenset(string.hexdigits)
#: Longest market file read: a definition with the most witnesses is under 800 bytes. Anything
#: longer is not one (``@/dev/zero`` or a FIFO would otherwise be read until memory runs out).
MAX_MARKET_FILE_BYTES = 64 * 1024


class DefinitionError(ValueError):
    """A market definition, witness key or approval the user gave cannot be used (one line)."""


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in _HEX for c in text)


def is_definition(value: str) -> bool:
    """Whether a ``--market`` value is a full definition (``@FILE`` or ``NAME:TICK:LOT...``)
    rather than the name of a market the node follows."""
    return value.startswith("@") or ":" in value


def market_text(value: str) -> str:
    """The definition a ``--market`` value stands for: the text of ``@FILE`` (one definition,
    blank lines and ``#`` comments ignored), else ``value`` itself."""
    if not value.startswith("@"):
        return value.strip()
    path = Path(value[1:]).expanduser()
    try:
        if not path.is_file():  # a directory, FIFO or device is never a definition
            raise DefinitionError(
                f"market file {path} "
                + ("is not a regular file" if path.exists() else "does not exist")
            )
        with path.open("rb") as file:
            data = file.read(MAX_MARKET_FILE_BYTES + 1)
        if len(data) > MAX_MARKET_FILE_BYTES:
            raise DefinitionError(
                f"market file {path} is over {MAX_MARKET_FILE_BYTES} bytes: not a definition"
            )
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise DefinitionError(f"market file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DefinitionError(f"cannot read market file {path}: {exc}") from None
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(lines) != 1:
        what = "no market definition" if not lines else f"{len(lines)} lines, not one definition"
        raise DefinitionError(
            f"market file {path} holds {what} (write it with: crdtbook market new ... --out FILE)"
        )
    return lines[0]


def load_market(value: str) -> Market:
    """The :class:`crdtbook.Market` a ``--market`` value (name, spec or ``@FILE``) defines."""
    from crdtbook import Market

    text = market_text(value)
    try:
        return Market.parse(text)
    except ValueError as exc:
        where = f" (from {value[1:]})" if value.startswith("@") else ""
        raise DefinitionError(f"{exc}{where}") from None


def home_public_key(home: Path) -> str:
    """The witness key (hex) of the node whose home is ``home``, read from its identity file."""
    from crdtbook import Identity

    path = Path(home).expanduser() / IDENTITY_FILE
    try:
        seed = path.read_bytes()
    except FileNotFoundError:
        raise DefinitionError(
            f"{path} does not exist: create that node's key with crdtbook id --init --home "
            f"{home} (or start the node once), or give its key in hex"
        ) from None
    except OSError as exc:
        raise DefinitionError(f"cannot read {path}: {exc}") from None
    try:
        return Identity.from_seed(seed).public_key.hex()
    except ValueError:
        raise DefinitionError(f"{path} is not a 32-byte key file") from None


def witness_key(value: str) -> str:
    """A witness named by its 64-hex public key or by a node home directory -> lowercase hex."""
    text = value.strip()
    if _is_hex(text, 64):
        return text.lower()
    path = Path(text).expanduser()
    if path.is_dir():
        return home_public_key(path)
    raise DefinitionError(
        f"witness {value!r} is neither a 64-hex public key nor a node home directory"
    )


def parse_approval(token: str) -> tuple[str, str]:
    """``KEY:SIGNATURE`` (hex, as ``crdtbook reconfig approve`` prints it) -> (key, signature)."""
    key, sep, sig = token.strip().partition(":")
    if not sep or not _is_hex(key, 64) or not _is_hex(sig, 128):
        raise DefinitionError(
            f"approval {token[:40]!r}{'...' if len(token) > 40 else ''} is not KEY:SIGNATURE "
            "(64 hex digits, ':', 128 hex digits), as crdtbook reconfig approve prints it"
        )
    return key.lower(), sig.lower()
