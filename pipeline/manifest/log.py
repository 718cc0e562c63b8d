"""The JSONL checkpoint: one line per item attempt, appended, last line per key wins.

The manifest is what makes a killed run resumable without paying twice, so it is
written defensively: a line is one ``write`` of a complete JSON object plus newline,
flushed to the OS at once (a crash of the process loses nothing written) and fsynced
in batches (a power loss loses at most the last batch). A torn final line, left by a
kill in the middle of a write, is ignored on read and fenced off by a newline before
the next run appends.

About 450 lines, kept together: the reader, the state it builds (with the fast path for
the writer's own canonical lines) and the writer all depend on the exact bytes of one line
format, and a change to one must be seen next to the others.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..records import (
    ITEM_STATUSES,
    BatchRef,
    GeneratedImage,
    ItemRecord,
    ItemStatus,
    batch_from_json,
)
from ..store.layout import IMAGE_NAME, IMAGES_DIR, MANIFEST_NAME, write_all
from .flusher import Flusher

__all__ = [
    "MANIFEST_NAME",
    "Entry",
    "Finished",
    "ManifestState",
    "ManifestWriter",
    "Stat",
    "apply_line",
    "gc_paused",
    "load_state",
    "read_latest",
    "read_lines",
    "read_more",
    "read_records",
    "recorded_hashes",
]

DEFAULT_FSYNC_INTERVAL_S = 0.5
_HOOK_PASSES = 3  # sync hook passes at most, while lines keep arriving during them

log = logging.getLogger(__name__)


def read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Yield every well-formed manifest line in file order, skipping torn or junk lines."""
    for offset, raw in _raw_lines(path):
        record = _parse_line(raw)
        if record is None:
            _warn_unreadable(path, offset, raw)
            continue
        yield record


