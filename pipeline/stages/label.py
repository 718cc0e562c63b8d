"""The label stage: every stored image sent to a hosted detection model, exactly once.

For each output without labels, the stored image is read back (only if it is still what
the manifest recorded) and sent to ``label.model`` (`RoboflowDetectClient`); the answer's
predictions, those of ``label.classes`` when given, are kept on the output as ``labels``
(`LabelRecord`: ``{"model", "predictions"}``). With ``label.require_detection`` an
output with none kept is flagged ``no_detection``; an output of a ``roboflow_balance``
item whose kept predictions lack the class it was made for, ``missing_class``: findings,
not failures.

Detection costs a request, so it is recorded like a generation: the line with the labels
is appended as soon as the item's outputs are labelled, and a resume asks only for
outputs without them. A detection that fails for good is recorded as
``{"model", "error"}`` (exit 1) and asked again by the next run; a refused key or an
unknown model stops the run (exit 3). Pace, concurrency and retries are the stage's own
(``label.concurrency``, ``label.rate_limit``, ``label.max_attempts``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from ..credentials import labels_from_backend
from ..errors import BackendError
from ..jobspec.model import BALANCE_CLASS_VAR, Spec
from ..jobspec.stage_settings import DEFAULT_DETECT_URL, DEFAULT_LABEL_RATE, LabelSettings
from ..records import ErrorInfo, ItemRecord, LabelRecord, OutputFile, Prediction
from ..run.stages import StageContext
from .remote import HALTED_BY, RemoteCalls, StageEndpoint, Stopped, read_stored

__all__ = ["MISSING_CLASS", "NO_DETECTION", "Detector", "LabelStage", "LabelStats", "open_stage"]

log = logging.getLogger(__name__)

NO_DETECTION = "no_detection"
MISSING_CLASS = "missing_class"


class Detector(Protocol):
    """What labelling needs from a client (`RoboflowDetectClient`, or a test's fake)."""

    async def detect(self, data: bytes) -> tuple[Prediction, ...]:
        """The predictions for an image; raises a `BackendError` subclass on failure."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


@dataclass(slots=True)
class LabelStats:
    """Counters of one run's detections, for the summary and the exit code."""

    labelled: int = 0  # outputs labelled this run
    predictions: int = 0  # predictions kept
    no_detection: int = 0  # outputs flagged no_detection
    missing_class: int = 0  # balance outputs without the class they were made for
    failed: int = 0  # outputs whose detection failed for good this run (recorded)
    skipped: int = 0  # items whose file was gone or changed: the engine makes them again


class LabelStage:
    """Labels the outputs of the records it is given; see the module docstring."""

    name = "label"
    halted_by = HALTED_BY

    def __init__(
        self,
        settings: LabelSettings,
        *,
        client: Detector,
        calls: RemoteCalls,
        context: StageContext,
        balance_source: str | None = None,
    ) -> None:
        self._settings = settings
        self._balance_source = balance_source  # its items must show their vars' class
        self._client = client
        self._calls = calls
        self._out_dir = context.out_dir
        self._classes = None if settings.classes is None else frozenset(settings.classes)
        self.concurrency = settings.concurrency
        self.stats = LabelStats()

    @property
    def failed(self) -> int:
        """Outputs whose detection failed for good this run."""
        return self.stats.failed

    def needs(self, record: ItemRecord) -> bool:
        """Whether some output of the ok `record` has no labels yet."""
        return record.status == "ok" and any(_unlabelled(o) for o in record.outputs)

    def summary(self) -> dict[str, Any]:
        """The model and the counters."""
        return {"model": self._settings.model, **asdict(self.stats), **asdict(self._calls.counts)}

    async def aclose(self) -> None:
        """Release the client's connections."""
        await self._client.aclose()

    async def process(self, record: ItemRecord, halted: Callable[[], bool]) -> ItemRecord | None:
        """The record with each output's labels (also when stopped part way: what was
        asked is kept); None when nothing new was found."""
        outputs = list(record.outputs)
        changed = False
        try:
            for index, output in enumerate(outputs):
                if not _unlabelled(output):
                    continue
                data = await asyncio.to_thread(read_stored, self._out_dir, output)
                if data is None:
                    self.stats.skipped += 1
                    log.info("%s: stored image gone or changed; not labelled", record.key[:16])
                    return None
                outputs[index] = await self._label(output, data, halted, self._made_for(record))
                changed = True
        except Stopped:
            pass
        return dataclasses.replace(record, outputs=tuple(outputs)) if changed else None

    def _made_for(self, record: ItemRecord) -> str | None:
        """The class a balance item was made to show; None for other items."""
        if self._balance_source is None or record.source != self._balance_source:
            return None
        return record.vars.get(BALANCE_CLASS_VAR)

    async def _label(
        self,
        output: OutputFile,
        data: bytes,
        halted: Callable[[], bool],
        made_for: str | None,
    ) -> OutputFile:
        """`output` with its labels (or the error that kept it from them), flagged when
        it shows nothing, or not the class it was `made_for`. Raises `Stopped`."""
        model = self._settings.model
        try:
            found = await self._calls.call(lambda: self._client.detect(data), halted)
        except BackendError as exc:
            self.stats.failed += 1
            error = ErrorInfo(exc.kind, exc.status, exc.message)
            return dataclasses.replace(output, labels=LabelRecord(model, error=error))
        kept = tuple(p for p in found if self._classes is None or p.class_name in self._classes)
        self.stats.labelled += 1
        self.stats.predictions += len(kept)
        labelled = dataclasses.replace(output, labels=LabelRecord(model, kept))
        if not kept and self._settings.require_detection:
            self.stats.no_detection += 1
            labelled = labelled.flagged_with(NO_DETECTION)
        if made_for is not None and all(p.class_name != made_for for p in kept):
            self.stats.missing_class += 1
            labelled = labelled.flagged_with(MISSING_CLASS)
        return labelled


def _unlabelled(output: OutputFile) -> bool:
    return output.labels is None or not output.labels.done


def _client_class() -> type[Detector]:
    """The detection client (its module, aiohttp's, takes about 100 ms to import)."""
    from ..backends.roboflow_detect import RoboflowDetectClient

    return RoboflowDetectClient


async def open_stage(spec: Spec, api_key: str, context: StageContext) -> LabelStage:
    """The label stage of `spec`'s ``label:`` block: to the embedded mock when the
    backend kind serves it and no api_url is set, else to ``label.api_url`` (default
    Roboflow's hosted inference)."""
    settings = spec.label
    assert settings is not None
    endpoint = StageEndpoint.of(
        "label",
        url=settings.api_url,
        embedded=labels_from_backend(settings, spec.backend),
        context=context,
        default_url=DEFAULT_DETECT_URL,
        rate=settings.rate_limit,
        default_rate=DEFAULT_LABEL_RATE,
    )
    client_class: Any = await asyncio.to_thread(_client_class)
    client = client_class(
        endpoint.root,
        api_key,
        model=settings.model,
        confidence=settings.confidence,
        overlap=settings.overlap,
        concurrency=settings.concurrency,
        timeout_s=spec.backend.timeout_s,
        proxies=endpoint.proxies,
    )
    calls = RemoteCalls.for_stage(
        "label",
        spec.run,
        max_attempts=settings.max_attempts,
        rate=endpoint.rate,
        concurrency=settings.concurrency,
        stop=context.stop,
    )
    balance = next((s.name for s in spec.sources if s.roboflow_balance is not None), None)
    return LabelStage(settings, client=client, calls=calls, context=context, balance_source=balance)
