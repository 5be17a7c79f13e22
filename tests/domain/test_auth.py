"""Provider authentication (PROTOCOL §3): TokenVerifier + JwksCache against real OpenID issuers
served over HTTP on loopback (``interlink.testing.DemoIssuer``); no HTTP mocks. Every refusal
asserts the exact PROTOCOL §4 code and that the message does not echo the token."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
from dataclasses import dataclass

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from interlink.core.domain.auth import (
    Identity,
    Provider,
    ProviderRegistry,
    TokenVerifier,
    localpart_error,
    validate_localpart,
    verify_with_key,
)
from interlink.core.errors import AuthError, ConfigError
from interlink.core.edge.jwks import JwksCache
from interlink.testing import DemoIssuer, FakeClock, OMIT, jwks_cache, token_verifier

AUD = "interlink-gw.example"
NOW = 1_800_000_000.0


@dataclass
class Env:
    a: DemoIssuer
    b: DemoIssuer
    clock: FakeClock
    registry: ProviderRegistry
    cache: JwksCache
    verifier: TokenVerifier

    async def verify(self, token, *, device=1, now=NOW, client_static=None) -> Identity:
        return await self.verifier.verify(token, device=device, now=now, client_static=client_static)

    async def refused(self, code, token, *, device=1, now=NOW, client_static=None) -> AuthError:
        with pytest.raises(AuthError) as info:
            await self.verify(token, device=device, now=now, client_static=client_static)
        assert info.value.code == code, f"expected {code}, got {info.value.code}: {info.value.message}"
        message = info.value.message
        assert message and (len(token) < 8 or token not in message)
        for part in token.split(".") if isinstance(token, str) else ():
            assert len(part) < 16 or part not in message
        return info.value


@pytest.fixture
async def env():
    async with DemoIssuer() as a, DemoIssuer(path="/tenant-b") as b:
        clock = FakeClock(10_000.0)
        registry = ProviderRegistry([
            Provider(id="a", issuer=a.issuer, audience=AUD, discovery=True),
            Provider(id="b", issuer=b.issuer, audience=AUD, jwks_uri=b.jwks_uri, default_accept=("a",)),
        ])
        cache = jwks_cache(clock=clock)
        try:
            yield Env(a, b, clock, registry, cache, token_verifier(registry, cache))
        finally:
            await cache.close()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict, claims: dict | bytes, signature: bytes = b"") -> str:
    payload = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    return f"{b64(json.dumps(header).encode())}.{b64(payload)}.{b64(signature)}"


def sign_raw(issuer: DemoIssuer, header: dict, claims: dict | bytes, kid: str) -> str:
    """Sign arbitrary header/payload bytes with one of the issuer's keys."""
    signing_input = craft(header, claims).rsplit(".", 1)[0]
    alg = jwt.get_algorithm_by_name(header["alg"])
    return signing_input + "." + b64(alg.sign(signing_input.encode(), issuer.private_key(kid)))


def claims_for(issuer: DemoIssuer, sub="alice", **extra) -> dict:
    return {"iss": issuer.issuer, "sub": sub, "aud": AUD, "iat": NOW, "exp": NOW + 300, **extra}


# -- accepted tokens ---------------------------------------------------------------------------


async def test_valid_eddsa_token_gives_identity(env):
    token = env.a.issue("alice", audience=AUD, now=NOW)
    ident = await env.verify(token, device=7)
    assert (ident.provider, ident.localpart, ident.device, ident.user) == ("a", "alice", 7, "alice@a")
    assert ident.expires_at == NOW + 300
    assert ident.phone_number is None and ident.key_bound is False
    assert ident.claims["sub"] == "alice"


async def test_es256_tokens_both_providers(env):
    ident = await env.verify(env.a.issue("alice", audience=AUD, alg="ES256", now=NOW))
    assert ident.user == "alice@a"
    ident = await env.verify(env.b.issue("bob", audience=AUD, alg="ES256", now=NOW))
    assert ident.user == "bob@b"


async def test_jwks_uri_key_source_needs_no_discovery(env):
    await env.verify(env.b.issue("bob", audience=AUD, now=NOW))
    assert env.b.discovery_requests == 0 and env.b.jwks_requests == 1
    await env.verify(env.a.issue("alice", audience=AUD, now=NOW))
    assert env.a.discovery_requests == 1 and env.a.jwks_requests == 1


