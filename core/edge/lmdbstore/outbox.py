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
# LMDB's layout, for what an outbox entry takes of the map (``outbox_footprint``)
PAGE_HEADER_BYTES = 16
LEAF_NODE_BYTES = 8 + 2  # a leaf node's header and its pointer in the page


class FanoutRecords:
    """The outbox (at a group's home) and the marks of what was stored (at a member's node)."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.outbox_db = env.open_db(b"outbox")
        self.marks_db = env.open_db(b"fanout_marks")
        self.incarnation = os.urandom(INCARNATION_BYTES)  # the entries written from now on
        self.page_bytes = env.stat()["psize"]
        # LMDB's largest leaf node (me_nodemax): a larger one's value goes to overflow pages of its own
        self._node_max = ((self.page_bytes - PAGE_HEADER_BYTES) // 2) & ~1

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

    def forget(self, txn, node: str, drop: bool = True) -> tuple[int, int]:
        """What is kept for ``node``, a node lost for good: the entries waiting for it, and the
        marks of what its groups sent here — how many of each, dropped with ``drop``. Its last seq
        (``b"o"`` key) stays, so that a node given its id later never gets a number twice."""
        counts = []
        name = node.encode("ascii") + b"\x00"
        for db, prefix in ((self.outbox_db, name), (self.marks_db, b"i" + name)):
            cursor, count = txn.cursor(db=db), 0
            if cursor.set_range(prefix):
                while cursor.key().startswith(prefix):
                    count += 1
                    if not (cursor.delete() if drop else cursor.next()):
                        break
            counts.append(count)
        return counts[0], counts[1]

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
        """Every node with entries waiting: how many, and what they take of the map at most
        (``outbox_footprint``)."""
        sizes: dict[str, tuple[int, int]] = {}
        footprint = self.outbox_footprint
        with self.env.begin(db=self.outbox_db, buffers=True) as txn:  # sizes only: no value copied
            for key, value in txn.cursor().iternext(keys=True, values=True):
                node = bytes(key[:-9]).decode("ascii")
                count, size = sizes.get(node, (0, 0))
                sizes[node] = (count + 1, size + footprint(node, len(value)))
        return sizes

    def outbox_footprint(self, node: str, size: int) -> int:
        """What an entry of ``size`` packed bytes for ``node`` takes of the map at most: its leaf
        node's share of a leaf page (``_node_share``) and of a branch page, and its own overflow
        pages when its leaf node would be too large (then the leaf keeps their page number).
        Packed bytes alone undercount up to 2x (a review measured it)."""
        leaf = LEAF_NODE_BYTES + len(node) + 9  # a leaf node without its value: the key is node, NUL, seq
        key_node = leaf + 8  # the key and a page number: in a branch page, or pointing to overflow pages
        if leaf + size > self._node_max:
            pages = -(-(size + PAGE_HEADER_BYTES) // self.page_bytes)
            return pages * self.page_bytes + 2 * self._node_share(key_node)
        return self._node_share(leaf + size) + self._node_share(key_node)

    def outbox_table_bytes(self) -> int:
        """What the outbox table takes of the map now: its pages, every node's entries together."""
        with self.env.begin() as txn:
            stat = txn.stat(self.outbox_db)
        return (stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]) * self.page_bytes

    def _node_share(self, node_bytes: int) -> int:
        """The page bytes a node of ``node_bytes`` takes at most: a full page splits in the middle
        (``mdb_page_split``) and, the keys growing, the left half stays as it is."""
        fits = max(1, (self.page_bytes - PAGE_HEADER_BYTES) // node_bytes)
        return -(-self.page_bytes // ((fits + 1) // 2))

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
