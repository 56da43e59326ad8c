"""The web view on two real nodes (issue #11): node processes on 127.0.0.1, each serving its API
and page with ``--http`` on a free port, both witnesses of one market. A sell placed on node B's
page reaches node A's page; a buy placed on node A's page fills it, and the fill appears on node
B's page (its trades, its fills and its open order's remainder), provisional first, then final
once both witnesses acknowledge it. Screenshots of both pages go to build/artifacts/.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from crdtbook.node.app import load_or_create_identity

from ..node.harness import NodeProcess, wait_until
from .support import WAIT_MS, screenshot

#: Bound on the node processes coming up and connecting (they take about a second here).
UP_WITHIN = 30.0

pytestmark = pytest.mark.timeout(180)


class HttpNode(NodeProcess):
    """A harness node started by ``crdtbook node ... --http 127.0.0.1:0``: it serves the HTTP
    API and the web view on a free port, which it names in its start-up lines."""

    def command(self) -> list[str]:
        return [*super().command(), "--http", "127.0.0.1:0"]

    @property
    def url(self) -> str:
        log = self.log_path.read_text(errors="replace")  # (the line is near its start)
        found = re.search(r"http api and web view on (http://127\.0\.0\.1:\d+)/", log)
        if found is None:
            raise AssertionError(f"the node did not say where it serves HTTP:\n{self.log()}")
        return found.group(1)

    def token(self) -> str:
        return (self.home / "http.token").read_text().strip()

    def serving(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/api/v1/markets", timeout=10) as res:
                return bool(json.loads(res.read()))
        except (OSError, AssertionError):
            return False


@contextmanager
def two_nodes(tmp_path: Path, absent_witness: bool = False) -> Iterator[tuple[HttpNode, HttpNode]]:
    """Nodes A and B, both witnesses of BTC-USD (with ``absent_witness``, so is a third key whose
    node never runs: nothing there becomes final), A serving, B bootstrapped from A."""
    homes = [tmp_path / "a", tmp_path / "b", tmp_path / "absent"]
    keys = []
    for home in homes if absent_witness else homes[:2]:
        home.mkdir(mode=0o700)
        identity, _ = load_or_create_identity(home)
        keys.append(identity.public_key.hex())
    spec = "BTC-USD:0.01:0.001:" + ",".join(keys)
    started: list[HttpNode] = []
    try:
        a = HttpNode(homes[0], market=spec)
        started.append(a)
        a.start()
        b = HttpNode(homes[1], [a.addr], market=spec)
        started.append(b)
        b.start()
        wait_until(lambda: a.peers() >= 1 and b.peers() >= 1, UP_WITHIN, "the nodes connected")
        wait_until(lambda: a.serving() and b.serving(), UP_WITHIN, "both serving HTTP")
        yield a, b
    finally:
        for node in started:
            node.stop()


def open_node_page(browser: Any, node: HttpNode) -> Any:
    tab = browser.new_page()
    tab.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.errors = errors
    tab.goto(f"{node.url}/#token={node.token()}")
    tab.wait_for_selector("#conn.live")
    tab.wait_for_selector("#open-orders tr")  # the private snapshot arrived (or "no open orders")
    tab.wait_for_function("document.getElementById('node-id').textContent.startsWith('12D3')")
    return tab


def place(tab: Any, side: str, amount: str, price: str) -> str:
    tab.check(f'#order-form input[value="{side}"]', force=True)
    tab.check('#order-form input[value="limit"]', force=True)
    tab.fill('[data-testid="price"]', price)
    tab.fill('[data-testid="amount"]', amount)
    tab.click('[data-testid="submit"]')
    tab.wait_for_function(
        "document.querySelector('#order-result').textContent.startsWith('order ')"
        " || document.querySelector('#order-result').classList.contains('error')"
    )
    return str(tab.inner_text("#order-result"))


def test_order_on_node_a_fills_on_node_b_page(browser: Any, tmp_path: Path) -> None:
    with two_nodes(tmp_path) as (a, b):
        trade_on_two_pages(browser, a, b)


def trade_on_two_pages(browser: Any, a: HttpNode, b: HttpNode) -> None:
    page_a = open_node_page(browser, a)
    page_b = open_node_page(browser, b)
    try:
        assert page_a.inner_text("#node-id") == a.peer_id  # each page shows its own node
        assert page_b.inner_text("#node-id") == b.peer_id

        # B rests a sell from its page; it reaches A's ladder over gossip and the book stream.
        result = place(page_b, "sell", "0.5", "100.25")
        assert "resting: 0.500 @ 100.25" in result, result  # (amounts in lots of 0.001)
        page_b.wait_for_selector('#open-orders tr[data-id] >> text="100.25"')
        page_a.wait_for_selector('#asks .level[data-price="100.25"]')

        # A buys from its page: it takes 0.2 of B's sell.
        result = place(page_a, "buy", "0.2", "100.25")
        assert "filled: bought 0.200" in result, result

        # B's page shows the fill: in the public trades, in its own fills (as maker), and its
        # order's remainder; A's page shows the same trade.
        page_b.wait_for_selector('#trades tr[data-id] >> text="100.25"')
        trade_b = page_b.locator("#trades tr[data-id]").first
        assert "0.200" in trade_b.inner_text()
        page_b.wait_for_selector('#asks .level[data-price="100.25"] >> text="0.300"')
        assert page_b.inner_text('#asks .level[data-price="100.25"]').split()[:3] == [
            "100.25",
            "0.300",
            "0.300",  # the total, at the market's precision
        ]
        page_b.wait_for_selector('#open-orders tr[data-id] >> text="0.200"')  # filled so far
        page_b.click('.tab[data-tab="fills"]')
        page_b.wait_for_selector('#my-fills tr[data-id] >> text="sell (maker)"')
        page_a.wait_for_selector('#trades tr[data-id] >> text="100.25"')

        # Both nodes are the market's witnesses: the trade becomes final on both pages.
        page_b.wait_for_selector("#trades tr.final[data-id]")
        page_a.wait_for_selector("#trades tr.final[data-id]")
        page_a.wait_for_selector("#order-result .fin")  # A's outcome line follows its fill
        assert "final" in page_b.inner_text("#trades tr[data-id] td.state")
        page_b.wait_for_function(
            "['final', 'pending'].includes(document.getElementById('finality-badge').textContent)"
        )
        peers = page_b.inner_text("#peers")
        assert a.peer_id in peers

        shot_a = screenshot(page_a, "web-node-a-after-buy")
        shot_b = screenshot(page_b, "web-node-b-fill-arrived")
        assert shot_a.stat().st_size > 0 and shot_b.stat().st_size > 0
        assert page_a.errors == [] and page_b.errors == []
    finally:
        page_a.close()
        page_b.close()


def test_provisional_while_a_witness_is_missing(browser: Any, tmp_path: Path) -> None:
    """A third witness never runs: the same trade shows on both pages as provisional, the
    market as stalled on that witness, and nothing turns final."""
    with two_nodes(tmp_path, absent_witness=True) as (a, b):
        page_a = open_node_page(browser, a)
        page_b = open_node_page(browser, b)
        try:
            assert "resting" in place(page_b, "sell", "0.5", "100.25")
            page_a.wait_for_selector('#asks .level[data-price="100.25"].provisional')
            assert "filled" in place(page_a, "buy", "0.2", "100.25")
            page_b.wait_for_selector('#trades tr.provisional[data-id] >> text="100.25"')
            assert "provisional" in page_b.inner_text("#trades tr[data-id] td.state")
            assert "provisional" in page_a.inner_text("#order-result")
            page_b.wait_for_function(
                "document.getElementById('finality-badge').textContent === 'stalled'"
            )
            assert "stalled" in page_b.inner_text("#witnesses")
            assert page_b.locator("#trades tr.final").count() == 0
            screenshot(page_b, "web-node-b-provisional-stalled")
            assert page_a.errors == [] and page_b.errors == []
        finally:
            page_a.close()
            page_b.close()
