"""NoiseSession in memory: all suites, failures, turn-taking, dead sessions, preamble parsing, transport."""

from __future__ import annotations

import gc
import os

import pytest
from hypothesis import given, settings, strategies as st

from interlink.core.protocol import cipher
from interlink.core.protocol.certs import generate_static_key, x25519_public
from interlink.core.errors import DecryptError, HandshakeError, ProtocolError
from interlink.core.protocol.noise import (
    MAX_MESSAGE_BYTES,
    PREAMBLE_BYTES,
    SUITES,
    NoiseSession,
    PreambleError,
    UnknownSuiteError,
    make_preamble,
    parse_preamble,
)

ALL_SUITES = sorted(SUITES)


def make_pair(suite: int, *, remote_static: bytes | None = None, resp_prologue: bytes | None = None):
    """(initiator, responder) for ``suite``; IK initiators get the responder's key unless overridden."""
    name = SUITES[suite]
    prologue = make_preamble(suite)
    resp_static = generate_static_key()
    responder = NoiseSession(
        name, initiator=False, static_private=resp_static,
        prologue=prologue if resp_prologue is None else resp_prologue,
    )
    if name.startswith("Noise_IK_") and remote_static is None:
        remote_static = x25519_public(resp_static)
    initiator = NoiseSession(
        name, initiator=True, static_private=generate_static_key(), prologue=prologue, remote_static=remote_static
    )
    return initiator, responder


def run_handshake(initiator: NoiseSession, responder: NoiseSession, payloads=None) -> list[bytes]:
    """Shuttle handshake messages; return the payloads each receiver decrypted."""
    received = []
    sender, receiver = initiator, responder
    step = 0
    while not (initiator.handshake_complete and responder.handshake_complete):
        payload = payloads[step] if payloads else b""
        received.append(receiver.read_message(sender.write_message(payload)))
        sender, receiver = receiver, sender
        step += 1
    return received


# ------------------------------------------------------------------ happy path


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: SUITES[s])
def test_suite_completes_with_payloads(suite):
    initiator, responder = make_pair(suite)
    pattern = "XX" if suite < 0x10 else "IK"
    count = 3 if pattern == "XX" else 2
    payloads = [f"payload-{i}".encode() * (i + 1) for i in range(count)]

    assert initiator.pattern == responder.pattern == pattern
    assert initiator.cipher_name == ("ChaChaPoly" if suite & 0x0F == 1 else "AESGCM")
    assert initiator.initiator and not responder.initiator
    assert initiator.needs_write and not initiator.needs_read
    assert responder.needs_read and not responder.needs_write
    assert initiator.handshake_hash is None and responder.remote_static is None
    if pattern == "XX":
        assert initiator.remote_static is None
    with pytest.raises(HandshakeError, match="not complete"):
        initiator.encrypt(b"early")

    assert run_handshake(initiator, responder, payloads) == payloads
    for session in (initiator, responder):
        assert session.handshake_complete and not session.dead
        assert session.messages_done == count
        assert not session.needs_write and not session.needs_read
        assert isinstance(session.send_cipher, cipher.CipherState)
        assert isinstance(session.recv_cipher, cipher.CipherState)
        assert session.send_cipher.nonce == session.recv_cipher.nonce == 0
    assert initiator.handshake_hash == responder.handshake_hash
    assert len(initiator.handshake_hash) == 32
    assert initiator.remote_static == responder.static_public
    assert responder.remote_static == initiator.static_public
    for attribute in ("remote_static", "handshake_hash", "send_cipher", "pattern", "messages_done"):
        with pytest.raises(AttributeError):
            setattr(initiator, attribute, None)

    # Transport both ways, several messages, including empty and maximum size.
    for message in (b"", b"a", os.urandom(1000), os.urandom(MAX_MESSAGE_BYTES - 16)):
        ciphertext = initiator.encrypt(message)
        assert len(ciphertext) == len(message) + 16
        assert responder.decrypt(ciphertext) == message
        assert initiator.decrypt(responder.encrypt(message)) == message
    assert initiator.send_cipher.nonce == responder.recv_cipher.nonce == 4


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: SUITES[s])
def test_the_handshake_state_is_dropped_after_the_handshake(suite):
    initiator, responder = make_pair(suite)
    held = [gc.get_referents(session) for session in (initiator, responder)]
    assert all(any(type(obj).__name__ == "HandshakeState" for obj in referents) for referents in held)
    run_handshake(initiator, responder)
    for session in (initiator, responder):
        assert not hasattr(session, "__dict__")
        referents = gc.get_referents(session)
        # Neither twin's handshake state (with its ephemeral and static private keys) survives it.
        assert not any(type(obj).__name__ == "HandshakeState" for obj in referents)
        assert not any(type(obj).__module__.startswith(("noise.", "cryptography.")) for obj in referents)


