"""node/publish_schedule.py: when an outbox goes out, as a pure function of the times given."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdtbook.node import publish_schedule as ps
from crdtbook.node.publish_schedule import next_publish, publish_interval, publish_period

DELAY = 0.002


def near(instant: float) -> object:
    """Equal to ``instant`` within a microsecond (pytest.approx's default tolerance is relative:
    a second, at wall-clock magnitudes)."""
    return pytest.approx(instant, rel=0, abs=1e-6)


def on_grid(instant: float, period: float) -> bool:
    """Whether a wall-clock instant is a whole multiple of the period (to float precision)."""
    k = round(instant / period)
    return math.isclose(instant, k * period, rel_tol=0, abs_tol=1e-6)


def test_the_interval_follows_the_topic_peers_between_its_bounds() -> None:
    assert publish_interval(4) == pytest.approx(4 * ps.PUBLISH_INTERVAL_PER_PEER)
    assert publish_interval(0) == ps.PUBLISH_INTERVAL_MIN
    assert publish_interval(10_000) == ps.PUBLISH_INTERVAL_MAX


def test_the_period_is_shorter_while_the_loop_has_time_to_spare() -> None:
    assert publish_period(0.08, spare=False) == 0.08
    assert publish_period(0.08, spare=True) == pytest.approx(0.08 * ps.PUBLISH_SPARE_FRACTION)
    assert publish_period(0.4, spare=True) == pytest.approx(0.25)
    # Never below the least interval, unless the interval itself is (set by configuration).
    assert publish_period(0.06, spare=True) == ps.PUBLISH_INTERVAL_MIN
    assert publish_period(0.01, spare=True) == 0.01


def test_an_idle_outbox_goes_out_after_the_flush_delay() -> None:
    for last in (-math.inf, 0.0, 9.92):  # never, long ago, exactly an interval ago (+delay)
        at = next_publish(
            now=10.0, last=last, interval=0.08, period=0.06, wall=5e8, flush_delay=DELAY
        )
        assert at == 10.0 + DELAY


def test_a_busy_outbox_goes_out_at_the_next_multiple_of_the_period_on_the_wall_clock() -> None:
    def wall_instant(last: float) -> float:
        # The trio clock reads 10.0 when the wall clock reads 1000.013 (1000.02 is a multiple
        # of 0.06); the interval is 80 ms, the period 60.
        at = next_publish(
            now=10.0, last=last, interval=0.08, period=0.06, wall=1000.013, flush_delay=DELAY
        )
        return 1000.013 + (at - 10.0)

    assert wall_instant(9.96) == near(1000.02)  # the last message 40 ms ago
    # 10 ms ago: 1000.02 would be 17 ms after it, less than half a period, so 1000.08.
    assert wall_instant(9.99) == near(1000.08)


def test_off_the_grid_a_busy_outbox_waits_a_period_after_the_last_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    at = next_publish(
        now=10.0,
        last=9.99,
        interval=0.08,
        period=0.08,
        wall=1000.013,
        flush_delay=DELAY,
        on_grid=False,
    )
    assert at == pytest.approx(9.99 + 0.08)
    monkeypatch.setattr(ps, "SHARED_GRID", False)  # the A/B switch: off the grid everywhere
    at = next_publish(
        now=10.0, last=9.99, interval=0.08, period=0.06, wall=1000.013, flush_delay=DELAY
    )
    assert at == pytest.approx(9.99 + 0.06)


times = st.floats(min_value=0.0, max_value=1e4, allow_nan=False)
offsets = st.floats(min_value=1e8, max_value=2e9, allow_nan=False)  # wall minus trio time
intervals = st.sampled_from([0.05, 0.06, 0.08, 0.2, 0.4, 1.0])


@given(
    now=times, since=st.floats(0.0, 2.0), interval=intervals, spare=st.booleans(), offset=offsets
)
def test_a_busy_publish_is_on_the_grid_and_never_early(
    now: float, since: float, interval: float, spare: bool, offset: float
) -> None:
    period = publish_period(interval, spare)
    last = now - since
    at = next_publish(
        now=now, last=last, interval=interval, period=period, wall=now + offset, flush_delay=DELAY
    )
    assert at >= now + DELAY - 1e-9
    if last + interval <= now + DELAY:
        assert at == now + DELAY
        return
    assert at >= last + period / 2 - 1e-9
    assert at < max(now + DELAY, last + period / 2) + period + 1e-9
    assert on_grid(at + offset, period)


@given(
    start=times,
    steps=st.lists(st.tuples(st.floats(0.0, 0.3), st.floats(-5.0, 5.0)), min_size=1, max_size=30),
    interval=intervals,
    offset=offsets,
)
def test_a_busy_node_publishes_at_most_once_per_instant_and_once_per_period(
    start: float, steps: list[tuple[float, float]], interval: float, offset: float
) -> None:
    """A node whose outbox fills again ``gap`` after each message: successive messages are at
    least a period apart while its wall clock holds (both on the grid), and at least half a
    period apart whatever it does: here it may jump by up to 5 s either way between messages
    (an NTP step), which can cost the sharing, never the bound."""
    period = publish_period(interval, spare=True)
    last, now, sent = -math.inf, start, []
    for gap, jump in steps:
        at = next_publish(
            now=now,
            last=last,
            interval=interval,
            period=period,
            wall=now + offset,
            flush_delay=DELAY,
        )
        sent.append((at, offset))
        last, now, offset = at, at + gap, offset + jump
    for (a, offset_a), (b, offset_b) in itertools.pairwise(sent):
        assert b - a >= period / 2 - 1e-9
        if offset_a == offset_b and on_grid(a + offset_a, period) and on_grid(b + offset_b, period):
            assert b - a >= period - 1e-6


@given(
    cell=st.integers(10**10, 3 * 10**10),
    clocks=st.lists(st.tuples(times, st.floats(0.0, 0.03)), min_size=2, max_size=5),
)
def test_busy_nodes_whose_earliest_instants_share_a_period_publish_at_one_instant(
    cell: int, clocks: list[tuple[float, float]]
) -> None:
    """Nodes with different trio clocks but one wall clock, each busy (last message 10 ms ago)
    and each getting an op within the same 30 ms, 55 ms before a multiple of the period: their
    earliest instants (20 ms on) all fall before it, so all publish at it."""
    period = 0.06
    instant = cell * period
    wall = instant - 0.055
    for trio_now, late in clocks:
        now = trio_now + late
        at = next_publish(
            now=now,
            last=now - 0.01,
            interval=0.08,
            period=period,
            wall=wall + late,
            flush_delay=DELAY,
        )
        assert wall + late + (at - now) == near(instant)
