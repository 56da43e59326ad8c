"""Tests for the SQLite op store: semantics, threading, and crash safety under SIGKILL."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from crdtbook import Fill, OrderState
from crdtbook.node import store as store_module
from crdtbook.node.store import (
    SCHEMA_VERSION,
    STORE_FILENAME,
    CompactedFill,
    CompactedOrder,
    MarketRecord,
    OpStore,
    Snapshot,
    StoreError,
)

M1 = b"\x01" * 32
M2 = b"\x02" * 32


def op(n: int, market: bytes = M1, lamport: int | None = None) -> tuple[bytes, bytes, int, bytes]:
    """A deterministic fake op: id = sha256(n), raw names the op."""
    op_id = hashlib.sha256(n.to_bytes(8, "big") + market).digest()
    return (op_id, market, n if lamport is None else lamport, b"raw-%d-" % n + market[:1])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[OpStore]:
    s = OpStore.open(tmp_path / STORE_FILENAME)
    yield s
    s.close()


def test_round_trip(store: OpStore) -> None:
    items = [op(n) for n in range(1, 11)] + [op(n, M2) for n in range(1, 4)]
    assert store.add_ops(items) == 13
    assert list(store.load_market(M1)) == [raw for (_, _, _, raw) in items[:10]]
    assert list(store.load_market(M2)) == [raw for (_, _, _, raw) in items[10:]]
    assert store.count(M1) == 10
    assert store.count(M2) == 3
    assert store.count(b"nope") == 0
    assert list(store.load_market(b"nope")) == []
    assert store.has(items[0][0])
    assert not store.has(b"\x00" * 32)


def test_idempotent_insert(store: OpStore) -> None:
    items = [op(n) for n in range(5)]
    assert store.add_ops(items) == 5
    assert store.add_ops(items) == 0
    assert store.add_ops([*items[3:], op(5), op(6)]) == 2
    assert store.add_ops([op(7), op(7)]) == 1  # duplicates inside one batch
    assert store.count(M1) == 8
    assert store.add_ops([]) == 0
    assert store.add_ops(iter([op(8)])) == 1  # any iterable


@pytest.mark.parametrize("chunk", [3, 4096])
def test_ordering_lamport_then_id(
    store: OpStore, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    # A tiny chunk size makes load_market paginate through lamport ties.
    monkeypatch.setattr(store_module, "LOAD_CHUNK_ROWS", chunk)
    rng = random.Random(7)
    items = [op(n, lamport=rng.randrange(5)) for n in range(40)]
    shuffled = items[:]
    rng.shuffle(shuffled)
    for i in range(0, 40, 7):  # several batches, out of order
        store.add_ops(shuffled[i : i + 7])
    store.add_ops([op(n, M2, lamport=0) for n in range(10)])  # another market, interleaved keys
    expected = [raw for (_, _, _, raw) in sorted(items, key=lambda it: (it[2], it[0]))]
    assert list(store.load_market(M1)) == expected


def test_load_market_streams_and_allows_writes(
    store: OpStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "LOAD_CHUNK_ROWS", 2)
    store.add_ops([op(n) for n in range(1, 6)])
    seen = []
    for raw in store.load_market(M1):
        seen.append(raw)
        if len(seen) == 1:
            # Writing while a load is in progress must not deadlock; a later op shows up.
            store.add_ops([op(100)])
    assert seen == [op(n)[3] for n in [1, 2, 3, 4, 5, 100]]


def test_reopen_after_close(tmp_path: Path) -> None:
    with OpStore.open(tmp_path) as s:  # a directory means <dir>/store.sqlite3
        assert s.path == tmp_path / STORE_FILENAME
        s.add_ops([op(n) for n in range(3)])
        assert s.add_market(M1, "BTC-USD", "0.01", "0.0001")
        assert not s.add_market(M1, "BTC-USD", "0.01", "0.0001")
        s.set_meta("peer_key", b"k1")
        s.set_meta("peer_key", b"k2")
    s.close()  # idempotent
    with OpStore.open(tmp_path / STORE_FILENAME) as s:
        assert s.count(M1) == 3
        assert s.markets() == [MarketRecord(M1, "BTC-USD", "0.01", "0.0001")]
        assert s.get_meta("peer_key") == b"k2"
        assert s.get_meta("missing") is None
        assert s.schema_version() == SCHEMA_VERSION
        assert s.integrity_check() == "ok"
        db = s._db()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with OpStore.open(tmp_path, synchronous="NORMAL") as s:
        assert s._db().execute("PRAGMA synchronous").fetchone()[0] == 1


def test_closed_store_raises(tmp_path: Path) -> None:
    s = OpStore.open(tmp_path)
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.count(M1)


def test_refuses_newer_schema(tmp_path: Path) -> None:
    OpStore.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / STORE_FILENAME)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        OpStore.open(tmp_path)


def test_refuses_garbage_file(tmp_path: Path) -> None:
    (tmp_path / STORE_FILENAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot use"):
        OpStore.open(tmp_path)


def test_batch_is_atomic(store: OpStore) -> None:
    store.add_ops([op(1)])
    with pytest.raises(TypeError):
        store.add_ops([op(2), ("id", M1, 3, b"raw")])  # type: ignore[list-item]
    with pytest.raises(OverflowError):  # fails inside SQLite, after op(3) was inserted
        store.add_ops([op(3), op(4, lamport=2**70)])
    assert store.count(M1) == 1
    assert store.add_ops([op(3)]) == 1  # the store is still usable


async def test_worker_threads_share_the_store(store: OpStore) -> None:
    """The node's pattern: batched writes via trio.to_thread, reads inline, concurrently."""

    async def writer(base: int) -> None:
        for i in range(20):
            batch = [op(base + i * 10 + j) for j in range(10)]
            await trio.to_thread.run_sync(store.add_ops, batch)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for w in range(4):
                nursery.start_soon(writer, w * 1000)
            for _ in range(20):
                store.count(M1)
                await trio.sleep(0)
    assert store.count(M1) == 800
    assert len(list(store.load_market(M1))) == 800


