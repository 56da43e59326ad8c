"""Fill finality in the node, in process: witness heartbeats, finality in every control shape,
``submit`` with ``wait_final``, watch diffs, stalls and reconfiguration (issue #8).

Several ``NodeService``s share a gossip stand-in that hands each published message to the other
nodes' gossip validators, so ops take the node's real paths (store first, batched publish, the
validator, the apply task). Tests with stalls run on trio's autojump clock: STALL_SECONDS pass
at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from crdtbook import Identity, Market, PointInfo, Replica, SigningWaits
from crdtbook.node.control_errors import (
    BAD_APPROVAL,
    BAD_REQUEST,
    KEY_EQUIVOCATED,
    NO_MAJORITY,
    NOT_READY,
    NOT_WITNESS,
    NOT_WITNESSED,
    TIMEOUT,
    UNKNOWN_MARKET,
    ControlError,
)
from crdtbook.node.finality import STALL_SECONDS, FinalityTracker
from crdtbook.node.handler import WATCH_PROVISIONAL_MAX, ControlAdapter, WatchedFills
from crdtbook.node.service import KeyEquivocated, MarketState, NodeService
from crdtbook.node.store import OpStore

pytestmark = pytest.mark.timeout(60)

#: Short witness heartbeat interval: tests on the real clock stay fast.
INTERVAL = 0.02


class Node:
    def __init__(self, service: NodeService, adapter: ControlAdapter) -> None:
        self.service = service
        self.adapter = adapter
        self.up = True

    @property
    def key(self) -> bytes:
        return self.service.identity.public_key

    @property
    def ms(self) -> MarketState:
        return next(iter(self.service.markets.values()))

    async def call(self, method: str, **params: Any) -> Any:
        return await self.adapter.call(method, params)

    def heartbeats(self, author: bytes | None = None) -> int:
        author = self.key if author is None else author
        return sum(
            1 for op in self.ms.replica.ops() if op.kind == "heartbeat" and op.author == author
        )


class Net:
    """Gossip stand-in: a node's publish reaches every other node that is up."""

    def __init__(self, nursery: trio.Nursery, tmp: Path) -> None:
        self.nursery = nursery
        self.tmp = tmp
        self.nodes: list[Node] = []
        self.stores: list[OpStore] = []

    def add(self, identity: Identity, market: Market, interval: float = INTERVAL) -> Node:
        home = self.tmp / f"n{len(self.nodes)}"
        home.mkdir()
        store = OpStore.open(home, synchronous="NORMAL")
        self.stores.append(store)
        service = NodeService(
            identity, store, [market], heartbeat_interval=interval, publish_interval=0.0
        )
        service.load_from_store()
        adapter = ControlAdapter(
            service, lambda: {"peer_id": f"peer-{identity.public_key.hex()[:8]}", "addrs": []}
        )
        node = Node(service, adapter)
        self.nodes.append(node)
        ms = node.ms

        async def publish(topic: str, data: bytes) -> None:
            if not node.up:
                return
            for other in self.nodes:
                if other is not node and other.up:
                    await other.service.validate_gossip(other.ms, data, "peer")

        self.nursery.start_soon(service.flush_loop, ms, publish, lambda _t: 2)
        self.nursery.start_soon(service.apply_loop, ms)
        if market.witnessed:
            self.nursery.start_soon(service.heartbeat_loop, ms)
            self.nursery.start_soon(service.finality_loop, ms)
        return node

    async def sync(self, node: Node) -> None:
        """What the sync protocol does when a node comes back: pull what it lacks (and push)."""
        for other in self.nodes:
            if other is node or not other.up:
                continue
            for a, b in ((other, node), (node, other)):
                raws = [op.raw for op in a.ms.replica.ops() if op.id not in b.ms.replica]
                prepared = await b.service.prepare(b.ms, raws)
                await b.service.commit(b.ms, prepared, "sync")

    def close(self) -> None:
        for store in self.stores:
            store.close()


@asynccontextmanager
async def network(tmp: Path) -> AsyncIterator[Net]:
    async with trio.open_nursery() as nursery:
        net = Net(nursery, tmp)
        try:
            yield net
        finally:
            nursery.cancel_scope.cancel()
    net.close()


def identities(n: int) -> list[Identity]:
    return [Identity.from_seed(bytes([i + 1]) * 32) for i in range(n)]


def witnessed(ids: list[Identity]) -> Market:
    return Market("W", "1", "1", witnesses=[i.public_key for i in ids])


async def until(predicate: Any, timeout: float = 10.0, step: float = 0.01) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)


def settled(node: Node) -> bool:
    """Every op but heartbeats final (status "final")."""
    return (
        node.ms.finality.evaluate(node.ms.replica, node.key, trio.current_time()).state == "final"
    )


