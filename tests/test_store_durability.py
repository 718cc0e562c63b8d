"""Stored images are durable before the manifest line naming them is: file, rename, folder, line."""

from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from io import BytesIO
from pathlib import Path

import pytest
from checks import bare_record, run_spec, write_job_spec
from PIL import Image

from pipeline.errors import TransientError
from pipeline.manifest.writer import ManifestWriter
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.store import files as outputs
from pipeline.store.files import FolderSync, store_image, verify_image
from pipeline.store.layout import write_json_atomic

KEY = "ab" * 32


def _png(size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", size, (200, 90, 20)).save(buffer, "PNG")
    return buffer.getvalue()


class Journal:
    """Records file-system calls in order (full paths): fsyncs of files, folders, the
    manifest (preceded by the files its new lines name), and renames."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, manifest: Path) -> None:
        self.events: list[tuple[str, str]] = []
        self._manifest = manifest
        self._lines_seen = 0
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
            kind = "folder" if target.is_dir() else "file"
            if target == self._manifest.resolve():
                kind = "manifest"
                self._note_new_lines()
            self.events.append((kind, str(target)))
            real_fsync(fd)

        def replace(src: str | Path, dst: str | Path) -> None:
            self.events.append(("rename", str(Path(dst).resolve())))
            real_replace(src, dst)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def _note_new_lines(self) -> None:
        """A ("line", file) event for each file named by manifest lines written since the
        last manifest fsync: what this fsync is about to make durable."""
        lines = self._manifest.read_text(encoding="utf-8").splitlines()
        for raw in lines[self._lines_seen :]:
            outputs = json.loads(raw).get("outputs") or ()
            for output in (o for o in outputs if isinstance(o, dict)):
                target = (self._manifest.parent / output["path"]).resolve()
                self.events.append(("line", str(target)))
        self._lines_seen = len(lines)

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir(), reason="maps descriptors to paths through /proc"
)


@needs_proc
def test_folder_is_fsynced_after_the_rename_and_before_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """file data -> rename -> folder fsync -> manifest fsync, one folder fsync for many images."""
    manifest = tmp_path / "manifest.jsonl"
    folders = FolderSync()
    with ManifestWriter(manifest, fsync_interval_s=3600.0) as writer:
        writer.add_sync_hook(folders.flush)
        journal = Journal(monkeypatch, manifest)
        stored = [
            store_image(tmp_path, source="s", key=KEY, index=i, data=_png(), folders=folders)
            for i in range(3)
        ]
        assert "folder" not in journal.kinds()  # deferred, not per image
        for output in stored:
            writer.append(bare_record(KEY, outputs=(output,)))
        writer.sync()
    kinds = journal.kinds()
    # the folder is fsynced before the manifest fsync that makes the 3 lines naming its
    # files durable
    assert kinds == ["file", "rename"] * 3 + ["folder"] + ["line"] * 3 + ["manifest"]
    assert journal.events[-5] == ("folder", str((tmp_path / "images" / "s").resolve()))


@needs_proc
def test_without_a_folder_sync_each_image_fsyncs_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Called on its own, store_image makes its rename durable before returning."""
    journal = Journal(monkeypatch, tmp_path / "manifest.jsonl")
    store_image(tmp_path, source="s", key=KEY, index=0, data=_png())
    write_json_atomic(tmp_path / "summary.json", {"ok": 1})
    assert journal.kinds() == ["file", "rename", "folder"] * 2


def test_manifest_fsync_waits_for_the_folder_hook(tmp_path: Path) -> None:
    """The writer runs its sync hooks before its own fsync, whether the interval or close syncs."""
    order: list[str] = []
    folders = FolderSync(fsync_dir=lambda folder: order.append(f"folder {folder.name}"))
    with ManifestWriter(
        tmp_path / "manifest.jsonl",
        fsync_interval_s=0.0,
        fsync=lambda _fd: order.append("manifest"),
    ) as writer:
        writer.add_sync_hook(folders.flush)
        folders.mark(tmp_path / "images" / "a")
        folders.mark(tmp_path / "images" / "a")
        writer.append(bare_record(KEY))  # interval 0: syncs now
        folders.mark(tmp_path / "images" / "b")
        writer.append(bare_record(KEY))
    assert order == ["folder a", "manifest", "folder b", "manifest"]


def test_a_failed_folder_fsync_is_retried_at_the_next_sync(tmp_path: Path) -> None:
    """A folder whose fsync failed stays pending, so the next flush makes it durable."""
    synced: list[str] = []
    failures = [OSError(errno.EIO, "Input/output error")]

    def fsync_dir(folder: Path) -> None:
        if failures:
            raise failures.pop()
        synced.append(folder.name)

    folders = FolderSync(fsync_dir=fsync_dir)
    folders.mark(tmp_path / "a")
    with pytest.raises(OSError, match="Input/output"):
        folders.flush()
    folders.flush()
    folders.flush()
    assert synced == ["a"]


@needs_proc
async def test_a_run_never_fsyncs_a_line_before_the_folder_of_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a real run, each manifest fsync follows a folder fsync for every file its lines name."""
    monkeypatch.setenv("ROBOFLOW_API_KEY", "sk-durable-3c9e")
    out = tmp_path / "out"
    journal = Journal(monkeypatch, out / "manifest.jsonl")
    async with MockServer(MockConfig(latency_s=0.005)) as server:
        path = write_job_spec(tmp_path, server.base_url, prompts=8, n=2, fsync_interval_s=0)
        result = await run_spec(path)
    assert result.exit_code == 0
    events = journal.events
    manifest_syncs = [i for i, (kind, _) in enumerate(events) if kind == "manifest"]
    named = [(i, target) for i, (kind, target) in enumerate(events) if kind == "line"]
    assert len(named) == 16
    assert manifest_syncs[-1] > named[-1][0]
    for sync_at in manifest_syncs:
        for line_at, target in named:
            if line_at > sync_at:
                break
            renamed_at = max(
                i for i, event in enumerate(events[:line_at]) if event == ("rename", target)
            )
            folder = ("folder", str(Path(target).parent))
            assert folder in events[renamed_at:sync_at], f"{target} not durable at fsync {sync_at}"


def _with_bad_crc(data: bytes, chunk: bytes) -> bytes:
    """`data` with the CRC of its first `chunk` chunk changed, every other byte intact."""
    pos = 8
    while True:
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == chunk:
            crc_at = pos + 8 + length
            (crc,) = struct.unpack(">I", data[crc_at : crc_at + 4])
            return data[:crc_at] + struct.pack(">I", crc ^ 1) + data[crc_at + 4 :]
        pos += 12 + length


@pytest.mark.parametrize(
    "chunk", [pytest.param(b"IDAT", id="pixel-data"), pytest.param(b"IHDR", id="header")]
)
def test_a_png_with_a_wrong_crc_is_refused(chunk: bytes) -> None:
    """A PNG whose pixels decode but whose chunk CRC is wrong is still refused as bad_image."""
    data = _png()
    assert zlib.crc32(data) != zlib.crc32(_with_bad_crc(data, chunk))
    with pytest.raises(TransientError) as caught:
        verify_image(_with_bad_crc(data, chunk))
    assert caught.value.kind == "bad_image"
    assert verify_image(data).width == 16


def test_store_creates_its_folder_on_first_use(tmp_path: Path) -> None:
    """The first image of a source creates OUT/images/<source>; later ones reuse it."""
    first = store_image(tmp_path / "new-out", source="s", key=KEY, index=0, data=_png())
    second = store_image(tmp_path / "new-out", source="s", key=KEY, index=1, data=_png())
    assert (tmp_path / "new-out" / first.path).is_file()
    assert (tmp_path / "new-out" / second.path).is_file()
    assert first.path.split("/")[0] == outputs.IMAGES_DIR
