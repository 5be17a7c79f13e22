"""Cluster routing without a network (``core/domain/relay.py``): two real ``Domain``s over their
own LMDB stores, the test carrying what one relays to the other (``take_output``) and the answers
back, as the edge does over NATS. Where each copy is stored, when the sender is answered, the order
of own copies while answers come back in any order, deadlines, and what a node refuses to serve."""

from __future__ import annotations

import os

import msgpack
import pytest

from interlink.core.domain.cluster import Membership
from interlink.core.domain.batch import device_key
from interlink.core.domain.relay import RETRY_AFTER_MS
from interlink.testing import FakeSession, cluster_domain, homed_users, lmdb_store

NOW = 1_800_000_000.0
MEMBERSHIP = Membership(["node-a", "node-b"], 1)
USERS = homed_users(MEMBERSHIP, "alpha", per_node=2)
A1, A2 = USERS["node-a"]  # homed on node-a
B1, B2 = USERS["node-b"]  # homed on node-b


class Node:
    def __init__(self, path, node: str, membership: Membership = MEMBERSHIP, **settings) -> None:
        self.name = node
        self.store = lmdb_store(path, sync=False, map_size_bytes=1 << 26)
        self.domain = cluster_domain(self.store, membership, node, **settings)
        self.relay = self.domain.relay
        self.wakes = 0
        self.relay.wake = self._woken

    def _woken(self) -> None:
        self.wakes += 1

    def open(self, user: str, device: int = 1) -> FakeSession:
        self.store.register_device(user, device, 5)
        session = FakeSession(user, device)
        self.domain.router.open_session(session)
        return session

    def commit(self, now: float = NOW) -> None:
        commit = self.domain.take_batch(now)
        if commit is not None:
            self.store.commit(commit.batch)
            self.domain.committed(commit)


@pytest.fixture
def nodes(tmp_path):
    a, b = Node(tmp_path / "a", "node-a"), Node(tmp_path / "b", "node-b")
    yield a, b
    for node in (a, b):  # whatever a test left waiting, the bytes counted add up (none negative, none lost)
        per_device = node.relay._waiting_bytes_per_device
        assert all(size > 0 for size in per_device.values()) and node.relay.waiting_bytes == sum(per_device.values())
    a.store.close()
    b.store.close()


def carry(source: Node, target: Node) -> list:
    """Relay what ``source`` gathered to ``target`` (packed and unpacked as over NATS); returns
    the records carried."""
    outgoing, replies = source.relay.take_output()
    assert not replies
    records = over_nats(outgoing.get(target.name, []))
    target.relay.serve(source.name, records, NOW)
    return records


def over_nats(records):
    """``records`` packed and unpacked as the link does between nodes."""
    return msgpack.unpackb(msgpack.packb(records), raw=False, strict_map_key=False)


def answer(source: Node, target: Node, order=None, now: float = NOW) -> None:
    """Hand ``target``'s answers back to ``source`` (in ``order``: indices into them)."""
    _, replies = target.relay.take_output()
    answers = replies.get(source.name, [])
    for index in order if order is not None else range(len(answers)):
        seq, encoded = answers[index]
        source.relay.answered(target.name, seq, encoded, now)


def msg(to: str, devices=(1,), **fields) -> dict:
    return {"t": "msg", "id": os.urandom(16), "to": to, "c": {d: b"for %d" % d for d in devices}, **fields}


def test_users_are_homed_by_the_membership_and_only_other_nodes_users_are_relayed(nodes):
    a, b = nodes
    assert a.relay.home_of(A1) is None and a.relay.home_of(B1) == "node-b"
    alice, local = a.open(A1), a.open(A2)
    a.domain.dispatch(alice, msg(A2), NOW)
    assert a.relay.take_output() == ({}, {}) and a.wakes == 0  # a local recipient stays local
    assert a.domain.router.pending_load == 1
    a.domain.dispatch(alice, msg(B1), NOW)
    assert a.wakes == 1 and a.domain.router.pending_load == 1  # relayed: nothing stored here
    a.commit()
    assert [s["t"] for s in alice.take()] == ["ack"] and local.take()[0]["t"] == "dlv"


def test_the_sender_is_acked_only_after_the_recipients_node_committed(nodes):
    a, b = nodes
    alice, bob = a.open(A1), b.open(B1)
    stanza = msg(B1)
    a.domain.dispatch(alice, stanza, NOW)
    [record] = carry(a, b)
    assert record[1:4] == ["alpha", A1.split("@")[0], 1] and "own" not in record[5]
    answer(a, b)
    assert alice.take() == [] and bob.take() == []  # nothing before node-b's commit
    b.commit()
    [dlv] = bob.take()
    assert (dlv["from"], dlv["dev"], dlv["c"]) == (A1, 1, b"for 1")
    answer(a, b)
    [ack] = alice.take()
    assert ack == {"t": "ack", "id": stanza["id"], "ts": dlv["ts"]}
    assert b.store.pending_count(device_key(B1, 1)) == 1 and a.store.pending_count(device_key(B1, 1)) == 0


def test_own_copies_wait_for_the_recipients_ack_and_keep_the_devices_order(nodes):
    a, b = nodes
    alice1, alice2 = a.open(A1, 1), a.open(A1, 2)
    a.open(A2)
    b.open(B1), b.open(B2)
    first = msg(B1, own={2: b"own 1"})
    second = msg(A2, own={2: b"own 2"})  # local, but behind the first's own copy
    third = msg(B2, own={2: b"own 3"})
    for stanza in (first, second, third):
        a.domain.dispatch(alice1, stanza, NOW)
    assert not a.domain.router.has_batch  # the local one waits behind the relayed first
    assert len(carry(a, b)) == 1  # the third waits for the first's answer: both go to node-b
    b.commit()
    _, replies = b.relay.take_output()
    [(first_seq, first_ack)] = replies["node-a"]
    a.relay.answered("node-b", first_seq, first_ack, NOW)
    a.commit()  # the first's and the second's own copies
    assert [d["c"] for d in alice2.take()] == [b"own 1", b"own 2"]
    carry(a, b)
    b.commit()
    answer(a, b)
    a.commit()
    assert [d["c"] for d in alice2.take()] == [b"own 3"]
    acks = alice1.take()
    assert [s["t"] for s in acks] == ["ack"] * 3
    assert [s["id"] for s in acks] == [first["id"], second["id"], third["id"]]
    assert acks[0]["ts"] == msgpack.unpackb(first_ack)["ts"]  # the recipient's copy's time
    assert not a.relay._chains


def test_a_refusal_from_the_recipients_node_stores_no_own_copy(nodes):
    a, b = nodes
    alice1, alice2 = a.open(A1, 1), a.open(A1, 2)
    b.open(B1)
    stanza = msg(B1, devices=(1, 9), own={2: b"own"})
    a.domain.dispatch(alice1, stanza, NOW)
    carry(a, b)
    answer(a, b)
    [err] = alice1.take()
    assert (err["t"], err["code"], err["ref"], err["extra"]) == ("err", "device_mismatch", stanza["id"], [9])
    assert not a.domain.router.has_batch and alice2.take() == []


def test_a_silent_node_gets_the_sender_overloaded_and_a_late_answer_is_dropped(nodes):
    a, b = nodes
    alice = a.open(A1)
    b.open(B1)
    stanza = msg(B1)
    a.domain.dispatch(alice, stanza, NOW)
    carry(a, b)
    assert a.relay.expire(NOW + 1.9) == 0 and alice.take() == []  # the deadline is the 2 s timeout
    assert a.relay.expire(NOW + 2.0) == 1
    [err] = alice.take()
    assert (err["code"], err["ref"], err["retry_after"]) == ("overloaded", stanza["id"], RETRY_AFTER_MS)
    b.commit()
    answer(a, b)  # stored there after all: the resend is recognised as a duplicate
    assert alice.take() == [] and a.relay.counters["late_answers"] == 1
    a.domain.dispatch(alice, stanza, NOW)
    carry(a, b)
    b.commit()
    answer(a, b)
    [ack] = alice.take()
    assert ack["dup"] is True


def test_typing_state_is_relayed_and_answered_only_when_refused(nodes):
    a, b = nodes
    alice, bob = a.open(A1), b.open(B1)
    a.domain.dispatch(alice, {"t": "state", "to": B1, "s": "composing"}, NOW)
    carry(a, b)
    assert bob.take() == [{"t": "state", "from": A1, "s": "composing"}]
    answer(a, b)
    assert alice.take() == [] and not a.relay.waiting


def test_a_node_refuses_stanzas_for_users_it_is_not_home_to_and_malformed_records(nodes):
    a, b = nodes
    b.relay.serve("node-a", [[1, "alpha", "x", 1, 65000, msg(A2)], [2, "alpha"], "junk",
                             [3, "alpha", "x", 1, 65000, {"t": "iq", "id": 5, "op": "consent.set"}]], NOW)
    _, replies = b.relay.take_output()
    answers = {seq: msgpack.unpackb(encoded) for seq, encoded in replies["node-a"]}
    assert answers[1]["code"] == "internal" and "disagree" in answers[1]["msg"]
    assert answers[3]["code"] == "internal" and answers[3]["id"] == 5
    assert b.relay.counters["malformed"] == 3 and b.relay.counters["misrouted"] == 1


def group_homed_on(node: str) -> bytes:
    return next(g for g in (os.urandom(16) for _ in range(1000)) if MEMBERSHIP.home(g) == node)


def test_a_group_message_is_stored_by_each_members_node_with_the_homes_time(nodes, monkeypatch):
    """The group lives on node-a (its id's home); bob lives on node-b, which is asked to check
    him, then to store the creation event and each message's copy from node-a's outbox — after
    node-a's commit, with node-a's time. Alice is answered after node-a's commit: the outbox entry
    for node-b is written in it, and deleted once node-b confirmed it."""
    import interlink.core.domain.relay as relay_module

    a, b = nodes
    g = group_homed_on("node-a")
    monkeypatch.setattr(relay_module, "new_group_id", lambda: g)
    alice, bob = a.open(A1), b.open(B1)
    a.domain.dispatch(alice, {"t": "iq", "id": 1, "op": "group.new", "members": [B1]}, NOW)
    [check] = carry(a, b)  # bob is checked where he lives, before anything is written
    assert check[5]["k"] == "check" and check[5]["members"] == [B1] and not a.domain.router.has_batch
    answer(a, b)
    assert a.store.outbox_entries("node-b") == []
    a.commit()  # the group, its event for node-a's members and the outbox entry for node-b's
    assert alice.take() == [{"t": "res", "id": 1, "ver": 1, "g": g}]
    assert a.store.group(g) is not None and b.store.group(g) is None
    [(seq, _)] = a.store.outbox_entries("node-b")
    [event] = carry(a, b)
    assert event[5]["k"] == "event" and event[5]["members"] == [B1]  # node-b's recipients only
    assert (event[5]["o"], event[5]["n"]) == (seq, a.store.incarnation)
    b.commit()
    [created] = bob.take()
    assert (created["k"], created["event"], created["g"], created["from"]) == ("group", "created", g, A1)
    answer(a, b)
    a.commit()  # node-b confirmed: the entry goes
    assert a.store.outbox_entries("node-b") == [] and a.store.outbox_last("node-b") == seq

    stanza = {"t": "msg", "id": os.urandom(16), "g": g, "b": b"hello group"}
    a.domain.dispatch(alice, stanza, NOW + 5)
    a.commit()
    [ack] = alice.take()
    carry(a, b)
    b.commit()
    [dlv] = bob.take()
    assert ack["id"] == stanza["id"] and dlv["ts"] == ack["ts"] and (dlv["c"], dlv["g"]) == (b"hello group", g)
    answer(a, b)
    assert a.relay.counters["outbox_stored"] == 2 and a.relay.outbox.backlog == 0


