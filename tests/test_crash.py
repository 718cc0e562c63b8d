"""Kill a real `synthaug run` subprocess and resume it: nothing lost, nothing paid twice.

The mock API runs in its own subprocess so its counters survive the client's death.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from checks import (
    assert_outputs_valid,
    mock_server_process,
    stats,
    wait_until,
    write_job_spec,
)

from pipeline.manifest.log import read_lines

KEY = "sk-crash-UNIQUE-5be1d0c4"
CONCURRENCY = 4

pytestmark = pytest.mark.slow


@pytest.fixture
def mock_api(tmp_path: Path) -> Iterator[str]:
    """`synthaug mock-server` in a subprocess; yields its base URL."""
    with mock_server_process(tmp_path, "--latency", "0.15") as base:
        yield base


def write_spec(tmp_path: Path, base: str, prompts: int, **run: Any) -> Path:
    return write_job_spec(
        tmp_path,
        base,
        name="crash",
        prompts=prompts,
        size="64x64",
        timeout_s=10,
        max_attempts=6,
        rate_limit="100/s",
        **run,
    )


class Run:
    """A `synthaug run` subprocess whose output goes to files (a pipe nobody reads
    could fill and stall it)."""

    def __init__(self, spec: Path, *extra: str) -> None:
        env = {**os.environ, "ROBOFLOW_API_KEY": KEY}
        self._err_path = spec.parent / f"run-{time.monotonic_ns()}.err"
        with self._err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pipeline",
                    "run",
                    str(spec),
                    "--no-progress",
                    "--no-grid",
                    *extra,
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def stderr(self) -> str:
        return self._err_path.read_text()


def start_run(spec: Path, *extra: str) -> Run:
    return Run(spec, *extra)


def manifest_lines(out: Path) -> int:
    path = out / "manifest.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_ten_sigkills_at_seeded_moments_then_resume_completes_exactly_once(
    tmp_path: Path, mock_api: str
) -> None:
    """Killed with SIGKILL ten times at seeded random moments (mid-request, mid-download,
    mid-write), then resumed: every item ok exactly once, every file valid, no unnamed or
    half-written file, at most `concurrency` paid duplicates per kill."""
    prompts = 60
    spec = write_spec(tmp_path, mock_api, prompts)
    out = tmp_path / "out"
    rng = random.Random(20261125)
    thresholds = sorted(rng.sample(range(2, 2 * prompts - 10), 10))
    kills = 0
    for threshold in thresholds:
        proc = start_run(spec)
        wait_until(
            lambda t=threshold, p=proc: manifest_lines(out) >= t or p.poll() is not None,
            what=f"{threshold} manifest lines",
        )
        time.sleep(rng.uniform(0.0, 0.08))  # land anywhere between two checkpoints
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    final = start_run(spec)
    assert final.wait() == 0, final.stderr

    records = list(read_lines(out / "manifest.jsonl"))
    ok_per_key = Counter(r["key"] for r in records if r["status"] == "ok")
    assert len(ok_per_key) == prompts
    assert set(ok_per_key.values()) == {1}
    assert_outputs_valid(out)
    assert kills >= 5
    assert stats(mock_api)["duplicates"] <= CONCURRENCY * kills


def test_sigint_exits_130_with_a_parseable_manifest(tmp_path: Path, mock_api: str) -> None:
    """One SIGINT stops new starts, lets in-flight finish and exits 130; resume completes."""
    spec = write_spec(tmp_path, mock_api, 30)
    out = tmp_path / "out"
    proc = start_run(spec)
    wait_until(lambda: manifest_lines(out) >= 4 or proc.poll() is not None, what="4 manifest lines")
    proc.send_signal(signal.SIGINT)
    assert proc.wait() == 130, proc.stderr
    assert "resume" in proc.stderr
    raw = (out / "manifest.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    for line in raw.splitlines():
        json.loads(line)
    final = start_run(spec)
    assert final.wait() == 0, final.stderr
    assert stats(mock_api)["duplicates"] == 0


def test_sigterm_exits_143(tmp_path: Path, mock_api: str) -> None:
    """SIGTERM (what cron and Kubernetes send) gives exit 143 after a clean checkpoint."""
    spec = write_spec(tmp_path, mock_api, 30)
    out = tmp_path / "out"
    proc = start_run(spec)
    wait_until(lambda: manifest_lines(out) >= 2 or proc.poll() is not None, what="2 manifest lines")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 143, proc.stderr
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "sigterm"


def test_second_run_on_same_out_is_refused_while_first_holds_it(
    tmp_path: Path, mock_api: str
) -> None:
    """Two runs on one OUT at once (overlapping cron nights): the second exits 2."""
    spec = write_spec(tmp_path, mock_api, 30)
    out = tmp_path / "out"
    first = start_run(spec)
    try:
        wait_until(
            lambda: manifest_lines(out) >= 1 or first.poll() is not None, what="first manifest line"
        )
        second = start_run(spec)
        assert second.wait() == 2, second.stderr
        assert "in use" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_second_sigint_cancels_in_flight_at_once(tmp_path: Path) -> None:
    """A second SIGINT does not wait for slow answers: exit 130, manifest still parseable."""
    with mock_server_process(tmp_path, "--latency", "30") as base:
        # A grace period far longer than the wait below: only the second SIGINT can end it.
        spec = write_spec(tmp_path, base, 8, grace_period_s=3600)
        proc = start_run(spec)
        wait_until(lambda: stats(base)["requests"] >= CONCURRENCY, what="requests in flight")
        proc.send_signal(signal.SIGINT)
        wait_until(lambda: "SIGINT received" in proc.stderr, what="first SIGINT handled")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, proc.stderr
        manifest = tmp_path / "out" / "manifest.jsonl"
        for line in manifest.read_bytes().splitlines() if manifest.exists() else []:
            json.loads(line)
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["stop_reason"] == "sigint"
        assert summary["ok"] == 0
