"""Signed push webhooks, sans-I/O: what a gateway node POSTs to a messaging provider to wake a
user's offline phone, and how the provider checks it with the operator's root public key (the
64 hex digits ``interlink keys show`` prints, which the provider already pins).

The root private key may be kept offline, so each node signs pushes with its own Ed25519 *push
signing key*, certified by the root. The HTTP body of a push is one compact JWS (RFC 7515),
ASCII, at most 16 KiB::

    BASE64URL(header) "." BASE64URL(payload) "." BASE64URL(Ed25519 signature by the push key)

    header   {"alg": "EdDSA", "typ": "interlink-push+jws", "x-interlink-cert": CERT}
    payload  a JSON object; its members are defined by the sending side

``CERT``, the push certificate, is itself a compact JWS, signed by the root key::

    header   {"alg": "EdDSA", "typ": "interlink-push-cert+jws"}
    payload  {"node": str, "push_key": base64url of the node's 32-byte Ed25519 public push key
              (no padding), "nbf": int, "exp": int}          (nbf and exp in Unix seconds)

A receiver refuses a body over 16 KiB, any ``alg`` but EdDSA (``none`` and HMAC included), a
``typ`` other than the two above, a certificate that does not verify under the pinned root key
or is outside ``nbf``..``exp`` (give or take a minute of clock skew), and a body that does not
verify under the certified push key. The signature proves which operator's node sent a push;
whether it is fresh or a replay is for the payload's members to tell. With PyJWT alone (no
Interlink install needed)::

    import json

    import jwt
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from jwt.utils import base64url_decode

    MAX_PUSH_BYTES = 16 * 1024


    def verify_interlink_push(body: bytes, root_public_hex: str) -> dict:
        \"\"\"The push's JSON payload; any exception means: refuse it (answer 401).\"\"\"
        if len(body) > MAX_PUSH_BYTES:
            raise ValueError("push body too large")
        header = jwt.get_unverified_header(body)
        if header.get("typ") != "interlink-push+jws":
            raise ValueError("not an Interlink push")
        certificate = header["x-interlink-cert"]
        if jwt.get_unverified_header(certificate).get("typ") != "interlink-push-cert+jws":
            raise ValueError("not an Interlink push certificate")
        root = Ed25519PublicKey.from_public_bytes(bytes.fromhex(root_public_hex))
        claims = jwt.decode(certificate, root, algorithms=["EdDSA"], leeway=60,
                            options={"require": ["nbf", "exp"]})
        push_key = Ed25519PublicKey.from_public_bytes(base64url_decode(claims["push_key"]))
        payload = json.loads(jwt.PyJWS().decode(body, push_key, algorithms=["EdDSA"]))
        if not isinstance(payload, dict):
            raise ValueError("push payload is not a JSON object")
        return payload

``verify_push`` makes the same checks, a little stricter (canonical base64url, no duplicate JSON
members, no ``crit``/``b64`` header), and raises ``PushSignatureError`` naming what failed. The
key files are ``interlink.core.edge.keyfiles``; a reference receiver is ``interlink.pushreceiver``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from interlink.core.errors import LocalProtocolError, PushSignatureError
from interlink.core.protocol.jose import b64url_decode, b64url_encode, strict_json

__all__ = [
    "PUSH_ALG",
    "PUSH_TYP",
    "PUSH_CERT_TYP",
    "PUSH_CERT_HEADER",
    "MAX_PUSH_BYTES",
    "MAX_PUSH_CERT_BYTES",
    "DEFAULT_LEEWAY_S",
    "PushCertificate",
    "issue_push_certificate",
    "read_push_certificate",
    "sign_push",
    "verify_push",
]

PUSH_ALG = "EdDSA"
PUSH_TYP = "interlink-push+jws"
PUSH_CERT_TYP = "interlink-push-cert+jws"
PUSH_CERT_HEADER = "x-interlink-cert"
MAX_PUSH_BYTES = 16 * 1024
MAX_PUSH_CERT_BYTES = 4096
DEFAULT_LEEWAY_S = 60.0
KEY_BYTES = 32

# Extensions of JWS this format never uses; a token naming them is not one of ours.
_REFUSED_HEADER_MEMBERS = ("crit", "b64")
_JWS = jwt.PyJWS(algorithms=[PUSH_ALG])  # one instance: PyJWS builds its algorithm table per instance


@dataclass(frozen=True)
class PushCertificate:
    """A push certificate whose root signature was checked (its validity window not yet)."""

    token: str
    """The compact JWS, as carried in the ``x-interlink-cert`` header."""
    node: str
    push_key: bytes
    """The node's raw 32-byte Ed25519 public push key."""
    not_before: int
    """Unix seconds."""
    expires: int
    """Unix seconds."""

    def valid_at(self, now: float, leeway_s: float = 0.0) -> bool:
        return self.not_before - leeway_s <= now <= self.expires + leeway_s


