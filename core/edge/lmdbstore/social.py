"""Consent, blocks, reports and the phone directory: tables ``consent``, ``blocks``,
``block_counts``, ``blocked_by``, ``reports``, ``counters``, ``directory``, ``phones``.

Written by the ``iq`` operations, each write in a small transaction of its own (``StoreFullError``
when the map is full); a write that would change nothing reads only, so it costs no fsync.
"""

from __future__ import annotations

import struct

import lmdb
import msgpack

from interlink.core.errors import StoreLimitError
from interlink.core.edge.lmdbstore.env import scan, user_prefix, write_txn

_COUNT = struct.Struct(">I")
_NUMBER = struct.Struct(">Q")  # a report's number


class Social:
    """Who accepts whom, who blocked whom, what was reported, who is listed under which phone."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.consent_db = env.open_db(b"consent")
        self.blocks_db = env.open_db(b"blocks")
        self.block_counts_db = env.open_db(b"block_counts")
        self.blocked_by_db = env.open_db(b"blocked_by")
        self.reports_db = env.open_db(b"reports")
        self.counters_db = env.open_db(b"counters")
        self.directory_db = env.open_db(b"directory")
        self.phones_db = env.open_db(b"phones")
        self._index_blockers()

    # -- consent

    def consent(self, user: str) -> tuple[tuple[str, ...], bool] | None:
        with self.env.begin(db=self.consent_db) as txn:
            return _decode_consent(txn.get(user.encode("utf-8")))

    def set_consent(self, user: str, accept: tuple[str, ...], discoverable: bool) -> None:
        value = msgpack.packb([list(accept), bool(discoverable)], use_bin_type=True)
        with write_txn(self.env) as txn:
            txn.put(user.encode("utf-8"), value, db=self.consent_db)

    def reach(self, user: str, max_blocked: int) -> tuple[tuple[tuple[str, ...], bool] | None, frozenset | None]:
        key = user.encode("utf-8")
        with self.env.begin() as txn:
            consent = _decode_consent(txn.get(key, db=self.consent_db))
            count = txn.get(key, db=self.block_counts_db)
            if count is None:
                return consent, frozenset()
            if _COUNT.unpack(count)[0] > max_blocked:
                return consent, None
            return consent, frozenset(self._blocked_in(txn, key + b"\x00", None, None))

    # -- blocks

    def is_blocked(self, user: str, other: str) -> bool:
        with self.env.begin(db=self.blocks_db) as txn:
            return txn.get(user_prefix(user) + other.encode("utf-8")) is not None

    def add_block(self, user: str, other: str, max_blocks: int) -> bool:
        key = user.encode("utf-8")
        entry = key + b"\x00" + other.encode("utf-8")
        with self.env.begin(db=self.blocks_db) as txn:  # already blocked: no write, no fsync
            if txn.get(entry) is not None:
                return False
        with write_txn(self.env) as txn:
            if txn.get(entry, db=self.blocks_db) is not None:
                return False
            raw = txn.get(key, db=self.block_counts_db)
            count = _COUNT.unpack(raw)[0] if raw is not None else 0
            if count >= max_blocks:
                raise StoreLimitError(f"you already block {count} users (limit {max_blocks}); unblock some first")
            txn.put(entry, b"", db=self.blocks_db)
            txn.put(other.encode("utf-8") + b"\x00" + key, b"", db=self.blocked_by_db)
            txn.put(key, _COUNT.pack(count + 1), db=self.block_counts_db)
            return True

    def del_block(self, user: str, other: str) -> bool:
        key = user.encode("utf-8")
        entry = key + b"\x00" + other.encode("utf-8")
        with self.env.begin(db=self.blocks_db) as txn:
            if txn.get(entry) is None:
                return False
        with write_txn(self.env) as txn:
            if not txn.delete(entry, db=self.blocks_db):
                return False
            txn.delete(other.encode("utf-8") + b"\x00" + key, db=self.blocked_by_db)
            count = _COUNT.unpack(txn.get(key, db=self.block_counts_db))[0] - 1
            if count:
                txn.put(key, _COUNT.pack(count), db=self.block_counts_db)
            else:
                txn.delete(key, db=self.block_counts_db)
            return True

    def blocked(self, user: str, after: str | None = None, limit: int | None = None) -> list[str]:
        with self.env.begin() as txn:
            return self._blocked_in(txn, user_prefix(user), after, limit)

    def _blocked_in(self, txn, prefix: bytes, after: str | None, limit: int | None) -> list[str]:
        start = None if after is None else prefix + after.encode("utf-8") + b"\x00"  # first key > after
        cursor = txn.cursor(db=self.blocks_db)
        return [key[len(prefix) :].decode("utf-8") for key in scan(cursor, prefix, start, limit)]

    def blockers(self, user: str, limit: int) -> frozenset | None:
        prefix = user_prefix(user)
        with self.env.begin(db=self.blocked_by_db) as txn:
            found = [key[len(prefix):] for key in scan(txn.cursor(), prefix, None, limit + 1)]
        if len(found) > limit:
            return None
        return frozenset(blocker.decode("utf-8") for blocker in found)

    def block_count(self, user: str) -> int:
        with self.env.begin(db=self.block_counts_db) as txn:
            raw = txn.get(user.encode("utf-8"))
            return _COUNT.unpack(raw)[0] if raw is not None else 0

    def _index_blockers(self) -> None:
        """Fill ``blocked_by`` from ``blocks`` once, for an environment written before the reverse
        index existed (its absence with blocks present is the sign)."""
        with self.env.begin() as txn:
            if txn.stat(self.blocked_by_db)["entries"] or not txn.stat(self.blocks_db)["entries"]:
                return
        with write_txn(self.env) as txn:
            for entry in txn.cursor(db=self.blocks_db).iternext(values=False):
                user, _, other = entry.partition(b"\x00")
                txn.put(other + b"\x00" + user, b"", db=self.blocked_by_db)

    # -- reports

    def add_report(self, record: dict) -> int:
        value = msgpack.packb(record, use_bin_type=True)
        with write_txn(self.env) as txn:
            last = txn.get(b"reports", db=self.counters_db)
            number = (_NUMBER.unpack(last)[0] if last is not None else 0) + 1
            txn.put(b"reports", _NUMBER.pack(number), db=self.counters_db)
            txn.put(_NUMBER.pack(number), value, db=self.reports_db)
            return number

    def report(self, number: int) -> dict | None:
        with self.env.begin(db=self.reports_db) as txn:
            raw = txn.get(_NUMBER.pack(number))
            return msgpack.unpackb(raw, raw=False) if raw is not None else None

    def reports(self, after: int = 0, limit: int = 100, *, unresolved: bool = False) -> list[tuple[int, dict]]:
        found: list[tuple[int, dict]] = []
        with self.env.begin(db=self.reports_db) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(_NUMBER.pack(after + 1)):
                return found
            for key, raw in cursor.iternext():
                record = msgpack.unpackb(raw, raw=False)
                if unresolved and "resolution" in record:
                    continue
                found.append((_NUMBER.unpack(key)[0], record))
                if len(found) >= limit:
                    break
        return found

    def resolve_report(self, number: int, resolution: dict) -> bool:
        key = _NUMBER.pack(number)
        with write_txn(self.env) as txn:
            raw = txn.get(key, db=self.reports_db)
            if raw is None:
                return False
            record = msgpack.unpackb(raw, raw=False)
            record["resolution"] = resolution
            txn.put(key, msgpack.packb(record, use_bin_type=True), db=self.reports_db)
            return True

    # -- the phone directory

    def set_phone(self, user: str, phone: str | None) -> bool:
        key = user.encode("utf-8")
        new = phone.encode("utf-8") if phone is not None else None
        with self.env.begin(db=self.phones_db) as txn:  # the common case at login: unchanged, no write
            if txn.get(key) == new:
                return False
        with write_txn(self.env) as txn:
            old = txn.get(key, db=self.phones_db)
            if old == new:
                return False
            if old is not None:
                txn.delete(old + b"\x00" + key, db=self.directory_db)
            if new is None:
                txn.delete(key, db=self.phones_db)
            else:
                txn.put(key, new, db=self.phones_db)
                txn.put(new + b"\x00" + key, b"", db=self.directory_db)
            return True

    def phone(self, user: str) -> str | None:
        with self.env.begin(db=self.phones_db) as txn:
            raw = txn.get(user.encode("utf-8"))
            return raw.decode("utf-8") if raw is not None else None

    def directory(self, phone: str, limit: int | None = None) -> list[str]:
        prefix = phone.encode("utf-8") + b"\x00"
        with self.env.begin(db=self.directory_db) as txn:
            return [key[len(prefix) :].decode("utf-8") for key in scan(txn.cursor(), prefix, None, limit)]


def _decode_consent(raw) -> tuple[tuple[str, ...], bool] | None:
    if raw is None:
        return None
    accept, discoverable = msgpack.unpackb(raw, raw=False)
    return tuple(accept), bool(discoverable)
