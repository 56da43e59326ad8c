"""The node's local control server: newline-delimited JSON on ``<home>/control.sock`` (trio).

The protocol is specified in specs/control-api.md.  This module owns only the transport: the
socket's life cycle and permissions, framing, request validation, response ordering, the
``watch`` stream and error containment.  What the methods *do* is the job of a
:class:`ControlHandler` supplied by the node.

Why it looks like this:

* **Owner-only access by filesystem permissions.**  There is no TCP port and no token: the home
  directory is 0700 and the socket 0600, so only the node's user can connect.  A home that
  others can write to, or a socket that does not keep its 0600 mode, is refused (the node does
  not start); a home others can only read or enter is tightened to 0700.
* **A client can never take the server down.**  Every line gets an answer (malformed ones with
  ``"id": null``), oversize lines are skipped without buffering them, every connection runs in
  its own task, handler bugs become ``internal`` errors (traceback in the log), and a client
  vanishing mid-stream only ends its own connection.
* **Responses in request order** because each connection handles its requests one after the
  other; clients that want parallelism open several connections.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import trio

if TYPE_CHECKING:
    # trio-typing (a dependency of libp2p) installs trio-stubs, which shadow trio's own
    # annotations for mypy and predate trio.TaskStatus; its TaskStatus is the same protocol.
    from trio_typing import TaskStatus

from .control_errors import (
    BAD_REQUEST,
    CONTROL_SOCKET_NAME,
    INTERNAL,
    MAX_REQUEST_LINE_BYTES,
    ControlError,
)

__all__ = [
    "ControlHandler",
    "ControlSocketInUse",
    "check_home",
    "optional_param",
    "require_param",
    "serve_control",
    "socket_path",
]

logger = logging.getLogger(__name__)

# Pending connections the kernel queues before accept().  Bursts (a bot opening many
# connections at once) must not be refused: non-blocking AF_UNIX clients see a full backlog as
# an error rather than waiting, so use the system maximum like trio's own listeners do.
SOCKET_BACKLOG: Final = socket.SOMAXCONN

# Bytes asked of the socket per read; large enough that a 1 MiB line takes few reads.
RECEIVE_CHUNK_BYTES: Final = 64 * 1024

# Seconds a watch stream's iterator gets to clean up (aclose) after its client went away, so a
# misbehaving handler cannot pin a dead connection forever.
WATCH_CLOSE_TIMEOUT: Final = 5.0

# Longest AF_UNIX socket path in bytes (sun_path is 108 bytes on Linux, 104 on BSD/macOS,
# including the terminating NUL).
MAX_SOCKET_PATH_BYTES: Final = 107 if sys.platform.startswith("linux") else 103

# Permissions: the home directory and the socket are for the node's owner only.
HOME_MODE: Final = 0o700
SOCKET_MODE: Final = 0o600

# Method name served as a stream (the connection is dedicated to it afterwards).
WATCH_METHOD: Final = "watch"

_T = TypeVar("_T")
_D = TypeVar("_D")

_JSON_TYPE_NAMES: Final[Mapping[type, str]] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    dict: "an object",
    list: "an array",
}


class ControlHandler(Protocol):
    """What the node implements to answer control requests.

    ``call`` answers every method except ``watch``; it raises :class:`ControlError` for expected
    failures (``unknown_method`` for names it does not serve, ``bad_request`` for missing or
    mistyped params: see :func:`require_param`).  Any other exception is reported to the client
    as ``internal`` and logged; the connection and the server carry on.

    ``watch`` returns an async iterator (typically an async generator) of JSON objects.  Its
    **first** item is the request's ``result`` (``{"watching": market}``) and is sent as
    ``{"id", "result"}``; it may instead raise :class:`ControlError` (e.g. unknown market),
    which is answered as an ordinary error and leaves the connection usable.  Every later item
    is an event, sent as one line as is.  The stream ends when the client disconnects (the
    iterator is then closed with ``aclose()``, so ``finally`` blocks run) or when the iterator
    finishes (the server then closes the connection).  An exception mid-stream is sent as one
    error line carrying the watch request's id (``internal`` unless it is a ControlError), then
    the connection is closed.  Trio rules apply: do not ``yield`` from
    inside a nursery or cancel scope; read from a memory channel fed by the node instead, and
    make that channel drop or coalesce updates so that a client that stops reading cannot
    stall the node (the server blocks in ``send`` when the client's socket buffer is full).
    The iterator must await something that reaches trio's scheduler (a channel's ``receive``,
    a sleep) before each event: the server sends an event without a checkpoint of its own when
    the socket takes it at once (``_Connection._write``).
    """

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """Run ``method`` and return its JSON-serialisable result."""
        ...

    def watch(self, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Start a watch stream (see the class docstring)."""
        ...


