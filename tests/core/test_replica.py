"""The Replica: matching rules on small hand-made books, contextual validity (forged ops signed
with ``sign_op`` directly), invalid parents, pending ops and ``missing()``, the pending bound,
wrong markets, idempotence, and the read-only views."""

from __future__ import annotations

import contextlib

import pytest
from strategies import (
    AUTHORS,
    MARKET,
    OTHER_MARKET,
    assert_invariants,
    assert_matches_reference,
    assert_scratch_equal,
)

from crdtbook import (
    BadCancel,
    BadLamport,
    BadSequence,
    BadSignature,
    CancelBody,
    Identity,
    InvalidOp,
    InvalidParent,
    Market,
    Op,
    OrderBody,
    PendingFull,
    Replica,
    SigningWaits,
    WrongMarket,
    op_id,
)
from crdtbook._ops import sign_op

ALICE, BOB, CAROL = AUTHORS[0], AUTHORS[1], AUTHORS[2]
A, B, C = ALICE.public_key, BOB.public_key, CAROL.public_key


def forge(identity, seq, lamport, parents=(), body=None, market=MARKET) -> Op:
    body = body or OrderBody("buy", 100, 1)
    ids = tuple(p.id if isinstance(p, Op) else p for p in parents)
    return sign_op(identity, market.id, seq, lamport, ids, body)


def state(replica: Replica, op: Op):
    s = replica.order(op.id)
    assert s is not None
    return s


def checked(replica: Replica) -> Replica:
    assert_invariants(replica)
    assert_matches_reference(replica)
    assert_scratch_equal(replica)
    return replica


def fills(replica: Replica):
    return [(f.taker, f.maker, f.price, f.quantity) for f in replica.fills()]


# -- matching ---------------------------------------------------------------------------------


def test_docstring_example():
    book = Replica(MARKET)
    sell = book.submit(ALICE, "sell", price=10000, quantity=5)
    buy = book.submit(BOB, "buy", price=10000, quantity=3)
    assert fills(book) == [(buy.id, sell.id, 10000, 3)]
    assert state(book, sell).status == "partially_filled"
    assert state(book, buy).status == "filled"
    checked(book)


def test_trades_at_the_resting_price_in_price_time_priority():
    r = Replica(MARKET)
    a1 = r.submit(ALICE, "sell", 101, 2)
    a2 = r.submit(BOB, "sell", 100, 2)  # better price, later
    a3 = r.submit(CAROL, "sell", 100, 2)  # same price, later still
    a4 = r.submit(ALICE, "sell", 103, 2)  # beyond the taker's limit
    taker = r.submit(AUTHORS[3], "buy", 102, 5)
    assert fills(r) == [
        (taker.id, a2.id, 100, 2),
        (taker.id, a3.id, 100, 2),
        (taker.id, a1.id, 101, 1),
    ]
    assert state(r, a1)[5:9] == (1, 1, 0, "partially_filled")
    assert state(r, taker).status == "filled"
    assert [lv.price for lv in r.book().asks] == [101, 103]
    assert r.book().bids == ()
    assert state(r, a4).status == "open"
    checked(r)


def test_sell_taker_walks_bids_from_the_highest():
    r = Replica(MARKET)
    b1 = r.submit(ALICE, "buy", 99, 1)
    b2 = r.submit(BOB, "buy", 101, 1)
    b3 = r.submit(CAROL, "buy", 100, 1)
    taker = r.submit(AUTHORS[3], "sell", 100, 5)
    assert fills(r) == [(taker.id, b2.id, 101, 1), (taker.id, b3.id, 100, 1)]
    s = state(r, taker)
    assert (s.status, s.remaining, s.filled) == ("partially_filled", 3, 2)
    assert r.book().best_ask == 100 and r.book().best_bid == 99
    assert state(r, b1).status == "open"
    checked(r)


