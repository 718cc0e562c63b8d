"""The limiter paces starts on virtual time: an event loop whose clock jumps to the next timer."""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, TypeVar

import pytest

from pipeline.limiter import Limiter, LimiterStats
from pipeline.records import RateLimitHint

T = TypeVar("T")


class _VirtualSelector(selectors.DefaultSelector):
    """Never blocks: when nothing is ready, the virtual clock jumps to the next timer."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        events: list[Any] = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:  # nothing scheduled and nothing ready: the test would hang
            raise RuntimeError("deadlock: every task waits and no timer is pending")
        self.now += timeout
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: `asyncio.sleep(3600)` returns at once, an hour later."""

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh virtual-time loop."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()


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


def test_rate_halves_after_429_and_recovers_after_successes() -> None:
    """A 429 halves the pace; each success regains 5 % until the configured rate."""

    async def main() -> list[float | None]:
        lim = limiter(rate=2.0, image_rate=4.0)
        seen = [lim.stats().effective_rate]
        lim.pause(0.0)
        seen += [lim.stats().effective_rate, lim.stats().effective_image_rate]
        for _ in range(5):
            lim.record_success()
        seen.append(lim.stats().effective_rate)
        for _ in range(100):
            lim.record_success()
        seen.append(lim.stats().effective_rate)
        return seen

    assert run(main()) == pytest.approx([2.0, 1.0, 2.0, 1.5, 2.0])


def test_halved_rate_spaces_starts_wider() -> None:
    """After a 429 the starts are spaced at the halved rate, not the configured one."""

    async def main() -> list[float]:
        lim = limiter(rate=1.0)
        lim.pause(0.0)
        rec = Recorder(lim)
        await asyncio.gather(*(rec.request(str(i)) for i in range(3)))
        return rec.times()

    assert run(main()) == pytest.approx([0.0, 2.0, 4.0])


def test_success_lets_a_waiting_start_go_earlier() -> None:
    """A success raises the rate at once: the head waiter does not sit out the old interval."""

    async def main() -> list[float]:
        lim = limiter(rate=1.0)
        lim.pause(0.0)  # interval now 2 s
        rec = Recorder(lim)
        for _ in range(9):  # factor 0.5 -> 0.95
            lim.record_success()
        await asyncio.gather(
            rec.request("a"),
            rec.request("b"),
            at(0.5, lim.record_success),  # back to 1.0: b may start at t=1
        )
        return rec.times()

    assert run(main()) == pytest.approx([0.0, 1.0])


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
    assert times == pytest.approx([3600.0 + 2 * i for i in range(100)])  # the 429 halved the rate
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
