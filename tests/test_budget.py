"""The run budget: reserve before starting, never overshoot, give back on failure."""

from __future__ import annotations

import pytest

from pipeline.budget import Budget
from pipeline.records import WorkItem


def item(n: int = 1, key: str = "k") -> WorkItem:
    return WorkItem(key=key, source="s", prompt="p", project_url="", params={"n": n})


def test_max_images_admits_exactly_the_cap() -> None:
    """With max_images 5 and n=2 items, two fit and the third is refused."""
    budget = Budget(max_images=5, max_cost_usd=None, price=lambda _i: None)
    assert [budget.reserve(item(2)) for _ in range(3)] == [True, True, False]
    assert budget.images == 4


def test_release_gives_the_reservation_back() -> None:
    """An item that ends without images frees its share for the next one."""
    budget = Budget(max_images=2, max_cost_usd=None, price=lambda _i: None)
    first = item(2)
    assert budget.reserve(first)
    assert not budget.reserve(item(1))
    budget.release(first)
    assert budget.reserve(item(2))


def test_cost_cap_counts_price_times_n() -> None:
    """max_cost_usd 0.2 at $0.04 an image admits five 1-image items, not a sixth."""
    budget = Budget(max_images=None, max_cost_usd=0.2, price=lambda _i: 0.04)
    results = [budget.reserve(item()) for _ in range(6)]
    assert results == [True] * 5 + [False]
    assert budget.cost_usd == pytest.approx(0.2)


def test_unknown_price_is_flagged() -> None:
    """An item priced None costs 0 in the sums but marks the total as not known."""
    budget = Budget(max_images=None, max_cost_usd=None, price=lambda _i: None)
    assert budget.reserve(item())
    assert not budget.cost_known
