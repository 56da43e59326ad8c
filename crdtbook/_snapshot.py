"""The point state: a compacted replica's state at a point, as canonical bytes.

``Replica.compact`` (witnessed markets) compacts at points only (``crdtbook._points``) and keeps
in memory the matched state at the point (resting orders only), the *kept* ops and everything
after the point. The point state records exactly that, by reference to op ids, and nothing that
depends on what else a replica holds: every replica that compacted at a point has the same
bytes, and witnesses attest their SHA-256. It serves twice:

- a **restart**: the node hands ``from_snapshot`` the blob, every op it did not mark compacted
  (the kept ones and all after the point) and its store as the archive;
- a **join**: a new node checks the blob against the witnesses' attestations
  (``check_attested``), gets the kept ops and the ops after the point from peers, and starts
  from there without the history (``from_snapshot(..., history=False)``).

Format (canonical CBOR map; ``sha256`` over the map without it)::

    {"format": "crdtbook/snapshot", "version": 2, "market": bytes(32),
     "counts": [ops, fills, orders, largest Lamport time, placement of the point's batch],
     "chain": bytes(32) (the running hash of the prefix's op ids),
     "kept": [[id, placement], ...] (sorted), "heads": [id, ...] (the prefix's heads),
     "tips": [[author, id], ...], "forks": [[author, seq], ...],
     "recent": [id, ...] (the newest kept prefix ops, in total order),
     "witnessing": {"chain": [reconfig ids], "current": [keys], "added": [[key, lamport]],
                    "cut": [[key, seq]], "proven": [[key, seq]], "forks_seen": [[key, seq]],
                    "latest": [[key, heartbeat id]]},
     "engine": {"orders": [[id, remaining, filled, state], ...] (resting, in number order),
                "levels": [[side, price, [numbers]], ...], "client_ids": [[author, tag, n]]},
     "sha256": bytes(32)}

Trust: a restart trusts its own store (the checksum catches a damaged file); a join trusts the
witnesses' attestations of the blob's hash. Every reference is checked either way, so a bad
blob raises ``ValueError`` and never leaves a half-built replica in use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import cbor2

from ._engine import PARTIALLY_FILLED, Engine, _Level
from ._errors import InvalidOp
from ._finality import UNPLACED
from ._market import Market
from ._ops import HeartbeatBody, Op, OrderBody, ReconfigBody, decode
from ._points import PointInfo, PrefixState, SnapshotRefused

if TYPE_CHECKING:
    from ._replica import Replica

__all__ = [
    "FORMAT",
    "VERSION",
    "encode_point",
    "engine_fields",
    "point_fills",
    "read_fields",
    "read_point",
    "restore_snapshot",
]

FORMAT: Final = "crdtbook/snapshot"
VERSION: Final = 2


def _checksum(fields: dict[str, Any]) -> bytes:
    return hashlib.sha256(cbor2.dumps(fields, canonical=True)).digest()


def _pairs(mapping: dict[bytes, int]) -> list[list[Any]]:
    return sorted([k, v] for k, v in mapping.items())


def encode_point(
    replica: Replica,
    prefix: PrefixState,
    counts: tuple[int, int, int, int, int],
    chain: bytes,
    kept: dict[bytes, int],
    base: Engine,
) -> bytes:
    """The point state of ``replica`` compacting at a point: ``counts`` (ops, fills, orders,
    largest Lamport time, placement of the point's batch), the prefix's ``chain``, the kept ops
    with their placements and the matched state there. Only the prefix enters (never what the
    replica holds after it), so every replica at this point writes the same bytes."""
    fin = replica._fin
    assert fin is not None
    frozen = counts[4]
    # The witness state as of the prefix: the reconfigurations of the chain in force placed in
    # it (a prefix of the chain: each one has the one before in its past), and what they did.
    chain_ops = [r for r in fin.reconfigs if fin.placement.get(r.id, UNPLACED) <= frozen]
    witnesses = fin.genesis
    added: dict[bytes, int] = {}
    cut: dict[bytes, int] = {}
    for reconfig in chain_ops:
        body: ReconfigBody = reconfig.body  # type: ignore[assignment]
        for key in set(witnesses) - set(body.witnesses):
            cut[key] = fin.cut[key]
        for key in set(body.witnesses) - set(witnesses):
            added[key] = reconfig.lamport
        witnesses = body.witnesses
    latest = prefix.heartbeats
    engine = engine_fields(base)
    witnessing = {
        "chain": [op.id for op in chain_ops],
        "current": sorted(witnesses),
        "added": _pairs(added),
        "cut": _pairs(cut),
        "proven": _pairs({k: latest[k].seq for k in added if k in latest}),
        "forks_seen": _pairs(
            {k: s for k, s in prefix.forks.items() if k in fin.genesis or k in added}
        ),
        "latest": sorted([k, op.id] for k, op in latest.items()),
    }
    fields: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "market": replica.market.id,
        "counts": list(counts),
        "chain": chain,
        "kept": sorted([i, p] for i, p in kept.items()),
        "heads": sorted(prefix.heads),
        "tips": sorted([a, op.id] for a, op in prefix.tips.items()),
        "forks": _pairs(prefix.forks),
        "recent": list(prefix.recent),
        "witnessing": witnessing,
        "engine": engine,
    }
    fields["sha256"] = _checksum(fields)
    return bytes(cbor2.dumps(fields, canonical=True))


def engine_fields(base: Engine) -> dict[str, Any]:
    """The point state's ``engine`` field of a compacted engine (resting orders only)."""
    return {
        "orders": [
            [base.ids[n], base.remaining[n], base.filled[n], base.states[n]]
            for n in range(len(base.ids))
        ],
        "levels": [
            [side, price, list(level)]
            for side in (0, 1)
            for price, level in sorted(base.levels[side].items())
        ],
        "client_ids": sorted(
            [author, tag, number] for (author, tag), number in (base.client_ids or {}).items()
        ),
    }


def read_fields(market: Market, blob: bytes) -> dict[str, Any]:
    """The checked fields of a point state of ``market`` (``SnapshotRefused`` for a blob that
    is none)."""
    return _read(blob, market.id)


def _read(blob: bytes, market_id: bytes) -> dict[str, Any]:
    try:
        fields = cbor2.loads(blob)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise SnapshotRefused("damaged", f"not CBOR: {exc}") from exc
    if not isinstance(fields, dict) or fields.get("format") != FORMAT:
        raise SnapshotRefused("damaged", "not a crdtbook point state")
    if fields.get("version") != VERSION:
        raise SnapshotRefused("damaged", f"version {fields.get('version')!r} is not {VERSION}")
    if fields.get("market") != market_id:
        raise SnapshotRefused("foreign", "a point state of another market")
    checksum = fields.pop("sha256", None)
    if checksum != _checksum(fields):
        raise SnapshotRefused("damaged", "its checksum does not match")
    wrong = _shape_error(fields)
    if wrong:
        raise SnapshotRefused("damaged", f"{wrong} is missing or of the wrong type")
    return fields


def _is_id(value: object) -> bool:
    return type(value) is bytes and len(value) == 32


def _is_uint(value: object) -> bool:
    return type(value) is int and 0 <= value < 2**64


def _all(value: object, *item: Callable[[object], bool]) -> bool:
    """``value`` is a list of items, each a single value (one check) or a list of as many
    values as checks, each passing its own."""
    if type(value) is not list:
        return False
    if len(item) == 1:
        return all(item[0](v) for v in value)
    return all(
        type(v) is list and len(v) == len(item) and all(c(x) for c, x in zip(item, v, strict=True))
        for v in value
    )


def _shape_error(fields: dict[str, Any]) -> str | None:
    """The first field that is not as the format says (None: all are). Strict types, so that
    no value is ever converted (``bytes(10**10)`` would allocate ten gigabytes)."""
    counts = fields.get("counts")
    w, e = fields.get("witnessing"), fields.get("engine")
    checks: list[tuple[str, bool]] = [
        ("counts", _all(counts, _is_uint) and len(counts) == 5),  # type: ignore[arg-type]
        ("chain", _is_id(fields.get("chain"))),
        ("kept", _all(fields.get("kept"), _is_id, _is_uint)),
        ("heads", _all(fields.get("heads"), _is_id)),
        ("tips", _all(fields.get("tips"), _is_id, _is_id)),
        ("forks", _all(fields.get("forks"), _is_id, _is_uint)),
        ("recent", _all(fields.get("recent"), _is_id)),
        ("witnessing", type(w) is dict),
        ("engine", type(e) is dict),
    ]
    if type(w) is dict:
        checks += [
            ("witnessing.chain", _all(w.get("chain"), _is_id)),
            ("witnessing.current", _all(w.get("current"), _is_id)),
            ("witnessing.latest", _all(w.get("latest"), _is_id, _is_id)),
        ] + [(f"witnessing.{k}", _all(w.get(k), _is_id, _is_uint))
             for k in ("added", "cut", "proven", "forks_seen")]
    if type(e) is dict:
        checks += [
            ("engine.orders", _all(e.get("orders"), _is_id, _is_uint, _is_uint, _is_uint)),
            ("engine.levels", _all(e.get("levels"), _is_uint, _is_uint,
                                   lambda v: _all(v, _is_uint))),
            ("engine.client_ids", _all(e.get("client_ids"), _is_id, lambda v: type(v) is str,
                                       lambda v: type(v) is int and -1 <= v < 2**63)),
        ]
    return next((name for name, ok in checks if not ok), None)


def read_point_fields(
    market: Market, blob: bytes
) -> tuple[PointInfo, list[bytes], frozenset[bytes]]:
    """The point, its reconfiguration chain and its witnesses in force (``SnapshotRefused``
    for a blob that is not a point state of ``market``)."""
    fields = _read(blob, market.id)
    try:
        n = int(fields["counts"][0])
        chain = bytes(fields["chain"])
        kept = tuple(sorted(bytes(i) for i, _ in fields["kept"]))
        w = fields["witnessing"]
        chain_ids = [bytes(i) for i in w["chain"]]
        current = frozenset(bytes(k) for k in w["current"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise SnapshotRefused(
            "damaged", f"a field is missing or of the wrong type: {exc!r}"
        ) from exc
    return PointInfo(n, hashlib.sha256(blob).digest(), chain, kept), chain_ids, current


def point_fills(market: Market, blob: bytes) -> int:
    """How many fills the prefix of a point state counts (``SnapshotRefused`` if it is none
    of ``market``'s)."""
    return int(_read(blob, market.id)["counts"][1])


def read_point(market: Market, blob: bytes) -> PointInfo:
    """The point a point state is of (``SnapshotRefused`` if it is none of ``market``'s)."""
    return read_point_fields(market, blob)[0]


def restore_snapshot(
    replica: Replica, blob: bytes, ops: Iterable[Op | bytes], verify: bool, history: bool
) -> Replica:
    """Fill the new, empty ``replica`` from ``blob`` and ``ops`` (see ``Replica.from_snapshot``).
    Raises ``ValueError`` when the blob is not a usable point state of the replica's market."""
    try:
        return _restore(replica, blob, ops, verify, history)
    except ValueError:
        raise
    except (KeyError, IndexError, TypeError, AttributeError, OverflowError) as exc:
        raise SnapshotRefused("damaged", f"does not fit the ops given: {exc!r}") from exc


def _restore(
    replica: Replica, blob: bytes, ops: Iterable[Op | bytes], verify: bool, history: bool
) -> Replica:
    fin = replica._fin
    if fin is None:
        raise ValueError("a market without witnesses has no snapshots")
    fields = _read(blob, replica.market.id)
    by_id: dict[bytes, Op] = {}
    skipped: list[tuple[bytes | None, InvalidOp]] = []
    for item in ops:
        try:
            op = item if isinstance(item, Op) else decode(bytes(item), verify=verify)
        except InvalidOp as exc:
            skipped.append((None, exc))
            continue
        by_id.setdefault(op.id, op)

    # The kept ops: in memory again as they were, placed, not in the total order.
    applied = replica._applied
    latest = replica._author_latest
    prefix = PrefixState()
    for ident, placement in fields["kept"]:
        if ident not in by_id:
            raise SnapshotRefused(
                "damaged", f"it keeps op {bytes(ident).hex()[:16]}, which is not given"
            )
        op = by_id.pop(ident)
        if op.market_id != replica.market.id:
            raise SnapshotRefused("foreign", "a kept op is of another market")
        applied[op.id] = op
        fin.placement[op.id] = int(placement)
        author = op.author
        last = latest.get(author)
        if last is None or (placement, op.lamport, op.id) > (
            fin.placement[last.id],
            last.lamport,
            last.id,
        ):
            latest[author] = op
        body = op.body
        if type(body) is HeartbeatBody:
            fin.heartbeats.append(op)
        elif type(body) is ReconfigBody:
            fin.by_epoch.setdefault(body.epoch, []).append(op)
            prefix.reconfigs.append(op)
    prefix.heads = {bytes(i) for i in fields["heads"]}
    prefix.tips = {bytes(a): applied[i] for a, i in fields["tips"]}
    prefix.forks = {bytes(k): int(v) for k, v in fields["forks"]}
    prefix.recent = [bytes(i) for i in fields["recent"]]
    replica._heads = set(prefix.heads)
    replica._author_tip.update(prefix.tips)
    replica._fork_at.update(prefix.forks)

    w = fields["witnessing"]
    ops_, fills, orders, lamport, frozen = (int(v) for v in fields["counts"])
    fin.frozen = frozen
    fin.reconfigs = [applied[i] for i in w["chain"]]
    fin.current = frozenset(w["current"])
    fin.added_at = {k: int(v) for k, v in w["added"]}
    fin.cut = {k: int(v) for k, v in w["cut"]}
    fin._proven_from = {k: int(v) for k, v in w["proven"]}
    fin._forks_seen = {k: int(v) for k, v in w["forks_seen"]}
    fin.latest = {k: applied[i] for k, i in w["latest"]}
    prefix.heartbeats = dict(fin.latest)
    for heartbeat in fin.heartbeats:  # now that the witnesses are known
        replica._note_attestation(heartbeat)
    prefix.lamport = lamport

    base = _engine(fields["engine"], applied)
    replica._compact_base = base
    replica._engine = base.compacted()
    replica._final_engine = base.compacted()
    replica.compacted_ops, replica.compacted_fills, replica.compacted_orders = ops_, fills, orders
    replica._compacted_lamport = lamport
    replica._chain_base = replica._final_chain = bytes(fields["chain"])
    replica._prefix = prefix
    replica._point_blob = bytes(blob)
    replica.point = PointInfo(
        ops_, hashlib.sha256(blob).digest(), replica._chain_base, tuple(sorted(fin.placement))
    )
    replica._point_target = replica._next_point_target(ops_)
    if not history:
        replica._history = False
        replica._point_seq = replica._prefix_tip_seqs()

    # Everything after the point, judged and placed as ``restore`` does: admit all, then match.
    replica._deferred = True
    try:
        rest: list[Op] = sorted(by_id.values(), key=lambda o: (o.lamport, o.id))
        report = replica.apply_many(rest)
    finally:
        replica._deferred = False
    replica._rematch()
    from ._replica import RestoreReport  # here: _replica imports this module lazily

    replica.restore_report = RestoreReport(0, None, tuple(skipped + report.invalid))
    return replica


def _engine(state: dict[str, Any], applied: dict[bytes, Op]) -> Engine:
    """The matched state at the point: resting orders, levels, held client ids."""
    engine = Engine(client_ids=True)
    for ident, remaining, filled, status in state["orders"]:
        op = applied[ident]
        if type(op.body) is not OrderBody or not 0 <= status <= PARTIALLY_FILLED:
            raise SnapshotRefused("damaged", "it rests something that is not a live order")
        engine.orders[op.id] = len(engine.ids)
        engine.ids.append(op.id)
        engine.ops.append(op)
        engine.authors.append(op.author)
        engine.remaining.append(int(remaining))
        engine.filled.append(int(filled))
        engine.states.append(int(status))
    count = len(engine.ids)
    for side, price, numbers in state["levels"]:
        if side not in (0, 1) or not numbers or not all(0 <= n < count for n in numbers):
            raise SnapshotRefused("damaged", "it has a price level that names no resting order")
        level = _Level(side, int(price))
        level.extend(int(n) for n in numbers)
        level.live = len(level)
        engine.levels[side][level.price] = level
        engine._add_price(side, level.price)
    held = engine.client_ids
    assert held is not None
    for author, tag, number in state["client_ids"]:
        if not -1 <= number < count:
            raise SnapshotRefused("damaged", "it holds a client id for an order it does not have")
        held[(bytes(author), str(tag))] = int(number)
    return engine
