"""Real node processes on this machine: the one harness the demo, the tests and the benches
start, watch and stop nodes with.

A :class:`NodeProcess` is a ``crdtbook node`` child process with its home, its log file and a
control client. It starts through the CLI (what an operator runs) or, given ``config``, through
``run_node`` with a JSON ``NodeConfig`` (for fields the CLI does not offer). It listens on
127.0.0.1 with a port the kernel picks (``/tcp/0``) and counts as started once its control socket
answers. It is always stopped the same way: SIGINT (an orderly stop: flush, checkpoint, leave),
then SIGKILL after a grace period.

Blocking and standard library only (``subprocess``, the blocking control client): no trio, no
libp2p in the process that drives the nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Self

from .client import ControlClient, NodeNotRunning
from .home import HOME_ENV, load_or_create_identity

__all__ = [
    "LOOPBACK",
    "START_TIMEOUT",
    "STOP_GRACE",
    "NodeExited",
    "NodeProcess",
    "make_identity",
    "start_peer",
    "start_witness",
    "stop_all",
    "wait_until",
]

#: Listen on loopback only, on a port the kernel picks: never a fixed port, never a public one.
LOOPBACK: Final = "/ip4/127.0.0.1/tcp/0"
#: A node answers on its control socket within a second or two (libp2p's import is ~0.7 s);
#: on a loaded machine several times that. Past this, it will not.
START_TIMEOUT: Final = 60.0
#: Between SIGINT and SIGKILL: an orderly stop flushes gossip (at most 2 s) and writes
#: checkpoints; a node that takes longer is stuck.
STOP_GRACE: Final = 15.0
#: Polls of a starting node's control socket.
_POLL: Final = 0.05
#: The last bytes of a node's log quoted when it fails.
_LOG_TAIL: Final = 4000


class NodeExited(RuntimeError):
    """The node process ended while it was expected to run (the message quotes its log)."""


def make_identity(home: Path) -> bytes:
    """Create ``home`` (mode 0700) and the node's key in it, as the node would on its first
    start, so that a market can name the node as a witness before it runs. Returns the public
    key."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    identity, _ = load_or_create_identity(home)
    return identity.public_key


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a ``preexec_fn`` that has the kernel SIGTERM the node if its parent dies without
    cleaning up (SIGKILL). libc is loaded here, in the parent: the child only calls ``prctl``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def setup() -> None:  # pragma: no cover - runs in the child between fork and exec
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return setup


