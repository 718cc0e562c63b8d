"""The embedded mock of Roboflow's annotation upload, ``POST /dataset/{project}/annotate/{id}``,
and of the image read-back, ``GET /{workspace}/{project}/images/{id}``, that shows what
a project kept.

The upload takes what roboflow-python's ``save_annotation`` sends: ``api_key``, ``name``
(the annotation file's name), ``prediction`` and ``overwrite`` in the query, and the
annotation as the body, either as it is (``text/plain``) or wrapped as
``{"annotationFile": ..., "labelmap": ...}`` (newer clients). A Pascal VOC XML file
(``.xml``) or a one-image COCO JSON file (``.json``) is checked as Roboflow would (its
file name is the image's, every object has a label and a box inside the image), its
boxes are kept in Roboflow's centre form, and the answer is ``{"success": true}``; an
image annotated already answers 409 unless ``overwrite=true``. The upload applies the
server's fault injection as the image upload does (a dropped connection after the
annotation was kept, so that a client's retry meets the 409), and with
`MockConfig.drop_annotation_boxes` it answers success but keeps no boxes, as users
report Roboflow doing: only reading the image back tells.
"""

from __future__ import annotations

import json
import math
from typing import Any
from xml.etree import ElementTree

from aiohttp import web

from .dataset import MockAnnotation, MockBox, MockImage
from .replies import roboflow_error
from .roboflow import MockRoboflow, dropped

__all__ = [
    "MAX_ANNOTATION_BYTES",
    "BadAnnotation",
    "read_annotation",
    "serve_annotate",
    "serve_image",
]

MAX_ANNOTATION_BYTES = 1024 * 1024
"""The largest annotation body read (a VOC file of thousands of boxes is far smaller)."""
_CONFLICT = "Image was already annotated."


class BadAnnotation(ValueError):
    """An annotation Roboflow would refuse (400); the message says why."""


async def serve_annotate(request: web.Request, *, roboflow: MockRoboflow) -> web.StreamResponse:
    """``POST /dataset/{project}/annotate/{image_id}``: key, project, image, annotation,
    fault, then keep it (or 409)."""
    stats = roboflow.stats
    stats.annotate_requests += 1
    found = _find_image(request, roboflow)
    if isinstance(found, web.Response):
        return found
    body = await request.read()
    try:
        annotation = read_annotation(body, request.query.get("name", ""), found)
    except BadAnnotation as bad:
        return roboflow_error(400, str(bad))
    fault = await roboflow.fault(malformed='{"success": ')
    if fault.answer is not None:
        return fault.answer
    if roboflow.config.drop_annotation_boxes:
        annotation = MockAnnotation(annotation.width, annotation.height, ())
    kept = found.annotate(
        annotation,
        prediction=_flag(request, "prediction") or _flag(request, "is_prediction"),
        overwrite=_flag(request, "overwrite"),
    )
    if not kept:
        stats.annotation_conflicts += 1
        return roboflow_error(409, _CONFLICT, type="InvalidImageException")
    stats.annotations += 1
    stats.annotations_by_image[found.id] = stats.annotations_by_image.get(found.id, 0) + 1
    if fault.drops:  # kept, but the client never hears it
        return dropped(request)
    return web.json_response({"success": True})


async def serve_image(request: web.Request, *, roboflow: MockRoboflow) -> web.Response:
    """``GET /{workspace}/{project}/images/{image_id}``: the image as the project holds it.

    ``{"image": {"id", "name", "split", "tags", "batch", "annotation"}}``; the annotation
    is left out when the image has none, and has no boxes when they were dropped.
    """
    roboflow.stats.image_reads += 1
    found = _find_image(request, roboflow)
    if isinstance(found, web.Response):
        return found
    image: dict[str, Any] = {
        "id": found.id,
        "name": found.name,
        "split": found.split,
        "tags": list(found.tags),
        "batch": found.batch,
    }
    if found.annotation is not None:
        image["annotation"] = found.annotation.to_json()
    return web.json_response({"image": image})


