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
import random
import signal
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from crdtbook import Identity, Market

from .control import check_home, serve_control
from .finality import HEARTBEAT_INTERVAL
from .handler import ControlAdapter
from .service import BAN_SECONDS, FLUSH_DELAY, PUBLISH_INTERVAL, MarketState, NodeService
from .store import OpStore, StoreError
from .sync import FRAME_TIMEOUT, MarketNotFollowed, pull, respond
from .wire import MAX_BATCH_OPS, SYNC_PROTOCOL, WireError

__all__ = ["NodeConfig", "run_node"]

logger = logging.getLogger("crdtbook.node")

IDENTITY_FILE: Final = "identity.key"
LOCK_FILE: Final = "lock"
NODE_INFO_FILE: Final = "node.json"
DEFAULT_MARKET: Final = "BTC-USD"
#: Every this many seconds each connected peer is asked for what we lack (plus on connect, and
#: at once after a sync that named unknown heads). Gossip delivers nearly everything; this bounds
#: how long an op whose gossip was dropped takes. Measured, 5 nodes at 500 ops/s: going from 2 s
#: to 5 s cut node CPU per op by 9% (3.07 -> 2.80 ms, two runs each) and p99 from 254 to 214 ms;
#: 4 s keeps most of that saving with a shorter worst case for a dropped op.
SYNC_INTERVAL: Final = 4.0
#: A whole sync session (a large catch-up streams many frames; each frame has its own bound).
SYNC_SESSION_TIMEOUT: Final = 120.0
#: After a peer says it does not follow a market, do not ask it again for this long.
NOT_FOLLOWING_BACKOFF: Final = 60.0
#: Discovery: look for providers of our markets this often once settled (faster at start).
DISCOVERY_INTERVAL: Final = 10.0
#: A bootstrap peer still unreachable after this many attempts gets a WARNING (shown without -v):
#: until it, or another peer, answers, this node trades alone.
BOOTSTRAP_WARN_AFTER: Final = 3
SUMMARY_INTERVAL: Final = 60.0