def all_final(node: Node) -> bool:
    r = node.ms.replica
    return r.fill_count > 0 and r.final_fill_count() == r.fill_count


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


# -- heartbeats and finality everywhere ----------------------------------------------------------


async def test_fills_become_final_on_every_node(tmp: Path) -> None:
    ids = identities(3)
    market = witnessed(ids)
    async with network(tmp) as net:
        nodes = [net.add(i, market) for i in ids]
        await nodes[0].call("submit", side="sell", price="100", quantity="5")
        await nodes[1].call("submit", side="buy", price="100", quantity="3")
        await nodes[2].call("submit", side="buy", price="101", quantity="1")
        await until(
            lambda: all(n.ms.replica.fill_count == 2 and all_final(n) and settled(n) for n in nodes)
        )
        digests = {n.ms.digest() for n in nodes}
        assert len(digests) == 1
        for node in nodes:
            fills = await node.call("fills")
            assert fills["witnessed"] is True
            assert fills["final_count"] == 2
            assert [f["final"] for f in fills["fills"]] == [True, True]
            status = (await node.call("status"))["markets"][0]
            assert status["witnessed"] is True
            assert status["finality"] == "final"
            assert status["stalled_on"] == []
            assert status["final_fills"] == 2
            assert status["epoch"] == 0
            assert status["frontier"] > 0
            assert status["final_ops"] <= status["ops"]
            keys = {w["key"]: w for w in status["witnesses"]}
            assert set(keys) == {i.public_key.hex() for i in ids}
            assert keys[node.key.hex()]["me"] is True
            assert all(w["current"] and not w["forked"] for w in keys.values())
            assert all(w["heartbeat_seq"] > 0 for w in keys.values())
            assert all(w["silent_s"] is not None and w["silent_s"] >= 0 for w in keys.values())
            # The buys filled completely: final. The sell rests (1 lot left): never final.
            orders = {
                o["side"] + o["price"]: o for o in (await node.call("orders", all=True))["orders"]
            }
            assert orders["buy100"]["final"] and orders["buy101"]["final"]
            assert orders["sell100"]["status"] == "partially_filled"
            assert orders["sell100"]["final"] is False
            book = await node.call("book")
            assert book["witnessed"] is True and book["frontier"] == status["frontier"]
            assert [(lv["quantity"], lv["final"]) for lv in book["asks"]] == [("1", True)]


async def test_idle_market_sends_no_heartbeats(tmp: Path, autojump_clock: trio.abc.Clock) -> None:
    ids = identities(3)
    market = witnessed(ids)
    async with network(tmp) as net:
        nodes = [net.add(i, market) for i in ids]
        await trio.sleep(5)
        assert all(len(n.ms.replica) == 0 for n in nodes)  # nothing to acknowledge, no heartbeat
        await nodes[0].call("submit", side="sell", price="100", quantity="5")
        await until(lambda: all(n.ms.replica.final_count > 0 for n in nodes))
        await trio.sleep(1)
        ops = len(nodes[0].ms.replica)
        await trio.sleep(30)
        assert len(nodes[0].ms.replica) == ops
        # One order: each witness heartbeat once (the heartbeats need no acknowledging).
        assert [n.heartbeats() for n in nodes] == [1, 1, 1]
        assert (await nodes[0].call("status"))["markets"][0]["finality"] == "final"


async def test_non_witness_follows_but_never_heartbeats(tmp: Path) -> None:
    ids = identities(4)
    market = witnessed(ids[:2])
    async with network(tmp) as net:
        nodes = [net.add(i, market) for i in ids[:2]]
        outsider = net.add(ids[3], market)
        await outsider.call("submit", side="sell", price="100", quantity="5")
        await nodes[0].call("submit", side="buy", price="100", quantity="5")
        await until(lambda: all(all_final(n) for n in [*nodes, outsider]))
        assert outsider.heartbeats() == 0
        status = (await outsider.call("status"))["markets"][0]
        assert not any(w["me"] for w in status["witnesses"])
        with pytest.raises(ControlError) as err:
            await outsider.call("approve_reconfig", witnesses=[ids[0].public_key.hex()])
        assert err.value.code == NOT_WITNESS


