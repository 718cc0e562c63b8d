"""The `upload:` block: every stored image goes to a Roboflow project once, its id on record.

The client's exact request and every answer form are checked with aioresponses; whole
runs go against the mock API on 127.0.0.1 (in-process, or as a subprocess that a killed
run cannot take down with it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aioresponses import aioresponses
from checks import (
    ThreadedMock,
    assert_outputs_valid,
    mock_server_process,
    run_cli_at_debug,
    run_spec,
    start_run,
    stats,
    wait_until,
    write_job_spec,
)

from pipeline import __version__
from pipeline.backends.roboflow_upload import FORM_CONTENT_TYPE, RoboflowUploadClient
from pipeline.errors import (
    CredentialsError,
    FatalError,
    PermanentError,
    RateLimitedError,
    SpecError,
    TransientError,
)
from pipeline.jobspec.load import load_spec
from pipeline.manifest import log as manifest_log
from pipeline.manifest.log import load_state, read_latest, read_records
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.records import ImageUpload, ItemRecord
from pipeline.run.job import run_job
from pipeline.stages.upload import MAX_TAG_CHARS, provenance_tags

KEY = "sk-upload-UNIQUE-93c1e7a4"
BASE = "https://api.roboflow.test"
ENDPOINT = re.compile(r"^https://api\.roboflow\.test/dataset/leaves/upload\?.*$")
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


# ---- the client: exact request, every answer -------------------------------------------


@pytest_asyncio.fixture
async def client() -> AsyncIterator[RoboflowUploadClient]:
    async with RoboflowUploadClient(
        BASE + "/", KEY, project="leaves", concurrency=2, timeout_s=5
    ) as uploader:
        yield uploader


def sent(mock_http: aioresponses) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, URL, aiohttp kwargs) of every intercepted request."""
    return [
        (verb, str(url), call.kwargs)
        for (verb, url), calls in mock_http.requests.items()
        for call in calls
    ]


IMAGE = ImageUpload(
    name="3f2a9c1d2e4b5a69-0.png",
    data=PNG,
    split="valid",
    batch="nightly 2026-11-30",
    tags=("synthaug", "job-leaves", "var-season-late-fall"),
)


async def test_upload_sends_the_documented_request(
    client: RoboflowUploadClient, mock_http: aioresponses
) -> None:
    """POST /dataset/{project}/upload, key/name/split/batch/tag (repeated) in the query,
    the image's base64 as a form-urlencoded body."""
    mock_http.post(ENDPOINT, payload={"success": True, "id": "abcDEF123"})
    answer = await client.upload(IMAGE)
    assert (answer.id, answer.duplicate) == ("abcDEF123", False)
    [(method, url, kwargs)] = sent(mock_http)
    parts = urlsplit(url)
    assert method == "POST"
    assert (parts.scheme, parts.netloc, parts.path) == (
        "https",
        "api.roboflow.test",
        "/dataset/leaves/upload",
    )
    query = parse_qs(parts.query)
    assert query == {
        "api_key": [KEY],
        "name": ["3f2a9c1d2e4b5a69-0.png"],
        "split": ["valid"],
        "batch": ["nightly 2026-11-30"],
        "tag": sorted(IMAGE.tags),  # aioresponses sorts the query it records
    }
    assert kwargs["data"] == base64.b64encode(PNG)
    assert dict(kwargs["headers"]) == {
        "Content-Type": FORM_CONTENT_TYPE,
        "User-Agent": "synthaug/" + __version__,
    }  # the key only in the query: no header carries it


async def test_optional_labels_are_left_out(
    client: RoboflowUploadClient, mock_http: aioresponses
) -> None:
    """No split, batch or tags in the spec: the query carries only the key and the name."""
    mock_http.post(ENDPOINT, payload={"success": True, "id": "x1"})
    await client.upload(ImageUpload(name="a-0.png", data=PNG))
    [(_method, url, _kwargs)] = sent(mock_http)
    assert set(parse_qs(urlsplit(url).query)) == {"api_key", "name"}


