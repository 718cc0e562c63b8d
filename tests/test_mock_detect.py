"""The mock's detection, annotation upload and image read-back: the shapes it draws, found
again exactly, and Roboflow's wire forms over real loopback HTTP."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageChops

from pipeline.mockapi.detect import box_confidence, detect_boxes, detect_image
from pipeline.mockapi.image import draw_image, mock_color, paint
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.mockapi.shapes import (
    DEFAULT_DETECT_CLASSES,
    MAX_DETECT_CLASSES,
    MIN_SHAPE_PX,
    Box,
    class_color,
    free_cells,
    plan_shapes,
)

KEY = "mock-key"
CLASSES = DEFAULT_DETECT_CLASSES
PROMPT = "a dog and a cat under maple trees by a car"
IMAGE_NAME = "abc123-0.png"
WORDS = [*CLASSES, "maple", "trees", "leaves", "a", "the", "under", "Dogs", "CAR", "street"]
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def decode(data: bytes) -> Image.Image:
    """An image's pixels as RGB."""
    with Image.open(io.BytesIO(data)) as opened:
        return opened.convert("RGB")


def encode(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def pixel_box(image: Image.Image, colour: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(left, top, width, height) of every pixel of exactly `colour`: a shape's drawn extent."""
    channels = [
        band.point([255 if value == wanted else 0 for value in range(256)])
        for band, wanted in zip(image.split(), colour, strict=True)
    ]
    found = ImageChops.darker(ImageChops.darker(channels[0], channels[1]), channels[2]).getbbox()
    assert found is not None
    return found[0], found[1], found[2] - found[0], found[3] - found[1]


def parsed(text: str) -> Any:
    """An answer's JSON, or its text when it is not JSON (a malformed answer)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


PROMPTS = st.builds(" ".join, st.lists(st.sampled_from(WORDS) | st.text(max_size=8), max_size=8))


# ---- shapes and their detection (no server) ----------------------------------------------------


def test_palette_is_distinct_and_not_ink() -> None:
    """Every class colour differs from the others and from black and white ink."""
    colours = [class_color(class_id) for class_id in range(MAX_DETECT_CLASSES)]
    assert len(set(colours)) == MAX_DETECT_CLASSES
    assert (0, 0, 0) not in colours
    assert (255, 255, 255) not in colours


def test_prompt_names_classes_by_substring_in_vocabulary_order() -> None:
    """ "trees" shows a tree, "Maple LEAF" a leaf; the first three named classes get a cell."""
    shapes = plan_shapes("Maple LEAF and trees, a cat, a dog", 0, 256, 256, CLASSES, (1, 2, 3))
    assert [shape.box.label for shape in shapes] == ["tree", "leaf", "dog"]
    assert [shape.color for shape in shapes] == [
        class_color(CLASSES.index(name)) for name in ("tree", "leaf", "dog")
    ]
    assert plan_shapes("an empty road", 0, 256, 256, CLASSES, (1, 2, 3)) == []


@settings(max_examples=150, deadline=None)
@given(
    prompt=PROMPTS,
    index=st.integers(0, 20),
    width=st.integers(1, 400),
    height=st.integers(1, 400),
)
# anti-aliased prompt text once held a pixel of a class's exact colour (found on CI)
@example(prompt="flower clock cup bottle cup  cat bird", index=0, width=220, height=48)
def test_detection_finds_exactly_the_drawn_shapes(
    prompt: str, index: int, width: int, height: int
) -> None:
    """Draw, then detect: the boxes are the planned ones, each the exact extent of its
    colour's pixels, inside its cell with a margin, holding the cell's centre; the middle
    stays the fill colour."""
    fill = mock_color(prompt, None)
    image = decode(draw_image(prompt, None, index=index, width=width, height=height))
    planned = plan_shapes(prompt, index, width, height, CLASSES, fill)
    assert detect_boxes(image, CLASSES) == [shape.box for shape in planned]
    assert image.getpixel((width // 2, height // 2)) == fill
    for shape, (left, top, cell_w, cell_h) in zip(planned, free_cells(width, height), strict=False):
        box = shape.box
        assert pixel_box(image, shape.color) == (box.left, box.top, box.width, box.height)
        assert min(box.width, box.height) >= MIN_SHAPE_PX
        assert left < box.left
        assert box.left + box.width < left + cell_w
        assert top < box.top
        assert box.top + box.height < top + cell_h
        assert box.left <= left + cell_w // 2 < box.left + box.width
        assert box.top <= top + cell_h // 2 < box.top + box.height
    if min(width, height) < 30:
        assert planned == []


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        pytest.param("PNG", {"compress_level": 0}, id="png-uncompressed"),
        pytest.param("WEBP", {"lossless": True}, id="webp-lossless"),
        pytest.param("BMP", {}, id="bmp"),
        pytest.param("TIFF", {}, id="tiff"),
    ],
)
def test_lossless_re_encodings_give_the_same_boxes(fmt: str, options: dict[str, Any]) -> None:
    """Boxes come from pixels alone: a lossless re-encoding (or RGBA) is detected the same."""
    drawn = draw_image(PROMPT, None, index=2, width=300, height=220)
    expected = detect_image(base64.b64encode(drawn), CLASSES, None).boxes
    assert len(expected) == 3
    for image in (decode(drawn), decode(drawn).convert("RGBA")):
        again = encode(image, fmt, **options)
        assert detect_image(base64.b64encode(again), CLASSES, None).boxes == expected


@settings(max_examples=80, deadline=None)
@given(
    prompt=PROMPTS,
    index=st.integers(0, 5),
    size=st.tuples(st.integers(96, 360), st.integers(96, 360)),
    scale=st.tuples(st.floats(0.5, 2.0), st.floats(0.5, 2.0)),
)
def test_nearest_neighbour_resize_gives_the_resized_boxes(
    prompt: str, index: int, size: tuple[int, int], scale: tuple[float, float]
) -> None:
    """After a nearest-neighbour resize the same classes are found, each box the extent
    of its shape's pixels in the resized image."""
    width, height = size
    drawn = decode(draw_image(prompt, None, index=index, width=width, height=height))
    planned = plan_shapes(prompt, index, width, height, CLASSES, mock_color(prompt, None))
    resized_size = (round(width * scale[0]), round(height * scale[1]))
    resized = drawn.resize(resized_size, Image.Resampling.NEAREST)
    found = detect_boxes(resized, CLASSES)
    assert [box.label for box in found] == [shape.box.label for shape in planned]
    for box, shape in zip(found, planned, strict=True):
        assert (box.left, box.top, box.width, box.height) == pixel_box(resized, shape.color)


def test_a_class_in_the_fill_colour_is_not_drawn_nor_found() -> None:
    """A shape in the picture's own fill colour could not be seen: it is left out, and the
    detection does not take the background for it."""
    tree = class_color(CLASSES.index("tree"))
    assert [s.box.label for s in plan_shapes(PROMPT, 0, 256, 256, CLASSES, tree)] == [
        "car",
        "dog",
    ]
    image = decode(paint(PROMPT, tree, None, index=0, width=256, height=256))
    assert [box.label for box in detect_boxes(image, CLASSES)] == ["car", "dog"]


def test_the_vocabulary_is_the_callers() -> None:
    """Other classes, other shapes: the vocabulary is a parameter of drawing and detection."""
    classes = ("gnome", "teapot")
    drawn = draw_image(
        "a Gnome and a teapot", None, index=0, width=200, height=200, classes=classes
    )
    found = detect_image(base64.b64encode(drawn), classes, None).boxes
    assert [(box.label, box.class_id) for box in found] == [("gnome", 0), ("teapot", 1)]
    assert detect_image(base64.b64encode(drawn), CLASSES, None).boxes != found


def test_a_stray_pixel_of_the_colour_is_left_out() -> None:
    """A pixel of a shape's colour apart from it does not stretch the box."""
    image = decode(draw_image(PROMPT, None, index=0, width=300, height=300))
    [first, *_] = detect_boxes(image, CLASSES)
    left, top, _, _ = free_cells(300, 300)[0]
    image.putpixel((left + 1, top + 1), class_color(first.class_id))
    assert detect_boxes(image, CLASSES)[0] == first


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        pytest.param({"detect_classes": ("Car",)}, "lower-case", id="upper-case"),
        pytest.param({"detect_classes": ("car", "car")}, "distinct", id="repeated"),
        pytest.param({"detect_classes": ("",)}, "non-empty", id="empty-name"),
        pytest.param({"detect_max_pixels": 0}, "detect_max_pixels", id="no-pixels"),
    ],
)
def test_bad_detection_settings_are_refused(changes: dict[str, Any], words: str) -> None:
    """The mock refuses a vocabulary it could not draw, and a pixel limit below one."""
    with pytest.raises(ValueError, match=words):
        MockConfig(**changes)


