"""Fixed keys, certificate and time shared by the handshake and server-hello harnesses and by
``make_seeds.py``: every key is derived from a fixed label, so the seeds (signed certificates,
handshake messages) are the same on every run and stay valid for the harnesses."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from interlink.core.protocol.certs import CERT_CONTEXT, issue_node_certificate, x25519_public
from interlink.core.protocol.connection import ServerSettings


def _secret(label: str) -> bytes:
    return hashlib.sha256(b"interlink-fuzz/" + label.encode()).digest()


NOW = 1_800_000_000.0  # seconds; inside the certificate's validity
NOT_BEFORE = int(NOW) - 3600
EXPIRES = int(NOW) + 86400
NODE = "node-fuzz"

ROOT = Ed25519PrivateKey.from_private_bytes(_secret("root"))
ROOT_PUBLIC = ROOT.public_key().public_bytes_raw()
OTHER_ROOT = Ed25519PrivateKey.from_private_bytes(_secret("other-root"))  # an operator the client did not pin
SERVER_STATIC = _secret("server-static")
SERVER_PUBLIC = x25519_public(SERVER_STATIC)
CLIENT_STATIC = _secret("client-static")
CLIENT_PUBLIC = x25519_public(CLIENT_STATIC)
CLIENT_EPHEMERAL = _secret("client-ephemeral")
CERT = issue_node_certificate(ROOT, SERVER_PUBLIC, NODE, NOT_BEFORE, EXPIRES)

SETTINGS = ServerSettings(static_private=SERVER_STATIC, certificate=CERT, node=NODE, max_frame_bytes=65535, preauth_deadline_s=5.0)


def sign(cert: bytes, root: Ed25519PrivateKey = ROOT) -> bytes:
    """An operator's signature over certificate bytes (Ed25519 is deterministic)."""
    return root.sign(CERT_CONTEXT + cert)
