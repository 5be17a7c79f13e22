"""Stanza decoding (PROTOCOL §4): every case runs on the compiled module and on its pure twin,
and hypothesis checks that the two behave identically on random plaintexts.

The property this file exists for: decoding keeps no state between calls. A transport message
that is not exactly a sequence of whole maps gives the whole stanzas before the broken part and
a ``bad_stanza`` error, and nothing of it ever joins the bytes of a later call. (The defect it
guards against: a process-wide ``msgpack.Unpacker`` kept a map cut short, the next session's
``ping`` completed it, and the result ran as that other user.)
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from interlink.core.protocol import stanza as stanza_selected
from interlink.core.errors import StanzaError, TooManyStanzasError

from twins import twin_fixture, twin_modules

TWINS = stanza_native, stanza_pure = twin_modules("_stanza")
HYPOTHESIS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


codec = twin_fixture("_stanza")  # the module under test: compiled, then pure


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def outcome(codec, plaintext, max_stanzas=None):
    """What a decode gives, comparable across twins: ("ok", stanzas) or (error type, message,
    stanzas), stanzas as their repr (a float NaN the bytes may hold is not equal to itself)."""
    try:
        return ("ok", repr(codec.decode_stanzas(plaintext, max_stanzas)))
    except StanzaError as exc:
        return (type(exc).__name__, str(exc), repr(exc.stanzas))


# Valid stanzas of several shapes: nested maps keyed by int, lists, bin of every length class,
# str8/16, negative and 64-bit ints, floats, nil and booleans — every kind of msgpack object a
# cut can fall inside. The last one is written by hand with the 32-bit length forms (map32,
# array32, str32, bin32) holding small sizes, which msgpack accepts but never writes itself.
LONG_FORMS = (
    b"\xdf\x00\x00\x00\x03"  # map32 of 3 entries
    + b"\xa1t\xa2iq"
    + b"\xdb\x00\x00\x00\x02op" + b"\xdb\x00\x00\x00\x0bgroup.leave"  # str32
    + b"\xa1g\xdd\x00\x00\x00\x02" + b"\xc6\x00\x00\x00\x03abc" + b"\xcf" + (2**64 - 1).to_bytes(8, "big")
)
VALID = [
    {"t": "iq", "id": 4242, "op": "block.list"},
    {"t": "msg", "id": bytes(range(16)), "to": "victor@globex", "c": {1: b"\x00" * 300, 7: b"x"}, "own": {2: b"y" * 70}},
    {"t": "iq", "id": 2**40, "op": "keys.put", "ik": b"k" * 32, "spk": {"id": 1, "key": b"s" * 32, "sig": b"g" * 64},
     "otpk": [{"id": i, "key": bytes([i]) * 32} for i in range(3)]},
    {"t": "recv", "seq": [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32, -1, -33, -129, -40000, -(2**40)]},
    {"t": "rcpt", "id": b"\x01" * 16, "to": "a" * 40 + "@acme", "kind": "read", "ids": [b"\x02" * 16] * 3},
    {"t": "state", "to": "é" * 200 + "@x", "s": "composing", "extra": [None, True, False, 1.5, -2.25]},
    {"t": "iq", "op": "group.leave", "g": [b"abc", 2**64 - 1]},
]
ENCODED = [pack(stanza) for stanza in VALID[:-1]] + [LONG_FORMS]
PING = {"t": "ping", "id": 7}


def test_each_valid_stanza_decodes_alone(codec):
    for stanza, encoded in zip(VALID, ENCODED):
        assert codec.decode_stanzas(encoded) == [stanza]


@pytest.mark.parametrize("count", [2, 3, stanza_pure.SLICED_MAX, stanza_pure.SLICED_MAX + 1, 40])
def test_several_stanzas_in_one_message_decode_in_order(codec, count):
    stanzas = [VALID[i % len(VALID)] for i in range(count)]
    assert codec.decode_stanzas(b"".join(pack(s) for s in stanzas)) == stanzas


def test_empty_plaintext_holds_no_stanza(codec):
    assert codec.decode_stanzas(b"") == []


def test_accepts_bytearray_and_memoryview(codec):
    plaintext = ENCODED[0] + ENCODED[3]
    assert codec.decode_stanzas(bytearray(plaintext)) == [VALID[0], VALID[3]]
    assert codec.decode_stanzas(memoryview(plaintext)) == [VALID[0], VALID[3]]


def test_the_reported_injection_cannot_complete_across_calls(codec):
    """The report's bytes: a 4-entry map whose last value is missing, then another user's ping."""
    cut = b"\x84" + b"".join(pack(x) for x in ("t", "iq", "id", 4242, "op", "block.list", "x"))
    with pytest.raises(StanzaError) as caught:
        codec.decode_stanzas(cut)
    assert caught.value.code == "bad_stanza" and caught.value.stanzas == []
    assert str(caught.value) == "transport message ends inside a stanza"
    assert codec.decode_stanzas(pack(PING)) == [PING]


def test_the_selected_decoder_keeps_no_state_either():
    cut = ENCODED[0][:-3]
    with pytest.raises(StanzaError):
        stanza_selected.decode_stanzas(cut)
    assert stanza_selected.decode_stanzas(pack(PING)) == [PING]


@pytest.mark.parametrize("index", range(len(VALID)), ids=[s["t"] + ":" + str(s.get("op", "")) for s in VALID])
def test_a_cut_at_every_offset_is_refused_and_never_joins_the_next_message(codec, index):
    """Before the cut: the whole stanzas; the broken part: bad_stanza; after: the next message alone."""
    lead = [VALID[0], PING]  # whole stanzas before the one that is cut
    plaintext = b"".join(pack(s) for s in lead) + ENCODED[index]
    start = len(plaintext) - len(ENCODED[index])
    follow_up = pack(PING) + ENCODED[0]
    for cut in range(start + 1, len(plaintext)):
        with pytest.raises(StanzaError) as caught:
            codec.decode_stanzas(plaintext[:cut])
        assert caught.value.code == "bad_stanza", cut
        assert caught.value.stanzas == lead, cut
        assert codec.decode_stanzas(follow_up) == [PING, VALID[0]], cut


def test_a_cut_at_every_offset_of_a_message_of_many_stanzas(codec):
    """The same with more stanzas than the one-shot path takes (the streaming decoder's path)."""
    lead = VALID * 2
    plaintext = b"".join(ENCODED * 2) + ENCODED[2]
    start = len(plaintext) - len(ENCODED[2])
    for cut in range(start + 1, len(plaintext)):
        with pytest.raises(StanzaError) as caught:
            codec.decode_stanzas(plaintext[:cut])
        assert caught.value.stanzas == lead, cut
        assert codec.decode_stanzas(pack(PING)) == [PING], cut


@pytest.mark.parametrize(
    "plaintext, message, good_before",
    [
        (pack([1, 2, 3]), "stanza must be a msgpack map, got list", 0),
        (pack(PING) + pack("ping"), "stanza must be a msgpack map, got str", 1),
        (pack({"t": "msg", "x": msgpack.ExtType(1, b"boom")}), "msgpack extension types are not allowed in stanzas", 0),
        # Type -1 is msgpack's timestamp, which msgpack decodes without asking any hook.
        (pack(PING) + b"\x82\xa1t\xa4ping\xa2id\xd6\xff\x00\x00\x00\x01", "msgpack extension types are not allowed in stanzas", 1),
        (b"\x81\xa1t\xa2\xff\xfe", "transport message is not valid msgpack (UnicodeDecodeError)", 0),
        (pack(PING) + b"\xc1", "transport message is not valid msgpack (byte 0xc1)", 1),
        (b"\x81\xa1t\xc1", "transport message is not valid msgpack (byte 0xc1)", 0),
        (pack(PING) * 5 + b"\x92\x80\xc1", "transport message is not valid msgpack (byte 0xc1)", 5),
        (b"\x81" + pack([1]) + pack(1), "transport message is not valid msgpack (TypeError)", 0),
        (pack(PING) * 6 + b"\x81\xa1t", "transport message ends inside a stanza", 6),
    ],
    ids=["array", "str after a ping", "ext", "timestamp", "utf8", "c1 after a ping", "c1 inside", "c1 after many",
         "list as key", "cut after many"],
)
def test_malformed_plaintexts_give_bad_stanza_after_the_good_ones(codec, plaintext, message, good_before):
    with pytest.raises(StanzaError) as caught:
        codec.decode_stanzas(plaintext)
    assert (caught.value.code, str(caught.value)) == ("bad_stanza", message)
    assert caught.value.stanzas == [PING] * good_before
    assert codec.decode_stanzas(pack(PING)) == [PING]


def test_more_stanzas_than_allowed_are_refused_before_decoding(codec):
    assert len(codec.decode_stanzas(b"\x80" * 256, 256)) == 256
    with pytest.raises(TooManyStanzasError) as caught:
        codec.decode_stanzas(b"\x80" * 257 + b"\xc1", 256)  # refused on the count, before the bad byte
    assert caught.value.code == "bad_stanza" and caught.value.stanzas == []
    assert str(caught.value) == "more than 256 stanzas in one transport message"


def test_huge_declared_lengths_are_incomplete_not_allocated(codec):
    for header in (b"\xdf\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff"):
        assert outcome(codec, header + b"\x00" * 10) == ("StanzaError", "transport message ends inside a stanza", "[]")


# ---------------------------------------------------------------- where an object ends


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=300) | st.binary(max_size=300),
    lambda children: st.lists(children, max_size=20)
    | st.dictionaries(st.text(max_size=10) | st.integers(-1000, 1000), children, max_size=20),
    max_leaves=20,
)


