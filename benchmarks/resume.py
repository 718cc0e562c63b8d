"""Resume: how long `run`, `status` and `plan` take on a finished 1M-item job.

    python benchmarks/resume.py            # 1M items (builds ~1M small files, ~4 GB, ~2 min)
    python benchmarks/resume.py --quick    # 100k items
    python benchmarks/resume.py --inputs-only   # only the input-bytes measurement
    python benchmarks/resume.py --keep DIR     # build in DIR and keep it
    python benchmarks/resume.py --reuse DIR    # time the job a --keep run left in DIR

A finished job is synthesized directly, without the API: the spec's items are expanded
exactly as `run` would, each gets a small image file at its output path, and a manifest
line (an `ok` ItemRecord with the mock's answer shape) is appended by `ManifestWriter`.
Then, each as its own process (wall time and peak RSS):

* `plan SPEC` before the manifest exists (counting only) and after (every key looked up),
* `run SPEC` with nothing left to do (the resume decision: read the manifest, expand,
  check every ok item's files), three times: with the state cache the finishing run
  left, with no cache (deleted: every manifest line is read), and with the cache that
  resume wrote,
* `status OUT` and `plan SPEC` (both use the cache).

The image files were just written, so they are in the page cache: these are warm figures
(the build is flushed to disk with `os.sync` first, so its write-back does not land in
the first timing). A resume overlaps its stat of every file with its key expansion on a
second core, so each timed run of a big job waits for a quiet machine first (other
processes using under 10% of a core for 2 s, for at most `QUIET_WAIT_S`), and the CPU that other
processes used during each run is recorded beside it (``others_cpu_s``): a figure taken
while the machine was busy says so.

Then the input side: a folder job of `INPUT_PHOTOS` photo-like JPEGs (written an hour
before the run, as photos are) runs once against the embedded mock, and a no-op resume
of it counts the bytes its process reads (``rchar`` of /proc/self/io, from after the
imports to the exit code): the share of the inputs' bytes it read to validate the spec
and compute its keys.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import print_table, run_child, save_results, write_spec

from pipeline.items import count_items, expand_items
from pipeline.jobspec.load import load_spec
from pipeline.manifest.cache import StateCache, cache_path
from pipeline.manifest.log import MANIFEST_NAME
from pipeline.manifest.writer import ManifestWriter
from pipeline.mockapi.image import photo
from pipeline.mockapi.server import draw_image
from pipeline.records import ItemRecord, OutputFile
from pipeline.run.prepare import write_job_json
from pipeline.run.stats import utc_now
from pipeline.store.files import output_path

REPEAT = 3  # runs per resume case: the table shows the median
QUIET_WAIT_S = 120.0  # longest wait for a quiet machine before a timed run
QUIET_FROM_ITEMS = 100_000  # smaller jobs (smoke runs, tests) do not wait for quiet
INPUT_PHOTOS = 200  # inputs of the folder job whose no-op resume's reads are counted
_READS_CHILD = """
import sys
from pipeline import cli
from pipeline.mockapi import server as mock
def rchar():
    with open("/proc/self/io") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("rchar:"))
before = rchar()
try:
    cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("READ", rchar() - before, code)
"""


def build_finished_job(spec_path: Path) -> dict[str, Any]:
    """Write an image file and an `ok` manifest line for every item of the spec."""
    spec = load_spec(spec_path)
    out = spec.output_dir
    data = draw_image("resume bench", None, index=0, width=64, height=64)
    digest = hashlib.sha256(data).hexdigest()
    now = utc_now()
    t0 = time.monotonic()
    count = 0
    made: set[Path] = set()
    cache = StateCache(out / MANIFEST_NAME)  # kept in step as `run` keeps it
    with ManifestWriter(out / MANIFEST_NAME, fsync_interval_s=3600) as writer:
        writer.add_append_hook(cache.add)
        cache.start(cache.load())
        for item in expand_items(spec):
            path = output_path(out, item.source, item.key, 0, "png")
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            path.write_bytes(data)
            stat = path.stat()
            url = f"http://127.0.0.1:1/images/{item.key[:32]}.png"
            output = OutputFile(
                path=path.relative_to(out).as_posix(),
                sha256=digest,
                width=64,
                height=64,
                url=url,
                id=item.key[:32],
                bytes=stat.st_size,  # as store_image records them
                mtime_ns=stat.st_mtime_ns,
            )
            record = ItemRecord.of(
                item,
                "ok",
                outputs=(output,),
                attempts=1,
                started_at=now,
                finished_at=now,
                elapsed_s=0.2,
                response={"data": [{"url": url, "id": item.key[:32]}]},
            )
            writer.append(record)
            count += 1
    cache.close()
    write_job_json(spec, spec_path, count_items(spec))  # what a run leaves beside its manifest
    manifest = out / MANIFEST_NAME
    return {
        "items": count,
        "build_s": round(time.monotonic() - t0, 1),
        "manifest_mb": round(manifest.stat().st_size / 1e6, 1),
    }


def make_photos(folder: Path, count: int) -> int:
    """`count` distinct photo-like JPEGs (1024x768, ~95 kB), dated an hour back; their
    total size. A few are rendered and the rest differ by trailing bytes after the
    image's end, which decoders ignore: distinct files, distinct keys."""
    folder.mkdir(parents=True, exist_ok=True)
    rendered = [photo(seed, 1024, 768, "jpeg") for seed in range(4)]
    hour_ago = time.time_ns() - 3600 * 10**9
    total = 0
    for i in range(count):
        path = folder / f"photo-{i:04d}.jpg"
        path.write_bytes(rendered[i % len(rendered)] + i.to_bytes(4, "big"))
        os.utime(path, ns=(hour_ago, hour_ago))
        total += path.stat().st_size
    return total


