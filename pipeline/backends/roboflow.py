"""The Roboflow ``POST /synthetic-image`` client (also what talks to the embedded mock).

The key travels as the ``api_key`` query parameter, as Roboflow documents. The session,
proxies, timeouts, answer parsing and error classes are its `ApiClient`'s
(`pipeline.backends.http`), which every API client composes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..records import GeneratedImage, Generation, WorkItem, request_body
from ..registry import backend_kind
from .client_options import ClientOptions
from .http import (
    DOWNLOAD_CONNECTIONS,
    LARGE_ANSWER_BYTES,
    ApiClient,
    ApiClientOwner,
    utc_now,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is Python 3.11+; we support 3.10

__all__ = ["DOWNLOAD_CONNECTIONS", "LARGE_ANSWER_BYTES", "RoboflowBackend", "utc_now"]

_log = logging.getLogger(__name__)


class RoboflowBackend(ApiClientOwner):
    """Sends work items to ``{base_url}/synthetic-image`` and downloads the answers."""

    def __init__(self, base_url: str, api_key: str, **options: Unpack[ClientOptions]) -> None:
        """The registry's common signature: the API root, the key, `ClientOptions`."""
        self._root = base_url.rstrip("/")
        self._endpoint = self._root + "/synthetic-image"
        kind = backend_kind("roboflow")
        self._http = ApiClient(
            api_key, projects=kind.needs_project or kind.project_in_body, **options
        )

    def __repr__(self) -> str:
        return f"RoboflowBackend({self._endpoint!r})"

    @property
    def api_root(self) -> str:
        """The API root this client sends to (the embedded mock's URL for kind mock)."""
        return self._root

    async def generate(self, item: WorkItem, image: str | None) -> Generation:
        """POST the request for `item`; raises a `BackendError` subclass on any failure."""
        body = request_body(item, image)
        # the key has the mask's hash; this endpoint takes no mask (a spec error for kind
        # roboflow): the embedded mock's online rehearsal sends the edit without it
        body.pop("mask", None)
        _log.debug("POST %s for item %s", self._endpoint, item.key[:16])
        sending = self._http.send(
            lambda: self._http.keyed_url(self._endpoint), self._endpoint, json=body
        )
        return await self._http.generation(item, sending, what=self._endpoint)

    async def download(self, image: GeneratedImage) -> bytes:
        """The bytes of `image`: inline data as is, or a GET of its URL."""
        return await self._http.image_bytes(image)
