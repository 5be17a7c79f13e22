"""Stanza codec (``core/stanza.py``): decode and encode the stanzas of a 1:1 exchange, and the
rejection of malformed transport plaintexts.

    .venv/bin/python -m pytest bench/bench_stanza.py --benchmark-only

The codec has no compiled twin: it is Python around msgpack's C packer and unpacker, so every
row runs the same code whatever ``interlink.core.IMPLEMENTATION`` is. The stanzas are the ones of
docs/protocol.md §6 with a 200-byte ciphertext (an E2EE envelope of a short text is about that).
"""

from __future__ import annotations

import os

import msgpack
import pytest

from interlink.core.errors import StanzaError
from interlink.core.stanza import decode_stanzas, encode_stanza

MSG_ID = os.urandom(16)
CIPHERTEXT = os.urandom(200)
TS_MS = 1_800_000_000_123
BATCH = 32  # stanzas in one transport plaintext: a client that writes while the gateway is busy

STANZAS = {
    "msg": {"t": "msg", "id": MSG_ID, "to": "bob@beta", "c": {1: CIPHERTEXT}},
    "dlv": {"t": "dlv", "seq": 17, "k": "msg", "id": MSG_ID, "from": "alice@alpha", "dev": 1, "ts": TS_MS,
            "c": CIPHERTEXT},
    "ack": {"t": "ack", "id": MSG_ID, "ts": TS_MS},
    "recv": {"t": "recv", "seq": list(range(1000, 1064))},  # a full default window received at once
}
ENCODED = {kind: encode_stanza(stanza) for kind, stanza in STANZAS.items()}
MSG_BATCH = b"".join(encode_stanza({**STANZAS["msg"], "id": os.urandom(16)}) for _ in range(BATCH))

# Transport plaintexts the decoder must refuse, and how many good stanzas come before the bad part.
MALFORMED = {
    "truncated msg": (ENCODED["msg"][:-7], 0),
    "array, not a map": (msgpack.packb([1, 2, 3]), 0),
    "extension type": (msgpack.packb({"t": "msg", "x": msgpack.ExtType(1, b"boom")}), 0),
    "invalid UTF-8": (b"\x81\xa1t\xa2\xff\xfe", 0),
    "31 msgs, then a cut-off one": (MSG_BATCH[: len(MSG_BATCH) * 31 // 32 + 5], 31),
}


@pytest.mark.parametrize("kind", list(STANZAS))
@pytest.mark.benchmark(group="stanza decode: one stanza per transport message")
def test_decode(benchmark, kind):
    benchmark.extra_info.update(stanza=kind, bytes=len(ENCODED[kind]))
    assert benchmark(decode_stanzas, ENCODED[kind]) == [STANZAS[kind]]


@pytest.mark.benchmark(group="stanza decode: 32 msgs in one transport message")
def test_decode_batch(benchmark):
    benchmark.extra_info.update(stanza="msg", stanzas=BATCH, bytes=len(MSG_BATCH))
    stanzas = benchmark(decode_stanzas, MSG_BATCH)
    assert len(stanzas) == BATCH and all(stanza["t"] == "msg" for stanza in stanzas)


@pytest.mark.parametrize("kind", list(STANZAS))
@pytest.mark.benchmark(group="stanza encode: one stanza")
def test_encode(benchmark, kind):
    benchmark.extra_info.update(stanza=kind, bytes=len(ENCODED[kind]))
    assert benchmark(encode_stanza, STANZAS[kind]) == ENCODED[kind]


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.benchmark(group="stanza decode: malformed, rejected")
def test_reject_malformed(benchmark, case):
    plaintext, good_before = MALFORMED[case]
    benchmark.extra_info.update(case=case, bytes=len(plaintext))

    def run():
        try:
            decode_stanzas(plaintext)
        except StanzaError as exc:
            return exc
        raise AssertionError(f"{case}: decode_stanzas accepted a malformed plaintext")

    error = benchmark(run)
    assert error.code == "bad_stanza" and len(error.stanzas) == good_before
    # A rejection replaces the shared unpacker: the next connection's stanzas still decode.
    assert decode_stanzas(ENCODED["ack"]) == [STANZAS["ack"]]
