"""The node's home: which directory it is, and the key the node keeps in it. The one rule the
node, its client, the CLI, the demo and the process harness share.

The home is ``--home`` if given, else ``$CRDTBOOK_HOME``, else ``~/.crdtbook``
(specs/control-api.md). The node's ed25519 seed is ``<home>/identity.key`` (32 bytes, mode
0600). No trio, no libp2p: the CLI resolves a home, and the demo makes its nodes' keys before
they start, without importing the node.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from crdtbook import Identity

__all__ = [
    "DEFAULT_HOME",
    "HOME_ENV",
    "IDENTITY_FILE",
    "load_identity",
    "load_or_create_identity",
    "peer_id_of_public_key",
    "resolve_home",
]

#: Environment variable naming the node home when --home is not given.
HOME_ENV: Final = "CRDTBOOK_HOME"
#: Home used when neither --home nor $CRDTBOOK_HOME is given.
DEFAULT_HOME: Final = Path("~/.crdtbook")
#: The node's ed25519 seed, in its home.
IDENTITY_FILE: Final = "identity.key"


def resolve_home(home: Path | str | None = None) -> Path:
    """The node home: ``home`` if given, else ``$CRDTBOOK_HOME``, else ``~/.crdtbook``. An empty
    ``home`` or variable counts as not given.

    ``~`` is expanded and the result made absolute (not symlink-resolved), so messages show a
    path the user recognises.
    """
    if home is None or str(home) == "":
        home = os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Path(home).expanduser().absolute()


def load_identity(home: Path) -> Identity | None:
    """The key in ``<home>/identity.key`` (its mode made 0600), or None when there is none.
    ``ValueError`` (one line) for a file that is not a key."""
    path = home / IDENTITY_FILE
    if not path.exists():
        return None
    seed = path.read_bytes()
    if len(seed) != 32:
        raise ValueError(f"{path} is not a 32-byte key file; move it away to make a new key")
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return Identity.from_seed(seed)


def load_or_create_identity(home: Path) -> tuple[Identity, bool]:
    """The node's ed25519 seed in ``<home>/identity.key`` (mode 0600), created on first start."""
    path = home / IDENTITY_FILE
    existing = load_identity(home)
    if existing is not None:
        return existing, False
    identity = Identity.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, identity.seed)
        os.fsync(fd)
    finally:
        os.close(fd)
    return identity, True


#: The protobuf ``PublicKey`` of libp2p's peer ids for an ed25519 key: field 1 (KeyType) = 1
#: (Ed25519), field 2 (Data) = the 32 key bytes; the peer id is its identity multihash (code 0,
#: length 36) in base58btc. Written out here so that the CLI need not import libp2p.
_ED25519_PROTOBUF_PREFIX: Final = bytes([0x08, 0x01, 0x12, 0x20])
_IDENTITY_MULTIHASH_PREFIX: Final = bytes([0x00, 0x24])
_BASE58_ALPHABET: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def peer_id_of_public_key(public_key: bytes) -> str:
    """The libp2p peer id (``12D3KooW...``) of a node whose ed25519 key is ``public_key``: the
    id its node announces (tests check it against libp2p's own)."""
    if len(public_key) != 32:
        raise ValueError("an ed25519 public key is 32 bytes")
    raw = _IDENTITY_MULTIHASH_PREFIX + _ED25519_PROTOBUF_PREFIX + public_key
    number = int.from_bytes(raw, "big")
    digits = []
    while number:
        number, digit = divmod(number, 58)
        digits.append(_BASE58_ALPHABET[digit])
    zeros = len(raw) - len(raw.lstrip(b"\0"))  # each leading zero byte is a leading '1'
    return "1" * zeros + "".join(reversed(digits))
