"""The pictures the embedded mock API answers with: deterministic, and telling.

Each image is filled with `mock_color` (from prompt and input), so a test can tell which
request made it from any pixel of the middle third, which stays pure colour. Around that
middle: the prompt in the top third, ``#index`` in the bottom-right corner, for a
``base64`` input a thumbnail of the input in the bottom-left third, so the contact sheets
of image sources show what each variant was made from, and in the three cells left free
a shape for each class of the detection vocabulary the prompt names
(`pipeline.mockapi.shapes`), which the mock's detection finds again. Text uses the DejaVu Sans font
shipped in the package (Pillow's own font if it is unreadable). CPU-bound and sync: the
server calls these in a thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFont, ImageOps

from .shapes import DEFAULT_DETECT_CLASSES, plan_shapes

__all__ = [
    "PHOTO_FORMATS",
    "damage",
    "draw_image",
    "input_thumbnail",
    "mock_color",
    "paint",
    "photo",
]

# the package folder (either import name): where its data files are
PACKAGE_DIR = Path(__file__).resolve().parent.parent
FONT_FILE = "fonts/DejaVuSans.ttf"  # package data of `pipeline`, shared with the sheets
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_THUMB_PX = 8
PHOTO_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
_PHOTO_GRAIN = 1.0  # sigma of the per-pixel grain: a 1024² PNG of about 1.3 MB
_PHOTO_BLOB_PX = 32  # one soft blob per this many pixels: the shapes of a photo

RGB = tuple[int, int, int]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def mock_color(prompt: str, image: str | None) -> RGB:
    """The fill colour of the mock's images for a prompt and input: tests check it."""
    digest = hashlib.sha256((prompt + "\0" + (image or "")).encode("utf-8")).digest()
    return digest[0], digest[1], digest[2]


def draw_image(
    prompt: str,
    image: str | None,
    *,
    index: int,
    width: int,
    height: int,
    image_type: str | None = None,
    classes: Sequence[str] = DEFAULT_DETECT_CLASSES,
) -> bytes:
    """The PNG the mock answers for a request's `prompt` and input `image` (see module doc);
    `classes` is the detection vocabulary (`MockConfig.detect_classes`)."""
    thumb = input_thumbnail(image, image_type, width, height)
    color = mock_color(prompt, image)
    return paint(prompt, color, thumb, index=index, width=width, height=height, classes=classes)


def input_thumbnail(
    image: str | None, image_type: str | None, width: int, height: int
) -> Image.Image | None:
    """A ``base64`` input decoded and scaled into a third of a `width` × `height` image.

    None for other input kinds (the mock fetches nothing), when the third is too small to
    show anything, or when the bytes are not an image (Roboflow would refuse those; the
    mock draws without a thumbnail).
    """
    box = _thumb_box(width, height)
    if image is None or image_type != "base64" or min(box) < MIN_THUMB_PX:
        return None
    try:
        data = base64.b64decode(image, validate=True)
        with Image.open(io.BytesIO(data)) as opened:
            opened.draft("RGB", box)  # JPEG: decode at a fraction of the size
            rgba = opened.convert("RGBA")
    except (OSError, ValueError, binascii.Error, Image.DecompressionBombError):
        return None
    thumb = ImageOps.contain(rgba, box, Image.Resampling.LANCZOS)
    flat = Image.new("RGB", thumb.size, (255, 255, 255))
    flat.paste(thumb, (0, 0), thumb)
    return flat


