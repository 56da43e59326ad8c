"""A small reference matcher, written from the matching rules alone (not from ``_engine.py``).

It is deliberately naive: one plain list of resting orders in arrival order, priority found by
sorting that list for every taker, no price index, no undo. It trusts its input to be valid ops
(the replica's validity rules are tested elsewhere) and only does matching:

- ops are processed in the total order (Lamport time, op id);
- price-time priority: best price first, then earliest arrival at that price;
- every trade happens at the resting (maker) order's price;
- GTC: the remainder rests; IOC: the remainder expires (``ioc_remainder``);
- FOK: fills completely or not at all, and only other authors' resting quantity within the
  limit counts when deciding; if it cannot fill, nothing at all happens (``fok_unfillable``);
- POST_ONLY: if it would cross the book it is rejected (``post_only_would_take``), else it rests;
- cancel: removes the rest of a live order (``cancelled``); cancelling a finished order does
  nothing;
- self-trade prevention, "expire maker": a resting order of the taker's own author that the
  taker reaches expires (``self_trade``) and the taker goes on.

Version 2 (witnessed markets, ``client_ids=True``) adds:

- self-trade modes on the taker: ``expire_taker`` stops the taker at its own resting order (the
  taker's rest expires, ``self_trade``; the maker stays), ``expire_both`` expires both; a FOK
  with either mode counts only the other authors' quantity ahead of its own first order;
- client order ids: a tagged order whose (author, tag) an earlier order already holds is
  rejected (``duplicate_client_id``) and changes nothing;
- cancel-all: every resting order of the author (with a tag starting with the prefix, if one is
  given) is cancelled.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

LIVE = ("open", "partially_filled")


@dataclass
class RefOrder:
    id: bytes
    author: bytes
    side: str
    price: int
    quantity: int
    tif: str
    arrival: int
    tag: str | None = None
    remaining: int = 0
    filled: int = 0
    closed: int = 0
    status: str = "open"
    reason: str | None = None


@dataclass
class RefFill:
    taker: bytes
    maker: bytes
    price: int
    quantity: int
    taker_side: str
    taker_author: bytes
    maker_author: bytes


@dataclass
class RefBook:
    orders: dict[bytes, RefOrder] = field(default_factory=dict)
    resting: list[RefOrder] = field(default_factory=list)  # arrival order
    fills: list[RefFill] = field(default_factory=list)
    cancels: dict[bytes, bool] = field(default_factory=dict)
    arrivals: int = 0
    client_ids: bool = False
    held: set[tuple[bytes, str]] = field(default_factory=set)

    # -- matching ----------------------------------------------------------------------------

    def crosses(self, taker: RefOrder, maker: RefOrder) -> bool:
        if maker.side == taker.side:
            return False
        if taker.side == "buy":
            return maker.price <= taker.price
        return maker.price >= taker.price

    def priority(self, maker: RefOrder) -> tuple[int, int]:
        # Best price first (lowest ask, highest bid), then time.
        price = maker.price if maker.side == "sell" else -maker.price
        return (price, maker.arrival)

    def submit(
        self,
        op_id: bytes,
        author: bytes,
        side: str,
        price: int,
        quantity: int,
        tif: str,
        tag: str | None = None,
        stp: str = "expire_maker",
    ) -> None:
        taker = RefOrder(op_id, author, side, price, quantity, tif, self.arrivals, tag)
        self.arrivals += 1
        self.orders[op_id] = taker
        if self.client_ids and tag is not None:
            if (author, tag) in self.held:
                taker.status, taker.reason = "rejected", "duplicate_client_id"
                taker.closed = quantity
                return
            self.held.add((author, tag))
        candidates = sorted((o for o in self.resting if self.crosses(taker, o)), key=self.priority)

        if tif == "post_only" and candidates:
            taker.status, taker.reason, taker.closed = "rejected", "post_only_would_take", quantity
            return
        if tif == "fok":
            if stp == "expire_maker":
                available = sum(o.remaining for o in candidates if o.author != author)
            else:  # only what comes before its own first order
                available = 0
                for o in candidates:
                    if o.author == author:
                        break
                    available += o.remaining
            if available < quantity:
                taker.status, taker.reason, taker.closed = "expired", "fok_unfillable", quantity
                return

        left = quantity
        for maker in candidates:
            if left == 0:
                break
            if maker.author == author:
                if stp in ("expire_maker", "expire_both"):
                    maker.closed += maker.remaining
                    maker.remaining = 0
                    maker.status, maker.reason = "expired", "self_trade"
                    self.resting.remove(maker)
                if stp == "expire_maker":
                    continue
                taker.status, taker.reason, taker.closed = "expired", "self_trade", left
                return
            qty = min(left, maker.remaining)
            left -= qty
            taker.filled += qty
            maker.filled += qty
            maker.remaining -= qty
            self.fills.append(
                RefFill(op_id, maker.id, maker.price, qty, side, author, maker.author)
            )
            if maker.remaining == 0:
                maker.status = "filled"
                self.resting.remove(maker)
            else:
                maker.status = "partially_filled"

        assert tif != "fok" or left == 0, "a FOK that passed the check fills completely"
        if left == 0:
            taker.status = "filled"
        elif tif == "ioc":
            taker.status, taker.reason, taker.closed = "expired", "ioc_remainder", left
        else:  # gtc, post_only (a post_only that gets here crossed nothing)
            taker.remaining = left
            taker.status = "partially_filled" if taker.filled else "open"
            self.resting.append(taker)

    def cancel(self, cancel_id: bytes, order_id: bytes) -> None:
        order = self.orders[order_id]
        if order.status not in LIVE:
            self.cancels[cancel_id] = False
            return
        self.cancels[cancel_id] = True
        order.closed += order.remaining
        order.remaining = 0
        order.status, order.reason = "cancelled", "cancelled"
        self.resting.remove(order)

    def cancel_all(self, cancel_id: bytes, author: bytes, prefix: str | None) -> None:
        count = 0
        for order in list(self.resting):
            if order.author != author:
                continue
            if prefix is not None and (order.tag is None or not order.tag.startswith(prefix)):
                continue
            order.closed += order.remaining
            order.remaining = 0
            order.status, order.reason = "cancelled", "cancelled"
            self.resting.remove(order)
            count += 1
        self.cancels[cancel_id] = count > 0

    # -- views -------------------------------------------------------------------------------

    def levels(self, side: str) -> list[tuple[int, int, tuple[tuple[bytes, int], ...]]]:
        """(price, total remaining, ((order id, remaining), ...)) best first."""
        mine = sorted((o for o in self.resting if o.side == side), key=self.priority)
        out: list[tuple[int, int, tuple[tuple[bytes, int], ...]]] = []
        for o in mine:
            if out and out[-1][0] == o.price:
                price, total, orders = out[-1]
                out[-1] = (price, total + o.remaining, (*orders, (o.id, o.remaining)))
            else:
                out.append((o.price, o.remaining, ((o.id, o.remaining),)))
        return out


def replay(ops: Iterable[Any]) -> RefBook:
    """Sort ``ops`` (crdtbook ``Op`` objects) by (Lamport, id) and match them from nothing."""
    return replay_in_order(sorted(ops, key=lambda o: (o.lamport, o.id)))


def replay_in_order(ops: Iterable[Any], client_ids: bool = False) -> RefBook:
    """Match ``ops`` in the order given (a witnessed market's total order comes from its
    heartbeats; the reference takes it as given and does only matching)."""
    book = RefBook(client_ids=client_ids)
    for op in ops:
        body = op.body
        if op.kind == "order":
            book.submit(
                op.id, op.author, body.side, body.price, body.quantity, body.tif, body.tag,
                body.stp,
            )
        elif op.kind == "cancel":
            book.cancel(op.id, body.order_id)
        elif op.kind == "cancel_all":
            book.cancel_all(op.id, op.author, body.prefix)
    return book
