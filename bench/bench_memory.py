"""Memory bench (issue #10): a node's RSS, restart and join as a witnessed market's history grows,
with compaction and without it (the baseline), in the same run.

    python bench/bench_memory.py            # 100k, 500k and 1M ops (several minutes)
    python bench/bench_memory.py --quick    # 10k, 30k and 60k ops, compacting every 5k: < 60 s
    python bench/bench_memory.py --json     # the same, machine-readable (progress on stderr)
    python bench/bench_memory.py --ops 100000 200000 --point-interval 20000

What runs:

1. **Ops.** One authoring ``Replica`` signs a witnessed market's orders and cancels (8 traders,
   prices within a few ticks of a fixed mid, 30% IOC; each trader cancels its oldest resting
   orders, keeping at most ``MAX_RESTING``, so the book stays a few hundred orders deep whatever
   the history: live state is bounded). They go to a
   file, once, and feed both modes.
2. **Ingest**, one child process per mode: a ``NodeService`` with a real SQLite store, whose key
   is the market's only witness, takes the ops through its real ingest path (``prepare``:
   hash, decode, verify; ``commit``: apply, store, notify) in batches of ``BATCH`` ops, while its
   own ``heartbeat_loop`` heartbeats (every ``HEARTBEAT_S``) and its ``finality_loop`` evaluates
   finality and compacts at points (every ``point_interval`` final ops; the baseline never
   compacts). At each milestone it
   waits until everything is final and no compaction is due or being saved, collects garbage
   and reads its RSS (``VmRSS``).
3. **Restart** at each milestone: a fresh child process opens the same store (the ingest child
   waits meanwhile) and runs ``NodeService.load_from_store``, as after a kill -9 (no stop-time
   checkpoint or snapshot): the compacting node reads its snapshot and the live ops, the
   baseline replays the whole log. Wall and CPU seconds.
4. **Full-log join** (the baseline): a fresh child process with an empty store ingests the
   first N ops of the compacting node's whole log (heartbeats included) through
   ``prepare``/``commit`` as a sync session would hand them over, verifying every signature.
   No network: a lower bound on a real join.
5. **Snapshot join** at N ops of history, while the compacting node waits at that milestone: a
   fresh child process restores the compacting node's store as a serving peer (not timed), and
   a joiner with an empty store joins from it through node/join.py's real protocol code
   (offer, snapshot fetch and checks, ``adopt_snapshot``) and then one sync session of
   node/sync.py for the ops after the point, over in-memory streams (no network, both ends in
   one process). Timed from the first offer to the end of that sync; its digest must equal the
   peer's.

Targets: RSS at the largest size <= RSS at the smallest + 50 MB (compaction); restart at the
largest size < 2 s (compaction); a snapshot join under 5 s at every history size. The
baseline's figures are the comparison, not targets.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from crdtbook import BadCancel, Identity, Market, Replica

#: The witness: the ingesting node's key, the market's only witness.
WITNESS: Final = Identity.from_seed(b"w" * 32)
MARKET: Final = Market("MEM", "1", "1", witnesses=(WITNESS.public_key,))
TRADERS: Final = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(8)]
#: Ops per ingest call: what one sync frame or gossip message carries at most.
BATCH: Final = 2000
#: The node's heartbeat interval here (production: 0.25 s). Shorter keeps the provisional tail
#: short at bench ingest rates (tens of thousands of ops/s), so "final" follows ingest closely.
HEARTBEAT_S: Final = 0.05
#: Targets (issue #10).
RSS_GROWTH_MB: Final = 50.0
RESTART_S: Final = 2.0
FULL_OPS: Final = (100_000, 500_000, 1_000_000)
QUICK_OPS: Final = (10_000, 30_000, 60_000)
QUICK_POINT_INTERVAL: Final = 5_000
JOIN_S: Final = 5.0
#: The baseline's point interval: never.
NEVER: Final = 1 << 62
MID: Final = 10_000
#: Each trader keeps at most this many orders resting (it cancels its oldest beyond), so the book
#: stays a few hundred orders deep however long the history: the live state is bounded.
MAX_RESTING: Final = 40


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# -- ops -------------------------------------------------------------------------------------


def generate(count: int, seed: int, path: Path) -> dict[str, Any]:
    """Author ``count`` trader ops into ``path`` (length-prefixed raw ops, in authoring order)."""
    rng = random.Random(seed)
    replica = Replica(MARKET)
    resting: list[list[bytes]] = [[] for _ in TRADERS]
    started = time.perf_counter()
    with path.open("wb") as out:
        for index in range(count):
            who = rng.randrange(len(TRADERS))
            trader = TRADERS[who]
            mine = resting[who]
            while mine and not _resting(replica, mine[0]):  # filled, or IOC: forget it
                mine.pop(0)
            op = None
            if len(mine) > MAX_RESTING or (mine and rng.random() < 0.1):
                target = mine.pop(0)  # the oldest: stale quotes get pulled
                try:
                    op = replica.cancel(trader, target)
                except BadCancel:
                    op = None
            if op is None:
                side = "buy" if rng.random() < 0.5 else "sell"
                price = MID + rng.randint(-4, 4)
                tif = "ioc" if rng.random() < 0.3 else "gtc"
                op = replica.submit(trader, side, price, rng.randint(1, 10), tif)
                if tif == "gtc":
                    mine.append(op.id)
            out.write(struct.pack(">I", len(op.raw)))
            out.write(op.raw)
            if index and index % 100_000 == 0:
                log(f"  authored {index:,} ops")
            # The authoring replica's own memory is not measured, only its speed matters.
    book = replica.book()
    return {
        "ops": count,
        "author_s": time.perf_counter() - started,
        "fills": replica.fill_count,
        "resting_at_end": sum(len(lv.orders) for lv in (*book.bids, *book.asks)),
    }


def _resting(replica: Replica, order_id: bytes) -> bool:
    order = replica.order(order_id)
    return order is not None and order.status in ("open", "partially_filled")


def read_ops(path: Path) -> Iterator[bytes]:
    with path.open("rb") as src:
        while header := src.read(4):
            (size,) = struct.unpack(">I", header)
            yield src.read(size)


def batches(raws: Iterator[bytes], size: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for raw in raws:
        batch.append(raw)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- children --------------------------------------------------------------------------------


def child_ingest(
    store_dir: Path, ops_path: Path, milestones: list[int], point_interval: int
) -> None:
    """Ingest the ops file; at each milestone print one JSON line and wait for a line on stdin."""
    import trio

    from crdtbook.node.service import NodeService
    from crdtbook.node.store import OpStore

    async def main() -> None:
        store = OpStore.open(store_dir, synchronous="NORMAL")
        service = NodeService(
            WITNESS,
            store,
            [MARKET],
            heartbeat_interval=HEARTBEAT_S,
            point_interval=point_interval,
        )
        service.load_from_store()
        ms = service.by_name[MARKET.name]
        fed = 0
        pending = list(milestones)
        started = time.perf_counter()
        cpu = time.process_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.heartbeat_loop, ms)
            nursery.start_soon(service.finality_loop, ms)
            for batch in batches(read_ops(ops_path), BATCH):
                prepared = await service.prepare(ms, batch)
                await service.commit(ms, prepared, "bench")
                fed += len(batch)
                if pending and fed >= pending[0]:
                    pending.pop(0)
                    ingest_s = time.perf_counter() - started
                    ingest_cpu = time.process_time() - cpu
                    await settle(service, ms)
                    gc.collect()
                    replica = ms.replica
                    row = {
                        "fed": fed,
                        "ops": len(replica),
                        "final": replica.final_count,
                        "compacted_ops": replica.compacted_ops,
                        "compactions": ms.compactions,
                        # The longest compaction so far: the core's part stalls the event loop
                        # (compact and snapshot); the store's runs in a worker thread.
                        "compact_s_max": ms.compact_s_max,
                        "save_s_max": ms.save_s_max,
                        "rss_mb": rss_mb(),
                        "ingest_s": ingest_s,
                        "ingest_cpu_s": ingest_cpu,
                        "digest": replica.digest().hex(),
                    }
                    print(json.dumps(row), flush=True)
                    await trio.to_thread.run_sync(sys.stdin.readline)
                    started = time.perf_counter() - ingest_s
                    cpu = time.process_time() - ingest_cpu
            nursery.cancel_scope.cancel()
        store.close()

    trio.run(main)


async def settle(service: Any, ms: Any) -> None:
    """Until every applied op is final, no compaction is due and none is being saved, and the
    witness attested the latest point (a joiner then takes that one)."""
    import trio

    while True:
        replica = ms.replica
        saving = ms.archive is not None and ms.archive.saving is not None
        point = replica.point
        attested = point is None or replica.attesting(point.n, point.hash)
        done = replica.final_count == len(replica) and not service.compaction_due(ms)
        if done and not saving and attested:
            return
        await trio.sleep(0.02)


def child_restart(store_dir: Path, point_interval: int) -> None:
    """Load the store as a node starts (after a kill -9: no stop-time snapshot); print JSON."""
    from crdtbook.node.service import NodeService
    from crdtbook.node.store import OpStore

    logging.basicConfig(level=logging.WARNING)
    store = OpStore.open(store_dir, synchronous="NORMAL")
    service = NodeService(WITNESS, store, [MARKET], point_interval=point_interval)
    wall, cpu = time.perf_counter(), time.process_time()
    service.load_from_store()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    replica = service.by_name[MARKET.name].replica
    print(
        json.dumps(
            {
                "restart_s": wall,
                "restart_cpu_s": cpu,
                "ops": len(replica),
                "compacted_ops": replica.compacted_ops,
                "rss_mb": rss_mb(),
                "digest": replica.digest().hex(),
            }
        ),
        flush=True,
    )
    store.close()


def child_join(source_dir: Path, count: int, target_dir: Path) -> None:
    """Ingest the first ``count`` ops of the source store's whole log into an empty node."""
    import trio

    from crdtbook.node.service import NodeService
    from crdtbook.node.store import OpStore

    source = OpStore.open(source_dir, synchronous="NORMAL")
    raws = []
    for raw in source.load_market(MARKET.id):
        raws.append(raw)
        if len(raws) == count:
            break
    source.close()
    joiner = Identity.from_seed(b"j" * 32)

    async def main() -> dict[str, Any]:
        store = OpStore.open(target_dir, synchronous="NORMAL")
        service = NodeService(joiner, store, [MARKET])
        service.load_from_store()
        ms = service.by_name[MARKET.name]
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(raws), BATCH):
            prepared = await service.prepare(ms, raws[start : start + BATCH])
            await service.commit(ms, prepared, "join")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        replica = ms.replica
        store.close()
        return {
            "history": len(raws),
            "join_s": wall,
            "join_cpu_s": cpu,
            "ops": len(replica),
            "pending": replica.pending_count,
        }

    print(json.dumps(trio.run(main)), flush=True)