def test_handshake_payload_limits():
    initiator, responder = make_pair(0x01)
    with pytest.raises(ValueError, match="does not fit"):
        initiator.write_message(b"x" * (MAX_MESSAGE_BYTES - 31))
    assert initiator.needs_write and not initiator.dead  # a local mistake does not kill the session
    largest = b"x" * (MAX_MESSAGE_BYTES - 32)
    message = initiator.write_message(largest)
    assert len(message) == MAX_MESSAGE_BYTES
    assert responder.read_message(message) == largest
    with pytest.raises(TypeError):
        responder.write_message("text")  # type: ignore[arg-type]


def test_oversized_incoming_handshake_message():
    _, responder = make_pair(0x11)
    with pytest.raises(HandshakeError, match="exceeds"):
        responder.read_message(b"\x00" * (MAX_MESSAGE_BYTES + 1))
    assert responder.dead


# --------------------------------------------------------------- failures


@pytest.mark.parametrize("suite", [0x11, 0x12], ids=lambda s: SUITES[s])
def test_ik_wrong_remote_static(suite):
    wrong = x25519_public(generate_static_key())
    initiator, responder = make_pair(suite, remote_static=wrong)
    message1 = initiator.write_message(b"auth")
    with pytest.raises(HandshakeError, match="message 1 .read.*authentication failed"):
        responder.read_message(message1)
    assert responder.dead and responder.remote_static is None


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: SUITES[s])
def test_prologue_mismatch_fails(suite):
    initiator, responder = make_pair(suite, resp_prologue=b"IL\x01\x7f")
    with pytest.raises(HandshakeError, match="authentication failed"):
        run_handshake(initiator, responder)
    assert initiator.dead or responder.dead
    assert not (initiator.handshake_complete and responder.handshake_complete)


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: SUITES[s])
def test_truncated_first_message(suite):
    initiator, _ = make_pair(suite)
    message1 = initiator.write_message(b"")
    fixed = 32 if suite < 0x10 else 96  # XX: e; IK: e, encrypted s, payload tag
    assert len(message1) == fixed
    for cut in sorted(c for c in {0, 1, 31, 32, fixed - 1} if c < fixed):
        _, responder = make_pair(suite)
        with pytest.raises(HandshakeError, match=f"truncated .. handshake message 1: {cut} bytes"):
            responder.read_message(message1[:cut])
        assert responder.dead


@pytest.mark.parametrize(
    "suite, index",
    [
        pytest.param(suite, index, id=f"{SUITES[suite]}-message{index + 1}")
        for suite in ALL_SUITES
        for index in ((1, 2) if suite < 0x10 else (1,))
    ],
)
def test_truncated_later_messages(suite, index):
    initiator, responder = make_pair(suite)
    sender, receiver = initiator, responder
    for _ in range(index):
        receiver.read_message(sender.write_message(b""))
        sender, receiver = receiver, sender
    message = sender.write_message(b"")
    with pytest.raises(HandshakeError, match="truncated"):
        receiver.read_message(message[:-1])
    assert receiver.dead


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: SUITES[s])
def test_garbage_handshake_message(suite):
    initiator, responder = make_pair(suite)
    if suite < 0x10:
        # XX message 1 is a bare ephemeral key: garbage is accepted, and the mismatch shows up
        # when the initiator reads message 2.
        responder.read_message(os.urandom(32))
        with pytest.raises(HandshakeError, match="authentication failed"):
            initiator.write_message(b"")
            initiator.read_message(responder.write_message(b""))
        assert initiator.dead
    else:
        with pytest.raises(HandshakeError, match="authentication failed"):
            responder.read_message(os.urandom(96 + 10))
        assert responder.dead


