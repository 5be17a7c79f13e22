"""A device's order across a cluster of three nodes when relayed stanzas time out
(``core/domain/relay.py``: the resend rule of docs/protocol.md §6). Three real ``Domain``s over
their own LMDB stores, the test carrying records and answers as the edge does over NATS (``test_relay.Node``). The
client is a compliant one: it resends every refused stored stanza in the order it first sent it
(a refused resend again later), then goes on; its other device must get its own copies in its
order. Found by two reviews of the rule (a poisoned stanza out at a third node; a resend refused
again, which must keep its first place)."""

from __future__ import annotations

import pytest

from domain.test_relay import Node, answer, msg, over_nats
from interlink.core.domain.cluster import Membership
from interlink.testing import FakeSession, homed_users

NOW = 1_800_000_000.0
MEMBERSHIP = Membership(["node-a", "node-b", "node-c"], 1)
USERS = homed_users(MEMBERSHIP, "alpha", per_node=2)
A1 = USERS["node-a"][0]
B1 = USERS["node-b"][0]
C1 = USERS["node-c"][0]


@pytest.fixture
def three(tmp_path):
    nodes = [Node(tmp_path / name, name, MEMBERSHIP) for name in MEMBERSHIP.nodes]
    yield nodes
    for node in nodes:
        node.store.close()


def outgoing(source: Node) -> dict:
    records, _ = source.relay.take_output()
    return {node: over_nats(batch) for node, batch in records.items()}


def sent_to_b_then_c(three) -> tuple:
    """alice's device 1 sends m1 to node-b's user, then m2 to node-c's, each with an own copy for
    her device 2: (alice1, alice2, m1, m2)."""
    a, b, c = three
    alice1, alice2 = a.open(A1, 1), a.open(A1, 2)
    b.open(B1)
    c.open(C1)
    m1, m2 = msg(B1, own={2: b"own 1"}), msg(C1, own={2: b"own 2"})
    a.domain.dispatch(alice1, m1, NOW)
    a.domain.dispatch(alice1, m2, NOW + 0.5)
    return alice1, alice2, m1, m2


def serve_and_answer(source: Node, target: Node, records: list, now: float) -> None:
    """``target`` serves ``records`` kept from before and commits; its answers go back to ``source``."""
    target.relay.serve(source.name, records, now)
    target.commit(now)
    answer(source, target, now=now)


def refused(session: FakeSession) -> list:
    return [stanza["ref"] for stanza in session.take() if stanza.get("code") == "overloaded"]


def deliver_everything(nodes, now: float) -> None:
    a, *others = nodes
    for _ in range(3):
        out = outgoing(a)
        for node in others:
            if node.name in out:
                serve_and_answer(a, node, out[node.name], now)
        a.commit(now)


def test_a_poisoned_stanza_out_at_a_third_node_is_awaited_from_the_timeout_on(three):
    a, _, c = three
    alice1, alice2, m1, m2 = sent_to_b_then_c(three)
    out = outgoing(a)  # m1 to node-b (lost), m2 to node-c (slow)
    a.relay.expire(NOW + 2.0)
    assert refused(alice1) == [m1["id"]]  # m2's refusal comes when node-c answers
    a.domain.dispatch(alice1, m1, NOW + 2.1)
    m3 = msg(C1, own={2: b"own 3"})
    a.domain.dispatch(alice1, m3, NOW + 2.1)
    assert refused(alice1) == [m3["id"]]  # m2 is awaited: m3 would overtake it
    serve_and_answer(a, c, out["node-c"], NOW + 2.2)
    assert refused(alice1) == [m2["id"]]
    for stanza in (m2, m3):
        a.domain.dispatch(alice1, stanza, NOW + 2.3)
    assert alice1.take() == []
    deliver_everything(three, NOW + 2.4)
    assert [d["c"] for d in alice2.take() if d["t"] == "dlv"] == [b"own 1", b"own 2", b"own 3"]
    assert not a.relay._resend_first


def test_a_resend_refused_again_keeps_its_first_place(three):
    a, b, _ = three
    alice1, alice2, m1, m2 = sent_to_b_then_c(three)
    outgoing(a)  # both lost
    a.relay.expire(NOW + 2.0)
    assert refused(alice1) == [m1["id"]]
    a.domain.dispatch(alice1, m1, NOW + 2.1)  # the earliest awaited: taken, out to node-b
    to_b = outgoing(a)["node-b"]
    a.relay.expire(NOW + 2.5)  # m2 times out: m1's resend, behind it in the chain, is poisoned
    assert refused(alice1) == [m2["id"]]
    a.domain.dispatch(alice1, m2, NOW + 2.6)  # refused: m1 keeps the place it was first sent in
    assert refused(alice1) == [m2["id"]]
    serve_and_answer(a, b, to_b, NOW + 2.7)  # node-b acks m1's resend: poisoned, refused now
    assert refused(alice1) == [m1["id"]]
    for stanza in (m1, m2):  # in the order first sent
        a.domain.dispatch(alice1, stanza, NOW + 3.0)
    assert alice1.take() == []
    deliver_everything(three, NOW + 3.1)
    assert [d["c"] for d in alice2.take() if d["t"] == "dlv"] == [b"own 1", b"own 2"]
