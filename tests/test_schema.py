"""configs/schema.json stays in step with the spec model; shipped specs stay valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.items import check_max_items
from pipeline.jobspec.load import json_schema, load_spec

ROOT = Path(__file__).resolve().parent.parent


def test_schema_file_is_fresh() -> None:
    """configs/schema.json is exactly what the spec model produces today."""
    expected = json.dumps(json_schema(), indent=2) + "\n"
    actual = (ROOT / "configs" / "schema.json").read_text(encoding="utf-8")
    assert actual == expected, (
        "configs/schema.json is stale; regenerate it with: "
        "python -m pipeline.jobspec > configs/schema.json"
    )


def test_schema_describes_the_spec() -> None:
    """The schema has a title, forbids unknown keys and requires the essentials."""
    schema = json_schema()
    assert schema["title"] == "synthaug job spec"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"version", "name", "sources"}
    assert schema["properties"]["version"]["const"] == 1


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("examples/quickstart.yaml", id="quickstart"),
        pytest.param("examples/roboflow.yaml", id="roboflow"),
        pytest.param("examples/openai.yaml", id="openai"),
        pytest.param("configs/reference.yaml", id="reference"),
    ],
)
def test_shipped_specs_load(path: str) -> None:
    """The examples and the reference spec are valid specs."""
    spec = load_spec(ROOT / path)
    check_max_items(spec)


def test_quickstart_runs_on_the_mock_backend() -> None:
    """The quick start needs no key: mock backend, output under runs/quickstart."""
    spec = load_spec(ROOT / "examples" / "quickstart.yaml")
    assert spec.backend.kind == "mock"
    assert spec.output_dir == ROOT / "examples" / "runs" / "quickstart"
    assert [s.input_kind for s in spec.sources] == ["none", "images"]
