"""Push registrations and intents: tables ``push_devices`` (device key -> the token the device
registered with ``push.set`` and the last counter given out) and ``push_intents`` (device key ->
the counter of the push that is owed to it).

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

_INTENT = struct.Struct(">Q")  # the counter


class PushRecords:
    """Who registered for push, and which pushes are owed."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.devices_db = env.open_db(b"push_devices")
        self.intents_db = env.open_db(b"push_intents")

    # -- registrations (push.set / push.del)

    def set_push_token(self, dkey: bytes, token: bytes) -> None:
        """Register (or replace) the device's token; its counter carries on (across ``push.del``
        too: a provider drops a push whose counter it saw, so counters never start over)."""
        with write_txn(self.env) as txn:
            raw = txn.get(dkey, db=self.devices_db)
            counter = msgpack.unpackb(raw)[1] if raw is not None else 0
            txn.put(dkey, msgpack.packb([token, counter], use_bin_type=True), db=self.devices_db)

    def del_push_token(self, dkey: bytes) -> bool:
        """Forget the device's token and any intent owed to it (its counter stays); False if it
        had none."""
        with write_txn(self.env) as txn:
            txn.delete(dkey, db=self.intents_db)
            raw = txn.get(dkey, db=self.devices_db)
            if raw is None:
                return False
            token, counter = msgpack.unpackb(raw)
            txn.put(dkey, msgpack.packb([None, counter]), db=self.devices_db)
            return token is not None

    def push_token(self, dkey: bytes) -> bytes | None:
        with self.env.begin(db=self.devices_db) as txn:
            raw = txn.get(dkey)
        return msgpack.unpackb(raw)[0] if raw is not None else None

    def push_devices(self) -> list[bytes]:
        """Every registered device key (read once at start)."""
        with self.env.begin(db=self.devices_db) as txn:
            return [key for key, raw in txn.cursor() if msgpack.unpackb(raw)[0] is not None]

    def push_intents(self) -> list[tuple[bytes, int]]:
        """Every intent owed: (device key, counter)."""
        with self.env.begin(db=self.intents_db) as txn:
            return [(key, _INTENT.unpack(value)[0]) for key, value in txn.cursor()]

    # -- in the group commit

    def apply(self, txn, wake, cancel, done, items_of) -> tuple[list, list]:
        """The push part of a group commit, after the items are written: intents answered
        (``done``: deleted if still the same counter; with ``again``, woken anew), cancelled (the
        device connected), then new ones for ``wake`` devices that are registered, hold items and
        owe none yet. ``items_of(dkey)`` is the device's item count as this transaction leaves it.
        Returns the intents created and, for woken devices that already owed one, that one:
        each (device key, counter)."""
        devices_db, intents_db = self.devices_db, self.intents_db
        created, existing = [], []
        wake = set(wake)
        for dkey, counter, again in done:
            raw = txn.get(dkey, db=intents_db)
            if raw is not None and _INTENT.unpack(raw)[0] == counter:
                txn.delete(dkey, db=intents_db)
                if again and dkey not in cancel:  # connected meanwhile: nothing is owed to it
                    wake.add(dkey)
        for dkey in cancel:
            txn.delete(dkey, db=intents_db)
        for dkey in wake:
            raw = txn.get(dkey, db=intents_db)
            if raw is not None:
                existing.append((dkey, _INTENT.unpack(raw)[0]))
                continue
            if items_of(dkey) == 0:
                continue
            raw = txn.get(dkey, db=devices_db)
            if raw is None:  # never registered
                continue
            token, counter = msgpack.unpackb(raw)
            if token is None:  # unregistered (push.del); its counter is kept
                continue
            counter += 1
            txn.put(dkey, msgpack.packb([token, counter], use_bin_type=True), db=devices_db)
            txn.put(dkey, _INTENT.pack(counter), db=intents_db)
            created.append((dkey, counter))
        return created, existing
