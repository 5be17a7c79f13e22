"""Groups end to end over TCP (PROTOCOL §4–§6): group.new/add/del/leave/get, membership events
(durable ``dlv`` kind ``group``, ordered by ``ver``), fan-out of group messages to every device of
every member across three providers with online and offline devices, consent on add, blocks,
typing state, the size limit, every refusal code, full mailboxes skipped (not refusing the message), and a restart."""

from __future__ import annotations

import asyncio
import os

import pytest

from interlink.client import Client
from interlink.core.errors import ServerError
from interlink.gateway import Gateway
from three_providers import People, close_all, config_for, nothing_arrives


async def group_msg(client: Client, g: bytes, body: bytes, msg_id: bytes | None = None) -> dict:
    return await client.request({"t": "msg", "id": msg_id or os.urandom(16), "g": g, "b": body})


async def refused(client: Client, op: str, **fields) -> ServerError:
    with pytest.raises(ServerError) as caught:
        await client.iq(op, **fields)
    return caught.value


async def dlvs(client: Client, count: int, timeout_s: float = 5.0) -> list[dict]:
    got = []
    for _ in range(count):
        stanza = await client.recv(timeout_s=timeout_s)
        assert stanza["t"] == "dlv", stanza
        got.append(stanza)
    return got




async def test_three_provider_group_every_device_gets_every_message_once_in_ack_order(people):
    alice1, alice2 = await people.connect("alice@alpha", 1), await people.connect("alice@alpha", 2)
    bob1, bob2 = await people.connect("bob@beta", 1), await people.connect("bob@beta", 2)
    carl = await people.connect("carl@beta", 1)
    gus1, gus2 = await people.connect("gus@gamma", 1), await people.connect("gus@gamma", 2)
    await gus1.iq("consent.set", accept=["alpha"], discoverable=False)
    await bob2.close()  # offline members' devices catch up later
    await carl.close()

    res = await alice1.iq("group.new", members=["bob@beta", "carl@beta", "gus@gamma"], meta=b"sealed name")
    g = res["g"]
    assert type(g) is bytes and len(g) == 16 and res["ver"] == 1

    senders = {(("alice@alpha", 1)): alice1, ("bob@beta", 1): bob1, ("gus@gamma", 2): gus2}

    async def send_five(key, client):
        acked = []
        for i in range(5):
            msg_id = os.urandom(16)
            ack = await group_msg(client, g, b"%s/%d/%d" % (key[0].encode(), key[1], i), msg_id)
            assert ack["t"] == "ack" and ack["id"] == msg_id and "dup" not in ack
            acked.append(msg_id)
        return key, acked

    acked = dict(await asyncio.gather(*(send_five(key, client) for key, client in senders.items())))
    bob2 = await people.connect("bob@beta", 2)
    carl = await people.connect("carl@beta", 1)
    devices = {("alice@alpha", 1): alice1, ("alice@alpha", 2): alice2, ("bob@beta", 1): bob1,
               ("bob@beta", 2): bob2, ("carl@beta", 1): carl, ("gus@gamma", 1): gus1, ("gus@gamma", 2): gus2}
    for key, client in devices.items():
        expected = {sender: ids for sender, ids in acked.items() if sender != key}
        count = sum(map(len, expected.values())) + (key != ("alice@alpha", 1))  # + the created event
        got = await dlvs(client, count)
        events = [d for d in got if d["k"] == "group"]
        if key != ("alice@alpha", 1):
            (created,) = events
            assert (created["event"], created["g"], created["ver"], created["from"], created["dev"]) == (
                "created", g, 1, "alice@alpha", 1)
            assert created["members"] == ["alice@alpha", "bob@beta", "carl@beta", "gus@gamma"]
            assert created["meta"] == b"sealed name"
            assert got[0] is created  # stored before any message
        messages = [d for d in got if d["k"] == "msg"]
        assert all(d["g"] == g and "to" not in d for d in messages)
        for sender, ids in expected.items():
            from_sender = [d for d in messages if (d["from"], d["dev"]) == sender]
            assert [d["id"] for d in from_sender] == ids, (key, sender)  # once each, in ack order
            assert [d["c"] for d in from_sender] == [b"%s/%d/%d" % (sender[0].encode(), sender[1], i) for i in range(5)]
        assert len(messages) == sum(map(len, expected.values()))
        await nothing_arrives(client, 0.05)
    info = await carl.iq("group.get", g=g)
    assert (info["members"], info["admins"], info["meta"], info["ver"], info["more"]) == (
        ["alice@alpha", "bob@beta", "carl@beta", "gus@gamma"], ["alice@alpha"], b"sealed name", 1, False)
    await close_all(*devices.values())


