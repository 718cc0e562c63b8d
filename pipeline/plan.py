"""``synthaug plan``: what a run would do, what it would cost, how long it would take.

Expands the spec, looks every key up in the manifest state and counts; nothing is
sent and nothing is spent. Items stream through one at a time, so a million-item spec
plans in flat memory. With an empty manifest no key is computed at all: counting is
enough. With a ``label:`` block it also counts the detection requests the run will make
(hosted detection is billed per call): one per image its requests will store, plus one
per stored output of earlier runs not labelled yet, which takes a pass over the manifest
(the run pays the same one to find them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .balance import unresolved_balance
from .items import check_max_items, count_items, iter_source_drafts
from .jobspec.model import SourceSpec, Spec
from .manifest.folded import read_all_records
from .manifest.log import ManifestState
from .pricing import check_cost_budget, spec_price, unknown_price_reason
from .search import unresolved
from .shard import Shard
from .sources import HashCache

__all__ = ["DetectionPlan", "Plan", "SourcePlan", "build_plan", "format_plan"]


@dataclass(frozen=True, slots=True)
class SourcePlan:
    """The figures of one source.

    `pending` is items − done: failed items are among them, and a run retries them
    unless ``--no-retry-failed`` (then `to_run` leaves them out). `cost_usd` is what
    the `to_run` items would cost, less those already answered (``generated``) whose
    images only need downloading; None when the price is unknown.
    """

    name: str
    items: int
    n: int
    done: int
    failed: int
    generated: int
    to_run: int
    price_per_image: float | None
    price_note: str | None = None  # why the price is unknown, worded as the fix
    count_note: str | None = None  # why the count is unknown (an unresolved search)
    submitted: int = 0  # items waiting in Batch API batches (already paid for)
    by_class: Mapping[str, int] | None = None  # a balance source: requests per class
    top_up: Mapping[str, int] | None = None  # plan --top-up: requests a top-up would add

    @property
    def images(self) -> int:
        """Images the whole source asks for (items × n)."""
        return self.items * self.n

    @property
    def pending(self) -> int:
        """Items not done yet (including failed ones)."""
        return self.items - self.done

    @property
    def to_run_images(self) -> int:
        """Images the next run would request."""
        return self.to_run * self.n

    @property
    def cost_usd(self) -> float | None:
        """USD the next run would spend on this source; None when the price is unknown."""
        if self.count_note is not None:
            return None
        paid = max(self.to_run - self.generated - self.submitted, 0) * self.n
        if paid == 0:
            return 0.0
        return None if self.price_per_image is None else paid * self.price_per_image

    def to_json(self) -> dict[str, Any]:
        """The source's entry in ``plan --json``; figures are null when the count is
        unknown (`count_unknown_because` says why and what to run)."""
        if self.count_note is not None:
            return {
                "name": self.name,
                **dict.fromkeys(("items", "images", "done", "failed", "pending", "to_run")),
                "price_per_image": self.price_per_image,
                "cost_usd": None,
                "cost_unknown_because": self.price_note
                if self.price_per_image is None
                else self.count_note,
                "count_unknown_because": self.count_note,
            }
        return {
            "name": self.name,
            "items": self.items,
            "images": self.images,
            "done": self.done,
            "failed": self.failed,
            "pending": self.pending,
            "to_run": self.to_run,
            "in_batches": self.submitted,
            "price_per_image": self.price_per_image,
            "cost_usd": _round(self.cost_usd),
            "cost_unknown_because": self.price_note if self.cost_usd is None else None,
            **({} if self.by_class is None else {"by_class": dict(self.by_class)}),
            **({} if self.top_up is None else {"top_up": dict(self.top_up)}),
        }


@dataclass(frozen=True, slots=True)
class DetectionPlan:
    """The detection requests of a spec's ``label:`` stage: one per image the planned
    requests will store (`new`; None while a count is unknown) and one per stored output
    of earlier runs without labels, or whose detection failed (`backlog`)."""

    model: str
    new: int | None
    backlog: int

    @property
    def requests(self) -> int | None:
        """Detection requests the next run makes at most (fewer if requests fail)."""
        return None if self.new is None else self.new + self.backlog

    def to_json(self) -> dict[str, Any]:
        """The ``label`` entry of ``plan --json``."""
        return {"model": self.model, "new_images": self.new, "backlog": self.backlog}


@dataclass(frozen=True, slots=True)
class Plan:
    """Figures per source, totals, the expected duration and budget stops, and the
    detection requests of a ``label:`` stage (`detection`, None without one)."""

    sources: tuple[SourcePlan, ...]
    rate_limit: float | None
    image_rate_limit: float | None
    max_images: int | None
    max_cost_usd: float | None
    mode: str = "online"
    warnings: tuple[str, ...] = ()  # models that shut down soon, worded as the fix
    detection: DetectionPlan | None = None

    def total(self, field: str) -> int:
        """Sum of an integer `field` over all sources."""
        return sum(int(getattr(s, field)) for s in self.sources)

    @property
    def cost_usd(self) -> float | None:
        """USD the next run would spend; None when any needed price is unknown."""
        costs = [s.cost_usd for s in self.sources]
        return None if None in costs else sum(c for c in costs if c is not None)

    @property
    def counts_known(self) -> bool:
        """False while a source's count is unknown (a search not resolved yet)."""
        return all(s.count_note is None for s in self.sources)

    @property
    def eta_s(self) -> float | None:
        """Seconds the rate limits alone impose on the next run; None without a limit
        (or while a count is unknown)."""
        if not self.counts_known:
            return None
        bounds = []
        if self.rate_limit:
            bounds.append(self.total("to_run") / self.rate_limit)
        if self.image_rate_limit:
            bounds.append(self.total("to_run_images") / self.image_rate_limit)
        return max(bounds) if bounds else None

    @property
    def cost_notes(self) -> list[str]:
        """Why the cost is unknown, one line per source whose price is missing."""
        return [
            f"cost of '{s.name}' unknown: {s.price_note}"
            for s in self.sources
            if s.cost_usd is None
            and s.price_note
            and (s.count_note is None or s.price_per_image is None)
        ]

    @property
    def count_notes(self) -> list[str]:
        """Why a count is unknown, one line per source, worded as the fix."""
        return [f"'{s.name}': {s.count_note}" for s in self.sources if s.count_note]

    @property
    def stops_early(self) -> str | None:
        """Why a budget would stop the next run before it is done, or None."""
        images, cost = self.total("to_run_images"), self.cost_usd
        if self.max_images is not None and images > self.max_images:
            return (
                f"max_images {self.max_images:,} stops the run after {self.max_images:,} "
                f"of {images:,} images; run again to go on"
            )
        if self.max_cost_usd is not None and cost is not None and cost > self.max_cost_usd:
            return (
                f"max_cost_usd {self.max_cost_usd:g} stops the run at ${self.max_cost_usd:,.2f} "
                f"of ${cost:,.2f}; run again to go on"
            )
        return None

    def to_json(self) -> dict[str, Any]:
        """The ``plan --json`` object of the design contract, plus extra fields."""
        total: dict[str, Any] = {
            key: self.total(key) for key in ("items", "images", "done", "failed", "pending")
        }
        total["to_run"] = self.total("to_run")
        total["in_batches"] = self.total("submitted")
        if not self.counts_known:
            total.update(dict.fromkeys(total))
        total["cost_usd"] = _round(self.cost_usd)
        total["eta_s"] = None if self.eta_s is None else round(self.eta_s, 1)
        return {
            "sources": [s.to_json() for s in self.sources],
            "total": total,
            "stops_early": self.stops_early,
            "cost_notes": self.cost_notes,
            "count_notes": self.count_notes,
            "warnings": list(self.warnings),
            "mode": self.mode,
            "detect_requests": self.detection.requests if self.detection else 0,
            "label": self.detection.to_json() if self.detection else None,
            "limits": {
                "rate_limit_per_s": self.rate_limit,
                "image_rate_limit_per_s": self.image_rate_limit,
                "max_images": self.max_images,
                "max_cost_usd": self.max_cost_usd,
            },
        }


