"""What an image costs, from a built-in USD price table (OpenAI list prices).

Used for `max_cost_usd` budgets and for the cost shown by ``synthaug plan``. Roboflow
may bill differently; `run.price_per_image` overrides the table, and a combination the
table does not know costs None ("unknown") rather than a guess.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["PRICES", "price_per_image"]

# (model, size, quality) -> USD per image; quality None = the model has no quality tiers.
PRICES: Mapping[tuple[str, str, str | None], float] = {
    ("dall-e-3", "1024x1024", "standard"): 0.040,
    ("dall-e-3", "1024x1024", "hd"): 0.080,
    ("dall-e-3", "1024x1792", "standard"): 0.080,
    ("dall-e-3", "1792x1024", "standard"): 0.080,
    ("dall-e-3", "1024x1792", "hd"): 0.120,
    ("dall-e-3", "1792x1024", "hd"): 0.120,
    ("dall-e-2", "256x256", None): 0.016,
    ("dall-e-2", "512x512", None): 0.018,
    ("dall-e-2", "1024x1024", None): 0.020,
    ("gpt-image-1", "1024x1024", "low"): 0.011,
    ("gpt-image-1", "1024x1024", "medium"): 0.042,
    ("gpt-image-1", "1024x1024", "high"): 0.167,
    ("gpt-image-1", "1024x1536", "low"): 0.016,
    ("gpt-image-1", "1024x1536", "medium"): 0.063,
    ("gpt-image-1", "1024x1536", "high"): 0.25,
    ("gpt-image-1", "1536x1024", "low"): 0.016,
    ("gpt-image-1", "1536x1024", "medium"): 0.063,
    ("gpt-image-1", "1536x1024", "high"): 0.25,
}


def price_per_image(
    params: Mapping[str, Any], override: float | None = None, *, backend_kind: str = "roboflow"
) -> float | None:
    """USD for one image made with `params` (model, size, quality); None when unknown.

    `override` (``run.price_per_image``) wins over the table; the mock backend is free.
    """
    if override is not None:
        return override
    if backend_kind == "mock":
        return 0.0
    model, size = str(params.get("model")), str(params.get("size"))
    quality = params.get("quality")
    price = PRICES.get((model, size, None if quality is None else str(quality)))
    if price is None:
        price = PRICES.get((model, size, None))  # a model without quality tiers
    return price
