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

__all__ = ["DEFAULT_HOME", "HOME_ENV", "IDENTITY_FILE", "load_or_create_identity", "resolve_home"]

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


def load_or_create_identity(home: Path) -> tuple[Identity, bool]:
    """The node's ed25519 seed in ``<home>/identity.key`` (mode 0600), created on first start."""
    path = home / IDENTITY_FILE
    if path.exists():
        seed = path.read_bytes()
        if len(seed) != 32:
            raise ValueError(f"{path} is not a 32-byte key file; move it away to make a new key")
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return Identity.from_seed(seed), False
    identity = Identity.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, identity.seed)
        os.fsync(fd)
    finally:
        os.close(fd)
    return identity, True
