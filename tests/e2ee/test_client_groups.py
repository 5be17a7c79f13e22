"""``interlink.e2ee.client``, groups: end-to-end encrypted groups through a real gateway (loopback
TCP, real LMDB, real OpenID issuers) — ``create_group``/``add_members``/``remove_members``/
``leave_group``/``send_to_group``, the sender keys carried over the pairwise sessions (kind
``skey``), and membership events as ``GroupEvent``s. Every device of every member of three
providers decrypts every message; a member removed or leaving mid-conversation gets nothing more,
and its old sender keys do not open what is sent after; a member added later reads what is sent
after joining, not before; a group message that arrives before its sender key waits for it (and
one sender cannot push the others' waiting messages out); a removal racing a send rotates first;
sender keys and group messages are taken only from members of known groups; members adopted from
``group.get`` are announced before they get the key; a restart from the state file keeps the
group."""

from __future__ import annotations

import asyncio
import os

import pytest
from interlink.core.errors import ServerError
from interlink.e2ee import (
    DeviceState,
    E2EEClient,
    E2EEError,
    GroupEvent,
    Message,
    SenderKey,
    parse_envelope,
)
from interlink.e2ee.client import MAX_HELD, MAX_HELD_PER_SENDER
from interlink.e2ee.envelope import pack, unpack

from .helpers import Devices, nothing_more, receive_n as got

ALICE, BOB, GUS, DAVE = "alice@alpha", "bob@beta", "gus@gamma", "dave@alpha"


async def open_all(devices: Devices, *specs: tuple[str, int]) -> dict[tuple[str, int], E2EEClient]:
    clients = {spec: await devices.open(*spec) for spec in specs}
    for user in dict.fromkeys(user for user, _ in specs):  # every provider may reach everyone (gamma's default: own only)
        first = next(c for (u, _), c in clients.items() if u == user)
        await first.client.iq("consent.set", accept=["*"], discoverable=False)
    return clients


def record_bodies(client: E2EEClient) -> list[bytes]:
    """The ``b`` of every group message ``client`` sends (a spy: the real send still happens)."""
    bodies: list[bytes] = []
    send = client.client.send_group_message

    async def spy(g, body, **options):
        bodies.append(body)
        return await send(g, body, **options)

    client.client.send_group_message = spy
    return bodies


def snapshot_keys(client: E2EEClient, g: bytes) -> dict[tuple[str, int], SenderKey]:
    return {(s, d): SenderKey.from_dict(k.to_dict()) for (gg, s, d), k in client.state.sender_keys.items() if gg == g}


async def everyone_reads(sender: E2EEClient, text: str, g: bytes, readers: list[E2EEClient]) -> None:
    await sender.send_to_group(g, text)
    for reader in readers:
        (message,) = await got(reader, 1)
        assert isinstance(message, Message), message
        assert (message.sender, message.device, message.text, message.group, message.to) == (
            sender.user, sender.device, text, g, None)


def old_keys_fail(old: dict[tuple[str, int], SenderKey], sender: E2EEClient, bodies: list[bytes]) -> None:
    key = old[(sender.user, sender.device)]
    for body in bodies:
        assert parse_envelope(body)["kid"] != key.key_id  # a new chain since the member went away
        with pytest.raises(E2EEError):
            key.decrypt(body)
        forced = dict(parse_envelope(body), kid=key.key_id)  # even under the old key id: signature and chain differ
        with pytest.raises(E2EEError):
            key.decrypt(forced)


