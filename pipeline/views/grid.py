"""Contact sheets for prompt-variation sources, drawn from OUT alone (manifest + image files).

Layout of ``OUT/grids/<source>.png``, an X/Y plot:

* the first template variable runs across (a column per value), the second runs down (a
  row per value); a source with one variable is a single row;
* each further variable makes separate sheets, one per combination of its values, named
  ``<source>--<var>=<value>[--<var>=<value>...].png``: characters outside
  ``[A-Za-z0-9._=-]`` become ``_``, and a name that would collide with another or run past
  120 characters ends in ``~`` and 8 hex digits of the exact values;
* repeats, input images and the ``n`` images of one request are sub-rows of each row,
  labelled with the input's file name, ``repeat k`` and ``image j``;
* a sheet never exceeds ``max_sheet_px`` on either side: larger grids are split evenly into
  pages, the first keeps the name, the next are ``<name>-2.png``, ``<name>-3.png``, ...
  (row blocks first, then column blocks);
* a cell without an image is a hatched placeholder saying why: ``FAILED: <error kind>``,
  ``PENDING`` (not run yet, or answered but not downloaded), ``MISSING FILE``, ``UNREADABLE``
  or, without ``OUT/job.json``, ``NO RECORD``; a combination the job never asks for
  (``combine: zip`` or ``sample``) is a plain ``not in job`` cell;
* an image the stages after storage flagged (``duplicate``, ``unchanged``,
  ``no_detection``, ...) has an orange frame (`FLAG_MARK`) and its flags on a band at
  the bottom of the cell, so a reviewer sees at a glance what the export leaves out.

Each sheet explains itself later through PNG iTXt metadata: ``synthaug.spec``,
``synthaug.source``, ``synthaug.template``, ``synthaug.vars`` (JSON, all variables),
``synthaug.slice`` (JSON, the further variables' values on this sheet) and
``synthaug.page`` (``"2/4"``) and ``synthaug.layout`` (JSON: first cell's corner ``x0``,
``y0``, ``cell`` size, ``step`` between cells, the ``columns`` and ``rows`` shown).

Text is drawn in the DejaVu Sans font shipped inside the package, so a sheet looks the same
on every machine; measuring, wrapping and ellipsizing live in `pipeline.views.sheet_text`, which
also says which characters render. The row headers are as wide as their longest label needs,
up to the cell size (at least 120 px, at most 280 px); longer labels wrap, then end in "…".

This module is the drawing and layout; which manifest line belongs in which cell, and what
a cell without one means, is `pipeline.views.grid_model`.

It stays one module (about 450 lines) because a sheet's layout and its drawing share one
set of measured sizes (`_Style`); the model it draws from is already apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps
from PIL.PngImagePlugin import PngInfo

from ..job_record import JobRecord
from ..manifest.folded import read_all_records
from ..store.layout import GRIDS_DIR, read_job, write_atomic
from .grid_model import Cell, Grid, Sample, Source, Tone, collect_sources, group_by_source
from .sheet_text import META_SOURCE, Font, Typeface, line_height, text_width

__all__ = [
    "DEFAULT_CELL_PX",
    "DEFAULT_MAX_SHEET_PX",
    "FLAG_MARK",
    "GRIDS_DIR",
    "META_SOURCE",
    "draw_grids",
]

DEFAULT_CELL_PX = 256
DEFAULT_MAX_SHEET_PX = 8192
MAX_STEM_CHARS = 120
MIN_CELL_PX = 32
MIN_PAGE_WIDTH_PX = 480  # room for the title even when a page holds one narrow column
MIN_ROW_HEADER_PX = 48

log = logging.getLogger(__name__)

WHITE = (255, 255, 255)
INK = (30, 30, 30)
MUTED = (110, 110, 110)
CELL_BG = (238, 238, 238)
FLAG_MARK = (255, 110, 0)  # a flagged image's frame: vivid, unlike every placeholder tone
# (background, hatch, text) per placeholder tone: greys and a dull red, never image-like
TONES: dict[
    Tone, tuple[tuple[int, int, int], tuple[int, int, int] | None, tuple[int, int, int]]
] = {
    "failed": ((236, 222, 222), (214, 178, 178), (165, 25, 25)),
    "pending": ((226, 226, 226), (204, 204, 204), (70, 70, 70)),
    "absent": ((250, 250, 250), None, (165, 165, 165)),
}


def draw_grids(
    out_dir: Path, *, cell_px: int = DEFAULT_CELL_PX, max_sheet_px: int = DEFAULT_MAX_SHEET_PX
) -> list[Path]:
    """Draw a contact sheet for every source with template variables; return the files.

    Sheets go to ``OUT/grids/<source>.png``; further variables, pages and the file names
    they get are described in this module's docstring. Works on a partial or resumed run:
    only the manifest and the image files are read (``OUT/job.json`` when present).
    Sheets of an earlier drawing that no longer apply are removed. CPU-bound and sync:
    async callers run it in a thread.
    """
    if cell_px < MIN_CELL_PX:
        raise ValueError(f"cell_px must be at least {MIN_CELL_PX}, got {cell_px}")
    style = _Style.for_cell(cell_px, Typeface.load())
    job = read_job(out_dir)
    by_source = group_by_source(read_all_records(out_dir).values())
    grids_dir = out_dir / GRIDS_DIR
    written: list[Path] = []
    for source in collect_sources(job, by_source):
        if not source.vars:
            continue
        grid = Grid.build(source, by_source.get(source.name, []), out_dir)
        for sheet_name, image, info in _sheets(grid, style, max_sheet_px, job):
            grids_dir.mkdir(parents=True, exist_ok=True)
            path = grids_dir / sheet_name
            _save_png(image, path, info)
            written.append(path)
    _remove_stale(grids_dir, set(written))
    return written


# --- sheets and pages -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Style:
    """Sizes derived from the cell size, and the fonts to draw with."""

    cell: int
    gap: int
    margin: int
    pad: int
    row_header: int  # the widest it may be; `fit_row_header` narrows it per grid
    face: Typeface
    label: Font
    small: Font
    title: Font
    tiny: Font

    @classmethod
    def for_cell(cls, cell: int, face: Typeface) -> _Style:
        """Fonts and spacing proportionate to `cell`, readable from 32 px cells up."""
        size = min(20, max(11, round(cell * 0.07)))
        return cls(
            cell=cell,
            gap=max(2, cell // 64),
            margin=max(8, cell // 16),
            pad=max(3, cell // 40),
            row_header=min(280, max(120, cell)),
            face=face,
            label=face.font(size),
            small=face.font(max(10, size - 3)),
            title=face.font(round(size * 1.5)),
            tiny=face.font(8),
        )

    def col_header(self) -> int:
        """Height of the band holding the column values (two lines)."""
        return 3 * self.pad + 2 * line_height(self.label)

    def wrap(self, text: str, font: Font, width: int, max_lines: int) -> list[str]:
        """`text` wrapped into `width` px, at most `max_lines`, ellipsized if cut."""
        return self.face.wrap(text, font, width, max_lines)

    def fit_row_header(self, labels: Iterable[tuple[str, Font]], corner: Iterable[str]) -> _Style:
        """This style with the row header only as wide as its longest label (and corner) needs."""
        small = self.small  # the corner has 2 pads of room, the row labels 3: hence `- pad`
        needed = max(
            [MIN_ROW_HEADER_PX - 3 * self.pad]
            + [text_width(f, self.face.printable(t, f)) for t, f in labels]
            + [text_width(small, self.face.printable(t, small)) - self.pad for t in corner]
        )
        width = min(self.row_header, math.ceil(needed) + 3 * self.pad)
        return dataclasses.replace(self, row_header=width)


@dataclass(frozen=True, slots=True)
class _Page:
    """One sheet image: a block of rows × a block of columns of one slice."""

    rows: Sequence[tuple[str, Sample]]
    cols: Sequence[str]
    number: int
    total: int
    title_h: int  # the same on every page of a slice: fixed by the narrowest page


def _sheets(
    grid: Grid, style: _Style, max_px: int, job: JobRecord | None
) -> Iterable[tuple[str, Image.Image, PngInfo]]:
    """Every (file name, image, metadata) of `grid`: its slices, each in pages."""
    source = grid.source
    names = list(source.vars)
    y_values = source.vars[names[1]] if len(names) > 1 else [""]
    rows = [(y, s) for y in y_values for s in grid.samples]
    labels = [(y, style.label) for y in y_values if y]
    labels += [(grid.sample_label(s), style.small) for s in grid.samples]
    style = style.fit_row_header(labels, _corner(names))
    for slice_values, stem in zip(
        grid.slices, _stems(source.name, names[2:], grid.slices), strict=True
    ):
        parts = _title_parts(source, names, slice_values)
        for page in _paginate(rows, source.vars[names[0]], style, max_px, parts):
            if page.total > 1:
                parts[0] = f"{source.name}  (page {page.number} of {page.total})"
            image = _render(grid, page, slice_values, parts, style, max_px)
            suffix = "" if page.number == 1 else f"-{page.number}"
            info = _metadata(job, source, slice_values, page)
            info.add_itxt("synthaug.layout", json.dumps(_layout(grid, page, style)))
            yield f"{stem}{suffix}.png", image, info


def _stems(source: str, z_names: Sequence[str], slices: Sequence[tuple[str, ...]]) -> list[str]:
    """File stems per slice, filesystem-safe and unique (see the module docstring)."""
    if not z_names:
        return [source]
    raw = ["--".join(f"{k}={v}" for k, v in zip(z_names, vs, strict=True)) for vs in slices]
    safe = [re.sub(r"[^A-Za-z0-9._=-]", "_", r) for r in raw]
    stems = []
    for r, s in zip(raw, safe, strict=True):
        if safe.count(s) > 1 or len(source) + len(s) + 2 > MAX_STEM_CHARS:
            digest = hashlib.sha256(r.encode("utf-8")).hexdigest()[:8]
            s = f"{s[: max(0, MAX_STEM_CHARS - len(source) - 11)]}~{digest}"
        stems.append(f"{source}--{s}")
    return stems


def _paginate(
    rows: Sequence[tuple[str, Sample]],
    cols: Sequence[str],
    style: _Style,
    max_px: int,
    title: Sequence[str],
) -> Iterable[_Page]:
    """Split rows and columns evenly into as few pages as keep each side ≤ `max_px`."""
    step = style.cell + style.gap
    col_room = (max_px - 2 * style.margin - style.row_header) // step
    if col_room < 1:
        raise ValueError(f"max_sheet_px={max_px} is too small for one {style.cell} px cell")
    col_blocks = _split(len(cols), col_room)
    narrowest = _page_width(len(min(col_blocks, key=len)), style, max_px)
    title_h = _title_height(style, title, narrowest)
    row_room = (max_px - 2 * style.margin - title_h - style.col_header()) // step
    if row_room < 1:
        raise ValueError(f"max_sheet_px={max_px} is too small for the title and one row")
    row_blocks = _split(len(rows), row_room)
    total = len(row_blocks) * len(col_blocks)
    for number, (rb, cb) in enumerate(itertools.product(row_blocks, col_blocks), start=1):
        yield _Page([rows[i] for i in rb], [cols[i] for i in cb], number, total, title_h)


def _split(count: int, room: int) -> list[range]:
    """`count` indices in the fewest blocks of at most `room`, sizes as even as possible."""
    size = math.ceil(count / math.ceil(count / room)) if count else 1
    return [range(i, min(i + size, count)) for i in range(0, count, size)] or [range(0)]


def _page_width(cols: int, style: _Style, max_px: int) -> int:
    grid_w = 2 * style.margin + style.row_header + cols * (style.cell + style.gap)
    return max(grid_w, min(MIN_PAGE_WIDTH_PX, max_px))


def _title_parts(source: Source, names: Sequence[str], slice_values: Sequence[str]) -> list[str]:
    """Heading, prompt template and, on a slice, the further variables' values."""
    template = source.template if source.template is not None else "(unknown: no OUT/job.json)"
    parts = [source.name, f"prompt: {template}"]
    if slice_values:
        parts.append("; ".join(f"{k} = {v}" for k, v in zip(names[2:], slice_values, strict=True)))
    return parts


