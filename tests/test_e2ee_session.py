"""The session layer of ``interlink.e2ee``, offline: X3DH + Double Ratchet between ``DeviceState``s
(initial messages, ratchet messages, out-of-order and lost messages, replays, signed-prekey-only
starts and rotation, simultaneous starts, the state file) and the group sender-key chains."""

from __future__ import annotations

import os
import random
import stat

import msgpack
import pytest
from interlink import e2ee
from interlink.e2ee import DeviceState, E2EEError, SenderKey, parse_envelope


def bundle_of(state: DeviceState, device: int, *, otpk: bool = True) -> dict:
    one = state.generate_one_time_prekeys(1)[0] if otpk else None
    return {"device": device, "ik": state.identity_key, "spk": state.signed_prekey(), "otpk": one}


@pytest.fixture
def pair():
    return DeviceState.create("alice@alpha", 1), DeviceState.create("bob@beta", 2)


def kind(envelope: bytes) -> int:
    return parse_envelope(envelope)["t"]


async def test_initial_messages_carry_the_x3dh_header_until_the_peer_answers(pair):
    alice, bob = pair
    first = await alice.encrypt("bob@beta", 2, b"one", bundle=bundle_of(bob, 2))
    second = await alice.encrypt("bob@beta", 2, b"two")
    assert kind(first) == kind(second) == e2ee.T_PREKEY
    assert parse_envelope(first)["opk"] is not None
    assert await bob.decrypt("alice@alpha", 1, first) == b"one"
    assert await bob.decrypt("alice@alpha", 1, second) == b"two"
    reply = await bob.encrypt("alice@alpha", 1, b"three")
    assert kind(reply) == e2ee.T_RATCHET  # the responder never sends a header
    assert await alice.decrypt("bob@beta", 2, reply) == b"three"
    later = await alice.encrypt("bob@beta", 2, b"four")
    assert kind(later) == e2ee.T_RATCHET  # answered: plain ratchet messages from now on
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
    for _ in range(e2ee.MAX_SKIP + 1):
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


async def test_state_file_is_private_atomic_and_restores_everything(pair, tmp_path):
    alice, bob = pair
    path = tmp_path / "bob.state"
    await bob.decrypt("alice@alpha", 1, await alice.encrypt("bob@beta", 2, b"before", bundle=bundle_of(bob, 2)))
    bob.own_sender_key(b"g" * 16).encrypt(b"group")
    bob.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["bob.state"]  # no temporary file left
    restored = DeviceState.load(path)
    assert restored.identity_key == bob.identity_key and restored.signed_prekey() == bob.signed_prekey()
    assert await restored.decrypt("alice@alpha", 1, await alice.encrypt("bob@beta", 2, b"after")) == b"after"
    assert await alice.decrypt("bob@beta", 2, await restored.encrypt("alice@alpha", 1, b"back")) == b"back"
    assert restored.own_sender_key(b"g" * 16).iteration == 1
    restored.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "junk",
    [b"", b"\x00\x01", msgpack.packb([1, 2]), msgpack.packb({"v": 2, "t": 2}), msgpack.packb({"v": 1, "t": 9}),
     msgpack.packb({"v": 1, "t": 2, "dh": b"x" * 31, "pn": 0, "n": 0, "ct": b"c"}),
     msgpack.packb({"v": 1, "t": 1, "dh": b"x" * 32, "pn": 0, "n": 0, "ct": b"c"})],
)
async def test_malformed_envelopes_are_refused(pair, junk):
    _, bob = pair
    with pytest.raises(E2EEError):
        await bob.decrypt("alice@alpha", 1, junk)


# -- sender keys


GROUP = bytes(range(16))


def receiver_of(key: SenderKey) -> SenderKey:
    return SenderKey.from_distribution(msgpack.unpackb(msgpack.packb(key.distribution())))


def test_sender_key_ratchets_forward_and_decrypts_in_order():
    own = SenderKey.create(GROUP)
    peer = receiver_of(own)
    chain_keys = set()
    for i in range(5):
        chain_keys.add(own.chain_key)
        envelope = own.encrypt(b"hello %d" % i)
        assert parse_envelope(envelope)["n"] == i
        assert peer.decrypt(envelope) == b"hello %d" % i
    assert len(chain_keys) == 5 and own.iteration == peer.iteration == 5 and own.chain_key == peer.chain_key


def test_sender_key_out_of_order_within_the_bound_and_duplicates():
    own = SenderKey.create(GROUP)
    peer = receiver_of(own)
    envelopes = [own.encrypt(b"%d" % i) for i in range(10)]
    for i in (9, 2, 0, 5, 1, 3, 8, 4, 7, 6):
        assert peer.decrypt(envelopes[i]) == b"%d" % i
    assert not peer.skipped
    with pytest.raises(E2EEError, match="duplicate"):
        peer.decrypt(envelopes[4])
    for _ in range(e2ee.MAX_SKIP + 1):
        own.encrypt(b"lost")
    with pytest.raises(E2EEError, match="ahead"):
        peer.decrypt(own.encrypt(b"too far"))


def test_sender_key_forgery_is_rejected():
    own = SenderKey.create(GROUP)
    peer = receiver_of(own)
    envelope = msgpack.unpackb(own.encrypt(b"genuine"))
    # another member who knows the chain key cannot sign as the sender
    impostor = SenderKey.create(GROUP)
    impostor.key_id, impostor.chain_key, impostor.iteration = own.key_id, peer.chain_key, peer.iteration
    with pytest.raises(E2EEError, match="signature"):
        peer.decrypt(impostor.encrypt(b"forged"))
    tampered = dict(envelope, ct=envelope["ct"][:-1] + bytes([envelope["ct"][-1] ^ 1]))
    with pytest.raises(E2EEError, match="signature"):
        peer.decrypt(msgpack.packb(tampered))
    with pytest.raises(E2EEError, match="signature"):
        peer.decrypt(msgpack.packb(dict(envelope, n=envelope["n"] + 1)))
    assert peer.decrypt(msgpack.packb(envelope)) == b"genuine"  # nothing was consumed by the forgeries


def test_old_message_keys_are_not_derivable_from_a_newer_chain_key():
    own = SenderKey.create(GROUP)
    early = [own.encrypt(b"before you joined %d" % i) for i in range(5)]
    late_joiner = receiver_of(own)  # gets the chain at iteration 5
    after = own.encrypt(b"after")
    assert late_joiner.decrypt(after) == b"after"
    for envelope in early:
        with pytest.raises(E2EEError, match="older"):
            late_joiner.decrypt(envelope)
    # the distributed state itself holds nothing of the earlier iterations
    assert late_joiner.skipped == {} and late_joiner.iteration == 6


def test_only_the_owner_encrypts_and_state_round_trips():
    own = SenderKey.create(GROUP)
    peer = receiver_of(own)
    with pytest.raises(E2EEError):
        peer.encrypt(b"x")
    own.encrypt(b"skipped")
    envelope = own.encrypt(b"kept")
    assert peer.decrypt(envelope) == b"kept"
    again = SenderKey.from_dict(msgpack.unpackb(msgpack.packb(peer.to_dict()), strict_map_key=False))
    assert again.skipped == peer.skipped and again.chain_key == peer.chain_key
