"""Pace request starts: concurrency cap, evenly spaced starts, image budget, shared 429 pause.

One `Limiter` guards every request of a run. ``async with limiter.slot(n):`` waits until

* fewer than `concurrency` requests are in flight,
* no 429 pause is active,
* the request schedule allows a start (at most `rate` starts per second), and
* the image schedule allows `n` images (at most `image_rate` images per second),

then counts the start. Both schedules are GCRA ("virtual scheduling") with a capacity of
one: starts are evenly spaced, the first one is immediate, and idle time earns no burst,
because the server enforces the same limits and a burst only earns 429s. A request of `n`
images pushes the image schedule `n / image_rate` seconds ahead.

Feedback from the API adjusts the pace (`pipeline.pace`: AIMD in time, as TCP's window):

* `pause(retry_after, started_at=...)`: a 429 stops every start until its deadline (a later
  deadline wins). The first 429 of a burst is a congestion event: the pace remembers the
  rate it came at and slows down; 429s of requests started before that cut (the rest of
  the burst) only extend the pause. Without a Retry-After the pause is `default_pause_s`,
  doubled for each further event before a success. With ``rate=None`` and
  ``image_rate=None`` only the pause applies.
* Between 429s the pace climbs back in time (per second of paced running, never per
  success), cautiously near the remembered rate, never above the configured one.
* `observe(hint)`: ``x-ratelimit-*`` headers pace the remaining requests over the time left
  until the reset, so the pace slows before a 429 happens.
* `LearnedPace` (from the previous run's summary) starts a run where the last one ended.
* A `PaceTeam` (`pipeline.shared_pace`): the shards of one job on one key keep one pace and
  one schedule. The schedule's share of the rate is the team's, each start waits for this
  shard's turn on the shared slot grid and for any sibling's 429 pause; this pace learns
  (grows only when the team says it leads) and its cuts and pauses go to the team.

Waiters start in arrival order (FIFO), so a request for many images is never starved by
small ones. Only the head of the queue watches the clock: it sleeps exactly until its
computed start time, and is woken early only by what can make it earlier (a release, a
success, a hint); the others wait on a future until they reach the head. Idle CPU is
near zero and the number of sleeps grows with the number of waiters, never with time.

About 450 lines, kept whole: the queue, the two schedules and the pause are one piece of
state that every wake-up reads; the arithmetic of learning the rate is apart, in `pace`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from .pace import Pace
from .records import RateLimitHint

__all__ = [
    "DEFAULT_MIN_RATE_FRACTION",
    "DEFAULT_PAUSE_S",
    "MAX_DEFAULT_PAUSE_S",
    "LearnedPace",
    "Limiter",
    "LimiterStats",
    "PaceTeam",
    "Ticket",
    "learned_pace",
]

DEFAULT_PAUSE_S = 1.0
"""Pause after a 429 without Retry-After; the rate cut does the rest of the slowing."""
MAX_DEFAULT_PAUSE_S = 60.0
"""The doubling of `DEFAULT_PAUSE_S` (429s without Retry-After, one after another) stops here."""
DEFAULT_MIN_RATE_FRACTION = 1 / 1000
# A sleep may end a hair before its deadline (float rounding, clock resolution); treat
# that as on time instead of sleeping again for a nanosecond.
_EPSILON_S = 1e-9


@dataclass(frozen=True, slots=True)
class LimiterStats:
    """A snapshot of the limiter, for progress lines and the run summary."""

    starts: int
    pauses: int
    effective_rate: float | None  # request starts per second now; None = unlimited
    effective_image_rate: float | None
    in_flight: int
    max_in_flight: int
    waiting: int
    slowdowns: int = 0  # congestion events (bursts of 429s), each cut the rate once
    # The pace learned from 429s (None while the configured rate never proved too fast),
    # and the rates at which the last 429s came: the next run on the same OUT starts there.
    learned_rate_per_s: float | None = None
    learned_image_rate_per_s: float | None = None
    rate_429_per_s: float | None = None
    image_rate_429_per_s: float | None = None


@dataclass(frozen=True, slots=True)
class LearnedPace:
    """Where a previous run's pace ended (its summary's ``limiter``), to start from there."""

    rate_per_s: float | None = None
    image_rate_per_s: float | None = None
    rate_429_per_s: float | None = None
    image_rate_429_per_s: float | None = None


@dataclass(frozen=True, slots=True)
class Ticket:
    """One admitted start: `started_at` (limiter clock) tells a 429 which burst it belongs to."""

    started_at: float


class PaceTeam(Protocol):
    """The shards of one job on one key: one pace, one schedule (`pipeline.shared_pace`).

    Times are on the limiter's clock; `join` hands the team this limiter's learner, clock
    and a way to wake the queue head when the team's state changes.
    """

    def join(
        self,
        pace: Pace,
        clock: Callable[[], float],
        wake: Callable[[], None],
        rate: float | None,
    ) -> None:
        """Bind the limiter's pace (the learner), clock, wake-up and request rate."""

    @property
    def members(self) -> int:
        """Shards sharing the schedule now."""

    @property
    def leads(self) -> bool:
        """Whether this limiter's pace is the one that grows."""

    def factor(self, now: float) -> float:
        """The job's share of the configured rate at `now`."""

    def pause_until(self) -> float:
        """The latest 429 pause of any shard."""

    def align(self, due: float, rate: float) -> float:
        """This shard's first start at or after `due` on the shared grid of `rate`."""

    def cut(self, now: float) -> None:
        """The pace cut (a new congestion event)."""

    def paused(self, until: float) -> None:
        """This limiter paused until `until`."""

    def grew(self, now: float) -> None:
        """The pace may have grown."""