def test_ioc_remainder_expires():
    r = Replica(MARKET)
    r.submit(ALICE, "sell", 100, 2)
    ioc = r.submit(BOB, "buy", 100, 5, "ioc")
    s = state(r, ioc)
    assert (s.status, s.reason, s.filled, s.closed, s.remaining) == (
        "expired",
        "ioc_remainder",
        2,
        3,
        0,
    )
    miss = r.submit(BOB, "buy", 90, 5, "IOC")
    assert (state(r, miss).status, state(r, miss).closed) == ("expired", 5)
    assert r.book().bids == ()
    checked(r)


def test_fok_is_all_or_nothing():
    r = Replica(MARKET)
    s1 = r.submit(ALICE, "sell", 100, 2)
    s2 = r.submit(BOB, "sell", 101, 2)
    too_big = r.submit(CAROL, "buy", 101, 5, "fok")
    assert fills(r) == []
    assert (state(r, too_big).status, state(r, too_big).reason) == ("expired", "fok_unfillable")
    assert state(r, s1).remaining == 2 and state(r, s2).remaining == 2
    beyond_limit = r.submit(CAROL, "buy", 100, 3, "fok")
    assert state(r, beyond_limit).filled == 0 and fills(r) == []
    exact = r.submit(CAROL, "buy", 101, 4, "fok")
    assert state(r, exact).status == "filled"
    assert fills(r) == [(exact.id, s1.id, 100, 2), (exact.id, s2.id, 101, 2)]
    checked(r)


def test_fok_counts_only_other_authors_liquidity():
    r = Replica(MARKET)
    own = r.submit(ALICE, "sell", 99, 3)
    other = r.submit(BOB, "sell", 100, 2)
    fok = r.submit(ALICE, "buy", 100, 3, "fok")  # 5 crossing, only 2 from others
    assert (state(r, fok).status, state(r, fok).reason) == ("expired", "fok_unfillable")
    assert state(r, own).status == "open"  # nothing at all happened
    assert fills(r) == []
    fok2 = r.submit(ALICE, "buy", 100, 2, "fok")  # others' 2 suffice: own order expires first
    assert state(r, fok2).status == "filled"
    assert (state(r, own).status, state(r, own).reason) == ("expired", "self_trade")
    assert fills(r) == [(fok2.id, other.id, 100, 2)]
    checked(r)


def test_post_only_rests_or_is_rejected():
    r = Replica(MARKET)
    r.submit(ALICE, "sell", 100, 2)
    rests = r.submit(BOB, "buy", 99, 1, "post-only")
    assert state(r, rests).status == "open"
    rejected = r.submit(BOB, "buy", 100, 1, "post_only")
    s = state(r, rejected)
    assert (s.status, s.reason, s.closed, s.filled) == ("rejected", "post_only_would_take", 1, 0)
    own_only = r.submit(ALICE, "buy", 100, 1, "post_only")  # crosses only its own order
    assert state(r, own_only).status == "rejected"
    assert fills(r) == []
    checked(r)


def test_self_trade_prevention_expires_the_maker_and_the_taker_goes_on():
    r = Replica(MARKET)
    mine1 = r.submit(ALICE, "sell", 99, 1)
    theirs = r.submit(BOB, "sell", 100, 1)
    mine2 = r.submit(ALICE, "sell", 100, 1)
    far = r.submit(BOB, "sell", 105, 1)
    taker = r.submit(ALICE, "buy", 101, 3)
    assert fills(r) == [(taker.id, theirs.id, 100, 1)]
    for maker in (mine1, mine2):
        s = state(r, maker)
        assert (s.status, s.reason, s.closed, s.remaining) == ("expired", "self_trade", 1, 0)
    s = state(r, taker)
    assert (s.status, s.filled, s.remaining) == ("partially_filled", 1, 2)
    assert r.book().best_bid == 101 and r.book().best_ask == 105
    assert state(r, far).status == "open"
    # Only own liquidity crossing: it expires, the gtc rests untouched by fills.
    r2 = Replica(MARKET)
    m = r2.submit(ALICE, "sell", 100, 2)
    t = r2.submit(ALICE, "buy", 100, 1)
    assert (state(r2, m).status, state(r2, t).status, state(r2, t).remaining) == (
        "expired",
        "open",
        1,
    )
    ioc = r2.submit(ALICE, "sell", 100, 1, "ioc")
    assert (state(r2, ioc).reason, state(r2, t).reason) == ("ioc_remainder", "self_trade")
    checked(r)
    checked(r2)


