"""Counters the gateway keeps for operators, cheap enough for the message path: plain ints and
fixed-bucket histograms, read (never pushed) by the admin endpoint's Prometheus collector."""

from __future__ import annotations

import bisect

# Seconds; a commit with fsync takes 0.5-5 ms on a healthy disk, far more on a struggling one.
COMMIT_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Histogram:
    """Counts per upper bound (the last bucket is +Inf) and the sum of what was observed."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> dict:
        """``{"buckets": [(upper bound, cumulative count), ..., ("+Inf", count)], "sum", "count"}``."""
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            cumulative.append((bound, running))
        return {"buckets": cumulative, "sum": self.total, "count": running}
