"""Chaos: the real engine against a mock API injecting random mixes of faults.

Hypothesis draws the mix (429 with seconds / HTTP-date / no Retry-After, 5xx, slow
answers beyond the client timeout, dropped connections, malformed and wrong-shaped JSON,
corrupt and truncated images, image URLs that 404 once) and the run settings; each
example is one whole run on loopback, and the invariants below must hold for all of them.
Derandomized: the same examples run on every machine.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from checks import assert_outputs_valid, write_job_spec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.jobspec.load import load_spec
from pipeline.manifest.log import read_latest
from pipeline.mockapi.config import FAULT_KINDS, MockConfig, ResponseShape, RetryAfterForm
from pipeline.mockapi.server import MockServer
from pipeline.run.job import JobResult, run_job

KEY = "sk-chaos-0c5e1f"
PROMPTS = 10
TIMEOUT_S = 0.75
SLOW_S = 1.0  # > TIMEOUT_S: a slow answer is a client timeout
RETRY_AFTER_S = 0.2  # > the mock's pause grace, so a start in the pause is caught
LATENCY_S = 0.03  # spreads starts out, so a client ignoring a pause would start inside it

# The error kind an item must end with when this fault hit its last attempt.
EXPECTED_KIND: Mapping[str, str] = {
    "429": "http_status",
    "500": "http_status",
    "502": "http_status",
    "503": "http_status",
    "504": "http_status",
    "drop": "connection",
    "slow": "timeout",
    "malformed": "bad_response",
    "wrong_shape": "bad_response",
    "corrupt_image": "bad_image",
    "truncated_image": "bad_image",
}
# Faults after which the attempt still succeeds (the download is retried at once).
HARMLESS = frozenset({None, "image_404_once"})
# Faults the mock injects after counting a paid generation.
PAID = frozenset({"drop", "slow", "corrupt_image", "truncated_image"})


@dataclass(frozen=True)
class Scenario:
    """One drawn chaos run."""

    faults: dict[str, int]
    error_rate: float
    seed: int
    retry_after_form: RetryAfterForm
    response_shape: ResponseShape
    max_attempts: int
    concurrency: int
    n: int


scenarios = st.builds(
    Scenario,
    faults=st.dictionaries(
        st.sampled_from(FAULT_KINDS), st.integers(1, 4), min_size=1, max_size=len(FAULT_KINDS)
    ),
    error_rate=st.sampled_from([0.2, 0.35, 0.5, 0.7]),
    seed=st.integers(0, 2**16),
    retry_after_form=st.sampled_from(["seconds", "date", "none"]),
    response_shape=st.sampled_from(["data", "array", "images", "results", "b64_json"]),
    max_attempts=st.integers(2, 5),
    concurrency=st.sampled_from([2, 4]),
    n=st.sampled_from([1, 2]),
)


def storm(form: RetryAfterForm, error_rate: float) -> Scenario:
    """Mostly 429s with a little 5xx, answered with Retry-After in `form`."""
    return Scenario(
        faults={"429": 6, "503": 1},
        error_rate=error_rate,
        seed=3,
        retry_after_form=form,
        response_shape="data",
        max_attempts=5,
        concurrency=4,
        n=1,
    )


def write_spec(folder: Path, base_url: str, scenario: Scenario) -> Path:
    return write_job_spec(
        folder,
        base_url,
        name="chaos",
        prompts=PROMPTS,
        n=scenario.n,
        timeout_s=TIMEOUT_S,
        concurrency=scenario.concurrency,
        max_attempts=scenario.max_attempts,
        backoff_max_s=0.05,
        max_consecutive_failures=1000,
    )


async def run_scenario(folder: Path, scenario: Scenario) -> tuple[JobResult, MockServer]:
    config = MockConfig(
        error_rate=scenario.error_rate,
        faults=dict(scenario.faults),
        seed=scenario.seed,
        retry_after_s=RETRY_AFTER_S,
        retry_after_form=scenario.retry_after_form,
        response_shape=scenario.response_shape,
        slow_s=SLOW_S,
        latency_s=LATENCY_S,
        max_px=32,
    )
    async with MockServer(config) as server:
        path = write_spec(folder, server.base_url, scenario)
        result = await run_job(load_spec(path), spec_path=path, install_signals=False)
    return result, server


def check_invariants(out: Path, scenario: Scenario, result: JobResult, server: MockServer) -> None:
    latest = read_latest(out / "manifest.jsonl")
    stats = server.stats
    assert sum(len(faults) for faults in server.stats.faults_by_prompt.values()) == stats.requests
    assert len(latest) == PROMPTS, "an item has no manifest line"
    failed = 0
    for record in latest.values():
        faults = server.stats.faults_by_prompt[record["prompt"]]
        where = f"{record['prompt']}: faults {faults}, record {record['status']}"
        assert 1 <= len(faults) <= scenario.max_attempts, where
        assert record["attempts"] == len(faults), where
        if faults[-1] in HARMLESS:
            assert record["status"] == "ok", where
            assert len(record["outputs"]) == scenario.n, where
        else:
            failed += 1
            assert record["status"] == "failed", where
            assert len(faults) == scenario.max_attempts, where
            assert record["error"]["kind"] == EXPECTED_KIND[faults[-1]], where
    assert result.stop_reason is None
    assert result.exit_code == (1 if failed else 0)
    assert stats.starts_during_pause == 0
    paid_faults = sum(
        f in PAID for faults in server.stats.faults_by_prompt.values() for f in faults
    )
    assert stats.duplicates <= paid_faults
    assert_outputs_valid(out)


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    # Each example makes its own temp dir; the function-scoped sandbox only sets cwd/env.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios)
# Always run these, whatever Hypothesis draws: each Retry-After form under a 429 storm,
# and every fault kind at once.
# An HTTP date rounds up to a whole second: that storm is kept small to stay fast.
@example(scenario=storm("seconds", 0.4))
@example(scenario=storm("date", 0.3))
@example(scenario=storm("none", 0.5))
@example(
    scenario=Scenario(
        faults=dict.fromkeys(FAULT_KINDS, 1),
        error_rate=0.6,
        seed=11,
        retry_after_form="seconds",
        response_shape="data",
        max_attempts=4,
        concurrency=4,
        n=2,
    )
)
def test_any_fault_mix_ends_every_item_ok_or_failed_with_its_kind(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under any mix of faults every item ends ok or failed with the right kind, within
    max_attempts requests, no start in an announced pause, and OUT holds only named,
    complete files."""
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    with tempfile.TemporaryDirectory() as tmp:
        result, server = asyncio.run(run_scenario(Path(tmp), scenario))
        check_invariants(Path(tmp) / "out", scenario, result, server)


def test_fault_log_sees_what_the_mock_injects(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chaos harness's per-request fault log agrees with the mock's own counters."""
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    scenario = Scenario(
        faults={"500": 1, "drop": 1, "corrupt_image": 1},
        error_rate=0.5,
        seed=7,
        retry_after_form="seconds",
        response_shape="data",
        max_attempts=5,
        concurrency=2,
        n=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        _, server = asyncio.run(run_scenario(Path(tmp), scenario))
    by_prompt = server.stats.faults_by_prompt
    seen = Counter(f for faults in by_prompt.values() for f in faults if f is not None)
    assert seen == Counter(server.stats.faults)
    assert sum(seen.values()) > 0
