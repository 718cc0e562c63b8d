"""Shards on one key: N synthaug processes share one strict server's limit, told nothing.

    python benchmarks/shards.py             # N = 1, 2, 3, 5; 60 s each; 40/s asked of 10/s
    python benchmarks/shards.py --quick     # N = 3, 8 s: a smoke check
    python benchmarks/shards.py --alone     # also each shard pacing alone (its own key)

The mock (its own process) enforces `--server-rate` with a token bucket of one and answers
429 with a Retry-After (seconds by default; `--forms` for the others). For each N, N
processes `synthaug run --shard I/N` start together on one OUT, the spec asking `--ask`
requests per second, and are stopped by SIGINT after `--duration` s. They share the key's
quota through `OUT/.synthaug.pace` (`pipeline.shared_pace`). With `--alone` the same runs
are repeated with `api_key_env: BENCH_KEY_{shard}` (one key per shard: each shard paces
itself alone, as before this work) against the same single limit, for comparison.

Figures, from the mock's own counters: the share of the server's limit achieved
(generations per second / server rate) over the whole run and its steady part (from
`--steady-from` s), the share of requests answered 429, and the least and most a shard
made relative to an even share (a starved shard shows as a low minimum).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from _common import get_json, mock_server, percent, print_table, run_child, save_results, write_spec
from overask import FORMS, ITEMS, Sampler, figures


def bench(n: int, form: str, alone: bool, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """N shards at once against a fresh strict mock; the row of figures."""
    with mock_server(
        latency=args.latency,
        rate_limit=args.server_rate,
        burst=1,
        extra={"min_retry_after_s": args.min_retry_after, **FORMS[form]},
    ) as base:
        spec = write_spec(
            folder,
            name="shards",
            items=ITEMS,
            base_url=base,
            concurrency=args.concurrency,
            rate_limit=args.ask,
            max_attempts=20,
        )
        env = {}
        if alone:
            data = yaml.safe_load(spec.read_text(encoding="utf-8"))
            data["backend"]["api_key_env"] = "BENCH_KEY_{shard}"
            spec.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
            env = {f"BENCH_KEY_{i}": "bench-key" for i in range(n)}
        before = get_json(base + "/_stats")
        with Sampler(base) as sampler, ThreadPoolExecutor(n) as pool:
            children = list(
                pool.map(
                    lambda i: run_child(
                        ["run", str(spec), "--no-progress", "--no-grid"]
                        + (["--shard", f"{i}/{n}"] if n > 1 else []),
                        env=env,
                        interrupt_after=args.duration,
                    ),
                    range(n),
                )
            )
    for child in children:
        if child.returncode not in (0, 130):
            print(child.stderr[-2000:], file=sys.stderr)
    made = [_made(spec.parent / "out", i, n) for i in range(n)]
    even = sum(made) / n if sum(made) else 1
    pacing = "alone (a key each)" if alone else "shared (OUT/.synthaug.pace)"
    return {
        "shards": n,
        "pacing": pacing,
        **figures(pacing, form, sampler, args, offset=before),
        "least_shard": round(min(made) / even, 3),
        "most_shard": round(max(made) / even, 3),
        "exit_codes": [c.returncode for c in children],
    }


def _made(out: Path, index: int, n: int) -> int:
    """Images shard `index` stored, from its summary."""
    name = "summary.json" if n == 1 else f"summary.shard-{index}-of-{n}.json"
    try:
        summary = json.loads((out / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    return int(summary.get("ok", 0) or 0)


def main(argv: list[str] | None = None) -> int:
    """Run the shards benchmark and print/write its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 3 only, 8 s")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--alone", action="store_true", help="also pace each shard alone")
    parser.add_argument("--server-rate", type=float, default=10.0, help="the mock's limit, /s")
    parser.add_argument("--ask", type=float, default=40.0, help="the spec's rate_limit, /s")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per run")
    parser.add_argument("--steady-from", type=float, default=20.0, help="steady part, s")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.1, help="the mock's answer time, s")
    parser.add_argument("--min-retry-after", type=float, default=1.0, help="seconds")
    parser.add_argument("--forms", nargs="+", choices=list(FORMS), default=["seconds"])
    args = parser.parse_args(argv)
    if args.quick:
        args.shards, args.duration, args.steady_from = [3], 8.0, 3.0
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="synthaug-shards-") as tmp:
        for form in args.forms:
            for n in args.shards:
                for alone in (False, True) if args.alone and n > 1 else (False,):
                    folder = Path(tmp) / f"{form}-{n}-{alone}".replace(" ", "_")
                    rows.append(bench(n, form, alone, args, folder))
                    _show(rows)
    params = {
        key: getattr(args, key)
        for key in ("server_rate", "ask", "duration", "steady_from", "concurrency", "latency")
    }
    params["server_bucket"] = 1
    save_results("shards_quick" if args.quick else "shards", {"params": params, "runs": rows})
    return 0


def _show(rows: list[dict[str, Any]]) -> None:
    header = [
        "shards", "pacing", "Retry-After", "of limit", "of limit, steady", "429s",
        "429s, steady", "least / most shard", "requests",
    ]  # fmt: skip
    table = [
        [
            r["shards"],
            r["pacing"],
            r["retry_after"],
            percent(r["of_limit"]),
            percent(r["of_limit_steady"]),
            percent(r["share_429"]),
            percent(r["share_429_steady"]),
            f"{r['least_shard']:.2f} / {r['most_shard']:.2f}",
            r["requests"],
        ]
        for r in rows
    ]
    print_table("shards on one key", header, table)


if __name__ == "__main__":
    sys.exit(main())
