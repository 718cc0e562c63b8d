"""The model table: packaged data with dates, judged against the run's date."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import main
from pipeline.errors import SpecError
from pipeline.jobspec.catalog import default_catalog, parse_catalog
from pipeline.jobspec.load import load_spec, spec_from_data
from pipeline.manifest.log import ManifestState
from pipeline.plan import build_plan, format_plan

OPENAI = {"backend": {"kind": "openai"}}
TEN = {"name": "ten", "prompt": "a cat", "repeats": 10}


def openai_spec(params: dict[str, Any], *, today: dt.date | None = None, **extra: Any) -> Any:
    """A kind-openai spec from data (plan sends nothing and needs no key)."""
    data = {"version": 1, "name": "job", **OPENAI, "params": params, "sources": [TEN], **extra}
    return spec_from_data(data, today=today)


@pytest.mark.parametrize(
    ("quality", "dollars"),
    [
        pytest.param("low", 0.06, id="low"),
        pytest.param("medium", 0.53, id="medium"),
        pytest.param("high", 2.11, id="high"),
    ],
)
def test_plan_prices_ten_gpt_image_2_images(quality: str, dollars: float) -> None:
    """10 gpt-image-2 items at 1024x1024 cost what OpenAI's list says."""
    spec = openai_spec({"model": "gpt-image-2", "size": "1024x1024", "quality": quality})
    plan = build_plan(spec, ManifestState())
    assert plan.to_json()["total"]["cost_usd"] == pytest.approx(dollars)
    assert f"${dollars:,.2f}" in format_plan(plan)


@pytest.mark.parametrize(
    ("model", "date", "replacement"),
    [
        pytest.param("gpt-image-1", "2026-10-23", "gpt-image-2", id="gpt-image-1"),
        pytest.param("gpt-image-1-mini", "2026-12-01", "gpt-image-2.6-sunburst", id="mini"),
        pytest.param("gpt-image-1.5", "2026-12-01", "gpt-image-2.6-sunburst", id="1.5"),
        pytest.param(
            "gpt-image-1.5-2025-12-16", "2026-12-01", "gpt-image-2.6-sunburst", id="1.5-snapshot"
        ),
        pytest.param("chatgpt-image-latest", "2026-12-01", "gpt-image-2.6-sunburst", id="chatgpt"),
        pytest.param("dall-e-3", "2026-05-12", "gpt-image-2", id="dall-e-3"),
    ],
)
def test_shut_down_model_exits_2_before_any_request(
    spec_factory: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    model: str,
    date: str,
    replacement: str,
) -> None:
    """A spec naming a shut-down model is one line, exit 2, with the date and a replacement."""
    path = spec_factory(params={"model": model}, **OPENAI)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(path), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1
    assert "spec.yaml:" in err[0]
    assert "params.model" in err[0]
    assert f"{model} was shut down by OpenAI on {date}: use {replacement}" in err[0]
    assert not (path.parent / "runs").exists()  # nothing written, nothing sent


def test_the_run_date_decides_not_the_code() -> None:
    """gpt-image-1-mini was fine on 2026-11-30 (with a warning) and refused on 2026-12-01."""
    params = {"model": "gpt-image-1-mini", "size": "1024x1024", "quality": "low"}
    before = openai_spec(params, today=dt.date(2026, 11, 30))
    assert before.model_warnings() == [
        "gpt-image-1-mini shuts down tomorrow (2026-12-01): use gpt-image-2.6-sunburst "
        "(or gpt-image-2.6-flare, gpt-image-2)"
    ]
    with pytest.raises(SpecError, match="shut down by OpenAI on 2026-12-01"):
        openai_spec(params, today=dt.date(2026, 12, 1))