def test_self_trade_stops_once_the_taker_is_filled():
    r = Replica(MARKET)
    theirs = r.submit(BOB, "sell", 100, 2)
    mine = r.submit(ALICE, "sell", 100, 2)  # behind theirs: never reached
    taker = r.submit(ALICE, "buy", 100, 2)
    assert fills(r) == [(taker.id, theirs.id, 100, 2)]
    assert state(r, mine).status == "open"
    checked(r)


def test_cancel_removes_the_rest_and_cancelling_a_finished_order_is_a_noop():
    r = Replica(MARKET)
    order = r.submit(ALICE, "sell", 100, 5)
    r.submit(BOB, "buy", 100, 2)
    cancel = r.cancel(ALICE, order.id)
    s = state(r, order)
    assert (s.status, s.reason, s.filled, s.remaining, s.closed) == (
        "cancelled",
        "cancelled",
        2,
        0,
        3,
    )
    assert r.cancel_effective(cancel.id) is True
    assert r.book().asks == ()
    digest = r.digest()
    again = r.cancel(ALICE, order.id)
    assert r.cancel_effective(again.id) is False
    assert r.digest() == digest  # cancel effectiveness is not part of the digest
    filled = r.submit(BOB, "sell", 100, 1)
    r.submit(ALICE, "buy", 100, 1)
    noop = r.cancel(BOB, filled.id)
    assert r.cancel_effective(noop.id) is False and state(r, filled).status == "filled"
    assert r.cancel_effective(b"\x00" * 32) is None
    checked(r)


def test_a_late_concurrent_op_rederives_fills():
    """Two replicas sign concurrently; the op that sorts first takes the liquidity everywhere."""
    r1, r2 = Replica(MARKET), Replica(MARKET)
    maker = r1.submit(ALICE, "sell", 100, 1)
    r2.apply(maker.raw)
    t1 = r1.submit(BOB, "buy", 100, 1)
    t2 = r2.submit(CAROL, "buy", 100, 1)
    assert t1.lamport == t2.lamport == 2
    first, second = sorted((t1, t2), key=lambda o: o.id)
    r1.apply(t2.raw)
    r2.apply(t1.raw)
    for r in (r1, r2):
        assert fills(r) == [(first.id, maker.id, 100, 1)]
        assert state(r, second).status == "open"
        checked(r)
    assert r1.digest() == r2.digest()


# -- contextual validity: each typed error changes nothing -------------------------------------


def refused(replica: Replica, op: Op, error: type[InvalidOp]) -> None:
    digest, size, heads, version = replica.digest(), len(replica), replica.heads(), replica.version
    with pytest.raises(error):
        replica.apply(op.raw)
    assert (replica.digest(), len(replica), replica.heads(), replica.version) == (
        digest,
        size,
        heads,
        version,
    )
    assert op.id not in replica and replica.is_invalid(op.id) and replica.knows(op.id)
    # A resend is refused the same way, as bytes or as an Op.
    with pytest.raises(error):
        replica.apply(op.raw)
    with pytest.raises(error):
        replica.apply(op)
    report = replica.apply_many([op.raw])
    assert report.applied == [] and [type(e) for _, e in report.invalid] == [error]
    assert replica.digest() == digest


@pytest.fixture
def base():
    """Alice sells 5 @ 100 (seq 1), Bob buys 1 @ 100 (seq 1), Alice buys 1 @ 90 (seq 2)."""
    r = Replica(MARKET)
    a1 = r.submit(ALICE, "sell", 100, 5)
    b1 = r.submit(BOB, "buy", 100, 1)
    a2 = r.submit(ALICE, "buy", 90, 1)
    return r, a1, b1, a2


