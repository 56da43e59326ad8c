"""The web view against a fake node inside the browser (tests/browser/fake_api.py): what the page
shows from the API's shapes, and how it follows the streams (a book gap makes it resubscribe
from its last ``u``; revoked and became-final trades), the order form's exact request, cancel,
and the token's handling. The same page against real nodes: test_web_nodes.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from .fake_api import ORIGIN, PEER_ID, TOKEN, FakeNode
from .support import screenshot


@pytest.fixture
def fake(page: Any) -> FakeNode:
    node = FakeNode()
    node.install(page)
    return node


def open_page(page: Any, token: bool = True) -> None:
    page.goto(f"{ORIGIN}/" + (f"#token={TOKEN}" if token else ""))
    page.wait_for_selector("#trades tr[data-id]")
    page.wait_for_selector("#bids .level")


def texts(page: Any, selector: str) -> list[str]:
    return [t.strip() for t in page.locator(selector).all_inner_texts()]


def test_page_shows_the_market(page: Any, fake: FakeNode) -> None:
    open_page(page)
    # the token left the address bar at once, and is kept for the tab
    assert "token" not in page.url
    assert page.evaluate("sessionStorage.getItem('crdtbook.token')") == TOKEN
    # the ladder: asks highest first down to the best, then bids best first; exact strings
    assert texts(page, "#asks .level .price") == ["104", "102", "101.5", "101"]
    assert texts(page, "#bids .level .price") == ["100.5", "100", "99.5", "98"]
    assert texts(page, "#bids .level span:nth-of-type(3)") == ["1.200", "1.950", "4.950", "9.450"]
    # the levels the final book lacks are marked provisional, the others final
    assert page.locator("#bids .level.provisional").get_attribute("data-price") == "100.5"
    assert page.locator("#asks .level.provisional").get_attribute("data-price") == "101"
    assert page.locator(".level.final").count() == 6
    assert "100.75" in page.inner_text("#midline") and "spread 0.5" in page.inner_text("#midline")
    # trades newest first, each marked
    rows = page.locator("#trades tr")
    assert rows.count() == 3
    assert "provisional" in rows.nth(0).inner_text() and "final" in rows.nth(2).inner_text()
    assert rows.nth(0).get_attribute("class").split()[0] == "provisional"
    # my open order with its cancel button; my price marked on the ladder
    assert page.locator("#open-orders tr[data-id] button").count() == 1
    assert page.locator("#bids .level.mine").get_attribute("data-price") == "100.5"
    # node, peers and finality
    page.wait_for_function("document.getElementById('node-id').textContent.length > 1")
    assert page.inner_text("#node-id") == PEER_ID  # whole
    assert page.inner_text("#finality-badge").lower() == "pending"
    assert "12D3KooWPeerTwo" in page.inner_text("#peers")
    assert page.locator("#witnesses li").count() == 2
    assert page.locator("#depth").bounding_box()["height"] > 100
    screenshot(page, "web-fake-market")
    assert page.errors == []


def test_book_deltas_and_a_gap(page: Any, fake: FakeNode) -> None:
    open_page(page)
    fake.delta(bids=[["100.5", "0"], ["99", "2"]], asks=[])
    page.wait_for_function("document.querySelectorAll('#bids .level').length === 4")
    page.wait_for_selector('#bids .level[data-price="99"]')
    assert page.locator('#bids .level[data-price="100.5"]').count() == 0
    assert page.inner_text("#book-seq") == f"u {fake.seq}"
    last = fake.seq
    subscribes = sum(1 for m in fake.sent if m.get("channel") == "book")
    fake.delta(bids=[["97", "1"]], asks=[], skip=3)  # pu is not the page's u: a gap
    # the page asks again from its last u; the fake answers with a snapshot at its newest u
    page.wait_for_function(f"document.getElementById('book-seq').textContent === 'u {fake.seq}'")
    again = [m for m in fake.sent if m.get("channel") == "book"][subscribes:]
    assert again == [{"op": "subscribe", "channel": "book", "symbol": "BTC-USD", "since": last}]
    assert page.locator('#bids .level[data-price="97"]').count() == 0  # the gapped delta unused
    assert page.errors == []


def test_trades_revoked_and_became_final(page: Any, fake: FakeNode) -> None:
    open_page(page)
    fake.push(
        {
            "channel": "trades",
            "type": "update",
            "symbol": "BTC-USD",
            "trades": [],
            "revoked": ["t3"],
            "became_final": [],
        }
    )
    page.wait_for_function("document.querySelectorAll('#trades tr[data-id]').length === 2")
    assert "revoked" in page.inner_text("#trades-note")
    new = dict(fake.trades[2], id="t4", timestamp=fake.trades[2]["timestamp"] + 5, final=False)
    fake.push(
        {
            "channel": "trades",
            "type": "update",
            "symbol": "BTC-USD",
            "trades": [new],
            "revoked": [],
            "became_final": [],
        }
    )
    page.wait_for_selector('#trades tr.provisional[data-id="t4"]')
    fake.push(
        {
            "channel": "trades",
            "type": "update",
            "symbol": "BTC-USD",
            "trades": [],
            "revoked": [],
            "became_final": ["t4"],
        }
    )
    page.wait_for_selector('#trades tr.final[data-id="t4"]')
    assert "final" in page.inner_text('#trades tr[data-id="t4"] td.state')
    assert page.errors == []


def test_order_form_sends_exact_decimals(page: Any, fake: FakeNode) -> None:
    open_page(page)
    page.check('#order-form input[value="sell"]', force=True)
    page.fill('[data-testid="price"]', "101.50")
    page.fill('[data-testid="amount"]', "0.300")
    page.select_option('[data-testid="stp"]', "expire_both")
    page.fill('[data-testid="client-id"]', "bot-7")
    assert "proceeds 30.45" in page.inner_text("#order-cost")
    page.click('[data-testid="submit"]')
    page.wait_for_selector("#order-result div")
    assert fake.posted == [
        {
            "symbol": "BTC-USD",
            "type": "limit",
            "side": "sell",
            "amount": "0.300",
            "price": "101.50",
            "timeInForce": "GTC",
            "clientOrderId": "bot-7",
            "selfTradePrevention": "expire_both",
        }
    ]
    result = page.inner_text("#order-result")
    assert "b2" * 32 in result  # the order id whole
    assert "filled: sold 0.300" in result
    assert f"expired by self-trade prevention: own sell order {'c3' * 32}" in result
    screenshot(page, "web-fake-order-placed")
    assert page.errors == []


def test_cancel_button(page: Any, fake: FakeNode) -> None:
    open_page(page)
    page.click("#open-orders tr[data-id] button")
    page.wait_for_function("document.querySelectorAll('#open-orders tr[data-id]').length === 0")
    assert fake.deleted == ["a1" * 32]
    assert page.errors == []


def test_without_token_private_is_locked_until_given(page: Any, fake: FakeNode) -> None:
    page.goto(f"{ORIGIN}/")  # (a fresh tab: nothing in its session storage)
    page.wait_for_selector("#trades tr[data-id]")
    assert page.is_visible('[data-testid="locked"]')
    assert page.is_disabled('[data-testid="submit"]')
    assert not any(m.get("channel") == "private" for m in fake.sent)
    assert not any(m.get("op") == "auth" for m in fake.sent)
    page.click('[data-testid="token-button"]')
    page.fill('[data-testid="token-input"]', TOKEN)
    page.click('[data-testid="token-save"]')
    page.wait_for_selector("#open-orders tr[data-id]")  # reconnected, authenticated, subscribed
    assert page.is_enabled('[data-testid="submit"]')
    assert not page.is_visible('[data-testid="locked"]')
    assert {"op": "auth", "token": TOKEN} in fake.sent
    assert page.errors == []


def test_untrusted_text_stays_text(page: Any, fake: FakeNode) -> None:
    """A peer's announced address is shown as the characters it is, never run as markup."""
    evil = '<img src=x onerror="window.pwned=1">'
    fake.status["peers"] = [{"peer_id": evil, "addrs": [evil]}]
    open_page(page)
    page.wait_for_function("document.getElementById('peers').textContent.includes('<img')")
    assert page.locator("#peers img").count() == 0
    assert page.evaluate("window.pwned === undefined")
    assert evil in page.inner_text("#peers")


