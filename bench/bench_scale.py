"""Scale bench (issue #12): what a node costs as the network grows, real processes on 127.0.0.1.

    python bench/bench_scale.py                         # 3, 5, 10, 15, 20 nodes; 20 and 100 ops/s
    python bench/bench_scale.py --nodes 5,20 --rates 100 --seconds 10 --json

For each network size, one network of node processes (bench_network's ``Node``: one market,
node 1 the bootstrap of the others, meshes given a few heartbeats to form), then in turn:

  1. idle: nothing submitted for ``--idle`` seconds: CPU per node (% of one core);
  2. each rate: orders and cancels at a fixed rate, round robin over the nodes (bench_network's
     load) for ``--seconds``; per op, submit -> applied on every node (each node's watch
     stream), p50/p99; node CPU from the first submit until every op was seen everywhere, per
     op and per node, with and without the idle cost of that window; then the nodes' digests
     are compared (``wait_converged``);
  3. RSS per node.

Targets (issue #12, 2-core machine): CPU per op per node at 20 nodes at most 1.5x that at 5 nodes
(same rate, same run: the 5-node row is the baseline); 20 nodes at 100 ops/s converge with p99
at most 1 s. On a shared machine read the ratios, and the load averages printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_network import Node, Seen, run_load, start_network, wait_converged

#: Largest CPU per op per node at 20 nodes, as a multiple of the figure at 5 nodes (issue #12).
MAX_GROWTH_5_TO_20: Final = 1.5
#: Largest p99 (ms) of 20 nodes at 100 ops/s (issue #12).
MAX_P99_20_AT_100_MS: Final = 1000.0
#: How long every op may take to be seen on every node before the bench gives up on it.
SEEN_TIMEOUT: Final = 60.0


def _cpu(nodes: list[Node]) -> float:
    return sum(nd.cpu_s() for nd in nodes)


def _wait_seen(seen: Seen, ids: list[str], timeout: float) -> int:
    """Wait until every id was reported applied on every node; the number still missing."""
    deadline = time.monotonic() + timeout
    missing = list(ids)
    while missing and time.monotonic() < deadline:
        missing = [i for i in missing if seen.everywhere(i) is None]
        if missing:
            time.sleep(0.05)
    return len(missing)


def measure(tmp: Path, n: int, rates: list[float], seconds: float, idle: float) -> dict[str, Any]:
    nodes = start_network(tmp, n, 2000, 0.002)
    row: dict[str, Any] = {"nodes": n, "load_start": os.getloadavg()[0]}
    try:
        seen = Seen(nodes)
        time.sleep(0.5)
        cpu0, t0 = _cpu(nodes), time.monotonic()
        time.sleep(idle)
        idle_cpu_s = (_cpu(nodes) - cpu0) / (time.monotonic() - t0)  # all nodes, per second
        row["idle_cpu_pct_per_node"] = round(100 * idle_cpu_s / n, 2)
        row["rss_mb_idle"] = round(statistics.mean(nd.rss_mb() for nd in nodes), 1)
        row["rates"] = {}
        for k, rate in enumerate(rates):
            cpu0, t0 = _cpu(nodes), time.monotonic()
            sent = run_load(nodes, rate, seconds, threads_per_node=2 if n < 10 else 1, seed=11 + k)
            unseen = _wait_seen(seen, [ident for ident, _ in sent], SEEN_TIMEOUT)
            used, window = _cpu(nodes) - cpu0, time.monotonic() - t0
            lat = sorted(
                (t - t_sub) * 1000
                for ident, t_sub in sent
                if (t := seen.everywhere(ident)) is not None
            )
            ops = max(1, len(sent))
            wait_converged(nodes, 120)  # same heads and digests everywhere, or it raises
            row["rates"][str(int(rate))] = {
                "ops": len(sent),
                "rate_achieved": round(len(sent) / seconds, 1),
                "p50_ms": round(statistics.median(lat), 1) if lat else None,
                "p99_ms": round(lat[max(0, int(len(lat) * 0.99) - 1)], 1) if lat else None,
                "unobserved": unseen,
                "cpu_ms_per_op_per_node": round(used / ops / n * 1000, 3),
                "cpu_ms_per_op_per_node_net_of_idle": round(
                    max(0.0, used - idle_cpu_s * window) / ops / n * 1000, 3
                ),
                "window_s": round(window, 2),
            }
            time.sleep(1.0)  # let the last syncs and gossip settle before the next rate
        seen.close()
        row["rss_mb"] = round(statistics.mean(nd.rss_mb() for nd in nodes), 1)
        row["rss_mb_max"] = round(max(nd.rss_mb() for nd in nodes), 1)
        row["load_end"] = os.getloadavg()[0]
        return row
    finally:
        for nd in nodes:
            nd.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", default="3,5,10,15,20", help="network sizes, comma-separated")
    ap.add_argument("--rates", default="20,100", help="submit rates (ops/s), comma-separated")
    ap.add_argument("--seconds", type=float, default=10.0, help="load per rate")
    ap.add_argument("--idle", type=float, default=10.0, help="idle measurement per network")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sizes = [int(x) for x in args.nodes.split(",")]
    rates = [float(x) for x in args.rates.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="crdtbook-scale-"))
    started = time.monotonic()
    rows = []
    try:
        for n in sizes:
            print(f"  {n} nodes ...", file=sys.stderr, flush=True)
            rows.append(measure(tmp / f"n{n}", n, rates, args.seconds, args.idle))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    by_n = {row["nodes"]: row for row in rows}
    checks = []
    for rate in rates:
        key = str(int(rate))
        if 5 in by_n and 20 in by_n:
            a = by_n[5]["rates"][key]["cpu_ms_per_op_per_node"]
            b = by_n[20]["rates"][key]["cpu_ms_per_op_per_node"]
            checks.append(
                {
                    "what": f"cpu/op/node 20 vs 5 nodes at {key} ops/s",
                    "value": round(b / a, 2),
                    "target": f"<= {MAX_GROWTH_5_TO_20}",
                    "pass": b / a <= MAX_GROWTH_5_TO_20,
                }
            )
    if 20 in by_n and "100" in by_n[20]["rates"]:
        p99 = by_n[20]["rates"]["100"]["p99_ms"]
        checks.append(
            {
                "what": "p99 of 20 nodes at 100 ops/s (ms)",
                "value": p99,
                "target": f"<= {MAX_P99_20_AT_100_MS:.0f}",
                "pass": p99 is not None and p99 <= MAX_P99_20_AT_100_MS,
            }
        )
    result = {
        "rows": rows,
        "checks": checks,
        "cores": os.cpu_count(),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"crdtbook scale bench: node processes on 127.0.0.1, {os.cpu_count()} cores")
    head = ["nodes", "idle CPU/node", "RSS/node"]
    for rate in rates:
        head += [f"@{rate:.0f}/s p50/p99 ms", f"@{rate:.0f}/s CPU/op/node ms (net idle)"]
    print(" | ".join(head))
    for row in rows:
        cells = [
            str(row["nodes"]),
            f"{row['idle_cpu_pct_per_node']:.1f}%",
            f"{row['rss_mb']:.0f} MB",
        ]
        for rate in rates:
            r = row["rates"][str(int(rate))]
            cells.append(
                f"{r['p50_ms']} / {r['p99_ms']}"
                + (f" ({r['unobserved']} unseen)" if r["unobserved"] else "")
            )
            cells.append(
                f"{r['cpu_ms_per_op_per_node']:.2f} ({r['cpu_ms_per_op_per_node_net_of_idle']:.2f})"
            )
        print(" | ".join(cells) + f"   [load {row['load_start']:.1f}-{row['load_end']:.1f}]")
    for check in checks:
        mark = "PASS" if check["pass"] else "FAIL"
        print(f"  {check['what']:<44} {check['value']!s:>8}  {check['target']:<8} {mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
