"""Frame codec (PROTOCOL §1): every case runs on the compiled module and on its pure twin, and
hypothesis checks that the two behave identically on random streams and random split points.

Both modules come from ``tests/twins.py``, which imports the compiled one directly, so a missing
build fails this file instead of silently testing the pure twin twice.
"""

from __future__ import annotations

import array

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from interlink.core.errors import FrameError, FrameTooLargeError, ProtocolError

from twins import twin_fixture, twin_modules

TWINS = framing_native, framing_pure = twin_modules("_framing")
WIRE_MAX = 65535

HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


framing = twin_fixture("_framing")  # the module under test: compiled, then pure


def frame(payload: bytes) -> bytes:
    """Independent reference encoding, written out by hand."""
    return len(payload).to_bytes(2, "big") + payload


def feed_all(decoder, pieces) -> list:
    frames = []
    for piece in pieces:
        frames += decoder.feed(piece)
    return frames


PAYLOADS = [b"a", b"hello", bytes(range(256)) * 3, b"\x00" * 300, b"z" * 1000]
STREAM = b"".join(frame(p) for p in PAYLOADS)


# ---------------------------------------------------------------- decoding


def test_whole_stream_in_one_feed(framing):
    decoder = framing.FrameDecoder()
    frames = decoder.feed(STREAM)
    assert frames == PAYLOADS
    assert all(type(f) is bytes for f in frames)
    assert decoder.pending_bytes == 0
    assert not decoder.failed


def test_every_two_way_split(framing):
    for cut in range(len(STREAM) + 1):
        decoder = framing.FrameDecoder()
        assert feed_all(decoder, [STREAM[:cut], STREAM[cut:]]) == PAYLOADS, cut
        assert decoder.pending_bytes == 0


def test_byte_by_byte_with_pending_bytes(framing):
    decoder = framing.FrameDecoder()
    frames = []
    held = 0  # bytes of the current unfinished frame, header included
    for byte in STREAM:
        got = decoder.feed(bytes([byte]))
        frames += got
        held = 0 if got else held + 1
        assert decoder.pending_bytes == held
    assert frames == PAYLOADS


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_largest_frame_trickled_in(framing, chunk):
    payload = bytes(range(256)) * 255 + bytes(range(255))
    assert len(payload) == WIRE_MAX
    data = frame(payload) + frame(b"after")
    decoder = framing.FrameDecoder()
    frames = feed_all(decoder, [data[i : i + chunk] for i in range(0, len(data), chunk)])
    assert frames == [payload, b"after"]
    assert decoder.pending_bytes == 0


def test_empty_feed(framing):
    decoder = framing.FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\x00") == []
    assert decoder.feed(b"") == []
    assert decoder.pending_bytes == 1
    assert decoder.feed(b"\x03ab") == []
    assert decoder.pending_bytes == 4
    assert decoder.feed(b"") == []
    assert decoder.feed(b"c") == [b"abc"]


@pytest.mark.parametrize(
    "kind",
    ["bytes", "bytearray", "memoryview", "memoryview-slice", "memoryview-uint16", "array"],
)
def test_feed_accepts_bytes_like(framing, kind):
    data = frame(b"one") + frame(b"two!")  # 11 bytes; padded below where a type needs it
    if kind == "bytes":
        pieces = [data[:4], data[4:]]
    elif kind == "bytearray":
        pieces = [bytearray(data[:4]), bytearray(data[4:])]
    elif kind == "memoryview":
        pieces = [memoryview(data)[:4], memoryview(data)[4:]]
    elif kind == "memoryview-slice":  # a window into a bigger receive buffer, as BufferedProtocol gives
        buffer = bytearray(b"\xee" * 5 + data + b"\xee" * 5)
        pieces = [memoryview(buffer)[5:9], memoryview(buffer)[9:16]]
    elif kind == "memoryview-uint16":  # a non-byte item format is read as its raw bytes
        data += frame(b"x")  # 14 bytes: a whole number of 2-byte items
        pieces = [memoryview(data).cast("H")]
    else:
        data += frame(b"x")
        pieces = [array.array("H", data)]
    decoder = framing.FrameDecoder()
    expected = [b"one", b"two!"] + ([b"x"] if len(data) > 11 else [])
    assert feed_all(decoder, pieces) == expected
    assert decoder.pending_bytes == 0


