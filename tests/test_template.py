"""Prompt templates: placeholders, escapes, wildcards and the three combine modes."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.jobspec.template import (
    TemplateError,
    count_variants,
    iter_variants,
    parse_template,
    resolve_values,
)


def variants(
    text: str, given_vars: dict[str, list[str]], combine: str = "product", **kw: int
) -> list[tuple[dict[str, str], str]]:
    template = parse_template(text)
    values = resolve_values(template, given_vars, Path.cwd())
    return list(iter_variants(template, values, combine, **kw))  # type: ignore[arg-type]


def test_product_varies_the_last_variable_fastest() -> None:
    """product yields every combination, variables in order of first appearance."""
    out = variants("{b} and {a}", {"a": ["1", "2"], "b": ["x", "y"]})
    assert [p for _, p in out] == ["x and 1", "x and 2", "y and 1", "y and 2"]
    assert list(out[0][0]) == ["b", "a"]


def test_a_variable_used_twice_takes_one_value() -> None:
    """The same placeholder twice in a prompt gets the same value."""
    assert [p for _, p in variants("{a}-{a}", {"a": ["1", "2"]})] == ["1-1", "2-2"]


def test_inline_alternatives_are_an_anonymous_variable() -> None:
    """{red|gold} is a variable named by its text, with its parts as values."""
    out = variants("a {red | gold} leaf", {})
    assert out == [({"red | gold": "red"}, "a red leaf"), ({"red | gold": "gold"}, "a gold leaf")]


def test_wildcards_read_values_from_files(sandbox: Path) -> None:
    """__name__ reads wildcards/name.txt: one value a line, blanks and comments skipped."""
    (sandbox / "wildcards").mkdir()
    (sandbox / "wildcards" / "tree.txt").write_text("# trees\nmaple\n\n oak \n", encoding="utf-8")
    out = variants("a __tree__ tree", {})
    assert out == [({"__tree__": "maple"}, "a maple tree"), ({"__tree__": "oak"}, "a oak tree")]


def test_empty_wildcard_file_is_an_error(sandbox: Path) -> None:
    """A wildcard file with only comments has no values."""
    (sandbox / "wildcards").mkdir()
    (sandbox / "wildcards" / "x.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(TemplateError, match="has no values"):
        variants("__x__", {})


def test_braces_escape_and_values_are_not_reexpanded() -> None:
    """{{ and }} are literal braces; a value containing braces is inserted verbatim."""
    out = variants("{{json}} {a}", {"a": ["{b}"]})
    assert out == [({"a": "{b}"}, "{json} {b}")]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("{a.__class__}", id="attribute-access"),
        pytest.param("{a:>10}", id="format-spec"),
        pytest.param("{0}", id="positional"),
    ],
)
def test_no_format_mini_language(text: str) -> None:
    """Only plain names: attribute access and format specs are just unknown placeholders."""
    with pytest.raises(TemplateError, match="has no values"):
        variants(text, {"a": ["x"]})


@pytest.mark.parametrize(
    ("text", "words"),
    [
        pytest.param("a {b", "unclosed '{'", id="unclosed"),
        pytest.param("a } b", "unmatched '}'", id="lone-close"),
        pytest.param("a {} b", "empty placeholder", id="empty"),
        pytest.param("a { {b} }", "'{' inside a placeholder", id="nested"),
    ],
)
def test_bad_braces(text: str, words: str) -> None:
    """Malformed placeholders are errors, not silent literal text."""
    with pytest.raises(TemplateError, match=words):
        parse_template(text)


def test_zip_walks_lists_side_by_side() -> None:
    """zip pairs the i-th values; unequal lengths are refused."""
    out = variants("{a}{b}", {"a": ["1", "2"], "b": ["x", "y"]}, "zip")
    assert [p for _, p in out] == ["1x", "2y"]
    with pytest.raises(TemplateError, match="equal length"):
        variants("{a}{b}", {"a": ["1", "2"], "b": ["x"]}, "zip")


def test_no_variables_is_one_variant() -> None:
    """A plain prompt is one variant in every mode."""
    for combine in ("product", "zip"):
        assert variants("plain", {}, combine) == [({}, "plain")]
    assert variants("plain", {}, "sample", samples=1) == [({}, "plain")]


def test_sample_is_seeded_and_distinct() -> None:
    """sample picks N distinct combinations, the same ones for the same seed."""
    given_vars = {"a": [str(i) for i in range(10)], "b": [str(i) for i in range(10)]}
    first = variants("{a}{b}", given_vars, "sample", samples=30, seed=7)
    again = variants("{a}{b}", given_vars, "sample", samples=30, seed=7)
    other = variants("{a}{b}", given_vars, "sample", samples=30, seed=8)
    prompts = [p for _, p in first]
    assert prompts == [p for _, p in again]
    assert prompts != [p for _, p in other]
    assert len(set(prompts)) == 30


def test_sample_never_builds_the_product() -> None:
    """Sampling from 10**40 combinations works: indices are decoded, not enumerated."""
    template = parse_template(" ".join(f"{{v{i}}}" for i in range(40)))
    values = {f"v{i}": tuple(str(d) for d in range(10)) for i in range(40)}
    out = list(iter_variants(template, values, "sample", samples=5, seed=1))
    assert len({p for _, p in out}) == 5
    assert count_variants(values, "product") == 10**40


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=3),
    data=st.data(),
)
def test_sample_is_a_subset_of_the_product(lengths: list[int], data: st.DataObject) -> None:
    """Every sampled combination is a distinct member of the product, in product order."""
    values = {f"v{i}": tuple(f"{i}.{j}" for j in range(n)) for i, n in enumerate(lengths)}
    template = parse_template(" ".join(f"{{{name}}}" for name in values))
    total = count_variants(values, "product")
    samples = data.draw(st.integers(min_value=1, max_value=total))
    seed = data.draw(st.integers(min_value=0, max_value=2**32))
    picked = [
        tuple(v.values())
        for v, _ in iter_variants(template, values, "sample", samples=samples, seed=seed)
    ]
    product = list(itertools.product(*values.values()))
    assert len(set(picked)) == samples
    assert picked == [c for c in product if c in set(picked)]


def test_sample_larger_than_product_is_refused() -> None:
    """Asking for more samples than combinations is an error."""
    with pytest.raises(TemplateError, match="more than the 2 combinations"):
        count_variants({"a": ("1", "2")}, "sample", 3)