async def test_duplicate_answer_is_success(
    client: RoboflowUploadClient, mock_http: aioresponses
) -> None:
    """Roboflow's duplicate answer (a retry of an upload that had succeeded) is success."""
    mock_http.post(ENDPOINT, payload={"duplicate": True, "id": "abcDEF123"})
    answer = await client.upload(IMAGE)
    assert (answer.id, answer.duplicate) == ("abcDEF123", True)


@pytest.mark.parametrize(
    ("status", "body", "headers", "error", "words"),
    [
        pytest.param(
            200,
            '{"success": false, "message": "no"}',
            {},
            TransientError,
            "without success",
            id="200-no-success",
        ),
        pytest.param(
            200, '{"success": tr', {}, TransientError, "without success", id="200-malformed"
        ),
        pytest.param(
            500, '{"error": {"message": "boom"}}', {}, TransientError, "HTTP 500", id="500"
        ),
        pytest.param(
            502,
            '{"error": {"message": "bad gateway"}, "retryable": true}',
            {},
            TransientError,
            "HTTP 502",
            id="502-retryable",
        ),
        pytest.param(503, "", {}, TransientError, "HTTP 503", id="503-empty"),
        pytest.param(
            400,
            '{"error": {"message": "Invalid image"}}',
            {},
            PermanentError,
            "Invalid image",
            id="400",
        ),
        pytest.param(
            401,
            '{"error": {"message": "Unauthorized"}}',
            {},
            FatalError,
            "upload.api_key_env",
            id="401",
        ),
        pytest.param(403, '{"error": "forbidden"}', {}, FatalError, "upload.api_key_env", id="403"),
        pytest.param(
            404,
            '{"error": {"message": "Not found"}}',
            {},
            FatalError,
            "upload.project",
            id="404-unknown-project",
        ),
    ],
)
async def test_error_answers_are_classified(
    client: RoboflowUploadClient,
    mock_http: aioresponses,
    status: int,
    body: str,
    headers: dict[str, str],
    error: type[Exception],
    words: str,
) -> None:
    """Each answer form raises the error class that tells the uploader what to do."""
    mock_http.post(ENDPOINT, status=status, body=body, headers=headers)
    with pytest.raises(error, match=re.escape(words)) as info:
        await client.upload(IMAGE)
    assert type(info.value) is error


async def test_429_carries_retry_after(
    client: RoboflowUploadClient, mock_http: aioresponses
) -> None:
    """A 429's Retry-After reaches the limiter's pause."""
    mock_http.post(ENDPOINT, status=429, body="slow down", headers={"Retry-After": "7"})
    with pytest.raises(RateLimitedError) as info:
        await client.upload(IMAGE)
    assert info.value.retry_after == 7.0


async def test_timeout_is_transient(client: RoboflowUploadClient, mock_http: aioresponses) -> None:
    """A timeout may have stored the image: retried (the retry is answered duplicate)."""
    mock_http.post(ENDPOINT, exception=asyncio.TimeoutError())
    with pytest.raises(TransientError, match="no answer"):
        await client.upload(IMAGE)


@pytest.mark.parametrize("status", [400, 401, 500])
async def test_key_echoed_by_the_server_never_reaches_the_error(
    client: RoboflowUploadClient, mock_http: aioresponses, status: int
) -> None:
    """An answer that echoes the key (in a URL or bare) is scrubbed from the message."""
    body = json.dumps({"error": f"bad request to /upload?api_key={KEY} with key {KEY}"})
    mock_http.post(ENDPOINT, status=status, body=body)
    with pytest.raises(Exception) as info:  # noqa: PT011  (every class is checked above)
        await client.upload(IMAGE)
    assert KEY not in str(info.value)
    assert KEY not in repr(info.value.args)