@settings(max_examples=60, deadline=None)
@given(
    suite=st.sampled_from(ALL_SUITES),
    message_index=st.integers(0, 2),
    position=st.integers(0, 10_000),
    flip=st.integers(1, 255),
)
def test_tampered_handshake_never_completes(suite, message_index, position, flip):
    """Flipping any byte of any handshake message makes one side raise HandshakeError."""
    initiator, responder = make_pair(suite)
    count = 3 if suite < 0x10 else 2
    message_index %= count
    sender, receiver = initiator, responder
    with pytest.raises(HandshakeError):
        for step in range(count):
            message = bytearray(sender.write_message(b"payload"))
            if step == message_index:
                message[position % len(message)] ^= flip
            receiver.read_message(bytes(message))
            sender, receiver = receiver, sender
    assert initiator.dead or responder.dead


def test_wrong_turn():
    initiator, responder = make_pair(0x01)
    with pytest.raises(HandshakeError, match="wrong turn.*write_message"):
        initiator.read_message(b"\x00" * 32)
    assert initiator.dead
    with pytest.raises(HandshakeError, match="wrong turn.*read_message"):
        responder.write_message(b"")
    assert responder.dead

    initiator, responder = make_pair(0x11)
    responder.read_message(initiator.write_message(b""))
    with pytest.raises(HandshakeError, match="wrong turn"):
        initiator.write_message(b"")  # message 2 is the responder's
    assert initiator.dead


def test_handshake_calls_after_completion_fail():
    initiator, responder = make_pair(0x02)
    run_handshake(initiator, responder)
    with pytest.raises(HandshakeError, match="already complete"):
        responder.write_message(b"")
    assert responder.dead and responder.send_cipher is None
    with pytest.raises(HandshakeError, match="dead"):
        responder.encrypt(b"x")


def test_dead_session_stays_dead():
    initiator, responder = make_pair(0x01)
    responder.read_message(initiator.write_message(b""))
    message2 = bytearray(responder.write_message(b""))
    message2[-1] ^= 1
    with pytest.raises(HandshakeError, match="authentication failed") as first:
        initiator.read_message(bytes(message2))
    assert isinstance(first.value, ProtocolError) and first.value.code == "bad_frame"
    reason = initiator.error
    assert initiator.dead and "authentication failed" in reason
    for _ in range(3):
        with pytest.raises(HandshakeError, match="dead"):
            initiator.read_message(bytes(message2))
        with pytest.raises(HandshakeError, match="dead"):
            initiator.write_message(b"")
        with pytest.raises(HandshakeError, match="dead"):
            initiator.encrypt(b"")
        with pytest.raises(HandshakeError, match="dead"):
            initiator.decrypt(b"\x00" * 16)
    assert initiator.error == reason  # the first reason is kept
    assert "dead" in repr(initiator)


def test_constructor_validation():
    key = generate_static_key()
    for bad in ("Noise_NN_25519_ChaChaPoly_SHA256", "Noise_XXpsk3_25519_ChaChaPoly_SHA256",
                "Noise_XX_448_ChaChaPoly_SHA256", "Noise_XX_25519_ChaChaPoly_SHA512",
                "Noise_XXfallback_25519_AESGCM_SHA256", "Noise_IK_25519_ChaChaPoly_SHA256 "):
        with pytest.raises(ValueError, match="unsupported Noise protocol"):
            NoiseSession(bad, initiator=True, static_private=key, prologue=b"")
    with pytest.raises(ValueError, match="IK initiator needs remote_static"):
        NoiseSession(SUITES[0x11], initiator=True, static_private=key, prologue=b"")
    with pytest.raises(ValueError, match="only given to an IK initiator"):
        NoiseSession(SUITES[0x01], initiator=True, static_private=key, prologue=b"", remote_static=key)
    with pytest.raises(ValueError, match="only given to an IK initiator"):
        NoiseSession(SUITES[0x11], initiator=False, static_private=key, prologue=b"", remote_static=key)
    with pytest.raises(ValueError, match="static_private must be 32 bytes"):
        NoiseSession(SUITES[0x01], initiator=True, static_private=key[:31], prologue=b"")
    with pytest.raises(TypeError):
        NoiseSession(SUITES[0x01], initiator=True, static_private=key, prologue="IL")  # type: ignore[arg-type]
    for name in ("Noise_XX_25519_AESGCM_BLAKE2b", "Noise_IK_25519_ChaChaPoly_BLAKE2s"):
        session = NoiseSession(name, initiator=False, static_private=key, prologue=b"")
        assert session.static_public == x25519_public(key)


