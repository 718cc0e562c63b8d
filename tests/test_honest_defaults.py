"""Today's models and nothing silent: only set params are sent, retired models refused,
unknown costs said, real spend from usage, and an OUT of another key scheme refused."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aioresponses import aioresponses
from checks import bare_record, run_spec, write_job_spec

from pipeline.backends.roboflow import RoboflowBackend
from pipeline.cli import main
from pipeline.errors import OutputError
from pipeline.items import expand_items, item_key
from pipeline.jobspec.load import load_spec
from pipeline.manifest.log import read_lines
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.pricing import cost_from_usage

KEY = "test-key-honest"
OPENAI_KEYS = {"model", "quality", "style", "size", "n", "output_format", "background"}


async def test_spec_without_params_sends_no_model_quality_style_size_or_n(
    spec_factory: Callable[..., Path], mock_http: aioresponses
) -> None:
    """The request body carries only the prompt and project when the spec sets no params."""
    spec = load_spec(spec_factory(backend={"kind": "roboflow"}, project_url="leaves"))
    item = next(expand_items(spec))
    url = re.compile(r"^https://api\.roboflow\.com/synthetic-image\?api_key=.*$")
    mock_http.post(url, payload={"data": [{"url": "https://img.example/1.png"}]})
    async with RoboflowBackend(spec.backend.base_url, KEY, concurrency=1, timeout_s=5) as backend:
        await backend.generate(item, None)
    (call,) = [c for calls in mock_http.requests.values() for c in calls]
    body = call.kwargs["json"]
    assert body == {"project_url": "leaves", "prompt": "a cat"}
    assert not OPENAI_KEYS & set(body)


def test_params_the_spec_sets_are_sent_as_set(spec_factory: Callable[..., Path]) -> None:
    """Set params reach the body unchanged; nothing is added next to them."""
    params = {"model": "gpt-image-2", "quality": "low", "output_format": "webp"}
    spec = load_spec(spec_factory(params=params))
    assert dict(next(expand_items(spec)).params) == params


@pytest.mark.parametrize(
    ("params", "words"),
    [
        pytest.param(
            {"model": "dall-e-3"}, "dall-e-3 was shut down by OpenAI on 2026-05-12", id="dall-e-3"
        ),
        pytest.param({"model": "dall-e-2"}, "use gpt-image-2", id="dall-e-2"),
        pytest.param(
            {"model": "gpt-image-1"}, "gpt-image-1 was shut down by OpenAI on 2026-10-23",
            id="gpt-image-1",
        ),
        pytest.param(
            {"model": "gpt-image-1-mini"}, "shut down by OpenAI on 2026-12-01: use gpt-image-2.6",
            id="gpt-image-1-mini",
        ),
        pytest.param({"style": "vivid"}, "style was a dall-e-3 parameter", id="style"),
        pytest.param({"quality": "hd"}, "expected 'low', 'medium', 'high' or 'auto'", id="hd"),
        pytest.param(
            {"model": "gpt-image-2", "size": "1792x1000"},
            "gpt-image-2 needs both sides multiples of 16",
            id="size-not-multiple-of-16",
        ),
        pytest.param(
            {"output_format": "jpeg", "background": "transparent"},
            "transparent background needs output_format png or webp",
            id="transparent-jpeg",
        ),
    ],
)
def test_old_or_impossible_params_exit_2_naming_the_fix(
    spec_factory: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    params: dict[str, str],
    words: str,
) -> None:
    """A retired model or parameter is one line, exit 2, before anything is sent."""
    path = spec_factory(params=params, backend={"kind": "roboflow"}, project_url="p")
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1
    assert words in err[0]
    assert "params" in err[0]


def test_retired_model_error_names_current_models(
    spec_factory: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """model: dall-e-3 is refused with a current GPT image model to use instead."""
    path = spec_factory(params={"model": "dall-e-3"})
    with pytest.raises(SystemExit):
        main(["run", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert "spec.yaml" in err
    assert "dall-e-3 was shut down by OpenAI on 2026-05-12: use gpt-image-2" in err


def test_keys_of_unchanged_bodies_keep_their_value() -> None:
    """The key formula did not change: a body that is the same keeps the same key."""
    body = {
        "project_url": "fall-leaves",
        "prompt": "A street in late fall",
        "model": "gpt-image-1",
        "quality": "high",
        "size": "1024x1024",
        "n": 1,
    }
    assert (
        item_key("roboflow", body, 0)
        == "f4d029bfbf59c1e609af6d44ce90f4d69e41d45d6f25aa7f5696f04ef9573a05"
    )
    assert (
        item_key("mock", {"project_url": "", "prompt": "a cat"}, 1)
        == "e6327911f701629d87b9cbf62fa7e1673bfc36282ef6e9df73851bfb65bb6c81"
    )


def make_old_scheme(out: Path) -> None:
    """Turn a finished OUT into what synthaug 0.1 left: job.json without a key scheme."""
    job = json.loads((out / "job.json").read_text())
    job.pop("key_scheme")
    (out / "job.json").write_text(json.dumps(job))


async def test_old_key_scheme_is_refused_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OUT of key scheme 1 would pay for every item again: run refuses, sends nothing."""
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    async with MockServer(MockConfig()) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=3)
        assert (await run_spec(path)).exit_code == 0
        assert json.loads((tmp_path / "out" / "job.json").read_text())["key_scheme"] == 2
        again = await run_spec(path)  # same scheme, same spec: nothing to send
        assert again.summary["requests"] == 0
        make_old_scheme(tmp_path / "out")
        before = server.stats.requests
        manifest = (tmp_path / "out" / "manifest.jsonl").read_bytes()
        with pytest.raises(OutputError, match=r"key scheme 1 .*point output_dir \(or --out\)"):
            await run_spec(path)
        assert server.stats.requests == before
    assert (tmp_path / "out" / "manifest.jsonl").read_bytes() == manifest  # nothing appended


