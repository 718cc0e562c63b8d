"""Frozen records that cross layer boundaries.

Data flows one way (spec → items → engine → backend → outputs → manifest); what moves
between those layers is one of these dataclasses, never a live object. They hold no
secrets: the API key lives only inside the backend that sends it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .errors import ErrorKind

__all__ = [
    "BATCH_LOGGER",
    "ITEM_STATUSES",
    "PLAN_LOGGER",
    "STAGE_FIELDS",
    "BatchRef",
    "ErrorInfo",
    "GeneratedImage",
    "Generation",
    "ImageUpload",
    "InputImage",
    "InputKind",
    "ItemRecord",
    "ItemStatus",
    "LabelRecord",
    "OutputFile",
    "Prediction",
    "RateLimitHint",
    "UploadAnswer",
    "UploadRecord",
    "WorkItem",
    "batch_from_json",
    "record_from_json",
    "request_body",
]

InputKind = Literal["file", "id", "url"]
ItemStatus = Literal["ok", "failed", "generated", "submitted"]
BATCH_LOGGER = "pipeline.batches"
"""The logger of Batch API lifecycle lines (submitted, status changes): the CLI shows it
at INFO by default, since what is in flight is what a nightly log is read for."""
PLAN_LOGGER = "pipeline.plans"
"""The logger of what a run decides to make beyond the spec's own items (a balance
source's counts read, a top-up's additions): shown at INFO by default, like batches."""
ITEM_STATUSES: tuple[ItemStatus, ...] = ("ok", "failed", "generated", "submitted")


@dataclass(frozen=True, slots=True)
class InputImage:
    """The input image of an item.

    `kind` is ``file`` (a local image: `value` is its absolute path, `sha256` the hex
    digest of its bytes), ``id`` (a Roboflow image id) or ``url``. The bytes of a file are
    read only when its request is about to start.
    """

    kind: InputKind
    value: str
    sha256: str | None = None

    def key_value(self) -> str:
        """The value that stands for this input in the item key (machine independent)."""
        if self.kind == "file":
            return f"sha256:{self.sha256}"
        return self.value

    def to_json(self) -> dict[str, Any]:
        """Manifest form of the input."""
        out: dict[str, Any] = {"kind": self.kind, "value": self.value}
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        return out


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One API request to make: the unit of scheduling, checkpointing and resume.

    `params` holds the OpenAI/Roboflow request parameters (model, n, quality, size,
    style, and the optional booleans); `vars` the template values that made `prompt`,
    in template order; `index` the item's position within its source; `mask` the
    source's edit mask (a local PNG, as a ``file`` input), None without one.
    """

    key: str
    source: str
    prompt: str
    project_url: str
    params: Mapping[str, Any]
    vars: Mapping[str, str] = field(default_factory=dict)
    repeat: int = 0
    input: InputImage | None = None
    index: int = 0
    mask: InputImage | None = None

    @property
    def n(self) -> int:
        """Images this request asks for (costs `n` image-rate tokens)."""
        return int(self.params.get("n", 1))


