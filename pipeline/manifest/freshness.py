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

import contextlib
import logging
import subprocess
import sys
import time
from bisect import bisect_right
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from itertools import accumulate, chain, islice
from operator import itemgetter
from pathlib import Path

from ..store import statpass
from ..store.files import StoredFiles
from .log import Finished, Stat, recorded_hashes

__all__ = [
    "BACKGROUND_MIN_FILES",
    "RACY_NS",
    "Freshness",
    "StatPass",
    "check_finished",
    "recorded_files",
    "settle",
    "verify_key",
]

log = logging.getLogger(__name__)

# A stat this close to its hashing is not remembered: 2 s covers the coarsest common
# mtime granularity (FAT); ext4, XFS, APFS and NTFS are far finer.
RACY_NS = 2_000_000_000
BACKGROUND_MIN_FILES = 50_000  # fewer recorded files: checked in-process, no child
CHUNK_KEYS = 65_536  # finished keys per chunk sent to the child (it stats as they come)


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


class StatPass:
    """`StoredFiles.differing` of every finished key's files, run by a child process
    (`pipeline.store.statpass`) on another core while this process expands the job's
    keys: a resume of a million finished items spends about 2 s in a million `stat`
    calls, as long as the expansion takes. Threads would not overlap the two: each short
    system call gives the GIL back and takes it again, in a convoy with the expanding
    thread.

    The caller skips finished keys optimistically while the child works, and asks
    `result` once it has seen every item; keys with a differing file then go through
    `settle` and run in a second pass. Any failure to start or finish the child returns
    None: check in this process then (`check_finished`).
    """

    def __init__(self, child: subprocess.Popen[bytes], refused: list[int]) -> None:
        self._child = child
        self._refused = refused  # indexes whose path shape is refused: never present

    @classmethod
    def start(
        cls,
        finished: Mapping[str, Finished],
        files: StoredFiles,
        out_dir: Path,
        *,
        chunk_keys: int = CHUNK_KEYS,
    ) -> StatPass | None:
        """Start the child and send it every finished key's recorded files (in chunks:
        it stats the first while the rest are sent); None when no child can run here."""
        if not statpass.STAT_DIR_FD or not sys.executable:
            return None
        try:
            child = subprocess.Popen(
                [sys.executable, "-I", "-S", statpass.__file__, str(out_dir)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        except OSError as exc:
            log.info("checking the stored files in this process: %s", exc)
            return None
        check = cls(child, [])
        try:
            check._send(finished, files, chunk_keys)
        except OSError as exc:  # the child died early (a broken pipe)
            log.info("checking the stored files in this process: %s", exc)
            check.cancel()
            return None
        return check

    def _send(self, finished: Mapping[str, Finished], files: StoredFiles, chunk_keys: int) -> None:
        stdin = self._child.stdin
        assert stdin is not None
        values = iter(finished.values())
        base = 0
        while chunk := list(islice(values, chunk_keys)):
            paths = list(chain.from_iterable(map(itemgetter(1), chunk)))
            stats = list(chain.from_iterable(map(itemgetter(2), chunk)))
            statpass.write_chunk(stdin, paths, stats)
            stdin.flush()  # the child starts on it while this one shapes the next
            self._refused.extend(base + index for index in files.refused(paths))
            base += len(paths)
        stdin.close()

    def result(self) -> list[int] | None:
        """The indexes (of `recorded_files`) of the files that differ, as `differing`
        gives them; None when the child failed."""
        child = self._child
        assert child.stdout is not None
        try:
            data = child.stdout.read()
            code = child.wait()
        except OSError as exc:
            log.info("the stat pass in a child process failed (%s): checking here", exc)
            self.cancel()
            return None
        finally:
            child.stdout.close()
        try:
            found = statpass.loads_indexes(data) if code == 0 else None
        except ValueError:
            found = None
        if found is None:
            log.info("the stat pass in a child process failed (exit %s): checking here", code)
            return None
        return sorted(set(found).union(self._refused))

    def cancel(self) -> None:
        """Stop the child (the run ended before its answer was needed)."""
        child = self._child
        if child.poll() is None:
            child.kill()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        child.wait()


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
