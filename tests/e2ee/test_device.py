"""``interlink.e2ee.device``: ``DeviceState`` offline — X3DH + Double Ratchet sessions between
devices (initial messages, ratchet messages, out-of-order and lost messages, the skip bound,
signed-prekey-only starts and rotation, forged bundles, simultaneous starts); identity keys pinned
on first use (a changed one refused on both the sending and the receiving side and never
promoted, ``trust_new_identity``, safety numbers, new devices, older state files); replayed
signed-prekey-only session starts and retired sender keys refused."""

from __future__ import annotations

import os
import random

import msgpack
import pytest
from interlink.e2ee import (
    T_PREKEY,
    T_RATCHET,
    DeviceState,
    E2EEError,
    IdentityChanged,
    fingerprint,
    parse_envelope,
    safety_number,
)
from interlink.e2ee.device import MAX_SESSIONS_PER_DEVICE
from interlink.e2ee.envelope import MAX_SKIP, pack, unpack

from .helpers import bundle_of

ALICE, BOB = "alice@alpha", "bob@beta"


@pytest.fixture
def pair():
    return DeviceState.create("alice@alpha", 1), DeviceState.create("bob@beta", 2)


def kind(envelope: bytes) -> int:
    return parse_envelope(envelope)["t"]


async def test_initial_messages_carry_the_x3dh_header_until_the_peer_answers(pair):
    alice, bob = pair
    first = await alice.encrypt("bob@beta", 2, b"one", bundle=bundle_of(bob, 2))
    second = await alice.encrypt("bob@beta", 2, b"two")
    assert kind(first) == kind(second) == T_PREKEY
    assert parse_envelope(first)["opk"] is not None
    assert await bob.decrypt("alice@alpha", 1, first) == b"one"
    assert await bob.decrypt("alice@alpha", 1, second) == b"two"
    reply = await bob.encrypt("alice@alpha", 1, b"three")
    assert kind(reply) == T_RATCHET  # the responder never sends a header
    assert await alice.decrypt("bob@beta", 2, reply) == b"three"
    later = await alice.encrypt("bob@beta", 2, b"four")
    assert kind(later) == T_RATCHET  # answered: plain ratchet messages from now on
    assert await bob.decrypt("alice@alpha", 1, later) == b"four"
    assert bob.otpks == {}  # the one-time prekey was deleted when used


async def test_out_of_order_and_lost_messages_within_the_bound(pair):
    alice, bob = pair
    await bob.decrypt("alice@alpha", 1, await alice.encrypt("bob@beta", 2, b"start", bundle=bundle_of(bob, 2)))
    await alice.decrypt("bob@beta", 2, await bob.encrypt("alice@alpha", 1, b"ok"))
    sent = [(i, await alice.encrypt("bob@beta", 2, b"m%d" % i)) for i in range(20)]
    lost = {3, 11}
    order = [item for item in sent if item[0] not in lost]
    random.Random(7).shuffle(order)
    for i, envelope in order:
        assert await bob.decrypt("alice@alpha", 1, envelope) == b"m%d" % i
    # a DH ratchet step in between: the skipped keys of the older chain still work
    await alice.decrypt("bob@beta", 2, await bob.encrypt("alice@alpha", 1, b"turn"))
    newer = await alice.encrypt("bob@beta", 2, b"new chain")
    assert await bob.decrypt("alice@alpha", 1, newer) == b"new chain"
    assert await bob.decrypt("alice@alpha", 1, sent[11][1]) == b"m11"
    with pytest.raises(E2EEError):  # a second delivery of a message already read
        await bob.decrypt("alice@alpha", 1, sent[11][1])


async def test_skipping_more_than_the_bound_is_refused(pair):
    alice, bob = pair
    await bob.decrypt("alice@alpha", 1, await alice.encrypt("bob@beta", 2, b"start", bundle=bundle_of(bob, 2)))
    await alice.decrypt("bob@beta", 2, await bob.encrypt("alice@alpha", 1, b"ok"))
    for _ in range(MAX_SKIP + 1):
        await alice.encrypt("bob@beta", 2, b"never delivered")
    too_far = await alice.encrypt("bob@beta", 2, b"too far")
    with pytest.raises(E2EEError):
        await bob.decrypt("alice@alpha", 1, too_far)


