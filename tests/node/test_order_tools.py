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
    EMPTY_BOOK,
    INVALID_OP,
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
        assert done["final"] is a.ms.replica.is_final(bytes.fromhex(done["cancel_id"]))
        result = await a.call("cancel_all", prefix="grid-")
        assert result["cancelled"] == 2 and result["prefix"] == "grid-"
        assert (await a.call("orders", open=True))["orders"] == []
        again = await a.call("cancel_all")
        assert again["cancelled"] == 0


async def test_market_without_witnesses_refuses_v2_tools(tmp_path: Path) -> None:
    ids = identities(1)
    async with network(tmp_path) as net:
        a = net.add(ids[0], Market("PLAIN", "1", "1"))
        # Every tool of protocol version 2 is refused the same way, before anything is signed.
        for params in ({"client_id": "x"}, {"stp": "expire_taker"}):
            with pytest.raises(ControlError) as err:
                await a.call("submit", side="buy", price="1", quantity="1", **params)
            assert err.value.code == NOT_WITNESSED and "no witnesses" in err.value.message
        for method, params in (
            ("cancel_all", {}),
            ("cancel", {"client_id": "x"}),
            ("order", {"client_id": "x"}),
            ("amend", {"client_id": "x", "price": "2"}),
            ("submit", {"side": "buy", "price": "1", "quantity": "1", "wait_final": True}),
        ):
            with pytest.raises(ControlError) as err:
                await a.call(method, **params)
            assert err.value.code == NOT_WITNESSED, method
        assert a.ms.replica.order_count == 0  # nothing was signed
        # a tag stays a free label there: reusing it is fine
        await a.call("submit", side="buy", price="1", quantity="1", tag="t")
        placed = await a.call("submit", side="buy", price="1", quantity="1", tag="t")
        # A cancel of an order this key cancelled already signs nothing: it would follow the
        # first in every order (nothing compacts here: a retry loop grew the log for ever).
        first = await a.call("cancel", order_id=placed["order"]["id"])
        assert first["effective"] is True and first["cancel_id"] is not None
        held = len(a.ms.replica)
        again = await a.call("cancel", order_id=placed["order"]["id"])
        assert again["cancel_id"] is None and again["effective"] is False
        assert again["final"] is False and again["order"]["status"] == "cancelled"
        assert len(a.ms.replica) == held
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


async def test_market_order_is_ioc_within_the_band(tmp_path: Path) -> None:
    ids = identities(2)
    market = Market("PLAIN", "1", "1")
    async with network(tmp_path) as net:
        a, b = net.add(ids[0], market), net.add(ids[1], market)
        with pytest.raises(ControlError) as err:
            await b.call("submit", side="buy", quantity="3", market_order=True, band="2%")
        assert err.value.code == EMPTY_BOOK and "no asks" in err.value.message
        assert b.ms.replica.order_count == 0
        await a.call("submit", side="sell", price="100", quantity="2")
        await a.call("submit", side="sell", price="102", quantity="2")
        await a.call("submit", side="sell", price="103", quantity="2")
        await until(lambda: b.ms.replica.order_count == 3)
        result = await b.call("submit", side="buy", quantity="5", market_order=True, band="2%")
        assert result["market_order"] == {"reference": "100", "limit": "102", "band_pct": "2"}
        order = result["order"]
        assert (order["tif"], order["price"], order["filled"]) == ("ioc", "102", "4")
        assert order["status"] == "expired" and order["reason"] == "ioc_remainder"
        assert [f["price"] for f in result["fills"]] == ["100", "102"]
        with pytest.raises(ControlError) as err:  # b's buy was IOC: no bids rest
            await a.call("submit", side="sell", quantity="1", market_order=True, band="10")
        assert err.value.code == EMPTY_BOOK and "no bids" in err.value.message
        for params in ({"band": "x"}, {"band": "60%"}, {"price": "5"}, {"tif": "fok"}):
            with pytest.raises(ControlError) as err:
                await b.call("submit", side="buy", quantity="1", market_order=True, **params)
            assert err.value.code == BAD_REQUEST, params


async def test_amend_cancels_and_replaces_in_one_step(tmp_path: Path) -> None:
    ids = identities(1)
    async with network(tmp_path) as net:
        a = net.add(ids[0], witnessed(ids))
        first = await a.call("submit", side="buy", price="90", quantity="3", client_id="g1")
        oid = first["order"]["id"]
        result = await a.call("amend", order_id=oid, price="91", new_client_id="g2")
        assert result["effective"] is True and result["cancelled"]["status"] == "cancelled"
        cancel_id = bytes.fromhex(result["cancel_id"])
        assert result["cancel_final"] is a.ms.replica.is_final(cancel_id)
        new = result["order"]
        assert (new["side"], new["price"], new["quantity"], new["client_id"]) == (
            "buy", "91", "3", "g2"
        )  # fmt: skip
        assert result["cancel_id"] != new["id"]
        again = await a.call("amend", client_id="g2", quantity="1")
        assert again["order"]["price"] == "91" and again["order"]["quantity"] == "1"
        with pytest.raises(ControlError) as err:  # the cancelled one: nothing to amend
            await a.call("amend", order_id=oid, price="92")
        assert err.value.code == INVALID_OP and "not resting" in err.value.message
        with pytest.raises(ControlError) as err:
            await a.call("amend", order_id=again["order"]["id"])
        assert err.value.code == BAD_REQUEST
        with pytest.raises(ControlError) as err:  # reusing a client id is refused up front
            await a.call("amend", order_id=again["order"]["id"], price="1", new_client_id="g1")
        assert err.value.code == DUPLICATE_CLIENT_ID
        assert (await a.call("order", order_id=again["order"]["id"]))["status"] == "open"


async def test_self_trade_report_reaches_deep_into_the_book(tmp_path: Path) -> None:
    ids = identities(2)
    market = Market("PLAIN", "1", "1")
    async with network(tmp_path) as net:
        a, b = net.add(ids[0], market), net.add(ids[1], market)
        await b.call("submit", side="sell", price="99", quantity="1")  # another author's
        await until(lambda: a.ms.replica.order_count == 1)
        mine = [
            (await a.call("submit", side="sell", price=str(100 + i), quantity="1"))["order"]["id"]
            for i in range(12)
        ]
        await a.call("submit", side="sell", price="200", quantity="1")  # out of reach
        result = await a.call("submit", side="buy", price="111", quantity="20")
        assert [o["id"] for o in result["self_trade_expired"]] == mine
        assert [f["price"] for f in result["fills"]] == ["99"]
        assert result["order"]["status"] == "partially_filled"
