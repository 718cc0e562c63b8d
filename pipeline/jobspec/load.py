"""Loading a job spec: read once into frozen settings, or fail with one clear line.

`load_spec` (a YAML file) and `spec_from_data` (a dict) validate the model, then apply the
rules that span several keys and the checks only the disk can answer (globs match,
folders hold images, files are images, every template placeholder has values), each as a
`SpecError` naming the file, key path and line. Command-line flags are applied by
`apply_overrides`, validated like the YAML values; `json_schema` is the editors' schema.
"""

from __future__ import annotations

import copy
import datetime as dt
import ipaddress
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import (
    ValidationError,
)

from ..errors import SpecError, UsageError
from ..registry import BACKENDS, backend_kind
from ..sources import (
    DEFAULT_EXTENSIONS,
    InputError,
    check_image_file,
    list_globs,
)
from .catalog import default_catalog
from .fields import INPUT_KINDS, is_object_url, parse_rate
from .model import (
    BALANCE_CLASS_VAR,
    SEARCH_QUERY_KEYS,
    BackendSettings,
    Params,
    SearchSettings,
    SourceSpec,
    Spec,
)
from .template import TemplateError, count_variants, parse_template, resolve_values
from .yamlfile import did_you_mean, read_yaml, show_value, validation_error

__all__ = [
    "apply_overrides",
    "json_schema",
    "load_spec",
    "spec_from_data",
]


class _Problem(Exception):
    """A spec problem found after validation, at `key_path`."""

    def __init__(self, key_path: str, message: str, value: object = None) -> None:
        super().__init__(message)
        self.key_path, self.message, self.value = key_path, message, value


def load_spec(path: Path | str, *, today: dt.date | None = None) -> Spec:
    """Read, validate and check the spec at `path`; raise one `SpecError` for any mistake.

    `today` is the run's date (default: the local date), against which model shutdowns
    are judged.
    """
    shown = str(path)
    data, lines = read_yaml(Path(path), shown)
    return _checked(_build(data, Path(path).absolute().parent, shown, lines, today))


def spec_from_data(
    data: Mapping[str, Any],
    *,
    base_dir: Path | str | None = None,
    name: str = "<dict>",
    today: dt.date | None = None,
) -> Spec:
    """Validate and check a spec given as data (what YAML would load to).

    Relative paths resolve against `base_dir` (default: the current directory); errors
    name `name` where a file's would name the file, without line numbers.
    """
    if not isinstance(data, Mapping):
        raise SpecError(f"a spec is a mapping of keys, got {type(data).__name__}", file=name)
    folder = Path(base_dir if base_dir is not None else Path.cwd()).absolute()
    return _checked(_build(copy.deepcopy(dict(data)), folder, name, {}, today))


def _checked(spec: Spec) -> Spec:
    """`spec` once the checks only the disk can answer have passed."""
    try:
        _check_inputs(spec)
    except _Problem as exc:
        raise spec.error(exc.key_path, exc.message, exc.value) from None
    return spec


def _build(
    data: Mapping[str, Any],
    spec_dir: Path,
    shown: str,
    lines: Mapping[str, int],
    today: dt.date | None = None,
) -> Spec:
    """Validate `data` into a `Spec` and run the checks that span several keys."""
    context = {
        "spec_dir": spec_dir,
        "spec_file": shown,
        "lines": lines,
        "raw": data,
        "today": today or dt.date.today(),
    }
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
    if spec.upload is not None and spec.upload.base_url is not None:
        _check_keyed_url(spec.upload.base_url, "upload.base_url")
    if spec.label is not None and spec.label.api_url is not None:
        _check_keyed_url(spec.label.api_url, "label.api_url")
    if spec.backend.registered.needs_project and not spec.project_url:
        raise _Problem(
            "project_url",
            f"required for backend {spec.backend.kind} (the project to add images to)",
        )
    batch = spec.backend.mode == "batch"
    if batch and spec.backend.registered.batch_class is None:
        raise _Problem(
            "backend.mode",
            f"backend {spec.backend.kind} has no batch mode: use kind openai (or mock to "
            "rehearse), or mode online",
        )
    seen: dict[str, int] = {}
    balanced: int | None = None
    for index, source in enumerate(spec.sources):
        at = f"sources[{index}]"
        if source.roboflow_balance is not None:
            if balanced is not None:
                raise _Problem(
                    f"{at}.roboflow_balance",
                    f"one roboflow_balance source per job (sources[{balanced}] is one): "
                    "put each project in a job of its own",
                )
            balanced = index
            _check_balance(source, at)
            if source.roboflow_balance.base_url is not None:
                _check_keyed_url(
                    source.roboflow_balance.base_url, f"{at}.roboflow_balance.base_url"
                )
        if source.name in seen:
            raise _Problem(
                f"{at}.name",
                f"duplicate source name '{source.name}' (see sources[{seen[source.name]}])",
            )
        seen[source.name] = index
        _check_source_keys(source, at)
        if not spec.backend.registered.roboflow_extras:
            _check_no_roboflow_extras(spec, source, at)
        if batch and source.input_kind in ("roboflow_ids", "roboflow_search"):
            raise _Problem(
                f"{at}.{source.input_kind}",
                "backend.mode batch sends OpenAI requests, which cannot carry Roboflow image "
                "ids: use images, folder or urls, or mode online",
            )
        _check_mask(spec, source, at)
        _check_params(spec.source_params(source), source.params, at, spec.today)


