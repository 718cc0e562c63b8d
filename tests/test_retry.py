"""The retry policy: what is retried, how often, and how long it waits (never for real)."""

from __future__ import annotations

import asyncio
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import (
    BackendError,
    FatalError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from pipeline.retry import RetryPolicy, backoff_s, retrying, should_retry


def transient(*, ambiguous: bool = False) -> TransientError:
    return TransientError("503 from the API", kind="http_status", status=503, ambiguous=ambiguous)


class Harness:
    """Runs one retry loop whose tries fail as scripted, recording waits and retries."""

    def __init__(self, policy: RetryPolicy, failures: list[BaseException], seed: int = 7) -> None:
        self.policy = policy
        self.failures = list(failures)
        self.seed = seed
        self.attempts = 0
        self.sleeps: list[float] = []
        self.retries: list[tuple[BackendError, int, float]] = []

    async def _sleep(self, delay: float) -> None:
        self.sleeps.append(delay)

    def _on_retry(self, exc: BackendError, attempt: int, wait: float) -> None:
        self.retries.append((exc, attempt, wait))

    async def _one_try(self) -> str:
        self.attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        return "generated"

    async def _loop(self) -> str:
        result = ""
        loop = retrying(
            self.policy,
            sleep=self._sleep,
            rng=random.Random(self.seed),
            on_retry=self._on_retry,
        )
        async for attempt in loop:
            with attempt:
                result = await self._one_try()
        return result

    def run(self) -> str:
        return asyncio.run(self._loop())


@pytest.mark.parametrize(
    ("exc", "retry_ambiguous", "expected"),
    [
        pytest.param(transient(), True, True, id="transient"),
        pytest.param(transient(), False, True, id="transient-unambiguous-strict-policy"),
        pytest.param(RateLimitedError("429", retry_after=3.0), True, True, id="429"),
        pytest.param(transient(ambiguous=True), True, True, id="ambiguous-allowed"),
        pytest.param(transient(ambiguous=False), False, True, id="not-ambiguous"),
        pytest.param(transient(ambiguous=True), False, False, id="ambiguous-refused"),
        pytest.param(PermanentError("400", kind="http_status", status=400), True, False, id="4xx"),
        pytest.param(PermanentError("policy", kind="refused"), True, False, id="refused"),
        pytest.param(FatalError("401", kind="http_status", status=401), True, False, id="fatal"),
        pytest.param(ValueError("bug"), True, False, id="programming-error"),
        pytest.param(asyncio.CancelledError(), True, False, id="cancelled"),
    ],
)
def test_which_errors_are_retried(
    exc: BaseException, retry_ambiguous: bool, expected: bool
) -> None:
    """Only transient errors retry, and ambiguous ones only when the policy allows it."""
    assert (
        should_retry(exc, RetryPolicy(max_attempts=3, retry_ambiguous=retry_ambiguous)) is expected
    )


@pytest.mark.parametrize("max_attempts", [1, 2, 5])
def test_max_attempts_is_honoured(max_attempts: int) -> None:
    """A request failing every time is tried exactly `max_attempts` times, then its error raises."""
    errors: list[BaseException] = [transient() for _ in range(10)]
    harness = Harness(RetryPolicy(max_attempts=max_attempts), errors)
    with pytest.raises(TransientError):
        harness.run()
    assert harness.attempts == max_attempts
    assert len(harness.sleeps) == max_attempts - 1


def test_success_after_failures_returns_the_result() -> None:
    """Two transient failures then a success: the loop ends with the result after three tries."""
    harness = Harness(RetryPolicy(max_attempts=5), [transient(), transient()])
    assert harness.run() == "generated"
    assert harness.attempts == 3


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(PermanentError("400", kind="http_status", status=400), id="permanent"),
        pytest.param(FatalError("403", kind="http_status", status=403), id="fatal"),
        pytest.param(transient(ambiguous=True), id="ambiguous-with-retry_ambiguous-false"),
    ],
)
def test_non_retryable_errors_fail_after_one_attempt(exc: BackendError) -> None:
    """Errors that retrying cannot fix raise unchanged after the first try, without a wait."""
    harness = Harness(RetryPolicy(max_attempts=5, retry_ambiguous=False), [exc])
    with pytest.raises(type(exc)) as raised:
        harness.run()
    assert raised.value is exc
    assert harness.attempts == 1
    assert harness.sleeps == []
    assert harness.retries == []