# -- crash safety -------------------------------------------------------------------------------

# The child opens the store, then commits batches forever, printing each batch number on stdout
# only after add_ops returned: a printed number is an acknowledged batch.
CHILD = r"""
import hashlib, sys
from crdtbook.node.store import OpStore

path, rnd, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
market = b"round-%d" % rnd
store = OpStore.open(path)
# Checkpoint often so that kills also land inside WAL checkpoints.
store._db().execute("PRAGMA wal_autocheckpoint = 8")
print("open", flush=True)
b = 0
while True:
    items = []
    for i in range(size):
        n = b * size + i
        h = hashlib.sha256(b"%d-%d" % (rnd, n)).digest()
        items.append((h, market, n, h * 6))
    store.add_ops(items)
    print(b, flush=True)
    b += 1
"""


def _op_id(rnd: int, n: int) -> bytes:
    return hashlib.sha256(b"%d-%d" % (rnd, n)).digest()


def _run_child_and_kill(path: Path, rnd: int, size: int, rng: random.Random) -> int:
    """Run the child, SIGKILL it at a random moment; return the number of acked batches."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(rnd), str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines: list[bytes] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: lines.extend(stdout), daemon=True)
    reader.start()
    try:
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.0, 0.3))  # possibly while starting up / creating the schema
        else:
            want = rng.randrange(1, 40)
            deadline = time.monotonic() + 10
            while sum(1 for ln in lines if ln.strip().isdigit()) < want:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
                assert time.monotonic() < deadline, "child too slow"
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.01))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        reader.join(timeout=10)
        if proc.stderr:
            proc.stderr.close()
        stdout.close()
    assert proc.returncode == -signal.SIGKILL
    acked = [int(ln) for ln in lines if ln.strip().isdigit()]
    assert acked == list(range(len(acked)))
    return len(acked)


def test_sigkill_loses_no_acknowledged_op(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    path = tmp_path / STORE_FILENAME
    sizes = [1, 50, 500, 1, 50, 500]
    acked: dict[int, int] = {}
    for rnd, size in enumerate(sizes):
        acked[rnd] = _run_child_and_kill(path, rnd, size, rng)
        # Reopen after every kill: the store must open and hold every acknowledged op.
        with OpStore.open(path) as s:
            assert s.integrity_check() == "ok", f"seed={seed}"
            for r in range(rnd + 1):
                size_r = sizes[r]
                stored = s.count(b"round-%d" % r)
                # Batches are atomic, and at most one committed batch may be unacknowledged.
                assert stored % size_r == 0, f"seed={seed} round={r}: partial batch"
                assert acked[r] * size_r <= stored <= (acked[r] + 1) * size_r, f"seed={seed}"
                for n in range(acked[r] * size_r):
                    assert s.has(_op_id(r, n)), f"seed={seed} round={r}: lost acked op {n}"
    # An independent check with a fresh plain connection.
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    assert sum(acked.values()) > 0, f"seed={seed}: no batch was ever acknowledged"


# -- checkpoints --------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILENAME
    with OpStore.open(path) as s:
        assert s.get_checkpoint(M1) is None
        s.set_checkpoint(M1, 10, b"first")
        s.set_checkpoint(M2, 3, b"other market")
        assert s.get_checkpoint(M1) == b"first"
        s.set_checkpoint(M1, 5, b"second")  # replaces, whatever it covers
        assert s.get_checkpoint(M1) == b"second"
        with pytest.raises(TypeError):
            s.set_checkpoint(M1, 1, "text")  # type: ignore[arg-type]
        assert s.get_checkpoint(M1) == b"second"
    with OpStore.open(path) as s:
        assert s.get_checkpoint(M1) == b"second"
        assert s.get_checkpoint(M2) == b"other market"
        s.delete_checkpoint(M1)
        assert s.get_checkpoint(M1) is None
        assert s.get_checkpoint(M2) == b"other market"


# The child replaces one market's checkpoint forever with big blobs (so that kills land inside
# writes), printing each blob's number after set_checkpoint returned.
CHECKPOINT_CHILD = r"""
import hashlib, sys
from crdtbook.node.store import OpStore

