"""What the node asks of its network: a typed interface, satisfied structurally by
``node.p2p.Network`` (libp2p) and by the small fakes the in-process tests use.

The node's modules (gossip, sync scheduling, discovery, the wiring in ``node.app``) see the
network only through these Protocols, so they type-check without libp2p and can be driven in
process by any object with these methods. Peer ids and multiaddrs are ``str``, as at the
``node.p2p`` boundary; libp2p objects never appear here.

Errors: every failure the network reports (a peer gone, a dial refused, a timeout) is a
``node.p2p.P2PError``; anything else raised through these methods is a bug.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

__all__ = ["FrameStreamLike", "Network", "PeerEventLike", "StreamServer", "Validator"]


class FrameStreamLike(Protocol):
    """One stream of length-prefixed frames to a peer (``node.p2p.FrameStream``)."""

    peer_id: str

    async def write_frame(self, data: bytes, *, timeout: float | None = None) -> None: ...
    async def read_frame(self, max_size: int, *, timeout: float | None = None) -> bytes: ...
    async def close(self) -> None: ...
    async def reset(self) -> None: ...


class PeerEventLike(Protocol):
    """A peer connected (its first connection) or disconnected (its last one closed)."""

    @property
    def kind(self) -> str: ...  # "connected" or "disconnected"
    @property
    def peer_id(self) -> str: ...


#: Gossip validator: ``await fn(data, forwarder) -> accept``.
Validator = Callable[[bytes, str], Awaitable[bool]]
#: Inbound stream handler for one protocol.
StreamServer = Callable[[FrameStreamLike], Awaitable[None]]
#: Rejection hook: ``(peer_id, reason)``; runs synchronously, must not block.
RejectHook = Callable[[str, str], None]


class Network(Protocol):
    """The node's view of its peer-to-peer network (implemented by ``node.p2p.Network``)."""

    peer_id: str

    # -- identity and peers
    def addrs(self) -> list[str]: ...
    def connected_peers(self) -> list[str]: ...
    def peer_addrs(self, peer_id: str) -> list[str]: ...
    def peer_events(self) -> trio.abc.ReceiveChannel[PeerEventLike]: ...
    async def connect(self, multiaddr: str) -> str: ...
    def stats(self) -> dict[str, int]: ...

    # -- policy: misbehaving peers
    def on_reject(self, hook: RejectHook | None) -> None: ...
    def report_reject(self, peer_id: str, reason: str) -> None: ...
    def ban(self, peer_id: str, seconds: float) -> None: ...

    # -- gossip
    def set_validator(self, topic: str, fn: Validator) -> None: ...
    async def subscribe(self, topic: str) -> trio.abc.ReceiveChannel[object]: ...
    async def join(self, topic: str) -> None: ...
    async def publish(self, topic: str, data: bytes) -> None: ...
    def gossip_peers(self, topic: str) -> list[str]: ...

    # -- streams (sync)
    def set_stream_handler(self, protocol_id: str, handler: StreamServer) -> None: ...
    async def open_stream(self, peer_id: str, protocol_id: str) -> FrameStreamLike: ...

    # -- discovery (DHT rendezvous)
    async def provide(self, key: str) -> bool: ...
    async def find_providers(self, key: str) -> list[tuple[str, list[str]]]: ...
