"""Verified, atomic image files under OUT.

An image is checked to be whole (`pipeline.store.image_check`) before it is written, written
under a temporary name in OUT/images/.incoming, fsynced, and renamed into place: a reader
(or a resumed run) sees either no file or a complete one, never a torn one.
Everything here is synchronous file work; the engine calls it through
`asyncio.to_thread`. Outputs never see HTTP: bytes come in, an `OutputFile` record goes
out.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from itertools import compress, count
from operator import not_
from pathlib import Path
from stat import S_ISREG

from ..errors import OutputError, TransientError
from ..records import OutputFile
from . import layout
from .image_check import DEFAULT_MAX_PIXELS, ImageInfo, check_image
from .layout import IMAGE_NAME, IMAGES_DIR, TMP_SUFFIX, image_name
from .statpass import DIR_FLAGS, STAT_DIR_FD, differing

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGES_DIR",
    "TEMP_DIR",
    "FolderSync",
    "ImageInfo",
    "ListedFiles",
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
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
TEMP_DIR = ".incoming"
"""OUT/images/.incoming: where images are written before their rename into place."""

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
    return out_dir / IMAGES_DIR / source / image_name(key, index, ext)


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
    _write_image(path, data)
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


def _write_image(path: Path, data: bytes) -> None:
    """Write an image through a temp file in OUT/images/.incoming (fsync, then a rename into
    its source folder: atomic within one file system), so that the sweep finds what a
    killed run left without listing a million images. Where that rename would cross file
    systems (a source folder mounted elsewhere), the temp file is written beside.

    The caller makes the rename durable with an fsync of the destination folder.
    """
    tmp = path.parent.parent / TEMP_DIR / layout.temp_path(path).name
    renamed = False
    try:
        try:
            fd = os.open(tmp, _TMP_FLAGS, 0o644)
        except FileNotFoundError:  # a new OUT: its first image
            tmp.parent.mkdir(parents=True, exist_ok=True)
            path.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, _TMP_FLAGS, 0o644)
        try:
            layout.write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except FileNotFoundError:  # a new source's first image
            path.parent.mkdir(exist_ok=True)
            os.replace(tmp, path)
        renamed = True
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise layout.output_error(path, exc) from exc
    finally:
        if not renamed:
            tmp.unlink(missing_ok=True)
    if not renamed:
        _write_atomic(path, data)


def _sync_folder(path: Path) -> None:
    """fsync the folder of `path` at once, as an `OutputError` on failure."""
    try:
        layout.fsync_dir(path.parent)
    except OSError as exc:
        raise layout.output_error(path, exc) from exc


class StoredFiles:
    """The stored image files under OUT, asked about by path, for the resume check.

    Resume asks about every finished item's files. `differing` answers a million of
    those questions in one C-level pass: a `stat` of each recorded path through OUT's
    descriptor (no listing, no dict of a million entries), compared with the recorded
    size and mtime (as git's index does). A stored file is complete, because
    `store_image` fsyncs it before renaming it into place; whether it still holds the
    recorded bytes is told by that stat, and by re-reading it where the stat differs or
    with ``run --verify``.

    Only regular files directly in a real ``OUT/images/<source>/`` folder, under the
    names `output_path` gives, count: a manifest path that is absolute, has ``..``, is
    nested, or names a symlink (or a symlinked source folder) is never taken as present.
    The source folders are looked at on first use: use this under the OUT lock.
    """

    local = True
    """Whether the files are on this machine's disk (a child process may stat them)."""

    def __init__(self, out_dir: Path) -> None:
        self._out = out_dir
        self._shape: re.Pattern[str] | None = None

    def stat(self, path: str) -> Stat | None:
        """(size, mtime in ns) of the stored image file at `path` (relative to OUT), or
        None when `path` names none."""
        if not self._shape_re().fullmatch(path):
            return None
        try:
            info = os.stat(self._out / path, follow_symlinks=False)
        except OSError:
            return None
        return (info.st_size, info.st_mtime_ns) if S_ISREG(info.st_mode) else None

    def differing(self, paths: Sequence[str], stats: Sequence[Stat | None]) -> list[int]:
        """The indexes of `paths` whose stored file is missing or whose (size, mtime)
        differs from `stats` (the one at the same index): for a whole job's files, one
        C-level pass (`statpass.differing`)."""
        refused = self.refused(paths)
        if refused:  # never stat'ed: "" names no file
            paths = list(paths)
            for index in refused:
                paths[index] = ""
        if not STAT_DIR_FD:  # no stat relative to a folder's descriptor: whole paths
            whole = [str(self._out / path) if path else "" for path in paths]
            return differing(partial(os.stat, follow_symlinks=False), whole, stats)
        try:
            fd = os.open(self._out, DIR_FLAGS)
        except OSError:
            return list(range(len(paths)))  # no OUT: no file is stored
        try:
            return differing(partial(os.stat, dir_fd=fd, follow_symlinks=False), paths, stats)
        finally:
            os.close(fd)

    def refused(self, paths: Iterable[str]) -> list[int]:
        """The indexes of `paths` that cannot name a stored image, whatever is there:
        not ``images/<source>/<name>`` with a real source folder and a name as
        `output_path` gives (a C-level pass)."""
        return list(compress(count(), map(not_, map(self._shape_re().fullmatch, paths))))

    def sha256(self, path: str) -> str | None:
        """Hex SHA-256 of a stored file (path relative to OUT), None when unreadable."""
        return _sha256_file(self._out / path)

    def intact(self, paths: Sequence[str], sha256s: Sequence[str] | None = None) -> bool:
        """True when every path (relative to OUT) is a stored image file, with its
        recorded hash when `sha256s` is given."""
        for index, path in enumerate(paths):
            if self.stat(path) is None:
                return False
            if sha256s is not None and (
                index >= len(sha256s) or self.sha256(path) != sha256s[index]
            ):
                return False
        return True

    def sweep_temp_files(self) -> int:
        """Delete temp files left by killed runs in OUT and in OUT/images/.incoming (where
        `store_image` writes them: no listing of a million images to find them). Call it
        under the OUT lock, before the run writes."""
        count_ = 0
        for folder in (self._out, self._out / IMAGES_DIR / TEMP_DIR):
            for name in _temp_names(folder):
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
                    count_ += 1
        return count_

    def _shape_re(self) -> re.Pattern[str]:
        """What a stored file's path looks like: ``images/<source>/<name>`` with a
        source folder that is a real folder now and a name as `output_path` gives."""
        if self._shape is None:
            sources = "|".join(map(re.escape, _source_folders(self._out / IMAGES_DIR)))
            shape = f"{IMAGES_DIR}/(?:{sources})/{IMAGE_NAME}"
            self._shape = re.compile(shape if sources else "(?!)")
        return self._shape


class ListedFiles(StoredFiles):
    """The stored images of an OUT on object storage, known from the bucket's listing
    (path -> size): a recorded image is present when the listing has its path with its
    recorded size. The staging folder's copies are not asked: a new machine has none."""

    local = False

    def __init__(self, out_dir: Path, listing: Mapping[str, int]) -> None:
        super().__init__(out_dir)
        self._listing = listing

    def differing(self, paths: Sequence[str], stats: Sequence[Stat | None]) -> list[int]:
        refused = set(self.refused(paths))
        listing = self._listing
        return [
            index
            for index, (path, stat) in enumerate(zip(paths, stats, strict=True))
            if index in refused or stat is None or listing.get(path) != stat[0]
        ]

    def _shape_re(self) -> re.Pattern[str]:
        if self._shape is None:
            folders = {path.split("/")[1] for path in self._listing if path.count("/") == 2}
            sources = "|".join(
                map(re.escape, sorted(f for f in folders if _SOURCE_RE.fullmatch(f)))
            )
            shape = f"{IMAGES_DIR}/(?:{sources})/{IMAGE_NAME}"
            self._shape = re.compile(shape if sources else "(?!)")
        return self._shape


def _source_folders(images: Path) -> list[str]:
    """The real folders in OUT/images that can hold a source's images (no symlinks)."""
    try:
        with os.scandir(images) as entries:
            return sorted(
                e.name
                for e in entries
                if e.is_dir(follow_symlinks=False)
                and _SOURCE_RE.fullmatch(e.name)
                and e.name not in (".", "..")
            )
    except OSError:
        return []


def _temp_names(folder: Path) -> list[str]:
    """Names of the temp files (dot files ending in `TMP_SUFFIX`) directly in `folder`."""
    try:
        with os.scandir(folder) as entries:
            return [
                e.name
                for e in entries
                if e.name[0] == "."
                and e.name.endswith(TMP_SUFFIX)
                and e.is_file(follow_symlinks=False)
            ]
    except OSError:
        return []


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
