"""Is this the whole image the server meant to send? The cheapest sound check per format.

A full decode of a 1024² PNG costs more CPU than everything else a run does for it, yet
for the damage a download meets (a cut-off body, flipped bytes) the container formats
carry their own evidence, which is read here without decoding a pixel:

- **PNG**: every chunk's CRC-32 is checked (one pass of `zlib.crc32`) and the chunks are
  walked from the signature to ``IEND``. A cut anywhere leaves ``IEND`` (or the chunk it
  cuts) missing; a changed byte anywhere after the signature breaks its chunk's CRC (any
  burst of up to 32 bits always, other damage with odds of 1 in 2³²). The header must
  describe a valid image, the data chunks must be present, in one run, and start a zlib
  stream. What this does not prove is that the encoder itself wrote a valid deflate
  stream before checksumming it; that would take inflating every pixel.
- **JPEG**: the marker segments are walked by their lengths from ``SOI`` through every
  scan to ``EOI``; the size comes from the frame header. JPEG has no checksum, and a full
  decode would not find flipped bits in the entropy-coded data either (decoders conceal
  them), but a cut anywhere leaves the walk without its ``EOI``.
- **WebP**: the RIFF size must match the bytes and the chunks must tile them exactly; the
  size comes from the ``VP8``/``VP8L``/``VP8X`` header. A cut breaks the RIFF size.
- Anything else (another format, a JPEG frame type or WebP layout the walkers do not
  know) is decoded in full by Pillow, as every image was before.

Decompression bombs are refused from the header's size, before anything is decoded.
Pure functions of bytes; the caller runs them off the event loop for large images.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from PIL import Image, UnidentifiedImageError

from ..errors import TransientError

__all__ = ["DEFAULT_MAX_PIXELS", "ImageInfo", "check_image", "decode_image"]

# Generated images are at most a few megapixels; anything near Pillow's own bomb limit
# (~89 Mpx) is refused before its pixels are decoded.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

_FORMAT_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
_FORMATS = tuple(_FORMAT_EXT)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_U32LE = struct.Struct("<I")
_IHDR = struct.Struct(">IIBBBBB")
# colour type -> the bit depths the PNG spec allows for it
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_PALETTE = 3
_MAX_CHUNK = 0x7FFFFFFF  # the PNG spec's limit on a chunk length

_JPEG_SOI = b"\xff\xd8"
_EOI, _SOS, _TEM = 0xD9, 0xDA, 0x01
_RST = range(0xD0, 0xD8)
# Frame types whose size the walk reads: baseline, extended and progressive Huffman
# (what encoders write). Other SOF markers are decoded in full.
_SOF_WALKED = frozenset({0xC0, 0xC1, 0xC2})
_SOF_ALL = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# In entropy-coded data 0xFF is followed by 0x00 (stuffing) or a restart marker; any
# other byte after a run of 0xFF is the next marker.
_MARKER_AFTER_SCAN = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")

_VP8_START = b"\x9d\x01\x2a"
_VP8L_SIGNATURE = 0x2F
_VP8X_ANIMATED = 0x02


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the check found: file extension (``png``/``jpg``/``webp``) and size."""

    format: str
    width: int
    height: int


def check_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Format and size of `data`; a retryable ``bad_image`` error if it is not whole.

    The check per format is in the module docstring; every failure is a
    `TransientError` of kind ``bad_image`` (the image is fetched or generated again).
    """
    if not data:
        raise _bad("downloaded image is empty (0 bytes)")
    if data.startswith(_PNG_SIGNATURE):
        return _check_png(data, max_pixels)
    if data.startswith(_JPEG_SOI):
        return _check_jpeg(data, max_pixels) or decode_image(data, max_pixels=max_pixels)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _check_webp(data, max_pixels) or decode_image(data, max_pixels=max_pixels)
    return decode_image(data, max_pixels=max_pixels)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Decode `data` in full with Pillow: the check for what the walkers do not know.

    Pillow's global settings are left alone (truncated images stay refused).
    """
    try:
        with Image.open(BytesIO(data), formats=_FORMATS) as image:
            _check_size(image.size, max_pixels)
            image.load()
            fmt = _FORMAT_EXT.get(image.format or "", "")
            width, height = image.size
    except TransientError:
        raise
    except UnidentifiedImageError as exc:
        raise _bad(
            f"downloaded bytes are not a PNG, JPEG or WebP image ({len(data)} bytes)"
        ) from exc
    # Decoders raise a zoo of types on bad bytes (OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError/Warning...): every one means "not an image".
    except Exception as exc:
        raise _bad(f"downloaded bytes are not a valid image ({len(data)} bytes): {exc}") from exc
    if not fmt or width <= 0 or height <= 0:
        raise _bad("downloaded image has no usable format or size")
    return ImageInfo(format=fmt, width=width, height=height)


