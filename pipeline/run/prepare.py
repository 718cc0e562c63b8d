"""Preparing a run: everything between a validated spec and the first request.

Order matters, because every image costs money: the keys are read and OUT is checked and
locked before anything is sent; the manifest is read for resume and its key scheme
checked; the backend is opened and, where the kind can say, asked about the spec's
models; searches are resolved; the items are counted once (the `max_items` guard, the
progress total and ``job.json`` all use that count); ``job.json`` records the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import balance, model_check, search
from .. import items as items_mod
from ..backends.base import Backend
from ..credentials import (
    DIRECT,
    ProxySettings,
    read_api_key,
    read_proxy_settings,
)
from ..errors import OutputError, UsageError
from ..job_record import JobRecord
from ..jobspec.model import Spec
from ..limiter import LearnedPace, learned_pace
from ..manifest.cache import StateCache
from ..manifest.folded import carry_over
from ..manifest.log import ManifestState, gc_paused
from ..pricing import check_cost_budget
from ..shard import Shard
from ..sources import HashCache
from ..store import files as outputs
from ..store import layout
from ..store.lock import acquire_lock, overlapping_holders
from .batch import BatchWatch, batch_options
from .stages import read_stage_keys

if TYPE_CHECKING:
    from ..backends.openai_batch import BatchOptions

__all__ = [
    "Prepared",
    "check_key_scheme",
    "prepare",
    "read_learned_pace",
    "recorded_key_scheme",
    "write_job_json",
]

log = logging.getLogger("pipeline.runner")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A run ready to start: OUT locked, its state loaded, the backend open."""

    spec: Spec  # its searches resolved
    counts: Mapping[str, int]  # items per source, counted once
    state: ManifestState
    cache: StateCache
    files: outputs.StoredFiles
    backend: Backend
    stage_keys: Mapping[str, str]  # each stage's API key (read before anything is sent)
    watch: BatchWatch  # batch mode: where its batches stand
    manifest: Path  # the one this run appends to: manifest.jsonl, or its shard's own
    shard: Shard | None = None
    owned: int | None = None  # a shard's items (None: every item is the run's)

    @property
    def expected(self) -> int:
        """Items this run is responsible for: the job's, or its shard's."""
        return sum(self.counts.values()) if self.owned is None else self.owned

    def drafts(self, hashes: HashCache) -> Iterator[items_mod.ItemDraft]:
        """The run's item drafts: every item of the job, or its shard's."""
        drafts = items_mod.expand_drafts(self.spec, hashes=hashes)
        shard = self.shard
        return drafts if shard is None else (d for d in drafts if shard.owns(d.key))


def check_spec(spec: Spec, *, wait: bool) -> Spec:
    """What can be refused before OUT is touched: `--no-wait` without batches, the
    budget without prices, `max_items`; the ids this OUT's searches already found."""
    if not wait and spec.backend.mode != "batch":
        raise UsageError("--no-wait needs backend.mode: batch (an online run cannot leave)")
    if not wait and spec.backend.registered.in_process:
        raise UsageError(
            "--no-wait cannot leave batches with the embedded mock (it stops with the run): "
            "rehearse with `synthaug mock-server` and backend.kind openai pointed at it"
        )
    spec = search.apply_recorded(spec)  # roboflow_search: ids this OUT already found
    spec = balance.apply_recorded(spec)  # roboflow_balance: counts this OUT already read
    check_cost_budget(spec)
    for warning in spec.model_warnings():
        log.warning("%s", warning)
    return spec


