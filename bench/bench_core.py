"""Core benchmark of crdtbook: derivation speed, verification, late ops, memory, and a plain book.

    python bench/bench_core.py [--ops N] [--quick] [--json] [--seed S] [--clock cpu|wall]
                               [--profile]

Every figure and its baseline are measured in the same run, on the same machine, so ratios mean
something even on a noisy host. What is measured (see bench/README.md for the details):

1. a deterministic exchange-like workload, authored through ``crdtbook.Replica.submit``/``cancel``
   (so the ops are real signed ops), then re-applied;
2. in-order derivation without verification: ``Replica.apply(op)`` and ``apply_many`` (batches of
   1000) with decoded ``Op`` objects, in total order;
3. in-order derivation with verification: ``Replica.apply(op.raw)``, against raw ed25519 verify
   (``nacl.bindings.crypto_sign_open``) of the same ops;
4. ``crdtbook.decode`` with and without the signature check;
5. the cost of one late op at depth 10 .. 10,000 in a 200k-op log (and depth 100 in a 20k log);
6. memory per op held (tracemalloc), Op objects vs replica overhead;
7. the same orders and cancels through a plain sortedcontainers price-time book (no CRDT layer).

The bench reads nothing but the public API, except ``crdtbook._ops.sign_op`` (to build late ops
with a chosen Lamport time) and, for the memory breakdown only, the replica's private containers.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import nacl.bindings
from sortedcontainers import SortedDict

import crdtbook
from crdtbook import Identity, Market, Op, OrderBody, Replica, decode
from crdtbook._ops import SIGNATURE_DOMAIN, sign_op

# -- settings -------------------------------------------------------------------------------------

SEED = 20240601
AUTHORS = 20
MID = 100_000  # ticks: 1000.00 in a 0.01-tick market
MARKET = Market("BENCH-USD", "0.01", "0.0001")

# Op mix (fractions of all ops) and time-in-force mix.
P_CANCEL = 0.15
P_CROSS = 0.30  # orders priced through the opposite touch when they are submitted
P_IOC_CROSS, P_FOK_CROSS, P_POST_CROSS = 0.20, 0.05, 0.02  # of crossing orders
P_POST_PASSIVE, P_IOC_PASSIVE = 0.05, 0.02  # of passive orders

BATCH = 1000  # apply_many batch size

# Targets from the brief.
TARGET_OPS_PER_S = 200_000
TARGET_VERIFY_RATIO = 0.80
TARGET_BYTES_PER_OP = 1024
TARGET_BASELINE_RATIO = 3.0
TARGET_LOG_SIZE_RATIO = 1.5  # depth-100 cost in the big log / in the small log


@dataclass(frozen=True)
class Profile:
    ops: int  # ops measured by the throughput sections
    verify_ops: int  # ops measured by the verifying sections (ed25519 dominates: fewer)
    memory_ops: int  # ops held by the tracemalloc'd replica
    late_log: int  # the big log of the late-op section
    small_log: int  # the small log it is compared against at depth 100
    depths: tuple[int, ...]
    reps: int  # repetitions of the interleaved throughput runs (the best rep counts)
    chunk: int  # ops per timed chunk, throughput sections
    verify_chunk: int  # ops per timed chunk, verifying sections


FULL = Profile(200_000, 30_000, 50_000, 200_000, 20_000, (10, 100, 1_000, 10_000), 3, 10_000, 2_000)
QUICK = Profile(20_000, 6_000, 20_000, 20_000, 2_000, (10, 100, 1_000), 3, 2_000, 1_000)


#: The timer of every measurement: this process's CPU time by default, so that other processes
#: on a shared machine inflate the figures far less than they would wall-clock time.
#: ``--clock wall`` switches to time.perf_counter.
clock: Callable[[], float] = time.process_time


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- plain book: the baseline ---------------------------------------------------------------------

BUY, SELL = 0, 1
GTC, IOC, FOK, POST_ONLY = range(4)
TIF_NAMES = ("gtc", "ioc", "fok", "post_only")


class PlainOrder:
    __slots__ = ("author", "oid", "price", "remaining", "side")

    def __init__(self, oid: int, author: int, side: int, price: int, remaining: int) -> None:
        self.oid = oid
        self.author = author
        self.side = side
        self.price = price
        self.remaining = remaining


class PlainBook:
    """A simple price-time matching book with the engine's rules and no CRDT layer: no log, no
    signatures, no validity, no undo journal. SortedDict price -> deque, dict of resting orders.

    Rules (as crdtbook's engine): trade at the maker's price, partial fills, GTC rests, IOC
    remainder expires, FOK fills completely (other authors' liquidity) or expires, POST_ONLY that
    would take is rejected, self-trade prevention expires the resting order.
    """

    def __init__(self, record_fills: bool = False) -> None:
        self.sides: tuple[SortedDict, SortedDict] = (SortedDict(), SortedDict())
        self.resting: dict[int, PlainOrder] = {}
        self.fill_count = 0
        self.fill_quantity = 0
        self.fills: list[tuple[int, int, int, int]] | None = [] if record_fills else None

    def best(self, side: int) -> int | None:
        levels = self.sides[side]
        if not levels:
            return None
        price: int = levels.peekitem(-1 if side == BUY else 0)[0]
        return price

    def order(self, oid: int, author: int, side: int, price: int, qty: int, tif: int) -> None:
        opp = self.sides[1 - side]
        crosses = False
        if opp:
            best = opp.peekitem(0 if side == BUY else -1)[0]
            crosses = best <= price if side == BUY else best >= price
        if not crosses:
            if tif in (GTC, POST_ONLY):
                self._rest(oid, author, side, price, qty)
            return  # IOC / FOK with nothing to take: expired
        if tif == POST_ONLY:
            return  # rejected
        if tif == FOK and not self._can_fill(author, side, price, qty):
            return
        remaining = self._match(oid, author, side, price, qty)
        if remaining and tif == GTC:
            self._rest(oid, author, side, price, remaining)

    def _rest(self, oid: int, author: int, side: int, price: int, qty: int) -> None:
        order = PlainOrder(oid, author, side, price, qty)
        levels = self.sides[side]
        level = levels.get(price)
        if level is None:
            level = levels[price] = deque()
        level.append(order)
        self.resting[oid] = order

    def _can_fill(self, author: int, side: int, price: int, qty: int) -> bool:
        opp = self.sides[1 - side]
        keys = opp.keys() if side == BUY else reversed(opp.keys())
        for level_price in keys:
            if (level_price > price) if side == BUY else (level_price < price):
                break
            for maker in opp[level_price]:
                if maker.author != author:
                    qty -= maker.remaining
                    if qty <= 0:
                        return True
        return False

    def _match(self, oid: int, author: int, side: int, price: int, qty: int) -> int:
        opp = self.sides[1 - side]
        index = 0 if side == BUY else -1
        resting = self.resting
        fills = self.fills
        while qty and opp:
            level_price, level = opp.peekitem(index)
            if (level_price > price) if side == BUY else (level_price < price):
                break
            maker = level[0]
            if maker.author == author:  # self-trade prevention: expire the maker
                maker.remaining = 0
            else:
                traded = min(qty, maker.remaining)
                qty -= traded
                maker.remaining -= traded
                self.fill_count += 1
                self.fill_quantity += traded
                if fills is not None:
                    fills.append((oid, maker.oid, level_price, traded))
            if maker.remaining == 0:
                level.popleft()
                del resting[maker.oid]
                if not level:
                    del opp[level_price]
        return qty

    def cancel(self, oid: int) -> None:
        order = self.resting.pop(oid, None)
        if order is None:
            return  # already filled, expired or cancelled
        levels = self.sides[order.side]
        level = levels[order.price]
        level.remove(order)
        if not level:
            del levels[order.price]


def run_plain(script: Sequence[tuple[Any, ...]], book: PlainBook | None = None) -> PlainBook:
    book = PlainBook() if book is None else book
    order = book.order
    cancel = book.cancel
    for step in script:
        if step[0] == 0:
            order(*step[1:])
        else:
            cancel(step[1])
    return book


# -- workload -------------------------------------------------------------------------------------


@dataclass
class Workload:
    ops: list[Op]  # in total order
    script: list[tuple[Any, ...]]  # the same orders and cancels for the plain book
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    digest: bytes = b""
    fills: int = 0


def identities(count: int, label: str) -> list[Identity]:
    return [
        Identity.from_seed(hashlib.sha256(f"crdtbook-bench/{label}/{i}".encode()).digest())
        for i in range(count)
    ]


def generate(count: int, seed: int) -> Workload:
    """Author ``count`` ops through one Replica (so they are real signed ops, valid and in total
    order), mirroring every order and cancel into a plain book, which gives the touch and each
    author's open orders to the generator."""
    rng = random.Random(seed)
    authors = identities(AUTHORS, "author")
    replica = Replica(MARKET)
    mirror = PlainBook(record_fills=True)
    script: list[tuple[Any, ...]] = []
    op_ids: list[bytes] = []  # script index -> op id
    open_by_author: list[list[int]] = [[] for _ in authors]  # script indices of rested orders
    counts = dict.fromkeys(("cancel", "cross", "passive", "gtc", "ioc", "fok", "post_only"), 0)
    started = time.perf_counter()
    for index in range(count):
        who = rng.randrange(AUTHORS)
        identity = authors[who]
        roll = rng.random()
        if roll < P_CANCEL:
            target = pick_open(rng, open_by_author[who], mirror)
            if target is not None:
                op = replica.cancel(identity, op_ids[target])
                script.append((1, target))
                mirror.cancel(target)
                op_ids.append(op.id)
                counts["cancel"] += 1
                continue
            roll = 1.0  # nothing to cancel: a passive order instead
        side = rng.randrange(2)
        best_bid, best_ask = mirror.best(BUY), mirror.best(SELL)
        opposite = best_ask if side == BUY else best_bid
        if roll < P_CANCEL + P_CROSS and opposite is not None:
            through = rng.randint(0, 3)
            price = opposite + through if side == BUY else opposite - through
            qty = rng.randint(1, 60) if rng.random() < 0.65 else rng.randint(60, 300)
            tif_roll = rng.random()
            if tif_roll < P_IOC_CROSS:
                tif = IOC
            elif tif_roll < P_IOC_CROSS + P_FOK_CROSS:
                tif = FOK
            elif tif_roll < P_IOC_CROSS + P_FOK_CROSS + P_POST_CROSS:
                tif = POST_ONLY
            else:
                tif = GTC
            counts["cross"] += 1
        else:
            behind = min(int(rng.expovariate(1 / 6)), 100)
            if side == BUY:
                ceiling = best_ask - 1 if best_ask is not None else MID - 1
                anchor = best_bid if best_bid is not None else ceiling
                price = min(ceiling, anchor + 1 - behind)
            else:
                floor = best_bid + 1 if best_bid is not None else MID + 1
                anchor = best_ask if best_ask is not None else floor
                price = max(floor, anchor - 1 + behind)
            price = max(price, 1)
            qty = rng.randint(1, 100)
            tif_roll = rng.random()
            if tif_roll < P_POST_PASSIVE:
                tif = POST_ONLY
            elif tif_roll < P_POST_PASSIVE + P_IOC_PASSIVE:
                tif = IOC
            else:
                tif = GTC
            counts["passive"] += 1
        counts[TIF_NAMES[tif]] += 1
        op = replica.submit(identity, "buy" if side == BUY else "sell", price, qty, TIF_NAMES[tif])
        script.append((0, index, who, side, price, qty, tif))
        mirror.order(index, who, side, price, qty, tif)
        op_ids.append(op.id)
        if index in mirror.resting:
            open_by_author[who].append(index)
        if index and index % 50_000 == 0:
            log(f"  generated {index:,} ops")
    seconds = time.perf_counter() - started
    authored = replica.ops()
    assert [op.id for op in authored] == op_ids, "one replica authored all: same order as total"
    # Decoded afresh, in one go, the way a node decodes a batch before applying it (and so
    # laid out in memory like one, not scattered among the authoring's garbage).
    ops = [decode(op.raw, verify=False) for op in authored]
    del authored
    # The plain book must do the same matching work as the replica: same fills, same order.
    position = {ident: i for i, ident in enumerate(op_ids)}
    replica_fills = [
        (position[f.taker], position[f.maker], f.price, f.quantity) for f in replica.fills()
    ]
    assert mirror.fills == replica_fills, "plain book and replica disagree on the fills"
    bids, asks = mirror.sides
    stats = {
        "ops": count,
        "authors": AUTHORS,
        "cancels": counts["cancel"] / count,
        "crossing": counts["cross"] / count,
        "passive": counts["passive"] / count,
        "ioc": counts["ioc"] / count,
        "fok": counts["fok"] / count,
        "post_only": counts["post_only"] / count,
        "fills": replica.fill_count,
        "resting_orders_at_end": len(mirror.resting),
        "levels_at_end": len(bids) + len(asks),
        "mean_op_bytes": sum(len(op.raw) for op in ops) / count,
    }
    return Workload(ops, script, seconds, stats, replica.digest(), replica.fill_count)


def pick_open(rng: random.Random, candidates: list[int], mirror: PlainBook) -> int | None:
    """One of the author's resting orders: mostly its oldest (stale quotes get pulled),
    else any."""
    while candidates:
        i = 0 if rng.random() < 0.8 else rng.randrange(len(candidates))
        target = candidates[i]
        if target in mirror.resting:
            return target
        del candidates[i]  # filled or expired meanwhile: forget it
    return None


# -- measuring helpers ----------------------------------------------------------------------------


def quiesce() -> None:
    """Collect, then move every live object to the permanent GC generation, so a phase pays
    cyclic-GC traversal for its own new objects only, not for earlier phases' leftovers."""
    gc.collect()
    gc.freeze()


Step = Callable[[int, int], None]  # process items [start, stop) of the workload


@dataclass
class Lane:
    """One thing being timed: ``make`` gives fresh state for a rep and the chunk stepper."""

    name: str
    make: Callable[[], tuple[Any, Step]]


def interleave(
    lanes: Sequence[Lane],
    total: int,
    chunk: int,
    reps: int,
    totals: dict[str, list[float]],
) -> dict[str, Any]:
    """Run the lanes chunk by chunk, alternating between them, ``reps`` times, and append each
    rep's total time per lane to ``totals``. Things compared chunk by chunk see the same
    background load, so their ratio holds on a busy machine; a figure is a lane's best rep.

    (Not the sum of per-chunk minima: the cyclic GC's full collections are lumpy, hundreds of
    ms each at 200k ops, and fall on different chunks in different reps, so per-chunk minima
    would quietly drop most of them.)

    Returns the lanes' states after the last rep."""
    states: dict[str, Any] = {}
    for _ in range(reps):
        states.clear()
        steps: dict[str, Step] = {}
        quiesce()
        for lane in lanes:
            states[lane.name], steps[lane.name] = lane.make()
        spent = dict.fromkeys(steps, 0.0)
        for start in range(0, total, chunk):
            stop = min(start + chunk, total)
            for lane in lanes:
                began = clock()
                steps[lane.name](start, stop)
                spent[lane.name] += clock() - began
        for name, seconds in spent.items():
            totals.setdefault(name, []).append(seconds)
    return states


def lane_apply(name: str, items: Sequence[Op | bytes]) -> Lane:
    def make() -> tuple[Replica, Step]:
        replica = Replica(MARKET)
        apply = replica.apply

        def step(start: int, stop: int) -> None:
            for item in items[start:stop]:
                apply(item)

        return replica, step

    return Lane(name, make)


def lane_apply_node_gc(name: str, items: Sequence[Op | bytes]) -> Lane:
    """apply(Op) under the node's GC policy: every GC_FREEZE_EVERY applied ops, collect and
    freeze (crdtbook.node.service.NodeService.note_applied)."""
    from crdtbook.node.service import GC_FREEZE_EVERY

    def make() -> tuple[Replica, Step]:
        replica = Replica(MARKET)
        apply = replica.apply
        since = [0]

        def step(start: int, stop: int) -> None:
            for item in items[start:stop]:
                apply(item)
            since[0] += stop - start
            if since[0] >= GC_FREEZE_EVERY:
                since[0] = 0
                gc.collect()
                gc.freeze()

        return replica, step

    return Lane(name, make)


def lane_apply_many(name: str, items: Sequence[Op | bytes]) -> Lane:
    def make() -> tuple[Replica, Step]:
        replica = Replica(MARKET)
        apply_many = replica.apply_many

        def step(start: int, stop: int) -> None:
            for first in range(start, stop, BATCH):
                apply_many(items[first : min(first + BATCH, stop)])

        return replica, step

    return Lane(name, make)


def lane_plain(script: Sequence[tuple[Any, ...]]) -> Lane:
    def make() -> tuple[PlainBook, Step]:
        book = PlainBook()

        def step(start: int, stop: int) -> None:
            run_plain(script[start:stop], book)

        return book, step

    return Lane("plain", make)


def lane_loop(name: str, items: Sequence[Any], fn: Callable[..., Any], star: bool = False) -> Lane:
    def make() -> tuple[None, Step]:
        if star:

            def step(start: int, stop: int) -> None:
                for args in items[start:stop]:
                    fn(*args)

        else:

            def step(start: int, stop: int) -> None:
                for item in items[start:stop]:
                    fn(item)

        return None, step

    return Lane(name, make)


def apply_batches(items: Sequence[Op | bytes]) -> Replica:
    replica = Replica(MARKET)
    for start in range(0, len(items), BATCH):
        report = replica.apply_many(items[start : start + BATCH])
        assert not report.invalid and not report.pending
    return replica


def signed_message(op: Op) -> bytes:
    """What crypto_sign_open takes: signature || domain || canonical payload (the op's first
    seven items as a 7-array: the raw op minus its array header and trailing signature)."""
    return op.signature + SIGNATURE_DOMAIN + b"\x87" + op.raw[1 : -len(op.signature) - 2]


# -- results --------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    metric: str
    value: float
    unit: str
    target: str = ""
    passed: bool | None = None  # None: informational

    def shown(self) -> str:
        v = self.value
        if self.unit == "ops/s":
            return f"{v:,.0f} ops/s"
        if self.unit == "us":
            return f"{v:,.1f} us"
        if self.unit == "B/op":
            return f"{v:,.0f} B/op"
        if self.unit == "x":
            return f"{v:.2f}x"
        return f"{v:,.3g} {self.unit}".strip()


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, *args: Any, **kwargs: Any) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row

    def value(self, key: str) -> float:
        return next(r.value for r in self.rows if r.key == key)


# -- sections -------------------------------------------------------------------------------------


def bench_in_order(work: Workload, prof: Profile, res: Results) -> Replica:
    """Sections 2 and 7: in-order derivation without verification, and the plain book."""
    ops = work.ops[: prof.ops]
    script = work.script[: prof.ops]
    n = len(ops)
    totals: dict[str, list[float]] = {}
    # Two passes, so only one replica is alive at a time (a second one would double the
    # cyclic GC's traversals); the plain book runs in both, its best rep counts.
    log(f"in-order apply(Op) of {n:,} ops, interleaved with the plain book ({prof.reps} reps)")
    interleave([lane_apply("apply", ops), lane_plain(script)], n, prof.chunk, prof.reps, totals)
    log(f"in-order apply_many(Op x{BATCH}) of {n:,} ops, interleaved with the plain book")
    states = interleave(
        [lane_apply_many("apply_many", ops), lane_plain(script)],
        n,
        prof.chunk,
        prof.reps,
        totals,
    )
    log("in-order apply(Op) with the node's GC policy, interleaved with the plain book")
    interleave(
        [lane_apply_node_gc("apply_node_gc", ops), lane_plain(script)],
        n,
        prof.chunk,
        prof.reps,
        totals,
    )
    gc.unfreeze()
    replica: Replica = states["apply_many"]
    if n == len(work.ops):
        assert replica.digest() == work.digest, "re-applied replica must derive the same state"
    seconds = {name: min(times) for name, times in totals.items()}
    res.extra["in_order_rep_seconds"] = {k: [round(t, 3) for t in v] for k, v in totals.items()}
    for key, label in (
        ("apply", "in-order apply(Op), no verify"),
        ("apply_many", f"in-order apply_many(Op x{BATCH}), no verify"),
        ("apply_node_gc", "in-order apply(Op), node's GC policy"),
    ):
        per_s = n / seconds[key]
        res.add(
            f"{key}_ops_per_s",
            label,
            per_s,
            "ops/s",
            f">= {TARGET_OPS_PER_S:,}",
            per_s >= TARGET_OPS_PER_S,
        )
    res.add(
        "plain_ops_per_s", "plain sortedcontainers book (baseline)", n / seconds["plain"], "ops/s"
    )
    for key, label in (
        ("apply", "  replica apply(Op) time / plain book time"),
        ("apply_many", "  replica apply_many time / plain book time"),
        ("apply_node_gc", "  apply(Op), node's GC policy / plain book"),
    ):
        ratio = seconds[key] / seconds["plain"]
        res.add(
            f"{key}_vs_plain",
            label,
            ratio,
            "x",
            f"<= {TARGET_BASELINE_RATIO:.1f}x",
            ratio <= TARGET_BASELINE_RATIO,
        )
    return replica


def bench_verify(work: Workload, prof: Profile, res: Results) -> None:
    """Sections 3 and 4: the verifying path, raw verify, decode."""
    ops = work.ops[: prof.verify_ops]
    n = len(ops)
    raws = [op.raw for op in ops]
    messages = [(signed_message(op), op.author) for op in ops]
    sign_open = nacl.bindings.crypto_sign_open
    for message, author in messages[:100]:
        sign_open(message, author)  # the message layout is right
    totals: dict[str, list[float]] = {}
    log(
        f"raw verify, apply(raw), decode, decode(verify=False) of {n:,} ops, interleaved "
        f"({prof.reps} reps)"
    )
    interleave(
        [
            lane_loop("raw_verify", messages, sign_open, star=True),
            lane_apply("apply_raw", raws),
            lane_loop("decode", raws, decode),
            lane_loop("decode_only", raws, partial(decode, verify=False)),
        ],
        n,
        prof.verify_chunk,
        prof.reps,
        totals,
    )
    per_s = {name: n / min(times) for name, times in totals.items()}
    res.extra["verify_rep_seconds"] = {k: [round(t, 3) for t in v] for k, v in totals.items()}
    ratio = per_s["apply_raw"] / per_s["raw_verify"]
    res.add(
        "raw_verify_ops_per_s",
        "raw ed25519 verify (crypto_sign_open)",
        per_s["raw_verify"],
        "ops/s",
    )
    res.add(
        "apply_raw_ops_per_s",
        "in-order apply(raw): decode+verify+derive",
        per_s["apply_raw"],
        "ops/s",
    )
    res.add(
        "apply_raw_vs_verify",
        "  verifying apply speed / raw verify speed",
        ratio,
        "x",
        f">= {TARGET_VERIFY_RATIO:.2f}x",
        ratio >= TARGET_VERIFY_RATIO,
    )
    res.add("decode_verify_ops_per_s", "decode(raw), with verify", per_s["decode"], "ops/s")
    res.add("decode_only_ops_per_s", "decode(raw, verify=False)", per_s["decode_only"], "ops/s")


def late_op(replica: Replica, depth: int, identity: Identity, attempt: int) -> Op:
    """A new op (by a fresh author, seq 1, so it has no children) that sorts exactly ``depth``
    ops before the end of ``replica``'s total order. Its Lamport time is 1 + its parent's, so the
    parent is an op one Lamport step below the op it must precede; the tie at that Lamport time
    is settled by the op id, which we grind by varying the order's tag."""
    # Only the tail of the log is read: walking all of it would leave the caches cold and
    # charge that to the timed op. In a chain of ops the parent is a few places back.
    total = len(replica)
    window = depth + 64
    parent: Op | None = None
    hi: tuple[int, bytes] | None = None
    while True:
        first = max(0, total - window)
        ops = list(replica.iter_ops(first))
        n = len(ops)
        if depth == 0:
            parent, lo, hi = ops[-1], ops[-1].key, None
            break
        after, before = ops[n - depth], ops[n - depth - 1]
        lo, hi = before.key, after.key
        want = after.lamport - 1
        parent = next((o for o in reversed(ops[: n - depth]) if o.lamport == want), None)
        if parent is not None:
            break
        if first == 0:
            raise AssertionError("no op one Lamport step below the late op's successor")
        window *= 4
    # A small bid far below the touch: it rests on its own level and trades with nothing, so the
    # replayed ops derive what they derived before and every rep costs the same.
    assert parent is not None
    for salt in range(10_000):
        body = OrderBody("buy", 1 + attempt % 50, 1, "gtc", f"late-{attempt}-{salt}")
        op = sign_op(identity, MARKET.id, 1, parent.lamport + 1, (parent.id,), body)
        if lo < op.key and (hi is None or op.key < hi):
            return op
    raise AssertionError("could not place a late op")  # pragma: no cover


def time_late(replica: Replica, depth: int, reps: int, authors: Iterator[Identity]) -> float:
    """Median cost of applying one op that sorts ``depth`` places before the end."""
    times = []
    for attempt in range(reps):
        quiesce()
        # A spacer goes in first, untimed: it sorts last, so the late op (built one place
        # shallower) ends up exactly ``depth`` from the end; and it warms the caches the way
        # the ops streaming in before a late one would (building the late op walks the whole
        # log, which would otherwise leave a 200k-op heap cold and charge that to the op).
        # Each rep's late op also lands one place from the previous one's, so late ops never
        # crowd into one Lamport tie, where the op-id window they must hit would halve per rep.
        spacer = late_op(replica, 0, next(authors), attempt)
        if depth:
            op = late_op(replica, depth - 1, next(authors), attempt)
        else:
            op = sign_op(
                next(authors),
                MARKET.id,
                1,
                spacer.lamport + 1,
                (spacer.id,),
                OrderBody("buy", 1 + attempt % 50, 1, "gtc", f"late-{attempt}"),
            )
        replica.apply(spacer)
        gc.disable()  # the op's own cost, not a collection that happens to fall on it
        started = clock()
        replica.apply(op)
        times.append(clock() - started)
        gc.enable()
        if attempt == 0:
            position = len(replica) - 1 - depth
            landed = next(replica.iter_ops(position))
            assert landed.id == op.id, "late op landed at the wrong depth"
    return statistics.median(times) * 1e6


def bench_late(work: Workload, prof: Profile, res: Results, big: Replica | None) -> None:
    authors = iter(identities(1_000, "late"))
    if big is None or len(big) != prof.late_log:
        log(f"building a {prof.late_log:,}-op log for the late-op section")
        big = None
        big = apply_batches(work.ops[: prof.late_log])
    log(f"building a {prof.small_log:,}-op log for the late-op section")
    small = apply_batches(work.ops[: prof.small_log])
    per_op_us = 1e6 / res.value("apply_ops_per_s")
    cost0 = time_late(big, 0, 15, authors)
    res.add(
        "late_depth_0_us",
        f"op at the end (depth 0), {prof.late_log // 1000}k log",
        cost0,
        "us",
    )
    costs = {}
    for depth in prof.depths:
        reps = 15 if depth <= 100 else 7 if depth <= 1_000 else 5
        log(f"late op at depth {depth:,} in the {prof.late_log:,}-op log ({reps} reps)")
        costs[depth] = time_late(big, depth, reps, authors)
        res.add(
            f"late_depth_{depth}_us",
            f"late op at depth {depth:,}, {prof.late_log // 1000}k log",
            costs[depth],
            "us",
        )
        res.extra[f"late_depth_{depth}_per_depth_us"] = costs[depth] / depth
    small_cost = time_late(small, 100, 15, authors)
    res.add(
        "late_depth_100_small_us",
        f"late op at depth 100, {prof.small_log // 1000}k log",
        small_cost,
        "us",
    )
    ratio = costs[100] / small_cost
    res.add(
        "late_log_size_ratio",
        f"  depth 100: {prof.late_log // 1000}k log / {prof.small_log // 1000}k log",
        ratio,
        "x",
        f"<= {TARGET_LOG_SIZE_RATIO:.1f}x",
        ratio <= TARGET_LOG_SIZE_RATIO,
    )
    deepest = max(prof.depths)
    slope = (costs[deepest] - costs[min(prof.depths)]) / (deepest - min(prof.depths))
    res.add(
        "late_us_per_depth",
        "  late-op slope per op of depth (undo+redo)",
        slope,
        "us",
        "grows with depth",
    )
    grows = all(costs[a] < costs[b] for a, b in zip(prof.depths, prof.depths[1:], strict=False))
    res.rows[-1].passed = grows and costs[deepest] > 10 * costs[min(prof.depths)]
    res.extra["late_slope_vs_in_order_op"] = slope / per_op_us


def footprint(root: Any, seen: set[int]) -> int:
    """sys.getsizeof of ``root`` and of everything reachable from it through containers and
    slots/dict objects, each object counted once across calls sharing ``seen``; Op objects are
    not entered (they are counted on their own)."""
    total = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (Op, type)):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            stack.extend(obj)
        elif not isinstance(obj, (bytes, str, int, float, bool)) and obj is not None:
            for klass in type(obj).__mro__:
                for slot in getattr(klass, "__slots__", ()):
                    stack.append(getattr(obj, slot, None))
            if hasattr(obj, "__dict__"):
                stack.append(vars(obj))
    return total


