"""The limiter paces starts on virtual time: an event loop whose clock jumps to the next timer."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
from conftest import run_virtual as run

from pipeline.limiter import LearnedPace, Limiter, LimiterStats, learned_pace
from pipeline.records import RateLimitHint


class Recorder:
    """Runs requests through a limiter and records when each one started."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter
        self.starts: list[tuple[str, float]] = []
        self.in_flight = 0
        self.peak = 0

    async def request(self, name: str, n: int = 1, hold: float = 0.0) -> None:
        async with self.limiter.slot(n):
            self.starts.append((name, asyncio.get_running_loop().time()))
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                await asyncio.sleep(hold)
            finally:
                self.in_flight -= 1

    def times(self) -> list[float]:
        return [t for _, t in self.starts]

    def names(self) -> list[str]:
        return [name for name, _ in self.starts]


def limiter(**overrides: Any) -> Limiter:
    options: dict[str, Any] = {"rate": None, "image_rate": None, "concurrency": 100}
    options.update(overrides)
    return Limiter(**options)


async def at(t: float, action: Callable[[], Awaitable[None] | None]) -> None:
    """Do `action` at virtual time `t`."""
    await asyncio.sleep(t - asyncio.get_running_loop().time())
    result = action()
    if result is not None:
        await result


def test_starts_are_evenly_spaced_at_the_rate() -> None:
    """N requests at rate R take (N-1)/R seconds: the first at once, then one every 1/R."""

    async def main() -> list[float]:
        rec = Recorder(limiter(rate=2.0))
        await asyncio.gather(*(rec.request(str(i)) for i in range(5)))
        return rec.times()

    assert run(main()) == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])


def test_idle_time_earns_no_burst() -> None:
    """After a quiet spell the next starts are still spaced 1/R apart (capacity one)."""

    async def main() -> list[float]:
        rec = Recorder(limiter(rate=1.0))
        await rec.request("first")
        await asyncio.sleep(100)
        await asyncio.gather(*(rec.request(str(i)) for i in range(3)))
        return rec.times()

    assert run(main()) == pytest.approx([0.0, 100.0, 101.0, 102.0])


@pytest.mark.parametrize(
    ("rate", "sizes", "expected"),
    [
        pytest.param(None, [3, 1, 2, 1], [0.0, 3.0, 4.0, 6.0], id="images-only"),
        pytest.param(0.5, [1, 1, 4, 1], [0.0, 2.0, 4.0, 8.0], id="request-rate-binds-first"),
    ],
)
def test_image_rate_charges_n_tokens_per_request(
    rate: float | None, sizes: list[int], expected: list[float]
) -> None:
    """A request of n images pushes the image schedule n / image_rate seconds ahead."""

    async def main() -> list[float]:
        rec = Recorder(limiter(rate=rate, image_rate=1.0))
        await asyncio.gather(*(rec.request(str(i), n) for i, n in enumerate(sizes)))
        return rec.times()

    assert run(main()) == pytest.approx(expected)


def test_concurrency_cap_is_never_exceeded() -> None:
    """At most `concurrency` requests hold a slot at once; the next starts when one ends."""

    async def main() -> tuple[Recorder, LimiterStats]:
        rec = Recorder(limiter(concurrency=3))
        await asyncio.gather(*(rec.request(str(i), hold=1.0) for i in range(10)))
        return rec, rec.limiter.stats()

    rec, stats = run(main())
    assert rec.peak == 3
    assert stats.max_in_flight == 3
    assert stats.in_flight == 0
    assert rec.times() == pytest.approx([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])


def test_pause_blocks_every_start_until_retry_after() -> None:
    """A 429 at t stops all starts in [t, t + retry_after), then starts resume."""

    async def main() -> list[float]:
        lim = limiter()
        rec = Recorder(lim)
        await asyncio.gather(
            at(1.0, lambda: lim.pause(10.0)),
            *(at(t, lambda: rec.request("x")) for t in (0.5, 2.0, 5.0, 10.9, 12.0)),
        )
        return rec.times()

    assert run(main()) == pytest.approx([0.5, 11.0, 11.0, 11.0, 12.0])


