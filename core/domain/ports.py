"""The domain's ports: what it needs of an open session (``Session``) and of durable state.

One protocol per table family (mailboxes, consent and blocks, keys, groups, blob records) and
``Store``, all of them plus the group commit; ``BlobFiles`` for the bytes of blobs and
``Offload`` for work that must not run on the event loop. ``interlink.core.edge.lmdbstore.LmdbStore`` implements ``Store``; a
domain object that needs one family can ask for that protocol alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from interlink.core.domain.auth import Identity
from interlink.core.domain.batch import GroupRecord, WriteBatch

if TYPE_CHECKING:  # blobs.py imports the operations, which import this module
    from interlink.core.domain.blobs import BlobRecord


class Session(Protocol):
    """What the domain needs of an open session (``ServerConnection`` is one)."""

    identity: Identity  #: who the session's token says it is
    session_key: tuple[str, int]  #: (user, device): the session table's key
    max_plaintext_bytes: int  #: the largest stanza the session can be sent
    relayed: bool  #: another node's session, whose stanza a cluster relayed here (charged there)

    @property
    def closed(self) -> bool: ...

    def send_encoded(self, encoded: bytes) -> None:
        """Queue an encoded stanza (the router encodes: answers counted, fan-out encoded once)."""


class MailboxStore(Protocol):
    """Devices, mailboxes and the dedup window."""

    @property
    def dedup_unswept(self) -> int:
        """Dedup entries added since the dedup sweep last caught up: > 0 asks for another sweep soon."""

    def devices(self, user: str) -> tuple[int, ...]:
        """The user's registered devices, ascending."""

    def register_device(self, user: str, device: int, max_devices: int) -> tuple[int, ...]:
        """Record ``device`` for ``user`` (idempotent) and return the user's devices.
        ``StoreLimitError`` (nothing written) when the user already has ``max_devices`` others."""

    def pending(self, dkey: bytes, after_seq: int = 0, limit: int | None = None) -> list[tuple[int, bytes]]:
        """Stored items of a device with seq > ``after_seq``, in seq order."""

    def pending_count(self, dkey: bytes) -> int:
        """How many items a device has stored."""

    def usage(self) -> dict:
        """``mailbox_items``, ``mailbox_bytes`` (pages the mailboxes and their shared group bodies
        use), ``shared_bodies``, ``map_used_bytes``, ``map_size_bytes``: cheap enough for every
        metrics scrape."""

    def expire(self, before_ms: int, limit: int = 10_000, max_devices: int = 20_000) -> int:
        """Delete up to ``limit`` items stored before ``before_ms``, visiting at most
        ``max_devices`` mailboxes from where the previous call stopped; returns how many."""

    def forget_duplicates(self, before_ms: int, limit: int = 10_000) -> int:
        """Scan ``limit`` dedup entries from where the previous call stopped and end the window of
        those first stored before ``before_ms``; returns how many."""

    def seen(self, sender_key: bytes, msg_id: bytes) -> bool:
        """Is (sender device key, message id) stored in the dedup window?"""


