"""Points of the final prefix: where replicas compact, what witnesses attest, what a joiner trusts.

specs/finality.md section 13 is the normative text. In short:

- A **point** is the end of the first batch at which the final op count reaches a multiple of
  the point interval. Every replica that has made that batch final finds the same point.
- The **point state** is a function of the ops before the point alone (the *prefix*): the
  matched state there, the witness state, and a deterministic **kept set** of ops that later ops
  may need (heads of the prefix, every author's tip, the witnesses' latest counted heartbeats,
  the reconfigurations, the resting orders, the newest ``KEEP_RECENT_FINAL`` ops). Encoded
  canonically (``crdtbook._snapshot``), it is the same bytes on every replica: its SHA-256 is
  what a witness attests in its heartbeats.
- A joining node accepts a point state that a strict majority of the witnesses in force at the
  point attest (``check_attested``); the reconfiguration chain that says who they are is checked
  from the market's own witnesses, approval by approval. Section 8 already assumes a majority of
  each epoch is honest, so at least one honest witness vouches for the state.
- The prefix itself (the *history*) can be fetched later, op by op in total order, and checked
  against the point's chain of op ids (``HistoryCheck``): the ids are hashes of the bytes and the
  chain is attested, so no signature needs checking.

This module holds the pieces that need no replica: the incremental prefix state a replica
carries from point to point (``PrefixState``), the checks a joiner runs, and the errors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Final, NamedTuple

from ._errors import InvalidOp
from ._finality import check_approval
from ._market import Market
from ._ops import HeartbeatBody, Op, ReconfigBody, decode

__all__ = [
    "DEFAULT_POINT_INTERVAL",
    "HistoryCheck",
    "PointInfo",
    "PrefixState",
    "SnapshotRefused",
    "check_attested",
]

#: Final ops between two points. Every node of a market must use the same interval for the
#: witnesses' attestations to agree (so it is a protocol constant in practice; tests and benches
#: pass a smaller one). It bounds what a node holds beyond its live state (~0.8 KB an op: 16 MB)
#: and what a joiner must sync, verify and apply after the point it joins from (~85 us an op:
#: 1.7 s at worst; bench_memory measured 6.2-7.4 s at 50,000, 2.6 s at 20,000, against the 5 s
#: a join may take), at the cost of a compaction (~0.2 s on a node's event loop) every 20,000.
DEFAULT_POINT_INTERVAL: Final = 20_000
#: Domain of the running hash of the final ops (specs/finality.md section 6).
FINAL_CHAIN_DOMAIN: Final = b"crdtbook/final-chain/v2\x00"


class SnapshotRefused(ValueError):
    """A point state (snapshot) a joiner must not use. ``reason``:

    - ``foreign``: of another market;
    - ``damaged``: not a point state, or its checksum does not match;
    - ``unattested``: no strict majority of the witnesses in force at the point attest it (a
      forged state lands here: no honest witness signs its hash);
    - ``stale``: not the point that was asked for;
    - ``forged``: history offered for it does not chain to its op ids;
    - ``inconsistent``: its history, derived here (``crdtbook._derive``), does not give it.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class PointInfo(NamedTuple):
    """A point a replica compacted at, or a joiner read from a point state."""

    n: int  # final ops before the point
    hash: bytes  # SHA-256 of the point state's bytes: what witnesses attest
    chain: bytes  # the running hash of the n ops' ids in total order
    kept: tuple[bytes, ...]  # the kept ops' ids, sorted


class PrefixState:
    """What a replica carries from point to point about the prefix, all of it a function of
    the prefix's ops (fed in total order): each author's tip (the rule of ``Replica``'s author
    tracking), the forks in the prefix, its heads, the witnesses' latest counted heartbeats, its
    reconfigurations, its newest ops and its largest Lamport time."""

    __slots__ = ("forks", "heads", "heartbeats", "lamport", "recent", "reconfigs", "tips")

    def __init__(self) -> None:
        self.tips: dict[bytes, Op] = {}
        self.forks: dict[bytes, int] = {}
        self.heads: set[bytes] = set()
        self.heartbeats: dict[bytes, Op] = {}  # witness -> its latest counted heartbeat
        self.reconfigs: list[Op] = []
        self.recent: list[bytes] = []
        self.lamport = 0

    def extend(self, ops: list[Op], counted: Iterable[bytes], keep_recent: int) -> None:
        """Add the next ops of the prefix, in total order. ``counted``: the ids of the counted
        heartbeats among them."""
        counted = set(counted)
        tips, forks, heads = self.tips, self.forks, self.heads
        lamport = self.lamport
        for op in ops:
            author = op.author
            tip = tips.get(author)
            if tip is None:
                tips[author] = op
            else:
                if op.seq != tip.seq + 1 or tip.id not in op.parents:
                    fork = forks.get(author)
                    forks[author] = op.seq if fork is None else min(fork, op.seq)
                if op.seq > tip.seq:
                    tips[author] = op
            heads.difference_update(op.parents)
            heads.add(op.id)
            body = op.body
            if type(body) is HeartbeatBody and op.id in counted:
                latest = self.heartbeats.get(author)
                if latest is None or op.seq > latest.seq:
                    self.heartbeats[author] = op
            elif type(body) is ReconfigBody:
                self.reconfigs.append(op)
            if op.lamport > lamport:
                lamport = op.lamport
        self.lamport = lamport
        recent = self.recent + [op.id for op in ops[-keep_recent:]]
        self.recent = recent[-keep_recent:]

    def kept(self, resting: Iterable[bytes]) -> set[bytes]:
        """The kept set: the ids later ops may need, given the resting orders' ids."""
        kept = set(self.heads)
        kept.update(op.id for op in self.tips.values())
        kept.update(op.id for op in self.heartbeats.values())
        kept.update(op.id for op in self.reconfigs)
        kept.update(self.recent)
        kept.update(resting)
        return kept


