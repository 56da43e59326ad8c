"""Real nodes on loopback: convergence, late join, kill -9, partition. Each test is bounded."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from .harness import NodeProcess, converged, node_group, shared_fills, wait_until

pytestmark = pytest.mark.timeout(150)


def _submit_all_at_once(calls: list[tuple[NodeProcess, dict[str, str]]]) -> list[object]:
    """Fire the submits from threads released together, as traders at different nodes would."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(i: int, node: NodeProcess, params: dict[str, str]) -> None:
        barrier.wait()
        results[i] = node.call("submit", **params)

    threads = [threading.Thread(target=run, args=(i, n, p)) for i, (n, p) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_three_nodes_cross_at_once_and_agree(tmp_path: Path) -> None:
    with node_group(tmp_path) as start:
        n1 = start("n1")
        n2 = start("n2", [n1.addr])
        n3 = start("n3", [n1.addr])  # knows only n1: finds n2 through the DHT
        nodes = [n1, n2, n3]
        wait_until(lambda: all(n.peers() >= 2 for n in nodes), 30, "full mesh via discovery")

        results = _submit_all_at_once(
            [
                (n1, {"side": "sell", "quantity": "5", "price": "100"}),
                (n2, {"side": "buy", "quantity": "5", "price": "100"}),
                (n3, {"side": "buy", "quantity": "3", "price": "101"}),
            ]
        )
        assert all(isinstance(r, dict) and "order" in r for r in results)
        wait_until(lambda: converged(nodes), 20, "equal digests on all nodes")

        books = [n.call("book") for n in nodes]
        fills = [shared_fills(n) for n in nodes]
        assert all(b == books[0] for b in books)
        assert all(f == fills[0] for f in fills)
        # 5 to sell against 8 to buy: exactly 5 trade, once, wherever they were matched.
        assert sum(f["quantity_lots"] for f in fills[0]) == 5
        assert len({(f["taker"], f["maker"]) for f in fills[0]}) == len(fills[0])
        assert books[0]["asks"] == []
        assert sum(lv["quantity_lots"] for lv in books[0]["bids"]) == 3


def test_late_joiner_catches_up(tmp_path: Path) -> None:
    with node_group(tmp_path) as start:
        n1 = start("n1")
        n2 = start("n2", [n1.addr])
        wait_until(lambda: n1.peers() >= 1, 20, "n1 and n2 connected")
        # status names each peer with the addresses this node knows for it
        (peer,) = n2.call("status")["peers"]
        assert peer["peer_id"] == n1.peer_id
        assert any(addr.startswith("/ip4/127.0.0.1/tcp/") for addr in peer["addrs"])
        for i in range(60):
            node = n1 if i % 2 else n2
            side = "buy" if i % 3 else "sell"
            node.call("submit", side=side, quantity=str(1 + i % 4), price=str(95 + i % 11))
        wait_until(lambda: converged([n1, n2]), 20, "n1 and n2 agree")
        n3 = start("n3", [n2.addr])
        wait_until(lambda: converged([n1, n2, n3]), 30, "the late joiner agrees")
        assert n3.market_status()["ops"] == 60


def test_kill9_keeps_acknowledged_ops_and_converges(tmp_path: Path) -> None:
    with node_group(tmp_path) as start:
        n1 = start("n1")
        n2 = start("n2", [n1.addr])
        wait_until(lambda: n1.peers() >= 1, 20, "connected")
        acked = []
        for i in range(25):
            result = n2.call("submit", side="buy", quantity="1", price=str(90 + i % 5))
            acked.append(result["order"]["id"])
        n2.kill9()  # straight after the last acknowledgement
        for i in range(10):
            n1.call("submit", side="sell", quantity="2", price=str(92 + i % 3))
        n2b = NodeProcess(n2.home, [n1.addr]).start()
        try:
            for order_id in acked:
                assert n2b.call("order", order_id=order_id)["id"] == order_id
            wait_until(lambda: converged([n1, n2b]), 30, "restarted node converges")
            assert n2b.market_status()["ops"] == 35
        finally:
            n2b.stop()


def test_partitioned_node_converges_after_heal(tmp_path: Path) -> None:
    with node_group(tmp_path) as start:
        n1 = start("n1")
        n2 = start("n2", [n1.addr])
        n3 = start("n3", [n1.addr])
        nodes = [n1, n2, n3]
        wait_until(lambda: all(n.peers() >= 2 for n in nodes), 30, "full mesh")
        blocked = n3.call("block", seconds=6)
        assert len(blocked["blocked"]) == 2
        # Both sides trade while cut off from each other.
        for i in range(10):
            n1.call("submit", side="sell", quantity="1", price=str(100 + i % 3))
            n3.call("submit", side="buy", quantity="1", price=str(101 - i % 3))
        assert n3.market_status()["ops"] == 10
        wait_until(lambda: converged(nodes), 45, "convergence after the partition heals")
        assert n1.market_status()["ops"] == 20


def test_second_node_on_the_same_home_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    with node_group(tmp_path) as start:
        n1 = start("n1")
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "crdtbook.cli.app",
                "node",
                "--home",
                str(n1.home),
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--market",
                "DEMO:1:1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert "another crdtbook node" in second.stderr
        assert "Traceback" not in second.stderr
        assert n1.market_status()["ops"] == 0  # the first node is untouched
