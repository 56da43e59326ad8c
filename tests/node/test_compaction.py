"""Compaction on a node (issue #10): a witnessed market's replica lets final history leave memory,
the store keeps it, and the node still answers for it.

In process (a ``NodeService`` over a real store in ``tmp_path``, the control API's real handler):
the node compacts, restarts from its snapshot to the same state, answers ``fills``, ``order``
and client ids for compacted history from the store, recognizes a late duplicate of a compacted
op, falls back to the whole log when the snapshot is damaged, and never compacts a market
without witnesses. With a real node process: a kill -9 while it compacts loses nothing.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from crdtbook import BadCancel, Identity, Market, Op, Replica
from crdtbook.node.control_errors import ControlError
from crdtbook.node.handler import ControlAdapter
from crdtbook.node.procs import NodeProcess, make_identity, wait_until
from crdtbook.node.service import MarketState, NodeService
from crdtbook.node.store import STORE_FILENAME, OpStore, StoreWriteError

WITNESS = Identity.from_seed(b"W" * 32)
TRADERS = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(4)]
MARKET = Market("CMP", "1", "1", witnesses=(WITNESS.public_key,))
PLAIN = Market("PLN", "1", "1")
#: The point interval: small, so a few hundred ops make several compactions.
COMPACT_AFTER = 150


def author(count: int, seed: int, market: Market = MARKET) -> list[Op]:
    """``count`` trader ops crossing around a fixed price; each trader cancels its oldest
    orders beyond a few (filled ones too: such cancels often reach the node after the order
    was compacted), so the book stays small."""
    rng = random.Random(seed)
    replica = Replica(market)
    resting: list[list[bytes]] = [[] for _ in TRADERS]
    out: list[Op] = []
    for _ in range(count):
        who = rng.randrange(len(TRADERS))
        mine = resting[who]
        op = None
        if len(mine) > 5:
            try:
                op = replica.cancel(TRADERS[who], mine.pop(0))
            except BadCancel:
                op = None
        if op is None:
            side = rng.choice(("buy", "sell"))
            op = replica.submit(TRADERS[who], side, 100 + rng.randint(-2, 2), rng.randint(1, 5))
            mine.append(op.id)
        out.append(op)
    return out


class Node:
    """A witness node in process: its service, the control API's handler, its store."""

    def __init__(self, home: Path, markets: list[Market] | None = None) -> None:
        self.store = OpStore.open(home / STORE_FILENAME, synchronous="NORMAL")
        self.service = NodeService(
            WITNESS, self.store, markets or [MARKET], point_interval=COMPACT_AFTER
        )
        self.service.load_from_store()
        #: Compact whenever a point is reached while feeding (else only when the test asks).
        self.auto = True
        self.adapter = ControlAdapter(self.service, lambda: {"peer_id": "p", "addrs": []})

    @property
    def ms(self) -> MarketState:
        return self.service.by_name[MARKET.name]

    async def feed(self, ops: list[Op], batch: int = 50) -> None:
        """Ingest ``ops`` as sync brings them, heartbeating after each batch (so they turn
        final), and compact whenever it is due, as the finality task does."""
        service, ms = self.service, self.ms
        for start in range(0, len(ops), batch):
            prepared = await service.prepare(ms, [op.raw for op in ops[start : start + batch]])
            await service.commit(ms, prepared, "test")
            await service.heartbeat(ms)
            if self.auto and service.compaction_due(ms):
                assert await service.compact(ms)

    async def call(self, method: str, **params: Any) -> Any:
        return await self.adapter.call(method, {"market": MARKET.name, **params})

    def close(self) -> None:
        self.store.close()


def reference(store_path: Path) -> Replica:
    """The market replayed from every op in the store: what the node must equal."""
    with OpStore.open(store_path) as store:
        return Replica.restore(MARKET, list(store.load_market(MARKET.id)), None, verify=False)


def shared(fill: dict[str, Any]) -> dict[str, Any]:
    """A fill as every replica shows it (no node-local times)."""
    return {k: v for k, v in fill.items() if k not in ("received_ms", "witnessed_ms")}