async def test_three_providers_several_devices_every_device_decrypts_every_message(devices):
    c = await open_all(devices, (ALICE, 1), (ALICE, 2), (BOB, 1), (BOB, 2), (GUS, 1), (GUS, 2))
    alice1 = c[(ALICE, 1)]
    g = await alice1.create_group([BOB, GUS], meta=b"sealed by the app")
    assert alice1.members_of(g) == [ALICE, BOB, GUS] and alice1.groups[g].ver == 1
    for key, client in c.items():
        if key == (ALICE, 1):
            continue
        (event,) = await got(client, 1)
        assert isinstance(event, GroupEvent)
        assert (event.group, event.event, event.members, event.by, event.device, event.ver, event.current, event.meta) == (
            g, "created", (ALICE, BOB, GUS), ALICE, 1, 1, (ALICE, BOB, GUS), b"sealed by the app")
    for round_ in range(2):
        for key, sender in c.items():
            await everyone_reads(sender, f"{key[0]}/{key[1]} round {round_}", g, [r for k, r in c.items() if k != key])
    for client in c.values():
        assert client.members_of(g) == [ALICE, BOB, GUS]
        assert client.undecryptable == [] and client.skey_failures == [] and client.state.held == []
        # one sender key of its own, one for every other device that sent
        assert len([k for k in client.state.sender_keys if k[0] == g]) == 5


async def test_a_removed_member_gets_the_event_and_cannot_read_anything_sent_after(devices):
    c = await open_all(devices, (ALICE, 1), (ALICE, 2), (BOB, 1), (BOB, 2), (GUS, 1))
    alice1, alice2, bob1, bob2, gus = c.values()
    g = await alice1.create_group([BOB, GUS])
    for client in (alice2, bob1, bob2, gus):
        await got(client, 1)
    for sender in (alice1, alice2, gus):
        await everyone_reads(sender, f"before, from {sender.user}/{sender.device}", g, [r for r in c.values() if r is not sender])
    old = snapshot_keys(bob1, g)
    assert set(old) == {(ALICE, 1), (ALICE, 2), (GUS, 1)}
    bodies = {client: record_bodies(client) for client in (alice1, alice2, gus)}

    assert await alice1.remove_members(g, [BOB]) == 2
    assert alice1.members_of(g) == [ALICE, GUS]
    for client in (bob1, bob2):
        (event,) = await got(client, 1)
        assert (event.event, event.members, event.by, event.ver, event.current) == ("removed", (BOB,), ALICE, 2, ())
        assert not client.groups[g].active and client.members_of(g) == []
        assert not any(k[0] == g for k in client.state.sender_keys) and g not in client.state.own_sender_keys
    for client in (alice2, gus):
        (event,) = await got(client, 1)
        assert (event.event, event.members, event.current) == ("removed", (BOB,), (ALICE, GUS))

    for sender in (alice1, alice2, gus):  # every remaining device starts a new chain
        await everyone_reads(sender, f"after, from {sender.user}/{sender.device}", g,
                             [r for r in (alice1, alice2, gus) if r is not sender])
    for client in (bob1, bob2):
        await nothing_more(client)  # the gateway no longer delivers to bob
        with pytest.raises(ServerError) as refused:
            await client.send_to_group(g, "still here?")
        assert refused.value.code == "not_member"
    for sender in (alice1, alice2, gus):  # and bob's old sender keys do not open the later ciphertexts
        assert len(bodies[sender]) == 1
        old_keys_fail(old, sender, bodies[sender])
        with pytest.raises(E2EEError):
            bob1.state.decrypt_group(sender.user, sender.device, bodies[sender][0])
    for client in c.values():
        assert client.undecryptable == []


async def test_a_member_who_leaves_cannot_read_what_is_sent_after(devices):
    c = await open_all(devices, (ALICE, 1), (BOB, 1), (GUS, 1), (GUS, 2))
    alice, bob, gus1, gus2 = c.values()
    g = await alice.create_group([BOB, GUS])
    for client in (bob, gus1, gus2):
        await got(client, 1)
    await everyone_reads(alice, "hello all", g, [bob, gus1, gus2])
    await everyone_reads(bob, "hi", g, [alice, gus1, gus2])
    old = snapshot_keys(gus2, g)
    bodies = {client: record_bodies(client) for client in (alice, bob)}
    assert await gus1.leave_group(g) == 2
    assert not gus1.groups[g].active and not any(k[0] == g for k in gus1.state.sender_keys)
    for client in (alice, bob, gus2):  # gus's other device learns it too
        (event,) = await got(client, 1)
        assert (event.event, event.members, event.by, event.device, event.ver) == ("left", (GUS,), GUS, 1, 2)
    assert not gus2.groups[g].active
    await everyone_reads(alice, "gus has gone", g, [bob])
    await everyone_reads(bob, "indeed", g, [alice])
    for client in (gus1, gus2):
        await nothing_more(client)
    for sender in (alice, bob):
        old_keys_fail(old, sender, bodies[sender])
    with pytest.raises(ServerError):
        await gus2.send_to_group(g, "let me back")


