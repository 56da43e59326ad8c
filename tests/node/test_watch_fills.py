"""``WatchedFills`` (node/handler.py), what a watch stream reports of fills, against the plain
reference it replaced (kept here): the same answers and the same remembered fills after every
delivery, on logs that arrive out of order (late ops rewind the matching and revoke provisional
fills), with witnesses (fills turn final) and without, with the provisional memory cut to a few
fills so that its trimming runs all the time.

The reference scanned and sorted every provisional fill it held on each update (up to
WATCH_PROVISIONAL_MAX, for ever in a market without witnesses); the node's keeps their indexes
sorted and touches only the new, changed and dropped ones.
"""

from __future__ import annotations

import random

import pytest

import crdtbook.node.handler as handler_module
from crdtbook import Fill, Identity, Market, Op, Replica
from crdtbook.node.handler import WatchedFills
from crdtbook.node.service import MarketState, topic_for

from .test_hostile_inputs import V1, V2, W1, W2, W3

AUTHORS = [Identity.from_seed(bytes([0x30 + i]) * 32) for i in range(4)]


class ReferenceFills:
    """WatchedFills as it was (the behaviour the node's version must keep)."""

    def __init__(self, ms: MarketState) -> None:
        self.ms = ms
        replica = ms.replica
        self.replica = replica
        _, self.token = replica.fill_changes_since(None)
        self.seen = replica.fill_count
        self.final = replica.final_fill_count()
        low = max(self.final, self.seen - handler_module.WATCH_PROVISIONAL_MAX)
        self.provisional: dict[int, Fill] = {
            low + i: fill for i, fill in enumerate(ms.fill_list(low))
        }

    def update(self) -> tuple[list[tuple[int, Fill]], list[tuple[int, Fill]], list[int]]:
        replica = self.ms.replica
        count = replica.fill_count
        final = min(count, max(self.final, replica.final_fill_count()))
        known = self.provisional
        token = self.token if replica is self.replica else None
        changed, self.token = replica.fill_changes_since(token)
        self.replica = replica
        first_changed = count if changed is None else changed
        low = min(self.seen, count, max(min(known, default=count), first_changed))
        current = self.ms.fill_list(low)
        revoked = [
            (i, fill)
            for i, fill in sorted(known.items())
            if i >= low and (i >= count or current[i - low] != fill)
        ]
        start = min(self.seen, count)
        if revoked:
            start = min(start, revoked[0][0])
        fills = [(i, current[i - low]) for i in range(start, count)]
        became_final = list(range(self.final, min(final, start)))
        for i in [i for i in known if i < final or i >= count]:
            del known[i]
        for i, fill in fills:
            if i >= final:
                known[i] = fill
        limit = handler_module.WATCH_PROVISIONAL_MAX
        if len(known) > limit:
            for i in sorted(known)[: len(known) - limit]:
                del known[i]
        self.seen, self.final = count, final
        return fills, revoked, became_final


def authored(market: Market, count: int, seed: int) -> list[Op]:
    """``count`` ops by four traders, each on a replica of its own that hears the others' ops
    only every few ops (so many ops are concurrent, and one that arrives late can sort before
    fills already made), crossing often; in a witnessed market each witness heartbeats every
    few ops from a replica that has heard everything. In the order they were made."""
    rng = random.Random(seed)
    sources = [Replica(market) for _ in AUTHORS]
    witness = Replica(market)
    ops: list[Op] = []
    for n in range(count):
        who = rng.randrange(len(AUTHORS))
        side = rng.choice(("buy", "sell"))
        price = rng.randint(95, 101) if side == "buy" else rng.randint(99, 105)
        ops.append(sources[who].submit(AUTHORS[who], side, price, rng.randint(1, 5)))
        if n % 6 == 5:  # everyone hears everything
            for replica in [*sources, witness]:
                replica.apply_many(ops)
            if market.witnessed:
                for w in (W1, W2, W3):
                    ops.append(witness.heartbeat(w, time_ms=n))
    return ops


@pytest.mark.parametrize("market", [V1, V2], ids=["no-witnesses", "witnessed"])
@pytest.mark.parametrize("limit", [1000, 5], ids=["max", "trimmed"])
@pytest.mark.parametrize("seed", range(6))
def test_watched_fills_answer_as_the_reference_did(
    market: Market, limit: int, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handler_module, "WATCH_PROVISIONAL_MAX", limit)
    rng = random.Random(seed)
    ops = authored(market, 160, seed)
    # Delivered out of order: each op some steps after it was made (a replica buffers an op
    # whose parents have not arrived), so a late op can sort before fills already made and
    # revoke them.
    arrival = sorted(range(len(ops)), key=lambda n: n + rng.choice((0, 0, 3, 12)))
    deliveries: list[list[Op]] = []
    while arrival:
        size = rng.randint(1, 6)
        deliveries.append([ops[n] for n in arrival[:size]])
        del arrival[:size]
    replica = Replica(market)
    ms = MarketState(market, replica, topic_for(market))
    replica.apply_many(deliveries[0])
    ours, reference = WatchedFills(ms), ReferenceFills(ms)
    revoked_seen = 0
    for batch in deliveries[1:]:
        replica.apply_many(batch)
        got, want = ours.update(), reference.update()
        assert got == want
        assert ours.provisional == reference.provisional
        assert list(ours.provisional) == sorted(ours.provisional) == ours.indexes
        assert (ours.seen, ours.final) == (reference.seen, reference.final)
        revoked_seen += len(got[1])
    assert len(replica) == len(ops)
    assert ours.update() == reference.update()
    if market.witnessed:
        assert replica.final_fill_count() > 0
    assert revoked_seen or seed  # the first seed at least exercises revocations