def test_later_429_extends_the_pause() -> None:
    """A second 429 with a later deadline holds back a waiter already sleeping on the first."""

    async def main() -> list[float]:
        lim = limiter()
        lim.pause(10.0)
        rec = Recorder(lim)
        await asyncio.gather(rec.request("waiting-since-0"), at(5.0, lambda: lim.pause(30.0)))
        return rec.times()

    assert run(main()) == pytest.approx([35.0])


def test_earlier_429_deadline_never_shortens_the_pause() -> None:
    """A 429 whose Retry-After ends before the current pause leaves the pause as it was."""

    async def main() -> list[float]:
        lim = limiter()
        lim.pause(10.0)
        rec = Recorder(lim)
        await asyncio.gather(
            at(5.0, lambda: lim.pause(1.0)),
            at(7.0, partial(rec.request, "arriving-after-the-second-429")),
        )
        return rec.times()

    assert run(main()) == pytest.approx([10.0])


def test_pause_without_retry_after_uses_the_default() -> None:
    """A 429 without Retry-After pauses for `default_pause_s`."""

    async def main() -> list[float]:
        lim = limiter(default_pause_s=7.0)
        lim.pause(None)
        rec = Recorder(lim)
        await rec.request("x")
        return rec.times()

    assert run(main()) == pytest.approx([7.0])


def test_429_cuts_the_pace_and_successes_alone_do_not_restore_it() -> None:
    """A 429 halves the pace (no limit known yet); answers alone never snap it back."""

    async def main() -> list[float | None]:
        lim = limiter(rate=2.0, image_rate=4.0)
        seen = [lim.stats().effective_rate]
        lim.pause(0.0)
        seen += [lim.stats().effective_rate, lim.stats().effective_image_rate]
        for _ in range(100):
            lim.record_success()
        seen.append(lim.stats().effective_rate)
        return seen

    assert run(main()) == pytest.approx([2.0, 1.0, 2.0, 1.0])


def test_cut_rate_spaces_starts_wider() -> None:
    """After a 429 the next start waits the cut rate's interval, not the configured one."""

    async def main() -> list[float]:
        lim = limiter(rate=1.0)
        lim.pause(0.0)
        rec = Recorder(lim)
        await asyncio.gather(*(rec.request(str(i)) for i in range(3)))
        return rec.times()

    times = run(main())
    assert times[:2] == pytest.approx([0.0, 2.0])
    assert 1.0 < times[2] - times[1] <= 2.0  # climbing back, in time, not above the ceiling


def test_idle_time_does_not_raise_the_pace() -> None:
    """Time without paced starts proves nothing: after an idle hour the pace is where it was."""

    async def main() -> tuple[float | None, float | None]:
        lim = limiter(rate=10.0)
        rec = Recorder(lim)
        await rec.request("before")
        lim.pause(0.0)
        before = lim.stats().effective_rate
        await asyncio.sleep(3600)
        await rec.request("after-idle")
        return before, lim.stats().effective_rate

    before, after = run(main())
    assert before == pytest.approx(5.0)
    assert after == pytest.approx(5.0)


def test_rate_never_drops_below_the_floor() -> None:
    """Repeated 429s halve the rate down to `min_rate_fraction` of the configured one."""

    async def main() -> float | None:
        lim = limiter(rate=16.0, min_rate_fraction=1 / 4)
        for _ in range(10):
            lim.pause(0.0)
            await asyncio.sleep(1)
        return lim.stats().effective_rate

    assert run(main()) == pytest.approx(4.0)


def test_429s_during_one_pause_halve_the_rate_once() -> None:
    """The 429s of all requests in flight when the limit hit count as one slowdown."""

    async def main() -> LimiterStats:
        lim = limiter(rate=8.0)
        for _ in range(4):
            lim.pause(10.0)
        return lim.stats()

    stats = run(main())
    assert stats.effective_rate == pytest.approx(4.0)
    assert stats.pauses == 4


