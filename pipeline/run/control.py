"""How a run is stopped from outside: signals for the CLI, `RunControl` for library callers.

Both stop the same way (the run's `RunStop`, shared by every stage): nothing new starts,
requests in flight get the grace period, the manifest stays consistent. Signal handlers
belong to the process's owner (the CLI, on the main thread); a scheduler's task, which may
run on any thread, uses a `RunControl` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator

from ..errors import UsageError
from .pool import RunStop, StopReason

__all__ = ["RunControl", "signal_handlers"]

log = logging.getLogger(__name__)


class RunControl:
    """Stops a run gracefully from any thread: what a scheduler's cancel hook calls.

    Like a first SIGINT: nothing new starts, in-flight items get the grace period, the
    manifest stays consistent, and the result's stop reason is ``stopped`` (exit 130).
    A stop asked for before the run starts takes effect as soon as it does.

    One control serves one run: make a new one for each. It is never reset (a stop that
    arrived after its run ended would otherwise stop the next one, or a stop asked before
    a run be forgotten), so `synthaug.run` and `run_async` refuse a control that a run
    already took with a `UsageError`, before anything is done.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._target: tuple[asyncio.AbstractEventLoop, RunStop] | None = None
        self._requested = False
        self._claimed = False

    @property
    def stop_requested(self) -> bool:
        """True once `stop` was called."""
        return self._requested

    def claim(self) -> None:
        """Take this control for a run; raise `UsageError` if a run already took it."""
        with self._lock:
            claimed, self._claimed = self._claimed, True
        if claimed:
            raise UsageError(
                "this RunControl was already used by a run: a RunControl serves one run; "
                "pass a new synthaug.RunControl() to each run"
            )

    def stop(self) -> None:
        """Ask the run to stop; safe from any thread, and more than once."""
        with self._lock:
            self._requested = True
            target = self._target
        if target is not None:
            loop, stop = target
            loop.call_soon_threadsafe(stop.stop, "stopped")

    @contextlib.asynccontextmanager
    async def attached(self, stop: RunStop) -> AsyncIterator[None]:
        """Route `stop` to the run (its `RunStop`) while it lasts."""
        with self._lock:
            self._target = (asyncio.get_running_loop(), stop)
            requested = self._requested
        if requested:
            stop.stop("stopped")
        try:
            yield
        finally:
            with self._lock:
                self._target = None


@contextlib.asynccontextmanager
async def signal_handlers(stop: RunStop, *, enabled: bool) -> AsyncIterator[None]:
    """First SIGINT/SIGTERM: stop starting, let in-flight finish; second: cancel at once."""
    if not enabled:
        yield
        return
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def on_signal(reason: StopReason) -> None:
        if stop.stopping and stop.reason in ("sigint", "sigterm"):
            log.warning("second signal: cancelling in-flight requests now")
            task.cancel()
            return
        log.warning(
            "%s received: finishing in-flight requests (again to cancel them)", reason.upper()
        )
        stop.stop(reason)

    loop.add_signal_handler(signal.SIGINT, on_signal, "sigint")
    loop.add_signal_handler(signal.SIGTERM, on_signal, "sigterm")
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
