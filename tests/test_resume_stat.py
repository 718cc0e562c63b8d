"""Resume tells a replaced image by its stat, re-hashes only what changed, and never
re-reads an untouched input to compute its key (end to end, against the mock API)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from checks import assert_outputs_valid, run_spec, write_job_spec
from PIL import Image, PngImagePlugin

from pipeline.jobspec.load import load_spec
from pipeline.manifest import freshness
from pipeline.manifest.cache import cache_path
from pipeline.manifest.log import read_latest
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.run.job import JobResult, run_job
from pipeline.sources import INPUT_HASHES_NAME, HashCache

KEY = "sk-test-resume-stat-51c2"
HOUR_NS = 3600 * 10**9


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)


@pytest.fixture(params=["in-process", "child", "child-fails"])
def stat_check(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each way the resume check stats the recorded files: in the run's process (a small
    job), in a child process while the keys are expanded (a big one: here from the first
    file), and a child that cannot run (the run checks in its own process instead)."""
    mode = str(request.param)
    answers: list[list[int] | None] = []
    if mode != "in-process":
        monkeypatch.setattr(freshness, "BACKGROUND_MIN_FILES", 1)
        result = freshness.StatPass.result

        def spy(check: freshness.StatPass) -> list[int] | None:
            answers.append(result(check))
            return answers[-1]

        monkeypatch.setattr(freshness.StatPass, "result", spy)
    if mode == "child-fails":
        monkeypatch.setattr(sys, "executable", shutil.which("false") or "/nonexistent/python")
    yield mode
    if mode == "child":
        assert answers, "no resume was checked by a child"
        assert None not in answers, "the child failed"
    else:
        assert all(answer is None for answer in answers)


def ok_outputs(out: Path) -> list[Path]:
    """The stored file of each ok key, in manifest order."""
    latest = read_latest(out / "manifest.jsonl").values()
    return [out / r["outputs"][0]["path"] for r in latest if r["status"] == "ok"]


def set_mtime(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns))


def age(paths: list[Path], by_ns: int = HOUR_NS) -> None:
    """Move mtimes into the past, as on files written well before the run."""
    for path in paths:
        set_mtime(path, path.stat().st_mtime_ns - by_ns)


def png_of_size(size: int, color: tuple[int, int, int]) -> bytes:
    """A valid PNG of exactly `size` bytes: a flat image padded with a text chunk."""
    plain = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(plain, format="PNG")
    pad = size - len(plain.getvalue()) - 12 - len(b"pad\x00")  # chunk: length, type, crc
    assert pad >= 0, "the original image is too small to imitate"
    info = PngImagePlugin.PngInfo()
    info.add_text("pad", "x" * pad)
    padded = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(padded, format="PNG", pnginfo=info)
    assert len(padded.getvalue()) == size
    return padded.getvalue()


async def verify_run(path: Path) -> JobResult:
    return await run_job(load_spec(path), spec_path=path, install_signals=False, verify=True)


async def test_deleted_and_replaced_outputs_run_again_and_nothing_else(
    tmp_path: Path, stat_check: str
) -> None:
    """One output deleted, another overwritten by a different valid image of the same
    size: the next plain run redoes exactly those two items."""
    async with MockServer(MockConfig()) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=5, size="64x64")
        await run_spec(path)
        out = tmp_path / "out"
        files = ok_outputs(out)
        files[0].unlink()
        original = files[1].read_bytes()
        files[1].write_bytes(png_of_size(len(original), (200, 10, 10)))
        result = await run_spec(path)
    summary = result.summary
    assert (summary["requests"], summary["ok"], summary["skipped_ok"]) == (2, 2, 3)
    assert summary["rehashed_images"] == 1  # the replaced one: its stat differed
    assert files[1].read_bytes() != png_of_size(len(original), (200, 10, 10))
    assert_outputs_valid(out)