def measure_input_reads(tmp: Path, count: int = INPUT_PHOTOS) -> dict[str, Any]:
    """Run a folder job once, then count what its no-op resume reads (see the docstring)."""
    tmp.mkdir(parents=True, exist_ok=True)
    input_bytes = make_photos(tmp / "photos", count)
    spec = {
        "version": 1,
        "name": "inputs",
        "output_dir": "out",
        "backend": {"kind": "mock"},
        "params": {"size": "64x64"},
        "run": {"concurrency": 16, "rate_limit": "1000/s", "max_items": count},
        "sources": [{"name": "photos", "prompt": "the same street at dusk", "folder": "photos"}],
    }
    path = tmp / "spec.yaml"
    path.write_text(json.dumps(spec), encoding="utf-8")
    first = run_child(["run", str(path), "--no-progress", "--no-grid"])
    if first.returncode != 0:
        raise RuntimeError(f"the folder job failed: {first.stderr[-2000:]}")
    child = subprocess.run(
        [sys.executable, "-c", _READS_CHILD, "run", str(path), "--no-progress", "--no-grid"],
        capture_output=True,
        text=True,
        check=False,
    )
    line = next(ln for ln in child.stdout.splitlines() if ln.startswith("READ "))
    _, read, code = line.split()
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    return {
        "inputs": count,
        "input_mb": round(input_bytes / 1e6, 1),
        "resume_read_mb": round(int(read) / 1e6, 2),
        "read_pct_of_inputs": round(100 * int(read) / input_bytes, 2),
        "resume_requests": summary["requests"],
        "resume_exit_code": int(code),
    }