def build_plan(
    spec: Spec,
    state: ManifestState,
    *,
    hashes: HashCache | None = None,
    top_up: Mapping[str, int] | None = None,
    shard: Shard | None = None,
) -> Plan:
    """Count items, images, done, failed and pending per source of `spec` against `state`.

    Raises `SpecError` when the spec expands past ``run.max_items``. A roboflow_search
    source not resolved yet (`pipeline.search`) is planned with an unknown count. `top_up`
    (``plan --top-up``) is what a top-up adds to the balance source, shown beside it.
    With `shard` (``plan --shard I/N``) only that shard's items are counted.
    """
    unknown = {source.name for source in (*unresolved(spec), *unresolved_balance(spec))}
    known = spec.model_copy(
        update={"sources": tuple(s for s in spec.sources if s.name not in unknown)}
    )
    counts = count_items(known)
    check_max_items(known, counts)
    check_cost_budget(spec)
    hashes = hashes or HashCache()
    plans = tuple(
        _unknown_source(spec, s)
        if s.name in unknown
        else _plan_source(spec, s, state, counts[s.name], hashes, top_up, shard)
        for s in spec.sources
    )
    batch = spec.backend.mode == "batch"
    return Plan(
        sources=plans,
        rate_limit=None if batch else spec.run.rate_limit,  # the Batch API paces itself
        image_rate_limit=None if batch else spec.run.image_rate_limit,
        max_images=spec.run.max_images,
        max_cost_usd=spec.run.max_cost_usd,
        mode=spec.backend.mode,
        warnings=tuple(spec.model_warnings()),
        detection=_detection(spec, state, plans),
    )


