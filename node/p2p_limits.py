"""Bounds py-libp2p 0.8.1 lacks on what a peer may make it read before authentication.

Private helper of :mod:`crdtbook.node.p2p` (the only other module allowed to import libp2p).

**Multistream-select messages are read without a cap.** Every connection starts with a
multistream-select negotiation of the security protocol, on the raw TCP socket, before Noise has
authenticated anyone; every stream starts with another one. py-libp2p 0.8.1 reads each of its
messages with ``read_delim``: a varint length, then ``read_exactly(length)``, which buffers up to
101 socket reads of whatever the peer sends (each ``recv`` asks the kernel for ``length`` bytes).
Measured on this machine (2 cores, tcp_rmem max 32 MiB), against a stock ``open_network``: one raw
TCP client announcing 2**30 bytes pushed 177 MB into the node (RSS 83 -> 244 MB) before the read
gave up; twenty such clients took it to 1.26 GB within 8 s, and a connection needs no key, no
peer id and no handshake (``tests/node/test_p2p_limits.py`` reproduces it). The fix
published after 0.8.1 caps these reads; 0.8.2 is not on the package registry, so the cap is
installed here, where the library looks the function up.

A multistream-select message is a protocol id or ``na``/``ls`` plus a newline. Other
implementations refuse more than 1 KiB (go-multistream) or 16 KiB (rust-libp2p); this node
speaks a handful of protocol ids of under 40 bytes and never sends ``ls``. A longer message is
refused before its body is read (``MessageTooLarge``, which the library's communicator turns into
a failed negotiation: the connection or stream is closed).

**One address can hold every inbound slot.** The swarm admits at most 250 inbound connections
(``max_connections - min_connections``) and keeps a slot for as long as the security and muxer
upgrade runs (up to ``inbound_upgrade_timeout``, 10 s), whoever the peer is. Measured: 300 idle
TCP connections from one client, which never send a byte, made every honest dial to the node fail
(``failed to negotiate the secure protocol``) until they were closed; reopened every 10 s they
lock the node out of new peers for good. Here, each remote IP address may have at most
``MAX_PENDING_UPGRADES_PER_IP`` connections still being upgraded; past that a new one is closed at
once, so a single address can take a few slots, never all. (An attacker with many addresses, or
many keys that complete the handshake, still meets only the library's global bounds.)
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Final

import libp2p.protocol_muxer.multiselect_communicator as communicator_module
from libp2p.abc import IMuxedConn, IRawConnection
from libp2p.exceptions import ParseError
from libp2p.io.abc import Reader
from libp2p.network.exceptions import SwarmException
from libp2p.network.swarm import Swarm
from libp2p.utils.varint import read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

__all__ = ["MAX_MULTISELECT_MESSAGE", "MAX_PENDING_UPGRADES_PER_IP", "install", "uninstall"]

logger = logging.getLogger(__name__)

#: Longest multistream-select message accepted, newline included (go-multistream's bound).
MAX_MULTISELECT_MESSAGE: Final = 1024
#: Inbound connections from one IP address still in the security/muxer upgrade. An honest peer
#: has one at a time (one connection per peer); a few peers behind one NAT still fit.
MAX_PENDING_UPGRADES_PER_IP: Final = 16

_Upgrade = Callable[[Swarm, IRawConnection, Multiaddr], Awaitable[IMuxedConn]]
_library_upgrade: _Upgrade = Swarm.upgrade_inbound_raw_conn
_pending: weakref.WeakKeyDictionary[Swarm, Counter[str]] = weakref.WeakKeyDictionary()


async def read_delim_capped(reader: Reader) -> bytes:
    """``libp2p.utils.varint.read_delim`` with the length checked before the body is read."""
    msg = await read_varint_prefixed_bytes_limited(reader, MAX_MULTISELECT_MESSAGE)
    if not msg:
        raise ParseError("empty multistream-select message")
    if msg[-1:] != b"\n":
        raise ParseError("multistream-select message is not newline-terminated")
    return msg[:-1]


def _remote_ip(raw_conn: Any) -> str:
    try:
        address = raw_conn.get_remote_address()
    except Exception:  # a transport without addresses: all such share one budget
        return "?"
    return str(address[0]) if address else "?"


async def upgrade_inbound_capped(
    swarm: Swarm, raw_conn: IRawConnection, maddr: Multiaddr
) -> IMuxedConn:
    """``Swarm.upgrade_inbound_raw_conn``, refused at once when the remote address already has
    ``MAX_PENDING_UPGRADES_PER_IP`` upgrades under way (the caller closes the connection)."""
    pending = _pending.setdefault(swarm, Counter())
    ip = _remote_ip(raw_conn)
    if pending[ip] >= MAX_PENDING_UPGRADES_PER_IP:
        logger.debug("refusing an inbound connection from %s: too many being upgraded", ip)
        await raw_conn.close()
        raise SwarmException(f"too many unauthenticated connections from {ip}")
    pending[ip] += 1
    try:
        return await _library_upgrade(swarm, raw_conn, maddr)
    finally:
        pending[ip] -= 1
        if pending[ip] <= 0:
            del pending[ip]


def pending_upgrades(swarm: Swarm) -> dict[str, int]:
    """Inbound upgrades under way per remote IP address (for tests and status)."""
    return dict(_pending.get(swarm, {}))


def install() -> None:
    """Install both bounds where the library looks them up (idempotent)."""
    current = getattr(communicator_module, "read_delim")  # noqa: B009 - not re-exported
    if current is not read_delim_capped:
        read_delim_capped._crdtbook_original = current  # type: ignore[attr-defined]
        setattr(communicator_module, "read_delim", read_delim_capped)  # noqa: B010
    setattr(Swarm, "upgrade_inbound_raw_conn", upgrade_inbound_capped)  # noqa: B010


def uninstall() -> None:
    """Give the library its own code back (for tests that show the stock behaviour)."""
    original = getattr(read_delim_capped, "_crdtbook_original", None)
    if original is not None:
        setattr(communicator_module, "read_delim", original)  # noqa: B010
    setattr(Swarm, "upgrade_inbound_raw_conn", _library_upgrade)  # noqa: B010
