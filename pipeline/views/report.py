"""What an output directory holds: the `synthaug status` report.

Built from the manifest alone (last line per key wins; a torn last line is ignored), plus
``job.json`` (what the last run was asked to do) for pending counts and ``summary.json``
(how the last run ended) when they exist. Neither file is required: a manifest is.

What the stages after storage found (hashes, labels, annotations, flags) is not in the
compact state the counts come from: it takes one more pass over the manifests that parses
only the lines holding a stage field, and only when the state says some line holds one
(`ManifestState.staged`, kept in the state cache), so a job without stages pays nothing
more.
"""

from __future__ import annotations

import json
import logging
import mmap
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeAlias

from ..errors import UsageError
from ..job_record import JobRecord
from ..manifest.folded import load_all_states, read_all_records
from ..manifest.log import ManifestState
from ..records import STAGE_FIELDS, ItemStatus
from ..shard import Shard
from ..store.layout import BALANCE_NAME, SUMMARY_NAME, manifest_files, read_job, read_json

__all__ = ["format_status", "status_report"]

_UNKNOWN_KIND = "unknown"
_UNCREATED = "(being created)"  # submitted lines whose batch a resume will look up

# (status, source, images, error kind, batch id) of one key
_Tally: TypeAlias = tuple[ItemStatus, str, int, str | None, str | None]
# (checked, labelled, annotated, each flagged output's flags) of an ok key's outputs
_Staged: TypeAlias = tuple[int, int, int, tuple[frozenset[str], ...]]
# how a stage field starts in a line (inside a JSON string a quote is escaped: no false hit)
_STAGE_MARKS = tuple(b'"%s"' % name.encode() for name in sorted(STAGE_FIELDS))

log = logging.getLogger(__name__)


def status_report(out_dir: Path, shard: Shard | None = None) -> dict[str, Any]:
    """The ``status --json`` object for `out_dir`.

    Contract fields: ``ok``, ``failed``, ``images``, ``by_source`` ({name: {ok, failed}}),
    ``errors`` ({kind: count}), and over the outputs of ok keys ``labelled`` (labels
    done), ``annotated`` (labels in the upload's project) and ``flagged`` ({flag: outputs
    carrying it}). Extra: ``checked`` (outputs with a perceptual hash), ``generated``
    (answered, not downloaded yet), ``submitted`` (waiting in a Batch API batch) and
    ``batches`` ({batch id: items}), ``items`` (keys seen), per-source ``generated`` and
    ``images``; with ``job.json`` also ``name``, ``pending`` (total and per source: the
    job's items minus ok); with ``summary.json`` the last run's summary under ``last_run``;
    for a roboflow_balance job, ``balance`` ({class: {count, target, planned, stored,
    usable}}: images); with shards' summaries, ``shards`` ({"I/N": {exit_code, ok, failed,
    finished_at}}). With `shard` (``status --shard I/N``), only that shard's keys are
    counted, and the job-wide ``pending`` and ``balance`` are left out.
    """
    manifests = manifest_files(out_dir)
    if not manifests:
        raise UsageError(f"no manifest in {out_dir}: run `synthaug run SPEC` first")
    job = read_job(out_dir)
    by_source: dict[str, dict[str, int]] = {}
    for name, _ in _job_sources(job):
        by_source[name] = _empty_counts()
    errors: Counter[str] = Counter()
    batches: Counter[str] = Counter()
    owns = (lambda _key: True) if shard is None else shard.owns
    state = load_all_states(out_dir)
    staged = _staged_all(manifests) if state.staged else {}
    for status, source, images, kind, batch in _latest_per_key(state, owns):
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
        **_stage_counts(v for k, v in staged.items() if owns(k)),
    }
    if shard is not None:
        report["shard"] = str(shard)
        if job is not None and job.name is not None:
            report["name"] = job.name
    elif job is not None:
        _add_pending(report, job)
    balance = _balance(out_dir, job) if shard is None else {}
    if balance:
        report["balance"] = balance
    summary = read_json(out_dir / SUMMARY_NAME)
    if summary is not None:
        report["last_run"] = summary
    shards = _shard_runs(out_dir)
    if shards:
        report["shards"] = shards
    return report