def test_bad_lamport(base):
    r, a1, b1, a2 = base
    assert (a1.lamport, b1.lamport, a2.lamport) == (1, 2, 3)
    for lamport in (1, 2, 5, 2**40):
        refused(r, forge(BOB, 2, lamport, (b1, a2)), BadLamport)
    refused(r, forge(CAROL, 1, 2, ()), BadLamport)  # no parents: Lamport must be 1
    r.apply(forge(CAROL, 1, 4, (a2,)).raw)  # the right value is accepted


def test_bad_sequence(base):
    r, a1, b1, a2 = base
    refused(r, forge(ALICE, 1, 4, (a2,)), BadSequence)  # seq 1 with an own parent
    refused(r, forge(ALICE, 3, 3, (b1,)), BadSequence)  # seq 3 without an own parent
    refused(r, forge(ALICE, 4, 4, (a2,)), BadSequence)  # own parent has seq 2, not 3
    refused(r, forge(ALICE, 3, 2, (a1,)), BadSequence)  # own parent has seq 1, not 2
    refused(r, forge(BOB, 3, 4, (a2, b1)), BadSequence)  # skips seq 2
    # Merging two own branches: exactly one own parent is allowed.
    fork = forge(ALICE, 2, 2, (a1,), OrderBody("sell", 120, 1))
    r.apply(fork.raw)  # an equivocation: valid by itself
    refused(r, forge(ALICE, 3, 4, (a2, fork)), BadSequence)


def test_bad_cancels(base):
    r, a1, b1, a2 = base
    # Another author's order.
    refused(r, forge(BOB, 2, 4, (a2, b1), CancelBody(a1.id)), BadCancel)
    # An id that names nothing applied.
    refused(r, forge(ALICE, 3, 4, (a2,), CancelBody(b"\x07" * 32)), BadCancel)
    # A cancel naming a cancel.
    cancel = r.cancel(ALICE, a2.id)
    refused(r, forge(ALICE, 4, cancel.lamport + 1, (cancel,), CancelBody(cancel.id)), BadCancel)
    # An order of the same author that is applied but not in the cancel's causal past: Carol's
    # concurrent first op names Carol's order.
    c_order = r.submit(CAROL, "buy", 80, 1)
    assert c_order.seq == 1
    refused(r, forge(CAROL, 1, 1, (), CancelBody(c_order.id)), BadCancel)
    refused(
        r,
        forge(CAROL, 1, c_order.lamport, tuple(c_order.parents), CancelBody(c_order.id)),
        BadCancel,
    )
    # Replica.cancel refuses to sign such cancels at all.
    with pytest.raises(BadCancel):
        r.cancel(BOB, a1.id)
    with pytest.raises(BadCancel):
        r.cancel(ALICE, b"\x01" * 32)
    with pytest.raises(BadCancel):
        r.cancel(ALICE, cancel.id)
    checked(r)


def test_cancel_across_an_equivocation_fork_is_refused_even_through_another_author():
    """Alice forks at seq 1 (x and y). Bob's op descends from x; Alice's cancel on branch y has
    x in its causal past through Bob, but x is not on y's own-author chain: refused."""
    r = Replica(MARKET)
    x = forge(ALICE, 1, 1, (), OrderBody("sell", 110, 1))
    y = forge(ALICE, 1, 1, (), OrderBody("sell", 111, 1))
    r.apply(x.raw)
    r.apply(y.raw)
    bob = forge(BOB, 1, 2, (x,))
    r.apply(bob.raw)
    refused(r, forge(ALICE, 2, 3, (bob, y), CancelBody(x.id)), BadCancel)
    ok = forge(ALICE, 2, 3, (bob, y), CancelBody(y.id))  # y is on its own chain
    assert r.apply(ok.raw) == [ok]
    assert r.cancel_effective(ok.id) is True
    # And from branch x, after a deeper own chain, the same holds the other way.
    x2 = forge(ALICE, 2, 3, (bob, x), OrderBody("buy", 10, 1))
    assert r.apply(x2.raw) == [x2]
    refused(r, forge(ALICE, 3, 4, (x2,), CancelBody(y.id)), BadCancel)
    refused(r, forge(ALICE, 3, 4, (x2, ok), CancelBody(y.id)), BadSequence)  # two own parents
    fine = forge(ALICE, 3, 4, (x2,), CancelBody(x.id))
    assert r.apply(fine.raw) == [fine]
    checked(r)


