"""Bounds of the wire format, in one place.

Each limit is part of the protocol: a peer that exceeds one is refused by every replica alike, so
changing a value here is a protocol change (bump PROTOCOL_VERSION).
"""

from __future__ import annotations

__all__ = [
    "MAX_CLIENT_TAG_BYTES",
    "MAX_INT",
    "MAX_MARKET_NAME",
    "MAX_OP_BYTES",
    "MAX_PARENTS",
    "MAX_WITNESSES",
    "PROTOCOL_VERSION",
    "PROTOCOL_VERSIONS",
    "WITNESSED_VERSION",
]

#: The wire version of markets without witnesses (specs/protocol.md). Its ops, ids and vectors
#: never change.
PROTOCOL_VERSION = 1

#: The wire version of witnessed markets (specs/finality.md): version 1's ops plus heartbeats and
#: reconfigurations, and a total order in which fills become final.
WITNESSED_VERSION = 2

#: Every version this implementation reads and writes. A market speaks exactly one of them.
PROTOCOL_VERSIONS = (PROTOCOL_VERSION, WITNESSED_VERSION)

#: Witnesses of one market. Each must heartbeat for the frontier to move, so a market is run by a
#: handful of nodes (BFT deployments use 4-7). Ten keeps a reconfiguration that names them all
#: and carries their approvals (10 x 35 + 9 x 101 bytes) well inside MAX_OP_BYTES.
MAX_WITNESSES = 10

#: Prices, quantities, sequence numbers and Lamport times are positive integers below 2**63, so
#: every implementation can hold them in a signed 64-bit integer (CBOR itself allows 2**64 - 1).
MAX_INT = 2**63 - 1

#: A replica references every head it has; more than this many concurrent heads are referenced by
#: later ops. 64 x 35 bytes keeps even a maximal op near 2.5 KB.
MAX_PARENTS = 64

#: A client tag identifies an order to its owner's software (like FIX ClOrdID, 20-40 bytes in
#: practice). It is not for payloads.
MAX_CLIENT_TAG_BYTES = 32

#: An encoded op. A maximal op (64 parents, 32-byte tag) is about 2.5 KB; the rest is slack that
#: keeps decoders from ever allocating for attacker-declared lengths.
MAX_OP_BYTES = 4096

#: Market names are short tickers such as "BTC-USD".
MAX_MARKET_NAME = 32
