"""Balance sources: generate what a Roboflow project lacks, planned from its class counts.

A ``roboflow_balance`` source reads the project's class counts once per OUT and records
them in ``OUT/balance.json``; its plan follows from them: for each class below
``target``, ``ceil((target - count) / n)`` requests (capped by ``max_per_class``), plus
what top-ups added. So every resume plans the same items, whatever the project became
meanwhile, and a plain run never plans more than is recorded. ``run --top-up`` adds, per
class, the shortfall ``target - count - usable - still planned`` (usable: stored and not
flagged; still planned: images of planned items not yet stored), in requests of n images:
a second night fills exactly what the first left short, and nothing is paid twice.

The resolved spec carries each balance source's requests per class
(`SourceSpec.with_balance_plan`); items, counts and plans read them from there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .credentials import (
    DIRECT,
    ProxySettings,
    balance_from_backend,
    read_balance_key,
    read_proxy_settings,
)
from .items import iter_source_drafts
from .jobspec.fields import DEFAULT_BASE_URL
from .jobspec.model import BALANCE_CLASS_VAR, BalanceSettings, SourceSpec, Spec
from .manifest.folded import read_all_records
from .records import PLAN_LOGGER, ItemRecord
from .retry import RetryPolicy
from .search import standalone_backend
from .store import layout
from .store.layout import BALANCE_NAME

__all__ = [
    "BALANCE_FORMAT",
    "ClassProgress",
    "apply_recorded",
    "balance_source",
    "base_requests",
    "class_progress",
    "read_balance",
    "record_plan",
    "resolve_balance",
    "resolve_standalone",
    "settle",
    "shortfall",
    "shortfall_requests",
    "unresolved_balance",
    "with_top_up",
]

BALANCE_FORMAT = 1
"""Version of ``OUT/balance.json``'s layout."""

log = logging.getLogger(PLAN_LOGGER)


def balance_source(spec: Spec) -> SourceSpec | None:
    """The spec's balance source (at most one per job), if any."""
    return next((s for s in spec.sources if s.roboflow_balance is not None), None)


def unresolved_balance(spec: Spec) -> list[SourceSpec]:
    """The balance sources of `spec` whose counts are not read yet."""
    source = balance_source(spec)
    return [source] if source is not None and source.balance_plan is None else []


def images_per_request(spec: Spec, source: SourceSpec) -> int:
    """`n`: the images each of the source's requests asks for."""
    return int(spec.source_params(source).get("n") or 1)


def base_requests(settings: BalanceSettings, counts: Mapping[str, int], n: int) -> dict[str, int]:
    """The requests each class needs to reach the target from `counts` (a class the
    spec names that the project does not count has none yet), capped by
    ``max_per_class``."""
    names = settings.classes if settings.classes is not None else tuple(counts)
    plan: dict[str, int] = {}
    for name in names:
        short = max(0, settings.target - counts.get(name, 0))
        plan[name] = _capped(settings, math.ceil(short / n), n)
    return plan


def _capped(settings: BalanceSettings, requests: int, n: int) -> int:
    if settings.max_per_class is None:
        return requests
    return min(requests, math.ceil(settings.max_per_class / n))


def _identity(spec: Spec, settings: BalanceSettings) -> dict[str, str]:
    """What makes two reads the same: backend kind (the mock's projects are not
    Roboflow's), workspace, project. The URL is left out, as for searches."""
    return {
        "backend": spec.backend.kind,
        "workspace": settings.workspace,
        "project": settings.project,
    }


# ------------------------------------------------------------------ OUT/balance.json


@dataclass(frozen=True, slots=True)
class BalanceRecord:
    """What OUT recorded for a balance source: the counts read, what top-ups added, and
    the plan of its last run (which `status` reads without the spec)."""

    identity: Mapping[str, str]
    counts: Mapping[str, int]
    added: Mapping[str, int]
    read_at: str
    target: int | None = None
    n: int | None = None
    planned: Mapping[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as balance.json keeps it."""
        return {
            "identity": dict(self.identity),
            "counts": dict(self.counts),
            "added": dict(self.added),
            "read_at": self.read_at,
            "target": self.target,
            "n": self.n,
            "planned": None if self.planned is None else dict(self.planned),
        }


def read_balance(out_dir: Path) -> dict[str, BalanceRecord]:
    """OUT's balance records by source name; what is not a valid record is left out."""
    data = layout.read_json(out_dir / BALANCE_NAME) or {}
    sources = data.get("sources") if data.get("format") == BALANCE_FORMAT else None
    records: dict[str, BalanceRecord] = {}
    for name, raw in (sources if isinstance(sources, dict) else {}).items():
        record = _record_of(raw)
        if record is not None:
            records[name] = record
    return records


def _record_of(raw: object) -> BalanceRecord | None:
    if not isinstance(raw, dict):
        return None
    counts, added = _counts(raw.get("counts")), _counts(raw.get("added") or {})
    identity = raw.get("identity")
    if counts is None or added is None or not isinstance(identity, dict):
        return None
    planned = _counts(raw.get("planned")) if raw.get("planned") is not None else None
    target, n = raw.get("target"), raw.get("n")
    return BalanceRecord(
        identity={str(k): str(v) for k, v in identity.items()},
        counts=counts,
        added=added,
        read_at=str(raw.get("read_at") or ""),
        target=target if isinstance(target, int) and not isinstance(target, bool) else None,
        n=n if isinstance(n, int) and not isinstance(n, bool) else None,
        planned=planned,
    )


def _counts(value: object) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    out: dict[str, int] = {}
    for name, count in value.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            return None
        out[str(name)] = count
    return out


def _write_record(out_dir: Path, name: str, record: BalanceRecord) -> None:
    """Record one source's counts and plan in OUT/balance.json (atomically)."""
    path = out_dir / BALANCE_NAME
    data = layout.read_json(path) or {}
    sources = data.get("sources") if data.get("format") == BALANCE_FORMAT else None
    kept = dict(sources) if isinstance(sources, dict) else {}
    kept[name] = record.to_json()
    layout.write_json_atomic(path, {"format": BALANCE_FORMAT, "sources": kept})


# ------------------------------------------------------------------ plans


def _plan_of(spec: Spec, source: SourceSpec, record: BalanceRecord) -> dict[str, int]:
    settings = source.roboflow_balance
    assert settings is not None
    n = images_per_request(spec, source)
    plan = base_requests(settings, record.counts, n)
    for name, more in record.added.items():
        if settings.classes is None or name in settings.classes:
            plan[name] = _capped(settings, plan.get(name, 0) + more, n)
    return plan


def apply_recorded(spec: Spec) -> Spec:
    """`spec` with its balance source planned from the counts OUT recorded for the same
    project (no network); unchanged when none are recorded."""
    source = balance_source(spec)
    if source is None or source.balance_plan is not None:
        return spec
    assert source.roboflow_balance is not None
    record = read_balance(spec.output_dir).get(source.name)
    if record is None or dict(record.identity) != _identity(spec, source.roboflow_balance):
        return spec
    return _with_plan(spec, source, _plan_of(spec, source, record))


def _with_plan(spec: Spec, source: SourceSpec, plan: Mapping[str, int]) -> Spec:
    sources = tuple(s.with_balance_plan(plan) if s.name == source.name else s for s in spec.sources)
    return spec.model_copy(update={"sources": sources})


def record_plan(spec: Spec) -> None:
    """Keep the balance source's plan (target, n, requests per class) beside its counts,
    so that `status` can report it from OUT alone. A no-op without one."""
    source = balance_source(spec)
    plan = None if source is None else source.balance_plan
    if source is None or plan is None:
        return
    record = read_balance(spec.output_dir).get(source.name)
    if record is None:
        return
    settings = source.roboflow_balance
    assert settings is not None
    updated = dataclasses.replace(
        record, target=settings.target, n=images_per_request(spec, source), planned=dict(plan)
    )
    if updated != record:
        _write_record(spec.output_dir, source.name, updated)


async def resolve_balance(
    spec: Spec, *, backend_root: str | None, proxies: ProxySettings = DIRECT
) -> Spec:
    """`spec` with its balance source planned: from OUT's record, else by reading the
    project's class counts (and recording them). `backend_root` is the embedded mock's
    root when the backend is one. Raises `FatalError` when the API refuses or keeps
    failing, `CredentialsError` for a missing key."""
    spec = apply_recorded(spec)
    pending = unresolved_balance(spec)
    if not pending:
        return spec
    (source,) = pending
    settings = source.roboflow_balance
    assert settings is not None
    embedded = balance_from_backend(settings, spec.backend)
    root = (backend_root if embedded else settings.base_url) or DEFAULT_BASE_URL
    api_key = read_balance_key(settings, spec.backend)
    from .backends.roboflow_project import RoboflowProject  # aiohttp: only when reading

    client = RoboflowProject(
        root,
        api_key,
        timeout_s=spec.backend.timeout_s,
        policy=RetryPolicy.from_run(spec.run),
        proxies=DIRECT if embedded else proxies,
    )
    async with client:
        counts = await client.class_counts(settings.workspace, settings.project)
    log.info(
        "source '%s': %s/%s counts %s",
        source.name,
        settings.workspace,
        settings.project,
        ", ".join(f"{name} {count}" for name, count in counts.items()) or "no classes",
    )
    record = BalanceRecord(
        _identity(spec, settings),
        counts,
        {},
        datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    _write_record(spec.output_dir, source.name, record)
    return _with_plan(spec, source, _plan_of(spec, source, record))


async def settle(spec: Spec, *, backend_root: str | None, top_up: bool) -> Spec:
    """A run's balance source, once OUT is locked: planned from its recorded counts (read
    now if none are), with a top-up's additions when asked (`top_up`), and its plan
    recorded for `status`. `spec` unchanged without a balance source."""
    if balance_source(spec) is None:
        return spec
    spec = await resolve_balance(spec, backend_root=backend_root, proxies=read_proxy_settings())
    if top_up:
        spec = await asyncio.to_thread(_top_up, spec)
    await asyncio.to_thread(record_plan, spec)
    return spec


def _top_up(spec: Spec) -> Spec:
    """The plan with each class's shortfall added and recorded."""
    added = shortfall(spec)
    if not added:
        log.info("top-up: no class is short of its target; nothing added")
        return spec
    log.info(
        "top-up: adding %s",
        ", ".join(f"{count} requests for {name}" for name, count in sorted(added.items())),
    )
    return add_top_up(spec, added)


def shortfall(spec: Spec) -> dict[str, int]:
    """The requests a top-up of the balance source would add per class (the manifest
    read whole: which outputs are usable, which planned items are not stored yet)."""
    source = balance_source(spec)
    if source is None or source.balance_plan is None:
        return {}
    records = read_all_records(spec.output_dir)
    planned = {
        draft.key: dict(zip(draft.shape.names, draft.combo, strict=True))[BALANCE_CLASS_VAR]
        for draft in iter_source_drafts(spec, source)
    }
    return shortfall_requests(spec, source, records, planned)


def with_top_up(spec: Spec, added: Mapping[str, int]) -> Spec:
    """`spec` planned as if `added` were recorded (``plan --top-up``: nothing written)."""
    source = balance_source(spec)
    record = None if source is None else read_balance(spec.output_dir).get(source.name)
    if source is None or record is None or not added:
        return spec
    return _with_plan(spec, source, _plan_of(spec, source, _plus(record, added)))


def _plus(record: BalanceRecord, added: Mapping[str, int]) -> BalanceRecord:
    total = dict(record.added)
    for name, more in added.items():
        total[name] = total.get(name, 0) + more
    return dataclasses.replace(record, added=total)


async def resolve_standalone(spec: Spec) -> Spec:
    """`resolve_balance` outside a run (``plan --resolve``), under OUT's lock, with the
    backend open for the embedded mock's root."""
    spec = apply_recorded(spec)
    if not unresolved_balance(spec):
        return spec
    async with standalone_backend(spec) as (backend, _key, _proxies):
        return await resolve_balance(
            spec, backend_root=backend.api_root, proxies=read_proxy_settings()
        )


# ------------------------------------------------------------------ progress and top-up


@dataclass(frozen=True, slots=True)
class ClassProgress:
    """Where one class stands: the project's recorded count, the target, the images
    planned for it, stored, and usable (stored and not flagged)."""

    count: int
    target: int
    planned: int
    stored: int
    usable: int

    def to_json(self) -> dict[str, int]:
        """``status --json``'s form."""
        return {
            "count": self.count,
            "target": self.target,
            "planned": self.planned,
            "stored": self.stored,
            "usable": self.usable,
        }


def _stored_by_class(source: str, records: Iterable[ItemRecord]) -> dict[str, tuple[int, int]]:
    """(stored, usable) images per class among the ok items of `source`."""
    out: dict[str, tuple[int, int]] = {}
    for record in records:
        name = record.vars.get(BALANCE_CLASS_VAR)
        if record.source != source or record.status != "ok" or name is None:
            continue
        stored, usable = out.get(name, (0, 0))
        out[name] = (
            stored + len(record.outputs),
            usable + sum(1 for output in record.outputs if not output.flags),
        )
    return out


def class_progress(
    source: str, record: BalanceRecord, records: Iterable[ItemRecord]
) -> dict[str, ClassProgress]:
    """Each class of the recorded plan (and every class stored for) with its progress;
    empty when the plan was never recorded (no run yet)."""
    if record.planned is None or record.target is None:
        return {}
    n = record.n or 1
    stored = _stored_by_class(source, records)
    names = sorted({*record.planned, *stored})
    return {
        name: ClassProgress(
            count=record.counts.get(name, 0),
            target=record.target,
            planned=record.planned.get(name, 0) * n,
            stored=stored.get(name, (0, 0))[0],
            usable=stored.get(name, (0, 0))[1],
        )
        for name in names
    }


def shortfall_requests(
    spec: Spec,
    source: SourceSpec,
    records: Mapping[str, ItemRecord],
    planned_keys: Mapping[str, str],
) -> dict[str, int]:
    """The requests a top-up adds per class: ``target - count - usable - still
    planned``, in requests of n images (capped by ``max_per_class``). `planned_keys`
    maps the key of each item the plan holds to its class."""
    settings = source.roboflow_balance
    record = read_balance(spec.output_dir).get(source.name)
    plan = source.balance_plan
    assert settings is not None
    if record is None or plan is None:
        return {}
    n = images_per_request(spec, source)
    usable = {
        name: pair[1] for name, pair in _stored_by_class(source.name, records.values()).items()
    }
    waiting: dict[str, int] = {}
    for key, name in planned_keys.items():
        item = records.get(key)
        if item is None or item.status != "ok":
            waiting[name] = waiting.get(name, 0) + n
    added: dict[str, int] = {}
    for name in plan:
        short = settings.target - record.counts.get(name, 0) - usable.get(name, 0)
        short -= waiting.get(name, 0)
        more = _capped(settings, plan[name] + math.ceil(max(0, short) / n), n) - plan[name]
        if more > 0:
            added[name] = more
    return added


def add_top_up(spec: Spec, added: Mapping[str, int]) -> Spec:
    """Record `added` (requests per class) on the balance source and plan with it."""
    source = balance_source(spec)
    assert source is not None
    record = read_balance(spec.output_dir).get(source.name)
    assert record is not None
    updated = _plus(record, added)
    _write_record(spec.output_dir, source.name, updated)
    return _with_plan(spec, source, _plan_of(spec, source, updated))
