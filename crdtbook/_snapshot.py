"""Local snapshots of a compacted replica, so a restart need not read the compacted history.

``Replica.compact`` (witnessed markets) leaves in memory the matched state at the compaction
point (resting orders only), the final ops it still needs (the *kept* ops) and everything after
the point. A snapshot records exactly that state, by reference to op ids: the node keeps the ops
themselves in its store, marks the compacted ones, and at restart hands ``from_snapshot`` the
blob, every op not marked compacted, and the store as the archive. Nothing compacted is read
unless a late op names it.

Format (canonical CBOR map; ``sha256`` over the map without it)::

    {"format": "crdtbook/snapshot", "version": 1, "market": bytes(32),
     "counts": [ops, fills, orders, top compacted Lamport, frozen frontier],
     "chain": bytes(32) (the running hash of the final ops at the point),
     "kept": [[id, placement], ...], "nonheads": [id, ...] (kept ops that have children),
     "forks": [[author, seq], ...],
     "witnessing": {"chain": [reconfig ids], "current": [keys], "added": [[key, lamport]],
                    "cut": [[key, seq]], "proven": [[key, seq]], "forks_seen": [[key, seq]],
                    "latest": [[key, heartbeat id]]},
     "engine": {"orders": [[id, remaining, filled, state], ...] (resting, in number order),
                "levels": [[side, price, [numbers]], ...], "client_ids": [[author, tag, n]]},
     "sha256": bytes(32)}

Trust: as a checkpoint's (``crdtbook._checkpoint``), that of the store it sits in. The checksum
catches a damaged file, and every reference is checked, so a bad blob raises ``ValueError`` (the
node then restores from the whole log) and never leaves a half-built replica in use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import cbor2

from ._engine import PARTIALLY_FILLED, Engine, _Level
from ._errors import InvalidOp
from ._ops import HeartbeatBody, Op, OrderBody, ReconfigBody, decode

if TYPE_CHECKING:
    from ._replica import Replica

__all__ = ["FORMAT", "VERSION", "encode_snapshot", "restore_snapshot"]

FORMAT: Final = "crdtbook/snapshot"
VERSION: Final = 1


def _checksum(fields: dict[str, Any]) -> bytes:
    return hashlib.sha256(cbor2.dumps(fields, canonical=True)).digest()


def encode_snapshot(replica: Replica) -> bytes:
    """The blob for a replica that has compacted (``ValueError`` if it never did)."""
    fin, base = replica._fin, replica._compact_base
    if fin is None or base is None:
        raise ValueError("only a witnessed replica that has compacted has a snapshot")
    live = {op.id for op in replica._order}
    kept = [[i, fin.placement.get(i, fin.frozen)] for i in replica._applied if i not in live]
    heads = replica._heads
    engine: dict[str, Any] = {
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
    witnessing = {
        "chain": [op.id for op in fin.reconfigs],
        "current": sorted(fin.current),
        "added": sorted([k, v] for k, v in fin.added_at.items()),
        "cut": sorted([k, v] for k, v in fin.cut.items()),
        "proven": sorted([k, v] for k, v in fin._proven_from.items()),
        "forks_seen": sorted([k, v] for k, v in fin._forks_seen.items()),
        "latest": sorted([k, op.id] for k, op in fin.latest.items()),
    }
    fields: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "market": replica.market.id,
        "counts": [
            replica.compacted_ops,
            replica.compacted_fills,
            replica.compacted_orders,
            replica._compacted_lamport,
            fin.frozen,
        ],
        "chain": replica._chain_base,
        "kept": sorted(kept),
        "nonheads": sorted(i for i, _ in kept if i not in heads),
        "forks": sorted([k, v] for k, v in replica._fork_at.items()),
        "witnessing": witnessing,
        "engine": engine,
    }
    fields["sha256"] = _checksum(fields)
    return bytes(cbor2.dumps(fields, canonical=True))


def restore_snapshot(
    replica: Replica, blob: bytes, ops: Iterable[Op | bytes], verify: bool
) -> Replica:
    """Fill the new, empty ``replica`` from ``blob`` and ``ops`` (see ``Replica.from_snapshot``).
    Raises ``ValueError`` when the blob is not a usable snapshot of the replica's market."""
    try:
        return _restore(replica, blob, ops, verify)
    except ValueError:
        raise
    except (KeyError, IndexError, TypeError, AttributeError, OverflowError) as exc:
        raise ValueError(f"snapshot does not fit the stored ops: {exc!r}") from exc


