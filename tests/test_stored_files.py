"""The resume check's view of OUT: which recorded files are stored with their recorded
stat (`StoredFiles.differing`, one pass over a whole job), and where images are written."""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from pipeline.manifest.freshness import StatPass, recorded_files
from pipeline.records import OutputFile
from pipeline.store.files import TEMP_DIR, Stat, StoredFiles, store_image

KEY = "5d0c" * 16


def png(color: tuple[int, int, int] = (30, 90, 200)) -> bytes:
    buf = BytesIO()
    Image.new("RGB", (16, 12), color).save(buf, format="PNG")
    return buf.getvalue()


def stored(out: Path, count: int) -> list[OutputFile]:
    """`count` images of one key stored under OUT the way a run stores them."""
    return [
        store_image(out, source="s", key=KEY, index=i, data=png((i, 90, 200))) for i in range(count)
    ]


def recorded(outputs: list[OutputFile]) -> tuple[list[str], list[Stat | None]]:
    return [o.path for o in outputs], [(o.bytes or 0, o.mtime_ns or 0) for o in outputs]


def test_untouched_files_do_not_differ(tmp_path: Path) -> None:
    """Files as their run stored them pass the check."""
    paths, stats = recorded(stored(tmp_path, 3))
    assert StoredFiles(tmp_path).differing(paths, stats) == []


def test_missing_and_changed_files_are_reported_by_index(tmp_path: Path) -> None:
    """A deleted file and a rewritten one (another size) are both found, and the pass
    goes on past a missing file to the ones after it."""
    outputs = stored(tmp_path, 4)
    paths, stats = recorded(outputs)
    (tmp_path / paths[1]).unlink()
    (tmp_path / paths[3]).write_bytes(png((1, 2, 3)) + b"tail")
    assert StoredFiles(tmp_path).differing(paths, stats) == [1, 3]


def test_same_size_new_mtime_differs(tmp_path: Path) -> None:
    """A file whose mtime moved (a copy, a touch) differs: the caller re-hashes it."""
    paths, stats = recorded(stored(tmp_path, 1))
    mtime = stats[0][1] - 10**9 if stats[0] else 0
    os.utime(tmp_path / paths[0], ns=(mtime, mtime))
    assert StoredFiles(tmp_path).differing(paths, stats) == [0]


@pytest.mark.parametrize(
    "bad_path",
    [
        pytest.param("../elsewhere-0.png", id="parent"),
        pytest.param("images/../elsewhere-0.png", id="dotdot-source"),
        pytest.param("images/s/../s/abcd-0.png", id="dotdot-inside"),
        pytest.param("/tmp/abcd-0.png", id="absolute"),
        pytest.param("abcd-0.png", id="top-level"),
        pytest.param("images/s/sub/abcd-0.png", id="nested"),
        pytest.param("images/s", id="folder"),
    ],
)
def test_paths_outside_the_image_folders_never_count(tmp_path: Path, bad_path: str) -> None:
    """A manifest path that does not name an image in OUT/images/<source>/ counts as
    missing even when a file with its recorded stat is there."""
    out = tmp_path / "out"
    (out / "images" / "s" / "sub").mkdir(parents=True)
    for where in (
        tmp_path / "abcd-0.png",
        tmp_path / "elsewhere-0.png",
        out / "abcd-0.png",
        out / "images" / "s" / "abcd-0.png",
        out / "images" / "s" / "sub" / "abcd-0.png",
    ):
        where.write_bytes(b"x")
    target = (out / bad_path) if not bad_path.startswith("/") else Path(bad_path)
    info = os.stat(target) if target.exists() else None
    stat = (info.st_size, info.st_mtime_ns) if info else (1, 0)
    files = StoredFiles(out)
    assert files.differing([bad_path], [stat]) == [0]
    assert files.stat(bad_path) is None


def test_a_symlink_with_the_recorded_stat_never_counts(tmp_path: Path) -> None:
    """A symlink in place of an image counts as missing, even with the image's stat."""
    paths, _ = recorded(stored(tmp_path, 1))
    image = tmp_path / paths[0]
    target = tmp_path / "real.png"
    image.rename(target)
    image.symlink_to(target)
    link = os.lstat(image)
    assert StoredFiles(tmp_path).differing(paths, [(link.st_size, link.st_mtime_ns)]) == [0]


def test_a_symlinked_source_folder_never_counts(tmp_path: Path) -> None:
    """Images reached through a symlinked OUT/images/<source> folder count as missing."""
    elsewhere = tmp_path / "elsewhere"
    paths, stats = recorded(stored(elsewhere, 1))
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "s").symlink_to(elsewhere / "images" / "s")
    assert StoredFiles(out).differing(paths, stats) == [0]
    assert StoredFiles(elsewhere).differing(paths, stats) == []


def test_a_missing_out_has_every_file_missing(tmp_path: Path) -> None:
    """With no OUT at all, nothing recorded is stored."""
    files = StoredFiles(tmp_path / "gone")
    assert files.differing(["images/s/abcd-0.png", "images/s/abcd-1.png"], [(1, 1)] * 2) == [0, 1]


def test_images_are_written_through_the_incoming_folder(tmp_path: Path) -> None:
    """A stored image leaves no temp file behind, and the temp files a killed run left in
    OUT/images/.incoming and OUT are swept (the images stay)."""
    outputs = stored(tmp_path, 2)
    incoming = tmp_path / "images" / TEMP_DIR
    assert incoming.is_dir()
    assert list(incoming.iterdir()) == []
    leftovers = [incoming / f".{KEY[:16]}-5.png.0badf00d.tmp", tmp_path / ".job.json.1234.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    files = StoredFiles(tmp_path)
    assert files.sweep_temp_files() == 2
    assert not any(path.exists() for path in leftovers)
    assert files.differing(*recorded(outputs)) == []


def test_a_child_process_finds_what_the_in_process_pass_finds(tmp_path: Path) -> None:
    """The stat pass run by a child process reports the same missing, changed, refused
    and symlinked files as the pass in this process, over several chunks."""
    outputs = stored(tmp_path, 6)
    paths, stats = recorded(outputs)
    finished = {
        f"k{i}": ("s", (path,), (stat,))
        for i, (path, stat) in enumerate(zip(paths, stats, strict=True))
    }
    finished["escaped"] = ("s", ("../abcd-0.png",), ((1, 1),))
    (tmp_path / paths[1]).unlink()
    (tmp_path / paths[2]).write_bytes(b"other bytes")
    (tmp_path / paths[4]).rename(tmp_path / "real.png")
    (tmp_path / paths[4]).symlink_to(tmp_path / "real.png")
    files = StoredFiles(tmp_path)
    expected = files.differing(*recorded_files(finished))
    assert expected == [1, 2, 4, 6]
    check = StatPass.start(finished, files, tmp_path, chunk_keys=2)
    assert check is not None
    assert check.result() == expected