# ------------------------------------------------------------------- signing


def issue_push_certificate(
    root_private: Ed25519PrivateKey, push_public: bytes, node: str, not_before: int, not_after: int
) -> str:
    """The root's certificate for ``push_public`` (raw 32 bytes), valid ``not_before``..``not_after`` (Unix s)."""
    if not isinstance(root_private, Ed25519PrivateKey):
        raise TypeError("root_private must be an Ed25519PrivateKey")
    if not isinstance(push_public, (bytes, bytearray)) or len(push_public) != KEY_BYTES:
        raise ValueError(f"push_public must be {KEY_BYTES} raw Ed25519 public-key bytes")
    if not isinstance(node, str) or not node:
        raise ValueError("node must be a non-empty str")
    for name, value in (("not_before", not_before), ("not_after", not_after)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int (Unix seconds), got {type(value).__name__}")
    if not_after < not_before:
        raise ValueError(f"not_after ({not_after}) is before not_before ({not_before})")
    claims = {"node": node, "push_key": b64url_encode(bytes(push_public)), "nbf": not_before, "exp": not_after}
    token = jwt.PyJWS().encode(_canonical_json(claims), root_private, algorithm=PUSH_ALG, headers={"typ": PUSH_CERT_TYP})
    if len(token) > MAX_PUSH_CERT_BYTES:
        raise ValueError(f"push certificate of {len(token)} bytes is over {MAX_PUSH_CERT_BYTES}: node name too long")
    return token


def sign_push(push_private: Ed25519PrivateKey, certificate: str, payload: dict) -> bytes:
    """The webhook body for ``payload``: a compact JWS (ASCII) carrying ``certificate`` in its header.

    Raises ``ValueError`` when ``certificate`` certifies another key than ``push_private`` (no
    receiver could verify the push) and ``LocalProtocolError`` when the body would be over
    ``MAX_PUSH_BYTES`` (every receiver refuses it). A node signing many pushes uses one
    ``PushSigner`` instead (the checks once, not per push).
    """
    return PushSigner(push_private, certificate)(payload)


class PushSigner:
    """``sign_push`` for one push key and its certificate, checked once at construction: what a
    node calls for every webhook (``signer(payload) -> body``)."""

    def __init__(self, push_private: Ed25519PrivateKey, certificate: str) -> None:
        if not isinstance(push_private, Ed25519PrivateKey):
            raise TypeError("push_private must be an Ed25519PrivateKey")
        if not isinstance(certificate, str):
            raise TypeError(f"certificate must be a str, got {type(certificate).__name__}")
        try:
            certified_key = _certified_key_unverified(certificate)
        except PushSignatureError as exc:
            raise ValueError(f"certificate is not a push certificate: {exc}") from None
        if certified_key != push_private.public_key().public_bytes_raw():
            raise ValueError("certificate certifies another push key than push_private")
        self._key = push_private
        self._headers = {"typ": PUSH_TYP, PUSH_CERT_HEADER: certificate}
        self._jws = jwt.PyJWS(algorithms=[PUSH_ALG])  # built once: PyJWS sets up its algorithm table per instance

    def __call__(self, payload: dict) -> bytes:
        if not isinstance(payload, dict):
            raise TypeError(f"payload must be a dict (a JSON object), got {type(payload).__name__}")
        body = self._jws.encode(_canonical_json(payload), self._key, algorithm=PUSH_ALG,
                                headers=self._headers).encode("ascii")
        if len(body) > MAX_PUSH_BYTES:
            raise LocalProtocolError(f"push body of {len(body)} bytes is over {MAX_PUSH_BYTES}: receivers refuse it")
        return body


def _canonical_json(value: dict) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not serializable as JSON: {exc}") from None


def _certified_key_unverified(certificate: str) -> bytes:
    """The push key a certificate names, signature unchecked (the signer has no root key to check it)."""
    segments = _split(certificate, MAX_PUSH_CERT_BYTES, "push certificate")
    return _certificate_claims(_json_object(segments[1], "push certificate payload"))[1]


# -------------------------------------------------------------- verification


def read_push_certificate(certificate: str, root_public: bytes) -> PushCertificate:
    """Check a push certificate's form, header and root signature; its validity window is left
    to the caller (``PushCertificate.valid_at``). Raises ``PushSignatureError``."""
    if not isinstance(certificate, str):
        raise PushSignatureError(f"push certificate must be a string, got {type(certificate).__name__}")
    root_key = _ed25519_public(root_public, "root public key")
    header, payload, _ = _split(certificate, MAX_PUSH_CERT_BYTES, "push certificate")
    _check_header(_json_object(header, "push certificate header"), PUSH_CERT_TYP, "push certificate")
    signed = _verify_signature(certificate, root_key, "push certificate", f"the root key {root_key.public_bytes_raw().hex()}")
    node, push_key, not_before, expires = _certificate_claims(_json_object(signed, "push certificate payload"))
    return PushCertificate(token=certificate, node=node, push_key=push_key, not_before=not_before, expires=expires)


def verify_push(body: bytes | str, root_public: bytes, now: float, leeway_s: float = DEFAULT_LEEWAY_S) -> dict:
    """The JSON payload of a push body that verifies under ``root_public`` (raw 32 bytes) at
    ``now`` (Unix s, ``leeway_s`` of clock skew allowed); else ``PushSignatureError``."""
    if isinstance(body, str):
        if len(body) > MAX_PUSH_BYTES:  # each character is at least one byte: refuse before encoding
            raise PushSignatureError(f"push body of {len(body)} characters is over {MAX_PUSH_BYTES} bytes")
        try:
            body = body.encode("ascii")
        except UnicodeEncodeError:
            raise PushSignatureError("push body is not ASCII, so not a compact JWS") from None
    header, _, _ = _split(body, MAX_PUSH_BYTES, "push body")
    header_fields = _json_object(header, "push header")
    _check_header(header_fields, PUSH_TYP, "push")
    certificate = header_fields.get(PUSH_CERT_HEADER)
    if not isinstance(certificate, str):
        raise PushSignatureError(f"push header lacks the {PUSH_CERT_HEADER!r} certificate string")
    cert = read_push_certificate(certificate, root_public)
    if now < cert.not_before - leeway_s:
        raise PushSignatureError(
            f"push certificate of node {cert.node!r} is not valid yet (nbf {cert.not_before}, now {int(now)})"
        )
    if now > cert.expires + leeway_s:
        raise PushSignatureError(f"push certificate of node {cert.node!r} expired (exp {cert.expires}, now {int(now)})")
    signed = _verify_signature(body, Ed25519PublicKey.from_public_bytes(cert.push_key), "push",
                               f"the push key certified for node {cert.node!r}")
    return _json_object(signed, "push payload")


def _ed25519_public(key: bytes, what: str) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PublicKey):
        return key
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise PushSignatureError(f"{what} must be {KEY_BYTES} raw Ed25519 public-key bytes")
    return Ed25519PublicKey.from_public_bytes(bytes(key))


