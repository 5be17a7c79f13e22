"""Provider authentication (docs/protocol.md §3): is this client's token acceptable, and who is it?

Domain layer: plain Python, no I/O. Keys come from a ``KeyProvider`` (the JWKS cache of
``core/edge/jwks.py``), which ``TokenVerifier.verify`` awaits; everything else is synchronous and
takes the caller's ``now``. Every refusal is an ``AuthError`` with a wire code and a message for
the client that never echoes the token. Modules, each importing only those before it:
``jwk`` (accepted algorithms, key hygiene) ← ``jose`` (compact JWS parsing and signatures) and
``providers`` (providers, registry, localpart syntax) ← ``verifier`` (claims, ``Identity``).
"""

from interlink.core.domain.auth.jose import (
    DEFAULT_MAX_TOKEN_BYTES,
    DecodedToken,
    check_algorithm,
    decode_token,
    parse_claims,
    reject_json_constant,
    verify_jws,
    verify_signature,
)
from interlink.core.domain.auth.jwk import (
    ASYMMETRIC_ALGORITHMS,
    DEFAULT_MAX_KEYS,
    KeySet,
    RejectedKey,
    VerifyingKey,
    parse_jwks,
    public_jwk,
)
from interlink.core.domain.auth.providers import (
    PROVIDER_ID_RE,
    KeySource,
    Provider,
    ProviderRegistry,
    check_url,
    localpart_error,
    validate_localpart,
)
from interlink.core.domain.auth.verifier import (
    DEFAULT_LEEWAY_S,
    Identity,
    KeyProvider,
    TokenVerifier,
    check_claims,
    verify_with_key,
)
from interlink.core.errors import JwksError  # importers of parse_jwks catch it from here

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DEFAULT_LEEWAY_S",
    "DEFAULT_MAX_KEYS",
    "DEFAULT_MAX_TOKEN_BYTES",
    "PROVIDER_ID_RE",
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
    "reject_json_constant",
    "validate_localpart",
    "verify_jws",
    "verify_signature",
    "verify_with_key",
]
