"""Group records on a real LMDB environment: written by the group commit in the same transaction
as the items that announce them, compare-and-set on ``ver``, deletion, durability, atomicity."""

import os

import pytest

from interlink.core.domain.batch import GroupRecord, GroupWrite, WriteBatch, device_key
from interlink.core.errors import StoreFullError
from interlink.testing import lmdb_store


@pytest.fixture
def store(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24, max_mailbox_items=3)
    yield store
    store.close()


def build(tag: bytes):
    return lambda seq, ts: b"%s:%d:%d" % (tag, seq, ts)


def change(store, g, prior_ver, record, items=()):
    batch = WriteBatch()
    entry = batch.add_control(1000, list(items), GroupWrite(g, prior_ver, record))
    store.commit(batch)
    return entry


def test_record_round_trip_keeps_order_admins_and_meta(store):
    g = os.urandom(16)
    assert store.group(g) is None
    record = GroupRecord(1, ("alice@alpha", "bob@beta", "carl@beta"), ("alice@alpha",), b"\x00meta")
    entry = change(store, g, 0, record)
    assert entry.refused is None
    got = store.group(g)
    assert (got.ver, got.members, got.admins, got.meta) == (1, record.members, record.admins, b"\x00meta")
    assert got.member_set == {"alice@alpha", "bob@beta", "carl@beta"}
    change(store, g, 1, GroupRecord(2, ("bob@beta",), ("bob@beta",), None))
    got = store.group(g)
    assert (got.ver, got.members, got.admins, got.meta) == (2, ("bob@beta",), ("bob@beta",), None)


def test_record_and_event_items_commit_together_and_events_ignore_quota(store):
    g = os.urandom(16)
    bob = device_key("bob@beta", 1)
    for i in range(3):  # bob's mailbox is at its quota (3 items)
        batch = WriteBatch()
        batch.add_message(device_key("x@alpha", 1), os.urandom(16), 1, [(bob, build(b"m"))])
        store.commit(batch)
    entry = change(store, g, 0, GroupRecord(1, ("alice@alpha", "bob@beta"), ("alice@alpha",), None), [(bob, build(b"ev"))])
    assert entry.refused is None and [(k, s) for k, s, _ in entry.stored] == [(bob, 4)]
    assert store.pending(bob)[-1] == (4, b"ev:4:1000")
    assert store.pending_count(bob) == 4


def test_write_from_a_stale_ver_is_refused_with_nothing_stored(store):
    g = os.urandom(16)
    bob = device_key("bob@beta", 1)
    change(store, g, 0, GroupRecord(1, ("alice@alpha",), ("alice@alpha",), None))
    stale = change(store, g, 5, GroupRecord(6, ("alice@alpha", "bob@beta"), ("alice@alpha",), None), [(bob, build(b"ev"))])
    assert stale.refused == "conflict" and stale.stored == []
    assert store.pending(bob) == [] and store.group(g).ver == 1
    again = change(store, g, 0, GroupRecord(1, ("eve@beta",), ("eve@beta",), None))  # create over an existing id
    assert again.refused == "conflict" and store.group(g).members == ("alice@alpha",)


def test_delete_and_control_entry_without_group(store):
    g = os.urandom(16)
    alice2 = device_key("alice@alpha", 2)
    change(store, g, 0, GroupRecord(1, ("alice@alpha",), ("alice@alpha",), None))
    gone = change(store, g, 1, None, [(alice2, build(b"left"))])
    assert gone.refused is None and store.group(g) is None
    assert store.pending(alice2) == [(1, b"left:1:1000")]
    batch = WriteBatch()
    plain = batch.add_control(5, [])  # an answer that waits for the commit
    store.commit(batch)
    assert plain.refused is None and plain.stored == []


def test_group_message_to_fifty_devices_with_one_full_mailbox_stores_nothing(store):
    devices = [device_key(f"u{u}@beta", d) for u in range(10) for d in range(1, 6)]
    full = devices[37]
    for _ in range(3):
        batch = WriteBatch()
        batch.add_message(device_key("x@alpha", 1), os.urandom(16), 1, [(full, build(b"m"))])
        store.commit(batch)
    batch = WriteBatch()
    message = batch.add_message(device_key("u0@beta", 1), b"G" * 16, 2, [(d, build(b"g")) for d in devices if d != devices[0]])
    store.commit(batch)
    assert message.refused == "mailbox_full" and message.stored == []
    assert all(store.pending_count(d) == 0 for d in devices if d != full)
    # and the id was not burnt: the same message is stored once the mailbox has room
    store.commit(_deletion(full, [1]))
    batch = WriteBatch()
    again = batch.add_message(device_key("u0@beta", 1), b"G" * 16, 3, [(d, build(b"g")) for d in devices if d != devices[0]])
    store.commit(batch)
    assert again.refused is None and not again.dup and len(again.stored) == 49


def _deletion(dkey, seqs):
    batch = WriteBatch()
    batch.delete(dkey, seqs)
    return batch


def test_groups_survive_reopening(tmp_path):
    g = os.urandom(16)
    first = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    change(first, g, 0, GroupRecord(3, ("a@alpha", "b@beta"), ("b@beta",), b"m"))
    first.close()
    second = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    got = second.group(g)
    assert (got.ver, got.members, got.admins, got.meta) == (3, ("a@alpha", "b@beta"), ("b@beta",), b"m")
    second.close()


def test_full_map_writes_no_group(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 20)
    g = os.urandom(16)
    huge = [(device_key("bob@beta", 1), build(b"x" * 200_000)) for _ in range(8)]
    with pytest.raises(StoreFullError):
        change(store, g, 0, GroupRecord(1, ("a@alpha",), ("a@alpha",), None), huge)
    assert store.group(g) is None and store.pending_count(device_key("bob@beta", 1)) == 0
    store.close()


def test_control_items_stop_at_the_overdraft_past_the_quota(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24, max_mailbox_items=2, control_overdraft_items=1)
    try:
        bob, carl = device_key("bob@beta", 1), device_key("carl@beta", 1)
        g = os.urandom(16)
        entries = [change(store, g, ver, GroupRecord(ver + 1, ("alice@alpha",), ("alice@alpha",), None),
                          [(bob, build(b"ev%d" % ver)), (carl, build(b"c%d" % ver))] if ver < 3 else [(bob, build(b"late"))])
                   for ver in range(5)]
        assert [e.refused for e in entries] == [None] * 5 and store.group(g).ver == 5  # the change is never refused
        assert [e.kept for e in entries[:3]] == [None] * 3 and entries[3].kept == [] and entries[3].dropped_full == 1
        assert [v for _, v in store.pending(bob)] == [b"ev0:1:1000", b"ev1:2:1000", b"ev2:3:1000"]
        assert store.mailbox_state(bob).last_seq == 3  # a skipped copy takes no seq
        assert store.pending_count(carl) == 3
    finally:
        store.close()