def attributes(obj: Any) -> dict[str, Any]:
    names = list(getattr(obj, "__dict__", {}))
    for klass in type(obj).__mro__:
        names += [n for n in getattr(klass, "__slots__", ()) if n not in names]
    return {name: getattr(obj, name) for name in names if hasattr(obj, name)}


def memory_by_part(held: list[Op], replica: Replica) -> dict[str, float]:
    """Where the bytes are, per op held: each Op field, then each replica attribute (one level
    into its engine). Generic, so it follows the core's internals as they change."""
    n = len(held)
    seen: set[int] = {id(held)}
    parts: dict[str, float] = {"Op object": sum(sys.getsizeof(op) for op in held) / n}
    for slot in Op.__slots__:
        size = sum(footprint(getattr(op, slot), seen) for op in held)
        parts[f"op.{slot}"] = size / n
    # The engine first, so that its orders are counted as its own, not as whatever else (an undo
    # journal, say) also points at them.
    members = sorted(
        attributes(replica).items(), key=lambda kv: not type(kv[1]).__module__.endswith("_engine")
    )
    for name, value in members:
        if type(value).__module__.endswith("_engine"):
            seen.add(id(value))
            parts[name] = sys.getsizeof(value) / n
            for name2, value2 in attributes(value).items():
                parts[f"{name}.{name2}"] = footprint(value2, seen) / n
        else:
            parts[name] = footprint(value, seen) / n
    return {k: round(v, 1) for k, v in parts.items() if v >= 0.5}


