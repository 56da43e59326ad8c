"""The layout keeps its promise: the core (``crdtbook/``) does no I/O and reads no clock.

The node and CLI live in ``node/`` and ``cli/`` (installed as ``crdtbook.node`` and
``crdtbook.cli``); the core's own modules may import none of what would let them touch the
network, the disk, threads or time. Checked on the source, so a lazy import inside a function
is caught too.

The shell keeps libp2p, SQLite and the HTTP stack each in its own modules, and the CLI's
process loads none of them (docs/architecture.md, the rooms).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "crdtbook"

#: Modules the core must never import, with why.
FORBIDDEN = {
    "trio": "the event loop belongs to the node",
    "libp2p": "networking belongs to the node",
    "multiaddr": "networking belongs to the node",
    "socket": "networking belongs to the node",
    "sqlite3": "the store belongs to the node",
    "threading": "derivation is single-threaded and deterministic",
    "asyncio": "the event loop belongs to the node",
    "time": "derived state may not depend on a clock",
    "datetime": "derived state may not depend on a clock",
    "random": "derived state may not depend on randomness (Identity.generate uses os.urandom)",
    "subprocess": "the core starts no processes",
}


def core_modules() -> list[Path]:
    # node/ and cli/ are separate folders at the top of the repo, not inside crdtbook/.
    return sorted(CORE.glob("*.py"))


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_core_has_modules() -> None:
    assert len(core_modules()) >= 10


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_core_module_imports_no_io(path: Path) -> None:
    bad = {name: FORBIDDEN[name] for name in imported(path) if name in FORBIDDEN}
    assert not bad, f"{path.name} imports {bad}"


def test_the_check_sees_imports(tmp_path: Path) -> None:
    """The scanner itself: a module importing trio and time is caught (so the test can fail)."""
    sample = tmp_path / "sample.py"
    sample.write_text("import time\nfrom trio import sleep\n\ndef f():\n    import socket\n")
    assert imported(sample) == {"time", "trio", "socket"}


# -- the shell and the CLI ---------------------------------------------------------------------

SHELL = CORE.parent / "node"

#: Libraries the shell confines to a few modules, with the modules allowed and why.
CONFINED = {
    # The rest of the node sees the network through node/network.py's typed interface.
    "libp2p": lambda name: name == "p2p.py" or name.startswith("p2p_"),
    "multiaddr": lambda name: name == "p2p.py" or name.startswith("p2p_"),
    # The store owns the database; app.py names sqlite3.Error only to catch it at shutdown.
    "sqlite3": lambda name: name in ("store.py", "app.py"),
    # The HTTP stack is imported only when the node serves HTTP (--http).
    "starlette": lambda name: name.startswith("http_"),
    "hypercorn": lambda name: name.startswith("http_"),
}


@pytest.mark.parametrize("path", sorted(SHELL.glob("*.py")), ids=lambda p: p.name)
def test_shell_module_imports_what_its_room_allows(path: Path) -> None:
    bad = [lib for lib in imported(path) if lib in CONFINED and not CONFINED[lib](path.name)]
    assert not bad, f"node/{path.name} imports {bad}: keep them in their own modules"


def test_the_cli_loads_neither_trio_nor_libp2p() -> None:
    """A command's process starts fast and does no I/O of the node's: importing the CLI (and the
    demo, which drives node processes) loads no event loop, no libp2p, no database, no server."""
    import subprocess
    import sys

    code = (
        "import sys, crdtbook.cli.app, crdtbook.cli.demo; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        ).stdout.split()
    )
    assert not loaded & {"trio", "libp2p", "multiaddr", "sqlite3", "starlette", "hypercorn"}
