"""What every remote stage (label, upload) does around its requests, once.

`RemoteCalls` runs a stage's calls under the project's one retry policy with the stage's
own pace (`RetriedCalls` over its `Limiter`: 429s pause every call of the stage), stops
between attempts when the run is stopping, turns a fatal answer (a refused key, an
unknown model or project) into the run's stop, and stops the run when too many calls fail
in a row (the API is unwell: the next run goes on). A call that fails for good is the
stage's to record on its output; the next run tries it again.

`read_stored` is how a stage reads the image it works on: only if it is still what the
manifest recorded.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from ..backends.retried import RetriedCalls
from ..credentials import DIRECT, ProxySettings, read_proxy_settings
from ..errors import BackendError, FatalError, OutputError, RateLimitedError
from ..jobspec.fields import parse_rate
from ..jobspec.model import RunSettings
from ..limiter import Limiter
from ..records import OutputFile
from ..retry import RetryPolicy
from ..run.pool import RunStop, StopReason
from ..run.stages import StageContext
from ..store.layout import stored_image_path

__all__ = ["HALTED_BY", "RemoteCalls", "StageEndpoint", "Stopped", "read_stored"]

log = logging.getLogger(__name__)

HALTED_BY: frozenset[StopReason] = frozenset({"sigint", "sigterm", "stopped", "fatal", "disk"})
"""The stops that halt a stage: the user's, or a broken run. A budget stop, or too many
failed generations, do not: what was stored is still checked, labelled and uploaded."""

T = TypeVar("T")


class Stopped(Exception):
    """The run is stopping: leave the rest of this item for the next run."""


@dataclass(slots=True)
class CallCounts:
    """A stage's retries and 429s, for the summary."""

    retries: int = 0
    rate_limited_429: int = 0


@dataclass(frozen=True, slots=True)
class StageEndpoint:
    """Where a remote stage sends its requests: the API root, its pace (starts per
    second, None: unpaced), and the proxies (none for the embedded mock)."""

    root: str
    rate: float | None
    proxies: ProxySettings

    @classmethod
    def of(
        cls,
        what: str,
        *,
        url: str | None,
        embedded: bool,
        context: StageContext,
        default_url: str,
        rate: float | None,
        default_rate: str,
    ) -> StageEndpoint:
        """The spec's `url` (else `default_url`), or the embedded mock's root when the
        stage goes there (`embedded`: no key, no proxy, no default pace)."""
        if embedded:
            if context.backend_root is None:
                raise OutputError(
                    f"{what}: this backend kind serves no {what} endpoint: set the URL in "
                    f"the {what}: block"
                )
            return cls(context.backend_root, rate, DIRECT)
        paced = parse_rate(default_rate) if rate is None else rate
        return cls(url or default_url, paced, read_proxy_settings())


class RemoteCalls:
    """A remote stage's calls: see the module docstring. `what` names the stage in logs
    and in the stop's message ("upload", "label")."""

    @classmethod
    def for_stage(
        cls,
        what: str,
        run: RunSettings,
        *,
        max_attempts: int,
        rate: float | None,
        concurrency: int,
        stop: RunStop,
    ) -> RemoteCalls:
        """The calls of a stage with its own attempts, pace and concurrency, and the
        run's backoff and failure limit. A repeated call is safe for every remote stage
        (a detection costs a request, an upload is answered duplicate), so ambiguous
        failures are retried."""
        return cls(
            what,
            policy=RetryPolicy(
                max_attempts=max_attempts,
                base_s=run.backoff_base_s,
                cap_s=run.backoff_max_s,
                retry_ambiguous=True,
            ),
            limiter=Limiter(
                rate=rate,
                image_rate=None,
                concurrency=concurrency,
                default_pause_s=run.backoff_base_s,
                max_default_pause_s=run.backoff_max_s,
            ),
            stop=stop,
            max_consecutive_failures=run.max_consecutive_failures,
        )

    def __init__(
        self,
        what: str,
        *,
        policy: RetryPolicy,
        limiter: Limiter,
        stop: RunStop,
        max_consecutive_failures: int,
    ) -> None:
        self._what = what
        self._stop = stop
        self._calls = RetriedCalls(
            policy, sleep=self._backoff_sleep, on_retry=self._count_retry, limiter=limiter
        )
        self._max_failures = max_consecutive_failures
        self._failures_in_a_row = 0
        self.counts = CallCounts()

    def _halted(self) -> bool:
        return self._stop.reason in HALTED_BY

    async def _backoff_sleep(self, seconds: float) -> None:
        await self._stop.sleep(seconds, self._halted)

    def _count_retry(self, exc: BackendError, attempt: int, wait: float) -> None:
        self.counts.retries += 1
        log.info(
            "%s retry %d after %s (%s) in %.1fs", self._what, attempt, exc.kind, exc.status, wait
        )

    async def call(self, attempt: Callable[[], Awaitable[T]], halted: Callable[[], bool]) -> T:
        """`attempt()` under the policy. Raises `Stopped` when the run stops (a fatal
        answer stops it), the `BackendError` of a call that failed for good (counted:
        too many in a row stop the run)."""
        try:
            result = await self._calls.call(partial(self._attempt, attempt, halted))
        except FatalError as exc:
            self._stop.fatal(exc)
            raise Stopped from None
        except BackendError as exc:
            self._failed(exc)
            raise
        self._failures_in_a_row = 0
        return result

    async def _attempt(self, attempt: Callable[[], Awaitable[T]], halted: Callable[[], bool]) -> T:
        if halted():
            raise Stopped
        try:
            return await attempt()
        except RateLimitedError:
            self.counts.rate_limited_429 += 1
            raise

    def _failed(self, exc: BackendError) -> None:
        log.warning("%s failed for good: %s", self._what, exc.message)
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= self._max_failures:
            self._stop.fatal(
                FatalError(
                    f"{self._failures_in_a_row} {self._what} requests failed in a row "
                    f"(last: {exc.message}); check the API's status and the spec's "
                    f"{self._what}: block, then run the same command again to resume",
                    kind=exc.kind,
                    status=exc.status,
                )
            )


def read_stored(out_dir: Path, output: OutputFile) -> bytes | None:
    """The bytes of a stored image if they are still what the manifest recorded, else
    None (gone or changed: the engine makes the item again). Only a regular file of
    OUT's image folders is read: a hand-edited path never leaves OUT."""
    path = stored_image_path(out_dir, output.path)
    if path is None:
        return None
    try:
        if path.is_symlink() or not path.is_file():
            return None
        data = path.read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == output.sha256 else None
