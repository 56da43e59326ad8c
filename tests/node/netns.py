"""Network namespaces for multi-node tests: a real network split, and delay plus loss.

Layout (every name unique per run, every address inside namespaces this module creates)::

    node ns <run>-n1 .. nK      eth0 10.213.S.i/24 (S random per run)
           | veth
    switch ns <run>-sw          port nI -> bridge brG of its group G;
                                bridges of groups G and G+1 joined by a veth gG <-> hG+1

``split()`` sets the veths between the group bridges down (the groups' own bridges keep
working: each group still trades inside); ``heal()`` sets them up again. ``impair()`` adds delay
and loss to every node's link: ``tc netem`` where the kernel has it, else (a kernel built without
``CONFIG_NET_SCH_NETEM``) a hub in the switch namespace, this file run as a script, that
forwards each frame between the node ports after the delay and drops the given share.

:func:`lab` deletes every namespace it made (and with it every veth and bridge) on exit, also
when the test fails; :func:`sweep_stale` deletes those of earlier runs whose process is gone.

Only the standard library at import time: the hub runs this file as a script.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import random
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "cbk"
#: 10.213.0.0/16 exists only inside the namespaces made here.
NET = "10.213"
NETNS_DIR = Path("/var/run/netns")


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no ``ip``, or the kernel refuses)."""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _run(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *args], capture_output=True, text=True, timeout=20
    )


