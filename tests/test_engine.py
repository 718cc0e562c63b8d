"""The engine driven directly: an in-process fake backend, the real manifest and files,
virtual time (backoff and grace periods take no real time)."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import run_virtual
from PIL import Image

from pipeline.errors import FatalError, PermanentError, RateLimitedError, TransientError
from pipeline.items import expand_drafts
from pipeline.jobspec.load import spec_from_data
from pipeline.jobspec.model import Spec
from pipeline.limiter import Limiter
from pipeline.manifest.log import ManifestState, load_state, read_latest, read_lines
from pipeline.manifest.writer import ManifestWriter
from pipeline.records import GeneratedImage, Generation, WorkItem
from pipeline.run.engine import Engine
from pipeline.store.files import StoredFiles


def png(text: str) -> bytes:
    """A small valid PNG whose colour depends on `text`."""
    shade = sum(text.encode()) % 256
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 255 - shade, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class FakeBackend:
    """An in-process image API implementing the backend protocol.

    Answers every request with `n` tiny PNGs after `hold_s` (virtual) seconds, unless
    `script` holds errors for the item's prompt: those are raised first, one per request.
    """

    script: dict[str, list[BaseException]] = field(default_factory=dict)
    hold_s: float = 0.0
    prompts: list[str] = field(default_factory=list)  # one per request, in start order
    in_flight: int = 0
    peak: int = 0

    async def generate(self, item: WorkItem, image: str | None) -> Generation:
        self.prompts.append(item.prompt)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.hold_s:
                await asyncio.sleep(self.hold_s)
            errors = self.script.get(item.prompt)
            if errors:
                raise errors.pop(0)
            images = tuple(GeneratedImage(data=png(f"{item.prompt}/{i}")) for i in range(item.n))
            return Generation(images=images, response={"data": [{"b64_json": "…"}] * item.n})
        finally:
            self.in_flight -= 1

    async def download(self, image: GeneratedImage) -> bytes:
        assert image.data is not None
        return image.data

    async def aclose(self) -> None:
        return None


def make_spec(tmp_path: Path, prompts: int = 4, **run: Any) -> Spec:
    """A prompt-only job of `prompts` items ("p0", "p1", ...) with fast, tiny settings."""
    return spec_from_data(
        {
            "version": 1,
            "name": "engine",
            "backend": {"kind": "mock"},
            "output_dir": "out",
            "run": {"concurrency": 2, "max_attempts": 4, "backoff_base_s": 30.0, **run},
            "sources": [
                {"name": "s", "prompt": "p{i}", "vars": {"i": [str(i) for i in range(prompts)]}}
            ],
        },
        base_dir=tmp_path,
    )


@dataclass
class Outcome:
    """What one engine run did."""

    engine: Engine
    lines: list[dict[str, Any]]
    elapsed_virtual_s: float

    @property
    def latest(self) -> dict[str, dict[str, Any]]:
        """Last manifest line per prompt."""
        return {line["prompt"]: line for line in self.lines}


async def drive(
    spec: Spec,
    backend: FakeBackend,
    *,
    state: ManifestState | None = None,
    stop_when_ok: int | None = None,
    items: Iterable[Any] | None = None,
) -> Outcome:
    """Run the engine of `spec` over `backend` to the end (or to a stop after N ok)."""
    loop = asyncio.get_running_loop()
    out = spec.output_dir
    engine_box: list[Engine] = []

    def progress(stats: Any) -> None:
        if stop_when_ok is not None and stats.ok >= stop_when_ok and engine_box:
            engine_box[0].stop("sigint")

    with ManifestWriter(out / "manifest.jsonl") as writer:
        engine = Engine(
            spec.run,
            out_dir=out,
            items=items if items is not None else expand_drafts(spec),
            backend=backend,
            limiter=Limiter(rate=None, image_rate=None, concurrency=spec.run.concurrency),
            state=state or ManifestState(),
            writer=writer,
            files=StoredFiles(out),
            on_progress=progress,
            clock=loop.time,
            rng=random.Random(0),
        )
        engine_box.append(engine)
        start = loop.time()
        await engine.run()
    return Outcome(engine, list(read_lines(out / "manifest.jsonl")), loop.time() - start)


def test_every_item_is_stored_and_checkpointed(tmp_path: Path) -> None:
    """Each item is one request, one stored image and one ok line naming it."""
    spec = make_spec(tmp_path, prompts=5)
    backend = FakeBackend()
    outcome = run_virtual(drive(spec, backend))
    assert sorted(backend.prompts) == [f"p{i}" for i in range(5)]
    assert [line["status"] for line in outcome.lines] == ["ok"] * 5
    for line in outcome.lines:
        (output,) = line["outputs"]
        assert (spec.output_dir / output["path"]).read_bytes() == png(f"{line['prompt']}/0")
    stats = outcome.engine.stats
    assert (stats.ok, stats.failed, stats.requests, stats.images) == (5, 0, 5, 5)
    assert outcome.engine.stop_reason is None


def test_concurrency_caps_requests_in_flight(tmp_path: Path) -> None:
    """Never more requests in flight than run.concurrency."""
    backend = FakeBackend(hold_s=1.0)
    run_virtual(drive(make_spec(tmp_path, prompts=9, concurrency=3), backend))
    assert backend.peak == 3


def test_transient_errors_are_retried_with_backoff_in_virtual_time(tmp_path: Path) -> None:
    """Two 503s then success: three attempts, two retries, backoff waited (virtually)."""
    spec = make_spec(tmp_path, prompts=1)
    errors: list[BaseException] = [
        TransientError("503", kind="http_status", status=503) for _ in range(2)
    ]
    outcome = run_virtual(drive(spec, FakeBackend(script={"p0": errors})))
    line = outcome.latest["p0"]
    assert (line["status"], line["attempts"]) == ("ok", 3)
    assert outcome.engine.stats.retries == 2
    assert outcome.elapsed_virtual_s > 0  # the waits happened, on the virtual clock


def test_an_item_fails_for_good_after_max_attempts(tmp_path: Path) -> None:
    """A transient error that never clears is recorded failed after max_attempts tries."""
    spec = make_spec(tmp_path, prompts=2, max_attempts=3)
    errors: list[BaseException] = [TransientError("timeout", kind="timeout") for _ in range(9)]
    outcome = run_virtual(drive(spec, FakeBackend(script={"p1": errors})))
    failed = outcome.latest["p1"]
    assert (failed["status"], failed["attempts"], failed["error"]["kind"]) == (
        "failed",
        3,
        "timeout",
    )
    assert outcome.latest["p0"]["status"] == "ok"
    assert outcome.engine.stats.errors == {"timeout": 1}


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        pytest.param(
            PermanentError("400", kind="http_status", status=400), "http_status", id="4xx"
        ),
        pytest.param(PermanentError("policy", kind="refused", status=400), "refused", id="refused"),
    ],
)
def test_permanent_errors_fail_once_without_retry(
    tmp_path: Path, error: PermanentError, kind: str
) -> None:
    """A 4xx or a refusal is one request and one failed line."""
    backend = FakeBackend(script={"p0": [error]})
    outcome = run_virtual(drive(make_spec(tmp_path, prompts=3), backend))
    assert backend.prompts.count("p0") == 1
    assert (outcome.latest["p0"]["status"], outcome.latest["p0"]["error"]["kind"]) == (
        "failed",
        kind,
    )
    assert outcome.engine.stats.ok == 2


def test_a_fatal_answer_stops_the_run(tmp_path: Path) -> None:
    """A 401 stops everything: no new starts, the reason and error are kept."""
    spec = make_spec(tmp_path, prompts=20, concurrency=2)
    fatal = FatalError("401 bad key", kind="http_status", status=401)
    backend = FakeBackend(script={"p0": [fatal]}, hold_s=0.5)
    outcome = run_virtual(drive(spec, backend))
    assert outcome.engine.stop_reason == "fatal"
    assert outcome.engine.fatal_error is fatal
    assert len(backend.prompts) <= 3  # the fatal one and what was already in flight


def test_consecutive_failures_abort_the_run(tmp_path: Path) -> None:
    """max_consecutive_failures items failing in a row stop the run as aborted."""
    script: dict[str, list[BaseException]] = {
        f"p{i}": [TransientError("bad", kind="bad_response")] for i in range(30)
    }
    spec = make_spec(
        tmp_path, prompts=30, concurrency=1, max_consecutive_failures=3, max_attempts=1
    )
    outcome = run_virtual(drive(spec, FakeBackend(script=script)))
    assert outcome.engine.stop_reason == "aborted"
    assert outcome.engine.stats.failed == 3


def test_refusals_do_not_count_as_consecutive_failures(tmp_path: Path) -> None:
    """Content refusals are about one prompt, not the API's health: no abort."""
    script: dict[str, list[BaseException]] = {
        f"p{i}": [PermanentError("policy", kind="refused", status=400)] for i in range(6)
    }
    spec = make_spec(tmp_path, prompts=6, concurrency=1, max_consecutive_failures=2)
    outcome = run_virtual(drive(spec, FakeBackend(script=script)))
    assert outcome.engine.stop_reason is None
    assert outcome.engine.stats.failed == 6


def test_max_images_budget_stops_at_exactly_the_cap(tmp_path: Path) -> None:
    """With max_images 3, three images are made and the run stops as 'budget'."""
    outcome = run_virtual(drive(make_spec(tmp_path, prompts=10, max_images=3), FakeBackend()))
    assert outcome.engine.stop_reason == "budget"
    assert (outcome.engine.stats.ok, outcome.engine.stats.images) == (3, 3)


def test_a_429_is_retried_and_counted(tmp_path: Path) -> None:
    """A 429 pauses and retries the item; the run still ends all ok."""
    backend = FakeBackend(script={"p1": [RateLimitedError("429", retry_after=5.0)]})
    outcome = run_virtual(drive(make_spec(tmp_path, prompts=3), backend))
    assert outcome.engine.stats.rate_limited == 1
    assert outcome.latest["p1"]["status"] == "ok"
    assert outcome.elapsed_virtual_s >= 5.0  # the Retry-After was honoured


def test_resume_skips_items_already_ok(tmp_path: Path) -> None:
    """A second engine over the same OUT sends only what the first did not finish."""
    spec = make_spec(tmp_path, prompts=6, concurrency=1)
    first = run_virtual(drive(spec, FakeBackend(), stop_when_ok=2))
    assert first.engine.stop_reason == "sigint"
    done = {line["prompt"] for line in first.lines if line["status"] == "ok"}
    assert 2 <= len(done) < 6
    state = load_state(spec.output_dir / "manifest.jsonl")
    backend = FakeBackend()
    second = run_virtual(drive(spec, backend, state=state))
    assert sorted(backend.prompts) == sorted({f"p{i}" for i in range(6)} - done)
    assert second.engine.stats.skipped_ok == len(done)
    latest = read_latest(spec.output_dir / "manifest.jsonl")
    assert [r["status"] for r in latest.values()] == ["ok"] * 6


def test_a_stop_lets_in_flight_items_finish_within_the_grace_period(tmp_path: Path) -> None:
    """After a stop, requests already sent complete and are checkpointed; no new ones start."""
    spec = make_spec(tmp_path, prompts=10, concurrency=2, grace_period_s=60)
    backend = FakeBackend(hold_s=10.0)
    outcome = run_virtual(drive(spec, backend, stop_when_ok=1))
    started, finished = len(backend.prompts), outcome.engine.stats.ok
    assert finished == started  # nothing sent was abandoned
    assert started < 10
