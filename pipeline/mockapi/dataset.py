"""The mock's Roboflow datasets: the images a project holds, for upload and search.

Each project the mock is asked about starts with a few seeded images (deterministic ids,
names, tags and class names), so a search source has something to find offline; an
upload adds an image, and a second upload of the same name into the same project is a
duplicate, as Roboflow answers it. Uploaded images are searchable by their tags, which
lets a rehearsal find "last night's images" the way a user would. An image holds at most
one annotation (`MockAnnotation`, boxes in Roboflow's centre form), replaced only when
asked to, so that a client can read back what a project kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SEED_CLASSES", "SEED_TAGS", "MockAnnotation", "MockBox", "MockDataset", "MockImage"]

SEED_TAGS = ("fall", "spring", "night", "day")
SEED_CLASSES = ("maple", "oak", "pine")


@dataclass(frozen=True, slots=True)
class MockBox:
    """One labelled box as Roboflow returns it: centre (`x`, `y`), `width`, `height`."""

    label: str
    x: float
    y: float
    width: float
    height: float

    def to_json(self) -> dict[str, Any]:
        """``{"label", "x", "y", "width", "height"}``."""
        return {
            "label": self.label,
            "x": self.x,
            "y": self.y,
            "width": self.width,
            "height": self.height,
        }


@dataclass(frozen=True, slots=True)
class MockAnnotation:
    """An image's annotation: the image size it was made for (None: not said) and boxes."""

    width: int | None
    height: int | None
    boxes: tuple[MockBox, ...]

    def to_json(self) -> dict[str, Any]:
        """``{"width", "height", "boxes": [...]}``, as Roboflow's image details show it."""
        return {
            "width": self.width,
            "height": self.height,
            "boxes": [box.to_json() for box in self.boxes],
        }


@dataclass
class MockImage:
    """One image in a mock project."""

    id: str
    name: str
    project: str
    sha256: str
    split: str | None = None
    batch: str | None = None
    tags: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    seeded: bool = False
    size: tuple[int, int] | None = None  # width, height (None: not known, e.g. a seed)
    annotation: MockAnnotation | None = None
    annotation_is_prediction: bool = False

    def annotate(
        self, annotation: MockAnnotation, *, prediction: bool = False, overwrite: bool = False
    ) -> bool:
        """Keep `annotation`; False (nothing kept) when there is one and no `overwrite`."""
        if self.annotation is not None and not overwrite:
            return False
        self.annotation = annotation
        self.annotation_is_prediction = prediction
        return True


class MockDataset:
    """Images per project: seeded on first use, then added to by uploads."""

    def __init__(self, seed_images: int = 24) -> None:
        self._seed_images = seed_images
        self._projects: dict[str, dict[str, MockImage]] = {}  # project -> name -> image

    def images(self, project: str) -> Iterator[MockImage]:
        """The project's images in the order they arrived (seeds first)."""
        yield from self._project(project).values()

    def find(self, project: str, image_id: str) -> MockImage | None:
        """The project's image with this id, if any."""
        return next((img for img in self.images(project) if img.id == image_id), None)

    def add(
        self,
        project: str,
        name: str,
        data: bytes,
        *,
        size: tuple[int, int] | None = None,
        split: str | None = None,
        batch: str | None = None,
        tags: list[str] | None = None,
    ) -> tuple[MockImage, bool]:
        """Store an uploaded image; (the image, True) when the name was already there."""
        images = self._project(project)
        known = images.get(name)
        if known is not None:
            return known, True
        digest = hashlib.sha256(data).hexdigest()
        image = MockImage(
            id=_image_id(project, name),
            name=name,
            project=project,
            sha256=digest,
            size=size,
            split=split,
            batch=batch,
            tags=list(tags or ()),
        )
        images[name] = image
        return image, False

    def _project(self, project: str) -> dict[str, MockImage]:
        images = self._projects.get(project)
        if images is None:
            images = self._projects[project] = {}
            for index in range(self._seed_images):
                name = f"seed-{index:03d}.jpg"
                images[name] = MockImage(
                    id=_image_id(project, name),
                    name=name,
                    project=project,
                    sha256=hashlib.sha256(name.encode()).hexdigest(),
                    split="train",
                    tags=[SEED_TAGS[index % len(SEED_TAGS)]],
                    class_names=[SEED_CLASSES[index % len(SEED_CLASSES)]],
                    seeded=True,
                )
        return images


def _image_id(project: str, name: str) -> str:
    """A Roboflow-like 20-character image id, the same for the same project and name."""
    digest = hashlib.sha256(f"{project}/{name}".encode()).digest()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(alphabet[b % len(alphabet)] for b in digest[:20])
