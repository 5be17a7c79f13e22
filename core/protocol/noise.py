"""Noise handshake for client–gateway links (docs/protocol.md §1–§2), sans-I/O.

The handshake runs in the project's own Noise handshake state (``interlink.core.protocol.handshake``:
the compiled ``interlink.ext._handshake`` or its pure twin), built on ``cryptography``'s X25519
and AEADs and ``hashlib``'s hashes and proven byte for byte against ``noiseprotocol``, the
reference (``tests/protocol/test_handshake.py``). When it completes, ``NoiseSession`` turns the
two split keys into the project's ``CipherState``s (``interlink.core.protocol.cipher``) and drops
the handshake state, so an idle session holds two small cipher states and a few byte strings
(the gateway keeps many thousands of them open).

Failure model: any problem with a handshake message — bad MAC, truncated or oversized message,
low-order X25519 point, a call out of turn — raises ``HandshakeError`` and kills the session;
every later call on a dead session raises ``HandshakeError`` too. Transport decryption failures
raise ``DecryptError`` from the cipher state and leave the session alive (the connection
decides to close).
"""

from __future__ import annotations

import enum
import re
import sys

from interlink.core.protocol.cipher import CipherState
from interlink.core.protocol.handshake import HandshakeState, StaticKey
from interlink.core.errors import HandshakeError, PreambleError, UnknownSuiteError
from interlink.core.protocol.wire import WIRE_MAX_FRAME_BYTES

__all__ = [
    "Suite",
    "SUITES",
    "PREAMBLE_BYTES",
    "PREAMBLE_MAGIC",
    "PROTOCOL_VERSION",
    "MAX_MESSAGE_BYTES",
    "PreambleError",
    "UnknownSuiteError",
    "make_preamble",
    "parse_preamble",
    "NoiseSession",
]

class Suite(enum.IntEnum):
    """The handshake suites of docs/protocol.md §2: the preamble's suite byte."""

    XX_CHACHAPOLY = 0x01
    XX_AESGCM = 0x02
    IK_CHACHAPOLY = 0x11
    IK_AESGCM = 0x12

    @property
    def protocol_name(self) -> str:
        """The Noise protocol name, e.g. ``Noise_XX_25519_ChaChaPoly_SHA256``."""
        return _PROTOCOL_NAMES[self]

    @property
    def is_ik(self) -> bool:
        return self >= 0x11

    def as_xx(self) -> Suite:
        """The XX suite with the same cipher (what an IK client falls back to)."""
        return Suite(self - 0x10) if self.is_ik else self


_PROTOCOL_NAMES = {
    Suite.XX_CHACHAPOLY: "Noise_XX_25519_ChaChaPoly_SHA256",
    Suite.XX_AESGCM: "Noise_XX_25519_AESGCM_SHA256",
    Suite.IK_CHACHAPOLY: "Noise_IK_25519_ChaChaPoly_SHA256",
    Suite.IK_AESGCM: "Noise_IK_25519_AESGCM_SHA256",
}

SUITES: dict[int, str] = {int(suite): suite.protocol_name for suite in Suite}
"""Suite byte -> Noise protocol name (the table of ``Suite``, by plain int)."""


PREAMBLE_BYTES = 4
PREAMBLE_MAGIC = b"IL"
PROTOCOL_VERSION = 0x01
RESERVED_PQ_SUITES = range(0x20, 0x30)

MAX_MESSAGE_BYTES = WIRE_MAX_FRAME_BYTES
"""Noise's limit on any message, handshake or transport (and the wire's frame limit)."""

DH_BYTES = 32

_NAME_RE = re.compile(r"^Noise_(XX|IK)_25519_(ChaChaPoly|AESGCM)_(SHA256|BLAKE2s|BLAKE2b)$")

_MESSAGE_COUNT = {"XX": 3, "IK": 2}


