"""OUT/index.html: a static, self-contained page of sheets, images and failures."""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from checks import run_spec
from PIL import Image

from pipeline.balance import BALANCE_FORMAT, BalanceRecord
from pipeline.manifest.writer import ManifestWriter
from pipeline.records import (
    ErrorInfo,
    InputImage,
    ItemRecord,
    LabelRecord,
    OutputFile,
    Prediction,
)
from pipeline.store.layout import BALANCE_NAME
from pipeline.views.gallery import write_gallery
from pipeline.views.grid import draw_grids

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TREES = ["maple", "oak", "birch"]
AUTHOR_HOME = "/home/alice/jobs"


def record(
    out: Path,
    source: str,
    variables: Mapping[str, str],
    *,
    status: str = "ok",
    colour: tuple[int, int, int] = (200, 40, 40),
    input_image: InputImage | None = None,
) -> ItemRecord:
    """A manifest line; an ok line gets a solid-colour image file under OUT/images."""
    key = hashlib.sha256(repr((source, variables, input_image)).encode()).hexdigest()
    prompt = f"A street with {' '.join(variables.values())} trees <b>&amp;</b>"
    outputs: tuple[OutputFile, ...] = ()
    if status == "ok":
        rel = f"images/{source}/{key[:16]}-0.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), colour).save(out / rel)
        digest = hashlib.sha256((out / rel).read_bytes()).hexdigest()
        outputs = (OutputFile(rel, digest, 40, 30),)
    error = ErrorInfo("refused", 400, "content policy <script>") if status == "failed" else None
    return ItemRecord(
        key=key,
        status="ok" if status == "ok" else "failed" if status == "failed" else "generated",
        source=source,
        vars=dict(variables),
        repeat=0,
        input=input_image,
        prompt=prompt,
        params={"n": 1},
        outputs=outputs,
        attempts=2,
        error=error,
    )


def write_manifest(out: Path, records: Sequence[ItemRecord]) -> None:
    with ManifestWriter(out / "manifest.jsonl") as writer:
        for item in records:
            writer.append(item)


def sample_out(out: Path, *, job: bool = True) -> None:
    """Two sources: 'street' with vars (ok, failed, generated) and 'plain' without."""
    if job:
        sources: list[dict[str, Any]] = [
            {"name": "street", "prompt": "A street with {tree} trees", "vars": {"tree": TREES},
             "combine": "product", "repeats": 1, "input": "none", "items": 3, "n": 1},
            {"name": "plain", "prompt": "Red leaves", "vars": {}, "input": "none", "items": 1},
        ]  # fmt: skip
        # as synthaug 0.1 wrote it: the spec's absolute path
        payload = {"name": "fall <night>", "spec": f"{AUTHOR_HOME}/fall.yaml", "backend": "mock"}
        (out / "job.json").write_text(json.dumps({**payload, "sources": sources}), "utf-8")
    write_manifest(
        out,
        [
            record(out, "plain", {}, colour=(20, 90, 200)),
            record(out, "street", {"tree": "maple"}),
            record(out, "street", {"tree": "oak"}, status="failed"),
            record(out, "street", {"tree": "birch"}, status="generated"),
        ],
    )
    draw_grids(out, cell_px=48)


def test_page_lists_images_sheets_and_failures(tmp_path: Path) -> None:
    """Each source shows its sheet, its images linked to the full files, and its failures."""
    sample_out(tmp_path)
    page = write_gallery(tmp_path).read_text("utf-8")
    sources = re.findall(r'<section id="src-([^"]+)"', page)
    assert sources == ["street", "plain"]
    assert 'src="grids/street.png"' in page
    for line in (tmp_path / "manifest.jsonl").read_text("utf-8").splitlines():
        for output in json.loads(line)["outputs"]:
            assert f'href="{output["path"]}"' in page
    assert "refused" in page
    assert "content policy &lt;script&gt;" in page
    assert "answered, not downloaded" in page


def test_all_text_is_escaped(tmp_path: Path) -> None:
    """Prompts, job names and error messages cannot inject markup into the page."""
    sample_out(tmp_path)
    page = write_gallery(tmp_path).read_text("utf-8")
    assert "<script>" not in page
    assert "<b>&amp;</b>" not in page
    assert "&lt;b&gt;&amp;amp;&lt;/b&gt;" in page
    assert "fall &lt;night&gt;" in page


