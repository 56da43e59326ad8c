"""Deriving a joined market's past (node/derive.py, ``crdtbook.PrefixDerivation``): ops/s.

    python bench/bench_derive.py [OPS]      # default 60,000 ops of history

A witnessed market (3 witnesses heartbeating, 4 traders, orders, cancels) is traded by one
compacting replica; its compacted prefix, in total order, is what a joined node fetches. Then,
in the same run, per op of that prefix:

- the reference: ``HistoryCheck`` (two SHA-256 per op), what the history fetch already pays;
- one derivation pass as node/derive.py runs it: decode without signature check, feed, take,
  in chunks of ``DERIVE_CHUNK`` ops. A node runs two (check, then write) plus the store reads
  and writes.

Prints the figures; ``--json`` for scripts. Targets: none set by an issue; the docs quote the
figure (specs/join.md section 4b).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "core"))

from witnessed import DictArchive  # the tests' archive of compacted ops (a dict)

from crdtbook import HistoryCheck, Identity, Market, PrefixDerivation, Replica, decode
from crdtbook.node.derive import DERIVE_CHUNK

WITNESSES = [Identity.from_seed(bytes([0x61 + i]) * 32) for i in range(3)]
TRADERS = [Identity.from_seed(bytes([0x71 + i]) * 32) for i in range(4)]
MARKET = Market("DRV", "1", "1", witnesses=[w.public_key for w in WITNESSES])
INTERVAL = 2_000


def history(count: int, seed: int = 1) -> tuple[bytes, list[bytes]]:
    """The point state and the raw prefix of a replica that traded ``count`` ops."""
    rng = random.Random(seed)
    archive = DictArchive()
    replica = Replica(MARKET, archive=archive, point_interval=INTERVAL)
    prefix: list[bytes] = []
    resting: list[tuple[Identity, bytes]] = []
    for step in range(count):
        if step % 20 == 19:
            replica.heartbeat(WITNESSES[step % 3])
        elif rng.random() < 0.15 and resting:
            trader, order = resting.pop(rng.randrange(len(resting)))
            if replica.order(order) is not None:  # not compacted away (it finished)
                replica.cancel(trader, order)
        else:
            trader = rng.choice(TRADERS)
            op = replica.submit(trader, rng.choice(("buy", "sell")), rng.randint(95, 105),
                                rng.randint(1, 5))
            resting.append((trader, op.id))
            if len(resting) > 2_000:
                resting = resting[-1_000:]
        if step % 500 == 499:
            held = dict(replica.applied_index)
            report = replica.compact()
            prefix += [(held.get(i) or archive.ops[i]).raw for i in report.order]
            archive.ops.update((i, held[i]) for i in report.ops)
    return replica.snapshot(), prefix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ops", nargs="?", type=int, default=60_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    blob, raws = history(args.ops)
    from crdtbook import read_point

    info = read_point(MARKET, blob)
    started = time.process_time()
    check = HistoryCheck(info)
    for raw in raws:
        check.feed(raw)
    check.done()
    check_s = time.process_time() - started

    started = time.process_time()
    derivation = PrefixDerivation(MARKET, blob)
    for i in range(0, len(raws), DERIVE_CHUNK):
        derivation.feed(decode(raw, verify=False) for raw in raws[i : i + DERIVE_CHUNK])
        derivation.take()
    derivation.finish()
    derive_s = time.process_time() - started
    out = {
        "prefix_ops": len(raws),
        "fills": derivation.fills,
        "orders": derivation.orders,
        "history_check_ops_per_s": round(len(raws) / check_s),
        "derive_pass_ops_per_s": round(len(raws) / derive_s),
        "derive_us_per_op": round(derive_s / len(raws) * 1e6, 1),
        "derive_over_check": round(derive_s / check_s, 1),
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"prefix of {len(raws):,} ops ({derivation.fills:,} fills, {derivation.orders:,} "
          f"finished orders)")
    print(f"  history check (reference): {out['history_check_ops_per_s']:,} ops/s")
    print(f"  one derivation pass:       {out['derive_pass_ops_per_s']:,} ops/s "
          f"({out['derive_us_per_op']} us an op, {out['derive_over_check']}x the check)")


if __name__ == "__main__":
    main()