async def test_same_size_and_mtime_is_trusted_and_verify_catches_it(tmp_path: Path) -> None:
    """Different bytes under the recorded size and mtime are trusted by a plain run (a
    stat only, as git does); `run --verify` re-hashes every file and redoes that item."""
    async with MockServer(MockConfig()) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=3, size="64x64")
        await run_spec(path)
        victim = ok_outputs(tmp_path / "out")[0]
        before = victim.stat()
        victim.write_bytes(png_of_size(before.st_size, (10, 200, 10)))
        set_mtime(victim, before.st_mtime_ns)
        plain = await run_spec(path)
        verified = await verify_run(path)
    assert (plain.summary["requests"], plain.summary["rehashed_images"]) == (0, 0)
    assert (verified.summary["requests"], verified.summary["rehashed_images"]) == (1, 3)
    assert_outputs_valid(tmp_path / "out")


async def test_touched_output_is_rehashed_once_then_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, stat_check: str
) -> None:
    """An output whose mtime changed but whose bytes did not is not paid for again: it
    is re-hashed once (the run says so), and the run after that reads it no more."""
    async with MockServer(MockConfig()) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=4, size="64x64")
        await run_spec(path)
        touched = ok_outputs(tmp_path / "out")[2]
        age([touched])
        with caplog.at_level(logging.WARNING, logger="pipeline.engine"):
            first = await run_spec(path)
        second = await run_spec(path)
    assert (first.summary["requests"], first.summary["rehashed_images"]) == (0, 1)
    assert "re-hashed 1 images whose size or mtime changed" in caplog.text
    assert "all matched" in caplog.text
    assert (second.summary["requests"], second.summary["rehashed_images"]) == (0, 0)
    assert second.summary["skipped_ok"] == 4


async def test_copy_without_mtimes_is_rehashed_once_and_cache_is_disposable(
    tmp_path: Path, stat_check: str
) -> None:
    """Every mtime changed (a copy that did not keep them): one run re-hashes all and
    pays nothing; deleting the state cache only costs that re-hash once more."""
    async with MockServer(MockConfig()) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=4, size="64x64")
        await run_spec(path)
        out = tmp_path / "out"
        age(ok_outputs(out))
        copied = await run_spec(path)
        settled = await run_spec(path)
        cache_path(out / "manifest.jsonl").unlink()
        without_cache = await run_spec(path)
        rebuilt = await run_spec(path)
    counts = [
        (r.summary["requests"], r.summary["rehashed_images"])
        for r in (copied, settled, without_cache, rebuilt)
    ]
    assert counts == [(0, 4), (0, 0), (0, 4), (0, 0)]


async def test_manifest_without_mtimes_resumes_after_one_rehash(
    tmp_path: Path, stat_check: str
) -> None:
    """An OUT written before mtimes were recorded resumes without paying: its files are
    re-hashed once, then trusted by their stat."""
    async with MockServer(MockConfig()) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=3, size="64x64")
        await run_spec(path)
        out = tmp_path / "out"
        manifest = out / "manifest.jsonl"
        lines = [json.loads(line) for line in manifest.read_text().splitlines()]
        for line in lines:
            for output in line.get("outputs") or ():
                output.pop("mtime_ns", None)
        manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
        cache_path(manifest).unlink()
        age(ok_outputs(out))
        first = await run_spec(path)
        second = await run_spec(path)
    assert (first.summary["requests"], first.summary["rehashed_images"]) == (0, 3)
    assert (second.summary["requests"], second.summary["rehashed_images"]) == (0, 0)


@pytest.mark.parametrize("junk", [b"", b"\x00garbage\xff" * 50, b'{"format": 4}\n'])
async def test_corrupt_caches_are_ignored(tmp_path: Path, junk: bytes) -> None:
    """A damaged state cache or input hash store is ignored: the run resumes as usual."""
    async with MockServer(MockConfig()) as server:
        path = folder_job(tmp_path, server.base_url, photos=2)
        await run_spec(path)
        out = tmp_path / "out"
        cache_path(out / "manifest.jsonl").write_bytes(junk)
        (out / INPUT_HASHES_NAME).write_bytes(junk)
        result = await run_spec(path)
        again = await run_spec(path)
    assert (result.exit_code, result.summary["requests"], result.summary["skipped_ok"]) == (0, 0, 2)
    assert (again.summary["requests"], again.summary["skipped_ok"]) == (0, 2)


