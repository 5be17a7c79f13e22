"""Admission per source address, before authentication (issue 17): a flood from one address
costs that address, not everyone.

A source is an IPv4 address or an IPv6 /64 (one subscriber's prefix; an IPv4-mapped IPv6 address
counts as its IPv4 address). Three limits, checked when a connection is accepted:

- ``max_preauth_per_source``: connections of one source not yet authenticated (silent
  connections held open to use up the gateway's pre-auth slots);
- ``handshakes_per_s_per_source``: new connections per second of one source, with a burst of
  two seconds' worth (a handshake storm);
- ``handshake_budget_per_s``: new connections per second for the whole gateway, burst two
  seconds' worth. Past it, a source is still admitted while it has made few attempts lately
  (its own bucket at least ``QUIET_FRACTION`` full): a storm from a few addresses spends the
  budget, and everybody else's reconnects still get through.

The defaults leave room for a carrier-grade NAT with many users behind one address
(docs/operations.md "Sizing" says how to size them).
"""

from __future__ import annotations

import ipaddress

from interlink.core.domain.ratelimit import TokenBuckets

MAX_FORWARDED_HOPS = 16  # X-Forwarded-For entries looked at, from the right
QUIET_FRACTION = 0.5  # past the global budget, a source whose own bucket is at least this full still gets in
LOCAL = "local"  # a connection without an IP peer (a Unix socket, a test transport)

PREAUTH_PER_SOURCE = "preauth_per_source"
HANDSHAKE_RATE = "handshake_rate"
HANDSHAKE_BUDGET = "handshake_budget"


def source_of(peername) -> str:
    """The source a peer address counts under: ``a.b.c.d``, or an IPv6 /64 as ``xxxx:xxxx:xxxx:xxxx::/64``."""
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return LOCAL
    host = peername[0]
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if address.is_loopback:
        return "::1"
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


def is_loopback(source: str) -> bool:
    """A source on this host (127.0.0.0/8, ::1, or no IP at all)."""
    return source == LOCAL or source.startswith("127.") or source == "::1"


class SourceLimits:
    """The three limits' state: open pre-auth connections per source, and the token buckets."""

    def __init__(self, *, max_preauth_per_source: int, handshakes_per_s_per_source: float,
                 handshake_budget_per_s: float) -> None:
        self._per_source = TokenBuckets(2 * handshakes_per_s_per_source, handshakes_per_s_per_source)
        self._budget = TokenBuckets(2 * handshake_budget_per_s, handshake_budget_per_s, max_keys=1)
        self.max_preauth_per_source = max_preauth_per_source
        self._preauth: dict[str, int] = {}  # source -> its connections not yet authenticated

    def configure(self, *, max_preauth_per_source: int, handshakes_per_s_per_source: float,
                  handshake_budget_per_s: float) -> None:
        """New limits (a reload); the buckets keep what they hold."""
        self.max_preauth_per_source = max_preauth_per_source
        self._per_source.set_rate(2 * handshakes_per_s_per_source, handshakes_per_s_per_source)
        self._budget.set_rate(2 * handshake_budget_per_s, handshake_budget_per_s)

    def admit(self, source: str, now: float) -> str | None:
        """Count a new connection of ``source``: None if admitted (it holds a pre-auth slot of its
        source until ``left``), else the reason it is refused."""
        if self._preauth.get(source, 0) >= self.max_preauth_per_source:
            return PREAUTH_PER_SOURCE
        per_source = self._per_source
        if per_source.take(source, now):
            return HANDSHAKE_RATE
        if self._budget.take(None, now) and per_source.tokens(source, now) < QUIET_FRACTION * per_source.burst:
            return HANDSHAKE_BUDGET
        self._preauth[source] = self._preauth.get(source, 0) + 1
        return None

    def left(self, source: str) -> None:
        """A connection of ``source`` authenticated or closed before it did."""
        count = self._preauth.get(source, 0) - 1
        if count > 0:
            self._preauth[source] = count
        else:
            self._preauth.pop(source, None)

    def preauth(self, source: str) -> int:
        return self._preauth.get(source, 0)

    @property
    def sources(self) -> int:
        """Sources with a connection not yet authenticated."""
        return len(self._preauth)


class TrustedProxies:
    """The proxies whose word on the client's address is believed (``tcp_trusted_proxies``,
    ``ws_trusted_proxies``): IP networks, matched against the connecting peer."""

    __slots__ = ("_networks",)

    def __init__(self, cidrs=()) -> None:
        self._networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, host) -> bool:
        """Whether ``host`` (an address string; an IPv4-mapped IPv6 address counts as its IPv4
        one, a scope id is ignored) is one of the proxies."""
        if not self._networks or not isinstance(host, str):
            return False
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def client_of(self, forwarded_for: list[str], peer_host: str) -> str:
        """The client's address behind a chain of proxies, from the ``X-Forwarded-For`` header
        lines (each proxy appends the address it received the connection from): the rightmost
        address that is not a trusted proxy. Entries left of it were written by the client
        itself and prove nothing. A malformed entry ends the walk at the last address a trusted
        proxy vouched for; no header at all means the proxy is the client."""
        client = peer_host
        entries = []  # the rightmost MAX_FORWARDED_HOPS entries: no chain of proxies is longer
        for line in reversed(forwarded_for):
            entries[:0] = [entry.strip() for entry in line.rsplit(",", MAX_FORWARDED_HOPS)[-MAX_FORWARDED_HOPS:]]
            if len(entries) >= MAX_FORWARDED_HOPS:
                entries = entries[-MAX_FORWARDED_HOPS:]
                break
        for entry in reversed(entries):
            host = _forwarded_host(entry)
            if host is None:
                break
            client = host
            if host not in self:
                break
        return client


def _forwarded_host(entry: str) -> str | None:
    """The address of one ``X-Forwarded-For`` entry (``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1``,
    ``[2001:db8::1]:5678``), normalised; None when it is not an IP address."""
    if entry.startswith("["):
        entry = entry[1:].partition("]")[0]
    elif entry.count(":") == 1:
        entry = entry.partition(":")[0]
    try:
        return str(ipaddress.ip_address(entry))
    except ValueError:
        return None
