"""Token verification: from a compact JWT to the ``Identity`` of a connection.

``TokenVerifier`` picks the provider by ``iss``, its key through a ``KeyProvider`` (the JWKS
cache; the only await), checks the signature (``jose``) and then the claims with the caller's
``now``: ``exp``/``nbf``/``iat`` within the allowed clock skew, ``aud``, ``sub`` as a
localpart, and ``cnf`` bound to the client's Noise static key. ``verify_with_key`` is the same
check, synchronous, for a provider and key already in hand.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt

from interlink.core.domain.auth.jose import (
    DEFAULT_MAX_TOKEN_BYTES,
    DecodedToken,
    auth_error,
    b64url_decode,
    check_algorithm,
    decode_token,
    no_key_message,
    parse_claims,
    verify_signature,
)
from interlink.core.domain.auth.jwk import ASYMMETRIC_ALGORITHMS
from interlink.core.domain.auth.providers import Provider, ProviderRegistry, validate_localpart
from interlink.core.errors import AuthError, ConfigError
from interlink.core.protocol.wire import MAX_DEVICE_ID

__all__ = [
    "DEFAULT_LEEWAY_S",
    "Identity",
    "KeyProvider",
    "TokenVerifier",
    "check_claims",
    "verify_with_key",
]

DEFAULT_LEEWAY_S = 60.0
MAX_LEEWAY_S = 60.0
MAX_DEVICE = MAX_DEVICE_ID

_E164_RE = re.compile(r"\+[1-9][0-9]{1,14}")


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


_MAX_NUMERIC_DATE = 2.0**53  # far beyond any real date; keeps float arithmetic exact and safe


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """The claim as seconds since the epoch (None if absent); ``auth_failed`` if not a sane number."""
    if name not in claims:
        return None
    value = claims[name]
    if not _is_number(value) or not -_MAX_NUMERIC_DATE <= value <= _MAX_NUMERIC_DATE:
        raise auth_error(f"{name} claim must be a number of seconds since the epoch")
    return float(value)


@dataclass(frozen=True, slots=True)
class Identity:
    """The authenticated user of a connection."""

    provider: str
    """Provider id."""
    localpart: str
    """The token's ``sub``."""
    device: int
    """Device number chosen by the client, 1..2^31-1."""
    expires_at: float
    """The token's ``exp`` (seconds since the epoch)."""
    phone_number: str | None = None
    """E.164 phone number, only when ``phone_number_verified`` is true."""
    key_bound: bool = False
    """The token's ``cnf.x25519`` matched the client's Noise static key."""
    claims: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    """All verified claims."""
    user: str = field(init=False)
    """The user address ``localpart@provider``: built once, read on every routed stanza (and the
    same string object keys the gateway's session table)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "user", f"{self.localpart}@{self.provider}")


def _check_device(device: object) -> int:
    if isinstance(device, bool) or not isinstance(device, int) or not 1 <= device <= MAX_DEVICE:
        raise auth_error(f"device must be an integer from 1 to {MAX_DEVICE}")
    return device


def _parse_x25519(value: object) -> bytes:
    if not isinstance(value, str):
        raise auth_error("cnf.x25519 must be a base64url string", "key_binding")
    try:
        raw = b64url_decode(value)
    except ValueError:
        raise auth_error("cnf.x25519 is not unpadded base64url", "key_binding") from None
    if len(raw) != 32:
        raise auth_error(f"cnf.x25519 must encode 32 bytes, not {len(raw)}", "key_binding")
    return raw


def check_claims(claims: Mapping[str, Any], provider: Provider, *, device: int, now: float,
                 client_static: bytes | None, leeway_s: float = DEFAULT_LEEWAY_S) -> Identity:
    """Check the claims of a token whose signature already verified, and build the Identity.

    Codes: missing ``exp``/``aud``/``sub``/``iss`` or wrong types → ``auth_failed``; ``iss``
    not the provider's → ``unknown_issuer``; expired → ``token_expired``; ``nbf``/``iat`` in
    the future → ``auth_failed``; ``aud`` without the provider's audience → ``bad_audience``;
    bad ``sub`` → ``auth_failed``; ``cnf`` mismatch → ``key_binding``.
    """
    device = _check_device(device)
    for name in ("iss", "sub", "aud", "exp"):
        if name not in claims:
            raise auth_error(f"token has no {name} claim")
    if claims["iss"] != provider.issuer:
        raise auth_error("token issuer does not match the provider", "unknown_issuer")
    exp = _numeric_date(claims, "exp")
    not_before = {name: _numeric_date(claims, name) for name in ("nbf", "iat")}
    if exp <= now - leeway_s:
        raise auth_error(f"token expired {int(now - exp)} s ago (allowed clock skew {int(leeway_s)} s)",
                         "token_expired")
    for name, value in not_before.items():
        if value is not None and value > now + leeway_s:
            raise auth_error(f"token not yet valid: {name} is {int(value - now)} s in the future "
                             f"(allowed clock skew {int(leeway_s)} s)")
    aud = claims["aud"]
    if isinstance(aud, str):
        audiences: Sequence[str] = (aud,)
    elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        audiences = aud
    else:
        raise auth_error("aud claim must be a string or a non-empty list of strings")
    if provider.audience not in audiences:
        raise auth_error("token audience does not include this gateway", "bad_audience")
    sub = validate_localpart(claims["sub"])
    key_bound = False
    if "cnf" in claims or provider.require_key_binding:
        cnf = claims.get("cnf")
        if cnf is None:
            raise auth_error(f"provider {provider.id!r} requires key-bound tokens (cnf.x25519) and this token has none",
                             "key_binding")
        if not isinstance(cnf, dict) or set(cnf) != {"x25519"}:
            raise auth_error("cnf claim must be an object with exactly one member, x25519", "key_binding")
        bound = _parse_x25519(cnf["x25519"])
        if client_static is None:
            raise auth_error("token is bound to a client key, but the connection has no client static key",
                             "key_binding")
        if not hmac.compare_digest(bound, bytes(client_static)):
            raise auth_error("token is bound to a different client key than this connection's Noise static key",
                             "key_binding")
        key_bound = True
    phone = None
    if claims.get("phone_number_verified") is True:
        candidate = claims.get("phone_number")
        if isinstance(candidate, str) and _E164_RE.fullmatch(candidate):
            phone = candidate
    return Identity(provider=provider.id, localpart=sub, device=device, expires_at=exp,
                    phone_number=phone, key_bound=key_bound, claims=dict(claims))


def _provider_for(claims: Mapping[str, Any], registry: ProviderRegistry) -> Provider:
    iss = claims.get("iss")
    if iss is None:
        raise auth_error("token has no iss claim")
    if not isinstance(iss, str):
        raise auth_error("iss claim must be a string")
    provider = registry.by_issuer(iss)
    if provider is None:
        raise auth_error("token issuer is not a registered provider", "unknown_issuer")
    _check_not_suspended(provider)
    return provider


def _check_not_suspended(provider: Provider) -> None:
    if provider.suspended:
        raise auth_error(f"provider {provider.id!r} is suspended", "provider_suspended")


def _precheck(decoded: DecodedToken) -> None:
    """Algorithm policy that does not depend on the provider: never none/HMAC/unknown."""
    check_algorithm(decoded.alg, ASYMMETRIC_ALGORITHMS)


def verify_with_key(token: object, provider: Provider, key: jwt.PyJWK | None, *, device: int, now: float,
                    client_static: bytes | None = None, leeway_s: float = DEFAULT_LEEWAY_S,
                    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES) -> Identity:
    """The whole synchronous verification of ``token`` for a known provider and key.

    Same checks and codes as ``TokenVerifier.verify`` (minus the registry and key look-up):
    benchmarks use it to measure pure verification.
    """
    _check_device(device)
    decoded = decode_token(token, max_token_bytes=max_token_bytes)
    _precheck(decoded)
    claims = parse_claims(decoded)
    iss = claims.get("iss")
    if iss is None:
        raise auth_error("token has no iss claim")
    if iss != provider.issuer:
        raise auth_error("token issuer does not match the provider", "unknown_issuer")
    _check_not_suspended(provider)
    check_algorithm(decoded.alg, provider.algorithms)
    return _verify_key_and_claims(decoded, claims, provider, key, device=device, now=now,
                                  client_static=client_static, leeway_s=leeway_s)


def _verify_key_and_claims(decoded, claims, provider: Provider, key, *, device: int, now: float,
                           client_static: bytes | None, leeway_s: float) -> Identity:
    """The last steps of every verification path: a key exists, the signature holds, the claims pass."""
    if key is None:
        raise auth_error(no_key_message(decoded.kid, provider.id), "bad_signature")
    verify_signature(decoded, key, algorithms=provider.algorithms)
    return check_claims(claims, provider, device=device, now=now, client_static=client_static, leeway_s=leeway_s)


class KeyProvider(Protocol):
    """What ``TokenVerifier`` needs from a key cache (``JwksCache`` implements it)."""

    def cached_key(self, provider: Provider, kid: str | None) -> jwt.PyJWK | None: ...

    def keys_unavailable(self, provider: Provider) -> bool: ...

    async def get_key(self, provider: Provider, kid: str | None) -> jwt.PyJWK | None: ...


VERIFIED_TOKENS_KEPT = 4096  # signature checks remembered, for devices that reconnect with the same token
REMEMBERED_PAYLOAD_BYTES = 2048  # a token with a larger payload is verified in full every time
# The claims check_claims reads: all a remembered token keeps (a provider's token may carry
# kilobytes of others, and 4,096 of them must stay a few megabytes).
CHECKED_CLAIMS = ("iss", "sub", "aud", "exp", "nbf", "iat", "cnf", "phone_number", "phone_number_verified")


class _Verified:
    """A token whose signature held: under which provider object, kid and key object, and its claims."""

    __slots__ = ("provider", "kid", "key", "claims")

    def __init__(self, provider: Provider, kid: str | None, key, claims: dict) -> None:
        self.provider = provider
        self.kid = kid
        self.key = key
        self.claims = claims


def _token_digest(token: object, max_token_bytes: int) -> bytes | None:
    """What a checked signature is remembered under: the SHA-256 of the exact token (None for
    anything the full path must refuse anyway)."""
    if type(token) is not str or len(token) > max_token_bytes:
        return None
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenVerifier:
    """Verifies client tokens against the provider registry and a JWKS cache.

    ``verify`` order: type/size (``too_large`` before any parsing) → device → strict parse →
    alg policy → ``iss`` (``unknown_issuer``, ``provider_suspended``) → provider's algorithms
    → key by ``kid`` (awaits the cache; may trigger one rate-limited refresh) → signature →
    claims with the caller's ``now``.

    A device that reconnects presents the same token again (its provider refreshes it every few
    minutes or hours): the verifier remembers the last ``VERIFIED_TOKENS_KEPT`` tokens whose
    signature held, with the provider object and key object it held under, and skips the parse
    and the signature for them while both are still the ones in use — a reload or a suspension
    replaces the provider object, a key fetch the key objects. The claims are always checked
    again, against this connection: device, time, audience, key binding. Only successes are
    remembered, and only the ``CHECKED_CLAIMS`` of payloads up to ``REMEMBERED_PAYLOAD_BYTES``
    (an identity from a remembered token carries just those claims); every refusal takes the
    full path.
    """

    def __init__(self, registry: ProviderRegistry, keys: KeyProvider, *, max_token_bytes: int, leeway_s: float) -> None:
        if isinstance(max_token_bytes, bool) or not isinstance(max_token_bytes, int) or not (
                1 <= max_token_bytes <= DEFAULT_MAX_TOKEN_BYTES):
            raise ConfigError(f"max_token_bytes must be an integer from 1 to {DEFAULT_MAX_TOKEN_BYTES}")
        if not _is_number(leeway_s) or not 0 <= leeway_s <= MAX_LEEWAY_S:
            raise ConfigError(f"leeway_s (allowed clock skew) must be between 0 and {int(MAX_LEEWAY_S)} seconds")
        self.registry = registry
        self.keys = keys
        self.max_token_bytes = max_token_bytes
        self.leeway_s = float(leeway_s)
        self._verified: dict[bytes, _Verified] = {}  # token digest -> its checked signature; oldest first

    async def verify(self, token: str, *, device: int, now: float, client_static: bytes | None) -> Identity:
        """Verify ``token`` for a client connecting as ``device``; raise ``AuthError`` with the
        docs/protocol.md §5 code on refusal."""
        digest = _token_digest(token, self.max_token_bytes)
        remembered = self._remembered(digest, device=device, now=now, client_static=client_static)
        if remembered is not None:
            return remembered
        decoded, claims, provider = self._parse(token, device)
        key = await self.keys.get_key(provider, decoded.kid)
        if key is None and self.keys.keys_unavailable(provider):
            raise AuthError(
                f"the keys of provider {provider.id!r} could not be fetched from its issuer; try again later",
                code="internal",
            )
        return self._check(decoded, claims, provider, key, digest=digest, device=device, now=now,
                           client_static=client_static)

    def verify_cached(self, token: str, *, device: int, now: float, client_static: bytes | None) -> Identity | None:
        """``verify`` without waiting: the verdict when the signing key is already cached (the
        usual case), None when a key fetch is needed — then call ``verify``. Saves the gateway
        a task and a loop turn per handshake."""
        digest = _token_digest(token, self.max_token_bytes)
        remembered = self._remembered(digest, device=device, now=now, client_static=client_static)
        if remembered is not None:
            return remembered
        decoded, claims, provider = self._parse(token, device)
        key = self.keys.cached_key(provider, decoded.kid)
        if key is None:
            return None
        return self._check(decoded, claims, provider, key, digest=digest, device=device, now=now,
                           client_static=client_static)

    def _parse(self, token: str, device: int):
        decoded = decode_token(token, max_token_bytes=self.max_token_bytes)
        _check_device(device)
        _precheck(decoded)
        claims = parse_claims(decoded)
        provider = _provider_for(claims, self.registry)
        check_algorithm(decoded.alg, provider.algorithms)
        return decoded, claims, provider

    def _check(self, decoded, claims, provider: Provider, key, *, digest: bytes | None, device: int, now: float,
               client_static: bytes | None) -> Identity:
        identity = _verify_key_and_claims(decoded, claims, provider, key, device=device, now=now,
                                          client_static=client_static, leeway_s=self.leeway_s)
        if digest is not None and len(decoded.payload) <= REMEMBERED_PAYLOAD_BYTES:
            verified = self._verified
            if len(verified) >= VERIFIED_TOKENS_KEPT:
                del verified[next(iter(verified))]
            checked = {name: claims[name] for name in CHECKED_CLAIMS if name in claims}
            verified[digest] = _Verified(provider, decoded.kid, key, checked)
        return identity

    def _remembered(self, digest: bytes | None, *, device: int, now: float, client_static: bytes | None) -> Identity | None:
        """The verdict for a token whose signature held before, if what it held under is still
        in use: the same provider object for its issuer, the same key object for its kid (both
        looked up as the full path would). None: take the full path."""
        entry = self._verified.get(digest) if digest is not None else None
        if entry is None:
            return None
        provider = entry.provider
        if (self.registry.by_issuer(provider.issuer) is not provider
                or self.keys.cached_key(provider, entry.kid) is not entry.key):
            del self._verified[digest]
            return None
        return check_claims(entry.claims, provider, device=device, now=now, client_static=client_static,
                            leeway_s=self.leeway_s)

    def verify_with_key(self, token: str, provider: Provider, key: jwt.PyJWK | None, *, device: int, now: float,
                        client_static: bytes | None = None) -> Identity:
        """Synchronous verification with an already-known key (see module ``verify_with_key``)."""
        return verify_with_key(token, provider, key, device=device, now=now, client_static=client_static,
                               leeway_s=self.leeway_s, max_token_bytes=self.max_token_bytes)