async def test_inline_jwks_key_source_does_no_http(env):
    env.registry.replace(dataclasses.replace(env.registry.get("a"), discovery=False, jwks=env.a.jwks()))
    ident = await env.verify(env.a.issue("alice", audience=AUD, now=NOW))
    assert ident.user == "alice@a"
    await env.verify(env.a.issue("alice", audience=AUD, alg="ES256", now=NOW))
    assert env.a.discovery_requests == env.a.jwks_requests == 0
    # A key published later is unknown to the inline set, and no fetch is attempted.
    kid = env.a.rotate()
    await env.refused("bad_signature", env.a.issue("alice", audience=AUD, kid=kid, now=NOW))
    assert env.a.jwks_requests == 0


async def test_aud_list_containing_gateway_accepted(env):
    await env.verify(env.a.issue("alice", audience=["other", AUD], now=NOW))


async def test_token_without_kid_uses_the_only_key(env):
    env.registry.replace(dataclasses.replace(
        env.registry.get("a"), discovery=False, jwks={"keys": [env.a.public_jwk(alg="EdDSA")]}))
    kid = env.a.default_kid("EdDSA")
    token = sign_raw(env.a, {"alg": "EdDSA", "typ": "JWT"}, claims_for(env.a), kid)
    assert (await env.verify(token)).user == "alice@a"
    # With two keys published, a token without kid is ambiguous.
    env.registry.replace(dataclasses.replace(env.registry.get("a"), jwks=env.a.jwks()))
    await env.refused("bad_signature", token)


# -- time -----------------------------------------------------------------------------------


async def test_expired(env):
    err = await env.refused("token_expired", env.a.issue("alice", audience=AUD, expires_in=-61, now=NOW))
    assert "expired" in err.message
    await env.refused("token_expired", env.a.issue("alice", audience=AUD, expires_in=-3600, now=NOW))
    # Within the 60 s skew: still accepted.
    await env.verify(env.a.issue("alice", audience=AUD, expires_in=-59, now=NOW))
    # The boundary: exp == now - leeway is expired.
    await env.refused("token_expired", env.a.issue("alice", audience=AUD, expires_in=-60, now=NOW))


async def test_not_yet_valid_nbf_and_iat(env):
    err = await env.refused("auth_failed", env.a.issue("alice", audience=AUD, not_before=NOW + 61, now=NOW))
    assert "not yet valid" in err.message and "nbf" in err.message
    err = await env.refused("auth_failed", env.a.issue("alice", audience=AUD, issued_at=NOW + 61, now=NOW))
    assert "not yet valid" in err.message and "iat" in err.message
    # Within the skew: accepted.
    await env.verify(env.a.issue("alice", audience=AUD, not_before=NOW + 59, issued_at=NOW + 59, now=NOW))


async def test_time_claims_must_be_numbers(env):
    for name, value in (("exp", "1800000300"), ("exp", True), ("nbf", "soon"), ("iat", None)):
        token = env.a.issue("alice", audience=AUD, now=NOW, extra_claims={name: value})
        err = await env.refused("auth_failed", token)
        assert name in err.message


async def test_smaller_leeway_is_honoured(env):
    strict = token_verifier(env.registry, env.cache, leeway_s=0)
    token = env.a.issue("alice", audience=AUD, expires_in=-1, now=NOW)
    with pytest.raises(AuthError) as info:
        await strict.verify(token, device=1, now=NOW, client_static=None)
    assert info.value.code == "token_expired"
    await env.verify(token)  # default 60 s skew


# -- audience and issuer ------------------------------------------------------------------------


async def test_wrong_audience(env):
    await env.refused("bad_audience", env.a.issue("alice", audience="someone-else", now=NOW))
    await env.refused("bad_audience", env.a.issue("alice", audience=["x", "y"], now=NOW))
    await env.refused("auth_failed", env.a.issue("alice", audience=[], now=NOW))
    await env.refused("auth_failed", env.a.issue("alice", audience=AUD, now=NOW, extra_claims={"aud": 5}))


async def test_unknown_issuer(env):
    async with DemoIssuer() as stranger:
        await env.refused("unknown_issuer", stranger.issue("mallory", audience=AUD, now=NOW))
    assert env.a.jwks_requests == env.b.jwks_requests == 0  # refused before any key look-up
    token = env.a.issue("alice", audience=AUD, now=NOW, extra_claims={"iss": env.a.issuer + "/"})
    await env.refused("unknown_issuer", token)
    await env.refused("auth_failed", env.a.issue("alice", audience=AUD, now=NOW, extra_claims={"iss": 42}))


async def test_suspended_provider(env):
    token = env.a.issue("alice", audience=AUD, now=NOW)
    env.registry.suspend("a")
    err = await env.refused("provider_suspended", token)
    assert "'a'" in err.message
    env.registry.resume("a")
    await env.verify(token)


