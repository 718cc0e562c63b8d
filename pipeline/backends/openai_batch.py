"""OpenAI's Batch API behind the online `Backend` interface: half the price, within 24 h.

The engine calls `generate` for each item as it would online; here the request becomes
one line of a JSONL input file instead. Lines gather until a batch is full (50,000
requests or 200 MB, as the API takes at most) or no new item came for `gather_s`; the
file is uploaded, the batch created, and each waiting `generate` returns when its line's
result comes back. So the engine's retries, checks, storage and checkpoint work as they
do online: a line that failed for a transient reason is retried in a new batch.

A batch has one endpoint, so prompt-only items gather into ``/v1/images/generations``
batches and items with an input image into ``/v1/images/edits`` batches of their own. A
JSONL line cannot carry multipart parts: an edit line uses the Images API's JSON form,
``images: [{"image_url": ...}]`` (a local file as a ``data:`` URL of its bytes, a URL
input as itself) and ``mask: {"image_url": "data:image/png;base64,..."}``. Inputs are
inlined, never uploaded with ``POST /files`` for a ``file_id``: an input is at most 25 MB
(`pipeline.sources.MAX_INPUT_BYTES`), so its line fits an input file several times over,
and an upload per input would be one more thing to record, retry and clean up. A line is
counted at its real size (the data URL included) against `max_file_bytes`.

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
import base64
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp

from ..errors import (
    BackendError,
    Deferred,
    FatalError,
    OutputError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from ..limiter import Limiter
from ..pricing import BATCH_PRICE_FACTOR
from ..records import (
    BATCH_LOGGER,
    BatchRef,
    GeneratedImage,
    Generation,
    WorkItem,
    request_body,
)
from .base import (
    Recorder,
    classify_http,
    elide_images,
    encode_image,
    excerpt,
    load_answer,
    parse_images,
    scrub_strings,
)
from .openai import OpenAIBackend, image_type
from .roboflow import LARGE_ANSWER_BYTES

__all__ = [
    "BATCH_ENDPOINT",
    "EDITS_ENDPOINT",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_REQUESTS",
    "BatchBackend",
    "BatchOptions",
    "BatchProgress",
]

_log = logging.getLogger(__name__)
_batch_log = logging.getLogger(BATCH_LOGGER)  # what is in flight: shown by default

BATCH_ENDPOINT = "/v1/images/generations"
"""The endpoint of prompt-only items' batches."""
EDITS_ENDPOINT = "/v1/images/edits"
"""The endpoint of the batches of items with an input image (a batch has one endpoint)."""

MAX_BATCH_REQUESTS = 50_000
MAX_BATCH_BYTES = 190 * 1024 * 1024  # the API takes 200 MB: a margin for either meaning of MB
UNCLAIMED_BYTES = 64 * 1024 * 1024
"""Image bytes handed to the engine but not yet taken (`download`): results wait above it."""
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_READ_CHUNK = 1024 * 1024
_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*"([0-9a-f]{64})"')


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """What one poll of a batch said: for progress lines and the summary."""

    batch_id: str
    status: str
    total: int
    completed: int
    failed: int


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """How batches are made and waited for (from the spec's ``backend`` section)."""

    job: str
    wait: bool = True
    batch_size: int = MAX_BATCH_REQUESTS
    max_file_bytes: int = MAX_BATCH_BYTES
    poll_interval_s: float = 10.0
    poll_max_s: float = 300.0
    gather_s: float = 2.0
    control_attempts: int = 6  # tries of one upload/create/poll call before it gives up
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    # a line that failed goes online (full price, now) instead of into a new batch, paced
    # by `online_rate` / `online_concurrency` (the spec's run section)
    retry_online: bool = False
    online_rate: float | None = None
    online_concurrency: int = 4
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