def test_waiters_start_in_arrival_order() -> None:
    """FIFO: a big request waiting for a slot is not overtaken by a small one arriving later."""

    async def main() -> list[tuple[str, float]]:
        rec = Recorder(limiter(image_rate=1.0, concurrency=1))

        async def holder_then_barger() -> None:
            await rec.request("holder", hold=5.0)
            await rec.request("barger")  # asks the moment the slot frees, before "big" runs

        await asyncio.gather(holder_then_barger(), at(1.0, partial(rec.request, "big", 5)))
        return rec.starts

    assert run(main()) == [
        ("holder", 0.0),
        ("big", pytest.approx(5.0)),
        ("barger", pytest.approx(10.0)),  # big's 5 images hold the image schedule until then
    ]


def test_cancelled_waiter_frees_its_place() -> None:
    """A waiter cancelled in the queue takes no slot and no token: the next one starts on time."""

    async def main() -> tuple[list[tuple[str, float]], LimiterStats]:
        lim = limiter(rate=1.0, concurrency=1)
        rec = Recorder(lim)
        holder = asyncio.ensure_future(rec.request("holder", hold=5.0))
        await asyncio.sleep(0)
        doomed = asyncio.ensure_future(rec.request("doomed"))
        after = asyncio.ensure_future(rec.request("after"))
        await asyncio.sleep(2.0)
        doomed.cancel()
        await asyncio.gather(holder, after)
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return rec.starts, lim.stats()

    starts, stats = run(main())
    assert starts == [("holder", 0.0), ("after", pytest.approx(5.0))]
    assert stats.starts == 2
    assert stats.in_flight == 0
    assert stats.waiting == 0


def test_cancelled_head_sleeping_on_the_rate_lets_the_next_go() -> None:
    """Cancelling the waiter that sleeps until its start time hands that time to the next."""

    async def main() -> list[tuple[str, float]]:
        rec = Recorder(limiter(rate=0.1))
        await rec.request("first")
        head = asyncio.ensure_future(rec.request("head"))
        nxt = asyncio.ensure_future(rec.request("next"))
        await asyncio.sleep(3.0)
        head.cancel()
        await nxt
        return rec.starts

    assert run(main()) == [("first", 0.0), ("next", pytest.approx(10.0))]


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(RuntimeError("backend broke"), id="error"),
        pytest.param(asyncio.CancelledError(), id="cancelled"),
    ],
)
def test_slot_is_released_when_the_request_fails(failure: BaseException) -> None:
    """An exception or cancellation inside `slot` gives the concurrency slot back."""

    async def main() -> list[str]:
        lim = limiter(concurrency=1)
        rec = Recorder(lim)

        async def failing() -> None:
            async with lim.slot(1):
                raise failure

        with pytest.raises(type(failure)):
            await failing()
        await asyncio.wait_for(rec.request("next"), timeout=1.0)
        assert lim.stats().in_flight == 0
        return rec.names()

    assert run(main()) == ["next"]


@pytest.mark.parametrize(
    ("hint", "expected"),
    [
        pytest.param(RateLimitHint(remaining=2, reset_s=10.0), [0.0, 5.0, 10.0], id="spread"),
        pytest.param(RateLimitHint(remaining=0, reset_s=30.0), [30.0, 30.0, 30.0], id="exhausted"),
        pytest.param(RateLimitHint(remaining=100, reset_s=1.0), [0.0, 0.01, 0.02], id="plenty"),
        pytest.param(RateLimitHint(remaining=None, reset_s=10.0), [0.0, 0.0, 0.0], id="partial"),
        pytest.param(None, [0.0, 0.0, 0.0], id="none"),
    ],
)
def test_rate_limit_headers_pace_the_remaining_requests(
    hint: RateLimitHint | None, expected: list[float]
) -> None:
    """`remaining` requests are spread over the `reset_s` left; none left waits for the reset."""

    async def main() -> list[float]:
        lim = limiter()
        lim.observe(hint)
        rec = Recorder(lim)
        await asyncio.gather(*(rec.request(str(i)) for i in range(3)))
        return rec.times()

    assert run(main()) == pytest.approx(expected)


def test_rate_limit_hint_expires_at_the_reset() -> None:
    """After the announced reset the hint no longer slows starts."""

    async def main() -> list[float]:
        lim = limiter()
        lim.observe(RateLimitHint(remaining=1, reset_s=10.0))
        rec = Recorder(lim)
        await rec.request("a")
        await asyncio.sleep(20.0)
        await asyncio.gather(rec.request("b"), rec.request("c"))
        return rec.times()

    assert run(main()) == pytest.approx([0.0, 20.0, 20.0])


