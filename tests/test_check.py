"""The check stage: a perceptual hash on every stored image, flags for unchanged and
duplicate outputs, found again without comparing all pairs."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from pipeline.jobspec.load import load_spec
from pipeline.jobspec.stage_settings import CheckSettings
from pipeline.manifest.log import load_state, read_latest, read_records
from pipeline.records import InputImage, ItemRecord, OutputFile
from pipeline.run.job import run_job
from pipeline.run.pool import RunStop
from pipeline.run.stages import StageContext
from pipeline.stages.check import CheckStage, image_hash
from pipeline.stages.hash_index import HashIndex, distance

HASHES = st.integers(min_value=0, max_value=2**64 - 1)
T = TypeVar("T")


@settings(max_examples=60, deadline=None)
@given(stored=st.lists(HASHES, max_size=40), query=HASHES, max_distance=st.integers(0, 12))
def test_index_finds_what_comparing_all_pairs_finds(
    stored: list[int], query: int, max_distance: int
) -> None:
    """A hash within the distance is found whenever one exists, and only then."""
    index = HashIndex(max_distance)
    near = [value for value in stored if distance(value, query) <= max_distance]
    # a few guaranteed near neighbours: the query with some of its bits flipped
    flipped = query ^ sum(1 << bit for bit in random.Random(query).sample(range(64), 3))
    for i, value in enumerate([*stored, flipped]):
        index.add(value, f"v{i}")
    if distance(flipped, query) <= max_distance:
        near.append(flipped)
    found = index.near(query)
    assert (found is not None) == bool(near)


def test_index_does_not_find_an_output_as_its_own_duplicate() -> None:
    """Checking an output again does not flag it against its own earlier hash."""
    index = HashIndex(4)
    index.add(0xFFFF, "images/s/a-0.png")
    assert index.near(0xFFFF, other_than="images/s/a-0.png") is None
    assert index.near(0xFFFE) == "images/s/a-0.png"


def test_a_job_with_check_hashes_every_image_and_flags_the_later_twin(
    spec_factory: Callable[..., Path],
) -> None:
    """Every stored image gets a 16-hex phash; of two identical images (the mock draws the
    same picture for a prompt's two repeats) the later is flagged duplicate; a resume
    checks nothing again."""
    path = spec_factory(
        params={"size": "128x128"},
        sources=[{"name": "twins", "prompt": "a {red|blue} cat", "repeats": 2}],
        check={},
    )
    spec = load_spec(path)
    first = run_sync(run_job(spec, spec_path=path))
    assert first.exit_code == 0  # flags are findings, not failures
    assert first.summary["check"]["checked"] == 4
    assert first.summary["check"]["duplicate"] == 2
    records = read_records(spec.output_dir / "manifest.jsonl").values()
    outputs = [o for record in records for o in record.outputs]
    assert len(outputs) == 4
    assert all(o.phash is not None and len(o.phash) == 16 for o in outputs)
    assert sorted(o.flags for o in outputs) == [(), (), ("duplicate",), ("duplicate",)]
    again = run_sync(run_job(spec, spec_path=path))
    assert again.summary["check"]["checked"] == 0
    assert len(load_state(spec.output_dir / "manifest.jsonl").finished) == 4


def test_an_output_that_is_its_input_is_flagged_unchanged(tmp_path: Path) -> None:
    """A model that answered with its input: the output's hash is the input's."""
    picture = tmp_path / "in.png"
    image = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(image).ellipse((10, 10, 80, 70), fill="navy")
    image.save(picture)
    stored = tmp_path / "images" / "s" / ("ab" * 8 + "-0.png")
    stored.parent.mkdir(parents=True)
    shutil.copy(picture, stored)
    output = OutputFile(path=f"images/s/{stored.name}", sha256="x", width=96, height=96)
    record = ItemRecord(
        key="ab" * 32,
        status="ok",
        source="s",
        vars={},
        repeat=0,
        input=InputImage("file", str(picture), "f" * 64),
        prompt="the same",
        params={},
        outputs=(output,),
    )
    context = StageContext(stop=RunStop(), out_dir=tmp_path, day="2026-12-07", backend_root=None)
    stage = CheckStage(CheckSettings(), context=context, index=HashIndex(4))
    checked = run_sync(stage.process(record, lambda: False))
    assert checked is not None
    assert checked.outputs[0].flags == ("unchanged",)
    assert checked.outputs[0].phash == f"{image_hash(picture):016x}"


@pytest.mark.parametrize("key", ["unchanged_distance", "duplicate_distance"])
def test_check_distances_are_bits_of_a_64_bit_hash(
    spec_factory: Callable[..., Path], key: str
) -> None:
    """A distance past 64 bits is a spec error naming the key."""
    from pipeline.errors import SpecError

    with pytest.raises(SpecError, match=f"check.{key}"):
        load_spec(spec_factory(check={key: 65}))


def test_manifest_lines_with_hashes_stay_readable(spec_factory: Callable[..., Path]) -> None:
    """The raw lines carry phash and flags as the contract names them."""
    path = spec_factory(params={"size": "64x64"}, check={})
    spec = load_spec(path)
    run_sync(run_job(spec, spec_path=path))
    (line,) = read_latest(spec.output_dir / "manifest.jsonl").values()
    (output,) = line["outputs"]
    assert set(output) >= {"phash", "flags"}
    assert output["flags"] == []


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end (the run's own loop, as the CLI has it)."""
    return asyncio.run(coroutine)
