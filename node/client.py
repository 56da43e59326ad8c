"""Blocking Python client for a node's control socket (specs/control-api.md).

It uses only the standard library (``socket``, ``json``), no trio, so that plain scripts, bots
and the CLI can drive a node without an event loop and start fast::

    from crdtbook.node.client import ControlClient

    with ControlClient() as node:
        print(node.call("book", depth=5))
        for event in node.watch():
            print(event["digest"])
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, NoReturn, Self

from .control_errors import BAD_REQUEST, CONTROL_SOCKET_NAME, ControlError
from .home import DEFAULT_HOME, HOME_ENV, resolve_home
from .limits import MAX_RESPONSE_LINE_BYTES

__all__ = [
    "DEFAULT_HOME",
    "HOME_ENV",
    "ControlClient",
    "ControlError",
    "NodeNotRunning",
    "WatchStream",
    "resolve_home",
]

# Bytes asked of the socket per read.
RECEIVE_CHUNK_BYTES: Final = 64 * 1024
#: Methods that sign an op: when their answer is lost, whether they took effect is unknown.
SIGNING_METHODS: Final = frozenset({"submit", "cancel", "amend", "cancel_all", "reconfigure"})


class NodeNotRunning(ConnectionError):
    """No node answers on the home's control socket (missing, or left over by a dead node)."""


def _start_hint(home: Path) -> str:
    return f"Start one with: crdtbook node --home {shlex.quote(str(home))}"


class _Connection:
    """One socket with a line reader; closes itself on any transport or framing failure."""

    def __init__(self, home: Path, timeout: float | None) -> None:
        self.home = home
        self.path = home / CONTROL_SOCKET_NAME
        self._buf = bytearray()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(os.fspath(self.path))
        except FileNotFoundError:
            self._sock.close()
            raise NodeNotRunning(
                f"no crdtbook node is running at {home} (no control socket). {_start_hint(home)}"
            ) from None
        except ConnectionRefusedError:
            self._sock.close()
            raise NodeNotRunning(
                f"no crdtbook node is running at {home} (its control socket is left over from a "
                f"node that stopped). {_start_hint(home)}"
            ) from None
        except PermissionError:
            self._sock.close()
            raise PermissionError(
                f"cannot connect to {self.path}: permission denied (the node runs as another user?)"
            ) from None
        except TimeoutError:
            self._sock.close()
            raise TimeoutError(f"the crdtbook node at {home} does not accept connections") from None
        except OSError as exc:
            self._sock.close()
            raise OSError(
                exc.errno, f"cannot connect to {self.path}: {exc.strerror or exc}"
            ) from None

    def close(self) -> None:
        self._sock.close()

    def send(self, message: dict[str, Any], deadline: float | None) -> None:
        data = json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        self._settimeout(deadline)
        try:
            self._sock.sendall(data)
        except TimeoutError:
            self.close()
            raise TimeoutError(
                f"the crdtbook node at {self.home} is not reading requests"
            ) from None
        except OSError as exc:
            self.close()
            raise ConnectionError(
                f"lost the connection to the node at {self.home}: {exc}"
            ) from None

    def read_message(self, deadline: float | None) -> dict[str, Any] | None:
        """Next JSON object from the node, or None if it closed the connection cleanly."""
        while True:
            newline = self._buf.find(b"\n")
            if newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[: newline + 1]
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    self.close()
                    raise ConnectionError(
                        f"the node at {self.home} sent a line that is not JSON"
                    ) from None
                if not isinstance(message, dict):
                    self.close()
                    raise ConnectionError(f"the node at {self.home} sent a non-object line")
                return message
            if len(self._buf) > MAX_RESPONSE_LINE_BYTES:
                self.close()
                raise ConnectionError(
                    f"the node at {self.home} sent a line longer than "
                    f"{MAX_RESPONSE_LINE_BYTES} bytes"
                )
            self._settimeout(deadline)
            try:
                data = self._sock.recv(RECEIVE_CHUNK_BYTES)
            except TimeoutError:
                self.close()
                raise TimeoutError(
                    f"the crdtbook node at {self.home} did not answer in time"
                ) from None
            except OSError as exc:
                self.close()
                raise ConnectionError(
                    f"lost the connection to the node at {self.home}: {exc}"
                ) from None
            if not data:
                self.close()
                if self._buf:
                    raise ConnectionError(f"the node at {self.home} closed the connection mid-line")
                return None
            self._buf += data

    def _settimeout(self, deadline: float | None) -> None:
        if deadline is None:
            self._sock.settimeout(None)
            return
        left = deadline - time.monotonic()
        if left <= 0:
            self.close()
            raise TimeoutError(f"the crdtbook node at {self.home} did not answer in time")
        self._sock.settimeout(left)


