"""OUT/job.json as a typed record: written as it always was, read leniently by every view."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.job_record import JobRecord, JobSource
from pipeline.manifest.writer import ManifestWriter
from pipeline.records import ItemRecord
from pipeline.store.layout import read_job, write_job, write_json_atomic
from pipeline.views.gallery import write_gallery
from pipeline.views.grid import draw_grids
from pipeline.views.report import status_report

SEARCH = {"prompt": "night street", "limit": 8}
FULL = JobRecord(
    name="fall",
    spec="fall.yaml",
    backend="mock",
    key_scheme=2,
    host="builder",
    sources=(
        JobSource(
            name="street",
            prompt="A street in {season} with {tree}",
            vars={"season": ("early fall", "late fall"), "tree": ("oak", "elm")},
            combine="product",
            repeats=2,
            input="none",
            n=2,
            items=8,
        ),
        JobSource(
            name="night",
            prompt="the same at night",
            combine="product",
            input="roboflow_search",
            items=0,
            search=SEARCH,
        ),
    ),
)

# job.json exactly as `write_job_json` built it before the record existed (dicts in this
# key order: the source's own fields, then `search`, then the `items` added after)
PREVIOUS = {
    "name": "fall",
    "spec": "fall.yaml",
    "backend": "mock",
    "key_scheme": 2,
    "host": "builder",
    "sources": [
        {"name": "street", "prompt": "A street in {season} with {tree}",
         "vars": {"season": ["early fall", "late fall"], "tree": ["oak", "elm"]},
         "combine": "product", "repeats": 2, "input": "none", "n": 2, "items": 8},
        {"name": "night", "prompt": "the same at night", "vars": {}, "combine": "product",
         "repeats": 1, "input": "roboflow_search", "n": 1, "search": SEARCH, "items": 0},
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    "job",
    [
        pytest.param(FULL, id="full"),
        pytest.param(JobRecord(), id="empty"),
        pytest.param(JobRecord(sources=(JobSource("plain"),)), id="bare-source"),
    ],
)
def test_round_trip(job: JobRecord) -> None:
    """A record read back from its own JSON is the same record."""
    assert JobRecord.from_json(json.loads(json.dumps(job.to_json()))) == job


def test_file_of_the_previous_writer_reads_and_writes_the_same(tmp_path: Path) -> None:
    """job.json from before the record reads as it, and writing it again gives the same bytes."""
    write_json_atomic(tmp_path / "job.json", PREVIOUS)
    before = (tmp_path / "job.json").read_bytes()
    job = read_job(tmp_path)
    assert job == FULL
    write_job(tmp_path, FULL)
    assert (tmp_path / "job.json").read_bytes() == before


def test_synthaug_0_1_job_json(tmp_path: Path) -> None:
    """No key scheme means 1; an absolute spec path (POSIX or Windows) is cut to its name."""
    old = {key: value for key, value in PREVIOUS.items() if key != "key_scheme"}
    for spec in ("/home/ana/jobs/fall.yaml", "C:\\Users\\ana\\fall.yaml"):
        job = JobRecord.from_json({**old, "spec": spec})
        assert (job.key_scheme, job.spec) == (1, "fall.yaml")


BROKEN: dict[str, Any] = {
    "name": 7,
    "spec": ["fall.yaml"],
    "backend": None,
    "key_scheme": "2",
    "host": {"name": "x"},
    "sources": [
        "street",
        {"prompt": "no name"},
        {"name": "street", "prompt": 3, "vars": {"tree": "oak", "season": ["fall", 2]},
         "combine": ["product"], "repeats": "2", "input": 0, "n": True, "items": "5",
         "search": "night"},
        {"name": "plain", "repeats": 0, "n": -1, "items": 1},
    ],
}  # fmt: skip


def test_hand_broken_job_json_reads_leniently() -> None:
    """Wrong-typed fields read as absent and sources without a name are skipped."""
    assert JobRecord.from_json(BROKEN) == JobRecord(
        sources=(
            JobSource(name="street", vars={"season": ("fall", "2")}),
            JobSource(name="plain", items=1),
        )
    )
    assert JobRecord.from_json({"sources": {"street": {}}}) == JobRecord()


@pytest.mark.parametrize(
    "text", [pytest.param("{not json", id="torn"), pytest.param("[1, 2]", id="not-an-object")]
)
def test_unreadable_job_json_is_none(tmp_path: Path, text: str) -> None:
    """A job.json that is no JSON object reads as no job.json at all."""
    assert read_job(tmp_path) is None
    (tmp_path / "job.json").write_text(text, encoding="utf-8")
    assert read_job(tmp_path) is None


def test_views_survive_a_hand_broken_job_json(tmp_path: Path) -> None:
    """status, the contact sheets and index.html draw from what is left of a broken job.json."""
    (tmp_path / "job.json").write_text(json.dumps(BROKEN), encoding="utf-8")
    record = ItemRecord(
        key="0" * 64,
        status="failed",
        source="street",
        vars={"season": "fall"},
        repeat=0,
        input=None,
        prompt="a street in fall",
        params={"n": 1},
    )
    with ManifestWriter(tmp_path / "manifest.jsonl") as writer:
        writer.append(record)
    report = status_report(tmp_path)
    assert "name" not in report
    assert (report["pending"], report["by_source"]["plain"]["pending"]) == (1, 1)
    assert [path.name for path in draw_grids(tmp_path, cell_px=32)] == ["street.png"]
    assert "street" in write_gallery(tmp_path).read_text(encoding="utf-8")
