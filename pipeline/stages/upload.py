"""The upload stage: every stored image sent to a Roboflow project, exactly once.

For each output without a recorded upload, the image is read back (only if it is still
what the manifest recorded), sent, and its answer kept on the output as ``upload``
(`UploadRecord`: ``{"id", "project", "duplicate"}``, or ``{"project", "error"}``).

Exactly once: an image is named by its stored file (``<key16>-<i>.<ext>``), so a retry
whose first answer was lost, or the next run after a kill, is answered "duplicate", which
counts as success. A resume sends only outputs without a recorded id. Upload problems
never regenerate an image: a failed upload is recorded on its output (exit 1) and tried
again by the next run; an image whose file is gone or changed is left to the engine,
which makes it again.

Pace and retries are the stage's own: a `Limiter` (``upload.concurrency``,
``upload.rate_limit``, 429 pauses) and the project's `Retrier` (``upload.max_attempts``,
the run's backoff). A refused key or an unknown project stops the whole run (exit 3); so
does ``upload.max_consecutive_failures`` uploads failing in a row. A budget stop, or too
many failed generations, still uploads what was stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from ..backends.retried import RetriedCalls
from ..credentials import DIRECT, read_proxy_settings, uploads_to_backend
from ..errors import BackendError, ErrorKind, FatalError, OutputError, RateLimitedError
from ..jobspec.fields import DEFAULT_BASE_URL, parse_rate
from ..jobspec.model import Spec
from ..jobspec.stage_settings import DEFAULT_UPLOAD_RATE, UploadSettings
from ..limiter import Limiter
from ..records import ErrorInfo, ImageUpload, ItemRecord, OutputFile, UploadAnswer, UploadRecord
from ..retry import RetryPolicy
from ..run.pool import StopReason
from ..run.stages import StageContext
from ..store.layout import stored_image_path

__all__ = ["MAX_TAG_CHARS", "UploadStage", "UploadStats", "open_stage", "provenance_tags"]

log = logging.getLogger(__name__)

MAX_TAG_CHARS = 64
"""Provenance tags are cut to this length (a long variable value would otherwise make a
tag nobody types)."""
_NOT_TAG = re.compile(r"[^A-Za-z0-9._-]+")
# the user's stop or a broken run stops uploads too; a budget stop or too many failed
# generations do not: what was stored is still uploaded
HALTED_BY: frozenset[StopReason] = frozenset({"sigint", "sigterm", "stopped", "fatal", "disk"})


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
    retries: int = 0
    rate_limited_429: int = 0


class _Stopped(Exception):
    """The run is stopping: leave the rest of this item for the next run."""


def provenance_tags(job: str, record: ItemRecord, extra: tuple[str, ...]) -> tuple[str, ...]:
    """The tags an image gets: ``synthaug``, its job, source, each template variable and
    its key (first 16 hex digits, as its file name), then the spec's own `extra` tags.

    Roboflow's tag alphabet is not documented; these keep to letters, digits, ``.``,
    ``_`` and ``-`` (anything else becomes ``-``), at most `MAX_TAG_CHARS` each, so that
    a night's images can be found, and rolled back, by tag.
    """
    raw = [
        "synthaug",
        f"job-{job}",
        f"source-{record.source}",
        *(f"var-{name}-{value}" for name, value in record.vars.items()),
        f"key-{record.key[:16]}",
    ]
    tags: list[str] = []
    for text in [*raw, *extra]:
        tag = _NOT_TAG.sub("-", text).strip("-")[:MAX_TAG_CHARS].rstrip("-")
        if tag and tag not in tags:
            tags.append(tag)
    return tuple(tags)


def read_stored(out_dir: Path, output: OutputFile) -> bytes | None:
    """The bytes of a stored image if they are still what the manifest recorded, else
    None (gone or changed: the engine makes the item again). Only a regular file of
    OUT's image folders is read: a hand-edited path never leaves OUT."""
    path = stored_image_path(out_dir, output.path)
    if path is None:
        return None
    try:
        if path.is_symlink() or not path.is_file():
            return None
        data = path.read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == output.sha256 else None


