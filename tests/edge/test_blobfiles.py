"""The blob bytes store: the contract every implementation passes (chunks in any order, reads,
the digest ``finish`` returns, delete, ids), then what only the file store promises (its
layout, its refusals touching nothing outside the root, a process crash after ``finish``).
Real files in ``tmp_path``, no mocks."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from interlink.core.edge.blobfiles import BlobFileStore

CHUNK = 63 * 1024  # the largest chunk a client sends in one blob.write
BLOB_A = bytes.fromhex("00112233445566778899aabbccddeeff")
BLOB_B = bytes.fromhex("ab" * 16)
BLOB_C = bytes.fromhex("ff" * 15 + "01")


def _content(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def _chunks(content: bytes, size: int = CHUNK) -> list[tuple[int, bytes]]:
    return [(offset, content[offset:offset + size]) for offset in range(0, len(content), size)]


def _write_all(store, blob: bytes, content: bytes, size: int = CHUNK) -> None:
    for offset, data in _chunks(content, size):
        store.write(blob, offset, data)


def _file_store(tmp_path: Path) -> BlobFileStore:
    return BlobFileStore(tmp_path / "blobs")


# Every implementation of the blob bytes store. An object-store implementation (S3 API) would be
# added to this list (with its id) and must pass the same contract tests unchanged.
IMPLEMENTATIONS: list[Callable[[Path], object]] = [_file_store]


@pytest.fixture(params=IMPLEMENTATIONS, ids=["files"])
def blob_store(request, tmp_path):
    return request.param(tmp_path)


# ----------------------------------------------------------------------------- the contract


def test_chunks_in_order_read_back_and_hash(blob_store):
    content = _content(3 * CHUNK + 1000)
    _write_all(blob_store, BLOB_A, content)
    assert blob_store.read(BLOB_A, 0, len(content)) == content
    for offset, length in [(0, 1), (1, CHUNK), (CHUNK - 3, 10), (2 * CHUNK + 5, CHUNK + 700), (len(content) - 1, 1)]:
        assert blob_store.read(BLOB_A, offset, length) == content[offset:offset + length], (offset, length)
    assert blob_store.finish(BLOB_A, len(content)) == hashlib.sha256(content).digest()


def test_chunks_out_of_order_duplicated_and_overlapping(blob_store):
    content = _content(5 * CHUNK + 123, seed=1)
    chunks = _chunks(content)
    random.Random(3).shuffle(chunks)
    for offset, data in chunks + chunks[:2]:  # every chunk, then two of them again
        blob_store.write(BLOB_A, offset, data)
    # A resend cut differently: it overlaps chunk boundaries with the same bytes.
    for offset in (100, CHUNK - 50, 3 * CHUNK + 17):
        blob_store.write(BLOB_A, offset, content[offset:offset + CHUNK])
    assert blob_store.read(BLOB_A, 0, len(content) + 10) == content
    assert blob_store.finish(BLOB_A, len(content)) == hashlib.sha256(content).digest()


def test_the_last_chunk_first_then_the_rest(blob_store):
    content = _content(2 * CHUNK + 9, seed=2)
    chunks = _chunks(content)
    for offset, data in reversed(chunks):
        blob_store.write(BLOB_A, offset, data)
    assert blob_store.finish(BLOB_A, len(content)) == hashlib.sha256(content).digest()


def test_a_blob_shorter_than_its_size_does_not_match(blob_store):
    content = _content(3 * CHUNK, seed=4)
    _write_all(blob_store, BLOB_A, content[:2 * CHUNK])  # the last chunk never arrived
    digest = blob_store.finish(BLOB_A, len(content))
    assert digest != hashlib.sha256(content).digest()
    assert digest == hashlib.sha256(content[:2 * CHUNK]).digest()  # what is there, hashed


def test_a_missing_middle_chunk_does_not_match(blob_store):
    content = _content(3 * CHUNK, seed=5)
    for offset, data in _chunks(content):
        if offset != CHUNK:
            blob_store.write(BLOB_A, offset, data)
    assert blob_store.finish(BLOB_A, len(content)) != hashlib.sha256(content).digest()


def test_finish_hashes_only_the_first_size_bytes(blob_store):
    content = _content(CHUNK + 10, seed=6)
    _write_all(blob_store, BLOB_A, content)
    assert blob_store.finish(BLOB_A, 1000) == hashlib.sha256(content[:1000]).digest()
    assert blob_store.finish(BLOB_A, 0) == hashlib.sha256(b"").digest()


def test_finish_stops_at_size_past_the_first_megabyte(blob_store):
    content = _content(2 * 1024 * 1024 + 100, seed=9)
    _write_all(blob_store, BLOB_A, content)
    size = 1024 * 1024 + 5  # the last piece hashed is short: it must stop at size, not at the buffer's end
    assert blob_store.finish(BLOB_A, size) == hashlib.sha256(content[:size]).digest()


def test_finish_twice_gives_the_same_digest(blob_store):
    content = _content(CHUNK, seed=8)
    _write_all(blob_store, BLOB_A, content)
    blob_store.sync(BLOB_A)
    assert blob_store.finish(BLOB_A, len(content)) == blob_store.finish(BLOB_A, len(content))


def test_an_empty_blob(blob_store):
    blob_store.write(BLOB_A, 0, b"")
    assert blob_store.read(BLOB_A, 0, 10) == b""
    assert blob_store.finish(BLOB_A, 0) == hashlib.sha256(b"").digest()
    assert list(blob_store.ids()) == [BLOB_A]


def test_reads_at_and_past_the_end(blob_store):
    blob_store.write(BLOB_A, 0, b"0123456789")
    assert blob_store.read(BLOB_A, 6, 100) == b"6789"
    assert blob_store.read(BLOB_A, 10, 5) == b""
    assert blob_store.read(BLOB_A, 1000, 5) == b""
    assert blob_store.read(BLOB_A, 3, 0) == b""
    # A huge length is only an upper bound: the answer is what the blob holds.
    assert blob_store.read(BLOB_A, 0, 1 << 40) == b"0123456789"


def test_a_blob_never_written(blob_store):
    with pytest.raises(FileNotFoundError):
        blob_store.read(BLOB_A, 0, 10)
    with pytest.raises(FileNotFoundError):
        blob_store.finish(BLOB_A, 10)
    blob_store.sync(BLOB_A)  # nothing written, nothing to make durable
    blob_store.delete(BLOB_A)  # nothing to delete
    assert list(blob_store.ids()) == []


def test_delete(blob_store):
    blob_store.write(BLOB_A, 0, b"a" * 100)
    blob_store.write(BLOB_B, 0, b"b" * 100)
    blob_store.delete(BLOB_A)
    with pytest.raises(FileNotFoundError):
        blob_store.read(BLOB_A, 0, 10)
    assert list(blob_store.ids()) == [BLOB_B]
    blob_store.delete(BLOB_A)  # twice is fine
    assert blob_store.read(BLOB_B, 0, 100) == b"b" * 100  # the other blob is untouched
    # A deleted blob written again starts from nothing.
    blob_store.write(BLOB_A, 0, b"new")
    assert blob_store.read(BLOB_A, 0, 100) == b"new"


def test_ids_lists_exactly_the_written_blobs(blob_store):
    assert list(blob_store.ids()) == []
    written = [BLOB_A, BLOB_B, BLOB_C, bytes(16), BLOB_A[:15] + b"\x01"]  # two share a first byte
    for blob in written:
        blob_store.write(blob, 0, blob)
    listed = list(blob_store.ids())
    assert sorted(listed) == sorted(written) and len(listed) == len(written)


@pytest.mark.parametrize("bad_id", [BLOB_A[:15], BLOB_A + b"\x00", BLOB_A.hex()[:16], bytearray(BLOB_A), None, b""],
                         ids=["15-bytes", "17-bytes", "str", "bytearray", "none", "empty"])
def test_a_bad_id_is_refused(blob_store, bad_id):
    calls = [
        lambda: blob_store.write(bad_id, 0, b"x"),
        lambda: blob_store.read(bad_id, 0, 1),
        lambda: blob_store.sync(bad_id),
        lambda: blob_store.finish(bad_id, 1),
        lambda: blob_store.delete(bad_id),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="blob id"):
            call()
    assert list(blob_store.ids()) == []


def test_negative_or_non_int_offsets_lengths_and_sizes_are_refused(blob_store):
    blob_store.write(BLOB_A, 0, b"0123456789")
    with pytest.raises(ValueError, match="offset"):
        blob_store.write(BLOB_A, -1, b"x")
    with pytest.raises(ValueError, match="offset"):
        blob_store.write(BLOB_A, 1.0, b"x")
    with pytest.raises(ValueError, match="offset"):
        blob_store.read(BLOB_A, -1, 1)
    with pytest.raises(ValueError, match="length"):
        blob_store.read(BLOB_A, 0, -1)
    with pytest.raises(ValueError, match="size"):
        blob_store.finish(BLOB_A, -1)
    assert blob_store.read(BLOB_A, 0, 100) == b"0123456789"  # nothing was written by a refusal


def test_finish_on_a_worker_thread_while_another_blob_is_written(blob_store):
    first = _content(3 * 1024 * 1024 + 5, seed=10)
    second = _content(40 * CHUNK + 77, seed=11)
    _write_all(blob_store, BLOB_A, first)
    with ThreadPoolExecutor(max_workers=1) as worker:
        hashing = worker.submit(blob_store.finish, BLOB_A, len(first))
        _write_all(blob_store, BLOB_B, second)  # the event loop goes on writing meanwhile
        first_digest = hashing.result()
    assert first_digest == hashlib.sha256(first).digest()
    assert blob_store.finish(BLOB_B, len(second)) == hashlib.sha256(second).digest()
    assert blob_store.read(BLOB_B, 0, len(second)) == second


def test_a_blob_of_several_megabytes(blob_store):
    content = _content(5 * 1000 * 1000 + 3, seed=12)  # not a multiple of the 1 MiB hashing piece
    chunks = _chunks(content)
    random.Random(13).shuffle(chunks)
    for offset, data in chunks:
        blob_store.write(BLOB_C, offset, data)
    assert blob_store.finish(BLOB_C, len(content)) == hashlib.sha256(content).digest()
    middle = len(content) // 2
    assert blob_store.read(BLOB_C, middle, 3 * CHUNK) == content[middle:middle + 3 * CHUNK]


def test_free_bytes_is_a_positive_int(blob_store):
    free = blob_store.free_bytes()
    assert isinstance(free, int) and free > 0


# ----------------------------------------------------------------------------- the file store


def test_the_file_layout(tmp_path):
    root = tmp_path / "data" / "blobs"  # parents created too
    store = BlobFileStore(root)
    assert root.is_dir() and store.root == root
    store.write(BLOB_A, 0, b"hello")
    path = root / "00" / "00112233445566778899aabbccddeeff.blob"
    assert path.read_bytes() == b"hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["00", "00/" + path.name]


def test_a_new_store_over_an_existing_root_sees_its_blobs(tmp_path):
    BlobFileStore(tmp_path / "blobs").write(BLOB_B, 0, b"kept")
    again = BlobFileStore(tmp_path / "blobs")
    assert list(again.ids()) == [BLOB_B]
    assert again.read(BLOB_B, 0, 10) == b"kept"


def test_ids_ignore_what_the_store_did_not_name(tmp_path):
    root = tmp_path / "blobs"
    store = BlobFileStore(root)
    store.write(BLOB_B, 0, b"b")
    strays = [
        "ab/notablob.txt",
        "ab/" + "ab" * 16 + ".blob.tmp",
        "ab/" + "AB" * 16 + ".blob",  # upper case: not a name the store writes
        "ab/" + "ab" * 15 + ".blob",  # 15 bytes
        "ab/" + "cd" * 16 + ".blob",  # a valid name in the wrong folder: delete() would not remove it
        "zz/" + "ab" * 16 + ".blob",  # not a fan-out folder
        "AB/" + "ab" * 16 + ".blob",
        "abc/" + "ab" * 16 + ".blob",
        "00112233445566778899aabbccddeeff.blob",  # directly in the root
    ]
    for name in strays:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"stray")
    (root / "cd" / ("cd" * 16 + ".blob")).mkdir(parents=True)  # a folder with a blob's name
    assert list(store.ids()) == [BLOB_B]


def test_refusals_create_nothing_outside_the_root(tmp_path):
    root = tmp_path / "blobs"
    store = BlobFileStore(root)
    before = sorted(tmp_path.rglob("*"))
    for bad_id in (b"../../escape.....", b"/" * 15, "../../../escape", b"..\x00" * 6):
        with pytest.raises(ValueError):
            store.write(bad_id, 0, b"x")
    with pytest.raises(ValueError):
        store.write(BLOB_A, -5, b"x")
    assert sorted(tmp_path.rglob("*")) == before == [root]
    # A valid id made of path characters is only ever spelled in hex: it stays inside the root.
    store.write(b"../../../../etc/", 0, b"x")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "blobs", "blobs/2e", "blobs/2e/" + b"../../../../etc/".hex() + ".blob"]


def test_a_process_killed_after_finish_leaves_the_blob_whole(tmp_path):
    """What a crashed gateway leaves: the child writes a blob in shuffled chunks, finishes it and
    is killed with SIGKILL (no cleanup runs). A new store in this process finds every byte.
    (A process crash keeps the page cache; a power loss is what the fsyncs are for and cannot
    be simulated here.)"""
    root = tmp_path / "blobs"
    size = 700 * 1000 + 11
    child = textwrap.dedent(f"""
        import os, random, signal, sys
        from interlink.core.edge.blobfiles import BlobFileStore

        content = random.Random(21).randbytes({size})
        chunks = [(o, content[o:o + {CHUNK}]) for o in range(0, len(content), {CHUNK})]
        random.Random(22).shuffle(chunks)
        store = BlobFileStore({str(root)!r})
        for offset, data in chunks:
            store.write({BLOB_A!r}, offset, data)
        digest = store.finish({BLOB_A!r}, len(content))
        print(digest.hex())
        print("done", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        print("survived", flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    lines = result.stdout.split()
    assert lines[-1] == "done", result.stdout
    content = random.Random(21).randbytes(size)
    expected = hashlib.sha256(content).digest()
    assert bytes.fromhex(lines[0]) == expected

    store = BlobFileStore(root)
    assert list(store.ids()) == [BLOB_A]
    assert store.read(BLOB_A, 0, size + 1) == content
    assert store.finish(BLOB_A, size) == expected


def test_free_files_is_a_positive_int(blob_store):
    free = blob_store.free_files()
    assert type(free) is int and free > 0


def test_free_files_are_the_file_systems_inodes(tmp_path):
    store = BlobFileStore(tmp_path / "blobs")
    if os.statvfs(tmp_path).f_files == 0:  # no fixed number of inodes: unbounded
        assert store.free_files() == sys.maxsize
        return
    before = store.free_files()
    for _ in range(3):
        store.write(os.urandom(16), 0, b"x")
    assert store.free_files() < before  # each blob is a file (a new fan-out folder one more)
