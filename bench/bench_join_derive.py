"""A joined node derives its past on real nodes, killed (kill -9) in the middle: PASS or FAIL.

    python bench/bench_join_derive.py [--ops 30000] [--kill-at 0.3]

A witness and a trader (two keys, so orders fill) trade a witnessed market over loopback; then a
third node joins it from a snapshot, fetches the history before the point in the background
(``history_backfill`` 1 s) and derives its fills and orders (node/derive.py). With ``--kill-at
F`` (default 0.3; 0: no kill) it is killed with SIGKILL once its derivation's progress reaches
F, and started again on the same home: the derivation starts again (nothing is fetched again)
and ends with every fill equal to the witness's (index, orders, price, quantity, final). Prints
the times; exits 1 on a difference. Correctness under a crash, not speed: it needs real
processes and a minute of trading, so it is not in the test suite (tests/node/test_join.py and
test_join_network.py check the same without the kill).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from crdtbook.node.procs import NodeProcess, start_peer, start_witness, stop_all, wait_until

FIELDS = ("index", "taker", "maker", "price", "quantity", "final")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=30_000)
    parser.add_argument("--kill-at", type=float, default=0.3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="crdtbook-join-derive-"))
    config = {"point_interval": 500, "heartbeat_interval": 0.05, "join_peer_wait": 20.0}
    nodes: list[NodeProcess] = []
    passed = False
    try:
        spec, w = start_witness(tmp / "w", "DR", config, nodes)
        t = start_peer(tmp / "t", w, spec, config, nodes)
        began = time.monotonic()
        for i in range(args.ops // 2):
            price = str(100 + (i * 7) % 5 - 2)
            t.call("submit", market="DR", side="sell", price=price, quantity="2")
            w.call("submit", market="DR", side="buy", price=price, quantity="1")
        print(f"traded {args.ops} ops in {time.monotonic() - began:.1f} s")
        wait_until(
            lambda: w.market_status(digest=False)["compacted_ops"] >= args.ops - 1500,
            120,
            "the witness to compact",
        )
        time.sleep(6)  # past gossip's memory of the orders (test_join_network.GOSSIP_HISTORY_S)
        joiner = {**config, "history_backfill": 1.0}
        j = NodeProcess(tmp / "j", [w.addr], market=spec, config=joiner).start()
        nodes.append(j)
        began = time.monotonic()
        if args.kill_at > 0:
            wait_until(
                lambda: j.market_status(digest=False)["history_derived_progress"]
                >= args.kill_at,
                120,
                "the derivation to get that far",
            )
            progress = j.market_status(digest=False)["history_derived_progress"]
            assert j.proc is not None
            os.kill(j.proc.pid, signal.SIGKILL)
            j.proc.wait()
            print(f"killed the joiner at progress {progress}")
            j = NodeProcess(tmp / "j", [w.addr], market=spec, config=joiner).start()
            nodes[-1] = j
        wait_until(
            lambda: j.market_status(digest=False)["history_derived"] == "done",
            300,
            "the joiner to derive its past",
        )
        status = j.market_status(digest=False)
        print(f"derived {time.monotonic() - began:.1f} s after the join started (point "
              f"{status['joined_from_point']:,})")
        ours = j.call("fills", market="DR", limit=10**7)["fills"]
        theirs = w.call("fills", market="DR", limit=10**7)["fills"]
        same = [[f[k] for k in FIELDS] for f in ours] == [[f[k] for k in FIELDS] for f in theirs]
        lines = [line for line in j.log(200_000).splitlines() if "derived" in line]
        print("\n".join(lines[-2:]))
        print(f"fills: joiner {len(ours):,}, witness {len(theirs):,}: "
              f"{'PASS' if same else 'FAIL'}")
        passed = same
        return 0 if same else 1
    finally:
        stop_all(nodes)
        if passed:
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # a failure, or an error on the way: look at what the nodes did
            print(f"the nodes' homes and logs are kept in {tmp}")


if __name__ == "__main__":
    sys.exit(main())
