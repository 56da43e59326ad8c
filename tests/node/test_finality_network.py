"""Fill finality across real node processes on loopback (issue #8): three nodes, each a witness
of one witnessed market. Crossing orders at once become final on every node; a witness killed
with SIGKILL stalls finality (trading goes on) until it comes back, and once it is removed by a
reconfiguration, finality goes on without it.

Bounded: the whole file runs in well under the pytest timeout below (~30-40 s on 2 cores); every
wait is a poll with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from crdtbook.node.app import load_or_create_identity
from crdtbook.node.client import ControlError
from crdtbook.node.finality import STALL_SECONDS

from .harness import NodeProcess, shared_fills, wait_until

pytestmark = pytest.mark.timeout(120)

#: What a wait_final submit may take here (the heartbeat interval is 0.25 s; the rest is gossip).
FINAL_WITHIN = 10.0


def _status(node: NodeProcess) -> dict[str, Any]:
    return dict(node.call("status", digest=False)["markets"][0])


def _all_final(node: NodeProcess, fills: int) -> bool:
    """``fills`` fills, every one final, and nothing but heartbeats waiting."""
    result = node.call("fills")
    status = _status(node)
    return (
        len(result["fills"]) == fills
        and result["final_count"] == fills
        and all(f["final"] for f in result["fills"])
        and status["finality"] == "final"
        and status["final_fills"] == fills
    )


def _has_order(node: NodeProcess, order_id: str) -> bool:
    try:
        node.call("order", order_id=order_id)
    except ControlError:
        return False
    return True


def _stalled_on(node: NodeProcess, key: str) -> bool:
    status = _status(node)
    return status["finality"] == "stalled" and status["stalled_on"] == [key]


def _at_once(calls: list[tuple[NodeProcess, dict[str, Any]]]) -> list[tuple[Any, float]]:
    """Submit from threads released together; (result or exception, seconds) per call."""
    barrier = threading.Barrier(len(calls))
    out: list[tuple[Any, float]] = [(None, 0.0)] * len(calls)

    def run(i: int, node: NodeProcess, params: dict[str, Any]) -> None:
        barrier.wait()
        started = time.monotonic()
        try:
            result: Any = node.call("submit", **params)
        except Exception as exc:  # reported by the assertion below
            result = exc
        out[i] = (result, time.monotonic() - started)

    threads = [threading.Thread(target=run, args=(i, n, p)) for i, (n, p) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


@contextmanager
def _nodes() -> Iterator[list[NodeProcess]]:
    nodes: list[NodeProcess] = []
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def test_finality_across_three_real_nodes(tmp_path: Path) -> None:
    homes = [tmp_path / f"n{i}" for i in (1, 2, 3)]
    keys = []
    for home in homes:
        home.mkdir(mode=0o700)
        identity, _ = load_or_create_identity(home)
        keys.append(identity.public_key.hex())
    spec = "DEMO:1:1:" + ",".join(keys)
    dead_key = keys[2]
    figures: dict[str, float] = {}

    with _nodes() as running:
        n1 = NodeProcess(homes[0], market=spec).start()
        running.append(n1)
        n2 = NodeProcess(homes[1], [n1.addr], market=spec).start()
        running.append(n2)
        n3 = NodeProcess(homes[2], [n1.addr], market=spec).start()
        running.append(n3)
        nodes = [n1, n2, n3]
        assert all(n.call("id")["public_key"] == k for n, k in zip(nodes, keys, strict=True))
        wait_until(lambda: all(n.peers() >= 2 for n in nodes), 30, "three nodes connected")

        # 1. Crossing orders at once, at different nodes: every one returns final.
        wait = {"wait_final": True, "timeout": FINAL_WITHIN}
        results = _at_once(
            [
                (n1, {"side": "sell", "quantity": "5", "price": "100", **wait}),
                (n2, {"side": "buy", "quantity": "5", "price": "100", **wait}),
                (n3, {"side": "buy", "quantity": "3", "price": "101", **wait}),
            ]
        )
        for result, _ in results:
            assert isinstance(result, dict) and result["final"] is True, result
        figures["submit_to_final_max_s"] = max(seconds for _, seconds in results)
        # 5 sold against 8 bought: one fill or two, depending on the order the race settled.
        wait_until(
            lambda: sum(f["quantity_lots"] for f in n1.call("fills")["fills"]) == 5,
            10,
            "the fills reach node 1",
        )
        fill_count = len(n1.call("fills")["fills"])
        wait_until(
            lambda: all(_all_final(n, fill_count) for n in nodes), 15, "every fill final everywhere"
        )
        fills = [shared_fills(n) for n in nodes]
        assert fills[0] == fills[1] == fills[2]
        # Left: bids at 100-101 only. The trades below are at 110, away from them.

        # 2. A witness dies: trading goes on, finality stalls on it.
        n3.kill9()
        killed = time.monotonic()
        sell = n1.call("submit", side="sell", quantity="2", price="110")
        assert sell["final"] is False
        wait_until(lambda: _has_order(n2, sell["order"]["id"]), 10, "the sell reaches node 2")
        buy = n2.call("submit", side="buy", quantity="1", price="110")
        assert buy["final"] is False and len(buy["fills"]) == 1
        fill_count += 1
        wait_until(lambda: len(n1.call("fills")["fills"]) == fill_count, 10, "the new fill at n1")
        wait_until(
            lambda: _stalled_on(n1, dead_key) and _stalled_on(n2, dead_key),
            STALL_SECONDS + 10,
            "finality stalled on the dead witness",
        )
        figures["kill_to_stalled_s"] = time.monotonic() - killed
        assert figures["kill_to_stalled_s"] > STALL_SECONDS
        assert _status(n1)["final_fills"] == fill_count - 1

        # 3. It comes back: finality resumes.
        restarted = time.monotonic()
        n3 = NodeProcess(homes[2], [n1.addr], market=spec).start()
        running.append(n3)
        nodes = [n1, n2, n3]
        wait_until(lambda: all(_all_final(n, fill_count) for n in nodes), 30, "finality resumed")
        figures["restart_to_final_s"] = time.monotonic() - restarted

        # 4. It dies again and is removed by reconfiguration: finality goes on without it.
        n3.kill9()
        buy = n2.call("submit", side="buy", quantity="1", price="110")
        assert len(buy["fills"]) == 1
        fill_count += 1
        wait_until(lambda: _stalled_on(n1, dead_key), STALL_SECONDS + 10, "stalled again")
        keep = keys[:2]
        approval = n2.call("approve_reconfig", market="DEMO", witnesses=keep)
        assert approval["witness"] == keys[1] and approval["epoch"] == 1
        reconfigured = time.monotonic()
        done = n1.call("reconfigure", market="DEMO", witnesses=keep, approvals=[approval])
        assert done["epoch"] == 1
        wait_until(lambda: all(_all_final(n, fill_count) for n in (n1, n2)), 15, "final without it")
        figures["reconfigure_to_final_s"] = time.monotonic() - reconfigured
        for node in (n1, n2):
            status = _status(node)
            assert status["epoch"] == 1 and status["stalled_on"] == []
            current = {w["key"]: w["current"] for w in status["witnesses"]}
            assert current == {keys[0]: True, keys[1]: True, dead_key: False}
        started = time.monotonic()
        last = n2.call("submit", side="sell", quantity="1", price="120", **wait)
        assert last["final"] is True
        figures["submit_to_final_after_reconfig_s"] = time.monotonic() - started
        logs = n1.log_path.read_text(errors="replace")
        assert "finality stalled" in logs and "finality resumed" in logs

    print("finality figures:", {k: round(v, 2) for k, v in figures.items()})