class ControlSocketInUse(RuntimeError):
    """Another live process already answers on this home's control socket."""


def socket_path(home: Path) -> Path:
    """The control socket of the node whose home is ``home``."""
    return home / CONTROL_SOCKET_NAME


# -- param helpers for handlers -----------------------------------------------------------------


def _is_kind(value: object, kind: type) -> bool:
    if kind is int:  # JSON true is not a number
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:  # JSON 1 is a fine number
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


def _checked(name: str, value: Any, kind: type[_T], choices: Collection[Any] | None) -> _T:
    if not _is_kind(value, kind):
        wanted = _JSON_TYPE_NAMES.get(kind, kind.__name__)
        raise ControlError(BAD_REQUEST, f"param {name!r} must be {wanted}, not {value!r:.60}")
    if choices is not None and value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ControlError(
            BAD_REQUEST, f"param {name!r} must be one of {options}, not {value!r:.60}"
        )
    if kind is float:
        value = float(value)
    result: _T = value
    return result


def require_param(
    params: Mapping[str, Any], name: str, kind: type[_T], *, choices: Collection[Any] | None = None
) -> _T:
    """``params[name]``, checked to be of JSON type ``kind``; else ``bad_request`` naming it."""
    if name not in params or params[name] is None:
        raise ControlError(BAD_REQUEST, f"missing param {name!r}")
    return _checked(name, params[name], kind, choices)


def optional_param(
    params: Mapping[str, Any],
    name: str,
    kind: type[_T],
    default: _D,
    *,
    choices: Collection[Any] | None = None,
) -> _T | _D:
    """``params[name]`` checked like :func:`require_param`, or ``default`` if absent or null."""
    if name not in params or params[name] is None:
        return default
    return _checked(name, params[name], kind, choices)


# -- server ------------------------------------------------------------------------------------


