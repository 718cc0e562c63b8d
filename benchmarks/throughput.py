"""Throughput at the rate limit: synthaug vs a naive asyncio client, same mock server.

    python benchmarks/throughput.py            # R=50/s, C=16, L=0.2 s, N=2000 and N=1000
    python benchmarks/throughput.py --quick    # N=200: a smoke check in ~10 s

The mock (`synthaug mock-server --latency L --rate-limit R`, its own process) enforces
exactly R with 429s. synthaug (`python -m pipeline run`, its own process) is measured
alone: CPU seconds and peak RSS come from `os.wait4` on its pid. The achieved rate is
requests / (time from first to last request start), sampled from the mock's /_stats.
After the naive client, a last row, "aiohttp alone", is the floor: one POST and one GET
per item paced by a sleep, nothing checked or stored (CPU of this process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from _common import (
    StatsPoller,
    factor_pair,
    get_json,
    mock_server,
    print_table,
    run_child,
    save_results,
    write_spec,
)


async def naive_client(base_url: str, items: int, concurrency: int) -> dict[str, Any]:
    """What most people write first: gather + Semaphore, retry on error, no rate limiting."""
    sem = asyncio.Semaphore(concurrency)
    a, b = factor_pair(items)
    outcome = {"ok": 0, "failed": 0}

    async def one(session: aiohttp.ClientSession, prompt: str) -> None:
        body = {"project_url": "bench", "prompt": prompt, "size": "64x64", "n": 1}
        async with sem:
            for _attempt in range(5):
                try:
                    url = f"{base_url}/synthetic-image?api_key=k"
                    async with session.post(url, json=body) as resp:
                        if resp.status != 200:
                            await asyncio.sleep(1.0)  # "back off" a fixed second
                            continue
                        image_url = (await resp.json())["data"][0]["url"]
                    async with session.get(image_url) as img:
                        await img.read()
                    outcome["ok"] += 1
                    return
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    await asyncio.sleep(1.0)
            outcome["failed"] += 1

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        prompts = [f"naive {i} {j}" for i in range(a) for j in range(b)]
        await asyncio.gather(*(one(session, p) for p in prompts))
    return outcome


async def floor_client(base_url: str, items: int, concurrency: int, rate: float) -> int:
    """The least any client must do: one POST and one GET per item, paced at `rate` by a
    plain sleep, nothing checked or stored. Its CPU is the floor under synthaug's."""
    sem = asyncio.Semaphore(concurrency)
    a, b = factor_pair(items)
    ok = 0

    async def one(session: aiohttp.ClientSession, prompt: str) -> None:
        nonlocal ok
        body = {"project_url": "bench", "prompt": prompt, "size": "64x64", "n": 1}
        async with sem:
            url = f"{base_url}/synthetic-image?api_key=k"
            async with session.post(url, json=body) as resp:
                image_url = (await resp.json())["data"][0]["url"]
            async with session.get(image_url) as img:
                await img.read()
            ok += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        tasks = []
        for prompt in (f"floor {i} {j}" for i in range(a) for j in range(b)):
            tasks.append(asyncio.create_task(one(session, prompt)))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
    return ok


def bench_floor(
    *, items: int, rate: float, concurrency: int, latency: float, burst: int
) -> dict[str, Any]:
    """`floor_client` in this process (CPU from `time.process_time`), mock in its own."""
    del burst  # the floor client paces itself; the mock enforces nothing
    with mock_server(latency=latency, rate_limit=None) as base:
        cpu0, t0 = time.process_time(), time.monotonic()
        ok = asyncio.run(floor_client(base, items, concurrency, rate))
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
        stats = get_json(base + "/_stats")
    requests = stats["requests"]
    ideal = min(rate, concurrency / latency) if latency > 0 else rate
    return {
        "client": "aiohttp alone (floor)",
        "items": items,
        "ok": ok,
        "failed": items - ok,
        **_rate_figures(requests / wall, ideal, requests, stats),
        "cpu_s": round(cpu, 2),
        "cpu_s_per_1000_requests": round(cpu / max(requests, 1) * 1000, 3),
        "wall_s": round(wall, 2),
    }


