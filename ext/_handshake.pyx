# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of ``interlink.core.protocol._handshake_pure``: the Noise handshake state (rev 34 §5.2–§5.3).

Same signatures, exceptions and messages as the pure twin (read that one first; it is the
contract). The primitives are the same calls (``cryptography``'s X25519, AEADs and HKDF,
``hashlib``); what is compiled is the glue around them: the token loop runs over C integers, the
SymmetricState lives in typed fields of the handshake state instead of an object of its own,
what depends only on the protocol name (pattern, cipher, hash, the initial ``h``) is worked out
once per name and shared, each outgoing message is one ``bytes`` object allocated at its final
size and filled in place, and an incoming one is read through a pointer. The spec's tables
(patterns, overheads, ciphers, hashes) and the protocol-name check are imported from the pure twin.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from interlink.core.errors import HandshakeError
# The spec's tables and the name check are the pure twin's, so the twins cannot disagree on them.
from interlink.core.protocol._handshake_pure import (
    CIPHERS,
    HASHES,
    MAX_MESSAGE_BYTES,
    OVERHEAD_BYTES,
    PATTERNS,
    key_bytes,
    parse_protocol_name,
)

cdef enum:
    _DH = 32
    _KEY = 32
    _TAG = 16
    _MAX_MESSAGE = 65535

assert _MAX_MESSAGE == MAX_MESSAGE_BYTES  # the C constant is the module constant, compiled in

cdef enum:
    # Pattern tokens; a DH token's first letter names the initiator's key, the second the responder's.
    _E = 1
    _S = 2
    _EE = 3
    _ES = 4
    _SE = 5
    _SS = 6

# PATTERNS in token codes: (the responder's static key is a pre-message, the tokens of each message).
_TOKEN_CODES = {"e": _E, "s": _S, "ee": _EE, "es": _ES, "se": _SE, "ss": _SS}
_PATTERNS = {
    pattern: (responder_key_known, tuple(tuple(_TOKEN_CODES[token] for token in message) for message in messages))
    for pattern, (responder_key_known, messages) in PATTERNS.items()
}

cdef object _HKDF = HKDF
cdef object _X25519PrivateKey = X25519PrivateKey
cdef object _from_public_bytes = X25519PublicKey.from_public_bytes
cdef object _generate = X25519PrivateKey.generate
cdef bytes _EMPTY = b""


@cython.final
@cython.auto_pickle(False)
cdef class _Suite:
    """What depends only on the protocol name; one per name, shared by every handshake of it."""

    cdef str pattern
    cdef str cipher_name
    cdef tuple tokens
    cdef tuple overheads
    cdef bint responder_key_known
    cdef object aead_class
    cdef tuple nonces          # the AEAD nonces for n = 0 and 1, the only counters a handshake key reaches
    cdef object hash_new
    cdef object hkdf_hash      # the same hash as cryptography's HashAlgorithm, for HKDF
    cdef Py_ssize_t hash_bytes
    cdef bytes initial_hash    # InitializeSymmetric's h (and ck)

    def __init__(self, str protocol_name):
        pattern, cipher_name, hash_name = parse_protocol_name(protocol_name)
        self.pattern = pattern
        self.cipher_name = cipher_name
        self.responder_key_known, self.tokens = _PATTERNS[pattern]
        self.overheads = OVERHEAD_BYTES[pattern]
        self.aead_class, byteorder = CIPHERS[cipher_name]
        self.nonces = tuple(b"\x00\x00\x00\x00" + n.to_bytes(8, byteorder) for n in (0, 1))
        self.hash_new, self.hkdf_hash, self.hash_bytes = HASHES[hash_name]
        name = protocol_name.encode("ascii")
        if len(name) <= self.hash_bytes:
            self.initial_hash = name.ljust(self.hash_bytes, b"\x00")
        else:
            self.initial_hash = self.hash_new(name).digest()


cdef dict _SUITES = {}  # protocol name -> _Suite; at most the 18 supported names


cdef _Suite _suite(object protocol_name):
    if not isinstance(protocol_name, str):
        parse_protocol_name(protocol_name)  # raises the ValueError
    suite = _SUITES.get(protocol_name)
    if suite is None:
        suite = _SUITES[protocol_name] = _Suite(protocol_name)  # only a supported name gets this far
    return <_Suite>suite