def _title_lines(style: _Style, parts: Sequence[str], width: int) -> list[tuple[str, Font]]:
    room = width - 2 * style.margin
    lines = [(line, style.title) for line in style.wrap(parts[0], style.title, room, 1)]
    for text, max_lines in zip(parts[1:], (3, 2), strict=False):
        lines += [(line, style.label) for line in style.wrap(text, style.label, room, max_lines)]
    return lines


def _title_height(style: _Style, parts: Sequence[str], width: int) -> int:
    return _lines_height(_title_lines(style, parts, width)) + style.pad


def _render(
    grid: Grid,
    page: _Page,
    slice_values: tuple[str, ...],
    title: Sequence[str],
    style: _Style,
    max_px: int,
) -> Image.Image:
    """Draw one page: title, headers, then every cell."""
    step = style.cell + style.gap
    width = _page_width(len(page.cols), style, max_px)
    x0, y0 = _origin(style, page)
    sheet = Image.new("RGB", (width, y0 + len(page.rows) * step + style.margin), WHITE)
    draw = ImageDraw.Draw(sheet)
    y = style.margin
    for text, font in _title_lines(style, title, width):
        draw.text((style.margin, y), text, font=font, fill=INK if font is style.title else MUTED)
        y += line_height(font)
    _draw_headers(draw, grid, page, style, (x0, y0))
    for ri, (y_value, sample) in enumerate(page.rows):
        for ci, x_value in enumerate(page.cols):
            values = (x_value, y_value)[: min(2, len(grid.source.vars))] + slice_values
            sheet.paste(_tile(grid.cell(values, sample), style), (x0 + ci * step, y0 + ri * step))
    return sheet


