"""What a library caller of `synthaug` may rely on beyond the results: its process's GC
left alone, typed (py.typed), frozen progress snapshots, an awaitable plan, batch and
upload counts in the results, and a `RunControl` that says it serves one run."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import threading
from importlib import resources
from pathlib import Path

import pytest
import yaml
from checks import ThreadedMock, mock_spec

import synthaug
from pipeline.manifest.writer import ManifestWriter
from pipeline.mockapi.server import MockConfig
from pipeline.records import ItemRecord, OutputFile

REPO = Path(__file__).resolve().parent.parent
LINES = 100_000



def write_big_manifest(out: Path, lines: int) -> None:
    """`lines` ok lines in the writer's own format (one line made by `ManifestWriter`,
    copied with other keys): a finished job's manifest, in a fraction of a second."""
    out.mkdir(parents=True)
    template_key = "0123456789abcdef" + "e" * 48
    path = f"images/grid/{template_key[:16]}-0.png"
    record = ItemRecord(
        key=template_key,
        status="ok",
        source="grid",
        vars={"colour": "red"},
        repeat=0,
        input=None,
        prompt="a red cat",
        params={"n": 1},
        outputs=(OutputFile(path, "0" * 64, 32, 32, bytes=100, mtime_ns=1),),
        attempts=1,
    )
    sample = out / "sample.jsonl"
    with ManifestWriter(sample) as writer:
        writer.append(record)
    line = sample.read_text(encoding="utf-8")
    sample.unlink()
    assert line.count(template_key) == 1
    assert line.count(template_key[:16]) == 2
    with (out / "manifest.jsonl").open("w", encoding="utf-8") as fh:
        for i in range(lines):
            key = f"{i:064x}"
            fh.write(line.replace(template_key, key).replace(template_key[:16], key[:16]))


def test_status_leaves_the_gc_on_while_a_big_manifest_loads(sandbox: Path) -> None:
    """While `status` reads a 100,000-line manifest on one thread, another thread never
    finds the process's GC switched off."""
    out = sandbox / "out"
    write_big_manifest(out, LINES)
    assert gc.isenabled()
    seen_off = threading.Event()
    loaded = threading.Event()
    samples = 0

    def sample() -> None:
        nonlocal samples
        while not loaded.is_set():
            samples += 1
            if not gc.isenabled():
                seen_off.set()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        status = synthaug.status(out)
    finally:
        loaded.set()
        sampler.join()
    assert status.ok == LINES
    assert samples > 0
    assert not seen_off.is_set()
    assert gc.isenabled()


def test_plan_and_run_leave_the_gc_alone(sandbox: Path) -> None:
    """A library run and plan neither freeze nor leave off the process's GC."""
    spec = synthaug.load_spec(mock_spec("hygiene"))
    synthaug.run(spec)
    synthaug.run(spec)  # a resume: the manifest is loaded
    synthaug.plan(spec)
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_synthaug_is_typed() -> None:
    """`synthaug` ships its PEP 561 marker, and the build's package data lists it."""
    assert resources.files("synthaug").joinpath("py.typed").is_file()
    assert (Path(synthaug.__file__).parent / "py.typed").is_file()
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")  # no tomllib on 3.10
    package_data = pyproject.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    lines = dict(line.split(" = ", 1) for line in package_data.strip().splitlines())
    assert '"py.typed"' in lines["synthaug"]
    assert '"py.typed"' in lines["pipeline"]