def test_looser_rate_limit_hint_lets_a_waiting_start_go() -> None:
    """A fresh hint with more room releases the waiter that an older, tighter hint held back."""

    async def main() -> list[float]:
        lim = limiter()
        lim.observe(RateLimitHint(remaining=1, reset_s=100.0))
        rec = Recorder(lim)
        await asyncio.gather(
            rec.request("a"),
            rec.request("b"),
            at(10.0, partial(lim.observe, RateLimitHint(remaining=10, reset_s=10.0))),
        )
        return rec.times()

    assert run(main()) == pytest.approx([0.0, 10.0])


def test_waiting_does_not_busy_loop() -> None:
    """100 waiters behind a one-hour pause cost O(waiters) sleeps, each to a computed time."""
    sleeps: list[float] = []

    async def counting_sleep(delay: float) -> None:
        sleeps.append(delay)
        await asyncio.sleep(delay)

    async def main() -> list[float]:
        lim = limiter(rate=1.0, sleep=counting_sleep)
        lim.pause(3600.0)
        rec = Recorder(lim)
        await asyncio.gather(*(rec.request(str(i)) for i in range(100)))
        return rec.times()

    times = run(main())
    assert times[:2] == pytest.approx([3600.0, 3602.0])  # the 429 halved the rate
    assert all(1.0 <= b - a <= 2.0 + 1e-9 for a, b in itertools.pairwise(times))
    assert len(sleeps) <= 101
    assert sleeps[0] == pytest.approx(3600.0)


def test_stats_is_a_frozen_snapshot() -> None:
    """`stats()` reports counters at the time of the call and cannot be changed."""

    async def main() -> tuple[LimiterStats, LimiterStats]:
        lim = limiter(rate=5.0, concurrency=2)
        before = lim.stats()
        rec = Recorder(lim)
        await asyncio.gather(*(rec.request(str(i), hold=1.0) for i in range(3)))
        return before, lim.stats()

    before, after = run(main())
    assert before == LimiterStats(
        starts=0,
        pauses=0,
        effective_rate=5.0,
        effective_image_rate=None,
        in_flight=0,
        max_in_flight=0,
        waiting=0,
    )
    assert (after.starts, after.max_in_flight, after.in_flight) == (3, 2, 0)
    with pytest.raises(AttributeError):
        after.starts = 9  # type: ignore[misc]


def test_fake_clock_and_sleep_can_be_injected() -> None:
    """The limiter reads the injected clock, so it runs on any fake time source."""
    now = [100.0]
    sleeps: list[float] = []

    async def fake_sleep(delay: float) -> None:
        sleeps.append(delay)
        now[0] += delay
        await asyncio.sleep(0)

    async def main() -> None:
        lim = Limiter(
            rate=0.5, image_rate=None, concurrency=1, clock=lambda: now[0], sleep=fake_sleep
        )
        for _ in range(3):
            async with lim.slot(1):
                pass

    asyncio.run(main())
    assert sleeps == pytest.approx([2.0, 2.0])
    assert now[0] == pytest.approx(104.0)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"rate": 0.0}, id="zero-rate"),
        pytest.param({"image_rate": -1.0}, id="negative-image-rate"),
        pytest.param({"concurrency": 0}, id="zero-concurrency"),
        pytest.param({"default_pause_s": -1.0}, id="negative-pause"),
        pytest.param({"min_rate_fraction": 0.0}, id="zero-floor"),
    ],
)
def test_invalid_settings_are_refused(overrides: dict[str, Any]) -> None:
    """Settings that could never admit a start are refused when the limiter is built."""
    with pytest.raises(ValueError, match=next(iter(overrides))):
        limiter(**overrides)


def test_request_of_no_images_is_refused() -> None:
    """`slot(0)` is a caller bug, not a free request."""

    async def main() -> None:
        async with limiter().slot(0):
            pass

    with pytest.raises(ValueError, match="n_images"):
        run(main())


# ------------------------------------------------ a server's real limit, found on fake time


