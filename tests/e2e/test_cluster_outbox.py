"""A group home's durable fan-out outbox end to end (issue 18; ``core/domain/outbox.py``): three
gateway nodes, a real nats-server, LMDB, SDK clients over TCP; each group lives on node-a, whose
commit acks the sender and writes an outbox entry per other member node, sent until stored.

* A member node is stopped while messages and membership changes are acked; back, its members get
  each once, in order, and members on live nodes got them at once.
* The group's home restarts while entries for a down member node wait: they outlive it.
* NATS restarts, or stalls (SIGSTOP: every entry then arrives at least twice), while entries are in
  flight: every member device gets every message and event once, in order.
* A slow member node answers the home's previous run after the home restarted: the answer must
  not be taken for the new run's relay of the same number (it is, today: that test fails).

"Once" is checked where the copies are stored (each mailbox holds exactly the expected items) and
by clients without ``auto_recv`` (which would drop a redelivered id, hiding a duplicate)."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading

import pytest

import interlink.core.domain.relay as relay_module
from interlink.testing import until
from interlink.client import Client
from interlink.core.domain.batch import device_key
from interlink.core.domain.outbox import WINDOW_ENTRIES
from e2e.test_cluster import NODES, Cluster
from e2e.test_cluster import nats_server as nats_fixture
from three_providers import close_all, nothing_arrives

nats_server = nats_fixture  # the suite's fixture (a nats-server child), under its name here

HOME, DOWN, THIRD = NODES  # the group's home, a member node that goes down, the sender's node
TIMEOUT_S = 1.0  # the cluster's request_timeout_s: how soon a window sent to a node that is down times out
WAIT_S = 30.0  # a generous bound for what must happen eventually (never an assertion about speed)


@pytest.fixture
async def cluster(issuers, tmp_path, nats_server):
    cluster = Cluster(issuers, tmp_path, nats_server.url)
    for node in NODES:
        await cluster.start(node, timeout_s=TIMEOUT_S)
    yield cluster
    await cluster.stop_all()


def group_homed_on(cluster: Cluster, node: str, monkeypatch) -> bytes:
    """The id the next ``group.new`` gets (drawn by the creator's node): one homed on ``node``."""
    g = next(g for g in iter(lambda: os.urandom(16), None) if cluster.membership.home(g) == node)
    monkeypatch.setattr(relay_module, "new_group_id", lambda: g)
    return g


def relay_of(cluster: Cluster, node: str):
    return cluster.gateways[node]._server.domain.relay


def store_of(cluster: Cluster, node: str):
    return cluster.gateways[node]._server.store


wait_until = functools.partial(until, timeout_s=WAIT_S)  # a hang guard, never an assertion about speed


async def quiet(cluster: Cluster, address: str, device: int = 1) -> Client:
    """A device that confirms what it reads itself (``read``): a redelivery is handed out, not dropped."""
    return await cluster.connect(address, device, auto_recv=False)


async def read(client: Client, count: int) -> list[dict]:
    """The next ``count`` deliveries, each confirmed once read (whatever the push window is)."""
    got = []
    for _ in range(count):
        stanza = await client.recv(timeout_s=10.0)
        assert stanza["t"] == "dlv", stanza
        got.append(stanza)
        await client.received([stanza["seq"]])
    assert [d["seq"] for d in got] == sorted(set(d["seq"] for d in got)), got  # the mailbox's order
    return got


def seen(deliveries: list[dict]) -> list[tuple]:
    """What a device got, comparable with what was sent: (msg, body) or (group, event, ver)."""
    return [("msg", d["c"]) if d["k"] == "msg" else ("group", d["event"], d["ver"]) for d in deliveries]


def pending(cluster: Cluster, user: str, device: int = 1) -> int:
    """Items in the device's mailbox on its home node (stored, not yet confirmed)."""
    return store_of(cluster, cluster.home(user)).pending_count(device_key(user, device))


def backlog(cluster: Cluster, node: str) -> int:
    """Entries of ``HOME``'s outbox that ``node`` has not confirmed."""
    return relay_of(cluster, HOME).outbox.streams[node].backlog


class Group:
    """A group's senders, and what each member device should get from them, in the order sent."""

    def __init__(self, g: bytes) -> None:
        self.g = g
        self.sent: list[tuple] = []  # (msg, body) or (group, event, ver), in the order acked
        self.by: dict[tuple, Client] = {}  # item -> the device that sent it
        self.acks: dict[bytes, dict] = {}  # body -> its ack

    async def say(self, client: Client, body: bytes) -> None:
        ack = await client.send_group_message(self.g, body)
        assert ack["t"] == "ack" and "dup" not in ack, ack
        self.acks[body] = ack
        self._add(("msg", body), client)

    async def change(self, client: Client, op: str, ver: int, event: str, **fields) -> None:
        res = await client.iq(op, g=self.g, **fields)
        assert res["t"] == "res" and res["ver"] == ver, res
        self._add(("group", event, ver), client)

    def _add(self, item: tuple, client: Client) -> None:
        assert item not in self.by
        self.sent.append(item)
        self.by[item] = client

    def items(self, start: int = 0, end: int | None = None, *, but: Client | None = None) -> list[tuple]:
        """What was sent from ``start`` to ``end``, without what ``but`` (a device) sent itself."""
        return [item for item in self.sent[start:end] if but is None or self.by[item] is not but]

    def check(self, deliveries: list[dict], expected: list[tuple]) -> None:
        """``deliveries`` are ``expected`` in order, each from its sender, each message with its ack's id and time."""
        assert seen(deliveries) == expected
        for d, item in zip(deliveries, expected):
            sender = self.by[item]
            assert d["g"] == self.g and (d["from"], d["dev"]) == (sender.user, sender.device), d
            if d["k"] == "msg":
                ack = self.acks[d["c"]]
                assert (d["id"], d["ts"]) == (ack["id"], ack["ts"])


async def created_everywhere(cluster: Cluster, g: bytes, clients) -> None:
    """Each member device read the created event, and the home's outbox is empty again."""
    for client in clients:
        assert seen(await read(client, 1)) == [("group", "created", 1)]
    await wait_until(lambda: relay_of(cluster, HOME).outbox.backlog == 0, "the created event confirmed by every node")
    for client in clients:
        await wait_until(lambda: pending(cluster, client.user, client.device) == 0, "the created event received")


async def group_with_a_member_node_down(cluster: Cluster, monkeypatch) -> tuple:
    """A group homed on ``HOME``, made by a sender of ``THIRD`` with a member of ``DOWN`` and one of
    ``HOME`` (another ``HOME`` user registered, to be added), the created event read by both member
    devices; then ``DOWN`` stopped. Returns (g, the sender's client, member, local, added, the local
    member's client, still connected)."""
    alphas = cluster.users("alpha", per_node=2)
    sender = alphas[THIRD][0]
    member = alphas[DOWN][0]
    local, added = alphas[HOME]
    g = group_homed_on(cluster, HOME, monkeypatch)
    s1 = await cluster.connect(sender)
    m1, w1 = await quiet(cluster, member), await quiet(cluster, local)
    x1 = await quiet(cluster, added)
    await x1.close()  # registered: may be added
    assert (await s1.iq("group.new", members=[member, local]))["g"] == g
    await created_everywhere(cluster, g, (m1, w1))
    await close_all(m1)
    await cluster.stop(DOWN)
    return g, s1, member, local, added, w1


async def test_a_member_node_that_was_down_gets_every_message_and_change_once_in_order(cluster, monkeypatch):
    """node-b is stopped while a member on node-c and one on node-a (the home) send group messages in
    turn, a member is added and one removed: all acked at once. When node-b is back its member's
    devices get each of them once, in the order sent; the members on live nodes got them at once."""
    alphas = cluster.users("alpha", per_node=2)
    sender, near = alphas[THIRD]
    member = alphas[DOWN][0]
    local, added = alphas[HOME]
    g = group_homed_on(cluster, HOME, monkeypatch)
    s1 = await cluster.connect(sender)
    m1, m2 = await quiet(cluster, member, 1), await quiet(cluster, member, 2)
    w1, n1, x1 = await quiet(cluster, local), await quiet(cluster, near), await quiet(cluster, added)
    assert (await s1.iq("group.new", members=[member, local, near]))["g"] == g
    await created_everywhere(cluster, g, (m1, m2, w1, n1))
    await close_all(m1, m2)
    await cluster.stop(DOWN)

    group = Group(g)
    for i in range(4):  # from node-c (relayed to the home) and from node-a, in turn
        await group.say((s1, w1)[i % 2], b"m%d" % i)
    await group.change(s1, "group.add", 2, "added", members=[added])
    await group.say(s1, b"m4")
    await group.say(w1, b"m5")
    await group.change(s1, "group.del", 3, "removed", members=[near])
    await group.say(w1, b"m6")
    await group.say(s1, b"m7")
    everything = group.items()
    assert len(everything) == 10

    # Acked while node-b is down: its entries wait in node-a's outbox, on disk.
    assert backlog(cluster, DOWN) == len(everything)
    assert len(store_of(cluster, HOME).outbox_entries(DOWN)) == len(everything)
    # The members on live nodes got everything at once (near: up to its removal; added: from its addition).
    for client, expected in ((w1, group.items(but=w1)), (n1, group.items(0, 8)), (x1, group.items(4))):
        group.check(await read(client, len(expected)), expected)
    for client in (w1, n1, x1):
        await nothing_arrives(client, 0.2)

    await cluster.start(DOWN, timeout_s=TIMEOUT_S)
    await wait_until(lambda: backlog(cluster, DOWN) == 0, "node-b confirmed every entry")
    await wait_until(lambda: store_of(cluster, HOME).outbox_entries(DOWN) == [], "the confirmed entries deleted")
    assert relay_of(cluster, HOME).counters["outbox_resent"] > 0  # sent while node-b was down, then again
    # Stored once each where the member lives, before any device read them.
    assert (pending(cluster, member, 1), pending(cluster, member, 2)) == (len(everything), len(everything))
    m1, m2 = await quiet(cluster, member, 1), await quiet(cluster, member, 2)
    for client in (m1, m2):
        group.check(await read(client, len(everything)), everything)
    for client in (m1, m2):
        await nothing_arrives(client, 0.3)
    await close_all(s1, m1, m2, w1, n1, x1)


async def test_a_member_node_down_so_long_its_share_is_full_gets_the_group_refused_until_it_is_back(
        cluster, monkeypatch):
    """node-b is down and what waits for it fills its share of the home's store (set small here, as
    days of traffic would fill it): the home refuses the group's messages and changes
    ``overloaded`` instead of filling its disk — the sender keeps them for a resend. Once node-b is
    back and took what waited, the group works again, and its member got every acked message once."""
    from interlink.core.errors import ServerError

    g, s1, member, local, added, w1 = await group_with_a_member_node_down(cluster, monkeypatch)

    group = Group(g)
    for i in range(3):
        await group.say(s1, b"kept %d" % i)
    outbox = relay_of(cluster, HOME).outbox
    outbox.max_node_bytes = outbox.streams[DOWN].backlog_bytes  # node-b's share is full now
    refused_id = os.urandom(16)
    with pytest.raises(ServerError) as refused:
        await s1.send_group_message(g, b"refused", msg_id=refused_id)
    assert refused.value.code == "overloaded" and refused.value.fields["retry_after"] == 5000
    with pytest.raises(ServerError) as refused_change:
        await s1.iq("group.add", g=g, members=[added])
    assert refused_change.value.code == "overloaded"
    assert relay_of(cluster, HOME).counters["outbox_full"] == 2 and backlog(cluster, DOWN) == 3

    await cluster.start(DOWN, timeout_s=TIMEOUT_S)
    await wait_until(lambda: backlog(cluster, DOWN) == 0, "node-b took what waited")
    ack = await s1.send_group_message(g, b"refused", msg_id=refused_id)  # resent: nothing of it was stored
    assert ack["t"] == "ack" and "dup" not in ack
    group.acks[b"refused"] = ack
    group._add(("msg", b"refused"), s1)
    await group.say(s1, b"after")
    m1 = await quiet(cluster, member)
    group.check(await read(m1, len(group.sent)), group.items())
    await nothing_arrives(m1, 0.3)
    group.check(await read(w1, len(group.sent)), group.items())  # the home's member: the same, no more
    await nothing_arrives(w1, 0.1)
    await close_all(s1, m1, w1)


async def test_the_outbox_outlives_a_restart_of_the_groups_home(cluster, monkeypatch):
    """node-b is down; a change and more messages than one window carries are acked; then the
    group's home (node-a) is stopped and started again on its data, and more is sent. When node-b
    is back its member gets all of it, once, in order: the entries from before the home's restart
    (read back from its store, sent in several windows) first, then those numbered on after them."""
    g, s1, member, local, added, w1 = await group_with_a_member_node_down(cluster, monkeypatch)
    await w1.close()

    group = Group(g)
    await group.change(s1, "group.add", 2, "added", members=[added])
    for i in range(WINDOW_ENTRIES + 20):
        await group.say(s1, b"before %d" % i)
    before = len(group.sent)
    assert backlog(cluster, DOWN) == before
    entries = store_of(cluster, HOME).outbox_entries(DOWN)
    assert len(entries) == before

    await cluster.stop(HOME)
    await cluster.start(HOME, timeout_s=TIMEOUT_S)
    home_store = store_of(cluster, HOME)
    assert backlog(cluster, DOWN) == before  # read back from the store
    assert home_store.outbox_entries(DOWN) == entries

    await group.say(s1, b"after 0")
    await group.change(s1, "group.del", 3, "removed", members=[local])
    await group.say(s1, b"after 1")
    everything = group.items()
    assert backlog(cluster, DOWN) == len(everything)
    waiting = home_store.outbox_entries(DOWN)
    assert waiting[:before] == entries and len(waiting) == len(everything)
    seqs = [seq for seq, _ in waiting]
    assert seqs == sorted(set(seqs)) and home_store.outbox_last(DOWN) == seqs[-1]  # numbered on, in order

    await cluster.start(DOWN, timeout_s=TIMEOUT_S)
    await wait_until(lambda: backlog(cluster, DOWN) == 0, "node-b confirmed every entry")
    await wait_until(lambda: DOWN not in home_store.outbox_nodes(), "the confirmed entries deleted")
    home_relay = relay_of(cluster, HOME)
    assert home_relay.counters["outbox_stored"] >= len(everything) and home_relay.counters["outbox_refused"] == 0
    assert pending(cluster, member) == len(everything)
    m1 = await quiet(cluster, member)
    group.check(await read(m1, len(everything)), everything)
    await nothing_arrives(m1, 0.3)
    w1 = await quiet(cluster, local)  # on the home: got everything up to its removal
    group.check(await read(w1, len(everything) - 1), everything[:-1])
    await nothing_arrives(w1, 0.1)
    await close_all(s1, m1, w1)


async def test_answers_meant_for_the_homes_previous_run_are_not_taken_for_its_new_relays(cluster, monkeypatch):
    """node-b is slow to store (its one writer thread busy, as behind a stalled disk) while the group's
    home restarts: node-b answers the outbox window of the home's previous run only after the new
    run relayed stanzas of its own to node-b — here 1:1 messages of four devices of a user of
    node-a. Each device must get its own message's ack, and nothing else."""
    await cluster.stop(DOWN)
    await cluster.start(DOWN, timeout_s=TIMEOUT_S, commit_mode="thread")
    alphas = cluster.users("alpha", per_node=2)
    sender, writer = alphas[HOME]
    member, reader = alphas[DOWN]
    g = group_homed_on(cluster, HOME, monkeypatch)
    s1 = await cluster.connect(sender)
    m1, r1 = await quiet(cluster, member), await quiet(cluster, reader)
    devices = [await cluster.connect(writer, device) for device in range(1, 5)]
    await close_all(*devices)
    assert (await s1.iq("group.new", members=[member]))["g"] == g
    await created_everywhere(cluster, g, (m1,))
    group = Group(g)
    sends: list = []
    release = threading.Event()
    cluster.gateways[DOWN]._server._commit_executor.submit(release.wait)  # node-b's commits wait behind it
    try:
        await group.say(s1, b"before the home restarts")  # acked by the home; node-b has it, not yet stored
        await s1.close()
        await cluster.stop(HOME)
        # A longer deadline for the new run: its resent window waits for node-b without being sent again.
        await cluster.start(HOME, timeout_s=10 * TIMEOUT_S)
        home = relay_of(cluster, HOME)
        devices = [await cluster.connect(writer, device) for device in range(1, 5)]
        ids = [os.urandom(16) for _ in devices]
        sends += [asyncio.ensure_future(device.send_message(reader, {1: b"from %d" % n}, msg_id=msg_id, timeout_s=5))
                  for n, (device, msg_id) in enumerate(zip(devices, ids))]
        await wait_until(lambda: len(home.waiting) >= 1 + len(devices), "the window and the four messages wait for node-b")
    finally:
        release.set()
    answers = await asyncio.gather(*sends, return_exceptions=True)
    # A device without its ack: node-b's answer to the previous run's window (relay seq n) was taken
    # for the answer to this run's relay seq n (the device's message), whose own answer then came late.
    assert [answer["id"] if isinstance(answer, dict) else repr(answer) for answer in answers] == ids
    for device in devices:
        await nothing_arrives(device, 0.2)  # no ack of another stanza
    assert sorted(d["c"] for d in await read(r1, len(devices))) == [b"from %d" % n for n in range(len(devices))]
    group.check(await read(m1, 1), group.items())
    await wait_until(lambda: home.outbox.backlog == 0, "node-b confirmed the entry")
    for client in (m1, r1):
        await nothing_arrives(client, 0.2)
    await close_all(m1, r1, *devices)


async def group_on_every_node(cluster: Cluster, monkeypatch):
    """A group homed on node-a made by a sender living there (acked by node-a's commit alone, NATS or
    not), with members on every node: node-b's user with two devices and one offline all along,
    node-c's, and one on node-a; returns (g, sender, {(user, device): client}, offline user, a
    user of node-a to add later)."""
    alphas = cluster.users("alpha", per_node=3)
    sender, local, added = alphas[HOME]
    b_user, b_other = alphas[DOWN][:2]
    c_user = alphas[THIRD][0]
    g = group_homed_on(cluster, HOME, monkeypatch)
    s1 = await cluster.connect(sender)
    members = {}
    for user, device in ((b_user, 1), (b_user, 2), (b_other, 1), (c_user, 1), (local, 1), (added, 1)):
        members[user, device] = await quiet(cluster, user, device)
    assert (await s1.iq("group.new", members=[b_user, b_other, c_user, local]))["g"] == g
    x1 = members.pop((added, 1))
    await created_everywhere(cluster, g, members.values())
    await members.pop((b_other, 1)).close()  # offline all along: its copies wait in its mailbox
    return g, s1, members, b_other, x1


async def check_every_member(cluster: Cluster, group: Group, members: dict, offline: str, x1: Client, x_got) -> None:
    """Once node-a's outbox is empty: each member device's mailbox holds each item once, and reads
    them in the order sent; the member added and removed meanwhile got ``x_got``."""
    home = relay_of(cluster, HOME)
    expected = group.items()
    await wait_until(lambda: home.outbox.backlog == 0, "every member node confirmed every entry")
    await wait_until(lambda: store_of(cluster, HOME).outbox_nodes() == {}, "the confirmed entries deleted")
    assert home.counters["outbox_refused"] == 0
    for user, device in (*members, (offline, 1)):
        assert pending(cluster, user, device) == len(expected), (user, device)  # stored once each
    members[offline, 1] = await quiet(cluster, offline)
    for client in members.values():
        group.check(await read(client, len(expected)), expected)
    group.check(await read(x1, len(x_got)), x_got)
    for client in (*members.values(), x1):
        await nothing_arrives(client, 0.2)
    await close_all(*set(group.by.values()), x1, *members.values())


async def test_entries_in_flight_when_nats_restarts_reach_every_member_once_in_order(cluster, nats_server, monkeypatch):
    """NATS is stopped while group messages go out (windows to node-b and node-c in flight), a
    member is added while it is away (acked: the sender lives on the home), it stays away until a
    window timed out, and is started again on its port; a member is removed, more is sent. Every
    member device gets every message and event once, in order."""
    g, s1, members, offline, x1 = await group_on_every_node(cluster, monkeypatch)
    added = x1.user
    group = Group(g)
    home = relay_of(cluster, HOME)
    timeouts = home.counters["timeouts"]
    nats_server.fixed_port = nats_server.port  # started again on the same port: the nodes reconnect to it
    for i in range(5):
        await group.say(s1, b"%d" % i)
    stopping = asyncio.ensure_future(nats_server.stop())
    for i in range(5, 10):  # while NATS goes away
        await group.say(s1, b"%d" % i)
    await stopping
    await group.change(s1, "group.add", 2, "added", members=[added])  # NATS is away: acked by the home's commit
    for i in range(10, 13):
        await group.say(s1, b"%d" % i)
    await wait_until(lambda: home.counters["timeouts"] > timeouts, "a window of node-a's outbox timed out")
    await nats_server.start()
    await group.change(s1, "group.del", 3, "removed", members=[added])
    for i in range(13, 16):
        await group.say(s1, b"%d" % i)
    assert len(group.items()) == 18
    await check_every_member(cluster, group, members, offline, x1, group.items(10, 15))
    assert home.counters["outbox_resent"] > 0


async def test_entries_sent_again_while_nats_stalls_are_stored_once(cluster, nats_server, monkeypatch):
    """NATS stalls (SIGSTOP): nothing it was sent is lost, only late. Messages and membership events
    are acked meanwhile; node-a's windows to node-b and node-c time out and go again — every entry
    at least twice. When NATS runs again it delivers every copy: the member nodes store each entry
    once (recognised by their marks, events too, which have no message id) and every member device
    gets every message and event once, in order."""
    g, s1, members, offline, x1 = await group_on_every_node(cluster, monkeypatch)
    group = Group(g)
    home = relay_of(cluster, HOME)
    counters = home.counters
    late, sent = counters["late_answers"], counters["outbox_sent"]
    os.kill(nats_server.pid, signal.SIGSTOP)
    try:
        await group.say(s1, b"a")
        await group.change(s1, "group.add", 2, "added", members=[x1.user])
        await group.say(s1, b"b")
        await group.change(s1, "group.del", 3, "removed", members=[x1.user])
        await group.say(s1, b"c")
        entries = home.outbox.backlog  # one per message and event for node-b, the same for node-c
        assert entries == 2 * len(group.items())
        await wait_until(lambda: counters["outbox_sent"] - sent == entries, "every entry sent once")
        resent = counters["outbox_resent"]
        await wait_until(lambda: counters["outbox_resent"] - resent >= entries, "every entry sent again")
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
    await check_every_member(cluster, group, members, offline, x1, group.items(1, 4))
    assert counters["late_answers"] > late  # the first copies' answers came after their deadline
    for node in (DOWN, THIRD):  # copies that came again, recognised where they were stored
        assert cluster.gateways[node]._server.router.counters["duplicates"] > 0, node
