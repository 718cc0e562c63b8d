"""The mock's fault injection and enforced rate limit, shared by all its endpoints.

One `MockFaults` per server holds what every endpoint draws on: the seeded draw of a
fault (`MockConfig.error_rate`, `MockConfig.faults`), the token bucket of
`MockConfig.rate_limit` and its ``x-ratelimit-*`` headers, the 429 with Retry-After (as
seconds or as a date of the server's own, possibly offset, clock) and the pause window
it announces, in which `MockStats.starts_during_pause` counts new starts, and the sleep
that ends at once when the server shuts down.
"""

from __future__ import annotations

import asyncio
import math
import random
import time

from aiohttp import web

from .config import MockConfig, MockStats
from .replies import error, format_duration, format_seconds, http_date

__all__ = ["MockFaults"]


class MockFaults:
    """Faults, the rate limit and the announced pauses of one server (built in its loop)."""

    def __init__(self, config: MockConfig, stats: MockStats) -> None:
        self.config = config
        self.stats = stats
        self.closing = asyncio.Event()
        self._rng = random.Random(config.seed)
        self._bucket = float(config.burst)
        self._bucket_at = asyncio.get_running_loop().time()
        self._pause_from = -math.inf
        self._pause_until = -math.inf

    def draw(self) -> str | None:
        """The fault this request carries (counted), or None: `error_rate` of the time."""
        config = self.config
        if config.error_rate <= 0 or self._rng.random() >= config.error_rate:
            return None
        names = [name for name, weight in config.faults.items() if weight > 0]
        fault = self._rng.choices(names, weights=[config.faults[n] for n in names])[0]
        self.stats.faults[fault] = self.stats.faults.get(fault, 0) + 1
        return fault

    def in_pause(self, now: float) -> bool:
        """Whether `now` falls in an announced pause (after its grace)."""
        return self._pause_from + self.config.pause_grace_s < now < self._pause_until

    def take_token(self, now: float) -> bool:
        """Take one request's token from the bucket; False when it is empty."""
        rate = self.config.rate_limit
        if rate is None:
            return True
        self._bucket = min(float(self.config.burst), self._bucket + (now - self._bucket_at) * rate)
        self._bucket_at = now
        if self._bucket >= 1.0:
            self._bucket -= 1.0
            return True
        return False

    def seconds_to_token(self) -> float:
        """How long until the bucket holds a token again."""
        rate = self.config.rate_limit or 1.0
        return max(1.0 - self._bucket, 0.0) / rate

    def rate_limit_headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*-requests`` headers, when the mock is set to send them."""
        rate = self.config.rate_limit
        if not self.config.send_rate_limit_headers or rate is None:
            return {}
        reset_s = (self.config.burst - self._bucket) / rate
        return {
            "x-ratelimit-limit-requests": str(self.config.burst),
            "x-ratelimit-remaining-requests": str(int(self._bucket)),
            "x-ratelimit-reset-requests": format_duration(reset_s),
        }

    def rate_limited(self, retry_after_s: float, now: float) -> web.Response:
        """A 429 whose Retry-After opens a window in which new starts are counted."""
        self.stats.rate_limited += 1
        headers = self.rate_limit_headers()
        form = self.config.retry_after_form
        if form == "seconds":
            headers["Retry-After"] = format_seconds(retry_after_s)
            self._announce_pause(now, now + retry_after_s)
        elif form == "date":
            wall_now = self.wall_now()
            wall = math.ceil(wall_now + retry_after_s)
            headers["Retry-After"] = http_date(wall)
            self._announce_pause(now, now + (wall - wall_now))
        return error(429, "rate_limit_exceeded", "Rate limit reached, slow down.", headers)

    def _announce_pause(self, now: float, until: float) -> None:
        if now >= self._pause_until:
            self._pause_from = now
        self._pause_until = max(self._pause_until, until)

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the server shuts down."""
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self.closing.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            return

    def wall_now(self) -> float:
        """The server's wall clock: the host's plus `clock_offset_s`."""
        return time.time() + self.config.clock_offset_s

    async def stamp_date(self, request: web.Request, response: web.StreamResponse) -> None:
        """The ``Date`` of the server's own (offset) clock, as a misset server sends it."""
        response.headers["Date"] = http_date(self.wall_now())
