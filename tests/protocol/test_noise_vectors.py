"""NoiseSession against the published Noise test vectors, noiseprotocol itself, and Wycheproof low-order points.

Vector semantics (tests/vectors/README.md): handshake messages alternate initiator, responder, ...;
transport messages keep the alternation, so after XX (3 messages) the responder sends first and
after IK (2 messages) the initiator does. Transport messages go through the project's CipherState.
"""

from __future__ import annotations

import json
import os
import random
import re

import pytest
from noise.connection import Keypair, NoiseConnection

from interlink.core.protocol import _cipher_pure, cipher
from interlink.core.protocol.certs import x25519_public
from interlink.core.errors import HandshakeError
from interlink.core.protocol.noise import SUITES, NoiseSession, make_preamble

VECTOR_FILES = ("cacophony.txt", "snow.txt", "noise-c-basic.txt")
WANTED = re.compile(r"^Noise_(XX|IK)_25519_(ChaChaPoly|AESGCM)_(SHA256|BLAKE2s|BLAKE2b)$")
HANDSHAKE_MESSAGES = {"XX": 3, "IK": 2}

# Both transport-cipher implementations: the selected one (compiled unless INTERLINK_PURE=1) and the pure twin.
CIPHER_IMPLS = {"selected": cipher.CipherState, "pure": _cipher_pure.CipherState}


def _name(vector: dict) -> str:
    return vector.get("protocol_name") or vector.get("name", "")


@pytest.fixture(scope="module")
def noise_vectors(vectors_dir) -> list[tuple[str, dict]]:
    """Every Noise_XX_25519_* / Noise_IK_25519_* entry we support, as (file, vector)."""
    selected = []
    for filename in VECTOR_FILES:
        with open(vectors_dir / filename, encoding="utf-8") as handle:
            data = json.load(handle)
        selected += [(filename, v) for v in data["vectors"] if WANTED.match(_name(v))]
    return selected


def test_vector_selection(noise_vectors):
    assert len(noise_vectors) == 36
    for filename in VECTOR_FILES:
        names = [_name(v) for f, v in noise_vectors if f == filename]
        assert len(names) == 12 and len(set(names)) == 12, filename
        assert sum(n.startswith("Noise_XX_") for n in names) == 6
        assert sum(n.startswith("Noise_IK_") for n in names) == 6


def _replay(vector: dict) -> bool:
    """Replay one vector through two NoiseSessions; return whether a handshake hash was checked."""
    name = _name(vector)
    pattern = WANTED.match(name).group(1)
    h = bytes.fromhex
    resp_static = h(vector["resp_static"])
    remote_static = None
    if pattern == "IK":
        remote_static = x25519_public(resp_static)
        if "init_remote_static" in vector:
            assert h(vector["init_remote_static"]) == remote_static
    initiator = NoiseSession(
        name,
        initiator=True,
        static_private=h(vector["init_static"]),
        prologue=h(vector["init_prologue"]),
        remote_static=remote_static,
        ephemeral_private=h(vector["init_ephemeral"]),
    )
    responder = NoiseSession(
        name,
        initiator=False,
        static_private=resp_static,
        prologue=h(vector["resp_prologue"]),
        ephemeral_private=h(vector["resp_ephemeral"]),
    )
    handshake_messages = HANDSHAKE_MESSAGES[pattern]
    messages = vector["messages"]
    assert len(messages) > handshake_messages, "vector has no transport messages"
    for index, message in enumerate(messages):
        payload, expected = h(message["payload"]), h(message["ciphertext"])
        sender, receiver = (initiator, responder) if index % 2 == 0 else (responder, initiator)
        if index < handshake_messages:
            assert sender.needs_write and receiver.needs_read
            assert sender.write_message(payload) == expected, f"handshake message {index + 1}"
            assert receiver.read_message(expected) == payload, f"handshake message {index + 1}"
            if index == handshake_messages - 1:
                assert initiator.handshake_complete and responder.handshake_complete
                assert isinstance(initiator.send_cipher, cipher.CipherState)
                assert initiator.handshake_hash == responder.handshake_hash
                assert initiator.remote_static == responder.static_public == x25519_public(resp_static)
                assert responder.remote_static == initiator.static_public == x25519_public(h(vector["init_static"]))
        else:
            assert sender.encrypt(payload) == expected, f"transport message {index + 1}"
            assert receiver.decrypt(expected) == payload, f"transport message {index + 1}"
    if "handshake_hash" in vector:
        assert initiator.handshake_hash == h(vector["handshake_hash"])
        return True
    return False


