"""The device registry on a real LMDB environment in a temporary folder."""

import pytest

from interlink.core.errors import AuthError
from interlink.core.store import LmdbStore


@pytest.fixture
def store(tmp_path):
    store = LmdbStore(tmp_path / "lmdb", map_size_bytes=1 << 24)
    yield store
    store.close()


def test_register_is_idempotent_and_sorted(store):
    assert store.register_device("alice@alpha", 7, 5) == [7]
    assert store.register_device("alice@alpha", 2, 5) == [2, 7]
    assert store.register_device("alice@alpha", 7, 5) == [2, 7]
    assert store.devices("alice@alpha") == [2, 7]


def test_users_do_not_share_devices_even_with_prefix_names(store):
    store.register_device("al@alpha", 1, 5)
    store.register_device("al@alpha2", 2, 5)
    store.register_device("al", 3, 5)
    assert store.devices("al@alpha") == [1]
    assert store.devices("al@alpha2") == [2]
    assert store.devices("al") == [3]
    assert store.devices("nobody@alpha") == []


def test_device_limit_refuses_new_devices_but_not_known_ones(store):
    for device in (1, 2, 3):
        store.register_device("bob@beta", device, 3)
    with pytest.raises(AuthError) as caught:
        store.register_device("bob@beta", 4, 3)
    assert caught.value.code == "device_limit"
    assert store.register_device("bob@beta", 2, 3) == [1, 2, 3]
    assert store.devices("bob@beta") == [1, 2, 3]


def test_devices_survive_reopening(tmp_path):
    first = LmdbStore(tmp_path / "lmdb", map_size_bytes=1 << 24)
    first.register_device("carol@alpha", 2**31 - 1, 5)
    first.close()
    second = LmdbStore(tmp_path / "lmdb", map_size_bytes=1 << 24)
    assert second.devices("carol@alpha") == [2**31 - 1]
    second.close()


def test_unusable_data_dir_is_a_config_error(tmp_path):
    from interlink.core.errors import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="data_dir"):
        LmdbStore(blocker / "lmdb")


# -- mailboxes: the storage contract the router relies on (real LMDB in a temp folder)

from interlink.core.store import StoreFullError, WriteBatch, device_key  # noqa: E402


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
    first = LmdbStore(tmp_path / "lmdb", map_size_bytes=1 << 24)
    commit_message(first, device_key("s@alpha", 1), b"K" * 16, 9, [(bob, build(b"kept"))])
    first.close()
    second = LmdbStore(tmp_path / "lmdb", map_size_bytes=1 << 24)
    assert second.pending(bob) == [(1, b"kept:1:9")]
    again = commit_message(second, device_key("s@alpha", 1), b"K" * 16, 10, [(bob, build(b"kept"))])
    assert again.dup  # the dedup window survives a restart too
    second.close()


def test_a_full_map_refuses_the_batch_and_keeps_what_was_there(tmp_path):
    store = LmdbStore(tmp_path / "lmdb", map_size_bytes=1 << 20)
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
    assert all(not m.stored and not m.dup for m in batch.messages)
    store.close()
