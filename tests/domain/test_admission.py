"""Admission control's levels (core/domain/admission.py) with ``now`` passed in, and the domain's
``overloaded`` answer, with fake sessions and a real LMDB store: no loop, no socket."""

from __future__ import annotations

import os

import pytest

from interlink.core.domain.admission import CALM_S, Admission
from interlink.core.domain.auth import Provider, ProviderRegistry
from interlink.core.domain.batch import WriteBatch, device_key
from interlink.core.domain.dispatch import Domain
from interlink.testing import FakeSession, lmdb_store

NOW = 1_800_000_000.0
BUDGET = 100


def test_off_when_the_budget_is_zero():
    admission = Admission(turn_budget=0, refuse_after_s=0.0)
    for i in range(10):
        admission.turn_ended(10**6, NOW + i * 0.01)
    assert not admission.over_budget(10**9)
    assert admission.level(NOW + 0.1) == 0 and admission.refusal(10**9, NOW + 0.1) == 0


def test_throttles_at_the_budget_and_refuses_only_after_the_overload_lasted():
    admission = Admission(turn_budget=BUDGET, refuse_after_s=0.25)
    assert not admission.over_budget(BUDGET - 1) and admission.over_budget(BUDGET)
    admission.turn_ended(BUDGET - 1, NOW)
    assert admission.level(NOW) == 0
    admission.turn_ended(BUDGET, NOW + 0.01)
    assert admission.level(NOW + 0.01) == 1 and not admission.refusing
    assert admission.refusal(10 * BUDGET, NOW + 0.01) == 0  # throttling only, for now
    admission.turn_ended(5 * BUDGET, NOW + 0.2)
    assert admission.level(NOW + 0.2) == 1
    admission.turn_ended(5 * BUDGET, NOW + 0.26)
    assert admission.level(NOW + 0.26) == 2 and admission.refusing
    # A message is refused only beyond its turn's budget: the first BUDGET of each turn get in.
    assert admission.refusal(BUDGET - 1, NOW + 0.26) == 0
    assert admission.refusal(BUDGET, NOW + 0.26) > 0


def test_retry_after_is_two_turns_at_the_last_pace_in_10_ms_steps():
    admission = Admission(turn_budget=BUDGET, refuse_after_s=0.0)
    admission.turn_ended(BUDGET, NOW)
    assert admission.refusal(BUDGET, NOW) == 10  # no pace measured yet: the minimum
    admission.turn_ended(BUDGET, NOW + 0.0234)
    assert admission.refusal(BUDGET, NOW + 0.0234) == 50  # 2 x 23.4 ms, rounded up to 10 ms steps
    admission.turn_ended(BUDGET, NOW + 0.0244)
    assert admission.refusal(BUDGET, NOW + 0.0244) == 10


def test_refused_messages_count_as_offered_so_refusing_does_not_end_the_overload():
    admission = Admission(turn_budget=BUDGET, refuse_after_s=0.0)
    admission.turn_ended(BUDGET, NOW)
    for _ in range(BUDGET):
        assert admission.refusal(BUDGET, NOW + 0.5) > 0
    # The turn wrote little (refused the rest) but was offered more than the budget: it counts
    # as an over-budget turn, so the overload goes on a calm second past it, not past NOW.
    admission.turn_ended(1, NOW + 0.9)
    assert admission.refusing
    assert admission.level(NOW + 1.5) == 2


def test_only_a_calm_second_ends_the_overload():
    admission = Admission(turn_budget=BUDGET, refuse_after_s=0.0)
    admission.turn_ended(BUDGET, NOW)
    assert admission.refusing
    admission.turn_ended(1, NOW + 0.5)  # a light turn in between: still overloaded
    assert admission.refusing and admission.level(NOW + 0.5) == 2
    admission.turn_ended(1, NOW + CALM_S + 0.01)
    assert admission.level(NOW + CALM_S + 0.01) == 0 and admission.refusal(10 * BUDGET, NOW + CALM_S + 0.01) == 0


def test_an_overload_ends_with_no_traffic_at_all():
    """Turns end only with commits: with no traffic there is none, and the level still ends."""
    admission = Admission(turn_budget=BUDGET, refuse_after_s=0.0)
    admission.turn_ended(BUDGET, NOW)
    assert admission.level(NOW + 0.5) == 2 and admission.refusal(10 * BUDGET, NOW + 0.5) > 0
    assert admission.refusal(10 * BUDGET, NOW + 600) == 0  # ten minutes without a turn: no stale refusal
    assert admission.level(NOW + 600) == 0 and not admission.refusing


def test_an_overload_long_ago_does_not_make_a_new_one_refuse_at_once():
    admission = Admission(turn_budget=BUDGET, refuse_after_s=0.25)
    admission.turn_ended(BUDGET, NOW)
    admission.turn_ended(BUDGET, NOW + 0.3)
    assert admission.refusing
    # No turn at all for a minute (no traffic), then a burst: it starts from the first level.
    assert admission.refusal(10 * BUDGET, NOW + 60) == 0
    admission.turn_ended(BUDGET, NOW + 60)
    assert admission.level(NOW + 60) == 1 and admission.refusal(10 * BUDGET, NOW + 60) == 0


