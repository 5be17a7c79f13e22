"""Moving users and groups to their new home when a cluster's node list changes (issue 18;
docs/operations.md "Changing the node list"). Offline: the node is stopped while this runs.

Under a new node list some users and groups have a new home (rendezvous hashing moves about 1/N
of them when a node joins, and a leaving node's to the others). Every record of such a user or
group goes to its new home's store:

* ``export_moves`` writes, for each node that gets something, one *move file*: a header (format,
  from, to, the new list's version and digest), the records (table, key, value), a trailer with
  their count. A group copy whose body is shared in ``bodies`` is written whole (its new home
  stores it whole); the dedup entry of each moved copy goes along, so a resend of it is still
  recognised there. It refuses while the outbox holds group fan-out entries (they name members by
  the old list: let the cluster deliver them first).
* ``import_moves`` puts a file's records into the receiving store in one transaction: a key it
  already has with the same value is skipped (a file imported twice), with another value it
  refuses the whole file (``MoveError``, nothing written).
* ``prune`` deletes, once every file was imported, the records that are not this node's under
  the new list (shared bodies released as ``recv`` releases them), and records the list.
* ``forget_node``, before the export of a list that leaves out a node lost for good, drops the
  fan-out entries that wait for it (they would hold the move back for ever).

``NodeList`` keeps the list a store was last served under (table ``cluster_meta``); a node
starting under another list refuses while its store holds a user or group homed elsewhere
(``stray``). Blobs move too (``BLOB_TABLES``, their files beside the move file): a blob lives on
the node its id hashes to. What stays where it is: reports, the outbox marks, a node's other
dedup entries (they end with the dedup window).
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import lmdb
import msgpack

from interlink.core.domain.batch import device_key
from interlink.core.domain.cluster import Membership
from interlink.core.domain.fanout import splice
from interlink.core.edge.lmdbstore.env import store_full
from interlink.core.edge.mailbox import SHARED_MARK
from interlink.core.errors import ConfigError, MoveError

MOVE_FORMAT = 1
# Tables whose records belong to a user: the key starts with the address and a zero byte (a device
# key, or the blocker of a block), is the address, or ends with a zero byte and the address.
USER_PREFIXED = ("devices", "mbox", "seqs", "prekeys", "otpks", "push_devices", "push_intents", "blocks")
USER_KEYED = ("consent", "block_counts", "phones")
USER_SUFFIXED = ("blocked_by", "directory")
GROUP_TABLES = ("groups",)
# A blob lives on the node its id hashes to: its record (the totals key aside), its expiry and
# open-upload index entries (the id last), and its file.
BLOB_TABLES = ("blobs", "blob_expiry", "blob_uploads")
MOVED_TABLES = USER_PREFIXED + USER_KEYED + USER_SUFFIXED + GROUP_TABLES + BLOB_TABLES
BLOB_ID_BYTES = 16
IMPORTED_TABLES = frozenset(MOVED_TABLES + ("dedup",))
_SEQ = struct.Struct(">Q")
LIST_KEY = b"list"


def owner(table: str, key: bytes) -> str | bytes | None:
    """Whose record ``key`` of ``table`` is: a user address, a group or blob id (bytes), or None
    (a table's own key: the blob totals)."""
    if table in USER_PREFIXED:
        return bytes(key[:key.index(b"\x00")]).decode("utf-8")
    if table in USER_KEYED:
        return bytes(key).decode("utf-8")
    if table in USER_SUFFIXED:
        return bytes(key[key.rindex(b"\x00") + 1:]).decode("utf-8")
    if table == "blobs":
        return bytes(key) if len(key) == BLOB_ID_BYTES else None
    if table in BLOB_TABLES:
        return bytes(key[-BLOB_ID_BYTES:])
    return bytes(key)


class NodeList:
    """The node list a store was last served under (table ``cluster_meta``)."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.db = env.open_db(b"cluster_meta")

    def get(self) -> tuple[int, str, list[str]] | None:
        """(version, digest, node ids), or None for a store never served in a cluster."""
        with self.env.begin(db=self.db) as txn:
            raw = txn.get(LIST_KEY)
        if raw is None:
            return None
        version, digest, nodes = msgpack.unpackb(raw, raw=False)
        return version, digest, nodes

    def put(self, txn, membership: Membership) -> None:
        txn.put(LIST_KEY, msgpack.packb([membership.version, membership.digest, list(membership.nodes)]), db=self.db)


class _Tables:
    """The named databases of a store's environment, by name."""

    def __init__(self, store) -> None:
        self.env = store.env
        self.dbs = {name: self.env.open_db(name.encode("ascii")) for name in
                    (*MOVED_TABLES, "dedup", "bodies", "body_refs", "outbox")}


HOMES_REMEMBERED = 65_536  # owners whose home a scan remembers


def _home_finder(membership: Membership):
    """``home(owner)`` under ``membership``, remembered for at most ``HOMES_REMEMBERED`` owners at
    once (a store of millions of users: a bounded memo, not a copy of them)."""
    homes: dict = {}

    def home(who):
        found = homes.get(who)
        if found is None:
            if len(homes) >= HOMES_REMEMBERED:
                homes.clear()
            found = homes[who] = membership.home(who)
        return found

    return home


def _homed_elsewhere(txn, tables: _Tables, membership: Membership, node: str, names=MOVED_TABLES):
    """Every (table, key, value, owner, home) in ``txn`` whose owner's home under ``membership``
    is not ``node``, table by table (of ``names``) in key order."""
    home_of = _home_finder(membership)
    for table in names:
        for key, value in txn.cursor(db=tables.dbs[table]).iternext():
            who = owner(table, key)
            if who is not None and (home := home_of(who)) != node:
                yield table, bytes(key), bytes(value), who, home


def stray(store, membership: Membership, node: str, names=MOVED_TABLES) -> tuple[int, str | bytes | None]:
    """How many records of ``store`` (in tables ``names``) belong to users, groups or blobs homed
    on another node under ``membership``, and one such owner (None when there are none)."""
    count, example = 0, None
    tables = _Tables(store)
    with tables.env.begin() as txn:
        for _, _, _, who, _ in _homed_elsewhere(txn, tables, membership, node, names):
            count += 1
            example = example or who
    return count, example


def check_node_list(store, node_list: NodeList, membership: Membership, node: str) -> None:
    """At a node's start: ``ConfigError`` when its store was served under another node list and
    holds records of users or groups homed elsewhere under this one (they would be stranded:
    move them first). Otherwise this list is recorded as the store's."""
    stored = node_list.get()
    if stored is not None and stored[1] == membership.digest:
        return
    waiting = _outbox_waiting(_Tables(store)) if stored is not None else 0
    if waiting:  # they name members by the old list: under the new one they would stay or go astray
        raise ConfigError(
            f"cluster: {waiting} group fan-out entries of this node wait for other nodes under node list version "
            f"{stored[0]}: start the cluster under that list until `interlink cluster status` shows outbox 0 on every "
            "node, stop it, then change the list (docs/operations.md \"Changing the node list\")")
    # A store never served in a cluster (or by a version before this check) may hold blobs whose
    # ids were drawn before they named their node: they stay, served by this node as before.
    names = MOVED_TABLES if stored is not None else tuple(t for t in MOVED_TABLES if t not in BLOB_TABLES)
    count, example = stray(store, membership, node, names)
    if count:
        # (a blob id is a read capability: only its first bytes are ever shown)
        shown = example if isinstance(example, str) else f"group or blob {example[:4].hex()}…"
        before = (f"was last served under node list version {stored[0]} ({', '.join(stored[2])})" if stored
                  else "was not served in this cluster before")
        raise ConfigError(
            f"cluster: this node's data {before}; under version {membership.version} "
            f"({', '.join(membership.nodes)}) {count} of its records belong to other nodes (e.g. {shown}, homed on "
            f"{membership.home(example)}): move them first (interlink cluster export / import / prune, "
            f"docs/operations.md \"Changing the node list\")")
    with store.env.begin(write=True) as txn:
        node_list.put(txn, membership)


def _whole_copy(txn, tables: _Tables, key: bytes, value: bytes) -> bytes:
    """An ``mbox`` value as a whole copy: ts + the encoded dlv (a shared body's copy spliced)."""
    if value[8] != SHARED_MARK:
        return value
    seq = _SEQ.unpack(key[-8:])[0]
    return value[:8] + splice(seq, txn.get(value[9:17], db=tables.dbs["bodies"]))


def _dedup_key(dlv: bytes) -> bytes | None:
    """The dedup key of a stored copy (its sender device and message id), if it has one."""
    try:
        stanza = msgpack.unpackb(dlv, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.exceptions.ExtraData):
        return None
    sender, device, msg_id = stanza.get("from"), stanza.get("dev"), stanza.get("id")
    if stanza.get("k") not in ("msg", "rcpt") or type(sender) is not str or type(device) is not int \
            or type(msg_id) is not bytes:  # messages and receipts are deduplicated alike
        return None
    return device_key(sender, device) + msg_id


def _copy_blob_file(source: Path, target: Path) -> None:
    """A blob's file into the move folder, durably (an unfinished upload may have none yet)."""
    if not source.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    with open(target, "rb") as handle:
        os.fsync(handle.fileno())


def _outbox_waiting(tables: _Tables) -> int:
    with tables.env.begin(db=tables.dbs["outbox"]) as txn:
        return txn.stat(tables.dbs["outbox"])["entries"]


def forget_node(store, membership: Membership, node: str, lost: str, drop: bool = True) -> tuple[int, int]:
    """Before a list change that removes ``lost``, a node gone for good with its data: drop what
    this node keeps for it (``FanoutRecords.forget``: the group fan-out entries waiting for it —
    its members there miss those messages and changes — and the marks of its groups' entries), so
    that ``export`` and a start under the new list no longer wait for it. Returns (entries,
    marks) dropped — or, without ``drop``, counted only. ``MoveError`` unless ``lost`` is in the
    list this store was last served under and out of ``membership``, the new one: a mistyped or
    living node loses nothing."""
    stored = NodeList(store.env).get()
    if lost == node or lost in membership.nodes:
        raise MoveError(f"node {lost} is in node list version {membership.version} ({', '.join(membership.nodes)}): "
                        "only a node the new list leaves out can be forgotten")
    if stored is None or lost not in stored[2]:
        served = f"version {stored[0]} ({', '.join(stored[2])})" if stored else "none: it was not served in a cluster"
        raise MoveError(f"node {lost} is not in the node list this node was last served under, {served}: a mistyped "
                        "id, or this node ran without it already (then nothing waits for it here)")
    try:
        with store.env.begin(write=drop) as txn:
            return store.fanout.forget(txn, lost, drop)
    except lmdb.MapFullError:  # deleting takes free pages too (copy on write)
        raise MoveError("this node's store is full: raise lmdb_map_size_bytes in its configuration and run forget "
                        "again (nothing was dropped)") from None


def export_moves(store, membership: Membership, node: str, folder: Path, blob_files=None) -> dict[str, int]:
    """Write ``<folder>/<node>-to-<target>.move`` for every node that gets records of this store
    under ``membership`` (and the files of the blobs it gets, from ``blob_files``, into the folder
    ``<node>-to-<target>.blobs``); returns how many records each file holds."""
    tables = _Tables(store)
    waiting = _outbox_waiting(tables)
    if waiting:
        raise MoveError(f"{waiting} group fan-out entries still wait in this node's outbox: start the cluster under "
                        "the old node list until `interlink cluster status` shows outbox 0 on every node, then stop it")
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple] = {}
    counts: dict[str, int] = {}
    dedup_sent: set[tuple[str, bytes]] = set()
    try:
        with tables.env.begin() as txn:
            for table, key, value, _, home in _homed_elsewhere(txn, tables, membership, node):
                out = files.get(home)
                if out is None:
                    path = folder / f"{node}-to-{home}.move"
                    handle = open(path.with_suffix(".partial"), "wb")
                    handle.write(msgpack.packb({"format": MOVE_FORMAT, "from": node, "to": home,
                                                "version": membership.version, "digest": membership.digest}))
                    out = files[home] = (handle, path)
                    counts[home] = 0
                if table == "blobs" and blob_files is not None:
                    _copy_blob_file(blob_files.path(key), path.with_suffix(".blobs") / (key.hex() + ".blob"))
                records = [(table, key, value)]
                if table == "mbox":
                    whole = _whole_copy(txn, tables, key, value)
                    records = [(table, key, whole)]
                    dedup_key = _dedup_key(whole[8:])
                    first = txn.get(dedup_key, db=tables.dbs["dedup"]) if dedup_key else None
                    if first is not None and (home, dedup_key) not in dedup_sent:  # one per message and node
                        dedup_sent.add((home, dedup_key))
                        records.append(("dedup", dedup_key, bytes(first)))
                for record in records:
                    out[0].write(msgpack.packb(list(record)))
                counts[home] += len(records)
        for home, (handle, path) in files.items():
            handle.write(msgpack.packb({"end": counts[home]}))
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            os.replace(path.with_suffix(".partial"), path)
    finally:
        for handle, _ in files.values():
            handle.close()
    return counts


