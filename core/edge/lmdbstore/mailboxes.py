"""Devices, mailboxes, shared group bodies and the dedup window: tables ``devices``, ``mbox``,
``seqs``, ``bodies``, ``body_refs``, ``dedup``, and in ``store_meta`` the largest frame a stored
item may need (``check_item_frames``).

The commit's writers (``write_message``, ``write_control``, ``delete``, ``save``) take the
facade's write transaction and the ``MailboxState`` of every device it touched so far; the
per-copy loops are ``core/edge/mailbox.py``'s (compiled, or the pure twin). Reads and the two sweeps
run in transactions of their own. Key layouts: docs/architecture.md, "Storage".
"""

from __future__ import annotations

import logging
import struct

import lmdb

from interlink.core.domain.batch import ControlEntry, MessageEntry
from interlink.core.errors import ConfigError, StoreLimitError
from interlink.core.domain.fanout import DLV_HEAD, splice
from interlink.core.edge.lmdbstore.env import scan, user_prefix, write_txn
from interlink.core.edge.mailbox import SHARED_MARK, MailboxState, delete_items, forget_item, plan_copies, write_copies
from interlink.core.protocol.wire import TAG_BYTES, WIRE_MAX_FRAME_BYTES

log = logging.getLogger("interlink.store")
_DEVICE = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
_TS = struct.Struct(">Q")
_REFS = struct.Struct(">I")  # a shared body's reference count

# How far past its quota a mailbox still takes control items (group events): a change reaches a
# full mailbox, but a dormant device in busy groups cannot grow without bound.
CONTROL_OVERDRAFT_ITEMS = 1_000
CONTROL_OVERDRAFT_BYTES = 4 << 20
DEVICE_CACHE_USERS = 100_000  # users whose device lists stay in memory (about 100 bytes each)
SHARED_DEVICE_SETS = 1024  # distinct device lists the cache shares between users
ITEM_FRAME_KEY = b"item_frame"  # in store_meta: the largest frame a stored item may need