def test_a_member_refused_by_its_node_stops_the_group_change_before_anything_is_written(nodes, monkeypatch):
    import interlink.core.domain.relay as relay_module

    a, b = nodes
    g = group_homed_on("node-a")
    monkeypatch.setattr(relay_module, "new_group_id", lambda: g)
    alice = a.open(A1)
    a.domain.dispatch(alice, {"t": "iq", "id": 2, "op": "group.new", "members": [B1]}, NOW)  # B1 never registered
    carry(a, b)
    answer(a, b)
    [err] = alice.take()
    assert (err["code"], err["id"], err["user"]) == ("unknown_recipient", 2, B1)
    assert not a.domain.router.has_batch and a.store.group(g) is None


def test_a_group_messages_copies_on_other_nodes_cost_rate_tokens_at_its_home(nodes, monkeypatch):
    """One token per COPIES_PER_LOAD copies (4 here), counted at the group's home with each member of
    another node as one copy: alice's group of twelve node-b members costs 1 + 2 tokens a message,
    so a burst of 6 takes two (each member of another node used to count nothing: all three passed)."""
    import interlink.core.domain.groups as groups_module

    monkeypatch.setattr(groups_module, "COPIES_PER_LOAD", 4)
    a, b = nodes
    members = homed_users(MEMBERSHIP, "alpha", per_node=12)["node-b"]
    for member in members:
        b.store.register_device(member, 1, 5)
    g, alice = group_with(a, b, monkeypatch, *members)
    a.domain.router.set_message_rates(per_device=3.0, per_user=100.0)  # a burst of 6 per device
    later = NOW + 60  # the bucket full again
    sent = [group_msg(g, b"m%d" % i) for i in range(3)]
    for stanza in sent:
        a.domain.dispatch(alice, stanza, later)
    a.commit(later)
    answers = alice.take()
    assert sorted(x["t"] for x in answers) == ["ack", "ack", "err"]
    assert [x["code"] for x in answers if x["t"] == "err"] == ["rate_limited"]
    # A token later, a resend of a stored one (its ack lost) pays its own token and is recognised:
    # not refused for copies it does not make again.
    stored = next(x["id"] for x in answers if x["t"] == "ack")
    a.domain.dispatch(alice, next(m for m in sent if m["id"] == stored), later + 0.4)
    a.commit(later + 0.4)
    assert [(x["t"], x.get("dup")) for x in alice.take()] == [("ack", True)]


def test_a_relayed_senders_group_copies_are_charged_at_the_groups_home(nodes, monkeypatch):
    """Alice lives on node-a, her group on node-b: node-b counts the copies (its twelve members';
    alice, the sender, is not a copy) and charges their extra tokens to its own buckets for her
    device, all at once — her node spent the message's one token and cannot count them. Refused
    there, she gets node-b's ``rate_limited``, its ``retry_after`` the wait for both tokens (it used
    to charge nothing for a relayed sender)."""
    import interlink.core.domain.groups as groups_module
    import interlink.core.domain.relay as relay_module

    monkeypatch.setattr(groups_module, "COPIES_PER_LOAD", 4)
    a, b = nodes
    g = group_homed_on("node-b")
    monkeypatch.setattr(relay_module, "new_group_id", lambda: g)
    members = homed_users(MEMBERSHIP, "alpha", per_node=12)["node-b"]
    for member in members:
        b.store.register_device(member, 1, 5)
    alice = a.open(A1)
    a.domain.dispatch(alice, {"t": "iq", "id": 1, "op": "group.new", "members": members}, NOW)
    carry(a, b)
    b.commit()
    answer(a, b)
    assert alice.take()[0]["t"] == "res"
    b.domain.router.set_message_rates(per_device=2.0, per_user=100.0)  # a burst of 4 per device at node-b
    a.domain.router.set_message_rates(per_device=10.0, per_user=100.0)  # a burst of 20 at her node
    later = NOW + 60
    for i in range(3):  # 12 copies at node-b: 2 extra tokens each, 4 in the burst
        a.domain.dispatch(alice, group_msg(g, b"m%d" % i), later)
        carry(a, b)
        b.commit(later)
        answer(a, b, now=later)
    answers = alice.take()
    assert [x["t"] for x in answers] == ["ack", "ack", "err"] and answers[2]["code"] == "rate_limited"
    assert answers[2]["retry_after"] == 1000  # two tokens at 2 a second
    assert a.domain.router.device_buckets.tokens(alice.session_key, later) == 17  # one token a message at her node


def test_a_group_request_goes_to_the_groups_home(nodes, monkeypatch):
    import interlink.core.domain.relay as relay_module

    a, b = nodes
    g = group_homed_on("node-b")
    monkeypatch.setattr(relay_module, "new_group_id", lambda: g)
    alice = a.open(A1)
    a.domain.dispatch(alice, {"t": "iq", "id": 3, "op": "group.new", "members": [], "x": [[[]]]}, NOW)
    [record] = carry(a, b)
    assert record[5] == {"t": "iq", "id": 3, "op": "group.new", "members": [], "g": g}
    b.commit()  # the group, on its home: answered, and the created event for alice's (other) devices
    outgoing, replies = b.relay.take_output()
    [[seq, encoded]] = replies["node-a"]
    a.relay.answered("node-b", seq, encoded, NOW)
    [res] = alice.take()
    assert res["g"] == g and b.store.group(g) is not None and a.store.group(g) is None
    [event] = outgoing["node-a"]  # stored where she lives
    assert event[5]["k"] == "event" and event[5]["members"] == [A1]
    a.relay.serve("node-b", [event], NOW)
    a.commit()
    answer(b, a)
    assert b.relay.counters["outbox_stored"] == 1


def test_a_relayed_iq_carries_only_its_checked_fields(nodes):
    """The client's map never travels as it is: a field nested a thousand deep (which the stanza
    decoder accepts) would make the whole turn's batch unpackable for every other user."""
    a, _ = nodes
    alice = a.open(A1)
    deep = []
    for _ in range(1000):
        deep = [deep]
    a.domain.dispatch(alice, {"t": "iq", "id": 7, "op": "keys.get", "user": B1, "devices": [1, 2], "x": deep}, NOW)
    outgoing, _ = a.relay.take_output()
    [record] = outgoing["node-b"]
    assert record[5] == {"t": "iq", "id": 7, "op": "keys.get", "user": B1, "devices": [1, 2]}
    msgpack.packb(outgoing)  # the batch packs
    for bad in ({"op": "devices.get", "user": B1, "id": "7"}, {"op": "keys.get", "user": B1, "id": 8, "devices": "all"},
                {"op": ["devices.get"], "user": B1, "id": 9}):
        a.domain.dispatch(alice, {"t": "iq", **bad}, NOW)
    assert [e["code"] for e in alice.take()] == ["bad_stanza"] * 3 and a.relay.take_output() == ({}, {})


def test_relayed_stanzas_are_charged_and_bounded_per_device(tmp_path):
    a, b = Node(tmp_path / "a", "node-a"), Node(tmp_path / "b", "node-b")
    try:
        a.domain.router.set_message_rates(per_device=1.0, per_user=1.0)  # a burst of 2
        alice = a.open(A1)
        for i in range(4):
            a.domain.dispatch(alice, {"t": "iq", "id": i, "op": "devices.get", "user": B1}, NOW)
        answers = alice.take()
        assert [x["code"] for x in answers] == ["rate_limited", "rate_limited"] and len(a.relay.waiting) == 2
    finally:
        a.store.close()
        b.store.close()


def test_a_device_may_have_only_so_many_stanzas_waiting_for_other_nodes(nodes, monkeypatch):
    import interlink.core.domain.relay as relay_module

    monkeypatch.setattr(relay_module, "MAX_WAITING_PER_DEVICE", 3)
    a, b = nodes
    alice = a.open(A1)
    b.open(B1)
    for _ in range(4):
        a.domain.dispatch(alice, msg(B1), NOW)
    [refused] = alice.take()
    assert refused["code"] == "rate_limited" and refused["retry_after"] > 0
    for _ in range(3):  # one at a time to the same node (the next leaves when the one before is answered)
        assert len(carry(a, b)) == 1
        b.commit()
        answer(a, b)
    assert [x["t"] for x in alice.take()] == ["ack"] * 3 and not a.relay._waiting_per_device
    a.domain.dispatch(alice, msg(B1), NOW)  # room again
    assert len(a.relay.waiting) == 1


def test_a_local_stanza_waits_behind_the_devices_stanza_waiting_for_another_node(nodes):
    """Even without own copies: the recipient's devices get a device's stanzas in the order sent."""
    a, b = nodes
    alice1, _ = a.open(A1, 1), a.open(A1, 2)
    local = a.open(A2)
    b.open(B1)
    first = msg(B1, own={2: b"own"})
    second = msg(A2, own={2: b"own 2"})
    third = msg(A2)  # no own copy: still behind the second
    receipt = {"t": "rcpt", "id": os.urandom(16), "to": A2, "kind": "read", "ids": [os.urandom(16)]}
    for stanza in (first, second, third, receipt):
        a.domain.dispatch(alice1, stanza, NOW)
    assert not a.domain.router.has_batch
    carry(a, b)
    b.commit()
    answer(a, b)
    a.commit()
    got = local.take()
    assert [(d["k"], d["id"]) for d in got] == [("msg", second["id"]), ("msg", third["id"]), ("rcpt", receipt["id"])]


def test_after_the_recipients_ack_the_sender_is_acked_even_if_its_own_copies_cannot_be_stored(nodes):
    a, b = nodes
    alice1, alice2 = a.open(A1, 1), a.open(A1, 2)
    b.open(B1)
    stanza = msg(B1, own={2: b"own"})
    a.domain.dispatch(alice1, stanza, NOW)
    a.open(A1, 3)  # a device registered while the message was on node-b: 'own' no longer matches
    carry(a, b)
    b.commit()
    answer(a, b)
    a.commit()
    [ack] = alice1.take()
    assert ack["t"] == "ack" and ack["id"] == stanza["id"]
    assert a.relay.counters["own_copies_lost"] == 1 and alice2.take() == []


def test_answers_count_only_from_the_node_a_stanza_went_to(nodes):
    a, b = nodes
    alice = a.open(A1)
    b.open(B1)
    stanza = msg(B1)
    a.domain.dispatch(alice, stanza, NOW)
    carry(a, b)
    b.commit()
    _, replies = b.relay.take_output()
    [(seq, encoded)] = replies["node-a"]
    assert a.relay.answered("node-c", seq, encoded, NOW) is None and a.relay.counters["misrouted"] == 1
    assert alice.take() == [] and seq in a.relay.waiting
    assert a.relay.answered("node-b", seq, encoded, NOW) is not None
    assert alice.take()[0]["t"] == "ack"


