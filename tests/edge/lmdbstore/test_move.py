"""Moving users and groups between stores when a cluster's node list changes
(``core/edge/lmdbstore/move.py``), on real LMDB: what moves (every table of a user, a group's
record, shared group bodies written whole, the dedup entries of moved copies), what stays, a file
imported twice or made for another node, a truncated file, a conflict, and the start-up check."""

from __future__ import annotations

import os

import msgpack
import pytest

from interlink.core.domain.batch import GroupRecord, GroupWrite, WriteBatch, device_key
from interlink.core.domain.cluster import Membership
from interlink.core.domain.fanout import GroupDlv
from interlink.core.edge.lmdbstore.mailboxes import check_item_frames
from interlink.core.edge.lmdbstore.move import (
    MOVED_TABLES, MoveError, check_node_list, export_moves, forget_node, import_moves, owner, prune, stray,
)
from interlink.core.errors import ConfigError
from interlink.testing import lmdb_store

OLD = Membership(["node-a"], 1)
NEW = Membership(["node-a", "node-b"], 2)
USERS = [f"u{i}@alpha" for i in range(24)]
MOVING = [u for u in USERS if NEW.home(u) == "node-b"]
STAYING = [u for u in USERS if NEW.home(u) == "node-a"]


@pytest.fixture
def stores(tmp_path):
    a = lmdb_store(tmp_path / "a", sync=False, map_size_bytes=1 << 24)
    b = lmdb_store(tmp_path / "b", sync=False, map_size_bytes=1 << 24)
    yield a, b
    a.close()
    b.close()


def fill(store) -> dict:
    """Every kind of record for every user, a shared group message and a group record; returns
    what the test compares after the move."""
    for user in USERS:
        for device in (1, 2):
            store.register_device(user, device, 5)
            store.put_prekeys(user, device, b"i" * 32, (1, b"s" * 32, b"g" * 64), [(7, b"o" * 32), (8, b"p" * 32)], 100)
        store.set_consent(user, ("*",), True)
        store.set_phone(user, "+4912345")
        store.set_push_token(device_key(user, 1), b"token-" + user.encode())
    store.add_block(MOVING[0], STAYING[0], 100)
    store.add_block(STAYING[1], MOVING[1], 100)
    msg_id, sender = os.urandom(16), STAYING[0]
    batch = WriteBatch()
    entry = batch.add_message(device_key(sender, 1), msg_id, 1234, [
        (device_key(user, 1), GroupDlv(msg_id, sender, 1, b"shared body", b"g" * 16)) for user in USERS[1:]])
    entry.shared = entry.skip_full = True
    one = batch.add_message(device_key(sender, 2), os.urandom(16), 1235,
                            [(device_key(MOVING[0], 2), lambda seq, ts: b"\x81\xa1t\xa3dlv")])
    groups = {}
    for n in range(8):
        g = os.urandom(16)
        groups[g] = GroupRecord(1, (STAYING[0], MOVING[0]), (STAYING[0],), b"meta")
        batch.add_control(1000, [], GroupWrite(g, 0, groups[g]))
    store.commit(batch)
    assert entry.stored and one.stored
    return {"msg_id": msg_id, "sender": sender, "groups": groups}


def snapshot(store, users) -> dict:
    return {user: (store.devices(user), [store.pending(device_key(user, d)) for d in (1, 2)],
                   [store.mailbox_state(device_key(user, d)).pack() for d in (1, 2)], store.consent(user),
                   store.phone(user), store.push_token(device_key(user, 1)), store.read_prekeys(user, [1, 2]),
                   store.blocked(user))
            for user in users}


def move(a, b, tmp_path) -> dict:
    counts = export_moves(a, NEW, "node-a", tmp_path / "moves")
    import_moves(b, NEW, "node-b", tmp_path / "moves" / "node-a-to-node-b.move")
    prune(a, a.node_list, NEW, "node-a")
    return counts