@dataclass
class NodeConfig:
    home: Path
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/4001"])
    bootstrap: list[str] = field(default_factory=list)
    markets: list[str] = field(default_factory=list)
    verbose: int = 0
    announce_interval: float = 60.0
    sync_interval: float = SYNC_INTERVAL
    #: Bounds on sync (node.sync): one frame read or written, served or pulled, and a whole
    #: session pulled from a peer. A peer that stalls, dribbles or vanishes is dropped then.
    sync_frame_timeout: float = FRAME_TIMEOUT
    sync_session_timeout: float = SYNC_SESSION_TIMEOUT
    #: A witness heartbeats this long after it has something to acknowledge (node.finality).
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    #: GossipSub's own heartbeat (mesh upkeep), unrelated to witness heartbeats.
    gossip_heartbeat_interval: float = 1.0
    #: Ops per gossip message and how long the first waits (bench baselines set 1 and 0).
    gossip_batch: int = MAX_BATCH_OPS
    flush_delay: float = FLUSH_DELAY
    publish_interval: float = PUBLISH_INTERVAL
    gossip_degree: int = 6
    #: Wait for the disk on every commit (power-loss durability) instead of for the OS
    #: (process-crash durability, ~100x faster commits).
    fsync: bool = False


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

    home = Path(config.home).expanduser()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_home(home)  # before anything in it is trusted: others must not be able to write there
    lock_fd = lock_home(home)
    identity, created = load_or_create_identity(home)
    own_id = peer_id_of_seed(identity.seed)
    for addr, peer in bootstrap_ids.items():
        if peer == own_id:
            os.close(lock_fd)
            raise ValueError(f"bootstrap address {addr!r} is this node itself ({home})")
    markets = [Market.parse(spec) for spec in (config.markets or [DEFAULT_MARKET])]
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
    )
    started = time.monotonic()
    loaded = service.load_from_store()
    load_seconds = time.monotonic() - started
    try:
        net_config = NetworkConfig(
            heartbeat_interval=config.gossip_heartbeat_interval,
            degree=config.gossip_degree,
            degree_low=max(1, config.gossip_degree * 2 // 3),
            degree_high=config.gossip_degree * 2,
        )
        async with open_network(identity.seed, config.listen, config=net_config) as net:
            node = _Node(config, service, net)
            await node.run(home, created, loaded, load_seconds)
    finally:
        store.close()
        with contextlib.suppress(OSError):  # e.g. a filesystem that turned read-only
            (home / NODE_INFO_FILE).unlink(missing_ok=True)
        os.close(lock_fd)
    return 0


class _Node:
    """Wires the service to the network and runs the background tasks."""

    def __init__(self, config: NodeConfig, service: NodeService, net: Any) -> None:
        self.config = config
        self.service = service
        self.net = net
        self._syncing: set[tuple[str, bytes]] = set()
        #: Sync sessions being served now (those pulled are ``_syncing``).
        self._serving = 0
        self._not_following: dict[tuple[str, bytes], float] = {}
        self._sync_now = trio.Event()
        self._urgent: set[str] = set()
        #: (peer, market) -> heads that peer named in its last answer and we did not get.
        self._wanted: dict[tuple[str, bytes], list[bytes]] = {}
        #: Bootstrap address -> (failed attempts in a row, why the first one failed).
        self._bootstrap_failures: dict[str, tuple[int, str]] = {}

    async def run(
        self, home: Path, created: bool, loaded: dict[str, int], load_seconds: float
    ) -> None:
        service, net = self.service, self.net
        net.on_reject(self._on_reject)
        net.set_stream_handler(SYNC_PROTOCOL, self._serve_sync_counted)
        async with trio.open_nursery() as nursery:
            for ms in service.markets.values():
                net.set_validator(ms.topic, self._validator(ms))
                messages = await net.subscribe(ms.topic)
                nursery.start_soon(self._drain, messages)
                nursery.start_soon(
                    service.flush_loop, ms, net.publish, lambda t: len(net.gossip_peers(t))
                )
                nursery.start_soon(service.apply_loop, ms)
                if ms.market.witnessed:
                    nursery.start_soon(service.heartbeat_loop, ms)
                    nursery.start_soon(service.finality_loop, ms)
            adapter = ControlAdapter(service, self.status, self.block)
            control = await nursery.start(serve_control, home, adapter)
            nursery.start_soon(self._peer_events)
            nursery.start_soon(self._sync_loop)
            nursery.start_soon(self._discovery_loop)
            nursery.start_soon(self._summary_loop)

            addrs = net.addrs()
            identity_key = service.identity.public_key
            _say(f"crdtbook node {net.peer_id}{' (new identity)' if created else ''}")
            for addr in addrs:
                _say(f"  listening on {addr}")
            for ms in service.markets.values():
                covered = ms.replica.restored_from_checkpoint
                _say(
                    f"  following {ms.market.spec} with {loaded.get(ms.market.name, 0)} ops "
                    f"from the store ({load_seconds:.2f} s"
                    + (f", checkpoint of {covered} ops)" if covered else ")")
                )
                if ms.market.witnessed:
                    keys = ms.replica.witnesses()
                    role = "this node is one" if identity_key in keys else "this node is not one"
                    _say(f"  {ms.market.name}: {len(keys)} witness(es) in force; {role}")
            _say(f"  control socket {control}")
            _write_info(home, net.peer_id, addrs, service)
            _say("ready")

            await _wait_for_signal()
            _say("shutting down")
            service.closing = True
            for ms in service.markets.values():
                with trio.move_on_after(2):
                    await service.flush(ms, net.publish)
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

    def status(self) -> dict[str, Any]:
        return {
            "peer_id": self.net.peer_id,
            "addrs": self.net.addrs(),
            "peers": [
                {"peer_id": p, "addrs": self.net.peer_addrs(p)}
                for p in sorted(self.net.connected_peers())
            ],
            "network": self.net.stats(),
            "sync_sessions": {"serving": self._serving, "pulling": len(self._syncing)},
        }

    def block(self, peer: str | None, seconds: float) -> list[str]:
        peers = [peer] if peer else list(self.net.connected_peers())
        for p in peers:
            self.net.ban(p, seconds)
        logger.warning("blocking %d peers for %.0f s on the owner's request", len(peers), seconds)
        return peers

    # -- gossip ------------------------------------------------------------------------------

    def _validator(self, ms: MarketState) -> Any:
        async def validate(data: bytes, from_peer: str) -> bool:
            return await self.service.validate_gossip(ms, data, from_peer)

        return validate

    async def _drain(self, messages: Any) -> None:
        # Validated messages were ingested by the validator already; keep the channel moving.
        async with messages:
            async for _ in messages:
                pass

    def _on_reject(self, peer_id: str, reason: str) -> None:
        if self.service.should_ban(peer_id):
            logger.warning(
                "banning peer %s for %.0f s: repeated invalid data", peer_id, BAN_SECONDS
            )
            try:
                self.net.ban(peer_id, BAN_SECONDS)
            except Exception:  # a ban is best effort; never let policy crash the node
                logger.exception("could not ban %s", peer_id)

    # -- sync --------------------------------------------------------------------------------

    async def _serve_sync_counted(self, stream: Any) -> None:
        self._serving += 1
        try:
            await self._serve_sync(stream)
        finally:
            self._serving -= 1

    async def _serve_sync(self, stream: Any) -> None:
        from .p2p import P2PError

        def replica_for(market_id: bytes) -> Any:
            ms = self.service.markets.get(market_id)
            return None if ms is None else ms.replica

        try:
            sent, _ = await respond(
                stream, replica_for, frame_timeout=self.config.sync_frame_timeout
            )
            if sent:
                logger.debug("sync: sent %d ops", sent)
        except WireError as exc:
            logger.info("sync: malformed request from %s: %s", stream.peer_id, exc)
            self.net.report_reject(stream.peer_id, "sync-malformed")  # as gossip counts it
            await self._reset_quietly(stream)
        except P2PError as exc:  # the peer went away, reset the stream or stalled
            logger.debug("sync: serving %s failed: %r", stream.peer_id, exc)
            await self._reset_quietly(stream)
        except Exception:  # a bug, not the peer: report it, keep serving others
            logger.exception("sync: serving %s failed", stream.peer_id)
            await self._reset_quietly(stream)

    async def _reset_quietly(self, stream: Any) -> None:
        """After a failed session the framing is undefined: reset (not half-close) the stream,
        so its record leaves the connection now; bounded and shielded, as in _sync_one
        (FrameStream.reset never raises)."""
        bound = self.config.sync_frame_timeout
        with trio.CancelScope(deadline=trio.current_time() + bound, shield=True):
            await stream.reset()

    async def _peer_events(self) -> None:
        events = self.net.peer_events()
        async with events:
            async for event in events:
                if event.kind == "connected":
                    logger.info("peer connected: %s", event.peer_id)
                    self._urgent.add(event.peer_id)
                    self._sync_now.set()
                else:
                    logger.info("peer disconnected: %s", event.peer_id)

    async def _sync_loop(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                with trio.move_on_after(self.config.sync_interval * random.uniform(0.8, 1.2)):
                    await self._sync_now.wait()
                self._sync_now = trio.Event()
                urgent, self._urgent = self._urgent, set()
                now = trio.current_time()
                for peer in self.net.connected_peers():
                    for ms in self.service.markets.values():
                        key = (peer, ms.market.id)
                        if key in self._syncing:
                            continue
                        if self._not_following.get(key, 0) > now and peer not in urgent:
                            continue
                        self._syncing.add(key)
                        nursery.start_soon(self._sync_one, peer, ms)

    async def _sync_one(self, peer: str, ms: MarketState) -> None:
        from .p2p import P2PError

        key = (peer, ms.market.id)
        try:
            if not self.service.store_writable():  # nothing pulled now could be stored
                return
            with trio.move_on_after(self.config.sync_session_timeout) as session:
                stream = await self.net.open_stream(peer, SYNC_PROTOCOL)
                pulled = False
                try:
                    received, unknown_heads = await pull(
                        stream,
                        ms.replica,
                        lambda raws: self.service.prepare(ms, raws),
                        lambda prepared: self._commit_counted(ms, prepared, peer),
                        self._wanted.pop(key, ()),
                        frame_timeout=self.config.sync_frame_timeout,
                    )
                    pulled = True
                finally:
                    # Shielded: once the session's deadline passed, an unshielded close is
                    # cancelled at once and the stream stays open (the peer's writes pile up in
                    # the muxer). After a failure the framing is undefined: reset.
                    bound = self.config.sync_frame_timeout
                    with trio.CancelScope(deadline=trio.current_time() + bound, shield=True):
                        await (stream.close() if pulled else stream.reset())
                ms.last_sync = time.time()
                if received:
                    logger.info("sync: %d ops from %s for %s", received, peer, ms.market.name)
                if unknown_heads:
                    self._wanted[key] = unknown_heads
                # Ask again at once only when this session made progress (a Bloom false
                # positive or a race), not for parents this peer lacks too: orphans whose
                # parents never arrive would otherwise re-sync back to back for ever.
                if (received and ms.replica.missing()) or unknown_heads:
                    self._urgent.add(peer)
                    self._sync_now.set()
            if session.cancelled_caught:
                logger.info(
                    "sync with %s for %s stopped: over %.0f s",
                    peer,
                    ms.market.name,
                    self.config.sync_session_timeout,
                )
        except MarketNotFollowed:
            self._not_following[key] = trio.current_time() + NOT_FOLLOWING_BACKOFF
        except WireError as exc:  # malformed frames
            logger.info("sync with %s failed: %s", peer, exc)
            self.net.report_reject(peer, "sync-malformed")
        except P2PError as exc:  # network errors, a peer going away or banned
            logger.debug("sync with %s failed: %r", peer, exc)
        except Exception:  # a bug or our store failing, not the peer: report it, go on
            logger.exception("sync with %s for %s failed", peer, ms.market.name)
        finally:
            self._syncing.discard(key)

    async def _commit_counted(self, ms: MarketState, prepared: Any, peer: str) -> Any:
        """Commit a sync frame's ops; invalid ones count against the peer that sent them, as
        an invalid op in a gossip message does."""
        result = await self.service.commit(ms, prepared, peer)
        if result.invalid:
            self.net.report_reject(peer, "sync-invalid")
        return result

    # -- discovery ---------------------------------------------------------------------------

    async def _discovery_loop(self) -> None:
        from .p2p import P2PError

        keys = {
            ms.market.id: f"crdtbook-market-{ms.market.id.hex()}"
            for ms in self.service.markets.values()
        }
        delay = 0.5
        last_announce = -1e9
        while True:
            await self._bootstrap()
            now = trio.current_time()
            if now - last_announce >= self.config.announce_interval or delay < DISCOVERY_INTERVAL:
                for key in keys.values():
                    try:
                        await self.net.provide(key)
                        last_announce = now
                    except P2PError as exc:
                        logger.debug("DHT provide failed: %r", exc)
                    except Exception:
                        logger.exception("DHT provide failed")
            connected = set(self.net.connected_peers())
            for key in keys.values():
                try:
                    providers = await self.net.find_providers(key)
                except P2PError as exc:
                    logger.debug("DHT find_providers failed: %r", exc)
                    continue
                except Exception:
                    logger.exception("DHT find_providers failed")
                    continue
                for peer_id, addrs in providers:
                    if peer_id == self.net.peer_id or peer_id in connected:
                        continue
                    for addr in addrs:
                        full = addr if "/p2p/" in addr else f"{addr}/p2p/{peer_id}"
                        try:
                            await self.net.connect(full)
                            connected.add(peer_id)
                            logger.info("discovered and connected to %s", peer_id)
                            break
                        except P2PError as exc:  # includes a malformed address from the DHT
                            logger.debug("could not reach provider %s: %r", full, exc)
                        except Exception:
                            logger.exception("dialing provider %s failed", full)
            await trio.sleep(delay)
            delay = min(DISCOVERY_INTERVAL, delay * 2)

    async def _bootstrap(self) -> None:
        from .p2p import P2PError

        connected = set(self.net.connected_peers())
        for addr in self.config.bootstrap:
            if any(addr.endswith(f"/p2p/{p}") for p in connected):
                self._bootstrap_reached(addr)
                continue
            try:
                await self.net.connect(addr)
            except P2PError as exc:
                # Later attempts often fail on libp2p's cache of failed dials: keep the first
                # reason, the one that says what is wrong.
                failures, first = self._bootstrap_failures.get(addr, (0, str(exc)))
                self._bootstrap_failures[addr] = (failures + 1, first)
                if failures + 1 == BOOTSTRAP_WARN_AFTER:
                    logger.warning(
                        "bootstrap peer %s is still unreachable after %d attempts (%s); "
                        "retrying in the background",
                        addr,
                        failures + 1,
                        first,
                    )
                else:
                    logger.info("bootstrap %s not reachable yet: %s", addr, exc)
            except Exception:
                logger.exception("connecting to bootstrap %s failed", addr)
            else:
                self._bootstrap_reached(addr)

    def _bootstrap_reached(self, addr: str) -> None:
        if self._bootstrap_failures.pop(addr, (0, ""))[0] >= BOOTSTRAP_WARN_AFTER:
            logger.warning("bootstrap peer %s is reachable now", addr)

    async def _summary_loop(self) -> None:
        while True:
            await trio.sleep(SUMMARY_INTERVAL)
            parts = [
                f"{ms.market.name} ops={len(ms.replica)} pending={ms.replica.pending_count} "
                f"fills={ms.replica.fill_count} digest={ms.digest().hex()[:12]}"
                for ms in self.service.markets.values()
            ]
            _say(
                f"[{time.strftime('%H:%M:%S')}] peers={len(self.net.connected_peers())} "
                + " ".join(parts)
            )


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
