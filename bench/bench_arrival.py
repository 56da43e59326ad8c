"""Arrival-order bench (issue #12): what applying gossip that arrives out of total order costs.

    python bench/bench_arrival.py [--seconds S] [--reps R] [--seed N] [--json] [--profile]
                                  [--base DIR] [--publish-ms MS] [--latency-ms LOW,HIGH]
                                  [--witnessed]

A node of a 5-node network at 500 ops/s receives each peer's ops as one gossip batch every
~160 ms, interleaved with its own ops, which it applies one at a time as it authors them. A batch
holds ops signed 0-200 ms ago, whose Lamport times are below the node's latest ops: they sort
before the matched tail, which the replica rewinds and matches again.

The bench simulates that network in logical time, without I/O: ``AUTHORS`` traders, each with
its own replica, author orders and cancels at ``RATE`` ops/s through ``Replica.submit`` and
``cancel`` (so parents are what each had seen: its own tip and the peers' ops that had arrived),
publish what they authored every ``PUBLISH_MS`` (phases rotating), and each batch reaches each
peer ``LATENCY_MS`` later. Trader 0 is the node measured. Its trace (own op / peer batch, in
arrival order, ops decoded beforehand: no decoding or signature checks are timed) is replayed
on a fresh replica:

- ``arrival``: own ops through ``apply``, peer batches through ``apply_many``, as the node does;
- ``in order``: the same ops in the total order, through ``apply_many`` in batches of the same
  sizes, alternating with ``arrival`` chunk by chunk in the same run (a ratio that holds on a
  busy machine).

``--witnessed``: the market has one witness, trader 0, which heartbeats every ``HEARTBEAT_MS``
when it has something to acknowledge (its heartbeats are own ops of the node; the ``in order``
arm is then Lamport order, which the heartbeats still re-sort).

``--base DIR``: DIR holds another ``crdtbook`` package (``git archive <commit> crdtbook | tar -x
-C DIR``), loaded beside this one as ``crdtbook_base``: its ``arrival`` and ``in order`` arms run
alternating with these, on ops its own ``decode`` made (an A/B of two versions in one run).

Also: how far back the batches sort (ops undone and matched again per op), and ``submit`` per
op (sign and apply) on a replica holding the node's final state, against signing alone.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import heapq
import importlib.util
import json
import os
import pstats
import random
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from crdtbook import Identity, Market, Op, Replica, decode
from crdtbook._ops import OrderBody, sign_op

AUTHORS = 5
RATE = 100  # ops/s per trader: 500 ops/s in all, issue #12's 5-node load
#: A node publishes what it authored as one gossip message every interval (the node's default
#: with 4 peers, bench/README.md "The cost of a gossip copy"); phases spread over the interval.
PUBLISH_MS = 160
#: From a publish to the batch's apply at a peer (network, validation, the apply loop's wake).
LATENCY_MS = (5, 40)
#: Orders near a mid of 100 (bench_network's ``order_params``); a cancel in CANCEL_SHARE.
CANCEL_SHARE = 0.15
MARKET = Market("ARRIVAL", "1", "1")
#: ``--witnessed``: trader 0 is the market's one witness and heartbeats this often when it has
#: something to acknowledge (a counted heartbeat places its past and re-sorts the tail).
HEARTBEAT_MS = 100
CHUNK_EVENTS = 100  # trace events per timed chunk (arms alternate chunk by chunk)
SUBMITS = 500  # submits timed at the end


@dataclass
class Event:
    own: bool  # an op authored by the node (applied alone) or a peer batch
    ops: list[Op]


@dataclass
class Trace:
    events: list[Event]
    ops: int
    digest: bytes  # the node's digest after the whole trace (every trader holds the same)


def identities() -> list[Identity]:
    return [
        Identity.from_seed(hashlib.sha256(f"crdtbook-bench/arrival/{i}".encode()).digest())
        for i in range(AUTHORS)
    ]


def simulate(
    seconds: float, seed: int, publish_ms: float = PUBLISH_MS,
    latency_ms: tuple[float, float] = LATENCY_MS, market: Market = MARKET,
) -> Trace:
    """Run the network in logical time; the trace of trader 0."""
    rng = random.Random(seed)
    traders = identities()
    replicas = [Replica(market) for _ in traders]
    resting: list[list[bytes]] = [[] for _ in traders]
    outbox: list[list[Op]] = [[] for _ in traders]
    # (time ms, tie-break, kind, trader, payload): kind 0 author, 1 publish, 2 deliver, 3
    # heartbeat.
    queue: list[tuple[float, int, int, int, Any]] = []
    tie = 0
    interval = 1000 / RATE
    for who in range(AUTHORS):
        queue.append((rng.uniform(0, interval), tie := tie + 1, 0, who, None))
        queue.append((publish_ms * (who + 1) / AUTHORS, tie := tie + 1, 1, who, None))
    if market.witnessed:  # kind 3: trader 0 heartbeats
        queue.append((HEARTBEAT_MS, tie := tie + 1, 3, 0, None))
    heapq.heapify(queue)
    events: list[Event] = []
    end = seconds * 1000
    while queue:
        now, _, kind, who, payload = heapq.heappop(queue)
        replica = replicas[who]
        if kind == 0:  # author one op
            if now >= end:
                continue
            mine = resting[who]
            if mine and rng.random() < CANCEL_SHARE:
                target = mine.pop(rng.randrange(len(mine)))
                state = replica.order(target)
                if state is None or state.status not in ("open", "partially_filled"):
                    op = None
                else:
                    op = replica.cancel(traders[who], target)
            else:
                op = None
            if op is None:
                side = rng.choice(("buy", "sell"))
                price = rng.randint(95, 101) if side == "buy" else rng.randint(99, 105)
                op = replica.submit(traders[who], side, price, rng.randint(1, 4))
                state = replica.order(op.id)
                if state is not None and state.status in ("open", "partially_filled"):
                    mine.append(op.id)
            outbox[who].append(op)
            if who == 0:
                events.append(Event(True, [op]))
            jitter = rng.uniform(-0.3, 0.3) * interval
            heapq.heappush(queue, (now + interval + jitter, tie := tie + 1, 0, who, None))
        elif kind == 3:  # the witness acknowledges what it holds
            if now < end:
                if replica.needs_heartbeat(traders[0].public_key):
                    op = replica.heartbeat(traders[0])
                    outbox[who].append(op)
                    events.append(Event(True, [op]))
                heapq.heappush(queue, (now + HEARTBEAT_MS, tie := tie + 1, 3, who, None))
        elif kind == 1:  # publish
            batch, outbox[who] = outbox[who], []
            if batch:
                for peer in range(AUTHORS):
                    if peer != who:
                        at = now + rng.uniform(*latency_ms)
                        heapq.heappush(queue, (at, tie := tie + 1, 2, peer, batch))
            if now < end + publish_ms:
                heapq.heappush(queue, (now + publish_ms, tie := tie + 1, 1, who, None))
        else:  # a peer's batch arrives
            report = replica.apply_many(payload)
            assert not report.invalid, report  # pending: a parent from a third peer is late
            if who == 0:
                events.append(Event(False, list(payload)))
    digests = {r.digest() for r in replicas}
    assert len(digests) == 1, "the traders did not converge"
    # Decoded afresh, as a node's validator hands them to apply_many (and laid out like that).
    fresh: dict[bytes, Op] = {}
    for event in events:
        for op in event.ops:
            fresh[op.id] = decode(op.raw, verify=False)
    events = [Event(e.own, [fresh[op.id] for op in e.ops]) for e in events]
    return Trace(events, len(fresh), digests.pop())


def in_order_events(trace: Trace) -> list[Event]:
    """The same ops in Lamport order (the total order of a market without witnesses), cut into
    batches of the trace's event sizes."""
    ordered = sorted((op for e in trace.events for op in e.ops), key=lambda o: (o.lamport, o.id))
    out: list[Event] = []
    at = 0
    for event in trace.events:
        out.append(Event(False, ordered[at : at + len(event.ops)]))
        at += len(event.ops)
    return out


