"""Frame codec: the compiled module against its pure twin, same inputs, same run.

    .venv/bin/python -m pytest bench/bench_framing.py --benchmark-only

Compare rows within a group (``--benchmark-group-by=group``, the default): ``cython`` vs ``pure``.
"""

from __future__ import annotations

import os

import pytest

import interlink.core.protocol._framing_pure as framing_pure
import interlink.ext._framing as framing_native

TWINS = pytest.mark.parametrize("framing", [framing_native, framing_pure], ids=["cython", "pure"])

FRAME_BYTES = 100
FRAME_COUNT = 65536 // (FRAME_BYTES + 2)  # 642 frames: one 64 KiB receive buffer's worth
PAYLOADS = [os.urandom(FRAME_BYTES) for _ in range(FRAME_COUNT)]
STREAM = framing_pure.encode_frames(PAYLOADS)
MSS = 1448  # typical TCP segment payload: frames straddle segment boundaries
SEGMENTS = [STREAM[i : i + MSS] for i in range(0, len(STREAM), MSS)]
BYTEWISE_FRAMES = 20
BYTEWISE = [bytes([b]) for b in STREAM[: BYTEWISE_FRAMES * (FRAME_BYTES + 2)]]


def _info(bench, framing, **extra) -> None:
    bench.extra_info["implementation"] = "cython" if framing is framing_native else "pure"
    bench.extra_info.update(extra)


@TWINS
@pytest.mark.benchmark(group="decode: 64 KiB of 100-byte frames, one feed")
def test_decode_one_chunk(bench, framing):
    _info(bench, framing, frames=FRAME_COUNT, bytes=len(STREAM))

    def run():
        return framing.FrameDecoder().feed(STREAM)

    assert bench(run) == PAYLOADS


@TWINS
@pytest.mark.benchmark(group="decode: 64 KiB of 100-byte frames, 1448-byte segments")
def test_decode_segments(bench, framing):
    _info(bench, framing, frames=FRAME_COUNT, feeds=len(SEGMENTS))

    def run():
        decoder = framing.FrameDecoder()
        frames = []
        for segment in SEGMENTS:
            frames += decoder.feed(segment)
        return frames

    assert bench(run) == PAYLOADS


@TWINS
@pytest.mark.benchmark(group="decode: 20 100-byte frames fed byte by byte")
def test_decode_bytewise(bench, framing):
    _info(bench, framing, frames=BYTEWISE_FRAMES, feeds=len(BYTEWISE))

    def run():
        decoder = framing.FrameDecoder()
        feed = decoder.feed
        frames = []
        for piece in BYTEWISE:
            frames += feed(piece)
        return frames

    assert bench(run) == PAYLOADS[:BYTEWISE_FRAMES]


@TWINS
@pytest.mark.benchmark(group="decode: one 100-byte frame")
def test_decode_single_frame(bench, framing):
    _info(bench, framing)
    decoder = framing.FrameDecoder()
    single = STREAM[: FRAME_BYTES + 2]
    assert bench(decoder.feed, single) == [PAYLOADS[0]]


@TWINS
@pytest.mark.benchmark(group="encode: 642 100-byte frames into one buffer")
def test_encode_frames(bench, framing):
    _info(bench, framing, frames=FRAME_COUNT)
    assert bench(framing.encode_frames, PAYLOADS) == STREAM


@TWINS
@pytest.mark.benchmark(group="encode: one 100-byte frame")
def test_encode_frame(bench, framing):
    _info(bench, framing)
    assert bench(framing.encode_frame, PAYLOADS[0]) == STREAM[: FRAME_BYTES + 2]
