"""A cluster's relay in-process (issue 18): the domain work of a cross-node 1:1 message against a
same-node one, on two real ``Domain``s with their own LmdbStores (``async`` durability: the CPU,
not the fsync), stand-in sessions (``interlink.testing.FakeSession``) and each hop's batch packed
and unpacked with msgpack as the link does over NATS — no sockets, no NATS server, no event loop.

    .venv/bin/python -m pytest bench/bench_relay.py --benchmark-only

- ``same node``: alice's ``msg`` to a user of her node: dispatched, committed, delivered, the
  recipient's ``recv``, alice's ack — everything one node does for it.
- ``cross node``: alice (node-a) to bob (node-b): node-a relays it (``take_output``, packed),
  node-b serves the record, commits, delivers, takes bob's ``recv`` and answers (packed), node-a
  takes the answer and acks alice: both nodes' domain work for one message.

What a real cross-node message costs more — the NATS hops, the wake-ups of two processes, the
sharing of a core — is ``bench/cluster_cost.py``'s (docs/benchmarks.md "Cluster: cost of a
cross-node message"); this is the part of it that is the relay's own logic.
"""

from __future__ import annotations

import os

import msgpack
import pytest

from interlink.core.domain.cluster import Membership
from interlink.testing import FakeSession, cluster_domain, homed_users, lmdb_store

NOW_S = 1_800_000_000.0
MEMBERSHIP = Membership(["node-a", "node-b"], 1)
USERS = homed_users(MEMBERSHIP, "alpha", per_node=2)
CIPHERTEXT = os.urandom(100)


class Node:
    """One cluster node's domain over its own store, as a gateway builds it (rates that never refuse)."""

    def __init__(self, path, node: str) -> None:
        self.name = node
        self.store = lmdb_store(path, sync=False, map_size_bytes=1 << 28, max_mailbox_items=1 << 30,
                                max_mailbox_bytes=1 << 40)
        self.domain = cluster_domain(self.store, MEMBERSHIP, node, message_rate=1e12)
        self.relay = self.domain.relay
        self.relay.wake = lambda: None  # the link would flush at the turn's end; the benchmark takes the output itself

    def open(self, user: str) -> FakeSession:
        self.store.register_device(user, 1, 5)
        session = FakeSession(user, 1)
        self.domain.router.open_session(session)
        return session

    def commit(self) -> None:
        commit = self.domain.take_batch(NOW_S)
        if commit is not None:
            self.store.commit(commit.batch)
            self.domain.committed(commit)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("relay")
    a, b = Node(folder / "a", "node-a"), Node(folder / "b", "node-b")
    yield a, b
    a.store.close()
    b.store.close()


def _unpack(payload: bytes):
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)  # as core/edge/clusterlink.py reads


def _received(node: Node, session: FakeSession) -> None:
    """The recipient's one delivery, confirmed with a ``recv`` (its deletion joins the next commit)."""
    [dlv] = session.take()
    assert dlv["t"] == "dlv"
    node.domain.dispatch(session, {"t": "recv", "seq": [dlv["seq"]]}, NOW_S)


def _send(node: Node, sender: FakeSession, to: FakeSession) -> None:
    node.domain.dispatch(sender, {"t": "msg", "id": os.urandom(16), "to": to.identity.user, "c": {1: CIPHERTEXT}},
                         NOW_S)


def _acked(sender: FakeSession) -> None:
    [ack] = sender.take()
    assert ack["t"] == "ack"


def _measure(benchmark, path: str, message, recipients_node: Node) -> None:
    """Time ``message`` (one message, sent to acked); the last ``recv``'s deletion is committed after."""
    benchmark.extra_info["path"] = path
    benchmark(message)
    recipients_node.commit()


def test_same_node_message(benchmark, nodes):
    a, _ = nodes
    alice, local = a.open(USERS["node-a"][0]), a.open(USERS["node-a"][1])

    def message() -> None:
        _send(a, alice, local)
        a.commit()
        _received(a, local)
        _acked(alice)

    _measure(benchmark, "same node", message, a)


def test_cross_node_message(benchmark, nodes):
    a, b = nodes
    alice, bob = a.open(USERS["node-a"][0]), b.open(USERS["node-b"][0])

    def message() -> None:
        _send(a, alice, bob)
        outgoing, _ = a.relay.take_output()
        relayed = msgpack.packb({"r": outgoing["node-b"], "m": b"digest"})
        b.relay.serve("node-a", _unpack(relayed)["r"], NOW_S)
        b.commit()
        _received(b, bob)
        _, replies = b.relay.take_output()
        for seq, encoded in _unpack(msgpack.packb({"a": replies["node-a"]}))["a"]:
            a.relay.answered("node-b", seq, encoded, NOW_S)
        _acked(alice)

    _measure(benchmark, "cross node", message, b)
