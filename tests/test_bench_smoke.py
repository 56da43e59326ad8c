"""The benchmarks must keep running as the code changes (their targets are checked by the
benches themselves, not here: speed is not a test verdict on a shared machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench_json(script: str, *args: str, timeout: float) -> Any:
    """Run ``bench/script`` with ``args`` (and ``--json``); its JSON report."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.mark.timeout(180)
def test_core_bench_quick_runs_and_reports_every_figure() -> None:
    results = bench_json("bench_core.py", "--quick", timeout=170)["results"]
    for key in (
        "apply_ops_per_s",
        "apply_many_ops_per_s",
        "plain_ops_per_s",
        "apply_vs_plain",
        "raw_verify_ops_per_s",
        "apply_raw_vs_verify",
        "memory_total_b_per_op",
    ):
        assert key in results, key


@pytest.mark.timeout(120)
def test_restart_bench_runs_and_both_paths_agree() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_restart.py"),
            "--ops",
            "3000",
            "--reps",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = json.loads(out.stdout)["results"]
    assert row["ops"] == 3000 and row["covered"] == 2700  # the stop leaves a tenth out
    for key in ("full_us_per_op", "checkpoint_us_per_op", "speedup", "checkpoint_write_ms"):
        assert row[key] > 0, key


@pytest.mark.timeout(120)
def test_kill_soak_bench_runs_and_loses_nothing() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_kill_soak.py"),
            "--quick",
            "--kills",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["pass"] and report["totals"]["missing"] == 0
    (row,) = report["kills"]
    assert row["store_opened"] and row["acknowledged"] == row["found_after_kill"]


@pytest.mark.timeout(150)
def test_join_from_several_peers_pulls_the_log_about_once() -> None:
    """Each peer's first session pulled the whole log (4 peers: 4x); a market never pulled is
    pulled from one peer first. Not a speed figure: how many ops crossed."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_join_peers.py"), "--ops", "3000",
         "--peers", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=140,
        cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["digests_agree"] is True
    assert result["ops_pulled"] >= 3000 and result["pulled_to_log"] < 1.5, result


@pytest.mark.timeout(120)
def test_derive_bench_runs_and_derives_fills_and_orders() -> None:
    report = bench_json("bench_derive.py", "6000", timeout=110)
    assert report["prefix_ops"] > 4000 and report["fills"] > 0 and report["orders"] > 0
    assert report["derive_pass_ops_per_s"] > 0 and report["history_check_ops_per_s"] > 0
