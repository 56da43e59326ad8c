"""The node's per-op CPU outside libp2p (issue #12), in process: the submit path through the
control socket, and the gossip ingest path, in microseconds of the node's (trio) thread per op.

One process, no network. The node is a ``NodeService`` over a store in a temporary home
(SQLite WAL, synchronous=NORMAL as a node without ``--fsync`` runs it), with its control server
on a real Unix socket (node/control.py), its apply task, a flush task whose publish only encodes
the batch, and one watch stream (``digest`` false, ``interval`` 0.02) read by a client thread,
as bench/bench_network.py's latency phase watches each node.

* ``submit``: 4 client threads (node/client.py's ``ControlClient``, one connection each) submit
  and cancel (15%) like ``bench_network.run_load``, paced to ``--rate`` ops/s in total.
* ``gossip``: ``--ops`` ops pre-signed by 4 other authors (each naming the others' heads, as
  real ops do), fed to ``NodeService.validate_gossip`` in batches of ``--batch``, paced to
  ``--rate`` ops/s; the apply task applies what the validator queued.

The figure is ``time.thread_time`` of the trio thread over the run divided by the ops (the
client threads run on their own threads, and the clock of the trio thread counts none of their
work). Baselines in the same run: the ed25519 signing (submit) and verification (gossip) floors,
timed alone on the same ops. ``--profile`` adds a cProfile (``time.thread_time``) breakdown of
the trio thread. ``--base DIR`` runs the same measurement alternately with the code of another
tree (``DIR/crdtbook``, ``DIR/crdtbook/node``: e.g. ``git archive`` of an earlier commit), each
arm in its own process, and prints both arms' figures side by side (ratios, not absolutes: the
machine is shared).

    python bench/bench_ingest.py                       # both parts, current code
    python bench/bench_ingest.py --profile --part gossip
    python bench/bench_ingest.py --base /tmp/base --reps 3   # A/B against another tree
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Final

#: The bench's control clients per node and their share of cancels (bench_network.run_load).
CLIENT_THREADS = 4
CANCEL_SHARE = 0.15
#: Gossip messages as a 5-node network at 500 ops/s delivers them to one node: ~20 ops each,
#: from 4 authors.
GOSSIP_AUTHORS = 4
GOSSIP_BATCH = 20
#: bench_network's latency phase: 500 ops/s over 5 nodes, so each node takes ~100 submits/s
#: and ~400 gossip ops/s.
SUBMIT_RATE = 100.0
GOSSIP_RATE = 400.0
#: Ops by others the node holds before the clock starts: a market that has traded for a few
#: seconds (over 1,000 fills, as many provisional fills as a watch stream follows).
PRELOAD = 3000
#: The watch stream bench_network's latency phase opens on every node.
WATCH_PARAMS: dict[str, Any] = {"digest": False, "interval": 0.02}


def order_params(rng: random.Random) -> dict[str, str]:
    """bench_network.order_params: mostly near the touch, ~30% crossing."""
    side = rng.choice(("buy", "sell"))
    price = rng.randint(95, 101) if side == "buy" else rng.randint(99, 105)
    tif = "ioc" if rng.random() < 0.05 else "gtc"
    return {"side": side, "price": str(price), "quantity": str(rng.randint(1, 5)), "tif": tif}


class WatchReader:
    """A watch stream's client on its own thread: counts the applied ids it is told about."""

    def __init__(self, home: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(home / "control.sock"))
        request = {"id": 1, "method": "watch", "params": WATCH_PARAMS}
        self.sock.sendall((json.dumps(request) + "\n").encode())
        self.applied = 0
        self.events = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    event = json.loads(line)
                    self.events += 1
                    self.applied += len(event.get("applied", ()))
        except OSError:
            return

    def wait_applied(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.applied < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.sock.close()


def submit_clients(home: Path, rate: float, seconds: float) -> int:
    """bench_network.run_load for one node: returns the ops it had acknowledged."""
    from crdtbook.node.client import ControlClient

    done = [0] * CLIENT_THREADS
    clients = [ControlClient(home, timeout=30) for _ in range(CLIENT_THREADS)]
    for client in clients:  # connected before the clock starts
        client.call("id")
    start = time.monotonic() + 0.05
    stop_at = start + seconds
    interval = CLIENT_THREADS / rate

    def work(index: int) -> None:
        rng = random.Random(1000 + index)
        client = clients[index]
        mine: list[str] = []
        next_at = start + interval * index / CLIENT_THREADS
        try:
            while True:
                now = time.monotonic()
                if now >= stop_at:
                    return
                if now < next_at:
                    time.sleep(next_at - now)
                next_at += interval
                if mine and rng.random() < CANCEL_SHARE:
                    client.call("cancel", order_id=mine.pop(rng.randrange(len(mine))))
                else:
                    result = client.call("submit", **order_params(rng))
                    if result["order"]["status"] in ("open", "partially_filled"):
                        mine.append(result["order"]["id"])
                done[index] += 1
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(CLIENT_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def clients_process(home: Path, part: str, rate: float, seconds: float, expect: int) -> None:
    """The clients, in a process of their own as in bench_network (in the node's process
    their threads would fight its thread for the GIL, and the node's clock would count the
    hand-overs): the watch stream, and for ``submit`` the submitting threads. Says ``ready``,
    waits for ``go`` on stdin, prints its counts as JSON once done."""
    watch = WatchReader(home)
    print("ready", flush=True)
    sys.stdin.readline()
    done = submit_clients(home, rate, seconds) if part == "submit" else expect
    watch.wait_applied(done, 10.0)
    print(json.dumps({"done": done, "events": watch.events, "applied": watch.applied}), flush=True)
    watch.close()


def gossip_ops(market: Any, count: int) -> list[bytes]:
    """``count`` ops by GOSSIP_AUTHORS authors, round robin, each naming the heads it saw."""
    from crdtbook import Identity, Replica

    source = Replica(market)
    authors = [Identity.from_seed(bytes([0x40 + i]) * 32) for i in range(GOSSIP_AUTHORS)]
    rng = random.Random(7)
    raws: list[bytes] = []
    for i in range(count):
        params = order_params(rng)
        op = source.submit(
            authors[i % GOSSIP_AUTHORS],
            params["side"],
            market.price_to_ticks(params["price"]),
            market.qty_to_lots(params["quantity"]),
            params["tif"],
        )
        raws.append(op.raw)
    return raws


def floor_us(part: str, market: Any, raws: list[bytes]) -> float:
    """The signature floor per op, timed alone on the same ops: for gossip, decoding with the
    ed25519 check (what ``prepare`` cannot avoid) less decoding without it, i.e. the check;
    for submit, ``sign_op`` (encode, sign, decode unverified: what ``Replica._author`` does
    besides applying)."""
    from crdtbook import Identity, decode
    from crdtbook._ops import sign_op

    if part == "gossip":
        started = time.thread_time()
        for raw in raws:
            decode(raw)
        checked = time.thread_time() - started
        started = time.thread_time()
        for raw in raws:
            decode(raw, verify=False)
        return (checked - (time.thread_time() - started)) / len(raws) * 1e6
    ops = [decode(raw, verify=False) for raw in raws]
    me = Identity.from_seed(b"f" * 32)
    started = time.thread_time()
    for op in ops:
        sign_op(me, op.market_id, op.seq, op.lamport, op.parents, op.body, market.version)
    return (time.thread_time() - started) / len(ops) * 1e6


#: What ``--timers`` times (inclusive ``time.thread_time`` per call, summed per op): the
#: node's steps of a submit and of a gossip message, by module and attribute name.
TIMED: Final = (
    ("crdtbook.node.control", None, ("_parse", "_encode")),
    ("crdtbook.node.handler", "ControlAdapter", ("_placed", "_resolve_order", "_tag_and_stp")),
    ("crdtbook.node.handler", None, ("_crossed", "_taken", "_lots", "_ticks", "order_json",
                                     "fill_json")),
    ("crdtbook.node.handler", "WatchedFills", ("update",)),
    ("crdtbook.node.service", "NodeService", ("notify", "prepare")),
    ("crdtbook.node.store", "OpStore", ("add_ops",)),
    ("crdtbook.node.service", None, ("decode_batch",)),  # as the validator calls it
    ("crdtbook", "Replica", ("submit", "cancel", "apply_many", "precheck")),
)


class Timers:
    """Inclusive thread CPU time of the functions in TIMED, patched in place (each call costs
    two clock reads: far less distortion than cProfile's per-call hooks, which ~2.5x the run
    here). Nested timed calls are counted in both."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def install(self) -> None:
        import importlib
        import inspect

        for module_name, owner_name, names in TIMED:
            module = importlib.import_module(module_name)
            owner = module if owner_name is None else getattr(module, owner_name)
            for name in names:
                fn = getattr(owner, name)
                label = f"{owner_name or module_name.rsplit('.', 1)[-1]}.{name}"
                wrapper = (self._async if inspect.iscoroutinefunction(fn) else self._sync)(
                    fn, label
                )
                setattr(owner, name, wrapper)

    def _sync(self, fn: Any, label: str) -> Any:
        seconds, calls = self.seconds, self.calls
        seconds[label], calls[label] = 0.0, 0

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] += time.thread_time() - started
                calls[label] += 1

        return timed

    def _async(self, fn: Any, label: str) -> Any:
        seconds, calls = self.seconds, self.calls
        seconds[label], calls[label] = 0.0, 0

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()  # includes other tasks run while it awaits
            try:
                return await fn(*args, **kwargs)
            finally:
                seconds[label] += time.thread_time() - started
                calls[label] += 1

        return timed

    def reset(self) -> None:
        for label in self.seconds:
            self.seconds[label], self.calls[label] = 0.0, 0

    def per_op(self, ops: int) -> dict[str, tuple[float, int]]:
        """label -> (us per op, calls), the costliest first; uncalled ones left out."""
        rows = sorted(self.seconds.items(), key=lambda kv: -kv[1])
        return {k: (round(v / ops * 1e6, 1), self.calls[k]) for k, v in rows if self.calls[k]}


def run_once(
    part: str,
    ops: int,
    rate: float,
    seconds: float,
    profile: bool,
    preload: int,
    timers: Timers | None = None,
) -> dict[str, Any]:
    """One measurement in this process (with whichever code it imports)."""
    import trio

    if timers is not None:
        timers.install()

    from crdtbook import Identity, Market
    from crdtbook.node.control import serve_control
    from crdtbook.node.handler import ControlAdapter
    from crdtbook.node.service import NodeService
    from crdtbook.node.store import OpStore
    from crdtbook.node.wire import encode_batch

    market = Market.parse("BTC-USD")
    raws = gossip_ops(market, preload + (ops if part == "gossip" else 0))
    history, raws = raws[:preload], raws[preload:]
    result: dict[str, Any] = {"part": part}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir(mode=0o700)
        store = OpStore.open(home, synchronous="NORMAL")
        service = NodeService(Identity.from_seed(b"n" * 32), store, [market])
        service.load_from_store()
        ms = service.markets[market.id]
        adapter = ControlAdapter(service, lambda: {"peer_id": "bench", "addrs": []})
        published = [0]

        async def publish(topic: str, data: bytes) -> None:
            published[0] += 1

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(service.apply_loop, ms)
                nursery.start_soon(service.flush_loop, ms, publish, lambda topic: 4)
                await nursery.start(serve_control, home, adapter)
                for i in range(0, len(history), GOSSIP_BATCH):  # a market already trading
                    await service.validate_gossip(
                        ms, encode_batch(history[i : i + GOSSIP_BATCH]), "peer"
                    )
                    await trio.sleep(0)
                while len(ms.replica) < len(history):
                    await trio.sleep(0.01)
                clients = subprocess.Popen(
                    [sys.executable, __file__, "--clients", str(home), "--part", part,
                     "--rate", str(rate), "--seconds", str(seconds), "--ops", str(len(raws))],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )
                assert clients.stdin is not None and clients.stdout is not None
                ready = await trio.to_thread.run_sync(clients.stdout.readline)
                if ready.strip() != "ready":
                    raise RuntimeError(f"the clients did not start: {ready!r}")
                await trio.sleep(0.2)
                profiler = cProfile.Profile(time.thread_time) if profile else None
                if timers is not None:
                    timers.reset()
                cpu0, wall0 = time.thread_time(), time.monotonic()
                if profiler is not None:
                    profiler.enable()
                clients.stdin.write("go\n")
                clients.stdin.flush()
                if part == "gossip":
                    per_batch = GOSSIP_BATCH / rate
                    next_at = trio.current_time()
                    for i in range(0, len(raws), GOSSIP_BATCH):
                        await trio.sleep_until(next_at)
                        next_at += per_batch
                        data = encode_batch(raws[i : i + GOSSIP_BATCH])
                        if not await service.validate_gossip(ms, data, "peer"):
                            raise AssertionError("the validator refused an honest batch")
                counts = json.loads(await trio.to_thread.run_sync(clients.stdout.readline))
                if profiler is not None:
                    profiler.disable()
                cpu = time.thread_time() - cpu0
                wall = time.monotonic() - wall0
                done = counts["done"]
                if timers is not None:
                    result["timers"] = timers.per_op(done)
                result.update(
                    ops=done,
                    wall_s=round(wall, 2),
                    node_us_per_op=round(cpu / done * 1e6, 1),
                    node_cpu_share=round(cpu / wall, 3),
                    watch_events=counts["events"],
                    watch_applied=counts["applied"],
                    published=published[0],
                )
                if profiler is not None:
                    out = io.StringIO()
                    stats = pstats.Stats(profiler, stream=out)
                    stats.sort_stats("tottime").print_stats(30)
                    stats.sort_stats("cumulative").print_stats(45)
                    stats.sort_stats("cumulative").print_stats(
                        "node/|_market|_replica|json|sqlite", 40
                    )
                    result["profile"] = out.getvalue()
                clients.stdin.close()
                await trio.to_thread.run_sync(clients.wait)
                nursery.cancel_scope.cancel()

        trio.run(main)
        stored = store.count(market.id)
        result["stored"] = stored
        store.close()
        floor_raws = raws or [op.raw for op in ms.replica.iter_ops(len(history))]
    result["floor_us_per_op"] = round(floor_us(part, market, floor_raws[:2000]), 1)
    return result


def child(args: argparse.Namespace, base: str | None) -> dict[str, Any]:
    """One measurement in a fresh process, importing the code of ``base`` (None: this tree)."""
    env = dict(os.environ)
    if base is not None:
        env["PYTHONPATH"] = base
    command = [
        sys.executable, __file__, "--child", "--part", args.part_one, "--ops", str(args.ops),
        "--seconds", str(args.seconds), "--rate", str(args.rate_one),
        "--preload", str(args.preload),
    ]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    parsed: dict[str, Any] = json.loads(out.splitlines()[-1])
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("submit", "gossip", "both"), default="both")
    parser.add_argument("--ops", type=int, default=2000, help="gossip ops (default 2000)")
    parser.add_argument("--seconds", type=float, default=6.0, help="submit run (default 6)")
    parser.add_argument("--rate", type=float, default=None,
                        help=f"ops/s (default: submit {SUBMIT_RATE:.0f}, gossip {GOSSIP_RATE:.0f})")
    parser.add_argument("--preload", type=int, default=PRELOAD,
                        help=f"ops by others applied before the clock starts (default {PRELOAD})")
    parser.add_argument("--profile", action="store_true", help="cProfile the node's thread")
    parser.add_argument("--timers", action="store_true",
                        help="inclusive CPU time per op of the node's main steps")
    parser.add_argument("--base", help="a tree with the baseline code (DIR/crdtbook, .../node)")
    parser.add_argument("--reps", type=int, default=3, help="A/B pairs with --base")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clients", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clients:
        clients_process(Path(args.clients), args.part, args.rate, args.seconds, args.ops)
        return
    parts = ["submit", "gossip"] if args.part == "both" else [args.part]
    if args.child:
        rate = args.rate if args.rate is not None else 0.0
        print(json.dumps(run_once(args.part, args.ops, rate, args.seconds, False, args.preload)))
        return
    print(f"# uptime: {os.popen('uptime').read().strip()}", flush=True)
    results: list[dict[str, Any]] = []
    for part in parts:
        rate = args.rate if args.rate is not None else (
            SUBMIT_RATE if part == "submit" else GOSSIP_RATE
        )
        if args.base is None:
            res = run_once(part, args.ops, rate, args.seconds, args.profile, args.preload,
                           Timers() if args.timers else None)
            results.append(res)
            profile_text = res.pop("profile", None)
            print(json.dumps(res) if args.json else
                  f"{part}: {res['node_us_per_op']} us of node CPU per op over {res['ops']} ops "
                  f"({res['wall_s']} s, node thread busy {res['node_cpu_share']:.0%}); signature "
                  f"floor {res['floor_us_per_op']} us; watch saw {res['watch_applied']} ids in "
                  f"{res['watch_events']} events", flush=True)
            for label, (us, calls) in res.get("timers", {}).items():
                print(f"    {label:28} {us:8.1f} us/op  ({calls} calls)")
            if profile_text:
                print(profile_text)
            continue
        args.part_one, args.rate_one = part, rate
        arms: dict[str, list[float]] = {"base": [], "ours": []}
        for rep in range(args.reps):
            for arm in ("base", "ours") if rep % 2 == 0 else ("ours", "base"):
                res = child(args, args.base if arm == "base" else None)
                arms[arm].append(res["node_us_per_op"])
                print(f"{part} rep {rep} {arm}: {res['node_us_per_op']} us/op "
                      f"(floor {res['floor_us_per_op']}, {res['ops']} ops)", flush=True)
        b, o = statistics.median(arms["base"]), statistics.median(arms["ours"])
        print(f"{part}: median base {b} us/op, ours {o} us/op, ours/base {o / b:.3f}")
        results.append({"part": part, "base": arms["base"], "ours": arms["ours"]})
    print(f"# uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
