"""The JSONL checkpoint: one line per item attempt, appended, last line per key wins.

The manifest is what makes a killed run resumable without paying twice, so it is
written defensively: a line is one ``write`` of a complete JSON object plus newline,
flushed to the OS at once (a crash of the process loses nothing written) and fsynced
in batches (a power loss loses at most the last batch). A torn final line, left by a
kill in the middle of a write, is ignored on read and fenced off by a newline before
the next run appends.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.records import GeneratedImage, ItemRecord, ItemStatus, OutputFile

__all__ = [
    "MANIFEST_NAME",
    "Entry",
    "ManifestState",
    "ManifestWriter",
    "load_state",
    "read_latest",
    "read_lines",
]

MANIFEST_NAME = "manifest.jsonl"
DEFAULT_FSYNC_INTERVAL_S = 0.5

log = logging.getLogger(__name__)


def read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Yield every well-formed manifest line in file order, skipping torn or junk lines."""
    if not path.exists():
        return
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            record = _parse_line(raw)
            if record is None:
                if raw.strip():
                    log.warning("%s:%d: ignoring a torn or unreadable manifest line", path, lineno)
                continue
            yield record


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    if not raw.endswith(b"\n"):
        return None  # torn: the writer was killed before the newline
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        return None
    if record.get("status") not in ("ok", "failed", "generated"):
        return None
    return record


def read_latest(path: Path) -> dict[str, dict[str, Any]]:
    """The last line for each key, as raw dicts (for reports and grids, not hot paths)."""
    latest: dict[str, dict[str, Any]] = {}
    for record in read_lines(path):
        latest[record["key"]] = record
    return latest


@dataclass(frozen=True, slots=True)
class Entry:
    """The compact state of one key: what resume and status need, nothing more."""

    status: ItemStatus
    source: str
    outputs: tuple[OutputFile, ...] = ()
    pending: tuple[GeneratedImage, ...] = ()
    error_kind: str | None = None
    attempts: int = 0


@dataclass(slots=True)
class ManifestState:
    """Last known state per key, read from a manifest."""

    entries: dict[str, Entry] = field(default_factory=dict)

    def get(self, key: str) -> Entry | None:
        """The entry for `key`, or None when the manifest never saw it."""
        return self.entries.get(key)

    def __len__(self) -> int:
        return len(self.entries)


def load_state(path: Path) -> ManifestState:
    """Read the manifest at `path` into a compact per-key state (empty when absent)."""
    state = ManifestState()
    sources: dict[str, str] = {}  # intern source names: 1M lines share a handful
    for record in read_lines(path):
        source = str(record.get("source", ""))
        source = sources.setdefault(source, source)
        state.entries[record["key"]] = _entry_from(record, source)
    return state


def _entry_from(record: Mapping[str, Any], source: str) -> Entry:
    status: ItemStatus = record["status"]
    error = record.get("error") or {}
    outputs: tuple[OutputFile, ...] = ()
    pending: tuple[GeneratedImage, ...] = ()
    if status == "ok":
        outputs = tuple(_checkable(o) for o in record.get("outputs") or ())
    elif status == "generated":
        pending = tuple(
            GeneratedImage(url=p.get("url"), id=p.get("id")) for p in record.get("pending") or ()
        )
    return Entry(
        status=status,
        source=source,
        outputs=outputs,
        pending=pending,
        error_kind=error.get("kind") if isinstance(error, dict) else None,
        attempts=int(record.get("attempts") or 0),
    )


def _checkable(output: Mapping[str, Any]) -> OutputFile:
    """What resume needs to check a stored file: path, hash, size (no URL or id: a state
    of a million entries is mostly these strings)."""
    size = output.get("bytes")
    return OutputFile(
        path=str(output["path"]),
        sha256=str(output["sha256"]),
        width=0,
        height=0,
        bytes=size if isinstance(size, int) else None,
    )


class ManifestWriter:
    """Appends manifest lines: each handed to the OS at once, fsynced at most every interval.

    Writes are unbuffered (`os.write` on an ``O_APPEND`` descriptor), so a line the disk
    refuses (ENOSPC) raises at once and is cut back off the file: no torn line is left
    for the next line to run into, and no half-line sits in a buffer to be flushed later
    or to make `close` raise. Use as a context manager; `close` fsyncs whatever is left.
    """

    def __init__(
        self,
        path: Path,
        *,
        fsync_interval_s: float = DEFAULT_FSYNC_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._interval = fsync_interval_s
        self._clock = clock
        self._last_sync = clock()
        self._dirty = False
        self._fence = False  # a failed line could not be cut off: start the next on a new line
        self._fd: int | None = self._open(path)

    @staticmethod
    def _open(path: Path) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(fd).st_size > 0 and not _ends_with_newline(path):
                _write_all(fd, b"\n")  # fence off a torn line so the next record parses
        except BaseException:
            os.close(fd)
            raise
        return fd

    def append(self, record: ItemRecord | Mapping[str, Any]) -> None:
        """Write one line (the whole object, then newline) and hand it to the OS.

        Raises `OSError` when the disk refuses it (disk full, read-only remount); the
        file is then left as it was before this line.
        """
        if self._fd is None:
            raise ValueError(f"{self._path}: manifest writer is closed")
        data = record.to_json() if isinstance(record, ItemRecord) else dict(record)
        line = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
        payload = line.encode("utf-8") + b"\n"
        if self._fence:
            payload = b"\n" + payload
        size = os.fstat(self._fd).st_size  # one writer holds the OUT lock: this is our end
        try:
            _write_all(self._fd, payload)
        except OSError:
            self._cut(size)
            raise
        self._fence = False
        self._dirty = True
        if self._clock() - self._last_sync >= self._interval:
            self.sync()

    def _cut(self, size: int) -> None:
        """Remove what a failed append wrote past `size`, or fence it off if we cannot."""
        assert self._fd is not None
        try:
            if os.fstat(self._fd).st_size > size:
                os.ftruncate(self._fd, size)
        except OSError:
            self._fence = True

    def sync(self) -> None:
        """fsync what was written since the last sync.

        A failing fsync is logged, not raised: every line is already with the OS (a crash
        of this process loses nothing), and raising here would lose the run's summary.
        """
        if self._dirty and self._fd is not None:
            try:
                os.fsync(self._fd)
                self._dirty = False
            except OSError as exc:
                log.warning(
                    "%s: fsync failed (%s); lines may not survive a power loss",
                    self._path,
                    exc.strerror or exc,
                )
        self._last_sync = self._clock()

    def close(self) -> None:
        """Sync and close; safe to call twice."""
        if self._fd is not None:
            self.sync()
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"
