"""The Noise handshake state, compiled and pure, proven against the reference byte for byte.

Every case runs on both twins (``tests/twins.py``). The expected bytes come from outside the code
under test: the published vectors (36 XX/IK entries), and ``noiseprotocol`` — the reference
implementation — run on the same keys and ephemerals (its handshake messages, handshake hash
and split keys). Then the ways a handshake must fail: the 31 low-order X25519 points as
ephemeral or static keys, tampered, truncated and over-long messages, calls out of turn.
"""

from __future__ import annotations

import gc

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings, strategies as st
from noise.backends.default.keypairs import KeyPair25519
from noise.connection import NoiseConnection

from interlink.core.errors import HandshakeError
from interlink.core.protocol.certs import x25519_public

from protocol.test_noise_vectors import (  # noqa: F401 (two of them are fixtures)
    HANDSHAKE_MESSAGES,
    WANTED,
    _name,
    _noise_connection,
    low_order_points,
    noise_vectors,
)
from twins import twin_fixture, twin_modules

TWINS = compiled, pure = twin_modules("_handshake")
handshake = twin_fixture("_handshake")  # the module under test: compiled, then pure

PROTOCOL_NAMES = [
    f"Noise_{pattern}_25519_{cipher}_{hash_name}"
    for pattern in ("XX", "IK")
    for cipher in ("ChaChaPoly", "AESGCM")
    for hash_name in ("SHA256", "BLAKE2s", "BLAKE2b")
]
XX, IK = "Noise_XX_25519_ChaChaPoly_SHA256", "Noise_IK_25519_AESGCM_SHA256"
MAX_MESSAGE_BYTES = 65535
HYPOTHESIS = settings(max_examples=60, deadline=None)


def state(twin, name: str, *, initiator: bool, static: bytes, prologue: bytes = b"IL",
          remote: bytes | None = None, ephemeral: bytes | None = None):
    return twin.HandshakeState(name, initiator, twin.StaticKey(static), prologue, remote, ephemeral)


def reference(name: str, *, initiator: bool, static: bytes, prologue: bytes = b"IL",
              remote: bytes | None = None, ephemeral: bytes | None = None) -> NoiseConnection:
    """A ``noiseprotocol`` connection with the same inputs as ``state``."""
    conn = _noise_connection(name, initiator=initiator, static=static, prologue=prologue, remote=remote)
    if ephemeral is not None:
        # Set after start_handshake (which warns about preset ephemerals); "e" is read when written.
        conn.noise_protocol.handshake_state.e = KeyPair25519.from_private_bytes(ephemeral)
    return conn


def reference_keys(conn: NoiseConnection) -> tuple[bytes, bytes, bytes]:
    """(send key, receive key, handshake hash) of a completed reference connection."""
    protocol = conn.noise_protocol
    return protocol.cipher_state_encrypt.k, protocol.cipher_state_decrypt.k, protocol.handshake_hash


def aead(name: str, key: bytes):
    return (ChaCha20Poly1305 if "_ChaChaPoly_" in name else AESGCM)(key)


def nonce(name: str, n: int) -> bytes:
    return b"\x00" * 4 + n.to_bytes(8, "little" if "_ChaChaPoly_" in name else "big")


def pair(twin, name: str, prologue: bytes = b"IL"):
    """(initiator, responder) with fresh static keys and random ephemerals."""
    responder_static = X25519PrivateKey.generate().private_bytes_raw()
    remote = x25519_public(responder_static) if "_IK_" in name else None
    initiator = state(twin, name, initiator=True, static=X25519PrivateKey.generate().private_bytes_raw(),
                      prologue=prologue, remote=remote)
    return initiator, state(twin, name, initiator=False, static=responder_static, prologue=prologue)


def run(initiator, responder, payloads=None) -> list[bytes]:
    """Shuttle every handshake message; the payloads each receiver read."""
    received, sender, receiver = [], initiator, responder
    while not (initiator.complete and responder.complete):
        payload = payloads[len(received)] if payloads else b""
        received.append(receiver.read_message(sender.write_message(payload)))
        sender, receiver = receiver, sender
    return received


