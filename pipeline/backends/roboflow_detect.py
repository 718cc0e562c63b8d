"""The Roboflow detection client: ``POST {api_url}/{project}/{version}``.

Roboflow's hosted inference (``serverless.roboflow.com``; the legacy
``detect.roboflow.com``) and a self-hosted Inference server answer the same request: the
key, ``confidence`` and ``overlap`` (0-100) in the query, the image's base64 as a
form-encoded body, and ``{"predictions": [{"x", "y", "width", "height", "class",
"confidence", ...}], "image": {"width", "height"}}`` back, boxes by their centre in
pixels of the image sent.

The hosted API takes bodies up to 20 MB (Roboflow's "Limits"), and shrinks every image to
its model's input size anyway: an image whose base64 is larger, or one the server refuses
with 413, is sent shrunk (`shrink_for_request`) and its boxes scaled back to the stored
image's pixels, so the labels always describe the stored file.

The session, proxies, timeouts, the key and the mapping of failures to error classes are
its `ApiClient`'s (`pipeline.backends.http`), as for every API client.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..errors import BackendError, FatalError, PermanentError, TransientError
from ..records import Prediction
from .base import encode_image, excerpt
from .client_options import ClientOptions
from .http import ApiClient, ApiClientOwner

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is Python 3.11+; we support 3.10

__all__ = [
    "MAX_REQUEST_BYTES",
    "RoboflowDetectClient",
    "parse_predictions",
    "shrink_for_request",
]

MAX_REQUEST_BYTES = 20 * 1000 * 1000
"""The hosted API's largest body (Roboflow: "file uploads up to 20MB")."""
TOO_LARGE = 413
MIN_EDGE = 64  # an image is never shrunk below this: a refusal then is the answer
_FORM = "application/x-www-form-urlencoded"

_log = logging.getLogger(__name__)


Scale = tuple[float, float]
"""How much smaller the sent image is than the stored one, across and down."""


def shrink_for_request(data: bytes, factor: float) -> tuple[bytes, Scale]:
    """`data` (an image) scaled by about `factor` < 1, as a PNG, and the exact scale of
    each axis (sizes are whole pixels): what is sent when the stored image is larger than
    the API takes. CPU work: call it in a thread."""
    with Image.open(io.BytesIO(data)) as image:
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        scale = (size[0] / image.width, size[1] / image.height)
        small = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, format="PNG")
    return out.getvalue(), scale


