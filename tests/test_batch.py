"""``backend.mode: batch``: OpenAI's Batch API — the exact requests, every result form,
and whole jobs on the mock: waited for, killed while waiting and resumed, submitted with
``--no-wait`` and collected later, expired, priced at half."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from checks import ThreadedMock, mock_server_process, stats, wait_until
from PIL import Image

from pipeline import api
from pipeline.backends.openai_batch import BatchBackend, BatchOptions, BatchProgress
from pipeline.errors import Deferred, FatalError, PermanentError, TransientError
from pipeline.manifest.log import read_lines
from pipeline.mockapi.server import MockConfig
from pipeline.pricing import cost_from_usage
from pipeline.records import BatchRef, WorkItem
from pipeline.retry import RetryPolicy

KEY = "sk-batch-test-7c1e9a2f4b"
USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
    "output_tokens": 272,
    "total_tokens": 284,
}


def png_b64(color: str = "red") -> str:
    """A real 16x16 PNG, base64."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def make_item(index: int, **overrides: Any) -> WorkItem:
    fields: dict[str, Any] = {
        "key": f"{index:064x}",
        "source": "leaves",
        "prompt": f"leaf number {index}",
        "project_url": "",
        "params": {"model": "gpt-image-2", "quality": "low", "size": "1024x1024"},
    }
    fields.update(overrides)
    return WorkItem(**fields)


def ok_line(key: str, color: str = "red") -> dict[str, Any]:
    body = {"created": 1, "data": [{"b64_json": png_b64(color)}], "usage": USAGE}
    return {
        "id": f"batch_req_{key[:8]}",
        "custom_id": key,
        "response": {"status_code": 200, "request_id": "req_1", "body": body},
        "error": None,
    }


def error_line(key: str, status: int, code: str, message: str) -> dict[str, Any]:
    body = {"error": {"message": message, "type": code, "code": code, "param": None}}
    return {
        "id": f"batch_req_{key[:8]}",
        "custom_id": key,
        "response": {"status_code": status, "request_id": "req_2", "body": body},
        "error": None,
    }


def expired_line(key: str) -> dict[str, Any]:
    error = {"code": "batch_expired", "message": "This request could not be executed in time."}
    return {"id": f"batch_req_{key[:8]}", "custom_id": key, "response": None, "error": error}


