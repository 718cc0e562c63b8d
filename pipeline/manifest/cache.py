"""A cache of the manifest's per-key state, so that resuming a big job reads a few lines.

Reading a finished million-line manifest costs seconds; loading this cache a fraction of that
(the figures are in the README, "Performance").
The cache is a log of segments, each the state change of a range of manifest bytes: a
run appends one every `SEGMENT_LINES` lines (so memory stays flat, and a killed run
loses at most its last few thousand lines to the slow path), and the first segment is
the whole state when a run starts from a cache that no longer fits.

The manifest stays the only truth. Each segment records the byte range it covers, a
fingerprint of the manifest up to its end (sampled blocks and the last block) and the
manifest's mtime; the cache is used only while the manifest still holds those bytes
(lines after them are read as usual) and, if it has not grown since, has the same mtime.
A copy of OUT that keeps mtimes (a restored CI cache, rsync -a) keeps its cache. Any
doubt (another Python, a rewritten or different manifest, a damaged cache) means the
manifest is read in full; a torn last segment is dropped. Deleting the cache is always
safe.

Beyond the manifest, the cache remembers one thing: the new stats of image files that a
resume re-hashed because their size or mtime differed from the manifest's, and found
unchanged (`refresh`; as git's index does). Without it such a file would be re-hashed on
every resume; deleting the cache only costs that re-hash once more.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import marshal
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..records import BatchRef, GeneratedImage
from ..store import layout
from .log import (
    Entry,
    Finished,
    ManifestState,
    apply_line,
    load_state,
    read_more,
)

__all__ = ["SEGMENT_LINES", "StateCache", "cache_path", "load_cached_state"]

log = logging.getLogger(__name__)

SEGMENT_LINES = 8192  # manifest lines per segment: ~3 MB of state held while a run writes
MAX_SEGMENTS = 256  # past this many, a run starts by writing the whole state as one
_FORMAT = 6  # 4: an ok key's files carry their stats; 5: submitted keys their batch;
# 6: each segment says whether a line it covers holds a stage's result (`staged`)
_BLOCK = 4096  # bytes per sample of a manifest's fingerprint
_SAMPLES = 16  # evenly spaced samples, plus the last block
_PYTHON = f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}"  # marshal


def cache_path(manifest: Path) -> Path:
    """``OUT/.manifest.jsonl.state`` beside the manifest."""
    return layout.state_cache_path(manifest)


def load_cached_state(manifest: Path) -> ManifestState:
    """`load_state` of `manifest`, starting from the cache when it still fits (read only:
    for `status` and `plan`)."""
    return StateCache(manifest).load()


class StateCache:
    """Keeps the cache in step with the manifest while one run appends to it.

    Give `add` to the manifest writer (`ManifestWriter.add_append_hook`), call `start`
    once the writer is open and before anything is appended, and `close` at the end.
    Runs under the OUT lock. A cache is never worth failing a run: on any OS error it
    logs once and stops (the next resume reads more of the manifest).
    """

    def __init__(self, manifest: Path, *, segment_lines: int = SEGMENT_LINES) -> None:
        self._manifest = manifest
        self._path = cache_path(manifest)
        self._segment_lines = segment_lines
        self._buffer = ManifestState()
        self._lines = 0
        self._covered = 0
        self._fh: IO[bytes] | None = None
        self._sources: dict[str, str] = {}
        self._cached: _Cached | None = None

    def load(self, *, with_hashes: bool = False) -> ManifestState:
        """The manifest's state: from the cache plus the lines after it, or (for
        `with_hashes`, which the cache does not keep) from every line."""
        if with_hashes:
            return load_state(self._manifest, with_hashes=True)
        self._cached = _read_cache(self._manifest)
        if self._cached is None:
            return load_state(self._manifest)
        state = self._cached.state
        read_more(self._manifest, state)
        return state

    def start(self, state: ManifestState) -> None:
        """Bring `state` up to the manifest's end and make the cache cover all of it."""
        try:
            read_more(self._manifest, state)  # a torn line the writer just fenced may parse now
            self._fh = self._open_for(state)
        except OSError as exc:
            self._give_up(exc)
            return
        self._covered = state.offset

    def add(self, line: Mapping[str, Any], end: int) -> None:
        """A line the writer appended, ending at manifest byte `end`."""
        if self._fh is None:
            return
        source = str(line.get("source", ""))
        apply_line(self._buffer, line, self._sources.setdefault(source, source))
        self._buffer.offset = end
        self._lines += 1
        if self._lines >= self._segment_lines:
            self.flush()

    def flush(self) -> None:
        """Append the lines added since the last segment as a segment."""
        if self._fh is None or not self._lines:
            return
        try:
            self._append_segment(self._fh, self._buffer, self._covered)
        except OSError as exc:
            self._give_up(exc)
            return
        self._covered = self._buffer.offset
        self._buffer = ManifestState()
        self._lines = 0

    def refresh(self, entries: Mapping[str, Finished]) -> None:
        """Remember ok keys whose files were re-hashed and found unchanged, with the stats
        they have now (a segment that covers no manifest bytes). Call it before the run
        appends lines about these keys: a later line still wins over it."""
        if self._fh is None or not entries:
            return
        self.flush()
        try:
            self._append_segment(
                self._fh, ManifestState(dict(entries), offset=self._covered), self._covered
            )
        except OSError as exc:
            self._give_up(exc)

    def close(self) -> None:
        """Flush and close; safe to call twice."""
        self.flush()
        if self._fh is not None:
            fh, self._fh = self._fh, None
            with contextlib.suppress(OSError):  # every segment was flushed when written
                fh.close()

    def _open_for(self, state: ManifestState) -> IO[bytes]:
        """The cache file, open for appending, covering the manifest up to `state.offset`."""
        cached, self._cached = self._cached, None
        if cached is None or cached.segments >= MAX_SEGMENTS or cached.covered > state.offset:
            return self._rewrite(state)
        fh = self._path.open("r+b")
        fh.truncate(cached.valid_bytes)  # drop a torn segment of a killed run
        fh.seek(cached.valid_bytes)
        if cached.covered < state.offset:  # lines no segment holds yet: read them once more
            tail = ManifestState(offset=cached.covered)
            read_more(self._manifest, tail)
            self._append_segment(fh, tail, cached.covered)
        return fh

    def _rewrite(self, state: ManifestState) -> IO[bytes]:
        """Replace the cache by one segment holding all of `state` (atomically)."""
        # disposable: atomic (no reader sees half a segment), not worth an fsync
        layout.write_atomic(self._path, lambda fh: self._append_segment(fh, state, 0), fsync=False)
        return self._path.open("ab")

    def _append_segment(self, fh: IO[bytes], state: ManifestState, start: int) -> None:
        rows = [_entry_row(key, entry) for key, entry in state.open.items()]
        payload = marshal.dumps((state.finished, rows))
        header = {
            "format": _FORMAT,
            "python": _PYTHON,
            "from": start,
            "to": state.offset,
            "fingerprint": _fingerprint(self._manifest, state.offset),
            "manifest_mtime_ns": self._manifest.stat().st_mtime_ns,
            "payload_bytes": len(payload),
            "payload_crc32": zlib.crc32(payload),
            "staged": state.staged,
        }
        fh.write(json.dumps(header).encode() + b"\n" + payload)
        fh.flush()

    def _give_up(self, exc: OSError) -> None:
        log.info("not keeping the state cache of %s: %s", self._manifest, exc)
        fh, self._fh = self._fh, None
        with contextlib.suppress(OSError):
            if fh is not None:
                fh.close()
            self._path.unlink(missing_ok=True)  # a stale cache would only be read in full