async def test_compacts_restarts_and_answers_for_history(tmp_path: Path) -> None:
    node = Node(tmp_path)
    ms = node.ms
    # A tagged order of the node's own, early: compacted with the rest once final and done.
    mine = await node.service.submit(ms, "sell", 103, 1, "ioc", "early-1")
    await node.feed(author(900, seed=1))
    replica = ms.replica
    assert ms.compactions >= 3 and replica.compacted_ops > 600
    assert replica.compacted_fills > 0
    assert node.store.compacted_count(MARKET.id) > 0
    assert len(ms.received_ms) < len(replica) - replica.compacted_ops + 2100  # pruned with it
    status = (await node.adapter.call("status", {"digest": False}))["markets"][0]
    assert status["compacted_ops"] == replica.compacted_ops
    assert status["compacted_fills"] == replica.compacted_fills
    digest, fill_count, total = replica.digest(), replica.fill_count, len(replica)

    ref = reference(tmp_path / STORE_FILENAME)
    assert ref.digest() == digest and len(ref) == total and ref.fill_count == fill_count
    # fills: compacted history comes from the store, the rest from memory, numbered globally.
    fills = (await node.call("fills", limit=10_000))["fills"]
    assert [f["index"] for f in fills] == list(range(fill_count))
    assert [(f["taker"], f["maker"], f["price_ticks"], f["quantity_lots"]) for f in fills] == [
        (f.taker.hex(), f.maker.hex(), f.price, f.quantity) for f in ref.fills()
    ]
    assert all(f["final"] for f in fills[: replica.compacted_fills])
    assert fills[0]["witnessed_ms"] is not None  # the witnessed time was kept with it
    # Paging with start: across the compacted and the in-memory fills, then past the end.
    paged, start = [], 0
    while True:
        page = await node.call("fills", start=start, limit=97)
        assert page["fill_count"] == fill_count
        if not page["fills"]:
            break
        paged += page["fills"]
        start = page["fills"][-1]["index"] + 1
    assert paged == fills
    for bad in ({"start": -1}, {"start": 0, "mine": True}):
        with pytest.raises(ControlError) as refused:
            await node.call("fills", **bad)
        assert refused.value.code == "bad_request"
    # order: a compacted order is answered from the store, as the full replay has it.
    gone = next(op for op in ref.ops() if op.kind == "order" and replica.order(op.id) is None)
    answer = await node.call("order", order_id=gone.id.hex())
    expected = ref.order(gone.id)
    assert expected is not None
    assert (answer["status"], answer["filled_lots"], answer["final"]) == (
        expected.status,
        expected.filled,
        True,
    )
    prefix = await node.call("order", order_id=gone.id.hex()[:20])
    assert prefix["id"] == gone.id.hex()
    assert replica.order(mine.id) is None  # compacted: found by its client id in the store
    by_tag = await node.call("order", client_id="early-1")
    assert by_tag["id"] == mine.id.hex() and by_tag["final"]
    # Cancelling it: nothing to cancel, and nothing signed (a cancel op went out, then an
    # internal error: a compacted order had no state to answer with).
    ops_before = len(replica)
    for params in ({"order_id": mine.id.hex()}, {"client_id": "early-1"}):
        answer = await node.call("cancel", **params)
        assert answer["effective"] is False and answer["cancel_id"] is None
        assert answer["final"] is True
        assert answer["order"]["id"] == mine.id.hex() and answer["order"]["final"] is True
    assert len(replica) == ops_before

    # orders: the compacted ones from the store first, then those in memory; this node's own
    # (its compacted order among them), or every order. They vanished from the list before.
    placed = [op.id.hex() for op in ref.ops() if op.kind == "order"]
    listed = await node.call("orders", all=True)
    assert listed["more"] is False and len(placed) < 1000
    assert sorted(o["id"] for o in listed["orders"]) == sorted(placed)
    in_memory = len(replica.orders())
    assert in_memory < len(placed)
    assert all(o["final"] for o in listed["orders"][: len(placed) - in_memory])
    newest = await node.call("orders", all=True, limit=in_memory + 3)
    assert newest["more"] is True and len(newest["orders"]) == in_memory + 3
    assert newest["orders"] == listed["orders"][-(in_memory + 3):]
    two = await node.call("orders", all=True, limit=2)
    assert two["orders"] == listed["orders"][-2:] and two["more"] is True
    exactly = await node.call("orders", all=True, limit=len(placed))
    assert exactly["orders"] == listed["orders"] and exactly["more"] is False
    own = await node.call("orders")
    assert [o["id"] for o in own["orders"]] == [mine.id.hex()] and own["more"] is False
    assert own["orders"][0]["final"] and own["orders"][0]["mine"]
    assert (await node.call("orders", open=True))["orders"] == []

    # A late duplicate of a compacted op: recognized, never applied twice.
    prepared = await node.service.prepare(ms, [gone.raw])
    result = await node.service.commit(ms, prepared, "late")
    assert result.new == 0 and result.duplicates == 1
    assert replica.digest() == digest and replica.fill_count == fill_count
    node.close()

    # Restart: from the snapshot plus the live ops, to the same state and answers.
    again = Node(tmp_path)
    restarted = again.ms.replica
    assert restarted.compacted_ops == replica.compacted_ops
    assert restarted.digest() == digest and len(restarted) == total
    assert [shared(f) for f in (await again.call("fills", limit=10_000))["fills"]] == [
        shared(f) for f in fills
    ]
    prepared = await again.service.prepare(again.ms, [gone.raw])
    result = await again.service.commit(again.ms, prepared, "late")
    assert result.new == 0 and result.duplicates == 1 and restarted.digest() == digest
    # It goes on: more ops, more compactions, still the full replay's state.
    await again.feed(author(300, seed=2))
    assert again.ms.replica.compacted_ops > replica.compacted_ops
    again_digest = again.ms.replica.digest()
    again.close()
    assert reference(tmp_path / STORE_FILENAME).digest() == again_digest