class UploadStage:
    """Uploads the outputs of the records it is given; see the module docstring."""

    name = "upload"
    halted_by = HALTED_BY

    def __init__(
        self,
        settings: UploadSettings,
        *,
        job: str,
        client: UploadTarget,
        limiter: Limiter,
        policy: RetryPolicy,
        context: StageContext,
        max_consecutive_failures: int,
    ) -> None:
        self._settings = settings
        self._job = job
        self._client = client
        self._context = context
        self._stop = context.stop
        self._batch = settings.batch_name(context.day)
        self._extra_tags = settings.tag_names(context.day)
        # the one retry policy, with 429s pausing every upload as they pause generations
        self._calls = RetriedCalls(
            policy, sleep=self._backoff_sleep, on_retry=self._count_retry, limiter=limiter
        )
        self._max_failures = max_consecutive_failures
        self._failures_in_a_row = 0
        self.concurrency = settings.concurrency
        self.stats = UploadStats()

    @property
    def project(self) -> str:
        """The Roboflow project the images go to."""
        return self._settings.project

    @property
    def failed(self) -> int:
        """Outputs whose upload failed for good this run."""
        return self.stats.failed

    def needs(self, record: ItemRecord) -> bool:
        """Whether some output of the ok `record` is not yet in the project."""
        return record.status == "ok" and any(
            o.upload is None or not o.upload.done_in(self.project) for o in record.outputs
        )

    def summary(self) -> dict[str, Any]:
        """The project and the counters."""
        return {"project": self.project, **asdict(self.stats)}

    async def aclose(self) -> None:
        """Release the client's connections."""
        await self._client.aclose()

    def _halted(self) -> bool:
        return self._stop.reason in self.halted_by

    async def _backoff_sleep(self, seconds: float) -> None:
        await self._stop.sleep(seconds, self._halted)

    def _count_retry(self, exc: BackendError, attempt: int, wait: float) -> None:
        self.stats.retries += 1
        log.info("upload retry %d after %s (%s) in %.1fs", attempt, exc.kind, exc.status, wait)

    async def process(self, record: ItemRecord, halted: Callable[[], bool]) -> ItemRecord | None:
        """Upload each output not yet in the project; the record with what was done
        (also when stopped part way: what was done is kept)."""
        outputs = list(record.outputs)
        changed = False
        try:
            for index, output in enumerate(outputs):
                if output.upload is not None and output.upload.done_in(self.project):
                    continue
                data = await asyncio.to_thread(read_stored, self._context.out_dir, output)
                if data is None:
                    self.stats.skipped += 1
                    log.info("%s: stored image gone or changed; not uploaded", record.key[:16])
                    return None
                upload = await self._upload_output(record, output, data, halted)
                outputs[index] = dataclasses.replace(output, upload=upload)
                changed = True
        except _Stopped:
            pass
        return dataclasses.replace(record, outputs=tuple(outputs)) if changed else None

    async def _upload_output(
        self, record: ItemRecord, output: OutputFile, data: bytes, halted: Callable[[], bool]
    ) -> UploadRecord:
        """Upload one image; its record (id, or error). Raises `_Stopped`."""
        image = ImageUpload(
            name=PurePosixPath(output.path).name,
            data=data,
            split=self._settings.split,
            batch=self._batch,
            tags=provenance_tags(self._job, record, self._extra_tags),
        )
        try:
            answer = await self._calls.call(partial(self._attempt, image, halted))
        except FatalError as exc:
            self._stop.fatal(exc)
            raise _Stopped from None
        except BackendError as exc:
            self._fail(image.name, exc)
            kind: ErrorKind = exc.kind
            return UploadRecord(self.project, error=ErrorInfo(kind, exc.status, exc.message))
        self._failures_in_a_row = 0
        if answer.duplicate:
            self.stats.duplicates += 1
        else:
            self.stats.uploaded += 1
        return UploadRecord(self.project, id=answer.id, duplicate=answer.duplicate)

    def _fail(self, name: str, exc: BackendError) -> None:
        """Count a failed upload; too many in a row stop the run (the API is unwell)."""
        self.stats.failed += 1
        log.warning("upload of %s failed for good: %s", name, exc.message)
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= self._max_failures:
            self._stop.fatal(
                FatalError(
                    f"{self._failures_in_a_row} uploads failed in a row (last: {exc.message}); "
                    "check the project and the API's status, then run the same command "
                    "again to resume",
                    kind=exc.kind,
                    status=exc.status,
                )
            )

    async def _attempt(self, image: ImageUpload, halted: Callable[[], bool]) -> UploadAnswer:
        if halted():
            raise _Stopped
        try:
            return await self._client.upload(image)
        except RateLimitedError:
            self.stats.rate_limited_429 += 1
            raise


def _client_class() -> type[UploadTarget]:
    """The Roboflow upload client (its module, aiohttp's, takes about 100 ms to import)."""
    from ..backends.roboflow_upload import RoboflowUploadClient

    return RoboflowUploadClient


async def open_stage(spec: Spec, api_key: str, context: StageContext) -> UploadStage:
    """The upload stage of `spec`'s ``upload:`` block: to the embedded mock when the
    backend kind serves uploads and no base_url is set, else to ``upload.base_url``
    (default Roboflow's API)."""
    settings = spec.upload
    assert settings is not None
    embedded = uploads_to_backend(settings, spec.backend)
    root = context.backend_root if embedded else settings.base_url
    if embedded and root is None:
        raise OutputError("upload: this backend serves no upload endpoint: set upload.base_url")
    rate = settings.rate_limit
    if rate is None and not embedded:
        rate = parse_rate(DEFAULT_UPLOAD_RATE)
    client_class: Any = await asyncio.to_thread(_client_class)
    client = client_class(
        root or DEFAULT_BASE_URL,  # Roboflow's API, the spec's default
        api_key,
        project=settings.project,
        concurrency=settings.concurrency,
        timeout_s=spec.backend.timeout_s,
        proxies=DIRECT if embedded else read_proxy_settings(),
    )
    run = spec.run
    return UploadStage(
        settings,
        job=spec.name,
        client=client,
        limiter=Limiter(
            rate=rate,
            image_rate=None,
            concurrency=settings.concurrency,
            default_pause_s=run.backoff_base_s,
            max_default_pause_s=run.backoff_max_s,
        ),
        policy=RetryPolicy(
            max_attempts=settings.max_attempts,
            base_s=run.backoff_base_s,
            cap_s=run.backoff_max_s,
            retry_ambiguous=True,  # a repeated upload is answered duplicate: never paid twice
        ),
        context=context,
        max_consecutive_failures=run.max_consecutive_failures,
    )