@dataclass(slots=True)
class _Cached:
    state: ManifestState
    covered: int  # manifest bytes the cache holds the state of
    valid_bytes: int  # cache bytes up to the end of its last sound segment
    segments: int


def _read_cache(manifest: Path) -> _Cached | None:
    try:
        data = cache_path(manifest).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.info("ignoring the state cache of %s: %s", manifest, exc)
        return None
    cached, last = _segments(memoryview(data))  # the GC is the caller's (`gc_paused`)
    if cached is None or last is None or not _fits(last, manifest):
        return None
    cached.state.offset = cached.covered
    return cached


def _segments(data: memoryview) -> tuple[_Cached | None, dict[str, Any] | None]:
    """The state of the sound, contiguous segments at the start of `data`, and the
    header of the last one."""
    cached: _Cached | None = None
    last: dict[str, Any] | None = None
    pos = covered = 0
    while pos < len(data):
        header, payload_at = _header(data, pos)
        if header is None or header["from"] != covered:
            break
        end = payload_at + header["payload_bytes"]
        payload = data[payload_at:end]
        if (
            len(payload) != header["payload_bytes"]
            or zlib.crc32(payload) != header["payload_crc32"]
        ):
            break  # torn by a kill while appending, or damaged
        segment = _state_from(payload)
        if segment is None:
            break
        segment.staged = header.get("staged") is True
        if cached is None:
            cached = _Cached(segment, 0, 0, 0)
        else:
            _merge(cached.state, segment)
        covered, pos, last = header["to"], end, header
        cached.covered, cached.valid_bytes, cached.segments = covered, end, cached.segments + 1
    return cached, last


