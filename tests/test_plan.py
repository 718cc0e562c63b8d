"""synthaug plan: per-source figures against a manifest, cost, ETA and budget stops."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from checks import bare_record, mock_spec
from PIL import Image

import synthaug
from pipeline.errors import SpecError
from pipeline.items import count_items, expand_items
from pipeline.jobspec.load import load_spec
from pipeline.jobspec.model import Spec
from pipeline.manifest.log import ManifestState, load_state
from pipeline.manifest.writer import ManifestWriter
from pipeline.plan import build_plan, format_plan
from pipeline.pricing import price_per_image
from pipeline.records import ErrorInfo, ItemRecord, ItemStatus, LabelRecord, OutputFile
from pipeline.run.prepare import write_job_json

GRID = {"name": "grid", "prompt": "{s} {t}", "vars": {"s": ["fall", "winter"], "t": ["oak", "elm"]}}
PAIRS = {"name": "pairs", "prompt": "two cats", "repeats": 3, "params": {"n": 2}}


ROBOFLOW = {"backend": {"kind": "roboflow"}, "project_url": "leaves"}
PRICED = {"model": "gpt-image-2", "quality": "medium", "size": "1024x1024"}  # $0.053 an image


def make_spec(spec_factory: Callable[..., Path], **run: Any) -> Spec:
    """A priced (roboflow) spec: plan needs no key and sends nothing."""
    return load_spec(
        spec_factory(
            sources=[GRID, PAIRS], params=PRICED, run={"rate_limit": "6/min", **run}, **ROBOFLOW
        )
    )


def partial_state(spec: Spec, sandbox: Path) -> ManifestState:
    """grid: 2 ok, 1 failed; pairs: 1 generated; plus a key the spec no longer has."""
    items = list(expand_items(spec))
    grid = [i for i in items if i.source == "grid"]
    pairs = [i for i in items if i.source == "pairs"]
    path = sandbox / "out" / "manifest.jsonl"
    with ManifestWriter(path) as writer:
        writer.append(line(grid[0].key, "failed", "grid"))
        writer.append(line(grid[0].key, "ok", "grid"))  # last wins
        writer.append(line(grid[1].key, "ok", "grid"))
        writer.append(line(grid[2].key, "failed", "grid"))
        writer.append(line(pairs[0].key, "generated", "pairs"))
        writer.append(line("f" * 64, "ok", "gone"))
    return load_state(path)


def line(key: str, status: ItemStatus, source: str) -> ItemRecord:
    """A manifest line of `key` with `status`, nothing else recorded."""
    return bare_record(key, status, source=source)


def test_plan_counts_against_a_partial_manifest(
    spec_factory: Callable[..., Path], sandbox: Path
) -> None:
    """done/failed/pending per source and in total, with cost of what is left and ETA."""
    spec = make_spec(spec_factory)
    data = build_plan(spec, partial_state(spec, sandbox)).to_json()
    grid, pairs = data["sources"]
    assert {k: grid[k] for k in ("name", "items", "images", "done", "failed", "pending")} == {
        "name": "grid",
        "items": 4,
        "images": 4,
        "done": 2,
        "failed": 1,
        "pending": 2,
    }
    assert (pairs["items"], pairs["images"], pairs["done"], pairs["pending"]) == (3, 6, 0, 3)
    assert grid["cost_usd"] == pytest.approx(2 * 0.053)
    assert pairs["cost_usd"] == pytest.approx(2 * 2 * 0.053)  # the generated item is paid
    total = data["total"]
    assert {k: total[k] for k in ("items", "images", "done", "failed", "pending")} == {
        "items": 7,
        "images": 10,
        "done": 2,
        "failed": 1,
        "pending": 5,
    }
    assert total["cost_usd"] == pytest.approx(6 * 0.053)
    assert total["eta_s"] == pytest.approx(5 / 0.1)
    assert data["stops_early"] is None
    json.dumps(data)  # plain JSON all the way down


def test_no_retry_failed_leaves_failed_items_out(
    spec_factory: Callable[..., Path], sandbox: Path
) -> None:
    """With retry_failed off, failed items stay pending but are not run or paid."""
    spec = make_spec(spec_factory, retry_failed=False)
    data = build_plan(spec, partial_state(spec, sandbox)).to_json()
    assert (data["sources"][0]["pending"], data["sources"][0]["to_run"]) == (2, 1)
    assert data["sources"][0]["cost_usd"] == pytest.approx(0.053)


def test_empty_manifest_plans_everything(spec_factory: Callable[..., Path]) -> None:
    """A fresh run has everything pending and costs all of it."""
    data = build_plan(make_spec(spec_factory), ManifestState()).to_json()
    assert data["total"]["pending"] == data["total"]["items"] == 7
    assert data["total"]["cost_usd"] == pytest.approx(10 * 0.053)


@pytest.mark.parametrize(
    ("run", "words"),
    [
        pytest.param(
            {"max_images": 5}, "max_images 5 stops the run after 5 of 10 images", id="images"
        ),
        pytest.param(
            {"max_cost_usd": 0.3}, "max_cost_usd 0.3 stops the run at $0.30 of $0.53", id="cost"
        ),
    ],
)
def test_budgets_that_stop_the_run_early_are_flagged(
    spec_factory: Callable[..., Path], run: dict[str, Any], words: str
) -> None:
    """A budget smaller than what is left is reported, in JSON and in the table."""
    plan = build_plan(make_spec(spec_factory, **run), ManifestState())
    assert words in plan.to_json()["stops_early"]
    assert words in format_plan(plan)


def test_unknown_price_and_no_rate_limit(spec_factory: Callable[..., Path]) -> None:
    """An unpriced model costs 'unknown'; without a rate limit there is no ETA."""
    spec = load_spec(
        spec_factory(params={"model": "my-model"}, run={"rate_limit": None}, **ROBOFLOW)
    )
    plan = build_plan(spec, ManifestState())
    assert plan.to_json()["total"]["cost_usd"] is None
    assert plan.to_json()["total"]["eta_s"] is None
    assert "unknown" in format_plan(plan)


@pytest.mark.parametrize(
    ("params", "words"),
    [
        pytest.param({}, "no params.model: set it", id="no-model"),
        pytest.param(
            {"model": "gpt-image-2"},
            "gpt-image-2 chooses its quality and size itself: set params.quality and params.size",
            id="api-chooses",
        ),
        pytest.param(
            {"model": "gpt-image-9", "quality": "low", "size": "1024x1024"},
            "model gpt-image-9 is not in the price table: set run.price_per_image",
            id="unknown-model",
        ),
        pytest.param(
            {"model": "gpt-image-2.6-flare", "quality": "low", "size": "1024x1024"},
            "OpenAI publishes no per-image price for gpt-image-2.6-flare (it bills tokens; a run "
            "reads each answer's cost from its usage): set run.price_per_image",
            id="token-priced",
        ),
        pytest.param(
            {"model": "gpt-image-2", "quality": "low", "size": "2048x1152"},
            "gpt-image-2 has no list price for size 2048x1152: set run.price_per_image "
            "(a run reads each answer's cost from its usage)",
            id="custom-size",
        ),
    ],
)
def test_unknown_cost_says_why_and_how_to_fix_it(
    spec_factory: Callable[..., Path], params: dict[str, str], words: str
) -> None:
    """A cost plan cannot know is shown as unknown with the key that would make it known."""
    spec = load_spec(spec_factory(sources=[GRID], params=params, **ROBOFLOW))
    plan = build_plan(spec, ManifestState())
    data = plan.to_json()
    assert data["total"]["cost_usd"] is None
    assert data["sources"][0]["cost_unknown_because"].startswith(words.split(":")[0])
    assert f"note: cost of 'grid' unknown: {words}" in format_plan(plan)


def test_max_cost_without_a_known_price_is_refused(spec_factory: Callable[..., Path]) -> None:
    """max_cost_usd with no params.model cannot be enforced: plan refuses and says why."""
    spec = load_spec(spec_factory(sources=[GRID], run={"max_cost_usd": 5}, **ROBOFLOW))
    with pytest.raises(SpecError, match=r"run\.max_cost_usd: needs a known price.*params\.model"):
        build_plan(spec, ManifestState())


def test_image_rate_limit_can_bound_the_eta(spec_factory: Callable[..., Path]) -> None:
    """The ETA is the slower of the request and the image limits."""
    spec = make_spec(spec_factory, image_rate_limit="1/s")
    assert build_plan(spec, ManifestState()).to_json()["total"]["eta_s"] == pytest.approx(70)


def test_format_plan_is_an_aligned_table(spec_factory: Callable[..., Path], sandbox: Path) -> None:
    """Every row of the text table has the same columns, and a total row."""
    spec = make_spec(spec_factory)
    lines = format_plan(build_plan(spec, partial_state(spec, sandbox))).splitlines()
    table = lines[:6]
    assert table[0].split() == ["source", "items", "images", "done", "failed", "pending", "cost"]
    assert table[2].split() == ["grid", "4", "4", "2", "1", "2", "$0.11"]
    assert table[5].split() == ["total", "7", "10", "2", "1", "5", "$0.32"]
    assert len({len(line) for line in table}) == 1
    assert lines[6].startswith("eta: at least 50 s")


def test_plan_refuses_a_spec_past_max_items(spec_factory: Callable[..., Path]) -> None:
    """build_plan applies the max_items typo guard."""
    with pytest.raises(SpecError, match="expands to 7 items"):
        build_plan(make_spec(spec_factory, max_items=5), ManifestState())


@pytest.mark.parametrize(
    ("params", "override", "price"),
    [
        pytest.param(
            {"model": "gpt-image-2", "size": "1024x1024", "quality": "medium"},
            None,
            0.053,
            id="gpt-image-2-square",
        ),
        pytest.param(
            {"model": "gpt-image-2", "size": "1024x1536", "quality": "low"},
            None,
            0.005,
            id="gpt-image-2-portrait",
        ),
        pytest.param(
            {"model": "gpt-image-2-2026-04-21", "size": "1024x1024", "quality": "high"},
            None,
            0.211,
            id="dated-snapshot",
        ),
        pytest.param(
            {"model": "gpt-image-2", "size": "auto", "quality": "high"}, None, None, id="auto-size"
        ),
        pytest.param(
            {"model": "gpt-image-2", "size": "2048x1152", "quality": "high"},
            None,
            None,
            id="custom-size-unlisted",
        ),
        pytest.param(
            {"model": "gpt-image-2.6-flare", "size": "1024x1024", "quality": "low"},
            None,
            None,
            id="token-priced-only",
        ),
        pytest.param({"size": "1024x1024", "quality": "high"}, None, None, id="no-model"),
        pytest.param(
            {"model": "gpt-image-9", "size": "1024x1024", "quality": "low"},
            None,
            None,
            id="unknown-model",
        ),
        pytest.param(
            {"model": "gpt-image-2", "size": "1536x1024", "quality": "high"},
            None,
            0.165,
            id="gpt-image-2-landscape",
        ),
        pytest.param({"model": "x"}, 0.5, 0.5, id="override"),
    ],
)
def test_price_table(params: dict[str, str], override: float | None, price: float | None) -> None:
    """Prices come from the built-in table unless run.price_per_image overrides them."""
    assert price_per_image(params, override) == price


def test_mock_backend_costs_nothing(spec_factory: Callable[..., Path]) -> None:
    """Rehearsing on the mock backend is free, whatever the model's price."""
    spec = load_spec(spec_factory(sources=[GRID]))
    assert build_plan(spec, ManifestState()).to_json()["total"]["cost_usd"] == 0.0