def measure(
    label: str,
    args: list[str],
    *,
    repeat: int = 1,
    before: Callable[[], None] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run one synthaug command as a child `repeat` times (calling `before` each time):
    the median wall time and CPU, every wall time, and the peak RSS."""
    walls, cpus, others, rss, code = [], [], [], 0.0, 0
    for _ in range(repeat):
        if before is not None:
            before()
        if quiet:
            wait_for_quiet()
        busy = _busy_cpu_s()
        child = run_child(args)
        if child.returncode != 0:
            print(f"{label}: exit {child.returncode}\n{child.stderr[-2000:]}", file=sys.stderr)
        walls.append(child.wall_s)
        cpus.append(child.cpu_s)
        others.append(round(max(0.0, _busy_cpu_s() - busy - child.cpu_s), 2))
        rss, code = max(rss, child.max_rss_mb), code or child.returncode
    return {
        "command": label,
        "exit_code": code,
        "wall_s": round(statistics.median(walls), 2),
        "wall_s_runs": [round(w, 2) for w in walls],
        "cpu_s": round(statistics.median(cpus), 2),
        "others_cpu_s": others,
        "max_rss_mb": round(rss, 1),
    }


def _busy_cpu_s() -> float:
    """CPU seconds every process on this machine has used (all but idle and iowait),
    from /proc/stat; 0 where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(limit_s: float = QUIET_WAIT_S) -> None:
    """Wait until other processes leave the cores alone for 2 s (at most `limit_s`)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        busy = _busy_cpu_s()
        time.sleep(2.0)
        if _busy_cpu_s() - busy < 0.2:
            return


def main(argv: list[str] | None = None) -> int:
    """Build a finished job, time `plan`, `run` (nothing to do) and `status` on it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k items instead of 1M")
    parser.add_argument("--items", type=int, default=None, help="item count (default 1M)")
    parser.add_argument("--keep", type=Path, default=None, help="build here and keep it")
    parser.add_argument(
        "--reuse", type=Path, default=None, help="time the finished job a --keep run left here"
    )
    parser.add_argument(
        "--inputs-only", action="store_true", help="only the folder job's input reads"
    )
    args = parser.parse_args(argv)
    if args.inputs_only:
        with tempfile.TemporaryDirectory(prefix="synthaug-inputs-") as scratch:
            reads = measure_input_reads(Path(scratch))
        print(json.dumps(reads, indent=1))
        save_results("resume_inputs", {"params": {"inputs": INPUT_PHOTOS}, "reads": reads})
        return 0
    items = args.items or (100_000 if args.quick else 1_000_000)
    tmp = args.reuse or args.keep or Path(tempfile.mkdtemp(prefix="synthaug-resume-"))
    quiet = items >= QUIET_FROM_ITEMS
    try:
        if args.reuse is not None:
            spec, rows, build = reused_job(args.reuse, items)
        else:
            spec = write_spec(
                tmp,
                name=f"resume-{items}",
                items=items,
                base_url="http://127.0.0.1:9",  # never contacted: nothing is left to do
                concurrency=16,
                rate_limit=50,
            )
            rows = [measure("plan (no manifest)", ["plan", str(spec)], quiet=quiet)]
            build = build_finished_job(spec)
            os.sync()  # the build's gigabytes are written back now, not during the first timing
            print(f"built {build['items']:,} finished items in {build['build_s']} s", flush=True)
        run_args = ["run", str(spec), "--no-progress", "--no-grid"]
        manifest = tmp / "out" / MANIFEST_NAME
        # the cache the finishing run left (its segments), then none (deleted: every
        # manifest line is read), then the one that run wrote in place of it
        for label, drop_cache in (
            ("run, nothing left (cache from the run)", False),
            ("run, nothing left (no cache: every line read)", True),
            ("run, nothing left (cache rewritten by a resume)", False),
        ):
            drop = (lambda: cache_path(manifest).unlink(missing_ok=True)) if drop_cache else None
            rows.append(measure(label, run_args, repeat=REPEAT, before=drop, quiet=quiet))
            summary = json.loads((tmp / "out" / "summary.json").read_text())
            rows[-1]["skipped_ok"] = summary["skipped_ok"]
            rows[-1]["requests"] = summary["requests"]
            rows[-1]["rehashed_images"] = summary["rehashed_images"]
        status = ["status", str(tmp / "out")]
        rows.append(measure("status", status, repeat=REPEAT, quiet=quiet))
        plan = ["plan", str(spec)]
        rows.append(measure("plan (finished manifest)", plan, repeat=REPEAT, quiet=quiet))
        reads = measure_input_reads(tmp / "inputs", min(INPUT_PHOTOS, items))
    finally:
        if args.keep is None and args.reuse is None:
            shutil.rmtree(tmp, ignore_errors=True)
    _show(items, rows)
    print(f"no-op resume of a folder job: {json.dumps(reads)}")
    save_results(
        "resume_quick" if args.quick else "resume",
        {"params": {"items": items, **build}, "runs": rows, "input_reads": reads},
    )
    return 0


def reused_job(folder: Path, items: int) -> tuple[Path, list[dict[str, Any]], dict[str, Any]]:
    """The spec of the finished job a ``--keep`` run left in `folder` (of `items` items),
    no rows yet (its "plan (no manifest)" was timed when it was built), and its figures."""
    spec = folder / "spec.yaml"
    name = load_spec(spec).name
    if name != f"resume-{items}":
        raise SystemExit(f"{folder} holds the job {name!r}, not resume-{items}: pass --items")
    manifest = folder / "out" / MANIFEST_NAME
    return spec, [], {"items": items, "reused": True, "manifest_mb": _mb(manifest)}


def _mb(path: Path) -> float:
    return round(path.stat().st_size / 1e6, 1)


def _show(items: int, rows: list[dict[str, Any]]) -> None:
    header = ["command", "items", "wall s (median)", "runs", "CPU s", "peak RSS MB", "exit"]
    table = [
        [
            r["command"],
            f"{items:,}",
            r["wall_s"],
            " / ".join(str(w) for w in r["wall_s_runs"]),
            r["cpu_s"],
            r["max_rss_mb"],
            r["exit_code"],
        ]
        for r in rows
    ]
    print_table("resume", header, table)


if __name__ == "__main__":
    sys.exit(main())