cdef inline Py_ssize_t _put(char* out, Py_ssize_t filled, Py_ssize_t total, bytes piece) except -1:
    """Copy ``piece`` into the message at ``filled``; the new fill level."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(piece)
    if filled + size > total:
        raise RuntimeError(f"handshake message overflows its {total} bytes")  # a bug of ours
    memcpy(out + filled, PyBytes_AS_STRING(piece), size)
    return filled + size


@cython.final
@cython.auto_pickle(False)
cdef class StaticKey:
    """A static X25519 key pair, parsed once from its 32 private bytes and shared read-only."""

    cdef object _private_key
    cdef readonly bytes public

    def __init__(self, private):
        self._private_key = _X25519PrivateKey.from_private_bytes(key_bytes("static_private", private))
        self.public = self._private_key.public_key().public_bytes_raw()


@cython.final
@cython.auto_pickle(False)
cdef class HandshakeState:
    """One side of a Noise XX or IK handshake (§5.3), up to the transport keys."""

    cdef _Suite _suite
    cdef bint _initiator
    cdef Py_ssize_t _messages_done
    cdef StaticKey _static
    cdef object _ephemeral          # X25519PrivateKey, generated when "e" is written unless preset
    cdef bytes _ephemeral_public
    cdef object _remote_ephemeral   # X25519PublicKey
    cdef object _remote_static_key  # X25519PublicKey
    cdef bytes _remote_static
    # SymmetricState and its CipherState: ck, h, the AEAD of the current key (None: no key), n.
    cdef bytes _ck
    cdef bytes _h
    cdef object _aead
    cdef Py_ssize_t _nonce
    cdef str _error
    cdef bytes _handshake_hash
    cdef bytes _send_key
    cdef bytes _recv_key

    def __init__(self, protocol_name, initiator, StaticKey static_key not None, prologue,
                 remote_static=None, ephemeral_private=None):
        cdef _Suite suite = _suite(protocol_name)
        cdef bint is_initiator = bool(initiator)
        if not isinstance(prologue, (bytes, bytearray, memoryview)):
            raise TypeError(f"prologue must be bytes, got {type(prologue).__name__}")
        if (remote_static is not None) != (suite.responder_key_known and is_initiator):
            raise ValueError("remote_static is given to an IK initiator, and only to it")
        self._suite = suite
        self._initiator = is_initiator
        self._static = static_key
        if ephemeral_private is not None:
            self._set_ephemeral(_X25519PrivateKey.from_private_bytes(key_bytes("ephemeral_private", ephemeral_private)))
        self._h = self._ck = suite.initial_hash
        self._mix_hash(bytes(prologue))
        if suite.responder_key_known:  # IK's pre-message "<- s"
            if self._initiator:
                self._remote_static = key_bytes("remote_static", remote_static)
                self._remote_static_key = _from_public_bytes(self._remote_static)
                self._mix_hash(self._remote_static)
            else:
                self._mix_hash(static_key.public)

    # ------------------------------------------------------------------ state

    @property
    def pattern(self):
        return self._suite.pattern

    @property
    def cipher_name(self):
        return self._suite.cipher_name

    @property
    def initiator(self):
        return self._initiator

    @property
    def messages_done(self):
        return self._messages_done

    @property
    def complete(self):
        """True once the last message was written or read: the transport keys are ready."""
        return self._send_key is not None

    @property
    def error(self):
        """Why the state died (it raised ``HandshakeError``), or None."""
        return self._error

    @property
    def remote_static(self):
        """The peer's static public key once known (IK initiator: from the start)."""
        return self._remote_static

    @property
    def handshake_hash(self):
        return self._handshake_hash

    @property
    def send_key(self):
        return self._send_key

    @property
    def recv_key(self):
        return self._recv_key

    @property
    def send_nonce(self):
        return 0  # Split() initializes both transport cipher states with n = 0

    @property
    def recv_nonce(self):
        return 0

    # ------------------------------------------------------ symmetric state

    cdef int _mix_hash(self, bytes data) except -1:
        self._h = self._suite.hash_new(self._h + data).digest()
        return 0

    cdef bytes _hkdf(self, bytes input_key_material):
        # HKDF(ck, input_key_material, 2) of §4.3, both outputs in one: with two outputs it is
        # RFC 5869's HKDF (salt ck, empty info, 2 × HASHLEN bytes), one call instead of three HMACs.
        return _HKDF(self._suite.hkdf_hash, 2 * self._suite.hash_bytes, self._ck, None).derive(input_key_material)

    cdef int _mix_key(self, bytes input_key_material) except -1:
        # HKDF(ck, input_key_material, 2), then InitializeKey(temp_k truncated to 32 bytes).
        cdef Py_ssize_t size = self._suite.hash_bytes
        cdef bytes output = self._hkdf(input_key_material)
        self._ck = output[:size]
        self._aead = self._suite.aead_class(output[size:size + _KEY])
        self._nonce = 0
        return 0

    cdef bytes _nonce_bytes(self):
        if self._nonce < 2:
            return <bytes>self._suite.nonces[self._nonce]
        byteorder = "little" if self._suite.cipher_name == "ChaChaPoly" else "big"
        return b"\x00\x00\x00\x00" + int(self._nonce).to_bytes(8, byteorder)

    cdef bytes _encrypt_and_hash(self, bytes plaintext):
        cdef bytes ciphertext
        if self._aead is None:
            ciphertext = plaintext
        else:
            ciphertext = self._aead.encrypt(self._nonce_bytes(), plaintext, self._h)
            self._nonce += 1
        self._mix_hash(ciphertext)
        return ciphertext

    cdef bytes _decrypt_and_hash(self, bytes ciphertext):
        cdef bytes plaintext
        if self._aead is None:
            plaintext = ciphertext
        else:
            plaintext = self._aead.decrypt(self._nonce_bytes(), ciphertext, self._h)  # InvalidTag: n unchanged
            self._nonce += 1
        self._mix_hash(ciphertext)
        return plaintext

    cdef bytes _dh(self, int token):
        """DH for a DH token; ``ValueError`` for an all-zero result (a low-order point)."""
        cdef bint initiator = self._initiator
        if token == _EE:
            return self._ephemeral.exchange(self._remote_ephemeral)
        if token == _SS:
            return self._static._private_key.exchange(self._remote_static_key)
        if (token == _ES) == initiator:  # es for the initiator, se for the responder: DH(e, rs)
            return self._ephemeral.exchange(self._remote_static_key)
        return self._static._private_key.exchange(self._remote_ephemeral)  # DH(s, re)

    cdef int _set_ephemeral(self, object private) except -1:
        self._ephemeral = private
        self._ephemeral_public = private.public_key().public_bytes_raw()
        return 0

    # -------------------------------------------------------------- messages

    def write_message(self, payload=b""):
        """The next handshake message, carrying ``payload`` (encrypted once a key is mixed in)."""
        cdef Py_ssize_t index = self._check_turn(True)
        cdef bytes plain
        if type(payload) is bytes:
            plain = <bytes>payload
        elif isinstance(payload, (bytearray, memoryview)):
            plain = bytes(payload)
        else:
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        cdef Py_ssize_t overhead = self._suite.overheads[index]
        cdef Py_ssize_t size = PyBytes_GET_SIZE(plain)
        if size + overhead > _MAX_MESSAGE:
            raise ValueError(
                f"handshake payload of {size} bytes does not fit in one Noise message "
                f"(max {MAX_MESSAGE_BYTES - overhead} for {self._suite.pattern} message {index + 1})"
            )
        # The message is allocated at its final size (overhead + payload) and filled in place; it
        # is not shared with anyone until it is returned.
        cdef Py_ssize_t total = overhead + size
        cdef bytes message = PyBytes_FromStringAndSize(NULL, total)
        cdef char* out = PyBytes_AS_STRING(message)
        cdef Py_ssize_t filled = 0
        cdef int token
        try:
            for token in self._suite.tokens[index]:
                if token == _E:
                    if self._ephemeral is None:
                        self._set_ephemeral(_generate())
                    filled = _put(out, filled, total, self._ephemeral_public)
                    self._mix_hash(self._ephemeral_public)
                elif token == _S:
                    filled = _put(out, filled, total, self._encrypt_and_hash(self._static.public))
                else:
                    self._mix_key(self._dh(token))
            filled = _put(out, filled, total, self._encrypt_and_hash(plain))
        except (InvalidTag, ValueError) as exc:
            raise self._fail(self._describe(exc, index, True)) from exc
        if filled != total:
            raise RuntimeError(f"handshake message of {filled} bytes, {total} expected")  # a bug of ours
        self._advance()
        return message

    def read_message(self, message):
        """Read the peer's next handshake message; return its payload."""
        cdef Py_ssize_t index = self._check_turn(False)
        cdef bytes data
        if type(message) is bytes:
            data = <bytes>message
        elif isinstance(message, (bytearray, memoryview)):
            data = bytes(message)
        else:
            raise self._fail(f"handshake message must be bytes, got {type(message).__name__}")
        cdef Py_ssize_t length = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t overhead = self._suite.overheads[index]
        if length < overhead:
            raise self._fail(
                f"truncated {self._suite.pattern} handshake message {index + 1}: {length} bytes, "
                f"at least {overhead} required"
            )
        if length > _MAX_MESSAGE:
            raise self._fail(
                f"{self._suite.pattern} handshake message {index + 1} of {length} bytes exceeds {MAX_MESSAGE_BYTES}"
            )
        cdef const char* cursor = PyBytes_AS_STRING(data)
        cdef Py_ssize_t offset = 0
        cdef Py_ssize_t size
        cdef int token
        cdef bytes piece
        cdef bytes payload
        try:
            for token in self._suite.tokens[index]:
                if token == _E:
                    piece = PyBytes_FromStringAndSize(cursor + offset, _DH)
                    offset += _DH
                    self._remote_ephemeral = _from_public_bytes(piece)
                    self._mix_hash(piece)
                elif token == _S:
                    size = _DH + _TAG if self._aead is not None else _DH
                    piece = self._decrypt_and_hash(PyBytes_FromStringAndSize(cursor + offset, size))
                    offset += size
                    self._remote_static_key = _from_public_bytes(piece)
                    self._remote_static = piece
                else:
                    self._mix_key(self._dh(token))
            payload = self._decrypt_and_hash(PyBytes_FromStringAndSize(cursor + offset, length - offset))
        except (InvalidTag, ValueError) as exc:
            raise self._fail(self._describe(exc, index, False)) from exc
        self._advance()
        return payload

    cdef Py_ssize_t _check_turn(self, bint writing) except -1:
        """The index of the message about to be written or read, or ``HandshakeError``."""
        if self._error is not None:
            raise HandshakeError(f"handshake state is dead ({self._error})")
        if self._send_key is not None:
            verb = "write" if writing else "read"
            raise self._fail(f"cannot {verb} a handshake message: the handshake is already complete")
        cdef Py_ssize_t index = self._messages_done
        cdef bint our_turn = (index % 2 == 0) == self._initiator
        if writing and not our_turn:
            raise self._fail(
                f"wrong turn: {self._suite.pattern} handshake message {index + 1} comes from the peer; "
                "call read_message, not write_message"
            )
        if not writing and our_turn:
            raise self._fail(
                f"wrong turn: {self._suite.pattern} handshake message {index + 1} is ours to write; "
                "call write_message, not read_message"
            )
        return index

    cdef str _describe(self, object exc, Py_ssize_t index, bint writing):
        where = f"{self._suite.pattern} handshake message {index + 1} ({'write' if writing else 'read'})"
        if isinstance(exc, InvalidTag):
            return f"{where}: authentication failed (bad MAC, wrong key or tampered message)"
        # cryptography refuses an X25519 exchange whose result is all zero.
        return f"{where}: X25519 exchange refused, all-zero shared secret from a low-order public key ({exc})"

    cdef int _advance(self) except -1:
        self._messages_done += 1
        cdef bytes output, key1, key2
        cdef Py_ssize_t size
        if self._messages_done == len(self._suite.tokens):
            # Split: HKDF(ck, empty, 2), each output truncated to 32 bytes.
            size = self._suite.hash_bytes
            output = self._hkdf(_EMPTY)
            key1, key2 = output[:_KEY], output[size:size + _KEY]
            if self._initiator:
                self._send_key, self._recv_key = key1, key2
            else:
                self._send_key, self._recv_key = key2, key1
            self._handshake_hash = self._h
            self._forget_secrets()
        return 0

    cdef object _fail(self, str reason):
        """Kill the state and return the error to raise."""
        if self._error is None:
            self._error = reason
        self._send_key = self._recv_key = None
        self._forget_secrets()
        return HandshakeError(reason)

    cdef void _forget_secrets(self) noexcept:
        # The chaining key, handshake cipher and private keys are no use after the split or a failure.
        self._ck = None
        self._static = None
        self._aead = None
        self._ephemeral = None
        self._remote_ephemeral = None
        self._remote_static_key = None
