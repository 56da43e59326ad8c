"""Finality as a node shows it: who finality waits for, for how long, and when it stalls.

The core (``crdtbook.Replica``) knows which ops are final; it has no clock. This module adds the
node's monotonic clock: when each witness's counted heartbeats last advanced (``silent_s``), since
when finality has been waiting for it, and the verdict ``status`` shows per market:

- ``none``: the market has no witnesses; its fills are never final;
- ``final``: every op other than a heartbeat is final (nothing waits);
- ``pending``: something waits for heartbeats that are due;
- ``stalled``: something waits, and a witness it waits for has been silent for more than
  ``STALL_SECONDS`` (since it became due, or since its last heartbeat, whichever is later: a
  witness that keeps heartbeating under load never counts as stalled).

A witness is *waited for* when its latest counted heartbeat is below the placement of the
earliest op that is not final (every witness, if that op is not placed yet): the frontier cannot
pass that op until the witness acknowledges it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final

from crdtbook import Replica, WitnessInfo

__all__ = ["HEARTBEAT_INTERVAL", "STALL_SECONDS", "FinalityTracker", "FinalityView", "WitnessView"]

logger = logging.getLogger("crdtbook.node")

#: A witness heartbeats this long after it first has something to acknowledge: ops that arrive
#: meanwhile share the heartbeat, so a busy market costs one heartbeat per witness per interval
#: and an idle one none at all.
HEARTBEAT_INTERVAL: Final = 0.25
#: Finality is "stalled" once a witness it waits for has been silent this long.
STALL_SECONDS: Final = 3.0


@dataclass(frozen=True)
class WitnessView:
    key: bytes
    me: bool
    current: bool
    forked: bool
    heartbeat_lamport: int
    heartbeat_seq: int
    #: Seconds since this node saw the witness's counted heartbeats advance (None: never).
    silent_s: float | None
    #: Seconds finality has waited for it: since it became due or its last heartbeat, whichever
    #: is later, the time the stall rule reads (None: finality does not wait for it).
    waited_s: float | None = None


@dataclass(frozen=True)
class FinalityView:
    #: "none", "final", "pending" or "stalled" (see the module docstring).
    state: str
    #: Keys of the witnesses in force that finality waits for now, and those of them stalled.
    waiting_on: tuple[bytes, ...] = ()
    stalled_on: tuple[bytes, ...] = ()
    witnesses: tuple[WitnessView, ...] = ()
    #: When (node clock) the next witness waited for would count as stalled (None: no such).
    next_stall: float | None = None


@dataclass
class FinalityTracker:
    """Per market: the clock side of finality. ``observe`` after ops are applied (cheap),
    ``evaluate`` for a verdict (logs equivocating witnesses and stalls as they appear)."""

    name: str
    #: witness -> (latest counted heartbeat seq seen, node time it advanced to it or None).
    _seen: dict[bytes, tuple[int, float | None]] = field(default_factory=dict)
    #: witness -> node time since which finality has been waiting for it.
    _due_since: dict[bytes, float] = field(default_factory=dict)
    _forks_logged: set[bytes] = field(default_factory=set)
    _stalled: tuple[bytes, ...] = ()
    #: The current stall was logged at WARNING (so its end is too).
    _stall_warned: bool = False
    #: The latest point (n, hash the majority attests) this replica's state disagrees with
    #: (``Replica.disputed_point``), logged once at ERROR; shown by ``status``.
    disputed: tuple[int, bytes] | None = None

    def prime(self, replica: Replica) -> None:
        """Take the heartbeats the replica holds (e.g. loaded from the store) as not seen
        arriving: a witness's ``silent_s`` counts from the first heartbeat after this."""
        self._seen = {info.key: (info.heartbeat_seq, None) for info in replica.witness_status()}

    def observe(self, replica: Replica, now: float) -> None:
        """Note each witness whose counted heartbeats advanced since the last call, and a
        point of this replica that a majority of the witnesses attest otherwise."""
        if replica.point is not None:
            self._check_point(replica)
        seen = self._seen
        for info in replica.witness_status():
            before = seen.get(info.key)
            if before is None:
                seen[info.key] = (info.heartbeat_seq, now if info.heartbeat_seq else None)
            elif before[0] != info.heartbeat_seq:
                seen[info.key] = (info.heartbeat_seq, now)

    def _check_point(self, replica: Replica) -> None:
        disputed = replica.disputed_point()
        if disputed is None or disputed == self.disputed:
            return
        self.disputed = disputed
        point = replica.point
        assert point is not None
        logger.error(
            "%s: this node's state at point %d (hash %s) is not the one a majority of the "
            "witnesses attest (%s): it compacted a prefix they did not finalise (e.g. it is a "
            "witness that was removed while it still ran), and its book, fills and digest "
            "differ from theirs for good. Stop it and start a node in a new home (a new key: "
            "crdtbook id --init) with --join snapshot; see docs/reliability.md",
            self.name,
            disputed[0],
            point.hash.hex()[:16],
            disputed[1].hex()[:16],
        )

    def silent_for(self, key: bytes, now: float) -> float | None:
        seen = self._seen.get(key)
        if seen is None or seen[1] is None:
            return None
        return max(0.0, now - seen[1])

    def evaluate(self, replica: Replica, me: bytes, now: float) -> FinalityView:
        if not replica.witnessed:
            return FinalityView("none")
        self.observe(replica, now)
        infos = replica.witness_status()
        self._log_forks(infos)
        first = next(
            (op for op in replica.iter_ops(replica.final_count) if op.kind != "heartbeat"), None
        )
        waiting: tuple[bytes, ...] = ()
        if first is not None:
            placed = replica.placement(first.id)
            waiting = tuple(
                info.key
                for info in infos
                if info.current and (placed is None or info.heartbeat_lamport < placed)
            )
            if not waiting:  # e.g. a witness added at a later Lamport time: name them all
                waiting = tuple(info.key for info in infos if info.current)
        due = self._due_since
        for key in list(due):
            if key not in waiting:
                del due[key]
        stalled: list[bytes] = []
        next_stall: float | None = None
        waited: dict[bytes, float] = {}
        for key in waiting:
            since = due.setdefault(key, now)
            heard = self._seen.get(key, (0, None))[1]
            quiet_from = since if heard is None else max(since, heard)
            waited[key] = now - quiet_from
            if now - quiet_from > STALL_SECONDS:
                stalled.append(key)
            elif next_stall is None or quiet_from + STALL_SECONDS < next_stall:
                next_stall = quiet_from + STALL_SECONDS
        self._log_stall(tuple(stalled), replica.pending_count)
        state = "final" if first is None else "stalled" if stalled else "pending"
        witnesses = tuple(
            WitnessView(
                info.key,
                info.key == me,
                info.current,
                info.forked,
                info.heartbeat_lamport,
                info.heartbeat_seq,
                self.silent_for(info.key, now),
                waited.get(info.key),
            )
            for info in infos
        )
        return FinalityView(state, waiting, tuple(stalled), witnesses, next_stall)

    def _log_forks(self, infos: list[WitnessInfo]) -> None:
        for info in infos:
            key = info.key
            if info.forked and key not in self._forks_logged:
                self._forks_logged.add(key)
                logger.warning(
                    "%s: witness %s signed two ops at one sequence number (equivocation): its "
                    "heartbeats count only below the fork, so finality stalls until the other "
                    "witnesses remove it (reconfigure)",
                    self.name,
                    key.hex(),
                )

    def _log_stall(self, stalled: tuple[bytes, ...], pending: int) -> None:
        """A stall at WARNING, the default level (an operator alerting on the log missed a
        witness gone for 44 s at INFO), and its end at the same level. While the node holds
        ops waiting for their parents (catching up, e.g. just joined) it may only lag the
        witnesses' heartbeats: said at INFO with that reason, and at WARNING once it has caught
        up and the stall goes on."""
        keys = ", ".join(key.hex()[:16] for key in stalled)
        if stalled and not self._stalled and pending:
            logger.info(
                "%s: finality waits for witness(es) %s for more than %.0f s; this node holds "
                "%d ops waiting for their parents (catching up?)",
                self.name, keys, STALL_SECONDS, pending,
            )  # fmt: skip
        if stalled and not pending and not self._stall_warned:
            logger.warning(
                "%s: finality stalled: witness(es) %s silent for more than %.0f s (status names "
                "them; a majority of the witnesses can remove one gone for good)",
                self.name, keys, STALL_SECONDS,
            )  # fmt: skip
            self._stall_warned = True
        elif self._stalled and not stalled:
            level = logging.WARNING if self._stall_warned else logging.INFO
            logger.log(level, "%s: finality resumed", self.name)
            self._stall_warned = False
        self._stalled = stalled
