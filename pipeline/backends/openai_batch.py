"""OpenAI's Batch API behind the online `Backend` interface: half the price, within 24 h.

The engine calls `generate` for each item as it would online; here the request becomes
one line of a JSONL input file instead. Lines gather until a batch is full (50,000
requests or 200 MB, as the API takes at most) or no new item came for `gather_s`; the
file is uploaded, the batch created, and each waiting `generate` returns when its line's
result comes back. So the engine's retries, checks, storage and checkpoint work as they
do online: a line that failed for a transient reason is retried in a new batch.

A batch has one endpoint: prompt-only items and edits gather into files of their own
(the request lines: `pipeline.backends.batch_lines`; the Files and Batches calls, under
the run's retry policy: `pipeline.backends.batch_files`; what comes back:
`pipeline.backends.batch_results`). This module gathers, submits, follows and collects.
The HTTP side (session, key, proxies, errors) is the online client's `ApiClient`, which
it shares with the `OpenAIBackend` it composes for ``retry_online``.

Paying twice is what this module is careful about. Before a batch is created, and again
once it exists, the manifest records where each item waits (`bind_manifest`'s callback:
a ``submitted`` line with the input file and the batch id), so a killed run re-attaches
to the batch instead of submitting again; if it was killed between the two, the batch is
looked up by its input file. A batch that is polled can only fail its items for good
reasons (a fatal answer); a network outage while waiting just keeps the poll waiting.

Results arrive as one file with every image inline (gigabytes for a big batch): it is
read as a stream, a line at a time, parsed in the client's parsing thread, and handed to
the engine under a byte budget (`UNCLAIMED_BYTES`) so that images are not held in
memory faster than the engine stores them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import (
    BackendError,
    Deferred,
    FatalError,
    OutputError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from ..jobspec.model import BackendSettings, RunSettings
from ..limiter import Limiter
from ..records import BATCH_LOGGER, BatchRef, GeneratedImage, Generation, WorkItem
from ..retry import RetryPolicy
from . import batch_results as results
from .base import Recorder
from .batch_files import BatchFiles
from .batch_lines import BATCH_ENDPOINT, MAX_BATCH_BYTES, request_line
from .batch_results import BatchProgress
from .client_options import ClientOptions
from .http import ApiClientOwner
from .openai import OpenAIBackend

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is Python 3.11+; we support 3.10

__all__ = ["BatchBackend", "BatchOptions", "BatchProgress"]

_batch_log = logging.getLogger(BATCH_LOGGER)  # what is in flight: shown by default

UNCLAIMED_BYTES = 64 * 1024 * 1024
"""Image bytes handed to the engine but not yet taken (`download`): results wait above it."""
DEFAULT_GATHER_S = 2.0
"""Seconds without a new item after which what has gathered is submitted."""
_BACKEND = BackendSettings()  # the defaults are declared once, in the spec's sections
_RUN = RunSettings()


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """How batches are made and waited for (from the spec's ``backend`` and ``run``
    sections, whose defaults these are: `pipeline.run.batch.batch_options` builds it)."""

    job: str
    wait: bool = True
    batch_size: int = _BACKEND.batch_size
    max_file_bytes: int = MAX_BATCH_BYTES
    poll_interval_s: float = _BACKEND.poll_interval_s
    poll_max_s: float = _BACKEND.poll_max_s
    gather_s: float = DEFAULT_GATHER_S
    # the control calls (upload, create, list), and the patience of polls and results reads
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy.from_run(_RUN))
    # a line that failed goes online (full price, now) instead of into a new batch, paced
    # by `online_rate` / `online_concurrency` (the spec's run section)
    retry_online: bool = _BACKEND.retry_online
    online_rate: float | None = _RUN.rate_limit
    online_concurrency: int = _RUN.concurrency
    # a batch the API does not know (404) is submitted again instead of ending the run:
    # only for a free rehearsal, whose embedded mock forgets its batches when it stops
    resubmit_lost: bool = False
    on_progress: Callable[[BatchProgress], None] = field(default=lambda _progress: None)


@dataclass(eq=False)
class _Chunk:
    """Request lines gathering for the next input file of one endpoint."""

    endpoint: str = BATCH_ENDPOINT
    items: list[WorkItem] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    waiters: dict[str, asyncio.Future[Generation]] = field(default_factory=dict)
    size: int = 0


@dataclass(eq=False)
class _Tracked:
    """A batch being waited for, and the items waiting in it."""

    ref: BatchRef
    waiters: dict[str, asyncio.Future[Generation]] = field(default_factory=dict)
    expected: set[str] = field(default_factory=set)  # recorded keys a resume will attach
    deferred: bool = False  # --no-wait: the batch is not done; its items wait for a later run
    failure: BackendError | None = None  # the batch cannot be followed: its items fail so
    task: asyncio.Task[None] | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class BatchBackend(ApiClientOwner):
    """Sends work items through OpenAI's Batch API under ``base_url`` (``…/v1``)."""

    def __init__(
        self, base_url: str, api_key: str, *, batch: BatchOptions, **options: Unpack[ClientOptions]
    ) -> None:
        """The registry's common signature (as `OpenAIBackend`), with the batch options."""
        self._online_client = OpenAIBackend(base_url, api_key, **options)
        self._http = self._online_client.http
        self._options = batch
        self._files = BatchFiles(
            self._online_client.api_root,
            self._http,
            job=batch.job,
            policy=batch.retry,
            poll_max_s=batch.poll_max_s,
        )
        self._record: Recorder = lambda _items, _ref: None
        self._attached: dict[str, BatchRef] = {}
        self._chunks: dict[str, _Chunk] = {}  # by endpoint
        self._flush: asyncio.TimerHandle | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unclaimed = 0
        self._claimed = asyncio.Condition()
        self._failed: set[str] = set()  # keys whose batch line failed (retry_online)
        self._online_limiter: Limiter | None = None

    def __repr__(self) -> str:
        return f"BatchBackend({self._files.batches_url!r})"

    @property
    def api_root(self) -> str:
        """The API root this client sends to (``…/v1``)."""
        return self._online_client.api_root

    async def ask_model(self, model: str, *, timeout_s: float | None = None) -> tuple[int, Any]:
        """``GET /models/{model}``, as `OpenAIBackend.ask_model` (the same API's models)."""
        return await self._online_client.ask_model(model, timeout_s=timeout_s)

    def bind_manifest(self, attached: Mapping[str, BatchRef], record: Recorder) -> None:
        """Where the manifest says items already wait, and how to record new ones.

        `record(items, ref)` must append and fsync a ``submitted`` line for each item
        before it returns: it is called before a batch is created and once it exists.
        """
        self._attached = dict(attached)
        self._record = record
        for key, ref in attached.items():
            if ref.batch_id is not None:
                self._track(ref).expected.add(key)

    async def detach(self) -> None:
        """Stop gathering, submitting and polling: the run is over, and its manifest is
        about to close. A batch being created now was recorded with its input file, so
        the next run finds it."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for chunk in self._chunks.values():
            for waiter in chunk.waiters.values():
                waiter.cancel()
        self._record = _refuse_recording

    async def aclose(self) -> None:
        """Detach, then close the session."""
        await self.detach()
        await self._online_client.aclose()

    # ------------------------------------------------------------ the engine's calls

    async def generate(self, item: WorkItem, image: str | None) -> Generation:
        """The item's result from its batch, waited for here (`submit` does not wait)."""
        return await (await self.submit(item, image))

    async def submit(self, item: WorkItem, image: str | None) -> asyncio.Future[Generation]:
        """Where the item's result will arrive: the batch the manifest names, or a new one
        (or, `retry_online`, the Images API). The engine parks the item on it: nothing
        waits per item while the batch runs."""
        if item.input is not None and item.input.kind == "id":
            raise PermanentError(
                "backend.mode batch sends OpenAI requests, which cannot carry a Roboflow "
                "image id: use mode online",
                kind="bad_response",
                item_key=item.key,
            )
        waiter: asyncio.Future[Generation]
        if self._options.retry_online and item.key in self._failed:
            waiter = asyncio.ensure_future(self._online(item, image))  # a retried line only
        else:
            waiter = await self._batch_waiter(item, image)
        waiter.add_done_callback(partial(self._note_failure, item.key))
        return waiter

    async def _batch_waiter(self, item: WorkItem, image: str | None) -> asyncio.Future[Generation]:
        ref = self._attached.pop(item.key, None)
        if ref is not None and ref.batch_id is None:
            ref = await self._files.find(ref.input_file_id)
        if ref is not None and ref.batch_id is not None:
            return self._wait_in(self._track(ref), item.key)
        endpoint, line = await request_line(item, image, max_bytes=self._options.max_file_bytes)
        return self._enqueue(item, endpoint, line)

    async def download(self, image: GeneratedImage) -> bytes:
        """The image's bytes (inline, as batch results carry them); frees their budget."""
        data = await self._online_client.download(image)
        async with self._claimed:
            self._unclaimed = max(0, self._unclaimed - len(data))
            self._claimed.notify_all()
        return data

    def _note_failure(self, key: str, waiter: asyncio.Future[Generation]) -> None:
        """A failed line names its item, and the item goes online next time when
        `retry_online` is set."""
        error = None if waiter.cancelled() else waiter.exception()
        if isinstance(error, BackendError):
            error.item_key = key
            self._failed.add(key)

    async def _online(self, item: WorkItem, image: str | None) -> Generation:
        """`retry_online`: the item's request sent to the Images API itself, paced by the
        spec's online rate and concurrency (full price: its answer names no batch)."""
        if self._online_limiter is None:
            self._online_limiter = Limiter(
                rate=self._options.online_rate,
                image_rate=None,
                concurrency=self._options.online_concurrency,
            )
        limiter = self._online_limiter
        async with limiter.slot(item.n) as ticket:
            try:
                generation = await self._online_client.generate(item, image)
            except RateLimitedError as error:
                limiter.pause(error.retry_after, started_at=ticket.started_at)
                raise
        limiter.observe(generation.rate_limit)
        return generation

    # ------------------------------------------------------------------ submitting

    def _enqueue(self, item: WorkItem, endpoint: str, line: bytes) -> asyncio.Future[Generation]:
        """Add the item's request line to its endpoint's gathering file; submit it when
        full (a line is counted at its real size, inline images included)."""
        chunk = self._chunks.setdefault(endpoint, _Chunk(endpoint))
        if chunk.lines and chunk.size + len(line) > self._options.max_file_bytes:
            self._submit_gathered(endpoint)
            chunk = self._chunks.setdefault(endpoint, _Chunk(endpoint))
        waiter: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        chunk.items.append(item)
        chunk.lines.append(line)
        chunk.waiters[item.key] = waiter
        chunk.size += len(line)
        if len(chunk.lines) >= self._options.batch_size:
            self._submit_gathered(endpoint)
        else:
            self._arm_flush()
        return waiter

    def _arm_flush(self) -> None:
        """Submit what has gathered once no new item came for `gather_s`."""
        if self._flush is not None:
            self._flush.cancel()
        loop = asyncio.get_running_loop()
        self._flush = loop.call_later(self._options.gather_s, self._submit_gathered)

    def _submit_gathered(self, endpoint: str | None = None) -> None:
        """Submit the file gathering for `endpoint` (the others keep gathering), or, for
        None (no new item came for `gather_s`), every gathering file."""
        if endpoint is None and self._flush is not None:
            self._flush.cancel()
            self._flush = None
        for name in [endpoint] if endpoint is not None else list(self._chunks):
            chunk = self._chunks.pop(name, None)
            if chunk is not None and chunk.lines:
                self._spawn(self._submit(chunk))

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _submit(self, chunk: _Chunk) -> None:
        """Upload the file, record, create the batch, record again, then wait for it."""
        try:
            file_id = await self._files.upload(chunk.lines)
            self._record(chunk.items, BatchRef(file_id))
            ref = await self._files.create(file_id, chunk.endpoint)
            self._record(chunk.items, ref)
        except BackendError as error:
            for waiter in chunk.waiters.values():
                _fail(waiter, error)
            return
        except OSError as error:  # the manifest could not record it: stop as for a full disk
            for waiter in chunk.waiters.values():
                if not waiter.done():
                    waiter.set_exception(
                        OutputError(f"cannot record a submitted batch: {error.strerror or error}")
                    )
            return
        except BaseException:  # cancelled: the items were not recorded as submitted
            for waiter in chunk.waiters.values():
                waiter.cancel()
            raise
        _batch_log.info("submitted batch %s (%d requests)", ref.batch_id, len(chunk.items))
        tracked = self._track(ref)
        for key, waiter in chunk.waiters.items():
            tracked.waiters[key] = waiter
        tracked.arrived.set()

    # ------------------------------------------------------------------- waiting

    def _track(self, ref: BatchRef) -> _Tracked:
        assert ref.batch_id is not None
        tracked = self._tracked.get(ref.batch_id)
        if tracked is None:
            tracked = self._tracked[ref.batch_id] = _Tracked(ref)
            task = asyncio.ensure_future(self._follow(tracked))
            tracked.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return tracked

    def _wait_in(self, tracked: _Tracked, key: str) -> asyncio.Future[Generation]:
        waiter: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        if tracked.failure is not None:
            _fail(waiter, tracked.failure)
        elif tracked.deferred:
            _fail(waiter, Deferred(tracked.ref.batch_id or ""))
        else:
            tracked.waiters[key] = waiter
            tracked.arrived.set()
        return waiter

    async def _follow(self, tracked: _Tracked) -> None:
        """Poll the batch until it ends (or, without waiting, once), then collect it.

        Only a fatal answer (a refused key, an unknown batch) fails its items, and then
        as fatal: the run stops, and the items stay recorded as submitted.
        """
        try:
            batch = await self._wait_for_end(tracked)
            if batch is not None:
                await self._collect(tracked, batch)
        except BackendError as error:
            failure: BackendError = FatalError(
                f"cannot follow batch {tracked.ref.batch_id}: {error.message}",
                kind=error.kind,
                status=error.status,
            )
            if self._options.resubmit_lost and error.status == 404:
                failure = TransientError(
                    f"batch {tracked.ref.batch_id} is gone (a rehearsal's mock forgets its "
                    "batches when it stops): submitting its items again",
                    kind="bad_response",
                    status=404,
                )
            tracked.failure = failure
            self._fail_all(tracked, failure)

    async def _wait_for_end(self, tracked: _Tracked) -> dict[str, Any] | None:
        """The batch once it ended; None when not waiting and it has not ended."""
        batch_id = tracked.ref.batch_id or ""
        delay = self._options.poll_interval_s
        while True:
            batch = await self._files.poll(batch_id)
            status = str(batch.get("status"))
            self._options.on_progress(results.progress_of(batch_id, status, batch))
            if status in results.TERMINAL:
                return batch
            if not self._options.wait:
                tracked.deferred = True
                await self._settle_deferred(tracked)
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, max(self._options.poll_max_s, delay))

    async def _settle_deferred(self, tracked: _Tracked) -> None:
        """--no-wait: every item of an unfinished batch waits for a later run."""
        while True:
            for waiter in tracked.waiters.values():
                _fail(waiter, Deferred(tracked.ref.batch_id or ""))
            tracked.waiters.clear()
            tracked.arrived.clear()
            await tracked.arrived.wait()

    async def _collect(self, tracked: _Tracked, batch: dict[str, Any]) -> None:
        """Hand every waiting item its line's result; then fail the ones it had none for."""
        status = str(batch.get("status"))
        if status == "failed":
            self._fail_all(tracked, results.failed_batch(batch))
            return
        await self._all_arrived(tracked)
        while True:
            for name in ("output_file_id", "error_file_id"):
                file_id = batch.get(name)
                if isinstance(file_id, str) and file_id:
                    take = partial(self._take, tracked)
                    await self._files.read(file_id, take, wanted=lambda: bool(tracked.waiters))
            for key, waiter in list(tracked.waiters.items()):
                _fail(waiter, results.missing_result(status, tracked.ref.batch_id or ""))
                del tracked.waiters[key]
            tracked.arrived.clear()
            await tracked.arrived.wait()  # an item attached late: read the results again

    async def _all_arrived(self, tracked: _Tracked) -> None:
        """Wait until every recorded item of the batch is waiting (or none came for a
        while): the results file is read once for all of them."""
        while tracked.expected - tracked.waiters.keys():
            tracked.arrived.clear()
            try:
                await asyncio.wait_for(tracked.arrived.wait(), self._options.gather_s)
            except asyncio.TimeoutError:
                return

    async def _take(self, tracked: _Tracked, line: bytes) -> None:
        """Hand one result line to the item waiting for it (parsed in the parse thread)."""
        found = results.CUSTOM_ID.search(line, 0, 512)
        if found is not None and found.group(1).decode() not in tracked.waiters:
            return  # an item this run does not wait for (or has): not worth decoding
        loop = asyncio.get_running_loop()
        parse = partial(results.parse_result, line, tracked.ref, self._http)
        key, outcome = await loop.run_in_executor(self._http.parser, parse)
        waiter = tracked.waiters.pop(key, None)
        if waiter is None or waiter.done():
            return
        if isinstance(outcome, Generation):
            await self._claim(sum(len(img.data or b"") for img in outcome.images))
            waiter.set_result(outcome)
        else:
            _fail(waiter, outcome)

    async def _claim(self, size: int) -> None:
        """Wait until the engine has taken enough earlier images to hold `size` more."""
        async with self._claimed:
            await self._claimed.wait_for(
                lambda: self._unclaimed == 0 or self._unclaimed + size <= UNCLAIMED_BYTES
            )
            self._unclaimed += size

    def _fail_all(self, tracked: _Tracked, error: BackendError) -> None:
        for waiter in tracked.waiters.values():
            _fail(waiter, error)
        tracked.waiters.clear()


def _refuse_recording(_items: Sequence[WorkItem], _ref: BatchRef) -> None:
    raise RuntimeError("a detached batch backend cannot record")


def _fail(waiter: asyncio.Future[Generation], error: BaseException) -> None:
    """Fail one waiting item with its own copy of `error` (each item's error carries
    its own key)."""
    if waiter.done():
        return
    copy = error.__class__.__new__(error.__class__)
    copy.__dict__.update(error.__dict__)
    copy.args = error.args
    waiter.set_exception(copy)
