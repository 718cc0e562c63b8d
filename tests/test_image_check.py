"""The per-format image checks: whole images pass with their size, damaged ones never do."""

from __future__ import annotations

import functools
import random
import struct
import zlib
from io import BytesIO
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.errors import TransientError
from pipeline.store.image_check import ImageInfo, check_image, decode_image

EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


@functools.cache
def encoded(fmt: str, size: tuple[int, int] = (37, 23), mode: str = "RGB", **save: Any) -> bytes:
    """A noisy (so every cut lands in real data) image of `size` in `fmt`, cached."""
    rng = random.Random(f"{fmt}{size}{mode}")
    image = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).convert(mode)
    buf = BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def rejected(data: bytes) -> bool:
    """True when the check refuses `data` as a retryable ``bad_image``."""
    try:
        check_image(data)
    except TransientError as exc:
        return exc.kind == "bad_image"
    return False


def png_chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, length) of each chunk of a PNG."""
    found, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        found.append((pos, data[pos + 4 : pos + 8], length))
        pos += 12 + length
    return found


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


VALID = [
    pytest.param("PNG", "RGB", {}, id="png-rgb"),
    pytest.param("PNG", "RGBA", {}, id="png-rgba"),
    pytest.param("PNG", "L", {}, id="png-gray"),
    pytest.param("PNG", "1", {}, id="png-1bit"),
    pytest.param("PNG", "P", {}, id="png-palette"),
    pytest.param("PNG", "I;16", {}, id="png-16bit"),
    pytest.param("PNG", "RGB", {"optimize": True}, id="png-optimized"),
    pytest.param("JPEG", "RGB", {}, id="jpeg-baseline"),
    pytest.param("JPEG", "RGB", {"progressive": True}, id="jpeg-progressive"),
    pytest.param("JPEG", "L", {}, id="jpeg-gray"),
    pytest.param("JPEG", "CMYK", {}, id="jpeg-cmyk"),
    pytest.param("JPEG", "RGB", {"restart_marker_blocks": 1}, id="jpeg-restart-markers"),
    pytest.param("WEBP", "RGB", {}, id="webp-lossy"),
    pytest.param("WEBP", "RGB", {"lossless": True}, id="webp-lossless"),
    pytest.param("WEBP", "RGBA", {}, id="webp-alpha"),
]


@pytest.mark.parametrize(("fmt", "mode", "save"), VALID)
@pytest.mark.parametrize("size", [(1, 1), (37, 23), (300, 7)], ids=["1x1", "37x23", "300x7"])
def test_whole_images_pass_with_their_size(
    fmt: str, mode: str, save: dict[str, Any], size: tuple[int, int]
) -> None:
    """Every kind of sound PNG, JPEG and WebP passes with its format and size."""
    data = encoded(fmt, size, mode, **save)
    assert check_image(data) == ImageInfo(format=EXT[fmt], width=size[0], height=size[1])


def test_interlaced_png_passes() -> None:
    """An interlaced PNG (Adam7) passes with its size."""
    image = Image.frombytes("RGB", (19, 11), random.Random(1).randbytes(19 * 11 * 3))
    buf = BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    pos, kind, _length = png_chunks(data)[0]
    assert kind == b"IHDR"
    ihdr = bytearray(data[pos + 8 : pos + 21])
    ihdr[12] = 1  # the flag only: the check reads the structure, not the pixels
    interlaced = data[:pos] + chunk(b"IHDR", bytes(ihdr)) + data[pos + 25 :]
    assert check_image(interlaced).width == 19


@pytest.mark.parametrize(("fmt", "mode", "save"), VALID)
def test_cut_anywhere_is_rejected(fmt: str, mode: str, save: dict[str, Any]) -> None:
    """An image cut at any byte (every prefix) is refused: truncation never passes."""
    data = encoded(fmt, (37, 23), mode, **save)
    passed = [cut for cut in range(len(data)) if not rejected(data[:cut])]
    assert passed == []


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_png_with_any_byte_changed_is_rejected(data: st.DataObject) -> None:
    """Changing any byte of a PNG (signature, lengths, types, pixels, CRCs) is caught."""
    png = encoded("PNG", (37, 23), "RGBA")
    at = data.draw(st.integers(0, len(png) - 1), label="offset")
    xor = data.draw(st.integers(1, 255), label="xor")
    damaged = png[:at] + bytes([png[at] ^ xor]) + png[at + 1 :]
    assert rejected(damaged)


@pytest.mark.parametrize(
    "drop",
    [pytest.param(b"IEND", id="no-IEND"), pytest.param(b"IDAT", id="no-IDAT")],
)
def test_a_png_missing_a_required_chunk_is_rejected(drop: bytes) -> None:
    """A PNG without its IEND (or its image data) is refused even with every CRC right."""
    png = encoded("PNG")
    kept = b"".join(
        png[pos : pos + 12 + length] for pos, kind, length in png_chunks(png) if kind != drop
    )
    assert rejected(png[:8] + kept)


def test_a_palette_png_without_its_palette_is_rejected() -> None:
    """A palette PNG whose PLTE chunk is missing is refused."""
    png = encoded("PNG", (37, 23), "P")
    kept = b"".join(
        png[pos : pos + 12 + length] for pos, kind, length in png_chunks(png) if kind != b"PLTE"
    )
    assert rejected(png[:8] + kept)


def test_a_png_with_split_image_data_is_rejected() -> None:
    """IDAT chunks interrupted by another chunk break the PNG spec: refused."""
    png = encoded("PNG", (200, 200))
    chunks = png_chunks(png)
    idats = [c for c in chunks if c[1] == b"IDAT"]
    assert len(idats) >= 1
    pos, _kind, length = idats[0]
    body = png[pos + 8 : pos + 8 + length]
    split = chunk(b"IDAT", body[:10]) + chunk(b"tEXt", b"k\x00v") + chunk(b"IDAT", body[10:])
    assert rejected(png[:pos] + split + png[pos + 12 + length :])


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([False, True]))
def test_a_jpeg_cut_before_its_eoi_is_rejected(seed: int, progressive: bool) -> None:
    """A JPEG cut anywhere before the end of its EOI marker is refused."""
    jpeg = encoded("JPEG", (40, 33), "RGB", progressive=progressive)
    assert jpeg.endswith(b"\xff\xd9")
    cut = random.Random(seed).randrange(len(jpeg))
    assert rejected(jpeg[:cut])


def test_a_jpeg_with_trailing_bytes_after_eoi_passes() -> None:
    """Bytes after EOI (some encoders pad) do not make a whole JPEG fail."""
    assert check_image(encoded("JPEG") + b"\x00" * 7).format == "jpg"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"<html>503</html>", id="html"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, id="png-signature-then-junk"),
        pytest.param(b"\xff\xd8\xff\xd9", id="jpeg-without-frame"),
        pytest.param(b"RIFF\x04\x00\x00\x00WEBP", id="webp-without-chunks"),
        pytest.param(encoded("GIF", (8, 8), "P"), id="gif-unsupported"),
    ],
)
def test_what_is_not_a_whole_image_is_rejected(data: bytes) -> None:
    """Empty bytes, HTML, headers without images and unsupported formats are refused."""
    assert rejected(data)


def test_a_bomb_is_refused_from_its_header() -> None:
    """A PNG claiming more pixels than allowed is refused before anything is decoded."""
    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(TransientError, match="pixel limit"):
        check_image(png)
    with pytest.raises(TransientError, match="pixel limit"):
        check_image(encoded("JPEG", (40, 30)), max_pixels=1199)


@pytest.mark.parametrize(("fmt", "mode", "save"), VALID)
def test_the_check_agrees_with_a_full_decode_on_whole_images(
    fmt: str, mode: str, save: dict[str, Any]
) -> None:
    """The cheap check and Pillow's full decode report the same format and size."""
    data = encoded(fmt, (37, 23), mode, **save)
    assert check_image(data) == decode_image(data)
