"""Uploading every stored image to a Roboflow project, exactly once (the `upload:` block).

Uploads run beside the engine, not after it. The runner hands this module every manifest
line as it is written (`ManifestWriter.add_append_hook`); at start it also queues the
backlog: the ok lines of earlier runs with an image not yet uploaded. For each such item
every output without a recorded upload is sent, then the item's ok line is appended
again with each output's ``upload`` (``{"id", "project", "duplicate"}``, or
``{"project", "error"}``). The last line for a key wins, so the manifest says which of
its images the project holds.

Exactly once: an image is named by its stored file (``<key16>-<i>.<ext>``), so a retry
whose first answer was lost, or the next run after a kill, is answered "duplicate", which
counts as success. A resume sends only outputs without a recorded id. Upload problems
never regenerate an image: a failed upload is recorded on its output (exit 1) and tried
again by the next run; an image whose file is gone or changed is left to the engine,
which makes it again and queues the new one.

Pace and retries are the upload's own: a `Limiter` (``upload.concurrency``,
``upload.rate_limit``, 429 pauses) and a `Retrier` (``upload.max_attempts``, the run's
backoff). A refused key or an unknown project stops the whole run (exit 3). On a stop
(signal, `RunControl`, a fatal answer, a full disk) nothing new starts; uploads in flight
get the run's grace period, then are cancelled without a line (their next run is
answered duplicate). A budget stop, or too many failed generations, still uploads what
was stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass
from datetime import date
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from .backends.base import Backend
from .credentials import DIRECT, read_proxy_settings, uploads_to_backend
from .engine import Engine, StopReason
from .errors import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    BackendError,
    FatalError,
    OutputError,
    RateLimitedError,
)
from .limiter import Limiter
from .manifest.log import ManifestWriter, read_lines
from .records import ImageUpload, UploadAnswer
from .retry import Retrier, RetryPolicy
from .spec.fields import parse_rate
from .spec.model import DEFAULT_UPLOAD_RATE, Spec, UploadSettings
from .store.layout import IMAGES_DIR, MANIFEST_NAME

__all__ = [
    "MAX_TAG_CHARS",
    "UploadStats",
    "Uploads",
    "add_upload_summary",
    "alongside",
    "open_uploads",
    "pending_uploads",
    "provenance_tags",
]

log = logging.getLogger(__name__)

MAX_TAG_CHARS = 64
"""Provenance tags are cut to this length (a long variable value would otherwise make a
tag nobody types)."""
_NOT_TAG = re.compile(r"[^A-Za-z0-9._-]+")
# the user's stop or a broken run stops uploads too; a budget stop or too many failed
# generations do not: what was stored is still uploaded
_STOPS_UPLOADS: frozenset[StopReason] = frozenset({"sigint", "sigterm", "stopped", "fatal", "disk"})


class UploadTarget(Protocol):
    """What uploading needs from a client (`RoboflowUploadClient`, or a test's fake)."""

    async def upload(self, image: ImageUpload) -> UploadAnswer:
        """Add `image` to the project; raises a `BackendError` subclass on failure."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


@dataclass(slots=True)
class UploadStats:
    """Counters of one run's uploads, for the summary and the exit code."""

    uploaded: int = 0  # new images in the project
    duplicates: int = 0  # the project already held them: an earlier answer was lost
    failed: int = 0  # outputs whose upload failed for good this run (recorded)
    skipped: int = 0  # items whose file was gone or changed: the engine makes them again
    pending: int = 0  # items queued but not settled when the run stopped
    retries: int = 0
    rate_limited_429: int = 0


@dataclass(frozen=True, slots=True)
class _Todo:
    """An ok line with outputs to upload; `version` is its key's line count this run
    when it was queued (a newer line for the key makes this one stale)."""

    line: Mapping[str, Any]
    version: int


class _Stopped(Exception):
    """The run is stopping: leave the rest of this item for the next run."""


def provenance_tags(job: str, line: Mapping[str, Any], extra: tuple[str, ...]) -> tuple[str, ...]:
    """The tags an image gets: ``synthaug``, its job, source, each template variable and
    its key (first 16 hex digits, as its file name), then the spec's own `extra` tags.

    Roboflow's tag alphabet is not documented; these keep to letters, digits, ``.``,
    ``_`` and ``-`` (anything else becomes ``-``), at most `MAX_TAG_CHARS` each, so that
    a night's images can be found, and rolled back, by tag.
    """
    found = line.get("vars")
    variables: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    raw = [
        "synthaug",
        f"job-{job}",
        f"source-{line.get('source', '')}",
        *(f"var-{name}-{value}" for name, value in variables.items()),
        f"key-{str(line['key'])[:16]}",
    ]
    tags: list[str] = []
    for text in [*raw, *extra]:
        tag = _NOT_TAG.sub("-", text).strip("-")[:MAX_TAG_CHARS].rstrip("-")
        if tag and tag not in tags:
            tags.append(tag)
    return tuple(tags)


def _uploaded(output: Mapping[str, Any], project: str) -> bool:
    """Whether `output` is recorded as in `project` (an error record does not count)."""
    upload = output.get("upload")
    return (
        isinstance(upload, Mapping) and upload.get("project") == project and "error" not in upload
    )


def _needs_upload(line: Mapping[str, Any], project: str) -> bool:
    outputs = line.get("outputs")
    return (
        line.get("status") == "ok"
        and isinstance(outputs, list)
        and any(isinstance(o, Mapping) and not _uploaded(o, project) for o in outputs)
    )


def pending_uploads(manifest: Path, project: str) -> list[dict[str, Any]]:
    """The last line of each key that is ok and has an output not yet in `project`.

    Reads (and parses) the whole manifest once: about a second per 100,000 lines, paid
    only by runs with an ``upload:`` block. Only pending lines are kept.
    """
    pending: dict[str, dict[str, Any]] = {}
    for line in read_lines(manifest):
        if _needs_upload(line, project):
            pending[line["key"]] = line
        else:
            pending.pop(line["key"], None)
    return list(pending.values())


def _read_stored(out_dir: Path, output: Mapping[str, Any]) -> bytes | None:
    """The bytes of a stored image if they are still what the manifest recorded, else
    None (gone or changed: the engine makes the item again). Only a regular file
    directly in ``images/<source>/`` is read: a hand-edited path never leaves OUT."""
    parts = PurePosixPath(str(output.get("path", ""))).parts
    if len(parts) != 3 or parts[0] != IMAGES_DIR or any(p in ("", ".", "..") for p in parts):
        return None
    path = out_dir.joinpath(*parts)
    try:
        if path.is_symlink() or not path.is_file():
            return None
        data = path.read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == output.get("sha256") else None


class Uploads:
    """The upload queue of one run: fed by manifest lines, drained by its own workers."""

    def __init__(
        self,
        settings: UploadSettings,
        *,
        job: str,
        out_dir: Path,
        client: UploadTarget,
        writer: ManifestWriter,
        policy: RetryPolicy,
        limiter: Limiter,
        grace_period_s: float,
        day: str,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._job = job
        self._out_dir = out_dir
        self._client = client
        self._writer = writer
        self._limiter = limiter
        self._grace_s = grace_period_s
        self._batch = settings.batch_name(day)
        self._extra_tags = settings.tag_names(day)
        self._retrier = Retrier(
            policy, sleep=self._backoff_sleep, on_retry=self._count_retry, rng=rng
        )
        self._queue: asyncio.Queue[_Todo | None] = asyncio.Queue()
        self._versions: dict[str, int] = {}  # key -> lines written for it this run
        self._writing = False  # our own line is being appended: the hook ignores it
        self._open = False
        self._stopping = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self.stats = UploadStats()
        self.fatal_error: FatalError | None = None
        self.output_error: OutputError | None = None

    @property
    def project(self) -> str:
        """The Roboflow project the images go to."""
        return self._settings.project

    # ----------------------------------------------------------------- feeding

    def queue_backlog(self, lines: list[dict[str, Any]]) -> None:
        """Queue ok lines of earlier runs that have images not yet uploaded."""
        for line in lines:
            self._queue.put_nowait(_Todo(line, 0))
            self.stats.pending += 1
        if lines:
            log.info("%d items of earlier runs have images to upload", len(lines))

    def on_line(self, line: Mapping[str, Any], _end: int) -> None:
        """The manifest writer's append hook: queue each new ok line with images to upload."""
        key = line["key"]
        self._versions[key] = self._versions.get(key, 0) + 1
        if self._open and not self._writing and _needs_upload(line, self.project):
            self._queue.put_nowait(_Todo(line, self._versions[key]))
            self.stats.pending += 1

    # ----------------------------------------------------------------- control

    async def begin(self) -> None:
        """Queue the backlog, follow the manifest (`on_line`) and start the workers: all
        before the engine writes its first line."""
        manifest = self._out_dir / MANIFEST_NAME
        backlog = await asyncio.to_thread(pending_uploads, manifest, self.project)
        self.queue_backlog(backlog)
        self._writer.add_append_hook(self.on_line)
        self._open = True
        self._workers = [
            asyncio.create_task(self._worker(), name=f"upload-{i}")
            for i in range(self._settings.concurrency)
        ]

    def stop(self) -> None:
        """Start no new upload; the ones in flight get the grace period in `close`."""
        if not self._stopping.is_set():
            log.info("stopping uploads")
        self._stopping.set()

    async def wait_stopping(self) -> None:
        """Return once uploads are stopping."""
        await self._stopping.wait()

    async def close(self) -> None:
        """Upload what is queued (unless stopping), then end the workers.

        After a stop, uploads in flight get the grace period, then are cancelled.
        """
        self._open = False
        for _ in self._workers:
            self._queue.put_nowait(None)
        everything: asyncio.Future[Any] = asyncio.gather(*self._workers)
        stop_wait = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([everything, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            if not everything.done():
                done, _ = await asyncio.wait({everything}, timeout=self._grace_s)
                if not done:
                    log.warning("grace period over: cancelling uploads in flight")
            if everything.done() and not everything.cancelled():
                everything.result()  # re-raise a bug in a worker
        finally:
            stop_wait.cancel()
            everything.cancel()
            await asyncio.gather(everything, stop_wait, return_exceptions=True)

    async def abort(self) -> None:
        """Cancel every upload at once (the run is being cancelled): no line for them."""
        self._open = False
        self.stop()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def aclose(self) -> None:
        """Release the client's connections."""
        await self._client.aclose()

    async def _backoff_sleep(self, seconds: float) -> None:
        """Sleep between attempts, cut short by a stop (the next attempt then stands down)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    def _count_retry(self, exc: BackendError, attempt: int, wait: float) -> None:
        self.stats.retries += 1
        log.info("upload retry %d after %s (%s) in %.1fs", attempt, exc.kind, exc.status, wait)

    # ----------------------------------------------------------------- workers

    async def _worker(self) -> None:
        while (todo := await self._queue.get()) is not None:
            if self._stopping.is_set():
                continue  # drain without starting
            await self._upload_item(todo)

    async def _upload_item(self, todo: _Todo) -> None:
        """Upload each output of one item that is not yet in the project, then record
        what happened (also when stopped part way: what was done is kept)."""
        line = todo.line
        outputs = [dict(o) if isinstance(o, Mapping) else o for o in line["outputs"]]
        changed = False
        try:
            for output in outputs:
                if not isinstance(output, dict) or _uploaded(output, self.project):
                    continue
                data = await asyncio.to_thread(_read_stored, self._out_dir, output)
                if data is None:
                    self.stats.skipped += 1
                    log.info("%s: stored image gone or changed; not uploaded", line["key"][:16])
                    return
                output["upload"] = await self._upload_output(line, output, data)
                changed = True
        except _Stopped:
            pass
        finally:
            self.stats.pending -= 1
            if changed:
                self._record(todo, outputs)

    async def _upload_output(
        self, line: Mapping[str, Any], output: Mapping[str, Any], data: bytes
    ) -> dict[str, Any]:
        """Upload one image; its manifest record (id, or error). Raises `_Stopped`."""
        image = ImageUpload(
            name=PurePosixPath(str(output["path"])).name,
            data=data,
            split=self._settings.split,
            batch=self._batch,
            tags=provenance_tags(self._job, line, self._extra_tags),
        )
        try:
            answer = await self._retrier.call(partial(self._attempt, image))
        except FatalError as exc:
            self.fatal_error = exc
            self.stop()
            raise _Stopped from None
        except BackendError as exc:
            self.stats.failed += 1
            log.warning("upload of %s failed for good: %s", image.name, exc.message)
            error = {"kind": exc.kind, "status": exc.status, "message": exc.message}
            return {"project": self.project, "error": error}
        if answer.duplicate:
            self.stats.duplicates += 1
        else:
            self.stats.uploaded += 1
        return {"id": answer.id, "project": self.project, "duplicate": answer.duplicate}

    async def _attempt(self, image: ImageUpload) -> UploadAnswer:
        if self._stopping.is_set():
            raise _Stopped
        async with self._limiter.slot() as ticket:
            try:
                answer = await self._client.upload(image)
            except RateLimitedError as exc:
                self.stats.rate_limited_429 += 1
                self._limiter.pause(exc.retry_after, started_at=ticket.started_at)
                raise
        self._limiter.record_success()
        return answer

    def _record(self, todo: _Todo, outputs: list[Any]) -> None:
        """Append the item's ok line with its uploads, unless a newer line for the key
        was written meanwhile (the engine made the item again: its new line is queued)."""
        key = todo.line["key"]
        if self._versions.get(key, 0) != todo.version:
            return
        self._writing = True
        try:
            self._writer.append({**todo.line, "outputs": outputs})
        except OSError as exc:
            self.output_error = OutputError(
                f"cannot write in {self._out_dir}: {exc.strerror or exc}; "
                "fix the disk and run the same command again to resume"
            )
            self.stop()
        finally:
            self._writing = False


def _client_class() -> type[UploadTarget]:
    """The Roboflow upload client, imported when a run has an upload block (its module,
    aiohttp's, takes about 100 ms to import: a run calls this in a thread)."""
    from .backends.roboflow_upload import RoboflowUploadClient

    return RoboflowUploadClient


async def open_uploads(
    spec: Spec,
    api_key: str,
    backend: Backend,
    writer: ManifestWriter,
    *,
    day: str | None = None,
) -> Uploads | None:
    """The uploads of `spec`'s ``upload:`` block (None without one), to the embedded
    mock when the backend kind serves uploads and no base_url is set, else to
    ``upload.base_url`` (default Roboflow's API)."""
    settings = spec.upload
    if settings is None:
        return None
    embedded = uploads_to_backend(settings, spec.backend.kind)
    root = getattr(backend, "root", None) if embedded else settings.base_url
    if embedded and not isinstance(root, str):
        raise OutputError("upload: this backend serves no upload endpoint: set upload.base_url")
    rate = settings.rate_limit
    if rate is None and not embedded:
        rate = parse_rate(DEFAULT_UPLOAD_RATE)
    client_class: Any = await asyncio.to_thread(_client_class)
    client = client_class(
        root or "https://api.roboflow.com",
        api_key,
        project=settings.project,
        concurrency=settings.concurrency,
        timeout_s=spec.backend.timeout_s,
        proxies=DIRECT if embedded else read_proxy_settings(),
    )
    run = spec.run
    return Uploads(
        settings,
        job=spec.name,
        out_dir=spec.output_dir,
        client=client,
        writer=writer,
        policy=RetryPolicy(
            max_attempts=settings.max_attempts,
            base_s=run.backoff_base_s,
            cap_s=run.backoff_max_s,
            retry_ambiguous=True,  # a repeated upload is answered duplicate: never paid twice
        ),
        limiter=Limiter(
            rate=rate,
            image_rate=None,
            concurrency=settings.concurrency,
            default_pause_s=run.backoff_base_s,
            max_default_pause_s=run.backoff_max_s,
        ),
        grace_period_s=run.grace_period_s,
        day=day or date.today().isoformat(),
    )


@contextlib.asynccontextmanager
async def alongside(uploads: Uploads | None, engine: Engine) -> AsyncIterator[None]:
    """Run `uploads` while the body (the engine) runs, and finish them after it.

    A stop of the engine for a reason in `_STOPS_UPLOADS` stops the uploads too; a fatal
    upload answer or a write failure stops the engine. If the body is cancelled (a second
    signal), uploads in flight are cancelled at once.
    """
    if uploads is None:
        yield
        return
    try:
        await uploads.begin()
        watch = asyncio.ensure_future(engine.wait_stopping())
        watch.add_done_callback(
            lambda _done: uploads.stop() if engine.stop_reason in _STOPS_UPLOADS else None
        )
        stopper = asyncio.ensure_future(_stop_engine_on_failure(uploads, engine))
        try:
            try:
                yield
            except BaseException:
                await uploads.abort()
                raise
            if engine.stop_reason in _STOPS_UPLOADS:
                uploads.stop()
            await uploads.close()
        finally:
            for task in (watch, stopper):
                task.cancel()
            await asyncio.gather(watch, stopper, return_exceptions=True)
    finally:
        await uploads.aclose()


async def _stop_engine_on_failure(uploads: Uploads, engine: Engine) -> None:
    """A refused key, unknown project or full disk in an upload stops the whole run."""
    await uploads.wait_stopping()
    if uploads.fatal_error is not None and engine.fatal_error is None:
        engine.fatal_error = uploads.fatal_error
        engine.stop("fatal")
    elif uploads.output_error is not None and engine.output_error is None:
        engine.output_error = uploads.output_error
        engine.stop("disk")


def add_upload_summary(summary: dict[str, Any], uploads: Uploads | None) -> None:
    """Put the upload counts in `summary`; a failed upload makes a clean run exit 1."""
    if uploads is None:
        return
    summary["upload"] = {"project": uploads.project, **asdict(uploads.stats)}
    if uploads.stats.failed and summary.get("exit_code") == EXIT_OK:
        summary["exit_code"] = EXIT_SOME_FAILED
