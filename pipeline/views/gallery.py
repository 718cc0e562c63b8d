"""``OUT/index.html``: one static page to look at a run, drawn from OUT alone.

Per source: its contact sheets (``OUT/grids``, found by their PNG metadata), then every
image with its prompt, variables, status and attempts, linking to the full file, then the
failed and unfinished items with their errors. What the stages after storage found is
drawn on each image: the label stage's boxes (positioned in % of the image, so they scale
with it) with their class and confidence, and the flags (``duplicate``, ``unchanged``,
``no_detection``, ...) as badges on a card set apart by its colour, so a reviewer sees
what the export would leave out. A ``roboflow_balance`` source's cards are grouped by
class (``OUT/balance.json``): each class under its figures, the project's count before,
what was planned, stored and usable, and the count after; the classes that needed
nothing in one line. The page is self-contained (inline CSS, no script, no
network) and every path in it is relative, so OUT can be zipped and shared.
Small JPEG thumbnails go to ``OUT/thumbs/<sha256[:16]>.jpg`` (named by the image's hash,
so they never go stale; unused ones are removed), keeping the page light for big runs.
"""

from __future__ import annotations

import hashlib
import html
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from PIL import Image, ImageOps

from ..balance import BalanceRecord, ClassProgress, class_progress, read_balance
from ..job_record import JobRecord, JobSource
from ..jobspec.model import BALANCE_CLASS_VAR
from ..manifest.folded import read_all_records
from ..records import ErrorInfo, ItemRecord, OutputFile
from ..store.layout import (
    GRIDS_DIR,
    INDEX_NAME,
    THUMBS_DIR,
    read_job,
    write_atomic,
)
from .grid_model import declared_sources, group_by_source
from .sheet_text import META_SOURCE, path_inside

__all__ = ["THUMB_PX", "write_gallery"]

THUMB_PX = 320

