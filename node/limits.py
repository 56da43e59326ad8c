"""Every size bound the node shell puts on what it sends and accepts, each with its reason.

The core's bounds (one op, parents, witnesses, versions) are in ``crdtbook._limits``; these are
the shell's, around them: gossip messages, sync frames, the control socket. They must agree
with the core's and with the network layer's, and ``tests/node/test_limits.py`` checks that
they do:

- a gossip message the node builds fits what pubsub carries (``MAX_GOSSIP_BYTES`` is
  ``node.p2p.NetworkConfig.max_message_size``), whatever the size of the ops in it;
- a sync frame holds at least one op of the largest size the core accepts;
- the Bloom filters the node's own requests carry fit the wire's bound, which is inside the
  core's (``BloomFilter`` takes up to 1 MiB; the wire takes less, since no honest request needs
  more and every byte of a request is read before it is judged).

Timeouts and intervals are not here: they are tunables of the module that waits (sync, gossip,
discovery), with the measurements that chose them.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BLOOM_RECENT_OPS",
    "GOSSIP_ENVELOPE_BYTES",
    "GOSSIP_OP_OVERHEAD",
    "MAX_AUTHORS",
    "MAX_BATCH_OPS",
    "MAX_BLOOM_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_GOSSIP_BYTES",
    "MAX_HELD",
    "MAX_IDS",
    "MAX_REQUEST_LINE_BYTES",
    "MAX_RESPONSE_LINE_BYTES",
    "MAX_WATCH_IDS",
]

# -- gossip ------------------------------------------------------------------------------------

#: One gossip message: pubsub's own cap (``node.p2p.NetworkConfig.max_message_size``, 1 MiB,
#: go-libp2p-pubsub's default too). A bigger one would be refused at publish, so the flush cuts
#: batches by bytes as well as by ops, and a received one over it is malformed.
MAX_GOSSIP_BYTES: Final = 1 << 20
#: Ops in one gossip batch or sync response: ~0.5 MB of typical ops, ~0.1 s to verify.
MAX_BATCH_OPS: Final = 2000
#: CBOR framing of a gossip batch ``[1, [op, ...]]``: the outer list, the version and the inner
#: list's header (at most 1 + 1 + 5 bytes), rounded up.
GOSSIP_ENVELOPE_BYTES: Final = 16
#: CBOR framing of one op in a batch: a byte string's header (3 bytes up to 65,535 bytes, which
#: covers MAX_OP_BYTES), rounded up.
GOSSIP_OP_OVERHEAD: Final = 5

# -- sync --------------------------------------------------------------------------------------

#: One sync frame (request or response). Responses are cut to stay under it; a request is a few
#: KB (heads, ids, two Bloom filters, author sequence numbers).
MAX_FRAME_BYTES: Final = 4 * 1024 * 1024
#: Heads and needed ids a request may name (a replica has at most a few dozen heads).
MAX_IDS: Final = 4096
#: Authors in a request's sequence summary (~45 bytes each: at most ~180 KB).
MAX_AUTHORS: Final = 4096
#: A Bloom filter in a request. The node's own cover at most MAX_HELD ids at 10 bits each
#: (~12 KB); the core accepts up to 1 MiB, which no request needs.
MAX_BLOOM_BYTES: Final = 64 * 1024
#: The requester's Bloom filter covers its newest ops in total order. A peer more than this far
#: behind (or ahead in another branch) is recognised through its heads instead.
BLOOM_RECENT_OPS: Final = 2048
#: Pending ops named in a request's held-ops Bloom filter (~12 KB at 10 bits each); the rest
#: may be sent again, which costs bandwidth, not correctness.
MAX_HELD: Final = 10_000

# -- control socket ----------------------------------------------------------------------------

#: Longest request line (bytes, without the newline) the control server reads: requests are
#: small (a submit is ~200 bytes), and a bound keeps a buggy or hostile client from making the
#: node buffer without limit.
MAX_REQUEST_LINE_BYTES: Final = 1 << 20
#: One response line the client accepts. Responses are not bounded by the protocol (a deep book
#: or a long fill history can be large); this only stops a runaway peer from exhausting memory.
MAX_RESPONSE_LINE_BYTES: Final = 64 << 20
#: Op ids a watcher may have queued between two reads; past it the oldest are dropped (the
#: watcher sees ``dropped`` > 0 and can re-read the state instead).
MAX_WATCH_IDS: Final = 10_000