@HYPOTHESIS
@given(value=msgpack_values)
def test_object_end_agrees_with_msgpack_on_every_prefix(value):
    encoded = msgpack.packb(value, use_bin_type=True)
    for module in TWINS:
        assert module.object_end(encoded, 0, len(encoded)) == len(encoded)
        assert module.object_end(encoded + b"\xc0", 0, len(encoded) + 1) == len(encoded)
    for cut in range(len(encoded)):
        assert stanza_native.object_end(encoded, 0, cut) == stanza_pure.INCOMPLETE
        assert stanza_pure.object_end(encoded, 0, cut) == stanza_pure.INCOMPLETE


def test_object_end_knows_float32():
    encoded = msgpack.packb([1.5, -0.25], use_single_float=True)
    assert encoded[1] == 0xCA
    for module in TWINS:
        assert module.object_end(encoded, 0, len(encoded)) == len(encoded) == 11
        assert module.object_end(encoded, 0, 10) == stanza_pure.INCOMPLETE


@pytest.mark.parametrize("code, payload", [(5, b"a"), (6, b"ab"), (7, b"abcd"), (8, b"a" * 8), (9, b"a" * 16),
                                           (10, b"abc"), (11, b"a" * 300), (12, b"a" * 70000)])
def test_object_end_refuses_every_ext_format(code, payload):
    """fixext 1..16 and ext 8/16/32, whole or cut."""
    encoded = msgpack.packb([msgpack.ExtType(code, payload)])
    for module in TWINS:
        assert module.object_end(encoded, 0, len(encoded)) == stanza_pure.EXTENSION
        assert module.object_end(encoded, 0, len(encoded) - 1) == stanza_pure.EXTENSION