async def test_membership_events_are_ordered_by_ver_and_removed_or_left_members_get_nothing_after(people):
    alice = await people.connect("alice@alpha", 1)
    bob1, bob2 = await people.connect("bob@beta", 1), await people.connect("bob@beta", 2)
    carl = await people.connect("carl@beta", 1)
    dave = await people.connect("dave@alpha", 1)
    g = (await alice.iq("group.new", members=["bob@beta", "carl@beta"]))["g"]
    assert (await alice.iq("group.add", g=g, members=["dave@alpha"]))["ver"] == 2
    assert (await alice.iq("group.del", g=g, members=["carl@beta"]))["ver"] == 3
    assert (await bob1.iq("group.leave", g=g))["ver"] == 4

    seen = {client: await dlvs(client, n) for client, n in ((bob2, 4), (dave, 3), (carl, 3), (bob1, 3))}
    assert [(d["event"], d["ver"]) for d in seen[bob2]] == [("created", 1), ("added", 2), ("removed", 3), ("left", 4)]
    assert [(d["event"], d["ver"]) for d in seen[dave]] == [("added", 2), ("removed", 3), ("left", 4)]
    assert [(d["event"], d["ver"]) for d in seen[carl]] == [("created", 1), ("added", 2), ("removed", 3)]
    assert [(d["event"], d["ver"]) for d in seen[bob1]] == [("created", 1), ("added", 2), ("removed", 3)]
    added, removed, left = seen[bob2][1:]
    assert (added["members"], added["from"]) == (["dave@alpha"], "alice@alpha")
    assert (removed["members"], left["members"], left["from"], left["dev"]) == (["carl@beta"], ["bob@beta"], "bob@beta", 1)
    assert all(d["g"] == g and d["k"] == "group" for ds in seen.values() for d in ds)
    assert len({d["id"] for d in seen[bob2]}) == 4  # one id per event

    await group_msg(alice, g, b"after the changes")
    assert [d["c"] for d in await dlvs(dave, 1)] == [b"after the changes"]
    for client in (carl, bob1, bob2):
        await nothing_arrives(client, 0.2)
    assert (await refused(carl, "group.get", g=g)).code == "not_member"
    with pytest.raises(ServerError) as caught:
        await group_msg(bob1, g, b"I left")
    assert caught.value.code == "not_member"

    # the last admin leaves: the longest-standing member (dave, the only one left) becomes admin
    await alice.iq("group.leave", g=g)
    (event,) = await dlvs(dave, 1)
    assert (event["event"], event["members"], event["promoted"], event["ver"]) == ("left", ["alice@alpha"], ["dave@alpha"], 5)
    info = await dave.iq("group.get", g=g)
    assert (info["members"], info["admins"], info["ver"]) == (["dave@alpha"], ["dave@alpha"], 5)
    await dave.iq("group.leave", g=g)  # the last member: the group is deleted
    assert (await refused(dave, "group.get", g=g)).code == "not_found"
    await close_all(alice, bob1, bob2, carl, dave)


