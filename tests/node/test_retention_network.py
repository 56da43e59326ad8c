"""``crdtbook node --retention`` across real node processes on loopback (issue #10).

A witness node run from the command line with ``--retention`` (and the hidden small
``--point-interval``) trades a witnessed market past several points: its store drops the
archived ops, ``status`` says so, ``order`` still answers for an order whose op was pruned, a
restart comes back from its snapshot without the history, and a node joining from its snapshot
reaches its digest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from crdtbook import Market
from crdtbook.node.procs import LOOPBACK, NodeProcess, make_identity, stop_all, wait_until
from crdtbook.node.store import OpStore

pytestmark = pytest.mark.timeout(180)

#: Final ops between points, and archived ops kept below the latest: a few hundred orders
#: make several points and prune most of the history.
INTERVAL = 40
KEEP = 40


def test_a_node_with_retention_prunes_restarts_and_serves_snapshots(tmp_path: Path) -> None:
    key = make_identity(tmp_path / "w")
    spec = f"RT:1:1:{key.hex()}"
    command = [
        sys.executable, "-m", "crdtbook.cli.app", "node", "--home", str(tmp_path / "w"),
        "--listen", LOOPBACK, "--market", spec, "-v", "--heartbeat-interval", "0.02",
        "--point-interval", str(INTERVAL), "--retention", str(KEEP),
    ]  # fmt: skip
    nodes: list[NodeProcess] = []
    try:
        w = NodeProcess(tmp_path / "w", market=spec, command=command).start()
        nodes.append(w)
        first = None
        for i in range(400):
            side = "buy" if i % 2 else "sell"
            price = str(100 + (i * 7) % 5 - 2)
            answer = w.call("submit", market="RT", side=side, price=price, quantity="1")
            first = first or answer["order"]["id"]
        assert first is not None
        wait_until(
            lambda: w.market_status(digest=False)["pruned_ops"] >= 4 * INTERVAL,
            30,
            "the witness to compact and prune at several points",
        )
        status = w.market_status(digest=False)
        assert status["retention"] == KEEP and status["history"] == "absent", w.log()
        assert "retention pruned" in w.log()
        # The first order's op is pruned; the order (finished, compacted) still answers.
        order = w.call("order", order_id=first)
        assert order["id"] == first and order["status"] != "open"
        # A restart: the same state (and the heartbeats it signs then), without the history.
        w.stop()
        with OpStore.open(tmp_path / "w") as store:
            market = Market.parse(spec).id
            assert store.count(market) <= status["ops"] - status["pruned_ops"] + 1
            assert store.get_raw(market, bytes.fromhex(first)) is None
        w.start()
        after = w.market_status(digest=False)
        assert after["ops"] >= status["ops"] and after["fills"] == status["fills"], w.log()
        assert after["compacted_ops"] >= status["compacted_ops"]
        assert after["history"] == "absent" and after["pruned_ops"] >= status["pruned_ops"]
        assert "snapshot of" in w.log()  # restored from its snapshot, not the pruned log
        # It serves snapshots: a node joining from it reaches its digest.
        config = {"point_interval": INTERVAL, "heartbeat_interval": 0.02, "join_peer_wait": 20.0}
        s = NodeProcess(tmp_path / "s", [w.addr], market=spec, config=config).start()
        nodes.append(s)
        wait_until(lambda: s.digest() == w.digest(), 60, "the joiner to reach the digest")
        assert s.market_status(digest=False)["join"] == "snapshot", s.log()
    finally:
        stop_all(nodes)
