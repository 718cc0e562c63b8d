"""An edit's input image and mask as the OpenAI clients send them: their bytes, their
type, a file name stem (online: multipart parts; in a batch: ``data:`` URLs)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import PurePosixPath

from ..records import WorkItem
from ..sources import read_input_bytes

__all__ = ["data_url", "image_type", "read_mask", "stem"]

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png", "png"),
    (b"\xff\xd8\xff", "image/jpeg", "jpg"),
    (b"RIFF", "image/webp", "webp"),
)


async def read_mask(item: WorkItem) -> bytes | None:
    """The bytes of the item's mask, as hashed into its key; None without a mask.

    Read just before the request starts and checked against that hash: raises
    `InputChangedError` (the engine skips the item) when the file changed.
    """
    if item.mask is None:
        return None
    return await asyncio.to_thread(read_input_bytes, item.mask.value, item.mask.sha256 or "")


def image_type(data: bytes) -> tuple[str, str]:
    """(MIME type, file extension) of an image's bytes; PNG when not recognised."""
    for magic, mime, extension in _MAGIC:
        if data.startswith(magic):
            return mime, extension
    return "image/png", "png"


def data_url(encoded: str) -> str:
    """A ``data:`` URL of an image given as base64, typed by its first bytes."""
    mime, _ = image_type(base64.b64decode(encoded[:16]))
    return f"data:{mime};base64,{encoded}"


def stem(path: str) -> str:
    """A file name stem for a part: the input's own, or ``image``."""
    return PurePosixPath(path.replace("\\", "/")).stem or "image"
