"""The spec's blocks for the stages after storage (``check:``, ``label:``, ``upload:``):
frozen settings with their defaults, declared once (the stages read them from here)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from .fields import (
    DEFAULT_API_KEY_ENV,
    MAX_ATTEMPTS,
    MAX_CONCURRENCY,
    EnvName,
    Name,
    Rate,
    Url,
)
from .yamlfile import show_value

__all__ = [
    "DEFAULT_DETECT_URL",
    "DEFAULT_LABEL_RATE",
    "DEFAULT_UPLOAD_RATE",
    "CheckSettings",
    "LabelSettings",
    "StageModel",
    "UploadSettings",
]

HASH_BITS = 64  # a perceptual hash's bits: distances run from 0 (alike) to 64


class StageModel(BaseModel):
    """Frozen, no unknown keys, no .inf/.nan (as every spec section)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class CheckSettings(StageModel):
    """``check:``: a perceptual hash (pHash) of every stored image and of its input; an
    output too close to its own input is flagged ``unchanged``, one too close to an earlier
    output of this OUT ``duplicate``. Flags never delete anything."""

    unchanged_distance: int = Field(
        default=6, ge=0, le=HASH_BITS, description="at most this far from its input: unchanged"
    )
    duplicate_distance: int = Field(
        default=4,
        ge=0,
        le=HASH_BITS,
        description="at most this far from an earlier output of this OUT: duplicate",
    )


# --- label (issue 19): hosted detection of every stored image ---

DEFAULT_DETECT_URL = "https://serverless.roboflow.com"
"""Roboflow's hosted-inference host (``https://detect.roboflow.com``, the legacy host, and
a self-hosted Inference server take the same path)."""
DEFAULT_LABEL_CONCURRENCY = 4
DEFAULT_LABEL_RATE = "10/s"
"""Detection requests per second against Roboflow when the spec sets no
`label.rate_limit` (none against the embedded mock)."""
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[0-9]+")


def _check_model_id(value: str) -> str:
    if not _MODEL_ID.fullmatch(value):
        raise ValueError(
            f"{show_value(value)} is not a model id: use project/version, like fall-leaves/3"
        )
    return value


ModelId = Annotated[str, AfterValidator(_check_model_id)]


def _check_fraction(value: float) -> float:
    """A threshold between 0 and 1; a percentage (the API's own scale) says how to write it."""
    if 1 < value <= 100:
        raise ValueError(
            f"{show_value(value)} looks like a percentage: write it as a fraction 0-1 "
            f"({value / 100:g}); it is sent as 0-100"
        )
    if not 0 <= value <= 1:
        raise ValueError(f"must be between 0 and 1, got {show_value(value)}")
    return value


Fraction = Annotated[
    float,
    AfterValidator(_check_fraction),
    WithJsonSchema({"type": "number", "minimum": 0, "maximum": 1}),
]


class LabelSettings(StageModel):
    """``label:``: every stored image sent to a hosted object-detection model (Roboflow's
    hosted inference or a self-hosted Inference server); its predictions are kept on the
    output as ``labels``. The key comes from the environment (`api_key_env`); against the
    embedded mock (``backend.kind: mock`` without `api_url`) none is needed."""

    model: ModelId = Field(description="the detection model, project/version (fall-leaves/3)")
    api_url: Url | None = Field(
        default=None,
        description=f"inference host (default {DEFAULT_DETECT_URL}; the embedded mock's for mock)",
    )
    api_key_env: EnvName = Field(
        default=DEFAULT_API_KEY_ENV, description="env var holding the Roboflow API key"
    )
    confidence: Fraction = Field(
        default=0.4, description="keep predictions at least this sure (0-1)"
    )
    overlap: Fraction = Field(default=0.3, description="boxes overlapping more are merged (0-1)")
    classes: tuple[Name, ...] | None = Field(
        default=None, min_length=1, description="keep only predictions of these classes"
    )
    require_detection: bool = Field(
        default=False, description="flag an output with no kept prediction no_detection"
    )
    concurrency: int = Field(
        default=DEFAULT_LABEL_CONCURRENCY,
        ge=1,
        le=MAX_CONCURRENCY,
        description="detection requests in flight",
    )
    rate_limit: Rate = Field(
        default=None,
        description=f"request starts per period (default {DEFAULT_LABEL_RATE}; none for the mock)",
    )
    max_attempts: int = Field(default=6, ge=1, le=MAX_ATTEMPTS)


