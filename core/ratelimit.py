"""Token buckets: the rate limits of operations and messages (``rate_limited`` with
``retry_after``)."""

from __future__ import annotations


class TokenBuckets:
    """One token bucket per key (a user address, a device session): ``burst`` tokens, refilled at ``rate`` per
    second. Keys whose bucket is full again are forgotten when the table grows, so it holds only
    recently active users."""

    def __init__(self, burst: int, rate: float, *, max_keys: int = 65_536) -> None:
        self.burst = float(burst)
        self.rate = rate
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, now: float) -> float:
        """Spend one token: 0.0 when allowed, otherwise the seconds until one is available."""
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._forget_full(now)
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