@pytest.mark.parametrize("timestamp", [msgpack.Timestamp(1, 0), msgpack.Timestamp(2**34, 0), msgpack.Timestamp(2**35, 1)],
                         ids=["fixext4", "fixext8", "ext8"])
def test_a_timestamp_is_an_extension_too(codec, timestamp):
    """Type -1, which msgpack decodes into a Timestamp by itself, never reaching an ext hook."""
    encoded = msgpack.packb({"t": "ping", "id": timestamp})
    assert encoded[-1 - len(timestamp.to_bytes())] == 0xFF  # the type byte, then the payload
    assert outcome(codec, encoded) == ("StanzaError", "msgpack extension types are not allowed in stanzas", "[]")


# ---------------------------------------------------------------- both twins on random input


@HYPOTHESIS
@given(data=st.binary(max_size=400), max_stanzas=st.none() | st.integers(0, 8))
def test_twins_agree_on_random_bytes(data, max_stanzas):
    assert outcome(stanza_native, data, max_stanzas) == outcome(stanza_pure, data, max_stanzas)


@settings(HYPOTHESIS, max_examples=150)
@given(
    stanzas=st.lists(st.dictionaries(st.text(max_size=5), msgpack_values, max_size=4), max_size=6),
    cut=st.integers(min_value=0),
    noise=st.binary(max_size=8),
)
def test_twins_agree_on_cut_and_corrupted_stanza_sequences(stanzas, cut, noise):
    plaintext = b"".join(pack(s) for s in stanzas)
    cut %= len(plaintext) + 1
    for candidate in (plaintext, plaintext[:cut], plaintext[:cut] + noise + plaintext[cut:]):
        native = outcome(stanza_native, candidate)
        assert native == outcome(stanza_pure, candidate)
        # Whatever came before, the next message decodes on its own.
        assert stanza_native.decode_stanzas(pack(PING)) == [PING]
    assert stanza_native.decode_stanzas(plaintext) == stanzas


