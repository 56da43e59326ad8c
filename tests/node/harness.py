"""Real node processes for tests: ``crdtbook.node.procs`` (started through the CLI on 127.0.0.1
with free ports, stopped with SIGINT, then SIGKILL), plus what the multi-node tests compare."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The process harness is the package's (the demo and the benches use the same one).
from crdtbook.node.procs import NodeExited, NodeProcess, stop_all, wait_until

__all__ = [
    "MARKET",
    "NodeExited",
    "NodeProcess",
    "converged",
    "node_group",
    "shared_fills",
    "stop_all",
    "wait_until",
]

MARKET = "DEMO:1:1"


#: Fields of a fill or order that are this node's own view, not derived state (the local time
#: it first applied the op): the same fill differs there from node to node.
NODE_LOCAL_FIELDS = frozenset({"received_ms"})


def shared_fills(node: NodeProcess) -> list[dict[str, Any]]:
    """The node's fills as every node must show them (without node-local fields)."""
    return [
        {k: v for k, v in fill.items() if k not in NODE_LOCAL_FIELDS}
        for fill in node.call("fills")["fills"]
    ]


def converged(nodes: list[NodeProcess]) -> bool:
    statuses = [n.market_status() for n in nodes]
    return (
        len({s["digest"] for s in statuses}) == 1
        and len({s["ops"] for s in statuses}) == 1
        and all(s["pending"] == 0 for s in statuses)
    )


@contextmanager
def node_group(tmp: Path) -> Iterator[Callable[..., NodeProcess]]:
    """``start(name, bootstrap=[...])`` starts a node; all are stopped on exit."""
    nodes: list[NodeProcess] = []

    def start(name: str, bootstrap: list[str] | None = None) -> NodeProcess:
        node = NodeProcess(tmp / name, bootstrap).start()
        nodes.append(node)
        return node

    try:
        yield start
    finally:
        stop_all(nodes)
