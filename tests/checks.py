"""Assertions shared by the end-to-end test modules (imported as `checks`)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from pipeline.jobspec.load import load_spec
from pipeline.manifest.log import read_latest
from pipeline.mockapi.server import MockConfig, MockServer
from pipeline.records import ItemRecord, ItemStatus, OutputFile
from pipeline.run.job import JobResult, run_job


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


def write_job_spec(
    folder: Path,
    base_url: str,
    *,
    name: str = "e2e",
    prompts: int = 6,
    values: list[str] | None = None,
    repeats: int = 1,
    n: int = 1,
    size: str = "32x32",
    timeout_s: float = 2.0,
    out: str = "out",
    **run: Any,
) -> Path:
    """Write a roboflow-kind spec against `base_url` with one prompt grid of `prompts`
    values, tuned for tests (fast backoff, a high rate limit); `run` overrides it."""
    source: dict[str, Any] = {
        "name": name,
        "prompt": f"{name} item {{i}}",
        "vars": {"i": values or [str(i) for i in range(prompts)]},
    }
    if repeats != 1:
        source["repeats"] = repeats
    spec = {
        "version": 1,
        "name": name,
        "output_dir": out,
        "backend": {"kind": "roboflow", "base_url": base_url, "timeout_s": timeout_s},
        "project_url": name,
        "params": {"size": size, "n": n},
        "run": {
            "concurrency": 4,
            "max_attempts": 8,
            "grace_period_s": 5,
            "backoff_base_s": 0.01,
            "backoff_max_s": 0.1,
            "rate_limit": "1000/s",
            **run,
        },
        "sources": [source],
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


async def run_spec(path: Path) -> JobResult:
    """Run (or resume) the job at `path` in this event loop, without signal handlers."""
    return await run_job(load_spec(path), spec_path=path, install_signals=False)


def run_cli_at_debug(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """`synthaug run SPEC --log-level DEBUG` in a child process with `env` added: what a
    user would see in a terminal or a cron log, for secret-leak checks."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            str(path),
            "--log-level",
            "DEBUG",
            "--no-progress",
        ],
        env={**os.environ, **env},
        capture_output=True,
        timeout=120,
        check=False,
    )


def free_port() -> int:
    """A loopback port nobody listens on (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def mock_server_process(folder: Path, *flags: str) -> Iterator[str]:
    """`synthaug mock-server FLAGS` in a subprocess (its counters outlive a killed
    client); yields its base URL."""
    port = free_port()
    log = (folder / f"mock-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "mock-server", "--port", str(port), *flags],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(base), what="mock server to listen")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/_stats", timeout=1):
            return True
    except OSError:
        return False


def stats(base: str) -> dict[str, Any]:
    """The mock's counters (``GET /_stats``)."""
    with urllib.request.urlopen(f"{base}/_stats", timeout=5) as resp:
        return dict(json.load(resp))


def wait_until(predicate: Callable[[], Any], *, what: str, limit_s: float = 60.0) -> None:
    """Poll a condition (not a timing assertion: the limit only stops a hung test)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def mock_spec(name: str = "api-job", **overrides: Any) -> dict[str, Any]:
    """A mock-backend job as a dict: a 2 x 2 prompt grid of small images."""
    spec: dict[str, Any] = {
        "version": 1,
        "name": name,
        "backend": {"kind": "mock"},
        "output_dir": "out",
        "params": {"size": "32x32"},
        "sources": [{"name": "grid", "prompt": "a {red|blue} {cat|dog}"}],
    }
    spec.update(overrides)
    return spec


def bare_record(
    key: str,
    status: ItemStatus = "ok",
    *,
    source: str = "s",
    outputs: tuple[OutputFile, ...] = (),
    attempts: int = 0,
) -> ItemRecord:
    """A manifest record of `key` with nothing recorded but its status (and `outputs`)."""
    return ItemRecord(
        key=key,
        status=status,
        source=source,
        vars={},
        repeat=0,
        input=None,
        prompt="p",
        params={},
        outputs=outputs,
        attempts=attempts,
    )


def start_run(spec: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`synthaug run SPEC` in a child with `env` added (a test kills it); its stderr goes
    to ``run.err`` beside the spec (a full pipe would stall it)."""
    with (spec.parent / "run.err").open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", str(spec), "--no-progress", "--no-grid"],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def distinct_png(seed: int, size: tuple[int, int] = (64, 64)) -> bytes:
    """A picture of its own (smooth blobs from `seed`): pHash tells such pictures apart,
    as it does real photos, where flat test images all look alike to it."""
    rng = random.Random(seed)
    small = Image.new("L", (8, 8))
    small.putdata([rng.randrange(256) for _ in range(64)])
    image = small.resize(size, Image.Resampling.BICUBIC).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto's S3 API served on 127.0.0.1 (a free port) from a thread; yields its URL.

    Served one request at a time (werkzeug without threads): moto checks a write's
    conditions (If-None-Match, If-Match) and then writes, which real S3 does atomically,
    so two racing conditional writes must not interleave inside moto. Each answer closes
    its connection (HTTP/1.0), so a client's pooled connection never blocks another.
    """
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=False, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""The standard variables a client needs against `moto_s3_server` (with its
``AWS_ENDPOINT_URL``)."""
