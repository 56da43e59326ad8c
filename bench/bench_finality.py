"""Finality benchmark: how long from submit until an op is final on every node, and what the
heartbeats cost. Real node processes on 127.0.0.1, every node a witness of one market.

    python bench/bench_finality.py [--nodes 3 5] [--rates 100 500] [--seconds 10]
                                   [--heartbeat 0.25] [--quick] [--json] [--core-only]

For each (nodes, rate): a fresh network; orders and cancels submitted at a fixed rate round robin
over the nodes; each node's watch stream reports the ids of ops as they are applied and as they
become final. Figures: submit -> applied on every node, and submit -> final on every node (p50,
p99), the heartbeats emitted, and node CPU per op. Baseline in the same run: the same load on a
market without witnesses (no heartbeats, nothing final), for the cost of heartbeats.

Also, in-process (``core``): the same orders applied to a market without witnesses and to a
witnessed one where each of 3 witnesses heartbeats every ``batch`` ops (each replica sees every
op in order): ops/s of both, so the core's cost of placement and re-sorting shows as a ratio.

Target (issue #8): p99 submit-to-final on every node <= 1 s at 500 ops/s with 250 ms heartbeats.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_network import Node, run_load, wait_converged

from crdtbook import Identity, Market
from crdtbook.node.procs import NodeProcess, make_identity


def start_node(home: Path, market: str, heartbeat: float, bootstrap: list[str]) -> Node:
    """bench_network's node (its load and convergence helpers take one), launched by the
    package's harness (crdtbook.node.procs) following ``market`` with this heartbeat interval."""
    command = NodeProcess(
        home, bootstrap, market, config={"heartbeat_interval": heartbeat}, verbose=0
    ).command()
    return Node(home, bootstrap, command=command)


class Seen:
    """Per node, when each op id was first reported applied and first reported final."""

    def __init__(self, nodes: list[Node]) -> None:
        self.applied: list[dict[str, float]] = [{} for _ in nodes]
        self.final: list[dict[str, float]] = [{} for _ in nodes]
        self._socks = []
        for i, node in enumerate(nodes):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(node.home / "control.sock"))
            req = {"id": 1, "method": "watch",
                   "params": {"digest": False, "interval": 0.02, "finalized": True}}
            sock.sendall((json.dumps(req) + "\n").encode())
            self._socks.append(sock)
            threading.Thread(target=self._read, args=(sock, i), daemon=True).start()

    def _read(self, sock: socket.socket, i: int) -> None:
        buf = b""
        try:
            while chunk := sock.recv(1 << 20):
                now = time.monotonic()
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    event = json.loads(line)
                    for ident in event.get("applied", ()):
                        self.applied[i].setdefault(ident, now)
                    for ident in event.get("finalized", ()):
                        self.final[i].setdefault(ident, now)
        except OSError:
            return

    def everywhere(self, table: list[dict[str, float]], ident: str) -> float | None:
        times = [t.get(ident) for t in table]
        return None if any(x is None for x in times) else max(x for x in times if x is not None)

    def close(self) -> None:
        for sock in self._socks:
            sock.close()


def percentiles(values: list[float]) -> dict[str, float | None]:
    values = sorted(values)
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "p50_ms": round(statistics.median(values), 1),
        "p99_ms": round(values[max(0, int(len(values) * 0.99) - 1)], 1),
        "max_ms": round(values[-1], 1),
    }


def run(tmp: Path, n: int, rate: float, seconds: float, heartbeat: float,
        witnessed: bool) -> dict[str, Any]:
    homes = [tmp / f"n{i + 1}" for i in range(n)]
    keys = []
    for home in homes:
        home.mkdir(parents=True)
        keys.append(make_identity(home))
    market = Market("FIN", "1", "1", witnesses=keys if witnessed else ()).spec
    nodes = [start_node(homes[0], market, heartbeat, [])]
    try:
        nodes += [start_node(h, market, heartbeat, [nodes[0].addr]) for h in homes[1:]]
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if all(len(nd.call("status")["peers"]) >= n - 1 for nd in nodes):
                break
            time.sleep(0.2)
        time.sleep(2.0)  # gossipsub meshes form over a few of its heartbeats
        seen = Seen(nodes)
        time.sleep(0.3)
        cpu_before = sum(nd.cpu_s() for nd in nodes)
        sent = run_load(nodes, rate, seconds, threads_per_node=4, seed=7)
        wait_converged(nodes, 120)
        final_deadline = time.monotonic() + 30
        while witnessed and time.monotonic() < final_deadline:
            ms = [nd.market_status(digest=False) for nd in nodes]
            if all(m.get("final_ops") == m["ops"] or m.get("finality") == "final" for m in ms):
                break
            time.sleep(0.05)
        time.sleep(0.3)
        cpu = sum(nd.cpu_s() for nd in nodes) - cpu_before
        applied, final, unfinal = [], [], 0
        for ident, t0 in sent:
            t = seen.everywhere(seen.applied, ident)
            if t is not None:
                applied.append((t - t0) * 1000)
            f = seen.everywhere(seen.final, ident)
            if f is None:
                unfinal += 1
            else:
                final.append((f - t0) * 1000)
        seen.close()
        statuses = [nd.market_status(digest=False) for nd in nodes]
        return {
            "nodes": n,
            "rate": rate,
            "witnessed": witnessed,
            "ops_submitted": len(sent),
            "ops_in_log": statuses[0]["ops"],
            "applied_everywhere": percentiles(applied),
            "final_everywhere": percentiles(final) if witnessed else None,
            "never_seen_final": unfinal if witnessed else None,
            "node_cpu_ms_per_op": round(cpu / max(1, len(sent)) * 1000, 3),
        }
    finally:
        for nd in nodes:
            nd.stop()


