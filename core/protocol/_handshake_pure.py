"""Pure-Python twin of ``interlink.ext._handshake``: the Noise handshake state (rev 34 §5.2–§5.3).

Exactly the suites ``NoiseSession`` speaks: ``Noise_XX_25519_*`` and ``Noise_IK_25519_*`` with
ChaChaPoly or AESGCM and SHA256, BLAKE2s or BLAKE2b. X25519 and the AEADs are ``cryptography``'s,
the hashes ``hashlib``'s and HKDF ``cryptography``'s; this module only arranges them as the spec
says. ``noiseprotocol`` is the reference it is tested against, byte for byte.

``HandshakeState`` is driven with ``write_message``/``read_message`` in turn. After the last
message it holds the transport keys (``send_key``/``recv_key``, already oriented for its role;
their nonces start at 0), the handshake hash and the peer's static key, and nothing secret of the
handshake itself. Any problem with a message (bad tag, low-order X25519 point, truncated or
over-long message, a call out of turn) raises ``HandshakeError`` and kills the state: every later
call raises too. A payload that is not bytes or too large to fit is the caller's mistake:
``TypeError``/``ValueError``, nothing changed.

``StaticKey`` parses a static private key once; it is read-only, so every session of a node
shares the node's.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from interlink.core.errors import HandshakeError
from interlink.core.protocol.wire import TAG_BYTES, WIRE_MAX_FRAME_BYTES

DH_BYTES = 32
KEY_BYTES = 32
MAX_MESSAGE_BYTES = WIRE_MAX_FRAME_BYTES  # Noise's limit on any message is the wire's frame limit

# Per pattern: whether the responder's static key is a pre-message (IK's "<- s"), then the tokens
# of each message, initiator first and alternating (rev 34 §7.5).
PATTERNS = {
    "XX": (False, (("e",), ("e", "ee", "s", "es"), ("s", "se"))),
    "IK": (True, (("e", "es", "s", "ss"), ("e", "ee", "se"))),
}

# Fixed bytes each message adds around its payload (ephemeral keys, encrypted static keys, the
# payload's tag). A message shorter than this is truncated.
OVERHEAD_BYTES = {
    "XX": (DH_BYTES, DH_BYTES + DH_BYTES + TAG_BYTES + TAG_BYTES, DH_BYTES + TAG_BYTES + TAG_BYTES),
    "IK": (DH_BYTES + DH_BYTES + TAG_BYTES + TAG_BYTES, DH_BYTES + TAG_BYTES),
}

# AEAD class and the byte order of the counter in its nonce (rev 34 §12.3, §12.4).
CIPHERS = {"ChaChaPoly": (ChaCha20Poly1305, "little"), "AESGCM": (AESGCM, "big")}

# HASH, the digest name HMAC takes, and HASHLEN (rev 34 §12.5-§12.8).
# name -> (hashlib constructor, the same hash for cryptography's HKDF, HASHLEN)
HASHES = {
    "SHA256": (hashlib.sha256, hashes.SHA256(), 32),
    "BLAKE2s": (hashlib.blake2s, hashes.BLAKE2s(32), 32),
    "BLAKE2b": (hashlib.blake2b, hashes.BLAKE2b(64), 64),
}


def parse_protocol_name(protocol_name: str) -> tuple[str, str, str]:
    """``(pattern, cipher, hash)`` of a supported protocol name, or ``ValueError``."""
    parts = protocol_name.split("_") if isinstance(protocol_name, str) else ()
    if (len(parts) != 5 or parts[0] != "Noise" or parts[1] not in PATTERNS or parts[2] != "25519"
            or parts[3] not in CIPHERS or parts[4] not in HASHES):
        raise ValueError(f"unsupported Noise protocol {protocol_name!r}")
    return parts[1], parts[3], parts[4]


def key_bytes(name: str, value) -> bytes:
    """``value`` as 32 bytes, or ``TypeError``/``ValueError`` naming it."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) != DH_BYTES:
        raise ValueError(f"{name} must be {DH_BYTES} bytes, got {len(value)}")
    return value


