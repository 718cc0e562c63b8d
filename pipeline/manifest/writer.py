"""Appending to the manifest: one line per record, with the OS at once, fsynced in batches.

The manifest is what makes a killed run resumable without paying twice, so it is written
defensively: a line is one ``write`` of a complete JSON object plus newline, handed to
the OS at once (a crash of the process loses nothing written) and fsynced in batches (a
power loss loses at most the last batch). A torn final line, left by a kill in the
middle of a write, is fenced off by a newline before the next run appends; the reader
(`pipeline.manifest.log`) ignores it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..records import ItemRecord
from ..store.layout import write_all
from .flusher import Flusher

__all__ = ["DEFAULT_FSYNC_INTERVAL_S", "ManifestWriter"]

DEFAULT_FSYNC_INTERVAL_S = 0.5
_HOOK_PASSES = 3  # sync hook passes at most, while lines keep arriving during them

log = logging.getLogger("pipeline.manifest.log")


class ManifestWriter:
    """Appends manifest lines: each handed to the OS at once, fsynced at most every interval.

    Writes are unbuffered (`os.write` on an ``O_APPEND`` descriptor), so a line the disk
    refuses (ENOSPC) raises at once and is cut back off the file: no torn line is left
    for the next line to run into, and no half-line sits in a buffer to be flushed later
    or to make `close` raise. Use as a context manager; `close` fsyncs whatever is left.

    The periodic fsync runs on the writer's own thread (`Flusher`), not in `append`:
    `append` is called on the event loop, and an fsync there held up every request in
    flight. `sync` stays synchronous (durable when it returns), and so does the fsync of
    ``fsync_interval_s=0`` (every line durable before `append` returns). Lines are
    appended from one thread at a time.

    Hooks given to `add_sync_hook` run before every fsync of the manifest, on whichever
    thread syncs (so they must be thread-safe): the engine makes the renames of the image
    files durable there, so that a line is never durable before the files it names. A
    line appended while the hooks run makes them run again (up to `_HOOK_PASSES` times)
    before the fsync.
    """

    def __init__(
        self,
        path: Path,
        *,
        fsync_interval_s: float = DEFAULT_FSYNC_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        fsync: Callable[[int], None] | None = None,
    ) -> None:
        self._path = path
        self._interval = fsync_interval_s
        self._clock = clock
        self._fsync = fsync  # None: os.fsync, looked up when called
        self._hooks: list[Callable[[], None]] = []
        self._append_hooks: list[Callable[[Mapping[str, Any], int], None]] = []
        self._encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)
        self._last_sync = clock()
        self._written = 0  # lines appended; `_synced`: of those, how many an fsync covered
        self._synced = 0
        self._sync_lock = threading.Lock()  # one sync at a time: the flusher's or a caller's
        self._flusher: Flusher | None = None  # started by the first periodic fsync
        self._fence = False  # a failed line could not be cut off: start the next on a new line
        self._fd: int | None = self._open(path)

    @property
    def path(self) -> Path:
        """The manifest this writer appends to."""
        return self._path

    @staticmethod
    def _open(path: Path) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(fd).st_size > 0 and not _ends_with_newline(path):
                write_all(fd, b"\n")  # fence off a torn line so the next record parses
        except BaseException:
            os.close(fd)
            raise
        return fd

    def append(self, record: ItemRecord) -> None:
        """Write one record as a line (the whole object, then newline) and hand it to the OS.

        Only records: every line is one the readers know, in the fields' canonical order
        (the resume's fast path reads exactly that).

        Raises `OSError` when the disk refuses it (disk full, read-only remount); the
        file is then left as it was before this line.
        """
        if self._fd is None:
            raise ValueError(f"{self._path}: manifest writer is closed")
        data = record.to_json()
        line = self._encoder.encode(data)
        payload = line.encode("utf-8") + b"\n"
        if self._fence:
            payload = b"\n" + payload
        size = os.fstat(self._fd).st_size  # one writer holds the OUT lock: this is our end
        try:
            write_all(self._fd, payload)
        except OSError:
            self._cut(size)
            raise
        self._fence = False
        self._written += 1
        for hook in self._append_hooks:
            hook(data, size + len(payload))
        if self._clock() - self._last_sync >= self._interval:
            self._sync_soon()

    def _sync_soon(self) -> None:
        """The periodic fsync: on the flusher thread, or here for an interval of 0."""
        self._last_sync = self._clock()
        if self._interval <= 0:
            self.sync()
            return
        if self._flusher is None:
            self._flusher = Flusher(self.sync, name=f"fsync {self._path.name}")
        self._flusher.request()

    def add_append_hook(self, hook: Callable[[Mapping[str, Any], int], None]) -> None:
        """Call `hook(line, end)` after each line is written: the line as a dict and the
        manifest's size after it (the state cache follows the manifest this way)."""
        self._append_hooks.append(hook)

    def _cut(self, size: int) -> None:
        """Remove what a failed append wrote past `size`, or fence it off if we cannot."""
        assert self._fd is not None
        try:
            if os.fstat(self._fd).st_size > size:
                os.ftruncate(self._fd, size)
        except OSError:
            self._fence = True

    def add_sync_hook(self, hook: Callable[[], None]) -> None:
        """Run `hook` before each fsync of the manifest (an `OSError` from it is logged)."""
        self._hooks.append(hook)

    def sync(self) -> None:
        """Run the sync hooks, then fsync what was written since the last sync; every line
        appended before the call is durable when it returns (waits for a background
        fsync under way, then makes its own).

        A failing fsync is logged, not raised: every line is already with the OS (a crash
        of this process loses nothing), and raising here would lose the run's summary.
        """
        with self._sync_lock:
            written = self._run_hooks()
            if written > self._synced and self._fd is not None:
                try:
                    (self._fsync or os.fsync)(self._fd)
                    self._synced = max(self._synced, written)
                except OSError as exc:
                    log.warning(
                        "%s: fsync failed (%s); lines may not survive a power loss",
                        self._path,
                        exc.strerror or exc,
                    )
            self._last_sync = self._clock()

    def _run_hooks(self) -> int:
        """Run the sync hooks until no line was appended meanwhile (or `_HOOK_PASSES`
        times); the count of lines appended before the last pass began."""
        for _ in range(_HOOK_PASSES):
            written = self._written
            for hook in self._hooks:
                try:
                    hook()
                except OSError as exc:
                    log.warning(
                        "%s: could not make image files durable (%s); they may not survive "
                        "a power loss",
                        self._path,
                        exc.strerror or exc,
                    )
            if self._written == written:
                break
        return written

    def close(self) -> None:
        """Let a background fsync finish, sync and close; safe to call twice."""
        if self._fd is not None:
            if self._flusher is not None:
                self._flusher.close()
            self.sync()
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"
