"""The YAML job spec: read once into frozen settings objects, or fail with one clear line.

This module is the spec model: the settings classes with their defaults and validators,
the rules that span several keys, the command-line overrides and the JSON schema. Reading
the file and wording its mistakes (``spec.yaml:14 sources[2].folder: ...``, key paths
mapped back to lines, "did you mean") live one layer down in `pipeline.spec.yamlfile`.

Beyond the model itself, `load_spec` checks what only the disk can tell: that globs
match, folders hold images, files are images, and every template placeholder has values.
Those checks stay here because they walk the model's sources.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import math
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from ..errors import SpecError, UsageError
from ..registry import BACKENDS, DEFAULT_KIND, backend_kind
from ..sources import (
    DEFAULT_EXTENSIONS,
    InputError,
    check_image_file,
    iter_folder,
    list_globs,
)
from .models import MODELS, RETIRED_MODELS
from .template import TemplateError, count_variants, parse_template, resolve_values
from .yamlfile import did_you_mean, line_for, read_yaml, show_value, validation_error

__all__ = [
    "DEFAULT_API_KEY_ENV",
    "DEFAULT_BASE_URL",
    "DEFAULT_CONCURRENCY",
    "INPUT_KINDS",
    "MAX_ATTEMPTS",
    "MAX_CONCURRENCY",
    "MAX_N",
    "BackendSettings",
    "InputKindName",
    "Params",
    "RunSettings",
    "SourceParams",
    "SourceSpec",
    "Spec",
    "apply_overrides",
    "json_schema",
    "load_spec",
    "parse_rate",
    "spec_from_data",
]

InputKindName = Literal["none", "images", "folder", "roboflow_ids", "urls"]
INPUT_KINDS: tuple[str, ...] = ("images", "folder", "roboflow_ids", "urls")
DEFAULT_BASE_URL = "https://api.roboflow.com"
DEFAULT_API_KEY_ENV = "ROBOFLOW_API_KEY"
DEFAULT_CONCURRENCY = 4
# Upper bounds that catch typos before they cost memory or money: each worker is a task
# and a connection (a stray 10**9 would exhaust memory before the first request), OpenAI
# returns at most 10 images per request, and past 100 attempts an item is not transient.
MAX_CONCURRENCY = 1000
MAX_N = 10
MAX_ATTEMPTS = 100

_NAME = re.compile(r"[A-Za-z0-9._-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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


def _check_kind(value: str) -> str:
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
ImageSize = Annotated[str, AfterValidator(_check_size)]
Url = Annotated[str, AfterValidator(_check_url)]
NonBlank = Annotated[str, AfterValidator(_check_nonblank)]
VarValues = Annotated[
    tuple[str, ...],
    BeforeValidator(_var_values),
    WithJsonSchema({"type": "array", "items": {"type": ["string", "number"]}, "minItems": 1}),
]
Extension = Annotated[str, AfterValidator(_extension)]


class _Model(BaseModel):
    # No .inf / .nan: an infinite grace period or timeout would hang a nightly run.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class BackendSettings(_Model):
    """Which API to call and how; the key itself comes from the environment."""

    kind: Annotated[
        str,
        AfterValidator(_check_kind),
        WithJsonSchema({"type": "string", "enum": list(BACKENDS)}),
    ] = Field(default=DEFAULT_KIND, description=" | ".join(BACKENDS))
    base_url: str = Field(default=DEFAULT_BASE_URL, description="API root URL")
    api_key_env: str = Field(default=DEFAULT_API_KEY_ENV, description="env var holding the API key")
    timeout_s: float = Field(default=180.0, gt=0, description="seconds to wait for one answer")
    allow_insecure_http: bool = Field(
        default=False, description="allow a plain http:// base_url that is not loopback"
    )

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if not _ENV_NAME.fullmatch(value):
            raise ValueError(f"{show_value(value)} is not an environment variable name")
        return value


class Params(_Model):
    """OpenAI image parameters: only those the spec sets are sent.

    Nothing is defaulted here on purpose: the API applies its own defaults, and a default
    baked into synthaug outlives the model it was written for (dall-e-3 was sent with
    every request until OpenAI retired it).
    """

    model: NonBlank | None = Field(
        default=None, description="gpt-image-1, gpt-image-1-mini, gpt-image-1.5, ..."
    )
    n: int | None = Field(default=None, ge=1, le=MAX_N, description="images per request")
    quality: Literal["low", "medium", "high", "auto"] | None = None
    size: ImageSize | None = Field(
        default=None, description="1024x1024, 1536x1024, 1024x1536 or auto"
    )
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(
        default=None, ge=0, le=100, description="percent; jpeg and webp only"
    )
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    force_caption_regenerate: bool | None = Field(
        default=None, description="roboflow_ids sources only"
    )
    unmodified_prompt: bool | None = Field(
        default=None, description="turn off the photorealism suffix"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_style(cls, data: Any) -> Any:
        if isinstance(data, dict) and "style" in data:
            raise ValueError(
                "style was a dall-e-3 parameter and GPT image models do not take it: remove it"
            )
        return data

    @field_validator("model")
    @classmethod
    def _current_model(cls, value: str | None) -> str | None:
        if value is not None and value in RETIRED_MODELS:
            others = ", ".join(name for name in MODELS if name != RETIRED_MODELS[value])
            raise ValueError(
                f"{value} was retired by OpenAI on 2026-05-12: use {RETIRED_MODELS[value]} "
                f"(or {others})"
            )
        return value

    def request_params(self) -> dict[str, Any]:
        """The parameters to send: exactly those the spec set."""
        return self.model_dump(exclude_none=True)


SourceParams = Params
"""Per-source overrides: the same keys; those a source sets replace the global ones."""


class RunSettings(_Model):
    """How hard to push the API and when to stop."""

    concurrency: int = Field(
        default=DEFAULT_CONCURRENCY, ge=1, le=MAX_CONCURRENCY, description="requests in flight"
    )
    rate_limit: Rate = Field(
        default=None, description="request starts per period (default 5/min; none for mock)"
    )
    image_rate_limit: Rate = Field(default=None, description="images (requests x n) per period")
    max_attempts: int = Field(default=6, ge=1, le=MAX_ATTEMPTS)
    backoff_base_s: float = Field(
        default=1.0, gt=0, description="first retry waits up to this (full jitter), doubling"
    )
    backoff_max_s: float = Field(default=60.0, gt=0, description="longest wait between attempts")
    max_images: int | None = Field(default=None, ge=1, description="image budget for this run")
    max_cost_usd: float | None = Field(default=None, gt=0, description="cost budget for this run")
    max_items: int = Field(default=10_000, ge=1, description="refuse a spec that expands to more")
    retry_failed: bool = True
    retry_ambiguous: bool = Field(
        default=True, description="retry requests that may have been paid"
    )
    price_per_image: float | None = Field(
        default=None, ge=0, description="USD; overrides the table"
    )
    max_consecutive_failures: int = Field(default=20, ge=1)
    grace_period_s: float = Field(default=10.0, ge=0)
    fsync_interval_s: float = Field(default=0.5, ge=0)


class SourceSpec(_Model):
    """One source of work items: a prompt template and at most one kind of input."""

    name: Name = Field(description="[A-Za-z0-9._-]+, unique; names the output folder")
    prompt: NonBlank
    vars: dict[str, VarValues] = Field(default_factory=dict)
    combine: Literal["product", "zip", "sample"] = "product"
    samples: int | None = Field(default=None, ge=1, description="with combine: sample")
    seed: int | None = Field(default=None, description="with combine: sample (default 0)")
    repeats: int = Field(default=1, ge=1)
    params: SourceParams = SourceParams()
    images: tuple[NonBlank, ...] | None = Field(
        default=None, min_length=1, description="globs relative to the spec file"
    )
    folder: NonBlank | None = Field(default=None, description="relative to the spec file")
    recursive: bool | None = None
    extensions: tuple[Extension, ...] | None = Field(default=None, min_length=1)
    roboflow_ids: tuple[NonBlank, ...] | None = Field(default=None, min_length=1)
    urls: tuple[Url, ...] | None = Field(default=None, min_length=1)

    @property
    def input_kind(self) -> InputKindName:
        """Which input this source has: ``none`` for a prompt-only source."""
        for kind in INPUT_KINDS:
            if getattr(self, kind) is not None:
                return kind  # type: ignore[return-value]
        return "none"

    def iter_files(self, spec_dir: Path) -> Iterator[Path]:
        """The local input files, sorted (nothing for non-file sources)."""
        if self.images is not None:
            yield from list_globs(self.images, spec_dir)
        elif self.folder is not None:
            extensions = self.extensions or DEFAULT_EXTENSIONS
            yield from iter_folder(
                spec_dir / self.folder, recursive=bool(self.recursive), extensions=extensions
            )


class Spec(_Model):
    """A whole job spec, version 1."""

    model_config = ConfigDict(
        title="synthaug job spec",
        json_schema_extra={"description": "A synthaug batch augmentation job (version 1)."},
    )

    version: int
    name: Name
    output_dir: Path = Field(description="relative to the spec file's folder; default runs/<name>")
    backend: BackendSettings = BackendSettings()
    project_url: str | None = Field(
        default=None, description="Roboflow project receiving the images"
    )
    params: Params = Params()
    run: RunSettings = RunSettings()
    sources: tuple[SourceSpec, ...] = Field(min_length=1)

    _spec_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _spec_file: str = PrivateAttr(default="<spec>")
    _lines: Mapping[str, int] = PrivateAttr(default_factory=dict)
    _raw: Mapping[str, Any] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any) -> None:
        """Keep where the spec came from: relative paths resolve against its folder."""
        if isinstance(context, dict):
            self._spec_dir = context["spec_dir"]
            self._spec_file = context["spec_file"]
            self._lines = context["lines"]
            self._raw = context["raw"]

    @property
    def spec_dir(self) -> Path:
        """The absolute folder of the spec file (base of globs, folders and wildcards)."""
        return self._spec_dir

    @property
    def spec_file(self) -> str:
        """The spec path as the user gave it (for messages)."""
        return self._spec_file

    def source_params(self, source: SourceSpec) -> dict[str, Any]:
        """The request parameters of `source`: global params, then its overrides.

        A global ``force_caption_regenerate`` only reaches sources with roboflow_ids,
        the only kind the API applies it to.
        """
        params = self.params.request_params()
        params.update(source.params.model_dump(exclude_none=True))
        if source.roboflow_ids is None:
            params.pop("force_caption_regenerate", None)
        return params

    def error(self, key_path: str, message: str, value: object = None) -> SpecError:
        """A `SpecError` about `key_path` of this spec, with its line when known."""
        line = line_for(self._lines, key_path)
        return SpecError(message, file=self._spec_file, key_path=key_path, line=line, value=value)

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        """Defaults that depend on other keys: output_dir on name, rate limit on backend."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for section in ("backend", "params", "run"):
            if section in data and data[section] is None:
                data[section] = {}  # a section whose lines are all commented out
        backend, run = data.get("backend", {}), data.get("run", {})
        kind = BACKENDS.get(
            backend.get("kind", DEFAULT_KIND) if isinstance(backend, dict) else DEFAULT_KIND
        )
        if isinstance(run, dict) and "rate_limit" not in run and kind is not None:
            data["run"] = {**run, "rate_limit": kind.default_rate_limit}
        if "output_dir" not in data and isinstance(data.get("name"), str):
            data["output_dir"] = f"runs/{data['name']}"
        return data

    @field_validator("version")
    @classmethod
    def _version(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"unsupported version {value}: this synthaug reads version 1")
        return value

    @field_validator("output_dir")
    @classmethod
    def _resolve_output_dir(cls, value: Path, info: Any) -> Path:
        base = info.context["spec_dir"] if isinstance(info.context, dict) else Path.cwd()
        return Path(base, value.expanduser()).absolute()


