"""The stages after storage: each stored output passes the job's stages in order.

A stage (check, label, upload) is a module under `pipeline.stages` named in
`STAGES`, built from the spec by its `open` function, and run by `StageChain` in a `Lane`
of the one worker pool with its own concurrency. What a stage finds is a typed field of
the output (`OutputFile`); the chain appends the item's record with it, so the manifest
says what is done and a resume runs only what is missing.

The chain is fed two ways: the engine hands it every item it stores (`submit`), and at
start it queues the backlog, the ok items of earlier runs that a stage still needs. A
record is written only if no newer line for its key was written meanwhile (the engine
made the item again: the new line is queued instead).

Adding a stage touches its own module, the record's field, and `STAGES` — nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..credentials import read_label_key, read_upload_key
from ..errors import EXIT_OK, EXIT_SOME_FAILED
from ..jobspec.model import Spec
from ..manifest.log import read_lines
from ..manifest.writer import ManifestWriter
from ..records import ItemRecord
from .pool import Lane, RunStop, StopReason

__all__ = [
    "STAGES",
    "Stage",
    "StageChain",
    "StageContext",
    "StageKind",
    "open_stages",
    "read_stage_keys",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StageContext:
    """What a stage may use to build itself: the run's stop, OUT, the day's date, and
    the root of the embedded mock when the backend is one (else None)."""

    stop: RunStop
    out_dir: Path
    day: str
    backend_root: str | None


class Stage(Protocol):
    """One stage after storage."""

    name: str  # its key in summary.json
    concurrency: int  # its lane's workers
    halted_by: frozenset[StopReason]  # stops that halt it (others let it finish its queue)

    def needs(self, record: ItemRecord) -> bool:
        """Whether some output of `record` still needs this stage."""
        ...

    async def process(self, record: ItemRecord, halted: Callable[[], bool]) -> ItemRecord | None:
        """`record` with this stage's fields set on what it did (also when `halted`
        part way); None when there is nothing new to record."""
        ...

    def summary(self) -> dict[str, Any]:
        """Its counters for summary.json."""
        ...

    @property
    def failed(self) -> int:
        """Outputs this stage failed for good this run (the run then exits 1)."""
        ...

    async def aclose(self) -> None:
        """Release its connections."""
        ...


@dataclass(frozen=True, slots=True)
class StageKind:
    """A stage as the registry names it: its spec key, the function that builds it, and
    the one that reads its API key from the environment (before anything is sent)."""

    name: str
    opener: str  # "module:function" within pipeline, imported only when the spec sets it
    key_reader: Callable[[Spec], str] = lambda _spec: ""

    def open(self) -> Callable[[Any, str, StageContext], Awaitable[Stage]]:
        """The stage's `open(spec, api_key, context)` (its module imported now)."""
        module, _, name = self.opener.partition(":")
        opener: Any = getattr(importlib.import_module(f"..{module}", __package__), name)
        return opener  # type: ignore[no-any-return]


def _label_key(spec: Spec) -> str:
    return read_label_key(spec.label, spec.backend)


def _upload_key(spec: Spec) -> str:
    return read_upload_key(spec.upload, spec.backend)


STAGES: tuple[StageKind, ...] = (
    StageKind("check", "stages.check:open_stage"),
    StageKind("label", "stages.label:open_stage", _label_key),
    StageKind("upload", "stages.upload:open_stage", _upload_key),
)
"""The stages after storage, in the order an output passes them."""


def read_stage_keys(spec: Spec) -> dict[str, str]:
    """The API key of each stage the spec sets; `CredentialsError` for a missing one, so
    that a run fails before it sends anything."""
    return {
        kind.name: kind.key_reader(spec)
        for kind in STAGES
        if getattr(spec, kind.name, None) is not None
    }


async def open_stages(spec: Spec, keys: Mapping[str, str], context: StageContext) -> list[Stage]:
    """The stages `spec` sets, built in registry order (its modules imported in a thread:
    a client stack takes about 100 ms to import). `keys` holds each stage's API key."""
    stages = []
    for kind in STAGES:
        if getattr(spec, kind.name, None) is None:
            continue
        opener = await asyncio.to_thread(kind.open)
        stages.append(await opener(spec, keys.get(kind.name, ""), context))
    return stages


@dataclass(frozen=True, slots=True)
class _Todo:
    """A record for one stage; `version` is its key's line count when it was queued."""

    record: ItemRecord
    version: int


