"""Noise handshake for client–gateway links (docs/protocol.md §1–§2), sans-I/O.

``noiseprotocol`` performs the handshake. When it completes, ``NoiseSession`` copies the two
split keys and nonces into the project's own ``CipherState`` (``interlink.core.protocol.cipher``) and
drops every ``noiseprotocol`` object, so an idle session holds two small cipher states and a
few byte strings (the gateway keeps many thousands of them open).

Failure model: any problem with a handshake message — bad MAC, truncated or oversized message,
low-order X25519 point, a call out of turn — raises ``HandshakeError`` and kills the session;
every later call on a dead session raises ``HandshakeError`` too. Transport decryption failures
raise ``DecryptError`` from the cipher state and leave the session alive (the connection
decides to close).

``noiseprotocol`` 0.3.1 internals relied on (all checked against the Noise test vectors):

- ``NoiseConnection.noise_protocol.handshake_state`` (a ``HandshakeState``), captured right after
  ``start_handshake`` because noiseprotocol deletes its own reference at the split; its ``s``
  (our static key pair, ``public_bytes``) and ``rs`` (``noise.constants.Empty`` until the peer's
  static key is known) are read after each message. On drop we set its ``noise_protocol`` and
  ``symmetric_state`` to None to break a reference cycle.
- ``NoiseConnection.handshake_finished``; after the split ``noise_protocol.handshake_hash`` and
  ``noise_protocol.cipher_state_encrypt``/``cipher_state_decrypt`` with their ``k`` (32-byte
  key) and ``n`` (nonce, 0 after the split), already oriented for our role.
"""

from __future__ import annotations

import enum
import re
import sys
import warnings

from cryptography.exceptions import InvalidTag
from noise.connection import Keypair, NoiseConnection
from noise.constants import Empty
from noise.exceptions import (
    NoiseHandshakeError,
    NoiseInvalidMessage,
    NoiseMaxNonceError,
    NoiseProtocolNameError,
    NoiseValidationError,
    NoiseValueError,
)

from interlink.core.protocol.cipher import CipherState
from interlink.core.errors import HandshakeError, PreambleError, UnknownSuiteError
from interlink.core.protocol.wire import TAG_BYTES, WIRE_MAX_FRAME_BYTES

