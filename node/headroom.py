"""Whether this node's event loop has time to spare: the gate on work that buys latency with CPU.

Early publishing (``publish_schedule.PUBLISH_SPARE_FRACTION``) makes a busy node's publish
period shorter than its interval. That cuts the latency of a busy five-node market (session 8's
first form, a message per 6 ops: p99 183-188 -> 79-88 ms at 500 ops/s, bench/README.md #12),
but every message costs every node a few tenths of a millisecond to read, so near capacity it
costs throughput (five nodes on two cores, ungated: ~1,750 -> ~1,300-1,500 ops/s). So it is on only
while the event loop is mostly idle, and off once it is busier, with a gap between the two
bounds so that the switch itself does not make the load swing across one bound.

What is measured is the loop's **busy time in wall-clock terms**: a window's length less the
time the loop spent waiting for I/O (trio's ``before_io_wait`` / ``after_io_wait``, so
:class:`LoopHeadroom` is a trio instrument the node registers). The process's CPU time would not
do: on a machine whose cores are all taken (five nodes on two cores, say), a node's CPU share
stays low however far behind it falls (a first gate on it never tripped in the bench). Busy time
shows contention only in part (a node whose socket became readable, waiting for a core, is still
in its I/O wait), hence low bounds. Nothing here touches derived state: when a message leaves
changes when peers see ops, never what they derive from them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

import trio

__all__ = ["EARLY_PUBLISH_BUSY_OFF", "EARLY_PUBLISH_BUSY_ON", "HEADROOM_WINDOW", "LoopHeadroom"]

#: Spare again once the loop was busy less than this fraction of a window. Measured, five nodes
#: on two shared cores with early publishing on: busy 0.3-0.48 at 500 ops/s, 0.4-0.8 at 1,500.
#: With bounds 0.5 / 0.75 early publishing stayed on at 1,500 ops/s and p99 there rose 249 ->
#: 387 ms; with 0.35 / 0.5 it is 249 -> 226 ms, and 500 ops/s keeps its gain (p99 79 ms).
EARLY_PUBLISH_BUSY_ON: Final = 0.35
#: No longer spare once busy more than this (a node near its capacity, as far as it can tell).
EARLY_PUBLISH_BUSY_OFF: Final = 0.5
#: Seconds each verdict looks back on: short, so that a node turns early publishing off within
#: a fraction of a second of a load it cannot carry with it (a backlog built meanwhile lasts).
HEADROOM_WINDOW: Final = 0.25


class LoopHeadroom(trio.abc.Instrument):
    """Tracks how much of each ``window`` seconds the event loop spent outside its I/O wait,
    closing a window at the first I/O wait that ends after it; :attr:`spare` is the verdict
    of the last closed window (busy below ``on`` turns it on, above ``off`` turns it off,
    between keeps the last answer). Starts spare; never changes unless registered as a trio
    instrument (the node does). ``now`` is a clock in seconds (tests pass their own)."""

    def __init__(
        self,
        *,
        on: float = EARLY_PUBLISH_BUSY_ON,
        off: float = EARLY_PUBLISH_BUSY_OFF,
        window: float = HEADROOM_WINDOW,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < on <= off < 1:
            raise ValueError(f"need 0 < on <= off < 1, not on={on} off={off}")
        if window <= 0:
            raise ValueError(f"window must be > 0, not {window}")
        self._on, self._off, self._window, self._now = on, off, window, now
        self._start = now()
        self._idle = 0.0  # seconds of I/O wait in this window
        self._wait_began: float | None = None
        #: Whether the loop has time to spare (the last closed window's verdict).
        self.spare = True
        #: The busy fraction of the last closed window (None before the first).
        self.last_busy: float | None = None

    def before_io_wait(self, timeout: float) -> None:
        self._wait_began = self._now()

    def after_io_wait(self, timeout: float) -> None:
        began, self._wait_began = self._wait_began, None
        if began is None:
            return
        now = self._now()
        self._idle += now - began
        elapsed = now - self._start
        if elapsed < self._window:
            return
        # A long wait (an idle node) closes a long window: mostly idle, as it was.
        busy = max(0.0, 1.0 - self._idle / elapsed)
        self.last_busy = busy
        if busy > self._off:
            self.spare = False
        elif busy < self._on:
            self.spare = True
        self._start, self._idle = now, 0.0
