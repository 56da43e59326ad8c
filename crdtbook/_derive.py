"""Deriving a point's prefix: the final fills and finished orders of the ops before a point.

A replica that compacts hands its node what leaves memory (``CompactReport``: the final fills
and the finished orders), and the node's store answers ``fills`` and ``order`` for them ever
after. A node that joined from a point state (``Replica.from_snapshot(..., history=False)``)
never had them: it holds the matched state at the point, not how it came about. Once it has the
prefix's ops (fetched and checked with ``HistoryCheck``), ``PrefixDerivation`` derives them the
way every compacting replica did: the final engine fed the prefix in total order.

``finish`` then checks the result against the point state: the op count and running hash of op
ids, the fill and order counts, and the resting orders (the point state's ``engine`` field,
byte for byte). A difference raises ``SnapshotRefused("inconsistent")``: the point is attested
and its ops chain to it, so this node would derive another past than the replicas that made it
(different code), and shows none of it.

Memory: the ops come in chunks and the rows leave in chunks (``take``). The engine lets go of
finished orders (``Engine.compacted``, O(orders held)) once it holds at least as many rows
beyond its resting orders as resting ones (and ``COMPACT_MIN_ROWS``), so each row costs O(1)
amortized; its records of cancels are dropped after each chunk (nothing here reads them). What
is held is O(resting orders + one chunk), plus, in a version 2 market, one entry per client
order id ever used (the engine must refuse a reused one). Cost: the final engine's own work per
op (no causal log, no signature check: the attested chain covers the bytes) plus one SHA-256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, Final

import cbor2

from ._engine import Engine, Fill
from ._market import Market
from ._ops import Op
from ._points import FINAL_CHAIN_DOMAIN, SnapshotRefused
from ._snapshot import engine_fields, read_fields
from ._state import OrderState, order_state

#: The engine compacts once it holds this many rows past its resting orders (or as many as it
#: has resting ones, if more): compacting walks every row it holds.
COMPACT_MIN_ROWS: Final = 4096


class PrefixDerivation:
    """Feed the ops of a point's prefix in total order (``feed``), take the derived rows as they
    come (``take``), then ``finish``. Not reusable."""

    def __init__(self, market: Market, blob: bytes) -> None:
        """``blob``: the point state the prefix ends at (``SnapshotRefused`` if it is not one
        of ``market``'s)."""
        fields = read_fields(market, blob)
        counts = fields["counts"]
        self.ops_expected, self.fills_expected, self.orders_expected = (
            int(counts[0]), int(counts[1]), int(counts[2]),
        )
        self._chain_expected = bytes(fields["chain"])
        self._engine_expected = _canonical(fields["engine"])
        self._engine = Engine(client_ids=market.witnessed)
        self._resting = 0  # rows the engine held after its last compaction
        self._fills_seen = 0  # of the engine's fills, those taken already
        self._chain = bytes(32)
        #: Ops fed, fills and orders taken so far.
        self.ops = 0
        self.fills = 0
        self.orders = 0

    def feed(self, ops: Iterable[Op]) -> None:
        """The next ops of the prefix, in total order (``SnapshotRefused`` past its count)."""
        engine, sha256, chain = self._engine, hashlib.sha256, self._chain
        process = engine.process
        for op in ops:
            if self.ops >= self.ops_expected:
                raise SnapshotRefused(
                    "inconsistent", f"the prefix goes on past the point's {self.ops_expected} ops"
                )
            process(op)
            chain = sha256(FINAL_CHAIN_DOMAIN + chain + op.id).digest()
            self.ops += 1
        self._chain = chain
        engine.tape.clear()  # nothing here is ever undone
        engine.cancels.clear()  # what each cancel did: views only (a flood of cancels
        engine.cancel_alls.clear()  # would otherwise grow them without a new order row)

    def take(self, *, all_orders: bool = False) -> tuple[int, list[Fill], list[OrderState]]:
        """The fills derived since the last take (with the global index of the first) and
        orders that finished (final: they are in the prefix), each once. Finished orders come
        when the engine compacts (see the module docstring), or with ``all_orders``. They are
        counted as ``Replica.compact`` counts them."""
        engine = self._engine
        start = self.fills
        fills = list(engine.fill_views(self._fills_seen))
        self.fills += len(fills)
        self._fills_seen = len(engine.fills)
        rows = len(engine.ids)
        if not all_orders and rows - self._resting < max(COMPACT_MIN_ROWS, self._resting):
            return start, fills, []
        kept = engine.compacted()
        finished = [order_state(engine.row(n), True) for n in engine.finished(rows, kept.orders)]
        self.orders += rows - len(kept.ids)
        self._engine = kept
        self._resting = len(kept.ids)
        self._fills_seen = 0
        return start, fills, finished

    def finish(self) -> tuple[int, list[Fill], list[OrderState]]:
        """The last rows (``take``), once the whole prefix was fed and its result is the point
        state's; else ``SnapshotRefused("inconsistent")`` saying what differs."""
        last = self.take(all_orders=True)
        wrong = []
        if self.ops != self.ops_expected:
            wrong.append(f"{self.ops} ops where the point has {self.ops_expected}")
        elif self._chain != self._chain_expected:
            wrong.append("the ops' running hash is not the point's")
        if self.fills != self.fills_expected:
            wrong.append(f"{self.fills} fills where the point counts {self.fills_expected}")
        if self.orders != self.orders_expected:
            wrong.append(f"{self.orders} orders where the point counts {self.orders_expected}")
        if _canonical(engine_fields(self._engine)) != self._engine_expected:
            wrong.append("the resting orders are not the point state's")
        if wrong:
            raise SnapshotRefused("inconsistent", "derived from the history: " + "; ".join(wrong))
        return last


def _canonical(value: Any) -> bytes:
    return bytes(cbor2.dumps(value, canonical=True))
