"""Pure-Python twin of ``interlink.ext._cipher``: the Noise CipherState for transport messages.

Noise rev 34 §5.1: a 32-byte key ``k`` and a 64-bit counter nonce ``n``. The AEAD nonce is four
zero bytes followed by ``n`` little-endian (ChaChaPoly) or big-endian (AESGCM). ``n`` increments
after every successful operation; 2^64-1 is reserved, so reaching it ends the session. A failed
decryption leaves ``n`` unchanged. The AEAD itself is ``cryptography``'s; its object (about
1.6 KB of OpenSSL context) is created on first use and dropped by ``release()``, so an idle
connection keeps only the 32-byte key.

Plaintexts, ciphertexts and associated data go to ``cryptography`` as they are: any contiguous
bytes-like object works, anything else raises ``TypeError`` (never ``bytes(x)``, which turns an
int into that many zero bytes).
"""

from __future__ import annotations

import operator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from interlink.core.errors import DecryptError, LocalProtocolError, NonceExhaustedError

MAX_NONCE = 2**64 - 1
TAG_BYTES = 16
WIRE_MAX_FRAME_BYTES = 65535
_CIPHERS = {"ChaChaPoly": (ChaCha20Poly1305, "little"), "AESGCM": (AESGCM, "big")}


def _check_nonce(value) -> int:
    value = operator.index(value)  # TypeError for floats, strings, None
    if not 0 <= value <= MAX_NONCE:
        raise ValueError(f"nonce must be in 0..2^64-1, got {value}")
    return value


class CipherState:
    """Encrypts or decrypts Noise transport messages with a counter nonce."""

    __slots__ = ("_cipher_name", "_aead_class", "_aead", "_byteorder", "_key", "_nonce")

    def __init__(self, cipher_name: str, key: bytes, nonce: int = 0) -> None:
        if cipher_name not in _CIPHERS:
            raise ValueError(f"unknown cipher {cipher_name!r}; expected 'ChaChaPoly' or 'AESGCM'")
        if len(key) != 32:
            raise ValueError(f"cipher key must be 32 bytes, got {len(key)}")
        self._nonce = _check_nonce(nonce)
        self._aead_class, self._byteorder = _CIPHERS[cipher_name]
        self._cipher_name = cipher_name
        self._key = bytes(key)
        self._aead = None

    @property
    def loaded(self) -> bool:
        """True while the AEAD object exists (between first use and ``release()``)."""
        return self._aead is not None

    def release(self) -> None:
        """Drop the AEAD object (idle connections); the next operation recreates it from the key."""
        self._aead = None

    def _cipher(self):
        aead = self._aead
        if aead is None:
            aead = self._aead = self._aead_class(self._key)
        return aead

    @property
    def cipher_name(self) -> str:
        """``"ChaChaPoly"`` or ``"AESGCM"``; fixed for the life of the object."""
        return self._cipher_name

    @property
    def nonce(self) -> int:
        """Noise ``n``: the counter the next operation uses. Settable (Noise ``SetNonce``) to
        0..2^64-1; 2^64-1 itself makes the next operation raise ``NonceExhaustedError``."""
        return self._nonce

    @nonce.setter
    def nonce(self, value: int) -> None:
        self._nonce = _check_nonce(value)

    def _nonce_bytes(self, n: int) -> bytes:
        return b"\x00\x00\x00\x00" + n.to_bytes(8, self._byteorder)

    def encrypt(self, plaintext, ad: bytes = b"") -> bytes:
        if self._nonce >= MAX_NONCE:
            raise NonceExhaustedError("transport nonce exhausted")
        ciphertext = self._cipher().encrypt(self._nonce_bytes(self._nonce), plaintext, ad)
        self._nonce += 1
        return ciphertext

    def decrypt(self, ciphertext, ad: bytes = b"") -> bytes:
        if self._nonce >= MAX_NONCE:
            raise NonceExhaustedError("transport nonce exhausted")
        if len(ciphertext) < TAG_BYTES:
            raise DecryptError(f"transport message of {len(ciphertext)} bytes is shorter than the tag")
        try:
            plaintext = self._cipher().decrypt(self._nonce_bytes(self._nonce), ciphertext, ad)
        except InvalidTag:
            raise DecryptError("transport message failed authentication") from None
        self._nonce += 1
        return plaintext

    def encrypt_many(self, plaintexts) -> list:
        return [self.encrypt(p) for p in plaintexts]

    def decrypt_many(self, ciphertexts) -> list:
        """Decrypt in order; the first failure raises and the nonce stays at that message."""
        return [self.decrypt(c) for c in ciphertexts]

    def encrypt_frames(self, plaintexts) -> bytes:
        """Encrypt each plaintext and frame it (docs/protocol.md §1) into one buffer for one write.

        Every size is checked before anything is encrypted: a late ``ValueError`` must not leave
        the nonce advanced past ciphertexts that were thrown away (the peer would then fail to
        decrypt everything that follows)."""
        plaintexts = list(plaintexts)
        for plaintext in plaintexts:
            if len(plaintext) + TAG_BYTES > WIRE_MAX_FRAME_BYTES:
                raise LocalProtocolError(f"plaintext of {len(plaintext)} bytes does not fit in one frame")
        out = bytearray()
        for plaintext in plaintexts:
            ciphertext = self.encrypt(plaintext)
            out += len(ciphertext).to_bytes(2, "big")
            out += ciphertext
        return bytes(out)

    def rekey(self) -> None:
        """Noise §4.2 REKEY: k = first 32 bytes of ENCRYPT(k, 2^64-1, empty, 32 zero bytes)."""
        new_key = self._cipher().encrypt(self._nonce_bytes(MAX_NONCE), b"\x00" * 32, b"")[:32]
        self._key = new_key
        self._aead = None

    def aead_encrypt(self, nonce12: bytes, plaintext, ad: bytes = b"") -> bytes:
        """Raw AEAD with an explicit 12-byte nonce (conformance vectors); does not touch ``nonce``."""
        return self._cipher().encrypt(nonce12, plaintext, ad)

    def aead_decrypt(self, nonce12: bytes, ciphertext, ad: bytes = b"") -> bytes:
        """Raw AEAD decryption with an explicit nonce; raises ``DecryptError`` on a bad tag."""
        try:
            return self._cipher().decrypt(nonce12, ciphertext, ad)
        except InvalidTag:
            raise DecryptError("AEAD authentication failed") from None
