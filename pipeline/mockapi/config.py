"""The embedded mock API's settings and counters: what to answer and which faults to
inject (`MockConfig`), and what clients did (`MockStats`, also served at ``GET /_stats``).
"""

from __future__ import annotations

import datetime as dt
import hmac
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from .shapes import DEFAULT_DETECT_CLASSES, MAX_DETECT_CLASSES

__all__ = [
    "DEFAULT_FAULT_WEIGHTS",
    "DEFAULT_PAUSE_GRACE_S",
    "DEFAULT_PROJECT_COUNTS",
    "DEFAULT_SIZE",
    "FATAL_FAULT_KINDS",
    "FAULT_KINDS",
    "MAX_BODY_BYTES",
    "MAX_TOKENS",
    "MODELS_FAULT_KINDS",
    "PHOTO_VARIANTS",
    "MockConfig",
    "MockStats",
    "PhotoFormat",
    "ResponseShape",
    "RetryAfterForm",
    "class_count_problems",
    "parse_project_classes",
]

FAULT_KINDS: tuple[str, ...] = (
    "429",
    "500",
    "502",
    "503",
    "504",
    "drop",
    "malformed",
    "wrong_shape",
    "corrupt_image",
    "truncated_image",
    "slow",
    "image_404_once",
)
FATAL_FAULT_KINDS: tuple[str, ...] = ("insufficient_quota",)
"""Faults no retry survives (the run must abort): never part of a survivable fault mix."""
DEFAULT_FAULT_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {
        "429": 4.0,
        "500": 2.0,
        "502": 1.0,
        "503": 2.0,
        "504": 1.0,
        "drop": 1.0,
        "malformed": 1.0,
        "wrong_shape": 1.0,
        "corrupt_image": 1.0,
        "truncated_image": 1.0,
        "slow": 1.0,
        "image_404_once": 1.0,
    }
)
ResponseShape = Literal["data", "array", "images", "results", "b64_json"]
RetryAfterForm = Literal["seconds", "date", "none"]

MODELS_FAULT_KINDS: tuple[str, ...] = ("500", "502", "503", "504", "drop", "malformed")
"""What `MockConfig.models_fault` may name: how ``GET /v1/models`` fails, every time."""

DEFAULT_PAUSE_GRACE_S = 0.05
"""Requests arriving this soon after a 429 were already in flight: not a pause violation."""
MAX_TOKENS = 50_000
"""Image URLs remembered (least recently used dropped first)."""
MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_SIZE = (1024, 1024)
PHOTO_VARIANTS = 4
"""Photo-like images rendered per size (on first use) and reused for every answer."""
PhotoFormat = Literal["png", "jpeg"]
DEFAULT_PROJECT_COUNTS: tuple[int, ...] = (12, 8, 5, 2, 0)
"""A project's annotated instances of the vocabulary's first classes, by default: a rich
class, a rare one and an empty one, and 27 in all, so that a rehearsal stays quick."""


