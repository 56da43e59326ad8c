"""When a market's gossip outbox goes out: the publish schedule, a pure function of times.

The flush loop (``NodeService.flush_loop``) asks :func:`next_publish` when to send the ops its
outbox holds, and sleeps until then; nothing here sleeps or reads a clock (the caller passes
its trio time and the wall clock), so the schedule is tested without either.

- **Idle**: once the last message is an interval old, an op goes out after ``flush_delay`` (it
  waits that long for company: ops submitted together leave together).
- **Busy**: at most one message per *period*. The period is the interval,
  ``PUBLISH_INTERVAL_PER_PEER`` per peer on the topic, so that the network's message rate stays
  near a fixed budget as it grows, and a message goes out a period after the last.
- **Busy with time to spare** (``node/headroom.py``): the period is ``PUBLISH_SPARE_FRACTION``
  of the interval, for latency, and messages go out only at the instants that are whole
  multiples of the period on the wall clock. Every such node with the same period (the same
  number of peers on the topic) so publishes at the same instants, and each reader takes its
  peers' messages in one wake-up instead of one each. A node with time to spare sleeps between
  events, and each wake-up runs cold (its caches refilled after the other processes ran);
  sharing them is what this buys (bench/README.md, issue #12, session 11). A node without time
  to spare has no sleep to share (five saturated nodes reached the same throughput either way,
  within the noise), so it keeps its own phase. Nodes whose clocks disagree lose only the
  sharing: each still publishes once per period.

Nothing here touches derived state: when a message leaves changes when peers see ops, never what
they derive from them.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "PUBLISH_INTERVAL_MAX",
    "PUBLISH_INTERVAL_MIN",
    "PUBLISH_INTERVAL_PER_PEER",
    "PUBLISH_SPARE_FRACTION",
    "SHARED_GRID",
    "next_publish",
    "publish_interval",
    "publish_period",
]

#: Under load a node publishes at most one gossip message per market per interval (idle, an op
#: goes out at once; busy, batches grow instead of the message rate). The interval is this much
#: per peer on the topic, so the whole network's message rate stays near a fixed budget
#: (~1 / PUBLISH_INTERVAL_PER_PEER, here ~50 msg/s) as it grows: each message costs each node
#: a copy to read (one, with flood publishing and reached lists: node/p2p_pubsub.py). An op
#: waits up to one interval before it leaves, so the interval is most of the latency: 80 ms with
#: 5 nodes, 380 ms with 20. Measured with reached lists (bench_scale.py --nodes 20 --rates 100,
#: arms alternating, bench/README.md #12 session 9): 40 / 30 / 20 ms per peer gave 20 nodes p99
#: 912-915 / 654-718 / 461-526 ms at 0.62-0.64 / 0.56-0.68 / 0.74-0.89 ms of CPU per op per
#: node. Before reached lists a copy cost each node 2.5-3x more and 20 ms did not pay: 40 / 30 /
#: 25 ms gave 20 nodes p99 1.0-1.4 / 1.2-3.0 / 4.2-4.5 s (two cores saturated).
PUBLISH_INTERVAL_PER_PEER: Final = 0.02
#: The shortest interval and period (a topic of one or two peers).
PUBLISH_INTERVAL_MIN: Final = 0.05
PUBLISH_INTERVAL_MAX: Final = 1.0
#: While the loop has time to spare, the period is this fraction of the interval: 50 ms with 5
#: nodes. Measured there at 500 ops/s (bench_network.py --only latency, arms alternating, load
#: 1-2.5, bench/README.md #12 session 11): 50 ms on the shared grid p99 87-88 ms; 60 ms (3/4)
#: p99 89-100 ms, too close to the 100 ms target on a loaded machine; the same periods each on
#: its own phase 76-85 ms, at 6-15% more CPU per op (within-run A/B). It replaces session 8's
#: early publishing (a message as soon as 6 ops waited, at least 50 ms after the last: p99
#: 73-79 ms), whose messages followed each node's own op rate and so could not share instants.
PUBLISH_SPARE_FRACTION: Final = 0.625
#: A spare node's busy messages go out at the wall clock's multiples of the period (False: a
#: period after the last message, each node on its own phase; for A/B runs:
#: CRDTBOOK_BENCH_UNALIGNED=1).
SHARED_GRID = True


def publish_interval(topic_peers: int) -> float:
    """The interval for a topic with ``topic_peers`` peers (seconds)."""
    per_peer = PUBLISH_INTERVAL_PER_PEER * topic_peers
    return min(PUBLISH_INTERVAL_MAX, max(PUBLISH_INTERVAL_MIN, per_peer))


def publish_period(interval: float, spare: bool) -> float:
    """The busy period for ``interval``: shorter while the loop has time to spare, never below
    ``PUBLISH_INTERVAL_MIN`` (unless the interval itself is, by configuration)."""
    if not spare or interval <= PUBLISH_INTERVAL_MIN:
        return interval
    return max(PUBLISH_INTERVAL_MIN, interval * PUBLISH_SPARE_FRACTION)


def next_publish(
    *,
    now: float,
    last: float,
    interval: float,
    period: float,
    wall: float,
    flush_delay: float,
    on_grid: bool = True,
) -> float:
    """When (in the caller's clock, whose time is ``now``) an outbox that has just become
    non-empty goes out, given the last message at ``last`` and the wall clock at ``wall``.

    Idle (``last`` an interval old): ``now + flush_delay``. Busy: the first multiple of
    ``period`` on the wall clock that is at least ``flush_delay`` away and at least half a
    period after the last message (so a node never publishes twice at one instant, nor twice
    within half a period when it comes out of idle); not ``on_grid``, a period after the last
    message.
    """
    soonest = now + flush_delay
    if last + interval <= soonest or period <= 0:
        return soonest
    if not (on_grid and SHARED_GRID):
        return max(soonest, last + period)
    at = max(soonest, last + period / 2)
    return at + (-(wall + (at - now))) % period