def bench_synthaug(
    *, items: int, rate: float, concurrency: int, latency: float, burst: int, workdir: Path
) -> dict[str, Any]:
    """One `synthaug run` against a fresh mock; returns the figures of the table."""
    with mock_server(latency=latency, rate_limit=rate, burst=burst) as base:
        spec = write_spec(
            workdir / f"synthaug-{items}",
            name=f"throughput-{items}",
            items=items,
            base_url=base,
            concurrency=concurrency,
            rate_limit=rate,
        )
        with StatsPoller(base) as poller:
            child = run_child(["run", str(spec), "--no-progress", "--no-grid"])
        stats = get_json(base + "/_stats")
    if child.returncode != 0:
        print(child.stderr, file=sys.stderr)
    summary = json.loads((spec.parent / "out" / "summary.json").read_text())
    achieved = poller.start_rate() or 0.0
    ideal = min(rate, concurrency / latency) if latency > 0 else rate
    requests = stats["requests"]
    return {
        "client": "synthaug",
        "items": items,
        "exit_code": child.returncode,
        "ok": summary["ok"],
        "failed": summary["failed"],
        **_rate_figures(achieved, ideal, requests, stats),
        "cpu_s": round(child.cpu_s, 2),
        "cpu_s_per_1000_requests": round(child.cpu_s / max(requests, 1) * 1000, 3),
        "max_rss_mb": round(child.max_rss_mb, 1),
        "wall_s": round(child.wall_s, 2),
        "summary_achieved_requests_per_s": summary["achieved_requests_per_s"],
    }


def _rate_figures(
    achieved: float, ideal: float, requests: int, stats: dict[str, Any]
) -> dict[str, Any]:
    """The figures both clients are compared on, from the start rate and the mock's stats."""
    return {
        "requests": requests,
        "achieved_starts_per_s": round(achieved, 2),
        "ideal_starts_per_s": ideal,
        "fraction_of_ideal": round(achieved / ideal, 4),
        "rate_limited_429": stats["rate_limited"],
        "share_429": round(stats["rate_limited"] / max(requests, 1), 4),
        "duplicates": stats["duplicates"],
    }


def bench_naive(
    *, items: int, rate: float, concurrency: int, latency: float, burst: int
) -> dict[str, Any]:
    """The naive client against a fresh mock with the same settings (run in this process)."""
    with mock_server(latency=latency, rate_limit=rate, burst=burst) as base:
        with StatsPoller(base) as poller:
            t0 = time.monotonic()
            outcome = asyncio.run(naive_client(base, items, concurrency))
            wall = time.monotonic() - t0
        stats = get_json(base + "/_stats")
    achieved = poller.start_rate() or 0.0
    ideal = min(rate, concurrency / latency) if latency > 0 else rate
    requests = stats["requests"]
    return {
        "client": "naive gather+Semaphore",
        "items": items,
        "ok": outcome["ok"],
        "failed": outcome["failed"],
        **_rate_figures(achieved, ideal, requests, stats),
        "good_starts_per_s": round(stats["generations"] / wall, 2),
        "wall_s": round(wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the throughput benchmark and print/write its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=200 only: a smoke check")
    parser.add_argument("--rate", type=float, default=50.0, help="R, requests/s (default 50)")
    parser.add_argument("--concurrency", type=int, default=16, help="C (default 16)")
    parser.add_argument("--latency", type=float, default=0.2, help="L, seconds (default 0.2)")
    parser.add_argument(
        "--items", type=int, nargs="+", default=None, help="N values (default 2000 1000)"
    )
    parser.add_argument("--burst", type=int, default=2, help="the mock's bucket size (default 2)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive client")
    args = parser.parse_args(argv)
    sizes = args.items or ([200] if args.quick else [2000, 1000])
    setup = {
        "rate": args.rate,
        "concurrency": args.concurrency,
        "latency": args.latency,
        "burst": args.burst,
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="synthaug-bench-") as tmp:
        for n in sizes:
            rows.append(bench_synthaug(items=n, workdir=Path(tmp), **setup))
            _show(rows)
        if not args.no_baseline:
            rows.append(bench_naive(items=sizes[0], **setup))
            rows.append(bench_floor(items=sizes[0], **setup))
    _show(rows)
    save_results(
        "throughput_quick" if args.quick else "throughput", {"params": setup, "runs": rows}
    )
    return 0


def _show(rows: list[dict[str, Any]]) -> None:
    header = [
        "client", "N", "ok", "starts/s", "of ideal", "429s", "dup",
        "CPU s/1k req", "peak RSS MB", "wall s",
    ]  # fmt: skip
    table = [
        [
            r["client"],
            r["items"],
            r["ok"],
            r["achieved_starts_per_s"],
            f"{r['fraction_of_ideal']:.1%}",
            f"{r['rate_limited_429']} ({r['share_429']:.1%})",
            r["duplicates"],
            r.get("cpu_s_per_1000_requests", "-"),
            r.get("max_rss_mb", "-"),
            r["wall_s"],
        ]
        for r in rows
    ]
    print_table("throughput", header, table)


if __name__ == "__main__":
    sys.exit(main())
