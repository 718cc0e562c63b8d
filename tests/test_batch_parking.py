"""Batch mode parks its items: nothing waits in a task of its own while a batch runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

import synthaug
from pipeline.manifest.log import read_latest

ITEMS = 240


@pytest.mark.slow
async def test_a_batch_job_waits_without_a_task_per_item(
    spec_factory: Callable[..., Path],
) -> None:
    """240 items wait in one batch on the embedded mock; the run never holds more than a
    few dozen tasks (it held one per waiting item), and every item ends ok exactly once."""
    words = [f"w{i}" for i in range(ITEMS)]
    path = spec_factory(
        backend={"kind": "mock", "mode": "batch", "poll_interval_s": 0.2, "poll_max_s": 0.5},
        params={"model": "gpt-image-2", "quality": "low", "size": "256x256"},
        sources=[{"name": "leaves", "prompt": "a {word} leaf", "vars": {"word": words}}],
        run={"max_items": ITEMS},
    )
    spec = synthaug.load_spec(path)
    most_tasks = 0
    waiting_seen = 0

    def sample(progress: synthaug.Progress) -> None:
        nonlocal most_tasks, waiting_seen
        most_tasks = max(most_tasks, len(asyncio.all_tasks()))
        waiting_seen = max(waiting_seen, progress.requests - progress.done)

    result = await synthaug.run_async(spec, on_progress=sample)
    assert result.exit_code == 0, result.message
    assert result.ok == ITEMS
    assert waiting_seen > 100  # most items were in the batch at once
    assert most_tasks < 60, most_tasks
    lines = read_latest(spec.output_dir / "manifest.jsonl")
    assert len(lines) == ITEMS
    assert {line["status"] for line in lines.values()} == {"ok"}
