"""What the mock's generation endpoints read from a request, and how they check it.

A Roboflow ``/synthetic-image`` body is JSON; an OpenAI ``/images/edits`` body is a
multipart form, read here into the same dict form (its image and mask as base64) so that
one handler and one drawing path serve both. A rehearsal must fail where the real API
would, so the checks refuse what Roboflow's or OpenAI's endpoint refuses. Also what an
answer's size, image count and ``usage`` block are worked out from.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from .config import DEFAULT_SIZE
from .image import PNG_SIGNATURE

__all__ = [
    "b64",
    "bearer",
    "image_count",
    "load_body",
    "load_form",
    "mask_problem",
    "roboflow_image_problem",
    "scaled_size",
    "usage",
]

_IMAGE_TYPES = ("id", "url", "base64")

# Output tokens per image of a GPT image model by quality (OpenAI's published figures for
# 1024x1024; the API's own default quality counts as medium here).
_OUTPUT_TOKENS = {"low": 272, "medium": 1056, "high": 4160}


def bearer(request: web.Request) -> str:
    """The key of an ``Authorization: Bearer`` header ("" without one)."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def load_body(raw: bytes) -> dict[str, Any] | None:
    """A JSON request body with a string ``prompt``; None if it is not one."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        return None
    return body


async def load_form(request: web.Request) -> dict[str, Any] | None:
    """An edit's multipart form as a body: its fields, its first ``image[]`` part as
    base64 (``image_type: base64``, as the drawing code reads inputs) and its ``mask``
    part, if any, as base64 too; None if invalid."""
    if not request.content_type.startswith("multipart/"):
        return None
    body: dict[str, Any] = {}
    try:
        form = await request.post()
    except ValueError:
        return None
    for name, value in form.items():
        if isinstance(value, web.FileField):
            if name in ("image[]", "image") and "image" not in body:
                body["image"] = b64(value.file.read())
                body["image_type"] = "base64"
            elif name == "mask":
                body["mask"] = b64(value.file.read())
        else:
            body[name] = value
    if not isinstance(body.get("prompt"), str) or not body.get("image"):
        return None
    return body


def roboflow_image_problem(body: Mapping[str, Any]) -> str | None:
    """What Roboflow's endpoint would refuse about the body's input image, or None.

    A rehearsal must fail where the real API would: an ``image`` without a known
    ``image_type``, an empty one, base64 that does not decode, a URL that is not http(s).
    """
    if "image" not in body and "image_type" not in body:
        return None
    image, kind = body.get("image"), body.get("image_type")
    if kind not in _IMAGE_TYPES:
        return f"image_type must be one of {', '.join(_IMAGE_TYPES)}, got {kind!r}."
    if not isinstance(image, str) or not image.strip():
        return "image must be a non-empty string."
    if kind == "base64":
        try:
            decoded = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        if not decoded:
            return "image is not valid base64."
    if kind == "url" and not image.startswith(("http://", "https://")):
        return "image must be an http(s) URL."
    return None


def mask_problem(body: Mapping[str, Any]) -> str | None:
    """What OpenAI's edits would refuse about the body's mask (it must be a PNG), or None."""
    mask = body.get("mask")
    if mask is None:
        return None
    try:  # a file part was read as base64; a text field named mask is refused here
        data = base64.b64decode(mask, validate=True) if isinstance(mask, str) else b""
    except (binascii.Error, ValueError):
        data = b""
    if not data.startswith(PNG_SIGNATURE):
        return "mask must be a PNG image (a file part named mask)."
    return None


def usage(body: Mapping[str, Any], images: int) -> dict[str, Any]:
    """A ``usage`` block shaped like OpenAI's: what a request of `images` images used."""
    text_tokens = max(1, len(str(body.get("prompt", ""))) // 4)
    image_tokens = 0 if body.get("image") is None else 323
    per_image = _OUTPUT_TOKENS.get(str(body.get("quality")), _OUTPUT_TOKENS["medium"])
    return {
        "input_tokens": text_tokens + image_tokens,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_tokens},
        "output_tokens": per_image * images,
        "total_tokens": text_tokens + image_tokens + per_image * images,
    }


def scaled_size(size: Any, max_px: int) -> tuple[int, int]:
    """The requested ``WxH`` scaled down to fit `max_px`, keeping the aspect ratio."""
    width, height = DEFAULT_SIZE
    if isinstance(size, str):
        w_text, sep, h_text = size.lower().partition("x")
        if sep and w_text.isdigit() and h_text.isdigit() and int(w_text) and int(h_text):
            width, height = int(w_text), int(h_text)
    scale = min(1.0, max_px / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def image_count(n: Any) -> int:
    """The images a request's ``n`` asks for: 1 to 10, 1 when it is not a number."""
    try:
        return min(max(int(n), 1), 10)
    except (TypeError, ValueError):
        return 1


def b64(data: bytes) -> str:
    """`data` as base64 text."""
    return base64.b64encode(data).decode("ascii")