async def test_adding_present_or_removing_absent_members_changes_nothing(people):
    alice = await people.connect("alice@alpha", 1)
    bob = await people.connect("bob@beta", 1)
    carl = await people.connect("carl@beta", 1)
    g = (await alice.iq("group.new", members=["bob@beta"]))["g"]
    await dlvs(bob, 1)
    assert (await alice.iq("group.add", g=g, members=["bob@beta", "alice@alpha"]))["ver"] == 1
    assert (await alice.iq("group.del", g=g, members=["carl@beta"]))["ver"] == 1
    await nothing_arrives(bob, 0.2)
    res = await alice.iq("group.add", g=g, members=["bob@beta", "carl@beta"])  # only carl is new
    assert res["ver"] == 2
    (event,) = await dlvs(bob, 1)
    assert (event["event"], event["members"]) == ("added", ["carl@beta"])
    await close_all(alice, bob, carl)


async def test_adding_needs_the_members_consent_and_a_known_user(people):
    alice = await people.connect("alice@alpha", 1)
    bob = await people.connect("bob@beta", 1)
    gus = await people.connect("gus@gamma", 1)
    for op_fields in ({"op": "group.new"}, {"op": "group.add"}):
        g = (await alice.iq("group.new", members=[]))["g"] if op_fields["op"] == "group.add" else None
        extra = {"g": g} if g else {}
        for member, code in (("gus@gamma", "not_opted_in"), ("nobody@gamma", "not_opted_in"),
                             ("nobody@beta", "unknown_recipient"), ("bob@nowhere", "unknown_recipient")):
            error = await refused(alice, op_fields["op"], members=["bob@beta", member], **extra)
            assert (error.code, error.fields["user"]) == (code, member)
            assert member in str(error)
    await nothing_arrives(bob, 0.2)  # nothing was created or changed
    await gus.iq("consent.set", accept=["alpha"], discoverable=False)
    g = (await alice.iq("group.new", members=["gus@gamma"]))["g"]
    assert (await dlvs(gus, 1))[0]["event"] == "created"
    # consent is for the adder's provider: gus accepts alpha, not beta
    own = (await bob.iq("group.new", members=[]))["g"]
    error = await refused(bob, "group.add", g=own, members=["gus@gamma"])
    assert (error.code, error.fields["user"]) == ("not_opted_in", "gus@gamma")
    await close_all(alice, bob, gus)


async def test_group_size_limit_is_announced_and_enforced(issuers, tmp_path):
    async with Gateway(config_for(issuers, tmp_path, max_group=3)) as gw:
        people = People(gw, issuers)
        clients = [await people.connect(f"u{i}@alpha", 1) for i in range(4)]
        u0 = clients[0]
        assert u0.limits["max_group"] == 3
        assert (await refused(u0, "group.new", members=["u1@alpha", "u2@alpha", "u3@alpha"])).code == "too_large"
        g = (await u0.iq("group.new", members=["u1@alpha", "u2@alpha"]))["g"]
        assert (await refused(u0, "group.add", g=g, members=["u3@alpha"])).code == "too_large"
        assert (await u0.iq("group.get", g=g))["ver"] == 1
        await u0.iq("group.del", g=g, members=["u2@alpha"])
        assert (await u0.iq("group.add", g=g, members=["u3@alpha"]))["ver"] == 3
        await close_all(*clients)