async def test_signed_prekey_only_and_one_time_prekey_replay(pair):
    alice, bob = pair
    envelope = await alice.encrypt("bob@beta", 2, b"no otpk", bundle=bundle_of(bob, 2, otpk=False))
    assert parse_envelope(envelope)["opk"] is None
    assert await bob.decrypt("alice@alpha", 1, envelope) == b"no otpk"
    with pytest.raises(E2EEError):  # a replayed session start does not open a second session
        await bob.decrypt("alice@alpha", 1, envelope)
    carl = DeviceState.create("carl@beta", 1)
    start = await carl.encrypt("bob@beta", 2, b"with otpk", bundle=bundle_of(bob, 2))
    assert await bob.decrypt("carl@beta", 1, start) == b"with otpk"
    bob.forget_device("carl@beta", 1)
    with pytest.raises(E2EEError, match="one-time prekey"):  # used once, then deleted
        await bob.decrypt("carl@beta", 1, start)


async def test_a_forged_bundle_or_a_wrong_sender_is_refused(pair):
    alice, bob = pair
    forged = bundle_of(bob, 2)
    forged["spk"] = {**forged["spk"], "sig": os.urandom(64)}
    with pytest.raises(E2EEError, match="refused"):
        await alice.encrypt("bob@beta", 2, b"x", bundle=forged)
    envelope = await alice.encrypt("bob@beta", 2, b"x", bundle=bundle_of(bob, 2))
    with pytest.raises(E2EEError):  # the session is bound to the addresses the gateway stamps
        await bob.decrypt("mallory@alpha", 1, envelope)
    assert await bob.decrypt("alice@alpha", 1, envelope) == b"x"


async def test_signed_prekey_rotation_keeps_the_previous_one_for_a_while(pair):
    alice, bob = pair
    old_bundle = bundle_of(bob, 2, otpk=False)
    bob.rotate_signed_prekey()
    assert bob.signed_prekey()["id"] != old_bundle["spk"]["id"]
    late = await alice.encrypt("bob@beta", 2, b"old spk", bundle=old_bundle)
    assert await bob.decrypt("alice@alpha", 1, late) == b"old spk"
    bob.rotate_signed_prekey()
    carl = DeviceState.create("carl@beta", 1)
    too_late = await carl.encrypt("bob@beta", 2, b"x", bundle=old_bundle)
    with pytest.raises(E2EEError, match="signed prekey"):
        await bob.decrypt("carl@beta", 1, too_late)


async def test_simultaneous_session_starts_converge(pair):
    alice, bob = pair
    a_first = await alice.encrypt("bob@beta", 2, b"from alice", bundle=bundle_of(bob, 2))
    b_first = await bob.encrypt("alice@alpha", 1, b"from bob", bundle=bundle_of(alice, 1))
    assert await bob.decrypt("alice@alpha", 1, a_first) == b"from alice"
    assert await alice.decrypt("bob@beta", 2, b_first) == b"from bob"
    for round_ in range(3):
        assert await bob.decrypt("alice@alpha", 1, await alice.encrypt("bob@beta", 2, b"a%d" % round_)) == b"a%d" % round_
        assert await alice.decrypt("bob@beta", 2, await bob.encrypt("alice@alpha", 1, b"b%d" % round_)) == b"b%d" % round_


# -- identity keys are pinned


async def established() -> tuple[DeviceState, DeviceState]:
    alice, bob = DeviceState.create(ALICE, 1), DeviceState.create(BOB, 1)
    assert await bob.decrypt(ALICE, 1, await alice.encrypt(BOB, 1, b"hello bob", bundle=bundle_of(bob))) == b"hello bob"
    assert await alice.decrypt(BOB, 1, await bob.encrypt(ALICE, 1, b"hi alice")) == b"hi alice"
    return alice, bob


async def test_a_session_start_with_another_identity_key_is_refused_and_never_promoted():
    alice, bob = await established()
    mallory = DeviceState.create(ALICE, 1)  # a gateway's own identity, stamped as alice/1
    forged = await mallory.encrypt(BOB, 1, b"I am alice, really", bundle=bundle_of(bob))
    with pytest.raises(E2EEError) as refused:
        await bob.decrypt(ALICE, 1, forged)
    assert [r["ik"] for r in bob.sessions[(ALICE, 1)]] == [alice.identity_key]  # nothing installed
    assert isinstance(refused.value, IdentityChanged)
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
    assert isinstance(refused.value, IdentityChanged)
    assert not alice.has_session(BOB, 1)
    # the real bob's bundle is still taken
    assert await bob.decrypt(ALICE, 1, await alice.encrypt(BOB, 1, b"to bob", bundle=bundle_of(bob))) == b"to bob"
    # the pin is in the state file
    again = DeviceState.from_bytes(alice.to_bytes())
    assert again.identity_of(BOB, 1) == bob.identity_key
    again.forget_device(BOB, 1)
    with pytest.raises(IdentityChanged):
        await again.encrypt(BOB, 1, b"x", bundle=bundle_of(fake_bob))


