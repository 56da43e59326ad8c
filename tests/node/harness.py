"""Real node processes for tests: started through the CLI on 127.0.0.1 with free ports,
always stopped (SIGINT, then SIGKILL) by the fixture that made them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crdtbook.node.client import ControlClient, NodeNotRunning

MARKET = "DEMO:1:1"
START_TIMEOUT = 30.0
#: ``python -c`` body that runs a node from a JSON NodeConfig (fields the CLI does not offer).
_LAUNCHER = (
    "import json, sys; from pathlib import Path; "
    "from crdtbook.node.app import NodeConfig, run_node; "
    "c = json.loads(sys.argv[1]); c['home'] = Path(c['home']); "
    "sys.exit(run_node(NodeConfig(**c)))"
)


class NodeProcess:
    def __init__(
        self,
        home: Path,
        bootstrap: list[str] | None = None,
        market: str = MARKET,
        *,
        listen: str = "/ip4/127.0.0.1/tcp/0",
        prefix: Sequence[str] = (),
        config: dict[str, Any] | None = None,
    ):
        """``prefix`` runs the node under another command (e.g. ``ip netns exec NAME``);
        ``config`` sets NodeConfig fields the CLI does not offer (the node then starts
        through ``run_node`` instead of the CLI)."""
        self.home = home
        self.bootstrap = bootstrap or []
        self.market = market
        self.listen = listen
        self.prefix = list(prefix)
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home.parent / f"{home.name}.log"

    def command(self) -> list[str]:
        if self.config is not None:
            config = {
                "home": str(self.home),
                "listen": [self.listen],
                "bootstrap": self.bootstrap,
                "markets": [self.market],
                "verbose": 1,
                **self.config,
            }
            return [*self.prefix, sys.executable, "-c", _LAUNCHER, json.dumps(config)]
        cmd = [
            *self.prefix,
            sys.executable,
            "-m",
            "crdtbook.cli.app",
            "node",
            "--home",
            str(self.home),
            "--listen",
            self.listen,
            "--market",
            self.market,
            "-v",
        ]
        for addr in self.bootstrap:
            cmd += ["--bootstrap", addr]
        return cmd

    def start(self) -> NodeProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "node.json").unlink(missing_ok=True)
        cmd = self.command()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            if (self.home / "node.json").exists():
                try:
                    self.call("status")
                    return self
                except NodeNotRunning:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"node did not start within {START_TIMEOUT}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    @property
    def addr(self) -> str:
        info = json.loads((self.home / "node.json").read_text())
        return str(info["addrs"][0])

    @property
    def peer_id(self) -> str:
        return str(json.loads((self.home / "node.json").read_text())["peer_id"])

    def call(self, method: str, **params: Any) -> Any:
        with ControlClient(self.home, timeout=15.0) as client:
            return client.call(method, **params)

    def market_status(self) -> dict[str, Any]:
        status = self.call("status")
        return dict(status["markets"][0])

    def digest(self) -> str:
        return str(self.market_status()["digest"])

    def peers(self) -> int:
        return len(self.call("status")["peers"])

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (NodeNotRunning, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


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
        for node in nodes:
            node.stop()