def test_provenance_tags_are_sanitized() -> None:
    """Job, source, each variable and the key become tags of a safe alphabet and length."""
    record = ItemRecord(
        key="3f2a9c1d2e4b5a69" + "0" * 48,
        status="ok",
        source="maple-grid",
        vars={"season": "late fall", "light": "dawn/dusk ✓", "long": "x" * 200},
        repeat=0,
        input=None,
        prompt="p",
        params={},
    )
    tags = provenance_tags("fall-leaves", record, ("aug-2026-11-30",))
    assert tags[:5] == (
        "synthaug",
        "job-fall-leaves",
        "source-maple-grid",
        "var-season-late-fall",
        "var-light-dawn-dusk",
    )
    assert tags[-2:] == ("key-3f2a9c1d2e4b5a69", "aug-2026-11-30")
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", t) and len(t) <= MAX_TAG_CHARS for t in tags)


# ---- spec and key ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upload", "key_path", "words"),
    [
        pytest.param("  projekt: leaves\n", "upload.projekt", "unknown key", id="unknown-key"),
        pytest.param(
            "  project: leaves\n  split: validation\n",
            "upload.split",
            "'train', 'valid' or 'test'",
            id="bad-split",
        ),
        pytest.param(
            "  project: leaves\n  batch: 'night {day}'\n",
            "upload.batch",
            "only {date}",
            id="bad-placeholder",
        ),
        pytest.param(
            "  project: leaves\n  tags: ['late fall']\n",
            "upload.tags[0]",
            "is not a tag",
            id="bad-tag",
        ),
        pytest.param(
            "  project: leaves\n  base_url: http://uploads.example.com\n",
            "upload.base_url",
            "plain http",
            id="plain-http",
        ),
        pytest.param("  split: train\n", "upload.project", "required", id="no-project"),
        pytest.param(
            "  project: leaves\n  concurrency: 0\n",
            "upload.concurrency",
            "must be at least 1",
            id="concurrency-0",
        ),
    ],
)
def test_bad_upload_block_is_a_spec_error(
    spec_factory: Callable[..., Path], upload: str, key_path: str, words: str
) -> None:
    """A mistake in `upload:` is one SpecError naming file, key path and line."""
    text = (
        "version: 1\nname: job\nbackend: {kind: mock}\n"
        "sources:\n  - {name: cats, prompt: a cat}\nupload:\n" + upload
    )
    spec_factory(text)
    with pytest.raises(SpecError) as info:
        load_spec("spec.yaml")
    assert info.value.key_path == key_path
    assert info.value.line is not None
    assert info.value.line >= 6
    assert words in str(info.value)