def _check_mask(spec: Spec, source: SourceSpec, at: str) -> None:
    """A mask belongs to an edit, and only OpenAI's edits take one."""
    if source.mask is None:
        return
    if source.input_kind not in ("images", "folder", "urls"):
        raise _Problem(
            f"{at}.mask",
            "only applies to a source with input images (images, folder or urls)",
            source.mask,
        )
    kind = spec.backend.kind
    if not backend_kind(kind).takes_mask:
        raise _Problem(
            f"{at}.mask",
            f"backend {kind}'s endpoint takes no mask: use backend.kind openai "
            "(or mock to rehearse), or remove the mask",
            source.mask,
        )


def _check_no_roboflow_extras(spec: Spec, source: SourceSpec, at: str) -> None:
    """What only Roboflow's endpoint takes, refused for a kind whose API would refuse it."""
    kind = spec.backend.kind
    if source.roboflow_ids is not None:
        raise _Problem(
            f"{at}.roboflow_ids",
            f"backend {kind} cannot read Roboflow image ids: use images, folder or urls "
            "(or backend.kind: roboflow)",
        )
    if source.roboflow_search is not None:
        raise _Problem(
            f"{at}.roboflow_search",
            f"backend {kind} cannot read Roboflow image ids, which is what a search finds: "
            "use backend.kind: roboflow (or mock to rehearse)",
        )
    if "unmodified_prompt" in spec.source_params(source):
        own = source.params.unmodified_prompt is not None
        raise _Problem(
            f"{at}.params.unmodified_prompt" if own else "params.unmodified_prompt",
            f"only Roboflow's endpoint takes it (backend {kind} sends the prompt as it is)",
        )


