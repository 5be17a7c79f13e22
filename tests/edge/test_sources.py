"""Admission per source address (``core/edge/sources.py``): what counts as one source, the
pre-auth connections one source may hold, its handshake rate with a burst, and the gateway's
handshake budget, past which only sources with few recent attempts get in."""

from __future__ import annotations

import pytest

from interlink.core.edge.sources import (
    HANDSHAKE_BUDGET,
    HANDSHAKE_RATE,
    LOCAL,
    PREAUTH_PER_SOURCE,
    SourceLimits,
    TrustedProxies,
    is_loopback,
    source_of,
)


@pytest.mark.parametrize("peername, source", [
    (("203.0.113.7", 5555), "203.0.113.7"),
    (("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 5555, 0, 0), "2001:db8:1:2::/64"),
    (("2001:db8:1:2::1", 1, 0, 0), "2001:db8:1:2::/64"),  # the same /64: one subscriber
    (("2001:db8:1:3::1", 1, 0, 0), "2001:db8:1:3::/64"),
    (("::ffff:198.51.100.9", 1, 0, 0), "198.51.100.9"),  # an IPv4 client on a dual-stack socket
    (("fe80::1%eth0", 1, 0, 0), "fe80::/64"),
    (("::1", 1, 0, 0), "::1"),
    (None, LOCAL), ("/run/interlink.sock", LOCAL), (("", 0), ""),
])
def test_what_counts_as_one_source(peername, source):
    assert source_of(peername) == source


def test_loopback_sources():
    assert all(is_loopback(s) for s in ("127.0.0.1", "127.8.9.10", "::1", LOCAL))
    assert not any(is_loopback(s) for s in ("10.0.0.1", "2001:db8::/64", "fe80::/64"))


def limits(**overrides) -> SourceLimits:
    values = {"max_preauth_per_source": 3, "handshakes_per_s_per_source": 1000.0, "handshake_budget_per_s": 1e6}
    return SourceLimits(**{**values, **overrides})


def test_one_source_holds_at_most_its_preauth_slots_and_gets_them_back():
    sources = limits(max_preauth_per_source=3)
    assert [sources.admit("198.51.100.1", 0.0) for _ in range(4)] == [None, None, None, PREAUTH_PER_SOURCE]
    assert sources.admit("198.51.100.2", 0.0) is None  # another address is not affected
    sources.left("198.51.100.1")  # one authenticated (or closed)
    assert sources.admit("198.51.100.1", 0.0) is None
    assert (sources.preauth("198.51.100.1"), sources.sources) == (3, 2)
    for _ in range(3):
        sources.left("198.51.100.1")
    assert sources.preauth("198.51.100.1") == 0 and sources.sources == 1


def test_a_source_gets_its_rate_with_a_two_second_burst():
    sources = limits(max_preauth_per_source=10_000, handshakes_per_s_per_source=10.0)
    admitted = [sources.admit("198.51.100.1", 0.0) for _ in range(25)]
    assert admitted.count(None) == 20 and admitted[-1] == HANDSHAKE_RATE  # burst: 2 s worth
    assert sources.admit("198.51.100.1", 0.05) == HANDSHAKE_RATE  # half a token back: not yet
    assert sources.admit("198.51.100.1", 0.1) is None  # a token a tenth of a second
    assert sources.admit("198.51.100.9", 0.1) is None


def test_past_the_budget_only_sources_with_few_attempts_get_in():
    sources = limits(max_preauth_per_source=10_000, handshakes_per_s_per_source=100.0, handshake_budget_per_s=50.0)
    storm = [sources.admit("198.51.100.66", 0.0) for _ in range(150)]
    assert storm[:100].count(None) == 100  # the budget's burst (100), all to the storm ...
    assert set(storm[100:]) == {HANDSHAKE_BUDGET}  # ... then the storm's own attempts are refused
    # half a second later the budget has 25 again: the storm takes them, then is refused again
    later = [sources.admit("198.51.100.66", 0.5) for _ in range(50)]
    assert later.count(None) == 25 and later[-1] == HANDSHAKE_BUDGET
    # the budget is spent, yet an address that has been quiet still connects, again and again
    assert [sources.admit("203.0.113.5", 0.5) for _ in range(3)] == [None, None, None]


def test_new_limits_apply_at_once():
    sources = limits(max_preauth_per_source=1)
    assert sources.admit("198.51.100.1", 0.0) is None
    assert sources.admit("198.51.100.1", 0.0) == PREAUTH_PER_SOURCE
    sources.configure(max_preauth_per_source=2, handshakes_per_s_per_source=1000.0, handshake_budget_per_s=1e6)
    assert sources.admit("198.51.100.1", 0.0) is None


def test_trusted_proxies_match_addresses_and_networks():
    proxies = TrustedProxies(["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"])
    assert "10.1.2.3" in proxies and "192.0.2.7" in proxies and "2001:db8:5::1" in proxies
    assert "::ffff:10.9.9.9" in proxies  # an IPv4-mapped peer is its IPv4 address
    assert "fe80::1%eth0" not in proxies and "11.0.0.1" not in proxies and "192.0.2.8" not in proxies
    assert "not-an-address" not in proxies and None not in proxies
    assert not TrustedProxies() and "127.0.0.1" not in TrustedProxies()


@pytest.mark.parametrize("lines, client", [
    ([], "10.0.0.1"),  # no header: the proxy is the client
    (["203.0.113.5"], "203.0.113.5"),
    (["198.51.100.9, 203.0.113.5"], "203.0.113.5"),  # the client wrote the first entry: not believed
    (["203.0.113.5, 10.0.0.2"], "203.0.113.5"),  # two trusted proxies in a row
    (["203.0.113.5", "10.0.0.2"], "203.0.113.5"),  # the same in two header lines
    (["[2001:db8:9::1]:5555, 10.0.0.2"], "2001:db8:9::1"),
    (["203.0.113.5:1234"], "203.0.113.5"),
    (["unknown, 10.0.0.2"], "10.0.0.2"),  # a malformed entry: the last address a trusted proxy vouched for
    (["203.0.113.5, garbage"], "10.0.0.1"),
    (["10.0.0.3, 10.0.0.2"], "10.0.0.3"),  # only proxies: the leftmost
])
def test_x_forwarded_for_names_the_rightmost_untrusted_address(lines, client):
    assert TrustedProxies(["10.0.0.0/8"]).client_of(lines, "10.0.0.1") == client


def test_x_forwarded_for_looks_at_the_rightmost_entries_only():
    proxies = TrustedProxies(["10.0.0.0/8"])
    long_chain = ", ".join(["203.0.113.9"] + [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(100_000)])
    # Past the 16 rightmost entries nothing is read: all trusted there, the leftmost of them wins.
    assert proxies.client_of([long_chain], "10.0.0.1") == "10.1.134.144"
    assert proxies.client_of(["203.0.113.9, 10.0.0.2"], "10.0.0.1") == "203.0.113.9"