def _detection(
    spec: Spec, state: ManifestState, sources: tuple[SourcePlan, ...]
) -> DetectionPlan | None:
    """The label stage's requests: the images still to come and the unlabelled backlog."""
    if spec.label is None:
        return None
    known = all(s.count_note is None for s in sources)
    new = sum(s.to_run_images for s in sources) if known else None
    backlog = _unlabelled(spec.output_dir) if state.finished else 0
    return DetectionPlan(spec.label.model, new, backlog)


def _unlabelled(out_dir: Path) -> int:
    """Stored outputs of ok keys (their last record, over every manifest of OUT) with no
    labels or a failed detection: what the label stage takes up first (the same rule,
    `LabelRecord.done`)."""
    return sum(
        1
        for record in read_all_records(out_dir).values()
        if record.status == "ok"
        for output in record.outputs
        if output.labels is None or not output.labels.done
    )


def _plan_source(
    spec: Spec,
    source: SourceSpec,
    state: ManifestState,
    items: int,
    hashes: HashCache,
    top_up: Mapping[str, int] | None = None,
    shard: Shard | None = None,
) -> SourcePlan:
    params = spec.source_params(source)
    status = {"ok": 0, "failed": 0, "generated": 0, "submitted": 0}
    if shard is not None:  # the shard's items only: every key expanded
        items = 0
        for draft in iter_source_drafts(spec, source, hashes=hashes):
            if shard.owns(draft.key):
                items += 1
                known = state.status(draft.key)
                if known is not None:
                    status[known] += 1
    elif len(state):  # an empty manifest needs no keys: skip hashing and expanding
        for draft in iter_source_drafts(spec, source, hashes=hashes):
            known = state.status(draft.key)
            if known is not None:
                status[known] += 1
    skipped = 0 if spec.run.retry_failed else status["failed"]
    return SourcePlan(
        name=source.name,
        items=items,
        n=int(params.get("n", 1)),
        done=status["ok"],
        failed=status["failed"],
        generated=status["generated"],
        submitted=status["submitted"],
        to_run=items - status["ok"] - skipped,
        price_per_image=spec_price(spec, params),
        price_note=unknown_price_reason(params),
        by_class=None if source.balance_plan is None else dict(sorted(source.balance_plan.items())),
        top_up=None
        if top_up is None or source.balance_plan is None
        else dict(sorted(top_up.items())),
    )


