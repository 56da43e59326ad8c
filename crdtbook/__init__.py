"""crdtbook: a peer-to-peer exchange order book, as a library with no networking code at all.

This package is the sans-I/O core: the op model, its canonical CBOR codec and signatures, the
causal log and the deterministic matching that derives one book from any set of ops. It has no
sockets, no clock, no threads and no randomness on the path of derivation; ``crdtbook.node`` owns
those. Everything a ``Replica`` shows is a pure function of the ops it was given.

    >>> from crdtbook import Market, Identity, Replica
    >>> market = Market("BTC-USD", tick="0.01", lot="0.0001")
    >>> alice, bob = Identity.from_seed(b"a" * 32), Identity.from_seed(b"b" * 32)
    >>> book = Replica(market)
    >>> sell = book.submit(alice, "sell", price=10000, quantity=5)
    >>> buy = book.submit(bob, "buy", price=10000, quantity=3)
    >>> [(f.price, f.quantity) for f in book.fills()]
    [(10000, 3)]
"""

from ._derive import PrefixDerivation
from ._engine import Fill
from ._errors import (
    BadCancel,
    BadLamport,
    BadParents,
    BadSequence,
    BadSignature,
    BadWitness,
    InvalidOp,
    InvalidParent,
    LimitExceeded,
    MalformedOp,
    NonCanonical,
    OffLot,
    OffTick,
    PendingFull,
    SigningWaits,
    UnknownKind,
    WrongMarket,
)
from ._finality import WitnessInfo
from ._identity import Identity
from ._limits import (
    MAX_CLIENT_TAG_BYTES,
    MAX_OP_BYTES,
    MAX_PARENTS,
    MAX_WITNESSES,
    PROTOCOL_VERSION,
    WITNESSED_VERSION,
)
from ._market import DEFAULT_MARKETS, Market
from ._ops import (
    SIDES,
    STP_MODES,
    TIFS,
    CancelBody,
    HeartbeatBody,
    Op,
    OrderBody,
    ReconfigBody,
    decode,
    encode,
    op_id,
)
from ._points import (
    DEFAULT_POINT_INTERVAL,
    HistoryCheck,
    PointInfo,
    SnapshotRefused,
    check_attested,
)
from ._replica import ApplyReport, Archive, CompactReport, Replica, RestoreReport
from ._snapshot import point_fills, read_point
from ._state import Book, Level, OrderState, RestingOrder
from ._sync import BloomFilter, SlidingBloom, ops_missing_for

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MARKETS",
    "DEFAULT_POINT_INTERVAL",
    "MAX_CLIENT_TAG_BYTES",
    "MAX_OP_BYTES",
    "MAX_PARENTS",
    "MAX_WITNESSES",
    "PROTOCOL_VERSION",
    "SIDES",
    "STP_MODES",
    "TIFS",
    "WITNESSED_VERSION",
    "ApplyReport",
    "Archive",
    "BadCancel",
    "BadLamport",
    "BadParents",
    "BadSequence",
    "BadSignature",
    "BadWitness",
    "BloomFilter",
    "Book",
    "CancelBody",
    "CompactReport",
    "Fill",
    "HeartbeatBody",
    "HistoryCheck",
    "Identity",
    "InvalidOp",
    "InvalidParent",
    "Level",
    "LimitExceeded",
    "MalformedOp",
    "Market",
    "NonCanonical",
    "OffLot",
    "OffTick",
    "Op",
    "OrderBody",
    "OrderState",
    "PendingFull",
    "PointInfo",
    "PrefixDerivation",
    "ReconfigBody",
    "Replica",
    "RestingOrder",
    "RestoreReport",
    "SigningWaits",
    "SlidingBloom",
    "SnapshotRefused",
    "UnknownKind",
    "WitnessInfo",
    "WrongMarket",
    "check_attested",
    "decode",
    "encode",
    "op_id",
    "ops_missing_for",
    "point_fills",
    "read_point",
]
