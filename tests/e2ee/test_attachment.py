"""Attachments offline (``interlink.e2ee.attachment``, docs/e2ee.md §8): the chunked AES-256-GCM
format round trip for sizes around the chunk boundaries and from every kind of source; reads of
the ciphertext at any offset; and every way the ciphertext can be altered, cut, extended,
reordered or opened with the wrong key ends in ``E2EEError`` before any plaintext of the bad
chunk is given out."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interlink.e2ee import Attachment, AttachmentPointer, Decryptor, E2EEError
from interlink.e2ee.attachment import CHUNK_BYTES, TAG_BYTES, ciphertext_size

SIZES = [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES, 3 * CHUNK_BYTES + 17]


def ciphertext_of(attachment: Attachment) -> bytes:
    return attachment.read(0, attachment.size)


def uploaded(attachment: Attachment) -> AttachmentPointer:
    attachment.blob = os.urandom(16)
    return attachment.pointer()


def open_all(pointer: AttachmentPointer, ciphertext: bytes, piece: int = 10_000) -> bytes:
    out = []
    decryptor = Decryptor(pointer, out.append)
    for start in range(0, len(ciphertext), piece):
        decryptor.write(ciphertext[start:start + piece])
    decryptor.finish()
    return b"".join(out)


@pytest.mark.parametrize("size", SIZES)
def test_every_size_round_trips_and_the_digest_is_the_ciphertexts(size):
    data = os.urandom(size)
    attachment = Attachment(data, content_type="image/jpeg", name="cat.jpg")
    ciphertext = ciphertext_of(attachment)
    assert len(ciphertext) == attachment.size == ciphertext_size(size) == size + TAG_BYTES * max(1, -(-size // CHUNK_BYTES))
    assert hashlib.sha256(ciphertext).digest() == attachment.sha256
    if size >= 16:  # a short run of random bytes may appear in any ciphertext by chance
        assert data[:16] not in ciphertext
    pointer = uploaded(attachment)
    assert (pointer.size, pointer.content_type, pointer.name) == (size, "image/jpeg", "cat.jpg")
    assert open_all(pointer, ciphertext) == data
    if size <= CHUNK_BYTES + 1:  # byte by byte as well (the larger sizes would take seconds)
        assert open_all(pointer, ciphertext, piece=1) == data


def test_paths_and_files_give_the_same_ciphertext_as_bytes(tmp_path):
    data = os.urandom(2 * CHUNK_BYTES + 5)
    key = os.urandom(32)
    path = tmp_path / "voice.ogg"
    path.write_bytes(data)
    made = [Attachment(data, key=key), Attachment(path, key=key), Attachment(io.BytesIO(data), key=key)]
    assert len({ciphertext_of(a) for a in made}) == 1
    assert len({a.sha256 for a in made}) == 1


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3 * CHUNK_BYTES + 200), st.integers(0, 70_000))
def test_reads_at_any_offset_are_slices_of_the_ciphertext(offset, length):
    attachment = Attachment(bytes(range(256)) * 800, key=bytes(32))  # 204,800 bytes: four chunks
    whole = ciphertext_of(attachment)
    assert attachment.read(offset, length) == whole[offset:offset + length]


def test_a_fresh_key_every_time():
    data = b"same file" * 100
    first, second = Attachment(data), Attachment(data)
    assert first.key != second.key and ciphertext_of(first) != ciphertext_of(second)


@pytest.mark.parametrize("damage", ["flip", "cut_last", "cut_chunk", "extend", "swap", "drop_chunk", "wrong_key",
                                    "wrong_digest"])
def test_altered_ciphertext_is_refused(damage):
    data = os.urandom(3 * CHUNK_BYTES + 100)
    attachment = Attachment(data)
    pointer = uploaded(attachment)
    ciphertext = bytearray(ciphertext_of(attachment))
    sealed = CHUNK_BYTES + TAG_BYTES
    if damage == "flip":
        ciphertext[sealed + 5] ^= 1
    elif damage == "cut_last":
        ciphertext = ciphertext[:-1]
    elif damage == "cut_chunk":  # exactly the first three chunks: the last-chunk flag is missing
        ciphertext = ciphertext[:3 * sealed]
        pointer = AttachmentPointer(pointer.blob, pointer.key, hashlib.sha256(ciphertext).digest(), 3 * CHUNK_BYTES,
                                    pointer.content_type)
    elif damage == "extend":
        ciphertext += b"\x00"
    elif damage == "swap":
        ciphertext[:sealed], ciphertext[sealed:2 * sealed] = ciphertext[sealed:2 * sealed], ciphertext[:sealed]
    elif damage == "drop_chunk":
        del ciphertext[sealed:2 * sealed]
    elif damage == "wrong_key":
        pointer = AttachmentPointer(pointer.blob, os.urandom(32), pointer.sha256, pointer.size, pointer.content_type)
    elif damage == "wrong_digest":
        pointer = AttachmentPointer(pointer.blob, pointer.key, bytes(32), pointer.size, pointer.content_type)
    out = []
    with pytest.raises(E2EEError):
        decryptor = Decryptor(pointer, out.append)
        decryptor.write(bytes(ciphertext))
        decryptor.finish()
    if damage == "flip":
        assert out == [data[:CHUNK_BYTES]]  # only the chunk before the altered one was given out


def test_pointer_payload_round_trip_and_malformed_pointers():
    pointer = uploaded(Attachment(b"x", content_type="audio/ogg", name="note.ogg"))
    assert AttachmentPointer.from_payload(pointer.to_payload()) == pointer
    good = pointer.to_payload()
    for field, bad in [("blob", b"short"), ("key", b"k" * 31), ("sha256", "hex"), ("size", -1), ("size", "9"),
                       ("type", 5), ("type", "t" * 128), ("name", b"name"), ("name", "n" * 256)]:
        with pytest.raises(E2EEError):
            AttachmentPointer.from_payload({**good, field: bad})
    with pytest.raises(E2EEError):
        AttachmentPointer.from_payload({})


def test_bad_sources_and_labels_are_refused():
    with pytest.raises(TypeError):
        Attachment(12345)
    with pytest.raises(ValueError):
        Attachment(b"x", content_type="")
    with pytest.raises(ValueError):
        Attachment(b"x", name="n" * 300)
    with pytest.raises(E2EEError):
        Attachment(b"x").pointer()  # not uploaded yet


@pytest.mark.parametrize("change", ["shrink", "grow", "same_size"])
def test_a_file_changed_after_the_attachment_was_made_is_refused_not_sealed_again(tmp_path, change):
    path = tmp_path / "doc.bin"
    data = os.urandom(2 * CHUNK_BYTES + 100)
    path.write_bytes(data)
    attachment = Attachment(path)
    first_chunk = attachment.read(0, 1000)
    if change == "shrink":
        path.write_bytes(data[:CHUNK_BYTES + 10])
    elif change == "grow":
        path.write_bytes(data + b"more")
    else:  # same size, other bytes: sealing them under the same key and nonce would leak both
        path.write_bytes(data[:CHUNK_BYTES] + os.urandom(CHUNK_BYTES) + data[2 * CHUNK_BYTES:])
    assert attachment.read(0, 1000) == first_chunk  # an unchanged chunk is still served
    with pytest.raises(E2EEError, match="changed"):
        attachment.read(CHUNK_BYTES + TAG_BYTES, attachment.size)  # the rest: a changed chunk in it