class _Problem(Exception):
    """A spec problem found after validation, at `key_path`."""

    def __init__(self, key_path: str, message: str, value: object = None) -> None:
        super().__init__(message)
        self.key_path, self.message, self.value = key_path, message, value


def load_spec(path: Path | str) -> Spec:
    """Read, validate and check the spec at `path`; raise one `SpecError` for any mistake."""
    shown = str(path)
    data, lines = read_yaml(Path(path), shown)
    return _build_checked(data, Path(path).absolute().parent, shown, lines)


def spec_from_data(
    data: Mapping[str, Any], *, base_dir: Path | str | None = None, name: str = "<dict>"
) -> Spec:
    """Validate and check a spec given as data (what YAML would load to).

    Relative paths resolve against `base_dir` (default: the current directory); errors
    name `name` where a file's would name the file, without line numbers.
    """
    if not isinstance(data, Mapping):
        raise SpecError(f"a spec is a mapping of keys, got {type(data).__name__}", file=name)
    folder = Path(base_dir if base_dir is not None else Path.cwd()).absolute()
    return _build_checked(copy.deepcopy(dict(data)), folder, name, {})


def _build_checked(
    data: Mapping[str, Any], spec_dir: Path, shown: str, lines: Mapping[str, int]
) -> Spec:
    """`_build`, then the checks only the disk can answer."""
    spec = _build(data, spec_dir, shown, lines)
    try:
        _check_inputs(spec)
    except _Problem as exc:
        raise spec.error(exc.key_path, exc.message, exc.value) from None
    return spec