# --- upload (issue 13): every stored image sent to a Roboflow project, once ---

DEFAULT_UPLOAD_CONCURRENCY = 2
DEFAULT_UPLOAD_RATE = "2/s"
"""Upload starts per second against Roboflow when the spec sets no `upload.rate_limit`
(none against the embedded mock): an upload is cheap, but a burst of them only earns 429s."""
DEFAULT_UPLOAD_ATTEMPTS = 6
MAX_UPLOAD_TEXT = 100  # a batch name or tag longer than this is a typo, not a label
DATE_PLACEHOLDER = "{date}"
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
_TAG = re.compile(r"[A-Za-z0-9._-]+")
_SAMPLE_DAY = "2000-01-01"  # what `{date}` becomes when a value is checked


def _check_upload_text(value: str) -> str:
    """Only the `{date}` placeholder, no control characters, at most MAX_UPLOAD_TEXT."""
    for found in _PLACEHOLDER.findall(value):
        if found != DATE_PLACEHOLDER:
            raise ValueError(f"{show_value(found)} is not a placeholder: only {{date}} is")
    filled = value.replace(DATE_PLACEHOLDER, _SAMPLE_DAY)
    if not filled.strip() or not filled.isprintable():
        raise ValueError(f"{show_value(value)} must be printable text, not empty")
    if len(filled) > MAX_UPLOAD_TEXT:
        raise ValueError(f"longer than {MAX_UPLOAD_TEXT} characters")
    return value


def _check_tag(value: str) -> str:
    _check_upload_text(value)
    if not _TAG.fullmatch(value.replace(DATE_PLACEHOLDER, _SAMPLE_DAY)):
        raise ValueError(
            f"{show_value(value)} is not a tag: use letters, digits, '.', '_', '-' (and {{date}})"
        )
    return value


UploadText = Annotated[str, AfterValidator(_check_upload_text)]
UploadTag = Annotated[str, AfterValidator(_check_tag)]


class UploadSettings(StageModel):
    """Where stored images are uploaded (``upload:``), how they are labelled and paced.

    The key comes from the environment (`api_key_env`); against the embedded mock
    (``backend.kind: mock`` without `base_url`) none is needed.
    """

    project: Name = Field(description="Roboflow project id the images are uploaded to")
    split: Literal["train", "valid", "test"] | None = Field(
        default=None, description="dataset split (default: Roboflow's, train)"
    )
    batch: UploadText | None = Field(
        default=None, description="batch name; {date} becomes the run's date (YYYY-MM-DD)"
    )
    tags: tuple[UploadTag, ...] = Field(
        default=(), description="tags added to every image, besides the provenance tags"
    )
    base_url: Url | None = Field(
        default=None,
        description="API root (default https://api.roboflow.com; the embedded mock's for mock)",
    )
    api_key_env: EnvName = Field(
        default=DEFAULT_API_KEY_ENV, description="env var holding the Roboflow API key"
    )
    concurrency: int = Field(
        default=DEFAULT_UPLOAD_CONCURRENCY,
        ge=1,
        le=MAX_CONCURRENCY,
        description="uploads in flight",
    )
    rate_limit: Rate = Field(
        default=None,
        description=f"upload starts per period (default {DEFAULT_UPLOAD_RATE}; none for the mock)",
    )
    max_attempts: int = Field(default=DEFAULT_UPLOAD_ATTEMPTS, ge=1, le=MAX_ATTEMPTS)
    include_flagged: bool = Field(
        default=False, description="upload flagged outputs too (default: only unflagged ones)"
    )
    as_ground_truth: bool = Field(
        default=False,
        description="annotations go up as ground truth (default: as predictions for review)",
    )
    workspace: Name | None = Field(
        default=None,
        description="the project's workspace: the run reads its first annotated image back",
    )

    def batch_name(self, day: str) -> str | None:
        """The batch with `{date}` filled in (`day` is YYYY-MM-DD)."""
        return None if self.batch is None else self.batch.replace(DATE_PLACEHOLDER, day)

    def tag_names(self, day: str) -> tuple[str, ...]:
        """The spec's tags with `{date}` filled in."""
        return tuple(tag.replace(DATE_PLACEHOLDER, day) for tag in self.tags)
