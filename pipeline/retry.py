"""The retry policy: which failures to try again, and how long to wait before doing so.

Built on tenacity. The engine builds one `Retrier` per run and hands it each item::

    retrier = Retrier(policy, on_retry=log_retry)
    stored = await retrier.call(lambda: attempt_item(item))

`Retrier` builds tenacity's strategies once and runs each item through tenacity's
public API (`tenacity.AsyncRetrying`); `retrying()` gives the same loop for callers that
prefer tenacity's ``async for attempt in ...: with attempt:`` form.

`TransientError` is retried with exponential backoff and full jitter (AWS "Exponential
Backoff And Jitter"): the wait before attempt ``k + 1`` is uniform in
``[0, min(cap_s, base_s * 2 ** (k - 1))]``, which spreads retries of many workers apart.
A 429 (`RateLimitedError`) waits 0 here: its wait is the limiter's global pause, which
every start (including this retry's) honours, so waiting here as well would only add to it.
An ambiguous failure (the request may have been paid for) is retried only when the policy
allows it. `PermanentError`, `FatalError` and anything else end the loop at once, and the
last exception propagates unchanged (``reraise=True``).

Tests pass a `sleep` that records the waits and a seeded `rng`, so nothing sleeps for real.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

import tenacity

from .errors import BackendError, RateLimitedError, TransientError
from .jobspec.model import RunSettings

__all__ = [
    "DEFAULT_BASE_S",
    "DEFAULT_CAP_S",
    "DEFAULT_MAX_ATTEMPTS",
    "Retrier",
    "RetryPolicy",
    "backoff_s",
    "retrying",
    "should_retry",
]

_RUN_DEFAULTS = RunSettings()  # the defaults are declared once, in the spec's `run` section
DEFAULT_MAX_ATTEMPTS = _RUN_DEFAULTS.max_attempts
DEFAULT_BASE_S = _RUN_DEFAULTS.backoff_base_s
DEFAULT_CAP_S = _RUN_DEFAULTS.backoff_max_s
# 2.0 ** 1024 overflows; any exponent this large is far past every cap anyway.
_MAX_EXPONENT = 1000

OnRetry = Callable[[BackendError, int, float], None]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry one item.

    `max_attempts` counts the first try; `retry_ambiguous` allows retrying a request that
    may have reached the server (a timeout, a dropped connection), which may pay twice.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base_s: float = DEFAULT_BASE_S
    cap_s: float = DEFAULT_CAP_S
    retry_ambiguous: bool = True

    @classmethod
    def from_run(cls, run: RunSettings) -> RetryPolicy:
        """The policy a spec's `run` section asks for."""
        return cls(
            max_attempts=run.max_attempts,
            base_s=run.backoff_base_s,
            cap_s=run.backoff_max_s,
            retry_ambiguous=run.retry_ambiguous,
        )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.base_s < 0 or self.cap_s < 0:
            raise ValueError(f"base_s and cap_s must not be negative: {self.base_s}, {self.cap_s}")


def should_retry(exc: BaseException, policy: RetryPolicy) -> bool:
    """Whether `exc` is worth another attempt under `policy`."""
    if not isinstance(exc, TransientError):
        return False
    return policy.retry_ambiguous or not exc.ambiguous


def backoff_s(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based), with full jitter."""
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    ceiling = min(policy.cap_s, policy.base_s * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    return rng.uniform(0.0, ceiling)


def retrying(
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
    on_retry: OnRetry | None = None,
) -> tenacity.AsyncRetrying:
    """A tenacity loop applying `policy`; `on_retry(exc, attempt, wait_s)` runs before each wait."""
    return tenacity.AsyncRetrying(sleep=sleep, **_strategies(policy, rng, on_retry))


class Retrier:
    """Runs attempts under `policy` with tenacity; build once, `call` once per item.

    The strategies are built once; each call runs a `copy` of that loop through
    tenacity's public ``AsyncRetrying.__call__`` (a copy per call, because a tenacity
    loop keeps its iteration state on the instance and items run concurrently): a small
    cost per item beside the CPU of the request it guards.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        on_retry: OnRetry | None = None,
    ) -> None:
        self._retrying = retrying(policy, sleep=sleep, rng=rng, on_retry=on_retry)

    async def call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Await `attempt()` until it succeeds or the policy gives up; re-raise its error."""

        async def once() -> T:  # tenacity awaits only what it sees is a coroutine function
            return await attempt()

        return cast(T, await self._retrying.copy()(once))


def _strategies(
    policy: RetryPolicy, rng: random.Random | None, on_retry: OnRetry | None
) -> dict[str, Any]:
    """The stop, wait, retry and report arguments of a tenacity loop applying `policy`."""
    wait = partial(_wait_s, policy=policy, rng=rng if rng is not None else random.Random())
    before_sleep = None if on_retry is None else partial(_report_retry, on_retry=on_retry)
    return {
        "stop": tenacity.stop_after_attempt(policy.max_attempts),
        "wait": wait,
        "retry": tenacity.retry_if_exception(partial(should_retry, policy=policy)),
        "before_sleep": before_sleep,
        "reraise": True,
    }


def _wait_s(state: tenacity.RetryCallState, *, policy: RetryPolicy, rng: random.Random) -> float:
    """The tenacity wait: 0 after a 429 (the limiter pauses), full-jitter backoff otherwise."""
    if isinstance(_failure(state), RateLimitedError):
        return 0.0
    return backoff_s(state.attempt_number, policy, rng)


def _report_retry(state: tenacity.RetryCallState, *, on_retry: OnRetry) -> None:
    """Tell the caller which attempt failed, why, and how long the wait before the next is."""
    exc = _failure(state)
    # Only `should_retry` errors reach here, and those are all BackendErrors.
    assert isinstance(exc, BackendError)
    on_retry(exc, state.attempt_number, state.upcoming_sleep)


def _failure(state: tenacity.RetryCallState) -> BaseException | None:
    return None if state.outcome is None else state.outcome.exception()
