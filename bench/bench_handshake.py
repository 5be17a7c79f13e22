"""Noise handshake cost per suite (pytest-benchmark).

Run: ``.venv/bin/python -m pytest bench/bench_handshake.py --benchmark-only``
(``pytest bench`` collects only ``test_*.py`` files unless ``python_files`` includes ``bench_*.py``).

- ``full``: both sides, every handshake message, in memory, fresh random ephemerals; the gateway's
  server hello is a real msgpack payload and the client verifies it against the pinned root.
- ``responder``: the gateway's share only. The initiator's messages are precomputed with fixed
  ephemerals on both sides (the only way to replay message 3, which depends on the responder's
  ephemeral), so the responder loads its ephemeral from bytes instead of generating it; the cost
  of that is the same X25519 scalar multiplication.
- ``noiseprotocol``: the same full handshake with plain ``noiseprotocol`` NoiseConnections, to see
  what the wrapper (cipher-state copy, checks) adds.
"""

from __future__ import annotations

import msgpack
import pytest
from noise.connection import Keypair, NoiseConnection

import interlink.core
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
    benchmark.group = "handshake full, plain noiseprotocol (baseline)"
    benchmark.extra_info["implementation"] = IMPLEMENTATION
    benchmark(noiseprotocol_handshake, suite)