async def test_missing_required_claims(env):
    await env.refused("auth_failed", env.a.issue("alice", audience=AUD, expires_in=None, now=NOW))
    for name in ("sub", "aud", "iss"):
        err = await env.refused("auth_failed", env.a.issue("alice", audience=AUD, now=NOW,
                                                           extra_claims={name: OMIT}))
        assert f"no {name} claim" in err.message


@pytest.mark.parametrize("sub", ["", "a@b", "a/b", "a\x00b", "line\nbreak", "del\x7f", "x" * 65, "é" * 33, "\ud800"])
async def test_bad_sub(env, sub):
    err = await env.refused("auth_failed", env.a.issue(sub, audience=AUD, now=NOW))
    assert "sub" in err.message


@pytest.mark.parametrize("sub", ["x" * 64, "é" * 32, "Zoë.Smith+tag", "12345", "ü-ñ_日本"])
async def test_good_sub(env, sub):
    assert (await env.verify(env.a.issue(sub, audience=AUD, now=NOW))).localpart == sub


async def test_sub_must_be_a_string(env):
    await env.refused("auth_failed", env.a.issue("alice", audience=AUD, now=NOW, extra_claims={"sub": 12}))


def test_validate_localpart_contract():
    assert validate_localpart("alice") == "alice"
    assert localpart_error("a" * 64) is None
    assert localpart_error("a" * 65) == "is 65 bytes long in UTF-8 (at most 64)"
    assert localpart_error("\u0085") == "contains U+0085, a control or invisible formatting character"  # C1 (Cc)
    with pytest.raises(AuthError) as info:
        validate_localpart("a@b")
    assert info.value.code == "auth_failed"


def test_invisible_characters_cannot_disguise_one_address_as_another():
    """\ufeffalice, al\u200cice, al\u202eice would each show as a name they are not."""
    for disguised in ("\ufeffalice", "al\u200bice", "alice\u2028", "al\u202eice", "\u2066alice", "ali\u00adce",
                      "al\u200cice", "alice\u200d", "\u200d\u0645", "a\U000e0041"):
        assert localpart_error(disguised) is not None, repr(disguised)
    # The joiners are spelling between non-ASCII characters: Persian, and emoji sequences.
    for spelled in ("\u0645\u06cc\u200c\u0634\u0648\u062f", "\U0001f468\u200d\U0001f469"):
        assert localpart_error(spelled) is None, repr(spelled)


def test_the_invisible_character_class_is_the_running_unicode_databases():
    """The class is written out (a regex, for speed); it must hold every Cc, Cf, Zl and Zp code
    point this Python knows, and nothing else but the two joiners it leaves to a second rule."""
    import unicodedata

    from interlink.core.domain.auth.providers import _CONTROL_CHARACTER, INVISIBLE_CATEGORIES

    mismatched = [
        hex(point) for point in range(0x110000)
        if not 0xD800 <= point <= 0xDFFF and point not in (0x200C, 0x200D)
        and (unicodedata.category(chr(point)) in INVISIBLE_CATEGORIES) != bool(_CONTROL_CHARACTER.match(chr(point)))
    ]
    assert mismatched == [], f"Unicode {unicodedata.unidata_version}: update _CONTROL_CHARACTER for {mismatched[:10]}"


# -- algorithms and signatures ------------------------------------------------------------------


async def test_alg_none(env):
    for alg in ("none", "None", "NONE"):
        token = craft({"alg": alg, "kid": env.a.default_kid()}, claims_for(env.a))
        await env.refused("bad_signature", token)  # empty signature segment
        await env.refused("bad_signature", token + b64(b"\x00" * 64))
    assert env.a.jwks_requests == 0


async def test_hs256_signed_with_public_key_bytes(env):
    """Algorithm confusion: HMAC keyed with the provider's public key (PEM, raw, JWK JSON)."""
    kid = env.a.default_kid("EdDSA")
    public = env.a.private_key(kid).public_key()
    candidates = [
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        json.dumps(env.a.public_jwk(kid)).encode(),
    ]
    for secret in candidates:
        for alg, digest in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
            signing_input = craft({"alg": alg, "kid": kid, "typ": "JWT"}, claims_for(env.a)).rsplit(".", 1)[0]
            token = signing_input + "." + b64(hmac.new(secret, signing_input.encode(), digest).digest())
            err = await env.refused("bad_signature", token)
            assert "HMAC" in err.message
    with pytest.raises(ConfigError):
        Provider(id="x", issuer="https://x.example", audience=AUD, algorithms=("HS256",), discovery=True)


async def test_alg_not_in_provider_list(env):
    env.registry.replace(dataclasses.replace(env.registry.get("a"), algorithms=("EdDSA",)))
    await env.refused("bad_signature", env.a.issue("alice", audience=AUD, alg="ES256", now=NOW))
    await env.verify(env.a.issue("alice", audience=AUD, alg="EdDSA", now=NOW))