async def test_missing_upload_key_fails_before_anything_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload to Roboflow without its key variable: CredentialsError naming it, and
    not one request (no generation either)."""
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)  # the generation's key is there
    async with MockServer(MockConfig()) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=2)
        add_upload(path, base_url=server.base_url, api_key_env="UPLOAD_KEY")
        with pytest.raises(CredentialsError, match="UPLOAD_KEY is not set"):
            await run_spec(path)
    assert server.stats.requests == 0
    assert server.stats.upload_requests == 0


# ---- whole runs against the mock ---------------------------------------------------------


def add_upload(path: Path, **upload: Any) -> None:
    """Add an `upload:` block (project `leaves` unless given) to the spec at `path`."""
    spec = yaml.safe_load(path.read_text())
    spec["upload"] = {"project": "leaves", **upload}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def outputs(out: Path) -> list[dict[str, Any]]:
    return [
        output
        for record in read_latest(out / "manifest.jsonl").values()
        if record["status"] == "ok"
        for output in record["outputs"]
    ]


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)


@pytest.mark.usefixtures("keyed")
async def test_every_image_is_uploaded_once_and_its_id_recorded(tmp_path: Path) -> None:
    """Each stored image is in the project under its file name, with provenance tags,
    split and dated batch; the manifest names its id; a second run uploads nothing."""
    async with MockServer(MockConfig(api_key=KEY)) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=5, n=2)
        add_upload(path, base_url=server.base_url, split="test", batch="night {date}", tags=["aug"])
        result = await run_spec(path)
        out = path.parent / "out"
        images = {img.name: img for img in server.dataset.images("leaves") if not img.seeded}
        again = await run_spec(path)
    assert result.exit_code == 0, result.summary
    assert result.summary["upload"]["uploaded"] == 10
    assert set(server.stats.uploads_by_name.values()) == {1}
    recorded = outputs(out)
    assert len(recorded) == 10
    for output in recorded:
        name = Path(output["path"]).name
        assert output["upload"] == {"id": images[name].id, "project": "leaves", "duplicate": False}
        image = images[name]
        assert image.split == "test"
        assert re.fullmatch(r"night \d{4}-\d{2}-\d{2}", image.batch or "")
        assert image.tags[:3] == ["synthaug", "job-e2e", "source-e2e"]
        assert image.tags[-2:] == [f"key-{name[:16]}", "aug"]
    assert again.summary["upload"]["uploaded"] == 0
    assert server.stats.upload_requests == 10
    assert_outputs_valid(out)
    assert len(load_state(out / "manifest.jsonl").finished) == 5


@pytest.mark.usefixtures("keyed")
async def test_an_upload_jobs_lines_stay_on_the_resume_fast_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold resume (no state cache) of an upload job reads no line in full: every ok
    line, with its uploads, is one the quick reading understands."""
    async with MockServer(MockConfig(api_key=KEY)) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=6, n=2)
        add_upload(path, base_url=server.base_url)
        result = await run_spec(path)
    assert result.summary["upload"]["uploaded"] == 12
    manifest = path.parent / "out" / "manifest.jsonl"
    assert sum('"upload":{"id"' in line for line in manifest.read_text().splitlines()) == 6
    for cache in manifest.parent.glob(".manifest.jsonl.state*"):
        cache.unlink()
    full_parses: list[bytes] = []
    parse = manifest_log._parse_line
    monkeypatch.setattr(
        manifest_log, "_parse_line", lambda raw: full_parses.append(raw) or parse(raw)
    )
    state = load_state(manifest)
    assert len(state.finished) == 6
    assert [raw for raw in full_parses if b'"status":"ok"' in raw] == []


async def test_mock_backend_uploads_to_its_embedded_server_without_a_key(
    spec_factory: Callable[..., Path],
) -> None:
    """backend.kind mock: the upload goes to the embedded mock; no key is needed."""
    path = spec_factory(
        sources=[{"name": "cats", "prompt": "a {black|white} cat"}],
        upload={"project": "cats"},
    )
    result = await run_job(load_spec(path), spec_path=path)
    assert result.exit_code == 0, result.summary
    assert result.summary["upload"]["uploaded"] == 2
    ids = [o["upload"]["id"] for o in outputs(path.parent / "runs" / "job")]
    assert len(ids) == 2
    assert all(ids)


@pytest.mark.usefixtures("keyed")
async def test_upload_faults_are_retried_and_nothing_is_stored_twice(tmp_path: Path) -> None:
    """5xx, 502 retryable, 429, malformed and wrong-shaped answers and dropped
    connections: every image ends uploaded; a drop (stored, answer lost) is answered
    duplicate on retry, never stored twice; no start during an announced 429 pause."""
    faults = {"500": 1, "502": 1, "503": 1, "429": 1, "malformed": 1, "wrong_shape": 1, "drop": 1}
    config = MockConfig(error_rate=0.35, faults=faults, seed=11, retry_after_s=0.05)
    async with MockServer(config) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=10, max_attempts=12)
        add_upload(path, base_url=server.base_url, max_attempts=12, concurrency=3)
        result = await run_spec(path)
    assert result.exit_code == 0, result.summary
    summary = result.summary["upload"]
    assert summary["uploaded"] + summary["duplicates"] == 10
    assert summary["retries"] > 0
    assert set(server.stats.uploads_by_name.values()) == {1}
    assert server.stats.upload_duplicates <= server.stats.faults.get("drop", 0)
    assert all(o["upload"]["id"] for o in outputs(path.parent / "out"))


