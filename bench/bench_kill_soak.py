"""kill -9 soak: one node of a 3-node network is killed at random moments under a steady mixed
load and restarted, again and again. After each kill: its store opens, every op it had
acknowledged is in it, and once restarted it converges with the others.

    python bench/bench_kill_soak.py [--kills 20] [--rate 15] [--seed 1] [--witnessed]
                                    [--quick] [--json]

Each node gets its own client thread sending orders (a third cross) and cancels of its resting
orders (one op in five) at ``--rate`` ops/s, one request at a time; the victim (node 3, not the
bootstrap node) is killed with SIGKILL after a random 0.5 to 3 s of load (0.3 to 1 s with
``--quick``), in the middle of whatever it was doing. While it is dead its store is opened
(SQLite's WAL recovery runs) and checked: every op id the victim acknowledged so far must be
there. It is restarted, the load pauses (0.3 s for requests in flight), and the time from the
restarted node's first answer until all three nodes hold the same ops with the same digest is
the time to converge; then the load resumes. At the end every node
stops in order and every op acknowledged by any node must be in every node's store.

Per kill: ops the victim had acknowledged (since the start), how many of them its store holds
after the kill, missing (must be 0), whether the store opened (and how long it took), restart
time, time to converge. In total: kills, ops acknowledged, ops found in every store, missing,
store opens, convergence times. Exit status 1 if anything is missing, a store did not open or
the network did not converge.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from crdtbook import Market, op_id
from crdtbook.node.client import ControlClient, ControlError
from crdtbook.node.procs import NodeProcess, make_identity
from crdtbook.node.store import OpStore

PLAIN_MARKET = "SOAK:1:1"
START_TIMEOUT = 60.0
#: A node with a big store takes a while to checkpoint at an orderly stop.
STOP_TIMEOUT = 20.0
CONVERGE_TIMEOUT = 120.0


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Node(NodeProcess):
    """One node process (the package's harness, crdtbook.node.procs), started through the CLI
    on 127.0.0.1 with a free port; ``restarts`` counts the soak's restarts of it."""

    def __init__(self, home: Path, market: str, bootstrap: list[str], name: str) -> None:
        super().__init__(
            home, bootstrap, market, log_path=home.parent / f"{name}.log", call_timeout=30
        )
        self.name = name
        self.restarts = 0

    def start(self, timeout: float = START_TIMEOUT) -> Node:
        return super().start(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop in order (SIGINT); SIGKILL if it does not stop. Returns the exit code."""
        return super().stop(timeout)


class Load:
    """Orders and cancels of its own resting orders (one op in five) on one node, at ``rate``
    ops/s, one request at a time, from a thread; the node may be down meanwhile. Records each
    acknowledged op id; ``paused`` holds it between requests."""

    def __init__(self, node: Node, rate: float, seed: int) -> None:
        self.node = node
        self.interval = 1.0 / rate
        self.rng = random.Random(seed)
        self.acked: list[str] = []
        self.submitted = 0
        self.down_errors = 0
        self.control_errors: list[tuple[str, str]] = []
        self.running = threading.Event()
        self.running.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _params(self) -> dict[str, Any]:
        side = self.rng.choice(("buy", "sell"))
        price = self.rng.randint(95, 101) if side == "buy" else self.rng.randint(99, 105)
        return {"side": side, "price": str(price), "quantity": str(self.rng.randint(1, 4))}

    def _run(self) -> None:
        resting: list[str] = []
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.running.wait()
            now = time.monotonic()
            if now < next_at:
                time.sleep(next_at - now)
            next_at = max(next_at + self.interval, time.monotonic() - 1.0)
            self.submitted += 1
            try:
                with ControlClient(self.node.home, timeout=30) as client:
                    if resting and self.rng.random() < 0.2:
                        result = client.call("cancel", order_id=resting.pop(0))
                        if result["cancel_id"] is not None:  # null: final, nothing signed
                            self.acked.append(result["cancel_id"])
                    else:
                        result = client.call("submit", **self._params())
                        self.acked.append(result["order"]["id"])
                        if result["order"]["status"] in ("open", "partially_filled"):
                            resting.append(result["order"]["id"])
            except ControlError as exc:
                self.control_errors.append((exc.code, exc.message))
            except OSError:  # down (killed, restarting): not acknowledged
                self.down_errors += 1
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self.running.set()
        self._thread.join(30)


def pause(loads: list[Load]) -> None:
    for load in loads:
        load.running.clear()
    time.sleep(0.3)  # a request in flight finishes


def resume(loads: list[Load]) -> None:
    for load in loads:
        load.running.set()


def stored_ids(home: Path, market: Market) -> tuple[set[str] | None, float, str]:
    """(op ids in the store of ``home``, or None if it did not open; seconds; error)."""
    started = time.monotonic()
    try:
        with OpStore.open(home) as store:
            ids = {op_id(raw).hex() for raw in store.load_market(market.id)}
    except Exception as exc:  # the figure: did the store open, and why not
        return None, time.monotonic() - started, f"{type(exc).__name__}: {exc}"
    return ids, time.monotonic() - started, ""


def wait_converged(nodes: list[Node], timeout: float) -> float | None:
    """Seconds until every node holds the same ops (same heads, nothing pending) with the same
    digest; None on timeout."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        try:
            ms = [n.market_status(digest=False) for n in nodes]
            if len({tuple(m["heads"]) for m in ms}) == 1 and all(
                m["pending"] == 0 and m["missing"] == 0 for m in ms
            ):
                digests = {n.market_status()["digest"] for n in nodes}
                if len(digests) == 1:
                    return time.monotonic() - started
        except (OSError, ControlError):
            pass
        time.sleep(0.1)
    return None


def make_homes(tmp: Path, count: int) -> list[Path]:
    homes = []
    for i in range(count):
        home = tmp / f"n{i + 1}"
        home.mkdir(mode=0o700, parents=True)
        homes.append(home)
    return homes


def witness_market(homes: list[Path], name: str = "SOAK") -> str:
    """A market witnessed by the nodes of ``homes`` (their keys made here, before they start)."""
    keys = [make_identity(home) for home in homes]
    return Market(name, "1", "1", witnesses=keys).spec


def start_network(homes: list[Path], market: str) -> list[Node]:
    first = Node(homes[0], market, [], "n1").start()
    nodes = [first]
    try:
        for i, home in enumerate(homes[1:], start=2):
            nodes.append(Node(home, market, [first.addr], f"n{i}").start())
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if all(len(n.call("status", digest=False)["peers"]) >= len(nodes) - 1 for n in nodes):
                break
            time.sleep(0.2)
        time.sleep(1.5)  # gossipsub meshes form over a few of its heartbeats
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def run(tmp: Path, kills: int, rate: float, seed: int, quick: bool,
        witnessed: bool) -> dict[str, Any]:
    rng = random.Random(seed)
    homes = make_homes(tmp, 3)
    market = witness_market(homes) if witnessed else PLAIN_MARKET
    parsed = Market.parse(market)
    wait_range = (0.3, 1.0) if quick else (0.5, 3.0)
    started = time.monotonic()
    nodes = start_network(homes, market)
    victim = nodes[2]
    loads: list[Load] = []
    rows: list[dict[str, Any]] = []
    final: dict[str, Any] = {}
    try:
        loads = [Load(node, rate, seed * 100 + i) for i, node in enumerate(nodes)]
        for k in range(kills):
            wait = rng.uniform(*wait_range)
            time.sleep(wait)
            victim.kill9()
            at = time.monotonic() - started
            acked = set(loads[2].acked)
            ids, open_s, error = stored_ids(victim.home, parsed)
            found = len(acked & ids) if ids is not None else 0
            t0 = time.monotonic()
            victim.start()
            victim.restarts += 1
            ready = time.monotonic()
            restart_s = ready - t0
            pause(loads)
            converged = wait_converged(nodes, CONVERGE_TIMEOUT)
            # From the moment the restarted node answers (the pause included).
            converge_s = None if converged is None else time.monotonic() - ready
            resume(loads)
            row = {
                "kill": k + 1,
                "at_s": round(at, 1),
                "load_before_kill_s": round(wait, 2),
                "acknowledged": len(acked),
                "found_after_kill": found,
                "missing": len(acked) - found,
                "store_opened": ids is not None,
                "store_open_ms": round(open_s * 1000, 1),
                "store_error": error,
                "restart_s": round(restart_s, 2),
                "converge_s": None if converge_s is None else round(converge_s, 2),
            }
            rows.append(row)
            log(
                f"kill {k + 1:>2}/{kills} at {at:6.1f} s: acknowledged {len(acked):>5}, found "
                f"{found:>5}, missing {row['missing']}, store "
                f"{'opened' if ids is not None else 'FAILED ' + error} "
                f"({row['store_open_ms']} ms), restart {restart_s:.2f} s, converged "
                + ("NEVER" if converge_s is None else f"in {converge_s:.2f} s")
            )
        for load in loads:
            load.stop()
        final_converge = wait_converged(nodes, CONVERGE_TIMEOUT)
        codes = [node.stop() for node in nodes]
        acked_all = {i for load in loads for i in load.acked}
        per_store = []
        for node in nodes:
            ids, _open_s, error = stored_ids(node.home, parsed)
            per_store.append(ids)
        everywhere = set.intersection(*[ids or set() for ids in per_store])
        final = {
            "final_converge_s": None if final_converge is None else round(final_converge, 2),
            "exit_codes": codes,
            "acknowledged_all_nodes": len(acked_all),
            "found_in_every_store": len(acked_all & everywhere),
            "missing_in_some_store": len(acked_all - everywhere),
            "stores_opened_at_end": sum(ids is not None for ids in per_store),
            "submitted": sum(load.submitted for load in loads),
            "refused_while_down": sum(load.down_errors for load in loads),
            "control_errors": [e for load in loads for e in load.control_errors][:5],
        }
    finally:
        for load in loads:
            load.stop()
        for node in nodes:
            node.stop()
    converge = [r["converge_s"] for r in rows if r["converge_s"] is not None]
    totals = {
        "kills": len(rows),
        "acknowledged_by_victim": rows[-1]["acknowledged"] if rows else 0,
        "found_after_last_kill": rows[-1]["found_after_kill"] if rows else 0,
        "missing": sum(r["missing"] for r in rows) + final.get("missing_in_some_store", 0),
        "store_opens": f"{sum(r['store_opened'] for r in rows)}/{len(rows)}",
        "converged": f"{len(converge)}/{len(rows)}",
        "converge_s_p50": round(statistics.median(converge), 2) if converge else None,
        "converge_s_max": max(converge) if converge else None,
        "elapsed_s": round(time.monotonic() - started, 1),
        **final,
    }
    ok = (
        totals["missing"] == 0
        and all(r["store_opened"] for r in rows)
        and len(converge) == len(rows)
        and final.get("final_converge_s") is not None
        and final.get("stores_opened_at_end") == 3
        and not final.get("control_errors")
    )
    return {
        "params": {"kills": kills, "rate_per_node": rate, "seed": seed, "quick": quick,
                   "witnessed": witnessed, "market": market.split(":")[0]},
        "kills": rows,
        "totals": totals,
        "pass": ok,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=None, help="default 20 (3 with --quick)")
    parser.add_argument("--rate", type=float, default=15.0, help="ops/s per node")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--witnessed", action="store_true",
                        help="the three nodes witness the market (heartbeats, finality)")
    parser.add_argument("--quick", action="store_true", help="3 kills, under a minute")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    kills = args.kills if args.kills is not None else (3 if args.quick else 20)
    log(f"kill -9 soak: {kills} kills, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="crdtbook-kill-soak-") as tmp:
        report = run(Path(tmp), kills, args.rate, args.seed, args.quick, args.witnessed)
    report["load_average_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["pass"] else 1
    t = report["totals"]
    print(f"kill -9 soak, 3 nodes, {t['kills']} kills of node 3 under "
          f"{args.rate:g} ops/s per node ({report['params']['market']}"
          f"{', witnessed' if args.witnessed else ''})")
    print(f"{'kill':>4} {'at s':>7} {'acked':>6} {'found':>6} {'missing':>7} {'store':>7} "
          f"{'open ms':>8} {'restart s':>9} {'converge s':>10}")
    for r in report["kills"]:
        print(f"{r['kill']:>4} {r['at_s']:>7} {r['acknowledged']:>6} {r['found_after_kill']:>6} "
              f"{r['missing']:>7} {'opened' if r['store_opened'] else 'FAILED':>7} "
              f"{r['store_open_ms']:>8} {r['restart_s']:>9} {r['converge_s']!s:>10}")
    print(f"total: {t['kills']} kills; ops acknowledged by the victim "
          f"{t['acknowledged_by_victim']}, by all nodes {t.get('acknowledged_all_nodes')}; "
          "found in every store at the end "
          f"{t.get('found_in_every_store')}; missing {t['missing']} (must be 0); store opens "
          f"{t['store_opens']}; converged {t['converged']} (p50 {t['converge_s_p50']} s, max "
          f"{t['converge_s_max']} s); elapsed {t['elapsed_s']} s")
    print("PASS" if report["pass"] else "FAIL")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