def decode_like_a_node(raws: Sequence[bytes]) -> list[Op]:
    held: list[Op] = []
    if "intern_id" not in inspect.signature(decode).parameters:
        for raw in raws:
            held.append(decode(bytes(bytearray(raw)), verify=False))
        return held
    seen: dict[bytes, bytes] = {}
    shared = seen.get
    for raw in raws:
        op = decode(bytes(bytearray(raw)), verify=False, intern_id=lambda i: shared(i, i))
        seen[op.id] = op.id
        held.append(op)
    return held


def bench_memory(work: Workload, prof: Profile, res: Results) -> None:
    ops = work.ops[: prof.memory_ops]
    n = len(ops)
    raws = [op.raw for op in ops]
    log(f"memory: tracemalloc while decoding {n:,} ops and building a replica of them")
    quiesce()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    # Decoded as a node decodes a batch: fresh bytes (so the traced ops own their raw bytes),
    # and, if this core's decode can, parent ids shared with the ops decoded before them.
    held = decode_like_a_node(raws)
    after_ops = tracemalloc.get_traced_memory()[0]
    replica = Replica(MARKET)
    for start in range(0, n, BATCH):
        replica.apply_many(held[start : start + BATCH])
    gc.collect()
    after_replica = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    list_bytes = sys.getsizeof(held)
    op_bytes = (after_ops - base - list_bytes) / n
    overhead = (after_replica - after_ops) / n
    total = op_bytes + overhead
    res.add(
        "memory_total_b_per_op",
        f"memory per op held ({n // 1000}k-op replica)",
        total,
        "B/op",
        f"<= {TARGET_BYTES_PER_OP:,} B/op",
        total <= TARGET_BYTES_PER_OP,
    )
    res.add("memory_op_b_per_op", "  Op objects (incl. raw bytes)", op_bytes, "B/op")
    res.add("memory_replica_b_per_op", "  replica overhead", overhead, "B/op")

    log("memory: parts")
    parts = memory_by_part(held, replica)
    res.extra["memory_breakdown_b_per_op"] = parts
    if "op.raw" in parts:
        res.add("memory_raw_b_per_op", "  of which the ops' raw bytes", parts["op.raw"], "B/op")


