"""One rate limiter per service, counting destinations per second, with AIMD on 7020.

The API counts destinations, not requests, so a request of n destinations takes n tokens,
acquired right before it is sent. The bucket holds at most one batch: over any window of
W seconds at most `rate_per_s * W + batch` destinations leave, which is the promise
"never above the rate by more than one batch".

When the API keeps answering 7020 (over the tenant's rate) the effective rate drops
multiplicatively and climbs back additively while requests succeed. In a fleet of workers
(campaign/fleet.py) each worker also takes a share of the rate, and the AIMD factor is the
fleet's. Both are applied by charging each destination `1 / (factor * share)` tokens of the
one underlying bucket, so the bucket's state survives every change.

A request carries at most one bucket's worth of tokens (`max_batch` at the moment it is
paid for), so it is paid for in one step: a worker then never sends more than
`share * factor * (rate * W + bucket)` in a window of W seconds, and a whole fleet, whose
shares add up to one, never more than the rate plus one batch. `acquire` enforces it: it
grants at most `max_batch` destinations, so a batch claimed while the share or factor was
higher is cut to the current size by its sender instead of being paid for in several
steps and sent whole (which let the steps of several waiting batches add up to bursts of
several old batches at once).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import structlog
from aiolimiter import AsyncLimiter

log = structlog.get_logger(__name__)


class ServiceLimiter:
    def __init__(
        self,
        *,
        service: str,
        rate_per_s: float,
        batch_size: int,
        decrease_after: int = 2,
        decrease_factor: float = 0.5,
        cooldown_s: float = 1.0,
        increase_interval_s: float = 5.0,
        increase_fraction: float = 0.05,
        min_fraction: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or batch_size <= 0:
            raise ValueError("rate_per_s and batch_size must be positive")
        self.service = service
        self.rate_per_s = rate_per_s
        self.batch_size = batch_size
        # A bucket never smaller than one token, never larger than one batch.
        self._capacity = float(max(1, min(batch_size, math.floor(rate_per_s))))
        self._bucket = AsyncLimiter(self._capacity, self._capacity / rate_per_s)
        self._decrease_after = decrease_after
        self._decrease_factor = decrease_factor
        self._cooldown_s = cooldown_s
        self._increase_interval_s = increase_interval_s
        self._increase_fraction = increase_fraction
        # At least one destination per second, unless the configured rate is lower.
        self._min_factor = min(1.0, max(min_fraction, 1.0 / rate_per_s))
        self._clock = clock
        self._factor = 1.0
        self._share = 1.0
        self._price_changed = asyncio.Event()
        self._rate_limited_in_a_row = 0
        self._last_change = -math.inf

    @property
    def effective_rate_per_s(self) -> float:
        return self.rate_per_s * self._factor * self._share

    @property
    def factor(self) -> float:
        """The AIMD factor: 1.0 unless 7020s slowed the service down."""
        return self._factor

    @property
    def share(self) -> float:
        """This worker's part of the service's rate: 1.0 alone, 1/N in a fleet of N."""
        return self._share

    @property
    def increase_interval_s(self) -> float:
        return self._increase_interval_s

    @property
    def increase_fraction(self) -> float:
        return self._increase_fraction

    @property
    def max_batch(self) -> int:
        """Destinations one request may carry now: one bucket's worth of tokens, so never
        above the effective rate, and smaller in proportion to the factor and the share."""
        # The epsilon keeps 3000 * (1/3) from flooring to 999.
        return max(1, math.floor(self._capacity * self._factor * self._share + 1e-9))

    def set_share(self, fraction: float) -> None:
        """Take `fraction` (0 < fraction <= 1) of the configured rate from now on."""
        if not 0 < fraction <= 1:
            raise ValueError(f"a share must be in (0, 1], got {fraction}")
        if fraction != self._share:
            self._share = fraction
            self._repriced()

    def adopt_factor(self, factor: float) -> None:
        """Use the fleet's AIMD factor. A change restarts the cooldown and the increase
        interval, so every worker steps from the shared value at about the same time."""
        factor = min(1.0, max(self._min_factor, factor))
        if factor == self._factor:
            return
        self._factor = factor
        self._last_change = self._clock()
        self._repriced()

    async def acquire(self, destinations: int) -> int:
        """Wait until up to `destinations` may be sent, and return how many may: never more
        than `max_batch` when they were paid for, so a request is paid in one step and the
        caller sends the rest later (a batch claimed at a higher share or factor).

        A wait is priced again when the share or the factor changes meanwhile: a sender
        waiting at the old price would otherwise keep a worker at its old rate (slower
        after a share rose, faster after one fell) until its tokens came through.
        """
        if destinations < 1:
            raise ValueError(f"destinations must be at least 1, got {destinations}")
        while True:
            granted = min(destinations, self.max_batch)
            # At most the bucket: max_batch * price exceeds it by rounding only.
            tokens = min(granted * self._price(), self._capacity)
            if await self._acquire_unless_repriced(tokens):
                return granted

    def _price(self) -> float:
        """Tokens one destination costs now."""
        return 1.0 / (self._factor * self._share)

    def _repriced(self) -> None:
        """Wake the waits priced before this change."""
        self._price_changed.set()
        self._price_changed = asyncio.Event()

    async def _acquire_unless_repriced(self, tokens: float) -> bool:
        """Take `tokens`; False, with nothing taken, if the price changed during the wait."""
        if self._bucket.has_capacity(tokens):
            await self._bucket.acquire(tokens)
            return True
        acquiring = asyncio.ensure_future(self._bucket.acquire(tokens))
        changed = asyncio.ensure_future(self._price_changed.wait())
        try:
            await asyncio.wait({acquiring, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            if not acquiring.done():
                # Cancelled in its wait, before it adds to the bucket: nothing was taken.
                acquiring.cancel()
                await asyncio.wait({acquiring})
        if acquiring.cancelled():
            return False
        acquiring.result()
        return True

    def record_rate_limited(self) -> None:
        """The API answered 7020. Repeated ones lower the rate, at most once per cooldown."""
        self._rate_limited_in_a_row += 1
        now = self._clock()
        if self._rate_limited_in_a_row < self._decrease_after:
            return
        if now - self._last_change < self._cooldown_s or self._factor <= self._min_factor:
            return
        previous = self.effective_rate_per_s
        self._factor = max(self._min_factor, self._factor * self._decrease_factor)
        self._repriced()
        self._rate_limited_in_a_row = 0
        self._last_change = now
        log.warning(
            "rate_decreased",
            service=self.service,
            rate_per_s=round(self.effective_rate_per_s, 3),
            previous_rate_per_s=round(previous, 3),
        )

    def record_success(self) -> None:
        """A request went through without 7020: step back towards the configured rate."""
        self._rate_limited_in_a_row = 0
        if self._factor >= 1.0:
            return
        now = self._clock()
        if now - self._last_change < self._increase_interval_s:
            return
        previous = self.effective_rate_per_s
        self._factor = min(1.0, self._factor + self._increase_fraction)
        self._repriced()
        self._last_change = now
        log.info(
            "rate_increased",
            service=self.service,
            rate_per_s=round(self.effective_rate_per_s, 3),
            previous_rate_per_s=round(previous, 3),
        )