class _Waiter:
    """One `slot()` call waiting in the queue; `wake` is set to make it look again."""

    __slots__ = ("n", "wake")

    def __init__(self, n: int) -> None:
        self.n = n
        self.wake: asyncio.Future[None] | None = None


class Limiter:
    """Admit request starts under a rate, an image rate, a concurrency cap and 429 pauses.

    `clock` defaults to the running event loop's clock, which is what the default `sleep`
    (`asyncio.sleep`) measures; pass both to run on fake time.
    """

    def __init__(
        self,
        *,
        rate: float | None,
        image_rate: float | None,
        concurrency: int,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        default_pause_s: float = DEFAULT_PAUSE_S,
        max_default_pause_s: float = MAX_DEFAULT_PAUSE_S,
        min_rate_fraction: float = DEFAULT_MIN_RATE_FRACTION,
        learned: LearnedPace | None = None,
        team: PaceTeam | None = None,
    ) -> None:
        _check_rate("rate", rate)
        _check_rate("image_rate", image_rate)
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if default_pause_s < 0:
            raise ValueError(f"default_pause_s must not be negative, got {default_pause_s}")
        if not 0 < min_rate_fraction <= 1:
            raise ValueError(f"min_rate_fraction must be in (0, 1], got {min_rate_fraction}")
        self._rate = rate
        self._image_rate = image_rate
        self._concurrency = concurrency
        self._clock = clock
        self._sleep = sleep
        self._default_pause_s = default_pause_s
        self._max_default_pause_s = max(max_default_pause_s, default_pause_s)
        self._adaptive = rate is not None or image_rate is not None
        factor, threshold = _learned_factors(learned, rate, image_rate)
        self._pace = Pace(
            floor=min_rate_fraction, now=self._now(), factor=factor, threshold=threshold
        )
        self._learned = learned is not None and factor < 1.0
        self._team = team if self._adaptive else None
        if self._team is not None:
            self._team.join(self._pace, self._now, self._wake_head, rate)
        self._silent_429s = 0  # congestion events without Retry-After since the last success
        self._last_start: float | None = None
        self._last_n = 0
        self._pause_until = float("-inf")
        self._hint_interval = 0.0
        self._hint_until = float("-inf")
        self._queue: deque[_Waiter] = deque()
        self._in_flight = 0
        self._max_in_flight = 0
        self._starts = 0
        self._pauses = 0

    @asynccontextmanager
    async def slot(self, n_images: int = 1) -> AsyncIterator[Ticket]:
        """Wait for a start of a request of `n_images` images; hold a concurrency slot inside.

        The `Ticket` it yields goes to `pause` when the request is answered 429.
        """
        if n_images < 1:
            raise ValueError(f"n_images must be at least 1, got {n_images}")
        await self._acquire(n_images)
        try:
            yield Ticket(started_at=self._now())
        finally:
            self._in_flight -= 1
            if self._in_flight == self._concurrency - 1:
                # Only a head blocked on the cap cares; one sleeping on time would only
                # wake up to compute the same start time again.
                self._wake_head()

    def pause(self, retry_after: float | None, *, started_at: float | None = None) -> None:
        """A 429 arrived: no start before now + `retry_after`, and slow down once per burst.

        ``None`` means the API gave no Retry-After: `default_pause_s` applies, doubled for
        each congestion event since the last success (up to `MAX_DEFAULT_PAUSE_S`). A later
        deadline wins, an earlier one never shortens the pause. The 429 is a new
        congestion event (the rate is cut and the rate it came at remembered) when its
        request started after the last cut (`started_at`, from the slot's `Ticket`); the
        other requests of the same burst only extend the pause. Without `started_at`, a
        429 arriving during an active pause counts as part of that burst. The queue head
        is not woken: a pause only moves start times later.
        """
        now = self._now()
        if started_at is not None:
            new_event = started_at > self._pace.last_cut
        else:
            new_event = now >= self._pause_until
        if new_event:
            if self._adaptive:
                self._pace.cut(now)
                if self._team is not None:
                    self._team.cut(now)
            if retry_after is None:
                self._silent_429s += 1
        self._pause_until = max(self._pause_until, now + self._pause_s(retry_after))
        self._pace.hold(self._pause_until)
        if self._team is not None:
            self._team.paused(self._pause_until)
        self._pauses += 1

    def record_success(self) -> None:
        """A request succeeded: a 429 without Retry-After pauses for the base time again.

        The rate does not climb per success (it climbs in time, see `pipeline.pace`).
        """
        self._silent_429s = 0

    def observe(self, hint: RateLimitHint | None) -> None:
        """Pace by what ``x-ratelimit-*`` headers said, before a 429 happens.

        With `remaining` requests left until the window resets in `reset_s` seconds, starts
        are spaced at least ``reset_s / remaining`` apart until the reset; with none left,
        every start waits for the reset. A hint without both fields is ignored.
        """
        if hint is None or hint.remaining is None or hint.reset_s is None:
            return
        now = self._now()
        reset_s = max(0.0, hint.reset_s)
        if hint.remaining <= 0:
            self._pause_until = max(self._pause_until, now + reset_s)
            return
        interval = reset_s / hint.remaining
        loosens = now < self._hint_until and interval < self._hint_interval
        self._hint_interval = interval
        self._hint_until = now + reset_s
        if loosens:  # the head may start earlier than the old hint allowed
            self._wake_head()

    def stats(self) -> LimiterStats:
        """A frozen snapshot of counters, the current effective rates and what was learned."""
        factor, threshold = self._factor(self._now()), self._pace.threshold
        learned = self._learned or self._pace.cuts > 0 or factor < 1.0
        return LimiterStats(
            starts=self._starts,
            pauses=self._pauses,
            effective_rate=_scaled(self._rate, factor),
            effective_image_rate=_scaled(self._image_rate, factor),
            in_flight=self._in_flight,
            max_in_flight=self._max_in_flight,
            waiting=len(self._queue),
            slowdowns=self._pace.cuts,
            learned_rate_per_s=_scaled(self._rate, factor) if learned else None,
            learned_image_rate_per_s=_scaled(self._image_rate, factor) if learned else None,
            rate_429_per_s=_scaled(self._rate, threshold),
            image_rate_429_per_s=_scaled(self._image_rate, threshold),
        )

    def _factor(self, now: float) -> float:
        """The schedule's share of the configured rates: the team's, else this pace's."""
        return self._pace.factor if self._team is None else self._team.factor(now)

    def _pause_s(self, retry_after: float | None) -> float:
        """How long this 429 stops starts: its Retry-After, else the (doubling) default."""
        if retry_after is not None:
            return max(0.0, retry_after)
        doublings = max(self._silent_429s - 1, 0)
        return min(self._default_pause_s * 2.0 ** min(doublings, 32), self._max_default_pause_s)

    async def _acquire(self, n: int) -> None:
        """Queue up, wait until at the head and admitted, then count the start."""
        waiter = _Waiter(n)
        self._queue.append(waiter)
        try:
            while True:
                if self._queue[0] is not waiter:
                    await self._wait(waiter, None)
                    continue
                ready_at = self._ready_at()
                if ready_at is None:  # concurrency cap: a release wakes us
                    await self._wait(waiter, None)
                    continue
                delay = ready_at - self._now()
                if delay <= _EPSILON_S:
                    break
                await self._wait(waiter, delay)
        except BaseException:
            # Cancelled (or the sleep failed) while queued: leave no trace, let the next go.
            was_head = self._queue[0] is waiter
            self._queue.remove(waiter)
            if was_head:
                self._wake_head()
            raise
        self._queue.popleft()
        self._start(n, ready_at)
        self._wake_head()

    async def _wait(self, waiter: _Waiter, delay: float | None) -> None:
        """Sleep `delay` seconds (forever when None), or less if `waiter.wake` is set.

        With the default sleep, the loop's own timer sets `wake`: one future and one
        timer handle per wait, where a sleep task raced against `wake` costs several
        futures, callbacks and loop iterations per request start.
        """
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()
        waiter.wake = wake
        try:
            if delay is None:
                await wake
                return
            if self._sleep is asyncio.sleep:
                handle = loop.call_later(delay, _set_done, wake)
                try:
                    await wake
                finally:
                    handle.cancel()
                return
            timer = asyncio.ensure_future(self._sleep(delay))
            try:
                await asyncio.wait({wake, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if timer.done():
                    timer.result()  # surface a failing sleep instead of hiding it
                else:
                    timer.cancel()
        finally:
            waiter.wake = None

    def _wake_head(self) -> None:
        """Make the queue head recompute its start time."""
        if self._queue:
            wake = self._queue[0].wake
            if wake is not None and not wake.done():
                wake.set_result(None)

    def _ready_at(self) -> float | None:
        """When the head is due (possibly in the past); None while the cap is reached."""
        if self._in_flight >= self._concurrency:
            return None
        due = self._pause_until
        if self._last_start is not None:
            due = max(due, self._last_start + self._interval(self._now()))
        team = self._team
        if team is not None:
            due = max(due, team.pause_until())
            if self._rate is not None:
                due = team.align(due, self._rate)
        return due

    def _interval(self, now: float) -> float:
        """Seconds the last start keeps the next one waiting, under every schedule."""
        interval = 0.0
        factor = self._factor(now)
        # The team's rates are the job's: this shard's images and hints are its share.
        members = 1 if self._team is None else self._team.members
        if self._rate is not None:
            interval = 1.0 / (self._rate * factor)
        if self._image_rate is not None:
            interval = max(interval, members * self._last_n / (self._image_rate * factor))
        if now < self._hint_until:
            interval = max(interval, members * self._hint_interval)
        return interval

    def _start(self, n: int, due: float) -> None:
        """Count a start, keeping the schedule when the loop woke us a little late.

        Starting from the planned time rather than the actual one means a late wake-up
        (a busy loop, a coarse timer) is made up by the next start instead of lowering
        the long-run rate; at most one interval is ever made up, so the API sees at most
        one start of burst. After an idle spell the schedule restarts from now. Once 429s
        have shown the server's limit (the pace is below the configured one), nothing is
        made up: near a strict limit, a start closer than one interval to the last is a 429.

        A start the schedule held back (due about now) is time spent pacing: the pace may
        grow by it. One after an idle spell or a concurrency wait proves nothing.
        """
        now = self._now()
        late = now - due
        interval = self._interval(now)
        paced = self._last_start is not None and late < interval
        team = self._team
        if team is None:
            self._pace.grow(now, paced=paced and self._adaptive)
        elif team.leads:
            self._pace.grow(now, paced=paced)
            team.grew(now)
        make_up = 0.0 <= late < interval and self._factor(now) >= 1.0
        self._last_start = due if make_up else max(now, due)
        self._last_n = n
        self._starts += 1
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:  # pause()/observe() called outside a loop
            return time.monotonic()


def _set_done(wake: asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_result(None)


def _scaled(rate: float | None, factor: float | None) -> float | None:
    return None if rate is None or factor is None else rate * factor


def _learned_factors(
    learned: LearnedPace | None, rate: float | None, image_rate: float | None
) -> tuple[float, float | None]:
    """The start factor and threshold from a previous run's rates, under today's ceiling.

    The spec's rates may have changed since: each learned rate is taken relative to
    today's configured one, the stricter wins, and the factor never exceeds 1.
    """
    if learned is None:
        return 1.0, None
    pairs = ((learned.rate_per_s, rate), (learned.image_rate_per_s, image_rate))
    factors = [got / ceiling for got, ceiling in pairs if got is not None and ceiling]
    limits = (
        (learned.rate_429_per_s, rate),
        (learned.image_rate_429_per_s, image_rate),
    )
    thresholds = [got / ceiling for got, ceiling in limits if got is not None and ceiling]
    factor = min([1.0, *factors])
    return factor, min(thresholds) if thresholds else None


def learned_pace(limiter_summary: object) -> LearnedPace | None:
    """The `LearnedPace` in a summary's ``limiter`` section; None when absent or garbage."""
    if not isinstance(limiter_summary, dict):
        return None
    values = {
        name: _positive(limiter_summary.get(name))
        for name in (
            "learned_rate_per_s",
            "learned_image_rate_per_s",
            "rate_429_per_s",
            "image_rate_429_per_s",
        )
    }
    if values["learned_rate_per_s"] is None and values["learned_image_rate_per_s"] is None:
        return None
    return LearnedPace(
        rate_per_s=values["learned_rate_per_s"],
        image_rate_per_s=values["learned_image_rate_per_s"],
        rate_429_per_s=values["rate_429_per_s"],
        image_rate_429_per_s=values["image_rate_429_per_s"],
    )


def _positive(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if number > 0 and number != float("inf") else None


def _check_rate(name: str, rate: float | None) -> None:
    if rate is not None and not rate > 0:
        raise ValueError(f"{name} must be positive or None, got {rate}")
