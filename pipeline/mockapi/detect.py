"""The embedded mock of Roboflow's hosted detection: ``POST /{project}/{version}``.

It takes the request as serverless.roboflow.com (and detect.roboflow.com) does, the
image's base64 as a form-encoded body (what ``curl -d @-`` and the real clients send)
with ``api_key``, ``confidence`` and ``overlap`` (0 to 100) in the query, and answers as
it does: ``{"time", "image": {"width", "height"}, "predictions": [...], "inference_id"}``,
each prediction's box in centre form. Its "model" finds exactly the shapes the mock draws
(`pipeline.mockapi.shapes`) from the pixels alone: it reads each free cell's centre
pixel, knows a class by its exact colour, and measures the run of that colour through
the centre (a pixel of the colour elsewhere is a stray, left out), so the boxes are the
drawn ones in the PNG and in any lossless re-encoding, and the resized ones after a
nearest-neighbour resize. Nothing is remembered between requests. The key, the model,
the body (400), a size limit (413) and the fault injection are checked as upload's are.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from PIL import Image, ImageChops, UnidentifiedImageError

from .replies import roboflow_error
from .roboflow import MockRoboflow, dropped
from .shapes import Box, class_color, free_cells

__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_OVERLAP",
    "Detected",
    "RefusedImage",
    "box_confidence",
    "detect_boxes",
    "detect_image",
    "serve_detect",
]

DEFAULT_CONFIDENCE = 40.0  # percent, as Roboflow's hosted API defaults it
DEFAULT_OVERLAP = 30.0
_SAME = [255] + [0] * 255  # a lookup table: 255 where two pixels do not differ at all


@dataclass(frozen=True, slots=True)
class Detected:
    """What detection made of an image: its bytes' sha256, its size and the boxes found."""

    sha256: str
    width: int
    height: int
    boxes: list[Box]