async def serve_control(
    home: Path,
    handler: ControlHandler,
    *,
    task_status: TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``<home>/control.sock`` until cancelled.

    Creates ``home`` (0700) if needed and tightens its mode if group or others have access.
    A stale socket file left by a dead node is replaced; a socket a live process still answers
    on raises :class:`ControlSocketInUse` rather than stealing it.  ``task_status.started`` is
    called with the socket path once clients can connect.  On exit the socket file is removed
    (unless another node has replaced it meanwhile).
    """
    home = Path(home)
    _prepare_home(home)
    path = socket_path(home)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise OSError(
            f"control socket path {path} is longer than {MAX_SOCKET_PATH_BYTES} bytes, "
            "the limit for Unix sockets; use a shorter home directory"
        )
    _remove_stale_socket(path)

    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        # umask makes the socket 0600 from birth (no window in which others could connect);
        # umask is process-wide, so chmod below repeats it in case another thread raced us.
        old_umask = os.umask(0o777 & ~SOCKET_MODE)
        try:
            raw.bind(os.fspath(path))
            bound = True
        finally:
            os.umask(old_umask)
        os.chmod(path, SOCKET_MODE)
        inode = _check_socket(path)
        raw.listen(SOCKET_BACKLOG)
    except BaseException:
        raw.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    trio.serve_listeners,
                    partial(_serve_connection, handler=handler),
                    [listener],
                    handler_nursery=nursery,
                )
            )
            logger.info("control server listening on %s", path)
            task_status.started(path)
    finally:
        raw.close()
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                os.unlink(path)


def check_home(home: Path) -> None:
    """Refuse a home that others could write to (``PermissionError``, one line): whoever can
    create files there can plant a key or a store before the node starts, or replace the control
    socket while it runs. Also refuse one that belongs to another user."""
    st = home.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise PermissionError(
            f"{home} belongs to another user (uid {st.st_uid}); refusing to serve"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(
            name
            for name, bit in (("its group", stat.S_IWGRP), ("other users", stat.S_IWOTH))
            if mode & bit
        )
        raise PermissionError(
            f"{home} is writable by {who} (mode {mode:o}), who could replace the node's key, "
            f"store or control socket; refusing to start: chmod 700 {home}"
        )


def _check_socket(path: Path) -> int:
    """The control socket's inode, once it is sure that only we can connect to it (a socket
    needs write permission to connect); raises ``PermissionError`` where the filesystem did not
    keep the 0600 mode (some ignore modes) or the socket is not ours."""
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISSOCK(st.st_mode):
        raise PermissionError(f"{path} is not the socket this node created; refusing to serve")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise PermissionError(
            f"{path} belongs to another user (uid {st.st_uid}); refusing to serve"
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"the control socket {path} is open to other users (mode {mode:o}, not "
            f"{SOCKET_MODE:o}: does its filesystem ignore permissions?); refusing to serve: "
            "use a home on a filesystem that keeps them"
        )
    return st.st_ino


def _prepare_home(home: Path) -> None:
    """Make sure ``home`` exists, belongs to us and is closed to everyone else."""
    home.mkdir(mode=HOME_MODE, parents=True, exist_ok=True)
    check_home(home)
    st = home.stat()
    if stat.S_IMODE(st.st_mode) & ~HOME_MODE:
        logger.warning("tightening permissions of %s to %o", home, HOME_MODE)
        os.chmod(home, HOME_MODE)


def _remove_stale_socket(path: Path) -> None:
    """Delete a control socket nobody answers on; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; move it out of the way")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        logger.info("removing stale control socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except TimeoutError:
        pass  # alive but with a full backlog: still in use
    finally:
        probe.close()
    raise ControlSocketInUse(
        f"another crdtbook node is already serving {path.parent} (its control socket answers); "
        "stop it first or use another --home"
    )


# -- connections -------------------------------------------------------------------------------


class _Oversize:
    """Marker returned by _LineReader for a line longer than MAX_REQUEST_LINE_BYTES."""


_OVERSIZE: Final = _Oversize()


