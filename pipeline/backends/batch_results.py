"""What OpenAI's Batch API says back: a batch's status and counts, its result lines, and
the error of an item it has no result for.

A result line is ``{"custom_id", "response": {"status_code", "body"}, "error"}``; its
body is what the Images API would have answered online, so it is parsed and kept the
same way, and the `Generation` names the batch it came from and carries the batch
discount (`pipeline.pricing.BATCH_PRICE_FACTOR`) for what its ``usage`` says it cost.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BackendError, FatalError, TransientError
from ..pricing import BATCH_PRICE_FACTOR
from ..records import BatchRef, Generation
from .base import elide_images, excerpt, parse_images, scrub_strings
from .http import ApiClient
from .inline import load_answer

__all__ = [
    "CUSTOM_ID",
    "TERMINAL",
    "BatchProgress",
    "failed_batch",
    "missing_result",
    "parse_result",
    "progress_of",
]

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
"""The statuses after which a batch changes no more."""
CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*"([0-9a-f]{64})"')
"""A result line's item key, found without decoding the line (its images)."""


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """What one poll of a batch said: for progress lines and the summary."""

    batch_id: str
    status: str
    total: int
    completed: int
    failed: int


def progress_of(batch_id: str, status: str, batch: Mapping[str, Any]) -> BatchProgress:
    """The counts of a polled batch (0 for what it does not say)."""
    counts = batch.get("request_counts")
    counts = counts if isinstance(counts, dict) else {}

    def count(name: str) -> int:
        value = counts.get(name)
        return value if isinstance(value, int) else 0

    return BatchProgress(batch_id, status, count("total"), count("completed"), count("failed"))


def parse_result(
    raw: bytes, ref: BatchRef, http: ApiClient
) -> tuple[str, Generation | BackendError]:
    """One result line as the item's `Generation` or its error (in the parsing thread);
    `http` scrubs the key from what is kept and maps an error status as online."""
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
        return key, http.http_error(status, json.dumps(elide_images(body)), {})
    try:
        images = parse_images(body)
    except BackendError as failure:
        failure.status = status
        return key, failure
    return key, Generation(
        images=images,
        response=scrub_strings(elide_images(body), http.scrub),
        status=status,
        batch=ref,
        price_factor=BATCH_PRICE_FACTOR,
    )


def _line_error(error: object) -> BackendError:
    """The error of a result line without a response: an expired request, usually."""
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    text = f"{code}: {message}" if code else str(message or "no response in the batch result")
    if code == "batch_expired":
        return TransientError(f"{text} (it runs again in a new batch)", kind="timeout")
    return TransientError(excerpt(text), kind="bad_response")


def missing_result(status: str, batch_id: str) -> BackendError:
    """The error of an item its batch has no result line for."""
    if status in ("expired", "cancelled"):
        return TransientError(
            f"batch {batch_id} was {status} before this request ran (it runs again in a new batch)",
            kind="timeout",
        )
    return TransientError(
        f"batch {batch_id} ({status}) has no result for this request", kind="bad_response"
    )


def failed_batch(batch: Mapping[str, Any]) -> FatalError:
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
