"""The Roboflow image upload client: ``POST {base_url}/dataset/{project}/upload``.

The request is Roboflow's documented REST form: everything but the image in the query
(``api_key``, ``name``, ``split``, ``batch``, and ``tag`` once per tag), the image's
base64 as the body, sent as ``application/x-www-form-urlencoded`` (what ``curl -d``
sends). The answer is ``{"success": true, "id": ...}`` for a new image, or
``{"duplicate": true, "id": ...}`` when the project already holds it: with names
derived from item keys a duplicate means an earlier upload of this very image
succeeded (a retry after a lost answer, a rerun), so it is a success too.

The session, proxies, timeouts and the mapping of transport failures to error classes
are the Roboflow generation client's, which this class extends; it never generates.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from functools import partial
from typing import Any

import aiohttp
from yarl import URL

from ..errors import BackendError, FatalError, TransientError
from ..records import ImageUpload, UploadAnswer
from .base import classify_http, encode_image, excerpt, redact
from .roboflow import MIN_BARE_KEY_CHARS, RoboflowBackend

__all__ = ["FORM_CONTENT_TYPE", "RoboflowUploadClient"]

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"

_log = logging.getLogger(__name__)


class RoboflowUploadClient(RoboflowBackend):
    """Uploads images to one Roboflow project under ``base_url``."""

    def __init__(self, base_url: str, api_key: str, *, project: str, **kwargs: Any) -> None:
        """As `RoboflowBackend` (base URL, key, concurrency, timeout, proxies) plus the
        project the images go to."""
        super().__init__(base_url, api_key, **kwargs)
        self._project = project
        self._endpoint = f"{self._root}/dataset/{project}/upload"

    def __repr__(self) -> str:
        return f"RoboflowUploadClient({self._endpoint!r})"

    async def upload(self, image: ImageUpload) -> UploadAnswer:
        """POST `image`; raises a `BackendError` subclass on any failure (never the key)."""
        body = encode_image(image.data).encode("ascii")
        _log.debug("POST %s for %s (%d bytes)", self._endpoint, image.name, len(image.data))
        try:
            status, chunks, headers = await self._send(
                partial(self._upload_url, image),
                self._endpoint,
                data=body,
                headers={"Content-Type": FORM_CONTENT_TYPE},
            )
            return self._answer_of(status, b"".join(chunks), headers)
        except BackendError as error:
            error.message = self._scrub(error.message)
            error.args = (error.message,)
            raise

    def _upload_url(self, image: ImageUpload) -> URL:
        """The endpoint with the key and the image's labels as query parameters."""
        query: list[tuple[str, str]] = [("api_key", self._api_key), ("name", image.name)]
        if image.split is not None:
            query.append(("split", image.split))
        if image.batch is not None:
            query.append(("batch", image.batch))
        query += [("tag", tag) for tag in image.tags]
        try:
            url = URL(self._endpoint)
        except ValueError as exc:
            raise aiohttp.InvalidURL(self._endpoint) from exc
        if not url.is_absolute():
            raise aiohttp.InvalidURL(self._endpoint)
        return url.with_query(query)

    def _answer_of(self, status: int, raw: bytes, headers: Mapping[str, str]) -> UploadAnswer:
        _log.debug("%s answered HTTP %d (%d bytes)", self._endpoint, status, len(raw))
        text = self._scrub(raw.decode("utf-8", errors="replace"))
        if not 200 <= status < 300:
            raise self._upload_error(classify_http(status, text, headers, now=self._clock()))
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        if isinstance(payload, dict) and (payload.get("success") or payload.get("duplicate")):
            image_id = payload.get("id")
            # the id is recorded: scrub a key's bare text only when it is long enough to be
            # found by more than chance (as the generation client scrubs its image ids)
            scrub = redact if len(self._api_key) < MIN_BARE_KEY_CHARS else self._scrub
            return UploadAnswer(
                id=scrub(str(image_id)) if image_id is not None else None,
                duplicate=bool(payload.get("duplicate")),
            )
        raise TransientError(
            f"HTTP {status} from {self._endpoint} without success or duplicate: {excerpt(text)}",
            kind="bad_response",
            status=status,
        )

    def _upload_error(self, error: BackendError) -> BackendError:
        """`error` with advice about the `upload:` block where it is fatal (the shared
        wording names the generation's keys)."""
        if not isinstance(error, FatalError) or error.status not in (401, 403, 404):
            return error
        head = error.message.split(" — ", 1)[0]
        if error.status == 404:
            advice = f"unknown project {self._project!r}: check upload.project and upload.base_url"
        else:
            advice = (
                "Roboflow refused the key for the upload: check upload.api_key_env and that "
                f"the key may write to project {self._project!r}"
            )
        return FatalError(f"upload: {head} — {advice}", kind=error.kind, status=error.status)