_SHARD_SUMMARY = re.compile(r"summary\.shard-(\d+)-of-(\d+)\.json")


def _shard_runs(out_dir: Path) -> dict[str, dict[str, Any]]:
    """How the last run of each shard (``run --shard I/N``) ended, by ``I/N``."""
    found = []
    for path in out_dir.glob("summary.shard-*-of-*.json"):
        match = _SHARD_SUMMARY.fullmatch(path.name)
        data = read_json(path) if match else None
        if match and data is not None:
            found.append(((int(match[2]), int(match[1])), data))
    return {
        f"{index}/{count}": {
            key: data.get(key) for key in ("exit_code", "ok", "failed", "finished_at")
        }
        for (count, index), data in sorted(found, key=lambda pair: pair[0])
    }


def _latest_per_key(state: ManifestState, owns: Callable[[str], bool]) -> Iterator[_Tally]:
    """The last line of each key `owns` accepts (over every manifest of OUT), reduced to
    what status needs."""
    for key, (source, paths, _stats) in state.finished.items():
        if owns(key):
            yield "ok", source, len(paths), None, None
    for key, entry in state.open.items():
        if owns(key):
            batch = entry.batch.batch_id if entry.batch is not None else None
            yield entry.status, entry.source, 0, entry.error_kind, batch


def _staged_all(manifests: Iterable[Path]) -> dict[str, _Staged]:
    """`_staged_per_key` over every manifest, the later file's line winning."""
    found: dict[str, _Staged] = {}
    for manifest in manifests:
        found.update(_staged_per_key(manifest))
    return found


def _staged_per_key(manifest: Path) -> dict[str, _Staged]:
    """What the stages found in the outputs of each ok key's last line (keys whose last
    line holds no stage field are left out: nothing was found)."""
    found: dict[str, _Staged] = {}
    if not _mentions_stages(manifest):
        return found
    with manifest.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                continue  # torn: the counts above ignore it too
            if not any(mark in raw for mark in _STAGE_MARKS):
                found.pop(_key_of(raw), None)
                continue
            line = _parse(raw)
            if line is None:
                continue
            outputs = line.get("outputs")
            if line.get("status") == "ok" and isinstance(outputs, list):
                found[line["key"]] = _staged([o for o in outputs if isinstance(o, Mapping)])
            else:
                found.pop(line["key"], None)
    return found


def _mentions_stages(manifest: Path) -> bool:
    """Whether any line may hold a stage field (one search of the mapped file per mark)."""
    with manifest.open("rb") as fh:
        if fh.seek(0, 2) == 0:
            return False
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return any(view.find(mark) >= 0 for mark in _STAGE_MARKS)


def _key_of(raw: bytes) -> str:
    """The key of a manifest line: sliced from a line the writer made, else parsed."""
    if raw.startswith(b'{"key":"') and raw[72:74] == b'",':
        return raw[8:72].decode("ascii", "replace")
    line = _parse(raw)
    return "" if line is None else str(line["key"])


def _parse(raw: bytes) -> dict[str, Any] | None:
    """A line as a dict with a string key; None for junk (the counts above warned of it)."""
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    return line if isinstance(line, dict) and isinstance(line.get("key"), str) else None


def _staged(outputs: Iterable[Mapping[str, Any]]) -> _Staged:
    """Tally the stage fields of an ok line's outputs, read as `records.record_from_json`
    reads them (a field of the wrong type is absent; labels or an upload with an
    ``error`` are not done), without building the records: a big labelled job's status
    parses every line."""
    checked = labelled = annotated = 0
    flags = []
    for output in outputs:
        labels, upload, found = output.get("labels"), output.get("upload"), output.get("flags")
        checked += isinstance(output.get("phash"), str)
        labelled += (
            isinstance(labels, Mapping)
            and isinstance(labels.get("model"), str)
            and not isinstance(labels.get("error"), Mapping)
        )
        annotated += (
            isinstance(upload, Mapping)
            and isinstance(upload.get("project"), str)
            and upload.get("annotated") is True
        )
        if isinstance(found, list) and any(isinstance(f, str) for f in found):
            flags.append(frozenset(f for f in found if isinstance(f, str)))
    return checked, labelled, annotated, tuple(flags)