class SocialStore(Protocol):
    """Consent, blocks, reports and the phone directory (the ``iq`` operations' state)."""

    def consent(self, user: str) -> tuple[tuple[str, ...], bool] | None:
        """The user's stored ``(accept, discoverable)``; None when it never set any."""

    def set_consent(self, user: str, accept: tuple[str, ...], discoverable: bool) -> None:
        """Replace the user's consent (durably). ``StoreFullError`` when the map is full."""

    def reach(self, user: str, max_blocked: int) -> tuple[tuple[tuple[str, ...], bool] | None, frozenset | None]:
        """In one read: ``consent(user)``, and the set of users it blocked — or None when it
        blocked more than ``max_blocked`` (then ask ``is_blocked``)."""

    def is_blocked(self, user: str, other: str) -> bool:
        """Did ``user`` block ``other``?"""

    def add_block(self, user: str, other: str, max_blocks: int) -> bool:
        """Block ``other`` for ``user``; True if new, False if it already was (idempotent).
        ``StoreLimitError`` when ``user`` already blocks ``max_blocks`` others."""

    def del_block(self, user: str, other: str) -> bool:
        """Unblock; True if ``other`` was blocked (idempotent)."""

    def blocked(self, user: str, after: str | None = None, limit: int | None = None) -> list[str]:
        """Users ``user`` blocked, in byte order of their UTF-8 addresses, after ``after``."""

    def block_count(self, user: str) -> int:
        """How many users ``user`` blocked."""

    def blockers(self, user: str, limit: int) -> frozenset | None:
        """The users who blocked ``user``, or None when there are more than ``limit`` (then ask
        ``is_blocked`` per user)."""

    def add_report(self, record: dict) -> int:
        """Store a report (a msgpack-able map) durably; returns its number (1, 2, ...; never reused)."""

    def report(self, number: int) -> dict | None:
        """A stored report, or None."""

    def reports(self, after: int = 0, limit: int = 100, *, unresolved: bool = False) -> list[tuple[int, dict]]:
        """Up to ``limit`` reports numbered above ``after``, oldest first (only those without a
        ``resolution`` when ``unresolved``)."""

    def resolve_report(self, number: int, resolution: dict) -> bool:
        """Record what the operator decided (``resolution`` is stored in the report); False when
        there is no such report."""

    def set_phone(self, user: str, phone: str | None) -> bool:
        """List ``user`` under ``phone`` in the directory (None: under no phone); replaces the
        previous phone. Reads only when nothing changes; True when it wrote."""

    def phone(self, user: str) -> str | None:
        """The phone the directory lists ``user`` under."""

    def directory(self, phone: str, limit: int | None = None) -> list[str]:
        """Users listed under ``phone``, in byte order."""


class KeyStore(Protocol):
    """The key directory (``keys.*``): each device's published keys and one-time prekeys."""

    def put_prekeys(
        self, user: str, device: int, ik: bytes, spk: tuple[int, bytes, bytes], otpks: list[tuple[int, bytes]],
        max_otpks: int,
    ) -> int:
        """Publish a device's keys in one write transaction: ``ik`` and ``spk`` (id, key, sig)
        replace what it published before; a new ``ik`` also discards the one-time prekeys stored
        under the old one; ``otpks`` (id, key) are added, an id already stored replaced. Returns the
        device's one-time prekey count. ``StoreLimitError`` (nothing written) when the stock would
        pass ``max_otpks``; ``StoreFullError`` when the map is full."""

    def take_prekeys(self, user: str, devices) -> list[dict]:
        """The bundles of ``devices`` of ``user`` (ascending; devices that published nothing are
        left out): ``{"device", "ik", "spk": {"id", "key", "sig"}, "otpk": {"id", "key"} or None}``.
        Each one-time prekey returned is deleted in the same write transaction, so it is handed out
        exactly once (the lowest id first)."""

    def read_prekeys(self, user: str, devices) -> list[dict]:
        """The bundles ``take_prekeys`` would hand out, read only: nothing is consumed (the
        gateway takes the one-time prekeys in its group commit, ``WriteBatch.add_prekey_take``)."""

    def prekey_count(self, user: str, device: int) -> int:
        """How many one-time prekeys the device has stored."""


class GroupStore(Protocol):
    """Group records (written only through ``commit``: a ``ControlEntry`` with a ``GroupWrite``)."""

    def group(self, g: bytes) -> GroupRecord | None:
        """The stored record of group ``g``, or None."""


class FanoutStore(Protocol):
    """A cluster node's group fan-out streams (``core/domain/outbox.py``): entries are written and
    marked only through ``commit`` (an entry's ``outbox`` and ``fanin``, the batch's
    ``outbox_acked``)."""

    incarnation: bytes  #: drawn each time the store is opened; outbox entries carry the one that wrote them

    def outbox_entries(self, node: str, after: int = 0, limit: int | None = None) -> list[tuple[int, bytes]]:
        """The outbox entries for ``node`` numbered after ``after``, in order: [(seq, packed record)]."""

    def outbox_last(self, node: str) -> int:
        """The last seq given to an entry for ``node`` (0: none yet)."""

    def outbox_nodes(self) -> dict[str, int]:
        """Every node with outbox entries waiting, and how many."""

    def outbox_sizes(self) -> dict[str, tuple[int, int]]:
        """Every node with outbox entries waiting: how many, and what they take of the store at
        most (``outbox_footprint``)."""

    def outbox_footprint(self, node: str, size: int) -> int:
        """What an outbox entry of ``size`` packed bytes for ``node`` takes of the store, at most
        while one node's entries are appended alone."""

    def outbox_table_bytes(self) -> int:
        """What the outbox takes of the store now, every node's entries together."""


