"""The OpenAI Images API client: ``POST /images/generations`` and ``/images/edits``.

A prompt-only item is a JSON ``generations`` request; an item with an input image is a
multipart ``edits`` request whose ``image[]`` part holds the image's bytes (a local file
as read by the engine, a URL fetched first through the same session and proxy), and whose
``mask`` part, when its source has one, the mask PNG's bytes. The mask is read here, just
before the request starts, and checked against the hash its item's key was built from
(one small file per source: the engine's one ``image`` argument stays as it is). The key
travels as ``Authorization: Bearer``, set per request and never logged. Everything else,
the session, proxies, timeouts, answer parsing (``data[].b64_json`` with ``usage``) and
the error classes, is its `ApiClient`'s (`pipeline.backends.http`).
"""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from ..errors import PermanentError
from ..records import GeneratedImage, Generation, WorkItem, request_body
from ..registry import backend_kind
from .client_options import ClientOptions
from .edit_input import image_type, read_mask, stem
from .http import LARGE_ANSWER_BYTES, Answer, ApiClient, ApiClientOwner

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is Python 3.11+; we support 3.10

__all__ = ["OpenAIBackend"]


class OpenAIBackend(ApiClientOwner):
    """Sends work items to OpenAI's images endpoints under ``base_url`` (``…/v1``)."""

    def __init__(self, base_url: str, api_key: str, **options: Unpack[ClientOptions]) -> None:
        """The registry's common signature (as `RoboflowBackend`)."""
        kind = backend_kind("openai")
        client = ApiClient(api_key, projects=kind.needs_project or kind.project_in_body, **options)
        self._root = base_url.rstrip("/")
        self._http = client
        self._endpoint = self._root + "/images/generations"
        self._edits = self._root + "/images/edits"

    def __repr__(self) -> str:
        return f"OpenAIBackend({self._endpoint!r})"

    @property
    def api_root(self) -> str:
        """The API root this client sends to (``…/v1``)."""
        return self._root

    @property
    def http(self) -> ApiClient:
        """The HTTP client this backend sends through (the Batch API client shares it)."""
        return self._http

    async def generate(self, item: WorkItem, image: str | None) -> Generation:
        """A generation for a prompt-only item, an edit for one with an input image."""
        if item.input is None:
            body = request_body(item, None, project=False)
            sending = self._http.request("POST", self._endpoint, json=body)
            return await self._http.generation(item, sending, what=self._endpoint)
        return await self._http.generation(item, self._edit(item, image), what=self._edits)

    async def download(self, image: GeneratedImage) -> bytes:
        """The bytes of `image`: inline data as is, or a GET of its URL."""
        return await self._http.image_bytes(image)

    async def ask_model(self, model: str, *, timeout_s: float | None = None) -> tuple[int, Any]:
        """``GET /models/{model}``: the answer's HTTP status and its JSON (None when it is
        not JSON), scrubbed of the key. A transport failure raises a `BackendError`, as
        for a generation; no retry: `pipeline.model_check` decides what an answer means.
        """
        url = f"{self._root}/models/{quote(model, safe='')}"
        timeout: dict[str, Any] = {}
        if timeout_s is not None:
            timeout["timeout"] = aiohttp.ClientTimeout(total=timeout_s)
        status, chunks, _headers = await self._http.request("GET", url, **timeout)
        return status, self._http.scrubbed_json(chunks)

    async def _edit(self, item: WorkItem, image: str | None) -> Answer:
        """POST the multipart edit of `item`: its parameters, then its input as ``image[]``
        and its mask (if any) as ``mask``."""
        data, name = await self._input_bytes(item, image)
        mask = await read_mask(item)
        form = aiohttp.FormData()
        for key, value in {"prompt": item.prompt, **item.params}.items():
            form.add_field(key, _form_value(value))
        mime, extension = image_type(data)
        form.add_field("image[]", data, filename=f"{name}.{extension}", content_type=mime)
        if mask is not None and item.mask is not None:
            mask_name = stem(item.mask.value)
            form.add_field("mask", mask, filename=f"{mask_name}.png", content_type="image/png")
        return await self._http.request("POST", self._edits, data=form)

    async def _input_bytes(self, item: WorkItem, image: str | None) -> tuple[bytes, str]:
        """The input image's bytes and a file name stem for its part."""
        assert item.input is not None
        if item.input.kind == "url":
            data = await self.download(GeneratedImage(url=item.input.value))
            return data, stem(URL(item.input.value).path)
        if item.input.kind != "file" or image is None:
            raise PermanentError(
                f"the openai backend cannot send a {item.input.kind} input: use a file or URL",
                kind="bad_response",
            )
        if len(image) > LARGE_ANSWER_BYTES:
            data = await asyncio.to_thread(_decode, image)
        else:
            data = _decode(image)
        return data, stem(item.input.value)


def _decode(image: str) -> bytes:
    """The bytes behind the engine's base64 of a local file."""
    return base64.b64decode(image)


def _form_value(value: Any) -> str:
    """A request parameter as a multipart field (booleans as JSON spells them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
