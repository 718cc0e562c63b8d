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
from collections.abc import Awaitable, Callable

from aiohttp import web
from PIL import Image, UnidentifiedImageError

from .config import MockConfig, MockStats
from .dataset import MockDataset
from .replies import ROBOFLOW_FAULTS, drop_connection, fault_answer, roboflow_error

__all__ = ["SPLITS", "decode_upload", "serve_upload"]

SPLITS = ("train", "valid", "test")


async def serve_upload(
    request: web.Request,
    *,
    dataset: MockDataset,
    config: MockConfig,
    stats: MockStats,
    draw_fault: Callable[[], str | None],
    rate_limited: Callable[[float], web.Response],
    pause: Callable[[float], Awaitable[None]],
) -> web.StreamResponse:
    """``POST /dataset/{project}/upload``: key, request, project, fault, then the image.

    `rate_limited(seconds)` is the server's 429 (it announces the pause it asks for);
    `pause(seconds)` its sleep that ends when the server closes.
    """
    stats.upload_requests += 1
    if not config.accepts_key(request.query.get("api_key", "")):
        stats.unauthorized += 1
        return roboflow_error(401, "Unauthorized: invalid api_key.")
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
    if config.projects is not None and project not in config.projects:
        stats.unknown_project += 1
        return roboflow_error(404, f"Project {project} not found.")
    fault = draw_fault()
    fault = fault if fault in ROBOFLOW_FAULTS else None
    refusal = fault_answer(
        fault,
        too_many=lambda: rate_limited(config.retry_after_s),
        malformed='{"success": true, "id": ',
    )
    if refusal is not None:
        return refusal
    await pause(config.latency_s + (config.slow_s if fault == "slow" else 0.0))
    image, duplicate = dataset.add(
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
    if fault == "drop":  # stored, but the client never hears it
        drop_connection(request)
        return web.Response(status=500)
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
