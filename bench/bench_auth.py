"""Token verification micro-benchmarks (pytest-benchmark).

    .venv/bin/python -m pytest bench/bench_auth.py -q

- ``verify_with_key`` (synchronous core: strict parse, PyJWT signature check, claim checks)
  for EdDSA (Ed25519) and ES256 (P-256) tokens with an already-parsed key;
- ``TokenVerifier.verify`` (the full async path: registry, JwksCache look-up, verification)
  with cached keys, driven without an event loop turn (it never suspends when the key is
  cached) and, for comparison, through ``loop.run_until_complete`` with keys fetched over
  HTTP from a DemoIssuer.
"""

from __future__ import annotations

import asyncio

import pytest

import interlink.core
from interlink.core.domain.auth import Provider, ProviderRegistry, parse_jwks, verify_with_key
from interlink.load.e2ee import drive
from interlink.testing import DemoIssuer, jwks_cache, token_verifier

AUD = "interlink-gw.example"
NOW = 1_800_000_000.0


def setup_module() -> None:
    print(f"\ninterlink.core.IMPLEMENTATION = {interlink.core.IMPLEMENTATION}")


@pytest.fixture(scope="module")
def issuer() -> DemoIssuer:
    # Not started: inline keys need no HTTP, and issue() only needs the issuer URL.
    iss = DemoIssuer(port=18_999)
    return iss


@pytest.fixture(scope="module")
def provider(issuer) -> Provider:
    return Provider(id="acme", issuer=issuer.issuer, audience=AUD, jwks=issuer.jwks())


_run_without_loop = drive  # verify() with a cached key completes without suspending (no I/O)


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_verify_with_key(benchmark, issuer, provider, alg):
    benchmark.extra_info["implementation"] = interlink.core.IMPLEMENTATION
    token = issuer.issue("alice", audience=AUD, alg=alg, now=NOW)
    key = parse_jwks(provider.jwks).get(issuer.default_kid(alg))
    ident = benchmark(verify_with_key, token, provider, key, device=1, now=NOW)
    assert ident.user == "alice@acme"


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_full_verify_cached_key(benchmark, issuer, provider, alg):
    benchmark.extra_info["implementation"] = interlink.core.IMPLEMENTATION
    registry = ProviderRegistry([provider])
    cache = jwks_cache(clock=lambda: 0.0)
    verifier = token_verifier(registry, cache)
    token = issuer.issue("alice", audience=AUD, alg=alg, now=NOW)

    def run():
        return _run_without_loop(verifier.verify(token, device=1, now=NOW, client_static=None))

    assert benchmark(run).user == "alice@acme"


def test_full_verify_event_loop_http_keys(benchmark):
    """Full path through an event loop, keys fetched once over HTTP by discovery."""
    benchmark.extra_info["implementation"] = interlink.core.IMPLEMENTATION
    loop = asyncio.new_event_loop()
    try:
        iss = DemoIssuer()
        loop.run_until_complete(iss.start())
        registry = ProviderRegistry([Provider(id="acme", issuer=iss.issuer, audience=AUD, discovery=True)])
        cache = jwks_cache(clock=lambda: 0.0)
        verifier = token_verifier(registry, cache)
        token = iss.issue("alice", audience=AUD, now=NOW)

        def run():
            return loop.run_until_complete(verifier.verify(token, device=1, now=NOW, client_static=None))

        assert run().user == "alice@acme"  # warm the cache (one discovery + one JWKS request)
        assert benchmark(run).user == "alice@acme"
        assert iss.jwks_requests == 1
        loop.run_until_complete(cache.close())
        loop.run_until_complete(iss.stop())
    finally:
        loop.close()