def import_moves(store, membership: Membership, node: str, path: Path, blob_files=None) -> int:
    """Put the records of move file ``path`` (made for ``node`` under ``membership``) into ``store``,
    and the blob files beside it into ``blob_files``; returns how many records were new.
    ``MoveError`` (no record written) for a file made for another node or list, a truncated file,
    or a record that conflicts with one already here. The blob files go in first: a record never
    names a missing file (files whose records were refused are removed at the next start)."""
    tables = _Tables(store)
    written = longest_item = 0
    with open(path, "rb") as handle:
        unpacker = msgpack.Unpacker(handle, raw=False, max_buffer_size=1 << 30)
        header = next(unpacker, None)
        if not isinstance(header, dict) or header.get("format") != MOVE_FORMAT:
            raise MoveError(f"{path}: not a move file of format {MOVE_FORMAT}")
        if header.get("to") != node or header.get("digest") != membership.digest:
            raise MoveError(f"{path}: made for node {header.get('to')} under node list version {header.get('version')}, "
                            f"not for node {node} under version {membership.version}")
        blobs_folder = path.with_suffix(".blobs")
        if blob_files is not None and blobs_folder.is_dir():
            for file in sorted(blobs_folder.iterdir()):
                blob_files.place(bytes.fromhex(file.stem), file)
        count = 0
        try:
            with tables.env.begin(write=True) as txn:
                for record in unpacker:
                    if isinstance(record, dict):
                        if record.get("end") != count:
                            raise MoveError(f"{path}: its trailer says {record.get('end')} records, it holds {count}")
                        break
                    table, key, value = record
                    if table not in IMPORTED_TABLES or type(key) is not bytes or type(value) is not bytes:
                        raise MoveError(f"{path}: record {count + 1} is not a moved record")
                    count += 1
                    if table == "mbox":  # a whole copy: ts + the dlv (export splices shared bodies)
                        longest_item = max(longest_item, len(value) - 8)
                    db = tables.dbs[table]
                    here = txn.get(key, db=db)
                    if here is None:
                        txn.put(key, value, db=db)
                        written += 1
                    elif here != value and table != "dedup":  # a dedup entry: either first store will do
                        shown = key[-16:][:4].hex() + "…" if table in BLOB_TABLES else repr(key)[:80]
                        raise MoveError(f"{path}: {table} record {shown} is here already with another value "
                                        "(this node served that user or group meanwhile?); nothing imported")
                else:
                    raise MoveError(f"{path}: truncated after {count} records (no trailer); nothing imported")
                store.blob_records.recount(txn)
                # this node's max_frame_bytes may be smaller than the exporter's: its next start checks
                store.mailboxes.raise_item_frame_bound(txn, longest_item)
        except lmdb.MapFullError:
            raise store_full() from None
    store.mailboxes.forget_cached_devices()
    return written


