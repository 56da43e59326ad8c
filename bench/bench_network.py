"""Network benchmark: real node processes on 127.0.0.1, figures plus a same-run baseline.

    python bench/bench_network.py [--nodes 5] [--rate 500] [--seconds 10] [--catchup 100000]
                                  [--quick] [--json]
    python bench/bench_network.py --only latency --base-rev b65a508 --reps 3 --seconds 15
        # node CPU per op against the node issue #12's targets were set against, same run

Phases:
  1. latency: ops submitted at a fixed rate, round robin over the nodes; for each op, the time
     from submit to "applied at every node" (each node's watch stream reports op ids).
  2. throughput: fixed submit rates in steps (a fresh network per step); the sustained rate is
     the highest at which every node holds every op within 2 s of the last submit.
  3. baseline: phase 1 again with one gossip message per op (no batching), as the issue asks.
  4. catch-up: a node joins a market whose log holds N ops (prepared in another node's store);
     ops/s until it holds all of them.
  5. RSS of each node process.
  6. transport (only with --only transport): NODES node/p2p Networks in one process, gossip
     messages one at a time, trio task steps and CPU per message with py-libp2p's locks, frame
     writes and peer scorer (stock) and ours (node/p2p_install.py, p2p_pubsub.py), alternating.

Targets (2-core machine, 5 nodes; issue #12 raised issue #3's): >= 2,500 ops/s sustained
(stretch 5,000; #3 asked 1,000); p99 <= 100 ms at 500 ops/s (#3: 250 ms), with at most 1 ms of
node CPU per op across the 5 nodes; catch-up >= 10k ops/s (100k ops in under 10 s).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import bench_cold  # bench/, beside this script

from crdtbook import Identity, Market, Replica
from crdtbook.node.client import ControlClient
from crdtbook.node.procs import NodeProcess
from crdtbook.node.store import OpStore

MARKET = "DEMO:1:1"
LAUNCHER = r"""
import os, sys
from pathlib import Path
from crdtbook.node.app import NodeConfig, run_node
home, batch, delay, *boot = sys.argv[1:]
verbose = int(os.environ.get("CRDTBOOK_BENCH_VERBOSE", "0"))
extra = {}
if os.environ.get("CRDTBOOK_BENCH_SYNC_INTERVAL"):  # experiments: isolate gossip from sync
    extra["sync_interval"] = float(os.environ["CRDTBOOK_BENCH_SYNC_INTERVAL"])
if os.environ.get("CRDTBOOK_BENCH_PUBLISH_INTERVAL"):
    extra["publish_interval"] = float(os.environ["CRDTBOOK_BENCH_PUBLISH_INTERVAL"])
if os.environ.get("CRDTBOOK_BENCH_LATE_INFLIGHT") == "1":  # A/B: a task per copy read early
    from crdtbook.node import p2p_pubsub
    p2p_pubsub.INFLIGHT_FROM_READ = False
if os.environ.get("CRDTBOOK_BENCH_NURSERY_VALIDATION") == "1":  # A/B: libp2p's task per message
    from crdtbook.node import p2p_pubsub
    p2p_pubsub.DIRECT_VALIDATION = False
if os.environ.get("CRDTBOOK_BENCH_STOCK_FORWARD") == "1":  # A/B: libp2p's forward/send path
    from crdtbook.node import p2p_pubsub
    p2p_pubsub.LEAN_FORWARD = p2p_pubsub.SHARED_SEND = p2p_pubsub.COALESCED_WRITES = False
if os.environ.get("CRDTBOOK_BENCH_UNALIGNED") == "1":  # A/B: busy messages on each node's phase
    from crdtbook.node import publish_schedule
    publish_schedule.SHARED_GRID = False
if os.environ.get("CRDTBOOK_BENCH_PUBLISH_PER_PEER"):  # experiments: the interval's per-peer step
    from crdtbook.node import publish_schedule
    publish_schedule.PUBLISH_INTERVAL_PER_PEER = float(
        os.environ["CRDTBOOK_BENCH_PUBLISH_PER_PEER"])
if os.environ.get("CRDTBOOK_BENCH_SPARE_FRACTION"):  # experiments: the spare period's fraction
    from crdtbook.node import publish_schedule
    publish_schedule.PUBLISH_SPARE_FRACTION = float(
        os.environ["CRDTBOOK_BENCH_SPARE_FRACTION"])
