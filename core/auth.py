"""Provider registry and token verification (domain layer: plain Python, no I/O).

PROTOCOL.md §3: a user authenticates with a compact JWT issued by its provider. This module
decides whether such a token is acceptable; the keys come from a JWKS cache (``core/jwks.py``,
the edge) that ``TokenVerifier.verify`` awaits, while everything else is synchronous.

Why PyJWT: it is maintained, small, verifies EdDSA / ES256 / RS256 / PS256 through
``cryptography``, takes an explicit algorithms allow-list on every call and parses JWKs
(``PyJWK``) into ``cryptography`` keys. We deliberately do *not* use its ``PyJWKClient``: it
fetches with blocking ``urllib`` (it would stall the event loop) and has no per-provider
rate limit or single-flight. PyJWT also reads the wall clock for ``exp``/``nbf``/``iat``; we
switch those checks off and do them here with the caller's ``now`` so tests and replays are
deterministic.

Defence in depth around the library: the token is size-checked before any parsing, then
parsed with a *strict* base64url decoder (no padding, no foreign characters, canonical
trailing bits) and a JSON decoder that refuses duplicate members and NaN/Infinity; ``alg`` is
checked against a fixed asymmetric allow-list and the provider's list before any key is
looked up; a key is only used for the algorithm it is bound to (``alg``/``use``/``key_ops``
/ key type and curve); symmetric and private JWKs are never loaded.

Error codes (``AuthError.code``, PROTOCOL §4):

=====================  ===============================================================
``too_large``          token longer than ``max_token_bytes`` (8 KiB) — refused before parsing
``auth_failed``        malformed token, missing/ill-typed claims, bad ``sub``, ``nbf``/``iat``
                       in the future, bad device number
``bad_signature``      ``alg`` not allowed (``none``, HMAC, not in the provider's list), no
                       usable key for the ``kid``, signature does not verify
``unknown_issuer``     ``iss`` is not a registered provider
``provider_suspended`` the provider is suspended
``token_expired``      ``exp`` is in the past (beyond the allowed clock skew)
``bad_audience``       ``aud`` does not contain the provider's configured audience
``key_binding``        ``cnf`` present or required, and not equal to the client's static key
=====================  ===============================================================

Messages are meant for the client (``err.msg``): they say what is wrong, never echo the
token, and quote at most short, sanitised header values (``kid``).
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import hmac
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

import jwt
from jwt.algorithms import get_default_algorithms
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from interlink.core.errors import AuthError, ConfigError, JwksError
from interlink.core.wire import MAX_DEVICE_ID, MAX_TOKEN_BYTES

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DEFAULT_MAX_TOKEN_BYTES",
    "DEFAULT_LEEWAY_S",
    "DecodedToken",
    "Identity",
    "JwksError",
    "KeyProvider",
    "KeySet",
    "KeySource",
    "Provider",
    "ProviderRegistry",
    "RejectedKey",
    "TokenVerifier",
    "VerifyingKey",
    "check_algorithm",
    "check_claims",
    "check_url",
    "decode_token",
    "localpart_error",
    "parse_claims",
    "parse_jwks",
    "public_jwk",
    "validate_localpart",
    "verify_jws",
    "verify_signature",
    "verify_with_key",
]

DEFAULT_MAX_TOKEN_BYTES = MAX_TOKEN_BYTES
DEFAULT_LEEWAY_S = 60.0
MAX_LEEWAY_S = 60.0
MAX_DEVICE = MAX_DEVICE_ID
MAX_LOCALPART_BYTES = 64
DEFAULT_MAX_KEYS = 100
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384

# The asymmetric JWS algorithms PyJWT implements (RFC 7518 names + RFC 8037 EdDSA + RFC 8812
# ES256K). "none" and HS* are never accepted; PyJWT's non-standard alias "ES521" is accepted
# only inside a JWK's "alg" (normalised to ES512), never in a token header or provider config.
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALG_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521", "ES256K": "secp256k1"}
_OKP_ALG_CURVES = {"EdDSA": frozenset({"Ed25519", "Ed448"})}
ASYMMETRIC_ALGORITHMS: frozenset[str] = frozenset(
    alg
    for alg in (_RSA_ALGS | set(_EC_ALG_CURVE) | set(_OKP_ALG_CURVES))
    if alg in get_default_algorithms()
)
_JWK_ALG_ALIASES = {"ES521": "ES512"}
_EC_CURVE_CLASSES = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
    "secp256k1": ec.SECP256K1,
}
_PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")

PROVIDER_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
_E164_RE = re.compile(r"\+[1-9][0-9]{1,14}")


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _fail(message: str, code: str = "auth_failed") -> AuthError:
    return AuthError(message, code=code)


def _quote(value: object, limit: int = 64) -> str:
    """A short, printable rendering of an attacker-controlled header value for messages."""
    if value is None:
        return "(none)"
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    if len(value) > limit or not value.isprintable() or not value.isascii():
        return "<unprintable or too long>"
    return repr(value)


def _b64url_decode(segment: str) -> bytes:
    """Strict base64url (RFC 7515 §2): no padding, URL alphabet only, canonical trailing bits."""
    if len(segment) % 4 == 1 or _B64URL_RE.fullmatch(segment) is None:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != segment:
        raise ValueError("non-canonical base64url (unused bits set)")
    return data


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _no_duplicate_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate member {_quote(key)}")
        result[key] = value
    return result


def reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicate_members,
            parse_constant=reject_json_constant,
        )
    except UnicodeDecodeError:
        raise _fail(f"malformed token: the {what} is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise _fail(f"malformed token: the {what} is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise _fail(f"malformed token: the {what} is not a JSON object")
    return value


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
        raise _fail(f"{name} claim must be a number of seconds since the epoch")
    return float(value)


def check_url(value: object, name: str) -> str:
    """https URL, or http only to a loopback host (local demos and tests)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty URL string")
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ConfigError(f"{name} {value!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ConfigError(f"{name} {value!r} must be an absolute https:// URL")
    if parts.query or parts.fragment:
        raise ConfigError(f"{name} {value!r} must not have a query or fragment")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ConfigError(f"{name} {value!r} must use https (plain http is allowed only for loopback hosts)")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Localparts
# --------------------------------------------------------------------------------------------


# Unicode category Cc is exactly these 65 code points; a regex finds them without a Python-level
# loop over the characters (this check runs on every routed stanza's address).
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")


def localpart_error(value: object) -> str | None:
    """Why ``value`` is not a valid localpart (PROTOCOL §3), or None if it is valid.

    Valid: a str of 1–64 bytes in UTF-8 without ``@``, ``/`` or control characters
    (Unicode category Cc).
    """
    if not isinstance(value, str):
        return "must be a string"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode (lone surrogate)"
    if size == 0:
        return "is empty"
    if size > MAX_LOCALPART_BYTES:
        return f"is {size} bytes long in UTF-8 (at most {MAX_LOCALPART_BYTES})"
    if "@" in value:
        return "contains '@'"
    if "/" in value:
        return "contains '/'"
    if _CONTROL_CHARACTER.search(value):
        return "contains a control character"
    return None


def validate_localpart(value: object) -> str:
    """Return ``value`` if it is a valid localpart, else raise ``AuthError`` (``auth_failed``)."""
    problem = localpart_error(value)
    if problem is not None:
        raise _fail(f"invalid sub claim: the user id {problem}")
    assert isinstance(value, str)
    return value


# --------------------------------------------------------------------------------------------
# JWK parsing and hygiene
# --------------------------------------------------------------------------------------------


class VerifyingKey(jwt.PyJWK):
    """A ``jwt.PyJWK`` holding a *public* key, plus the JWK members that restrict its use.

    ``jwk_alg`` is the key's own ``alg`` (None when the JWK did not pin one: the key may then
    verify any algorithm of its family); ``use`` and ``key_ops`` as published.
    """

    def __init__(self, jwk_data: Mapping[str, Any], algorithm: str) -> None:
        super().__init__(dict(jwk_data), algorithm)
        alg = jwk_data.get("alg")
        self.jwk_alg: str | None = _JWK_ALG_ALIASES.get(alg, alg) if isinstance(alg, str) else None
        self.use: str | None = jwk_data.get("use")
        ops = jwk_data.get("key_ops")
        self.key_ops: tuple[str, ...] | None = tuple(ops) if isinstance(ops, list) else None

    def __repr__(self) -> str:
        return f"VerifyingKey(kty={self.key_type!r}, kid={self.key_id!r}, alg={self.jwk_alg or self.algorithm_name!r})"


class RejectedKey(NamedTuple):
    """A JWK dropped by ``parse_jwks``: its position in the set, its kid and why."""

    index: int
    kid: str | None
    reason: str


@dataclass(frozen=True)
class KeySet:
    """The usable verification keys of one JWK Set, indexed by ``kid``."""

    keys: tuple[VerifyingKey, ...] = ()
    rejected: tuple[RejectedKey, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_kid", {k.key_id: k for k in self.keys if k.key_id is not None})

    def get(self, kid: str | None) -> VerifyingKey | None:
        """The key with this ``kid``; with ``kid=None`` the only key, if there is exactly one."""
        if kid is None:
            return self.keys[0] if len(self.keys) == 1 else None
        return self._by_kid.get(kid)  # type: ignore[attr-defined]

    @property
    def kids(self) -> tuple[str | None, ...]:
        return tuple(k.key_id for k in self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._by_kid  # type: ignore[attr-defined]


_ROCA_PRIMES = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79,
                83, 89, 97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167)


def _subgroup_65537(p: int) -> frozenset[int]:
    seen: set[int] = set()
    x = 1
    while x not in seen:
        seen.add(x)
        x = x * 65537 % p
    return frozenset(seen)


_ROCA_SUBGROUPS = tuple((p, _subgroup_65537(p)) for p in _ROCA_PRIMES)


def _roca_vulnerable(n: int) -> bool:
    """ROCA (CVE-2017-15361) fingerprint: n mod each small prime lies in <65537>."""
    return all(n % p in group for p, group in _ROCA_SUBGROUPS)


def _family_problem(alg: str, kty: str, crv: object) -> str | None:
    if alg in _RSA_ALGS:
        return None if kty == "RSA" else f"alg {alg} needs an RSA key, not kty {kty}"
    if alg in _EC_ALG_CURVE:
        if kty != "EC":
            return f"alg {alg} needs an EC key, not kty {kty}"
        if crv != _EC_ALG_CURVE[alg]:
            return f"alg {alg} needs curve {_EC_ALG_CURVE[alg]}, not {crv}"
        return None
    if alg in _OKP_ALG_CURVES:
        if kty != "OKP":
            return f"alg {alg} needs an OKP key, not kty {kty}"
        if crv not in _OKP_ALG_CURVES[alg]:
            return f"alg {alg} needs curve Ed25519 or Ed448, not {crv}"
        return None
    return f"alg {alg} is not an accepted signature algorithm"


def _default_alg(kty: str, crv: object) -> str | None:
    if kty == "RSA":
        return "RS256"  # placeholder binding; a key without "alg" verifies any RS*/PS* allowed
    if kty == "EC":
        for alg, curve in _EC_ALG_CURVE.items():
            if curve == crv and alg in ASYMMETRIC_ALGORITHMS:
                return alg
        return None
    if kty == "OKP" and crv in ("Ed25519", "Ed448"):
        return "EdDSA"
    return None


def _check_jwk(jwk: object) -> tuple[VerifyingKey | None, str | None]:
    """Build a VerifyingKey from one JWK, or return the reason it is unusable."""
    if not isinstance(jwk, dict):
        return None, "not a JSON object"
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None, "kid is not a string"
    kty = jwk.get("kty")
    if kty == "oct":
        return None, "symmetric (kty oct) keys are never accepted"
    if kty not in ("RSA", "EC", "OKP"):
        return None, f"unsupported kty {_quote(kty)}"
    private = [m for m in _PRIVATE_JWK_MEMBERS if m in jwk]
    if private:
        return None, f"contains private key material ({', '.join(private)}); a JWKS must hold public keys only"
    use = jwk.get("use")
    if use is not None and use != "sig":
        return None, f"use is {_quote(use)}, not 'sig'"
    ops = jwk.get("key_ops")
    if ops is not None:
        if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops) or len(set(ops)) != len(ops):
            return None, "key_ops is not a list of distinct strings"
        if "verify" not in ops:
            return None, "key_ops does not include 'verify'"
    crv = jwk.get("crv")
    alg = jwk.get("alg")
    if alg is not None:
        if not isinstance(alg, str):
            return None, "alg is not a string"
        alg = _JWK_ALG_ALIASES.get(alg, alg)
        if alg not in ASYMMETRIC_ALGORITHMS:
            return None, f"alg {_quote(alg)} is not an accepted signature algorithm"
        problem = _family_problem(alg, kty, crv)
        if problem is not None:
            return None, problem
        binding = alg
    else:
        binding = _default_alg(kty, crv)
        if binding is None:
            return None, f"unsupported curve {_quote(crv)} for kty {kty}"
    try:
        key = VerifyingKey(jwk, binding)
    except (jwt.PyJWTError, ValueError, TypeError, binascii.Error) as exc:
        return None, f"cannot be loaded ({exc.__class__.__name__})"
    public = key.key
    if kty == "RSA":
        if not isinstance(public, rsa.RSAPublicKey):
            return None, "not an RSA public key"
        numbers = public.public_numbers()
        if not MIN_RSA_BITS <= public.key_size <= MAX_RSA_BITS:
            return None, f"RSA modulus of {public.key_size} bits (need {MIN_RSA_BITS}..{MAX_RSA_BITS})"
        if numbers.e < 3 or numbers.e % 2 == 0:
            return None, "RSA public exponent is not an odd number >= 3"
        if _roca_vulnerable(numbers.n):
            return None, "RSA key has the ROCA weakness (CVE-2017-15361)"
    elif kty == "EC":
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, _EC_CURVE_CLASSES[crv]):
            return None, "EC key does not match its curve"
    elif not isinstance(public, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return None, "not an Edwards-curve public key"
    return key, None


def public_jwk(jwk: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``jwk`` without its private members (for building inline JWKS from key pairs)."""
    return {k: v for k, v in jwk.items() if k not in _PRIVATE_JWK_MEMBERS}


def parse_jwks(document: object, *, max_keys: int = DEFAULT_MAX_KEYS) -> KeySet:
    """Parse a JWK Set (``{"keys": [...]}``) into a ``KeySet`` of usable verification keys.

    Keys are parsed one by one with ``jwt.PyJWK`` (rather than ``jwt.PyJWKSet``, which skips
    bad members silently and cannot say why) and dropped, with a reason in ``rejected``, when:
    not an object, symmetric or unsupported ``kty``, private members present, ``use`` other
    than ``sig``, ``key_ops`` without ``verify``, ``alg`` not an accepted asymmetric algorithm
    or inconsistent with the key type/curve, unloadable (bad point, bad encoding), RSA under
    2048 bits / bad exponent / ROCA. Keys sharing a ``kid`` are all dropped (ambiguous).

    Raises ``JwksError`` if the document is not a JWK Set or holds more than ``max_keys`` keys.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError('not a JWK Set: expected a JSON object with a "keys" array')
    entries = document["keys"]
    if len(entries) > max_keys:
        raise JwksError(f"JWK Set has {len(entries)} keys, more than the limit of {max_keys}")
    usable: list[tuple[int, VerifyingKey]] = []
    rejected: list[RejectedKey] = []
    for index, entry in enumerate(entries):
        key, reason = _check_jwk(entry)
        kid = entry.get("kid") if isinstance(entry, dict) and isinstance(entry.get("kid"), str) else None
        if key is None:
            rejected.append(RejectedKey(index, kid, reason or "unusable"))
        else:
            usable.append((index, key))
    counts: dict[str, int] = {}
    for _, key in usable:
        if key.key_id is not None:
            counts[key.key_id] = counts.get(key.key_id, 0) + 1
    keys: list[VerifyingKey] = []
    for index, key in usable:
        if key.key_id is not None and counts[key.key_id] > 1:
            rejected.append(RejectedKey(index, key.key_id, "kid is shared by several keys of the set (ambiguous)"))
        else:
            keys.append(key)
    rejected.sort(key=lambda r: r.index)
    return KeySet(tuple(keys), tuple(rejected))


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------


class KeySource(NamedTuple):
    """Where a provider's keys come from: ``kind`` is "discovery", "jwks_uri" or "inline";
    ``url`` is the discovery document or JWKS URL (None for inline keys)."""

    kind: str
    url: str | None


@dataclass(frozen=True)
class Provider:
    """One messaging provider whose users may connect (PROTOCOL §3).

    Exactly one key source: ``discovery=True`` (``{issuer}/.well-known/openid-configuration``
    → ``jwks_uri``), ``jwks_uri``, or an inline ``jwks`` document.
    """

    id: str
    """Short provider id used in user addresses (``localpart@id``)."""
    issuer: str
    """The ``iss`` value of this provider's tokens (https URL; http only on loopback)."""
    audience: str
    """The ``aud`` value this gateway expects in this provider's tokens."""
    algorithms: tuple[str, ...] = ("EdDSA", "ES256")
    """Allowed JWS algorithms (asymmetric only)."""
    discovery: bool = False
    """Find the JWKS through OpenID Connect discovery."""
    jwks_uri: str | None = None
    """Fetch the JWKS from this URL."""
    jwks: dict | None = field(default=None, hash=False)
    """Inline JWK Set (public keys)."""
    require_key_binding: bool = False
    """Tokens must carry ``cnf.x25519`` equal to the client's Noise static key."""
    default_accept: tuple[str, ...] = ()
    """Default consent of this provider's users: provider ids, or ("*",); () = own provider only."""
    suspended: bool = False
    """Tokens of a suspended provider are refused with ``provider_suspended``."""

    def __post_init__(self) -> None:
        where = f"provider {self.id!r}" if isinstance(self.id, str) else "provider"
        if not isinstance(self.id, str) or PROVIDER_ID_RE.fullmatch(self.id) is None:
            raise ConfigError(f"{where}: id must match [a-z0-9][a-z0-9._-]{{0,62}}")
        check_url(self.issuer, f"{where}: issuer")
        if not isinstance(self.audience, str) or not self.audience:
            raise ConfigError(f"{where}: audience must be a non-empty string")
        algorithms = self.algorithms
        if isinstance(algorithms, str) or not isinstance(algorithms, Iterable):
            raise ConfigError(f"{where}: algorithms must be a list of JWS algorithm names")
        algorithms = tuple(algorithms)
        if not algorithms:
            raise ConfigError(f"{where}: algorithms must not be empty")
        for alg in algorithms:
            if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
                hint = "; 'none' and HMAC (HS*) are never allowed" if (
                    isinstance(alg, str) and (alg.lower() == "none" or alg.upper().startswith("HS"))) else ""
                raise ConfigError(
                    f"{where}: algorithms: {alg!r} is not an accepted asymmetric JWS algorithm "
                    f"(accepted: {', '.join(sorted(ASYMMETRIC_ALGORITHMS))}){hint}"
                )
        if len(set(algorithms)) != len(algorithms):
            raise ConfigError(f"{where}: algorithms lists an algorithm twice")
        object.__setattr__(self, "algorithms", algorithms)
        for name in ("discovery", "require_key_binding", "suspended"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{where}: {name} must be true or false")
        chosen = [name for name, on in (("discovery", self.discovery), ("jwks_uri", self.jwks_uri is not None),
                                        ("jwks", self.jwks is not None)) if on]
        if len(chosen) != 1:
            raise ConfigError(
                f"{where}: set exactly one key source (discovery=true, jwks_uri or jwks); "
                + (f"got {' and '.join(chosen)}" if chosen else "none is set")
            )
        if self.jwks_uri is not None:
            check_url(self.jwks_uri, f"{where}: jwks_uri")
        if self.jwks is not None:
            try:
                keyset = parse_jwks(self.jwks)
            except JwksError as exc:
                raise ConfigError(f"{where}: jwks: {exc}") from None
            if not keyset.keys:
                reasons = "; ".join(f"key {r.index}: {r.reason}" for r in keyset.rejected) or "the set is empty"
                raise ConfigError(f"{where}: jwks has no usable verification key ({reasons})")
            object.__setattr__(self, "jwks", copy.deepcopy(self.jwks))  # later edits cannot change it
        accept = self.default_accept
        if isinstance(accept, str) or not isinstance(accept, Iterable):
            raise ConfigError(f"{where}: default_accept must be a list of provider ids or [\"*\"]")
        accept = tuple(accept)
        if "*" in accept:
            if accept != ("*",):
                raise ConfigError(f"{where}: default_accept: \"*\" must be the only entry")
        else:
            for other in accept:
                if not isinstance(other, str) or PROVIDER_ID_RE.fullmatch(other) is None:
                    raise ConfigError(f"{where}: default_accept: {other!r} is not a provider id")
        object.__setattr__(self, "default_accept", accept)

    def key_source(self) -> KeySource:
        """Where this provider's keys come from."""
        if self.discovery:
            return KeySource("discovery", self.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if self.jwks_uri is not None:
            return KeySource("jwks_uri", self.jwks_uri)
        return KeySource("inline", None)

    def inline_keys(self) -> KeySet | None:
        """The parsed inline JWKS (None for fetched key sources)."""
        return None if self.jwks is None else parse_jwks(self.jwks)


class ProviderRegistry:
    """The operator's providers, by id and by issuer. Providers are immutable; ``suspend``,
    ``resume`` and ``replace`` swap in a new ``Provider`` value."""

    def __init__(self, providers: Iterable[Provider] = ()) -> None:
        self._by_id: dict[str, Provider] = {}
        self._by_issuer: dict[str, Provider] = {}
        for provider in providers:
            self.add(provider)

    def _check(self, provider: Provider, *, replacing: str | None) -> None:
        if not isinstance(provider, Provider):
            raise ConfigError(f"expected a Provider, got {type(provider).__name__}")
        holder = self._by_issuer.get(provider.issuer)
        if holder is not None and holder.id != replacing:
            raise ConfigError(f"provider {provider.id!r}: issuer {provider.issuer!r} is already used by provider {holder.id!r}")

    def add(self, provider: Provider) -> Provider:
        """Register a new provider; ConfigError on a duplicate id or issuer."""
        self._check(provider, replacing=None)
        if provider.id in self._by_id:
            raise ConfigError(f"provider {provider.id!r} is already registered")
        self._by_id[provider.id] = provider
        self._by_issuer[provider.issuer] = provider
        return provider

    def replace(self, provider: Provider) -> Provider:
        """Replace the registered provider with the same id (e.g. new key source or audience)."""
        old = self._by_id.get(provider.id) if isinstance(provider, Provider) else None
        if old is None:
            raise ConfigError(f"provider {getattr(provider, 'id', provider)!r} is not registered")
        self._check(provider, replacing=provider.id)
        del self._by_issuer[old.issuer]
        self._by_id[provider.id] = provider
        self._by_issuer[provider.issuer] = provider
        return provider


    def remove(self, provider_id: str) -> Provider:
        old = self._by_id.pop(provider_id, None)
        if old is None:
            raise ConfigError(f"provider {provider_id!r} is not registered")
        del self._by_issuer[old.issuer]
        return old

    def get(self, provider_id: str) -> Provider | None:
        return self._by_id.get(provider_id)

    def by_issuer(self, issuer: str) -> Provider | None:
        return self._by_issuer.get(issuer)

    def _set_suspended(self, provider_id: str, suspended: bool) -> Provider:
        old = self._by_id.get(provider_id)
        if old is None:
            raise ConfigError(f"provider {provider_id!r} is not registered")
        return self.replace(dataclasses.replace(old, suspended=suspended))

    def suspend(self, provider_id: str) -> Provider:
        return self._set_suspended(provider_id, True)

    def resume(self, provider_id: str) -> Provider:
        return self._set_suspended(provider_id, False)

    def list(self) -> list[Provider]:
        return list(self._by_id.values())

    def __contains__(self, provider_id: object) -> bool:
        return provider_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self):
        return iter(list(self._by_id.values()))


# --------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Token decoding and verification (synchronous core)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedToken:
    """A compact JWS split and decoded, not yet verified."""

    raw: str
    header: dict[str, Any]
    payload: bytes
    signing_input: bytes
    signature: bytes

    @property
    def alg(self) -> str:
        return self.header["alg"]

    @property
    def kid(self) -> str | None:
        return self.header.get("kid")


def _check_token_size(token: object, max_token_bytes: int) -> str:
    if not isinstance(token, str):
        raise _fail("token must be a string")
    # Each character is at least one UTF-8 byte: long strings are refused without encoding.
    if len(token) > max_token_bytes or len(token.encode("utf-8", "surrogatepass")) > max_token_bytes:
        raise _fail(f"token is larger than {max_token_bytes} bytes", "too_large")
    return token


def decode_token(token: object, *, max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES) -> DecodedToken:
    """Size check, then strict compact-JWS parsing (no signature check, no claim parsing).

    ``too_large`` before anything else; ``auth_failed`` for a malformed compact form, bad
    base64url (padding, foreign characters, non-canonical bits), a header that is not a JSON
    object with a string ``alg``, a non-string ``kid``, or a ``crit`` header.
    """
    token = _check_token_size(token, max_token_bytes)
    parts = token.split(".")
    if len(parts) != 3:
        raise _fail(f"malformed token: a compact JWS has 3 dot-separated parts, this one has {len(parts)}")
    try:
        header_bytes = _b64url_decode(parts[0])
        payload = _b64url_decode(parts[1])
        signature = _b64url_decode(parts[2])
    except ValueError as exc:
        raise _fail(f"malformed token: invalid base64url ({exc})") from None
    header = _json_object(header_bytes, "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise _fail("malformed token: the header has no alg")
    if "kid" in header and not isinstance(header["kid"], str):
        raise _fail("malformed token: the header's kid is not a string")
    if "crit" in header:
        raise _fail("token uses critical header extensions (crit), which the gateway does not support")
    if header.get("b64", True) is not True:
        raise _fail("token uses an unencoded payload (b64), which the gateway does not support")
    return DecodedToken(token, header, payload, (parts[0] + "." + parts[1]).encode("ascii"), signature)


def check_algorithm(alg: str, allowed: Sequence[str]) -> None:
    """``bad_signature`` unless ``alg`` is an accepted asymmetric algorithm in ``allowed``."""
    if alg not in ASYMMETRIC_ALGORITHMS:
        if alg.lower() == "none":
            raise _fail("unsigned tokens (alg none) are not accepted", "bad_signature")
        if alg.upper().startswith("HS"):
            raise _fail("HMAC-signed tokens are not accepted; providers must sign with an asymmetric key",
                        "bad_signature")
        raise _fail(f"token algorithm {_quote(alg, 16)} is not supported", "bad_signature")
    if alg not in allowed:
        raise _fail(f"token algorithm {alg} is not allowed for this provider (allowed: {', '.join(allowed)})",
                    "bad_signature")


def _key_problem(key: jwt.PyJWK, alg: str) -> str | None:
    if isinstance(key, VerifyingKey):
        jwk_alg, use, ops = key.jwk_alg, key.use, key.key_ops
    else:  # a plain PyJWK: its bound algorithm is treated as pinned
        jwk_alg, use, ops = key.algorithm_name, key.public_key_use, None
    if use is not None and use != "sig":
        return "is not a signature key"
    if ops is not None and "verify" not in ops:
        return "is not allowed to verify"
    if jwk_alg is not None and jwk_alg != alg:
        return f"is bound to {jwk_alg}, not {alg}"
    public = key.key
    if alg in _RSA_ALGS:
        ok = isinstance(public, rsa.RSAPublicKey)
    elif alg in _EC_ALG_CURVE:
        ok = isinstance(public, ec.EllipticCurvePublicKey) and isinstance(
            public.curve, _EC_CURVE_CLASSES[_EC_ALG_CURVE[alg]])
    else:
        ok = isinstance(public, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
    return None if ok else f"is the wrong key type for {alg}"


# PyJWT's algorithm objects for the asymmetric algorithms (never none or HMAC).
_ALGORITHM_OBJECTS = {name: algorithm for name, algorithm in get_default_algorithms().items()
                      if name in ASYMMETRIC_ALGORITHMS}


def verify_signature(decoded: DecodedToken, key: jwt.PyJWK, *, algorithms: Sequence[str]) -> None:
    """Check the JWS signature of ``decoded`` under ``key`` with PyJWT (``bad_signature``).

    The header ``alg`` must be allowed (``check_algorithm``) and the key usable for it: its
    ``use`` (if present) is ``sig``, its ``key_ops`` (if present) include ``verify``, its
    ``alg`` (if present) equals the header alg, and its type/curve fit the algorithm.
    """
    alg = decoded.alg
    check_algorithm(alg, algorithms)
    problem = _key_problem(key, alg)
    if problem is not None:
        raise _fail(f"signature key {_quote(key.key_id)} {problem}", "bad_signature")
    # A key without its own "alg" is bound to a placeholder of its family; pass the raw key so
    # PyJWT verifies with the header's algorithm (prepare_key re-checks the key type/curve).
    # PyJWT's algorithm objects do the verification. We call them directly instead of
    # PyJWS.decode_complete, which would split and base64-check the token a second time in
    # Python (about 50 µs per token); decode_token has already done that, more strictly.
    algorithm = key.Algorithm if key.algorithm_name == alg else _ALGORITHM_OBJECTS.get(alg)
    if algorithm is None:
        raise _fail(f"algorithm {_quote(alg)} is not supported", "bad_signature")
    try:
        prepared = algorithm.prepare_key(key.key)
        weak = algorithm.check_key_length(prepared)
        if weak:
            raise _fail(f"signature key {_quote(key.key_id)} is too weak: {weak}", "bad_signature")
        valid = algorithm.verify(decoded.signing_input, prepared, decoded.signature)
    except jwt.PyJWTError as exc:
        raise _fail(f"token signature could not be verified ({exc.__class__.__name__})", "bad_signature") from None
    if not valid:
        raise _fail("token signature is invalid", "bad_signature")


def verify_jws(token: object, keys: KeySet, *, algorithms: Sequence[str],
               max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES) -> DecodedToken:
    """Signature-only verification against a key set: decode, check ``alg``, pick the key by
    ``kid``, verify. The payload need not be JSON (JWS test vectors); no claims are checked."""
    decoded = decode_token(token, max_token_bytes=max_token_bytes)
    check_algorithm(decoded.alg, algorithms)
    key = keys.get(decoded.kid)
    if key is None:
        raise _fail(_no_key_message(decoded.kid, None), "bad_signature")
    verify_signature(decoded, key, algorithms=algorithms)
    return decoded


def _no_key_message(kid: str | None, provider_id: str | None) -> str:
    whose = f"provider {provider_id!r}" if provider_id else "the key set"
    if kid is None:
        return f"token has no kid and {whose} does not have exactly one signing key"
    return f"no signing key with kid {_quote(kid)} is known for {whose}"


def parse_claims(decoded: DecodedToken) -> dict[str, Any]:
    """The payload as a JSON object (``auth_failed`` otherwise)."""
    return _json_object(decoded.payload, "payload")


def _check_device(device: object) -> int:
    if isinstance(device, bool) or not isinstance(device, int) or not 1 <= device <= MAX_DEVICE:
        raise _fail(f"device must be an integer from 1 to {MAX_DEVICE}")
    return device


def _parse_x25519(value: object) -> bytes:
    if not isinstance(value, str):
        raise _fail("cnf.x25519 must be a base64url string", "key_binding")
    try:
        raw = _b64url_decode(value)
    except ValueError:
        raise _fail("cnf.x25519 is not unpadded base64url", "key_binding") from None
    if len(raw) != 32:
        raise _fail(f"cnf.x25519 must encode 32 bytes, not {len(raw)}", "key_binding")
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
            raise _fail(f"token has no {name} claim")
    if claims["iss"] != provider.issuer:
        raise _fail("token issuer does not match the provider", "unknown_issuer")
    exp = _numeric_date(claims, "exp")
    not_before = {name: _numeric_date(claims, name) for name in ("nbf", "iat")}
    if exp <= now - leeway_s:
        raise _fail(f"token expired {int(now - exp)} s ago (allowed clock skew {int(leeway_s)} s)", "token_expired")
    for name, value in not_before.items():
        if value is not None and value > now + leeway_s:
            raise _fail(f"token not yet valid: {name} is {int(value - now)} s in the future "
                        f"(allowed clock skew {int(leeway_s)} s)")
    aud = claims["aud"]
    if isinstance(aud, str):
        audiences: Sequence[str] = (aud,)
    elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        audiences = aud
    else:
        raise _fail("aud claim must be a string or a non-empty list of strings")
    if provider.audience not in audiences:
        raise _fail("token audience does not include this gateway", "bad_audience")
    sub = validate_localpart(claims["sub"])
    key_bound = False
    if "cnf" in claims or provider.require_key_binding:
        cnf = claims.get("cnf")
        if cnf is None:
            raise _fail(f"provider {provider.id!r} requires key-bound tokens (cnf.x25519) and this token has none",
                        "key_binding")
        if not isinstance(cnf, dict) or set(cnf) != {"x25519"}:
            raise _fail("cnf claim must be an object with exactly one member, x25519", "key_binding")
        bound = _parse_x25519(cnf["x25519"])
        if client_static is None:
            raise _fail("token is bound to a client key, but the connection has no client static key", "key_binding")
        if not hmac.compare_digest(bound, bytes(client_static)):
            raise _fail("token is bound to a different client key than this connection's Noise static key",
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
        raise _fail("token has no iss claim")
    if not isinstance(iss, str):
        raise _fail("iss claim must be a string")
    provider = registry.by_issuer(iss)
    if provider is None:
        raise _fail("token issuer is not a registered provider", "unknown_issuer")
    _check_not_suspended(provider)
    return provider


def _check_not_suspended(provider: Provider) -> None:
    if provider.suspended:
        raise _fail(f"provider {provider.id!r} is suspended", "provider_suspended")


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
        raise _fail("token has no iss claim")
    if iss != provider.issuer:
        raise _fail("token issuer does not match the provider", "unknown_issuer")
    _check_not_suspended(provider)
    check_algorithm(decoded.alg, provider.algorithms)
    return _verify_key_and_claims(decoded, claims, provider, key, device=device, now=now,
                                  client_static=client_static, leeway_s=leeway_s)


def _verify_key_and_claims(decoded, claims, provider: Provider, key, *, device: int, now: float,
                           client_static: bytes | None, leeway_s: float) -> Identity:
    """The last steps of every verification path: a key exists, the signature holds, the claims pass."""
    if key is None:
        raise _fail(_no_key_message(decoded.kid, provider.id), "bad_signature")
    verify_signature(decoded, key, algorithms=provider.algorithms)
    return check_claims(claims, provider, device=device, now=now, client_static=client_static, leeway_s=leeway_s)


class KeyProvider(Protocol):
    """What ``TokenVerifier`` needs from a key cache (``JwksCache`` implements it)."""

    def cached_key(self, provider: Provider, kid: str | None) -> jwt.PyJWK | None: ...

    def keys_unavailable(self, provider: Provider) -> bool: ...

    async def get_key(self, provider: Provider, kid: str | None) -> jwt.PyJWK | None: ...


class TokenVerifier:
    """Verifies client tokens against the provider registry and a JWKS cache.

    ``verify`` order: type/size (``too_large`` before any parsing) → device → strict parse →
    alg policy → ``iss`` (``unknown_issuer``, ``provider_suspended``) → provider's algorithms
    → key by ``kid`` (awaits the cache; may trigger one rate-limited refresh) → signature →
    claims with the caller's ``now``.
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

    async def verify(self, token: str, *, device: int, now: float, client_static: bytes | None) -> Identity:
        """Verify ``token`` for a client connecting as ``device``; raise ``AuthError`` with the
        PROTOCOL §4 code on refusal."""
        decoded, claims, provider = self._parse(token, device)
        key = await self.keys.get_key(provider, decoded.kid)
        if key is None and self.keys.keys_unavailable(provider):
            raise AuthError(
                f"the keys of provider {provider.id!r} could not be fetched from its issuer; try again later",
                code="internal",
            )
        return self._check(decoded, claims, provider, key, device=device, now=now, client_static=client_static)

    def verify_cached(self, token: str, *, device: int, now: float, client_static: bytes | None) -> Identity | None:
        """``verify`` without waiting: the verdict when the signing key is already cached (the
        usual case), None when a key fetch is needed — then call ``verify``. Saves the gateway
        a task and a loop turn per handshake."""
        decoded, claims, provider = self._parse(token, device)
        key = self.keys.cached_key(provider, decoded.kid)
        if key is None:
            return None
        return self._check(decoded, claims, provider, key, device=device, now=now, client_static=client_static)

    def _parse(self, token: str, device: int):
        decoded = decode_token(token, max_token_bytes=self.max_token_bytes)
        _check_device(device)
        _precheck(decoded)
        claims = parse_claims(decoded)
        provider = _provider_for(claims, self.registry)
        check_algorithm(decoded.alg, provider.algorithms)
        return decoded, claims, provider

    def _check(self, decoded, claims, provider: Provider, key, *, device: int, now: float,
               client_static: bytes | None) -> Identity:
        return _verify_key_and_claims(decoded, claims, provider, key, device=device, now=now,
                                      client_static=client_static, leeway_s=self.leeway_s)

    def verify_with_key(self, token: str, provider: Provider, key: jwt.PyJWK | None, *, device: int, now: float,
                        client_static: bytes | None = None) -> Identity:
        """Synchronous verification with an already-known key (see module ``verify_with_key``)."""
        return verify_with_key(token, provider, key, device=device, now=now, client_static=client_static,
                               leeway_s=self.leeway_s, max_token_bytes=self.max_token_bytes)
