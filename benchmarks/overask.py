"""Over-asking: a job configured at 4x what a strict server allows, for each Retry-After form.

    python benchmarks/overask.py            # 40/s asked of 10/s (bucket of 1), 60 s per run
    python benchmarks/overask.py --quick    # one form, 3 s per run: a smoke check

Users rarely know their quota. The mock (its own process) enforces `--server-rate` with a
token bucket of one and answers 429 with a Retry-After of at least a second, in one of
four forms: seconds, an HTTP date, none at all, and an HTTP date from a server whose clock
runs 20 s ahead of ours. For each form, three runs of `--duration` seconds against a fresh
mock:

* "fixed rate": a client that starts requests at the asked rate and, on a 429, stops
  every start until the Retry-After (its date read on the local clock; 1 s without one),
  the way a careful script does without learning anything;
* synthaug, first run on a new OUT (stopped by SIGINT after the duration);
* synthaug, second run on the same OUT: it starts from the rate the first one learned.

Figures per run, from the mock's own counters sampled over time: the share of the server's
limit achieved (successful generations per second / server rate) over the whole run and
over its steady part (from `--steady-from` s to the end, as the issue measured), and the
share of requests answered 429.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from _common import (
    StatsPoller,
    get_json,
    mock_server,
    percent,
    print_table,
    run_child,
    save_results,
    write_spec,
)

FORMS: dict[str, dict[str, Any]] = {
    "seconds": {"retry_after_form": "seconds"},
    "date": {"retry_after_form": "date"},
    "none": {"retry_after_form": "none"},
    "date, server clock +20 s": {"retry_after_form": "date", "clock_offset_s": 20.0},
}
ITEMS = 20_000  # more than any run can finish: every run is stopped by time


@dataclass
class Sampler(StatsPoller):
    """The mock's counters every quarter second, so rates can be taken over any window."""

    interval: float = 0.25

    def window(self, start_s: float) -> dict[str, float] | None:
        """Generations/s and 429 share from `start_s` after the first request to the end."""
        moving = [(t, s) for t, s in self.samples if s["requests"] > 0]
        if len(moving) < 2:
            return None
        t_first = moving[0][0]
        inside = [(t, s) for t, s in moving if t >= t_first + start_s]
        if len(inside) < 2:
            return None
        (t1, a), (t2, b) = inside[0], inside[-1]
        requests = b["requests"] - a["requests"]
        return {
            "seconds": round(t2 - t1, 1),
            "ok_per_s": (b["generations"] - a["generations"]) / (t2 - t1),
            "requests": requests,
            "share_429": (b["rate_limited"] - a["rate_limited"]) / max(requests, 1),
        }


async def fixed_rate_client(base_url: str, rate: float, concurrency: int, duration: float) -> None:
    """Starts at `rate`; a 429 stops every start until its Retry-After; learns nothing."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    pause_until = 0.0
    end = loop.time() + duration
    url = f"{base_url}/synthetic-image?api_key=k"

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal pause_until
        body = {"project_url": "bench", "prompt": f"fixed {i}", "size": "64x64", "n": 1}
        try:
            async with session.post(url, json=body) as resp:
                if resp.status == 429:
                    wait = _retry_after_s(resp.headers.get("Retry-After"))
                    pause_until = max(pause_until, loop.time() + wait)
                    return
                payload = await resp.json()
            async with session.get(payload["data"][0]["url"]) as img:
                await img.read()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return
        finally:
            sem.release()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        tasks: set[asyncio.Task[None]] = set()
        next_at, i = loop.time(), 0
        while loop.time() < end:
            await asyncio.sleep(max(0.0, max(next_at, pause_until) - loop.time()))
            if pause_until > loop.time():
                continue  # a 429 moved the pause while we slept
            await sem.acquire()
            task = asyncio.create_task(one(session, i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at = max(next_at + 1 / rate, loop.time() - 1 / rate)
            i += 1
        await asyncio.gather(*tasks)


def _retry_after_s(value: str | None) -> float:
    if value is None:
        return 1.0
    try:
        return max(float(value), 0.0)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(when.timestamp() - time.time(), 0.0)


def server_config(form: str, args: argparse.Namespace) -> dict[str, Any]:
    """The mock's `MockConfig` fields for one Retry-After form."""
    return {"min_retry_after_s": args.min_retry_after, **FORMS[form]}


def bench_fixed(form: str, args: argparse.Namespace) -> dict[str, Any]:
    """The fixed-rate client against a fresh strict mock (run in this process)."""
    with (
        mock_server(
            latency=args.latency,
            rate_limit=args.server_rate,
            burst=1,
            extra=server_config(form, args),
        ) as base,
        Sampler(base) as sampler,
    ):
        asyncio.run(fixed_rate_client(base, args.ask, args.concurrency, args.duration))
    return figures("fixed rate, honours Retry-After", form, sampler, args)


