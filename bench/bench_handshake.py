"""Noise handshake cost per suite (pytest-benchmark).

Run: ``.venv/bin/python -m pytest bench/bench_handshake.py --benchmark-only``
(``pytest bench`` collects only ``test_*.py`` files unless ``python_files`` includes ``bench_*.py``).

- ``full``: both sides, every handshake message, in memory, fresh random ephemerals; the gateway's
  server hello is a real msgpack payload and the client verifies it against the pinned root.
- ``responder``: the gateway's share only. The initiator's messages are precomputed with fixed
  ephemerals on both sides (the only way to replay message 3, which depends on the responder's
  ephemeral), so the responder loads its ephemeral from bytes instead of generating it; the cost
  of that is the same X25519 scalar multiplication.
- ``plain_noiseprotocol``: the full handshake with plain ``noiseprotocol`` NoiseConnections.
- ``state``: the handshake state alone, without ``NoiseSession`` around it, side by side: the
  compiled twin (``cython``), the pure twin (``pure``) and ``noiseprotocol`` (the reference the
  twins are proven against, and what ``NoiseSession`` ran before them), for the responder's share
  and for a full handshake (both sides, fresh random ephemerals).
- ``primitives``: the floor of the XX responder's share: the same ``cryptography``/``hashlib``
  calls on inputs of the same sizes (one X25519 key from private bytes, three exchanges, two
  public keys parsed, four HKDFs, eight hashes, three AEAD objects, two encryptions and two
  decryptions) with nothing around them.
"""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from noise.backends.default.keypairs import KeyPair25519
from noise.connection import Keypair, NoiseConnection

import interlink.core
import interlink.core.protocol._handshake_pure as handshake_pure
import interlink.ext._handshake as handshake_native
from interlink.core.protocol.certs import (
    generate_root_key,
    issue_node_certificate,
    server_hello,
    verify_server_hello,
    x25519_public,
)
from interlink.core.protocol.noise import SUITES, NoiseSession, make_preamble

IMPLEMENTATION = interlink.core.IMPLEMENTATION
NOW = 1_800_000_000

INIT_STATIC = bytes(range(32))
RESP_STATIC = bytes(range(32, 64))
INIT_EPHEMERAL = bytes(range(64, 96))
RESP_EPHEMERAL = bytes(range(96, 128))
CLIENT_AUTH = msgpack.packb({"token": "x" * 600, "device": 1, "agent": "bench/1"}, use_bin_type=True)

ROOT = generate_root_key()
ROOT_PUBLIC = ROOT.public_key().public_bytes_raw()
CERTIFICATE = issue_node_certificate(ROOT, x25519_public(RESP_STATIC), "bench-gw", NOW - 3600, NOW + 86400)
HELLO = server_hello(CERTIFICATE, "bench-gw", NOW * 1000)


def _is_ik(suite: int) -> bool:
    return SUITES[suite].startswith("Noise_IK_")


def _sessions(suite: int, *, fixed_ephemerals: bool = False) -> tuple[NoiseSession, NoiseSession]:
    name, prologue = SUITES[suite], make_preamble(suite)
    initiator = NoiseSession(
        name, initiator=True, static_private=INIT_STATIC, prologue=prologue,
        remote_static=x25519_public(RESP_STATIC) if _is_ik(suite) else None,
        ephemeral_private=INIT_EPHEMERAL if fixed_ephemerals else None,
    )
    responder = NoiseSession(
        name, initiator=False, static_private=RESP_STATIC, prologue=prologue,
        ephemeral_private=RESP_EPHEMERAL if fixed_ephemerals else None,
    )
    return initiator, responder


def full_handshake(suite: int) -> None:
    client, gateway = _sessions(suite)
    if _is_ik(suite):
        gateway.read_message(client.write_message(CLIENT_AUTH))
        hello = client.read_message(gateway.write_message(HELLO))
    else:
        gateway.read_message(client.write_message(b""))
        hello = client.read_message(gateway.write_message(HELLO))
        gateway.read_message(client.write_message(CLIENT_AUTH))
    verify_server_hello(hello, root_public=ROOT_PUBLIC, remote_static=client.remote_static, now=NOW)
    assert client.handshake_complete and gateway.handshake_complete


def _initiator_messages(suite: int) -> list[bytes]:
    """The initiator's handshake messages for fixed keys and ephemerals."""
    client, gateway = _sessions(suite, fixed_ephemerals=True)
    messages = [client.write_message(CLIENT_AUTH if _is_ik(suite) else b"")]
    gateway.read_message(messages[0])
    client.read_message(gateway.write_message(HELLO))
    if not _is_ik(suite):
        messages.append(client.write_message(CLIENT_AUTH))
    return messages


