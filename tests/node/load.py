"""Steady client load on a real node for fault tests: what was acknowledged, and what failed."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from crdtbook.node.client import ControlClient, ControlError

from .harness import NodeProcess, wait_until


def order_params(rng: random.Random) -> dict[str, Any]:
    """An order near a mid of 100 (about a third cross the other side)."""
    side = rng.choice(("buy", "sell"))
    price = rng.randint(95, 101) if side == "buy" else rng.randint(99, 105)
    return {"side": side, "price": str(price), "quantity": str(rng.randint(1, 4))}


class Load:
    """Orders, and cancels of its own resting orders (one op in five), sent to one node from a
    thread one after the other, until ``stop``. Records every acknowledged op id (orders and
    cancels) and every failure: ``(code, message)`` for a control error, ``("os", ...)`` while
    the node is down. The node may be killed and restarted under it."""

    def __init__(self, node: NodeProcess, seed: int, pause: float = 0.01) -> None:
        self.node = node
        self.rng = random.Random(seed)
        self.pause = pause
        self.acked: list[str] = []
        self.errors: list[tuple[str, str]] = []
        #: Set by a test: ``resumed`` is set by the first acknowledgement of a request sent
        #: after this monotonic time.
        self.ok_after: float | None = None
        self.resumed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        resting: list[str] = []
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with ControlClient(self.node.home, timeout=15) as client:
                    if resting and self.rng.random() < 0.2:
                        result = client.call("cancel", order_id=resting.pop(0))
                        self.acked.append(result["cancel_id"])
                    else:
                        result = client.call("submit", **order_params(self.rng))
                        self.acked.append(result["order"]["id"])
                        if result["order"]["status"] in ("open", "partially_filled"):
                            resting.append(result["order"]["id"])
                if self.ok_after is not None and started > self.ok_after:
                    self.resumed.set()
            except ControlError as exc:
                self.errors.append((exc.code, exc.message))
            except OSError as exc:  # the node is down or restarting
                self.errors.append(("os", str(exc)))
                time.sleep(0.05)
            time.sleep(self.pause)

    def wait_errors(self, code: str, count: int, timeout: float) -> None:
        wait_until(
            lambda: sum(1 for c, _ in self.errors if c == code) >= count, timeout, f"{code} errors"
        )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(20)
