"""What synthaug knows of OpenAI's image models, read from packaged data with dates.

Image models turn over every few months, so the facts (shutdown dates, replacements,
list prices, size rules) live in ``image_models.yaml`` beside this module, and every
decision takes the run's date: knowledge written as code would go stale silently between
two releases. A model the table does not know is accepted and unpriced; the API is the
judge (and ``GET /models/{id}`` asks it before a run spends, see `pipeline.model_check`).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml

__all__ = [
    "SHUTDOWN_WARNING_DAYS",
    "Catalog",
    "ImageModel",
    "ModelStatus",
    "SizeRule",
    "TokenPrices",
    "default_catalog",
    "parse_catalog",
]

SHUTDOWN_WARNING_DAYS = 30
"""A model this close to its shutdown date gets a warning in ``plan`` and the run's log."""

ModelStatus = Literal["current", "deprecated", "shut down"]
_SIZE = re.compile(r"([1-9][0-9]*)x([1-9][0-9]*)")


@dataclass(frozen=True, slots=True)
class TokenPrices:
    """USD per million tokens, for answers that report their ``usage``."""

    text_input: float
    image_input: float
    image_output: float
    text_output: float = 0.0
    cached_image_input: float | None = None


@dataclass(frozen=True, slots=True)
class SizeRule:
    """The sizes a model makes: a fixed list, or any WxH within bounds."""

    fixed: tuple[str, ...] = ()
    multiple: int | None = None
    max_edge: int | None = None
    max_pixels: int | None = None
    min_pixels: int | None = None
    max_ratio: float | None = None

    def problem(self, size: str) -> str | None:
        """Why `size` (``WxH`` or ``auto``) is not one this model makes; None when it is."""
        if size == "auto":
            return None
        if self.fixed:
            return None if size in self.fixed else f"makes {', '.join(self.fixed)} or auto"
        match = _SIZE.fullmatch(size)
        if match is None:
            return "takes WIDTHxHEIGHT or auto"
        width, height = int(match.group(1)), int(match.group(2))
        for broken, rule in self._rules(width, height):
            if broken:
                return rule
        return None

    def _rules(self, width: int, height: int) -> Iterator[tuple[bool, str]]:
        long, short = max(width, height), min(width, height)
        if self.multiple is not None:
            yield (
                width % self.multiple != 0 or height % self.multiple != 0,
                f"needs both sides multiples of {self.multiple}",
            )
        if self.max_edge is not None:
            yield long > self.max_edge, f"makes sides up to {self.max_edge}"
        if self.max_ratio is not None:
            yield long > short * self.max_ratio, f"needs a ratio within {self.max_ratio:g}:1"
        if self.max_pixels is not None:
            yield width * height > self.max_pixels, f"makes up to {self.max_pixels:,} pixels"
        if self.min_pixels is not None:
            yield width * height < self.min_pixels, f"makes at least {self.min_pixels:,} pixels"

    def describe(self) -> str:
        """The rule in a few words, for ``synthaug models``."""
        if self.fixed:
            return ", ".join(self.fixed)
        parts = []
        if self.multiple is not None:
            parts.append(f"WxH, sides ×{self.multiple}")
        if self.max_ratio is not None:
            parts.append(f"ratio ≤ {self.max_ratio:g}:1")
        if self.max_edge is not None:
            parts.append(f"edge ≤ {self.max_edge}")
        if self.max_pixels is not None:
            parts.append(f"≤ {self.max_pixels / 1e6:.1f} MP")
        return ", ".join(parts) or "any"


@dataclass(frozen=True, slots=True)
class ImageModel:
    """One image model: its dates, what it makes and what an image costs.

    `per_image` maps (quality, size) to USD; ``auto`` quality or size is not in it,
    because the API chooses then, and the cost is only known from the answer's usage.
    """

    name: str
    aliases: tuple[str, ...] = ()
    released: str | None = None
    shutdown: dt.date | None = None
    replacements: tuple[str, ...] = ()
    per_image: Mapping[tuple[str, str], float] = field(default_factory=dict)
    tokens: TokenPrices | None = None
    sizes: SizeRule = SizeRule()
    transparent: bool = True
    max_input_images: int | None = None
    batch: bool = True
    source: str = ""

    def status(self, today: dt.date) -> ModelStatus:
        """``shut down`` on and after its shutdown date, ``deprecated`` once announced."""
        if self.shutdown is None:
            return "current"
        return "shut down" if self.shutdown <= today else "deprecated"

    def days_left(self, today: dt.date) -> int | None:
        """Days until the shutdown; None when none is announced."""
        return None if self.shutdown is None else (self.shutdown - today).days


