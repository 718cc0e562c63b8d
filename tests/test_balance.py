"""`roboflow_balance` sources: generate what a project lacks, planned from its counts.

Against a small fake Roboflow written here (its class counts changeable mid-test; its
detection finds the class its pictures were made for, except where told not to), on
127.0.0.1: the plan follows the counts once read and never moves after; a run makes the
images each class lacks; an image without its class is flagged and stays out of the
project; ``--top-up`` plans exactly the shortfall; refusals stop before anything is paid.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from checks import distinct_png

from pipeline.balance import base_requests
from pipeline.cli import main
from pipeline.jobspec.model import BalanceSettings
from pipeline.manifest.log import read_latest

KEY = "rf-balance-UNIQUE-2c81f0"


@dataclass
class FakeRoboflow:
    """Counts per class at ``GET /ws/proj``; a fresh picture per generation, whose
    detection is the class its prompt named (``shows``), or nothing when the prompt is in
    ``blind``."""

    classes: dict[str, int] = field(default_factory=lambda: {"a": 2, "b": 10, "c": 25})
    project_status: int = 200
    blind: set[str] = field(default_factory=set)
    shows: dict[str, str] = field(default_factory=dict)  # sha256 -> class
    prompts: list[str] = field(default_factory=list)
    project_reads: int = 0
    uploads: list[str] = field(default_factory=list)
    annotations: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/synthetic-image", self.generate)
        app.router.add_post("/dataset/{project}/upload", self.upload)
        app.router.add_post("/dataset/{project}/annotate/{image_id}", self.annotate)
        app.router.add_post("/{model}/{version}", self.detect)
        app.router.add_get("/{workspace}/{project}", self.project)
        return app

    async def project(self, request: web.Request) -> web.Response:
        self.project_reads += 1
        if request.query.get("api_key") != KEY or self.project_status == 401:
            return web.json_response({"error": {"message": "Unauthorized"}}, status=401)
        if self.project_status == 404 or request.match_info["project"] != "proj":
            return web.json_response({"error": {"message": "Not found"}}, status=404)
        return web.json_response(
            {
                "workspace": {"name": "ws", "url": "ws", "members": 1},
                "project": {
                    "id": "ws/proj",
                    "type": "object-detection",
                    "images": sum(self.classes.values()),
                    "unannotated": 0,
                    "splits": {"train": sum(self.classes.values())},
                    "classes": dict(self.classes),
                    "versions": [],
                },
            }
        )

    async def generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body["prompt"]
        self.prompts.append(prompt)
        data = distinct_png(len(self.prompts), (48, 48))
        made_for = prompt.split("of ", 1)[1].split(" ", 1)[0]
        if prompt not in self.blind:
            self.shows[hashlib.sha256(data).hexdigest()] = made_for
        return web.json_response({"images": [{"image": base64.b64encode(data).decode()}]})

    async def detect(self, request: web.Request) -> web.Response:
        data = base64.b64decode(await request.read())
        shown = self.shows.get(hashlib.sha256(data).hexdigest())
        box = {"x": 24, "y": 24, "width": 10, "height": 10, "confidence": 0.9}
        predictions = [] if shown is None else [{**box, "class": shown}]
        return web.json_response({"predictions": predictions})

    async def upload(self, request: web.Request) -> web.Response:
        name = request.query["name"]
        self.uploads.append(name)
        return web.json_response({"success": True, "id": f"id-{name}"})

    async def annotate(self, request: web.Request) -> web.Response:
        self.annotations.append(request.match_info["image_id"])
        return web.json_response({"success": True})


@pytest.fixture
def fake() -> Iterator[tuple[FakeRoboflow, str]]:
    """The fake served from its own thread and loop (the CLI owns the test's)."""
    server = FakeRoboflow()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(server.app())

    async def start() -> str:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    base = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    yield server, base
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)
    loop.close()


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)


