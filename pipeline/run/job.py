"""One `synthaug run`: prepare it, run its stages, say how it ended.

Three steps, each its own module: `pipeline.run.prepare` (the keys, OUT's lock, the
manifest, the backend, the searches, the count, ``job.json``), then here the engine and
the stages after storage under the run's stop (signals, `RunControl`), then
`pipeline.run.summary` (``summary.json`` and the exit code, written whatever happened).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

from ..backends.base import Backend
from ..credentials import per_shard_key
from ..jobspec.model import Spec
from ..limiter import Limiter
from ..manifest.writer import ManifestWriter
from ..pricing import cost_from_usage, is_free, spec_price
from ..records import WorkItem
from ..shard import Shard
from ..shared_pace import PaceBoard, SharedPace
from ..sources import HashCache
from ..store.layout import INPUT_HASHES_NAME, PACE_DIR, summary_name
from .batch import attach_batches, batch_control_of
from .control import RunControl, signal_handlers
from .engine import Engine
from .mirror import Mirror, mirrored
from .pool import RunStop
from .prepare import Prepared, prepare, read_learned_pace
from .stages import StageChain, StageContext, open_stages
from .stats import RunStats, utc_now
from .summary import JobResult, build_summary, stop_message, write_summary

__all__ = ["JobResult", "run_job"]

log = logging.getLogger("pipeline.runner")

OBJECT_POLL_S = 1.0
"""How often shards on object storage read each other's pace notes (a GET per sibling)."""


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
    top_up: bool = False,
    shard: Shard | None = None,
) -> JobResult:
    """Run (or resume) the job of `spec`; see the module docstring for the order of steps.

    What only a process's owner may do is opt-in, for the CLI: `install_signals`
    (SIGINT/SIGTERM handlers, main thread only) and `freeze_gc` (pauses the process's
    GC while the manifest loads, then freezes the loaded state). Any caller can stop the
    run gracefully through `control`. The `max_items` guard and the budgets hold for
    every caller. With ``backend.mode: batch``, `wait=False` submits and returns
    (``run --no-wait``); a later run collects. `top_up` adds to a balance source's plan
    what its classes are still short of (``run --top-up``). `shard` runs only the items
    of that shard (``run --shard I/N``), in its own manifest and lock.
    """
    async with (
        mirrored(spec, shard) as mirror,
        prepare(
            spec,
            spec_path=spec_path,
            backend=backend,
            verify=verify,
            wait=wait,
            freeze_gc=freeze_gc,
            top_up=top_up,
            shard=shard,
            listing=None if mirror is None else mirror.listing,
        ) as prepared,
    ):
        return await _execute(
            prepared,
            spec_path,
            on_progress,
            install_signals,
            control or RunControl(),
            mirror,
        )


