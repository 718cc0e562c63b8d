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
from bisect import bisect_right
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from itertools import accumulate, chain
from operator import itemgetter
from pathlib import Path

from ..store.files import StoredFiles
from .log import Finished, Stat, recorded_hashes

__all__ = ["RACY_NS", "Freshness", "check_finished", "recorded_files", "settle", "verify_key"]

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
    """Stat every finished key's files and compare with the recorded stats; re-hash the
    ones whose stat differs (their hashes are read from `manifest`).

    With nothing changed this is one C-level pass over every recorded file
    (`StoredFiles.differing`); the per-key walk runs only for keys with a differing file.
    """
    paths, stats = recorded_files(finished)
    return settle(finished, files.differing(paths, stats), files, manifest, clock_ns=clock_ns)


def recorded_files(
    finished: Mapping[str, Finished],
) -> tuple[list[str], list[Stat | None]]:
    """Every finished key's file paths and recorded stats, flattened in key order (what
    `StoredFiles.differing` compares; `settle` maps its indexes back to keys)."""
    values = finished.values()
    paths = list(chain.from_iterable(map(itemgetter(1), values)))
    return paths, list(chain.from_iterable(map(itemgetter(2), values)))


def settle(
    finished: Mapping[str, Finished],
    differing: Collection[int],
    files: StoredFiles,
    manifest: Path,
    *,
    clock_ns: Callable[[], int] = time.time_ns,
) -> Freshness:
    """The verdict on the keys owning the files at the `differing` indexes of
    `recorded_files(finished)`: each of their files is looked at again; a missing one
    makes its key run again, one with another stat is re-hashed."""
    found = Freshness()
    suspects: dict[str, list[int]] = {}  # key -> indexes of files whose stat differs
    now_stats: dict[str, list[Stat | None]] = {}
    for key in _keys_at(finished, differing):
        _source, key_paths, key_stats = finished[key]
        now = [files.stat(path) for path in key_paths]
        if now == list(key_stats):
            continue  # changed back since, or a racy first look
        if None in now:
            found.redo.add(key)
            found.missing += now.count(None)
            continue
        suspects[key] = [i for i, stat in enumerate(now) if stat != key_stats[i]]
        now_stats[key] = now
    if suspects:
        hashes = recorded_hashes(manifest, suspects)
        _rehash(found, suspects, now_stats, finished, files, hashes, clock_ns)
    return found


def _keys_at(finished: Mapping[str, Finished], indexes: Collection[int]) -> list[str]:
    """The keys whose files are at `indexes` of `recorded_files(finished)`, in key order."""
    if not indexes:
        return []
    ends = list(accumulate(map(len, map(itemgetter(1), finished.values()))))
    keys = list(finished)
    owners = {bisect_right(ends, index) for index in indexes}
    return [keys[owner] for owner in sorted(owners) if owner < len(keys)]


def _rehash(
    found: Freshness,
    suspects: Mapping[str, list[int]],
    now_stats: Mapping[str, list[Stat | None]],
    finished: Mapping[str, Finished],
    files: StoredFiles,
    hashes: Mapping[str, tuple[str, ...]],
    clock_ns: Callable[[], int],
) -> None:
    """Re-hash the files whose stat differs: a key with one changed file runs again, a
    key whose files all match is refreshed with their current stats (taken before
    the re-hash)."""
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
        fresh = _fresh_stats(stats, indexes, now_stats[key], hashed_at)
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
    now = [files.stat(path) for path in paths]  # before the hash, as `_rehash` takes them
    hashed_at = clock_ns()
    if len(sha256s) < len(paths) or None in now or not files.intact(paths, sha256s):
        return False, None
    changed = [i for i, stat in enumerate(now) if stat != stats[i]]
    if not changed:
        return True, None
    fresh = _fresh_stats(stats, changed, now, hashed_at)
    return True, (source, paths, fresh) if fresh != stats else None


def _fresh_stats(
    stats: tuple[Stat | None, ...],
    indexes: list[int],
    now: list[Stat | None],
    hashed_at: int,
) -> tuple[Stat | None, ...]:
    """`stats` with the current stat of each re-hashed file, unless it is racy."""
    fresh = list(stats)
    for i in indexes:
        stat = now[i]
        if stat is not None and hashed_at - stat[1] >= RACY_NS:
            fresh[i] = stat
    return tuple(fresh)