async def test_a_member_added_later_reads_what_is_sent_after_joining_not_before(devices):
    c = await open_all(devices, (ALICE, 1), (BOB, 1), (GUS, 1), (DAVE, 1), (DAVE, 2))
    alice, bob, gus, dave1, dave2 = c.values()
    g = await alice.create_group([BOB, GUS])
    for client in (bob, gus):
        await got(client, 1)
    before = record_bodies(alice)
    await everyone_reads(alice, "before dave", g, [bob, gus])
    await everyone_reads(bob, "bob before dave", g, [alice, gus])
    assert await alice.add_members(g, [DAVE]) == 2
    for client in (bob, gus, dave1, dave2):
        (event,) = await got(client, 1)
        assert (event.event, event.members, event.ver, event.current) == ("added", (DAVE,), 2, (ALICE, BOB, GUS, DAVE))
    for sender in (alice, bob, gus, dave2):
        await everyone_reads(sender, f"welcome round from {sender.user}/{sender.device}", g,
                             [r for r in c.values() if r is not sender])
    # what alice sent before dave joined does not open with the key dave was given
    for dave in (dave1, dave2):
        for body in before:
            with pytest.raises(E2EEError):
                dave.state.decrypt_group(ALICE, 1, body)
        assert dave.undecryptable == []


async def test_a_group_message_before_its_sender_key_waits_for_it(devices):
    c = await open_all(devices, (ALICE, 1), (BOB, 1))
    alice, bob = c.values()
    g = await alice.create_group([BOB])
    await got(bob, 1)
    key = alice.state.own_sender_key(g)
    distribution = pack(key.distribution())  # the chain as it stands before the message
    early = await alice.encrypt_group(g, "ahead of my key")
    await alice.client.send_group_message(g, early)
    with pytest.raises(TimeoutError):  # bob reads it but cannot decrypt it yet: it is held (in his state file)
        await bob.receive(timeout_s=0.3)
    assert len(bob.state.held) == 1 and bob.undecryptable == []
    await alice._send_payload(BOB, distribution)  # the sender key arrives after its message
    (message,) = await got(bob, 1)
    assert (message.text, message.group, message.sender) == ("ahead of my key", g, ALICE)
    assert bob.state.held == []
    # a key that never arrives: the message is given up after hold_s (checked at the next delivery)
    bob.hold_s = 0.2
    alice.state.own_sender_key(g, rotate=True)
    await alice.client.send_group_message(g, await alice.encrypt_group(g, "never readable"))
    with pytest.raises(TimeoutError):
        await bob.receive(timeout_s=0.3)
    await alice.send_text(BOB, "a 1:1 message")
    (text,) = await got(bob, 1)
    assert text.text == "a 1:1 message"
    assert bob.state.held == [] and [u[3] for u in bob.undecryptable] == ["no sender key arrived within 0.2 s"]


