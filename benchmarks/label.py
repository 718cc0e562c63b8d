"""Label: what the label stage costs per real-size image, and whether its pace holds.

    python benchmarks/label.py            # 120 photo-like 1024x1024 PNGs
    python benchmarks/label.py --quick    # 24: a smoke check

A job's images are made first (the mock, in its own process, answering photo-like PNGs of
about 1.3 MB); then the same job with a ``label:`` block labels them all as the backlog,
and only that second run is timed, through the CLI as a user runs it. Each detection
reads the stored file back, checks its sha256, sends its base64 (about 1.8 MB) and parses
the answer. Against a server answering at once, the figure is synthaug's own cost (the
mock's decode included, on the same cores); against a server that takes 200 ms, 4 in
flight should label 20 images a second: the figure says how close the stage comes.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import yaml
from _common import KEY_ENV, get_json, mock_server, print_table, run_child, save_results


def _spec(folder: Path, base: str, items: int, label: dict[str, Any] | None) -> Path:
    spec: dict[str, Any] = {
        "version": 1,
        "name": "label-bench",
        "output_dir": "out",
        "backend": {"kind": "roboflow", "base_url": base, "api_key_env": KEY_ENV},
        "project_url": "bench",
        "params": {"size": "1024x1024"},
        "run": {"concurrency": 8, "rate_limit": "1000/s", "max_items": 10_000},
        "sources": [{"name": "photos", "prompt": "photo {i}", "vars": {"i": list(range(items))}}],
    }
    if label is not None:
        spec["label"] = {
            "model": "bench/1",
            "api_url": base,
            "api_key_env": KEY_ENV,
            "rate_limit": "1000/s",
            **label,
        }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def bench(items: int, latency: float, concurrency: int) -> dict[str, Any]:
    """Make `items` images, then time labelling them at `concurrency` against a server
    answering detection after `latency` seconds."""
    folder = Path(f"/tmp/synthaug-bench-label-{os.getpid()}-{time.monotonic_ns()}")
    folder.mkdir(parents=True)
    with mock_server(latency=0.0, rate_limit=None, extra={"photo_format": "png"}) as base:
        made = run_child(["run", str(_spec(folder, base, items, None)), "--no-grid"])
        assert made.returncode == 0, made.stderr[-2000:]
    with mock_server(latency=latency, rate_limit=None, extra={"photo_format": "png"}) as base:
        path = _spec(folder, base, items, {"concurrency": concurrency})
        labelled = run_child(["run", str(path), "--no-grid"])
        detections = get_json(base + "/_stats")["detections"]
    assert labelled.returncode == 0, labelled.stderr[-2000:]
    elapsed = labelled.wall_s
    ideal = concurrency / latency if latency else None
    return {
        "images": items,
        "latency_s": latency,
        "concurrency": concurrency,
        "detections": detections,
        "seconds": round(elapsed, 2),
        "images_per_s": round(items / elapsed, 1),
        "client_cpu_ms_per_image": round(labelled.cpu_s / items * 1000, 1),
        "client_peak_rss_mb": round(labelled.max_rss_mb),
        "ideal_per_s": ideal,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="24 images only")
    args = parser.parse_args()
    items = 24 if args.quick else 120
    rows = [bench(items, 0.0, 4), bench(items, 0.2, 4)]
    print_table(
        "label: a backlog of 1024x1024 photo-like PNGs labelled (whole run, CLI)",
        ["images", "server latency", "in flight", "detections", "s", "images/s", "ideal/s",
         "client CPU ms/image", "client peak RSS MB"],
        [
            [r["images"], r["latency_s"], r["concurrency"], r["detections"], r["seconds"],
             r["images_per_s"], r["ideal_per_s"] or "-", r["client_cpu_ms_per_image"],
             r["client_peak_rss_mb"]]
            for r in rows
        ],
    )
    save_results("label", {"runs": rows})


if __name__ == "__main__":
    main()
