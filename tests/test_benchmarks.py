"""The benchmark scripts the README tells users to run still run (tiny sizes, loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # each runs a benchmark script in a child process


def run_benchmark(tmp_path: Path, script: str, *args: str) -> dict[str, Any]:
    """Run benchmarks/SCRIPT with ARGS; its results go to a scratch file, not the repo's."""
    results = tmp_path / "results.json"
    env = {**os.environ, "SYNTHAUG_BENCH_RESULTS": str(results)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| " in done.stdout  # the table
    data: dict[str, Any] = json.loads(results.read_text())
    return data


def test_throughput_benchmark_runs(tmp_path: Path) -> None:
    """`throughput.py` drives a real run against the mock and records its figures."""
    data = run_benchmark(
        tmp_path, "throughput.py", "--items", "24", "--rate", "200", "--latency", "0.02",
        "--no-baseline",
    )  # fmt: skip
    (run,) = data["throughput"]["runs"]
    assert (run["exit_code"], run["ok"], run["duplicates"]) == (0, 24, 0)
    assert run["requests"] >= 24  # a retried 429 is one more request, not one more image
    assert run["cpu_s_per_1000_requests"] > 0


def test_scale_benchmark_runs(tmp_path: Path) -> None:
    """`scale.py` runs a job of the given size to the end."""
    data = run_benchmark(tmp_path, "scale.py", "--sizes", "30")
    (run,) = data["scale"]["runs"]
    assert (run["items"], run["completed"]) == (30, 30)


def test_resume_benchmark_runs(tmp_path: Path) -> None:
    """`resume.py` builds a finished job and every resume of it sends nothing."""
    data = run_benchmark(tmp_path, "resume.py", "--items", "40", "--keep", str(tmp_path / "job"))
    resumes = [r for r in data["resume"]["runs"] if r["command"].startswith("run")]
    assert len(resumes) == 3
    assert all((r["exit_code"], r["requests"], r["skipped_ok"]) == (0, 0, 40) for r in resumes)


def test_realsize_benchmark_runs(tmp_path: Path) -> None:
    """`realsize.py --tiny` runs synthaug and the floor client and records both."""
    data = run_benchmark(tmp_path, "realsize.py", "--tiny")
    runs = data["realsize_tiny"]["runs"]
    assert [r["client"] for r in runs] == ["synthaug", "floor"]
    assert all((r["exit_code"], r["ok"]) == (0, r["items"]) for r in runs)
    assert all(r["cpu_ms_per_image"] > 0 and r["longest_stall_ms"] >= 0 for r in runs)


def test_overask_benchmark_runs(tmp_path: Path) -> None:
    """`overask.py --quick` runs synthaug twice on one OUT against a strict mock."""
    data = run_benchmark(tmp_path, "overask.py", "--quick")
    first, second = data["overask_quick"]["runs"]
    assert first["client"].startswith("synthaug, first")
    assert second["client"].startswith("synthaug, second")
    assert first["requests"] > 0
    assert second["requests"] > 0
    assert first["exit_code"] in (0, 130)  # stopped by SIGINT after its time
    assert first["learned_rate_per_s"] is not None  # asked 4x the limit: it learned one


def test_shards_benchmark_runs(tmp_path: Path) -> None:
    """`shards.py --quick` runs three shards at once on one OUT against a strict mock;
    each shard made images and stopped cleanly."""
    data = run_benchmark(tmp_path, "shards.py", "--quick")
    (row,) = data["shards_quick"]["runs"]
    assert row["shards"] == 3
    assert row["requests"] > 0
    assert row["exit_codes"] == [130, 130, 130]  # each stopped by SIGINT after its time
    assert row["least_shard"] > 0  # every shard made some


def test_batch_benchmark_runs(tmp_path: Path) -> None:
    """`batch.py` collects a Batch API job and runs the same job online, each image once."""
    data = run_benchmark(tmp_path, "batch.py", "--tiny")
    batch, online = data["batch_tiny"]["runs"]
    assert (batch["mode"], batch["ok"], batch["batches"], batch["duplicates"]) == ("batch", 6, 1, 0)
    assert (online["mode"], online["ok"], online["batches"]) == ("online", 6, 0)


def test_check_benchmark_runs(tmp_path: Path) -> None:
    """`check.py --quick` finds every near copy among 10,000 hashes and flags no other."""
    data = run_benchmark(tmp_path, "check.py", "--quick")
    (run,) = data["check"]["index"]
    assert run["near_copies_missed"] == 0
    assert run["random_hashes_flagged"] == 0
    assert run["near_copies_found"] > 500


def test_label_benchmark_runs(tmp_path: Path) -> None:
    """`label.py --quick` labels every image of its backlog once, at both latencies."""
    data = run_benchmark(tmp_path, "label.py", "--quick")
    runs = data["label"]["runs"]
    assert [(r["images"], r["detections"]) for r in runs] == [(24, 24), (24, 24)]
