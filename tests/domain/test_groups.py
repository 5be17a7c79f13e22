"""Groups on the real Domain (Router, Groups, Policy) and LmdbStore with fake sessions
(``interlink.testing.FakeSession``: they record what they are sent) and the edge's real commit
driver: what is built from a change still committing on the writer thread (and refused if it
fails), mailbox quotas, amplification, blocks, dedup before membership, typing, and the
per-(g, ver) plan cache."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections import Counter

import pytest

from interlink.core.domain.auth import Provider, ProviderRegistry
from interlink.core.domain.batch import device_key
from interlink.core.edge.commit import CommitDriver
from interlink.core.domain.dispatch import Domain
from interlink.core.errors import StoreFullError
from interlink.core.edge.lmdbstore import LmdbStore
from interlink.core.domain import ops as ops_module
from interlink.core.domain.ops import DEFERRED
from interlink.core.domain.router import RouteError
from interlink.core.protocol.stanza import encode_stanza
from interlink.testing import DEFAULTS, FakeClock, FakeSession, store_options


class FlakyStore(LmdbStore):
    """Real LMDB; the next commit can be held on a gate and made to fail (a full map)."""

    gate: threading.Event | None = None
    fail_next = False

    def commit(self, batch):
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise StoreFullError("the gateway's storage is full; try again later")
        return super().commit(batch)


def _provider(pid: str) -> Provider:
    return Provider(id=pid, issuer=f"https://{pid}.example", audience="a", jwks_uri=f"https://{pid}.example/jwks",
                    default_accept=("*",))


class World:
    """The domain as the edge drives it: each call, then the turn's commit scheduled and the
    touched sessions written out (counted per session in ``writes``)."""

    def __init__(self, path, *, thread=False, rate=1e9, clock=None, **store_kw) -> None:
        self.store = FlakyStore(path, **store_options(sync=False, map_size_bytes=1 << 26, **store_kw))
        self.clock = clock or time.time
        self.domain = Domain(
            store=self.store, registry=ProviderRegistry([_provider("alpha"), _provider("beta")]), window=1000,
            max_frame_bytes=65535, max_group=1024, message_rate_per_device=rate, message_rate_per_user=rate,
            overload_turn_messages=DEFAULTS.overload_turn_messages, overload_refuse_after_s=DEFAULTS.overload_refuse_after_s,
        )
        self.router, self.groups, self.policy = self.domain.router, self.domain.groups, self.domain.policy
        self.executor = concurrent.futures.ThreadPoolExecutor(1) if thread else None
        self.writes: Counter = Counter()
        self.commits = CommitDriver(store=self.store, domain=self.domain, on_done=self._write_out, executor=self.executor)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
        self.store.close()

    def _write_out(self) -> None:
        self.writes.update(self.router.take_touched())

    def _served(self) -> None:
        self.commits.schedule()
        self._write_out()

    def connect(self, user: str, device: int = 1, online: bool = True) -> FakeSession:
        self.store.register_device(user, device, 5)
        session = FakeSession(user, device)
        if online:
            self.router.open_session(session)
        return session

    def iq(self, session: FakeSession, op: str, _id: int = 1, **fields):
        """Like the server's iq dispatch: the immediate answer, or None when deferred."""
        try:
            result = self.groups.handlers[op](session, {"t": "iq", "id": _id, "op": op, **fields}, self.clock())
        except RouteError as exc:
            return {"t": "err", "code": exc.code, "id": _id, **exc.fields}
        finally:
            self._served()
        return None if result is DEFERRED else {"t": "res", "id": _id, **(result or {})}

    def msg(self, session: FakeSession, g: bytes, body: bytes = b"x", mid: bytes | None = None):
        mid = mid or os.urandom(16)
        try:
            self.domain.handle_msg(session, {"t": "msg", "id": mid, "g": g, "b": body}, self.clock())
        except RouteError as exc:
            return {"t": "err", "code": exc.code, **exc.fields}
        finally:
            self._served()
        return mid

    def direct(self, session: FakeSession, **stanza) -> None:
        """A 1:1 msg, answered later (its ack or err after the commit)."""
        self.domain.dispatch(session, {"t": "msg", **stanza}, self.clock())
        self._served()

    def recv(self, session: FakeSession, seqs: list[int]) -> None:
        self.router.handle_recv(session, {"t": "recv", "seq": seqs}, self.clock())
        self._served()

    def state(self, session: FakeSession, g: bytes, s: str = "composing"):
        try:
            self.domain.handle_state(session, {"t": "state", "g": g, "s": s}, self.clock())
        except RouteError as exc:
            return {"t": "err", "code": exc.code}
        finally:
            self._served()
        return None

    async def settle(self) -> None:
        await self.commits.settle()
        await asyncio.sleep(0)