def test_every_reference_is_relative_and_inside_out(tmp_path: Path) -> None:
    """Every src/href is a relative path to a file in OUT, so a zip of OUT still works."""
    sample_out(tmp_path)
    page = write_gallery(tmp_path).read_text("utf-8")
    refs = re.findall(r'(?:src|href)="([^"#]+)"', page)
    assert refs
    for ref in refs:
        assert "://" not in ref
        assert not ref.startswith("/")
        assert (tmp_path / ref).is_file(), ref


def test_page_names_the_spec_file_not_its_folder(tmp_path: Path) -> None:
    """The page shows the spec's file name and job name, never the author's folders."""
    sample_out(tmp_path)
    page = write_gallery(tmp_path).read_text("utf-8")
    assert "spec <code>fall.yaml</code>" in page
    assert "fall &lt;night&gt;" in page
    assert AUTHOR_HOME not in page
    assert "/home/" not in page


async def test_run_leaves_no_path_of_the_spec_folder_in_out(
    spec_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """A run's job.json, summary.json and page name the spec by file name: OUT can be shared."""
    spec = spec_factory(filename="jobs/fall.yaml", output_dir="out")
    result = await run_spec(spec)
    assert result.exit_code == 0
    out = spec.parent / "out"
    page = write_gallery(out).read_text("utf-8")
    job = json.loads((out / "job.json").read_text("utf-8"))
    summary = json.loads((out / "summary.json").read_text("utf-8"))
    assert job["spec"] == summary["spec"] == "fall.yaml"
    for text in (page, json.dumps(job), json.dumps(summary)):
        assert str(tmp_path) not in text


def test_works_without_job_json(tmp_path: Path) -> None:
    """Without OUT/job.json the sources follow the manifest's order of first appearance."""
    sample_out(tmp_path, job=False)
    page = write_gallery(tmp_path).read_text("utf-8")
    assert re.findall(r'<section id="src-([^"]+)"', page) == ["plain", "street"]


def test_missing_image_file_is_reported_not_linked_as_image(tmp_path: Path) -> None:
    """An ok item whose file vanished says so instead of showing a broken image."""
    sample_out(tmp_path)
    manifest = [
        json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text("utf-8").split("\n") if x
    ]
    gone = next(r for r in manifest if r["source"] == "plain")["outputs"][0]["path"]
    (tmp_path / gone).unlink()
    page = write_gallery(tmp_path).read_text("utf-8")
    assert f"missing file {gone}" in page
    assert len(list((tmp_path / "thumbs").glob("*.jpg"))) == 1


def test_items_read_in_sheet_order_not_finish_order(tmp_path: Path) -> None:
    """Images are listed in the order of the spec's values, whatever order they finished in."""
    sample_out(tmp_path)
    (tmp_path / "manifest.jsonl").unlink()
    write_manifest(tmp_path, [record(tmp_path, "street", {"tree": t}) for t in reversed(TREES)])
    page = write_gallery(tmp_path).read_text("utf-8")
    street = page.split('id="src-street"')[1].split("</section>")[0]
    shown = re.findall(r'<figure class="item">.*?<b>tree</b> (\w+)', street)
    assert shown == TREES


def test_input_image_is_named(tmp_path: Path) -> None:
    """An item made from an input image names the file (full path on hover)."""
    sample_out(tmp_path)
    given = InputImage("file", "/data/in/leaf <1>.png", "ab" * 32)
    write_manifest(tmp_path, [record(tmp_path, "street", {"tree": "oak"}, input_image=given)])
    page = write_gallery(tmp_path).read_text("utf-8")
    assert (
        '<span class="var" title="/data/in/leaf &lt;1&gt;.png"><b>input</b> leaf &lt;1&gt;.png'
        in page
    )


LEAF = Prediction(x=10, y=15, width=8, height=6, class_name="<leaf>", confidence=0.87)
STEM = Prediction(x=30, y=10, width=20, height=10, class_name="stem", confidence=0.5)
BOX = re.compile(
    r'<div class="box" style="left:([\d.]+)%;top:([\d.]+)%;width:([\d.]+)%;'
    r'height:([\d.]+)%;[^"]*"[^>]*><span>([^<]*)</span></div>'
)


def staged(item: ItemRecord, **fields: Any) -> ItemRecord:
    """`item` with the stage fields `fields` set on its (one) output."""
    return dataclasses.replace(item, outputs=(dataclasses.replace(item.outputs[0], **fields),))


def staged_out(out: Path) -> None:
    """'street': maple labelled (two boxes), oak flagged without labels, birch plain."""
    sample_out(out)
    labels = LabelRecord("leaves/1", (LEAF, STEM))
    write_manifest(
        out,
        [
            staged(record(out, "street", {"tree": "maple"}), labels=labels, phash="0" * 16),
            staged(record(out, "street", {"tree": "oak"}), flags=("duplicate", "no_<b>")),
            record(out, "street", {"tree": "birch"}),
        ],
    )


def figures(page: str) -> dict[str, str]:
    """Each card's HTML by its tree."""
    cards = re.findall(r"<figure .*?</figure>", page)
    return {re.findall(r"<b>tree</b> (\w+)", card)[0]: card for card in cards if "<b>tree" in card}


def test_boxes_are_drawn_over_their_image_in_percent(tmp_path: Path) -> None:
    """A labelled image gets one box per prediction, placed in % of the 40 x 30 image,
    named by its class (escaped) and confidence; images without labels get none."""
    staged_out(tmp_path)
    page = write_gallery(tmp_path).read_text("utf-8")
    cards = figures(page)
    boxes = [(*(float(v) for v in found[:4]), found[4]) for found in BOX.findall(cards["maple"])]
    # LEAF: centre (10, 15), 8 x 6 -> corners (6, 12)-(14, 18) of 40 x 30
    assert boxes[0] == pytest.approx((15.0, 40.0, 20.0, 20.0, "&lt;leaf&gt; 87%"))
    # STEM: corners (20, 5)-(40, 15)
    assert boxes[1] == pytest.approx((50.0, 16.67, 50.0, 33.33, "stem 50%"), abs=0.01)
    assert len(BOX.findall(page)) == 2
    assert "<leaf>" not in page
    assert "labels <code>leaves/1</code>" in cards["maple"]
    assert "&lt;leaf&gt; ×1" in cards["maple"]
    for tree in ("oak", "birch"):
        assert "labels" not in cards[tree]


def test_flagged_cards_carry_their_flags(tmp_path: Path) -> None:
    """A flagged output's card is marked and shows a badge per flag; others show none."""
    staged_out(tmp_path)
    page = write_gallery(tmp_path).read_text("utf-8")
    cards = figures(page)
    oak = cards["oak"]
    assert oak.startswith('<figure class="item flagged" data-flags="duplicate no_&lt;b&gt;">')
    assert '<span class="flag">duplicate</span><span class="flag">no_&lt;b&gt;</span>' in oak
    assert '<div class="shot flagged">' in oak
    for tree in ("maple", "birch"):
        assert cards[tree].startswith('<figure class="item">')
        assert 'class="flag"' not in cards[tree]
    assert '<span class="flagcount">1 flagged</span>' in page


def test_labelling_failure_and_empty_labels_are_said(tmp_path: Path) -> None:
    """Labels with an error or without predictions say so, and draw no box."""
    sample_out(tmp_path)
    failed = LabelRecord("leaves/1", error=ErrorInfo("timeout", None, "slow"))
    write_manifest(
        tmp_path,
        [
            staged(record(tmp_path, "street", {"tree": "maple"}), labels=failed),
            staged(record(tmp_path, "street", {"tree": "oak"}), labels=LabelRecord("leaves/1")),
        ],
    )
    cards = figures(write_gallery(tmp_path).read_text("utf-8"))
    assert "detection failed: timeout" in cards["maple"]
    assert "no detections" in cards["oak"]
    assert not BOX.findall(cards["maple"] + cards["oak"])


@pytest.mark.browser
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium"
)
def test_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    """In a real browser every image loads, nothing leaves file://, and the failure shows."""
    from playwright.sync_api import sync_playwright

    out = tmp_path / "out"
    out.mkdir()
    sample_out(out)
    index = write_gallery(out)
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda request: requests.append(request.url))
            page.goto(index.as_uri())
            page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
            page.wait_for_function("[...document.images].every(i => i.complete)")
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
            failed = page.inner_text("tr.failed-item")
            page.screenshot(path=str(tmp_path / "index.png"), full_page=True)
        finally:
            browser.close()
    assert len(widths) == 3  # the sheet and two thumbnails
    assert all(w > 0 for w in widths)
    assert "refused" in failed
    assert "content policy <script>" in failed
    assert all(url.startswith("file://") for url in requests)
    assert (tmp_path / "index.png").stat().st_size > 0


