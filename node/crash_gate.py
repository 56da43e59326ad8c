"""After a machine crash, a node signs nothing in a market until it has synced it once.

Without ``--fsync`` the store commits with synchronous=NORMAL: a commit survives the node being
killed (the OS holds it) but not the machine losing power or crashing. A node that lost its last
own ops that way may have sent them already: its peers hold them, and the next op it signed
would reuse one of their sequence numbers, an equivocation of its key (for a witness: its
heartbeats stop counting and finality stalls at every node; docs/reliability.md).

So the store records each run (the meta row :data:`RUN_STATE_KEY`): ``running <boot id>`` while a
node runs, ``stopped`` once it stopped (however it stopped, short of the process being killed).
A start that finds ``running`` under another boot id follows a run that ended with the machine
(:func:`may_have_lost_commits`); a kill -9 leaves the same boot id and loses nothing. After such a
start the node signs nothing as itself in a market (``NodeService._ready_to_sign``: control
``not_ready``, no heartbeat) until one sync of that market with a peer completed, which brings
back whatever the peers hold of its own ops, or until :data:`CRASH_SIGNING_WAIT` passed with no
sync session tried for as long (no peer to hold anything). With ``--fsync`` nothing is lost and
nothing waits.

This module reads the boot id and the store's row; the decision is a pure function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Protocol

__all__ = [
    "BOOT_ID_PATH",
    "CRASH_SIGNING_WAIT",
    "RUN_STATE_KEY",
    "begin_run",
    "boot_id",
    "end_run",
    "may_have_lost_commits",
]

#: The store's meta row that says whether the last run stopped (module doc).
RUN_STATE_KEY: Final = "run_state"
_STOPPED: Final = b"stopped"
_RUNNING: Final = b"running "
#: Linux's id of the current boot: another one means the machine restarted.
BOOT_ID_PATH: Final = Path("/proc/sys/kernel/random/boot_id")
#: After a crash, how long signing waits for a first sync when no sync session is even tried
#: (no peer connected): a peer that comes back later may still hold a lost op, but a node with
#: no peer at all must be able to trade. Sync asks every peer within seconds of connecting, so a
#: node with peers never reaches this.
CRASH_SIGNING_WAIT: Final = 30.0


class _Meta(Protocol):
    def get_meta(self, key: str) -> bytes | None: ...
    def set_meta(self, key: str, value: bytes) -> None: ...


def boot_id(path: Path = BOOT_ID_PATH) -> str:
    """This boot's id ("" where the system has none to read)."""
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def may_have_lost_commits(previous: bytes | None, boot: str, fsync: bool) -> bool:
    """Whether a start may follow a machine crash that lost commits: the last run (its row
    ``previous``; None for a new store) did not stop, and not in this boot (an unknown boot
    counts as another). Never with ``fsync``: every commit reached the disk."""
    if fsync or previous is None or previous == _STOPPED:
        return False
    if not previous.startswith(_RUNNING) or not boot:
        return True
    return previous[len(_RUNNING) :].decode("ascii", "replace") != boot


def begin_run(store: _Meta, fsync: bool, boot: str | None = None) -> bool:
    """Record this run as running; return :func:`may_have_lost_commits` for the last one."""
    boot = boot_id() if boot is None else boot
    previous = store.get_meta(RUN_STATE_KEY)
    store.set_meta(RUN_STATE_KEY, _RUNNING + boot.encode("ascii", "replace"))
    return may_have_lost_commits(previous, boot, fsync)


def end_run(store: _Meta) -> None:
    """Record that this run stopped (its commits are in the OS: only a crash of the machine
    before they reach the disk can lose them, and then the row says ``running`` still)."""
    store.set_meta(RUN_STATE_KEY, _STOPPED)
