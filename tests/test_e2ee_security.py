"""Regression tests for the security review of ``interlink.e2ee`` (the reproduction scripts of the
review turned into tests): identity keys pinned on first use (a changed one refused on both the
sending and the receiving side, never promoted; safety numbers; new devices listed); signed-prekey-
only session starts and retired sender keys not replayable; one user of a state file at a time;
the rotated signed prekey saved before it is published; a removal racing a group send; sender keys
only for known groups from members; members adopted through ``group.get`` announced; the held
queue capped per sender; the state file's temporary file never followed through a symlink."""

from __future__ import annotations

import os

import msgpack
import pytest
from interlink import e2ee
from interlink.e2ee import (
    DeviceState,
    E2EEClient,
    E2EEError,
    GroupEvent,
    Message,
    _pack,
    _unpack,
)
from e2ee_people import receive_n as got

ALICE, BOB, GUS = "alice@alpha", "bob@beta", "gus@gamma"


def bundle_of(state: DeviceState, device: int = 1, *, otpk: bool = True) -> dict:
    one = state.generate_one_time_prekeys(1)[0] if otpk else None
    return {"device": device, "ik": state.identity_key, "spk": state.signed_prekey(), "otpk": one}


async def established() -> tuple[DeviceState, DeviceState]:
    alice, bob = DeviceState.create(ALICE, 1), DeviceState.create(BOB, 1)
    assert await bob.decrypt(ALICE, 1, await alice.encrypt(BOB, 1, b"hello bob", bundle=bundle_of(bob))) == b"hello bob"
    assert await alice.decrypt(BOB, 1, await bob.encrypt(ALICE, 1, b"hi alice")) == b"hi alice"
    return alice, bob


# -- 1. identity keys are pinned (demo1)


async def test_a_session_start_with_another_identity_key_is_refused_and_never_promoted():
    alice, bob = await established()
    mallory = DeviceState.create(ALICE, 1)  # a gateway's own identity, stamped as alice/1
    forged = await mallory.encrypt(BOB, 1, b"I am alice, really", bundle=bundle_of(bob))
    with pytest.raises(E2EEError) as refused:
        await bob.decrypt(ALICE, 1, forged)
    assert [r["ik"] for r in bob.sessions[(ALICE, 1)]] == [alice.identity_key]  # nothing installed
    assert isinstance(refused.value, e2ee.IdentityChanged)
    assert bob.identity_of(ALICE, 1) == alice.identity_key
    assert (refused.value.known, refused.value.presented) == (alice.identity_key, mallory.identity_key)
    assert bob.identity_changes == {(ALICE, 1): mallory.identity_key}
    assert [r["ik"] for r in bob.sessions[(ALICE, 1)]] == [alice.identity_key]  # nothing installed
    # bob's next message still goes to the real alice only
    reply = await bob.encrypt(ALICE, 1, b"my secret for alice")
    assert await alice.decrypt(BOB, 1, reply) == b"my secret for alice"
    with pytest.raises(E2EEError):
        await mallory.decrypt(BOB, 1, reply)


async def test_the_pin_survives_forget_device_and_eviction_on_the_sending_side():
    alice, bob = await established()
    alice.forget_device(BOB, 1)  # devices.get once omitted bob/1
    fake_bob = DeviceState.create(BOB, 1)
    with pytest.raises(E2EEError) as refused:
        await alice.encrypt(BOB, 1, b"to bob", bundle=bundle_of(fake_bob))
    assert isinstance(refused.value, e2ee.IdentityChanged)
    assert not alice.has_session(BOB, 1)
    # the real bob's bundle is still taken
    assert await bob.decrypt(ALICE, 1, await alice.encrypt(BOB, 1, b"to bob", bundle=bundle_of(bob))) == b"to bob"
    # the pin is in the state file
    again = DeviceState.from_bytes(alice.to_bytes())
    assert again.identity_of(BOB, 1) == bob.identity_key
    again.forget_device(BOB, 1)
    with pytest.raises(e2ee.IdentityChanged):
        await again.encrypt(BOB, 1, b"x", bundle=bundle_of(fake_bob))


async def test_trust_new_identity_accepts_a_reset_device():
    alice, bob = await established()
    new_bob = DeviceState.create(BOB, 1)  # bob reinstalled: a new identity on the same device number
    start = await new_bob.encrypt(ALICE, 1, b"it is me, reinstalled", bundle=bundle_of(alice))
    with pytest.raises(e2ee.IdentityChanged):
        await alice.decrypt(BOB, 1, start)
    alice.trust_new_identity(BOB, 1)  # the app showed the change and the user accepted it
    assert alice.identity_of(BOB, 1) == new_bob.identity_key
    assert not alice.has_session(BOB, 1)  # the old identity's sessions are gone
    assert await alice.decrypt(BOB, 1, start) == b"it is me, reinstalled"
    with pytest.raises(E2EEError):  # the old identity's session is gone
        await alice.decrypt(BOB, 1, await bob.encrypt(ALICE, 1, b"old"))
    with pytest.raises(e2ee.IdentityChanged):  # and a new session start with it is refused
        await alice.decrypt(BOB, 1, await bob_restart(bob, alice))


