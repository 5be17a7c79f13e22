"""Attachments (docs/e2ee.md §8): a file encrypted with a fresh key, in chunks, for upload as a blob.

A file is cut into chunks of ``CHUNK_BYTES`` (64 KiB) of plaintext; chunk ``i`` of ``n`` is
sealed with AES-256-GCM under the attachment's own random 32-byte key, with the 12-byte nonce
``i`` (11 bytes, big-endian) followed by 1 for the last chunk and 0 for the others, and
``AAD``. The blob is the chunks' ciphertexts one after another (``size + 16 n`` bytes; an empty
file is one empty last chunk). The key never repeats, so neither does a (key, nonce) pair; the
index in the nonce stops chunks from being reordered, the last-chunk flag stops a blob from
being cut short or extended, and each chunk is checked before any of its plaintext is given out.
The SHA-256 of the whole ciphertext goes in the pointer (and, as the blob's declared hash, to
the gateway, which refuses other bytes).

``Attachment`` encrypts on demand: hashing the ciphertext is one pass over the file, and the
upload encrypts each chunk again as it is read (AES-GCM is deterministic for a key and nonce),
so no ciphertext copy of the file is ever stored or held whole in memory. ``Decryptor`` takes
the ciphertext in pieces of any size and writes plaintext out chunk by chunk.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from interlink.e2ee.envelope import is_bin
from interlink.e2ee.errors import E2EEError

CHUNK_BYTES = 64 * 1024  # plaintext per sealed chunk
TAG_BYTES = 16
KEY_BYTES = 32
AAD = b"interlink attachment v1"
MAX_NAME_CHARS = 255
MAX_TYPE_CHARS = 127


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def chunk_count(size: int) -> int:
    """Sealed chunks of a file of ``size`` bytes (an empty file has one, empty)."""
    return max(1, -(-size // CHUNK_BYTES))


def ciphertext_size(size: int) -> int:
    return size + TAG_BYTES * chunk_count(size)


@dataclass(frozen=True)
class AttachmentPointer:
    """What a message carries so its receiver can fetch and open the attachment: the blob's id,
    the key, the SHA-256 of the blob (the ciphertext), the plaintext's size, its media type and
    (optionally) its file name."""

    blob: bytes
    key: bytes
    sha256: bytes
    size: int
    content_type: str
    name: str | None = None

    def to_payload(self) -> dict:
        payload = {"blob": self.blob, "key": self.key, "sha256": self.sha256, "size": self.size, "type": self.content_type}
        if self.name is not None:
            payload["name"] = self.name
        return payload

    @classmethod
    def from_payload(cls, payload: dict) -> AttachmentPointer:
        """The pointer in a received payload; ``E2EEError`` if any field is malformed."""
        blob, key, sha256, size = payload.get("blob"), payload.get("key"), payload.get("sha256"), payload.get("size")
        content_type, name = payload.get("type"), payload.get("name")
        if not (is_bin(blob, 16) and is_bin(key, KEY_BYTES) and is_bin(sha256, 32) and type(size) is int
                and 0 <= size < 1 << 48 and type(content_type) is str and 0 < len(content_type) <= MAX_TYPE_CHARS
                and (name is None or (type(name) is str and len(name) <= MAX_NAME_CHARS))):
            raise E2EEError("malformed attachment pointer")
        return cls(blob, key, sha256, size, content_type, name)


class Attachment:
    """A file (bytes, a path, or a seekable binary file) ready to upload encrypted: ``size`` and
    ``sha256`` are the ciphertext's, ``read(offset, length)`` gives ciphertext bytes (the SDK's
    ``Client.upload_blob`` reads it like a file). ``blob`` is set once an upload started, so
    uploading the same object again resumes it. A file that changes after the attachment was
    made is refused (``E2EEError``) rather than sealed again under the same key and nonces; after
    ``bad_hash``, make a new ``Attachment``."""

    def __init__(self, source, *, content_type: str = "application/octet-stream", name: str | None = None,
                 key: bytes | None = None) -> None:
        # ``key``: for tests (a known ciphertext) only. A key must never seal two different files.
        if type(content_type) is not str or not content_type or len(content_type) > MAX_TYPE_CHARS:
            raise ValueError(f"content_type must be a media type of 1..{MAX_TYPE_CHARS} characters")
        if name is not None and (type(name) is not str or len(name) > MAX_NAME_CHARS):
            raise ValueError(f"name must be at most {MAX_NAME_CHARS} characters")
        self.content_type, self.name = content_type, name
        self.key = key if key is not None else os.urandom(KEY_BYTES)
        self._aead = AESGCM(self.key)
        self._bytes: bytes | None = None
        self._path = None
        self._file = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._bytes = bytes(source)
            self.plaintext_size = len(self._bytes)
        elif isinstance(source, (str, os.PathLike)):
            self._path = os.fspath(source)
            self.plaintext_size = os.path.getsize(self._path)
        elif hasattr(source, "read") and hasattr(source, "seek"):
            self._file = source
            self.plaintext_size = source.seek(0, os.SEEK_END)
        else:
            raise TypeError(f"an attachment is bytes, a path or a seekable binary file, not {type(source).__name__}")
        self.chunks = chunk_count(self.plaintext_size)
        self.size = ciphertext_size(self.plaintext_size)
        self.blob: bytes | None = None
        self._cached: dict[int, bytes] = {}  # the last chunks sealed for read(), by index
        # Each chunk's plaintext digest, for a file read again at upload time: sealing other
        # bytes under the same key and nonce would give the gateway the XOR of two plaintexts.
        self._chunk_digests: list[bytes] | None = None if self._bytes is not None else []
        digest = hashlib.sha256()
        for index in range(self.chunks):
            digest.update(self._sealed(index))
        self.sha256 = digest.digest()

    def pointer(self) -> AttachmentPointer:
        if self.blob is None:
            raise E2EEError("the attachment is not uploaded yet")
        return AttachmentPointer(self.blob, self.key, self.sha256, self.plaintext_size, self.content_type, self.name)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the ciphertext from ``offset`` (fewer at its end)."""
        sealed_bytes = CHUNK_BYTES + TAG_BYTES
        parts = []
        end = min(offset + length, self.size)
        while offset < end:
            index, within = divmod(offset, sealed_bytes)
            sealed = self._sealed_cached(index)
            part = sealed[within:within + end - offset]
            parts.append(part)
            offset += len(part)
        return b"".join(parts)

    def _sealed_cached(self, index: int) -> bytes:
        # The upload's reads (65,263 bytes) straddle sealed chunks (65,552): keep the last two.
        cached = self._cached
        if index in cached:
            return cached[index]
        sealed = self._sealed(index)
        if len(cached) >= 2:
            del cached[min(cached)]
        cached[index] = sealed
        return sealed

    def _sealed(self, index: int) -> bytes:
        last = index == self.chunks - 1
        plaintext = self._plaintext(index)
        if len(plaintext) != min(CHUNK_BYTES, self.plaintext_size - index * CHUNK_BYTES):
            raise E2EEError("the file changed size since the attachment was made; make a new Attachment")
        digests = self._chunk_digests
        if digests is not None:
            digest = hashlib.sha256(plaintext).digest()
            if index == len(digests):
                digests.append(digest)  # the first pass
            elif digests[index] != digest:
                raise E2EEError("the file changed since the attachment was made; make a new Attachment")
        return self._aead.encrypt(_nonce(index, last), plaintext, AAD)

    def _plaintext(self, index: int) -> bytes:
        start = index * CHUNK_BYTES
        if self._bytes is not None:
            return self._bytes[start:start + CHUNK_BYTES]
        if self._path is not None:
            with open(self._path, "rb") as file:
                file.seek(start)
                return file.read(CHUNK_BYTES)
        self._file.seek(start)
        return self._file.read(CHUNK_BYTES)


