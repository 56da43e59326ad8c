"""The node's peer-to-peer transport: the only module (with ``p2p_*.py``) that imports libp2p.

Everything the rest of the node needs from the network goes through the small, typed
surface below, so libp2p can be upgraded or replaced without touching other code.
Peer ids and multiaddrs cross this boundary as ``str``; libp2p objects never leak out.

Usage::

    async with open_network(seed, ["/ip4/0.0.0.0/tcp/4001"]) as net:
        net.set_validator(topic, validate)          # async (data, from_peer) -> bool
        ops = await net.subscribe(topic)            # receive channel of GossipMessage
        events = net.peer_events()                  # receive channel of PeerEvent
        net.set_stream_handler(SYNC_PROTO, serve)   # async (FrameStream) -> None
        peer = await net.connect("/ip4/1.2.3.4/tcp/4001/p2p/12D3Koo...")
        await net.provide("crdtbook-market-ab12")   # DHT rendezvous
        ...

Stack: TCP, Noise only (no plaintext, no secio), Yamux only, one connection per peer,
GossipSub v1.1/v1.0 (no v1.2 IDONTWANT, no spam protection, no adaptive gossip),
content-addressed message ids (sha256 of the data), unsigned messages (StrictNoSign: the ops
inside are signed by their authors; see ``node/p2p_pubsub.py``), and a Kademlia DHT in
server mode.

Concurrency: :func:`open_network` owns a trio nursery; every call into the network is
bounded by a timeout from :class:`NetworkConfig` and raises :class:`P2PTimeout` when it
expires.  All failures surface as subclasses of :class:`P2PError`.

Gossip delivery is best effort (libp2p drops silently on full per-peer queues): only a
sync protocol over streams guarantees convergence.  Handlers of gossip must be
idempotent.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Final, Literal

import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID as MESHSUB_V10
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as MESHSUB_V11
from libp2p.pubsub.pb import rpc_pb2
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.address_validation import expand_wildcard_address
from multiaddr import Multiaddr

from . import p2p_install
from .frames import FrameStream
from .p2p_errors import (
    DialError,
    FrameError,
    FrameTooLarge,
    ListenError,
    P2PError,
    P2PTimeout,
    PeerBanned,
    StreamEOF,
    StreamError,
)
from .p2p_pubsub import ContentGossipSub, HardenedPubsub, content_message_id

__all__ = [
    "DialError",
    "FrameError",
    "FrameStream",
    "FrameTooLarge",
    "GossipMessage",
    "ListenError",
    "Network",
    "NetworkConfig",
    "P2PError",
    "P2PTimeout",
    "PeerBanned",
    "PeerEvent",
    "StreamEOF",
    "StreamError",
    "StreamHandler",
    "Validator",
    "check_bootstrap_addr",
    "check_listen_addr",
    "open_network",
    "peer_id_of_seed",
]

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------- data types


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """Tunables; defaults are the production values."""

    heartbeat_interval: float = 1.0
    """GossipSub heartbeat in seconds (tests may use less)."""
    degree: int = 3
    """GossipSub D: mesh peers per topic (D_lo and D_hi below). Every mesh peer forwards each
    message to its own mesh, so a node receives each message about once per mesh peer: D costs
    duplicate deliveries, which py-libp2p makes dear (~0.1-0.3 ms of CPU per copy read).
    Measured (bench/bench_scale.py, 10 nodes at 50 ops/s, A/B in one run): D/D_lo/D_hi 6/4/12
    (meshes of all 9 peers) 2.59 and 2.60 ms of CPU per op per node, 4/3/6 1.75 and 1.54. Then
    (bench_network.py --only latency, issue #12) 3/2/6 against 4/3/6: 20 nodes at 100 ops/s,
    copies read per message 1.6-1.7 against 1.7-2.0, node CPU per op 18.0 and 16.4 ms against
    18.9 and 18.1, p99 860 / 816 against 862 / 965 ms; 5 nodes at 500 ops/s ~2.0 copies against
    2.1-2.7. A larger network takes a hop more (log3 rather than log4 of its size); heartbeat
    gossip (IHAVE) and sync cover a thin mesh's gaps."""
    degree_low: int = 2
    degree_high: int = 6
    """GossipSub D_lo and D_hi: the heartbeat grafts peers into a topic's mesh below D_lo and
    prunes it back to D above D_hi (peers that graft us count too)."""
    dial_timeout: float = 10.0
    """Bound on :meth:`Network.connect`."""
    call_timeout: float = 10.0
    """Bound on stream opening, publish/subscribe and each DHT operation."""
    io_timeout: float = 30.0
    """Default bound on one :class:`FrameStream` frame read or write."""
    validation_timeout: float = 5.0
    """A validator still running after this long rejects (without counting)."""
    max_message_size: int = 1 << 20
    """Largest gossip payload accepted by :meth:`Network.publish`; the inbound RPC
    frame limit is this plus 64 KiB of envelope."""
    subscription_buffer: int = 1024
    """Per-subscriber queue; when full, further gossip is dropped (and logged)."""
    event_buffer: int = 256
    """Per-listener queue of :class:`PeerEvent`; when full, events are dropped."""
    seen_ttl: int = 120
    """Seconds a gossip message id is remembered for duplicate suppression."""
    skip_holders: bool = True
    """Do not forward a gossip message to a peer that sent this node a copy while it was being
    validated (it holds it; node/p2p_pubsub.py's module doc). False is py-libp2p's behaviour,
    kept for A/B runs (bench/bench_network.py, ``CRDTBOOK_BENCH_SKIP_HOLDERS=0``)."""
    flood_publish_max: int = 32
    """In a topic of at most this many peers, this node sends its own gossip messages to every
    identified peer of the topic (gossipsub v1.1's flood publishing), not to its mesh only, and
    writes and honours reached lists (``reached_hints``): each peer reads one copy, and nobody
    forwards (node/p2p_pubsub.py's module doc). Beyond it, and at 0, gossipsub's mesh as before.
    32 bounds the copies one publish costs its origin."""
    reached_hints: bool = True
    """Write on the gossip messages this node publishes or forwards the peers known to have them
    (a reached list, an RPC field other implementations skip), and forward a received message
    to none of the peers its first copy's list names; only in topics of at most
    ``flood_publish_max`` peers. False: neither (bench A/B, ``CRDTBOOK_BENCH_REACHED=0``)."""
    announce: tuple[str, ...] = ()
    """Multiaddrs (without ``/p2p``) to advertise instead of the listen addresses,
    e.g. a public address behind NAT.  Empty: advertise the listen addresses, with
    wildcards (``0.0.0.0``, ``::``) expanded to this machine's interface addresses."""


@dataclass(frozen=True, slots=True)
class GossipMessage:
    """A gossip message that passed validation."""

    topic: str
    data: bytes
    from_peer: str
    """The neighbour that forwarded it to us. Gossip names no origin (messages are unsigned:
    the ops inside are signed by their authors)."""


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """A peer became connected (first connection) or disconnected (last one closed)."""

    kind: Literal["connected", "disconnected"]
    peer_id: str


#: Gossip validator: ``(data, from_peer) -> accept``.  ``from_peer`` is the neighbour
#: that forwarded the message to us (the peer that is accountable, and bannable).  May
#: be sync or async.  Raising counts as a rejection.  It is not called for our own
#: publishes.  A message id (content hash) that was rejected stays rejected for the
#: libp2p validation-cache lifetime (300 s), so reject only what is invalid for good.
Validator = Callable[[bytes, str], Awaitable[bool] | bool]
#: Inbound stream handler; the stream is closed (or reset, if the handler raised) after.
StreamHandler = Callable[["FrameStream"], Awaitable[None]]
#: Rejection hook: ``(peer_id, reason)``; runs synchronously, must not block.
RejectHook = Callable[[str, str], None]

_DHT_KEY_DOMAIN = b"crdtbook/dht-rendezvous/v1:"
_RPC_ENVELOPE_ALLOWANCE = 64 * 1024


def _dht_key(key: str) -> bytes:
    """Map an application key to a DHT key: a sha256 multihash of a namespaced string.

    This sidesteps libp2p's CID/hex/UTF-8 guessing of string keys and the DHT's 80-byte
    key limit, and keeps keys from different applications apart.
    """
    return b"\x12\x20" + hashlib.sha256(_DHT_KEY_DOMAIN + key.encode()).digest()


def _parse_peer_id(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except Exception as exc:
        raise ValueError(f"invalid peer id: {peer_id!r}") from exc


# ------------------------------------------------------------------- addresses

_LISTEN_FORM: Final = "/ip4/ADDRESS/tcp/PORT or /ip6/ADDRESS/tcp/PORT"
_DIAL_FORM: Final = "/ip4/HOST/tcp/PORT/p2p/PEER_ID"
_IP: Final = ("ip4", "ip6")
_DIAL_HOST: Final = ("ip4", "ip6", "dns", "dns4", "dns6")
#: Multihash codes of peer ids: the key itself (ed25519 ids, 12D3KooW...) or its sha2-256.
_IDENTITY, _SHA256 = 0x00, 0x12


def _multiaddr(addr: str, what: str, form: str) -> Multiaddr:
    try:
        return Multiaddr(addr)
    except Exception as exc:  # multiaddr raises ValueError subclasses, and others on odd input
        detail = " ".join(str(exc).split())
        raise ValueError(
            f"{what} {addr!r} is not a multiaddr ({detail}); expected {form}"
        ) from None


def check_listen_addr(addr: str) -> None:
    """Raise ``ValueError`` (one line) unless this node can listen on ``addr``: TCP on an IP
    address, nothing more (this stack has no UDP/QUIC or WebSocket transport)."""
    names = [p.name for p in _multiaddr(addr, "listen address", _LISTEN_FORM).protocols()]
    if len(names) == 2 and names[0] in _IP and names[1] == "tcp":
        return
    if "udp" in names or "quic" in names or "quic-v1" in names:
        reason = "crdtbook listens on TCP only"
    elif names[:1] and names[0] not in _IP:
        reason = "listening needs an IP address of this machine (or 0.0.0.0 / ::)"
    elif "p2p" in names:
        reason = "a listen address has no /p2p part (the peer id is this node's own)"
    else:
        reason = "not a plain TCP address"
    raise ValueError(f"cannot listen on {addr!r}: {reason}; use {_LISTEN_FORM}")


def check_bootstrap_addr(addr: str) -> str:
    """Return the peer id in the bootstrap address ``addr``, or raise ``ValueError`` (one line)
    when no dial to it can ever succeed: not a multiaddr, no transport this node dials (TCP to
    an IP address or a DNS name), port 0, or no valid ``/p2p/<peer id>`` at the end (Noise
    authenticates the peer against that id, and a dial without one is refused)."""
    names = [p.name for p in _multiaddr(addr, "bootstrap address", _DIAL_FORM).protocols()]
    what = f"bootstrap address {addr!r}"
    if not names or names[-1] != "p2p":
        raise ValueError(
            f"{what} does not end in /p2p/<peer id>; `crdtbook id` on that node prints its "
            f"full addresses ({_DIAL_FORM})"
        )
    if len(names) != 3 or names[0] not in _DIAL_HOST or names[1] != "tcp":
        raise ValueError(f"{what} is not a TCP address: crdtbook dials TCP only ({_DIAL_FORM})")
    info = info_from_p2p_addr(Multiaddr(addr))
    if Multiaddr(addr).value_for_protocol("tcp") == "0":
        raise ValueError(f"{what} has port 0, which nothing listens on")
    if not _is_peer_id(info.peer_id):
        raise ValueError(f"{what} ends in a malformed peer id (cut short when copied?)")
    return info.peer_id.to_base58()


def peer_id_of_seed(seed: bytes) -> str:
    """The peer id a node with the ed25519 ``seed`` has (as :func:`open_network` gives it)."""
    if len(seed) != 32:
        raise ValueError("seed must be 32 bytes")
    return ID.from_pubkey(create_new_key_pair(seed).public_key).to_base58()


def _is_peer_id(peer: ID) -> bool:
    """Whether ``peer`` is well formed: an inlined public key (identity multihash: ed25519
    ids, 12D3KooW...) that decodes, or a sha2-256 multihash of one (Qm...)."""
    raw = peer.to_bytes()
    if raw[:1] == bytes([_IDENTITY]):
        return peer.extract_public_key() is not None
    return raw[:2] == bytes([_SHA256, 32]) and len(raw) == 34


def _listen_failure(host: IHost, requested: Sequence[Multiaddr]) -> ListenError | None:
    """The error for the first requested address libp2p did not open, or None. (libp2p's
    swarm only logs a listen failure at DEBUG and carries on, listening on nothing.)"""
    opened = getattr(host.get_network(), "listeners", {})
    for maddr in requested:
        if str(maddr) not in opened:
            return ListenError(f"cannot listen on {maddr}: {_why_not_listening(maddr)}")
    return None


def _why_not_listening(maddr: Multiaddr) -> str:
    """Ask the kernel why ``maddr`` cannot be bound (``address already in use``, ...)."""
    import socket as stdlib_socket

    names = [p.name for p in maddr.protocols()]
    if len(names) != 2 or names[0] not in ("ip4", "ip6") or names[1] != "tcp":
        return "this node listens on /ip4|ip6/ADDRESS/tcp/PORT only"
    ip6 = names[0] == "ip6"
    family = stdlib_socket.AF_INET6 if ip6 else stdlib_socket.AF_INET
    host = str(maddr.value_for_protocol(names[0]))
    try:
        with stdlib_socket.socket(family, stdlib_socket.SOCK_STREAM) as probe:
            probe.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
            probe.bind((host, int(maddr.value_for_protocol("tcp"))))
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    return "libp2p could not open it (run with -vvv to see why)"


# ------------------------------------------------------------------------- network


class _Notifee(INotifee):
    """Forwards swarm connect/disconnect notifications to the Network (never raises)."""

    def __init__(self, net: Network) -> None:
        self._net = net

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._net._on_connection_change(conn.muxed_conn.peer_id, up=True)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._net._on_connection_change(conn.muxed_conn.peer_id, up=False)

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


class Network:
    """A running libp2p node.  Obtain one from :func:`open_network`."""

    def __init__(self, host: IHost, router: ContentGossipSub, config: NetworkConfig) -> None:
        self._host = host
        self._router = router
        self._config = config
        self._id = host.get_id()
        self.peer_id: str = self._id.to_base58()
        """This node's peer id (base58, derived from the seed)."""
        self._pubsub = HardenedPubsub(
            host,
            router,
            on_reject=self._record_reject,
            deliver=self._deliver,
            msg_id_constructor=content_message_id,
            unsigned=True,
            skip_holders=config.skip_holders,
            reached_hints=config.reached_hints,
            seen_ttl=config.seen_ttl,
            # Our wrapper enforces config.validation_timeout itself (and counts it).
            validation_timeout=config.validation_timeout + 1.0,
            max_inbound_rpc_size=config.max_message_size + _RPC_ENVELOPE_ALLOWANCE,
        )
        self._dht = KadDHT(host, DHTMode.SERVER)
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._connected: set[str] = set()
        self._event_sends: list[trio.MemorySendChannel[PeerEvent]] = []
        self._subscribers: dict[str, list[trio.MemorySendChannel[GossipMessage]]] = {}
        self._rejects: Counter[str] = Counter()
        self._reject_hook: RejectHook | None = None
        self._bans: dict[str, float] = {}  # peer id -> time.monotonic() deadline
        self._ban_timers: set[str] = set()
        self._dropped_gossip = 0
        host.get_network().register_notifee(_Notifee(self))

    # ---------------------------------------------------------------- identity

    def addrs(self) -> list[str]:
        """Full multiaddrs this node listens on, each ending in ``/p2p/<peer id>``."""
        return [str(a) for a in self._host.get_addrs()]

    # ------------------------------------------------------------- connections

    async def connect(self, multiaddr: str) -> str:
        """Dial ``multiaddr`` (must end in ``/p2p/<id>``) and add the peer to the DHT
        routing table.  Returns the peer id.  No-op if already connected."""
        try:
            info = info_from_p2p_addr(Multiaddr(multiaddr))
        except Exception as exc:
            raise DialError(f"bad multiaddr {multiaddr!r}: {exc}") from exc
        peer_id = info.peer_id.to_base58()
        if info.peer_id == self._id:
            raise DialError("refusing to dial self")
        if self.is_banned(peer_id):
            raise PeerBanned(peer_id)
        # libp2p refuses for 60 s to dial a peer all of whose addresses failed once: a peer
        # that restarted stayed unreachable that long (a node cut off from it for 40-60 s,
        # finality stalled meanwhile). Our callers pace their own dials (discovery rounds, at
        # most one every few seconds per peer), so each of them is a real attempt.
        unblock = getattr(self._host.get_network(), "unblock_peer", None)  # Swarm's, not INetwork's
        if unblock is not None:
            unblock(info.peer_id)
        try:
            with trio.fail_after(self._config.dial_timeout):
                await self._host.connect(info)
        except trio.TooSlowError as exc:
            raise P2PTimeout(f"connect to {multiaddr} timed out") from exc
        except Exception as exc:
            raise DialError(f"connect to {multiaddr} failed: {exc!r}") from exc
        await self._dht_add_peer(info.peer_id)
        return peer_id

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id`` (never raises)."""
        await self._disconnect(_parse_peer_id(peer_id))

    def connected_peers(self) -> list[str]:
        """Peers with at least one open connection."""
        return [pid.to_base58() for pid in self._host.get_network().connections]

    def peer_addrs(self, peer_id: str) -> list[str]:
        """Addresses the peerstore knows for ``peer_id`` (from identify, the DHT or a dial),
        sorted; ``[]`` when it knows none or the id is malformed."""
        try:
            addrs = self._host.get_peerstore().addrs(_parse_peer_id(peer_id))
        except Exception:  # unknown peer (PeerStoreError) or a bad id: no addresses to show
            return []
        return sorted({str(addr) for addr in addrs})

    def peer_events(self, *, include_current: bool = True) -> trio.MemoryReceiveChannel[PeerEvent]:
        """A new channel of :class:`PeerEvent` for one consumer (close it when done;
        it ends when the network shuts down).  With ``include_current``, it starts with
        a ``connected`` event for every peer connected right now."""
        send, receive = trio.open_memory_channel[PeerEvent](self._config.event_buffer)
        if self._closing:
            send.close()
            return receive
        if include_current:
            for peer_id in sorted(self._connected):
                with suppress(trio.WouldBlock):
                    send.send_nowait(PeerEvent("connected", peer_id))
        self._event_sends.append(send)
        return receive

    # ------------------------------------------------------------------ gossip

    async def subscribe(self, topic: str) -> trio.MemoryReceiveChannel[GossipMessage]:
        """Join ``topic``; returns a new channel of validated messages from other peers
        (our own publishes are not echoed).  Several subscribers per topic are fine."""
        send, receive = trio.open_memory_channel[GossipMessage](self._config.subscription_buffer)
        await self.join(topic)
        self._subscribers.setdefault(topic, []).append(send)
        return receive

    async def join(self, topic: str) -> None:
        """Join ``topic``'s mesh without a channel: its messages reach only the topic's
        validator (``set_validator``), which is all a node that ingests there needs. A message
        no subscriber takes is not copied anywhere."""
        if self._closing:
            raise P2PError("network is shutting down")
        if topic not in self._pubsub.topic_ids:
            try:
                with trio.fail_after(self._config.call_timeout):
                    await self._pubsub.subscribe(topic)
            except trio.TooSlowError as exc:
                raise P2PTimeout(f"subscribe {topic} timed out") from exc
            except Exception as exc:
                raise P2PError(f"subscribe {topic} failed: {exc!r}") from exc

    async def unsubscribe(self, topic: str) -> None:
        """Leave ``topic``; its subscriber channels end."""
        for send in self._subscribers.pop(topic, []):
            send.close()
        try:
            with trio.fail_after(self._config.call_timeout):
                await self._pubsub.unsubscribe(topic)
        except trio.TooSlowError as exc:
            raise P2PTimeout(f"unsubscribe {topic} timed out") from exc
        except Exception as exc:
            raise P2PError(f"unsubscribe {topic} failed: {exc!r}") from exc

    async def publish(self, topic: str, data: bytes) -> None:
        """Sign and gossip ``data`` on ``topic`` (best effort; need not be subscribed)."""
        if self._closing:
            raise P2PError("network is shut down")
        if len(data) > self._config.max_message_size:
            raise P2PError(
                f"gossip payload of {len(data)} bytes exceeds {self._config.max_message_size}"
            )
        try:
            with trio.fail_after(self._config.call_timeout):
                await self._pubsub.publish(topic, data)
        except trio.TooSlowError as exc:
            raise P2PTimeout(f"publish on {topic} timed out") from exc
        except Exception as exc:
            raise P2PError(f"publish on {topic} failed: {exc!r}") from exc

    def gossip_peers(self, topic: str) -> list[str]:
        """Peers known to be subscribed to ``topic``."""
        return [p.to_base58() for p in self._pubsub.peer_topics.get(topic, ())]

    def set_validator(self, topic: str, fn: Validator) -> None:
        """Install (or replace) the validator of ``topic``; see :data:`Validator`."""
        validation_timeout = self._config.validation_timeout

        async def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            if forwarder == self._id:
                return True
            reason = "invalid"
            try:
                with trio.fail_after(validation_timeout):
                    result = fn(msg.data, forwarder.to_base58())
                    if inspect.isawaitable(result):
                        result = await result
                ok = result is True
            except trio.TooSlowError:
                ok, reason = False, "validator-timeout"
            except Exception:
                logger.exception("validator for %s raised; rejecting", topic)
                ok, reason = False, "validator-error"
            if not ok:
                self._record_reject(forwarder, reason)
            return ok

        self._pubsub.set_topic_validator(topic, validate, is_async_validator=True)

    def remove_validator(self, topic: str) -> None:
        """Accept everything on ``topic`` again."""
        self._pubsub.remove_topic_validator(topic)

    # ------------------------------------------------------ rejections and bans

    def on_reject(self, hook: RejectHook | None) -> None:
        """Call ``hook(peer_id, reason)`` on every rejection (policy lives in the node).

        Reasons: ``invalid`` (validator said no), ``validator-error``,
        ``validator-timeout``, ``signed`` (a gossip message carrying the envelope fields
        unsigned gossip refuses), ``malformed`` (undecodable pubsub
        frame), ``error`` (anything else that failed while handling its message)."""
        self._reject_hook = hook

    def rejections(self, peer_id: str) -> int:
        """How many messages from ``peer_id`` were rejected so far."""
        return self._rejects[peer_id]

    def reject_counts(self) -> dict[str, int]:
        """Rejections per peer id."""
        return dict(self._rejects)

    def ban(self, peer_id: str, seconds: float) -> None:
        """Disconnect ``peer_id`` now and for ``seconds``: its connections are closed on
        arrival, its gossip and streams ignored, and dialing it raises
        :class:`PeerBanned`.  Banning again extends or shortens the ban."""
        pid = _parse_peer_id(peer_id)
        if not _is_peer_id(pid):  # base58 alone takes any word ("nonsense" decodes)
            raise ValueError(f"invalid peer id: {peer_id!r:.60}")
        if pid == self._id:
            raise ValueError("cannot ban self")
        self._bans[peer_id] = time.monotonic() + max(0.0, seconds)
        logger.info("banning %s for %.0f s", peer_id, seconds)
        with suppress(Exception):
            self._pubsub.add_to_blacklist(pid)
        with suppress(Exception):
            self._dht.routing_table.remove_peer(pid)
        with suppress(Exception):
            # Keep libp2p's auto-connector from redialing it.
            self._host.get_peerstore().clear_addrs(pid)
        self._spawn(self._disconnect, pid)
        if peer_id not in self._ban_timers:
            self._ban_timers.add(peer_id)
            self._spawn(self._expire_ban, peer_id)

    def unban(self, peer_id: str) -> None:
        """Lift a ban early."""
        self._bans.pop(peer_id, None)
        with suppress(Exception):
            self._pubsub.remove_from_blacklist(_parse_peer_id(peer_id))

    def is_banned(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is banned right now."""
        deadline = self._bans.get(peer_id)
        return deadline is not None and time.monotonic() < deadline

    # ------------------------------------------------------------------ streams

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        """Serve ``protocol_id``: ``handler`` gets each inbound stream as a
        :class:`FrameStream`.  Exceptions are logged, never propagated; the stream is
        closed afterwards (reset if the handler raised).  Banned peers are refused."""
        io_timeout = self._config.io_timeout

        async def serve(stream: INetStream) -> None:
            # Runs in libp2p's connection nursery: an escaping exception would take
            # down the swarm, so nothing may escape.
            try:
                peer_id = stream.muxed_conn.peer_id.to_base58()
            except Exception:
                peer_id = "?"
            frames = FrameStream(stream, peer_id, protocol_id, io_timeout)
            if self.is_banned(peer_id) or self._closing:
                await frames.reset()
                return
            try:
                await handler(frames)
            except P2PError as exc:  # the peer or the network misbehaved: not our bug
                logger.info("%s stream from %s failed: %s", protocol_id, peer_id, exc)
                await frames.reset()
            except Exception:
                logger.exception("handler for %s from %s failed", protocol_id, peer_id)
                await frames.reset()
            else:
                await frames.close()

        self._host.set_stream_handler(TProtocol(protocol_id), serve)

    async def open_stream(self, peer_id: str, protocol_id: str) -> FrameStream:
        """Open a stream to a connected (or dialable) peer speaking ``protocol_id``."""
        pid = _parse_peer_id(peer_id)
        if self.is_banned(peer_id):
            raise PeerBanned(peer_id)
        try:
            with trio.fail_after(self._config.call_timeout):
                stream = await self._host.new_stream(pid, [TProtocol(protocol_id)])
        except trio.TooSlowError as exc:
            raise P2PTimeout(f"open_stream {protocol_id} to {peer_id} timed out") from exc
        except Exception as exc:
            raise StreamError(f"open_stream {protocol_id} to {peer_id} failed: {exc!r}") from exc
        return FrameStream(stream, peer_id, protocol_id, self._config.io_timeout)

    # --------------------------------------------------------------------- DHT

    async def provide(self, key: str) -> bool:
        """Announce in the DHT that this node provides ``key`` (any string, e.g.
        ``"crdtbook-market-<hex>"``).  True if at least one peer stored the record.
        libp2p republishes it periodically while the node runs."""
        try:
            with trio.fail_after(self._config.call_timeout):
                return bool(await self._dht.provider_store.provide(_dht_key(key)))
        except trio.TooSlowError as exc:
            raise P2PTimeout(f"provide {key!r} timed out") from exc
        except Exception as exc:
            raise P2PError(f"provide {key!r} failed: {exc!r}") from exc

    async def find_providers(self, key: str, *, count: int = 20) -> list[tuple[str, list[str]]]:
        """Other peers providing ``key``: ``[(peer_id, [multiaddr, ...]), ...]``,
        deduplicated, without this node.  Always asks the network (libp2p would answer
        from its local cache only, hiding providers that appeared later)."""
        kb = _dht_key(key)
        store = self._dht.provider_store
        cached = store.providers.pop(kb, {})
        found: list[PeerInfo] = []
        try:
            with trio.fail_after(self._config.call_timeout):
                found = await store.find_providers(kb, count + 1)
        except trio.TooSlowError as exc:
            raise P2PTimeout(f"find_providers {key!r} timed out") from exc
        except Exception as exc:
            raise P2PError(f"find_providers {key!r} failed: {exc!r}") from exc
        finally:
            fresh = store.providers.get(kb, {})
            merged = {**cached, **fresh}
            if merged:
                store.providers[kb] = merged
        merged_addrs: dict[str, list[str]] = {}
        local = [rec.provider_info for rec in cached.values() if not rec.is_expired()]
        for info in [*found, *local]:
            if info.peer_id == self._id:
                continue
            addrs = merged_addrs.setdefault(info.peer_id.to_base58(), [])
            for addr in info.addrs:
                text = str(addr)
                if text not in addrs:
                    addrs.append(text)
        return list(merged_addrs.items())[:count]

    def stats(self) -> dict[str, int]:
        """Counters for logs and status: ``peers``, ``routing_table``, ``banned``,
        ``rejected`` (total), ``gossip_dropped`` (slow subscribers), ``gossip_send_dropped``
        (outbound RPCs libp2p dropped on full peer queues, process-wide), ``gossip_holders_skipped``
        (copies not forwarded to a peer that had sent one while it was in validation),
        ``gossip_reached_skipped`` (copies not forwarded to a peer a reached list named),
        ``gossip_copies_in`` and ``gossip_firsts_in`` (gossip messages read from peers: every
        copy, and those not seen or in validation before)."""
        now = time.monotonic()
        return {
            "peers": len(self._host.get_network().connections),
            "routing_table": int(self._dht.get_routing_table_size()),
            "banned": sum(1 for deadline in self._bans.values() if deadline > now),
            "rejected": sum(self._rejects.values()),
            "gossip_dropped": self._dropped_gossip,
            "gossip_send_dropped": p2p_install.send_drops(),
            "mesh_peers": sum(len(peers) for peers in self._router.mesh.values()),
            "fanout_peers": sum(len(peers) for peers in self._router.fanout.values()),
            "gossip_holders_skipped": self._pubsub.holders_skipped,
            "gossip_reached_skipped": self._pubsub.reached_skipped,
            "gossip_copies_in": self._pubsub.copies_in,
            "gossip_firsts_in": self._pubsub.firsts_in,
        }

    # ---------------------------------------------------------------- internals

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start a background task unless shutting down (never raises)."""
        if self._closing or self._nursery is None:
            return
        try:
            self._nursery.start_soon(fn, *args)
        except RuntimeError:  # nursery closed under us during shutdown
            logger.debug("not spawning %s: shutting down", fn)

    def report_reject(self, peer_id: str, reason: str) -> None:
        """Count a refusal of what ``peer_id`` sent outside gossip (a malformed sync frame,
        invalid ops in a sync answer): the same counter and ban policy as gossip's."""
        self._rejects[peer_id] += 1
        logger.debug("rejected input from %s: %s", peer_id, reason)
        hook = self._reject_hook
        if hook is not None:
            try:
                hook(peer_id, reason)
            except Exception:
                logger.exception("reject hook failed")

    def _record_reject(self, peer: ID, reason: str) -> None:
        self.report_reject(peer.to_base58(), reason)

    def _deliver(self, msg: rpc_pb2.Message, forwarder: ID) -> None:
        from_peer = forwarder.to_base58()
        for topic in msg.topicIDs:
            sends = self._subscribers.get(topic)
            if not sends:
                continue
            item = GossipMessage(topic, bytes(msg.data), from_peer)
            for send in list(sends):
                try:
                    send.send_nowait(item)
                except trio.WouldBlock:
                    self._dropped_gossip += 1
                    logger.warning("subscriber of %s too slow: gossip dropped", topic)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    sends.remove(send)

    def _emit(self, event: PeerEvent) -> None:
        for send in list(self._event_sends):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                logger.warning("peer event listener too slow: %s dropped", event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._event_sends.remove(send)

    def _on_connection_change(self, pid: ID, *, up: bool) -> None:
        try:
            peer_id = pid.to_base58()
            if up:
                if self.is_banned(peer_id):
                    self._spawn(self._disconnect, pid)
                    return
                if peer_id not in self._connected:
                    self._connected.add(peer_id)
                    self._emit(PeerEvent("connected", peer_id))
                    self._spawn(self._dht_add_peer, pid)
            elif not self._host.get_network().get_connections(pid) and (peer_id in self._connected):
                self._connected.discard(peer_id)
                self._emit(PeerEvent("disconnected", peer_id))
        except Exception:
            logger.exception("connection notification failed")

    async def _dht_add_peer(self, pid: ID) -> None:
        try:
            with trio.move_on_after(self._config.call_timeout):
                await self._dht.add_peer(pid)
        except Exception:
            logger.debug("adding %s to the routing table failed", pid, exc_info=True)

    async def _disconnect(self, pid: ID) -> None:
        try:
            with trio.move_on_after(self._config.call_timeout):
                await self._host.disconnect(pid)
        except Exception:
            logger.debug("disconnect from %s failed", pid, exc_info=True)

    async def _expire_ban(self, peer_id: str) -> None:
        try:
            while (deadline := self._bans.get(peer_id)) is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.unban(peer_id)
                    return
                await trio.sleep(remaining)  # the ban may be extended meanwhile
        finally:
            self._ban_timers.discard(peer_id)

    async def _housekeeping(self) -> None:
        """Trim libp2p state that grows without bound (pitfall: with adaptive gossip
        off, ``recent_message_deliveries`` gains an entry per message forever)."""
        while True:
            await trio.sleep(30)
            cutoff = time.time() - 60.0
            deliveries = getattr(self._router, "recent_message_deliveries", None)
            if isinstance(deliveries, dict):
                for times in deliveries.values():
                    times[:] = [t for t in times if t > cutoff]
            now = time.monotonic()
            for peer_id, deadline in list(self._bans.items()):
                if deadline <= now:
                    self.unban(peer_id)

    def _begin_shutdown(self) -> None:
        self._closing = True
        for event_send in self._event_sends:
            event_send.close()
        self._event_sends.clear()
        for sends in self._subscribers.values():
            for gossip_send in sends:
                gossip_send.close()


@asynccontextmanager
async def open_network(
    seed: bytes,
    listen: Sequence[str],
    *,
    config: NetworkConfig | None = None,
) -> AsyncIterator[Network]:
    """Start a node whose identity is the ed25519 ``seed`` (32 bytes; same seed, same
    peer id) listening on the TCP multiaddrs ``listen`` (port 0 picks a free port;
    :meth:`Network.addrs` reports the real ones).  Shuts everything down on exit.

    Raises ``ValueError`` for an address that is not ``/ip4|ip6/ADDRESS/tcp/PORT`` and
    :class:`ListenError` (before yielding) when one cannot be opened, e.g. its port is in
    use: listen sockets are exclusive (no SO_REUSEPORT), so two nodes never share a port."""
    if len(seed) != 32:
        raise ValueError("seed must be 32 bytes")
    for addr in listen:
        check_listen_addr(addr)
    p2p_install.install()  # the process-wide changes to libp2p, logging and the environment
    cfg = config or NetworkConfig()
    key_pair = create_new_key_pair(seed)
    listen_addrs = [Multiaddr(a) for a in listen]
    host = new_host(
        key_pair=key_pair,
        sec_opt={
            NOISE_PROTOCOL_ID: NoiseTransport(
                key_pair, noise_privkey=create_x25519_key_pair().private_key
            )
        },
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        listen_addrs=listen_addrs,
        announce_addrs=[Multiaddr(a) for a in cfg.announce] or None,
        addrs_factory=None if cfg.announce else _expand_wildcards,
    )
    router = ContentGossipSub(
        msg_id=content_message_id,
        flood_publish_max=cfg.flood_publish_max,
        protocols=[MESHSUB_V11, MESHSUB_V10],
        degree=cfg.degree,
        degree_low=cfg.degree_low,
        degree_high=cfg.degree_high,
        heartbeat_interval=cfg.heartbeat_interval,  # int-typed in libp2p; a float works
        spam_protection_enabled=False,
        adaptive_gossip_enabled=False,
    )
    net = Network(host, router, cfg)
    # Start bottom-up (host, pubsub, router, DHT, our tasks); exit unwinds top-down.
    failure: ListenError | None = None
    try:
        async with _suppress_shutdown_races(), AsyncExitStack() as stack:
            await stack.enter_async_context(host.run(listen_addrs))
            stack.push_async_callback(_close_connections, host)
            # Raised after the host has stopped: raised in here, libp2p's nurseries would
            # wrap it in exception groups.
            failure = _listen_failure(host, listen_addrs)
            if failure is None:
                await stack.enter_async_context(background_trio_service(net._pubsub))
                await stack.enter_async_context(background_trio_service(router))
                with trio.fail_after(cfg.call_timeout):
                    await net._pubsub.wait_until_ready()
                await stack.enter_async_context(background_trio_service(net._dht))
                nursery = await stack.enter_async_context(trio.open_nursery())
                net._nursery = nursery
                nursery.start_soon(net._housekeeping)
                try:
                    yield net
                finally:
                    net._begin_shutdown()
                    nursery.cancel_scope.cancel()
    finally:
        net._begin_shutdown()
        with suppress(Exception):
            net._pubsub.seen_messages.stop()  # joins libp2p's sweeper thread
    if failure is not None:
        raise failure


async def _close_connections(host: IHost) -> None:
    """Close every connection before the host stops: stopping it only cancels the tasks that
    use them, and their sockets stay open until garbage collection."""
    # (CancelScope rather than move_on_after(shield=...): libp2p's trio-typing stubs predate it.)
    with trio.CancelScope(deadline=trio.current_time() + 5, shield=True):
        await host.get_network().close()


def _expand_wildcards(addrs: list[Multiaddr]) -> list[Multiaddr]:
    """Advertise concrete interface addresses instead of ``0.0.0.0`` / ``::`` (which
    would otherwise go verbatim into DHT provider records)."""
    out: list[Multiaddr] = []
    seen: set[str] = set()
    for addr in addrs:
        text = str(addr)
        wildcard = text.startswith(("/ip4/0.0.0.0/", "/ip6/::/"))
        for candidate in expand_wildcard_address(addr) if wildcard else [addr]:
            if str(candidate) not in seen:
                seen.add(str(candidate))
                out.append(candidate)
    return out


def _is_shutdown_race(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_shutdown_race(e) for e in exc.exceptions)
    return isinstance(exc, RuntimeError) and "closed to new arrivals" in str(exc)


@asynccontextmanager
async def _suppress_shutdown_races() -> AsyncIterator[None]:
    """Swallow libp2p's ``Nursery is closed to new arrivals`` during teardown (a task
    spawned by libp2p after its nursery closed); anything else propagates."""
    try:
        yield
    except BaseException as exc:
        if _is_shutdown_race(exc):
            logger.debug("ignored libp2p shutdown race: %r", exc)
            return
        raise