class ServerBucket:
    """A strict server: a token bucket of `capacity` refilled at `rate`, on the loop's clock.

    `rate` may change during a run (the account's limit was raised).
    """

    def __init__(self, rate: float, capacity: float = 1.0) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.at = 0.0

    def admit(self) -> bool:
        now = asyncio.get_running_loop().time()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Traffic:
    """Workers asking a `ServerBucket` through a limiter, as the engine does; records answers."""

    def __init__(self, lim: Limiter, server: ServerBucket, retry_after: float | None) -> None:
        self.lim = lim
        self.server = server
        self.retry_after = retry_after
        self.answers: list[tuple[float, bool]] = []  # (start time, admitted)
        self.rates: list[tuple[float, float]] = []  # (time, effective rate) once a second

    async def run(self, until: float, workers: int = 16, latency: float = 0.2) -> None:
        await asyncio.gather(
            self._watch(until), *(self._work(until, latency) for _ in range(workers))
        )

    async def _work(self, until: float, latency: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < until:
            async with self.lim.slot(1) as ticket:
                admitted = self.server.admit()
                self.answers.append((loop.time(), admitted))
                if not admitted:
                    self.lim.pause(self.retry_after, started_at=ticket.started_at)
                    continue
                await asyncio.sleep(latency)
            self.lim.record_success()

    async def _watch(self, until: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < until:
            self.rates.append((loop.time(), self.lim.stats().effective_rate or 0.0))
            await asyncio.sleep(1.0)

    def admitted_per_s(self, start: float, end: float) -> float:
        return sum(ok for t, ok in self.answers if start <= t < end) / (end - start)

    def share_429(self, start: float, end: float) -> float:
        window = [ok for t, ok in self.answers if start <= t < end]
        return window.count(False) / len(window)

    def rates_between(self, start: float, end: float) -> list[float]:
        return [rate for t, rate in self.rates if start <= t < end]


@pytest.mark.parametrize(
    ("retry_after", "capacity", "overshoot"),
    [
        pytest.param(1.0, 1.0, 1.05, id="retry-after-1s-bucket-1"),
        pytest.param(2.0, 1.0, 1.05, id="retry-after-2s-bucket-1"),
        pytest.param(None, 1.0, 1.05, id="no-retry-after-bucket-1"),
        # a bucket of 5 lets a probe run above the limit for a few seconds before a 429
        pytest.param(1.0, 5.0, 1.1, id="retry-after-1s-bucket-5"),
    ],
)
def test_pace_converges_just_under_the_servers_limit_and_stays(
    retry_after: float | None, capacity: float, overshoot: float
) -> None:
    """Asked 40/s of a server allowing 10/s, the pace settles under 10/s and stays there."""

    async def main() -> Traffic:
        traffic = Traffic(limiter(rate=40.0), ServerBucket(10.0, capacity), retry_after)
        await traffic.run(until=300.0)
        return traffic

    traffic = run(main())
    settled = traffic.rates_between(60.0, 300.0)
    assert max(settled) <= 10.0 * overshoot  # never far above the limit: a probe, then a 429
    assert sum(settled) / len(settled) >= 8.5
    assert traffic.admitted_per_s(60.0, 300.0) >= 8.0
    assert traffic.share_429(60.0, 300.0) <= 0.02
    assert traffic.lim.stats().rate_429_per_s == pytest.approx(10.0, rel=0.15)


def test_pace_climbs_back_when_the_servers_limit_rises() -> None:
    """After the account's limit goes from 10/s to 20/s, the pace follows it up, in time."""

    async def main() -> Traffic:
        server = ServerBucket(10.0)
        traffic = Traffic(limiter(rate=40.0), server, 1.0)
        await traffic.run(until=100.0)
        server.rate = 20.0
        await traffic.run(until=300.0)
        return traffic

    traffic = run(main())
    assert max(traffic.rates_between(50.0, 100.0)) <= 10.5
    assert min(traffic.rates_between(250.0, 300.0)) >= 16.0
    assert traffic.admitted_per_s(250.0, 300.0) >= 16.0


def test_pace_never_exceeds_the_spec_rate() -> None:
    """A server allowing more than the spec asks gets exactly the spec's rate, never more."""

    async def main() -> Traffic:
        traffic = Traffic(limiter(rate=8.0), ServerBucket(10.0), 1.0)
        await traffic.run(until=120.0)
        return traffic

    traffic = run(main())
    assert max(rate for _, rate in traffic.rates) == pytest.approx(8.0)
    assert traffic.share_429(0.0, 120.0) == 0.0
    assert traffic.lim.stats().learned_rate_per_s is None  # nothing to remember


def test_run_starts_from_the_learned_rate() -> None:
    """Given what the last run learned, the pace starts there and gets (almost) no 429."""

    async def main() -> Traffic:
        learned = LearnedPace(rate_per_s=9.5, rate_429_per_s=10.0)
        traffic = Traffic(limiter(rate=40.0, learned=learned), ServerBucket(10.0), 1.0)
        assert traffic.lim.stats().effective_rate == pytest.approx(9.5)
        await traffic.run(until=60.0)
        return traffic

    traffic = run(main())
    assert traffic.admitted_per_s(0.0, 60.0) >= 9.0
    assert traffic.share_429(0.0, 60.0) <= 0.02


@pytest.mark.parametrize(
    ("learned", "rate", "expected"),
    [
        pytest.param(LearnedPace(rate_per_s=9.5), 40.0, 9.5, id="below-the-spec"),
        pytest.param(LearnedPace(rate_per_s=9.5), 5.0, 5.0, id="spec-lowered-since"),
        pytest.param(LearnedPace(image_rate_per_s=2.0), 40.0, 40.0, id="no-image-limit-now"),
        pytest.param(None, 40.0, 40.0, id="nothing-learned"),
    ],
)
def test_learned_rate_is_capped_by_the_spec(
    learned: LearnedPace | None, rate: float, expected: float
) -> None:
    """A learned rate never lifts the pace above today's spec rate."""

    async def main() -> float | None:
        return limiter(rate=rate, learned=learned).stats().effective_rate

    assert run(main()) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        pytest.param(
            {"learned_rate_per_s": 9.5, "rate_429_per_s": 10.0},
            LearnedPace(rate_per_s=9.5, rate_429_per_s=10.0),
            id="learned",
        ),
        pytest.param({"learned_rate_per_s": None}, None, id="nothing-learned"),
        pytest.param({"learned_rate_per_s": "fast"}, None, id="garbage"),
        pytest.param({"learned_rate_per_s": -3}, None, id="negative"),
        pytest.param([1, 2], None, id="not-a-dict"),
    ],
)
def test_learned_pace_is_read_from_a_summary_section(section: object, expected: object) -> None:
    """The summary's limiter section gives a LearnedPace; anything odd gives none."""
    assert learned_pace(section) == expected