@dataclass(frozen=True, slots=True)
class Catalog:
    """The known models by name (aliases included), and when the table was checked."""

    models: tuple[ImageModel, ...]
    checked: dt.date | None = None
    _by_name: Mapping[str, ImageModel] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        names: dict[str, ImageModel] = {}
        for model in self.models:
            for name in (model.name, *model.aliases):
                names[name] = model
        object.__setattr__(self, "_by_name", names)

    def get(self, name: object) -> ImageModel | None:
        """The model called `name` (or one of its aliases); None when unknown."""
        return self._by_name.get(str(name)) if name is not None else None

    def shutdown_problem(self, name: str, today: dt.date) -> str | None:
        """The spec error for a model shut down by `today`, naming a replacement."""
        model = self.get(name)
        if model is None or model.shutdown is None or model.status(today) != "shut down":
            return None
        instead = self.replacement_text(model, today)
        return f"{name} was shut down by OpenAI on {model.shutdown.isoformat()}: {instead}"

    def shutdown_warning(self, name: str, today: dt.date) -> str | None:
        """A warning for a model whose shutdown is at most `SHUTDOWN_WARNING_DAYS` away."""
        model = self.get(name)
        days = None if model is None else model.days_left(today)
        if model is None or model.shutdown is None or days is None:
            return None
        if not 0 < days <= SHUTDOWN_WARNING_DAYS:
            return None
        when = "tomorrow" if days == 1 else f"in {days} days"
        return (
            f"{name} shuts down {when} ({model.shutdown.isoformat()}): "
            f"{self.replacement_text(model, today)}"
        )

    def replacement_text(self, model: ImageModel, today: dt.date) -> str:
        """``use X (or Y, Z)`` from the replacements still served on `today`."""
        served = [
            name
            for name in model.replacements
            if (other := self.get(name)) is None or other.status(today) != "shut down"
        ]
        if not served:
            served = [m.name for m in self.models if m.status(today) == "current"][:1]
        if not served:
            return "see OpenAI's deprecations page for a replacement"
        rest = f" (or {', '.join(served[1:])})" if len(served) > 1 else ""
        return f"use {served[0]}{rest}"

    def current(self, today: dt.date) -> list[ImageModel]:
        """The models still served on `today`, in the table's order."""
        return [model for model in self.models if model.status(today) != "shut down"]


def parse_catalog(data: Mapping[str, Any]) -> Catalog:
    """A `Catalog` from the data file's mapping; ValueError naming the bad model and key."""
    raw_models = data.get("models")
    if not isinstance(raw_models, Mapping) or not raw_models:
        raise ValueError("the model table has no models mapping")
    models = tuple(_parse_model(str(name), entry) for name, entry in raw_models.items())
    return Catalog(models, checked=_date(data.get("checked"), "checked"))


@cache
def default_catalog() -> Catalog:
    """The packaged table (read once per process: it is immutable data)."""
    text = resources.files(__package__).joinpath("image_models.yaml").read_text("utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10x faster
    return parse_catalog(yaml.load(text, Loader=loader))  # a safe loader, C or Python


def _parse_model(name: str, entry: Any) -> ImageModel:
    if not isinstance(entry, Mapping):
        raise ValueError(f"model {name}: expected a mapping")
    try:
        return ImageModel(
            name=name,
            aliases=tuple(str(alias) for alias in entry.get("aliases") or ()),
            released=None if entry.get("released") is None else str(entry["released"]),
            shutdown=_date(entry.get("shutdown"), f"{name}.shutdown"),
            replacements=tuple(str(other) for other in entry.get("replacements") or ()),
            per_image=_per_image(entry.get("per_image") or {}),
            tokens=None if entry.get("tokens") is None else TokenPrices(**entry["tokens"]),
            sizes=_sizes(entry.get("sizes") or {}),
            transparent=bool(entry.get("transparent", True)),
            max_input_images=entry.get("max_input_images"),
            batch=bool(entry.get("batch", True)),
            source=str(entry.get("source", "")),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"model {name}: {exc}") from None


def _per_image(table: Mapping[str, Mapping[str, float]]) -> dict[tuple[str, str], float]:
    return {
        (str(quality), str(size)): float(price)
        for quality, by_size in table.items()
        for size, price in by_size.items()
    }


def _sizes(rule: Mapping[str, Any]) -> SizeRule:
    fixed = tuple(str(size) for size in rule.get("fixed") or ())
    bounds = {key: rule[key] for key in rule if key != "fixed"}
    return SizeRule(fixed=fixed, **bounds)


def _date(value: object, where: str) -> dt.date | None:
    if value is None or isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"{where}: expected a date YYYY-MM-DD, got {value!r}") from None