LABEL = {"model": "leaves/1"}
DONE = LabelRecord("leaves/1")
FAILED = LabelRecord("leaves/1", error=ErrorInfo("timeout", None, "slow"))


def stored(out: Path, key: str, source: str, *labels: LabelRecord | None) -> ItemRecord:
    """An ok line of `key` with one stored 8 x 8 image per entry of `labels`."""
    outputs = []
    for i, found in enumerate(labels):
        rel = f"images/{source}/{key[:16]}-{i}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40, 120, 60)).save(out / rel)
        outputs.append(OutputFile(rel, "0" * 64, 8, 8, labels=found))
    return bare_record(key, "ok", source=source, outputs=tuple(outputs))


def labelled_out(spec: Spec, out: Path) -> None:
    """grid: 3 of 4 done (one labelled, one unlabelled, one whose detection failed); pairs:
    1 of 3 answered, not downloaded; plus an earlier run's item the spec no longer has
    (2 images, one labelled): 3 stored outputs wait for labels."""
    write_job_json(spec, Path("spec.yaml"), count_items(spec))  # as a run does: its key scheme
    items = list(expand_items(spec))
    grid = [i.key for i in items if i.source == "grid"]
    pairs = [i.key for i in items if i.source == "pairs"]
    with ManifestWriter(out / "manifest.jsonl") as writer:
        writer.append(stored(out, grid[0], "grid", DONE))
        writer.append(stored(out, grid[1], "grid", None))
        writer.append(stored(out, grid[2], "grid", FAILED))
        writer.append(bare_record(grid[3], "failed", source="grid"))
        writer.append(bare_record(pairs[0], "generated", source="pairs"))
        writer.append(stored(out, "e" * 64, "gone", None))  # labelled later: last line wins
        writer.append(stored(out, "e" * 64, "gone", DONE))
        writer.append(stored(out, "f" * 64, "gone", None, DONE))


