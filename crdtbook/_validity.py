"""Validity rules that need an op's causal past, in one place.

The rules that need only the op itself (shape, bounds, canonical form, signature) are checked by
``_ops.decode``. The ones here run once every parent of the op is applied, and read nothing but
the op and its ancestors, so every replica reaches the same verdict on it (specs/protocol.md,
"Validity").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ._errors import BadCancel, BadLamport, BadSequence
from ._ops import CancelBody, Op, OrderBody

__all__ = ["check_in_context", "on_own_chain", "own_parent"]


def own_parent(op: Op, applied: Mapping[bytes, Op]) -> Op | None:
    """The parent by the op's own author (there is at most one in a valid op)."""
    for parent_id in op.parents:
        parent = applied[parent_id]
        if parent.author == op.author:
            return parent
    return None


def check_in_context(
    op: Op,
    applied: Mapping[bytes, Op],
    unique_at_seq: Callable[[bytes, int], bool],
) -> bool:
    """Judge ``op`` given its parents: raise an :class:`InvalidOp` subclass unless it is valid.

    Args:
        op: the op.
        applied: every applied op by id.
        unique_at_seq: whether the author has only one applied op at that sequence number
            (false only if the author equivocated); lets the cancel rule skip a walk.

    Returns:
        True: valid. False: some parent is not in ``applied``, so no verdict yet.
    """
    # One pass over the parents (this runs for every op): are they all here, the largest
    # Lamport time, and the parents by the op's own author.
    top = 0
    own: Op | None = None
    own_count = 0
    author = op.author
    try:
        for parent_id in op.parents:
            parent = applied[parent_id]
            if parent.lamport > top:
                top = parent.lamport
            if parent.author == author:
                own = parent
                own_count += 1
    except KeyError:
        return False

    # Lamport time: exactly one more than the largest parent's.
    if op.lamport != top + 1:
        raise BadLamport(
            f"Lamport time is {op.lamport} but must be {top + 1} (1 + the largest among parents)"
        )

    # Author sequence: seq 1 has no parent of its own author; seq n > 1 has exactly one, seq n-1.
    seq = op.seq
    if seq == 1:
        if own_count:
            raise BadSequence("an author's first op (seq 1) cannot have a parent by its author")
    elif own_count != 1 or own is None or own.seq != seq - 1:
        raise BadSequence(
            f"op with seq {seq} must have exactly one parent by its author, with seq {seq - 1}"
        )

    body = op.body
    if type(body) is CancelBody:
        _check_cancel(op, body, own, applied, unique_at_seq)
    return True


def _check_cancel(
    op: Op,
    body: CancelBody,
    own: Op | None,
    applied: Mapping[bytes, Op],
    unique_at_seq: Callable[[bytes, int], bool],
) -> None:
    """The target is an order by the same author on the cancel's own author chain (``own`` is
    the cancel's parent by its author).

    Our rule is: following the own-author parent from the cancel, repeatedly, must reach the
    order. For an author that never equivocated this is exactly "the order is in the cancel's
    causal past"; for one that did, it is the stricter, still deterministic, reading.
    """
    try:
        target: Op | None = applied[body.order_id]  # indexing: a compacted order comes back
    except KeyError:
        target = None
    if target is None:
        raise BadCancel(
            f"cancel names order {body.order_id.hex()[:16]}, which is not in its causal past"
        )
    if type(target.body) is not OrderBody:
        raise BadCancel("a cancel must name an order, not another cancel")
    if target.author != op.author:
        raise BadCancel("only an order's author can cancel it")
    if target.seq >= op.seq:
        raise BadCancel("a cancel must come after the order it cancels in its author's sequence")
    if not on_own_chain(own, target, applied, unique_at_seq):
        raise BadCancel("the order is not on the cancel's own author chain (equivocating author)")


def on_own_chain(
    start: Op | None,
    target: Op,
    applied: Mapping[bytes, Op],
    unique_at_seq: Callable[[bytes, int], bool],
) -> bool:
    """Is ``target`` ``start`` or reached from it by following own-author parents?"""
    if start is None or start.author != target.author or start.seq < target.seq:
        return False
    if unique_at_seq(target.author, target.seq):
        # The whole chain below start is applied; a single op at that seq must be the chain's.
        return True
    step: Op | None = start
    while step is not None and step.seq > target.seq:
        step = own_parent(step, applied)
    return step is not None and step.id == target.id