class StageChain:
    """Runs the stages of one run, each in its own lane; see the module docstring."""

    def __init__(
        self,
        stages: list[Stage],
        *,
        writer: ManifestWriter,
        stop: RunStop,
        grace_period_s: float,
        manifest: Path,
        fetch: Callable[[list[ItemRecord]], Awaitable[None]] | None = None,
    ) -> None:
        self._stages = stages
        self._fetch = fetch  # brings a backlog's images from object storage
        self._writer = writer
        self._stop = stop
        self._manifest = manifest
        self._versions: dict[str, int] = {}  # key -> lines written for it by others
        self._writing = False
        self.pending = {stage.name: 0 for stage in stages}
        self._lanes = [self._lane(stage, grace_period_s) for stage in stages]

    def _lane(self, stage: Stage, grace_s: float) -> Lane[_Todo]:
        def halts() -> bool:
            return self._stop.reason in stage.halted_by

        async def process(todo: _Todo) -> None:
            await self._process(stage, todo, halts)

        return Lane(
            stage.name,
            stage.concurrency,
            process,
            self._stop,
            halts=halts,
            grace_s=lambda reason: grace_s if reason in stage.halted_by else None,
            dropped=lambda _todo: None,  # its count stays pending: the next run does it
        )

    # ----------------------------------------------------------------- feeding

    def submit(self, record: ItemRecord, after: int = -1) -> None:
        """Queue `record` for the first stage after index `after` that needs it."""
        for index in range(after + 1, len(self._stages)):
            stage = self._stages[index]
            if stage.needs(record):
                self.pending[stage.name] += 1
                version = self._versions.get(record.key, 0)
                self._lanes[index].put_nowait(_Todo(record, version))
                return

    def _on_line(self, line: Mapping[str, Any], _end: int) -> None:
        """The writer's append hook: count the lines others write for each key."""
        if not self._writing:
            key = line["key"]
            self._versions[key] = self._versions.get(key, 0) + 1

    # ----------------------------------------------------------------- running

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the stages while the body (the engine) runs; finish them after it.

        If the body is cancelled (a second signal), work in flight is cancelled at once.
        """
        if not self._stages:
            yield
            return
        try:
            await self._begin()
            try:
                yield
            except BaseException:
                for lane in self._lanes:
                    await lane.cancel()
                raise
            for lane in self._lanes:  # in order: a stage feeds the next
                await lane.close()
                await lane.finish()
        finally:
            for stage in self._stages:
                await stage.aclose()

    async def _begin(self) -> None:
        """Queue the backlog, follow the manifest and start the lanes: before the engine
        writes its first line."""
        backlog = await asyncio.to_thread(self._backlog)
        if backlog and self._fetch is not None:
            await self._fetch(backlog)
        for record in backlog:
            self.submit(record)
        if backlog:
            log.info("%d stored items of earlier runs wait for a stage", len(backlog))
        self._writer.add_append_hook(self._on_line)
        for lane in self._lanes:
            lane.start()

    def _backlog(self) -> list[ItemRecord]:
        """The last line of each ok key that some stage still needs (a whole pass over
        the manifest, paid only by runs with stages; only those lines are kept)."""
        waiting: dict[str, ItemRecord] = {}
        for line in read_lines(self._manifest):
            record = ItemRecord.from_json(line) if line.get("status") == "ok" else None
            if record is not None and any(stage.needs(record) for stage in self._stages):
                waiting[record.key] = record
            else:
                waiting.pop(line["key"], None)
        return list(waiting.values())

    async def _process(self, stage: Stage, todo: _Todo, halts: Callable[[], bool]) -> None:
        index = self._stages.index(stage)
        try:
            record = await stage.process(todo.record, halts)
        finally:
            self.pending[stage.name] -= 1
        if record is None:
            return
        if self._versions.get(record.key, 0) != todo.version:
            return  # a newer line for the key was written: that one is queued
        if self._write(record):
            self.submit(record, after=index)

    def _write(self, record: ItemRecord) -> bool:
        """Append `record`; a write failure stops the run (the next run does it again)."""
        self._writing = True
        try:
            self._writer.append(record)
            return True
        except OSError as exc:
            self._stop.disk(exc, self._manifest.parent)
            return False
        finally:
            self._writing = False

    # ----------------------------------------------------------------- summary

    def add_summary(self, summary: dict[str, Any]) -> None:
        """Put each stage's counts in `summary`; a stage's failure makes a clean run
        exit 1."""
        for stage in self._stages:
            summary[stage.name] = {**stage.summary(), "pending": self.pending[stage.name]}
            if stage.failed and summary.get("exit_code") == EXIT_OK:
                summary["exit_code"] = EXIT_SOME_FAILED
