"""Hardened libp2p ``Pubsub``: hostile gossip input never escapes as an exception.

Private helper of :mod:`crdtbook.node.p2p` (the only other module allowed to import
libp2p).  In py-libp2p 0.8.1 every inbound gossip message runs as a task of the Pubsub
service (``manager.run_task(self.push_msg, ...)``); any exception in such a task cancels
the whole service and with it the enclosing nursery, i.e. the node.  Known ways a remote
peer can trigger that:

* a message whose ``from_id`` is a hashed (non-identity) peer id plus a garbage ``key``:
  ``signature_validator`` calls ``deserialize_public_key(msg.key)`` and re-raises;
* a topic validator that raises (upstream issue #1118);
* an undecodable protobuf frame on the pubsub stream: ``ParseFromString`` raises
  ``DecodeError``, which ``Pubsub.stream_handler`` does not catch, so it escapes into the
  swarm connection's nursery.

One more kills it with no hostile input at all: blacklisting a peer (our ban) runs
``_teardown_if_connected`` as a service task, which awaits ``stream.reset()`` between reading
``self.peers[peer_id]`` and ``del self.peers[peer_id]``.  When the peer's connection closes in
that window (our own ban disconnects it, or the peer hangs up first), ``_handle_dead_peer``
deletes the entry, and the ``del`` raises ``KeyError``: the service and the node die.

:class:`HardenedPubsub` overrides the three entry points that see remote input
(``push_msg``, ``stream_handler``, ``notify_subscriptions``) so each failure is counted as
a rejection of the peer that sent it and otherwise swallowed.  It also removes duplicate
deliveries caused by concurrent async validation of the same message (several forwarders
deliver it while the first validation is still running) by tracking in-flight message ids.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

from libp2p.abc import INetStream
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.validators import signature_validator

logger = logging.getLogger(__name__)

#: Called with (forwarding peer, reason) whenever input from a peer is rejected.
RejectHook = Callable[[ID, str], None]
#: Called with every message that passed validation and is for a subscribed topic.
DeliverHook = Callable[[rpc_pb2.Message], None]


def content_message_id(msg: rpc_pb2.Message) -> bytes:
    """Gossip message id: sha256 of the payload only (same data => same id)."""
    return hashlib.sha256(msg.data).digest()


def signature_ok(msg: rpc_pb2.Message) -> bool:
    """libp2p's ``signature_validator`` with every exception mapped to "invalid"."""
    try:
        return bool(signature_validator(msg))
    except Exception:
        return False


class HardenedPubsub(Pubsub):
    """``Pubsub`` whose remote-input paths cannot raise into the service."""

    def __init__(
        self,
        *args: Any,
        on_reject: RejectHook,
        deliver: DeliverHook,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._on_reject = on_reject
        self._deliver = deliver
        self._inflight: set[bytes] = set()

    def _reject(self, peer_id: ID, reason: str) -> None:
        try:
            self._on_reject(peer_id, reason)
        except Exception:  # a buggy hook must not take pubsub down either
            logger.exception("reject hook failed")

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        if msg_forwarder == self.my_id:
            # Our own publish: runs in the caller's task, errors go to the caller.
            await super().push_msg(msg_forwarder, msg)
            return
        try:
            if self.is_peer_blacklisted(msg_forwarder):
                return
            msg_id = self._msg_id_constructor(msg)
            if msg_id in self._inflight or self.seen_messages.has(msg_id):
                return  # duplicate: being validated right now, or already seen
            if self.strict_signing and not signature_ok(msg):
                # Pitfall: the library's check raises on a garbage key; ours cannot.
                self._reject(msg_forwarder, "bad-signature")
                return
            self._inflight.add(msg_id)
            try:
                await super().push_msg(msg_forwarder, msg)
            finally:
                self._inflight.discard(msg_id)
        except Exception as exc:
            if not self.manager.is_running or _is_closed_nursery(exc):
                logger.debug("message from %s dropped by shutdown: %r", msg_forwarder, exc)
                return
            logger.warning("dropped message from %s: %r", msg_forwarder, exc)
            self._reject(msg_forwarder, "error")

    async def stream_handler(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        if self.is_peer_blacklisted(peer_id):
            await _quiet_reset(stream)
            return
        try:
            await super().stream_handler(stream)
        except Exception as exc:
            await _quiet_reset(stream)
            if not self.manager.is_running or _is_closed_nursery(exc):
                # Shutdown race: the stock read loop spawns into Pubsub's nursery after
                # it closed.  Uncaught, this escapes through the swarm into host.run.
                logger.debug("pubsub stream from %s ended by shutdown: %r", peer_id, exc)
                return
            logger.warning("malformed pubsub stream from %s: %r", peer_id, exc)
            self._reject(peer_id, "malformed")
            try:
                self._handle_dead_peer(peer_id)
            except Exception:
                logger.debug("cleanup after malformed stream failed", exc_info=True)

    async def _teardown_if_connected(self, peer_id: ID) -> None:
        """Drop a blacklisted peer whatever else removes it meanwhile (see the module doc).

        The peer is taken out of every table, as ``_handle_dead_peer`` takes out a dead one,
        before the first await, and every step accepts that it is gone already, so no
        interleaving with a disconnect, whoever started it, can raise."""
        try:
            stream = self.peers.pop(peer_id, None)
            if stream is not None:
                queue = self.peer_queues.pop(peer_id, None)
                if queue is not None:
                    queue.close()  # ends the peer's sending task
                self.router.remove_peer(peer_id)
            self._forget_all_subscriptions(peer_id)
        except Exception:  # a bug of ours or of libp2p: report it, keep the node up
            logger.exception("dropping blacklisted peer %s failed", peer_id)
            return
        if stream is not None:
            await _quiet_reset(stream)

    def notify_subscriptions(self, publish_message: rpc_pb2.Message) -> None:
        try:
            self._deliver(publish_message)
        except Exception:
            logger.exception("gossip delivery hook failed")


def _is_closed_nursery(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "closed to new arrivals" in str(exc)


async def _quiet_reset(stream: INetStream) -> None:
    try:
        await stream.reset()
    except Exception:
        logger.debug("stream reset failed", exc_info=True)
