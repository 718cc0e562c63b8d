"""The embedded mock of Roboflow's image upload: ``POST /dataset/{project}/upload``.

It takes the request as Roboflow documents it (the image's base64 as the body; ``name``,
``split``, ``batch`` and ``tag``, repeatable, in the query) and answers as Roboflow does:
``{"success": true, "id": ...}`` for a new image, ``{"duplicate": true, "id": ...}`` when
the project already holds one of that name. It checks the key and the project as the
mock's generation endpoint does, refuses what the real one would (400: no name, an
empty body, base64 that does not decode, bytes that are not an image, an unknown split),
and applies the server's fault injection: 429 with Retry-After, 5xx (a 502 says
``retryable``, as Roboflow's does), malformed and wrong-shaped answers, slow answers, and
connections dropped *after* the image was stored, so a client's retry meets the
duplicate answer a lost answer leads to.
"""

from __future__ import annotations

import base64
import binascii
import io

from aiohttp import web
from PIL import Image, UnidentifiedImageError

from .replies import roboflow_error
from .roboflow import MockRoboflow, dropped

__all__ = ["SPLITS", "decode_upload", "serve_upload"]

SPLITS = ("train", "valid", "test")


async def serve_upload(request: web.Request, *, roboflow: MockRoboflow) -> web.StreamResponse:
    """``POST /dataset/{project}/upload``: key, request, project, fault, then the image."""
    stats = roboflow.stats
    stats.upload_requests += 1
    refusal = roboflow.refused_key(request)
    if refusal is not None:
        return refusal
    name = request.query.get("name", "").strip()
    split = request.query.get("split")
    data, size, problem = decode_upload(await request.read())
    if not name:
        problem = "name is required for a base64 upload."
    elif split is not None and split not in SPLITS:
        problem = f"split must be one of {', '.join(SPLITS)}, got {split!r}."
    if problem is not None:
        return roboflow_error(400, problem)
    project = request.match_info["project"]
    refusal = roboflow.unknown_project(project)
    if refusal is not None:
        return refusal
    fault = await roboflow.fault(malformed='{"success": true, "id": ')
    if fault.answer is not None:
        return fault.answer
    image, duplicate = roboflow.dataset.add(
        project,
        name,
        data,
        size=size,
        split=split,
        batch=request.query.get("batch"),
        tags=request.query.getall("tag", []),
    )
    stats.uploads_by_name[f"{project}/{name}"] = stats.uploads_by_name.get(
        f"{project}/{name}", 0
    ) + (0 if duplicate else 1)
    if duplicate:
        stats.upload_duplicates += 1
    else:
        stats.uploads += 1
    if fault.drops:  # stored, but the client never hears it
        return dropped(request)
    if duplicate:
        return web.json_response({"duplicate": True, "id": image.id})
    return web.json_response({"success": True, "id": image.id})


def decode_upload(body: bytes) -> tuple[bytes, tuple[int, int] | None, str | None]:
    """The image bytes of an upload's body (its base64) and the image's size, or why
    Roboflow would refuse it."""
    text = body.strip()
    if not text:
        return b"", None, "the body must be the image, base64 encoded."
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return b"", None, "the body is not valid base64."
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return b"", None, "the body is not an image."
    return data, size, None