def responder_side(suite: int, messages: list[bytes]) -> None:
    name, prologue = SUITES[suite], make_preamble(suite)
    gateway = NoiseSession(
        name, initiator=False, static_private=RESP_STATIC, prologue=prologue, ephemeral_private=RESP_EPHEMERAL
    )
    gateway.read_message(messages[0])
    gateway.write_message(HELLO)
    if len(messages) > 1:
        gateway.read_message(messages[1])
    assert gateway.handshake_complete


def _noise_connection(suite: int, initiator: bool) -> NoiseConnection:
    conn = NoiseConnection.from_name(SUITES[suite].encode())
    conn.set_prologue(make_preamble(suite))
    if initiator:
        conn.set_as_initiator()
        conn.set_keypair_from_private_bytes(Keypair.STATIC, INIT_STATIC)
        if _is_ik(suite):
            conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, x25519_public(RESP_STATIC))
    else:
        conn.set_as_responder()
        conn.set_keypair_from_private_bytes(Keypair.STATIC, RESP_STATIC)
    conn.start_handshake()
    return conn


def noiseprotocol_handshake(suite: int) -> None:
    client, gateway = _noise_connection(suite, True), _noise_connection(suite, False)
    if _is_ik(suite):
        gateway.read_message(client.write_message(CLIENT_AUTH))
        client.read_message(gateway.write_message(HELLO))
    else:
        gateway.read_message(client.write_message(b""))
        client.read_message(gateway.write_message(HELLO))
        gateway.read_message(client.write_message(CLIENT_AUTH))
    assert client.handshake_finished and gateway.handshake_finished


# ------------------------------------------------------------- the handshake state alone

TWIN_MODULES = {"cython": handshake_native, "pure": handshake_pure}
STATE_IMPLEMENTATIONS = ["cython", "pure", "noiseprotocol"]
# Static keys parsed once, as NoiseSession shares the node's: per twin, and noiseprotocol's key pair.
STATIC_KEYS = {impl: {"init": module.StaticKey(INIT_STATIC), "resp": module.StaticKey(RESP_STATIC)}
               for impl, module in TWIN_MODULES.items()}
NOISE_STATIC = {"init": KeyPair25519.from_private_bytes(INIT_STATIC), "resp": KeyPair25519.from_private_bytes(RESP_STATIC)}


def _state(impl: str, suite: int, initiator: bool, ephemeral_private: bytes | None = None):
    """A handshake state of ``impl`` with its own shared static key (noiseprotocol: a NoiseConnection)."""
    name, prologue = SUITES[suite], make_preamble(suite)
    remote = x25519_public(RESP_STATIC) if initiator and _is_ik(suite) else None
    side = "init" if initiator else "resp"
    if impl != "noiseprotocol":
        return TWIN_MODULES[impl].HandshakeState(name, initiator, STATIC_KEYS[impl][side], prologue, remote,
                                                 ephemeral_private)
    conn = NoiseConnection.from_name(name.encode())
    conn.set_prologue(prologue)
    conn.set_as_initiator() if initiator else conn.set_as_responder()
    conn.noise_protocol.keypairs["s"] = NOISE_STATIC[side]
    if remote is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote)
    conn.start_handshake()
    if ephemeral_private is not None:
        # Set after start_handshake, which warns about preset ephemerals; parsed here, as the twins do.
        conn.noise_protocol.handshake_state.e = KeyPair25519.from_private_bytes(ephemeral_private)
    return conn


def state_responder(impl: str, suite: int, messages: list[bytes]):
    gateway = _state(impl, suite, False, RESP_EPHEMERAL)
    gateway.read_message(messages[0])
    gateway.write_message(HELLO)
    if len(messages) > 1:
        gateway.read_message(messages[1])
    return gateway


def state_full(impl: str, suite: int):
    client, gateway = _state(impl, suite, True), _state(impl, suite, False)
    gateway.read_message(client.write_message(CLIENT_AUTH if _is_ik(suite) else b""))
    client.read_message(gateway.write_message(HELLO))
    if not _is_ik(suite):
        gateway.read_message(client.write_message(CLIENT_AUTH))
    return gateway


def _completed(state) -> bool:
    return state.handshake_finished if isinstance(state, NoiseConnection) else state.complete


# ------------------------------------------------------------- the floor: the primitives alone

_FLOOR_STATIC = X25519PrivateKey.from_private_bytes(RESP_STATIC)
_FLOOR_REMOTE_STATIC = x25519_public(INIT_STATIC)
_FLOOR_KEYS = [bytes([i]) * 32 for i in range(1, 4)]  # stand-ins for the keys ee, es and se give
_FLOOR_NONCE = bytes(12)
_FLOOR_AD = bytes(32)  # the handshake hash is each AEAD call's associated data
# What the responder decrypts in message 3 (the initiator's static key, then its auth payload),
# sealed under the stand-in keys so the decryptions authenticate.
_FLOOR_SEALED = [
    ChaCha20Poly1305(_FLOOR_KEYS[1]).encrypt(_FLOOR_NONCE, _FLOOR_REMOTE_STATIC, _FLOOR_AD),
    ChaCha20Poly1305(_FLOOR_KEYS[2]).encrypt(_FLOOR_NONCE, CLIENT_AUTH, _FLOOR_AD),
]