@dataclass(frozen=True, slots=True)
class RateLimitHint:
    """What `x-ratelimit-*` headers said: remaining requests and seconds until reset."""

    remaining: int | None = None
    reset_s: float | None = None


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One image in an API answer: a URL to download, or the bytes already decoded."""

    url: str | None = None
    data: bytes | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Generation:
    """A successful API answer.

    `response` is the JSON answer with image bytes (``b64_json``) elided, kept in the
    manifest because the answer's shape is undocumented (and kept as the API sent it).
    `batch` is the Batch API batch the answer came from (None online); `price_factor`
    what the price its ``usage`` reports is multiplied by (the batch discount).
    """

    images: tuple[GeneratedImage, ...]
    response: Any
    status: int = 200
    rate_limit: RateLimitHint | None = None
    batch: BatchRef | None = None
    price_factor: float = 1.0


STAGE_FIELDS = frozenset({"phash", "flags", "labels", "upload"})
"""The fields of an output record that stages after storage add (`OutputFile`): a line
holding none of them carries nothing a stage found."""


@dataclass(frozen=True, slots=True)
class OutputFile:
    """An image stored under OUT, checked whole first (`pipeline.store.image_check`: the
    cheapest sound check per format), with what the stages after storage found."""

    path: str  # relative to OUT, with forward slashes
    sha256: str
    width: int
    height: int
    url: str | None = None
    id: str | None = None
    bytes: int | None = None  # file size: lets resume check a file without reading it
    mtime_ns: int | None = None  # the stored file's mtime: with `bytes`, its stat on resume
    # --- what the stages after storage found (pipeline.run.stages): None until they ran
    phash: str | None = None  # check: 64-bit perceptual hash, 16 hex digits
    flags: tuple[str, ...] = ()  # check (and label): unchanged, duplicate, no_detection
    labels: LabelRecord | None = None
    upload: UploadRecord | None = None

    def flagged_with(self, *flags: str) -> OutputFile:
        """The output with `flags` added (each once, in the order found)."""
        merged = self.flags + tuple(f for f in flags if f not in self.flags)
        return self if merged == self.flags else replace(self, flags=merged)

    def to_json(self) -> dict[str, Any]:
        """Manifest form of the output: the stored file's fields, then the stages' (only
        those that ran, so a line without stages is what it always was)."""
        out: dict[str, Any] = {
            "path": self.path,
            "sha256": self.sha256,
            "width": self.width,
            "height": self.height,
            "url": self.url,
            "id": self.id,
            "bytes": self.bytes,
            "mtime_ns": self.mtime_ns,
        }
        if self.phash is not None:
            out["phash"] = self.phash
        if self.phash is not None or self.flags or self.labels is not None:
            out["flags"] = list(self.flags)  # once a stage that flags has seen it
        if self.labels is not None:
            out["labels"] = self.labels.to_json()
        if self.upload is not None:
            out["upload"] = self.upload.to_json()
        return out


@dataclass(frozen=True, slots=True)
class UploadRecord:
    """Where the upload stage put an output: its Roboflow image id, or why it failed
    (a failed upload is tried again by the next run)."""

    project: str
    id: str | None = None
    duplicate: bool = False  # the project already held it: an earlier answer was lost
    error: ErrorInfo | None = None
    annotated: bool | None = None  # its labels are in the project (None: none were sent)
    annotation_error: ErrorInfo | None = None  # why they are not (the next run tries again)

    def done_in(self, project: str) -> bool:
        """Whether the image is recorded as in `project` (an error does not count)."""
        return self.error is None and self.project == project

    def to_json(self) -> dict[str, Any]:
        """Manifest form: ``{"id", "project", "duplicate"}`` (with ``annotated`` once
        labels were sent, ``annotation_error`` while they failed) or ``{"project",
        "error"}``."""
        if self.error is not None:
            return {"project": self.project, "error": self.error.to_json()}
        out: dict[str, Any] = {"id": self.id, "project": self.project, "duplicate": self.duplicate}
        if self.annotated is not None:
            out["annotated"] = self.annotated
        if self.annotation_error is not None:
            out["annotation_error"] = self.annotation_error.to_json()
        return out


@dataclass(frozen=True, slots=True)
class Prediction:
    """One detected object as the detection API answers it: the box's centre (`x`, `y`)
    and size in pixels of the stored image, its class and confidence (0-1)."""

    x: float
    y: float
    width: float
    height: float
    class_name: str
    confidence: float

    def corners(self) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` in pixels: the form VOC, COCO and drawing use."""
        half_w, half_h = self.width / 2, self.height / 2
        return self.x - half_w, self.y - half_h, self.x + half_w, self.y + half_h

    def to_json(self) -> dict[str, Any]:
        """Manifest form: the API's own field names."""
        return {
            "x": self.x,
            "y": self.y,
            "width": self.width,
            "height": self.height,
            "class": self.class_name,
            "confidence": self.confidence,
        }


@dataclass(frozen=True, slots=True)
class LabelRecord:
    """What the label stage found in an output: the model asked and the predictions it
    kept, or why detection failed (the next run tries again)."""

    model: str
    predictions: tuple[Prediction, ...] = ()
    error: ErrorInfo | None = None

    @property
    def done(self) -> bool:
        """Whether the output is labelled (an error does not count)."""
        return self.error is None

    def class_names(self) -> list[str]:
        """The classes of the kept predictions, each once, in order of first appearance."""
        return list(dict.fromkeys(p.class_name for p in self.predictions))

    def to_json(self) -> dict[str, Any]:
        """Manifest form: ``{"model", "predictions"}`` or ``{"model", "error"}``."""
        if self.error is not None:
            return {"model": self.model, "error": self.error.to_json()}
        return {"model": self.model, "predictions": [p.to_json() for p in self.predictions]}


