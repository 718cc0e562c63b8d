"""Verified atomic image files, temp-file sweeping and OUT writability checks."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import struct
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageFile

from pipeline.errors import OutputError, TransientError
from pipeline.records import OutputFile
from pipeline.store.files import (
    TEMP_DIR,
    ImageInfo,
    StoredFiles,
    check_writable,
    output_path,
    store_image,
    verify_image,
)
from pipeline.store.layout import write_json_atomic

KEY = "3f2a" * 16


def _image(fmt: str = "PNG", size: tuple[int, int] = (32, 24), *, noisy: bool = False) -> bytes:
    """A small image; `noisy` makes it incompressible so truncation hits pixel data."""
    if noisy:
        image = Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3))
    else:
        image = Image.new("RGB", size, (200, 90, 30))
    buf = BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size in its header without the pixels: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_middle_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


@pytest.mark.parametrize(
    ("fmt", "ext"),
    [
        pytest.param("PNG", "png", id="png"),
        pytest.param("JPEG", "jpg", id="jpeg"),
        pytest.param("WEBP", "webp", id="webp"),
    ],
)
def test_verify_image_reports_format_and_size(fmt: str, ext: str) -> None:
    """A sound PNG, JPEG or WebP is accepted with its file extension and size."""
    assert verify_image(_image(fmt, (40, 30))) == ImageInfo(format=ext, width=40, height=30)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"<html>503 Service Unavailable</html>", id="not-an-image"),
        pytest.param(_truncated(_image("PNG", (64, 64), noisy=True)), id="truncated-png"),
        pytest.param(_truncated(_image("JPEG", (64, 64), noisy=True)), id="truncated-jpeg"),
        pytest.param(_flip_middle_byte(_image("PNG", (64, 64), noisy=True)), id="corrupt-png"),
        pytest.param(_image("GIF"), id="unsupported-gif"),
        pytest.param(_png_header_only(100_000, 100_000), id="bomb-over-pillow-limit"),
        pytest.param(_png_header_only(10_000, 10_000), id="bomb-near-pillow-limit"),
    ],
)
def test_verify_image_refuses_bad_bytes_as_retryable_bad_image(data: bytes) -> None:
    """Empty, truncated, corrupt, unsupported or bomb images are a retryable bad_image error."""
    with pytest.raises(TransientError) as caught:
        verify_image(data)
    assert caught.value.kind == "bad_image"


def test_verify_image_refuses_more_pixels_than_allowed() -> None:
    """An image larger than the pixel limit is refused before its pixels are decoded."""
    with pytest.raises(TransientError, match="pixel limit") as caught:
        verify_image(_image("PNG", (20, 20)), max_pixels=399)
    assert caught.value.kind == "bad_image"


def test_verify_image_leaves_pillow_settings_alone() -> None:
    """Checking images never loosens Pillow's global truncation or bomb settings."""
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    with pytest.raises(TransientError):
        verify_image(_truncated(_image("PNG", (64, 64), noisy=True)))
    verify_image(_image())
    assert before == (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_output_path_follows_the_contract_layout(tmp_path: Path) -> None:
    """Images go to OUT/images/<source>/<key16>-<index>.<ext>."""
    path = output_path(tmp_path, "maple-grid", KEY, 2, "png")
    assert path == tmp_path / "images" / "maple-grid" / f"{KEY[:16]}-2.png"


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("..", id="dotdot"),
        pytest.param(".", id="dot"),
        pytest.param("../elsewhere", id="parent-path"),
        pytest.param("a/b", id="slash"),
        pytest.param("/etc", id="absolute"),
        pytest.param("", id="empty"),
    ],
)
def test_output_path_refuses_source_names_that_escape_out(tmp_path: Path, source: str) -> None:
    """A source name that is not a plain folder name never places a file outside OUT."""
    with pytest.raises(OutputError, match="cannot name a folder"):
        output_path(tmp_path, source, KEY, 0, "png")


def _leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.tmp") if p.is_file())


def test_store_image_writes_verified_file_and_describes_it(tmp_path: Path) -> None:
    """A stored image lands at its contract path with its hash, size, mtime, url and id
    recorded."""
    data = _image("PNG", (48, 32))
    out = store_image(
        tmp_path, source="maple-grid", key=KEY, index=0, data=data, url="https://x/1", id="i1"
    )
    assert out == OutputFile(
        path=f"images/maple-grid/{KEY[:16]}-0.png",
        sha256=hashlib.sha256(data).hexdigest(),
        width=48,
        height=32,
        url="https://x/1",
        id="i1",
        bytes=len(data),
        mtime_ns=(tmp_path / out.path).stat().st_mtime_ns,
    )
    assert (tmp_path / out.path).read_bytes() == data
    assert _leftovers(tmp_path) == []


