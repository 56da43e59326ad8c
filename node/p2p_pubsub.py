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

**Duplicates dropped as they are read.** Each node receives a message from each of its mesh
peers; all but the first copy are duplicates. The stock read loop starts a service task
(``manager.run_task(push_msg, ...)``: a ``FunctionTask`` in the service's task tree) for every
message before anything looks at it, duplicates included, and builds a metrics event (a base58
encoding of the peer id) for every RPC. :meth:`HardenedPubsub.continuously_read_stream` drops a
copy whose id is seen or in validation right in the loop, and builds the event only when a
metrics channel listens. It also reads the stream in chunks (:data:`READ_CHUNK`) instead of
a byte at a time for each length prefix; otherwise it is the library's loop. A message counts as
in validation from the moment its first copy is read (:data:`INFLIGHT_FROM_READ`), not from when
its task first runs, and :meth:`HardenedPubsub.validate_msg` awaits the topic's validator in
that task rather than in a nursery and a task of its own (:data:`DIRECT_VALIDATION`). That task
is the read loop itself (:data:`INLINE_VALIDATION`): the library's service task per message
searches the service's whole task tree for its parent each time it starts one. A peer's next
RPC is read once its last message is judged (one peer's messages were judged one at a time
anyway; the node's validator does not wait on the network), and verdicts are cached in
O(1) (:class:`LruValidationCache`).

**Unsigned gossip (gossipsub's StrictNoSign policy).** Stock py-libp2p signs every message it
publishes (an ed25519 envelope signature over the message) and checks it on every first receipt,
here twice (``push_msg`` below and the library's own ``push_msg``): ~60 us per check per node
per message, plus ~150 bytes of ``from``/``seqno``/``signature``/``key`` on every copy. The
payloads are crdtbook ops, each signed by its author and verified by the validator, and message
ids are content hashes, so the envelope authenticates nothing the node uses: bans and rejection
counts go to the forwarding neighbour (the one accountable), never to the claimed origin. With
``unsigned=True`` a message carries its data and topics only, and a message that carries any
of the four envelope fields is refused (reason ``signed``), as go-libp2p's StrictNoSign does.
Peers on the signed protocol and peers on this one refuse each other's gossip (and sync still
converges them); every node of this repository speaks the unsigned one.

:class:`ContentGossipSub` fixes two things the router assumes about message ids:

* the message cache keys entries by ``from + seqno`` (``mcache.default_msg_id_fn``) whatever
  id function pubsub was given, and its ids are what IHAVE advertises and IWANT asks for; the
  receiving node checks them against its seen-cache, which holds *content* ids, finds none,
  and asks for every advertised message again: each node fetched, over IWANT, a full copy of
  every message of the gossip window from every peer that gossips to it (the peers outside its
  mesh: none in a small network, several in one larger than the mesh bound). Here the cache
  uses the content id, so IHAVE names ids the receiver can recognise;
* the equivocation check keys messages by ``from + seqno`` too; with unsigned messages both
  are empty and every message after the first would look like an equivocation (and, signed or
  not, a content id cannot equivocate: a different content is a different id).

**No peer scoring without score parameters** (:class:`ContentGossipSub`). With the default
``ScoreParams`` (every weight 0, every threshold -inf) each score is 0 and every gate it guards
(publish, gossip, graylist, PX) passes, yet the router computes up to three scores per mesh
peer per message it forwards (~5% of the CPU of a gossip message in the transport micro-bench,
``bench_network.py --only transport``). Without score parameters this router has no scorer:
the gates pass as before, without the arithmetic, and the heartbeat prunes a mesh over D_hi at
random (gossipsub v1.0's rule) instead of by scores that are all 0.

**No copy back to a peer that sent one (``skip_holders``).** A node forwards a message to its
mesh peers once its validator accepted it, excluding only the peer it came from first. Every
mesh peer received the message at about the same time and forwards it too, so while this node
validates, copies may arrive from other peers that plainly hold it already; stock py-libp2p
then sends each of them a copy anyway (the router skips a peer only after an IDONTWANT from it,
gossipsub v1.2, which this network does not speak: a control message per mesh peer per message
costs more than the copies it saves on small messages). Here the peers a copy came from while
the message was in validation are remembered with it (:meth:`HardenedPubsub.holders`) and
:class:`ContentGossipSub` skips them when it forwards, at no cost on the wire. Copies that cross
(two peers forwarding to each other at once) are not avoided: only 5-10% of the duplicates a
5-node network carries under load arrive while their message is in validation.

**Flood publishing and reached lists** (issue #12). Gossipsub forwards every message to each
mesh peer but the one it came from, so in a 5-node network each node read ~2.5-2.9 copies of
each message, and each copy costs the sender and the reader a frame, a decryption, a parse and
several task steps. In a topic of at most ``flood_publish_max`` peers (32), two changes bring
that to one copy per node:

* A node sends its own message to every identified peer of the topic (gossipsub v1.1's flood
  publishing), not to its mesh only.
* The copies it sends through the shared frame (:class:`FrameCache`: the publish and forward
  path's, not IWANT answers or RPCs that carry control) start with a *reached list*: an RPC
  field (:data:`REACHED_FIELD`) of 8-byte tags (:func:`peer_tag`) naming the peers known to have
  the message: this node, the peers it sends it to whose queues have room, its forwarder and
  the holders. A node forwards a message to none of the peers named by the list its first copy
  came with (``gossip_reached_skipped``). After a flood the list names every identified peer,
  so nobody forwards. Another implementation skips the field, as protobuf requires of unknown
  fields, and so does a node with ``reached_hints`` off; a malformed list is ignored, never
  refused. In a larger topic neither happens: gossipsub's mesh forwarding as before.

What this gives up is redundancy, and some trust. A node reaches each peer by one path, so a
copy lost on it comes by heartbeat gossip (IHAVE/IWANT, from peers outside the mesh: few or
none in a small, fully meshed network) or by sync, as any gap did. A sender can write a false
list: the node that takes the message first from it then forwards it to none of the peers
named, which get it from the origin's flood (every identified peer of a small topic), another
path, or sync. The list a node writes never repeats the one it received, so a false list
reaches one hop, and only the first copy's list counts. Measured in the node (5 nodes at 500
ops/s, bench/README.md #12 session 9): copies read per message 2.67-2.94 -> 1.00, node CPU per
op 2.12-2.39 -> 1.73 ms, p99 83-152 -> 77 ms; 20 nodes at 100 ops/s, CPU per op per node 0.61
-> 0.50-0.52 ms.

**The forward and send path** (issue #12), three changes, each behind a switch for bench A/B
(``bench_network.py --only transport`` with ``CRDTBOOK_BENCH_TRANSPORT_ARMS=nofwd,patched``):

* :data:`LEAN_FORWARD`: ``ContentGossipSub.publish`` does what the library's does for this
  node's router (spam protection off; equivocation cannot happen with content ids; IDONTWANT and
  topic observers only exist with v1.2+/v1.3 peers, and this network speaks v1.1/v1.0), with
  the message id computed once, the RPC built once, the peers found without a set per kind of
  peer, and the library's queue for peers not ready yet (identify or subscription pending)
  computed with set operations instead of two loops that build ``ID(msg.from_id)`` per peer.
  One piece of bookkeeping is left out: the library appends each forward's time to a
  per-topic list that only adaptive gossip reads and trims; with adaptive gossip off (as here)
  nothing trims it, so it grew by one float per message for the node's lifetime.
* :data:`SHARED_SEND`: the library's ``send_rpc`` copies the RPC for each peer, splits it to the
  queue's size limit (new RPC objects, ``ByteSize`` calls) and sizes each part, and each peer's
  sending task serializes its copy again. An RPC of one published message (and the sender's
  record) with no deferred GRAFT/PRUNE to attach for the peer is one part equal to itself, so
  the same object goes to every peer's queue, serialized once (:class:`FrameCache`). Anything
  else (control to piggyback, several messages, an RPC over the size limit) takes the
  library's path, which also drops and counts what does not fit.
* :data:`COALESCED_WRITES`: a peer's sending task writes every RPC already queued in one stream
  write (each in its own length-prefixed frame: the receiver sees the same bytes) of at most
  :data:`MAX_COALESCED_WRITE` bytes, instead of a Yamux frame, a Noise message, a socket send
  and a task wake-up per RPC. Errors end it as they end the library's loop.

**One writer per pubsub stream.** A Yamux stream's write is not atomic: it takes the stream's
lock for one frame of at most the send window (and 64 KiB), writes it, and lets go, waiting for
a window update when the window is spent. The library writes a new peer's queued-while-unready
messages and its replay of the recent window (gossipsub's ``flush_pending_messages`` and
``send_recent_messages``, through ``Pubsub.write_msg``) straight to the peer's stream, while the
peer's sending task writes its queue to the same stream. When the peer reads slowly (a node
restarting under load, its window spent), a write waits between frames, the other writer's
frames go in between, and the peer reads garbage: a length prefix of gigabytes or an
undecodable RPC, after which it drops the stream and counts an honest node as hostile (seen in
a 3-node network at ~1,000 ops/s with a witness restarting, issue #12's known limits).
:meth:`HardenedPubsub.write_msg` puts such an RPC on the peer's queue instead
(:data:`ONE_WRITER`): its sending task is the only writer of the stream, as in go-libp2p.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, cast

import libp2p.pubsub.gossipsub as gossipsub_module
import libp2p.pubsub.pubsub as pubsub_module
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import AsyncValidatorFn, SyncValidatorFn
from libp2p.exceptions import ParseError, ValidationError
from libp2p.io.exceptions import IOException, MessageTooLarge
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.stream.exceptions import StreamClosed, StreamEOF, StreamError, StreamReset
from libp2p.peer.id import ID
from libp2p.pubsub.floodsub import PROTOCOL_ID as FLOODSUB_PROTOCOL_ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.mcache import CacheEntry, MessageCache
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import GossipsubEvent, Pubsub, ValidationCache, ValidationResult
from libp2p.pubsub.rpc_queue import RpcQueue
from libp2p.pubsub.validators import signature_validator
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH
from libp2p.stream_muxer.yamux.yamux import HEADER_SIZE as YAMUX_HEADER_SIZE
from libp2p.utils.varint import encode_uvarint

logger = logging.getLogger(__name__)

#: The pubsub module's globals: names it imported (not re-exported) that node/p2p_records.py
#: replaces there, so they must be looked up there at call time.
_LIBRARY_NAMES: dict[str, Any] = vars(pubsub_module)

#: Called with (forwarding peer, reason) whenever input from a peer is rejected.
RejectHook = Callable[[ID, str], None]
#: Called with every message from another peer that passed validation and is for a subscribed
#: topic, and the neighbour that forwarded it.
DeliverHook = Callable[[rpc_pb2.Message, ID], None]
#: Bytes asked of the stream per read: the stock loop reads each RPC's length prefix a byte at
#: a time and then its body (three to four stream reads per RPC, each through Yamux's locks and
#: window accounting); a chunk holds every RPC already received.
READ_CHUNK: Final = 64 * 1024
#: A peer's read loop goes through trio's scheduler at least once per this many RPCs. Reading
#: from Yamux's buffer, taking free locks and judging a duplicate, a malformed batch or one whose
#: ops are all known can all run without an await, so a peer sending such RPCs back to back
#: could otherwise hold the loop for a whole receive window of them.
RPCS_PER_CHECKPOINT: Final = 16
#: Longest unsigned varint (a 64-bit length).
MAX_VARINT_BYTES: Final = 10
#: True keeps py-libp2p's scorer with default parameters in routers made from now on (bench A/B
#: runs; see the module doc).
KEEP_DEFAULT_SCORER = False
#: A message read from a peer counts as in validation from the moment it is read, so a copy read
#: before its task first runs is a duplicate, with no task of its own (bench A/B: False starts a
#: task per such copy, which finds it in flight or seen; ``CRDTBOOK_BENCH_LATE_INFLIGHT=1``).
#: In one 20-node profile, 4,902 copies read for 426 messages validated had started ~2,400 tasks.
INFLIGHT_FROM_READ = True
#: Validators run in the task of the message they judge (``HardenedPubsub.validate_msg``); False
#: keeps the library's nursery and task per message (bench A/B).
DIRECT_VALIDATION = True
#: A message first read from a peer is validated and forwarded by that peer's read loop itself,
#: before it reads on, instead of in a service task of its own (``manager.run_task``: a
#: ``FunctionTask``, a search of the service's whole task tree for its parent, a trio task and
#: the wake-ups around it, per message per node). Needs ``INFLIGHT_FROM_READ``. False keeps a
#: task per message (bench A/B).
INLINE_VALIDATION = True
#: Verdicts cached in :class:`LruValidationCache`; False keeps the library's cache (bench A/B).
LRU_VALIDATION_CACHE = True
#: The envelope fields an unsigned message must not carry (StrictNoSign).
ENVELOPE_FIELDS = ("from_id", "seqno", "signature", "key")
#: The RPC field of the reached list (module doc): above 0x200000, where gossipsub v1.3 puts
#: experimental extensions (its test extension is 6492434), so no standard field takes it. A
#: peer that does not know the field skips it, as protobuf requires of unknown fields.
REACHED_FIELD: Final = 7_000_001
#: The field's key (number, wire type 2: length-delimited), the first bytes of a frame that
#: carries a reached list.
REACHED_KEY: Final = bytes(encode_uvarint((REACHED_FIELD << 3) | 2))
#: A peer's tag in a reached list: the last 8 bytes of its peer id (an ed25519 key's last bytes,
#: or a hash's): no two peers of a network share one unless one was ground for it (~2^64 keys).
REACHED_TAG_BYTES: Final = 8
#: Tags a reached list holds at most (512 bytes): a flood of FLOOD_PUBLISH_MAX peers, the
#: sender and the forwards before it. Tags left out cost only copies a forwarder sends anyway.
MAX_REACHED_TAGS: Final = 64
#: The reached list is written and honoured (module doc); False: neither (bench A/B).
REACHED_HINTS = True


def content_message_id(msg: rpc_pb2.Message) -> bytes:
    """Gossip message id: sha256 of the payload only (same data => same id)."""
    return hashlib.sha256(msg.data).digest()


def take_frames(buf: bytearray, max_size: int) -> list[bytes]:
    """Remove from ``buf`` every complete unsigned-varint length-prefixed frame at its start
    and return their bodies; an incomplete one stays. Raises ``MessageTooLarge`` for a frame
    announced longer than ``max_size`` (before its body arrives) and ``ParseError`` for a
    length prefix of more than 10 bytes."""
    frames: list[bytes] = []
    pos, end = 0, len(buf)
    while pos < end:
        length = shift = 0
        i = pos
        while True:
            if i == end:
                del buf[:pos]
                return frames  # the length prefix is not all here yet
            byte = buf[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if i - pos >= MAX_VARINT_BYTES:
                raise ParseError("pubsub frame length prefix longer than 10 bytes")
        if length > max_size:
            raise MessageTooLarge(f"pubsub RPC of {length} bytes exceeds {max_size}")
        if end - i < length:
            break  # the body is not all here yet
        frames.append(bytes(buf[i : i + length]))
        pos = i + length
    del buf[:pos]
    return frames


def peer_tag(peer_id: ID) -> bytes:
    """``peer_id``'s tag in a reached list (:data:`REACHED_TAG_BYTES`)."""
    return peer_id.to_bytes()[-REACHED_TAG_BYTES:]


def reached_prefix(tags: Iterable[bytes]) -> bytes:
    """The reached-list field naming ``tags`` (distinct, at most :data:`MAX_REACHED_TAGS` of
    them kept, in order), to go before an RPC's own fields; empty for no tags."""
    body = b"".join(list(dict.fromkeys(tags))[:MAX_REACHED_TAGS])
    if not body:
        return b""
    return REACHED_KEY + encode_uvarint(len(body)) + body


def split_tags(joined: bytes) -> list[bytes]:
    """The tags of reached lists joined together."""
    return [joined[i : i + REACHED_TAG_BYTES] for i in range(0, len(joined), REACHED_TAG_BYTES)]


def split_reached(frame: bytes) -> tuple[bytes, bytes]:
    """An RPC frame's reached list (tags joined; empty if it has none, or one that is not a
    whole number of tags or is longer than :data:`MAX_REACHED_TAGS`, which is ignored: it is
    only a hint) and the frame without the field (the whole frame if the field does not start
    it or does not fit in it, which protobuf's parser then judges)."""
    if not frame.startswith(REACHED_KEY):
        return b"", frame
    start = len(REACHED_KEY)
    length = shift = 0
    for i in range(start, min(start + 2, len(frame))):
        byte = frame[i]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            end = i + 1 + length
            if end > len(frame):
                return b"", frame
            tags = frame[i + 1 : end]
            if length % REACHED_TAG_BYTES or length > MAX_REACHED_TAGS * REACHED_TAG_BYTES:
                tags = b""
            return tags, frame[end:]
    return b"", frame  # a length of more than 2 bytes: longer than any list we accept


def has_envelope(msg: rpc_pb2.Message) -> bool:
    """Whether ``msg`` carries any of the signed envelope's fields."""
    return any(getattr(msg, name) for name in ENVELOPE_FIELDS)


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
        unsigned: bool = False,
        skip_holders: bool = True,
        reached_hints: bool = True,
        **kwargs: Any,
    ) -> None:
        """``unsigned``: publish messages without the envelope and refuse those that carry one
        (see the module doc; it implies ``strict_signing=False``). ``skip_holders``: do not
        forward a message to a peer that sent us a copy while it was in validation (the module
        doc; False is stock behaviour). ``reached_hints``: write a reached list on the messages
        this node sends and skip the peers a received one names when forwarding (module doc)."""
        if unsigned:
            kwargs["strict_signing"] = False
        super().__init__(*args, **kwargs)
        self.unsigned = unsigned
        self.skip_holders = skip_holders
        #: Copies not forwarded because the peer had sent one while the message was in
        #: validation (``skip_holders``).
        self.holders_skipped = 0
        #: Message id in validation -> the peers other than its forwarder that sent a copy.
        self._holders: dict[bytes, set[ID]] = {}
        self.reached_hints = reached_hints and REACHED_HINTS
        #: Message id in validation -> the reached list its first copy carried (tags joined).
        self._reached: dict[bytes, bytes] = {}
        #: Copies not forwarded because a reached list named the peer.
        self.reached_skipped = 0
        #: Gossip messages read from peers (every copy) and those of them not seen before.
        self.copies_in = 0
        self.firsts_in = 0
        self._on_reject = on_reject
        self._deliver = deliver
        #: Message id -> the peer it came from, while its validation runs (a second copy
        #: meanwhile is a duplicate; delivery names the forwarder).
        self._inflight: dict[bytes, ID] = {}
        if LRU_VALIDATION_CACHE:
            self.validation_cache = LruValidationCache(
                self.validation_cache.ttl, self.validation_cache.max_size
            )
        #: Encoded frames of the RPCs pushed, shared, to peer queues (``SHARED_SEND``).
        self.frames = FrameCache()

    async def publish(self, topic_id: str | list[str], data: bytes) -> None:
        if not self.unsigned:
            await super().publish(topic_id, data)
            return
        topics = [topic_id] if isinstance(topic_id, str) else list(topic_id)
        await self.push_msg(self.my_id, rpc_pb2.Message(data=data, topicIDs=topics))

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
        msg_id = self._msg_id_constructor(msg)
        if msg_id in self._inflight:
            self._holds(msg_forwarder, msg_id)
            return  # duplicate: being validated right now
        self._inflight[msg_id] = msg_forwarder
        await self._push_inflight(msg_forwarder, msg, msg_id)

    async def _push_inflight(self, msg_forwarder: ID, msg: rpc_pb2.Message, msg_id: bytes) -> None:
        """Validate and forward a message from a peer, registered in ``_inflight`` by the
        caller (``push_msg``, or ``_handle_rpc`` as it read it); unregisters it at the end."""
        try:
            try:
                if self.is_peer_blacklisted(msg_forwarder):
                    return
                if self.seen_messages.has(msg_id):
                    return  # duplicate: already seen
                if self.unsigned:
                    if has_envelope(msg):
                        self._reject(msg_forwarder, "signed")
                        return
                elif self.strict_signing and not signature_ok(msg):
                    # Pitfall: the library's check raises on a garbage key; ours cannot.
                    self._reject(msg_forwarder, "bad-signature")
                    return
                await super().push_msg(msg_forwarder, msg)
            finally:
                self._inflight.pop(msg_id, None)
                self._holders.pop(msg_id, None)
                self._reached.pop(msg_id, None)
        except Exception as exc:
            if not self.manager.is_running or _is_closed_nursery(exc):
                logger.debug("message from %s dropped by shutdown: %r", msg_forwarder, exc)
                return
            logger.warning("dropped message from %s: %r", msg_forwarder, exc)
            self._reject(msg_forwarder, "error")

    async def validate_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        """The library's ``validate_msg`` (0.8.1) without its nursery and task per message: the
        async validators run in the caller's task, one after another (a node has one per topic;
        the library runs them side by side and wants every one true, which is the same verdict),
        under the same timeout and semaphore, with the same result cache and errors. A task
        spawn, its nursery and the wake-up of the waiting task, per message validated by every
        node (``DIRECT_VALIDATION``; the bench A/B: ``CRDTBOOK_BENCH_NURSERY_VALIDATION=1``)."""
        if not DIRECT_VALIDATION:
            await super().validate_msg(msg_forwarder, msg)
            return
        msg_id = self._msg_id_constructor(msg)
        cached = self.validation_cache.get(msg_id)
        if cached is not None:
            if not cached.is_valid:
                raise ValidationError(f"cached: {cached.error_message or 'unknown error'}")
            return
        failure: str | None = None
        try:
            validators = self.get_msg_validators(msg)
            for topic_validator in validators:
                if not topic_validator.is_async:
                    check = cast(SyncValidatorFn, topic_validator.validator)
                    if not check(msg_forwarder, msg):
                        failure = "Synchronous validation failed"
                        break
            if failure is None:
                with trio.move_on_after(self.validation_timeout) as scope:
                    for topic_validator in validators:
                        if topic_validator.is_async:
                            judge = cast(AsyncValidatorFn, topic_validator.validator)
                            # Taken at once when free: trio's acquire is a checkpoint even
                            # then, one more trip through the scheduler per message (~0.67
                            # task steps per op on five nodes at 500 ops/s); with waiters,
                            # acquire_nowait refuses, so they keep their turn.
                            semaphore = self._validator_semaphore
                            try:
                                semaphore.acquire_nowait()
                            except trio.WouldBlock:
                                await semaphore.acquire()
                            try:
                                valid = await judge(msg_forwarder, msg)
                            finally:
                                semaphore.release()
                            if not valid:
                                failure = "Asynchronous validation failed"
                                break
                if scope.cancelled_caught:
                    failure = "Validation timeout"
        except Exception as exc:  # as the library: a validator's error is a refusal
            failure = f"Validation error: {exc!r}"
        self.validation_cache.put(
            msg_id,
            ValidationResult(
                is_valid=failure is None, timestamp=time.time(), error_message=failure
            ),
        )
        if failure is not None:
            raise ValidationError(f"{failure} (message from {msg_forwarder})")

    def _holds(self, peer_id: ID, msg_id: bytes) -> None:
        """``peer_id`` sent a copy of ``msg_id``, which is in validation (module doc)."""
        if self.skip_holders:
            self._holders.setdefault(msg_id, set()).add(peer_id)

    def holders(self, msg_id: bytes) -> set[ID] | None:
        """The peers known to hold ``msg_id`` (they sent a copy while it was in validation),
        or None: the router forwards it to none of them."""
        return self._holders.get(msg_id)

    def reached(self, msg_id: bytes) -> bytes:
        """The tags of the reached list ``msg_id``'s first copy came with (joined; empty if
        none), while it is in validation: the router forwards it to none of those peers (module
        doc). Later copies' lists are not kept: their senders are holders already, and a list
        only a duplicate carried could otherwise cut forwards it did not start."""
        return self._reached.get(msg_id, b"")

    async def continuously_read_stream(self, stream: INetStream) -> None:
        """The library's read loop (0.8.1), reading RPCs in chunks and dropping duplicates
        before a task is started for them (see the module doc). Errors end it as they end the
        library's."""
        peer_id = stream.muxed_conn.peer_id
        buf = bytearray()
        handled = 0
        try:
            while self.manager.is_running:
                chunk = await stream.read(READ_CHUNK)
                if not chunk:
                    return  # end of stream
                buf += chunk
                for frame in take_frames(buf, self.max_inbound_rpc_size):
                    reached, body = split_reached(frame)
                    rpc = rpc_pb2.RPC()
                    rpc.ParseFromString(body)
                    await self._handle_rpc(rpc, peer_id, stream, len(frame), reached)
                    handled += 1
                    if handled % RPCS_PER_CHECKPOINT == 0:
                        await trio.lowlevel.checkpoint()
        except MessageTooLarge as exc:
            logger.warning("pubsub RPC from %s exceeded the size limit: %s", peer_id, exc)
            await _quiet_reset(stream)
            self._handle_dead_peer(peer_id)
        except (StreamEOF, StreamError, IOException, RawConnError) as exc:
            logger.debug("pubsub stream from %s ended: %r", peer_id, exc)

    async def _handle_rpc(
        self, rpc: rpc_pb2.RPC, peer_id: ID, stream: INetStream, size: int, reached: bytes = b""
    ) -> None:
        """One RPC from ``peer_id``: the body of the library's read loop. Nothing from a
        blacklisted peer is handled: its read loop lives until its stream is reset, and a GRAFT
        or subscription read meanwhile would put the peer back into the tables its teardown
        just cleared (the library handles control messages without a blacklist check).
        ``reached``: the RPC's reached list, kept for its message if it carries one only."""
        if self.is_peer_blacklisted(peer_id):
            return
        # Looked up in the library's module: node/p2p_records.py replaces it there.
        if not _LIBRARY_NAMES["maybe_consume_signed_record"](rpc, self.host, peer_id):
            logger.debug("invalid signed record from %s: RPC ignored", peer_id)
            return
        if len(rpc.publish) != 1 or not self.reached_hints:
            reached = b""
        for msg in rpc.publish:
            if not self._is_subscribed_to_msg(msg):
                continue
            self.copies_in += 1
            msg_id = self._msg_id_constructor(msg)
            if msg_id in self._inflight:
                self._holds(peer_id, msg_id)
                continue  # a duplicate: no task, no validation
            if self.seen_messages.has(msg_id):
                continue
            if not self.manager.is_running:
                continue
            self.firsts_in += 1
            if INFLIGHT_FROM_READ:
                # In flight from now, not from when its task first runs: copies read before
                # then (the rest of this RPC, the next RPCs from other peers) are duplicates.
                self._inflight[msg_id] = peer_id
                if reached:
                    self._reached[msg_id] = reached
                if INLINE_VALIDATION:
                    await self._push_inflight(peer_id, msg, msg_id)
                else:
                    self.manager.run_task(self._push_inflight, peer_id, msg, msg_id)
            else:
                self.manager.run_task(self.push_msg, peer_id, msg)
        if rpc.subscriptions:
            if len(rpc.subscriptions) > self.max_subscriptions_per_rpc:
                logger.warning(
                    "peer %s sent %d subscriptions (limit %d): refused",
                    peer_id,
                    len(rpc.subscriptions),
                    self.max_subscriptions_per_rpc,
                )
            else:
                for sub in rpc.subscriptions:
                    self.handle_subscription(peer_id, sub)
        if rpc.HasField("control"):
            await self.router.handle_rpc(rpc, peer_id)
        if stream.metric_send_channel is not None:
            event = GossipsubEvent()
            event.peer_id = peer_id.pretty()
            event.message_size = size
            event.publish = bool(rpc.publish)
            event.subopts = bool(rpc.subscriptions)
            event.control = rpc.HasField("control")
            await stream.metric_send_channel.send(event)

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

    async def write_msg(self, stream: INetStream, rpc_msg: rpc_pb2.RPC) -> bool:
        """What the library writes outside a peer's sending task (its replays to a new peer)
        goes to the peer's queue (:data:`ONE_WRITER`, module doc): True once queued (or dropped
        as a full queue drops, counted), False for a stream that is no longer the peer's."""
        router = self.router
        if not ONE_WRITER or not isinstance(router, GossipSub):  # (the node's is a GossipSub)
            return await super().write_msg(stream, rpc_msg)
        peer_id = stream.muxed_conn.peer_id
        if self.peers.get(peer_id) is not stream or peer_id not in self.peer_queues:
            return False  # the peer left or came back on another stream meanwhile
        router.send_rpc(peer_id, rpc_msg)
        return True

    async def handle_sending_messages(
        self, peer_id: ID, stream: INetStream, queue: RpcQueue
    ) -> None:
        """The library's per-peer sending loop (0.8.1), writing every RPC already queued in one
        stream write, each in its own length-prefixed frame, up to :data:`MAX_COALESCED_WRITE`
        bytes a write (``COALESCED_WRITES``; module doc). Its ends are the library's: a closed
        queue ends it, a closed or reset stream makes the peer dead and ends it, any other error
        makes the peer dead. Frames come from :attr:`frames` (``SHARED_SEND``), which this loop
        releases; with ``COALESCED_WRITES`` off each RPC is written on its own, as the library
        does (bench A/B of one change at a time). It is the stream's only writer
        (:meth:`write_msg`), so it never calls the library's ``write_msg``."""
        frames = self.frames
        limit = MAX_COALESCED_WRITE if COALESCED_WRITES else 0
        try:
            while True:
                rpc = await queue.pop()
                if rpc is None:
                    return  # the queue was closed
                batch = [frames.take(rpc)]
                size = len(batch[0])
                while len(queue):
                    # No wait: pop returns a queued RPC at once (priority ones first, as the
                    # library takes them).
                    more = await queue.pop()
                    if more is None:
                        break
                    frame = frames.take(more)
                    if size + len(frame) > limit:
                        if not await self._write_frames(stream, batch):
                            return
                        batch, size = [], 0
                    batch.append(frame)
                    size += len(frame)
                if not await self._write_frames(stream, batch):
                    return
        except Exception:
            logger.debug("sending loop for %s terminated with error", peer_id)
            self._handle_dead_peer(peer_id)

    async def _write_frames(self, stream: INetStream, frames: list[bytes]) -> bool:
        """``write_msg`` for frames already encoded: one stream write; False (and the peer
        dead) if the stream is closed or reset, as the library's."""
        try:
            await stream.write(frames[0] if len(frames) == 1 else b"".join(frames))
        except (StreamClosed, StreamReset):
            peer_id = stream.muxed_conn.peer_id
            logger.debug("Fail to write message to %s: stream closed or reset", peer_id)
            self._handle_dead_peer(peer_id)
            return False
        return True

    def notify_subscriptions(self, publish_message: rpc_pb2.Message) -> None:
        forwarder = self._inflight.get(self._msg_id_constructor(publish_message))
        if forwarder is None:
            return  # our own publish (only remote messages are in flight): not echoed
        try:
            self._deliver(publish_message, forwarder)
        except Exception:
            logger.exception("gossip delivery hook failed")


class LruValidationCache(ValidationCache):
    """The library's ``ValidationCache`` with its rules (a verdict lives ``ttl`` seconds, at most
    ``max_size`` are kept, the least recently used goes first) at O(1) a call. The library keeps
    its use order in a list, so each ``put`` and ``get`` scans it (``in``, ``remove``,
    ``pop(0)``: up to 1,000 ids for every message a node validates, ~3% of the CPU of a gossip
    message in the transport micro-bench) and the cleanup each minute is quadratic. Here the
    order is the dict's own (``OrderedDict.move_to_end``)."""

    def __init__(self, ttl: int, max_size: int) -> None:
        super().__init__(ttl, max_size)
        self.cache: OrderedDict[bytes, ValidationResult] = OrderedDict()

    def get(self, msg_id: bytes) -> ValidationResult | None:
        result = self.cache.get(msg_id)
        if result is None:
            return None
        if time.time() - result.timestamp > self.ttl:
            del self.cache[msg_id]
            return None
        self.cache.move_to_end(msg_id)
        return result

    def put(self, msg_id: bytes, result: ValidationResult) -> None:
        cache = self.cache
        while len(cache) >= self.max_size and cache:
            cache.popitem(last=False)
        cache[msg_id] = result
        cache.move_to_end(msg_id)

    def _remove(self, msg_id: bytes) -> None:
        self.cache.pop(msg_id, None)

    def clear_expired(self) -> None:
        now = time.time()
        for msg_id in [m for m, r in self.cache.items() if now - r.timestamp > self.ttl]:
            del self.cache[msg_id]


class ContentMessageCache(MessageCache):
    """``MessageCache`` keyed by the message id pubsub uses (see the module doc)."""

    def __init__(
        self, msg_id: Callable[[rpc_pb2.Message], bytes], window_size: int, history_size: int
    ) -> None:
        super().__init__(window_size, history_size)
        self._msg_id = msg_id

    @property
    def msg_id(self) -> Callable[[rpc_pb2.Message], bytes]:
        """The id function the cache keys by."""
        return self._msg_id

    def put(self, msg: rpc_pb2.Message, mid: bytes | None = None) -> None:
        """Cache ``msg`` under its id; ``mid``: that id, computed already by the caller."""
        if mid is None:
            mid = self._msg_id(msg)
        if mid in self.msgs:
            return
        self.msgs[mid] = msg
        self.history[0].append(CacheEntry(mid, msg.topicIDs))


class ContentGossipSub(GossipSub):
    """``GossipSub`` for content-addressed message ids (see the module doc)."""

    def __init__(
        self,
        *args: Any,
        msg_id: Callable[[rpc_pb2.Message], bytes],
        flood_publish_max: int = 0,
        **kwargs: Any,
    ) -> None:
        """``flood_publish_max``: this node's own messages go to every peer of their topic while
        it has at most this many, not to its mesh only (module doc); 0: never."""
        super().__init__(*args, **kwargs)
        self.flood_publish_max = flood_publish_max
        self.mcache = ContentMessageCache(msg_id, self.mcache.window_size, self.mcache.history_size)
        if kwargs.get("score_params") is None and not KEEP_DEFAULT_SCORER:
            self.scorer = None  # all-zero scores behind gates that always pass (module doc)
        #: Whether a peer may negotiate gossipsub v1.2 or later (a peer speaks one of the
        #: protocols this router offers): only then can IDONTWANT or topic observers exist.
        self.speaks_v12_plus = not V12_PLUS.isdisjoint(self.protocols)

    def _check_equivocation(self, msg: rpc_pb2.Message) -> bool:
        return True  # a content id names one content: there is nothing to equivocate about

    async def publish(self, msg_forwarder: ID, pubsub_msg: rpc_pb2.Message) -> None:
        """Forward a validated message (or send our own): the library's ``publish`` (0.8.1) for
        this router's configuration, at less cost (``LEAN_FORWARD``; module doc). Anything else
        (spam protection on, no pubsub attached) takes the library's path."""
        pubsub = self.pubsub
        if not LEAN_FORWARD or self.spam_protection_enabled or not isinstance(pubsub, Pubsub):
            await super().publish(msg_forwarder, pubsub_msg)
            return
        # No equivocation check: ours passes every message (a content id names one content).
        msg_id = pubsub.get_message_id(pubsub_msg)
        mcache = self.mcache
        if isinstance(mcache, ContentMessageCache):
            same_id = mcache.msg_id is pubsub._msg_id_constructor
            mcache.put(pubsub_msg, msg_id if same_id else None)
        else:
            mcache.put(pubsub_msg)
        topics = list(pubsub_msg.topicIDs)
        origin = ID(pubsub_msg.from_id)
        rpc_msg = rpc_pb2.RPC(publish=[pubsub_msg])
        # Looked up in the library's module: node/p2p_records.py replaces it there.
        envelope_bytes, _ = _GOSSIP_NAMES["env_to_send_in_RPC"](pubsub.host)
        rpc_msg.senderRecord = envelope_bytes
        if self.speaks_v12_plus:
            # With v1.0/v1.1 peers only, both find nobody to tell: no peer negotiated
            # IDONTWANT (v1.2), and observers register only over v1.3.
            await self._emit_idontwant_for_message(msg_id, topics)
            await self._notify_observers(topics, msg_id)
        peer_streams = pubsub.peers
        scorer = self.scorer
        sends: list[ID] = []
        for peer_id in self._lean_peers_to_send(topics, msg_forwarder, origin, msg_id):
            if peer_id not in peer_streams:
                continue
            if scorer is not None and not scorer.allow_publish(peer_id, topics):
                continue
            sends.append(peer_id)
        listed = (
            sends
            and SHARED_SEND
            and isinstance(pubsub, HardenedPubsub)
            and pubsub.reached_hints
            and self._small(topics)
        )
        if listed:
            assert isinstance(pubsub, HardenedPubsub)
            pubsub.frames.prefix(rpc_msg, self._reached_list(pubsub, msg_forwarder, msg_id, sends))
        for peer_id in sends:
            self.send_rpc(peer_id, rpc_msg)
        if listed:
            assert isinstance(pubsub, HardenedPubsub)
            pubsub.frames.release_unheld(rpc_msg)  # no queue took the shared frame after all
        now = time.time()
        self._queue_for_unready_peers(pubsub, topics, rpc_msg, {msg_forwarder, origin}, now)
        for topic in topics:
            self.time_since_last_publish[topic] = int(now)
            if self.adaptive_gossip_enabled:
                # Read only by the adaptive-gossip health check; the library appends whether
                # or not it is on, and nothing else ever trims the list (module doc).
                self.recent_message_deliveries[topic].append(now)

    def _queue_for_unready_peers(
        self,
        pubsub: Pubsub,
        topics: list[str],
        rpc_msg: rpc_pb2.RPC,
        excluded: set[ID],
        now: float,
    ) -> None:
        """The library's queueing (end of ``publish``) of a message for the peers it may not
        have reached: those in a topic of it whose protocol is not known yet (identify pending)
        and those connected but not (yet) in the topic; direct peers, the forwarder and the
        origin never; each peer once. The same peers as the library's two loops over peers,
        found with set operations (the library builds ``ID(msg.from_id)`` per peer per topic)."""
        queued: set[ID] = set()
        peer_topics = pubsub.peer_topics
        for topic in topics:
            topic_peers = peer_topics.get(topic)
            if topic_peers is not None:
                unidentified = topic_peers.difference(self.peer_protocol, self.direct_peers)
                unidentified -= excluded
                unidentified -= queued
            else:
                unidentified = set()
            unsubscribed = pubsub.peers.keys() - (topic_peers or ())
            unsubscribed.difference_update(excluded, self.direct_peers, queued)
            for peer_id in (*unidentified, *unsubscribed):
                self._prune_pending_messages(peer_id)
                self._pending_messages[peer_id].append((now, rpc_msg))
                queued.add(peer_id)
                logger.debug("queued message for peer %s (identify pending)", peer_id)

    def _small(self, topics: Iterable[str]) -> bool:
        """Whether every topic has at most ``flood_publish_max`` peers: where this router
        floods its own messages, and writes and honours reached lists (module doc)."""
        peer_topics = self.pubsub.peer_topics if self.pubsub is not None else {}
        limit = self.flood_publish_max
        return all(len(peer_topics.get(topic, ())) <= limit for topic in topics)

    def _reached_list(
        self, pubsub: HardenedPubsub, msg_forwarder: ID, msg_id: bytes, sends: list[ID]
    ) -> bytes:
        """The reached list of a message this node sends to ``sends`` (module doc): itself,
        the peers of ``sends`` whose queue has room for it (a full one drops it), and the peers
        it knows hold it (its forwarder, the holders). Not the list it came with: a false one
        reaches no further than the node that took the message first from its sender."""
        tags = [peer_tag(pubsub.my_id)]
        queues = pubsub.peer_queues
        tags.extend(peer_tag(peer_id) for peer_id in sends if _has_room(queues.get(peer_id)))
        if msg_forwarder != pubsub.my_id:
            tags.append(peer_tag(msg_forwarder))
        holders = pubsub.holders(msg_id)
        if holders:
            tags.extend(peer_tag(peer_id) for peer_id in holders)
        return reached_prefix(tags)

    def _listed(self, topics: Iterable[str], msg_id: bytes) -> set[bytes] | None:
        """The tags of the reached list ``msg_id`` came with, if this router honours lists for
        these topics (module doc); None otherwise."""
        pubsub = self.pubsub
        if not isinstance(pubsub, HardenedPubsub) or not pubsub.reached_hints:
            return None
        known = pubsub.reached(msg_id)
        return set(split_tags(known)) if known and self._small(topics) else None

    def _lean_peers_to_send(
        self, topics: list[str], msg_forwarder: ID, origin: ID, msg_id: bytes
    ) -> Iterable[ID]:
        """``_get_peers_to_send`` (below) without building a set per kind of peer, where that
        gives the same peers: every topic has a mesh, no scorer, no floodsub peer possible.
        Otherwise the library's choice. Two rules of this router's own (module doc) change the
        peers: this node's own message goes to every identified peer of its topic while they
        are at most ``flood_publish_max``, and a forward skips the peers a reached list names."""
        pubsub = self.pubsub
        mesh = self.mesh
        if (
            self.scorer is not None
            or FLOODSUB_PROTOCOL in self.protocols
            or not isinstance(pubsub, HardenedPubsub)
            or not all(topic in mesh for topic in topics)
        ):
            return self._get_peers_to_send(topics, msg_forwarder, origin, msg_id)
        own = msg_forwarder == pubsub.my_id
        send_to: set[ID] = set()
        for topic in topics:
            topic_peers = pubsub.peer_topics.get(topic)
            if topic_peers is not None:
                send_to.update(self.direct_peers)
                if own and len(topic_peers) <= self.flood_publish_max:
                    # Peers whose protocol is not known yet get it queued, as the library
                    # queues it for them (_queue_for_unready_peers), not twice.
                    protocols = self.peer_protocol
                    send_to.update(peer for peer in topic_peers if peer in protocols)
                else:
                    send_to.update(mesh[topic])
        send_to.discard(msg_forwarder)
        send_to.discard(origin)
        dont_send = self.dont_send_message_ids
        holders = pubsub.holders(msg_id)
        reached = self._listed(topics, msg_id)
        peers: list[ID] = []
        for peer_id in send_to:
            refused = dont_send.get(peer_id)
            if refused and msg_id in refused:
                continue
            if holders is not None and peer_id in holders:
                pubsub.holders_skipped += 1
                continue
            if reached is not None and peer_tag(peer_id) in reached:
                pubsub.reached_skipped += 1
                continue
            peers.append(peer_id)
        return peers

    def send_rpc(self, peer_id: ID, rpc: rpc_pb2.RPC, priority: bool = False) -> None:
        """The library's ``send_rpc`` (0.8.1): copy the RPC, attach the peer's deferred GRAFT and
        PRUNE, split it to the queue's size limit, drop an oversized part, push. An RPC of one
        published message and nothing to attach (the forward path's) is one part, equal to the
        RPC: the same object is pushed to every peer, encoded once (``SHARED_SEND``; module
        doc). A drop (queue full or closed) is handled as the library handles it."""
        pubsub = self.pubsub
        if not SHARED_SEND or not isinstance(pubsub, HardenedPubsub):
            super().send_rpc(peer_id, rpc, priority)
            return
        queue = pubsub.peer_queues.get(peer_id)
        if queue is None or peer_id in self._pending_control:
            super().send_rpc(peer_id, rpc, priority)  # (no queue: it logs and returns)
            return
        body_size = pubsub.frames.shared_size(rpc)
        if body_size is None or body_size > queue.max_message_size:
            pubsub.frames.release_unheld(rpc)
            super().send_rpc(peer_id, rpc, priority)  # (oversized: it drops it, as it counts)
            return
        if queue.push(rpc, priority=priority):
            pubsub.frames.hold(rpc)
        else:
            self._handle_dropped_rpc(peer_id, rpc, "queue_full")

    def _get_peers_to_send(
        self,
        topic_ids: Iterable[str],
        msg_forwarder: ID,
        origin: ID,
        msg_id: bytes | None = None,
    ) -> Iterator[ID]:
        """The library's choice less the peers that hold the message already and those a
        reached list names (module doc)."""
        topic_ids = list(topic_ids)
        peers = super()._get_peers_to_send(topic_ids, msg_forwarder, origin, msg_id)
        pubsub = self.pubsub
        if msg_id is None or not isinstance(pubsub, HardenedPubsub):
            yield from peers
            return
        holders = pubsub.holders(msg_id)
        reached = self._listed(topic_ids, msg_id)
        for peer_id in peers:
            if holders is not None and peer_id in holders:
                pubsub.holders_skipped += 1
                continue
            if reached is not None and peer_tag(peer_id) in reached:
                pubsub.reached_skipped += 1
                continue
            yield peer_id


#: Every RPC for a peer goes through its queue and sending task, the stream's only writer
#: (module doc); False: the library writes replays straight to the stream (tests show why not).
ONE_WRITER = True

#: The gossipsub module's globals: names it imported that node/p2p_records.py replaces there.
_GOSSIP_NAMES: dict[str, Any] = vars(gossipsub_module)
#: Protocols with which a peer may send IDONTWANT (v1.2) or observe topics (v1.3).
V12_PLUS: Final = frozenset(
    {
        gossipsub_module.PROTOCOL_ID_V12,
        gossipsub_module.PROTOCOL_ID_V13,
        gossipsub_module.PROTOCOL_ID_V14,
        gossipsub_module.PROTOCOL_ID_V20,
    }
)
FLOODSUB_PROTOCOL: Final = FLOODSUB_PROTOCOL_ID
#: ``ContentGossipSub.publish`` forwards by the lean path (module doc); False: the library's
#: (bench A/B).
LEAN_FORWARD = True
#: ``ContentGossipSub.send_rpc`` pushes one shared RPC, encoded once, to every peer (module doc);
#: False: the library's copy, split and size check per peer, and an encoding per peer (bench A/B).
SHARED_SEND = True
#: A peer's sending task writes every RPC already queued in one stream write (module doc);
#: False: a write per RPC (bench A/B).
COALESCED_WRITES = True
#: Largest coalesced write: one Yamux data frame (12-byte header) that fits one Noise transport
#: message (65,519 bytes of plaintext), so a write of many small RPCs costs one encryption and
#: one socket send. Larger writes would be cut into frames of that size anyway, and would hold
#: the stream's send window longer. A single RPC larger than this is written whole, as before.
MAX_COALESCED_WRITE: Final = MAX_PLAINTEXT_LENGTH - YAMUX_HEADER_SIZE
#: Bytes of encoded frames a :class:`FrameCache` keeps at most. An entry is normally gone when
#: the last queue that held its RPC has sent it; entries of RPCs left in a closed queue (a peer
#: gone) are only dropped by this bound, oldest first. 4 MiB is every queue of 8 peers full
#: (32 RPCs each) of 16 KB messages; past it a frame is encoded again, which is only slower.
FRAME_CACHE_BYTES: Final = 4 * 1024 * 1024
#: The fields of an RPC that ``send_rpc`` may share as is: one published message and the
#: sender's record (the library's split makes one part equal to it, nothing else).
_SHAREABLE_FIELDS: Final = frozenset({"publish", "senderRecord"})


class FrameCache:
    """Encoded frames (length prefix and serialized RPC) of RPCs pushed to peer queues, so an
    RPC sent to many peers is serialized once, not once per peer (module doc).

    Keyed by the RPC object's ``id``, which is only unique while the object lives: an entry
    holds its RPC, so no other object can have that id while the entry exists, and a lookup
    checks it is the same object. An entry is removed when every queue that took its RPC has
    sent it (:meth:`take`), or, for RPCs never sent, by the :data:`FRAME_CACHE_BYTES` bound.
    A cached RPC must not change (none is: the library copies an RPC before it adds to it)."""

    def __init__(self, max_bytes: int = FRAME_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        #: id(rpc) -> [rpc, frame, body size, queues holding it]
        self._entries: dict[int, list[Any]] = {}
        self._bytes = 0
        #: RPCs serialized for a queue write (cache misses included) and frames written from
        #: the cache (for tests and benches).
        self.encoded = 0
        self.reused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, rpc: rpc_pb2.RPC) -> list[Any] | None:
        entry = self._entries.get(id(rpc))
        return entry if entry is not None and entry[0] is rpc else None

    def prefix(self, rpc: rpc_pb2.RPC, lead: bytes) -> None:
        """Encode and cache ``rpc`` with ``lead`` (a reached list's field) before its own
        fields, if it can be shared (:meth:`shared_size`): every queue it is pushed to then
        writes that."""
        if lead and self._entry(rpc) is None:
            self.shared_size(rpc, lead)

    def shared_size(self, rpc: rpc_pb2.RPC, lead: bytes = b"") -> int | None:
        """The serialized size of ``rpc`` if it can be shared as is (one published message,
        maybe the sender's record, nothing else), encoding and caching it the first time;
        None otherwise."""
        entry = self._entry(rpc)
        if entry is not None:
            return int(entry[2])
        if len(rpc.publish) != 1 or not _SHAREABLE_FIELDS.issuperset(
            field.name for field, _ in rpc.ListFields()
        ):
            return None
        body = lead + rpc.SerializeToString()
        self.encoded += 1
        frame = encode_uvarint(len(body)) + body
        self._entries[id(rpc)] = [rpc, frame, len(body), 0]
        self._bytes += len(frame)
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            self._bytes -= len(self._entries.pop(oldest)[1])
        return len(body)

    def hold(self, rpc: rpc_pb2.RPC) -> None:
        """One more queue holds ``rpc`` (cached by :meth:`shared_size`)."""
        entry = self._entry(rpc)
        if entry is not None:
            entry[3] += 1

    def release_unheld(self, rpc: rpc_pb2.RPC) -> None:
        """Forget ``rpc``'s frame if no queue holds it (one not to be pushed after all)."""
        entry = self._entry(rpc)
        if entry is not None and entry[3] <= 0:
            del self._entries[id(rpc)]
            self._bytes -= len(entry[1])

    def take(self, rpc: rpc_pb2.RPC) -> bytes:
        """The frame of ``rpc``, popped from a queue to be written: the cached one (and one
        holder less), or a new encoding."""
        entry = self._entry(rpc)
        if entry is None:
            self.encoded += 1
            body = rpc.SerializeToString()
            return encode_uvarint(len(body)) + body
        self.reused += 1
        entry[3] -= 1
        if entry[3] <= 0:
            del self._entries[id(rpc)]
            self._bytes -= len(entry[1])
        return cast(bytes, entry[1])


def _has_room(queue: RpcQueue | None) -> bool:
    """Whether ``queue`` takes one more RPC (RpcQueue keeps its bound on its inner queue)."""
    return queue is not None and not queue.closed and len(queue) < queue._queue.max_size


def _is_closed_nursery(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "closed to new arrivals" in str(exc)


async def _quiet_reset(stream: INetStream) -> None:
    try:
        await stream.reset()
    except Exception:
        logger.debug("stream reset failed", exc_info=True)