def test_reconnect_resumes_the_book_from_its_last_u(page: Any, fake: FakeNode) -> None:
    open_page(page)
    last = fake.delta(bids=[["99", "2"]], asks=[])
    page.wait_for_selector('#bids .level[data-price="99"]')
    first = fake.ws
    sent_before = len(fake.sent)
    first.close()  # the node went away
    page.wait_for_function("document.getElementById('conn').classList.contains('down')")
    page.wait_for_function("document.getElementById('conn').classList.contains('live')")
    resubscribed = {"op": "subscribe", "channel": "book", "symbol": "BTC-USD", "since": last}
    for _ in range(200):  # (each turn lets Playwright deliver the page's messages)
        if resubscribed in fake.sent[sent_before:]:
            break
        page.wait_for_timeout(50)
    assert fake.ws is not first
    again = fake.sent[sent_before:]
    assert {"op": "auth", "token": TOKEN} in again
    assert resubscribed in again
    assert {"op": "subscribe", "channel": "private", "symbol": "BTC-USD"} in again
    assert page.errors == []


def test_market_order_sends_band_not_price(page: Any, fake: FakeNode) -> None:
    open_page(page)
    page.check('#order-form input[value="market"]', force=True)
    assert page.is_hidden('[data-testid="price"]') and page.is_visible('[data-testid="band"]')
    assert page.inner_text('[data-testid="submit"]') == "Buy BTC at market"
    page.fill('[data-testid="amount"]', "0.25")
    page.fill('[data-testid="band"]', "2")
    page.click('[data-testid="submit"]')
    page.wait_for_selector("#order-result div")
    assert fake.posted == [
        {"symbol": "BTC-USD", "type": "market", "side": "buy", "amount": "0.25", "band": "2"}
    ]
    assert page.errors == []