async def _execute(
    prepared: Prepared,
    spec_path: Path,
    on_progress: Callable[[RunStats], None] | None,
    install_signals: bool,
    control: RunControl,
    mirror: Mirror | None = None,
) -> JobResult:
    spec, backend, state, cache = prepared.spec, prepared.backend, prepared.state, prepared.cache
    batch = spec.backend.mode == "batch"
    run = spec.run
    team = _shared_pace(spec, prepared.shard, mirror)
    limiter = Limiter(
        rate=None if batch else run.rate_limit,  # the Batch API paces itself
        image_rate=None if batch else run.image_rate_limit,
        concurrency=run.concurrency,
        # a 429 without Retry-After waits like a first retry, doubling like retries do
        default_pause_s=run.backoff_base_s,
        max_default_pause_s=run.backoff_max_s,
        learned=await asyncio.to_thread(read_learned_pace, spec, prepared.shard),
        team=team,
    )
    started_at, t0 = utc_now(), time.monotonic()
    with ManifestWriter(prepared.manifest, fsync_interval_s=run.fsync_interval_s) as writer:
        writer.add_append_hook(cache.add)
        await asyncio.to_thread(cache.start, state)
        hashes = HashCache(spec.output_dir / INPUT_HASHES_NAME)  # inputs: not re-read
        stop = RunStop()
        chain = await _stage_chain(spec, prepared, writer, stop, mirror)
        engine = Engine(
            run,
            out_dir=spec.output_dir,
            items=prepared.drafts(hashes),
            expand_again=lambda: prepared.drafts(hashes),
            backend=backend,
            limiter=limiter,
            state=state,
            writer=writer,
            files=prepared.files,
            remember_stats=cache.refresh,
            price=lambda item: spec_price(spec, item.params),
            actual_cost=lambda item, response: _actual_cost(spec, item, response),
            expected=prepared.expected,
            on_progress=on_progress,
            on_stored=chain.submit,
            stop=stop,
            batches=(batches := batch_control_of(spec, backend)),
        )
        attach_batches(batches, state, engine.record_submitted)
        prepared.watch.stats = engine.stats
        try:
            async with (
                signal_handlers(stop, enabled=install_signals),
                control.attached(stop),
                _team_running(team),
                _pushing(mirror, stop),
                chain.running(),
            ):
                await engine.run()
        except asyncio.CancelledError:
            if engine.stop_reason not in ("sigint", "sigterm"):
                raise
            # our own second-signal cancel: the workers are down, finish the checkpoint
        finally:
            if batches is not None:  # nothing records after the manifest closes
                await batches.detach()
            await asyncio.to_thread(cache.close)  # its last segment: marshal + write
            await asyncio.to_thread(hashes.save, discard=engine.stats.skipped_changed > 0)
            elapsed = time.monotonic() - t0
            summary = build_summary(spec, spec_path, engine, limiter, started_at, elapsed)
            chain.add_summary(summary)
            await write_summary(spec.output_dir / summary_name(prepared.shard), summary)
    return JobResult(
        exit_code=summary["exit_code"],
        stop_reason=engine.stop_reason,
        summary=summary,
        message=stop_message(engine),
    )


def _shared_pace(spec: Spec, shard: Shard | None, mirror: Mirror | None) -> SharedPace | None:
    """The pace this shard shares with its siblings on one key; None when it paces alone
    (no shard, one shard, one key per shard, or the Batch API's own pace). On object
    storage the notes are in the bucket, read every `OBJECT_POLL_S`."""
    if shard is None or shard.count == 1 or spec.backend.mode == "batch":
        return None
    if per_shard_key(spec.backend) or spec.run.rate_limit is None:
        return None
    if mirror is not None:
        return SharedPace(mirror.pace_board(shard), shard, poll_s=OBJECT_POLL_S)
    return SharedPace(PaceBoard(spec.output_dir / PACE_DIR, shard), shard)


def _team_running(team: SharedPace | None) -> contextlib.AbstractAsyncContextManager[None]:
    return contextlib.nullcontext() if team is None else team.running()


def _pushing(mirror: Mirror | None, stop: RunStop) -> contextlib.AbstractAsyncContextManager[None]:
    return contextlib.nullcontext() if mirror is None else mirror.pushing(stop)


async def _stage_chain(
    spec: Spec, prepared: Prepared, writer: ManifestWriter, stop: RunStop, mirror: Mirror | None
) -> StageChain:
    """The stages after storage the spec sets, chained behind the engine."""
    context = StageContext(
        stop=stop,
        out_dir=spec.output_dir,
        day=date.today().isoformat(),
        backend_root=prepared.backend.api_root,
    )
    stages = await open_stages(spec, prepared.stage_keys, context)
    return StageChain(
        stages,
        writer=writer,
        stop=stop,
        grace_period_s=spec.run.grace_period_s,
        manifest=prepared.manifest,
        fetch=None if mirror is None else mirror.fetch,
    )


def _actual_cost(spec: Spec, item: WorkItem, response: Any) -> float | None:
    """What an answer says the item cost (its ``usage``); None when it does not say.

    The answer's own ``model`` wins over the spec's: it is what was billed. A free
    backend (the mock) costs nothing whatever its answers report.
    """
    if is_free(spec) or not isinstance(response, dict):
        return None
    model = response.get("model") or item.params.get("model")
    # a Batch API result's discount is its `Generation.price_factor` (the engine applies it)
    return cost_from_usage(model, response.get("usage"))
