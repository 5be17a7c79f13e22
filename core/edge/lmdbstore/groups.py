"""Group records: table ``groups``, group id (16 bytes) -> ``ver`` (uint64 big-endian) + msgpack
``[members (join order), admins, meta (bin or nil)]``.

Records are written only by the facade's commit (``write``, a compare-and-set on ``ver``), in the
same transaction as the items announcing the change. ``ver`` leads the value so that the
compare-and-set, and a guarded entry's check (``has_ver``), read 8 bytes.
"""

from __future__ import annotations

import struct

import lmdb
import msgpack

from interlink.core.domain.batch import GroupRecord, GroupWrite

_VER = struct.Struct(">Q")


class GroupRecords:
    """The stored group records of one environment."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.groups_db = env.open_db(b"groups")

    def group(self, g: bytes) -> GroupRecord | None:
        with self.env.begin(db=self.groups_db) as txn:
            raw = txn.get(g)
            return unpack_record(raw) if raw is not None else None

    def has_ver(self, txn, guard: tuple[bytes, int]) -> bool:
        """Is ``guard`` = (g, ver) the stored state of group g (ver 0: no record)?"""
        g, ver = guard
        return self._stored_ver(txn, g) == ver

    def write(self, txn, change: GroupWrite) -> bool:
        """Write ``change`` in ``txn`` if the stored record still has its ``prior_ver``; False
        (nothing written) when it was computed from a change that never committed."""
        if self._stored_ver(txn, change.g) != change.prior_ver:
            return False
        if change.record is None:
            txn.delete(change.g, db=self.groups_db)
        else:
            txn.put(change.g, pack_record(change.record), db=self.groups_db)
        return True

    def _stored_ver(self, txn, g: bytes) -> int:
        raw = txn.get(g, db=self.groups_db)
        return _VER.unpack(raw[:8])[0] if raw is not None else 0


def pack_record(record: GroupRecord) -> bytes:
    return _VER.pack(record.ver) + msgpack.packb(
        [list(record.members), list(record.admins), record.meta], use_bin_type=True
    )


def unpack_record(raw: bytes) -> GroupRecord:
    members, admins, meta = msgpack.unpackb(raw[8:], raw=False)
    return GroupRecord(_VER.unpack(raw[:8])[0], tuple(members), tuple(admins), meta)
