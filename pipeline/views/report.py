"""What an output directory holds: the `synthaug status` report.

Built from the manifest alone (last line per key wins; a torn last line is ignored), plus
``job.json`` (what the last run was asked to do) for pending counts and ``summary.json``
(how the last run ended) when they exist. Neither file is required: a manifest is.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeAlias

from ..errors import UsageError
from ..job_record import JobRecord
from ..manifest.cache import load_cached_state
from ..records import ItemStatus
from ..store.layout import MANIFEST_NAME, SUMMARY_NAME, read_job, read_json

__all__ = ["format_status", "status_report"]

_UNKNOWN_KIND = "unknown"
_UNCREATED = "(being created)"  # submitted lines whose batch a resume will look up

# (status, source, images, error kind, batch id) of one key
_Tally: TypeAlias = tuple[ItemStatus, str, int, str | None, str | None]

log = logging.getLogger(__name__)


def status_report(out_dir: Path) -> dict[str, Any]:
    """The ``status --json`` object for `out_dir`.

    Contract fields: ``ok``, ``failed``, ``images``, ``by_source`` ({name: {ok, failed}}),
    ``errors`` ({kind: count}). Extra: ``generated`` (answered, not downloaded yet),
    ``submitted`` (waiting in a Batch API batch) and ``batches`` ({batch id: items}),
    ``items`` (keys seen), per-source ``generated`` and ``images``; with ``job.json``
    also ``name``, ``pending`` (total and per source: the job's items minus ok); with
    ``summary.json`` the last run's summary under ``last_run``.
    """
    manifest = out_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise UsageError(f"no manifest in {out_dir}: run `synthaug run SPEC` first")
    job = read_job(out_dir)
    by_source: dict[str, dict[str, int]] = {}
    for name, _ in _job_sources(job):
        by_source[name] = _empty_counts()
    errors: Counter[str] = Counter()
    batches: Counter[str] = Counter()
    for status, source, images, kind, batch in _latest_per_key(manifest):
        counts = by_source.get(source)
        if counts is None:
            counts = by_source[source] = _empty_counts()
        counts[status] += 1
        counts["images"] += images
        if status == "failed":
            errors[kind or _UNKNOWN_KIND] += 1
        if status == "submitted":
            batches[batch or _UNCREATED] += 1
    report: dict[str, Any] = {
        "ok": _total(by_source, "ok"),
        "failed": _total(by_source, "failed"),
        "images": _total(by_source, "images"),
        "by_source": by_source,
        "errors": dict(sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))),
        "generated": _total(by_source, "generated"),
        "submitted": _total(by_source, "submitted"),
        "batches": dict(sorted(batches.items())),
        "items": sum(
            c["ok"] + c["failed"] + c["generated"] + c["submitted"] for c in by_source.values()
        ),
    }
    if job is not None:
        _add_pending(report, job)
    summary = read_json(out_dir / SUMMARY_NAME)
    if summary is not None:
        report["last_run"] = summary
    return report


def _latest_per_key(manifest: Path) -> Iterator[_Tally]:
    """The last line of each key, reduced to what status needs."""
    state = load_cached_state(manifest)
    for source, paths, _stats in state.finished.values():
        yield "ok", source, len(paths), None, None
    for entry in state.open.values():
        batch = entry.batch.batch_id if entry.batch is not None else None
        yield entry.status, entry.source, 0, entry.error_kind, batch


def _empty_counts() -> dict[str, int]:
    return {"ok": 0, "failed": 0, "generated": 0, "submitted": 0, "images": 0}


def _total(by_source: Mapping[str, Mapping[str, int]], field: str) -> int:
    return sum(counts[field] for counts in by_source.values())


def _add_pending(report: dict[str, Any], job: JobRecord) -> None:
    """Pending = items the job asks for minus those already ok (failed ones still count)."""
    if job.name is not None:
        report["name"] = job.name
    total = 0
    for name, items in _job_sources(job):
        counts = report["by_source"][name]
        counts["pending"] = max(0, items - counts["ok"])
        total += counts["pending"]
    report["pending"] = total


def _job_sources(job: JobRecord | None) -> list[tuple[str, int]]:
    """(name, items) of each source job.json counted, in spec order."""
    if job is None:
        return []
    return [(s.name, s.items) for s in job.sources if s.items is not None]


def format_status(report: Mapping[str, Any]) -> str:
    """`status_report` as an aligned table for people: one row per source, then totals."""
    has_pending = "pending" in report
    header = ["source", "ok", "failed", "generated", *(["pending"] if has_pending else [])]
    rows = [header]
    for name, counts in report["by_source"].items():
        rows.append(_row(name, counts, has_pending))
    rows.append(_row("total", report, has_pending))
    lines = _align(rows)
    if "name" in report:
        lines.insert(0, f"job: {report['name']}")
    lines.append("")
    lines.append(f"images: {report['images']}  items seen: {report.get('items', 0)}")
    errors: Mapping[str, int] = report.get("errors") or {}
    kinds = ", ".join(f"{kind} {count}" for kind, count in errors.items())
    lines.append(f"errors: {kinds or 'none'}")
    batches: Mapping[str, int] = report.get("batches") or {}
    if batches:
        listed = ", ".join(f"{batch} ({count} items)" for batch, count in batches.items())
        lines.append(f"in batches: {report.get('submitted', 0)} items: {listed}")
        lines.append("  (run the spec again to collect them; `synthaug run --no-wait` too)")
    last_run = report.get("last_run")
    if isinstance(last_run, Mapping):
        lines.append(f"last run: {_format_last_run(last_run)}")
    return "\n".join(lines)


def _row(name: str, counts: Mapping[str, Any], has_pending: bool) -> list[str]:
    cells = [name, str(counts["ok"]), str(counts["failed"]), str(counts.get("generated", 0))]
    if has_pending:
        cells.append(str(counts["pending"]) if "pending" in counts else "-")
    return cells


def _align(rows: list[list[str]]) -> list[str]:
    """Name column left-aligned, number columns right-aligned, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _format_last_run(summary: Mapping[str, Any]) -> str:
    """One line a person reads: when, how it ended, what it sent; the rest is in the file."""
    parts = [str(summary.get("finished_at", "?"))]
    reason = summary.get("stop_reason")
    parts.append(f"exit {summary.get('exit_code', '?')}" + (f" ({reason})" if reason else ""))
    for key, label in (
        ("requests", "requests"),
        ("images", "images"),
        ("retries", "retries"),
        ("rate_limited_429", "429s"),
    ):
        if key in summary:
            parts.append(f"{summary[key]} {label}")
    rate = summary.get("achieved_requests_per_s")
    if isinstance(rate, int | float):
        parts.append(f"{rate:.2f} req/s")
    return ", ".join(parts)