@dataclass
class FakeOpenAI:
    """A loopback stand-in for OpenAI's Files and Batch API that records every request
    exactly and answers what the test tells it to."""

    outputs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    status: str = "completed"
    batch_errors: list[dict[str, Any]] | None = None
    polls_before_done: int = 1
    requests: list[dict[str, Any]] = field(default_factory=list)
    drop_creates: int = 0  # this many first creates are made, then the socket is closed
    listed: list[dict[str, Any]] = field(default_factory=list)
    creates: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/files", self.upload)
        app.router.add_post("/v1/batches", self.create)
        app.router.add_get("/v1/batches", self.list_batches)
        app.router.add_get("/v1/batches/{batch_id}", self.get)
        app.router.add_get("/v1/files/{file_id}/content", self.content)
        return app

    def _seen(self, request: web.Request, **extra: Any) -> None:
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                **extra,
            }
        )

    async def upload(self, request: web.Request) -> web.Response:
        parts: dict[str, Any] = {}
        reader = await request.multipart()
        async for part in reader:
            assert not isinstance(part, type(reader)), "nested multipart"
            parts[part.name or ""] = {
                "filename": part.filename,
                "content_type": part.headers.get("Content-Type"),
                "data": await part.read(),
            }
        self._seen(request, parts=parts)
        return web.json_response({"id": "file-in1", "object": "file", "purpose": "batch"})

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._seen(request, json=body)
        self.creates += 1
        if self.creates <= self.drop_creates and request.transport is not None:
            request.transport.close()  # made, but the client never hears of it
        return web.json_response({"id": "batch_1", "status": "validating", **body})

    async def list_batches(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.json_response({"object": "list", "data": self.listed, "has_more": False})

    async def get(self, request: web.Request) -> web.Response:
        self._seen(request)
        polls = sum(1 for r in self.requests if r["path"] == request.path)
        done = polls > self.polls_before_done
        batch = {
            "id": request.match_info["batch_id"],
            "status": self.status if done else "in_progress",
            "output_file_id": "file-out1" if done else None,
            "error_file_id": "file-err1" if done else None,
            "errors": {"object": "list", "data": self.batch_errors} if self.batch_errors else None,
            "request_counts": {"total": 2, "completed": 1 if done else 0, "failed": 0},
        }
        return web.json_response(batch)

    async def content(self, request: web.Request) -> web.Response:
        self._seen(request)
        lines = self.outputs if request.match_info["file_id"] == "file-out1" else self.errors
        text = "".join(json.dumps(line) + "\n" for line in lines)
        return web.Response(body=text.encode(), content_type="application/octet-stream")


@dataclass
class Harness:
    fake: FakeOpenAI
    backend: BatchBackend
    recorded: list[tuple[list[str], BatchRef]]
    progress: list[BatchProgress]


@pytest_asyncio.fixture
async def harness() -> AsyncIterator[Callable[..., Any]]:
    """Builds a `BatchBackend` against a `FakeOpenAI` on loopback."""
    opened: list[tuple[TestServer, BatchBackend]] = []

    async def build(fake: FakeOpenAI, *, wait: bool = True, **options: Any) -> Harness:
        server = TestServer(fake.app(), host="127.0.0.1")
        await server.start_server()
        progress: list[BatchProgress] = []
        settings = BatchOptions(
            job="night",
            wait=wait,
            poll_interval_s=0.01,
            poll_max_s=0.02,
            gather_s=0.05,
            retry=RetryPolicy(base_s=0.01, cap_s=0.02),
            on_progress=progress.append,
            **options,
        )
        base = str(server.make_url("/v1"))
        backend = BatchBackend(base, KEY, concurrency=2, timeout_s=5, batch=settings)
        recorded: list[tuple[list[str], BatchRef]] = []
        backend.bind_manifest({}, lambda items, ref: recorded.append(([i.key for i in items], ref)))
        opened.append((server, backend))
        return Harness(fake, backend, recorded, progress)

    yield build
    for server, backend in opened:
        await backend.aclose()
        await server.close()


async def generate_all(backend: BatchBackend, items: list[WorkItem]) -> list[Any]:
    return await asyncio.gather(
        *(backend.generate(item, None) for item in items), return_exceptions=True
    )


# ---- the requests ------------------------------------------------------------------------


async def test_requests_upload_jsonl_then_create_then_poll_then_read_results(
    harness: Callable[..., Any],
) -> None:
    """The exact requests: a JSONL file (purpose=batch) of one line per item, keyed by the
    item key as custom_id; POST /batches for it (24h window, job metadata); GET the batch;
    GET its output file. Every request carries the key as a Bearer header."""
    items = [make_item(1), make_item(2)]
    fake = FakeOpenAI(outputs=[ok_line(items[0].key), ok_line(items[1].key, "blue")])
    h = await harness(fake)
    results = await generate_all(h.backend, items)

    assert [r["method"] + " " + r["path"] for r in fake.requests] == [
        "POST /v1/files",
        "POST /v1/batches",
        "GET /v1/batches/batch_1",
        "GET /v1/batches/batch_1",
        "GET /v1/files/file-out1/content",  # every item found there: no error file read
    ]
    for request in fake.requests:
        assert request["headers"]["Authorization"] == f"Bearer {KEY}"
        assert KEY not in json.dumps(request["query"])
    upload = fake.requests[0]["parts"]
    assert upload["purpose"]["data"] == b"batch"
    assert upload["file"]["content_type"] == "application/jsonl"
    assert upload["file"]["filename"].endswith(".jsonl")
    lines = [json.loads(line) for line in upload["file"]["data"].splitlines()]
    assert lines == [
        {
            "custom_id": item.key,
            "method": "POST",
            "url": "/v1/images/generations",
            "body": {"prompt": item.prompt, **item.params},
        }
        for item in items
    ]
    assert fake.requests[1]["json"] == {
        "input_file_id": "file-in1",
        "endpoint": "/v1/images/generations",
        "completion_window": "24h",
        "metadata": {"synthaug_job": "night"},
    }
    assert [len(r.images) for r in results] == [1, 1]
    assert results[0].response["usage"] == USAGE
    assert "<elided" in results[0].response["data"][0]["b64_json"]
    # recorded twice, before the batch existed and once it did, before any poll
    assert h.recorded == [
        ([i.key for i in items], BatchRef("file-in1")),
        ([i.key for i in items], BatchRef("file-in1", "batch_1")),
    ]
    assert h.progress[-1].status == "completed"


async def test_an_answer_that_may_not_have_arrived_looks_the_batch_up_instead_of_creating_another(
    harness: Callable[..., Any],
) -> None:
    """POST /batches drops the connection after sending: the batch may exist. The client
    lists batches, finds the one for its input file, and creates no second one."""
    item = make_item(1)
    fake = FakeOpenAI(
        outputs=[ok_line(item.key)],
        drop_creates=1,
        listed=[{"id": "batch_1", "input_file_id": "file-in1", "status": "validating"}],
    )
    h = await harness(fake)
    [result] = await generate_all(h.backend, [item])
    assert not isinstance(result, BaseException), result
    assert fake.creates == 1
    assert any(r["path"] == "/v1/batches" and r["method"] == "GET" for r in fake.requests)
    assert h.recorded[-1][1] == BatchRef("file-in1", "batch_1")


# ---- every result form -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "in_errors", "expected", "kind"),
    [
        pytest.param(
            lambda k: error_line(k, 500, "server_error", "The server had an error."),
            True,
            TransientError,
            "http_status",
            id="5xx-retried-in-a-new-batch",
        ),
        pytest.param(
            lambda k: error_line(k, 429, "rate_limit_exceeded", "Enqueued limit."),
            True,
            TransientError,
            "http_status",
            id="429-retried",
        ),
        pytest.param(
            lambda k: error_line(k, 400, "moderation_blocked", "Rejected by the safety system."),
            True,
            PermanentError,
            "refused",
            id="moderation-refused",
        ),
        pytest.param(
            lambda k: error_line(k, 400, "invalid_value", "Invalid size."),
            True,
            PermanentError,
            "http_status",
            id="400-failed",
        ),
        pytest.param(
            lambda k: error_line(k, 429, "insufficient_quota", "You exceeded your current quota"),
            True,
            FatalError,
            "http_status",
            id="quota-fatal",
        ),
        pytest.param(expired_line, True, TransientError, "timeout", id="expired-line"),
        pytest.param(
            lambda k: {**ok_line(k), "response": {"status_code": 200, "body": {"x": 1}}},
            False,
            TransientError,
            "bad_response",
            id="no-images",
        ),
    ],
)
async def test_result_line_forms(
    harness: Callable[..., Any],
    line: Callable[[str], dict[str, Any]],
    in_errors: bool,
    expected: type[Exception],
    kind: str,
) -> None:
    """Each result line becomes the same error the online client raises for that answer."""
    item = make_item(7)
    fake = FakeOpenAI(
        **({"errors": [line(item.key)]} if in_errors else {"outputs": [line(item.key)]})
    )
    h = await harness(fake)
    [result] = await generate_all(h.backend, [item])
    assert isinstance(result, expected), result
    assert result.kind == kind
    assert result.item_key == item.key
    assert KEY not in str(result)


