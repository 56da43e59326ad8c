"""What retention's acknowledgement walk costs after a cut heals one way.

A witness signs alone (cut off) while the two others trade among themselves; then it gets all
of theirs (the heal, one way), compacts, and asks ``first_unacknowledged_compacted``
(node/retention.py asks it before each pruning). Prints the time of each walk and how many
archive reads it made: in a node each read is a SQLite query and a decode (~17 us warm, so
the reads, not the walk, are most of the cost), and the walks run on the event loop. The world
is the tests' (``tests/core/witnessed.py``, ``cut_healed_one_way``).

    python bench/bench_ack_walk.py [A_OPS] [BC_OPS]       # default 3000 20000
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "core"))

from witnessed import GENESIS, cut_healed_one_way

INTERVAL = 2000


def main() -> None:
    alone = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    others = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    a, archive = cut_healed_one_way(alone, others, INTERVAL)
    print(f"a holds {len(a)} ops, {a.final_count} final, {len(archive.ops)} compacted")
    for label in ("acknowledged_seq", "first_unacknowledged_compacted"):
        archive.reads.clear()
        started = time.perf_counter()
        getattr(a, label)(GENESIS[0].public_key)
        took = time.perf_counter() - started
        reads = sum(archive.reads.values())
        print(f"{label}: {took * 1000:.1f} ms, {reads} archive reads")


if __name__ == "__main__":
    main()