@dataclass(frozen=True)
class MockConfig:
    """How the mock behaves: latency, injected faults, rate limit, auth and answer shape.

    `error_rate` is the share of requests that get a fault drawn from `faults` (name →
    weight) with `random.Random(seed)`; `rate_limit` (requests/s, token bucket of
    `burst`) is enforced with 429s independently of it, whose Retry-After is the time to
    the next token but at least `min_retry_after_s`, in `retry_after_form`. The server's
    clock (its ``Date`` header and Retry-After dates) runs `clock_offset_s` ahead of the
    host's. The ``insufficient_quota`` fault answers as OpenAI does when the account has
    no credit left. `detect_classes` is the vocabulary the pictures show and the
    detection finds (`pipeline.mockapi.shapes`); `drop_annotation_boxes` makes annotation
    uploads succeed without keeping a box. `project_classes` (class → annotated
    instances) is what ``GET /{workspace}/{project}`` reports of every project; None: the
    first classes of `detect_classes` with `DEFAULT_PROJECT_COUNTS`.
    """

    latency_s: float = 0.0
    error_rate: float = 0.0
    faults: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_FAULT_WEIGHTS))
    retry_after_s: float = 1.0
    retry_after_form: RetryAfterForm = "seconds"
    rate_limit: float | None = None
    burst: int = 2  # a real API's bucket holds more than one request: jitter is no 429
    seed: int | None = 0
    api_key: str | None = None
    projects: frozenset[str] | None = None
    refuse_word: str = "REFUSE"
    response_shape: ResponseShape = "data"
    max_px: int = 256
    photo_format: PhotoFormat | None = None  # photo-like images instead of drawn ones
    send_rate_limit_headers: bool = False
    slow_s: float = 3.0
    pause_grace_s: float = DEFAULT_PAUSE_GRACE_S
    min_retry_after_s: float = 0.0
    clock_offset_s: float = 0.0
    batch_s: float = 3.0  # a batch's whole life, validating to completed (the API: up to 24 h)
    batch_expire_share: float = 0.0  # lines a batch does not reach: it ends expired
    # model -> the date it is shut down (on top of the catalog's dates): /v1/models says
    # so, and the generation endpoints answer 404 model_not_found from that date on
    shutdowns: Mapping[str, dt.date] = field(default_factory=dict)
    today: dt.date | None = None  # the mock's date, which shutdowns are judged on (None: host's)
    models_fault: str | None = None  # every /v1/models request fails so (MODELS_FAULT_KINDS)
    # the classes drawn into the images and found by POST /{project}/{version} (lower case)
    detect_classes: tuple[str, ...] = DEFAULT_DETECT_CLASSES
    detect_models: frozenset[str] | None = None  # "project/version"s served (None: any)
    detect_max_pixels: int | None = None  # larger images answer 413 (None: no limit)
    drop_annotation_boxes: bool = False  # annotations answer success but keep no boxes
    project_classes: Mapping[str, int] | None = None  # class -> instances (None: a default)

    def accepts_key(self, given: str) -> bool:
        """`given` is the key the mock was started with (any key passes without one);
        compared in constant time, as a real API does."""
        expected = self.api_key
        return expected is None or hmac.compare_digest(given.encode(), expected.encode())

    def class_counts(self) -> dict[str, int]:
        """`project_classes`, or the default drawn from the vocabulary (`detect_classes`)."""
        if self.project_classes is not None:
            return dict(self.project_classes)
        return dict(zip(self.detect_classes, DEFAULT_PROJECT_COUNTS, strict=False))

    def __post_init__(self) -> None:
        problems = [
            f"unknown fault {name!r} (known: {', '.join(FAULT_KINDS)})"
            for name in self.faults
            if name not in FAULT_KINDS and name not in FATAL_FAULT_KINDS
        ]
        if any(weight < 0 for weight in self.faults.values()):
            problems.append("fault weights must be >= 0")
        if not 0.0 <= self.error_rate <= 1.0:
            problems.append(f"error_rate must be within 0..1, got {self.error_rate}")
        if self.error_rate > 0 and sum(self.faults.values()) <= 0:
            problems.append("error_rate > 0 needs a fault with a positive weight")
        if self.rate_limit is not None and self.rate_limit <= 0:
            problems.append(f"rate_limit must be > 0, got {self.rate_limit}")
        if self.burst < 1 or self.max_px < 1:
            problems.append("burst and max_px must be >= 1")
        if (
            min(self.latency_s, self.retry_after_s, self.slow_s, self.pause_grace_s) < 0
            or self.min_retry_after_s < 0
        ):
            problems.append("durations (latency_s, retry_after_s, ...) must be >= 0")
        if not (math.isfinite(self.batch_s) and self.batch_s >= 0):
            problems.append(f"batch_s must be a finite number >= 0, got {self.batch_s}")
        if not 0.0 <= self.batch_expire_share <= 1.0:
            problems.append(
                f"batch_expire_share must be within 0..1, got {self.batch_expire_share}"
            )
        if not math.isfinite(self.clock_offset_s):
            problems.append(f"clock_offset_s must be finite, got {self.clock_offset_s}")
        if self.models_fault is not None and self.models_fault not in MODELS_FAULT_KINDS:
            problems.append(
                f"unknown models_fault {self.models_fault!r} "
                f"(known: {', '.join(MODELS_FAULT_KINDS)})"
            )
        if not all(isinstance(day, dt.date) for day in self.shutdowns.values()):
            problems.append("shutdowns must map model names to dates")
        if self.retry_after_form not in ("seconds", "date", "none"):
            problems.append(f"unknown retry_after_form {self.retry_after_form!r}")
        if self.photo_format not in (None, "png", "jpeg"):
            problems.append(f"unknown photo_format {self.photo_format!r} (png or jpeg)")
        problems += _detect_problems(self)
        if self.project_classes is not None:
            problems += class_count_problems(self.project_classes)
        if self.response_shape not in ("data", "array", "images", "results", "b64_json"):
            problems.append(f"unknown response_shape {self.response_shape!r}")
        if problems:
            raise ValueError("invalid mock config: " + "; ".join(problems))


def _detect_problems(config: MockConfig) -> list[str]:
    """What is wrong with the detection settings (the vocabulary and the pixel limit)."""
    classes = config.detect_classes
    problems = []
    if not all(isinstance(name, str) and name and name == name.lower() for name in classes):
        problems.append("detect_classes must be non-empty lower-case names")
    if len(set(classes)) != len(classes) or len(classes) > MAX_DETECT_CLASSES:
        problems.append(f"detect_classes must be distinct, at most {MAX_DETECT_CLASSES}")
    if config.detect_max_pixels is not None and config.detect_max_pixels < 1:
        problems.append(f"detect_max_pixels must be >= 1, got {config.detect_max_pixels}")
    return problems


