"""The exception tree every Interlink error belongs to (re-exported from ``interlink.core.errors``)."""

from interlink.core.errors import (
    AuthError,
    CertificateError,
    ConfigError,
    CryptoError,
    DecryptError,
    FrameError,
    FrameTooLargeError,
    HandshakeError,
    InterlinkError,
    NonceExhaustedError,
    ProtocolError,
    ServerError,
    SessionClosedError,
    StanzaError,
)

__all__ = [
    "AuthError",
    "CertificateError",
    "ConfigError",
    "CryptoError",
    "DecryptError",
    "FrameError",
    "FrameTooLargeError",
    "HandshakeError",
    "InterlinkError",
    "NonceExhaustedError",
    "ProtocolError",
    "ServerError",
    "SessionClosedError",
    "StanzaError",
]