def test_a_node_refuses_senders_not_homed_on_the_node_that_relayed_them(nodes):
    a, b = nodes
    b.open(B1)
    impostor = A2.split("@")[0]  # homed on node-a, relayed "from node-b" to node-a
    a.relay.serve("node-b", [[1, "alpha", impostor, 1, 65000, msg(A1)]], NOW)
    _, replies = a.relay.take_output()
    [(seq, encoded)] = replies["node-b"]
    assert msgpack.unpackb(encoded)["code"] == "internal" and a.relay.counters["misrouted"] == 1
    assert not a.domain.router.has_batch


def test_a_relayed_sender_of_a_suspended_provider_is_refused(nodes):
    a, b = nodes
    a.open(A1)
    b.domain.router.registry.suspend("alpha")
    b.relay.serve("node-a", [[1, "alpha", A1.split("@")[0], 1, 65000, msg(B1)]], NOW)
    _, replies = b.relay.take_output()
    assert msgpack.unpackb(replies["node-a"][0][1])["code"] == "provider_suspended"
    assert not b.domain.router.has_batch


def test_a_closing_link_answers_everything_still_waiting_unconfirmed(nodes):
    """What waits for another node, and the local stanzas behind it, are all answered: the
    relayed ones overloaded (unconfirmed), the local ones stored."""
    a, b = nodes
    alice1, _ = a.open(A1, 1), a.open(A1, 2)
    a.open(A2)
    relayed, local = msg(B1, own={2: b"own"}), msg(A2, own={2: b"own 2"})
    a.domain.dispatch(alice1, relayed, NOW)
    a.domain.dispatch(alice1, local, NOW)
    assert a.relay.expire(NOW, everything=True) == 1
    first, second = alice1.take()
    assert (first["code"], first["ref"], first["unconfirmed"]) == ("overloaded", relayed["id"], True)
    # The local one waited behind it for its own copy's place: refused too, nothing stored.
    assert (second["code"], second["ref"], "unconfirmed" in second) == ("overloaded", local["id"], False)
    assert not a.domain.router.has_batch
    assert not a.relay._waiting_per_device and not a.relay._chains and not a.relay._streams


def test_a_directory_look_up_asks_every_node_and_merges_their_users(nodes):
    a, b = nodes
    alice = a.open(A1)
    for node, user in ((a, A2), (b, B1), (b, B2)):
        node.open(user)
        node.store.set_phone(user, "+4915100000001")
        node.store.set_consent(user, ("*",), True)
    b.store.set_consent(B2, ("*",), False)  # not discoverable
    stanza = {"t": "iq", "id": 3, "op": "dir.lookup", "phone": "+4915100000001"}
    a.domain.dispatch(alice, stanza, NOW)
    assert alice.take() == []  # node-a's part is in; node-b's is not
    carry(a, b)
    answer(a, b)
    [res] = alice.take()
    assert res == {"t": "res", "id": 3, "users": sorted([A2, B1], key=str.encode)}
    assert a.domain.stanzas_in["iq"] == 1 and b.domain.stanzas_in["iq"] == 0  # counted where the client is


def test_a_directory_look_up_refused_here_asks_no_other_node_and_a_silent_node_means_overloaded(nodes):
    a, b = nodes
    alice = a.open(A1)
    a.domain.dispatch(alice, {"t": "iq", "id": 4, "op": "dir.lookup", "phone": "0151"}, NOW)
    [err] = alice.take()
    assert (err["code"], err["id"]) == ("bad_stanza", 4) and a.relay.take_output() == ({}, {})
    a.domain.dispatch(alice, {"t": "iq", "id": 5, "op": "dir.lookup", "phone": "+4915100000002"}, NOW)
    a.relay.take_output()
    a.relay.expire(NOW + 60)
    [err] = alice.take()
    assert (err["code"], err["id"]) == ("overloaded", 5) and err["retry_after"] > 0


def test_a_devices_stored_stanzas_to_one_node_go_one_at_a_time_and_a_lost_one_stops_the_rest(nodes):
    """A node that missed a stanza (it was restarting, or NATS was) must not store the device's
    next one before the resend of the first: the next leaves only once the first is answered,
    and when the first times out the held ones are refused, never sent."""
    a, b = nodes
    alice = a.open(A1)
    b.open(B1)
    first, second, third = msg(B1), msg(B1), {"t": "rcpt", "id": os.urandom(16), "to": B1, "kind": "read",
                                               "ids": [os.urandom(16)]}
    for stanza in (first, second, third):
        a.domain.dispatch(alice, stanza, NOW)
    a.domain.dispatch(alice, {"t": "state", "to": B1, "s": "composing"}, NOW)  # not stored: not held
    outgoing, _ = a.relay.take_output()
    assert [r[5]["t"] for r in outgoing["node-b"]] == ["msg", "state"]
    a.relay.expire(NOW + 10)  # node-b never answered the first
    refusals = alice.take()
    assert [(r["code"], r["ref"]) for r in refusals] == [("overloaded", x["id"]) for x in (first, second, third)]
    assert refusals[0]["unconfirmed"] is True and "unconfirmed" not in refusals[1]  # only the first left this node
    assert a.relay.take_output() == ({}, {}) and not a.relay._streams


def lost_then_local(a: Node, b: Node) -> tuple:
    """alice's device 1 sends ``lost`` (to B1, never carried), then ``local`` (to A2 on this node),
    each with an own copy for her device 2; both time out. (alice1, alice2, lost, local); her
    refusals are not taken yet."""
    alice1, alice2 = a.open(A1, 1), a.open(A1, 2)
    a.open(A2)
    b.open(B1)
    lost, local = msg(B1, own={2: b"own 1"}), msg(A2, own={2: b"own 2"})
    a.domain.dispatch(alice1, lost, NOW)
    a.domain.dispatch(alice1, local, NOW)
    a.relay.take_output()
    a.relay.expire(NOW + 10)
    return alice1, alice2, lost, local


def test_a_timed_out_stanza_refuses_the_own_copies_queued_behind_it_and_later_ones_until_resent(nodes):
    a, b = nodes
    alice1, alice2, lost, behind = lost_then_local(a, b)
    assert [(r["code"], r["ref"]) for r in alice1.take()] == [("overloaded", lost["id"]), ("overloaded", behind["id"])]
    assert not a.domain.router.has_batch and not a.relay._chains
    # Sent after the timeout, before the device resent the lost one: its own copies would reach
    # alice's other device ahead of the lost one's, so it is refused (nothing stored).
    after = msg(A2, own={2: b"own 3"})
    a.domain.dispatch(alice1, after, NOW + 10)
    [refused] = alice1.take()
    assert (refused["code"], refused["ref"], refused["retry_after"]) == ("overloaded", after["id"], RETRY_AFTER_MS)
    assert "unconfirmed" not in refused and not a.domain.router.has_batch
    a.domain.dispatch(alice1, after, NOW + 11)  # resent before the ones refused before it: refused again
    a.domain.dispatch(alice1, behind, NOW + 11)  # and so is one of those, out of its order
    assert [(r["code"], r["ref"]) for r in alice1.take()] == [("overloaded", after["id"]), ("overloaded", behind["id"])]
    for stanza in (lost, behind, after):  # every refused one, in the order first sent: all go
        a.domain.dispatch(alice1, stanza, NOW + 12)
    [relayed] = carry(a, b)
    assert relayed[5]["id"] == lost["id"] and not a.relay._resend_first
    b.commit()
    answer(a, b)
    a.commit()
    assert [r["id"] for r in alice1.take()] == [lost["id"], behind["id"], after["id"]]
    assert [d["c"] for d in alice2.take()] == [b"own 1", b"own 2", b"own 3"]  # alice's other device: her order


def test_a_timed_out_stanza_holds_back_only_its_own_kind_and_not_past_its_resend_window(nodes, monkeypatch):
    """A group message refused at a timeout holds back that group's later messages, not 1:1
    ones; a 1:1 one holds back 1:1 stanzas (receipts too) for ``RESEND_FIRST_S`` at most."""
    from interlink.core.domain.relay import RESEND_FIRST_S
    import interlink.core.domain.relay as relay_module

    a, b = nodes
    g = group_homed_on("node-b")
    monkeypatch.setattr(relay_module, "new_group_id", lambda: g)
    bob, alice = b.open(B1), a.open(A1)
    b.domain.dispatch(bob, {"t": "iq", "id": 1, "op": "group.new", "members": [A1]}, NOW)
    carry(b, a)
    answer(b, a)
    b.commit()
    assert bob.take()[0]["t"] == "res"
    carry(b, a)
    a.commit()
    answer(b, a)
    b.commit()
    alice.take()  # the group's creation event
    lost_group = group_msg(g, b"lost")
    a.domain.dispatch(alice, lost_group, NOW)
    a.relay.take_output()
    a.relay.expire(NOW + 10)
    assert [(r["code"], r.get("unconfirmed")) for r in alice.take()] == [("overloaded", True)]
    one_to_one = msg(B1)
    a.domain.dispatch(alice, one_to_one, NOW + 10)  # another kind: relayed as usual
    later_group = group_msg(g, b"later")
    a.domain.dispatch(alice, later_group, NOW + 10)  # the same group: refused until the resend
    assert [(r["code"], r["ref"]) for r in alice.take()] == [("overloaded", later_group["id"])]
    [relayed] = carry(a, b)
    assert relayed[5]["id"] == one_to_one["id"]
    a.relay.expire(NOW + 20)  # node-b never answers: the 1:1 message holds back 1:1 stanzas now
    assert [r["ref"] for r in alice.take()] == [one_to_one["id"]]
    receipt = {"t": "rcpt", "id": os.urandom(16), "to": B1, "kind": "read", "ids": [os.urandom(16)]}
    a.domain.dispatch(alice, receipt, NOW + 20)
    assert [(r["code"], r["ref"]) for r in alice.take()] == [("overloaded", receipt["id"])]
    a.domain.dispatch(alice, receipt, NOW + 20 + RESEND_FIRST_S)  # the window is over: it goes
    assert alice.take() == [] and [r[5]["id"] for r in carry(a, b)] == [receipt["id"]]
    assert a.relay.counters["refused_before_resend"] == 2



def test_a_receipt_with_a_stray_g_goes_to_its_recipients_node(nodes):
    """A receipt has no group: its 'g', if a client sends one, is ignored as on one node (it used to
    keep the receipt here, refused ``unknown_recipient`` for a recipient of another node)."""
    a, b = nodes
    alice, bob = a.open(A1), b.open(B1)
    receipt = {"t": "rcpt", "id": os.urandom(16), "to": B1, "kind": "read", "ids": [os.urandom(16)],
               "g": os.urandom(16)}
    a.domain.dispatch(alice, receipt, NOW)
    assert alice.take() == [] and [r[5]["id"] for r in carry(a, b)] == [receipt["id"]]
    b.commit()
    answer(a, b)
    assert [(x["t"], x["id"]) for x in alice.take()] == [("ack", receipt["id"])]
    assert [(d["k"], d["id"]) for d in bob.take()] == [("rcpt", receipt["id"])]