def test_on_progress_gets_frozen_snapshots(sandbox: Path) -> None:
    """Each call gets its own frozen `Progress`; one kept does not change as the run goes on."""
    seen: list[tuple[synthaug.Progress, tuple[int, int, int]]] = []

    def on_progress(progress: synthaug.Progress) -> None:
        seen.append((progress, (progress.ok, progress.done, progress.requests)))

    result = synthaug.run(synthaug.load_spec(mock_spec("hygiene")), on_progress=on_progress)
    assert result.ok == 4
    assert seen
    for progress, at_call in seen:
        assert type(progress) is synthaug.Progress
        assert (progress.ok, progress.done, progress.requests) == at_call  # unchanged since
        assert progress.expected == 4
    first, last = seen[0][0], seen[-1][0]
    assert first is not last
    assert first.ok < last.ok == 4
    assert (last.done, last.images, last.in_batches, last.cost_usd) == (4, 4, 0, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.ok = 99  # type: ignore[misc]


async def test_plan_async_works_inside_a_running_loop(sandbox: Path) -> None:
    """In async code: `await plan_async` gives what `plan` gives; plan(resolve=True),
    which would need its own loop, names plan_async instead; plan() alone still works."""
    spec = synthaug.load_spec(mock_spec("hygiene"))
    before = await synthaug.plan_async(spec)
    assert before.to_json() == synthaug.plan(spec).to_json()
    assert (before.total("items"), before.total("done")) == (4, 0)
    await synthaug.run_async(spec)
    after = await synthaug.plan_async(spec, resolve=True)  # nothing to search: no request
    assert after.to_json() == synthaug.plan(spec).to_json()
    assert after.total("done") == 4
    with pytest.raises(RuntimeError, match=r"await synthaug\.plan_async\(\)"):
        synthaug.plan(spec, resolve=True)


def test_run_result_and_status_carry_upload_counts(sandbox: Path) -> None:
    """With an upload block, the result and status name the uploads; without, None."""
    plain = synthaug.run(synthaug.load_spec(mock_spec("hygiene")))
    assert (plain.in_batches, plain.uploaded, plain.upload_failed) == (0, None, None)
    status = synthaug.status(sandbox / "out")
    assert (status.submitted, dict(status.batches)) == (0, {})
    assert (status.uploaded, status.upload_failed) == (None, None)

    spec = synthaug.load_spec(mock_spec("hygiene", output_dir="up", upload={"project": "cats"}))
    uploaded = synthaug.run(spec)
    assert uploaded.exit_code == 0, uploaded.summary
    assert (uploaded.uploaded, uploaded.upload_failed) == (4, 0)
    status = synthaug.status(sandbox / "up")
    assert (status.uploaded, status.upload_failed) == (4, 0)


def test_run_result_and_status_carry_batch_counts(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch run left waiting (wait=False): the result says how many items wait,
    status how many are submitted and in which batch."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-hygiene-test")
    with ThreadedMock(MockConfig(batch_s=60)) as mock:
        spec_data = mock_spec("hygiene", 
            backend={
                "kind": "openai",
                "mode": "batch",
                "base_url": mock.base_url + "/v1",
                "poll_interval_s": 0.05,
                "poll_max_s": 0.2,
                "timeout_s": 10,
            },
            params={"model": "gpt-image-2", "quality": "low", "size": "1024x1024"},
        )
        (sandbox / "spec.yaml").write_text(yaml.safe_dump(spec_data), encoding="utf-8")
        result = synthaug.run(synthaug.load_spec(sandbox / "spec.yaml"), wait=False)
    assert result.exit_code == 0, result.summary
    assert (result.in_batches, result.ok) == (4, 0)
    status = synthaug.status(sandbox / "out")
    assert status.submitted == 4
    assert list(status.batches.values()) == [4]
    assert json.loads((sandbox / "out" / "summary.json").read_text())["in_batches"] == 4


def test_a_used_run_control_is_refused_before_anything_is_done(sandbox: Path) -> None:
    """A RunControl serves one run: a second run with it raises UsageError and writes
    nothing; a new control runs."""
    spec = synthaug.load_spec(mock_spec("hygiene"))
    control = synthaug.RunControl()
    control.stop()
    assert synthaug.run(spec, control=control).exit_code == 130
    manifest = sandbox / "out" / "manifest.jsonl"
    before = manifest.stat()
    with pytest.raises(synthaug.UsageError, match="RunControl serves one run"):
        synthaug.run(spec, control=control)
    after = manifest.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert not (sandbox / "out" / ".synthaug.lock").exists()
    assert synthaug.run(spec, control=synthaug.RunControl()).ok == 4


def test_a_control_cannot_serve_two_runs_at_once(sandbox: Path) -> None:
    """Two runs given one control at the same time: the second is refused."""
    control = synthaug.RunControl()
    control.claim()
    spec = synthaug.load_spec(mock_spec("hygiene"))
    with pytest.raises(synthaug.UsageError, match="already used"):
        asyncio.run(synthaug.run_async(spec, control=control))
    assert not (sandbox / "out").exists()
    assert os.listdir(sandbox) == []
