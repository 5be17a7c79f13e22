"""``interlink.e2ee.envelope``: the wire format (docs/e2ee.md §3) — what the builders lay out
parses back field for field; every field outside its type or range is refused, so is any other
version, type or encoding, also when it reaches ``DeviceState.decrypt``."""

from __future__ import annotations

import doubleratchet
import msgpack
import pytest
from interlink.e2ee import ENVELOPE_VERSION, T_GROUP, T_PREKEY, T_RATCHET, DeviceState, E2EEError, parse_envelope
from interlink.e2ee.envelope import group_envelope, session_envelope, text_plaintext, unpack

UINT32_MAX = 0xFFFFFFFF
X3DH_HEADER = {"ik": b"i" * 32, "ek": b"e" * 32, "spk": 7, "opk": None}


def ratchet_message(pn: int = 3, n: int = 4) -> doubleratchet.EncryptedMessage:
    header = doubleratchet.Header(ratchet_pub=b"d" * 32, previous_sending_chain_length=pn, sending_chain_length=n)
    return doubleratchet.EncryptedMessage(header=header, ciphertext=b"ciphertext")


def valid(kind: int) -> dict:
    """A well-formed envelope of ``kind`` as a map, to be spoilt one field at a time."""
    if kind == T_GROUP:
        return unpack(group_envelope(b"g" * 16, 5, 6, b"ct", b"s" * 64))
    return unpack(session_envelope(ratchet_message(), X3DH_HEADER if kind == T_PREKEY else None))


def test_the_builders_lay_out_every_type_and_it_parses_back():
    prekey = parse_envelope(session_envelope(ratchet_message(), X3DH_HEADER))
    assert prekey == {"v": ENVELOPE_VERSION, "t": T_PREKEY, **X3DH_HEADER, "dh": b"d" * 32, "pn": 3, "n": 4, "ct": b"ciphertext"}
    ratchet = parse_envelope(session_envelope(ratchet_message(), None))
    assert ratchet == {"v": ENVELOPE_VERSION, "t": T_RATCHET, "dh": b"d" * 32, "pn": 3, "n": 4, "ct": b"ciphertext"}
    group = parse_envelope(group_envelope(b"g" * 16, 5, 6, b"ct", b"s" * 64))
    assert group == {"v": ENVELOPE_VERSION, "t": T_GROUP, "g": b"g" * 16, "kid": 5, "n": 6, "ct": b"ct", "sig": b"s" * 64}


def test_the_largest_chain_indexes_and_key_ids_are_accepted():
    largest_header = dict(X3DH_HEADER, spk=UINT32_MAX, opk=UINT32_MAX)
    assert parse_envelope(session_envelope(ratchet_message(UINT32_MAX, UINT32_MAX), largest_header))
    assert parse_envelope(group_envelope(b"g", UINT32_MAX, UINT32_MAX, b"", b"s" * 64))


@pytest.mark.parametrize(("kind", "field", "value"), [
    (T_RATCHET, "pn", UINT32_MAX + 1), (T_RATCHET, "n", -1), (T_RATCHET, "n", 1.0), (T_RATCHET, "dh", b"d" * 33),
    (T_RATCHET, "ct", "text, not bin"), (T_PREKEY, "ik", b"i" * 31), (T_PREKEY, "ek", None), (T_PREKEY, "spk", -1),
    (T_PREKEY, "opk", "7"), (T_PREKEY, "opk", UINT32_MAX + 1), (T_GROUP, "kid", UINT32_MAX + 1), (T_GROUP, "n", -1),
    (T_GROUP, "sig", b"s" * 63), (T_GROUP, "g", None), (T_GROUP, "ct", None),
])
def test_a_field_outside_its_type_or_range_is_refused(kind, field, value):
    assert parse_envelope(msgpack.packb(valid(kind)))  # the control: unspoilt, it parses
    with pytest.raises(E2EEError, match=f"malformed envelope of type {kind}"):
        parse_envelope(msgpack.packb(dict(valid(kind), **{field: value})))


def test_a_text_plaintext_is_the_documented_map():
    payload = unpack(text_plaintext("hello"))
    assert payload.keys() == {"k", "text", "ts"} and (payload["k"], payload["text"]) == ("text", "hello")
    assert type(payload["ts"]) is int and payload["ts"] > 1_600_000_000_000  # the sender's clock in ms


@pytest.mark.parametrize(
    "junk",
    [b"", b"\x00\x01", msgpack.packb([1, 2]), msgpack.packb({"v": 2, "t": 2}), msgpack.packb({"v": 1, "t": 9}),
     msgpack.packb({"v": 1, "t": 2, "dh": b"x" * 31, "pn": 0, "n": 0, "ct": b"c"}),
     msgpack.packb({"v": 1, "t": 1, "dh": b"x" * 32, "pn": 0, "n": 0, "ct": b"c"})],
)
async def test_malformed_envelopes_are_refused(junk):
    bob = DeviceState.create("bob@beta", 2)
    with pytest.raises(E2EEError):
        await bob.decrypt("alice@alpha", 1, junk)