def write_spec(folder: Path, base: str, *, label: bool = True, **balance: Any) -> Path:
    spec: dict[str, Any] = {
        "version": 1,
        "name": "balance",
        "output_dir": "out",
        "backend": {"kind": "roboflow", "base_url": base, "timeout_s": 5},
        "project_url": "proj",
        "params": {"size": "48x48"},
        "run": {"concurrency": 2, "rate_limit": "1000/s", "backoff_base_s": 0.01},
        "sources": [
            {
                "name": "rare",
                "roboflow_balance": {
                    "workspace": "ws",
                    "project": "proj",
                    "target": 10,
                    "base_url": base,
                    **balance,
                },
                "prompt": "a photo of {class} on a {surface}",
                "vars": {"surface": ["table", "floor", "shelf"]},
            }
        ],
    }
    if label:
        spec["label"] = {"model": "proj/1", "api_url": base}
        spec["upload"] = {"project": "proj", "base_url": base}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([*args])
    return int(exit_info.value.code or 0)


def plan_json(path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, Any]:
    assert cli("plan", str(path), "--json", *flags) == 0
    loaded: dict[str, Any] = json.loads(capsys.readouterr().out)
    return loaded


def run(path: Path, *, top_up: bool = False) -> int:
    flags = ["--top-up"] if top_up else []
    return cli("run", str(path), "--no-progress", "--no-grid", *flags)


def ok_records(out: Path) -> list[dict[str, Any]]:
    return [r for r in read_latest(out / "manifest.jsonl").values() if r["status"] == "ok"]


def test_plan_resolve_plans_what_each_class_lacks_and_records_it(
    tmp_path: Path, fake: tuple[FakeRoboflow, str], capsys: pytest.CaptureFixture[str]
) -> None:
    server, base = fake
    path = write_spec(tmp_path, base)

    before = plan_json(path, capsys)
    assert before["sources"][0]["items"] is None  # unknown until the counts are read
    assert "plan --resolve" in before["sources"][0]["count_unknown_because"]
    assert server.project_reads == 0  # plan alone sends nothing

    resolved = plan_json(path, capsys, "--resolve")
    source = resolved["sources"][0]
    assert source["items"] == 8
    assert source["by_class"] == {"a": 8, "b": 0, "c": 0}
    assert server.project_reads == 1

    server.classes = {"a": 9, "b": 0, "c": 0}  # the project changes: the plan does not
    again = plan_json(path, capsys, "--resolve")
    assert again["sources"][0]["by_class"] == {"a": 8, "b": 0, "c": 0}
    assert server.project_reads == 1


def test_a_run_makes_the_missing_images_and_flags_one_without_its_class(
    tmp_path: Path, fake: tuple[FakeRoboflow, str], capsys: pytest.CaptureFixture[str]
) -> None:
    server, base = fake
    server.blind = {"a photo of a on a floor"}  # its picture will not show an `a`
    path = write_spec(tmp_path, base)
    assert run(path) == 0  # a flag is a finding, not a failure
    records = ok_records(tmp_path / "out")
    assert len(records) == 8
    assert all(r["vars"]["class"] == "a" for r in records)
    assert all(r["prompt"].startswith("a photo of a on a ") for r in records)
    # the other variable cycles: 3 surfaces over 8 requests
    surfaces = sorted(r["vars"]["surface"] for r in records)
    assert surfaces == ["floor"] * 3 + ["shelf"] * 2 + ["table"] * 3
    flagged = [r for r in records if r["outputs"][0]["flags"]]
    assert [r["prompt"] for r in flagged] == ["a photo of a on a floor"] * 3
    assert all(f["outputs"][0]["flags"] == ["missing_class"] for f in flagged)
    assert len(server.uploads) == 5  # the flagged ones stay out of the project
    flagged_names = {Path(r["outputs"][0]["path"]).name for r in flagged}
    assert not flagged_names & set(server.uploads)

    assert cli("status", str(tmp_path / "out"), "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["balance"]["a"] == {
        "count": 2,
        "target": 10,
        "planned": 8,
        "stored": 8,
        "usable": 5,
    }
    assert status["balance"]["b"]["planned"] == 0
    assert status["flagged"] == {"missing_class": 3}


