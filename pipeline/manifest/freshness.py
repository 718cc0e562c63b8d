"""Which finished items still have the files the manifest recorded: the resume check.

An `ok` key is done while each of its files is in place with the recorded bytes. Reading
a million files every night to prove that is not an option, so (as git's index does) a
file whose size and mtime are those the manifest recorded is taken as unchanged; only a
file whose stat differs is re-hashed. Same hash: still done, and its new stat is
remembered (`Freshness.refreshed`, kept by the state cache) so that a copy of OUT that
did not keep mtimes is re-hashed once, not on every resume. Another hash, or no file:
the item runs again. ``run --verify`` re-hashes every file (`verify_key`).

A stat is remembered only when the file's mtime is clearly older than the moment it was
hashed: a file changed again within the file system's timestamp granularity would keep
its mtime, so such a "racy" stat is left to be re-hashed next time instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from operator import eq, itemgetter
from pathlib import Path

from ..store.files import StoredFiles
from .log import Finished, Stat, recorded_hashes

__all__ = ["RACY_NS", "Freshness", "check_finished", "verify_key"]

# A stat this close to its hashing is not remembered: 2 s covers the coarsest common
# mtime granularity (FAT); ext4, XFS, APFS and NTFS are far finer.
RACY_NS = 2_000_000_000


@dataclass(slots=True)
class Freshness:
    """What the resume check found about the finished keys' files."""

    redo: set[str] = field(default_factory=set)  # ok keys that run again
    missing: int = 0  # recorded files that are gone
    rehashed: int = 0  # files re-hashed because their stat differed (or --verify)
    changed: int = 0  # re-hashed files whose bytes differ from the manifest's
    refreshed: dict[str, Finished] = field(default_factory=dict)  # matched, new stats


def check_finished(
    finished: Mapping[str, Finished],
    files: StoredFiles,
    manifest: Path,
    *,
    clock_ns: Callable[[], int] = time.time_ns,
) -> Freshness:
    """Compare every finished key's files with the listing of OUT; re-hash the ones
    whose stat differs (their hashes are read from `manifest`).

    With nothing changed this is one C-level pass over every recorded file; the
    per-key walk runs only when some file differs.
    """
    listed = files.stats()
    paths = chain.from_iterable(map(itemgetter(1), finished.values()))
    stats = chain.from_iterable(map(itemgetter(2), finished.values()))
    if all(map(eq, map(listed.get, paths), stats)):
        return Freshness()
    found = Freshness()
    suspects: dict[str, list[int]] = {}  # key -> indexes of files whose stat differs
    for key, (_source, key_paths, key_stats) in finished.items():
        now = [listed.get(path) for path in key_paths]
        if now == list(key_stats):
            continue
        if None in now:
            found.redo.add(key)
            found.missing += now.count(None)
            continue
        suspects[key] = [i for i, stat in enumerate(now) if stat != key_stats[i]]
    if suspects:
        _rehash(found, suspects, finished, files, recorded_hashes(manifest, suspects), clock_ns)
    return found


def _rehash(
    found: Freshness,
    suspects: Mapping[str, list[int]],
    finished: Mapping[str, Finished],
    files: StoredFiles,
    hashes: Mapping[str, tuple[str, ...]],
    clock_ns: Callable[[], int],
) -> None:
    """Re-hash the files whose stat differs: a key with one changed file runs again, a
    key whose files all match is refreshed with their current stats."""
    listed = files.stats()
    for key, indexes in suspects.items():
        source, paths, stats = finished[key]
        recorded = hashes.get(key, ())
        hashed_at = clock_ns()  # before reading: a write after it must not look older
        matched = True
        for i in indexes:
            found.rehashed += 1
            if i >= len(recorded) or files.sha256(paths[i]) != recorded[i]:
                found.changed += 1
                matched = False
        if not matched:
            found.redo.add(key)
            continue
        fresh = _fresh_stats(paths, stats, indexes, listed, hashed_at)
        if fresh != stats:
            found.refreshed[key] = (source, paths, fresh)


def verify_key(
    entry: Finished,
    sha256s: tuple[str, ...],
    files: StoredFiles,
    *,
    clock_ns: Callable[[], int] = time.time_ns,
) -> tuple[bool, Finished | None]:
    """``run --verify`` for one key: every file re-hashed. Whether the key is intact,
    and its entry with refreshed stats when those differ from the recorded ones."""
    source, paths, stats = entry
    listed = files.stats()
    hashed_at = clock_ns()
    if len(sha256s) < len(paths) or not files.intact(paths, sha256s):
        return False, None
    changed = [i for i, path in enumerate(paths) if listed.get(path) != stats[i]]
    if not changed:
        return True, None
    fresh = _fresh_stats(paths, stats, changed, listed, hashed_at)
    return True, (source, paths, fresh) if fresh != stats else None


def _fresh_stats(
    paths: tuple[str, ...],
    stats: tuple[Stat | None, ...],
    indexes: list[int],
    listed: Mapping[str, Stat],
    hashed_at: int,
) -> tuple[Stat | None, ...]:
    """`stats` with the listed stat of each re-hashed file, unless it is racy."""
    fresh = list(stats)
    for i in indexes:
        stat = listed.get(paths[i])
        if stat is not None and hashed_at - stat[1] >= RACY_NS:
            fresh[i] = stat
    return tuple(fresh)
