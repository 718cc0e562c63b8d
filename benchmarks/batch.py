"""Batch mode with real-size answers: memory, CPU and wall time to collect a batch.

    python benchmarks/batch.py              # 400 items of 1024² photo-like PNG (~1.3 MB)
    python benchmarks/batch.py --tiny       # 6 items of 64 px: a smoke check

A Batch API results file carries every image inline: 400 × 1.3 MB of PNG is about
700 MB of base64 in one download. The mock (its own process, `--batch-seconds` short)
serves it as a stream; `synthaug run` (a child process, measured with `os.wait4`) must
collect it in flat memory. For comparison, the same job online (C=8) on the same mock.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from _common import PYTHON, get_json, mock_server, print_table, run_child, save_results

KEY_ENV = "OPENAI_API_KEY"


def write_spec(folder: Path, *, base_url: str, items: int, px: int, mode: str) -> Path:
    """A prompt-only openai job of `items` distinct requests against the mock's /v1."""
    spec = {
        "version": 1,
        "name": f"batch-bench-{mode}",
        "output_dir": f"out-{mode}",
        "backend": {
            "kind": "openai",
            "mode": mode,
            "base_url": base_url + "/v1",
            "poll_interval_s": 0.5,
            "poll_max_s": 1.0,
            "timeout_s": 120,
        },
        # the model's sizes are 1024 and up: a smaller smoke-test image names no model
        "params": {"model": "gpt-image-2", "quality": "low", "size": f"{px}x{px}"}
        if px >= 1024
        else {"size": f"{px}x{px}"},
        "run": {"concurrency": 8, "rate_limit": "1000/s", "max_items": max(items, 10_000)},
        "sources": [
            {"name": "grid", "prompt": "bench {i}", "vars": {"i": [str(i) for i in range(items)]}}
        ],
    }
    path = folder / f"spec-{mode}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def bench(mode: str, *, items: int, px: int, workdir: Path) -> dict[str, Any]:
    """One run of the job in `mode` against a fresh mock; its figures."""
    extra = {"batch_s": 2.0, "photo_format": "png", "max_px": px}
    with mock_server(latency=0.05, rate_limit=None, extra=extra) as base:
        spec = write_spec(workdir, base_url=base, items=items, px=px, mode=mode)
        run = run_child(
            ["run", str(spec), "--no-progress", "--no-grid"], env={KEY_ENV: "bench-key"}
        )
        stats = get_json(base + "/_stats")
    if run.returncode != 0:
        raise RuntimeError(f"{mode} run failed ({run.returncode}): {run.stderr[-2000:]}")
    images = sorted((workdir / f"out-{mode}" / "images" / "grid").glob("*.png"))
    stored_mb = sum(p.stat().st_size for p in images) / 2**20
    return {
        "mode": mode,
        "items": items,
        "px": px,
        "ok": len(images),
        "stored_mb": round(stored_mb, 1),
        "wall_s": round(run.wall_s, 2),
        "cpu_s": round(run.cpu_s, 2),
        "cpu_ms_per_image": round(1000 * run.cpu_s / max(items, 1), 2),
        "max_rss_mb": round(run.max_rss_mb, 1),
        "batches": stats["batches"],
        "generations": stats["generations"],
        "duplicates": stats["duplicates"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run batch and online modes and print/write the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="6 items of 64 px")
    parser.add_argument("--items", type=int, default=400, help="items (default 400)")
    parser.add_argument("--px", type=int, default=1024, help="image side (default 1024)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    items, px = (6, 64) if args.tiny else (args.items, args.px)
    rows = []
    with tempfile.TemporaryDirectory(prefix="synthaug-batch-bench-") as tmp:
        for mode in ("batch", "online"):
            rows.append(bench(mode, items=items, px=px, workdir=Path(tmp)))
    header = ["mode", "images", "stored MB", "wall s", "CPU ms/image", "peak RSS MB", "batches"]
    table = [
        [
            r["mode"],
            f"{r['ok']}/{r['items']} of {r['px']}²",
            r["stored_mb"],
            r["wall_s"],
            r["cpu_ms_per_image"],
            r["max_rss_mb"],
            r["batches"],
        ]
        for r in rows
    ]
    print_table(f"batch vs online, {PYTHON}", header, table)
    save_results("batch_tiny" if args.tiny else "batch", {"runs": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
