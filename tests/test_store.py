"""The device registry on a real LMDB environment in a temporary folder."""

import pytest

from interlink.core.errors import StoreLimitError


@pytest.fixture
def store(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    yield store
    store.close()


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


def test_unusable_data_dir_is_a_config_error(tmp_path):
    from interlink.core.errors import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="data_dir"):
        lmdb_store(blocker / "lmdb")


def test_the_facade_offers_every_method_of_the_port_with_its_signature(store):
    """``LmdbStore`` binds its families' methods by hand: each must be there, and be the one the
    port describes (same parameters), not a namesake of another family."""
    import inspect

    from interlink.core.domain.ports import Store

    for name, described in inspect.getmembers(Store, inspect.isfunction):
        if name.startswith("_"):
            continue
        offered = getattr(store, name)
        wanted = list(inspect.signature(described).parameters)[1:]  # without self
        assert list(inspect.signature(offered).parameters) == wanted, name
    assert isinstance(store.dedup_unswept, int)


# -- mailboxes: the storage contract the router relies on (real LMDB in a temp folder)

from interlink.core.domain.batch import WriteBatch, device_key  # noqa: E402
from interlink.core.errors import StoreFullError  # noqa: E402


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


# -- consent, blocks, reports and the directory (the iq operations' state)


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


# -- the policy over a real store: consent defaults, blocks, and its write-through cache

from interlink.core.domain.auth import Provider  # noqa: E402
from interlink.core.domain.policy import Policy  # noqa: E402
from interlink.testing import lmdb_store

_JWKS = {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}


def provider(pid: str, *accept: str) -> Provider:
    return Provider(id=pid, issuer=f"https://{pid}.example", audience="aud", jwks=_JWKS, default_accept=accept)


def test_policy_uses_stored_consent_else_the_provider_default(store):
    policy = Policy(store)
    gamma, beta = provider("gamma"), provider("beta", "alpha")
    assert not policy.allows("gus@gamma", gamma, "alpha")
    assert policy.allows("gus@gamma", gamma, "gamma")  # own provider, always
    assert policy.allows("bob@beta", beta, "alpha") and not policy.allows("bob@beta", beta, "gamma")
    assert policy.consent("bob@beta", beta) == (("alpha",), False)
    policy.set_consent("gus@gamma", ("alpha",), True)  # the cached answer is dropped on write
    assert policy.allows("gus@gamma", gamma, "alpha") and not policy.allows("gus@gamma", gamma, "beta")
    assert policy.consent("gus@gamma", gamma) == (("alpha",), True)
    policy.set_consent("bob@beta", ("*",), False)
    assert policy.allows("bob@beta", beta, "gamma")
    policy.set_consent("bob@beta", (), False)
    assert not policy.allows("bob@beta", beta, "alpha") and policy.allows("bob@beta", beta, "beta")
    assert Policy(store).consent("gus@gamma", gamma) == (("alpha",), True)  # it was stored, not only cached


def test_policy_blocks_through_its_cache_and_past_it(store):
    policy = Policy(store, cache_users=2, cached_blocks=2)
    assert not policy.blocks("bob@beta", "eve@alpha")
    assert policy.block("bob@beta", "eve@alpha", 10) is True
    assert policy.blocks("bob@beta", "eve@alpha") and not policy.blocks("bob@beta", "ann@alpha")
    for user in ("x@alpha", "y@alpha"):
        policy.block("bob@beta", user, 10)  # three blocks: more than the policy caches
    assert policy.blocks("bob@beta", "y@alpha") and not policy.blocks("bob@beta", "ann@alpha")
    assert policy.unblock("bob@beta", "eve@alpha") is True and policy.unblock("bob@beta", "eve@alpha") is False
    assert not policy.blocks("bob@beta", "eve@alpha")
    for user in ("u1@beta", "u2@beta", "u3@beta"):  # more users than the cache holds
        policy.blocks(user, "eve@alpha")
    assert len(policy._cache) <= 2
    assert policy.blocks("bob@beta", "x@alpha")  # evicted and read again
    with pytest.raises(StoreLimitError):
        policy.block("bob@beta", "z@alpha", 2)
    assert not policy.blocks("bob@beta", "z@alpha")


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


def test_policy_finds_who_blocked_a_sender_among_members(store):
    policy = Policy(store, cached_blockers=2)
    members = ("ann@alpha", "bob@beta", "carl@beta", "eve@alpha")
    member_set = frozenset(members)
    assert policy.blocked_among(members, member_set, "eve@alpha") == set()
    policy.block("bob@beta", "eve@alpha", 10)
    policy.block("zed@beta", "eve@alpha", 10)  # not a member
    policy.block("eve@alpha", "eve@alpha", 10)  # the sender itself never counts
    assert policy.blocked_among(members, member_set, "eve@alpha") == {"bob@beta"}  # three blockers: per member
    policy.unblock("zed@beta", "eve@alpha")
    policy.unblock("eve@alpha", "eve@alpha")
    assert policy.blockers_of("eve@alpha") == {"bob@beta"}  # cached again, the unblocks dropped the stale set
    policy.block("carl@beta", "eve@alpha", 10)
    assert policy.blocked_among(members, member_set, "eve@alpha") == {"bob@beta", "carl@beta"}
    policy.unblock("bob@beta", "eve@alpha")
    assert policy.blocked_among(members, member_set, "eve@alpha") == {"carl@beta"}


# -- quotas and expiry


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
