"""The domain alone (``Domain``, ``core/domain/dispatch.py``), as aioquic tests its connection: no
event loop, no socket, ``now`` passed in.

A real ``Domain`` (Router, Groups, Operations, Policy) over a real LMDB store in a temporary
folder, with ``FakeSession``s standing in for open sessions. The test plays the edge: it
dispatches stanzas, takes the turn's batch, commits it in the store and hands the result back,
then reads what each session was sent and which sessions the domain says it touched.
"""

from __future__ import annotations

import os

import pytest

from interlink.core.domain.auth import Provider, ProviderRegistry
from interlink.core.domain.dispatch import Domain
from interlink.core.errors import InterlinkError, StoreFullError
from interlink.testing import DEFAULTS, FakeSession, lmdb_store

NOW = 1_800_000_000.0


def _provider(pid: str, accept=("*",)) -> Provider:
    return Provider(id=pid, issuer=f"https://{pid}.example", audience="gw", jwks_uri=f"https://{pid}.example/jwks",
                    default_accept=accept)


class Edge:
    """What the edge does around the domain, done by hand."""

    def __init__(self, path, *, window: int = 64, rate: float = 1e9) -> None:
        self.store = lmdb_store(path, sync=False, map_size_bytes=1 << 26)
        self.domain = Domain(
            store=self.store, registry=ProviderRegistry([_provider("alpha"), _provider("beta", accept=())]),
            window=window, max_frame_bytes=65535, max_group=16, message_rate_per_device=rate, message_rate_per_user=rate,
            overload_turn_messages=DEFAULTS.overload_turn_messages, overload_refuse_after_s=DEFAULTS.overload_refuse_after_s,
        )
        self.router = self.domain.router

    def open(self, user: str, device: int = 1) -> FakeSession:
        self.store.register_device(user, device, 5)
        session = FakeSession(user, device)
        replaced, _ = self.router.open_session(session)
        assert replaced is None
        return session

    def send(self, session: FakeSession, stanza: dict, now: float = NOW) -> None:
        self.domain.dispatch(session, stanza, now)

    def commit(self) -> set:
        """Commit the turn's batch; returns the sessions the domain touched since the last call."""
        commit = self.domain.take_batch(NOW)
        if commit is not None:
            self.store.commit(commit.batch)
            self.domain.committed(commit)
        return self.router.take_touched()


@pytest.fixture
def edge(tmp_path):
    made = Edge(tmp_path / "lmdb")
    yield made
    made.store.close()


def msg(to: str, devices=(1,), **fields) -> dict:
    return {"t": "msg", "id": os.urandom(16), "to": to, "c": {d: b"ciphertext %d" % d for d in devices}, **fields}


def test_a_message_is_acked_and_delivered_only_after_the_commit(edge):
    alice, bob = edge.open("alice@alpha"), edge.open("bob@alpha")
    stanza = msg("bob@alpha")
    edge.send(alice, stanza)
    assert alice.received == [] and bob.received == []  # nothing before the commit
    assert edge.router.take_touched() == set()
    touched = edge.commit()
    assert touched == {alice, bob}
    assert alice.take() == [{"t": "ack", "id": stanza["id"], "ts": int(NOW * 1000)}]
    (dlv,) = bob.take()
    assert (dlv["t"], dlv["from"], dlv["dev"], dlv["c"], dlv["ts"]) == ("dlv", "alice@alpha", 1, b"ciphertext 1", int(NOW * 1000))
    edge.send(bob, {"t": "recv", "seq": [dlv["seq"]]})
    edge.commit()
    assert edge.store.pending_count(b"bob@alpha\x00" + (1).to_bytes(4, "big")) == 0


def test_the_window_holds_back_deliveries_until_recv(edge):
    small = Edge(edge.store.path.parent / "window", window=2)
    try:
        alice, bob = small.open("alice@alpha"), small.open("bob@alpha")
        ids = []
        for _ in range(5):
            stanza = msg("bob@alpha")
            ids.append(stanza["id"])
            small.send(alice, stanza)
        small.commit()
        first = bob.take()
        assert [d["id"] for d in first] == ids[:2]
        small.send(bob, {"t": "recv", "seq": [d["seq"] for d in first]})
        assert small.router.take_touched() == {bob}  # the refill went out before any commit
        assert [d["id"] for d in bob.take()] == ids[2:4]
    finally:
        small.store.close()


