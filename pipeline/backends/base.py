"""The backend interfaces and the answer/error parsing every HTTP client shares.

A backend (`Backend`) turns one `WorkItem` into one `Generation` and downloads its
images; it never touches files. A Batch API backend is also a `BatchControl`. The
helpers here are pure functions so that the undocumented answer shapes, the HTTP status
mapping and the rate-limit headers can be tested without a network, and so that every
client classifies failures the same way (`pipeline.backends.http.ApiClient` applies
them). Inline base64 images are decoded as the answer is loaded: `pipeline.backends.inline`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

from ..errors import (
    BackendError,
    FatalError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from ..records import BatchRef, GeneratedImage, Generation, RateLimitHint, WorkItem
from .inline import InlineImage

__all__ = [
    "EXCERPT_CHARS",
    "QUOTA_ADVICE",
    "Backend",
    "BatchControl",
    "Recorder",
    "batch_control",
    "classify_http",
    "elide_images",
    "encode_image",
    "excerpt",
    "model_advice",
    "parse_duration",
    "parse_images",
    "parse_rate_limit",
    "parse_retry_after",
    "redact",
    "scrub_strings",
]

EXCERPT_CHARS = 200
"""At most this much of an answer's body goes into an error message."""

_LIST_KEYS = ("images", "data", "results")
_URL_KEYS = ("url", "image_url")
_ID_KEYS = ("id", "image_id")
_REFUSAL = re.compile(
    r"content_policy_violation|moderation_blocked|safety system|content policy", re.IGNORECASE
)
# The account cannot pay: OpenAI's codes and wording, and the like. Deliberately narrow:
# a per-minute "quota exceeded" (Google's wording for a rate limit) must stay a 429.
_QUOTA_EXHAUSTED = re.compile(
    r"insufficient_quota|billing_hard_limit_reached|billing_not_active"
    r"|exceeded your current quota|insufficient (?:credits?|balance|funds)"
    r"|out of credits?|credit balance is too low|billing (?:hard )?limit (?:has been )?reached",
    re.IGNORECASE,
)
# OpenAI's code for a model that is shut down, or that the key's organization or project
# may not use (its answer is a 404 that says nothing about which of the two)
_MODEL_NOT_FOUND = re.compile(r"\bmodel_not_found\b")
QUOTA_ADVICE = (
    "the account's quota or billing limit is exhausted: add credit or raise the billing "
    "limit, then run the same command again to resume"
)
# A Date header has whole seconds and arrives after some latency: within this window of
# the local clock, the clocks agree and the finer local one measures a Retry-After date.
_CLOCKS_AGREE_S = (-1.25, 0.25)
_QUERY_KEY = re.compile(r"(api_key=)[^&\s#'\"<>]+", re.IGNORECASE)
_JSON_KEY = re.compile(r"(['\"]api_key['\"]\s*:\s*['\"])[^'\"]*", re.IGNORECASE)
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")


class Backend(Protocol):
    """What the engine needs from an image API: generate, download, close."""

    async def generate(self, item: WorkItem, image: str | None) -> Generation:
        """Send the request for `item`; `image` is the body's ``image`` field value."""
        ...

    async def download(self, image: GeneratedImage) -> bytes:
        """The bytes of one generated image (fetched, or decoded from the answer)."""
        ...

    async def aclose(self) -> None:
        """Release connections; the backend is unusable afterwards."""
        ...

    @property
    def api_root(self) -> str | None:
        """The API root this backend sends to, where a run's other Roboflow calls (search,
        upload) go for a kind that serves them itself (the embedded mock's URL); None when
        the backend has no root of its own to offer."""
        ...


Recorder = Callable[[Sequence[WorkItem], BatchRef], None]
"""Appends and fsyncs a ``submitted`` line for each item waiting in the batch `BatchRef`."""


@runtime_checkable
class BatchControl(Protocol):
    """What a Batch API backend offers a run besides `Backend`: the manifest's word on
    where items wait, and a way to stop submitting and polling. Which backends provide
    it is the registry's to say (`BackendKind.provides_batch_control`)."""

    def bind_manifest(self, attached: Mapping[str, BatchRef], record: Recorder) -> None:
        """Where the manifest says items already wait, and how to record new ones."""
        ...

    async def detach(self) -> None:
        """Stop gathering, submitting and polling: the run's manifest is about to close."""
        ...

    async def submit(self, item: WorkItem, image: str | None) -> asyncio.Future[Generation]:
        """Queue `item`'s request into a batch; the future holds its `Generation` or its
        error. The engine parks the item on it: nothing waits per item meanwhile."""
        ...


def batch_control(backend: Backend, *, provided: bool) -> BatchControl | None:
    """`backend` as the `BatchControl` the registry says it is (`provided`), else None.

    A backend the registry promised that is not one is a bug in the registry: it fails
    here, loudly, rather than leaving batches unrecorded.
    """
    if not provided:
        return None
    if not isinstance(backend, BatchControl):
        raise TypeError(f"{backend!r} was registered as a Batch API client but is not one")
    return backend


