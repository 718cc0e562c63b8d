"""``backend.kind: openai``: the exact requests, every answer and error, and whole jobs
against the embedded mock's ``/v1/images`` endpoints."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from aioresponses import aioresponses
from checks import ThreadedMock, run_cli_at_debug, run_spec
from PIL import Image

from pipeline import __version__
from pipeline.backends.openai import OpenAIBackend
from pipeline.errors import FatalError, PermanentError, RateLimitedError, SpecError, TransientError
from pipeline.items import expand_items
from pipeline.jobspec.load import load_spec
from pipeline.manifest.cache import ManifestState
from pipeline.manifest.log import read_lines
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.plan import build_plan
from pipeline.records import InputImage, WorkItem

KEY = "sk-openai-test-4b9e1c7d2a"
BASE = "https://api.openai.test/v1"
GENERATIONS = f"{BASE}/images/generations"
NOW = datetime(2026, 11, 30, 5, 0, 0, tzinfo=timezone.utc)
PNG = b"\x89PNG\r\n\x1a\nfake-bytes"
B64 = base64.b64encode(PNG).decode()
USAGE = {
    "input_tokens": 50,
    "input_tokens_details": {"text_tokens": 50, "image_tokens": 0},
    "output_tokens": 1056,
    "total_tokens": 1106,
}


def png_bytes(color: str = "red") -> bytes:
    """A real 16x16 PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, "PNG")
    return buffer.getvalue()


def make_item(**overrides: Any) -> WorkItem:
    """A prompt-only work item; `overrides` replace its fields."""
    fields: dict[str, Any] = {
        "key": "e" * 64,
        "source": "cats",
        "prompt": "a cat on a sofa",
        "project_url": "",
        "params": {"model": "gpt-image-2", "n": 2, "size": "1024x1024", "quality": "low"},
    }
    fields.update(overrides)
    return WorkItem(**fields)


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[OpenAIBackend]:
    """A real OpenAI client against the fake host that `mock_http` intercepts."""
    async with OpenAIBackend(BASE, KEY, concurrency=2, timeout_s=5, clock=lambda: NOW) as client:
        yield client


# ---- the requests ------------------------------------------------------------------------


async def test_prompt_item_posts_json_to_generations_with_bearer_key(
    backend: OpenAIBackend, mock_http: aioresponses
) -> None:
    """A prompt item is one JSON POST to /images/generations: the spec's params, no project."""
    mock_http.post(GENERATIONS, payload={"created": 1, "data": [{"b64_json": B64}]})
    await backend.generate(make_item(), None)
    [(url, call)] = [(str(u), c) for (verb, u), calls in mock_http.requests.items() for c in calls]
    assert url == GENERATIONS
    assert dict(call.kwargs["headers"]) == {
        "Authorization": f"Bearer {KEY}",
        "User-Agent": "synthaug/" + __version__,
    }
    assert call.kwargs["json"] == {
        "prompt": "a cat on a sofa",
        "model": "gpt-image-2",
        "n": 2,
        "size": "1024x1024",
        "quality": "low",
    }


class Recorder:
    """A loopback server that records each edit's multipart parts and serves an input."""

    def __init__(self) -> None:
        self.parts: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/images/edits", self.edit)
        app.router.add_get("/inputs/street.jpg", self.input)
        return app

    async def input(self, request: web.Request) -> web.Response:
        return web.Response(body=jpeg_bytes(), content_type="image/jpeg")

    async def edit(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        parts: dict[str, Any] = {}
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            assert isinstance(part, type(part))
            data = await part.read()  # type: ignore[union-attr]
            name = part.name  # type: ignore[union-attr]
            filename = part.filename  # type: ignore[union-attr]
            content_type = part.headers.get("Content-Type")  # type: ignore[union-attr]
            parts[str(name)] = (
                (filename, content_type, bytes(data)) if filename else bytes(data).decode()
            )
        self.parts.append(parts)
        return web.json_response({"data": [{"b64_json": B64}], "usage": USAGE})


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buffer, "JPEG")
    return buffer.getvalue()