class Mailboxes:
    """The mailbox tables of one environment, the quotas, and the cached device lists."""

    def __init__(
        self, env: lmdb.Environment, *, max_mailbox_items: int, max_mailbox_bytes: int, device_cache_users: int,
        control_overdraft_items: int, control_overdraft_bytes: int,
    ) -> None:
        self.env = env
        self.max_mailbox_items = max_mailbox_items
        self.max_mailbox_bytes = max_mailbox_bytes
        self.control_overdraft_items = control_overdraft_items
        self.control_overdraft_bytes = control_overdraft_bytes
        self.devices_db = env.open_db(b"devices")
        self.mbox_db = env.open_db(b"mbox")
        self.seqs_db = env.open_db(b"seqs")
        self.dedup_db = env.open_db(b"dedup")
        self.bodies_db = env.open_db(b"bodies")
        self.body_refs_db = env.open_db(b"body_refs")
        self.meta_db = env.open_db(b"store_meta")
        with env.begin(db=self.bodies_db) as txn:
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

    # -- devices

    def devices(self, user: str) -> tuple[int, ...]:
        devices = self._device_cache.get(user)
        if devices is None:
            with self.env.begin(db=self.devices_db) as txn:
                devices = _devices_in(txn, user_prefix(user), self.devices_db)
            self._remember_devices(user, devices)
        return devices

    def forget_cached_devices(self) -> None:
        """Read every device list from the table again (records were moved in or out under it)."""
        self._device_cache.clear()

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
        prefix = user_prefix(user)
        known = self._device_cache.get(user)
        if known is None:
            with self.env.begin(db=self.devices_db) as txn:
                known = _devices_in(txn, prefix, self.devices_db)
        if device in known:  # the common case, a known device: no write transaction
            return known
        self._device_cache.pop(user, None)
        with write_txn(self.env) as txn:
            known = _devices_in(txn, prefix, self.devices_db)
            if device in known:  # registered by another process sharing the environment
                return known
            if len(known) >= max_devices:
                raise StoreLimitError(f"user already has {len(known)} devices (limit {max_devices}); remove one first")
            txn.put(prefix + _DEVICE.pack(device), b"", db=self.devices_db)
        return tuple(sorted(known + (device,)))

    # -- the commit's writers (the facade's transaction)

    def state(self, txn, dkey: bytes, states: dict) -> MailboxState:
        """The device's counters as this transaction left them so far."""
        state = states.get(dkey)
        if state is None:
            state = states[dkey] = MailboxState(txn.get(dkey, db=self.seqs_db))
        return state

    def items_in(self, txn, dkey: bytes, states: dict) -> int:
        """How many items the device holds as this transaction left them so far (read only)."""
        state = states.get(dkey)
        return (state if state is not None else MailboxState(txn.get(dkey, db=self.seqs_db))).items

    def is_duplicate(self, txn, entry: MessageEntry) -> bool:
        return txn.get(entry.sender_key + entry.msg_id, db=self.dedup_db) is not None

    def write_message(self, txn, entry: MessageEntry, states: dict) -> None:
        """Deduplicate ``entry`` and store one copy per item, all or none against the quotas
        (``skip_full``: each copy on its own)."""
        dedup_key = entry.sender_key + entry.msg_id
        ts_prefix = _TS.pack(entry.ts_ms)
        # One insert is both the duplicate check and the dedup entry (undone below if refused).
        if not txn.put(dedup_key, ts_prefix, overwrite=False, db=self.dedup_db):
            entry.dup = True
            entry.ts_ms = _TS.unpack(txn.get(dedup_key, db=self.dedup_db))[0]
            return
        ts = entry.ts_ms
        plan = plan_copies(entry.items, states, lambda dkey: self.state(txn, dkey, states), ts,
                           self.max_mailbox_items, self.max_mailbox_bytes, entry.skip_full)
        if plan is None:
            entry.refused = "mailbox_full"
            txn.delete(dedup_key, db=self.dedup_db)
            return
        planned, entry.kept, entry.dropped_full = plan
        body_id = None
        if entry.shared and len(planned) > 1:
            body_id = self._store_body(txn, entry.items[0][1], ts, len(planned))
        write_copies(txn.put, self.mbox_db, planned, states, ts_prefix, body_id, entry.stored)

    def _store_body(self, txn, build, ts: int, copies: int) -> int | None:
        """Store what the copies of a shared message have in common, referred to ``copies`` times;
        returns its id, or None when ``build`` does not make copies of the shared form (then
        every copy is stored whole)."""
        first = build(0, ts)  # seq 0 packs as one byte
        head = len(DLV_HEAD)
        if not first.startswith(DLV_HEAD) or first[head] != 0:
            return None
        body_id = self._next_body
        self._next_body += 1
        body_key = _SEQ.pack(body_id)
        txn.put(body_key, first[head + 1:], db=self.bodies_db)
        txn.put(body_key, _REFS.pack(copies), db=self.body_refs_db)
        return body_id

    def write_control(self, txn, entry: ControlEntry, states: dict) -> None:
        """Store the entry's items past the quotas, up to the control overdraft: beyond it a
        dormant device's events are skipped (its client sees the gap in ``ver`` and asks
        ``group.get``)."""
        ts = entry.ts_ms
        planned, entry.kept, dropped = plan_copies(
            entry.items, states, lambda dkey: self.state(txn, dkey, states), ts,
            self.max_mailbox_items + self.control_overdraft_items, self.max_mailbox_bytes + self.control_overdraft_bytes,
            True,
        )
        entry.dropped_full += dropped
        write_copies(txn.put, self.mbox_db, planned, states, _TS.pack(ts), None, entry.stored)

    def delete(self, txn, deletions: list[tuple[bytes, list[int]]], states: dict) -> None:
        """The received items (``recv``), and the shared bodies they were the last references of."""
        released: dict[bytes, int] = {}
        for dkey, seqs in deletions:
            delete_items(txn.pop, self.mbox_db, dkey, seqs, self.state(txn, dkey, states), released)
        if released:
            self.release_bodies(txn, released)

    def save(self, txn, states: dict) -> None:
        """Write back the counters of every device the transaction touched."""
        for dkey, state in states.items():
            txn.put(dkey, state.pack(), db=self.seqs_db)

    def release_bodies(self, txn, released: dict[bytes, int]) -> None:
        """Drop ``released[body key]`` references from each body; a body without any goes."""
        refs_db = self.body_refs_db
        for body_key, count in released.items():
            raw = txn.get(body_key, db=refs_db)
            left = (_REFS.unpack(raw)[0] if raw is not None else 0) - count
            if left > 0:
                txn.put(body_key, _REFS.pack(left), db=refs_db)
            else:
                txn.delete(body_key, db=refs_db)
                txn.delete(body_key, db=self.bodies_db)

    # -- the sweeps

    def expire(self, before_ms: int, limit: int = 10_000, max_devices: int = 20_000) -> int:
        """Delete up to ``limit`` items stored before ``before_ms`` (the TTL sweep); returns how
        many. Walks the devices from where the previous call stopped (at most ``max_devices`` of
        them, at most once round) and cuts the expired head of each mailbox: seqs are handed out in
        time order, so the first item that is not expired ends a device's turn. (If the clock went
        back, an item newer than the cut waits for the items before it.)"""
        removed = 0
        cutoff = _TS.pack(before_ms)
        with self.env.begin(write=True) as txn:
            states: dict[bytes, MailboxState] = {}
            released: dict[bytes, int] = {}
            devices = txn.cursor(db=self.seqs_db)
            items = txn.cursor(db=self.mbox_db)
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
                        state = self.state(txn, dkey, states)
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
                self.release_bodies(txn, released)
            self.save(txn, states)
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
        with self.env.begin(write=True, db=self.dedup_db) as txn:
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

    # -- reads

    def usage(self) -> dict:
        """For operators: items in all mailboxes, and how much of the LMDB map is in use (a full
        map answers senders ``overloaded``). Reads LMDB's own statistics, not the data."""
        env = self.env
        info, env_stat = env.info(), env.stat()
        with env.begin() as txn:
            tables = [txn.stat(self.mbox_db), txn.stat(self.bodies_db), txn.stat(self.body_refs_db)]
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
        with self.env.begin(db=self.seqs_db) as txn:
            return MailboxState(txn.get(dkey))

    def pending(self, dkey: bytes, after_seq: int = 0, limit: int | None = None) -> list[tuple[int, bytes]]:
        start = dkey + _SEQ.pack(after_seq + 1)
        prefix_len = len(dkey)
        with self.env.begin(db=self.mbox_db) as txn:
            # Device keys never prefix one another, so every key under ``dkey`` is one of its
            # items; the stored ts is cut off the value.
            items = []
            for key, value in scan(txn.cursor(), dkey, start, limit, values=True):
                seq = _SEQ.unpack(key[prefix_len:])[0]
                if value[8] == SHARED_MARK:  # a copy of a shared body: make the whole dlv again
                    body = txn.get(value[9:17], db=self.bodies_db)
                    value = splice(seq, body)
                    items.append((seq, value))
                else:
                    items.append((seq, value[8:]))
            return items

    # -- the frame stored items need: a gateway restarted with a smaller max_frame_bytes could
    # never push an item stored under a larger one, and its device would fail every session.

    def item_frame_bound(self, txn=None) -> int:
        """The largest frame an item stored here may need: the largest ``max_frame_bytes`` the
        store was served with since it last held nothing larger, or an imported item's frame. A
        store of a version before this record: the wire's largest frame."""
        if txn is None:
            with self.env.begin() as txn:
                return self.item_frame_bound(txn)
        raw = txn.get(ITEM_FRAME_KEY, db=self.meta_db)
        return WIRE_MAX_FRAME_BYTES if raw is None else _SEQ.unpack(raw)[0]

    def set_item_frame_bound(self, txn, frame_bytes: int) -> None:
        txn.put(ITEM_FRAME_KEY, _SEQ.pack(frame_bytes), db=self.meta_db)

    def raise_item_frame_bound(self, txn, dlv_bytes: int) -> None:
        """Items of ``dlv_bytes`` came in from elsewhere (a move file): the bound covers them."""
        if dlv_bytes + TAG_BYTES > self.item_frame_bound(txn):
            self.set_item_frame_bound(txn, dlv_bytes + TAG_BYTES)

    def oversized_items(self, max_plaintext: int) -> tuple[int, int, int]:
        """Stored items whose ``dlv`` is longer than ``max_plaintext``: how many, of how many
        devices, and the longest ``dlv`` (0 when there are none). Reads every item."""
        count = devices = longest = 0
        last_device = None
        with self.env.begin() as txn:
            for key, value in txn.cursor(db=self.mbox_db).iternext():
                if value[8] == SHARED_MARK:
                    length = len(splice(_SEQ.unpack(key[-8:])[0], txn.get(value[9:17], db=self.bodies_db)))
                else:
                    length = len(value) - 8  # the stored ts is not sent
                if length > max_plaintext:
                    count += 1
                    longest = max(longest, length)
                    if key[:-8] != last_device:
                        devices += 1
                        last_device = key[:-8]
        return count, devices, longest

    def pending_count(self, dkey: bytes) -> int:
        return self.mailbox_state(dkey).items

    def seen(self, sender_key: bytes, msg_id: bytes) -> bool:
        with self.env.begin(db=self.dedup_db) as txn:
            return txn.get(sender_key + msg_id) is not None