def test_what_a_device_keeps_waiting_for_other_nodes_is_bounded_in_bytes(nodes):
    """A device's messages to one node go one at a time, the rest held here: 1,024 full frames
    were 67 MB of one device's (a review). Past MAX_WAITING_BYTES_PER_DEVICE it is refused
    ``rate_limited`` (no token spent) and takes again as answers come back."""
    import interlink.core.domain.relay as relay_module
    from interlink.core.domain.relay import MAX_WAITING_BYTES_PER_DEVICE

    a, b = nodes
    alice = a.open(A1)
    b.open(B1)
    big = bytes(60_000)
    sent = [msg(B1, c={1: big}) for _ in range(100)]
    each = relay_module._payload_bytes(sent[0])
    assert 60_000 < each < 61_000
    fits = MAX_WAITING_BYTES_PER_DEVICE // each
    for stanza in sent:
        a.domain.dispatch(alice, stanza, NOW)
    refused = alice.take()
    assert len(refused) == 100 - fits and {(x["code"], x["retry_after"]) for x in refused} == {("rate_limited", 1000)}
    assert a.relay.waiting_bytes == fits * each <= MAX_WAITING_BYTES_PER_DEVICE
    for _ in range(fits):  # one at a time: each answer lets the next go
        carry(a, b)
        b.commit()
        answer(a, b)
    assert [x["t"] for x in alice.take()] == ["ack"] * fits and b.store.pending_count(device_key(B1, 1)) == fits
    assert a.relay.waiting_bytes == 0 and a.relay._waiting_bytes_per_device == {}
    a.domain.dispatch(alice, sent[-1], NOW + 1)  # takes again
    assert alice.take() == [] and len(carry(a, b)) == 1


def test_what_all_devices_keep_waiting_is_bounded_and_counted(nodes, monkeypatch):
    import interlink.core.domain.relay as relay_module

    a, b = nodes
    stanzas = [msg(B1, c={1: bytes(10_000)}) for _ in range(4)]
    monkeypatch.setattr(relay_module, "MAX_WAITING_BYTES", 3 * relay_module._payload_bytes(stanzas[0]))
    senders = [a.open(A1), a.open(A2), a.open(A1, 2), a.open(A2, 2)]
    b.open(B1)
    for sender, stanza in zip(senders, stanzas):
        a.domain.dispatch(sender, stanza, NOW)
    assert [[x["code"] for x in s.take()] for s in senders] == [[], [], [], ["overloaded"]]
    assert a.relay.counters["waiting_full"] == 1


def test_local_stanzas_waiting_behind_a_relayed_one_count_as_waiting(nodes):
    """A device with other devices sends to node-b (its own copies wait for node-b's ack), then to a
    user of its own node: that one waits here behind it, counted like one sent away, until the
    chain settles (it was not counted at all: a chain of 3,001 was measured)."""
    a, b = nodes
    alice = a.open(A1)
    a.open(A1, 2)  # her other device: own copies
    a.open(A2)
    b.open(B1)
    from interlink.core.domain.relay import _payload_bytes

    away, here = msg(B1, own={2: bytes(1000)}), msg(A2, c={1: bytes(5000)}, own={2: bytes(1000)})
    a.domain.dispatch(alice, away, NOW)
    a.domain.dispatch(alice, here, NOW)
    assert alice.take() == [] and a.relay._waiting_per_device[alice.session_key] == 2
    assert a.relay.waiting_bytes == _payload_bytes(away) + _payload_bytes(here) > 1000 + 5000 + 1000
    carry(a, b)
    b.commit()
    answer(a, b)
    a.commit()
    assert [x["t"] for x in alice.take()] == ["ack", "ack"]
    assert a.relay.waiting_bytes == 0 and a.relay._waiting_per_device == {}


def test_the_split_of_groups_by_node_is_remembered_within_a_bound_of_members(nodes, monkeypatch):
    """It keeps each record's members alive: bounded by their number too, not by groups only; what
    it answers is the same remembered or not."""
    import interlink.core.domain.relay as relay_module

    a, _ = nodes
    monkeypatch.setattr(relay_module, "FANOUT_CACHE_MEMBERS", 10)
    members = {os.urandom(16): tuple(f"m{g}{i}@alpha" for i in range(4)) for g in range(5)}
    first = {g: a.relay._fan_out_parts(g, recipients) for g, recipients in members.items()}
    assert len(a.relay._fanout_parts) == 2 and a.relay._fanout_members == 8  # the last two groups
    assert sum(len(entry[0]) for entry in a.relay._fanout_parts.values()) == a.relay._fanout_members
    for g, recipients in members.items():
        assert a.relay._fan_out_parts(g, recipients) == first[g]
        assert sorted(m for _, part in first[g] for m in part) == sorted(
            m for m in recipients if MEMBERSHIP.home(m) != "node-a")  # those of other nodes, split by node
    changed = next(iter(members))
    a.relay._fan_out_parts(changed, members[changed][:1])  # a new record of a remembered group replaces it
    assert a.relay._fanout_members == sum(len(entry[0]) for entry in a.relay._fanout_parts.values()) <= 10


def test_a_stray_g_on_a_receipt_does_not_take_it_out_of_its_devices_order(nodes):
    """A receipt after a message that timed out waits for that message's resend, 'g' or not."""
    a, b = nodes
    alice = a.open(A1)
    b.open(B1)
    a.domain.dispatch(alice, msg(B1), NOW)
    carry(a, b)  # node-b's answer never comes
    a.relay.expire(NOW + 10)
    assert [x["code"] for x in alice.take()] == ["overloaded"]
    receipt = {"t": "rcpt", "id": os.urandom(16), "to": B1, "kind": "read", "ids": [os.urandom(16)],
               "g": os.urandom(16)}
    a.domain.dispatch(alice, receipt, NOW + 10)
    assert [(x["code"], x["ref"]) for x in alice.take()] == [("overloaded", receipt["id"])]
    assert a.relay.take_output() == ({}, {})


def test_what_a_waiting_stanza_counts_covers_its_members_and_receipt_ids():
    from interlink.core.domain.relay import STANZA_OVERHEAD_BYTES, _payload_bytes

    members = [f"{'m' * 100}{i}@alpha" for i in range(50)]
    assert _payload_bytes({"t": "iq", "op": "group.add", "id": 1, "members": members}) >= sum(map(len, members))
    ids = [os.urandom(16) for _ in range(100)]
    assert _payload_bytes({"t": "rcpt", "ids": ids}) >= 1600 + STANZA_OVERHEAD_BYTES
    assert _payload_bytes({"t": "msg", "c": {1: bytes(1000), 2: bytes(2000)}, "own": {3: bytes(500)}}) >= 3500
    for junk in ({"x" * 60_000: 1}, {"x": [[bytes(60_000)]]}, {"x": {bytes(60_000): 1}}):  # kept whole by a chain
        assert _payload_bytes({"t": "msg", **junk}) >= 60_000


def test_a_chains_stanzas_count_whatever_they_carry(nodes):
    """A stanza storing own copies is kept whole while it waits (its resend order and own copies
    need it): a field no handler reads counts like any other (a review kept 7.2 MB of junk
    counted as 66 KB)."""
    from interlink.core.domain.relay import MAX_WAITING_BYTES_PER_DEVICE

    a, b = nodes
    alice = a.open(A1)
    a.open(A1, 2)
    b.open(B1)
    for _ in range(120):
        a.domain.dispatch(alice, msg(B1, own={2: b"o"}, x=[[bytes(60_000)]]), NOW)  # node-b never answers
    taken = 120 - len([x for x in alice.take() if x.get("code") == "rate_limited"])
    assert 0 < taken <= MAX_WAITING_BYTES_PER_DEVICE // 60_000 + 1
    assert a.relay.waiting_bytes >= 60_000 * taken


def test_a_message_with_a_nil_g_is_a_bad_group_message_after_a_timeout_too(nodes):
    """``_take`` takes any 'g' for a group message (nil answered ``bad_stanza``, as on one
    node); the resend order must see it alike, or it was refused ``overloaded`` and awaited."""
    a, b = nodes
    alice = a.open(A1)
    b.open(B1)
    a.domain.dispatch(alice, msg(B1), NOW)
    carry(a, b)  # never answered
    a.relay.expire(NOW + 10)
    assert [x["code"] for x in alice.take()] == ["overloaded"]
    a.domain.dispatch(alice, msg(B1, g=None), NOW + 10)
    assert [x["code"] for x in alice.take()] == ["bad_stanza"]


def test_a_large_group_made_by_a_creator_of_its_home_passes_at_a_low_rate(tmp_path, monkeypatch):
    """Its token is paid at the home before the checks (``_precheck``), then the change is served
    for the stand-in of its creator: the copies' tokens must count that one as paid, or at a rate
    whose burst cannot hold them beside it, the change is refused for ever."""
    a = Node(tmp_path / "a", "node-a", max_group=100, message_rate=0.5)  # a burst of one token
    try:
        made = group_of_node_a(a, (f"user{i}@alpha" for i in range(400)), 67, monkeypatch)
        assert made["t"] == "res" and len(a.store.group(made["g"]).members) == 67
    finally:
        a.store.close()


def test_an_answer_whose_taking_fails_lets_its_stream_go_on(nodes, monkeypatch):
    """A bug of ours taking one answer answers its stanza ``internal`` and sends what its stream
    held behind it — the link's guard would otherwise hide a stream stuck for good."""
    a, b = nodes
    alice = a.open(A1)
    b.open(B1)
    first, second = msg(B1), msg(B1)
    a.domain.dispatch(alice, first, NOW)
    a.domain.dispatch(alice, second, NOW)
    assert [r[5]["id"] for r in carry(a, b)] == [first["id"]]  # the second waits behind it
    b.commit()
    checked = a.relay._checked_answer
    calls = []

    def failing(pending, answer):
        calls.append(pending)
        if len(calls) == 1:
            raise KeyError("a bug")
        return checked(pending, answer)

    monkeypatch.setattr(a.relay, "_checked_answer", failing)
    answer(a, b)
    assert [(x["t"], x["code"], x["ref"]) for x in alice.take()] == [("err", "internal", first["id"])]
    assert a.relay.counters["internal_errors"] == 1
    assert [r[5]["id"] for r in carry(a, b)] == [second["id"]]
    b.commit()
    answer(a, b)
    assert [(x["t"], x["id"]) for x in alice.take()] == [("ack", second["id"])]