def _raw_lines(path: Path, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of every line from byte `start` on."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return
    with fh:
        fh.seek(start)
        offset = start
        for raw in fh:
            yield offset, raw
            offset += len(raw)


def _warn_unreadable(path: Path, offset: int, raw: bytes) -> None:
    if raw.strip():
        log.warning("%s: ignoring a torn or unreadable manifest line at byte %d", path, offset)


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    if not raw.endswith(b"\n"):
        return None  # torn: the writer was killed before the newline
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        return None
    if record.get("status") not in ITEM_STATUSES:
        return None
    return record


def read_latest(path: Path) -> dict[str, dict[str, Any]]:
    """The last line for each key, as raw dicts (for reports and grids, not hot paths)."""
    latest: dict[str, dict[str, Any]] = {}
    for record in read_lines(path):
        latest[record["key"]] = record
    return latest


def read_records(path: Path) -> dict[str, ItemRecord]:
    """The last line for each key as an `ItemRecord` (for the views, not hot paths)."""
    latest: dict[str, ItemRecord] = {}
    for line in read_lines(path):
        record = ItemRecord.from_json(line)
        if record is not None:
            latest[record.key] = record
    return latest


@dataclass(frozen=True, slots=True)
class Entry:
    """The compact state of a key that is not finished: what resume and status need."""

    status: ItemStatus
    source: str
    pending: tuple[GeneratedImage, ...] = ()
    error_kind: str | None = None
    attempts: int = 0
    batch: BatchRef | None = None  # `submitted`: the batch its request waits in


Stat = tuple[int, int]
"""A file's size and mtime in nanoseconds: what resume compares before it re-hashes."""

Finished = tuple[str, tuple[str, ...], tuple[Stat | None, ...]]
"""An ok key's source, its files' paths (relative to OUT) and their recorded stats (None
where the line recorded none: a manifest from before mtimes were recorded). A bare tuple
on purpose: the state of a finished million-item job is a million of these, built in
about a second."""


@dataclass(slots=True)
class ManifestState:
    """Last known state per key, read from a manifest.

    `finished` holds the ok keys, `open` the failed and generated ones: a key is in at
    most one of them (its last line wins). `hashes` (ok key -> sha256 of each file, in
    the order of its paths) is loaded only for ``run --verify``.
    """

    finished: dict[str, Finished] = field(default_factory=dict)
    open: dict[str, Entry] = field(default_factory=dict)
    hashes: dict[str, tuple[str, ...]] | None = None
    offset: int = 0  # manifest bytes read into this state: up to the end of a whole line

    def status(self, key: str) -> ItemStatus | None:
        """The status of the key's last line, or None when the manifest never saw it."""
        if key in self.finished:
            return "ok"
        entry = self.open.get(key)
        return None if entry is None else entry.status

    def __len__(self) -> int:
        return len(self.finished) + len(self.open)


# The writer's canonical `ok` line starts like this and lists its files right after
# `params`; for such lines the key, source, paths and stats are read without a full JSON
# parse (which would be most of what a large resume spends; README "Performance").
# Anything else takes the full parse. A file object is matched field by field, in
# `OutputFile.to_json` order.
_FAST_OK = re.compile(rb'\{"key":"([0-9a-f]{64})","status":"ok","source":"([A-Za-z0-9._-]+)",')
_OUTPUTS_START = b',"outputs":['
_OUTPUTS_END = b'],"attempts":'
_JSON_STR = rb'"[^"\\]*(?:\\.[^"\\]*)*"'  # a JSON string, escapes and all
_IMAGES = re.escape(IMAGES_DIR.encode())  # the layout's image folder, as `store_image` names it


def _nested(depth: int) -> bytes:
    """The inside of a JSON object or array nested up to `depth` levels (strings whole)."""
    inner = rb'(?:[^{}\[\]"]|' + _JSON_STR + rb")*"
    for _ in range(depth):
        inner = rb'(?:[^{}\[\]"]|' + _JSON_STR + rb"|\{" + inner + rb"\}|\[" + inner + rb"\])*"
    return inner


# What the stages after storage add to an output (`OutputFile`: upload, and the stages
# to come): fields after the file's own, each a JSON value nested at most 3 levels deep.
_STAGE_FIELDS = (
    rb'(?:,"[a-z_]+":(?:' + _JSON_STR + rb"|[-+0-9.eE]+|true|false|null"
    rb"|\{" + _nested(2) + rb"\}|\[" + _nested(2) + rb"\]))*"
)
_OUTPUT = (
    rb'\{"path":"(' + _IMAGES + rb"/[A-Za-z0-9._-]+/" + IMAGE_NAME.encode() + rb')",'
    rb'"sha256":"[0-9a-f]*","width":[0-9]+,"height":[0-9]+,'
    rb'"url":(?:null|' + _JSON_STR + rb'),"id":(?:null|' + _JSON_STR + rb"),"
    rb'"bytes":([0-9]+)(?:,"mtime_ns":(?:([0-9]+)|null))?' + _STAGE_FIELDS + rb"\}"
)
_FAST_OUTPUT = re.compile(_OUTPUT)
_FAST_OUTPUTS = re.compile(_OUTPUT + rb"(?:," + _OUTPUT + rb")*")  # a whole outputs list


def load_state(path: Path, *, with_hashes: bool = False) -> ManifestState:
    """Read the manifest at `path` into a compact per-key state (empty when absent).

    `with_hashes` also keeps every file's recorded sha256 (for ``run --verify``), which
    needs the full parse of every line.
    """
    state = ManifestState(hashes={} if with_hashes else None)
    read_more(path, state)
    return state


def read_more(path: Path, state: ManifestState) -> None:
    """Apply the lines after `state.offset` to `state` (a state from a cache, or read
    before a run appended to the manifest)."""
    sources: dict[str, str] = {}  # intern source names: 1M lines share a handful
    finished, open_ = state.finished, state.open
    fast_ok = _fast_ok if state.hashes is None else _no_fast_path
    for offset, raw in _raw_lines(path, state.offset):
        if raw.endswith(b"\n"):
            state.offset = offset + len(raw)
        fast = fast_ok(raw)
        if fast is not None:
            key, source, paths, stats = fast
            finished[key] = (sources.setdefault(source, source), paths, stats)
            if open_:
                open_.pop(key, None)
            continue
        record = _parse_line(raw)
        if record is None:
            _warn_unreadable(path, offset, raw)
            continue
        source = str(record.get("source", ""))
        apply_line(state, record, sources.setdefault(source, source))


def _no_fast_path(raw: bytes) -> None:
    """`--verify` needs every file's hash: parse every line in full."""
    return None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic GC while a million tuples are built: they hold no cycles, and each
    collection would walk all of them again (a tenth of the load time).

    Process-wide (every thread loses its GC meanwhile, and two threads pausing at once
    race on turning it back on), so the loaders never pause by themselves: only a
    process's owner wraps them in this (the CLI's `run`, `status` and `plan`).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _fast_ok(raw: bytes) -> tuple[str, str, tuple[str, ...], tuple[Stat | None, ...]] | None:
    """Key, source, file paths and stats of a canonical `ok` line, or None to parse it in
    full.

    Exact for the lines `ManifestWriter` writes: outside JSON strings a quote is never
    escaped and inside them always is, so the markers below cannot match string
    contents; every file object must match, and name this key under this source.
    """
    match = _FAST_OK.match(raw)
    if match is None or raw[-2:] != b"}\n":
        return None
    start = raw.find(_OUTPUTS_START, match.end())
    end = raw.find(_OUTPUTS_END, start)
    if start < 0 or end < 0:
        return None
    found = _FAST_OUTPUT.findall(raw, start, end)
    if not found:
        return None
    if len(found) != raw.count(b'{"', start, end) and not _FAST_OUTPUTS.fullmatch(
        raw, start + len(_OUTPUTS_START), end
    ):
        return None  # an object the pattern does not know: not a line the writer made
    key, source = match.groups()
    prefix = b"%s/%s/%s-" % (IMAGES_DIR.encode(), source, key[:16])
    paths: list[str] = []
    stats: list[Stat | None] = []
    for path, size, mtime in found:
        if not path.startswith(prefix):
            return None
        paths.append(path.decode())
        stats.append((int(size), int(mtime)) if mtime else None)
    return key.decode(), source.decode(), tuple(paths), tuple(stats)


