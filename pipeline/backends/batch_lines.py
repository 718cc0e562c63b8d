"""The JSONL request lines of OpenAI's Batch API: one line per work item.

A batch has one endpoint, so prompt-only items go into ``/v1/images/generations``
batches and items with an input image into ``/v1/images/edits`` batches of their own. A
JSONL line cannot carry multipart parts: an edit line uses the Images API's JSON form,
``images: [{"image_url": ...}]`` (a local file as a ``data:`` URL of its bytes, a URL
input as itself) and ``mask: {"image_url": "data:image/png;base64,..."}``. Inputs are
inlined, never uploaded with ``POST /files`` for a ``file_id``: an input is at most 25 MB
(`pipeline.sources.MAX_INPUT_BYTES`), so its line fits an input file several times over,
and an upload per input would be one more thing to record, retry and clean up. A line is
counted at its real size (the data URL included) against the input file's limit.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from ..errors import PermanentError
from ..records import WorkItem, request_body
from .base import encode_image
from .edit_input import data_url, read_mask
from .http import LARGE_ANSWER_BYTES

__all__ = [
    "BATCH_ENDPOINT",
    "EDITS_ENDPOINT",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_REQUESTS",
    "request_line",
]

BATCH_ENDPOINT = "/v1/images/generations"
"""The endpoint of prompt-only items' batches."""
EDITS_ENDPOINT = "/v1/images/edits"
"""The endpoint of the batches of items with an input image (a batch has one endpoint)."""
MAX_BATCH_REQUESTS = 50_000
"""Requests per batch the API takes at most."""
MAX_BATCH_BYTES = 190 * 1024 * 1024  # the API takes 200 MB: a margin for either meaning of MB
"""Bytes per input file this client sends at most."""


async def request_line(item: WorkItem, image: str | None, *, max_bytes: int) -> tuple[str, bytes]:
    """The item's endpoint and its JSONL request line (``custom_id`` its key); a
    `PermanentError` for a line longer than `max_bytes` or an input a line cannot carry."""
    if item.input is None:
        endpoint, body = BATCH_ENDPOINT, request_body(item, None, project=False)
    else:
        endpoint, body = EDITS_ENDPOINT, await _edit_body(item, image)
    request = {"custom_id": item.key, "method": "POST", "url": endpoint, "body": body}
    if len(image or "") > LARGE_ANSWER_BYTES:  # megabytes of base64: not on the loop
        line = await asyncio.to_thread(_encode_line, request)
    else:
        line = _encode_line(request)
    if len(line) > max_bytes:
        raise PermanentError(
            f"the request is {len(line):,} bytes, more than a batch input file takes "
            f"({max_bytes:,}): use mode online for this input",
            kind="bad_response",
            item_key=item.key,
        )
    return endpoint, line


async def _edit_body(item: WorkItem, image: str | None) -> dict[str, Any]:
    """An edit in the Images API's JSON form: the parameters, ``images`` (one input)
    and, when the source has one, ``mask``."""
    assert item.input is not None
    if item.input.kind == "url":
        reference = {"image_url": item.input.value}  # the API fetches it
    elif item.input.kind == "file" and image is not None:
        reference = {"image_url": data_url(image)}
    else:
        raise PermanentError(
            f"the openai backend cannot send a {item.input.kind} input: use a file or URL",
            kind="bad_response",
            item_key=item.key,
        )
    body: dict[str, Any] = {"prompt": item.prompt, **item.params, "images": [reference]}
    mask = await read_mask(item)
    if mask is not None:
        body["mask"] = {"image_url": data_url(encode_image(mask))}
    return body


def _encode_line(request: Mapping[str, Any]) -> bytes:
    """One JSONL line: compact JSON (ASCII, so its length is its size in bytes)."""
    return json.dumps(request, separators=(",", ":")).encode() + b"\n"
