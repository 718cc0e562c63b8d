"""Whole runs with `check:`, `label:` and `upload:`: on the mock API, and on a small fake
Roboflow written here (it echoes inputs and repeats images on purpose), on 127.0.0.1.

What a user relies on: every stored image has its hash and the labels the detection
model gave for it; an output that is its own input or a copy of an earlier one is flagged
and stays out of the project; every uploaded image carries exactly one annotation whose
boxes are its predictions; a kill while labelling or annotating, then a resume, asks
nothing twice beyond what was in flight.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from xml.etree import ElementTree

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from checks import (
    ThreadedMock,
    distinct_png,
    mock_server_process,
    run_spec,
    start_run,
    stats,
    wait_until,
    write_job_spec,
)

from pipeline.manifest import log as manifest_log
from pipeline.manifest.log import read_latest
from pipeline.mockapi.server import MockConfig

KEY = "rf-labels-e2e-UNIQUE-71d2a9"
PROJECT = "street"
MODEL = "street-objects/2"


def add_stages(path: Path, base: str, *, check: bool = True, **label: Any) -> dict[str, Any]:
    """Add check (unless not `check`), label and upload blocks against `base` to the spec
    at `path`."""
    spec = yaml.safe_load(path.read_text())
    if check:
        spec["check"] = {}
    spec["label"] = {"model": MODEL, "api_url": base, "confidence": 0.5, **label}
    spec["upload"] = {"project": PROJECT, "base_url": base, "workspace": "ws"}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return dict(spec)


def ok_outputs(out: Path) -> list[dict[str, Any]]:
    return [
        output
        for record in read_latest(out / "manifest.jsonl").values()
        if record["status"] == "ok"
        for output in record["outputs"]
    ]


def detect_directly(base: str, data: bytes) -> list[dict[str, Any]]:
    """What the mock's detection answers for `data`, asked here, not by synthaug."""

    async def ask() -> list[dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{base}/{MODEL}",
                params={"api_key": KEY, "confidence": "50"},
                data=base64.b64encode(data),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ) as response,
        ):
            assert response.status == 200
            payload = await response.json()
            return list(payload["predictions"])

    return asyncio.run(ask())


def centre_box(prediction: dict[str, Any]) -> tuple[str, float, float, float, float]:
    return (
        prediction["class"],
        prediction["x"],
        prediction["y"],
        prediction["width"],
        prediction["height"],
    )


# ---- on the mock ------------------------------------------------------------------------


@pytest.fixture
def mock() -> Iterator[ThreadedMock]:
    with ThreadedMock(MockConfig(api_key=KEY)) as server:
        yield server


def street_spec(tmp_path: Path, base: str) -> Path:
    return write_job_spec(
        tmp_path,
        base,
        name="street",
        values=["a dog beside a car", "a cat under a tree", "a person with an umbrella"],
        size="128x96",
        concurrency=2,
    )