async def test_submit_wait_final_returns_final_order_and_fills(tmp: Path) -> None:
    ids = identities(3)
    market = witnessed(ids)
    async with network(tmp) as net:
        nodes = [net.add(i, market) for i in ids]
        sell = await nodes[0].call("submit", side="sell", price="100", quantity="5")
        assert sell["final"] is False and sell["order"]["final"] is False
        started = trio.current_time()
        buy = await nodes[1].call(
            "submit", side="buy", price="100", quantity="5", wait_final=True, timeout=10
        )
        assert trio.current_time() - started < 5
        assert buy["final"] is True
        assert buy["order"]["status"] == "filled" and buy["order"]["final"] is True
        # Every fill it is in, as taker or maker (the sell may reach this node after the buy
        # and sort after it).
        assert [(f["quantity"], f["final"]) for f in buy["fills"]] == [("5", True)]
        assert buy["order"]["id"] in (buy["fills"][0]["taker"], buy["fills"][0]["maker"])
        assert buy["fills"][0]["index"] == 0


# -- markets without witnesses ------------------------------------------------------------------


async def test_market_without_witnesses_is_never_final(tmp: Path) -> None:
    ids = identities(2)
    market = Market("PLAIN", "1", "1")
    async with network(tmp) as net:
        a, b = net.add(ids[0], market), net.add(ids[1], market)
        with pytest.raises(ControlError) as err:
            await a.call("submit", side="sell", price="100", quantity="5", wait_final=True)
        assert err.value.code == NOT_WITNESSED and "never final: no witnesses" in err.value.message
        assert a.ms.replica.order_count == 0  # refused before anything was signed
        await a.call("submit", side="sell", price="100", quantity="5")
        await until(lambda: b.ms.replica.order_count == 1)
        result = await b.call("submit", side="buy", price="100", quantity="2")
        assert result["final"] is False and result["order"]["final"] is False
        assert [f["final"] for f in result["fills"]] == [False]
        fills = await b.call("fills")
        assert fills["witnessed"] is False and fills["final_count"] == 0
        status = (await b.call("status"))["markets"][0]
        assert (status["finality"], status["witnesses"], status["stalled_on"]) == ("none", [], [])
        assert (status["frontier"], status["final_ops"], status["final_fills"]) == (0, 0, 0)
        book = await b.call("book")
        assert book["witnessed"] is False and book["frontier"] == 0
        assert [lv["final"] for lv in book["asks"]] == [False]
        assert a.heartbeats() == 0
        for method in ("approve_reconfig", "reconfigure"):
            with pytest.raises(ControlError) as err:
                await a.call(method, witnesses=[ids[0].public_key.hex()])
            assert err.value.code == NOT_WITNESSED


# -- stalls, timeouts, restarts, reconfiguration -----------------------------------------------