def bench_synthaug(form: str, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """Two synthaug runs on the same OUT, each stopped by SIGINT after `duration` s."""
    rows = []
    with mock_server(
        latency=args.latency,
        rate_limit=args.server_rate,
        burst=1,
        extra=server_config(form, args),
    ) as base:
        spec = write_spec(
            folder,
            name="overask",
            items=ITEMS,
            base_url=base,
            concurrency=args.concurrency,
            rate_limit=args.ask,
            max_attempts=20,
        )
        for label in ("synthaug, first run", "synthaug, second run (same OUT)"):
            before = get_json(base + "/_stats")
            with Sampler(base) as sampler:
                child = run_child(
                    ["run", str(spec), "--no-progress", "--no-grid"],
                    interrupt_after=args.duration,
                )
            summary = json.loads((spec.parent / "out" / "summary.json").read_text())
            row = figures(label, form, sampler, args, offset=before)
            limiter = summary["limiter"]
            row.update(
                exit_code=child.returncode,
                learned_rate_per_s=_round(limiter.get("learned_rate_per_s")),
                rate_429_per_s=_round(limiter.get("rate_429_per_s")),
                slowdowns=limiter.get("slowdowns"),
                starts_during_pause=sampler.samples[-1][1]["starts_during_pause"]
                - before["starts_during_pause"],
            )
            if child.returncode not in (0, 130):
                print(child.stderr[-2000:], file=sys.stderr)
            rows.append(row)
            _show(rows)
    return rows


def figures(
    label: str,
    form: str,
    sampler: Sampler,
    args: argparse.Namespace,
    offset: dict[str, Any] | None = None,
) -> dict[str, Any]:
    whole = sampler.window(0.0)
    steady = sampler.window(args.steady_from)
    last = sampler.samples[-1][1] if sampler.samples else {}
    base = offset or {}
    requests = last.get("requests", 0) - base.get("requests", 0)
    limited = last.get("rate_limited", 0) - base.get("rate_limited", 0)
    return {
        "client": label,
        "retry_after": form,
        "requests": requests,
        "ok": last.get("generations", 0) - base.get("generations", 0),
        "share_429": round(limited / max(requests, 1), 4),
        "of_limit": round(whole["ok_per_s"] / args.server_rate, 4) if whole else None,
        "of_limit_steady": round(steady["ok_per_s"] / args.server_rate, 4) if steady else None,
        "share_429_steady": round(steady["share_429"], 4) if steady else None,
        "seconds": whole["seconds"] if whole else None,
    }


def _round(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def main(argv: list[str] | None = None) -> int:
    """Run the over-asking benchmark and print/write its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one form, 3 s runs, no baseline")
    parser.add_argument("--server-rate", type=float, default=10.0, help="the mock's limit, /s")
    parser.add_argument("--ask", type=float, default=40.0, help="the spec's rate_limit, /s")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per run")
    parser.add_argument("--steady-from", type=float, default=20.0, help="steady part, s")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.1, help="the mock's answer time, s")
    parser.add_argument("--min-retry-after", type=float, default=1.0, help="seconds")
    parser.add_argument("--forms", nargs="+", choices=list(FORMS), default=None)
    parser.add_argument("--no-baseline", action="store_true", help="skip the fixed-rate client")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.steady_from, args.no_baseline = 3.0, 1.0, True
    forms = args.forms or (["seconds"] if args.quick else list(FORMS))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="synthaug-overask-") as tmp:
        for index, form in enumerate(forms):
            if not args.no_baseline:
                rows.append(bench_fixed(form, args))
                _show(rows)
            rows += bench_synthaug(form, args, Path(tmp) / f"form-{index}")
    _show(rows)
    params = {
        key: getattr(args, key)
        for key in (
            "server_rate", "ask", "duration", "steady_from", "concurrency", "latency",
            "min_retry_after",
        )
    }  # fmt: skip
    params["server_bucket"] = 1
    save_results("overask_quick" if args.quick else "overask", {"params": params, "runs": rows})
    return 0


def _show(rows: list[dict[str, Any]]) -> None:
    header = [
        "Retry-After", "client", "of limit", "of limit, steady", "429s", "429s, steady",
        "learned /s", "requests",
    ]  # fmt: skip
    table = [
        [
            r["retry_after"],
            r["client"],
            percent(r["of_limit"]),
            percent(r["of_limit_steady"]),
            percent(r["share_429"]),
            percent(r["share_429_steady"]),
            r.get("learned_rate_per_s", "-"),
            r["requests"],
        ]
        for r in rows
    ]
    print_table("over-asking", header, table)


if __name__ == "__main__":
    sys.exit(main())
