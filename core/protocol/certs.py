"""Node certificates and the server hello (docs/protocol.md §2), sans-I/O.

An operator owns one Ed25519 *root key*; clients pin its public key. Each gateway node has an
X25519 *static key* (its Noise ``s``) and a *node certificate*: the msgpack map
``{"v": 1, "key": bin32, "node": str, "nbf": int s, "exp": int s}`` signed by the root over
``b"interlink-node-cert-v1" + cert``. The gateway sends it in the server hello (XX/IK message 2);
the client checks it with ``verify_server_hello``. Every malformed or untrusted input raises
``CertificateError``. Key files on disk are ``interlink.core.edge.keyfiles``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from interlink.core.errors import CertificateError

__all__ = [
    "CERT_CONTEXT",
    "CERT_VERSION",
    "NodeCertificate",
    "generate_root_key",
    "generate_static_key",
    "x25519_public",
    "ed25519_public_bytes",
    "root_public_hex",
    "root_fingerprint",
    "issue_node_certificate",
    "server_hello",
    "parse_server_hello",
    "verify_server_hello",
]

CERT_CONTEXT = b"interlink-node-cert-v1"
CERT_VERSION = 1
KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_HELLO_BYTES = 65535


# ---------------------------------------------------------------------- keys


def generate_root_key() -> Ed25519PrivateKey:
    """A new operator root key (Ed25519)."""
    return Ed25519PrivateKey.generate()


def generate_static_key() -> bytes:
    """A new X25519 private key for a node's Noise static key, as 32 raw bytes."""
    return X25519PrivateKey.generate().private_bytes_raw()


def x25519_public(private: bytes) -> bytes:
    """The 32-byte X25519 public key of a 32-byte private key."""
    if not isinstance(private, (bytes, bytearray)) or len(private) != KEY_BYTES:
        raise ValueError(f"X25519 private key must be {KEY_BYTES} bytes")
    return X25519PrivateKey.from_private_bytes(bytes(private)).public_key().public_bytes_raw()


def ed25519_public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> bytes:
    """Raw 32-byte Ed25519 public key of a private key, a public key, or raw bytes (checked)."""
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key().public_bytes_raw()
    if isinstance(key, Ed25519PublicKey):
        return key.public_bytes_raw()
    if isinstance(key, (bytes, bytearray)) and len(key) == KEY_BYTES:
        return bytes(key)
    raise ValueError("expected an Ed25519 key object or 32 raw public-key bytes")


