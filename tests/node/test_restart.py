"""A node restarts from its store: from the checkpoint an orderly stop wrote, from an older
checkpoint after kill -9, and by a full replay when the checkpoint is of no use. Each path ends
with the state the node had. And kill -9 at random moments under load loses nothing it
acknowledged (bench/bench_kill_soak.py does it 20 times and more)."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest

from crdtbook import Market, op_id
from crdtbook.node.store import OpStore

from .harness import MARKET, NodeProcess, converged, wait_until
from .load import Load

pytestmark = pytest.mark.timeout(120)

LOADED = re.compile(r"loaded \S+: (\d+) ops in [\d.]+ s, (.*)")


def _trade(node: NodeProcess, count: int, start: int = 0) -> None:
    """Orders that rest, cross (one key: self-trade prevention expires makers), and cancels."""
    for i in range(start, start + count):
        side = "buy" if i % 3 else "sell"
        result = node.call("submit", side=side, quantity=str(1 + i % 4), price=str(95 + i % 9))
        if i % 5 == 4 and result["order"]["status"] in ("open", "partially_filled"):
            node.call("cancel", order_id=result["order"]["id"])


def _load_lines(node: NodeProcess, since: int) -> list[tuple[int, str]]:
    text = node.log_path.read_text(errors="replace")[since:]
    return [(int(m.group(1)), m.group(2)) for m in LOADED.finditer(text)]


def _log_size(node: NodeProcess) -> int:
    return len(node.log_path.read_text(errors="replace"))


def _restart(node: NodeProcess) -> tuple[NodeProcess, tuple[int, str]]:
    since = _log_size(node)
    again = NodeProcess(node.home).start()
    (line,) = _load_lines(again, since)
    return again, line


def test_restart_uses_the_checkpoint_of_an_orderly_stop(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "n1").start()
    try:
        _trade(node, 40)
        before = node.market_status()
        assert before["ops"] > 40  # the cancels too
        node.stop()  # SIGINT: an orderly stop writes the checkpoint
        log = node.log_path.read_text(errors="replace")
        assert re.search(r"checkpoint of DEMO: \d+ of \d+ ops", log), log[-2000:]

        # 1. From the checkpoint: the same state, and only the checkpoint's tail matched again.
        since = _log_size(node)
        node, (ops, how) = _restart(node)
        match = re.fullmatch(r"checkpoint of (\d+) ops \+ replay of (\d+)", how)
        assert match, how
        covered, replayed = int(match.group(1)), int(match.group(2))
        assert ops == before["ops"] == covered + replayed and covered > 0
        assert f"checkpoint of {covered} ops)" in node.log_path.read_text()[since:]  # stdout
        after = node.market_status()
        assert (after["digest"], after["ops"], after["heads"]) == (
            before["digest"],
            before["ops"],
            before["heads"],
        )

        # 2. kill -9 after more trading: no new checkpoint, the old one still covers the start
        # of the log, and the newer ops are replayed.
        _trade(node, 15, start=40)
        before_kill = node.market_status()
        node.kill9()
        node, (ops, how) = _restart(node)
        assert how == f"checkpoint of {covered} ops + replay of {ops - covered}"
        assert ops == before_kill["ops"]
        assert node.digest() == before_kill["digest"]
        node.stop()

        # 3. A checkpoint that does not apply (here: damaged) costs a full replay, no more.
        with OpStore.open(node.home) as store:
            market_id = Market.parse(MARKET).id
            blob = store.get_checkpoint(market_id)
            assert blob is not None
            damaged = bytearray(blob)
            damaged[len(blob) // 2] ^= 1  # inside the state's arrays
            store.set_checkpoint(market_id, 1, bytes(damaged))
        node, (ops, how) = _restart(node)
        assert how == "full replay (checkpoint not used: damaged: the checksum does not match)"
        assert ops == before_kill["ops"]
        assert node.digest() == before_kill["digest"]
    finally:
        node.stop()


def test_kill9_at_random_moments_under_load(tmp_path: Path) -> None:
    """kill -9 at random moments while a client submits and cancels on the node and another
    trades on its peer. While the node is dead its store opens and holds every op it
    acknowledged; restarted, it catches up with what the peer held at the kill; at the end
    both converge and nothing acknowledged anywhere is missing."""
    rng = random.Random(91)  # seeded: the same moments each run
    market = Market.parse(MARKET)
    peer = NodeProcess(tmp_path / "peer").start()
    node = NodeProcess(tmp_path / "node", [peer.addr])
    loads: list[Load] = []
    try:
        node.start()
        wait_until(lambda: node.peers() >= 1, 20, "the node to reach its peer")
        loads = [Load(node, 1), Load(peer, 2)]
        for _kill in range(3):
            time.sleep(rng.uniform(0.3, 1.5))
            node.kill9()
            acked = {bytes.fromhex(i) for i in list(loads[0].acked)}
            peer_ops = peer.market_status()["ops"]
            with OpStore.open(node.home) as store:  # opens (WAL recovery) after a kill
                stored = {op_id(raw) for raw in store.load_market(market.id)}
            assert acked and acked <= stored, f"{len(acked - stored)} acknowledged ops lost"
            node = NodeProcess(node.home, [peer.addr]).start()

            def caught_up(n: NodeProcess = node, want: int = peer_ops) -> bool:
                return int(n.market_status()["ops"]) >= want

            wait_until(caught_up, 30, "the node to catch up")
        for load in loads:
            load.stop()
        wait_until(lambda: converged([node, peer]), 60, "node and peer to converge")
        node.stop()
        with OpStore.open(node.home) as store:
            stored = {op_id(raw) for raw in store.load_market(market.id)}
        acked = {bytes.fromhex(i) for load in loads for i in load.acked}
        assert acked <= stored
        assert sum(1 for load in loads for code, _ in load.errors if code != "os") == 0
    finally:
        for load in loads:
            load.stop()
        node.stop()
        peer.stop()
