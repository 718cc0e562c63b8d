"""Local input images: list them deterministically, check them, hash them, read them.

Listings are sorted per directory and never follow a directory symlink, so a symlink
loop cannot hang a walk and the same tree lists in the same order on every machine
(item order, and therefore the work queue, depends on it). Names starting with a dot
are skipped: they are hidden files or macOS ``._`` resource forks, never images.

A file's key value is the SHA-256 of its bytes; `HashCache` hashes each file once, and
keeps the hashes in OUT by path, size and mtime so that a resume does not read its
inputs again; `read_input_bytes` re-checks the hash right before sending, because a file
edited after planning would otherwise be sent under a key that describes other bytes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import PipelineError
from .store.layout import INPUT_HASHES_NAME

__all__ = [
    "DEFAULT_EXTENSIONS",
    "INPUT_HASHES_NAME",
    "MAX_INPUT_BYTES",
    "HashCache",
    "InputChangedError",
    "InputError",
    "check_image_file",
    "file_sha256",
    "iter_folder",
    "list_globs",
    "read_input_bytes",
]

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# A hash taken this close to the file's mtime is not stored: 2 s covers the coarsest
# common mtime granularity (FAT).
RACY_NS = 2_000_000_000
MAX_INPUT_BYTES = 25 * 1024 * 1024
_CHUNK = 1024 * 1024
_HEADER_BUFFER = 2048  # bytes per read while Pillow parses a header (a JPEG's is ~0.6 kB)
_MAGIC = frozenset("*?[")

log = logging.getLogger(__name__)


class InputError(ValueError):
    """A local input is unusable (missing, not an image, too large).

    The spec layer turns it into a `SpecError` naming the file, key path and line.
    """


class InputChangedError(PipelineError):
    """An input file vanished or changed between planning and sending its request."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


def list_globs(patterns: Sequence[str], base_dir: Path) -> list[Path]:
    """Files matching any of `patterns` (relative to `base_dir`), sorted, each once.

    Supports ``*``, ``?``, ``[...]`` and ``**`` (any number of directories). Directory
    symlinks below the pattern's fixed prefix are not followed.
    """
    found: set[Path] = set()
    for pattern in patterns:
        found.update(_glob_one(pattern, base_dir))
    return sorted(found)


def _glob_one(pattern: str, base_dir: Path) -> Iterator[Path]:
    """Files matching one pattern; see `list_globs`."""
    parts = (base_dir / Path(pattern).expanduser()).parts
    first_magic = next((i for i, p in enumerate(parts) if _MAGIC & set(p)), len(parts))
    root = Path(*parts[:first_magic])
    rest = parts[first_magic:]
    if not rest:
        if root.is_file():
            yield root
        return
    if root.is_dir():
        yield from _match(root, rest)


def _match(directory: Path, parts: tuple[str, ...]) -> Iterator[Path]:
    head, tail = parts[0], parts[1:]
    if head == "**":
        yield from _match_any_depth(directory, tail)
        return
    for entry in _scan(directory):
        if not _name_matches(entry.name, head):
            continue
        if tail:
            if entry.is_dir(follow_symlinks=False):
                yield from _match(Path(entry.path), tail)
        elif _is_file(entry):
            yield Path(entry.path)


def _match_any_depth(directory: Path, tail: tuple[str, ...]) -> Iterator[Path]:
    """``**``: `tail` matched in `directory` and in every real subdirectory below it."""
    if tail:
        yield from _match(directory, tail)
    for entry in _scan(directory):
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _match_any_depth(Path(entry.path), tail)
        elif not tail and _is_file(entry):
            yield Path(entry.path)


def _name_matches(name: str, pattern: str) -> bool:
    if name.startswith(".") and not pattern.startswith("."):
        return False  # like shell globs: '*' does not match hidden names
    return fnmatch.fnmatchcase(name, pattern)


def _is_file(entry: os.DirEntry[str]) -> bool:
    """A regular file, or a symlink to one; a symlink loop is neither (like a dangling
    link), where `DirEntry.is_file` would raise ELOOP out of the listing."""
    try:
        return entry.is_file()
    except OSError:
        return False