def test_frames_are_copies(framing):
    """Frames never alias the caller's buffer: reusing the receive buffer must not change them."""
    buffer = bytearray(frame(b"abcd") + frame(b"efgh")[:4])
    decoder = framing.FrameDecoder()
    frames = decoder.feed(buffer)
    buffer[:] = b"\xff" * len(buffer)
    assert frames == [b"abcd"]
    assert decoder.feed(bytearray(b"gh")) == [b"efgh"]


@pytest.mark.parametrize("bad", ["text", 5, None, 1.5, [1, 2]])
def test_feed_rejects_non_bytes(framing, bad):
    decoder = framing.FrameDecoder()
    decoder.feed(b"\x00")
    with pytest.raises(TypeError):
        decoder.feed(bad)
    assert not decoder.failed
    assert decoder.feed(b"\x01z") == [b"z"]


def test_non_contiguous_memoryview_is_rejected(framing):
    decoder = framing.FrameDecoder()
    with pytest.raises(TypeError):
        decoder.feed(memoryview(frame(b"abcd") * 2)[::2])
    assert not decoder.failed


# ---------------------------------------------------------------- framing errors


def test_zero_length_frame(framing):
    decoder = framing.FrameDecoder()
    with pytest.raises(FrameError) as info:
        decoder.feed(b"\x00\x00")
    assert type(info.value) is FrameError
    assert info.value.code == "bad_frame"
    assert isinstance(info.value, ProtocolError)
    assert info.value.frames == []
    assert "zero-length" in str(info.value)
    assert decoder.failed
    assert decoder.pending_bytes == 0


def test_oversize_rejected_on_header_alone(framing):
    """Only the 2-byte header of a 65535-byte frame arrives: refused at once, nothing buffered."""
    decoder = framing.FrameDecoder(max_frame_bytes=1000)
    with pytest.raises(FrameTooLargeError) as info:
        decoder.feed(b"\xff\xff")
    assert info.value.frames == []
    assert info.value.code == "bad_frame"
    assert str(info.value) == "frame of 65535 bytes exceeds the maximum of 1000"
    assert decoder.failed
    assert decoder.pending_bytes == 0


def test_oversize_header_split_across_feeds(framing):
    decoder = framing.FrameDecoder(max_frame_bytes=1000)
    assert decoder.feed(b"\x03") == []
    assert decoder.pending_bytes == 1
    with pytest.raises(FrameTooLargeError) as info:
        decoder.feed(b"\xe9" + b"\x00\x01x" * 400)  # 0x03e9 = 1001; the rest would be valid frames
    assert info.value.frames == []
    assert str(info.value) == "frame of 1001 bytes exceeds the maximum of 1000"
    assert decoder.pending_bytes == 0


def test_oversize_header_with_body_in_same_feed(framing):
    decoder = framing.FrameDecoder(max_frame_bytes=1000)
    with pytest.raises(FrameTooLargeError):
        decoder.feed(frame(b"y" * 1001))
    assert decoder.pending_bytes == 0


def test_limit_is_inclusive(framing):
    decoder = framing.FrameDecoder(max_frame_bytes=1000)
    assert decoder.feed(b"\x03\xe8") == []  # exactly 1000: accepted, header held
    assert decoder.pending_bytes == 2
    assert decoder.feed(b"q" * 999) == []
    assert decoder.pending_bytes == 1001
    assert decoder.feed(b"q") == [b"q" * 1000]


def test_lowered_limit_applies_to_pending_frame(framing):
    decoder = framing.FrameDecoder(max_frame_bytes=1000)
    assert decoder.feed(b"\x01\xf4" + b"p" * 10) == []  # 500-byte frame pending
    decoder.max_frame_bytes = 100
    assert decoder.max_frame_bytes == 100
    with pytest.raises(FrameTooLargeError) as info:
        decoder.feed(b"")
    assert str(info.value) == "frame of 500 bytes exceeds the maximum of 100"


def test_failed_decoder_stays_failed(framing):
    decoder = framing.FrameDecoder(max_frame_bytes=10)
    with pytest.raises(FrameTooLargeError):
        decoder.feed(frame(b"x" * 11))
    for data in (frame(b"ok"), b"", bytearray(b"\x00\x01z")):
        with pytest.raises(FrameError) as info:
            decoder.feed(data)
        assert type(info.value) is FrameError
        assert info.value.frames == []
        assert decoder.failed
        assert decoder.pending_bytes == 0


