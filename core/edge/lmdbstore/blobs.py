"""Blob metadata: tables ``blobs`` (id -> record), ``blob_expiry`` (expiry time + id, for the
sweep) and ``blob_uploads`` (owner + id of each unfinished upload, to count a user's open ones).

The bytes are not here: they are files (``interlink.core.edge.blobfiles``), written and synced
before a record says ``ready``. A record's ``ranges`` are the parts of an unfinished upload known
to be on disk (synced before they were saved), so an upload resumes from them after a restart.
The totals (uploads, ready blobs and their bytes) live under one key of ``blobs`` and change in
the same transaction as the records, so ``/metrics`` reads them without a scan.
"""

from __future__ import annotations

import struct

import lmdb
import msgpack

from interlink.core.domain.blobs import BlobRecord
from interlink.core.edge.lmdbstore.env import scan, user_prefix, write_txn

_EXPIRES = struct.Struct(">Q")  # ms, before the id in blob_expiry keys: the sweep reads in time order
_TOTALS_KEY = b"#totals"  # ids are 16 bytes, so no id is this key
_TOTALS = struct.Struct(">QQQ")  # uploads, ready blobs, bytes of the ready blobs


def _pack(record: BlobRecord) -> bytes:
    return msgpack.packb(
        [record.owner, record.size, record.sha256, record.created_ms, record.expires_ms, record.ready, record.ranges],
        use_bin_type=True,
    )


def _unpack(raw: bytes) -> BlobRecord:
    owner, size, sha256, created_ms, expires_ms, ready, ranges = msgpack.unpackb(raw, raw=False)
    return BlobRecord(owner, size, sha256, created_ms, expires_ms, ready, ranges)


