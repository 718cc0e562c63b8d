"""A cache of the manifest's per-key state, so that resuming a big job reads a few lines.

Reading a finished million-line manifest costs about 3.5 s; loading this cache about 0.5 s.
The manifest stays the only truth: the cache records how many manifest bytes it covers,
a hash of the last of them and the manifest's identity (device, inode, mtime), and is
used only while the same manifest file still holds those bytes (lines appended after
them are read as usual). Any doubt (another Python, a replaced or rewritten manifest, a
damaged cache) means the manifest is read in full. A resumed `run` rewrites the cache
when it ends; deleting it is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import marshal
import os
import secrets
import sys
import zlib
from pathlib import Path
from typing import Any

from pipeline.manifest import Entry, ManifestState, gc_paused, load_state, read_more
from pipeline.records import GeneratedImage

__all__ = ["cache_path", "load_cached_state", "save_state_cache"]

log = logging.getLogger(__name__)

_FORMAT = 1
_TAIL_BYTES = 4096  # the manifest bytes just before the cached offset, hashed
_PYTHON = f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}"  # marshal


def cache_path(manifest: Path) -> Path:
    """``OUT/.manifest.jsonl.state`` beside the manifest."""
    return manifest.with_name(f".{manifest.name}.state")


def load_cached_state(manifest: Path) -> ManifestState:
    """`load_state` of `manifest`, starting from the cache when it still matches."""
    state = _read_cache(manifest)
    if state is None:
        return load_state(manifest)
    read_more(manifest, state)
    return state


def save_state_cache(manifest: Path, state: ManifestState) -> None:
    """Bring `state` up to date with the manifest and write it as the cache (atomically,
    without fsync: a cache lost to a crash is rebuilt from the manifest)."""
    read_more(manifest, state)
    if _cache_is_current(manifest, state.offset):
        return  # nothing was appended: a nightly no-op run rewrites nothing
    payload = marshal.dumps((state.finished, [_entry_row(k, e) for k, e in state.open.items()]))
    header = {
        "format": _FORMAT,
        "python": _PYTHON,
        "manifest_bytes": state.offset,
        "tail_sha256": _tail_sha256(manifest, state.offset),
        "manifest_id": _identity(manifest),
        "payload_bytes": len(payload),
        "payload_crc32": zlib.crc32(payload),
    }
    target = cache_path(manifest)
    tmp = target.with_name(f"{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(json.dumps(header).encode() + b"\n")
            fh.write(payload)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _cache_is_current(manifest: Path, covered: int) -> bool:
    try:
        with cache_path(manifest).open("rb") as fh:
            header = json.loads(fh.readline())
    except (OSError, ValueError):
        return False
    return _header_matches(header, manifest) and header["manifest_bytes"] == covered


def _read_cache(manifest: Path) -> ManifestState | None:
    try:
        with cache_path(manifest).open("rb") as fh:
            header = json.loads(fh.readline())
            if not _header_matches(header, manifest):
                return None
            payload = fh.read()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.info("ignoring the state cache of %s: %s", manifest, exc)
        return None
    if len(payload) != header["payload_bytes"] or zlib.crc32(payload) != header["payload_crc32"]:
        log.info("ignoring a damaged state cache of %s", manifest)
        return None
    return _state_from(payload, header["manifest_bytes"])


def _header_matches(header: Any, manifest: Path) -> bool:
    """The cache is ours, for this Python, and the manifest still holds what it covered."""
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        return False
    covered = header.get("manifest_bytes")
    if header.get("python") != _PYTHON or not isinstance(covered, int) or covered < 0:
        return False
    if not isinstance(header.get("payload_bytes"), int):
        return False
    try:
        size = manifest.stat().st_size
    except FileNotFoundError:
        return False
    if size < covered:
        return False
    recorded = header.get("manifest_id")
    if not isinstance(recorded, list) or len(recorded) != 3:
        return False
    device, inode, mtime_ns = _identity(manifest)
    if [device, inode] != recorded[:2]:
        return False  # another file (replaced, restored, copied): read it in full
    if size == covered and mtime_ns != recorded[2]:
        return False  # rewritten in place since, without growing
    return header.get("tail_sha256") == _tail_sha256(manifest, covered)


def _identity(manifest: Path) -> list[int]:
    """Device, inode and modification time of the manifest."""
    info = manifest.stat()
    return [info.st_dev, info.st_ino, info.st_mtime_ns]


def _tail_sha256(manifest: Path, covered: int) -> str:
    start = max(0, covered - _TAIL_BYTES)
    with manifest.open("rb") as fh:
        fh.seek(start)
        return hashlib.sha256(fh.read(covered - start)).hexdigest()


def _state_from(payload: bytes, covered: int) -> ManifestState | None:
    try:
        with gc_paused():
            finished, rows = marshal.loads(payload)
        open_ = dict(_entry_from_row(row) for row in rows)
    except (ValueError, EOFError, TypeError) as exc:
        log.info("ignoring an unreadable state cache: %s", exc)
        return None
    if not isinstance(finished, dict):
        return None
    return ManifestState(finished=finished, open=open_, offset=covered)


_Row = tuple[str, str, str, tuple[tuple[str | None, str | None], ...], str | None, int]


def _entry_row(key: str, entry: Entry) -> _Row:
    pending = tuple((p.url, p.id) for p in entry.pending)
    return (key, entry.status, entry.source, pending, entry.error_kind, entry.attempts)


def _entry_from_row(row: _Row) -> tuple[str, Entry]:
    key, status, source, pending, error_kind, attempts = row
    images = tuple(GeneratedImage(url=url, id=id_) for url, id_ in pending)
    if status == "failed":
        return key, Entry("failed", source, images, error_kind, attempts)
    if status == "generated":
        return key, Entry("generated", source, images, error_kind, attempts)
    raise ValueError(f"unexpected status {status!r} in the state cache")
