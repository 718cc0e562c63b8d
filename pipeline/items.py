"""Spec × inputs × prompt variants × repeats → a lazy stream of keyed `WorkItem`s.

An item's key is the SHA-256 of the canonical JSON of ``{"backend", "body", "repeat"}``,
with a local file standing in the body as ``sha256:<hex of its bytes>``: the same spec
over the same inputs yields the same keys on any machine and in any folder, which is
what resume, idempotency and sharding stand on. Items are produced one at a time in a
fixed order (sources in spec order, then inputs, prompt variants, repeats innermost), so
a million-item job never sits in memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from json.encoder import encode_basestring
from types import MappingProxyType
from typing import Any, NamedTuple

from .job_record import BALANCE_INPUT, JobSource
from .jobspec.model import BALANCE_CLASS_VAR, SourceSpec, Spec
from .jobspec.template import count_variants, iter_prompts, parse_template, resolve_values
from .records import InputImage, WorkItem, request_body
from .sources import HashCache

__all__ = [
    "KEY_SCHEME",
    "ItemDraft",
    "ItemShape",
    "check_max_items",
    "count_items",
    "describe_sources",
    "expand_drafts",
    "expand_items",
    "item_key",
    "iter_source_drafts",
    "prompt_keyer",
]

DEFAULT_SEED = 0
KEY_SCHEME = 2
"""Version of what goes into a key. 1: synthaug 0.1, whose bodies always carried the
defaults model dall-e-3, quality hd, style natural; 2: bodies carry only what the spec
sets. The formula is the same, so a body that did not change keeps its key; OUT records
the scheme so that a run never silently pays again for every item of an older OUT."""


def item_key(backend_kind: str, body: Mapping[str, Any], repeat: int) -> str:
    """The item key: SHA-256 hex of the canonical JSON of backend kind, body and repeat."""
    canonical = json.dumps(
        {"backend": backend_kind, "body": body, "repeat": repeat},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


_PROMPT_MARK = "\x00synthaug-prompt\x00"


def prompt_keyer(backend_kind: str, body: Mapping[str, Any]) -> Callable[[str, int], str]:
    """`item_key` for bodies that differ only in their prompt, without re-encoding the rest.

    The canonical JSON is built once around a marker and split there; each key then only
    encodes its prompt. Same bytes as `item_key` (a test holds them equal); a body whose
    other fields happen to contain the marker falls back to `item_key`.
    """
    canonical = json.dumps(
        {"backend": backend_kind, "body": {**body, "prompt": _PROMPT_MARK}, "repeat": 0},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    parts = canonical.split(json.dumps(_PROMPT_MARK, ensure_ascii=False))
    if len(parts) != 2 or not parts[1].endswith(',"repeat":0}'):
        return lambda prompt, repeat: item_key(backend_kind, {**body, "prompt": prompt}, repeat)
    head, tail = parts[0], parts[1][: -len("0}")]

    def key(prompt: str, repeat: int) -> str:
        # encode_basestring is what json.dumps(str, ensure_ascii=False) calls, minus 1 us
        text = f"{head}{encode_basestring(prompt)}{tail}{repeat}}}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    return key


class ItemShape(NamedTuple):
    """What every item of one source input shares."""

    source: str
    project_url: str
    params: Mapping[str, Any]
    names: tuple[str, ...]  # template variables, in the order of each draft's `combo`
    input: InputImage | None
    mask: InputImage | None = None


class ItemDraft(NamedTuple):
    """An item's key and what it takes to build it.

    Resume and plan decide most items of a big job by key alone; a tuple costs a tenth
    of a frozen `WorkItem`, which is built (`build`) only for items that will run.
    """

    key: str
    prompt: str
    combo: tuple[str, ...]
    repeat: int
    position: int  # the item's `index` within its source
    shape: ItemShape

    def build(self) -> WorkItem:
        """The `WorkItem` this draft stands for."""
        shape = self.shape
        return WorkItem(
            key=self.key,
            source=shape.source,
            prompt=self.prompt,
            project_url=shape.project_url,
            params=shape.params,
            vars=dict(zip(shape.names, self.combo, strict=True)),
            repeat=self.repeat,
            input=shape.input,
            index=self.position,
            mask=shape.mask,
        )


def expand_items(spec: Spec, *, hashes: HashCache | None = None) -> Iterator[WorkItem]:
    """Every work item of `spec`, lazily, in the documented order.

    Pass one `hashes` cache to several calls so that each local file is hashed once.
    """
    return (draft.build() for draft in expand_drafts(spec, hashes=hashes))


def expand_drafts(spec: Spec, *, hashes: HashCache | None = None) -> Iterator[ItemDraft]:
    """`expand_items` as drafts: keys first, items built on demand."""
    hashes = hashes or HashCache()
    for source in spec.sources:
        yield from iter_source_drafts(spec, source, hashes=hashes)


def iter_source_drafts(
    spec: Spec, source: SourceSpec, *, hashes: HashCache | None = None
) -> Iterator[ItemDraft]:
    """The drafts of one source, lazily; positions count from 0 within the source.

    This loop runs a million times for a big job: keep it lean."""
    if source.roboflow_balance is not None:
        yield from _balance_drafts(spec, source)
        return
    hashes = hashes or HashCache()
    template = parse_template(source.prompt)
    values = resolve_values(template, source.vars, spec.spec_dir)
    params = MappingProxyType(spec.source_params(source))  # shared by all items: read-only
    seed = DEFAULT_SEED if source.seed is None else source.seed
    kind, project_url = spec.backend.kind, spec.project_url or ""
    in_body = spec.backend.registered.project_in_body
    repeats = range(source.repeats)
    mask = _mask(spec, source, hashes)
    new = tuple.__new__  # ItemDraft(...) without the keyword handling: 0.1 s per million
    index = 0
    for input_image in _inputs(spec, source, hashes):
        image = input_image.key_value() if input_image else None
        shape = ItemShape(source.name, project_url, params, tuple(values), input_image, mask)
        body = request_body(
            WorkItem("", source.name, "", project_url, params, input=input_image, mask=mask),
            image,
            project=in_body,
        )
        key_of = prompt_keyer(kind, body)  # only the prompt varies
        prompts = iter_prompts(template, values, source.combine, samples=source.samples, seed=seed)
        for combo, prompt in prompts:
            for repeat in repeats:
                yield new(ItemDraft, (key_of(prompt, repeat), prompt, combo, repeat, index, shape))
                index += 1


def _balance_drafts(spec: Spec, source: SourceSpec) -> Iterator[ItemDraft]:
    """A balance source's drafts: for each class in name order, its planned requests,
    cycling through the other variables' combinations (``repeat`` counts the rounds), so
    a class's first requests keep their keys when a top-up plans more."""
    plan = _balance_plan(source)
    params = MappingProxyType(spec.source_params(source))
    project_url = spec.project_url or ""
    body = request_body(
        WorkItem("", source.name, "", project_url, params),
        None,
        project=spec.backend.registered.project_in_body,
    )
    key_of = prompt_keyer(spec.backend.kind, body)
    index = 0
    for name in sorted(plan):
        names, variants = _class_variants(spec, source, name)
        shape = ItemShape(source.name, project_url, params, names, None)
        for number in range(plan[name]):
            combo, prompt = variants[number % len(variants)]
            repeat = number // len(variants)
            yield ItemDraft(key_of(prompt, repeat), prompt, combo, repeat, index, shape)
            index += 1


