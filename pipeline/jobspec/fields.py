"""The job spec's field types: names, rates, sizes, URLs, variable values and limits.

Each type validates and normalizes one kind of value (``5/min`` becomes requests per
second, ``.JPG`` becomes ``.jpg``) and words its mistake for the user; `pipeline.jobspec.model`
composes the settings from them.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    WithJsonSchema,
)

from ..registry import BACKENDS, DEFAULT_KIND, backend_kind
from ..store.layout import is_object_url
from .yamlfile import show_value

__all__ = [
    "DEFAULT_API_KEY_ENV",
    "DEFAULT_BASE_URL",
    "DEFAULT_CONCURRENCY",
    "ENV_NAME",
    "INPUT_KINDS",
    "MAX_ATTEMPTS",
    "MAX_CONCURRENCY",
    "MAX_N",
    "SHARD_FIELD",
    "EnvName",
    "Extension",
    "ImageSize",
    "InputKindName",
    "KeyEnvName",
    "Name",
    "NonBlank",
    "Rate",
    "Url",
    "VarValues",
    "check_kind",
    "is_object_url",
    "parse_rate",
    "staging_folder",
]


InputKindName = Literal["none", "images", "folder", "roboflow_ids", "urls", "roboflow_search"]
# roboflow_search before roboflow_ids: a resolved search source carries both (the ids it
# found, and the search they came from), and is still a search source
INPUT_KINDS: tuple[str, ...] = ("images", "folder", "roboflow_search", "roboflow_ids", "urls")
DEFAULT_BASE_URL = BACKENDS[DEFAULT_KIND].base_url
DEFAULT_API_KEY_ENV = BACKENDS[DEFAULT_KIND].api_key_env
DEFAULT_CONCURRENCY = 4
# Upper bounds that catch typos before they cost memory or money: each worker is a task
# and a connection (a stray 10**9 would exhaust memory before the first request), OpenAI
# returns at most 10 images per request, and past 100 attempts an item is not transient.
MAX_CONCURRENCY = 1000
MAX_N = 10
MAX_ATTEMPTS = 100

_NAME = re.compile(r"[A-Za-z0-9._-]+")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SIZE = re.compile(r"[1-9][0-9]*x[1-9][0-9]*")
_RATE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:/\s*([A-Za-z]+))?\s*")
_PER = {"s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60, "h": 3600, "hr": 3600, "hour": 3600}


def parse_rate(text: str | float) -> float:
    """Requests per second from ``N/s``, ``N/min``, ``N/h`` or a bare number (per second)."""
    if isinstance(text, str):
        match = _RATE.fullmatch(text)
        unit = match.group(2) if match else None
        if match is None or (unit is not None and unit.lower() not in _PER):
            raise ValueError(
                f"expected a rate like 5/min, 2/s, 100/h or 0.5, got {show_value(text)}"
            )
        rate = float(match.group(1)) / _PER[unit.lower() if unit else "s"]
    else:
        rate = float(text)
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"a rate must be greater than 0, got {show_value(text)}")
    return rate


def _rate_or_none(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a rate like 5/min, got {show_value(value)}")
    return parse_rate(value)


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(
            f"{show_value(value)} is not a safe name: use letters, digits, '.', '_', '-'"
        )
    return value


def _check_size(value: str) -> str:
    if value != "auto" and not _SIZE.fullmatch(value):
        raise ValueError(f"expected auto or WIDTHxHEIGHT like 1024x1024, got {show_value(value)}")
    return value


def _check_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http(s) URL, got {show_value(value)}")
    return value


def check_kind(value: str) -> str:
    backend_kind(value)  # raises ValueError naming the kinds there are
    return value


def _check_nonblank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _var_values(value: object) -> tuple[str, ...]:
    """A list of strings or numbers, non-empty, no repeats, as strings."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of values, got {show_value(value)}")
    if not value:
        raise ValueError("needs at least one value")
    out: list[str] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ValueError(
                f"values must be strings or numbers, got {show_value(item)} (quote it)"
            )
        text = str(item)
        if text in out:
            raise ValueError(f"value {show_value(text)} appears twice")
        out.append(text)
    return tuple(out)


def _extension(value: str) -> str:
    value = value.strip().lower()
    return value if value.startswith(".") else f".{value}"


_RATE_SCHEMA = {
    "anyOf": [
        {"type": "string", "pattern": r"^\s*[0-9.eE+-]+\s*(/\s*[A-Za-z]+)?\s*$"},
        {"type": "number", "exclusiveMinimum": 0},
        {"type": "null"},
    ]
}
Rate = Annotated[float | None, BeforeValidator(_rate_or_none), WithJsonSchema(_RATE_SCHEMA)]
Name = Annotated[str, AfterValidator(_check_name)]


def _check_env_name(value: str) -> str:
    if not ENV_NAME.fullmatch(value):
        raise ValueError(f"{show_value(value)} is not an environment variable name")
    return value


ImageSize = Annotated[str, AfterValidator(_check_size)]
EnvName = Annotated[str, AfterValidator(_check_env_name)]
"""The name of an environment variable (where a key is read from; never the key)."""
SHARD_FIELD = "{shard}"


def _check_key_env_name(value: str) -> str:
    if not ENV_NAME.fullmatch(value.replace(SHARD_FIELD, "0")) or value.startswith(SHARD_FIELD):
        raise ValueError(
            f"{show_value(value)} is not an environment variable name (it may contain "
            f"{SHARD_FIELD}, not at its start, for one key per shard: OPENAI_API_KEY_{SHARD_FIELD})"
        )
    return value


KeyEnvName = Annotated[str, AfterValidator(_check_key_env_name)]
"""An environment variable's name that may contain ``{shard}``: each ``--shard I/N`` run
reads its own key (I in place of ``{shard}``)."""
Url = Annotated[str, AfterValidator(_check_url)]
NonBlank = Annotated[str, AfterValidator(_check_nonblank)]
VarValues = Annotated[
    tuple[str, ...],
    BeforeValidator(_var_values),
    WithJsonSchema({"type": "array", "items": {"type": ["string", "number"]}, "minItems": 1}),
]
Extension = Annotated[str, AfterValidator(_extension)]


STAGING_ENV = "SYNTHAUG_STAGING"
"""Where runs on an object-storage OUT stage their files (default ~/.cache/synthaug/staging)."""


def staging_folder(url: str) -> Path:
    """The local folder a run on the OUT at `url` works in: the same on every run of this
    machine (a killed run's unsent tail is found again), another for every URL."""
    root = os.environ.get(STAGING_ENV) or Path.home() / ".cache" / "synthaug" / "staging"
    digest = hashlib.sha256(url.strip().rstrip("/").encode()).hexdigest()[:16]
    return Path(root).expanduser().absolute() / digest
