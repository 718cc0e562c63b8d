"""Answers with megabytes of base64: inline images decoded as the JSON is loaded.

A 1024² image is 1.5 MB of base64 inside an answer's JSON (and a Batch API results line).
`load_answer` finds each ``b64_json`` string in the raw bytes and decodes it in pieces,
so that no call holds the GIL (and the event loop thread that waits for it) for long.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

__all__ = ["INLINE_CHUNK_CHARS", "InlineImage", "load_answer"]

INLINE_CHUNK_CHARS = 256 * 1024
"""Base64 characters decoded per call (a multiple of 4): each call holds the GIL, about
0.3 ms for this many, so the event loop thread never waits long for it."""
_B64_KEY = b'"b64_json"'
_JSON_SPACE = b" \t\r\n"
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_MARK = "\x00synthaug-inline-"  # no API sends a NUL in a base64 field: never matches by chance


@dataclass(frozen=True, eq=False)
class InlineImage:
    """A ``b64_json`` value that `load_answer` decoded straight from the raw answer."""

    data: bytes

    def elided(self) -> str:
        """What the manifest keeps in its place (the same text as `elide_images` gives)."""
        return f"<elided {len(self.data)} bytes>"

    def __repr__(self) -> str:
        return self.elided()


def load_answer(raw: bytes, *, between_pieces: Callable[[], None] = lambda: None) -> Any:
    """The parsed JSON of an answer; each plain-base64 ``b64_json`` value is decoded
    on the way, as an `InlineImage`. Raises `ValueError` when the JSON is invalid.

    A 1024² image is 1.5 MB of base64 inside the JSON. Parsing it whole, then decoding
    it, holds the GIL for milliseconds at a time, and the event loop thread waits for
    the GIL. Here the string is found in the raw bytes, checked and decoded in pieces of
    `INLINE_CHUNK_CHARS`, and only the rest (a few hundred bytes) goes to `json.loads`,
    which still validates it. Anything unusual (an escape or whitespace in the string,
    invalid base64, a key found where the parse does not confirm it) falls back to
    parsing the whole answer, which yields exactly what it always did.

    `between_pieces` is called after each piece but the last: a thread passes a short
    sleep there, which hands the GIL to the event loop thread if it is waiting for it
    (otherwise it would wait for the interpreter's switch interval, 5 ms).
    """
    cut = _cut_inline(raw, between_pieces)
    if cut is not None:
        skeleton, images = cut
        placed: list[int] = []
        try:
            payload = json.loads(skeleton, object_hook=partial(_place_inline, images, placed))
        except ValueError:
            pass  # the whole answer is invalid too: its own parse below says so
        else:
            if sorted(placed) == list(range(len(images))):
                return payload
    return json.loads(raw)


def _cut_inline(raw: bytes, between_pieces: Callable[[], None]) -> tuple[bytes, list[bytes]] | None:
    """`raw` with each ``"b64_json": "<base64>"`` value replaced by a marker string, and
    the decoded images in order; None when there is none or one is not plain base64."""
    pieces: list[bytes] = []
    images: list[bytes] = []
    done = 0
    while (key := raw.find(_B64_KEY, done)) >= 0:
        colon = _skip_space(raw, key + len(_B64_KEY))
        start = _skip_space(raw, colon + 1)
        if raw[colon : colon + 1] != b":" or raw[start : start + 1] != b'"':
            return None
        end = raw.find(b'"', start + 1)
        data = _decode_chunked(raw, start + 1, end, between_pieces)
        if data is None:
            return None
        pieces += (raw[done:start], json.dumps(f"{_MARK}{len(images)}").encode())
        images.append(data)
        done = end + 1
    if not images:
        return None
    pieces.append(raw[done:])
    return b"".join(pieces), images


def _skip_space(raw: bytes, index: int) -> int:
    while raw[index : index + 1] and raw[index] in _JSON_SPACE:
        index += 1
    return index


def _decode_chunked(
    raw: bytes, start: int, end: int, between_pieces: Callable[[], None] = lambda: None
) -> bytes | None:
    """``raw[start:end]`` decoded a piece at a time as `_decode_b64` decodes a string
    without line breaks (``b64decode(validate=True)``); None where that would fail.

    Pieces are whole 4-character groups of the base64 alphabet, and ``=`` padding (at
    most two) may only end the last one: what is accepted here decodes to the same bytes
    in one call, under the strict check of Python 3.11+ and the regex check of 3.10.
    """
    if end <= start or (end - start) % 4:
        return None
    parts: list[bytes] = []
    try:
        for offset in range(start, end, INLINE_CHUNK_CHARS):
            piece = raw[offset : min(offset + INLINE_CHUNK_CHARS, end)]
            last = offset + INLINE_CHUNK_CHARS >= end
            if not _plain_base64(piece, padded=last):
                return None
            parts.append(binascii.a2b_base64(piece))
            if not last:
                between_pieces()
    except binascii.Error:
        return None
    return b"".join(parts) or None


def _plain_base64(piece: bytes, *, padded: bool) -> bool:
    """Only base64 alphabet in `piece`, but for up to two ``=`` at its end if `padded`."""
    digits = piece.rstrip(b"=") if padded else piece
    return len(piece) - len(digits) <= 2 and not digits.translate(None, _B64_ALPHABET)


def _place_inline(images: list[bytes], placed: list[int], obj: dict[str, Any]) -> Any:
    """`json.loads` object hook: a marker under ``b64_json`` becomes its `InlineImage`."""
    value = obj.get("b64_json")
    if isinstance(value, str) and value.startswith(_MARK):
        index = value[len(_MARK) :]
        if index.isdigit() and int(index) < len(images):
            placed.append(int(index))
            obj["b64_json"] = InlineImage(images[int(index)])
    return obj
