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
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from ..backends.base import Backend, BatchControl
from ..budget import Budget
from ..errors import (
    BackendError,
    Deferred,
    FatalError,
    OutputError,
    RateLimitedError,
    TransientError,
)
from ..items import ItemDraft
from ..jobspec.model import RunSettings
from ..limiter import Limiter
from ..manifest import freshness as freshness
from ..manifest.log import Finished, ManifestState
from ..manifest.writer import ManifestWriter
from ..records import (
    BatchRef,
    GeneratedImage,
    Generation,
    ItemRecord,
    OutputFile,
    WorkItem,
)
from ..retry import Retrier, RetryPolicy, should_retry
from ..sources import InputChangedError
from ..store import files as outputs
from .checkpoint import Checkpoint, ItemRun
from .image_io import ImageIO
from .pool import Lane, RunStop, StopReason
from .stats import RunStats
from .todo import Todo, TodoSource

__all__ = ["Engine"]

log = logging.getLogger("pipeline.engine")  # the name a run's log has always shown


MAX_WAITING = 50_000
"""Items batch mode keeps waiting in batches at once (each a record and a future in memory,
no task): a batch's worth."""


class _Stopped(Exception):
    """The run is stopping: leave this item unrecorded so it runs again on resume."""


_Outcome = tuple[OutputFile, ...] | BaseException
"""What an item's attempts came to: its stored files, or why it has none."""
_SETTLING = (_Stopped, Deferred, InputChangedError, BackendError, OutputError, OSError)


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
        batches: BatchControl | None = None,
        max_waiting: int = MAX_WAITING,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._run = run
        self._out_dir = out_dir
        self._backend = backend
        self._limiter = limiter
        self._writer = writer
        self._on_progress = on_progress or (lambda _stats: None)
        self._clock = clock
        self._policy = RetryPolicy.from_run(run)
        self._rng = rng or random.Random()
        # built once: a retry loop per item cost more CPU than the request it guarded
        self._retrier = Retrier(
            self._policy, sleep=self._backoff_sleep, on_retry=self._count_retry, rng=self._rng
        )
        self._images = ImageIO(
            backend,
            out_dir=out_dir,
            writer=writer,
            policy=self._policy,
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
            manifest=writer.path,
            stats=self.stats,
            retry_failed=run.retry_failed,
            expand_again=expand_again,
            remember_stats=remember_stats,
        )
        self.run_stop = stop or RunStop()  # shared with the stages after storage
        self._budget = Budget(run.max_images, run.max_cost_usd, price, actual_cost)
        self._checkpoint = Checkpoint(
            writer,
            stats=self.stats,
            budget=self._budget,
            stop=self.run_stop,
            max_consecutive_failures=run.max_consecutive_failures,
            on_stored=on_stored,  # the stages after storage take each stored item
            clock=clock,
        )
        # batch mode: a request waits in its batch without a worker (or a task) of its own
        self._parking = batches
        self._parked = 0
        self._room = asyncio.Semaphore(max_waiting)  # parked items at most
        self._all_arrived = asyncio.Event()
        self._arrivals: Lane[tuple[ItemRun, asyncio.Future[Generation]]] | None = None

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
        # batch mode: parked items' answers come back through a lane of their own
        arrivals = self._arrivals = self._arrivals_lane() if self._parking else None
        try:
            await lane.finish(producer)
            if arrivals is not None:
                await self._drain_arrivals(arrivals)
        finally:
            producer.cancel()
            await lane.cancel()
            if arrivals is not None:
                await arrivals.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            # a store begun by a cancelled item ends before the run does (and the OUT lock)
            await asyncio.to_thread(self._images.close)
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
        run = self._checkpoint.start(todo.item)
        if todo.entry is not None and todo.entry.status == "generated":
            run.pending, run.attempts = todo.entry.pending, todo.entry.attempts
        if todo.entry is not None and todo.entry.status == "submitted":
            run.attempts = todo.entry.attempts - 1  # its batch request is the same attempt
        if self._parking is not None and not run.pending:
            await self._park(run)  # the worker is free again: the answer comes to `_arrived`
            return
        outcome: _Outcome
        try:
            outcome = await self._attempt_until_settled(run)
        except _SETTLING as exc:
            outcome = exc
        self._conclude(run, outcome)

    def _conclude(self, run: ItemRun, outcome: _Outcome) -> None:
        """The item's end: its ok or failed line, or none when it is left for later."""
        self._checkpoint.end(run)
        try:  # the checkpoint's own failure (a full disk) is handled once, here
            if isinstance(outcome, tuple):
                self._checkpoint.ok(run, outcome)
            else:
                self._budget.release(run.item)
                self._left_without_files(run, outcome)
        except OSError as exc:
            self._stop_for_disk(exc)

    def _left_without_files(self, run: ItemRun, exc: BaseException) -> None:
        if isinstance(exc, Deferred):
            self.stats.deferred += 1
        elif isinstance(exc, InputChangedError):
            self.stats.skipped_changed += 1
            log.warning("%s: skipped, run again to use the new version", exc)
        elif isinstance(exc, FatalError):
            self.run_stop.fatal(exc)
        elif isinstance(exc, BackendError):
            self._checkpoint.failed(run, exc)
        elif isinstance(exc, (OutputError, OSError)):
            self._stop_for_disk(exc)
        elif not isinstance(exc, _Stopped):
            raise exc  # a bug: not an outcome an item can have

    # ------------------------------------------------------- batch mode: parked

    async def _park(self, run: ItemRun) -> None:
        """Hand the item's request to its batch and free the worker; its answer comes
        back through the arrivals lane (no task waits per item)."""
        assert self._parking is not None
        try:
            if self._halted():
                raise _Stopped
            await self._room.acquire()
            try:
                run.attempts += 1
                image = await self._images.input_for_body(run.item)
                self.stats.requests += 1
                waiter = await self._parking.submit(run.item, image)
            except BaseException:
                self._room.release()
                raise
        except _SETTLING as exc:
            self._conclude(run, exc)
            return
        self._parked += 1
        self._all_arrived.clear()
        waiter.add_done_callback(partial(self._arrived, run))

    def _arrived(self, run: ItemRun, waiter: asyncio.Future[Generation]) -> None:
        if self._arrivals is not None:
            self._arrivals.put_nowait((run, waiter))

    async def _settle_arrival(self, arrival: tuple[ItemRun, asyncio.Future[Generation]]) -> None:
        """A parked item's answer: store it, or submit again under the retry policy."""
        run, waiter = arrival
        self._count_arrival()
        outcome: _Outcome
        try:
            if waiter.cancelled():
                raise _Stopped
            outcome = await self._store_answer(run, waiter.result())
        except BackendError as exc:
            if self._retry_parked(run, exc):
                await self._park(run)
                return
            outcome = exc
        except _SETTLING as exc:
            outcome = exc
        self._conclude(run, outcome)

    def _retry_parked(self, run: ItemRun, exc: BackendError) -> bool:
        """Whether a parked item's failure goes into a new batch (no wait: a batch is
        its own delay)."""
        if self._halted() or run.attempts >= self._policy.max_attempts:
            return False
        if not should_retry(exc, self._policy):
            return False
        self._count_retry(exc, run.attempts, 0.0)
        return True

    def _count_arrival(self) -> None:
        self._room.release()
        self._parked -= 1
        if not self._parked:
            self._all_arrived.set()

    def _arrivals_lane(self) -> Lane[tuple[ItemRun, asyncio.Future[Generation]]]:
        def dropped(arrival: tuple[ItemRun, asyncio.Future[Generation]]) -> None:
            self._count_arrival()
            self._conclude(arrival[0], _Stopped())

        lane: Lane[tuple[ItemRun, asyncio.Future[Generation]]] = Lane(
            "arrivals",
            self._run.concurrency,
            self._settle_arrival,
            self.run_stop,
            halts=self._halted,
            grace_s=lambda reason: None if reason == "budget" else self._run.grace_period_s,
            dropped=dropped,
        )
        lane.start()
        return lane

    async def _drain_arrivals(
        self, arrivals: Lane[tuple[ItemRun, asyncio.Future[Generation]]]
    ) -> None:
        """Once every item was submitted: wait for every parked item to come back (or the
        run to halt), then let the arrivals lane end."""
        while self._parked and not self._halted():
            waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._all_arrived.wait())]
            if not self.stopping:  # a budget stop lets what is in batches come back
                waits.append(asyncio.ensure_future(self.run_stop.wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
        await arrivals.close()
        await arrivals.finish()

    async def _attempt_until_settled(self, run: ItemRun) -> tuple[OutputFile, ...]:
        """Try the item up to max_attempts times; return its stored images or raise."""
        return await self._retrier.call(partial(self._attempt, run))

    async def _attempt(self, run: ItemRun) -> tuple[OutputFile, ...]:
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
        return await self._store_answer(run, await self._generate(item))

    async def _store_answer(self, run: ItemRun, generation: Generation) -> tuple[OutputFile, ...]:
        """The answer's images, downloaded and stored (URLs checkpointed first)."""
        run.response = generation.response
        run.batch, run.price_factor = generation.batch, generation.price_factor
        if any(img.url for img in generation.images):
            self._checkpoint.generated(run, generation.images)
        return await self._images.fetch_and_store(run.item, generation.images)

    async def _resume_download(
        self, item: WorkItem, pending: tuple[GeneratedImage, ...]
    ) -> tuple[OutputFile, ...]:
        """Fetch the images a killed run was answered with; on failure generate anew."""
        try:
            return await self._images.fetch_and_store(item, pending)
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
        image = await self._images.input_for_body(item)
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

    # ---------------------------------------------------------------- manifest

    def record_submitted(self, items: Iterable[WorkItem], ref: BatchRef) -> None:
        """Checkpoint that `items` wait in a Batch API batch (`ref`), durably: a resume
        then re-attaches instead of paying for them again. Raises `OSError` if the
        manifest cannot be written."""
        self._checkpoint.submitted(items, ref)


def _log_download_retry(exc: BackendError, attempt: int, wait: float) -> None:
    log.info("download retry %d after %s (%s) in %.1fs", attempt, exc.kind, exc.status, wait)