@dataclass(frozen=True, slots=True)
class BatchRef:
    """Where a submitted item waits in OpenAI's Batch API: its request's input file, and
    its batch once created (None in the moment between the two: a resume then looks the
    batch up by its input file instead of submitting again). The item's ``custom_id``
    is its key."""

    input_file_id: str
    batch_id: str | None = None

    def to_json(self, key: str) -> dict[str, Any]:
        """Manifest form of the reference."""
        return {"id": self.batch_id, "input_file_id": self.input_file_id, "custom_id": key}


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why an item failed, as the manifest records it."""

    kind: ErrorKind
    status: int | None
    message: str

    def to_json(self) -> dict[str, Any]:
        """Manifest form of the error."""
        return {"kind": self.kind, "status": self.status, "message": self.message}


@dataclass(frozen=True, slots=True)
class ItemRecord:
    """One manifest line: the state of one item after an attempt at it."""

    key: str
    status: ItemStatus
    source: str
    vars: Mapping[str, str]
    repeat: int
    input: InputImage | None
    prompt: str
    params: Mapping[str, Any]
    outputs: tuple[OutputFile, ...] = ()
    attempts: int = 0
    error: ErrorInfo | None = None
    started_at: str | None = None
    finished_at: str | None = None
    elapsed_s: float | None = None
    response: Any = None
    pending: tuple[GeneratedImage, ...] = ()  # a `generated` line: the images to download
    batch: BatchRef | None = None  # a `submitted` line: the batch the request waits in

    @classmethod
    def of(cls, item: WorkItem, status: ItemStatus, **fields: Any) -> ItemRecord:
        """The record of `item` with `status`: what the item is, plus `fields`."""
        return cls(
            key=item.key,
            status=status,
            source=item.source,
            vars=item.vars,
            repeat=item.repeat,
            input=item.input,
            prompt=item.prompt,
            params=item.params,
            **fields,
        )

    @classmethod
    def from_json(cls, line: Mapping[str, Any]) -> ItemRecord | None:
        """A parsed manifest line as the record `to_json` made it; None if it is not one."""
        return record_from_json(line)

    def to_json(self) -> dict[str, Any]:
        """The manifest line as a JSON-ready dict, in the contract's field order."""
        out: dict[str, Any] = {
            "key": self.key,
            "status": self.status,
            "source": self.source,
            "vars": dict(self.vars),
            "repeat": self.repeat,
            "input": self.input.to_json() if self.input else None,
            "prompt": self.prompt,
            "params": dict(self.params),
            "outputs": [o.to_json() for o in self.outputs],
            "attempts": self.attempts,
            "error": self.error.to_json() if self.error else None,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "elapsed_s": self.elapsed_s,
        }
        if self.response is not None:
            out["response"] = self.response
        if self.pending:
            out["pending"] = [{"url": image.url, "id": image.id} for image in self.pending]
        if self.batch is not None:
            out["batch"] = self.batch.to_json(self.key)
        return out


def request_body(item: WorkItem, image: str | None, *, project: bool = True) -> dict[str, Any]:
    """The JSON body of `POST /synthetic-image` for `item`.

    `image` is what goes in the ``image`` field: the base64 of a local file when sending,
    ``sha256:<hex>`` when computing the key, the id or URL otherwise. One function for both
    uses, so the key always describes exactly what is sent. Without `project` (a kind
    that has none: OpenAI's images API) the body has no ``project_url``. An item with
    a `mask` has ``mask: sha256:<hex>`` (only then: every key without one is unchanged);
    the clients that send a mask send its bytes in their own form.
    """
    body: dict[str, Any] = {"project_url": item.project_url} if project else {}
    body["prompt"] = item.prompt
    body.update(item.params)
    if item.input is not None:
        body["image"] = image
        body["image_type"] = {"file": "base64", "id": "id", "url": "url"}[item.input.kind]
    if item.mask is not None:
        body["mask"] = item.mask.key_value()
    return body