def _build(data: Mapping[str, Any], spec_dir: Path, shown: str, lines: Mapping[str, int]) -> Spec:
    """Validate `data` into a `Spec` and run the checks that span several keys."""
    context = {"spec_dir": spec_dir, "spec_file": shown, "lines": lines, "raw": data}
    try:
        spec = Spec.model_validate(data, context=context)
    except ValidationError as exc:
        raise validation_error(exc, Spec, shown, lines) from None
    try:
        _check_semantics(spec)
    except _Problem as exc:
        raise spec.error(exc.key_path, exc.message, exc.value) from None
    return spec


def _check_semantics(spec: Spec) -> None:
    """Rules spanning several keys; raise `_Problem` at the key to fix."""
    _check_base_url(spec.backend)
    if backend_kind(spec.backend.kind).needs_project and not spec.project_url:
        raise _Problem(
            "project_url",
            f"required for backend {spec.backend.kind} (the project to add images to)",
        )
    seen: dict[str, int] = {}
    for index, source in enumerate(spec.sources):
        at = f"sources[{index}]"
        if source.name in seen:
            raise _Problem(
                f"{at}.name",
                f"duplicate source name '{source.name}' (see sources[{seen[source.name]}])",
            )
        seen[source.name] = index
        _check_source_keys(source, at)
        _check_params(spec.source_params(source), source.params, at)