def _class_variants(
    spec: Spec, source: SourceSpec, name: str
) -> tuple[tuple[str, ...], list[tuple[tuple[str, ...], str]]]:
    """The variable names (``class`` first) and the (values, prompt) variants of one
    class of a balance source."""
    template = parse_template(source.prompt_for(name))
    given = {BALANCE_CLASS_VAR: (name,), **source.vars}
    values = resolve_values(
        template, {k: v for k, v in given.items() if k in template.variables}, spec.spec_dir
    )
    seed = DEFAULT_SEED if source.seed is None else source.seed
    variants = iter_prompts(template, values, source.combine, samples=source.samples, seed=seed)
    if BALANCE_CLASS_VAR in values:
        return tuple(values), list(variants)
    return (BALANCE_CLASS_VAR, *values), [((name, *combo), text) for combo, text in variants]


def _balance_plan(source: SourceSpec) -> dict[str, int]:
    """A balance source's requests per class; `ValueError` before its counts are read."""
    plan = source.balance_plan
    if plan is None:
        raise ValueError(f"source '{source.name}': its class counts are not read yet")
    return {name: count for name, count in plan.items() if count > 0}


def _inputs(spec: Spec, source: SourceSpec, hashes: HashCache) -> Iterator[InputImage | None]:
    _check_resolved(source)
    if source.roboflow_ids is not None:
        yield from (InputImage("id", value) for value in dict.fromkeys(source.roboflow_ids))
    elif source.urls is not None:
        yield from (InputImage("url", value) for value in dict.fromkeys(source.urls))
    elif source.input_kind == "none":
        yield None
    else:
        for path in source.iter_files(spec.spec_dir):
            yield InputImage("file", str(path), hashes.sha256(path))