_SHA256 = hashes.SHA256()


def responder_primitives(message1: bytes) -> None:
    """The XX responder's cryptographic calls (ChaChaPoly, SHA256), in a straight line."""
    ephemeral = X25519PrivateKey.from_private_bytes(RESP_EPHEMERAL)
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    remote_ephemeral = X25519PublicKey.from_public_bytes(message1[:32])
    remote_static = X25519PublicKey.from_public_bytes(_FLOOR_REMOTE_STATIC)
    # ee, es and se, then the Split's empty input: an HKDF (two outputs) each.
    shared = [ephemeral.exchange(remote_ephemeral), _FLOOR_STATIC.exchange(remote_ephemeral),
              ephemeral.exchange(remote_static), b""]
    chaining_key = bytes(32)
    for input_key_material in shared:
        chaining_key = HKDF(_SHA256, 64, chaining_key, None).derive(input_key_material)[:32]
    aeads = [ChaCha20Poly1305(key) for key in _FLOOR_KEYS]
    sent = [aeads[0].encrypt(_FLOOR_NONCE, STATIC_KEYS["pure"]["resp"].public, _FLOOR_AD),
            aeads[1].encrypt(_FLOOR_NONCE, HELLO, _FLOOR_AD)]
    aeads[1].decrypt(_FLOOR_NONCE, _FLOOR_SEALED[0], _FLOOR_AD)
    aeads[2].decrypt(_FLOOR_NONCE, _FLOOR_SEALED[1], _FLOOR_AD)
    h = bytes(32)
    # MixHash of the prologue, re, payload 1, e, then the four ciphertexts.
    for data in (make_preamble(0x01), message1[:32], b"", ephemeral_public, *sent, *_FLOOR_SEALED):
        h = hashlib.sha256(h + data).digest()


SUITE_IDS = {suite: SUITES[suite].replace("Noise_", "").replace("_25519", "") for suite in SUITES}


@pytest.mark.parametrize("suite", sorted(SUITES), ids=SUITE_IDS.get)
def test_handshake_full(benchmark, suite):
    benchmark.group = f"handshake full ({IMPLEMENTATION})"
    benchmark.extra_info["implementation"] = IMPLEMENTATION
    benchmark(full_handshake, suite)


@pytest.mark.parametrize("suite", sorted(SUITES), ids=SUITE_IDS.get)
def test_handshake_responder_only(benchmark, suite):
    messages = _initiator_messages(suite)
    benchmark.group = f"handshake responder only ({IMPLEMENTATION})"
    benchmark.extra_info["implementation"] = IMPLEMENTATION
    benchmark(responder_side, suite, messages)


@pytest.mark.parametrize("suite", sorted(SUITES), ids=SUITE_IDS.get)
def test_handshake_plain_noiseprotocol(benchmark, suite):
    benchmark.group = "handshake full, plain noiseprotocol NoiseConnection"
    benchmark.extra_info["implementation"] = "noiseprotocol"
    benchmark(noiseprotocol_handshake, suite)


@pytest.mark.parametrize("suite", sorted(SUITES), ids=SUITE_IDS.get)
@pytest.mark.parametrize("impl", STATE_IMPLEMENTATIONS)
def test_handshake_state_responder(benchmark, impl, suite):
    """The gateway's share, handshake state only: twins and the reference side by side."""
    messages = _initiator_messages(suite)
    benchmark.group = f"handshake state, responder only ({SUITE_IDS[suite]})"
    benchmark.extra_info.update(implementation=impl, suite=SUITES[suite])
    assert _completed(benchmark(state_responder, impl, suite, messages))


@pytest.mark.parametrize("suite", sorted(SUITES), ids=SUITE_IDS.get)
@pytest.mark.parametrize("impl", STATE_IMPLEMENTATIONS)
def test_handshake_state_full(benchmark, impl, suite):
    """Both sides, fresh random ephemerals: twins and the reference side by side."""
    benchmark.group = f"handshake state, full ({SUITE_IDS[suite]})"
    benchmark.extra_info.update(implementation=impl, suite=SUITES[suite])
    assert _completed(benchmark(state_full, impl, suite))


def test_handshake_responder_primitives(benchmark):
    """The floor under ``test_handshake_state_responder[XX_ChaChaPoly_SHA256]``."""
    message1 = _initiator_messages(0x01)[0]
    benchmark.group = "handshake state, responder only (XX_ChaChaPoly_SHA256)"
    benchmark.extra_info["implementation"] = "primitives only"
    benchmark(responder_primitives, message1)