def _scan(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []  # unreadable or vanished: nothing to list


def iter_folder(folder: Path, *, recursive: bool, extensions: Collection[str]) -> Iterator[Path]:
    """Image files in `folder` (and below when `recursive`), lazily, sorted by name.

    `extensions` are matched case-insensitively (``.JPG`` counts as ``.jpg``).
    """
    wanted = {e.lower() for e in extensions}
    for entry in _scan(folder):
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            if recursive:
                yield from iter_folder(Path(entry.path), recursive=True, extensions=wanted)
        elif _is_file(entry) and os.path.splitext(entry.name)[1].lower() in wanted:
            yield Path(entry.path)


def check_image_file(path: Path) -> None:
    """Raise `InputError` unless `path` is a readable image of at most 25 MB.

    Only the header is read (Pillow opens lazily), through a small buffer: checking a
    folder of photos reads a few kB of each, not the default 8 kB buffer's worth.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    if size > MAX_INPUT_BYTES:
        mb = size / (1024 * 1024)
        raise InputError(f"{path} is {mb:.1f} MB; the API takes images up to 25 MB")
    try:
        with open(path, "rb", buffering=_HEADER_BUFFER) as fh, Image.open(fh) as img:
            img_format = img.format
    except (UnidentifiedImageError, OSError, ValueError):
        raise InputError(f"{path} is not an image Pillow can read") from None
    if img_format is None:  # pragma: no cover - Pillow always names a format it opened
        raise InputError(f"{path} is not an image Pillow can read")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    """Input files' hashes by absolute path, size and mtime: a changed size or mtime
    hashes the file again.

    Given a `store` (``OUT/.inputs.json``), the hashes of earlier runs are loaded from it
    on first use and `save` writes them back, so a resume never reads an untouched
    input just to compute its key (``read_input_bytes`` still checks the bytes before
    sending them). The store is disposable: a missing, unreadable or corrupt one costs
    a re-hash, never the run. A hash taken within `RACY_NS` of the file's mtime is used
    but not stored: the file could change again without its mtime moving.
    """

    def __init__(self, store: Path | None = None, *, clock_ns: Callable[[], int] = time.time_ns):
        self._store = store
        self._clock_ns = clock_ns
        self._known: dict[str, _Known] | None = None if store is not None else {}
        self._racy: set[str] = set()
        self._dirty = False

    def sha256(self, path: Path) -> str:
        """Hex SHA-256 of `path`'s bytes."""
        name = os.path.abspath(path)
        stat = os.stat(name)
        known = self._entries().get(name)
        if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
            return known[2]
        hashed_at = self._clock_ns()
        digest = file_sha256(path)
        self._entries()[name] = (stat.st_size, stat.st_mtime_ns, digest)
        if hashed_at - stat.st_mtime_ns < RACY_NS:
            self._racy.add(name)
        else:
            self._racy.discard(name)
        self._dirty = True
        return digest

    def save(self, *, discard: bool = False) -> None:
        """Write the known hashes to the store, atomically, if any were added; with
        `discard`, delete the store instead (an input changed under the run). Never
        raises: a store that cannot be written only costs a re-hash next time."""
        if self._store is None:
            return
        try:
            if discard:
                self._store.unlink(missing_ok=True)
            elif self._dirty:
                _write_store(self._store, self._entries(), self._racy)
                self._dirty = False
        except OSError as exc:
            log.info("not keeping input hashes in %s: %s", self._store, exc.strerror or exc)

    def _entries(self) -> dict[str, _Known]:
        if self._known is None:
            self._known = _read_store(self._store) if self._store is not None else {}
        return self._known


_Known = tuple[int, int, str]  # size, mtime_ns, sha256 hex
_STORE_FORMAT = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _read_store(store: Path) -> dict[str, _Known]:
    """The hashes a store holds; {} for a missing, unreadable or malformed one."""
    try:
        data = json.loads(store.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.info("ignoring the input hash store %s: %s", store, exc)
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or data.get("format") != _STORE_FORMAT:
        log.info("ignoring the input hash store %s: not a format we know", store)
        return {}
    known: dict[str, _Known] = {}
    for name, entry in files.items():
        if (
            isinstance(entry, list)
            and len(entry) == 3
            and type(entry[0]) is int
            and type(entry[1]) is int
            and isinstance(entry[2], str)
            and _HEX64.fullmatch(entry[2])
        ):
            known[name] = (entry[0], entry[1], entry[2])
    return known


def _write_store(store: Path, known: dict[str, _Known], racy: set[str]) -> None:
    """Replace the store with `known` (less the racy entries): temp file, then rename."""
    files = {name: list(entry) for name, entry in known.items() if name not in racy}
    payload = json.dumps({"format": _STORE_FORMAT, "files": files}, separators=(",", ":"))
    # a leftover of a killed run is swept with OUT's other temp files
    tmp = store.with_name(f".{store.name.lstrip('.')}.{os.getpid()}.tmp")
    try:
        tmp.write_text(payload + "\n", encoding="utf-8")
        os.replace(tmp, store)
    finally:
        tmp.unlink(missing_ok=True)


def read_input_bytes(path: Path | str, expected_sha256: str) -> bytes:
    """The bytes of an input file, checked against the hash its item key was built from.

    Called in a worker thread right before the request starts, so only the files of
    requests in flight are in memory. Raises `InputChangedError` when the file
    vanished or changed since the plan.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputChangedError(
            f"input {path} can no longer be read ({exc.strerror}); run plan again", path=path
        ) from None
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise InputChangedError(
            f"input {path} changed since its item was planned; run again to plan it anew",
            path=path,
        )
    return data