# --------------------------------------------------------------- transport


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: SUITES[s])
def test_tampered_transport_raises_decrypt_error(suite):
    initiator, responder = make_pair(suite)
    run_handshake(initiator, responder)
    good = initiator.encrypt(b"hello gateway")
    for index in (0, len(good) // 2, len(good) - 1):
        tampered = bytearray(good)
        tampered[index] ^= 0x80
        with pytest.raises(DecryptError):
            responder.decrypt(bytes(tampered))
    with pytest.raises(DecryptError):
        responder.decrypt(good[:15])
    with pytest.raises(DecryptError):
        responder.decrypt(good + b"\x00")
    # A failed decryption leaves the nonce alone: the genuine message still decrypts, once.
    assert responder.recv_cipher.nonce == 0
    assert responder.decrypt(good) == b"hello gateway"
    with pytest.raises(DecryptError):
        responder.decrypt(good)  # replay: nonce moved on
    assert not responder.dead and responder.handshake_complete


def test_transport_directions_are_independent():
    initiator, responder = make_pair(0x01)
    run_handshake(initiator, responder)
    sent = initiator.encrypt(b"same")
    with pytest.raises(DecryptError):
        initiator.decrypt(sent)  # own message, wrong direction key
    assert responder.decrypt(sent) == b"same"


# ---------------------------------------------------------------- preamble


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_preamble_round_trip(suite):
    preamble = make_preamble(suite)
    assert len(preamble) == PREAMBLE_BYTES == 4
    assert preamble == b"IL\x01" + bytes([suite])
    assert parse_preamble(preamble) == suite
    assert parse_preamble(bytearray(preamble)) == suite


@pytest.mark.parametrize(
    "data, error, message",
    [
        (b"XL\x01\x01", PreambleError, "bad preamble magic"),
        (b"il\x01\x01", PreambleError, "bad preamble magic"),
        (b"IL\x02\x01", PreambleError, "unsupported protocol version 2"),
        (b"IL\x00\x01", PreambleError, "unsupported protocol version 0"),
        (b"IL\x01\x33", UnknownSuiteError, "unknown suite 0x33"),
        (b"IL\x01\x00", UnknownSuiteError, "unknown suite 0x00"),
        (b"IL\x01\x20", UnknownSuiteError, "unknown suite 0x20 .reserved for post-quantum"),
        (b"IL\x01\x2f", UnknownSuiteError, "unknown suite 0x2f .reserved"),
        (b"", PreambleError, "bad preamble length"),
        (b"IL\x01", PreambleError, "bad preamble length"),
        (b"IL\x01\x01\x00", PreambleError, "bad preamble length"),
    ],
)
def test_preamble_errors(data, error, message):
    with pytest.raises(error, match=message) as info:
        parse_preamble(data)
    assert isinstance(info.value, HandshakeError)
    assert info.value.code == "bad_frame"


def test_unknown_suite_carries_suite_byte():
    with pytest.raises(UnknownSuiteError) as info:
        parse_preamble(b"IL\x01\x33")
    assert info.value.suite == 0x33


def test_make_preamble_rejects_unknown_suite():
    with pytest.raises(ValueError, match="unknown suite 0x33"):
        make_preamble(0x33)
