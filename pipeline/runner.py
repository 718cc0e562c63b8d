"""One `synthaug run`: wires a validated spec to an engine and leaves OUT consistent.

Order matters here, because every image costs money: the key and the output folder are
checked and the folder locked before anything is sent; the manifest is read for resume;
`job.json` records what the job is; then the engine runs under signal handlers; finally
`summary.json` is written, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import date
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import items as items_mod
from . import model_check, search
from .backends.base import Backend
from .control import RunControl, signal_handlers
from .credentials import (
    DIRECT,
    ProxySettings,
    read_api_key,
    read_proxy_settings,
    read_upload_key,
)
from .engine import Engine, RunStats, utc_now
from .errors import (
    EXIT_BUDGET,
    EXIT_FATAL,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_SOME_FAILED,
    OutputError,
    UsageError,
)
from .limiter import LearnedPace, Limiter, learned_pace
from .manifest.cache import StateCache
from .manifest.log import ManifestState, ManifestWriter, gc_paused
from .pricing import BATCH_PRICE_FACTOR, check_cost_budget, cost_from_usage, is_free, spec_price
from .records import BATCH_LOGGER, BATCH_MARK, WorkItem
from .registry import backend_kind
from .run.pool import RunStop, StopReason
from .run.stages import StageChain, StageContext, open_stages
from .sources import INPUT_HASHES_NAME, HashCache
from .spec.model import RunSettings, Spec
from .store import files as outputs
from .store import layout
from .store.layout import JOB_NAME, MANIFEST_NAME, SUMMARY_NAME
from .store.lock import acquire_lock

if TYPE_CHECKING:
    from .backends.openai_batch import BatchOptions, BatchProgress

BATCH_WORKERS = 50_000
"""Items a batch-mode run keeps waiting at once (about 2 KB each): a batch's worth."""

__all__ = ["JobResult", "check_key_scheme", "recorded_key_scheme", "run_job"]

log = logging.getLogger(__name__)
_batch_log = logging.getLogger(BATCH_LOGGER)  # status changes at INFO, each poll at DEBUG


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


async def run_job(
    spec: Spec,
    *,
    spec_path: Path,
    on_progress: Callable[[RunStats], None] | None = None,
    install_signals: bool = False,
    freeze_gc: bool = False,
    control: RunControl | None = None,
    backend: Backend | None = None,
    verify: bool = False,
    wait: bool = True,
) -> JobResult:
    """Run (or resume) the job of `spec`; see the module docstring for the order of steps.

    What only a process's owner may do is opt-in, for the CLI: `install_signals`
    (SIGINT/SIGTERM handlers, main thread only) and `freeze_gc` (pauses the process's
    GC while the manifest loads, then freezes the loaded state). Any caller can stop the
    run gracefully through `control`. The `max_items` guard and the budgets hold for
    every caller.
    With ``backend.mode: batch``, `wait=False` submits and returns (``run --no-wait``);
    a later run collects.
    """
    if not wait and spec.backend.mode != "batch":
        raise UsageError("--no-wait needs backend.mode: batch (an online run cannot leave)")
    if not wait and backend_kind(spec.backend.kind).in_process:
        raise UsageError(
            "--no-wait cannot leave batches with the embedded mock (it stops with the run): "
            "rehearse with `synthaug mock-server` and backend.kind openai pointed at it"
        )
    spec = search.apply_recorded(spec)  # roboflow_search: ids this OUT already found
    if not search.unresolved(spec):  # else checked once the search has found its ids
        items_mod.check_max_items(spec)
    check_cost_budget(spec)
    for warning in spec.model_warnings():
        log.warning("%s", warning)
    kind = backend_kind(spec.backend.kind)
    api_key = read_api_key(spec.backend)
    upload_key = read_upload_key(spec.upload, spec.backend.kind)  # fails before anything is sent
    # the embedded mock is on loopback in this process: a corporate proxy must not see it
    proxies = read_proxy_settings() if kind.proxied else DIRECT
    out = spec.output_dir
    await asyncio.to_thread(outputs.check_writable, out)
    with acquire_lock(out):
        files = outputs.StoredFiles(out)
        swept = await asyncio.to_thread(files.sweep_temp_files)
        if swept:
            log.info("removed %d half-written temp files left by a killed run", swept)
        cache = StateCache(out / MANIFEST_NAME)
        with _gc_spares_state(freeze_gc):
            state = await asyncio.to_thread(_load_state, cache, verify, freeze_gc)
            await asyncio.to_thread(check_key_scheme, out, state)
            watch = BatchWatch()
            options = _batch_options(spec, wait, watch) if spec.backend.mode == "batch" else None
            async with _open_backend(spec, api_key, backend, proxies, options) as live_backend:
                # the API's word on the spec's models, before anything is spent
                await model_check.check_models(spec, live_backend)
                spec = await _resolve_searches(spec, live_backend, api_key, proxies)
                await asyncio.to_thread(_write_job_json, spec, spec_path)
                return await _run_engine(
                    spec,
                    spec_path,
                    state,
                    cache,
                    files,
                    live_backend,
                    on_progress,
                    install_signals,
                    control or RunControl(),
                    upload_key=upload_key,
                    watch=watch,
                )


