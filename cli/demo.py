"""``crdtbook demo``: a local N-node network, concurrent trading, convergence and finality.

The demo creates N node homes, each with its identity, and defines a witnessed market in which
every node is a witness (the definition names their keys; the nodes get it as ``--market
@FILE``). It starts N ``crdtbook node`` processes on 127.0.0.1 (free ports; nodes 2..N bootstrap
from node 1), places a resting ladder, then fires crossing orders and a cancel at different nodes
at the same moment (one thread each, released by a barrier). It waits until every node reports
the same digest, then until every node reports every fill final (the witnesses' heartbeats
acknowledged them), shows the books side by side with the fills marked final, and always stops
the nodes and removes the temporary homes (``try/finally``; SIGINT first, SIGKILL after a grace
period).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.columns import Columns
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from crdtbook import Market
from crdtbook.cli import connect, render
from crdtbook.node import procs

MARKET = "DEMO"
TICK, LOT = "1", "1"  # prices and quantities are plain integers
MARKET_FILE = "demo.market"  # in the demo's root: the definition every node is given
LISTEN = "/ip4/127.0.0.1/tcp/0"
STOP_GRACE = 10.0  # seconds between SIGINT and SIGKILL
SNAPSHOT_TRIES = 3  # reads of every node's state before a difference counts as disagreement

Json = dict[str, Any]


class DemoError(Exception):
    """The demo cannot go on (a node died, a phase timed out)."""


@dataclass
class DemoNode:
    """One node process of the demo network."""

    index: int  # 1-based
    home: Path
    process: procs.NodeProcess
    log: Path
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)
    witness: str = ""  # its public key (hex): the node is one of the market's witnesses

    @property
    def name(self) -> str:
        """``node 1`` etc."""
        return f"node {self.index}"

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The running process (started by ``start_node``)."""
        assert self.process.proc is not None
        return self.process.proc


@dataclass
class Step:
    """One scripted action: a submit or a cancel at one node."""

    node: int  # 0-based position in the node list
    method: str  # "submit" | "cancel"
    params: Json
    label: str = ""  # for submits a cancel may refer to
    cancels: str = ""  # label of the submit to cancel
    result: Json | None = None
    error: Json | None = None
    final: Json | None = None  # the order as node 1 sees it once every node agrees

    def describe(self) -> str:
        """``sell 5@100`` / ``cancel sell 1@110``."""
        if self.method == "submit":
            p = self.params
            tif = "" if p.get("tif", "gtc") == "gtc" else f" {p['tif']}"
            return f"{p['side']} {p['quantity']}@{p['price']}{tif}"
        return f"cancel {self.cancels}"


# ------------------------------------------------------------------------------------- script


def script(n: int) -> tuple[list[Step], list[Step]]:
    """The scripted flow for ``n`` nodes: a sequential ladder, then a simultaneous race."""

    def sub(node: int, side: str, qty: int, price: int, label: str = "") -> Step:
        params = {"market": MARKET, "side": side, "quantity": str(qty), "price": str(price)}
        if label:
            params["tag"] = label
        return Step(node % n, "submit", params, label=label)

    ladder = [
        sub(0, "sell", 2, 105),
        sub(1, "sell", 3, 104),
        sub(2, "buy", 2, 96),
        sub(0, "buy", 4, 95),
        sub(1, "sell", 1, 110, label="sell 1@110"),
    ]
    race = [
        sub(0, "sell", 5, 100),
        sub(1, "buy", 5, 100),
        sub(2, "buy", 3, 101),
        Step(1 % n, "cancel", {"market": MARKET}, cancels="sell 1@110"),
    ]
    race += [sub(k, "buy", 1, 99 - (k - 3)) for k in range(3, n)]
    return ladder, race


def outcome(step: Step) -> Text:
    """One-line outcome of a step as its node saw it at once."""
    if step.error is not None:
        return Text(f"error: {step.error.get('message')} [{step.error.get('code')}]", style="red")
    if step.result is None:
        return Text("not run", style="dim")
    order = step.result.get("order") or {}
    if step.method == "cancel":
        if step.result.get("effective"):
            return Text("cancelled", style="dim")
        return Text(f"not effective (already {order.get('status')})", style="yellow")
    fills = step.result.get("fills") or []
    text = render.status_text(order.get("status", "?"))
    if fills:
        text.append(f", {len(fills)} fill" + ("s" if len(fills) > 1 else ""), style="")
    if order.get("reason"):
        text.append(f" ({order['reason']})", style="dim")
    return text


