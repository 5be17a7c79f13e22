"""Every exception Interlink raises, the wire's error codes, and every way a connection ends.

Errors the peer caused carry the wire code of docs/protocol.md §5 in ``code``, so a session can
answer with an ``err`` stanza or close with a named reason; operators count them by that code.
``interlink.errors`` re-exports the public ones. The tree::

    InterlinkError                   code "internal" unless a subclass says otherwise
    ├── ConfigError                  an operator setting is invalid; the message names the key
    ├── LocalProtocolError           we were about to break the wire contract (a bug of ours)
    ├── ProtocolError                the peer broke the wire contract
    │   ├── FrameError               a frame is malformed (bad_frame)
    │   │   └── FrameTooLargeError   its announced length is over the maximum
    │   ├── CryptoError              a transport message failed authentication (bad_frame)
    │   │   ├── DecryptError         an AEAD tag did not verify
    │   │   └── NonceExhaustedError  the 64-bit nonce is used up
    │   ├── ProxyHeaderError         a PROXY protocol v2 header is malformed (bad_frame)
    │   ├── HandshakeError           the Noise handshake failed (bad_frame)
    │   │   ├── PreambleError        the 4-byte preamble is malformed
    │   │   ├── UnknownSuiteError    the preamble names a suite this side does not speak
    │   │   ├── CertificateError     the gateway's node certificate did not verify
    │   │   └── IKUnansweredError    client side: no answer to IK message 1 (XX may still work)
    │   └── StanzaError              a stanza is malformed (bad_stanza; the session goes on)
    │       └── TooManyStanzasError  more stanzas in one transport message than are served
    ├── RouteError                   a stanza refused by the rules (its ``code`` and ``fields``)
    ├── AuthError                    a token refused (one of the auth codes)
    ├── JwksError                    a provider's JWK Set is unusable
    ├── KeyFetchError                a provider's keys could not be fetched (logged, kept internal)
    ├── PushSignatureError           a push webhook or its certificate did not verify (provider side)
    ├── StoreFullError               the LMDB map is full (overloaded; nothing written)
    ├── StoreLimitError              a per-user bound of the store was reached (too_large)
    ├── MoveError                    a cluster data move cannot be made as asked (nothing written)
    ├── MalformedRecordError         another cluster node relayed a record no node sends
    ├── NatsProtocolError            a NATS server broke the client protocol or refused this node
    ├── SessionClosedError           client side: the session ended (``reason``)
    │   └── RedirectedError          the user's home is another node of the cluster (``bye redirect``)
    ├── UpgradeRefusedError          client side: the gateway refused the WebSocket upgrade (HTTP status)
    ├── ServerError                  client side: the gateway answered ``err``
    └── E2EEError                    end-to-end encryption (``interlink.e2ee``)
        ├── IdentityChanged          a pinned peer device presented another identity key
        └── StateLocked              the state file is in use by another client

``ErrorCode`` lists the wire codes; ``CloseReason`` every way a connection ends: the ``bye``
reasons of the contract and the closes without a ``bye`` that operators see in ``/connz``,
logs and ``/metrics``. Both are ``StrEnum``s: a member is its string on the wire and in JSON.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``err`` stanza (docs/protocol.md §5)."""

    BAD_FRAME = "bad_frame"
    BAD_STANZA = "bad_stanza"
    TOO_LARGE = "too_large"
    AUTH_FAILED = "auth_failed"
    TOKEN_EXPIRED = "token_expired"
    UNKNOWN_ISSUER = "unknown_issuer"
    BAD_SIGNATURE = "bad_signature"
    BAD_AUDIENCE = "bad_audience"
    KEY_BINDING = "key_binding"
    PROVIDER_SUSPENDED = "provider_suspended"
    DEVICE_LIMIT = "device_limit"
    NOT_OPTED_IN = "not_opted_in"
    UNKNOWN_RECIPIENT = "unknown_recipient"
    DEVICE_MISMATCH = "device_mismatch"
    NOT_MEMBER = "not_member"
    NOT_ADMIN = "not_admin"
    NOT_FOUND = "not_found"
    PUSH_UNAVAILABLE = "push_unavailable"
    BAD_HASH = "bad_hash"
    RATE_LIMITED = "rate_limited"
    MAILBOX_FULL = "mailbox_full"
    OVERLOADED = "overloaded"
    INTERNAL = "internal"