def test_cancel_all_is_one_request(page: Any, fake: FakeNode) -> None:
    open_page(page)
    page.click('[data-testid="cancel-all"]')
    page.wait_for_function("document.querySelectorAll('#open-orders tr[data-id]').length === 0")
    assert fake.deleted == ["all BTC-USD"]
    assert "1 order cancelled in one op" in page.inner_text("#toasts")
    assert page.errors == []


def test_market_without_witnesses_says_never_final(page: Any, fake: FakeNode) -> None:
    fake.markets[0]["info"]["witnessed"] = False
    fake.status["markets"][0].update(witnessed=False, finality="none", witnesses=[])
    open_page(page)
    page.wait_for_function(
        "document.getElementById('finality-badge').textContent === 'never final'"
    )
    assert set(texts(page, "#trades td.state")) == {"never final"}
    assert page.locator(".level.provisional, .level.final").count() == 0  # no marks at all
    assert "never final" in page.inner_text("#book-note")
    assert page.errors == []


def test_depth_chart_hover(page: Any, fake: FakeNode) -> None:
    open_page(page)
    box = page.locator("#depth").bounding_box()
    # a point left of the mid (bids) and right of it (asks), halfway up
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.wait_for_selector("#chart-tip:not([hidden])")
    assert page.inner_text("#chart-tip").startswith("bids to ")
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5)
    page.wait_for_function("document.getElementById('chart-tip').textContent.startsWith('asks')")
    assert page.errors == []


# -- a web review in a browser (session 17): each was a defect ------------------------------------


def test_cancel_says_what_it_did_and_that_it_is_provisional(page: Any, fake: FakeNode) -> None:
    """A cancel that came after a fill read "cancelled sell 0.0000 @ 100.15": the trader
    believed nothing sold. Every cancel toast showed 0.0000 (what rests after it)."""
    open_page(page)
    fake.cancel_answer = {
        "status": "closed",
        "filled": "1.2",
        "info": {"cancel_id": "cc" * 32, "effective": False, "cancel_final": False},
    }
    page.click("#open-orders tr[data-id] button")
    page.wait_for_selector("#toasts .toast.warn")
    said = page.inner_text("#toasts")
    assert f"provisional: nothing to cancel: buy order {'a1' * 6} is already closed" in said
    assert "1.2 had filled" in said and "0.0000" not in said
    assert page.errors == []


