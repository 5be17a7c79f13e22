"""The key directory of the store (``prekeys`` and ``otpks``) on a real LMDB environment in a
temporary folder: publishing, replacing, handing each one-time prekey out exactly once, the
stock limit, and durability."""

from __future__ import annotations

import os
import threading

import pytest

from interlink.core.domain.batch import WriteBatch
from interlink.core.errors import StoreFullError, StoreLimitError
from interlink.testing import lmdb_store

IK = b"I" * 32
SPK = (1, b"S" * 32, b"G" * 64)


def otpks(ids, tag: bytes = b"k") -> list[tuple[int, bytes]]:
    return [(i, tag + i.to_bytes(4, "big") + bytes(27)) for i in ids]


@pytest.fixture
def store(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    yield store
    store.close()


def test_put_take_count_round_trip(store):
    assert store.prekey_count("bob@beta", 1) == 0
    assert store.take_prekeys("bob@beta", [1]) == []  # nothing published: left out
    assert store.put_prekeys("bob@beta", 1, IK, SPK, otpks([7, 3, 5]), 100) == 3
    assert store.prekey_count("bob@beta", 1) == 3
    taken = [store.take_prekeys("bob@beta", [1])[0] for _ in range(4)]
    assert taken[0]["device"] == 1 and taken[0]["ik"] == IK
    assert taken[0]["spk"] == {"id": 1, "key": b"S" * 32, "sig": b"G" * 64}
    # lowest id first, each exactly once, then the signed prekey alone
    assert [b["otpk"] and b["otpk"]["id"] for b in taken] == [3, 5, 7, None]
    assert taken[0]["otpk"]["key"] == dict(otpks([3]))[3]
    assert store.prekey_count("bob@beta", 1) == 0


def test_bundles_cover_only_asked_devices_that_published(store):
    store.put_prekeys("bob@beta", 2, b"2" * 32, SPK, otpks([1]), 100)
    store.put_prekeys("bob@beta", 9, b"9" * 32, SPK, [], 100)
    bundles = store.take_prekeys("bob@beta", [9, 2, 4])  # 4 published nothing
    assert [(b["device"], b["ik"], b["otpk"] is not None) for b in bundles] == [(2, b"2" * 32, True), (9, b"9" * 32, False)]
    assert store.take_prekeys("bob@beta", [9]) == [bundles[1]]
    assert store.prekey_count("bob@beta", 2) == 0


def test_devices_and_users_do_not_share_stocks(store):
    # "al@alpha" + device 1 and "al@alpha2"... never prefix one another; nor do device numbers
    store.put_prekeys("al@alpha", 1, IK, SPK, otpks([1, 2]), 100)
    store.put_prekeys("al@alpha", 256, IK, SPK, otpks([3]), 100)
    store.put_prekeys("al@alpha2", 1, IK, SPK, otpks([4, 5, 6]), 100)
    assert [store.prekey_count(*d) for d in (("al@alpha", 1), ("al@alpha", 256), ("al@alpha2", 1))] == [2, 1, 3]
    assert [b["otpk"]["id"] for b in store.take_prekeys("al@alpha", [1, 256])] == [1, 3]
    assert store.take_prekeys("al@alpha", [256])[0]["otpk"] is None
    assert store.prekey_count("al@alpha2", 1) == 3


def test_takes_in_one_commit_hand_each_key_out_once_and_return_the_bundles(store):
    store.put_prekeys("bob@beta", 1, IK, SPK, otpks([4, 2]), 100)
    store.put_prekeys("bob@beta", 3, b"3" * 32, SPK, otpks([9]), 100)
    batch = WriteBatch()
    reply = {"t": "res", "id": 7}
    first = batch.add_prekey_take("bob@beta", [3, 1, 3], reply)
    second = batch.add_prekey_take("bob@beta", [1], {"t": "res", "id": 8})
    store.commit(batch)
    assert [(b["device"], b["otpk"]["id"]) for b in first.bundles] == [(1, 2), (3, 9)]
    assert [b["otpk"]["id"] for b in second.bundles] == [4]  # the same transaction: the next key
    assert reply == {"t": "res", "id": 7}  # the router answers; storage fills no reply
    assert [store.prekey_count("bob@beta", d) for d in (1, 3)] == [0, 0]


def test_signed_prekey_is_replaced_and_the_stock_kept_under_the_same_identity(store):
    store.put_prekeys("bob@beta", 1, IK, SPK, otpks([1, 2]), 100)
    new_spk = (2, b"T" * 32, b"H" * 64)
    assert store.put_prekeys("bob@beta", 1, IK, new_spk, otpks([3]), 100) == 3
    bundle = store.take_prekeys("bob@beta", [1])[0]
    assert bundle["spk"] == {"id": 2, "key": b"T" * 32, "sig": b"H" * 64}
    assert bundle["otpk"]["id"] == 1


def test_a_new_identity_key_discards_the_old_one_time_prekeys(store):
    store.put_prekeys("bob@beta", 1, IK, SPK, otpks(range(10)), 100)
    assert store.put_prekeys("bob@beta", 1, b"N" * 32, SPK, otpks([50, 51], b"n"), 100) == 2
    bundle = store.take_prekeys("bob@beta", [1])[0]
    assert bundle["ik"] == b"N" * 32 and bundle["otpk"]["id"] == 50
    assert store.put_prekeys("bob@beta", 1, b"M" * 32, SPK, [], 100) == 0  # reset without new ones
    assert store.take_prekeys("bob@beta", [1])[0]["otpk"] is None


def test_an_id_already_stored_is_replaced_and_does_not_grow_the_stock(store):
    store.put_prekeys("bob@beta", 1, IK, SPK, otpks([1, 2]), 100)
    assert store.put_prekeys("bob@beta", 1, IK, SPK, otpks([2, 3], b"x"), 100) == 3
    assert store.put_prekeys("bob@beta", 1, IK, SPK, otpks([2, 3], b"x"), 100) == 3  # a resend: no change
    keys = {b["otpk"]["id"]: b["otpk"]["key"] for b in (store.take_prekeys("bob@beta", [1])[0] for _ in range(3))}
    assert keys == {1: dict(otpks([1]))[1], 2: dict(otpks([2], b"x"))[2], 3: dict(otpks([3], b"x"))[3]}


def test_the_stock_limit_refuses_the_whole_put(store):
    assert store.put_prekeys("bob@beta", 1, IK, SPK, otpks(range(8)), 10) == 8
    with pytest.raises(StoreLimitError) as caught:
        store.put_prekeys("bob@beta", 1, IK, (9, b"9" * 32, b"9" * 64), otpks(range(100, 103)), 10)
    assert caught.value.code == "too_large" and "limit of 10" in caught.value.message
    assert store.prekey_count("bob@beta", 1) == 8
    assert store.take_prekeys("bob@beta", [1])[0]["spk"]["id"] == 1  # nothing of the refused put was written
    # replacing stored ids at the limit is fine; a reset refused for size keeps the old stock
    assert store.put_prekeys("bob@beta", 1, IK, SPK, otpks(range(1, 8)) + otpks([20, 21, 22]), 10) == 10
    with pytest.raises(StoreLimitError):
        store.put_prekeys("bob@beta", 1, b"N" * 32, SPK, otpks(range(200, 211)), 10)
    assert store.prekey_count("bob@beta", 1) == 10
    assert store.take_prekeys("bob@beta", [1])[0]["ik"] == IK


def test_keys_survive_reopening(tmp_path):
    first = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    first.put_prekeys("carol@alpha", 2**31 - 1, IK, (2**32 - 1, b"S" * 32, b"G" * 64), otpks([0, 2**32 - 1]), 100)
    assert first.take_prekeys("carol@alpha", [2**31 - 1])[0]["otpk"]["id"] == 0
    first.close()
    second = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    bundle = second.take_prekeys("carol@alpha", [2**31 - 1])[0]
    assert bundle["spk"]["id"] == 2**32 - 1 and bundle["otpk"]["id"] == 2**32 - 1
    assert second.prekey_count("carol@alpha", 2**31 - 1) == 0
    second.close()


def test_concurrent_takes_from_threads_hand_out_each_key_once(store):
    store.put_prekeys("bob@beta", 1, IK, SPK, otpks(range(300)), 1000)
    got: list = []
    lock = threading.Lock()

    def take():
        mine = [store.take_prekeys("bob@beta", [1])[0]["otpk"] for _ in range(50)]
        with lock:
            got.extend(mine)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    handed = [o["id"] for o in got if o is not None]
    assert sorted(handed) == list(range(300))  # every key once, none twice
    assert got.count(None) == 8 * 50 - 300


def test_a_full_map_is_store_full_and_writes_nothing(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 16)  # 64 KiB
    try:
        with pytest.raises(StoreFullError):
            for device in range(1, 200):
                store.put_prekeys("bob@beta", device, os.urandom(32), SPK, [(i, os.urandom(32)) for i in range(60)], 100)
        assert store.prekey_count("bob@beta", device) == 0
        assert store.take_prekeys("bob@beta", [device]) == []
    finally:
        store.close()
