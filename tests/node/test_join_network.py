"""Joins from a snapshot across real node processes on loopback (issue #10).

A witness node trades a witnessed market past several points (a small point interval). Then one
node joins it from a snapshot (``--join snapshot``, the default) and another from the full log
(``join: full``); both end with the witness's digest, the snapshot joiner having stored only
the point's kept ops and what followed, not the history.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from crdtbook import Market
from crdtbook.node.procs import NodeProcess, start_peer, start_witness, stop_all, wait_until

pytestmark = pytest.mark.timeout(180)

#: Final ops between points: a few hundred orders make several.
INTERVAL = 40
#: Gossipsub keeps a node's recent messages for 5 heartbeats of 1 s (py-libp2p's gossip_history)
#: and offers them (IHAVE) to peers outside its mesh: a joiner that subscribes sooner than that
#: after the orders were gossiped asks for them (IWANT) and stores them as it validates them,
#: which is the whole history here (it holds them as possible copies of prefix ops; they are
#: marked compacted at its next point). The joiners start after that window.
GOSSIP_HISTORY_S = 6.0
#: Every node's: points every INTERVAL final ops, heartbeats often, joiners wait for offers.
CONFIG = {"point_interval": INTERVAL, "heartbeat_interval": 0.02, "join_peer_wait": 20.0}


def test_one_node_joins_from_a_snapshot_and_another_from_the_full_log(tmp_path: Path) -> None:
    config = CONFIG
    nodes: list[NodeProcess] = []
    try:
        spec, w = start_witness(tmp_path / "w", "JN", config, nodes)
        for i in range(2600):  # past the kept set (the newest 2,048 final ops and more)
            side = "buy" if i % 2 else "sell"
            price = str(100 + (i * 7) % 5 - 2)
            w.call("submit", market="JN", side=side, price=price, quantity="1")
        wait_until(
            lambda: w.market_status(digest=False)["compacted_ops"] >= 4 * INTERVAL,
            30,
            "the witness to compact at several points",
        )
        time.sleep(GOSSIP_HISTORY_S)  # see GOSSIP_HISTORY_S
        # No background fetch here: the history stays absent (checked below).
        snap = NodeProcess(
            tmp_path / "s", [w.addr], market=spec, config={**config, "history_backfill": None}
        ).start()
        nodes.append(snap)
        full = NodeProcess(
            tmp_path / "f", [w.addr], market=spec, config={**config, "join": "full"}
        ).start()
        nodes.append(full)

        def same() -> bool:
            digests = {n.market_status()["digest"] for n in nodes}
            return len(digests) == 1

        wait_until(same, 60, "both joiners to reach the witness's digest")
        status = snap.market_status(digest=False)
        assert status["join"] == "snapshot", snap.log()
        assert status["joined_from_point"] >= 4 * INTERVAL
        assert status["history"] == "absent"
        total = w.market_status(digest=False)["ops"]
        status = full.market_status(digest=False)
        assert (status["join"], status["joined_from_point"], status["history"]) == (
            None,
            None,
            "complete",
        )
        # The snapshot joiner stored the kept ops and what followed the point, not the history.
        snap.stop()
        from crdtbook.node.store import OpStore

        with OpStore.open(tmp_path / "s") as store:
            market = Market.parse(spec).id
            stored = store.count(market) - store.staged_count(market)
        assert stored < total, (stored, total)
        assert "joined from the point at" in snap.log()
        assert "ops; syncing the rest" in snap.log()  # its outcome on the output, not only at INFO
    finally:
        stop_all(nodes)


def test_a_joined_node_fetches_and_derives_the_past_in_the_background(tmp_path: Path) -> None:
    """A node joins from a snapshot, then fetches the history before the point in the
    background (``history_backfill``) and derives its fills and orders: ``fills`` and ``order``
    answer for the whole past, as at the witness."""
    config = CONFIG
    nodes: list[NodeProcess] = []
    try:
        spec, w = start_witness(tmp_path / "w", "JD", config, nodes)
        t = start_peer(tmp_path / "t", w, spec, config, nodes)
        for i in range(200):  # two keys, so that orders fill (one key's would not: self-trade)
            price = str(100 + (i * 7) % 5 - 2)
            t.call("submit", market="JD", side="sell", price=price, quantity="2")
            w.call("submit", market="JD", side="buy", price=price, quantity="1")
        wait_until(
            lambda: w.market_status(digest=False)["compacted_fills"] >= 2 * INTERVAL,
            30,
            "the witness to compact fills at several points",
        )
        time.sleep(GOSSIP_HISTORY_S)  # see GOSSIP_HISTORY_S
        j = NodeProcess(
            tmp_path / "j", [w.addr], market=spec, config={**config, "history_backfill": 1.0}
        ).start()
        nodes.append(j)
        try:
            wait_until(
                lambda: j.market_status(digest=False)["history_derived"] == "done",
                60,
                "the joiner to derive its past",
            )
        except AssertionError:
            raise AssertionError((j.market_status(digest=False), j.log()[-6000:])) from None
        status = j.market_status(digest=False)
        assert status["join"] == "snapshot" and status["history"] == "complete", j.log()
        fills_w = w.call("fills", market="JD", limit=100000)["fills"]
        fills_j = j.call("fills", market="JD", limit=100000)["fills"]
        assert len(fills_w) >= status["joined_from_point"] // 4
        key_of = ("taker", "maker", "price", "quantity", "final")
        assert [[f[k] for k in key_of] for f in fills_j] == [
            [f[k] for k in key_of] for f in fills_w
        ]
        fields = ("id", "status", "filled", "remaining", "final")
        first = w.call("order", market="JD", order_id=fills_w[0]["maker"])
        again = j.call("order", market="JD", order_id=fills_w[0]["maker"])
        assert [again[k] for k in fields] == [first[k] for k in fields], (first, again)
        assert "derived" in j.log() and "before the join point" in j.log()
    finally:
        stop_all(nodes)
