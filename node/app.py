"""`crdtbook node`: run a peer in the foreground until SIGINT/SIGTERM.

Lifecycle (structured: one nursery owns every task):
  home + identity -> store -> replicas rebuilt from the store -> libp2p network -> gossip
  validators, sync handler, control socket -> "ready" lines on stdout -> serve.
Shutdown in order: stop accepting control requests and syncs, flush gossip batches, stop every
task, write each market's checkpoint, leave libp2p, close the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from crdtbook import Market

from . import crash_gate
from .control import check_home, serve_control
from .discovery import ANNOUNCE_INTERVAL, Discovery
from .finality import HEARTBEAT_INTERVAL
from .gossip import Gossip
from .handler import ControlAdapter
from .home import IDENTITY_FILE, load_or_create_identity
from .join import HISTORY_BACKFILL_AFTER, JOIN_PEER_WAIT, Joiner
from .network import Network
from .service import FLUSH_DELAY, POINT_INTERVAL, PUBLISH_INTERVAL, MarketState, NodeService
from .store import OpStore, StoreError
from .summary import summary_loop
from .sync import FRAME_TIMEOUT
from .sync_schedule import SYNC_INTERVAL, SYNC_SESSION_TIMEOUT, SyncScheduler
from .wire import MAX_BATCH_OPS

if TYPE_CHECKING:  # libp2p's import costs ~0.7 s: the node imports node.p2p only when it runs
    from .p2p import NetworkConfig

__all__ = ["IDENTITY_FILE", "NodeConfig", "load_or_create_identity", "run_node"]

logger = logging.getLogger("crdtbook.node")

LOCK_FILE: Final = "lock"
NODE_INFO_FILE: Final = "node.json"
DEFAULT_MARKET: Final = "BTC-USD"


@dataclass
class NodeConfig:
    """Everything ``crdtbook node`` is started with; the defaults are the production values.
    The CLI sets a few fields; tests and benches set the rest (``node.procs``)."""

    home: Path
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/4001"])
    bootstrap: list[str] = field(default_factory=list)
    markets: list[str] = field(default_factory=list)
    verbose: int = 0
    #: Re-announce our markets in the DHT this often (node.discovery).
    announce_interval: float = ANNOUNCE_INTERVAL
    #: Ask each peer for what we lack this often (node.sync_schedule).
    sync_interval: float = SYNC_INTERVAL
    #: Bounds on sync (node.sync): one frame read or written, served or pulled, and a whole
    #: session pulled from a peer. A peer that stalls, dribbles or vanishes is dropped then.
    sync_frame_timeout: float = FRAME_TIMEOUT
    sync_session_timeout: float = SYNC_SESSION_TIMEOUT
    #: A witness heartbeats this long after it has something to acknowledge (node.finality).
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    #: Ops per gossip message and how long the first waits (bench baselines set 1 and 0).
    gossip_batch: int = MAX_BATCH_OPS
    flush_delay: float = FLUSH_DELAY
    publish_interval: float = PUBLISH_INTERVAL
    #: Wait for the disk on every commit (power-loss durability) instead of for the OS
    #: (process-crash durability, ~100x faster commits).
    fsync: bool = False
    #: A witnessed market compacts at points, every this many final ops (node.service); every
    #: node of a market must use the same (tests and benches only).
    point_interval: int = POINT_INTERVAL
    #: How a node whose store holds nothing of a witnessed market starts it: "snapshot" (from
    #: a witnessed snapshot, node.join) or "full" (the whole log, as sync brings it).
    join: str = "snapshot"
    #: How long a joining node waits for a peer that offers a snapshot (node.join).
    join_peer_wait: float = JOIN_PEER_WAIT
    #: Archived ops a witnessed market keeps below each new point (node.retention); None: all.
    retention: int | None = None
    #: A market joined from a snapshot fetches the history before its point this many seconds
    #: after the join, and derives its fills and orders (node.derive); None: only when an op
    #: needs it (``fills`` and ``order`` then answer from the join point on).
    history_backfill: float | None = HISTORY_BACKFILL_AFTER
    #: The libp2p layer's tunables (GossipSub heartbeat and degree, timeouts, message cap);
    #: None: ``node.p2p.NetworkConfig()``'s defaults, which are the production values.
    network: NetworkConfig | None = None
    #: Serve the HTTP/WebSocket API and the web view on (host, port) (node.http_api); None: off.
    http: tuple[str, int] | None = None


class HomeInUse(RuntimeError):
    """Another node runs with this home: two nodes must never share a store and a key."""


def lock_home(home: Path) -> int:
    """Hold an exclusive lock on ``<home>/lock`` for the process's life (released on exit,
    even on kill -9, since the kernel drops the lock with the file descriptor)."""
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise HomeInUse(
            f"another crdtbook node (pid {other}) is running with home {home}; stop it or use "
            "--home to run a second node"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        root.addHandler(handler)
    root.setLevel(level)
    set_library_log_levels(verbose)


def set_library_log_levels(verbose: int) -> None:
    """libp2p logs routine peer churn as warnings and even errors ("Failed to read DHT message",
    "MultiselectClient handshake: read failed" on every ordinary disconnect). Its errors show
    from -v, its warnings from -vv, its debug output from -vvv; our own wrappers report what
    matters to an operator at the default level. Call again after importing libp2p: its import
    resets its loggers."""
    level = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING}.get(verbose, logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        if name == "libp2p" or name.startswith("libp2p."):
            logging.getLogger(name).setLevel(level)
    logging.getLogger("libp2p").setLevel(level)
    logging.getLogger("multiaddr").setLevel(logging.WARNING)


def run_node(config: NodeConfig) -> int:
    """Run a node until SIGINT/SIGTERM; returns the process exit code."""
    configure_logging(config.verbose)
    try:
        return trio.run(_main, config)
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was installed (start-up)
        print("crdtbook node: interrupted while starting", file=sys.stderr)
        return 130
    except (StoreError, HomeInUse, ValueError, OSError) as exc:
        print(f"crdtbook node: {exc}", file=sys.stderr)
        return 1


def _say(text: str) -> None:
    print(text, flush=True)


def say_joined(ms: MarketState) -> None:
    """A join's outcome, on the node's output beside its banner (in the log it is INFO, so an
    operator at the default level saw "joining" and then nothing)."""
    if ms.join_state == "full":
        _say(f"  {ms.market.name}: no snapshot to join from; syncing the full log")
    else:
        _say(f"  {ms.market.name}: joined from the point at {ms.joined_from} ops; syncing the rest")


async def _main(config: NodeConfig) -> int:
    # libp2p import costs ~0.7 s: only here
    from .p2p import (
        NetworkConfig,
        check_bootstrap_addr,
        check_listen_addr,
        open_network,
        peer_id_of_seed,
    )

    set_library_log_levels(config.verbose)
    # Addresses that can never work are refused before anything is created or opened.
    for addr in config.listen:
        check_listen_addr(addr)
    bootstrap_ids = {addr: check_bootstrap_addr(addr) for addr in config.bootstrap}

    # So is a market list that names one market twice: a node follows one market per name.
    markets = [Market.parse(spec) for spec in (config.markets or [DEFAULT_MARKET])]
    check_one_market_per_name(markets)

    home = Path(config.home).expanduser()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_home(home)  # before anything in it is trusted: others must not be able to write there
    lock_fd = lock_home(home)
    http_sock: socket.socket | None = None
    store: OpStore | None = None
    service: NodeService | None = None
    try:
        identity, created = load_or_create_identity(home)
        own_id = peer_id_of_seed(identity.seed)
        for addr, peer in bootstrap_ids.items():
            if peer == own_id:
                raise ValueError(f"bootstrap address {addr!r} is this node itself ({home})")
        if config.http is not None:  # listening before the store loads: a port in use is one
            from .http_api import bind_http  # line at once, and nothing can take it after

            http_sock = bind_http(*config.http)
        # NORMAL: durable across a crash of the node (kill -9); FULL: across power loss too.
        store = OpStore.open(home, synchronous="FULL" if config.fsync else "NORMAL")
        service = NodeService(
            identity,
            store,
            markets,
            gossip_batch=config.gossip_batch,
            flush_delay=config.flush_delay,
            publish_interval=config.publish_interval,
            fsync=config.fsync,
            heartbeat_interval=config.heartbeat_interval,
            point_interval=config.point_interval,
            retention=config.retention,
        )
        try:
            service.after_crash = crash_gate.begin_run(store, config.fsync)
        except StoreError as exc:  # refusing writes: nothing is signed until it takes them
            logger.warning("could not record this run in the store: %s", exc)
        if service.after_crash:
            logger.warning(
                "the last run of this node ended with its machine (another boot) and the store "
                "commits without --fsync: it may have lost its own last ops, so it signs nothing "
                "in a market until it has synced it with a peer"
            )
        started = time.monotonic()
        loaded = service.load_from_store()
        load_seconds = time.monotonic() - started
        service.crash_wait_from = trio.current_time()  # (node.crash_gate: from now on)
        # The loop's busy time, for the gate on early publishing (node/headroom.py); from here,
        # so that its first window is the running node's, not the load's (which waits for no
        # I/O).
        trio.lowlevel.add_instrument(service.headroom)
        net_config = config.network or NetworkConfig()
        async with open_network(identity.seed, config.listen, config=net_config) as net:
            node = _Node(config, service, net, http_sock)
            await node.run(home, created, loaded, load_seconds)
    finally:
        if http_sock is not None:
            http_sock.close()  # no-op once served (hypercorn took the descriptor)
        if store is not None:
            if service is not None:
                with contextlib.suppress(StoreError):  # (a store that refuses writes: the
                    crash_gate.end_run(store)  # next start waits for a sync, needlessly)
            store.close()
        with contextlib.suppress(OSError):  # e.g. a filesystem that turned read-only
            (home / NODE_INFO_FILE).unlink(missing_ok=True)
        os.close(lock_fd)
    return 0


class _Node:
    """Wires the service to the network: one nursery owns every task of the running node.

    Each concern is a module of its own (gossip: ``node.gossip``, sync scheduling:
    ``node.sync_schedule``, discovery: ``node.discovery``, the summary line: ``node.summary``);
    this class starts them, answers ``status``/``block`` for the control socket and stops
    everything in order. A further service joins by one ``nursery.start_soon`` in :meth:`run`.
    """

    def __init__(
        self,
        config: NodeConfig,
        service: NodeService,
        net: Network,
        http_sock: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.http_sock = http_sock  # the HTTP API's bound socket (with --http)
        self.service = service
        self.net = net
        self.gossip = Gossip(service, net)
        self.sync = SyncScheduler(
            service,
            net,
            interval=config.sync_interval,
            frame_timeout=config.sync_frame_timeout,
            session_timeout=config.sync_session_timeout,
        )
        self.joiner = Joiner(
            service,
            net,
            mode=config.join,
            frame_timeout=config.sync_frame_timeout,
            peer_wait=config.join_peer_wait,
            on_joined=self._joined,
            backfill_after=config.history_backfill,
        )
        self.discovery = Discovery(
            net,
            list(service.markets),
            config.bootstrap,
            announce_interval=config.announce_interval,
        )

    async def run(
        self,
        home: Path,
        created: bool,
        loaded: dict[str, int],
        load_seconds: float,
        stop: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Run until ``stop()`` returns (default: SIGINT or SIGTERM), then stop in order."""
        service, net = self.service, self.net
        self.sync.install()
        self.joiner.install()  # before sync runs: it marks the markets to join first
        async with trio.open_nursery() as nursery:
            await nursery.start(self.gossip.run)
            for ms in service.markets.values():
                nursery.start_soon(service.apply_loop, ms)
                if ms.market.witnessed:
                    nursery.start_soon(service.heartbeat_loop, ms)
                    nursery.start_soon(service.finality_loop, ms)
            adapter = ControlAdapter(service, self.status, self.block)
            control = await nursery.start(serve_control, home, adapter)
            http = None
            if self.config.http is not None:  # imported only when asked for (starlette)
                from .http_api import http_banner, serve_http

                serve = partial(serve_http, sock=self.http_sock)
                http = await nursery.start(serve, adapter, home, *self.config.http)
            nursery.start_soon(service.wal_checkpoint_loop)
            nursery.start_soon(self.sync.run)
            nursery.start_soon(self.joiner.run)
            nursery.start_soon(self.discovery.run)
            nursery.start_soon(summary_loop, service, net, _say)

            addrs = net.addrs()
            identity_key = service.identity.public_key
            _say(f"crdtbook node {net.peer_id}{' (new identity)' if created else ''}")
            for addr in addrs:
                _say(f"  listening on {addr}")
            for ms in service.markets.values():
                covered = ms.replica.restore_report.from_checkpoint
                _say(
                    f"  following {ms.market.spec} with {loaded.get(ms.market.name, 0)} ops "
                    f"from the store ({load_seconds:.2f} s"
                    + (f", checkpoint of {covered} ops)" if covered else ")")
                )
                if ms.market.witnessed:
                    keys = ms.replica.witnesses()
                    role = "this node is one" if identity_key in keys else "this node is not one"
                    _say(f"  {ms.market.name}: {len(keys)} witness(es) in force; {role}")
                if ms.joining:
                    _say(f"  {ms.market.name}: joining from a witnessed snapshot")
            _say(f"  control socket {control}")
            for line in http_banner(http, home) if http else ():
                _say(line)
            _write_info(home, net.peer_id, addrs, service)
            _say("ready")

            await (stop or _wait_for_signal)()
            _say("shutting down")
            service.closing = True
            await self.gossip.flush_all()
            nursery.cancel_scope.cancel()
        # Every task has stopped (only an orderly stop gets here): the replicas are final.
        # A checkpoint only saves work at the next start: failing to write one never stops
        # the node from stopping in order.
        try:
            service.write_checkpoints()
        except (StoreError, sqlite3.Error, OSError) as exc:
            logger.warning("could not write checkpoints: %s", exc)
        except Exception:
            logger.exception("could not write checkpoints")

    def _joined(self, ms: MarketState) -> None:
        say_joined(ms)
        self.sync.ask_all()

    def status(self) -> dict[str, Any]:
        return {
            "peer_id": self.net.peer_id,
            "addrs": self.net.addrs(),
            "peers": [
                {"peer_id": p, "addrs": self.net.peer_addrs(p)}
                for p in sorted(self.net.connected_peers())
            ],
            "network": self.net.stats(),
            "sync_sessions": {
                "serving": self.sync.serving,
                "pulling": len(self.sync.syncing),
                "served": self.sync.served_total,
                "pulled": self.sync.pulled_total,
                "ops_pulled": self.sync.ops_pulled_total,
                "refused_busy": self.sync.refused_busy_total,
            },
            # The event loop's busy fraction over its last window, and whether that leaves room
            # for early publishing (node/headroom.py).
            "loop": {
                "busy": self.service.headroom.last_busy,
                "early_publish": self.service.headroom.spare,
            },
        }

    def block(self, peer: str | None, seconds: float) -> list[str]:
        peers = [peer] if peer else list(self.net.connected_peers())
        for p in peers:
            self.net.ban(p, seconds)
        logger.warning("blocking %d peers for %.0f s on the owner's request", len(peers), seconds)
        return peers


async def _wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


def _write_info(home: Path, peer_id: str, addrs: list[str], service: NodeService) -> None:
    info = {
        "pid": os.getpid(),
        "peer_id": peer_id,
        "addrs": addrs,
        "markets": [ms.market.spec for ms in service.markets.values()],
    }
    tmp = home / (NODE_INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(home / NODE_INFO_FILE)


def check_one_market_per_name(markets: Sequence[Market]) -> None:
    """Refuse two definitions of one market name (``ValueError``, one line). The control API,
    the CLI and the HTTP API name a market by its name, so one of the two could never be
    reached: orders meant for one went to the other, labelled as the first."""
    seen: dict[str, Market] = {}
    for market in markets:
        other = seen.setdefault(market.name, market)
        if other.id != market.id:
            raise ValueError(
                f"two definitions of market {market.name} (ids {other.id.hex()[:12]} and "
                f"{market.id.hex()[:12]}): a node follows one market per name; give the other "
                "a name of its own"
            )