async def bob_restart(bob: DeviceState, alice: DeviceState) -> bytes:
    bob.forget_device(ALICE, 1)
    return await bob.encrypt(ALICE, 1, b"old identity again", bundle=bundle_of(alice))


async def test_safety_numbers_fingerprints_and_new_devices():
    alice, bob = await established()
    assert alice.safety_number(BOB, 1) == bob.safety_number(ALICE, 1)
    assert len(alice.safety_number(BOB, 1).replace(" ", "")) == 60
    assert alice.fingerprint(BOB, 1) == e2ee.fingerprint(BOB, bob.identity_key)
    assert alice.safety_number(BOB, 2) is None and alice.identity_of(BOB, 2) is None
    mallory = DeviceState.create(ALICE, 1)
    assert e2ee.safety_number(BOB, bob.identity_key, ALICE, mallory.identity_key) != bob.safety_number(ALICE, 1)
    # every device seen for the first time is listed, on either side of the session start
    assert alice.new_devices == [(BOB, 1)] and bob.new_devices == [(ALICE, 1)]
    bob2 = DeviceState.create(BOB, 2)
    await bob2.decrypt(ALICE, 1, await alice.encrypt(BOB, 2, b"x", bundle=bundle_of(bob2, 2)))
    assert alice.new_devices == [(BOB, 1), (BOB, 2)]
    assert DeviceState.from_bytes(alice.to_bytes()).new_devices == [(BOB, 1), (BOB, 2)]


async def test_an_older_state_file_pins_the_identities_of_its_sessions():
    alice, bob = await established()
    old = _unpack(bob.to_bytes())
    for key in ("identities", "identity_changes", "new_devices", "spk_eks", "retired_kids"):
        old.pop(key)
    migrated = DeviceState.from_bytes(_pack(old))
    assert migrated.identity_of(ALICE, 1) == alice.identity_key
    with pytest.raises(e2ee.IdentityChanged):
        await migrated.decrypt(ALICE, 1, await DeviceState.create(ALICE, 1).encrypt(BOB, 1, b"x", bundle=bundle_of(bob)))


# -- 2. replays of signed-prekey-only session starts and of old sender keys (demo2, demo4)


async def test_a_signed_prekey_only_start_is_not_replayed_after_forget_device_or_eviction():
    alice, bob = DeviceState.create(ALICE, 1), DeviceState.create(BOB, 1)  # bob's one-time prekeys are drained
    env0 = await alice.encrypt(BOB, 1, b"transfer 100 to carol", bundle=bundle_of(bob, otpk=False))
    env1 = await alice.encrypt(BOB, 1, b"second message (still type 1)")
    assert [await bob.decrypt(ALICE, 1, e) for e in (env0, env1)] == [b"transfer 100 to carol", b"second message (still type 1)"]
    bob.forget_device(ALICE, 1)  # the gateway answered devices.get without alice/1 once
    for envelope in (env0, env1):
        with pytest.raises(E2EEError, match="replay"):
            await bob.decrypt(ALICE, 1, envelope)
    bob = DeviceState.from_bytes(bob.to_bytes())  # remembered in the state file
    with pytest.raises(E2EEError, match="replay"):
        await bob.decrypt(ALICE, 1, env0)
    # eviction: alice's own genuine restarts push the first session out
    for i in range(e2ee.MAX_SESSIONS_PER_DEVICE + 1):
        alice.forget_device(BOB, 1)
        await bob.decrypt(ALICE, 1, await alice.encrypt(BOB, 1, b"restart %d" % i, bundle=bundle_of(bob, otpk=False)))
    assert len(bob.sessions[(ALICE, 1)]) == e2ee.MAX_SESSIONS_PER_DEVICE
    for envelope in (env0, env1):
        with pytest.raises(E2EEError):
            await bob.decrypt(ALICE, 1, envelope)
    # the memory goes with the signed prekey: two rotations later the start names an unknown one
    spk = parse_spk(env0)
    assert any(spk == i for i in bob.spk_eks)
    bob.rotate_signed_prekey()
    bob.rotate_signed_prekey()
    assert spk not in bob.spk_eks
    with pytest.raises(E2EEError, match="signed prekey"):
        await bob.decrypt(ALICE, 1, env0)


def parse_spk(envelope: bytes) -> int:
    return e2ee.parse_envelope(envelope)["spk"]


