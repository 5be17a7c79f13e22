"""A cluster node's group fan-out streams (issue 18; ``core/domain/outbox.py``): tables ``outbox``
and ``fanout_marks``.

At a group's home, a message or membership change whose recipients include members of other
nodes is written, in the group commit that stores it, as one entry per such node:
``outbox`` node id, a zero byte, seq (uint64 big-endian) -> msgpack ``[provider, localpart,
device, max plaintext bytes, gfan stanza]``. Entries are numbered per node, in commit order, and
stay until that node confirms it stored them (``delete_acked``, in a later commit).

Each entry's stanza carries the *incarnation* of the store that wrote it: 8 random bytes drawn
each time the store is opened. At a member's node, ``fanout_marks`` keeps per (home node,
incarnation) the last of its entries stored, written in the transaction that stores the entry's
copies: an entry that comes again (a resend after a lost answer, or after the home restarted) is
recognised as a duplicate there by its own incarnation's mark. Entries of a new incarnation are
never mistaken for old ones — also when the home's data was restored from a backup and numbers
again from where the backup left off.

``fanout_marks`` keys: ``b"o" + node`` -> the last seq this home gave an entry for ``node``
(uint64; kept when the entries are deleted, so numbers are not used twice);
``b"i" + home + b"\0" + incarnation`` -> the last seq stored from that home's incarnation
(uint64; one small key per start of a home that sent entries here).
"""

from __future__ import annotations

import os
import struct

import lmdb

from interlink.core.edge.lmdbstore.env import scan

_SEQ = struct.Struct(">Q")
INCARNATION_BYTES = 8


class FanoutRecords:
    """The outbox (at a group's home) and the marks of what was stored (at a member's node)."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.outbox_db = env.open_db(b"outbox")
        self.marks_db = env.open_db(b"fanout_marks")
        self.incarnation = os.urandom(INCARNATION_BYTES)  # the entries written from now on

    # -- at a group's home

    def write(self, txn, entries) -> None:
        """Put ``entries`` ([(node, seq, packed record, record), ...]) and remember each node's last seq."""
        last: dict[str, int] = {}
        for node, seq, packed, _ in entries:
            txn.put(_outbox_key(node, seq), packed, db=self.outbox_db)
            if seq > last.get(node, 0):
                last[node] = seq
        for node, seq in last.items():
            key = b"o" + node.encode("ascii")
            stored = txn.get(key, db=self.marks_db)
            if stored is None or _SEQ.unpack(stored)[0] < seq:
                txn.put(key, _SEQ.pack(seq), db=self.marks_db)

    def delete_acked(self, txn, node: str, upto: int) -> int:
        """Delete ``node``'s entries numbered up to ``upto``; returns how many."""
        prefix = node.encode("ascii") + b"\x00"
        cursor = txn.cursor(db=self.outbox_db)
        deleted = 0
        if cursor.set_range(prefix):
            while cursor.key().startswith(prefix) and _SEQ.unpack(cursor.key()[len(prefix):])[0] <= upto:
                if not cursor.delete():
                    break
                deleted += 1
        return deleted

    def outbox_entries(self, node: str, after: int = 0, limit: int | None = None) -> list[tuple[int, bytes]]:
        """``node``'s entries numbered after ``after``, in order: [(seq, packed record)]."""
        prefix = node.encode("ascii") + b"\x00"
        with self.env.begin(db=self.outbox_db) as txn:
            return [(_SEQ.unpack(key[len(prefix):])[0], bytes(value))
                    for key, value in scan(txn.cursor(), prefix, _outbox_key(node, after + 1), limit, values=True)]

    def outbox_last(self, node: str) -> int:
        """The last seq given to an entry for ``node`` (0: none yet)."""
        with self.env.begin(db=self.marks_db) as txn:
            stored = txn.get(b"o" + node.encode("ascii"))
            return _SEQ.unpack(stored)[0] if stored is not None else 0

    def outbox_nodes(self) -> dict[str, int]:
        """Every node with entries waiting, and how many."""
        return {node: count for node, (count, _) in self.outbox_sizes().items()}

    def outbox_sizes(self) -> dict[str, tuple[int, int]]:
        """Every node with entries waiting: how many, and their packed bytes."""
        sizes: dict[str, tuple[int, int]] = {}
        with self.env.begin(db=self.outbox_db, buffers=True) as txn:  # sizes only: no value copied
            for key, value in txn.cursor().iternext(keys=True, values=True):
                node = bytes(key[:-9]).decode("ascii")
                count, size = sizes.get(node, (0, 0))
                sizes[node] = (count + 1, size + len(value))
        return sizes

    # -- at a member's node

    def seen(self, txn, fanin: tuple) -> bool:
        """Was entry ``fanin`` = (home, incarnation, seq, ...) stored before (in this transaction too)?"""
        home, incarnation, seq = fanin[:3]
        stored = txn.get(_mark_key(home, incarnation), db=self.marks_db)
        return stored is not None and _SEQ.unpack(stored)[0] >= seq

    def mark(self, txn, fanin: tuple) -> None:
        """Entry ``fanin`` is stored: it and its incarnation's earlier ones are duplicates from now on."""
        home, incarnation, seq = fanin[:3]
        txn.put(_mark_key(home, incarnation), _SEQ.pack(seq), db=self.marks_db)

    def fanin_mark(self, home: str, incarnation: bytes) -> int:
        """The last seq stored from ``home``'s ``incarnation`` (0: none)."""
        with self.env.begin(db=self.marks_db) as txn:
            stored = txn.get(_mark_key(home, incarnation))
            return _SEQ.unpack(stored)[0] if stored is not None else 0


def _mark_key(home: str, incarnation: bytes) -> bytes:
    return b"i" + home.encode("ascii") + b"\x00" + incarnation


def _outbox_key(node: str, seq: int) -> bytes:
    return node.encode("ascii") + b"\x00" + _SEQ.pack(seq)