class _LineReader:
    """Splits a byte stream into lines without ever buffering more than the line limit."""

    def __init__(self, stream: trio.abc.ReceiveStream, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already known to hold no newline
        self._discarding = False  # skipping the rest of an oversize line
        #: Whether the last ``next_line`` received from the stream (``receive_some`` always
        #: yields to trio's scheduler) rather than finding its line already buffered.
        self.received = False

    @property
    def buffered(self) -> bool:
        """Whether bytes after the last line wait here (the next line may need no receive)."""
        return bool(self._buf)

    async def next_line(self) -> bytes | _Oversize | None:
        """The next line (without its newline), _OVERSIZE, or None at end of stream.

        A final line without a newline counts as a line.  An oversize line is reported once,
        as soon as it crosses the limit, and its remainder is then skipped.
        """
        self.received = False
        while True:
            newline = self._buf.find(b"\n", self._scanned)
            if self._discarding:
                if newline >= 0:
                    del self._buf[: newline + 1]
                    self._discarding = False
                    self._scanned = 0
                    continue
                self._buf.clear()
                self._scanned = 0
            elif newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[: newline + 1]
                self._scanned = 0
                if len(line) > self._limit:
                    return _OVERSIZE
                return line
            elif len(self._buf) > self._limit:
                self._buf.clear()
                self._scanned = 0
                self._discarding = True
                return _OVERSIZE
            else:
                self._scanned = len(self._buf)
            data = await self._stream.receive_some(RECEIVE_CHUNK_BYTES)
            self.received = True
            if not data:
                if self._buf and not self._discarding:
                    line = bytes(self._buf)
                    self._buf.clear()
                    return line
                return None
            self._buf += data


@dataclass(frozen=True, slots=True)
class _Request:
    id: int
    method: str
    params: dict[str, Any]


def _error(request_id: int | None, code: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "error": {"code": code, "message": message}}


def _parse(line: bytes) -> _Request | dict[str, Any] | None:
    """A valid request, an error response for a malformed line, or None for a blank line."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return _error(None, BAD_REQUEST, "request is not UTF-8 text")
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        return _error(None, BAD_REQUEST, f"request is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return _error(
            None,
            BAD_REQUEST,
            'request must be a JSON object: {"id": 1, "method": ..., "params": {}}',
        )
    request_id = obj.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        return _error(None, BAD_REQUEST, 'request needs an integer "id"')
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        return _error(request_id, BAD_REQUEST, 'request needs a "method" (a string)')
    params = obj.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return _error(request_id, BAD_REQUEST, '"params" must be a JSON object')
    return _Request(request_id, method, params)


#: What ``json.dumps(message, separators=(",", ":"), allow_nan=False)`` builds on every call,
#: built once: every reply and watch event goes through it.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _encode(message: Mapping[str, Any]) -> bytes:
    """One JSON line; strict JSON (no NaN), ASCII-only so any string the handler returns fits."""
    return _ENCODER.encode(message).encode("ascii") + b"\n"


def _encode_reply(request_id: int | None, what: str, message: Mapping[str, Any]) -> bytes:
    """Encode, or turn an unserialisable handler result into an ``internal`` error."""
    try:
        return _encode(message)
    except (TypeError, ValueError):
        logger.exception("cannot encode the %s as JSON", what)
        return _encode(
            _error(request_id, INTERNAL, f"the node produced an invalid {what}; see its log")
        )


async def _serve_connection(stream: trio.SocketStream, *, handler: ControlHandler) -> None:
    """Task serving one client; nothing a client does escapes it."""
    try:
        await _Connection(stream, handler).run()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        logger.debug("control client went away")
    except Exception:
        logger.exception("control connection failed")
    finally:
        await trio.aclose_forcefully(stream)


class _Connection:
    def __init__(self, stream: trio.SocketStream, handler: ControlHandler) -> None:
        self._stream = stream
        self._handler = handler
        self._reader = _LineReader(stream, MAX_REQUEST_LINE_BYTES)
        # Watch mode writes events and refusals from two tasks; trio streams forbid
        # concurrent send_all. Until then one task sends, one reply after the other: no lock.
        self._send_lock: trio.Lock | None = None

    async def _send(self, data: bytes, *, yielded: bool = False) -> None:
        """Send ``data`` whole. ``yielded``: the calling task went through trio's scheduler
        since its last send (waiting for the request or event it answers), so this one may skip
        the checkpoint of trio's ``send_all`` (see :meth:`_write`)."""
        lock = self._send_lock
        if lock is None:
            await self._write(data, yielded)
            return
        # Taken at once when free (trio's acquire is a checkpoint even then): exclusion and
        # fairness are the lock's, since a lock with waiters refuses acquire_nowait.
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await self._write(data, yielded)
        finally:
            lock.release()

    async def _write(self, data: bytes, yielded: bool) -> None:
        """``send_all``, less its checkpoint when the socket takes every byte at once.

        trio's ``send_all`` yields to the scheduler after a send that succeeded, so that every
        call is a checkpoint. A reply here follows a wait for its request (or a watch event a
        wait for its change), which was one, and the local socket nearly always takes a reply
        of a few hundred bytes at once: the extra trip through the scheduler was ~1.5 task
        steps per op on five nodes at 500 ops/s (bench/README.md, session 10). A task that did
        not yield since its last send (pipelined requests found already buffered) keeps
        ``send_all`` and its checkpoint, so no client can keep this task from yielding."""
        stream = self._stream
        if not yielded or not isinstance(stream, trio.SocketStream):
            await stream.send_all(data)
            return
        try:
            sent = os.write(stream.socket.fileno(), data)  # non-blocking, as trio set it
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            if exc.errno == errno.EBADF:  # closed here (fileno -1), as trio would say
                raise trio.ClosedResourceError("control connection closed") from exc
            raise trio.BrokenResourceError(f"control client gone: {exc}") from exc
        if sent < len(data):
            await stream.send_all(memoryview(data)[sent:])

    async def _next_request(self) -> _Request | None:
        """The next well-formed request; malformed and oversize lines are answered here with
        their error. None when the client closed the connection."""
        while True:
            line = await self._reader.next_line()
            if line is None:
                return None
            if isinstance(line, _Oversize):
                await self._send(_encode(_oversize_error()))
                continue
            request = _parse(line)
            if request is None:
                continue
            if isinstance(request, dict):
                await self._send(_encode(request))
                continue
            return request

    async def run(self) -> None:
        while True:
            request = await self._next_request()
            if request is None:
                return
            if request.method == WATCH_METHOD:
                if await self._watch(request):
                    return
                continue
            reply = await self._call(request)
            # Without a checkpoint only when nothing is buffered behind this request (so the
            # next needs a receive, which yields) and, to be safe, it came with a receive: the
            # task yields between any two handler calls.
            reader = self._reader
            await self._send(reply, yielded=reader.received and not reader.buffered)

    async def _call(self, request: _Request) -> bytes:
        try:
            result = await self._handler.call(request.method, request.params)
        except ControlError as exc:
            return _encode_reply(request.id, "error", {"id": request.id, "error": exc.to_json()})
        except Exception:
            logger.exception("control method %r failed", request.method)
            return _encode(
                _error(
                    request.id,
                    INTERNAL,
                    f"internal error in {request.method!r}; see the node's log",
                )
            )
        return _encode_reply(request.id, "result", {"id": request.id, "result": result})

    async def _watch(self, request: _Request) -> bool:
        """Serve a watch request; True if the connection is finished, False to keep serving."""
        try:
            # A plain function may validate before returning its iterator, so it can raise here.
            events = self._handler.watch(request.params)
        except ControlError as exc:
            await self._send(_encode({"id": request.id, "error": exc.to_json()}))
            return False
        except Exception:
            logger.exception("watch failed to start")
            await self._send(_encode(_error(request.id, INTERNAL, "watch failed; see the log")))
            return False
        try:
            try:
                first = await anext(events)
            except ControlError as exc:
                await self._send(_encode({"id": request.id, "error": exc.to_json()}))
                return False
            except StopAsyncIteration:
                logger.error("watch stream ended before its first item")
                await self._send(_encode(_error(request.id, INTERNAL, "watch ended at once")))
                return False
            except Exception:
                logger.exception("watch failed to start")
                await self._send(_encode(_error(request.id, INTERNAL, "watch failed; see the log")))
                return False
            await self._send(
                _encode_reply(request.id, "result", {"id": request.id, "result": first})
            )
            self._send_lock = trio.Lock()  # two tasks send from here on
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._refuse_while_watching, nursery.cancel_scope)
                await self._pump(request.id, events)
                nursery.cancel_scope.cancel()
            return True
        finally:
            await _close_iterator(events)

    async def _pump(self, request_id: int, events: AsyncIterator[dict[str, Any]]) -> None:
        """Send events until the iterator ends, fails, or the client goes away."""
        try:
            async for event in events:
                # The iterator waited for this event (a checkpoint): see _write.
                await self._send(_encode_reply(request_id, "event", event), yielded=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except ControlError as exc:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._send(_encode({"id": request_id, "error": exc.to_json()}))
        except Exception:
            logger.exception("watch stream failed")
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._send(_encode(_error(request_id, INTERNAL, "watch failed; see the log")))

    async def _refuse_while_watching(self, scope: trio.CancelScope) -> None:
        """Answer requests sent on a watching connection; end the stream when the client leaves."""
        try:
            while True:
                request = await self._next_request()
                if request is None:
                    return
                await self._send(
                    _encode(
                        _error(
                            request.id,
                            BAD_REQUEST,
                            "this connection is watching; send requests on another connection",
                        )
                    )
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            scope.cancel()


def _oversize_error() -> dict[str, Any]:
    return _error(None, BAD_REQUEST, f"request line longer than {MAX_REQUEST_LINE_BYTES} bytes")


async def _close_iterator(events: AsyncIterator[dict[str, Any]]) -> None:
    """aclose() a watch iterator even while being cancelled, but not for ever."""
    aclose = getattr(events, "aclose", None)
    if aclose is None:
        return
    with trio.move_on_after(WATCH_CLOSE_TIMEOUT) as scope:
        scope.shield = True  # we are usually here because the connection was cancelled
        try:
            await aclose()
        except Exception:
            logger.exception("closing a watch stream failed")