def test_store_image_uses_the_decoded_format_for_the_extension(tmp_path: Path) -> None:
    """A JPEG is stored as .jpg whatever the caller expected."""
    out = store_image(tmp_path, source="s", key=KEY, index=1, data=_image("JPEG"))
    assert out.path.endswith("-1.jpg")


def test_store_image_refuses_bad_bytes_without_writing(tmp_path: Path) -> None:
    """Bytes that do not decode raise bad_image for the item and leave no file behind."""
    with pytest.raises(TransientError) as caught:
        store_image(tmp_path, source="s", key=KEY, index=0, data=b"\x89PNG\r\n\x1a\nbroken")
    assert (caught.value.kind, caught.value.item_key) == ("bad_image", KEY)
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.parametrize(
    "code", [pytest.param(errno.ENOSPC, id="enospc"), pytest.param(errno.EDQUOT, id="edquot")]
)
def test_store_image_disk_full_tells_the_user_to_free_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """A full disk mid-write leaves neither a temp nor a partial file and says how to resume."""
    real_write = os.write

    def half_then_full(fd: int, data: Any) -> int:
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(code, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)  # the disk fills mid-write
    with pytest.raises(OutputError, match=r"disk full writing .*run the same command again"):
        store_image(tmp_path, source="s", key=KEY, index=0, data=_image())
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_store_image_failed_rename_keeps_previous_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure before the rename keeps the old final file whole and removes the temp."""
    old = store_image(tmp_path, source="s", key=KEY, index=0, data=_image("PNG", (10, 10)))

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OutputError, match="cannot write"):
        store_image(tmp_path, source="s", key=KEY, index=0, data=_image("PNG", (20, 20)))
    assert intact(tmp_path, [old], verify=True)
    assert _leftovers(tmp_path) == []


def test_store_image_replaces_a_damaged_file(tmp_path: Path) -> None:
    """Storing again over a damaged file leaves the new, intact image in place."""
    first = store_image(tmp_path, source="s", key=KEY, index=0, data=_image())
    (tmp_path / first.path).write_bytes(b"garbage")
    second = store_image(tmp_path, source="s", key=KEY, index=0, data=_image())
    assert intact(tmp_path, [second], verify=True)


def intact(out_dir: Path, stored: list[OutputFile], *, verify: bool = False) -> bool:
    """What a fresh resume (a new listing of OUT) says of `stored`."""
    hashes = [o.sha256 for o in stored] if verify else None
    return StoredFiles(out_dir).intact([o.path for o in stored], hashes)


def test_stored_files_accepts_files_as_recorded(tmp_path: Path) -> None:
    """Files that exist (and, with --verify, have their recorded hash) are intact."""
    stored = [
        store_image(tmp_path, source="s", key=KEY, index=i, data=_image("PNG", (8 + i, 8)))
        for i in range(2)
    ]
    assert intact(tmp_path, stored)
    assert intact(tmp_path, stored, verify=True)


def test_stored_files_detects_missing_file(tmp_path: Path) -> None:
    """A deleted output makes its item run again on resume."""
    stored = [
        store_image(tmp_path, source="s", key=KEY, index=i, data=_image("PNG", (8 + i, 8)))
        for i in range(2)
    ]
    (tmp_path / stored[1].path).unlink()
    assert not intact(tmp_path, stored)
    assert not intact(tmp_path, stored, verify=True)


def _flip_byte(data: bytes) -> bytes:
    return data[:-20] + bytes([data[-20] ^ 0xFF]) + data[-19:]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda data: data[:-10], id="truncated"),
        pytest.param(
            lambda data: data[:-20] + bytes([data[-20] ^ 0xFF]) + data[-19:], id="flipped"
        ),
    ],
)
def test_stored_files_verify_catches_changed_bytes(
    tmp_path: Path, change: Callable[[bytes], bytes]
) -> None:
    """A file changed in place passes the quick existence check (a file that exists is
    complete: it was fsynced before its rename) and fails --verify's hash check."""
    out = store_image(tmp_path, source="s", key=KEY, index=0, data=_image())
    path = tmp_path / out.path
    path.write_bytes(change(path.read_bytes()))
    assert intact(tmp_path, [out])
    assert not intact(tmp_path, [out], verify=True)