@pytest.mark.browser
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian chromium is not installed at /usr/bin/chromium"
)
def test_boxes_sit_on_their_objects_in_headless_chromium(tmp_path: Path) -> None:
    """In a real browser each box covers its prediction's share of the thumbnail."""
    from playwright.sync_api import sync_playwright

    out = tmp_path / "out"
    out.mkdir()
    staged_out(out)
    index = write_gallery(out)
    measure = """els => els.map(e => {
        const b = e.getBoundingClientRect();
        const i = e.closest('.shot').querySelector('img').getBoundingClientRect();
        return [(b.left - i.left) / i.width, (b.top - i.top) / i.height,
                b.width / i.width, b.height / i.height, e.innerText];
    })"""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(index.as_uri())
            page.wait_for_function("[...document.images].every(i => i.complete)")
            boxes = page.eval_on_selector_all(".box", measure)
            badges = page.eval_on_selector_all(
                "figure.flagged .flag", "fs => fs.map(f => f.innerText)"
            )
        finally:
            browser.close()
    assert [b[4] for b in boxes] == ["<leaf> 87%", "stem 50%"]
    assert boxes[0][:4] == pytest.approx([0.15, 0.4, 0.2, 0.2], abs=0.02)
    assert boxes[1][:4] == pytest.approx([0.5, 1 / 6, 0.5, 1 / 3], abs=0.02)
    assert badges == ["duplicate", "no_<b>"]


