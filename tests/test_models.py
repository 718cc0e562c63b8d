"""What the API says of the spec's models, asked before a run spends; the mock's
``/v1/models``; ``synthaug models``; and 404 ``model_not_found`` named for what it is."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from checks import ThreadedMock, run_spec

from pipeline.backends.base import classify_http
from pipeline.backends.openai import OpenAIBackend
from pipeline.cli import main
from pipeline.errors import FatalError
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.model_check import judge
from pipeline.records import WorkItem

KEY = "sk-models-test-8d3f2a61c0"
TODAY = dt.date.today()  # the run's and the mock's date, unless a test sets one
YESTERDAY = TODAY - dt.timedelta(days=1)
NOW = dt.datetime(2026, 12, 7, 5, 0, tzinfo=dt.timezone.utc)
DAY = dt.date(2026, 12, 7)


def cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    code = exit_info.value.code
    return code if isinstance(code, int) else 1


def openai_spec(
    folder: Path, base_url: str, model: str = "gpt-image-2", *, mode: str = "online"
) -> Path:
    """Two prompt items of `model` for kind openai against the mock at `base_url`."""
    spec = {
        "version": 1,
        "name": "models",
        "output_dir": "out",
        "backend": {"kind": "openai", "base_url": f"{base_url}/v1", "mode": mode},
        "params": {"model": model, "quality": "low", "size": "1024x1024"},
        "run": {"rate_limit": "1000/s", "backoff_base_s": 0.01, "backoff_max_s": 0.1},
        "sources": [{"name": "cats", "prompt": "a {c} cat", "vars": {"c": ["red", "tabby"]}}],
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> str:
    """OPENAI_API_KEY set to the test key."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return KEY


# ---- the decision ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "payload", "verdict", "words"),
    [
        pytest.param(200, {"shutdown_date": None}, "served", "no shutdown date", id="current"),
        pytest.param(
            200, {"shutdown_date": "2026-12-06"}, "shut down", "on 2026-12-06", id="yesterday"
        ),
        pytest.param(
            200, {"shutdown_date": "2026-12-07"}, "shut down", "on 2026-12-07", id="today"
        ),
        pytest.param(
            200, {"shutdown_date": "2026-12-17"}, "shuts down soon", "in 10 days", id="in-10-days"
        ),
        pytest.param(200, {"shutdown_date": "2027-03-01"}, "served", "2027-03-01", id="far"),
        pytest.param(200, {"shutdown_date": "soon"}, "unknown", "unreadable", id="bad-date"),
        pytest.param(404, None, "not available", "cannot use model gpt-image-9", id="404"),
        pytest.param(500, {"error": {"message": "boom"}}, "unknown", "HTTP 500 (boom)", id="500"),
        pytest.param(401, None, "unknown", "HTTP 401", id="401-restricted-key"),
        pytest.param(200, "<html>", "unknown", "HTTP 200", id="not-json"),
    ],
)
def test_an_answer_means_one_verdict(status: int, payload: Any, verdict: str, words: str) -> None:
    """Each answer of GET /models/{id} is judged against the run's date."""
    answer = judge("gpt-image-9", status, payload, DAY)
    assert answer.verdict == verdict
    assert words in answer.detail
    assert verdict == "served" or "gpt-image-9" in answer.detail  # a warning names it


def test_a_shut_down_model_names_a_replacement() -> None:
    """The catalog's replacement (or a current model) is named with the date."""
    known = judge("gpt-image-1.5", 200, {"shutdown_date": "2026-12-01"}, DAY)
    assert known.detail.endswith("use gpt-image-2.6-sunburst (or gpt-image-2.6-flare, gpt-image-2)")
    unknown = judge("gpt-image-9", 200, {"shutdown_date": "2026-12-06"}, DAY)
    assert "use gpt-image-2" in unknown.detail