class StaticKey:
    """A static X25519 key pair, parsed once from its 32 private bytes and shared read-only."""

    __slots__ = ("_private_key", "public")

    def __init__(self, private: bytes) -> None:
        self._private_key = X25519PrivateKey.from_private_bytes(key_bytes("static_private", private))
        self.public: bytes = self._private_key.public_key().public_bytes_raw()


class _SymmetricState:
    """Noise SymmetricState (§5.2) with its CipherState (§5.1) for the handshake."""

    __slots__ = ("_hash", "_hkdf_hash", "_hash_bytes", "_aead_class", "_byteorder", "ck", "h", "_aead", "_nonce")

    def __init__(self, protocol_name: str, cipher_name: str, hash_name: str) -> None:
        self._hash, self._hkdf_hash, self._hash_bytes = HASHES[hash_name]
        self._aead_class, self._byteorder = CIPHERS[cipher_name]
        # InitializeSymmetric: the name padded to HASHLEN, or its hash when longer.
        name = protocol_name.encode("ascii")
        if len(name) <= self._hash_bytes:
            self.h = name.ljust(self._hash_bytes, b"\x00")
        else:
            self.h = self._hash(name).digest()
        self.ck = self.h
        self._aead = None  # InitializeKey(empty): no key yet, so payloads travel in clear
        self._nonce = 0

    @property
    def has_key(self) -> bool:
        return self._aead is not None

    def _hkdf(self, input_key_material: bytes) -> tuple[bytes, bytes]:
        """HKDF(ck, input_key_material, 2) of §4.3: with two outputs it is RFC 5869's HKDF (salt
        ck, empty info, 2 × HASHLEN bytes), one call instead of three HMACs."""
        size = self._hash_bytes
        output = HKDF(self._hkdf_hash, 2 * size, self.ck, None).derive(input_key_material)
        return output[:size], output[size:]

    def mix_hash(self, data: bytes) -> None:
        self.h = self._hash(self.h + data).digest()

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, temp_key = self._hkdf(input_key_material)
        # InitializeKey(temp_k truncated to 32 bytes): one AEAD object per key.
        self._aead = self._aead_class(temp_key[:KEY_BYTES])
        self._nonce = 0

    def _nonce_bytes(self) -> bytes:
        return b"\x00\x00\x00\x00" + self._nonce.to_bytes(8, self._byteorder)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        if self._aead is None:
            ciphertext = plaintext
        else:
            ciphertext = self._aead.encrypt(self._nonce_bytes(), plaintext, self.h)
            self._nonce += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        if self._aead is None:
            plaintext = ciphertext
        else:
            plaintext = self._aead.decrypt(self._nonce_bytes(), ciphertext, self.h)  # InvalidTag: n unchanged
            self._nonce += 1
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        """The two transport keys: initiator to responder, responder to initiator."""
        key1, key2 = self._hkdf(b"")
        return key1[:KEY_BYTES], key2[:KEY_BYTES]


