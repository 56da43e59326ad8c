"""The version-2 order tools through the control API, in process (issue #11): client order ids,
self-trade modes (and what submit says they expired), cancel-all, cancel and lookup by client
id, ``markets``, ``orders`` open/limit, ``fills`` mine, receipt and witnessed timestamps."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from crdtbook import Market
from crdtbook.node.control_errors import (
    BAD_REQUEST,
    DUPLICATE_CLIENT_ID,
    NOT_FOUND,
    NOT_WITNESSED,
    ControlError,
)

from .test_finality import identities, network, until, witnessed

pytestmark = pytest.mark.timeout(60)


async def test_self_trade_modes_say_what_they_expired(tmp_path: Path) -> None:
    ids = identities(1)
    async with network(tmp_path) as net:
        a = net.add(ids[0], witnessed(ids))
        maker = await a.call("submit", side="sell", price="100", quantity="5", client_id="m1")
        assert maker["order"]["client_id"] == "m1" and maker["self_trade_expired"] == []
        # expire_taker: the taker stops, the maker stays
        taker = await a.call("submit", side="buy", price="100", quantity="2", stp="expire-taker")
        assert taker["order"]["status"] == "expired" and taker["order"]["reason"] == "self_trade"
        assert [o["id"] for o in taker["self_trade_expired"]] == [taker["order"]["id"]]
        assert (await a.call("order", client_id="m1"))["status"] == "open"
        # expire_maker (the default): the maker expires, the taker rests
        taker = await a.call("submit", side="buy", price="100", quantity="2")
        assert taker["order"]["status"] == "open"
        assert [o["id"] for o in taker["self_trade_expired"]] == [maker["order"]["id"]]
        # expire_both: both
        m2 = await a.call("submit", side="sell", price="101", quantity="1", client_id="m2")
        both = await a.call("submit", side="buy", price="101", quantity="1", stp="expire_both")
        expired = {o["id"] for o in both["self_trade_expired"]}
        assert expired == {m2["order"]["id"], both["order"]["id"]}
        with pytest.raises(ControlError) as err:
            await a.call("submit", side="buy", price="1", quantity="1", stp="nope")
        assert err.value.code == BAD_REQUEST


async def test_client_ids_cancel_and_cancel_all(tmp_path: Path) -> None:
    ids = identities(1)
    async with network(tmp_path) as net:
        a = net.add(ids[0], witnessed(ids))
        for cid, price in (("grid-1", "90"), ("grid-2", "91"), ("other", "92")):
            await a.call("submit", side="buy", price=price, quantity="1", client_id=cid)
        with pytest.raises(ControlError) as err:
            await a.call("submit", side="buy", price="93", quantity="1", client_id="other")
        assert err.value.code == DUPLICATE_CLIENT_ID and "other" in err.value.message
        with pytest.raises(ControlError) as err:
            await a.call("order", client_id="nope")
        assert err.value.code == NOT_FOUND
        got = await a.call("order", client_id="other")
        assert got["price"] == "92" and got["tag"] == "other"
        done = await a.call("cancel", client_id="other")
        assert done["effective"] is True and done["order"]["status"] == "cancelled"
        result = await a.call("cancel_all", prefix="grid-")
        assert result["cancelled"] == 2 and result["prefix"] == "grid-"
        assert (await a.call("orders", open=True))["orders"] == []
        again = await a.call("cancel_all")
        assert again["cancelled"] == 0


async def test_market_without_witnesses_refuses_v2_tools(tmp_path: Path) -> None:
    ids = identities(1)
    async with network(tmp_path) as net:
        a = net.add(ids[0], Market("PLAIN", "1", "1"))
        for params in ({"client_id": "x"}, {"stp": "expire_taker"}):
            with pytest.raises(ControlError) as err:
                await a.call("submit", side="buy", price="1", quantity="1", **params)
            assert err.value.code == BAD_REQUEST and "no witnesses" in err.value.message
        with pytest.raises(ControlError) as err:
            await a.call("cancel_all")
        assert err.value.code == NOT_WITNESSED
        assert a.ms.replica.order_count == 0  # nothing was signed
        # a tag stays a free label there: reusing it is fine
        await a.call("submit", side="buy", price="1", quantity="1", tag="t")
        await a.call("submit", side="buy", price="1", quantity="1", tag="t")
        markets = await a.call("markets")
        assert markets[0]["witnessed"] is False and markets[0]["witnesses"] == 0


async def test_markets_orders_fills_and_timestamps(tmp_path: Path) -> None:
    ids = identities(2)
    market = witnessed(ids[:1])
    async with network(tmp_path) as net:
        a, b = net.add(ids[0], market), net.add(ids[1], market)
        before = time.time_ns() // 1_000_000
        await a.call("submit", side="sell", price="100", quantity="5")
        await until(lambda: b.ms.replica.order_count == 1)
        await b.call("submit", side="buy", price="100", quantity="2")
        await b.call("submit", side="buy", price="50", quantity="1")
        await b.call("submit", side="buy", price="51", quantity="1")
        (entry,) = await a.call("markets")
        assert (entry["witnessed"], entry["witnesses"], entry["version"]) == (True, 1, 2)
        assert entry["spec"] == market.spec
        open_b = (await b.call("orders", open=True, limit=1))["orders"]
        assert [o["price"] for o in open_b] == ["51"]
        assert len((await b.call("orders", open=True))["orders"]) == 2
        assert len((await b.call("orders"))["orders"]) == 3
        await a.call("submit", side="buy", price="1", quantity="1")  # a's own resting order
        await until(lambda: a.ms.replica.fill_count == 1 and a.ms.replica.order_count == 5)
        await until(lambda: a.ms.replica.final_fill_count() == 1)
        mine_a = (await a.call("fills", mine=True))["fills"]
        assert len(mine_a) == 1 and mine_a[0]["maker_author"] == ids[0].public_key.hex()
        fill = mine_a[0]
        assert fill["received_ms"] >= before and fill["final"] is True
        assert isinstance(fill["witnessed_ms"], int)
        order = (await a.call("orders"))["orders"][-1]
        assert order["received_ms"] >= before and order["witnessed_ms"] is None  # still open
        with pytest.raises(ControlError) as err:
            await a.call("orders", limit=0)
        assert err.value.code == BAD_REQUEST
