"""The control handler's remembered conversions (node/handler.py ``_price``, ``_size``,
``_ticks``, ``_lots``): the core's answers, the core's refusals every time (a refusal is not
remembered), per market (two markets with other ticks never share), and bounded."""

from __future__ import annotations

import pytest

import crdtbook.node.handler as handler_module
from crdtbook import Market, Replica
from crdtbook.node.control_errors import OFF_LOT, OFF_TICK, ControlError
from crdtbook.node.handler import TEXT_CACHE_MAX, _lots, _price, _size, _ticks
from crdtbook.node.service import MarketState, topic_for

BTC = Market.parse("BTC-USD")
COARSE = Market("BTC-USD", "1", "1")  # same name, other tick and lot: another market id


def state(market: Market) -> MarketState:
    return MarketState(market, Replica(market), topic_for(market))


def test_conversions_are_the_cores_and_per_market() -> None:
    for m in (BTC, COARSE, BTC):  # BTC again: from its caches now
        ms = state(m)
        for n in (1, 7, 100, 10_050, 123_456_789):
            assert _price(m, n) == m.ticks_to_price(n)
            assert _size(m, n) == m.lots_to_qty(n)
        for text in ("1", "100", "3", " 7 "):
            assert _ticks(ms, text) == m.price_to_ticks(text)
            assert _lots(ms, text) == m.qty_to_lots(text)
    assert _price(BTC, 100) != _price(COARSE, 100)


@pytest.mark.parametrize("text", ["100.005", "0.00005", "-1", "0", "ten"])
def test_refusals_are_raised_every_time(text: str) -> None:
    ms = state(BTC)  # tick 0.01, lot 0.0001
    for _ in range(2):
        with pytest.raises(ControlError) as price_error:
            _ticks(ms, text)
        assert price_error.value.code == OFF_TICK
        if text != "100.005":  # a multiple of the lot
            with pytest.raises(ControlError) as size_error:
                _lots(ms, text)
            assert size_error.value.code == OFF_LOT


def test_caches_are_bounded() -> None:
    for n in range(1, 2 * TEXT_CACHE_MAX + 10):
        assert _price(COARSE, n) == COARSE.ticks_to_price(n)
    assert len(handler_module._price_texts[COARSE.id]) <= TEXT_CACHE_MAX