store = OpStore.open(sys.argv[1])
store._db().execute("PRAGMA wal_autocheckpoint = 8")
k = int(sys.argv[2])
print("open", flush=True)
while True:
    blob = (k.to_bytes(8, "big") + hashlib.sha256(b"%d" % k).digest()) * 20_000
    store.set_checkpoint(b"M" * 32, k, blob)
    print(k, flush=True)
    k += 1
"""


def _blob(k: int) -> bytes:
    return (k.to_bytes(8, "big") + hashlib.sha256(b"%d" % k).digest()) * 20_000


def _kill_child_after_some_acks(
    child: str, path: Path, start: int, rng: random.Random, seed: int
) -> list[int]:
    """Run ``child`` (a script that writes to the store at ``path`` and prints one number per
    durable write), SIGKILL it at a random moment after 1-5 acknowledged writes, and return
    the numbers it acknowledged."""
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(path), str(start)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: list[bytes] = []
    reader = threading.Thread(target=lines.extend, args=(stdout,), daemon=True)
    reader.start()
    deadline = time.monotonic() + 20
    want = rng.randrange(1, 6)
    while sum(1 for ln in lines if ln.strip().isdigit()) < want:
        assert proc.poll() is None and time.monotonic() < deadline, f"seed={seed}"
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.02))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    reader.join(timeout=10)
    stdout.close()
    return [int(ln) for ln in lines if ln.strip().isdigit()]


def test_sigkill_during_checkpoint_writes_leaves_the_old_or_the_new(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    path = tmp_path / STORE_FILENAME
    start = 0
    for _ in range(4):
        acked = _kill_child_after_some_acks(CHECKPOINT_CHILD, path, start, rng, seed)
        with OpStore.open(path) as s:
            assert s.integrity_check() == "ok", f"seed={seed}"
            stored = s.get_checkpoint(b"M" * 32)
        assert stored is not None, f"seed={seed}"
        k = int.from_bytes(stored[:8], "big")
        assert k in (acked[-1], acked[-1] + 1), f"seed={seed}"  # the last acked or the next
        assert stored == _blob(k), f"seed={seed}: a torn checkpoint"
        start = k + 1


# -- compaction (issue #10) -------------------------------------------------------------------


def _fill(n: int) -> CompactedFill:
    a, b = hashlib.sha256(b"t%d" % n).digest(), hashlib.sha256(b"m%d" % n).digest()
    return CompactedFill(n, Fill(a, b, 100 + n, 1 + n, "buy", b"A" * 32, b"B" * 32), 7, None)


def _order(n: int, tag: str | None = None) -> CompactedOrder:
    state = OrderState(
        hashlib.sha256(b"o%d" % n).digest(), b"A" * 32, "sell", 5, 10, 0, 10, 0, "filled",
        None, "gtc", tag, n, True,
    )  # fmt: skip
    return CompactedOrder(state, 1_000 + n, 2_000 + n)


def test_compact_marks_keeps_history_and_snapshot(store: OpStore) -> None:
    items = [op(n) for n in range(1, 21)] + [op(n, M2) for n in range(1, 4)]
    store.add_ops(items)
    gone = [item[0] for item in items[:12]]
    fills = [_fill(n) for n in range(5)]
    orders = [_order(1, "c-1"), _order(2)]
    store.compact(M1, gone, fills, orders, Snapshot(12, 5, b"snap-1"))
    # Nothing is deleted; the live load skips the marked ops, in order.
    assert store.count(M1) == 20 and store.compacted_count(M1) == 12
    assert list(store.load_market(M1)) == [item[3] for item in items[:20]]
    assert list(store.load_market(M1, live_only=True)) == [item[3] for item in items[12:20]]
    assert list(store.load_market(M2, live_only=True)) == [item[3] for item in items[20:]]
    assert store.get_snapshot(M1) == Snapshot(12, 5, b"snap-1")
    assert store.get_snapshot(M2) is None
    assert store.compacted_fills(M1, 0, 100) == fills
    assert store.compacted_fills(M1, 2, 4) == fills[2:4]
    assert store.compacted_fills(M2, 0, 100) == []
    assert store.compacted_order(M1, orders[0].order.id) == orders[0]
    assert store.compacted_order(M2, orders[0].order.id) is None
    assert store.compacted_order_by_tag(M1, b"A" * 32, "c-1") == orders[0]
    assert store.compacted_order_by_tag(M1, b"B" * 32, "c-1") is None
    hex_id = orders[1].order.id.hex()
    assert store.compacted_orders_with_prefix(M1, hex_id[:5], 10) == [orders[1]]
    assert store.compacted_orders_with_prefix(M1, "", 10) != []
    # The archive's lookup: any stored op of the market, compacted or not.
    assert store.get_raw(M1, items[0][0]) == items[0][3]
    assert store.get_raw(M2, items[0][0]) is None
    assert store.get_raw(M1, items[0][0], compacted=True) == items[0][3]
    assert store.get_raw(M1, items[15][0]) == items[15][3]
    assert store.get_raw(M1, items[15][0], compacted=True) is None
    # A second compaction replaces the snapshot; rewriting earlier rows is harmless.
    store.compact(M1, [*gone, items[12][0]], fills[:1], [], Snapshot(13, 5, b"snap-2"))
    assert store.get_snapshot(M1) == Snapshot(13, 5, b"snap-2")
    assert list(store.load_market(M1, live_only=True)) == [item[3] for item in items[13:20]]


def test_compaction_is_atomic(store: OpStore) -> None:
    items = [op(n) for n in range(1, 11)]
    store.add_ops(items)
    store.compact(M1, [items[0][0]], [], [], Snapshot(1, 0, b"old"))
    too_big = CompactedFill(9, _fill(9).fill._replace(price=2**70))  # SQLite refuses it
    with pytest.raises(OverflowError):
        ids = [i[0] for i in items[:5]]
        store.compact(M1, ids, [_fill(8), too_big], [], Snapshot(5, 0, b"new"))
    assert store.get_snapshot(M1) == Snapshot(1, 0, b"old")
    assert store.compacted_count(M1) == 1
    assert store.compacted_fills(M1, 0, 100) == []


def test_migrates_a_version_1_store(tmp_path: Path) -> None:
    path = tmp_path / STORE_FILENAME
    conn = sqlite3.connect(path, isolation_level=None)
    store_module._migrate_0_to_1(conn)
    conn.execute("PRAGMA user_version = 1")
    items = [op(n) for n in range(1, 6)]
    conn.executemany("INSERT INTO ops (id, market, lamport, raw) VALUES (?, ?, ?, ?)", items)
    conn.close()
    with OpStore.open(path) as s:
        assert s.schema_version() == SCHEMA_VERSION == 5
        assert list(s.load_market(M1, live_only=True)) == [item[3] for item in items]
        assert s.compacted_count(M1) == 0 and s.get_snapshot(M1) is None


def test_migrates_a_version_2_store(tmp_path: Path) -> None:
    """Version 3 adds the prefix's final order, points and joins; version 2's rows stay as
    they were (compacted marks, snapshots) and have no final index."""
    path = tmp_path / STORE_FILENAME
    conn = sqlite3.connect(path, isolation_level=None)
    store_module._migrate_0_to_1(conn)
    store_module._migrate_1_to_2(conn)
    conn.execute("PRAGMA user_version = 2")
    items = [op(n) for n in range(1, 6)]
    conn.executemany("INSERT INTO ops (id, market, lamport, raw) VALUES (?, ?, ?, ?)", items)
    conn.execute("UPDATE ops SET compacted = 1 WHERE lamport <= 2")
    conn.close()
    with OpStore.open(path) as s:
        assert s.schema_version() == SCHEMA_VERSION == 5
        assert list(s.load_market(M1, live_only=True)) == [item[3] for item in items[2:]]
        assert s.compacted_count(M1) == 2
        assert s.history(M1, 0, 10) == [] and s.points(M1) == [] and s.join_state(M1) is None


def test_migrates_a_version_3_store_and_lists_its_compacted_orders(tmp_path: Path) -> None:
    """Version 4 indexes compacted orders for ``orders``; version 3's rows are listed."""
    path = tmp_path / STORE_FILENAME
    conn = sqlite3.connect(path, isolation_level=None)
    for step in (store_module._migrate_0_to_1, store_module._migrate_1_to_2,
                 store_module._migrate_2_to_3):
        step(conn)
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    with OpStore.open(path, synchronous="NORMAL") as s:
        s.compact(M1, [], [], [_order(n) for n in (3, 1, 2)], Snapshot(0, 0, b"v3"))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA user_version = 3")  # as a version-3 node left it: no new indexes
    conn.execute("DROP INDEX compacted_orders_author")
    conn.execute("DROP INDEX compacted_orders_lamport")
    conn.execute("ALTER TABLE joins DROP COLUMN derived")  # version 5's
    conn.close()
    with OpStore.open(path) as s:
        assert s.schema_version() == SCHEMA_VERSION == 5
        # Oldest first by Lamport time (``_order(n)`` has Lamport n), the newest ``limit``.
        assert s.compacted_orders_newest(M1, None, 10) == [_order(n) for n in (1, 2, 3)]
        assert s.compacted_orders_newest(M1, b"A" * 32, 2) == [_order(2), _order(3)]
        assert s.compacted_orders_newest(M1, b"B" * 32, 10) == []
        assert s.compacted_orders_newest(M2, None, 10) == []
        plan = " ".join(
            str(row) for row in s._db().execute(
                "EXPLAIN QUERY PLAN SELECT id FROM compacted_orders WHERE market = ? AND"
                " author = ? ORDER BY lamport DESC, id DESC LIMIT 5", (M1, b"A" * 32)
            )
        )
        assert "compacted_orders_author" in plan