async def test_refusal_codes_and_the_session_continues(people):
    alice = await people.connect("alice@alpha", 1)
    bob = await people.connect("bob@beta", 1)
    eve = await people.connect("eve@beta", 1)
    g = (await alice.iq("group.new", members=["bob@beta"]))["g"]
    unknown = os.urandom(16)
    # not_found: every op, msg and state on an unknown group
    for op, fields in (("group.add", {"members": ["bob@beta"]}), ("group.del", {"members": ["bob@beta"]}),
                       ("group.leave", {}), ("group.get", {})):
        assert (await refused(alice, op, g=unknown, **fields)).code == "not_found", op
    with pytest.raises(ServerError) as caught:
        await group_msg(alice, unknown, b"x")
    assert caught.value.code == "not_found"
    # not_member
    for op, fields in (("group.add", {"members": ["eve@beta"]}), ("group.del", {"members": ["bob@beta"]}),
                       ("group.leave", {}), ("group.get", {})):
        assert (await refused(eve, op, g=g, **fields)).code == "not_member", op
    msg_id = os.urandom(16)
    with pytest.raises(ServerError) as caught:
        await group_msg(eve, g, b"x", msg_id)
    assert (caught.value.code, caught.value.fields["ref"]) == ("not_member", msg_id)
    await eve.send({"t": "state", "g": g, "s": "composing"})
    with pytest.raises(ServerError) as caught:
        await eve.recv(timeout_s=5)
    assert caught.value.code == "not_member"
    # not_admin
    for op in ("group.add", "group.del"):
        assert (await refused(bob, op, g=g, members=["alice@alpha"])).code == "not_admin"
    # too_large
    assert (await refused(alice, "group.new", members=[], meta=b"m" * 4097)).code == "too_large"
    assert (await alice.iq("group.new", members=[], meta=b"m" * 4096))["ver"] == 1
    long_names = [f"{i:04d}{'x' * 60}@{'p' * 63}" for i in range(470)]  # about 61 KB: over one event's room
    assert (await refused(alice, "group.new", members=long_names)).code == "too_large"
    with pytest.raises(ServerError) as caught:
        await group_msg(alice, g, b"x" * 65_300)
    assert caught.value.code == "too_large"
    for client in (alice, bob, eve):
        assert await client.ping() > 0
    await close_all(alice, bob, eve)


G = os.urandom(16)


@pytest.mark.parametrize(
    "op, fields",
    [
        ("group.new", {}),  # no members
        ("group.new", {"members": "bob@beta"}),
        ("group.new", {"members": [5]}),
        ("group.new", {"members": ["no-at-sign"]}),
        ("group.new", {"members": ["a/b@beta"]}),
        ("group.new", {"members": ["bob@BETA"]}),
        ("group.new", {"members": ["bob@beta", "bob@beta"]}),  # duplicates
        ("group.new", {"members": [], "meta": "text"}),
        ("group.add", {"members": ["bob@beta"]}),  # no g
        ("group.add", {"g": b"short", "members": ["bob@beta"]}),
        ("group.add", {"g": "x" * 16, "members": ["bob@beta"]}),
        ("group.add", {"g": G, "members": []}),
        ("group.add", {"g": G}),
        ("group.del", {"g": G, "members": ["alice@alpha"]}),  # yourself: use group.leave
        ("group.del", {"g": G, "members": [None]}),
        ("group.leave", {}),
        ("group.leave", {"g": 16}),
        ("group.get", {"g": None}),
        ("group.get", {"g": G, "skip": -1}),
        ("group.get", {"g": G, "skip": "0"}),
    ],
)
async def test_malformed_group_operations_get_bad_stanza(people, op, fields):
    alice = await people.connect("alice@alpha", 1)
    await people.connect("bob@beta", 1)
    error = await refused(alice, op, **fields)
    assert error.code == "bad_stanza", error
    assert type(error.fields["id"]) is int
    assert await alice.ping() > 0
    await alice.close()


@pytest.mark.parametrize(
    "stanza",
    [
        {"t": "msg", "id": os.urandom(16), "g": b"short", "b": b"x"},
        {"t": "msg", "id": os.urandom(16), "g": "x" * 16, "b": b"x"},
        {"t": "msg", "id": os.urandom(16), "g": G},  # no b
        {"t": "msg", "id": os.urandom(16), "g": G, "b": b""},
        {"t": "msg", "id": os.urandom(16), "g": G, "b": "text"},
        {"t": "msg", "id": os.urandom(16), "g": G, "b": b"x", "to": "bob@beta"},
        {"t": "msg", "id": os.urandom(16), "g": G, "b": b"x", "c": {1: b"x"}},
        {"t": "msg", "g": G, "b": b"x"},  # no id
        {"t": "state", "g": 5, "s": "composing"},
        {"t": "state", "g": G, "s": "typing"},
    ],
)
async def test_malformed_group_messages_get_bad_stanza(people, stanza):
    alice = await people.connect("alice@alpha", 1)
    await alice.send(stanza)
    with pytest.raises(ServerError) as caught:
        await alice.recv(timeout_s=5)
    assert caught.value.code == "bad_stanza", caught.value
    assert await alice.ping() > 0
    await alice.close()


