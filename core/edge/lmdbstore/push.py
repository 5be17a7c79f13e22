"""Push registrations and intents: tables ``push_devices`` (device key -> the token the device
registered with ``push.set`` and the last counter given out) and ``push_intents`` (device key ->
the counter and creation time of the push that is owed to it).

An intent is written in the group commit that stores the items it announces (``apply``), so a
crash between that commit and the webhook loses no push: the gateway sends what ``intents()``
lists after a restart, with the same counter, and the provider drops what it already had. One
intent per device at a time: more items while one is owed are covered by it (coalescing).
"""

from __future__ import annotations

import struct

import lmdb
import msgpack

from interlink.core.edge.lmdbstore.env import write_txn

_INTENT = struct.Struct(">QQ")  # counter, created ms


class PushRecords:
    """Who registered for push, and which pushes are owed."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.devices_db = env.open_db(b"push_devices")
        self.intents_db = env.open_db(b"push_intents")

    # -- registrations (push.set / push.del)

    def set_push_token(self, dkey: bytes, token: bytes) -> None:
        """Register (or replace) the device's token; its counter carries on."""
        with write_txn(self.env) as txn:
            raw = txn.get(dkey, db=self.devices_db)
            counter = msgpack.unpackb(raw)[1] if raw is not None else 0
            txn.put(dkey, msgpack.packb([token, counter], use_bin_type=True), db=self.devices_db)

    def del_push_token(self, dkey: bytes) -> bool:
        """Forget the device's token and any intent owed to it; False if it had none."""
        with write_txn(self.env) as txn:
            txn.delete(dkey, db=self.intents_db)
            return txn.delete(dkey, db=self.devices_db)

    def push_token(self, dkey: bytes) -> bytes | None:
        with self.env.begin(db=self.devices_db) as txn:
            raw = txn.get(dkey)
        return msgpack.unpackb(raw)[0] if raw is not None else None

    def push_devices(self) -> list[bytes]:
        """Every registered device key (read once at start)."""
        with self.env.begin(db=self.devices_db) as txn:
            return list(txn.cursor().iternext(keys=True, values=False))

    def push_intents(self) -> list[tuple[bytes, int, int]]:
        """Every intent owed: (device key, counter, created ms)."""
        with self.env.begin(db=self.intents_db) as txn:
            return [(key, *_INTENT.unpack(value)) for key, value in txn.cursor()]

    # -- in the group commit

    def apply(self, txn, wake, cancel, done, now_ms: int, items_of) -> list[tuple[bytes, int, int]]:
        """The push part of a group commit, after the items are written: intents answered
        (``done``: deleted if still the same counter; with ``again``, a new one when items wait),
        cancelled (the device connected), and new ones for ``wake`` devices that are registered,
        hold items and owe none yet. ``items_of(dkey)`` is the device's item count as this
        transaction leaves it. Returns the intents created: (device key, counter, created ms)."""
        devices_db, intents_db = self.devices_db, self.intents_db
        created = []
        wake = set(wake)
        for dkey, counter, again in done:
            raw = txn.get(dkey, db=intents_db)
            if raw is not None and _INTENT.unpack(raw)[0] == counter:
                txn.delete(dkey, db=intents_db)
                if again:
                    wake.add(dkey)
        for dkey in cancel:
            txn.delete(dkey, db=intents_db)
            wake.discard(dkey)
        for dkey in wake:
            if txn.get(dkey, db=intents_db) is not None or items_of(dkey) == 0:
                continue
            raw = txn.get(dkey, db=devices_db)
            if raw is None:  # not registered (any more)
                continue
            token, counter = msgpack.unpackb(raw)
            counter += 1
            txn.put(dkey, msgpack.packb([token, counter], use_bin_type=True), db=devices_db)
            txn.put(dkey, _INTENT.pack(counter, now_ms), db=intents_db)
            created.append((dkey, counter, now_ms))
        return created
