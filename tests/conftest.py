"""Shared fixtures: every test runs sandboxed in its own tmp dir with a clean env."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
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
