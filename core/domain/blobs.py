"""Blobs (docs/protocol.md §7, "Blobs"): the ``blob.new``/``blob.write``/``blob.read`` operations.

A blob is ciphertext the gateway cannot read (an attachment, encrypted by the sender with a key
that travels inside an end-to-end-encrypted message). Its 128-bit random id is the capability:
anyone who knows it may read a ready blob; only its owner (the user who made it) may write it.

An upload declares its size and SHA-256, then takes chunks at any offset, in any order, again if
need be. What arrived is tracked in memory (``ByteRanges``); every ``CHECKPOINT_BYTES`` the bytes
are synced to disk on a worker thread and only then the ranges saved in the record, so after a
crash an upload resumes from what is really on disk. When every byte is there, the whole blob is
synced and hashed on a worker thread (``Offload``); the record says ``ready`` only after the hash
matched, so a ready blob is never wrong. A wrong hash (``bad_hash``) clears the ranges: the
upload starts over under the same id.

``blob.read`` of an id that is unknown, expired, still uploading or not the owner's to write
all take the same path and get the same ``not_found``: nothing tells an existing id from a
missing one. Each operation is charged in KiB to the user's blob bucket (``rate_limited``).
"""

from __future__ import annotations

import errno
import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from interlink.core.domain.fields import kind_of
from interlink.core.domain.ops import DEFERRED
from interlink.core.domain.ranges import ByteRanges
from interlink.core.domain.ratelimit import TokenBuckets
from interlink.core.errors import InterlinkError, RouteError, StanzaError

if TYPE_CHECKING:
    from interlink.core.domain.ports import BlobFiles, BlobStore, Offload
    from interlink.core.domain.router import Router, Session

log = logging.getLogger("interlink.blobs")

BLOB_ID_BYTES = 16
SHA256_BYTES = 32
# What a blob.write or blob.read stanza holds besides its data (t, id, op, blob, off, len or the
# answer's size): the largest chunk is the frame less this and the tag (docs/protocol.md §7).
CHUNK_ENVELOPE_BYTES = 256
CHECKPOINT_BYTES = 8 * 1024 * 1024  # received bytes between syncs of an unfinished upload that save its ranges
FLUSH_BYTES = 1024 * 1024  # received bytes between syncs that only push them to the disk
MAX_UPLOAD_RANGES = 256  # separate received ranges an upload may have (bounds its record)
WRITES_IN_FLIGHT = 16  # announced: blob.write stanzas a client may send before the first answer
IDLE_UPLOAD_S = 600.0  # an upload nobody wrote to for this long leaves memory (its record stays)
EXPIRE_CHUNK = 1_000  # blobs deleted per sweep step
# What one blob.new costs at the least, whatever its size: against the daily allowance (so one
# user makes at most allowance / 1 MiB blobs a day: each is a file and an LMDB record) and, in KiB,
# against the traffic bucket.
MIN_BLOB_CHARGE_BYTES = 1 << 20
NEW_BLOB_TOKENS = 64  # KiB of the bucket a blob.new spends
MAX_PENDING_WRITES = 2 * WRITES_IN_FLIGHT  # chunks of one upload on the writer thread; more: rate_limited
MAX_PENDING_WRITE_BYTES = 16 << 20  # chunk bytes on the writer thread, all uploads: bounds the gateway's memory
MAX_WAITING = 64  # writes of one upload answered with its verdict; more while it is hashed: rate_limited
MAX_OPEN_UPLOADS_SCANNED = 1024  # an owner's unfinished uploads looked at for the quietest (more: after a lower limit)
MIN_FREE_FILES = 10_000  # free inodes under which blob.new is refused (overloaded)
MAP_FULL_FRACTION = 0.9  # LMDB map use over which blob.new is refused: messages keep their room
KIB = 1024
DAY_S = 86_400.0