def _read(blob: bytes, market_id: bytes) -> dict[str, Any]:
    try:
        fields = cbor2.loads(blob)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"snapshot is not CBOR: {exc}") from exc
    if not isinstance(fields, dict) or fields.get("format") != FORMAT:
        raise ValueError("not a crdtbook snapshot")
    if fields.get("version") != VERSION:
        raise ValueError(f"snapshot version {fields.get('version')!r} is not {VERSION}")
    if fields.get("market") != market_id:
        raise ValueError("snapshot is of another market")
    checksum = fields.pop("sha256", None)
    if checksum != _checksum(fields):
        raise ValueError("snapshot checksum does not match (damaged)")
    return fields


def _restore(replica: Replica, blob: bytes, ops: Iterable[Op | bytes], verify: bool) -> Replica:
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

    # The kept final ops: in memory again as they were, placed, not in the total order.
    applied = replica._applied
    tips, latest = replica._author_tip, replica._author_latest
    for ident, placement in fields["kept"]:
        if ident not in by_id:
            raise ValueError(f"snapshot keeps op {bytes(ident).hex()[:16]}, which is not given")
        op = by_id.pop(ident)
        applied[op.id] = op
        fin.placement[op.id] = int(placement)
        author = op.author
        tip = tips.get(author)
        if tip is None or op.seq > tip.seq:
            tips[author] = op
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
    replica._heads = set(applied) - set(fields["nonheads"])
    replica._fork_at.update((k, int(v)) for k, v in fields["forks"])

    w = fields["witnessing"]
    ops_, fills, orders, lamport, frozen = (int(v) for v in fields["counts"])
    fin.frozen = frozen
    # A reconfiguration or heartbeat still live at the point comes back with the live ops
    # (admitting it installs the chain and notes the heartbeat again).
    fin.reconfigs = [applied[i] for i in w["chain"] if i in applied]
    fin.current = frozenset(w["current"])
    fin.added_at = {k: int(v) for k, v in w["added"]}
    fin.cut = {k: int(v) for k, v in w["cut"]}
    fin._proven_from = {k: int(v) for k, v in w["proven"]}
    fin._forks_seen = {k: int(v) for k, v in w["forks_seen"]}
    fin.latest = {k: applied[i] for k, i in w["latest"] if i in applied}

    base = _engine(fields["engine"], applied)
    replica._compact_base = base
    replica._engine = base.compacted()
    replica._final_engine = base.compacted()
    replica.compacted_ops, replica.compacted_fills, replica.compacted_orders = ops_, fills, orders
    replica._compacted_lamport = lamport
    replica._chain_base = replica._final_chain = bytes(fields["chain"])

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
    """The matched state at the compaction point: resting orders, levels, held client ids."""
    engine = Engine(client_ids=True)
    for ident, remaining, filled, status in state["orders"]:
        op = applied[ident]
        if type(op.body) is not OrderBody or not 0 <= status <= PARTIALLY_FILLED:
            raise ValueError("snapshot rests something that is not a live order")
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
            raise ValueError("snapshot has a price level that names no resting order")
        level = _Level(side, int(price))
        level.extend(int(n) for n in numbers)
        level.live = len(level)
        engine.levels[side][level.price] = level
        engine._add_price(side, level.price)
    held = engine.client_ids
    assert held is not None
    for author, tag, number in state["client_ids"]:
        if not -1 <= number < count:
            raise ValueError("snapshot holds a client id for an order it does not have")
        held[(bytes(author), str(tag))] = int(number)
    return engine