def apply_line(state: ManifestState, record: Mapping[str, Any], source: str) -> None:
    """Make `record` (a parsed manifest line) the last known line of its key."""
    key, status = record["key"], record["status"]
    if status == "ok":
        outputs = [o for o in record.get("outputs") or () if isinstance(o, Mapping)]
        paths = tuple(str(o.get("path", "")) for o in outputs)
        state.finished[key] = (source, paths, tuple(_recorded_stat(o) for o in outputs))
        state.open.pop(key, None)
        if state.hashes is not None:
            state.hashes[key] = tuple(str(o.get("sha256", "")) for o in outputs)
        return
    state.finished.pop(key, None)
    error = record.get("error") or {}
    pending: tuple[GeneratedImage, ...] = ()
    if status == "generated":
        pending = tuple(
            GeneratedImage(url=p.get("url"), id=p.get("id"))
            for p in record.get("pending") or ()
            if isinstance(p, Mapping)
        )
    state.open[key] = Entry(
        status=status,
        source=source,
        pending=pending,
        error_kind=error.get("kind") if isinstance(error, dict) else None,
        attempts=int(record.get("attempts") or 0),
        batch=batch_from_json(record.get("batch")) if status == "submitted" else None,
    )


def _recorded_stat(output: Mapping[str, Any]) -> Stat | None:
    """The size and mtime a line recorded for a file, or None when it lacks either."""
    size, mtime = output.get("bytes"), output.get("mtime_ns")
    if type(size) is int and type(mtime) is int:  # not bool, not a float from a hand edit
        return size, mtime
    return None


def recorded_hashes(path: Path, keys: Collection[str]) -> dict[str, tuple[str, ...]]:
    """The sha256 of each file of the last `ok` line of each of `keys`, in the order of
    its paths: for the few files whose stat changed, read from the manifest (a pass over
    its lines that parses only theirs), where the compact state keeps no hashes."""
    wanted = {key.encode() for key in keys}
    found: dict[str, tuple[str, ...]] = {}
    for offset, raw in _raw_lines(path):
        if raw.startswith(b'{"key":"') and raw[8:72] not in wanted:
            continue  # canonical line of another key: no parse
        record = _parse_line(raw)
        if record is None:
            _warn_unreadable(path, offset, raw)
            continue
        key = record["key"]
        if key not in keys:
            continue
        if record["status"] == "ok":
            outputs = [o for o in record.get("outputs") or () if isinstance(o, Mapping)]
            found[key] = tuple(str(o.get("sha256", "")) for o in outputs)
        else:
            found.pop(key, None)
    return found


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
