"""What retention's acknowledgement walk costs after a cut heals one way.

A witness ``a`` signs alone (cut off) while ``b`` and ``c`` trade among themselves; then ``a``
gets all of theirs (the heal, one way), compacts, and asks ``first_unacknowledged_compacted``
(node/retention.py asks it before each pruning). Prints the time of each walk and how many
archive reads it made: in a node each read is a SQLite query and a decode (~17 us warm, so
the reads, not the walk, are most of the cost), and the walks run on the event loop.

    python bench/bench_ack_walk.py [A_OPS] [BC_OPS]       # default 3000 20000
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "core"))

from witnessed import GENESIS, TRADERS, WMARKET

from crdtbook import Op, Replica

INTERVAL = 2000


class CountingArchive:
    def __init__(self) -> None:
        self.ops: dict[bytes, Op] = {}
        self.reads = 0

    def get(self, ident: bytes) -> Op | None:
        self.reads += 1
        return self.ops.get(ident)


def main() -> None:
    alone = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    others = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    a_key = GENESIS[0].public_key
    archive = CountingArchive()
    a = Replica(WMARKET, archive=archive, point_interval=INTERVAL)
    b, c = Replica(WMARKET), Replica(WMARKET)
    for i in range(alone):
        a.submit(TRADERS[0] if i % 3 else GENESIS[0], "buy", 97, 1)
        if i % 50 == 0:
            a.heartbeat(GENESIS[0])
    for i in range(others):  # crossing orders: they finish, so compaction takes them
        op = b.submit(TRADERS[1 + i % 2], "sell" if i % 2 else "buy", 100, 1)
        c.apply(op.raw)
        if i % 200 == 0:
            for mine, witness, other in ((b, GENESIS[1], c), (c, GENESIS[2], b)):
                other.apply(mine.heartbeat(witness).raw)
    for op in b.ops() + c.ops():
        a.apply(op.raw)
    a.heartbeat(GENESIS[0])
    while True:
        held = dict(a.applied_index)
        report = a.compact()
        if not report.ops:
            break
        archive.ops.update((ident, held[ident]) for ident in report.ops)
    print(f"a holds {len(a)} ops, {a.final_count} final, {len(archive.ops)} compacted")
    for label in ("acknowledged_seq", "first_unacknowledged_compacted"):
        archive.reads = 0
        started = time.perf_counter()
        getattr(a, label)(a_key)
        took = time.perf_counter() - started
        print(f"{label}: {took * 1000:.1f} ms, {archive.reads} archive reads")


if __name__ == "__main__":
    main()
