# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of ``interlink.core.protocol._cipher_pure``: the Noise CipherState for transport messages.

Same signatures, exceptions and semantics as the pure twin (read that one first; it is the
contract). The counter is a C ``uint64_t``; the 12-byte AEAD nonce lives in one module-wide
bytearray that is rewritten in place before each call, so no Python int is converted per message.
Sharing it is safe: ``cryptography``'s AEAD calls are synchronous and keep no reference to it.
The ``cryptography`` AEAD object (about 1.6 KB of OpenSSL context) is created on first use and
dropped by ``release()``, so an idle connection keeps only its 32-byte key.
"""

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memcpy, memset

import operator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

MAX_NONCE = 2**64 - 1
TAG_BYTES = 16
WIRE_MAX_FRAME_BYTES = 65535
_CIPHERS = {"ChaChaPoly": (ChaCha20Poly1305, "little"), "AESGCM": (AESGCM, "big")}

cdef uint64_t _MAX_NONCE = 0xFFFFFFFFFFFFFFFF
cdef Py_ssize_t _TAG_BYTES = 16
cdef Py_ssize_t _WIRE_MAX = 65535
cdef bytes _ZEROS_32 = bytes(32)
cdef bytearray _NONCE12 = bytearray(12)  # bytes 0..3 stay zero forever; 4..11 carry the counter


def _check_nonce(value):
    value = operator.index(value)  # TypeError for floats, strings, None
    if not 0 <= value <= MAX_NONCE:
        raise ValueError(f"nonce must be in 0..2^64-1, got {value}")
    return value


@cython.final
@cython.auto_pickle(False)
cdef class CipherState:
    """Encrypts or decrypts Noise transport messages with a counter nonce."""

    cdef bint _little_endian   # ChaChaPoly: counter little-endian in the nonce; AESGCM: big-endian
    cdef unsigned char _key[32]  # inline: no separate bytes object per cipher state
    cdef object _aead
    cdef object _aead_encrypt  # bound methods of _aead, looked up once per key
    cdef object _aead_decrypt
    cdef uint64_t _nonce

    def __init__(self, cipher_name, key, nonce=0):
        if cipher_name not in _CIPHERS:
            raise ValueError(f"unknown cipher {cipher_name!r}; expected 'ChaChaPoly' or 'AESGCM'")
        if len(key) != 32:
            raise ValueError(f"cipher key must be 32 bytes, got {len(key)}")
        self._nonce = _check_nonce(nonce)
        self._little_endian = _CIPHERS[cipher_name][1] == "little"
        self._set_key(bytes(key))

    def __dealloc__(self):
        memset(self._key, 0, 32)  # do not leave the key behind in freed memory

    @property
    def cipher_name(self):
        """``"ChaChaPoly"`` or ``"AESGCM"``; fixed for the life of the object."""
        return "ChaChaPoly" if self._little_endian else "AESGCM"

    @property
    def nonce(self):
        """Noise ``n``: the counter the next operation uses. Settable (Noise ``SetNonce``) to
        0..2^64-1; 2^64-1 itself makes the next operation raise ``NonceExhaustedError``."""
        return self._nonce

    @nonce.setter
    def nonce(self, value):
        self._nonce = _check_nonce(value)

    @property
    def loaded(self):
        """True while the AEAD object exists (between first use and ``release()``)."""
        return self._aead is not None

    def release(self):
        """Drop the AEAD object (idle connections); the next operation recreates it from the key."""
        self._aead = None
        self._aead_encrypt = None
        self._aead_decrypt = None

    cdef int _set_key(self, bytes key) except -1:
        memcpy(self._key, PyBytes_AS_STRING(key), 32)
        self.release()
        return 0

    cdef int _load(self) except -1:
        aead_class = ChaCha20Poly1305 if self._little_endian else AESGCM
        self._aead = aead_class(PyBytes_FromStringAndSize(<char*>self._key, 32))
        self._aead_encrypt = self._aead.encrypt
        self._aead_decrypt = self._aead.decrypt
        return 0

    cdef void _write_nonce(self, uint64_t n) noexcept:
        # Bytes 0..3 stay zero from creation; 4..11 carry the counter.
        cdef unsigned char* out = <unsigned char*>PyByteArray_AS_STRING(_NONCE12)
        cdef int i
        if self._little_endian:
            for i in range(8):
                out[4 + i] = <unsigned char>(n >> (8 * i))
        else:
            for i in range(8):
                out[11 - i] = <unsigned char>(n >> (8 * i))

    cdef object _encrypt(self, object plaintext, object ad):
        if self._nonce == _MAX_NONCE:
            raise NonceExhaustedError("transport nonce exhausted")
        if self._aead_encrypt is None:
            self._load()
        self._write_nonce(self._nonce)
        ciphertext = self._aead_encrypt(_NONCE12, plaintext, ad)
        self._nonce += 1
        return ciphertext

    cdef object _decrypt(self, object ciphertext, object ad):
        if self._nonce == _MAX_NONCE:
            raise NonceExhaustedError("transport nonce exhausted")
        if len(ciphertext) < _TAG_BYTES:
            raise DecryptError(f"transport message of {len(ciphertext)} bytes is shorter than the tag")
        if self._aead_decrypt is None:
            self._load()
        self._write_nonce(self._nonce)
        try:
            plaintext = self._aead_decrypt(_NONCE12, ciphertext, ad)
        except InvalidTag:
            raise DecryptError("transport message failed authentication") from None
        self._nonce += 1
        return plaintext

    def encrypt(self, plaintext, ad=b""):
        return self._encrypt(plaintext, ad)

    def decrypt(self, ciphertext, ad=b""):
        return self._decrypt(ciphertext, ad)

    def encrypt_many(self, plaintexts):
        return [self._encrypt(p, b"") for p in plaintexts]

    def decrypt_many(self, ciphertexts):
        """Decrypt in order; the first failure raises and the nonce stays at that message."""
        return [self._decrypt(c, b"") for c in ciphertexts]

    def encrypt_frames(self, plaintexts):
        """Encrypt each plaintext and frame it (docs/protocol.md §1) into one buffer for one write.

        Every size is checked before anything is encrypted: a late ``ValueError`` must not leave
        the nonce advanced past ciphertexts that were thrown away."""
        cdef list items = list(plaintexts)
        cdef list ciphertexts = []
        cdef Py_ssize_t total = 0
        cdef Py_ssize_t length
        cdef bytes ciphertext
        cdef bytes out
        cdef char* cursor
        for plaintext in items:
            if len(plaintext) + _TAG_BYTES > _WIRE_MAX:
                raise LocalProtocolError(f"plaintext of {len(plaintext)} bytes does not fit in one frame")
        for plaintext in items:
            ciphertext = self._encrypt(plaintext, b"")
            ciphertexts.append(ciphertext)
            total += 2 + PyBytes_GET_SIZE(ciphertext)
        if total == 0:
            return b""
        out = PyBytes_FromStringAndSize(NULL, total)
        cursor = PyBytes_AS_STRING(out)
        for ciphertext in ciphertexts:
            length = PyBytes_GET_SIZE(ciphertext)
            cursor[0] = <char>(length >> 8)
            cursor[1] = <char>(length & 0xFF)
            memcpy(cursor + 2, PyBytes_AS_STRING(ciphertext), length)
            cursor += 2 + length
        return out

    def rekey(self):
        """Noise §4.2 REKEY: k = first 32 bytes of ENCRYPT(k, 2^64-1, empty, 32 zero bytes)."""
        if self._aead_encrypt is None:
            self._load()
        self._write_nonce(_MAX_NONCE)
        self._set_key(self._aead_encrypt(_NONCE12, _ZEROS_32, b"")[:32])

    def aead_encrypt(self, nonce12, plaintext, ad=b""):
        """Raw AEAD with an explicit 12-byte nonce (conformance vectors); does not touch ``nonce``."""
        if self._aead_encrypt is None:
            self._load()
        return self._aead_encrypt(nonce12, plaintext, ad)

    def aead_decrypt(self, nonce12, ciphertext, ad=b""):
        """Raw AEAD decryption with an explicit nonce; raises ``DecryptError`` on a bad tag."""
        if self._aead_decrypt is None:
            self._load()
        try:
            return self._aead_decrypt(nonce12, ciphertext, ad)
        except InvalidTag:
            raise DecryptError("AEAD authentication failed") from None


# Imported last, on purpose: importing interlink.core.errors runs interlink.core's __init__, whose
# selector imports this module back. By now CipherState exists, so ``import interlink.ext._cipher``
# works even as the very first import of the process.
from interlink.core.errors import DecryptError, LocalProtocolError, NonceExhaustedError  # noqa: E402