class NodeProcess:
    """One node process: ``NodeProcess(home, bootstrap, market).start()``, then ``call``, then
    ``stop`` (or ``kill9``, then ``start`` again on the same home)."""

    def __init__(
        self,
        home: Path,
        bootstrap: Sequence[str] | None = None,
        market: str = "DEMO:1:1",
        *,
        listen: str = LOOPBACK,
        prefix: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        command: Sequence[str] | None = None,
        log_path: Path | None = None,
        verbose: int = 1,
        call_timeout: float = 15.0,
        own_session: bool = False,
        die_with_parent: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``prefix`` runs the node under another command (``ip netns exec NAME``); ``config``
        sets NodeConfig fields the CLI does not offer (the node then starts through ``run_node``;
        a ``network`` mapping sets NetworkConfig fields); ``command`` replaces the command line
        altogether. ``own_session`` starts the node in its own session (a terminal's Ctrl-C
        reaches only its parent; ``stop`` then kills the whole group), ``die_with_parent`` has
        the kernel stop it if the parent dies. ``env`` replaces the environment (default: this
        one without ``$CRDTBOOK_HOME``, which the node must not pick up instead of ``home``)."""
        self.home = home
        self.bootstrap = list(bootstrap or [])
        self.market = market
        self.listen = listen
        self.prefix = list(prefix)
        self.config = dict(config) if config is not None else None
        self._command = list(command) if command is not None else None
        self.log_path = log_path or home.parent / f"{home.name}.log"
        self.verbose = verbose
        self.call_timeout = call_timeout
        self.own_session = own_session
        self.die_with_parent = die_with_parent
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    # -- starting ----------------------------------------------------------------------------

    def command(self) -> list[str]:
        """The command line that runs this node."""
        if self._command is not None:
            return list(self._command)
        if self.config is not None:
            config = {
                "home": str(self.home),
                "listen": [self.listen],
                "bootstrap": self.bootstrap,
                "markets": [self.market],
                "verbose": self.verbose,
                **self.config,
            }
            return [*self.prefix, sys.executable, "-m", __name__, json.dumps(config)]
        cmd = [*self.prefix, sys.executable, "-m", "crdtbook.cli.app", "node"]
        cmd += ["--home", str(self.home), "--listen", self.listen, "--market", self.market]
        cmd += ["-v"] * self.verbose
        for addr in self.bootstrap:
            cmd += ["--bootstrap", addr]
        return cmd

    def spawn(self) -> Self:
        """Start the process and return at once (``wait_ready`` waits for it to answer)."""
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.home / "node.json").unlink(missing_ok=True)  # a dead node's: not this one's
        env = self.env
        if env is None:
            env = {k: v for k, v in os.environ.items() if k != HOME_ENV}
        with self.log_path.open("ab") as log:  # the child holds it for its lifetime
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=self.own_session,
                preexec_fn=_die_with_parent() if self.die_with_parent else None,
            )
        return self

    def ready(self) -> bool:
        """Whether the node answers on its control socket now (one try, no wait). Raises
        :class:`NodeExited` if the process has ended."""
        if self.proc is None:
            return False
        if self.proc.poll() is not None:
            raise NodeExited(f"node {self.home} exited with {self.proc.returncode}:\n{self.log()}")
        if not (self.home / "node.json").exists():  # written once the node listens
            return False
        try:
            self.call("status", digest=False)
        except (NodeNotRunning, OSError):
            return False
        return True

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Self:
        """Wait until the node answers; :class:`NodeExited` or ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"node did not start within {timeout:.0f} s:\n{self.log()}")
            time.sleep(_POLL)
        return self

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        """Start the node and wait until it answers on its control socket."""
        return self.spawn().wait_ready(timeout)

    # -- reading -----------------------------------------------------------------------------

    def log(self, tail: int = _LOG_TAIL) -> str:
        """The end of the node's log (stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def info(self) -> dict[str, Any]:
        """``<home>/node.json``: pid, peer id, listen addresses, markets (while it runs)."""
        info: dict[str, Any] = json.loads((self.home / "node.json").read_text())
        return info

    @property
    def addr(self) -> str:
        """Its first listen address, with ``/p2p/<peer id>``: what others bootstrap from."""
        return str(self.info()["addrs"][0])

    @property
    def peer_id(self) -> str:
        return str(self.info()["peer_id"])

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def call(self, method: str, **params: Any) -> Any:
        """One control request (a connection each: calls from several threads are fine)."""
        with ControlClient(self.home, timeout=self.call_timeout) as client:
            return client.call(method, **params)

    def market_status(self, digest: bool = True) -> dict[str, Any]:
        """The status of its (first) market; ``digest=False`` spares the node hashing it."""
        return dict(self.call("status", digest=digest)["markets"][0])

    def digest(self) -> str:
        return str(self.market_status()["digest"])

    def peers(self) -> int:
        return len(self.call("status", digest=False)["peers"])

    def rss_mb(self) -> float | None:
        """Resident memory (MB) from /proc, or None if it is not running (or not Linux)."""
        if self.proc is None or not self.alive():
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the process has used so far (Linux /proc)."""
        assert self.proc is not None
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    # -- stopping ----------------------------------------------------------------------------

    def interrupt(self) -> None:
        """Ask for an orderly stop (SIGINT) without waiting."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)

    def kill(self) -> None:
        """SIGKILL the node (its whole group if it leads its own session) and reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.own_session:  # the node leads its own process group: the group is ours
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def stop(self, timeout: float = STOP_GRACE) -> int | None:
        """Stop in order (SIGINT); SIGKILL after ``timeout`` s. Returns the exit code."""
        if self.proc is None:
            return None
        self.interrupt()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode

    def kill9(self) -> None:
        """A crash: SIGKILL, no orderly stop (the store must survive it)."""
        self.kill()


def stop_all(nodes: Iterable[NodeProcess], grace: float = STOP_GRACE) -> None:
    """SIGINT every node at once, wait up to ``grace`` s for all of them together, then SIGKILL
    the stragglers. A KeyboardInterrupt while waiting goes straight to SIGKILL."""
    nodes = list(nodes)
    for node in nodes:
        node.interrupt()
    deadline = time.monotonic() + grace
    try:
        for node in nodes:
            if node.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: kill now
    for node in nodes:
        node.kill()


def start_witness(
    home: Path, name: str, config: dict[str, Any], nodes: list[NodeProcess]
) -> tuple[str, NodeProcess]:
    """Start the only witness of a new market ``name`` (tick and lot 1) at ``home`` and add it
    to ``nodes`` (which the caller stops with :func:`stop_all`). Returns the market's spec and
    the node."""
    spec = f"{name}:1:1:{make_identity(home).hex()}"
    node = NodeProcess(home, market=spec, config=config).start()
    nodes.append(node)
    return spec, node


def start_peer(
    home: Path, peer: NodeProcess, spec: str, config: dict[str, Any], nodes: list[NodeProcess]
) -> NodeProcess:
    """Start a node of market ``spec`` at ``home`` that dials ``peer``, add it to ``nodes``, and
    return it once it is connected."""
    node = NodeProcess(home, [peer.addr], market=spec, config=config).start()
    nodes.append(node)
    wait_until(lambda: len(node.call("status")["peers"]) >= 1, 30, f"{home.name} to connect")
    return node


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; AssertionError naming ``what`` after ``timeout`` s.
    A node that does not answer yet (or any OSError) counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (NodeNotRunning, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def run_from_json(text: str) -> int:
    """Run a node from a JSON ``NodeConfig`` (what ``config`` starts): ``home`` a path, and a
    ``network`` object, if any, the ``NetworkConfig``."""
    from .app import NodeConfig, run_node  # here: the harness itself never imports the node

    fields = json.loads(text)
    fields["home"] = Path(fields["home"])
    network = fields.pop("network", None)
    if network is not None:
        from .p2p import NetworkConfig

        fields["network"] = NetworkConfig(**network)
    return run_node(NodeConfig(**fields))


if __name__ == "__main__":  # python -m crdtbook.node.procs '<NodeConfig as JSON>'
    sys.exit(run_from_json(sys.argv[1]))