def test_configure_changes_the_thresholds():
    admission = Admission(turn_budget=BUDGET, refuse_after_s=10.0)
    admission.configure(turn_budget=2 * BUDGET, refuse_after_s=0.0)
    assert not admission.over_budget(BUDGET)
    admission.turn_ended(2 * BUDGET, NOW)
    assert admission.refusing


def _provider(pid: str) -> Provider:
    return Provider(id=pid, issuer=f"https://{pid}.example", audience="aud", jwks_uri=f"https://{pid}.example/jwks")


@pytest.fixture
def domain(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", sync=False, map_size_bytes=1 << 26)
    store.register_device("alice@alpha", 1, 5)
    store.register_device("bob@alpha", 1, 5)
    domain = Domain(
        store=store, registry=ProviderRegistry([_provider("alpha")]), window=64, max_frame_bytes=65535,
        max_group=16, message_rate_per_device=1.0, message_rate_per_user=1.0,
        overload_turn_messages=2, overload_refuse_after_s=0.0,
    )
    yield domain
    store.close()


def _open(domain: Domain, user: str) -> FakeSession:
    session = FakeSession(user, 1)
    domain.router.open_session(session)
    return session


def _msg(msg_id: bytes) -> dict:
    return {"t": "msg", "id": msg_id, "to": "bob@alpha", "c": {1: b"ciphertext"}}


def _fill_the_turn(domain: Domain) -> None:
    """The overload began (refuse_after_s 0), and bob's two messages take this turn's budget of 2."""
    domain.admission.turn_ended(2, NOW)
    bob = _open(domain, "bob@alpha")
    for _ in range(2):
        domain.dispatch(bob, {"t": "msg", "id": os.urandom(16), "to": "alice@alpha", "c": {1: b"x"}}, NOW)
    assert domain.router.pending_load == 2 and bob.take() == []


def test_a_message_beyond_the_budget_is_refused_overloaded_and_spends_no_rate_token(domain):
    alice = _open(domain, "alice@alpha")
    _fill_the_turn(domain)
    ids = [os.urandom(16) for _ in range(5)]
    for msg_id in ids:
        domain.dispatch(alice, _msg(msg_id), NOW)
    answers = alice.take()
    assert [(a["t"], a["code"], a["ref"]) for a in answers] == [("err", "overloaded", m) for m in ids]
    assert all(a["retry_after"] == 10 and "10 ms" in a["msg"] for a in answers)
    assert domain.router.pending_load == 2  # nothing of them joins the commit
    assert domain.refusals["overloaded"] == 5 and domain.stanzas_in["msg"] == 7
    # The pre-encoded answer decodes (as a client decodes it) to exactly the contract's fields.
    assert set(answers[0]) == {"t", "code", "msg", "retry_after", "ref"}
    # No rate token was spent (the rate is 1/s, burst 2): the next turn takes two messages.
    commit = domain.take_batch(NOW + 0.001)
    domain.store.commit(commit.batch)
    domain.committed(commit)
    domain.dispatch(alice, _msg(os.urandom(16)), NOW)
    domain.dispatch(alice, _msg(os.urandom(16)), NOW)
    assert [a["t"] for a in alice.take() if a["t"] != "dlv"] == []  # both admitted: acked after their commit
    commit = domain.take_batch(NOW + 0.002)
    domain.store.commit(commit.batch)
    domain.committed(commit)
    assert [a["t"] for a in alice.take() if a["t"] != "dlv"] == ["ack", "ack"]


def test_a_refusal_with_a_malformed_id_gets_the_ordinary_answer(domain):
    alice = _open(domain, "alice@alpha")
    _fill_the_turn(domain)
    domain.dispatch(alice, {"t": "msg", "id": b"short", "to": "bob@alpha", "c": {1: b"x"}}, NOW)
    [answer] = alice.take()
    assert answer["code"] == "bad_stanza" and "ref" not in answer
    assert domain.admission.refused == 0  # answered bad_stanza, so not counted as refused


def test_the_load_counts_messages_and_their_copies_not_deletions():
    batch = WriteBatch()
    batch.delete(device_key("bob@alpha", 1), list(range(1, 1001)))  # a recv of 1,000 items
    assert batch.load == 0
    batch.add_message(b"s", bytes(16), 0, [(b"k", None)])
    assert batch.load == 1
    batch.add_message(b"s", bytes(16), 0, [(b"k", None)] * 1000)  # a group message to 1,000 devices
    assert batch.load == 1 + 1 + 1000 // 64
    batch.add_control(0, [(b"k", None)] * 63)
    batch.add_prekey_take("bob@alpha", [1], {})
    assert batch.load == 1 + 16 + 1 + 1


def test_throttling_is_the_first_level_only():
    admission = Admission(turn_budget=BUDGET, refuse_after_s=0.25)
    assert not admission.throttles(BUDGET - 1) and admission.throttles(BUDGET)
    admission.turn_ended(BUDGET, NOW)
    admission.turn_ended(BUDGET, NOW + 0.3)
    assert admission.refusing and not admission.throttles(10 * BUDGET)  # refusing: read on
    assert not Admission(turn_budget=0, refuse_after_s=0.0).throttles(10**9)
