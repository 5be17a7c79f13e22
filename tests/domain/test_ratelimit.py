"""Token buckets: burst, refill, the wait they announce, and their bounded table."""

import pytest

from interlink.core.domain.ratelimit import TokenBuckets


def test_burst_then_refill_at_the_rate():
    buckets = TokenBuckets(3, 2.0)
    assert [buckets.take("a", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", 100.0) == pytest.approx(0.5)  # one token takes 1/rate seconds
    assert buckets.take("a", 100.25) == pytest.approx(0.25)  # half a token came back meanwhile
    assert buckets.take("a", 100.5) == 0.0
    assert buckets.take("b", 100.5) == 0.0  # keys are independent


def test_wait_announces_the_seconds_until_a_cost_is_there_and_spends_nothing():
    buckets = TokenBuckets(10, 2.0)
    assert buckets.wait("a", 0.0, 10.0) == 0.0  # a key without a bucket holds its burst
    assert buckets.take("a", 0.0, 7.0) == 0.0
    assert buckets.wait("a", 0.0, 5.0) == pytest.approx(1.0) and buckets.tokens("a", 0.0) == pytest.approx(3.0)
    assert buckets.wait("a", 1.0, 5.0) == 0.0


def test_refill_stops_at_the_burst():
    buckets = TokenBuckets(2, 1.0)
    buckets.take("a", 0.0)
    assert [buckets.take("a", 1000.0) for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("a", 1000.0) == pytest.approx(1.0)  # two tokens at most, however long the wait


def test_a_clock_step_back_adds_no_tokens():
    buckets = TokenBuckets(1, 1.0)
    assert buckets.take("a", 50.0) == 0.0
    assert buckets.take("a", 10.0) == pytest.approx(1.0)
    assert buckets.take("a", 10.5) == pytest.approx(0.5)  # counted from the step back


def test_a_burst_below_one_refuses_until_a_token_accrues():
    buckets = TokenBuckets(0.5, 0.25)
    assert buckets.take("a", 0.0) == pytest.approx(2.0)
    assert buckets.take("a", 2.0) > 0  # never reaches a whole token: the burst caps it


def test_full_buckets_are_forgotten_when_the_table_is_full():
    buckets = TokenBuckets(2, 1.0, max_keys=3)
    for key in "abc":
        buckets.take(key, 0.0)
    buckets.take("c", 5.0)
    buckets.take("d", 6.0)  # a and b are full again (2 s refill the burst), c was used 1 s ago
    assert set(buckets._buckets) == {"c", "d"}


def test_a_table_full_of_active_keys_keeps_the_newer_half_instead_of_scanning_each_time():
    """Many keys at once (an IPv6 attacker has /64s to spare for the per-source buckets): past
    the table's size the older half goes, so a new key does not pay for a full scan every time."""
    buckets = TokenBuckets(400, 200.0, max_keys=1000)
    for i in range(1000):
        buckets.take(f"2001:db8:{i:x}::/64", 0.0)
    buckets.take("newcomer", 0.001)  # nothing is full again yet: the older half goes
    assert len(buckets._buckets) == 501
    assert "newcomer" in buckets._buckets and "2001:db8:3e7::/64" in buckets._buckets
    assert "2001:db8:0::/64" not in buckets._buckets
    for i in range(498):  # the next 498 new keys fit without another scan
        buckets.take(f"n{i}", 0.002)
    assert len(buckets._buckets) == 999


def test_a_take_exactly_when_the_wait_said_is_allowed_despite_the_clocks_float_rounding():
    """Seconds since 1970 keep ~0.2 µs of precision: ``(t + w) - t`` may come out under ``w``, and a
    client resending exactly after the announced wait was refused again for a sliver of a token."""
    start = next(t for t in (1.8e9 + i * 0.013 for i in range(1000)) if (t + 0.1) - t < 0.1)
    buckets = TokenBuckets(1, 10.0)  # a token every 0.1 s
    assert buckets.take("a", start) == 0.0
    wait_s = buckets.take("a", start)
    assert wait_s == pytest.approx(0.1)
    assert buckets.wait("a", start + wait_s, 1.0) == 0.0  # the wait agrees with the take that follows
    assert buckets.take("a", start + wait_s) == 0.0
    assert buckets.take("a", start + wait_s) > 0  # and only the one token
