"""Which manifest line belongs in which cell of a contact sheet, from OUT alone.

This module exists to keep the model of a sheet apart from its drawing (`pipeline.views.grid`):
a source's variables come from ``OUT/job.json`` and are completed from the manifest; each
cell is indexed by (variable values, input, repeat) and says what it shows, an image file
or a placeholder with its reason; and whether a combination without a record belongs to
the job at all follows from the source's ``combine`` (``product``, ``zip``, ``sample``, or
unknown without ``OUT/job.json``). Nothing here touches pixels.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..job_record import BALANCE_INPUT, JobRecord, JobSource
from ..records import ItemRecord
from .sheet_text import path_inside

__all__ = [
    "Cell",
    "Grid",
    "Sample",
    "Source",
    "Tone",
    "collect_sources",
    "declared_sources",
    "group_by_source",
]

Tone = Literal["image", "failed", "pending", "absent"]
Sample = tuple[str | None, int, int]  # (input value, repeat, output index)


@dataclass(frozen=True, slots=True)
class Source:
    """A source as far as the grid cares: from job.json, completed from the manifest."""

    name: str
    template: str | None
    vars: dict[str, list[str]]
    combine: str | None  # None: OUT/job.json missing, so which cells to expect is unknown
    repeats: int = 1
    n: int = 1
    no_input: bool = False


def group_by_source(records: Iterable[ItemRecord]) -> dict[str, list[ItemRecord]]:
    """Manifest records by source, sources in order of first appearance."""
    by_source: dict[str, list[ItemRecord]] = {}
    for record in records:
        by_source.setdefault(record.source, []).append(record)
    return by_source


def declared_sources(
    job: JobRecord | None, seen: Iterable[str]
) -> list[tuple[str, JobSource | None]]:
    """Every source a view shows, with what job.json says of it: job.json's in its order,
    then those only the manifest knows (`seen`, in order of appearance) with None."""
    declared = {s.name: s for s in job.sources} if job is not None else {}
    return [
        *declared.items(),
        *((name, None) for name in dict.fromkeys(seen) if name not in declared),
    ]


def collect_sources(
    job: JobRecord | None, by_source: Mapping[str, list[ItemRecord]]
) -> list[Source]:
    """Sources in job.json order, then those only the manifest knows, in order of appearance."""
    out = []
    for name, declared in declared_sources(job, by_source):
        names: dict[str, list[str]] = (
            {k: list(vs) for k, vs in declared.vars.items()} if declared else {}
        )
        for record in by_source.get(name, ()):
            for key, value in record.vars.items():
                values = names.setdefault(key, [])
                if value not in values:
                    values.append(value)
        out.append(
            Source(
                name=name,
                template=declared.prompt if declared else None,
                vars=names,
                combine=_combine(declared),
                repeats=declared.repeats if declared else 1,
                n=declared.n if declared else 1,
                no_input=declared is not None and declared.input in ("none", BALANCE_INPUT),
            )
        )
    return out


def _combine(declared: JobSource | None) -> str | None:
    """How the source's combinations are chosen; a balance source's are planned per
    class, so like a sample's only those that ran are expected."""
    if declared is None:
        return None
    return "sample" if declared.input == BALANCE_INPUT else declared.combine


@dataclass(frozen=True, slots=True)
class Cell:
    """What one cell shows: an image file (with the flags the stages after storage put
    on it), or a placeholder tone with its text."""

    tone: Tone
    image: Path | None = None
    lines: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()