def balance_item(
    out: Path, name: str, place: str, *, status: str = "ok", flags: tuple[str, ...] = ()
) -> ItemRecord:
    """A manifest line of the balance source 'rare' for class `name`."""
    item = record(out, "rare", {"class": name, "place": place}, status=status)
    return staged(item, flags=flags) if flags else item


def write_balance(
    out: Path, counts: Mapping[str, int], planned: Mapping[str, int] | None, *, source: str = "rare"
) -> None:
    """OUT/balance.json as a run records it: the counts read and, after a run, its plan."""
    entry = BalanceRecord(
        {"backend": "mock", "workspace": "demo", "project": "pets"},
        counts,
        {},
        "2025-01-01T00:00:00+00:00",
        target=10 if planned is not None else None,
        n=1 if planned is not None else None,
        planned=planned,
    ).to_json()
    payload = {"format": BALANCE_FORMAT, "sources": {source: entry}}
    (out / BALANCE_NAME).write_text(json.dumps(payload), "utf-8")


def balance_out(out: Path) -> None:
    """'rare' (target 10): dog 0 + 3 planned, two stored of which one flagged, one failed;
    leaf 9 + 1 planned and stored; cat 9 + 1 planned, failed; car 11 and person 12 at
    target, nothing planned."""
    write_manifest(
        out,
        [
            balance_item(out, "leaf", "park"),
            balance_item(out, "dog", "park"),
            balance_item(out, "dog", "kitchen", flags=("missing_class",)),
            balance_item(out, "dog", "garden", status="failed"),
            balance_item(out, "cat", "park", status="failed"),
        ],
    )
    counts = {"person": 12, "car": 11, "dog": 0, "leaf": 9, "cat": 9}
    write_balance(out, counts, {"person": 0, "car": 0, "dog": 3, "leaf": 1, "cat": 1})


def text_of(fragment: str) -> str:
    """What a reader sees of an HTML fragment: tags dropped, entities decoded, spaces joined."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", fragment)).split())


def class_groups(page: str) -> dict[str, str]:
    """Each class group's HTML (up to the next group or the failures) by its escaped name."""
    groups: dict[str, str] = {}
    for match in re.finditer(r'<div class="class-group"[^>]*data-class="([^"]*)"', page):
        rest = page[match.start() :]
        ends = [rest.find(m, 1) for m in ('<div class="class-group"', "<h3 class=", "</section>")]
        groups[match.group(1)] = rest[: min(e for e in ends if e > 0)]
    return groups