async def _run_engine(
    spec: Spec,
    spec_path: Path,
    state: ManifestState,
    cache: StateCache,
    files: outputs.StoredFiles,
    backend: Backend,
    on_progress: Callable[[RunStats], None] | None,
    install_signals: bool,
    control: RunControl,
    *,
    upload_key: str = "",
    watch: BatchWatch | None = None,
) -> JobResult:
    run = spec.run
    expected = sum(items_mod.count_items(spec).values())
    batch = spec.backend.mode == "batch"
    if batch:
        run = _batch_workers(spec, expected)
    limiter = Limiter(
        rate=None if batch else run.rate_limit,  # the Batch API paces itself
        image_rate=None if batch else run.image_rate_limit,
        concurrency=run.concurrency,
        # a 429 without Retry-After waits like a first retry, doubling like retries do
        default_pause_s=run.backoff_base_s,
        max_default_pause_s=run.backoff_max_s,
        learned=await asyncio.to_thread(read_learned_pace, spec),
    )
    started_at, t0 = utc_now(), time.monotonic()
    with ManifestWriter(
        spec.output_dir / MANIFEST_NAME, fsync_interval_s=run.fsync_interval_s
    ) as writer:
        writer.add_append_hook(cache.add)
        await asyncio.to_thread(cache.start, state)
        hashes = HashCache(spec.output_dir / INPUT_HASHES_NAME)  # inputs: not re-read
        stop = RunStop()
        stages = await open_stages(
            spec,
            {"upload": upload_key},
            StageContext(
                stop=stop,
                out_dir=spec.output_dir,
                day=date.today().isoformat(),
                backend_root=getattr(backend, "root", None),
            ),
        )
        chain = StageChain(
            stages,
            writer=writer,
            stop=stop,
            grace_period_s=run.grace_period_s,
            manifest=spec.output_dir / MANIFEST_NAME,
        )
        engine = Engine(
            run,
            out_dir=spec.output_dir,
            items=items_mod.expand_drafts(spec, hashes=hashes),
            expand_again=lambda: items_mod.expand_drafts(spec, hashes=hashes),
            backend=backend,
            limiter=limiter,
            state=state,
            writer=writer,
            files=files,
            remember_stats=cache.refresh,
            price=lambda item: _price(spec, item),
            actual_cost=lambda item, response: _actual_cost(spec, item, response),
            expected=expected,
            on_progress=on_progress,
            on_stored=chain.submit,
            stop=stop,
        )
        _attach_batches(backend, state, engine)
        if watch is not None:
            watch.stats = engine.stats
        try:
            async with (
                signal_handlers(engine, enabled=install_signals),
                control.attached(engine),
                chain.running(),
            ):
                await engine.run()
        except asyncio.CancelledError:
            if engine.stop_reason not in ("sigint", "sigterm"):
                raise
            # our own second-signal cancel: the workers are down, finish the checkpoint
        finally:
            await _detach_batches(backend)  # nothing records after the manifest closes
            await asyncio.to_thread(cache.close)  # its last segment: marshal + write
            await asyncio.to_thread(hashes.save, discard=engine.stats.skipped_changed > 0)
            summary = _summary(spec, spec_path, engine, limiter, started_at, time.monotonic() - t0)
            chain.add_summary(summary)
            await _write_summary(spec.output_dir / SUMMARY_NAME, summary)
    return JobResult(
        exit_code=summary["exit_code"],
        stop_reason=engine.stop_reason,
        summary=summary,
        message=_stop_message(engine),
    )


async def _resolve_searches(
    spec: Spec, backend: Backend, api_key: str, proxies: ProxySettings
) -> Spec:
    """roboflow_search sources resolved (`pipeline.search`) against the open backend's
    API root, then the max_items guard on the ids they found."""
    if not search.unresolved(spec):
        return spec
    root = search.api_root(spec, backend)
    spec = await search.resolve_searches(spec, root=root, api_key=api_key, proxies=proxies)
    items_mod.check_max_items(spec)
    return spec


