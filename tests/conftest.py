"""Shared fixtures: every test runs sandboxed in its own tmp dir with a clean env."""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from unittest.mock import Mock

import pytest
import yaml
from aiohttp import ClientResponse
from aioresponses import aioresponses


@pytest.fixture(autouse=True)
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run each test in its own cwd with no real API key or proxy in the environment."""
    monkeypatch.chdir(tmp_path)
    for var in ("ROBOFLOW_API_KEY", "OPENAI_API_KEY", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return tmp_path


class _CompatClientResponse(ClientResponse):
    """aiohttp 3.14 made `stream_writer` a required argument; aioresponses 0.7.9 omits it.

    Drop this subclass (and `response_class=` below) once aioresponses ships the fix
    (aioresponses issue #289, PR #288).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", Mock(output_size=0))
        super().__init__(*args, **kwargs)


class CompatAioresponses(aioresponses):
    """aioresponses whose every registered answer uses `_CompatClientResponse`.

    aioresponses takes `response_class=` per registered URL, so default it here.
    Drop with `_CompatClientResponse`.
    """

    def add(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("response_class", _CompatClientResponse)
        super().add(*args, **kwargs)


@pytest.fixture
def mock_http() -> Iterator[aioresponses]:
    """aioresponses with the aiohttp 3.14 compatibility shim; loopback passes through."""
    with CompatAioresponses(passthrough=["http://127.0.0.1"]) as mocked:
        yield mocked


@pytest.fixture
def spec_factory(tmp_path: Path) -> Callable[..., Path]:
    """Write a job spec into tmp_path and return its path.

    With no text, a minimal valid mock spec (one prompt-only source) updated with the
    keyword overrides is dumped as YAML; with text, that text is written as is.
    """

    def make(text: str | None = None, *, filename: str = "spec.yaml", **overrides: Any) -> Path:
        path = tmp_path / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            data: dict[str, Any] = {
                "version": 1,
                "name": "job",
                "backend": {"kind": "mock"},
                "sources": [{"name": "cats", "prompt": "a cat"}],
            }
            data.update(overrides)
            text = yaml.safe_dump(data, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    return make


T = TypeVar("T")


class _VirtualSelector(selectors.DefaultSelector):
    """Never waits for a timer: when nothing is ready, the clock jumps to the next one.

    While work handed to a thread is outstanding (`busy`), it waits for real instead,
    for that work to finish: thread work takes no virtual time, so the order of events
    never depends on how fast the machine is.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.busy = 0

    def select(self, timeout: float | None = None) -> list[Any]:
        if self.busy and timeout != 0:
            events: list[Any] = super().select(_THREAD_WORK_TIMEOUT_S)
            if not events:
                raise RuntimeError("work handed to a thread did not finish")
            return events
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:  # nothing scheduled and nothing ready: the test would hang
            raise RuntimeError("deadlock: every task waits and no timer is pending")
        self.now += timeout
        return events


_THREAD_WORK_TIMEOUT_S = 60.0


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: `asyncio.sleep(3600)` returns at once, an hour later.

    For tests of timing behaviour (pacing, backoff, grace periods) that must neither
    sleep for real nor depend on how fast the machine is. Work sent to a thread
    (`asyncio.to_thread`) completes before virtual time moves on.
    """

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now

    def run_in_executor(self, executor: Any, func: Any, *args: Any) -> asyncio.Future[Any]:
        future = super().run_in_executor(executor, func, *args)
        self._virtual.busy += 1
        future.add_done_callback(self._work_done)
        return future

    def _work_done(self, _future: asyncio.Future[Any]) -> None:
        self._virtual.busy -= 1


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh virtual-time loop, then close it cleanly."""
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