async def test_file_item_posts_multipart_edit_with_the_files_bytes(tmp_path: Path) -> None:
    """An item with a local file is a multipart edit: fields, then the file as image[]."""
    recorder = Recorder()
    data = png_bytes()
    item = make_item(input=InputImage("file", str(tmp_path / "shelf.png"), "0" * 64))
    async with TestServer(recorder.app(), host="127.0.0.1") as server:
        base = str(server.make_url("/v1"))
        async with OpenAIBackend(base, KEY, concurrency=1, timeout_s=5) as client:
            await client.generate(item, base64.b64encode(data).decode())
    [parts] = recorder.parts
    assert parts == {
        "prompt": "a cat on a sofa",
        "model": "gpt-image-2",
        "n": "2",
        "size": "1024x1024",
        "quality": "low",
        "image[]": ("shelf.png", "image/png", data),
    }
    assert recorder.headers[0]["Authorization"] == f"Bearer {KEY}"


async def test_url_item_is_fetched_then_sent_as_an_edit() -> None:
    """A URL input is downloaded first and its bytes go in the image[] part."""
    recorder = Recorder()
    async with TestServer(recorder.app(), host="127.0.0.1") as server:
        url = str(server.make_url("/inputs/street.jpg"))
        item = make_item(input=InputImage("url", url))
        async with OpenAIBackend(
            str(server.make_url("/v1")), KEY, concurrency=1, timeout_s=5
        ) as client:
            generation = await client.generate(item, url)
    [parts] = recorder.parts
    assert parts["image[]"] == ("street.jpg", "image/jpeg", jpeg_bytes())
    assert generation.response["usage"] == USAGE


# ---- the answers and errors ----------------------------------------------------------------


async def test_b64_answer_gives_images_and_keeps_usage_without_the_data(
    backend: OpenAIBackend, mock_http: aioresponses
) -> None:
    """``data[].b64_json`` is decoded; the kept answer has the usage and elided image data."""
    payload = {"created": 1, "data": [{"b64_json": B64}, {"b64_json": B64}], "usage": USAGE}
    mock_http.post(GENERATIONS, payload=payload)
    generation = await backend.generate(make_item(), None)
    assert [image.data for image in generation.images] == [PNG, PNG]
    assert generation.response["usage"] == USAGE
    assert B64 not in json.dumps(generation.response)


async def test_rate_limit_headers_are_read(backend: OpenAIBackend, mock_http: aioresponses) -> None:
    """OpenAI's x-ratelimit-* headers reach the limiter as a hint."""
    headers = {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "6m0s"}
    mock_http.post(GENERATIONS, payload={"data": [{"b64_json": B64}]}, headers=headers)
    generation = await backend.generate(make_item(), None)
    assert generation.rate_limit is not None
    assert (generation.rate_limit.remaining, generation.rate_limit.reset_s) == (3, 360.0)


