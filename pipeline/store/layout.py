"""OUT's layout: what a run leaves in its output folder, under which names, and the one
way synthaug replaces a file there.

    OUT/manifest.jsonl                     the checkpoint (`pipeline.manifest`)
    OUT/images/<source>/<key16>-<i>.<ext>  the images (`pipeline.store.files`)
    OUT/job.json                           what the last run was asked to do
    OUT/summary.json                       how the last run ended
    OUT/search.json                        the image ids each roboflow_search found
    OUT/grids/<source>.png, OUT/index.html, OUT/thumbs/   the views (`pipeline.views`)
    OUT/.manifest.jsonl.state, OUT/.inputs.json           disposable caches
    OUT/.synthaug.lock                     held while a run writes
    OUT/.synthaug.pace/                    the pace shards on one key share (`pipeline.shared_pace`)

Every name above is defined here and nowhere else.

A file synthaug replaces is written under a temporary name in its own folder, fsynced and
renamed over the old one (`write_atomic`): a reader, or a run that resumes after a crash,
sees the old file or the new one, never half of either. Temporary names start with a dot
and end in `TMP_SUFFIX`, so a sweep can find what a killed run left.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any

from ..errors import OutputError
from ..job_record import JobRecord
from ..shard import Shard

__all__ = [
    "BALANCE_NAME",
    "GRIDS_DIR",
    "IMAGES_DIR",
    "IMAGE_NAME",
    "INDEX_NAME",
    "INPUT_HASHES_NAME",
    "JOB_NAME",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "PACE_DIR",
    "SEARCH_NAME",
    "SHARD_LOCK",
    "SHARD_MANIFEST",
    "SUMMARY_NAME",
    "THUMBS_DIR",
    "TMP_SUFFIX",
    "fsync_dir",
    "image_name",
    "is_object_url",
    "lock_files",
    "lock_name",
    "manifest_files",
    "manifest_name",
    "output_error",
    "read_job",
    "read_json",
    "state_cache_path",
    "stored_image_path",
    "summary_name",
    "temp_path",
    "write_all",
    "write_atomic",
    "write_job",
    "write_json_atomic",
]

_OBJECT_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")


def is_object_url(text: str) -> bool:
    """Whether an OUT (``output_dir``, ``--out``) names object storage
    (``s3://bucket/prefix``), not a folder."""
    return _OBJECT_URL.fullmatch(text.strip()) is not None


MANIFEST_NAME = "manifest.jsonl"
IMAGES_DIR = "images"
JOB_NAME = "job.json"
SUMMARY_NAME = "summary.json"
SEARCH_NAME = "search.json"
BALANCE_NAME = "balance.json"
GRIDS_DIR = "grids"
INDEX_NAME = "index.html"
THUMBS_DIR = "thumbs"
TMP_SUFFIX = ".tmp"
LOCK_NAME = ".synthaug.lock"
PACE_DIR = ".synthaug.pace"
SHARD_MANIFEST = re.compile(r"manifest\.shard-(\d+)-of-(\d+)\.jsonl")
SHARD_LOCK = re.compile(r"\.synthaug\.shard-(\d+)-of-(\d+)\.lock")
INPUT_HASHES_NAME = ".inputs.json"  # the inputs' hashes by path, size and mtime
IMAGE_NAME = r"[0-9a-f]{16}-[0-9]+\.[a-z0-9]+"
"""An image's file name (`image_name`): its key's first 16 hex digits, its index, its
format's extension."""


def image_name(key: str, index: int, ext: str) -> str:
    """``<key16>-<index>.<ext>``: the name an item's `index`-th image is stored under, the
    same on every machine (uploads are named by it: a repeat is answered duplicate)."""
    return f"{key[:16]}-{index}.{ext}"


def manifest_name(shard: Shard | None) -> str:
    """The manifest a run appends to: ``manifest.jsonl``, or a shard's own."""
    return MANIFEST_NAME if shard is None else f"manifest.{shard.tag}.jsonl"


def summary_name(shard: Shard | None) -> str:
    """Where a run writes how it ended: ``summary.json``, or a shard's own."""
    return SUMMARY_NAME if shard is None else f"summary.{shard.tag}.json"


def lock_name(shard: Shard | None) -> str:
    """The lock file a run holds: ``.synthaug.lock``, or a shard's own."""
    return LOCK_NAME if shard is None else f".synthaug.{shard.tag}.lock"


def manifest_files(out_dir: Path) -> list[Path]:
    """Every manifest in `out_dir` in reading order: ``manifest.jsonl`` (the unsharded
    runs', and what `merge` folds into), then the shards' by N and I; those present."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return []
    shards = sorted(
        (int(m[2]), int(m[1]), name) for name in names if (m := SHARD_MANIFEST.fullmatch(name))
    )
    main = [out_dir / MANIFEST_NAME] if MANIFEST_NAME in names else []
    return main + [out_dir / name for _n, _i, name in shards]


def lock_files(out_dir: Path) -> list[str]:
    """The lock files in `out_dir`: the whole OUT's and every shard's."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return []
    return sorted(name for name in names if name == LOCK_NAME or SHARD_LOCK.fullmatch(name))


def state_cache_path(manifest: Path) -> Path:
    """``OUT/.manifest.jsonl.state``, the disposable cache of the manifest's state."""
    return manifest.with_name(f".{manifest.name}.state")


_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})