def test_frames_before_bad_header_are_exposed(framing):
    decoder = framing.FrameDecoder(max_frame_bytes=100)
    assert decoder.feed(frame(b"first")[:3]) == []
    with pytest.raises(FrameTooLargeError) as info:
        decoder.feed(frame(b"first")[3:] + frame(b"second") + frame(b"third") + b"\x00\x65" + b"x" * 101)
    assert info.value.frames == [b"first", b"second", b"third"]
    assert decoder.failed


def test_frames_before_zero_length_are_exposed(framing):
    decoder = framing.FrameDecoder()
    with pytest.raises(FrameError) as info:
        decoder.feed(frame(b"a") + frame(b"bb") + b"\x00\x00" + frame(b"never"))
    assert info.value.frames == [b"a", b"bb"]


def test_partial_frame_then_zero_header_in_later_feed(framing):
    decoder = framing.FrameDecoder()
    assert decoder.feed(frame(b"abc") + b"\x00") == [b"abc"]
    with pytest.raises(FrameError) as info:
        decoder.feed(b"\x00")
    assert info.value.frames == []


# ---------------------------------------------------------------- arguments


def test_default_max_frame_bytes(framing):
    assert framing.FrameDecoder().max_frame_bytes == WIRE_MAX
    assert framing.FrameDecoder(1).max_frame_bytes == 1
    assert framing.FrameDecoder(max_frame_bytes=WIRE_MAX).max_frame_bytes == WIRE_MAX


@pytest.mark.parametrize("value", [0, -1, WIRE_MAX + 1, 2**70])
def test_max_frame_bytes_out_of_range(framing, value):
    message = f"max_frame_bytes must be in 1..65535, got {value}"
    with pytest.raises(ValueError) as info:
        framing.FrameDecoder(value)
    assert str(info.value) == message
    decoder = framing.FrameDecoder(500)
    with pytest.raises(ValueError) as info:
        decoder.max_frame_bytes = value
    assert str(info.value) == message
    assert decoder.max_frame_bytes == 500


@pytest.mark.parametrize("value", [1.5, 100.0, "100", None])
def test_max_frame_bytes_must_be_an_integer(framing, value):
    with pytest.raises(TypeError):
        framing.FrameDecoder(value)
    decoder = framing.FrameDecoder()
    with pytest.raises(TypeError):
        decoder.max_frame_bytes = value


def test_max_frame_bytes_one_accepts_single_byte_frames(framing):
    decoder = framing.FrameDecoder(1)
    assert decoder.feed(b"\x00\x01a\x00\x01b") == [b"a", b"b"]
    with pytest.raises(FrameTooLargeError):
        decoder.feed(b"\x00\x02")


# ---------------------------------------------------------------- encoding


def test_encode_frame(framing):
    assert framing.encode_frame(b"abc") == b"\x00\x03abc"
    assert framing.encode_frame(bytearray(b"\x00")) == b"\x00\x01\x00"
    assert framing.encode_frame(memoryview(b"xyz")[1:]) == b"\x00\x02yz"
    big = b"b" * WIRE_MAX
    assert framing.encode_frame(big) == b"\xff\xff" + big
    assert type(framing.encode_frame(bytearray(b"q"))) is bytes


def test_encode_counts_bytes_not_items(framing):
    """A memoryview's len() counts items; the length prefix must count bytes."""
    payload = array.array("I", [1, 2, 3])
    assert framing.encode_frame(payload) == b"\x00\x0c" + payload.tobytes()
    assert framing.encode_frames([memoryview(payload)]) == b"\x00\x0c" + payload.tobytes()


@pytest.mark.parametrize("size", [0, WIRE_MAX + 1])
def test_encode_frame_bad_size(framing, size):
    with pytest.raises(ValueError) as info:
        framing.encode_frame(b"x" * size)
    assert str(info.value) == f"frame payload must be 1..65535 bytes, got {size}"


@pytest.mark.parametrize("bad", ["text", 5, None])
def test_encode_rejects_non_bytes(framing, bad):
    """``bytes(5)`` would be five zero bytes; the codec must refuse an int instead."""
    with pytest.raises(TypeError):
        framing.encode_frame(bad)
    with pytest.raises(TypeError):
        framing.encode_frames([b"ok", bad])


