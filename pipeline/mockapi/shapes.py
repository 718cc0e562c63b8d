"""The objects in the mock's pictures: which a prompt shows, where, and in what colour.

So that the mock's detection has something real to find, a prompt naming classes of the
vocabulary (`MockConfig.detect_classes`; a name found anywhere in the lower-cased prompt,
so "maple trees" shows a tree) gets one filled rectangle or ellipse per class, in
vocabulary order, in the free cells of the picture's 3 × 3 grid: middle-left,
middle-right, bottom-centre (the prompt, the thumbnail and ``#index`` hold the others, and
the middle stays pure fill). Size and place come from sha256(prompt, index), but every
shape keeps a margin inside its cell and holds the cell's centre in its middle third, so
detection can read a cell's centre pixel, know the class by its exact colour
(`class_color`), and measure the shape from the pixels alone, after a nearest-neighbour
resize too. Two rules keep that true: a class whose colour is the picture's fill colour
is not drawn (it could not be told from the background), and pictures whose cells cannot
hold `MIN_SHAPE_PX` with their margins (under 30 px a side) show no shapes at all.
Standard library only: the drawing, the detection and the settings share it.
"""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DEFAULT_DETECT_CLASSES",
    "MAX_DETECT_CLASSES",
    "MIN_SHAPE_PX",
    "Box",
    "Shape",
    "class_color",
    "free_cells",
    "named_classes",
    "plan_shapes",
]

DEFAULT_DETECT_CLASSES: tuple[str, ...] = (
    "person",
    "car",
    "tree",
    "leaf",
    "dog",
    "cat",
    "bird",
    "apple",
    "chair",
    "bottle",
    "cup",
    "book",
    "flower",
    "house",
    "bicycle",
    "boat",
    "horse",
    "clock",
    "umbrella",
    "ball",
)
MAX_DETECT_CLASSES = 64
"""The palette's size: `class_color` is distinct (and neither black nor white) below it."""
MIN_SHAPE_PX = 8
"""The thinnest a shape is drawn, along either axis."""

RGB = tuple[int, int, int]
Cell = tuple[int, int, int, int]  # left, top, width, height
ShapeKind = Literal["rectangle", "ellipse"]
_GOLDEN = 0.618033988749895  # hue steps that keep neighbouring classes far apart
_VALUES = (0.95, 0.7, 0.5)  # three brightness levels: 64 hues need not all differ


@dataclass(frozen=True, slots=True)
class Box:
    """An object's pixel box: columns `left` .. `left + width - 1`, rows likewise."""

    label: str
    class_id: int
    left: int
    top: int
    width: int
    height: int

    def centre_form(self) -> dict[str, float]:
        """Roboflow's form: the box's centre (``x``, ``y``) and its ``width`` and ``height``."""
        return {
            "x": self.left + self.width / 2,
            "y": self.top + self.height / 2,
            "width": float(self.width),
            "height": float(self.height),
        }


@dataclass(frozen=True, slots=True)
class Shape:
    """One object as the mock draws it: its box, its kind and its class's colour."""

    box: Box
    kind: ShapeKind
    color: RGB


def class_color(class_id: int) -> RGB:
    """The exact colour of a class's shapes (golden-ratio hues at three brightnesses)."""
    hue = (class_id * _GOLDEN) % 1.0
    value = _VALUES[class_id % len(_VALUES)]
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.8, value)
    return round(red * 255), round(green * 255), round(blue * 255)


def named_classes(prompt: str, classes: Sequence[str]) -> list[int]:
    """The indices of the classes whose name occurs in the lower-cased prompt."""
    text = prompt.lower()
    return [index for index, name in enumerate(classes) if name and name in text]


def free_cells(width: int, height: int) -> list[Cell]:
    """The grid cells shapes go in: middle-left, middle-right, bottom-centre."""
    third_w, third_h = width // 3, height // 3
    middle_w, middle_h = width - 2 * third_w, height - 2 * third_h
    return [
        (0, third_h, third_w, middle_h),
        (width - third_w, third_h, third_w, middle_h),
        (third_w, height - third_h, middle_w, third_h),
    ]


def plan_shapes(
    prompt: str,
    index: int,
    width: int,
    height: int,
    classes: Sequence[str],
    fill: RGB,
) -> list[Shape]:
    """The shapes a `width` × `height` picture for `prompt` (its `index`-th) shows."""
    cells = free_cells(width, height)
    if any(min(_room(cell_w), _room(cell_h)) < MIN_SHAPE_PX for _, _, cell_w, cell_h in cells):
        return []
    digest = hashlib.sha256(f"{prompt}\0{index}".encode()).digest()
    shapes = []
    named = named_classes(prompt, classes)[: len(cells)]  # one shape a cell, the first classes
    for slot, (class_id, cell) in enumerate(zip(named, cells[: len(named)], strict=True)):
        color = class_color(class_id)
        if color == fill:
            continue
        at = 9 * slot  # each slot's own bytes: four 16-bit draws and the kind
        draws = [int.from_bytes(digest[at + 2 * k : at + 2 * k + 2], "big") for k in range(4)]
        left, shape_w = _span(cell[2], draws[0], draws[1])
        top, shape_h = _span(cell[3], draws[2], draws[3])
        box = Box(classes[class_id], class_id, cell[0] + left, cell[1] + top, shape_w, shape_h)
        kind: ShapeKind = "ellipse" if (digest[at + 8] + slot) % 2 else "rectangle"
        shapes.append(Shape(box, kind, color))
    return shapes


def _room(cell: int) -> int:
    """A cell's length less its margins: the most a shape may take of it."""
    return cell - 2 * _margin(cell)


def _margin(cell: int) -> int:
    return max(1, cell // 10)


def _span(cell: int, size_draw: int, place_draw: int) -> tuple[int, int]:
    """A shape's start and length along one axis of a cell (from two draws).

    The length is from half the room to all of it; the start keeps the margins and puts
    the cell's centre pixel in the shape's middle third.
    """
    room, margin, centre = _room(cell), _margin(cell), cell // 2
    shortest = max(MIN_SHAPE_PX, (room + 1) // 2)
    length = shortest + size_draw % (room - shortest + 1)
    lowest = max(margin, centre - (2 * length) // 3)
    highest = min(cell - margin - length, centre - (length + 2) // 3)
    return lowest + place_draw % (highest - lowest + 1), length