class BlobStore(Protocol):
    """Blob records (``core/domain/blobs.py``); each method is a transaction of its own."""

    def blob(self, blob: bytes) -> BlobRecord | None:
        """The record of ``blob``, or None."""

    def create_blob(self, blob: bytes, record: BlobRecord, max_uploads: int) -> bool:
        """Store a new upload's record; False (nothing written) when its owner already has
        ``max_uploads`` unfinished uploads."""

    def save_blob_ranges(self, blob: bytes, ranges: bytes) -> bool:
        """Record the synced parts of an unfinished upload; False if it is gone or ready."""

    def unfinished_blobs(self, owner: str, limit: int) -> list[bytes]:
        """Ids of up to ``limit`` of ``owner``'s unfinished uploads."""

    def mark_blob_ready(self, blob: bytes, expires_ms: int, now_ms: int) -> bool:
        """Serve the blob from now until ``expires_ms``; False if it is gone, expired by
        ``now_ms`` or already ready."""

    def expired_blobs(self, before_ms: int, limit: int) -> list[bytes]:
        """Ids of up to ``limit`` blobs whose time ran out before ``before_ms``, oldest first."""

    def delete_blobs(self, blobs) -> int:
        """Forget these blobs' records; returns how many existed."""

    def blob_usage(self) -> dict:
        """``blob_uploads``, ``blobs_ready`` and ``blob_bytes`` (of the ready ones)."""


class BlobFiles(Protocol):
    """Where blob bytes live: ``interlink.core.edge.blobfiles.BlobFileStore`` (files under the
    data folder) or, later, an object store passing the same contract tests
    (``tests/edge/test_blobfiles.py``). Writes are durable only after ``sync`` or ``finish``."""

    def write(self, blob: bytes, offset: int, data: bytes) -> None: ...

    def read(self, blob: bytes, offset: int, length: int) -> bytes: ...

    def sync(self, blob: bytes) -> None: ...

    def finish(self, blob: bytes, size: int) -> bytes:
        """Make the blob durable and return the SHA-256 of its first ``size`` bytes (on a worker thread)."""

    def delete(self, blob: bytes) -> None: ...

    def ids(self) -> Iterator[bytes]: ...

    def free_bytes(self) -> int: ...

    def free_files(self) -> int: ...


class PushStore(Protocol):
    """Push registrations (``push.set``) and the intents owed (``core/edge/lmdbstore/push.py``);
    intents are written by the group commit (``WriteBatch.push_*``)."""

    def set_push_token(self, dkey: bytes, token: bytes) -> None:
        """Register (or replace) the device's token."""

    def del_push_token(self, dkey: bytes) -> bool:
        """Forget the device's token and any intent owed to it; False if it had none."""

    def push_token(self, dkey: bytes) -> bytes | None:
        """The device's registered token, or None."""

    def push_devices(self) -> list[bytes]:
        """Every registered device key."""

    def push_intents(self) -> list[tuple[bytes, int]]:
        """Every intent owed: (device key, counter)."""


class PushSender(Protocol):
    """Sends the webhooks the committed intents owe (``core/edge/push.py``)."""

    def owed(self, created: list[tuple[bytes, int]], existing: list[tuple[bytes, int]]) -> None:
        """After a commit: the intents it created, and those that woken devices already owed
        (new items came: one being sent right now is followed by another once answered; one the
        sender does not know is scheduled)."""

    def cancel(self, dkey: bytes) -> None:
        """The device connected: nothing is owed to it any more."""


class Offload(Protocol):
    """Runs slow work (syncing and hashing a blob) off the event loop."""

    def submit(self, work: Callable[[], object], done: Callable[[object, float], None]) -> None:
        """Run ``work()`` on a worker thread, then ``done(result or the exception it raised, now)``
        back on the loop, after which the edge writes out the sessions ``done`` answered."""


class Store(MailboxStore, SocialStore, KeyStore, GroupStore, FanoutStore, BlobStore, PushStore, Protocol):
    """Every table family, and the group commit that writes across them."""

    def commit(self, batch: WriteBatch) -> None:
        """Write the batch in one transaction, in entry order, durably per the configured mode,
        and record each entry's outcome on it (``dup``, ``stored``, ``refused``, ``kept``,
        ``dropped_full``; a prekey take's ``bundles``). ``StoreFullError`` when it does not fit:
        nothing is written and no entry keeps an outcome."""