class _TrioBytes:
    """A trio in-memory stream as the byte stream node/frames.py's FrameStream runs on, so the
    snapshot join's two ends in one process frame their messages exactly as nodes do."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def read(self, n: int | None = None) -> bytes:
        return bytes(await self._stream.receive_some(n))

    async def write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def close(self) -> None:
        await self._stream.aclose()

    async def reset(self) -> None:
        import trio

        await trio.aclose_forcefully(self._stream)


def _frames(stream: Any, peer_id: str) -> Any:
    from crdtbook.node.frames import FrameStream

    return FrameStream(_TrioBytes(stream), peer_id, "/crdtbook/bench", 30.0)


def child_snapjoin(source_dir: Path, point_interval: int, target_dir: Path) -> None:
    """Join from the source store's latest attested point through node/join.py, then sync what
    followed through node/sync.py, both over in-memory streams; print JSON."""
    import trio
    import trio.testing

    from crdtbook.node.join import Joiner
    from crdtbook.node.service import NodeService
    from crdtbook.node.store import OpStore
    from crdtbook.node.sync import pull, respond

    logging.basicConfig(level=logging.WARNING)
    source_store = OpStore.open(source_dir, synchronous="NORMAL")
    source = NodeService(
        Identity.from_seed(b"s" * 32), source_store, [MARKET], point_interval=point_interval
    )
    source.load_from_store()
    source_ms = source.by_name[MARKET.name]

    class Net:
        """The joiner's network: one peer, the source, served in the nursery."""

        peer_id = "joiner"

        def __init__(self, nursery: trio.Nursery, server: Joiner | None) -> None:
            self.nursery = nursery
            self.server = server
            self.rejects: list[tuple[str, str]] = []

        def connected_peers(self) -> list[str]:
            return ["source"] if self.server is not None else []

        def set_stream_handler(self, protocol_id: str, handler: Any) -> None:
            pass

        def report_reject(self, peer_id: str, reason: str) -> None:
            self.rejects.append((peer_id, reason))

        async def open_stream(self, peer_id: str, protocol_id: str) -> Any:
            assert self.server is not None
            left, right = trio.testing.memory_stream_pair()
            self.nursery.start_soon(self.server.serve, _frames(right, "joiner"))
            return _frames(left, peer_id)

    async def main() -> dict[str, Any]:
        store = OpStore.open(target_dir, synchronous="NORMAL")
        service = NodeService(
            Identity.from_seed(b"j" * 32), store, [MARKET], point_interval=point_interval
        )
        service.load_from_store()
        ms = service.by_name[MARKET.name]
        async with trio.open_nursery() as nursery:
            server = Joiner(source, Net(nursery, None))  # type: ignore[arg-type]
            net = Net(nursery, server)
            joiner = Joiner(service, net, peer_wait=5.0)  # type: ignore[arg-type]
            joiner.install()
            assert ms.joining
            wall, cpu = time.perf_counter(), time.process_time()
            await joiner.join(ms)
            joined_s = time.perf_counter() - wall
            left, right = trio.testing.memory_stream_pair()

            async def serve() -> None:
                await respond(_frames(right, "joiner"), lambda m: source_ms.replica)
                await right.aclose()

            nursery.start_soon(serve)
            synced, _ = await pull(
                _frames(left, "source"),
                ms.replica,
                lambda raws: service.prepare(ms, raws),
                lambda prepared: service.commit(ms, prepared, "source"),
            )
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            # Then the history before the point, as a node fetches it when an op needs it
            # (node/join.py: in total order, checked against the attested chain, stored).
            stored = store.count(MARKET.id)  # what the join stored: not the history
            history_wall, history_cpu = time.perf_counter(), time.process_time()
            fetched = await joiner.fetch_history(ms)
            history_wall = time.perf_counter() - history_wall
            history_cpu = time.process_time() - history_cpu
            nursery.cancel_scope.cancel()
        replica = ms.replica
        row = {
            "history": len(source_ms.replica),
            "join_s": wall,
            "join_cpu_s": cpu,
            "snapshot_s": joined_s,
            "joined_from_point": ms.joined_from,
            "synced_ops": synced,
            "ops": len(replica),
            "same_digest": replica.digest() == source_ms.replica.digest(),
            "rejects": len(net.rejects),
            "stored_ops": stored,
            "history_fetched": fetched and replica.has_history,
            "history_ops": ms.joined_from,
            "history_s": history_wall,
            "history_cpu_s": history_cpu,
            "digest_after_history": replica.digest() == source_ms.replica.digest(),
        }
        store.close()
        return row

    print(json.dumps(trio.run(main)), flush=True)
    source_store.close()


