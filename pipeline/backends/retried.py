"""`RetriedCalls`: a client's own calls under the project's one retry policy.

A search page, a Batch API control call (files upload, batch create, get, list) and a
results file read are retried inside their clients, not by the engine. They run as the
engine's and the upload stage's requests do: `pipeline.retry.Retrier` decides which
failures are tried again and how long the backoff is (``run.max_attempts``,
``run.backoff_base_s``, ``run.backoff_max_s``), and a 429 is honoured through a `Limiter`
whose `pause` holds every next call of the client for its Retry-After (or a doubling
default without one) while the retrier itself waits 0 after it. So Retry-After means
the same wherever an answer carries it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import TypeVar

from ..errors import RateLimitedError
from ..limiter import Limiter
from ..retry import OnRetry, Retrier, RetryPolicy

__all__ = ["CONCURRENT_CALLS", "UNLIMITED_ATTEMPTS", "RetriedCalls", "unlimited"]

CONCURRENT_CALLS = 1_000
"""No cap of its own: the limiter here holds calls only during a 429's pause."""
UNLIMITED_ATTEMPTS = sys.maxsize
"""`RetryPolicy.max_attempts` of a call that must not give up (a paid batch's poll)."""

T = TypeVar("T")


def unlimited(policy: RetryPolicy, *, cap_s: float | None = None) -> RetryPolicy:
    """`policy` without an attempt limit (a call that is retried for as long as it
    takes), its backoff capped at `cap_s` when given."""
    return replace(
        policy,
        max_attempts=UNLIMITED_ATTEMPTS,
        cap_s=policy.cap_s if cap_s is None else cap_s,
        retry_ambiguous=True,
    )


class RetriedCalls:
    """Runs a client's calls under `policy`; one per client, `call` once per call.

    `sleep` and `clock` are the retrier's and the limiter's time (tests pass fakes).
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] | None = None,
        on_retry: OnRetry | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self._sleep = sleep
        self._on_retry = on_retry
        self._retrier = Retrier(policy, sleep=sleep, on_retry=on_retry)
        self._limiter = limiter or Limiter(
            rate=None,
            image_rate=None,
            concurrency=CONCURRENT_CALLS,
            clock=clock,
            sleep=sleep,
            default_pause_s=policy.base_s,
            max_default_pause_s=policy.cap_s,
        )

    def under(self, policy: RetryPolicy) -> RetriedCalls:
        """Calls of the same client under another `policy`: a 429 still pauses them all."""
        return RetriedCalls(
            policy, sleep=self._sleep, on_retry=self._on_retry, limiter=self._limiter
        )

    async def call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Await `attempt()` until it succeeds or the policy gives up; re-raise its error."""
        return await self._retrier.call(partial(self._once, attempt))

    async def _once(self, attempt: Callable[[], Awaitable[T]]) -> T:
        async with self._limiter.slot() as ticket:
            try:
                result = await attempt()
            except RateLimitedError as exc:
                self._limiter.pause(exc.retry_after, started_at=ticket.started_at)
                raise
        self._limiter.record_success()
        return result
