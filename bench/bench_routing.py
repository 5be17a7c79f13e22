"""Routing decision of a 1:1 ``msg`` (``Router.handle_msg``), on the real Router, Policy and
LmdbStore (in a temporary folder) with a stand-in session that only has what the router reads
(``session_key``, ``conn.identity``) and records what it is sent.

    .venv/bin/python -m pytest bench/bench_routing.py --benchmark-only

- ``decision``: one ``handle_msg``: rate buckets, id and address checks, consent, the
  recipient's devices (cached by the store), block check, and the items (device key, dlv
  builder) added to the turn's batch. The router is held in the state of a loop turn whose
  commit is already scheduled (every msg of a busy turn but the first), so no event loop runs;
  the batch is emptied between rounds, untimed.
- ``turn``: 32 decisions and the group commit that follows them (``Router.commit`` inline,
  ``async`` durability: the CPU, not the fsync; bench_mailbox.py has ``sync``), which builds
  every dlv, writes LMDB and sends the 32 acks. Recipients are offline: the copies stay stored.

No compiled twin is on this path (1:1 routing uses none), so the rows record the implementation
the selector picked.
"""

from __future__ import annotations

import os

import pytest

from interlink.core.auth import Identity, Provider, ProviderRegistry
from interlink.core.policy import Policy
from interlink.core.router import RouteError, Router
from interlink.core.stanza import decode_stanzas
from interlink.core.store import LmdbStore, WriteBatch, device_key

CIPHERTEXT = os.urandom(200)
TURN = 32  # msgs routed in one loop turn before its commit
NOW_S = 1_800_000_000.0


class Conn:
    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.closed = False
        self.sent: list[dict] = []

    def send_stanza(self, stanza: dict) -> None:
        self.sent.append(stanza)


class Session:
    """What the router reads of a ``GatewayProtocol``."""

    def __init__(self, provider: str, localpart: str, device: int) -> None:
        self.conn = Conn(Identity(provider=provider, localpart=localpart, device=device, expires_at=NOW_S + 3600))
        self.session_key = (self.conn.identity.user, device)
        self.transport = object()

    def flush(self) -> None:
        """Nothing to write to: the acks stay in ``conn.sent``."""


def _provider(pid: str) -> Provider:
    return Provider(id=pid, issuer=f"https://{pid}.example", audience="gw", jwks_uri=f"https://{pid}.example/jwks",
                    default_accept=("*",))


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    store = LmdbStore(tmp_path_factory.mktemp("routing") / "lmdb", sync=False, max_mailbox_items=1 << 30,
                      max_mailbox_bytes=1 << 40)
    for user, devices in (("alice@alpha", (1, 2)), ("bob@beta", (1,)), ("carol@beta", (1, 2, 3))):
        for device in devices:
            store.register_device(user, device, 5)
    # Rates high enough never to refuse: the buckets are still charged on every msg.
    router = Router(store=store, registry=ProviderRegistry([_provider("alpha"), _provider("beta")]), sessions={},
                    paused={}, window=64, max_frame_bytes=65535, policy=Policy(store),
                    message_rate_per_device=1e12, message_rate_per_user=1e12, clock=lambda: NOW_S)
    router._commit_scheduled = True  # a turn whose commit is already scheduled: no loop needed
    yield router
    store.close()


def _new_turn(router: Router) -> None:
    """An empty batch, as after a commit (untimed, between rounds)."""
    router._batch, router._waiting = WriteBatch(), []


ALICE = Session("alpha", "alice", 1)
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
def test_decision(benchmark, router, case):
    fields, copies = CASES[case]
    stanza = {"t": "msg", "id": os.urandom(16), **fields}
    benchmark.extra_info.update(case=case, copies=copies)

    def setup():
        _new_turn(router)
        return (ALICE, stanza), {}

    benchmark.pedantic(router.handle_msg, setup=setup, rounds=5000, warmup_rounds=100)
    # The decision: one message of the batch with a copy per device, each building its dlv.
    (message,), ((_, _, targets),) = router._batch.messages, router._waiting
    assert len(message.items) == len(targets) == copies
    dkey, build = message.items[0]
    assert dkey == device_key(*targets[0])
    (dlv,) = decode_stanzas(build(7, 1234))
    assert dlv == {"t": "dlv", "seq": 7, "k": "msg", "id": stanza["id"], "from": "alice@alpha", "dev": 1, "ts": 1234,
                   "c": CIPHERTEXT}


@pytest.mark.parametrize("code", list(REFUSED))
@pytest.mark.benchmark(group="routing decision: one 1:1 msg refused (RouteError)")
def test_decision_refused(benchmark, router, code):
    stanza = {"t": "msg", "id": os.urandom(16), **REFUSED[code]}
    benchmark.extra_info.update(case=code)
    _new_turn(router)

    def run():
        try:
            router.handle_msg(ALICE, stanza)
        except RouteError as exc:
            return exc
        raise AssertionError(f"{code}: the router accepted the msg")

    assert benchmark(run).code == code
    assert not router._batch.messages  # a refusal adds nothing to the turn


@pytest.mark.benchmark(group="routing turn: 32 msgs routed + group commit (async) + acks")
def test_turn(benchmark, router):
    benchmark.extra_info.update(messages=TURN, durability="async")
    sender = Session("alpha", "alice", 1)
    stanzas = []

    def setup():
        _new_turn(router)
        router._commit_scheduled = True  # commit() cleared it
        sender.conn.sent.clear()
        stanzas[:] = [{"t": "msg", "id": os.urandom(16), "to": "bob@beta", "c": {1: CIPHERTEXT}} for _ in range(TURN)]
        return (), {}

    def turn():
        for stanza in stanzas:
            router.handle_msg(sender, stanza)
        router.commit()

    benchmark.pedantic(turn, setup=setup, rounds=300, warmup_rounds=5)
    acks = sender.conn.sent
    assert [ack["t"] for ack in acks] == ["ack"] * TURN and [ack["id"] for ack in acks] == [s["id"] for s in stanzas]
    assert not any(ack.get("dup") for ack in acks)