# -- the run ---------------------------------------------------------------------------------


def spawn(*args: str, stdin: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--child", *args],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )


def run_json(*args: str) -> dict[str, Any]:
    proc = spawn(*args)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed with {proc.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def run_mode(
    tmp: Path,
    ops_path: Path,
    sizes: list[int],
    point_interval: int,
    name: str,
    snapshot_joins: list[int] = (),  # type: ignore[assignment]
) -> list[dict[str, Any]]:
    store_dir = tmp / name
    store_dir.mkdir()
    # Each size is measured twice: one batch before it, when a compaction is about due (the
    # most final ops in memory: RSS at its peak, the longest restart after a kill -9), and at
    # it, just after that compaction (sizes are multiples of point_interval here).
    points = [point for size in sizes for point in (size - BATCH, size)]
    milestones = ",".join(map(str, points))
    proc = spawn(
        "ingest", str(store_dir), str(ops_path), milestones, str(point_interval), stdin=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    rows = []
    for point in points:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {name} ingest child ended early ({proc.wait()})")
        row = json.loads(line)
        restart = run_json("restart", str(store_dir), str(point_interval))
        assert restart["digest"] == row["digest"], f"{name}: the restart has another state"
        row.update(
            restart_s=restart["restart_s"],
            restart_cpu_s=restart["restart_cpu_s"],
            restart_rss_mb=restart["rss_mb"],
        )
        log(
            f"  {name} {point:,}: RSS {row['rss_mb']:.0f} MB, {row['compacted_ops']:,} ops "
            f"compacted, restart {row['restart_s']:.2f} s (ingest {row['ingest_s']:.1f} s)"
        )
        if point in snapshot_joins:
            target = tmp / f"snapjoin-{point}"
            target.mkdir()
            joined = run_json("snapjoin", str(store_dir), str(point_interval), str(target))
            assert joined["same_digest"], f"the snapshot join at {point} has another state"
            row["snapshot_join"] = joined
            log(
                f"  snapshot join at {joined['history']:,} ops of history: "
                f"{joined['join_s']:.2f} s (point {joined['joined_from_point']:,}, "
                f"{joined['synced_ops']:,} ops synced after it); then the history before "
                f"the point, {joined['history_ops']:,} ops, fetched and checked in "
                f"{joined['history_s']:.2f} s ({joined['history_cpu_s']:.2f} s CPU, "
                f"{1e6 * joined['history_s'] / max(1, joined['history_ops']):.0f} us an op)"
            )
            assert joined["history_fetched"] and joined["digest_after_history"], joined
        proc.stdin.write("\n")
        proc.stdin.flush()
        if point in sizes:
            before = rows.pop()
            if "snapshot_join" in before:
                joins_here = [before.pop("snapshot_join"), row.get("snapshot_join")]
                row["snapshot_join"] = {
                    "history": point,
                    # The worst of the two: a joiner arrives at any moment.
                    "join_s": max(j["join_s"] for j in joins_here if j),
                    "after_point": joins_here[1],
                    "before_next_point": joins_here[0],
                }
            row.update(
                size=point,
                before=before,
                rss_peak_mb=max(before["rss_mb"], row["rss_mb"]),
                restart_after_compaction_s=row["restart_s"],
                # The restart that counts: after a kill -9 anywhere, so the longest.
                restart_s=max(before["restart_s"], row["restart_s"]),
            )
        rows.append(row)
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError(f"the {name} ingest child failed with {proc.returncode}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--ops", type=int, nargs="+")
    parser.add_argument("--point-interval", type=int)
    parser.add_argument(
        "--join", type=int, nargs="+", help="history sizes to join (default: smallest and largest)"
    )
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "ingest":
            child_ingest(
                Path(rest[0]), Path(rest[1]), [int(x) for x in rest[2].split(",")], int(rest[3])
            )
        elif kind == "restart":
            child_restart(Path(rest[0]), int(rest[1]))
        elif kind == "snapjoin":
            child_snapjoin(Path(rest[0]), int(rest[1]), Path(rest[2]))
        elif kind == "join":
            child_join(Path(rest[0]), int(rest[1]), Path(rest[2]))
        return 0
    from crdtbook.node.service import POINT_INTERVAL

    sizes = sorted(args.ops or (QUICK_OPS if args.quick else FULL_OPS))
    point_interval = args.point_interval or (QUICK_POINT_INTERVAL if args.quick else POINT_INTERVAL)
    joins = sorted(args.join or {sizes[0], sizes[-1]})
    if any(b - a <= BATCH for a, b in zip([0, *sizes], sizes, strict=False)):
        parser.error(f"sizes must be more than {BATCH} ops apart (and from 0)")
    started = time.perf_counter()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="crdtbook-memory-") as name:
        tmp = Path(name)
        ops_path = tmp / "ops.bin"
        log(f"authoring {sizes[-1]:,} ops (load average {load:.2f})")
        workload = generate(sizes[-1], args.seed, ops_path)
        log(
            f"  {workload['author_s']:.1f} s, {workload['fills']:,} fills, "
            f"{workload['resting_at_end']} orders resting at the end"
        )
        modes = {}
        for mode, after in (("compaction", point_interval), ("baseline", NEVER)):
            log(f"{mode}: ingest, RSS and restart")
            # Just after a point (little to sync after it) and one batch before the next one
            # (a whole interval of ops to sync and verify after it): the best and worst case.
            snapshot_joins = (
                [p for j in joins for p in (j - BATCH, j)] if mode == "compaction" else []
            )
            modes[mode] = run_mode(tmp, ops_path, sizes, after, mode, snapshot_joins)
        joined = []
        for size in joins:
            target = tmp / f"join-{size}"
            target.mkdir()
            history = min(size, modes["compaction"][-1]["ops"])
            row = run_json("join", str(tmp / "compaction"), str(history), str(target))
            log(f"  full-log join of {row['history']:,} ops: {row['join_s']:.2f} s")
            joined.append(row)
    elapsed = time.perf_counter() - started
    comp, base = modes["compaction"], modes["baseline"]
    growth = comp[-1]["rss_mb"] - comp[0]["rss_mb"]
    peak_growth = comp[-1]["rss_peak_mb"] - comp[0]["rss_peak_mb"]
    snap = [r["snapshot_join"] for r in comp if "snapshot_join" in r]
    checks = {
        "snapshot_join_ok": bool(snap) and all(r["join_s"] < JOIN_S for r in snap),
        "rss_growth_mb": growth,
        "rss_peak_growth_mb": peak_growth,
        "rss_growth_ok": max(growth, peak_growth) <= RSS_GROWTH_MB,
        "restart_ok": comp[-1]["restart_s"] < RESTART_S,
    }
    results = {
        "rss_mb": {str(r["size"]): r["rss_mb"] for r in comp},
        "rss_peak_mb": {str(r["size"]): r["rss_peak_mb"] for r in comp},
        "restart_s": {str(r["size"]): r["restart_s"] for r in comp},
        # join_s: joins from a snapshot (the target; the worse of just after a point and one
        # batch before the next); baseline_join_s: from the full log.
        "join_s": {str(r["history"]): r["join_s"] for r in snap},
        "baseline_join_s": {str(r["history"]): r["join_s"] for r in joined},
        "baseline_rss_mb": {str(r["size"]): r["rss_mb"] for r in base},
        "compact_s_max": comp[-1]["compact_s_max"],
        "save_s_max": comp[-1]["save_s_max"],
        "baseline_restart_s": {str(r["size"]): r["restart_s"] for r in base},
        "snapshot_join": snap,
        "point_interval": point_interval,
        "checks": checks,
        "compaction": comp,
        "baseline": base,
        "join": joined,
        "workload": workload,
    }
    if args.json:
        print(
            json.dumps({"results": results, "elapsed_s": elapsed, "load_average": load}, indent=2)
        )
        return 0
    print(
        f"witnessed market, one node, point_interval={point_interval:,} (load average {load:.2f})"
    )
    print("RSS: just after a compaction / its peak, one batch before it; restart: the longer")
    print(f"{'ops':>10} {'RSS / peak':>15} {'base RSS':>9} {'restart':>9} {'base restart':>13}")
    for c, b in zip(comp, base, strict=True):
        print(
            f"{c['size']:>10,} {c['rss_mb']:>5.0f} /{c['rss_peak_mb']:>4.0f} MB "
            f"{b['rss_mb']:>6.0f} MB {c['restart_s']:>7.2f} s {b['restart_s']:>11.2f} s"
        )
    verdict = "PASS" if checks["rss_growth_ok"] else "FAIL"
    print(
        f"RSS growth {comp[0]['size']:,} -> {comp[-1]['size']:,} ops: {growth:+.0f} MB, peak "
        f"{peak_growth:+.0f} MB (target <= {RSS_GROWTH_MB:.0f} MB): {verdict}"
    )
    print(
        f"longest compaction: {comp[-1]['compact_s_max']:.2f} s on the event loop (core), "
        f"{comp[-1]['save_s_max']:.2f} s in the store (worker thread)"
    )
    verdict = "PASS" if checks["restart_ok"] else "FAIL"
    print(
        f"restart at {comp[-1]['size']:,} ops: {comp[-1]['restart_s']:.2f} s "
        f"(target < {RESTART_S:.0f} s): {verdict}"
    )
    for row in joined:
        print(
            f"full-log join of {row['history']:,} ops (baseline; in process, verifying): "
            f"{row['join_s']:.2f} s"
        )
    verdict = "PASS" if checks["snapshot_join_ok"] else "FAIL"
    for row in snap:
        for when in ("after_point", "before_next_point"):
            j = row[when]
            print(
                f"snapshot join at {j['history']:,} ops of history, {when.replace('_', ' ')} "
                f"(in process): {j['join_s']:.2f} s (point {j['joined_from_point']:,}, then "
                f"{j['synced_ops']:,} ops synced; {j['stored_ops']:,} ops stored)"
            )
    print(f"snapshot join target < {JOIN_S:.0f} s at every size: {verdict}")
    print(f"elapsed {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