async def test_trust_new_identity_accepts_a_reset_device():
    alice, bob = await established()
    new_bob = DeviceState.create(BOB, 1)  # bob reinstalled: a new identity on the same device number
    start = await new_bob.encrypt(ALICE, 1, b"it is me, reinstalled", bundle=bundle_of(alice))
    with pytest.raises(IdentityChanged):
        await alice.decrypt(BOB, 1, start)
    alice.trust_new_identity(BOB, 1)  # the app showed the change and the user accepted it
    assert alice.identity_of(BOB, 1) == new_bob.identity_key
    assert not alice.has_session(BOB, 1)  # the old identity's sessions are gone
    assert await alice.decrypt(BOB, 1, start) == b"it is me, reinstalled"
    with pytest.raises(E2EEError):  # the old identity's session is gone
        await alice.decrypt(BOB, 1, await bob.encrypt(ALICE, 1, b"old"))
    with pytest.raises(IdentityChanged):  # and a new session start with it is refused
        await alice.decrypt(BOB, 1, await bob_restart(bob, alice))


async def bob_restart(bob: DeviceState, alice: DeviceState) -> bytes:
    bob.forget_device(ALICE, 1)
    return await bob.encrypt(ALICE, 1, b"old identity again", bundle=bundle_of(alice))


async def test_safety_numbers_fingerprints_and_new_devices():
    alice, bob = await established()
    assert alice.safety_number(BOB, 1) == bob.safety_number(ALICE, 1)
    assert len(alice.safety_number(BOB, 1).replace(" ", "")) == 60
    assert alice.fingerprint(BOB, 1) == fingerprint(BOB, bob.identity_key)
    assert alice.safety_number(BOB, 2) is None and alice.identity_of(BOB, 2) is None
    mallory = DeviceState.create(ALICE, 1)
    assert safety_number(BOB, bob.identity_key, ALICE, mallory.identity_key) != bob.safety_number(ALICE, 1)
    # every device seen for the first time is listed, on either side of the session start
    assert alice.new_devices == [(BOB, 1)] and bob.new_devices == [(ALICE, 1)]
    bob2 = DeviceState.create(BOB, 2)
    await bob2.decrypt(ALICE, 1, await alice.encrypt(BOB, 2, b"x", bundle=bundle_of(bob2, 2)))
    assert alice.new_devices == [(BOB, 1), (BOB, 2)]
    assert DeviceState.from_bytes(alice.to_bytes()).new_devices == [(BOB, 1), (BOB, 2)]


async def test_an_older_state_file_pins_the_identities_of_its_sessions():
    alice, bob = await established()
    old = unpack(bob.to_bytes())
    for key in ("identities", "identity_changes", "new_devices", "spk_eks", "retired_kids"):
        old.pop(key)
    migrated = DeviceState.from_bytes(pack(old))
    assert migrated.identity_of(ALICE, 1) == alice.identity_key
    with pytest.raises(IdentityChanged):
        await migrated.decrypt(ALICE, 1, await DeviceState.create(ALICE, 1).encrypt(BOB, 1, b"x", bundle=bundle_of(bob)))


# -- replays of signed-prekey-only session starts and of old sender keys


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
    for i in range(MAX_SESSIONS_PER_DEVICE + 1):
        alice.forget_device(BOB, 1)
        await bob.decrypt(ALICE, 1, await alice.encrypt(BOB, 1, b"restart %d" % i, bundle=bundle_of(bob, otpk=False)))
    assert len(bob.sessions[(ALICE, 1)]) == MAX_SESSIONS_PER_DEVICE
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
    return parse_envelope(envelope)["spk"]


async def test_a_retired_sender_key_is_not_installed_again():
    g = b"G" * 16
    alice, bob = DeviceState.create(ALICE, 1), DeviceState.create(BOB, 1)
    skey1 = await alice.encrypt(BOB, 1, pack(alice.own_sender_key(g).distribution()), bundle=bundle_of(bob, otpk=False))
    first = msgpack.unpackb(await bob.decrypt(ALICE, 1, skey1), raw=False)
    bob.accept_sender_key(ALICE, 1, first)
    old = [alice.encrypt_group(g, b"old %d" % i) for i in range(3)]
    assert [bob.decrypt_group(ALICE, 1, m) for m in old] == [b"old 0", b"old 1", b"old 2"]
    k2 = alice.own_sender_key(g, rotate=True)
    bob.accept_sender_key(ALICE, 1, msgpack.unpackb(await bob.decrypt(ALICE, 1, await alice.encrypt(BOB, 1, pack(k2.distribution()))), raw=False))
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