def test_a_gfan_must_come_from_its_groups_home_and_carry_well_formed_fields(nodes):
    """A member's node stores a group's copies only on the word of the node the group id makes
    its home; a malformed record costs itself only, never the batch it came in."""
    a, b = nodes
    b.open(B1)
    a.open(A1)
    sender = A1.split("@")[0]
    g_b, g_a = group_homed_on("node-b"), group_homed_on("node-a")
    good = {"t": "gfan", "k": "msg", "g": g_a, "members": [B1], "id": os.urandom(16), "b": b"hi", "ts": 1_800_000_000_000,
            "o": 1, "n": bytes(8)}
    records = [
        [1, "alpha", sender, 1, 65000, {**good, "g": g_b}],  # a group homed on node-b: not node-a's to fan out
        [2, "alpha", sender, 1, 65000, {k: v for k, v in good.items() if k != "g"}],  # no group at all
        [3, "alpha", sender, 1, 65000, {**good, "ts": -5}],  # would fail the commit
        [4, "alpha", sender, 1, 65000, {**good, "id": b"short"}],
        [5, "alpha", sender, 1, 65000, {**good, "o": 0}],  # not an outbox entry's number
        [6, "alpha", sender, 1, 65000, {**good, "n": b"short"}],  # nor an incarnation
        [7, "alpha", sender, 1, 65000, good],  # the only good one
    ]
    answers = {}
    for record in records:  # each alone: a refused entry refuses the stream's later ones in its batch
        b.relay.serve("node-a", msgpack.unpackb(msgpack.packb([record]), raw=False, strict_map_key=False), NOW)
        b.commit()
        _, replies = b.relay.take_output()
        answers.update({seq: msgpack.unpackb(encoded) for seq, encoded in replies["node-a"]})
    assert {seq: x["code"] for seq, x in answers.items() if x["t"] == "err"} == {
        1: "internal", 2: "internal", 3: "internal", 4: "internal", 5: "internal", 6: "internal"}
    assert answers[7]["t"] == "ack"
    [dlv] = b.domain.router.sessions[(B1, 1)].take()
    assert (dlv["c"], dlv["g"], dlv["from"]) == (b"hi", g_a, A1)


def test_a_held_stanza_with_own_copies_is_refused_as_never_sent(nodes):
    """Held behind a stanza that timed out, it never left this node: its refusal is not
    "unconfirmed" (nothing of it can be stored anywhere), unlike the one that left."""
    a, b = nodes
    alice1, _ = a.open(A1, 1), a.open(A1, 2)
    b.open(B1)
    left, held = msg(B1, own={2: b"own 1"}), msg(B1, own={2: b"own 2"})
    a.domain.dispatch(alice1, left, NOW)
    a.domain.dispatch(alice1, held, NOW)
    a.relay.take_output()
    a.relay.expire(NOW + 10)
    first, second = alice1.take()
    assert (first["ref"], first["unconfirmed"]) == (left["id"], True)
    assert second["ref"] == held["id"] and "unconfirmed" not in second
    assert a.relay.counters["held_back"] == 1



def group_with(a: Node, b: Node, monkeypatch, *members: str) -> tuple[bytes, FakeSession]:
    """A group homed on node-a, made by alice (node-a) with ``members`` (node-b's users), its
    creation event delivered to node-b; returns (g, alice's session)."""
    import interlink.core.domain.relay as relay_module

    g = group_homed_on("node-a")
    monkeypatch.setattr(relay_module, "new_group_id", lambda: g)
    alice = a.open(A1)
    a.domain.dispatch(alice, {"t": "iq", "id": 1, "op": "group.new", "members": list(members)}, NOW)
    carry(a, b)
    answer(a, b)
    a.commit()
    assert alice.take()[0]["t"] == "res"
    carry(a, b)
    b.commit()
    answer(a, b)
    a.commit()
    return g, alice


def group_of_node_a(a: Node, addresses, count: int, monkeypatch) -> dict:
    """A ``group.new`` at node-a, all of it there: the first ``count`` of ``addresses`` homed on
    node-a registered, the first making the group with the others, its id homed on node-a; its
    one answer."""
    import interlink.core.domain.relay as relay_module

    names = [address for address in addresses if MEMBERSHIP.home(address) == "node-a"][:count]
    for user in names:
        a.store.register_device(user, 1, 5)
    creator = FakeSession(names[0], 1)
    a.domain.router.open_session(creator)
    monkeypatch.setattr(relay_module, "new_group_id", lambda: group_homed_on("node-a"))
    a.domain.dispatch(creator, {"t": "iq", "id": 1, "op": "group.new", "members": names[1:]}, NOW)
    a.commit()
    [answered] = creator.take()
    return answered


def group_msg(g: bytes, body: bytes) -> dict:
    return {"t": "msg", "id": os.urandom(16), "g": g, "b": body}


def test_a_fan_out_node_b_never_got_is_sent_again_in_order_until_stored(nodes, monkeypatch):
    """Node-b misses a window (restarting, NATS away): alice is acked by node-a's commit anyway,
    and node-a sends the window again after its deadline and RETRY_S, with what came after it,
    until node-b stores it — once, in node-a's order."""
    from interlink.core.domain.outbox import RETRY_S

    a, b = nodes
    bob = b.open(B1)
    g, alice = group_with(a, b, monkeypatch, B1)
    bob.take()
    a.domain.dispatch(alice, group_msg(g, b"one"), NOW)
    a.commit()
    a.relay.take_output()  # the window with "one" is lost
    a.domain.dispatch(alice, group_msg(g, b"two"), NOW)
    a.commit()
    assert a.relay.take_output() == ({}, {})  # "two" waits behind the window in flight
    assert [x["t"] for x in alice.take()] == ["ack", "ack"] and a.relay.outbox.backlog == 2
    a.relay.expire(NOW + 2.5)  # the window's deadline: not yet sent again
    assert a.relay.take_output() == ({}, {})
    a.relay.expire(NOW + 2.5 + RETRY_S)
    assert [r[5]["b"] for r in carry(a, b)] == [b"one", b"two"]
    b.commit()
    answer(a, b)
    assert [d["c"] for d in bob.take()] == [b"one", b"two"]
    assert a.relay.outbox.backlog == 0 and a.relay.counters["outbox_resent"] == 1
    a.commit()
    assert a.store.outbox_entries("node-b") == []


def test_a_member_nodes_full_outbox_stream_refuses_the_groups_messages_and_changes_until_it_drains(
        nodes, monkeypatch, caplog):
    """Node-b does not take its entries (down for long): once they fill its share of node-a's
    store, node-a refuses the group's messages and additions ``overloaded`` before anything is
    batched — never an ack it could not keep — logs it once, and serves them again once node-b
    stored what waited. A removal passes a full stream: nobody is kept in a group by a node away."""
    a, b = nodes
    bob = b.open(B1)
    g, alice = group_with(a, b, monkeypatch, B1)
    a.open(A2)  # may be added
    bob.take()
    kept = group_msg(g, b"kept")
    a.domain.dispatch(alice, kept, NOW)
    a.commit()
    assert alice.take()[0]["t"] == "ack"
    stream = a.relay.outbox.streams["node-b"]
    a.relay.outbox.max_node_bytes = stream.backlog_bytes  # what waits fills node-b's share now
    a.domain.dispatch(alice, kept, NOW)  # its ack was lost: the resend is recognised, not refused
    a.commit()
    assert [(x["t"], x["id"], x.get("dup")) for x in alice.take()] == [("ack", kept["id"], True)]
    assert stream.backlog == 1 and a.relay.counters["outbox_full"] == 0  # not refused: not counted
    for _ in range(2):
        a.domain.dispatch(alice, group_msg(g, b"refused"), NOW)
    a.domain.router.set_message_rates(per_device=1.0, per_user=100.0)
    buckets = a.domain.router.device_buckets
    tokens = buckets.tokens(alice.session_key, NOW)
    a.domain.dispatch(alice, {"t": "iq", "id": 7, "op": "group.add", "g": g, "members": [A2]}, NOW)
    a.domain.dispatch(alice, {"t": "iq", "id": 9, "op": "group.add", "g": g, "members": [B2]}, NOW)
    assert buckets.tokens(alice.session_key, NOW) == tokens  # a refused change costs no token, as on one node
    refusals = alice.take()
    assert [(x["t"], x["code"], x["retry_after"]) for x in refusals] == [("err", "overloaded", 5000)] * 4
    assert not a.domain.router.has_batch and a.relay.counters["outbox_full"] == 4
    # The addition of node-b's user was refused before node-b was asked to check him: no round trip, nothing held.
    assert not [r for r in a.relay.outgoing.get("node-b", []) if r[5].get("k") == "check"] and g not in a.relay.held
    [logged] = [r.getMessage() for r in caplog.records if "its share" in r.getMessage()]  # once, not per refusal
    assert "node-b" in logged
    assert [r[5]["b"] for r in carry(a, b)] == [b"kept"]
    b.commit()
    answer(a, b)
    assert stream.backlog_bytes == 0 and [d["c"] for d in bob.take()] == [b"kept"]
    a.domain.dispatch(alice, group_msg(g, b"again"), NOW)
    a.commit()
    assert alice.take()[0]["t"] == "ack"
    assert any("takes its group fan-out entries again" in r.getMessage() for r in caplog.records)

    a.relay.outbox.max_node_bytes = stream.backlog_bytes  # full again
    a.domain.dispatch(alice, {"t": "iq", "id": 8, "op": "group.del", "g": g, "members": [B1]}, NOW)
    a.commit()
    assert alice.take() == [{"t": "res", "id": 8, "ver": 2}]
    for expected in (b"again", "event"):  # one window each: the event's waited for the first's answer
        assert [r[5].get("b", r[5]["k"]) for r in carry(a, b)] == [expected]
        b.commit()
        answer(a, b)
    assert [d.get("c", d.get("event")) for d in bob.take()] == [b"again", "removed"]
    assert stream.backlog_bytes == 0


@pytest.fixture
def blob_nodes(tmp_path):
    """``nodes`` with blobs: a blob bucket of 64 KiB/s (a burst of 128 KiB) per reader."""
    from domain.test_blobs import InlineOffload, limits
    from interlink.core.edge.blobfiles import BlobFileStore

    made = [Node(tmp_path / name, name, blob_files=BlobFileStore(tmp_path / name / "blobs"),
                 offload=InlineOffload(), blob_writer=InlineOffload(), blob_limits=limits(blob_kib_per_s_per_user=64))
            for name in ("node-a", "node-b")]
    yield made
    for node in made:
        node.store.close()


def blob_of(node: str) -> bytes:
    return next(blob for blob in iter(lambda: os.urandom(16), None) if MEMBERSHIP.home(blob) == node)


def test_zero_length_blob_reads_waiting_together_are_each_answered(blob_nodes):
    """Each relayed read counts 1 KiB at least while it waits: two of ``len`` 0 counted nothing,
    and the second's answer raised (the count's key gone), losing every answer after it in its
    batch — other users' acks."""
    a, b = blob_nodes
    reader, sender = a.open(A1), a.open(A2)
    b.open(B1)
    blob = blob_of("node-b")
    for iq_id in (1, 2):
        a.domain.dispatch(reader, {"t": "iq", "id": iq_id, "op": "blob.read", "blob": blob, "off": 0, "len": 0}, NOW)
    a.domain.dispatch(sender, {"t": "msg", "id": os.urandom(16), "to": B1, "c": {1: b"hi"}}, NOW)
    carry(a, b)
    b.commit()
    answer(a, b)
    assert sorted((x["id"], x["code"]) for x in reader.take()) == [(1, "not_found"), (2, "not_found")]
    assert [x["t"] for x in sender.take()] == ["ack"]
    assert a.relay._blob_bytes_waiting == {} and not a.relay.waiting