def assert_dead(handshake_state, reason: str) -> None:
    """``handshake_state`` died of ``reason``, holds no keys, and refuses every further message."""
    assert handshake_state.error is not None and reason in handshake_state.error
    assert not handshake_state.complete and handshake_state.send_key is None and handshake_state.recv_key is None
    for call in (lambda: handshake_state.write_message(b""), lambda: handshake_state.read_message(b"\x00" * 96)):
        with pytest.raises(HandshakeError, match="dead"):
            call()


# ------------------------------------------------------------------ the published vectors


def test_every_vector_byte_for_byte(handshake, noise_vectors, subtests):
    """Messages as published; handshake hash as published (where given) and as noiseprotocol's;
    split keys as noiseprotocol's, and they encrypt the vector's transport messages as published."""
    replayed = 0
    for filename, vector in noise_vectors:
        name = _name(vector)
        with subtests.test(msg=f"{filename}: {name}"):
            h = bytes.fromhex
            ik = WANTED.match(name).group(1) == "IK"
            inputs = {
                True: dict(static=h(vector["init_static"]), prologue=h(vector["init_prologue"]),
                           ephemeral=h(vector["init_ephemeral"]),
                           remote=x25519_public(h(vector["resp_static"])) if ik else None),
                False: dict(static=h(vector["resp_static"]), prologue=h(vector["resp_prologue"]),
                            ephemeral=h(vector["resp_ephemeral"])),
            }
            ours = {role: state(handshake, name, initiator=role, **inputs[role]) for role in (True, False)}
            theirs = {role: reference(name, initiator=role, **inputs[role]) for role in (True, False)}
            count = HANDSHAKE_MESSAGES[WANTED.match(name).group(1)]
            for index, message in enumerate(vector["messages"][:count]):
                payload, expected = h(message["payload"]), h(message["ciphertext"])
                sender = index % 2 == 0  # the initiator writes the even messages
                assert ours[sender].write_message(payload) == expected, f"message {index + 1}"
                assert bytes(theirs[sender].write_message(payload)) == expected
                assert ours[not sender].read_message(expected) == payload
                theirs[not sender].read_message(expected)
            for role in (True, False):
                send_key, recv_key, handshake_hash = reference_keys(theirs[role])
                assert ours[role].complete and ours[role].messages_done == count
                assert (ours[role].send_key, ours[role].recv_key) == (send_key, recv_key)
                assert ours[role].send_nonce == ours[role].recv_nonce == 0
                assert ours[role].handshake_hash == handshake_hash
                if "handshake_hash" in vector:
                    assert handshake_hash == h(vector["handshake_hash"])
            assert ours[True].remote_static == x25519_public(inputs[False]["static"])
            assert ours[False].remote_static == x25519_public(inputs[True]["static"])
            # Transport messages keep the alternation: after XX the responder sends first.
            for number, message in enumerate(vector["messages"][count:]):
                sender = ours[(count + number) % 2 == 0]
                direction_count = number // 2
                assert aead(name, sender.send_key).encrypt(
                    nonce(name, direction_count), h(message["payload"]), b"") == h(message["ciphertext"])
            replayed += 1
    assert replayed == 36


# ------------------------------------------------------------------ random handshakes


