"""The Roboflow image upload client: ``POST {base_url}/dataset/{project}/upload``, then
the image's annotation, ``POST {base_url}/dataset/{project}/annotate/{image_id}``, and a
read-back, ``GET {base_url}/{workspace}/{project}/images/{image_id}``.

The request is Roboflow's documented REST form: everything but the image in the query
(``api_key``, ``name``, ``split``, ``batch``, and ``tag`` once per tag), the image's
base64 as the body, sent as ``application/x-www-form-urlencoded`` (what ``curl -d``
sends). The answer is ``{"success": true, "id": ...}`` for a new image, or
``{"duplicate": true, "id": ...}`` when the project already holds it: with names
derived from item keys a duplicate means an earlier upload of this very image
succeeded (a retry after a lost answer, a rerun), so it is a success too.

An annotation goes as roboflow-python sends it: the file's text as the body
(``text/plain``), its file name as ``name`` (the extension tells Roboflow the format),
``prediction=true`` to put it up for review. Roboflow refuses a second annotation of an
image (409, or 400 "already annotated"): with one annotation per uploaded image, that
means an earlier one succeeded, so it counts as success.

The session, proxies, timeouts, the key and the mapping of failures to error classes are
its `ApiClient`'s (`pipeline.backends.http`), as for every API client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import BackendError, FatalError, TransientError
from ..records import ImageUpload, UploadAnswer
from .base import encode_image, excerpt
from .client_options import ClientOptions
from .http import ApiClient, ApiClientOwner

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is Python 3.11+; we support 3.10

__all__ = ["FORM_CONTENT_TYPE", "RoboflowUploadClient"]

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
_TEXT_CONTENT_TYPE = "text/plain"
_ALREADY_ANNOTATED = "already annotated"

_log = logging.getLogger(__name__)


class RoboflowUploadClient(ApiClientOwner):
    """Uploads images to one Roboflow project under ``base_url``."""

    def __init__(
        self, base_url: str, api_key: str, *, project: str, **options: Unpack[ClientOptions]
    ) -> None:
        """Base URL, key and `ClientOptions` (as `RoboflowBackend`), plus the project the
        images go to."""
        self._http = ApiClient(api_key, **options)
        self._project = project
        self._root = base_url.rstrip("/")
        self._endpoint = f"{self._root}/dataset/{project}/upload"

    def __repr__(self) -> str:
        return f"RoboflowUploadClient({self._endpoint!r})"

    async def upload(self, image: ImageUpload) -> UploadAnswer:
        """POST `image`; raises a `BackendError` subclass on any failure (never the key)."""
        body = encode_image(image.data).encode("ascii")
        _log.debug("POST %s for %s (%d bytes)", self._endpoint, image.name, len(image.data))
        try:
            status, chunks, headers = await self._http.send(
                lambda: self._http.keyed_url(self._endpoint, _labels(image)),
                self._endpoint,
                data=body,
                headers={"Content-Type": FORM_CONTENT_TYPE},
            )
            return self._answer_of(status, b"".join(chunks), headers)
        except BackendError as error:
            self._http.scrub_error(error)
            raise

    async def annotate(
        self, image_id: str, name: str, annotation: str, *, prediction: bool
    ) -> bool:
        """POST the annotation file `name` (its text `annotation`) of the uploaded image
        `image_id`, as a prediction for review or as ground truth; True when Roboflow
        already had one (an earlier answer was lost). Raises a `BackendError` subclass."""
        endpoint = f"{self._root}/dataset/{self._project}/annotate/{image_id}"
        query = [("name", name), ("prediction", "true" if prediction else "false")]
        try:
            status, chunks, headers = await self._http.send(
                lambda: self._http.keyed_url(endpoint, query),
                endpoint,
                data=annotation.encode("utf-8"),
                headers={"Content-Type": _TEXT_CONTENT_TYPE},
            )
            text = self._http.scrub(b"".join(chunks).decode("utf-8", errors="replace"))
            if status == 409 or (status == 400 and _ALREADY_ANNOTATED in text.lower()):
                return True
            if not 200 <= status < 300:
                raise self._upload_error(self._http.http_error(status, text, headers))
            return False
        except BackendError as error:
            self._http.scrub_error(error)
            raise

    async def boxes_kept(self, workspace: str, image_id: str) -> int | None:
        """How many boxes the project holds on the image `image_id` (its read-back);
        None when the answer does not say. Raises a `BackendError` subclass."""
        endpoint = f"{self._root}/{workspace}/{self._project}/images/{image_id}"
        try:
            payload = await self._get(endpoint)
        except BackendError as error:
            self._http.scrub_error(error)
            raise
        image = payload.get("image") if isinstance(payload, dict) else None
        if not isinstance(image, dict):
            return None
        annotation = image.get("annotation")
        if not isinstance(annotation, dict):
            return 0
        boxes = annotation.get("boxes")
        return len(boxes) if isinstance(boxes, list) else 0

    async def _get(self, endpoint: str) -> object:
        status, chunks, headers = await self._http.send(
            lambda: self._http.keyed_url(endpoint, []), endpoint, method="GET"
        )
        return self._http.json_of(endpoint, status, b"".join(chunks), headers)

    def _answer_of(self, status: int, raw: bytes, headers: Mapping[str, str]) -> UploadAnswer:
        _log.debug("%s answered HTTP %d (%d bytes)", self._endpoint, status, len(raw))
        text = self._http.scrub(raw.decode("utf-8", errors="replace"))
        if not 200 <= status < 300:
            raise self._upload_error(self._http.http_error(status, text, headers))
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        if isinstance(payload, dict) and (payload.get("success") or payload.get("duplicate")):
            image_id = payload.get("id")
            # the id is recorded: scrubbed as the generation client scrubs its image ids
            return UploadAnswer(
                id=self._http.scrub_recorded(str(image_id)) if image_id is not None else None,
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


def _labels(image: ImageUpload) -> list[tuple[str, str]]:
    """The image's name and labels as query parameters (after the key)."""
    query: list[tuple[str, str]] = [("name", image.name)]
    if image.split is not None:
        query.append(("split", image.split))
    if image.batch is not None:
        query.append(("batch", image.batch))
    return query + [("tag", tag) for tag in image.tags]
