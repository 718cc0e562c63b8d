"""`synthaug export`: the ok, labelled, unflagged outputs of an OUT as a YOLO, COCO or
Pascal VOC dataset, checked from outside by reading it back with supervision's loaders."""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from checks import bare_record
from PIL import Image

from pipeline.cli import main
from pipeline.records import (
    ErrorInfo,
    ItemRecord,
    ItemStatus,
    LabelRecord,
    OutputFile,
    Prediction,
)

with warnings.catch_warnings():
    # without OpenCV, supervision warns that it decodes with Pillow (all these tests need)
    warnings.filterwarnings("ignore", message="OpenCV", category=UserWarning)
    import supervision as sv

W, H = 64, 48
MODEL = "leaves/3"
MISSING_EXTRA = "synthaug export needs the export extra: pip install 'synthaug[export]'"

Corners = tuple[float, float, float, float]


def cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    code = exit_info.value.code
    return code if isinstance(code, int) else 1


def key_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def pred(xmin: float, ymin: float, xmax: float, ymax: float, cls: str) -> Prediction:
    """A prediction given by its corners, stored in the API's centre form."""
    return Prediction(
        x=(xmin + xmax) / 2,
        y=(ymin + ymax) / 2,
        width=xmax - xmin,
        height=ymax - ymin,
        class_name=cls,
        confidence=0.9,
    )


@dataclass
class Out:
    """An OUT folder under construction, and what an export of it must hold."""

    root: Path
    records: list[ItemRecord]
    expected: dict[str, list[tuple[Corners, str]]]  # exported file name -> boxes

    def add(
        self,
        name: str,
        *outputs: tuple[str, LabelRecord | None, tuple[str, ...], bool],
        status: ItemStatus = "ok",
        source: str = "s",
        key: str | None = None,
    ) -> list[str]:
        """Add an item with `outputs` as (ext, labels, flags, write the file); returns
        their stored paths."""
        key = key or key_of(name)
        files = []
        paths = []
        for index, (ext, labels, flags, write) in enumerate(outputs):
            rel = f"images/{source}/{key[:16]}-{index}.{ext}"
            path = self.root / rel
            data = b""
            if write:
                path.parent.mkdir(parents=True, exist_ok=True)
                colour = tuple(hashlib.sha256(rel.encode()).digest()[:3])
                Image.new("RGB", (W, H), colour).save(path, quality=90)
                data = path.read_bytes()
            files.append(
                OutputFile(
                    path=rel,
                    sha256=hashlib.sha256(data).hexdigest(),
                    width=W,
                    height=H,
                    bytes=len(data),
                    flags=flags,
                    labels=labels,
                )
            )
            paths.append(rel)
        self.records.append(bare_record(key, status, source=source, outputs=tuple(files)))
        return paths

    def expect(self, rel: str, *boxes: tuple[Corners, str]) -> None:
        self.expected[Path(rel).name] = list(boxes)

    def write(self) -> Path:
        lines = "".join(json.dumps(r.to_json()) + "\n" for r in self.records)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "manifest.jsonl").write_text(lines)
        return self.root


def labels(*predictions: Prediction) -> LabelRecord:
    return LabelRecord(model=MODEL, predictions=predictions)


@pytest.fixture
def out(tmp_path: Path) -> Out:
    """An OUT holding every case an export sorts: exported with boxes, a negative example,
    flagged, unlabelled, failed labelling, a missing file, items not ok."""
    o = Out(tmp_path / "out", [], {})
    a = [pred(4, 6, 30, 40, "leaf"), pred(40.5, 2.25, 60, 20.75, "stem")]
    b = [pred(1, 1, 20, 20, "leaf"), pred(22, 10, 63, 47, "leaf"), pred(5, 25, 15, 45, "bug")]
    a0, a1 = o.add("a", ("png", labels(*a), (), True), ("png", labels(), (), True))
    (b0,) = o.add("b", ("jpg", labels(*b), (), True), source="t")
    o.expect(a0, *((p.corners(), p.class_name) for p in a))
    o.expect(a1)  # labelled, nothing found: a negative example
    o.expect(b0, *((p.corners(), p.class_name) for p in b))
    o.add("flagged", ("png", labels(pred(1, 1, 9, 9, "leaf")), ("duplicate",), True))
    o.add("unlabelled", ("png", None, (), True))
    failed = LabelRecord(model=MODEL, error=ErrorInfo("http_status", 500, "boom"))
    o.add("label-failed", ("png", failed, (), True))
    o.add("missing", ("png", labels(pred(1, 1, 9, 9, "leaf")), (), False))
    o.add("failed", status="failed")
    o.write()
    return o