@pytest.mark.usefixtures("keyed")
async def test_unknown_project_aborts_the_run(tmp_path: Path) -> None:
    """A 404 from the upload endpoint stops the whole run: exit 3, a message naming
    upload.project; images stay stored, their uploads pending for the next run."""
    async with MockServer(MockConfig(projects=frozenset({"e2e"}))) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=3)
        add_upload(path, base_url=server.base_url)
        result = await run_spec(path)
    assert result.exit_code == 3
    assert "upload.project" in (result.message or "")
    out = path.parent / "out"
    records = read_records(out / "manifest.jsonl").values()
    assert any(o.upload is None for record in records for o in record.outputs)
    assert not any("upload" in o for o in outputs(out))


@pytest.mark.usefixtures("keyed")
async def test_a_refused_upload_is_recorded_exits_1_and_is_retried_next_run(
    tmp_path: Path, mock_http: aioresponses
) -> None:
    """A 4xx fails that image's upload (recorded on its output, exit 1) without making it
    again; the next run uploads it and exits 0."""
    async with MockServer(MockConfig()) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=2)
        add_upload(path, base_url=BASE)
        mock_http.post(
            ENDPOINT, status=400, payload={"error": {"message": "Invalid image"}}, repeat=True
        )
        first = await run_spec(path)
        out = path.parent / "out"
        failed = outputs(out)
        mock_http.clear()
        mock_http.post(ENDPOINT, payload={"success": True, "id": "rf-1"}, repeat=True)
        second = await run_spec(path)
    assert first.exit_code == 1
    assert first.summary["upload"]["failed"] == 2
    assert all(o["upload"]["error"]["status"] == 400 for o in failed)
    assert second.exit_code == 0
    assert second.summary["upload"]["uploaded"] == 2
    assert server.stats.generations == 2  # an upload problem never regenerates
    assert {o["upload"]["id"] for o in outputs(out)} == {"rf-1"}


@pytest.mark.slow
def test_key_never_appears_in_logs_or_out(tmp_path: Path) -> None:
    """A DEBUG run whose uploads meet faults shows the key nowhere: stdout, stderr, OUT."""
    config = MockConfig(
        api_key=KEY, error_rate=0.3, faults={"500": 1, "429": 1, "drop": 1}, retry_after_s=0.05
    )
    with ThreadedMock(config) as mock:
        path = write_job_spec(tmp_path, mock.base_url, prompts=4)
        add_upload(path, base_url=mock.base_url)
        proc = run_cli_at_debug(path, {"ROBOFLOW_API_KEY": KEY})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b"dataset/leaves/upload" in proc.stderr  # the uploads were logged
    assert KEY.encode() not in proc.stdout + proc.stderr
    for file in (tmp_path / "out").rglob("*"):
        assert KEY not in file.name
        if file.is_file():
            assert KEY.encode() not in file.read_bytes(), file


# ---- killed and resumed ----------------------------------------------------------------


@pytest.fixture
def mock_api(tmp_path: Path) -> Iterator[str]:
    """`synthaug mock-server` in a subprocess (its counters outlive a killed run)."""
    with mock_server_process(tmp_path, "--latency", "0.15") as base:
        yield base


def crash_spec(tmp_path: Path, base: str) -> Path:
    path = write_job_spec(
        tmp_path,
        base,
        name="crash",
        prompts=12,
        size="64x64",
        timeout_s=10,
        max_attempts=6,
        rate_limit="100/s",
    )
    add_upload(path, base_url=base, concurrency=2)
    return path