# -- ack and dlv encoded without a map: byte for byte what encode_stanza makes of the map -------

_UINTS = st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1),
                   st.sampled_from([127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]))
_TEXT = st.one_of(st.text(max_size=40), st.text(min_size=30, max_size=300), st.just("z" * 70_000))
_BYTES = st.one_of(st.binary(max_size=300), st.just(b"\x00" * 70_000))


@settings(max_examples=300, deadline=None)
@given(msg_id=st.binary(min_size=16, max_size=16), ts=_UINTS, dup=st.booleans())
def test_encode_ack_is_the_map_packed(msg_id, ts, dup):
    expected = {"t": "ack", "id": msg_id, "ts": ts}
    if dup:
        expected["dup"] = True
    for codec in TWINS:
        assert codec.encode_ack(msg_id, ts, dup) == pack(expected), codec.__name__


@settings(max_examples=300, deadline=None)
@given(seq=_UINTS, msg_id=st.binary(min_size=16, max_size=16), sender=_TEXT, device=_UINTS, ts=_UINTS,
       ciphertext=_BYTES, to=st.one_of(st.none(), _TEXT))
def test_encode_dlv_is_the_map_packed(seq, msg_id, sender, device, ts, ciphertext, to):
    expected = {"t": "dlv", "seq": seq, "k": "msg", "id": msg_id, "from": sender, "dev": device, "ts": ts,
                "c": ciphertext}
    if to is not None:
        expected["to"] = to
    for codec in TWINS:
        encoded = codec.encode_dlv(seq, msg_id, sender, device, ts, ciphertext, to)
        assert encoded == pack(expected), codec.__name__
        assert msgpack.unpackb(encoded, raw=False) == expected


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True, None, "1"])
def test_ack_and_dlv_refuse_what_is_not_a_64_bit_unsigned_int(codec, bad):
    with pytest.raises(ValueError):
        codec.encode_ack(bytes(16), bad, False)
    with pytest.raises(ValueError):
        codec.encode_dlv(1, bytes(16), "a@b", bad, 1, b"", None)
    with pytest.raises(ValueError):
        codec.encode_dlv(bad, bytes(16), "a@b", 1, 1, b"", None)


@pytest.mark.parametrize("args", [
    (bytearray(16), 1, "a@b", 1, 1, b"c", None), (bytes(16), 1, b"a@b", 1, 1, b"c", None),
    (bytes(16), 1, "a@b", 1, 1, "c", None), (bytes(16), 1, "a@b", 1, 1, b"c", 7),
])
def test_dlv_takes_exactly_bytes_and_str(codec, args):
    seq, msg_id, sender, device, ts, ciphertext, to = args[1], args[0], args[2], args[3], args[4], args[5], args[6]
    with pytest.raises(TypeError):
        codec.encode_dlv(seq, msg_id, sender, device, ts, ciphertext, to)


@pytest.mark.parametrize("msg_id", [16, bytearray(16), "0123456789abcdef"])
def test_ack_takes_exactly_bytes(codec, msg_id):
    with pytest.raises(TypeError):
        codec.encode_ack(msg_id, 1, False)