def _decoded(item: Op | bytes) -> Op | None:
    if isinstance(item, Op):
        return item
    try:
        return decode(bytes(item), verify=True)
    except InvalidOp:
        return None


def check_attested(
    market: Market,
    blob: bytes,
    heartbeats: Iterable[Op | bytes],
    reconfigs: Iterable[Op | bytes],
    *,
    want: tuple[int, bytes] | None = None,
) -> PointInfo:
    """Check that a strict majority of the witnesses in force at the point attest ``blob``.

    ``heartbeats``: heartbeats that attest points (others are ignored); ``reconfigs``: the
    reconfigurations of the chain the point state names (as ops or bytes; bytes are verified
    here, ops are taken as verified). The chain is checked from the market's own witnesses:
    each reconfiguration signed by a witness of the epoch before and approved by enough others
    for a majority of it. ``want``: the ``(n, hash)`` asked for (another point is ``stale``).
    Returns the point; raises ``SnapshotRefused`` (changing nothing)."""
    from ._snapshot import read_point_fields

    info, chain_ids, current = read_point_fields(market, blob)
    if want is not None and (info.n, info.hash) != want:
        raise SnapshotRefused(
            "stale", f"asked for the point at {want[0]} ops, given the one at {info.n}"
        )
    by_id: dict[bytes, Op] = {}
    for item in reconfigs:
        op = _decoded(item)
        if op is not None and type(op.body) is ReconfigBody and op.market_id == market.id:
            by_id[op.id] = op
    witnesses: tuple[bytes, ...] = market.witnesses
    for epoch, ident in enumerate(chain_ids, 1):
        reconfig = by_id.get(ident)
        if reconfig is None:
            raise SnapshotRefused(
                "unattested", f"the reconfiguration to epoch {epoch} it names is not given"
            )
        body: ReconfigBody = reconfig.body  # type: ignore[assignment]
        approvers = {key for key, _ in body.approvals}
        if (
            body.epoch != epoch
            or reconfig.author not in witnesses
            or not approvers <= set(witnesses) - {reconfig.author}
            or 2 * (1 + len(approvers)) <= len(witnesses)
            or not all(
                check_approval(market.id, epoch, body.witnesses, key, signature)
                for key, signature in body.approvals
            )
        ):
            raise SnapshotRefused(
                "unattested", f"the reconfiguration to epoch {epoch} is not a majority's"
            )
        witnesses = body.witnesses
    if frozenset(witnesses) != current:
        raise SnapshotRefused("damaged", "its witnesses in force do not follow from its chain")
    attesters: set[bytes] = set()
    for item in heartbeats:
        op = _decoded(item)
        if op is None or op.market_id != market.id or type(op.body) is not HeartbeatBody:
            continue
        if (op.body.point, op.body.point_hash) == (info.n, info.hash) and op.author in current:
            attesters.add(op.author)
    if 2 * len(attesters) <= len(current):
        raise SnapshotRefused(
            "unattested",
            f"{len(attesters)} of the {len(current)} witnesses in force attest the point at "
            f"{info.n} ops; a strict majority is needed",
        )
    return info


class HistoryCheck:
    """Checks the prefix of a point, fed as op bytes in total order, against the point's chain
    of op ids. Cost: two SHA-256 per op, no signature check (the attested chain covers the
    bytes). Feed then ``done()``."""

    def __init__(self, info: PointInfo) -> None:
        self.info = info
        self.count = 0
        self._chain = bytes(32)

    def feed(self, raw: bytes) -> bytes:
        """The op id of ``raw`` (the next op of the prefix). Raises ``SnapshotRefused`` past
        the point's count."""
        if self.count >= self.info.n:
            raise SnapshotRefused("forged", f"history goes on past the point's {self.info.n} ops")
        ident = hashlib.sha256(raw).digest()
        self._chain = hashlib.sha256(FINAL_CHAIN_DOMAIN + self._chain + ident).digest()
        self.count += 1
        return ident

    def done(self) -> None:
        """Raise ``SnapshotRefused("forged")`` unless exactly the point's ops were fed."""
        if self.count != self.info.n or self._chain != self.info.chain:
            raise SnapshotRefused(
                "forged",
                f"history of {self.count} ops does not chain to the point's {self.info.n} ops",
            )