class HandshakeState:
    """One side of a Noise XX or IK handshake (§5.3), up to the transport keys."""

    __slots__ = (
        "_pattern",
        "_cipher_name",
        "_initiator",
        "_tokens",
        "_symmetric",
        "_static",
        "_ephemeral",
        "_ephemeral_public",
        "_remote_ephemeral",
        "_remote_static_key",
        "_remote_static",
        "_messages_done",
        "_error",
        "_handshake_hash",
        "_send_key",
        "_recv_key",
    )

    def __init__(
        self,
        protocol_name: str,
        initiator: bool,
        static_key: StaticKey,
        prologue: bytes,
        remote_static: bytes | None = None,
        ephemeral_private: bytes | None = None,
    ) -> None:
        pattern, cipher_name, hash_name = parse_protocol_name(protocol_name)
        if not isinstance(static_key, StaticKey):
            raise TypeError(f"static_key must be a StaticKey, got {type(static_key).__name__}")
        if not isinstance(prologue, (bytes, bytearray, memoryview)):
            raise TypeError(f"prologue must be bytes, got {type(prologue).__name__}")
        initiator = bool(initiator)
        responder_key_known, self._tokens = PATTERNS[pattern]
        if (remote_static is not None) != (responder_key_known and initiator):
            raise ValueError("remote_static is given to an IK initiator, and only to it")
        self._pattern = pattern
        self._cipher_name = cipher_name
        self._initiator = initiator
        self._static = static_key
        self._ephemeral = None  # generated when the "e" token is written, unless preset (test vectors)
        self._ephemeral_public = None
        if ephemeral_private is not None:
            self._set_ephemeral(X25519PrivateKey.from_private_bytes(key_bytes("ephemeral_private", ephemeral_private)))
        self._remote_ephemeral = None
        self._remote_static_key = None
        self._remote_static = None
        self._messages_done = 0
        self._error = None
        self._handshake_hash = None
        self._send_key = None
        self._recv_key = None

        symmetric = self._symmetric = _SymmetricState(protocol_name, cipher_name, hash_name)
        symmetric.mix_hash(bytes(prologue))
        if responder_key_known:  # IK's pre-message "<- s"
            if initiator:
                self._remote_static = key_bytes("remote_static", remote_static)
                self._remote_static_key = X25519PublicKey.from_public_bytes(self._remote_static)
            symmetric.mix_hash(self._remote_static if initiator else static_key.public)

    # ------------------------------------------------------------------ state

    @property
    def pattern(self) -> str:
        return self._pattern

    @property
    def cipher_name(self) -> str:
        return self._cipher_name

    @property
    def initiator(self) -> bool:
        return self._initiator

    @property
    def messages_done(self) -> int:
        return self._messages_done

    @property
    def complete(self) -> bool:
        """True once the last message was written or read: the transport keys are ready."""
        return self._send_key is not None

    @property
    def error(self) -> str | None:
        """Why the state died (it raised ``HandshakeError``), or None."""
        return self._error

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key once known (IK initiator: from the start)."""
        return self._remote_static

    @property
    def handshake_hash(self) -> bytes | None:
        return self._handshake_hash

    @property
    def send_key(self) -> bytes | None:
        return self._send_key

    @property
    def recv_key(self) -> bytes | None:
        return self._recv_key

    @property
    def send_nonce(self) -> int:
        return 0  # Split() initializes both transport cipher states with n = 0

    @property
    def recv_nonce(self) -> int:
        return 0

    # -------------------------------------------------------------- messages

    def write_message(self, payload: bytes = b"") -> bytes:
        """The next handshake message, carrying ``payload`` (encrypted once a key is mixed in)."""
        index = self._check_turn(writing=True)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        payload = bytes(payload)
        overhead = OVERHEAD_BYTES[self._pattern][index]
        if len(payload) + overhead > MAX_MESSAGE_BYTES:
            raise ValueError(
                f"handshake payload of {len(payload)} bytes does not fit in one Noise message "
                f"(max {MAX_MESSAGE_BYTES - overhead} for {self._pattern} message {index + 1})"
            )
        symmetric = self._symmetric
        parts = []
        try:
            for token in self._tokens[index]:
                if token == "e":
                    if self._ephemeral is None:
                        self._set_ephemeral(X25519PrivateKey.generate())
                    parts.append(self._ephemeral_public)
                    symmetric.mix_hash(self._ephemeral_public)
                elif token == "s":
                    parts.append(symmetric.encrypt_and_hash(self._static.public))
                else:
                    symmetric.mix_key(self._dh(token))
            parts.append(symmetric.encrypt_and_hash(payload))
        except (InvalidTag, ValueError) as exc:
            raise self._fail(self._describe(exc, index, writing=True)) from exc
        self._advance()
        return b"".join(parts)

    def read_message(self, message: bytes) -> bytes:
        """Read the peer's next handshake message; return its payload."""
        index = self._check_turn(writing=False)
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise self._fail(f"handshake message must be bytes, got {type(message).__name__}")
        message = bytes(message)
        overhead = OVERHEAD_BYTES[self._pattern][index]
        if len(message) < overhead:
            raise self._fail(
                f"truncated {self._pattern} handshake message {index + 1}: {len(message)} bytes, "
                f"at least {overhead} required"
            )
        if len(message) > MAX_MESSAGE_BYTES:
            raise self._fail(
                f"{self._pattern} handshake message {index + 1} of {len(message)} bytes exceeds {MAX_MESSAGE_BYTES}"
            )
        symmetric = self._symmetric
        offset = 0
        try:
            for token in self._tokens[index]:
                if token == "e":
                    remote_ephemeral = message[offset : offset + DH_BYTES]
                    offset += DH_BYTES
                    self._remote_ephemeral = X25519PublicKey.from_public_bytes(remote_ephemeral)
                    symmetric.mix_hash(remote_ephemeral)
                elif token == "s":
                    size = DH_BYTES + TAG_BYTES if symmetric.has_key else DH_BYTES
                    remote_static = symmetric.decrypt_and_hash(message[offset : offset + size])
                    offset += size
                    self._remote_static_key = X25519PublicKey.from_public_bytes(remote_static)
                    self._remote_static = remote_static
                else:
                    symmetric.mix_key(self._dh(token))
            payload = symmetric.decrypt_and_hash(message[offset:])
        except (InvalidTag, ValueError) as exc:
            raise self._fail(self._describe(exc, index, writing=False)) from exc
        self._advance()
        return payload

    def _dh(self, token: str) -> bytes:
        """DH for an "ee", "es", "se" or "ss" token; ``ValueError`` for an all-zero result.

        The first letter names the initiator's key, the second the responder's: each side uses
        its own private key for its letter and the peer's public key for the other."""
        mine, theirs = (token[0], token[1]) if self._initiator else (token[1], token[0])
        private = self._ephemeral if mine == "e" else self._static._private_key
        public = self._remote_ephemeral if theirs == "e" else self._remote_static_key
        return private.exchange(public)

    def _set_ephemeral(self, private: X25519PrivateKey) -> None:
        self._ephemeral = private
        self._ephemeral_public = private.public_key().public_bytes_raw()

    def _check_turn(self, *, writing: bool) -> int:
        """The index of the message about to be written or read, or ``HandshakeError``."""
        if self._error is not None:
            raise HandshakeError(f"handshake state is dead ({self._error})")
        if self._send_key is not None:
            verb = "write" if writing else "read"
            raise self._fail(f"cannot {verb} a handshake message: the handshake is already complete")
        index = self._messages_done
        our_turn = (index % 2 == 0) == self._initiator
        if writing and not our_turn:
            raise self._fail(
                f"wrong turn: {self._pattern} handshake message {index + 1} comes from the peer; "
                "call read_message, not write_message"
            )
        if not writing and our_turn:
            raise self._fail(
                f"wrong turn: {self._pattern} handshake message {index + 1} is ours to write; "
                "call write_message, not read_message"
            )
        return index

    def _describe(self, exc: Exception, index: int, *, writing: bool) -> str:
        where = f"{self._pattern} handshake message {index + 1} ({'write' if writing else 'read'})"
        if isinstance(exc, InvalidTag):
            return f"{where}: authentication failed (bad MAC, wrong key or tampered message)"
        # cryptography refuses an X25519 exchange whose result is all zero.
        return f"{where}: X25519 exchange refused, all-zero shared secret from a low-order public key ({exc})"

    def _advance(self) -> None:
        self._messages_done += 1
        if self._messages_done == len(self._tokens):
            key1, key2 = self._symmetric.split()
            self._send_key, self._recv_key = (key1, key2) if self._initiator else (key2, key1)
            self._handshake_hash = self._symmetric.h
            self._forget_secrets()

    def _fail(self, reason: str) -> HandshakeError:
        """Kill the state and return the error to raise."""
        if self._error is None:
            self._error = reason
        self._send_key = self._recv_key = None
        self._forget_secrets()
        return HandshakeError(reason)

    def _forget_secrets(self) -> None:
        # The chaining key, handshake cipher and private keys are no use after the split or a failure.
        self._symmetric = None
        self._static = None
        self._ephemeral = None
        self._remote_ephemeral = None
        self._remote_static_key = None
