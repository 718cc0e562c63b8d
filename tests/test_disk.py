"""Disk and filesystem faults: kills mid-write, an unwritable OUT, a disk that fills up.

Each test leaves OUT the way the fault would and then checks what the user sees: a
clear refusal before any request, or a run that stops cleanly and resumes to completion
without paying again for what it already had.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from checks import ThreadedMock, assert_outputs_valid, run_spec, write_job_spec

from pipeline.cli import main
from pipeline.manifest.log import read_latest, read_lines
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.store.files import TEMP_DIR
from pipeline.store.layout import IMAGES_DIR, MANIFEST_NAME

KEY = "sk-disk-4a1f0e"

SpecWriter = Callable[..., Path]


@pytest.fixture
def write_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SpecWriter:
    """A roboflow-kind spec against `base_url`; `run` entries override the run section."""
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)

    def write(base_url: str, **overrides: Any) -> Path:
        defaults = {"name": "disk", "timeout_s": 5, "concurrency": 2, "max_attempts": 3}
        return write_job_spec(tmp_path, base_url, **{**defaults, **overrides})

    return write


run = run_spec


def temp_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.tmp") if p.is_file())


def ok_keys(out: Path) -> set[str]:
    return {k for k, r in read_latest(out / "manifest.jsonl").items() if r["status"] == "ok"}


# ------------------------------------------------------------ kills mid-write


def kill_before_ok_line(out: Path, victims: int, *, torn: bool, renamed: bool) -> list[str]:
    """Rewrite OUT as if the run died while finishing the last `victims` items.

    Their ``ok`` lines go (the last one torn halfway when `torn`), each leaves a
    half-written temp file where `store_image` writes them (OUT/images/.incoming), and
    its image is either already renamed into place (`renamed`) or not there yet.
    Returns the victims' keys.
    """
    manifest = out / "manifest.jsonl"
    lines = manifest.read_bytes().splitlines(keepends=True)
    ok_at = [i for i, raw in enumerate(lines) if json.loads(raw)["status"] == "ok"][-victims:]
    keys = [json.loads(lines[i])["key"] for i in ok_at]
    for i in ok_at:
        for output in json.loads(lines[i])["outputs"]:
            image = out / output["path"]
            data = image.read_bytes()
            temp = out / IMAGES_DIR / TEMP_DIR / f".{image.name}.dead{i:04d}.tmp"
            temp.parent.mkdir(exist_ok=True)
            temp.write_bytes(data[: len(data) // 2])
            if not renamed:
                image.unlink()
    kept = [raw for i, raw in enumerate(lines) if i not in ok_at]
    tail = lines[ok_at[-1]][: len(lines[ok_at[-1]]) // 2] if torn else b""
    manifest.write_bytes(b"".join(kept) + tail)
    (out / ".summary.json.dead.tmp").write_bytes(b'{"name": "di')
    return keys


@pytest.mark.parametrize(
    ("torn", "renamed"),
    [
        pytest.param(False, False, id="kill-before-rename"),
        pytest.param(False, True, id="kill-after-rename-before-ok-line"),
        pytest.param(True, True, id="kill-mid-ok-line"),
    ],
)
async def test_kill_mid_write_resumes_by_download_and_sweeps_temp_files(
    write_spec: SpecWriter, torn: bool, renamed: bool
) -> None:
    """A run killed while storing images resumes: temp files are swept, the images come
    from the recorded URLs (nothing generated again) and every file is valid."""
    async with MockServer(MockConfig()) as server:
        path = write_spec(server.base_url, prompts=6, n=2)
        assert (await run(path)).exit_code == 0
        out = path.parent / "out"
        victims = kill_before_ok_line(out, 3, torn=torn, renamed=renamed)
        assert temp_files(out)
        generations = server.stats.generations
        result = await run(path)
    assert result.exit_code == 0, result.summary
    assert server.stats.generations == generations
    assert result.summary["resumed_downloads"] == len(victims)
    assert temp_files(out) == []
    assert ok_keys(out) >= set(victims)
    assert len(ok_keys(out)) == 6
    assert_outputs_valid(out)


async def test_torn_line_is_fenced_so_the_next_line_parses(write_spec: SpecWriter) -> None:
    """After a torn last line, the lines the resumed run appends all parse."""
    async with MockServer(MockConfig()) as server:
        path = write_spec(server.base_url, prompts=4)
        await run(path)
        out = path.parent / "out"
        kill_before_ok_line(out, 2, torn=True, renamed=False)
        await run(path)
    raw = (out / "manifest.jsonl").read_bytes().splitlines()
    parsed = list(read_lines(out / "manifest.jsonl"))
    assert len(parsed) == len(raw) - 1  # only the torn line itself is dropped
    assert len(ok_keys(out)) == 4


# ------------------------------------------------------------ unwritable OUT


def cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    code = exit_info.value.code
    return code if isinstance(code, int) else 1


@pytest.mark.parametrize(
    ("out", "flag", "fragment"),
    [
        pytest.param("blocker/out", False, "cannot write to output dir", id="spec-out-under-file"),
        pytest.param("blocker", False, "is not a directory", id="spec-out-is-file"),
        pytest.param("out", True, "cannot write to output dir", id="flag-out-under-file"),
    ],
)
def test_unwritable_out_exits_2_before_any_request(
    write_spec: SpecWriter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    out: str,
    flag: bool,
    fragment: str,
) -> None:
    """An output dir that cannot be created or written (a path under a regular file:
    root ignores permissions) exits 2 with one line naming the dir, sending nothing."""
    (tmp_path / "blocker").write_text("a regular file\n")
    with ThreadedMock(MockConfig()) as mock:
        path = write_spec(mock.base_url, out=out)
        extra = ["--out", str(tmp_path / "blocker" / "deeper")] if flag else []
        code = cli("run", str(path), "--no-progress", "--no-grid", *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert fragment in err[0]
    assert "blocker" in err[0]
    assert mock.server.stats.requests == 0


# ------------------------------------------------------------ disk full


def fd_path(fd: int) -> str | None:
    """The file an open descriptor writes to (Linux), or None."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