def test_every_record_of_a_moving_user_or_group_reaches_its_new_home_and_leaves_the_old(stores, tmp_path):
    a, b = stores
    made = fill(a)
    before = snapshot(a, USERS)
    assert stray(a, NEW, "node-a")[0] > 0 and stray(a, OLD, "node-a") == (0, None)
    move(a, b, tmp_path)
    assert stray(a, NEW, "node-a") == (0, None) and stray(b, NEW, "node-b") == (0, None)
    assert snapshot(b, MOVING) == {u: before[u] for u in MOVING}
    assert snapshot(a, STAYING) == {u: before[u] for u in STAYING}
    assert all(a.devices(u) == () and a.pending(device_key(u, 1)) == [] for u in MOVING)
    assert all(b.devices(u) == () for u in STAYING)
    assert b.is_blocked(MOVING[0], STAYING[0]) and a.is_blocked(STAYING[1], MOVING[1])
    assert MOVING[0] in b.directory("+4912345") and MOVING[0] not in a.directory("+4912345")
    for g, record in made["groups"].items():
        home, other = (a, b) if NEW.home(g) == "node-a" else (b, a)
        assert home.group(g).members == record.members and other.group(g) is None
    # The moved copies' dedup entries went along: a resend of that message is recognised there.
    assert b.seen(device_key(made["sender"], 1), made["msg_id"]) and a.seen(device_key(made["sender"], 1), made["msg_id"])


def test_shared_bodies_are_written_whole_and_released_at_the_old_home(stores, tmp_path):
    a, b = stores
    fill(a)
    assert a.usage()["shared_bodies"] == 1
    move(a, b, tmp_path)
    assert b.usage()["shared_bodies"] == 0  # whole copies there
    assert a.usage()["shared_bodies"] == 1  # still referred to by the staying users' copies
    for user in STAYING:
        a.commit(_recv(a, user))
    assert a.usage()["shared_bodies"] == 0  # the last reference went: so did the body


def _recv(store, user: str) -> WriteBatch:
    batch = WriteBatch()
    batch.delete(device_key(user, 1), [seq for seq, _ in store.pending(device_key(user, 1))])
    return batch


def test_imported_items_raise_the_frame_the_store_needs_and_a_smaller_start_is_refused(stores, tmp_path):
    a, b = stores
    fill(a)
    batch = WriteBatch()  # a large item for a moving user, stored where frames may be 65,535 bytes
    batch.add_message(device_key(STAYING[0], 1), os.urandom(16), 1236,
                      [(device_key(MOVING[0], 1), lambda seq, ts: b"x" * 30_000)])
    a.commit(batch)
    check_item_frames(b.mailboxes, 12_000)  # node-b serves smaller frames, with nothing stored yet
    assert b.mailboxes.item_frame_bound() == 12_000
    move(a, b, tmp_path)
    assert b.mailboxes.item_frame_bound() == 30_016
    with pytest.raises(ConfigError, match="1 stored item"):
        check_item_frames(b.mailboxes, 12_000)  # node-b's next start: the item could never be pushed
    b.commit(_recv(b, MOVING[0]))
    check_item_frames(b.mailboxes, 12_000)


def test_a_file_imported_twice_changes_nothing_the_second_time(stores, tmp_path):
    a, b = stores
    fill(a)
    counts = export_moves(a, NEW, "node-a", tmp_path / "moves")
    path = tmp_path / "moves" / "node-a-to-node-b.move"
    assert import_moves(b, NEW, "node-b", path) == counts["node-b"]
    assert import_moves(b, NEW, "node-b", path) == 0


def test_a_file_for_another_node_or_list_a_truncated_file_and_a_conflict_are_refused_whole(stores, tmp_path):
    a, b = stores
    fill(a)
    export_moves(a, NEW, "node-a", tmp_path / "moves")
    path = tmp_path / "moves" / "node-a-to-node-b.move"
    with pytest.raises(MoveError, match="not for node node-a"):
        import_moves(a, NEW, "node-a", path)
    with pytest.raises(MoveError, match="version 2"):
        import_moves(b, Membership(["node-a", "node-b"], 3), "node-b", path)
    data = path.read_bytes()
    cut = tmp_path / "cut.move"
    cut.write_bytes(data[: len(data) - 12])
    with pytest.raises(MoveError, match="truncated|trailer"):
        import_moves(b, NEW, "node-b", cut)
    assert stray(b, OLD, "node-a") == (0, None) and b.devices(MOVING[0]) == ()  # nothing written
    b.register_device(MOVING[0], 2, 5)  # node-b served that user meanwhile: another mailbox
    b.commit(_one_copy(MOVING[0], 2))
    with pytest.raises(MoveError, match="another value"):
        import_moves(b, NEW, "node-b", path)
    assert b.devices(MOVING[1]) == ()


