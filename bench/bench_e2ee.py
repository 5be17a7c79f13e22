"""End-to-end encryption in the client, per message (pytest-benchmark): what one core of a
synthetic-traffic tool can encrypt and decrypt.

    .venv/bin/python -m pytest bench/bench_e2ee.py --benchmark-only

All through the public API of ``interlink.e2ee`` (``DeviceState``, ``SenderKey``), offline, two
devices talking directly as in ``tests/e2ee/test_device.py``; the plaintext is what
``E2EEClient.send_text`` encrypts for a 100-character text (a msgpack map ``{k, text, ts}``,
127 bytes).

- ``established``: a 1:1 session both sides have used (Alice sent, Bob answered): Alice's
  ``encrypt`` is a ratchet message (type 2) on the current sending chain, Bob's ``decrypt`` the
  next message in order. Symmetric steps only (HKDF, HMAC, AES-CBC + HMAC), no Diffie-Hellman.
- ``turn``: the message after the other side spoke (a chat's normal back and forth): it starts
  a new sending chain. The DH ratchet step (a new X25519 key pair and two exchanges) is paid by
  the receiver's ``decrypt``; the sender made its new key pair when it read the reply, so its
  ``encrypt`` costs what an established one does.
- ``prekey``: the first message to a device: ``encrypt`` with a bundle (signed-prekey signature
  check, X3DH with a one-time prekey, ratchet set-up) and the receiver's ``decrypt`` of it
  (X3DH passive side, ratchet set-up, the one-time prekey deleted).
- ``group``: a sender-key message (``DeviceState.encrypt_group`` / ``decrypt_group``): one
  ciphertext for the whole group, Ed25519 signed.
- ``save``: ``DeviceState.save`` (msgpack of the whole state, a 0600 temporary file, fsync,
  rename, fsync of the folder). ``E2EEClient`` saves after every message it sends or receives,
  so for a client built on it this, not the cryptography, bounds the messages per second; a
  load tool that keeps its states in memory skips it. ``to_bytes`` is the serialisation alone.

The coroutines of ``DeviceState`` never suspend (no I/O), so they are driven without an event
loop (``_run``), as a load tool running them inside its loop would pay no more than an ``await``.
Setup (making envelopes for the decrypt cases, fresh devices for session starts) is not timed.
"""

from __future__ import annotations

import os
import time

import msgpack
import pytest
from interlink import e2ee
from interlink.e2ee import DeviceState, parse_envelope
from interlink.load.e2ee import drive

TEXT = "x" * 100
ALICE, BOB = ("alice@alpha", 1), ("bob@beta", 2)
GROUP = bytes(range(16))


def _payload() -> bytes:
    """What ``E2EEClient.send_text`` encrypts for a 100-character text."""
    return msgpack.packb({"k": "text", "text": TEXT, "ts": int(time.time() * 1000)}, use_bin_type=True)


PAYLOAD = _payload()


_run = drive  # DeviceState's coroutines complete without suspending (no I/O)


def _bundle(state: DeviceState, device: int, otpk: bool = True) -> dict:
    one = state.generate_one_time_prekeys(1)[0] if otpk else None
    return {"device": device, "ik": state.identity_key, "spk": state.signed_prekey(), "otpk": one}


def _established() -> tuple[DeviceState, DeviceState]:
    """Alice and Bob with a session both have used: Alice's next message is a ratchet message."""
    alice, bob = DeviceState.create(*ALICE), DeviceState.create(*BOB)
    first = _run(alice.encrypt(BOB[0], BOB[1], PAYLOAD, bundle=_bundle(bob, BOB[1])))
    _run(bob.decrypt(ALICE[0], ALICE[1], first))
    _run(alice.decrypt(BOB[0], BOB[1], _run(bob.encrypt(ALICE[0], ALICE[1], PAYLOAD))))
    assert parse_envelope(_run(alice.encrypt(BOB[0], BOB[1], PAYLOAD)))["t"] == e2ee.T_RATCHET
    return alice, bob


def _note(benchmark, what: str) -> None:
    benchmark.extra_info["plaintext_bytes"] = len(PAYLOAD)
    benchmark.extra_info["what"] = what


# -- an established 1:1 session


def test_established_encrypt(benchmark):
    alice, _ = _established()
    _note(benchmark, "ratchet message, current sending chain")
    envelope = benchmark(lambda: _run(alice.encrypt(BOB[0], BOB[1], PAYLOAD)))
    benchmark.extra_info["envelope_bytes"] = len(envelope)
    assert parse_envelope(envelope)["t"] == e2ee.T_RATCHET


def test_established_decrypt(benchmark):
    alice, bob = _established()
    _note(benchmark, "ratchet message, next in order")

    def setup():
        return (_run(alice.encrypt(BOB[0], BOB[1], PAYLOAD)),), {}

    plaintext = benchmark.pedantic(
        lambda envelope: _run(bob.decrypt(ALICE[0], ALICE[1], envelope)), setup=setup, rounds=2000, warmup_rounds=20
    )
    assert plaintext == PAYLOAD


# -- the message after the other side spoke: a DH ratchet step


def test_turn_encrypt(benchmark):
    alice, bob = _established()
    _note(benchmark, "first message of a new sending chain (after a reply)")
    sent = []

    def setup():  # Bob reads Alice's last message and answers; Alice reads the answer (not timed)
        if sent:
            _run(bob.decrypt(ALICE[0], ALICE[1], sent.pop()))
        _run(alice.decrypt(BOB[0], BOB[1], _run(bob.encrypt(ALICE[0], ALICE[1], PAYLOAD))))
        return (), {}

    def encrypt():
        envelope = _run(alice.encrypt(BOB[0], BOB[1], PAYLOAD))
        sent.append(envelope)
        return envelope

    envelope = benchmark.pedantic(encrypt, setup=setup, rounds=1000, warmup_rounds=10)
    assert parse_envelope(envelope)["t"] == e2ee.T_RATCHET
    if not getattr(benchmark, "disabled", False):  # --benchmark-disable runs it once without setup
        assert parse_envelope(envelope)["n"] == 0  # the first message of a new chain


