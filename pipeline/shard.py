"""Static shards of a job: ``--shard I/N`` takes the items whose key, read as a number,
is I modulo N.

Keys are SHA-256 digests, so the shards of any N are as even as chance allows, never
overlap, and need no coordinator: every machine that reads the same spec agrees on which
shard owns an item. A shard writes its own manifest and takes its own lock in OUT
(`manifest_name`, `lock_name`); every reader folds all of OUT's manifests together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UsageError

__all__ = ["Shard", "parse_shard"]

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
MAX_SHARDS = 10_000


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard `index` of `count` (0 <= index < count)."""

    index: int
    count: int

    def owns(self, key: str) -> bool:
        """Whether the item of `key` (64 hex digits) is this shard's."""
        return int(key, 16) % self.count == self.index

    @property
    def tag(self) -> str:
        """``shard-I-of-N``: how its files in OUT are named."""
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``I/N`` as a `Shard`; `UsageError` naming the rule otherwise."""
    match = _SHARD.fullmatch(text)
    if match is None:
        raise UsageError(f"--shard {text!r}: expected I/N, like 0/3 (shard 0 of 3)")
    index, count = int(match[1]), int(match[2])
    if not 1 <= count <= MAX_SHARDS or not 0 <= index < count:
        raise UsageError(
            f"--shard {text}: need 0 <= I < N and 1 <= N <= {MAX_SHARDS} (shards count from 0)"
        )
    return Shard(index, count)