def _one_copy(user: str, device: int) -> WriteBatch:
    batch = WriteBatch()
    batch.add_message(device_key("x@alpha", 1), os.urandom(16), 1, [(device_key(user, device), lambda s, t: b"\x80")])
    return batch


def test_export_refuses_while_group_fan_out_entries_wait(stores, tmp_path):
    a, _ = stores
    batch = WriteBatch()
    entry = batch.add_control(1000, [], GroupWrite(os.urandom(16), 0, GroupRecord(1, (USERS[0],), (USERS[0],), None)))
    entry.outbox = [("node-b", 1, msgpack.packb(["alpha", "u0", 1, 100, {}]), None)]
    a.commit(batch)
    with pytest.raises(MoveError, match="outbox"):
        export_moves(a, NEW, "node-a", tmp_path / "moves")
    assert not (tmp_path / "moves").exists() or not any((tmp_path / "moves").iterdir())


def test_a_node_refuses_to_start_under_a_list_that_strands_its_data_until_it_is_moved(stores, tmp_path):
    a, b = stores
    fill(a)
    check_node_list(a, a.node_list, OLD, "node-a")  # served under the old list: recorded
    assert a.node_list.get()[:2] == (1, OLD.digest)
    with pytest.raises(ConfigError, match="move them first") as refused:
        check_node_list(a, a.node_list, NEW, "node-a")
    assert "version 1" in str(refused.value) and "node-b" in str(refused.value)
    assert a.node_list.get()[0] == 1  # not recorded
    move(a, b, tmp_path)
    assert a.node_list.get()[:2] == (2, NEW.digest)
    check_node_list(a, a.node_list, NEW, "node-a")
    check_node_list(b, b.node_list, NEW, "node-b")  # a new node: nothing of others', so the list is recorded
    assert b.node_list.get()[:2] == (2, NEW.digest)


def test_a_list_change_that_moves_nothing_here_needs_no_move(stores):
    a, _ = stores
    staying_only = STAYING[:3]
    for user in staying_only:
        a.register_device(user, 1, 5)
    check_node_list(a, a.node_list, OLD, "node-a")
    check_node_list(a, a.node_list, NEW, "node-a")
    assert a.node_list.get()[0] == 2


@pytest.mark.parametrize("table", MOVED_TABLES)
def test_every_moved_tables_keys_name_their_owner(table):
    user = "alice@alpha"
    keys = {
        "devices": device_key(user, 3), "mbox": device_key(user, 3) + bytes(8), "seqs": device_key(user, 3),
        "prekeys": device_key(user, 3), "otpks": device_key(user, 3) + bytes(4), "push_devices": device_key(user, 3),
        "push_intents": device_key(user, 3), "blocks": user.encode() + b"\x00bob@beta", "consent": user.encode(),
        "block_counts": user.encode(), "phones": user.encode(), "blocked_by": b"bob@beta\x00" + user.encode(),
        "directory": b"+4912345\x00" + user.encode(), "groups": b"g" * 16, "blobs": b"b" * 16,
        "blob_expiry": bytes(8) + b"b" * 16, "blob_uploads": user.encode() + b"\x00" + b"b" * 16,
    }
    ids = {"groups": b"g" * 16, "blobs": b"b" * 16, "blob_expiry": b"b" * 16, "blob_uploads": b"b" * 16}
    assert owner(table, keys[table]) == ids.get(table, user)


def test_the_blob_totals_key_belongs_to_no_one():
    assert owner("blobs", b"#totals") is None