async def test_a_retired_sender_key_is_not_installed_again():
    g = b"G" * 16
    alice, bob = DeviceState.create(ALICE, 1), DeviceState.create(BOB, 1)
    skey1 = await alice.encrypt(BOB, 1, _pack(alice.own_sender_key(g).distribution()), bundle=bundle_of(bob, otpk=False))
    first = msgpack.unpackb(await bob.decrypt(ALICE, 1, skey1), raw=False)
    bob.accept_sender_key(ALICE, 1, first)
    old = [alice.encrypt_group(g, b"old %d" % i) for i in range(3)]
    assert [bob.decrypt_group(ALICE, 1, m) for m in old] == [b"old 0", b"old 1", b"old 2"]
    k2 = alice.own_sender_key(g, rotate=True)
    bob.accept_sender_key(ALICE, 1, msgpack.unpackb(await bob.decrypt(ALICE, 1, await alice.encrypt(BOB, 1, _pack(k2.distribution()))), raw=False))
    assert bob.decrypt_group(ALICE, 1, alice.encrypt_group(g, b"new")) == b"new"
    # the old distribution, however it comes back, does not reinstall the old chain
    bob = DeviceState.from_bytes(bob.to_bytes())
    with pytest.raises(E2EEError, match="replaced"):  # the payload itself (any path)
        bob.accept_sender_key(ALICE, 1, first)
    bob.forget_device(ALICE, 1)
    with pytest.raises(E2EEError, match="replay"):  # the session start that carried it
        await bob.decrypt(ALICE, 1, skey1)
    for m in old:
        with pytest.raises(E2EEError):
            bob.decrypt_group(ALICE, 1, m)
    assert bob.decrypt_group(ALICE, 1, alice.encrypt_group(g, b"genuine new")) == b"genuine new"


# -- gateway fixtures


async def consent_all(*clients: E2EEClient) -> None:
    for client in clients:
        await client.client.iq("consent.set", accept=["*"], discoverable=False)


# -- 3. one user of a state file at a time (demo5)


async def test_a_second_opener_of_the_state_file_is_refused(devices):
    alice = await devices.open(ALICE, 1)
    with pytest.raises(E2EEError, match="in use"):
        await devices.open(ALICE, 1)  # a second process, a second client in this one
    await alice.close()
    again = await devices.open(ALICE, 1)  # closing released it
    assert again.state.identity_key == alice.state.identity_key
    await again.close()


def test_the_state_lock_is_exclusive(tmp_path):
    path = tmp_path / "alice.state"
    with e2ee.StateLock(path), pytest.raises(e2ee.StateLocked):
        e2ee.StateLock(path)
    e2ee.StateLock(path).release()


# -- 4. the rotated signed prekey is saved before it is published


async def test_open_saves_a_rotated_signed_prekey_before_publishing_it(devices, monkeypatch):
    alice = await devices.open(ALICE, 1)
    await alice.close()
    path = devices.state_path(ALICE, 1)
    published_on_disk: list[tuple[int, int]] = []
    iq = e2ee.Client.iq

    async def spy(self, op, **fields):
        if op == "keys.put":
            published_on_disk.append((fields["spk"]["id"], DeviceState.load(path).spk_id))
        return await iq(self, op, **fields)

    monkeypatch.setattr(e2ee.Client, "iq", spy)
    alice = await devices.open(ALICE, 1, spk_max_age_s=-1)  # rotated at start
    assert published_on_disk and all(sent == saved for sent, saved in published_on_disk)


# -- 5, 6, 7: groups


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
    assert _unpack(sent[0])["kid"] != old_kid  # not encrypted with the chain gus holds
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
    await gus._send_payload(BOB, _pack(e2ee.SenderKey.create(g).distribution()), own_copies=False)
    # a sender key for a group nobody knows is refused too
    await alice._send_payload(BOB, _pack(e2ee.SenderKey.create(os.urandom(16)).distribution()), own_copies=False)
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
              "c": gus_key.encrypt(_pack({"k": "text", "text": "hi", "ts": 0}))}
    assert await bob._handle(forged) == []
    assert bob.state.held == [] and "not a member" in bob.undecryptable[-1][3]
    # after leaving, alice's new sender key for g is refused
    await bob.leave_group(g)
    await alice._send_payload(BOB, _pack(alice.state.own_sender_key(g, rotate=True).distribution()), own_copies=False)
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


# -- 8. the held queue is capped per sender


def test_one_sender_cannot_flush_the_held_messages_of_others(tmp_path):
    client = E2EEClient(None, DeviceState.create(BOB, 1), tmp_path / "bob.state", otpk_target=0, otpk_low=0)
    g = b"G" * 16

    def hold(sender: str) -> None:
        stanza = {"g": g, "from": sender, "dev": 1, "id": os.urandom(16), "ts": 0, "seq": None, "c": b""}
        client._hold(stanza, {"kid": 1, "n": 0})

    hold(ALICE)
    for _ in range(e2ee.MAX_HELD + 10):
        hold("mallory@gamma")
    assert [h["from"] for h in client.state.held].count(ALICE) == 1
    assert [h["from"] for h in client.state.held].count("mallory@gamma") == e2ee.MAX_HELD_PER_SENDER


# -- 9. the temporary file of the state file


def test_the_state_file_is_never_written_through_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "alice.state"
    planted = tmp_path / f".alice.state.{os.getpid()}.tmp"  # the name the writer used to pick
    planted.symlink_to(victim)
    state = DeviceState.create(ALICE, 1)
    state.save(path)
    assert victim.read_bytes() == b"precious"
    assert DeviceState.load(path).identity_key == state.identity_key
    assert not path.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([victim.name, path.name, planted.name])