def test_refusals_are_answered_at_once_and_store_nothing(edge):
    alice = edge.open("alice@alpha")
    edge.open("bob@beta")  # beta accepts nobody from other providers
    stanza = msg("bob@beta")
    edge.send(alice, stanza)
    assert alice.take() == [{"t": "err", "code": "not_opted_in", "ref": stanza["id"],
                             "msg": "bob@beta does not accept messages from users of 'alpha'"}]
    assert edge.domain.take_batch(NOW) is None
    edge.send(alice, {"t": "zap"})
    assert alice.take()[0]["code"] == "bad_stanza"
    assert edge.domain.refusals == {"not_opted_in": 1, "bad_stanza": 1}


def test_rate_limits_follow_the_time_passed_in(tmp_path):
    slow = Edge(tmp_path / "slow", rate=1.0)  # burst 2, then one a second
    try:
        alice, _ = slow.open("alice@alpha"), slow.open("bob@alpha")
        codes = []
        for now in (NOW, NOW, NOW, NOW + 0.5, NOW + 1.0):
            slow.send(alice, msg("bob@alpha"), now)
            codes += [s.get("code", "ok") for s in alice.take()]
            codes += ["ok" for s in [slow.domain.take_batch(NOW)] if s is not None]
        assert codes == ["ok", "ok", "rate_limited", "rate_limited", "ok"]
    finally:
        slow.store.close()


def test_a_failed_commit_answers_every_sender_with_its_error(edge):
    alice, bob = edge.open("alice@alpha"), edge.open("bob@alpha")
    stanza = msg("bob@alpha")
    edge.send(alice, stanza)
    commit = edge.domain.take_batch(NOW)
    edge.domain.failed(commit, StoreFullError("the gateway's storage is full; try again later"))
    assert alice.take() == [{"t": "err", "code": "overloaded", "ref": stanza["id"],
                             "msg": "the gateway's storage is full; try again later"}]
    assert bob.received == [] and edge.router.take_touched() == {alice}
    assert isinstance(StoreFullError("x"), InterlinkError)


def test_a_replaced_session_gets_nothing_more_and_the_new_one_gets_the_backlog(edge):
    alice, bob = edge.open("alice@alpha"), edge.open("bob@alpha")
    newer = FakeSession("bob@alpha")
    replaced, pending = edge.router.open_session(newer)
    assert replaced is bob and pending == 0
    edge.send(alice, msg("bob@alpha"))
    edge.commit()
    assert bob.received == [] and [s["t"] for s in newer.take()] == ["dlv"]
    edge.router.close_session(bob)  # the old connection's close: the newer session stays
    assert edge.router.sessions[("bob@alpha", 1)] is newer


def test_group_operations_answer_after_the_commit_and_fan_out(edge):
    alice, bob, carl = edge.open("alice@alpha"), edge.open("bob@alpha"), edge.open("carl@alpha")
    edge.send(alice, {"t": "iq", "id": 7, "op": "group.new", "members": ["bob@alpha", "carl@alpha"]})
    assert alice.received == []  # deferred until the group and its events are durable
    edge.commit()
    (res,) = alice.take()
    g = res["g"]
    assert res["t"] == "res" and res["id"] == 7 and res["ver"] == 1
    assert [(s["k"], s["event"]) for s in bob.take()] == [("group", "created")]
    assert [(s["k"], s["event"]) for s in carl.take()] == [("group", "created")]
    edge.send(bob, {"t": "msg", "id": os.urandom(16), "g": g, "b": b"to the group"})
    touched = edge.commit()
    assert touched == {alice, bob, carl}
    assert [s["c"] for s in carl.take()] == [b"to the group"]
    edge.send(carl, {"t": "state", "g": g, "s": "composing"})
    assert edge.router.take_touched() == {alice, bob}  # typing goes out at once, never stored
    assert bob.take()[-1] == {"t": "state", "from": "carl@alpha", "g": g, "s": "composing"}


def test_iq_answers_go_out_through_the_touched_set(edge):
    alice = edge.open("alice@alpha")
    edge.send(alice, {"t": "iq", "id": 1, "op": "block.add", "user": "eve@alpha"})
    edge.send(alice, {"t": "iq", "id": 2, "op": "block.list"})
    assert edge.router.take_touched() == {alice}
    assert alice.take() == [{"t": "res", "id": 1}, {"t": "res", "id": 2, "users": ["eve@alpha"], "more": False}]