def test_trades_newest_first_by_index_and_final_times(page: Any, fake: FakeNode) -> None:
    """After a restart, trades loaded from the store have no timestamp: sorted by time the
    newest went last and an older one was "last"; and a trade that became final kept its
    receipt time where the node gives the witnessed one."""
    open_page(page)
    newest = dict(fake.trades[0], id="t9", price="99", timestamp=None, final=True)
    newest["info"] = {"index": 9}
    fake.push(
        {"channel": "trades", "type": "update", "symbol": "BTC-USD", "trades": [newest],
         "revoked": [], "became_final": []}
    )  # fmt: skip
    page.wait_for_selector('#trades tr[data-id="t9"]')
    assert page.locator("#trades tr").nth(0).get_attribute("data-id") == "t9"
    assert page.inner_text("#last-price") == "99"
    witnessed = 1_764_660_002_345
    fake.push(
        {"channel": "trades", "type": "update", "symbol": "BTC-USD", "trades": [],
         "revoked": [], "became_final": ["t3"], "final_times": {"t3": witnessed}}
    )  # fmt: skip
    page.wait_for_selector('#trades tr.final[data-id="t3"]')
    title = page.locator('#trades tr[data-id="t3"]').get_attribute("title")
    assert title == "2025-12-02T07:20:02.345Z"
    assert page.errors == []


def test_a_lost_answer_is_not_called_a_refusal(page: Any, fake: FakeNode) -> None:
    """With the node gone mid-request the page said "refused: Failed to fetch": a trader told
    "refused" submits again, and may hold two orders."""
    open_page(page)
    fake.post_fails = True
    page.fill('[data-testid="price"]', "100")
    page.fill('[data-testid="amount"]', "0.1")
    page.click('[data-testid="submit"]')
    page.wait_for_function(
        "document.getElementById('order-result').textContent.includes('no answer')"
    )
    result = page.inner_text("#order-result")
    assert "may have been placed all the same" in result and "refused" not in result


def test_outcomes_are_marked_provisional(page: Any, fake: FakeNode) -> None:
    open_page(page)
    page.fill('[data-testid="price"]', "101")
    page.fill('[data-testid="amount"]', "0.1")
    page.click('[data-testid="submit"]')
    page.wait_for_selector("#order-result div")
    assert "provisional: filled: bought 0.1" in page.inner_text("#order-result")


def test_narrow_screen_keeps_the_page_within_it(page: Any, fake: FakeNode) -> None:
    """At 375 px the top bar did not wrap: the page was 742 px wide, the finality badge and the
    token button off screen."""
    page.set_viewport_size({"width": 375, "height": 800})
    open_page(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    assert page.locator("#finality-badge").bounding_box()["x"] < 375


def test_cancel_buttons_name_their_order_and_no_favicon_404(page: Any, fake: FakeNode) -> None:
    open_page(page)
    button = page.locator("#open-orders tr[data-id] button")
    assert button.get_attribute("aria-label") == f"cancel buy order {'a1' * 6} at 100.5"
    assert page.locator('link[rel="icon"]').count() == 1  # (each load logged a 404 for it)


def test_a_link_to_a_market_not_followed_says_so(page: Any, fake: FakeNode) -> None:
    page.goto(f"{ORIGIN}/?symbol=NOPE#token={TOKEN}")
    page.wait_for_selector("#toasts .toast.warn")
    assert "this node does not follow NOPE; showing BTC-USD" in page.inner_text("#toasts")


def test_my_revoked_fill_is_said(page: Any, fake: FakeNode) -> None:
    open_page(page)
    page.wait_for_function("document.getElementById('conn-text').textContent === 'live'")
    fake.push(
        {"channel": "private", "type": "update", "symbol": "BTC-USD", "fills": [],
         "orders": [], "revoked": ["f1"], "became_final": []}
    )  # fmt: skip
    page.wait_for_selector("#toasts .toast.warn")
    assert "1 provisional fill of yours revoked" in page.inner_text("#toasts")
    assert page.errors == []
