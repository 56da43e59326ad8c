"""A whole-log join from several full peers: how long, and how many ops it pulls.

    python bench/bench_join_peers.py [--ops 30000] [--peers 4] [--json]

Real node processes on 127.0.0.1 (bench_network's ``Node``): ``--peers`` nodes each hold the
same ``--ops``-op log of a market without witnesses (one store, copied), connected to the first;
then an empty node starts with all of them as bootstrap peers. Printed: the seconds from its
start until it holds every op, and the ops its sync sessions pulled (``status``'s
``sync_sessions.ops_pulled``). The baseline is in the same run: the log's size, the least a
join can pull (ratio 1.0).

Before session 13 each peer's first session pulled the whole log (the node asks every peer as
it connects): 4 peers, 30,000 ops, 13.0 and 13.4 s and 120,000 ops pulled (4.0x); since, a
market never pulled is pulled from one peer first (``node/sync_schedule.py``,
``FIRST_PULL_ALONE``): 3.5 s and 30,000 ops (1.0x).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_network import MARKET, Node, order_params

from crdtbook import Identity, Market, Replica
from crdtbook.node.store import OpStore

#: Bound on the join itself (a regression to pulling once per peer stays well inside it).
JOIN_TIMEOUT = 300.0


def run(ops: int, peers: int) -> dict[str, Any]:
    market = Market.parse(MARKET)
    rng = random.Random(7)
    authors = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(20)]
    replica = Replica(market)
    for _ in range(ops):
        p = order_params(rng)
        replica.submit(rng.choice(authors), p["side"], int(p["price"]), int(p["quantity"]),
                       p["tif"])
    with tempfile.TemporaryDirectory(prefix="bench-join-") as tmp_name:
        tmp = Path(tmp_name)
        seed = tmp / "seed"
        seed.mkdir(mode=0o700)
        with OpStore.open(seed) as store:
            store.add_market(market.id, market.name, market.tick, market.lot)
            store.add_ops((op.id, op.market_id, op.lamport, op.raw) for op in replica.ops())
        homes = []
        for i in range(peers):
            home = tmp / f"full{i}"
            shutil.copytree(seed, home)
            home.chmod(0o700)
            homes.append(home)
        fulls = [Node(homes[0], [])]
        try:
            fulls += [Node(home, [fulls[0].addr]) for home in homes[1:]]
            time.sleep(2)  # the full peers connect to each other
            started = time.monotonic()
            joiner = Node(tmp / "joiner", [full.addr for full in fulls])
            try:
                while joiner.market_status(digest=False)["ops"] < ops:
                    time.sleep(0.05)
                    if time.monotonic() - started > JOIN_TIMEOUT:
                        raise TimeoutError(f"the join took over {JOIN_TIMEOUT:.0f} s")
                seconds = time.monotonic() - started
                time.sleep(2)  # sessions still running end (they would pull more)
                sync = joiner.call("status", digest=False)["sync_sessions"]
                same = joiner.market_status()["digest"] == fulls[0].market_status()["digest"]
            finally:
                joiner.stop()
        finally:
            for full in fulls:
                full.stop()
    return {
        "ops": ops,
        "peers": peers,
        "seconds": round(seconds, 2),
        "ops_pulled": sync["ops_pulled"],
        "pulled_to_log": round(sync["ops_pulled"] / ops, 2),
        "sessions_pulled": sync["pulled"],
        "digests_agree": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=30_000)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.ops, args.peers)
    if args.json:
        print(json.dumps(result))
        return
    print(f"whole-log join of {result['ops']:,} ops from {result['peers']} peers: "
          f"{result['seconds']} s, {result['ops_pulled']:,} ops pulled "
          f"({result['pulled_to_log']}x the log, baseline 1.0x) in "
          f"{result['sessions_pulled']} sessions; digests agree: {result['digests_agree']}")


if __name__ == "__main__":
    main()
