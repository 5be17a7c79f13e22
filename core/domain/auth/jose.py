"""Compact JWS: strict parsing and signature checking; nothing about providers or claim rules.

A token is size-checked before any parsing, then split and decoded with a strict base64url
decoder (no padding, URL alphabet only, canonical trailing bits) and a JSON decoder that
refuses duplicate members and NaN/Infinity. ``alg`` must be an accepted asymmetric algorithm
before a key is looked up, and a key verifies only the algorithm it is bound to. Every refusal
is an ``AuthError`` whose message never echoes the token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.algorithms import get_default_algorithms

from interlink.core.domain.auth.jwk import ASYMMETRIC_ALGORITHMS, KeySet, key_problem, quote_untrusted
from interlink.core.errors import AuthError
from interlink.core.protocol.jose import b64url_decode, reject_json_constant, strict_json
from interlink.core.protocol.wire import MAX_TOKEN_BYTES

__all__ = [
    "DEFAULT_MAX_TOKEN_BYTES",
    "DecodedToken",
    "auth_error",
    "b64url_decode",
    "check_algorithm",
    "decode_token",
    "no_key_message",
    "parse_claims",
    "reject_json_constant",
    "verify_jws",
    "verify_signature",
]

DEFAULT_MAX_TOKEN_BYTES = MAX_TOKEN_BYTES

def auth_error(message: str, code: str = "auth_failed") -> AuthError:
    """The ``AuthError`` a refusal raises: ``message`` for the client, ``code`` for the wire."""
    return AuthError(message, code=code)


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = strict_json(data)
    except UnicodeDecodeError:
        raise auth_error(f"malformed token: the {what} is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise auth_error(f"malformed token: the {what} is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise auth_error(f"malformed token: the {what} is not a JSON object")
    return value


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
        raise auth_error("token must be a string")
    # Each character is at least one UTF-8 byte: long strings are refused without encoding.
    if len(token) > max_token_bytes or len(token.encode("utf-8", "surrogatepass")) > max_token_bytes:
        raise auth_error(f"token is larger than {max_token_bytes} bytes", "too_large")
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
        raise auth_error(f"malformed token: a compact JWS has 3 dot-separated parts, this one has {len(parts)}")
    try:
        header_bytes = b64url_decode(parts[0])
        payload = b64url_decode(parts[1])
        signature = b64url_decode(parts[2])
    except ValueError as exc:
        raise auth_error(f"malformed token: invalid base64url ({exc})") from None
    header = _json_object(header_bytes, "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise auth_error("malformed token: the header has no alg")
    if "kid" in header and not isinstance(header["kid"], str):
        raise auth_error("malformed token: the header's kid is not a string")
    if "crit" in header:
        raise auth_error("token uses critical header extensions (crit), which the gateway does not support")
    if header.get("b64", True) is not True:
        raise auth_error("token uses an unencoded payload (b64), which the gateway does not support")
    return DecodedToken(token, header, payload, (parts[0] + "." + parts[1]).encode("ascii"), signature)


def check_algorithm(alg: str, allowed: Sequence[str]) -> None:
    """``bad_signature`` unless ``alg`` is an accepted asymmetric algorithm in ``allowed``."""
    if alg not in ASYMMETRIC_ALGORITHMS:
        if alg.lower() == "none":
            raise auth_error("unsigned tokens (alg none) are not accepted", "bad_signature")
        if alg.upper().startswith("HS"):
            raise auth_error("HMAC-signed tokens are not accepted; providers must sign with an asymmetric key",
                             "bad_signature")
        raise auth_error(f"token algorithm {quote_untrusted(alg, 16)} is not supported", "bad_signature")
    if alg not in allowed:
        raise auth_error(f"token algorithm {alg} is not allowed for this provider (allowed: {', '.join(allowed)})",
                         "bad_signature")


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
    problem = key_problem(key, alg)
    if problem is not None:
        raise auth_error(f"signature key {quote_untrusted(key.key_id)} {problem}", "bad_signature")
    # A key without its own "alg" is bound to a placeholder of its family; pass the raw key so
    # PyJWT verifies with the header's algorithm (prepare_key re-checks the key type/curve).
    # PyJWT's algorithm objects do the verification. We call them directly instead of
    # PyJWS.decode_complete, which would split and base64-check the token a second time in
    # Python (about 50 µs per token); decode_token has already done that, more strictly.
    algorithm = key.Algorithm if key.algorithm_name == alg else _ALGORITHM_OBJECTS.get(alg)
    if algorithm is None:
        raise auth_error(f"algorithm {quote_untrusted(alg)} is not supported", "bad_signature")
    try:
        prepared = algorithm.prepare_key(key.key)
        weak = algorithm.check_key_length(prepared)
        if weak:
            raise auth_error(f"signature key {quote_untrusted(key.key_id)} is too weak: {weak}", "bad_signature")
        valid = algorithm.verify(decoded.signing_input, prepared, decoded.signature)
    except jwt.PyJWTError as exc:
        raise auth_error(f"token signature could not be verified ({exc.__class__.__name__})",
                         "bad_signature") from None
    if not valid:
        raise auth_error("token signature is invalid", "bad_signature")


def verify_jws(token: object, keys: KeySet, *, algorithms: Sequence[str],
               max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES) -> DecodedToken:
    """Signature-only verification against a key set: decode, check ``alg``, pick the key by
    ``kid``, verify. The payload need not be JSON (JWS test vectors); no claims are checked."""
    decoded = decode_token(token, max_token_bytes=max_token_bytes)
    check_algorithm(decoded.alg, algorithms)
    key = keys.get(decoded.kid)
    if key is None:
        raise auth_error(no_key_message(decoded.kid, None), "bad_signature")
    verify_signature(decoded, key, algorithms=algorithms)
    return decoded


def no_key_message(kid: str | None, provider_id: str | None) -> str:
    """What to tell a client whose token names no usable key (of ``provider_id``, or of the
    key set when None)."""
    whose = f"provider {provider_id!r}" if provider_id else "the key set"
    if kid is None:
        return f"token has no kid and {whose} does not have exactly one signing key"
    return f"no signing key with kid {quote_untrusted(kid)} is known for {whose}"


def parse_claims(decoded: DecodedToken) -> dict[str, Any]:
    """The payload as a JSON object (``auth_failed`` otherwise)."""
    return _json_object(decoded.payload, "payload")