def _split(token: bytes | str, limit: int, what: str) -> tuple[bytes, bytes, bytes]:
    """The decoded header, payload and signature of a compact JWS, size-checked first and
    decoded strictly, so that one signed content has one accepted encoding. The signature's
    length is left to the signature check, after ``alg``."""
    if not isinstance(token, (bytes, bytearray, str)):
        raise PushSignatureError(f"{what} must be bytes or str, got {type(token).__name__}")
    if len(token) > limit:
        raise PushSignatureError(f"{what} of {len(token)} bytes is over {limit}")
    if isinstance(token, (bytes, bytearray)):
        try:
            token = bytes(token).decode("ascii")
        except UnicodeDecodeError:
            raise PushSignatureError(f"{what} is not ASCII, so not a compact JWS") from None
    segments = token.split(".")
    if len(segments) != 3:
        raise PushSignatureError(f"{what} is not a compact JWS (expected 3 dot-separated parts, got {len(segments)})")
    try:
        header, payload, signature = (b64url_decode(segment) for segment in segments)
    except ValueError as exc:
        raise PushSignatureError(f"{what} is not a compact JWS: {exc}") from None
    return header, payload, signature


def _check_header(header: dict[str, Any], typ: str, what: str) -> None:
    # alg first: nothing else of a token with another algorithm matters.
    alg = header.get("alg")
    if alg != PUSH_ALG:
        raise PushSignatureError(f"{what} alg {_quote(alg)} refused (only {PUSH_ALG})")
    if header.get("typ") != typ:
        raise PushSignatureError(f"{what} typ {_quote(header.get('typ'))} refused (expected {typ!r})")
    for member in _REFUSED_HEADER_MEMBERS:
        if member in header:
            raise PushSignatureError(f"{what} header member {member!r} refused (this format uses no JWS extension)")


