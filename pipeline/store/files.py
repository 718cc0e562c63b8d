"""Verified, atomic image files under OUT.

An image is checked to be whole (`pipeline.store.image_check`) before it is written, written
under a temporary name in its final folder, fsynced, and renamed into place: a reader
(or a resumed run) sees either no file or a complete one, never a torn one.
Everything here is synchronous file work; the engine calls it through
`asyncio.to_thread`. Outputs never see HTTP: bytes come in, an `OutputFile` record goes
out.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from ..errors import OutputError, TransientError
from ..records import OutputFile
from . import layout
from .image_check import DEFAULT_MAX_PIXELS, ImageInfo, check_image
from .layout import IMAGES_DIR, TMP_SUFFIX

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGES_DIR",
    "FolderSync",
    "ImageInfo",
    "Stat",
    "StoredFiles",
    "check_writable",
    "discard_outputs",
    "output_path",
    "store_image",
    "verify_image",
]

_SOURCE_RE = re.compile(r"[A-Za-z0-9._-]+")
_KEY_RE = re.compile(r"[0-9A-Za-z]+")
_EXT_RE = re.compile(r"[a-z0-9]+")
_HASH_CHUNK = 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_SCANDIR_FD = os.scandir in os.supports_fd  # entries stat'ed relative to the folder

Stat = tuple[int, int]
"""A file's size and mtime in nanoseconds (the same shape as `pipeline.manifest.Stat`)."""


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
    probe = out_dir / f".synthaug-probe-{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"ok")
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def verify_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Format and size of `data`, or a retryable ``bad_image`` error if it is not whole.

    The cheapest sound check per format (PNG chunk CRCs to IEND, JPEG markers to EOI,
    WebP RIFF sizes, a full decode for anything else): see `pipeline.store.image_check`.
    """
    return check_image(data, max_pixels=max_pixels)


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
    folders: FolderSync | None = None,
) -> OutputFile:
    """Verify `data`, then write it atomically to its place under OUT and describe it.

    The file's bytes are fsynced before it is renamed into place. The rename is made
    durable by an fsync of its folder: at once, or, given `folders`, by the next
    `folders.flush()` (the engine flushes before each manifest fsync, so a durable line
    never names a file whose rename is not).

    Raises `TransientError` (``bad_image``) for bytes that do not decode, `OutputError`
    when the disk refuses the write (disk full: free space and run again to resume).
    """
    try:
        info = verify_image(data)
    except TransientError as exc:
        raise TransientError(exc.message, kind="bad_image", item_key=key) from exc
    path = output_path(out_dir, source, key, index, info.format)
    _write_atomic(path, data)
    if folders is None:
        _sync_folder(path)
    else:
        folders.mark(path.parent)
    try:  # after the rename: the stat a resume compares the file with
        stat = os.stat(path)
    except OSError as exc:
        raise layout.output_error(path, exc) from exc
    return OutputFile(
        path=f"{IMAGES_DIR}/{source}/{path.name}",
        sha256=hashlib.sha256(data).hexdigest(),
        width=info.width,
        height=info.height,
        url=url,
        id=id,
        bytes=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
    )


class FolderSync:
    """Folders holding renames not yet durable, to fsync in one go before the manifest's.

    An fsync per folder per manifest sync instead of one per image: the same guarantee
    at a fraction of the syscalls. Thread-safe: `store_image` marks from worker threads.
    """

    def __init__(self, fsync_dir: Callable[[Path], None] | None = None) -> None:
        self._fsync_dir = fsync_dir or layout.fsync_dir
        self._pending: set[Path] = set()
        self._lock = threading.Lock()

    def mark(self, folder: Path) -> None:
        """A file was renamed into `folder`; the next `flush` makes that durable."""
        with self._lock:
            self._pending.add(folder)

    def flush(self) -> None:
        """fsync every marked folder; on failure the unsynced ones stay marked."""
        with self._lock:
            folders, self._pending = self._pending, set()
        done: set[Path] = set()
        try:
            for folder in folders:
                self._fsync_dir(folder)
                done.add(folder)
        finally:
            if len(done) < len(folders):
                with self._lock:
                    self._pending |= folders - done


def _write_atomic(path: Path, data: bytes) -> None:
    """`layout.write_atomic`, with the user's wording of a failure (`OutputError`)."""
    try:
        layout.write_atomic(path, data)
    except OSError as exc:
        raise layout.output_error(path, exc) from exc


