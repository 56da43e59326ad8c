"""Typed errors of the core.

Everything a peer can send that the core refuses raises a subclass of :class:`InvalidOp`, with a
message a person can act on. Refusing an op never changes a replica's state.
"""

from __future__ import annotations

__all__ = [
    "BadCancel",
    "BadLamport",
    "BadParents",
    "BadSequence",
    "BadSignature",
    "BadWitness",
    "InvalidOp",
    "InvalidParent",
    "LimitExceeded",
    "MalformedOp",
    "NonCanonical",
    "OffLot",
    "OffTick",
    "PendingFull",
    "SigningWaits",
    "UnknownKind",
    "WrongMarket",
]


class InvalidOp(ValueError):
    """An op that every honest replica refuses: the verdict depends only on the op and its past."""


class MalformedOp(InvalidOp):
    """The bytes are not a well-formed crdtbook op (not CBOR, wrong shape or field types)."""


class NonCanonical(InvalidOp):
    """The op decodes but re-encoding it gives other bytes, so its id would not be unique."""


class LimitExceeded(InvalidOp):
    """A size or numeric bound of the wire format is exceeded."""


class UnknownKind(InvalidOp):
    """The body kind or protocol version is not one this implementation knows."""


class BadSignature(InvalidOp):
    """The signature does not verify against the author's key."""


class WrongMarket(InvalidOp):
    """The op belongs to another market than the replica it was given to."""


class BadParents(InvalidOp):
    """The parent list breaks a structural rule (order, duplicates, count)."""


class InvalidParent(InvalidOp):
    """A parent of the op is itself invalid, so the op can never be applied."""


class BadLamport(InvalidOp):
    """Lamport time is not exactly 1 + the largest Lamport time among the parents."""


class BadSequence(InvalidOp):
    """The author's sequence number does not follow the author's previous op among the parents."""


class BadCancel(InvalidOp):
    """A cancel whose target is not an order of the same author in the cancel's causal past."""


class BadWitness(InvalidOp):
    """A reconfiguration the witness rules refuse (not signed by a majority of the witnesses in
    force, a wrong epoch, ...), or a heartbeat asked of a key that is not a witness."""


class SigningWaits(Exception):
    """This replica holds ops of the signing key that it has not applied yet (they wait for
    parents or for history): a new op now would take a sequence number one of them has, an
    equivocation of the key. Not a verdict on anything: retry once they are applied."""


class PendingFull(Exception):
    """Kept for code that catches it; no longer raised. The bounded buffer of ops waiting for
    their parents now forgets its oldest op when full (``Replica.evicted``) instead of refusing
    the newest, so orphans that never resolve cannot hold it full for ever."""


class OffTick(ValueError):
    """A human price that is not a whole number of ticks; the message names the nearest prices."""


class OffLot(ValueError):
    """A human quantity that is not a whole number of lots; the message names the nearest ones."""
