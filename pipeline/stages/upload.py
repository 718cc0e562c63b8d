"""The upload stage: every stored image sent to a Roboflow project, exactly once, with
its labels.

For each output without a recorded upload, the image is read back (only if it is still
what the manifest recorded), sent, and its answer kept on the output as ``upload``
(`UploadRecord`: ``{"id", "project", "duplicate"}``, or ``{"project", "error"}``). With
a ``label:`` block, an output is uploaded once it is labelled, and its predictions follow
it as a Pascal VOC annotation (`pipeline.voc`), for review unless
``upload.as_ground_truth``; ``annotated: true`` records it, and Roboflow's "already
annotated" (a lost answer, a rerun) counts as success. Flagged outputs stay out unless
``upload.include_flagged``. With ``upload.workspace`` the first image annotated in a run is
read back: if Roboflow kept fewer boxes than were sent, the log and the summary say so
loudly and the run exits 1.

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
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any, Protocol

from ..credentials import uploads_to_backend
from ..errors import BackendError
from ..jobspec.fields import DEFAULT_BASE_URL
from ..jobspec.model import Spec
from ..jobspec.stage_settings import DEFAULT_UPLOAD_RATE, UploadSettings
from ..records import ErrorInfo, ImageUpload, ItemRecord, OutputFile, UploadAnswer, UploadRecord
from ..run.stages import StageContext
from ..voc import voc_xml
from .remote import HALTED_BY, RemoteCalls, StageEndpoint, Stopped, read_stored

__all__ = ["MAX_TAG_CHARS", "UploadStage", "UploadStats", "open_stage", "provenance_tags"]

log = logging.getLogger(__name__)

MAX_TAG_CHARS = 64
"""Provenance tags are cut to this length (a long variable value would otherwise make a
tag nobody types)."""
_NOT_TAG = re.compile(r"[^A-Za-z0-9._-]+")


class UploadTarget(Protocol):
    """What uploading needs from a client (`RoboflowUploadClient`, or a test's fake)."""

    async def upload(self, image: ImageUpload) -> UploadAnswer:
        """Add `image` to the project; raises a `BackendError` subclass on failure."""
        ...

    async def annotate(
        self, image_id: str, name: str, annotation: str, *, prediction: bool
    ) -> bool:
        """Attach the annotation file `name` to the uploaded image; True when the image
        already had one. Raises a `BackendError` subclass on failure."""
        ...

    async def boxes_kept(self, workspace: str, image_id: str) -> int | None:
        """How many boxes the project holds on the image (None: the answer does not say)."""
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
    annotated: int = 0  # annotations attached this run
    annotations_failed: int = 0  # annotations that failed for good (recorded; tried again)


@dataclass(frozen=True, slots=True)
class ReadBack:
    """What Roboflow kept of the first annotation of a run: boxes sent and kept."""

    image_id: str
    sent: int
    kept: int | None = None  # None: the read-back failed or did not say
    error: str | None = None

    @property
    def dropped(self) -> bool:
        """Whether Roboflow kept fewer boxes than were sent."""
        return self.kept is not None and self.kept < self.sent

    def to_json(self) -> dict[str, Any]:
        """Summary form."""
        return {
            "image_id": self.image_id,
            "sent": self.sent,
            "kept": self.kept,
            "ok": None if self.kept is None else not self.dropped,
            "error": self.error,
        }


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
        calls: RemoteCalls,
        context: StageContext,
        annotate: bool,
    ) -> None:
        self._settings = settings
        self._job = job
        self._client = client
        self._calls = calls
        self._context = context
        self._annotate = annotate  # the job labels its outputs: their labels go up too
        self._batch = settings.batch_name(context.day)
        self._extra_tags = settings.tag_names(context.day)
        self._read_back: ReadBack | None = None
        self._reading_back = settings.workspace is not None
        self.concurrency = settings.concurrency
        self.stats = UploadStats()

    @property
    def project(self) -> str:
        """The Roboflow project the images go to."""
        return self._settings.project

    @property
    def failed(self) -> int:
        """Outputs whose upload or annotation failed for good this run, and a read-back
        that found the annotation's boxes dropped."""
        dropped = self._read_back is not None and self._read_back.dropped
        return self.stats.failed + self.stats.annotations_failed + int(dropped)

    def needs(self, record: ItemRecord) -> bool:
        """Whether some output of the ok `record` is due and not yet in the project
        (with its annotation, when the job labels)."""
        return record.status == "ok" and any(self._wants(o) for o in record.outputs)

    def _due(self, output: OutputFile) -> bool:
        """Whether `output` may go up: unflagged (or flagged ones wanted), and labelled
        when the job labels (an output whose detection failed waits for the next run)."""
        if output.flags and not self._settings.include_flagged:
            return False
        return not self._annotate or (output.labels is not None and output.labels.done)

    def _wants(self, output: OutputFile) -> bool:
        if not self._due(output):
            return False
        upload = output.upload
        if upload is None or not upload.done_in(self.project):
            return True
        return self._annotate and upload.annotated is not True

    def summary(self) -> dict[str, Any]:
        """The project, the counters and the read-back."""
        out = {"project": self.project, **asdict(self.stats), **asdict(self._calls.counts)}
        if self._read_back is not None:
            out["annotation_check"] = self._read_back.to_json()
        return out

    async def aclose(self) -> None:
        """Release the client's connections."""
        await self._client.aclose()

    async def process(self, record: ItemRecord, halted: Callable[[], bool]) -> ItemRecord | None:
        """Upload (and annotate) each due output not yet in the project; the record with
        what was done (also when stopped part way: what was done is kept)."""
        outputs = list(record.outputs)
        changed = False
        try:
            for index, output in enumerate(outputs):
                if not self._wants(output):
                    continue
                upload = output.upload
                if upload is None or not upload.done_in(self.project):
                    data = await asyncio.to_thread(read_stored, self._context.out_dir, output)
                    if data is None:
                        self.stats.skipped += 1
                        log.info("%s: stored image gone or changed; not uploaded", record.key[:16])
                        return None
                    upload = await self._upload_output(record, output, data, halted)
                    outputs[index] = dataclasses.replace(output, upload=upload)
                    changed = True
                if self._annotate and upload.done_in(self.project) and upload.id is not None:
                    upload = await self._annotate_output(output, upload, halted)
                    outputs[index] = dataclasses.replace(output, upload=upload)
                    changed = True
        except Stopped:
            pass
        return dataclasses.replace(record, outputs=tuple(outputs)) if changed else None

    async def _upload_output(
        self, record: ItemRecord, output: OutputFile, data: bytes, halted: Callable[[], bool]
    ) -> UploadRecord:
        """Upload one image; its record (id, or error). Raises `Stopped`."""
        image = ImageUpload(
            name=PurePosixPath(output.path).name,
            data=data,
            split=self._settings.split,
            batch=self._batch,
            tags=provenance_tags(self._job, record, self._extra_tags),
        )
        try:
            answer = await self._calls.call(lambda: self._client.upload(image), halted)
        except BackendError as exc:
            self.stats.failed += 1
            return UploadRecord(self.project, error=ErrorInfo(exc.kind, exc.status, exc.message))
        if answer.duplicate:
            self.stats.duplicates += 1
        else:
            self.stats.uploaded += 1
        return UploadRecord(self.project, id=answer.id, duplicate=answer.duplicate)

    async def _annotate_output(
        self, output: OutputFile, upload: UploadRecord, halted: Callable[[], bool]
    ) -> UploadRecord:
        """Attach the output's labels to its uploaded image; the upload record with
        ``annotated`` (or the annotation's error). Raises `Stopped`."""
        assert output.labels is not None
        assert upload.id is not None
        image_id = upload.id
        name = PurePosixPath(output.path)
        predictions = output.labels.predictions
        text = voc_xml(name.name, output.width, output.height, predictions)
        try:
            await self._calls.call(
                lambda: self._client.annotate(
                    image_id,
                    f"{name.stem}.xml",
                    text,
                    prediction=not self._settings.as_ground_truth,
                ),
                halted,
            )
        except BackendError as exc:
            self.stats.annotations_failed += 1
            error = ErrorInfo(exc.kind, exc.status, exc.message)
            return dataclasses.replace(upload, annotated=False, annotation_error=error)
        self.stats.annotated += 1
        if self._reading_back and predictions:
            self._reading_back = False  # the first annotated image with boxes, once a run
            await self._check_read_back(image_id, len(predictions))
        return dataclasses.replace(upload, annotated=True, annotation_error=None)

    async def _check_read_back(self, image_id: str, sent: int) -> None:
        """Read the image back; say loudly when Roboflow kept fewer boxes than sent."""
        workspace = self._settings.workspace
        assert workspace is not None
        try:
            kept = await self._client.boxes_kept(workspace, image_id)
        except BackendError as exc:
            self._read_back = ReadBack(image_id, sent, error=exc.message)
            log.warning("upload: could not read image %s back: %s", image_id, exc.message)
            return
        self._read_back = ReadBack(image_id, sent, kept)
        if self._read_back.dropped:
            log.error(
                "upload: Roboflow kept %s of the %d boxes sent with image %s in project %r: "
                "annotations are being dropped; check the project's classes and annotation "
                "settings before trusting this run's labels there",
                kept,
                sent,
                image_id,
                self.project,
            )
        elif kept is None:
            log.warning("upload: the read-back of image %s did not say its boxes", image_id)
        else:
            log.info("upload: Roboflow kept all %d boxes of image %s", kept, image_id)


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
    endpoint = StageEndpoint.of(
        "upload",
        url=settings.base_url,
        embedded=uploads_to_backend(settings, spec.backend),
        context=context,
        default_url=DEFAULT_BASE_URL,  # Roboflow's API, the spec's default
        rate=settings.rate_limit,
        default_rate=DEFAULT_UPLOAD_RATE,
    )
    client_class: Any = await asyncio.to_thread(_client_class)
    client = client_class(
        endpoint.root,
        api_key,
        project=settings.project,
        concurrency=settings.concurrency,
        timeout_s=spec.backend.timeout_s,
        proxies=endpoint.proxies,
    )
    calls = RemoteCalls.for_stage(
        "upload",
        spec.run,
        max_attempts=settings.max_attempts,
        rate=endpoint.rate,
        concurrency=settings.concurrency,
        stop=context.stop,
    )
    return UploadStage(
        settings,
        job=spec.name,
        client=client,
        calls=calls,
        context=context,
        annotate=spec.label is not None,
    )