def _sync_folder(path: Path) -> None:
    """fsync the folder of `path` at once, as an `OutputError` on failure."""
    try:
        layout.fsync_dir(path.parent)
    except OSError as exc:
        raise layout.output_error(path, exc) from exc


class StoredFiles:
    """The image files under OUT with their size and mtime, listed once, for the resume
    check.

    Resume asks about every finished item's files: one listing of each image folder,
    with a `stat` of each file through the folder's descriptor, answers a million of
    those questions. A listed file is complete, because `store_image` fsyncs it before
    renaming it into place; whether it still holds the recorded bytes is told by its
    size and mtime (as git's index does), and by re-reading it where those differ or
    with ``run --verify``. Only regular files directly in ``OUT/images/<source>/`` count,
    so a manifest path that points anywhere else is never trusted. The listing is taken
    on first use and not refreshed: use it under the OUT lock, before the run writes.
    """

    def __init__(self, out_dir: Path) -> None:
        self._out = out_dir
        self._stats: dict[str, Stat] | None = None
        self._temps: list[Path] = []

    def stats(self) -> Mapping[str, Stat]:
        """(size, mtime in ns) of every stored image file, by path relative to OUT."""
        return self._listed()

    def sha256(self, path: str) -> str | None:
        """Hex SHA-256 of a stored file (path relative to OUT), None when unreadable."""
        return _sha256_file(self._out / path)

    def intact(self, paths: Sequence[str], sha256s: Sequence[str] | None = None) -> bool:
        """True when every path (relative to OUT) is a stored image file, with its
        recorded hash when `sha256s` is given."""
        listed = self._listed()
        for index, path in enumerate(paths):
            if path not in listed:
                return False
            if sha256s is not None and (
                index >= len(sha256s) or self.sha256(path) != sha256s[index]
            ):
                return False
        return True

    def all_present(self, paths: Iterable[str]) -> bool:
        """True when every one of `paths` is a stored image file (one C-level pass over
        a whole job's paths instead of a call per item)."""
        return self._listed().keys() >= set(paths)

    def missing(self, paths: Iterable[str]) -> set[str]:
        """Those of `paths` that are not stored image files."""
        return set(paths).difference(self._listed())

    def sweep_temp_files(self) -> int:
        """Delete temp files left by killed runs in OUT and its image folders (call it
        under the OUT lock, before the run writes)."""
        self._listed()
        temps = [self._out / name for name in _list_dir(self._out, "", with_stats=False)[1]]
        count = 0
        for path in [*temps, *self._temps]:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            count += 1
        self._temps = []
        return count

    def _listed(self) -> dict[str, Stat]:
        if self._stats is None:
            stats: dict[str, Stat] = {}
            images = self._out / IMAGES_DIR
            with _gc_paused():  # a million (size, mtime) tuples: no cycles to look for
                for source in _source_folders(images):
                    prefix = f"{IMAGES_DIR}/{source}/"
                    found, temps = _list_dir(images / source, prefix, with_stats=True)
                    stats.update(found)
                    self._temps.extend(images / source / name for name in temps)
            self._stats = stats
        return self._stats


def _source_folders(images: Path) -> list[str]:
    try:
        with os.scandir(images) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _list_dir(folder: Path, prefix: str, *, with_stats: bool) -> tuple[dict[str, Stat], list[str]]:
    """`prefix` + name of each regular file in `folder` with its (size, mtime_ns) (or
    (0, 0) without `with_stats`; none when the folder is missing), and the names of its
    temp files. Each file is stat'ed relative to the folder's descriptor: no path walk."""
    found: dict[str, Stat] = {}
    temps: list[str] = []
    try:
        fd = os.open(folder, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return found, temps
    try:
        with os.scandir(fd if _SCANDIR_FD else folder) as entries:
            for entry in entries:
                if not entry.is_file(follow_symlinks=False):
                    continue
                name = entry.name
                if name[0] == "." and name.endswith(TMP_SUFFIX):
                    temps.append(name)
                elif not with_stats:
                    found[prefix + name] = (0, 0)
                else:
                    try:
                        stat = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed since the listing: not stored
                    found[prefix + name] = (stat.st_size, stat.st_mtime_ns)
    finally:
        os.close(fd)
    return found, temps


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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
