"""The worker pool: the only place that awaits a backend.

Items stream in lazily from a producer (in chunks decided in a worker thread, so hashing
files for the resume check never blocks the loop) through a bounded queue to
`concurrency` workers. Each worker takes an item through the limiter, the backend and
the outputs, then appends its manifest line: a ``generated`` line as soon as the API
answers with URLs, the ``ok`` line once its files are in place.

Stopping is cooperative: a budget, a fatal answer, too many consecutive failures or a
signal set `stop_reason`; nothing new starts after that, in-flight items get
`grace_period_s` to finish, then are cancelled. A cancelled item simply has no line (or
only its ``generated`` line) and runs again on resume.

What needs work is decided by `pipeline.run.todo`, the workers are a `Lane` of the one
worker pool (`pipeline.run.pool`), and each stored item is handed to the stages after
storage (`on_stored`: `pipeline.run.stages`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from .backends.base import Backend, encode_image
from .budget import Budget
from .errors import (
    BackendError,
    Deferred,
    FatalError,
    OutputError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from .items import ItemDraft
from .limiter import Limiter
from .manifest import freshness as freshness
from .manifest.log import Finished, ManifestState, ManifestWriter
from .records import (
    BatchRef,
    ErrorInfo,
    GeneratedImage,
    Generation,
    ItemRecord,
    OutputFile,
    WorkItem,
)
from .retry import Retrier, RetryPolicy
from .run.pool import Lane, RunStop, StopReason
from .run.stats import RunStats, utc_now
from .run.todo import Todo, TodoSource
from .sources import InputChangedError, read_input_bytes
from .spec.model import RunSettings
from .store import files as outputs

__all__ = ["Engine"]

log = logging.getLogger(__name__)

DOWNLOAD_ATTEMPTS = 3  # tries of one image URL before the item regenerates
LARGE_INPUT_BYTES = 256 * 1024  # base64 in a thread above this
STORE_THREADS = 2
"""Threads that check, hash and write images: few, so that the event loop thread competes
for the GIL and the CPUs with few others (a stall of the loop delays every request)."""


class _Stopped(Exception):
    """The run is stopping: leave this item unrecorded so it runs again on resume."""


@dataclass(slots=True)
class _ItemRun:
    """What one item's attempts have learned so far (mutable, owned by one worker)."""

    item: WorkItem
    started_at: str
    t0: float
    attempts: int = 0
    pending: tuple[GeneratedImage, ...] = ()
    response: object = None
    batch: BatchRef | None = None  # the Batch API batch the answer came from
    price_factor: float = 1.0  # the answer's discount (`Generation.price_factor`)


