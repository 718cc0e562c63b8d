"""The one worker pool: how a run's stages take work, stop, and end.

Every stage that calls a remote API (generation, upload, and the stages to come) runs in
a `Lane`: a queue and that stage's own number of workers, each taking one piece of work
at a time. All lanes of a run share one `RunStop`, so a fatal answer or a full disk in
any stage stops every stage, and a signal or `RunControl` stops them all the same way:
nothing new starts, work in flight gets the grace period, then is cancelled. A stage says
which stop reasons halt it (uploads go on after a budget stop: what was paid for is still
delivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from ..errors import FatalError, OutputError

__all__ = ["Lane", "RunStop", "StopReason"]

log = logging.getLogger(__name__)

StopReason = Literal["budget", "fatal", "aborted", "sigint", "sigterm", "disk", "stopped"]
T = TypeVar("T")


class RunStop:
    """Why and whether a run is stopping, shared by every lane of the run.

    The first reason given is the one reported; `fatal_error` and `output_error` keep
    the first answer or disk failure that stopped it, for the run's last message.
    """

    def __init__(self) -> None:
        self.reason: StopReason | None = None
        self.fatal_error: FatalError | None = None
        self.output_error: OutputError | None = None
        self._event = asyncio.Event()

    def stop(self, reason: StopReason) -> None:
        """Start nothing new from now on."""
        if self.reason is None:
            self.reason = reason
            log.info("stopping: %s", reason)
        self._event.set()

    def fatal(self, exc: FatalError) -> None:
        """A refused key, unknown project or exhausted quota: stop the whole run."""
        if self.fatal_error is None:
            self.fatal_error = exc
        self.stop("fatal")

    def disk(self, exc: OSError | OutputError, out_dir: Path) -> None:
        """Writing failed (disk full, read-only remount): stop cleanly, say how to go on."""
        if self.output_error is None:
            self.output_error = (
                exc
                if isinstance(exc, OutputError)
                else OutputError(
                    f"cannot write in {out_dir}: {exc.strerror or exc}; "
                    "fix the disk and run the same command again to resume"
                )
            )
        self.stop("disk")

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for."""
        return self._event.is_set()

    async def wait(self) -> None:
        """Return once a stop was asked for."""
        await self._event.wait()

    async def sleep(self, seconds: float, halts: Callable[[], bool]) -> None:
        """Sleep between attempts, cut short by a stop that `halts` this stage (its next
        attempt then stands down); a stop that does not halt it leaves the sleep whole."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        if not self.stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout=seconds)
        if not halts():
            await asyncio.sleep(max(0.0, deadline - loop.time()))


class Lane(Generic[T]):
    """One stage's workers: `workers` tasks taking work from a queue (bounded by
    `maxsize`, 0 for none) and running `process` on each, one at a time.

    A stop that `halts` the lane makes its workers drop what is still queued (`dropped`
    is called for each, to give back what it reserved); `finish` then gives the work in
    flight `grace_s(reason)` seconds (None: as long as it takes) before cancelling it.
    """

    def __init__(
        self,
        name: str,
        workers: int,
        process: Callable[[T], Awaitable[None]],
        stop: RunStop,
        *,
        halts: Callable[[], bool],
        grace_s: Callable[[StopReason | None], float | None],
        maxsize: int = 0,
        dropped: Callable[[T], None] = lambda _todo: None,
    ) -> None:
        self.name = name
        self._count = workers
        self._process = process
        self._stop = stop
        self._halts = halts
        self._grace_s = grace_s
        self._dropped = dropped
        self._queue: asyncio.Queue[T | None] = asyncio.Queue(maxsize)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def halted(self) -> bool:
        """True once a stop halts this lane: nothing new may start in it."""
        return self._halts()

    def start(self) -> None:
        """Start the workers."""
        self._tasks = [
            asyncio.create_task(self._work(), name=f"{self.name}-{i}") for i in range(self._count)
        ]

    async def put(self, todo: T) -> None:
        """Queue `todo`, waiting while a bounded queue is full."""
        await self._queue.put(todo)

    def put_nowait(self, todo: T) -> None:
        """Queue `todo` at once (an unbounded lane)."""
        self._queue.put_nowait(todo)

    async def close(self) -> None:
        """No more work will be queued: each worker ends after what is queued."""
        if not self._closed:
            self._closed = True
            for _ in self._tasks:
                await self._queue.put(None)

    async def finish(self, *feeders: asyncio.Task[None]) -> None:
        """Wait for the workers (and the `feeders` that fill the queue) to end; after a
        stop, the grace period, then cancel.

        A bug in a worker or a feeder is raised here.
        """
        everything: asyncio.Future[Any] = asyncio.gather(*feeders, *self._tasks)
        stop_wait: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([everything, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            if not everything.done():
                grace = self._grace_s(self._stop.reason)
                done, _ = await asyncio.wait({everything}, timeout=grace)
                if not done:
                    log.warning("grace period over: cancelling %s work in flight", self.name)
            if everything.done() and not everything.cancelled():
                everything.result()
        finally:
            stop_wait.cancel()
            if not everything.done():
                everything.cancel()
            await asyncio.gather(everything, stop_wait, return_exceptions=True)

    async def cancel(self) -> None:
        """Cancel every worker at once (the run is being cancelled)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _work(self) -> None:
        while (todo := await self._queue.get()) is not None:
            if self._halts():
                self._dropped(todo)
                continue  # drain without starting: whoever feeds the queue is not blocked
            await self._process(todo)
