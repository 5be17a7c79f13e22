"""Noise transport CipherState: every case runs on the compiled module and on its pure twin, and
results are checked against direct ``cryptography`` calls (and ``noiseprotocol``'s cipher) rather
than against the code under test. Hypothesis checks that both twins give identical bytes.

Both modules come from ``tests/twins.py``, which imports the compiled one directly, so a missing
build fails this file instead of silently testing the pure twin twice.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings, strategies as st
from noise.backends.default.ciphers import AESGCMCipher, ChaCha20Cipher

from interlink.core.errors import CryptoError, DecryptError, LocalProtocolError, NonceExhaustedError

from twins import twin_fixture, twin_modules

TWINS = cipher_native, cipher_pure = twin_modules("_cipher")
framing_native, framing_pure = twin_modules("_framing")
FRAMING_OF = {cipher_native: framing_native, cipher_pure: framing_pure}
SUITES = ["ChaChaPoly", "AESGCM"]
MAX_NONCE = 2**64 - 1
KEY = bytes(range(32))

HYPOTHESIS = settings(max_examples=100, deadline=None)


cipher = twin_fixture("_cipher")  # the module under test: compiled, then pure


@pytest.fixture(params=SUITES)
def suite(request) -> str:
    return request.param


def nonce12(suite: str, n: int) -> bytes:
    """Noise §5 nonce: 4 zero bytes, then n little-endian (ChaChaPoly) or big-endian (AESGCM)."""
    return b"\x00" * 4 + n.to_bytes(8, "little" if suite == "ChaChaPoly" else "big")


def reference(suite: str, key: bytes):
    return (ChaCha20Poly1305 if suite == "ChaChaPoly" else AESGCM)(key)


# ---------------------------------------------------------------- basics


def test_round_trip(cipher, suite):
    sender = cipher.CipherState(suite, KEY)
    receiver = cipher.CipherState(suite, KEY)
    messages = [b"", b"x", b"hello" * 100, os.urandom(65519)]
    for i, message in enumerate(messages):
        ciphertext = sender.encrypt(message)
        assert len(ciphertext) == len(message) + 16
        assert sender.nonce == i + 1
        assert receiver.decrypt(ciphertext) == message
        assert receiver.nonce == i + 1


def test_round_trip_with_ad(cipher, suite):
    sender = cipher.CipherState(suite, KEY)
    receiver = cipher.CipherState(suite, KEY)
    ciphertext = sender.encrypt(b"payload", b"header")
    assert ciphertext == reference(suite, KEY).encrypt(nonce12(suite, 0), b"payload", b"header")
    assert receiver.decrypt(ciphertext, ad=b"header") == b"payload"


@pytest.mark.parametrize("n", [0, 1, 0x0102030405060708, 2**32, MAX_NONCE - 1])
def test_nonce_layout_matches_direct_call(cipher, suite, n):
    """ChaChaPoly puts the counter little-endian, AESGCM big-endian, after 4 zero bytes."""
    state = cipher.CipherState(suite, KEY, n)
    expected = reference(suite, KEY).encrypt(nonce12(suite, n), b"layout", b"")
    assert state.encrypt(b"layout") == expected
    other_order = b"\x00" * 4 + n.to_bytes(8, "big" if suite == "ChaChaPoly" else "little")
    if other_order != nonce12(suite, n):
        assert reference(suite, KEY).encrypt(other_order, b"layout", b"") != expected


def test_matches_noiseprotocol_cipher(cipher, suite):
    noise_cipher = (ChaCha20Cipher if suite == "ChaChaPoly" else AESGCMCipher)()
    noise_cipher.initialize(KEY)
    start = 0xFEDCBA9876543210
    state = cipher.CipherState(suite, KEY, start)
    for i in range(5):
        message = bytes([i]) * (i * 7)
        assert state.encrypt(message, b"ad") == noise_cipher.encrypt(KEY, start + i, b"ad", message)


def test_nonce_is_writable(cipher, suite):
    state = cipher.CipherState(suite, KEY)
    state.nonce = 77
    assert state.nonce == 77
    assert type(state.nonce) is int
    assert state.encrypt(b"m") == reference(suite, KEY).encrypt(nonce12(suite, 77), b"m", b"")
    assert state.nonce == 78


def test_cipher_name(cipher, suite):
    state = cipher.CipherState(suite, KEY)
    assert state.cipher_name == suite
    with pytest.raises(AttributeError):
        state.cipher_name = "AESGCM" if suite == "ChaChaPoly" else "ChaChaPoly"
    assert state.cipher_name == suite


def test_accepts_bytes_like(cipher, suite):
    state = cipher.CipherState(suite, bytearray(KEY))
    direct = reference(suite, KEY)
    assert state.encrypt(bytearray(b"abc")) == direct.encrypt(nonce12(suite, 0), b"abc", b"")
    assert state.encrypt(memoryview(b"xabc")[1:], memoryview(b"ad")) == direct.encrypt(nonce12(suite, 1), b"abc", b"ad")
    ciphertext = direct.encrypt(nonce12(suite, 2), b"back", b"")
    assert state.decrypt(bytearray(ciphertext)) == b"back"
    assert state.nonce == 3


@pytest.mark.parametrize("bad", [5, "text", None])
def test_rejects_non_bytes(cipher, suite, bad):
    """``bytes(5)`` would silently encrypt five zero bytes; refuse instead, nonce untouched."""
    state = cipher.CipherState(suite, KEY)
    with pytest.raises(TypeError):
        state.encrypt(bad)
    assert state.nonce == 0


# ---------------------------------------------------------------- failures


def test_bad_tag_leaves_nonce(cipher, suite):
    sender = cipher.CipherState(suite, KEY, 5)
    receiver = cipher.CipherState(suite, KEY, 5)
    ciphertext = sender.encrypt(b"authentic")
    tampered = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
    with pytest.raises(DecryptError) as info:
        receiver.decrypt(tampered)
    assert info.value.code == "bad_frame"
    assert isinstance(info.value, CryptoError)
    assert receiver.nonce == 5
    with pytest.raises(DecryptError):
        receiver.decrypt(ciphertext, b"wrong ad")
    assert receiver.nonce == 5
    assert receiver.decrypt(ciphertext) == b"authentic"
    assert receiver.nonce == 6


def test_wrong_nonce_fails(cipher, suite):
    sender = cipher.CipherState(suite, KEY)
    receiver = cipher.CipherState(suite, KEY, 1)
    with pytest.raises(DecryptError):
        receiver.decrypt(sender.encrypt(b"m"))
    assert receiver.nonce == 1


@pytest.mark.parametrize("size", [0, 1, 15])
def test_short_ciphertext(cipher, suite, size):
    state = cipher.CipherState(suite, KEY, 3)
    with pytest.raises(DecryptError) as info:
        state.decrypt(b"\x00" * size)
    assert str(info.value) == f"transport message of {size} bytes is shorter than the tag"
    assert state.nonce == 3


def test_nonce_exhaustion(cipher, suite):
    state = cipher.CipherState(suite, KEY, MAX_NONCE - 1)
    assert state.encrypt(b"last") == reference(suite, KEY).encrypt(nonce12(suite, MAX_NONCE - 1), b"last", b"")
    assert state.nonce == MAX_NONCE
    with pytest.raises(NonceExhaustedError):
        state.encrypt(b"one too many")
    with pytest.raises(NonceExhaustedError):
        state.decrypt(b"\x00" * 32)
    with pytest.raises(NonceExhaustedError):
        state.decrypt(b"")  # exhaustion is reported before the length check
    with pytest.raises(NonceExhaustedError):
        state.encrypt_frames([b"x"])
    assert state.nonce == MAX_NONCE


def test_decrypt_at_last_nonce(cipher, suite):
    ciphertext = reference(suite, KEY).encrypt(nonce12(suite, MAX_NONCE - 1), b"bye", b"")
    state = cipher.CipherState(suite, KEY)
    state.nonce = MAX_NONCE - 1
    assert state.decrypt(ciphertext) == b"bye"
    with pytest.raises(NonceExhaustedError):
        state.decrypt(ciphertext)


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("value", [-1, MAX_NONCE + 1, 2**80])
def test_nonce_out_of_range(cipher, value):
    message = f"nonce must be in 0..2^64-1, got {value}"
    with pytest.raises(ValueError) as info:
        cipher.CipherState("ChaChaPoly", KEY, value)
    assert str(info.value) == message
    state = cipher.CipherState("ChaChaPoly", KEY, 9)
    with pytest.raises(ValueError) as info:
        state.nonce = value
    assert str(info.value) == message
    assert state.nonce == 9


@pytest.mark.parametrize("value", [1.0, "1", None])
def test_nonce_must_be_an_integer(cipher, value):
    with pytest.raises(TypeError):
        cipher.CipherState("ChaChaPoly", KEY, value)
    state = cipher.CipherState("ChaChaPoly", KEY)
    with pytest.raises(TypeError):
        state.nonce = value


def test_unknown_cipher(cipher):
    with pytest.raises(ValueError) as info:
        cipher.CipherState("AES256", KEY)
    assert str(info.value) == "unknown cipher 'AES256'; expected 'ChaChaPoly' or 'AESGCM'"


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_key_size(cipher, size):
    with pytest.raises(ValueError) as info:
        cipher.CipherState("AESGCM", b"k" * size)
    assert str(info.value) == f"cipher key must be 32 bytes, got {size}"


# ---------------------------------------------------------------- batches


def test_encrypt_many_decrypt_many(cipher, suite):
    plaintexts = [b"one", b"", b"three" * 50]
    sender = cipher.CipherState(suite, KEY, 10)
    ciphertexts = sender.encrypt_many(plaintexts)
    assert sender.nonce == 13
    direct = reference(suite, KEY)
    assert ciphertexts == [direct.encrypt(nonce12(suite, 10 + i), p, b"") for i, p in enumerate(plaintexts)]
    receiver = cipher.CipherState(suite, KEY, 10)
    assert receiver.decrypt_many(iter(ciphertexts)) == plaintexts
    assert receiver.nonce == 13
    assert sender.encrypt_many([]) == []


def test_decrypt_many_stops_at_first_failure(cipher, suite):
    sender = cipher.CipherState(suite, KEY)
    ciphertexts = sender.encrypt_many([b"a", b"b", b"c", b"d"])
    ciphertexts[2] = ciphertexts[2][:-1] + bytes([ciphertexts[2][-1] ^ 0x80])
    receiver = cipher.CipherState(suite, KEY)
    with pytest.raises(DecryptError):
        receiver.decrypt_many(ciphertexts)
    assert receiver.nonce == 2  # a and b were consumed; the nonce waits at the bad message


def test_encrypt_frames_decodes_and_decrypts(cipher, suite):
    framing = FRAMING_OF[cipher]
    plaintexts = [b"first", b"", os.urandom(1000), os.urandom(65519)]
    sender = cipher.CipherState(suite, KEY, 40)
    wire = sender.encrypt_frames(iter(plaintexts))
    assert type(wire) is bytes
    assert sender.nonce == 44
    frames = framing.FrameDecoder().feed(wire)
    assert [len(f) for f in frames] == [len(p) + 16 for p in plaintexts]
    direct = reference(suite, KEY)
    assert frames == [direct.encrypt(nonce12(suite, 40 + i), p, b"") for i, p in enumerate(plaintexts)]
    receiver = cipher.CipherState(suite, KEY, 40)
    assert receiver.decrypt_many(frames) == plaintexts
    assert sender.encrypt_frames([]) == b""
    assert sender.nonce == 44


def test_encrypt_frames_too_large_is_all_or_nothing(cipher, suite):
    """A plaintext that cannot fit a frame is refused before anything is encrypted, so the
    nonce does not run ahead of what the peer will receive."""
    state = cipher.CipherState(suite, KEY, 7)
    with pytest.raises(LocalProtocolError) as info:
        state.encrypt_frames([b"fine", b"fine", b"x" * 65520])
    assert str(info.value) == "plaintext of 65520 bytes does not fit in one frame"
    assert state.nonce == 7


# ---------------------------------------------------------------- rekey and raw AEAD


def test_rekey_matches_noise_spec(cipher, suite):
    """Noise §4.2: k' = first 32 bytes of ENCRYPT(k, 2^64-1, zerolen, 32 zero bytes); n unchanged."""
    state = cipher.CipherState(suite, KEY, 12)
    state.rekey()
    new_key = reference(suite, KEY).encrypt(b"\x00" * 4 + b"\xff" * 8, b"\x00" * 32, b"")[:32]
    assert state.nonce == 12
    assert state.encrypt(b"after rekey") == reference(suite, new_key).encrypt(nonce12(suite, 12), b"after rekey", b"")
    state.rekey()
    newer_key = reference(suite, new_key).encrypt(b"\x00" * 4 + b"\xff" * 8, b"\x00" * 32, b"")[:32]
    assert state.encrypt(b"again") == reference(suite, newer_key).encrypt(nonce12(suite, 13), b"again", b"")