__all__ = [
    "Suite",
    "SUITES",
    "SUITE_BY_NAME",
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

SUITE_BY_NAME: dict[str, int] = {name: suite for suite, name in SUITES.items()}

PREAMBLE_BYTES = 4
PREAMBLE_MAGIC = b"IL"
PROTOCOL_VERSION = 0x01
RESERVED_PQ_SUITES = range(0x20, 0x30)

MAX_MESSAGE_BYTES = WIRE_MAX_FRAME_BYTES
"""Noise's limit on any message, handshake or transport (and the wire's frame limit)."""

DH_BYTES = 32

_NAME_RE = re.compile(r"^Noise_(XX|IK)_25519_(ChaChaPoly|AESGCM)_(SHA256|BLAKE2s|BLAKE2b)$")

# Fixed bytes each handshake message adds around its payload (ephemeral keys, encrypted static
# keys, the payload's tag), by pattern and message index. A message shorter than this is truncated.
_OVERHEAD_BYTES = {
    # XX: -> e | <- e, ee, s, es | -> s, se
    "XX": (DH_BYTES, DH_BYTES + DH_BYTES + TAG_BYTES + TAG_BYTES, DH_BYTES + TAG_BYTES + TAG_BYTES),
    # IK: <- s ... | -> e, es, s, ss | <- e, ee, se
    "IK": (DH_BYTES + DH_BYTES + TAG_BYTES + TAG_BYTES, DH_BYTES + TAG_BYTES),
}

# Everything noiseprotocol (or cryptography underneath it) raises for a bad message or key.
# ValueError covers cryptography's X25519 refusal of an all-zero shared secret (low-order point).
_NOISE_FAILURES = (
    InvalidTag,
    ValueError,
    NoiseValueError,
    NoiseHandshakeError,
    NoiseInvalidMessage,
    NoiseMaxNonceError,
    NoiseValidationError,
    NoiseProtocolNameError,
)


def make_preamble(suite: int) -> bytes:
    """The client's preamble for ``suite``: ``b"IL"``, version 0x01, the suite byte (also the Noise prologue)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite 0x{suite:02x}; known suites: {', '.join(f'0x{s:02x}' for s in SUITES)}")
    return PREAMBLE_MAGIC + bytes((PROTOCOL_VERSION, suite))


def parse_preamble(data: bytes) -> int:
    """Return the suite byte of a 4-byte preamble, or raise ``PreambleError``/``UnknownSuiteError``."""
    data = bytes(data)
    if len(data) != PREAMBLE_BYTES:
        raise PreambleError(f"bad preamble length: expected {PREAMBLE_BYTES} bytes, got {len(data)}")
    if data[:2] != PREAMBLE_MAGIC:
        raise PreambleError(f"bad preamble magic {data[:2]!r}, expected {PREAMBLE_MAGIC!r}")
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


_STATIC_KEYPAIRS: dict = {}
_MAX_CACHED_STATIC_KEYPAIRS = 16


def _static_keypair(keypair_class, private: bytes):
    """noiseprotocol's key-pair object for a static private key, parsed once per key.

    The object is only read during handshakes, so sessions can share it. The cache is small
    and bounded: it exists for the node's own key (and a few in tests), not for client keys.
    """
    keypair = _STATIC_KEYPAIRS.get(private)
    if keypair is None or type(keypair) is not keypair_class:
        if len(_STATIC_KEYPAIRS) >= _MAX_CACHED_STATIC_KEYPAIRS:
            _STATIC_KEYPAIRS.clear()
        keypair = _STATIC_KEYPAIRS[private] = keypair_class.from_private_bytes(private)
    return keypair


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
        "_conn",
        "_hs",
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
        self._message_count = len(_OVERHEAD_BYTES[pattern])

        conn = NoiseConnection.from_name(protocol_name.encode("ascii"))
        conn.set_prologue(bytes(prologue))
        if self._initiator:
            conn.set_as_initiator()
        else:
            conn.set_as_responder()
        # The gateway's static key is the same for every connection: parse it once (about 40 µs).
        conn.noise_protocol.keypairs["s"] = _static_keypair(conn.noise_protocol.dh_fn.klass, static_private)
        if remote_static is not None:
            conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote_static)
        if ephemeral_private is not None:
            conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral_private)
            with warnings.catch_warnings():
                # noiseprotocol warns that a preset ephemeral is for tests only; that is the one use here.
                warnings.simplefilter("ignore", UserWarning)
                conn.start_handshake()
        else:
            conn.start_handshake()
        self._conn = conn
        # Held directly: noiseprotocol deletes its own reference when the handshake splits,
        # and the remote static key learned in the last message lives only here.
        self._hs = conn.noise_protocol.handshake_state
        self._static_public = self._hs.s.public_bytes

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
        self._drop_handshake()
        self._send_cipher = None
        self._recv_cipher = None
        return HandshakeError(reason)

    def _drop_handshake(self) -> None:
        hs = self._hs
        if hs is not None:
            # Break the noise_protocol <-> handshake_state cycle so it is freed without waiting for the GC.
            hs.noise_protocol = None
            hs.symmetric_state = None
        self._conn = None
        self._hs = None

    def _check_step(self, writing: bool) -> None:
        if self._error is not None:
            raise HandshakeError(f"noise session is dead ({self._error})")
        if self._send_cipher is not None:
            verb = "write" if writing else "read"
            raise self._fail(f"cannot {verb} a handshake message: the handshake is already complete")
        our_turn = (self._messages_done % 2 == 0) == self._initiator
        if writing and not our_turn:
            raise self._fail(
                f"wrong turn: {self._pattern} handshake message {self._messages_done + 1} comes from the peer; "
                "call read_message, not write_message"
            )
        if not writing and our_turn:
            raise self._fail(
                f"wrong turn: {self._pattern} handshake message {self._messages_done + 1} is ours to write; "
                "call write_message, not read_message"
            )

    def write_message(self, payload: bytes = b"") -> bytes:
        """Write the next handshake message carrying ``payload`` (encrypted unless it is XX message 1)."""
        self._check_step(writing=True)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        payload = bytes(payload)
        index = self._messages_done
        overhead = _OVERHEAD_BYTES[self._pattern][index]
        if len(payload) + overhead > MAX_MESSAGE_BYTES:
            # A local mistake caught before any state changed: the session stays usable.
            raise ValueError(
                f"handshake payload of {len(payload)} bytes does not fit in one Noise message "
                f"(max {MAX_MESSAGE_BYTES - overhead} for {self._pattern} message {index + 1})"
            )
        try:
            message = bytes(self._conn.write_message(payload))
        except _NOISE_FAILURES as exc:
            raise self._fail(self._describe(exc, index, writing=True)) from exc
        self._advance()
        return message

    def read_message(self, message: bytes) -> bytes:
        """Read the peer's next handshake message and return its decrypted payload."""
        self._check_step(writing=False)
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise self._fail(f"handshake message must be bytes, got {type(message).__name__}")
        message = bytes(message)
        index = self._messages_done
        overhead = _OVERHEAD_BYTES[self._pattern][index]
        if len(message) < overhead:
            raise self._fail(
                f"truncated {self._pattern} handshake message {index + 1}: {len(message)} bytes, "
                f"at least {overhead} required"
            )
        if len(message) > MAX_MESSAGE_BYTES:
            raise self._fail(
                f"{self._pattern} handshake message {index + 1} of {len(message)} bytes exceeds {MAX_MESSAGE_BYTES}"
            )
        try:
            payload = bytes(self._conn.read_message(message))
        except _NOISE_FAILURES as exc:
            raise self._fail(self._describe(exc, index, writing=False)) from exc
        self._advance()
        return payload

    def _describe(self, exc: BaseException, index: int, *, writing: bool) -> str:
        where = f"{self._pattern} handshake message {index + 1} ({'write' if writing else 'read'})"
        if isinstance(exc, InvalidTag):
            return f"{where}: authentication failed (bad MAC, wrong key or tampered message)"
        if isinstance(exc, ValueError):
            # cryptography refuses an X25519 exchange whose result is all zero.
            return f"{where}: X25519 exchange refused, all-zero shared secret from a low-order public key ({exc})"
        return f"{where}: {type(exc).__name__}: {exc}"

    def _advance(self) -> None:
        self._messages_done += 1
        hs = self._hs
        if self._remote_static is None and not isinstance(hs.rs, Empty):
            self._remote_static = hs.rs.public_bytes
        conn = self._conn
        if conn.handshake_finished:
            protocol = conn.noise_protocol
            if self._remote_static is None:
                raise self._fail("handshake finished without the peer's static key")
            self._handshake_hash = bytes(protocol.handshake_hash)
            enc, dec = protocol.cipher_state_encrypt, protocol.cipher_state_decrypt
            self._send_cipher = CipherState(self._cipher_name, bytes(enc.k), enc.n)
            self._recv_cipher = CipherState(self._cipher_name, bytes(dec.k), dec.n)
            # Drop every noiseprotocol object (keys, hash state, cipher wrappers): only the
            # two project cipher states stay alive for the transport phase.
            self._drop_handshake()

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