def load_yolo(folder: Path) -> sv.DetectionDataset:
    return sv.DetectionDataset.from_yolo(
        images_directory_path=str(folder / "images"),
        annotations_directory_path=str(folder / "labels"),
        data_yaml_path=str(folder / "data.yaml"),
    )


def load_coco(folder: Path) -> sv.DetectionDataset:
    return sv.DetectionDataset.from_coco(
        images_directory_path=str(folder / "images"),
        annotations_path=str(folder / "annotations.json"),
    )


def load_voc(folder: Path) -> sv.DetectionDataset:
    return sv.DetectionDataset.from_pascal_voc(
        images_directory_path=str(folder / "images"),
        annotations_directory_path=str(folder / "annotations"),
    )


Loader = Callable[[Path], sv.DetectionDataset]
FORMATS = [
    # YOLO: 5 decimals of the normalised coordinates; VOC: whole pixels
    pytest.param("yolo", load_yolo, 1e-3 * max(W, H), id="yolo"),
    pytest.param("coco", load_coco, 1e-3, id="coco"),
    pytest.param("voc", load_voc, 0.5 + 1e-6, id="voc"),
]


def boxes_by_image(dataset: sv.DetectionDataset) -> dict[str, list[tuple[Corners, str]]]:
    """What a loader read: file name -> [(corners, class name)], sorted."""
    found = {}
    for path, detections in dataset.annotations.items():
        names = [dataset.classes[int(i)] for i in detections.class_id]
        corners = [tuple(float(v) for v in row) for row in detections.xyxy]
        found[Path(path).name] = sorted(zip(corners, names, strict=True), key=_order)
    return found


def _order(box: tuple[Any, str]) -> tuple[str, float, float]:
    return box[1], round(box[0][0]), round(box[0][1])


def assert_same_boxes(
    got: dict[str, list[tuple[Corners, str]]],
    expected: dict[str, list[tuple[Corners, str]]],
    tolerance: float,
) -> None:
    assert set(got) == set(expected)
    for name, boxes in expected.items():
        want = sorted(boxes, key=_order)
        assert [cls for _, cls in got[name]] == [cls for _, cls in want], name
        for (corners, _), (exp, _) in zip(got[name], want, strict=True):
            assert corners == pytest.approx(exp, abs=tolerance), name


@pytest.mark.parametrize(("fmt", "load", "tolerance"), FORMATS)
def test_every_exported_image_has_exactly_its_predictions(
    out: Out, tmp_path: Path, fmt: str, load: Loader, tolerance: float
) -> None:
    """Read back by supervision's own loader, each image has its predictions' boxes and
    classes, and only the usable outputs are there."""
    dest = tmp_path / "dataset"
    assert cli("export", str(out.root), "--format", fmt, "--to", str(dest)) == 0
    dataset = load(dest)
    assert_same_boxes(boxes_by_image(dataset), out.expected, tolerance)
    assert sorted(p.name for p in (dest / "images").iterdir()) == sorted(out.expected)
    if fmt != "voc":  # a VOC file names only the classes found in it
        assert dataset.classes == ["bug", "leaf", "stem"]


def test_yolo_label_file_is_normalised_centre_form(out: Out, tmp_path: Path) -> None:
    """A YOLO label line is `class cx cy w h`, normalised by the image's size, with the
    class id indexing data.yaml's names."""
    dest = tmp_path / "dataset"
    assert cli("export", str(out.root), "--format", "yolo", "--to", str(dest)) == 0
    data = yaml.safe_load((dest / "data.yaml").read_text())
    names = data["names"]
    assert (data["train"], data["val"]) == ("images", "images")  # a trainer finds the images
    (image,) = [r for r in out.records if r.key == key_of("b")]
    stored = image.outputs[0]
    assert stored.labels is not None
    label_file = dest / "labels" / (Path(stored.path).stem + ".txt")
    rows = [line.split() for line in label_file.read_text().splitlines()]
    got = sorted((names[int(r[0])], *(float(v) for v in r[1:])) for r in rows)
    want = sorted(
        (p.class_name, p.x / W, p.y / H, p.width / W, p.height / H)
        for p in stored.labels.predictions
    )
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g[1:] == pytest.approx(w[1:], abs=1e-4)


def test_negative_example_has_an_empty_label_file(out: Out, tmp_path: Path) -> None:
    """An output labelled with no predictions is exported, with an empty label file."""
    dest = tmp_path / "dataset"
    assert cli("export", str(out.root), "--format", "yolo", "--to", str(dest)) == 0
    (negative,) = [name for name, boxes in out.expected.items() if not boxes]
    assert (dest / "images" / negative).is_file()
    assert (dest / "labels" / (Path(negative).stem + ".txt")).read_text().strip() == ""


@pytest.mark.parametrize("fmt", ["yolo", "coco", "voc"])
def test_images_are_copied_byte_for_byte(out: Out, tmp_path: Path, fmt: str) -> None:
    """Every image in the dataset is its stored file, unchanged (PNG and JPEG alike)."""
    dest = tmp_path / "dataset"
    assert cli("export", str(out.root), "--format", fmt, "--to", str(dest)) == 0
    stored = {Path(p).name: p for p in out.root.glob("images/*/*")}
    copied = sorted((dest / "images").iterdir())
    assert {p.suffix for p in copied} == {".png", ".jpg"}
    for path in copied:
        assert path.read_bytes() == stored[path.name].read_bytes()


def test_summary_counts_what_was_left_out_and_why(
    out: Out, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The summary counts images, boxes, classes and each reason an output was skipped."""
    dest = tmp_path / "dataset"
    assert cli("export", str(out.root), "--format", "coco", "--to", str(dest), "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {
        "format": "coco",
        "to": str(dest),
        "images": 3,
        "negatives": 1,
        "boxes": 5,
        "classes": ["bug", "leaf", "stem"],
        "skipped": {"flagged": 1, "unlabelled": 1, "label_failed": 1, "missing_file": 1},
        "items_not_ok": 1,
    }
    assert cli("export", str(out.root), "--format", "yolo", "--to", str(tmp_path / "y")) == 0
    line = capsys.readouterr().out.strip()
    assert line == (
        f"exported 3 images (1 without boxes), 5 boxes, 3 classes as yolo to {tmp_path / 'y'}; "
        "skipped: 1 flagged, 1 unlabelled, 1 label failed, 1 missing file; items not ok: 1"
    )


def test_boxes_are_clipped_to_the_image(tmp_path: Path) -> None:
    """A box reaching past the image is clipped to it; one wholly outside is dropped."""
    o = Out(tmp_path / "out", [], {})
    spill, outside = pred(-5, 40, 20, 60, "leaf"), pred(70, 0, 90, 10, "leaf")
    (rel,) = o.add("a", ("png", labels(spill, outside), (), True))
    o.expect(rel, ((0, 40, 20, H), "leaf"))
    o.write()
    dest = tmp_path / "dataset"
    assert cli("export", str(o.root), "--format", "coco", "--to", str(dest)) == 0
    assert_same_boxes(boxes_by_image(load_coco(dest)), o.expected, 1e-3)


def test_an_existing_empty_folder_is_accepted(out: Out, tmp_path: Path) -> None:
    """--to may name an empty folder: the dataset takes its place."""
    dest = tmp_path / "dataset"
    dest.mkdir()
    assert cli("export", str(out.root), "--format", "voc", "--to", str(dest)) == 0
    assert len(list((dest / "annotations").glob("*.xml"))) == len(out.expected)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_folder_that_is_not_empty_is_refused(
    out: Out, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--to holding anything: exit 2, one line, nothing in it touched or added."""
    dest = tmp_path / "dataset"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    assert cli("export", str(out.root), "--format", "yolo", "--to", str(dest)) == 2
    assert "not empty" in one_error_line(capsys)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert (dest / "keep.txt").read_text() == "mine"


def test_no_manifest_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An OUT without a manifest: exit 2, one line saying to run a job first."""
    dest = tmp_path / "dataset"
    assert cli("export", str(tmp_path), "--format", "coco", "--to", str(dest)) == 2
    assert "synthaug run" in one_error_line(capsys)
    assert not dest.exists()


def _only_unlabelled(o: Out) -> None:
    o.add("u", ("png", None, (), True))


def _only_flagged(o: Out) -> None:
    o.add("f", ("png", labels(pred(1, 1, 9, 9, "leaf")), ("unchanged",), True))


def _only_failed_items(o: Out) -> None:
    o.add("x", status="failed")


def _only_failed_labels(o: Out) -> None:
    error = ErrorInfo("timeout", None, "slow")
    o.add("l", ("png", LabelRecord(model=MODEL, error=error), (), True))


def _only_negatives(o: Out) -> None:
    o.add("n", ("png", labels(), (), True))


@pytest.mark.parametrize(
    ("build", "says"),
    [
        pytest.param(_only_unlabelled, "add a label: block", id="unlabelled"),
        pytest.param(_only_flagged, "1 flagged", id="flagged"),
        pytest.param(_only_failed_items, "no stored outputs (1 items not ok)", id="failed-items"),
        pytest.param(_only_failed_labels, "1 label failed", id="label-failed"),
        pytest.param(_only_negatives, "has a box", id="no-boxes"),
    ],
)
def test_nothing_to_export_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], build: Callable[[Out], None], says: str
) -> None:
    """Nothing exportable: exit 2, one line naming the reason; no folder made."""
    o = Out(tmp_path / "out", [], {})
    build(o)
    o.write()
    dest = tmp_path / "dataset"
    assert cli("export", str(o.root), "--format", "yolo", "--to", str(dest)) == 2
    line = one_error_line(capsys)
    assert line.startswith("synthaug: error: nothing to export from")
    assert says in line
    assert list(tmp_path.iterdir()) == [o.root]


def test_two_outputs_with_one_name_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two sources whose keys share 16 hex digits would collide in images/: refused."""
    o = Out(tmp_path / "out", [], {})
    first, second = key_of("a"), key_of("a")[:16] + key_of("b")[16:]
    box = labels(pred(1, 1, 9, 9, "leaf"))
    o.add("a", ("png", box, (), True), source="s", key=first)
    o.add("b", ("png", box, (), True), source="t", key=second)
    o.write()
    dest = tmp_path / "dataset"
    assert cli("export", str(o.root), "--format", "coco", "--to", str(dest)) == 2
    assert "would share the name" in one_error_line(capsys)
    assert not dest.exists()


def test_without_supervision_it_names_the_extra(
    out: Out, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the export extra: exit 2 and one line with the pip command."""
    monkeypatch.setitem(sys.modules, "supervision", None)  # `import supervision` fails
    dest = tmp_path / "dataset"
    assert cli("export", str(out.root), "--format", "yolo", "--to", str(dest)) == 2
    assert one_error_line(capsys) == f"synthaug: error: {MISSING_EXTRA}"
    assert not dest.exists()


def test_a_failed_write_leaves_nothing(
    out: Out, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A disk that fills half-way: exit 2 naming the fix, no DIR and no temporary folder."""

    def half_then_full(self: sv.DetectionDataset, images_directory_path: str, **_: Any) -> None:
        Path(images_directory_path).mkdir(parents=True)
        (Path(images_directory_path) / "half.png").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sv.DetectionDataset, "as_coco", half_then_full)
    dest = tmp_path / "dataset"
    assert cli("export", str(out.root), "--format", "coco", "--to", str(dest)) == 2
    assert "disk full" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_bad_format_is_a_usage_error(out: Out, tmp_path: Path) -> None:
    """--format takes yolo, coco or voc; --to is required."""
    assert cli("export", str(out.root), "--format", "tfrecord", "--to", "x") == 2
    assert cli("export", str(out.root), "--format", "yolo") == 2


@pytest.mark.slow
def test_the_core_install_never_loads_supervision() -> None:
    """Importing the package and its CLI (export included) leaves supervision unloaded."""
    code = (
        "import sys, pipeline, pipeline.cli, pipeline.views.export; "
        "print('supervision' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "False"


@pytest.mark.slow
def test_export_as_a_command(out: Out, tmp_path: Path) -> None:
    """`python -m pipeline export` prints one summary line on stdout, nothing on stderr."""
    dest = tmp_path / "dataset"
    command = ["export", str(out.root), "--format", "yolo", "--to", str(dest)]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *command],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("exported 3 images")
    assert_same_boxes(boxes_by_image(load_yolo(dest)), out.expected, 1e-3 * max(W, H))
