"""Assertions shared by the end-to-end test modules (imported as `checks`)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path

from PIL import Image

from pipeline.backends.mock import MockConfig, MockServer
from pipeline.manifest import read_latest


def assert_outputs_valid(out: Path) -> None:
    """Every ok output exists, hashes to its recorded sha256 and decodes fully, and no
    image file under OUT is missing from the manifest."""
    named: set[Path] = set()
    for record in read_latest(out / "manifest.jsonl").values():
        if record["status"] != "ok":
            continue
        for output in record["outputs"]:
            path = out / output["path"]
            named.add(path)
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == output["sha256"], path
            with Image.open(path) as image:
                image.load()
                assert image.size == (output["width"], output["height"])
    on_disk = {p for p in (out / "images").rglob("*") if p.is_file()}
    assert not [p for p in on_disk if p.name.endswith(".tmp")], "half-written temp files left"
    unnamed = on_disk - named
    assert not unnamed, f"files the manifest does not name: {sorted(unnamed)[:3]}"


class ThreadedMock:
    """The mock API served from its own thread and event loop, for tests that run the
    CLI (which owns the main thread's loop) in-process or as a subprocess."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.server = MockServer(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ThreadedMock:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=30)
        return self

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