def _origin(style: _Style, page: _Page) -> tuple[int, int]:
    """Top-left corner of the first cell."""
    return style.margin + style.row_header, style.margin + page.title_h + style.col_header()


def _draw_headers(
    draw: ImageDraw.ImageDraw, grid: Grid, page: _Page, style: _Style, origin: tuple[int, int]
) -> None:
    """Axis names in the corner, x values above the columns, y values left of the rows."""
    x0, y0 = origin
    step, pad = style.cell + style.gap, style.pad
    names = list(grid.source.vars)
    label_h, small_h = line_height(style.label), line_height(style.small)
    top = y0 - style.col_header() + pad
    for i, text in enumerate(_corner(names)):
        line = style.wrap(text, style.small, style.row_header - 2 * pad, 1)[0]
        draw.text((style.margin, top + i * label_h), line, font=style.small, fill=MUTED)
    for ci, value in enumerate(page.cols):
        lines = style.wrap(value, style.label, style.cell - 2 * pad, 2)
        y = y0 - pad - len(lines) * label_h  # bottom-aligned: each value sits on its column
        for line in lines:
            x = x0 + ci * step + (style.cell - text_width(style.label, line)) / 2
            draw.text((x, y), line, font=style.label, fill=INK)
            y += label_h
    for ri, (y_value, sample) in enumerate(page.rows):
        y = y0 + ri * step + pad
        room = style.row_header - 3 * pad
        max_lines = max(1, (style.cell - 2 * pad - small_h) // label_h)
        for line in style.wrap(y_value, style.label, room, max_lines) if y_value else ():
            draw.text((style.margin, y), line, font=style.label, fill=INK)
            y += label_h
        for line in style.wrap(grid.sample_label(sample), style.small, room, 2):
            draw.text((style.margin, y), line, font=style.small, fill=MUTED)
            y += small_h


def _corner(names: Sequence[str]) -> list[str]:
    """The axis names, shown above the row headers."""
    return [f"across: {names[0]}", *([f"down: {names[1]}"] if len(names) > 1 else [])]


def _tile(cell: Cell, style: _Style) -> Image.Image:
    """A cell-sized image: the thumbnail centred on grey, or a placeholder."""
    if cell.image is not None:
        thumb = _thumbnail(cell.image, style.cell)
        if thumb is None:
            return _placeholder(Cell("failed", lines=("UNREADABLE", cell.image.name)), style)
        tile = Image.new("RGB", (style.cell, style.cell), CELL_BG)
        offset = ((style.cell - thumb.width) // 2, (style.cell - thumb.height) // 2)
        tile.paste(thumb, offset, thumb if thumb.mode == "RGBA" else None)
        if cell.flags:
            _mark_flags(tile, cell.flags, style)
        return tile
    return _placeholder(cell, style)


def _mark_flags(tile: Image.Image, flags: Sequence[str], style: _Style) -> None:
    """Frame `tile` in `FLAG_MARK` and name the flags on a band at its bottom (one line in
    small cells, two from 96 px)."""
    draw = ImageDraw.Draw(tile)
    edge, pad = max(2, style.cell // 32), style.pad
    draw.rectangle([(0, 0), (style.cell - 1, style.cell - 1)], outline=FLAG_MARK, width=edge)
    text, room = ", ".join(flags), style.cell - 2 * (edge + pad)
    font = style.small if style.face.words_fit(text, style.small, room) else style.tiny
    lines = style.wrap(text, font, room, 2 if style.cell >= 96 else 1)
    top = style.cell - edge - len(lines) * line_height(font) - pad
    draw.rectangle([(0, top), (style.cell - 1, style.cell - 1)], fill=FLAG_MARK)
    for line in lines:
        draw.text((edge + pad, top + pad // 2), line, font=font, fill=WHITE)
        top += line_height(font)


def _thumbnail(path: Path, size: int) -> Image.Image | None:
    """The image at `path` scaled to fit `size`² keeping its aspect, or None if unreadable."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a fraction of the size
            alpha = "A" in image.getbands() or "transparency" in image.info
            converted = image.convert("RGBA" if alpha else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("cannot draw %s: %s", path, exc)
        return None
    return ImageOps.contain(converted, (size, size), Image.Resampling.LANCZOS)


def _placeholder(cell: Cell, style: _Style) -> Image.Image:
    """Hatched grey (or plain, for 'not in job') with the reason in a box in the middle."""
    background, hatch, ink = TONES["failed" if cell.tone == "image" else cell.tone]
    tile = Image.new("RGB", (style.cell, style.cell), background)
    draw = ImageDraw.Draw(tile)
    if hatch is not None:
        for k in range(-style.cell, style.cell, max(8, style.cell // 16)):
            draw.line([(k, 0), (k + style.cell, style.cell)], fill=hatch, width=2)
    room = style.cell - 2 * style.pad
    texts = [t for t in cell.lines if t]
    reason = texts[0] if texts else ""
    head = next(  # the largest font in which the reason's words need not be broken
        (f for f in (style.label, style.small) if style.face.words_fit(reason, f, room)),
        style.tiny,
    )
    body = style.tiny if head is style.tiny else style.small
    lines: list[tuple[str, Font, tuple[int, int, int]]] = []
    for i, text in enumerate(texts):
        font, colour = (head, ink) if i == 0 else (body, MUTED)
        lines += [(line, font, colour) for line in style.wrap(text, font, room, 2 if i == 0 else 3)]
    while len(lines) > 1 and _lines_height(lines) > style.cell - 4 * style.pad:
        lines.pop()  # small cells keep the reason, lose the message
    height = _lines_height(lines)
    width = max(text_width(font, line) for line, font, _ in lines) if lines else 0
    top = (style.cell - height) // 2
    if hatch is not None and lines:
        box = ((style.cell - width) / 2 - style.pad, top - style.pad)
        draw.rectangle([box, (style.cell - box[0], top + height + style.pad)], fill=WHITE)
    for line, font, colour in lines:
        draw.text(((style.cell - text_width(font, line)) / 2, top), line, font=font, fill=colour)
        top += line_height(font)
    return tile


def _layout(grid: Grid, page: _Page, style: _Style) -> dict[str, Any]:
    """Where the cells are, so tools (and tests) can crop a cell without guessing."""
    x0, y0 = _origin(style, page)
    return {
        "x0": x0,
        "y0": y0,
        "cell": style.cell,
        "step": style.cell + style.gap,
        "columns": list(page.cols),
        "rows": [{"value": y, "sample": grid.sample_label(s)} for y, s in page.rows],
    }


def _lines_height(lines: Sequence[tuple[Any, ...]]) -> int:
    """Height of (text, font, ...) lines stacked."""
    return sum(line_height(line[1]) for line in lines)


def _metadata(
    job: JobRecord | None, source: Source, slice_values: Sequence[str], page: _Page
) -> PngInfo:
    """iTXt chunks (UTF-8) that let a sheet explain itself once it is copied elsewhere."""
    z_names = list(source.vars)[2:]
    fields = {
        "synthaug.spec": (job.spec if job else None) or "",
        "synthaug.job": (job.name if job else None) or "",
        META_SOURCE: source.name,
        "synthaug.template": source.template or "",
        "synthaug.vars": json.dumps(source.vars, ensure_ascii=False),
        "synthaug.slice": json.dumps(
            dict(zip(z_names, slice_values, strict=True)), ensure_ascii=False
        ),
        "synthaug.page": f"{page.number}/{page.total}",
        "Software": "synthaug",
    }
    info = PngInfo()
    for key, value in fields.items():
        info.add_itxt(key, value)
    return info


def _save_png(image: Image.Image, path: Path, info: PngInfo) -> None:
    """Write atomically: no reader (index.html, a viewer) sees half a sheet."""
    # a view is drawn again on demand: atomic, but not worth an fsync
    write_atomic(path, lambda fh: image.save(fh, format="PNG", pnginfo=info), fsync=False)


def _remove_stale(grids_dir: Path, keep: set[Path]) -> None:
    """Delete sheets we drew earlier that this drawing did not rewrite (fewer pages, ...)."""
    if not grids_dir.is_dir():
        return
    for path in grids_dir.glob("*.png"):
        if path in keep:
            continue
        try:
            with Image.open(path) as image:
                ours = META_SOURCE in image.info
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        if ours:
            path.unlink(missing_ok=True)