def sweep_stale() -> None:
    """Delete namespaces of earlier runs whose process no longer exists (a killed pytest)."""
    if not NETNS_DIR.is_dir():
        return
    for entry in NETNS_DIR.iterdir():
        parts = entry.name.split("-")
        if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            subprocess.run(["ip", "netns", "del", entry.name], capture_output=True, timeout=20)
        except PermissionError:
            pass


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None if they can."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    name = f"{PREFIX}-{os.getpid()}-probe{secrets.token_hex(2)}"
    try:
        _ip("netns", "add", name)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns add` failed: {exc}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
    return None


@dataclass
class Lab:
    groups: list[int]
    run: str = field(default_factory=lambda: f"{PREFIX}-{os.getpid()}-{secrets.token_hex(2)}")
    subnet: int = field(default_factory=lambda: random.randint(1, 254))
    namespaces: list[str] = field(default_factory=list)
    hub: subprocess.Popen[bytes] | None = None
    impairment: str = ""

    @property
    def switch(self) -> str:
        return f"{self.run}-sw"

    @property
    def size(self) -> int:
        return sum(self.groups)

    def ns(self, i: int) -> str:
        """Namespace of node ``i`` (0-based)."""
        return f"{self.run}-n{i + 1}"

    def address(self, i: int) -> str:
        return f"{NET}.{self.subnet}.{i + 1}"

    def listen(self, i: int) -> str:
        return f"/ip4/{self.address(i)}/tcp/0"

    def prefix(self, i: int) -> list[str]:
        """Command prefix that runs a process in node ``i``'s namespace."""
        return ["ip", "netns", "exec", self.ns(i)]

    def group_of(self, i: int) -> int:
        bound = 0
        for g, count in enumerate(self.groups):
            bound += count
            if i < bound:
                return g
        raise IndexError(i)

    def members(self, group: int) -> list[int]:
        return [i for i in range(self.size) if self.group_of(i) == group]

    # -- building ---------------------------------------------------------------------------

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def build(self) -> None:
        sw = self.switch
        self._add_ns(sw)
        for g in range(len(self.groups)):
            _ip("-n", sw, "link", "add", f"br{g}", "type", "bridge")
            _ip("-n", sw, "link", "set", f"br{g}", "up")
        for g in range(len(self.groups) - 1):
            _ip("-n", sw, "link", "add", f"g{g}", "type", "veth", "peer", "name", f"h{g + 1}")
            _ip("-n", sw, "link", "set", f"g{g}", "master", f"br{g}", "up")
            _ip("-n", sw, "link", "set", f"h{g + 1}", "master", f"br{g + 1}", "up")
        for i in range(self.size):
            ns = self.ns(i)
            self._add_ns(ns)
            port = f"n{i + 1}"
            veth = ["type", "veth", "peer", "name", port, "netns", sw]
            _ip("link", "add", "eth0", "netns", ns, *veth)
            _ip("-n", sw, "link", "set", port, "master", f"br{self.group_of(i)}", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    # -- faults -----------------------------------------------------------------------------

    def _links(self, state: str) -> None:
        for g in range(len(self.groups) - 1):
            _ip("-n", self.switch, "link", "set", f"g{g}", state)
            _ip("-n", self.switch, "link", "set", f"h{g + 1}", state)

    def split(self) -> None:
        """Cut the links between the groups' switches: each group only reaches itself."""
        self._links("down")

    def heal(self) -> None:
        self._links("up")

    def impair(self, delay_ms: int, loss_pct: float) -> str:
        """Delay and loss on every node's link; returns how (for the report)."""
        failed = ""
        for i in range(self.size):
            netem = ["netem", "delay", f"{delay_ms}ms", "loss", f"{loss_pct}%"]
            result = _run(self.ns(i), "tc", "qdisc", "add", "dev", "eth0", "root", *netem)
            if result.returncode != 0:
                failed = result.stderr.strip() or f"exit {result.returncode}"
                break
        else:
            self.impairment = f"tc netem delay {delay_ms}ms loss {loss_pct}% on each eth0"
            return self.impairment
        for i in range(self.size):  # undo a partial netem set-up
            _run(self.ns(i), "tc", "qdisc", "del", "dev", "eth0", "root")
        ports = [f"n{i + 1}" for i in range(self.size)]
        for port in ports:  # the hub replaces the bridges (connections live on: same L2)
            _ip("-n", self.switch, "link", "set", port, "nomaster")
        hub = [sys.executable, __file__, "hub", str(delay_ms / 1000), str(loss_pct / 100)]
        self.hub = subprocess.Popen(
            ["ip", "netns", "exec", self.switch, *hub, *ports], stderr=subprocess.PIPE
        )
        time.sleep(0.2)  # it binds its sockets at once; a failure shows in that time
        if self.hub.poll() is not None:
            err = self.hub.stderr.read().decode(errors="replace") if self.hub.stderr else ""
            raise RuntimeError(f"the hub exited: {err}")
        self.impairment = (
            f"hub in the switch namespace, {delay_ms} ms and {loss_pct}% loss per hop "
            f"(tc netem refused: {failed})"
        )
        return self.impairment

    def close(self) -> None:
        if self.hub is not None and self.hub.poll() is None:
            self.hub.send_signal(signal.SIGTERM)
            try:
                self.hub.wait(5)
            except subprocess.TimeoutExpired:
                self.hub.kill()
                self.hub.wait(5)
        if self.hub is not None and self.hub.stderr is not None:
            self.hub.stderr.close()
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        self.namespaces.clear()


@contextlib.contextmanager
def lab(groups: Sequence[int]) -> Iterator[Lab]:
    """Namespaces for ``groups`` (e.g. ``[3, 2]``); raises NetnsUnavailable where they cannot
    be made. Everything made is deleted on exit."""
    reason = unavailable_reason()
    if reason is not None:
        raise NetnsUnavailable(reason)
    sweep_stale()
    made = Lab(list(groups))
    try:
        made.build()
        yield made
    finally:
        made.close()


# -- the hub (run as a script in the switch namespace) ---------------------------------------

_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_VNET_HDR = 15
_PACKET_OUTGOING = 4
_VNET_HDR = 10  # struct virtio_net_hdr, before each frame


def run_hub(ports: list[str], delay: float, loss: float) -> None:
    """Forward frames between ``ports`` after ``delay`` s, dropping a ``loss`` share of them.

    Learns source MACs (unicast goes to one port once known, the rest floods). The virtio-net
    header (PACKET_VNET_HDR) carries segmentation offload through unchanged, so 64 KB TCP
    super-frames from the veths pass without being cut up here.
    """
    rng = random.Random()
    sel = selectors.DefaultSelector()
    socks: dict[int, socket.socket] = {}
    for name in ports:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        s.setsockopt(_SOL_PACKET, _PACKET_VNET_HDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((name, 0))
        s.setblocking(False)
        socks[s.fileno()] = s
        sel.register(s, selectors.EVENT_READ)
    where: dict[bytes, int] = {}
    queue: list[tuple[float, int, int, bytes]] = []
    seq = 0
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    while not stop:
        now = time.monotonic()
        timeout = max(0.0, queue[0][0] - now) if queue else 0.5
        for key, _ in sel.select(min(timeout, 0.5)):
            s = socks[key.fd]
            while True:
                try:
                    data, addr = s.recvfrom(1 << 17)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if addr[2] == _PACKET_OUTGOING or len(data) < _VNET_HDR + 14:
                    continue
                frame = data[_VNET_HDR:]
                dst, src = frame[:6], frame[6:12]
                where[src] = key.fd
                out = where.get(dst) if not dst[0] & 1 else None
                targets = [out] if out is not None else list(socks)
                due = time.monotonic() + delay
                for fd in targets:
                    if fd == key.fd or rng.random() < loss:
                        continue
                    seq += 1
                    heapq.heappush(queue, (due, seq, fd, data))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, fd, data = heapq.heappop(queue)
            with contextlib.suppress(OSError):
                socks[fd].send(data)


if __name__ == "__main__" and len(sys.argv) > 4 and sys.argv[1] == "hub":
    run_hub(sys.argv[4:], float(sys.argv[2]), float(sys.argv[3]))