# ---- POST /{project}/{version} -----------------------------------------------------------------


@asynccontextmanager
async def serve(**config: Any) -> AsyncIterator[tuple[MockServer, aiohttp.ClientSession]]:
    """A running mock (key `KEY`, `config` on top) and a session to talk to it."""
    async with (
        MockServer(MockConfig(**{"api_key": KEY, **config})) as server,
        aiohttp.ClientSession() as session,
    ):
        yield server, session


async def post_detect(
    server: MockServer,
    session: aiohttp.ClientSession,
    image: bytes,
    model: str = "leaves/3",
    **query: str,
) -> tuple[int, Any, Mapping[str, str]]:
    """POST an image as the real clients do: its base64 as a form-encoded body."""
    async with session.post(
        f"{server.base_url}/{model}",
        params={"api_key": KEY, **query},
        data=base64.b64encode(image),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as resp:
        return resp.status, parsed(await resp.text()), resp.headers


async def test_detection_answers_as_roboflow_for_a_generated_image() -> None:
    """An image the mock generated (its own vocabulary) comes back with Roboflow's answer:
    the image's size, one prediction per drawn shape in centre form, deterministic ids."""
    classes = ("gnome", "teapot", "kettle")
    prompt = "a gnome pours tea from a kettle"
    async with serve(detect_classes=classes) as (server, session):
        async with session.post(
            f"{server.base_url}/synthetic-image",
            params={"api_key": KEY},
            json={"prompt": prompt, "size": "1024x768"},
        ) as resp:
            url = (await resp.json())["data"][0]["url"]
        async with session.get(url) as resp:
            png = await resp.read()
        status, payload, _ = await post_detect(server, session, png, confidence="0")
        again = await post_detect(server, session, png, confidence="0")
        stats = server.stats
    planned = plan_shapes(prompt, 0, 256, 192, classes, mock_color(prompt, None))
    assert status == 200
    assert set(payload) == {"time", "image", "predictions", "inference_id"}
    assert payload["image"] == {"width": 256, "height": 192}
    assert isinstance(payload["time"], float)
    assert UUID.match(payload["inference_id"])
    assert [
        {key: p[key] for key in ("x", "y", "width", "height", "class", "class_id")}
        for p in payload["predictions"]
    ] == [
        {**shape.box.centre_form(), "class": shape.box.label, "class_id": shape.box.class_id}
        for shape in planned
    ]
    assert [p["class"] for p in payload["predictions"]] == ["gnome", "kettle"]
    for prediction, shape in zip(payload["predictions"], planned, strict=True):
        assert prediction["confidence"] == box_confidence(shape.box)
        assert 0.5 <= prediction["confidence"] <= 0.99
        assert UUID.match(prediction["detection_id"])
    assert again[1]["predictions"] == payload["predictions"]
    assert again[1]["inference_id"] == payload["inference_id"]
    assert stats.detect_requests == 2
    assert stats.detections_by_sha256 == {hashlib.sha256(png).hexdigest(): 2}


def test_centre_form_is_roboflows() -> None:
    """x = x0 + w/2 where x0 .. x0+w-1 are the shape's columns (and likewise y)."""
    box = Box("tree", 2, left=10, top=20, width=5, height=8)
    assert box.centre_form() == {"x": 12.5, "y": 24.0, "width": 5.0, "height": 8.0}


async def test_predictions_below_the_confidence_are_left_out() -> None:
    """``confidence`` (percent) drops predictions below it; 40 by default."""
    png = draw_image(PROMPT, None, index=0, width=256, height=256)
    boxes = detect_image(base64.b64encode(png), CLASSES, None).boxes
    scores = sorted(box_confidence(box) for box in boxes)
    async with serve() as (server, session):
        everything = await post_detect(server, session, png, confidence="0")
        none = await post_detect(server, session, png, confidence="100")
        cut = await post_detect(server, session, png, confidence=str(scores[0] * 100 + 0.5))
        default = await post_detect(server, session, png)
    assert len(everything[1]["predictions"]) == 3
    assert none[1]["predictions"] == []
    assert [p["confidence"] for p in cut[1]["predictions"]] == [
        p["confidence"] for p in everything[1]["predictions"] if p["confidence"] > scores[0]
    ]
    assert [p["confidence"] for p in default[1]["predictions"]] == [
        p["confidence"] for p in everything[1]["predictions"] if p["confidence"] >= 0.4
    ]


@pytest.mark.parametrize(
    ("config", "model", "query", "body", "status", "words"),
    [
        pytest.param({}, "leaves/3", {"api_key": "wrong"}, None, 401, "api_key", id="bad-key"),
        pytest.param(
            {"detect_models": frozenset({"leaves/1"})},
            "leaves/3",
            {},
            None,
            404,
            "leaves/3",
            id="unknown-model",
        ),
        pytest.param({}, "leaves/3", {}, b"not base64!", 400, "base64", id="not-base64"),
        pytest.param({}, "leaves/3", {}, b"", 400, "base64", id="empty-body"),
        pytest.param(
            {},
            "leaves/3",
            {},
            base64.b64encode(b"hello"),
            400,
            "not an image",
            id="not-an-image",
        ),
        pytest.param({}, "leaves/3", {"confidence": "high"}, None, 400, "confidence", id="conf"),
        pytest.param({}, "leaves/3", {"overlap": "101"}, None, 400, "overlap", id="overlap"),
        pytest.param({}, "leaves/3", {"format": "image"}, None, 400, "format", id="format"),
        pytest.param(
            {"detect_max_pixels": 64 * 64 - 1},
            "leaves/3",
            {},
            None,
            413,
            "image too large",
            id="too-large",
        ),
    ],
)
async def test_detection_refuses_what_roboflow_would(
    config: dict[str, Any],
    model: str,
    query: dict[str, str],
    body: bytes | None,
    status: int,
    words: str,
) -> None:
    """Bad key 401, unknown model 404, a bad body or query 400, too many pixels 413:
    ``{"error": {"message"}}``, and nothing detected."""
    png = draw_image(PROMPT, None, index=0, width=64, height=64)
    async with serve(**config) as (server, session):
        async with session.post(
            f"{server.base_url}/{model}",
            params={"api_key": KEY, **query},
            data=base64.b64encode(png) if body is None else body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as resp:
            got, payload = resp.status, await resp.json()
        assert server.stats.detections == 0
    assert got == status
    assert words in payload["error"]["message"]


async def test_a_known_model_and_an_image_within_the_limit_are_served() -> None:
    """``detect_models`` names what is served; an image of exactly the limit passes."""
    png = draw_image(PROMPT, None, index=0, width=64, height=64)
    config = {"detect_models": frozenset({"leaves/1"}), "detect_max_pixels": 64 * 64}
    async with serve(**config) as (server, session):
        status, _, _ = await post_detect(server, session, png, model="leaves/1")
    assert status == 200


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        pytest.param("429", 429, id="429"),
        pytest.param("500", 500, id="500"),
        pytest.param("502", 502, id="502-retryable"),
        pytest.param("503", 503, id="503"),
        pytest.param("504", 504, id="504"),
        pytest.param("malformed", 200, id="malformed"),
        pytest.param("wrong_shape", 200, id="wrong-shape"),
        pytest.param("slow", 200, id="slow"),
    ],
)
async def test_detection_faults(fault: str, status: int) -> None:
    """The injected faults answer as upload's do: 429 with Retry-After, 5xx (502 says
    retryable), JSON cut short or of the wrong shape, a slow but whole answer."""
    png = draw_image(PROMPT, None, index=0, width=96, height=96)
    config = {"error_rate": 1.0, "faults": {fault: 1.0}, "slow_s": 0.0, "retry_after_s": 2.0}
    async with serve(**config) as (server, session):
        got, payload, headers = await post_detect(server, session, png, confidence="0")
        detections = server.stats.detections
    assert got == status
    if fault == "429":
        assert headers["Retry-After"] == "2"
    if fault == "502":
        assert payload["retryable"] is True
    if fault == "malformed":
        assert isinstance(payload, str)
    if fault == "wrong_shape":
        assert "predictions" not in payload
    if fault == "slow":
        assert len(payload["predictions"]) == 3
    assert detections == (1 if fault == "slow" else 0)


