"""Start-up cost of `synthaug run`: a run against the real API loads only what it uses."""

from __future__ import annotations

import subprocess
import sys

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