def test_wrong_market_is_refused_and_changes_nothing(base):
    r = base[0]
    alien = forge(ALICE, 1, 1, (), market=OTHER_MARKET)
    digest, size = r.digest(), len(r)
    with pytest.raises(WrongMarket):
        r.apply(alien.raw)
    with pytest.raises(WrongMarket):
        r.apply(alien)
    assert (r.digest(), len(r), r.pending_count) == (digest, size, 0)
    assert Replica(OTHER_MARKET).apply(alien.raw) == [alien]


def test_bad_signature_bytes_are_refused_and_change_nothing(base):
    r = base[0]
    op = forge(CAROL, 1, 1)
    bad = op.raw[:-1] + bytes([op.raw[-1] ^ 0x80])
    digest, size = r.digest(), len(r)
    for _ in range(2):
        with pytest.raises(BadSignature):
            r.apply(bad)
    report = r.apply_many([bad, op.raw])
    assert report.applied == [op] and len(report.invalid) == 1
    assert isinstance(report.invalid[0][1], BadSignature)
    assert len(r) == size + 1 and r.digest() != digest


# -- invalid parents, pending ops, missing(), the pending bound --------------------------------


def bad_lamport_root() -> Op:
    return forge(ALICE, 1, 5, (), OrderBody("sell", 100, 1))  # Lamport must be 1


def test_child_of_a_known_invalid_op_is_refused():
    r = Replica(MARKET)
    bad = bad_lamport_root()
    with pytest.raises(BadLamport):
        r.apply(bad.raw)
    child = forge(BOB, 1, 6, (bad,))
    with pytest.raises(InvalidParent):
        r.apply(child.raw)
    grandchild = forge(CAROL, 1, 7, (child,))
    with pytest.raises(InvalidParent):
        r.apply(grandchild.raw)
    assert len(r) == 0 and r.pending_count == 0 and r.missing() == []


def test_pending_descendants_of_an_op_found_invalid_are_dropped():
    r = Replica(MARKET)
    bad = bad_lamport_root()
    child = forge(BOB, 1, 6, (bad,))
    grandchild = forge(CAROL, 1, 7, (child,))
    assert r.apply(grandchild.raw) == [] and r.apply(child.raw) == []
    assert r.pending_count == 2 and r.missing() == [bad.id]
    with pytest.raises(BadLamport):
        r.apply(bad.raw)
    assert r.pending_count == 0 and r.missing() == [] and len(r) == 0
    assert r.is_invalid(child.id) and r.is_invalid(grandchild.id)
    with pytest.raises(InvalidParent):
        r.apply(child.raw)


def test_pending_op_whose_parent_is_refused_as_invalid_parent_is_dropped():
    """G is refused (bad Lamport). C waits for P. P arrives: refused at once as InvalidParent
    (its parent G is known invalid). C can never be applied: it must not stay pending, and P,
    which the replica has seen and refused, must not be listed by missing() (a sync loop would
    fetch and refuse it for ever)."""
    r = Replica(MARKET)
    g = bad_lamport_root()
    p = forge(ALICE, 2, 6, (g,))
    c = forge(BOB, 1, 7, (p,))
    with pytest.raises(BadLamport):
        r.apply(g.raw)
    assert r.apply(c.raw) == [] and r.missing() == [p.id]
    with pytest.raises(InvalidParent):
        r.apply(p.raw)
    assert r.is_invalid(p.id)
    assert p.id not in r.missing()
    assert r.pending_count == 0
    assert r.is_invalid(c.id)


