"""Stanza codec: decoding (the compiled module against its pure twin, same inputs, same run)
and encoding, and the rejection of malformed transport plaintexts.

    .venv/bin/python -m pytest bench/bench_stanza.py --benchmark-only

Decoding keeps no state between calls: each call scans where the msgpack objects end and
decodes exactly those bytes with a decoder of its own (``msgpack.unpackb`` for one stanza, a
fresh ``msgpack.Unpacker`` for several). Encoding a stanza in general has no twin: it is
msgpack's C packer; the ack and dlv every message makes have (``encode_ack``, ``encode_dlv``). The
stanzas are the ones of docs/protocol.md §6 with a 200-byte ciphertext (an E2EE envelope of a
short text is about that).
"""

from __future__ import annotations

import os

import msgpack
import pytest

import interlink.core.protocol._stanza_pure as stanza_pure
import interlink.ext._stanza as stanza_native
from interlink.core.errors import StanzaError
from interlink.core.protocol.stanza import encode_stanza

TWINS = pytest.mark.parametrize("codec", [stanza_native, stanza_pure], ids=["cython", "pure"])

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
MSG_PAIR = ENCODED["msg"] + ENCODED["ack"]
MSG_BATCH = b"".join(encode_stanza({**STANZAS["msg"], "id": os.urandom(16)}) for _ in range(BATCH))

# Transport plaintexts the decoder must refuse, and how many good stanzas come before the bad part.
MALFORMED = {
    "truncated msg": (ENCODED["msg"][:-7], 0),
    "map cut after a whole element": (ENCODED["ack"][:-9], 0),
    "array, not a map": (msgpack.packb([1, 2, 3]), 0),
    "extension type": (msgpack.packb({"t": "msg", "x": msgpack.ExtType(1, b"boom")}), 0),
    "invalid UTF-8": (b"\x81\xa1t\xa2\xff\xfe", 0),
    "31 msgs, then a cut-off one": (MSG_BATCH[: len(MSG_BATCH) * 31 // 32 + 5], 31),
}


def _info(bench, codec, **extra) -> None:
    bench.extra_info["implementation"] = "cython" if codec is stanza_native else "pure"
    bench.extra_info.update(extra)


@TWINS
@pytest.mark.parametrize("kind", list(STANZAS))
@pytest.mark.benchmark(group="stanza decode: one stanza per transport message")
def test_decode(bench, codec, kind):
    _info(bench, codec, stanza=kind, bytes=len(ENCODED[kind]))
    assert bench(codec.decode_stanzas, ENCODED[kind]) == [STANZAS[kind]]


@TWINS
@pytest.mark.benchmark(group="stanza decode: msg + ack in one transport message")
def test_decode_pair(bench, codec):
    _info(bench, codec, stanzas=2, bytes=len(MSG_PAIR))
    assert bench(codec.decode_stanzas, MSG_PAIR) == [STANZAS["msg"], STANZAS["ack"]]


@TWINS
@pytest.mark.benchmark(group="stanza decode: 32 msgs in one transport message")
def test_decode_batch(bench, codec):
    _info(bench, codec, stanza="msg", stanzas=BATCH, bytes=len(MSG_BATCH))
    stanzas = bench(codec.decode_stanzas, MSG_BATCH)
    assert len(stanzas) == BATCH and all(stanza["t"] == "msg" for stanza in stanzas)


@pytest.mark.parametrize("kind", list(STANZAS))
@pytest.mark.benchmark(group="stanza encode: one stanza")
def test_encode(bench, kind):
    bench.extra_info.update(stanza=kind, bytes=len(ENCODED[kind]))
    assert bench(encode_stanza, STANZAS[kind]) == ENCODED[kind]


@TWINS
@pytest.mark.benchmark(group="stanza encode: ack and dlv without a map")
def test_encode_ack_and_dlv(bench, codec):
    """The router's two per-message stanzas (``encode_ack``, ``encode_dlv``): the compiled twin
    writes the bytes directly, the pure one packs the map; compare with ``test_encode``'s ack + dlv."""
    dlv = STANZAS["dlv"]

    def both():
        return (codec.encode_ack(MSG_ID, TS_MS, False),
                codec.encode_dlv(dlv["seq"], MSG_ID, dlv["from"], dlv["dev"], TS_MS, CIPHERTEXT, None))

    assert bench(both) == (ENCODED["ack"], ENCODED["dlv"])


@TWINS
@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.benchmark(group="stanza decode: malformed, rejected")
def test_reject_malformed(bench, codec, case):
    plaintext, good_before = MALFORMED[case]
    _info(bench, codec, case=case, bytes=len(plaintext))

    def run():
        try:
            codec.decode_stanzas(plaintext)
        except StanzaError as exc:
            return exc
        raise AssertionError(f"{case}: decode_stanzas accepted a malformed plaintext")

    error = bench(run)
    assert error.code == "bad_stanza" and len(error.stanzas) == good_before
    # Nothing of the rejected plaintext is left to join the next one's bytes.
    assert codec.decode_stanzas(ENCODED["ack"]) == [STANZAS["ack"]]
