"""Push registrations and intents (``core/edge/lmdbstore/push.py``) on a real LMDB environment:
an intent is written in the group commit that stores the items it announces, one per device at
a time (coalescing), with a counter that only grows; answered intents go, cancelled ones too;
and everything survives reopening the store (what a restart sends again)."""

from __future__ import annotations

from interlink.core.domain.batch import WriteBatch, device_key
from interlink.testing import lmdb_store

ALICE = device_key("alice@alpha", 1)
BOB = device_key("bob@beta", 2)


def build(tag: bytes):
    return lambda seq, ts: b"dlv-" + tag


def commit(store, *, items=(), wake=(), cancel=(), done=(), deletions=(), ts=1_000, existing=None):
    batch = WriteBatch()
    for i, dkey in enumerate(items):
        batch.add_message(device_key("s@alpha", 1), bytes([i, ts % 256]) * 8, ts, [(dkey, build(b"%d" % i))])
    batch.push_wake.update(wake)
    batch.push_cancel.update(cancel)
    batch.push_done.extend(done)
    for dkey, seqs in deletions:
        batch.delete(dkey, seqs)
    store.commit(batch)
    if existing is not None:
        existing.extend(batch.push_existing)
    return batch.push_created


def test_an_intent_is_written_with_the_items_and_only_once_per_device(tmp_path):
    store = lmdb_store(tmp_path / "lmdb")
    store.set_push_token(ALICE, b"token-a")
    assert commit(store, items=[ALICE], wake=[ALICE]) == [(ALICE, 1)]
    assert commit(store, items=[ALICE], wake=[ALICE], ts=2_000) == []  # one is owed already: covered
    assert store.push_intents() == [(ALICE, 1)]
    # answered: it goes; items still wait, but nothing new was asked: nothing owed
    assert commit(store, done=[(ALICE, 1, False)]) == []
    assert store.push_intents() == []
    # answered while more came ("again"): a new one, with the next counter
    assert commit(store, items=[ALICE], wake=[ALICE], ts=3_000) == [(ALICE, 2)]
    created = commit(store, done=[(ALICE, 2, True)])
    assert created == [(ALICE, 3)] and store.push_intents() == [(ALICE, 3)]
    store.close()


def test_unregistered_or_empty_devices_owe_nothing(tmp_path):
    store = lmdb_store(tmp_path / "lmdb")
    assert commit(store, items=[BOB], wake=[BOB]) == []  # not registered
    store.set_push_token(ALICE, b"t")
    assert commit(store, wake=[ALICE]) == []  # nothing in its mailbox
    store.close()


def test_a_stale_answer_leaves_the_newer_intent_and_a_cancel_removes_it(tmp_path):
    store = lmdb_store(tmp_path / "lmdb")
    store.set_push_token(ALICE, b"t")
    commit(store, items=[ALICE], wake=[ALICE])
    commit(store, done=[(ALICE, 1, False)])
    commit(store, items=[ALICE], wake=[ALICE], ts=2_000)
    commit(store, done=[(ALICE, 1, False)])  # the first one's answer, again: not this intent's
    assert store.push_intents() == [(ALICE, 2)]
    assert commit(store, cancel=[ALICE]) == []  # connected: nothing is owed
    assert store.push_intents() == []
    # connected and gone again within one batch (the cancel first, then the wake): owed anew
    commit(store, items=[ALICE], wake=[ALICE], ts=3_000)
    assert commit(store, cancel=[ALICE], wake=[ALICE]) == [(ALICE, 4)]
    store.close()


def test_push_del_forgets_the_token_and_what_was_owed_but_not_the_counter(tmp_path):
    store = lmdb_store(tmp_path / "lmdb")
    store.set_push_token(ALICE, b"t")
    commit(store, items=[ALICE], wake=[ALICE])
    assert store.del_push_token(ALICE) is True
    assert store.push_intents() == [] and store.push_token(ALICE) is None and store.push_devices() == []
    assert store.del_push_token(ALICE) is False
    assert commit(store, items=[ALICE], wake=[ALICE], ts=2_000) == []  # unregistered: nothing owed
    # registered again: the counter goes on (a provider drops counters it has seen)
    store.set_push_token(ALICE, b"t2")
    assert commit(store, items=[ALICE], wake=[ALICE], ts=3_000) == [(ALICE, 2)]
    store.close()


def test_a_woken_device_that_owes_a_push_already_is_told_back(tmp_path):
    store = lmdb_store(tmp_path / "lmdb")
    store.set_push_token(ALICE, b"t")
    commit(store, items=[ALICE], wake=[ALICE])
    existing = []
    assert commit(store, items=[ALICE], wake=[ALICE], ts=2_000, existing=existing) == []
    assert existing == [(ALICE, 1)]
    store.close()


def test_registrations_intents_and_counters_survive_reopening(tmp_path):
    store = lmdb_store(tmp_path / "lmdb")
    store.set_push_token(ALICE, b"token-a")
    store.set_push_token(BOB, b"token-b")
    commit(store, items=[ALICE, BOB], wake=[ALICE, BOB])
    store.close()
    store = lmdb_store(tmp_path / "lmdb")
    assert sorted(store.push_devices()) == sorted([ALICE, BOB])
    assert sorted(store.push_intents()) == sorted([(ALICE, 1), (BOB, 1)])
    store.set_push_token(ALICE, b"token-a2")  # a new token keeps the counter going
    commit(store, done=[(ALICE, 1, False)])
    assert commit(store, items=[ALICE], wake=[ALICE], ts=5_000) == [(ALICE, 2)]
    assert store.push_token(ALICE) == b"token-a2"
    store.close()


def test_an_answer_with_more_to_come_owes_nothing_to_a_device_that_connected(tmp_path):
    """An answer (with ``again``) and the device's connect in one commit: nothing is owed."""
    store = lmdb_store(tmp_path / "lmdb")
    store.set_push_token(ALICE, b"token-a")
    assert commit(store, items=[ALICE], wake=[ALICE]) == [(ALICE, 1)]
    assert commit(store, items=[ALICE], done=[(ALICE, 1, True)], cancel=[ALICE], ts=2_000) == []
    assert store.push_intents() == []
    store.close()