def _header(data: memoryview, pos: int) -> tuple[dict[str, Any] | None, int]:
    end = bytes(data[pos : pos + 1024]).find(b"\n")
    if end < 0:
        return None, 0
    try:
        header = json.loads(bytes(data[pos : pos + end]))
    except ValueError:
        return None, 0
    fields = ("from", "to", "payload_bytes", "payload_crc32")
    if (
        not isinstance(header, dict)
        or header.get("format") != _FORMAT
        or header.get("python") != _PYTHON
        or not all(isinstance(header.get(f), int) for f in fields)
    ):
        return None, 0
    return header, pos + end + 1


def _fits(last: Mapping[str, Any], manifest: Path) -> bool:
    """The manifest still holds what the cache covered: at least as many bytes, the same
    fingerprint of them, and, when it has not grown since, the same mtime. A copy of OUT
    (restored from a CI cache, rsynced) keeps its cache; an edited manifest does not."""
    covered, mtime_recorded = last["to"], last.get("manifest_mtime_ns")
    try:
        info = manifest.stat()
    except FileNotFoundError:
        return False
    if info.st_size < covered:
        return False
    if info.st_size == covered and info.st_mtime_ns != mtime_recorded:
        return False  # rewritten in place since, without growing
    return bool(last.get("fingerprint") == _fingerprint(manifest, covered))


def _merge(state: ManifestState, later: ManifestState) -> None:
    """Apply a later segment: its keys' last lines win."""
    if state.open:
        for key in later.finished:
            state.open.pop(key, None)
    state.finished.update(later.finished)
    for key in later.open:
        state.finished.pop(key, None)
    state.open.update(later.open)
    state.staged = state.staged or later.staged


def _fingerprint(manifest: Path, covered: int) -> str:
    """sha256 of the manifest's first `covered` bytes as sampled: 4 KB at 16 evenly spaced
    offsets and the last 4 KB (lines are only ever appended; this catches an edit or a
    different manifest at a cost of 17 small reads)."""
    digest = hashlib.sha256(str(covered).encode())
    starts = {covered * i // _SAMPLES for i in range(_SAMPLES)} | {covered - _BLOCK}
    with manifest.open("rb") as fh:
        for start in sorted(max(0, s) for s in starts):
            fh.seek(start)
            digest.update(fh.read(min(_BLOCK, covered - start)))
    return digest.hexdigest()


def _state_from(payload: memoryview) -> ManifestState | None:
    try:
        finished, rows = marshal.loads(payload)
        open_ = dict(_entry_from_row(row) for row in rows)
    except (ValueError, EOFError, TypeError) as exc:
        log.info("ignoring an unreadable state cache segment: %s", exc)
        return None
    if not isinstance(finished, dict):
        return None
    return ManifestState(finished=finished, open=open_)


_Row = tuple[
    str,
    str,
    str,
    tuple[tuple[str | None, str | None], ...],
    str | None,
    int,
    tuple[str, str | None] | None,
]


def _entry_row(key: str, entry: Entry) -> _Row:
    pending = tuple((p.url, p.id) for p in entry.pending)
    batch = (entry.batch.input_file_id, entry.batch.batch_id) if entry.batch else None
    return (key, entry.status, entry.source, pending, entry.error_kind, entry.attempts, batch)


def _entry_from_row(row: _Row) -> tuple[str, Entry]:
    key, status, source, pending, error_kind, attempts, batch = row
    images = tuple(GeneratedImage(url=url, id=id_) for url, id_ in pending)
    ref = BatchRef(*batch) if batch is not None else None
    if status in ("failed", "generated", "submitted"):
        return key, Entry(status, source, images, error_kind, attempts, ref)  # type: ignore[arg-type]
    raise ValueError(f"unexpected status {status!r} in the state cache")