def test_compaction_records_the_prefix_order_and_points(store: OpStore) -> None:
    """Each compaction at a point gives its prefix ops their final indexes (served in order by
    ``history``, in bounded chunks, stopping at a gap) and keeps the latest two point blobs."""
    items = [op(n) for n in range(1, 31)]
    store.add_ops(items)
    ids = [item[0] for item in items]
    # Total order differs from storage order: the prefix is what the replica says.
    order = ids[:10][::-1]
    store.compact(M1, order[:5], [], [], Snapshot(5, 0, b"p10"), point=10, order=order)
    assert store.history(M1, 0, 100) == [items[9 - i][3] for i in range(10)]
    assert store.history(M1, 3, 4) == [items[9 - i][3] for i in range(3, 7)]
    assert store.history(M1, 10, 100) == []
    assert store.points(M1) == [(10, b"p10")]
    store.compact(
        M1,
        ids[10:15],
        [],
        [],
        Snapshot(15, 0, b"p20"),
        point=20,
        order_start=10,
        order=ids[10:20],
    )
    store.compact(
        M1,
        ids[20:25],
        [],
        [],
        Snapshot(25, 0, b"p30"),
        point=30,
        order_start=20,
        order=ids[20:30],
    )
    assert store.points(M1) == [(30, b"p30"), (20, b"p20")]  # the latest two
    assert store.history(M1, 8, 4) == [items[1][3], items[0][3], items[10][3], items[11][3]]
    assert len(store.history(M1, 0, 1000)) == 30
    assert store.get_raws(M1, [ids[3], b"x" * 32, ids[0]]) == [items[3][3], items[0][3]]
    assert store.history(M2, 0, 10) == []