async def test_duplicates_blocks_and_typing(people):
    alice1, alice2 = await people.connect("alice@alpha", 1), await people.connect("alice@alpha", 2)
    bob = await people.connect("bob@beta", 1)
    carl = await people.connect("carl@beta", 1)
    g = (await alice1.iq("group.new", members=["bob@beta", "carl@beta"]))["g"]
    for client in (alice2, bob, carl):
        await dlvs(client, 1)
    msg_id = os.urandom(16)
    first = await group_msg(alice1, g, b"once", msg_id)
    again = await group_msg(alice1, g, b"once", msg_id)
    assert again["dup"] is True and again["ts"] == first["ts"]
    for client in (alice2, bob, carl):
        (dlv,) = await dlvs(client, 1)
        assert (dlv["id"], dlv["c"], dlv["g"], dlv["from"], dlv["dev"], dlv["ts"]) == (msg_id, b"once", g, "alice@alpha", 1, first["ts"])
        await nothing_arrives(client, 0.1)  # stored once

    await bob.iq("block.add", user="alice@alpha")
    ack = await group_msg(alice1, g, b"not for bob")
    assert ack["t"] == "ack" and "dup" not in ack
    assert [d["c"] for d in await dlvs(carl, 1)] == [b"not for bob"]
    assert [d["c"] for d in await dlvs(alice2, 1)] == [b"not for bob"]
    await nothing_arrives(bob)

    await alice1.send({"t": "state", "g": g, "s": "composing"})
    state = await carl.recv(timeout_s=5)
    assert state == {"t": "state", "from": "alice@alpha", "g": g, "s": "composing"}
    await nothing_arrives(bob, 0.1)  # blocked
    await nothing_arrives(alice2, 0.1)  # not to one's own devices
    await close_all(alice1, alice2, bob, carl)


async def test_full_mailboxes_are_skipped_and_the_rest_of_the_group_gets_the_message(issuers, tmp_path):
    async with Gateway(config_for(issuers, tmp_path, max_mailbox_items=3, durability="async")) as gw:
        people = People(gw, issuers)
        users = [f"u{i}@beta" for i in range(10)]
        for user in users:
            for device in range(1, 6):
                if (user, device) != (users[0], 1):
                    await (await people.connect(user, device)).close()
        sender = await people.connect(users[0], 1)
        g = (await sender.iq("group.new", members=users[1:]))["g"]  # 1 event stored per offline device
        other = await people.connect("x@beta", 1)
        for i in range(2):  # u7's five devices reach the quota of 3 items
            await other.send_message(users[7], {d: b"fill" for d in range(1, 6)})
        msg_id = os.urandom(16)
        ack = await group_msg(sender, g, b"to fifty devices", msg_id)
        assert ack["t"] == "ack" and "dup" not in ack  # plain: the sender is not told about u7
        assert gw._server.router.counters["group_copies_dropped_full"] == 5
        for user in users:
            expected = 3 if user == users[7] else 2
            stats = gw.mailbox_stats(user)
            assert len(stats) == 5
            assert all(s["items"] == (0 if (user, d) == (users[0], 1) else expected) for d, s in stats.items()), user
        u3 = await people.connect(users[3], 2)
        assert u3.welcome["pending"] == 2
        assert [d["k"] for d in await dlvs(u3, 2)] == ["group", "msg"]
        await nothing_arrives(u3, 0.1)
        # a resend is a duplicate: u7, with room again, does not get it (the message was stored once)
        u7 = await people.connect(users[7], 1)
        assert [d["c"] for d in await dlvs(u7, 3) if d["k"] == "msg"] == [b"fill", b"fill"]
        again = await group_msg(sender, g, b"to fifty devices", msg_id)
        assert again["dup"] is True
        await nothing_arrives(u7, 0.1)
        await close_all(sender, other, u3, u7)