# ---- before a run spends -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_a_model_the_api_says_is_shut_down_exits_2_before_any_generation(
    tmp_path: Path, keyed: str, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    """/models/gpt-image-9 says yesterday: exit 2 with one line, no generation, no batch."""
    config = MockConfig(api_key=KEY, shutdowns={"gpt-image-9": YESTERDAY})
    with ThreadedMock(config) as mock:
        path = openai_spec(tmp_path, mock.base_url, "gpt-image-9", mode=mode)
        code = cli("run", str(path), "--no-progress", "--no-grid")
    err = capsys.readouterr().err
    assert code == 2, err
    [line] = [line for line in err.splitlines() if line.startswith("synthaug: error:")]
    assert f"gpt-image-9 was shut down on {YESTERDAY.isoformat()}" in line
    assert "params.model" in line
    assert "use gpt-image-2" in line
    assert mock.server.stats.model_requests == 1
    assert mock.server.stats.requests == 0  # generation requests
    assert mock.server.stats.generations == 0
    assert (mock.server.stats.batch_files, mock.server.stats.batches) == (0, 0)
    assert KEY not in err


async def test_a_model_the_key_cannot_use_exits_3_before_any_generation(
    tmp_path: Path, keyed: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 404 from /models/{id}: fatal (exit 3) naming the model, nothing generated."""
    caplog.set_level(logging.DEBUG)
    async with MockServer(MockConfig(api_key=KEY)) as server:
        path = openai_spec(tmp_path, server.base_url, "image-model-x")
        with pytest.raises(FatalError) as caught:
            await run_spec(path)
    message = str(caught.value)
    assert caught.value.exit_code == 3
    assert "cannot use model image-model-x" in message
    assert "project_url" not in message
    assert server.stats.model_requests == 1
    assert server.stats.requests == 0
    assert KEY not in message + caplog.text


@pytest.mark.parametrize("fault", ["500", "drop", "malformed"])
async def test_a_failed_models_request_warns_and_the_run_goes_on(
    tmp_path: Path, keyed: str, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    """A 500, a dropped connection or garbage from /models: a warning, then the run."""
    config = MockConfig(api_key=KEY, models_fault=fault, max_px=32)
    caplog.set_level(logging.WARNING)
    async with MockServer(config) as server:
        result = await run_spec(openai_spec(tmp_path, server.base_url))
    assert result.exit_code == 0, result.summary
    # asked once (aiohttp itself may send an idempotent GET again on a dropped connection)
    assert server.stats.model_requests == 1 or fault == "drop"
    assert server.stats.generations == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not ask the API about model gpt-image-2" in w for w in warnings)
    assert KEY not in caplog.text


async def test_a_model_shutting_down_soon_warns(
    tmp_path: Path, keyed: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A shutdown_date within 30 days: a warning naming the date, and the run goes on."""
    soon = TODAY + dt.timedelta(days=12)
    config = MockConfig(api_key=KEY, shutdowns={"gpt-image-9": soon}, max_px=32)
    caplog.set_level(logging.WARNING)
    async with MockServer(config) as server:
        result = await run_spec(openai_spec(tmp_path, server.base_url, "gpt-image-9"))
    assert result.exit_code == 0, result.summary
    assert f"gpt-image-9 shuts down in 12 days ({soon.isoformat()})" in caplog.text


async def test_a_kind_that_does_not_ask_sends_no_models_request(tmp_path: Path) -> None:
    """kind mock (no asks_models) is never asked about models."""
    spec = {
        "version": 1,
        "name": "m",
        "backend": {"kind": "mock"},
        "params": {"model": "gpt-image-9", "size": "64x64"},
        "sources": [{"name": "a", "prompt": "x"}],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = await run_spec(path)
    assert result.exit_code == 0


# ---- model_not_found from a generation ------------------------------------------------------


def item(model: str) -> WorkItem:
    return WorkItem(
        key="f" * 64, source="cats", prompt="a cat", project_url="", params={"model": model}
    )


async def test_a_404_model_not_found_names_the_model_not_project_url() -> None:
    """The mock refuses a shut-down model as OpenAI does; the error names the model."""
    config = MockConfig(api_key=KEY, shutdowns={"gpt-image-9": YESTERDAY})
    async with (
        MockServer(config) as server,
        OpenAIBackend(f"{server.base_url}/v1", KEY, concurrency=1, timeout_s=5) as client,
    ):
        with pytest.raises(FatalError) as caught:
            await client.generate(item("gpt-image-9"), None)
    message = str(caught.value)
    assert caught.value.status == 404
    assert "model gpt-image-9 is not available to this key" in message
    assert "synthaug models" in message
    assert "project_url" not in message
    assert KEY not in message
    assert server.stats.model_not_found == 1
    assert server.stats.generations == 0


async def test_a_generation_refused_after_the_models_check_aborts_with_the_model(
    tmp_path: Path, keyed: str, caplog: pytest.LogCaptureFixture
) -> None:
    """/models down (a warning), then the generation's 404: exit 3 naming the model."""
    config = MockConfig(api_key=KEY, models_fault="503", shutdowns={"gpt-image-9": YESTERDAY})
    caplog.set_level(logging.DEBUG)
    async with MockServer(config) as server:
        result = await run_spec(openai_spec(tmp_path, server.base_url, "gpt-image-9"))
    assert result.exit_code == 3
    assert result.message is not None
    assert "model gpt-image-9 is not available" in result.message
    assert "project_url" not in result.message
    assert server.stats.generations == 0
    assert KEY not in caplog.text + result.message


@pytest.mark.parametrize(
    ("projects", "present", "absent"),
    [
        pytest.param(True, "check project_url and backend.base_url", None, id="roboflow"),
        pytest.param(False, "unknown endpoint: check backend.base_url", "project_url", id="openai"),
    ],
)
def test_404_advice_names_only_the_kinds_keys(
    projects: bool, present: str, absent: str | None
) -> None:
    """A plain 404 names project_url only for kinds whose requests name a project."""
    message = str(classify_http(404, "Not Found", {}, now=NOW, projects=projects))
    assert present in message
    assert absent is None or absent not in message
    refused = str(classify_http(401, "no", {}, now=NOW, projects=projects))
    assert ("the project" in refused) is projects


def test_model_not_found_body_is_fatal_and_names_the_requests_model() -> None:
    """OpenAI's model_not_found body: fatal, naming the request's model (not the body's)."""
    body = json.dumps(
        {
            "error": {
                "message": "The model 'x' does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
        }
    )
    error = classify_http(404, body, {}, now=NOW, projects=False, model="gpt-image-1.5")
    assert isinstance(error, FatalError)
    assert "model gpt-image-1.5 is not available to this key" in str(error)
    assert "unknown project" not in str(error)


# ---- the mock's /v1/models -------------------------------------------------------------------


async def test_mock_serves_models_as_openai_does() -> None:
    """The list, one model, a shut-down one, an unknown gpt-image id and a 404."""
    config = MockConfig(api_key=KEY, shutdowns={"gpt-image-2": DAY})
    headers = {"Authorization": f"Bearer {KEY}"}
    async with MockServer(config) as server, aiohttp.ClientSession(headers=headers) as session:

        async def get(path: str) -> tuple[int, Any]:
            async with session.get(f"{server.base_url}/v1{path}") as answer:
                return answer.status, await answer.json()

        status, listing = await get("/models")
        assert status == 200
        assert listing["object"] == "list"
        ids = {entry["id"]: entry for entry in listing["data"]}
        assert ids["gpt-image-1-mini"]["shutdown_date"] == "2026-12-01"
        assert ids["gpt-image-2"]["shutdown_date"] == "2026-12-07"  # configured
        assert set(ids["gpt-image-2.6-flare"]) == {
            "id",
            "object",
            "created",
            "owned_by",
            "shutdown_date",
        }
        status, one = await get("/models/gpt-image-2.6-flare")
        assert (status, one["object"], one["shutdown_date"]) == (200, "model", None)
        assert (await get("/models/gpt-image-7-preview"))[1]["shutdown_date"] is None
        status, missing = await get("/models/x")
        assert status == 404
        assert missing == {
            "error": {
                "message": "The model 'x' does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
        }
        async with session.get(
            f"{server.base_url}/v1/models", headers={"Authorization": "Bearer wrong"}
        ) as answer:
            assert answer.status == 401


async def test_mock_generation_of_a_shut_down_catalog_model_is_404() -> None:
    """The catalog's dates hold on the mock's date: gpt-image-1 is refused after 2026-10-23."""
    config = MockConfig(today=dt.date(2026, 10, 24))
    async with MockServer(config) as server, aiohttp.ClientSession() as session:
        body = {"model": "gpt-image-1", "prompt": "a cat"}
        async with session.post(f"{server.base_url}/v1/images/generations", json=body) as answer:
            assert answer.status == 404
            assert (await answer.json())["error"]["code"] == "model_not_found"
        body["model"] = "gpt-image-2"
        async with session.post(f"{server.base_url}/v1/images/generations", json=body) as answer:
            assert answer.status == 200


def test_mock_server_shutdown_flag_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    """``mock-server --shutdown`` takes MODEL=YYYY-MM-DD; anything else exits 2."""
    assert cli("mock-server", "--port", "0", "--shutdown", "gpt-image-2") == 2
    assert "MODEL=YYYY-MM-DD" in capsys.readouterr().err


def test_mock_config_refuses_an_unknown_models_fault() -> None:
    """A models_fault the mock cannot inject is a config error, not a silent no-op."""
    with pytest.raises(ValueError, match="models_fault"):
        MockConfig(models_fault="429")


# ---- synthaug models -------------------------------------------------------------------------


def test_models_prints_the_catalog_on_a_date(capsys: pytest.CaptureFixture[str]) -> None:
    """gpt-image-2 current with its 1024x1024 prices; gpt-image-1-mini shut down 2026-12-01."""
    assert cli("models", "--date", "2026-12-07") == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert "current" in rows["gpt-image-2"]
    assert "$0.006/$0.053/$0.211" in rows["gpt-image-2"]
    assert "$5/$8/$30" in rows["gpt-image-2"]
    assert "shut down  2026-12-01" in rows["gpt-image-1-mini"]
    assert "gpt-image-2.6-sunburst" in rows["gpt-image-1-mini"]
    assert "tokens only" in rows["gpt-image-2.6-flare"]


def test_models_json_parses(capsys: pytest.CaptureFixture[str]) -> None:
    """--json is one object; before its shutdown a model is deprecated."""
    assert cli("models", "--json", "--date", "2026-11-20") == 0
    report = json.loads(capsys.readouterr().out)
    models = {row["model"]: row for row in report["models"]}
    assert report["today"] == "2026-11-20"
    assert models["gpt-image-2"]["status"] == "current"
    assert models["gpt-image-2"]["per_image"] == {"low": 0.006, "medium": 0.053, "high": 0.211}
    assert models["gpt-image-1-mini"]["status"] == "deprecated"
    assert models["gpt-image-1-mini"]["shutdown"] == "2026-12-01"
    assert models["gpt-image-2.6-flare"]["per_image"] is None
    assert "spec" not in report


def test_models_with_a_spec_says_what_the_api_says(
    tmp_path: Path, keyed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With an openai spec, the API is asked about its model (and nothing generated)."""
    with ThreadedMock(MockConfig(api_key=KEY)) as mock:
        path = openai_spec(tmp_path, mock.base_url)
        assert cli("models", str(path)) == 0
        text = capsys.readouterr().out
        assert cli("models", str(path), "--json") == 0
        report = json.loads(capsys.readouterr().out)
    assert "gpt-image-2  served: the API serves it (no shutdown date)" in text
    [answer] = report["spec"]["api"]
    assert (answer["model"], answer["verdict"], answer["status"]) == ("gpt-image-2", "served", 200)
    assert mock.server.stats.model_requests == 2
    assert mock.server.stats.requests == 0


def test_models_with_a_spec_exits_2_for_a_shut_down_model(
    tmp_path: Path, keyed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table is printed, then the run's own verdict: exit 2 naming the model."""
    config = MockConfig(api_key=KEY, shutdowns={"gpt-image-9": YESTERDAY})
    with ThreadedMock(config) as mock:
        path = openai_spec(tmp_path, mock.base_url, "gpt-image-9")
        assert cli("models", str(path)) == 2
    captured = capsys.readouterr()
    assert "gpt-image-9  shut down" in captured.out
    assert "gpt-image-9 was shut down on" in captured.err
    assert KEY not in captured.out + captured.err


def test_models_with_a_mock_spec_says_the_api_is_not_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A kind without asks_models: no key needed, no request, one line saying so."""
    spec = {
        "version": 1,
        "name": "m",
        "backend": {"kind": "mock"},
        "sources": [{"name": "a", "prompt": "x"}],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert cli("models", str(path)) == 0
    assert "backend.kind mock is not asked about models" in capsys.readouterr().out