def read_learned_pace(spec: Spec) -> LearnedPace | None:
    """The pace the last run on this OUT learned from 429s (its summary.json), if any.

    A nightly job pays for learning the API's real limit once. A missing or corrupt
    summary, or one written for another backend, starts from the spec's rate; the
    limiter never goes above the spec's rate, even if it changed since.
    """
    data = layout.read_json(spec.output_dir / SUMMARY_NAME)
    if data is None or data.get("backend") != spec.backend.kind:
        return None
    return learned_pace(data.get("limiter"))


def _load_state(cache: StateCache, verify: bool, freeze: bool) -> ManifestState:
    """Load the state; with `freeze`, with the cyclic GC off and then frozen before it comes
    back: a million tuples that never form cycles, which every collection would walk again.
    Pausing and freezing are process-wide (another thread of a library caller would lose
    its GC meanwhile), so only the CLI, which owns its process, asks for them."""
    if not freeze:
        return cache.load(with_hashes=verify)
    with gc_paused():
        state = cache.load(with_hashes=verify)
        gc.freeze()
    return state


@contextlib.contextmanager
def _gc_spares_state(frozen: bool) -> Iterator[None]:
    """Give objects frozen by `_load_state` back to the GC when the run is over."""
    try:
        yield
    finally:
        if frozen:
            gc.unfreeze()


async def _write_summary(path: Path, summary: dict[str, Any]) -> None:
    """The summary is a report, not the checkpoint: failing to write it (a full disk)
    must not hide how the run ended."""
    try:
        await asyncio.to_thread(layout.write_json_atomic, path, summary)
    except (OSError, OutputError) as exc:
        log.error("could not write %s: %s", path, exc)


def _price(spec: Spec, item: WorkItem) -> float | None:
    return spec_price(spec, item.params)


def _actual_cost(spec: Spec, item: WorkItem, response: Any) -> float | None:
    """What an answer says the item cost (its ``usage``); None when it does not say.

    The answer's own ``model`` wins over the spec's: it is what was billed. A free
    backend (the mock) costs nothing whatever its answers report.
    """
    if is_free(spec) or not isinstance(response, dict):
        return None
    model = response.get("model") or item.params.get("model")
    cost = cost_from_usage(model, response.get("usage"))
    # a Batch API result is billed at the batch price; an online answer (batch mode's
    # `retry_online` included) at the full price
    batch = BATCH_MARK in response
    return None if cost is None else cost * (BATCH_PRICE_FACTOR if batch else 1.0)


def _exit_code(engine: Engine) -> int:
    if engine.stop_reason is not None:
        return _EXIT_BY_REASON[engine.stop_reason]
    if engine.stats.failed or engine.stats.skipped_failed:
        return EXIT_SOME_FAILED
    return EXIT_OK


def _stop_message(engine: Engine) -> str | None:
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