# ---------------------------------------------------------------------------------- processes


def _node_cmd(home: Path, bootstrap: list[str], market: str) -> list[str]:
    """The command that runs one demo node (quiet: the demo shows what matters)."""
    return procs.NodeProcess(home, bootstrap, market, listen=LISTEN, verbose=0).command()


def prepare_home(root: Path, index: int) -> tuple[Path, str]:
    """Create node ``index``'s home and its identity (as the node would on first start: a
    32-byte seed in ``identity.key``, mode 0600), so the market can name its key before the
    node runs. Returns the home and the node's witness key (hex)."""
    home = root / f"node{index}"
    home.mkdir(mode=0o700)  # a fresh home: never another node's key
    return home, procs.make_identity(home).hex()


def define_market(root: Path, witnesses: list[str]) -> tuple[Market, str]:
    """The demo market, witnessed by ``witnesses``, written to a file; returns it and the
    ``--market`` argument that names the file (``@FILE``)."""
    market = Market(MARKET, TICK, LOT, witnesses=witnesses)
    path = root / MARKET_FILE
    path.write_text(market.spec + "\n", encoding="utf-8")
    return market, f"@{path}"


def start_node(root: Path, index: int, bootstrap: list[str], market: str) -> DemoNode:
    """Spawn one node (its home already prepared) in its own session, so terminal Ctrl-C
    reaches only the demo; the kernel stops it if the demo dies without cleaning up."""
    home = root / f"node{index}"
    process = procs.NodeProcess(
        home,
        bootstrap,
        market,
        command=_node_cmd(home, bootstrap, market),
        log_path=root / f"node{index}.log",
        own_session=True,
        die_with_parent=True,
    ).spawn()
    return DemoNode(index=index, home=home, process=process, log=process.log_path)


def stop_nodes(nodes: list[DemoNode], grace: float | None = None) -> None:
    """SIGINT every node, wait up to ``grace`` seconds (default STOP_GRACE), then SIGKILL the
    stragglers' process groups."""
    procs.stop_all([node.process for node in nodes], STOP_GRACE if grace is None else grace)


def log_tail(node: DemoNode, lines: int = 15) -> str:
    """The last lines of a node's log (for error reports)."""
    try:
        data = node.log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(data[-lines:])


# ------------------------------------------------------------------------------ control calls


def _call(home: Path, method: str, **params: Any) -> Any:
    client = connect.open_client(home)
    try:
        return client.call(method, **params)
    finally:
        connect.close_client(client)


def try_status(node: DemoNode) -> Json | None:
    """The node's status, or None while its control socket does not answer yet."""
    api = connect.client_api()
    try:
        result: Json = _call(node.home, "status")
        return result
    except (api.NodeNotRunning, api.ControlError, OSError):
        return None


def wait_until(
    what: str,
    check: Callable[[], tuple[bool, str]],
    timeout: float,
    console: Console,
    nodes: list[DemoNode],
) -> float:
    """Poll ``check`` (-> done, progress text) with a spinner until done; return seconds taken."""
    start = time.monotonic()
    with console.status(what) as spinner:
        while True:
            for node in nodes:
                if node.proc.poll() is not None:
                    raise DemoError(f"{node.name} exited with code {node.proc.returncode}")
            done, progress = check()
            if done:
                break
            elapsed = time.monotonic() - start
            if elapsed > timeout:
                raise DemoError(f"timed out after {timeout:.0f}s {what} ({progress})")
            spinner.update(f"{what}: {progress} [{elapsed:.1f}s]")
            time.sleep(0.2)
    took = time.monotonic() - start
    console.print(f"[green]✓[/] {what}: {progress} ({took:.1f}s)")
    return took


def dial_addr(status: Json) -> str:
    """A loopback TCP multiaddr of a node, with ``/p2p/<peer id>`` for bootstrapping."""
    addrs: list[str] = list(status.get("addrs") or [])
    loop = [a for a in addrs if "/ip4/127.0.0.1/tcp/" in a and "/tcp/0/" not in a + "/"]
    if not loop:
        raise DemoError(f"node 1 reports no loopback TCP address (addrs: {addrs})")
    addr = loop[0]
    if "/p2p/" not in addr:
        addr += f"/p2p/{status['peer_id']}"
    return addr