async def test_a_dropped_detection_is_counted_once_per_attempt() -> None:
    """A dropped answer was still a detection (billed): the counter per image says so."""
    png = draw_image(PROMPT, None, index=0, width=96, height=96)
    async with serve(error_rate=1.0, faults={"drop": 1.0}) as (server, session):
        with pytest.raises(aiohttp.ClientError):
            await post_detect(server, session, png)
        stats = server.stats
    assert stats.detections_by_sha256 == {hashlib.sha256(png).hexdigest(): 1}


async def test_detection_route_does_not_shadow_the_others() -> None:
    """Two segments, the second a number: anything else is not a detection request."""
    async with serve() as (server, session):
        async with session.post(f"{server.base_url}/leaves/three", params={"api_key": KEY}) as r:
            not_a_version = r.status
        async with session.get(f"{server.base_url}/_stats") as r:
            stats = await r.json()
    assert not_a_version == 404
    assert stats["detect_requests"] == 0


# ---- POST /dataset/{project}/annotate/{image_id} and the read-back -----------------------------


def voc(
    objects: list[tuple[str, float, float, float, float]],
    *,
    filename: str = IMAGE_NAME,
    size: tuple[int, int] | None = (64, 48),
) -> str:
    """A Pascal VOC file as the label stage writes it."""
    parts = ["<annotation>", "<folder>synthaug</folder>", f"<filename>{filename}</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height></size>")
    for name, xmin, ymin, xmax, ymax in objects:
        parts.append(
            f"<object><name>{name}</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    return "".join([*parts, "</annotation>"])


def coco(bboxes: list[list[Any]], *, file_name: str = IMAGE_NAME, images: int = 1) -> str:
    """A COCO file of one image (or more, to be refused)."""
    return json.dumps(
        {
            "images": [
                {"id": n, "file_name": file_name, "width": 64, "height": 48} for n in range(images)
            ],
            "categories": [{"id": 1, "name": "leaf"}],
            "annotations": [
                {"id": n, "image_id": 0, "category_id": 1, "bbox": bbox}
                for n, bbox in enumerate(bboxes)
            ],
        }
    )


GOOD = voc([("leaf", 10, 4, 30, 20), ("tree", 0, 0, 64, 48)])


@pytest.fixture
def png() -> bytes:
    """The uploaded image: 64 × 48."""
    return encode(Image.new("RGB", (64, 48), (200, 120, 40)))


@asynccontextmanager
async def uploaded(
    png: bytes, **config: Any
) -> AsyncIterator[tuple[MockServer, aiohttp.ClientSession, str]]:
    """A running mock holding `png` (64 × 48) as ``IMAGE_NAME`` in project ``leaves``
    (put there as an upload puts it, so that faults meet only the annotation), and its id."""
    async with serve(**config) as (server, session):
        image, _ = server.dataset.add(
            "leaves", IMAGE_NAME, png, size=(64, 48), split="train", batch="b1"
        )
        yield server, session, image.id


async def post_annotation(
    server: MockServer,
    session: aiohttp.ClientSession,
    image_id: str,
    body: str | bytes,
    *,
    project: str = "leaves",
    **query: str,
) -> tuple[int, Any]:
    """POST an annotation as roboflow-python's ``save_annotation`` does (text/plain)."""
    params = {"api_key": KEY, "name": "abc123-0.xml", **query}
    async with session.post(
        f"{server.base_url}/dataset/{project}/annotate/{image_id}",
        params={key: value for key, value in params.items() if value is not None},
        data=io.BytesIO(body.encode() if isinstance(body, str) else body),
        headers={"Content-Type": "text/plain"},
    ) as resp:
        return resp.status, parsed(await resp.text())


async def read_back(
    server: MockServer, session: aiohttp.ClientSession, image_id: str, key: str = KEY
) -> tuple[int, Any]:
    async with session.get(
        f"{server.base_url}/my-workspace/leaves/images/{image_id}", params={"api_key": key}
    ) as resp:
        return resp.status, await resp.json()


async def test_an_annotation_is_kept_in_centre_form_and_read_back(png: bytes) -> None:
    """VOC corners become Roboflow's centre-form boxes; the read-back shows them."""
    async with uploaded(png) as (server, session, image_id):
        before = await read_back(server, session, image_id)
        answer = await post_annotation(server, session, image_id, GOOD, prediction="true")
        after = await read_back(server, session, image_id)
        image = server.dataset.find("leaves", image_id)
        stats = server.stats
    assert answer == (200, {"success": True})
    assert before == (
        200,
        {
            "image": {
                "id": image_id,
                "name": IMAGE_NAME,
                "split": "train",
                "tags": [],
                "batch": "b1",
            }
        },
    )
    boxes = [
        {"label": "leaf", "x": 20.0, "y": 12.0, "width": 20.0, "height": 16.0},
        {"label": "tree", "x": 32.0, "y": 24.0, "width": 64.0, "height": 48.0},
    ]
    assert after[1]["image"]["annotation"] == {"width": 64, "height": 48, "boxes": boxes}
    assert image is not None
    assert image.annotation_is_prediction
    assert (stats.annotate_requests, stats.annotations) == (1, 1)
    assert stats.annotations_by_image == {image_id: 1}


async def test_a_second_annotation_is_a_conflict_unless_overwritten(png: bytes) -> None:
    """The second annotation of an image: 409 as Roboflow answers it; ``overwrite=true``
    replaces it."""
    other = voc([("leaf", 1, 1, 2, 2)])
    async with uploaded(png) as (server, session, image_id):
        await post_annotation(server, session, image_id, GOOD)
        second = await post_annotation(server, session, image_id, other)
        kept = await read_back(server, session, image_id)
        replaced = await post_annotation(server, session, image_id, other, overwrite="true")
        after = await read_back(server, session, image_id)
        stats = server.stats
    assert second == (
        409,
        {"error": {"message": "Image was already annotated.", "type": "InvalidImageException"}},
    )
    assert len(kept[1]["image"]["annotation"]["boxes"]) == 2
    assert replaced == (200, {"success": True})
    assert after[1]["image"]["annotation"]["boxes"] == [
        {"label": "leaf", "x": 1.5, "y": 1.5, "width": 1.0, "height": 1.0}
    ]
    assert (stats.annotation_conflicts, stats.annotations) == (1, 2)
    assert stats.annotations_by_image == {image_id: 2}


async def test_coco_and_wrapped_annotations_are_taken(png: bytes) -> None:
    """A one-image COCO file (``.json``), and a VOC file wrapped as newer clients send it
    (``{"annotationFile": ...}``), are kept the same way."""
    wrapped = json.dumps({"annotationFile": GOOD, "labelmap": None})
    async with uploaded(png) as (server, session, image_id):
        from_coco = await post_annotation(
            server, session, image_id, coco([[10, 4, 20, 16]]), name="abc123-0.json"
        )
        coco_boxes = (await read_back(server, session, image_id))[1]["image"]["annotation"]
        from_wrapped = await post_annotation(server, session, image_id, wrapped, overwrite="true")
        voc_boxes = (await read_back(server, session, image_id))[1]["image"]["annotation"]
    assert from_coco == from_wrapped == (200, {"success": True})
    assert coco_boxes["boxes"] == [
        {"label": "leaf", "x": 20.0, "y": 12.0, "width": 20.0, "height": 16.0}
    ]
    assert len(voc_boxes["boxes"]) == 2


def bad_annotations() -> Iterator[Any]:
    """(query changes, body, words of the message) Roboflow would refuse with 400."""
    yield pytest.param({"name": None}, GOOD, "name", id="no-name")
    yield pytest.param({"name": "abc123-0.txt"}, GOOD, ".xml", id="unknown-format")
    yield pytest.param({}, "<annotation><filename>", "XML", id="not-xml")
    yield pytest.param({}, "", "empty", id="empty")
    yield pytest.param({}, "<!DOCTYPE x [<!ENTITY a 'b'>]>" + GOOD, "DTD", id="dtd")
    yield pytest.param({}, "<voc/>", "<annotation>", id="wrong-root")
    yield pytest.param({}, voc([], filename=""), "names no file", id="no-filename")
    yield pytest.param({}, voc([], filename="other.png"), "other.png", id="other-file")
    yield pytest.param(
        {}, GOOD.replace("<name>leaf</name>", ""), "<name>", id="object-without-name"
    )
    yield pytest.param(
        {},
        "<annotation><filename>abc123-0.png</filename><object><name>a</name></object></annotation>",
        "<bndbox>",
        id="object-without-box",
    )
    yield pytest.param({}, GOOD.replace(">10<", ">ten<"), "xmin", id="not-a-number")
    yield pytest.param({}, voc([("leaf", 30, 4, 10, 20)]), "inverted", id="inverted")
    yield pytest.param({}, voc([("leaf", 10, 4, 10, 20)]), "inverted", id="empty-box")
    yield pytest.param({}, voc([("leaf", 10, 4, 65, 20)]), "outside", id="outside")
    yield pytest.param({}, voc([("leaf", -1, 4, 10, 20)]), "outside", id="negative")
    yield pytest.param({}, "x" * (1024 * 1024 + 1), "larger", id="huge")
    yield pytest.param({}, b"\xff\xfe<annotation/>", "UTF-8", id="not-utf8")
    json_name = {"name": "abc123-0.json"}
    yield pytest.param(json_name, "{", "JSON", id="coco-not-json")
    yield pytest.param(json_name, coco([], images=2), "one image", id="coco-two-images")
    yield pytest.param(json_name, coco([], file_name="b.png"), "b.png", id="coco-other-file")
    yield pytest.param(json_name, coco([[1, 2, 3]]), "bbox", id="coco-short-bbox")
    yield pytest.param(json_name, coco([[1, 2, "w", 3]]), "bbox", id="coco-bbox-text")
    yield pytest.param(json_name, coco([[60, 2, 10, 3]]), "outside", id="coco-outside")
    yield pytest.param(
        json_name,
        coco([[1, 2, 3, 4]]).replace('"category_id": 1', '"category_id": 7'),
        "categor",
        id="coco-unknown-category",
    )


@pytest.mark.parametrize(("changes", "body", "words"), list(bad_annotations()))
async def test_bad_annotations_are_refused(
    png: bytes, changes: dict[str, Any], body: str | bytes, words: str
) -> None:
    """What Roboflow would refuse answers 400 ``{"error": {"message"}}``; nothing is kept."""
    async with uploaded(png) as (server, session, image_id):
        status, payload = await post_annotation(server, session, image_id, body, **changes)
        image = server.dataset.find("leaves", image_id)
    assert status == 400
    assert words in payload["error"]["message"]
    assert image is not None
    assert image.annotation is None


async def test_unknown_image_project_and_key(png: bytes) -> None:
    """An image the project lacks: 404; a project the mock does not know: 404; a bad key:
    401 (annotation and read-back alike)."""
    async with uploaded(png, projects=frozenset({"leaves"})) as (server, session, image_id):
        no_image = await post_annotation(server, session, "NoSuchImage", GOOD)
        no_project = await post_annotation(server, session, image_id, GOOD, project="oaks")
        bad_key = await post_annotation(server, session, image_id, GOOD, api_key="wrong")
        read_missing = await read_back(server, session, "NoSuchImage")
        read_bad_key = await read_back(server, session, image_id, key="wrong")
        stats = server.stats
    assert (no_image[0], no_project[0], bad_key[0]) == (404, 404, 401)
    assert read_missing == (404, {"error": {"message": "Image not found."}})
    assert read_bad_key[0] == 401
    assert (stats.annotations, stats.image_reads) == (0, 2)


async def test_dropped_boxes_answer_success_and_read_back_empty(png: bytes) -> None:
    """With ``drop_annotation_boxes`` the answer is success but no box is kept: only the
    read-back tells."""
    async with uploaded(png, drop_annotation_boxes=True) as (server, session, image_id):
        answer = await post_annotation(server, session, image_id, GOOD)
        _, payload = await read_back(server, session, image_id)
    assert answer == (200, {"success": True})
    assert payload["image"]["annotation"] == {"width": 64, "height": 48, "boxes": []}


async def test_a_dropped_answer_then_a_retry_meets_the_conflict(png: bytes) -> None:
    """A connection dropped after the annotation was kept: the retry gets 409, and the
    image was annotated once."""
    config = {"error_rate": 1.0, "faults": {"drop": 1.0}}
    async with uploaded(png, **config) as (server, session, image_id):
        with pytest.raises(aiohttp.ClientError):
            await post_annotation(server, session, image_id, GOOD)
        retry = await post_annotation(server, session, image_id, GOOD)
        stats = server.stats
    assert retry[0] == 409
    assert stats.annotations_by_image == {image_id: 1}
    assert stats.annotation_conflicts == 1


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        pytest.param("429", 429, id="429"),
        pytest.param("502", 502, id="502"),
        pytest.param("503", 503, id="503"),
        pytest.param("malformed", 200, id="malformed"),
        pytest.param("wrong_shape", 200, id="wrong-shape"),
    ],
)
async def test_annotation_faults_keep_nothing(png: bytes, fault: str, status: int) -> None:
    """An annotation answered with a fault was not kept: the client's retry is the first."""
    config = {"error_rate": 1.0, "faults": {fault: 1.0}}
    async with uploaded(png, **config) as (server, session, image_id):
        got, payload = await post_annotation(server, session, image_id, GOOD)
        image = server.dataset.find("leaves", image_id)
    assert got == status
    assert "success" not in str(payload) or fault == "malformed"
    assert image is not None
    assert image.annotation is None


# ---- synthaug mock-server flags ----------------------------------------------------------------


def test_mock_server_flags_set_the_vocabulary_and_dropped_boxes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--detect-classes`` (comma-separated, any case) and ``--drop-annotation-boxes``
    reach the server's config; a vocabulary it cannot draw is a usage error."""
    import pipeline.mockapi.server as server_module
    from pipeline.cli import main
    from pipeline.errors import EXIT_OK, EXIT_USAGE

    started: list[MockConfig] = []
    monkeypatch.setattr(
        server_module, "run_mock_server", lambda config, host, port: started.append(config)
    )
    flags = ["mock-server", "--detect-classes", "Gnome, teapot", "--drop-annotation-boxes"]
    with pytest.raises(SystemExit) as ended:
        main(flags)
    assert ended.value.code == EXIT_OK
    assert started[0].detect_classes == ("gnome", "teapot")
    assert started[0].drop_annotation_boxes
    with pytest.raises(SystemExit) as ended:
        main(["mock-server", "--detect-classes", "cat,cat"])
    assert ended.value.code == EXIT_USAGE
    assert "--detect-classes" in capsys.readouterr().err
    assert len(started) == 1