@HYPOTHESIS
@given(
    twin=st.sampled_from(TWINS),
    name=st.sampled_from(PROTOCOL_NAMES),
    ours_initiates=st.booleans(),
    statics=st.lists(st.binary(min_size=32, max_size=32), min_size=2, max_size=2),
    ephemeral=st.one_of(st.none(), st.binary(min_size=32, max_size=32)),
    prologue=st.binary(max_size=64),
    payloads=st.lists(st.binary(max_size=300), min_size=3, max_size=3),
)
def test_random_handshakes_match_noiseprotocol(twin, name, ours_initiates, statics, ephemeral, prologue, payloads):
    """Ours on one side, noiseprotocol on the other. With a preset ephemeral, a noiseprotocol
    shadow of our side given the same keys must write exactly our bytes."""
    ours_static, peer_static = statics
    remote_for = {True: None, False: None}
    if "_IK_" in name:
        remote_for[True] = x25519_public(peer_static if ours_initiates else ours_static)
    ours_inputs = dict(initiator=ours_initiates, static=ours_static, prologue=prologue,
                       remote=remote_for[ours_initiates], ephemeral=ephemeral)
    ours = state(twin, name, **ours_inputs)
    shadow = reference(name, **ours_inputs) if ephemeral is not None else None
    peer = reference(name, initiator=not ours_initiates, static=peer_static, prologue=prologue,
                     remote=remote_for[not ours_initiates])
    count = 3 if "_XX_" in name else 2
    for index in range(count):
        payload = payloads[index]
        if (index % 2 == 0) == ours_initiates:
            message = ours.write_message(payload)
            if shadow is not None:
                assert message == bytes(shadow.write_message(payload))
            assert bytes(peer.read_message(message)) == payload
        else:
            message = bytes(peer.write_message(payload))
            assert ours.read_message(message) == payload
            if shadow is not None:
                assert bytes(shadow.read_message(message)) == payload
    assert ours.complete and peer.handshake_finished
    peer_send, peer_recv, peer_hash = reference_keys(peer)
    assert (ours.send_key, ours.recv_key, ours.handshake_hash) == (peer_recv, peer_send, peer_hash)
    if shadow is not None:
        assert (ours.send_key, ours.recv_key, ours.handshake_hash) == reference_keys(shadow)
    assert ours.remote_static == x25519_public(peer_static)


@HYPOTHESIS
@given(
    name=st.sampled_from(PROTOCOL_NAMES),
    keys=st.lists(st.binary(min_size=32, max_size=32), min_size=4, max_size=4),
    prologue=st.binary(max_size=40),
    payloads=st.lists(st.binary(max_size=200), min_size=3, max_size=3),
    initiator_twin=st.sampled_from(TWINS),
)
def test_the_twins_write_the_same_bytes(name, keys, prologue, payloads, initiator_twin):
    """Compiled and pure, given the same keys, write identical messages and end identical; one
    twin on each side completes too."""
    init_static, resp_static, init_ephemeral, resp_ephemeral = keys
    remote = x25519_public(resp_static) if "_IK_" in name else None
    results = []
    for twin in TWINS:
        initiator = state(twin, name, initiator=True, static=init_static, prologue=prologue, remote=remote,
                          ephemeral=init_ephemeral)
        responder = state(twin, name, initiator=False, static=resp_static, prologue=prologue,
                          ephemeral=resp_ephemeral)
        messages, sender, receiver = [], initiator, responder
        while not initiator.complete:
            messages.append(sender.write_message(payloads[len(messages)]))
            assert receiver.read_message(messages[-1]) == payloads[len(messages) - 1]
            sender, receiver = receiver, sender
        results.append((messages, initiator.send_key, initiator.recv_key, initiator.handshake_hash,
                        responder.send_key, responder.handshake_hash))
    assert results[0] == results[1]
    responder_twin = pure if initiator_twin is compiled else compiled
    mixed = (state(initiator_twin, name, initiator=True, static=init_static, prologue=prologue, remote=remote),
             state(responder_twin, name, initiator=False, static=resp_static, prologue=prologue))
    run(*mixed, payloads)
    assert mixed[0].send_key == mixed[1].recv_key and mixed[0].handshake_hash == mixed[1].handshake_hash


# ------------------------------------------------------------------ what a completed state keeps


@pytest.mark.parametrize("name", [XX, IK])
def test_a_completed_state_keeps_no_handshake_secret(handshake, name):
    initiator, responder = pair(handshake, name)
    payloads = [b"one", b"two", b"three"]
    assert run(initiator, responder, payloads) == payloads[: 3 if name == XX else 2]
    for side in (initiator, responder):
        held = gc.get_referents(side)
        assert not any(type(obj).__name__.startswith("X25519Private") for obj in held)
        assert not any(type(obj) in (ChaCha20Poly1305, AESGCM) for obj in held)
        assert not any(isinstance(obj, handshake.StaticKey) for obj in held)
        assert len(side.send_key) == len(side.recv_key) == 32 and len(side.handshake_hash) == 32
    assert (initiator.send_key, initiator.recv_key) == (responder.recv_key, responder.send_key)