@pytest.mark.parametrize("status", ["expired", "cancelled"])
async def test_a_batch_that_ended_early_keeps_what_completed(
    harness: Callable[..., Any], status: str
) -> None:
    """Expired or cancelled: the items it finished are results; the others are transient
    (they go into a new batch)."""
    done, missing = make_item(1), make_item(2)
    fake = FakeOpenAI(outputs=[ok_line(done.key)], status=status)
    h = await harness(fake)
    first, second = await generate_all(h.backend, [done, missing])
    assert len(first.images) == 1
    assert isinstance(second, TransientError)
    assert second.kind == "timeout"
    assert status in second.message


async def test_a_batch_that_failed_validation_is_fatal(harness: Callable[..., Any]) -> None:
    """A batch refused as a whole (its input file invalid) stops the run: resubmitting
    the same lines cannot help."""
    item = make_item(1)
    fake = FakeOpenAI(
        status="failed",
        batch_errors=[{"code": "invalid_request", "message": "Bad line.", "line": 1}],
    )
    h = await harness(fake)
    [result] = await generate_all(h.backend, [item])
    assert isinstance(result, FatalError)
    assert "failed validation" in result.message
    assert "line 1" in result.message


async def test_a_refused_key_on_upload_is_fatal_and_never_logged(
    harness: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """401 on the upload: fatal for every item, nothing recorded, the key nowhere."""
    caplog.set_level(logging.DEBUG)

    class Refusing(FakeOpenAI):
        async def upload(self, request: web.Request) -> web.Response:
            self._seen(request)
            return web.json_response(
                {
                    "error": {
                        "message": "Incorrect API key provided: sk-b***",
                        "code": "invalid_api_key",
                    }
                },
                status=401,
            )

    h = await harness(Refusing())
    results = await generate_all(h.backend, [make_item(1), make_item(2)])
    assert all(isinstance(r, FatalError) and r.status == 401 for r in results)
    assert h.recorded == []
    assert KEY not in caplog.text
    assert all(KEY not in str(r) for r in results)


async def test_without_waiting_items_are_deferred_once_their_batch_exists(
    harness: Callable[..., Any],
) -> None:
    """``--no-wait``: each item is recorded in its batch, then leaves as `Deferred`."""
    items = [make_item(1), make_item(2)]
    fake = FakeOpenAI(polls_before_done=100)
    h = await harness(fake, wait=False)
    results = await generate_all(h.backend, items)
    assert all(isinstance(r, Deferred) and r.batch_id == "batch_1" for r in results)
    assert h.recorded[-1] == ([i.key for i in items], BatchRef("file-in1", "batch_1"))
    assert not any("/content" in r["path"] for r in fake.requests)


async def test_reattached_items_wait_in_their_recorded_batch_and_nothing_is_submitted(
    harness: Callable[..., Any],
) -> None:
    """A resume: items the manifest says wait in batch_1 get its results; no upload, no
    new batch."""
    items = [make_item(1), make_item(2)]
    fake = FakeOpenAI(outputs=[ok_line(i.key) for i in items])
    h = await harness(fake)
    ref = BatchRef("file-in1", "batch_1")
    h.backend.bind_manifest({i.key: ref for i in items}, lambda _items, _ref: None)
    results = await generate_all(h.backend, items)
    assert [len(r.images) for r in results] == [1, 1]
    assert not any(r["method"] == "POST" for r in fake.requests)
    # the results file is read once for both items
    assert sum(1 for r in fake.requests if r["path"].endswith("file-out1/content")) == 1


async def test_reattached_before_the_batch_was_recorded_finds_it_by_its_file(
    harness: Callable[..., Any],
) -> None:
    """Killed between upload and create: the manifest has the file only. The batch made
    from it is found in the list; nothing is submitted again."""
    item = make_item(3)
    fake = FakeOpenAI(
        outputs=[ok_line(item.key)],
        listed=[{"id": "batch_1", "input_file_id": "file-in1", "status": "in_progress"}],
    )
    h = await harness(fake)
    h.backend.bind_manifest({item.key: BatchRef("file-in1")}, lambda _items, _ref: None)
    [result] = await generate_all(h.backend, [item])
    assert len(result.images) == 1
    assert fake.creates == 0
    assert not any(r["path"] == "/v1/files" for r in fake.requests)


async def test_lines_gather_into_batches_of_batch_size(harness: Callable[..., Any]) -> None:
    """`batch_size` caps the requests per input file: five items, size two → three files."""
    items = [make_item(i) for i in range(5)]
    fake = FakeOpenAI(outputs=[ok_line(i.key) for i in items])
    h = await harness(fake, batch_size=2)
    results = await generate_all(h.backend, items)
    assert all(len(r.images) == 1 for r in results)
    uploads = [r for r in fake.requests if r["path"] == "/v1/files"]
    assert sorted(len(u["parts"]["file"]["data"].splitlines()) for u in uploads) == [1, 2, 2]


# ---- whole jobs on the mock --------------------------------------------------------------


def write_batch_spec(folder: Path, base_url: str, *, prompts: int = 6, **backend: Any) -> Path:
    spec = {
        "version": 1,
        "name": "night",
        "output_dir": "out",
        "backend": {
            "kind": "openai",
            "mode": "batch",
            "base_url": base_url,
            "poll_interval_s": 0.05,
            "poll_max_s": 0.2,
            "timeout_s": 10,
            **backend,
        },
        "params": {"model": "gpt-image-2", "quality": "low", "size": "1024x1024"},
        "run": {"max_attempts": 6, "backoff_base_s": 0.01, "backoff_max_s": 0.05},
        "sources": [
            {"name": "leaves", "prompt": "leaf {i}", "vars": {"i": list(map(str, range(prompts)))}}
        ],
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def last_lines(out: Path) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for line in read_lines(out / "manifest.jsonl"):
        latest[line["key"]] = line
    return latest


def run_cli(spec: Path, *extra: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(spec), "--no-progress", "--no-grid", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_batch_job_on_the_mock_costs_half_and_pays_each_image_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole batch job: one file, one batch, every item ok once, spend = half of what
    the usage blocks price online."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with ThreadedMock(MockConfig(batch_s=0.3)) as mock:
        spec = write_batch_spec(tmp_path, mock.base_url + "/v1")
        result = api.run(api.load_spec(spec))
        counts = mock.server.stats
    assert result.exit_code == 0, result.message
    assert result.ok == 6
    assert result.failed == 0
    assert (counts.batch_files, counts.batches, counts.generations, counts.duplicates) == (
        1,
        1,
        6,
        0,
    )
    assert counts.requests == 0  # nothing went to the online endpoints
    lines = last_lines(tmp_path / "out")
    assert {line["status"] for line in lines.values()} == {"ok"}
    online = sum(
        cost_from_usage("gpt-image-2", line["response"]["usage"]) or 0 for line in lines.values()
    )
    assert result.cost_usd == pytest.approx(online / 2, abs=1e-4)
    assert result.summary["mode"] == "batch"
    for path in (tmp_path / "out").rglob("*"):  # the key is in no file the run wrote
        assert not path.is_file() or KEY.encode() not in path.read_bytes(), path


def test_an_out_whose_ok_lines_carry_the_old_batch_mark_resumes_without_paying_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ok lines written before `Generation.batch` (the batch id as
    ``response.synthaug_batch_id``, no ``batch`` field) are done: a rerun sends nothing,
    and status reads them."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with ThreadedMock(MockConfig(batch_s=0.1)) as mock:
        spec = write_batch_spec(tmp_path, mock.base_url + "/v1", prompts=3)
        assert api.run(api.load_spec(spec)).ok == 3
        manifest = tmp_path / "out" / "manifest.jsonl"
        old = []
        for line in read_lines(manifest):
            if line["status"] == "ok":
                line["response"]["synthaug_batch_id"] = line.pop("batch")["id"]
            old.append(json.dumps(line) + "\n")
        manifest.write_text("".join(old))
        before = mock.server.stats.batch_files, mock.server.stats.generations
        again = api.run(api.load_spec(spec))
        after = mock.server.stats.batch_files, mock.server.stats.generations
    assert again.exit_code == 0, again.message
    assert after == before  # nothing submitted, nothing generated again
    assert api.status(tmp_path / "out").ok == 3


def test_lines_that_fail_or_expire_go_into_a_new_batch_until_every_item_is_ok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-line 5xx and an expired share: the run keeps what completed, submits the rest
    again, and ends with every item ok and no image paid twice."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    config = MockConfig(
        batch_s=0.2, batch_expire_share=0.3, error_rate=0.3, faults={"500": 1.0, "503": 1.0}, seed=3
    )
    with ThreadedMock(config) as mock:
        spec = write_batch_spec(tmp_path, mock.base_url + "/v1", prompts=12)
        data = yaml.safe_load(spec.read_text())
        # about half the lines of each batch fail or expire: 6 attempts would leave an item
        # failed for good in one job of five; 12 make every item's success near certain
        data["run"]["max_attempts"] = 12
        spec.write_text(yaml.safe_dump(data))
        result = api.run(api.load_spec(spec))
        counts = mock.server.stats
    assert result.exit_code == 0, result.message
    assert result.ok == 12
    assert counts.batches > 1
    assert (counts.generations, counts.duplicates) == (12, 0)
    assert result.summary["retries"] > 0


@pytest.mark.parametrize(
    ("sig", "code"),
    [
        pytest.param(signal.SIGKILL, -9, id="sigkill"),
        pytest.param(signal.SIGTERM, 143, id="sigterm"),
    ],
)
@pytest.mark.slow
def test_killed_while_waiting_then_resumed_submits_one_batch_and_finishes_each_item_once(
    tmp_path: Path, sig: int, code: int
) -> None:
    """Killed (or stopped) while the batch runs; the resume re-attaches to it: one file,
    one batch, every item ok exactly once, nothing generated twice."""
    with mock_server_process(tmp_path, "--batch-seconds", "6") as base:
        spec = write_batch_spec(tmp_path, base + "/v1", prompts=8)
        data = yaml.safe_load(spec.read_text())
        data["run"]["grace_period_s"] = 0.2  # SIGTERM: no waiting for the batch to end
        spec.write_text(yaml.safe_dump(data))
        env = {**os.environ, "OPENAI_API_KEY": KEY}
        cmd = [sys.executable, "-m", "pipeline", "run", str(spec), "--no-progress", "--no-grid"]
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        manifest = tmp_path / "out" / "manifest.jsonl"

        def submitted() -> bool:
            lines = list(read_lines(manifest)) if manifest.exists() else []
            waiting = [line for line in lines if line["status"] == "submitted"]
            return sum(1 for line in waiting if (line.get("batch") or {}).get("id")) == 8

        wait_until(submitted, what="the batch to be recorded")
        first.send_signal(sig)
        assert first.wait(timeout=30) == code
        assert stats(base)["batch_downloads"] == 0  # killed before any result came back

        second = run_cli(spec, env=env)
        final = stats(base)
    assert second.returncode == 0, second.stderr
    assert (final["batch_files"], final["batches"]) == (1, 1)
    assert (final["generations"], final["duplicates"]) == (8, 0)
    oks = [line for line in read_lines(manifest) if line["status"] == "ok"]
    assert len(oks) == 8
    assert len({line["key"] for line in oks}) == 8


@pytest.mark.slow
def test_no_wait_submits_and_exits_then_a_later_run_collects(tmp_path: Path) -> None:
    """``run --no-wait`` leaves the batch running (exit 0, status lists it); the next
    run collects it without submitting anything."""
    with mock_server_process(tmp_path, "--batch-seconds", "1") as base:
        spec = write_batch_spec(tmp_path, base + "/v1", prompts=5)
        env = {**os.environ, "OPENAI_API_KEY": KEY}
        first = run_cli(spec, "--no-wait", env=env)
        assert first.returncode == 0, first.stderr
        assert "wait in Batch API batches" in first.stderr
        assert "submitted batch batch-mock" in first.stderr  # shown at the default log level
        assert "validating, 0 of 5 requests done" in first.stderr
        status = subprocess.run(
            [sys.executable, "-m", "pipeline", "status", str(tmp_path / "out"), "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        report = json.loads(status.stdout)
        assert report["submitted"] == 5
        assert report["ok"] == 0
        assert list(report["batches"].values()) == [5]
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["in_batches"] == 5
        planned = api.plan(api.load_spec(spec)).to_json()["total"]
        assert planned["in_batches"] == 5
        assert planned["cost_usd"] == 0  # already paid: collecting costs nothing more

        second = run_cli(spec, env=env)
        final = stats(base)
    assert second.returncode == 0, second.stderr
    assert (final["batch_files"], final["batches"], final["generations"]) == (1, 1, 5)
    assert {line["status"] for line in last_lines(tmp_path / "out").values()} == {"ok"}


# ---- spec and command line ---------------------------------------------------------------


def test_plan_prices_batch_mode_at_half_the_online_price(tmp_path: Path) -> None:
    """The same job planned online and in batch mode: the batch price is half."""
    online = write_batch_spec(tmp_path, "https://api.openai.com/v1", mode="online")
    cost_online = api.plan(api.load_spec(online)).to_json()["total"]["cost_usd"]
    batch = write_batch_spec(tmp_path, "https://api.openai.com/v1")
    cost_batch = api.plan(api.load_spec(batch)).to_json()["total"]["cost_usd"]
    assert cost_online > 0
    assert cost_batch == pytest.approx(cost_online / 2)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(
            lambda s: s.update(project_url="leaves") or s["backend"].update(kind="roboflow"),
            "backend.mode: backend roboflow has no batch mode",
            id="kind-without-batch",
        ),
        pytest.param(
            lambda s: (
                s["backend"].update(kind="mock") or s["sources"][0].update(roboflow_ids=["img-1"])
            ),
            "sources[0].roboflow_ids: backend.mode batch sends OpenAI requests, which cannot "
            "carry Roboflow image ids",
            id="roboflow-ids",
        ),
        pytest.param(
            lambda s: s["backend"].update(batch_size=50_001),
            "backend.batch_size",
            id="batch-size-over-the-api-limit",
        ),
    ],
)
def test_batch_spec_errors_name_the_key_and_send_nothing(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    spec_path = write_batch_spec(tmp_path, "https://api.openai.com/v1")
    spec = yaml.safe_load(spec_path.read_text())
    edit(spec)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run_cli(spec_path, env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": KEY})
    assert result.returncode == 2
    assert expected in result.stderr
    assert "spec.yaml:" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kind", "mode", "expected"),
    [
        pytest.param("openai", "online", "--no-wait needs backend.mode: batch", id="online"),
        pytest.param("mock", "batch", "cannot leave batches with the embedded mock", id="mock"),
    ],
)
def test_no_wait_is_refused_where_it_cannot_hold(
    tmp_path: Path, kind: str, mode: str, expected: str
) -> None:
    spec = write_batch_spec(tmp_path, "https://api.openai.com/v1", kind=kind, mode=mode)
    result = run_cli(spec, "--no-wait", env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": KEY})
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr


def test_batch_job_rehearses_on_the_embedded_mock(tmp_path: Path) -> None:
    """``kind: mock`` with ``mode: batch``: the quick rehearsal, no key, no network."""
    spec = write_batch_spec(tmp_path, "unused", kind="mock")
    data = yaml.safe_load(spec.read_text())
    del data["backend"]["base_url"]
    spec.write_text(yaml.safe_dump(data))
    result = api.run(api.load_spec(spec))
    assert result.exit_code == 0, result.message
    assert result.ok == 6
    assert result.cost_usd == 0
    statuses = [line["status"] for line in read_lines(tmp_path / "out" / "manifest.jsonl")]
    assert statuses.count("submitted") == 12
    assert statuses.count("ok") == 6


def test_batch_rehearsal_uploads_to_the_embedded_mocks_roboflow(tmp_path: Path) -> None:
    """Batch mode on the embedded mock with an `upload:` block: the images go to the
    mock's Roboflow project (its root, not its OpenAI ``/v1``) and their ids are recorded."""
    spec = write_batch_spec(tmp_path, "unused", kind="mock")
    data = yaml.safe_load(spec.read_text())
    del data["backend"]["base_url"]
    data["upload"] = {"project": "leaves-synthetic", "split": "train"}
    spec.write_text(yaml.safe_dump(data))
    result = api.run(api.load_spec(spec))
    assert result.exit_code == 0, result.message
    uploads = [
        output["upload"]
        for line in last_lines(tmp_path / "out").values()
        for output in line["outputs"]
    ]
    assert len(uploads) == 6
    assert all(u["project"] == "leaves-synthetic" and u["id"] for u in uploads)


def test_retry_online_sends_failed_lines_to_the_images_api_at_full_price(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``retry_online: true``: a line that failed in the batch is retried online at once
    (not in a second batch); its spend is the full price, the batch's items half."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    config = MockConfig(batch_s=0.2, error_rate=0.4, faults={"500": 1.0}, seed=5)
    with ThreadedMock(config) as mock:
        spec = write_batch_spec(tmp_path, mock.base_url + "/v1", prompts=10, retry_online=True)
        result = api.run(api.load_spec(spec))
        counts = mock.server.stats
    assert result.exit_code == 0, result.message
    assert result.ok == 10
    assert counts.batches == 1
    assert counts.requests > 0  # retries went to /v1/images/generations
    lines = last_lines(tmp_path / "out")
    by_batch = [line for line in lines.values() if "batch" in line]
    online = [line for line in lines.values() if "batch" not in line]
    assert by_batch
    assert online
    expected = sum(
        cost_from_usage("gpt-image-2", line["response"]["usage"]) or 0 for line in by_batch
    ) / 2 + sum(cost_from_usage("gpt-image-2", line["response"]["usage"]) or 0 for line in online)
    assert result.cost_usd == pytest.approx(expected, abs=1e-4)


async def test_an_input_file_stays_under_its_byte_limit(harness: Callable[..., Any]) -> None:
    """The file size caps a batch too (the API takes 200 MB): here two lines' worth."""
    items = [make_item(i) for i in range(5)]
    fake = FakeOpenAI(outputs=[ok_line(i.key) for i in items])
    line_bytes = 250  # each request line here is a little under this
    h = await harness(fake, max_file_bytes=2 * line_bytes)
    results = await generate_all(h.backend, items)
    assert all(len(r.images) == 1 for r in results)
    uploads = [r["parts"]["file"]["data"] for r in fake.requests if r["path"] == "/v1/files"]
    assert all(len(data) <= 2 * line_bytes for data in uploads)
    assert sum(len(data.splitlines()) for data in uploads) == 5
