"""The runner's three shared gates: requests per minute, a provider-requested pause, and the
cost budget. All are plain asyncio objects used from one event loop; the clock and sleep are
injectable so their schedules can be tested exactly without waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RateLimiter:
    """At most ``rpm`` request starts per minute, spaced evenly (``60 / rpm`` seconds apart).

    Even spacing rather than bursts: providers count requests in sliding windows, and a burst
    of ``max_concurrent`` requests at start-up is the usual way to earn a 429.
    """

    def __init__(
        self, rpm: float | None, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep
    ):
        self.interval = 60.0 / rpm if rpm else 0.0
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if not self.interval:
            return
        async with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            await self._sleep(slot - now)


class SharedPause:
    """When a provider says "retry after N seconds", every worker waits, not just the one that
    was told: the limit is the account's, not the request's."""

    def __init__(self, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep):
        self._until = 0.0
        self._clock = clock
        self._sleep = sleep

    def pause_for(self, seconds: float) -> None:
        self._until = max(self._until, self._clock() + seconds)

    @property
    def remaining(self) -> float:
        return max(0.0, self._until - self._clock())

    async def wait(self) -> None:
        while (left := self.remaining) > 0:
            await self._sleep(left)


class CostBudget:
    """A hard cap on spend, checked against what was actually billed.

    A call is sent only if everything already spent (``prior``: earlier runs on the same
    store, from its ledger; ``spent``: this run), plus the worst case of every call in flight,
    plus this call's worst case fits under the cap. The worst case is an upper bound (one
    token per prompt byte, every output token used); if a provider ever bills more than the
    bound it was reserved at, every later reservation is scaled up by the largest such ratio
    seen, so one surprise cannot repeat until the cap is overrun.

    ``reserve`` returns the amount reserved, or None (reserving nothing) when the call does
    not fit; ``settle`` replaces a reservation by the call's actual cost.
    """

    def __init__(self, cap_usd: float | None, *, prior_usd: float = 0.0) -> None:
        self.cap = cap_usd
        self.prior = prior_usd
        self.spent = 0.0
        self.reserved = 0.0
        self.exhausted = False
        self.inflation = 1.0

    @property
    def total(self) -> float:
        """Spend of the store including this run (reservations excluded)."""
        return self.prior + self.spent

    def reserve(self, worst_case: float) -> float | None:
        amount = worst_case * self.inflation
        if self.cap is not None and self.total + self.reserved + amount > self.cap + 1e-12:
            self.exhausted = True
            return None
        self.reserved += amount
        return amount

    def settle(self, reserved: float, actual: float) -> None:
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += actual
        if reserved > 0 and actual > reserved:
            self.inflation = max(self.inflation, self.inflation * actual / reserved)