def test_the_hash_length_follows_the_suite(handshake):
    initiator, responder = pair(handshake, "Noise_XX_25519_AESGCM_BLAKE2b")
    run(initiator, responder)
    assert len(initiator.handshake_hash) == 64 and len(initiator.send_key) == 32


# ------------------------------------------------------------------ low-order points


def _low_order_static_pair(point: bytes, private: bytes) -> KeyPair25519:
    """A noiseprotocol key pair that announces ``point`` as its public key; its own DH still uses ``private``."""
    genuine = KeyPair25519.from_private_bytes(private)
    return KeyPair25519(private=genuine.private, public=genuine.public, public_bytes=point)


def test_low_order_ephemerals_abort_cleanly(handshake, low_order_points):
    """The peer's ephemeral is a low-order point: the first DH with it gives all zero, and the
    state dies with the reason (IK responder reading message 1, XX responder writing message 2,
    XX and IK initiators reading message 2)."""
    aborted = 0
    for test in low_order_points:
        point, private = bytes.fromhex(test["public"]), bytes.fromhex(test["private"])
        responder = state(handshake, IK, initiator=False, static=private)
        with pytest.raises(HandshakeError, match=r"IK handshake message 1 \(read\).*low-order"):
            responder.read_message(point + bytes(64))
        assert_dead(responder, "low-order")

        responder = state(handshake, XX, initiator=False, static=private, ephemeral=private)
        assert responder.read_message(point) == b""
        with pytest.raises(HandshakeError, match=r"XX handshake message 2 \(write\).*low-order"):
            responder.write_message(b"hello")
        assert_dead(responder, "low-order")

        for name in (XX, IK):
            initiator = state(handshake, name, initiator=True, static=private, ephemeral=private,
                              remote=x25519_public(private) if name == IK else None)
            initiator.write_message(b"")
            with pytest.raises(HandshakeError, match=r"message 2 \(read\).*low-order"):
                initiator.read_message(point + bytes(48 if name == XX else 16) + bytes(16))
            assert_dead(initiator, "low-order")
        aborted += 1
    assert aborted == 31


