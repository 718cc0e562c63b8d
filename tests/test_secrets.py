"""The API key never leaks: not to stdout, stderr, logs at DEBUG, tracebacks or OUT."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from checks import ThreadedMock, assert_outputs_valid, run_cli_at_debug, run_spec, write_job_spec

from pipeline.backends.roboflow import LARGE_ANSWER_BYTES, RoboflowBackend
from pipeline.errors import BackendError
from pipeline.manifest.log import read_latest
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.records import WorkItem

SECRET = "sk-SECRET-e2b7c9d14f6a-do-not-leak"
# A key made of base64 letters, 4 of them at a time: it can occur inside image data.
B64_KEY = "Zm9vYmFyS2V5MTIz"


def run_cli(tmp_path: Path, base_url: str, **run: object) -> subprocess.CompletedProcess[bytes]:
    path = write_job_spec(
        tmp_path,
        base_url,
        name="secrets",
        prompts=4,
        size="64x64",
        timeout_s=1,
        concurrency=2,
        max_attempts=3,
        rate_limit="100/s",
        **run,
    )
    return run_cli_at_debug(path, {"ROBOFLOW_API_KEY": SECRET})


def assert_no_secret(tmp_path: Path, proc: subprocess.CompletedProcess[bytes]) -> None:
    needle = SECRET.encode()
    assert needle not in proc.stdout
    assert needle not in proc.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path
        assert SECRET not in path.name


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(MockConfig(api_key="another-key"), id="401-abort"),
        pytest.param(MockConfig(error_rate=0.6, seed=1, slow_s=2.0), id="every-fault"),
        pytest.param(MockConfig(projects=frozenset({"nope"})), id="404-project"),
        pytest.param(MockConfig(refuse_word="item"), id="refusal"),
    ],
)
@pytest.mark.slow
def test_key_never_leaks_when_runs_fail(tmp_path: Path, config: MockConfig) -> None:
    """Whatever way a run fails, with DEBUG logging, the key appears nowhere."""
    with ThreadedMock(config) as mock:
        proc = run_cli(tmp_path, mock.base_url)
    assert proc.returncode in (0, 1, 3), proc.stderr.decode()[-2000:]
    assert_no_secret(tmp_path, proc)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(MockConfig(api_key=SECRET), id="ok"),
        pytest.param(
            MockConfig(api_key=SECRET, error_rate=0.5, seed=3, slow_s=0.2), id="every-fault"
        ),
        pytest.param(MockConfig(api_key="another-key"), id="401-abort"),
    ],
)
@pytest.mark.slow
def test_key_never_leaks_from_the_stages_or_a_balance_source(
    tmp_path: Path, config: MockConfig
) -> None:
    """A balance source (counts read), labels, uploads, annotations and the read-back, all
    keyed in the query string, at DEBUG: the key appears nowhere, whatever the answers."""
    with ThreadedMock(config) as mock:
        path = write_job_spec(tmp_path, mock.base_url, name="secrets", size="64x64")
        spec = yaml.safe_load(path.read_text())
        spec["sources"] = [
            {
                "name": "rare",
                "roboflow_balance": {
                    "workspace": "ws",
                    "project": "secrets",
                    "target": 4,
                    "base_url": mock.base_url,
                },
                "prompt": "a {class} on a table",
            }
        ]
        fast = {"rate_limit": "100/s", "max_attempts": 8}
        spec["label"] = {"model": "secrets/1", "api_url": mock.base_url, **fast}
        spec["upload"] = {
            "project": "secrets",
            "base_url": mock.base_url,
            "workspace": "ws",
            **fast,
        }
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        proc = run_cli_at_debug(path, {"ROBOFLOW_API_KEY": SECRET})
    assert proc.returncode in (0, 1, 3), proc.stderr.decode()[-2000:]
    if config.api_key == SECRET and not config.error_rate:  # every stage did its work
        assert proc.returncode == 0
        assert b'"annotated":true' in (tmp_path / "out" / "manifest.jsonl").read_bytes()
    assert_no_secret(tmp_path, proc)


@pytest.mark.slow
def test_key_never_leaks_on_connection_refused(tmp_path: Path) -> None:
    """A dead endpoint (connection refused) is reported without the key."""
    proc = run_cli(tmp_path, "http://127.0.0.1:9", max_consecutive_failures=2)
    assert proc.returncode in (1, 3)
    assert_no_secret(tmp_path, proc)


async def test_a_one_character_key_runs_a_base64_job_to_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the key "A" (which occurs in every base64 image) every item ends ok, intact."""
    monkeypatch.setenv("ROBOFLOW_API_KEY", "A")
    config = MockConfig(api_key="A", response_shape="b64_json")
    async with MockServer(config) as server:
        spec = write_job_spec(tmp_path, server.base_url, prompts=6, n=2, size="48x48")
        result = await run_spec(spec)
    assert result.exit_code == 0
    records = read_latest(tmp_path / "out" / "manifest.jsonl").values()
    assert [r["status"] for r in records] == ["ok"] * 6
    assert_outputs_valid(tmp_path / "out")
    first = tmp_path / "out" / next(iter(records))["outputs"][0]["path"]
    assert "A" in base64.b64encode(first.read_bytes()).decode()


async def _answer_once(status: int, body: str) -> tuple[TestServer, RoboflowBackend]:
    """A loopback server answering every POST with `body`, and a backend keyed B64_KEY."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/synthetic-image", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    base = str(server.make_url("/"))
    return server, RoboflowBackend(base, B64_KEY, concurrency=1, timeout_s=5)


def _item() -> WorkItem:
    return WorkItem(key="ab" * 32, source="s", prompt="a cat", project_url="p", params={})


@pytest.mark.parametrize(
    "repeats",
    [pytest.param(3, id="small-answer"), pytest.param(LARGE_ANSWER_BYTES // 8, id="large-answer")],
)
async def test_key_inside_image_data_is_kept_but_never_stored(repeats: int) -> None:
    """Image bytes that contain the key decode intact; echoes of the key are scrubbed."""
    encoded = B64_KEY * repeats
    answer = {
        "data": [{"b64_json": encoded, "id": "img-1", "revised_prompt": f"for {B64_KEY}"}],
        "note": f"api_key={B64_KEY}",
        B64_KEY: "an echo in a field name",
    }
    server, backend = await _answer_once(200, json.dumps(answer))
    async with server, backend:
        generation = await backend.generate(_item(), None)
        data = await backend.download(generation.images[0])
    assert data == base64.b64decode(encoded)
    kept = json.dumps(generation.response)
    assert B64_KEY not in kept
    assert "for ***" in kept


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(200, f'{{"echo": "{B64_KEY}", "data": [', id="invalid-json"),
        pytest.param(500, f"upstream said: bad key {B64_KEY}", id="server-error"),
        pytest.param(200, f'{{"status": "queued for {B64_KEY}"}}', id="no-images"),
    ],
)
async def test_key_echoed_in_a_failed_answer_is_not_in_the_error(status: int, body: str) -> None:
    """An answer that echoes the key yields an error message without it."""
    server, backend = await _answer_once(status, body)
    async with server, backend:
        with pytest.raises(BackendError) as caught:
            await backend.generate(_item(), None)
    assert B64_KEY not in str(caught.value)
    assert "***" in str(caught.value)