def test_replay_noise_vectors(noise_vectors, subtests):
    ran = hashed = 0
    for filename, vector in noise_vectors:
        with subtests.test(msg=f"{filename}: {_name(vector)}"):
            hashed += _replay(vector)
            ran += 1
    assert ran == 36
    assert hashed == 24  # cacophony and noise-c give handshake_hash; snow does not


# ----------------------------------------------------------- noiseprotocol interop


def _noise_connection(name: str, *, initiator: bool, static: bytes, prologue: bytes, remote: bytes | None):
    conn = NoiseConnection.from_name(name.encode())
    conn.set_prologue(prologue)
    conn.set_as_initiator() if initiator else conn.set_as_responder()
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static)
    if remote is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote)
    conn.start_handshake()
    return conn


def _message_sizes():
    sizes = [0, 1, 15, 16, 17, 63, 64, 65, 1000, 65535 - 16]
    rng = random.Random(7)
    sizes += [rng.randrange(0, 4096) for _ in range(90)]
    return sizes


@pytest.mark.parametrize("suite", sorted(SUITES), ids=lambda s: SUITES[s])
@pytest.mark.parametrize("session_is_initiator", [True, False], ids=["session-initiator", "session-responder"])
def test_interop_with_noiseprotocol(suite, session_is_initiator):
    """A plain noiseprotocol NoiseConnection on one side, NoiseSession on the other, many messages each way."""
    name = SUITES[suite]
    prologue = make_preamble(suite)
    conn_static, session_static = os.urandom(32), os.urandom(32)
    ik = name.startswith("Noise_IK_")
    if session_is_initiator:
        conn = _noise_connection(name, initiator=False, static=conn_static, prologue=prologue, remote=None)
        session = NoiseSession(
            name, initiator=True, static_private=session_static, prologue=prologue,
            remote_static=x25519_public(conn_static) if ik else None,
        )
    else:
        conn = _noise_connection(
            name, initiator=True, static=conn_static, prologue=prologue,
            remote=x25519_public(session_static) if ik else None,
        )
        session = NoiseSession(name, initiator=False, static_private=session_static, prologue=prologue)

    step = 0
    while not session.handshake_complete:
        payload = f"payload {step}".encode()
        if session.needs_write:
            assert bytes(conn.read_message(session.write_message(payload))) == payload
        else:
            assert session.read_message(bytes(conn.write_message(payload))) == payload
        step += 1
    assert conn.handshake_finished
    assert session.handshake_hash == conn.get_handshake_hash()
    assert session.remote_static == x25519_public(conn_static)

    for size in _message_sizes():
        message = os.urandom(size)
        assert conn.decrypt(session.encrypt(message)) == message
        reply = os.urandom(size)
        assert session.decrypt(conn.encrypt(reply)) == reply
    assert session.send_cipher.nonce == session.recv_cipher.nonce == len(_message_sizes())


def _noise_pair(name: str):
    """Two plain noiseprotocol connections after a completed handshake."""
    prologue = b"interop"
    resp_static = os.urandom(32)
    ik = name.startswith("Noise_IK_")
    init = _noise_connection(
        name, initiator=True, static=os.urandom(32), prologue=prologue,
        remote=x25519_public(resp_static) if ik else None,
    )
    resp = _noise_connection(name, initiator=False, static=resp_static, prologue=prologue, remote=None)
    sender, receiver = init, resp
    while not (init.handshake_finished and resp.handshake_finished):
        receiver.read_message(bytes(sender.write_message(b"")))
        sender, receiver = receiver, sender
    return init, resp


