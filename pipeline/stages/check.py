"""The check stage: a perceptual hash of every stored image, and the flags it implies.

Local, no network. Each output gets its 64-bit pHash (`imagehash.phash`: a DCT of the
image shrunk to 32×32 grey, robust to re-encoding and small changes) as ``phash`` (16 hex
digits). An output within ``check.unchanged_distance`` bits of its own input's hash (a
model that answered with its input) is flagged ``unchanged``; one within
``check.duplicate_distance`` of an earlier output of this OUT ``duplicate``. Flags are
findings, never deletions: the item stays ok. Hashing decodes the image, so it runs in a
thread; earlier outputs are found again through a `HashIndex`, not by comparing all pairs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import imagehash
from PIL import Image

from ..jobspec.model import Spec
from ..jobspec.stage_settings import CheckSettings
from ..manifest.folded import read_all_records
from ..records import ItemRecord, OutputFile
from ..run.stages import StageContext
from ..store.layout import stored_image_path
from .hash_index import HashIndex, distance
from .remote import HALTED_BY

__all__ = ["CheckStage", "CheckStats", "image_hash", "open_stage"]

log = logging.getLogger(__name__)

CHECK_THREADS = 2  # hashing is CPU work in threads: as many as the machine's cores here


@dataclass(slots=True)
class CheckStats:
    """Counters of one run's checks, for the summary."""

    checked: int = 0  # outputs hashed this run
    unchanged: int = 0
    duplicate: int = 0
    skipped: int = 0  # items whose stored file was gone: the engine makes them again


def image_hash(path: Path) -> int | None:
    """The 64-bit pHash of the image at `path`; None when it cannot be read as an image."""
    try:
        with Image.open(path) as image:
            return int(str(imagehash.phash(image)), 16)
    except (OSError, ValueError):
        return None


class CheckStage:
    """Hashes the outputs of the records it is given; see the module docstring."""

    name = "check"
    halted_by = HALTED_BY
    concurrency = CHECK_THREADS
    failed = 0  # a check finds, it does not fail

    def __init__(self, settings: CheckSettings, *, context: StageContext, index: HashIndex) -> None:
        self._settings = settings
        self._out_dir = context.out_dir
        self._index = index
        self._inputs: dict[str, int | None] = {}  # input file -> its hash, once per run
        self.stats = CheckStats()

    def needs(self, record: ItemRecord) -> bool:
        """Whether some output of the ok `record` has no hash yet."""
        return record.status == "ok" and any(o.phash is None for o in record.outputs)

    def summary(self) -> dict[str, Any]:
        """The counters."""
        return asdict(self.stats)

    async def aclose(self) -> None:
        """Nothing to release."""

    async def process(self, record: ItemRecord, halted: Callable[[], bool]) -> ItemRecord | None:
        """The record with each output's hash and flags; None when a stored file is gone."""
        outputs = list(record.outputs)
        source_hash = await self._input_hash(record)
        changed = False
        for index, output in enumerate(outputs):
            if output.phash is not None or halted():
                continue
            path = stored_image_path(self._out_dir, output.path)
            value = None if path is None else await asyncio.to_thread(image_hash, path)
            if value is None:
                self.stats.skipped += 1
                log.info("%s: stored image gone or unreadable; not checked", record.key[:16])
                return None
            outputs[index] = self._checked(output, value, source_hash)
            changed = True
        return dataclasses.replace(record, outputs=tuple(outputs)) if changed else None

    def _checked(self, output: OutputFile, value: int, source_hash: int | None) -> OutputFile:
        flags = []
        if source_hash is not None and distance(value, source_hash) <= (
            self._settings.unchanged_distance
        ):
            flags.append("unchanged")
            self.stats.unchanged += 1
        if self._index.near(value, other_than=output.path) is not None:
            flags.append("duplicate")
            self.stats.duplicate += 1
        self._index.add(value, output.path)
        self.stats.checked += 1
        return dataclasses.replace(output, phash=f"{value:016x}", flags=tuple(flags))

    async def _input_hash(self, record: ItemRecord) -> int | None:
        """The hash of the item's input image when it is a local file (read once a run);
        None without one (a Roboflow id or a URL is not fetched again just for this)."""
        source = record.input
        if source is None or source.kind != "file":
            return None
        if source.value not in self._inputs:
            self._inputs[source.value] = await asyncio.to_thread(image_hash, Path(source.value))
        return self._inputs[source.value]


def _recorded_index(out_dir: Path, max_distance: int) -> HashIndex:
    """An index of the hashes this OUT's manifest already records (the earlier outputs)."""
    index = HashIndex(max_distance)
    for record in read_all_records(out_dir).values():
        if record.status != "ok":
            continue
        for output in record.outputs:
            if output.phash is not None:
                index.add(int(output.phash, 16), output.path)
    return index


async def open_stage(spec: Spec, _api_key: str, context: StageContext) -> CheckStage:
    """The check stage of `spec`'s ``check:`` block, its index primed with this OUT's
    recorded hashes (read in a thread)."""
    settings = spec.check
    assert settings is not None
    index = await asyncio.to_thread(_recorded_index, context.out_dir, settings.duplicate_distance)
    return CheckStage(settings, context=context, index=index)