def label_spec(spec_factory: Callable[..., Path], **label: Any) -> Spec:
    """A mock job of GRID and PAIRS, with a ``label:`` block when `label` is given."""
    stages = {"label": label} if label else {}
    data = mock_spec("labelled", sources=[GRID, PAIRS], **stages)
    return load_spec(spec_factory(**data))


def test_plan_counts_detection_requests(spec_factory: Callable[..., Path], sandbox: Path) -> None:
    """With ``label:``, one detection request per image still to come (grid 1 + pairs
    3 x 2) plus one per stored output not labelled yet (3), and the model."""
    spec = label_spec(spec_factory, **LABEL)
    labelled_out(spec, sandbox / "out")
    data = synthaug.plan(spec).to_json()  # as `plan --json` prints it
    assert data["detect_requests"] == 7 + 3
    assert data["label"] == {"model": "leaves/1", "new_images": 7, "backlog": 3}
    text = format_plan(synthaug.plan(spec))
    assert (
        "detection requests: 10 (model leaves/1): 7 for new images, "
        "3 for stored ones not labelled yet" in text.splitlines()
    )


def test_plan_without_a_manifest_counts_every_image(spec_factory: Callable[..., Path]) -> None:
    """A first run labels every image it stores: items x n, nothing stored before."""
    data = build_plan(label_spec(spec_factory, **LABEL), ManifestState()).to_json()
    assert data["detect_requests"] == data["total"]["images"] == 4 + 3 * 2
    assert data["label"]["backlog"] == 0


def test_plan_without_label_makes_no_detection_requests(
    spec_factory: Callable[..., Path], sandbox: Path
) -> None:
    """Without ``label:`` the plan counts no detection request and says nothing of it."""
    spec = label_spec(spec_factory)
    labelled_out(spec, sandbox / "out")
    plan = synthaug.plan(spec)
    assert (plan.to_json()["detect_requests"], plan.to_json()["label"]) == (0, None)
    assert "detection" not in format_plan(plan)


def test_detection_count_is_unknown_with_an_unresolved_search(
    spec_factory: Callable[..., Path],
) -> None:
    """A search not run yet leaves the count of new images, so of requests, unknown."""
    search = {"name": "found", "roboflow_search": {"workspace": "w", "project": "p", "tag": "t"}}
    search["prompt"] = "snow"
    data = mock_spec("labelled", sources=[GRID, search], label=LABEL)
    plan = build_plan(load_spec(spec_factory(**data)), ManifestState())
    assert plan.to_json()["detect_requests"] is None
    assert "detection requests: unknown (model leaves/1)" in format_plan(plan)
