"""The counters of one run, and the timestamps its manifest lines carry."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

__all__ = ["RunStats", "utc_now"]


@dataclass(slots=True)
class RunStats:
    """Counters of one run, for progress, the summary and the exit code."""

    expected: int = 0  # items in the job, counted up front (for progress)
    total: int = 0  # items the producer has looked at so far
    ok: int = 0
    failed: int = 0
    skipped_ok: int = 0
    skipped_failed: int = 0
    resumed_downloads: int = 0
    skipped_changed: int = 0  # input file changed after the run began: its key is stale
    rehashed: int = 0  # stored images re-read by the resume check (stat differed, --verify)
    requests: int = 0
    images: int = 0
    retries: int = 0
    rate_limited: int = 0
    ambiguous_retries: int = 0
    deferred: int = 0  # items left waiting in a Batch API batch (run --no-wait)
    batches: str = ""  # where the run's Batch API batches stand, for progress
    in_flight: int = 0
    retrying: int = 0
    cost_usd: float = 0.0
    cost_known: bool = True  # False once an item had neither a usage block nor a list price
    errors: Counter[str] = field(default_factory=Counter)
    started: float = 0.0
    finished: float = 0.0

    @property
    def done(self) -> int:
        """Items settled in this run or before it."""
        return self.ok + self.failed + self.skipped_ok + self.skipped_failed


def utc_now() -> str:
    """ISO-8601 UTC timestamp with a Z, as manifest lines carry."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
