"""Devices, mailboxes, shared group bodies and the dedup window (``core/edge/lmdbstore/mailboxes.py``)
on a real LMDB environment in a temporary folder: the storage contract the router relies on;
a group message's body stored once, mailbox items referring to it, each copy read back whole
byte for byte, the body going with its last reference (recv or the TTL sweep); quotas and
expiry; and, driven by hypothesis, the mailbox store against a model (put, recv, reconnect,
expire, quota and crash-restart)."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from interlink.core.domain import _fanout_pure
from interlink.core.domain.batch import WriteBatch, device_key
from interlink.core.domain.fanout import DLV_HEAD, GroupDlv
from interlink.core.edge.lmdbstore import LmdbStore
from interlink.core.edge.mailbox import SHARED_MARK
from interlink.core.edge.lmdbstore.mailboxes import check_item_frames
from interlink.core.errors import ConfigError, StoreFullError, StoreLimitError
from interlink.core.protocol.stanza import decode_stanzas, encode_stanza
from interlink.testing import lmdb_store

_REFS = struct.Struct(">I")


@pytest.fixture
def store(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    yield store
    store.close()


def shared_body_references(store: LmdbStore) -> tuple[dict[bytes, int], dict[bytes, int], set[bytes]]:
    """``(references, counts, bodies)``: how many ``mbox`` items refer to each shared body (by
    scanning every item), what ``body_refs`` says, and the keys in ``bodies``."""
    references: dict[bytes, int] = {}
    mailboxes = store.mailboxes
    with store.env.begin() as txn:
        for _, value in txn.cursor(db=mailboxes.mbox_db):
            if value[8] == SHARED_MARK:
                references[value[9:17]] = references.get(value[9:17], 0) + 1
        counts = {key: _REFS.unpack(raw)[0] for key, raw in txn.cursor(db=mailboxes.body_refs_db)}
        bodies = {key for key, _ in txn.cursor(db=mailboxes.bodies_db)}
    return references, counts, bodies


# -- devices


def test_register_is_idempotent_and_sorted(store):
    assert store.register_device("alice@alpha", 7, 5) == (7,)
    assert store.register_device("alice@alpha", 2, 5) == (2, 7)
    assert store.register_device("alice@alpha", 7, 5) == (2, 7)
    assert store.devices("alice@alpha") == (2, 7)


def test_users_do_not_share_devices_even_with_prefix_names(store):
    store.register_device("al@alpha", 1, 5)
    store.register_device("al@alpha2", 2, 5)
    store.register_device("al", 3, 5)
    assert store.devices("al@alpha") == (1,)
    assert store.devices("al@alpha2") == (2,)
    assert store.devices("al") == (3,)
    assert store.devices("nobody@alpha") == ()


def test_device_limit_refuses_new_devices_but_not_known_ones(store):
    for device in (1, 2, 3):
        store.register_device("bob@beta", device, 3)
    with pytest.raises(StoreLimitError):  # the gateway answers it as device_limit
        store.register_device("bob@beta", 4, 3)
    assert store.register_device("bob@beta", 2, 3) == (1, 2, 3)
    assert store.devices("bob@beta") == (1, 2, 3)


def test_devices_survive_reopening(tmp_path):
    first = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    first.register_device("carol@alpha", 2**31 - 1, 5)
    first.close()
    second = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    assert second.devices("carol@alpha") == (2**31 - 1,)
    second.close()


# -- mailboxes


def build(tag: bytes):
    return lambda seq, ts: tag + b":%d:%d" % (seq, ts)


def commit_message(store, sender, msg_id, ts, items):
    batch = WriteBatch()
    message = batch.add_message(sender, msg_id, ts, items)
    store.commit(batch)
    return message


def test_seqs_start_at_one_and_only_grow(store):
    bob1, bob2 = device_key("bob@beta", 1), device_key("bob@beta", 2)
    sender = device_key("alice@alpha", 1)
    first = commit_message(store, sender, b"A" * 16, 1000, [(bob1, build(b"a")), (bob2, build(b"a"))])
    assert [(k, s) for k, s, _ in first.stored] == [(bob1, 1), (bob2, 1)]
    assert first.stored[0][2] == b"a:1:1000"  # built with the seq and ts the commit assigned
    batch = WriteBatch()
    batch.delete(bob1, [1])
    store.commit(batch)
    assert store.pending(bob1) == []
    second = commit_message(store, sender, b"B" * 16, 2000, [(bob1, build(b"b"))])
    assert second.stored[0][1] == 2  # deletion never lets a seq come back


def test_one_batch_numbers_many_messages_in_order(store):
    bob = device_key("bob@beta", 1)
    batch = WriteBatch()
    messages = [batch.add_message(device_key("s@alpha", 1), bytes([i]) * 16, i, [(bob, build(b"m%d" % i))]) for i in range(5)]
    store.commit(batch)
    assert [m.stored[0][1] for m in messages] == [1, 2, 3, 4, 5]
    assert [seq for seq, _ in store.pending(bob)] == [1, 2, 3, 4, 5]
    assert [seq for seq, _ in store.pending(bob, after_seq=2, limit=2)] == [3, 4]
    assert store.pending_count(bob) == 5


def test_duplicates_are_stored_once_per_sender_device(store):
    bob = device_key("bob@beta", 1)
    alice1, alice2 = device_key("alice@alpha", 1), device_key("alice@alpha", 2)
    msg_id = b"I" * 16
    first = commit_message(store, alice1, msg_id, 1000, [(bob, build(b"x"))])
    batch = WriteBatch()
    again = batch.add_message(alice1, msg_id, 5000, [(bob, build(b"x"))])
    twice = batch.add_message(alice1, msg_id, 6000, [(bob, build(b"x"))])
    other_device = batch.add_message(alice2, msg_id, 7000, [(bob, build(b"y"))])  # another sender device
    store.commit(batch)
    assert not first.dup
    assert (again.dup, again.ts_ms, again.stored) == (True, 1000, [])
    assert (twice.dup, twice.ts_ms) == (True, 1000)
    assert not other_device.dup
    assert store.pending_count(bob) == 2


def test_mailboxes_of_other_devices_are_separate(store):
    sender = device_key("s@alpha", 1)
    commit_message(store, sender, b"1" * 16, 1, [(device_key("bob@beta", 1), build(b"one"))])
    commit_message(store, sender, b"2" * 16, 2, [(device_key("bob@beta", 2), build(b"two"))])
    commit_message(store, sender, b"3" * 16, 3, [(device_key("bob@beta2", 1), build(b"three"))])
    assert [v for _, v in store.pending(device_key("bob@beta", 1))] == [b"one:1:1"]
    assert [v for _, v in store.pending(device_key("bob@beta", 2))] == [b"two:1:2"]
    assert store.pending_count(device_key("bob@beta", 3)) == 0


def test_mailboxes_survive_reopening(tmp_path):
    bob = device_key("bob@beta", 1)
    first = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    commit_message(first, device_key("s@alpha", 1), b"K" * 16, 9, [(bob, build(b"kept"))])
    first.close()
    second = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    assert second.pending(bob) == [(1, b"kept:1:9")]
    again = commit_message(second, device_key("s@alpha", 1), b"K" * 16, 10, [(bob, build(b"kept"))])
    assert again.dup  # the dedup window survives a restart too
    second.close()


def test_a_full_map_refuses_the_batch_and_keeps_what_was_there(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 20)
    bob = device_key("bob@beta", 1)
    commit_message(store, device_key("s@alpha", 1), b"0" * 16, 1, [(bob, build(b"early"))])
    batch = WriteBatch()
    big = b"z" * 4000
    for i in range(400):  # about 1.6 MB: more than the 1 MiB map
        batch.add_message(device_key("s@alpha", 1), i.to_bytes(16, "big"), 2, [(bob, lambda seq, ts: big)])
    with pytest.raises(StoreFullError) as caught:
        store.commit(batch)
    assert caught.value.code == "overloaded"
    assert store.pending(bob) == [(1, b"early:1:1")]
    assert all(not m.stored and not m.dup for m in batch.entries)
    store.close()


# -- quotas, expiry and the dedup window


def test_quota_refuses_a_whole_message_and_keeps_counts(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24, max_mailbox_items=3, max_mailbox_bytes=1 << 20)
    bob1, bob2 = device_key("bob@beta", 1), device_key("bob@beta", 2)
    sender = device_key("alice@alpha", 1)
    commit_message(store, sender, b"a" * 16, 1, [(bob1, build(b"x")), (bob1, build(b"x")), (bob2, build(b"x"))])
    refused = commit_message(store, sender, b"b" * 16, 2, [(bob2, build(b"y")), (bob1, build(b"y")), (bob1, build(b"y"))])
    assert refused.refused == "mailbox_full" and refused.stored == [] and not refused.dup
    assert (store.pending_count(bob1), store.pending_count(bob2)) == (2, 1)  # bob2's copy was not stored either
    again = commit_message(store, sender, b"b" * 16, 3, [(bob1, build(b"y"))])
    assert not again.dup and again.stored  # a refused message left no dedup entry behind
    state = store.mailbox_state(bob1)
    assert (state.items, state.last_seq) == (3, 3)
    assert state.bytes == sum(len(v) for _, v in store.pending(bob1))
    store.close()


def test_received_items_deleted_in_the_same_commit_make_room_for_its_messages(tmp_path):
    # A recv's deletion may wait for the next message's commit (core/edge/commit.py): the room it
    # frees counts for that message.
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24, max_mailbox_items=2, max_mailbox_bytes=1 << 20)
    bob = device_key("bob@beta", 1)
    sender = device_key("alice@alpha", 1)
    commit_message(store, sender, b"a" * 16, 1, [(bob, build(b"one")), (bob, build(b"two"))])
    batch = WriteBatch()
    third = batch.add_message(sender, b"b" * 16, 2, [(bob, build(b"three"))])
    batch.delete(bob, [1])
    store.commit(batch)
    assert third.refused is None and [seq for seq, _ in store.pending(bob)] == [2, 3]
    assert store.mailbox_state(bob).items == 2
    store.close()


def test_byte_quota(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24, max_mailbox_items=100, max_mailbox_bytes=1 << 16)
    bob = device_key("bob@beta", 1)
    big = lambda seq, ts: b"z" * 40_000  # noqa: E731
    assert commit_message(store, device_key("s@a", 1), b"1" * 16, 1, [(bob, big)]).stored
    assert commit_message(store, device_key("s@a", 1), b"2" * 16, 1, [(bob, big)]).refused == "mailbox_full"
    batch = WriteBatch()
    batch.delete(bob, [1])
    store.commit(batch)
    assert store.mailbox_state(bob).bytes == 0
    assert commit_message(store, device_key("s@a", 1), b"3" * 16, 1, [(bob, big)]).stored
    store.close()


def test_expire_cuts_the_expired_head_of_each_mailbox(store):
    bob, carol = device_key("bob@beta", 1), device_key("carol@beta", 1)
    sender = device_key("s@alpha", 1)
    for i, ts in enumerate((1000, 2000, 3000)):
        commit_message(store, sender, bytes([i]) * 16, ts, [(bob, build(b"b")), (carol, build(b"c"))])
    batch = WriteBatch()
    batch.delete(bob, [1])  # received before the sweep
    store.commit(batch)
    assert store.expire(before_ms=2500, limit=10) == 3  # bob's seq 2, carol's seqs 1 and 2
    assert [seq for seq, _ in store.pending(bob)] == [3]
    assert [seq for seq, _ in store.pending(carol)] == [3]
    assert (store.pending_count(bob), store.pending_count(carol)) == (1, 1)
    assert store.mailbox_state(carol).bytes == len(build(b"c")(3, 3000))
    assert store.expire(before_ms=2500) == 0
    assert store.expire(before_ms=10_000, limit=1) == 1  # bounded per call...
    assert store.expire(before_ms=10_000) == 1  # ...and the next call resumes
    assert store.pending_count(bob) + store.pending_count(carol) == 0
    assert store.expire(before_ms=10_000) == 0


def test_expire_resumes_where_it_stopped_and_comes_round_again(store):
    sender = device_key("s@alpha", 1)
    boxes = [device_key(f"u{i}@beta", 1) for i in range(5)]
    for i, dkey in enumerate(boxes):
        commit_message(store, sender, bytes([i]) * 16, 1000, [(dkey, build(b"x"))])
    # Two mailboxes per call: three calls make a round, and every expired item goes.
    removed = [store.expire(before_ms=2000, max_devices=2) for _ in range(3)]
    assert removed == [2, 2, 1]
    assert sum(store.pending_count(dkey) for dkey in boxes) == 0
    # New expired items before the sweep position are found on the next round.
    commit_message(store, sender, b"n" * 16, 1500, [(boxes[0], build(b"y"))])
    assert store.expire(before_ms=2000, max_devices=2) + store.expire(before_ms=2000, max_devices=5) == 1
    assert store.pending_count(boxes[0]) == 0


def test_expire_keeps_items_stored_after_an_unexpired_one(store):
    # The sweep cuts each mailbox's head up to the first item that is not expired.
    bob = device_key("bob@beta", 1)
    sender = device_key("s@alpha", 1)
    for i, ts in enumerate((1000, 5000, 1500)):  # the clock went back for the third
        commit_message(store, sender, bytes([i]) * 16, ts, [(bob, build(b"b"))])
    assert store.expire(before_ms=2000) == 1
    assert [seq for seq, _ in store.pending(bob)] == [2, 3]


def test_dedup_sweep_reads_a_bounded_chunk_and_resumes(store):
    bob = device_key("bob@beta", 1)
    for i in range(5):
        commit_message(store, device_key(f"s{i}@alpha", 1), bytes([i]) * 16, 1000 + i, [(bob, build(b"x"))])
    assert store.forget_duplicates(before_ms=1003, limit=2) == 2  # s0, s1
    assert store.dedup_unswept == 3
    assert store.forget_duplicates(before_ms=1003, limit=2) == 1  # s2 (s3 is too young)
    assert store.forget_duplicates(before_ms=1003, limit=2) == 0  # s4, then round to s3
    assert store.dedup_unswept == 0
    for i in range(5):
        resent = commit_message(store, device_key(f"s{i}@alpha", 1), bytes([i]) * 16, 2000, [(bob, build(b"x"))])
        assert resent.dup == (i >= 3)


def test_dedup_window_ends_for_old_messages_only(store):
    bob = device_key("bob@beta", 1)
    sender = device_key("alice@alpha", 1)
    commit_message(store, sender, b"old-old-old-old-", 1000, [(bob, build(b"a"))])
    commit_message(store, sender, b"new-new-new-new-", 5000, [(bob, build(b"b"))])
    assert store.dedup_unswept == 2  # two entries the sweep has not read yet
    assert store.forget_duplicates(before_ms=3000) == 1
    assert store.dedup_unswept == 0
    assert not commit_message(store, sender, b"old-old-old-old-", 6000, [(bob, build(b"a"))]).dup
    assert commit_message(store, sender, b"new-new-new-new-", 6000, [(bob, build(b"b"))]).dup


# -- a group message's body stored once

SENDER = device_key("alice@alpha", 1)
MEMBERS = [device_key(f"m{i}@beta", 1) for i in range(5)]
G = b"G" * 16


def decode_stanza(encoded: bytes) -> dict:
    (stanza,) = decode_stanzas(encoded)
    return stanza


def group_message(store: LmdbStore, body: bytes, devices=MEMBERS, ts: int = 1_000, builder=GroupDlv, shared=True):
    msg_id = os.urandom(16)
    build = builder(msg_id, "alice@alpha", 1, body, G)
    batch = WriteBatch()
    message = batch.add_message(SENDER, msg_id, ts, [(d, build) for d in devices])
    message.shared = shared
    message.skip_full = True
    store.commit(batch)
    return message


def recv(store: LmdbStore, *deletions: tuple[bytes, list[int]]) -> None:
    batch = WriteBatch()
    for dkey, seqs in deletions:
        batch.delete(dkey, seqs)
    store.commit(batch)


def test_head_matches_the_fanout_twins():
    assert DLV_HEAD == _fanout_pure.DLV_HEAD  # what the store checks a shared copy against


@pytest.mark.parametrize("builder", [GroupDlv, _fanout_pure.GroupDlv], ids=["selected", "pure"])
def test_copies_read_back_whole_and_the_body_is_stored_once(store, builder):
    body = os.urandom(300)
    first = group_message(store, body, builder=builder)
    second = group_message(store, b"second body", builder=builder)
    references, counts, bodies = shared_body_references(store)
    assert len(bodies) == 2 and sorted(counts.values()) == [5, 5] and references == counts
    for message in (first, second):
        for dkey, seq, value in message.stored:
            (got_seq, got), = [item for item in store.pending(dkey) if item[0] == seq]
            assert got == value  # what was pushed at commit is what a later read sends
            stanza = decode_stanza(got)
            assert stanza["seq"] == seq and stanza["g"] == G and stanza["ts"] == 1_000
            assert got == encode_stanza(stanza)
    assert decode_stanza(first.stored[0][2])["c"] == body
    # Quotas count each copy at the size a device is sent, not the 21-byte reference.
    for dkey in MEMBERS:
        state = store.mailbox_state(dkey)
        assert state.items == 2 and state.bytes == sum(len(v) for _, v in store.pending(dkey))
    with store.env.begin() as txn:
        item = txn.get(first.stored[0][0] + (1).to_bytes(8, "big"), db=store.mailboxes.mbox_db)
    assert len(item) == 8 + 13 and body not in item


def test_the_body_goes_with_its_last_reference(store):
    group_message(store, b"x" * 100)
    recv(store, (MEMBERS[0], [1]), (MEMBERS[1], [1]))
    references, counts, _ = shared_body_references(store)
    assert list(counts.values()) == [3] and references == counts
    recv(store, (MEMBERS[0], [1]))  # received twice: counted once
    assert list(shared_body_references(store)[1].values()) == [3]
    recv(store, *[(d, [1]) for d in MEMBERS[2:]])
    references, counts, bodies = shared_body_references(store)
    assert references == counts == {} and bodies == set()
    assert store.usage()["shared_bodies"] == 0
    assert all(store.mailbox_state(d).bytes == 0 for d in MEMBERS)


def test_the_ttl_sweep_releases_bodies(store):
    group_message(store, b"old", ts=1_000)
    group_message(store, b"new", ts=5_000)
    assert store.expire(2_000) == len(MEMBERS)
    references, counts, bodies = shared_body_references(store)
    assert references == counts and list(counts.values()) == [5] and len(bodies) == 1
    assert all(decode_stanza(v)["c"] == b"new" for d in MEMBERS for _, v in store.pending(d))
    assert store.expire(10_000) == len(MEMBERS)
    assert shared_body_references(store) == ({}, {}, set())


def test_full_mailboxes_are_skipped_and_not_counted(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24, max_mailbox_items=1)
    try:
        group_message(store, b"one", devices=MEMBERS[:1])  # MEMBERS[0] is now full
        message = group_message(store, b"two")
        assert message.dropped_full == 1 and message.kept == [1, 2, 3, 4]
        references, counts, _ = shared_body_references(store)
        assert sorted(counts.values()) == [4] and references == counts  # the single copy was stored whole
    finally:
        store.close()


def test_a_single_copy_or_a_foreign_builder_is_stored_whole(store):
    group_message(store, b"alone", devices=MEMBERS[:1])
    whole = group_message(store, b"", builder=lambda *args: (lambda seq, ts: b"\x81\xa1t\xa3dlv"))
    assert shared_body_references(store) == ({}, {}, set())
    assert store.pending(MEMBERS[1]) == [(1, b"\x81\xa1t\xa3dlv")]
    assert whole.stored and whole.refused is None


def test_body_ids_stay_unique_across_reopening(tmp_path):
    path = tmp_path / "lmdb"
    store = lmdb_store(path, map_size_bytes=1 << 24)
    group_message(store, b"before")
    store.close()
    store = lmdb_store(path, map_size_bytes=1 << 24)
    try:
        group_message(store, b"after")
        references, counts, bodies = shared_body_references(store)
        assert len(bodies) == 2 and references == counts
        assert [decode_stanza(v)["c"] for _, v in store.pending(MEMBERS[0])] == [b"before", b"after"]
    finally:
        store.close()


# -- the frame stored items need (a gateway restarted with a smaller max_frame_bytes)


def test_oversized_items_are_measured_as_they_are_pushed_whole_or_shared(store):
    group_message(store, b"g" * 3_000)  # five copies of one shared body
    commit_message(store, SENDER, b"m1", 1_000, [(MEMBERS[0], lambda seq, ts: b"w" * 5_000)])
    commit_message(store, SENDER, b"m2", 1_000, [(MEMBERS[1], lambda seq, ts: b"s" * 100)])
    pushed = [len(value) for dkey in MEMBERS for _, value in store.pending(dkey)]
    shared = len(store.pending(MEMBERS[2])[0][1])
    assert sorted(pushed) == sorted([shared] * 5 + [5_000, 100]) and 3_000 < shared < 3_100
    assert store.mailboxes.oversized_items(10_000) == (0, 0, 0)
    assert store.mailboxes.oversized_items(4_999) == (1, 1, 5_000)
    assert store.mailboxes.oversized_items(shared - 1) == (6, 5, 5_000)  # MEMBERS[0] has two
    assert store.mailboxes.oversized_items(shared) == (1, 1, 5_000)


def test_a_smaller_max_frame_is_refused_while_items_need_more_and_recorded_once_they_are_gone(store):
    mailboxes = store.mailboxes
    assert mailboxes.item_frame_bound() == 65_535  # a store of an earlier version: the wire's largest
    message = commit_message(store, SENDER, b"big", 1_000, [(MEMBERS[0], lambda seq, ts: b"w" * 20_000)])
    with pytest.raises(ConfigError) as refused:
        check_item_frames(mailboxes, 10_000)
    assert "1 stored item(s) of 1 device(s)" in str(refused.value) and "20016" in str(refused.value)
    assert mailboxes.item_frame_bound() == 65_535  # nothing recorded: the next start checks again
    check_item_frames(mailboxes, 20_016)  # exactly the frame it needs
    assert mailboxes.item_frame_bound() == 20_016
    recv(store, (MEMBERS[0], [seq for _, seq, _ in message.stored]))
    check_item_frames(mailboxes, 10_000)
    assert mailboxes.item_frame_bound() == 10_000
    check_item_frames(mailboxes, 30_000)  # a larger one is taken without reading the items
    assert mailboxes.item_frame_bound() == 30_000


# -- against a model (hypothesis)

DEVICES = [device_key("bob@beta", 1), device_key("bob@beta", 2), device_key("carol@beta", 1)]
SENDERS = [device_key("alice@alpha", 1), device_key("alice@alpha", 2)]
MAX_ITEMS = 6


class MailboxMachine(RuleBasedStateMachine):
    """Model: per device, an ordered dict seq -> (ts, payload); the last seq given; the dedup set."""

    @initialize()
    def open_store(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="interlink-stateful-"))
        self.store = self._open()
        self.mailboxes: dict[bytes, dict[int, tuple[int, bytes]]] = {d: {} for d in DEVICES}
        self.last_seq = {d: 0 for d in DEVICES}
        self.seen: dict[tuple[bytes, bytes], int] = {}  # (sender, id) -> ts of the first copy
        self.clock = 1_000
        self.next_id = 0

    def _open(self) -> LmdbStore:
        return lmdb_store(self.folder / "lmdb", map_size_bytes=1 << 24, max_mailbox_items=MAX_ITEMS)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    @rule(
        sender=st.sampled_from(SENDERS),
        recipients=st.lists(st.sampled_from(DEVICES), min_size=1, max_size=3, unique=True),
        resend=st.booleans(),
        advance=st.integers(0, 50),
        shared=st.booleans(),
    )
    def put(self, sender, recipients, resend, advance, shared) -> None:
        self.clock += advance
        if resend and self.seen:
            sender, msg_id = sorted(self.seen)[self.next_id % len(self.seen)]
        else:
            self.next_id += 1
            msg_id = self.next_id.to_bytes(16, "big")
        batch = WriteBatch()
        payload = b"m%d" % int.from_bytes(msg_id, "big")
        if shared:  # a group message: every copy from one GroupDlv, the body stored once
            build = GroupDlv(msg_id, "alice@alpha", 1, payload, b"G" * 16)
            message = batch.add_message(sender, msg_id, self.clock, [(d, build) for d in recipients])
            message.shared = True
        else:
            message = batch.add_message(sender, msg_id, self.clock, [(d, lambda seq, ts, p=payload: p) for d in recipients])
        self.store.commit(batch)
        if (sender, msg_id) in self.seen:
            assert message.dup and message.ts_ms == self.seen[(sender, msg_id)] and not message.stored
            return
        if any(len(self.mailboxes[d]) + 1 > MAX_ITEMS for d in recipients):
            assert message.refused == "mailbox_full" and not message.stored
            return
        assert not message.dup and message.refused is None
        self.seen[(sender, msg_id)] = self.clock
        assert [d for d, _, _ in message.stored] == recipients
        for dkey, seq, value in message.stored:
            assert seq == self.last_seq[dkey] + 1  # strictly increasing, never reused
            self.last_seq[dkey] = seq
            self.mailboxes[dkey][seq] = (self.clock, value)

    @precondition(lambda self: any(self.mailboxes.values()))
    @rule(data=st.data())
    def recv(self, data) -> None:
        dkey = data.draw(st.sampled_from([d for d in DEVICES if self.mailboxes[d]]))
        stored = sorted(self.mailboxes[dkey])
        chosen = data.draw(st.lists(st.sampled_from(stored + [max(stored) + 5]), max_size=4, unique=True))
        batch = WriteBatch()
        batch.delete(dkey, chosen)
        self.store.commit(batch)
        for seq in chosen:
            self.mailboxes[dkey].pop(seq, None)

    @rule(dkey=st.sampled_from(DEVICES), after=st.integers(0, 20), limit=st.integers(1, 10))
    def reconnect_and_read(self, dkey, after, limit) -> None:
        expected = [(seq, value) for seq, (_, value) in sorted(self.mailboxes[dkey].items()) if seq > after][:limit]
        assert self.store.pending(dkey, after, limit) == expected

    @rule(age=st.integers(0, 200), limit=st.integers(1, 5), max_devices=st.integers(1, 4))
    def expire(self, age, limit, max_devices) -> None:
        cutoff = self.clock - age
        removed = self.store.expire(cutoff, limit=limit, max_devices=max_devices)
        assert 0 <= removed <= limit
        gone = 0
        for dkey, box in self.mailboxes.items():
            left = {seq for seq, _ in self.store.pending(dkey)}
            cut = [seq for seq in sorted(box) if seq not in left]
            # Only expired items go, and only from the head of a mailbox.
            assert cut == sorted(box)[: len(cut)]
            assert all(box[seq][0] < cutoff for seq in cut)
            for seq in cut:
                del box[seq]
            gone += len(cut)
        assert gone == removed

    @rule(age=st.integers(0, 200))
    def expire_a_whole_round(self, age) -> None:
        # Two calls cover every mailbox (the first may start mid-round); the model's clock never
        # goes back, so nothing expired is left after them.
        cutoff = self.clock - age
        doomed = sum(1 for box in self.mailboxes.values() for ts, _ in box.values() if ts < cutoff)
        assert self.store.expire(cutoff) + self.store.expire(cutoff) == doomed
        for box in self.mailboxes.values():
            for seq in [seq for seq, (ts, _) in box.items() if ts < cutoff]:
                del box[seq]

    @rule()
    def crash_and_restart(self) -> None:
        # Committed state must survive the environment going away without any flush of ours.
        self.store.close()
        self.store = self._open()

    @invariant()
    def counters_match(self) -> None:
        for dkey in DEVICES:
            state = self.store.mailbox_state(dkey)
            box = self.mailboxes[dkey]
            assert state.items == len(box)
            assert state.bytes == sum(len(v) for _, v in box.values())
            assert state.last_seq == self.last_seq[dkey]
            assert [seq for seq, _ in self.store.pending(dkey)] == sorted(box)

    @invariant()
    def shared_bodies_are_counted(self) -> None:
        references, counts, bodies = shared_body_references(self.store)
        assert counts == references  # every body counts exactly the items referring to it
        assert bodies == set(references)  # no body without a reference, none missing


MailboxMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_mailbox_store_matches_its_model = MailboxMachine.TestCase
