"""The key directory: tables ``prekeys`` (a device's identity key and signed prekey, one record)
and ``otpks`` (its one-time prekeys, under its device key).

``take`` runs in the facade's commit transaction (a ``PrekeyTake`` of the group commit);
``take_prekeys`` is the same in a transaction of its own. The one-time prekey stock is bounded
(``max_otpks``), so it is counted by a range scan and no counter has to be kept in step with it.
"""

from __future__ import annotations

import struct

import lmdb
import msgpack

from interlink.core.domain.batch import device_key
from interlink.core.errors import StoreLimitError
from interlink.core.edge.lmdbstore.env import scan, write_txn

_KEY_ID = struct.Struct(">I")  # a one-time prekey's id, after the device key


class Keys:
    """Each device's published keys, and its one-time prekeys handed out each exactly once."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.prekeys_db = env.open_db(b"prekeys")
        self.otpks_db = env.open_db(b"otpks")

    def put_prekeys(
        self, user: str, device: int, ik: bytes, spk: tuple[int, bytes, bytes], otpks: list[tuple[int, bytes]],
        max_otpks: int,
    ) -> int:
        dkey = device_key(user, device)
        record = msgpack.packb([ik, *spk], use_bin_type=True)
        wanted = dict(otpks)  # an id given twice: the last key wins
        with write_txn(self.env) as txn:
            cursor = txn.cursor(db=self.otpks_db)
            old = txn.get(dkey, db=self.prekeys_db)
            stored = list(scan(cursor, dkey))
            if old is not None and msgpack.unpackb(old, raw=False)[0] != ik:
                # A new identity key: the device was reset, and the one-time prekeys stored under
                # the old identity are useless to it. (Undone with the rest if the put is refused.)
                for key in stored:
                    txn.delete(key, db=self.otpks_db)
                stored = []
            have = {_KEY_ID.unpack(key[len(dkey) :])[0] for key in stored}
            count = len(have) + sum(1 for key_id in wanted if key_id not in have)
            if count > max_otpks:
                raise StoreLimitError(
                    f"{count - len(have)} new one-time prekeys on top of the {len(have)} stored pass the "
                    f"limit of {max_otpks} per device; upload fewer"
                )
            txn.put(dkey, record, db=self.prekeys_db)
            for key_id, key in wanted.items():
                txn.put(dkey + _KEY_ID.pack(key_id), key, db=self.otpks_db)
            return count

    def read_prekeys(self, user: str, devices) -> list[dict]:
        with self.env.begin() as txn:
            return self._bundles_in(txn, user, sorted(set(devices)), take=False)

    def take_prekeys(self, user: str, devices) -> list[dict]:
        devices = sorted(set(devices))
        with self.env.begin() as txn:
            bundles = self._bundles_in(txn, user, devices, take=False)
        if all(bundle["otpk"] is None for bundle in bundles):
            return bundles  # no one-time prekey to hand out: no write transaction, no fsync
        with write_txn(self.env) as txn:  # read again: what is handed out is what this transaction deletes
            return self._bundles_in(txn, user, devices, take=True)

    def take(self, txn, user: str, devices: list[int]) -> list[dict]:
        """``take_prekeys`` in the commit's write transaction ``txn`` (``devices`` ascending, each once)."""
        return self._bundles_in(txn, user, devices, take=True)

    def _bundles_in(self, txn, user: str, devices: list[int], take: bool) -> list[dict]:
        bundles = []
        cursor = txn.cursor(db=self.otpks_db)
        for device in devices:
            dkey = device_key(user, device)
            raw = txn.get(dkey, db=self.prekeys_db)
            if raw is None:
                continue  # nothing published
            ik, spk_id, spk_key, spk_sig = msgpack.unpackb(raw, raw=False)
            otpk = None
            if cursor.set_range(dkey) and cursor.key().startswith(dkey):
                key = cursor.key()
                otpk = {"id": _KEY_ID.unpack(key[len(dkey) :])[0], "key": cursor.value()}
                if take:
                    cursor.delete()
            bundles.append(
                {"device": device, "ik": ik, "spk": {"id": spk_id, "key": spk_key, "sig": spk_sig}, "otpk": otpk}
            )
        return bundles

    def prekey_count(self, user: str, device: int) -> int:
        dkey = device_key(user, device)
        with self.env.begin(db=self.otpks_db) as txn:
            return sum(1 for _ in scan(txn.cursor(), dkey))