# ---------------------------------------------------------------------------- PNG


@dataclass(slots=True)
class _PngWalk:
    """What the chunk walk has seen so far."""

    width: int = 0
    height: int = 0
    color: int = 0
    palette: bool = False
    idat: int = 0  # 0 before the data chunks, 1 inside their run, 2 after it


def _check_png(data: bytes, max_pixels: int) -> ImageInfo:
    """Walk every chunk from the signature to IEND, checking each CRC (module docstring)."""
    view = memoryview(data)
    walk = _PngWalk()
    pos, end = len(_PNG_SIGNATURE), len(data)
    while True:
        if pos + 12 > end:
            raise _bad(f"PNG ends before its IEND chunk: truncated ({end} bytes)")
        (length,) = _U32.unpack_from(data, pos)
        body_end = pos + 8 + length
        if length > _MAX_CHUNK or body_end + 4 > end:
            raise _bad(f"PNG chunk at byte {pos} runs past the end: truncated ({end} bytes)")
        kind = bytes(view[pos + 4 : pos + 8])
        if zlib.crc32(view[pos + 4 : body_end]) != _U32.unpack_from(data, body_end)[0]:
            raise _bad(f"PNG chunk {kind!r} at byte {pos} has a bad CRC: the bytes are damaged")
        if pos == len(_PNG_SIGNATURE):
            _read_ihdr(kind, view[pos + 8 : body_end], walk, max_pixels)
        elif kind == b"IEND":
            break
        else:
            _note_chunk(kind, view[pos + 8 : body_end], walk)
        pos = body_end + 4
    if walk.idat == 0:
        raise _bad("PNG has no image data (IDAT) chunk")
    if walk.color == _PNG_PALETTE and not walk.palette:
        raise _bad("palette PNG has no palette (PLTE) chunk")
    return ImageInfo(format="png", width=walk.width, height=walk.height)


def _read_ihdr(kind: bytes, body: memoryview, walk: _PngWalk, max_pixels: int) -> None:
    if kind != b"IHDR" or len(body) != _IHDR.size:
        raise _bad("PNG does not start with a valid IHDR header chunk")
    width, height, depth, color, compression, filtering, interlace = _IHDR.unpack(body)
    valid = (
        0 < width <= _MAX_CHUNK
        and 0 < height <= _MAX_CHUNK
        and depth in _PNG_DEPTHS.get(color, ())
        and compression == 0
        and filtering == 0
        and interlace in (0, 1)
    )
    if not valid:
        raise _bad(f"PNG header describes no valid image ({width}x{height}, type {color}/{depth})")
    _check_size((width, height), max_pixels)
    walk.width, walk.height, walk.color = width, height, color


def _note_chunk(kind: bytes, body: memoryview, walk: _PngWalk) -> None:
    """Track the data chunks (one consecutive run, starting a zlib stream) and PLTE."""
    if kind == b"IHDR":
        raise _bad("PNG has a second IHDR chunk")
    if kind == b"IDAT":
        if walk.idat == 2:
            raise _bad("PNG image data (IDAT) chunks are not consecutive")
        if walk.idat == 0 and len(body) >= 2 and not _zlib_header_ok(body[0], body[1]):
            raise _bad("PNG image data does not start a zlib stream")
        walk.idat = 1
    elif walk.idat == 1:
        walk.idat = 2
    if kind == b"PLTE":
        walk.palette = True


def _zlib_header_ok(cmf: int, flg: int) -> bool:
    """Deflate method, no preset dictionary, and the header's own check value (RFC 1950)."""
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and not flg & 0x20 and (cmf << 8 | flg) % 31 == 0


# --------------------------------------------------------------------------- JPEG