def uploaded_images(out: Path) -> int:
    manifest = out / "manifest.jsonl"
    return manifest.read_bytes().count(b'"upload":{"id"') if manifest.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_killed_upload_job_resumes_without_uploading_twice(
    tmp_path: Path, mock_api: str, sig: int
) -> None:
    """A run killed while it uploads (SIGKILL: no checkpoint; SIGTERM: a clean stop,
    exit 143), then resumed: every image ends in the project with its id recorded, no
    image was stored twice, and the resume re-sent at most the uploads whose answer
    the kill cut off (answered duplicate)."""
    path = crash_spec(tmp_path, mock_api)
    out = path.parent / "out"
    run = start_run(path, {"ROBOFLOW_API_KEY": KEY})
    wait_until(
        lambda: uploaded_images(out) >= 2 or run.poll() is not None, what="the first uploads"
    )
    assert run.poll() is None, "the run ended before it could be killed"
    run.send_signal(sig)
    code = run.wait(timeout=120)
    err = (path.parent / "run.err").read_text()
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 143), err[-2000:]
    killed_at = stats(mock_api)
    assert 0 < killed_at["uploads"] < 12
    resumed = start_run(path, {"ROBOFLOW_API_KEY": KEY})
    assert resumed.wait(timeout=120) == 0, (path.parent / "run.err").read_text()[-2000:]
    after = stats(mock_api)
    assert after["uploads"] == 12  # every image stored once
    assert after["upload_duplicates"] <= 2  # only the uploads in flight at the kill
    recorded = outputs(out)
    assert len(recorded) == 12
    assert all(o["upload"]["project"] == "leaves" and o["upload"]["id"] for o in recorded)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["upload"]["failed"] == 0
    assert_outputs_valid(out)


@pytest.mark.slow
def test_cli_reports_upload_counts(tmp_path: Path) -> None:
    """`synthaug run` on a mock job with upload: exit 0, summary.json has the counts."""
    path = tmp_path / "spec.yaml"
    path.write_text(
        "version: 1\nname: cli\nbackend: {kind: mock}\n"
        "sources:\n  - {name: cats, prompt: 'a {black|white} cat'}\n"
        "upload: {project: cats, batch: 'nightly {date}'}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(path), "--no-progress", "--no-grid"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    summary = json.loads((tmp_path / "runs" / "cli" / "summary.json").read_text())
    assert summary["upload"]["uploaded"] == 2


# ---- the mock's upload endpoint ------------------------------------------------------------


async def post_upload(base: str, project: str, body: bytes, **query: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/dataset/{project}/upload", params=query, data=body) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize(
    ("body", "query", "status", "words"),
    [
        pytest.param(
            base64.b64encode(PNG),
            {"api_key": "wrong", "name": "a.png"},
            401,
            "api_key",
            id="wrong-key",
        ),
        pytest.param(base64.b64encode(PNG), {"api_key": KEY}, 400, "name", id="no-name"),
        pytest.param(b"", {"api_key": KEY, "name": "a.png"}, 400, "base64", id="empty-body"),
        pytest.param(
            b"not base64!", {"api_key": KEY, "name": "a.png"}, 400, "base64", id="not-base64"
        ),
        pytest.param(
            base64.b64encode(b"hello"),
            {"api_key": KEY, "name": "a.png"},
            400,
            "not an image",
            id="not-an-image",
        ),
        pytest.param(
            base64.b64encode(PNG),
            {"api_key": KEY, "name": "a.png", "split": "dev"},
            400,
            "split",
            id="bad-split",
        ),
    ],
)
async def test_mock_refuses_what_roboflow_would(
    body: bytes, query: dict[str, str], status: int, words: str
) -> None:
    """The mock's upload endpoint answers a bad request as the real one would, storing nothing."""
    async with MockServer(MockConfig(api_key=KEY)) as server:
        got, payload = await post_upload(server.base_url, "leaves", body, **query)
        assert server.stats.uploads == 0
    assert got == status
    assert words in json.dumps(payload)


async def test_mock_answers_success_then_duplicate_and_knows_projects() -> None:
    """First upload of a name: success with an id; the same name again: duplicate, same
    id; a project the mock does not know: 404."""
    async with MockServer(MockConfig(projects=frozenset({"leaves"}))) as server:
        body = base64.b64encode(PNG)
        first = await post_upload(server.base_url, "leaves", body, name="a.png", tag="x")
        again = await post_upload(server.base_url, "leaves", body, name="a.png")
        unknown = await post_upload(server.base_url, "oaks", body, name="a.png")
        [image] = [img for img in server.dataset.images("leaves") if img.name == "a.png"]
        assert (server.stats.uploads, server.stats.upload_duplicates) == (1, 1)
    assert first == (200, {"success": True, "id": image.id})
    assert again == (200, {"duplicate": True, "id": image.id})
    assert unknown[0] == 404
    assert image.tags == ["x"]
