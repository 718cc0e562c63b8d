"""The API key never leaks: not to stdout, stderr, logs at DEBUG, tracebacks or OUT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from checks import ThreadedMock, write_job_spec

from pipeline.backends.mock import MockConfig

SECRET = "sk-SECRET-e2b7c9d14f6a-do-not-leak"

pytestmark = pytest.mark.slow


def run_cli(tmp_path: Path, base_url: str, **run: object) -> subprocess.CompletedProcess[bytes]:
    path = write_job_spec(
        tmp_path,
        base_url,
        name="secrets",
        prompts=4,
        size="64x64",
        timeout_s=1,
        concurrency=2,
        max_attempts=3,
        rate_limit="100/s",
        **run,
    )
    env = {**os.environ, "ROBOFLOW_API_KEY": SECRET}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            str(path),
            "--log-level",
            "DEBUG",
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )


def assert_no_secret(tmp_path: Path, proc: subprocess.CompletedProcess[bytes]) -> None:
    needle = SECRET.encode()
    assert needle not in proc.stdout
    assert needle not in proc.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path
        assert SECRET not in path.name


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(MockConfig(api_key="another-key"), id="401-abort"),
        pytest.param(MockConfig(error_rate=0.6, seed=1, slow_s=2.0), id="every-fault"),
        pytest.param(MockConfig(projects=frozenset({"nope"})), id="404-project"),
        pytest.param(MockConfig(refuse_word="item"), id="refusal"),
    ],
)
def test_key_never_leaks_when_runs_fail(tmp_path: Path, config: MockConfig) -> None:
    """Whatever way a run fails, with DEBUG logging, the key appears nowhere."""
    with ThreadedMock(config) as mock:
        proc = run_cli(tmp_path, mock.base_url)
    assert proc.returncode in (0, 1, 3), proc.stderr.decode()[-2000:]
    assert_no_secret(tmp_path, proc)


def test_key_never_leaks_on_connection_refused(tmp_path: Path) -> None:
    """A dead endpoint (connection refused) is reported without the key."""
    proc = run_cli(tmp_path, "http://127.0.0.1:9", max_consecutive_failures=2)
    assert proc.returncode in (1, 3)
    assert_no_secret(tmp_path, proc)