@dataclass(slots=True)
class BlobRecord:
    """What the store keeps of a blob (its bytes are in ``BlobFiles``)."""

    owner: str
    size: int
    sha256: bytes
    created_ms: int
    expires_ms: int
    ready: bool
    ranges: bytes  # ByteRanges.pack() of the synced parts of an unfinished upload


@dataclass(slots=True)
class BlobLimits:
    """The configuration keys of the same names (bindings/config.py has their defaults and units)."""

    blob_max_bytes: int
    blob_open_uploads_per_user: int
    blob_daily_bytes_per_user: int
    blob_min_free_bytes: int
    blob_kib_per_s_per_user: int
    blob_ttl_s: float
    blob_upload_ttl_s: float


@dataclass(slots=True, eq=False)
class _Upload:
    """An unfinished upload being written (kept in memory between its writes)."""

    owner: str
    size: int
    sha256: bytes
    expires_ms: int
    ranges: ByteRanges
    unsynced: int = 0  # bytes received since the ranges were last saved
    unflushed: int = 0  # bytes received since they were last pushed to the disk
    generation: int = 0  # counts the starts over (bad_hash): a checkpoint of an earlier one is void
    syncing: bool = False  # a checkpoint is on a worker thread
    flushing: bool = False  # a flush is on a worker thread
    pending: int = 0  # chunks on the writer thread (not yet in ``ranges``)
    verifying: bool = False  # the final sync and hash are on a worker thread
    waiting: list = field(default_factory=list)  # (session, iq id): answered when the hash is known
    touched_at: float = 0.0