def test_a_blob_read_of_another_nodes_blob_is_charged_at_the_readers_node_first(blob_nodes):
    """Refused there once the reader's blob bucket is empty, with nothing relayed: reads of 1 byte
    (charged 1 KiB each, 128 in the burst) used to go to the blob's node every one, refused
    only there, after a round trip."""
    a, b = blob_nodes
    reader = a.open(A1)
    blob = blob_of("node-b")
    for iq_id in range(1, 201):
        a.domain.dispatch(reader, {"t": "iq", "id": iq_id, "op": "blob.read", "blob": blob, "off": 0, "len": 1}, NOW)
    refused = [x for x in reader.take() if x["t"] == "err"]
    assert len(refused) == 200 - 128 and {x["code"] for x in refused} == {"rate_limited"}
    assert all(x["retry_after"] >= 1 for x in refused)
    records = carry(a, b)
    assert len(records) == 128 and {r[5]["op"] for r in records} == {"blob.read"}


def test_a_group_at_the_members_bound_with_the_largest_meta_reaches_its_member_node(tmp_path, monkeypatch):
    """'members' is bounded by an estimate of the event's other fields; long addresses with the
    largest 'meta' passed it, and the member node refused the created event by a stricter bound
    every time it came — holding back every entry behind it. Home and member node now bound an
    event's fields alike, by what a frame holds beside the dlv's envelope (``max_event_bytes``)."""
    import interlink.core.domain.relay as relay_module

    a = Node(tmp_path / "a", "node-a", max_frame_bytes=2048, max_group=64)
    b = Node(tmp_path / "b", "node-b", max_frame_bytes=2048, max_group=64)
    try:
        groups = a.domain.groups
        long_names = [f"{'x' * 50}{i:03d}@alpha" for i in range(400)]
        creator = next(m for m in long_names if MEMBERSHIP.home(m) == "node-a")
        fitting = []
        for member in (m for m in long_names if MEMBERSHIP.home(m) == "node-b"):  # as many as the bound lets in
            if sum(len(m) + 2 for m in fitting + [member]) > groups.max_members_bytes:
                break
            fitting.append(member)
            b.store.register_device(member, 1, 5)
        a.store.register_device(creator, 1, 5)
        alice = FakeSession(creator, 1)
        a.domain.router.open_session(alice)
        monkeypatch.setattr(relay_module, "new_group_id", lambda: group_homed_on("node-a"))
        meta = bytes(groups.max_meta_bytes)
        a.domain.dispatch(alice, {"t": "iq", "id": 1, "op": "group.new", "members": fitting, "meta": meta}, NOW)
        carry(a, b)
        answer(a, b)
        a.commit()
        [made] = alice.take()
        assert made["t"] == "res"
        [entry] = carry(a, b)
        assert len(msgpack.packb(entry[5]["fields"])) > a.domain.router.max_ciphertext_bytes  # the old bound's refusal
        b.commit()
        answer(a, b)
        assert a.relay.outbox.backlog == 0 and a.relay.counters["outbox_refused"] == 0
        assert b.store.pending_count(device_key(fitting[0], 1)) == 1
    finally:
        a.store.close()
        b.store.close()


def test_an_event_that_would_not_fit_a_frame_is_refused_at_the_groups_home(tmp_path, monkeypatch):
    """Whatever the estimate on 'members' lets through, the home measures the event before
    anything is batched: a frame that cannot hold it is ``too_large`` there, never stored here
    and refused at every member node (the estimate is made too generous here to show it)."""
    a = Node(tmp_path / "a", "node-a", max_frame_bytes=2048, max_group=64)
    try:
        a.domain.groups.max_members_bytes = 1 << 20
        refused = group_of_node_a(a, (f"{'y' * 60}{i:03d}@alpha" for i in range(200)), 60, monkeypatch)
        assert (refused["t"], refused["code"]) == ("err", "too_large") and "event would take" in refused["msg"]
        assert not a.domain.router.has_batch and a.relay.outbox.backlog == 0
    finally:
        a.store.close()


def test_an_entry_too_large_for_a_member_node_is_refused_for_good_and_the_stream_goes_on(tmp_path, monkeypatch):
    """Node-b takes smaller frames than node-a (configured so): a group message that fits node-a's
    is refused ``too_large`` by node-b — for good: sent again it would never fit, and it held back
    every entry behind it, of every group of node-a with members on node-b."""
    a, b = Node(tmp_path / "a", "node-a"), Node(tmp_path / "b", "node-b", max_frame_bytes=2048)
    try:
        bob = b.open(B1)
        g, alice = group_with(a, b, monkeypatch, B1)
        bob.take()
        for body in (bytes(3000), b"after it"):
            a.domain.dispatch(alice, group_msg(g, body), NOW)
        a.commit()
        assert [x["t"] for x in alice.take()] == ["ack", "ack"]
        window = carry(a, b)
        assert [len(r[5]["b"]) for r in window] == [3000, 8]
        b.commit()
        answer(a, b)  # the first refused for good, the second not stored behind it: sent again, alone
        assert a.relay.counters["outbox_refused"] == 1 and a.relay.outbox.backlog == 1
        a.relay.expire(NOW + 1)
        assert [r[5]["b"] for r in carry(a, b)] == [b"after it"]
        b.commit()
        answer(a, b)
        assert [d["c"] for d in bob.take()] == [b"after it"]
        assert a.relay.outbox.backlog == 0
        a.relay.expire(NOW + 60)
        assert a.relay.take_output() == ({}, {})  # nothing sent again
    finally:
        a.store.close()
        b.store.close()


def test_a_change_too_large_for_the_group_is_refused_at_its_home_before_any_token_or_check(nodes, monkeypatch):
    """As on one node, ``too_large`` costs no rate token; at a cluster home it also asks no member's
    node about anyone (it was charged, and checked there, before the size was looked at)."""
    a, b = nodes
    b.open(B1), b.open(B2)
    g, alice = group_with(a, b, monkeypatch, B1)  # alice and B1: the largest group allowed below
    a.open(A2)
    a.relay.groups.max_group = 2
    a.domain.router.set_message_rates(per_device=1.0, per_user=100.0)
    buckets = a.domain.router.device_buckets
    tokens = buckets.tokens(alice.session_key, NOW)
    a.domain.dispatch(alice, {"t": "iq", "id": 7, "op": "group.add", "g": g, "members": [A2]}, NOW)
    a.domain.dispatch(alice, {"t": "iq", "id": 8, "op": "group.add", "g": g, "members": [B2]}, NOW)
    a.domain.dispatch(alice, {"t": "iq", "id": 9, "op": "group.new", "members": [A2, B2]}, NOW)  # 3 with her
    assert [(x["t"], x["id"], x["code"]) for x in alice.take()] == [("err", i, "too_large") for i in (7, 8, 9)]
    assert buckets.tokens(alice.session_key, NOW) == tokens
    assert not [r for r in a.relay.outgoing.get("node-b", []) if r[5].get("k") == "check"]
    import interlink.core.domain.relay as relay_module

    monkeypatch.setattr(relay_module, "new_group_id", lambda: group_homed_on("node-a"))
    a.domain.dispatch(alice, {"t": "iq", "id": 10, "op": "group.new", "members": [A1, A2]}, NOW)  # she counts once
    a.commit()
    assert alice.take()[0]["t"] == "res"


def test_an_entry_stored_whose_answer_was_lost_is_recognised_when_it_comes_again(nodes, monkeypatch):
    a, b = nodes
    bob = b.open(B1)
    g, alice = group_with(a, b, monkeypatch, B1)
    bob.take()
    a.domain.dispatch(alice, group_msg(g, b"once"), NOW)
    a.domain.dispatch(alice, {"t": "iq", "id": 9, "op": "group.del", "g": g, "members": [B1]}, NOW)
    a.commit()
    window = carry(a, b)
    assert [r[5]["k"] for r in window] == ["msg", "event"]
    b.commit()
    b.relay.take_output()  # node-b's answers are lost
    assert [d.get("c", d.get("event")) for d in bob.take()] == [b"once", "removed"]
    a.relay.expire(NOW + 10)
    a.relay.expire(NOW + 11)
    assert carry(a, b)[0][5]["o"] == window[0][5]["o"]  # the same entries again
    b.commit()
    answer(a, b)
    assert bob.take() == [] and b.store.pending_count(device_key(B1, 1)) == 3  # created, once, removed
    assert a.relay.outbox.backlog == 0


def test_the_outbox_outlives_a_restart_of_the_groups_home_and_numbers_on(nodes, monkeypatch, tmp_path):
    """Node-a dies with two entries node-b has not confirmed — one node-b stored (its answer
    lost), one it never got. After the restart both go again under the incarnation that wrote
    them: the first is a duplicate there, the second is stored; new entries are numbered on, under
    the restarted store's incarnation."""
    a, b = nodes
    bob = b.open(B1)
    g, alice = group_with(a, b, monkeypatch, B1)
    bob.take()
    a.domain.dispatch(alice, group_msg(g, b"stored, answer lost"), NOW)
    a.commit()
    [stored] = carry(a, b)
    b.commit()
    b.relay.take_output()
    a.domain.dispatch(alice, group_msg(g, b"never sent"), NOW)
    a.commit()
    old_incarnation = a.store.incarnation
    a.store.close()
    restarted = Node(tmp_path / "a", "node-a")
    try:
        assert restarted.relay.outbox.backlog == 2 and restarted.store.incarnation != old_incarnation
        restarted.relay.expire(NOW)  # the edge's ticker: the waiting entries go out at start
        again = carry(restarted, b)
        assert [(r[5]["o"], r[5]["n"], r[5]["b"]) for r in again] == [
            (stored[5]["o"], old_incarnation, b"stored, answer lost"), (stored[5]["o"] + 1, old_incarnation, b"never sent")]
        b.commit()
        answer(restarted, b)
        alice = restarted.open(A1)
        restarted.domain.dispatch(alice, group_msg(g, b"after it"), NOW + 1)
        restarted.commit()
        [later] = carry(restarted, b)
        assert (later[5]["o"], later[5]["n"]) == (stored[5]["o"] + 2, restarted.store.incarnation)  # numbered on
        b.commit()
        answer(restarted, b)
        assert [d["c"] for d in bob.take()] == [b"stored, answer lost", b"never sent", b"after it"]
        assert restarted.relay.outbox.backlog == 0
    finally:
        restarted.store.close()
        a.store = lmdb_store(tmp_path / "other", sync=False, map_size_bytes=1 << 20)  # the fixture closes it


def test_a_refused_entry_refuses_the_later_entries_of_its_stream_in_the_batch(nodes):
    """Stored in the home's order or not at all: an entry after a refused one would otherwise
    move node-b's mark past the refused one, which would then never be stored."""
    a, b = nodes
    b.open(B1)
    g = group_homed_on("node-a")
    sender = A1.split("@")[0]
    entry = {"t": "gfan", "k": "msg", "g": g, "members": [B1], "b": b"x", "ts": 1_800_000_000_000, "n": bytes(8)}
    b.relay.serve("node-a", [
        [1, "alpha", sender, 1, 65000, {**entry, "o": 1, "id": b"short"}],
        [2, "alpha", sender, 1, 65000, {**entry, "o": 2, "id": os.urandom(16)}],
    ], NOW)
    b.commit()
    _, replies = b.relay.take_output()
    codes = [msgpack.unpackb(encoded)["code"] for _, encoded in replies["node-a"]]
    assert codes == ["internal", "overloaded"] and b.store.pending_count(device_key(B1, 1)) == 0