@pytest.fixture
def world(tmp_path):
    made = []

    def make(**kw) -> World:
        w = World(tmp_path / f"lmdb{len(made)}", **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def last(session: FakeSession, **match):
    for stanza in reversed(session.received):
        if all(stanza.get(k) == v for k, v in match.items()):
            return stanza
    return None


def kinds(session: FakeSession, k: str) -> list[dict]:
    return [s for s in session.received if s.get("t") == "dlv" and s.get("k") == k]


async def new_group(w: World, creator: FakeSession, members: list[str], **fields) -> bytes:
    assert w.iq(creator, "group.new", _id=99, members=members, **fields) is None
    await w.settle()
    return last(creator, t="res", id=99)["g"]


# -- thread commit mode: entries built from a change whose commit then fails


@pytest.mark.parametrize("op", ["group.del", "group.add"])
async def test_thread_mode_entries_built_from_a_failed_change_are_refused(world, op):
    w = world(thread=True)
    alice, bob, carl, mallory = (w.connect(u) for u in ("alice@alpha", "bob@beta", "carl@beta", "mallory@beta"))
    g = await new_group(w, alice, ["bob@beta", "mallory@beta"])
    for p in (alice, bob, carl, mallory):
        p.received.clear()
    users = ("alice@alpha", "mallory@beta", "carl@beta")
    before = [w.store.pending_count(device_key(user, 1)) for user in users]
    w.store.gate = threading.Event()
    w.store.fail_next = True
    target = "mallory@beta" if op == "group.del" else "carl@beta"
    assert w.iq(alice, op, _id=2, g=g, members=[target]) is None
    await asyncio.sleep(0)  # the change's batch goes to the writer thread, held on the gate
    assert w.groups._dirty  # still committing
    mid = w.msg(bob, g, b"sent after the change")  # built from the uncommitted record
    assert w.iq(bob, "group.get", _id=3, g=g) is None  # deferred behind the change
    assert w.iq(alice, op, _id=4, g=g, members=[target]) is None  # a no-op answer, deferred too
    await asyncio.sleep(0)
    w.store.gate.set()
    await w.settle()
    w.store.gate = None
    assert last(alice, id=2)["code"] == "overloaded"
    # The message: nothing stored anywhere, the sender told to resend (same id).
    assert last(bob, ref=mid)["code"] == "overloaded"
    assert last(bob, t="ack") is None
    assert kinds(mallory, "msg") == [] and kinds(carl, "msg") == [] and kinds(alice, "msg") == []
    assert [w.store.pending_count(device_key(user, 1)) for user in users] == before
    # The answers that would have shown the change that never committed.
    assert last(bob, id=3)["code"] == "overloaded"
    assert last(alice, id=4)["code"] == "overloaded"
    assert w.store.group(g).ver == 1
    # The resend with the same id is stored now, for the real (unchanged) members.
    assert w.msg(bob, g, b"sent after the change", mid) == mid
    await w.settle()
    assert last(bob, t="ack", id=mid) is not None and "dup" not in last(bob, t="ack", id=mid)
    assert [s["c"] for s in kinds(mallory, "msg")] == [b"sent after the change"]
    assert kinds(carl, "msg") == []


async def test_thread_mode_entries_built_from_a_change_that_commits_are_kept(world):
    w = world(thread=True)
    alice, bob, carl = (w.connect(u) for u in ("alice@alpha", "bob@beta", "carl@beta"))
    g = await new_group(w, alice, ["bob@beta"])
    w.store.gate = threading.Event()
    assert w.iq(alice, "group.add", _id=2, g=g, members=["carl@beta"]) is None
    await asyncio.sleep(0)
    mid = w.msg(bob, g, b"hello carl")
    assert w.iq(bob, "group.get", _id=3, g=g) is None
    await asyncio.sleep(0)
    w.store.gate.set()
    await w.settle()
    w.store.gate = None
    assert last(bob, t="ack", id=mid) is not None
    assert [s["c"] for s in kinds(carl, "msg")] == [b"hello carl"]
    assert last(bob, id=3)["ver"] == 2


# -- quotas


async def test_a_full_member_mailbox_skips_that_device_instead_of_refusing_the_group(world):
    w = world(max_mailbox_items=5)
    alice, bob = w.connect("alice@alpha"), w.connect("bob@beta")
    w.connect("dormant@beta", 7, online=False)
    g = await new_group(w, alice, ["bob@beta", "dormant@beta"])
    for i in range(10):
        mid = w.msg(bob, g, b"m%d" % i)
        await w.settle()
        assert last(bob, id=mid) == {"t": "ack", "id": mid, "ts": last(bob, id=mid)["ts"]}  # plain ack
        # alice receives, so her mailbox never fills
        seqs = [s["seq"] for s in kinds(alice, "msg")]
        w.recv(alice, seqs)
        await w.settle()
    assert [s["c"] for s in kinds(alice, "msg")] == [b"m%d" % i for i in range(10)]
    assert w.store.pending_count(device_key("dormant@beta", 7)) == 5  # the created event + 4 messages
    assert w.router.counters["group_copies_dropped_full"] == 6
    # 1:1 stays all or nothing
    mid = os.urandom(16)
    w.direct(bob, id=mid, to="dormant@beta", c={7: b"hi"})
    await w.settle()
    assert last(bob, ref=mid)["code"] == "mailbox_full"


async def test_membership_changes_are_rate_limited_per_group(world):
    clock = FakeClock(1000.0)
    w = world(max_mailbox_items=20, clock=clock)
    alice = w.connect("alice@alpha")
    w.connect("victim@beta", online=False)
    w.connect("x@alpha")
    g = await new_group(w, alice, ["victim@beta"])
    answers = []
    for i in range(100):
        for op in ("group.add", "group.del"):
            answer = w.iq(alice, op, _id=1000 + len(answers), g=g, members=["x@alpha"])
            answers.append(None if answer is None else answer.get("code", "unchanged"))
            await w.settle()
    assert answers[:20] == [None] * 20  # the burst, then every add is rate_limited (and del changes nothing)
    assert answers[20:] == ["rate_limited", "unchanged"] * 90
    assert w.store.pending_count(device_key("victim@beta", 1)) == 21  # created + 20 events: bounded
    clock.advance(1.0)  # ten more a second
    allowed = [w.iq(alice, "group.add" if i % 2 == 0 else "group.del", _id=5000 + i, g=g, members=["x@alpha"])
               for i in range(12)]
    assert allowed[:10] == [None] * 10 and allowed[10]["code"] == "rate_limited"
    await w.settle()


async def test_events_to_a_dormant_mailbox_stop_at_the_control_overdraft(world):
    w = world(max_mailbox_items=3, control_overdraft_items=2)
    alice, bob = w.connect("alice@alpha"), w.connect("bob@beta")
    w.connect("dormant@beta", 7, online=False)
    groups = []
    for i in range(8):  # eight groups, so that no per-group change rate is in the way
        w.iq(alice, "group.new", _id=200 + i, members=["bob@beta", "dormant@beta"])
        await w.settle()
        groups.append(last(alice, t="res", id=200 + i)["g"])
        w.recv(bob, [s["seq"] for s in kinds(bob, "group")])  # bob keeps up
        await w.settle()
    dormant = device_key("dormant@beta", 7)
    # quota 3 + overdraft 2: the first five events are stored, the other three skipped and counted
    assert w.store.pending_count(dormant) == 5
    assert w.router.counters["group_events_dropped_full"] == 3
    assert [s["g"] for s in kinds(bob, "group")] == groups  # everyone else got every event
    assert all(w.store.group(g).member_set == {"alice@alpha", "bob@beta", "dormant@beta"} for g in groups)


# -- amplification


async def test_a_group_message_costs_one_rate_token_per_64_copies(world):
    w = world(rate=50.0, clock=FakeClock(1000.0))  # burst 100 tokens, no refill (the clock stands still)
    sender = w.connect("mallory@alpha")
    users = [f"u{i:03d}@alpha" for i in range(640)]
    for user in users:
        w.connect(user, online=False)
    w.router.device_buckets = type(w.router.device_buckets)(100, 50.0)
    g = await new_group(w, sender, users)
    answers = []
    for _ in range(12):
        answer = w.msg(sender, g, b"x")
        answers.append("ack" if type(answer) is bytes else answer["code"])
    await w.settle()
    # each message: 640 copies = 10 tokens; ~99 tokens left after group.new: 9 messages, then refused
    assert answers[:9] == ["ack"] * 9
    assert answers[9:] == ["rate_limited"] * 3
    assert w.store.pending_count(device_key("u000@alpha", 1)) == 1 + 9


async def test_a_change_of_a_large_group_costs_its_events_copies_as_a_message_does(world):
    """One token per 64 copies of its event (a change cost one token whatever it stored: a
    review filled a member node's outbox share with 116 KB per token); refused, it spends none
    of them and changes nothing."""
    w = world(rate=50.0, clock=FakeClock(1000.0))  # no refill: the clock stands still
    sender = w.connect("mallory@alpha")
    users = [f"u{i:03d}@alpha" for i in range(640)]
    for user in users:
        w.connect(user, online=False)
    w.router.device_buckets = type(w.router.device_buckets)(25, 50.0)
    buckets = w.router.device_buckets
    g = await new_group(w, sender, users)  # the created event: 640 copies, 10 tokens
    assert buckets.tokens(sender.session_key, 1000.0) == 15
    assert w.iq(sender, "group.del", _id=5, g=g, members=[users[0]]) is None  # 640 copies (the removed one's too)
    await w.settle()
    assert last(sender, id=5)["t"] == "res" and buckets.tokens(sender.session_key, 1000.0) == 5
    changes = w.domain.groups.change_buckets
    group_tokens = changes.tokens(g, 1000.0)
    refused = w.iq(sender, "group.del", _id=6, g=g, members=[users[1]])
    assert (refused["t"], refused["code"], refused["retry_after"]) == ("err", "rate_limited", 120)  # 10 of 4, at 50/s
    assert changes.tokens(g, 1000.0) == group_tokens  # nor did it spend one of the group's changes
    await w.settle()
    assert users[1] in w.store.group(g).member_set and buckets.tokens(sender.session_key, 1000.0) == 4


async def test_typing_in_a_large_group_costs_a_token_per_64_members_and_is_dropped_past_the_rate(world):
    w = world(rate=50.0, clock=FakeClock(1000.0))  # no refill: the clock stands still
    sender = w.connect("mallory@alpha")
    users = [f"u{i:03d}@alpha" for i in range(640)]
    watcher = w.connect(users[0])
    for user in users[1:]:
        w.connect(user, online=False)
    first, second = await new_group(w, sender, users), await new_group(w, sender, users)
    w.router.device_buckets = type(w.router.device_buckets)(15, 50.0)
    buckets = w.router.device_buckets
    assert w.state(sender, first) is None  # 1 + 9 tokens: 640 members, the sender not counted
    assert buckets.tokens(sender.session_key, 1000.0) == 5
    assert w.state(sender, second) is None  # 1 spent, 9 missing: dropped, silently as typing goes
    assert [s["g"] for s in watcher.received if s.get("t") == "state"] == [first]
    assert w.router.counters["group_states_dropped"] == 1 and buckets.tokens(sender.session_key, 1000.0) == 4


async def test_a_large_group_message_refused_for_its_copies_passes_once_its_retry_after_passed(world):
    """The copies' tokens are taken at once: a refusal spends none of them, and its retry_after is
    the wait for them and the message's own token (a resend spends that again first), so a client
    that waits it out gets through — taking them one at a time, every try spent one and was
    refused again. A cost the burst cannot hold spends the whole burst rather than never passing."""
    clock = FakeClock(1000.0)
    w = world(rate=50.0, clock=clock)
    sender = w.connect("mallory@alpha")
    users = [f"u{i:03d}@alpha" for i in range(640)]
    for user in users:
        w.connect(user, online=False)
    g = await new_group(w, sender, users)
    w.router.device_buckets = type(w.router.device_buckets)(12, 1.0)  # 12 tokens, one a second
    assert type(w.msg(sender, g, b"first")) is bytes  # 1 + 9 tokens (640 copies): 2 left
    refused = w.msg(sender, g, b"second")  # 1 spent, 1 left: 9 more are missing
    assert refused["code"] == "rate_limited" and refused["retry_after"] == 9000  # 10 tokens, 1 there
    clock.advance(9.0)
    assert type(w.msg(sender, g, b"second")) is bytes
    w.router.device_buckets = type(w.router.device_buckets)(6, 1.0)  # now under one message's 10 tokens
    assert type(w.msg(sender, g, b"third")) is bytes  # the whole burst
    assert w.msg(sender, g, b"fourth")["retry_after"] == 1000  # its own token is not there
    clock.advance(1.0)
    refused = w.msg(sender, g, b"fourth")
    assert refused["code"] == "rate_limited" and refused["retry_after"] == 6000  # the burst, not 10 tokens
    clock.advance(6.0)
    assert type(w.msg(sender, g, b"fourth")) is bytes
    await w.settle()
    assert w.store.pending_count(device_key("u000@alpha", 1)) == 1 + 4


async def test_a_group_body_over_16_kib_is_too_large(world):
    w = world()
    alice = w.connect("alice@alpha")
    w.connect("bob@beta")
    g = await new_group(w, alice, ["bob@beta"])
    assert w.msg(alice, g, b"x" * (16 << 10) + b"x")["code"] == "too_large"
    assert type(w.msg(alice, g, b"x" * (16 << 10))) is bytes
    await w.settle()


async def test_group_typing_is_limited_per_sender_and_group_and_flushed_once(world):
    clock = FakeClock(1000.0)
    w = world(clock=clock)
    alice = w.connect("alice@alpha")
    bob1, bob2 = w.connect("bob@beta", 1), w.connect("bob@beta", 2)
    g = await new_group(w, alice, ["bob@beta"])
    for p in (bob1, bob2):
        p.received.clear()
    w.writes.clear()
    for _ in range(5):
        assert w.state(alice, g) is None
    assert [s["t"] for s in bob1.received] == ["state"] and w.writes[bob1] == 1
    assert [s["t"] for s in bob2.received] == ["state"] and w.writes[bob2] == 1
    clock.advance(1.0)
    assert w.state(alice, g, "paused") is None
    assert [s["s"] for s in bob1.received] == ["composing", "paused"]


# -- blocks


@pytest.fixture(params=[1024, 0], ids=["blockers-set", "per-member"])
def blockers_limit(request):
    """The policy's reverse look-up (who blocked the sender) as a cached set, or past its limit
    (every member asked)."""
    return request.param


async def test_events_and_meta_from_a_blocked_actor_do_not_reach_the_blocker(world, blockers_limit):
    w = world()
    mallory, victim, other = w.connect("mallory@alpha"), w.connect("victim@alpha"), w.connect("other@alpha")
    w.policy.cached_blockers = blockers_limit
    w.policy.block("victim@alpha", "mallory@alpha", 100)
    g = await new_group(w, mallory, ["victim@alpha", "other@alpha"], meta=b"blocked user's text")
    assert w.iq(mallory, "group.del", _id=2, g=g, members=["other@alpha"]) is None
    await w.settle()
    assert w.iq(mallory, "group.add", _id=3, g=g, members=["other@alpha"]) is None
    await w.settle()
    assert w.msg(mallory, g, b"hi") is not None
    await w.settle()
    assert [s for s in victim.received if s.get("t") == "dlv"] == []
    assert w.store.pending_count(device_key("victim@alpha", 1)) == 0
    assert "victim@alpha" in w.store.group(g).member_set  # still a member
    assert [s["event"] for s in kinds(other, "group")] == ["created", "removed", "added"]
    # The victim's own changes reach mallory (only the blocker is spared).
    assert w.iq(victim, "group.leave", _id=4, g=g) is None
    await w.settle()
    assert last(mallory, k="group", event="left") is not None


# -- resends after a removal, typing while a change commits


async def test_a_resend_after_removal_answers_dup_not_not_member(world):
    w = world()
    alice, bob = w.connect("alice@alpha"), w.connect("bob@beta")
    g = await new_group(w, alice, ["bob@beta"])
    mid = w.msg(bob, g, b"once")
    await w.settle()
    assert w.iq(alice, "group.del", _id=2, g=g, members=["bob@beta"]) is None
    await w.settle()
    assert w.msg(bob, g, b"once", mid) == mid
    await w.settle()
    assert last(bob, id=mid, dup=True) is not None
    assert w.msg(bob, g, b"new")["code"] == "not_member"  # a new message is still refused


async def test_typing_does_not_reveal_a_change_still_committing(world):
    w = world(thread=True)
    alice, bob, carl = (w.connect(u) for u in ("alice@alpha", "bob@beta", "carl@beta"))
    g = await new_group(w, alice, ["bob@beta"])
    w.store.gate = threading.Event()
    w.store.fail_next = True
    assert w.iq(alice, "group.add", _id=2, g=g, members=["carl@beta"]) is None
    await asyncio.sleep(0)
    assert w.state(bob, g) is None
    w.store.gate.set()
    await w.settle()
    w.store.gate = None
    assert [s for s in carl.received if s.get("t") == "state"] == []
    assert last(alice, t="state") is not None


# -- the per-(g, ver) plan cache


async def test_the_plan_follows_new_devices_and_blocks(world, blockers_limit):
    w = world()
    w.policy.cached_blockers = blockers_limit
    alice, bob = w.connect("alice@alpha"), w.connect("bob@beta")
    g = await new_group(w, alice, ["bob@beta"])
    assert type(w.msg(alice, g, b"one")) is bytes
    await w.settle()
    bob2 = w.connect("bob@beta", 2)  # a new device after the plan was made
    assert type(w.msg(alice, g, b"two")) is bytes
    await w.settle()
    assert [s["c"] for s in kinds(bob2, "msg")] == [b"two"]
    w.policy.block("bob@beta", "alice@alpha", 100)
    assert type(w.msg(alice, g, b"three")) is bytes
    await w.settle()
    assert [s["c"] for s in kinds(bob, "msg")] == [b"one", b"two"]
    w.policy.unblock("bob@beta", "alice@alpha")
    assert type(w.msg(alice, g, b"four")) is bytes
    await w.settle()
    assert [s["c"] for s in kinds(bob, "msg")] == [b"one", b"two", b"four"]


async def test_many_group_gets_in_one_read_are_answered_up_to_a_budget(world):
    # a read of 256 KiB holds about 4,000 small group.get requests; their answers are larger than
    # they are: past ANSWERS_PER_READ_BYTES of answers in one read, the rest is rate_limited
    w = world()
    alice = w.connect("alice@alpha")
    members = [f"member{i:04d}-with-a-long-localpart@beta" for i in range(120)]
    for member in members:
        w.connect(member)
    g = await new_group(w, alice, members)
    alice.received.clear()
    now = time.time()
    for request in range(400):
        w.domain.dispatch(alice, {"t": "iq", "id": request, "op": "group.get", "g": g}, now)
    answers = alice.take()
    served = [a for a in answers if a["t"] == "res"]
    refused = [a for a in answers if a["t"] == "err"]
    answer_bytes = len(encode_stanza(served[0]))
    assert len(served) == ops_module.ANSWERS_PER_READ_BYTES // answer_bytes + 1
    assert refused and {(a["code"], a["retry_after"]) for a in refused} == {("rate_limited", 10)}
    w.domain.dispatch(alice, {"t": "iq", "id": 999, "op": "group.get", "g": g}, now + 0.001)  # the next read
    assert alice.take()[0]["t"] == "res"