def read_annotation(body: bytes, name: str, image: MockImage) -> MockAnnotation:
    """The annotation a request's body holds for `image`, by its file `name`'s kind.

    Raises `BadAnnotation` with the reason Roboflow would give.
    """
    name = name.strip()
    if not name:
        raise BadAnnotation("name is required: the annotation file's name.")
    kind = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if kind not in ("xml", "json"):
        raise BadAnnotation(f"unsupported annotation format {name!r}: use .xml or .json.")
    if len(body) > MAX_ANNOTATION_BYTES:
        raise BadAnnotation(f"the annotation is larger than {MAX_ANNOTATION_BYTES} bytes.")
    try:
        text = _unwrap(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadAnnotation("the annotation is not UTF-8 text.") from None
    if not text.strip():
        raise BadAnnotation("the annotation is empty.")
    return _read_voc(text, image) if kind == "xml" else _read_coco(text, image)


def _find_image(request: web.Request, roboflow: MockRoboflow) -> MockImage | web.Response:
    """The image the path names, or the answer that refuses it (401, 404)."""
    refusal = roboflow.refused(request)
    if refusal is not None:
        return refusal
    found = roboflow.dataset.find(request.match_info["project"], request.match_info["image_id"])
    return found if found is not None else roboflow_error(404, "Image not found.")


def _unwrap(text: str) -> str:
    """The annotation file of a body, unwrapped from ``{"annotationFile": ...}``."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        wrapped = json.loads(text)
    except ValueError:
        return text
    if isinstance(wrapped, dict) and isinstance(wrapped.get("annotationFile"), str):
        return str(wrapped["annotationFile"])
    return text


def _read_voc(text: str, image: MockImage) -> MockAnnotation:
    """A Pascal VOC file: ``<filename>``, an optional ``<size>``, ``<object>``s."""
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise BadAnnotation("the annotation XML must not declare a DTD or entities.")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as problem:
        raise BadAnnotation(f"the annotation is not valid XML: {problem}.") from None
    if root.tag != "annotation":
        raise BadAnnotation(f"the XML's root is <{root.tag}>, not <annotation>.")
    _check_file_name((root.findtext("filename") or "").strip(), image)
    size = root.find("size")
    width, height = image.size or (None, None)
    if size is not None:
        width = int(_number(size.findtext("width"), "<size><width>", positive=True))
        height = int(_number(size.findtext("height"), "<size><height>", positive=True))
    boxes = []
    for number, item in enumerate(root.findall("object"), 1):
        label = (item.findtext("name") or "").strip()
        bndbox = item.find("bndbox")
        if not label or bndbox is None:
            raise BadAnnotation(f"object {number} needs a <name> and a <bndbox>.")
        left, top, right, bottom = (
            _number(bndbox.findtext(tag), f"object {number}'s <{tag}>")
            for tag in ("xmin", "ymin", "xmax", "ymax")
        )
        boxes.append(_box(label, left, top, right, bottom, width, height, number))
    return MockAnnotation(width, height, tuple(boxes))


def _read_coco(text: str, image: MockImage) -> MockAnnotation:
    """A COCO file of one image: ``images``, ``annotations`` (``bbox`` [x, y, w, h]) and
    ``categories``."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise BadAnnotation("the annotation is not valid JSON.") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], dict):
        raise BadAnnotation("a COCO annotation must describe exactly one image.")
    entry = images[0]
    _check_file_name(str(entry.get("file_name") or "").strip(), image)
    width, height = image.size or (None, None)
    if "width" in entry or "height" in entry:
        width = int(_number(entry.get("width"), "the image's width", positive=True))
        height = int(_number(entry.get("height"), "the image's height", positive=True))
    labels = {
        item.get("id"): str(item.get("name"))
        for item in doc.get("categories") or []
        if isinstance(item, dict) and item.get("name")
    }
    boxes = []
    for number, item in enumerate(doc.get("annotations") or [], 1):
        bbox = item.get("bbox") if isinstance(item, dict) else None
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise BadAnnotation(f"annotation {number} needs a bbox [x, y, width, height].")
        if "id" in entry and item.get("image_id") != entry["id"]:
            raise BadAnnotation(f"annotation {number} is not of the file's image.")
        label = labels.get(item.get("category_id"))
        if label is None:
            raise BadAnnotation(f"annotation {number}'s category_id is not in categories.")
        left, top, box_w, box_h = (_number(v, f"annotation {number}'s bbox") for v in bbox)
        boxes.append(_box(label, left, top, left + box_w, top + box_h, width, height, number))
    return MockAnnotation(width, height, tuple(boxes))


def _check_file_name(file_name: str, image: MockImage) -> None:
    if not file_name:
        raise BadAnnotation("the annotation names no file (<filename>, file_name).")
    if file_name != image.name:
        raise BadAnnotation(f"the annotation is for {file_name!r}, not {image.name!r}.")


def _box(
    label: str,
    left: float,
    top: float,
    right: float,
    bottom: float,
    width: int | None,
    height: int | None,
    number: int,
) -> MockBox:
    """A box from its corners, in centre form; refused when inverted or outside the image."""
    if left >= right or top >= bottom:
        raise BadAnnotation(f"object {number}'s box is empty or inverted.")
    outside_x = width is not None and right > width
    outside_y = height is not None and bottom > height
    if left < 0 or top < 0 or outside_x or outside_y:
        raise BadAnnotation(f"object {number}'s box is outside the {width}x{height} image.")
    return MockBox(label, (left + right) / 2, (top + bottom) / 2, right - left, bottom - top)


def _number(value: object, what: str, *, positive: bool = False) -> float:
    """A finite number from XML text or JSON (``positive``: also > 0), or `BadAnnotation`."""
    try:
        number = float(value) if isinstance(value, (str, int, float)) else math.nan
    except ValueError:
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or (positive and number <= 0):
        raise BadAnnotation(f"{what} must be a {'positive ' if positive else ''}number.")
    return number


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").strip().lower() == "true"
