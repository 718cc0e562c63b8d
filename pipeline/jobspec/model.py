"""The job spec model: frozen settings objects, their defaults and validators.

Defaults are declared once, here (the engine, the limiter and the retry policy read them
from these objects). Rules that span several keys and the checks that need the disk live
in `pipeline.jobspec.load`; field types in `pipeline.jobspec.fields`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from ..errors import SpecError
from ..registry import BACKENDS, DEFAULT_KIND, BackendKind
from ..sources import (
    DEFAULT_EXTENSIONS,
    iter_folder,
    list_globs,
)
from .catalog import default_catalog
from .fields import (
    DEFAULT_API_KEY_ENV,
    DEFAULT_BASE_URL,
    DEFAULT_CONCURRENCY,
    INPUT_KINDS,
    MAX_ATTEMPTS,
    MAX_CONCURRENCY,
    MAX_N,
    EnvName,
    Extension,
    ImageSize,
    InputKindName,
    KeyEnvName,
    Name,
    NonBlank,
    Rate,
    Url,
    VarValues,
    check_kind,
    is_object_url,
    staging_folder,
)
from .stage_settings import CheckSettings, LabelSettings, UploadSettings
from .yamlfile import line_for

__all__ = [
    "BackendSettings",
    "Params",
    "RunSettings",
    "SearchSettings",
    "SourceParams",
    "SourceSpec",
    "Spec",
    "UploadSettings",
]


class _Model(BaseModel):
    # No .inf / .nan: an infinite grace period or timeout would hang a nightly run.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class BackendSettings(_Model):
    """Which API to call and how; the key itself comes from the environment."""

    kind: Annotated[
        str,
        AfterValidator(check_kind),
        WithJsonSchema({"type": "string", "enum": list(BACKENDS)}),
    ] = Field(default=DEFAULT_KIND, description=" | ".join(BACKENDS))
    base_url: str = Field(
        default=DEFAULT_BASE_URL, description="API root URL (default: the kind's own)"
    )
    api_key_env: KeyEnvName = Field(
        default=DEFAULT_API_KEY_ENV,
        description="env var holding the API key (default: the kind's own); with {shard} "
        "in it (OPENAI_API_KEY_{shard}), each --shard I/N run reads its own key",
    )
    timeout_s: float = Field(default=180.0, gt=0, description="seconds to wait for one answer")
    allow_insecure_http: bool = Field(
        default=False, description="allow a plain http:// base_url that is not loopback"
    )
    mode: Literal["online", "batch"] = Field(
        default="online",
        description="online: one request at a time; batch: OpenAI's Batch API (half price, "
        "results within 24 h; kinds openai and mock)",
    )
    batch_size: int = Field(
        default=50_000, ge=1, le=50_000, description="mode batch: requests per batch at most"
    )
    poll_interval_s: float = Field(
        default=30.0, gt=0, description="mode batch: first wait between polls, growing 1.5x"
    )
    poll_max_s: float = Field(
        default=600.0, gt=0, description="mode batch: longest wait between polls"
    )
    retry_online: bool = Field(
        default=False,
        description="mode batch: retry a failed line online (now, full price, paced by run) "
        "instead of in a new batch",
    )

    @property
    def registered(self) -> BackendKind:
        """What the registry says of this kind: its needs, defaults and classes (looked up
        here, once per question, so no module tests a kind by its name)."""
        return BACKENDS[self.kind]


class Params(_Model):
    """OpenAI image parameters: only those the spec sets are sent.

    Nothing is defaulted here on purpose: the API applies its own defaults, and a default
    baked into synthaug outlives the model it was written for (dall-e-3 was sent with
    every request until OpenAI retired it).
    """

    model: NonBlank | None = Field(
        default=None,
        description="gpt-image-2, gpt-image-2.6-flare, ... (synthaug models lists them)",
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
        default=None, description="roboflow_ids and roboflow_search sources only"
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
        default=1.0,
        gt=0,
        description=(
            "first retry waits up to this (full jitter), doubling; a 429 without "
            "Retry-After pauses every start this long, doubling"
        ),
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


# --- roboflow_search (issue 13): a source whose inputs a Roboflow image search finds ---

DEFAULT_SEARCH_LIMIT = 50
"""Images a search source takes when it sets no `limit` (the search API's own page size).
A prompt or like_image search sorts the whole project rather than filtering it, so a
search always has a limit."""
MAX_SEARCH_LIMIT = 10_000
SEARCH_QUERY_KEYS: tuple[str, ...] = ("prompt", "like_image", "tag", "class_name")


class SearchSettings(_Model):
    """A Roboflow image search whose ids become a source's inputs (``roboflow_search:``).

    Exactly one of `SEARCH_QUERY_KEYS` is set (checked by `pipeline.jobspec.load`); its
    ``prompt`` is the search's text, not the source's generation prompt.
    """

    workspace: Name = Field(description="Roboflow workspace id (from the project's URL)")
    project: Name = Field(description="Roboflow project id within the workspace")
    prompt: NonBlank | None = Field(default=None, description="semantic search text")
    like_image: NonBlank | None = Field(
        default=None, description="an image of the project: find similar ones"
    )
    tag: NonBlank | None = Field(default=None, description="images with this tag")
    class_name: NonBlank | None = Field(default=None, description="images with this class")
    limit: int = Field(
        default=DEFAULT_SEARCH_LIMIT,
        ge=1,
        le=MAX_SEARCH_LIMIT,
        description=f"take at most this many images (default {DEFAULT_SEARCH_LIMIT})",
    )
    in_dataset: bool | NonBlank | None = Field(
        default=None, description="only images in the dataset (or in this project)"
    )
    batch: bool | None = Field(default=None, description="only images in some batch")
    batch_id: NonBlank | None = Field(default=None, description="only images in this batch")

    def filters(self) -> dict[str, Any]:
        """The request body's query fields: those the spec set, without paging."""
        return self.model_dump(exclude_none=True, exclude={"workspace", "project", "limit"})


# --- end roboflow_search ---

# --- roboflow_balance (issue 20): a source planned from a project's class counts ---

BALANCE_CLASS_VAR = "class"
"""The placeholder a balance source's prompt names its class with: ``{class}``."""


class BalanceSettings(_Model):
    """Generate what a Roboflow project lacks (``roboflow_balance:``): its class counts
    are read once per OUT (``GET {base_url}/{workspace}/{project}``) and each class below
    `target` gets requests for the images it is short of. The URL and key default as
    ``upload:``'s do, so any backend kind can make the images."""

    workspace: Name = Field(description="Roboflow workspace id (from the project's URL)")
    project: Name = Field(description="Roboflow project id within the workspace")
    target: int = Field(ge=1, le=1_000_000, description="images wanted per class")
    classes: tuple[NonBlank, ...] | None = Field(
        default=None, min_length=1, description="only these classes (default: every one)"
    )
    max_per_class: int | None = Field(
        default=None, ge=1, description="plan at most this many images for one class"
    )
    prompts: dict[NonBlank, NonBlank] = Field(
        default_factory=dict,
        description="a class's own prompt template (for a name that reads badly in a sentence)",
    )
    base_url: Url | None = Field(
        default=None,
        description="API root (default https://api.roboflow.com; the embedded mock's for mock)",
    )
    api_key_env: EnvName = Field(
        default=DEFAULT_API_KEY_ENV, description="env var holding the Roboflow API key"
    )


# --- end roboflow_balance ---


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
    roboflow_search: SearchSettings | None = Field(
        default=None, description="Roboflow image ids found by a search (run or plan --resolve)"
    )
    roboflow_balance: BalanceSettings | None = Field(
        default=None,
        description="prompt-only items planned from a project's class counts (run or plan "
        "--resolve): {class} in the prompt",
    )
    mask: NonBlank | None = Field(
        default=None,
        description="a PNG mask for every edit of the source, relative to the spec file "
        "(images, folder or urls; kinds openai and mock)",
    )

    _balance_plan: dict[str, int] | None = PrivateAttr(default=None)

    @property
    def balance_plan(self) -> Mapping[str, int] | None:
        """A balance source's requests per class, once its counts are recorded
        (`pipeline.balance`); None before, and for every other source."""
        return self._balance_plan

    def with_balance_plan(self, plan: Mapping[str, int]) -> SourceSpec:
        """This balance source with its requests per class known."""
        copy = self.model_copy()
        copy._balance_plan = dict(plan)
        return copy

    def prompt_for(self, name: str | None) -> str:
        """The prompt template of class `name` (a balance source's own per class), else
        the source's."""
        if name is None or self.roboflow_balance is None:
            return self.prompt
        return self.roboflow_balance.prompts.get(name, self.prompt)

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
    output_dir: Path = Field(
        description="relative to the spec file's folder; default runs/<name>; or object "
        "storage: s3://bucket/prefix (pip install 'synthaug[s3]')"
    )
    backend: BackendSettings = BackendSettings()
    project_url: str | None = Field(
        default=None, description="Roboflow project receiving the images"
    )
    params: Params = Params()
    run: RunSettings = RunSettings()
    sources: tuple[SourceSpec, ...] = Field(min_length=1)
    check: CheckSettings | None = Field(
        default=None, description="perceptual hashes of every stored image; flags, never deletes"
    )
    label: LabelSettings | None = Field(
        default=None, description="hosted detection of every stored image: its labels"
    )
    upload: UploadSettings | None = Field(
        default=None, description="upload every stored image to a Roboflow project"
    )

    _spec_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _spec_file: str = PrivateAttr(default="<spec>")
    _lines: Mapping[str, int] = PrivateAttr(default_factory=dict)
    _raw: Mapping[str, Any] = PrivateAttr(default_factory=dict)
    _today: dt.date = PrivateAttr(default_factory=dt.date.today)

    def model_post_init(self, context: Any) -> None:
        """Keep where the spec came from: relative paths resolve against its folder."""
        if isinstance(context, dict):
            self._spec_dir = context["spec_dir"]
            self._spec_file = context["spec_file"]
            self._lines = context["lines"]
            self._raw = context["raw"]
            self._today = context.get("today") or dt.date.today()

    @property
    def spec_dir(self) -> Path:
        """The absolute folder of the spec file (base of globs, folders and wildcards)."""
        return self._spec_dir

    @property
    def output_url(self) -> str | None:
        """OUT on object storage (``output_dir: s3://bucket/prefix``), else None; then
        `output_dir` is the local folder the run stages its files in."""
        value = self._raw.get("output_dir")
        if isinstance(value, str) and is_object_url(value):
            return value.strip().rstrip("/")
        return None

    @property
    def today(self) -> dt.date:
        """The run's date, which model shutdowns are judged against (injectable in tests)."""
        return self._today

    @property
    def spec_file(self) -> str:
        """The spec path as the user gave it (for messages)."""
        return self._spec_file

    def source_params(self, source: SourceSpec) -> dict[str, Any]:
        """The request parameters of `source`: global params, then its overrides.

        A global ``force_caption_regenerate`` only reaches sources with Roboflow image
        ids (roboflow_ids, roboflow_search), the only kind the API applies it to.
        """
        params = self.params.request_params()
        params.update(source.params.model_dump(exclude_none=True))
        if source.roboflow_ids is None and source.roboflow_search is None:
            params.pop("force_caption_regenerate", None)
        return params

    def model_warnings(self) -> list[str]:
        """One line for each model the sources use that shuts down within 30 days."""
        catalog = default_catalog()
        names = dict.fromkeys(
            str(model)
            for source in self.sources
            if (model := self.source_params(source).get("model")) is not None
        )
        return [
            warning
            for name in names
            if (warning := catalog.shutdown_warning(name, self._today)) is not None
        ]

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
        if isinstance(backend, dict) and kind is not None:
            # the kind's own endpoint and key variable (openai: api.openai.com, OPENAI_API_KEY)
            defaults = {"base_url": kind.base_url, "api_key_env": kind.api_key_env}
            data["backend"] = {**defaults, **backend}
        if "output_dir" not in data and isinstance(data.get("name"), str):
            data["output_dir"] = f"runs/{data['name']}"
        return data

    @field_validator("version")
    @classmethod
    def _version(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"unsupported version {value}: this synthaug reads version 1")
        return value

    @field_validator("output_dir", mode="before")
    @classmethod
    def _stage_object_url(cls, value: Any) -> Any:
        """An OUT on object storage is worked in a local staging folder (`output_url`)."""
        if isinstance(value, str) and is_object_url(value):
            return str(staging_folder(value))
        return value

    @field_validator("output_dir")
    @classmethod
    def _resolve_output_dir(cls, value: Path, info: Any) -> Path:
        base = info.context["spec_dir"] if isinstance(info.context, dict) else Path.cwd()
        return Path(base, value.expanduser()).absolute()