def _summary(
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
        "exit_code": _exit_code(engine),
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


def check_key_scheme(out_dir: Path, state: ManifestState) -> None:
    """Refuse an OUT whose manifest was keyed by another scheme (see `items.KEY_SCHEME`).

    Its keys would match nothing this version computes, so a run would quietly pay for
    every item again. An OUT without a recorded scheme but with manifest lines was
    written by synthaug 0.1 (scheme 1).
    """
    if not len(state):
        return
    found = recorded_key_scheme(out_dir)
    if found == items_mod.KEY_SCHEME:
        return
    if found > items_mod.KEY_SCHEME:
        raise OutputError(
            f"{out_dir} was written by a newer synthaug (key scheme {found}; this one uses "
            f"{items_mod.KEY_SCHEME}): upgrade synthaug (pip install -U synthaug) to resume it"
        )
    raise OutputError(
        f"{out_dir} holds a manifest of key scheme {found} (synthaug 0.1, whose requests "
        f"always carried model dall-e-3): this synthaug computes other keys (scheme "
        f"{items_mod.KEY_SCHEME}) and would pay for every item again; point output_dir "
        "(or --out) at a new folder"
    )


def recorded_key_scheme(out_dir: Path) -> int:
    """The key scheme OUT/job.json records; 1 when it records none (synthaug 0.1)."""
    scheme = layout.read_job(out_dir).get("key_scheme", 1)
    return scheme if isinstance(scheme, int) and not isinstance(scheme, bool) else 1


def _write_job_json(spec: Spec, spec_path: Path) -> None:
    counts = items_mod.count_items(spec)
    sources = items_mod.describe_sources(spec)
    for source in sources:
        source["items"] = counts.get(source["name"], 0)
    job = {
        "name": spec.name,
        "spec": spec_path.name,  # OUT is shared: no home folder in it
        "backend": spec.backend.kind,
        "key_scheme": items_mod.KEY_SCHEME,
        "host": socket.gethostname(),
        "sources": sources,
    }
    layout.write_json_atomic(spec.output_dir / JOB_NAME, job)


@contextlib.asynccontextmanager
async def _open_backend(
    spec: Spec,
    api_key: str,
    given: Backend | None,
    proxies: ProxySettings,
    batch: BatchOptions | None = None,
) -> AsyncIterator[Backend]:
    """The backend of the spec's kind, as the registry names it (or `given`, for tests);
    with `batch` options, the kind's Batch API client."""
    if given is not None:
        yield given
        return
    kind = backend_kind(spec.backend.kind)
    # its first import (aiohttp's) takes about 100 ms: in a thread, not holding the loop
    backend_class = await asyncio.to_thread(
        partial(kind.open_backend_class, batch=batch is not None)
    )
    extra: dict[str, Any] = {"batch": batch} if batch is not None else {}
    async with backend_class(
        spec.backend.base_url,
        api_key,
        concurrency=spec.run.concurrency,
        timeout_s=spec.backend.timeout_s,
        proxies=proxies,
        **extra,
    ) as backend:
        yield backend


def _batch_options(spec: Spec, wait: bool, watch: BatchWatch) -> BatchOptions:
    """How this run makes and waits for Batch API batches (the spec's backend section)."""
    from .backends.openai_batch import BatchOptions  # the client stack: only when used

    settings = spec.backend
    return BatchOptions(
        job=spec.name,
        wait=wait,
        batch_size=settings.batch_size,
        poll_interval_s=settings.poll_interval_s,
        poll_max_s=max(settings.poll_max_s, settings.poll_interval_s),
        resubmit_lost=backend_kind(spec.backend.kind).in_process,
        retry_online=settings.retry_online,
        online_rate=spec.run.rate_limit,
        online_concurrency=spec.run.concurrency,
        control_attempts=spec.run.max_attempts,
        backoff_base_s=spec.run.backoff_base_s,
        backoff_max_s=spec.run.backoff_max_s,
        on_progress=watch.update,
    )


class BatchWatch:
    """Where the run's batches stand: a log line when one changes status (on the
    `BATCH_LOGGER`), and a short note in the run's counters for the progress bar."""

    def __init__(self) -> None:
        self.stats: RunStats | None = None
        self._seen: dict[str, BatchProgress] = {}

    def update(self, progress: BatchProgress) -> None:
        """Record one poll's answer."""
        before = self._seen.get(progress.batch_id)
        self._seen[progress.batch_id] = progress
        changed = before is None or before.status != progress.status
        _batch_log.log(
            logging.INFO if changed else logging.DEBUG,
            "batch %s: %s, %d of %d requests done, %d failed",
            progress.batch_id,
            progress.status,
            progress.completed,
            progress.total,
            progress.failed,
        )
        if self.stats is not None:
            self.stats.batches = self.note()

    def note(self) -> str:
        """e.g. ``2 batches: 1 in_progress, 1 completed; 1,200/5,000 done``."""
        states = Counter(p.status for p in self._seen.values())
        done = sum(p.completed for p in self._seen.values())
        total = sum(p.total for p in self._seen.values())
        kinds = ", ".join(f"{count} {status}" for status, count in sorted(states.items()))
        plural = "batch" if len(self._seen) == 1 else "batches"
        return f"{len(self._seen)} {plural}: {kinds}; {done:,}/{total:,} done"


def _batch_workers(spec: Spec, expected: int) -> RunSettings:
    """The run settings for batch mode: a worker per item waiting in a batch (up to
    `BATCH_WORKERS`), no request pace (the Batch API has its own limits)."""
    workers = max(1, min(expected, BATCH_WORKERS))
    return spec.run.model_copy(update={"concurrency": workers})


async def _detach_batches(backend: Backend) -> None:
    """Stop a Batch API backend from submitting or polling any further."""
    detach = getattr(backend, "detach", None)
    if detach is not None:
        await detach()


def _attach_batches(backend: Backend, state: ManifestState, engine: Engine) -> None:
    """Tell a Batch API backend where the manifest says items wait, and let it record
    new batches through the engine's checkpoint."""
    bind = getattr(backend, "bind_manifest", None)
    if bind is None:
        return
    attached = {
        key: entry.batch
        for key, entry in state.open.items()
        if entry.status == "submitted" and entry.batch is not None
    }
    bind(attached, engine.record_submitted)