def _raise_error(home: Path, error: object) -> NoReturn:
    if isinstance(error, dict):
        data = error.get("data")
        raise ControlError(
            str(error.get("code", "internal")),
            str(error.get("message", "")),
            data if isinstance(data, dict) else None,
        )
    raise ControlError("internal", f"the node at {home} sent a malformed error: {error!r:.80}")


class ControlClient:
    """Blocking connection to a running node's control socket.

    ``call`` sends one request and waits (at most ``timeout`` seconds) for its response; it
    raises :class:`ControlError` for error responses, :class:`NodeNotRunning` when nobody
    listens, ``TimeoutError`` when the node does not answer in time and ``ConnectionError``
    when the connection breaks (whether the request took effect is then unknown).  After a
    failure the next call reconnects.  Not thread-safe: use one client per thread.
    """

    def __init__(self, home: Path | str | None = None, timeout: float = 10.0) -> None:
        """Connect to the node at ``resolve_home(home)``; raise NodeNotRunning if none."""
        self.home = resolve_home(home)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._conn: _Connection | None = _Connection(self.home, timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent).  Open watch streams are independent."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def call(self, method: str, /, **params: Any) -> Any:
        """Run ``method`` on the node and return its ``result``.

        Params whose value is None are left out, so optional arguments can be passed through
        as None (e.g. ``call("book", market=args.market)``).
        """
        if method == "watch":
            raise ValueError("use ControlClient.watch() for the watch stream")
        deadline = time.monotonic() + self.timeout
        if self._conn is None:
            self._conn = _Connection(self.home, self.timeout)
        conn = self._conn
        request_id = next(self._ids)
        request = {
            "id": request_id,
            "method": method,
            "params": {k: v for k, v in params.items() if v is not None},
        }
        sent = False
        try:
            conn.send(request, deadline)
            sent = True
            response = conn.read_message(deadline)
            if response is None:
                raise ConnectionError(
                    f"the node at {self.home} closed the connection before answering {method!r}"
                )
            if response.get("id") not in (request_id, None):
                raise ConnectionError(
                    f"the node at {self.home} answered request {response.get('id')!r}, "
                    f"expected {request_id}"
                )
        except BaseException as exc:
            conn.close()
            self._conn = None
            if sent and method in SIGNING_METHODS and isinstance(exc, OSError):
                # The node may have signed it before the answer was lost: say so, or a user
                # who retries places the order twice.
                kind = TimeoutError if isinstance(exc, TimeoutError) else ConnectionError
                where = (
                    "`crdtbook status` (the market's epoch)"
                    if method == "reconfigure"
                    else "`crdtbook orders` (the orders method)"
                )
                raise kind(
                    f"{exc}; the {method} may have taken effect all the same: {where} shows "
                    "whether it did"
                ) from exc
            raise
        if "error" in response:
            _raise_error(self.home, response["error"])
        if "result" not in response:
            # A null-id error without "error" cannot happen with a conforming node.
            raise ControlError(BAD_REQUEST, f"the node at {self.home} sent no result")
        return response["result"]

    def watch(self, market: str | None = None) -> WatchStream:
        """Open a watch stream on a dedicated connection (see :class:`WatchStream`).

        Raises ControlError at once if the node refuses (e.g. unknown market).
        """
        return WatchStream(self.home, self.timeout, next(self._ids), market)


class WatchStream:
    """Iterator over a node's watch events (dicts with ``"event": "update"``).

    ``market`` is the market being watched, as confirmed by the node.  Iteration waits for
    events without a timeout and stops when the node closes the stream (e.g. it shut down);
    an error the node reports mid-stream is raised as ControlError.  Close it (or use it as a
    context manager) to stop watching.
    """

    def __init__(self, home: Path, timeout: float, request_id: int, market: str | None) -> None:
        self.home = home
        self._conn = _Connection(home, timeout)
        params = {} if market is None else {"market": market}
        deadline = time.monotonic() + timeout
        try:
            self._conn.send({"id": request_id, "method": "watch", "params": params}, deadline)
            first = self._conn.read_message(deadline)
            if first is None:
                raise ConnectionError(f"the node at {home} closed the watch connection at once")
            if "error" in first:
                _raise_error(home, first["error"])
            result = first.get("result")
            self.market: str | None = result.get("watching") if isinstance(result, dict) else None
        except BaseException:
            self._conn.close()
            raise
        self._closed = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise StopIteration
        try:
            message = self._conn.read_message(None)
        except BaseException:
            self.close()
            raise
        if message is None:
            self.close()
            raise StopIteration
        if "error" in message:
            self.close()
            _raise_error(self.home, message["error"])
        return message

    def close(self) -> None:
        """Stop watching (idempotent)."""
        self._closed = True
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
