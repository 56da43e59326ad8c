"""Soak: 5 nodes, minutes of mixed load on a witnessed market, with kills and a partition in the
middle. At the end every acknowledged op is on every node, the digests are equal, every fill is
final, and memory has not crept up.

    python bench/bench_soak.py [--minutes 5] [--nodes 5] [--rate 8] [--seed 1]
                               [--quick] [--json]

The market is witnessed by nodes 1-3 (heartbeats every 0.25 s while there is something to
acknowledge), so finality is exercised throughout; nodes 4 and 5 only trade. Each node has a
client thread sending orders (a third cross) and cancels of its own resting orders (one op in
five) at ``--rate`` ops/s. Over the run (D = the load's duration):

* at 0.25 D node 4 (a trader) is killed with SIGKILL and restarted 2 s later;
* at 0.40 D node 2 (a witness) likewise (finality stalls while it is away, then resumes);
* from 0.50 D to 0.70 D the network is split 3 | 2: nodes 4 and 5 ``block`` nodes 1-3 (the
  control method), and both sides keep trading;
* at D the load stops. Then: time until all nodes hold the same ops (same heads, nothing
  pending, the same digest), time until every fill is final on every node; then every node
  stops in order and each store is opened and checked for every acknowledged op id.

Figures: ops submitted (requests sent), acknowledged, present on every node at the end (must
equal acknowledged), the final digests (must be equal), fills and final fills (must be equal),
and per node: restarts, peak RSS, and RSS growth over the run (from the first sample 20 s after
the node's last start, or after a tenth of the run, to the end of the load; MB, MB/min, and
bytes per op the node's log gained meanwhile: the log is kept whole, so RSS grows with it).
A node that exits on its own is reported and fails the run. ``--quick``: 40 s of load and the
same events (under 90 s in all).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kill_soak import (
    CONVERGE_TIMEOUT,
    Load,
    Node,
    log,
    make_homes,
    start_network,
    stored_ids,
    wait_converged,
    witness_market,
)

from crdtbook import Market
from crdtbook.node.client import ControlError

WITNESSES = 3
FINALITY_TIMEOUT = 120.0


class Sampler:
    """RSS of every node every ``interval`` s, and nodes that exit without being told to."""

    def __init__(self, nodes: list[Node], interval: float, started: float) -> None:
        self.nodes = nodes
        self.interval = interval
        self.started = started
        #: Per node: (seconds into the run, RSS MB, incarnation, ops in its log).
        self.samples: list[list[tuple[float, float, int, int]]] = [[] for _ in nodes]
        self.expected_down: set[int] = set()
        self.crashes: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic() - self.started
            for i, node in enumerate(self.nodes):
                if i in self.expected_down:
                    continue
                if node.proc is not None and node.proc.poll() is not None:
                    if not any(c["node"] == i + 1 and c["pid"] == node.proc.pid
                               for c in self.crashes):
                        self.crashes.append({"node": i + 1, "pid": node.proc.pid, "at_s": now,
                                             "exit": node.proc.returncode})
                    continue
                rss = node.rss_mb()
                try:
                    ops = int(node.market_status(digest=False)["ops"])
                except (OSError, ControlError):
                    continue
                if rss is not None:
                    self.samples[i].append((now, rss, node.restarts, ops))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def kill_and_restart(nodes: list[Node], index: int, down_s: float, sampler: Sampler,
                     events: list[dict[str, Any]], started: float) -> None:
    node = nodes[index]
    sampler.expected_down.add(index)
    node.kill9()
    at = time.monotonic() - started
    time.sleep(down_s)
    node.start()
    node.restarts += 1
    sampler.expected_down.discard(index)
    events.append({"event": f"kill -9 node {index + 1}, restarted after {down_s:g} s",
                   "at_s": round(at, 1)})
    log(f"  {at:6.1f} s: killed node {index + 1}; restarted")


def split(nodes: list[Node], seconds: float, events: list[dict[str, Any]],
          started: float) -> None:
    """Nodes 4 and 5 block nodes 1-3 for ``seconds`` (the others cannot reach them either)."""
    side_a = [json.loads((n.home / "node.json").read_text())["peer_id"] for n in nodes[:3]]
    at = time.monotonic() - started
    for node in nodes[3:]:
        for peer in side_a:
            node.call("block", peer_id=peer, seconds=seconds)
    time.sleep(1.0)
    across = sum(
        1
        for node in nodes[3:]
        for peer in node.call("status", digest=False)["peers"]
        if peer["peer_id"] in side_a
    )
    events.append({"event": f"split 3 | {len(nodes) - 3} (block) for {seconds:g} s; "
                            f"connections across it 1 s later: {across}",
                   "at_s": round(at, 1), "connections_across": across})
    log(f"  {at:6.1f} s: split 3 | {len(nodes) - 3} for {seconds:g} s ({across} connections "
        "across after 1 s)")


def wait_final(nodes: list[Node], timeout: float) -> tuple[float | None, list[dict[str, Any]]]:
    """Seconds until every fill is final on every node (None on timeout), and the statuses."""
    started = time.monotonic()
    statuses: list[dict[str, Any]] = []
    while time.monotonic() - started < timeout:
        try:
            statuses = [n.market_status(digest=False) for n in nodes]
        except (OSError, ControlError):
            time.sleep(0.2)
            continue
        if all(s["final_fills"] == s["fills"] and s["finality"] == "final" for s in statuses):
            return time.monotonic() - started, statuses
        time.sleep(0.2)
    return None, statuses


def growth(samples: list[tuple[float, float, int, int]], warm_from: float) -> dict[str, Any]:
    """RSS figures of a node's last incarnation, from ``warm_from`` s into the run (or 20 s
    after that incarnation's first sample, whichever is later) to its last sample."""
    if not samples:
        return {"rss_start_mb": None, "rss_end_mb": None, "growth_mb": None,
                "growth_mb_per_min": None, "growth_b_per_op": None}
    last = samples[-1][2]
    mine = [s for s in samples if s[2] == last]
    begin = max(warm_from, mine[0][0] + (20.0 if last else 0.0))
    window = [s for s in mine if s[0] >= begin] or mine[-1:]
    first, end = window[0], window[-1]
    minutes = (end[0] - first[0]) / 60
    return {
        "rss_start_mb": round(first[1], 1),
        "rss_end_mb": round(end[1], 1),
        "growth_mb": round(end[1] - first[1], 1),
        "growth_mb_per_min": round((end[1] - first[1]) / minutes, 2) if minutes > 0.2 else None,
        # Against the ops the log gained meanwhile: the log is kept whole (a CRDT), so RSS
        # grows with it; bench_core.py measures ~0.8 KB per op held by the core alone.
        "growth_b_per_op": round((end[1] - first[1]) * 2**20 / (end[3] - first[3]))
        if end[3] - first[3] >= 1000
        else None,
        "ops_gained": end[3] - first[3],
        "window_s": round(end[0] - first[0], 1),
    }


