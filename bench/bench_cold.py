"""What a short activity costs after the process slept: this machine's cold penalty.

    python bench/bench_cold.py [--reps 200] [--pieces] [--json]

A node at 500 ops/s sleeps between events (a submit every ~10 ms, a burst of gossip every
50 ms), and each event's work finds its code and objects evicted from the caches. This script
times one fixed activity, reading the same ``TOUCHED`` objects of a ``HEAP_OBJECTS``-object heap
(as a node's hot path reads the same replica, store and trio objects each time), in CPU time,
back to back and after idle gaps of 1 to 20 ms. The ratio to back to back is the penalty every
one of a node's wake-ups pays on the machine it runs on. bench/README.md (#12) measured
9-14 us back to back and 130-330 us after a 10-20 ms gap on the 2-core VM, with nothing else
running: so the node's CPU per op falls as the rate rises, and two machines (or two days of one
shared machine) give different figures for the same code.

``--pieces`` times the pieces a submit cannot do without the same way (back to back and after
10 ms idle): the node's own ed25519 signature (``Identity.sign``) and libsodium's verification,
a one-op commit into the node's own store (``OpStore``, synchronous=NORMAL, ``STORE_ROWS`` ops
held), ``json`` loads and dumps of a submit request and an ``os.write`` of an op's size.

No baseline is needed: the figures are ratios within this run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.bindings

from crdtbook import Identity
from crdtbook.node.store import OpStore

#: Objects in the heap: ~20 MB of small lists, larger than a core's 2 MB L2 (a node holds
#: 100-200 MB).
HEAP_OBJECTS = 100_000
#: Objects one activity reads: the order of what a submit or a gossip message touches.
TOUCHED = 300
#: Idle gaps before each timed activity, in ms (0: back to back).
GAPS_MS = (0, 1, 5, 10, 20)
#: Ops the ``--pieces`` store holds before its commits are timed: a few minutes at 100 ops/s.
STORE_ROWS = 20_000
#: The size of an op with a few parents, in bytes.
OP_BYTES = 300


def _median_us(piece: Callable[[], object], gap_ms: int, reps: int) -> float:
    times = []
    for _ in range(reps):
        if gap_ms:
            time.sleep(gap_ms / 1000)
        start = time.thread_time_ns()
        piece()
        times.append(time.thread_time_ns() - start)
    return statistics.median(times) / 1000


def measure(reps: int, seed: int = 1) -> dict[str, Any]:
    """Median CPU time (us) of the activity after each gap, and its ratio to back to back."""
    heap = [[i, i + 1, i + 2] for i in range(HEAP_OBJECTS)]
    picks = random.Random(seed).sample(range(HEAP_OBJECTS), TOUCHED)

    def activity() -> int:
        total = 0
        for i in picks:
            total += heap[i][1]
        return total

    medians = {gap: _median_us(activity, gap, reps) for gap in GAPS_MS}
    warm = medians[0]
    return {
        "verify_us": verify_us(),
        "heap_objects": HEAP_OBJECTS,
        "touched": TOUCHED,
        "us_by_gap_ms": {str(gap): round(us, 1) for gap, us in medians.items()},
        "ratio_by_gap_ms": {str(gap): round(us / warm, 1) for gap, us in medians.items()},
    }


def verify_us(reps: int = 2000) -> float:
    """One warm ed25519 verification (libsodium, as the node's), best of 5 loops of ``reps``:
    the machine's raw speed, which moves by 20-30% on this shared host from hour to hour."""
    identity = Identity.from_seed(bytes(32))
    signed = identity.sign(bytes(OP_BYTES)) + bytes(OP_BYTES)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            nacl.bindings.crypto_sign_open(signed, identity.public_key)
        best = min(best, (time.perf_counter() - start) / reps)
    return round(best * 1e6, 1)


def measure_pieces(reps: int) -> dict[str, dict[str, float]]:
    """Median CPU time (us) of each piece of a submit, back to back and after 10 ms idle: the
    node's own signing (``Identity.sign``) and store (``OpStore.add_ops``, synchronous=NORMAL
    as a node opens it by default), libsodium's verification as the node's decode calls it."""
    identity = Identity.from_seed(bytes(32))
    op = bytes(OP_BYTES)
    signed = identity.sign(op) + op
    request = json.dumps({"id": 7, "method": "submit", "params": {
        "side": "buy", "price": "100", "quantity": "3", "tif": "gtc"}})
    rng = random.Random(2)
    with tempfile.TemporaryDirectory() as tmp, OpStore.open(tmp, synchronous="NORMAL") as store:
        lamport = [0]

        def commit() -> None:
            lamport[0] += 1
            store.add_ops([(rng.randbytes(32), bytes(32), lamport[0], op)])

        for _ in range(STORE_ROWS):
            commit()
        log = os.open(Path(tmp) / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        pieces: dict[str, Callable[[], object]] = {
            "ed25519 sign": lambda: identity.sign(op),
            "ed25519 verify": lambda: nacl.bindings.crypto_sign_open(signed, identity.public_key),
            f"store commit of one op ({STORE_ROWS:,} held)": commit,
            "json loads and dumps of a request": lambda: json.dumps(json.loads(request)),
            f"os.write of {OP_BYTES} bytes": lambda: os.write(log, op),
        }
        try:
            return {name: {"warm_us": round(_median_us(piece, 0, reps), 1),
                           "after_10_ms_us": round(_median_us(piece, 10, reps), 1)}
                    for name, piece in pieces.items()}
        finally:
            os.close(log)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=200, help="activities timed per gap")
    parser.add_argument("--pieces", action="store_true", help="also time a submit's pieces")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.reps)
    if args.pieces:
        result["pieces"] = measure_pieces(min(args.reps, 150))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"ed25519 verify, warm: {result['verify_us']} us")
    print(f"one activity reading {TOUCHED} of {HEAP_OBJECTS:,} objects, CPU time (median of "
          f"{args.reps}):")
    for gap in GAPS_MS:
        us = result["us_by_gap_ms"][str(gap)]
        ratio = result["ratio_by_gap_ms"][str(gap)]
        label = "back to back" if gap == 0 else f"after {gap} ms idle"
        print(f"  {label:<18} {us:8.1f} us  {ratio:5.1f}x")
    for name, row in result.get("pieces", {}).items():
        print(f"  {name:<42} {row['warm_us']:7.1f} us warm, {row['after_10_ms_us']:7.1f} us "
              "after 10 ms idle")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