@contextlib.asynccontextmanager
async def prepare(
    spec: Spec,
    *,
    spec_path: Path,
    backend: Backend | None = None,
    verify: bool = False,
    wait: bool = True,
    freeze_gc: bool = False,
    top_up: bool = False,
    shard: Shard | None = None,
    listing: Mapping[str, int] | None = None,
) -> AsyncIterator[Prepared]:
    """Hold OUT's lock and the open backend while the body runs; see the module docstring.

    `freeze_gc` (the CLI's) pauses the process's GC while the manifest loads and freezes
    the loaded state until the run ends. `top_up` adds to a balance source's recorded
    plan what its classes are still short of (``run --top-up``). With `shard` the run
    holds the shard's lock, appends to its manifest, and owns only its items. With
    `listing` (an OUT on object storage: the bucket's images by path, with their sizes)
    the resume check takes the images from it, not from the staging folder.
    """
    spec = check_spec(spec, wait=wait)
    if verify and listing is not None:
        raise UsageError(
            "--verify re-reads every stored image, and an OUT on object storage keeps them "
            "in the bucket: verify a local copy of it instead"
        )
    if top_up and balance.balance_source(spec) is None:
        raise UsageError("--top-up needs a roboflow_balance source in the spec")
    unresolved = search.unresolved(spec) or balance.unresolved_balance(spec)
    counts = None if unresolved else items_mod.count_items(spec)
    if counts is not None:  # else counted once the searches have found their ids
        items_mod.check_max_items(spec, counts)
    kind = spec.backend.registered
    api_key = read_api_key(spec.backend, shard=shard)
    stage_keys = read_stage_keys(spec)  # fails before anything is sent
    watch = BatchWatch()
    options = batch_options(spec, wait, watch) if spec.backend.mode == "batch" else None
    # the embedded mock is on loopback in this process: a corporate proxy must not see it
    proxies = read_proxy_settings() if kind.proxied else DIRECT
    out = spec.output_dir
    await asyncio.to_thread(outputs.check_writable, out)
    with acquire_lock(out, name=layout.lock_name(shard)):
        check_overlap(out, shard)
        files = outputs.StoredFiles(out) if listing is None else outputs.ListedFiles(out, listing)
        if not _others_running(out, shard):  # a sibling shard's temp files are in use
            swept = await asyncio.to_thread(files.sweep_temp_files)
            if swept:
                log.info("removed %d half-written temp files left by a killed run", swept)
        manifest = out / layout.manifest_name(shard)
        await asyncio.to_thread(_carry_over, spec, manifest, shard)
        cache = StateCache(manifest)
        with _gc_spares_state(freeze_gc):
            state = await asyncio.to_thread(_load_state, cache, verify, freeze_gc)
            await asyncio.to_thread(check_key_scheme, out, state)
            async with _open_backend(spec, api_key, backend, proxies, options) as live_backend:
                # the API's word on the spec's models, before anything is spent
                await model_check.check_models(spec, live_backend)
                if counts is None:
                    spec = await _resolve_searches(spec, live_backend, api_key, proxies)
                spec = await balance.settle(spec, backend_root=live_backend.api_root, top_up=top_up)
                if counts is None or top_up:
                    counts = items_mod.count_items(spec)
                    items_mod.check_max_items(spec, counts)
                await asyncio.to_thread(write_job_json, spec, spec_path, counts)
                owned = None if shard is None else await asyncio.to_thread(_owned, spec, shard)
                yield Prepared(
                    spec,
                    counts,
                    state,
                    cache,
                    files,
                    live_backend,
                    stage_keys,
                    watch,
                    manifest=manifest,
                    shard=shard,
                    owned=owned,
                )


def check_overlap(out: Path, shard: Shard | None) -> None:
    """Refuse (`OutputError`, exit 2) while a run that overlaps this one holds its lock:
    for a shard, a run of every item or a shard of another N; for a run of every item,
    any shard. The shards of one N run side by side."""
    own = layout.lock_name(shard)
    names = [name for name in layout.lock_files(out) if name != own]
    if shard is not None:
        same_n = re.compile(rf"\.synthaug\.shard-\d+-of-{shard.count}\.lock")
        names = [name for name in names if not same_n.fullmatch(name)]
    held = overlapping_holders(out, names)
    if held:
        name, holder = held[0]
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
        mine = "this shard" if shard is not None else "a run of every item"
        raise OutputError(
            f"{out} is in use by a run that overlaps {mine} ({name}, {who}): wait for it "
            "or stop it (the shards of one N may run together)"
        )


def _others_running(out: Path, shard: Shard | None) -> bool:
    """Whether another run (a sibling shard) holds a lock on `out` now."""
    own = layout.lock_name(shard)
    return bool(overlapping_holders(out, [n for n in layout.lock_files(out) if n != own]))


def _carry_over(spec: Spec, manifest: Path, shard: Shard | None) -> None:
    """Start the run's manifest from what OUT's other manifests know of its items."""
    owns = (lambda _key: True) if shard is None else shard.owns
    carried = carry_over(
        manifest, spec.output_dir, owns, fsync_interval_s=spec.run.fsync_interval_s
    )
    if carried:
        log.info(
            "%d items recorded by other runs' manifests carried into %s", carried, manifest.name
        )


def _owned(spec: Spec, shard: Shard) -> int:
    """The shard's items (every key of the job expanded once)."""
    return sum(1 for draft in items_mod.expand_drafts(spec) if shard.owns(draft.key))