def load_base(directory: str) -> types.ModuleType:
    """The ``crdtbook`` package in ``directory``, imported as ``crdtbook_base``."""
    init = os.path.join(directory, "crdtbook", "__init__.py")
    spec = importlib.util.spec_from_file_location(
        "crdtbook_base", init, submodule_search_locations=[os.path.dirname(init)]
    )
    assert spec is not None and spec.loader is not None, f"no crdtbook package in {directory}"
    module = importlib.util.module_from_spec(spec)
    sys.modules["crdtbook_base"] = module
    spec.loader.exec_module(module)
    return module


def redecoded(events: list[Event], package: types.ModuleType) -> list[Event]:
    """The events with every op decoded by ``package`` (its replica takes only its own Ops)."""
    made: dict[bytes, Any] = {}
    out = []
    for event in events:
        ops = []
        for op in event.ops:
            if op.id not in made:
                made[op.id] = package.decode(op.raw, verify=False)
            ops.append(made[op.id])
        out.append(Event(event.own, ops))
    return out


Step = Callable[[Replica, Event], None]


def arrival_step(replica: Replica, event: Event) -> None:
    if event.own:
        replica.apply(event.ops[0])
    else:
        replica.apply_many(event.ops)


def batch_step(replica: Replica, event: Event) -> None:
    replica.apply_many(event.ops)