def make_preamble(suite: int) -> bytes:
    """The client's preamble for ``suite``: ``b"IL"``, version 0x01, the suite byte (also the Noise prologue)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite 0x{suite:02x}; known suites: {', '.join(f'0x{s:02x}' for s in SUITES)}")
    return PREAMBLE_MAGIC + bytes((PROTOCOL_VERSION, suite))


# What the first bytes are when they are something else, for the operator reading the close.
_PREAMBLE_HINTS = {
    b"\r\n\r\n": ": a PROXY protocol v2 header, which is accepted only from tcp_trusted_proxies",
    b"PROX": ": a PROXY protocol v1 header; only v2, and only from tcp_trusted_proxies",
    b"GET ": ": an HTTP request on the TCP port (WebSocket clients connect to ws_port)",
    b"\x16\x03": ": a TLS ClientHello (the gateway speaks Noise, not TLS)",
}


def _preamble_hint(data: bytes) -> str:
    return next((hint for start, hint in _PREAMBLE_HINTS.items() if data.startswith(start)), "")


def parse_preamble(data: bytes) -> int:
    """Return the suite byte of a 4-byte preamble, or raise ``PreambleError``/``UnknownSuiteError``."""
    data = bytes(data)
    if len(data) != PREAMBLE_BYTES:
        raise PreambleError(f"bad preamble length: expected {PREAMBLE_BYTES} bytes, got {len(data)}")
    if data[:2] != PREAMBLE_MAGIC:
        raise PreambleError(f"bad preamble magic {data[:2]!r}, expected {PREAMBLE_MAGIC!r}{_preamble_hint(data)}")
    if data[2] != PROTOCOL_VERSION:
        raise PreambleError(f"unsupported protocol version {data[2]}")
    suite = data[3]
    if suite not in SUITES:
        if suite in RESERVED_PQ_SUITES:
            raise UnknownSuiteError(
                f"unknown suite 0x{suite:02x} (reserved for post-quantum hybrid suites, not implemented)", suite=suite
            )
        raise UnknownSuiteError(f"unknown suite 0x{suite:02x}", suite=suite)
    return suite


def _check_key(name: str, value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) != DH_BYTES:
        raise ValueError(f"{name} must be {DH_BYTES} bytes, got {len(value)}")
    return value


_STATIC_KEYS: dict = {}
_MAX_CACHED_STATIC_KEYS = 16


def _static_key(private: bytes) -> StaticKey:
    """The handshake state's key-pair object for a static private key, parsed once per key.

    The object is only read during handshakes, so sessions can share it. The cache is small
    and bounded: it exists for the node's own key (and a few in tests), not for client keys.
    """
    key = _STATIC_KEYS.get(private)
    if key is None:
        if len(_STATIC_KEYS) >= _MAX_CACHED_STATIC_KEYS:
            _STATIC_KEYS.clear()
        key = _STATIC_KEYS[private] = StaticKey(private)
    return key


class NoiseSession:
    """One side of a Noise XX or IK handshake, then the transport cipher pair.

    Drive it with ``write_message``/``read_message`` while ``handshake_complete`` is false
    (``needs_write`` says whose turn it is), then ``encrypt``/``decrypt``.
    """

    __slots__ = (
        "_protocol_name",
        "_pattern",
        "_cipher_name",
        "_initiator",
        "_static_public",
        "_remote_static",
        "_handshake_hash",
        "_send_cipher",
        "_recv_cipher",
        "_messages_done",
        "_error",
        "_handshake",
        "_message_count",
    )

    def __init__(
        self,
        protocol_name: str,
        *,
        initiator: bool,
        static_private: bytes,
        prologue: bytes,
        remote_static: bytes | None = None,
        ephemeral_private: bytes | None = None,
    ) -> None:
        match = _NAME_RE.match(protocol_name) if isinstance(protocol_name, str) else None
        if match is None:
            raise ValueError(
                f"unsupported Noise protocol {protocol_name!r}: expected Noise_XX_25519_* or Noise_IK_25519_* "
                "with ChaChaPoly/AESGCM and SHA256/BLAKE2s/BLAKE2b"
            )
        # Interned: every session of a suite shares these strings instead of holding copies.
        pattern, cipher_name = sys.intern(match.group(1)), sys.intern(match.group(2))
        static_private = _check_key("static_private", static_private)
        if not isinstance(prologue, (bytes, bytearray, memoryview)):
            raise TypeError(f"prologue must be bytes, got {type(prologue).__name__}")
        if remote_static is not None:
            remote_static = _check_key("remote_static", remote_static)
            if not (pattern == "IK" and initiator):
                raise ValueError("remote_static is only given to an IK initiator (XX and IK responders learn it)")
        elif pattern == "IK" and initiator:
            raise ValueError("an IK initiator needs remote_static (the responder's static public key)")
        if ephemeral_private is not None:
            ephemeral_private = _check_key("ephemeral_private", ephemeral_private)

        self._protocol_name = protocol_name
        self._pattern = pattern
        self._cipher_name = cipher_name
        self._initiator = bool(initiator)
        self._remote_static = remote_static
        self._handshake_hash: bytes | None = None
        self._send_cipher = None
        self._recv_cipher = None
        self._messages_done = 0
        self._error: str | None = None
        self._message_count = _MESSAGE_COUNT[pattern]
        # The gateway's static key is the same for every connection: parse it once (about 30 µs).
        static_key = _static_key(static_private)
        self._static_public = static_key.public
        self._handshake = HandshakeState(
            protocol_name, self._initiator, static_key, bytes(prologue), remote_static, ephemeral_private
        )

    # ------------------------------------------------------------------ state

    @property
    def protocol_name(self) -> str:
        return self._protocol_name

    @property
    def pattern(self) -> str:
        """``"XX"`` or ``"IK"``."""
        return self._pattern

    @property
    def cipher_name(self) -> str:
        """``"ChaChaPoly"`` or ``"AESGCM"``."""
        return self._cipher_name

    @property
    def initiator(self) -> bool:
        return self._initiator

    @property
    def static_public(self) -> bytes:
        """Our static X25519 public key."""
        return self._static_public

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key once known (IK initiator: from the start), else None."""
        return self._remote_static

    @property
    def handshake_hash(self) -> bytes | None:
        """Noise ``h`` after the last handshake message (channel binding), None before."""
        return self._handshake_hash

    @property
    def send_cipher(self):
        """The project ``CipherState`` for messages we send, None before completion or once dead."""
        return self._send_cipher

    @property
    def recv_cipher(self):
        """The project ``CipherState`` for messages we receive, None before completion or once dead."""
        return self._recv_cipher

    @property
    def messages_done(self) -> int:
        """Handshake messages written or read so far."""
        return self._messages_done

    @property
    def error(self) -> str | None:
        """Why the session died (the first failure), or None."""
        return self._error

    @property
    def handshake_complete(self) -> bool:
        """True once the last handshake message was written or read and the transport ciphers exist."""
        return self._send_cipher is not None and self._error is None

    @property
    def dead(self) -> bool:
        """True after a handshake failure; every further call raises ``HandshakeError``."""
        return self._error is not None

    @property
    def needs_write(self) -> bool:
        """True when the next handshake step is ours to write."""
        if self._error is not None or self._send_cipher is not None:
            return False
        return (self._messages_done % 2 == 0) == self._initiator

    @property
    def needs_read(self) -> bool:
        """True when the next handshake step is a message from the peer."""
        if self._error is not None or self._send_cipher is not None:
            return False
        return (self._messages_done % 2 == 0) != self._initiator

    def __repr__(self) -> str:
        role = "initiator" if self._initiator else "responder"
        if self._error is not None:
            state = f"dead: {self._error}"
        elif self._send_cipher is not None:
            state = "transport"
        else:
            state = f"handshake {self._messages_done}/{self._message_count}"
        return f"<NoiseSession {self._protocol_name} {role} {state}>"

    # -------------------------------------------------------------- handshake

    def _fail(self, reason: str) -> HandshakeError:
        """Kill the session and return the error to raise."""
        if self._error is None:
            self._error = reason
        self._handshake = None
        self._send_cipher = None
        self._recv_cipher = None
        return HandshakeError(reason)

    def _check_alive(self, writing: bool) -> None:
        # Turns, payload types and sizes are the handshake state's to check; it is gone once
        # the session is dead or complete.
        if self._error is not None:
            raise HandshakeError(f"noise session is dead ({self._error})")
        if self._send_cipher is not None:
            verb = "write" if writing else "read"
            raise self._fail(f"cannot {verb} a handshake message: the handshake is already complete")

    def write_message(self, payload: bytes = b"") -> bytes:
        """Write the next handshake message carrying ``payload`` (encrypted unless it is XX message 1).

        A payload that is not bytes (``TypeError``) or does not fit (``ValueError``) is a local
        mistake caught before any state changed: the session stays usable."""
        self._check_alive(writing=True)
        try:
            message = self._handshake.write_message(payload)
        except HandshakeError as exc:
            self._fail(str(exc))
            raise
        self._advance()
        return message

    def read_message(self, message: bytes) -> bytes:
        """Read the peer's next handshake message and return its decrypted payload."""
        self._check_alive(writing=False)
        try:
            payload = self._handshake.read_message(message)
        except HandshakeError as exc:
            self._fail(str(exc))
            raise
        self._advance()
        return payload

    def _advance(self) -> None:
        self._messages_done += 1
        handshake = self._handshake
        if self._remote_static is None:
            self._remote_static = handshake.remote_static
        if handshake.complete:
            self._handshake_hash = handshake.handshake_hash
            self._send_cipher = CipherState(self._cipher_name, handshake.send_key, handshake.send_nonce)
            self._recv_cipher = CipherState(self._cipher_name, handshake.recv_key, handshake.recv_nonce)
            # Only the two cipher states stay alive for the transport phase.
            self._handshake = None

    # -------------------------------------------------------------- transport

    def encrypt(self, plaintext: bytes) -> bytes:
        """Encrypt one transport message with the send cipher."""
        send = self._send_cipher
        if send is None:
            raise self._not_transport()
        return send.encrypt(plaintext)

    def decrypt(self, ciphertext: bytes) -> bytes:
        """Decrypt one transport message; a bad tag raises ``DecryptError`` (nonce unchanged)."""
        recv = self._recv_cipher
        if recv is None:
            raise self._not_transport()
        return recv.decrypt(ciphertext)

    def _not_transport(self) -> HandshakeError:
        if self._error is not None:
            return HandshakeError(f"noise session is dead ({self._error})")
        return HandshakeError(
            f"handshake not complete ({self._messages_done} of {self._message_count} messages): no transport cipher yet"
        )