# ------------------------------------------------------------------------ inputs


def folder_job(tmp_path: Path, base_url: str, *, photos: int) -> Path:
    """A job over a folder of `photos` PNG inputs, written an hour ago."""
    folder = tmp_path / "photos"
    folder.mkdir(exist_ok=True)
    for i in range(photos):
        photo = folder / f"p{i}.png"
        Image.new("RGB", (24, 24), (40 * i, 90, 160)).save(photo, format="PNG")
    age(sorted(folder.iterdir()))
    path = write_job_spec(tmp_path, base_url, prompts=1, size="64x64")
    spec: dict[str, Any] = yaml.safe_load(path.read_text())
    spec["sources"] = [{"name": "photos", "prompt": "the same scene at dusk", "folder": "photos"}]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def same_size_other_bytes(path: Path) -> None:
    """Change the last byte of `path` and put its mtime back (a stat cannot tell)."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    set_mtime(path, before.st_mtime_ns)


async def test_untouched_inputs_are_not_read_and_edited_ones_run_again(tmp_path: Path) -> None:
    """A resume takes input hashes from OUT by path, size and mtime: an input changed
    behind an unchanged stat keeps its key (it was not read), an edited one runs again."""
    async with MockServer(MockConfig()) as server:
        path = folder_job(tmp_path, server.base_url, photos=3)
        first = await run_spec(path)
        photos = sorted((tmp_path / "photos").iterdir())
        same_size_other_bytes(photos[0])
        untouched = await run_spec(path)
        Image.new("RGB", (24, 24), (1, 2, 3)).save(photos[1], format="PNG")  # a real edit
        edited = await run_spec(path)
    assert first.summary["requests"] == 3
    assert (untouched.summary["requests"], untouched.summary["skipped_ok"]) == (0, 3)
    assert (edited.summary["requests"], edited.summary["skipped_ok"]) == (1, 2)
    stored = json.loads((tmp_path / "out" / INPUT_HASHES_NAME).read_text())
    assert set(stored["files"]) == {str(p) for p in photos} - {str(photos[1])}  # just edited


async def test_deleted_input_store_rehashes_inputs_and_resumes(tmp_path: Path) -> None:
    """Without its input hash store OUT still resumes: the inputs are hashed again."""
    async with MockServer(MockConfig()) as server:
        path = folder_job(tmp_path, server.base_url, photos=2)
        await run_spec(path)
        store = tmp_path / "out" / INPUT_HASHES_NAME
        assert store.is_file()
        store.unlink()
        photo = sorted((tmp_path / "photos").iterdir())[0]
        same_size_other_bytes(photo)  # now read again: its key changes
        result = await run_spec(path)
    assert (result.summary["requests"], result.summary["skipped_ok"]) == (1, 1)
    assert store.is_file()


def test_hash_cache_does_not_store_a_hash_taken_right_after_a_write(tmp_path: Path) -> None:
    """A file hashed within the mtime granularity of its last write could change again
    unseen: its hash is used but not stored; an older file's is."""
    fresh, old = tmp_path / "fresh.png", tmp_path / "old.png"
    fresh.write_bytes(b"fresh")
    old.write_bytes(b"old")
    age([old])
    store = tmp_path / "out" / INPUT_HASHES_NAME
    store.parent.mkdir()
    cache = HashCache(store, clock_ns=time.time_ns)
    assert cache.sha256(fresh) == hashlib.sha256(b"fresh").hexdigest()
    assert cache.sha256(old) == hashlib.sha256(b"old").hexdigest()
    cache.save()
    assert set(json.loads(store.read_text())["files"]) == {str(old)}


def test_an_unwritable_input_store_never_fails(tmp_path: Path) -> None:
    """Something in the way of the store (a folder of that name): hashing still works."""
    photo = tmp_path / "p.png"
    photo.write_bytes(b"bytes")
    store = tmp_path / INPUT_HASHES_NAME
    store.mkdir()
    cache = HashCache(store)
    assert cache.sha256(photo) == hashlib.sha256(b"bytes").hexdigest()
    cache.save()
    assert store.is_dir()