async def _resolve_searches(
    spec: Spec, backend: Backend, api_key: str, proxies: ProxySettings
) -> Spec:
    """roboflow_search sources resolved (`pipeline.search`) against the open backend's
    API root."""
    root = search.api_root(spec, backend)
    return await search.resolve_searches(spec, root=root, api_key=api_key, proxies=proxies)


def read_learned_pace(spec: Spec, shard: Shard | None = None) -> LearnedPace | None:
    """The pace the last run on this OUT learned from 429s (its summary.json), if any.

    A nightly job pays for learning the API's real limit once. A missing or corrupt
    summary, or one written for another backend, starts from the spec's rate; the
    limiter never goes above the spec's rate, even if it changed since.
    """
    data = layout.read_json(spec.output_dir / layout.summary_name(shard))
    if data is None or data.get("backend") != spec.backend.kind:
        return None
    return learned_pace(data.get("limiter"))


def _load_state(cache: StateCache, verify: bool, freeze: bool) -> ManifestState:
    """Load the state; with `freeze`, with the cyclic GC off and then frozen before it comes
    back: a million tuples that never form cycles, which every collection would walk again.
    Pausing and freezing are process-wide (another thread of a library caller would lose
    its GC meanwhile), so only the CLI, which owns its process, asks for them."""
    if not freeze:
        return cache.load(with_hashes=verify)
    with gc_paused():
        state = cache.load(with_hashes=verify)
        gc.freeze()
    return state


@contextlib.contextmanager
def _gc_spares_state(frozen: bool) -> Iterator[None]:
    """Give objects frozen by `_load_state` back to the GC when the run is over."""
    try:
        yield
    finally:
        if frozen:
            gc.unfreeze()


def check_key_scheme(out_dir: Path, state: ManifestState) -> None:
    """Refuse an OUT whose manifest was keyed by another scheme (see `items.KEY_SCHEME`).

    Its keys would match nothing this version computes, so a run would quietly pay for
    every item again. An OUT without a recorded scheme but with manifest lines was
    written by synthaug 0.1 (scheme 1).
    """
    if not len(state):
        return
    found = recorded_key_scheme(out_dir)
    if found == items_mod.KEY_SCHEME:
        return
    if found > items_mod.KEY_SCHEME:
        raise OutputError(
            f"{out_dir} was written by a newer synthaug (key scheme {found}; this one uses "
            f"{items_mod.KEY_SCHEME}): upgrade synthaug (pip install -U synthaug) to resume it"
        )
    raise OutputError(
        f"{out_dir} holds a manifest of key scheme {found} (synthaug 0.1, whose requests "
        f"always carried model dall-e-3): this synthaug computes other keys (scheme "
        f"{items_mod.KEY_SCHEME}) and would pay for every item again; point output_dir "
        "(or --out) at a new folder"
    )


def recorded_key_scheme(out_dir: Path) -> int:
    """The key scheme OUT/job.json records; 1 when it records none (synthaug 0.1)."""
    job = layout.read_job(out_dir)
    return 1 if job is None else job.key_scheme


def write_job_json(spec: Spec, spec_path: Path, counts: Mapping[str, int]) -> None:
    """Record in OUT what the job is: its sources, their item counts, the key scheme."""
    job = JobRecord(
        name=spec.name,
        spec=spec_path.name,  # OUT is shared: no home folder in it
        backend=spec.backend.kind,
        key_scheme=items_mod.KEY_SCHEME,
        host=socket.gethostname(),
        sources=tuple(items_mod.describe_sources(spec, counts)),
    )
    layout.write_job(spec.output_dir, job)


@contextlib.asynccontextmanager
async def _open_backend(
    spec: Spec,
    api_key: str,
    given: Backend | None,
    proxies: ProxySettings,
    batch: BatchOptions | None = None,
) -> AsyncIterator[Backend]:
    """The backend of the spec's kind, as the registry names it (or `given`, for tests);
    with `batch` options, the kind's Batch API client."""
    if given is not None:
        yield given
        return
    kind = spec.backend.registered
    # its first import (aiohttp's) takes about 100 ms: in a thread, not holding the loop
    backend_class = await asyncio.to_thread(
        partial(kind.open_backend_class, batch=batch is not None)
    )
    extra: dict[str, Any] = {"batch": batch} if batch is not None else {}
    async with backend_class(
        spec.backend.base_url,
        api_key,
        concurrency=spec.run.concurrency,
        timeout_s=spec.backend.timeout_s,
        proxies=proxies,
        **extra,
    ) as backend:
        yield backend