class CloseReason(enum.StrEnum):
    """Why a connection ended: a ``bye`` reason, or a close without one."""

    # bye reasons (docs/protocol.md §5): the gateway says bye, then closes
    DRAIN = "drain"
    REPLACED = "replaced"
    SUSPENDED = "suspended"
    AUTH_EXPIRED = "auth_expired"
    IDLE = "idle"
    SLOW_CONSUMER = "slow_consumer"
    PROTOCOL_ERROR = "protocol_error"
    REDIRECT = "redirect"  # a cluster node that is not the user's home, before welcome (docs/protocol.md §5)
    # closes without a bye
    BAD_PREAMBLE = "bad_preamble"
    UNKNOWN_SUITE = "unknown_suite"
    HANDSHAKE_FAILED = "handshake_failed"
    BAD_FRAME = "bad_frame"
    AUTH_DEADLINE = "auth_deadline"
    AUTH_FAILED = "auth_failed"
    PEER_CLOSED = "peer_closed"
    OVER_CAPACITY = "over_capacity"
    SOURCE_LIMIT = "source_limit"
    BAD_PROXY_HEADER = "bad_proxy_header"  # a trusted proxy's PROXY v2 header was malformed or unusable
    BAD_UPGRADE = "bad_upgrade"  # a WebSocket upgrade was refused (path, Origin, not a WebSocket request)
    INTERNAL_ERROR = "internal_error"
    CLIENT_CLOSED = "client_closed"  # client side: the application closed the session

    @property
    def is_bye(self) -> bool:
        """A reason the gateway sends in ``bye``."""
        return self in BYE_REASONS


BYE_REASONS = frozenset({
    CloseReason.DRAIN, CloseReason.REPLACED, CloseReason.SUSPENDED, CloseReason.AUTH_EXPIRED, CloseReason.IDLE,
    CloseReason.SLOW_CONSUMER, CloseReason.PROTOCOL_ERROR, CloseReason.REDIRECT,
})


class InterlinkError(Exception):
    """Root of every exception raised by Interlink."""

    code: str = ErrorCode.INTERNAL

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


class LocalProtocolError(InterlinkError):
    """This side was about to break the wire contract (e.g. a stanza too large for a frame): a
    bug of the caller, never the peer's doing."""


class ProtocolError(InterlinkError):
    """The peer broke the wire contract."""

    code = ErrorCode.BAD_FRAME


class FrameError(ProtocolError):
    """A frame is malformed (zero length) or the byte stream cannot be framed."""


class FrameTooLargeError(FrameError):
    """A frame's announced length exceeds the receiver's maximum; raised before buffering the body."""


class CryptoError(ProtocolError):
    """A Noise transport message failed authentication, or the nonce space is exhausted."""


class DecryptError(CryptoError):
    """An AEAD tag did not verify."""


class NonceExhaustedError(CryptoError):
    """The 64-bit Noise nonce reached 2^64-1; the session must end."""


class ProxyHeaderError(ProtocolError):
    """The PROXY protocol v2 header a proxy writes before a connection's first byte is malformed
    (not the v2 signature, a v1 text header, an unknown version, command or family, a length
    over the maximum or under the address block, a TLV that does not fit): raised by
    ``interlink.core.protocol.proxyheader.parse_proxy_header`` before any client byte is read."""


class HandshakeError(ProtocolError):
    """The Noise handshake failed: bad message, bad key (low-order point), bad certificate."""


class PreambleError(HandshakeError):
    """The 4-byte preamble is malformed (wrong length, magic or protocol version)."""


class UnknownSuiteError(HandshakeError):
    """The preamble names a suite byte this side does not speak."""

    def __init__(self, message: str = "", *, suite: int | None = None) -> None:
        super().__init__(message)
        self.suite = suite


class CertificateError(HandshakeError):
    """The gateway's node certificate did not verify against the pinned operator root."""


class IKUnansweredError(HandshakeError):
    """Client side: the gateway closed without answering IK message 1; XX may still work."""


class StanzaError(ProtocolError):
    """A stanza is malformed; the session answers ``err`` with ``code`` and stays up.
    ``stanzas``, where set, holds the whole stanzas decoded before the broken part."""

    code = ErrorCode.BAD_STANZA