def test_rekey_works_at_exhausted_nonce(cipher, suite):
    state = cipher.CipherState(suite, KEY, MAX_NONCE)
    state.rekey()
    assert state.nonce == MAX_NONCE


def test_aead_does_not_touch_nonce(cipher, suite):
    state = cipher.CipherState(suite, KEY, 3)
    iv = os.urandom(12)
    ciphertext = state.aead_encrypt(iv, b"raw", b"ad")
    assert ciphertext == reference(suite, KEY).encrypt(iv, b"raw", b"ad")
    assert state.aead_decrypt(iv, ciphertext, b"ad") == b"raw"
    with pytest.raises(DecryptError):
        state.aead_decrypt(iv, ciphertext, b"other ad")
    assert state.nonce == 3


# ---------------------------------------------------------------- both twins on random input


def outcome(call):
    try:
        return ("ok", call())
    except (DecryptError, NonceExhaustedError, ValueError) as exc:
        return (type(exc).__name__, str(exc))


@HYPOTHESIS
@given(
    suite=st.sampled_from(SUITES),
    key=st.binary(min_size=32, max_size=32),
    start=st.one_of(st.integers(0, 1000), st.integers(MAX_NONCE - 4, MAX_NONCE), st.integers(0, MAX_NONCE)),
    plaintexts=st.lists(st.binary(max_size=200), max_size=6),
    ad=st.binary(max_size=40),
)
def test_twins_give_identical_bytes(suite, key, start, plaintexts, ad):
    states = [module.CipherState(suite, key, start) for module in TWINS]
    singles = [[outcome(lambda p=p: s.encrypt(p, ad)) for p in plaintexts] for s in states]
    assert singles[0] == singles[1]
    for i, (kind, value) in enumerate(singles[0]):
        if kind == "ok":
            assert value == reference(suite, key).encrypt(nonce12(suite, start + i), plaintexts[i], ad)
    assert states[0].nonce == states[1].nonce

    states = [module.CipherState(suite, key, start) for module in TWINS]
    batches = [outcome(lambda s=s: s.encrypt_many(plaintexts)) for s in states]
    assert batches[0] == batches[1]
    frames = [outcome(lambda s=s: s.encrypt_frames(plaintexts)) for s in states]
    assert frames[0] == frames[1]
    assert states[0].nonce == states[1].nonce

    states = [module.CipherState(suite, key, start) for module in TWINS]
    for state in states:
        state.rekey()
    assert outcome(lambda: states[0].encrypt(b"k", ad)) == outcome(lambda: states[1].encrypt(b"k", ad))


