"""Signed peer records in gossip RPCs, at a fraction of their cost.

Private helper of :mod:`crdtbook.node.p2p` (the only other module allowed to import libp2p).

py-libp2p 0.8.1 attaches this host's signed peer record (an envelope naming its addresses) to
every gossip RPC it sends, and checks the one on every RPC it receives, twice (``Pubsub`` and
``GossipSub`` each call ``maybe_consume_signed_record``):

* sending: ``env_to_send_in_RPC`` rebuilds the host's multiaddrs (slow, pure-Python multiaddr
  code) to see whether the cached record is still current;
* receiving: each check parses the envelope, verifies its ed25519 signature (~60 us) and
  rewrites the peerstore entry, although a peer sends the same envelope bytes every time.

Profiled on a 5-node network at 500 ops/s (py-spy, GIL samples), the two were 8.5% of a
node's CPU; A/B at 300 ops/s (two runs each, on a busy host) gave 5.3 -> 5.1 ms of node CPU
per op. Here, both are wrapped where the pubsub modules look them up:

* the record to send is reused for ``SEND_TTL`` seconds per host (listen addresses do not
  change while a node runs; the library's own check runs again after that);
* a record received is checked by the library the first time; the same bytes from the same
  peer within ``RECEIVE_TTL`` seconds are accepted without checking again (they would pass
  again: the verdict depends on nothing else). A record that fails is never cached, so a
  bad one is refused every time, as before.
"""

from __future__ import annotations

import time
import weakref
from typing import Final

import libp2p.pubsub.floodsub
import libp2p.pubsub.gossipsub
import libp2p.pubsub.pubsub
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.pubsub.pb.rpc_pb2 import RPC
from libp2p.pubsub.utils import maybe_consume_signed_record

__all__ = ["install"]

#: Seconds a host's own record is reused before the library checks its addresses again.
SEND_TTL: Final = 30.0
#: Seconds an envelope already accepted from a peer is accepted again without a check. Well
#: under the peerstore's 2-hour TTL for certified addresses, which each full check renews.
RECEIVE_TTL: Final = 60.0
#: Bound on remembered (peer, envelope) pairs per host; past it the memory starts afresh.
MAX_REMEMBERED: Final = 4096

_library_env_to_send = env_to_send_in_RPC
_library_consume = maybe_consume_signed_record

_sent: weakref.WeakKeyDictionary[IHost, tuple[float, tuple[bytes, bool]]] = (
    weakref.WeakKeyDictionary()
)
_accepted: weakref.WeakKeyDictionary[IHost, dict[tuple[ID, bytes], float]] = (
    weakref.WeakKeyDictionary()
)


def cached_env_to_send_in_rpc(host: IHost) -> tuple[bytes, bool]:
    """``env_to_send_in_RPC``, reusing the host's envelope for ``SEND_TTL`` seconds."""
    now = time.monotonic()
    entry = _sent.get(host)
    if entry is not None and entry[0] > now:
        return entry[1]
    result = _library_env_to_send(host)
    _sent[host] = (now + SEND_TTL, result)
    return result


def cached_consume_signed_record(msg: RPC, host: IHost, peer_id: ID) -> bool:
    """``maybe_consume_signed_record``, skipping envelopes this host accepted from this peer
    less than ``RECEIVE_TTL`` seconds ago."""
    if not msg.HasField("senderRecord"):
        return True
    now = time.monotonic()
    accepted = _accepted.get(host)
    if accepted is None:
        accepted = _accepted[host] = {}
    key = (peer_id, msg.senderRecord)
    expires = accepted.get(key)
    if expires is not None and expires > now:
        return True
    ok = _library_consume(msg, host, peer_id)
    if ok:
        if len(accepted) >= MAX_REMEMBERED:
            accepted.clear()
        accepted[key] = now + RECEIVE_TTL
    return ok


def install() -> None:
    """Point the pubsub modules at the cached versions (idempotent)."""
    for module in (libp2p.pubsub.pubsub, libp2p.pubsub.gossipsub, libp2p.pubsub.floodsub):
        module.env_to_send_in_RPC = cached_env_to_send_in_rpc  # type: ignore[attr-defined]
        module.maybe_consume_signed_record = cached_consume_signed_record  # type: ignore[attr-defined]
