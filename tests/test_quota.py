"""A quota nobody told us: an exhausted account aborts at once, a learned pace is kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checks import run_spec, write_job_spec

from pipeline.errors import EXIT_FATAL
from pipeline.jobspec.load import load_spec
from pipeline.limiter import LearnedPace
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.run.prepare import read_learned_pace

KEY = "sk-test-quota-5b1e"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The specs read their key from ROBOFLOW_API_KEY."""
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)


async def test_insufficient_quota_ends_the_run_with_exit_3(tmp_path: Path) -> None:
    """An account without credit stops the job at once: exit 3, one line saying what to do."""
    config = MockConfig(error_rate=1.0, faults={"insufficient_quota": 1.0})
    async with MockServer(config) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=40, concurrency=4)
        result = await run_spec(path)
    assert result.exit_code == EXIT_FATAL
    assert server.stats.requests <= 4  # at most the requests already in flight
    assert result.summary["rate_limited_429"] == 0  # never treated as a rate limit
    assert result.message is not None
    assert "add credit or raise the billing limit" in result.message
    assert "run the same command again" in result.message
    assert "\n" not in result.message


async def test_learned_rate_is_written_and_the_next_run_starts_from_it(tmp_path: Path) -> None:
    """A run that met a stricter limit than its spec records it; the next run reads it back."""
    config = MockConfig(rate_limit=20.0, burst=1, min_retry_after_s=0.2)
    async with MockServer(config) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=30, rate_limit="80/s")
        first = await run_spec(path)
    assert first.exit_code == 0
    assert first.summary["rate_limited_429"] > 0
    section = first.summary["limiter"]
    assert 0 < section["learned_rate_per_s"] < 80.0
    assert section["rate_429_per_s"] is not None
    learned = read_learned_pace(load_spec(path))
    assert learned == LearnedPace(
        rate_per_s=section["learned_rate_per_s"], rate_429_per_s=section["rate_429_per_s"]
    )


@pytest.mark.parametrize(
    "summary",
    [
        pytest.param(None, id="missing"),
        pytest.param("{not json", id="corrupt"),
        pytest.param(json.dumps({"backend": "mock", "limiter": {}}), id="other-backend"),
        pytest.param(json.dumps({"backend": "roboflow", "limiter": 3}), id="odd-section"),
    ],
)
def test_no_usable_summary_starts_from_the_spec_rate(tmp_path: Path, summary: str | None) -> None:
    """A missing, corrupt or foreign summary teaches nothing: the spec's rate applies."""
    path = write_job_spec(tmp_path, "http://127.0.0.1:9", rate_limit="40/s")
    out = tmp_path / "out"
    out.mkdir()
    if summary is not None:
        (out / "summary.json").write_text(summary)
    assert read_learned_pace(load_spec(path)) is None