class BatchBackend(OpenAIBackend):
    """Sends work items through OpenAI's Batch API under ``base_url`` (``…/v1``)."""

    def __init__(self, *args: Any, batch: BatchOptions, **kwargs: Any) -> None:
        """As `OpenAIBackend` (the registry's common signature), with the batch options."""
        super().__init__(*args, **kwargs)
        self._options = batch
        self._files_url = self._root + "/files"
        self._batches_url = self._root + "/batches"
        self._record: Recorder = lambda _items, _ref: None
        self._attached: dict[str, BatchRef] = {}
        self._chunks: dict[str, _Chunk] = {}  # by endpoint
        self._flush: asyncio.TimerHandle | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._found: dict[str, asyncio.Task[BatchRef | None]] = {}  # file id -> lookup
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unclaimed = 0
        self._claimed = asyncio.Condition()
        self._failed: set[str] = set()  # keys whose batch line failed (retry_online)
        self._online_limiter: Limiter | None = None

    def __repr__(self) -> str:
        return f"BatchBackend({self._batches_url!r})"

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
        await super().aclose()

    # ------------------------------------------------------------ the engine's calls

    async def generate(self, item: WorkItem, image: str | None) -> Generation:
        """The item's result from its batch: the one the manifest names, or a new one."""
        if item.input is not None and item.input.kind == "id":
            raise PermanentError(
                "backend.mode batch sends OpenAI requests, which cannot carry a Roboflow "
                "image id: use mode online",
                kind="bad_response",
                item_key=item.key,
            )
        if self._options.retry_online and item.key in self._failed:
            return await self._online(item, image)
        ref = self._attached.pop(item.key, None)
        if ref is not None and ref.batch_id is None:
            ref = await self._find_batch(ref.input_file_id)
        if ref is not None and ref.batch_id is not None:
            tracked = self._track(ref)
            waiter = self._wait_in(tracked, item.key)
            return await self._outcome(waiter, item)
        endpoint, line = await self._request_line(item, image)
        return await self._outcome(self._enqueue(item, endpoint, line), item)

    async def download(self, image: GeneratedImage) -> bytes:
        """The image's bytes (inline, as batch results carry them); frees their budget."""
        data = await super().download(image)
        async with self._claimed:
            self._unclaimed = max(0, self._unclaimed - len(data))
            self._claimed.notify_all()
        return data

    async def _outcome(self, waiter: asyncio.Future[Generation], item: WorkItem) -> Generation:
        try:
            return await waiter
        except BackendError as error:
            error.item_key = item.key
            self._failed.add(item.key)
            raise

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
                generation = await super().generate(item, image)
            except RateLimitedError as error:
                limiter.pause(error.retry_after, started_at=ticket.started_at)
                raise
        limiter.observe(generation.rate_limit)
        return generation

    # ------------------------------------------------------------------ submitting

    async def _request_line(self, item: WorkItem, image: str | None) -> tuple[str, bytes]:
        """The item's endpoint and its JSONL request line (``custom_id`` its key)."""
        if item.input is None:
            endpoint, body = BATCH_ENDPOINT, request_body(item, None, project=False)
        else:
            endpoint, body = EDITS_ENDPOINT, await self._edit_body(item, image)
        request = {"custom_id": item.key, "method": "POST", "url": endpoint, "body": body}
        if len(image or "") > LARGE_ANSWER_BYTES:  # megabytes of base64: not on the loop
            line = await asyncio.to_thread(_encode_line, request)
        else:
            line = _encode_line(request)
        if len(line) > self._options.max_file_bytes:
            raise PermanentError(
                f"the request is {len(line):,} bytes, more than a batch input file takes "
                f"({self._options.max_file_bytes:,}): use mode online for this input",
                kind="bad_response",
                item_key=item.key,
            )
        return endpoint, line

    async def _edit_body(self, item: WorkItem, image: str | None) -> dict[str, Any]:
        """An edit in the Images API's JSON form: the parameters, ``images`` (one input)
        and, when the source has one, ``mask``."""
        assert item.input is not None
        if item.input.kind == "url":
            reference = {"image_url": item.input.value}  # the API fetches it
        elif item.input.kind == "file" and image is not None:
            reference = {"image_url": _data_url(image)}
        else:
            raise PermanentError(
                f"the openai backend cannot send a {item.input.kind} input: use a file or URL",
                kind="bad_response",
                item_key=item.key,
            )
        body: dict[str, Any] = {"prompt": item.prompt, **item.params, "images": [reference]}
        mask = await self._mask_bytes(item)
        if mask is not None:
            body["mask"] = {"image_url": _data_url(encode_image(mask))}
        return body

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
            file_id = await self._control(partial(self._upload, chunk))
            self._record(chunk.items, BatchRef(file_id))
            ref = await self._create_batch(file_id, chunk.endpoint)
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

    async def _upload(self, chunk: _Chunk) -> str:
        """POST the JSONL input file (``purpose=batch``); its file id."""
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field(
            "file",
            b"".join(chunk.lines),
            filename=f"synthaug-{_safe(self._options.job)}.jsonl",
            content_type="application/jsonl",
        )
        answer = await self._json("POST", self._files_url, data=form)
        return _field(answer, "id", self._files_url)

    async def _create_batch(self, file_id: str, endpoint: str = BATCH_ENDPOINT) -> BatchRef:
        """POST /batches for the file; on an answer that may not have arrived, look the
        batch up by its input file before creating another."""
        body = {
            "input_file_id": file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
            "metadata": {"synthaug_job": self._options.job[:512]},
        }
        for _ in range(self._options.control_attempts):
            try:
                answer = await self._json("POST", self._batches_url, json=body)
            except TransientError as error:
                if error.ambiguous:
                    found = await self._find_batch(file_id)
                    if found is not None:
                        return found
                await self._pause_after(error)
                continue
            return BatchRef(file_id, _field(answer, "id", self._batches_url))
        raise TransientError(f"could not create a batch at {self._batches_url}", kind="connection")

    async def _find_batch(self, file_id: str) -> BatchRef | None:
        """The batch created for `file_id`, if any (one lookup per file, shared)."""
        lookup = self._found.get(file_id)
        if lookup is None:
            lookup = self._found[file_id] = asyncio.ensure_future(self._look_up(file_id))
        return await asyncio.shield(lookup)

    async def _look_up(self, file_id: str) -> BatchRef | None:
        after: str | None = None
        while True:
            query = "?limit=100" + (f"&after={after}" if after else "")
            page = await self._control(partial(self._json, "GET", self._batches_url + query))
            batches = page.get("data") if isinstance(page, dict) else None
            for batch in batches if isinstance(batches, list) else []:
                if isinstance(batch, dict) and batch.get("input_file_id") == file_id:
                    _batch_log.info("found batch %s of input file %s", batch.get("id"), file_id)
                    return BatchRef(file_id, str(batch.get("id")))
            if not (isinstance(page, dict) and page.get("has_more") and page.get("last_id")):
                return None
            after = str(page["last_id"])

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
        url = f"{self._batches_url}/{batch_id}"
        delay = self._options.poll_interval_s
        while True:
            batch = await self._poll(url)
            status = str(batch.get("status"))
            self._options.on_progress(_progress(batch_id, status, batch))
            if status in TERMINAL:
                return batch
            if not self._options.wait:
                tracked.deferred = True
                await self._settle_deferred(tracked)
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, max(self._options.poll_max_s, delay))

    async def _poll(self, url: str) -> dict[str, Any]:
        """GET the batch; a transient failure waits and tries again, for as long as it
        takes (its items were paid for: failing them would submit them again)."""
        while True:
            try:
                batch = await self._control(partial(self._json, "GET", url))
            except TransientError as error:
                _log.warning("cannot poll %s (%s): trying again", url, error.message)
                await asyncio.sleep(self._options.poll_max_s)
                continue
            if isinstance(batch, dict):
                return batch
            _log.warning("%s answered something other than a batch: trying again", url)
            await asyncio.sleep(self._options.poll_max_s)

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
            self._fail_all(tracked, _failed_batch(batch))
            return
        await self._all_arrived(tracked)
        while True:
            for name in ("output_file_id", "error_file_id"):
                file_id = batch.get(name)
                if isinstance(file_id, str) and file_id:
                    await self._read_until_done(tracked, file_id)
            for key, waiter in list(tracked.waiters.items()):
                _fail(waiter, _missing(status, tracked.ref.batch_id or ""))
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

    async def _read_until_done(self, tracked: _Tracked, file_id: str) -> None:
        """Read a results file through; a transient failure reads it again (the items
        already handed over are not read twice), for as long as it takes."""
        while tracked.waiters:
            try:
                await self._read_results(tracked, file_id)
            except TransientError as error:
                _log.warning(
                    "reading the results of %s: %s; reading again",
                    tracked.ref.batch_id,
                    error.message,
                )
                await asyncio.sleep(self._options.backoff_max_s)
            else:
                return

    async def _read_results(self, tracked: _Tracked, file_id: str) -> None:
        url = f"{self._files_url}/{file_id}/content"
        loop = asyncio.get_running_loop()
        async for line in self._lines(url):
            found = _CUSTOM_ID.search(line, 0, 512)
            if found is not None and found.group(1).decode() not in tracked.waiters:
                continue  # an item this run does not wait for: not worth decoding
            parse = partial(self._result, line, tracked.ref)
            key, outcome = await loop.run_in_executor(self._parser, parse)
            waiter = tracked.waiters.pop(key, None)
            if waiter is None or waiter.done():
                continue
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

    def _result(self, raw: bytes, ref: BatchRef) -> tuple[str, Generation | BackendError]:
        """One result line as the item's `Generation` or its error (parsing thread).

        The kept answer is the line's body; the `Generation` names the batch it came
        from and carries the batch discount (`BATCH_PRICE_FACTOR`) for what it cost."""
        try:
            line = load_answer(raw)
        except ValueError:
            return "", TransientError("a batch result line is not JSON", kind="bad_response")
        key = str(line.get("custom_id", "")) if isinstance(line, dict) else ""
        response = line.get("response") if isinstance(line, dict) else None
        error = line.get("error") if isinstance(line, dict) else None
        if not isinstance(response, dict):
            return key, _line_error(error)
        status = response.get("status_code")
        body = response.get("body")
        if not isinstance(status, int):
            return key, TransientError("a batch result without status_code", kind="bad_response")
        if not 200 <= status < 300:
            text = self._scrub(json.dumps(elide_images(body)))
            return key, classify_http(status, text, {}, now=self._clock())
        try:
            images = parse_images(body)
        except BackendError as failure:
            failure.status = status
            return key, failure
        kept = scrub_strings(elide_images(body), self._scrub)
        return key, Generation(
            images=images,
            response=kept,
            status=status,
            batch=ref,
            price_factor=BATCH_PRICE_FACTOR,
        )

    def _fail_all(self, tracked: _Tracked, error: BackendError) -> None:
        for waiter in tracked.waiters.values():
            _fail(waiter, error)
        tracked.waiters.clear()

    # ------------------------------------------------------------------- HTTP

    async def _control(self, call: Callable[[], Any]) -> Any:
        """A control call (upload, create, poll) with its own retries: transient
        failures wait with backoff; others end at once."""
        attempts = self._options.control_attempts
        for attempt in range(1, attempts + 1):
            try:
                return await call()
            except TransientError as error:
                if attempt == attempts:
                    raise
                await self._pause_after(error, attempt)
        raise AssertionError("unreachable")

    async def _pause_after(self, error: TransientError, attempt: int = 1) -> None:
        options = self._options
        wait = min(options.backoff_max_s, options.backoff_base_s * 2 ** (attempt - 1))
        retry_after = getattr(error, "retry_after", None)
        await asyncio.sleep(retry_after if isinstance(retry_after, float) else wait)

    async def _json(self, method: str, url: str, **request: Any) -> Any:
        """The parsed JSON answer of a control call; errors as the online client's."""
        status, chunks, headers = await self._send(
            partial(self._url, url), url, method=method, headers=self._auth(), **request
        )
        raw = b"".join(chunks)
        if not 200 <= status < 300:
            text = self._scrub(raw.decode("utf-8", errors="replace"))
            raise classify_http(status, text, headers, now=self._clock())
        try:
            return json.loads(raw)
        except ValueError:
            raise TransientError(
                f"{url} answered invalid JSON: {excerpt(raw.decode('utf-8', 'replace'))}",
                kind="bad_response",
                status=status,
            ) from None

    async def _lines(self, url: str) -> AsyncIterator[bytes]:
        """The lines of a results file, as they arrive (without waiting for the whole)."""
        session = self._ensure_session()
        target = self._url(url)
        # no total timeout: a results file is gigabytes; a stalled read still times out
        timeout = aiohttp.ClientTimeout(total=None, sock_read=self._timeout.total)
        try:
            async with session.get(
                target, proxy=self._proxy_for(target), headers=self._auth(), timeout=timeout
            ) as response:
                if response.status != 200:
                    text = self._scrub(await response.text(errors="replace"))
                    raise classify_http(response.status, text, response.headers, now=self._clock())
                rest = b""
                async for piece in response.content.iter_chunked(_READ_CHUNK):
                    rest += piece
                    *whole, rest = rest.split(b"\n")
                    for line in whole:
                        if line.strip():
                            yield line
                if rest.strip():
                    yield rest
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            failure = TransientError(f"reading {url} failed: {type(exc).__name__}", kind="download")
        else:
            return
        raise failure


