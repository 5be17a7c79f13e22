"""JwksCache against a real OpenID issuer over HTTP (DemoIssuer): TTL, rate limit,
single-flight, issuer outages and stalls, discovery checks, bad documents, key hygiene.
The cache's clock is fake; HTTP and its timeouts are real."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import pytest

from interlink.core.domain.auth import Provider, ProviderRegistry
from interlink.core.errors import ConfigError
from interlink.testing import DemoIssuer, FakeClock, OMIT, jwks_cache, token_verifier

AUD = "interlink-gw.example"
NOW = 1_800_000_000.0


@pytest.fixture
async def issuer():
    async with DemoIssuer() as iss:
        yield iss


@pytest.fixture
def clock():
    return FakeClock(50_000.0)


@pytest.fixture
async def cache(clock):
    c = jwks_cache(clock=clock)
    try:
        yield c
    finally:
        await c.close()


def discovery_provider(issuer: DemoIssuer, pid: str = "a") -> Provider:
    return Provider(id=pid, issuer=issuer.issuer, audience=AUD, discovery=True)


def uri_provider(issuer: DemoIssuer, pid: str = "a") -> Provider:
    return Provider(id=pid, issuer=issuer.issuer, audience=AUD, jwks_uri=issuer.jwks_uri)


# -- TTL ----------------------------------------------------------------------------------------


async def test_ttl_refresh(issuer, cache, clock):
    provider = discovery_provider(issuer)
    kid = issuer.default_kid()
    assert (await cache.get_key(provider, kid)).key_id == kid
    assert (issuer.discovery_requests, issuer.jwks_requests) == (1, 1)
    clock.advance(299)
    await cache.get_key(provider, kid)
    assert issuer.jwks_requests == 1
    # Past the TTL a known kid is served at once and refreshed behind (stale-while-revalidate).
    old = kid
    issuer.rotate("EdDSA", retire_old=True)
    clock.advance(2)
    assert (await cache.get_key(provider, old)).key_id == old
    await cache.wait_idle()
    assert (issuer.discovery_requests, issuer.jwks_requests) == (2, 2)
    stats = cache.stats("a")
    assert (stats.attempts, stats.successes, stats.failures) == (2, 2, 0)
    # The retired key left the refreshed set: asking for it is refused at once, without a
    # fetch (tokens signed with it may still be about); the new key is there.
    assert await cache.get_key(provider, old) is None
    assert await cache.get_key(provider, old) is None
    assert issuer.jwks_requests == 2
    assert await cache.get_key(provider, issuer.default_kid()) is not None
    assert issuer.jwks_requests == 2
    # Should the provider publish it again, the next refresh finds it.
    issuer.publish(old)
    clock.advance(300)
    await cache.get_key(provider, issuer.default_kid())
    await cache.wait_idle()
    assert (await cache.get_key(provider, old)).key_id == old


async def test_ttl_bounds_are_validated():
    for kwargs in ({"ttl_s": 299}, {"ttl_s": 601}, {"min_refetch_interval_s": 29.9}, {"fetch_timeout_s": 0},
                   {"fetch_timeout_s": 5.1}, {"clock": 5}, {"max_keys": 0}, {"ttl_s": "300"}):
        with pytest.raises(ConfigError):
            jwks_cache(**kwargs)
    await jwks_cache(ttl_s=600, fetch_timeout_s=5, min_refetch_interval_s=120).close()


# -- rate limit and single flight ---------------------------------------------------------------


async def test_burst_of_unknown_kids_shares_one_fetch_per_gap(issuer, cache, clock):
    provider = uri_provider(issuer)
    assert await cache.get_key(provider, issuer.default_kid()) is not None
    assert issuer.jwks_requests == 1  # the initial fill
    # 50 unknown kids at once: one fetch answers them all, at once (the fill does not count).
    start = clock()
    assert await asyncio.gather(*(cache.get_key(provider, f"nope-{i}") for i in range(50))) == [None] * 50
    assert issuer.jwks_requests == 2
    assert clock() == start
    # One by one, each waits for its own fetch, a gap after the previous one: never faster.
    for i in range(5):
        before = clock()
        assert await cache.get_key(provider, f"again-{i}") is None
        assert clock() - before == pytest.approx(2.0)
    assert issuer.jwks_requests == 7
    stats = cache.stats("a")
    assert (stats.attempts, stats.unknown_kid_refetches, stats.unknown_kid_waits) == (7, 6, 55)
    # A kid asked for long after the last fetch is fetched at once.
    clock.advance(60)
    before = clock()
    assert await cache.get_key(provider, "late") is None
    assert clock() == before and issuer.jwks_requests == 8


async def test_made_up_kids_never_lock_out_a_rotated_key(issuer, cache, clock):
    """The attack of issue 17: a token with a made-up kid used to spend the provider's one
    refetch per 30 s, so a key rotated in just after it was refused for the rest of the TTL."""
    provider = uri_provider(issuer)
    assert await cache.get_key(provider, issuer.default_kid()) is not None
    clock.advance(5)
    assert await cache.get_key(provider, "made-up") is None  # the refetch the attacker gets
    assert issuer.jwks_requests == 2
    new_kid = issuer.rotate()
    clock.advance(1)
    asked = clock()
    assert (await cache.get_key(provider, new_kid)).key_id == new_kid
    assert clock() - asked <= cache.unknown_kid_gap_s
    assert issuer.jwks_requests == 3


async def test_flood_of_made_up_kids_paces_the_issuer_and_spares_the_new_key(issuer, cache, clock):
    provider = uri_provider(issuer)
    assert await cache.get_key(provider, issuer.default_kid()) is not None
    start, fetched = clock(), issuer.jwks_requests
    new_kid = None
    for wave in range(20):  # 20 waves of 100 made-up kids, a new key rotated in half-way
        if wave == 10:
            new_kid = issuer.rotate()
            genuine = asyncio.ensure_future(cache.get_key(provider, new_kid))
            asked = clock()
        found = await asyncio.gather(*(cache.get_key(provider, f"w{wave}-{i}") for i in range(100)))
        assert found == [None] * 100
        if wave == 10:
            assert (await genuine).key_id == new_kid
            assert clock() - asked <= cache.unknown_kid_gap_s
        clock.advance(0.1)
    elapsed = clock() - start
    # At most one request per gap, however many kids arrived.
    assert issuer.jwks_requests - fetched <= elapsed / cache.unknown_kid_gap_s + 1
    assert cache.stats("a").unknown_kid_waits == 2001


async def test_kid_asked_during_a_fetch_waits_for_the_next_one(issuer, clock):
    """A key published after the running request began is found by the fetch after it."""
    cache = jwks_cache(clock=clock)
    try:
        provider = uri_provider(issuer)
        assert await cache.get_key(provider, issuer.default_kid()) is not None
        clock.advance(10)
        issuer.set_delay(0.2)
        first = asyncio.ensure_future(cache.get_key(provider, "made-up"))
        await asyncio.sleep(0.1)  # the fetch for "made-up" is under way, its JWKS not yet read
        assert issuer.jwks_requests == 2
        new_kid = issuer.rotate()
        issuer.set_delay(0.0)
        clock.advance(0.5)  # the new kid is asked for after that fetch began
        assert (await cache.get_key(provider, new_kid)).key_id == new_kid
        assert await first is None
        assert issuer.jwks_requests == 3  # the first fetch's set predates the key: a second one found it
    finally:
        await cache.close()


async def test_rotated_key_is_found_right_after_the_initial_fill(issuer, cache, clock):
    provider = uri_provider(issuer)
    assert await cache.get_key(provider, issuer.default_kid()) is not None
    new_kid = issuer.rotate()
    clock.advance(1)
    assert await cache.get_key(provider, new_kid) is not None
    assert issuer.jwks_requests == 2


async def test_failed_fetch_blocks_unknown_kid_refetches_for_the_interval(issuer, cache, clock):
    provider = uri_provider(issuer)
    issuer.set_available(False)
    assert await cache.get_key(provider, "any") is None
    assert await cache.get_key(provider, "other") is None
    assert cache.stats("a").attempts == 1  # the issuer is down: no hammering
    issuer.set_available(True)
    clock.advance(30)
    assert await cache.get_key(provider, issuer.default_kid()) is not None


async def test_single_flight(issuer, cache):
    provider = discovery_provider(issuer)
    kid = issuer.default_kid("ES256")
    keys = await asyncio.gather(*(cache.get_key(provider, kid) for _ in range(20)))
    assert all(k is not None and k.key_id == kid for k in keys)
    assert (issuer.discovery_requests, issuer.jwks_requests) == (1, 1)
    assert cache.stats("a").attempts == 1


async def test_single_flight_while_stalled(issuer, clock):
    """Callers arriving while a slow fetch is in flight join it instead of starting another."""
    issuer.set_delay(0.2)
    cache = jwks_cache(clock=clock)
    try:
        provider = uri_provider(issuer)
        first = asyncio.ensure_future(cache.get_key(provider, issuer.default_kid()))
        await asyncio.sleep(0.05)
        clock.advance(100)  # even past the refetch interval, the in-flight fetch is shared
        rest = await asyncio.gather(*(cache.get_key(provider, issuer.default_kid()) for _ in range(10)))
        assert (await first) is not None and all(rest)
        assert issuer.jwks_requests == 1
    finally:
        await cache.close()


async def test_cancelled_caller_does_not_cancel_the_shared_fetch(issuer, cache):
    issuer.set_delay(0.1)
    provider = uri_provider(issuer)
    waiter = asyncio.ensure_future(cache.get_key(provider, issuer.default_kid()))
    other = asyncio.ensure_future(cache.get_key(provider, issuer.default_kid()))
    await asyncio.sleep(0.02)
    waiter.cancel()
    assert (await other) is not None
    assert issuer.jwks_requests == 1


# -- issuer outages -----------------------------------------------------------------------------


async def test_issuer_down_last_good_keys_still_served(issuer, cache, clock, caplog):
    provider = discovery_provider(issuer)
    registry = ProviderRegistry([provider])
    verifier = token_verifier(registry, cache)
    token = issuer.issue("alice", audience=AUD, now=NOW)
    assert (await verifier.verify(token, device=1, now=NOW, client_static=None)).user == "alice@a"
    issuer.set_available(False)
    clock.advance(1000)  # far past the TTL
    with caplog.at_level(logging.WARNING, logger="interlink.jwks"):
        assert (await verifier.verify(token, device=1, now=NOW, client_static=None)).user == "alice@a"
        await cache.wait_idle()
        stats = cache.stats("a")
        assert (stats.failures, stats.keys) == (1, 2) and "503" in stats.last_error
        # Still served after the failure; unknown kids do not raise either.
        assert (await verifier.verify(token, device=1, now=NOW, client_static=None)).user == "alice@a"
        assert await cache.get_key(provider, "unknown") is None
    assert any("still serving 2 cached key(s)" in r.getMessage() for r in caplog.records)
    # While down, at most one attempt per 30 s however many look-ups arrive.
    requests = issuer.discovery_requests + issuer.jwks_requests
    for i in range(20):
        assert await cache.get_key(provider, f"k{i}") is None
    assert issuer.discovery_requests + issuer.jwks_requests == requests
    # Back up: the next allowed refresh succeeds.
    issuer.set_available(True)
    clock.advance(30)
    new_kid = issuer.rotate()
    assert await cache.get_key(provider, new_kid) is not None
    assert cache.stats("a").successes == 2


async def test_issuer_down_from_the_start(issuer, cache, clock, caplog):
    issuer.set_available(False)
    provider = uri_provider(issuer)
    with caplog.at_level(logging.WARNING, logger="interlink.jwks"):
        assert await cache.get_key(provider, issuer.default_kid()) is None
    assert any("no keys cached" in r.getMessage() for r in caplog.records)
    clock.advance(10)
    assert await cache.get_key(provider, issuer.default_kid()) is None
    assert issuer.jwks_requests == 1
    issuer.set_available(True)
    clock.advance(20)
    assert await cache.get_key(provider, issuer.default_kid()) is not None
    assert issuer.jwks_requests == 2


async def test_fetch_timeout_returns_within_the_timeout(issuer, clock):
    issuer.set_delay(30)  # the issuer stalls every answer
    cache = jwks_cache(clock=clock, fetch_timeout_s=0.3)
    try:
        provider = discovery_provider(issuer)
        async with asyncio.timeout(10):  # far below the issuer's 30 s stall
            assert await cache.get_key(provider, issuer.default_kid()) is None
        assert "timed out" in cache.stats("a").last_error
        # With keys cached, a stalled TTL refresh never delays a known kid.
        issuer.set_delay(0)
        clock.advance(30)
        assert await cache.get_key(provider, issuer.default_kid()) is not None
        issuer.set_delay(30)
        clock.advance(400)
        assert await cache.get_key(provider, issuer.default_kid()) is not None
        assert cache._entries["a"].inflight is not None  # answered while the refresh still stalls
        await cache.wait_idle()
        assert cache.stats("a").failures == 2
        assert await cache.get_key(provider, issuer.default_kid()) is not None
    finally:
        await cache.close()


async def test_close_cancels_in_flight_fetch(issuer, clock):
    issuer.set_delay(30)
    cache = jwks_cache(clock=clock, fetch_timeout_s=5)
    provider = uri_provider(issuer)
    pending = asyncio.ensure_future(cache.get_key(provider, issuer.default_kid()))
    await asyncio.sleep(0.05)
    async with asyncio.timeout(5):  # far below the 30 s stall: close() really cancels the fetch
        await cache.close()
        assert await pending is None  # the waiting caller gets "no key", not an exception
    assert await cache.get_key(provider, issuer.default_kid()) is None  # closed: no new fetches


# -- bad documents ------------------------------------------------------------------------------


async def test_discovery_issuer_mismatch_rejected(issuer, cache, clock):
    issuer.discovery_overrides["issuer"] = "http://127.0.0.1:1/evil"
    provider = discovery_provider(issuer)
    assert await cache.get_key(provider, issuer.default_kid()) is None
    assert "issuer does not equal" in cache.stats("a").last_error
    assert issuer.jwks_requests == 0
    for override, needle in ((OMIT, "issuer does not equal"),):
        issuer.discovery_overrides["issuer"] = override
        clock.advance(30)
        assert await cache.get_key(provider, issuer.default_kid()) is None
        assert needle in cache.stats("a").last_error
    issuer.discovery_overrides.clear()
    issuer.discovery_overrides["jwks_uri"] = "http://example.com/jwks.json"  # plain http, not loopback
    clock.advance(30)
    assert await cache.get_key(provider, issuer.default_kid()) is None
    assert "https" in cache.stats("a").last_error
    issuer.discovery_overrides.clear()
    clock.advance(30)
    assert await cache.get_key(provider, issuer.default_kid()) is not None


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 200, "not valid JSON"),
        (b"\xff\xfe\x00", 200, "not valid JSON"),
        (b'{"keys": NaN}', 200, "not valid JSON"),
        (b"[]", 200, "not a JWK Set"),
        (b'{"keys": {}}', 200, "not a JWK Set"),
        (b'{"keys": []}', 500, "HTTP 500"),
        (b"", 302, "HTTP 302"),
    ],
)
async def test_bad_jwks_documents_keep_last_good_keys(issuer, cache, clock, body, status, needle):
    provider = uri_provider(issuer)
    kid = issuer.default_kid()
    assert await cache.get_key(provider, kid) is not None
    issuer.set_jwks_response(body, status=status)
    clock.advance(400)
    assert await cache.get_key(provider, "unknown-kid") is None  # triggers a refresh, which fails
    stats = cache.stats("a")
    assert stats.failures == 1 and needle in stats.last_error
    assert (await cache.get_key(provider, kid)).key_id == kid  # last good keys still served


async def test_oversize_response_refused(issuer, clock):
    cache = jwks_cache(clock=clock, max_response_bytes=4096)
    try:
        provider = uri_provider(issuer)
        issuer.set_jwks_response(json.dumps({"keys": [], "pad": "x" * 5000}))
        assert await cache.get_key(provider, issuer.default_kid()) is None
        assert "limit of 4096" in cache.stats("a").last_error
    finally:
        await cache.close()
    async with jwks_cache(clock=clock) as cache:  # default bound: 1 MiB
        issuer.set_jwks_response(b'{"keys": [], "pad": "' + b"x" * (1 << 20) + b'"}')
        assert await cache.get_key(provider, issuer.default_kid()) is None
        assert "limit of 1048576" in cache.stats("a").last_error


async def test_too_many_keys_refused(issuer, clock):
    provider = uri_provider(issuer)
    jwk = issuer.public_jwk()
    issuer.set_jwks_response(json.dumps({"keys": [{**jwk, "kid": f"k{i}"} for i in range(101)]}))
    async with jwks_cache(clock=clock) as cache:
        assert await cache.get_key(provider, "k1") is None
        assert "more than the limit of 100" in cache.stats("a").last_error
    issuer.set_jwks_response(json.dumps({"keys": [{**jwk, "kid": f"k{i}"} for i in range(5)]}))
    async with jwks_cache(clock=clock, max_keys=5) as cache:
        assert await cache.get_key(provider, "k1") is not None


async def test_invalid_keys_dropped_with_warning(issuer, cache, caplog):
    good = issuer.public_jwk(alg="EdDSA")
    es = issuer.public_jwk(alg="ES256")
    doc = {"keys": [
        good,
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac", "alg": "HS256"},
        {**es, "kid": "enc", "use": "enc"},
        {**es, "kid": "ops", "key_ops": ["encrypt"]},
        {**es, "kid": "dup"},
        {**es, "kid": "dup"},
        {**es, "kid": "curve", "alg": "ES384"},
        {**good, "kid": "private", "d": good["x"]},
        {"kty": "OKP", "crv": "X25519", "x": good["x"], "kid": "x25519"},
        {"kty": "EC", "crv": "P-256", "x": es["x"], "y": es["x"], "kid": "off-curve"},
        "not-an-object",
        {**es, "kid": "es-ok"},
    ]}
    issuer.set_jwks_response(json.dumps(doc))
    provider = uri_provider(issuer)
    with caplog.at_level(logging.WARNING, logger="interlink.jwks"):
        assert (await cache.get_key(provider, good["kid"])).key_id == good["kid"]
    keyset = cache.keys("a")
    assert sorted(keyset.kids) == sorted([good["kid"], "es-ok"])
    reasons = {r.kid: r.reason for r in keyset.rejected}
    assert "symmetric" in reasons["hmac"] and "not 'sig'" in reasons["enc"]
    assert "verify" in reasons["ops"] and "ambiguous" in reasons["dup"] and "P-384" in reasons["curve"]
    assert "private" in reasons["private"] and "curve" in reasons["x25519"] and "loaded" in reasons["off-curve"]
    assert len(keyset.rejected) == 10
    logged = [r.getMessage() for r in caplog.records if r.name == "interlink.jwks"]
    assert sum("dropped" in m for m in logged) == 10


# -- isolation and key-source changes ----------------------------------------------------------


async def test_keys_are_per_provider(clock):
    async with DemoIssuer() as a, DemoIssuer() as b, jwks_cache(clock=clock) as cache:
        pa, pb = uri_provider(a, "a"), discovery_provider(b, "b")
        assert await cache.get_key(pb, b.default_kid()) is not None
        assert await cache.get_key(pa, b.default_kid()) is None  # B's kid is not A's key
        assert await cache.get_key(pa, a.default_kid()) is not None
        assert b.default_kid() not in cache.keys("a") and a.default_kid() not in cache.keys("b")
        assert cache.stats("a").attempts == cache.stats("b").attempts == 1


async def test_invalidate_during_a_fetch_does_not_raise_in_waiters(issuer, cache):
    issuer.set_delay(0.2)
    provider = uri_provider(issuer)
    pending = [asyncio.ensure_future(cache.get_key(provider, issuer.default_kid())) for _ in range(3)]
    await asyncio.sleep(0.05)
    cache.invalidate("a")
    assert await asyncio.gather(*pending) == [None, None, None]
    issuer.set_delay(0)
    assert await cache.get_key(provider, issuer.default_kid()) is not None


async def test_key_source_change_and_invalidate(issuer, cache, clock):
    provider = discovery_provider(issuer)
    assert await cache.get_key(provider, issuer.default_kid()) is not None
    inline = dataclasses.replace(provider, discovery=False, jwks={"keys": [issuer.public_jwk(alg="ES256")]})
    assert await cache.get_key(inline, issuer.default_kid("ES256")) is not None
    assert await cache.get_key(inline, issuer.default_kid("EdDSA")) is None
    assert issuer.jwks_requests == 1  # inline keys: no HTTP
    assert await cache.get_key(provider, issuer.default_kid()) is not None  # back to discovery: refetch
    assert issuer.jwks_requests == 2
    cache.invalidate("a")
    assert cache.keys("a") is None and cache.stats("a").attempts == 0
    assert await cache.get_key(provider, issuer.default_kid()) is not None
    assert issuer.jwks_requests == 3


async def test_refresh_warms_the_cache(issuer, cache):
    provider = uri_provider(issuer)
    assert await cache.refresh(provider) is True
    assert await cache.refresh(provider) is True  # rate-limited: no second request
    assert issuer.jwks_requests == 1
    assert await cache.refresh(provider, force=True) is True
    assert issuer.jwks_requests == 2


async def test_issuer_with_path_and_shared_session(clock):
    import aiohttp

    async with DemoIssuer(path="/realms/acme") as issuer, aiohttp.ClientSession() as session:
        assert issuer.issuer.endswith("/realms/acme")
        cache = jwks_cache(clock=clock, session=session)
        provider = discovery_provider(issuer)
        assert await cache.get_key(provider, issuer.default_kid()) is not None
        await cache.close()
        assert not session.closed  # a caller's session is left open


# -- robustness (hypothesis) --------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from interlink.core.domain.auth import JwksError, parse_jwks  # noqa: E402

_B64 = st.sampled_from(["AQAB", "AQ", "", "04N0xi21hshyvBp7I167sbE_bXqyqkAPfefdklMO7wY",
                        "UI8exy-C06a7DUnjIdENkxeFtHM4-l_41LqEw9nVgmw", "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
                        "!!", "AAAA" * 70])
_VALUE = _B64 | st.sampled_from(["RSA", "EC", "OKP", "oct", "P-256", "P-384", "Ed25519", "Ed448", "X25519",
                                 "sig", "enc", "EdDSA", "ES256", "RS256", "HS256", "none"]) \
    | st.none() | st.integers() | st.lists(st.sampled_from(["verify", "sign", "encrypt"]), max_size=3)
_JWK = st.dictionaries(st.sampled_from(["kty", "crv", "x", "y", "n", "e", "alg", "use", "key_ops", "kid", "d", "k"]),
                       _VALUE, max_size=8)


@settings(max_examples=400, deadline=None)
@given(st.lists(_JWK | st.integers() | st.text(max_size=3), max_size=4) | st.integers() | st.none())
def test_parse_jwks_is_total(keys):
    try:
        keyset = parse_jwks({"keys": keys})
    except JwksError:
        assert not isinstance(keys, list)
        return
    assert len(keyset.keys) + len(keyset.rejected) == len(keys)
    for key in keyset.keys:
        assert key.use in (None, "sig") and (key.key_ops is None or "verify" in key.key_ops)
        assert key.key_type in ("RSA", "EC", "OKP")