async def test_header_alg_must_match_the_keys_alg(env):
    """An ES256 header naming the Ed25519 key's kid (and vice versa) is refused."""
    ed_kid, es_kid = env.a.default_kid("EdDSA"), env.a.default_kid("ES256")
    es_signed = sign_raw(env.a, {"alg": "ES256", "kid": es_kid}, claims_for(env.a), es_kid)
    header, payload, sig = es_signed.split(".")
    swapped = b64(json.dumps({"alg": "ES256", "kid": ed_kid}).encode())
    err = await env.refused("bad_signature", f"{swapped}.{payload}.{sig}")
    assert "bound to EdDSA" in err.message
    await env.verify(es_signed)


async def test_unknown_kid_then_found_after_rotation(env):
    await env.verify(env.a.issue("alice", audience=AUD, now=NOW))  # initial fetch at t0
    assert env.a.jwks_requests == 1
    unknown = env.a.issue("alice", audience=AUD, now=NOW, headers={"kid": "never-published"})
    # An unknown kid 10 s later refetches at once (the last fetch is more than a gap ago) ...
    new_kid = env.a.rotate("EdDSA")
    token = env.a.issue("alice", audience=AUD, now=NOW)
    assert jwt.get_unverified_header(token)["kid"] == new_kid
    env.clock.advance(10)
    assert (await env.verify(token)).user == "alice@a"
    assert env.a.jwks_requests == 2
    # ... a made-up kid right after waits for the next fetch, a gap later, and is refused ...
    asked = env.clock()
    err = await env.refused("bad_signature", unknown)
    assert "no signing key" in err.message
    assert env.clock() - asked == pytest.approx(2.0) and env.a.jwks_requests == 3
    # ... and does not keep a key rotated in right after it out.
    newer_kid = env.a.rotate("EdDSA")
    newer = env.a.issue("alice", audience=AUD, now=NOW)
    assert jwt.get_unverified_header(newer)["kid"] == newer_kid
    assert (await env.verify(newer)).user == "alice@a"
    assert env.a.jwks_requests == 4
    await env.verify(token)
    assert env.a.jwks_requests == 4


async def test_unknown_kid_refetches_immediately_when_no_recent_fetch(env):
    await env.verify(env.a.issue("alice", audience=AUD, now=NOW))
    env.clock.advance(45)
    env.a.rotate("ES256")
    assert (await env.verify(env.a.issue("alice", audience=AUD, alg="ES256", now=NOW))).user == "alice@a"
    assert env.a.jwks_requests == 2


async def test_kid_of_another_provider(env):
    await env.verify(env.b.issue("bob", audience=AUD, now=NOW))  # B's keys are cached
    # Signed by B with B's kid, but claiming A's issuer.
    token = env.b.issue("alice", audience=AUD, now=NOW, extra_claims={"iss": env.a.issuer})
    err = await env.refused("bad_signature", token)
    assert "provider 'a'" in err.message
    assert env.b.default_kid() not in env.cache.keys("a")
    assert env.b.default_kid() in env.cache.keys("b")
    # Even if A happened to publish a key under B's kid, B's signature does not verify with it.
    env.registry.replace(dataclasses.replace(env.registry.get("a"), discovery=False, jwks={"keys": [
        {**env.a.public_jwk(alg="EdDSA"), "kid": env.b.default_kid()}]}))
    await env.refused("bad_signature", token)


async def test_tampered_signature_and_payload(env):
    token = env.a.issue("alice", audience=AUD, now=NOW)
    header, payload, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[5] ^= 0x01
    await env.refused("bad_signature", f"{header}.{payload}.{b64(bytes(raw))}")
    forged = b64(json.dumps(claims_for(env.a, sub="mallory")).encode())
    await env.refused("bad_signature", f"{header}.{forged}.{sig}")
    await env.refused("bad_signature", f"{header}.{payload}.{b64(bytes(raw[:-3]))}")  # truncated
    await env.refused("bad_signature", f"{header}.{payload}.")  # empty
    es = env.a.issue("alice", audience=AUD, now=NOW, alg="ES256")
    h, p, s = es.split(".")
    raw = bytearray(base64.urlsafe_b64decode(s + "=="))
    raw[40] ^= 0x80
    await env.refused("bad_signature", f"{h}.{p}.{b64(bytes(raw))}")


