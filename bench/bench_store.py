"""Op store benchmark: write throughput of the node's SQLite store, synchronous NORMAL (the node's
default) against FULL (``crdtbook node --fsync``), inline and through a worker thread, and the
streaming read a restart does.

    python bench/bench_store.py [--dir DIR] [--batches 1 100 1000] [--load 200000]

Figures only (no targets): they explain the node's durability modes in README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import trio

from crdtbook.node.store import OpItem, OpStore, Synchronous

# Target wall time per benchmark cell: long enough to average out fsync jitter, short enough
# that the whole table takes well under a minute.
_BENCH_SECONDS = 2.0

# Size of a benchmark op's raw bytes (a signed order op is about this big).
_BENCH_OP_BYTES = 200


def _bench_batches(batch: int) -> Iterator[list[OpItem]]:
    market = b"M" * 32
    lamport = 0
    while True:
        rows: list[OpItem] = []
        for _ in range(batch):
            lamport += 1
            rows.append((os.urandom(32), market, lamport, os.urandom(_BENCH_OP_BYTES)))
        yield rows


def _bench_cell(
    directory: Path, sync: Synchronous, batch: int, via_thread: bool
) -> tuple[float, float]:
    """Return (ops per second, mean milliseconds per batch) for one configuration.

    Only the add_ops calls are timed (op generation is not), until they add up to
    _BENCH_SECONDS.
    """


    path = directory / f"bench-{sync}-{batch}-{int(via_thread)}.sqlite3"
    store = OpStore.open(path, synchronous=sync)
    batches = _bench_batches(batch)
    done = 0
    commits = 0
    spent = 0.0

    def run_inline() -> None:
        nonlocal done, commits, spent
        while spent < _BENCH_SECONDS:
            rows = next(batches)
            start = time.perf_counter()
            done += store.add_ops(rows)
            spent += time.perf_counter() - start
            commits += 1

    async def run_threaded() -> None:
        nonlocal done, commits, spent
        while spent < _BENCH_SECONDS:
            rows = next(batches)
            start = time.perf_counter()
            done += await trio.to_thread.run_sync(store.add_ops, rows)
            spent += time.perf_counter() - start
            commits += 1

    try:
        if via_thread:
            trio.run(run_threaded)
        else:
            run_inline()
    finally:
        store.close()
    return done / spent, 1000.0 * spent / commits


def _bench_load(directory: Path, n_ops: int) -> tuple[float, float]:
    """Return (ops per second streamed by load_market, seconds to count) for n_ops ops."""
    store = OpStore.open(directory / "bench-load.sqlite3", synchronous="NORMAL")
    try:
        batches = _bench_batches(10_000)
        left = n_ops
        while left > 0:
            batch = next(batches)[:left]
            store.add_ops(batch)
            left -= len(batch)
        start = time.perf_counter()
        seen = sum(1 for _ in store.load_market(b"M" * 32))
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        assert store.count(b"M" * 32) == seen == n_ops
        count_s = time.perf_counter() - start
    finally:
        store.close()
    return n_ops / load_s, count_s


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/bench_store.py",
        description="Measure op store write throughput (synchronous FULL vs NORMAL).",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory on the filesystem to measure (default: system temp)",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument(
        "--load",
        type=int,
        default=200_000,
        help="ops for the load_market streaming figure (0 to skip)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="crdtbook-bench-") as tmp:
        directory = Path(tmp)
        print(f"store on {directory}; ops of {_BENCH_OP_BYTES} B; {_BENCH_SECONDS:.0f} s per cell")
        print(f"{'synchronous':<12}{'batch':>6}{'call':>10}{'ops/s':>12}{'ms/batch':>10}")
        for sync in ("NORMAL", "FULL"):
            for batch in args.batches:
                for via_thread in (False, True):
                    rate, ms = _bench_cell(directory, sync, batch, via_thread)
                    call = "to_thread" if via_thread else "inline"
                    print(f"{sync:<12}{batch:>6}{call:>10}{rate:>12,.0f}{ms:>10.3f}", flush=True)
        if args.load:
            rate, count_s = _bench_load(directory, args.load)
            print(
                f"load_market: {rate:,.0f} ops/s over {args.load:,} ops; "
                f"count(): {count_s * 1000:.1f} ms"
            )
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
