"""The spend budget of one run: `max_images` and `max_cost_usd`.

An item reserves its images and their price *before* its request starts and gives them
back if it ends without images, so a run can overshoot its budget by nothing: what is
in flight was already counted. An answer that reports what it cost (OpenAI's ``usage``)
then replaces the list price in the sums, so the budget tracks real spend. The budget is
per run ("run again to go on"), not per job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .records import WorkItem

__all__ = ["Budget"]

_EPSILON_USD = 1e-9  # float sums of prices must not refuse the last affordable item


@dataclass(slots=True)
class Budget:
    """Reservations against optional image and cost caps.

    `price(item)` is the list price per image; `actual(item, response)` what an answer
    says the item cost (None when it does not say).
    """

    max_images: int | None
    max_cost_usd: float | None
    price: Callable[[WorkItem], float | None]
    actual: Callable[[WorkItem, Any], float | None] = field(default=lambda _item, _resp: None)
    images: int = 0
    cost_usd: float = 0.0
    cost_known: bool = True  # False once an item's price was not in the table

    def cost_of(self, item: WorkItem) -> float:
        """USD for all images of `item` (0 when unknown, which clears `cost_known`)."""
        price = self.price(item)
        if price is None:
            self.cost_known = False
            return 0.0
        return price * item.n

    def reserve(self, item: WorkItem) -> bool:
        """Count `item` against the caps; False (and nothing counted) when it would exceed one."""
        images = self.images + item.n
        cost = self.cost_usd + self.cost_of(item)
        if self.max_images is not None and images > self.max_images:
            return False
        if self.max_cost_usd is not None and cost > self.max_cost_usd + _EPSILON_USD:
            return False
        self.images, self.cost_usd = images, cost
        return True

    def commit(self, item: WorkItem) -> None:
        """Count `item` without checking the caps: its spend is already committed (a
        request waiting in a submitted batch), and leaving it uncollected saves nothing."""
        self.images += item.n
        self.cost_usd += self.cost_of(item)

    def settle(self, item: WorkItem, response: Any, price_factor: float = 1.0) -> float | None:
        """What `item` cost now that it is answered (None when unknown): the answer's
        own figure when it reports one, times `price_factor` (a Batch API answer's
        discount: `Generation.price_factor`), which then replaces the reservation."""
        actual = self.actual(item, response)
        if actual is None:
            price = self.price(item)
            return None if price is None else price * item.n
        actual *= price_factor
        self.cost_usd += actual - self.cost_of(item)
        return actual

    def release(self, item: WorkItem) -> None:
        """Give back what `item` reserved: it ended without images."""
        self.images -= item.n
        self.cost_usd -= self.cost_of(item)
