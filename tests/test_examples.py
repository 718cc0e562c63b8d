"""Every shipped example runs on the mock as its header says, with today's models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from checks import ThreadedMock

from pipeline.cli import main
from pipeline.mockapi.server import MockConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """A copy of examples/ (a run writes beside its spec: never into the repository)."""
    copy = tmp_path / "examples"
    shutil.copytree(EXAMPLES, copy, ignore=shutil.ignore_patterns("runs"))
    return copy


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--no-progress", "--no-grid"])
    return int(exit_info.value.code or 0)


def summary_of(spec: Path) -> dict[str, object]:
    data = yaml.safe_load(spec.read_text())
    out = spec.parent / data["output_dir"]
    loaded: dict[str, object] = json.loads((out / "summary.json").read_text())
    return loaded


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["quickstart", "batch-mock", "nightly-mock", "labelled-mock", "balance-mock"]
)
def test_embedded_mock_examples_run_as_documented(examples: Path, name: str) -> None:
    """The examples that name the embedded mock run with no key and no network: exit 0."""
    spec = examples / f"{name}.yaml"
    assert run_cli("run", str(spec)) == 0
    summary = summary_of(spec)
    assert summary["failed"] == 0
    assert summary["ok"] == summary["items_seen"]


@pytest.mark.slow
def test_the_labelled_rehearsal_labels_flags_and_annotates(examples: Path) -> None:
    """examples/labelled-mock.yaml: every image labelled; the scenes that name objects
    uploaded with their boxes (read back intact), the empty roads flagged and held back."""
    spec = examples / "labelled-mock.yaml"
    assert run_cli("run", str(spec)) == 0
    summary = summary_of(spec)
    label, upload = summary["label"], summary["upload"]
    assert isinstance(label, dict)
    assert isinstance(upload, dict)
    assert label["labelled"] == summary["images"] == 8
    assert label["no_detection"] == 2  # the empty roads
    assert upload["uploaded"] == upload["annotated"] == 6
    assert upload["annotation_check"]["ok"] is True


@pytest.mark.slow
def test_the_balance_rehearsal_fills_what_is_short_and_flags_what_misses(
    examples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """examples/balance-mock.yaml, as its header says: the plan asks 1 tree, 4 leaves,
    6 dogs; the dog prompt never shows a dog (missing_class, kept out of the project);
    a top-up asks for the 6 dogs again and nothing else."""
    spec = examples / "balance-mock.yaml"
    assert run_cli("run", str(spec)) == 0
    out = spec.parent / "runs" / "balance-mock"
    capsys.readouterr()
    assert status_json(out, capsys)["balance"] == {
        "car": {"count": 8, "target": 6, "planned": 0, "stored": 0, "usable": 0},
        "dog": {"count": 0, "target": 6, "planned": 6, "stored": 6, "usable": 0},
        "leaf": {"count": 2, "target": 6, "planned": 4, "stored": 4, "usable": 4},
        "person": {"count": 12, "target": 6, "planned": 0, "stored": 0, "usable": 0},
        "tree": {"count": 5, "target": 6, "planned": 1, "stored": 1, "usable": 1},
    }
    summary = summary_of(spec)
    upload = summary["upload"]
    assert isinstance(upload, dict)
    assert upload["uploaded"] == 5
    assert run_cli("run", str(spec), "--top-up") == 0
    assert summary_of(spec)["requests"] == 6
    assert status_json(out, capsys)["balance"]["dog"]["planned"] == 12


def status_json(out: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """`synthaug status OUT --json`, parsed."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["status", str(out), "--json"])
    assert exit_info.value.code in (0, None)
    return dict(json.loads(capsys.readouterr().out))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "base", "env"),
    [
        pytest.param("openai", "/v1", "OPENAI_API_KEY", id="openai"),
        pytest.param("roboflow", "", "ROBOFLOW_API_KEY", id="roboflow"),
    ],
)
def test_real_api_examples_rehearse_on_the_mock_server(
    examples: Path, monkeypatch: pytest.MonkeyPatch, name: str, base: str, env: str
) -> None:
    """The real-API examples, pointed at `synthaug mock-server` as their header says, run
    every source to ok with today's model (the mock refuses shut-down ones as the API does)."""
    spec = examples / f"{name}.yaml"
    monkeypatch.setenv(env, "anything")
    with ThreadedMock(MockConfig(max_px=64)) as mock:
        data = yaml.safe_load(spec.read_text())
        data["backend"]["base_url"] = mock.base_url + base
        spec.write_text(yaml.safe_dump(data, sort_keys=False))
        assert run_cli("run", str(spec), "--rate", "50/s") == 0
        stats = mock.server.stats
    summary = summary_of(spec)
    assert summary["failed"] == 0
    assert summary["ok"] == summary["items_seen"] == stats.generations
    assert data["params"]["model"] == "gpt-image-2"
