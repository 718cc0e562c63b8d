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
progress bar, no logging setup, no GC tuning (the GC is never paused or frozen by these
calls: another thread of the caller's would lose its collections meanwhile). What
protects the user's money holds for every caller: the ``max_items`` typo guard, the
budgets, the key-scheme check and the lock.
A run is stopped gracefully with a `RunControl`, from any thread.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import balance
from .errors import UsageError
from .jobspec.load import load_spec as _load_spec_file
from .jobspec.load import spec_from_data
from .jobspec.model import Spec
from .manifest.folded import load_all_states
from .manifest.folded import merge as fold_manifests
from .manifest.log import ManifestState
from .plan import Plan, build_plan
from .run.control import RunControl
from .run.job import run_job
from .run.mirror import merge_remote, pulled_copy
from .run.prepare import check_key_scheme, check_overlap
from .run.stats import RunStats
from .search import apply_recorded, resolve_standalone
from .shard import Shard, parse_shard
from .store.layout import is_object_url, manifest_files
from .store.lock import acquire_lock
from .views.report import status_report

__all__ = [
    "Plan",
    "Progress",
    "RunControl",
    "RunResult",
    "RunStats",
    "Shard",
    "SourceStatus",
    "Spec",
    "Status",
    "load_spec",
    "merge",
    "parse_shard",
    "plan",
    "plan_async",
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


def plan(
    spec: Spec, *, resolve: bool = False, top_up: bool = False, shard: Shard | None = None
) -> Plan:
    """What a run of `spec` would do and cost, against its output folder; sends nothing.

    A roboflow_search source counts the ids its output folder recorded, a
    roboflow_balance source plans from the class counts it recorded; without them its
    count is unknown, unless `resolve` runs the search or reads the counts (its only
    network calls; what they find is recorded in OUT under OUT's lock, so the run works
    on the same items; a run holding the lock makes it raise `OutputError`). Blocking,
    like `run`; without `resolve` it needs no event loop (callable from async code too),
    with it, in async code, await `plan_async`. `top_up` plans what ``run --top-up``
    would add to a roboflow_balance source, without recording it; `shard` counts only
    that shard's items (``plan --shard I/N``).
    """
    if spec.output_url is not None:
        return _plan_object_out(spec, resolve=resolve, top_up=top_up, shard=shard)
    if not resolve:
        return _plan_from(spec, _read_state(spec), top_up, shard)
    _refuse_running_loop("synthaug.plan(resolve=True)", "synthaug.plan_async()")
    return asyncio.run(plan_async(spec, resolve=True, top_up=top_up, shard=shard))


async def plan_async(
    spec: Spec, *, resolve: bool = False, top_up: bool = False, shard: Shard | None = None
) -> Plan:
    """`plan` in the running event loop: the manifest is read and the plan built in a
    worker thread (a big job's take seconds), the search (`resolve`) awaited."""
    if spec.output_url is not None:
        return await asyncio.to_thread(
            _plan_object_out, spec, resolve=resolve, top_up=top_up, shard=shard
        )
    state = await asyncio.to_thread(_read_state, spec)
    if resolve:
        spec = await resolve_standalone(spec)
        spec = await balance.resolve_standalone(spec)
    return await asyncio.to_thread(_plan_from, spec, state, top_up, shard)


def _plan_object_out(spec: Spec, *, resolve: bool, top_up: bool, shard: Shard | None) -> Plan:
    """`plan` of a spec whose OUT is on object storage: against a copy of the bucket's
    manifests and recorded files (a run on this machine keeps its staging folder)."""
    if resolve:
        raise UsageError(
            "plan --resolve records what it finds in OUT, and this OUT is on object "
            "storage: `synthaug run` resolves the searches and class counts itself"
        )
    url = spec.output_url
    assert url is not None
    with (
        tempfile.TemporaryDirectory(prefix="synthaug-plan-") as tmp,
        pulled_copy(url, Path(tmp), required=False),
    ):
        local = spec.model_copy(update={"output_dir": Path(tmp)})
        return _plan_from(local, _read_state(local), top_up, shard)


def _read_state(spec: Spec) -> ManifestState:
    """OUT's manifest state, refused when it was keyed by another scheme."""
    state = load_all_states(spec.output_dir)
    check_key_scheme(spec.output_dir, state)
    return state


def _plan_from(
    spec: Spec, state: ManifestState, top_up: bool = False, shard: Shard | None = None
) -> Plan:
    spec = balance.apply_recorded(apply_recorded(spec))
    if not top_up:
        return build_plan(spec, state, shard=shard)
    if balance.balance_source(spec) is None:
        raise UsageError("--top-up needs a roboflow_balance source in the spec")
    added = balance.shortfall(spec)
    return build_plan(balance.with_top_up(spec, added), state, top_up=added, shard=shard)


def _refuse_running_loop(call: str, instead: str) -> None:
    """A blocking call made from async code would fail deep inside `asyncio.run`: say
    what to await instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"{call} blocks: in async code, await {instead}")


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot of a run's counters: what `on_progress` is called with.

    Frozen and detached from the run: a callback may keep it or hand it to another
    thread, and it never changes afterwards (the engine's own counters change under it
    as the run goes on, so they are not handed out). `done` counts items settled in this
    run or before it (ok, failed, skipped); `expected` is the job's item count;
    `in_batches` items wait in Batch API batches and `batches` says where those stand;
    `cost_usd` is None once an item's cost is unknown.
    """

    expected: int
    total: int
    done: int
    ok: int
    failed: int
    skipped_ok: int
    skipped_failed: int
    requests: int
    images: int
    retries: int
    rate_limited: int
    in_flight: int
    in_batches: int
    batches: str
    cost_usd: float | None
    elapsed_s: float  # since the run's workers started (0 before)

    @classmethod
    def of(cls, stats: RunStats) -> Progress:
        """The snapshot of the engine's counters as they are now."""
        return cls(
            expected=stats.expected,
            total=stats.total,
            done=stats.done,
            ok=stats.ok,
            failed=stats.failed,
            skipped_ok=stats.skipped_ok,
            skipped_failed=stats.skipped_failed,
            requests=stats.requests,
            images=stats.images,
            retries=stats.retries,
            rate_limited=stats.rate_limited,
            in_flight=stats.in_flight,
            in_batches=stats.deferred,
            batches=stats.batches,
            cost_usd=stats.cost_usd if stats.cost_known else None,
            elapsed_s=max(0.0, time.monotonic() - stats.started) if stats.started else 0.0,
        )


def _snapshots(on_progress: Callable[[Progress], None] | None) -> Callable[[RunStats], None] | None:
    """The engine's progress hook for a caller's callback: a frozen `Progress` each time."""
    if on_progress is None:
        return None
    callback = on_progress
    return lambda stats: callback(Progress.of(stats))


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended. `exit_code` is the CLI's (0 all ok, 1 some failed, 3 aborted,
    4 budget reached, 130 stopped); `summary` is what ``OUT/summary.json`` holds.

    `in_batches` items were left waiting in Batch API batches (``wait=False``: a later
    run collects them). `uploaded` and `upload_failed` count this run's uploads (images
    new to the project; outputs whose upload failed for good, which a later run tries
    again); both are None for a spec without an ``upload:`` block.
    """

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
    in_batches: int = 0
    uploaded: int | None = None
    upload_failed: int | None = None

    @property
    def all_ok(self) -> bool:
        """True when every item of the job is done."""
        return self.exit_code == 0


async def run_async(
    spec: Spec,
    *,
    verify: bool = False,
    wait: bool = True,
    top_up: bool = False,
    shard: Shard | None = None,
    control: RunControl | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    process_owner: bool = False,
) -> RunResult:
    """Run (or resume) `spec` in the running event loop; see `run`.

    `process_owner` is for a program that owns its process, as the CLI does: it installs
    SIGINT/SIGTERM handlers (main thread only; a first signal stops gracefully, a second
    cancels) and freezes the loaded manifest state for the process's GC (faster with a
    big manifest; process-wide, so a library caller leaves it off).
    """
    if control is not None:
        control.claim()  # one control per run: a used one is refused before anything
    result = await run_job(
        spec,
        spec_path=Path(spec.spec_file),
        on_progress=_snapshots(on_progress),
        control=control,
        verify=verify,
        wait=wait,
        top_up=top_up,
        shard=shard,
        install_signals=process_owner,
        freeze_gc=process_owner,
    )
    summary = result.summary
    upload = summary.get("upload")
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
        in_batches=int(summary.get("in_batches") or 0),
        uploaded=int(upload["uploaded"]) if isinstance(upload, Mapping) else None,
        upload_failed=int(upload["failed"]) if isinstance(upload, Mapping) else None,
    )


def run(
    spec: Spec,
    *,
    verify: bool = False,
    wait: bool = True,
    top_up: bool = False,
    shard: Shard | None = None,
    control: RunControl | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunResult:
    """Run (or resume) `spec` and block until it ends; safe from any thread.

    `verify` re-hashes every stored image; `wait=False` (``backend.mode: batch``)
    submits the batches and returns, and a later run collects them; `top_up` adds to
    a roboflow_balance source's recorded plan what each class is still short of;
    `shard` (`parse_shard("I/N")`) runs only that shard's items, in its own manifest
    and lock; `control.stop()` (from any thread) stops it gracefully (a `RunControl`
    serves one run: a used one raises `UsageError`); `on_progress` is called, on the
    run's thread, with a frozen `Progress` snapshot of the run's counters each time
    they change. Raises a `PipelineError` (`SpecError`, `CredentialsError`,
    `OutputError`, ...) when the run cannot start; once it has started, the outcome
    is in the result's `exit_code`.
    """
    _refuse_running_loop("synthaug.run()", "synthaug.run_async()")
    return asyncio.run(
        run_async(
            spec,
            verify=verify,
            wait=wait,
            top_up=top_up,
            shard=shard,
            control=control,
            on_progress=on_progress,
        )
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
    """What an output folder holds; `report` is the whole ``status --json`` object.

    `submitted` items wait in Batch API batches (`batches`: items per batch id, as
    ``status`` lists them). `uploaded` and `upload_failed` are the last run's upload
    counts (from its summary.json); None when that run had no ``upload:`` block, or
    no run finished yet. `checked`, `labelled`, `annotated` and `flagged` ({flag:
    outputs}) count what the stages after storage found in the ok items' outputs.
    """

    ok: int
    failed: int
    generated: int
    images: int
    pending: int | None
    by_source: Mapping[str, SourceStatus]
    errors: Mapping[str, int]
    report: Mapping[str, Any]
    submitted: int = 0
    batches: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    uploaded: int | None = None
    upload_failed: int | None = None
    checked: int = 0
    labelled: int = 0
    annotated: int = 0
    flagged: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


def merge(out_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """Fold the shards' manifests of `out_dir` into its ``manifest.jsonl``
    (``synthaug merge``); (manifests folded, items). Refused (`OutputError`) while any
    run holds a lock on it; a kill at any moment loses nothing. `out_dir` may be on
    object storage (``s3://bucket/prefix``): its segments are compacted there."""
    if isinstance(out_dir, str) and is_object_url(out_dir):
        return merge_remote(out_dir)
    out = Path(out_dir)
    if not manifest_files(out):
        raise UsageError(f"no manifest in {out}: run `synthaug run SPEC` first")
    with acquire_lock(out):
        check_overlap(out, None)
        return fold_manifests(out)


def remote_status_report(url: str, shard: Shard | None = None) -> dict[str, Any]:
    """``status`` of an OUT on object storage: its manifests read into a temporary
    folder (the images stay in the bucket)."""
    with tempfile.TemporaryDirectory(prefix="synthaug-status-") as tmp, pulled_copy(url, Path(tmp)):
        return status_report(Path(tmp), shard)


def status(out_dir: str | os.PathLike[str]) -> Status:
    """The state of the run in `out_dir`, from its manifest (``synthaug status``).

    Reads the manifest with the process's GC left on (unlike the CLI's ``status``,
    which owns its process and pauses it)."""
    if isinstance(out_dir, str) and is_object_url(out_dir):
        report = remote_status_report(out_dir)
    else:
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
        submitted=int(report.get("submitted", 0)),
        batches=MappingProxyType(dict(report.get("batches") or {})),
        uploaded=_last_upload(report, "uploaded"),
        upload_failed=_last_upload(report, "failed"),
        checked=int(report.get("checked", 0)),
        labelled=int(report.get("labelled", 0)),
        annotated=int(report.get("annotated", 0)),
        flagged=MappingProxyType(dict(report.get("flagged") or {})),
    )


def _last_upload(report: Mapping[str, Any], field_name: str) -> int | None:
    """One upload count of the last run's summary, None when it uploaded nothing."""
    last_run = report.get("last_run")
    upload = last_run.get("upload") if isinstance(last_run, Mapping) else None
    value = upload.get(field_name) if isinstance(upload, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
