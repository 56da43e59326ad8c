"""What a short activity costs after the process slept: this machine's cold penalty.

    python bench/bench_cold.py [--reps 200] [--json]

A node at 500 ops/s sleeps between events (a submit every ~10 ms, a burst of gossip every
50 ms), and each event's work finds its code and objects evicted from the caches. This script
times one fixed activity, reading the same ``TOUCHED`` objects of a ``HEAP_OBJECTS``-object heap
(as a node's hot path reads the same replica, store and trio objects each time), in CPU time,
back to back and after idle gaps of 1 to 20 ms. The ratio to back to back is the penalty every
one of a node's wake-ups pays on the machine it runs on. bench/README.md (#12) measured
15 us back to back and 200-300 us after a 10-20 ms gap on the 2-core VM, with the machine idle:
so the node's CPU per op falls as the rate rises, and two machines (or two days of one shared
machine) give different figures for the same code.

No baseline is needed: the figures are ratios within this run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

#: Objects in the heap: ~20 MB of small lists, larger than a core's 2 MB L2 (a node holds
#: 100-200 MB).
HEAP_OBJECTS = 100_000
#: Objects one activity reads: the order of what a submit or a gossip message touches.
TOUCHED = 300
#: Idle gaps before each timed activity, in ms (0: back to back).
GAPS_MS = (0, 1, 5, 10, 20)


def measure(reps: int, seed: int = 1) -> dict[str, Any]:
    """Median CPU time (us) of the activity after each gap, and its ratio to back to back."""
    heap = [[i, i + 1, i + 2] for i in range(HEAP_OBJECTS)]
    picks = random.Random(seed).sample(range(HEAP_OBJECTS), TOUCHED)

    def activity() -> int:
        total = 0
        for i in picks:
            total += heap[i][1]
        return total

    medians: dict[int, float] = {}
    for gap in GAPS_MS:
        times = []
        for _ in range(reps):
            if gap:
                time.sleep(gap / 1000)
            start = time.thread_time_ns()
            activity()
            times.append(time.thread_time_ns() - start)
        medians[gap] = statistics.median(times) / 1000
    warm = medians[0]
    return {
        "heap_objects": HEAP_OBJECTS,
        "touched": TOUCHED,
        "us_by_gap_ms": {str(gap): round(us, 1) for gap, us in medians.items()},
        "ratio_by_gap_ms": {str(gap): round(us / warm, 1) for gap, us in medians.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=200, help="activities timed per gap")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.reps)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"one activity reading {TOUCHED} of {HEAP_OBJECTS:,} objects, CPU time (median of "
          f"{args.reps}):")
    for gap in GAPS_MS:
        us = result["us_by_gap_ms"][str(gap)]
        ratio = result["ratio_by_gap_ms"][str(gap)]
        label = "back to back" if gap == 0 else f"after {gap} ms idle"
        print(f"  {label:<18} {us:8.1f} us  {ratio:5.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