class Engine:
    """Runs the items of one job through a backend; see the module docstring."""

    def __init__(
        self,
        run: RunSettings,
        *,
        out_dir: Path,
        items: Iterable[ItemDraft],
        backend: Backend,
        limiter: Limiter,
        state: ManifestState,
        writer: ManifestWriter,
        files: outputs.StoredFiles | None = None,
        expand_again: Callable[[], Iterable[ItemDraft]] | None = None,
        remember_stats: Callable[[Mapping[str, Finished]], None] = lambda _entries: None,
        price: Callable[[WorkItem], float | None] = lambda _item: None,
        actual_cost: Callable[[WorkItem, Any], float | None] = lambda _item, _response: None,
        expected: int = 0,
        on_progress: Callable[[RunStats], None] | None = None,
        on_stored: Callable[[ItemRecord], None] = lambda _record: None,
        stop: RunStop | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._run = run
        self._out_dir = out_dir
        self._backend = backend
        self._limiter = limiter
        self._writer = writer
        # its threads start on first use and end with `run`
        self._store_pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="synthaug-store")
        # image folders are fsynced once per manifest sync, before it, not once per image
        self._folders = outputs.FolderSync()
        writer.add_sync_hook(self._folders.flush)
        self._on_progress = on_progress or (lambda _stats: None)
        self._clock = clock
        self._policy = RetryPolicy.from_run(run)
        self._rng = rng or random.Random()
        # built once: a tenacity loop per item cost more CPU than the request it guarded
        self._retrier = Retrier(
            self._policy, sleep=self._backoff_sleep, on_retry=self._count_retry, rng=self._rng
        )
        # a download is free to repeat (the image was paid for once): no ambiguity to weigh
        self._downloads = Retrier(
            dataclasses.replace(self._policy, max_attempts=DOWNLOAD_ATTEMPTS, retry_ambiguous=True),
            sleep=self._backoff_sleep,
            on_retry=_log_download_retry,
            rng=self._rng,
        )
        self.stats = RunStats(expected=expected)
        # with `expand_again`, a big job's files are stat'ed by a child process while the
        # keys are expanded (`freshness.StatPass`); its verdict comes at the end
        self._todos = TodoSource(
            items,
            state=state,
            files=files or outputs.StoredFiles(out_dir),
            out_dir=out_dir,
            stats=self.stats,
            retry_failed=run.retry_failed,
            expand_again=expand_again,
            remember_stats=remember_stats,
        )
        self.run_stop = stop or RunStop()  # shared with the stages after storage
        self._on_stored = on_stored  # the stages after storage take each stored item
        self._budget = Budget(run.max_images, run.max_cost_usd, price, actual_cost)
        self._consecutive_failures = 0
        self._runs: dict[str, _ItemRun] = {}  # items being worked on, by key

    # ----------------------------------------------------------------- control

    def stop(self, reason: StopReason) -> None:
        """Stop starting new requests; the first reason given is the one reported."""
        self.run_stop.stop(reason)

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the run stopped (None: it did not)."""
        return self.run_stop.reason

    @property
    def fatal_error(self) -> FatalError | None:
        """The answer that aborted the run, in any stage."""
        return self.run_stop.fatal_error

    @property
    def output_error(self) -> OutputError | None:
        """The write failure that stopped the run, in any stage."""
        return self.run_stop.output_error

    @property
    def stopping(self) -> bool:
        """True once nothing new may start."""
        return self.run_stop.stopping

    def _halted(self) -> bool:
        """A stop halts generation, except a budget stop: what was reserved fits it."""
        return self.stopping and self.stop_reason != "budget"

    async def run(self) -> RunStats:
        """Process every item; return when all are settled or the run was stopped."""
        self.stats.started = self._clock()
        lane: Lane[Todo] = Lane(
            "worker",
            self._run.concurrency,
            self._work,
            self.run_stop,
            halts=self._halted,
            grace_s=lambda reason: None if reason == "budget" else self._run.grace_period_s,
            maxsize=self._run.concurrency * 2,
            dropped=lambda todo: self._budget.release(todo.item),
        )
        lane.start()
        producer = asyncio.create_task(self._produce(lane), name="producer")
        try:
            await lane.finish(producer)
        finally:
            producer.cancel()
            await lane.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            # a store begun by a cancelled item ends before the run does (and the OUT lock)
            await asyncio.to_thread(self._store_pool.shutdown)
            # The job's state is let go now (a million entries for a big job): the engine
            # sits in reference cycles (its retrier holds its bound methods), so keeping it
            # would leave the state to the full collection at exit (0.4 s for 1M items).
            await asyncio.to_thread(self._todos.release)
            self.stats.finished = self._clock()
            try:
                self._writer.sync()
            except OSError as exc:
                log.error("could not fsync the manifest: %s", exc)
            self._on_progress(self.stats)
        return self.stats

    # ---------------------------------------------------------------- producer

    async def _produce(self, lane: Lane[Todo]) -> None:
        """Feed the lane lazily, then close it."""
        await self._feed(lane)
        await lane.close()

    async def _feed(self, lane: Lane[Todo]) -> None:
        while not self.stopping:
            chunk = await asyncio.to_thread(self._todos.next_chunk)
            if chunk is None:
                return
            for todo in chunk:
                if self.stopping:
                    return
                if todo.submitted:
                    self._budget.commit(todo.item)  # already paid for: collect it anyway
                elif not self._budget.reserve(todo.item):
                    self.stop("budget")
                    return
                await lane.put(todo)

    async def _backoff_sleep(self, seconds: float) -> None:
        """Sleep between attempts, cut short by a stop (the next attempt then stands down)."""
        await self.run_stop.sleep(seconds, self._halted)

    # ----------------------------------------------------------------- workers

    async def _work(self, todo: Todo) -> None:
        self.stats.in_flight += 1
        try:
            await self._process(todo)
        finally:
            self.stats.in_flight -= 1
            self._on_progress(self.stats)

    async def _process(self, todo: Todo) -> None:
        """One item from first attempt to its manifest line (or none, when stopped)."""
        item = todo.item
        run = _ItemRun(item, started_at=utc_now(), t0=self._clock())
        if todo.entry is not None and todo.entry.status == "generated":
            run.pending, run.attempts = todo.entry.pending, todo.entry.attempts
        if todo.entry is not None and todo.entry.status == "submitted":
            run.attempts = todo.entry.attempts - 1  # its batch request is the same attempt
        failure: BackendError | None = None
        self._runs[item.key] = run
        try:
            stored = await self._attempt_until_settled(run)
        except _Stopped:
            self._budget.release(item)
            return
        except Deferred:
            self._budget.release(item)
            self.stats.deferred += 1
            return
        except InputChangedError as exc:
            self._budget.release(item)
            self.stats.skipped_changed += 1
            log.warning("%s: skipped, run again to use the new version", exc)
            return
        except FatalError as exc:
            self._budget.release(item)
            self.run_stop.fatal(exc)
            return
        except BackendError as exc:
            self._budget.release(item)
            failure = exc
        except (OutputError, OSError) as exc:
            self._budget.release(item)
            self._stop_for_disk(exc)
            return
        finally:
            del self._runs[item.key]
        try:  # the checkpoint, outside the handlers so its own failure is handled once
            if failure is None:
                self._finish_ok(run, stored)
            else:
                self._finish_failed(run, failure)
        except OSError as exc:
            self._stop_for_disk(exc)

    async def _attempt_until_settled(self, run: _ItemRun) -> tuple[OutputFile, ...]:
        """Try the item up to max_attempts times; return its stored images or raise."""
        return await self._retrier.call(partial(self._attempt, run))

    async def _attempt(self, run: _ItemRun) -> tuple[OutputFile, ...]:
        """One attempt: download what a killed run was answered with, or generate anew."""
        if self._halted():
            raise _Stopped
        item = run.item
        if run.pending:
            pending, run.pending = run.pending, ()  # a failure regenerates next time
            stored = await self._resume_download(item, pending)
            self.stats.resumed_downloads += 1
            return stored
        run.attempts += 1
        generation = await self._generate(item)
        run.response = generation.response
        run.batch, run.price_factor = generation.batch, generation.price_factor
        if any(img.url for img in generation.images):
            self._append_generated(run, generation.images)
        return await self._fetch_and_store(item, generation.images)

    async def _resume_download(
        self, item: WorkItem, pending: tuple[GeneratedImage, ...]
    ) -> tuple[OutputFile, ...]:
        """Fetch the images a killed run was answered with; on failure generate anew."""
        try:
            return await self._fetch_and_store(item, pending)
        except TransientError:
            log.info("%s: recorded URLs no longer serve; generating again", item.key[:16])
            raise

    def _stop_for_disk(self, exc: OSError | OutputError) -> None:
        """Writing failed (disk full, read-only remount): stop cleanly, say how to go on."""
        self.run_stop.disk(exc, self._out_dir)

    def _count_retry(self, exc: BackendError, attempt: int, wait: float) -> None:
        self.stats.retries += 1
        if exc.ambiguous:
            self.stats.ambiguous_retries += 1
        log.info("retry %d after %s (%s) in %.1fs", attempt, exc.kind, exc.status, wait)

    async def _generate(self, item: WorkItem) -> Generation:
        """One paid request, through the limiter; teaches the limiter what the API said."""
        image = await self._input_for_body(item)
        async with self._limiter.slot(item.n) as ticket:
            self.stats.requests += 1
            try:
                generation = await self._backend.generate(item, image)
            except RateLimitedError as exc:
                self.stats.rate_limited += 1
                self._limiter.pause(exc.retry_after, started_at=ticket.started_at)
                raise
        self._limiter.observe(generation.rate_limit)
        self._limiter.record_success()
        return generation

    async def _input_for_body(self, item: WorkItem) -> str | None:
        """The body's `image` value, read and encoded just before the request starts."""
        if item.input is None:
            return None
        if item.input.kind != "file":
            return item.input.value
        data = await asyncio.to_thread(
            read_input_bytes, Path(item.input.value), item.input.sha256 or ""
        )
        if len(data) > LARGE_INPUT_BYTES:
            return await asyncio.to_thread(encode_image, data)
        return encode_image(data)

    async def _fetch_and_store(
        self, item: WorkItem, images: tuple[GeneratedImage, ...]
    ) -> tuple[OutputFile, ...]:
        """Download every image of an answer and store it verified, atomically."""
        stored: list[OutputFile] = []
        try:
            for index, image in enumerate(images):
                stored.append(await self._fetch_one(item, index, image))
        except BaseException:
            # no manifest line will name these: leave no unnamed file behind
            await asyncio.shield(asyncio.to_thread(outputs.discard_outputs, self._out_dir, stored))
            raise
        return tuple(stored)

    async def _fetch_one(self, item: WorkItem, index: int, image: GeneratedImage) -> OutputFile:
        """One image downloaded (by the one retry policy, `DOWNLOAD_ATTEMPTS` tries) and
        stored; bytes that came inline are stored once (fetching them again gives the same
        bytes: a bad image regenerates the item instead)."""
        fetch = partial(self._fetch_once, item, index, image)
        if image.url is None:
            return await fetch()
        return await self._downloads.call(fetch)

    async def _fetch_once(self, item: WorkItem, index: int, image: GeneratedImage) -> OutputFile:
        data = await self._backend.download(image)
        store = partial(
            outputs.store_image,
            self._out_dir,
            source=item.source,
            key=item.key,
            index=index,
            data=data,
            url=image.url,
            id=image.id,
            folders=self._folders,
        )
        return await asyncio.get_running_loop().run_in_executor(self._store_pool, store)

    # ---------------------------------------------------------------- manifest

    def record_submitted(self, items: Iterable[WorkItem], ref: BatchRef) -> None:
        """Checkpoint that `items` wait in a Batch API batch (`ref`), durably: a resume
        then re-attaches instead of paying for them again. Raises `OSError` if the
        manifest cannot be written."""
        for item in items:
            run = self._runs.get(item.key) or _ItemRun(item, utc_now(), self._clock())
            self._writer.append(_record(run, "submitted", batch=ref))
        self._writer.sync()

    def _append_generated(self, run: _ItemRun, images: tuple[GeneratedImage, ...]) -> None:
        self._writer.append(_record(run, "generated", pending=images))

    def _finish_ok(self, run: _ItemRun, stored: tuple[OutputFile, ...]) -> None:
        elapsed = self._clock() - run.t0
        record = _record(run, "ok", outputs=stored, elapsed=elapsed, batch=run.batch)
        self._writer.append(record)
        self._on_stored(record)
        self.stats.ok += 1
        self.stats.images += len(stored)
        cost = self._budget.settle(run.item, run.response, run.price_factor)
        if cost is None:
            self.stats.cost_known = False
        else:
            self.stats.cost_usd += cost
        self._consecutive_failures = 0

    def _finish_failed(self, run: _ItemRun, exc: BackendError) -> None:
        error = ErrorInfo(kind=exc.kind, status=exc.status, message=exc.message)
        elapsed = self._clock() - run.t0
        self._writer.append(_record(run, "failed", error=error, elapsed=elapsed))
        self.stats.failed += 1
        self.stats.errors[exc.kind] += 1
        log.warning("%s failed for good: %s", run.item.key[:16], exc.message)
        if isinstance(exc, PermanentError):
            return  # a refusal or a 4xx is about this request, not about the API's health
        self._consecutive_failures += 1
        if self._consecutive_failures >= self._run.max_consecutive_failures:
            self.stop("aborted")


def _record(
    run: _ItemRun,
    status: Literal["ok", "failed", "generated", "submitted"],
    *,
    outputs: tuple[OutputFile, ...] = (),
    error: ErrorInfo | None = None,
    elapsed: float | None = None,
    pending: tuple[GeneratedImage, ...] = (),
    batch: BatchRef | None = None,
) -> ItemRecord:
    item = run.item
    return ItemRecord(
        key=item.key,
        status=status,
        source=item.source,
        vars=item.vars,
        repeat=item.repeat,
        input=item.input,
        prompt=item.prompt,
        params=item.params,
        outputs=outputs,
        attempts=run.attempts,
        error=error,
        started_at=run.started_at,
        finished_at=utc_now() if status in ("ok", "failed") else None,
        elapsed_s=round(elapsed, 3) if elapsed is not None else None,
        response=run.response if status in ("ok", "generated") else None,
        pending=pending,
        batch=batch,
    )


def _log_download_retry(exc: BackendError, attempt: int, wait: float) -> None:
    log.info("download retry %d after %s (%s) in %.1fs", attempt, exc.kind, exc.status, wait)