def _verify_signature(token: bytes | str, key: Ed25519PublicKey, what: str, signer: str) -> bytes:
    try:
        return _JWS.decode_complete(token, key, algorithms=[PUSH_ALG])["payload"]
    except jwt.InvalidSignatureError:
        raise PushSignatureError(f"{what} signature does not verify under {signer}") from None
    except jwt.PyJWTError as exc:
        raise PushSignatureError(f"{what} refused: {exc}") from None


def _certificate_claims(claims: dict[str, Any]) -> tuple[str, bytes, int, int]:
    node = claims.get("node")
    if not isinstance(node, str) or not node:
        raise PushSignatureError("push certificate field 'node' must be a non-empty string")
    try:
        push_key = b64url_decode(claims.get("push_key"))
    except ValueError:
        raise PushSignatureError("push certificate field 'push_key' must be unpadded base64url") from None
    if len(push_key) != KEY_BYTES:
        raise PushSignatureError(f"push certificate field 'push_key' must be {KEY_BYTES} bytes, got {len(push_key)}")
    times = []
    for name in ("nbf", "exp"):
        value = claims.get(name)
        # bool is an int subclass in Python; JSON true/false is never a valid time here.
        if not isinstance(value, int) or isinstance(value, bool):
            raise PushSignatureError(f"push certificate field {name!r} must be an integer (Unix seconds)")
        times.append(value)
    if times[1] < times[0]:
        raise PushSignatureError(f"push certificate expires ({times[1]}) before it starts ({times[0]})")
    return node, push_key, times[0], times[1]


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = strict_json(data)
    except UnicodeDecodeError:
        raise PushSignatureError(f"{what} is not UTF-8") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, duplicates, NaN, over-long integers, nesting
        raise PushSignatureError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PushSignatureError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _quote(value: object) -> str:
    """An untrusted value for an error message: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
