"""Routing decision of a 1:1 ``msg`` (``Domain.handle_msg``), on the real Domain (Router,
Policy, Groups, Operations) and LmdbStore (in a temporary folder) with a stand-in session
(``interlink.testing.FakeSession``: the domain's session port, recording what it is sent).

    .venv/bin/python -m pytest bench/bench_routing.py --benchmark-only

- ``decision``: one ``handle_msg``: rate buckets, id and address checks, consent, the
  recipient's devices (cached by the store), block check, and the items (device key, dlv
  builder) added to the turn's batch. No event loop runs: the domain is sans-I/O; the batch is
  taken (emptied) between rounds, untimed.
- ``turn``: 32 decisions and the group commit that follows them (``take_batch``, the store's
  commit inline, ``committed``: ``async`` durability, the CPU, not the fsync; bench_mailbox.py
  has ``sync``), which builds every dlv, writes LMDB and sends the 32 acks. Recipients are
  offline: the copies stay stored.

No compiled twin is on this path (1:1 routing uses none), so the rows record the implementation
the selector picked.
"""

from __future__ import annotations

import os

import pytest

from interlink.core.domain.auth import Provider, ProviderRegistry
from interlink.core.domain.dispatch import Domain
from interlink.core.domain.router import RouteError
from interlink.core.protocol.stanza import decode_stanzas
from interlink.core.domain.batch import device_key
from interlink.testing import FakeSession, lmdb_store

CIPHERTEXT = os.urandom(200)
TURN = 32  # msgs routed in one loop turn before its commit
NOW_S = 1_800_000_000.0


def _provider(pid: str) -> Provider:
    return Provider(id=pid, issuer=f"https://{pid}.example", audience="gw", jwks_uri=f"https://{pid}.example/jwks",
                    default_accept=("*",))


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    store = lmdb_store(tmp_path_factory.mktemp("routing") / "lmdb", sync=False, max_mailbox_items=1 << 30,
                      max_mailbox_bytes=1 << 40)
    for user, devices in (("alice@alpha", (1, 2)), ("bob@beta", (1,)), ("carol@beta", (1, 2, 3))):
        for device in devices:
            store.register_device(user, device, 5)
    # Rates high enough never to refuse: the buckets are still charged on every msg.
    domain = Domain(store=store, registry=ProviderRegistry([_provider("alpha"), _provider("beta")]), window=64,
                    max_frame_bytes=65535, max_group=1024, message_rate_per_device=1e12, message_rate_per_user=1e12,
                    overload_turn_messages=0, overload_refuse_after_s=0.0)
    yield domain
    store.close()


ALICE = FakeSession("alice@alpha", 1)
CASES = {
    "1 device": ({"to": "bob@beta", "c": {1: CIPHERTEXT}}, 1),
    "3 devices + 1 own copy": ({"to": "carol@beta", "c": {1: CIPHERTEXT, 2: CIPHERTEXT, 3: CIPHERTEXT},
                                "own": {2: CIPHERTEXT}}, 4),
}
REFUSED = {
    "device_mismatch": {"to": "carol@beta", "c": {1: CIPHERTEXT}},
    "unknown_recipient": {"to": "nobody@beta", "c": {1: CIPHERTEXT}},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.benchmark(group="routing decision: one 1:1 msg (handle_msg)")
def test_decision(benchmark, domain, case):
    fields, copies = CASES[case]
    stanza = {"t": "msg", "id": os.urandom(16), **fields}
    benchmark.extra_info.update(case=case, copies=copies)

    def setup():
        domain.take_batch(NOW_S)  # an empty batch, as after a commit (untimed)
        return (ALICE, stanza, NOW_S), {}

    benchmark.pedantic(domain.handle_msg, setup=setup, rounds=5000, warmup_rounds=100)
    # The decision: one message of the batch with a copy per device, each building its dlv.
    commit = domain.take_batch(NOW_S)
    (message,), ((_, _, targets),) = commit.batch.entries, commit.waiting
    assert len(message.items) == len(targets) == copies
    dkey, build = message.items[0]
    assert dkey == device_key(*targets[0])
    (dlv,) = decode_stanzas(build(7, 1234))
    assert dlv == {"t": "dlv", "seq": 7, "k": "msg", "id": stanza["id"], "from": "alice@alpha", "dev": 1, "ts": 1234,
                   "c": CIPHERTEXT}


@pytest.mark.parametrize("code", list(REFUSED))
@pytest.mark.benchmark(group="routing decision: one 1:1 msg refused (RouteError)")
def test_decision_refused(benchmark, domain, code):
    stanza = {"t": "msg", "id": os.urandom(16), **REFUSED[code]}
    benchmark.extra_info.update(case=code)
    domain.take_batch(NOW_S)

    def run():
        try:
            domain.handle_msg(ALICE, stanza, NOW_S)
        except RouteError as exc:
            return exc
        raise AssertionError(f"{code}: the router accepted the msg")

    assert benchmark(run).code == code
    assert domain.take_batch(NOW_S) is None  # a refusal adds nothing to the turn


@pytest.mark.benchmark(group="routing turn: 32 msgs routed + group commit (async) + acks")
def test_turn(benchmark, domain):
    benchmark.extra_info.update(messages=TURN, durability="async")
    sender = FakeSession("alice@alpha", 1)
    stanzas = []

    def setup():
        domain.take_batch(NOW_S)
        sender.take()
        stanzas[:] = [{"t": "msg", "id": os.urandom(16), "to": "bob@beta", "c": {1: CIPHERTEXT}} for _ in range(TURN)]
        return (), {}

    def turn():
        for stanza in stanzas:
            domain.handle_msg(sender, stanza, NOW_S)
        commit = domain.take_batch(NOW_S)
        domain.store.commit(commit.batch)
        domain.committed(commit)

    benchmark.pedantic(turn, setup=setup, rounds=300, warmup_rounds=5)
    acks = sender.received
    assert [ack["t"] for ack in acks] == ["ack"] * TURN and [ack["id"] for ack in acks] == [s["id"] for s in stanzas]
    assert not any(ack.get("dup") for ack in acks)