class TooManyStanzasError(StanzaError):
    """A transport message holds more stanzas than a receiver serves from one message; the
    session ends (``bye protocol_error``) instead of answering each."""


class RouteError(InterlinkError):
    """A refused stanza: answered with ``err`` ``code`` (and ``fields``); the session continues."""

    def __init__(self, message: str, *, code: str, **fields) -> None:
        super().__init__(message, code=code)
        self.fields = fields


class AuthError(InterlinkError):
    """A client's credentials were refused; ``code`` is one of the auth codes."""

    code = ErrorCode.AUTH_FAILED


class JwksError(InterlinkError):
    """A JWK Set document is structurally unusable (not ``{"keys": [...]}``, too many keys)."""


class KeyFetchError(InterlinkError):
    """A refresh of a provider's keys failed for a reason worth one log line (the JWKS cache keeps
    it to itself and serves the last good keys)."""


class PushSignatureError(InterlinkError):
    """A push webhook body did not verify against the operator's root public key (malformed, wrong
    ``alg`` or ``typ``, bad signature, certificate outside its validity): the receiver refuses it.
    Not a ``HandshakeError``: pushes travel over HTTP, outside the Noise wire contract."""

    code = "push_signature"


class StoreFullError(InterlinkError):
    """The LMDB map is full: the batch was not written (nothing earlier is lost)."""

    code = ErrorCode.OVERLOADED


class StoreLimitError(InterlinkError):
    """A per-user bound of the store was reached (for example the number of blocks)."""

    code = ErrorCode.TOO_LARGE


class MoveError(InterlinkError):
    """Moving users, groups and blobs between nodes (a node list change) cannot be done as asked:
    a file for another node or list, a truncated file, a conflict, an outbox not yet empty.
    Nothing was written."""


class MalformedRecordError(InterlinkError):
    """A record another node of the cluster relayed that no node of this version sends (its bug,
    or a node that should not be trusted): counted, answered ``internal``."""


class NatsProtocolError(InterlinkError):
    """A NATS server's byte stream broke the client protocol (an unknown operation, a control line
    or payload over the bounds, a ``MSG`` whose size is not a number) or the server refused this
    node's connection (``-ERR`` before its ``PONG``): the cluster link drops the connection and
    connects again (at start: the node does not serve)."""


class UpgradeRefusedError(InterlinkError):
    """Client side: the gateway answered the WebSocket upgrade with an HTTP error (wrong path,
    an ``Origin`` it does not allow, over a source limit); the message has the status."""

    code = "bad_upgrade"


class SessionClosedError(InterlinkError):
    """The session ended; ``reason`` is the ``bye`` reason or a local close reason."""

    code = "closed"

    def __init__(self, message: str = "", *, reason: str = "closed") -> None:
        super().__init__(message)
        self.reason = reason


class RedirectedError(SessionClosedError):
    """Client side: the gateway said ``bye redirect`` before ``welcome``: connect to ``host``:``port``
    (or the WebSocket URL ``ws``), the user's home node ``node``, instead."""

    def __init__(self, message: str = "", *, node: str, host: str, port: int, ws: str | None = None) -> None:
        super().__init__(message, reason=CloseReason.REDIRECT)
        self.node, self.host, self.port, self.ws = node, host, port, ws


class ServerError(InterlinkError):
    """The gateway answered a request with an ``err`` stanza (client side)."""

    def __init__(self, message: str = "", *, code: str = ErrorCode.INTERNAL, fields: dict | None = None) -> None:
        super().__init__(message, code=code)
        self.fields = fields or {}


class E2EEError(InterlinkError):
    """An end-to-end encryption failure (a message that cannot be decrypted, a bundle that does not verify...)."""


class IdentityChanged(E2EEError):
    """A peer device presented an identity key other than the one pinned for it (trust on first
    use): no session is started or accepted with it until the application calls
    ``trust_new_identity(user, device)`` (after comparing safety numbers, say)."""

    def __init__(self, user: str, device: int, known: bytes, presented: bytes) -> None:
        super().__init__(f"the identity key of {user}/{device} changed: refused until trust_new_identity({user!r}, {device})")
        self.user, self.device, self.known, self.presented = user, device, known, presented


class StateLocked(E2EEError):
    """The state file is in use by another ``E2EEClient`` (this process or another one)."""
