"""A witness that pruned its history (``--retention 0``) restarts under load: nothing final may
change, and no witness may equivocate.

    python bench/bench_pruned_restart.py [--kill9] [--point 2000] [--base DIR] [--json]

Three node processes on 127.0.0.1, every one a witness of one market, with compaction points
every ``--point`` final ops (20,000 by default in a node; smaller here, to reach them in
seconds). Node a runs with ``--retention 0``: after each compaction it deletes the history
before the point from its store. Load (orders and cancels, one client per node) runs until a
has compacted three points and pruned; a few more orders go to a; a is stopped (SIGTERM, or
SIGKILL with ``--kill9``) and started again on its home while the load goes on at b and c;
then the load runs 40 s more on all three, stops, and the nodes settle.

Checked, exit status 1 if any fails: no node logged an equivocation; every node ends with
finality ``final``, one digest; every fill final before the restart is still final and the
same (taker, maker, price, quantity) after.

Found by an exploratory run in session 13: before d2cb6f7 the restarted node's own ops after
the point waited for the history it had pruned, its next heartbeat reused one's sequence
number, every node logged the equivocation and finality stalled for good (one run of this
script at 7d9935c: final ops stuck at 8,063 while the log grew past 100,000). Since, the node
signs nothing as itself while it holds its own ops unapplied (``Replica.check_can_sign``).
Whether a restart finds its own ops waiting is a matter of timing: at 7d9935c this script
passed 3 runs of 3, so a PASS says nothing else broke, not that the fix holds (the unit tests
build the condition directly).
``--base DIR`` runs the node processes on the code in ``DIR`` (laid out as the package:
``DIR/crdtbook``, with ``node`` and ``cli`` inside, e.g. bench_network's ``checkout_tree``),
to see the defect again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from crdtbook.node.client import ControlClient
from crdtbook.node.procs import NodeProcess

NAMES = ("a", "b", "c")
#: Points a compacts before it is restarted (enough for its store to lack history).
POINTS_BEFORE = 3
#: Seconds of load after the restart, and at most to settle.
AFTER_S = 40.0
SETTLE_S = 60.0


def free_port() -> int:
    """A loopback port free a moment ago (node a restarts on the same one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "crdtbook.cli.app", *args],
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


def status(home: Path) -> dict[str, Any]:
    with ControlClient(home, timeout=20) as client:
        market: dict[str, Any] = client.call("status", digest=True)["markets"][0]
        return market


def final_fills(home: Path) -> dict[int, tuple[str, str, int, int]]:
    with ControlClient(home, timeout=60) as client:
        result = client.call("fills", limit=1_000_000)
    return {f["index"]: (f["taker"], f["maker"], f["price_ticks"], f["quantity_lots"])
            for f in result["fills"] if f["index"] < result["final_count"]}


class Load:
    """One client thread per node: orders around 100, a cancel of its own resting ones now and
    then; errors (a node restarting, not_ready) are counted and retried."""

    def __init__(self, homes: dict[str, Path]) -> None:
        self.homes = homes
        self.stop = {name: threading.Event() for name in homes}
        self.errors: dict[str, int] = {}
        self.threads = {name: self._start(name) for name in homes}

    def _start(self, name: str) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=(name,), daemon=True)
        thread.start()
        return thread

    def _run(self, name: str) -> None:
        rng = random.Random(name)
        mine: list[str] = []
        while not self.stop[name].is_set():
            try:
                with ControlClient(self.homes[name], timeout=20) as client:
                    while not self.stop[name].is_set():
                        if mine and rng.random() < 0.3:
                            client.call("cancel", order_id=mine.pop(rng.randrange(len(mine))))
                            continue
                        price = f"{100 + rng.randint(-15, 15) / 100:.2f}"
                        side = rng.choice(("buy", "sell"))
                        placed = client.call("submit", side=side, price=price,
                                             quantity=str(rng.randint(1, 5)))
                        if placed["order"]["status"] in ("open", "partially_filled"):
                            mine = [*mine[-199:], placed["order"]["id"]]
            except Exception as exc:  # a node stopping or restarting, not_ready: counted
                key = type(exc).__name__
                self.errors[key] = self.errors.get(key, 0) + 1
                time.sleep(0.2)

    def pause(self, name: str) -> None:
        self.stop[name].set()
        self.threads[name].join(30)

    def resume(self, name: str) -> None:
        self.stop[name].clear()
        self.threads[name] = self._start(name)

    def end(self) -> None:
        for name in self.homes:
            self.pause(name)