def parse_predictions(payload: Any, scale: Scale = (1.0, 1.0)) -> tuple[Prediction, ...] | None:
    """The predictions of a detection answer, in the stored image's pixels (divided by
    the `scale` the sent image was shrunk by); None when the answer has no
    ``predictions`` list."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("predictions"), list):
        return None
    found = []
    for item in payload["predictions"]:
        numbers = [item.get(k) for k in ("x", "y", "width", "height", "confidence")]
        if not isinstance(item, Mapping) or not all(_is_number(n) for n in numbers):
            return None
        x, y, width, height, confidence = (float(n) for n in numbers)
        across, down = scale
        found.append(
            Prediction(
                x / across,
                y / down,
                width / across,
                height / down,
                str(item.get("class", "")),
                confidence,
            )
        )
    return tuple(found)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class RoboflowDetectClient(ApiClientOwner):
    """Asks one detection model under ``api_url`` about images."""

    def __init__(
        self,
        api_url: str,
        api_key: str,
        *,
        model: str,
        confidence: float,
        overlap: float,
        **options: Unpack[ClientOptions],
    ) -> None:
        """Host, key and `ClientOptions` (as the other clients), plus the model
        (``project/version``) and the thresholds (0-1, sent as 0-100)."""
        self._http = ApiClient(api_key, **options)
        self._model = model
        self._endpoint = f"{api_url.rstrip('/')}/{model}"
        self._query = [
            ("confidence", _percent(confidence)),
            ("overlap", _percent(overlap)),
            ("format", "json"),
        ]

    def __repr__(self) -> str:
        return f"RoboflowDetectClient({self._endpoint!r})"

    async def detect(self, data: bytes) -> tuple[Prediction, ...]:
        """The predictions for the image `data`, boxes in its pixels; raises a
        `BackendError` subclass on failure (never the key). A body over
        `MAX_REQUEST_BYTES`, or a 413, sends the image shrunk (at least halved each time,
        down to `MIN_EDGE`)."""
        scale = 1.0
        while True:
            sent, exact = data, (1.0, 1.0)
            if scale != 1.0:
                sent, exact = await asyncio.to_thread(shrink_for_request, data, scale)
            encoded = _encoded_bytes(len(sent))
            try:
                if encoded > MAX_REQUEST_BYTES:
                    raise _TooLarge(f"the image is {encoded} bytes as base64")
                return await self._detect(sent, exact)
            except _TooLarge as too_large:
                scale *= min(0.5, math.sqrt(MAX_REQUEST_BYTES / encoded))
                if not await asyncio.to_thread(_fits, data, scale):
                    raise PermanentError(
                        f"{self._endpoint}: {too_large}, even shrunk to {MIN_EDGE} px: the "
                        "server takes no image this large; check label.api_url",
                        kind="http_status",
                        status=TOO_LARGE,
                    ) from None
                _log.info("%s: %s; sending it at %.3g×", self._endpoint, too_large, scale)

    async def _detect(self, data: bytes, scale: Scale) -> tuple[Prediction, ...]:
        body = encode_image(data).encode("ascii")
        try:
            status, chunks, headers = await self._http.send(
                lambda: self._http.keyed_url(self._endpoint, self._query),
                self._endpoint,
                data=body,
                headers={"Content-Type": _FORM},
            )
            return self._answer_of(status, b"".join(chunks), headers, scale)
        except BackendError as error:
            self._http.scrub_error(error)
            raise

    def _answer_of(
        self, status: int, raw: bytes, headers: Mapping[str, str], scale: Scale
    ) -> tuple[Prediction, ...]:
        text = self._http.scrub(raw.decode("utf-8", errors="replace"))
        if status == TOO_LARGE:
            raise _TooLarge("the server refused the image's size (HTTP 413)")
        if not 200 <= status < 300:
            raise self._detect_error(self._http.http_error(status, text, headers))
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        predictions = parse_predictions(payload, scale)
        if predictions is None:
            raise TransientError(
                f"HTTP {status} from {self._endpoint} without predictions: {excerpt(text)}",
                kind="bad_response",
                status=status,
            )
        return predictions

    def _detect_error(self, error: BackendError) -> BackendError:
        """`error` with advice about the `label:` block where it is fatal."""
        if not isinstance(error, FatalError) or error.status not in (401, 403, 404):
            return error
        head = error.message.split(" — ", 1)[0]
        if error.status == 404:
            advice = f"unknown model {self._model!r}: check label.model and label.api_url"
        else:
            advice = (
                "Roboflow refused the key for detection: check label.api_key_env and that "
                f"the key may use model {self._model!r}"
            )
        return FatalError(f"label: {head} — {advice}", kind=error.kind, status=error.status)


class _TooLarge(Exception):
    """The server refused the image's size: send it smaller (never retried as is)."""


def _encoded_bytes(size: int) -> int:
    """The body's size for an image of `size` bytes (base64: 4 per 3)."""
    return 4 * ((size + 2) // 3)


def _fits(data: bytes, scale: float) -> bool:
    """Whether `data` scaled by `scale` keeps its short edge at least `MIN_EDGE`."""
    with Image.open(io.BytesIO(data)) as image:
        return bool(min(image.size) * scale >= MIN_EDGE)


def _percent(value: float) -> str:
    """A 0-1 threshold as the 0-100 number the API takes (no trailing zeros)."""
    return f"{value * 100:.6g}"
