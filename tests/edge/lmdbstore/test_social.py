"""Consent, blocks, reports and the phone directory (``core/edge/lmdbstore/social.py``, the ``iq``
operations' state) on a real LMDB environment in a temporary folder."""

import pytest

from interlink.core.errors import StoreFullError, StoreLimitError
from interlink.testing import lmdb_store


@pytest.fixture
def store(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    yield store
    store.close()


def test_consent_is_none_until_set_and_then_replaced_whole(store):
    assert store.consent("gus@gamma") is None
    store.set_consent("gus@gamma", ("alpha", "beta"), True)
    assert store.consent("gus@gamma") == (("alpha", "beta"), True)
    store.set_consent("gus@gamma", (), False)
    assert store.consent("gus@gamma") == ((), False)
    assert store.consent("gus@gamma2") is None and store.consent("gus@gamm") is None


def test_blocks_are_idempotent_counted_and_separate_per_user(store):
    assert store.add_block("bob@beta", "alice@alpha", 10) is True
    assert store.add_block("bob@beta", "alice@alpha", 10) is False
    assert store.add_block("bob@beta", "al@alpha", 10) is True
    assert store.add_block("bob@beta2", "eve@alpha", 10) is True  # a user whose name extends bob@beta
    assert store.blocked("bob@beta") == ["al@alpha", "alice@alpha"]
    assert store.block_count("bob@beta") == 2
    assert store.is_blocked("bob@beta", "alice@alpha") and not store.is_blocked("bob@beta", "eve@alpha")
    assert not store.is_blocked("alice@alpha", "bob@beta")  # blocking is one-way
    assert store.del_block("bob@beta", "alice@alpha") is True
    assert store.del_block("bob@beta", "alice@alpha") is False
    assert store.del_block("bob@beta", "never@alpha") is False
    assert (store.blocked("bob@beta"), store.block_count("bob@beta")) == (["al@alpha"], 1)
    store.del_block("bob@beta", "al@alpha")
    assert (store.blocked("bob@beta"), store.block_count("bob@beta")) == ([], 0)
    assert store.blocked("bob@beta2") == ["eve@alpha"]


def test_the_block_limit_refuses_new_blocks_only(store):
    for user in ("a@alpha", "b@alpha", "c@alpha"):
        store.add_block("bob@beta", user, 3)
    with pytest.raises(StoreLimitError) as caught:
        store.add_block("bob@beta", "d@alpha", 3)
    assert caught.value.code == "too_large"
    assert store.add_block("bob@beta", "b@alpha", 3) is False  # known: fine at the limit
    assert store.block_count("bob@beta") == 3 and not store.is_blocked("bob@beta", "d@alpha")


def test_blocked_lists_in_pages_after_an_address(store):
    users = [f"u{i:03d}@alpha" for i in range(25)]
    for user in reversed(users):
        store.add_block("bob@beta", user, 100)
    assert store.blocked("bob@beta") == users
    assert store.blocked("bob@beta", limit=10) == users[:10]
    assert store.blocked("bob@beta", after=users[9], limit=10) == users[10:20]
    assert store.blocked("bob@beta", after=users[19]) == users[20:]
    assert store.blocked("bob@beta", after=users[-1]) == []
    assert store.blocked("bob@beta", after="u005") == users[5:]  # any string is a position


def test_reach_reads_consent_and_blocks_together(store):
    assert store.reach("bob@beta", 2) == (None, frozenset())
    store.add_block("bob@beta", "a@alpha", 10)
    store.add_block("bob@beta", "b@alpha", 10)
    assert store.reach("bob@beta", 2) == (None, frozenset({"a@alpha", "b@alpha"}))
    store.set_consent("bob@beta", ("*",), True)
    store.add_block("bob@beta", "c@alpha", 10)
    assert store.reach("bob@beta", 2) == ((("*",), True), None)  # too many blocks to hand out


def test_blockers_are_the_blocks_read_the_other_way(tmp_path):
    path = tmp_path / "lmdb"
    store = lmdb_store(path, map_size_bytes=1 << 24)
    for user in ("bob@beta", "carl@beta", "dora@alpha"):
        store.add_block(user, "eve@alpha", 10)
    store.add_block("bob@beta", "fred@alpha", 10)
    assert store.blockers("eve@alpha", 10) == {"bob@beta", "carl@beta", "dora@alpha"}
    assert store.blockers("fred@alpha", 10) == {"bob@beta"} and store.blockers("bob@beta", 10) == frozenset()
    assert store.blockers("eve@alpha", 2) is None  # more than the caller keeps: ask per user
    store.del_block("carl@beta", "eve@alpha")
    assert store.blockers("eve@alpha", 10) == {"bob@beta", "dora@alpha"}
    # An environment written before the reverse index existed gets it built when opened.
    with store.env.begin(write=True) as txn:
        txn.drop(store.social.blocked_by_db, delete=False)
    store.close()
    store = lmdb_store(path, map_size_bytes=1 << 24)
    try:
        assert store.blockers("eve@alpha", 10) == {"bob@beta", "dora@alpha"}
        assert store.blockers("fred@alpha", 10) == {"bob@beta"}
    finally:
        store.close()


def test_reports_are_numbered_from_one_and_keep_counting_after_reopening(tmp_path):
    first = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    record = {"reporter": "bob@beta", "device": 2, "user": "eve@alpha", "ids": [b"i" * 16], "reason": "spam",
              "evidence": b"\x00\xff", "ts": 1234}
    assert first.add_report(record) == 1
    assert first.add_report(dict(record, reason="again", evidence=None)) == 2
    assert first.report(1) == record
    assert first.report(3) is None
    first.close()
    second = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    assert second.report(2)["reason"] == "again"
    assert second.add_report(record) == 3
    second.close()


def test_directory_follows_each_users_latest_phone(store):
    phone, other = "+4915112345678", "+15551234567"
    assert store.set_phone("dana@beta", phone) is True
    assert store.set_phone("dana@beta", phone) is False  # unchanged: no write
    store.set_phone("eve@beta", phone)
    store.set_phone("gus@gamma", phone)
    store.set_phone("ann@alpha", phone + "0")  # a longer number is another number
    assert store.directory(phone) == ["dana@beta", "eve@beta", "gus@gamma"]
    assert store.directory(phone, limit=2) == ["dana@beta", "eve@beta"]
    assert store.phone("eve@beta") == phone
    assert store.set_phone("eve@beta", other) is True  # moved: listed under the new number only
    assert store.directory(phone) == ["dana@beta", "gus@gamma"]
    assert store.directory(other) == ["eve@beta"]
    assert store.set_phone("dana@beta", None) is True  # no verified phone any more
    assert store.set_phone("dana@beta", None) is False
    assert (store.directory(phone), store.phone("dana@beta")) == (["gus@gamma"], None)
    assert store.directory("+1") == []


def test_social_state_survives_reopening(tmp_path):
    first = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    first.set_consent("gus@gamma", ("alpha",), True)
    first.add_block("gus@gamma", "eve@alpha", 10)
    first.set_phone("gus@gamma", "+4915112345678")
    first.close()
    second = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    assert second.consent("gus@gamma") == (("alpha",), True)
    assert second.blocked("gus@gamma") == ["eve@alpha"] and second.block_count("gus@gamma") == 1
    assert second.directory("+4915112345678") == ["gus@gamma"]
    second.close()


def test_a_full_map_refuses_social_writes_and_keeps_what_was_there(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 20)
    store.set_consent("gus@gamma", ("alpha",), True)
    store.add_block("gus@gamma", "eve@alpha", 10)
    numbers = []
    with pytest.raises(StoreFullError) as caught:
        for _ in range(400):  # about 1.6 MB of evidence: more than the 1 MiB map
            numbers.append(store.add_report({"evidence": b"e" * 4000}))
    assert caught.value.code == "overloaded" and numbers
    with pytest.raises(StoreFullError):
        store.set_consent("gus@gamma", tuple(f"p{i}" for i in range(20_000)), False)
    with pytest.raises(StoreFullError):
        for i in range(2000):
            store.add_block("gus@gamma", f"{'x' * 60}{i}@alpha", 100_000)
    assert store.consent("gus@gamma") == (("alpha",), True)
    assert store.report(numbers[-1]) is not None and store.report(numbers[-1] + 1) is None
    assert store.block_count("gus@gamma") == len(store.blocked("gus@gamma"))
    assert store.is_blocked("gus@gamma", "eve@alpha")
    store.close()
