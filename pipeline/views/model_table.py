"""``synthaug models``: what the packaged catalog knows of each image model on a date,
and, for a spec, what the API said of the models it uses.

One report (`models_report`, also what ``--json`` prints) and one text rendering of it
(`format_models`), so the two cannot disagree.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from ..jobspec.catalog import Catalog, ImageModel
from ..model_check import ModelAnswer

__all__ = ["LIST_SIZE", "format_models", "models_report"]

LIST_SIZE = "1024x1024"
"""The size whose per-image prices the table shows (every priced model makes it)."""
_QUALITIES = ("low", "medium", "high")


def models_report(
    catalog: Catalog,
    today: dt.date,
    *,
    spec_file: str | None = None,
    kind: str | None = None,
    api: Sequence[ModelAnswer] | None = None,
) -> dict[str, Any]:
    """The catalog's models on `today`; with a spec, its kind and the API's answers
    (`api` None: the kind does not ask the API)."""
    report: dict[str, Any] = {
        "today": today.isoformat(),
        "checked": None if catalog.checked is None else catalog.checked.isoformat(),
        "models": [_model_json(catalog, model, today) for model in catalog.models],
    }
    if spec_file is not None:
        report["spec"] = {
            "file": spec_file,
            "kind": kind,
            "asks_api": api is not None,
            "api": None if api is None else [answer.to_json() for answer in api],
        }
    return report


def _model_json(catalog: Catalog, model: ImageModel, today: dt.date) -> dict[str, Any]:
    served = [
        name
        for name in model.replacements
        if (other := catalog.get(name)) is None or other.status(today) != "shut down"
    ]
    tokens = model.tokens
    return {
        "model": model.name,
        "aliases": list(model.aliases),
        "status": model.status(today),
        "shutdown": None if model.shutdown is None else model.shutdown.isoformat(),
        "replacements": served,
        "released": model.released,
        "per_image": {
            quality: price
            for quality in _QUALITIES
            if (price := model.per_image.get((quality, LIST_SIZE))) is not None
        }
        or None,
        "tokens_per_million": None
        if tokens is None
        else {
            "text_input": tokens.text_input,
            "image_input": tokens.image_input,
            "image_output": tokens.image_output,
        },
        "sizes": model.sizes.describe(),
    }


def format_models(report: dict[str, Any]) -> str:
    """The report as a table, then the API's answers for a spec."""
    header = (
        "model",
        "status",
        "shutdown",
        "replacement",
        f"{LIST_SIZE} low/medium/high",
        "per 1M tokens: text in/image in/image out",
    )
    cells = [header, *(_row_cells(row) for row in report["models"])]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [f"image models on {report['today']} (table checked {report['checked'] or '?'})"]
    lines.append(_line(cells[0], widths))
    lines.append("  ".join("-" * width for width in widths))
    lines.extend(_line(row, widths) for row in cells[1:])
    spec = report.get("spec")
    if spec is not None:
        lines.append("")
        lines.extend(_api_lines(spec))
    return "\n".join(lines)


def _row_cells(row: dict[str, Any]) -> tuple[str, ...]:
    per_image, tokens = row["per_image"], row["tokens_per_million"]
    prices = "tokens only" if tokens is not None else "unpriced"
    if per_image:
        prices = "/".join(f"${per_image[q]:.3f}" if q in per_image else "?" for q in _QUALITIES)
    token_prices = (
        "-"
        if tokens is None
        else "/".join(f"${tokens[k]:g}" for k in ("text_input", "image_input", "image_output"))
    )
    instead = row["replacements"]
    replacement = "-"
    if row["status"] != "current" and instead:
        more = len(instead) - 1
        replacement = instead[0] + (f" (or {more} more)" if more else "")
    return (
        row["model"],
        row["status"],
        row["shutdown"] or "-",
        replacement,
        prices,
        token_prices,
    )


def _api_lines(spec: dict[str, Any]) -> list[str]:
    if not spec["asks_api"]:
        return [
            f"{spec['file']}: backend.kind {spec['kind']} is not asked about models "
            "(only kinds whose API lists them are)"
        ]
    answers = spec["api"]
    if not answers:
        return [f"{spec['file']}: no source names a model (the API's default is used)"]
    lines = [f"{spec['file']}: what the API says (GET /models/{{id}}) of the models it uses"]
    width = max(len(answer["model"]) for answer in answers)
    lines.extend(
        f"  {answer['model']:<{width}}  {answer['verdict']}: {answer['detail']}"
        for answer in answers
    )
    return lines


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