log = logging.getLogger(__name__)


def stored_image_path(out_dir: Path, relative: str) -> Path | None:
    """The file a manifest's output path names, if it is one of OUT's image files
    (``images/<source>/<name>``); None for any other path, so that a hand-edited line
    never makes synthaug read or send a file outside OUT."""
    parts = PurePosixPath(relative).parts
    if len(parts) != 3 or parts[0] != IMAGES_DIR or any(p in ("", ".", "..") for p in parts):
        return None
    return out_dir.joinpath(*parts)


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside `path` (a dot file ending in `TMP_SUFFIX`)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_atomic(
    path: Path, data: bytes | Callable[[IO[bytes]], object], *, fsync: bool = True
) -> None:
    """Replace `path` by `data` (bytes, or a function that writes to a file): temporary
    file in the same folder, fsync, rename. Raises `OSError`; no temp file is left.

    The folder is created only when opening the temporary file finds it missing (a stat
    per image saved). The caller makes the rename durable (`fsync_dir`) when it must.
    `fsync=False` is for disposable files (caches), where a crash may lose the update.
    """
    tmp = temp_path(path)
    renamed = False
    try:
        try:
            fd = os.open(tmp, _TMP_FLAGS, 0o644)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, _TMP_FLAGS, 0o644)
        with os.fdopen(fd, "wb", buffering=0) as fh:
            if isinstance(data, bytes):
                write_all(fd, data)
            else:
                data(fh)
            if fsync:
                os.fsync(fd)
        os.replace(tmp, path)
        renamed = True
    finally:
        if not renamed:
            tmp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; some filesystems cannot fsync a folder."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def output_error(path: Path, exc: OSError) -> OutputError:
    """What the user is told when writing `path` failed, and how to go on."""
    if exc.errno in _DISK_FULL:
        return OutputError(
            f"disk full writing {path}: free space and run the same command again to resume"
        )
    reason = exc.strerror or type(exc).__name__
    return OutputError(f"cannot write {path} ({reason}): fix the output dir and run again")


def write_json_atomic(path: Path, data: object) -> None:
    """Replace `path` with `data` as JSON, durably (job.json, summary.json); `OutputError`
    when the disk refuses."""
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"
    try:
        write_atomic(path, text.encode("utf-8"))
        fsync_dir(path.parent)
    except OSError as exc:
        raise output_error(path, exc) from exc


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file of OUT, or None when it is absent, unreadable or not an object
    (these files describe a run; none of them is ever required)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def read_job(out_dir: Path) -> JobRecord | None:
    """``OUT/job.json`` as the record a run wrote, None when it is absent or unreadable.

    Read leniently (`JobRecord.from_json`): a view of OUT works without the file, so a
    hand-edited or older one must never stop it.
    """
    data = read_json(out_dir / JOB_NAME)
    return None if data is None else JobRecord.from_json(data)


def write_job(out_dir: Path, job: JobRecord) -> None:
    """Replace ``OUT/job.json`` with `job`, atomically and durably (`write_json_atomic`)."""
    write_json_atomic(out_dir / JOB_NAME, job.to_json())
