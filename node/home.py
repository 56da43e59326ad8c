"""Which directory is the node's home: the one rule the node, its client and the CLI share.

``--home`` if given, else ``$CRDTBOOK_HOME``, else ``~/.crdtbook`` (specs/control-api.md). Only
the standard library: the CLI resolves a home without importing the node.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

__all__ = ["DEFAULT_HOME", "HOME_ENV", "resolve_home"]

#: Environment variable naming the node home when --home is not given.
HOME_ENV: Final = "CRDTBOOK_HOME"
#: Home used when neither --home nor $CRDTBOOK_HOME is given.
DEFAULT_HOME: Final = Path("~/.crdtbook")


def resolve_home(home: Path | str | None = None) -> Path:
    """The node home: ``home`` if given, else ``$CRDTBOOK_HOME``, else ``~/.crdtbook``. An empty
    ``home`` or variable counts as not given.

    ``~`` is expanded and the result made absolute (not symlink-resolved), so messages show a
    path the user recognises.
    """
    if home is None or str(home) == "":
        home = os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Path(home).expanduser().absolute()