def test_a_model_within_30_days_of_shutdown_warns_in_plan_and_run_log(
    spec_factory: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Inside the 30-day window plan shows a warning line and the run logs it."""
    params = {"model": "gpt-image-1", "size": "1024x1024", "quality": "low"}
    early = openai_spec(params, today=dt.date(2026, 9, 23))  # 30 days before 2026-10-23
    plan = build_plan(early, ManifestState())
    assert plan.to_json()["warnings"] == [
        "gpt-image-1 shuts down in 30 days (2026-10-23): use gpt-image-2 "
        "(or gpt-image-2.6-sunburst, gpt-image-2.6-flare)"
    ]
    assert "warning: gpt-image-1 shuts down in 30 days" in format_plan(plan)
    assert openai_spec(params, today=dt.date(2026, 9, 22)).model_warnings() == []
    assert openai_spec({"model": "gpt-image-2"}).model_warnings() == []

    import synthaug

    path = spec_factory(params=params, run={"max_items": 1})  # kind mock: free, no network
    spec = load_spec(path, today=dt.date(2026, 10, 1))
    with caplog.at_level(logging.WARNING):
        result = synthaug.run(spec)
    assert result.exit_code == 0
    assert "gpt-image-1 shuts down in 22 days (2026-10-23)" in caplog.text


@pytest.mark.parametrize(
    ("size", "problem"),
    [
        pytest.param("2048x1152", None, id="2k-landscape"),
        pytest.param("3840x2160", None, id="4k"),
        pytest.param("1024x3072", None, id="ratio-3"),
        pytest.param("auto", None, id="auto"),
        pytest.param("1000x1000", "needs both sides multiples of 16", id="not-16"),
        pytest.param("1024x3088", "needs a ratio within 3:1", id="ratio"),
        pytest.param("4096x2304", "makes sides up to 3840", id="edge"),
        pytest.param("3840x3840", "makes up to 8,294,400 pixels", id="pixels"),
    ],
)
def test_gpt_image_2_sizes_follow_its_rule(size: str, problem: str | None) -> None:
    """Custom sizes are judged by the model's rule, not by one fixed list."""
    params = {"model": "gpt-image-2", "size": size}
    if problem is None:
        assert openai_spec(params).sources
    else:
        with pytest.raises(SpecError, match=problem):
            openai_spec(params)


def test_current_and_unknown_models_are_accepted() -> None:
    """The 2.5/2.6 models are accepted (unpriced); a model the table does not know too."""
    for model in ("gpt-image-2.6-flare", "gpt-image-2.6-sunburst", "gpt-image-2.5-flare"):
        spec = openai_spec({"model": model, "size": "2048x1152", "quality": "low"})
        assert build_plan(spec, ManifestState()).to_json()["total"]["cost_usd"] is None
    assert openai_spec({"model": "gpt-image-7", "size": "999x777"}).sources


def test_gpt_image_2_refuses_a_transparent_background() -> None:
    """gpt-image-2 makes no transparent background: said before anything is paid for."""
    with pytest.raises(SpecError, match="makes no transparent background"):
        openai_spec({"model": "gpt-image-2", "background": "transparent"})


def test_packaged_table_is_well_formed() -> None:
    """Every replacement is a model the table knows; every shut-down model names one."""
    catalog = default_catalog()
    names = {model.name for model in catalog.models}
    for model in catalog.models:
        assert set(model.replacements) <= names, model.name
        if model.shutdown is not None:
            assert model.replacements, model.name
    assert catalog.get("gpt-image-2") is not None
    assert catalog.get("gpt-image-2-2026-04-21") is catalog.get("gpt-image-2")


def test_updating_the_table_is_a_data_change() -> None:
    """A shutdown announced in the data is honoured with no code change."""
    catalog = parse_catalog(
        {
            "models": {
                "gpt-image-2": {"shutdown": "2027-03-01", "replacements": ["gpt-image-3"]},
                "gpt-image-3": {},
            }
        }
    )
    assert catalog.shutdown_warning("gpt-image-2", dt.date(2027, 2, 1)) == (
        "gpt-image-2 shuts down in 28 days (2027-03-01): use gpt-image-3"
    )
    assert catalog.shutdown_problem("gpt-image-2", dt.date(2027, 3, 1)) == (
        "gpt-image-2 was shut down by OpenAI on 2027-03-01: use gpt-image-3"
    )
    with pytest.raises(ValueError, match=r"gpt-image-2\.shutdown: expected a date"):
        parse_catalog({"models": {"gpt-image-2": {"shutdown": "soon"}}})
