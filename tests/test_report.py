"""`synthaug status`: what the manifest, job.json and summary.json say about an OUT."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import ErrorKind, UsageError
from pipeline.manifest.writer import ManifestWriter
from pipeline.records import (
    ErrorInfo,
    ItemRecord,
    ItemStatus,
    LabelRecord,
    OutputFile,
    Prediction,
    UploadRecord,
)
from pipeline.views.report import format_status, status_report

JOB = {
    "name": "fall-leaves",
    "spec": "/abs/path/spec.yaml",
    "backend": "mock",
    "sources": [
        {"name": "maple-grid", "prompt": "A street in {season}", "vars": {"season": ["early fall"]},
         "combine": "product", "repeats": 1, "input": "none", "items": 5, "n": 1},
        {"name": "never-ran", "prompt": "snow", "vars": {}, "combine": "product",
         "repeats": 1, "input": "none", "items": 3, "n": 1},
    ],
}  # fmt: skip


def _key(i: int) -> str:
    return f"{i:064x}"


def _record(
    i: int,
    status: ItemStatus,
    source: str = "maple-grid",
    *,
    images: int = 1,
    kind: ErrorKind | None = None,
) -> ItemRecord:
    key = _key(i)
    outputs = tuple(
        OutputFile(path=f"images/{source}/{key[:16]}-{n}.png", sha256="0" * 64, width=8, height=8)
        for n in range(images if status == "ok" else 0)
    )
    error = ErrorInfo(kind=kind, status=None, message="boom") if kind else None
    return ItemRecord(
        key=key,
        status=status,
        source=source,
        vars={"season": "late fall"},
        repeat=0,
        input=None,
        prompt="A street in late fall",
        params={"n": images},
        outputs=outputs,
        attempts=1,
        error=error,
    )


def _write_manifest(out_dir: Path, *records: ItemRecord) -> None:
    with ManifestWriter(out_dir / "manifest.jsonl") as writer:
        for record in records:
            writer.append(record)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """An OUT whose manifest has retried, failed, generated and multi-image items."""
    out = tmp_path / "out"
    _write_manifest(
        out,
        _record(1, "failed", kind="timeout"),
        _record(1, "ok"),  # retried: the last line wins
        _record(2, "ok"),
        _record(2, "failed", kind="http_status"),  # an ok key that failed on a later run
        _record(3, "generated"),
        _record(4, "failed", kind="timeout"),
        _record(5, "ok", "local-red", images=2),
        _record(6, "failed", "local-red"),  # failed without an error object
    )
    return out


def test_status_counts_last_line_per_key(out_dir: Path) -> None:
    """ok / failed / images / by_source / errors follow the last line of each key."""
    report = status_report(out_dir)
    contract = {k: report[k] for k in ("ok", "failed", "images", "errors")}
    assert contract == {
        "ok": 2,
        "failed": 3,
        "images": 3,
        "errors": {"timeout": 1, "http_status": 1, "unknown": 1},
    }
    assert {name: (c["ok"], c["failed"]) for name, c in report["by_source"].items()} == {
        "maple-grid": (1, 2),
        "local-red": (1, 1),
    }


def test_status_counts_generated_and_items_seen(out_dir: Path) -> None:
    """Answered-but-not-downloaded items and the number of keys are reported too."""
    report = status_report(out_dir)
    assert (report["generated"], report["items"]) == (1, 6)
    assert report["by_source"]["maple-grid"]["generated"] == 1


def test_status_is_json_serialisable(out_dir: Path) -> None:
    """`status --json` can print the report as it is."""
    assert json.loads(json.dumps(status_report(out_dir))) == status_report(out_dir)


def test_status_ignores_a_torn_last_line(out_dir: Path) -> None:
    """A line cut by a crash mid-write is not counted."""
    torn = json.dumps(_record(9, "ok").to_json())[:-10]
    with (out_dir / "manifest.jsonl").open("ab") as fh:
        fh.write(torn.encode())
    report = status_report(out_dir)
    assert (report["ok"], report["items"]) == (2, 6)


def test_status_without_job_json_has_no_pending(out_dir: Path) -> None:
    """Without job.json the report does not guess what is pending."""
    report = status_report(out_dir)
    assert "pending" not in report
    assert "last_run" not in report


def test_status_pending_comes_from_job_json(out_dir: Path) -> None:
    """With job.json, pending is each source's items minus its ok items."""
    (out_dir / "job.json").write_text(json.dumps(JOB))
    report = status_report(out_dir)
    pending = {name: c.get("pending") for name, c in report["by_source"].items()}
    assert pending == {"maple-grid": 4, "never-ran": 3, "local-red": None}
    assert report["pending"] == 7
    assert report["name"] == "fall-leaves"
    assert report["by_source"]["never-ran"]["ok"] == 0