def _check_jpeg(data: bytes, max_pixels: int) -> ImageInfo | None:
    """Walk the marker segments and scans from SOI to EOI (module docstring).

    None when the frame type is one the walk does not read: decode that in full.
    """
    pos, end = len(_JPEG_SOI), len(data)
    size: tuple[int, int] | None = None
    scans = 0
    while True:
        if pos + 2 > end:
            raise _bad(f"JPEG ends before its EOI marker: truncated ({end} bytes)")
        if data[pos] != 0xFF:
            raise _bad(f"JPEG has no marker where one must be (byte {pos}): damaged")
        marker = data[pos + 1]
        pos += 2
        if marker == 0xFF:
            pos -= 1  # a fill byte before the marker
            continue
        if marker == _EOI:
            break
        if marker == 0x00:
            raise _bad(f"JPEG has a stuffed byte outside its image data (byte {pos - 2}): damaged")
        if marker == _TEM or marker in _RST:
            continue  # markers without a length
        if pos + 2 > end:
            raise _bad(f"JPEG ends inside a marker segment: truncated ({end} bytes)")
        (length,) = _U16.unpack_from(data, pos)
        if length < 2 or pos + length > end:
            raise _bad(f"JPEG segment at byte {pos - 2} runs past the end: truncated ({end} bytes)")
        if marker in _SOF_ALL:
            if marker not in _SOF_WALKED:
                return None
            size = _read_sof(data, pos, length)
            if size is None:
                return None
            _check_size(size, max_pixels)
        pos += length
        if marker == _SOS:
            if size is None:
                raise _bad("JPEG has image data before its frame header: damaged")
            pos = _end_of_scan(data, pos)
            scans += 1
    if size is None or scans == 0:
        raise _bad("JPEG has no frame header or no image data")
    return ImageInfo(format="jpg", width=size[0], height=size[1])


def _read_sof(data: bytes, pos: int, length: int) -> tuple[int, int] | None:
    """(width, height) from a frame header; None when the height comes later (DNL)."""
    if length < 8:
        raise _bad("JPEG frame header is too short: damaged")
    height, width = _U16.unpack_from(data, pos + 3)[0], _U16.unpack_from(data, pos + 5)[0]
    components = data[pos + 7]
    if width == 0 or components == 0 or length != 8 + 3 * components:
        raise _bad("JPEG frame header describes no valid image: damaged")
    return (width, height) if height else None


def _end_of_scan(data: bytes, pos: int) -> int:
    """Where the marker after a scan's entropy-coded data starts."""
    found = _MARKER_AFTER_SCAN.search(data, pos)
    if found is None:
        raise _bad(f"JPEG ends inside its image data: truncated ({len(data)} bytes)")
    return found.end() - 2


# --------------------------------------------------------------------------- WebP


def _check_webp(data: bytes, max_pixels: int) -> ImageInfo | None:
    """RIFF size and chunk sizes tile the bytes exactly; size from the first chunk.

    None for an animated WebP: decode that in full.
    """
    end = len(data)
    declared = _U32LE.unpack_from(data, 4)[0] + 8
    if declared != end:
        raise _bad(f"WebP RIFF size says {declared} bytes but {end} came: truncated or damaged")
    chunks: list[tuple[bytes, int, int]] = []
    pos = 12
    while pos < end:
        if pos + 8 > end:
            raise _bad("WebP chunk header runs past the end: damaged")
        size = _U32LE.unpack_from(data, pos + 4)[0]
        if pos + 8 + size > end:
            raise _bad("WebP chunk runs past the end of its RIFF: truncated or damaged")
        chunks.append((data[pos : pos + 4], pos + 8, size))
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    if not chunks:
        raise _bad("WebP has no chunks")
    size = _webp_size(data, chunks)
    if size is None:
        return None
    _check_size(size, max_pixels)
    return ImageInfo(format="webp", width=size[0], height=size[1])


def _webp_size(data: bytes, chunks: list[tuple[bytes, int, int]]) -> tuple[int, int] | None:
    kind, start, length = chunks[0]
    body = data[start : start + length]
    if kind == b"VP8X" and length >= 10:
        if body[0] & _VP8X_ANIMATED:
            return None
        if not any(k in (b"VP8 ", b"VP8L") for k, _s, _l in chunks[1:]):
            raise _bad("WebP (extended) has no image data chunk")
        width = int.from_bytes(body[4:7], "little") + 1
        height = int.from_bytes(body[7:10], "little") + 1
        return width, height
    if kind == b"VP8 " and length >= 10 and body[3:6] == _VP8_START:
        first_partition = int.from_bytes(body[0:3], "little") >> 5
        if body[0] & 1 or first_partition > length - 10:
            raise _bad("WebP (lossy) frame header is damaged")
        width = int.from_bytes(body[6:8], "little") & 0x3FFF
        height = int.from_bytes(body[8:10], "little") & 0x3FFF
        return width, height
    if kind == b"VP8L" and length >= 5 and body[0] == _VP8L_SIGNATURE:
        bits = int.from_bytes(body[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    raise _bad("WebP does not start with a VP8, VP8L or VP8X chunk: damaged")


# ------------------------------------------------------------------------- shared


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise _bad(f"image header gives no usable size ({width}x{height})")
    if width * height > max_pixels:
        raise _bad(
            f"image of {width}x{height} pixels exceeds the {max_pixels}-pixel limit "
            "(possible decompression bomb)"
        )


def _bad(message: str) -> TransientError:
    return TransientError(message, kind="bad_image")