def market_status(status: Json | None) -> Json:
    """The DEMO entry of a status result (empty dict when missing)."""
    for m in (status or {}).get("markets") or []:
        if m.get("name") == MARKET:
            return dict(m)
    return {}


def run_steps(
    steps: list[Step], nodes: list[DemoNode], together: bool, done: dict[str, Step]
) -> None:
    """Run steps one after another, or all at once (one thread each, released together).

    ``done`` maps labels of earlier submits to their steps, so a cancel can find its order id.
    """
    api = connect.client_api()

    def run(step: Step, barrier: threading.Barrier | None) -> None:
        params = dict(step.params)
        if step.method == "cancel":
            target = done.get(step.cancels)
            order = (target.result or {}).get("order") if target else None
            if not order:
                step.error = {"code": "demo", "message": f"no order to cancel ({step.cancels})"}
                if barrier is not None:
                    barrier.wait()
                return
            params["order_id"] = order["id"]
        client = connect.open_client(nodes[step.node].home)
        try:
            if barrier is not None:
                barrier.wait(timeout=30)
            step.result = client.call(step.method, **params)
        except api.ControlError as exc:
            step.error = {"code": getattr(exc, "code", "error"), "message": str(exc)}
        except (api.NodeNotRunning, OSError, threading.BrokenBarrierError) as exc:
            step.error = {"code": "io", "message": str(exc)}
        finally:
            connect.close_client(client)
        if step.label:
            done[step.label] = step

    if not together:
        for step in steps:
            run(step, None)
        return
    barrier = threading.Barrier(len(steps))
    threads = [threading.Thread(target=run, args=(s, barrier), daemon=True) for s in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


# ---------------------------------------------------------------------------------- rendering


def final_text(step: Step) -> Text:
    """How the step's order ended, once all nodes merged every op."""
    order = step.final
    if order is None:
        return Text("-", style="dim")
    text = render.status_text(order.get("status", "?"))
    if order.get("status") in ("filled", "partially_filled"):
        text.append(f" {order.get('filled')} of {order.get('quantity')}", style="")
    if order.get("reason") and order.get("reason") != order.get("status"):
        text.append(f" ({order['reason']})", style="dim")
    if "final" in order and order.get("status") not in ("open", "partially_filled"):
        text.append("  ")  # (a live order is never final: the book's levels are marked instead)
        text.append_text(render.finality_mark(order["final"]))
    return text


def steps_table(title: str, steps: list[Step], nodes: list[DemoNode]) -> Table:
    """What each node answered when the step was sent, and how the order ended."""
    t = Table(title=title, title_justify="left")
    t.add_column("node")
    t.add_column("order")
    t.add_column("id", style="dim")
    t.add_column("at once, at that node")
    t.add_column("in the end, everywhere")
    for s in steps:
        oid = ((s.result or {}).get("order") or {}).get("id")
        t.add_row(nodes[s.node].name, s.describe(), render.short(oid, 8), outcome(s), final_text(s))
    return t


def fetch_finals(steps: list[Step], node: DemoNode) -> None:
    """Ask ``node`` for the final state of every step's order (None when it cannot say)."""
    api = connect.client_api()
    for s in steps:
        oid = ((s.result or {}).get("order") or {}).get("id")
        if not oid:
            continue
        try:
            s.final = _call(node.home, "order", order_id=oid, market=MARKET)
        except (api.ControlError, api.NodeNotRunning, OSError):
            s.final = None


def node_panel(node: DemoNode, snap: Json, reference: str | None) -> Panel:
    """One node's book, fills and digest."""
    digest = snap["digest"] or ""
    same = digest == reference and bool(digest)
    fills = Table(box=None, show_header=True, padding=(0, 1), title="fills", title_justify="left")
    fills.add_column("#", justify="right", style="dim")
    fills.add_column("taker")
    fills.add_column("qty@price", justify="right")
    fills.add_column("")
    for f in snap["fills"]:
        trade = f"{f['quantity']}@{f['price']}"
        mark = render.finality_mark(f.get("final"))
        fills.add_row(str(f.get("index")), f.get("taker_side", "?"), trade, mark)
    body: list[RenderableType] = [render.book_body(snap["book"], digest=False), Text("")]
    body.append(fills if snap["fills"] else Text("no fills", style="dim"))
    line = f"ops {snap['ops']}  digest {render.short(digest, 16)}"
    body.append(Text(line, style="green" if same else "red"))
    if snap.get("finality"):
        n_final = sum(1 for f in snap["fills"] if f.get("final") is True)
        done = n_final == len(snap["fills"])
        final = Text(
            f"{n_final} of {len(snap['fills'])} fills final", style="green" if done else "yellow"
        )
        if snap["finality"] != "final":
            final.append(" (")
            final.append_text(render.finality_cell({"finality": snap["finality"]}))
            final.append(")")
        body.append(final)
    return Panel(
        Group(*body),
        title=f"{node.name} …{node.peer_id[-6:]}",
        border_style="green" if same else "red",
        expand=False,
    )


# ---------------------------------------------------------------------------------------- run


def snapshot(node: DemoNode) -> Json:
    """Book, fills (each marked final or not), status digest and finality of one node."""
    st = market_status(_call(node.home, "status"))
    return {
        "ops": st.get("ops"),
        "digest": st.get("digest"),
        "final_fills": st.get("final_fills"),
        "finality": st.get("finality"),
        "frontier": st.get("frontier"),
        "book": _call(node.home, "book", market=MARKET, depth=10),
        "fills": (_call(node.home, "fills", market=MARKET, limit=100) or {}).get("fills") or [],
    }


def all_final(snap: Json) -> bool:
    """Whether a node reports every fill final (and has fills)."""
    fills: list[Json] = snap["fills"]
    return bool(fills) and all(f.get("final") is True for f in fills)


def _fill_key(fills: list[Json]) -> list[tuple[Any, ...]]:
    return [
        (f.get("index"), f.get("taker"), f.get("maker"), f.get("price"), f.get("quantity"))
        for f in fills
    ]


@contextlib.contextmanager
def network(n: int, console: Console) -> Iterator[tuple[Path, list[DemoNode]]]:
    """Temporary homes and node processes, always cleaned up on the way out."""
    root = Path(tempfile.mkdtemp(prefix="crdtbook-demo-"))
    nodes: list[DemoNode] = []
    try:
        yield root, nodes
    finally:
        if nodes:
            with console.status(f"stopping {len(nodes)} nodes"):
                stop_nodes(nodes)
        shutil.rmtree(root, ignore_errors=True)
        codes = ", ".join(str(nd.proc.returncode) for nd in nodes)
        console.print(f"stopped {len(nodes)} nodes (exit codes {codes}); removed {root}")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _sigterm_as_interrupt() -> Any:
    """Make SIGTERM unwind like Ctrl-C, so the nodes are still stopped and homes removed."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def run_demo(
    nodes: int = 3, keep_running: bool = False, timeout: float = 60.0, as_json: bool = False
) -> int:
    """Run the whole demo; return the exit code (0 when the nodes agree and every fill turned
    final on every node, 1 otherwise or on a failure, 130 on Ctrl-C)."""
    console = Console(stderr=as_json, highlight=False)
    summary: Json = {
        "agree": False,
        "all_final": False,
        "market": MARKET,
        "spec": None,
        "witnesses": [],
        "digest": None,
        "elapsed": None,
        "final_elapsed": None,
        "error": None,
        "nodes": [],
        "submissions": [],
    }
    start = time.monotonic()
    code = 1
    try:
        connect.client_api()
    except ImportError as exc:
        print(f"error: the node control client is not available ({exc})", file=sys.stderr)
        return 1
    previous = _sigterm_as_interrupt()
    try:
        with network(nodes, console) as (root, procs):
            try:
                code = _run(nodes, keep_running, timeout, as_json, console, root, procs, summary)
            except Exception as exc:  # DemoError, or a node answered oddly / died mid-call
                reason = str(exc) if isinstance(exc, DemoError) else f"{type(exc).__name__}: {exc}"
                summary["error"] = reason
                console.print(f"[red]demo failed:[/] {reason}")
                for node in procs:
                    tail = log_tail(node)
                    if tail:
                        console.print(Panel(Text(tail), title=f"{node.name} log (last lines)"))
                code = 1
    except KeyboardInterrupt:
        console.print("interrupted; nodes stopped")
        summary["error"] = "interrupted"
        code = 130
    finally:
        _restore_sigterm(previous)
    summary["elapsed"] = round(time.monotonic() - start, 3)
    if as_json:
        print(json.dumps(summary, indent=2))
    return code


def _entry(node: DemoNode) -> Json:
    """A node's entry in the --json summary; book state is filled in at the end."""
    return {
        "node": node.index,
        "pid": node.proc.pid,
        "peer_id": node.peer_id or None,
        "addrs": node.addrs,
        "home": str(node.home),
        "witness": node.witness or None,
        "ops": None,
        "digest": None,
        "final_fills": None,
        "finality": None,
        "frontier": None,
        "book": None,
        "fills": [],
    }


def _run(
    n: int,
    keep_running: bool,
    timeout: float,
    as_json: bool,
    console: Console,
    root: Path,
    procs: list[DemoNode],
    summary: Json,
) -> int:
    console.print(f"[bold]crdtbook demo[/]: {n} nodes on 127.0.0.1, homes under {root}")

    # 0. every node's home and key first, so the market can name them all as its witnesses.
    keys = [prepare_home(root, i)[1] for i in range(1, n + 1)]
    market, market_arg = define_market(root, keys)
    summary.update(spec=market.spec, witnesses=[k.hex() for k in market.witnesses])
    console.print(
        f"market {market.name} (tick {market.tick}, lot {market.lot}) witnessed by all {n} "
        f"nodes: fills turn final once their heartbeats acknowledge them ({MARKET_FILE})"
    )

    # 1. node 1, then the others bootstrapping from it.
    procs.append(start_node(root, 1, [], market_arg))
    procs[0].witness = keys[0]
    summary["nodes"].append(_entry(procs[0]))
    statuses: dict[int, Json] = {}

    def ready(which: list[DemoNode]) -> Callable[[], tuple[bool, str]]:
        def check() -> tuple[bool, str]:
            for node in which:
                if node.index not in statuses:
                    st = try_status(node)
                    if st is not None:
                        statuses[node.index] = st
                        node.peer_id = str(st.get("peer_id", ""))
                        node.addrs = list(st.get("addrs") or [])
            up = sum(1 for node in which if node.index in statuses)
            return up == len(which), f"{up}/{len(which)} answering"

        return check

    wait_until("starting node 1", ready(procs[:1]), timeout, console, procs)
    boot = dial_addr(statuses[1])
    for i in range(2, n + 1):
        procs.append(start_node(root, i, [boot], market_arg))
        procs[-1].witness = keys[i - 1]
        summary["nodes"].append(_entry(procs[-1]))
    wait_until(f"starting nodes 2..{n}", ready(procs[1:]), timeout, console, procs)
    for node, entry in zip(procs, summary["nodes"], strict=True):
        entry.update(peer_id=node.peer_id, addrs=node.addrs)
    for node in procs:
        addrs = " ".join(a.split("/p2p/")[0] for a in node.addrs)
        console.print(f"  {node.name}  {node.peer_id}  witness {node.witness[:16]}…  {addrs}")

    # 2. everyone connected: node 1 sees the n-1 others, each other node sees at least node 1.
    def connected() -> tuple[bool, str]:
        counts = []
        for node in procs:
            st = try_status(node)
            counts.append(len((st or {}).get("peers") or []))
        ok = counts[0] >= n - 1 and all(c >= 1 for c in counts[1:])
        return ok, "peers " + "/".join(map(str, counts))

    wait_until("connecting peers", connected, timeout, console, procs)

    # 3. trade: a ladder one by one, then the race all at once.
    ladder, race = script(n)
    done: dict[str, Step] = {}
    run_steps(ladder, procs, together=False, done=done)
    run_steps(race, procs, together=True, done=done)
    console.print(f"sent {len(ladder)} ladder orders one by one, then {len(race)} requests at once")

    # 4. converge: every node reports the same digest with nothing pending.
    def converged() -> tuple[bool, str]:
        ms = [market_status(try_status(node)) for node in procs]
        digests = {m.get("digest") for m in ms}
        ops = "/".join(str(m.get("ops", "?")) for m in ms)
        pending = sum(int(m.get("pending") or 0) for m in ms)
        ok = len(digests) == 1 and None not in digests and pending == 0
        return ok, f"ops {ops}, {len(digests)} distinct digest(s), {pending} pending"

    race_done = time.monotonic()
    converged_ok = False
    try:
        wait_until("waiting for all digests to agree", converged, timeout, console, procs)
        converged_ok = True
    except DemoError as exc:
        if any(node.proc.poll() is not None for node in procs):
            raise
        console.print(f"[red]✗[/] {exc}")

    # 5. finality: every node reports every fill final (the witnesses' heartbeats acknowledged
    # them), with the same digest and nothing pending.
    def finalised() -> tuple[bool, str]:
        ms = [market_status(try_status(node)) for node in procs]
        counts = [(int(m.get("final_fills") or 0), int(m.get("fills") or 0)) for m in ms]
        digests = {m.get("digest") for m in ms}
        pending = sum(int(m.get("pending") or 0) for m in ms)
        ok = (
            len(digests) == 1
            and None not in digests
            and pending == 0
            and len({total for _, total in counts}) == 1
            and all(final == total > 0 for final, total in counts)
        )
        states = "/".join(str(m.get("finality", "?")) for m in ms)
        return ok, "final fills " + " ".join(f"{f}/{t}" for f, t in counts) + f" ({states})"

    final_ok = False
    if converged_ok:
        try:
            wait_until("waiting for every fill to turn final", finalised, timeout, console, procs)
            final_ok = True
            summary["final_elapsed"] = round(time.monotonic() - race_done, 3)
        except DemoError as exc:
            if any(node.proc.poll() is not None for node in procs):
                raise
            console.print(f"[red]✗[/] {exc}")

    # 6. show and judge.
    fetch_finals(ladder + race, procs[0])
    for phase, steps in (("ladder", ladder), ("race", race)):
        for s in steps:
            summary["submissions"].append(
                {
                    "node": s.node + 1,
                    "phase": phase,
                    "method": s.method,
                    "order": s.describe(),
                    "result": s.result,
                    "error": s.error,
                    "final": s.final,
                }
            )
    if not as_json:
        console.print(steps_table("resting ladder (one at a time)", ladder, procs))
        console.print(steps_table("the race (all sent at the same moment)", race, procs))
    for attempt in range(SNAPSHOT_TRIES):
        # Read one node after the other; a heartbeat landing in between may change a digest, so
        # a differing read is taken again (briefly) before it counts as a disagreement.
        snaps = [snapshot(node) for node in procs]
        ref = snaps[0]["digest"]
        digests_agree = all(s["digest"] == ref and s["digest"] for s in snaps)
        books_agree = all(s["book"].get("digest") == snaps[0]["book"].get("digest") for s in snaps)
        fills_agree = all(_fill_key(s["fills"]) == _fill_key(snaps[0]["fills"]) for s in snaps)
        agree = bool(digests_agree and books_agree and fills_agree)
        if agree or not converged_ok or attempt == SNAPSHOT_TRIES - 1:
            break
        time.sleep(0.5)
    finals = final_ok and all(all_final(snap) for snap in snaps)
    summary.update(agree=agree, digest=ref if agree else None, all_final=finals)
    for entry, snap in zip(summary["nodes"], snaps, strict=True):
        entry.update(snap)
    if not as_json:
        console.print(Columns([node_panel(nd, s, ref) for nd, s in zip(procs, snaps, strict=True)]))
    n_fills = len(snaps[0]["fills"])
    fills_word = f"{n_fills} fill" + ("" if n_fills == 1 else "s")
    if agree:
        console.print(
            f"[bold green]✓ all {n} nodes agree[/]: same book, same {fills_word}, "
            f"digest {render.short(ref, 16)}"
        )
    else:
        what = [
            w
            for w, ok in (
                ("digests", digests_agree),
                ("books", books_agree),
                ("fills", fills_agree),
            )
            if not ok
        ]
        console.print(f"[bold red]✗ the nodes DISAGREE[/] ({', '.join(what)} differ)")
    if finals:
        console.print(
            f"[bold green]✓ all {fills_word} final on every node[/] (frontier "
            f"{snaps[0].get('frontier')}, {summary['final_elapsed']:.1f}s after the race)"
        )
    else:
        per_node = ", ".join(
            f"{nd.name} {sum(1 for f in s['fills'] if f.get('final') is True)}/{len(s['fills'])}"
            for nd, s in zip(procs, snaps, strict=True)
        )
        console.print(f"[bold red]✗ not every fill is final on every node[/] ({per_node})")

    if keep_running:
        console.print("nodes keep running; in another terminal try:")
        for node in procs:
            console.print(f"  crdtbook --home {node.home} book --market {MARKET} --watch")
        console.print(f"  crdtbook --home {procs[0].home} status   (finality and the witnesses)")
        console.print("press Ctrl-C to stop them")
        try:
            while all(node.proc.poll() is None for node in procs):
                time.sleep(0.5)
            console.print("[red]a node exited[/]")
        except KeyboardInterrupt:
            pass
    return 0 if agree and finals else 1
