"""The `synthaug` command as a user meets it: exit codes, one-line errors, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    code = exit_info.value.code
    return code if isinstance(code, int) else 1


def mock_spec(tmp_path: Path, *, prompts: int = 4, **run: object) -> Path:
    spec = {
        "version": 1,
        "name": "cli",
        "backend": {"kind": "mock"},
        "params": {"size": "64x64"},
        "run": dict(run),
        "sources": [
            {
                "name": "grid",
                "prompt": "a {colour} {thing}",
                "vars": {
                    "colour": ["red", "blue"],
                    "thing": [f"t{i}" for i in range(prompts // 2)],
                },
            }
        ],
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """--help shows every subcommand and exits 0."""
    assert cli("--help") == 0
    out = capsys.readouterr().out
    for command in ("run", "plan", "status", "grid", "mock-server"):
        assert command in out


def test_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad flag exits 2 with one line that points at --help."""
    assert cli("run", "x.yaml", "--concurrenc", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "--help" in err[0]


def test_missing_spec_file_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """`run` on a spec that does not exist: exit 2, one line naming the file."""
    assert cli("run", "nope.yaml") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["synthaug: error: nope.yaml: no such spec file"]


def test_run_mock_job_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`run` on a mock spec makes every image, a summary, a contact sheet and index.html;
    `status --json` then reports them, and a second run sends nothing."""
    spec = mock_spec(tmp_path)
    assert cli("run", str(spec), "--no-progress") == 0
    out = tmp_path / "runs" / "cli"
    assert (out / "summary.json").exists()
    assert (out / "grids" / "grid.png").exists()
    assert (out / "index.html").exists()
    capsys.readouterr()
    assert cli("status", str(out), "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["ok"] == 4
    assert status["by_source"]["grid"]["ok"] == 4
    assert cli("run", str(spec), "--no-progress") == 0
    assert json.loads((out / "summary.json").read_text())["requests"] == 0


def test_flags_override_the_spec(tmp_path: Path) -> None:
    """--out and --max-images override the spec: the run stops at the budget (exit 4)."""
    spec = mock_spec(tmp_path, prompts=6)
    out = tmp_path / "elsewhere"
    assert cli("run", str(spec), "--no-progress", "--out", str(out), "--max-images", "2") == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 2
    assert summary["stop_reason"] == "budget"


def test_plan_json_counts_done_items(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`plan --json` after a partial run reports done and pending per source."""
    spec = mock_spec(tmp_path, prompts=6)
    assert cli("run", str(spec), "--no-progress", "--max-images", "4") == 4
    capsys.readouterr()
    assert cli("plan", str(spec), "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["total"]["items"] == 6
    assert plan["total"]["done"] == 4
    assert plan["total"]["pending"] == 2
    assert plan["sources"][0]["name"] == "grid"


def test_status_without_manifest_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status` on a folder with no manifest: exit 2, one line telling what to do."""
    assert cli("status", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "synthaug run" in err[0]


def test_grid_without_manifest_is_a_usage_error(tmp_path: Path) -> None:
    """`grid` on a folder with no manifest exits 2."""
    assert cli("grid", str(tmp_path)) == 2


def test_missing_key_exits_2_and_names_the_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A roboflow job without its key variable set: exit 2 naming the variable; no OUT made."""
    spec = mock_spec(tmp_path)
    data = yaml.safe_load(spec.read_text())
    data["backend"] = {"kind": "roboflow", "api_key_env": "MY_RF_KEY"}
    data["project_url"] = "proj"
    spec.write_text(yaml.safe_dump(data))
    assert cli("run", str(spec), "--no-progress") == 2
    err = capsys.readouterr().err
    assert "MY_RF_KEY" in err
    assert not (tmp_path / "runs").exists()


def test_schema_prints_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    """`schema` prints the JSON Schema editors use to validate specs."""
    assert cli("schema") == 0
    schema = json.loads(capsys.readouterr().out)
    assert "properties" in schema
    assert "sources" in schema["properties"]


@pytest.mark.skipif(not (EXAMPLES / "quickstart.yaml").exists(), reason="no quickstart yet")
def test_quickstart_example_plans(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's quick start spec validates and plans without a key or network."""
    assert cli("plan", str(EXAMPLES / "quickstart.yaml")) == 0
    assert "total" in capsys.readouterr().out.lower()


def test_big_runs_skip_drawing_views_and_say_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Past the automatic-drawing limit a run ends without drawing sheets, naming the
    command that draws them; `grid` then draws them on request."""
    import pipeline.cli

    monkeypatch.setattr(pipeline.cli, "AUTO_VIEWS_MAX_ITEMS", 2)
    spec = mock_spec(tmp_path)
    assert cli("run", str(spec), "--no-progress") == 0
    out = tmp_path / "runs" / "cli"
    assert not (out / "grids").exists()
    assert "synthaug grid" in capsys.readouterr().err
    assert cli("grid", str(out)) == 0
    assert (out / "grids" / "grid.png").exists()


def test_quickstart_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's quick start (prompt grid + local images sent as base64) ends all ok,
    with one image per item and both contact sheets."""
    import shutil

    shutil.copytree(EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns("runs"))
    assert cli("run", str(tmp_path / "examples" / "quickstart.yaml"), "--no-progress") == 0
    out = tmp_path / "examples" / "runs" / "quickstart"
    capsys.readouterr()
    assert cli("status", str(out), "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["ok"] == 10
    assert status["by_source"]["shapes-red"]["ok"] == 6
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["leaf-grid.png", "shapes-red.png"]


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        pytest.param("batch-mock.yaml", {"ok": 6, "mode": "batch", "uploaded": None}, id="batch"),
        pytest.param(
            "nightly-mock.yaml", {"ok": 8, "mode": "online", "uploaded": 8}, id="search-upload"
        ),
    ],
)
def test_mock_rehearsal_examples_run_end_to_end(
    tmp_path: Path, example: str, expected: dict[str, object]
) -> None:
    """The README's other rehearsals (Batch API; search → generate → upload) end all ok on
    the embedded mock, and a second run sends nothing."""
    import shutil

    shutil.copytree(EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns("runs"))
    spec = tmp_path / "examples" / example
    assert cli("run", str(spec), "--no-progress", "--no-grid") == 0
    out = tmp_path / "examples" / "runs" / example.removesuffix(".yaml")
    summary = json.loads((out / "summary.json").read_text())
    upload = summary.get("upload") or {}
    found = {"ok": summary["ok"], "mode": summary["mode"], "uploaded": upload.get("uploaded")}
    assert found == expected
    assert cli("run", str(spec), "--no-progress", "--no-grid") == 0
    again = json.loads((out / "summary.json").read_text())
    assert (again["requests"], again["skipped_ok"]) == (0, expected["ok"])
