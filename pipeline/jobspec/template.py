"""Prompt templates: plain placeholder substitution and the three ways to combine values.

A template is text with placeholders: ``{name}`` takes its values from the source's
``vars``; ``{red|orange|gold}`` is an anonymous variable whose name is its literal text
and whose values are its parts; ``__name__`` takes one value per line from
``wildcards/name.txt`` beside the spec. ``{{`` and ``}}`` are literal braces. There is no
expression language on purpose: prompts come from YAML files that people share, and
``str.format`` would allow attribute access and format specs.

Variants are produced lazily, so a grid of a million prompts never sits in memory; the
``sample`` mode picks distinct combinations by index without building the product.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "WILDCARD_DIR",
    "Combine",
    "Template",
    "TemplateError",
    "count_variants",
    "iter_prompts",
    "iter_variants",
    "load_wildcard",
    "parse_template",
    "resolve_values",
]

Combine = Literal["product", "zip", "sample"]
WILDCARD_DIR = "wildcards"

_WILDCARD = re.compile(r"__([A-Za-z0-9][A-Za-z0-9_-]*?)__")


class TemplateError(ValueError):
    """A template or its values are unusable; `var` names the culprit when there is one.

    The spec layer turns this into a `SpecError` with the file, key path and line.
    """

    def __init__(self, message: str, *, var: str | None = None) -> None:
        super().__init__(message)
        self.var = var


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed prompt: literal text and variable references, in order.

    `segments` alternates freely between literal strings and `_Ref` markers;
    `variables` lists each variable once, in order of first appearance (the order of
    `vars` in work items and of the axes of a product); `inline` holds the values of
    anonymous ``{a|b}`` variables and `wildcards` the names of ``__name__`` files.
    """

    text: str
    segments: tuple[str | _Ref, ...]
    variables: tuple[str, ...]
    inline: Mapping[str, tuple[str, ...]]
    wildcards: tuple[str, ...]

    def render(self, values: Mapping[str, str]) -> str:
        """The prompt with every placeholder replaced by its value in `values`."""
        return "".join(s if isinstance(s, str) else values[s.name] for s in self.segments)

    def renderer(self, names: Sequence[str]) -> Callable[[Sequence[str]], str]:
        """`render` for values given as a sequence in the order of `names`, 4x faster.

        Compiles to a `str.format` text of our own making: literal braces are doubled and
        every field is a bare position, so values are inserted as they are (a value with
        braces is not re-read, and no attribute access or format spec can occur).
        """
        position = {name: i for i, name in enumerate(names)}
        text = "".join(
            s.replace("{", "{{").replace("}", "}}")
            if isinstance(s, str)
            else f"{{{position[s.name]}}}"
            for s in self.segments
        )
        return lambda combo: text.format(*combo)


@dataclass(frozen=True, slots=True)
class _Ref:
    name: str


def parse_template(text: str) -> Template:
    """Split `text` into literals and placeholders; raise `TemplateError` on bad braces."""
    segments: list[str | _Ref] = []
    inline: dict[str, tuple[str, ...]] = {}
    wildcards: list[str] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "{}" and text[i + 1 : i + 2] == ch:
            literal.append(ch)
            i += 2
        elif ch == "}":
            raise TemplateError(f"unmatched '}}' at character {i + 1}; write '}}}}' for a brace")
        elif ch == "{":
            end = text.find("}", i + 1)
            if end < 0:
                raise TemplateError(f"unclosed '{{' at character {i + 1}; write '{{{{' for a brace")
            name = text[i + 1 : end]
            _check_placeholder(name, i)
            if "|" in name:
                inline[name] = tuple(part.strip() for part in name.split("|"))
            _flush(literal, segments, wildcards)
            segments.append(_Ref(name))
            i = end + 1
        else:
            literal.append(ch)
            i += 1
    _flush(literal, segments, wildcards)
    order = dict.fromkeys(s.name for s in segments if isinstance(s, _Ref))
    return Template(text, tuple(segments), tuple(order), inline, tuple(dict.fromkeys(wildcards)))


def _check_placeholder(name: str, at: int) -> None:
    if not name.strip():
        raise TemplateError(f"empty placeholder '{{}}' at character {at + 1}")
    if "{" in name:
        raise TemplateError(f"'{{' inside a placeholder at character {at + 1}")


def _flush(literal: list[str], segments: list[str | _Ref], wildcards: list[str]) -> None:
    """Move pending literal text into `segments`, splitting out ``__name__`` wildcards."""
    text = "".join(literal)
    literal.clear()
    pos = 0
    for match in _WILDCARD.finditer(text):
        if match.start() > pos:
            segments.append(text[pos : match.start()])
        segments.append(_Ref(match.group(0)))
        wildcards.append(match.group(1))
        pos = match.end()
    if pos < len(text):
        segments.append(text[pos:])


