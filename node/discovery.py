"""Finding peers: the bootstrap addresses given on the command line, then the DHT.

Each market has a rendezvous key in the DHT (``crdtbook-market-<market id hex>``). The node
announces itself as a provider of each of its markets' keys and dials the providers it finds.
Rounds start fast (0.5 s, doubling) so a fresh network forms in seconds, then settle at
``DISCOVERY_INTERVAL``; the bootstrap peers are dialled again every round until they answer.

An unreachable bootstrap peer is logged at INFO, and once at WARNING after
``BOOTSTRAP_WARN_AFTER`` attempts (shown without -v: until it, or another peer, answers, this
node trades alone); a bug of ours is logged at ERROR. Nothing escapes the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import trio

from .network import Network

__all__ = ["BOOTSTRAP_WARN_AFTER", "DISCOVERY_INTERVAL", "Discovery", "rendezvous_key"]

logger = logging.getLogger("crdtbook.node")

#: Look for providers of our markets this often once settled (faster at start).
DISCOVERY_INTERVAL: Final = 10.0
#: The first round's wait; each round doubles it up to DISCOVERY_INTERVAL.
DISCOVERY_FIRST_DELAY: Final = 0.5
#: Connected to this many peers, a node looks for more only every SETTLED_SEARCH_INTERVAL. A
#: search asks most of the DHT's peers, and every node's searches reach every other node: in a
#: 20-node network, one search per node per 10 s was a third of an idle node's CPU (py-spy, issue
#: #12). A node with this many peers is in the gossip mesh already; newcomers find it themselves.
ENOUGH_PEERS: Final = 8
SETTLED_SEARCH_INTERVAL: Final = 60.0
#: With fewer peers: while the network forms, a node searches every round as long as its
#: searches find providers it was not connected to. A search that finds none doubles the wait
#: before the next (DISCOVERY_INTERVAL up to SETTLED_SEARCH_INTERVAL); one that finds a new one,
#: or losing a peer, starts over. A market's nodes find each other within a few rounds, and a
#: newcomer finds them itself (its own searches dial them). Searching every 10 s for ever made
#: each node of a 5-node network serve ~5 DHT requests a second, and in a 20-node network
#: forming, each node's search every round made the DHT ~10% of a node's CPU (issue #12).
QUIET_SEARCH_BACKOFF: Final = 2.0
#: Re-announce our markets in the DHT this often once settled (records expire; see
#: ``node.p2p_records``).
ANNOUNCE_INTERVAL: Final = 60.0
#: A bootstrap peer still unreachable after this many attempts gets a WARNING (shown without -v):
#: until it, or another peer, answers, this node trades alone.
BOOTSTRAP_WARN_AFTER: Final = 3


def rendezvous_key(market_id: bytes) -> str:
    """The DHT key under which a market's nodes announce themselves."""
    return f"crdtbook-market-{market_id.hex()}"


class Discovery:
    """Dials the bootstrap peers and the DHT's providers of our markets, round after round."""

    def __init__(
        self,
        net: Network,
        market_ids: Sequence[bytes],
        bootstrap: Sequence[str] = (),
        *,
        announce_interval: float = ANNOUNCE_INTERVAL,
    ) -> None:
        self.net = net
        self.keys = [rendezvous_key(market_id) for market_id in market_ids]
        self.bootstrap_addrs = list(bootstrap)
        self.announce_interval = announce_interval
        #: Bootstrap address -> (failed attempts in a row, why the first one failed).
        self._bootstrap_failures: dict[str, tuple[int, str]] = {}

    async def run(self) -> None:
        """Discovery rounds until cancelled."""
        delay = DISCOVERY_FIRST_DELAY
        last_announce = last_search = -1e9
        announced_to = 0  # peers connected at the last announcement
        search_wait = 0.0  # before the next search (settled nodes: SETTLED_SEARCH_INTERVAL)
        peers = 0
        while True:
            await self.bootstrap()
            now = trio.current_time()
            before, peers = peers, len(self.net.connected_peers())
            if peers < before:  # lost peers: look for others at the normal pace again
                search_wait = min(search_wait, DISCOVERY_INTERVAL)
            forming = delay < DISCOVERY_INTERVAL
            # While the network forms, announce again each time our peers have doubled (the
            # record then reaches more of the DHT); after that, once per announce_interval.
            due = now - last_announce >= self.announce_interval or (
                forming and peers >= max(1, 2 * announced_to)
            )
            if due and await self._announce():
                last_announce = now
                announced_to = peers
            settled = peers >= ENOUGH_PEERS
            if now - last_search >= (SETTLED_SEARCH_INTERVAL if settled else search_wait):
                # Found newcomers (there may be more), or had no peer to ask: try again soon.
                if await self._dial_providers() or peers == 0:
                    search_wait = 0.0 if forming else DISCOVERY_INTERVAL
                else:
                    search_wait = min(
                        SETTLED_SEARCH_INTERVAL,
                        max(DISCOVERY_INTERVAL, search_wait * QUIET_SEARCH_BACKOFF),
                    )
                last_search = now
            await trio.sleep(delay)
            delay = min(DISCOVERY_INTERVAL, delay * 2)

    async def _announce(self) -> bool:
        """Provide every market's key; True if at least one announcement went out."""
        from .p2p import P2PError

        announced = False
        for key in self.keys:
            try:
                await self.net.provide(key)
                announced = True
            except P2PError as exc:
                logger.debug("DHT provide failed: %r", exc)
            except Exception:
                logger.exception("DHT provide failed")
        return announced

    async def _dial_providers(self) -> int:
        """Search the DHT for our markets' providers and dial those we are not connected to;
        how many of them we connected to (a stale record of a node gone is no news)."""
        from .p2p import P2PError

        new = 0
        connected = set(self.net.connected_peers())
        for key in self.keys:
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
                        new += 1
                        logger.info("discovered and connected to %s", peer_id)
                        break
                    except P2PError as exc:  # includes a malformed address from the DHT
                        logger.debug("could not reach provider %s: %r", full, exc)
                    except Exception:
                        logger.exception("dialing provider %s failed", full)
        return new

    async def bootstrap(self) -> None:
        """Dial every bootstrap peer not connected yet (one attempt each)."""
        from .p2p import P2PError

        connected = set(self.net.connected_peers())
        for addr in self.bootstrap_addrs:
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
