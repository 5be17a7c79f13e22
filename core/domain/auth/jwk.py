"""Verification keys: which JWS algorithms are accepted, and which JWKs may verify them.

``parse_jwks`` turns a JWK Set into a ``KeySet`` of public ``VerifyingKey``s, dropping with a
reason every key that is symmetric, private, weak (RSA under 2048 bits, bad exponent, ROCA),
not for signing, or inconsistent with its ``alg``; ``key_problem`` applies the same binding
when a key meets a token. Plain data over PyJWT and ``cryptography``: no I/O, no providers.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jwt
from jwt.algorithms import get_default_algorithms
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from interlink.core.errors import JwksError

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DEFAULT_MAX_KEYS",
    "KeySet",
    "RejectedKey",
    "VerifyingKey",
    "key_problem",
    "parse_jwks",
    "public_jwk",
    "quote_untrusted",
]

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


def quote_untrusted(value: object, limit: int = 64) -> str:
    """A short, printable rendering of an attacker-controlled header value for messages."""
    if value is None:
        return "(none)"
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    if len(value) > limit or not value.isprintable() or not value.isascii():
        return "<unprintable or too long>"
    return repr(value)


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
        return None, f"unsupported kty {quote_untrusted(kty)}"
    private = [m for m in _PRIVATE_JWK_MEMBERS if m in jwk]
    if private:
        return None, f"contains private key material ({', '.join(private)}); a JWKS must hold public keys only"
    use = jwk.get("use")
    if use is not None and use != "sig":
        return None, f"use is {quote_untrusted(use)}, not 'sig'"
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
            return None, f"alg {quote_untrusted(alg)} is not an accepted signature algorithm"
        problem = _family_problem(alg, kty, crv)
        if problem is not None:
            return None, problem
        binding = alg
    else:
        binding = _default_alg(kty, crv)
        if binding is None:
            return None, f"unsupported curve {quote_untrusted(crv)} for kty {kty}"
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


def key_problem(key: jwt.PyJWK, alg: str) -> str | None:
    """Why ``key`` may not verify a token signed with ``alg`` (a phrase to follow the key's
    name in a message), or None if it may: its ``use``, ``key_ops``, bound ``alg``, type and
    curve must all fit."""
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