def load_wildcard(path: Path) -> tuple[str, ...]:
    """Values of a wildcard file: one per line, blank lines and ``#`` comments skipped."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TemplateError(f"wildcard file {path} does not exist") from None
    except OSError as exc:
        raise TemplateError(f"cannot read wildcard file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise TemplateError(f"wildcard file {path} is not UTF-8 text") from None
    values = tuple(
        s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")
    )
    if not values:
        raise TemplateError(f"wildcard file {path} has no values")
    return values


def resolve_values(
    template: Template, given: Mapping[str, Sequence[str]], spec_dir: Path
) -> dict[str, tuple[str, ...]]:
    """The values of every template variable, in template order.

    Raises `TemplateError` for a placeholder without values (naming a near miss) and
    for a `given` variable the template never uses: both are typos that would silently
    produce the wrong grid.
    """
    values: dict[str, tuple[str, ...]] = {}
    for name in template.variables:
        if name in template.inline:
            values[name] = template.inline[name]
        elif _WILDCARD.fullmatch(name):
            values[name] = load_wildcard(spec_dir / WILDCARD_DIR / f"{name[2:-2]}.txt")
        elif name in given:
            values[name] = tuple(given[name])
        else:
            raise TemplateError(f"placeholder {{{name}}} has no values in vars", var=name)
    for name in given:
        if name not in values:
            used = ", ".join(f"{{{v}}}" for v in template.variables) or "none"
            raise TemplateError(
                f"'{name}' is not used in the prompt (placeholders: {used})", var=name
            )
    return values


def count_variants(
    values: Mapping[str, Sequence[str]], combine: Combine, samples: int | None = None
) -> int:
    """How many prompts `iter_variants` yields, without producing them."""
    lengths = [len(v) for v in values.values()]
    if combine == "product":
        return math.prod(lengths)
    if combine == "zip":
        _check_zip(values)
        return lengths[0] if lengths else 1
    total = math.prod(lengths)
    if samples is None or samples > total:
        raise TemplateError(f"samples: {samples} is more than the {total} combinations")
    return samples


def _check_zip(values: Mapping[str, Sequence[str]]) -> None:
    lengths = {name: len(v) for name, v in values.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise TemplateError(f"combine: zip needs lists of equal length ({shown})")


def iter_variants(
    template: Template,
    values: Mapping[str, Sequence[str]],
    combine: Combine,
    *,
    samples: int | None = None,
    seed: int | None = None,
) -> Iterator[tuple[dict[str, str], str]]:
    """Yield ``(vars, prompt)`` for each combination, lazily, `vars` in template order.

    ``product`` varies the last variable fastest (like `itertools.product`); ``zip``
    walks the lists side by side; ``sample`` picks `samples` distinct combinations with
    ``random.Random(seed)`` and yields them in product order.
    """
    names = list(values)
    for combo, prompt in iter_prompts(template, values, combine, samples=samples, seed=seed):
        yield dict(zip(names, combo, strict=True)), prompt


def iter_prompts(
    template: Template,
    values: Mapping[str, Sequence[str]],
    combine: Combine,
    *,
    samples: int | None = None,
    seed: int | None = None,
) -> Iterator[tuple[tuple[str, ...], str]]:
    """`iter_variants` with each combination as a tuple in the order of `values`: no dict
    per prompt, for the million-prompt loops of resume and plan."""
    total = count_variants(values, combine, samples)  # validates zip lengths and samples
    names = list(values)
    lists = [tuple(values[n]) for n in names]
    render = template.renderer(names)
    for combo in _combinations(lists, combine, total, seed):
        yield combo, render(combo)


def _combinations(
    lists: list[tuple[str, ...]], combine: Combine, total: int, seed: int | None
) -> Iterator[tuple[str, ...]]:
    if combine == "product":
        return itertools.product(*lists)
    if combine == "zip":
        return zip(*lists, strict=True) if lists else iter([()])
    population = math.prod(len(v) for v in lists)
    picked = sorted(_sample_indices(population, total, random.Random(seed)))
    return (_decode(index, lists) for index in picked)


def _sample_indices(population: int, k: int, rng: random.Random) -> list[int]:
    """`k` distinct indices below `population`, without building the population."""
    if population <= sys.maxsize:
        return rng.sample(range(population), k)  # range is lazy; len() must fit a C size
    # Astronomically large grids: rejection sampling; k is far below population.
    seen: set[int] = set()
    out: list[int] = []
    while len(out) < k:
        index = rng.randrange(population)
        if index not in seen:
            seen.add(index)
            out.append(index)
    return out


def _decode(index: int, lists: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The combination at `index` in product order (mixed radix, last digit fastest)."""
    out: list[str] = []
    for values in reversed(lists):
        index, digit = divmod(index, len(values))
        out.append(values[digit])
    return tuple(reversed(out))