def paint(
    prompt: str,
    color: RGB,
    thumb: Image.Image | None,
    *,
    index: int,
    width: int,
    height: int,
    classes: Sequence[str] = DEFAULT_DETECT_CLASSES,
) -> bytes:
    """Draw the image: `color` fill, prompt on top, `thumb` bottom-left, ``#index`` bottom-right,
    the shapes of the `classes` the prompt names in the cells between.

    Nothing is drawn inside the middle third, so its pixels are exactly `color`.
    """
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    canvas = Image.new("RGB", (width, height), color)
    draw = ImageDraw.Draw(canvas)
    # Text without anti-aliasing: its pixels are exactly `ink` (black or white, which no
    # class colour is), never a blend that might equal a class colour and pass for a shape.
    draw.fontmode = "1"
    for shape in plan_shapes(prompt, index, width, height, classes, color):
        box = shape.box
        corners = (box.left, box.top, box.left + box.width - 1, box.top + box.height - 1)
        if shape.kind == "ellipse":
            draw.ellipse(corners, fill=shape.color)
        else:
            draw.rectangle(corners, fill=shape.color)
    font = _font(max(8, min(14, width // 22)))  # a font per call: fonts are not thread-safe
    line_h = math.ceil(draw.textbbox((0, 0), "Ag", font=font)[3]) + 2
    y = 2
    for line in _wrap(prompt, font, width - 4):
        if y + line_h > height // 3:
            break
        draw.text((2, y), line, fill=ink, font=font)
        y += line_h
    if thumb is not None:
        margin = _margin(width, height)
        top = height - margin - thumb.height
        canvas.paste(thumb, (margin, top))
        edge = [(margin - 1, top - 1), (margin + thumb.width, top + thumb.height)]
        draw.rectangle(edge, outline=ink)
    label = f"#{index}"
    right, bottom = (math.ceil(v) for v in draw.textbbox((0, 0), label, font=font)[2:])
    if bottom + 2 < height // 3 and right + 2 < width // 3:
        draw.text((width - right - 2, height - bottom - 2), label, fill=ink, font=font)
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def photo(seed: int, width: int, height: int, fmt: str = "png") -> bytes:
    """A photo-like picture that weighs what a real one does (a benchmark's answer).

    Gradients, soft blobs and a fine grain per channel: a 1024² PNG is about 1.3 MB, a
    JPEG (quality 90) about 120 kB, where a flat colour would be a few kB. `fmt` is
    ``png`` or ``jpeg``. Costly (PNG: ~1 s for 1024²): the mock renders a few and reuses
    them.
    """
    channels = []
    for channel in range(3):
        gradient = Image.linear_gradient("L").resize((width, height))
        gradient = gradient.rotate(45 * channel + 17 * seed)
        blobs = Image.effect_noise(
            (max(width // _PHOTO_BLOB_PX, 1), max(height // _PHOTO_BLOB_PX, 1)), 90
        ).resize((width, height), Image.Resampling.BICUBIC)
        grain = Image.effect_noise((width, height), _PHOTO_GRAIN)
        base = ImageChops.blend(gradient, blobs, 0.5)
        channels.append(ImageChops.add(base, grain, scale=1.0, offset=-128))
    out = io.BytesIO()
    Image.merge("RGB", channels).save(out, format=PHOTO_FORMATS[fmt], quality=90)
    return out.getvalue()


def damage(data: bytes, fault: str | None) -> bytes:
    """The image bytes as a faulty server sends them: ``corrupt_image`` or ``truncated_image``."""
    if fault == "corrupt_image":
        junk = hashlib.sha256(data).digest() * (len(data) // 32 + 1)
        return PNG_SIGNATURE + junk[: len(data)]
    if fault == "truncated_image":
        return data[: len(data) // 2]
    return data


def _margin(width: int, height: int) -> int:
    return max(2, min(width, height) // 64)


def _thumb_box(width: int, height: int) -> tuple[int, int]:
    """Room for the thumbnail: the bottom-left third, less a margin and a 1 px frame."""
    margin = _margin(width, height)
    return width // 3 - 2 * margin - 1, height // 3 - 2 * margin - 1


def _font(size: int) -> Font:
    try:
        data = (PACKAGE_DIR / FONT_FILE).read_bytes()
        return ImageFont.truetype(io.BytesIO(data), size)
    except (OSError, ImportError):
        return ImageFont.load_default(size=size)


def _wrap(text: str, font: Font, width: int) -> list[str]:
    """Greedy word wrap by measured width; a word wider than a line is cut."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            while len(word) > 1 and font.getlength(word) > width:
                word = word[:-1]
            lines.append(word)
    return lines