def test_balance_source_groups_cards_by_class_with_before_and_after(tmp_path: Path) -> None:
    """A balance source shows one group per class in name order, headed by the project's
    count before, target, planned, stored, usable and the count after; its cards below."""
    balance_out(tmp_path)
    page = write_gallery(tmp_path).read_text("utf-8")
    groups = class_groups(page)
    assert list(groups) == ["cat", "dog", "leaf"]
    heads = {c: text_of(re.findall(r"<h3>.*?</h3>", g)[0]) for c, g in groups.items()}
    assert heads == {
        "cat": "cat before: 9 in the project · target 10 · planned 1 · stored 0 · usable 0 · "
        "after: 9 (short by 1)",
        "dog": "dog before: 0 in the project · target 10 · planned 3 · stored 2 · usable 1 · "
        "after: 1 (short by 9)",
        "leaf": "leaf before: 9 in the project · target 10 · planned 1 · stored 1 · usable 1 · "
        "after: 10 (reached)",
    }
    shown = {c: re.findall(r"<b>class</b> (\w+)", g) for c, g in groups.items()}
    assert shown == {"cat": [], "dog": ["dog", "dog"], "leaf": ["leaf"]}
    assert "no image stored yet" in groups["cat"]
    assert groups["dog"].count('<figure class="item flagged"') == 1
    assert '<span class="flag">missing_class</span>' in groups["dog"]
    assert groups["leaf"].count("<figure") == 1
    assert page.count('<tr class="failed-item">') == 2  # failures stay in the source's table


def test_balance_summary_links_classes_and_lists_those_at_target(tmp_path: Path) -> None:
    """Above the sheets, each group is linked with its verdict, and the classes at target
    with nothing planned or stored share one line instead of empty groups."""
    balance_out(tmp_path)
    page = write_gallery(tmp_path).read_text("utf-8")
    nav = re.findall(r"<p class='class-nav'>.*?</p>", page)
    assert [text_of(n) for n in nav] == ["classes: cat short by 1 · dog short by 9 · leaf reached"]
    assert re.findall(r'href="#([^"]+)"', nav[0]) == [
        "src-rare--cat",
        "src-rare--dog",
        "src-rare--leaf",
    ]
    for anchor in ("src-rare--cat", "src-rare--dog", "src-rare--leaf"):
        assert f'id="{anchor}"' in page
    assert [text_of(n) for n in re.findall(r"<p class='at-target'>.*?</p>", page)] == [
        "at target: car 11, person 12"
    ]
    assert 'data-class="car"' not in page
    assert 'data-class="person"' not in page


def test_balance_class_names_are_escaped(tmp_path: Path) -> None:
    """Class names come from an API: in headings, links, anchors and the at-target line
    they are text, never markup."""
    bad, done = '<img src=x onerror="y">&', "<i>person</i>"
    write_manifest(tmp_path, [balance_item(tmp_path, bad, "park")])
    write_balance(tmp_path, {bad: 1, done: 12}, {bad: 9, done: 0})
    page = write_gallery(tmp_path).read_text("utf-8")
    assert "<img src=x" not in page
    assert "<i>person" not in page
    assert list(class_groups(page)) == [html.escape(bad)]
    assert f"<h3>{html.escape(bad)} <span" in page
    assert "at target: &lt;i&gt;person&lt;/i&gt; 12" in page
    assert f'href="#src-rare--{quote(bad, safe="")}"' in page


def test_balance_counts_without_a_plan_are_shown_before_plain_cards(tmp_path: Path) -> None:
    """Counts read (plan --resolve) but no plan recorded yet: the counts, the cards ungrouped."""
    write_manifest(tmp_path, [balance_item(tmp_path, "dog", "park")])
    write_balance(tmp_path, {"dog": 0, "cat": 4}, None)
    page = write_gallery(tmp_path).read_text("utf-8")
    assert "before: cat 4, dog 0 in the project" in page
    assert 'class="class-group"' not in page
    assert page.count("<figure") == 1


def test_page_without_a_balance_source_is_unchanged(tmp_path: Path) -> None:
    """A job without a balance source renders exactly as without OUT/balance.json, even
    when balance.json names another source; no class groups, no balance styles."""
    staged_out(tmp_path)
    before = write_gallery(tmp_path).read_bytes()
    write_balance(tmp_path, {"dog": 0}, {"dog": 10}, source="elsewhere")
    after = write_gallery(tmp_path).read_bytes()
    assert after == before
    for marker in (b"class-group", b"at target", b"class-nav"):
        assert marker not in after