def test_turn_decrypt(benchmark):
    alice, bob = _established()
    _note(benchmark, "first message of the peer's new chain: DH ratchet step")

    def setup():  # Bob spoke last, so Alice's next message starts her new chain
        _run(alice.decrypt(BOB[0], BOB[1], _run(bob.encrypt(ALICE[0], ALICE[1], PAYLOAD))))
        return (_run(alice.encrypt(BOB[0], BOB[1], PAYLOAD)),), {}

    plaintext = benchmark.pedantic(
        lambda envelope: _run(bob.decrypt(ALICE[0], ALICE[1], envelope)), setup=setup, rounds=1000, warmup_rounds=10
    )
    assert plaintext == PAYLOAD


# -- the first message to a device: X3DH


def test_prekey_encrypt(benchmark):
    bob = DeviceState.create(*BOB)
    _note(benchmark, "session start: bundle check + X3DH (with a one-time prekey) + first ratchet message")

    def setup():  # a fresh sender each round (creating a device is not per message)
        return (DeviceState.create(*ALICE), _bundle(bob, BOB[1])), {}

    envelope = benchmark.pedantic(
        lambda alice, bundle: _run(alice.encrypt(BOB[0], BOB[1], PAYLOAD, bundle=bundle)),
        setup=setup, rounds=300, warmup_rounds=5,
    )
    assert parse_envelope(envelope)["t"] == e2ee.T_PREKEY and parse_envelope(envelope)["opk"] is not None


def test_prekey_decrypt(benchmark):
    bob = DeviceState.create(*BOB)
    _note(benchmark, "session accepted: X3DH passive side + ratchet set-up + one-time prekey deleted")
    counter = iter(range(1_000_000))

    def setup():  # a new sender device each round (Bob keeps one session per sender)
        sender = (f"a{next(counter)}@alpha", 1)
        alice = DeviceState.create(*sender)
        return (sender, _run(alice.encrypt(BOB[0], BOB[1], PAYLOAD, bundle=_bundle(bob, BOB[1])))), {}

    plaintext = benchmark.pedantic(
        lambda sender, envelope: _run(bob.decrypt(sender[0], sender[1], envelope)), setup=setup, rounds=300, warmup_rounds=5
    )
    assert plaintext == PAYLOAD and not bob.otpks


# -- groups: sender keys


def _group_pair() -> tuple[DeviceState, DeviceState]:
    alice, bob = DeviceState.create(*ALICE), DeviceState.create(*BOB)
    distribution = msgpack.unpackb(msgpack.packb(alice.own_sender_key(GROUP).distribution()))
    bob.accept_sender_key(ALICE[0], ALICE[1], distribution)
    return alice, bob


def test_group_encrypt(benchmark):
    alice, _ = _group_pair()
    _note(benchmark, "sender-key message (HMAC chain, AES-256-GCM, Ed25519 signature)")
    envelope = benchmark(alice.encrypt_group, GROUP, PAYLOAD)
    benchmark.extra_info["envelope_bytes"] = len(envelope)
    assert parse_envelope(envelope)["t"] == e2ee.T_GROUP


def test_group_decrypt(benchmark):
    alice, bob = _group_pair()
    _note(benchmark, "sender-key message, next in order (Ed25519 verification, AES-256-GCM)")

    def setup():
        return (alice.encrypt_group(GROUP, PAYLOAD),), {}

    plaintext = benchmark.pedantic(
        lambda envelope: bob.decrypt_group(ALICE[0], ALICE[1], envelope), setup=setup, rounds=2000, warmup_rounds=20
    )
    assert plaintext == PAYLOAD


# -- the state file: E2EEClient saves it after every message


def _with_sessions(peers: int) -> DeviceState:
    """Bob with ``peers`` established sessions, a sender key and a full redelivery memory."""
    bob = DeviceState.create(*BOB)
    for i in range(peers):
        peer = DeviceState.create(f"p{i}@alpha", 1)
        _run(bob.decrypt(peer.user, 1, _run(peer.encrypt(BOB[0], BOB[1], PAYLOAD, bundle=_bundle(bob, BOB[1])))))
        _run(peer.decrypt(BOB[0], BOB[1], _run(bob.encrypt(peer.user, 1, PAYLOAD))))
    bob.own_sender_key(GROUP).encrypt(PAYLOAD)
    for _ in range(e2ee.SEEN_MEMORY if peers > 1 else 1):
        bob.first_time("p0@alpha", os.urandom(16))
    return bob


@pytest.mark.parametrize("peers", [1, 50])
def test_state_to_bytes(benchmark, peers):
    state = _with_sessions(peers)
    data = benchmark(state.to_bytes)
    benchmark.extra_info["state_bytes"] = len(data)
    benchmark.extra_info["sessions"] = peers


@pytest.mark.parametrize("peers", [1, 50])
def test_state_save(benchmark, tmp_path, peers):
    """Atomic write with two fsyncs: the figure depends on the disk under ``tmp_path``."""
    state = _with_sessions(peers)
    path = tmp_path / "device.state"
    benchmark.pedantic(state.save, args=(path,), rounds=200 if peers == 1 else 100, warmup_rounds=3)
    benchmark.extra_info["state_bytes"] = path.stat().st_size
    benchmark.extra_info["sessions"] = peers
    benchmark.extra_info["folder"] = str(tmp_path)