def test_top_up_adds_exactly_the_shortfall_and_a_plain_run_nothing(
    tmp_path: Path, fake: tuple[FakeRoboflow, str], capsys: pytest.CaptureFixture[str]
) -> None:
    server, base = fake
    server.blind = {"a photo of a on a floor"}
    path = write_spec(tmp_path, base)
    assert run(path) == 0
    generated = len(server.prompts)
    server.classes = {"a": 0, "b": 0, "c": 0}  # never re-read: the recorded count stays 2

    assert run(path) == 0  # a plain run: nothing more
    assert len(server.prompts) == generated

    server.blind = set()
    balance_json = (tmp_path / "out" / "balance.json").read_bytes()
    preview = plan_json(path, capsys, "--top-up")["sources"][0]
    assert preview["top_up"] == {"a": 3}  # what the run below adds
    assert preview["to_run"] == 3
    assert (tmp_path / "out" / "balance.json").read_bytes() == balance_json  # nothing recorded
    assert len(server.prompts) == generated
    assert run(path, top_up=True) == 0
    assert len(server.prompts) == generated + 3  # target 10 - count 2 - usable 5
    assert server.project_reads == 1
    records = ok_records(tmp_path / "out")
    assert len(records) == 11
    assert plan_json(path, capsys)["sources"][0]["by_class"] == {"a": 11, "b": 0, "c": 0}

    assert run(path, top_up=True) == 0  # nothing short any more
    assert len(server.prompts) == generated + 3


def test_max_per_class_caps_the_plan(
    tmp_path: Path, fake: tuple[FakeRoboflow, str], capsys: pytest.CaptureFixture[str]
) -> None:
    server, base = fake
    server.classes = {"a": 0, "b": 7}
    path = write_spec(tmp_path, base, label=False, max_per_class=4)
    by_class = plan_json(path, capsys, "--resolve")["sources"][0]["by_class"]
    assert by_class == {"a": 4, "b": 3}


def test_classes_and_prompts_choose_what_is_asked(
    tmp_path: Path, fake: tuple[FakeRoboflow, str]
) -> None:
    _server, base = fake
    path = write_spec(
        tmp_path,
        base,
        label=False,
        classes=["b", "z"],
        prompts={"z": "a photo of z-shaped {surface} toys"},
    )
    assert run(path) == 0
    records = ok_records(tmp_path / "out")
    by_class: dict[str, int] = {}
    for record in records:
        by_class[record["vars"]["class"]] = by_class.get(record["vars"]["class"], 0) + 1
    assert by_class == {"z": 10}  # b is at target; z, unknown to the project, has 0
    assert {r["prompt"] for r in records} == {
        f"a photo of z-shaped {s} toys" for s in ("table", "floor", "shelf")
    }


@pytest.mark.parametrize("status", [401, 404])
def test_a_refused_project_read_exits_3_before_anything_is_paid(
    tmp_path: Path, fake: tuple[FakeRoboflow, str], status: int
) -> None:
    server, base = fake
    server.project_status = status
    path = write_spec(tmp_path, base)
    assert run(path) == 3
    assert server.prompts == []


def test_spec_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A balance source takes no input images, no repeats, no `class` var, and names
    {class} in its prompt: one line each, exit 2, nothing sent."""
    base = "http://127.0.0.1:9"
    cases = {
        "repeats": {"repeats": 2},
        "vars.class": {"vars": {"class": ["x"], "surface": ["t"]}},
        "prompt": {"prompt": "a photo on a {surface}"},
        "urls": {"urls": ["https://example.test/a.png"]},
    }
    for key, change in cases.items():
        path = write_spec(tmp_path, base, label=False)
        data = yaml.safe_load(path.read_text())
        data["sources"][0].update(change)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        assert cli("plan", str(path)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1
        assert f"sources[0].{key}" in err[0]


@pytest.mark.parametrize(
    ("n", "cap", "expected"),
    [
        (1, None, {"a": 8, "b": 0, "c": 0}),
        (3, None, {"a": 3, "b": 0, "c": 0}),  # ceil(8 / 3): 9 images for 8 missing
        (2, 5, {"a": 3, "b": 0, "c": 0}),  # at most 5 images: ceil(5 / 2) requests
    ],
)
def test_requests_are_the_shortfall_in_requests_of_n(
    n: int, cap: int | None, expected: dict[str, int]
) -> None:
    settings = BalanceSettings(workspace="ws", project="proj", target=10, max_per_class=cap)
    assert base_requests(settings, {"a": 2, "b": 10, "c": 25}, n) == expected
