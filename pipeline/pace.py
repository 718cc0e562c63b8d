"""Find a server's real rate limit from its 429s: the share of the configured rate to use.

Users rarely know their quota, so the configured rate is a ceiling, not a target. `Pace`
keeps a *factor* in ``(0, 1]`` (the effective rate over the configured one) and moves it
the way TCP moves its congestion window (AIMD), on the limiter's clock:

* A congestion event (the first 429 of a burst) remembers the factor it came at as the
  *threshold* (TCP's ssthresh) and cuts the factor: to `CUT_NEAR` of it when the 429 came
  near the remembered threshold (the known limit, hit again while probing), to `CUT_FAR`
  when no threshold is known or the limit fell well below it (descend fast).
* Growth is in time, not per success: a success says nothing about the next request
  when the server's bucket holds one token, and growing per success snapped the pace
  back above the limit after one or two answers. Far below the threshold the factor
  grows `FAST_GROWTH_PER_S` per second; near it (from `APPROACH` of it) it probes by
  `PROBE_PER_S` of the threshold per second, so the pace stays just under the limit for
  tens of seconds between probes; past it without a 429 the limit has risen, and growth
  speeds up again (`ABOVE_GROWTH_PER_S`) until the threshold is forgotten.
* Only time spent pacing counts: a start that was not held back by the schedule (an idle
  spell, a concurrency cap) proves nothing about a faster rate, as in RFC 7661.

The factor never exceeds 1 (the spec's rate is the ceiling) nor drops below `floor`.
Pure and synchronous: the limiter passes the time in.
"""

from __future__ import annotations

import math

__all__ = [
    "ABOVE_GROWTH_PER_S",
    "APPROACH",
    "CUT_FAR",
    "CUT_NEAR",
    "FAST_GROWTH_PER_S",
    "NEAR_BAND",
    "PROBE_PER_S",
    "Pace",
]

CUT_NEAR = 0.9
CUT_FAR = 0.5
NEAR_BAND = 0.85
"""A 429 at or above this share of the threshold hit the known limit again."""
APPROACH = 0.95
"""Fast growth stops here (share of the threshold); slow probing starts."""
FAST_GROWTH_PER_S = 0.10  # x1.1 per second: from half the limit back to near it in ~7 s
PROBE_PER_S = 0.0015  # of the threshold per second: ~33 s from APPROACH to the threshold
ABOVE_GROWTH_PER_S = 0.02  # x1.02 per second past the threshold: the limit has risen
FORGET_ABOVE = 1.5
"""Past this multiple of the threshold, the threshold is stale: forget it."""
MAX_STEP_S = 1.0
"""At most this much time counts between two starts (a long gap proves nothing)."""


class Pace:
    """The adaptive share of the configured rate; see the module docstring."""

    def __init__(
        self, *, floor: float, now: float, factor: float = 1.0, threshold: float | None = None
    ) -> None:
        if not 0 < floor <= 1:
            raise ValueError(f"floor must be in (0, 1], got {floor}")
        self._floor = floor
        self._factor = min(1.0, max(floor, factor))
        self._threshold = threshold
        self._grown_at = now
        self._last_cut = -math.inf
        self._cuts = 0

    @property
    def factor(self) -> float:
        """Effective rate / configured rate, in ``[floor, 1]``."""
        return self._factor

    @property
    def threshold(self) -> float | None:
        """The factor at which the last congestion event came; None when unknown."""
        return self._threshold

    @property
    def cuts(self) -> int:
        """Congestion events so far (each cut the factor once)."""
        return self._cuts

    @property
    def last_cut(self) -> float:
        """When the last cut happened (-inf before any)."""
        return self._last_cut

    def cut(self, now: float) -> None:
        """A congestion event: remember where it came, then slow down (see module docstring)."""
        factor, threshold = self._factor, self._threshold
        near = threshold is not None and factor >= NEAR_BAND * threshold
        self._threshold = factor
        self._factor = max(self._floor, factor * (CUT_NEAR if near else CUT_FAR))
        self._last_cut = now
        self._grown_at = max(self._grown_at, now)
        self._cuts += 1

    def adopt(self, factor: float, threshold: float | None, last_cut: float) -> None:
        """Take a pace learned elsewhere (a sibling shard on the same key) as this one's.

        A cut that came at `last_cut` or later is a new congestion event; growth starts
        from `factor` now, as if this pace had cut there itself.
        """
        self._factor = min(1.0, max(self._floor, factor))
        self._threshold = threshold
        self._last_cut = max(self._last_cut, last_cut)

    def hold(self, until: float) -> None:
        """No growth before `until` (a pause: time without starts is not time without 429s)."""
        self._grown_at = max(self._grown_at, until)

    def grow(self, now: float, *, paced: bool) -> None:
        """Credit the time since the last call, if this start was held back by the schedule."""
        step = min(now - self._grown_at, MAX_STEP_S)
        self._grown_at = max(self._grown_at, now)
        if not paced or step <= 0 or self._factor >= 1.0:
            return
        self._factor = min(1.0, self._grown(self._factor, step))

    def _grown(self, factor: float, step: float) -> float:
        threshold = self._threshold
        if threshold is None:
            return factor * math.pow(1 + FAST_GROWTH_PER_S, step)
        if factor < APPROACH * threshold:
            return min(factor * math.pow(1 + FAST_GROWTH_PER_S, step), APPROACH * threshold)
        if factor < threshold:
            return min(factor + PROBE_PER_S * threshold * step, threshold * (1 + 1e-9))
        grown = factor * math.pow(1 + ABOVE_GROWTH_PER_S, step)
        if grown >= FORGET_ABOVE * threshold:
            self._threshold = None
        return grown