def test_encode_frames(framing):
    payloads = [b"a", bytearray(b"bc"), memoryview(b"def")]
    assert framing.encode_frames(payloads) == b"\x00\x01a\x00\x02bc\x00\x03def"
    assert framing.encode_frames(iter(payloads)) == b"\x00\x01a\x00\x02bc\x00\x03def"
    assert framing.encode_frames([]) == b""
    assert type(framing.encode_frames([b"x"])) is bytes


@pytest.mark.parametrize("size", [0, WIRE_MAX + 1])
def test_encode_frames_bad_size(framing, size):
    with pytest.raises(ValueError) as info:
        framing.encode_frames([b"good", b"x" * size, b"good"])
    assert str(info.value) == f"frame payload must be 1..65535 bytes, got {size}"


def test_encode_frames_snapshots_bytearrays(framing):
    """Each payload is taken when iterated; a later change to the same buffer does not leak in."""
    buffer = bytearray(b"one")

    def payloads():
        yield buffer
        buffer[:] = b"two"
        yield buffer

    assert framing.encode_frames(payloads()) == b"\x00\x03one\x00\x03two"


def test_encode_then_decode(framing):
    decoder = framing.FrameDecoder()
    assert decoder.feed(framing.encode_frames(PAYLOADS)) == PAYLOADS
    assert decoder.feed(b"".join(framing.encode_frame(p) for p in PAYLOADS)) == PAYLOADS


# ---------------------------------------------------------------- both twins on random input


def run_twin(module, max_frame_bytes: int, pieces: list) -> list:
    """Feed ``pieces`` and record, per feed, the frames or the exception, plus the state after it."""
    decoder = module.FrameDecoder(max_frame_bytes)
    trace = []
    for piece in pieces:
        try:
            outcome = ("frames", decoder.feed(piece))
        except FrameError as exc:
            outcome = (type(exc).__name__, exc.frames, str(exc))
        trace.append((outcome, decoder.pending_bytes, decoder.failed))
    return trace


def split(data: bytes, cuts: list) -> list:
    bounds = [0] + sorted(c % (len(data) + 1) for c in cuts) + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def as_kind(piece: bytes, kind: str):
    return {"bytes": piece, "bytearray": bytearray(piece), "memoryview": memoryview(piece)}[kind]


payload_lists = st.lists(st.binary(min_size=1, max_size=300), max_size=12)
cut_lists = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)
kinds = st.sampled_from(["bytes", "bytearray", "memoryview"])


@HYPOTHESIS
@given(payloads=payload_lists, cuts=cut_lists, kind=kinds)
def test_twins_round_trip_any_split(payloads, cuts, kind):
    data = framing_pure.encode_frames(payloads)
    assert framing_native.encode_frames(payloads) == data
    assert b"".join(framing_native.encode_frame(p) for p in payloads) == data
    pieces = [as_kind(p, kind) for p in split(data, cuts)]
    for module in TWINS:
        decoder = module.FrameDecoder()
        assert feed_all(decoder, pieces) == payloads
        assert decoder.pending_bytes == 0


@HYPOTHESIS
@given(payloads=payload_lists, cuts=cut_lists, max_frame_bytes=st.integers(1, 400), tail=st.binary(max_size=4))
def test_twins_agree_on_frame_streams(payloads, cuts, max_frame_bytes, tail):
    """Some frames exceed the limit, the tail may hold a zero or partial header: same trace."""
    data = framing_pure.encode_frames(payloads) + tail
    pieces = split(data, cuts)
    assert run_twin(framing_native, max_frame_bytes, pieces) == run_twin(framing_pure, max_frame_bytes, pieces)


@HYPOTHESIS
@given(
    garbage=st.binary(max_size=2000),
    cuts=cut_lists,
    max_frame_bytes=st.one_of(st.integers(1, 300), st.integers(1, WIRE_MAX)),
)
def test_twins_agree_on_garbage(garbage, cuts, max_frame_bytes):
    pieces = split(garbage, cuts)
    assert run_twin(framing_native, max_frame_bytes, pieces) == run_twin(framing_pure, max_frame_bytes, pieces)


@HYPOTHESIS
@given(data=st.binary(max_size=600), max_frame_bytes=st.integers(1, 64))
def test_twins_agree_byte_by_byte(data, max_frame_bytes):
    pieces = [data[i : i + 1] for i in range(len(data))]
    assert run_twin(framing_native, max_frame_bytes, pieces) == run_twin(framing_pure, max_frame_bytes, pieces)