class RefusedImage(Exception):
    """A detection body Roboflow would refuse: its `status` (400, 413) and `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def serve_detect(request: web.Request, *, roboflow: MockRoboflow) -> web.StreamResponse:
    """``POST /{project}/{version}``: key, query, model, image, fault, then the answer.

    Decoding and detection run in a thread.
    """
    config, stats = roboflow.config, roboflow.stats
    stats.detect_requests += 1
    refusal = roboflow.refused_key(request)
    if refusal is not None:
        return refusal
    confidence = _percent(request.query.get("confidence"), DEFAULT_CONFIDENCE)
    overlap = _percent(request.query.get("overlap"), DEFAULT_OVERLAP)
    if confidence is None or overlap is None:
        return roboflow_error(400, "confidence and overlap must be numbers from 0 to 100.")
    if request.query.get("format", "json") != "json":
        return roboflow_error(400, "format must be json.")
    model = f"{request.match_info['project']}/{request.match_info['version']}"
    if config.detect_models is not None and model not in config.detect_models:
        return roboflow_error(404, f"Model {model} not found.")
    body = await request.read()
    started = time.perf_counter()
    try:
        found = await asyncio.to_thread(
            detect_image, body, config.detect_classes, config.detect_max_pixels
        )
    except RefusedImage as refused:
        return roboflow_error(refused.status, refused.message)
    spent = time.perf_counter() - started
    fault = await roboflow.fault(malformed='{"time": 0.1, "predictions": [')
    if fault.answer is not None:
        return fault.answer
    stats.detections += 1
    stats.detections_by_sha256[found.sha256] = stats.detections_by_sha256.get(found.sha256, 0) + 1
    if fault.drops:  # detected (and billed), but the client never hears it
        return dropped(request)
    return web.json_response(_answer(found, model, confidence / 100, spent))


def detect_image(body: bytes, classes: Sequence[str], max_pixels: int | None) -> Detected:
    """Decode a detection body (the image's base64) and find the shapes in it.

    Raises `RefusedImage`: 400 for a body that is not base64 or not an image, 413 for an
    image of more than `max_pixels` pixels.
    """
    text = b"".join(body.split())  # base64 wrapped in lines is still the image
    if not text:
        raise RefusedImage(400, "the body must be the image, base64 encoded.")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RefusedImage(400, "the body is not valid base64.") from None
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if max_pixels is not None and width * height > max_pixels:
                raise RefusedImage(
                    413, f"image too large: {width}x{height} pixels, at most {max_pixels}."
                )
            image = opened.convert("RGB")
    except Image.DecompressionBombError:
        raise RefusedImage(413, "image too large to decode.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise RefusedImage(400, "the body is not an image.") from None
    digest = hashlib.sha256(data).hexdigest()
    return Detected(digest, width, height, detect_boxes(image, classes))


def detect_boxes(image: Image.Image, classes: Sequence[str]) -> list[Box]:
    """The shapes of `classes`' colours through the centres of an RGB image's free cells.

    A cell whose centre has the colour of the picture's centre (the fill) holds nothing:
    the mock does not draw a shape in the fill's colour.
    """
    if min(image.size) < 1:
        return []
    colours = {class_color(class_id): class_id for class_id in range(len(classes))}
    fill = image.getpixel((image.width // 2, image.height // 2))
    boxes = []
    for left, top, width, height in free_cells(image.width, image.height):
        if min(width, height) < 1:
            continue
        x, y = width // 2, height // 2
        pixel = image.getpixel((left + x, top + y))
        if not isinstance(pixel, tuple) or len(pixel) != 3 or pixel == fill:
            continue
        class_id = colours.get((pixel[0], pixel[1], pixel[2]))
        if class_id is None:
            continue
        cell = image.crop((left, top, left + width, top + height))
        x0, y0, x1, y1 = _run_through(_pixels_of(cell, class_color(class_id)), x, y)
        boxes.append(Box(classes[class_id], class_id, left + x0, top + y0, x1 - x0, y1 - y0))
    return boxes


def box_confidence(box: Box) -> float:
    """The "model's" confidence in a box: from 0.5 to 0.99, the same for the same box."""
    key = f"{box.label}\0{box.left},{box.top},{box.width},{box.height}"
    draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")
    return round(0.5 + (draw % 50) / 100, 2)


def _answer(found: Detected, model: str, threshold: float, spent: float) -> dict[str, Any]:
    """Roboflow's answer: the image's size and the boxes at or above `threshold`."""
    predictions = []
    for box in found.boxes:
        confidence = box_confidence(box)
        if confidence < threshold:
            continue
        key = f"{found.sha256}\0{box.label}\0{box.left},{box.top}"
        predictions.append(
            {
                **box.centre_form(),
                "confidence": confidence,
                "class": box.label,
                "class_id": box.class_id,
                "detection_id": _uuid(key),
            }
        )
    return {
        "time": spent,
        "image": {"width": found.width, "height": found.height},
        "predictions": predictions,
        "inference_id": _uuid(f"{model}\0{found.sha256}"),
    }


def _pixels_of(cell: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """A mask ("L"): 255 where `cell` is exactly `colour`, 0 elsewhere."""
    red, green, blue = ImageChops.difference(cell, Image.new("RGB", cell.size, colour)).split()
    return ImageChops.lighter(ImageChops.lighter(red, green), blue).point(_SAME)


def _run_through(mask: Image.Image, x: int, y: int) -> tuple[int, int, int, int]:
    """The box (right and bottom exclusive) of the mask's pixels around (`x`, `y`).

    The columns holding any pixel, as one run through `x`, and the rows likewise, taken
    again within that box until it holds still: a convex shape is found at once, and a
    stray pixel apart from it is left out.
    """
    box = (0, 0, mask.width, mask.height)
    while True:
        columns, rows = mask.crop(box).getprojection()
        left, right = _run(columns, x - box[0])
        top, bottom = _run(rows, y - box[1])
        found = (box[0] + left, box[1] + top, box[0] + right, box[1] + bottom)
        if found == box:
            return box
        box = found


def _run(flags: Sequence[int], at: int) -> tuple[int, int]:
    """The run of set flags through index `at`: its start and its end (exclusive)."""
    start, end = at, at + 1
    while start > 0 and flags[start - 1]:
        start -= 1
    while end < len(flags) and flags[end]:
        end += 1
    return start, end


def _percent(value: str | None, default: float) -> float | None:
    """A 0-100 query value (`default` when absent), or None when it is not one."""
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and 0 <= number <= 100 else None


def _uuid(key: str) -> str:
    """A UUID-shaped id, the same for the same key."""
    return str(uuid.UUID(bytes=hashlib.sha256(key.encode()).digest()[:16]))