def test_a_member_node_that_starts_again_gets_its_backlog_at_once(nodes, monkeypatch):
    """Its hello says it listens again: what was out to its former process goes again now, not
    after that window's deadline and RETRY_S."""
    a, b = nodes
    bob = b.open(B1)
    g, alice = group_with(a, b, monkeypatch, B1)
    bob.take()
    for body in (b"while", b"it was down"):
        a.domain.dispatch(alice, group_msg(g, body), NOW)
        a.commit()
    a.relay.take_output()  # lost with node-b's former process
    a.relay.node_started("node-b", NOW + 0.1)
    assert [r[5]["b"] for r in carry(a, b)] == [b"while", b"it was down"]
    b.commit()
    answer(a, b)
    assert [d["c"] for d in bob.take()] == [b"while", b"it was down"] and a.relay.outbox.backlog == 0
    a.relay.node_started("node-b", NOW + 0.2)  # nothing waits: nothing is sent
    assert a.relay.take_output() == ({}, {})


def four_in_one_window(a, b, monkeypatch) -> tuple[list, list, FakeSession]:
    """Four group messages acked at node-a, their one window to node-b as it left (records)."""
    bob = b.open(B1)
    g, alice = group_with(a, b, monkeypatch, B1)
    bob.take()
    bodies = [b"m1", b"m2", b"m3", b"m4"]
    for body in bodies:
        a.domain.dispatch(alice, group_msg(g, body), NOW)
    a.commit()
    assert [x["t"] for x in alice.take()] == ["ack"] * 4
    outgoing, _ = a.relay.take_output()
    records = msgpack.unpackb(msgpack.packb(outgoing["node-b"]), raw=False, strict_map_key=False)
    assert [r[5]["b"] for r in records] == bodies
    return bodies, records, bob


def test_a_window_cut_in_two_whose_first_part_is_lost_is_stored_in_order(nodes, monkeypatch):
    """A window can leave in two NATS messages (one over max_payload is halved) and the first can
    be lost (a reconnect's full buffer): each entry names the one before it, so node-b refuses
    the second part rather than let its mark pass entries it never stored (which would make
    their resend look like duplicates — acked messages lost; a review found it)."""
    from interlink.core.domain.outbox import RETRY_S

    a, b = nodes
    bodies, records, bob = four_in_one_window(a, b, monkeypatch)
    b.relay.serve("node-a", records[2:], NOW)  # only the second part arrives
    b.commit()
    _, replies = b.relay.take_output()
    assert [msgpack.unpackb(x)["code"] for _, x in replies["node-a"]] == ["overloaded", "overloaded"]
    assert bob.take() == []
    for seq, encoded in replies["node-a"]:
        a.relay.answered("node-b", seq, encoded, NOW)
    a.relay.expire(NOW + 2.1)  # m1, m2: no answer by the deadline
    a.relay.expire(NOW + 2.1 + RETRY_S + 0.01)
    assert [r[5]["b"] for r in carry(a, b)] == bodies
    b.commit()
    answer(a, b)
    assert [d["c"] for d in bob.take()] == bodies and a.relay.outbox.backlog == 0


def test_a_window_cut_in_two_whose_first_commit_failed_is_stored_in_order(nodes, monkeypatch):
    from interlink.core.domain.outbox import RETRY_S
    from interlink.core.edge.lmdbstore.env import store_full

    a, b = nodes
    bodies, records, bob = four_in_one_window(a, b, monkeypatch)
    b.relay.serve("node-a", records[:2], NOW)
    b.domain.failed(b.domain.take_batch(NOW), store_full())  # the first part's commit fails
    b.relay.serve("node-a", records[2:], NOW)
    b.commit()  # the second part's succeeds: refused, the entry before it is not stored
    assert bob.take() == [] and b.store.pending_count(device_key(B1, 1)) == 1  # the creation event only
    answer(a, b)
    a.relay.expire(NOW + RETRY_S + 0.01)
    assert [r[5]["b"] for r in carry(a, b)] == bodies
    b.commit()
    answer(a, b)
    a.commit()
    assert [d["c"] for d in bob.take()] == bodies
    assert a.relay.outbox.backlog == 0 and a.store.outbox_entries("node-b") == []


def test_a_resent_group_new_after_a_timeout_gets_the_group_made_the_first_time(nodes, monkeypatch):
    """The group's home made the group but its answer came too late: alice was told
    ``unconfirmed``. Her resend (same iq id, same request) carries the id drawn the first time and
    is answered for that group — not made twice. A different request under the same iq id gets a
    new group."""
    import interlink.core.domain.relay as relay_module

    a, b = nodes
    first_g, other_g = group_homed_on("node-b"), group_homed_on("node-b")
    drawn = iter([first_g, other_g])
    monkeypatch.setattr(relay_module, "new_group_id", lambda: next(drawn))
    alice, bob = a.open(A1), b.open(B1)
    request = {"t": "iq", "id": 7, "op": "group.new", "members": [B1]}
    a.domain.dispatch(alice, request, NOW)
    carry(a, b)
    b.commit()  # made at node-b ...
    a.relay.expire(NOW + 10)  # ... but its answer is not back in time
    [timed_out] = alice.take()
    assert (timed_out["code"], timed_out["unconfirmed"]) == ("overloaded", True)
    answer(a, b)  # too late: dropped
    assert alice.take() == [] and a.relay.counters["late_answers"] == 1
    a.domain.dispatch(alice, dict(request), NOW + 11)
    [resent] = carry(a, b)
    assert resent[5]["g"] == first_g
    b.commit()
    answer(a, b)
    assert alice.take() == [{"t": "res", "id": 7, "ver": 1, "g": first_g}]
    assert b.store.group(first_g).members == (A1, B1) and b.store.group(other_g) is None
    assert [d["event"] for d in bob.take() if d.get("k") == "group"] == ["created"]  # one creation event
    a.domain.dispatch(alice, {**request, "members": []}, NOW + 12)  # not the same request
    [another] = carry(a, b)
    assert another[5]["g"] == other_g
    # Another user's request that drew that id (made up here): refused, never answered with alice's group.
    monkeypatch.setattr(relay_module, "new_group_id", lambda: first_g)
    carol = a.open(A2)
    a.domain.dispatch(carol, {"t": "iq", "id": 1, "op": "group.new", "members": []}, NOW + 13)
    carry(a, b)
    b.commit()
    answer(a, b)
    [refused] = carol.take()
    assert refused["code"] == "overloaded" and "taken" in refused["msg"] and "g" not in refused


def test_a_typing_states_refusal_naming_a_stanza_is_no_answer(nodes):
    """Typing state has no id: a refusal of it from another node names none, or the client would
    take it for the answer to a stanza of its own (found by fuzz/fuzz_relay_serve.py, F8)."""
    a, _ = nodes
    alice = a.open(A1)
    for _ in range(2):
        a.domain.dispatch(alice, {"t": "state", "to": B1, "s": "composing"}, NOW)
    outgoing, _ = a.relay.take_output()
    named, plain = outgoing["node-b"]
    refusal = {"t": "err", "code": "not_opted_in", "msg": "no", "user": B1}
    a.relay.answered("node-b", named[0], msgpack.packb({**refusal, "id": 1}), NOW)
    a.relay.answered("node-b", plain[0], msgpack.packb(refusal), NOW)
    replaced, passed_on = alice.take()
    assert (replaced["code"], "id" in replaced, "ref" in replaced) == ("internal", False, False)
    assert passed_on == refusal and a.relay.counters["bad_answers"] == 1


def test_what_waits_for_resends_is_bounded_per_device(nodes):
    """A stanza with a malformed id is refused as malformed, never recorded; a device's messages to
    made-up groups living on one node are one key (the node's stream), however many groups."""
    a, b = nodes
    alice = a.open(A1)
    b.open(B1)
    for _ in range(50):
        a.domain.dispatch(alice, group_msg(group_homed_on("node-b"), b"?"), NOW)
    a.relay.take_output()
    a.relay.expire(NOW + 10)
    assert len(alice.take()) == 50 and list(a.relay._resend_first) == [((A1, 1), "node-b")]
    a.domain.dispatch(alice, msg(B1), NOW + 10)  # 1:1: not held back by the group stream
    huge = {"t": "msg", "id": os.urandom(60_000), "to": B1, "c": {1: b"x"}}
    a.domain.dispatch(alice, group_msg(group_homed_on("node-b"), b"later"), NOW + 10)
    a.domain.dispatch(alice, {**huge, "g": group_homed_on("node-b")}, NOW + 10)
    codes = [r["code"] for r in alice.take()]
    assert codes == ["overloaded", "bad_stanza"]
    [awaited] = a.relay._resend_first.values()
    assert len(awaited.refs) == 51 and all(len(ref[1]) == 16 for ref in awaited.refs)


def test_a_drawn_group_id_is_forgotten_once_its_resend_is_answered(nodes, monkeypatch):
    import interlink.core.domain.relay as relay_module

    a, b = nodes
    first, second = group_homed_on("node-b"), group_homed_on("node-b")
    draws = iter([first, second])  # the resend draws nothing: it reuses the first
    monkeypatch.setattr(relay_module, "new_group_id", lambda: next(draws))
    alice = a.open(A1)
    b.open(B1)
    request = {"t": "iq", "id": 1, "op": "group.new", "members": [B1]}
    a.domain.dispatch(alice, dict(request), NOW)
    a.relay.take_output()
    a.relay.expire(NOW + 10)  # never reached node-b
    alice.take()
    a.domain.dispatch(alice, dict(request), NOW + 11)  # the resend: the same id
    [resent] = carry(a, b)
    assert resent[5]["g"] == first
    b.commit()
    answer(a, b)
    assert alice.take()[0] == {"t": "res", "id": 1, "ver": 1, "g": first} and not a.relay._drawn_groups
    a.domain.dispatch(alice, dict(request), NOW + 12)  # the same iq id again (a new connection's numbering)
    [again] = carry(a, b)
    assert again[5]["g"] == second  # a new group: the first one's resend was answered