def run(point: int, kill9: bool, base: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-pruned-") as tmp_name:
        tmp = Path(tmp_name)
        homes = {name: tmp / name for name in NAMES}
        for home in homes.values():
            cli("id", "--init", "--home", str(home))
        definition = tmp / "m.market"
        cli("market", "new", "PR", "0.01", "0.001",
            *[arg for home in homes.values() for arg in ("--witness-home", str(home))],
            "--out", str(definition))
        spec = definition.read_text().strip()
        ports = {name: free_port() for name in NAMES}

        def node(name: str, bootstrap: list[str]) -> NodeProcess:
            config: dict[str, Any] = {"point_interval": point}
            if name == "a":
                config["retention"] = 0
            env = None if base is None else {
                **{k: v for k, v in os.environ.items() if k != "CRDTBOOK_HOME"},
                "PYTHONPATH": base,
                "PYTHONSAFEPATH": "1",
            }
            proc = NodeProcess(homes[name], bootstrap, spec,
                               listen=f"/ip4/127.0.0.1/tcp/{ports[name]}", config=config,
                               log_path=tmp / f"{name}.log", die_with_parent=True, env=env)
            proc.start()
            return proc

        nodes = {"b": node("b", [])}
        nodes["c"] = node("c", [nodes["b"].addr])
        nodes["a"] = node("a", [nodes["b"].addr, nodes["c"].addr])
        load = Load(homes)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                time.sleep(2)
                a = status(homes["a"])
                if a["compacted_ops"] >= POINTS_BEFORE * point and a["pruned_ops"] > 0:
                    break
            else:
                raise TimeoutError("node a did not compact and prune in 300 s")
            load.pause("a")
            with ControlClient(homes["a"], timeout=20) as client:
                for i in range(15):  # its own ops after its latest point
                    client.call("submit", side=("buy", "sell")[i % 2], price="100.05",
                                quantity="1")
            time.sleep(1.5)
            before = {name: final_fills(home) for name, home in homes.items()}
            stopped = time.monotonic()
            victim = nodes["a"].proc
            assert victim is not None
            victim.send_signal(signal.SIGKILL if kill9 else signal.SIGTERM)
            victim.wait(60)
            nodes["a"] = node("a", [nodes["b"].addr, nodes["c"].addr])
            restarted_s = time.monotonic() - stopped
            load.resume("a")
            time.sleep(AFTER_S)
            load.end()
            deadline = time.monotonic() + SETTLE_S
            while True:
                ends = {name: status(home) for name, home in homes.items()}
                settled = (len({m["digest"] for m in ends.values()}) == 1
                           and all(m["finality"] == "final" for m in ends.values()))
                if settled or time.monotonic() > deadline:
                    break
                time.sleep(2)
            after = {name: final_fills(home) for name, home in homes.items()}
        finally:
            load.end()
            for proc in nodes.values():
                proc.stop()
        changed = {
            name: sum(1 for index, fill in before[name].items()
                      if index in after[name] and after[name][index] != fill)
            + sum(1 for index in before[name] if index not in after[name]
                  and index >= min(after[name], default=0))
            for name in NAMES
        }
        logs = {name: (tmp / f"{name}.log").read_text(errors="replace") for name in NAMES}
        return {
            "point_interval": point,
            "stop": "SIGKILL" if kill9 else "SIGTERM",
            "restart_s": round(restarted_s, 1),
            "equivocations_logged": {name: logs[name].count("equivocation") for name in NAMES},
            "finality": {name: m["finality"] for name, m in ends.items()},
            "final_ops": {name: m["final_ops"] for name, m in ends.items()},
            "ops": {name: m["ops"] for name, m in ends.items()},
            "one_digest": len({m["digest"] for m in ends.values()}) == 1,
            "final_fills_before": {name: len(before[name]) for name in NAMES},
            "final_fills_changed": changed,
            "client_errors": load.errors,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--point", type=int, default=2000, help="compaction point interval")
    parser.add_argument("--kill9", action="store_true", help="SIGKILL node a, not SIGTERM")
    parser.add_argument("--base", help="run the nodes on the code in this tree")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.point, args.kill9, args.base)
    ok = (not any(result["equivocations_logged"].values())
          and all(state == "final" for state in result["finality"].values())
          and result["one_digest"] and not any(result["final_fills_changed"].values()))
    result["ok"] = ok
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:22} {value}")
        print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