async def test_padded_and_malformed_base64url(env):
    token = env.a.issue("alice", audience=AUD, now=NOW)
    header, payload, sig = token.split(".")
    padded = [token + "=", f"{header}=.{payload}.{sig}", f"{header}.{payload}=.{sig}", token + "=="]
    for bad in padded:
        err = await env.refused("auth_failed", bad)
        assert "base64url" in err.message
    malformed = [
        token.replace("-", "+").replace("_", "/") if ("-" in token or "_" in token) else "+" + token,
        f"{header}.{payload}.{sig[:-1]}!",
        f"{header}.{payload} .{sig}",
        f"{header}.{payload}.{sig}.",
        f"{header}.{payload}",
        f"{header}..{sig}",
        "...",
        "",
        f"{b64(b'not json')}.{payload}.{sig}",
        f"{b64(b'[1, 2]')}.{payload}.{sig}",
        f"{header}.{b64(b'not json')}.{sig}",
        f"{b64(json.dumps({'kid': 'x'}).encode())}.{payload}.{sig}",
        f"{b64(json.dumps({'alg': 'EdDSA', 'kid': 7}).encode())}.{payload}.{sig}",
        f"{b64(b'{' + bytes([0xff]) + b'}')}.{payload}.{sig}",
    ]
    for bad in malformed:
        await env.refused("auth_failed", bad)
    assert env.a.jwks_requests == 0  # all refused before any key look-up


async def test_duplicate_json_members_refused(env):
    kid = env.a.default_kid()
    header = b'{"alg":"EdDSA","kid":"%s","alg":"none"}' % kid.encode()
    body = f"{b64(header)}.{b64(json.dumps(claims_for(env.a)).encode())}"
    await env.refused("auth_failed", body + ".AAAA")
    dup_claims = ('{"iss":"%s","sub":"alice","sub":"root","aud":"%s","exp":%d}'
                  % (env.a.issuer, AUD, NOW + 300)).encode()
    await env.refused("auth_failed", sign_raw(env.a, {"alg": "EdDSA", "kid": kid}, dup_claims, kid))


async def test_crit_header_refused(env):
    kid = env.a.default_kid()
    token = sign_raw(env.a, {"alg": "EdDSA", "kid": kid, "crit": ["exp"], "exp": 1}, claims_for(env.a), kid)
    err = await env.refused("auth_failed", token)
    assert "crit" in err.message


async def test_oversize_token_refused_before_parsing(env):
    big = env.a.issue("alice", audience=AUD, now=NOW, extra_claims={"pad": "x" * 9000})
    await env.refused("too_large", big)
    # Garbage of 9000 bytes is too_large (size checked first), not auth_failed.
    await env.refused("too_large", "!" * 9000)
    await env.refused("too_large", "a.b.c" * 2000)
    # 8192 bytes of garbage is within the bound and therefore parsed (and refused as malformed).
    await env.refused("auth_failed", "!" * 8192)
    # The bound is in UTF-8 bytes, not characters.
    await env.refused("too_large", "é" * 4097)
    assert env.a.jwks_requests == 0


async def test_token_and_device_types(env):
    token = env.a.issue("alice", audience=AUD, now=NOW)
    for device in (0, -1, 2**31, True, "1", 1.0, None):
        err = await env.refused("auth_failed", token, device=device)
        assert "device" in err.message
    assert (await env.verify(token, device=2**31 - 1)).device == 2**31 - 1
    for bad in (None, 123, token.encode()):
        with pytest.raises(AuthError) as info:
            await env.verify(bad)
        assert info.value.code == "auth_failed"


# -- key binding and optional claims ------------------------------------------------------------


async def test_cnf_key_binding(env):
    static = os.urandom(32)
    token = env.a.issue("alice", audience=AUD, now=NOW, extra_claims={"cnf": {"x25519": b64(static)}})
    ident = await env.verify(token, client_static=static)
    assert ident.key_bound is True
    err = await env.refused("key_binding", token, client_static=os.urandom(32))
    assert "different client key" in err.message
    await env.refused("key_binding", token, client_static=None)
    for cnf in ({"x25519": b64(static) + "="}, {"x25519": b64(static[:31])}, {"x25519": 5},
                {"jkt": "abc"}, {"x25519": b64(static), "jkt": "abc"}, "x25519", None):
        bad = env.a.issue("alice", audience=AUD, now=NOW, extra_claims={"cnf": cnf})
        await env.refused("key_binding", bad, client_static=static)


async def test_require_key_binding(env):
    env.registry.replace(dataclasses.replace(env.registry.get("b"), require_key_binding=True))
    static = os.urandom(32)
    err = await env.refused("key_binding", env.b.issue("bob", audience=AUD, now=NOW), client_static=static)
    assert "requires key-bound tokens" in err.message
    token = env.b.issue("bob", audience=AUD, now=NOW, extra_claims={"cnf": {"x25519": b64(static)}})
    assert (await env.verify(token, client_static=static)).key_bound
    await env.refused("key_binding", token, client_static=bytes(32))


