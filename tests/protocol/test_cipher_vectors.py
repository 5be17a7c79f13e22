"""Wycheproof AEAD vectors through both CipherState twins.

Only the groups Noise uses: 96-bit nonces, 256-bit keys, 128-bit tags. Counts are asserted so the
test cannot pass by running nothing (tests/vectors/README.md: ChaCha20-Poly1305 holds 256 valid and
60 invalid such tests, AES-GCM 39 valid and 27 invalid).
"""

from __future__ import annotations

import json

import pytest

from interlink.core.errors import DecryptError

from twins import twin_fixture

MAX_NONCE = 2**64 - 1

# CipherState name: file, byte order of the Noise counter, expected (valid, invalid) counts, and how
# many of those vectors have a Noise-form nonce (4 zero bytes + counter below 2^64-1)
FILES = {
    "ChaChaPoly": ("chacha20_poly1305_test.json", "little", (256, 60), 10),
    "AESGCM": ("aes_gcm_test.json", "big", (39, 27), 1),
}


cipher = twin_fixture("_cipher")  # compiled, then pure


def load_vectors(vectors_dir, suite: str) -> list[dict]:
    filename = FILES[suite][0]
    with open(vectors_dir / "wycheproof" / filename, encoding="utf-8") as handle:
        document = json.load(handle)
    selected = []
    for group in document["testGroups"]:
        if (group["ivSize"], group["keySize"], group["tagSize"]) != (96, 256, 128):
            continue
        for test in group["tests"]:
            selected.append({name: bytes.fromhex(test[name]) for name in ("key", "iv", "aad", "msg", "ct", "tag")})
            selected[-1].update(tcId=test["tcId"], result=test["result"])
    return selected


def try_open(state, vector: dict, sealed: bytes):
    """The plaintext, or None when the tag does not verify."""
    try:
        return state.aead_decrypt(vector["iv"], sealed, vector["aad"])
    except DecryptError:
        return None


@pytest.mark.parametrize("suite", sorted(FILES))
def test_wycheproof_vectors(cipher, vectors_dir, suite):
    vectors = load_vectors(vectors_dir, suite)
    expected_valid, expected_invalid = FILES[suite][2]
    counts = {"valid": 0, "invalid": 0}
    failures = []
    for vector in vectors:
        state = cipher.CipherState(suite, vector["key"])
        sealed = vector["ct"] + vector["tag"]
        encrypted = state.aead_encrypt(vector["iv"], vector["msg"], vector["aad"])
        if vector["result"] == "valid":
            if encrypted != sealed:
                failures.append((vector["tcId"], "encrypt"))
            if try_open(state, vector, sealed) != vector["msg"]:
                failures.append((vector["tcId"], "decrypt"))
        elif vector["result"] == "invalid":
            if encrypted == sealed:
                failures.append((vector["tcId"], "invalid vector encrypted to its ciphertext"))
            if try_open(state, vector, sealed) is not None:
                failures.append((vector["tcId"], "invalid vector decrypted"))
        else:
            failures.append((vector["tcId"], f"unexpected result {vector['result']!r}"))
            continue
        counts[vector["result"]] += 1
        assert state.nonce == 0  # the raw AEAD path never touches the counter
    assert failures == []
    assert counts == {"valid": expected_valid, "invalid": expected_invalid}


@pytest.mark.parametrize("suite", sorted(FILES))
def test_wycheproof_vectors_through_counter(cipher, vectors_dir, suite):
    """Vectors whose nonce has the Noise form (4 zero bytes + counter) through encrypt/decrypt."""
    byteorder = FILES[suite][1]
    ran = 0
    for vector in load_vectors(vectors_dir, suite):
        iv = vector["iv"]
        counter = int.from_bytes(iv[4:], byteorder)
        if iv[:4] != b"\x00" * 4 or counter == MAX_NONCE:
            continue
        sealed = vector["ct"] + vector["tag"]
        sender = cipher.CipherState(suite, vector["key"], counter)
        receiver = cipher.CipherState(suite, vector["key"], counter)
        if vector["result"] == "valid":
            assert sender.encrypt(vector["msg"], vector["aad"]) == sealed, vector["tcId"]
            assert receiver.decrypt(sealed, vector["aad"]) == vector["msg"], vector["tcId"]
            assert receiver.nonce == counter + 1
        else:
            with pytest.raises(DecryptError):
                receiver.decrypt(sealed, vector["aad"])
            assert receiver.nonce == counter
        ran += 1
    # Few Wycheproof nonces start with four zero bytes; make sure the ones that do were used.
    assert ran == FILES[suite][3]