async def test_a_damaged_snapshot_falls_back_to_the_whole_log(tmp_path: Path) -> None:
    node = Node(tmp_path)
    await node.feed(author(500, seed=3))
    digest = node.ms.replica.digest()
    assert node.ms.replica.compacted_ops
    node.close()
    conn = sqlite3.connect(tmp_path / STORE_FILENAME)
    (blob,) = conn.execute("SELECT data FROM snapshots").fetchone()
    damaged = (
        blob[: len(blob) // 2] + bytes([blob[len(blob) // 2] ^ 1]) + blob[len(blob) // 2 + 1 :]
    )
    conn.execute("UPDATE snapshots SET data = ?", (damaged,))
    conn.commit()
    conn.close()
    again = Node(tmp_path)
    replica = again.ms.replica
    assert replica.compacted_ops == 0 and replica.digest() == digest
    # It compacts again from there, and the store's marks, history and snapshot agree.
    await again.feed(author(300, seed=4))
    assert again.ms.replica.compacted_ops
    digest = again.ms.replica.digest()
    again.close()
    final = Node(tmp_path)
    assert final.ms.replica.compacted_ops and final.ms.replica.digest() == digest
    final.close()


async def test_a_compaction_the_store_refuses_leaves_memory_as_the_store_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store write fails (disk full): the replica is reloaded from the store (compacted as
    of the last saved snapshot), with the same state, and the node refuses new ops meanwhile."""
    node = Node(tmp_path)
    node.auto = False  # compactions only when the test asks
    await node.feed(author(300, seed=7))
    assert await node.service.compact(node.ms)
    saved = node.ms.replica.compacted_ops
    await node.feed(author(200, seed=8))
    digest = node.ms.replica.digest()

    def full(*args: object, **kwargs: object) -> None:
        raise StoreWriteError("the op store is full", "full")

    monkeypatch.setattr(node.store, "compact", full)
    assert not await node.service.compact(node.ms)
    replica = node.ms.replica
    assert replica.compacted_ops == saved and replica.digest() == digest
    assert node.ms.archive is not None and node.ms.archive.saving is None
    assert node.service.store_fault is not None
    fills = (await node.call("fills", limit=10_000))["fills"]
    assert [f["index"] for f in fills] == list(range(replica.fill_count))
    node.close()


async def test_history_reads_while_a_compaction_is_being_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the store writes a compaction (a worker thread), what left memory is answered
    from the compaction itself, and op writes go on."""
    node = Node(tmp_path)
    node.auto = False
    await node.feed(author(300, seed=10))
    assert await node.service.compact(node.ms)
    await node.feed(author(300, seed=11))
    before = (await node.call("fills", limit=10_000))["fills"]
    orders = [op for op in node.ms.replica.ops() if op.kind == "order"]
    expected = {op.id: node.ms.replica.order(op.id) for op in orders}
    started, release = threading.Event(), threading.Event()
    write = node.store.compact

    def slow(*args: Any, **kwargs: Any) -> None:
        started.set()
        release.wait(10)
        write(*args, **kwargs)

    monkeypatch.setattr(node.store, "compact", slow)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.service.compact, node.ms)
        await trio.to_thread.run_sync(started.wait, 10)
        assert node.ms.archive is not None and node.ms.archive.saving is not None
        assert (await node.call("fills", limit=10_000))["fills"] == before
        for op in orders:
            if node.ms.replica.order(op.id) is None:  # just compacted: from the compaction
                answer = await node.call("order", order_id=op.id.hex())
                state = expected[op.id]
                assert state is not None and answer["status"] == state.status
        listed = {o["id"] for o in (await node.call("orders", all=True))["orders"]}
        assert {op.id.hex() for op in orders} <= listed  # the compaction's own among them
        await node.service.submit(node.ms, "buy", 90, 1, "gtc", None)  # writes go on
        release.set()
    assert node.ms.archive.saving is None and node.ms.compactions == 2
    assert (await node.call("fills", limit=10_000))["fills"] == before
    node.close()