def test_pending_op_whose_parent_bytes_are_refused_never_applies():
    """A parent that fails the stateless checks: its child can never be applied (spec 5.2 lets
    it stay pending or be refused), and a resend of the bad bytes is refused again."""
    good = forge(ALICE, 1, 1)
    bad_raw = good.raw[:-1] + bytes([good.raw[-1] ^ 1])
    child = forge(BOB, 1, 2, (op_id(bad_raw),))
    for first, second in ((bad_raw, child.raw), (child.raw, bad_raw)):
        r = Replica(MARKET)
        for raw in (first, second):
            with contextlib.suppress(InvalidOp):
                r.apply(raw)
        assert len(r) == 0 and child.id not in r
        with pytest.raises(BadSignature):
            r.apply(bad_raw)


def test_missing_never_lists_an_id_the_replica_refused():
    """If the replica remembers that it refused some bytes (it may, spec 5.2), it must not keep
    asking peers for that id through missing(): a sync loop would fetch and refuse it for ever."""
    good = forge(ALICE, 1, 1)
    bad_raw = good.raw[:-1] + bytes([good.raw[-1] ^ 1])
    child = forge(BOB, 1, 2, (op_id(bad_raw),))
    r = Replica(MARKET)
    assert r.apply(child.raw) == [] and r.missing() == [op_id(bad_raw)]
    with pytest.raises(BadSignature):
        r.apply(bad_raw)
    if r.is_invalid(op_id(bad_raw)):
        assert r.missing() == []
        assert r.pending_count == 0


def test_pending_ops_are_released_when_parents_arrive():
    src = Replica(MARKET)
    ops = [src.submit(AUTHORS[i % 3], ("buy", "sell")[i % 2], 100 + i % 3, 1 + i) for i in range(6)]
    r = Replica(MARKET)
    for op in reversed(ops[1:]):
        assert r.apply(op.raw) == []
    assert r.pending_count == 5 and len(r) == 0
    assert r.missing() == [ops[0].id]  # pending ops are not listed, only the absent root
    assert not r.knows(ops[0].id) and r.knows(ops[3].id) and ops[3].id not in r
    released = r.apply(ops[0].raw)
    assert released == ops  # the op first, then what it released, in causal order
    assert r.pending_count == 0 and r.missing() == []
    assert r.digest() == src.digest() and r.heads() == src.heads()
    checked(r)


def test_missing_lists_every_absent_parent():
    r0 = Replica(MARKET)
    a = r0.submit(ALICE, "sell", 100, 1)
    r1 = Replica(MARKET)
    b = r1.submit(BOB, "buy", 90, 1)
    r0.apply(b.raw)
    merge = r0.submit(CAROL, "buy", 95, 1)
    assert set(merge.parents) == {a.id, b.id}
    r = Replica(MARKET)
    r.apply(merge.raw)
    assert r.missing() == sorted([a.id, b.id])
    r.apply(b.raw)
    assert r.missing() == [a.id] and r.pending_count == 1
    assert r.apply(a.raw) == [a, merge]
    assert r.missing() == []


def test_full_pending_buffer_forgets_its_oldest_op():
    src = Replica(MARKET)
    root = src.submit(ALICE, "sell", 100, 1)
    children = [src.submit(AUTHORS[i], "buy", 90, 1) for i in range(1, 5)]
    r = Replica(MARKET, max_pending=2)
    assert r.apply(children[-1].raw) == []
    assert r.apply(children[-2].raw) == []
    digest = r.digest()
    assert r.apply(children[0].raw) == []  # kept; the longest waiting one is forgotten
    assert r.pending_count == 2 and r.evicted == 1 and r.digest() == digest
    assert not r.knows(children[-1].id) and r.knows(children[0].id)
    assert r.take_evicted() == [children[-1].id] and r.take_evicted() == []
    # A forgotten op is no verdict: offered again (as sync does), it is taken like any other.
    assert r.apply(root.raw)[0] == root
    assert r.apply_many([c.raw for c in children]).applied != []
    assert len(r) == 5 and r.pending_count == 0 and r.digest() == src.digest()
    assert not issubclass(PendingFull, InvalidOp)


