"""What an image costs: before a run from the list prices, after an answer from its usage.

Used for `max_cost_usd` budgets, the cost shown by ``synthaug plan`` and the spend in
``summary.json``. A combination the table cannot price (no model, ``auto`` quality or
size, a model it does not know) costs None, "unknown", rather than a guess; the
`unknown_price_reason` says which key would make it known.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .jobspec.catalog import default_catalog
from .jobspec.model import Spec

__all__ = [
    "BATCH_PRICE_FACTOR",
    "check_cost_budget",
    "cost_from_usage",
    "is_free",
    "price_factor",
    "price_per_image",
    "spec_price",
    "unknown_price_reason",
]

_PER_MILLION = 1_000_000
BATCH_PRICE_FACTOR = 0.5
"""OpenAI's Batch API bills half of the online price (its list prices and its tokens)."""


def price_per_image(
    params: Mapping[str, Any], override: float | None = None, *, free: bool = False
) -> float | None:
    """USD for one image made with `params` (model, quality, size); None when unknown.

    `override` (``run.price_per_image``) wins over the table; a `free` backend (the
    registry says which: rehearsals) costs nothing.
    """
    if override is not None:
        return override
    if free:
        return 0.0
    model = default_catalog().get(params.get("model"))
    if model is None:
        return None
    return model.per_image.get((str(params.get("quality")), str(params.get("size"))))


def unknown_price_reason(params: Mapping[str, Any]) -> str | None:
    """Why the table cannot price `params`, worded as the fix; None when it can."""
    name = params.get("model")
    if name is None:
        return "no params.model: set it (e.g. gpt-image-2) or run.price_per_image"
    model = default_catalog().get(name)
    if model is None:
        return f"model {name} is not in the price table: set run.price_per_image"
    if not model.per_image:
        return (
            f"OpenAI publishes no per-image price for {name} (it bills tokens; a run reads "
            "each answer's cost from its usage): set run.price_per_image"
        )
    missing = [key for key in ("quality", "size") if params.get(key) in (None, "auto")]
    if missing:
        keys = " and ".join(f"params.{key}" for key in missing)
        return f"{name} chooses its {' and '.join(missing)} itself: set {keys}"
    if (str(params["quality"]), str(params["size"])) not in model.per_image:
        return (
            f"{name} has no list price for size {params['size']}: set run.price_per_image "
            "(a run reads each answer's cost from its usage)"
        )
    return None


def check_cost_budget(spec: Spec) -> None:
    """Refuse `max_cost_usd` when some source's price is unknown: the budget could not hold."""
    if spec.run.max_cost_usd is None:
        return
    for index, source in enumerate(spec.sources):
        params = spec.source_params(source)
        if price_per_image(params, spec.run.price_per_image, free=is_free(spec)) is None:
            raise spec.error(
                "run.max_cost_usd",
                f"needs a known price, and sources[{index}] ('{source.name}') has none: "
                f"{unknown_price_reason(params)}",
            )


def spec_price(spec: Spec, params: Mapping[str, Any]) -> float | None:
    """USD for one image of `params` in this spec's job: the list price (or
    ``run.price_per_image``), halved in ``backend.mode: batch``; None when unknown."""
    price = price_per_image(params, spec.run.price_per_image, free=is_free(spec))
    return None if price is None else price * price_factor(spec)


def price_factor(spec: Spec) -> float:
    """What share of the online price this spec's requests are billed."""
    return BATCH_PRICE_FACTOR if spec.backend.mode == "batch" else 1.0


def is_free(spec: Spec) -> bool:
    """True when the spec's backend costs nothing (the registry's `priced`)."""
    return not spec.backend.registered.priced


def cost_from_usage(model_name: object, usage: object) -> float | None:
    """USD an answer reports it cost: its ``usage`` tokens at the model's token prices.

    The shape is OpenAI's: ``input_tokens_details`` splits input into text and image
    tokens, and ``output_tokens_details`` (when present) output likewise; without the
    details, input counts as text and output as image tokens. None when the model is
    unknown or the usage is not of that shape.
    """
    model = default_catalog().get(model_name)
    if model is None or model.tokens is None or not isinstance(usage, Mapping):
        return None
    input_tokens, output_tokens = (
        _count(usage.get("input_tokens")),
        _count(usage.get("output_tokens")),
    )
    if input_tokens is None or output_tokens is None:
        return None
    text_in, image_in = _split(usage.get("input_tokens_details"), input_tokens, "text_tokens")
    text_out, image_out = _split(usage.get("output_tokens_details"), output_tokens, "image_tokens")
    prices = model.tokens
    dollars = (
        text_in * prices.text_input
        + image_in * prices.image_input
        + image_out * prices.image_output
        + text_out * prices.text_output
    )
    return dollars / _PER_MILLION


def _split(details: object, total: int, default_kind: str) -> tuple[int, int]:
    """(text, image) tokens of one side of a usage block; all `default_kind` without details."""
    if isinstance(details, Mapping):
        text, image = _count(details.get("text_tokens", 0)), _count(details.get("image_tokens", 0))
        if text is not None and image is not None:
            return text, image
    return (total, 0) if default_kind == "text_tokens" else (0, total)


def _count(value: object) -> int | None:
    """`value` when it is a token count (a non-negative int), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