class Blobs:
    """The blob operations of one gateway, over its blob store, its files and its worker threads."""

    def __init__(
        self, *, store: BlobStore, files: BlobFiles, offload: Offload, writer: Offload, router: Router,
        limits: BlobLimits, max_frame_bytes: int, new_id: Callable[[], bytes] = lambda: secrets.token_bytes(BLOB_ID_BYTES),
    ) -> None:
        self.store = store
        self.files = files
        self.offload = offload  # syncs and hashes
        self.writer = writer  # chunks into the page cache, in order
        self.pending_write_bytes = 0  # chunk bytes on the writer thread, all uploads together
        self.router = router  # answers go out through it
        self.new_id = new_id
        self.chunk_bytes = max_frame_bytes - 16 - CHUNK_ENVELOPE_BYTES  # 16: the transport's AEAD tag
        self.limits = limits
        self.buckets = TokenBuckets(2 * limits.blob_kib_per_s_per_user, limits.blob_kib_per_s_per_user)
        self._uploads: dict[bytes, _Upload] = {}
        self._reserved_bytes = 0  # what the uploads in memory still have to write (the disk check)
        self._daily: dict[str, tuple[int, int]] = {}  # user -> (day number, bytes declared that day)
        self._first_seen: float | None = None  # the first time this process served a blob operation
        self.counters = {
            "blob_uploads_released": 0, "blob_uploads_started": 0, "blob_uploads_ready": 0, "blob_bad_hash": 0, "blob_bytes_written": 0,
            "blob_bytes_read": 0, "blobs_expired": 0, "blob_checkpoints": 0,
        }
        self.handlers = {"blob.new": self.blob_new, "blob.write": self.blob_write, "blob.read": self.blob_read}

    def configure(self, limits: BlobLimits) -> None:
        """New limits (a configuration reload); uploads under way keep their declared size."""
        self.limits = limits
        self.buckets.set_rate(2 * limits.blob_kib_per_s_per_user, limits.blob_kib_per_s_per_user)

    def announce(self) -> dict:
        """The ``welcome`` limits of blobs."""
        return {"blob_max": self.limits.blob_max_bytes, "blob_chunk": self.chunk_bytes, "blob_in_flight": WRITES_IN_FLIGHT}

    # -- the operations

    def blob_new(self, session: Session, stanza: dict, now: float) -> dict:
        user = session.identity.user
        if self._first_seen is None:
            self._first_seen = now
        size = stanza.get("size")
        if type(size) is not int or size < 1:
            raise StanzaError(f"blob.new needs 'size': the blob's length in bytes, an int >= 1 (got {_shown(size)})")
        sha256 = _bin(stanza.get("sha256"), SHA256_BYTES, "blob.new", "'sha256'")
        limits = self.limits
        if size > limits.blob_max_bytes:
            raise RouteError(f"a blob of {size} bytes is over the {limits.blob_max_bytes}-byte limit", code="too_large")
        self.charge(user, NEW_BLOB_TOKENS * KIB, now)
        day = int(now // DAY_S)
        declared_day, declared = self._daily.get(user, (day, 0))
        if declared_day != day:
            declared = 0
        charged = max(size, MIN_BLOB_CHARGE_BYTES)
        if declared + charged > limits.blob_daily_bytes_per_user:
            retry_after = max(1, math.ceil(((day + 1) * DAY_S - now) * 1000))
            raise RouteError(
                f"today's upload allowance of {limits.blob_daily_bytes_per_user} bytes would be passed "
                f"({declared} declared so far); try again in {retry_after} ms",
                code="rate_limited", retry_after=retry_after,
            )
        # Room on the disk for this blob and for what the unfinished uploads still have to write;
        # files (inodes) left; and room in the LMDB map, which the mailboxes need more.
        if (self.files.free_bytes() - size - self._reserved_bytes < limits.blob_min_free_bytes
                or self.files.free_files() < MIN_FREE_FILES or self._map_nearly_full()):
            raise RouteError("the gateway's blob storage is nearly full; try again later", code="overloaded",
                             retry_after=60_000)
        blob = self.new_id()
        now_ms = int(now * 1000)
        expires_ms = now_ms + int(limits.blob_upload_ttl_s * 1000)
        record = BlobRecord(user, size, sha256, now_ms, expires_ms, False, b"")
        if not self.store.create_blob(blob, record, limits.blob_open_uploads_per_user):
            retry_after = self._release_quiet_upload(user, now)
            if retry_after or not self.store.create_blob(blob, record, limits.blob_open_uploads_per_user):
                raise RouteError(
                    f"{limits.blob_open_uploads_per_user} uploads are already unfinished and each had bytes in the "
                    f"last {IDLE_UPLOAD_S:g} s; finish one, or try again in {retry_after or 60_000} ms",
                    code="rate_limited", retry_after=retry_after or 60_000,
                )
        self._daily[user] = (day, declared + charged)
        self._remember(blob, _Upload(user, size, sha256, expires_ms, ByteRanges(), touched_at=now))
        self.counters["blob_uploads_started"] += 1
        return {"blob": blob}

    def blob_write(self, session: Session, stanza: dict, now: float):
        blob = _bin(stanza.get("blob"), BLOB_ID_BYTES, "blob.write", "'blob'")
        offset = _offset(stanza.get("off"), "blob.write")
        data = stanza.get("data")
        if type(data) is not bytes:
            raise StanzaError(f"blob.write needs 'data': bin (got {_shown(data)})")
        if len(data) > self.chunk_bytes:
            raise RouteError(f"a chunk of {len(data)} bytes is over the {self.chunk_bytes}-byte limit", code="too_large")
        user = session.identity.user
        self.charge(user, len(data), now)
        upload = self._upload(blob, user, now)
        if type(upload) is BlobRecord:  # ready: a late or repeated chunk of a finished upload
            return {"have": upload.size, "ready": True}
        if upload is None:  # unknown, expired, someone else's
            raise _not_found()
        end = offset + len(data)
        if end > upload.size:
            raise StanzaError(f"blob.write: bytes {offset}..{end} pass the blob's size of {upload.size}")
        upload.touched_at = now
        if upload.verifying:
            if len(upload.waiting) >= MAX_WAITING:
                raise RouteError("the blob is being checked; wait for the answer to its last write", code="rate_limited",
                                 retry_after=100)
            upload.waiting.append((session, stanza["id"]))  # answered with the verdict
            return DEFERRED
        if data or upload.pending:  # (an empty write behind others is answered after them, in order)
            if data and upload.ranges.count_after(offset, end) > MAX_UPLOAD_RANGES:
                raise StanzaError(
                    f"blob.write: the upload would have more than {MAX_UPLOAD_RANGES} separate parts; "
                    f"write from 'have' on"
                )
            if upload.pending >= MAX_PENDING_WRITES or self.pending_write_bytes + len(data) > MAX_PENDING_WRITE_BYTES:
                raise RouteError("too many blob writes waiting for the disk; try again in 10 ms", code="rate_limited",
                                 retry_after=10)
            # Into the page cache on the writer thread: on ext4 a write can wait tens of
            # milliseconds for the journal, and the loop must not (chat waits behind it).
            upload.pending += 1
            self.pending_write_bytes += len(data)
            iq_id = stanza["id"]
            self.writer.submit(
                (lambda: self.files.write(blob, offset, data)) if data else _nothing,
                lambda outcome, when: self._written(session, iq_id, blob, upload, offset, end, outcome))
            return DEFERRED
        if upload.ranges.total == upload.size:
            upload.waiting.append((session, stanza["id"]))
            self._verify_when_written(blob, upload)
            return DEFERRED
        return {"have": upload.ranges.prefix, "ready": False}

    def _written(self, session: Session, iq_id: int, blob: bytes, upload: _Upload, offset: int, end: int,
                 outcome) -> None:
        """A chunk reached the page cache (or failed to): count its bytes, answer, and start the
        verdict once every byte is there and no write is still on its way. (No start over comes
        between a write and this: the verdict waits for every pending write, and writes that
        arrive while it runs wait for it.)"""
        upload.pending -= 1
        self.pending_write_bytes -= end - offset
        if isinstance(outcome, BaseException):
            error = _storage_error(blob, outcome) if isinstance(outcome, OSError) else RouteError(
                "the gateway could not store the chunk; write it again", code="internal")
            if not isinstance(outcome, OSError):
                log.error("blob %s…: a chunk's write failed: %r", blob[:4].hex(), outcome)
            self._answer_error(session, iq_id, error.code, error.message)
            self._verify_when_written(blob, upload)
            return
        if end > offset:
            added = upload.ranges.add(offset, end)
            self._reserved_bytes -= added
            upload.unsynced += added
            upload.unflushed += added
            self.counters["blob_bytes_written"] += added
        if upload.ranges.total == upload.size:
            upload.waiting.append((session, iq_id))  # answered with the verdict
            self._verify_when_written(blob, upload)
            return
        if upload.unsynced >= CHECKPOINT_BYTES and not upload.syncing:
            self._checkpoint(blob, upload)
        elif upload.unflushed >= FLUSH_BYTES and not upload.flushing and not upload.syncing:
            self._flush(blob, upload)
        self.router.answer(session, {"t": "res", "id": iq_id, "have": upload.ranges.prefix, "ready": False})

    def _verify_when_written(self, blob: bytes, upload: _Upload) -> None:
        """Every byte arrived: sync and hash the file on a worker thread, once no write of it is
        still on the writer thread (a hash must never read a file that is still changing, or a
        blob could be ready with bytes other than those hashed)."""
        if upload.verifying or upload.pending or upload.ranges.total != upload.size:
            return
        upload.verifying = True
        self.offload.submit(lambda: self.files.finish(blob, upload.size),
                            lambda outcome, when: self._verified(blob, upload, outcome, when))

    def blob_read(self, session: Session, stanza: dict, now: float) -> dict:
        blob = _bin(stanza.get("blob"), BLOB_ID_BYTES, "blob.read", "'blob'")
        offset = _offset(stanza.get("off"), "blob.read")
        length = stanza.get("len")
        if type(length) is not int or not 0 <= length <= self.chunk_bytes:
            raise StanzaError(f"blob.read needs 'len': an int 0..{self.chunk_bytes} (got {_shown(length)})")
        self.charge(session.identity.user, length, now)
        # (A read of many small blob.reads is bounded by the operations' answer budget per read.)
        record = self.store.blob(blob)
        if record is None or not record.ready or record.expires_ms <= now * 1000:
            raise _not_found()
        if offset > record.size:
            raise StanzaError(f"blob.read: offset {offset} is past the blob's size of {record.size}")
        try:
            data = self.files.read(blob, offset, min(length, record.size - offset))
        except OSError as exc:
            raise _storage_error(blob, exc) from None
        self.counters["blob_bytes_read"] += len(data)
        return {"data": data, "size": record.size}

    # -- upload state

    def _upload(self, blob: bytes, user: str, now: float) -> _Upload | BlobRecord | None:
        """The owner's unfinished upload ``blob`` (from memory, or from its record after a restart
        or a quiet spell); the record of the owner's ready blob; or None (unknown, expired,
        someone else's). One record read at most."""
        upload = self._uploads.get(blob)
        if upload is None:
            record = self.store.blob(blob)
            if record is None:
                return None
            if record.ready:
                return record if record.owner == user and record.expires_ms > now * 1000 else None
            try:
                ranges = ByteRanges.unpack(record.ranges)
            except ValueError:
                log.error("blob %s…: stored ranges unreadable; the upload starts over", blob[:4].hex())
                ranges = ByteRanges()
            upload = _Upload(record.owner, record.size, record.sha256, record.expires_ms, ranges, touched_at=now)
            self._remember(blob, upload)
        if upload.owner != user or upload.expires_ms <= now * 1000:
            return None
        return upload

    def _release_quiet_upload(self, user: str, now: float) -> int:
        """At the limit of open uploads, delete the owner's upload that has been quiet longest,
        if nothing arrived for it in ``IDLE_UPLOAD_S`` — a client that lost its upload ids
        (reinstalled, crashed) would otherwise be locked out of uploading until they expire.
        Returns 0 when one was released, else the milliseconds until one is quiet enough."""
        quiet_before = now - IDLE_UPLOAD_S
        first_seen = self._first_seen if self._first_seen is not None else now
        quietest, quiet_since = None, math.inf
        for blob in self.store.unfinished_blobs(user, MAX_OPEN_UPLOADS_SCANNED):
            upload = self._uploads.get(blob)
            if upload is not None and (upload.syncing or upload.flushing or upload.verifying or upload.pending):
                continue
            # Not in memory: no byte since it left (after IDLE_UPLOAD_S quiet), or since this
            # process started — a client may be about to resume it after a restart.
            since = upload.touched_at if upload is not None else first_seen
            if since < quiet_since:
                quietest, quiet_since = blob, since
        if quietest is None:
            return 60_000  # every one is being synced or hashed
        if quiet_since > quiet_before:
            return max(1, math.ceil((quiet_since - quiet_before) * 1000))
        self.store.delete_blobs([quietest])
        self._forget(quietest)
        self.files.delete(quietest)
        self.counters["blob_uploads_released"] += 1
        log.info("blob %s…: unfinished upload released (quiet for %.0f s) for a new one of its owner",
                 quietest[:4].hex(), now - quiet_since)
        return 0

    def _flush(self, blob: bytes, upload: _Upload) -> None:
        """Push the upload's last megabyte to the disk on a worker thread, recording nothing.
        The disk's queue then never holds more than about a megabyte per upload, so a message
        commit's fsync does not wait behind megabytes of blob data written back at once (on one
        ext4 device a commit waited 5 ms at p99 beside two uploads, 1.5 ms with these flushes)."""
        upload.flushing = True
        upload.unflushed = 0

        def flushed(outcome, now: float) -> None:
            upload.flushing = False
            if isinstance(outcome, BaseException):  # the checkpoint or the verdict meets it again
                log.warning("blob %s…: flush failed: %s", blob[:4].hex(), outcome)

        self.offload.submit(lambda: self.files.sync(blob), flushed)

    def _checkpoint(self, blob: bytes, upload: _Upload) -> None:
        """Sync the upload's bytes on a worker thread, then save the ranges they cover."""
        upload.syncing = True
        upload.unflushed = 0
        synced, synced_unsynced, generation = upload.ranges.pack(), upload.unsynced, upload.generation

        def saved(outcome, now: float) -> None:
            upload.syncing = False
            if isinstance(outcome, BaseException):
                log.error("blob %s…: sync failed: %s", blob[:4].hex(), outcome)
                return
            if upload.verifying or upload.generation != generation:
                return  # the verdict or the start over decides what the record says
            try:
                saved = self.store.save_blob_ranges(blob, synced)
            except InterlinkError as exc:  # a full map: the next checkpoint tries again
                log.error("blob %s…: ranges not saved: %s", blob[:4].hex(), exc)
                return
            if saved:
                upload.unsynced = max(0, upload.unsynced - synced_unsynced)
                self.counters["blob_checkpoints"] += 1

        self.offload.submit(lambda: self.files.sync(blob), saved)

    def _verified(self, blob: bytes, upload: _Upload, outcome, now: float) -> None:
        """The final sync and hash are done: ready, ``bad_hash`` (start over) or an internal error."""
        upload.verifying = False
        waiting, upload.waiting = upload.waiting, []
        if isinstance(outcome, BaseException):
            log.error("blob %s…: the final sync or hash failed: %s", blob[:4].hex(), outcome)
            for session, iq_id in waiting:
                self._answer_error(session, iq_id, "internal", "the gateway could not store the blob; write a chunk again")
            return
        try:
            if outcome != upload.sha256:
                self.counters["blob_bad_hash"] += 1
                self._reserved_bytes += upload.ranges.total  # all of it has to be written again
                upload.ranges.clear()
                upload.unsynced = 0
                upload.generation += 1
                self.store.save_blob_ranges(blob, b"")
                for session, iq_id in waiting:
                    self._answer_error(session, iq_id, "bad_hash",
                                       "the blob's SHA-256 does not match the one declared; upload it again from offset 0")
                return
            now_ms = int(now * 1000)
            ready = self.store.mark_blob_ready(blob, now_ms + int(self.limits.blob_ttl_s * 1000), now_ms)
        except InterlinkError as exc:  # a full map: the bytes are all there; a write asks again
            for session, iq_id in waiting:
                self._answer_error(session, iq_id, exc.code, exc.message)
            return
        self._forget(blob)
        if not ready:
            for session, iq_id in waiting:  # expired while it was hashed
                self._answer_error(session, iq_id, "not_found", "no such blob")
            return
        self.counters["blob_uploads_ready"] += 1
        for session, iq_id in waiting:
            self.router.answer(session, {"t": "res", "id": iq_id, "have": upload.size, "ready": True})

    def _answer_error(self, session: Session, iq_id: int, code: str, message: str) -> None:
        self.router.answer(session, {"t": "err", "code": code, "msg": message, "id": iq_id})

    # -- housekeeping (the edge's sweeps call these)

    def sweep(self, now: float) -> int:
        """Delete blobs whose time ran out (a bounded chunk), and let quiet uploads leave memory
        (a checkpoint first if they have unsynced bytes). Returns how many blobs were deleted."""
        if self._first_seen is None:
            self._first_seen = now
        expired = [blob for blob in self.store.expired_blobs(int(now * 1000), EXPIRE_CHUNK)
                   if not self._busy(blob)]
        deleted = self.store.delete_blobs(expired) if expired else 0
        for blob in expired:
            self._forget(blob)
            self.files.delete(blob)
        self.counters["blobs_expired"] += deleted
        today = int(now // DAY_S)
        self._daily = {user: entry for user, entry in self._daily.items() if entry[0] == today}  # yesterday's counts go
        quiet_before = now - IDLE_UPLOAD_S
        for blob, upload in list(self._uploads.items()):
            if (upload.touched_at > quiet_before or upload.syncing or upload.flushing or upload.verifying
                    or upload.pending):
                continue
            if upload.unsynced:
                self._checkpoint(blob, upload)
            else:
                self._forget(blob)
        return deleted

    def checkpoint_all(self) -> int:
        """Sync and record every upload's unsynced bytes (a drain: after the restart, uploads go
        on from all they received). Returns how many checkpoints were started."""
        started = 0
        for blob, upload in list(self._uploads.items()):
            if upload.unsynced and not upload.syncing and not upload.verifying:
                self._checkpoint(blob, upload)
                started += 1
        return started

    def remove_orphans(self) -> int:
        """Delete blob files without a record (a crash between forgetting a blob and deleting its
        file); the gateway calls this at start, before serving. Returns how many. With no blob
        record at all while files exist (a new or another LMDB environment, a volume mounted
        wrong), nothing is deleted: that is the operator's to look at, not an orphan sweep's."""
        usage = self.store.blob_usage()
        if not usage["blob_uploads"] and not usage["blobs_ready"]:
            if next(iter(self.files.ids()), None) is not None:
                log.warning("blob files exist but no blob record does: left in place (is data_dir/blobs the "
                            "folder of this LMDB environment?)")
            return 0
        removed = 0
        for blob in list(self.files.ids()):
            if self.store.blob(blob) is None:
                self.files.delete(blob)
                removed += 1
        return removed

    def _remember(self, blob: bytes, upload: _Upload) -> None:
        self._uploads[blob] = upload
        self._reserved_bytes += upload.size - upload.ranges.total

    def _forget(self, blob: bytes) -> None:
        upload = self._uploads.pop(blob, None)
        if upload is not None:
            self._reserved_bytes -= upload.size - upload.ranges.total

    def _map_nearly_full(self) -> bool:
        usage = self.store.usage()
        return usage["map_used_bytes"] > MAP_FULL_FRACTION * usage["map_size_bytes"]

    def _busy(self, blob: bytes) -> bool:
        upload = self._uploads.get(blob)
        return upload is not None and (upload.syncing or upload.flushing or upload.verifying or upload.pending > 0)

    @property
    def uploads_in_memory(self) -> int:
        return len(self._uploads)

    def charge(self, user: str, size: int, now: float) -> None:
        """Charge ``size`` bytes (1 KiB at least) to ``user``'s blob bucket, or refuse ``rate_limited``."""
        wait_s = self.buckets.take(user, now, max(1.0, size / KIB))
        if wait_s:
            retry_after = max(1, math.ceil(wait_s * 1000))
            raise RouteError(f"too much blob traffic; try again in {retry_after} ms", code="rate_limited",
                             retry_after=retry_after)


def _nothing() -> None:
    """The writer's work for an empty write queued behind others (its answer keeps their order)."""


def _storage_error(blob: bytes, exc: OSError) -> RouteError:
    """A file operation failed: a full disk is ``overloaded`` (try later), anything else ``internal``."""
    log.error("blob %s…: %s", blob[:4].hex(), exc)  # the whole id is a read capability: never logged
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return RouteError("the gateway's blob storage is full; try again later", code="overloaded", retry_after=60_000)
    return RouteError("the gateway could not read or write the blob", code="internal")


def _not_found() -> RouteError:
    # One answer for every id that cannot be served: unknown, expired, unfinished, not the writer's.
    return RouteError("no such blob", code="not_found")


def _bin(value, size: int, op: str, name: str) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise StanzaError(f"{op} needs {name}: {size} bytes of bin (got {_shown(value)})")
    return value


def _offset(value, op: str) -> int:
    if type(value) is not int or value < 0:
        raise StanzaError(f"{op} needs 'off': an int >= 0 (got {_shown(value)})")
    return value


def _shown(value) -> str:
    if type(value) is int:
        return str(value) if abs(value) < 10**12 else "a huge int"
    if type(value) is bytes:
        return f"{len(value)} bytes"
    return kind_of(value)
