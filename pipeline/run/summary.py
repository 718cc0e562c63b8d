"""How a run ended: its exit code, the one line that says why, and ``summary.json``.

The summary is a report, not the checkpoint: failing to write it (a full disk) must not
hide how the run ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import (
    EXIT_BUDGET,
    EXIT_FATAL,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_SOME_FAILED,
    OutputError,
)
from ..jobspec.model import Spec
from ..limiter import Limiter
from ..store import layout
from .engine import Engine
from .pool import StopReason
from .stats import utc_now

__all__ = ["JobResult", "build_summary", "exit_code", "stop_message", "write_summary"]

log = logging.getLogger("pipeline.runner")

_EXIT_BY_REASON: dict[StopReason, int] = {
    "sigint": EXIT_SIGINT,
    "sigterm": EXIT_SIGTERM,
    "fatal": EXIT_FATAL,
    "aborted": EXIT_FATAL,
    "disk": EXIT_FATAL,
    "budget": EXIT_BUDGET,
    "stopped": EXIT_SIGINT,
}


@dataclass(frozen=True, slots=True)
class JobResult:
    """How a run ended: its exit code, why it stopped, and its summary (as written)."""

    exit_code: int
    stop_reason: StopReason | None
    summary: dict[str, Any]
    message: str | None = None


async def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """The summary is a report, not the checkpoint: failing to write it (a full disk)
    must not hide how the run ended."""
    try:
        await asyncio.to_thread(layout.write_json_atomic, path, summary)
    except (OSError, OutputError) as exc:
        log.error("could not write %s: %s", path, exc)


def exit_code(engine: Engine) -> int:
    if engine.stop_reason is not None:
        return _EXIT_BY_REASON[engine.stop_reason]
    if engine.stats.failed or engine.stats.skipped_failed:
        return EXIT_SOME_FAILED
    return EXIT_OK


def stop_message(engine: Engine) -> str | None:
    reason = engine.stop_reason
    if reason == "fatal" and engine.fatal_error is not None:
        return f"aborted: {engine.fatal_error.message}"
    if reason == "disk" and engine.output_error is not None:
        return f"aborted: {engine.output_error}"
    if reason == "aborted":
        return (
            "aborted: too many consecutive failures (run.max_consecutive_failures); "
            "check the API's status and run the same command again to resume"
        )
    if reason == "budget":
        return "stopped by the budget (run.max_images / run.max_cost_usd): run again to go on"
    if reason == "stopped":
        return "stopped by the caller: the manifest is consistent; run again to resume"
    if reason in ("sigint", "sigterm"):
        return "interrupted: the manifest is consistent; run the same command again to resume"
    if engine.stats.deferred:
        return (
            f"{engine.stats.deferred:,} items wait in Batch API batches (see `synthaug status`): "
            "run the same command again later to collect them"
        )
    return None


def build_summary(
    spec: Spec,
    spec_path: Path,
    engine: Engine,
    limiter: Limiter,
    started_at: str,
    elapsed: float,
) -> dict[str, Any]:
    stats = engine.stats
    return {
        "name": spec.name,
        "spec": spec_path.name,  # OUT is shared: no home folder in it
        "backend": spec.backend.kind,
        "mode": spec.backend.mode,
        "started_at": started_at,
        "finished_at": utc_now(),
        "elapsed_s": round(elapsed, 3),
        "exit_code": exit_code(engine),
        "stop_reason": engine.stop_reason,
        "items_seen": stats.total,
        "ok": stats.ok,
        "failed": stats.failed,
        "skipped_ok": stats.skipped_ok,
        "skipped_failed": stats.skipped_failed,
        "resumed_downloads": stats.resumed_downloads,
        "skipped_changed_inputs": stats.skipped_changed,
        "rehashed_images": stats.rehashed,
        "requests": stats.requests,
        "images": stats.images,
        "retries": stats.retries,
        "rate_limited_429": stats.rate_limited,
        "ambiguous_retries": stats.ambiguous_retries,
        "in_batches": stats.deferred,  # left waiting in submitted batches (--no-wait)
        "errors": dict(stats.errors),
        "cost_usd": round(stats.cost_usd, 4) if stats.cost_known else None,
        "achieved_requests_per_s": round(stats.requests / elapsed, 3) if elapsed > 0 else None,
        "limiter": dataclasses.asdict(limiter.stats()),
    }
