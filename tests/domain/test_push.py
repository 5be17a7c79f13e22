"""Push in the domain (``core/domain/push.py`` and the router's hooks), as tests/domain/
test_dispatch.py plays the edge: a real ``Domain`` over a real LMDB store, ``FakeSession``s,
the batch committed by hand. What the commit owes goes to the ``PushSender`` port, here a list
the test reads (the real sender, over HTTP, is in tests/edge/test_push.py and tests/e2e)."""

from __future__ import annotations

import os

import pytest

from interlink.core.domain.auth import Provider, ProviderRegistry
from interlink.core.domain.batch import device_key, split_device_key
from interlink.core.domain.dispatch import Domain
from interlink.core.domain.push import MAX_PUSH_TOKEN_BYTES
from interlink.core.errors import StoreFullError
from interlink.testing import DEFAULTS, FakeSession, lmdb_store

NOW = 1_800_000_000.0
BOB = device_key("bob@alpha", 1)


class Owed:
    """The ``PushSender`` port, recording."""

    def __init__(self) -> None:
        self.created: list = []
        self.woken: list = []
        self.cancelled: list = []

    def owed(self, created, existing) -> None:
        self.created.extend(created)
        self.woken.extend(dkey for dkey, _ in existing)

    def cancel(self, dkey: bytes) -> None:
        self.cancelled.append(dkey)


def _provider(pid: str, push: bool = True) -> Provider:
    return Provider(id=pid, issuer=f"https://{pid}.example", audience="gw", jwks_uri=f"https://{pid}.example/jwks",
                    default_accept=("*",), push_url=f"https://push.{pid}.example/hook" if push else None)


class Edge:
    def __init__(self, path, sender: bool = True) -> None:
        self.path = path
        self.store = lmdb_store(path, sync=False, map_size_bytes=1 << 26)
        self.sender = Owed() if sender else None
        self.domain = self._domain()

    def _domain(self) -> Domain:
        domain = Domain(
            store=self.store, registry=ProviderRegistry([_provider("alpha"), _provider("beta", push=False)]),
            window=64, max_frame_bytes=65535, max_group=16, message_rate_per_device=1e9, message_rate_per_user=1e9,
            overload_turn_messages=DEFAULTS.overload_turn_messages, overload_refuse_after_s=DEFAULTS.overload_refuse_after_s,
        )
        if self.sender is not None:
            domain.push.attach(self.sender)
        return domain

    def open(self, user: str, device: int = 1) -> FakeSession:
        self.store.register_device(user, device, 5)
        session = FakeSession(user, device)
        self.domain.router.open_session(session)
        return session

    def close(self, session: FakeSession) -> None:
        self.domain.router.close_session(session)

    def iq(self, session, op: str, **fields) -> dict:
        session.take()
        self.domain.dispatch(session, {"t": "iq", "id": 7, "op": op, **fields}, NOW)
        self.commit()
        return session.take()[-1]

    def send(self, session, to: str) -> None:
        self.domain.dispatch(session, {"t": "msg", "id": os.urandom(16), "to": to, "c": {1: b"ciphertext"}}, NOW)

    def commit(self):
        commit = self.domain.take_batch(NOW)
        if commit is not None:
            self.store.commit(commit.batch)
            self.domain.committed(commit)
        return commit


@pytest.fixture
def edge(tmp_path):
    made = Edge(tmp_path / "lmdb")
    yield made
    made.store.close()


def test_push_set_registers_the_device_and_push_del_forgets_it(edge):
    bob = edge.open("bob@alpha")
    assert edge.iq(bob, "push.set", token="apns:abc123") == {"t": "res", "id": 7}
    assert edge.store.push_token(BOB) == b"apns:abc123"
    assert ("bob@alpha", 1) in edge.domain.router.push_devices
    assert edge.iq(bob, "push.del") == {"t": "res", "id": 7, "removed": True}
    assert edge.store.push_token(BOB) is None and ("bob@alpha", 1) not in edge.domain.router.push_devices
    assert edge.sender.cancelled == [BOB]
    assert edge.iq(bob, "push.del")["removed"] is False


def test_a_token_its_provider_no_longer_knows_is_forgotten_without_a_second_cancel(edge):
    """The sender drops the 404/410 push itself (counted as token_gone): forgetting the
    registration for it must not cancel that push again (counted twice before)."""
    bob = edge.open("bob@alpha")
    edge.iq(bob, "push.set", token="apns:abc123")
    assert edge.domain.push.forget(BOB, cancel_owed=False) is True
    assert edge.store.push_token(BOB) is None and edge.sender.cancelled == []


@pytest.mark.parametrize("token, words", [
    (None, "needs 'token'"), (7, "needs 'token'"), (b"bytes", "needs 'token'"), ("", "1..1024 bytes"),
    ("x" * (MAX_PUSH_TOKEN_BYTES + 1), "1..1024 bytes"), ("a\x00b", "without NUL"), ("\ud800", "not valid UTF-8"),
])
def test_a_bad_token_is_bad_stanza(edge, token, words):
    bob = edge.open("bob@alpha")
    answer = edge.iq(bob, "push.set", **({} if token is None else {"token": token}))
    assert answer["code"] == "bad_stanza" and words in answer["msg"]
    assert edge.store.push_token(BOB) is None