class BlobRecords:
    """What is known of each blob, and the indexes the limits and the sweep read."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.blobs_db = env.open_db(b"blobs")
        self.expiry_db = env.open_db(b"blob_expiry")
        self.uploads_db = env.open_db(b"blob_uploads")

    def blob(self, blob: bytes) -> BlobRecord | None:
        with self.env.begin(db=self.blobs_db) as txn:
            raw = txn.get(blob)
        return _unpack(raw) if raw is not None else None

    def create_blob(self, blob: bytes, record: BlobRecord, max_uploads: int) -> bool:
        """Store a new upload's record; False (nothing written) when its owner already has
        ``max_uploads`` unfinished uploads."""
        owner = user_prefix(record.owner)
        with self.env.begin(db=self.uploads_db) as txn:  # refused without a write transaction
            if sum(1 for _ in scan(txn.cursor(), owner, limit=max_uploads)) >= max_uploads:
                return False
        with write_txn(self.env) as txn:
            open_uploads = sum(1 for _ in scan(txn.cursor(db=self.uploads_db), owner, limit=max_uploads))
            if open_uploads >= max_uploads:  # the same user's other device, in between
                return False
            if not txn.put(blob, _pack(record), overwrite=False, db=self.blobs_db):
                raise ValueError("blob id already in use")  # 128 random bits: never, unless the generator broke
            txn.put(_EXPIRES.pack(record.expires_ms) + blob, b"", db=self.expiry_db)
            txn.put(owner + blob, b"", db=self.uploads_db)
            self._add_totals(txn, uploads=1)
        return True

    def unfinished_blobs(self, owner: str, limit: int) -> list[bytes]:
        """Ids of up to ``limit`` of ``owner``'s unfinished uploads."""
        prefix = user_prefix(owner)
        with self.env.begin(db=self.uploads_db) as txn:
            return [key[len(prefix):] for key in scan(txn.cursor(), prefix, limit=limit)]

    def save_blob_ranges(self, blob: bytes, ranges: bytes) -> bool:
        """Record the synced parts of an unfinished upload; False if it is gone or ready."""
        with write_txn(self.env) as txn:
            record = self._unfinished(txn, blob)
            if record is None:
                return False
            record.ranges = ranges
            txn.put(blob, _pack(record), db=self.blobs_db)
        return True

    def mark_blob_ready(self, blob: bytes, expires_ms: int, now_ms: int) -> bool:
        """The upload is complete, synced and its hash matched: from now on it is served, until
        ``expires_ms``. False if it is gone, its time ran out at ``now_ms`` while it was hashed
        (the sweep deletes it), or it is already ready."""
        with write_txn(self.env) as txn:
            record = self._unfinished(txn, blob)
            if record is None or record.expires_ms <= now_ms:
                return False
            txn.delete(_EXPIRES.pack(record.expires_ms) + blob, db=self.expiry_db)
            txn.delete(user_prefix(record.owner) + blob, db=self.uploads_db)
            record.ready, record.ranges, record.expires_ms = True, b"", expires_ms
            txn.put(blob, _pack(record), db=self.blobs_db)
            txn.put(_EXPIRES.pack(expires_ms) + blob, b"", db=self.expiry_db)
            self._add_totals(txn, uploads=-1, ready=1, ready_bytes=record.size)
        return True

    def expired_blobs(self, before_ms: int, limit: int) -> list[bytes]:
        """Ids of up to ``limit`` blobs (ready or not) whose time ran out before ``before_ms``."""
        found = []
        with self.env.begin(db=self.expiry_db) as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                if _EXPIRES.unpack_from(key)[0] >= before_ms or len(found) >= limit:
                    break
                found.append(key[_EXPIRES.size:])
        return found

    def delete_blobs(self, blobs) -> int:
        """Forget these blobs' records (the caller deletes their bytes after); returns how many existed."""
        deleted = 0
        with write_txn(self.env) as txn:
            for blob in blobs:
                raw = txn.pop(blob, db=self.blobs_db)
                if raw is None:
                    continue
                record = _unpack(raw)
                txn.delete(_EXPIRES.pack(record.expires_ms) + blob, db=self.expiry_db)
                if record.ready:
                    self._add_totals(txn, ready=-1, ready_bytes=-record.size)
                else:
                    txn.delete(user_prefix(record.owner) + blob, db=self.uploads_db)
                    self._add_totals(txn, uploads=-1)
                deleted += 1
        return deleted

    def blob_usage(self) -> dict:
        with self.env.begin(db=self.blobs_db) as txn:
            raw = txn.get(_TOTALS_KEY)
        uploads, ready, ready_bytes = _TOTALS.unpack(raw) if raw is not None else (0, 0, 0)
        return {"blob_uploads": uploads, "blobs_ready": ready, "blob_bytes": ready_bytes}

    def recount(self, txn) -> None:
        """Count the totals again from the records (blobs were moved in or out: a node list change)."""
        uploads = ready = ready_bytes = 0
        for key, raw in txn.cursor(db=self.blobs_db).iternext():
            if key == _TOTALS_KEY:
                continue
            record = _unpack(raw)
            if record.ready:
                ready += 1
                ready_bytes += record.size
            else:
                uploads += 1
        txn.put(_TOTALS_KEY, _TOTALS.pack(uploads, ready, ready_bytes), db=self.blobs_db)

    def _unfinished(self, txn, blob: bytes) -> BlobRecord | None:
        """The record of ``blob`` if it is an unfinished upload (None: gone or ready)."""
        raw = txn.get(blob, db=self.blobs_db)
        if raw is None:
            return None
        record = _unpack(raw)
        return None if record.ready else record

    def _add_totals(self, txn, *, uploads: int = 0, ready: int = 0, ready_bytes: int = 0) -> None:
        raw = txn.get(_TOTALS_KEY, db=self.blobs_db)
        totals = _TOTALS.unpack(raw) if raw is not None else (0, 0, 0)
        txn.put(_TOTALS_KEY, _TOTALS.pack(totals[0] + uploads, totals[1] + ready, totals[2] + ready_bytes), db=self.blobs_db)
