"""The push sender (``core/edge/push.py``) against a real HTTP receiver on loopback
(``interlink.pushreceiver``, which verifies each body with the root public key) and a real
LMDB store: the body says who and how many, never what; coalescing; cancel; 2xx, 4xx, 404/410,
429 and 5xx; retry and backoff timings on a fake clock; the breaker; and what a restart sends."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from interlink.core.domain.auth import Provider, ProviderRegistry
from interlink.core.domain.batch import WriteBatch, device_key
from interlink.core.edge import push as push_module
from interlink.core.edge.push import BREAKER_FAILURES, BREAKER_OPEN_S, CLOSED, HALF_OPEN, OPEN, PushDispatcher
from interlink.pushreceiver import PushReceiver
from interlink.testing import FakeClock, PushKeys, lmdb_store

BOB = device_key("bob@alpha", 1)
CAROL = device_key("carol@alpha", 2)
SECRET_WORDS = (b"ciphertext-secret", "mallory@beta", "group-secret")


class World:
    """A store with registered devices holding items, a receiver, and the sender between them."""

    def __init__(self, tmp_path, receiver: PushReceiver, keys: PushKeys, **provider_options) -> None:
        self.store = lmdb_store(tmp_path / "lmdb", sync=False)
        self.receiver = receiver
        self.clock = FakeClock(1000.0)
        self.answered: list = []
        self.forgotten: list = []
        registry = ProviderRegistry([Provider(id="alpha", issuer="https://alpha.example", audience="gw",
                                              jwks_uri="https://alpha.example/jwks", push_url=receiver.url,
                                              **provider_options)])
        self.sender = PushDispatcher(store=self.store, registry=registry, sign=keys.sign, clock=self.clock,
                                     jitter=lambda: 1.0, answered=self._answered, forget=self.forgotten.append)

    def _answered(self, dkey, counter, again) -> None:
        self.answered.append((dkey, counter, again))
        batch = WriteBatch()
        batch.push_done.append((dkey, counter, again))
        self.store.commit(batch)
        if batch.push_created:
            self.sender.owed(batch.push_created, ())

    def owe(self, dkey: bytes, items: int = 1, token: bytes = b"token") -> list:
        """Store ``items`` for the device (from a sender the webhook must never name) and commit
        its intent, as the group commit does."""
        if self.store.push_token(dkey) is None:
            self.store.set_push_token(dkey, token)
        batch = WriteBatch()
        for i in range(items):
            build = lambda seq, ts: b"dlv from mallory@beta ciphertext-secret group-secret"  # noqa: E731
            batch.add_message(device_key("mallory@beta", 1), os.urandom(16), 5_000, [(dkey, build)])
        batch.push_wake.add(dkey)
        self.store.commit(batch)
        self.sender.owed(batch.push_created, batch.push_existing)
        return batch.push_created

    async def until(self, condition, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            self.sender.nudge()
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        await self.sender.close()
        self.store.close()


@pytest.fixture
def keys():
    return PushKeys()


@pytest.fixture
async def world(tmp_path, keys):
    async with PushReceiver(keys.root_public) as receiver:
        made = World(tmp_path, receiver, keys)
        made.sender.start()
        yield made
        await made.close()


async def test_a_push_says_who_and_how_many_never_what_and_verifies_with_the_root_key(world):
    world.owe(BOB, items=3)
    world.clock.advance(push_module.COALESCE_S)
    await world.until(lambda: world.receiver.received)
    (payload,) = world.receiver.received  # verified by the receiver with the root public key
    assert set(payload) == {"user", "device", "pending", "counter", "token", "iat"}
    assert (payload["user"], payload["device"], payload["pending"], payload["counter"], payload["token"]) == (
        "bob@alpha", 1, 3, 1, "token")
    assert not any(word in repr(payload) for word in map(str, SECRET_WORDS))
    await world.until(lambda: world.answered)
    assert world.answered == [(BOB, 1, False)] and world.store.push_intents() == []
    assert world.sender.counters["sent"] == 1 and world.sender.queued == 0


async def test_items_arriving_within_the_window_make_one_push(world):
    world.owe(BOB)
    world.clock.advance(0.1)
    world.owe(BOB, items=2)  # an intent is owed already: covered by it
    assert world.sender.counters["coalesced"] == 1
    await asyncio.sleep(0.05)
    assert world.receiver.requests == 0  # not before the window ends
    world.clock.advance(push_module.COALESCE_S)
    await world.until(lambda: world.answered)
    assert [p["pending"] for p in world.receiver.received] == [3]


async def test_a_device_that_connects_cancels_its_push(world):
    world.owe(BOB)
    world.sender.cancel(BOB)
    world.clock.advance(push_module.COALESCE_S)
    await asyncio.sleep(0.1)
    world.sender.nudge()
    await asyncio.sleep(0.05)
    assert world.receiver.requests == 0 and world.sender.counters["cancelled"] == 1


async def test_5xx_is_retried_with_exponential_backoff_then_delivered_with_the_same_counter(world):
    world.receiver.respond_with(503, times=3)
    world.owe(BOB)
    world.clock.advance(push_module.COALESCE_S)
    delays = []
    for attempt in range(1, 4):
        await world.until(lambda: world.receiver.requests == attempt and world.sender.due_in(BOB) is not None)
        delays.append(world.sender.due_in(BOB))
        world.clock.advance(delays[-1])
    assert delays == [2.0, 4.0, 8.0]  # base 1 s doubling, jitter at its top (1.0)
    await world.until(lambda: world.answered)
    assert [p["counter"] for p in world.receiver.received] == [1]
    assert world.sender.failures["http_5xx"] == 3 and world.sender.counters["retried"] == 3


async def test_429_waits_for_retry_after_and_other_4xx_are_not_retried(world):
    world.receiver.respond_with(429, retry_after=7, times=1)
    world.owe(BOB)
    world.clock.advance(push_module.COALESCE_S)
    await world.until(lambda: world.sender.due_in(BOB) is not None and world.receiver.requests == 1)
    assert world.sender.due_in(BOB) == pytest.approx(7.0)
    world.receiver.respond_with(400, times=1)
    world.clock.advance(7.0)
    await world.until(lambda: world.answered)
    assert world.answered == [(BOB, 1, False)] and world.receiver.requests == 2
    assert world.sender.dropped["http_400"] == 1 and world.store.push_intents() == []


@pytest.mark.parametrize("status", [404, 410])
async def test_404_and_410_forget_the_token(world, status):
    world.receiver.respond_with(status, times=1)
    world.owe(BOB)
    world.clock.advance(push_module.COALESCE_S)
    await world.until(lambda: world.forgotten)
    assert world.forgotten == [BOB] and world.sender.dropped["token_gone"] == 1


async def _open_breaker(world) -> None:
    world.receiver.respond_with(500)
    world.owe(BOB)
    world.clock.advance(push_module.COALESCE_S)
    for attempt in range(1, BREAKER_FAILURES + 1):
        await world.until(lambda: world.receiver.requests == attempt and world.sender.due_in(BOB) is not None)
        if attempt < BREAKER_FAILURES:
            world.clock.advance(world.sender.due_in(BOB))
    assert world.sender.breaker_states() == {"alpha": OPEN}


async def test_a_failing_provider_opens_its_breaker_and_a_probe_closes_it(world):
    await _open_breaker(world)
    world.owe(CAROL)  # another device of the same provider waits for the breaker too
    world.clock.advance(push_module.COALESCE_S)
    world.sender.nudge()
    await asyncio.sleep(0.1)
    assert world.receiver.requests == BREAKER_FAILURES
    # (spread over a second after the breaker's 30 s, so a backlog does not come due at once)
    assert world.sender.due_in(CAROL) == pytest.approx(BREAKER_OPEN_S - push_module.COALESCE_S + 1.0, abs=1e-6)
    world.receiver.reset()
    world.clock.advance(world.sender.due_in(CAROL))  # carol's push is the probe; it closes the breaker
    await world.until(lambda: len(world.answered) == 1)
    assert world.answered[0][0] == CAROL and world.sender.breaker_states() == {"alpha": CLOSED}
    world.clock.advance(world.sender.due_in(BOB))  # bob's retry keeps its own backoff
    await world.until(lambda: len(world.answered) == 2)
    assert sorted(p["user"] for p in world.receiver.received) == ["bob@alpha", "carol@alpha"]


async def test_an_intent_whose_items_are_gone_is_dropped_without_a_request(world):
    world.owe(BOB)
    batch = WriteBatch()
    batch.delete(BOB, [1])  # received on another path before the window ended
    world.store.commit(batch)
    world.clock.advance(push_module.COALESCE_S)
    await world.until(lambda: world.answered)
    assert world.receiver.requests == 0 and world.sender.dropped["nothing_pending"] == 1


async def test_what_was_owed_before_a_restart_is_sent_after_it_with_the_same_counter(tmp_path, keys):
    async with PushReceiver(keys.root_public) as receiver:
        first = World(tmp_path, receiver, keys)
        first.owe(BOB)
        first.store.close()  # gone before sending (a crash after the commit)
        second = World(tmp_path, receiver, keys)
        second.sender.start()
        await second.until(lambda: second.answered)
        assert [(p["user"], p["counter"]) for p in receiver.received] == [("bob@alpha", 1)]
        await second.close()


@pytest.mark.parametrize("how", ["items_gone", "device_connected"])
async def test_a_probe_that_ends_without_an_answer_lets_the_next_one_probe(world, how):
    """The half-open breaker's probe may end without the provider's answer (its device's items
    went, or the device connected): the breaker must not stay half-open for good."""
    await _open_breaker(world)
    world.receiver.reset()
    if how == "items_gone":
        batch = WriteBatch()
        batch.delete(BOB, [1])
        world.store.commit(batch)
        world.clock.advance(world.sender.due_in(BOB) + 0.01)  # bob's retry is the probe
        await world.until(lambda: world.sender.dropped["nothing_pending"] == 1)
    else:
        world.receiver.set_delay(0.3)
        world.clock.advance(world.sender.due_in(BOB) + 0.01)
        await world.until(lambda: world.sender.breaker_states() == {"alpha": HALF_OPEN}
                          and world.sender.due_in(BOB) is None)
        world.sender.cancel(BOB)  # bob connects while the probe is in flight
        await asyncio.sleep(0.5)
        world.receiver.set_delay(0)
    world.owe(CAROL)
    for _ in range(5):
        world.clock.advance(1.0)
        world.sender.nudge()
        await asyncio.sleep(0.05)
    await world.until(lambda: any(p["user"] == "carol@alpha" for p in world.receiver.received))
    assert world.sender.breaker_states() == {"alpha": CLOSED}


async def test_an_open_breaker_also_holds_back_what_waited_for_a_free_slot(tmp_path, keys):
    async with PushReceiver(keys.root_public) as receiver:
        world = World(tmp_path, receiver, keys, push_timeout_s=0.1, push_concurrency=1)
        world.sender.start()
        receiver.set_delay(5)  # hangs: every request times out
        for i in range(12):
            world.owe(device_key(f"u{i}@alpha", 1))
        world.clock.advance(push_module.COALESCE_S)  # then the fake clock stands: the breaker stays open
        world.sender.nudge()
        await world.until(lambda: world.sender.breaker_states() == {"alpha": OPEN})
        await asyncio.sleep(0.5)
        assert receiver.requests == BREAKER_FAILURES  # not one request per queued intent
        receiver.reset()
        await world.close()


async def test_a_retry_after_of_zero_still_waits_a_second(world):
    world.receiver.respond_with(429, retry_after=0, times=1)
    world.owe(BOB)
    world.clock.advance(push_module.COALESCE_S)
    await world.until(lambda: world.receiver.requests == 1 and world.sender.due_in(BOB) is not None)
    assert world.sender.due_in(BOB) == pytest.approx(1.0)
    await asyncio.sleep(0.1)
    assert world.receiver.requests == 1  # no tight loop


def test_retry_after_is_read_strictly():
    assert push_module._retry_after("7", 0.0) == 7.0
    assert push_module._retry_after(" 12 ", 0.0) == 12.0
    assert push_module._retry_after("²", 0.0) is None  # a digit to str.isdigit, not to HTTP
    assert push_module._retry_after("-3", 0.0) is None and push_module._retry_after("soon", 0.0) is None
    assert push_module._retry_after("Thu, 01 Jan 1970 00:01:40 GMT", 40.0) == pytest.approx(60.0)