@pytest.mark.parametrize(
    "bad_path",
    [
        pytest.param("../elsewhere.png", id="parent"),
        pytest.param("images/../../elsewhere.png", id="dotdot-source"),
        pytest.param("/tmp/elsewhere.png", id="absolute"),
        pytest.param("elsewhere.png", id="top-level"),
        pytest.param("images/s/sub/abc-0.png", id="nested"),
        pytest.param("images/s", id="folder"),
    ],
)
def test_stored_files_refuses_paths_outside_image_folders(tmp_path: Path, bad_path: str) -> None:
    """A manifest path that does not name a file in OUT/images/<source>/ is never trusted."""
    out_dir = tmp_path / "out"
    (out_dir / "images" / "s" / "sub").mkdir(parents=True)
    for where in (tmp_path / "elsewhere.png", out_dir / "elsewhere.png"):
        where.write_bytes(b"x")
    (out_dir / "images" / "s" / "sub" / "abc-0.png").write_bytes(b"x")
    assert not StoredFiles(out_dir).intact([bad_path])


def test_stored_files_ignores_a_symlink_in_place_of_an_image(tmp_path: Path) -> None:
    """A symlink where an image should be does not count as the image."""
    out = store_image(tmp_path, source="s", key=KEY, index=0, data=_image())
    path = tmp_path / out.path
    target = tmp_path / "real.png"
    path.rename(target)
    path.symlink_to(target)
    assert not intact(tmp_path, [out])


def test_sweep_temp_files_removes_only_leftover_temps(tmp_path: Path) -> None:
    """Temp files from killed runs are deleted and counted; real files stay."""
    folder = tmp_path / "images" / "s"
    incoming = tmp_path / "images" / TEMP_DIR
    folder.mkdir(parents=True)
    incoming.mkdir()
    stored = folder / "0123456789abcdef-0.png"
    keep = [stored, incoming / "notes.tmp", tmp_path / "manifest.jsonl"]
    temps = [
        incoming / ".0123456789abcdef-0.png.1a2b3c4d.tmp",
        tmp_path / ".summary.json.5e6f7a8b.tmp",
    ]
    for path in keep + temps:
        path.write_bytes(b"x")
    files = StoredFiles(tmp_path)
    assert files.sweep_temp_files() == 2
    assert all(p.exists() for p in keep)
    assert not any(p.exists() for p in temps)
    assert files.intact(["images/s/0123456789abcdef-0.png"])
    (folder / ".0123456789abcdef-0.png.1a2b3c4d.tmp").write_bytes(b"x")
    assert not files.intact(["images/s/.0123456789abcdef-0.png.1a2b3c4d.tmp"])


def test_sweep_temp_files_on_fresh_out_is_zero(tmp_path: Path) -> None:
    """A new OUT without images has nothing to sweep."""
    assert StoredFiles(tmp_path / "new").sweep_temp_files() == 0


def test_write_json_atomic_replaces_content(tmp_path: Path) -> None:
    """summary.json is replaced whole, readable as JSON, with no temp file left."""
    path = tmp_path / "summary.json"
    path.write_text("old, not json")
    write_json_atomic(path, {"ok": 3, "name": "fall-leaves é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"ok": 3, "name": "fall-leaves é"}
    assert _leftovers(tmp_path) == []


def test_check_writable_creates_missing_out(tmp_path: Path) -> None:
    """A missing OUT (and its parents) is created, and the probe file is cleaned up."""
    out_dir = tmp_path / "runs" / "nightly"
    check_writable(out_dir)
    assert out_dir.is_dir()
    assert list(out_dir.iterdir()) == []


def test_check_writable_refuses_a_file(tmp_path: Path) -> None:
    """An OUT that is a regular file is refused with what to do."""
    out_dir = tmp_path / "out"
    out_dir.write_text("x")
    with pytest.raises(OutputError, match="is not a directory: pass another --out"):
        check_writable(out_dir)


def test_check_writable_refuses_a_path_under_a_file(tmp_path: Path) -> None:
    """An OUT that cannot be created is refused with what to do."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"cannot write to output dir .*pass another --out"):
        check_writable(tmp_path / "file" / "out")


def test_check_writable_refuses_read_only_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OUT where files cannot be created is refused before anything is spent."""

    real_open = os.open

    def denied(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if ".synthaug-probe" in str(path):  # what a read-only folder answers (root ignores modes)
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(OutputError, match=r"\(Permission denied\): fix its permissions"):
        check_writable(tmp_path)