async def test_restart_from_the_state_file_keeps_the_group(devices):
    c = await open_all(devices, (ALICE, 1), (BOB, 1), (GUS, 1))
    alice, bob, gus = c.values()
    g = await alice.create_group([BOB, GUS])
    for client in (bob, gus):
        await got(client, 1)
    await everyone_reads(alice, "one", g, [bob, gus])
    await everyone_reads(bob, "two", g, [alice, gus])
    kid = bob.state.own_sender_keys[g].key_id
    await bob.close()
    devices.opened.remove(bob)
    await everyone_reads(alice, "while bob is away", g, [gus])
    bob = await devices.open(BOB, 1)
    assert bob.members_of(g) == [ALICE, BOB, GUS] and bob.groups[g].ver == 1
    assert (BOB, 1) not in bob.groups[g].shared and (ALICE, 1) in bob.groups[g].shared
    (waiting,) = await got(bob, 1)
    assert (waiting.text, waiting.group) == ("while bob is away", g)
    await everyone_reads(bob, "back, same key", g, [alice, gus])
    assert bob.state.own_sender_keys[g].key_id == kid  # nothing to redistribute after the restart
    # a removal that happens while bob is offline: he learns it from the stored event, and his
    # next message uses a new chain
    await bob.close()
    devices.opened.remove(bob)
    await alice.remove_members(g, [GUS])
    (event,) = await got(gus, 1)
    assert event.event == "removed"
    bob = await devices.open(BOB, 1)
    (event,) = await got(bob, 1)
    assert (event.event, event.members, event.current) == ("removed", (GUS,), (ALICE, BOB))
    await everyone_reads(bob, "gus is out", g, [alice])
    assert bob.state.own_sender_keys[g].key_id != kid
    await nothing_more(gus)
    assert alice.undecryptable == bob.undecryptable == gus.undecryptable == []


async def test_concurrent_senders_and_a_fast_conversation(devices):
    c = await open_all(devices, (ALICE, 1), (BOB, 1), (GUS, 1))
    alice, bob, gus = c.values()
    g = await alice.create_group([BOB, GUS])
    for client in (bob, gus):
        await got(client, 1)

    async def chat(sender: E2EEClient) -> None:
        for i in range(10):
            await sender.send_to_group(g, f"{sender.user} {i}")

    await asyncio.gather(*(chat(sender) for sender in c.values()))
    for reader in c.values():
        messages = await got(reader, 20)
        for sender in c.values():
            if sender is not reader:  # every message once, in each sender's order
                assert [m.text for m in messages if m.sender == sender.user] == [f"{sender.user} {i}" for i in range(10)]
        assert reader.undecryptable == []


async def test_a_device_added_to_a_member_later_learns_the_group_and_gets_the_keys(devices):
    c = await open_all(devices, (ALICE, 1), (BOB, 1))
    alice, bob1 = c.values()
    g = await alice.create_group([BOB])
    await got(bob1, 1)
    await everyone_reads(alice, "before bob's new phone", g, [bob1])
    bob3 = await devices.open(BOB, 3)  # no events of this group ever reach it
    await everyone_reads(alice, "sent with the old device list", g, [bob1])
    with pytest.raises(TimeoutError):  # no key of alice for it yet: held
        await bob3.receive(timeout_s=0.3)
    assert len(bob3.state.held) == 1 and g not in bob3.groups
    # the new device writes to the group: it reads the members from the gateway and hands its key out
    await everyone_reads(bob3, "hello from bob's new phone", g, [alice, bob1])
    assert bob3.members_of(g) == [ALICE, BOB]
    # bob3 learnt the group from group.get, no event: the members it adopted are announced to the app
    (resync,) = await got(bob3, 1)
    assert (resync.event, resync.members, resync.current) == ("resync", (ALICE,), (ALICE, BOB))
    # alice heard from a device of bob she did not know: she reads bob's devices again at her next send
    await everyone_reads(alice, "welcome, new phone", g, [bob1, bob3])
    # what she sent before it had her key stays unreadable (her key was given from a later message on)
    assert bob3.state.held == [] and len(bob3.undecryptable) == 1
    assert alice.undecryptable == bob1.undecryptable == []