class DiskFull:
    """Make the disk fill up after `k` images are written: from then on `os.write` to an
    image under `root` (or, with `everywhere`, to any file under `root` but the manifest)
    fails with ENOSPC, until `free()` is called. The fault is injected where a full disk
    raises it, at the OS call, so every layer above meets the real error."""

    def __init__(self, patch: pytest.MonkeyPatch, root: Path) -> None:
        self._left: int | None = None
        self._everywhere = False
        self._lock = threading.Lock()
        real_write = os.write

        def write(fd: int, data: Any) -> int:
            path = fd_path(fd)
            if path is not None and path.startswith(str(root)) and self._refuse(path):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        patch.setattr(os, "write", write)

    def fill_after(self, k: int, *, everywhere: bool = False) -> None:
        self._left, self._everywhere = k, everywhere

    def free(self) -> None:
        self._left = None

    def _refuse(self, path: str) -> bool:
        image = f"/{IMAGES_DIR}/" in path
        other = not path.endswith(MANIFEST_NAME)
        with self._lock:
            if self._left is None or not (image or (self._everywhere and other)):
                return False
            if self._left == 0:
                return True
            if image:
                self._left -= 1
            return False


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> DiskFull:
    """A disk with room for now; `fill_after(k)` fills it, `free()` empties it again."""
    return DiskFull(monkeypatch, tmp_path)


def assert_consistent(out: Path) -> None:
    """Every manifest line parses, every ok line's files are valid, no temp file is
    left, and an unnamed image can only belong to an item that is not ok yet (it is
    overwritten when that item completes)."""
    raw = (out / "manifest.jsonl").read_bytes().splitlines()
    assert len(list(read_lines(out / "manifest.jsonl"))) == len(raw)
    latest = read_latest(out / "manifest.jsonl")
    named = {out / o["path"] for r in latest.values() if r["status"] == "ok" for o in r["outputs"]}
    for path in named:
        assert path.is_file(), path
    assert temp_files(out) == []
    done = {key[:16] for key, r in latest.items() if r["status"] == "ok"}
    for path in (out / "images").rglob("*.*"):
        if path not in named:
            assert path.name.split("-")[0] not in done, f"stray copy of a done item: {path}"


