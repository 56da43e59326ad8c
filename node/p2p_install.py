"""What the node changes in py-libp2p 0.8.1 and in the process for it, in one explicit step.

Private helper of :mod:`crdtbook.node.p2p` (the only other module allowed to import libp2p).
:func:`install` runs when a network opens (``open_network`` calls it), never at import: importing
``crdtbook.node.p2p`` changes nothing in the logging tree or libp2p, and nothing here touches
the environment. Every
change is process-wide (libp2p looks these names up in its own modules) and idempotent:

* Yamux: window updates in batches of half a window (as go-yamux), and its ``PY_YAMUX_*``
  settings read once, not per frame (the environment itself is not changed);
* TCP: each socket receive reads ahead (:data:`READ_AHEAD_BYTES`), so a Noise frame is not two
  receives and a burst of frames is one; a write the socket takes at once costs no trip through
  trio's scheduler (one in :data:`WRITES_PER_CHECKPOINT` still does);
* the transport's locks (Yamux, its read-write lock, the TCP stream, net streams) take a free
  lock without a trip through trio's scheduler (:class:`EagerLock`), and Yamux writes a frame
  without formatting a debug line for it or a second scheduler trip after it;
* logging: libp2p's logs reach the application's handlers; multiaddr's DEBUG chatter is cut;
* libp2p: signed peer records checked once per peer (``node/p2p_records.py``); bounds on what a
  peer can make it read before authentication (``node/p2p_limits.py``); dropped outbound gossip
  counted (:func:`send_drops`); listen sockets exclusive (no ``SO_REUSEPORT``).

What changes gossip's own behaviour (unsigned messages, content-keyed message cache) is not
patched in: it lives in the ``Pubsub`` and ``GossipSub`` subclasses of ``node/p2p_pubsub.py``.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import types
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Final

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2

from . import p2p_limits, p2p_records

__all__ = ["install", "send_drops"]


#: py-libp2p's Yamux (0.8.1) sends a WINDOW_UPDATE frame after every read by default
#: ("release on read"), so each small gossip message costs a second frame, Noise-encrypted,
#: on the way back. "0" gives go-yamux's behaviour: credit is returned in batches of half a
#: window. Measured with bench/bench_network.py, 5 nodes at 300 ops/s: node CPU per op 5.2 ->
#: 4.5 ms (all nodes together), p99 238 -> 215 ms. An explicit PY_YAMUX_RELEASE_ON_READ in the
#: environment wins. (Keys: Yamux's names without their PY_YAMUX_ prefix.)
YAMUX_TUNING: Final = {"RELEASE_ON_READ": "0"}


def _install_yamux_tuning() -> None:
    """Yamux reads its ``PY_YAMUX_*`` settings from the environment on every frame (``os.getenv``
    several times per read and write: ~5% of a busy node's CPU, py-spy); here each is read once,
    with :data:`YAMUX_TUNING` as the default, and the environment itself is left alone."""
    import libp2p.stream_muxer.yamux.yamux as yamux_module

    if getattr(yamux_module._py_yamux_env, "_crdtbook_tuned", False):
        return
    cache: dict[tuple[str, str], str] = {}

    def tuned_env(name: str, default: str = "") -> str:
        value = cache.get((name, default))
        if value is None:
            value = os.environ.get(f"PY_YAMUX_{name}", YAMUX_TUNING.get(name, default))
            cache[(name, default)] = value
        return value

    tuned_env._crdtbook_tuned = True  # type: ignore[attr-defined]
    yamux_module._py_yamux_env = tuned_env


class _EagerSync:
    """A trio lock or semaphore whose ``acquire`` takes it at once when it is free.

    trio's ``acquire`` is a checkpoint: even a free lock costs the task a trip through the
    scheduler (``cancel_shielded_checkpoint``: reschedule, run loop, resume). py-libp2p takes
    several locks per frame it reads or writes (Yamux's stream read-write lock and window lock,
    its connection write lock, the TCP stream's read and write locks, net streams' state lock),
    almost always free: five node/p2p Networks in one process ran ~380 trio task steps per
    gossip message (16 copies) with trio's locks, ~145 with these (``bench/bench_network.py
    --only transport``; figures in bench/README.md). Exclusion is unchanged, and so is fairness:
    a lock with waiters is not free (``acquire_nowait`` refuses it), so a newcomer queues behind
    them. What is lost is only the checkpoint of an uncontended acquire; every path that takes
    these locks goes on to socket I/O, which checkpoints."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def acquire(self) -> None:
        try:
            self._inner.acquire_nowait()
        except trio.WouldBlock:
            await self._inner.acquire()

    def acquire_nowait(self) -> None:
        self._inner.acquire_nowait()

    def release(self) -> None:
        self._inner.release()

    def statistics(self) -> Any:
        return self._inner.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