@pytest.mark.parametrize("impl", sorted(CIPHER_IMPLS))
@pytest.mark.parametrize("suite", sorted(SUITES), ids=lambda s: SUITES[s])
@pytest.mark.parametrize("start_nonce", [0, 2**32 - 2, 2**63 + 5], ids=["n0", "n2^32", "n2^63"])
def test_cipherstate_byte_identical_to_noiseprotocol(impl, suite, start_nonce):
    """Same key and nonce: the project's CipherState and noiseprotocol's produce identical ciphertexts."""
    project_cipher = CIPHER_IMPLS[impl]
    name = SUITES[suite]
    cipher_name = name.split("_")[3]
    init, resp = _noise_pair(name)
    for sender, receiver in ((init, resp), (resp, init)):
        noise_send = sender.noise_protocol.cipher_state_encrypt
        noise_recv = receiver.noise_protocol.cipher_state_decrypt
        assert noise_send.k == noise_recv.k
        noise_send.set_nonce(start_nonce)
        noise_recv.set_nonce(start_nonce)
        ours_send = project_cipher(cipher_name, noise_send.k, start_nonce)
        ours_recv = project_cipher(cipher_name, noise_recv.k, start_nonce)
        for size in _message_sizes()[:40]:
            message = os.urandom(size)
            theirs = sender.encrypt(message)
            ours = ours_send.encrypt(message)
            assert ours == theirs
            assert receiver.decrypt(ours) == message
            assert ours_recv.decrypt(theirs) == message
        assert ours_send.nonce == noise_send.n == start_nonce + 40


# ----------------------------------------------------------- low-order X25519 points


@pytest.fixture(scope="module")
def low_order_points(vectors_dir) -> list[dict]:
    with open(vectors_dir / "wycheproof" / "x25519_test.json", encoding="utf-8") as handle:
        data = json.load(handle)
    tests = [
        test
        for group in data["testGroups"]
        for test in group["tests"]
        if {"ZeroSharedSecret", "LowOrderPublic"} & set(test["flags"])
    ]
    assert len(tests) == 31
    assert all(test["shared"] == "00" * 32 for test in tests)
    return tests


def _assert_dead(session: NoiseSession) -> None:
    assert session.dead and not session.handshake_complete
    assert not session.needs_write and not session.needs_read
    for call in (lambda: session.write_message(b""), lambda: session.read_message(b"\x00" * 96),
                 lambda: session.encrypt(b"x"), lambda: session.decrypt(b"\x00" * 32)):
        with pytest.raises(HandshakeError, match="dead"):
            call()


def test_low_order_ephemeral_ik_responder(low_order_points):
    """(a) IK responder reads message 1 whose ephemeral is a low-order point: es = DH(s, re) is all zero."""
    aborted = 0
    for test in low_order_points:
        point, private = bytes.fromhex(test["public"]), bytes.fromhex(test["private"])
        for name in (SUITES[0x11], SUITES[0x12]):
            responder = NoiseSession(name, initiator=False, static_private=private, prologue=b"IL\x01\x11")
            message1 = point + os.urandom(32 + 16 + 16)
            with pytest.raises(HandshakeError, match="low-order") as info:
                responder.read_message(message1)
            assert "message 1" in str(info.value), test["tcId"]
            _assert_dead(responder)
        aborted += 1
    assert aborted == 31


def test_low_order_ephemeral_xx_responder(low_order_points):
    """(b) XX responder accepts message 1 (just e) and then fails computing ee in write_message."""
    aborted = 0
    for test in low_order_points:
        point, private = bytes.fromhex(test["public"]), bytes.fromhex(test["private"])
        for name in (SUITES[0x01], SUITES[0x02]):
            responder = NoiseSession(
                name, initiator=False, static_private=os.urandom(32), prologue=b"IL\x01\x01",
                ephemeral_private=private,
            )
            assert responder.read_message(point) == b""
            assert responder.needs_write
            with pytest.raises(HandshakeError, match="message 2 .write.*low-order"):
                responder.write_message(b"hello")
            _assert_dead(responder)
        aborted += 1
    assert aborted == 31


def test_low_order_ephemeral_xx_initiator(low_order_points):
    """(c) XX initiator reads message 2 whose ephemeral is a low-order point: ee fails before any MAC check."""
    aborted = 0
    for test in low_order_points:
        point, private = bytes.fromhex(test["public"]), bytes.fromhex(test["private"])
        for name in (SUITES[0x01], SUITES[0x02]):
            initiator = NoiseSession(
                name, initiator=True, static_private=os.urandom(32), prologue=b"IL\x01\x01",
                ephemeral_private=private,
            )
            initiator.write_message(b"")
            message2 = point + os.urandom(32 + 16 + 16)
            with pytest.raises(HandshakeError, match="message 2 .read.*low-order"):
                initiator.read_message(message2)
            _assert_dead(initiator)
        aborted += 1
    assert aborted == 31