def root_public_hex(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> str:
    """The root public key as 64 lowercase hex characters: what a client pins."""
    return ed25519_public_bytes(key).hex()


def root_fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> str:
    """A short human-comparable fingerprint of the root public key: ``"SHA256:"`` + first 16 bytes hex, grouped."""
    digest = hashlib.sha256(ed25519_public_bytes(key)).hexdigest()[:32]
    return "SHA256:" + ":".join(digest[i : i + 4] for i in range(0, 32, 4))


# --------------------------------------------------------------- certificate


@dataclass(frozen=True)
class NodeCertificate:
    """A node certificate: the signed msgpack bytes, the signature, and the decoded fields."""

    cert: bytes
    """msgpack of ``{"v", "key", "node", "nbf", "exp"}``: exactly the bytes that were signed."""
    sig: bytes
    """Ed25519 signature by the root over ``CERT_CONTEXT + cert``."""
    version: int
    key: bytes
    """The node's static X25519 public key."""
    node: str
    not_before: int
    """Unix seconds."""
    expires: int
    """Unix seconds."""

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now <= self.expires

    def verify_signature(self, root_public: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(root_public).verify(self.sig, CERT_CONTEXT + self.cert)
        except InvalidSignature:
            return False
        return True

    def to_bytes(self) -> bytes:
        """File form: msgpack ``{"cert": bin, "sig": bin}``."""
        return msgpack.packb({"cert": self.cert, "sig": self.sig}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "NodeCertificate":
        """Parse the file form (no signature check); raises ``CertificateError`` if malformed."""
        outer = _unpack_map(data, "certificate file")
        cert = _field(outer, "cert", bytes, "certificate file")
        sig = _field(outer, "sig", bytes, "certificate file")
        return cls.decode(cert, sig)

    @classmethod
    def decode(cls, cert: bytes, sig: bytes) -> "NodeCertificate":
        """Decode ``cert`` into fields (no signature check); raises ``CertificateError`` if malformed."""
        if len(sig) != SIGNATURE_BYTES:
            raise CertificateError(f"certificate signature must be {SIGNATURE_BYTES} bytes, got {len(sig)}")
        fields = _unpack_map(cert, "node certificate")
        version = _field(fields, "v", int, "node certificate")
        if version != CERT_VERSION:
            raise CertificateError(f"unsupported node certificate version {version} (expected {CERT_VERSION})")
        key = _field(fields, "key", bytes, "node certificate")
        node = _field(fields, "node", str, "node certificate")
        nbf = _field(fields, "nbf", int, "node certificate")
        exp = _field(fields, "exp", int, "node certificate")
        if len(key) != KEY_BYTES:
            raise CertificateError(f"node certificate 'key' must be {KEY_BYTES} bytes, got {len(key)}")
        return cls(cert=bytes(cert), sig=bytes(sig), version=version, key=key, node=node, not_before=nbf, expires=exp)


def _unpack_map(data: object, what: str) -> dict:
    if not isinstance(data, (bytes, bytearray)):
        raise CertificateError(f"{what} must be bytes, got {type(data).__name__}")
    if len(data) > MAX_HELLO_BYTES:
        raise CertificateError(f"{what} of {len(data)} bytes is too large")
    try:
        value = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ValueError covers ExtraData, FormatError, StackError and invalid UTF-8 in str.
        raise CertificateError(f"{what} is not valid msgpack: {exc}") from None
    if not isinstance(value, dict):
        raise CertificateError(f"{what} must be a msgpack map, got {type(value).__name__}")
    return value


def _field(fields: dict, name: str, kind: type, what: str):
    if name not in fields:
        raise CertificateError(f"{what} lacks field {name!r}")
    value = fields[name]
    # bool is an int subclass in Python; msgpack true/false is never a valid int field here.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = {bytes: "bin", str: "str", int: "int"}[kind]
        raise CertificateError(f"{what} field {name!r} must be {expected}, got {type(value).__name__}")
    return value


def issue_node_certificate(
    root: Ed25519PrivateKey, static_public: bytes, node: str, not_before: int, expires: int
) -> NodeCertificate:
    """Sign a node certificate for ``static_public`` valid from ``not_before`` to ``expires`` (Unix seconds)."""
    if not isinstance(root, Ed25519PrivateKey):
        raise TypeError("root must be an Ed25519PrivateKey")
    if not isinstance(static_public, (bytes, bytearray)) or len(static_public) != KEY_BYTES:
        raise ValueError(f"static_public must be {KEY_BYTES} bytes")
    if not isinstance(node, str) or not node:
        raise ValueError("node must be a non-empty str")
    for name, value in (("not_before", not_before), ("expires", expires)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int (Unix seconds), got {type(value).__name__}")
    if expires < not_before:
        raise ValueError(f"expires ({expires}) is before not_before ({not_before})")
    cert = msgpack.packb(
        {"v": CERT_VERSION, "key": bytes(static_public), "node": node, "nbf": not_before, "exp": expires},
        use_bin_type=True,
    )
    sig = root.sign(CERT_CONTEXT + cert)
    return NodeCertificate(
        cert=cert, sig=sig, version=CERT_VERSION, key=bytes(static_public), node=node,
        not_before=not_before, expires=expires,
    )


# -------------------------------------------------------------- server hello


def server_hello(certificate: NodeCertificate, node: str, now_ms: int) -> bytes:
    """The gateway's handshake payload: msgpack ``{"cert", "sig", "node", "time"}`` (time in ms)."""
    if not isinstance(now_ms, int) or isinstance(now_ms, bool):
        raise TypeError("now_ms must be an int (Unix milliseconds)")
    return msgpack.packb(
        {"cert": certificate.cert, "sig": certificate.sig, "node": node, "time": now_ms}, use_bin_type=True
    )


def parse_server_hello(payload: bytes) -> tuple[NodeCertificate, str, int]:
    """Parse a server hello without verifying it: (certificate, hello node, time ms). Raises ``CertificateError``."""
    hello = _unpack_map(payload, "server hello")
    cert = _field(hello, "cert", bytes, "server hello")
    sig = _field(hello, "sig", bytes, "server hello")
    node = _field(hello, "node", str, "server hello")
    time_ms = _field(hello, "time", int, "server hello")
    return NodeCertificate.decode(cert, sig), node, time_ms


def verify_server_hello(payload: bytes, *, root_public: bytes, remote_static: bytes, now: float) -> NodeCertificate:
    """Check a server hello against the pinned root key and the Noise remote static key.

    Raises ``CertificateError`` unless the payload is well formed, the signature verifies under
    ``root_public``, ``v == 1``, ``key == remote_static`` and ``nbf <= now <= exp`` (``now`` in
    Unix seconds). The hello's own ``node`` and ``time`` are unsigned and only type-checked; the
    authenticated node name is the returned certificate's ``node``.
    """
    root_public = ed25519_public_bytes(root_public)
    hello = _unpack_map(payload, "server hello")
    cert_bytes = _field(hello, "cert", bytes, "server hello")
    sig = _field(hello, "sig", bytes, "server hello")
    _field(hello, "node", str, "server hello")
    _field(hello, "time", int, "server hello")
    if len(sig) != SIGNATURE_BYTES:
        raise CertificateError(f"certificate signature must be {SIGNATURE_BYTES} bytes, got {len(sig)}")
    try:
        Ed25519PublicKey.from_public_bytes(root_public).verify(sig, CERT_CONTEXT + cert_bytes)
    except InvalidSignature:
        raise CertificateError(
            f"node certificate signature does not verify under the pinned root key {root_public.hex()}"
        ) from None
    certificate = NodeCertificate.decode(cert_bytes, sig)  # checks v == 1 and the field types
    if certificate.key != bytes(remote_static):
        raise CertificateError("node certificate key does not match the Noise remote static key")
    if now < certificate.not_before:
        raise CertificateError(
            f"node certificate for {certificate.node!r} is not valid yet (nbf {certificate.not_before}, now {int(now)})"
        )
    if now > certificate.expires:
        raise CertificateError(
            f"node certificate for {certificate.node!r} expired (exp {certificate.expires}, now {int(now)})"
        )
    return certificate
