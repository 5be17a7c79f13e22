"""A group message's body stored once: mailbox items refer to it, reading makes each copy whole
again byte for byte, and the body goes with its last reference (recv or the TTL sweep)."""

from __future__ import annotations

import os

import pytest
from store_checks import shared_body_references

from interlink.core.domain import _fanout_pure
from interlink.core.domain.batch import WriteBatch, device_key
from interlink.core.domain.fanout import DLV_HEAD, GroupDlv
from interlink.core.edge.lmdbstore import LmdbStore
from interlink.core.protocol.stanza import decode_stanzas, encode_stanza
from interlink.testing import lmdb_store

def decode_stanza(encoded: bytes) -> dict:
    (stanza,) = decode_stanzas(encoded)
    return stanza


SENDER = device_key("alice@alpha", 1)
MEMBERS = [device_key(f"m{i}@beta", 1) for i in range(5)]
G = b"G" * 16


@pytest.fixture
def store(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    yield store
    store.close()


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