class EagerLock(_EagerSync):
    """``trio.Lock`` taken without a checkpoint when free (see :class:`_EagerSync`)."""

    def __init__(self) -> None:
        super().__init__(trio.Lock())

    def locked(self) -> bool:
        return bool(self._inner.locked())


class EagerSemaphore(_EagerSync):
    """``trio.Semaphore`` taken without a checkpoint when free (see :class:`_EagerSync`)."""

    def __init__(self, initial_value: int, *, max_value: int | None = None) -> None:
        super().__init__(trio.Semaphore(initial_value, max_value=max_value))

    @property
    def value(self) -> int:
        return int(self._inner.value)

    @property
    def max_value(self) -> int | None:
        return self._inner.max_value  # type: ignore[no-any-return]


class _EagerTrio(types.ModuleType):
    """What the modules of :data:`EAGER_LOCK_MODULES` see as ``trio``: trio itself, except that
    the locks and semaphores they create are eager."""

    Lock = EagerLock
    Semaphore = EagerSemaphore

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


#: The libp2p modules whose locks are made eager: those a gossip message's bytes pass through.
#: Set to ``()`` before the first network opens to keep trio's (bench A/B runs do).
EAGER_LOCK_MODULES: tuple[str, ...] = (
    "libp2p.stream_muxer.yamux.yamux",
    "libp2p.stream_muxer.rw_lock",
    "libp2p.io.trio",
    "libp2p.network.stream.net_stream",
)


def _install_eager_locks() -> None:
    """Locks created from now on in :data:`EAGER_LOCK_MODULES` are eager (the modules look
    ``trio`` up in their globals when they create one)."""
    shim = _EagerTrio("trio")
    for name in EAGER_LOCK_MODULES:
        namespace = vars(importlib.import_module(name))
        if not isinstance(namespace["trio"], _EagerTrio):
            namespace["trio"] = shim


#: False keeps Yamux's own ``_write_frame`` (bench A/B runs; see :func:`_install_lean_frames`).
LEAN_YAMUX_FRAMES = True


def _install_lean_frames() -> None:
    """Yamux's ``_write_frame``, as the library has it less two costs per frame: it unpacks the
    header and formats a DEBUG line (flag names, f-string) whether or not DEBUG is on, and after
    the write it awaits ``trio.lowlevel.checkpoint()``, a second trip through the scheduler (the
    socket send that the write ends in has checkpointed already). The write itself is the same:
    the connection's whole frame, under its write lock."""
    import libp2p.stream_muxer.yamux.yamux as yamux_module

    muxer = yamux_module.Yamux
    original = muxer._write_frame
    if not LEAN_YAMUX_FRAMES or getattr(original, "_crdtbook_original", None) is not None:
        return

    async def write_frame(self: Any, data: bytes) -> None:
        async with self._write_lock:
            await self.secured_conn.write(data)

    write_frame._crdtbook_original = original  # type: ignore[attr-defined]
    muxer._write_frame = write_frame  # type: ignore[method-assign]


#: False keeps Yamux's own window-update rule (bench A/B runs; see :func:`_install_window_rule`).
BATCHED_WINDOW_UPDATES = True


def _install_window_rule() -> None:
    """Yamux returns receive credit (a WINDOW_UPDATE frame) only once half the window has been
    read, as go-yamux does (``sendWindowUpdate``: ``delta < max/2`` sends nothing).

    py-libp2p 0.8.1 has that hysteresis too, but then a "partial slack" branch sends an update
    for whatever was read whenever less than half is outstanding, which is every read of a
    small gossip message: a second frame, Noise-encrypted, written back for each one received
    (3,295 updates against 3,696 data frames written by one node of bench_network's 5 at 500
    ops/s). Credit now goes back in steps of at least half the window (128 KiB at first); the
    window's growth for bulk transfers (the library's auto-tuning, applied when an update is
    sent) is kept, and a sender that exhausts the window waits for the update as before."""
    import libp2p.stream_muxer.yamux.yamux as yamux_module

    stream = yamux_module.YamuxStream
    original = stream._auto_tune_and_send_window_update
    if not BATCHED_WINDOW_UPDATES or getattr(original, "_crdtbook_original", None) is not None:
        return

    async def window_update(self: Any, *, bytes_read: int = 0) -> None:
        increment = 0
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            delta = self.target_recv_window - (self.recv_window + buffered)
            if delta > 0 and delta >= self._grow_threshold():
                increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
        if increment > 0:
            await self.send_window_update(increment, skip_lock=True)

    window_update._crdtbook_original = original  # type: ignore[attr-defined]
    stream._auto_tune_and_send_window_update = window_update  # type: ignore[method-assign]