async def test_dead_witness_stalls_then_resumes(
    tmp: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crdtbook.node")
    ids = identities(3)
    market = witnessed(ids)
    async with network(tmp) as net:
        nodes = [net.add(i, market) for i in ids]
        await nodes[0].call("submit", side="sell", price="100", quantity="5")
        await until(lambda: all(n.ms.replica.final_count > 0 for n in nodes))
        dead = nodes[2]
        dead.up = False
        # Trading goes on without it; fills stay provisional.
        await nodes[1].call("submit", side="buy", price="100", quantity="2")
        await until(lambda: nodes[0].ms.replica.fill_count == 1)
        status = (await nodes[1].call("status"))["markets"][0]
        assert status["finality"] == "pending" and status["stalled_on"] == []
        with pytest.raises(ControlError) as err:
            await nodes[1].call(
                "submit", side="buy", price="100", quantity="1", wait_final=True, timeout=1
            )
        assert err.value.code == TIMEOUT
        assert dead.key.hex()[:16] in err.value.message
        assert "submitted and stands" in err.value.message
        # With the order's provisional result, so a script learns its id (and does not place
        # it again): the CLI prints it and exits 3.
        placed = err.value.data
        assert placed is not None and placed["final"] is False
        assert placed["order"]["id"] in err.value.message
        assert placed["order"]["status"] == "filled" and len(placed["fills"]) == 1
        assert nodes[1].ms.replica.fill_count == 2  # the order was placed all the same
        await trio.sleep(STALL_SECONDS + 0.5)
        for node in nodes[:2]:
            status = (await node.call("status"))["markets"][0]
            assert status["finality"] == "stalled"
            assert status["stalled_on"] == [dead.key.hex()]
            assert status["final_fills"] == 0
            silent = {w["key"]: w["silent_s"] for w in status["witnesses"]}
            assert silent[dead.key.hex()] > STALL_SECONDS
        assert "finality stalled" in caplog.text and dead.key.hex()[:16] in caplog.text
        # At the default level (WARNING): an operator alerting on the log saw nothing at INFO.
        said = [r for r in caplog.records if "finality stalled" in r.getMessage()]
        assert said and all(r.levelno == logging.WARNING for r in said)
        with pytest.raises(ControlError) as err:
            await nodes[0].call(
                "submit", side="sell", price="200", quantity="1", wait_final=True, timeout=1
            )
        assert err.value.code == TIMEOUT and "stalled" in err.value.message
        # It comes back, syncs what it missed and acknowledges it.
        dead.up = True
        await net.sync(dead)
        await until(
            lambda: all(all_final(n) and settled(n) and n.ms.replica.fill_count == 2 for n in nodes)
        )
        for node in nodes:
            status = (await node.call("status"))["markets"][0]
            assert status["finality"] == "final" and status["stalled_on"] == []
        await until(lambda: "finality resumed" in caplog.text)


async def test_reconfiguration_removes_a_dead_witness(
    tmp: Path, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crdtbook.node")
    ids = identities(3)
    market = witnessed(ids)
    async with network(tmp) as net:
        nodes = [net.add(i, market) for i in ids]
        await nodes[0].call("submit", side="sell", price="100", quantity="5")
        await until(lambda: all(n.ms.replica.final_count > 0 for n in nodes))
        dead = nodes[2]
        dead.up = False
        await nodes[1].call("submit", side="buy", price="100", quantity="2")
        await trio.sleep(STALL_SECONDS + 1)
        stalled_status = (await nodes[0].call("status"))["markets"][0]
        assert stalled_status["stalled_on"] == [dead.key.hex()]
        gone = next(w for w in stalled_status["witnesses"] if w["key"] == dead.key.hex())
        # How long finality waited for it, not how long ago its last heartbeat came.
        assert STALL_SECONDS < gone["waited_s"] <= gone["silent_s"]
        alive = [w for w in stalled_status["witnesses"] if w["key"] != dead.key.hex()]
        assert all(w["waited_s"] is None or w["waited_s"] < STALL_SECONDS for w in alive)
        keep = sorted(k.hex() for k in (ids[0].public_key, ids[1].public_key))
        approval = await nodes[1].call("approve_reconfig", witnesses=keep)
        assert approval == {
            "witness": ids[1].public_key.hex(),
            "signature": approval["signature"],
            "epoch": 1,
        }
        done = await nodes[0].call("reconfigure", witnesses=keep, approvals=[approval])
        assert done["epoch"] == 1 and len(done["op"]) == 64
        await until(lambda: all(all_final(n) and settled(n) for n in nodes[:2]))
        for node in nodes[:2]:
            status = (await node.call("status"))["markets"][0]
            assert (status["finality"], status["epoch"], status["stalled_on"]) == ("final", 1, [])
            current = {w["key"]: w["current"] for w in status["witnesses"]}
            assert current[dead.key.hex()] is False
        # Finality goes on without it.
        result = await nodes[1].call(
            "submit", side="buy", price="100", quantity="1", wait_final=True, timeout=5
        )
        assert result["final"] is True
        # Back again, it learns it is no longer a witness and does not heartbeat.
        before = dead.heartbeats()
        dead.up = True
        await net.sync(dead)
        await until(lambda: dead.ms.replica.epoch == 1)
        await nodes[0].call("submit", side="buy", price="100", quantity="1")
        await until(lambda: all(all_final(n) for n in nodes))
        await trio.sleep(2)
        assert dead.heartbeats() == before
        assert "no longer a witness" in caplog.text


async def test_reconfigure_errors(tmp: Path) -> None:
    ids = identities(4)
    market = witnessed(ids[:3])
    async with network(tmp) as net:
        a, b, c = (net.add(i, market) for i in ids[:3])
        outsider = net.add(ids[3], market)
        keep = [ids[0].public_key.hex(), ids[1].public_key.hex()]

        async def code(node: Node, method: str, **params: Any) -> str:
            with pytest.raises(ControlError) as err:
                await node.call(method, **params)
            assert err.value.message
            return err.value.code

        assert await code(a, "reconfigure", market="NOPE", witnesses=keep) == UNKNOWN_MARKET
        assert await code(a, "reconfigure", witnesses=["zz"]) == BAD_REQUEST
        assert await code(a, "reconfigure", witnesses=["ab" * 31]) == BAD_REQUEST
        assert await code(a, "reconfigure", witnesses=[]) == BAD_REQUEST
        assert await code(a, "reconfigure", witnesses=[keep[0], keep[0]]) == BAD_REQUEST
        assert await code(a, "reconfigure", witnesses=keep) == NO_MAJORITY
        assert await code(outsider, "approve_reconfig", witnesses=keep) == NOT_WITNESS
        assert await code(outsider, "reconfigure", witnesses=keep) == NOT_WITNESS
        stranger = {"witness": ids[3].public_key.hex(), "signature": "00" * 64}
        assert await code(a, "reconfigure", witnesses=keep, approvals=[stranger]) == NOT_WITNESS
        bad = {"witness": ids[1].public_key.hex(), "signature": "00" * 64}
        assert await code(a, "reconfigure", witnesses=keep, approvals=[bad]) == BAD_APPROVAL
        short = {"witness": ids[1].public_key.hex(), "signature": "00" * 10}
        assert await code(a, "reconfigure", witnesses=keep, approvals=[short]) == BAD_REQUEST
        assert await code(a, "reconfigure", witnesses=keep, approvals=["x"]) == BAD_REQUEST
        # An approval of another set does not verify for this one.
        other = await b.call("approve_reconfig", witnesses=[keep[1]])
        assert await code(a, "reconfigure", witnesses=keep, approvals=[other]) == BAD_APPROVAL
        # Its own approval does not count twice.
        own = await a.call("approve_reconfig", witnesses=keep)
        assert await code(a, "reconfigure", witnesses=keep, approvals=[own]) == NO_MAJORITY
        assert a.ms.replica.epoch == 0 and len(a.ms.replica) == 0  # nothing was signed
        good = await c.call("approve_reconfig", witnesses=keep)
        assert (await a.call("reconfigure", witnesses=keep, approvals=[good]))["epoch"] == 1
        # c is removed now. A set that brings it back is refused as a set (bad_request) by
        # the approver and the signer alike: no approval could mend it (it was approved, then
        # refused as bad_approval with the advice to ask again).
        back = sorted([*keep, ids[2].public_key.hex()])
        await until(lambda: b.ms.replica.epoch == 1)
        with pytest.raises(ControlError) as err:
            await b.call("approve_reconfig", witnesses=back)
        assert err.value.code == BAD_REQUEST
        assert "a removed witness cannot be added again" in err.value.message
        with pytest.raises(ControlError) as err:
            await a.call("reconfigure", witnesses=back)
        assert err.value.code == BAD_REQUEST
        assert "a removed witness cannot be added again" in err.value.message


async def test_equivocating_witness_is_logged_once(
    tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="crdtbook.node")
    ids = identities(3)
    market = witnessed(ids[:2])
    async with network(tmp) as net:
        node = net.add(ids[0], market, interval=60.0)  # its own heartbeats play no part
        # The other witness signs two different ops at sequence 1 (two replicas, one key).
        first, second = Replica(market), Replica(market)
        second.submit(ids[2], "sell", 100, 1)
        ops = [first.submit(ids[1], "sell", 100, 1), second.heartbeat(ids[1])]
        raws = [op.raw for op in second.ops()] + [ops[0].raw]
        await node.service.commit(node.ms, await node.service.prepare(node.ms, raws), "test")
        assert ids[1].public_key in node.ms.replica.forked_authors()
        for _ in range(3):
            status = (await node.call("status"))["markets"][0]
        forked = {w["key"]: w["forked"] for w in status["witnesses"]}
        assert forked[ids[1].public_key.hex()] is True
        warnings = [r for r in caplog.records if "equivocation" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


# -- id ----------------------------------------------------------------------------------------


async def test_id_and_status_name_the_witness_key(tmp: Path) -> None:
    ids = identities(1)
    async with network(tmp) as net:
        node = net.add(ids[0], witnessed(ids))
        result = await node.call("id")
        assert result["public_key"] == ids[0].public_key.hex()
        assert result["peer_id"].startswith("peer-") and result["addrs"] == []
        assert (await node.call("status"))["public_key"] == ids[0].public_key.hex()


# -- watch ---------------------------------------------------------------------------------------


async def test_a_node_holding_its_own_ops_unapplied_does_not_sign(tmp: Path) -> None:
    """Found by restarting a --retention witness after it pruned: its own later ops waited for
    history, its next heartbeat took a sequence number one of them had, every peer saw an
    equivocation, finality stalled and fills shown final turned provisional. Now the node
    answers not_ready (HTTP 503) and does not heartbeat until they apply."""
    ids = identities(2)
    market = witnessed(ids[:1])
    async with network(tmp) as net:
        a = net.add(ids[0], market, interval=60.0)  # no heartbeat of its own meanwhile
        elsewhere = Replica(market)  # the same key's history, as its peers hold it
        theirs = elsewhere.submit(ids[1], "sell", 100, 1)
        mine = elsewhere.submit(ids[0], "sell", 101, 1)  # waits for `theirs` at a
        await a.service.commit(a.ms, await a.service.prepare(a.ms, [mine.raw]), "test")
        assert a.ms.replica.pending_count == 1
        with pytest.raises(ControlError) as err:
            await a.call("submit", side="buy", price="90", quantity="1")
        assert err.value.code == NOT_READY and "nothing was signed" in err.value.message
        with pytest.raises(SigningWaits):
            await a.service.heartbeat(a.ms)
        await a.service.commit(a.ms, await a.service.prepare(a.ms, [theirs.raw]), "test")
        await until(lambda: a.ms.replica.pending_count == 0)
        placed = await a.call("submit", side="buy", price="90", quantity="1")
        assert placed["order"]["status"] == "open"
        assert not a.ms.replica.forked_authors()


async def test_a_node_whose_key_equivocated_signs_nothing_more_and_says_why(
    tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two nodes run with one key (a copied home) sign at the same sequence numbers. Nothing
    detected it: each went on signing, widening the fork. Once the node holds two ops of its
    key at one sequence number it refuses new orders (key_equivocated, HTTP 409), heartbeats no
    more, says so in the log once at ERROR and in status; reads and cancels go on."""
    ids = identities(2)
    market = witnessed(ids[:1])
    async with network(tmp) as net:
        a = net.add(ids[0], market, interval=60.0)  # no heartbeat of its own meanwhile
        placed = await a.call("submit", side="buy", price="90", quantity="1")
        twin = Replica(market)  # the copy of the home: the same key, its own seq 1
        other = twin.submit(ids[0], "sell", 110, 1)
        assert other.seq == 1 and other.id.hex() != placed["order"]["id"]
        await a.service.commit(a.ms, await a.service.prepare(a.ms, [other.raw]), "test")
        assert ids[0].public_key in a.ms.replica.forked_authors()
        status = (await a.call("status"))["markets"][0]
        assert status["key_equivocated"] is True
        with caplog.at_level(logging.ERROR, logger="crdtbook.node"):
            for _ in range(2):
                with pytest.raises(ControlError) as err:
                    await a.call("submit", side="buy", price="91", quantity="1")
                assert err.value.code == KEY_EQUIVOCATED
                assert "nothing was signed" in err.value.message
                assert "new key" in err.value.message
            with pytest.raises(KeyEquivocated):
                await a.service.heartbeat(a.ms)
        said = [r for r in caplog.records if "two different ops" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.ERROR
        assert (await a.call("book"))["market"] == market.name  # reads go on
        # Its resting order can still be cancelled: no other key could.
        cancelled = await a.call("cancel", order_id=placed["order"]["id"])
        assert cancelled["effective"] is True and cancelled["cancel_id"] is not None


async def test_a_filled_order_whose_fill_is_not_final_can_still_be_cancelled(
    tmp: Path,
) -> None:
    """The cancel of a finished order signs nothing only when the order's state is final. Its
    op final is not enough: the taker that filled it may still move, and the order rest again."""
    ids = identities(2)
    market = witnessed(ids[:1])
    async with network(tmp) as net:
        a = net.add(ids[0], market, interval=60.0)  # heartbeats only when the test says
        b = net.add(ids[1], market, interval=60.0)
        sell = await a.call("submit", side="sell", price="100", quantity="1")
        await a.service.heartbeat(a.ms)
        order_id = bytes.fromhex(sell["order"]["id"])
        await until(lambda: a.ms.replica.is_final(order_id))
        await until(lambda: b.ms.replica.order(order_id) is not None)
        await b.call("submit", side="buy", price="100", quantity="1")  # not final: no beat
        await until(
            lambda: (o := a.ms.replica.order(order_id)) is not None and o.status == "filled"
        )
        state = a.ms.replica.order(order_id)
        assert state is not None and not state.final  # its op is final, its state is not
        answer = await a.call("cancel", order_id=sell["order"]["id"])
        assert answer["cancel_id"] is not None and answer["effective"] is False
        assert answer["final"] is False  # it may yet take effect: the CLI says so


async def test_watch_interval_out_of_range_and_empty_client_id_are_refused(tmp: Path) -> None:
    """Both were taken silently: an interval of 0 or 100 was clamped, and "" became a client
    id that no order could then reuse."""
    ids = identities(1)
    async with network(tmp) as net:
        a = net.add(ids[0], witnessed(ids))
        for interval in (0, -1, 0.001, 100, float("nan")):
            with pytest.raises(ControlError) as err:
                await a.adapter.watch({"interval": interval}).__anext__()
            assert err.value.code == BAD_REQUEST and "interval must be 0.005 to 10 s" in (
                err.value.message
            )
        with pytest.raises(ControlError) as err:
            await a.call("submit", side="buy", price="1", quantity="1", client_id="")
        assert err.value.code == BAD_REQUEST and "client_id must not be empty" in err.value.message
        assert a.ms.replica.order_count == 0


async def test_watch_reports_fills_turning_final(tmp: Path) -> None:
    ids = identities(2)
    market = witnessed(ids)
    async with network(tmp) as net:
        a, b = net.add(ids[0], market, interval=0.2), net.add(ids[1], market, interval=0.2)
        events = a.adapter.watch({"interval": 0.005})
        try:
            assert await events.__anext__() == {"watching": "W"}
            await a.call("submit", side="sell", price="100", quantity="5")
            await b.call("submit", side="buy", price="100", quantity="2")
            seen: list[dict[str, Any]] = []
            with trio.fail_after(10):
                while not seen or seen[-1]["final_fill_count"] < 1:
                    seen.append(await events.__anext__())
            # The client always knows fill 0 and whether it is final, whichever way it went:
            # first sent provisional and then reported in became_final; or revoked (the two
            # orders were concurrent, and their heartbeat batch's ranks reordered them) and sent
            # again; or, on a slow event loop, first sent already final.
            final_known = False
            for event in seen:
                if any(f["index"] == 0 for f in event["revoked"]):
                    final_known = False
                for fill in event["fills"]:
                    if fill["index"] == 0:
                        final_known = fill["final"]
                if 0 in event["became_final"]:
                    final_known = True
            assert final_known
            assert seen[-1]["final_fill_count"] == 1
        finally:
            await events.aclose()  # type: ignore[attr-defined]


async def test_watch_lists_the_ops_that_became_final_when_asked(tmp: Path) -> None:
    ids = identities(2)
    market = witnessed(ids)
    async with network(tmp) as net:
        a, b = net.add(ids[0], market, interval=0.2), net.add(ids[1], market, interval=0.2)
        plain = a.adapter.watch({"interval": 0.005})
        events = a.adapter.watch({"interval": 0.005, "finalized": True})
        try:
            assert await events.__anext__() == {"watching": "W"}
            assert await plain.__anext__() == {"watching": "W"}
            sell = await a.call("submit", side="sell", price="100", quantity="5")
            buy = await b.call("submit", side="buy", price="100", quantity="2")
            finalized: list[str] = []
            with trio.fail_after(10):
                while not {sell["order"]["id"], buy["order"]["id"]} <= set(finalized):
                    finalized += (await events.__anext__())["finalized"]
            # Each op once, in the total order, and exactly the final prefix so far.
            ops = [op.id.hex() for op in a.ms.replica.ops()]
            assert finalized == ops[: len(finalized)]
            # Not asked for: not there. (A stream starts listening at its first event read.)
            with trio.fail_after(10):
                listening = plain.__anext__()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        partial(b.call, "submit", side="buy", price="90", quantity="1")
                    )
                    assert "finalized" not in await listening
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            await plain.aclose()  # type: ignore[attr-defined]


class _Fakes:
    """A replica stand-in with a settable fill list, for WatchedFills."""

    def __init__(self, fills: list[Any], final: int) -> None:
        self.list, self.final = fills, final

    @property
    def fill_count(self) -> int:
        return len(self.list)

    def final_fill_count(self) -> int:
        return self.final

    def fills(self, start: int = 0) -> tuple[Any, ...]:
        return tuple(self.list[start:])

    def fill_changes_since(self, token: int | None) -> tuple[int | None, int]:
        return 0, 0  # the list is edited by hand here: every fill may have changed


class _FakeState:
    def __init__(self, replica: _Fakes) -> None:
        self.replica = replica

    def fill_list(self, start: int, stop: int | None = None) -> list[Any]:
        """MarketState.fill_list without compacted history."""
        return list(self.replica.fills(start))[: None if stop is None else stop - start]


def test_watched_fills_revokes_reordered_provisional_fills() -> None:
    replica = _Fakes(["f0", "f1", "f2"], final=1)
    sent = WatchedFills(_FakeState(replica))  # type: ignore[arg-type]
    # f3 arrives; nothing else changed.
    replica.list.append("f3")
    assert sent.update() == ([(3, "f3")], [], [])
    # A heartbeat batch reorders the provisional tail: index 2 now holds f3, 3 holds f2, and
    # indexes 1 and 2 (as they now stand) are final.
    replica.list[2:] = ["f3", "f2"]
    replica.final = 3
    fills, revoked, became_final = sent.update()
    assert revoked == [(2, "f2"), (3, "f3")]
    assert fills == [(2, "f3"), (3, "f2")]
    assert became_final == [1]
    assert sent.final == 3
    # A late op removes the last fill: revoked, nothing to send.
    replica.list.pop()
    assert sent.update() == ([], [(3, "f2")], [])
    # Everything final, nothing new.
    replica.final = 3
    assert sent.update() == ([], [], [])


def test_watched_fills_keeps_a_bounded_tail() -> None:
    replica = _Fakes([f"f{i}" for i in range(WATCH_PROVISIONAL_MAX + 50)], final=0)
    sent = WatchedFills(_FakeState(replica))  # type: ignore[arg-type]
    assert len(sent.provisional) == WATCH_PROVISIONAL_MAX
    replica.list.extend(["x", "y"])
    assert sent.update() == (
        [(WATCH_PROVISIONAL_MAX + 50, "x"), (WATCH_PROVISIONAL_MAX + 51, "y")],
        [],
        [],
    )
    assert len(sent.provisional) == WATCH_PROVISIONAL_MAX


# -- book levels and params ------------------------------------------------------------------------


async def test_book_levels_compare_with_the_final_book(tmp: Path) -> None:
    ids = identities(2)
    market = witnessed(ids[:1])
    async with network(tmp) as net:
        node = net.add(ids[0], market, interval=600.0)  # heartbeats only by hand here
        trader = net.add(ids[1], market)  # not a witness
        for price in ("101", "102", "103"):
            await node.call("submit", side="sell", price=price, quantity="1")
        await until(lambda: trader.ms.replica.order_count == 3)
        await node.service.heartbeat(node.ms)
        assert settled(node)
        book = await node.call("book", depth=3)
        assert [(lv["price"], lv["final"]) for lv in book["asks"]] == [
            ("101", True),
            ("102", True),
            ("103", True),
        ]
        # Provisional: a buy takes 101 and 102; a sell rests at 104.
        await trader.call("submit", side="buy", price="102", quantity="2")
        await node.call("submit", side="sell", price="104", quantity="1")
        await until(lambda: node.ms.replica.fill_count == 2)
        for depth in (1, 2, 5):  # 1: 103 lies past the final book's top level: looked up in full
            book = await node.call("book", depth=depth)
            levels = [(lv["price"], lv["final"]) for lv in book["asks"]]
            assert levels == [("103", True), ("104", False)][:depth]
        fills = await node.call("fills")
        assert fills["final_count"] == 0 and [f["final"] for f in fills["fills"]] == [False] * 2


async def test_submit_checks_its_finality_params(tmp: Path) -> None:
    ids = identities(1)
    async with network(tmp) as net:
        node = net.add(ids[0], witnessed(ids))
        for timeout in (0, -1, 1e9, "soon"):
            with pytest.raises(ControlError) as err:
                await node.call(
                    "submit", side="buy", price="1", quantity="1", wait_final=True, timeout=timeout
                )
            assert err.value.code == BAD_REQUEST
        with pytest.raises(ControlError) as err:
            await node.call("submit", side="buy", price="1", quantity="1", wait_final="yes")
        assert err.value.code == BAD_REQUEST
        assert len(node.ms.replica) == 0
        # The only witness: final after its own heartbeat.
        result = await node.call(
            "submit", side="buy", price="1", quantity="1", wait_final=True, timeout=5
        )
        assert result["final"] is True and result["order"]["final"] is False  # it rests
        assert result["fills"] == []


class _DisputedReplica:
    """What FinalityTracker.observe reads of a replica whose latest point is disputed."""

    point = PointInfo(300, b"\x01" * 32, b"", ())

    def disputed_point(self) -> tuple[int, bytes]:
        return 300, b"\x02" * 32

    def witness_status(self) -> list[Any]:
        return []


def test_a_disputed_point_is_logged_once_at_error(caplog: pytest.LogCaptureFixture) -> None:
    """A node whose state at its point differs from what a majority of the witnesses attest
    (core: ``Replica.disputed_point``) says so once, at ERROR, with what to do."""
    tracker = FinalityTracker("W")
    replica: Any = _DisputedReplica()
    with caplog.at_level(logging.ERROR, logger="crdtbook.node"):
        for now in (0.0, 1.0, 2.0):
            tracker.observe(replica, now)
    assert tracker.disputed == (300, b"\x02" * 32)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "not the one a majority of the witnesses attest" in said[0]
    assert "--join snapshot" in said[0] and "new key" in said[0]


def test_a_stall_is_a_warning_once_the_node_has_caught_up(caplog: pytest.LogCaptureFixture) -> None:
    """A stall was logged at INFO only: an operator at the default level saw nothing while a
    witness was gone for 44 s. A node that holds ops waiting for their parents may only lag
    the heartbeats (a joiner): INFO with that reason, then WARNING if the stall outlasts it."""
    tracker = FinalityTracker("W")
    witness = (b"\x07" * 32,)
    with caplog.at_level(logging.INFO, logger="crdtbook.node"):
        tracker._log_stall(witness, pending=5000)  # catching up
        tracker._log_stall(witness, pending=0)  # caught up, still stalled
        tracker._log_stall(witness, pending=0)
        tracker._log_stall((), pending=0)
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in said] == [logging.INFO, logging.WARNING, logging.WARNING]
    assert "catching up" in said[0][1] and "finality stalled" in said[1][1]
    assert "finality resumed" in said[2][1]
