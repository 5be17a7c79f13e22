"""Noise transport cipher: the compiled CipherState against its pure twin and against a raw
``cryptography`` AEAD call (the floor: what one message costs with no state at all).

    .venv/bin/python -m pytest bench/bench_cipher.py --benchmark-only
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

import interlink.core.protocol._cipher_pure as cipher_pure
import interlink.ext._cipher as cipher_native

KEY = os.urandom(32)
MESSAGE = os.urandom(64)
BATCH = [os.urandom(64) for _ in range(100)]
SUITES = pytest.mark.parametrize("suite", ["ChaChaPoly", "AESGCM"])
IMPLEMENTATIONS = pytest.mark.parametrize("impl", ["cython", "pure", "raw-cryptography"])
TWINS = pytest.mark.parametrize("impl", ["cython", "pure"])
AEADS = {"ChaChaPoly": ChaCha20Poly1305, "AESGCM": AESGCM}
MODULES = {"cython": cipher_native, "pure": cipher_pure}


@SUITES
@IMPLEMENTATIONS
def test_encrypt_64B(bench, impl, suite):
    bench.group = f"encrypt one 64-byte message ({suite})"
    bench.extra_info.update(implementation=impl, suite=suite, bytes=len(MESSAGE))
    if impl == "raw-cryptography":
        # The bound method called directly, as pytest-benchmark calls CipherState.encrypt: no
        # wrapper frame on either side. A fixed nonce is fine here (a benchmark, not a protocol).
        ciphertext = bench(AEADS[suite](KEY).encrypt, bytes(12), MESSAGE, b"")
    else:
        ciphertext = bench(MODULES[impl].CipherState(suite, KEY).encrypt, MESSAGE)
    assert len(ciphertext) == 80


@SUITES
@IMPLEMENTATIONS
def test_decrypt_many_100x64B(bench, impl, suite):
    """Decrypt 100 consecutive transport messages (nonces 0..99); raw: the same calls in a loop."""
    bench.group = f"decrypt 100 x 64-byte messages ({suite})"
    bench.extra_info.update(implementation=impl, suite=suite, messages=len(BATCH))
    ciphertexts = cipher_pure.CipherState(suite, KEY).encrypt_many(BATCH)
    if impl == "raw-cryptography":
        aead = AEADS[suite](KEY)
        byteorder = "little" if suite == "ChaChaPoly" else "big"
        nonces = [bytes(4) + n.to_bytes(8, byteorder) for n in range(len(BATCH))]
        pairs = list(zip(nonces, ciphertexts))

        def run():
            return [aead.decrypt(nonce, ciphertext, b"") for nonce, ciphertext in pairs]

    else:
        state = MODULES[impl].CipherState(suite, KEY)

        def run():
            state.nonce = 0
            return state.decrypt_many(ciphertexts)

    assert bench(run) == BATCH


@SUITES
@TWINS
def test_encrypt_frames_100x64B(bench, impl, suite):
    bench.group = f"encrypt_frames: 100 x 64-byte messages into one buffer ({suite})"
    bench.extra_info.update(implementation=impl, suite=suite, messages=len(BATCH))
    state = MODULES[impl].CipherState(suite, KEY)
    assert len(bench(state.encrypt_frames, BATCH)) == 100 * (2 + 64 + 16)


@SUITES
@TWINS
def test_encrypt_many_100x64B(bench, impl, suite):
    bench.group = f"encrypt_many: 100 x 64-byte messages ({suite})"
    bench.extra_info.update(implementation=impl, suite=suite, messages=len(BATCH))
    state = MODULES[impl].CipherState(suite, KEY)
    assert len(bench(state.encrypt_many, BATCH)) == 100