def run(tmp: Path, n: int, seconds: float, rate: float, seed: int) -> dict[str, Any]:
    homes = make_homes(tmp, n)
    market = witness_market(homes[:WITNESSES])
    parsed = Market.parse(market)
    down_s = 2.0
    started = time.monotonic()
    log(f"starting {n} nodes (witnesses: nodes 1-{WITNESSES})")
    nodes = start_network(homes, market)
    events: list[dict[str, Any]] = []
    loads: list[Load] = []
    sampler = Sampler(nodes, 2.0 if seconds >= 120 else 1.0, started)
    result: dict[str, Any] = {}
    try:
        load_start = time.monotonic()
        loads = [Load(node, rate, seed * 100 + i) for i, node in enumerate(nodes)]
        log(f"load: {rate:g} ops/s per node for {seconds:g} s")
        plan = [
            (0.25, lambda: kill_and_restart(nodes, 3, down_s, sampler, events, started)),
            (0.40, lambda: kill_and_restart(nodes, 1, down_s, sampler, events, started)),
            (0.50, lambda: split(nodes, 0.2 * seconds, events, started)),
        ]
        for fraction, action in plan:
            delay = load_start + fraction * seconds - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            action()
        delay = load_start + seconds - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        load_end = time.monotonic() - started
        for load in loads:
            load.stop()
        log(f"  {load_end:6.1f} s: load stopped")
        sampler.stop()
        converge_s = wait_converged(nodes, CONVERGE_TIMEOUT)
        log(f"converged: {converge_s if converge_s is None else round(converge_s, 2)} s")
        final_s, statuses = wait_final(nodes, FINALITY_TIMEOUT)
        log(f"every fill final: {final_s if final_s is None else round(final_s, 2)} s")
        digests = [n.market_status()["digest"] for n in nodes]
        hwm = []
        for node in nodes:
            peak = None
            if node.proc is not None and node.proc.poll() is None:
                for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = round(int(line.split()[1]) / 1024, 1)
            hwm.append(peak)
        codes = [node.stop() for node in nodes]
        acked = {i for load in loads for i in load.acked}
        stores = [stored_ids(node.home, parsed)[0] for node in nodes]
        everywhere = set.intersection(*[ids or set() for ids in stores])
        warm_from = 0.1 * seconds + (load_start - started)
        per_node = []
        for i, node in enumerate(nodes):
            samples = sampler.samples[i]
            per_node.append({
                "node": i + 1,
                "witness": i < WITNESSES,
                "restarts": node.restarts,
                "peak_rss_mb": round(max(s[1] for s in samples), 1) if samples else None,
                "vm_hwm_mb_last_process": hwm[i],
                **growth(samples, warm_from),
                "exit_code": codes[i],
            })
        result = {
            "ops_submitted": sum(load.submitted for load in loads),
            "ops_acknowledged": len(acked),
            "present_on_every_node": len(acked & everywhere),
            "stores_opened": sum(ids is not None for ids in stores),
            "ops_in_log": statuses[0]["ops"] if statuses else None,
            "fills": statuses[0]["fills"] if statuses else None,
            "final_fills": statuses[0]["final_fills"] if statuses else None,
            "all_fills_final": final_s is not None,
            "final_digests": digests,
            "digests_equal": len(set(digests)) == 1,
            "converge_after_load_s": None if converge_s is None else round(converge_s, 2),
            "all_final_after_converge_s": None if final_s is None else round(final_s, 2),
            "refused_while_down": sum(load.down_errors for load in loads),
            "control_errors": [e for load in loads for e in load.control_errors][:5],
            "crashes": sampler.crashes,
            "events": events,
            "nodes": per_node,
            "elapsed_s": round(time.monotonic() - started, 1),
        }
    finally:
        sampler.stop()
        for load in loads:
            load.stop()
        for node in nodes:
            node.stop()
    result["pass"] = bool(
        result
        and result["present_on_every_node"] == result["ops_acknowledged"]
        and result["stores_opened"] == n
        and result["digests_equal"]
        and result["all_fills_final"]
        and result["converge_after_load_s"] is not None
        and not result["crashes"]
        and all(e.get("connections_across", 0) == 0 for e in result["events"])
        and not result["control_errors"]
        and all(code == 0 for code in (p["exit_code"] for p in result["nodes"]))
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="load duration (default 5)")
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--rate", type=float, default=8.0, help="ops/s per node")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="40 s of load, under 90 s in all")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.nodes < 5:
        parser.error("the soak needs 5 nodes or more (3 witnesses, 2 traders to kill and split)")
    seconds = 40.0 if args.quick else args.minutes * 60
    load_before = os.getloadavg()[0]
    log(f"soak: {args.nodes} nodes, {seconds:g} s of load, load average {load_before:.2f}")
    with tempfile.TemporaryDirectory(prefix="crdtbook-soak-") as tmp:
        report = run(Path(tmp), args.nodes, seconds, args.rate, args.seed)
    report["params"] = {"nodes": args.nodes, "load_s": seconds, "rate_per_node": args.rate,
                        "seed": args.seed, "witnesses": WITNESSES, "quick": args.quick}
    report["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["pass"] else 1
    r = report
    print(f"soak: {args.nodes} nodes (witnesses 1-{WITNESSES}), {seconds:g} s of load at "
          f"{args.rate:g} ops/s per node; load average {r['load_average'][0]} -> "
          f"{r['load_average'][1]}")
    for event in r["events"]:
        print(f"  {event['at_s']:>7} s  {event['event']}")
    print(f"ops submitted {r['ops_submitted']}, acknowledged {r['ops_acknowledged']}, present on "
          f"every node {r['present_on_every_node']} (must be equal); log {r['ops_in_log']} ops "
          f"(with heartbeats)")
    print(f"fills {r['fills']}, final {r['final_fills']} (all final: {r['all_fills_final']}); "
          f"converged {r['converge_after_load_s']} s after the load, all final "
          f"{r['all_final_after_converge_s']} s later")
    print(f"final digests equal: {r['digests_equal']} ({r['final_digests'][0][:16]}...)")
    print(f"{'node':>4} {'role':>8} {'restarts':>8} {'peak RSS':>9} {'RSS start':>9} "
          f"{'RSS end':>8} {'growth':>7} {'MB/min':>7} {'B/op':>6}")
    for p in r["nodes"]:
        print(f"{p['node']:>4} {'witness' if p['witness'] else 'trader':>8} {p['restarts']:>8} "
              f"{p['peak_rss_mb']!s:>9} {p['rss_start_mb']!s:>9} {p['rss_end_mb']!s:>8} "
              f"{p['growth_mb']!s:>7} {p['growth_mb_per_min']!s:>7} {p['growth_b_per_op']!s:>6}")
    if r["crashes"]:
        print(f"CRASHES: {r['crashes']}")
    print(f"elapsed {r['elapsed_s']} s")
    print("PASS" if r["pass"] else "FAIL")
    return 0 if r["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
