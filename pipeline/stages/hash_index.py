"""Finding a 64-bit perceptual hash again within a few bits, among a million.

Multi-index hashing: two hashes at most `d` bits apart agree exactly on at least one of
`d + 1` disjoint bands of their bits (pigeonhole), so each band is a dict from its value
to the hashes that have it, and a query compares only the hashes that share a band with
it, not all pairs. With d = 4 and 100,000 hashes a band of 13 bits holds about a dozen
hashes per value: a query looks at a few dozen.
"""

from __future__ import annotations

__all__ = ["HASH_BITS", "HashIndex", "distance"]

HASH_BITS = 64


def distance(a: int, b: int) -> int:
    """Bits in which two hashes differ (Hamming distance)."""
    return (a ^ b).bit_count()


class HashIndex:
    """Hashes (each with the name of what it hashes) found again within `max_distance`."""

    def __init__(self, max_distance: int) -> None:
        self._max = max_distance
        count = min(max_distance + 1, HASH_BITS)
        widths = [HASH_BITS // count + (1 if i < HASH_BITS % count else 0) for i in range(count)]
        self._bands: list[tuple[int, int]] = []  # (shift, mask) of each band
        shift = 0
        for width in widths:
            self._bands.append((shift, (1 << width) - 1))
            shift += width
        self._tables: list[dict[int, list[tuple[int, str]]]] = [{} for _ in self._bands]
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, value: int, name: str) -> None:
        """Remember `value`, the hash of `name`."""
        for (shift, mask), table in zip(self._bands, self._tables, strict=True):
            table.setdefault((value >> shift) & mask, []).append((value, name))
        self._size += 1

    def near(self, value: int, *, other_than: str = "") -> str | None:
        """The name of a remembered hash within `max_distance` of `value` (not `other_than`:
        an output checked again is not its own duplicate); None when there is none."""
        if self._max >= HASH_BITS:
            return next(
                (
                    name
                    for bucket in self._tables[0].values()
                    for _, name in bucket
                    if name != other_than
                ),
                None,
            )
        for (shift, mask), table in zip(self._bands, self._tables, strict=True):
            for candidate, name in table.get((value >> shift) & mask, ()):
                if name != other_than and distance(candidate, value) <= self._max:
                    return name
        return None