async def test_phone_number_only_when_verified(env):
    def issue(**extra):
        return env.a.issue("alice", audience=AUD, now=NOW, extra_claims=extra)

    assert (await env.verify(issue(phone_number="+4915112345678", phone_number_verified=True))).phone_number \
        == "+4915112345678"
    for extra in ({"phone_number": "+4915112345678"},
                  {"phone_number": "+4915112345678", "phone_number_verified": False},
                  {"phone_number": "+4915112345678", "phone_number_verified": "true"},
                  {"phone_number": "+4915112345678", "phone_number_verified": 1},
                  {"phone_number": "0151 123", "phone_number_verified": True},
                  {"phone_number_verified": True}):
        assert (await env.verify(issue(**extra))).phone_number is None


# -- synchronous core ---------------------------------------------------------------------------


async def test_verify_with_key_matches_async_path(env):
    provider = env.registry.get("a")
    await env.cache.refresh(provider)
    key = env.cache.keys("a").get(env.a.default_kid())
    token = env.a.issue("alice", audience=AUD, now=NOW)
    assert verify_with_key(token, provider, key, device=3, now=NOW).user == "alice@a"
    assert env.verifier.verify_with_key(token, provider, key, device=3, now=NOW).device == 3
    with pytest.raises(AuthError) as info:
        verify_with_key(token, env.registry.get("b"), key, device=3, now=NOW)
    assert info.value.code == "unknown_issuer"
    with pytest.raises(AuthError) as info:
        verify_with_key(token, provider, None, device=3, now=NOW)
    assert info.value.code == "bad_signature"


# -- configuration ------------------------------------------------------------------------------


def test_provider_validation():
    ok = dict(id="acme", issuer="https://id.acme.example", audience=AUD, discovery=True)
    Provider(**ok)
    bad_cases = [
        ({"id": "Acme"}, "id"),
        ({"id": "-acme"}, "id"),
        ({"id": "a" * 64}, "id"),
        ({"issuer": "http://id.acme.example"}, "https"),
        ({"issuer": "ftp://id.acme.example"}, "issuer"),
        ({"issuer": "https://id.acme.example?x=1"}, "issuer"),
        ({"audience": ""}, "audience"),
        ({"algorithms": ()}, "algorithms"),
        ({"algorithms": ("none",)}, "algorithms"),
        ({"algorithms": ("HS256",)}, "HMAC"),
        ({"algorithms": ("EdDSA", "EdDSA")}, "twice"),
        ({"algorithms": "EdDSA"}, "algorithms"),
        ({"discovery": False}, "exactly one key source"),
        ({"jwks_uri": "https://id.acme.example/jwks"}, "discovery and jwks_uri"),
        ({"discovery": False, "jwks": {"keys": []}}, "jwks"),
        ({"discovery": False, "jwks": {"nokeys": 1}}, "jwks"),
        ({"discovery": False, "jwks_uri": "http://example.com/jwks"}, "jwks_uri"),
        ({"default_accept": ("*", "b")}, "default_accept"),
        ({"default_accept": ("B!",)}, "default_accept"),
        ({"suspended": "no"}, "suspended"),
    ]
    for change, needle in bad_cases:
        with pytest.raises(ConfigError) as info:
            Provider(**{**ok, **change})
        assert needle in str(info.value), (change, str(info.value))
    p = Provider(**{**ok, "algorithms": ["ES256"], "default_accept": ["b", "c"]})
    assert p.algorithms == ("ES256",) and p.default_accept == ("b", "c")
    assert p.key_source() == ("discovery", "https://id.acme.example/.well-known/openid-configuration")
    local = Provider(id="dev", issuer="http://127.0.0.1:8080", audience=AUD, jwks_uri="http://localhost:1/jwks")
    assert local.key_source().kind == "jwks_uri"
    hash(local)


