"""Real-size answers: CPU per 1024² image and the longest event-loop stall, three clients.

    python benchmarks/realsize.py            # 300 items per case: PNG/JPEG x base64/URL
    python benchmarks/realsize.py --tiny     # 4 items of 64 px, one case: a smoke check

The mock (its own process) answers every request with a photo-like image (about 1.3 MB
of PNG or 120 kB of JPEG for 1024², rendered once and reused), as ``b64_json`` inside
the JSON or by URL. Each client runs in a child process of its own and measures itself
from just before its first request to just after its last: CPU seconds of the whole
process (all threads, `getrusage`), and the longest lateness of a 5 ms heartbeat task on
its event loop (a callback holding the loop shows up as that much lateness), while the
answers arrive (first to last item finished) and over the whole run (start-up and
shutdown too). Where Linux tells it (``/proc/thread-self/schedstat``), the longest stall
while answers arrive is split into the loop thread's own CPU time and its wait for a
free CPU; the rest is its wait for the GIL. The client's modules are imported before
it is measured, as `synthaug run` has them before its loop starts. Clients:

- **synthaug**: `run_job` of this tree, as `synthaug run` does it (GC frozen after the
  manifest state is loaded, ``freeze_gc``).
- **floor**: aiohttp and nothing else: read the answer, parse the JSON, base64-decode (or
  GET the URL), sha256, write the file. Everything inline on the loop, nothing checked.
- **old**: `run_job` of an earlier commit (`--baseline-rev`, extracted with `git
  archive`), the code the issue measured (redaction over the whole body, full decode).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import inspect
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml
from _common import KEY_ENV, PYTHON, mock_server, print_table, save_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINE_REV = "6dbd8d3"  # the commit the issue measured (58 ms per 1024² PNG)
HEARTBEAT_S = 0.005
CASES = [("png", "b64"), ("png", "url"), ("jpeg", "b64"), ("jpeg", "url")]


# ------------------------------------------------------------------ child side


class Heartbeat:
    """A task that wakes every `HEARTBEAT_S` and records how late it woke, and, for each
    late wake-up, the loop thread's CPU time and wait for a CPU since the one before."""

    def __init__(self) -> None:
        self.longest = 0.0
        # (wall clock, lateness, loop thread CPU, wait for a CPU) of wake-ups over 1 ms late
        self.late: list[tuple[float, float, float, float | None]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def stop(self) -> float:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.longest

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        cpu, queued = time.thread_time(), _cpu_wait_s()
        while True:
            due = loop.time() + HEARTBEAT_S
            await asyncio.sleep(HEARTBEAT_S)
            lateness = loop.time() - due
            cpu_before, queued_before = cpu, queued
            cpu, queued = time.thread_time(), _cpu_wait_s()
            self.longest = max(self.longest, lateness)
            if lateness > 0.001:
                waited = None if queued is None or queued_before is None else queued - queued_before
                self.late.append((time.time(), lateness, cpu - cpu_before, waited))


def _cpu_wait_s() -> float | None:
    """Seconds this thread has waited for a CPU while runnable (Linux), None elsewhere."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measured(work: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Run `work` with the heartbeat; its figures plus CPU, wall and longest stall."""
    beat = Heartbeat()
    beat.start()
    cpu0, t0 = _cpu_s(), time.monotonic()
    figures = await work()
    cpu, wall = _cpu_s() - cpu0, time.monotonic() - t0
    stall = await beat.stop()
    first, last = figures.pop("answers")
    during = max(
        (late for late in beat.late if first <= late[0] <= last),
        key=lambda late: late[1],
        default=(0.0, 0.0, 0.0, None),
    )
    _, lateness, loop_cpu, cpu_wait = during
    return {
        **figures,
        "cpu_s": cpu,
        "wall_s": wall,
        "longest_stall_ms": stall * 1000,
        "longest_stall_answers_ms": lateness * 1000,
        "stall_loop_cpu_ms": loop_cpu * 1000,
        "stall_cpu_wait_ms": None if cpu_wait is None else cpu_wait * 1000,
        "longest_stall_startup_ms": _longest(beat, None, first) * 1000,
        "longest_stall_shutdown_ms": _longest(beat, last, None) * 1000,
    }


def _longest(beat: Heartbeat, after: float | None, before: float | None) -> float:
    """The longest lateness strictly after `after` and before `before` (wall clock)."""
    return max(
        (
            late[1]
            for late in beat.late
            if (after is None or late[0] > after) and (before is None or late[0] < before)
        ),
        default=0.0,
    )


async def _run_synthaug(spec_path: Path) -> dict[str, Any]:
    from pipeline.run.job import run_job

    spec = _load_spec()(spec_path)
    options: dict[str, Any] = {"install_signals": False}
    if "freeze_gc" in inspect.signature(run_job).parameters:
        options["freeze_gc"] = True  # as `synthaug run` does (the old code always froze)
    result = await run_job(spec, spec_path=spec_path, **options)
    summary = result.summary
    return {
        "exit_code": result.exit_code,
        "ok": summary["ok"],
        "failed": summary["failed"],
        "answers": _answer_window(spec.output_dir / "manifest.jsonl"),
    }


def _load_spec() -> Callable[[Path], Any]:
    """`load_spec` of this tree, or of the old code (where it had another home)."""
    try:
        from pipeline.jobspec.load import load_spec
    except ImportError:  # the old code: pipeline/spec.py
        from pipeline.jobspec import load_spec  # type: ignore[attr-defined,no-redef]
    return load_spec


def _answer_window(manifest: Path) -> tuple[float, float]:
    """Wall-clock times of the first and the last item finished, from the manifest."""
    from datetime import datetime

    done = [
        datetime.fromisoformat(line["finished_at"].replace("Z", "+00:00")).timestamp()
        for line in map(json.loads, manifest.read_text().splitlines())
        if line.get("finished_at")
    ]
    return (min(done), max(done)) if done else (0.0, 0.0)


async def _run_floor(base_url: str, items: int, concurrency: int, size: str, out: Path) -> Any:
    """The least a client does with each answer (module docstring), nothing checked."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    ok = 0
    answered: list[float] = []

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal ok
        body = {"project_url": "bench", "prompt": f"floor {index}", "size": size, "n": 1}
        async with sem:
            url = f"{base_url}/synthetic-image?api_key=k"
            async with session.post(url, json=body) as resp:
                payload = json.loads(await resp.read())
            entry = payload["data"][0]
            if "b64_json" in entry:
                data = base64.b64decode(entry["b64_json"])
            else:
                async with session.get(entry["url"]) as img:
                    data = await img.read()
            digest = hashlib.sha256(data).hexdigest()
            (out / f"{digest[:16]}-{index}").write_bytes(data)
            answered.append(time.time())
            ok += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(one(session, i) for i in range(items)))
    window = (min(answered), max(answered)) if answered else (0.0, 0.0)
    return {"exit_code": 0, "ok": ok, "failed": items - ok, "answers": window}


def child_main(args: list[str]) -> int:
    """``--child KIND JSON``: run one client in this process, print its figures as JSON."""
    kind, params = args[0], json.loads(args[1])
    if params.get("tree"):
        _import_from(Path(params["tree"]))
    if kind == "floor":
        Path(params["out"]).mkdir(parents=True, exist_ok=True)
        work = lambda: _run_floor(  # noqa: E731 (a one-line thunk reads best here)
            params["base_url"], params["items"], params["concurrency"], params["size"],
            Path(params["out"]),
        )  # fmt: skip
    else:
        import pipeline.run.job  # noqa: F401 (imported before measuring, as the CLI has it)

        _load_spec()
        work = lambda: _run_synthaug(Path(params["spec"]))  # noqa: E731
    print(json.dumps(asyncio.run(_measured(work))))
    return 0


def _import_from(tree: Path) -> None:
    """Make `import pipeline` load the package under `tree`, even over an editable install
    (whose import hook would otherwise win over sys.path)."""
    sys.path.insert(0, str(tree))
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)]


# ----------------------------------------------------------------- parent side


def write_spec(folder: Path, *, base_url: str, items: int, size: str, concurrency: int) -> Path:
    """A prompt-only job of `items` distinct requests for images of `size`."""
    spec = {
        "version": 1,
        "name": "realsize",
        "output_dir": "out",
        "backend": {"kind": "roboflow", "base_url": base_url, "api_key_env": KEY_ENV},
        "project_url": "bench",
        "params": {"size": size},
        "run": {"concurrency": concurrency, "max_items": max(items, 10), "rate_limit": "1000/s"},
        "sources": [{"name": "grid", "prompt": "real {i}", "vars": {"i": list(range(items))}}],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def run_client(kind: str, params: dict[str, Any], pythonpath: Path) -> dict[str, Any]:
    """One client in its own process (PYTHONPATH picks which synthaug it imports)."""
    env = {**os.environ, KEY_ENV: "bench-key"}
    if pythonpath != ROOT:
        params = {**params, "tree": str(pythonpath)}
    done = subprocess.run(
        [PYTHON, str(Path(__file__).resolve()), "--child", kind, json.dumps(params)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        cwd=params.get("cwd"),
    )
    if done.returncode != 0:
        raise RuntimeError(f"{kind} client failed: {done.stderr[-2000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def extract_baseline(rev: str, into: Path) -> Path:
    """The `pipeline` package of commit `rev`, unpacked under `into` (no checkout)."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "pipeline"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    target = into / f"synthaug-{rev}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def warm_up(base_url: str, size: str) -> None:
    """One request first (and a GET of the image it names, if it names one), so the mock
    renders its images before anything is measured."""
    body = json.dumps({"project_url": "bench", "prompt": "warm-up", "size": size}).encode()
    request = urllib.request.Request(
        f"{base_url}/synthetic-image?api_key=k",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        answer = json.loads(resp.read())
    url = answer.get("data", [{}])[0].get("url") if isinstance(answer, dict) else None
    if url:
        with urllib.request.urlopen(url, timeout=120) as resp:
            resp.read()


def bench_case(
    fmt: str, transport: str, *, items: int, px: int, concurrency: int, latency: float,
    baseline: Path | None, workdir: Path,
) -> list[dict[str, Any]]:  # fmt: skip
    """The three clients against one mock answering `fmt` images by `transport`."""
    size = f"{px}x{px}"
    extra = {
        "photo_format": fmt,
        "response_shape": "b64_json" if transport == "b64" else "data",
        "max_px": px,
    }
    rows: list[dict[str, Any]] = []
    with mock_server(latency=latency, rate_limit=None, extra=extra) as base:
        warm_up(base, size)
        clients: list[tuple[str, str, Path, dict[str, Any]]] = []
        for label, tree in (("synthaug", ROOT), ("old", baseline)):
            if tree is None:
                continue
            folder = workdir / f"{label}-{fmt}-{transport}"
            spec = write_spec(
                folder, base_url=base, items=items, size=size, concurrency=concurrency
            )
            clients.append((label, "synthaug", tree, {"spec": str(spec), "cwd": str(folder)}))
        floor = {
            "base_url": base, "items": items, "concurrency": concurrency, "size": size,
            "out": str(workdir / f"floor-{fmt}-{transport}"),
        }  # fmt: skip
        clients.insert(1, ("floor", "floor", ROOT, floor))
        for label, kind, tree, params in clients:
            figures = run_client(kind, params, tree)
            rows.append(_row(label, fmt, transport, items, px, figures))
            print(f"  {label:9} {fmt:4} {transport:3}: {rows[-1]['cpu_ms_per_image']} ms/image")
    floor_ms = next(r["cpu_ms_per_image"] for r in rows if r["client"] == "floor")
    for row in rows:
        row["x_floor"] = round(row["cpu_ms_per_image"] / floor_ms, 2)
    return rows


def _row(
    label: str, fmt: str, transport: str, items: int, px: int, figures: dict[str, Any]
) -> dict[str, Any]:
    return {
        "client": label,
        "format": fmt,
        "transport": transport,
        "px": px,
        "items": items,
        "exit_code": figures["exit_code"],
        "ok": figures["ok"],
        "failed": figures["failed"],
        "cpu_s": round(figures["cpu_s"], 3),
        "cpu_ms_per_image": round(figures["cpu_s"] / max(items, 1) * 1000, 2),
        "longest_stall_ms": round(figures["longest_stall_ms"], 1),
        "longest_stall_answers_ms": round(figures["longest_stall_answers_ms"], 1),
        "stall_loop_cpu_ms": round(figures["stall_loop_cpu_ms"], 1),
        "stall_cpu_wait_ms": _rounded(figures["stall_cpu_wait_ms"]),
        "longest_stall_startup_ms": round(figures["longest_stall_startup_ms"], 1),
        "longest_stall_shutdown_ms": round(figures["longest_stall_shutdown_ms"], 1),
        "wall_s": round(figures["wall_s"], 2),
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def main(argv: list[str] | None = None) -> int:
    """Run the real-size benchmark and print/write its table."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="4 items of 64 px, PNG by base64")
    parser.add_argument("--items", type=int, default=300, help="items per case (default 300)")
    parser.add_argument("--px", type=int, default=1024, help="image side (default 1024)")
    parser.add_argument("--concurrency", type=int, default=8, help="C (default 8)")
    parser.add_argument("--latency", type=float, default=0.05, help="mock latency, s")
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="the old code's commit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the old code")
    args = parser.parse_args(argv)
    items, px, cases = args.items, args.px, CASES
    if args.tiny:
        items, px, cases = 4, 64, [("png", "b64")]
    setup = {"items": items, "px": px, "concurrency": args.concurrency, "latency": args.latency}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="synthaug-realsize-") as tmp:
        baseline = None
        if not (args.no_baseline or args.tiny):
            baseline = extract_baseline(args.baseline_rev, Path(tmp))
            setup["baseline_rev"] = args.baseline_rev
        for fmt, transport in cases:
            rows += bench_case(
                fmt, transport, items=items, px=px, concurrency=args.concurrency,
                latency=args.latency, baseline=baseline, workdir=Path(tmp),
            )  # fmt: skip
    _show(rows)
    save_results("realsize_tiny" if args.tiny else "realsize", {"params": setup, "runs": rows})
    return 0


def _show(rows: list[dict[str, Any]]) -> None:
    header = [
        "client", "image", "by", "ok", "CPU ms/image", "x floor",
        "longest stall ms while answers arrive (loop CPU / waiting for a CPU)",
        "start-up / shutdown stall ms",
    ]  # fmt: skip
    table = [
        [
            r["client"],
            f"{r['px']}² {r['format']}",
            r["transport"],
            f"{r['ok']}/{r['items']}",
            r["cpu_ms_per_image"],
            r["x_floor"],
            f"{r['longest_stall_answers_ms']} ({r['stall_loop_cpu_ms']} / "
            f"{'?' if r['stall_cpu_wait_ms'] is None else r['stall_cpu_wait_ms']})",
            f"{r['longest_stall_startup_ms']} / {r['longest_stall_shutdown_ms']}",
        ]
        for r in rows
    ]
    print_table("real-size answers", header, table)


if __name__ == "__main__":
    sys.exit(main())