async def test_what_a_member_sent_before_its_removal_still_decrypts_after_it(devices):
    c = await open_all(devices, (ALICE, 1), (BOB, 1), (GUS, 1))
    alice, bob, gus = c.values()
    g = await alice.create_group([BOB, GUS])
    for client in (bob, gus):
        await got(client, 1)
    await everyone_reads(bob, "first", g, [alice, gus])  # alice holds bob's sender key
    await bob.send_to_group(g, "my last words")  # alice has not read it yet
    await alice.remove_members(g, [BOB])
    words, event = await got(gus, 2)
    assert (words.text, event.event) == ("my last words", "removed")
    await everyone_reads(alice, "bob is out", g, [gus])  # alice re-reads the members and rotates
    (last,) = await got(alice, 1)
    assert (last.sender, last.text) == (BOB, "my last words")
    assert alice.undecryptable == gus.undecryptable == []


async def test_group_sender_keys_are_distributed_over_the_pairwise_sessions(devices):
    alice1, alice2 = await devices.open("alice@alpha", 1), await devices.open("alice@alpha", 2)
    bob1, bob2 = await devices.open("bob@beta", 1), await devices.open("bob@beta", 2)
    carl = await devices.open("carl@beta", 1)
    group = bytes(16)
    for client in (alice1, alice2, bob1, bob2, carl):  # the key layer: sender keys are taken only for a known group, from members
        client.state.set_members(group, ["alice@alpha", "bob@beta", "carl@beta"], 1)
    await alice1.share_sender_key(group, ["alice@alpha", "bob@beta", "carl@beta"])
    await alice1.send_text("bob@beta", "sync")  # the distributions are consumed on the way to this one
    for client in (bob1, bob2, alice2):
        assert [m.text for m in await got(client, 1)] == ["sync"]
    await nothing_more(carl)
    # one ciphertext for every member's device (the key layer alone: decrypted here without a group msg)
    ciphertexts = [await alice1.encrypt_group(group, f"group message {i}") for i in range(3)]
    for client in (bob1, bob2, carl, alice2):
        for i in (2, 0, 1):
            assert await client.decrypt_group("alice@alpha", 1, ciphertexts[i]) == f"group message {i}"
    # a member's device cannot pass a message off as alice's
    await bob1.share_sender_key(group, ["carl@beta"])
    forged = await bob1.encrypt_group(group, "pretending")
    with pytest.raises(E2EEError):
        await carl.decrypt_group("alice@alpha", 1, forged)


# -- races and who may hand out keys


async def consent_all(*clients: E2EEClient) -> None:
    for client in clients:
        await client.client.iq("consent.set", accept=["*"], discoverable=False)


async def test_a_removal_during_a_group_send_rotates_before_encrypting(devices):
    alice, bob, gus = await devices.open(ALICE, 1), await devices.open(BOB, 1), await devices.open(GUS, 1)
    await consent_all(alice, bob, gus)
    g = await alice.create_group([BOB, GUS])
    for client in (bob, gus):
        await got(client, 1)
    await alice.send_to_group(g, "everyone")
    for client in (bob, gus):
        assert (await got(client, 1))[0].text == "everyone"
    old_kid = alice.state.own_sender_keys[g].key_id
    distribute, calls = alice._distribute, []

    async def racing(group, key, members, info, **kw):
        await distribute(group, key, members, info, **kw)
        if not calls:  # gus is removed while the first distribution is on its way
            calls.append(key.key_id)
            ver = await alice.client.iq("group.del", g=g, members=[GUS])
            async with alice._lock:
                alice.state.set_members(g, [ALICE, BOB], ver["ver"])

    alice._distribute = racing
    sent = []
    send = alice.client.send_group_message

    async def spy(group, body, **options):
        sent.append(body)
        return await send(group, body, **options)

    alice.client.send_group_message = spy
    await alice.send_to_group(g, "after gus")
    assert calls == [old_kid]
    assert unpack(sent[0])["kid"] != old_kid  # not encrypted with the chain gus holds
    items = await got(bob, 2)
    assert [(type(i).__name__, getattr(i, "event", None) or i.text) for i in items] == [
        ("GroupEvent", "removed"), ("Message", "after gus")]
    assert bob.undecryptable == []


