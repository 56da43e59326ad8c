"""A stand-in ``crdtbook node`` process for the demo tests (no libp2p, no core).

Usage (as the demo runs nodes): ``python fake_node.py node --home H --listen A [--bootstrap B]...``.
It listens on a real loopback TCP port (so the tests can check that ports are released), serves
the control protocol on ``H/control.sock`` and "replicates" by writing every op into a directory
shared by all homes of one demo (``H/../shared-ops``), so every node converges to the same digest.

Finality, as the control API reports it (issue #8): the market given with ``--market`` (a spec
or ``@FILE``) is witnessed when it names witnesses; the node's witness key is read from
``H/identity.key``. Each buy at 100 or more "fills" once against the ladder (so the demo's race
makes 2 fills), and an op is final once it is ``FAKE_FINAL_DELAY`` seconds old (default 0.3;
every node sees the same files, so they agree).

``FAKE_NODE_MODE`` changes its behaviour: ``ok`` (default), ``diverge`` (each node's digest also
covers its own name, so nodes never agree), ``die`` (exit 3 at once), ``stubborn`` (ignore SIGINT,
so only SIGKILL stops it), ``nofinal`` (a witness stays silent: nothing ever turns final).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

MODE = os.environ.get("FAKE_NODE_MODE", "ok")
FINAL_DELAY = float(os.environ.get("FAKE_FINAL_DELAY", "0.3"))


class Node:
    """State of one fake node."""

    def __init__(self, home: Path, port: int, spec: str) -> None:
        self.home = home
        self.port = port
        self.shared = home.parent / "shared-ops"
        self.shared.mkdir(exist_ok=True)
        self.peer_id = f"FakePeer-{home.name}"
        self.started = time.time()
        self.spec = spec
        parts = spec.split(":")
        self.witnesses = sorted(parts[3].split(",")) if len(parts) == 4 else []
        seed = (home / "identity.key").read_bytes() if (home / "identity.key").exists() else None
        from crdtbook import Identity

        self.key = Identity.from_seed(seed).public_key.hex() if seed else "00" * 32

    def ops(self) -> list[dict[str, Any]]:
        out = []
        now = time.time()
        for p in sorted(self.shared.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
            try:
                op = json.loads(p.read_text())
                age = now - p.stat().st_mtime
            except (ValueError, OSError):
                continue  # being written
            op["final"] = bool(self.witnesses) and MODE != "nofinal" and age >= FINAL_DELAY
            out.append(op)
        return out

    def fills(self) -> list[dict[str, Any]]:
        out = []
        for op in self.ops():
            if op.get("side") == "buy" and int(op.get("price", 0)) >= 100:
                out.append(
                    {
                        "index": len(out),
                        "market": "DEMO",
                        "taker": op["id"],
                        "maker": "00" * 32,
                        "taker_side": "buy",
                        "price": "100",
                        "quantity": op["quantity"],
                        "final": op["final"],
                    }
                )
        return out

    def final_count(self) -> int:
        n = 0
        for f in self.fills():
            if not f["final"]:
                break
            n += 1
        return n

    def finality(self) -> dict[str, Any]:
        ops = self.ops()
        final_ops = sum(1 for op in ops if op["final"])
        if not self.witnesses:
            state = "none"
        elif final_ops == len(ops):
            state = "final"
        else:
            state = "stalled" if MODE == "nofinal" else "pending"
        return {
            "witnessed": bool(self.witnesses),
            "frontier": 7 * final_ops,
            "final_ops": final_ops,
            "final_fills": self.final_count(),
            "epoch": 0,
            "finality": state,
            "stalled_on": self.witnesses[:1] if state == "stalled" else [],
            "witnesses": [
                {
                    "key": key,
                    "me": key == self.key,
                    "current": True,
                    "forked": False,
                    "heartbeat_lamport": 7 * final_ops,
                    "heartbeat_seq": 1,
                    "silent_s": 0.1,
                }
                for key in self.witnesses
            ],
        }

    def digest(self) -> str:
        h = hashlib.sha256()
        for op in self.ops():
            op.pop("final")  # derived, and it changes with time: not part of the state
            h.update(json.dumps(op, sort_keys=True).encode())
        if MODE == "diverge":
            h.update(self.home.name.encode())
        return h.hexdigest()

    def write_op(self, op: dict[str, Any]) -> None:
        tmp = self.shared / f".{op['id']}.tmp"
        tmp.write_text(json.dumps(op))
        tmp.rename(self.shared / f"{op['id']}.json")

    def peers(self) -> list[dict[str, Any]]:
        return [
            {"peer_id": f"FakePeer-{p.name}", "addrs": []}
            for p in sorted(self.home.parent.glob("node*"))
            if p != self.home and (p / "control.sock").exists()
        ]

    def handle(self, method: str, params: dict[str, Any]) -> Any:
        if method == "status":
            return {
                "peer_id": self.peer_id,
                "addrs": [f"/ip4/127.0.0.1/tcp/{self.port}"],
                "peers": self.peers(),
                "markets": [
                    {
                        "name": "DEMO",
                        "id": "00" * 32,
                        "tick": "1",
                        "lot": "1",
                        "ops": len(self.ops()),
                        "pending": 0,
                        "heads": [],
                        "digest": self.digest(),
                        "last_sync": time.time(),
                        "orders": 0,
                        "fills": len(self.fills()),
                        **self.finality(),
                    }
                ],
                "author": self.key,
                "version": "fake",
                "uptime": time.time() - self.started,
                "pid": os.getpid(),
            }
        if method == "submit":
            oid = uuid.uuid4().hex * 2
            order = {
                "id": oid,
                "market": "DEMO",
                "author": self.peer_id,
                "side": params["side"],
                "price": params["price"],
                "quantity": params["quantity"],
                "remaining": params["quantity"],
                "filled": "0",
                "tif": params.get("tif", "gtc"),
                "status": "open",
                "reason": None,
                "tag": params.get("tag"),
                "mine": True,
            }
            self.write_op(order)
            return {"order": {**order, "final": False}, "fills": [], "final": False}
        if method == "markets":
            return [
                {
                    "name": "DEMO",
                    "id": "00" * 32,
                    "tick": "1",
                    "lot": "1",
                    "witnessed": bool(self.witnesses),
                    "witnesses": len(self.witnesses),
                    "frontier": self.finality()["frontier"],
                }
            ]
        if method == "cancel_all":
            return {
                "market": "DEMO",
                "cancel_id": "cc" * 32,
                "prefix": params.get("prefix"),
                "cancelled": 0,
                "final": False,
            }
        if method == "cancel":
            for op in self.ops():
                if op["id"].startswith(params["order_id"]):
                    self.write_op({"id": uuid.uuid4().hex, "cancels": op["id"]})
                    return {"order": op, "cancel_id": "cc" * 32, "effective": True}
            raise LookupError(params["order_id"])
        if method == "order":
            for op in self.ops():
                if op["id"] == params["order_id"]:
                    return op
            raise LookupError(params["order_id"])
        if method == "book":
            return {
                "market": "DEMO",
                "bids": [],
                "asks": [],
                "best_bid": None,
                "best_ask": None,
                "spread": None,
                "mid": None,
                "digest": self.digest(),
                "witnessed": bool(self.witnesses),
                "frontier": self.finality()["frontier"],
            }
        if method == "fills":
            return {
                "market": "DEMO",
                "fills": self.fills(),
                "witnessed": bool(self.witnesses),
                "final_count": self.final_count(),
            }
        raise KeyError(method)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--home", required=True)
    parser.add_argument("--listen", action="append", default=[])
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--market", action="append", default=[])
    args = parser.parse_args()
    if MODE == "die":
        print("fake node: dying on purpose", file=sys.stderr)
        return 3
    if MODE == "stubborn":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    home = Path(args.home)
    spec = args.market[0] if args.market else "DEMO"
    if spec.startswith("@"):
        spec = Path(spec[1:]).read_text().strip()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    node = Node(home, tcp.getsockname()[1], spec)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for raw in self.rfile:
                req = json.loads(raw)
                try:
                    reply = {"id": req["id"], "result": node.handle(req["method"], req["params"])}
                except Exception as exc:
                    reply = {"id": req["id"], "error": {"code": "not_found", "message": str(exc)}}
                self.wfile.write(json.dumps(reply).encode() + b"\n")
                self.wfile.flush()

    sock_path = home / "control.sock"
    server = socketserver.ThreadingUnixStreamServer(str(sock_path), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"fake node {node.peer_id} on port {node.port}", flush=True)
    try:
        while True:
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        sock_path.unlink(missing_ok=True)
        tcp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
