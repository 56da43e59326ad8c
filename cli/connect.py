"""Lazy access to the node's control client.

The CLI never imports the node (libp2p, trio) at module level: commands ask this module for the
client API when they run. Tests replace :func:`client_api` with a fake module that has the same four
names (``ControlClient``, ``NodeNotRunning``, ``ControlError``, ``resolve_home``).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol


class Client(Protocol):
    """What the CLI needs from ``crdtbook.node.client.ControlClient``."""

    def call(self, method: str, **params: Any) -> Any:
        """Send one request and return its ``result`` (raises ``ControlError``)."""
        ...

    def watch(self, market: str | None = None) -> Iterator[dict[str, Any]]:
        """Yield ``watch`` events until the caller stops iterating."""
        ...


def client_api() -> ModuleType:
    """Return the module that provides the control client (imported on first use)."""
    return importlib.import_module("crdtbook.node.client")


def default_home(home: Path | None) -> Path:
    """The spec's rule: ``--home``, else ``$CRDTBOOK_HOME``, else ``~/.crdtbook`` (the node's
    own, ``crdtbook.node.home``: standard library only, cheap to import)."""
    from crdtbook.node.home import resolve_home as node_rule

    return node_rule(home)


def resolve_home(home: Path | None) -> Path:
    """Resolve the node home, through the client module when it is available."""
    try:
        api = client_api()
    except ImportError:
        return default_home(home)
    resolver = getattr(api, "resolve_home", None)
    if resolver is None:
        return default_home(home)
    return Path(resolver(home))


def open_client(home: Path, timeout: float | None = None) -> Client:
    """Create a control client for the node at ``home`` (already resolved). ``timeout`` (seconds
    to wait for each answer) replaces the client's default, for calls that wait on purpose."""
    api = client_api()
    client: Client = (
        api.ControlClient(home) if timeout is None else api.ControlClient(home, timeout=timeout)
    )
    return client


def close_client(client: object) -> None:
    """Close a client if it has a ``close`` method (it may hold a socket)."""
    close = getattr(client, "close", None)
    if callable(close):
        with contextlib.suppress(OSError):
            close()
