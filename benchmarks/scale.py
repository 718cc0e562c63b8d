"""Scale: items/s and peak RSS of `synthaug run` at 10k, 100k and 1M prompt items.

    python benchmarks/scale.py                 # 10k, 100k in full; 1M time-boxed (see below)
    python benchmarks/scale.py --quick         # 2k and 10k: a smoke check in ~30 s
    python benchmarks/scale.py --sizes 1000000 --time-box 0   # 1M to the end (~30 min, 4 GB)

The mock answers at once (latency 0, no rate limit) with 64x64 images, so the figures
are synthaug's own overhead per item: request, download, full decode, atomic fsynced
write, manifest line. Memory must stay flat as N grows: items are expanded lazily.
A size run longer than --time-box seconds is stopped with SIGINT (a clean checkpoint,
exit 130): its items/s and peak RSS are those of a job of that size, measured over the
part that ran.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import mock_server, print_table, run_child, save_results, write_spec

HIGH_RATE = 100_000.0  # requests/s: far above what the client can do


def bench_size(items: int, *, concurrency: int, time_box: float, workdir: Path) -> dict[str, Any]:
    """One fresh run of `items` items; stopped by SIGINT after `time_box` seconds (0: never)."""
    folder = workdir / f"scale-{items}"
    with mock_server(latency=0.0, rate_limit=None) as base:
        spec = write_spec(
            folder,
            name=f"scale-{items}",
            items=items,
            base_url=base,
            concurrency=concurrency,
            rate_limit=HIGH_RATE,
        )
        child = run_child(
            ["run", str(spec), "--no-progress", "--no-grid"],
            interrupt_after=time_box if time_box > 0 else None,
        )
    summary = json.loads((folder / "out" / "summary.json").read_text())
    shutil.rmtree(folder, ignore_errors=True)  # 100k+ image files: do not keep them
    elapsed = summary["elapsed_s"] or 1e-9
    return {
        "items": items,
        "completed": summary["ok"],
        "time_boxed": summary["stop_reason"] == "sigint",
        "exit_code": child.returncode,
        "items_per_s": round(summary["ok"] / elapsed, 1),
        "elapsed_s": round(elapsed, 1),
        "wall_s": round(child.wall_s, 1),
        "cpu_s_per_1000_items": round(child.cpu_s / max(summary["ok"], 1) * 1000, 3),
        "max_rss_mb": round(child.max_rss_mb, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the scale benchmark and print/write its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2k and 10k only")
    parser.add_argument("--sizes", type=int, nargs="+", help="item counts (default 10k 100k 1M)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--time-box",
        type=float,
        default=None,
        help="stop a size after this many seconds (default: 1M only, after 180 s; 0 = never)",
    )
    args = parser.parse_args(argv)
    sizes = args.sizes or ([2_000, 10_000] if args.quick else [10_000, 100_000, 1_000_000])
    rows = []
    with tempfile.TemporaryDirectory(prefix="synthaug-scale-") as tmp:
        for n in sizes:
            box = args.time_box if args.time_box is not None else (180.0 if n >= 1_000_000 else 0)
            rows.append(
                bench_size(n, concurrency=args.concurrency, time_box=box, workdir=Path(tmp))
            )
            _show(rows)
    save_results(
        "scale_quick" if args.quick else "scale",
        {"params": {"concurrency": args.concurrency, "latency": 0, "size": "64x64"}, "runs": rows},
    )
    return 0


def _show(rows: list[dict[str, Any]]) -> None:
    header = ["items", "completed", "items/s", "CPU s/1k items", "peak RSS MB", "elapsed s"]
    table = [
        [
            f"{r['items']:,}",
            f"{r['completed']:,}" + (" (time-boxed)" if r["time_boxed"] else ""),
            r["items_per_s"],
            r["cpu_s_per_1000_items"],
            r["max_rss_mb"],
            r["elapsed_s"],
        ]
        for r in rows
    ]
    print_table("scale", header, table)


if __name__ == "__main__":
    sys.exit(main())
