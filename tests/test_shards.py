"""``--shard I/N``: shards partition a job by key, run side by side in one OUT, each with
its own manifest and lock, and fold back together (`merge`) into what one run makes.

Against the mock API on 127.0.0.1 (in a thread, or a subprocess for runs at once).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from checks import ThreadedMock, bare_record, mock_server_process, stats, write_job_spec

from pipeline.cli import main
from pipeline.errors import OutputError, UsageError
from pipeline.items import expand_drafts
from pipeline.jobspec.load import load_spec
from pipeline.manifest.folded import fold_records
from pipeline.manifest.log import read_latest
from pipeline.mockapi.server import MockConfig
from pipeline.run.job import run_job
from pipeline.shard import Shard, parse_shard
from pipeline.store.layout import lock_name
from pipeline.store.lock import acquire_lock

KEY = "rf-shards-UNIQUE-77e1"


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)


def cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([*args])
    return int(exit_info.value.code or 0)


def grid_spec(folder: Path, base: str, items: int, out: str = "out") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    values = [str(i) for i in range(items)]
    return write_job_spec(folder, base, name="shards", values=values, size="32x32", out=out)


def folded(out: Path) -> dict[str, dict[str, Any]]:
    """Every key's last line over all manifests of `out`, ok first (as readers fold)."""
    lines: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob("manifest*.jsonl")):
        for key, line in read_latest(path).items():
            if key not in lines or line["status"] == "ok":
                lines[key] = line
    return lines


@pytest.mark.parametrize("text", ["3", "3/3", "-1/2", "a/b", "0/0", "1/ 2x"])
def test_a_bad_shard_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="--shard"):
        parse_shard(text)