def test_status_ignores_a_broken_job_json(out_dir: Path) -> None:
    """A damaged job.json is skipped rather than failing the status command."""
    (out_dir / "job.json").write_text("{not json")
    report = status_report(out_dir)
    assert "pending" not in report
    assert report["ok"] == 2


def test_status_includes_last_summary(out_dir: Path) -> None:
    """The last run's summary.json is shown under last_run."""
    summary = {"exit_code": 1, "ok": 2, "failed": 3}
    (out_dir / "summary.json").write_text(json.dumps(summary))
    assert status_report(out_dir)["last_run"] == summary


def test_status_without_manifest_says_how_to_start(tmp_path: Path) -> None:
    """An OUT with no manifest is a usage error naming the path and the fix."""
    with pytest.raises(UsageError, match=r"no manifest in .*empty: run `synthaug run SPEC` first"):
        status_report(tmp_path / "empty")


def _table_rows(text: str) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for line in text.splitlines() if (cells := line.split())}


def test_format_status_shows_the_figures(out_dir: Path) -> None:
    """The table has one aligned row per source and a total, plus images and error kinds."""
    (out_dir / "job.json").write_text(json.dumps(JOB))
    text = format_status(status_report(out_dir))
    rows = _table_rows(text)
    assert rows["source"] == ["ok", "failed", "generated", "pending"]
    assert rows["maple-grid"] == ["1", "2", "1", "4"]
    assert rows["never-ran"] == ["0", "0", "0", "3"]
    assert rows["local-red"] == ["1", "1", "0", "-"]
    assert rows["total"] == ["2", "3", "1", "7"]
    assert "job: fall-leaves" in text
    assert re.search(r"^images: 3\b", text, re.MULTILINE)
    assert "errors: http_status 1, timeout 1, unknown 1" in text


def test_format_status_aligns_number_columns(out_dir: Path) -> None:
    """Number columns end at the same place on every row."""
    table = format_status(status_report(out_dir)).split("\n\n")[0].splitlines()
    assert len({len(line) for line in table}) == 1


def test_format_status_shows_last_run_scalars() -> None:
    """The last run's headline figures are printed on one line."""
    report: dict[str, Any] = {
        "ok": 0, "failed": 0, "images": 0, "by_source": {}, "errors": {},
        "last_run": {"exit_code": 4, "stop_reason": "budget", "finished_at": "2026-11-25T02:00Z",
                     "requests": 12, "images": 24, "achieved_requests_per_s": 0.0833},
    }  # fmt: skip
    text = format_status(report)
    assert (
        "last run: 2026-11-25T02:00Z, exit 4 (budget), 12 requests, 24 images, 0.08 req/s" in text
    )
    assert "errors: none" in text


LEAF = Prediction(x=4, y=4, width=2, height=2, class_name="leaf", confidence=0.9)
LABELS = LabelRecord("leaves/1", (LEAF,))
FAILED_LABELS = LabelRecord("leaves/1", error=ErrorInfo("timeout", None, "slow"))


def _staged(i: int, *outputs: dict[str, Any]) -> ItemRecord:
    """The ok line of key `i` whose outputs carry the stage fields `outputs`."""
    record = _record(i, "ok", images=len(outputs))
    found = zip(record.outputs, outputs, strict=True)
    return dataclasses.replace(record, outputs=tuple(dataclasses.replace(o, **f) for o, f in found))