net = {}
if os.environ.get("CRDTBOOK_BENCH_GOSSIP_DEGREE"):  # experiments: GossipSub D (D_lo, D_hi follow)
    d = int(os.environ["CRDTBOOK_BENCH_GOSSIP_DEGREE"])
    net.update(degree=d, degree_low=max(1, d * 2 // 3), degree_high=d * 2)
if os.environ.get("CRDTBOOK_BENCH_SKIP_HOLDERS"):  # A/B: "0" forwards as stock py-libp2p does
    net["skip_holders"] = os.environ["CRDTBOOK_BENCH_SKIP_HOLDERS"] != "0"
if os.environ.get("CRDTBOOK_BENCH_REACHED") == "0":  # A/B: no reached lists, mesh publishing
    net["reached_hints"] = False
    net["flood_publish_max"] = 0
if os.environ.get("CRDTBOOK_BENCH_FLOOD_MAX"):  # experiments: flood publishing's peer bound
    net["flood_publish_max"] = int(os.environ["CRDTBOOK_BENCH_FLOOD_MAX"])
if net:
    from crdtbook.node.p2p import NetworkConfig
    extra["network"] = NetworkConfig(**net)
if os.environ.get("CRDTBOOK_BENCH_STOCK_TRANSPORT") == "1":  # A/B: libp2p's locks, frames, scorer
    from crdtbook.node import p2p_install, p2p_pubsub
    p2p_install.EAGER_LOCK_MODULES = ()
    p2p_install.LEAN_YAMUX_FRAMES = False
    p2p_install.BATCHED_WINDOW_UPDATES = False
    p2p_install.TCP_READ_AHEAD = False
    p2p_install.EAGER_TCP_WRITES = False
    p2p_pubsub.KEEP_DEFAULT_SCORER = True
if os.environ.get("CRDTBOOK_BENCH_STOCK_WRITES") == "1":  # A/B: a checkpoint after each TCP write
    from crdtbook.node import p2p_install
    p2p_install.EAGER_TCP_WRITES = False
if os.environ.get("CRDTBOOK_BENCH_STOCK_WINDOW") == "1":  # A/B: Yamux's update after each read
    from crdtbook.node import p2p_install
    p2p_install.BATCHED_WINDOW_UPDATES = False
if os.environ.get("CRDTBOOK_BENCH_EXACT_READS") == "1":  # A/B: TCP reads of just what is asked
    from crdtbook.node import p2p_install
    p2p_install.TCP_READ_AHEAD = False
# batch 1 = the baseline: one gossip message per op, sent at once.
if int(batch) == 1:
    extra["publish_interval"] = 0.0
config = NodeConfig(home=Path(home), listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=boot,
                    markets=["DEMO:1:1"], gossip_batch=int(batch), flush_delay=float(delay),
                    verbose=verbose, **extra)
def run_under(instrument, dump):  # experiments: the node's trio.run with one more instrument
    import trio
    inner = trio.run
    def run(*a, **k):
        try:
            return inner(*a, instruments=[*k.pop("instruments", ()), instrument], **k)
        finally:
            dump()
    trio.run = run
if os.environ.get("CRDTBOOK_BENCH_STALLS"):  # experiments: event-loop steps >= 5 ms, and GC
    import gc, json, time, trio
    stalls, gcs, began = [], [], {}
    class Stalls(trio.abc.Instrument):
        def before_task_step(self, task):
            began[0] = time.perf_counter()
        def after_task_step(self, task):
            took = time.perf_counter() - began.get(0, time.perf_counter())
            if took >= 0.005:
                stalls.append((round(time.time(), 3), round(took * 1000, 1), task.name))
    def gc_timer(phase, info, t=[0.0]):
        if phase == "start":
            t[0] = time.perf_counter()
        elif time.perf_counter() - t[0] >= 0.002:
            gcs.append((round(time.time(), 3), round((time.perf_counter() - t[0]) * 1000, 1),
                        info["generation"]))
    gc.callbacks.append(gc_timer)
    run_under(Stalls(), lambda: (Path(home) / "stalls.json").write_text(
        json.dumps({"steps": stalls, "gc": gcs})))
wakes_dir = os.environ.get("CRDTBOOK_BENCH_WAKES")  # experiments: the loop's blocking waits
if wakes_dir:
    import collections, json, time, trio
    wakes, wait_began, woke = collections.Counter(), [0.0], [False]
    class Wakes(trio.abc.Instrument):
        def before_io_wait(self, timeout):
            wakes["waits"] += 1
            wait_began[0] = time.monotonic()
        def after_io_wait(self, timeout):
            if time.monotonic() - wait_began[0] > 0.0002:  # it slept: a wake-up
                wakes["blocked"] += 1
                woke[0] = True
        def before_task_step(self, task):
            if woke[0]:  # the task that runs first after a wake-up
                woke[0] = False
                wakes["first: " + task.name.rsplit(".", 1)[-1]] += 1
    run_under(Wakes(), lambda: (Path(wakes_dir) / (Path(home).name + ".json")).write_text(
        json.dumps(wakes)))
gap_ms = float(os.environ.get("CRDTBOOK_BENCH_WAKE_GAP", "0"))  # experiments: coalesced wake-ups
if gap_ms:
    # After a wake-up, the loop does not wait for I/O again until GAP ms after it woke: what
    # arrives meanwhile is taken in one wake-up (timers are late by as much). With
    # CRDTBOOK_BENCH_WAKE_GAP_AB=S the gap is on only in odd S-second windows of the wall clock;
    # CPU and wake-ups are counted per arm (dumped to CRDTBOOK_BENCH_WAKE_GAP_DIR).
    import collections, json, time, trio
    window = float(os.environ.get("CRDTBOOK_BENCH_WAKE_GAP_AB", "0"))
    gap_dir = os.environ.get("CRDTBOOK_BENCH_WAKE_GAP_DIR")
    per_arm, woke_at, cpu_at = collections.Counter(), [0.0], [time.process_time()]
    def arm_on():
        return not window or int(time.time() / window) % 2 == 1
    class WakeGap(trio.abc.Instrument):
        def before_io_wait(self, timeout):
            on = arm_on()
            now_cpu = time.process_time()
            per_arm[f"cpu_{int(on)}"] += now_cpu - cpu_at[0]
            cpu_at[0] = now_cpu
            if on and timeout > 0:
                rest = woke_at[0] + gap_ms / 1000 - time.monotonic()
                if rest > 0:
                    time.sleep(min(rest, timeout))
            per_arm["wait_began"] = time.monotonic()
        def after_io_wait(self, timeout):
            now = time.monotonic()
            if now - per_arm["wait_began"] > 0.0002:
                per_arm[f"wakes_{int(arm_on())}"] += 1
            woke_at[0] = now
    run_under(WakeGap(), lambda: gap_dir and (Path(gap_dir) / (Path(home).name + ".json"))
              .write_text(json.dumps(per_arm)))
ab_attr = os.environ.get("CRDTBOOK_BENCH_AB_ATTR")  # experiments: MODULE:FLAG, A/B'd in-run
if ab_attr:
    # FLAG is set to CRDTBOOK_BENCH_AB_VALUE (default True) in odd windows of
    # CRDTBOOK_BENCH_AB_WINDOW seconds of the wall clock (default 4), to its own value in even
    # ones; CPU per window is dumped to CRDTBOOK_BENCH_AB_DIR/<node>.json, keyed by window.
    import ast, collections, importlib, json, time, trio
    mod_name, flag = ab_attr.split(":")
    ab_mod = importlib.import_module(mod_name)
    ab_values = (getattr(ab_mod, flag),
                 ast.literal_eval(os.environ.get("CRDTBOOK_BENCH_AB_VALUE", "True")))
    ab_window = float(os.environ.get("CRDTBOOK_BENCH_AB_WINDOW", "4"))
    ab_cpu, ab_mark = collections.Counter(), [time.process_time(), None]
    class FlagAB(trio.abc.Instrument):
        def before_io_wait(self, timeout):
            cpu = time.process_time()
            if ab_mark[1] is not None:
                ab_cpu[ab_mark[1]] += cpu - ab_mark[0]
            index = int(time.time() / ab_window)
            ab_mark[0], ab_mark[1] = cpu, index
            setattr(ab_mod, flag, ab_values[index % 2])
    run_under(FlagAB(), lambda: (Path(os.environ["CRDTBOOK_BENCH_AB_DIR"])
                                 / (Path(home).name + ".json")).write_text(json.dumps(ab_cpu)))
steps_dir = os.environ.get("CRDTBOOK_BENCH_STEPS")  # experiments: task steps and CPU by task
if steps_dir:
    import collections, json, time, trio
    counts, cpu, waits, began = collections.Counter(), collections.Counter(), [0], [0.0]
    where_too = bool(os.environ.get("CRDTBOOK_BENCH_STEPS_WHERE"))  # where each step parked
    class Steps(trio.abc.Instrument):
        def before_task_step(self, task):
            began[0] = time.thread_time()
        def after_task_step(self, task):
            counts[task.name] += 1
            cpu[task.name] += time.thread_time() - began[0]
            if where_too:
                c, where = task.coro, []
                while c is not None:
                    f = next((getattr(c, a) for a in ("cr_frame", "gi_frame", "ag_frame")
                              if getattr(c, a, None) is not None), None)
                    if f is not None:
                        where.append(f"{f.f_code.co_name}:{f.f_lineno}")
                    c = next((getattr(c, a) for a in ("cr_await", "gi_yieldfrom", "ag_await")
                              if getattr(c, a, None) is not None), None)
                counts["@" + task.name.rsplit(".", 1)[-1] + " " + " < ".join(where[-4:])] += 1
        def before_io_wait(self, timeout):
            waits[0] += 1
    import gc
    gc_time, gc_began = collections.Counter(), [0.0]
    def gc_clock(phase, info):
        if phase == "start":
            gc_began[0] = time.thread_time()
        else:
            gc_time[info["generation"]] += time.thread_time() - gc_began[0]
            counts["gc%d" % info["generation"]] += 1
    gc.callbacks.append(gc_clock)
    def dump_steps():
        out = {"io_waits": waits[0], "cpu_total": time.thread_time(),
               "gc_s": {str(g): round(t, 4) for g, t in gc_time.items()},
               "tasks": {n: [counts[n], round(cpu[n], 4)] for n in counts}}
        (Path(steps_dir) / (Path(home).name + ".json")).write_text(json.dumps(out))
    run_under(Steps(), dump_steps)
profile_dir = os.environ.get("CRDTBOOK_BENCH_PROFILE")  # experiments: CPU profile of node n2
if profile_dir and Path(home).name == "n2":
    import cProfile, time
    profiler = cProfile.Profile(time.thread_time)  # CPU time: waiting for a core is not cost
    try:
        code = profiler.runcall(run_node, config)
    finally:
        profiler.dump_stats(str(Path(profile_dir) / "n2.prof"))
    sys.exit(code)
sys.exit(run_node(config))
"""


# The transport micro-bench (phase "transport"): NODES node/p2p Networks in one process, a full
# mesh on one topic, the first publishing MESSAGES messages of SIZE bytes one at a time (the next
# once every other node's validator has the last). Prints task steps (trio scheduler) and CPU per
# message. "stock" keeps py-libp2p's trio locks, Yamux frame writes and peer scorer
# (node/p2p_install.py, node/p2p_pubsub.py). Experiments: CRDTBOOK_BENCH_TRANSPORT_ARMS picks the
# arms that alternate (default "stock,patched"; "nofwd" is patched less the forward/send path,
# p2p_pubsub.LEAN_FORWARD, SHARED_SEND, COALESCED_WRITES); CRDTBOOK_BENCH_TRANSPORT_BURST=k
# publishes k messages at once before waiting (so peer queues hold several RPCs).
TRANSPORT_CHILD = r"""
import json, os, sys, time
from contextlib import AsyncExitStack
import trio
from crdtbook.node import p2p_install
from crdtbook.node.p2p import NetworkConfig, open_network
n, count, size, arm = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if arm == "nofwd":  # patched less the forward/send path (p2p_pubsub.LEAN_FORWARD etc.)
    from crdtbook.node import p2p_pubsub
    p2p_pubsub.LEAN_FORWARD = p2p_pubsub.SHARED_SEND = p2p_pubsub.COALESCED_WRITES = False
burst = int(os.environ.get("CRDTBOOK_BENCH_TRANSPORT_BURST", "1"))  # messages sent at once
if arm == "stock":
    from crdtbook.node import p2p_pubsub
    p2p_install.EAGER_LOCK_MODULES = ()
    p2p_install.LEAN_YAMUX_FRAMES = False
    p2p_install.BATCHED_WINDOW_UPDATES = False
    p2p_install.TCP_READ_AHEAD = False
    p2p_install.EAGER_TCP_WRITES = False
    p2p_pubsub.KEEP_DEFAULT_SCORER = True
for knob in os.environ.get("CRDTBOOK_BENCH_TRANSPORT_OFF", "").split(","):  # A/B: one change off
    if knob:
        from crdtbook.node import p2p_install, p2p_pubsub
        module = p2p_install if hasattr(p2p_install, knob) else p2p_pubsub
        setattr(module, knob, False)
steps = [0]
class Steps(trio.abc.Instrument):
    def before_task_step(self, task):
        steps[0] += 1
async def main():
    got = [0] * n
    goal = [0]
    arrived = [trio.Event()]
    async with AsyncExitStack() as stack:
        nets = [await stack.enter_async_context(open_network(bytes([i + 1]) * 32,
                ["/ip4/127.0.0.1/tcp/0"], config=NetworkConfig(heartbeat_interval=0.5)))
                for i in range(n)]
        for i, net in enumerate(nets):
            def validator(i):
                async def validate(data, peer):
                    got[i] += 1
                    if min(got[1:]) >= goal[0]:
                        arrived[0].set()
                    return True
                return validate
            net.set_validator("t", validator(i))
            await net.join("t")
        for i in range(1, n):
            for j in range(i):
                await nets[i].connect(nets[j].addrs()[0])
        await trio.sleep(3)  # meshes form
        steps[0] = 0
        cpu, wall = time.process_time(), time.monotonic()
        for k in range(0, count, burst):
            arrived[0] = trio.Event()
            goal[0] += burst
            for m in range(k, k + burst):
                await nets[0].publish("t", m.to_bytes(8, "big") + os.urandom(size - 8))
            await arrived[0].wait()
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        copies = sum(net.stats()["gossip_copies_in"] for net in nets)
        print(json.dumps({"arm": arm, "task_steps_per_msg": round(steps[0] / count, 1),
                          "cpu_ms_per_msg": round(cpu / count * 1000, 3),
                          "wall_ms_per_msg": round(wall / count * 1000, 3),
                          "copies_per_msg": round(copies / count, 2)}))
trio.run(main, instruments=[Steps()])
"""


def transport_phase(n: int, count: int, size: int, reps: int) -> dict[str, Any]:
    """The transport micro-bench, stock and patched arms alternating, ``reps`` each."""
    runs: list[dict[str, Any]] = []
    for _ in range(reps):
        for arm in os.environ.get("CRDTBOOK_BENCH_TRANSPORT_ARMS", "stock,patched").split(","):
            out = subprocess.run(
                [sys.executable, "-c", TRANSPORT_CHILD, str(n), str(count), str(size), arm],
                capture_output=True, text=True, timeout=300, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  transport {arm}: {runs[-1]}", file=sys.stderr)

    def best(arm: str, key: str) -> float:
        return min(r[key] for r in runs if r["arm"] == arm)

    arms = sorted({r["arm"] for r in runs})

    return {
        "nodes": n, "messages": count, "size": size, "runs": runs,
        "task_steps_per_msg": {arm: best(arm, "task_steps_per_msg") for arm in arms},
        "best_cpu_ms_per_msg": {arm: best(arm, "cpu_ms_per_msg") for arm in arms},
        "load_average": os.getloadavg(),
    }


class Node(NodeProcess):
    """A node process (the shared harness, crdtbook.node.procs), started and answering once
    constructed. ``command`` replaces the default launcher (another bench's NodeConfig); it gets
    the home as is."""

    def __init__(self, home: Path, bootstrap: list[str], batch: int = 2000,
                 delay: float = 0.002, command: list[str] | None = None) -> None:
        if command is None:
            command = [sys.executable, "-c", LAUNCHER, str(home), str(batch), str(delay),
                       *bootstrap]
        super().__init__(home, bootstrap, command=command, verbose=0)
        self.start()


class Seen:
    """Per node, the monotonic time each op id was first reported applied (watch stream)."""

    def __init__(self, nodes: list[Node]) -> None:
        self.times: list[dict[str, float]] = [{} for _ in nodes]
        self._socks: list[socket.socket] = []
        self._threads = []
        for i, node in enumerate(nodes):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(node.home / "control.sock"))
            req = {"id": 1, "method": "watch", "params": {"digest": False, "interval": 0.02}}
            sock.sendall((json.dumps(req) + "\n").encode())
            self._socks.append(sock)
            t = threading.Thread(target=self._read, args=(sock, self.times[i]), daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _read(sock: socket.socket, times: dict[str, float]) -> None:
        buf = b""
        try:
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    return
                now = time.monotonic()
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    event = json.loads(line)
                    for ident in event.get("applied", ()):
                        times.setdefault(ident, now)
        except OSError:
            return

    def everywhere(self, ident: str) -> float | None:
        ts = [t.get(ident) for t in self.times]
        return None if any(x is None for x in ts) else max(ts)  # type: ignore[type-var]

    def stages(self, sent: list[tuple[str, float]]) -> dict[str, list[float] | None]:
        """Per stage (first node, first other, median node, last node): p50 and p99 in ms of
        the time from submit to that node's report, over the ops every node reported."""
        rows = []
        for ident, t0 in sent:
            ts = sorted(t[ident] for t in self.times if ident in t)
            if len(ts) == len(self.times):
                rows.append((ts[0] - t0, ts[min(1, len(ts) - 1)] - t0, ts[len(ts) // 2] - t0,
                             ts[-1] - t0))
        out: dict[str, list[float] | None] = {}
        for i, name in enumerate(("first_node", "first_other", "median_node", "last_node")):
            values = sorted(row[i] * 1000 for row in rows)
            out[name] = ([round(statistics.median(values), 1),
                          round(values[max(0, int(len(values) * 0.99) - 1)], 1)]
                         if values else None)
        return out

    def close(self) -> None:
        for s in self._socks:
            s.close()


def start_network(tmp: Path, n: int, batch: int, delay: float) -> list[Node]:
    nodes = [Node(tmp / "n1", [], batch, delay)]
    try:
        for i in range(1, n):
            nodes.append(Node(tmp / f"n{i + 1}", [nodes[0].addr], batch, delay))
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if all(len(nd.call("status")["peers"]) >= n - 1 for nd in nodes):
                break
            time.sleep(0.2)
        time.sleep(2.0)  # let gossipsub meshes form (a few heartbeats)
    except BaseException:
        for nd in nodes:  # never leave node processes behind
            nd.stop()
        raise
    return nodes


def order_params(rng: random.Random) -> dict[str, str]:
    side = rng.choice(("buy", "sell"))
    # Mostly near the touch, ~30% crossing: buys 95..101, sells 99..105 around a mid of 100.
    price = rng.randint(95, 101) if side == "buy" else rng.randint(99, 105)
    tif = "ioc" if rng.random() < 0.05 else "gtc"
    return {"side": side, "price": str(price), "quantity": str(rng.randint(1, 5)), "tif": tif}


def run_load(nodes: list[Node], rate: float | None, seconds: float, threads_per_node: int,
             seed: int) -> list[tuple[str, float]]:
    """Submit for ``seconds``; at ``rate`` ops/s overall (None: flat out). Returns (id, t0)."""
    sent: list[tuple[str, float]] = []
    lock = threading.Lock()
    workers = [(nd, k) for nd in nodes for k in range(threads_per_node)]
    start = time.monotonic() + 0.2
    stop_at = start + seconds
    per_worker_interval = None if rate is None else len(workers) / rate

    def work(index: int, node: Node) -> None:
        rng = random.Random(seed * 1000 + index)
        client = ControlClient(node.home, timeout=30)
        mine: list[str] = []
        next_at = start + (0 if per_worker_interval is None else
                           per_worker_interval * index / len(workers))
        try:
            while True:
                now = time.monotonic()
                if now >= stop_at:
                    return
                if per_worker_interval is not None:
                    if now < next_at:
                        time.sleep(next_at - now)
                    next_at += per_worker_interval
                t0 = time.monotonic()
                if mine and rng.random() < 0.15:
                    try:
                        result = client.call("cancel", order_id=mine.pop(rng.randrange(len(mine))))
                        ident = result["cancel_id"]
                    except Exception:
                        continue
                else:
                    result = client.call("submit", **order_params(rng))
                    ident = result["order"]["id"]
                    if result["order"]["status"] in ("open", "partially_filled"):
                        mine.append(ident)
                with lock:
                    sent.append((ident, t0))
        finally:
            client.close()

    ts = [threading.Thread(target=work, args=(i, nd)) for i, (nd, _) in enumerate(workers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sent


def wait_converged(nodes: list[Node], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Cheap polling: a replica's op set is the causal past of its heads, so equal heads
        # mean equal op sets; the digests (which hash the whole state) are compared once.
        ms = [nd.market_status(digest=False) for nd in nodes]
        if len({tuple(m["heads"]) for m in ms}) == 1 and all(m["pending"] == 0 for m in ms):
            done = time.monotonic()
            # Heads and digest from one status answer each: a witnessed market's heartbeats
            # may still arrive after the poll above, so heads are compared again beside them.
            full = [nd.market_status() for nd in nodes]
            if len({tuple(m["heads"]) for m in full}) == 1:
                digests = {m["digest"] for m in full}
                if len(digests) != 1:
                    raise AssertionError(f"same heads but different digests: {digests}")
                return done
        time.sleep(0.1)
    raise TimeoutError("nodes did not converge")


def latency_phase(tmp: Path, n: int, rate: float, seconds: float, batch: int,
                  delay: float) -> dict[str, Any]:
    nodes = start_network(tmp, n, batch, delay)
    try:
        seen = Seen(nodes)
        time.sleep(0.3)
        cpu_before = sum(nd.cpu_s() for nd in nodes)
        sent = run_load(nodes, rate, seconds, threads_per_node=4, seed=1)
        wait_converged(nodes, 120)
        cpu_used = sum(nd.cpu_s() for nd in nodes) - cpu_before
        time.sleep(0.3)
        gossip = [nd.call("status", digest=False)["network"] for nd in nodes]
        lat = []
        missing = 0
        for ident, t0 in sent:
            t = seen.everywhere(ident)
            if t is None:
                missing += 1
            else:
                lat.append((t - t0) * 1000)
        stages = seen.stages(sent)
        seen.close()
        lat.sort()
        return {
            "ops": len(sent),
            # Where the time goes (p50 / p99 ms after the submit): the first node to report an
            # op applied (its origin), the first other node (the publish wait and one hop), the
            # median node and the last (= p50_ms / p99_ms).
            "stages_ms": stages,
            "rate_achieved": len(sent) / seconds,
            "p50_ms": statistics.median(lat) if lat else None,
            "p99_ms": lat[int(len(lat) * 0.99) - 1] if lat else None,
            "max_ms": lat[-1] if lat else None,
            # CPU time of all nodes per op submitted: the capacity figure that noise on a
            # saturated 2-core host does not blur the way latency is blurred.
            "node_cpu_ms_per_op": round(cpu_used / max(1, len(sent)) * 1000, 3),
            "unobserved": missing,
            "rss_mb": [round(nd.rss_mb(), 1) for nd in nodes],
            # Gossip copies read per message first received, over all nodes (duplicates + 1).
            "gossip_copies_per_message": round(
                sum(g.get("gossip_copies_in", 0) for g in gossip)
                / max(1, sum(g.get("gossip_firsts_in", 0) for g in gossip)), 2),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        for nd in nodes:
            nd.stop()


#: The commit just before issue #12's work began: the node whose figures (2.15 ms of node CPU per
#: op across 5 nodes and p99 190 ms at 500 ops/s, 1,250 ops/s sustained) the issue's targets
#: were set against, on that day's machine. ``--base-rev`` runs it in the same run as this tree.
PRE_ISSUE_12 = "b65a508"


def checkout_tree(rev: str, into: Path) -> Path:
    """The code of git revision ``rev`` laid out as the installed package is (``crdtbook/``, with
    ``node/`` and ``cli/`` as ``crdtbook.node`` and ``crdtbook.cli``), for node processes to
    import through PYTHONPATH, which comes before this checkout's editable install."""
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "crdtbook", "node", "cli"],
                             capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"--base-rev {rev}: git archive failed (a shallow clone lacks old "
                         f"commits: git fetch --unshallow): {archive.stderr.decode().strip()}")
    src = into / "src"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(src, filter="data")
    package = into / "pkg" / "crdtbook"
    shutil.copytree(src / "crdtbook", package)
    shutil.copytree(src / "node", package / "node")
    shutil.copytree(src / "cli", package / "cli")
    return into / "pkg"


def latency_ab(tmp: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """The latency phase ``args.reps`` times in each arm, alternating: "baseline" with ``env``
    set for the node processes (they inherit the bench's environment), "current" without."""
    arms: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
    for rep in range(args.reps):
        for arm in ("baseline", "current"):
            saved = {key: os.environ.get(key) for key in env}
            if arm == "baseline":
                os.environ.update(env)
            try:
                result = latency_phase(tmp / f"{arm}{rep}", args.nodes, args.rate, args.seconds,
                                       2000, 0.002)
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
            arms[arm].append(result)
            print(f"  {arm}: cpu/op {result['node_cpu_ms_per_op']} ms, p50/p99 "
                  f"{result['p50_ms']:.0f}/{result['p99_ms']:.0f} ms, load "
                  f"{result['load_average'][0]}", file=sys.stderr)
    medians = {arm: statistics.median(r["node_cpu_ms_per_op"] for r in runs)
               for arm, runs in arms.items()}
    ratio = round(medians["current"] / medians["baseline"], 3)
    print(f"  median node CPU per op: baseline {medians['baseline']} ms, current "
          f"{medians['current']} ms, current/baseline {ratio}", file=sys.stderr)
    return {"env": env, **arms, "median_node_cpu_ms_per_op": medians,
            "cpu_ratio_current_to_baseline": ratio}


#: A rate is sustained when every node holds every op this soon after the last submit.
SUSTAINED_LAG = 2.0


def throughput_phase(tmp: Path, n: int, seconds: float, rates: list[float]) -> dict[str, Any]:
    """Step through fixed submit rates (one network per step); the sustained rate is the
    highest one at which all nodes were converged within SUSTAINED_LAG of the last submit."""
    steps = []
    for i, rate in enumerate(rates):
        nodes = start_network(tmp / f"step{i}", n, 2000, 0.002)
        try:
            sent = run_load(nodes, rate, seconds, threads_per_node=6, seed=2 + i)
            t_submitted = time.monotonic()
            t_conv = wait_converged(nodes, 120)
            steps.append({
                "rate": rate,
                # Over the submit window itself (run_load waits 0.2 s before it starts and
                # joins its threads after: counting those made 1000 ops/s read as 978).
                "achieved": len(sent) / seconds,
                "lag_s": round(t_conv - t_submitted, 2),
                "rss_mb": [round(nd.rss_mb(), 1) for nd in nodes],
            })
            log_step = steps[-1]
            print(f"  step {rate:.0f} ops/s: achieved {log_step['achieved']:.0f}, converged "
                  f"{log_step['lag_s']} s after the last submit", file=sys.stderr)
        finally:
            for nd in nodes:
                nd.stop()
        if steps[-1]["lag_s"] > SUSTAINED_LAG * 5:
            break  # far past capacity: higher rates only take longer to tell the same
    ok = [s for s in steps if s["lag_s"] <= SUSTAINED_LAG]
    return {
        "steps": steps,
        "sustained_converged_ops_s": max((s["achieved"] for s in ok), default=0.0),
        "rss_mb": steps[-1]["rss_mb"],
    }


def catchup_phase(tmp: Path, count: int) -> dict[str, Any]:
    market = Market.parse(MARKET)
    rng = random.Random(7)
    authors = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(20)]
    replica = Replica(market)
    t0 = time.monotonic()
    for _ in range(count):
        p = order_params(rng)
        replica.submit(rng.choice(authors), p["side"], int(p["price"]), int(p["quantity"]),
                       p["tif"])
    gen_s = time.monotonic() - t0
    home = tmp / "full"
    home.mkdir(parents=True)
    store = OpStore.open(home)
    store.add_market(market.id, market.name, market.tick, market.lot)
    store.add_ops((op.id, op.market_id, op.lamport, op.raw) for op in replica.ops())
    store.close()
    full = Node(home, [], 2000, 0.002)
    try:
        t1 = time.monotonic()
        joiner = Node(tmp / "joiner", [full.addr], 2000, 0.002)
        t_started = time.monotonic()
        try:
            while joiner.market_status(digest=False)["ops"] < count:
                time.sleep(0.05)
                if time.monotonic() - t1 > 300:
                    raise TimeoutError("catch-up took more than 300 s")
            t_done = time.monotonic()
            same = joiner.market_status()["digest"] == full.market_status()["digest"]
            return {
                "ops": count,
                "generate_s": gen_s,
                "seconds_from_join": t_done - t1,
                "seconds_after_start": t_done - t_started,
                "ops_per_s": count / (t_done - t1),
                "digests_agree": same,
                "rss_mb_full": round(full.rss_mb(), 1),
                "rss_mb_joiner": round(joiner.rss_mb(), 1),
            }
        finally:
            joiner.stop()
    finally:
        full.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--catchup", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="3 nodes, 3 s phases, 10k catch-up")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rates", default="500,1000,1500,2000,2500,3000",
                    help="submit rates the throughput phase steps through (ops/s, comma-separated)")
    ap.add_argument("--ab", default="", metavar="VAR=VALUE ...",
                    help="A/B the latency phase: alternate runs with these environment settings "
                    "(the baseline arm, e.g. 'CRDTBOOK_BENCH_STOCK_TRANSPORT=1') and without")
    ap.add_argument("--base-rev", default="", metavar="REV",
                    help="A/B the latency phase against the nodes of git revision REV (e.g. "
                    f"{PRE_ISSUE_12}, the node issue #12's targets were set against), run in "
                    "the same run through PYTHONPATH; with --ab, both apply to the baseline")
    ap.add_argument("--reps", type=int, default=3, help="pairs of runs for --ab or --base-rev")
    ap.add_argument("--only", default="", help="run only these phases, comma-separated, of: "
                    "latency, baseline, throughput, catchup, transport (experiments; the "
                    "table shows the first four)")
    args = ap.parse_args()
    if args.quick:
        args.nodes, args.seconds, args.catchup, args.rate = 3, 3.0, 10_000, 200
    phases = set(args.only.split(",")) if args.only else {
        "latency", "baseline", "throughput", "catchup"}
    if (args.ab or args.base_rev) and "latency" not in phases:
        ap.error("--ab and --base-rev compare the latency phase: include it in --only")
    if any("=" not in item for item in args.ab.split()):
        ap.error(f"--ab takes VAR=VALUE settings, not {args.ab!r}")
    rates = [float(r) for r in args.rates.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="crdtbook-bench-"))
    results: dict[str, Any] = {"nodes": args.nodes, "rate": args.rate, "seconds": args.seconds}
    if "latency" in phases:
        # Before any node starts: what the machine charges a wake-up after 10 ms idle, which is
        # what most of a node's CPU per op at 500 ops/s is (bench/bench_cold.py).
        results["machine_cold"] = bench_cold.measure(100)
    try:
        ab_env = dict(item.split("=", 1) for item in args.ab.split())
        if args.base_rev:
            ab_env["PYTHONPATH"] = str(checkout_tree(args.base_rev, tmp / "base"))
            # A node runs as `python -c`, which puts its working directory first on sys.path:
            # from a checkout's root that is this tree's crdtbook/, ahead of PYTHONPATH.
            ab_env["PYTHONSAFEPATH"] = "1"
            imported = subprocess.run(
                [sys.executable, "-c", "import crdtbook.node.app as m; print(m.__file__)"],
                env={**os.environ, **ab_env}, capture_output=True, text=True).stdout.strip()
            if not imported.startswith(ab_env["PYTHONPATH"]):
                raise SystemExit(f"--base-rev: a node would run {imported or 'nothing'}, not "
                                 f"the code of {args.base_rev}")
            results["base_rev"] = args.base_rev
        if "latency" in phases and ab_env:
            results["latency_ab"] = latency_ab(tmp / "ab", args, ab_env)
            results["latency_batched"] = results["latency_ab"]["current"][-1]
        elif "latency" in phases:
            results["latency_batched"] = latency_phase(tmp / "a", args.nodes, args.rate,
                                                       args.seconds, 2000, 0.002)
        if "baseline" in phases:
            results["latency_per_op_gossip_baseline"] = latency_phase(
                tmp / "b", args.nodes, args.rate, args.seconds, 1, 0.0)
        if "throughput" in phases:
            results["throughput"] = throughput_phase(tmp / "c", args.nodes, args.seconds, rates)
        if "catchup" in phases:
            results["catchup"] = catchup_phase(tmp / "d", args.catchup)
        if "transport" in phases:
            results["transport"] = transport_phase(args.nodes, 600, 2000, 3)
    finally:
        if not os.environ.get("CRDTBOOK_BENCH_KEEP"):  # experiments: keep homes and logs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}", file=sys.stderr)
    if args.json or phases != {"latency", "baseline", "throughput", "catchup"}:
        print(json.dumps(results, indent=2))
        return 0
    lb, lo, th, cu = (results["latency_batched"], results["latency_per_op_gossip_baseline"],
                      results["throughput"], results["catchup"])
    rows = [
        ("sustained ops/s, all nodes converged", f"{th['sustained_converged_ops_s']:.0f}",
         ">= 2500 (stretch 5000)", th["sustained_converged_ops_s"] >= 2500),
        *[(f"  at {st['rate']:.0f} ops/s: converged after", f"{st['lag_s']:.1f} s",
           f"<= {SUSTAINED_LAG:.0f} s", st["lag_s"] <= SUSTAINED_LAG) for st in th["steps"]],
        (f"latency p50 at {lb['rate_achieved']:.0f} ops/s (batched)", f"{lb['p50_ms']:.1f} ms",
         "", None),
        (f"latency p99 at {lb['rate_achieved']:.0f} ops/s (batched)", f"{lb['p99_ms']:.1f} ms",
         "<= 100 ms", lb["p99_ms"] <= 100),
        (f"baseline p50 at {lo['rate_achieved']:.0f} ops/s (1 op/msg)", f"{lo['p50_ms']:.1f} ms",
         "", None),
        (f"baseline p99 at {lo['rate_achieved']:.0f} ops/s (1 op/msg)", f"{lo['p99_ms']:.1f} ms",
         "", None),
        (f"catch-up of {cu['ops']} ops", f"{cu['ops_per_s']:.0f} ops/s "
         f"({cu['seconds_from_join']:.1f} s)", ">= 10000 ops/s", cu["ops_per_s"] >= 10_000),
        ("  joiner digest equals the full node's", str(cu["digests_agree"]), "True",
         cu["digests_agree"]),
        ("node CPU per op (all nodes), latency run", f"{lb['node_cpu_ms_per_op']:.2f} ms",
         "<= 1 ms", lb["node_cpu_ms_per_op"] <= 1.0),
        ("  machine: a wake-up after 10 ms idle costs",
         f"{results['machine_cold']['ratio_by_gap_ms']['10']:.0f}x back to back",
         "(bench_cold.py)", None),
        ("  machine: one ed25519 verify, warm", f"{results['machine_cold']['verify_us']} us",
         "", None),
        ("RSS per node (throughput run)", ", ".join(f"{x:.0f}" for x in th["rss_mb"]) + " MB",
         "", None),
        ("RSS full node / joiner (catch-up)", f"{cu['rss_mb_full']:.0f} / "
         f"{cu['rss_mb_joiner']:.0f} MB", "", None),
    ]
    print(f"crdtbook network bench: {args.nodes} node processes on 127.0.0.1, "
          f"{os.cpu_count()} cores")
    for name, value, target, ok in rows:
        mark = "" if ok is None else ("PASS" if ok else "FAIL")
        print(f"  {name:<48} {value:>22}  {target:<22} {mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