def test_shards_partition_a_1000_item_job_for_every_n(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """For N in 1..7, `plan --shard I/N` counts sum to the job and no key is in two
    shards."""
    path = grid_spec(tmp_path, "http://127.0.0.1:9", 1000)
    keys = [draft.key for draft in expand_drafts(load_spec(path))]
    assert len(set(keys)) == 1000
    for count in range(1, 8):
        totals = []
        owners: dict[str, int] = {}
        for index in range(count):
            assert cli("plan", str(path), "--shard", f"{index}/{count}", "--json") == 0
            totals.append(json.loads(capsys.readouterr().out)["total"]["items"])
            for key in keys:
                if Shard(index, count).owns(key):
                    assert key not in owners
                    owners[key] = index
        assert sum(totals) == 1000
        assert len(owners) == 1000
        assert totals == [sum(1 for k in keys if owners[k] == i) for i in range(count)]


async def _run(path: Path, shard: Shard | None = None) -> int:
    result = await run_job(load_spec(path), spec_path=path, shard=shard)
    return result.exit_code


async def test_shards_then_merge_equal_one_run_and_resharding_sends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with ThreadedMock(MockConfig(api_key=KEY)) as mock:
        sharded = grid_spec(tmp_path / "a", mock.base_url, 40)
        for index in range(3):
            assert await _run(sharded, Shard(index, 3)) == 0
        out = sharded.parent / "out"
        assert sorted(p.name for p in out.glob("manifest*.jsonl")) == [
            f"manifest.shard-{i}-of-3.jsonl" for i in range(3)
        ]
        assert mock.server.stats.generations == 40
        assert cli("status", str(out), "--json") == 0
        status = json.loads(capsys.readouterr().out)
        assert (status["ok"], status["items"]) == (40, 40)  # every shard's manifest read
        assert sorted(status["shards"]) == ["0/3", "1/3", "2/3"]
        assert sum(run["ok"] for run in status["shards"].values()) == 40
        one = [json.loads(_status_json(out, f"{i}/3", capsys))["ok"] for i in range(3)]
        assert sum(one) == 40
        assert one == [run["ok"] for run in status["shards"].values()]
        assert cli("merge", str(out)) == 0
        assert [p.name for p in out.glob("manifest*.jsonl")] == ["manifest.jsonl"]
        merged = read_latest(out / "manifest.jsonl")
        assert len((out / "manifest.jsonl").read_text().splitlines()) == 40  # one line a key

        whole = grid_spec(tmp_path / "b", mock.base_url, 40)
        assert await _run(whole) == 0
        once = read_latest(whole.parent / "out" / "manifest.jsonl")
        assert merged.keys() == once.keys()
        for key, line in once.items():
            assert merged[key]["status"] == "ok"
            assert [o["sha256"] for o in merged[key]["outputs"]] == [
                o["sha256"] for o in line["outputs"]
            ]
            assert [o["path"] for o in merged[key]["outputs"]] == [
                o["path"] for o in line["outputs"]
            ]

        generations = mock.server.stats.generations
        for index in range(2):  # N = 3 -> 2 -> none: nothing is sent again
            assert await _run(sharded, Shard(index, 2)) == 0
        assert await _run(sharded) == 0
        assert mock.server.stats.generations == generations


async def test_going_back_to_no_shard_finishes_without_paying_twice(tmp_path: Path) -> None:
    """Shard 0/2 done, then an unsharded run: it makes only shard 1's items."""
    with ThreadedMock(MockConfig(api_key=KEY)) as mock:
        path = grid_spec(tmp_path, mock.base_url, 30)
        assert await _run(path, Shard(0, 2)) == 0
        first = mock.server.stats.generations
        assert await _run(path) == 0
        assert mock.server.stats.generations == 30
        assert mock.server.stats.duplicates == 0
        assert 0 < first < 30
        lines = folded(tmp_path / "out")
        assert len(lines) == 30
        assert all(line["status"] == "ok" for line in lines.values())


@pytest.mark.parametrize(
    ("held", "wanted", "refused"),
    [
        pytest.param(Shard(0, 2), Shard(0, 2), True, id="same-shard"),
        pytest.param(Shard(0, 2), Shard(1, 2), False, id="sibling-shard"),
        pytest.param(Shard(0, 2), None, True, id="whole-job-over-a-shard"),
        pytest.param(None, Shard(1, 2), True, id="shard-over-the-whole-job"),
        pytest.param(Shard(0, 2), Shard(0, 3), True, id="shard-of-another-n"),
    ],
)
async def test_runs_that_overlap_refuse_and_siblings_run(
    tmp_path: Path, held: Shard | None, wanted: Shard | None, refused: bool
) -> None:
    with ThreadedMock(MockConfig(api_key=KEY)) as mock:
        path = grid_spec(tmp_path, mock.base_url, 6)
        out = tmp_path / "out"
        with acquire_lock(out, name=lock_name(held)):
            if refused:
                with pytest.raises(OutputError, match="in use"):
                    await _run(path, wanted)
                assert mock.server.stats.generations == 0
            else:
                assert await _run(path, wanted) == 0
                assert mock.server.stats.generations > 0


def test_merge_is_refused_while_a_shard_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = grid_spec(tmp_path, "http://127.0.0.1:9", 4)
    out = path.parent / "out"
    out.mkdir()
    (out / "manifest.shard-0-of-2.jsonl").write_text("")
    with acquire_lock(out, name=lock_name(Shard(0, 2))):
        assert cli("merge", str(out)) == 2
    assert "in use" in capsys.readouterr().err
    assert (out / "manifest.shard-0-of-2.jsonl").exists()


@pytest.mark.slow
def test_two_shards_at_once_then_merge(tmp_path: Path) -> None:
    """Two shard processes against one server at once: every item made once, and after
    merge one manifest holds them all."""
    with mock_server_process(tmp_path, "--latency", "0.05") as base:
        path = grid_spec(tmp_path, base, 24)
        runs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pipeline",
                    "run",
                    str(path),
                    "--shard",
                    f"{i}/2",
                    "--no-progress",
                    "--no-grid",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for i in range(2)
        ]
        for run in runs:
            _out, err = run.communicate(timeout=120)
            assert run.returncode == 0, err.decode()[-2000:]
        counts = stats(base)
    assert counts["generations"] == 24
    assert counts["duplicates"] == 0
    out = tmp_path / "out"
    assert cli("merge", str(out)) == 0
    lines = read_latest(out / "manifest.jsonl")
    assert len(lines) == 24
    assert all(line["status"] == "ok" for line in lines.values())


def test_folding_prefers_an_ok_line_then_the_later_file() -> None:
    """Per key: ok over anything else, else the later manifest's line."""
    a, b, c = ("a" * 64), ("b" * 64), ("c" * 64)
    first = {a: bare_record(a, "ok"), b: bare_record(b, "failed"), c: bare_record(c, "failed")}
    later = {a: bare_record(a, "failed"), b: bare_record(b, "ok"), c: bare_record(c, "generated")}
    folded_records = fold_records([first, later])
    assert {k: r.status for k, r in folded_records.items()} == {
        a: "ok",
        b: "ok",
        c: "generated",
    }


def _status_json(out: Path, shard: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli("status", str(out), "--json", "--shard", shard) == 0
    return capsys.readouterr().out
