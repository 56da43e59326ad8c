"""node/headroom.py: the gate on early publishing, fed I/O waits on a clock the test drives, and
once as a real trio instrument."""

from __future__ import annotations

import pytest
import trio

from crdtbook.node.headroom import LoopHeadroom


class Loop:
    """A clock and a headroom to feed: ``run`` some seconds of a loop ``busy`` that much."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.headroom = LoopHeadroom(on=0.3, off=0.5, window=1.0, now=lambda: self.wall)

    def run(self, seconds: float, busy: float, waits: int = 10) -> None:
        end = self.wall + seconds + 1e-9  # past the window's end despite rounding
        for i in range(waits):
            self.wall += seconds * busy / waits
            self.headroom.before_io_wait(1.0)
            self.wall = end if i == waits - 1 else self.wall + seconds * (1 - busy) / waits
            self.headroom.after_io_wait(1.0)


def test_spare_until_a_window_shows_more_than_the_upper_bound() -> None:
    loop = Loop()
    assert loop.headroom.spare and loop.headroom.last_busy is None
    loop.run(0.5, busy=0.9)  # half a window: no verdict yet
    assert loop.headroom.spare and loop.headroom.last_busy is None
    loop.run(0.5, busy=0.9)
    assert not loop.headroom.spare
    assert loop.headroom.last_busy == pytest.approx(0.9)


def test_between_the_bounds_the_last_verdict_holds() -> None:
    loop = Loop()
    loop.run(1.0, busy=0.4)
    assert loop.headroom.spare  # spare before, between the bounds: still spare
    loop.run(1.0, busy=0.6)
    assert not loop.headroom.spare
    loop.run(1.0, busy=0.4)
    assert not loop.headroom.spare  # not spare before, between the bounds: still not
    loop.run(1.0, busy=0.2)
    assert loop.headroom.spare and loop.headroom.last_busy == pytest.approx(0.2)


def test_a_long_idle_wait_is_one_idle_window() -> None:
    """An idle node's loop waits seconds at a time: the window that wait closes is idle, so a
    node becomes spare again as soon as its load goes."""
    loop = Loop()
    loop.run(1.0, busy=0.9)
    assert not loop.headroom.spare
    loop.run(10.0, busy=0.01, waits=1)
    assert loop.headroom.spare and loop.headroom.last_busy == pytest.approx(0.01)


def test_unregistered_it_stays_spare() -> None:
    """Only I/O waits move it (a node that did not register it publishes as if spare)."""
    wall = [0.0]
    headroom = LoopHeadroom(window=1.0, now=lambda: wall[0])
    wall[0] = 100.0
    assert headroom.spare and headroom.last_busy is None


@pytest.mark.parametrize(
    ("on", "off", "window"), [(0.0, 0.5, 1.0), (0.6, 0.5, 1.0), (0.3, 1.0, 1.0), (0.3, 0.5, 0)]
)
def test_bounds_must_make_sense(on: float, off: float, window: float) -> None:
    with pytest.raises(ValueError):
        LoopHeadroom(on=on, off=off, window=window)


async def test_a_registered_headroom_sees_a_busy_loop_and_an_idle_one() -> None:
    """Real trio, real clock, short windows: a loop that keeps running tasks is busy (its I/O
    waits are zero-timeout polls); one asleep is not."""
    headroom = LoopHeadroom(on=0.3, off=0.5, window=0.05)
    trio.lowlevel.add_instrument(headroom)
    try:
        await trio.sleep(0.06)
        assert headroom.spare
        with trio.move_on_after(0.15):
            while True:
                await trio.lowlevel.checkpoint()
        assert not headroom.spare and headroom.last_busy is not None
        assert headroom.last_busy > 0.5
        await trio.sleep(0.15)
        assert headroom.spare and headroom.last_busy < 0.3
    finally:
        trio.lowlevel.remove_instrument(headroom)