def _devices_in(txn, prefix: bytes, db) -> tuple[int, ...]:
    return tuple(_DEVICE.unpack(key[len(prefix) :])[0] for key in scan(txn.cursor(db=db), prefix))


def check_item_frames(mailboxes: Mailboxes, max_frame_bytes: int) -> None:
    """At a gateway's start: ``ConfigError`` when ``max_frame_bytes`` is smaller than frames its
    store's items need (they could never be pushed: each session of their device would fail).
    Otherwise ``max_frame_bytes`` is recorded as the bound; only a smaller one reads the items."""
    bound = mailboxes.item_frame_bound()
    if max_frame_bytes < bound:
        log.info("max_frame_bytes %d is smaller than the %d this store was served with: reading every stored item "
                 "for one that would not fit", max_frame_bytes, bound)
        count, devices, longest = mailboxes.oversized_items(max_frame_bytes - TAG_BYTES)
        if count:
            raise ConfigError(
                f"max_frame_bytes: {max_frame_bytes} is too small for {count} stored item(s) of {devices} device(s) "
                f"(stored under max_frame_bytes up to {bound}; the largest needs {longest + TAG_BYTES}): they could "
                f"never be delivered. Serve with max_frame_bytes {longest + TAG_BYTES} or more until their devices "
                "have received them or mailbox_ttl_s has expired them (docs/operations.md \"Lowering "
                "max_frame_bytes\")")
    if max_frame_bytes != bound:
        with mailboxes.env.begin(write=True) as txn:
            mailboxes.set_item_frame_bound(txn, max_frame_bytes)
