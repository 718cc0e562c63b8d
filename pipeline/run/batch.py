"""Batch mode's side of a run: how it makes and waits for Batch API batches, and what it
says of them while it waits."""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

from ..backends.base import Backend, BatchControl, Recorder, batch_control
from ..jobspec.model import Spec
from ..manifest.log import ManifestState
from ..records import BATCH_LOGGER
from ..retry import RetryPolicy
from .stats import RunStats

if TYPE_CHECKING:
    from ..backends.openai_batch import BatchOptions, BatchProgress

__all__ = [
    "BatchWatch",
    "attach_batches",
    "batch_control_of",
    "batch_options",
]

_batch_log = logging.getLogger(BATCH_LOGGER)  # status changes at INFO, each poll at DEBUG


def batch_options(spec: Spec, wait: bool, watch: BatchWatch) -> BatchOptions:
    """How this run makes and waits for Batch API batches (the spec's backend section)."""
    from ..backends.openai_batch import BatchOptions  # the client stack: only when used

    settings = spec.backend
    return BatchOptions(
        job=spec.name,
        wait=wait,
        batch_size=settings.batch_size,
        poll_interval_s=settings.poll_interval_s,
        poll_max_s=max(settings.poll_max_s, settings.poll_interval_s),
        resubmit_lost=spec.backend.registered.in_process,
        retry_online=settings.retry_online,
        online_rate=spec.run.rate_limit,
        online_concurrency=spec.run.concurrency,
        retry=RetryPolicy.from_run(spec.run),
        on_progress=watch.update,
    )


class BatchWatch:
    """Where the run's batches stand: a log line when one changes status (on the
    `BATCH_LOGGER`), and a short note in the run's counters for the progress bar."""

    def __init__(self) -> None:
        self.stats: RunStats | None = None
        self._seen: dict[str, BatchProgress] = {}

    def update(self, progress: BatchProgress) -> None:
        """Record one poll's answer."""
        before = self._seen.get(progress.batch_id)
        self._seen[progress.batch_id] = progress
        changed = before is None or before.status != progress.status
        _batch_log.log(
            logging.INFO if changed else logging.DEBUG,
            "batch %s: %s, %d of %d requests done, %d failed",
            progress.batch_id,
            progress.status,
            progress.completed,
            progress.total,
            progress.failed,
        )
        if self.stats is not None:
            self.stats.batches = self.note()

    def note(self) -> str:
        """e.g. ``2 batches: 1 in_progress, 1 completed; 1,200/5,000 done``."""
        states = Counter(p.status for p in self._seen.values())
        done = sum(p.completed for p in self._seen.values())
        total = sum(p.total for p in self._seen.values())
        kinds = ", ".join(f"{count} {status}" for status, count in sorted(states.items()))
        plural = "batch" if len(self._seen) == 1 else "batches"
        return f"{len(self._seen)} {plural}: {kinds}; {done:,}/{total:,} done"


def batch_control_of(spec: Spec, backend: Backend) -> BatchControl | None:
    """The backend's Batch API side, when the registry says its kind and mode have one."""
    kind = spec.backend.registered
    return batch_control(backend, provided=kind.provides_batch_control(spec.backend.mode))


def attach_batches(control: BatchControl | None, state: ManifestState, record: Recorder) -> None:
    """Tell a Batch API backend where the manifest says items wait, and let it record new
    batches through the engine's checkpoint (`record`)."""
    if control is None:
        return
    attached = {
        key: entry.batch
        for key, entry in state.open.items()
        if entry.status == "submitted" and entry.batch is not None
    }
    control.bind_manifest(attached, record)
