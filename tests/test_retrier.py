"""The engine's `Retrier`: the same retries, waits and reports as the tenacity loop, per item."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import pytest

from pipeline.errors import (
    BackendError,
    FatalError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from pipeline.retry import Retrier, RetryPolicy, retrying


def transient(*, ambiguous: bool = False) -> TransientError:
    return TransientError("503 from the API", kind="http_status", status=503, ambiguous=ambiguous)


@dataclass
class Trace:
    """What one run of a retry loop did: tries, waits, reports and how it ended."""

    attempts: int = 0
    sleeps: list[float] = field(default_factory=list)
    retries: list[tuple[BackendError, int, float]] = field(default_factory=list)
    outcome: object = None

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)

    def on_retry(self, exc: BackendError, attempt: int, wait: float) -> None:
        self.retries.append((exc, attempt, wait))


async def _one_try(trace: Trace, failures: list[BaseException]) -> str:
    trace.attempts += 1
    if failures:
        raise failures.pop(0)
    return f"generated after {trace.attempts}"


async def _with_retrier(policy: RetryPolicy, failures: list[BaseException]) -> Trace:
    trace = Trace()
    retrier = Retrier(policy, sleep=trace.sleep, rng=random.Random(7), on_retry=trace.on_retry)
    try:
        trace.outcome = await retrier.call(lambda: _one_try(trace, failures))
    except BaseException as exc:  # the error itself is what is compared
        trace.outcome = exc
    return trace


async def _with_tenacity_loop(policy: RetryPolicy, failures: list[BaseException]) -> Trace:
    trace = Trace()
    loop = retrying(policy, sleep=trace.sleep, rng=random.Random(7), on_retry=trace.on_retry)
    try:
        async for attempt in loop:
            with attempt:
                trace.outcome = await _one_try(trace, failures)
    except BaseException as exc:
        trace.outcome = exc
    return trace


ERRORS: dict[str, BaseException] = {
    "transient": transient(),
    "ambiguous": transient(ambiguous=True),
    "429": RateLimitedError("429", retry_after=3.0),
    "4xx": PermanentError("400", kind="http_status", status=400),
    "fatal": FatalError("403", kind="http_status", status=403),
    "bug": ValueError("bug"),
    "cancelled": asyncio.CancelledError(),
}


@pytest.mark.parametrize(
    ("script", "policy"),
    [
        pytest.param([], RetryPolicy(), id="first-try-succeeds"),
        pytest.param(["transient", "429", "transient"], RetryPolicy(), id="success-after-three"),
        pytest.param(["transient"] * 9, RetryPolicy(max_attempts=4), id="gives-up-at-max"),
        pytest.param(["transient"], RetryPolicy(max_attempts=1), id="single-attempt"),
        pytest.param(["ambiguous"], RetryPolicy(), id="ambiguous-retried"),
        pytest.param(["ambiguous"], RetryPolicy(retry_ambiguous=False), id="ambiguous-refused"),
        pytest.param(["transient", "4xx"], RetryPolicy(), id="permanent-after-retry"),
        pytest.param(["fatal"], RetryPolicy(), id="fatal"),
        pytest.param(["bug"], RetryPolicy(), id="programming-error"),
        pytest.param(["transient", "cancelled"], RetryPolicy(), id="cancelled"),
    ],
)
def test_retrier_behaves_like_the_tenacity_loop(script: list[str], policy: RetryPolicy) -> None:
    """Same tries, same seeded waits, same `on_retry` reports, same result or same error."""
    ours = asyncio.run(_with_retrier(policy, [ERRORS[name] for name in script]))
    reference = asyncio.run(_with_tenacity_loop(policy, [ERRORS[name] for name in script]))
    assert ours.attempts == reference.attempts
    assert ours.sleeps == reference.sleeps
    assert ours.retries == reference.retries
    assert ours.outcome == reference.outcome
    if isinstance(reference.outcome, BaseException):
        assert ours.outcome is ERRORS[script[-1]]  # re-raised unchanged, not wrapped


def test_one_retrier_serves_concurrent_items() -> None:
    """Items retried at the same time on one shared `Retrier` keep their own attempt counts."""

    async def main() -> list[object]:
        traces = [Trace() for _ in range(3)]
        shared = Trace()
        retrier = Retrier(RetryPolicy(max_attempts=3), sleep=shared.sleep, on_retry=shared.on_retry)

        async def item(trace: Trace, failures: int) -> object:
            async def one_try() -> str:
                await asyncio.sleep(0)  # let the other items interleave
                return await _one_try(trace, [transient()] if trace.attempts < failures else [])

            try:
                return await retrier.call(one_try)
            except TransientError as exc:
                return exc.kind

        return await asyncio.gather(*(item(t, f) for t, f in zip(traces, [0, 2, 5], strict=True)))

    assert asyncio.run(main()) == ["generated after 1", "generated after 3", "http_status"]
