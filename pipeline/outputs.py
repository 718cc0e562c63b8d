"""Verified, atomic image files under OUT.

An image is decoded in full by Pillow before it is written, written under a temporary
name in its final folder, fsynced, and renamed into place: a reader (or a resumed run)
sees either no file or a complete, decodable one, never a torn one. Everything here is
synchronous file work; the engine calls it through `asyncio.to_thread`. Outputs never
see HTTP: bytes come in, an `OutputFile` record goes out.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from pipeline.errors import OutputError, TransientError
from pipeline.records import OutputFile

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGES_DIR",
    "ImageInfo",
    "check_writable",
    "discard_outputs",
    "output_path",
    "outputs_intact",
    "store_image",
    "sweep_temp_files",
    "verify_image",
    "write_json_atomic",
]

IMAGES_DIR = "images"
# Generated images are at most a few megapixels; anything near Pillow's own bomb limit
# (~89 Mpx) is refused before its pixels are decoded.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
_FORMAT_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
_SOURCE_RE = re.compile(r"[A-Za-z0-9._-]+")
_KEY_RE = re.compile(r"[0-9A-Za-z]+")
_EXT_RE = re.compile(r"[a-z0-9]+")
_TMP_SUFFIX = ".tmp"
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What a full decode found: file extension (``png``/``jpg``/``webp``) and size."""

    format: str
    width: int
    height: int

    @property
    def ext(self) -> str:
        """The file extension for this format (same as `format`)."""
        return self.format


def check_writable(out_dir: Path) -> None:
    """Create OUT if missing and prove a file can be created in it, before spending money."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} is not a directory: pass another --out or remove that file")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _probe_write(out_dir)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(
            f"cannot write to output dir {out_dir} ({reason}): "
            "fix its permissions or free space, or pass another --out"
        ) from exc


def _probe_write(out_dir: Path) -> None:
    """Create, write and remove a probe file: the only test that holds for root and ACLs."""
    probe = out_dir / f".synthaug-probe-{secrets.token_hex(4)}{_TMP_SUFFIX}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"ok")
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def verify_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Decode `data` in full; raise a retryable ``bad_image`` error if it is not a sound image.

    Truncated or corrupt bytes, an unsupported format and decompression bombs are all
    refused. Pillow's global settings are left alone (truncated images stay refused).
    """
    if not data:
        raise TransientError("downloaded image is empty (0 bytes)", kind="bad_image")
    formats = tuple(_FORMAT_EXT)
    try:
        with Image.open(BytesIO(data), formats=formats) as probe:
            _check_size(probe.size, max_pixels)
            probe.verify()  # checks chunk CRCs that a plain decode may skip
        with Image.open(BytesIO(data), formats=formats) as image:
            image.load()
            fmt = _FORMAT_EXT.get(image.format or "", "")
            width, height = image.size
    except TransientError:
        raise
    except UnidentifiedImageError as exc:
        raise TransientError(
            f"downloaded bytes are not a PNG, JPEG or WebP image ({len(data)} bytes)",
            kind="bad_image",
        ) from exc
    # Decoders raise a zoo of types on bad bytes (OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError/Warning...): every one means "not an image".
    except Exception as exc:
        raise TransientError(
            f"downloaded bytes are not a valid image ({len(data)} bytes): {exc}",
            kind="bad_image",
        ) from exc
    if not fmt or width <= 0 or height <= 0:
        raise TransientError("downloaded image has no usable format or size", kind="bad_image")
    return ImageInfo(format=fmt, width=width, height=height)


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise TransientError(
            f"image of {width}x{height} pixels exceeds the {max_pixels}-pixel limit "
            "(possible decompression bomb)",
            kind="bad_image",
        )


