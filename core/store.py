"""Durable state: the storage interface the domain logic uses, and its LMDB implementation.

One LMDB environment with named databases:

| database | key | value |
|---|---|---|
| ``devices`` | device key | ``b""`` |
| ``mbox`` | device key + seq (uint64 big-endian) | stored ``ts`` (uint64 ms) + the encoded ``dlv``, ready to send |
| ``seqs`` | device key | last seq given out (uint64; never goes back), items and bytes stored (uint32, uint64) |
| ``mbox`` (shared copy) | the same key | ``ts`` + ``0xc1`` + body id (uint64) + the copy's encoded size (uint32) |
| ``bodies`` | body id (uint64 big-endian) | what every copy of one group message shares: its encoded ``dlv`` after the ``seq`` |
| ``body_refs`` | body id | how many ``mbox`` items still refer to the body (uint32) |
| ``dedup`` | sender device key + message id (16 bytes) | ``ts`` of the first copy (uint64 ms) |
| ``consent`` | user address | msgpack ``[accept (list of provider ids or ["*"]), discoverable]`` |
| ``blocks`` | user address + ``b"\\0"`` + blocked address | ``b""`` |
| ``block_counts`` | user address | how many users it blocked (uint32 big-endian) |
| ``blocked_by`` | blocked address + ``b"\\0"`` + user address | ``b""``: ``blocks`` read the other way (who blocked a sender) |
| ``reports`` | report number (uint64 big-endian) | msgpack map: reporter, device, user, ids, reason, evidence, ts |
| ``counters`` | ``b"reports"`` | last report number given out (uint64 big-endian); never goes back |
| ``directory`` | phone (E.164) + ``b"\\0"`` + user address | ``b""`` |
| ``phones`` | user address | the phone the directory lists the user under |
| ``prekeys`` | device key | msgpack ``[ik, spk id, spk key, spk sig]``: the device's published identity and signed prekey |
| ``otpks`` | device key + one-time prekey id (uint32 big-endian) | the one-time prekey (32 bytes) |
| ``groups`` | group id (16 bytes) | ``ver`` (uint64 big-endian) + msgpack ``[members (join order), admins, meta (bin or nil)]`` |

A *device key* is the user address in UTF-8, a zero byte and the device number (uint32
big-endian): a range scan over ``user + b"\0"`` lists a user's devices in order, and one over a
device key lists its mailbox in seq order. Messages are written in batches (``WriteBatch``), one
write transaction per batch: the gateway's group commit.

The hot path writes as little as it can: a stored message is one ``dedup`` insert (which is also
the duplicate check) and one ``mbox`` put per recipient device (a group message also one body and
its count), a received item one ``mbox`` delete (plus, per shared body and commit, one count
update or the body's deletion), plus one ``seqs`` record per device and commit. There is no age index: the TTL sweep
walks the devices (``seqs``) and cuts the expired head of each mailbox (seqs are handed out in
time order), and the dedup sweep walks the dedup table itself, at least as fast as it grows.

A group message's copies differ only in their ``seq``: the body and its fields are stored once
(``bodies``) and each device's item refers to it (21 bytes instead of the whole ``dlv``). ``0xc1``
never starts an encoded stanza (msgpack leaves that byte unused), so it marks a reference. A
commit that deletes references (``recv``, the TTL sweep) adds up its releases per body and
updates ``body_refs`` once per body; the body goes with its last reference. Quotas count a copy
at its encoded size, shared or not: what a device will be sent.

Addresses never contain a zero byte (localparts exclude control characters), so ``user + b"\\0"``
is an unambiguous prefix for the user's blocks, and ``phone + b"\\0"`` for one directory entry.
Consent, blocks, reports and the directory are written by the ``iq`` operations in their own
(small, rare) write transactions; a full map raises ``StoreFullError`` there too.

Group records are the exception: a membership change is written by the group commit, in the same
transaction as the ``dlv`` items that announce it (a ``GroupWrite`` on a control entry of the
``WriteBatch``). The record's ``ver`` leads its value so that the compare-and-set every group
write does (the stored ``ver`` must be the one the change was computed from) reads 8 bytes.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Protocol

import lmdb
import msgpack

from interlink.core.errors import AuthError, ConfigError, StoreFullError, StoreLimitError
from interlink.core.fanout import DLV_HEAD, splice
from interlink.core.mailbox import SHARED_MARK, MailboxState, delete_items, forget_item, plan_copies, write_copies

_DEVICE = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
_TS = struct.Struct(">Q")
_REFS = struct.Struct(">I")  # a shared body's reference count
# What every group ``dlv`` starts with (a 9-entry map, "t": "dlv", "seq"); the seq follows, then the
# fields every copy shares: the fan-out's encoding (core/fanout.py), which the store keeps once.
SHARED_DLV_HEAD = DLV_HEAD


# How far past its quota a mailbox still takes control items (group events): a change reaches a
# full mailbox, but a dormant device in busy groups cannot grow without bound.
CONTROL_OVERDRAFT_ITEMS = 1_000
CONTROL_OVERDRAFT_BYTES = 4 << 20
DEVICE_CACHE_USERS = 100_000  # users whose device lists stay in memory (about 100 bytes each)
SHARED_DEVICE_SETS = 1024  # distinct device lists the cache shares between users


def device_key(user: str, device: int) -> bytes:
    """The key of one device of one user (see the module docstring)."""
    return user.encode("utf-8") + b"\x00" + _DEVICE.pack(device)


class GroupRecord:
    """One group as stored: an immutable value (a change makes a new record)."""

    __slots__ = ("ver", "members", "admins", "meta", "member_set")

    def __init__(self, ver: int, members: tuple[str, ...], admins: tuple[str, ...], meta: bytes | None) -> None:
        self.ver = ver  #: 1 at creation, +1 per membership change
        self.members = members  #: addresses in the order they joined (the longest-standing first)
        self.admins = admins  #: addresses, a subset of ``members``, in the order they became admins
        self.meta = meta  #: opaque bytes the clients encrypt (name, picture...), or None
        self.member_set = frozenset(members)

    def pack(self) -> bytes:
        return _SEQ.pack(self.ver) + msgpack.packb([list(self.members), list(self.admins), self.meta], use_bin_type=True)

    @classmethod
    def unpack(cls, raw: bytes) -> GroupRecord:
        members, admins, meta = msgpack.unpackb(raw[8:], raw=False)
        return cls(_SEQ.unpack(raw[:8])[0], tuple(members), tuple(admins), meta)


class GroupWrite:
    """A group record change of a ``WriteBatch``: written only if the stored record still has
    ``prior_ver`` (0: no record), so a change computed from a state that never committed is
    refused instead of overwriting. ``record`` None deletes the group."""

    __slots__ = ("g", "prior_ver", "record")

    def __init__(self, g: bytes, prior_ver: int, record: GroupRecord | None) -> None:
        self.g = g
        self.prior_ver = prior_ver
        self.record = record


class StoredMessage:
    """One message of a ``WriteBatch`` and, after the commit, what happened to it.

    A *control* entry (``control=True``: a group change and its events, or an answer that only has
    to wait for the commit) is not deduplicated and never refused for the mailbox quotas (its
    items still count toward them): a membership change must reach every member, however full
    its mailbox — up to the control overdraft past the quota; a copy beyond it is skipped
    (``dropped_full``, ``kept``). Its ``group`` write, if any, is
    done first, and when it is refused (``refused`` = ``"conflict"``) none of its items is stored."""

    __slots__ = (
        "sender_key", "msg_id", "ts_ms", "items", "dup", "stored", "refused", "control", "group", "reply", "prekeys",
        "guard", "skip_full", "kept", "dropped_full", "shared",
    )

    def __init__(
        self, sender_key: bytes, msg_id: bytes, ts_ms: int, items: list, control: bool = False,
        group: GroupWrite | None = None,
    ) -> None:
        self.sender_key = sender_key
        self.msg_id = msg_id
        self.ts_ms = ts_ms  #: after commit: the ts of the first stored copy when ``dup``
        self.items = items  #: [(device key, build(seq, ts_ms) -> encoded dlv)]
        self.dup = False
        self.stored: list = []  #: after commit: [(device key, seq, encoded dlv)]
        self.refused: str | None = None  #: after commit: why nothing was stored (``mailbox_full``, ``conflict``)
        self.control = control
        self.group = group
        self.reply = None  #: the router's answer once committed (an ``iq`` ``res``), for control entries
        self.prekeys = None  #: (user, devices) whose bundles the commit takes into ``reply["bundles"]``
        #: (g, ver): store nothing (``refused`` = ``"conflict"``) unless group ``g``'s stored record
        #: has ``ver`` — set on entries computed from a group change that was still committing
        self.guard: tuple[bytes, int] | None = None
        #: a group message: a copy for a device whose mailbox is full is skipped (counted in
        #: ``dropped_full``) instead of refusing the whole message
        self.skip_full = False
        self.kept: list[int] | None = None  #: after commit, when copies were skipped: indices of ``items`` stored
        self.dropped_full = 0
        #: every item has the same ``build``, whose copies are ``SHARED_DLV_HEAD`` + the packed seq + a
        #: tail they share (a group message): the tail is stored once, the items refer to it
        self.shared = False


class WriteBatch:
    """Everything one group commit writes: new messages (deduplicated per sender device and
    message id) and received items to delete."""

    __slots__ = ("messages", "deletions")

    def __init__(self) -> None:
        self.messages: list[StoredMessage] = []
        self.deletions: list[tuple[bytes, list[int]]] = []

    def __bool__(self) -> bool:
        return bool(self.messages or self.deletions)

    def add_message(self, sender_key: bytes, msg_id: bytes, ts_ms: int, items: list) -> StoredMessage:
        message = StoredMessage(sender_key, msg_id, ts_ms, items)
        self.messages.append(message)
        return message

    def add_control(self, sender_key: bytes, msg_id: bytes, ts_ms: int, items: list,
                    group: GroupWrite | None = None) -> StoredMessage:
        """A control entry (see ``StoredMessage``): a group write and the items announcing it."""
        message = StoredMessage(sender_key, msg_id, ts_ms, items, control=True, group=group)
        self.messages.append(message)
        return message

    def take_prekeys(self, sender_key: bytes, ts_ms: int, user: str, devices, reply: dict) -> StoredMessage:
        """A ``keys.get`` that hands out one-time prekeys: the commit takes them (each exactly
        once) and puts the bundles into ``reply["bundles"]``, so many requests share one fsync."""
        message = StoredMessage(sender_key, b"", ts_ms, [], control=True)
        message.prekeys = (user, sorted(set(devices)))
        message.reply = reply
        self.messages.append(message)
        return message

    def delete(self, dkey: bytes, seqs: list[int]) -> None:
        self.deletions.append((dkey, seqs))


class Store(Protocol):
    """What the gateway needs from durable storage (``LmdbStore`` implements it)."""

    def devices(self, user: str) -> tuple[int, ...]:
        """The user's registered devices, ascending."""

    def register_device(self, user: str, device: int, max_devices: int) -> tuple[int, ...]:
        """Record ``device`` for ``user`` (idempotent); ``AuthError(device_limit)`` past the limit."""

    def commit(self, batch: WriteBatch) -> None:
        """Write the batch in one transaction, durably per the configured mode; fills in each
        message's ``dup``/``stored``. ``StoreFullError`` when it does not fit (nothing written)."""

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
        those first stored before ``before_ms``; returns how many. ``dedup_unswept`` > 0 asks for
        another call soon."""

    # -- consent, blocks, reports, directory (the ``iq`` operations)

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

    # -- the key directory (``keys.*``)

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

    def prekey_count(self, user: str, device: int) -> int:
        """How many one-time prekeys the device has stored."""

    def read_prekeys(self, user: str, devices) -> list[dict]:
        """The bundles ``take_prekeys`` would hand out, read only: nothing is consumed (the
        gateway then takes the one-time prekeys in its group commit, ``WriteBatch.take_prekeys``)."""

    # -- groups (written only through ``commit``: ``WriteBatch.add_control`` with a ``GroupWrite``)

    def group(self, g: bytes) -> GroupRecord | None:
        """The stored record of group ``g``, or None."""

    def seen(self, sender_key: bytes, msg_id: bytes) -> bool:
        """Is (sender device key, message id) stored in the dedup window?"""


class LmdbStore:
    """One LMDB environment with named databases; this is the edge where storage I/O happens."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        map_size_bytes: int,
        sync: bool,
        max_mailbox_items: int,
        max_mailbox_bytes: int,
        device_cache_users: int = DEVICE_CACHE_USERS,
        control_overdraft_items: int = CONTROL_OVERDRAFT_ITEMS,
        control_overdraft_bytes: int = CONTROL_OVERDRAFT_BYTES,
    ) -> None:
        self.max_mailbox_items = max_mailbox_items
        self.max_mailbox_bytes = max_mailbox_bytes
        self.control_overdraft_items = control_overdraft_items
        self.control_overdraft_bytes = control_overdraft_bytes
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"data_dir: cannot create {path}: {exc.strerror}") from exc
        self.path = path
        self._env = lmdb.open(
            str(path),
            map_size=map_size_bytes,
            max_dbs=24,
            subdir=True,
            sync=sync,
            metasync=sync,
            lock=True,
        )
        # devices: key = user address (UTF-8) + device (uint32 big-endian), value = b"" — a range
        # scan over the user's prefix lists the devices in ascending order.
        self._devices = self._env.open_db(b"devices")
        self._mbox = self._env.open_db(b"mbox")
        self._seqs = self._env.open_db(b"seqs")
        self._dedup = self._env.open_db(b"dedup")
        self._bodies = self._env.open_db(b"bodies")
        self._body_refs = self._env.open_db(b"body_refs")
        with self._env.begin(db=self._bodies) as txn:
            cursor = txn.cursor()
            # Body ids only grow while a body is stored; one may be used again once its body is gone.
            self._next_body = _SEQ.unpack(cursor.key())[0] + 1 if cursor.last() else 1
        # Every routed stanza needs the recipient's device list; this process is the only writer
        # of the devices table, so the lists it read stay true until it registers a device.
        self._device_cache: dict[str, tuple[int, ...]] = {}
        self._device_sets: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._device_cache_users = device_cache_users
        # Where the background sweeps resume (None: at the start of their table), and how many
        # dedup entries were added since the dedup sweep last caught up.
        self._expire_from: bytes | None = None
        self._dedup_sweep_from: bytes | None = None
        self.dedup_unswept = 0
        self._open_social_dbs()

    def close(self) -> None:
        self._env.close()

    @staticmethod
    def _user_prefix(user: str) -> bytes:
        return user.encode("utf-8") + b"\x00"

    def devices(self, user: str) -> tuple[int, ...]:
        devices = self._device_cache.get(user)
        if devices is None:
            with self._env.begin(db=self._devices) as txn:
                devices = self._list_in(txn, self._user_prefix(user))
            self._remember_devices(user, devices)
        return devices

    def _remember_devices(self, user: str, devices: tuple[int, ...]) -> None:
        cache = self._device_cache
        if len(cache) >= self._device_cache_users:
            del cache[next(iter(cache))]  # the oldest entry: a bounded cache, cheap to keep
        # Most users have the same few device sets ((1,), (1, 2), ...): share one tuple each
        # (device numbers are the clients' choice, so only the first few sets are kept).
        shared = self._device_sets.get(devices)
        if shared is None and len(self._device_sets) < SHARED_DEVICE_SETS:
            shared = self._device_sets[devices] = devices
        cache[user] = shared or devices

    def register_device(self, user: str, device: int, max_devices: int) -> tuple[int, ...]:
        # Not through the cache: a login is no sign that someone will message this user soon,
        # and idle sessions must not pay for cached device lists (docs/benchmarks.md, RSS).
        prefix = self._user_prefix(user)
        known = self._device_cache.get(user)
        if known is None:
            with self._env.begin(db=self._devices) as txn:
                known = self._list_in(txn, prefix)
        if device in known:  # the common case, a known device: no write transaction
            return known
        key = prefix + _DEVICE.pack(device)
        self._device_cache.pop(user, None)
        with self._env.begin(db=self._devices, write=True) as txn:
            known = self._list_in(txn, prefix)
            if device in known:  # registered by another process sharing the environment
                return known
            if len(known) >= max_devices:
                raise AuthError(
                    f"user already has {len(known)} devices (limit {max_devices}); remove one first",
                    code="device_limit",
                )
            txn.put(key, b"")
        return tuple(sorted(known + (device,)))

    @staticmethod
    def _list_in(txn, prefix: bytes) -> tuple[int, ...]:
        return tuple(_DEVICE.unpack(key[len(prefix) :])[0] for key in _scan(txn.cursor(), prefix))

    # -- mailboxes

    def commit(self, batch: WriteBatch) -> None:
        try:
            with self._env.begin(write=True) as txn:
                states: dict[bytes, MailboxState] = {}
                for message in batch.messages:
                    if message.control:
                        self._write_control(txn, message, states)
                    else:
                        self._write_message(txn, message, states)
                released: dict[bytes, int] = {}
                for dkey, seqs in batch.deletions:
                    delete_items(txn.pop, self._mbox, dkey, seqs, self._state(txn, dkey, states), released)
                if released:
                    self._release_bodies(txn, released)
                for dkey, state in states.items():
                    txn.put(dkey, state.pack(), db=self._seqs)
        except lmdb.MapFullError:
            for message in batch.messages:
                message.dup, message.stored, message.refused = False, [], None
                message.kept, message.dropped_full = None, 0
            raise StoreFullError("the gateway's storage is full; try again later") from None
        self.dedup_unswept += sum(1 for message in batch.messages if message.stored and not message.control)

    def _state(self, txn, dkey: bytes, states: dict) -> MailboxState:
        state = states.get(dkey)
        if state is None:
            state = states[dkey] = MailboxState(txn.get(dkey, db=self._seqs))
        return state

    def _guard_fails(self, txn, message: StoredMessage) -> bool:
        """The entry was computed from a group record that is not the stored one (an earlier change
        of the group failed): refuse it whole (``conflict``)."""
        g, ver = message.guard
        raw = txn.get(g, db=self._groups)
        if (_SEQ.unpack(raw[:8])[0] if raw is not None else 0) != ver:
            message.refused = "conflict"
            return True
        return False

    def _write_message(self, txn, message: StoredMessage, states: dict) -> None:
        dedup_key = message.sender_key + message.msg_id
        ts_prefix = _TS.pack(message.ts_ms)
        # A duplicate answers dup whatever the group became; else a guarded entry must match.
        if message.guard is not None and txn.get(dedup_key, db=self._dedup) is None and self._guard_fails(txn, message):
            return
        # One insert is both the duplicate check and the dedup entry (undone below if refused).
        if not txn.put(dedup_key, ts_prefix, overwrite=False, db=self._dedup):
            message.dup = True
            message.ts_ms = _TS.unpack(txn.get(dedup_key, db=self._dedup))[0]
            return
        ts = message.ts_ms
        # Build every copy first: if any recipient mailbox is over its quota, none is stored (a
        # group message skips that device instead: ``skip_full``). The per-copy loops are
        # core/mailbox.py's (compiled, or the pure twin).
        plan = plan_copies(message.items, states, lambda dkey: self._state(txn, dkey, states), ts,
                           self.max_mailbox_items, self.max_mailbox_bytes, message.skip_full)
        if plan is None:
            message.refused = "mailbox_full"
            txn.delete(dedup_key, db=self._dedup)
            return
        planned, message.kept, message.dropped_full = plan
        body_id = None
        if message.shared and len(planned) > 1:
            body_id = self._store_body(txn, message.items[0][1], ts, len(planned))
        write_copies(txn.put, self._mbox, planned, states, ts_prefix, body_id, message.stored)

    def _store_body(self, txn, build, ts: int, copies: int) -> int | None:
        """Store what the copies of a shared message have in common, referred to ``copies`` times;
        returns its id, or None when ``build`` does not make copies of the shared form (then
        every copy is stored whole)."""
        first = build(0, ts)  # seq 0 packs as one byte
        head = len(SHARED_DLV_HEAD)
        if not first.startswith(SHARED_DLV_HEAD) or first[head] != 0:
            return None
        body_id = self._next_body
        self._next_body += 1
        body_key = _SEQ.pack(body_id)
        txn.put(body_key, first[head + 1:], db=self._bodies)
        txn.put(body_key, _REFS.pack(copies), db=self._body_refs)
        return body_id

    def _release_bodies(self, txn, released: dict[bytes, int]) -> None:
        """Drop ``released[body key]`` references from each body; a body without any goes."""
        refs_db = self._body_refs
        for body_key, count in released.items():
            raw = txn.get(body_key, db=refs_db)
            left = (_REFS.unpack(raw)[0] if raw is not None else 0) - count
            if left > 0:
                txn.put(body_key, _REFS.pack(left), db=refs_db)
            else:
                txn.delete(body_key, db=refs_db)
                txn.delete(body_key, db=self._bodies)

    def _write_control(self, txn, message: StoredMessage, states: dict) -> None:
        if message.guard is not None and self._guard_fails(txn, message):
            return
        if message.prekeys is not None:
            user, devices = message.prekeys
            message.reply["bundles"] = self._bundles_in(txn, user, devices, take=True)
        change = message.group
        if change is not None:
            raw = txn.get(change.g, db=self._groups)
            stored_ver = _SEQ.unpack(raw[:8])[0] if raw is not None else 0
            if stored_ver != change.prior_ver:
                message.refused = "conflict"  # computed from a change that never committed
                return
            if change.record is None:
                txn.delete(change.g, db=self._groups)
            else:
                txn.put(change.g, change.record.pack(), db=self._groups)
        ts = message.ts_ms
        ts_prefix = _TS.pack(ts)
        stored = message.stored
        mbox = self._mbox
        # Past its quota a mailbox still takes control items, up to the overdraft: beyond that a
        # dormant device's events are skipped (its client sees the gap in ``ver`` and asks group.get).
        max_items = self.max_mailbox_items + self.control_overdraft_items
        max_bytes = self.max_mailbox_bytes + self.control_overdraft_bytes
        kept: list[int] | None = None
        for index, (dkey, build) in enumerate(message.items):
            state = self._state(txn, dkey, states)
            seq = state.last_seq + 1
            value = build(seq, ts)
            if state.items + 1 > max_items or state.bytes + len(value) > max_bytes:
                if kept is None:
                    kept = list(range(index))
                message.dropped_full += 1
                continue
            if kept is not None:
                kept.append(index)
            state.last_seq = seq
            state.items += 1
            state.bytes += len(value)
            txn.put(dkey + _SEQ.pack(seq), ts_prefix + value, db=mbox)
            stored.append((dkey, seq, value))
        message.kept = kept

    def expire(self, before_ms: int, limit: int = 10_000, max_devices: int = 20_000) -> int:
        """Delete up to ``limit`` items stored before ``before_ms`` (the TTL sweep); returns how
        many. Walks the devices from where the previous call stopped (at most ``max_devices`` of
        them, at most once round) and cuts the expired head of each mailbox: seqs are handed out in
        time order, so the first item that is not expired ends a device's turn. (If the clock went
        back, an item newer than the cut waits for the items before it.)"""
        removed = 0
        cutoff = _TS.pack(before_ms)
        with self._env.begin(write=True) as txn:
            states: dict[bytes, MailboxState] = {}
            released: dict[bytes, int] = {}
            devices = txn.cursor(db=self._seqs)
            items = txn.cursor(db=self._mbox)
            if not (devices.set_range(self._expire_from) if self._expire_from else devices.first()):
                self._expire_from = None
                if not devices.first():
                    return 0
            for _ in range(max_devices):
                dkey = devices.key()
                if items.set_range(dkey):
                    while removed < limit:
                        key, value = items.item()
                        if not key.startswith(dkey) or value[:8] >= cutoff:
                            break
                        state = self._state(txn, dkey, states)
                        state.items -= 1
                        state.bytes -= forget_item(value, released)
                        items.delete()  # moves to the next item
                        removed += 1
                if removed >= limit:
                    self._expire_from = dkey  # this device may have more: resume here
                    break
                if not devices.next():
                    self._expire_from = None  # a whole round: the next call starts again
                    break
                self._expire_from = devices.key()
            if released:
                self._release_bodies(txn, released)
            for dkey, state in states.items():
                txn.put(dkey, state.pack(), db=self._seqs)
        return removed

    def forget_duplicates(self, before_ms: int, limit: int = 10_000) -> int:
        """End the dedup window for messages first stored before ``before_ms``: scans ``limit``
        dedup entries from where the previous call stopped (wrapping round at most once) and
        deletes the old ones; returns how many. A resend after that is stored as new.
        ``dedup_unswept`` (entries added minus entries scanned) tells the caller to come back
        soon: scanning at least as fast as the table grows bounds an entry's life to about two
        windows without an age index on the hot path."""
        cutoff = _TS.pack(before_ms)
        forgotten = scanned = 0
        with self._env.begin(write=True, db=self._dedup) as txn:
            cursor = txn.cursor()
            if not (cursor.set_range(self._dedup_sweep_from) if self._dedup_sweep_from else cursor.first()):
                if not cursor.first():
                    self._dedup_sweep_from = None
                    self.dedup_unswept = 0
                    return 0
            wrapped = False
            while scanned < limit:
                key, first_ts = cursor.item()
                if not key:  # past the end (the last entry was just deleted)
                    if wrapped or not cursor.first():
                        break
                    wrapped = True
                    continue
                scanned += 1
                if first_ts < cutoff:
                    cursor.delete()  # moves to the next entry
                    forgotten += 1
                elif not cursor.next():
                    if wrapped or not cursor.first():
                        break
                    wrapped = True
            self._dedup_sweep_from = cursor.key() or None
        self.dedup_unswept = max(0, self.dedup_unswept - scanned)
        return forgotten

    def usage(self) -> dict:
        """For operators: items in all mailboxes, and how much of the LMDB map is in use (a full
        map answers senders ``overloaded``). Reads LMDB's own statistics, not the data."""
        info, env_stat = self._env.info(), self._env.stat()
        with self._env.begin() as txn:
            tables = [txn.stat(self._mbox), txn.stat(self._bodies), txn.stat(self._body_refs)]
        page = env_stat["psize"]
        return {
            "mailbox_items": tables[0]["entries"],
            # the items and the group bodies they share
            "mailbox_bytes": sum(t["branch_pages"] + t["leaf_pages"] + t["overflow_pages"] for t in tables) * page,
            "shared_bodies": tables[1]["entries"],
            "map_used_bytes": (info["last_pgno"] + 1) * page,
            "map_size_bytes": info["map_size"],
        }

    def mailbox_state(self, dkey: bytes) -> MailboxState:
        """The device's counters: last seq, items and bytes stored."""
        with self._env.begin(db=self._seqs) as txn:
            return MailboxState(txn.get(dkey))

    def pending(self, dkey: bytes, after_seq: int = 0, limit: int | None = None) -> list[tuple[int, bytes]]:
        start = dkey + _SEQ.pack(after_seq + 1)
        prefix_len = len(dkey)
        with self._env.begin(db=self._mbox) as txn:
            # Device keys never prefix one another (addresses hold no zero byte), so every key
            # under ``dkey`` is one of its items; the stored ts is cut off the value.
            items = []
            for key, value in _scan(txn.cursor(), dkey, start, limit, values=True):
                seq = _SEQ.unpack(key[prefix_len:])[0]
                if value[8] == SHARED_MARK:  # a copy of a shared body: make the whole dlv again
                    body = txn.get(value[9:17], db=self._bodies)
                    value = splice(seq, body)
                    items.append((seq, value))
                else:
                    items.append((seq, value[8:]))
            return items

    def pending_count(self, dkey: bytes) -> int:
        return self.mailbox_state(dkey).items

    # -- consent, blocks, reports and the directory (the iq operations; see the module docstring)

    def _open_social_dbs(self) -> None:
        env = self._env
        self._consent = env.open_db(b"consent")
        self._blocks = env.open_db(b"blocks")
        self._block_counts = env.open_db(b"block_counts")
        self._blocked_by = env.open_db(b"blocked_by")
        self._index_blockers()
        self._reports = env.open_db(b"reports")
        self._counters = env.open_db(b"counters")
        self._directory = env.open_db(b"directory")
        self._phones = env.open_db(b"phones")
        self._prekeys = env.open_db(b"prekeys")
        self._otpks = env.open_db(b"otpks")
        self._groups = env.open_db(b"groups")

    def _write(self):
        """A write transaction whose ``MapFullError`` becomes ``StoreFullError`` (nothing written)."""
        return _WriteTxn(self._env)

    @staticmethod
    def _decode_consent(raw) -> tuple[tuple[str, ...], bool] | None:
        if raw is None:
            return None
        accept, discoverable = msgpack.unpackb(raw, raw=False)
        return tuple(accept), bool(discoverable)

    def consent(self, user: str) -> tuple[tuple[str, ...], bool] | None:
        with self._env.begin(db=self._consent) as txn:
            return self._decode_consent(txn.get(user.encode("utf-8")))

    def set_consent(self, user: str, accept: tuple[str, ...], discoverable: bool) -> None:
        value = msgpack.packb([list(accept), bool(discoverable)], use_bin_type=True)
        with self._write() as txn:
            txn.put(user.encode("utf-8"), value, db=self._consent)

    def reach(self, user: str, max_blocked: int) -> tuple[tuple[tuple[str, ...], bool] | None, frozenset | None]:
        key = user.encode("utf-8")
        prefix = key + b"\x00"
        with self._env.begin() as txn:
            consent = self._decode_consent(txn.get(key, db=self._consent))
            count = txn.get(key, db=self._block_counts)
            if count is None:
                return consent, frozenset()
            if _COUNT.unpack(count)[0] > max_blocked:
                return consent, None
            return consent, frozenset(self._blocked_in(txn, prefix, None, None))

    def is_blocked(self, user: str, other: str) -> bool:
        with self._env.begin(db=self._blocks) as txn:
            return txn.get(self._user_prefix(user) + other.encode("utf-8")) is not None

    def add_block(self, user: str, other: str, max_blocks: int) -> bool:
        key = user.encode("utf-8")
        entry = key + b"\x00" + other.encode("utf-8")
        with self._env.begin(db=self._blocks) as txn:  # already blocked: no write, no fsync
            if txn.get(entry) is not None:
                return False
        with self._write() as txn:
            if txn.get(entry, db=self._blocks) is not None:
                return False
            raw = txn.get(key, db=self._block_counts)
            count = _COUNT.unpack(raw)[0] if raw is not None else 0
            if count >= max_blocks:
                raise StoreLimitError(f"you already block {count} users (limit {max_blocks}); unblock some first")
            txn.put(entry, b"", db=self._blocks)
            txn.put(other.encode("utf-8") + b"\x00" + key, b"", db=self._blocked_by)
            txn.put(key, _COUNT.pack(count + 1), db=self._block_counts)
            return True

    def del_block(self, user: str, other: str) -> bool:
        key = user.encode("utf-8")
        entry = key + b"\x00" + other.encode("utf-8")
        with self._env.begin(db=self._blocks) as txn:
            if txn.get(entry) is None:
                return False
        with self._write() as txn:
            if not txn.delete(entry, db=self._blocks):
                return False
            txn.delete(other.encode("utf-8") + b"\x00" + key, db=self._blocked_by)
            count = _COUNT.unpack(txn.get(key, db=self._block_counts))[0] - 1
            if count:
                txn.put(key, _COUNT.pack(count), db=self._block_counts)
            else:
                txn.delete(key, db=self._block_counts)
            return True

    def blocked(self, user: str, after: str | None = None, limit: int | None = None) -> list[str]:
        with self._env.begin() as txn:
            return self._blocked_in(txn, self._user_prefix(user), after, limit)

    def _blocked_in(self, txn, prefix: bytes, after: str | None, limit: int | None) -> list[str]:
        start = None if after is None else prefix + after.encode("utf-8") + b"\x00"  # first key > after
        cursor = txn.cursor(db=self._blocks)
        return [key[len(prefix) :].decode("utf-8") for key in _scan(cursor, prefix, start, limit)]

    def blockers(self, user: str, limit: int) -> frozenset | None:
        prefix = self._user_prefix(user)
        with self._env.begin(db=self._blocked_by) as txn:
            found = [key[len(prefix):] for key in _scan(txn.cursor(), prefix, None, limit + 1)]
        if len(found) > limit:
            return None
        return frozenset(blocker.decode("utf-8") for blocker in found)

    def _index_blockers(self) -> None:
        """Fill ``blocked_by`` from ``blocks`` once, for an environment written before the reverse
        index existed (its absence with blocks present is the sign)."""
        with self._env.begin() as txn:
            if txn.stat(self._blocked_by)["entries"] or not txn.stat(self._blocks)["entries"]:
                return
        with self._write() as txn:
            for entry in txn.cursor(db=self._blocks).iternext(values=False):
                user, _, other = entry.partition(b"\x00")
                txn.put(other + b"\x00" + user, b"", db=self._blocked_by)

    def block_count(self, user: str) -> int:
        with self._env.begin(db=self._block_counts) as txn:
            raw = txn.get(user.encode("utf-8"))
            return _COUNT.unpack(raw)[0] if raw is not None else 0

    def add_report(self, record: dict) -> int:
        value = msgpack.packb(record, use_bin_type=True)
        with self._write() as txn:
            last = txn.get(b"reports", db=self._counters)
            number = (_SEQ.unpack(last)[0] if last is not None else 0) + 1
            txn.put(b"reports", _SEQ.pack(number), db=self._counters)
            txn.put(_SEQ.pack(number), value, db=self._reports)
            return number

    def report(self, number: int) -> dict | None:
        with self._env.begin(db=self._reports) as txn:
            raw = txn.get(_SEQ.pack(number))
            return msgpack.unpackb(raw, raw=False) if raw is not None else None

    def reports(self, after: int = 0, limit: int = 100, *, unresolved: bool = False) -> list[tuple[int, dict]]:
        found: list[tuple[int, dict]] = []
        with self._env.begin(db=self._reports) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(_SEQ.pack(after + 1)):
                return found
            for key, raw in cursor.iternext():
                record = msgpack.unpackb(raw, raw=False)
                if unresolved and "resolution" in record:
                    continue
                found.append((_SEQ.unpack(key)[0], record))
                if len(found) >= limit:
                    break
        return found

    def resolve_report(self, number: int, resolution: dict) -> bool:
        key = _SEQ.pack(number)
        with self._write() as txn:
            raw = txn.get(key, db=self._reports)
            if raw is None:
                return False
            record = msgpack.unpackb(raw, raw=False)
            record["resolution"] = resolution
            txn.put(key, msgpack.packb(record, use_bin_type=True), db=self._reports)
            return True

    def set_phone(self, user: str, phone: str | None) -> bool:
        key = user.encode("utf-8")
        new = phone.encode("utf-8") if phone is not None else None
        with self._env.begin(db=self._phones) as txn:  # the common case at login: unchanged, no write
            if txn.get(key) == new:
                return False
        with self._write() as txn:
            old = txn.get(key, db=self._phones)
            if old == new:
                return False
            if old is not None:
                txn.delete(old + b"\x00" + key, db=self._directory)
            if new is None:
                txn.delete(key, db=self._phones)
            else:
                txn.put(key, new, db=self._phones)
                txn.put(new + b"\x00" + key, b"", db=self._directory)
            return True

    def phone(self, user: str) -> str | None:
        with self._env.begin(db=self._phones) as txn:
            raw = txn.get(user.encode("utf-8"))
            return raw.decode("utf-8") if raw is not None else None

    def directory(self, phone: str, limit: int | None = None) -> list[str]:
        prefix = phone.encode("utf-8") + b"\x00"
        with self._env.begin(db=self._directory) as txn:
            return [key[len(prefix) :].decode("utf-8") for key in _scan(txn.cursor(), prefix, None, limit)]

    # -- the key directory (keys.put, keys.get, keys.count)
    #
    # A device's identity key and signed prekey are one ``prekeys`` record; its one-time prekeys
    # are ``otpks`` entries under its device key (device keys never prefix one another), so a range
    # scan over the device key lists them by id. The stock is bounded (``max_otpks``), so it is
    # counted by that scan and no counter has to be kept in step with it.

    def put_prekeys(
        self, user: str, device: int, ik: bytes, spk: tuple[int, bytes, bytes], otpks: list[tuple[int, bytes]],
        max_otpks: int,
    ) -> int:
        dkey = device_key(user, device)
        record = msgpack.packb([ik, *spk], use_bin_type=True)
        wanted = dict(otpks)  # an id given twice: the last key wins
        with self._write() as txn:
            cursor = txn.cursor(db=self._otpks)
            old = txn.get(dkey, db=self._prekeys)
            stored = list(_scan(cursor, dkey))
            if old is not None and msgpack.unpackb(old, raw=False)[0] != ik:
                # A new identity key: the device was reset, and the one-time prekeys stored under
                # the old identity are useless to it. (Undone with the rest if the put is refused.)
                for key in stored:
                    txn.delete(key, db=self._otpks)
                stored = []
            have = {_DEVICE.unpack(key[len(dkey) :])[0] for key in stored}
            count = len(have) + sum(1 for key_id in wanted if key_id not in have)
            if count > max_otpks:
                raise StoreLimitError(
                    f"{count - len(have)} new one-time prekeys on top of the {len(have)} stored pass the "
                    f"limit of {max_otpks} per device; upload fewer"
                )
            txn.put(dkey, record, db=self._prekeys)
            for key_id, key in wanted.items():
                txn.put(dkey + _DEVICE.pack(key_id), key, db=self._otpks)
            return count

    def read_prekeys(self, user: str, devices) -> list[dict]:
        with self._env.begin() as txn:
            return self._bundles_in(txn, user, sorted(set(devices)), take=False)

    def take_prekeys(self, user: str, devices) -> list[dict]:
        devices = sorted(set(devices))
        with self._env.begin() as txn:
            bundles = self._bundles_in(txn, user, devices, take=False)
        if all(bundle["otpk"] is None for bundle in bundles):
            return bundles  # no one-time prekey to hand out: no write transaction, no fsync
        with self._write() as txn:  # read again: what is handed out is what this transaction deletes
            return self._bundles_in(txn, user, devices, take=True)

    def _bundles_in(self, txn, user: str, devices: list[int], take: bool) -> list[dict]:
        bundles = []
        cursor = txn.cursor(db=self._otpks)
        for device in devices:
            dkey = device_key(user, device)
            raw = txn.get(dkey, db=self._prekeys)
            if raw is None:
                continue  # nothing published
            ik, spk_id, spk_key, spk_sig = msgpack.unpackb(raw, raw=False)
            otpk = None
            if cursor.set_range(dkey) and cursor.key().startswith(dkey):
                key = cursor.key()
                otpk = {"id": _DEVICE.unpack(key[len(dkey) :])[0], "key": cursor.value()}
                if take:
                    cursor.delete()
            bundles.append(
                {"device": device, "ik": ik, "spk": {"id": spk_id, "key": spk_key, "sig": spk_sig}, "otpk": otpk}
            )
        return bundles

    def prekey_count(self, user: str, device: int) -> int:
        dkey = device_key(user, device)
        with self._env.begin(db=self._otpks) as txn:
            return sum(1 for _ in _scan(txn.cursor(), dkey))

    # -- groups (records are written by ``commit``, see ``_write_control``)

    def group(self, g: bytes) -> GroupRecord | None:
        with self._env.begin(db=self._groups) as txn:
            raw = txn.get(g)
            return GroupRecord.unpack(raw) if raw is not None else None

    def seen(self, sender_key: bytes, msg_id: bytes) -> bool:
        """Is (sender device, message id) in the dedup window (a resend would answer ``dup``)?"""
        with self._env.begin(db=self._dedup) as txn:
            return txn.get(sender_key + msg_id) is not None


