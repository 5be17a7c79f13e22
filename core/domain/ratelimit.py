"""Token buckets: the rate limits of operations and messages (``rate_limited`` with
``retry_after``)."""

from __future__ import annotations

# A shortfall this small is the float arithmetic of the clock (seconds since 1970 leave ~0.2 µs of
# precision), not a token missing: a client resending exactly when retry_after said is let in.
TOKEN_SLACK = 1e-6


class TokenBuckets:
    """One token bucket per key (a user address, a device session): ``burst`` tokens, refilled at ``rate`` per
    second. Keys whose bucket is full again are forgotten when the table grows, so it holds only
    recently active users."""

    def __init__(self, burst: int, rate: float, *, max_keys: int = 65_536) -> None:
        self.burst = float(burst)
        self.rate = rate
        self.max_keys = max_keys
        # key -> [tokens, at]: updated in place, as every routed stanza spends from two buckets.
        self._buckets: dict = {}

    def set_rate(self, burst: float, rate: float) -> None:
        """New burst and rate (a configuration reload); buckets keep their tokens, capped at the burst."""
        self.burst = float(burst)
        self.rate = rate

    def take(self, key, now: float, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens (one by default): 0.0 when allowed, otherwise the seconds until
        they are available (nothing is spent). A cost above the burst is never allowed."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._forget_full(now)
            bucket = self._buckets[key] = [self.burst, now]
        elapsed = now - bucket[1]
        tokens = bucket[0] + elapsed * self.rate if elapsed > 0.0 else bucket[0]  # a clock step back adds nothing
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens < cost - TOKEN_SLACK:
            bucket[0] = tokens
            return (cost - tokens) / self.rate
        bucket[0] = tokens - cost
        return 0.0

    def tokens(self, key, now: float) -> float:
        """The tokens ``key`` holds at ``now`` (its burst if it has no bucket), spending nothing."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.burst
        elapsed = now - bucket[1]
        return min(self.burst, bucket[0] + (elapsed * self.rate if elapsed > 0.0 else 0.0))

    def wait(self, key, now: float, cost: float) -> float:
        """The seconds until ``key`` holds ``cost`` tokens, spending nothing: 0.0 exactly when
        ``take`` would allow it now (within ``TOKEN_SLACK``)."""
        missing = cost - self.tokens(key, now)
        return missing / self.rate if missing > TOKEN_SLACK else 0.0

    def _forget_full(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
        if len(self._buckets) >= self.max_keys:
            # Still full of active keys (many sources at once: an IPv6 attacker has /64s to
            # spare): keep the newer half, or every new key would pay for a full scan.
            keys = list(self._buckets)[-(self.max_keys // 2):] if self.max_keys > 1 else []
            self._buckets = {k: self._buckets[k] for k in keys}
