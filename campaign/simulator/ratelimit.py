"""The per-key rate limit of the simulated API."""

from __future__ import annotations


class TokenBucket:
    """Destinations allowed per key: refills at `rate_per_s`, holds `capacity`."""

    __slots__ = ("capacity", "rate_per_s", "tokens", "updated")

    def __init__(self, *, rate_per_s: float, capacity: float, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def take(self, count: int, now: float) -> float:
        """Take `count` tokens: 0.0 when granted, else seconds until they would be there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if count <= self.tokens:
            self.tokens -= count
            return 0.0
        return (count - self.tokens) / self.rate_per_s