UNRESOLVED_SEARCH = (
    "its images are found by a Roboflow search that has not run yet: "
    "`synthaug plan --resolve SPEC` runs it (no images are generated) and counts them"
)
UNREAD_COUNTS = (
    "it is planned from the project's class counts, not read yet: "
    "`synthaug plan --resolve SPEC` reads and records them (no images are generated)"
)


def _unknown_source(spec: Spec, source: SourceSpec) -> SourcePlan:
    """A search source whose ids, or a balance source whose class counts, are not known
    yet: its price, but no count."""
    params = spec.source_params(source)
    return SourcePlan(
        name=source.name,
        items=0,
        n=int(params.get("n", 1)),
        done=0,
        failed=0,
        generated=0,
        to_run=0,
        price_per_image=spec_price(spec, params),
        price_note=unknown_price_reason(params),
        count_note=UNREAD_COUNTS if source.roboflow_balance is not None else UNRESOLVED_SEARCH,
    )


def format_plan(plan: Plan) -> str:
    """A readable table: one row per source, a total row, then ETA and budget notes."""
    header = ("source", "items", "images", "done", "failed", "pending", "cost")
    counts = ("items", "images", "done", "failed", "pending")
    cells: list[tuple[str, ...]] = [header]
    for s in plan.sources:
        figures = (f"{getattr(s, k):,}" if s.count_note is None else "?" for k in counts)
        cells.append((s.name, *figures, _money(s.cost_usd)))
    totals = (f"{plan.total(k):,}" if plan.counts_known else "?" for k in counts)
    cells.append(("total", *totals, _money(plan.cost_usd)))
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [_row(cells[0], widths)]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(_row(r, widths) for r in cells[1:-1])
    lines.append("  ".join("-" * w for w in widths))
    lines.append(_row(cells[-1], widths))
    known = plan.counts_known
    if plan.mode == "batch":
        lines.append("eta: within 24 h (OpenAI's Batch API; prices above are its half price)")
        waiting = plan.total("submitted")
        if waiting:
            lines.append(f"note: {waiting:,} items already wait in batches (paid): collected")
    else:
        lines.append(f"eta: {_duration(plan.eta_s) if known else 'unknown (see the notes)'}")
    if plan.detection is not None:
        lines.append(_detection_line(plan.detection))
    for source in plan.sources:
        if source.by_class is not None:
            each = ", ".join(f"{name} {count}" for name, count in source.by_class.items())
            lines.append(f"'{source.name}' requests per class: {each or 'none'}")
        if source.top_up is not None:
            added = ", ".join(f"{name} +{count}" for name, count in source.top_up.items())
            lines.append(f"'{source.name}' top-up adds: {added or 'nothing (no class is short)'}")
    lines.extend(f"warning: {warning}" for warning in plan.warnings)
    lines.extend(f"note: {note}" for note in plan.count_notes)
    lines.extend(f"note: {note}" for note in plan.cost_notes)
    if plan.stops_early:
        lines.append(f"note: {plan.stops_early}")
    return "\n".join(lines)


def _detection_line(detection: DetectionPlan) -> str:
    """``detection requests: N (model M)``, with where they come from."""
    total = "unknown" if detection.requests is None else f"{detection.requests:,}"
    new = "?" if detection.new is None else f"{detection.new:,}"
    return (
        f"detection requests: {total} (model {detection.model}): {new} for new images, "
        f"{detection.backlog:,} for stored ones not labelled yet"
    )


def _row(cells: tuple[str, ...], widths: list[int]) -> str:
    first = cells[0].ljust(widths[0])
    rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
    return "  ".join((first, *rest)).rstrip()


def _money(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.2f}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "no rate limit: as fast as the API answers"
    if seconds < 60:
        return f"at least {seconds:.0f} s (rate limits)"
    minutes = seconds / 60
    if minutes < 120:
        return f"at least {minutes:.0f} min (rate limits)"
    return f"at least {minutes / 60:.1f} h (rate limits)"
