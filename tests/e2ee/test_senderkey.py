"""``interlink.e2ee.senderkey``: one group sender-key chain, offline — forward ratchet, out of
order within the bound, duplicates and forgeries refused, no keys of earlier iterations for a
later receiver, only the owner encrypts, the state round-trips."""

from __future__ import annotations

import msgpack
import pytest
from interlink.e2ee import E2EEError, SenderKey, parse_envelope
from interlink.e2ee.envelope import MAX_SKIP

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
    for _ in range(MAX_SKIP + 1):
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