def test_low_order_static_keys_abort_cleanly(handshake, low_order_points):
    """A peer whose encrypted static key (correctly authenticated) is a low-order point: the
    next DH with it (XX "se" in message 3, IK "ss" in message 1) gives all zero."""
    aborted = 0
    responder_static = X25519PrivateKey.generate().private_bytes_raw()
    for test in low_order_points:
        point = bytes.fromhex(test["public"])
        for name in (XX, IK):
            peer = reference(name, initiator=True, static=bytes(range(32)), prologue=b"IL",
                             remote=x25519_public(responder_static) if name == IK else None)
            peer.noise_protocol.handshake_state.s = _low_order_static_pair(point, bytes(range(32)))
            responder = state(handshake, name, initiator=False, static=responder_static)
            last = 3 if name == XX else 1
            with pytest.raises(HandshakeError, match=rf"message {last} \(read\).*low-order"):
                for _ in range(last // 2):
                    responder.read_message(bytes(peer.write_message(b"")))
                    peer.read_message(responder.write_message(b""))
                responder.read_message(bytes(peer.write_message(b"")))
            assert_dead(responder, "low-order")
        aborted += 1
    assert aborted == 31


# ------------------------------------------------------------------ malformed messages


def at_message(twin, name: str, index: int):
    """(sender, receiver) of message ``index`` (from 0) of a fresh handshake, the earlier ones exchanged."""
    sender, receiver = pair(twin, name)
    for _ in range(index):
        receiver.read_message(sender.write_message(b""))
        sender, receiver = receiver, sender
    return sender, receiver


@pytest.mark.parametrize("name", [XX, IK, "Noise_XX_25519_AESGCM_BLAKE2s", "Noise_IK_25519_ChaChaPoly_BLAKE2b"])
def test_truncated_messages(handshake, name):
    """A message cut anywhere below its fixed part (keys, tags) is refused by its length."""
    pattern = name.split("_")[1]
    for index, overhead in enumerate(handshake.OVERHEAD_BYTES[pattern]):
        for cut in sorted({0, 1, overhead // 2, overhead - 1}):
            sender, receiver = at_message(handshake, name, index)
            message = sender.write_message(b"")
            assert len(message) == overhead
            with pytest.raises(HandshakeError, match=(
                    rf"truncated {pattern} handshake message {index + 1}: {cut} bytes, at least {overhead} required")):
                receiver.read_message(message[:cut])
            assert_dead(receiver, "truncated")


@pytest.mark.parametrize("name", [XX, IK])
def test_over_long_messages(handshake, name):
    _, responder = pair(handshake, name)
    with pytest.raises(HandshakeError, match=f"message 1 of {MAX_MESSAGE_BYTES + 1} bytes exceeds {MAX_MESSAGE_BYTES}"):
        responder.read_message(bytes(MAX_MESSAGE_BYTES + 1))
    assert_dead(responder, "exceeds")
    # One byte more than was written: an encrypted payload then fails its tag; XX message 1's
    # payload travels in clear, so the byte is simply part of it.
    initiator, responder = pair(handshake, name)
    message = initiator.write_message(b"auth")
    if name == XX:
        assert responder.read_message(message + b"!") == b"auth!"
    else:
        with pytest.raises(HandshakeError, match="message 1 .read.: authentication failed"):
            responder.read_message(message + b"!")
        assert_dead(responder, "authentication failed")


@HYPOTHESIS
@given(
    twin=st.sampled_from(TWINS),
    name=st.sampled_from(PROTOCOL_NAMES),
    message_index=st.integers(0, 2),
    position=st.integers(0, 10_000),
    flip=st.integers(1, 255),
)
def test_a_tampered_message_never_completes(twin, name, message_index, position, flip):
    """Any flipped byte of any message makes one side raise HandshakeError (XX message 1 is a bare
    ephemeral key: the mismatch surfaces when its answer is read)."""
    initiator, responder = pair(twin, name)
    count = 3 if "_XX_" in name else 2
    message_index %= count
    sender, receiver = initiator, responder
    with pytest.raises(HandshakeError, match="authentication failed|low-order"):
        for index in range(count):
            message = bytearray(sender.write_message(b"payload"))
            if index == message_index:
                message[position % len(message)] ^= flip
            receiver.read_message(bytes(message))
            sender, receiver = receiver, sender
    assert initiator.error is not None or responder.error is not None
    assert not (initiator.complete and responder.complete)


@pytest.mark.parametrize("name", [XX, IK])
def test_a_wrong_prologue_or_remote_key_fails_authentication(handshake, name):
    initiator, _ = pair(handshake, name, prologue=b"IL\x01\x01")
    _, responder = pair(handshake, name, prologue=b"IL\x01\x02")
    if name == IK:  # the initiator was told another responder's key, and the prologues differ
        with pytest.raises(HandshakeError, match="message 1 .read.: authentication failed"):
            responder.read_message(initiator.write_message(b""))
    else:
        responder.read_message(initiator.write_message(b""))
        with pytest.raises(HandshakeError, match="message 2 .read.: authentication failed"):
            initiator.read_message(responder.write_message(b""))


# ------------------------------------------------------------------ calls out of turn, local mistakes


def test_wrong_turn_calls_kill_the_state(handshake):
    initiator, responder = pair(handshake, XX)
    with pytest.raises(HandshakeError, match=r"wrong turn: XX handshake message 1 is ours to write; call write_message"):
        initiator.read_message(bytes(32))
    assert_dead(initiator, "wrong turn")
    with pytest.raises(HandshakeError, match=r"wrong turn: XX handshake message 1 comes from the peer; call read_message"):
        responder.write_message(b"")
    assert_dead(responder, "wrong turn")

    initiator, responder = pair(handshake, IK)
    responder.read_message(initiator.write_message(b""))
    with pytest.raises(HandshakeError, match="wrong turn: IK handshake message 2 comes from the peer"):
        initiator.write_message(b"")
    assert initiator.messages_done == 1
    assert_dead(initiator, "wrong turn")


def test_calls_after_completion_kill_the_state(handshake):
    initiator, responder = pair(handshake, IK)
    run(initiator, responder)
    assert initiator.complete
    with pytest.raises(HandshakeError, match="cannot write a handshake message: the handshake is already complete"):
        initiator.write_message(b"")
    assert_dead(initiator, "already complete")
    with pytest.raises(HandshakeError, match="cannot read a handshake message"):
        responder.read_message(bytes(48))
    assert_dead(responder, "already complete")


def test_local_mistakes_change_nothing(handshake):
    """A payload that is not bytes, or too large for one message, is refused before anything
    changes: the same state then completes the handshake."""
    initiator, responder = pair(handshake, XX)
    with pytest.raises(TypeError, match="payload must be bytes"):
        initiator.write_message("text")
    with pytest.raises(ValueError, match=r"does not fit .* \(max 65503 for XX message 1\)"):
        initiator.write_message(bytes(MAX_MESSAGE_BYTES - 31))
    assert initiator.error is None and initiator.messages_done == 0
    largest = bytes(MAX_MESSAGE_BYTES - 32)
    message = initiator.write_message(bytearray(largest))
    assert len(message) == MAX_MESSAGE_BYTES and responder.read_message(memoryview(message)) == largest
    assert initiator.read_message(responder.write_message(b"two")) == b"two"
    assert responder.read_message(initiator.write_message(b"three")) == b"three"
    assert initiator.complete and responder.complete

    _, responder = pair(handshake, XX)
    with pytest.raises(HandshakeError, match="handshake message must be bytes, got str"):
        responder.read_message("text")
    assert_dead(responder, "must be bytes")


def test_constructor_checks(handshake):
    key = bytes(range(32))
    static = handshake.StaticKey(key)
    assert static.public == x25519_public(key)
    for bad in ("Noise_NN_25519_ChaChaPoly_SHA256", "Noise_XX_448_ChaChaPoly_SHA256",
                "Noise_XX_25519_ChaChaPoly_SHA512", "Noise_XXpsk3_25519_AESGCM_SHA256", "", None, b"Noise_XX"):
        with pytest.raises(ValueError, match="unsupported Noise protocol"):
            handshake.HandshakeState(bad, True, static, b"")
    with pytest.raises(ValueError, match="IK initiator"):
        handshake.HandshakeState(IK, True, static, b"")
    with pytest.raises(ValueError, match="IK initiator"):
        handshake.HandshakeState(XX, True, static, b"", x25519_public(key))
    with pytest.raises(ValueError, match="IK initiator"):
        handshake.HandshakeState(IK, False, static, b"", x25519_public(key))
    with pytest.raises(ValueError, match="remote_static must be 32 bytes"):
        handshake.HandshakeState(IK, True, static, b"", key[:31])
    with pytest.raises(ValueError, match="ephemeral_private must be 32 bytes"):
        handshake.HandshakeState(XX, True, static, b"", None, key + b"!")
    with pytest.raises(ValueError, match="static_private must be 32 bytes"):
        handshake.StaticKey(key[:31])
    with pytest.raises(TypeError):
        handshake.StaticKey("x" * 32)
    with pytest.raises(TypeError):
        handshake.HandshakeState(XX, True, key, b"")  # raw bytes, not a StaticKey
    with pytest.raises(TypeError, match="prologue must be bytes"):
        handshake.HandshakeState(XX, True, static, "IL")
    fresh = handshake.HandshakeState(XX, True, static, b"")
    assert (fresh.pattern, fresh.cipher_name, fresh.initiator) == ("XX", "ChaChaPoly", True)
    assert fresh.messages_done == 0 and not fresh.complete and fresh.error is None
    assert fresh.remote_static is None and fresh.handshake_hash is None and fresh.send_key is None
