"""Shared plumbing of the benchmark scripts: specs, the mock server process, measuring a child.

Every benchmark runs synthaug as its own process (`python -m pipeline ...`), so that its
CPU time and peak RSS are its own: `os.wait4` returns the rusage of exactly that child.
The mock API runs in another process, so its work (drawing PNGs) is never counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
KEY_ENV = "SYNTHAUG_BENCH_KEY"
PYTHON = sys.executable


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "load_avg_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def factor_pair(n: int) -> tuple[int, int]:
    """Two factors of `n` as close as possible: a prompt grid of a x b = n items."""
    a = int(n**0.5)
    while n % a:
        a -= 1
    return a, n // a


def write_spec(
    folder: Path,
    *,
    name: str,
    items: int,
    base_url: str,
    concurrency: int,
    rate_limit: float,
    max_attempts: int = 6,
) -> Path:
    """A prompt-only job of `items` distinct requests (a two-variable grid), 64x64 images.

    Every body differs, so the mock's ``duplicates`` counter means "paid twice".
    """
    a, b = factor_pair(items)
    run: dict[str, Any] = {
        "concurrency": concurrency,
        "max_items": max(items, 10_000),
        "max_attempts": max_attempts,
        "backoff_base_s": 0.5,
        "rate_limit": f"{rate_limit:g}/s",  # omitted, a roboflow backend defaults to 5/min
    }
    spec = {
        "version": 1,
        "name": name,
        "output_dir": "out",
        "backend": {"kind": "roboflow", "base_url": base_url, "api_key_env": KEY_ENV},
        "project_url": "bench",
        "params": {"size": "64x64", "quality": "low"},
        "run": run,
        "sources": [
            {
                "name": "grid",
                "prompt": "bench {a} {b}",
                "vars": {"a": [f"a{i}" for i in range(a)], "b": [f"b{i}" for i in range(b)]},
            }
        ],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def free_port() -> int:
    """A free loopback port (the mock binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str, timeout: float = 5.0) -> Any:
    """GET a JSON document (the mock's /_stats)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def mock_server(
    *,
    latency: float,
    rate_limit: float | None,
    burst: int = 1,
    extra: Mapping[str, Any] | None = None,
) -> Iterator[str]:
    """`synthaug mock-server` in its own process; yields its base URL, stops it after.

    `burst` > 1 (the bucket size of the enforced limit; the CLI has no flag for it yet)
    or `extra` (more `MockConfig` fields, JSON values) starts the same server through
    `run_mock_server` with that `MockConfig`.
    """
    port = free_port()
    cmd = [PYTHON, "-m", "pipeline", "mock-server", "--port", str(port), "--latency", str(latency)]
    if rate_limit is not None:
        cmd += ["--rate-limit", f"{rate_limit:g}/s"]
    if burst > 1 or extra:
        config = {"latency_s": latency, "rate_limit": rate_limit, "burst": burst, **(extra or {})}
        code = (
            "import json, sys; from pipeline.mockapi.server import MockConfig, run_mock_server; "
            "run_mock_server(MockConfig(**json.loads(sys.argv[1])), '127.0.0.1', int(sys.argv[2]))"
        )
        cmd = [PYTHON, "-c", code, json.dumps(config), str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                get_json(base + "/_stats", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"mock server did not start: {err}") from None
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class StatsPoller:
    """Samples the mock's counters (``GET /_stats``) in a thread, with their time.

    `start_rate` times the first and last request start: `requests / (last start - first
    start)` is the fair rate, leaving out process start-up, reading the spec and the
    last answer's latency and download.
    """

    base_url: str
    interval: float = 0.02
    samples: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> StatsPoller:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.monotonic(), get_json(self.base_url + "/_stats")))
            self._stop.wait(self.interval)

    def start_rate(self) -> float | None:
        """Request starts per second between the first sample above 0 and the final count."""
        counts = [(t, int(stats["requests"])) for t, stats in self.samples]
        moving = [(t, n) for t, n in counts if n > 0]
        if len(moving) < 2:
            return None
        final = moving[-1][1]
        t1, n1 = moving[0]
        t2, n2 = next((t, n) for t, n in moving if n == final)
        return (n2 - n1) / (t2 - t1) if t2 > t1 else None


@dataclass(frozen=True)
class ChildRun:
    """A finished child process: exit code, wall time, its own CPU seconds and peak RSS."""

    returncode: int
    wall_s: float
    cpu_s: float
    sys_s: float
    max_rss_mb: float
    stdout: str
    stderr: str


def run_child(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    interrupt_after: float | None = None,
) -> ChildRun:
    """Run `python -m pipeline ARGS` and measure exactly that process with `os.wait4`.

    With `interrupt_after`, the child gets SIGINT after that many seconds (a clean stop).
    """
    full_env = {**os.environ, KEY_ENV: "bench-key", **(env or {})}
    out_path, err_path = _scratch_name("out"), _scratch_name("err")
    with out_path.open("w+b") as out, err_path.open("w+b") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [PYTHON, "-m", "pipeline", *args], cwd=cwd, env=full_env, stdout=out, stderr=err
        )
        timer = None
        if interrupt_after is not None:
            timer = threading.Timer(interrupt_after, os.kill, (proc.pid, signal.SIGINT))
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        if timer is not None:
            timer.cancel()
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    out_path.unlink()
    err_path.unlink()
    return ChildRun(
        returncode=proc.returncode,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        sys_s=usage.ru_stime,
        max_rss_mb=usage.ru_maxrss / 1024,  # Linux: kilobytes
        stdout=stdout,
        stderr=stderr,
    )


def _scratch_name(tag: str) -> Path:
    return Path(f"/tmp/synthaug-bench-{os.getpid()}-{tag}-{time.monotonic_ns()}")


def save_results(section: str, payload: dict[str, Any]) -> None:
    """Merge `payload` under `section` into benchmarks/results.json (or the file named by
    $SYNTHAUG_BENCH_RESULTS, as the smoke tests do), with machine and date."""
    target = Path(os.environ.get("SYNTHAUG_BENCH_RESULTS") or RESULTS)
    data: dict[str, Any] = {}
    if target.exists():
        with contextlib.suppress(ValueError):
            data = json.loads(target.read_text(encoding="utf-8"))
    data[section] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        **payload,
    }
    target.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def percent(value: float | None) -> str:
    """A share as a table cell: ``12.3%``, or ``-`` when not measured."""
    return "-" if value is None else f"{value:.1%}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table (pastes straight into the README)."""
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
