"""Durable state: the storage interface the domain logic uses, and its LMDB implementation.

One LMDB environment with named databases:

| database | key | value |
|---|---|---|
| ``devices`` | device key | ``b""`` |
| ``mbox`` | device key + seq (uint64 big-endian) | the encoded ``dlv`` stanza, ready to send |
| ``seqs`` | device key | last seq given out (uint64 big-endian); never goes back |
| ``dedup`` | sender device key + message id (16 bytes) | ``ts`` of the first copy (uint64 ms) |

A *device key* is the user address in UTF-8, a zero byte and the device number (uint32
big-endian): a range scan over ``user + b"\0"`` lists a user's devices in order, and one over a
device key lists its mailbox in seq order. Messages are written in batches (``WriteBatch``), one
write transaction per batch: the gateway's group commit.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Protocol

import lmdb

from interlink.core.errors import AuthError, ConfigError, InterlinkError

_DEVICE = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
_TS = struct.Struct(">Q")


def device_key(user: str, device: int) -> bytes:
    """The key of one device of one user (see the module docstring)."""
    return user.encode("utf-8") + b"\x00" + _DEVICE.pack(device)


class StoreFullError(InterlinkError):
    """The LMDB map is full: the batch was not written (nothing earlier is lost)."""

    code = "overloaded"


class StoredMessage:
    """One message of a ``WriteBatch`` and, after the commit, what happened to it."""

    __slots__ = ("sender_key", "msg_id", "ts_ms", "items", "dup", "stored")

    def __init__(self, sender_key: bytes, msg_id: bytes, ts_ms: int, items: list) -> None:
        self.sender_key = sender_key
        self.msg_id = msg_id
        self.ts_ms = ts_ms  #: after commit: the ts of the first stored copy when ``dup``
        self.items = items  #: [(device key, build(seq, ts_ms) -> encoded dlv)]
        self.dup = False
        self.stored: list = []  #: after commit: [(device key, seq, encoded dlv)]


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

    def delete(self, dkey: bytes, seqs: list[int]) -> None:
        self.deletions.append((dkey, seqs))


class Store(Protocol):
    """What the gateway needs from durable storage (``LmdbStore`` implements it)."""

    def devices(self, user: str) -> list[int]:
        """The user's registered devices, ascending."""

    def register_device(self, user: str, device: int, max_devices: int) -> list[int]:
        """Record ``device`` for ``user`` (idempotent); ``AuthError(device_limit)`` past the limit."""

    def commit(self, batch: WriteBatch) -> None:
        """Write the batch in one transaction, durably per the configured mode; fills in each
        message's ``dup``/``stored``. ``StoreFullError`` when it does not fit (nothing written)."""

    def pending(self, dkey: bytes, after_seq: int = 0, limit: int | None = None) -> list[tuple[int, bytes]]:
        """Stored items of a device with seq > ``after_seq``, in seq order."""

    def pending_count(self, dkey: bytes) -> int:
        """How many items a device has stored."""



class LmdbStore:
    """One LMDB environment with named databases; this is the edge where storage I/O happens."""

    def __init__(self, path: str | os.PathLike, *, map_size_bytes: int = 1 << 30, sync: bool = True) -> None:
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"data_dir: cannot create {path}: {exc.strerror}") from exc
        self.path = path
        self._env = lmdb.open(
            str(path),
            map_size=map_size_bytes,
            max_dbs=16,
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

    def close(self) -> None:
        self._env.close()

    @staticmethod
    def _user_prefix(user: str) -> bytes:
        return user.encode("utf-8") + b"\x00"

    def devices(self, user: str) -> list[int]:
        with self._env.begin(db=self._devices) as txn:
            return self._list_in(txn, self._user_prefix(user))

    def register_device(self, user: str, device: int, max_devices: int) -> list[int]:
        prefix = self._user_prefix(user)
        key = prefix + _DEVICE.pack(device)
        with self._env.begin(db=self._devices) as txn:
            if txn.get(key) is not None:  # the common case, a known device: no write transaction
                return self._list_in(txn, prefix)
        with self._env.begin(db=self._devices, write=True) as txn:
            if txn.get(key) is not None:  # registered concurrently
                return self._list_in(txn, prefix)
            known = self._list_in(txn, prefix)
            if len(known) >= max_devices:
                raise AuthError(
                    f"user already has {len(known)} devices (limit {max_devices}); remove one first",
                    code="device_limit",
                )
            txn.put(key, b"")
            return sorted(known + [device])

    @staticmethod
    def _list_in(txn, prefix: bytes) -> list[int]:
        found = []
        cursor = txn.cursor()
        if cursor.set_range(prefix):
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(prefix):
                    break
                found.append(_DEVICE.unpack(key[len(prefix) :])[0])
        return found

    # -- mailboxes

    def commit(self, batch: WriteBatch) -> None:
        try:
            with self._env.begin(write=True) as txn:
                next_seqs: dict[bytes, int] = {}
                for message in batch.messages:
                    self._write_message(txn, message, next_seqs)
                for dkey, seq in next_seqs.items():
                    txn.put(dkey, _SEQ.pack(seq), db=self._seqs)
                for dkey, seqs in batch.deletions:
                    for seq in seqs:
                        txn.delete(dkey + _SEQ.pack(seq), db=self._mbox)
        except lmdb.MapFullError:
            for message in batch.messages:
                message.dup, message.stored = False, []
            raise StoreFullError("the gateway's storage is full; try again later") from None

    def _write_message(self, txn, message: StoredMessage, next_seqs: dict) -> None:
        dedup_key = message.sender_key + message.msg_id
        first = txn.get(dedup_key, db=self._dedup)
        if first is not None:
            message.dup = True
            message.ts_ms = _TS.unpack(first)[0]
            return
        txn.put(dedup_key, _TS.pack(message.ts_ms), db=self._dedup)
        stored = message.stored
        for dkey, build in message.items:
            seq = next_seqs.get(dkey)
            if seq is None:
                last = txn.get(dkey, db=self._seqs)
                seq = _SEQ.unpack(last)[0] if last is not None else 0
            seq += 1
            next_seqs[dkey] = seq
            value = build(seq, message.ts_ms)
            txn.put(dkey + _SEQ.pack(seq), value, db=self._mbox)
            stored.append((dkey, seq, value))

    def pending(self, dkey: bytes, after_seq: int = 0, limit: int | None = None) -> list[tuple[int, bytes]]:
        items: list[tuple[int, bytes]] = []
        start = dkey + _SEQ.pack(after_seq + 1)
        prefix_len = len(dkey)
        with self._env.begin(db=self._mbox) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(start):
                return items
            for key, value in cursor:
                if len(key) != prefix_len + 8 or not key.startswith(dkey):
                    break
                items.append((_SEQ.unpack(key[prefix_len:])[0], value))
                if limit is not None and len(items) >= limit:
                    break
        return items

    def pending_count(self, dkey: bytes) -> int:
        count = 0
        prefix_len = len(dkey)
        with self._env.begin(db=self._mbox) as txn:
            cursor = txn.cursor()
            if cursor.set_range(dkey):
                for key in cursor.iternext(keys=True, values=False):
                    if len(key) != prefix_len + 8 or not key.startswith(dkey):
                        break
                    count += 1
        return count