def _check_params(params: Mapping[str, Any], own: Params, at: str, today: dt.date) -> None:
    """Combinations the API would refuse, caught before anything is paid for.

    `params` are a source's merged parameters; the key path names the source's own
    key when it set it, the global one otherwise.
    """

    def where(key: str) -> str:
        return f"{at}.params.{key}" if getattr(own, key) is not None else f"params.{key}"

    catalog = default_catalog()
    name = params.get("model")
    shut_down = None if name is None else catalog.shutdown_problem(str(name), today)
    if shut_down is not None:
        raise _Problem(where("model"), shut_down, name)
    model = catalog.get(name)
    size = params.get("size")
    wrong_size = None if model is None or size is None else model.sizes.problem(str(size))
    if wrong_size is not None:
        raise _Problem(where("size"), f"{name} {wrong_size}, not {size}", size)
    if model is not None and not model.transparent and params.get("background") == "transparent":
        raise _Problem(
            where("background"), f"{name} makes no transparent background: use opaque or auto"
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


def _check_keyed_url(url: str, key: str) -> None:
    """An API root whose key travels in the query (Roboflow's): plain http only on
    loopback."""
    host = urlsplit(url).hostname or ""
    if urlsplit(url).scheme == "http" and not _is_loopback(host):
        raise _Problem(
            key, "plain http would send the API key in clear; use https (or a loopback address)"
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
    if (
        source.params.force_caption_regenerate is not None
        and source.roboflow_ids is None
        and source.roboflow_search is None
    ):
        raise _Problem(
            f"{at}.params.force_caption_regenerate",
            "only applies to roboflow_ids and roboflow_search",
        )
    if source.roboflow_search is not None:
        _check_search_query(source.roboflow_search, f"{at}.roboflow_search")


def _check_balance(source: SourceSpec, at: str) -> None:
    """A balance source is prompt-only, and its plan, not `repeats`, says how many."""
    if source.input_kind != "none":
        raise _Problem(
            f"{at}.{source.input_kind}",
            "a roboflow_balance source makes new images from its prompt: it takes no input "
            "images (put those in a source of their own)",
        )
    if source.repeats != 1:
        raise _Problem(
            f"{at}.repeats",
            "a roboflow_balance source plans its own number of requests per class: "
            "remove repeats (raise roboflow_balance.target instead)",
        )
    if BALANCE_CLASS_VAR in source.vars:
        raise _Problem(
            f"{at}.vars.{BALANCE_CLASS_VAR}",
            f"{{{BALANCE_CLASS_VAR}}} takes its values from the project's classes: remove "
            "it from vars",
        )


def _check_search_query(search: SearchSettings, at: str) -> None:
    """A search asks one question: a prompt, an image to look like, a tag or a class."""
    given = [key for key in SEARCH_QUERY_KEYS if getattr(search, key) is not None]
    if not given:
        raise _Problem(at, f"needs one of {', '.join(SEARCH_QUERY_KEYS)}")
    if len(given) > 1:
        found = " and ".join(given)
        raise _Problem(
            f"{at}.{given[1]}",
            f"a search takes one of {', '.join(SEARCH_QUERY_KEYS)}, found {found}",
        )


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
        if source.mask is not None:
            _check_mask_file(spec.spec_dir / source.mask, source.mask, f"{at}.mask")


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_mask_file(path: Path, shown: str, key_path: str) -> None:
    """A mask is a readable PNG (the Images API takes no other format for it)."""
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise _Problem(key_path, f"{shown} {state}", shown)
    _check_files([path], key_path)
    with path.open("rb") as fh:
        if fh.read(len(_PNG_MAGIC)) != _PNG_MAGIC:
            raise _Problem(key_path, f"{shown} is not a PNG: a mask must be a PNG", shown)


def _check_prompt(spec: Spec, source: SourceSpec, at: str) -> None:
    balance = source.roboflow_balance
    if balance is None:
        _check_template(spec, source, source.prompt, source.vars, f"{at}.prompt")
        return
    given = {**source.vars, BALANCE_CLASS_VAR: ("any class",)}
    _check_template(spec, source, source.prompt, given, f"{at}.prompt", needs_class=True)
    for name, prompt in balance.prompts.items():
        key = f"{at}.roboflow_balance.prompts.{name}"
        _check_template(spec, source, prompt, given, key, needs_class=False)


def _check_template(
    spec: Spec,
    source: SourceSpec,
    text: str,
    given: Mapping[str, Sequence[str]],
    key: str,
    *,
    needs_class: bool | None = None,
) -> None:
    """`text` parses and its placeholders have values (`given`); with `needs_class` it
    names ``{class}``; without (a balance source's own prompt for one class) every var
    it does not use is fine."""
    try:
        template = parse_template(text)
    except TemplateError as exc:
        raise _Problem(key, str(exc), text) from None
    if needs_class and BALANCE_CLASS_VAR not in template.variables:
        raise _Problem(
            key,
            f"a roboflow_balance source's prompt names its class: put {{{BALANCE_CLASS_VAR}}} "
            "in it",
            text,
        )
    if needs_class is False:
        given = {name: v for name, v in given.items() if name in template.variables}
    try:
        values = resolve_values(template, given, spec.spec_dir)
    except TemplateError as exc:
        if exc.var in source.vars:
            raise _Problem(f"{key.rsplit('.', 1)[0]}.vars.{exc.var}", str(exc)) from None
        hint = did_you_mean(exc.var or "", source.vars)
        raise _Problem(key, f"{exc}{hint}", text) from None
    try:
        count_variants(values, source.combine, source.samples)
    except TemplateError as exc:
        problem = "samples" if source.combine == "sample" else "vars"
        raise _Problem(f"{key.rsplit('.', 1)[0]}.{problem}", str(exc)) from None


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
        text = str(output_dir)
        url = isinstance(output_dir, str) and is_object_url(text)
        raw["output_dir"] = text if url else str(Path(output_dir).expanduser().absolute())
    raw.update({key: value for key, value in sections.items() if value or key in raw})
    return _build(raw, spec.spec_dir, spec.spec_file, spec._lines, spec.today)


def json_schema() -> dict[str, Any]:
    """The JSON schema of a job spec (``configs/schema.json``), for editors and CI."""
    schema = Spec.model_json_schema()
    schema["required"] = [k for k in schema["required"] if k != "output_dir"]  # has a default
    schema["properties"]["version"]["const"] = 1
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


if __name__ == "__main__":  # python -m pipeline.jobspec.load > configs/schema.json
    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
