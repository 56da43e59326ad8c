"""The summary line a running node prints on stdout once a minute: peers, and per market its
ops, pending ops, fills and digest prefix (what an operator compares across nodes at a glance).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

import trio

from .network import Network
from .service import NodeService

__all__ = ["SUMMARY_INTERVAL", "summary_line", "summary_loop"]

#: Often enough to see a node is alive and converging; rare enough not to fill a log.
SUMMARY_INTERVAL: Final = 60.0


def summary_line(service: NodeService, peers: int, now: float | None = None) -> str:
    """``[HH:MM:SS] peers=N MARKET ops=.. pending=.. fills=.. digest=<12 hex> ...``."""
    parts = [
        f"{ms.market.name} ops={len(ms.replica)} pending={ms.replica.pending_count} "
        f"fills={ms.replica.fill_count} digest={ms.digest().hex()[:12]}"
        for ms in service.markets.values()
    ]
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    return f"[{stamp}] peers={peers} " + " ".join(parts)


async def summary_loop(
    service: NodeService,
    net: Network,
    say: Callable[[str], None],
    interval: float = SUMMARY_INTERVAL,
) -> None:
    """Print ``summary_line`` every ``interval`` seconds until cancelled."""
    while True:
        await trio.sleep(interval)
        say(summary_line(service, len(net.connected_peers())))
