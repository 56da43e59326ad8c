"""Retention bench (issue #10, ``--retention``): a witnessed market's store on disk with and
without retention, and what pruning costs the ingest, in the same run.

    python bench/bench_retention.py                      # 100k ops, points every 10k, keep 10k
    python bench/bench_retention.py --ops 20000 --point-interval 2000 --retention 2000

What runs (one process, no network):

1. One authoring ``Replica`` signs a witnessed market's orders and cancels (4 traders around a
   fixed price, each cancelling its oldest orders beyond 5 resting).
2. **W**, the market's witness (a ``NodeService`` over a real SQLite store), takes them through
   ``prepare``/``commit`` in batches of ``BATCH``, heartbeating after each batch and compacting
   at every point: its store's whole log is then the input of the two others.
3. **Q** (the baseline: no retention) and **P** (``retention``) take W's log in the same batches
   through the same ingest path, compacting at each point; P also prunes after each compaction.
   Timed: their ingest (P's includes its pruning).

Printed: rows, op bytes, file size (after a WAL checkpoint) and pages in use of each store;
P's digest must equal W's. Compare P with Q: same log, same work but the pruning. The machine is
shared: the load average is printed; compare within one run.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Final

import trio

from crdtbook import BadCancel, Identity, Market, Op, Replica
from crdtbook.node.service import NodeService
from crdtbook.node.store import STORE_FILENAME, OpStore

#: Ops per ingest batch (one commit each), as a busy sync session hands them over.
BATCH: Final = 200
WITNESS: Final = Identity.from_seed(b"W" * 32)
TRADERS: Final = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(4)]
MARKET: Final = Market("RETAIN", "1", "1", witnesses=(WITNESS.public_key,))


def author(count: int, seed: int) -> list[Op]:
    """``count`` trader ops around a fixed price; traders cancel their oldest orders."""
    rng = random.Random(seed)
    replica = Replica(MARKET)
    resting: list[list[bytes]] = [[] for _ in TRADERS]
    out: list[Op] = []
    for _ in range(count):
        who = rng.randrange(len(TRADERS))
        mine = resting[who]
        op = None
        if len(mine) > 5:
            try:
                op = replica.cancel(TRADERS[who], mine.pop(0))
            except BadCancel:
                op = None
        if op is None:
            side = rng.choice(("buy", "sell"))
            op = replica.submit(TRADERS[who], side, 100 + rng.randint(-2, 2), rng.randint(1, 5))
            mine.append(op.id)
        out.append(op)
    return out


def open_node(
    home: Path, identity: Identity, interval: int, retention: int | None
) -> tuple[OpStore, NodeService]:
    home.mkdir()
    store = OpStore.open(home / STORE_FILENAME, synchronous="NORMAL")
    service = NodeService(identity, store, [MARKET], point_interval=interval, retention=retention)
    service.load_from_store()
    return store, service


async def feed(service: NodeService, raws: list[bytes], heartbeat: bool) -> float:
    """Ingest ``raws`` in batches, compacting at points (as the finality task does); seconds."""
    ms = service.by_name[MARKET.name]
    started = time.perf_counter()
    for start in range(0, len(raws), BATCH):
        prepared = await service.prepare(ms, raws[start : start + BATCH])
        await service.commit(ms, prepared, "bench")
        if heartbeat:
            await service.heartbeat(ms)
        while service.compaction_due(ms):
            await service.compact(ms)
    return time.perf_counter() - started


def disk(path: Path) -> tuple[int, int, int, int]:
    """(rows, op bytes, file bytes, bytes in used pages) of a closed store."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows, raw = conn.execute(
            "SELECT count(*), coalesce(sum(length(raw)), 0) FROM ops"
        ).fetchone()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    return int(rows), int(raw), os.path.getsize(path), int((pages - free) * size)


async def run(ops: int, interval: int, retention: int, seed: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_retention."))
    load = os.getloadavg()
    authored = author(ops, seed)
    w_store, w = open_node(tmp / "W", WITNESS, interval, None)
    await feed(w, [op.raw for op in authored], heartbeat=True)
    await w.heartbeat(w.by_name[MARKET.name])  # the last ops final too
    log = list(w_store.load_market(MARKET.id))
    q_store, q = open_node(tmp / "Q", Identity.from_seed(b"Q" * 32), interval, None)
    q_s = await feed(q, log, heartbeat=False)
    p_store, p = open_node(tmp / "P", Identity.from_seed(b"P" * 32), interval, retention)
    p_s = await feed(p, log, heartbeat=False)
    pm = p.by_name[MARKET.name]
    assert pm.replica.digest() == w.by_name[MARKET.name].replica.digest()
    point = pm.replica.point
    print(
        f"{len(log)} ops, points every {interval}, retention {retention}: last point "
        f"{point.n if point else 0}, {pm.prune.pruned} ops pruned"
    )
    print(f"ingest of the log: baseline Q {q_s:.1f} s, P with retention {p_s:.1f} s")
    for name, store in (("W", w_store), ("Q", q_store), ("P", p_store)):
        store.close()
        rows, raw, size, used = disk(tmp / name / STORE_FILENAME)
        print(
            f"{name}: {rows} rows, {raw / 1e6:.1f} MB of ops, file {size / 1e6:.1f} MB, "
            f"pages in use {used / 1e6:.1f} MB"
        )
    print(f"load average before / after: {load[0]:.2f} / {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--point-interval", type=int, default=10_000)
    parser.add_argument("--retention", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    trio.run(run, args.ops, args.point_interval, args.retention, args.seed)


if __name__ == "__main__":
    main()