def profile_in_order(prof: Profile, seed: int) -> int:
    import cProfile
    import pstats

    work = generate(prof.ops, seed)
    quiesce()
    replica = Replica(MARKET)
    apply = replica.apply
    profiler = cProfile.Profile()
    profiler.enable()
    for op in work.ops:
        apply(op)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    print(
        "(cProfile charges the cyclic GC's collections to whichever function allocated when one\n"
        " fell due: with the GC on, allocating functions look dearer than their code is.)"
    )
    del replica, apply
    seconds: dict[str, float] = {}
    for mode in ("gc on", "gc off", "gc on"):
        quiesce()
        if mode == "gc off":
            gc.disable()
        started = clock()
        apply_batches(work.ops)
        seconds[mode] = min(seconds.get(mode, math.inf), clock() - started)
        gc.enable()
    on, off = seconds["gc on"], seconds["gc off"]
    n = len(work.ops)
    print(
        f"in-order apply_many over {n:,} ops: {on / n * 1e6:.2f} us/op with the GC, "
        f"{off / n * 1e6:.2f} us/op without: the GC is {1 - off / on:.0%} of the time"
    )
    return 0


# -- main -----------------------------------------------------------------------------------------


def print_table(res: Results, work: Workload, prof: Profile, elapsed: float) -> None:
    s = work.stats
    print(f"crdtbook {crdtbook.__version__} core bench, Python {platform.python_version()}")
    print(
        f"workload: {s['ops']:,} ops by {s['authors']} authors, seed {res.extra['seed']}: "
        f"{s['passive']:.0%} passive limit, {s['crossing']:.0%} crossing, "
        f"{s['cancels']:.0%} cancels; IOC {s['ioc']:.1%}, FOK {s['fok']:.1%}, "
        f"POST_ONLY {s['post_only']:.1%}"
    )
    print(
        f"          {s['fills']:,} fills, {s['resting_orders_at_end']:,} orders resting on "
        f"{s['levels_at_end']:,} levels at the end, {s['mean_op_bytes']:.0f} B/op on the wire; "
        f"authored in {work.seconds:.1f} s ({s['ops'] / work.seconds:,.0f} ops/s, incl. signing)"
    )
    print(
        f"sizes: throughput {prof.ops:,} ops, verify {prof.verify_ops:,} ops, memory "
        f"{prof.memory_ops:,} ops, late op in {prof.late_log:,}/{prof.small_log:,}-op logs; "
        f"throughput = best of {prof.reps} reps, chunks interleaved, "
        f"{res.extra['clock']} time"
    )
    load0, load1 = res.extra["loadavg_start"], res.extra["loadavg_end"]
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load0:.2f} at start, {load1:.2f} at end "
        "(other processes share the CPUs: read ratios, not absolute figures, on a busy host)"
    )
    print()
    width = max(len(r.metric) for r in res.rows)
    vwidth = max(len(r.shown()) for r in res.rows)
    twidth = max(len(r.target) for r in res.rows)
    header = f"{'metric':<{width}}  {'value':>{vwidth}}  {'target':<{twidth}}  result"
    print(header)
    print("-" * len(header))
    for r in res.rows:
        verdict = "" if r.passed is None else ("PASS" if r.passed else "FAIL")
        print(f"{r.metric:<{width}}  {r.shown():>{vwidth}}  {r.target:<{twidth}}  {verdict}")
    print()
    breakdown = res.extra.get("memory_breakdown_b_per_op", {})
    if breakdown:
        items = [f"{k} {v:.0f}" for k, v in breakdown.items()]
        print("memory by part (sys.getsizeof of what each part reaches first, B/op):")
        for i in range(0, len(items), 5):
            print("  " + ", ".join(items[i : i + 5]))
    failed = [r.key for r in res.rows if r.passed is False]
    print(
        f"total run time {elapsed:.1f} s; {len(failed)} target(s) missed"
        + (f": {', '.join(failed)}" if failed else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, help="ops for the throughput sections")
    parser.add_argument("--quick", action="store_true", help="small sizes (< 30 s)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="time with this process's CPU time (default) or wall-clock time",
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the in-order apply(Op) path and exit"
    )
    args = parser.parse_args(argv)
    prof = QUICK if args.quick else FULL
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.ops is not None:
        if args.ops < prof.chunk:
            parser.error(f"--ops must be at least {prof.chunk}")
        prof = replace(
            prof,
            ops=args.ops,
            verify_ops=min(prof.verify_ops, args.ops),
            memory_ops=min(prof.memory_ops, args.ops),
        )
    if args.profile:
        return profile_in_order(prof, args.seed)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    count = max(prof.ops, prof.late_log)
    log(f"authoring {count:,} ops (seed {args.seed})")
    work = generate(count, args.seed)
    res = Results(extra={"seed": args.seed, "loadavg_start": load_start, "clock": args.clock})
    big: Replica | None = bench_in_order(work, prof, res)
    bench_verify(work, prof, res)
    bench_late(work, prof, res, big)
    big = None
    bench_memory(work, prof, res)
    gc.unfreeze()
    res.extra["loadavg_end"] = os.getloadavg()[0]
    elapsed = time.perf_counter() - started
    if args.json:
        out = {
            "crdtbook_version": crdtbook.__version__,
            "python": platform.python_version(),
            "mode": "quick" if args.quick else "full",
            "sizes": prof.__dict__,
            "workload": work.stats | {"author_seconds": work.seconds},
            "results": {
                r.key: {
                    "metric": r.metric.strip(),
                    "value": r.value,
                    "unit": r.unit,
                    "target": r.target or None,
                    "pass": r.passed,
                }
                for r in res.rows
            },
            "extra": res.extra,
            "elapsed_s": elapsed,
            "all_pass": all(r.passed is not False for r in res.rows),
        }
        print(json.dumps(out, indent=2))
    else:
        print_table(res, work, prof, elapsed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