def test_a_blob_moves_with_its_file_and_the_totals_follow(stores, tmp_path):
    """A blob lives on the node its id hashes to: a ready one and an unfinished upload whose ids'
    home changes go to node-b, record, indexes and file; each store's totals are counted again."""
    from interlink.core.domain.blobs import BlobRecord
    from interlink.core.edge.blobfiles import BlobFileStore

    a, b = stores
    files_a, files_b = BlobFileStore(tmp_path / "blobs-a"), BlobFileStore(tmp_path / "blobs-b")
    ids = [os.urandom(16) for _ in range(40)]
    moving = [blob for blob in ids if NEW.home(blob) == "node-b"][:2]
    staying = [blob for blob in ids if NEW.home(blob) == "node-a"][:1]
    ready, unfinished = moving
    for blob, size in ((ready, 5000), (unfinished, 3000), (staying[0], 7000)):
        assert a.create_blob(blob, BlobRecord(USERS[0], size, bytes(32), 1, 10**13, False, b""), 10)
        files_a.write(blob, 0, b"x" * (size if blob != unfinished else 100))
    for blob, size in ((ready, 5000), (staying[0], 7000)):
        files_a.finish(blob, size)
        assert a.mark_blob_ready(blob, 10**13, 2)
    assert a.blob_usage() == {"blob_uploads": 1, "blobs_ready": 2, "blob_bytes": 12000}
    export_moves(a, NEW, "node-a", tmp_path / "moves", files_a)
    import_moves(b, NEW, "node-b", tmp_path / "moves" / "node-a-to-node-b.move", files_b)
    prune(a, a.node_list, NEW, "node-a", files_a)
    assert b.blob(ready).ready and b.blob(unfinished).size == 3000 and a.blob(ready) is None
    assert files_b.read(ready, 0, 5000) == b"x" * 5000 and files_b.read(unfinished, 0, 100) == b"x" * 100
    assert not files_a.path(ready).exists() and files_a.read(staying[0], 0, 10) == b"x" * 10
    assert b.blob_usage() == {"blob_uploads": 1, "blobs_ready": 1, "blob_bytes": 5000}
    assert a.blob_usage() == {"blob_uploads": 0, "blobs_ready": 1, "blob_bytes": 7000}
    assert b.unfinished_blobs(USERS[0], 10) == [unfinished] and a.unfinished_blobs(USERS[0], 10) == []
    assert [blob for blob in b.expired_blobs(10**14, 10)] == sorted([ready, unfinished], key=lambda x: x)  # by expiry, then id


def test_a_start_under_another_list_waits_for_the_outbox_to_empty(stores):
    """Entries name their members by the old list: a node may not start under a new one while
    any wait (for a node that left, they would never go)."""
    a, _ = stores
    check_node_list(a, a.node_list, OLD, "node-a")
    g = next(g for g in (os.urandom(16) for _ in range(100)) if NEW.home(g) == "node-a")  # nothing else to move
    batch = WriteBatch()
    entry = batch.add_control(1000, [], GroupWrite(g, 0, GroupRecord(1, (STAYING[0],), (STAYING[0],), None)))
    entry.outbox = [("node-c", 1, msgpack.packb(["alpha", "u0", 1, 100, {}]), None)]
    a.commit(batch)
    with pytest.raises(ConfigError, match="fan-out entries .* wait"):
        check_node_list(a, a.node_list, NEW, "node-a")
    check_node_list(a, a.node_list, OLD, "node-a")  # the old list still starts, and sends them
    batch = WriteBatch()
    batch.outbox_acked["node-c"] = 1
    a.commit(batch)
    check_node_list(a, a.node_list, NEW, "node-a")
    assert a.node_list.get()[0] == 2


