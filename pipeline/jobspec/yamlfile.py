"""The spec as a file: read its YAML, remember where each key is, and word its mistakes.

This module exists so that `pipeline.jobspec` can be only the model. Every user mistake
becomes a single `SpecError` naming the file, the key path and the line
(``spec.yaml:14 sources[2].folder: no images in data/leaves``): the YAML node tree is
composed first so that pydantic's error locations can be mapped back to lines, and
pydantic's messages are rewritten in plain words, with a "did you mean" for a misspelled
key. It sits below `pipeline.jobspec`, which imports it: the model is passed in where the
wording needs its field names, so nothing here imports the model.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from ..errors import SpecError

__all__ = [
    "did_you_mean",
    "line_for",
    "read_yaml",
    "show_value",
    "validation_error",
]


def read_yaml(path: Path, shown: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The top-level mapping of the YAML file at `path` and the line of every key path.

    `shown` is the path as the user gave it, for messages. Unreadable files, bad YAML,
    duplicate keys and a top level that is not a mapping raise one `SpecError`.
    """
    text = _read_text(path, shown)
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            lines = _line_map(node, shown) if node is not None else {}
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise SpecError(
            f"invalid YAML: {_one_line(exc.problem or exc.context)}", file=shown, line=line
        ) from None
    except yaml.reader.ReaderError as exc:
        # Its str() spans two lines and ends in a character offset; name the line instead.
        line = text[: exc.position].count("\n") + 1
        raise SpecError(
            f"invalid YAML: unacceptable character #x{exc.character:04x} "
            "(a binary file? save the spec as plain text)",
            file=shown,
            line=line,
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"invalid YAML: {_one_line(str(exc))}", file=shown) from None
    if data is None:
        raise SpecError("the spec is empty; start from examples/quickstart.yaml", file=shown)
    if not isinstance(data, dict):
        raise SpecError(
            f"the top level must be a mapping (version: 1, name: ..., sources: ...), "
            f"got {_type_name(data)}",
            file=shown,
            line=1,
        )
    return data, lines


def _one_line(text: str | None) -> str:
    """`text` with its line breaks folded: the CLI prints an error as one line."""
    return " ".join((text or "").split())


def _read_text(path: Path, shown: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read the spec: {exc.strerror}", file=shown) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(
            f"not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8",
            file=shown,
            line=line,
        ) from None


def _line_map(root: yaml.Node, shown: str) -> dict[str, int]:
    """Key path -> 1-based line of every key and list item; duplicate keys are errors."""
    lines: dict[str, int] = {"": root.start_mark.line + 1}
    stack: list[tuple[str, yaml.Node]] = [("", root)]
    seen: set[int] = set()  # an alias shares its node; a recursive one would loop forever
    while stack:
        prefix, node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = str(key_node.value)
                path = f"{prefix}.{key}" if prefix else key
                if path in lines:
                    raise SpecError(
                        f"duplicate key '{key}'",
                        file=shown,
                        key_path=path,
                        line=key_node.start_mark.line + 1,
                    )
                lines[path] = key_node.start_mark.line + 1
                stack.append((path, value_node))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                path = f"{prefix}[{index}]"
                lines[path] = item.start_mark.line + 1
                stack.append((path, item))
    return lines


def line_for(lines: Mapping[str, int], key_path: str) -> int | None:
    """The line of `key_path`, or of its nearest ancestor (a missing key's parent)."""
    path = key_path
    while path:
        if path in lines:
            return lines[path]
        parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path)
        path = "" if parent == path else parent
    return lines.get("")


def validation_error(
    exc: ValidationError, root: type[BaseModel], shown: str, lines: Mapping[str, int]
) -> SpecError:
    """One `SpecError` for pydantic's errors validating `root`: the first in the file."""
    errors = _root_causes(exc.errors(include_url=False), root)
    # Report the mistake that comes first in the file, as a reader would meet it.
    errors.sort(key=lambda e: line_for(lines, _key_path(tuple(e["loc"]))) or 0)
    key_path, message = _describe(errors[0], root)
    if len(errors) > 1:
        more = len(errors) - 1
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    line = line_for(lines, key_path)
    return SpecError(
        message, file=shown, key_path=key_path, line=line, value=errors[0].get("input")
    )


def _root_causes(errors: list[ErrorDetails], root: type[BaseModel]) -> list[ErrorDetails]:
    """Drop errors that only echo another, such as a list too short because an item failed,
    or a required key "missing" because it is misspelled (``sourcess``) beside it."""
    locs = [tuple(e["loc"]) for e in errors]
    misspelled = {
        (*loc[:-1], match)
        for error, loc in zip(errors, locs, strict=True)
        if error["type"] == "extra_forbidden"
        for match in difflib.get_close_matches(
            str(loc[-1]), _field_names(loc, root), n=1, cutoff=0.6
        )
    }
    out = []
    for error, loc in zip(errors, locs, strict=True):
        if any(other[: len(loc)] == loc and len(other) > len(loc) for other in locs):
            continue
        # The spec's output_dir defaults from its name: a bad name leaves it "missing" too.
        if loc == ("output_dir",) and error["type"] == "missing" and ("name",) in locs:
            continue
        if error["type"] == "missing" and loc in misspelled:
            continue
        out.append(error)
    return out or errors


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "tuple": "a list",
    "dict": "a mapping",
    "model": "a mapping",
    "model_attributes": "a mapping",
    "path": "a path",
}


def _describe(error: ErrorDetails, root: type[BaseModel]) -> tuple[str, str]:
    """Key path and a plain-English message for one pydantic error."""
    loc, kind, ctx = tuple(error["loc"]), error["type"], error.get("ctx") or {}
    got = show_value(error.get("input"))
    key_path = _key_path(loc)
    if kind == "missing":
        return key_path, "required key is missing"
    if kind == "extra_forbidden":
        key = str(loc[-1])
        return key_path, f"unknown key '{key}'{did_you_mean(key, _field_names(loc, root))}"
    if kind == "value_error":
        return key_path, str(ctx.get("error", error["msg"]))
    base = re.sub(r"_(type|parsing|from_float)$", "", kind)
    if base in _TYPE_WORDS:
        return key_path, f"expected {_TYPE_WORDS[base]}, got {got}"
    if kind == "literal_error":
        return key_path, f"expected {ctx.get('expected')}, got {got}"
    if kind == "greater_than_equal":
        return key_path, f"must be at least {ctx.get('ge')}, got {got}"
    if kind == "greater_than":
        return key_path, f"must be greater than {ctx.get('gt')}, got {got}"
    if kind == "less_than_equal":
        return key_path, f"must be at most {ctx.get('le')}, got {got}"
    if kind == "finite_number":
        return key_path, f"must be a finite number, got {got}"
    if kind == "too_short":
        return key_path, "must not be empty"
    return key_path, f"{error['msg'][:1].lower()}{error['msg'][1:]} (got {got})"


def _field_names(loc: tuple[int | str, ...], root: type[BaseModel]) -> list[str]:
    """The keys allowed beside the last part of `loc` (the fields of its parent model)."""
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = _model_of(field.annotation) if field else None
    return list(model.model_fields) if model is not None else []


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of `choices` to `word`, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model class inside an annotation like ``tuple[SourceSpec, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def show_value(value: object) -> str:
    """A value the way the user wrote it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (dict, list, tuple)):
        return _type_name(value)
    return str(value)


def _type_name(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return show_value(value)