def test_push_is_unavailable_without_a_push_url_or_a_sender(tmp_path):
    edge = Edge(tmp_path / "lmdb")
    carol = edge.open("carol@beta")  # beta has no push_url
    assert edge.iq(carol, "push.set", token="t")["code"] == "push_unavailable"
    edge.store.close()
    unsent = Edge(tmp_path / "unsent", sender=False)  # the node cannot sign webhooks
    assert unsent.iq(unsent.open("bob@alpha"), "push.set", token="t")["code"] == "push_unavailable"
    unsent.store.close()


def test_items_for_an_offline_registered_device_owe_one_push_in_their_commit(edge):
    alice, bob = edge.open("alice@alpha"), edge.open("bob@alpha")
    edge.iq(bob, "push.set", token="t")
    edge.send(alice, "bob@alpha")
    edge.commit()
    assert edge.sender.created == []  # online: delivered, nothing owed
    edge.close(bob)
    commit = edge.commit()  # gone with an item unreceived: owed
    assert edge.sender.created == [(BOB, 1)]
    assert commit.batch.push_wake == {BOB}
    edge.send(alice, "bob@alpha")
    edge.send(alice, "bob@alpha")
    edge.commit()
    assert len(edge.sender.created) == 1 and edge.sender.woken.count(BOB) >= 1  # covered by the one owed
    assert edge.store.push_intents() == [(BOB, 1)]
    bob = edge.open("bob@alpha")  # connects: nothing owed any more
    assert edge.sender.cancelled == [BOB]
    edge.commit()
    assert edge.store.push_intents() == []


def test_an_unregistered_or_online_device_costs_routing_nothing(edge):
    alice, bob = edge.open("alice@alpha"), edge.open("bob@alpha")
    edge.close(bob)
    edge.send(alice, "bob@alpha")
    commit = edge.commit()
    assert commit.batch.push_wake == set() and edge.sender.created == []


def test_an_answered_push_goes_and_again_owes_another_when_items_came_meanwhile(edge):
    alice = edge.open("alice@alpha")
    bob = edge.open("bob@alpha")
    edge.iq(bob, "push.set", token="t")
    edge.close(bob)
    edge.send(alice, "bob@alpha")
    edge.commit()
    (dkey, counter), = edge.sender.created
    edge.domain.router.push_answered(dkey, counter, True)
    edge.commit()
    assert [c for _, c in edge.sender.created] == [1, 2]
    edge.domain.router.push_answered(dkey, 2, False)
    edge.commit()
    assert edge.store.push_intents() == []


def test_registrations_are_loaded_at_start(edge):
    bob = edge.open("bob@alpha")
    edge.iq(bob, "push.set", token="t")
    restarted = edge._domain()
    assert ("bob@alpha", 1) in restarted.router.push_devices
    assert split_device_key(BOB) == ("bob@alpha", 1)


def _owe_bob(edge) -> tuple:
    alice, bob = edge.open("alice@alpha"), edge.open("bob@alpha")
    edge.iq(bob, "push.set", token="t")
    edge.close(bob)
    edge.send(alice, "bob@alpha")
    edge.commit()
    return alice, bob


def test_a_device_that_connects_and_leaves_within_one_batch_is_owed_a_new_push(edge):
    alice, _ = _owe_bob(edge)
    assert [c for _, c in edge.sender.created] == [1]
    bob = edge.open("bob@alpha")  # (the sender forgets intent 1 at once)
    edge.close(bob)  # gone again before the commit, with the item unreceived
    edge.commit()
    assert [c for _, c in edge.sender.created] == [1, 2]  # the cancel, then a new intent
    assert edge.store.push_intents() == [(BOB, 2)]


def test_an_intent_committed_while_its_device_connected_is_not_sent(edge):
    """With commits on the writer thread the device may connect while the commit that owes it a
    push is being written: the push is not sent, and the next commit cancels it."""
    alice = edge.open("alice@alpha")
    bob = edge.open("bob@alpha")
    edge.iq(bob, "push.set", token="t")
    edge.close(bob)
    edge.send(alice, "bob@alpha")
    commit = edge.domain.take_batch(NOW)
    edge.store.commit(commit.batch)  # written ...
    bob = edge.open("bob@alpha")  # ... while bob connects ...
    edge.domain.committed(commit)  # ... then answered on the loop
    assert edge.sender.created == []
    edge.commit()
    assert edge.store.push_intents() == []


def test_a_failed_commit_keeps_its_push_changes_for_the_next(edge):
    _owe_bob(edge)
    edge.domain.router.push_answered(BOB, 1, False)
    commit = edge.domain.take_batch(NOW)
    edge.domain.failed(commit, StoreFullError("the store is full"))  # nothing written
    edge.commit()
    assert edge.store.push_intents() == []  # the answer reached the store with the next commit
