"""Coverage-guided fuzzing (atheris, libFuzzer) of what a peer's bytes reach first.

Targets (each run in a process of its own, for ``--seconds`` each, default 60):

- ``op``: ``crdtbook.decode`` (fast and reference decoders, signature check): returns an op whose
  canonical bytes are the input, or raises ``InvalidOp``.
- ``batch``: ``node.wire.decode_batch`` (gossip messages), raises only ``WireError``.
- ``request`` / ``response``: ``node.wire.decode_request`` / ``decode_response`` (sync frames),
  raise only ``WireError``.
- ``frames``: the sync stream's length-prefixed frame reader (``FrameStream``), fed the input in
  chunks: returns frames within its size bound or raises ``FrameError``/``StreamEOF``.

Anything else is a crash: libFuzzer stops, prints the traceback and writes the input to
``crash-*`` in the working directory. Prints, per target: executions, executions per second,
coverage (libFuzzer's ``cov``/``ft``), corpus size and crashes.

    .venv/bin/python bench/fuzz_atheris.py                 # all targets, 60 s each
    .venv/bin/python bench/fuzz_atheris.py --seconds 10 --target op --target batch

atheris comes from the package registry; if it is missing this script installs it, and if that
fails it says why and exits 0 (skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("op", "batch", "request", "response", "frames")


def ensure_atheris() -> str | None:
    """None if atheris imports (installing it if needed), else the reason it cannot."""
    try:
        import atheris

        del atheris
        return None
    except ImportError:
        pass
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "atheris"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return f"pip install atheris failed: {lines[-1] if lines else result.returncode}"
    try:
        import atheris  # noqa: F401
    except ImportError as exc:
        return f"atheris installed but does not import: {exc}"
    return None


def seeds() -> dict[str, list[bytes]]:
    """Valid inputs to start from (libFuzzer mutates them)."""
    from crdtbook import BloomFilter, Identity, Market
    from crdtbook._ops import CancelBody, HeartbeatBody, OrderBody, sign_op
    from crdtbook.node.wire import (
        SyncRequest,
        SyncResponse,
        encode_batch,
        encode_request,
        encode_response,
    )

    alice = Identity.from_seed(b"a" * 32)
    v1 = Market.parse("DEMO:1:1")
    v2 = Market("W", "1", "1", witnesses=(alice.public_key,))
    order = sign_op(alice, v1.id, 1, 1, (), OrderBody("sell", 100, 1, "gtc", "tag"))
    cancel = sign_op(alice, v1.id, 2, 2, (order.id,), CancelBody(order.id))
    beat = sign_op(alice, v2.id, 1, 1, (), HeartbeatBody(5), version=2)
    ops = [order.raw, cancel.raw, beat.raw]
    bloom = BloomFilter.for_ids([order.id, cancel.id])
    request = encode_request(
        SyncRequest(v1.id, [cancel.id], [order.id], bloom, {alice.public_key: 2}, bloom)
    )
    responses = [
        encode_response(SyncResponse(ops, [cancel.id], True)),
        encode_response(SyncResponse([], [], False, "unknown_market", "no")),
    ]

    def framed(*frames: bytes) -> bytes:
        out = bytearray()
        for frame in frames:
            n = len(frame)
            while True:
                byte, n = n & 0x7F, n >> 7
                out.append(byte | 0x80 if n else byte)
                if not n:
                    break
            out += frame
        return bytes(out)

    return {
        "op": ops,
        "batch": [encode_batch(ops)],
        "request": [request],
        "response": responses,
        "frames": [framed(request, *responses)],
    }


def run_target(name: str, seconds: int, corpus: Path) -> None:
    """In this process: instrument, then fuzz ``name`` until libFuzzer's time is up."""
    import atheris

    with atheris.instrument_imports(include=["crdtbook"]):
        import crdtbook
        import crdtbook.node.wire as wire
        from crdtbook.node.p2p import FrameError, FrameStream, StreamEOF
    import trio

    def op_target(data: bytes) -> None:
        try:
            op = crdtbook.decode(data)
        except crdtbook.InvalidOp:
            return
        if op.raw != data:
            raise AssertionError("decoded an op from bytes that are not its encoding")

    def wire_target(decoder: object) -> object:
        def target(data: bytes) -> None:
            with contextlib.suppress(wire.WireError):
                decoder(data)  # type: ignore[operator]

        return target

    class Chunks:
        def __init__(self, data: bytes) -> None:
            self.data = data

        async def read(self, n: int | None = None) -> bytes:
            # Chunk sizes come from the input itself, so libFuzzer explores splits too.
            if not self.data:
                return b""
            size = 1 + self.data[0] % 97
            chunk, self.data = self.data[1 : 1 + size], self.data[1 + size :]
            return chunk

    async def read_all(data: bytes) -> None:
        stream = FrameStream(Chunks(data), "fuzz", "/fuzz", 1.0)  # type: ignore[arg-type]
        max_size = 1 + (data[0] if data else 0) * 64
        while True:
            try:
                frame = await stream.read_frame(max_size)
            except (FrameError, StreamEOF):
                return
            if len(frame) > max_size:
                raise AssertionError("frame over its bound")

    def frames_target(data: bytes) -> None:
        trio.run(read_all, data)

    targets = {
        "op": op_target,
        "batch": wire_target(wire.decode_batch),
        "request": wire_target(wire.decode_request),
        "response": wire_target(wire.decode_response),
        "frames": frames_target,
    }
    argv = [
        sys.argv[0],
        f"-max_total_time={seconds}",
        "-max_len=8192",
        "-print_final_stats=1",
        "-timeout=10",
        str(corpus),
    ]
    atheris.Setup(argv, targets[name])
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--target", action="append", choices=TARGETS, help="default: all")
    parser.add_argument("--run", choices=TARGETS, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run:
        run_target(args.run, args.seconds, Path(args.corpus))
        return 0

    reason = ensure_atheris()
    if reason is not None:
        print(f"fuzz_atheris: skipped: {reason}")
        return 0

    print(f"fuzz_atheris: {args.seconds} s per target, python {sys.version.split()[0]}")
    print(f"{'target':<9} {'execs':>11} {'exec/s':>8} {'cov':>6} {'ft':>6} {'corpus':>7}  result")
    failures = 0
    all_seeds = seeds()
    for name in args.target or TARGETS:
        with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
            corpus = Path(tmp)
            for index, seed in enumerate(all_seeds[name]):
                (corpus / f"seed{index}").write_bytes(seed)
            started = time.monotonic()
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--run",
                    name,
                    "--seconds",
                    str(args.seconds),
                    "--corpus",
                    tmp,
                ],
                capture_output=True,
                text=True,
                timeout=args.seconds + 120,
                env={**os.environ, "PYTHONHASHSEED": "0"},
            )
            elapsed = time.monotonic() - started
            log = proc.stderr + proc.stdout
            done = re.findall(r"Done (\d+) runs in (\d+) second", log)
            execs = int(done[-1][0]) if done else _last_int(r"#(\d+)\s", log)
            cov = _last_int(r"cov: (\d+)", log)
            ft = _last_int(r"ft: (\d+)", log)
            units = len(list(corpus.iterdir()))
            crashed = proc.returncode != 0
            result = "no crash" if not crashed else f"CRASH (exit {proc.returncode})"
            print(
                f"{name:<9} {execs:>11,} {execs / max(elapsed, 1e-9):>8,.0f} {cov:>6} {ft:>6} "
                f"{units:>7}  {result}"
            )
            if crashed:
                failures += 1
                print("\n".join(log.splitlines()[-40:]))
    return 1 if failures else 0


def _last_int(pattern: str, text: str) -> int:
    found = re.findall(pattern, text)
    return int(found[-1]) if found else 0


if __name__ == "__main__":
    sys.exit(main())