def _encode_line(request: Mapping[str, Any]) -> bytes:
    """One JSONL line: compact JSON (ASCII, so its length is its size in bytes)."""
    return json.dumps(request, separators=(",", ":")).encode() + b"\n"


def _data_url(encoded: str) -> str:
    """A ``data:`` URL of an image given as base64, typed by its first bytes."""
    mime, _ = image_type(base64.b64decode(encoded[:16]))
    return f"data:{mime};base64,{encoded}"


def _refuse_recording(_items: Sequence[WorkItem], _ref: BatchRef) -> None:
    raise RuntimeError("a detached batch backend cannot record")


def _progress(batch_id: str, status: str, batch: Mapping[str, Any]) -> BatchProgress:
    counts = batch.get("request_counts")
    counts = counts if isinstance(counts, dict) else {}

    def count(name: str) -> int:
        value = counts.get(name)
        return value if isinstance(value, int) else 0

    return BatchProgress(batch_id, status, count("total"), count("completed"), count("failed"))


def _fail(waiter: asyncio.Future[Generation], error: BaseException) -> None:
    """Fail one waiting item with its own copy of `error` (each item's error carries
    its own key)."""
    if waiter.done():
        return
    copy = error.__class__.__new__(error.__class__)
    copy.__dict__.update(error.__dict__)
    copy.args = error.args
    waiter.set_exception(copy)