def test_only_the_first_429_of_a_burst_cuts_the_pace() -> None:
    """429s of requests started before the cut extend the pause but do not cut again."""

    async def main() -> tuple[LimiterStats, LimiterStats]:
        lim = limiter(rate=10.0)
        tickets = []
        for _ in range(3):
            async with lim.slot(1) as ticket:
                tickets.append(ticket)
        for ticket in tickets:  # three answers of one burst come back
            lim.pause(1.0, started_at=ticket.started_at)
        burst = lim.stats()
        async with lim.slot(1) as later:
            pass
        lim.pause(1.0, started_at=later.started_at)  # started after the cut: a new event
        return burst, lim.stats()

    burst, after = run(main())
    assert (burst.slowdowns, burst.pauses, burst.effective_rate) == (1, 3, pytest.approx(5.0))
    assert after.slowdowns == 2
    assert after.effective_rate is not None
    assert after.effective_rate < 5.0


def test_default_pause_doubles_until_a_success() -> None:
    """Without Retry-After each new 429 burst pauses twice as long; a success resets it."""

    async def main() -> list[float]:
        lim = limiter(rate=100.0, default_pause_s=1.0)
        rec = Recorder(lim)
        for _ in range(3):
            await rec.request("x")
            lim.pause(None, started_at=rec.starts[-1][1])
        await rec.request("x")
        lim.record_success()
        lim.pause(None, started_at=rec.starts[-1][1])
        await rec.request("x")
        return rec.times()

    times = run(main())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == pytest.approx([1.0, 2.0, 4.0, 1.0])
