"""The generation stage's checkpoint: the manifest line each item's attempts end in.

A ``submitted`` line before an item waits in a Batch API batch, a ``generated`` line as
soon as the API answers with URLs, the ``ok`` line once its files are in place (then the
item goes on to the stages after storage), a ``failed`` line when it failed for good.
The run's counters, its spend and the consecutive-failure abort follow the lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from ..budget import Budget
from ..errors import BackendError, PermanentError
from ..manifest.writer import ManifestWriter
from ..records import (
    BatchRef,
    ErrorInfo,
    GeneratedImage,
    ItemRecord,
    OutputFile,
    WorkItem,
)
from .pool import RunStop
from .stats import RunStats, utc_now

__all__ = ["Checkpoint", "ItemRun"]

log = logging.getLogger("pipeline.engine")  # its lines read as the engine's in a run's log


@dataclass(slots=True)
class ItemRun:
    """What one item's attempts have learned so far (mutable, owned by one worker)."""

    item: WorkItem
    started_at: str
    t0: float
    attempts: int = 0
    pending: tuple[GeneratedImage, ...] = ()
    response: object = None
    batch: BatchRef | None = None  # the Batch API batch the answer came from
    price_factor: float = 1.0  # the answer's discount (`Generation.price_factor`)


class Checkpoint:
    """Writes the generation stage's lines and keeps the counters they imply."""

    def __init__(
        self,
        writer: ManifestWriter,
        *,
        stats: RunStats,
        budget: Budget,
        stop: RunStop,
        max_consecutive_failures: int,
        on_stored: Callable[[ItemRecord], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._writer = writer
        self._stats = stats
        self._budget = budget
        self._stop = stop
        self._max_failures = max_consecutive_failures
        self._on_stored = on_stored
        self._clock = clock
        self._consecutive_failures = 0
        self.runs: dict[str, ItemRun] = {}  # items being worked on, by key

    def start(self, item: WorkItem) -> ItemRun:
        """A new run of `item`, known to the checkpoint until `end`."""
        run = ItemRun(item, started_at=utc_now(), t0=self._clock())
        self.runs[item.key] = run
        return run

    def end(self, run: ItemRun) -> None:
        """The item is settled (or left for the next run)."""
        self.runs.pop(run.item.key, None)

    def submitted(self, items: Iterable[WorkItem], ref: BatchRef) -> None:
        """`items` wait in a Batch API batch (`ref`), durably: a resume then re-attaches
        instead of paying for them again. Raises `OSError` if the manifest refuses it."""
        for item in items:
            run = self.runs.get(item.key) or ItemRun(item, utc_now(), self._clock())
            self._writer.append(_record(run, "submitted", batch=ref))
        self._writer.sync()

    def generated(self, run: ItemRun, images: tuple[GeneratedImage, ...]) -> None:
        """The API answered with URLs: a kill from now on downloads instead of paying."""
        self._writer.append(_record(run, "generated", pending=images))

    def ok(self, run: ItemRun, stored: tuple[OutputFile, ...]) -> None:
        """The item's files are in place: its ok line, its spend, the stages after it."""
        elapsed = self._clock() - run.t0
        record = _record(run, "ok", outputs=stored, elapsed=elapsed, batch=run.batch)
        self._writer.append(record)
        self._on_stored(record)
        self._stats.ok += 1
        self._stats.images += len(stored)
        cost = self._budget.settle(run.item, run.response, run.price_factor)
        if cost is None:
            self._stats.cost_known = False
        else:
            self._stats.cost_usd += cost
        self._consecutive_failures = 0

    def failed(self, run: ItemRun, exc: BackendError) -> None:
        """The item failed for good; too many such in a row abort the run."""
        error = ErrorInfo(kind=exc.kind, status=exc.status, message=exc.message)
        elapsed = self._clock() - run.t0
        self._writer.append(_record(run, "failed", error=error, elapsed=elapsed))
        self._stats.failed += 1
        self._stats.errors[exc.kind] += 1
        log.warning("%s failed for good: %s", run.item.key[:16], exc.message)
        if isinstance(exc, PermanentError):
            return  # a refusal or a 4xx is about this request, not about the API's health
        self._consecutive_failures += 1
        if self._consecutive_failures >= self._max_failures:
            self._stop.stop("aborted")


def _record(
    run: ItemRun,
    status: Literal["ok", "failed", "generated", "submitted"],
    *,
    outputs: tuple[OutputFile, ...] = (),
    error: ErrorInfo | None = None,
    elapsed: float | None = None,
    pending: tuple[GeneratedImage, ...] = (),
    batch: BatchRef | None = None,
) -> ItemRecord:
    return ItemRecord.of(
        run.item,
        status,
        outputs=outputs,
        attempts=run.attempts,
        error=error,
        started_at=run.started_at,
        finished_at=utc_now() if status in ("ok", "failed") else None,
        elapsed_s=round(elapsed, 3) if elapsed is not None else None,
        response=run.response if status in ("ok", "generated") else None,
        pending=pending,
        batch=batch,
    )