def openai_error(message: str, kind: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@pytest.mark.parametrize(
    ("status", "body", "headers", "error_class", "kind"),
    [
        (
            401,
            openai_error("Incorrect API key provided", "invalid_request_error", "invalid_api_key"),
            {},
            FatalError,
            "http_status",
        ),
        (
            403,
            openai_error("Organization must be verified", "invalid_request_error", None),
            {},
            FatalError,
            "http_status",
        ),
        (
            429,
            openai_error(
                "You exceeded your current quota", "insufficient_quota", "insufficient_quota"
            ),
            {},
            FatalError,
            "http_status",
        ),
        (
            429,
            openai_error("Rate limit reached", "requests", "rate_limit_exceeded"),
            {"Retry-After": "7"},
            RateLimitedError,
            "http_status",
        ),
        (
            400,
            openai_error(
                "Your request was rejected by the safety system",
                "image_generation_user_error",
                "moderation_blocked",
            ),
            {},
            PermanentError,
            "refused",
        ),
        (
            400,
            openai_error("rejected", "invalid_request_error", "content_policy_violation"),
            {},
            PermanentError,
            "refused",
        ),
        (
            400,
            openai_error("Invalid size", "invalid_request_error", "invalid_value"),
            {},
            PermanentError,
            "http_status",
        ),
        (
            500,
            openai_error("The server had an error", "server_error", None),
            {},
            TransientError,
            "http_status",
        ),
        (503, openai_error("Slow down", "server_error", None), {}, TransientError, "http_status"),
    ],
    ids=["401", "403", "quota", "429", "moderation", "policy", "400", "500", "503"],
)
async def test_error_answers_are_classified(
    backend: OpenAIBackend,
    mock_http: aioresponses,
    status: int,
    body: dict[str, Any],
    headers: dict[str, str],
    error_class: type[Exception],
    kind: str,
) -> None:
    """Each OpenAI error form maps to what the engine must do: stop, wait, fail or retry."""
    mock_http.post(GENERATIONS, status=status, payload=body, headers=headers)
    with pytest.raises(error_class) as caught:
        await backend.generate(make_item(), None)
    assert type(caught.value) is error_class
    assert caught.value.kind == kind  # type: ignore[attr-defined]
    assert caught.value.item_key == "e" * 64  # type: ignore[attr-defined]
    if error_class is RateLimitedError:
        assert caught.value.retry_after == 7.0  # type: ignore[attr-defined]


async def test_a_key_echoed_in_an_error_is_not_in_the_message(
    backend: OpenAIBackend, mock_http: aioresponses
) -> None:
    """An answer that quotes the key does not put it in the error."""
    body = openai_error(f"Incorrect API key provided: {KEY}", "invalid_request_error", None)
    mock_http.post(GENERATIONS, status=401, payload=body)
    with pytest.raises(FatalError) as caught:
        await backend.generate(make_item(), None)
    assert KEY not in str(caught.value)


# ---- the spec --------------------------------------------------------------------------


def write_spec(folder: Path, backend: dict[str, Any], **extra: Any) -> Path:
    spec: dict[str, Any] = {
        "version": 1,
        "name": "oa",
        "output_dir": "out",
        "backend": {"kind": "openai", **backend},
        "params": {"model": "gpt-image-2", "quality": "low", "size": "1024x1024"},
        "run": {"rate_limit": "1000/s", "backoff_base_s": 0.01, "backoff_max_s": 0.1},
        "sources": [{"name": "cats", "prompt": "a {c} cat", "vars": {"c": ["red", "tabby"]}}],
    }
    spec.update(extra)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_openai_kind_defaults_to_openais_url_and_key_variable(tmp_path: Path) -> None:
    """Without base_url / api_key_env, the openai kind uses api.openai.com and OPENAI_API_KEY."""
    spec = load_spec(write_spec(tmp_path, {}))
    assert spec.backend.base_url == "https://api.openai.com/v1"
    assert spec.backend.api_key_env == "OPENAI_API_KEY"
    assert spec.run.rate_limit is not None  # priced: the safe default pace


def test_openai_item_keys_describe_a_body_without_project(tmp_path: Path) -> None:
    """The openai kind's keys differ from roboflow's for the same prompt (their bodies do)."""
    openai = load_spec(write_spec(tmp_path, {}))
    roboflow = load_spec(write_spec(tmp_path, {"kind": "roboflow"}, project_url="p"))
    assert {i.key for i in expand_items(openai)}.isdisjoint(i.key for i in expand_items(roboflow))


@pytest.mark.parametrize(
    ("source", "key_path"),
    [
        ({"roboflow_ids": ["abc123"]}, "sources[0].roboflow_ids"),
        ({"params": {"unmodified_prompt": True}}, "sources[0].params.unmodified_prompt"),
    ],
)
def test_roboflow_only_inputs_are_spec_errors_for_openai(
    tmp_path: Path, source: dict[str, Any], key_path: str
) -> None:
    """What only Roboflow's endpoint takes is refused before any request (exit 2)."""
    path = write_spec(tmp_path, {}, sources=[{"name": "s", "prompt": "x", **source}])
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert caught.value.key_path == key_path
    assert caught.value.exit_code == 2


# ---- whole jobs on the mock ------------------------------------------------------------------


def openai_job(tmp_path: Path, base_url: str, max_attempts: int = 6) -> Path:
    """Two prompt items and one edit of a local file, against `base_url`/v1."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "shelf.png").write_bytes(png_bytes("green"))
    sources = [
        {"name": "cats", "prompt": "a {c} cat", "vars": {"c": ["red", "tabby"]}},
        {"name": "shelf", "prompt": "the shelf at night", "images": ["in/*.png"]},
    ]
    run = {"rate_limit": "1000/s", "backoff_base_s": 0.01, "backoff_max_s": 0.1}
    return write_spec(
        tmp_path,
        {"base_url": f"{base_url}/v1"},
        sources=sources,
        run={**run, "max_attempts": max_attempts},
    )


async def test_openai_job_on_the_mock_runs_prices_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Generations and an edit end ok, priced from usage; a resume sends nothing."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    async with MockServer(MockConfig(api_key=KEY, max_px=64)) as server:
        path = openai_job(tmp_path, server.base_url)
        result = await run_spec(path)
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        sent = server.stats.requests
        again = await run_spec(path)
        assert server.stats.requests == sent
    out = tmp_path / "out"
    assert result.exit_code == 0, result.summary
    assert server.stats.generations == 3
    assert sent == 3
    lines = [line for line in read_lines(out / "manifest.jsonl") if line["status"] == "ok"]
    assert len(lines) == 3
    assert all(line["response"]["usage"]["output_tokens"] > 0 for line in lines)
    # gpt-image-2: 272 output tokens a low-quality image at $30 per million, and input
    assert summary["cost_usd"] is not None
    assert 3 * 0.00816 < summary["cost_usd"] < 0.03
    assert again.exit_code == 0
    assert again.summary["skipped_ok"] == 3
    assert KEY not in caplog.text
    for file in out.rglob("*"):
        if file.is_file():
            assert KEY.encode() not in file.read_bytes(), file


async def test_wrong_key_on_the_mock_stops_the_run_with_exit_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mock checks the Bearer key: a wrong one is fatal, not retried item by item."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    async with MockServer(MockConfig(api_key=KEY)) as server:
        result = await run_spec(openai_job(tmp_path, server.base_url))
    assert result.exit_code == 3
    assert server.stats.unauthorized >= 1
    assert server.stats.generations == 0


async def test_injected_faults_on_the_openai_endpoints_end_all_ok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mock's fault injection applies to /v1/images too, and the client recovers."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    faults = {"429": 1.0, "500": 1.0, "503": 1.0, "malformed": 1.0, "wrong_shape": 1.0}
    config = MockConfig(error_rate=0.6, faults=faults, seed=2, retry_after_s=0.05, max_px=64)
    async with MockServer(config) as server:
        path = openai_job(tmp_path, server.base_url, max_attempts=30)
        result = await run_spec(path)
    assert result.exit_code == 0, result.summary
    assert sum(server.stats.faults.values()) > 0
    assert server.stats.generations == 3


async def test_mock_refuses_an_edit_without_an_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mock's edits endpoint answers 400 to a form without an image[] part."""
    import aiohttp

    async with MockServer(MockConfig()) as server, aiohttp.ClientSession() as session:
        form = aiohttp.FormData({"prompt": "x", "model": "gpt-image-2"})
        async with session.post(f"{server.base_url}/v1/images/edits", data=form) as answer:
            assert answer.status == 400
            assert re.search("image", (await answer.json())["error"]["message"])


def test_plan_prices_an_openai_job(tmp_path: Path) -> None:
    """``plan`` prices the openai kind from the list prices (priced, unlike the mock)."""
    spec = load_spec(write_spec(tmp_path, {}))
    plan = build_plan(spec, ManifestState())
    [source] = plan.sources
    assert source.price_per_image == 0.006  # gpt-image-2, low, 1024x1024


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(MockConfig(api_key=KEY, max_px=64), id="ok"),
        pytest.param(MockConfig(api_key="another-key"), id="401-abort"),
        pytest.param(MockConfig(api_key=KEY, refuse_word="cat", max_px=64), id="refusal"),
    ],
)
@pytest.mark.slow
def test_key_never_leaks_from_the_cli_at_debug(tmp_path: Path, config: MockConfig) -> None:
    """A CLI run of the openai kind at DEBUG shows the key nowhere: output, logs or OUT."""
    with ThreadedMock(config) as mock:
        path = openai_job(tmp_path, mock.base_url, max_attempts=2)
        proc = run_cli_at_debug(path, {"OPENAI_API_KEY": KEY})
    assert proc.returncode in (0, 1, 3), proc.stderr.decode()[-2000:]
    assert KEY.encode() not in proc.stdout + proc.stderr
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert KEY.encode() not in file.read_bytes(), file