def test_a_forgotten_pending_parent_is_listed_missing_again():
    src = Replica(MARKET)
    a = src.submit(ALICE, "sell", 100, 1)
    b = src.submit(BOB, "buy", 90, 1)  # parent: a
    c = src.submit(ALICE, "sell", 101, 1)  # parents: b (and a)
    r = Replica(MARKET, max_pending=1)
    r.apply(b.raw)  # waits for a
    r.apply(c.raw)  # waits for b, which waits for a: b is forgotten
    assert r.evicted == 1 and r.is_pending(c.id) and not r.knows(b.id)
    assert b.id in r.missing()
    r.apply(a.raw)
    r.apply(b.raw)
    assert len(r) == 3 and r.digest() == src.digest()


# -- idempotence and reports ------------------------------------------------------------------


def test_apply_is_idempotent_and_reports_what_it_did():
    src = Replica(MARKET)
    ops = [src.submit(AUTHORS[i % 2], ("buy", "sell")[i % 2], 100, 1) for i in range(4)]
    r = Replica(MARKET)
    report = r.apply_many(
        [ops[2].raw, ops[0].raw, ops[0].raw, ops[0], ops[1].raw, bad_lamport_root().raw]
    )
    assert report.applied == [ops[0], ops[1], ops[2]]
    assert report.pending == 1 and report.duplicates == 2
    assert [(i, type(e)) for i, e in report.invalid] == [(bad_lamport_root().id, BadLamport)]
    version = r.version
    assert r.apply(ops[1].raw) == [] and r.apply(ops[1]) == [] and r.version == version
    assert r.apply_many([ops[2].raw]).duplicates == 1
    assert r.apply(ops[3]) == [ops[3]] and r.version == version + 1
    assert r.digest() == src.digest()


def test_submit_refuses_bad_arguments():
    r = Replica(MARKET)
    for kwargs in (
        {"side": "long", "price": 1, "quantity": 1},
        {"side": "buy", "price": 0, "quantity": 1},
        {"side": "buy", "price": 1, "quantity": -1},
        {"side": "buy", "price": 1.0, "quantity": 1},
        {"side": "buy", "price": True, "quantity": 1},
        {"side": "buy", "price": 1, "quantity": 1, "tif": "day"},
    ):
        with pytest.raises(ValueError):
            r.submit(ALICE, **kwargs)
    assert len(r) == 0
    with pytest.raises(InvalidOp):
        r.submit(ALICE, "buy", 1, 1, tag="x" * 33)
    assert len(r) == 0


# -- views ------------------------------------------------------------------------------------


def test_views():
    r = Replica(MARKET)
    asks = [r.submit(ALICE, "sell", p, 2, tag=f"a{p}") for p in (103, 101, 102, 101)]
    bids = [r.submit(BOB, "buy", p, 1) for p in (97, 99, 98)]
    taker = r.submit(CAROL, "buy", 101, 3)
    book = r.book()
    assert [(lv.price, lv.quantity, len(lv.orders)) for lv in book.asks] == [
        (101, 1, 1),
        (102, 2, 1),
        (103, 2, 1),
    ]
    assert [lv.price for lv in book.bids] == [99, 98, 97]
    assert r.book(depth=1).asks == book.asks[:1] and r.book(depth=0).bids == ()
    assert book.asks[0].orders[0].order_id == asks[3].id
    assert r.fill_count == 2 and r.fills(1) == r.fills()[1:]
    assert [o.id for o in r.orders()] == [op.id for op in r.ops()]
    assert [o.id for o in r.orders(B)] == [b.id for b in bids]
    o = r.order(asks[0].id)
    assert (o.author, o.side, o.price, o.quantity, o.tif, o.tag, o.lamport) == (
        A,
        "sell",
        103,
        2,
        "gtc",
        "a103",
        asks[0].lamport,
    )
    assert r.order(b"\x00" * 32) is None
    assert r.heads() == [taker.id] and r.get(taker.id) == taker and taker.id in r
    assert list(r.iter_ops(2)) == r.ops()[2:]
    assert len(r) == 8 and "ops=8" in repr(r)
    checked(r)