def test_registry_operations():
    a = Provider(id="a", issuer="https://a.example", audience=AUD, discovery=True)
    b = Provider(id="b", issuer="https://b.example", audience=AUD, discovery=True)
    registry = ProviderRegistry([a])
    registry.add(b)
    assert registry.by_issuer("https://b.example") is b and registry.get("a") is a
    assert registry.by_issuer("https://c.example") is None and registry.get("c") is None
    with pytest.raises(ConfigError, match="already registered"):
        registry.add(dataclasses.replace(a, issuer="https://other.example"))
    with pytest.raises(ConfigError, match="already used"):
        registry.add(dataclasses.replace(a, id="c"))
    with pytest.raises(ConfigError, match="already used"):
        registry.replace(dataclasses.replace(b, issuer="https://a.example"))
    moved = registry.replace(dataclasses.replace(a, issuer="https://a2.example"))
    assert registry.by_issuer("https://a.example") is None and registry.by_issuer("https://a2.example") is moved
    assert registry.suspend("b").suspended and registry.get("b").suspended
    assert not registry.resume("b").suspended
    assert [p.id for p in registry.list()] == ["a", "b"] and len(registry) == 2 and "a" in registry
    registry.remove("a")
    assert registry.get("a") is None and registry.by_issuer("https://a2.example") is None
    for op in (registry.remove, registry.suspend, registry.resume):
        with pytest.raises(ConfigError):
            op("zzz")


def test_verifier_limits_are_validated():
    registry = ProviderRegistry()
    with pytest.raises(ConfigError):
        token_verifier(registry, None, leeway_s=61)
    with pytest.raises(ConfigError):
        token_verifier(registry, None, leeway_s=-1)
    with pytest.raises(ConfigError):
        token_verifier(registry, None, max_token_bytes=8193)
    token_verifier(registry, None, max_token_bytes=4096, leeway_s=0)


# -- robustness (hypothesis) --------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from interlink.core.domain.auth import check_claims, decode_token  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
_PROVIDER = Provider(id="hyp", issuer="https://hyp.example", audience=AUD, discovery=True)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("eyJ.AaZz09-_=+/ \x00é"), max_size=120) | st.text(max_size=60))
def test_decode_token_only_raises_auth_errors(text):
    try:
        decode_token(text)
    except AuthError as exc:
        assert exc.code in ("auth_failed", "too_large")


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "iss": st.just(_PROVIDER.issuer) | _json,
    "sub": st.text(max_size=70) | _json,
    "aud": st.just(AUD) | st.lists(st.just(AUD) | st.text(max_size=4), max_size=3) | _json,
    "exp": st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | _json,
    "nbf": st.floats(min_value=NOW - 100, max_value=NOW + 100) | _json,
    "iat": st.integers(min_value=int(NOW) - 100, max_value=int(NOW) + 100) | _json,
    "cnf": st.dictionaries(st.sampled_from(["x25519", "jkt"]), st.text(max_size=50) | _json, max_size=2) | _json,
    "phone_number": st.text(max_size=16) | _json,
    "phone_number_verified": st.booleans() | _json,
}))
def test_check_claims_only_raises_auth_errors(claims):
    try:
        ident = check_claims(claims, _PROVIDER, device=1, now=NOW, client_static=bytes(32))
    except AuthError as exc:
        assert exc.code in ("auth_failed", "unknown_issuer", "token_expired", "bad_audience", "key_binding")
    else:
        assert ident.expires_at > NOW - 60 and validate_localpart(ident.localpart)


async def test_verify_cached_decides_without_waiting_only_when_the_key_is_cached(env):
    token = env.a.issue("alice", audience=AUD, now=NOW)
    # Nothing cached yet: no verdict without a fetch, and no fetch was made.
    assert env.verifier.verify_cached(token, device=1, now=NOW, client_static=None) is None
    assert env.a.jwks_requests == 0
    await env.verify(token)  # fills the cache
    identity = env.verifier.verify_cached(token, device=1, now=NOW, client_static=None)
    assert identity is not None and identity.user == "alice@a"
    # Refusals are the same codes as on the waiting path.
    with pytest.raises(AuthError) as info:
        env.verifier.verify_cached(env.a.issue("alice", audience="other", now=NOW), device=1, now=NOW, client_static=None)
    assert info.value.code == "bad_audience"
    with pytest.raises(AuthError) as info:
        env.verifier.verify_cached(token, device=1, now=NOW + 3600, client_static=None)
    assert info.value.code == "token_expired"


# -- remembered signatures (devices reconnecting with the same token) ---------------------------


@pytest.fixture
def signature_checks(monkeypatch):
    """How many signatures the verifier checks (a spy that calls the real check)."""
    import interlink.core.domain.auth.verifier as verifier_module

    calls = []
    real = verifier_module.verify_signature

    def counted(decoded, key, *, algorithms):
        calls.append(decoded.kid)
        return real(decoded, key, algorithms=algorithms)

    monkeypatch.setattr(verifier_module, "verify_signature", counted)
    return calls