@pytest.fixture
def staged_out(tmp_path: Path) -> Path:
    """An OUT whose outputs were checked, labelled, uploaded and flagged, over several runs."""
    out = tmp_path / "out"
    uploaded = UploadRecord("fall-leaves-synthetic", id="img1", annotated=True)
    _write_manifest(
        out,
        _staged(
            1,
            {"phash": "0" * 16, "flags": ("duplicate",), "labels": LABELS, "upload": uploaded},
            {"phash": "1" * 16, "labels": FAILED_LABELS},
        ),
        _staged(2, {"labels": LABELS, "flags": ("no_detection",)}),
        _record(2, "ok"),  # made again later: its last line has no stage field
        _staged(3, {"phash": "2" * 16, "flags": ("duplicate", "no_detection"), "labels": LABELS}),
        _staged(4, {"flags": ("unchanged",), "labels": LABELS}),
        _record(4, "failed", kind="timeout"),  # its last line failed: not counted
        _staged(
            5,
            {"upload": UploadRecord("p", id="img5", annotated=False)},
            {"upload": UploadRecord("p", error=ErrorInfo("http_status", 500, "x"))},
        ),
    )
    hand_edited = _staged(6, {"phash": "3" * 16, "flags": ("unchanged",)}).to_json()
    with (out / "manifest.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(hand_edited, indent=None, separators=(", ", ": ")) + "\n")
    return out


def test_status_counts_labelled_annotated_and_flagged_outputs(staged_out: Path) -> None:
    """Over the last line of each ok key: outputs labelled (not failed), annotated, checked,
    and each flag with the number of outputs carrying it."""
    report = status_report(staged_out)
    assert (report["ok"], report["images"]) == (5, 7)
    stages = {k: report[k] for k in ("checked", "labelled", "annotated", "flagged")}
    assert stages == {
        "checked": 4,
        "labelled": 2,
        "annotated": 1,
        "flagged": {"duplicate": 2, "unchanged": 1, "no_detection": 1},
    }
    assert json.loads(json.dumps(report)) == report


def test_status_without_stages_counts_zero(out_dir: Path) -> None:
    """A job without stages reports the fields as zero and says nothing of them."""
    report = status_report(out_dir)
    assert {k: report[k] for k in ("checked", "labelled", "annotated", "flagged")} == {
        "checked": 0,
        "labelled": 0,
        "annotated": 0,
        "flagged": {},
    }
    text = format_status(report)
    assert "labelled" not in text
    assert "flagged" not in text


def test_format_status_shows_what_the_stages_found(staged_out: Path) -> None:
    """The text names the stage counts and every flag with its count."""
    text = format_status(status_report(staged_out))
    assert "outputs: checked 4, labelled 2, annotated 1" in text
    assert "flagged: duplicate 2, no_detection 1, unchanged 1" in text


def test_python_status_carries_the_stage_counts(staged_out: Path) -> None:
    """`synthaug.status` exposes the same counts as attributes."""
    import synthaug

    found = synthaug.status(staged_out)
    assert (found.checked, found.labelled, found.annotated) == (4, 2, 1)
    assert dict(found.flagged) == {"duplicate": 2, "unchanged": 1, "no_detection": 1}


def test_status_counts_stages_recorded_in_the_state_cache(tmp_path: Path) -> None:
    """A run's state cache says which parts of the manifest hold stage results: status
    still counts them when they lie in an early cache segment and later ones hold none."""
    from pipeline.manifest.cache import StateCache

    out = tmp_path / "out"
    manifest = out / "manifest.jsonl"
    records = [
        _staged(1, {"phash": "0" * 16, "flags": ("duplicate",), "labels": LABELS}),
        _staged(2, {"upload": UploadRecord("p", id="img2", annotated=True)}),
        *(_record(i, "ok") for i in range(3, 9)),  # later segments: nothing staged
    ]
    cache = StateCache(manifest, segment_lines=2)
    with ManifestWriter(manifest) as writer:
        writer.add_append_hook(cache.add)
        cache.start(cache.load())
        for record in records:
            writer.append(record)
    cache.close()
    check = StateCache(manifest)
    check.load()
    assert check._cached is not None  # read from the cache
    assert check._cached.segments >= 4
    report = status_report(out)
    assert (report["ok"], report["checked"], report["labelled"], report["annotated"]) == (
        8,
        1,
        1,
        1,
    )
    assert report["flagged"] == {"duplicate": 1}
