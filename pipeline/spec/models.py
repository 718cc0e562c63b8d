"""What synthaug knows of OpenAI's image models: which exist, what they accept, list prices.

One table, so that the spec's checks (a retired model, a size the model cannot make) and
the price of an item never disagree. A model missing from it is not an error: OpenAI
ships new ones, and the API itself is the judge; such a model is only unpriced.

Prices are OpenAI's list prices in USD (per image by quality and size, and per million
tokens for answers that report their ``usage``), as published on 2026-11-30. Roboflow may
bill differently; ``run.price_per_image`` overrides the per-image table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "BACKGROUNDS",
    "MODELS",
    "MODERATIONS",
    "OUTPUT_FORMATS",
    "QUALITIES",
    "RETIRED_MODELS",
    "SIZES",
    "ImageModel",
    "TokenPrices",
]

QUALITIES = ("low", "medium", "high", "auto")
SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
BACKGROUNDS = ("transparent", "opaque", "auto")
MODERATIONS = ("low", "auto")

RETIRED_MODELS: Mapping[str, str] = {
    # retired by OpenAI on 2026-05-12 -> the current model closest in price and use
    "dall-e-2": "gpt-image-1-mini",
    "dall-e-3": "gpt-image-1",
}
"""Models the API no longer serves, each with the replacement a spec error suggests."""


@dataclass(frozen=True, slots=True)
class TokenPrices:
    """USD per million tokens, for answers that report their ``usage``."""

    text_input: float
    image_input: float
    image_output: float
    text_output: float = 0.0


@dataclass(frozen=True, slots=True)
class ImageModel:
    """One GPT image model: the sizes it makes and what an image costs.

    `per_image` maps (quality, size) to USD; ``auto`` quality or size is not in it,
    because the API chooses then, and the cost is only known from the answer's usage.
    """

    name: str
    tokens: TokenPrices
    per_image: Mapping[tuple[str, str], float] = field(default_factory=dict)
    sizes: tuple[str, ...] = SIZES


def _per_image(
    square: tuple[float, float, float], other: tuple[float, float, float]
) -> dict[tuple[str, str], float]:
    """The per-image table from (low, medium, high) prices for 1024² and for 3:2 / 2:3."""
    table: dict[tuple[str, str], float] = {}
    for quality, price_square, price_other in zip(
        ("low", "medium", "high"), square, other, strict=True
    ):
        table[(quality, "1024x1024")] = price_square
        table[(quality, "1536x1024")] = price_other
        table[(quality, "1024x1536")] = price_other
    return table


MODELS: Mapping[str, ImageModel] = {
    model.name: model
    for model in (
        ImageModel(
            "gpt-image-1",
            TokenPrices(text_input=5.0, image_input=10.0, image_output=40.0),
            _per_image((0.011, 0.042, 0.167), (0.016, 0.063, 0.25)),
        ),
        ImageModel(
            "gpt-image-1-mini",
            TokenPrices(text_input=2.0, image_input=2.5, image_output=8.0),
            _per_image((0.005, 0.011, 0.036), (0.006, 0.015, 0.052)),
        ),
        ImageModel(
            "gpt-image-1.5",
            TokenPrices(text_input=5.0, image_input=8.0, image_output=32.0, text_output=10.0),
            _per_image((0.009, 0.034, 0.133), (0.013, 0.05, 0.2)),
        ),
    )
}
"""The current GPT image models by name."""