async def test_a_token_seen_before_is_not_checked_again_but_its_claims_are(env, signature_checks):
    token = env.a.issue("alice", audience=AUD, now=NOW)
    first = await env.verify(token, device=3)
    again = env.verifier.verify_cached(token, device=4, now=NOW + 10, client_static=None)
    assert (again.user, again.device, again.expires_at) == (first.user, 4, first.expires_at)
    assert len(signature_checks) == 1
    # The claims are this connection's business every time: device, time.
    await env.refused("auth_failed", token, device=0)
    await env.refused("token_expired", token, now=NOW + 300 + env.verifier.leeway_s + 1)
    assert len(signature_checks) == 1
    # A different token (even of the same user) is checked.
    await env.verify(env.a.issue("alice", audience=AUD, now=NOW + 1))
    assert len(signature_checks) == 2


async def test_a_remembered_token_is_refused_once_its_provider_is_suspended_or_changed(env, signature_checks):
    token = env.a.issue("alice", audience=AUD, now=NOW)
    await env.verify(token)
    assert len(signature_checks) == 1
    env.registry.suspend("a")
    await env.refused("provider_suspended", token)
    env.registry.resume("a")
    await env.verify(token)
    assert len(signature_checks) == 2  # the resumed provider is a new object: checked in full
    # A reload that changes the provider (another audience) replaces the provider object.
    old = env.registry.get("a")
    env.registry.replace(dataclasses.replace(old, audience="another-gateway"))
    await env.refused("bad_audience", token)


async def test_a_remembered_token_is_checked_again_after_its_keys_are_fetched_again(env, signature_checks):
    old_kid = env.a.default_kid()
    token = env.a.issue("alice", audience=AUD, now=NOW)
    await env.verify(token)
    assert len(signature_checks) == 1
    # A new key is published beside the old one; a token under it makes the verifier fetch the
    # key set again, which gives every key a new object, the old kid's too.
    env.a.rotate("EdDSA")
    env.clock.advance(45)
    await env.verify(env.a.issue("alice", audience=AUD, now=NOW))
    assert len(signature_checks) == 2
    assert (await env.verify(token)).user == "alice@a"
    assert len(signature_checks) == 3  # its kid is still published, under a new key object: checked again
    await env.verify(token)
    assert len(signature_checks) == 3  # and remembered again
    # The old key is withdrawn and the key set fetched again: the token is refused.
    env.a.publish(old_kid, False)
    env.a.rotate("EdDSA")
    env.clock.advance(45)
    await env.verify(env.a.issue("alice", audience=AUD, now=NOW))
    err = await env.refused("bad_signature", token)
    assert "no signing key" in err.message


async def test_key_binding_is_checked_per_connection_on_a_remembered_token(env, signature_checks):
    static = bytes(range(32))
    token = env.a.issue("alice", audience=AUD, now=NOW, extra_claims={"cnf": {"x25519": b64(static)}})
    assert (await env.verify(token, client_static=static)).key_bound
    await env.refused("key_binding", token, client_static=bytes(32))
    await env.refused("key_binding", token, client_static=None)
    assert len(signature_checks) == 1


async def test_refused_tokens_are_not_remembered_and_the_memory_is_bounded(env, signature_checks, monkeypatch):
    import interlink.core.domain.auth.verifier as verifier_module

    token = env.a.issue("alice", audience=AUD, now=NOW)
    header, payload, signature = token.split(".")
    tampered = f"{header}.{payload}.{signature[:-4]}AAAA"
    for _ in range(2):
        await env.refused("bad_signature", tampered)
    assert len(signature_checks) == 2
    monkeypatch.setattr(verifier_module, "VERIFIED_TOKENS_KEPT", 3)
    tokens = [env.a.issue(f"u{i}", audience=AUD, now=NOW) for i in range(4)]
    for t in tokens:
        await env.verify(t)
    checks = len(signature_checks)
    await env.verify(tokens[3])  # among the last three: remembered
    assert len(signature_checks) == checks
    await env.verify(tokens[0])  # the oldest was forgotten: checked again
    assert len(signature_checks) == checks + 1


async def test_a_remembered_token_keeps_only_the_checked_claims_and_fat_tokens_are_not_remembered(env, signature_checks):
    import interlink.core.domain.auth.verifier as verifier_module

    token = env.a.issue("alice", audience=AUD, now=NOW, extra_claims={"profile": "x" * 500})
    assert "profile" in (await env.verify(token)).claims  # the full path's identity has them all
    again = await env.verify(token)
    assert len(signature_checks) == 1
    assert set(again.claims) <= set(verifier_module.CHECKED_CLAIMS) and again.user == "alice@a"
    fat = env.a.issue("alice", audience=AUD, now=NOW, extra_claims={"profile": "x" * verifier_module.REMEMBERED_PAYLOAD_BYTES})
    await env.verify(fat)
    await env.verify(fat)
    assert len(signature_checks) == 3  # verified in full both times