log = logging.getLogger(__name__)

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1400px;padding:0 16px 48px;
color:#222;background:#fafafa}
h1{font-size:22px;margin:20px 0 4px}h2{font-size:18px;margin:0 0 4px}
code{background:#eee;padding:1px 4px;border-radius:3px;word-break:break-word}
.muted{color:#666}.counts span{margin-right:12px}
nav ul{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:6px 16px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:16px;margin:20px 0}
.sheets{display:flex;flex-direction:column;gap:12px;margin:12px 0}
.sheets img{max-width:100%;height:auto;border:1px solid #ddd}
.items{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:12px;
margin:12px 0}
figure{margin:0;border:1px solid #e3e3e3;border-radius:4px;padding:8px;background:#fcfcfc}
figure .thumbs{display:flex;flex-wrap:wrap;gap:4px}
figure img{max-width:100%;height:auto;display:block;background:#eee}
figcaption p{margin:4px 0;word-break:break-word}
.var{display:inline-block;background:#eef2f7;border-radius:3px;padding:0 4px;margin:1px 2px 1px 0}
.status{font-weight:600;text-transform:uppercase;font-size:12px}
.ok{color:#1b7a36}.failed{color:#b3261e}.generated,.pending{color:#8a6d00}
table{border-collapse:collapse;width:100%;margin:8px 0}
th,td{border:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top;
word-break:break-word}
th{background:#f3f3f3}
.shot{position:relative;max-width:100%;overflow:hidden}
.box{position:absolute;box-sizing:border-box;border:2px solid var(--c);pointer-events:none}
.box span{position:absolute;left:-2px;top:-2px;background:var(--c);color:#fff;font-size:11px;
line-height:14px;padding:0 3px;white-space:nowrap}
figure.flagged{border:2px solid #d9480f;background:#fff4e6}
.shot.flagged img{outline:3px solid #d9480f;outline-offset:-3px}
.flag{display:inline-block;background:#d9480f;color:#fff;border-radius:3px;padding:0 5px;
margin:1px 3px 1px 0;font-size:12px;font-weight:600}
.flagcount{color:#d9480f}
.labels .cls{display:inline-block;border-left:4px solid var(--c);padding:0 4px;margin-right:4px}
"""

BALANCE_CSS = """
.class-group{margin:18px 0 0}
.class-group h3{font-size:16px;margin:0;padding:4px 8px;border-left:6px solid var(--c);
background:#f5f6f8}
.class-group h3 .figures{font-size:13px;font-weight:400;color:#444;margin-left:10px}
.reached{color:#1b7a36;font-weight:600}.short{color:#b3261e;font-weight:600}
"""


def write_gallery(out_dir: Path) -> Path:
    """Write ``OUT/index.html`` (and thumbnails) from the manifest; return the page's path.

    Works on a partial run and without ``OUT/job.json`` (sources then follow the order in
    which the manifest first mentions them). CPU-bound (thumbnails) and sync.
    """
    job = read_job(out_dir)
    by_source = group_by_source(read_all_records(out_dir).values())
    shown = declared_sources(job, by_source)
    sheets = _sheets(out_dir)
    thumbs = _Thumbs(out_dir)
    balances = read_balance(out_dir)
    sections = [
        _section(name, declared, by_source.get(name, []), sheets, thumbs, balances.get(name))
        for name, declared in shown
    ]
    grouped = any(name in balances for name, _ in shown)
    css = CSS + BALANCE_CSS if grouped else CSS  # a page without one stays as it was
    page = _page(job, [name for name, _ in shown], by_source, sections, css)
    path = out_dir / INDEX_NAME
    data = page.encode("utf-8")
    write_atomic(path, data, fsync=False)  # a view: drawn again on demand
    thumbs.remove_unused()
    return path


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _href(relative: str) -> str:
    return _e(quote(relative, safe="/"))


def _sheets(out_dir: Path) -> dict[str, list[str]]:
    """Contact sheets per source, in page order, found by the metadata grid.py writes."""
    found: dict[str, list[tuple[str, int, str]]] = {}
    for path in (out_dir / GRIDS_DIR).glob("*.png"):
        try:
            with Image.open(path) as image:
                source, page = image.info.get(META_SOURCE), str(image.info.get("synthaug.page"))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        if isinstance(source, str):
            number = int(page.split("/")[0]) if page.split("/")[0].isdigit() else 1
            stem = path.stem.removesuffix(f"-{number}") if number > 1 else path.stem
            found.setdefault(source, []).append((stem, number, f"{GRIDS_DIR}/{path.name}"))
    return {source: [rel for *_, rel in sorted(pages)] for source, pages in found.items()}


class _Thumbs:
    """Small JPEGs named by the image's hash; remembers which ones this page uses."""

    def __init__(self, out_dir: Path) -> None:
        self._out = out_dir
        self._dir = out_dir / THUMBS_DIR
        self._used: set[str] = set()

    def get(self, output: OutputFile) -> tuple[str, int, int] | None:
        """(relative path, width, height) of the thumbnail, or None if the image is unreadable."""
        relative = output.path
        source = path_inside(self._out, relative)
        if source is None or not source.is_file():
            return None
        digest = output.sha256 or hashlib.sha256(relative.encode()).hexdigest()
        name = f"{digest[:16]}.jpg"
        target = self._dir / name
        try:
            if not target.exists():
                self._make(source, target)
            with Image.open(target) as thumb:
                size = thumb.size
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            log.warning("no thumbnail for %s: %s", source, exc)
            return None
        self._used.add(name)
        return f"{THUMBS_DIR}/{name}", size[0], size[1]

    def _make(self, source: Path, target: Path) -> None:
        with Image.open(source) as image:
            image.draft("RGB", (THUMB_PX, THUMB_PX))
            rgba = image.convert("RGBA")
        thumb = ImageOps.contain(rgba, (THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
        flat = Image.new("RGB", thumb.size, (255, 255, 255))
        flat.paste(thumb, (0, 0), thumb)
        self._dir.mkdir(parents=True, exist_ok=True)
        write_atomic(target, lambda fh: flat.save(fh, format="JPEG", quality=85), fsync=False)

    def remove_unused(self) -> None:
        """Delete thumbnails of images no longer in the manifest (only our own names)."""
        if not self._dir.is_dir():
            return
        for path in self._dir.glob("*.jpg"):
            if path.name not in self._used and len(path.stem) == 16:
                path.unlink(missing_ok=True)


def _page(
    job: JobRecord | None,
    names: Sequence[str],
    by_source: Mapping[str, Sequence[ItemRecord]],
    sections: Iterable[str],
    css: str = CSS,
) -> str:
    spec, backend = (job.spec, job.backend) if job else (None, None)
    title = f"synthaug: {(job.name if job else None) or 'run'}"
    every = [r for records in by_source.values() for r in records]
    facts = [
        f"spec <code>{_e(spec)}</code>" if spec else "",
        f"backend <code>{_e(backend)}</code>" if backend else "",
    ]
    nav = "".join(
        f'<li><a href="#{_anchor(n)}">{_e(n)}</a> '
        f'<span class="counts">{_counts(by_source.get(n, []))}</span></li>'
        for n in names
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{css}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p class='muted'>{' · '.join(f for f in facts if f)}</p>"
        f"<p class='counts'>{_counts(every)}</p><nav><ul>{nav}</ul></nav></header>"
        f"{''.join(sections)}</body></html>\n"
    )


def _anchor(name: str) -> str:
    return "src-" + quote(name, safe="")


def _counts(records: Sequence[ItemRecord]) -> str:
    statuses = [r.status for r in records]
    images = sum(len(r.outputs) for r in records if r.status == "ok")
    parts = [
        ("ok", statuses.count("ok")),
        ("failed", statuses.count("failed")),
        ("generated", statuses.count("generated")),
    ]
    shown = "".join(f'<span class="{s}">{n} {s}</span>' for s, n in parts if n)
    flagged = sum(1 for r in records if r.status == "ok" for o in r.outputs if o.flags)
    if flagged:
        shown += f'<span class="flagcount">{flagged} flagged</span>'
    return f"{shown}<span class='muted'>{images} image{'s' * (images != 1)}</span>"


def _section(
    name: str,
    declared: JobSource | None,
    records: Sequence[ItemRecord],
    sheets: Mapping[str, Sequence[str]],
    thumbs: _Thumbs,
    balance: BalanceRecord | None = None,
) -> str:
    template = declared.prompt if declared else None
    records = sorted(records, key=_job_order(declared))
    ok = [r for r in records if r.status == "ok"]
    summary, items = (
        ("", _cards(ok, thumbs)) if balance is None else _by_class(name, balance, ok, thumbs)
    )
    head = (
        f'<section id="{_e(_anchor(name))}"><h2>{_e(name)}</h2>'
        + (f"<p>prompt: <code>{_e(template)}</code></p>" if template else "")
        + f"<p class='counts'>{_counts(records)}</p>"
        + summary
    )
    grid = "".join(
        f'<a href="{_href(rel)}"><img src="{_href(rel)}" alt="contact sheet {_e(rel)}"></a>'
        for rel in sheets.get(name, ())
    )
    failed = [r for r in records if r.status == "failed"]
    pending = [r for r in records if r.status not in ("ok", "failed")]
    return (
        head
        + (f'<div class="sheets">{grid}</div>' if grid else "")
        + items
        + (_failed_table(failed) if failed else "")
        + (_pending_table(pending) if pending else "")
        + "</section>"
    )


def _cards(records: Sequence[ItemRecord], thumbs: _Thumbs) -> str:
    items = "".join(_figure(r, thumbs) for r in records)
    return f'<div class="items">{items}</div>' if items else ""


def _by_class(
    source: str, balance: BalanceRecord, records: Sequence[ItemRecord], thumbs: _Thumbs
) -> tuple[str, str]:
    """A balance source's (summary, cards): the summary links each class's group and lists
    in one line the classes at target with nothing planned or stored; the cards are
    grouped by class, in name order, each group under its class's figures."""
    progress = class_progress(source, balance, records)
    if not progress:  # counts read (plan --resolve), but no run recorded its plan yet
        counts = ", ".join(f"{_e(c)} {n}" for c, n in sorted(balance.counts.items()))
        line = f"<p class='muted'>before: {counts or 'no classes'} in the project</p>"
        return line, _cards(records, thumbs)
    cards: dict[str | None, list[ItemRecord]] = {}
    for record in records:
        cards.setdefault(record.vars.get(BALANCE_CLASS_VAR), []).append(record)
    shown = {
        c: p
        for c, p in progress.items()
        if p.planned or p.stored or cards.get(c) or p.count < p.target
    }
    done = [f"{_e(c)} {p.count}" for c, p in progress.items() if c not in shown]
    links = " · ".join(
        f'<a href="#{_e(_class_anchor(source, c))}">{_e(c)}</a> {_verdict(p)}'
        for c, p in shown.items()
    )
    summary = (f"<p class='class-nav'>classes: {links}</p>" if links else "") + (
        f"<p class='at-target'>at target: {', '.join(done)}</p>" if done else ""
    )
    groups = "".join(_class_group(source, c, p, cards.get(c, []), thumbs) for c, p in shown.items())
    other = [r for c, found in cards.items() if c not in progress for r in found]
    return summary, groups + _cards(other, thumbs)


def _class_anchor(source: str, name: str) -> str:
    return f"{_anchor(source)}--{quote(name, safe='')}"


def _verdict(p: ClassProgress) -> str:
    """'reached' when the count before plus the usable images meet the target, else
    'short by K'."""
    short = p.target - p.count - p.usable
    if short > 0:
        return f'<span class="short">short by {short}</span>'
    return '<span class="reached">reached</span>'


def _class_group(
    source: str, name: str, p: ClassProgress, records: Sequence[ItemRecord], thumbs: _Thumbs
) -> str:
    """One class: 'before: COUNT in the project · target · planned · stored · usable ·
    after: COUNT + usable (reached / short by K)', then its cards."""
    figures = (
        f"before: {p.count} in the project · target {p.target} · planned {p.planned} · "
        f"stored {p.stored} · usable {p.usable} · after: {p.count + p.usable} ({_verdict(p)})"
    )
    cards = _cards(records, thumbs) or "<p class='muted'>no image stored yet</p>"
    return (
        f'<div class="class-group" id="{_e(_class_anchor(source, name))}" '
        f'data-class="{_e(name)}" style="--c:{_colour(name)}"><h3>{_e(name)}'
        f' <span class="figures">{figures}</span></h3>{cards}</div>'
    )


def _job_order(source: JobSource | None) -> Callable[[ItemRecord], tuple[Any, ...]]:
    """Sort key reading like the contact sheets (further variables' sheets, then rows, then
    input and repeat, then columns), not in the order the requests happened to finish."""
    declared = source.vars if source else {}
    names = list(declared)
    sheet_order = names[2:] + names[1:2]

    def rank(found: Mapping[str, Any], name: str) -> tuple[int, str]:
        value = str(found.get(name, ""))
        values = declared[name]
        return (values.index(value) if value in values else len(values), value)

    def key(record: ItemRecord) -> tuple[Any, ...]:
        found = record.vars
        source = record.input.value if record.input is not None else ""
        extra = sorted((k, v) for k, v in found.items() if k not in declared)
        return (
            *(rank(found, n) for n in sheet_order),
            source,
            record.repeat,
            *(rank(found, n) for n in names[:1]),
            extra,
        )

    return key


def _vars(record: ItemRecord) -> str:
    """The item's variables, and its input image (file name; the full value on hover)."""
    chips = [f'<span class="var"><b>{_e(k)}</b> {_e(v)}</span>' for k, v in record.vars.items()]
    given = record.input
    if given is not None and given.value:
        value = given.value
        name = value.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or value
        kind = {"url": "input url", "id": "input id"}.get(given.kind, "input")
        chip = f'<span class="var" title="{_e(value)}"><b>{_e(kind)}</b> {_e(name)}</span>'
        chips.insert(0, chip)
    return "".join(chips)


def _figure(record: ItemRecord, thumbs: _Thumbs) -> str:
    """One ok item: its images (thumbnail → full file) with their boxes, and what made them."""
    images, links = [], []
    for output in record.outputs:
        relative = output.path
        thumb = thumbs.get(output)
        name = PurePosixPath(relative).name
        if thumb is None:
            images.append(f'<p class="failed">missing file {_e(relative)}</p>')
            continue
        src, width, height = thumb
        images.append(
            f'<div class="shot{" flagged" * bool(output.flags)}"><a href="{_href(relative)}">'
            f'<img src="{_href(src)}" width="{width}" height="{height}" loading="lazy" '
            f'alt="{_e(record.prompt)}"></a>{_boxes(output)}</div>'
        )
        links.append(f'<a href="{_href(relative)}">{_e(name)}</a>')
    attempts = record.attempts
    flags = list(dict.fromkeys(f for o in record.outputs for f in o.flags))
    mark = f' flagged" data-flags="{_e(" ".join(flags))}' if flags else ""
    badges = "".join(f'<span class="flag">{_e(f)}</span>' for f in flags)
    labels = "".join(_labels_line(o, len(record.outputs)) for o in record.outputs)
    return (
        f'<figure class="item{mark}"><div class="thumbs">{"".join(images)}</div><figcaption>'
        f"{f'<p>{badges}</p>' if badges else ''}"
        f"<p>{_e(record.prompt)}</p><p>{_vars(record)}</p>{labels}"
        f'<p><span class="status ok">ok</span> · {attempts} attempt{"s" * (attempts != 1)}'
        f" · {' '.join(links)}</p></figcaption></figure>"
    )


def _colour(class_name: str) -> str:
    """A hue per class name, the same on every card (and every page)."""
    hue = int(hashlib.sha256(class_name.encode("utf-8")).hexdigest()[:4], 16) * 360 // 65536
    return f"hsl({hue} 75% 40%)"


def _boxes(output: OutputFile) -> str:
    """The label stage's boxes over the image, in % of the stored image's size (the
    predictions' pixels), so they follow the thumbnail at any width."""
    labels = output.labels
    if labels is None or output.width <= 0 or output.height <= 0:
        return ""
    boxes = []
    for p in labels.predictions:
        xmin, ymin, xmax, ymax = p.corners()
        left, right = (min(max(v / output.width * 100, 0.0), 100.0) for v in (xmin, xmax))
        top, bottom = (min(max(v / output.height * 100, 0.0), 100.0) for v in (ymin, ymax))
        if right <= left or bottom <= top:
            continue
        place = (
            f"left:{left:.2f}%;top:{top:.2f}%;width:{right - left:.2f}%;"
            f"height:{bottom - top:.2f}%;--c:{_colour(p.class_name)}"
        )
        boxes.append(
            f'<div class="box" style="{place}" title="{_e(p.class_name)} {p.confidence:.2f}">'
            f"<span>{_e(p.class_name)} {p.confidence:.0%}</span></div>"
        )
    return "".join(boxes)


def _labels_line(output: OutputFile, outputs: int) -> str:
    """What detection found in one image, by class; nothing when it was not labelled."""
    labels = output.labels
    if labels is None:
        return ""
    which = f"{PurePosixPath(output.path).name}: " if outputs > 1 else ""
    if labels.error is not None:
        found = f'<span class="failed">detection failed: {_e(labels.error.kind)}</span>'
    elif not labels.predictions:
        found = '<span class="muted">no detections</span>'
    else:
        count = Counter(p.class_name for p in labels.predictions)
        found = "".join(
            f'<span class="cls" style="--c:{_colour(name)}">{_e(name)} ×{n}</span>'
            for name, n in count.items()
        )
    return f'<p class="labels">{_e(which)}labels <code>{_e(labels.model)}</code>: {found}</p>'


def _failed_table(records: Sequence[ItemRecord]) -> str:
    rows = []
    for record in records:
        error = record.error or ErrorInfo(kind="?", status=None, message="")  # type: ignore[arg-type]
        rows.append(
            f'<tr class="failed-item"><td>{_vars(record)}</td>'
            f"<td>{_e(record.prompt)}</td>"
            f'<td class="failed">{_e(error.kind)}</td>'
            f"<td>{_e(error.status or '')}</td><td>{_e(error.message)}</td>"
            f"<td>{_e(record.attempts)}</td></tr>"
        )
    return (
        f"<h3 class='failed'>Failed ({len(records)})</h3><table><thead><tr><th>vars</th>"
        "<th>prompt</th><th>error</th><th>HTTP</th><th>message</th><th>attempts</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _pending_table(records: Sequence[ItemRecord]) -> str:
    rows = "".join(
        f"<tr><td>{_vars(r)}</td><td>{_e(r.prompt)}</td>"
        '<td class="generated">answered, not downloaded</td>'
        f"<td>{_e(r.attempts)}</td></tr>"
        for r in records
    )
    return (
        f"<h3 class='generated'>Not finished ({len(records)})</h3><table><thead><tr>"
        "<th>vars</th><th>prompt</th><th>status</th><th>attempts</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )
