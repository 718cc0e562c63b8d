"""Resolving ``roboflow_search`` sources: search once per OUT, record the ids, reuse them.

A search source's images are whatever the search answers, and a dataset changes between
nights. So the search runs once for an output folder and its ids are recorded in
``OUT/search.json`` with the query that found them; every later run (a resume) and
``plan`` read them back and work on the same images. A query that changed (the spec was
edited, or it searches another API) is searched again.

The resolved spec carries each search source's ids in its ``roboflow_ids``: items, keys,
counts and plans then treat them exactly as a ``roboflow_ids`` source's, and a resolved
source keeps its ``roboflow_search`` only to say where its ids came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .backends.base import Backend
from .credentials import DIRECT, ProxySettings, read_api_key, read_proxy_settings
from .jobspec.model import SourceSpec, Spec
from .retry import RetryPolicy
from .store import layout
from .store.layout import SEARCH_NAME
from .store.lock import acquire_lock

__all__ = [
    "SEARCH_FORMAT",
    "api_root",
    "apply_recorded",
    "resolve_searches",
    "resolve_standalone",
    "search_identity",
    "standalone_backend",
    "unresolved",
    "with_ids",
]

SEARCH_FORMAT = 1
"""Version of ``OUT/search.json``'s layout."""

log = logging.getLogger(__name__)


def unresolved(spec: Spec) -> list[SourceSpec]:
    """The search sources of `spec` that carry no ids yet."""
    return [s for s in spec.sources if s.roboflow_search is not None and s.roboflow_ids is None]


def search_identity(spec: Spec, source: SourceSpec) -> dict[str, Any]:
    """What makes two searches the same: backend kind, workspace, project, query,
    filters, limit.

    The kind tells the mock's seeded projects from Roboflow's; the API's URL is left out,
    so that a resume through another gateway (or the embedded mock's new port) works on
    the same images rather than searching again.
    """
    search = source.roboflow_search
    assert search is not None
    return {
        "backend": spec.backend.kind,
        "workspace": search.workspace,
        "project": search.project,
        **search.filters(),
        "limit": search.limit,
    }


def with_ids(spec: Spec, ids: Mapping[str, tuple[str, ...]]) -> Spec:
    """`spec` with the sources named in `ids` carrying those image ids."""
    sources = tuple(
        source.model_copy(update={"roboflow_ids": ids[source.name]})
        if source.name in ids
        else source
        for source in spec.sources
    )
    return spec.model_copy(update={"sources": sources})


def apply_recorded(spec: Spec) -> Spec:
    """`spec` with every search that OUT recorded for the same query resolved (no network)."""
    pending = unresolved(spec)
    if not pending:
        return spec
    recorded = _read_records(spec.output_dir)
    ids: dict[str, tuple[str, ...]] = {}
    for source in pending:
        record = recorded.get(source.name)
        if record is not None and record.get("query") == search_identity(spec, source):
            ids[source.name] = record["ids"]
    return with_ids(spec, ids) if ids else spec


async def resolve_searches(
    spec: Spec,
    *,
    root: str,
    api_key: str,
    proxies: ProxySettings = DIRECT,
) -> Spec:
    """`spec` with every search source resolved: from OUT's record, else by searching the
    API at `root` (and recording what it found).

    Raises `SpecError` for a search that finds nothing (an empty source), `FatalError`
    when the API refuses (key, workspace, project, query) or keeps failing.
    """
    spec = apply_recorded(spec)
    pending = unresolved(spec)
    if not pending:
        return spec
    from .backends.roboflow_search import RoboflowSearch  # aiohttp: only when searching

    found: dict[str, tuple[str, ...]] = {}
    client = RoboflowSearch(
        root,
        api_key,
        timeout_s=spec.backend.timeout_s,
        policy=RetryPolicy.from_run(spec.run),
        proxies=proxies,
    )
    async with client:
        for source in pending:
            search = source.roboflow_search
            assert search is not None
            result = await client.search(search)
            if not result.ids:
                index = spec.sources.index(source)
                raise spec.error(
                    f"sources[{index}].roboflow_search",
                    f"the search found no images in {search.workspace}/{search.project}: "
                    "check the query (and that the project's images are indexed)",
                )
            log.info(
                "source '%s': the search found %d images (%d requests)",
                source.name,
                len(result.ids),
                result.requests,
            )
            found[source.name] = result.ids
            record = {
                "query": search_identity(spec, source),
                "ids": list(result.ids),
                "total": result.total,
                "searched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            await asyncio.to_thread(_write_record, spec, source.name, record)
    return with_ids(spec, found)


async def resolve_standalone(spec: Spec) -> Spec:
    """`resolve_searches` outside a run (``plan --resolve``): opens the spec's backend
    for its API root (the embedded mock's, for kind mock) and closes it again.

    Holds OUT's lock while it searches and records, as a run does: a run that holds it
    raises `OutputError` (naming it) before anything is sent or written."""
    spec = apply_recorded(spec)
    if not unresolved(spec):
        return spec
    async with standalone_backend(spec) as (backend, api_key, proxies):
        return await resolve_searches(
            spec, root=api_root(spec, backend), api_key=api_key, proxies=proxies
        )


@contextlib.asynccontextmanager
async def standalone_backend(
    spec: Spec,
) -> AsyncIterator[tuple[Backend, str, ProxySettings]]:
    """The spec's backend (its key, its proxies) opened outside a run, with OUT's lock
    held: for what ``plan --resolve`` reads and records before a run (a run holding the
    lock makes it raise `OutputError`)."""
    kind = spec.backend.registered
    api_key = read_api_key(spec.backend)
    proxies = read_proxy_settings() if kind.proxied else DIRECT
    with await asyncio.to_thread(acquire_lock, spec.output_dir):
        async with kind.open_single(
            spec.backend.base_url, api_key, timeout_s=spec.backend.timeout_s, proxies=proxies
        ) as backend:
            yield backend, api_key, proxies


def api_root(spec: Spec, backend: Backend) -> str:
    """Where the Roboflow API is for this run: the open backend's root (the embedded
    mock's URL for kind mock), else the spec's ``base_url``."""
    return backend.api_root or spec.backend.base_url


def _read_records(out_dir: Path) -> dict[str, dict[str, Any]]:
    """OUT's recorded searches by source name; what is not a valid record is left out."""
    data = layout.read_json(out_dir / SEARCH_NAME) or {}
    sources = data.get("sources") if data.get("format") == SEARCH_FORMAT else None
    records: dict[str, dict[str, Any]] = {}
    for name, record in (sources if isinstance(sources, dict) else {}).items():
        ids = record.get("ids") if isinstance(record, dict) else None
        if isinstance(ids, list) and ids and all(isinstance(i, str) and i for i in ids):
            records[name] = {"query": record.get("query"), "ids": tuple(ids)}
    return records


def _write_record(spec: Spec, name: str, record: Mapping[str, Any]) -> None:
    """Record one source's search in OUT/search.json, keeping the current sources' others."""
    path = spec.output_dir / SEARCH_NAME
    data = layout.read_json(path) or {}
    sources = data.get("sources") if data.get("format") == SEARCH_FORMAT else None
    names = {source.name for source in spec.sources if source.roboflow_search is not None}
    kept = {k: v for k, v in (sources if isinstance(sources, dict) else {}).items() if k in names}
    kept[name] = dict(record)
    layout.write_json_atomic(path, {"format": SEARCH_FORMAT, "sources": kept})