@HYPOTHESIS
@given(
    suite=st.sampled_from(SUITES),
    start=st.integers(0, 2**40),
    plaintexts=st.lists(st.binary(max_size=100), min_size=1, max_size=5),
    flip=st.integers(0, 10_000),
)
def test_twins_agree_on_tampered_input(suite, start, plaintexts, flip):
    ciphertexts = cipher_pure.CipherState(suite, KEY, start).encrypt_many(plaintexts)
    index = flip % len(ciphertexts)
    target = bytearray(ciphertexts[index])
    target[flip % len(target)] ^= 1 + flip % 255
    ciphertexts[index] = bytes(target)
    states = [module.CipherState(suite, KEY, start) for module in TWINS]
    results = [outcome(lambda s=s: s.decrypt_many(ciphertexts)) for s in states]
    assert results[0] == results[1] == ("DecryptError", "transport message failed authentication")
    assert states[0].nonce == states[1].nonce == start + index


def test_release_drops_the_aead_and_changes_nothing_on_the_wire(cipher, suite):
    key = os.urandom(32)
    kept = cipher.CipherState(suite, key)
    released = cipher.CipherState(suite, key)
    receiver = cipher.CipherState(suite, key)
    assert not released.loaded  # nothing is allocated until the first message
    for i in range(6):
        message = b"message %d" % i
        expected = kept.encrypt(message)
        got = released.encrypt(message)
        assert got == expected
        assert released.loaded
        released.release()
        assert not released.loaded
        assert receiver.decrypt(got) == message
        receiver.release()
    released.rekey()
    kept.rekey()
    released.release()
    assert released.encrypt(b"after rekey") == kept.encrypt(b"after rekey")
