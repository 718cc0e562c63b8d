"""Reading the JSONL checkpoint: one line per item attempt, last line per key wins.

A torn final line (a kill in the middle of a write) is ignored. `load_state` builds the
compact per-key state a resume needs, with a fast path for the lines the writer
(`pipeline.manifest.writer`) makes: that path matches their exact bytes, so a change to
`OutputFile.to_json` or `ItemRecord.to_json` must keep `_fast_ok` in step (the tests
`test_writer_lines_take_the_fast_path` and the hypothesis comparison with the full parse
say so at once).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..records import (
    ITEM_STATUSES,
    STAGE_FIELDS,
    BatchRef,
    GeneratedImage,
    ItemRecord,
    ItemStatus,
    batch_from_json,
)
from ..store.layout import IMAGE_NAME, IMAGES_DIR, MANIFEST_NAME

__all__ = [
    "MANIFEST_NAME",
    "Entry",
    "Finished",
    "ManifestState",
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
    # Some ok line read into this state holds a stage's result (`phash`, `flags`,
    # `labels`, `upload`): a hint that lets `status` skip its stage pass over a job
    # without stages. Never cleared by a later line (a false "yes" costs one more pass).
    staged: bool = False

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
    rb'"bytes":([0-9]+)(?:,"mtime_ns":(?:([0-9]+)|null))?(' + _STAGE_FIELDS + rb")\}"
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
            key, source, paths, stats, staged = fast
            finished[key] = (sources.setdefault(source, source), paths, stats)
            if open_:
                open_.pop(key, None)
            if staged:
                state.staged = True
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


def _fast_ok(
    raw: bytes,
) -> tuple[str, str, tuple[str, ...], tuple[Stat | None, ...], bool] | None:
    """Key, source, file paths and stats of a canonical `ok` line, and whether a file
    holds a stage's result, or None to parse it in full.

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
    staged = False
    for path, size, mtime, stage_fields in found:
        if not path.startswith(prefix):
            return None
        paths.append(path.decode())
        stats.append((int(size), int(mtime)) if mtime else None)
        staged = staged or bool(stage_fields)
    return key.decode(), source.decode(), tuple(paths), tuple(stats), staged


def apply_line(state: ManifestState, record: Mapping[str, Any], source: str) -> None:
    """Make `record` (a parsed manifest line) the last known line of its key."""
    key, status = record["key"], record["status"]
    if status == "ok":
        outputs = [o for o in record.get("outputs") or () if isinstance(o, Mapping)]
        paths = tuple(str(o.get("path", "")) for o in outputs)
        state.finished[key] = (source, paths, tuple(_recorded_stat(o) for o in outputs))
        if not state.staged and any(STAGE_FIELDS.intersection(o) for o in outputs):
            state.staged = True
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