def output_path(out_dir: Path, source: str, key: str, index: int, ext: str) -> Path:
    """``OUT/images/<source>/<key[:16]>-<index>.<ext>``, refusing names that would leave OUT."""
    if not _SOURCE_RE.fullmatch(source) or source in (".", ".."):
        raise OutputError(f"source name {source!r} cannot name a folder under {out_dir}")
    if not _KEY_RE.fullmatch(key) or index < 0 or not _EXT_RE.fullmatch(ext):
        raise OutputError(f"cannot name an output file from key={key!r} index={index} ext={ext!r}")
    return out_dir / IMAGES_DIR / source / f"{key[:16]}-{index}.{ext}"


def store_image(
    out_dir: Path,
    *,
    source: str,
    key: str,
    index: int,
    data: bytes,
    url: str | None = None,
    id: str | None = None,  # shadows the builtin on purpose: mirrors OutputFile.id
) -> OutputFile:
    """Verify `data`, then write it atomically to its place under OUT and describe it.

    Raises `TransientError` (``bad_image``) for bytes that do not decode, `OutputError`
    when the disk refuses the write (disk full: free space and run again to resume).
    """
    try:
        info = verify_image(data)
    except TransientError as exc:
        raise TransientError(exc.message, kind="bad_image", item_key=key) from exc
    path = output_path(out_dir, source, key, index, info.format)
    _write_atomic(path, data)
    return OutputFile(
        path=path.relative_to(out_dir).as_posix(),
        sha256=hashlib.sha256(data).hexdigest(),
        width=info.width,
        height=info.height,
        url=url,
        id=id,
        bytes=len(data),
    )


def write_json_atomic(path: Path, data: object) -> None:
    """Replace `path` with `data` as JSON, atomically (summary.json, job.json)."""
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"
    _write_atomic(path, text.encode("utf-8"))


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder; no torn final file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise OutputError(
                f"disk full writing {path}: free space and run the same command again to resume"
            ) from exc
        reason = exc.strerror or type(exc).__name__
        raise OutputError(
            f"cannot write {path} ({reason}): fix the output dir and run again"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)  # after a successful rename there is nothing to remove


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; some filesystems cannot fsync a folder."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def outputs_intact(
    out_dir: Path, outputs: Sequence[OutputFile], *, check_hash: bool = True
) -> bool:
    """True when every recorded file is under OUT, exists, and has its recorded content.

    Content is checked by size when the manifest recorded one and `check_hash` is False
    (the nightly resume: re-reading every image of a large job each night costs more than
    it protects), by sha256 otherwise (`synthaug run --verify`, and older manifests).
    """
    for output in outputs:
        # Containment from the text alone: resolve() per file was 40% of a 1M-item resume.
        parts = PurePosixPath(output.path).parts
        if not parts or parts[0] != IMAGES_DIR or ".." in parts or output.path.startswith("/"):
            return False
        path = out_dir / output.path
        try:
            info = path.stat()
        except OSError:
            return False
        if not stat.S_ISREG(info.st_mode):
            return False
        if not check_hash and output.bytes is not None:
            if info.st_size != output.bytes:
                return False
        elif _sha256_file(path) != output.sha256:
            return False
    return True


def _sha256_file(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def discard_outputs(out_dir: Path, outputs: Sequence[OutputFile]) -> None:
    """Delete stored files no manifest line will name (their item failed half-way)."""
    for output in outputs:
        (out_dir / output.path).unlink(missing_ok=True)


def sweep_temp_files(out_dir: Path) -> int:
    """Delete temp files left by killed runs (call only while holding the OUT lock)."""
    count = 0
    for path in _temp_files(out_dir):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        count += 1
    return count


def _temp_files(out_dir: Path) -> Iterator[Path]:
    images = out_dir / IMAGES_DIR
    candidates = list(out_dir.glob(f".*{_TMP_SUFFIX}"))
    if images.is_dir():
        candidates.extend(images.rglob(f".*{_TMP_SUFFIX}"))
    for path in candidates:
        if path.is_file() and not path.is_symlink():
            yield path
