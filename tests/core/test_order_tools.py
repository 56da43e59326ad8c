"""Version 2's order tools: self-trade modes, client order ids, cancel-all (specs/finality.md
section 12). The engine is checked against the naive reference matcher (``reference.py``) on
random witnessed logs, including late ops that rewind through cancel-alls, and restores."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import replay_in_order

from crdtbook import Identity, Market, Replica, decode
from crdtbook._ops import CancelAllBody, OrderBody, sign_op

WITNESSES = [Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3)]
ALICE, BOB, CAROL = (Identity.from_seed(bytes([i]) * 32) for i in (20, 21, 22))
MARKET = Market("TOOLS", "1", "1", witnesses=[w.public_key for w in WITNESSES])
PLAIN = Market("TOOLS", "1", "1")


def state_of(replica: Replica) -> tuple[object, ...]:
    orders = {o.id: (o.status, o.reason, o.remaining, o.filled, o.closed) for o in replica.orders()}
    fills = [(f.taker, f.maker, f.price, f.quantity) for f in replica.fills()]
    book = [
        [(lv.price, [(r.order_id, r.remaining) for r in lv.orders]) for lv in side]
        for side in replica.book()
    ]
    return orders, fills, book


def reference_state(replica: Replica) -> tuple[object, ...]:
    ref = replay_in_order(replica.ops(), client_ids=True)
    orders = {
        o.id: (o.status, o.reason, o.remaining, o.filled, o.closed) for o in ref.orders.values()
    }
    fills = [(f.taker, f.maker, f.price, f.quantity) for f in ref.fills]
    book = [
        [(price, list(orders_)) for price, _, orders_ in ref.levels(side)]
        for side in ("buy", "sell")
    ]
    return orders, fills, book


# -- self-trade modes --------------------------------------------------------------------------


def test_expire_maker_is_the_default_and_version_1s_rule() -> None:
    r = Replica(MARKET)
    ask = r.submit(ALICE, "sell", 100, 5)
    buy = r.submit(ALICE, "buy", 100, 3)
    assert r.order(ask.id).status == "expired" and r.order(ask.id).reason == "self_trade"
    assert r.order(buy.id).status == "open" and r.order(buy.id).remaining == 3


def test_expire_taker_stops_the_taker_at_its_own_order() -> None:
    r = Replica(MARKET)
    other = r.submit(BOB, "sell", 99, 2)
    own = r.submit(ALICE, "sell", 100, 5)
    buy = r.submit(ALICE, "buy", 101, 6, stp="expire_taker")
    taker = r.order(buy.id)
    assert (taker.status, taker.reason, taker.filled, taker.closed) == (
        "expired", "self_trade", 2, 4
    )
    assert r.order(other.id).status == "filled"
    assert r.order(own.id).status == "open" and r.order(own.id).remaining == 5


def test_expire_both_expires_maker_and_taker() -> None:
    r = Replica(MARKET)
    own = r.submit(ALICE, "sell", 100, 5)
    buy = r.submit(ALICE, "buy", 100, 3, stp="expire-both")
    assert r.order(own.id).reason == "self_trade" and r.order(own.id).remaining == 0
    assert r.order(buy.id).status == "expired" and r.order(buy.id).closed == 3
    assert r.book().asks == () and r.book().bids == ()


def test_fok_with_expire_taker_counts_only_liquidity_ahead_of_its_own_order() -> None:
    r = Replica(MARKET)
    r.submit(BOB, "sell", 99, 2)
    own = r.submit(ALICE, "sell", 100, 5)
    r.submit(CAROL, "sell", 101, 10)
    fok = r.submit(ALICE, "buy", 101, 4, tif="fok", stp="expire_taker")
    assert r.order(fok.id).reason == "fok_unfillable" and r.fills() == ()
    assert r.order(own.id).status == "open"  # all or nothing: nothing happened
    fok2 = r.submit(ALICE, "buy", 101, 2, tif="fok", stp="expire_both")
    assert r.order(fok2.id).status == "filled" and r.order(own.id).status == "open"


def test_markets_without_witnesses_have_only_expire_maker() -> None:
    with pytest.raises(ValueError, match="witnessed"):
        Replica(PLAIN).submit(ALICE, "buy", 1, 1, stp="expire_taker")
    with pytest.raises(ValueError, match="witnessed"):
        Replica(PLAIN).cancel_all(ALICE)
    with pytest.raises(ValueError, match="self-trade mode"):
        Replica(MARKET).submit(ALICE, "buy", 1, 1, stp="sometimes")


# -- client order ids --------------------------------------------------------------------------


def test_client_ids_are_unique_per_author() -> None:
    r = Replica(MARKET)
    first = r.submit(ALICE, "buy", 90, 1, tag="grid-1")
    r.submit(BOB, "buy", 90, 1, tag="grid-1")  # another author: its own namespace
    with pytest.raises(ValueError, match="already used"):
        r.submit(ALICE, "buy", 91, 1, tag="grid-1")
    assert r.order_by_client_id(ALICE.public_key, "grid-1").id == first.id
    # Signed by hand (as a peer could): rejected by matching, deterministically, changing nothing.
    parents = {first.id, *r.heads()}
    lamport = 1 + max(r.get(p).lamport for p in parents)
    body = OrderBody("sell", 90, 1, tag="grid-1")
    dup = sign_op(ALICE, MARKET.id, 2, lamport, tuple(parents), body, 2)
    before = r.book()
    r.apply(dup)
    assert r.order(dup.id).status == "rejected" and r.order(dup.id).reason == "duplicate_client_id"
    assert r.book() == before
    assert r.order_by_client_id(ALICE.public_key, "grid-1").id == first.id


# -- cancel-all ---------------------------------------------------------------------------------


def test_cancel_all_cancels_every_resting_order_of_its_author() -> None:
    r = Replica(MARKET)
    mine = [r.submit(ALICE, "buy", 90 + i, 1, tag=f"g{i}") for i in range(3)]
    ask = r.submit(ALICE, "sell", 200, 1)
    theirs = r.submit(BOB, "buy", 95, 1)
    c = r.cancel_all(ALICE)
    assert r.cancelled_by(c.id) == 4 and r.cancel_effective(c.id) is True
    assert all(r.order(o.id).status == "cancelled" for o in (*mine, ask))
    assert r.order(theirs.id).status == "open"
    again = r.cancel_all(ALICE)
    assert r.cancelled_by(again.id) == 0 and r.cancel_effective(again.id) is False


def test_cancel_all_by_client_id_prefix() -> None:
    r = Replica(MARKET)
    grid = [r.submit(ALICE, "buy", 90 + i, 1, tag=f"grid-{i}") for i in range(3)]
    keep = r.submit(ALICE, "buy", 80, 1, tag="hedge-1")
    untagged = r.submit(ALICE, "buy", 81, 1)
    c = r.cancel_all(ALICE, prefix="grid-")
    assert r.cancelled_by(c.id) == 3
    assert {r.order(o.id).status for o in grid} == {"cancelled"}
    assert r.order(keep.id).status == "open" and r.order(untagged.id).status == "open"


def test_cancel_all_round_trips_the_codec() -> None:
    r = Replica(MARKET)
    c = r.cancel_all(ALICE, "x")
    assert decode(c.raw) == c and decode(c.raw).body == CancelAllBody("x")
    plain_orders = sign_op(ALICE, MARKET.id, 9, 9, (), OrderBody("buy", 1, 1, stp="expire_both"), 2)
    assert decode(plain_orders.raw).body.stp == "expire_both"


# -- against the reference, with late ops and restores -------------------------------------------

KEYS = [ALICE, BOB, CAROL]


def random_log(seed: int, steps: int) -> tuple[list[Replica], list[object]]:
    rnd = random.Random(seed)
    replicas = [Replica(MARKET) for _ in WITNESSES]
    for _ in range(steps):
        r = rnd.randrange(len(replicas))
        replica = replicas[r]
        roll = rnd.random()
        who = rnd.choice(KEYS)
        try:
            if roll < 0.55:
                side = rnd.choice(("buy", "sell"))
                replica.submit(
                    who,
                    side,
                    rnd.randint(97, 103),
                    rnd.randint(1, 4),
                    rnd.choice(("gtc", "gtc", "ioc", "fok", "post_only")),
                    tag=rnd.choice((None, None, f"a{rnd.randrange(4)}", f"b{rnd.randrange(4)}")),
                    stp=rnd.choice(("expire_maker", "expire_taker", "expire_both")),
                )
            elif roll < 0.65:
                replica.cancel_all(who, rnd.choice((None, "a", "b")))
            elif roll < 0.75:
                resting = [o for o in replica.orders(who.public_key) if o.remaining]
                if resting:
                    replica.cancel(who, rnd.choice(resting).id)
            elif roll < 0.85:
                replica.heartbeat(WITNESSES[r])
            else:
                other = replicas[rnd.randrange(len(replicas))]
                ops = other.ops()
                rnd.shuffle(ops)
                replica.apply_many(ops[: rnd.randint(0, len(ops))])
        except ValueError:
            pass  # a duplicate client id refused at authoring: fine
    return replicas, []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**6))
def test_engine_equals_reference_on_witnessed_logs(seed: int) -> None:
    replicas, _ = random_log(seed, 60)
    for replica in replicas:
        assert state_of(replica) == reference_state(replica)
    # Exchange everything (late ops rewind through cancel-alls and self-trades): still equal,
    # equal to each other, and a restore from a checkpoint equals the live replica.
    everything = [op for r in replicas for op in r.ops()]
    for replica in replicas:
        replica.apply_many(everything)
        assert state_of(replica) == reference_state(replica)
    assert len({r.digest() for r in replicas}) == 1
    live = replicas[0]
    raws = [op.raw for op in live.ops()]
    random.Random(seed).shuffle(raws)
    restored = Replica.restore(MARKET, raws, live.checkpoint(), verify=False)
    assert restored.digest() == live.digest()
    assert state_of(restored) == state_of(live)


def test_resting_reached_names_the_orders_a_price_reaches_in_priority() -> None:
    """What a node asks on every submit, instead of building the book: the resting orders an
    order would reach (one author's, if asked), best price first, then time priority."""
    from crdtbook import Identity, Market, Replica

    alice, bob = Identity.from_seed(b"A" * 32), Identity.from_seed(b"B" * 32)
    r = Replica(Market("RR", "1", "1"))
    a1 = r.submit(alice, "sell", 101, 1)
    b1 = r.submit(bob, "sell", 100, 1)
    a2 = r.submit(alice, "sell", 100, 2)
    r.submit(alice, "sell", 103, 1)
    bid = r.submit(bob, "buy", 90, 1)
    assert r.resting_reached("buy", 101) == [b1.id, a2.id, a1.id]
    assert r.resting_reached("buy", 101, alice.public_key) == [a2.id, a1.id]
    assert r.resting_reached("buy", 99) == []
    assert r.resting_reached("sell", 90) == [bid.id]
    r.cancel(alice, a2.id)
    assert r.resting_reached("buy", 100) == [b1.id]


def test_fill_changes_since_names_the_lowest_fill_a_rewind_took_back() -> None:
    """A watcher compares only the fills from the lowest index a rewind took back."""
    from crdtbook import Identity, Market, Replica
    from crdtbook._ops import OrderBody, sign_op

    alice, bob, carol = (Identity.from_seed(bytes([c]) * 32) for c in b"abc")
    market = Market("FC", "1", "1")
    r = Replica(market)
    _, token = r.fill_changes_since(None)
    r.submit(alice, "sell", 100, 5)
    r.submit(bob, "buy", 100, 1)
    r.submit(bob, "buy", 100, 1)
    assert r.fill_count == 2
    changed, token = r.fill_changes_since(token)
    assert changed is None  # only appended
    # A late op (Lamport 1, sorting before both takers) takes the fills back and redoes them.
    body = OrderBody("buy", 100, 1, "gtc", None, "expire_maker")
    late = sign_op(carol, market.id, 1, 1, (), body, market.version)
    r.apply(late)
    changed, token = r.fill_changes_since(token)
    assert changed == 0 and r.fill_count == 3
    assert r.fill_changes_since(token) == (None, token)
    assert r.fill_changes_since(None)[0] == 0
