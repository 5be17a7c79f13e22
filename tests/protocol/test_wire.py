"""The numbers of the wire contract (``core/protocol/wire.py``). The compiled and pure twins keep
their own copies (a ``.pyx`` module does not import them), which must agree with it; and the
sizes hold together: the largest plaintext plus the AEAD tag fills the largest frame, one byte
more is refused."""

from __future__ import annotations

import pytest

from interlink.core.errors import LocalProtocolError
from interlink.core.protocol import wire

from twins import TWIN_IDS, twin_modules

PAIRS = list(zip(twin_modules("_framing"), twin_modules("_cipher")))  # (framing, cipher): compiled, then pure


@pytest.mark.parametrize("framing, cipher", PAIRS, ids=TWIN_IDS)
def test_each_twins_copy_of_the_numbers_is_the_contracts(framing, cipher):
    assert framing.WIRE_MAX_FRAME_BYTES == cipher.WIRE_MAX_FRAME_BYTES == wire.WIRE_MAX_FRAME_BYTES
    assert cipher.TAG_BYTES == wire.TAG_BYTES
    assert framing.FrameDecoder().max_frame_bytes == wire.WIRE_MAX_FRAME_BYTES


@pytest.mark.parametrize("framing, cipher", PAIRS, ids=TWIN_IDS)
def test_the_largest_plaintext_fills_the_largest_frame(framing, cipher):
    state = cipher.CipherState("ChaChaPoly", bytes(32))
    stream = state.encrypt_frames([b"x" * wire.MAX_PLAINTEXT_BYTES])
    assert len(stream) == 2 + wire.WIRE_MAX_FRAME_BYTES  # the 2-byte length prefix, then the frame
    assert [len(frame) for frame in framing.FrameDecoder().feed(stream)] == [wire.WIRE_MAX_FRAME_BYTES]
    with pytest.raises(LocalProtocolError):
        state.encrypt_frames([b"x" * (wire.MAX_PLAINTEXT_BYTES + 1)])
    with pytest.raises(ValueError):
        framing.encode_frame(b"x" * (wire.WIRE_MAX_FRAME_BYTES + 1))