async def test_every_image_is_labelled_and_annotated_with_its_own_boxes(
    tmp_path: Path, mock: ThreadedMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    path = street_spec(tmp_path, mock.base_url)
    add_stages(path, mock.base_url)
    result = await run_spec(path)
    assert result.exit_code == 0
    outputs = ok_outputs(tmp_path / "out")
    assert len(outputs) == 3
    for output in outputs:
        assert len(output["phash"]) == 16
        data = (tmp_path / "out" / output["path"]).read_bytes()
        expected = await asyncio.to_thread(detect_directly, mock.base_url, data)
        assert expected, "each prompt names objects the mock draws"
        assert [centre_box(p) for p in output["labels"]["predictions"]] == [
            centre_box(p) for p in expected
        ]
        upload = output["upload"]
        assert upload["annotated"] is True
        image = mock.server.dataset.find(PROJECT, upload["id"])
        assert image is not None
        assert image.name == Path(output["path"]).name
        assert image.annotation is not None
        assert image.annotation_is_prediction is True
        kept = [(b.label, b.x, b.y, b.width, b.height) for b in image.annotation.boxes]
        assert kept == [centre_box(p) for p in expected]
    counts = mock.server.stats
    assert set(counts.annotations_by_image.values()) == {1}
    # lines with hashes, labels and annotations still take the resume's fast path
    lines = (tmp_path / "out" / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    ok_lines = [raw for raw in lines if b'"status":"ok"' in raw]
    assert len(ok_lines) >= 9  # stored, checked, labelled, uploaded: a line each
    assert all(manifest_log._fast_ok(raw) is not None for raw in ok_lines)
    assert result.summary["upload"]["annotation_check"]["ok"] is True
    before = (counts.detect_requests, counts.upload_requests, counts.annotate_requests)

    again = await run_spec(path)  # a resume: everything is done

    assert again.exit_code == 0
    after = (counts.detect_requests, counts.upload_requests, counts.annotate_requests)
    assert after == before


async def test_a_refused_detection_key_stops_the_run_before_uploading(
    tmp_path: Path, mock: ThreadedMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    monkeypatch.setenv("OTHER_KEY", "not-the-key")
    path = street_spec(tmp_path, mock.base_url)
    add_stages(path, mock.base_url, api_key_env="OTHER_KEY")
    result = await run_spec(path)
    assert result.exit_code == 3
    assert mock.server.stats.uploads == 0
    assert all("labels" not in output for output in ok_outputs(tmp_path / "out"))


async def test_dropped_annotation_boxes_are_reported_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    with ThreadedMock(MockConfig(api_key=KEY, drop_annotation_boxes=True)) as mock:
        path = street_spec(tmp_path, mock.base_url)
        add_stages(path, mock.base_url)
        result = await run_spec(path)
    check = result.summary["upload"]["annotation_check"]
    assert check["ok"] is False
    assert check["kept"] == 0
    assert check["sent"] > 0
    assert result.exit_code == 1
    assert any("dropped" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


# ---- on a fake Roboflow that echoes inputs and repeats itself ------------------------------


SAME = distinct_png(1)
BOXES = [
    {"x": 20.5, "y": 16, "width": 9, "height": 12, "class": "leaf", "confidence": 0.9},
    {"x": 40, "y": 40, "width": 10, "height": 10, "class": "rock", "confidence": 0.7},
]


@dataclass
class FakeRoboflow:
    """Generation answers the input itself for prompts with "echo", the same picture for
    prompts with "same", a fresh one else; detection finds BOXES; uploads and annotations
    are kept as sent."""

    uploads: dict[str, bytes] = field(default_factory=dict)
    annotations: dict[str, list[str]] = field(default_factory=dict)
    detections: int = 0
    count: int = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/synthetic-image", self.generate)
        app.router.add_post("/dataset/{project}/upload", self.upload)
        app.router.add_post("/dataset/{project}/annotate/{image_id}", self.annotate)
        app.router.add_post("/{model}/{version}", self.detect)
        return app

    async def generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.count += 1
        if "echo" in body["prompt"]:
            data = base64.b64decode(body["image"])
        elif "same" in body["prompt"]:
            data = SAME
        else:
            data = distinct_png(100 + self.count)
        return web.json_response({"images": [{"image": base64.b64encode(data).decode()}]})

    async def detect(self, request: web.Request) -> web.Response:
        self.detections += 1
        return web.json_response({"predictions": BOXES, "image": {"width": 64, "height": 64}})

    async def upload(self, request: web.Request) -> web.Response:
        name = request.query["name"]
        self.uploads[name] = base64.b64decode(await request.read())
        return web.json_response({"success": True, "id": f"id-{name}"})

    async def annotate(self, request: web.Request) -> web.Response:
        image_id = request.match_info["image_id"]
        if image_id in self.annotations:
            return web.json_response({"error": {"message": "already annotated"}}, status=409)
        text = (await request.read()).decode()
        self.annotations[image_id] = [request.query["name"], request.query["prediction"], text]
        return web.json_response({"success": True})


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[tuple[FakeRoboflow, str]]:
    server = FakeRoboflow()
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield server, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_unchanged_and_duplicate_outputs_are_flagged_and_not_uploaded(
    tmp_path: Path, fake: tuple[FakeRoboflow, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, base = fake
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    source_image = tmp_path / "input.png"
    source_image.write_bytes(distinct_png(2))
    path = write_job_spec(tmp_path, base, name="flags", values=["x"], concurrency=1)
    spec = yaml.safe_load(path.read_text())
    spec["sources"] = [
        {"name": "edits", "images": ["input.png"], "prompt": "{echo|fresh} edit"},
        {"name": "copies", "prompt": "{same one|same two}"},
    ]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    add_stages(path, base)

    result = await run_spec(path)

    assert result.exit_code == 0  # flags are findings, not failures
    by_prompt = {
        record["prompt"]: record["outputs"][0]
        for record in read_latest(tmp_path / "out" / "manifest.jsonl").values()
    }
    assert by_prompt["echo edit"]["flags"] == ["unchanged"]
    assert by_prompt["fresh edit"]["flags"] == []
    assert by_prompt["same one"]["flags"] == []
    assert by_prompt["same two"]["flags"] == ["duplicate"]
    uploaded = {Path(o["path"]).name for o in by_prompt.values() if "upload" in o}
    assert uploaded == set(server.uploads)
    assert uploaded == {Path(by_prompt[p]["path"]).name for p in ("fresh edit", "same one")}
    assert server.detections == 4  # flagged outputs are labelled all the same
    for name, data in server.uploads.items():
        assert data == (tmp_path / "out" / by_prompt_path(by_prompt, name)).read_bytes()
        annotation_name, prediction, text = server.annotations[f"id-{name}"]
        assert annotation_name == Path(name).stem + ".xml"
        assert prediction == "true"
        root = ElementTree.fromstring(text)
        assert root.findtext("filename") == name
        corners = [
            (
                obj.findtext("name"),
                *(
                    float(obj.findtext(f"bndbox/{k}") or "nan")
                    for k in ("xmin", "ymin", "xmax", "ymax")
                ),
            )
            for obj in root.findall("object")
        ]
        assert corners == [("leaf", 16.0, 10.0, 25.0, 22.0), ("rock", 35.0, 35.0, 45.0, 45.0)]


def by_prompt_path(by_prompt: dict[str, dict[str, Any]], name: str) -> str:
    return next(str(o["path"]) for o in by_prompt.values() if Path(o["path"]).name == name)


async def test_include_flagged_uploads_them_too(
    tmp_path: Path, fake: tuple[FakeRoboflow, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, base = fake
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    path = write_job_spec(tmp_path, base, name="flags", values=["same one", "same two"])
    spec = add_stages(path, base)
    spec["upload"]["include_flagged"] = True
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = await run_spec(path)
    assert result.exit_code == 0
    assert len(server.uploads) == 2
    assert len(server.annotations) == 2


# ---- killed while labelling or annotating ------------------------------------------------


def manifest_count(out: Path, marker: bytes) -> int:
    manifest = out / "manifest.jsonl"
    return manifest.read_bytes().count(marker) if manifest.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("marker", "what"),
    [(b'"labels":{', "labelling"), (b'"annotated":true', "annotating")],
    ids=["labelling", "annotating"],
)
def test_killed_while_labelling_or_annotating_resumes_without_asking_twice(
    tmp_path: Path, marker: bytes, what: str
) -> None:
    """SIGKILL once the first labels (or annotations) are on record, then resume: every
    image ends labelled and annotated once; detection asked again at most what the kill
    cut off (the label lane's concurrency)."""
    with mock_server_process(tmp_path, "--latency", "0.1") as base:
        path = write_job_spec(
            tmp_path,
            base,
            name="killed",
            values=[f"a dog and a car number {i}" for i in range(10)],
            size="96x96",
            timeout_s=10,
        )
        add_stages(path, base, check=False, concurrency=2)  # (the mock's pictures look alike)
        out = tmp_path / "out"
        run = start_run(path, {"ROBOFLOW_API_KEY": KEY})
        wait_until(lambda: manifest_count(out, marker) >= 2 or run.poll() is not None, what=what)
        assert run.poll() is None, "the run ended before it could be killed"
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        resumed = start_run(path, {"ROBOFLOW_API_KEY": KEY})
        assert resumed.wait(timeout=120) == 0
        counts = stats(base)
    outputs = ok_outputs(out)
    assert len(outputs) == 10
    assert all(o["labels"]["predictions"] and o["upload"]["annotated"] for o in outputs)
    assert counts["detections"] <= 10 + 2  # at most the label lane's requests in flight
    assert counts["annotations"] == 10  # one stored per image: a repeat meets a 409
    assert counts["uploads"] == 10
    log = (tmp_path / "run.err").read_text()
    assert KEY not in log
    assert KEY not in (out / "manifest.jsonl").read_text()
    assert KEY not in json.dumps(parse_qs(log))