def _check_params(params: Mapping[str, Any], own: Params, at: str) -> None:
    """Combinations the API would refuse, caught before anything is paid for.

    `params` are a source's merged parameters; the key path names the source's own
    key when it set it, the global one otherwise.
    """

    def where(key: str) -> str:
        return f"{at}.params.{key}" if getattr(own, key) is not None else f"params.{key}"

    model = MODELS.get(str(params.get("model")))
    size = params.get("size")
    if model is not None and size is not None and size not in model.sizes:
        raise _Problem(
            where("size"),
            f"{model.name} makes {', '.join(model.sizes)}, not {size}",
            size,
        )
    output_format = params.get("output_format")
    if params.get("output_compression") is not None and output_format not in ("jpeg", "webp"):
        raise _Problem(where("output_compression"), "only applies with output_format jpeg or webp")
    if params.get("background") == "transparent" and output_format == "jpeg":
        raise _Problem(
            where("background"), "a transparent background needs output_format png or webp"
        )


def _check_base_url(backend: BackendSettings) -> None:
    parts = urlsplit(backend.base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Problem(
            "backend.base_url", f"expected an http(s) URL, got {show_value(backend.base_url)}"
        )
    if (
        parts.scheme == "http"
        and not backend.allow_insecure_http
        and not _is_loopback(parts.hostname)
    ):
        raise _Problem(
            "backend.base_url",
            "plain http would send the API key in clear; use https "
            "(or set backend.allow_insecure_http: true)",
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_source_keys(source: SourceSpec, at: str) -> None:
    given = [kind for kind in INPUT_KINDS if getattr(source, kind) is not None]
    if len(given) > 1:
        raise _Problem(
            f"{at}.{given[1]}", f"a source takes one input kind, found {' and '.join(given)}"
        )
    for key in ("recursive", "extensions"):
        if source.folder is None and getattr(source, key) is not None:
            raise _Problem(f"{at}.{key}", "only applies to a folder source")
    if source.combine == "sample" and source.samples is None:
        raise _Problem(f"{at}.samples", "required with combine: sample")
    for key in ("samples", "seed"):
        if source.combine != "sample" and getattr(source, key) is not None:
            raise _Problem(f"{at}.{key}", "only applies with combine: sample")
    if source.params.force_caption_regenerate is not None and source.roboflow_ids is None:
        raise _Problem(f"{at}.params.force_caption_regenerate", "only applies to roboflow_ids")


def _check_inputs(spec: Spec) -> None:
    """What only the disk can tell: templates resolve, globs match, files are images."""
    for index, source in enumerate(spec.sources):
        at = f"sources[{index}]"
        _check_prompt(spec, source, at)
        if source.images is not None:
            for number, pattern in enumerate(source.images):
                files = list_globs([pattern], spec.spec_dir)
                if not files:
                    raise _Problem(f"{at}.images[{number}]", f"no files match {pattern}", pattern)
                _check_files(files, f"{at}.images[{number}]")
        elif source.folder is not None:
            _check_folder(spec, source, at)


def _check_prompt(spec: Spec, source: SourceSpec, at: str) -> None:
    try:
        template = parse_template(source.prompt)
    except TemplateError as exc:
        raise _Problem(f"{at}.prompt", str(exc), source.prompt) from None
    try:
        values = resolve_values(template, source.vars, spec.spec_dir)
    except TemplateError as exc:
        if exc.var in source.vars:
            raise _Problem(f"{at}.vars.{exc.var}", str(exc)) from None
        hint = did_you_mean(exc.var or "", source.vars)
        raise _Problem(f"{at}.prompt", f"{exc}{hint}", source.prompt) from None
    try:
        count_variants(values, source.combine, source.samples)
    except TemplateError as exc:
        key = "samples" if source.combine == "sample" else "vars"
        raise _Problem(f"{at}.{key}", str(exc)) from None


def _check_folder(spec: Spec, source: SourceSpec, at: str) -> None:
    folder = spec.spec_dir / str(source.folder)
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise _Problem(f"{at}.folder", f"{source.folder} {state}", source.folder)
    if not _check_files(source.iter_files(spec.spec_dir), f"{at}.folder"):
        extensions = ", ".join(source.extensions or DEFAULT_EXTENSIONS)
        recursive = ", recursive" if source.recursive else ""
        raise _Problem(
            f"{at}.folder", f"no images in {source.folder} (extensions {extensions}{recursive})"
        )


def _check_files(files: Iterator[Path] | list[Path], key_path: str) -> int:
    count = 0
    for path in files:
        try:
            check_image_file(path)
        except InputError as exc:
            raise _Problem(key_path, str(exc), str(path)) from None
        count += 1
    return count


def apply_overrides(
    spec: Spec,
    *,
    backend: str | None = None,
    concurrency: int | None = None,
    rate_limit: str | None = None,
    max_attempts: int | None = None,
    max_images: int | None = None,
    output_dir: Path | str | None = None,
    retry_failed: bool | None = None,
) -> Spec:
    """`spec` with command-line flags applied, validated like the YAML values.

    A flag value that is wrong raises `UsageError`; a combination the new values make
    invalid (``--backend roboflow`` on a spec without project_url) raises `SpecError`.
    `output_dir` is relative to the current directory, like any path on a command line.
    """
    raw: dict[str, Any] = copy.deepcopy(dict(spec._raw))
    sections = {key: dict(raw.get(key) or {}) for key in ("backend", "run")}
    if backend is not None:
        if backend not in BACKENDS:
            raise UsageError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        sections["backend"]["kind"] = backend
    for flag, key, value in (
        ("--concurrency", "concurrency", concurrency),
        ("--max-attempts", "max_attempts", max_attempts),
        ("--max-images", "max_images", max_images),
    ):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{flag}: must be a whole number of at least 1, got {value!r}")
            sections["run"][key] = value
    if rate_limit is not None:
        try:
            sections["run"]["rate_limit"] = parse_rate(rate_limit)
        except ValueError as exc:
            raise UsageError(f"--rate: {exc}") from None
    if retry_failed is not None:
        sections["run"]["retry_failed"] = retry_failed
    if output_dir is not None:
        raw["output_dir"] = str(Path(output_dir).expanduser().absolute())
    raw.update({key: value for key, value in sections.items() if value or key in raw})
    return _build(raw, spec.spec_dir, spec.spec_file, spec._lines)


def json_schema() -> dict[str, Any]:
    """The JSON schema of a job spec (``configs/schema.json``), for editors and CI."""
    schema = Spec.model_json_schema()
    schema["required"] = [k for k in schema["required"] if k != "output_dir"]  # has a default
    schema["properties"]["version"]["const"] = 1
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


if __name__ == "__main__":  # python -m pipeline.spec > configs/schema.json
    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