def _mask(spec: Spec, source: SourceSpec, hashes: HashCache) -> InputImage | None:
    """The source's mask as a ``file`` input (its hash goes into every key), or None."""
    if source.mask is None:
        return None
    path = (spec.spec_dir / source.mask).absolute()
    return InputImage("file", str(path), hashes.sha256(path))


def _check_resolved(source: SourceSpec) -> None:
    """A search source has inputs only once `pipeline.search` put the ids it found in it."""
    if source.roboflow_search is not None and source.roboflow_ids is None:
        raise ValueError(f"source '{source.name}': its roboflow_search is not resolved yet")


def _count_inputs(spec: Spec, source: SourceSpec) -> int:
    _check_resolved(source)
    if source.roboflow_ids is not None:
        return len(dict.fromkeys(source.roboflow_ids))
    if source.urls is not None:
        return len(dict.fromkeys(source.urls))
    if source.input_kind == "none":
        return 1
    return sum(1 for _ in source.iter_files(spec.spec_dir))


def count_items(spec: Spec) -> dict[str, int]:
    """Items per source (inputs × variants × repeats), counted without expanding."""
    counts: dict[str, int] = {}
    for source in spec.sources:
        if source.roboflow_balance is not None:
            counts[source.name] = sum(_balance_plan(source).values())
            continue
        template = parse_template(source.prompt)
        values = resolve_values(template, source.vars, spec.spec_dir)
        variants = count_variants(values, source.combine, source.samples)
        counts[source.name] = _count_inputs(spec, source) * variants * source.repeats
    return counts


def check_max_items(spec: Spec, counts: Mapping[str, int] | None = None) -> None:
    """Raise `SpecError` at ``run.max_items`` when the spec expands to more items.

    A typo guard: a stray variable or a folder one level too high can turn a
    100-image job into a bill for a million.
    """
    counts = count_items(spec) if counts is None else counts
    limit, running = spec.run.max_items, 0
    for name, count in counts.items():
        running += count
        if running > limit:
            total = sum(counts.values())
            raise spec.error(
                "run.max_items",
                f"the spec expands to {total:,} items, more than max_items {limit:,} "
                f"(source '{name}' with {count:,} items crosses it); "
                "raise run.max_items if that is intended",
                value=total,
            )


def _described_values(spec: Spec, source: SourceSpec) -> dict[str, tuple[str, ...]]:
    """The values of each variable of `source` (a balance source's ``class``: the
    classes it plans for, none before its counts are read)."""
    template = parse_template(source.prompt)
    if source.roboflow_balance is None:
        return resolve_values(template, source.vars, spec.spec_dir)
    plan = source.balance_plan or {}
    classes = tuple(sorted(name for name, count in plan.items() if count > 0))
    given = {**source.vars, BALANCE_CLASS_VAR: classes or ("?",)}
    values = resolve_values(template, given, spec.spec_dir)
    values[BALANCE_CLASS_VAR] = classes
    return values


def describe_sources(spec: Spec, counts: Mapping[str, int] | None = None) -> list[JobSource]:
    """Each source as OUT/job.json records it: template, variable values, input kind,
    and `n` (images per request, global params merged with the source's): the contact
    sheet draws one cell per image, placeholders included, from it. With `counts`
    (items per source, `count_items`), each source's `items` too."""
    out: list[JobSource] = []
    for source in spec.sources:
        search = source.roboflow_search
        out.append(
            JobSource(
                name=source.name,
                prompt=source.prompt,
                vars=_described_values(spec, source),
                combine=source.combine,
                repeats=source.repeats,
                input=BALANCE_INPUT if source.roboflow_balance else source.input_kind,
                n=int(spec.source_params(source).get("n") or 1),
                items=None if counts is None else counts.get(source.name, 0),
                search=None if search is None else search.model_dump(exclude_none=True),
            )
        )
    return out
