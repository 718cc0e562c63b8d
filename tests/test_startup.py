"""Start-up cost of `synthaug run`: a run against the real API loads only what it uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_runner_does_not_load_the_mock_server() -> None:
    """Importing the run path leaves the mock API (aiohttp.web, Pillow drawing) unloaded."""
    code = (
        "import sys, pipeline.cli, pipeline.run.job; "
        "print(sorted(m for m in ('pipeline.mockapi.server', 'aiohttp.web', 'PIL.ImageDraw') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_status_does_not_load_the_spec_model_or_an_event_loop(tmp_path: Path) -> None:
    """`synthaug status` of a local OUT (a cron dashboard asks it often) reads the
    manifest without importing pydantic, the spec model, YAML or asyncio."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").write_text("")
    code = (
        "import sys; "
        f"sys.argv = ['synthaug', 'status', {str(out)!r}]; "
        "import pipeline.cli as cli\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('pydantic', 'pipeline.jobspec.model', 'yaml', 'asyncio') "
        "if m in sys.modules), file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr
