"""`synthaug export`: the usable outputs of an OUT as a dataset folder a trainer reads.

An output is exported when its item is ok, the label stage labelled it (``labels`` done),
no stage flagged it, and its stored file is a regular file inside OUT. A labelled output
without predictions is a negative example: it is exported with no boxes.

Conversions live at the edge: each exported output's predictions become one
`supervision.Detections` (corner boxes, class ids) and supervision's `DetectionDataset`
writes YOLO, COCO or Pascal VOC, so synthaug chooses what goes in and owns none of the
formats. supervision is the optional ``export`` extra, imported only when an export runs:
the core install never loads it.

Images are copied byte for byte: supervision copies a dataset given as file paths with
`shutil.copyfile` and decodes a file only to learn its size. Boxes are clipped to the
image (trainers reject coordinates outside it); a box left with no area is dropped.
Class ids follow the sorted class names, so the same OUT gives the same ids.

The dataset is written into a hidden temporary sibling of DIR and renamed into place at
the end: an interrupted export leaves no half-written DIR (a killed one may leave a
``.DIR.<hex>.tmp`` folder beside it, safe to delete).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from ..errors import OutputError, UsageError
from ..manifest.folded import read_all_records
from ..records import ItemRecord, OutputFile
from ..store.layout import fsync_dir, manifest_files, output_error, stored_image_path, temp_path

if TYPE_CHECKING:
    import supervision as sv

__all__ = [
    "EXPORT_FORMATS",
    "MISSING_EXTRA",
    "ExportFormat",
    "ExportSummary",
    "export_dataset",
    "format_export",
]

ExportFormat = Literal["yolo", "coco", "voc"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("yolo", "coco", "voc")
MISSING_EXTRA = "synthaug export needs the export extra: pip install 'synthaug[export]'"

SkipReason = Literal["flagged", "unlabelled", "label_failed", "missing_file"]
_SKIP_WORDS: dict[str, str] = {  # SkipReason -> words
    "flagged": "flagged",
    "unlabelled": "unlabelled",
    "label_failed": "label failed",
    "missing_file": "missing file",
}

# where each format puts its parts, relative to DIR
IMAGES_SUBDIR = "images"
YOLO_LABELS_SUBDIR = "labels"
YOLO_DATA_YAML = "data.yaml"
COCO_ANNOTATIONS = "annotations.json"
VOC_ANNOTATIONS_SUBDIR = "annotations"


class Box(NamedTuple):
    """A prediction as a dataset stores it: corners in pixels, clipped to the image."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float
    class_name: str


@dataclass(frozen=True, slots=True)
class _Image:
    """One output to export: its stored file and its boxes."""

    path: Path
    boxes: tuple[Box, ...]


@dataclass(slots=True)
class _Selection:
    """What the manifest offers: the outputs to export and why the others are left out."""

    images: list[_Image] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # by SkipReason
    labelled: int = 0  # outputs of ok items with labels done, exported or not
    items_not_ok: int = 0  # keys whose last line is failed, generated or submitted


@dataclass(frozen=True, slots=True)
class ExportSummary:
    """What an export wrote (`images` of which `negatives` have no box) and what it left out
    (`skipped`: outputs by reason; `items_not_ok`: items with no stored outputs yet)."""

    format: ExportFormat
    dest: Path
    images: int
    negatives: int
    boxes: int
    classes: tuple[str, ...]
    skipped: Mapping[str, int]
    items_not_ok: int

    def to_json(self) -> dict[str, Any]:
        """The ``export --json`` object."""
        return {
            "format": self.format,
            "to": str(self.dest),
            "images": self.images,
            "negatives": self.negatives,
            "boxes": self.boxes,
            "classes": list(self.classes),
            "skipped": dict(self.skipped),
            "items_not_ok": self.items_not_ok,
        }


def export_dataset(out_dir: Path, fmt: ExportFormat, dest: Path) -> ExportSummary:
    """Write the exportable outputs of `out_dir` to `dest` (new or empty) in format `fmt`.

    Raises `UsageError` when `dest` is not empty, `out_dir` has no manifest, the export
    extra is missing or nothing is exportable; `OutputError` when two outputs would share
    a file name in the dataset or `dest` cannot be written. Nothing is left at `dest` then.
    """
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    _check_dest(dest)
    if not manifest_files(out_dir):
        raise UsageError(f"no manifest in {out_dir}: run `synthaug run SPEC` first")
    _require_supervision()
    selection = _select(out_dir, read_all_records(out_dir).values())
    if not selection.images:
        raise UsageError(f"nothing to export from {out_dir}: {_why_nothing(selection)}")
    _check_unique_names(selection.images)
    classes = tuple(sorted({box.class_name for image in selection.images for box in image.boxes}))
    if not classes:
        raise UsageError(
            f"nothing to export from {out_dir}: none of the {len(selection.images)} usable "
            "images has a box (a dataset needs at least one class)"
        )
    _write_into_place(dest, lambda folder: _write_dataset(selection.images, classes, fmt, folder))
    return ExportSummary(
        format=fmt,
        dest=dest,
        images=len(selection.images),
        negatives=sum(1 for image in selection.images if not image.boxes),
        boxes=sum(len(image.boxes) for image in selection.images),
        classes=classes,
        skipped={reason: selection.skipped[reason] for reason in _SKIP_WORDS},
        items_not_ok=selection.items_not_ok,
    )


def format_export(summary: ExportSummary) -> str:
    """One line for people: what was written where, and what was left out and why."""
    line = (
        f"exported {summary.images} images ({summary.negatives} without boxes), "
        f"{summary.boxes} boxes, {len(summary.classes)} classes as {summary.format} "
        f"to {summary.dest}; skipped: {_format_skipped(summary.skipped) or 'none'}"
    )
    if summary.items_not_ok:
        line += f"; items not ok: {summary.items_not_ok}"
    return line


def _format_skipped(skipped: Mapping[str, int]) -> str:
    """``2 flagged, 1 missing file``: the reasons that left outputs out, with counts."""
    return ", ".join(
        f"{count} {_SKIP_WORDS.get(reason, reason)}" for reason, count in skipped.items() if count
    )


def _require_supervision() -> None:
    """Import supervision once, or tell the user how to install it (`UsageError`)."""
    try:
        with warnings.catch_warnings():
            # Without OpenCV it warns that it decodes with Pillow: the export only asks
            # it for image sizes and file copies, which Pillow does as well.
            warnings.filterwarnings("ignore", message="OpenCV", category=UserWarning)
            import supervision  # noqa: F401  (imported for the check; used in _write_dataset)
    except ImportError as exc:
        raise UsageError(MISSING_EXTRA) from exc


def _check_dest(dest: Path) -> None:
    """Refuse a `dest` that holds anything: an export never overwrites."""
    if dest.is_dir():
        if any(dest.iterdir()):
            raise UsageError(_not_empty(dest))
    elif dest.exists() or dest.is_symlink():
        raise UsageError(f"{dest} is a file: export into a new or empty folder (--to)")


def _not_empty(dest: Path) -> str:
    return f"{dest} is not empty: export into a new or empty folder (--to); nothing was written"


def _select(out_dir: Path, records: Iterable[ItemRecord]) -> _Selection:
    """Sort every output of the manifest into exported or skipped (with its reason)."""
    selection = _Selection()
    root = out_dir.resolve()
    for record in records:
        if record.status != "ok":
            selection.items_not_ok += 1
            continue
        for output in record.outputs:
            if output.labels is not None and output.labels.done:
                selection.labelled += 1
            found = _stored_or_reason(out_dir, root, output)
            if isinstance(found, Path):
                selection.images.append(_Image(found, _boxes(output)))
            else:
                selection.skipped[found] += 1
    selection.images.sort(key=lambda image: image.path.name)
    return selection


def _stored_or_reason(out_dir: Path, root: Path, output: OutputFile) -> Path | SkipReason:
    """The stored file of an output to export, or why it is not exported."""
    if output.flags:
        return "flagged"
    if output.labels is None:
        return "unlabelled"
    if not output.labels.done:
        return "label_failed"
    return _stored_file(out_dir, root, output.path) or "missing_file"


def _stored_file(out_dir: Path, root: Path, relative: str) -> Path | None:
    """The regular file inside OUT that a manifest path names, or None (absent, a link,
    or outside OUT by a hand edit or a linked folder)."""
    path = stored_image_path(out_dir, relative)
    if path is None:
        return None
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        if not path.resolve().is_relative_to(root):
            return None
    except OSError:
        return None
    return path


def _boxes(output: OutputFile) -> tuple[Box, ...]:
    """The output's predictions as corner boxes clipped to the image; empty ones dropped."""
    boxes = []
    for prediction in output.labels.predictions if output.labels is not None else ():
        xmin, ymin, xmax, ymax = prediction.corners()
        xmin, xmax = _clip(xmin, output.width), _clip(xmax, output.width)
        ymin, ymax = _clip(ymin, output.height), _clip(ymax, output.height)
        if xmax > xmin and ymax > ymin:
            boxes.append(Box(xmin, ymin, xmax, ymax, prediction.class_name))
    return tuple(boxes)


def _clip(value: float, limit: int) -> float:
    return min(max(value, 0.0), float(limit))


def _why_nothing(selection: _Selection) -> str:
    """The reason an export found nothing to write, with what to do about it."""
    skipped = selection.skipped
    counts = _format_skipped(skipped)
    if selection.items_not_ok:
        counts = ", ".join(filter(None, (counts, f"{selection.items_not_ok} items not ok")))
    if not skipped and not selection.labelled:
        return f"no stored outputs ({counts or 'empty manifest'}): run `synthaug run SPEC` first"
    if not selection.labelled:
        if skipped["label_failed"]:
            return f"no labelled outputs ({counts}): run the spec again to retry the labelling"
        return "no labelled outputs: add a label: block to the spec and run it again"
    return f"every labelled output is flagged or its file is missing ({counts})"


def _check_unique_names(images: Sequence[_Image]) -> None:
    """Refuse two outputs whose files (or annotation files) would share a name in DIR."""
    seen: dict[str, Path] = {}
    for image in images:
        stem = image.path.stem  # YOLO and VOC name an annotation by the image's stem
        other = seen.setdefault(stem, image.path)
        if other != image.path:
            raise OutputError(
                f"{other} and {image.path} would share the name {stem} in the dataset: "
                "nothing was written (two keys with the same first 16 hex digits: please "
                "report it)"
            )


def _write_dataset(
    images: Sequence[_Image], classes: Sequence[str], fmt: ExportFormat, folder: Path
) -> None:
    """Write `images` as a dataset of format `fmt` into `folder`, through supervision."""
    import supervision as sv  # loaded by _require_supervision, without its warning

    class_ids = {name: i for i, name in enumerate(classes)}
    paths = [str(image.path) for image in images]
    annotations = {str(image.path): _detections(image.boxes, class_ids) for image in images}
    dataset = sv.DetectionDataset(classes=list(classes), images=paths, annotations=annotations)
    images_dir = str(folder / IMAGES_SUBDIR)
    if fmt == "yolo":
        dataset.as_yolo(
            images_directory_path=images_dir,
            annotations_directory_path=str(folder / YOLO_LABELS_SUBDIR),
            data_yaml_path=str(folder / YOLO_DATA_YAML),
        )
        _add_image_folders(folder / YOLO_DATA_YAML)
    elif fmt == "coco":
        dataset.as_coco(
            images_directory_path=images_dir,
            annotations_path=str(folder / COCO_ANNOTATIONS),
        )
    else:
        dataset.as_pascal_voc(
            images_directory_path=images_dir,
            annotations_directory_path=str(folder / VOC_ANNOTATIONS_SUBDIR),
        )


def _add_image_folders(data_yaml: Path) -> None:
    """Name the images folder as ``train`` and ``val`` in `data_yaml` (supervision writes
    only the class names), relative to the file, as Ultralytics resolves them: a trainer
    can start from the folder as it is; the split is the user's to make."""
    with data_yaml.open("a", encoding="utf-8") as file:
        file.write(f"train: {IMAGES_SUBDIR}\nval: {IMAGES_SUBDIR}\n")


def _detections(boxes: Sequence[Box], class_ids: Mapping[str, int]) -> sv.Detections:
    """`boxes` as supervision's central record: xyxy corners and class ids."""
    import numpy as np
    import supervision as sv

    if not boxes:
        return sv.Detections.empty()
    return sv.Detections(
        xyxy=np.array([box[:4] for box in boxes], dtype=np.float64),
        class_id=np.array([class_ids[box.class_name] for box in boxes], dtype=np.int64),
    )


def _write_into_place(dest: Path, write: Callable[[Path], None]) -> None:
    """Run `write(folder)` on a temporary sibling of `dest`, then rename it to `dest`."""
    target = dest.resolve()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = temp_path(target)
        folder.mkdir()
    except OSError as exc:
        raise output_error(dest, exc) from exc
    try:
        write(folder)
        os.rename(folder, target)  # POSIX: replaces an empty folder, never a full one
        fsync_dir(target.parent)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise UsageError(_not_empty(dest)) from exc
        raise output_error(dest, exc) from exc
    finally:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
