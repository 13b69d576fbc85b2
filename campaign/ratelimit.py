"""One rate limiter per service, counting destinations per second, with AIMD on 7020.

The API counts destinations, not requests, so a request of n destinations takes n tokens,
acquired right before it is sent. The bucket holds at most one batch: over any window of
W seconds at most `rate_per_s * W + batch` destinations leave, which is the promise
"never above the rate by more than one batch".

When the API keeps answering 7020 (over the tenant's rate) the effective rate drops
multiplicatively and climbs back additively while requests succeed. It is applied by
charging each destination `1 / factor` tokens of the one underlying bucket, so the
bucket's state survives every change.
"""

from __future__ import annotations

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
        self._rate_limited_in_a_row = 0
        self._last_change = -math.inf

    @property
    def effective_rate_per_s(self) -> float:
        return self.rate_per_s * self._factor

    @property
    def max_batch(self) -> int:
        """Destinations one request may carry now: never above the effective rate."""
        return max(1, min(self.batch_size, math.floor(self.effective_rate_per_s)))

    async def acquire(self, destinations: int) -> None:
        """Wait until `destinations` may be sent. Larger amounts wait in bucket-sized steps."""
        tokens = destinations / self._factor
        while tokens > 1e-9:
            step = min(tokens, self._capacity)
            await self._bucket.acquire(step)
            tokens -= step

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
        self._last_change = now
        log.info(
            "rate_increased",
            service=self.service,
            rate_per_s=round(self.effective_rate_per_s, 3),
            previous_rate_per_s=round(previous, 3),
        )
