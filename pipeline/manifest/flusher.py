"""A thread that runs one flush function when asked: the manifest's periodic fsync, kept
off the event loop.

An fsync takes milliseconds on a local disk and can take far longer on a busy or
network one; run inline, every interval's fsync (and the image-folder fsyncs before it)
held up every request in flight. The writer asks (`request`, which never waits) and this
thread does the work; requests made while a flush runs are folded into one more flush.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Flusher"]

log = logging.getLogger(__name__)


class Flusher:
    """Runs `flush` on its own (daemon) thread each time `request` is called; `close`
    lets a requested flush finish and stops the thread. Owned by one writer."""

    def __init__(self, flush: Callable[[], None], *, name: str) -> None:
        self._flush = flush
        self._cond = threading.Condition()
        self._wanted = False
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Ask for a flush soon; returns at once (one flush serves every request made
        before it starts)."""
        with self._cond:
            self._wanted = True
            self._cond.notify()

    def close(self) -> None:
        """Finish the flush asked for, if any, and stop the thread; safe to call twice."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._closed:
                    self._cond.wait()
                if not self._wanted:
                    return
                self._wanted = False
            try:
                self._flush()
            except Exception:  # a thread's error would vanish: log it, keep serving
                log.exception("the manifest's background fsync failed")