def test_a_node_lost_for_good_is_forgotten_and_the_list_change_goes_on(stores, tmp_path):
    """Entries for a node gone with its data would hold the change back for ever: ``forget_node``
    drops them and that node's marks here — nothing of the nodes that stay (node-c9 and node-c
    share a prefix) — and only for a node of the old list that the new one leaves out."""
    a, _ = stores
    three = Membership(["node-a", "node-c", "node-c9"], 1)
    without_c = Membership(["node-a", "node-c9"], 2)
    check_node_list(a, a.node_list, three, "node-a")
    g = next(g for g in (os.urandom(16) for _ in range(1000)) if three.home(g) == without_c.home(g) == "node-a")
    packed = msgpack.packb(["alpha", "u0", 1, 100, {}])
    batch = WriteBatch()
    entry = batch.add_control(1000, [], GroupWrite(g, 0, GroupRecord(1, (STAYING[0],), (STAYING[0],), None)))
    entry.outbox = [("node-c", 1, packed, None), ("node-c", 2, packed, None), ("node-c9", 1, packed, None)]
    for home, seq in (("node-c", 4), ("node-c", 7), ("node-c9", 3)):  # what node-c's groups (two runs) sent here
        batch.add_control(1000, [(device_key(STAYING[0], 1), lambda s, t: b"\x80")]).fanin = (
            home, bytes([seq]) * 8, seq, None)
    a.commit(batch)
    assert [a.fanin_mark("node-c", bytes([seq]) * 8) for seq in (4, 7)] == [4, 7]
    with pytest.raises(MoveError, match="outbox"):
        export_moves(a, without_c, "node-a", tmp_path / "moves")

    for lost, refusal in (("node-c9", "in node list version 2"), ("node-a", "in node list version 2"),
                          ("node-x", "not in the node list this node was last served under, version 1")):
        with pytest.raises(MoveError, match=refusal):
            forget_node(a, without_c, "node-a", lost)
    assert a.outbox_nodes() == {"node-c": 2, "node-c9": 1}  # nothing dropped by a refusal

    assert forget_node(a, without_c, "node-a", "node-c", drop=False) == (2, 2)  # counted only
    assert a.outbox_nodes() == {"node-c": 2, "node-c9": 1}
    assert forget_node(a, without_c, "node-a", "node-c") == (2, 2)
    assert a.outbox_nodes() == {"node-c9": 1}
    assert [a.fanin_mark("node-c", bytes([seq]) * 8) for seq in (4, 7)] == [0, 0]
    assert a.fanin_mark("node-c9", bytes([3]) * 8) == 3
    assert a.outbox_last("node-c") == 2  # a node given node-c's id later gets new numbers
    assert forget_node(a, without_c, "node-a", "node-c") == (0, 0)  # twice: nothing more
    with pytest.raises(MoveError, match="outbox"):  # node-c9's entry still waits: it is delivered, not dropped
        export_moves(a, without_c, "node-a", tmp_path / "moves")
    batch = WriteBatch()
    batch.outbox_acked["node-c9"] = 1
    a.commit(batch)
    assert export_moves(a, without_c, "node-a", tmp_path / "moves") == {}
    check_node_list(a, a.node_list, without_c, "node-a")
    assert a.node_list.get()[0] == 2


def test_a_full_store_that_cannot_forget_says_what_to_do(stores, monkeypatch):
    """Deleting takes free pages too: LMDB cannot be made to run out of them on demand (a full map
    still freed a failed commit's pages, tried here), so the full map is injected."""
    import lmdb

    a, _ = stores
    check_node_list(a, a.node_list, Membership(["node-a", "node-c"], 1), "node-a")

    def full(txn, node, drop):
        raise lmdb.MapFullError("injected")

    monkeypatch.setattr(a.fanout, "forget", full)
    with pytest.raises(MoveError, match=r"raise lmdb_map_size_bytes .* \(nothing was dropped\)"):
        forget_node(a, Membership(["node-a"], 2), "node-a", "node-c")


def test_a_store_never_served_in_a_cluster_forgets_no_node(stores):
    a, _ = stores
    with pytest.raises(MoveError, match="none: it was not served in a cluster"):
        forget_node(a, NEW, "node-a", "node-c")


def test_a_scan_whose_memo_of_homes_overflows_finds_the_same_records(stores, tmp_path, monkeypatch):
    """Clearing the bounded memo changes no answer (what the bound saves, memory, no test sees)."""
    import interlink.core.edge.lmdbstore.move as move_module

    a, _ = stores
    fill(a)
    full = stray(a, NEW, "node-a")
    monkeypatch.setattr(move_module, "HOMES_REMEMBERED", 1)  # cleared at every other owner
    assert stray(a, NEW, "node-a") == full and full[0] > 0