#: False keeps the TCP stream's read of exactly what is asked (bench A/B runs; see
#: :func:`_install_read_ahead`).
TCP_READ_AHEAD = True
#: Bytes asked of the kernel per ``recv`` once a read must go to the socket: a burst of frames
#: (several gossip RPCs, each a Noise frame of a few KB) is then one system call, and the buffer
#: a connection may hold beyond what was asked is bounded by this (Noise's largest frame is
#: 64 KiB + 2, so a frame is at most two reads).
READ_AHEAD_BYTES: Final = 64 * 1024


def _install_read_ahead() -> None:
    """The TCP stream reads ahead: each ``recv`` asks for :data:`READ_AHEAD_BYTES` and what the
    caller did not ask for is kept for its next read.

    py-libp2p 0.8.1 reads a Noise frame as two exact reads, its 2-byte length and then its body
    (``read_exactly``), each a ``recv`` of just that many bytes: two system calls and two trips
    through trio's scheduler (a successful socket call checkpoints) per frame, and the same again
    for every frame already waiting in the kernel. Here a read served from the buffer costs
    neither; one that finds it empty makes the library's own call (same lock, same errors), for
    more bytes. The bytes and their order are unchanged: each connection's reads go through its
    one stream object, and the buffer is filled and taken from with no await in between."""
    import libp2p.io.trio as trio_io

    tcp = trio_io.TrioTCPStream
    original = tcp.read
    if not TCP_READ_AHEAD or getattr(original, "_crdtbook_original", None) is not None:
        return

    async def read(self: Any, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        ahead: bytearray | None = getattr(self, "_crdtbook_ahead", None)
        if not ahead:
            data = await original(self, READ_AHEAD_BYTES if n is None else max(n, READ_AHEAD_BYTES))
            # Looked up again: a reader that waited on the lock before us may have left bytes,
            # which come first (the lock serializes the socket reads).
            ahead = getattr(self, "_crdtbook_ahead", None)
            if not ahead:
                if n is None or len(data) <= n:
                    return data  # the common case: nothing buffered, nothing left over
                self._crdtbook_ahead = bytearray(data[n:])
                return data[:n]
            ahead += data
        if n is None or n >= len(ahead):
            taken = bytes(ahead)
            ahead.clear()
        else:
            taken = bytes(ahead[:n])
            del ahead[:n]
        return taken

    read._crdtbook_original = original  # type: ignore[attr-defined]
    tcp.read = read  # type: ignore[method-assign]


#: False keeps the TCP stream's write as the library has it (bench A/B runs; see
#: :func:`_install_eager_writes`).
EAGER_TCP_WRITES = True
#: One write in this many takes the library's path, checkpoint and all, whatever the socket
#: would take: a task writing frame after frame without waiting in between (a sync session
#: serving a long history) still goes through trio's scheduler every few frames.
WRITES_PER_CHECKPOINT: Final = 8


def _install_eager_writes() -> None:
    """The TCP stream writes at once what the socket takes, without the trip through trio's
    scheduler that ``send_all`` makes after a successful send.

    Every gossip RPC a node sends (and every Yamux frame) ends in the TCP stream's ``write``:
    the lock, then trio's ``send_all``, whose socket call is a checkpoint even when it succeeds
    at once, as it nearly always does for a few KB to a local kernel buffer: ~1.1 scheduler
    trips per op on five nodes at 500 ops/s (bench/README.md, session 10). Here, when the lock
    is free, the bytes go to the socket directly (``os.write`` on its non-blocking descriptor,
    under the lock); what it does not take, and any error, goes the library's way (so errors
    are the library's: ``ConnectionClosedError`` for a reset, silence for a closed stream).
    Order is kept: the lock is held for the direct write, is free of waiters when taken
    (``acquire_nowait`` refuses a lock with waiters), and the library's write of the rest
    takes it again with no await in between. Every :data:`WRITES_PER_CHECKPOINT`-th write
    keeps the checkpoint."""
    import libp2p.io.trio as trio_io

    tcp = trio_io.TrioTCPStream
    original = tcp.write
    if not EAGER_TCP_WRITES or getattr(original, "_crdtbook_original", None) is not None:
        return

    async def write(self: Any, data: bytes) -> None:
        count = getattr(self, "_crdtbook_writes", 0) + 1
        self._crdtbook_writes = count
        stream = self.stream
        if (
            count % WRITES_PER_CHECKPOINT
            and isinstance(stream, trio.SocketStream)
            and type(data) is bytes  # what libp2p writes; len() then counts bytes
            # A task already cancelled writes nothing, as with the library (whose send checks
            # first): a direct write could send part of a frame, and a frame cut short breaks
            # the connection's Noise stream for every stream on it.
            and trio.current_effective_deadline() != -math.inf
        ):
            lock = self.write_lock
            try:
                lock.acquire_nowait()
            except trio.WouldBlock:
                pass  # another writer holds it or waits for it: queue behind, the library's way
            else:
                try:
                    sent = os.write(stream.socket.fileno(), data)
                except OSError:  # full (BlockingIOError), reset, closed: the library's way
                    sent = 0
                finally:
                    lock.release()
                if sent == len(data):
                    return
                data = data[sent:]
        await original(self, data)

    write._crdtbook_original = original  # type: ignore[attr-defined]
    tcp.write = write  # type: ignore[method-assign]


def _configure_library_logging() -> None:
    """Route libp2p's logs to the application's handlers and quieten multiaddr.

    ``import libp2p`` sets the ``libp2p`` logger to ``propagate=False`` with no handler
    (unless ``LIBP2P_DEBUG`` is set, in which case libp2p's own handlers are kept).
    """
    if not os.environ.get("LIBP2P_DEBUG"):
        logging.getLogger("libp2p").propagate = True
    # multiaddr logs heavily at DEBUG; libp2p pins its auto-connector to INFO and logs
    # a status line every few seconds.
    for name in ("multiaddr", "libp2p.network.auto_connector"):
        lib_logger = logging.getLogger(name)
        if lib_logger.level < logging.WARNING:
            lib_logger.setLevel(logging.WARNING)


# libp2p drops outbound gossip silently when a peer's queue (32 RPCs) is full; it only logs at
# DEBUG. Count the drops so `status` can show them: the one sign that gossip is over capacity.
_SEND_DROPS = [0]


def send_drops() -> int:
    """Outbound gossip RPCs libp2p dropped on full peer queues, in this process so far."""
    return _SEND_DROPS[0]


def _install_drop_counter() -> None:
    import libp2p.pubsub.gossipsub as gossipsub_module
    import libp2p.pubsub.pubsub as pubsub_module

    # The name each module's own calls look up (both import it from .rpc_queue, neither
    # re-exports it): pubsub drops subscription announcements there, and the router every
    # gossip RPC (``GossipSub.send_rpc``: a full queue, an oversized part). Counting only
    # pubsub's missed every dropped gossip message.
    for module in (pubsub_module, gossipsub_module):
        namespace = vars(module)
        original = namespace["drop_rpc"]
        if not getattr(original, "_crdtbook_counting", False):
            namespace["drop_rpc"] = _counting(original)


def _counting(original: Callable[[ID, rpc_pb2.RPC], None]) -> Callable[[ID, rpc_pb2.RPC], None]:
    def counting_drop_rpc(peer_id: ID, rpc: rpc_pb2.RPC) -> None:
        _SEND_DROPS[0] += 1
        original(peer_id, rpc)

    counting_drop_rpc._crdtbook_counting = True  # type: ignore[attr-defined]
    return counting_drop_rpc


# libp2p 0.8.1 opens every TCP listen socket with SO_REUSEPORT (for DCUtR hole punching, which
# this node does not use). On Linux that lets a second process listen on a port another one
# already listens on, when both set it: a second node started on a busy port came up, printed
# "listening on" and split the incoming connections with the first. Listen sockets here set
# SO_REUSEADDR only (a restart may still reuse a port in TIME_WAIT), so the kernel refuses a
# port in use, whatever flags its owner set.


def _install_exclusive_listen() -> None:
    import socket as stdlib_socket

    import libp2p.transport.tcp.tcp as tcp_module

    original = tcp_module._set_reuse_flags
    if getattr(original, "_crdtbook_original", None) is not None:
        return

    def set_reuse_addr_only(sock: trio.socket.SocketType) -> None:
        with suppress(OSError):
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)

    set_reuse_addr_only._crdtbook_original = original  # type: ignore[attr-defined]
    tcp_module._set_reuse_flags = set_reuse_addr_only


_installed = [False]


def install() -> None:
    """Make every change listed in the module doc, the first time it is called in a process (an
    explicit setting of the Yamux variable in the environment wins). Later calls change nothing,
    so a test may take one change back (``p2p_limits.uninstall``) while networks open."""
    if _installed[0]:
        return
    _installed[0] = True
    _configure_library_logging()
    _install_yamux_tuning()
    _install_eager_locks()
    _install_lean_frames()
    _install_window_rule()
    _install_read_ahead()
    _install_eager_writes()
    p2p_records.install()
    p2p_limits.install()  # caps multistream-select reads (see node/p2p_limits.py)
    _install_drop_counter()
    _install_exclusive_listen()
