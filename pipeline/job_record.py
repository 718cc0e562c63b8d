"""OUT/job.json as a record: what the last run was asked to do, read by every view.

Written once per run (`pipeline.store.layout.write_job`) in the keys and order it always
had; read leniently (a hand-edited or older file reads as far as it makes sense).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

__all__ = ["BALANCE_INPUT", "JobRecord", "JobSource"]


BALANCE_INPUT = "roboflow_balance"
"""`JobSource.input` of a balance source: prompt-only, its combinations planned per class
rather than all made (views expect only those that ran)."""


@dataclass(frozen=True, slots=True)
class JobSource:
    """One source as OUT/job.json records it.

    `vars` holds every template variable's values in template order; `input` the input
    kind (``none``, ``images``, ``folder``, ...); `n` the images per request (global params
    merged with the source's): the contact sheet draws a cell per image, placeholders
    included, from it. `items` is the source's item count (None until counted, or in a
    job.json without it); `search` the source's ``roboflow_search`` settings, if any.
    """

    name: str
    prompt: str | None = None
    vars: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    combine: str | None = None  # None: unknown, so which cells a sheet expects is unknown
    repeats: int = 1
    input: str | None = None
    n: int = 1
    items: int | None = None
    search: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, value: object) -> JobSource | None:
        """A job.json source; None when it is not one (no name). Lenient, as job.json may
        be hand-edited or older: a field of the wrong type reads as absent."""
        if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
            return None
        search = value.get("search")
        return cls(
            name=value["name"],
            prompt=_str_field(value.get("prompt")),
            vars=_vars(value.get("vars")),
            combine=_str_field(value.get("combine")),
            repeats=_count(value.get("repeats")) or 1,
            input=_str_field(value.get("input")),
            n=_count(value.get("n")) or 1,
            items=_int_or_none(value.get("items")),
            search=dict(search) if isinstance(search, Mapping) else None,
        )

    def to_json(self) -> dict[str, Any]:
        """The source as job.json has always listed it (same keys, same order)."""
        out: dict[str, Any] = {
            "name": self.name,
            "prompt": self.prompt,
            "vars": {name: list(values) for name, values in self.vars.items()},
            "combine": self.combine,
            "repeats": self.repeats,
            "input": self.input,
            "n": self.n,
        }
        if self.search is not None:
            out["search"] = dict(self.search)
        if self.items is not None:
            out["items"] = self.items
        return out


@dataclass(frozen=True, slots=True)
class JobRecord:
    """OUT/job.json: what the last run was asked to do, written once per run.

    `spec` is the spec's file name only: OUT is meant to be zipped and shared.
    `key_scheme` is the version of the item keys (`pipeline.items.KEY_SCHEME`) the
    manifest was written with: 1 when job.json records none (synthaug 0.1).
    """

    name: str | None = None
    spec: str | None = None
    backend: str | None = None
    key_scheme: int = 1
    host: str | None = None
    sources: tuple[JobSource, ...] = ()

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> JobRecord:
        """A parsed job.json, leniently: a field of the wrong type reads as absent and a
        malformed source is skipped, so a hand-edited file never stops a view. An older
        synthaug recorded the spec's absolute path (the author's home folder): it is cut
        to the file name."""
        sources = value.get("sources")
        found = (JobSource.from_json(s) for s in sources) if isinstance(sources, list) else ()
        scheme = _int_or_none(value.get("key_scheme"))
        return cls(
            name=_str_field(value.get("name")),
            spec=_file_name(value.get("spec")),
            backend=_str_field(value.get("backend")),
            key_scheme=1 if scheme is None else scheme,
            host=_str_field(value.get("host")),
            sources=tuple(s for s in found if s is not None),
        )

    def to_json(self) -> dict[str, Any]:
        """job.json's object, in the order it has always had."""
        return {
            "name": self.name,
            "spec": self.spec,
            "backend": self.backend,
            "key_scheme": self.key_scheme,
            "host": self.host,
            "sources": [source.to_json() for source in self.sources],
        }

    def source(self, name: str) -> JobSource | None:
        """The source called `name` (the last one, should a hand edit repeat a name)."""
        return next((s for s in reversed(self.sources) if s.name == name), None)


def _str_field(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _file_name(value: object) -> str | None:
    """The last part of a path written on any system; None for no path."""
    if not isinstance(value, str):
        return None
    return PurePosixPath(value.replace("\\", "/")).name or None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _count(value: object) -> int | None:
    """A positive int, or None (a count below 1 means nothing a sheet could draw)."""
    number = _int_or_none(value)
    return number if number is not None and number >= 1 else None


def _vars(value: object) -> dict[str, tuple[str, ...]]:
    """Variable values by name; a variable whose values are not a list is left out."""
    if not isinstance(value, Mapping):
        return {}
    return {str(k): tuple(str(v) for v in vs) for k, vs in value.items() if isinstance(vs, list)}