def record_from_json(line: Mapping[str, Any]) -> ItemRecord | None:
    """A manifest line as the `ItemRecord` the writer made of it; None when it is not one.

    Lines may be edited by hand: a field of the wrong type reads as absent, so a view
    shows what is left rather than failing on one line.
    """
    key, status = line.get("key"), line.get("status")
    if not isinstance(key, str) or status not in ITEM_STATUSES:
        return None
    return ItemRecord(
        key=key,
        status=status,
        source=str(line.get("source") or ""),
        vars=_str_map(line.get("vars")),
        repeat=_int(line.get("repeat")),
        input=_input(line.get("input")),
        prompt=str(line.get("prompt") or ""),
        params=dict(line["params"]) if isinstance(line.get("params"), Mapping) else {},
        outputs=tuple(_output(o) for o in _dicts(line.get("outputs"))),
        attempts=_int(line.get("attempts")),
        error=_error(line.get("error")),
        started_at=_str_or_none(line.get("started_at")),
        finished_at=_str_or_none(line.get("finished_at")),
        elapsed_s=line.get("elapsed_s")
        if isinstance(line.get("elapsed_s"), (int, float))
        else None,
        response=line.get("response"),
        pending=tuple(
            GeneratedImage(url=_str_or_none(p.get("url")), id=_str_or_none(p.get("id")))
            for p in _dicts(line.get("pending"))
        ),
        batch=batch_from_json(line.get("batch")),
    )


def batch_from_json(value: object) -> BatchRef | None:
    """The `BatchRef` of a line's ``batch`` field; None when it has none (or a bad one)."""
    if not isinstance(value, Mapping) or not isinstance(value.get("input_file_id"), str):
        return None
    batch_id = value.get("id")
    return BatchRef(value["input_file_id"], batch_id if isinstance(batch_id, str) else None)


def _dicts(value: object) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _str_map(value: object) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


def _input(value: object) -> InputImage | None:
    if not isinstance(value, Mapping) or value.get("kind") not in ("file", "id", "url"):
        return None
    return InputImage(
        value["kind"], str(value.get("value") or ""), _str_or_none(value.get("sha256"))
    )


def _output(value: Mapping[str, Any]) -> OutputFile:
    return OutputFile(
        path=str(value.get("path") or ""),
        sha256=str(value.get("sha256") or ""),
        width=_int(value.get("width")),
        height=_int(value.get("height")),
        url=_str_or_none(value.get("url")),
        id=_str_or_none(value.get("id")),
        bytes=value.get("bytes") if isinstance(value.get("bytes"), int) else None,
        mtime_ns=value.get("mtime_ns") if isinstance(value.get("mtime_ns"), int) else None,
        phash=value["phash"] if isinstance(value.get("phash"), str) else None,
        flags=tuple(str(f) for f in value.get("flags") or () if isinstance(f, str))
        if isinstance(value.get("flags"), list)
        else (),
        labels=_labels(value.get("labels")),
        upload=_upload(value.get("upload")),
    )


def _labels(value: object) -> LabelRecord | None:
    if not isinstance(value, Mapping) or not isinstance(value.get("model"), str):
        return None
    return LabelRecord(
        model=value["model"],
        predictions=tuple(
            p for p in (_prediction(v) for v in _dicts(value.get("predictions"))) if p
        ),
        error=_error(value.get("error")),
    )


def _prediction(value: Mapping[str, Any]) -> Prediction | None:
    numbers = [value.get(name) for name in ("x", "y", "width", "height", "confidence")]
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
        return None
    x, y, width, height, confidence = (float(n) for n in numbers)  # type: ignore[arg-type]
    return Prediction(x, y, width, height, str(value.get("class", "")), confidence)


def _upload(value: object) -> UploadRecord | None:
    if not isinstance(value, Mapping) or not isinstance(value.get("project"), str):
        return None
    error = _error(value.get("error"))
    return UploadRecord(
        project=value["project"],
        id=_str_or_none(value.get("id")),
        duplicate=value.get("duplicate") is True,
        error=error,
        annotated=value["annotated"] if isinstance(value.get("annotated"), bool) else None,
        annotation_error=_error(value.get("annotation_error")),
    )


def _error(value: object) -> ErrorInfo | None:
    if not isinstance(value, Mapping):
        return None
    kind = value.get("kind")
    status = value.get("status")
    return ErrorInfo(
        kind=kind if isinstance(kind, str) else "unknown",  # type: ignore[arg-type]
        status=status if isinstance(status, int) else None,
        message=str(value.get("message") or ""),
    )


# --- upload (issue 13): what the `upload:` block hands its client, and what it gets back ---


@dataclass(frozen=True, slots=True)
class ImageUpload:
    """One stored image to add to a Roboflow project, with the labels it gets there."""

    name: str
    data: bytes = field(repr=False)
    split: str | None = None
    batch: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UploadAnswer:
    """What Roboflow said of an upload: the image's id, and whether it already had it."""

    id: str | None
    duplicate: bool