def test_ambiguous_failure_is_retried_by_default() -> None:
    """With `retry_ambiguous` left on, a timeout that may have been paid for is retried."""
    harness = Harness(RetryPolicy(max_attempts=3), [transient(ambiguous=True)])
    assert harness.run() == "generated"
    assert harness.attempts == 2


def test_429_does_not_wait_in_the_retry_loop() -> None:
    """After a 429 the retry waits 0 s: the limiter's shared pause does the waiting."""
    errors: list[BaseException] = [RateLimitedError("429", retry_after=30.0), transient()]
    harness = Harness(RetryPolicy(max_attempts=5, base_s=10.0), errors, seed=1)
    assert harness.run() == "generated"
    assert harness.sleeps[0] == 0.0
    assert 0.0 < harness.sleeps[1] <= 20.0


def test_on_retry_gets_the_error_attempt_number_and_wait() -> None:
    """`on_retry` is told which attempt failed, with what, and the wait before the next."""
    errors: list[BaseException] = [transient(), RateLimitedError("429"), transient()]
    harness = Harness(RetryPolicy(max_attempts=5), errors)
    assert harness.run() == "generated"
    assert [(type(exc), attempt) for exc, attempt, _ in harness.retries] == [
        (TransientError, 1),
        (RateLimitedError, 2),
        (TransientError, 3),
    ]
    assert [wait for _, _, wait in harness.retries] == harness.sleeps


def test_same_seed_gives_the_same_waits() -> None:
    """Jitter comes from the injected `rng` only, so a seeded run is reproducible."""
    policy = RetryPolicy(max_attempts=6)

    def waits(seed: int) -> list[float]:
        harness = Harness(policy, [transient() for _ in range(5)], seed=seed)
        harness.run()
        return harness.sleeps

    assert waits(3) == waits(3)
    assert waits(3) != waits(4)


@settings(max_examples=200, deadline=None)
@given(
    attempt=st.integers(min_value=1, max_value=2000),
    base_s=st.floats(min_value=0.0, max_value=100.0),
    cap_s=st.floats(min_value=0.0, max_value=3600.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_stays_in_the_full_jitter_envelope(
    attempt: int, base_s: float, cap_s: float, seed: int
) -> None:
    """Every wait lies in [0, min(cap, base·2^(attempt-1))], even for huge attempt numbers."""
    policy = RetryPolicy(max_attempts=3, base_s=base_s, cap_s=cap_s)
    wait = backoff_s(attempt, policy, random.Random(seed))
    ceiling = min(Fraction(cap_s), Fraction(base_s) * 2 ** (attempt - 1))  # exact, no overflow
    assert 0.0 <= wait <= ceiling


@settings(max_examples=25, deadline=None)
@given(
    failures=st.integers(min_value=1, max_value=7),
    base_s=st.floats(min_value=0.01, max_value=5.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_retry_waits_grow_within_the_envelope(failures: int, base_s: float, seed: int) -> None:
    """The loop's k-th wait is at most min(cap, base·2^(k-1)): exponential, capped."""
    policy = RetryPolicy(max_attempts=8, base_s=base_s, cap_s=8.0)
    harness = Harness(policy, [transient() for _ in range(failures)], seed=seed)
    assert harness.run() == "generated"
    assert len(harness.sleeps) == failures
    for k, wait in enumerate(harness.sleeps, start=1):
        assert 0.0 <= wait <= min(8.0, base_s * 2 ** (k - 1))


def test_jitter_spreads_over_the_whole_envelope() -> None:
    """Full jitter: waits for the same attempt cover [0, ceiling], not a narrow band near it."""
    rng = random.Random(0)
    policy = RetryPolicy(max_attempts=5, base_s=1.0, cap_s=60.0)
    waits = [backoff_s(4, policy, rng) for _ in range(500)]
    assert min(waits) < 0.5
    assert max(waits) > 7.5


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        pytest.param({"max_attempts": 0}, "max_attempts", id="zero-attempts"),
        pytest.param({"base_s": -1.0}, "base_s", id="negative-base"),
        pytest.param({"cap_s": -1.0}, "cap_s", id="negative-cap"),
    ],
)
def test_invalid_policy_is_refused(fields: dict[str, float], match: str) -> None:
    """A policy that could never try, or would wait a negative time, is refused."""
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**fields)  # type: ignore[arg-type]


def test_attempt_numbers_start_at_one() -> None:
    """`backoff_s(0, ...)` is a caller bug: attempts are counted from 1."""
    with pytest.raises(ValueError, match="1-based"):
        backoff_s(0, RetryPolicy(), random.Random(0))