def class_count_problems(counts: Mapping[str, int]) -> list[str]:
    """What is wrong with a project's class counts: names must be non-empty text, counts
    whole numbers >= 0."""
    problems = []
    if not all(isinstance(name, str) and name.strip() for name in counts):
        problems.append("project_classes' names must be non-empty")
    if not all(
        isinstance(count, int) and not isinstance(count, bool) and count >= 0
        for count in counts.values()
    ):
        problems.append("project_classes' counts must be whole numbers >= 0")
    return problems


def parse_project_classes(text: str) -> dict[str, int]:
    """``NAME=COUNT,NAME=COUNT`` (``synthaug mock-server --project-classes``) as a mapping.

    Raises ValueError naming the part that is not one, or a name given twice.
    """
    counts: dict[str, int] = {}
    for part in text.split(","):
        name, sep, count = (piece.strip() for piece in part.partition("="))
        if not sep or not name or not (count.isascii() and count.isdigit()):
            raise ValueError(f"expected NAME=COUNT (a whole number >= 0), got {part.strip()!r}")
        if name in counts:
            raise ValueError(f"class {name!r} is given twice")
        counts[name] = int(count)
    return counts


@dataclass
class MockStats:
    """What clients did to the mock; also served as JSON at ``GET /_stats``."""

    requests: int = 0
    generations: int = 0
    images: int = 0
    generations_by_body: dict[str, int] = field(default_factory=dict)
    rate_limited: int = 0
    starts_during_pause: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    # per prompt, the fault (None: none) each request that reached the answer step met,
    # in order: lets a test tell which fault an item's last attempt saw
    faults_by_prompt: dict[str, list[str | None]] = field(default_factory=dict)
    unauthorized: int = 0
    unknown_project: int = 0
    refused: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    downloads: int = 0
    batch_files: int = 0  # input files uploaded to /v1/files
    batches: int = 0  # batches created
    batch_polls: int = 0
    batch_downloads: int = 0  # output and error files downloaded
    searches: int = 0  # POST /{workspace}/{project}/search requests
    upload_requests: int = 0  # POST /dataset/{project}/upload requests, any answer
    uploads: int = 0  # images a project did not have, stored
    upload_duplicates: int = 0  # uploads answered "duplicate"
    # per "project/name", the uploads that stored it (more than 1: uploaded twice)
    uploads_by_name: dict[str, int] = field(default_factory=dict)
    model_requests: int = 0  # GET /v1/models and /v1/models/{id}, any answer
    model_not_found: int = 0  # generation requests refused: their model is shut down
    detect_requests: int = 0  # POST /{project}/{version} requests, any answer
    detections: int = 0  # images detected (answered or dropped: each is billed)
    # per sha256 of a detected image's bytes, its detections (more than 1: detected twice)
    detections_by_sha256: dict[str, int] = field(default_factory=dict)
    annotate_requests: int = 0  # POST /dataset/{project}/annotate/{id} requests, any answer
    annotations: int = 0  # annotations stored (overwrites included)
    annotation_conflicts: int = 0  # annotations refused with 409: the image had one
    # per image id, the annotations stored for it (more than 1: annotated twice)
    annotations_by_image: dict[str, int] = field(default_factory=dict)
    image_reads: int = 0  # GET /{workspace}/{project}/images/{id} requests, any answer
    project_requests: int = 0  # GET /{workspace}/{project} requests, any answer

    @property
    def duplicates(self) -> int:
        """Generations beyond the first of an identical request body (paid twice)."""
        return sum(count - 1 for count in self.generations_by_body.values() if count > 1)

    def to_json(self) -> dict[str, Any]:
        """The stats as a JSON-ready dict (without the per-body table's keys)."""
        return {
            "requests": self.requests,
            "generations": self.generations,
            "images": self.images,
            "unique_bodies": len(self.generations_by_body),
            "duplicates": self.duplicates,
            "rate_limited": self.rate_limited,
            "starts_during_pause": self.starts_during_pause,
            "faults": dict(self.faults),
            "unauthorized": self.unauthorized,
            "unknown_project": self.unknown_project,
            "refused": self.refused,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "downloads": self.downloads,
            "batch_files": self.batch_files,
            "batches": self.batches,
            "batch_polls": self.batch_polls,
            "batch_downloads": self.batch_downloads,
            "searches": self.searches,
            "upload_requests": self.upload_requests,
            "uploads": self.uploads,
            "upload_duplicates": self.upload_duplicates,
            "model_requests": self.model_requests,
            "model_not_found": self.model_not_found,
            "detect_requests": self.detect_requests,
            "detections": self.detections,
            "annotate_requests": self.annotate_requests,
            "annotations": self.annotations,
            "annotation_conflicts": self.annotation_conflicts,
            "image_reads": self.image_reads,
            "project_requests": self.project_requests,
        }