def run_arms(
    arms: dict[str, tuple[list[Event], Step, Callable[[], Replica]]], reps: int
) -> tuple[dict[str, list[float]], dict[str, Replica]]:
    """Every arm on a fresh replica, chunk by chunk alternating; CPU seconds per rep."""
    spent: dict[str, list[float]] = {name: [] for name in arms}
    replicas: dict[str, Replica] = {}
    count = len(next(iter(arms.values()))[0])
    for _ in range(reps):
        gc.collect()
        replicas = {name: make() for name, (_, _, make) in arms.items()}
        totals = dict.fromkeys(arms, 0.0)
        for start in range(0, count, CHUNK_EVENTS):
            for name, (events, step, _) in arms.items():
                replica = replicas[name]
                began = time.process_time()
                for event in events[start : start + CHUNK_EVENTS]:
                    step(replica, event)
                totals[name] += time.process_time() - began
        for name, seconds in totals.items():
            spent[name].append(seconds)
    return spent, replicas


def rewind_stats(trace: Trace, market: Market) -> dict[str, float]:
    """Ops undone and matched per applied op, replaying the trace once with counters on the
    engine (private: the bench's only look inside the replica)."""
    replica = Replica(market)
    counts = {"undo": 0, "process": 0}

    def counted(engine: Any) -> None:
        undo, process = engine.undo, engine.process

        def counting_undo(op: Op, start: int) -> None:
            counts["undo"] += 1
            undo(op, start)

        def counting_process(op: Op) -> None:
            counts["process"] += 1
            process(op)

        engine.undo, engine.process = counting_undo, counting_process

    counted(replica._engine)
    depths = []
    for event in trace.events:
        before = counts["undo"]
        arrival_step(replica, event)
        if not event.own:
            depths.append(counts["undo"] - before)
    return {
        "undone_per_op": counts["undo"] / trace.ops,
        "matched_per_op": counts["process"] / trace.ops,
        "batch_rewind_mean": statistics.fmean(depths) if depths else 0.0,
        "batch_rewind_max": max(depths, default=0),
    }