def _stage_counts(staged: Iterable[_Staged]) -> dict[str, Any]:
    """``checked``, ``labelled``, ``annotated`` and ``flagged`` ({flag: outputs}, the most
    frequent first) summed over the keys."""
    checked = labelled = annotated = 0
    flagged: Counter[str] = Counter()
    for key_checked, key_labelled, key_annotated, flags in staged:
        checked += key_checked
        labelled += key_labelled
        annotated += key_annotated
        for output_flags in flags:
            flagged.update(output_flags)
    return {
        "checked": checked,
        "labelled": labelled,
        "annotated": annotated,
        "flagged": dict(sorted(flagged.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def _balance(out_dir: Path, job: JobRecord | None) -> dict[str, dict[str, int]]:
    """Each class of the job's balance source with its progress (the manifest read
    whole, only for such a job); empty without one."""
    if not (out_dir / BALANCE_NAME).exists():
        return {}  # not a balance job: status need not import the spec model either
    from ..balance import class_progress, read_balance

    recorded = read_balance(out_dir)
    names = [name for name, _ in _job_sources(job)] or list(recorded)
    source = next((name for name in names if name in recorded), None)
    if source is None:
        return {}
    records = read_all_records(out_dir).values()
    progress = class_progress(source, recorded[source], records)
    return {name: figures.to_json() for name, figures in progress.items()}


def _format_balance(balance: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The balance table: one row per class (images)."""
    fields = ("count", "target", "planned", "stored", "usable")
    rows = [["class", *fields]]
    rows += [[name, *(str(figures[f]) for f in fields)] for name, figures in balance.items()]
    return ["balance (images per class):", *("  " + line for line in _align(rows))]


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
        shard = f" (shard {report['shard']})" if "shard" in report else ""
        lines.insert(0, f"job: {report['name']}{shard}")
    lines.append("")
    lines.append(f"images: {report['images']}  items seen: {report.get('items', 0)}")
    errors: Mapping[str, int] = report.get("errors") or {}
    kinds = ", ".join(f"{kind} {count}" for kind, count in errors.items())
    lines.append(f"errors: {kinds or 'none'}")
    stages = [(label, report.get(label, 0)) for label in ("checked", "labelled", "annotated")]
    if any(count for _, count in stages):
        lines.append("outputs: " + ", ".join(f"{label} {n}" for label, n in stages if n))
    flagged: Mapping[str, int] = report.get("flagged") or {}
    if flagged:
        lines.append("flagged: " + ", ".join(f"{flag} {n}" for flag, n in flagged.items()))
    balance: Mapping[str, Mapping[str, int]] = report.get("balance") or {}
    if balance:
        lines.extend(_format_balance(balance))
    batches: Mapping[str, int] = report.get("batches") or {}
    if batches:
        listed = ", ".join(f"{batch} ({count} items)" for batch, count in batches.items())
        lines.append(f"in batches: {report.get('submitted', 0)} items: {listed}")
        lines.append("  (run the spec again to collect them; `synthaug run --no-wait` too)")
    last_run = report.get("last_run")
    if isinstance(last_run, Mapping):
        lines.append(f"last run: {_format_last_run(last_run)}")
    shards: Mapping[str, Mapping[str, Any]] = report.get("shards") or {}
    if shards:
        lines.append(
            "shards' last runs: "
            + ", ".join(
                f"{name} exit {run.get('exit_code')} ({run.get('ok')} ok, "
                f"{run.get('failed')} failed)"
                for name, run in shards.items()
            )
        )
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