@dataclass(slots=True)
class Grid:
    """One source's cells, indexed by (variable values, input, repeat)."""

    source: Source
    out_dir: Path
    samples: list[Sample]
    records: dict[tuple[tuple[str, ...], str | None, int], ItemRecord]
    expected: Callable[[tuple[str, ...]], bool | None]
    slices: list[tuple[str, ...]] = field(default_factory=list)

    @classmethod
    def build(cls, source: Source, records: Sequence[ItemRecord], out_dir: Path) -> Grid:
        """Index the manifest records of `source`; work out rows, slices and expectations."""
        names = list(source.vars)
        indexed = {(_values(r, names), _input_value(r), r.repeat): r for r in records}
        seen = _unique(values for values, _, _ in indexed)
        expected = _expectation(source, seen)
        slices = _unique([*(c[2:] for c in _expected_combos(source)), *(v[2:] for v in seen)])
        if len(names) <= 2:
            slices = [()]
        return cls(source, out_dir, _samples(source, records), indexed, expected, slices)

    def sample_label(self, sample: Sample) -> str:
        """How a sub-row is named: input file, repeat and image number, where they vary."""
        parts = []
        if sample[0] is not None:
            parts.append(sample[0].split("?")[0].rstrip("/").rsplit("/", 1)[-1] or sample[0])
        if len({s[1] for s in self.samples}) > 1:
            parts.append(f"repeat {sample[1] + 1}")
        if any(s[2] for s in self.samples):
            parts.append(f"image {sample[2] + 1}")
        return ", ".join(parts)

    def cell(self, values: tuple[str, ...], sample: Sample) -> Cell:
        """The cell for a full tuple of variable values and one sample (sub-row)."""
        record = self.records.get((values, sample[0], sample[1]))
        if record is None:
            verdict = self.expected(values)
            if verdict is False:
                return Cell("absent", lines=("not in job",))
            return Cell("pending", lines=("PENDING",) if verdict else ("NO RECORD",))
        if record.status == "failed":
            error = record.error
            kind = error.kind if error else "?"
            detail = f"HTTP {error.status}" if error and error.status else ""
            return Cell("failed", lines=(f"FAILED: {kind}", detail, error.message if error else ""))
        if record.status != "ok":
            return Cell("pending", lines=("PENDING", "answered, not downloaded"))
        if sample[2] >= len(record.outputs):
            return Cell("absent", lines=("no image",))
        output = record.outputs[sample[2]]
        path = path_inside(self.out_dir, output.path)
        if path is None or not path.is_file():
            return Cell("failed", lines=("MISSING FILE", output.path))
        return Cell("image", image=path, flags=output.flags)


def _values(record: ItemRecord, names: Sequence[str]) -> tuple[str, ...]:
    return tuple(record.vars.get(name, "") for name in names)


def _input_value(record: ItemRecord) -> str | None:
    return record.input.value if record.input is not None else None


def _expected_combos(source: Source) -> Iterable[tuple[str, ...]]:
    if source.combine == "product":
        return itertools.product(*source.vars.values())
    if source.combine == "zip":
        return zip(*source.vars.values(), strict=False)  # equal lengths: the spec checks
    return ()


def _expectation(
    source: Source, seen: Iterable[tuple[str, ...]]
) -> Callable[[tuple[str, ...]], bool | None]:
    """Is a combination without a record part of the job? True, False, or None (unknown)."""
    if source.combine == "product":
        return lambda values: True
    if source.combine is None:
        return lambda values: None
    wanted = {*_expected_combos(source), *seen}  # zip: its tuples; sample: what ran
    return lambda values: values in wanted


def _samples(source: Source, records: Sequence[ItemRecord]) -> list[Sample]:
    """Sub-rows: every (input, repeat, output index) the job asks for or the manifest shows."""
    found: dict[Sample, None] = {}
    if source.no_input:
        for repeat, index in itertools.product(range(source.repeats), range(source.n)):
            found[(None, repeat, index)] = None
    for record in records:
        count = len(record.outputs) if record.status == "ok" else source.n
        for index in range(max(count, 1)):
            found[(_input_value(record), record.repeat, index)] = None
    inputs = _unique(s[0] for s in found)
    ordered = sorted(found, key=lambda s: (inputs.index(s[0]), s[1], s[2]))
    return ordered or [(None, 0, 0)]


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))