def test_pending_ops_refused_once_judged_are_listed_for_the_caller():
    """An op that waited for its parent and is refused when the parent arrives (the parent lies
    about its Lamport time) is in no ApplyReport of a later call: take_refused_pending lists
    it, so a node that stored it while it waited can drop it and count the refusal."""
    parent = sign_op(ALICE, MARKET.id, 1, 5, (), OrderBody("sell", 100, 1))  # must be 1
    child = sign_op(BOB, MARKET.id, 1, 6, (parent.id,), OrderBody("buy", 90, 1))
    r = Replica(MARKET)
    assert r.apply(child.raw) == [] and r.is_pending(child.id)
    assert r.take_refused_pending() == []
    with pytest.raises(BadLamport):
        r.apply(parent.raw)
    assert r.take_refused_pending() == [child.id] and r.take_refused_pending() == []
    assert not r.is_pending(child.id) and r.is_invalid(child.id) and len(r) == 0


def test_a_key_never_signs_at_a_sequence_number_it_holds_unapplied():
    """A node restarted with its own later ops waiting (for parents, or for history it had
    pruned) signed its next op at the sequence number after its last *applied* one: a second
    op at a number its peers held, an equivocation that stalled finality for good and turned
    final fills provisional again. The replica says so (check_can_sign), and a node asks it
    before it signs as itself."""
    market = Market.parse("DEMO:1:1")
    me, other = Identity.from_seed(b"m" * 32), Identity.from_seed(b"o" * 32)
    full = Replica(market)
    theirs = full.submit(other, "sell", 100, 1)
    mine = [full.submit(me, "sell", 101, 1), full.submit(me, "sell", 102, 1)]
    restarted = Replica(market)
    for op in mine:  # both wait for `theirs`
        assert restarted.apply(op.raw) == []
    with pytest.raises(SigningWaits, match="up to sequence 2"):
        restarted.check_can_sign(me.public_key)
    restarted.check_can_sign(other.public_key)  # no op of that key waits here
    restarted.apply(theirs.raw)  # the parent arrives: all three apply
    restarted.check_can_sign(me.public_key)
    assert restarted.submit(me, "buy", 91, 1).seq == 3
    assert not restarted.forked_authors()


def test_a_key_that_forked_can_still_sign_once_nothing_is_held():
    """Compared with the op last in the total order, a key that had equivocated (its latest
    op at a lower seq than its highest) looked as if it held unapplied ops for ever."""
    market = Market.parse("DEMO:1:1")
    me = Identity.from_seed(b"f" * 32)
    left, right = Replica(market), Replica(market)
    branch_a = [left.submit(me, "sell", 101 + i, 1) for i in range(3)]  # seqs 1-3
    other = Identity.from_seed(b"g" * 32)
    for _ in range(5):
        right.submit(other, "sell", 200, 1)  # a higher Lamport time for the next op
    branch_b = right.submit(me, "sell", 150, 1)  # seq 1 again: the fork
    joined = Replica(market)
    for op in reversed(branch_a):  # child first: parked, then applied
        joined.apply(op.raw)
    joined.apply_many(op.raw for op in right.ops())
    assert branch_b.id in {op.id for op in joined.ops()}
    assert me.public_key in joined.forked_authors() and joined.pending_count == 0
    joined.check_can_sign(me.public_key)  # nothing held: it may sign