async def test_a_first_compaction_the_store_refuses_is_done_again_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = Node(tmp_path)
    node.auto = False
    await node.feed(author(300, seed=9))
    digest = node.ms.replica.digest()
    for failure in (_refuse, _fail):  # the disk is full; anything else goes wrong
        monkeypatch.setattr(node.store, "compact", failure)
        assert not await node.service.compact(node.ms)
        assert node.ms.replica.compacted_ops == 0 and node.ms.replica.digest() == digest
    monkeypatch.undo()
    node.service.store_fault = None  # the disk has room again
    node.auto = True
    assert node.service.compaction_due(node.ms)
    assert await node.service.compact(node.ms)
    assert node.ms.replica.compacted_ops and node.store.get_snapshot(MARKET.id) is not None
    node.close()


def _refuse(*args: object, **kwargs: object) -> None:
    raise StoreWriteError("the op store is full", "full")


def _fail(*args: object, **kwargs: object) -> None:
    raise OSError("something else")


async def test_an_orderly_stop_compacts_a_compacting_market(tmp_path: Path) -> None:
    node = Node(tmp_path)
    await node.feed(author(400, seed=5))
    replica = node.ms.replica
    node.service.write_checkpoints()  # what an orderly stop runs
    assert node.store.get_snapshot(MARKET.id) is not None
    assert node.store.get_checkpoint(MARKET.id) is None
    digest, compacted = replica.digest(), replica.compacted_ops
    node.close()
    again = Node(tmp_path)
    assert again.ms.replica.compacted_ops == compacted
    assert again.ms.replica.digest() == digest
    again.close()


async def test_a_market_without_witnesses_never_compacts(tmp_path: Path) -> None:
    node = Node(tmp_path, [MARKET, PLAIN])
    plain = node.service.by_name[PLAIN.name]
    ops = author(400, seed=6, market=PLAIN)
    prepared = await node.service.prepare(plain, [op.raw for op in ops])
    await node.service.commit(plain, prepared, "test")
    assert plain.archive is None and not node.service.compaction_due(plain)
    report = plain.replica.compact()
    assert report.ops == [] and plain.replica.compacted_ops == 0
    node.close()


# -- kill -9 during compaction, on a real node ----------------------------------------------


