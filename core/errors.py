"""The one exception tree.

Every error the project raises derives from ``InterlinkError``. Errors the peer caused carry
the wire code of PROTOCOL.md §4 in ``code`` so a session can answer with an ``err`` stanza or
close with a named reason; operators count them by that code.
"""

from __future__ import annotations


class InterlinkError(Exception):
    """Root of every exception raised by Interlink."""

    code: str = "internal"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(InterlinkError):
    """An operator-supplied setting is invalid; the message names the key and the problem."""

    code = "config"


class ProtocolError(InterlinkError):
    """The peer broke the wire contract."""

    code = "bad_frame"


class FrameError(ProtocolError):
    """A frame is malformed (zero length) or the byte stream cannot be framed."""

    code = "bad_frame"


class FrameTooLargeError(FrameError):
    """A frame's announced length exceeds the receiver's maximum; raised before buffering the body."""

    code = "bad_frame"


class CryptoError(ProtocolError):
    """A Noise transport message failed authentication, or the nonce space is exhausted."""

    code = "bad_frame"


class DecryptError(CryptoError):
    """An AEAD tag did not verify."""


class NonceExhaustedError(CryptoError):
    """The 64-bit Noise nonce reached 2^64-1; the session must end."""


class HandshakeError(ProtocolError):
    """The Noise handshake failed: bad message, bad key (low-order point), bad certificate."""

    code = "bad_frame"


class CertificateError(HandshakeError):
    """The gateway's node certificate did not verify against the pinned operator root."""


class StanzaError(ProtocolError):
    """A stanza is malformed; the session answers ``err`` with ``code`` and stays up."""

    code = "bad_stanza"


class TooManyStanzasError(StanzaError):
    """A transport message holds more stanzas than a receiver serves from one message; the
    session ends (``bye protocol_error``) instead of answering each."""


class AuthError(InterlinkError):
    """A client's credentials were refused; ``code`` is one of the auth codes of PROTOCOL §4."""

    code = "auth_failed"


class SessionClosedError(InterlinkError):
    """The session ended; ``reason`` is the ``bye`` reason or a local close reason."""

    code = "closed"

    def __init__(self, message: str = "", *, reason: str = "closed") -> None:
        super().__init__(message)
        self.reason = reason


class ServerError(InterlinkError):
    """The gateway answered a request with an ``err`` stanza (client side)."""

    def __init__(self, message: str = "", *, code: str = "internal", fields: dict | None = None) -> None:
        super().__init__(message, code=code)
        self.fields = fields or {}
