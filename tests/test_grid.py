"""Contact sheets: layout, cell contents, placeholders, pages, names and metadata."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import unicodedata
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from checks import bare_record
from PIL import Image

from pipeline.job_record import BALANCE_INPUT, JobRecord, JobSource
from pipeline.manifest.writer import ManifestWriter
from pipeline.records import ErrorInfo, InputImage, ItemRecord, OutputFile
from pipeline.views.grid import FLAG_MARK, draw_grids
from pipeline.views.grid_model import Grid, collect_sources
from pipeline.views.sheet_text import FONT_FILE, Typeface

RGB = tuple[int, int, int]
SEASONS = ["early fall", "late fall"]
TREES = ["maple", "oak", "birch"]
PALETTE: list[RGB] = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128),
    (170, 110, 40), (128, 0, 0), (0, 0, 128), (128, 128, 0), (255, 0, 0), (0, 255, 0),
]  # fmt: skip


def key_of(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def ok_record(
    out: Path,
    source: str,
    variables: Mapping[str, str],
    colours: Sequence[RGB],
    *,
    repeat: int = 0,
    size: tuple[int, int] = (24, 24),
    input_image: InputImage | None = None,
) -> ItemRecord:
    """An ok line whose images are solid `colours`, written under OUT/images."""
    key = key_of(source, variables, repeat, input_image)
    outputs = []
    for i, colour in enumerate(colours):
        rel = f"images/{source}/{key[:16]}-{i}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, colour).save(out / rel)
        outputs.append(OutputFile(rel, key, *size))
    return ItemRecord(
        key=key,
        status="ok",
        source=source,
        vars=dict(variables),
        repeat=repeat,
        input=input_image,
        prompt=f"{source} {variables}",
        params={"n": len(colours)},
        outputs=tuple(outputs),
        attempts=1,
    )


def failed_record(source: str, variables: Mapping[str, str], *, repeat: int = 0) -> ItemRecord:
    return ItemRecord(
        key=key_of(source, variables, repeat, None),
        status="failed",
        source=source,
        vars=dict(variables),
        repeat=repeat,
        input=None,
        prompt=f"{source} {variables}",
        params={"n": 1},
        attempts=6,
        error=ErrorInfo("http_status", 500, "upstream exploded"),
    )


def write_manifest(out: Path, records: Sequence[ItemRecord]) -> None:
    with ManifestWriter(out / "manifest.jsonl") as writer:
        for record in records:
            writer.append(record)


def write_job(out: Path, *sources: Mapping[str, Any]) -> None:
    job = {"name": "fall", "spec": "/abs/spec.yaml", "backend": "mock", "sources": list(sources)}
    (out / "job.json").write_text(json.dumps(job), encoding="utf-8")


def source_spec(name: str, variables: Mapping[str, list[str]], **extra: Any) -> dict[str, Any]:
    template = "A street in " + " ".join(f"{{{k}}}" for k in variables)
    spec = {"name": name, "prompt": template, "vars": dict(variables), "combine": "product"}
    return {"repeats": 1, "input": "none", "n": 1, **spec, **extra}


def street_out(
    out: Path, *, failed: Sequence[tuple[str, str]] = (), skipped: Sequence[tuple[str, str]] = ()
) -> dict[tuple[str, str], RGB]:
    """A 2 × 3 season × tree job; returns the colour of every ok cell."""
    write_job(out, source_spec("street", {"season": SEASONS, "tree": TREES}))
    colours: dict[tuple[str, str], RGB] = {}
    records = []
    for i, (season, tree) in enumerate((s, t) for t in TREES for s in SEASONS):
        variables = {"season": season, "tree": tree}
        if (season, tree) in failed:
            records.append(failed_record("street", variables))
        elif (season, tree) not in skipped:
            colours[(season, tree)] = PALETTE[i]
            records.append(ok_record(out, "street", variables, [PALETTE[i]]))
    write_manifest(out, records)
    return colours


def layout(sheet: Image.Image) -> dict[str, Any]:
    return dict(json.loads(sheet.info["synthaug.layout"]))


def centre(sheet: Image.Image, col: int, row: int) -> RGB:
    box = layout(sheet)
    x = box["x0"] + col * box["step"] + box["cell"] // 2
    y = box["y0"] + row * box["step"] + box["cell"] // 2
    pixel = sheet.convert("RGB").getpixel((x, y))
    assert isinstance(pixel, tuple)
    return (pixel[0], pixel[1], pixel[2])


def cell_colours(sheet: Image.Image, col: int, row: int) -> set[RGB]:
    box = layout(sheet)
    x, y = box["x0"] + col * box["step"], box["y0"] + row * box["step"]
    crop = sheet.convert("RGB").crop((x, y, x + box["cell"], y + box["cell"]))
    colours = crop.getcolors(maxcolors=box["cell"] ** 2) or []
    return {(c[0], c[1], c[2]) for _, c in colours if isinstance(c, tuple)}


def test_cells_show_the_image_of_their_value_pair(tmp_path: Path) -> None:
    """First variable runs across, second down; each cell holds the image of its pair."""
    colours = street_out(tmp_path)
    paths = draw_grids(tmp_path, cell_px=48)
    assert paths == [tmp_path / "grids" / "street.png"]
    with Image.open(paths[0]) as sheet:
        box = layout(sheet)
        assert box["columns"] == SEASONS
        assert [r["value"] for r in box["rows"]] == TREES
        assert sheet.width >= box["x0"] + 2 * box["step"]
        assert sheet.height >= box["y0"] + 3 * box["step"]
        for (season, tree), colour in colours.items():
            assert centre(sheet, SEASONS.index(season), TREES.index(tree)) == colour


def frame(sheet: Image.Image, col: int, row: int) -> list[RGB]:
    """Pixels on a cell's edge, just inside it: its four corners and the middle of each side."""
    box = layout(sheet)
    x, y, last = box["x0"] + col * box["step"], box["y0"] + row * box["step"], box["cell"] - 1
    rgb = sheet.convert("RGB")
    spots = [(0, 0), (last, 0), (0, last), (last, last)]
    spots += [(last // 2, 0), (0, last // 2), (last, last // 2), (last // 2, last)]
    return [rgb.getpixel((x + dx, y + dy)) for dx, dy in spots]  # type: ignore[misc]


def test_flagged_cells_are_framed_and_name_their_flags(tmp_path: Path) -> None:
    """A flagged image's cell has a frame in the mark colour and a band with its flag names
    at the bottom; the image still shows; unflagged cells have no frame."""
    colours = street_out(tmp_path)
    oak = ok_record(tmp_path, "street", {"season": "late fall", "tree": "oak"}, [PALETTE[3]])
    flagged = dataclasses.replace(oak.outputs[0], flags=("duplicate", "no_detection"))
    write_manifest(tmp_path, [dataclasses.replace(oak, outputs=(flagged,))])
    (path,) = draw_grids(tmp_path, cell_px=96)
    with Image.open(path) as sheet:
        assert set(frame(sheet, 1, 1)) == {FLAG_MARK}
        assert centre(sheet, 1, 1) == colours[("late fall", "oak")]
        for col, row in [(0, 0), (1, 0), (0, 1), (0, 2), (1, 2)]:
            assert FLAG_MARK not in frame(sheet, col, row)
            assert FLAG_MARK not in cell_colours(sheet, col, row)
        box = layout(sheet)
        x, y = box["x0"] + box["step"], box["y0"] + box["step"]
        band = sheet.convert("RGB").crop((x, y + box["cell"] * 2 // 3, x + box["cell"], y + 96))
        inks = {c for _, c in band.getcolors(maxcolors=96 * 96) or []}
        assert FLAG_MARK in inks
        assert (255, 255, 255) in inks  # the flag names, in white on the band


@pytest.mark.parametrize(
    ("failed", "skipped"),
    [
        pytest.param([("late fall", "oak")], [], id="failed"),
        pytest.param([], [("late fall", "oak")], id="pending"),
    ],
)
def test_failed_or_pending_cell_is_a_placeholder(
    tmp_path: Path, failed: list[tuple[str, str]], skipped: list[tuple[str, str]]
) -> None:
    """A failed or not yet run item is drawn as a marked placeholder, not a gap or an image."""
    colours = street_out(tmp_path, failed=failed, skipped=skipped)
    (path,) = draw_grids(tmp_path, cell_px=64)
    with Image.open(path) as sheet:
        inside = cell_colours(sheet, 1, 1)
        assert centre(sheet, 1, 1) not in colours.values()
        assert not inside & set(colours.values())
        assert len(inside) > 3  # hatch + text box + text, not a blank


def test_generated_and_missing_files_are_placeholders(tmp_path: Path) -> None:
    """An answered-not-downloaded item and an ok item whose file vanished are both marked."""
    write_job(tmp_path, source_spec("s", {"tree": TREES}))
    gone = ok_record(tmp_path, "s", {"tree": "oak"}, [PALETTE[1]])
    (tmp_path / gone.outputs[0].path).unlink()
    generated = dataclasses.replace(failed_record("s", {"tree": "birch"}), status="generated")
    generated = dataclasses.replace(generated, error=None)
    write_manifest(
        tmp_path, [ok_record(tmp_path, "s", {"tree": "maple"}, [PALETTE[0]]), gone, generated]
    )
    (path,) = draw_grids(tmp_path, cell_px=64)
    with Image.open(path) as sheet:
        assert centre(sheet, 0, 0) == PALETTE[0]
        for col in (1, 2):
            assert PALETTE[1] not in cell_colours(sheet, col, 0)
            assert len(cell_colours(sheet, col, 0)) > 3


def test_one_variable_is_one_row(tmp_path: Path) -> None:
    """A source with one variable draws a single row with a column per value."""
    write_job(tmp_path, source_spec("s", {"tree": TREES}))
    records = [ok_record(tmp_path, "s", {"tree": t}, [PALETTE[i]]) for i, t in enumerate(TREES)]
    write_manifest(tmp_path, records)
    (path,) = draw_grids(tmp_path, cell_px=40)
    with Image.open(path) as sheet:
        box = layout(sheet)
        assert len(box["rows"]) == 1
        assert sheet.height < box["y0"] + 2 * box["step"]
        assert [centre(sheet, i, 0) for i in range(3)] == PALETTE[:3]


def test_repeats_and_n_images_are_sub_rows(tmp_path: Path) -> None:
    """Each repeat and each of the n images of a request gets its own labelled sub-row."""
    write_job(tmp_path, source_spec("s", {"tree": ["oak", "elm"]}, repeats=2, n=2))
    records = [
        ok_record(
            tmp_path,
            "s",
            {"tree": t},
            [PALETTE[4 * i + 2 * r], PALETTE[4 * i + 2 * r + 1]],
            repeat=r,
        )
        for i, t in enumerate(["oak", "elm"])
        for r in range(2)
    ]
    write_manifest(tmp_path, records)
    (path,) = draw_grids(tmp_path, cell_px=32)
    with Image.open(path) as sheet:
        rows = [r["sample"] for r in layout(sheet)["rows"]]
        assert rows == [
            "repeat 1, image 1",
            "repeat 1, image 2",
            "repeat 2, image 1",
            "repeat 2, image 2",
        ]
        for i in range(2):
            assert [centre(sheet, i, row) for row in range(4)] == PALETTE[4 * i : 4 * i + 4]


def test_input_images_are_sub_rows(tmp_path: Path) -> None:
    """An image source with vars gets one sub-row per input image, named by its file."""
    write_job(tmp_path, source_spec("s", {"tree": ["oak"]}, input="images"))
    inputs = [InputImage("file", f"/data/{n}.png", "ab" * 32) for n in ("a", "b")]
    records = [
        ok_record(tmp_path, "s", {"tree": "oak"}, [PALETTE[i]], input_image=x)
        for i, x in enumerate(inputs)
    ]
    write_manifest(tmp_path, records)
    (path,) = draw_grids(tmp_path, cell_px=32)
    with Image.open(path) as sheet:
        assert [r["sample"] for r in layout(sheet)["rows"]] == ["a.png", "b.png"]
        assert [centre(sheet, 0, row) for row in range(2)] == PALETTE[:2]


def test_further_variables_make_separate_named_sheets(tmp_path: Path) -> None:
    """A third variable splits the grid into one sheet per value, named after it."""
    lights = ["dawn", "dusk / night"]
    write_job(tmp_path, source_spec("s", {"season": SEASONS, "tree": ["oak"], "light": lights}))
    records = [
        ok_record(tmp_path, "s", {"season": s, "tree": "oak", "light": light}, [PALETTE[2 * j + i]])
        for j, light in enumerate(lights)
        for i, s in enumerate(SEASONS)
    ]
    write_manifest(tmp_path, records)
    paths = draw_grids(tmp_path, cell_px=32)
    assert [p.name for p in paths] == ["s--light=dawn.png", "s--light=dusk___night.png"]
    for j, path in enumerate(paths):
        with Image.open(path) as sheet:
            assert json.loads(sheet.info["synthaug.slice"]) == {"light": lights[j]}
            assert [centre(sheet, i, 0) for i in range(2)] == PALETTE[2 * j : 2 * j + 2]


@pytest.mark.parametrize(
    "max_px", [pytest.param(600, id="rows-split"), pytest.param(300, id="rows-and-cols-split")]
)
def test_large_grids_split_into_numbered_pages(tmp_path: Path, max_px: int) -> None:
    """No sheet exceeds the size limit; pages are numbered and hold every cell exactly once."""
    trees = [f"tree {i}" for i in range(12)]
    seasons = [f"season {i}" for i in range(4)]
    write_job(tmp_path, source_spec("s", {"season": seasons, "tree": trees}))
    expected: dict[tuple[str, str], RGB] = {}
    records = []
    for i, (season, tree) in enumerate((s, t) for t in trees for s in seasons):
        expected[(season, tree)] = (i * 5, 255 - i * 5, 128)
        records.append(
            ok_record(tmp_path, "s", {"season": season, "tree": tree}, [expected[(season, tree)]])
        )
    write_manifest(tmp_path, records)
    paths = draw_grids(tmp_path, cell_px=48, max_sheet_px=max_px)
    assert len(paths) > 1
    assert [p.name for p in paths] == ["s.png", *(f"s-{k}.png" for k in range(2, len(paths) + 1))]
    seen: dict[tuple[str, str], RGB] = {}
    for k, path in enumerate(paths, start=1):
        with Image.open(path) as sheet:
            assert max(sheet.size) <= max_px
            assert sheet.info["synthaug.page"] == f"{k}/{len(paths)}"
            box = layout(sheet)
            for ci, season in enumerate(box["columns"]):
                for ri, row in enumerate(box["rows"]):
                    assert (season, row["value"]) not in seen
                    seen[(season, row["value"])] = centre(sheet, ci, ri)
    assert seen == expected


def test_sheet_carries_spec_source_template_and_vars(tmp_path: Path) -> None:
    """PNG text metadata names the spec, source, template and variables of the sheet."""
    street_out(tmp_path)
    (path,) = draw_grids(tmp_path, cell_px=32)
    with Image.open(path) as sheet:
        assert sheet.info["synthaug.spec"] == "spec.yaml"  # the file name: no home folder
        assert sheet.info["synthaug.source"] == "street"
        assert sheet.info["synthaug.template"] == "A street in {season} {tree}"
        assert json.loads(sheet.info["synthaug.vars"]) == {"season": SEASONS, "tree": TREES}


def test_works_without_job_json(tmp_path: Path) -> None:
    """Without OUT/job.json the manifest alone gives the axes, in order of appearance."""
    colours = street_out(tmp_path, skipped=[("early fall", "birch")])
    (tmp_path / "job.json").unlink()
    (path,) = draw_grids(tmp_path, cell_px=32)
    with Image.open(path) as sheet:
        box = layout(sheet)
        assert box["columns"] == SEASONS
        assert [r["value"] for r in box["rows"]] == TREES
        assert centre(sheet, 1, 2) == colours[("late fall", "birch")]
        assert centre(sheet, 0, 2) not in colours.values()


def test_sources_without_vars_get_no_sheet(tmp_path: Path) -> None:
    """Only sources with template variables get a contact sheet."""
    write_job(tmp_path, {"name": "plain", "prompt": "red", "vars": {}, "input": "images"})
    write_manifest(tmp_path, [ok_record(tmp_path, "plain", {}, [PALETTE[0]])])
    assert draw_grids(tmp_path) == []
    assert not (tmp_path / "grids").exists()


def test_redrawing_removes_stale_pages_but_not_foreign_files(tmp_path: Path) -> None:
    """A redraw with fewer pages deletes our old pages and keeps files we did not write."""
    street_out(tmp_path)
    assert len(draw_grids(tmp_path, cell_px=48, max_sheet_px=220)) > 1
    Image.new("RGB", (4, 4)).save(tmp_path / "grids" / "mine.png")
    assert draw_grids(tmp_path, cell_px=48) == [tmp_path / "grids" / "street.png"]
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["mine.png", "street.png"]


def header_strip(out: Path, name: str, values: Sequence[str], *, cell_px: int = 96) -> Image.Image:
    """Draw a one-row sheet whose columns are `values`; return the band holding their labels."""
    write_job(out, source_spec(name, {"word": list(values)}))
    write_manifest(out, [ok_record(out, name, {"word": v}, [PALETTE[0]]) for v in values])
    (path,) = draw_grids(out, cell_px=cell_px)
    (out / "manifest.jsonl").unlink()
    with Image.open(path) as sheet:
        box = layout(sheet)
        return sheet.convert("RGB").crop((box["x0"], box["y0"] - 30, sheet.width, box["y0"]))


@pytest.mark.parametrize(
    ("label", "lookalikes"),
    [
        pytest.param("été", ["?t?", "ete"], id="accents"),
        pytest.param("Straße", ["Stra?e", "Strasse"], id="sharp-s"),
        pytest.param("Ёлка", ["????", "Elka"], id="cyrillic"),
        pytest.param("été — Straße — 東京", ["ete - Strasse - ??"], id="mixed-with-cjk"),
    ],
)
def test_non_ascii_labels_render_their_own_glyphs(
    tmp_path: Path, label: str, lookalikes: list[str]
) -> None:
    """Latin and Cyrillic labels are drawn as themselves, not as '?' or their ASCII lookalike."""
    drawn = header_strip(tmp_path, "a", [label])
    for other in lookalikes:
        assert drawn.tobytes() != header_strip(tmp_path, "b", [other]).tobytes(), other
    assert len(drawn.getcolors(maxcolors=100_000) or []) > 2  # text, not a blank band


def test_glyphs_the_font_lacks_are_drawn_as_question_marks(tmp_path: Path) -> None:
    """CJK and emoji, absent from DejaVu Sans, become '?' (never a crash or a tofu box)."""
    drawn = header_strip(tmp_path, "a", ["été 東京 🍁"])
    assert drawn.tobytes() == header_strip(tmp_path, "b", ["été ?? ?"]).tobytes()


def test_decomposed_accents_draw_like_composed_ones(tmp_path: Path) -> None:
    """'e' + combining acute (NFD, as macOS file names are) draws exactly like 'é'."""
    nfd = unicodedata.normalize("NFD", "Café")
    assert (
        header_strip(tmp_path, "a", [nfd]).tobytes()
        == header_strip(tmp_path, "b", ["Café"]).tobytes()
    )


def test_the_font_ships_in_the_package() -> None:
    """Sheets are drawn in the bundled DejaVu Sans, not Pillow's ASCII-only fallback."""
    face = Typeface.load()
    assert face.data is not None
    assert resources.files("pipeline").joinpath(FONT_FILE).read_bytes() == face.data
    assert "Bitstream Vera" in resources.files("pipeline").joinpath("fonts/LICENSE").read_text()


def test_fallback_font_draws_closest_ascii() -> None:
    """Without the font file, Pillow's ASCII font draws letters as their plain ASCII."""
    face = Typeface(None)
    font = face.font(12)
    assert face.printable("Café Straße — 東京", font) == "Cafe Strasse - ??"


@pytest.mark.parametrize(
    ("values", "narrow"),
    [
        pytest.param(["oak", "elm"], True, id="short-labels-narrow-header"),
        pytest.param(["a rather long row label " * 3, "elm"], False, id="long-labels-at-cap"),
    ],
)
def test_row_header_fits_its_labels(tmp_path: Path, values: list[str], narrow: bool) -> None:
    """The row header is only as wide as its labels need, and no label runs into a cell."""
    write_job(tmp_path, source_spec("s", {"season": ["fall"], "tree": values}))
    write_manifest(
        tmp_path,
        [ok_record(tmp_path, "s", {"season": "fall", "tree": v}, [PALETTE[0]]) for v in values],
    )
    (path,) = draw_grids(tmp_path, cell_px=256)
    with Image.open(path) as sheet:
        box = layout(sheet)
        margin = 256 // 16
        assert (box["x0"] - margin < 200) == narrow
        assert box["x0"] - margin <= 256  # the cap: the cell size
        gutter = sheet.convert("RGB").crop((box["x0"] - 4, box["y0"], box["x0"], sheet.height))
    assert gutter.getcolors() == [(gutter.width * gutter.height, (255, 255, 255))]


def test_long_labels_stay_inside_their_column(tmp_path: Path) -> None:
    """A label wider than its cell is wrapped and cut, not drawn across its neighbours."""
    write_job(tmp_path, source_spec("s", {"word": ["an extremely long value " * 6]}))
    write_manifest(
        tmp_path, [ok_record(tmp_path, "s", {"word": "an extremely long value " * 6}, [PALETTE[0]])]
    )
    (path,) = draw_grids(tmp_path, cell_px=48)
    with Image.open(path) as sheet:
        box = layout(sheet)
        header = sheet.convert("RGB").crop((box["x0"], box["y0"] - 30, sheet.width, box["y0"]))
        right = header.crop((box["cell"] + 1, 0, header.width, header.height))
        left = header.crop((0, 0, box["cell"], header.height))
    assert right.getcolors() == [(right.width * right.height, (255, 255, 255))]
    assert len(left.getcolors(maxcolors=100_000) or []) > 1


def test_rejects_a_limit_smaller_than_one_cell(tmp_path: Path) -> None:
    """A max sheet size that cannot hold a single cell is refused with a clear message."""
    street_out(tmp_path)
    with pytest.raises(ValueError, match="too small"):
        draw_grids(tmp_path, cell_px=256, max_sheet_px=300)


def test_a_real_runs_job_json_gives_n_cells_per_item(sandbox: Path) -> None:
    """job.json as a run writes it carries each source's `n`: with nothing done yet, an
    ``n: 2`` source still draws two cells per item; once run, both hold images."""
    import synthaug

    spec = synthaug.load_spec(
        {
            "version": 1,
            "name": "n-two",
            "backend": {"kind": "mock"},
            "output_dir": "out",
            "params": {"size": "32x32", "n": 2},
            "sources": [{"name": "s", "prompt": "a {red|blue} {cat|dog}"}],
        }
    )
    out = sandbox / "out"
    control = synthaug.RunControl()
    control.stop()  # a run that writes job.json and the manifest, and sends nothing
    assert synthaug.run(spec, control=control).requests == 0
    job = json.loads((out / "job.json").read_text(encoding="utf-8"))
    assert [source["n"] for source in job["sources"]] == [2]
    (path,) = draw_grids(out, cell_px=32)
    with Image.open(path) as sheet:
        box = layout(sheet)
        assert [r["sample"] for r in box["rows"]] == ["image 1", "image 2"] * 2
        placeholders = [cell_colours(sheet, c, r) for c in range(2) for r in range(4)]
        assert all(len(colours) > 3 for colours in placeholders)  # hatch and text
    assert synthaug.run(spec).images == 8
    (path,) = draw_grids(out, cell_px=32)
    with Image.open(path) as sheet:
        assert [r["sample"] for r in layout(sheet)["rows"]] == ["image 1", "image 2"] * 2


def test_a_balance_sheet_expects_only_what_was_planned(tmp_path: Path) -> None:
    """A roboflow_balance source plans some combinations per class, not all: the cells
    of combinations it never planned read "not in job", not PENDING."""
    job = JobRecord(
        sources=(
            JobSource(
                "rare",
                prompt="a {class} in the {place}",
                vars={"class": ("dog", "leaf"), "place": ("park", "beach")},
                combine="product",
                input=BALANCE_INPUT,
            ),
        )
    )
    planned = dataclasses.replace(
        bare_record("a" * 64, source="rare"), vars={"class": "dog", "place": "park"}
    )
    (source,) = collect_sources(job, {"rare": [planned]})
    grid = Grid.build(source, [planned], tmp_path)
    sample = grid.samples[0]
    assert grid.cell(("leaf", "beach"), sample).lines == ("not in job",)
    assert grid.cell(("dog", "park"), sample).tone != "pending"
