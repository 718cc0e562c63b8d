"""Work items: lazy expansion in a fixed order, stable keys, counts and the max_items guard."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import pipeline.sources
from pipeline.errors import SpecError
from pipeline.items import (
    check_max_items,
    count_items,
    describe_sources,
    expand_items,
    item_key,
    prompt_keyer,
)
from pipeline.job_record import JobSource
from pipeline.jobspec.load import load_spec
from pipeline.records import request_body
from pipeline.sources import HashCache, InputChangedError, read_input_bytes


def write_png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def job(tmp: Path, sources: list[dict[str, Any]], **top: Any) -> Path:
    """Write a mock job with `sources` and two images under tmp/img; return the spec path."""
    write_png(tmp / "img" / "a.png", (255, 0, 0))
    write_png(tmp / "img" / "b.png", (0, 0, 255))
    data = {"version": 1, "name": "job", "backend": {"kind": "mock"}, "sources": sources, **top}
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


GRID = {"name": "grid", "prompt": "{s} {t}", "vars": {"s": ["fall", "winter"], "t": ["oak", "elm"]}}
FILES = {"name": "files", "images": ["img/*.png"], "prompt": "red {x|y}", "repeats": 2}


def test_order_is_sources_inputs_variants_repeats(sandbox: Path) -> None:
    """Items come in spec order: sources, then inputs, variants, repeats innermost."""
    spec = load_spec(job(sandbox, [GRID, FILES]))
    items = list(expand_items(spec))
    assert [(i.source, i.prompt) for i in items[:4]] == [
        ("grid", "fall oak"),
        ("grid", "fall elm"),
        ("grid", "winter oak"),
        ("grid", "winter elm"),
    ]
    files = [
        (Path(i.input.value).name, i.prompt, i.repeat, i.index)
        for i in items[4:]
        if i.input is not None
    ]
    assert files == [
        ("a.png", "red x", 0, 0),
        ("a.png", "red x", 1, 1),
        ("a.png", "red y", 0, 2),
        ("a.png", "red y", 1, 3),
        ("b.png", "red x", 0, 4),
        ("b.png", "red x", 1, 5),
        ("b.png", "red y", 0, 6),
        ("b.png", "red y", 1, 7),
    ]
    assert len({i.key for i in items}) == len(items) == 12
    assert list(items[0].vars) == ["s", "t"]


def test_key_is_the_hash_of_the_canonical_body(sandbox: Path) -> None:
    """The key is sha256 of sorted, spaceless JSON with the file as sha256:<hex>."""
    spec = load_spec(job(sandbox, [FILES]))
    item = next(expand_items(spec))
    digest = hashlib.sha256((sandbox / "img" / "a.png").read_bytes()).hexdigest()
    body = request_body(item, f"sha256:{digest}")
    assert body["image"] == f"sha256:{digest}"
    assert body["image_type"] == "base64"
    canonical = json.dumps(
        {"backend": "mock", "body": body, "repeat": 0}, sort_keys=True, separators=(",", ":")
    )
    assert item.key == hashlib.sha256(canonical.encode()).hexdigest()
    assert item.key == item_key("mock", body, 0)
    assert str(sandbox) not in json.dumps(body)  # no local path in the key


def test_same_spec_in_another_folder_has_the_same_keys(sandbox: Path) -> None:
    """Keys depend on file bytes and spec values, never on where the files live."""
    here = [i.key for i in expand_items(load_spec(job(sandbox / "one", [GRID, FILES])))]
    shutil.copytree(sandbox / "one", sandbox / "two")
    there = [i.key for i in expand_items(load_spec(sandbox / "two" / "spec.yaml"))]
    assert here == there


def test_backend_kind_is_part_of_the_key(sandbox: Path) -> None:
    """The same request to another backend is another item."""
    mock = next(expand_items(load_spec(job(sandbox, [GRID]))))
    real = next(
        expand_items(load_spec(job(sandbox, [GRID], backend={"kind": "roboflow"}, project_url="p")))
    )
    assert mock.key != real.key


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prompt=st.text(alphabet="abcdefgh xyz,.", min_size=1, max_size=30))
def test_changing_one_prompt_changes_only_that_sources_keys(sandbox: Path, prompt: str) -> None:
    """Editing one source's prompt re-keys that source and leaves the others alone."""

    def keys(spec_path: Path, source: str) -> set[str]:
        return {i.key for i in expand_items(load_spec(spec_path)) if i.source == source}

    before = job(sandbox, [GRID, FILES])
    grid_before, files_before = keys(before, "grid"), keys(before, "files")
    after = job(sandbox, [GRID, {**FILES, "prompt": prompt + " {x|y}"}])
    assert keys(after, "grid") == grid_before
    assert keys(after, "files").isdisjoint(files_before) == (prompt != "red")


def test_params_merge_global_then_source(sandbox: Path) -> None:
    """A source's params override the global ones, key by key."""
    ids = {"name": "ids", "roboflow_ids": ["x1"], "prompt": "p", "params": {"quality": "high"}}
    top = {"params": {"quality": "low", "size": "1024x1024", "force_caption_regenerate": True}}
    spec = load_spec(job(sandbox, [GRID, ids], **top))
    grid, ident = (next(i for i in expand_items(spec) if i.source == s) for s in ("grid", "ids"))
    assert grid.params["size"] == ident.params["size"] == "1024x1024"
    assert (grid.params["quality"], ident.params["quality"]) == ("low", "high")
    assert "force_caption_regenerate" not in grid.params  # only sent with roboflow ids
    assert ident.params["force_caption_regenerate"] is True
    assert ident.input is not None
    assert ident.input.key_value() == "x1"


