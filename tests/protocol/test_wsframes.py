"""The TCP form of the contract (preamble, length-prefixed frames) and the WebSocket form (one
message per Noise message) convert into each other exactly (docs/protocol.md §1)."""

from __future__ import annotations

import os

import pytest

from interlink.core.errors import FrameError, LocalProtocolError
from interlink.core.protocol.framing import FrameDecoder, encode_frames
from interlink.core.protocol.noise import Suite, make_preamble
from interlink.core.protocol.wsframes import message_to_frame, stream_to_messages


def test_a_stream_splits_into_its_frames_and_back():
    payloads = [os.urandom(size) for size in (1, 17, 300, 65535, 2)]
    stream = encode_frames(payloads)
    messages = stream_to_messages(stream)
    assert [bytes(m) for m in messages] == payloads
    rebuilt = b"".join(message_to_frame(bytes(m)) for m in messages)
    assert rebuilt == stream
    assert FrameDecoder(65535).feed(rebuilt) == payloads


def test_a_clients_first_output_starts_with_the_preamble_message():
    preamble = make_preamble(int(Suite.IK_AESGCM))
    messages = stream_to_messages(preamble + encode_frames([b"e" * 32]), preamble=True)
    assert [bytes(m) for m in messages] == [preamble, b"e" * 32]
    assert [bytes(m) for m in stream_to_messages(preamble, preamble=True)] == [preamble]


def test_nothing_gives_no_messages_and_an_empty_message_is_the_empty_frame():
    assert stream_to_messages(b"") == []
    assert message_to_frame(b"") == b"\x00\x00"
    with pytest.raises(FrameError):  # the empty frame the contract refuses
        FrameDecoder(65535).feed(message_to_frame(b""))


@pytest.mark.parametrize("stream", [b"\x00", b"\x00\x05abc", encode_frames([b"abc"]) + b"\x00"])
def test_a_cut_stream_is_our_bug_and_says_so(stream):
    with pytest.raises(LocalProtocolError):
        stream_to_messages(stream)


def test_a_message_larger_than_any_frame_is_refused():
    with pytest.raises(LocalProtocolError):
        message_to_frame(b"x" * 65536)
