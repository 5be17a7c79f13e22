"""The blob records of the store (``blobs``, ``blob_expiry``, ``blob_uploads``) on a real LMDB
environment in a temporary folder: the record's life from upload to ready to deleted, the open
uploads bound, the expiry order the sweep reads, the totals, and durability across a reopen."""

from __future__ import annotations

import os

import pytest

from interlink.core.domain.blobs import BlobRecord
from interlink.testing import lmdb_store


def record(owner: str = "alice@alpha", size: int = 1000, expires_ms: int = 5_000, **fields) -> BlobRecord:
    values = {"sha256": b"h" * 32, "created_ms": 1_000, "ready": False, "ranges": b""}
    return BlobRecord(owner, size, expires_ms=expires_ms, **{**values, **fields})


@pytest.fixture
def store(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    yield store
    store.close()


def test_an_upload_becomes_ready_then_is_deleted(store):
    blob = os.urandom(16)
    assert store.blob(blob) is None
    assert store.create_blob(blob, record(), max_uploads=4)
    assert store.blob(blob) == record()
    assert store.blob_usage() == {"blob_uploads": 1, "blobs_ready": 0, "blob_bytes": 0}
    assert store.save_blob_ranges(blob, b"r" * 16)
    assert store.blob(blob).ranges == b"r" * 16
    assert store.mark_blob_ready(blob, expires_ms=9_000, now_ms=2_000)
    assert store.blob(blob) == record(ready=True, expires_ms=9_000)  # its ranges are no longer needed
    assert store.blob_usage() == {"blob_uploads": 0, "blobs_ready": 1, "blob_bytes": 1000}
    assert not store.mark_blob_ready(blob, expires_ms=10_000, now_ms=2_000)  # once
    assert not store.save_blob_ranges(blob, b"")  # a ready blob's record does not change
    assert store.delete_blobs([blob, os.urandom(16)]) == 1
    assert store.blob(blob) is None
    assert store.blob_usage() == {"blob_uploads": 0, "blobs_ready": 0, "blob_bytes": 0}
    assert not store.save_blob_ranges(blob, b"") and not store.mark_blob_ready(blob, 1, 0)


def test_an_upload_whose_time_ran_out_while_it_was_hashed_is_not_made_ready(store):
    blob = os.urandom(16)
    store.create_blob(blob, record(expires_ms=5_000), max_uploads=4)
    assert not store.mark_blob_ready(blob, expires_ms=99_000, now_ms=5_000)
    assert store.blob(blob).ready is False  # the sweep deletes it
    assert store.mark_blob_ready(blob, expires_ms=99_000, now_ms=4_999)


def test_a_user_has_at_most_max_uploads_unfinished(store):
    blobs = [os.urandom(16) for _ in range(3)]
    assert store.create_blob(blobs[0], record(), max_uploads=2)
    assert store.create_blob(blobs[1], record(), max_uploads=2)
    assert not store.create_blob(blobs[2], record(), max_uploads=2)
    assert store.blob(blobs[2]) is None  # nothing written
    assert store.create_blob(blobs[2], record("bob@beta"), max_uploads=2)  # another user
    assert sorted(store.unfinished_blobs("alice@alpha", 10)) == sorted(blobs[:2])
    assert store.unfinished_blobs("bob@beta", 10) == [blobs[2]]
    assert len(store.unfinished_blobs("alice@alpha", 1)) == 1
    assert store.unfinished_blobs("alice@alph", 10) == []  # a user's prefix is not another's
    store.mark_blob_ready(blobs[0], 9_000, 2_000)  # a finished upload no longer counts
    assert store.unfinished_blobs("alice@alpha", 10) == [blobs[1]]
    assert store.create_blob(os.urandom(16), record(), max_uploads=2)


def test_an_id_is_never_reused(store):
    blob = os.urandom(16)
    store.create_blob(blob, record(), max_uploads=4)
    with pytest.raises(ValueError):
        store.create_blob(blob, record("bob@beta"), max_uploads=4)
    assert store.blob(blob).owner == "alice@alpha"


def test_expired_blobs_come_oldest_first_and_ready_ones_by_their_new_expiry(store):
    early, late, finished = os.urandom(16), os.urandom(16), os.urandom(16)
    store.create_blob(late, record(expires_ms=3_000), max_uploads=9)
    store.create_blob(early, record(expires_ms=2_000), max_uploads=9)
    store.create_blob(finished, record(expires_ms=1_000), max_uploads=9)
    store.mark_blob_ready(finished, expires_ms=50_000, now_ms=500)
    assert store.expired_blobs(before_ms=2_000, limit=10) == []
    assert store.expired_blobs(before_ms=2_001, limit=10) == [early]
    assert store.expired_blobs(before_ms=60_000, limit=10) == [early, late, finished]
    assert store.expired_blobs(before_ms=60_000, limit=2) == [early, late]
    store.delete_blobs([early, late])
    assert store.expired_blobs(before_ms=60_000, limit=10) == [finished]


def test_records_survive_a_reopen(tmp_path):
    blob = os.urandom(16)
    first = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    first.create_blob(blob, record(), max_uploads=4)
    first.save_blob_ranges(blob, b"x" * 16)
    first.close()
    again = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    assert again.blob(blob).ranges == b"x" * 16
    assert again.blob_usage()["blob_uploads"] == 1
    again.close()