def encode_image(data: bytes) -> str:
    """Base64 of a local file's bytes, as the ``image`` field of a ``base64`` request."""
    return base64.b64encode(data).decode("ascii")


def redact(text: str) -> str:
    """`text` with the value of every ``api_key=`` parameter (or JSON field) replaced by ***."""
    return _JSON_KEY.sub(r"\1***", _QUERY_KEY.sub(r"\1***", text))


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """A short, single-line, redacted piece of an answer body for an error message."""
    flat = " ".join(redact(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def parse_images(payload: Any) -> tuple[GeneratedImage, ...]:
    """The generated images in an API answer, whatever documented-compatible shape it has.

    Raises `TransientError` (``bad_response``) for any other shape, since a garbled answer
    is usually transient, and ``bad_image`` for base64 that does not decode.
    """
    elements = _image_list(payload)
    if not elements:
        raise TransientError(
            f"the API answered without images: {excerpt(repr(payload))}", kind="bad_response"
        )
    return tuple(_parse_element(element) for element in elements)


def _image_list(payload: Any) -> list[Any] | None:
    if isinstance(payload, list):
        return payload
    if isinstance(payload, dict):
        for key in _LIST_KEYS:
            value = payload.get(key)
            if isinstance(value, list):
                return value
    return None


def _parse_element(element: Any) -> GeneratedImage:
    if isinstance(element, str):
        return _from_reference(element, None)
    if isinstance(element, dict):
        image_id = next((str(element[k]) for k in _ID_KEYS if element.get(k) is not None), None)
        for key in _URL_KEYS:
            if isinstance(element.get(key), str):
                return _from_reference(element[key], image_id)
        if isinstance(element.get("image"), str):
            return _from_reference(element["image"], image_id)
        inline = element.get("b64_json")
        if isinstance(inline, InlineImage):
            return GeneratedImage(data=inline.data, id=image_id)
        if isinstance(inline, str):
            return GeneratedImage(data=_decode_b64(inline), id=image_id)
    raise TransientError(
        f"unexpected image entry in the API answer: {excerpt(repr(element))}",
        kind="bad_response",
    )


def _from_reference(value: str, image_id: str | None) -> GeneratedImage:
    """A URL, a data: URI or (in the ``image`` field) bare base64."""
    if value.startswith("data:"):
        _, _, encoded = value.partition(",")
        return GeneratedImage(data=_decode_b64(encoded), id=image_id)
    if "://" in value:
        return GeneratedImage(url=value, id=image_id)
    return GeneratedImage(data=_decode_b64(value), id=image_id)


def _decode_b64(value: str) -> bytes:
    """Strict base64, line breaks allowed (removed only when the strict decode fails).

    A length that is not a multiple of 4 is refused first: Python 3.10's decoder, unlike
    3.11's strict mode, accepts excess padding.
    """
    data = b""
    for text in (value, "".join(value.split())):
        if len(text) % 4:
            continue
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            continue
        break
    if not data:
        raise TransientError("the API answered with invalid base64 image data", kind="bad_image")
    return data


def elide_images(payload: Any) -> Any:
    """A copy of an answer with inline image data replaced by ``"<elided N bytes>"``.

    The manifest keeps the answer because its shape is undocumented; megabytes of base64
    would make every line unreadable, so only the size of inline images stays.
    """
    if isinstance(payload, list):
        return [elide_images(value) for value in payload]
    if isinstance(payload, dict):
        return {key: _elide_field(key, value) for key, value in payload.items()}
    if isinstance(payload, str) and payload.startswith("data:"):
        return _elided(payload.partition(",")[2])
    if isinstance(payload, InlineImage):
        return payload.elided()
    return payload


def scrub_strings(payload: Any, scrub: Callable[[str], str]) -> Any:
    """A copy of a parsed answer with `scrub` applied to every string in it (keys too).

    Run it on what is kept (after `elide_images`): the strings left are short, so this
    costs microseconds where scrubbing the raw body cost milliseconds per megabyte.
    """
    if isinstance(payload, str):
        return scrub(payload)
    if isinstance(payload, list):
        return [scrub_strings(value, scrub) for value in payload]
    if isinstance(payload, dict):
        return {
            scrub(key) if isinstance(key, str) else key: scrub_strings(value, scrub)
            for key, value in payload.items()
        }
    return payload


def _elide_field(key: Any, value: Any) -> Any:
    is_inline = key == "b64_json" or (key == "image" and "://" not in str(value))
    if isinstance(value, str) and is_inline:
        return _elided(value.partition(",")[2] if value.startswith("data:") else value)
    return elide_images(value)


def _elided(encoded: str) -> str:
    size = len(encoded.strip()) * 3 // 4 - encoded.strip().count("=")
    return f"<elided {max(size, 0)} bytes>"


def classify_http(
    status: int,
    text: str,
    headers: Mapping[str, str],
    *,
    now: datetime,
    projects: bool = True,
    model: object = None,
) -> BackendError:
    """The error for a non-2xx answer: what the engine should do is in its class.

    `text` must already be free of the key; it is redacted and shortened again anyway.
    A 4xx whose body says the account's quota or billing is exhausted is fatal whatever
    its status (OpenAI answers it with 429): waiting cannot bring credit back.

    The advice names only what the user can fix for this API: `projects` is False for a
    kind whose requests name no Roboflow project (its spec has no project_url to check),
    and `model` is the request's ``model``, which an answer ``model_not_found`` names.
    """
    detail = f"HTTP {status}: {excerpt(text)}" if text.strip() else f"HTTP {status}"
    if 400 <= status < 500 and _QUOTA_EXHAUSTED.search(text):
        return FatalError(f"{detail} — {QUOTA_ADVICE}", kind="http_status", status=status)
    if status in (400, 404) and _MODEL_NOT_FOUND.search(text):
        return FatalError(f"{detail} — {model_advice(model)}", kind="http_status", status=status)
    if status in (401, 403):
        access = "the project" if projects else "this API and its models"
        return FatalError(
            f"{detail} — the API refused the key: check the API key variable "
            f"(backend.api_key_env) and that the key has access to {access}",
            kind="http_status",
            status=status,
        )
    if status == 404:
        advice = (
            "unknown project or endpoint: check project_url and backend.base_url"
            if projects
            else "unknown endpoint: check backend.base_url"
        )
        return FatalError(f"{detail} — {advice}", kind="http_status", status=status)
    if status == 429:
        retry_after = parse_retry_after(
            _header(headers, "retry-after"), now, server_date=_header(headers, "date")
        )
        return RateLimitedError(f"{detail} — rate limited", retry_after=retry_after)
    if status in (408, 425) or status >= 500:
        return TransientError(detail, kind="http_status", status=status)
    if status == 400 and _REFUSAL.search(text):
        return PermanentError(
            f"{detail} — refused by the content policy", kind="refused", status=status
        )
    return PermanentError(detail, kind="http_status", status=status)


def model_advice(model: object) -> str:
    """What a ``model_not_found`` answer means, naming the requested model."""
    named = f"model {model}" if model else "the requested model (the API's default)"
    return (
        f"{named} is not available to this key: shut down, or not open to its "
        "organization or project (see `synthaug models`)"
    )


def parse_retry_after(
    value: str | None, now: datetime, *, server_date: str | None = None
) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (seconds or HTTP date), None if garbage.

    An HTTP date is the server's clock: it is measured against the answer's own ``Date``
    header (`server_date`) when that disagrees with the local clock `now` by more than
    its one-second resolution, so a local clock that is off neither stalls nor hammers.
    Measured against ``Date``, the wait errs long by under a second, never short.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        return _seconds_until_date(text, _server_now(server_date, _aware(now)))
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _server_now(server_date: str | None, now: datetime) -> datetime:
    """The server's time as well as it can be known: `now`, or the ``Date`` it sent."""
    said = _parse_http_date(server_date) if server_date else None
    if said is None:
        return now
    skew = (said - now).total_seconds()
    low, high = _CLOCKS_AGREE_S
    return now if low < skew <= high else said


def _seconds_until_date(text: str, now: datetime) -> float | None:
    when = _parse_http_date(text)
    if when is None:
        return None
    return max((when - now).total_seconds(), 0.0)


def _parse_http_date(text: str) -> datetime | None:
    try:
        when = email.utils.parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    return _aware(when)


def _aware(when: datetime) -> datetime:
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when


def parse_rate_limit(headers: Mapping[str, str]) -> RateLimitHint | None:
    """Remaining requests and seconds to reset from ``x-ratelimit-*`` headers, if sent."""
    if not any(name[:11].lower() == "x-ratelimit" for name in headers):
        return None  # the usual answer: one pass instead of a lookup per header name
    remaining_text = _header(headers, "x-ratelimit-remaining-requests") or _header(
        headers, "x-ratelimit-remaining"
    )
    reset_text = _header(headers, "x-ratelimit-reset-requests") or _header(
        headers, "x-ratelimit-reset"
    )
    remaining = _parse_count(remaining_text)
    reset_s = parse_duration(reset_text) if reset_text is not None else None
    if remaining is None and reset_s is None:
        return None
    return RateLimitHint(remaining=remaining, reset_s=reset_s)


def _parse_count(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return max(int(float(text.strip())), 0)
    except (ValueError, OverflowError):
        return None


def parse_duration(text: str) -> float | None:
    """Seconds in ``6m0s`` / ``1.5s`` / ``20ms`` / ``2h`` / plain-seconds form, None if garbage."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup that works for plain dicts as well as aiohttp's headers."""
    value = headers.get(name)
    if value is not None:
        return value
    for key, candidate in headers.items():
        if key.lower() == name:
            return candidate
    return None