def _line_error(error: object) -> BackendError:
    """The error of a result line without a response: an expired request, usually."""
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    text = f"{code}: {message}" if code else str(message or "no response in the batch result")
    if code == "batch_expired":
        return TransientError(f"{text} (it runs again in a new batch)", kind="timeout")
    return TransientError(excerpt(text), kind="bad_response")


def _missing(status: str, batch_id: str) -> BackendError:
    """The error of an item its batch has no result line for."""
    if status in ("expired", "cancelled"):
        return TransientError(
            f"batch {batch_id} was {status} before this request ran (it runs again in a new batch)",
            kind="timeout",
        )
    return TransientError(
        f"batch {batch_id} ({status}) has no result for this request", kind="bad_response"
    )


def _failed_batch(batch: Mapping[str, Any]) -> FatalError:
    """A batch the API refused as a whole: its input file was invalid (a bug to report)."""
    errors = batch.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    detail = first.get("message") or "no reason given"
    where = f" (line {first['line']})" if first.get("line") is not None else ""
    return FatalError(
        f"batch {batch.get('id')} failed validation: {excerpt(str(detail))}{where}; "
        "please report this with the manifest's submitted lines",
        kind="bad_response",
    )


def _field(answer: Any, name: str, url: str) -> str:
    value = answer.get(name) if isinstance(answer, dict) else None
    if not isinstance(value, str) or not value:
        raise TransientError(
            f"{url} answered without {name}: {excerpt(repr(answer))}", kind="bad_response"
        )
    return value


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "job"