def test_count_matches_expansion(sandbox: Path) -> None:
    """count_items counts inputs × variants × repeats without expanding."""
    urls = {"name": "urls", "urls": ["https://a/1.jpg", "https://a/2.jpg"], "prompt": "p"}
    sample = {**GRID, "name": "sample", "combine": "sample", "samples": 3}
    spec = load_spec(job(sandbox, [GRID, FILES, urls, sample]))
    counted = count_items(spec)
    assert counted == {"grid": 4, "files": 8, "urls": 2, "sample": 3}
    expanded: dict[str, int] = {}
    for item in expand_items(spec):
        expanded[item.source] = expanded.get(item.source, 0) + 1
    assert expanded == counted


def test_expansion_is_lazy(sandbox: Path) -> None:
    """A million-item spec yields its first item without building the rest."""
    big = {
        "name": "big",
        "prompt": "{a}{b}",
        "vars": {"a": list(range(1000)), "b": list(range(1000))},
    }
    spec = load_spec(job(sandbox, [big], run={"max_items": 2_000_000}))
    stream = expand_items(spec)
    assert next(stream).prompt == "00"
    assert next(stream).prompt == "01"


def test_max_items_guard_names_count_and_source(sandbox: Path) -> None:
    """A spec past run.max_items is a SpecError at run.max_items naming the source."""
    path = job(sandbox, [GRID, FILES], run={"max_items": 10})
    lines = path.read_text(encoding="utf-8").splitlines()
    spec = load_spec(path)
    with pytest.raises(SpecError) as info:
        check_max_items(spec)
    assert info.value.key_path == "run.max_items"
    assert info.value.line is not None
    assert lines[info.value.line - 1].strip() == "max_items: 10"
    assert "expands to 12 items, more than max_items 10" in str(info.value)
    assert "source 'files'" in str(info.value)
    check_max_items(load_spec(job(sandbox, [GRID, FILES], run={"max_items": 12})))


def test_each_file_is_hashed_once(sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared HashCache hashes each file once across variants, repeats and calls."""
    calls: list[Path] = []
    real = pipeline.sources.file_sha256

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(pipeline.sources, "file_sha256", counting)
    spec = load_spec(job(sandbox, [FILES, {**FILES, "name": "again"}]))
    cache = HashCache()
    list(expand_items(spec, hashes=cache))
    list(expand_items(spec, hashes=cache))
    assert sorted(p.name for p in calls) == ["a.png", "b.png"]


def test_describe_sources_lists_every_variable(sandbox: Path) -> None:
    """job.json's source list shows template, all variable values, input kind and n."""
    (sandbox / "wildcards").mkdir()
    (sandbox / "wildcards" / "tree.txt").write_text("oak\nelm\n", encoding="utf-8")
    mixed = {"name": "mixed", "prompt": "{s} __tree__ {a|b}", "vars": {"s": [1, 2.5]}}
    spec = load_spec(job(sandbox, [mixed, FILES]))
    assert describe_sources(spec) == [
        JobSource(
            name="mixed",
            prompt="{s} __tree__ {a|b}",
            vars={"s": ("1", "2.5"), "__tree__": ("oak", "elm"), "a|b": ("a", "b")},
            combine="product",
            repeats=1,
            input="none",
            n=1,
        ),
        JobSource(
            name="files",
            prompt="red {x|y}",
            vars={"x|y": ("x", "y")},
            combine="product",
            repeats=2,
            input="images",
            n=1,
        ),
    ]


def test_folder_walk_is_sorted_and_filtered(
    sandbox: Path, spec_factory: Callable[..., Path]
) -> None:
    """Folders list sorted, match extensions case-insensitively, skip hidden files."""
    for rel in ("d/b.PNG", "d/a.png", "d/sub/c.jpg", "d/.hidden.png", "d/sub/x.gif"):
        write_png(sandbox / rel, (1, 2, 3))
    folder = {"name": "f", "folder": "d", "recursive": True, "prompt": "p"}
    spec = load_spec(spec_factory(sources=[folder]))
    names = [
        Path(i.input.value).relative_to(sandbox / "d").as_posix()
        for i in expand_items(spec)
        if i.input
    ]
    assert names == ["a.png", "b.PNG", "sub/c.jpg"]
    flat = load_spec(spec_factory(sources=[{**folder, "recursive": False}]))
    assert count_items(flat) == {"f": 2}


def test_input_bytes_are_checked_before_sending(sandbox: Path) -> None:
    """read_input_bytes returns the planned bytes, and refuses changed or vanished files."""
    path = sandbox / "in.png"
    write_png(path, (9, 9, 9))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_input_bytes(path, digest) == path.read_bytes()
    write_png(path, (8, 8, 8))
    with pytest.raises(InputChangedError, match="changed since its item was planned"):
        read_input_bytes(path, digest)
    path.unlink()
    with pytest.raises(InputChangedError, match="can no longer be read"):
        read_input_bytes(str(path), digest)


@settings(max_examples=200, deadline=None)
@given(
    prompt=st.text(),
    repeat=st.integers(min_value=0, max_value=10_000),
    project=st.text(max_size=20),
    extra=st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=8), st.integers())),
)
def test_fast_keys_equal_the_canonical_key(
    prompt: str, repeat: int, project: str, extra: dict[str, object]
) -> None:
    """The per-prompt key shortcut gives exactly DESIGN's key for any prompt and body."""
    body = {**extra, "project_url": project, "model": "gpt-image-2", "n": 1}
    body.pop("prompt", None)
    expected = item_key("roboflow", {**body, "prompt": prompt}, repeat)
    assert prompt_keyer("roboflow", body)(prompt, repeat) == expected
