"""Restart bench: how long a node takes to rebuild its replica from the store, with and without
a derived-state checkpoint.

    python bench/bench_restart.py [--ops 100000 200000] [--reps 3] [--seed S] [--json]

For each size N: the first N ops of bench_core's workload (real signed ops, one market) go into
a fresh SQLite store; then ``NodeService.load_from_store`` (what a node runs at start: read,
decode without signature check, apply, match) is timed without the checkpoint (full replay) and
with the one ``NodeService.write_checkpoints`` stores at an orderly stop, in alternation, best of
``--reps``, in CPU time (``time.process_time``; the dev machine is shared). Both paths must end
with the same digest. Also timed: writing the checkpoint (``NodeService.write_checkpoints``:
``Replica.checkpoint`` and the store commit), the work an orderly stop adds; and, to separate
the core from SQLite and decoding, ``Replica.restore`` of already decoded ops with and without
the checkpoint. Runs in about a minute on the 2-core dev machine (14 s of it authoring ops).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import MARKET, generate

from crdtbook import Identity, Replica
from crdtbook.node.service import NodeService, checkpoint_tail
from crdtbook.node.store import OpStore

IDENTITY = Identity.from_seed(b"r" * 32)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def settle() -> None:
    """Start each timed load from the same GC state (the service's GC policy freezes)."""
    gc.unfreeze()
    gc.collect()


def timed_load(store: OpStore, use_checkpoints: bool) -> tuple[float, int, bytes]:
    """CPU seconds of one start-up load; ops covered by the checkpoint; the digest."""
    settle()
    service = NodeService(IDENTITY, store, [MARKET])
    started = time.process_time()
    service.load_from_store(use_checkpoints=use_checkpoints)
    seconds = time.process_time() - started
    replica = service.by_name[MARKET.name].replica
    result = (seconds, replica.restore_report.from_checkpoint, replica.digest())
    del service, replica
    settle()
    return result


def timed_core(ops: list[Any], blob: bytes | None) -> tuple[float, Replica]:
    """CPU seconds of ``Replica.restore`` from decoded ops (no SQLite, no decoding)."""
    settle()
    started = time.process_time()
    replica = Replica.restore(MARKET, ops, blob)
    return time.process_time() - started, replica


def bench_size(directory: Path, ops: list[Any], size: int, reps: int) -> dict[str, Any]:
    decoded = ops[:size]
    store = OpStore.open(directory / f"restart-{size}.sqlite3", synchronous="NORMAL")
    try:
        for start in range(0, size, 10_000):
            chunk = decoded[start : start + 10_000]
            store.add_ops([(op.id, op.market_id, op.lamport, op.raw) for op in chunk])
        # The checkpoint an orderly stop writes (timed: what the stop costs).
        core_full_s, replica = timed_core(decoded, None)
        service = NodeService(IDENTITY, store, [MARKET])
        service.by_name[MARKET.name].replica = replica
        settle()
        started = time.process_time()
        replica.checkpoint(checkpoint_tail(size))
        encode_s = time.process_time() - started
        started = time.process_time()
        service.write_checkpoints()
        write_s = time.process_time() - started
        blob = store.get_checkpoint(MARKET.id)
        assert blob is not None
        del service, replica

        lanes: dict[str, list[float]] = {"full": [], "checkpoint": [], "core_full": [core_full_s]}
        lanes["core_checkpoint"] = []
        digests = set()
        covered = 0
        for rep in range(reps):
            seconds, used, digest = timed_load(store, use_checkpoints=False)
            assert used == 0
            lanes["full"].append(seconds)
            digests.add(digest)
            seconds, covered, digest = timed_load(store, use_checkpoints=True)
            assert covered > 0, "the checkpoint was not used"
            lanes["checkpoint"].append(seconds)
            digests.add(digest)
            if rep:  # the first core full restore made the checkpoint
                lanes["core_full"].append(timed_core(decoded, None)[0])
            seconds, replica = timed_core(decoded, blob)
            assert replica.restore_report.from_checkpoint == covered
            lanes["core_checkpoint"].append(seconds)
            del replica
            log(
                f"  {size:,} ops, rep {rep + 1}: full {lanes['full'][-1]:.2f} s, "
                f"checkpoint {lanes['checkpoint'][-1]:.2f} s"
            )
        assert len(digests) == 1, "restoring from the checkpoint changed the state"
    finally:
        store.close()
    settle()
    best = {lane: min(values) for lane, values in lanes.items()}
    return {
        "ops": size,
        "full_s": best["full"],
        "checkpoint_s": best["checkpoint"],
        "full_us_per_op": 1e6 * best["full"] / size,
        "checkpoint_us_per_op": 1e6 * best["checkpoint"] / size,
        "speedup": best["full"] / best["checkpoint"],
        "covered": covered,
        "checkpoint_bytes": len(blob),
        "checkpoint_encode_ms": 1e3 * encode_s,
        "checkpoint_write_ms": 1e3 * write_s,
        "core_full_us_per_op": 1e6 * best["core_full"] / size,
        "core_checkpoint_us_per_op": 1e6 * best["core_checkpoint"] / size,
        "rep_s": lanes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, nargs="+", default=[100_000, 200_000])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    log(f"generating {max(args.ops):,} ops (load average {os.getloadavg()[0]:.2f})")
    ops = generate(max(args.ops), args.seed).ops
    rows = []
    with tempfile.TemporaryDirectory(prefix="crdtbook-restart-") as tmp:
        for size in sorted(args.ops):
            rows.append(bench_size(Path(tmp), ops, size, args.reps))
    elapsed = time.perf_counter() - started
    if args.json:
        print(json.dumps({"results": rows, "elapsed_s": elapsed}, indent=2))
        return 0
    load = os.getloadavg()[0]
    print(f"restart from the store, CPU time, best of {args.reps} (load average {load:.2f})")
    print(
        f"{'ops':>8} {'full replay':>17} {'from checkpoint':>19} {'speedup':>8}"
        f" {'covered':>8} {'blob':>8} {'at stop':>8}"
    )
    for row in rows:
        print(
            f"{row['ops']:>8,} {row['full_s']:>6.2f} s {row['full_us_per_op']:>5.1f} us/op"
            f" {row['checkpoint_s']:>6.2f} s {row['checkpoint_us_per_op']:>5.1f} us/op"
            f" {row['speedup']:>7.2f}x {row['covered']:>8,}"
            f" {row['checkpoint_bytes'] / 1e6:>6.2f} MB"
            f" {row['checkpoint_write_ms']:>5.0f} ms"
        )
    print("the core alone (Replica.restore of decoded ops; the difference is matching less the")
    print("cost of installing the checkpoint's state):")
    for row in rows:
        print(
            f"{row['ops']:>8,} {row['core_full_us_per_op']:>5.1f} us/op without checkpoint,"
            f" {row['core_checkpoint_us_per_op']:>5.1f} us/op with"
        )
    print(f"elapsed {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
