"""All of OUT's manifests read as one: ``manifest.jsonl`` and each shard's.

Shard runs (``--shard I/N``) append to manifests of their own, so every reader folds
them: per key, an ``ok`` line wins over any other (a shard of another N may have tried
the item again and failed, but its images are stored), else the line of the file read
last (`manifest_files` order). With only ``manifest.jsonl`` present this is exactly
what reading it alone gives, at no extra cost.

`carry_over` is how a run starts from everything OUT knows while writing one file: the
last line of each key it owns that its own manifest lacks (or has only as not ok) is
appended to it first, so re-sharding, or going back to no shard, never pays again for
an item done, answered or waiting in a batch under another shard.

`merge` folds the shards' manifests into ``manifest.jsonl`` (``synthaug merge``): the
folded records are written to a temporary file, fsynced, renamed over it, and only then
are the shards' files removed, so a kill at any moment loses nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ..records import ItemRecord
from ..store.layout import (
    MANIFEST_NAME,
    fsync_dir,
    manifest_files,
    state_cache_path,
)
from .cache import load_cached_state
from .log import ManifestState, read_records
from .writer import ManifestWriter

__all__ = [
    "carry_over",
    "fold_records",
    "fold_states",
    "load_all_states",
    "merge",
    "read_all_records",
]


def read_all_records(out_dir: Path) -> dict[str, ItemRecord]:
    """The folded last record of each key over every manifest in `out_dir`."""
    return fold_records(read_records(path) for path in manifest_files(out_dir))


def fold_records(files: Iterable[dict[str, ItemRecord]]) -> dict[str, ItemRecord]:
    """Per key, an ok record over any other, else the later file's."""
    folded: dict[str, ItemRecord] = {}
    for records in files:
        for key, record in records.items():
            known = folded.get(key)
            if known is None or record.status == "ok" or known.status != "ok":
                folded[key] = record
    return folded


def load_all_states(out_dir: Path) -> ManifestState:
    """The folded compact state of every manifest in `out_dir` (each from its cache)."""
    files = manifest_files(out_dir)
    if len(files) <= 1:
        return load_cached_state(files[0] if files else out_dir / MANIFEST_NAME)
    return fold_states(load_cached_state(path) for path in files)


def fold_states(states: Iterable[ManifestState]) -> ManifestState:
    """Per key, finished (ok) over open, else the later state's."""
    folded = ManifestState()
    for state in states:
        for key, entry in state.open.items():
            if key not in folded.finished:
                folded.open[key] = entry
        for key, finished in state.finished.items():
            folded.finished[key] = finished
            folded.open.pop(key, None)
        folded.staged = folded.staged or state.staged
    return folded


def carry_over(
    own: Path, out_dir: Path, owns: Callable[[str], bool], *, fsync_interval_s: float
) -> int:
    """Append to the manifest `own` the folded last record of each key `owns` accepts
    that the other manifests in `out_dir` hold and `own` lacks (or holds only as not ok
    while another holds it ok); the number appended."""
    others = [path for path in manifest_files(out_dir) if path != own]
    if not others:
        return 0
    mine = read_records(own)
    wanted = [
        record
        for key, record in fold_records(read_records(path) for path in others).items()
        if owns(key) and _newer(mine.get(key), record)
    ]
    if wanted:
        with ManifestWriter(own, fsync_interval_s=fsync_interval_s) as writer:
            for record in wanted:
                writer.append(record)
    return len(wanted)


def _newer(mine: ItemRecord | None, theirs: ItemRecord) -> bool:
    return mine is None or (theirs.status == "ok" and mine.status != "ok")


def merge(out_dir: Path) -> tuple[int, int]:
    """Fold every manifest of `out_dir` into ``manifest.jsonl`` and remove the shards'
    (the caller holds every lock); (manifests folded, items). See the module docstring."""
    files = manifest_files(out_dir)
    folded = fold_records(read_records(path) for path in files)
    target = out_dir / MANIFEST_NAME
    temporary = out_dir / f".{MANIFEST_NAME}.merging"
    temporary.unlink(missing_ok=True)
    with ManifestWriter(temporary, fsync_interval_s=0.0) as writer:
        for record in folded.values():
            writer.append(record)
    os.replace(temporary, target)
    state_cache_path(target).unlink(missing_ok=True)  # it described the old file
    fsync_dir(out_dir)
    for path in files:
        if path != target:
            path.unlink(missing_ok=True)
            state_cache_path(path).unlink(missing_ok=True)
    fsync_dir(out_dir)
    return len(files), len(folded)