def test_a_resent_group_new_keeps_its_id_through_a_refusal_for_now_and_skips_member_checks(nodes, monkeypatch):
    """The group's home made the group; alice's node timed out first. A refusal for now of her
    resend (``overloaded``) keeps the drawn id for the next one; the home answers a resend for the
    group it made before any member check (a member's consent may have changed since)."""
    import interlink.core.domain.relay as relay_module

    a, b = nodes
    g = group_homed_on("node-b")
    drawn = iter([g])
    monkeypatch.setattr(relay_module, "new_group_id", lambda: next(drawn))
    alice, _, _ = a.open(A1), a.open(A2), b.open(B1)
    request = {"t": "iq", "id": 3, "op": "group.new", "members": [A2, B1]}
    a.domain.dispatch(alice, dict(request), NOW)
    carry(a, b)
    carry(b, a)  # node-b asks node-a to check A2 ...
    answer(b, a)  # ... who may be added
    b.commit()
    assert b.store.group(g) is not None
    a.relay.expire(NOW + 10)
    assert alice.take()[0]["unconfirmed"] is True
    b.relay.take_output()  # its answer, too late
    a.domain.dispatch(alice, dict(request), NOW + 11)
    [resent] = a.relay.take_output()[0]["node-b"]
    busy = {"t": "err", "code": "overloaded", "msg": "busy", "retry_after": 10, "id": 3}
    a.relay.answered("node-b", resent[0], msgpack.packb(busy), NOW + 11)
    assert alice.take()[0]["code"] == "overloaded" and a.relay._drawn_groups  # kept for the next resend
    a.domain.dispatch(alice, dict(request), NOW + 12)
    [again] = carry(a, b)
    assert again[5]["g"] == g
    b.commit()
    outgoing, replies = b.relay.take_output()
    assert outgoing == {}  # no member check asked of node-a this time
    for seq, encoded in replies["node-a"]:
        a.relay.answered("node-b", seq, encoded, NOW + 12)
    assert alice.take() == [{"t": "res", "id": 3, "ver": 1, "g": g}] and not a.relay._drawn_groups


def test_an_awaited_resend_refused_by_its_handler_here_is_still_awaited(nodes):
    """A resend served on this node (a local recipient) that its handler refuses stored nothing:
    it stays awaited, and what was sent after it stays refused until it is stored."""
    a, b = nodes
    alice1, alice2, lost, local = lost_then_local(a, b)
    assert len(alice1.take()) == 2
    a.domain.dispatch(alice1, lost, NOW + 11)
    carry(a, b)
    b.commit()
    answer(a, b)
    a.commit()
    assert alice1.take()[0]["t"] == "ack" and not a.relay._chains
    a.domain.dispatch(alice1, {**local, "c": {7: b"no such device"}}, NOW + 11)  # refused by its handler here
    later = msg(A2, own={2: b"own 3"})
    a.domain.dispatch(alice1, later, NOW + 11)
    assert [(r["code"], r["ref"]) for r in alice1.take()] == [("device_mismatch", local["id"]), ("overloaded", later["id"])]
    for stanza in (local, later):
        a.domain.dispatch(alice1, stanza, NOW + 12)
    a.commit()
    assert [r["t"] for r in alice1.take()] == ["ack", "ack"] and not a.relay._resend_first
    assert [d["c"] for d in alice2.take() if d["t"] == "dlv"] == [b"own 1", b"own 2", b"own 3"]


def added_while_checked(a: Node, b: Node, monkeypatch, *members: str):
    """A group homed on node-a with ``members``; alice asks to add B2 (node-b checks him) and
    sends a group message before the answer, pipelined. Returns (g, alice, the message)."""
    g, alice = group_with(a, b, monkeypatch, *members)
    a.domain.dispatch(alice, {"t": "iq", "id": 2, "op": "group.add", "g": g, "members": [B2]}, NOW)
    stanza = group_msg(g, b"welcome")
    a.domain.dispatch(alice, stanza, NOW)
    assert not a.domain.router.has_batch  # the message waits behind the change: nothing stored yet
    return g, alice, stanza


def test_a_message_pipelined_behind_a_group_add_reaches_the_member_it_added(nodes, monkeypatch):
    """As on one node: a message sent after a group.add (before its res) sees the change, though
    the added member's node had to check him first."""
    a, b = nodes
    dave = b.open(B2)
    g, alice, stanza = added_while_checked(a, b, monkeypatch)
    [check] = carry(a, b)
    assert check[5]["k"] == "check" and check[5]["members"] == [B2]
    answer(a, b)
    a.commit()
    assert [(x["t"], x.get("id")) for x in alice.take()] == [("res", 2), ("ack", stanza["id"])]
    carry(a, b)
    b.commit()
    got = dave.take()
    assert [d.get("event", d.get("c")) for d in got] == ["added", b"welcome"] and a.relay.held == {}
    assert a.relay.counters["held_for_group_change"] == 1
    assert (a.relay._held_per_device, a.relay._held_count) == ({}, 0)


def test_a_refused_group_add_serves_what_waited_for_it_with_the_group_as_it_was(nodes, monkeypatch):
    a, b = nodes  # B2 never connected: node-b refuses him
    g, alice, stanza = added_while_checked(a, b, monkeypatch)
    carry(a, b)
    answer(a, b)
    a.commit()
    [err, ack] = alice.take()
    assert (err["t"], err["code"], err["id"]) == ("err", "unknown_recipient", 2)
    assert (ack["t"], ack["id"]) == ("ack", stanza["id"]) and a.store.group(g).members == (A1,)
    assert a.relay.held == {}


def test_a_relayed_message_for_a_group_whose_add_is_checked_waits_for_it_too(nodes, monkeypatch):
    """bob (node-b) writes to the group while alice's add of dave (node-b) is checked: the home
    serves bob's message after the add, so dave gets it."""
    a, b = nodes
    bob, dave = b.open(B1), b.open(B2)
    g, alice = group_with(a, b, monkeypatch, B1)
    bob.take()
    a.domain.dispatch(alice, {"t": "iq", "id": 2, "op": "group.add", "g": g, "members": [B2]}, NOW)
    check = a.relay.take_output()[0]["node-b"]
    b.domain.dispatch(bob, group_msg(g, b"hi dave"), NOW)
    carry(b, a)  # bob's message reaches the home before node-b checked dave
    assert not a.domain.router.has_batch and len(a.relay.held[g]) == 1
    b.relay.serve("node-a", over_nats(check), NOW)
    answer(a, b)
    a.commit()
    outgoing, replies = a.relay.take_output()  # bob's ack, and the fan-out of the add and of his message
    for seq, encoded in replies["node-b"]:
        b.relay.answered("node-a", seq, encoded, NOW)
    assert [x["t"] for x in bob.take()] == ["ack"]
    b.relay.serve("node-a", over_nats(outgoing["node-b"]), NOW)
    b.commit()
    assert [d.get("event", d.get("c")) for d in dave.take()] == ["added", b"hi dave"]


@pytest.mark.parametrize("bound", ["MAX_HELD_PER_GROUP", "MAX_HELD_PER_DEVICE", "MAX_HELD"])
def test_what_waits_for_a_group_change_is_bounded(nodes, monkeypatch, bound):
    import interlink.core.domain.relay as relay_module

    monkeypatch.setattr(relay_module, bound, 1)
    a, b = nodes
    b.open(B2)
    g, alice, stanza = added_while_checked(a, b, monkeypatch)
    second = group_msg(g, b"one too many")
    a.domain.dispatch(alice, second, NOW)
    [refused] = alice.take()
    assert (refused["code"], refused["ref"], refused["retry_after"]) == ("overloaded", second["id"], 1000)
    assert a.relay.counters["held_overflow"] == 1
    carry(a, b)
    answer(a, b)
    a.commit()
    assert [x["t"] for x in alice.take()] == ["res", "ack"]


def test_a_group_add_no_admin_could_make_asks_no_other_node(nodes, monkeypatch):
    """A made-up group, a member who is not an admin, members already in the group: the home
    answers from its record before asking any member's node about anyone."""
    a, b = nodes
    b.open(B1), b.open(B2)
    carl = a.open(A2)
    g, alice = group_with(a, b, monkeypatch, A2, B1)
    carl.take()  # the created event
    made_up = group_homed_on("node-a")
    for session, group, code in ((carl, made_up, "not_found"), (carl, g, "not_admin")):
        a.domain.dispatch(session, {"t": "iq", "id": 7, "op": "group.add", "g": group, "members": [B2]}, NOW)
        assert a.relay.take_output() == ({}, {}) and a.relay.held == {}
        [err] = session.take()
        assert (err["t"], err["code"], err["id"]) == ("err", code, 7)
    a.domain.dispatch(alice, {"t": "iq", "id": 8, "op": "group.add", "g": g, "members": [B1]}, NOW)  # a member already
    assert a.relay.take_output() == ({}, {})
    a.commit()
    assert [(x["t"], x["ver"]) for x in alice.take()] == [("res", 1)]


def test_a_non_members_stanza_for_a_changing_group_is_refused_at_once_not_held(nodes, monkeypatch):
    a, b = nodes
    b.open(B2)
    g, alice, stanza = added_while_checked(a, b, monkeypatch)
    stranger = a.open(A2)
    a.domain.dispatch(stranger, group_msg(g, b"let me in"), NOW)
    [refused] = stranger.take()
    assert refused["code"] == "not_member" and len(a.relay.held[g]) == 1  # alice's message only


def test_typing_state_past_the_bound_is_dropped_and_its_node_stops_waiting(nodes, monkeypatch):
    import interlink.core.domain.relay as relay_module

    monkeypatch.setattr(relay_module, "MAX_HELD_PER_GROUP", 0)
    a, b = nodes
    bob = b.open(B1)
    b.open(B2)
    g, alice = group_with(a, b, monkeypatch, B1)
    a.domain.dispatch(alice, {"t": "iq", "id": 2, "op": "group.add", "g": g, "members": [B2]}, NOW)
    a.relay.take_output()  # the check, left unanswered
    b.domain.dispatch(bob, {"t": "state", "g": g, "s": "composing"}, NOW)
    carry(b, a)
    _, replies = a.relay.take_output()
    assert [encoded for _, encoded in replies["node-b"]] == [None]  # served silently: no timeout on node-b
    assert a.relay.counters["held_overflow"] == 1


def test_a_held_stanza_is_counted_once_and_one_of_a_closed_session_is_not_served(nodes, monkeypatch):
    a, b = nodes
    b.open(B2)
    g, alice, stanza = added_while_checked(a, b, monkeypatch)
    closing = a.open(A1, 2)  # alice's second device: its message waits, then it disconnects
    a.domain.dispatch(closing, group_msg(g, b"from a device that left"), NOW)
    closing.closed = True
    assert a.domain.stanzas_in["msg"] == 2
    carry(a, b)
    answer(a, b)
    a.commit()
    assert a.domain.stanzas_in["msg"] == 2  # each counted when it came, not again when served
    assert [x["t"] for x in alice.take() if x["t"] != "dlv"] == ["res", "ack"]
    assert a.store.pending_count(device_key(A1, 1)) == 0  # the closed device's message was not stored


def test_a_held_stanza_whose_serving_fails_is_answered_internal_and_the_rest_served(nodes, monkeypatch):
    a, b = nodes
    b.open(B2)
    g, alice, stanza = added_while_checked(a, b, monkeypatch)
    second = group_msg(g, b"second")
    a.domain.dispatch(alice, second, NOW)
    real = a.domain.groups.route_msg

    def route_msg(session, message, msg_id, now):
        if message["id"] == stanza["id"]:
            raise RuntimeError("a bug of ours")
        return real(session, message, msg_id, now)

    monkeypatch.setattr(a.domain.groups, "route_msg", route_msg)
    carry(a, b)
    answer(a, b)
    a.commit()
    answers = [(x["t"], x.get("code"), x.get("ref", x.get("id"))) for x in alice.take() if x["t"] != "res"]
    assert answers == [("err", "internal", stanza["id"]), ("ack", None, second["id"])]
    assert a.relay.counters["internal_errors"] == 1