class Decryptor:
    """Opens an attachment's ciphertext as it arrives, in pieces of any size: ``write(piece)``
    hands each whole chunk's plaintext to ``out`` (a callable) once its tag held; ``finish()``
    checks that the last chunk came and the SHA-256 of the whole matched. Any failure raises
    ``E2EEError`` — nothing of a chunk is given out before its check."""

    def __init__(self, pointer: AttachmentPointer, out) -> None:
        self.pointer = pointer
        self.out = out
        self._aead = AESGCM(pointer.key)
        self._chunks = chunk_count(pointer.size)
        self._expected = ciphertext_size(pointer.size)
        self._buffer = bytearray()
        self._index = 0
        self._received = 0
        self._digest = hashlib.sha256()
        self.plaintext_bytes = 0

    def write(self, piece: bytes) -> None:
        self._received += len(piece)
        if self._received > self._expected:
            raise E2EEError("the attachment's blob is longer than its pointer says")
        self._digest.update(piece)
        self._buffer += piece
        sealed_bytes = CHUNK_BYTES + TAG_BYTES
        while len(self._buffer) >= sealed_bytes and self._index < self._chunks - 1:
            self._open(bytes(self._buffer[:sealed_bytes]))
            del self._buffer[:sealed_bytes]

    def finish(self) -> None:
        if self._received != self._expected or self._index != self._chunks - 1:
            raise E2EEError("the attachment's blob is shorter than its pointer says")
        self._open(bytes(self._buffer))
        self._buffer.clear()
        if self._digest.digest() != self.pointer.sha256:
            raise E2EEError("the attachment's blob does not match the digest in its pointer")

    def _open(self, sealed: bytes) -> None:
        last = self._index == self._chunks - 1
        try:
            plaintext = self._aead.decrypt(_nonce(self._index, last), sealed, AAD)
        except InvalidTag:
            raise E2EEError(f"chunk {self._index} of the attachment failed its check (wrong key or altered bytes)") from None
        self._index += 1
        self.plaintext_bytes += len(plaintext)
        self.out(plaintext)