_COUNT = struct.Struct(">I")


def _scan(cursor, prefix: bytes, start: bytes | None = None, limit: int | None = None, values: bool = False):
    """Keys (or key/value pairs) under ``prefix``, in order, from ``start`` (default: the prefix)
    and at most ``limit`` of them: the range scan behind every per-user and per-device list."""
    if not cursor.set_range(start or prefix):
        return
    count = 0
    for entry in cursor.iternext(keys=True, values=values):
        if not (entry[0] if values else entry).startswith(prefix):
            return
        yield entry
        count += 1
        if limit is not None and count >= limit:
            return


class _WriteTxn:
    """``with`` a write transaction of ``env``: commits on success, aborts on error, and turns a
    full map into ``StoreFullError``."""

    __slots__ = ("_env", "_txn")

    def __init__(self, env) -> None:
        self._env = env
        self._txn = None

    def __enter__(self):
        self._txn = self._env.begin(write=True)
        return self._txn

    def __exit__(self, exc_type, exc, tb) -> bool:
        txn, self._txn = self._txn, None
        if exc_type is not None:
            txn.abort()
            if issubclass(exc_type, lmdb.MapFullError):
                raise StoreFullError("the gateway's storage is full; try again later") from None
            return False
        try:
            txn.commit()
        except lmdb.MapFullError:
            raise StoreFullError("the gateway's storage is full; try again later") from None
        return False
