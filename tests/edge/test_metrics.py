"""The fixed-bucket histogram behind interlink_commit_seconds."""

from interlink.core.edge.metrics import Histogram


def test_buckets_are_upper_bounds_and_cumulative():
    histogram = Histogram((0.001, 0.01))
    for value in (0.0005, 0.001, 0.002, 0.5, 0.009):
        histogram.observe(value)
    snapshot = histogram.snapshot()
    assert snapshot["buckets"] == [(0.001, 2), (0.01, 4), (float("inf"), 5)]  # a value on a bound counts in it
    assert snapshot["count"] == 5
    assert abs(snapshot["sum"] - 0.5125) < 1e-12


def test_an_empty_histogram():
    assert Histogram((1.0,)).snapshot() == {"buckets": [(1.0, 0), (float("inf"), 0)], "sum": 0.0, "count": 0}