def core(ops: int = 20_000, batch: int = 100) -> dict[str, Any]:
    """In-process derivation speed with and without witnesses on the same order flow."""
    import random

    from crdtbook import Replica

    rng = random.Random(3)
    traders = [Identity.from_seed(bytes([40 + i]) * 32) for i in range(8)]
    witnesses = [Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3)]
    flows = []
    for witnessed in (False, True):
        market = Market("CORE", "1", "1", witnesses=[w.public_key for w in witnesses]
                        if witnessed else ())
        author = Replica(market)
        made = []
        for i in range(ops):
            side = rng.choice(("buy", "sell"))
            price = rng.randint(95, 101) if side == "buy" else rng.randint(99, 105)
            made.append(author.submit(rng.choice(traders), side, price, rng.randint(1, 5)))
            if witnessed and i % batch == batch - 1:
                made.extend(author.heartbeat(w) for w in witnesses)
        flows.append((market, made))
    out: dict[str, Any] = {"ops": ops, "heartbeat_every": batch}
    for (market, made), name in zip(flows, ("plain", "witnessed"), strict=True):
        best = float("inf")
        for _ in range(3):
            replica = Replica(market)
            t0 = time.process_time()
            for op in made:
                replica.apply(op)
            best = min(best, time.process_time() - t0)
        out[name + "_ops_per_s"] = round(len(made) / best)
        if name == "witnessed":
            out["witnessed_final_fills"] = replica.final_fill_count()
            out["witnessed_fills"] = len(replica.fills())
    out["witnessed_over_plain_time"] = round(out["plain_ops_per_s"] / out["witnessed_ops_per_s"], 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 500])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--heartbeat", type=float, default=0.25)
    parser.add_argument("--quick", action="store_true", help="3 nodes, 100 ops/s, 4 s")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--core-only", action="store_true", help="only the in-process figures")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.rates, args.seconds = [3], [100], 4.0
    core_figures = core(5_000 if args.quick else 20_000)
    if not args.json:
        print(
            f"core: {core_figures['ops']} orders, heartbeats from 3 witnesses every "
            f"{core_figures['heartbeat_every']} ops: plain {core_figures['plain_ops_per_s']:,} "
            f"ops/s, witnessed {core_figures['witnessed_ops_per_s']:,} ops/s "
            f"({core_figures['witnessed_over_plain_time']}x the time); "
            f"{core_figures['witnessed_final_fills']} of {core_figures['witnessed_fills']} "
            "fills final",
            flush=True,
        )
    results: list[dict[str, Any]] = []
    if args.core_only:
        args.nodes = []
    with tempfile.TemporaryDirectory(prefix="crdtbook-fin-") as tmp:
        for n in args.nodes:
            for rate in args.rates:
                for witnessed in (True, False):
                    where = Path(tmp) / f"{n}-{int(rate)}-{'w' if witnessed else 'plain'}"
                    results.append(run(where, n, rate, args.seconds, args.heartbeat, witnessed))
                    if not args.json:
                        r = results[-1]
                        fe = r["final_everywhere"] or {}
                        print(
                            f"{n} nodes {int(rate):>4} ops/s "
                            f"{'witnessed' if witnessed else 'no witnesses':<13}"
                            f" applied p50/p99 {r['applied_everywhere']['p50_ms']}/"
                            f"{r['applied_everywhere']['p99_ms']} ms"
                            + (f"  final p50/p99 {fe.get('p50_ms')}/{fe.get('p99_ms')} ms"
                               f" (never final: {r['never_seen_final']})" if witnessed else "")
                            + f"  log {r['ops_in_log']} ops for {r['ops_submitted']} submitted"
                            f"  node CPU {r['node_cpu_ms_per_op']} ms/op",
                            flush=True,
                        )
    if args.json:
        print(json.dumps({"core": core_figures, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