def test_joined_history_is_staged_until_checked(store: OpStore) -> None:
    """A joined node's kept ops are live; fetched history is staged (not live, not in the
    archive, not served) until it checks, then archived; dropped if it does not check."""
    items = [op(n) for n in range(1, 21)]
    kept = items[15:20]
    store.save_join(M1, kept, Snapshot(15, 3, b"blob-15"), 15)
    assert store.join_state(M1) == (15, b"blob-15", 0, 0)
    assert store.get_snapshot(M1) == Snapshot(15, 3, b"blob-15")
    assert store.points(M1) == [(15, b"blob-15")]
    assert list(store.load_market(M1, live_only=True)) == [item[3] for item in kept]
    prefix = items[:15]  # the kept op 16 lies outside the prefix: not part of history here
    # A fetch that does not check: dropped, nothing of it stays.
    store.add_history(M1, 0, prefix[:8])
    assert store.get_raw(M1, prefix[0][0], compacted=True) is None
    assert list(store.load_market(M1, live_only=True)) == [item[3] for item in kept]
    assert store.history(M1, 0, 100) == []  # staged: not served
    assert store.history(M1, 0, 100, staged=True) == [item[3] for item in prefix[:8]]
    assert store.drop_history(M1, 15) == 8
    assert store.count(M1) == 5 and store.history(M1, 0, 100, staged=True) == []
    # One that checks: archived (prefix ops sync brought meanwhile too) and served; a kept op
    # of the prefix stays live.
    store.add_history(M1, 0, prefix[:8])
    store.add_ops([prefix[3]])  # the replica holds it now: live
    store.add_history(M1, 8, prefix[8:])
    assert store.finish_history(M1, 15, [prefix[5][0]]) == 15  # a kept op of the prefix: live
    assert store.join_state(M1) == (15, b"blob-15", 15, 0)
    assert store.get_raw(M1, prefix[0][0], compacted=True) == prefix[0][3]
    assert store.get_raw(M1, prefix[3][0], compacted=True) == prefix[3][3]  # a prefix op
    assert store.get_raw(M1, prefix[5][0], compacted=True) is None
    assert store.history(M1, 0, 100) == [item[3] for item in prefix]
    live = [item[3] for item in sorted([prefix[5], *kept], key=lambda i: i[2])]
    assert list(store.load_market(M1, live_only=True)) == live


