"""Check: how fast the check stage finds duplicates among many outputs, and what a hash costs.

    python benchmarks/check.py              # 100,000 hashes (and 1,000,000 with --million)
    python benchmarks/check.py --quick      # 10,000: a smoke check

The duplicate search is a `HashIndex` (multi-index hashing): each new hash is looked up
and then added, as the stage does for every stored output. The hashes are random with a
tenth of them near copies (a few bits flipped) of an earlier one, so the answer is known:
every near copy must be found, and no random hash may be. Then the pHash of a photo-like
1024x1024 PNG, the per-image cost the stage adds (in a thread, beside the run).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import print_table, save_results

from pipeline.mockapi.image import photo
from pipeline.stages.check import image_hash
from pipeline.stages.hash_index import HashIndex

DISTANCE = 4  # check.duplicate_distance's default


def bench_index(count: int, seed: int = 7) -> dict[str, Any]:
    """Look up then add `count` hashes; a tenth are near copies of an earlier one."""
    rng = random.Random(seed)
    hashes: list[tuple[int, bool]] = []
    for i in range(count):
        if i and rng.random() < 0.1:
            earlier = hashes[rng.randrange(len(hashes))][0]
            flips = rng.sample(range(64), rng.randint(1, DISTANCE))
            hashes.append((earlier ^ sum(1 << bit for bit in flips), True))
        else:
            hashes.append((rng.getrandbits(64), False))
    index = HashIndex(DISTANCE)
    found = missed = false_hits = 0
    t0 = time.perf_counter()
    for i, (value, is_copy) in enumerate(hashes):
        hit = index.near(value) is not None
        found += hit and is_copy
        missed += is_copy and not hit
        false_hits += hit and not is_copy
        index.add(value, str(i))
    elapsed = time.perf_counter() - t0
    return {
        "hashes": count,
        "seconds": round(elapsed, 2),
        "per_hash_us": round(elapsed / count * 1e6, 1),
        "near_copies_found": found,
        "near_copies_missed": missed,
        "random_hashes_flagged": false_hits,
    }


def bench_hash(images: int = 5) -> float:
    """Milliseconds of one pHash of a 1024x1024 photo-like PNG (median of `images`)."""
    with tempfile.TemporaryDirectory() as folder:
        times = []
        for i in range(images):
            path = Path(folder) / f"{i}.png"
            path.write_bytes(photo(i, 1024, 1024))
            t0 = time.perf_counter()
            image_hash(path)
            times.append(time.perf_counter() - t0)
    return round(sorted(times)[len(times) // 2] * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 hashes only")
    parser.add_argument("--million", action="store_true", help="also 1,000,000 hashes")
    args = parser.parse_args()
    sizes = [10_000] if args.quick else [100_000, *([1_000_000] if args.million else [])]
    rows = [bench_index(size) for size in sizes]
    hash_ms = bench_hash(3 if args.quick else 5)
    print_table(
        "check: duplicates found again (distance 4)",
        ["hashes", "s", "us/hash", "near copies found", "missed", "random flagged"],
        [
            [r["hashes"], r["seconds"], r["per_hash_us"], r["near_copies_found"],
             r["near_copies_missed"], r["random_hashes_flagged"]]
            for r in rows
        ],
    )
    print(f"\npHash of a 1024x1024 photo-like PNG: {hash_ms} ms (median)")
    save_results("check", {"index": rows, "phash_ms_1024": hash_ms})


if __name__ == "__main__":
    main()
