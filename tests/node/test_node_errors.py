"""How the node's background tasks treat failures: what a peer or the network can cause is
expected and logged quietly; anything else is a bug, logged at ERROR with its traceback. Neither
escapes (an exception out of a task would stop the node)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from crdtbook.node.discovery import BOOTSTRAP_WARN_AFTER, Discovery
from crdtbook.node.p2p import DialError, StreamError
from crdtbook.node.sync_schedule import SyncScheduler
from crdtbook.node.wire import WireError

PEER = "12D3KooWPeer"
MARKET = SimpleNamespace(market=SimpleNamespace(id=b"m" * 32, name="DEMO"))
BOOTSTRAP = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWBootstrap"


class FailingNet:
    """Every network call raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.rejects: list[tuple[str, str]] = []

    def connected_peers(self) -> list[str]:
        return []

    async def open_stream(self, peer: str, protocol: str) -> Any:
        raise self.error

    async def connect(self, addr: str) -> str:
        raise self.error

    def report_reject(self, peer: str, reason: str) -> None:
        self.rejects.append((peer, reason))


class FailingStream:
    peer_id = PEER
    was_reset = False

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def read_frame(self, max_size: int, *, timeout: float | None = None) -> bytes:
        raise self.error

    async def reset(self) -> None:
        self.was_reset = True


def scheduler(error: Exception) -> SyncScheduler:
    service = SimpleNamespace(markets={}, store_writable=lambda: True)
    return SyncScheduler(service, FailingNet(error))  # type: ignore[arg-type]


def discovery(error: Exception) -> Discovery:
    return Discovery(FailingNet(error), [], [BOOTSTRAP])  # type: ignore[arg-type]


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "crdtbook.node" and r.levelno == level]


@pytest.mark.parametrize(
    ("error", "level"),
    [
        (StreamError("reset by the peer"), logging.DEBUG),
        (WireError("a malformed frame"), logging.INFO),
        (RuntimeError("a bug of ours"), logging.ERROR),
    ],
    ids=["network", "peer-data", "bug"],
)
async def test_a_failed_sync_is_logged_by_what_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception, level: int
) -> None:
    caplog.set_level(logging.DEBUG, logger="crdtbook.node")
    n = scheduler(error)
    n.syncing.add((PEER, MARKET.market.id))
    await n.sync_one(PEER, MARKET)  # type: ignore[arg-type]  # never raises
    assert not n.syncing
    rejects = n.net.rejects  # type: ignore[attr-defined]
    assert rejects == ([(PEER, "sync-malformed")] if level == logging.INFO else [])
    (record,) = [r for r in caplog.records if r.name == "crdtbook.node"]
    assert record.levelno == level
    assert (record.exc_info is not None) == (level == logging.ERROR)


@pytest.mark.parametrize(
    ("error", "level"),
    [
        (StreamError("stalled"), logging.DEBUG),
        (WireError("not a request"), logging.INFO),
        (KeyError("a bug of ours"), logging.ERROR),
    ],
    ids=["network", "peer-data", "bug"],
)
async def test_a_failed_sync_request_is_logged_by_what_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception, level: int
) -> None:
    caplog.set_level(logging.DEBUG, logger="crdtbook.node")
    stream = FailingStream(error)
    await scheduler(error).serve(stream)  # type: ignore[arg-type]  # never raises
    assert stream.was_reset
    (record,) = [r for r in caplog.records if r.name == "crdtbook.node"]
    assert record.levelno == level
    assert (record.exc_info is not None) == (level == logging.ERROR)


async def test_an_unreachable_bootstrap_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crdtbook.node")
    n = discovery(DialError("connection refused"))
    for _ in range(BOOTSTRAP_WARN_AFTER + 3):
        await n.bootstrap()
    (warning,) = records(caplog, logging.WARNING)
    assert BOOTSTRAP in warning.getMessage() and "connection refused" in warning.getMessage()
    assert len(records(caplog, logging.INFO)) == BOOTSTRAP_WARN_AFTER + 2
    assert not records(caplog, logging.ERROR)


async def test_a_bug_while_bootstrapping_is_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = discovery(AttributeError("a bug of ours"))
    with trio.fail_after(5):
        await n.bootstrap()
    (error,) = records(caplog, logging.ERROR)
    assert error.exc_info is not None