COMPACT_CHILD = """
import sys
from crdtbook.node.store import OpStore, Snapshot
store = OpStore.open(sys.argv[1], synchronous="NORMAL")
market = b"M" * 32
k = int(sys.argv[2])
print("open", flush=True)
while True:
    # Round k: 200 ops, then ops of round k compacted with snapshot k (rows of earlier rounds
    # are rewritten too, to make each transaction long).
    store.add_ops([(b"%08d-%04d" % (k, i), market, k, b"raw") for i in range(200)])
    ids = [b"%08d-%04d" % (r, i) for r in range(max(0, k - 20), k + 1) for i in range(200)]
    store.compact(market, ids, [], [], Snapshot(k, 0, b"%d" % k * 5_000))
    print(k, flush=True)
    k += 1
"""


def test_sigkill_during_compaction_leaves_the_old_or_the_new(tmp_path: Path) -> None:
    """The snapshot and its marks commit together: after a kill -9, the ops marked compacted are
    exactly those of the rounds up to the stored snapshot's, and every other op is live."""
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    path = tmp_path / STORE_FILENAME
    market = b"M" * 32
    start = 0
    for _ in range(4):
        acked = _kill_child_after_some_acks(COMPACT_CHILD, path, start, rng, seed)
        with OpStore.open(path) as s:
            assert s.integrity_check() == "ok", f"seed={seed}"
            snap = s.get_snapshot(market)
            assert snap is not None, f"seed={seed}"
            k = snap.ops
            assert k in (acked[-1], acked[-1] + 1), f"seed={seed}"
            assert snap.data == b"%d" % k * 5_000, f"seed={seed}: a torn snapshot"
            assert s.compacted_count(market) == 200 * (k + 1), f"seed={seed}"
            live = s.count(market) - s.compacted_count(market)
            assert live in (0, 200), f"seed={seed}"  # at most the next round's ops, unmarked
            assert len(list(s.load_market(market, live_only=True))) == live
        start = k + 1