async def test_sender_keys_and_group_messages_only_from_members_of_known_groups(devices):
    alice, bob, gus = await devices.open(ALICE, 1), await devices.open(BOB, 1), await devices.open(GUS, 1)
    await consent_all(alice, bob, gus)
    g = await alice.create_group([BOB])
    await got(bob, 1)
    # gus is no member: his sender key for g is refused
    await gus._send_payload(BOB, pack(SenderKey.create(g).distribution()), own_copies=False)
    # a sender key for a group nobody knows is refused too
    await alice._send_payload(BOB, pack(SenderKey.create(os.urandom(16)).distribution()), own_copies=False)
    await alice.send_text(BOB, "sync")
    (sync,) = await got(bob, 1)
    assert sync.text == "sync"
    assert [w for *_, w in bob.undecryptable] == [
        "a sender key from gus@gamma/1 for a group it (or this user) is not a member of",
        "a sender key from alice@alpha/1 for a group it (or this user) is not a member of",
    ]
    assert [k for k in bob.state.sender_keys if k[1] == GUS] == []
    # a group message from a non-member (as a gateway could forge one) is refused, not held
    gus_key = gus.state.own_sender_key(g)
    forged = {"t": "dlv", "k": "msg", "from": GUS, "dev": 1, "id": os.urandom(16), "ts": 0, "g": g,
              "c": gus_key.encrypt(pack({"k": "text", "text": "hi", "ts": 0}))}
    assert await bob._handle(forged) == []
    assert bob.state.held == [] and "not a member" in bob.undecryptable[-1][3]
    # after leaving, alice's new sender key for g is refused
    await bob.leave_group(g)
    await alice._send_payload(BOB, pack(alice.state.own_sender_key(g, rotate=True).distribution()), own_copies=False)
    await alice.send_text(BOB, "sync 2")
    (item,) = await got(bob, 1)
    assert isinstance(item, Message) and item.text == "sync 2"
    assert "not a member" in bob.undecryptable[-1][3]
    assert [k for k in bob.state.sender_keys if k[0] == g] == []


async def test_members_adopted_from_group_get_are_announced_before_they_get_the_key(devices):
    alice1, alice2 = await devices.open(ALICE, 1), await devices.open(ALICE, 2)
    bob, gus = await devices.open(BOB, 1), await devices.open(GUS, 1)
    await consent_all(alice1, bob, gus)
    g = await alice1.create_group([BOB])
    await alice2.client.iq("group.add", g=g, members=[GUS])  # alice1 has not read the event yet
    seen_at_distribution = []
    distribute = alice1._distribute

    async def spy(group, key, members, info, **kw):
        seen_at_distribution.append([i for i in alice1._ready if isinstance(i, GroupEvent)])
        return await distribute(group, key, members, info, **kw)

    alice1._distribute = spy
    await alice1.send_to_group(g, "hello")
    (resync,) = seen_at_distribution[0]
    assert (resync.event, resync.members, resync.gone, resync.current) == ("resync", (GUS,), (), (ALICE, BOB, GUS))
    first = await alice1.receive(timeout_s=5)
    assert first is resync


# -- the held queue


def test_one_sender_cannot_flush_the_held_messages_of_others(tmp_path):
    client = E2EEClient(None, DeviceState.create(BOB, 1), tmp_path / "bob.state", otpk_target=0, otpk_low=0)
    g = b"G" * 16

    def hold(sender: str) -> None:
        stanza = {"g": g, "from": sender, "dev": 1, "id": os.urandom(16), "ts": 0, "seq": None, "c": b""}
        client._hold(stanza, {"kid": 1, "n": 0})

    hold(ALICE)
    for _ in range(MAX_HELD + 10):
        hold("mallory@gamma")
    assert [h["from"] for h in client.state.held].count(ALICE) == 1
    assert [h["from"] for h in client.state.held].count("mallory@gamma") == MAX_HELD_PER_SENDER
