"""The OpenAI Images API client: ``POST /images/generations`` and ``/images/edits``.

A prompt-only item is a JSON ``generations`` request; an item with an input image is a
multipart ``edits`` request whose ``image[]`` part holds the image's bytes (a local file
as read by the engine, a URL fetched first through the same session and proxy), and whose
``mask`` part, when its source has one, the mask PNG's bytes. The mask is read here, just
before the request starts, and checked against the hash its item's key was built from
(one small file per source: the engine's one ``image`` argument stays as it is). The key
travels as ``Authorization: Bearer``, set per request and never logged. Everything else,
the session, proxies, timeouts, answer parsing (``data[].b64_json`` with ``usage``) and
the error classes, is the Roboflow client's, which this class extends.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping
from functools import partial
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from ..errors import PermanentError
from ..records import GeneratedImage, Generation, WorkItem, request_body
from ..sources import read_input_bytes
from .base import scrub_strings
from .roboflow import LARGE_ANSWER_BYTES, RoboflowBackend

__all__ = ["OpenAIBackend", "image_type"]

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png", "png"),
    (b"\xff\xd8\xff", "image/jpeg", "jpg"),
    (b"RIFF", "image/webp", "webp"),
)


class OpenAIBackend(RoboflowBackend):
    """Sends work items to OpenAI's images endpoints under ``base_url`` (``…/v1``)."""

    ENDPOINT_PATH = "/images/generations"
    KIND = "openai"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As `RoboflowBackend` (the registry's common signature), with the edits URL."""
        super().__init__(*args, **kwargs)
        self._edits = self._root + "/images/edits"
        self._parsed: dict[str, URL] = {}

    def __repr__(self) -> str:
        return f"OpenAIBackend({self._endpoint!r})"

    async def generate(self, item: WorkItem, image: str | None) -> Generation:
        """A generation for a prompt-only item, an edit for one with an input image."""
        if item.input is None:
            body = request_body(item, None, project=False)
            sending = self._send(
                partial(self._url, self._endpoint),
                self._endpoint,
                json=body,
                headers=self._auth(),
            )
            return await self._answer(item, sending)
        return await self._answer(item, self._edit(item, image))

    async def ask_model(self, model: str, *, timeout_s: float | None = None) -> tuple[int, Any]:
        """``GET /models/{model}``: the answer's HTTP status and its JSON (None when it is
        not JSON), scrubbed of the key. A transport failure raises a `BackendError`, as
        for a generation; no retry: `pipeline.model_check` decides what an answer means.
        """
        url = f"{self._root}/models/{quote(model, safe='')}"
        timeout = {} if timeout_s is None else {"timeout": aiohttp.ClientTimeout(total=timeout_s)}
        status, chunks, _headers = await self._send(
            partial(self._url, url), url, method="GET", headers=self._auth(), **timeout
        )
        try:
            payload = json.loads(b"".join(chunks))
        except ValueError:
            payload = None
        return status, scrub_strings(payload, self._scrub)

    def _auth(self) -> dict[str, str]:
        """The key's header, built per request so that no shared object holds it."""
        return {"Authorization": f"Bearer {self._api_key}"}

    def _url(self, endpoint: str) -> URL:
        """`endpoint` parsed once (raises `aiohttp.InvalidURL` for a bad base_url)."""
        if endpoint not in self._parsed:
            try:
                url = URL(endpoint)
            except ValueError as exc:
                raise aiohttp.InvalidURL(endpoint) from exc
            if not url.is_absolute():
                raise aiohttp.InvalidURL(endpoint)
            self._parsed[endpoint] = url
        return self._parsed[endpoint]

    async def _edit(
        self, item: WorkItem, image: str | None
    ) -> tuple[int, list[bytes], Mapping[str, str]]:
        """POST the multipart edit of `item`: its parameters, then its input as ``image[]``
        and its mask (if any) as ``mask``."""
        data, name = await self._input_bytes(item, image)
        mask = await self._mask_bytes(item)
        form = aiohttp.FormData()
        for key, value in {"prompt": item.prompt, **item.params}.items():
            form.add_field(key, _form_value(value))
        mime, extension = image_type(data)
        form.add_field("image[]", data, filename=f"{name}.{extension}", content_type=mime)
        if mask is not None and item.mask is not None:
            stem = _stem(item.mask.value)
            form.add_field("mask", mask, filename=f"{stem}.png", content_type="image/png")
        return await self._send(
            partial(self._url, self._edits), self._edits, data=form, headers=self._auth()
        )

    async def _mask_bytes(self, item: WorkItem) -> bytes | None:
        """The bytes of the item's mask, as hashed into its key; None without a mask.

        Raises `InputChangedError` (the engine skips the item) when the file changed.
        """
        if item.mask is None:
            return None
        return await asyncio.to_thread(read_input_bytes, item.mask.value, item.mask.sha256 or "")

    async def _input_bytes(self, item: WorkItem, image: str | None) -> tuple[bytes, str]:
        """The input image's bytes and a file name stem for its part."""
        assert item.input is not None
        if item.input.kind == "url":
            data = await self.download(GeneratedImage(url=item.input.value))
            return data, _stem(URL(item.input.value).path)
        if item.input.kind != "file" or image is None:
            raise PermanentError(
                f"the openai backend cannot send a {item.input.kind} input: use a file or URL",
                kind="bad_response",
            )
        if len(image) > LARGE_ANSWER_BYTES:
            data = await asyncio.to_thread(_decode, image)
        else:
            data = _decode(image)
        return data, _stem(item.input.value)


def image_type(data: bytes) -> tuple[str, str]:
    """(MIME type, file extension) of an image's bytes; PNG when not recognised."""
    for magic, mime, extension in _MAGIC:
        if data.startswith(magic):
            return mime, extension
    return "image/png", "png"


def _decode(image: str) -> bytes:
    """The bytes behind the engine's base64 of a local file."""
    return base64.b64decode(image)


def _stem(path: str) -> str:
    """A file name stem for a part: the input's own, or ``image``."""
    return PurePosixPath(path.replace("\\", "/")).stem or "image"


def _form_value(value: Any) -> str:
    """A request parameter as a multipart field (booleans as JSON spells them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
