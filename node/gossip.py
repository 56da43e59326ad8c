"""Gossip wiring: each market's gossipsub topic joined to the service's ingest and outbox.

Inbound, the network calls each topic's validator with every message a neighbour forwards;
``NodeService.validate_gossip`` ingests it there (decode, verify, judge, persist, queue) and
answers accept or reject, so a message is forwarded only once it is durable here. A rejection
counts against the forwarder; past ``BAN_THRESHOLD`` refusals the forwarder is banned for
``BAN_SECONDS`` (``NodeService.should_ban`` keeps the count, this module applies it).

Outbound, the service's flush loop publishes each market's batched own ops (``flush_loop``);
at shutdown :meth:`Gossip.flush_all` sends what is still queued.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    # trio-typing (a dependency of libp2p) installs trio-stubs, which shadow trio's own
    # annotations for mypy; as in node.control, its TaskStatus is the one to name.
    from trio_typing import TaskStatus

from .network import Network, Validator
from .service import BAN_SECONDS, MarketState, NodeService

__all__ = ["FLUSH_AT_EXIT_TIMEOUT", "Gossip"]

logger = logging.getLogger("crdtbook.node")

#: At shutdown, each market's last batch gets this long to leave (a peer that does not read
#: must not hold the stop up; sync delivers whatever this misses once the node is back).
FLUSH_AT_EXIT_TIMEOUT: Final = 2.0


class Gossip:
    """Joins every market's topic: validator, subscription and flush loop."""

    def __init__(self, service: NodeService, net: Network) -> None:
        self.service = service
        self.net = net

    async def run(self, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe to every market's topic and publish its outbox until cancelled; started
        (``nursery.start``) once every topic is joined."""
        self.net.on_reject(self.on_reject)
        async with trio.open_nursery() as nursery:
            for ms in self.service.markets.values():
                self.net.set_validator(ms.topic, self.validator(ms))
                # The validator ingests every message: the topic is joined without a channel.
                await self.net.join(ms.topic)
                nursery.start_soon(
                    self.service.flush_loop,
                    ms,
                    self.net.publish,
                    lambda topic: len(self.net.gossip_peers(topic)),
                )
            task_status.started()

    async def flush_all(self) -> None:
        """Publish what every outbox still holds (at shutdown), each bounded."""
        for ms in self.service.markets.values():
            with trio.move_on_after(FLUSH_AT_EXIT_TIMEOUT):
                await self.service.flush(ms, self.net.publish)

    def validator(self, ms: MarketState) -> Validator:
        """The topic's validator: ingest the message, accept it if every op in it is valid."""

        async def validate(data: bytes, from_peer: str) -> bool:
            return await self.service.validate_gossip(ms, data, from_peer)

        return validate

    def on_reject(self, peer_id: str, reason: str) -> None:
        """The network refused data from ``peer_id``: ban it once it did so too often."""
        if self.service.should_ban(peer_id):
            logger.warning(
                "banning peer %s for %.0f s: repeated invalid data", peer_id, BAN_SECONDS
            )
            try:
                self.net.ban(peer_id, BAN_SECONDS)
            except Exception:  # a ban is best effort; never let policy crash the node
                logger.exception("could not ban %s", peer_id)