@pytest.mark.parametrize("n", [pytest.param(1, id="n1"), pytest.param(2, id="n2")])
async def test_disk_full_stops_cleanly_and_resumes_without_paying_again(
    write_spec: SpecWriter, disk: DiskFull, n: int
) -> None:
    """ENOSPC mid-run stops the run (exit 3, stop_reason "disk", a "disk full" message),
    the manifest stays consistent, and once space returns the same command completes,
    downloading what was already generated instead of paying again."""
    async with MockServer(MockConfig(latency_s=0.01)) as server:
        path = write_spec(server.base_url, prompts=12, n=n, concurrency=3)
        out = path.parent / "out"
        disk.fill_after(5)
        first = await run(path)
        assert first.exit_code == 3
        assert first.stop_reason == "disk"
        assert first.message is not None
        assert "disk full" in first.message
        summary = json.loads((out / "summary.json").read_text())
        assert summary["stop_reason"] == "disk"
        assert 0 < summary["ok"] < 12
        assert_consistent(out)
        disk.free()
        second = await run(path)
    assert second.exit_code == 0, second.summary
    assert len(ok_keys(out)) == 12
    assert server.stats.duplicates == 0
    assert second.summary["resumed_downloads"] > 0
    assert_outputs_valid(out)


async def test_disk_full_leaves_no_unnamed_image(write_spec: SpecWriter, disk: DiskFull) -> None:
    """After a disk-full stop, OUT holds no image file the manifest does not name."""
    async with MockServer(MockConfig(latency_s=0.01)) as server:
        path = write_spec(server.base_url, prompts=12, n=2, concurrency=3)
        disk.fill_after(5)
        assert (await run(path)).exit_code == 3
    assert_outputs_valid(path.parent / "out")


async def test_disk_full_everywhere_still_exits_3(write_spec: SpecWriter, disk: DiskFull) -> None:
    """When summary.json cannot be written either, the run still ends with exit 3 and
    its disk-full message, and resumes once space returns."""
    async with MockServer(MockConfig(latency_s=0.01)) as server:
        path = write_spec(server.base_url, prompts=8, concurrency=2)
        disk.fill_after(3, everywhere=True)
        first = await run(path)
        assert first.exit_code == 3
        assert first.message is not None
        assert "disk full" in first.message
        disk.free()
        assert (await run(path)).exit_code == 0
    assert_outputs_valid(path.parent / "out")


async def test_disk_full_on_manifest_append_leaves_no_torn_line(
    write_spec: SpecWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest line the disk refuses halfway (ENOSPC) is cut back off: the run stops
    with exit 3, every line on disk parses, and the same command completes afterwards."""
    real_write = os.write
    left = {"lines": 5}

    def half_then_full(fd: int, data: Any) -> int:
        path = fd_path(fd)
        if path is None or not path.endswith(MANIFEST_NAME):
            return real_write(fd, data)
        if left["lines"] == 0:
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        left["lines"] -= 1
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    async with MockServer(MockConfig(latency_s=0.01)) as server:
        path = write_spec(server.base_url, prompts=10, concurrency=2)
        out = path.parent / "out"
        first = await run(path)
        assert (first.exit_code, first.stop_reason) == (3, "disk")
        raw = (out / "manifest.jsonl").read_bytes()
        assert raw.endswith(b"\n")
        assert len(list(read_lines(out / "manifest.jsonl"))) == len(raw.splitlines())
        left["lines"] = -1
        second = await run(path)
    assert second.exit_code == 0, second.summary
    assert len(ok_keys(out)) == 10
    assert server.stats.duplicates <= 2  # at most the items in flight when the disk filled
    assert_outputs_valid(out)