def test_old_key_scheme_exits_2_with_one_line_for_run_and_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On the command line the refusal is exit 2 and one line, for run and for plan."""
    path = tmp_path / "spec.yaml"
    spec = {"version": 1, "name": "j", "backend": {"kind": "mock"}, "output_dir": "out"}
    spec["sources"] = [{"name": "s", "prompt": "a {red|blue} cat"}]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit) as first:
        main(["run", str(path), "--no-progress", "--no-grid"])
    assert first.value.code == 0
    make_old_scheme(tmp_path / "out")
    capsys.readouterr()
    for command in (["run", str(path), "--no-progress"], ["plan", str(path)]):
        with pytest.raises(SystemExit) as refused:
            main(command)
        err = capsys.readouterr().err.strip().splitlines()
        assert refused.value.code == 2, err
        assert len(err) == 1
        assert "would pay for every item again" in err[0]


def test_newer_key_scheme_asks_for_an_upgrade(tmp_path: Path) -> None:
    """An OUT written by a newer synthaug is refused with the command that fixes it."""
    from pipeline.manifest.log import load_state
    from pipeline.manifest.writer import ManifestWriter
    from pipeline.run.prepare import check_key_scheme

    (tmp_path / "job.json").write_text(json.dumps({"key_scheme": 99}))
    with ManifestWriter(tmp_path / "manifest.jsonl") as writer:
        writer.append(bare_record("k" * 64, "failed"))
    with pytest.raises(OutputError, match=r"newer synthaug .*pip install -U synthaug"):
        check_key_scheme(tmp_path, load_state(tmp_path / "manifest.jsonl"))


async def test_spend_comes_from_the_answers_usage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When answers report usage, the summary's cost is what they say, even unpriced."""
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    async with MockServer(MockConfig(response_shape="b64_json")) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=3)
        spec: dict[str, Any] = yaml.safe_load(path.read_text())
        spec["params"] = {"model": "gpt-image-2", "quality": "low"}  # size: the API's choice
        path.write_text(yaml.safe_dump(spec))
        result = await run_spec(path)
    assert result.exit_code == 0
    lines = [line for line in read_lines(tmp_path / "out" / "manifest.jsonl")]
    costs = [cost_from_usage("gpt-image-2", line["response"]["usage"]) for line in lines]
    assert all(cost is not None and cost > 0 for cost in costs)
    expected = sum(cost for cost in costs if cost is not None)
    assert result.summary["cost_usd"] == pytest.approx(expected, abs=1e-4)


def test_usage_prices_tokens_by_kind() -> None:
    """Text and image input and image output tokens each have their own price."""
    usage = {
        "input_tokens": 150,
        "input_tokens_details": {"text_tokens": 50, "image_tokens": 100},
        "output_tokens": 1056,
    }
    assert cost_from_usage("gpt-image-2", usage) == pytest.approx(
        (50 * 5 + 100 * 8 + 1056 * 30) / 1e6
    )
    assert cost_from_usage("gpt-image-2.6-flare", {"input_tokens": 10, "output_tokens": 272}) == (
        pytest.approx((10 * 5 + 272 * 30) / 1e6)
    )
    assert cost_from_usage("unknown-model", usage) is None
    assert cost_from_usage("gpt-image-2", {"input_tokens": "many"}) is None