def prune(store, node_list: NodeList, membership: Membership, node: str, blob_files=None) -> dict[str, int]:
    """Delete every record of ``store`` that is not this node's under ``membership`` (after its
    new home imported it), and those blobs' files from ``blob_files``, and record ``membership``
    as the store's list; returns how many records per table. One transaction, deleting through
    each table's cursor as it walks it: what it holds in memory is the shared bodies whose
    references it dropped and the moved blobs' ids, never the records (a third of a large store
    when a node is added)."""
    tables = _Tables(store)
    deleted: dict[str, int] = {}
    released: dict[bytes, int] = {}
    moved_blobs: list[bytes] = []
    home_of = _home_finder(membership)
    try:
        with tables.env.begin(write=True) as txn:
            for table in MOVED_TABLES:
                cursor = txn.cursor(db=tables.dbs[table])
                cursor.first()
                while key := cursor.key():  # b"" once the cursor passed the last record
                    who = owner(table, key)
                    if who is None or home_of(who) == node:
                        cursor.next()
                        continue
                    if table == "mbox":
                        value = cursor.value()
                        if value[8] == SHARED_MARK:  # one reference less to its body
                            released[value[9:17]] = released.get(value[9:17], 0) + 1
                    elif table == "blobs":
                        moved_blobs.append(key)
                    deleted[table] = deleted.get(table, 0) + 1
                    cursor.delete()  # and on to the next record
            store.mailboxes.release_bodies(txn, released)
            store.blob_records.recount(txn)
            node_list.put(txn, membership)
    except lmdb.MapFullError:
        raise store_full() from None
    store.mailboxes.forget_cached_devices()
    if blob_files is not None:
        for key in moved_blobs:
            blob_files.delete(key)
    return deleted