async def test_groups_survive_a_restart(issuers, tmp_path):
    async with Gateway(config_for(issuers, tmp_path)) as gw:
        people = People(gw, issuers)
        alice = await people.connect("alice@alpha", 1)
        await (await people.connect("bob@beta", 1)).close()  # registered, offline
        g = (await alice.iq("group.new", members=["bob@beta"], meta=b"m"))["g"]
        await group_msg(alice, g, b"before the restart")
        await alice.close()
    async with Gateway(config_for(issuers, tmp_path)) as gw:
        people = People(gw, issuers)
        bob = await people.connect("bob@beta", 1)
        assert [d["k"] for d in await dlvs(bob, 2)] == ["group", "msg"]
        info = await bob.iq("group.get", g=g)
        assert (info["members"], info["admins"], info["meta"], info["ver"]) == (["alice@alpha", "bob@beta"], ["alice@alpha"], b"m", 1)
        alice = await people.connect("alice@alpha", 1)
        await group_msg(bob, g, b"after the restart")
        assert [d["c"] for d in await dlvs(alice, 1)] == [b"after the restart"]
        await close_all(alice, bob)


@pytest.mark.parametrize("commit_mode", ["inline", "thread"])
async def test_pipelined_changes_chain_in_one_batch_and_get_waits_for_them(issuers, tmp_path, commit_mode):
    async with Gateway(config_for(issuers, tmp_path, commit_mode=commit_mode)) as gw:
        people = People(gw, issuers)
        alice = await people.connect("alice@alpha", 1)
        bob = await people.connect("bob@beta", 1)
        for user in ("dave@alpha", "erin@beta"):
            await (await people.connect(user, 1)).close()
        g = (await alice.iq("group.new", members=["bob@beta"]))["g"]
        add_dave, add_erin, info, message = await asyncio.gather(
            alice.iq("group.add", g=g, members=["dave@alpha"]),
            alice.iq("group.add", g=g, members=["erin@beta"]),
            alice.iq("group.get", g=g),
            group_msg(alice, g, b"to four"),
        )
        assert (add_dave["ver"], add_erin["ver"]) == (2, 3)
        assert (info["ver"], info["members"]) == (3, ["alice@alpha", "bob@beta", "dave@alpha", "erin@beta"])
        assert message["t"] == "ack"
        got = await dlvs(bob, 4)
        assert [(d["k"], d.get("ver")) for d in got] == [("group", 1), ("group", 2), ("group", 3), ("msg", None)]
        erin = await people.connect("erin@beta", 1)
        assert [(d["k"], d.get("event")) for d in await dlvs(erin, 2)] == [("group", "added"), ("msg", None)]
        await close_all(alice, bob, erin)


async def test_a_change_the_store_cannot_write_is_refused_whole(issuers, tmp_path):
    settings = dict(lmdb_map_size_bytes=1 << 20, durability="async", commit_mode="thread")
    async with Gateway(config_for(issuers, tmp_path, **settings)) as gw:
        people = People(gw, issuers)
        alice = await people.connect("alice@alpha", 1)
        bob = await people.connect("bob@beta", 1, auto_recv=False)
        carl = await people.connect("carl@beta", 1)
        dave = await people.connect("dave@beta", 1)
        g = (await alice.iq("group.new", members=["bob@beta"]))["g"]
        for size in (60_000, 4_000, 100):  # fill the map with what bob does not take, to the last page
            for _ in range(400):
                try:
                    await alice.send_message("bob@beta", {1: os.urandom(size)})
                except ServerError as exc:
                    assert exc.code == "overloaded"
                    break
            else:
                pytest.fail("the map never filled")
        results = await asyncio.gather(
            alice.iq("group.add", g=g, members=["carl@beta"]),
            alice.iq("group.add", g=g, members=["dave@beta"]),
            return_exceptions=True,
        )
        assert [r.code for r in results] == ["overloaded", "overloaded"]
        info = await alice.iq("group.get", g=g)
        assert (info["ver"], info["members"]) == (1, ["alice@alpha", "bob@beta"])
        await nothing_arrives(carl, 0.1)
        await close_all(alice, bob, carl, dave)