def _submit_loop(node: NodeProcess, stop: threading.Event, acked: list[str]) -> None:
    """Submit orders (alternately buys and sells around one price) until ``stop`` or the node
    dies; ``acked``: the ids of those the node answered for."""
    i = 0
    while not stop.is_set():
        side = "buy" if i % 2 else "sell"
        price = str(100 + (i * 7) % 5 - 2)
        try:
            answer = node.call("submit", market="KILL", side=side, price=price, quantity="1")
        except Exception:  # the kill: whatever was not answered is not acknowledged
            return
        acked.append(answer["order"]["id"])
        i += 1


@pytest.mark.timeout(180)
def test_kill9_during_compaction_loses_nothing(tmp_path: Path) -> None:
    """A witness node compacting every 10 final ops (nearly all the time, at this rate) is
    killed (SIGKILL) at random moments while orders stream in; after each restart (from its
    snapshot) every acknowledged order is there, and its state is the full replay of its
    store."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    home = tmp_path / "node"
    key = make_identity(home)
    spec = f"KILL:1:1:{key.hex()}"
    market = Market.parse(spec)
    node = NodeProcess(
        home,
        market=spec,
        config={"point_interval": 10, "heartbeat_interval": 0.01},
    )
    acked: list[str] = []
    try:
        for round_ in range(3):
            node.start()
            stop = threading.Event()
            worker = threading.Thread(target=_submit_loop, args=(node, stop, acked), daemon=True)
            worker.start()
            want = len(acked) + 150
            wait_until(lambda want=want: len(acked) >= want, 60, f"orders acked (seed {seed})")
            wait_until(
                lambda: node.market_status(digest=False)["compacted_ops"] > 0,
                30,
                f"a compaction (seed {seed})",
            )
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the next compactions
            node.kill9()
            stop.set()
            worker.join(timeout=20)
            node.start()
            status = node.market_status(digest=False)
            assert status["ops"] >= len(acked), f"seed {seed}, round {round_}"
            assert status["compacted_ops"] > 0, "restarted from the whole log, not the snapshot"
            for order_id in rng.sample(acked, min(60, len(acked))) + acked[-5:]:
                assert node.call("order", order_id=order_id)["id"] == order_id, f"seed {seed}"
            live = node.market_status()  # its digest and op count, read together
            node.stop()
            with OpStore.open(home) as store:
                replayed = Replica.restore(
                    market, list(store.load_market(market.id)), None, verify=False
                )
                # The node's own restart path (snapshot, live ops, the store as archive) on
                # the same store equals the full replay, whatever the node signed meanwhile.
                service = NodeService(Identity.from_seed(b"r" * 32), store, [market],
                                      point_interval=10)
                service.load_from_store()
                restarted = service.by_name[market.name].replica
                assert restarted.compacted_ops > 0, f"seed {seed}, round {round_}"
                assert restarted.digest() == replayed.digest(), f"seed {seed}, round {round_}"
            # The running node showed that state too, unless it signed an op after the read (a
            # witness heartbeats once after each point, to attest it).
            if len(replayed) == live["ops"]:
                assert replayed.digest().hex() == live["digest"], f"seed {seed}, round {round_}"
    finally:
        node.kill()


# -- the bench keeps running ------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_memory_bench_runs_and_reports_every_figure() -> None:
    """bench/bench_memory.py at tiny sizes (its targets are the bench's verdicts, not tests')."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [
            sys.executable,
            str(root / "bench" / "bench_memory.py"),
            *("--ops", "4000", "8000", "--point-interval", "1000", "--join", "4000", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout)["results"]
    for key in ("rss_mb", "restart_s", "baseline_rss_mb", "baseline_restart_s"):
        assert set(results[key]) == {"4000", "8000"}, key
    assert set(results["baseline_join_s"]) == {"4000"}
    # The snapshot join at 4,000 ops: from a point, the same state (the bench checks it).
    assert len(results["join_s"]) == 1 and len(results["snapshot_join"]) == 1
    row = results["snapshot_join"][0]
    for joined in (row["after_point"], row["before_next_point"]):
        assert joined["same_digest"] and joined["joined_from_point"] and joined["rejects"] == 0
    assert results["compaction"][-1]["compacted_ops"] > 0
    assert results["baseline"][-1]["compacted_ops"] == 0
