"""The Python API: what a scheduler task (Airflow, Prefect, Dagster, a CronJob's Python
entry point) calls instead of the command line.

Import it as ``synthaug`` (the distribution's name, which a user's ``pipeline.py``
cannot shadow)::

    import synthaug

    spec = synthaug.load_spec("nightly.yaml")      # or a dict
    print(synthaug.plan(spec).cost_usd)
    result = synthaug.run(spec)                      # blocking; from any thread
    if result.exit_code not in (0, 4):
        raise RuntimeError(result.message)

Everything that belongs to a process's owner stays with the CLI: no signal handlers, no
progress bar, no logging setup, no GC tuning. What protects the user's money holds for
every caller: the ``max_items`` typo guard, the budgets, the key-scheme check and the lock.
A run is stopped gracefully with a `RunControl`, from any thread.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .control import RunControl
from .engine import RunStats
from .manifest.cache import load_cached_state
from .plan import Plan, build_plan
from .runner import check_key_scheme, run_job
from .search import apply_recorded, resolve_standalone
from .spec.load import load_spec as _load_spec_file
from .spec.load import spec_from_data
from .spec.model import Spec
from .store.layout import MANIFEST_NAME
from .views.report import status_report

__all__ = [
    "Plan",
    "RunControl",
    "RunResult",
    "RunStats",
    "SourceStatus",
    "Spec",
    "Status",
    "load_spec",
    "plan",
    "run",
    "run_async",
    "status",
]


def load_spec(
    source: str | os.PathLike[str] | Mapping[str, Any], *, base_dir: str | Path | None = None
) -> Spec:
    """A validated job spec, from a YAML file's path or from a dict.

    A dict's relative paths (output_dir, globs, folders) resolve against `base_dir`,
    by default the current directory. Raises `SpecError` naming the key to fix.
    """
    if isinstance(source, (str, os.PathLike)):
        return _load_spec_file(Path(source))
    return spec_from_data(source, base_dir=base_dir)  # refuses what is not a mapping


def plan(spec: Spec, *, resolve: bool = False) -> Plan:
    """What a run of `spec` would do and cost, against its output folder; sends nothing.

    A roboflow_search source counts the ids its output folder recorded; without them its
    count is unknown, unless `resolve` runs the search (its only network call; what it
    finds is recorded, so the run works on the same images). Blocking, like `run`.
    """
    state = load_cached_state(spec.output_dir / MANIFEST_NAME)
    check_key_scheme(spec.output_dir, state)
    if resolve:
        spec = asyncio.run(resolve_standalone(spec))
    return build_plan(apply_recorded(spec), state)


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended. `exit_code` is the CLI's (0 all ok, 1 some failed, 3 aborted,
    4 budget reached, 130 stopped); `summary` is what ``OUT/summary.json`` holds."""

    exit_code: int
    stop_reason: str | None
    message: str | None
    ok: int
    failed: int
    skipped_ok: int
    requests: int
    images: int
    cost_usd: float | None
    output_dir: Path
    summary: Mapping[str, Any]

    @property
    def all_ok(self) -> bool:
        """True when every item of the job is done."""
        return self.exit_code == 0


async def run_async(
    spec: Spec,
    *,
    verify: bool = False,
    wait: bool = True,
    control: RunControl | None = None,
    on_progress: Callable[[RunStats], None] | None = None,
) -> RunResult:
    """Run (or resume) `spec` in the running event loop; see `run`."""
    result = await run_job(
        spec,
        spec_path=Path(spec.spec_file),
        on_progress=on_progress,
        control=control,
        verify=verify,
        wait=wait,
    )
    summary = result.summary
    return RunResult(
        exit_code=result.exit_code,
        stop_reason=result.stop_reason,
        message=result.message,
        ok=int(summary["ok"]),
        failed=int(summary["failed"]),
        skipped_ok=int(summary["skipped_ok"]),
        requests=int(summary["requests"]),
        images=int(summary["images"]),
        cost_usd=summary["cost_usd"],
        output_dir=spec.output_dir,
        summary=MappingProxyType(summary),
    )


def run(
    spec: Spec,
    *,
    verify: bool = False,
    wait: bool = True,
    control: RunControl | None = None,
    on_progress: Callable[[RunStats], None] | None = None,
) -> RunResult:
    """Run (or resume) `spec` and block until it ends; safe from any thread.

    `verify` re-hashes every stored image; `wait=False` (``backend.mode: batch``)
    submits the batches and returns, and a later run collects them; `control.stop()`
    (from any thread) stops it gracefully; `on_progress` is called with the run's
    counters as they change. Raises a `PipelineError` (`SpecError`, `CredentialsError`,
    `OutputError`, ...) when the run cannot start; once it has started, the outcome
    is in the result's `exit_code`.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("synthaug.run() blocks: in async code, await synthaug.run_async()")
    return asyncio.run(
        run_async(spec, verify=verify, wait=wait, control=control, on_progress=on_progress)
    )


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """One source's items as the manifest records them (`pending` needs OUT/job.json)."""

    ok: int
    failed: int
    generated: int
    images: int
    pending: int | None


@dataclass(frozen=True, slots=True)
class Status:
    """What an output folder holds; `report` is the whole ``status --json`` object."""

    ok: int
    failed: int
    generated: int
    images: int
    pending: int | None
    by_source: Mapping[str, SourceStatus]
    errors: Mapping[str, int]
    report: Mapping[str, Any]


def status(out_dir: str | os.PathLike[str]) -> Status:
    """The state of the run in `out_dir`, from its manifest (``synthaug status``)."""
    report = status_report(Path(out_dir))
    by_source = {
        name: SourceStatus(
            ok=int(counts.get("ok", 0)),
            failed=int(counts.get("failed", 0)),
            generated=int(counts.get("generated", 0)),
            images=int(counts.get("images", 0)),
            pending=counts.get("pending"),
        )
        for name, counts in report["by_source"].items()
    }
    return Status(
        ok=int(report["ok"]),
        failed=int(report["failed"]),
        generated=int(report.get("generated", 0)),
        images=int(report["images"]),
        pending=report.get("pending"),
        by_source=MappingProxyType(by_source),
        errors=MappingProxyType(dict(report["errors"])),
        report=MappingProxyType(report),
    )
