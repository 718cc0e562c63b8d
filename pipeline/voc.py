"""Pascal VOC XML of one image's boxes: the annotation format sent to Roboflow.

VOC because it is one small file per image that names the image it describes
(``<filename>``), which is how Roboflow's annotate endpoint matches it to the uploaded
file, and because it holds boxes as pixel corners with class names, with no id tables to
keep in step (a one-image COCO JSON needs image and category ids). Corners are the
detection API's centre form converted exactly (``xmin = x - width / 2``), without
rounding, and clipped to the image: a box sent is the box found.
"""

from __future__ import annotations

from collections.abc import Iterable
from xml.etree import ElementTree

from .records import Prediction

__all__ = ["voc_xml"]


def voc_xml(filename: str, width: int, height: int, predictions: Iterable[Prediction]) -> str:
    """The VOC annotation of the image `filename` (`width` × `height`), one object per
    prediction."""
    root = ElementTree.Element("annotation")
    _text(root, "folder", "synthaug")
    _text(root, "filename", filename)
    size = ElementTree.SubElement(root, "size")
    _text(size, "width", str(width))
    _text(size, "height", str(height))
    _text(size, "depth", "3")
    for prediction in predictions:
        obj = ElementTree.SubElement(root, "object")
        _text(obj, "name", prediction.class_name)
        _text(obj, "pose", "Unspecified")
        _text(obj, "truncated", "0")
        _text(obj, "difficult", "0")
        box = ElementTree.SubElement(obj, "bndbox")
        xmin, ymin, xmax, ymax = prediction.corners()
        for name, value, limit in (
            ("xmin", xmin, width),
            ("ymin", ymin, height),
            ("xmax", xmax, width),
            ("ymax", ymax, height),
        ):
            _text(box, name, _number(min(max(value, 0.0), float(limit))))
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode") + "\n"


def _text(parent: ElementTree.Element, tag: str, text: str) -> None:
    ElementTree.SubElement(parent, tag).text = text


def _number(value: float) -> str:
    """`value` as VOC writes it: a whole number without a point, else up to 6 decimals."""
    return str(int(value)) if value == int(value) else f"{value:.6f}".rstrip("0").rstrip(".")