@pytest.mark.parametrize("background", [False, True], ids=["stock", "background"])
def test_wal_checkpoints_leave_the_commits_in_background_mode(
    tmp_path: Path, background: bool
) -> None:
    """Stock SQLite copies the WAL back into the database in the commit that takes it past
    1,000 pages (with an fsync: milliseconds on the node's event loop). With
    ``checkpoints_in_background`` no commit does: the WAL holds every commit until
    ``checkpoint_wal`` (run from a worker thread) copies it all, from a connection of its own
    while commits go on; nothing is lost, across a reopen too."""
    s = OpStore.open(tmp_path, synchronous="NORMAL")
    if background:
        s.checkpoints_in_background()
    for i in range(1500):  # single-op commits: several WAL pages each
        s.add_ops([op(i)])
    frames, copied = s.checkpoint_wal()
    if background:
        assert frames > 1000 and copied == frames  # no commit checkpointed; this call did it all
    else:
        assert frames < 1000  # the commits checkpointed as they went

    done = threading.Event()

    def checkpoints() -> None:
        while not done.is_set():
            s.checkpoint_wal()

    worker = threading.Thread(target=checkpoints)
    worker.start()
    try:
        for i in range(1500, 2000):  # commits while another connection checkpoints
            s.add_ops([op(i)])
    finally:
        done.set()
        worker.join()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.checkpoint_wal()
    reopened = OpStore.open(tmp_path, synchronous="NORMAL")
    try:
        assert reopened.count(M1) == 2000
    finally:
        reopened.close()


def test_migrates_a_version_4_store_with_a_join_and_records_its_derived_past(
    tmp_path: Path,
) -> None:
    """Version 5 records whether a joined market's past is derived (node.derive): a version 4
    join is not; ``save_derived`` stores the rows (keeping any already there) and, last, done."""
    path = tmp_path / STORE_FILENAME
    conn = sqlite3.connect(path, isolation_level=None)
    for step in store_module._MIGRATIONS[:4]:
        step(conn)
    conn.execute("PRAGMA user_version = 4")
    conn.execute("INSERT INTO joins (market, n, data, history) VALUES (?, 80, x'00', 80)", (M1,))
    conn.close()
    with OpStore.open(path, synchronous="NORMAL") as s:
        assert s.schema_version() == SCHEMA_VERSION == 5
        assert s.join_state(M1) == (80, b"\x00", 80, 0) and s.join_state(M2) is None
        s.compact(M1, [], [_fill(3)], [], Snapshot(0, 4, b"v4"))  # a compaction's own row
        derived = [CompactedFill(n, _fill(n).fill) for n in range(4)]
        s.save_derived(M1, derived, [CompactedOrder(_order(1).order)])
        assert s.join_state(M1).derived == 0  # type: ignore[union-attr]
        s.save_derived(M1, [], [], done=80)
        assert s.join_state(M1).derived == 80  # type: ignore[union-attr]
        assert s.compacted_fills(M1, 0, 10) == [*derived[:3], _fill(3)]
        assert s.compacted_orders_newest(M1, None, 10) == [CompactedOrder(_order(1).order)]