def time_submits(replica: Replica, seed: int, market: Market) -> dict[str, float]:
    """µs per ``submit`` by trader 0 on ``replica`` (parents, sign, the decode check of its own
    op, apply), against ``sign_op`` alone for the same body and parents (encode, sign, decode
    check) and ed25519 alone on a message of the same size; alternating per op."""
    rng = random.Random(seed)
    me = identities()[0]
    submit_s = sign_op_s = ed25519_s = 0.0
    for i in range(SUBMITS):
        side = rng.choice(("buy", "sell"))
        price = rng.randint(95, 101) if side == "buy" else rng.randint(99, 105)
        quantity = rng.randint(1, 4)
        body = OrderBody(side, price, quantity, "gtc", None, "expire_maker")
        parents = tuple(replica.heads())
        began = time.process_time()
        op = sign_op(me, market.id, 10**6 + i, 10**6 + i, parents, body, market.version)
        sign_op_s += time.process_time() - began
        message = op.raw[: -len(op.signature)]
        began = time.process_time()
        me.sign(message)
        ed25519_s += time.process_time() - began
        began = time.process_time()
        replica.submit(me, side, price, quantity)
        submit_s += time.process_time() - began
    return {
        "submit_us": submit_s / SUBMITS * 1e6,
        "sign_op_us": sign_op_s / SUBMITS * 1e6,
        "ed25519_us": ed25519_s / SUBMITS * 1e6,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="logical seconds of load")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--publish-ms", type=float, default=PUBLISH_MS,
                        help="gossip publish interval of each trader")
    parser.add_argument("--latency-ms", default=",".join(map(str, LATENCY_MS)),
                        help="LOW,HIGH: a batch's delay from publish to apply (uniform)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the arrival replay once (top 25 by own time)")
    parser.add_argument("--base", metavar="DIR",
                        help="A/B against the crdtbook package in DIR (see the docstring)")
    parser.add_argument("--witnessed", action="store_true",
                        help="trader 0 is the market's witness and heartbeats")
    args = parser.parse_args(argv)
    market = (
        Market(MARKET.name, "1", "1", witnesses=[identities()[0].public_key])
        if args.witnessed else MARKET
    )
    load = os.getloadavg()
    began = time.perf_counter()
    low, high = (float(x) for x in args.latency_ms.split(","))
    trace = simulate(args.seconds, args.seed, args.publish_ms, (low, high), market)
    sim_s = time.perf_counter() - began
    batches = [len(e.ops) for e in trace.events if not e.own]
    if args.profile:
        replica = Replica(market)
        began = time.process_time()
        for event in trace.events:
            arrival_step(replica, event)
        plain_s = time.process_time() - began
        replica = Replica(market)
        profiler = cProfile.Profile(time.process_time)
        began = time.process_time()
        profiler.enable()
        for event in trace.events:
            arrival_step(replica, event)
        profiler.disable()
        profiled_s = time.process_time() - began
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        # cProfile charges every Python call: code made of many small calls (this) looks
        # several times dearer beside C-heavy code (crypto, sockets) than it is.
        print(f"the replay took {plain_s:.2f} s of CPU without the profiler, {profiled_s:.2f} s "
              f"with it ({profiled_s / plain_s:.1f}x)")
        return 0
    ordered = in_order_events(trace)
    arms: dict[str, tuple[list[Event], Step, Callable[[], Replica]]] = {
        "arrival": (trace.events, arrival_step, lambda: Replica(market)),
        "in_order": (ordered, batch_step, lambda: Replica(market)),
    }
    if args.base:
        base = load_base(args.base)
        base_market = base.Market(market.name, "1", "1", witnesses=market.witnesses)
        arms["arrival_base"] = (redecoded(trace.events, base), arrival_step,
                                lambda: base.Replica(base_market))
        arms["in_order_base"] = (redecoded(ordered, base), batch_step,
                                 lambda: base.Replica(base_market))
    spent, replicas = run_arms(arms, args.reps)
    for name, replica in replicas.items():
        assert replica.digest() == trace.digest, f"{name}: another digest"
    stats = rewind_stats(trace, market)
    submits = time_submits(replicas["arrival"], args.seed, market)
    us = {name: min(times) / trace.ops * 1e6 for name, times in spent.items()}
    result = {
        "ops": trace.ops,
        "events": len(trace.events),
        "batches": len(batches),
        "batch_ops_mean": statistics.fmean(batches),
        "arrival_us_per_op": us["arrival"],
        "in_order_us_per_op": us["in_order"],
        "ratio": us["arrival"] / us["in_order"],
        "reps_us": {name: [t / trace.ops * 1e6 for t in times] for name, times in spent.items()},
        "best_us": us,
        **stats,
        **submits,
        "simulate_s": sim_s,
        "load": [load, os.getloadavg()],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{trace.ops:,} ops{' (witnessed market)' if args.witnessed else ''} ({AUTHORS} traders "
          f"x {RATE} ops/s x {args.seconds:g} s, publish "
          f"every {args.publish_ms:g} ms, latency {low:g}-{high:g} ms),\n{len(batches)} peer "
          f"batches of {result['batch_ops_mean']:.1f} ops on average; "
          f"simulated in {sim_s:.1f} s")
    print(f"apply, us per op (best of {args.reps}): arrival {us['arrival']:.2f}, "
          f"in order {us['in_order']:.2f} ({result['ratio']:.2f}x)")
    for name, times in spent.items():
        print(f"  {name:14} best {us[name]:6.2f}, reps "
              + ", ".join(f"{t / trace.ops * 1e6:.2f}" for t in times))
    if args.base:
        print(f"  against the base: arrival {us['arrival'] / us['arrival_base']:.3f}x, "
              f"in order {us['in_order'] / us['in_order_base']:.3f}x")
    print(f"rewinds: {stats['undone_per_op']:.2f} ops undone and {stats['matched_per_op']:.2f} "
          f"matched per op; a batch rewinds {stats['batch_rewind_mean']:.1f} ops on average "
          f"(max {stats['batch_rewind_max']})")
    print(f"submit: {submits['submit_us']:.1f} us per op; sign_op alone (encode, sign, check) "
          f"{submits['sign_op_us']:.1f} us, ed25519 alone {submits['ed25519_us']:.1f} us")
    print(f"load average {load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
