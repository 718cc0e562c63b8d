"""What needs work: the items of a job the manifest does not already call done.

The engine's producer asks for a chunk at a time (`TodoSource.next_chunk`, run in a
worker thread: it lists image folders once and, with ``--verify``, hashes files). An ok
key whose files are gone or changed runs again; for a big job a child process stats the
files while the keys are expanded (`freshness.StatPass`) and its verdict comes at the end.
An item is built from its draft only when it will run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Protocol

from ..items import ItemDraft
from ..manifest import freshness
from ..manifest.log import Entry, Finished, ManifestState
from ..records import WorkItem
from ..store import files as outputs
from ..store.layout import MANIFEST_NAME

__all__ = ["CHUNK_SIZE", "SCAN_LIMIT", "Todo", "TodoSource"]

log = logging.getLogger("pipeline.engine")  # its lines read as the engine's in a run's log

CHUNK_SIZE = 256  # items that need work, handed over per trip to the worker thread
SCAN_LIMIT = 64 * CHUNK_SIZE  # items looked at per trip (a resumed job skips most)
VERIFIED_BATCH = 65536  # --verify: refreshed stats handed to `remember_stats` at a time


@dataclass(frozen=True, slots=True)
class Todo:
    """An item that needs work, with what the manifest already knows of it."""

    item: WorkItem
    entry: Entry | None

    @property
    def submitted(self) -> bool:
        """The manifest says this item waits in a Batch API batch."""
        return self.entry is not None and self.entry.status == "submitted"


class SkipCounts(Protocol):
    """The run's counters this module moves (the engine's `RunStats`)."""

    total: int
    skipped_ok: int
    skipped_failed: int
    rehashed: int


class TodoSource:
    """The items of one job that need work, a chunk at a time."""

    def __init__(
        self,
        items: Iterable[ItemDraft],
        *,
        state: ManifestState,
        files: outputs.StoredFiles,
        out_dir: Path,
        manifest: Path | None = None,
        stats: SkipCounts,
        retry_failed: bool,
        expand_again: Callable[[], Iterable[ItemDraft]] | None = None,
        remember_stats: Callable[[Mapping[str, Finished]], None] = lambda _entries: None,
    ) -> None:
        self._items: Iterator[ItemDraft] = iter(items)
        self._state = state
        self._files = files
        self._out_dir = out_dir
        self._manifest = manifest or out_dir / MANIFEST_NAME  # the run's (a shard's own)
        self.stats = stats
        self._retry_failed = retry_failed
        self._redo: set[str] | None = None  # ok keys whose files are gone (once decided)
        self._expand_again = expand_again
        self._stat_pass: freshness.StatPass | None = None
        self._remember_stats = remember_stats
        self._verified: dict[str, Finished] = {}  # --verify: matched with another stat

    def release(self) -> None:
        """Let go of the job's state (a million entries for a big job) at the run's end;
        the stat pass a stop left unfinished is cancelled (call in a thread)."""
        self._state = ManifestState()
        if self._stat_pass is not None:
            check, self._stat_pass = self._stat_pass, None
            check.cancel()

    def next_chunk(self) -> list[Todo] | None:
        """Up to CHUNK_SIZE items that need work, dropping the ones the manifest says
        are done (looking at up to SCAN_LIMIT items per call: one trip to the thread).

        Runs in a worker thread: it lists image folders (once) and, with ``--verify``,
        hashes files. An item is built from its draft only when it will run.
        """
        if self._redo is None:
            self._redo = self._start_check()
        todos: list[Todo] = []
        scanned = 0
        while len(todos) < CHUNK_SIZE and scanned < SCAN_LIMIT:
            chunk = list(islice(self._items, CHUNK_SIZE))
            if not chunk and self._stat_pass is not None:
                self._items = self._second_pass()  # the child's verdict: what runs again
                continue
            if not chunk:
                break
            scanned += len(chunk)
            self._decide(chunk, todos)
        if self._verified and (not scanned or len(self._verified) >= VERIFIED_BATCH):
            verified, self._verified = self._verified, {}
            self._remember_stats(verified)
        return todos if scanned else None

    def _decide(self, drafts: list[ItemDraft], todos: list[Todo]) -> None:
        self.stats.total += len(drafts)
        finished, open_, hashes = self._state.finished, self._state.open, self._state.hashes
        redo = self._redo or set()
        for draft in drafts:
            key = draft.key
            if key in finished:
                if key not in redo and (hashes is None or self._verify(key, hashes.get(key, ()))):
                    self.stats.skipped_ok += 1
                    continue
                log.info("%s: recorded ok but its files are missing or changed; redoing", key)
            entry = open_.get(key)
            if entry is not None and entry.status == "failed" and not self._retry_failed:
                self.stats.skipped_failed += 1
                continue
            todos.append(Todo(draft.build(), entry))

    def _start_check(self) -> set[str]:
        """The ok keys whose files are gone or changed, or, when a child process checks
        them (`freshness.StatPass`, for a big job given `expand_again`), none for now:
        finished keys are skipped optimistically and `_second_pass` runs the ones the
        child's verdict names."""
        if self._state.hashes is not None:
            return set()  # --verify re-hashes every file as it decides (`_decide`)
        finished = self._state.finished
        files = sum(map(len, map(itemgetter(1), finished.values())))
        big = files >= freshness.BACKGROUND_MIN_FILES
        if self._expand_again is not None and big and self._files.local:
            self._stat_pass = freshness.StatPass.start(finished, self._files, self._out_dir)
            if self._stat_pass is not None:
                return set()
        return self._keys_missing_files()

    def _second_pass(self) -> Iterator[ItemDraft]:
        """The drafts of the ok keys the child found with missing or changed files (every
        item was seen once: each of these was counted as skipped then)."""
        check, self._stat_pass = self._stat_pass, None
        assert check is not None
        differing = check.result()
        redo = self._keys_missing_files(differing)
        self._redo = redo
        if not redo or self._expand_again is None:
            return
        for draft in self._expand_again():
            if draft.key in redo:
                self.stats.total -= 1  # `_decide` counts it again
                self.stats.skipped_ok -= 1
                yield draft

    def _keys_missing_files(self, differing: list[int] | None = None) -> set[str]:
        """The ok keys whose files are gone or changed (`freshness.check_finished`: a stat
        of every recorded file, a re-hash of those whose size or mtime differ; or
        `freshness.settle` of the indexes a child found differing); the ones re-hashed
        and found unchanged are remembered with their new stats."""
        manifest = self._manifest
        finished = self._state.finished
        if differing is None:
            found = freshness.check_finished(finished, self._files, manifest)
        else:
            found = freshness.settle(finished, differing, self._files, manifest)
        self.stats.rehashed += found.rehashed
        if found.rehashed:
            log.warning("%s", _rehash_message(found))
        if found.missing:
            log.info("%s recorded images are missing: their items run again", f"{found.missing:,}")
        self._remember_stats(found.refreshed)
        return found.redo

    def _verify(self, key: str, sha256s: tuple[str, ...]) -> bool:
        """``run --verify``: re-hash every file of an ok key; remember changed stats."""
        entry = self._state.finished[key]
        self.stats.rehashed += len(entry[1])
        intact, fresh = freshness.verify_key(entry, sha256s, self._files)
        if fresh is not None:
            self._verified[key] = fresh
        return intact


def _rehash_message(found: freshness.Freshness) -> str:
    """The one line that says why a resume read some images again, and what it found."""
    head = f"re-hashed {found.rehashed:,} images whose size or mtime changed"
    if not found.changed:
        return f"{head} (a copy that did not keep mtimes?); all matched"
    return f"{head}: {found.changed:,} differ from the manifest and their items run again"
