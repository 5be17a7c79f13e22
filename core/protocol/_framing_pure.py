"""Pure-Python twin of ``interlink.ext._framing``: the 2-byte big-endian length-prefixed frame codec.

Wire form (docs/protocol.md §1): ``len:uint16be`` then ``len`` bytes, 1 <= len <= 65535. The decoder is
incremental: feed it any split of the stream and it returns every frame completed so far. The
announced length is checked against the maximum as soon as both header bytes are known, before a
single body byte is buffered, so an attacker cannot make the receiver allocate for a huge frame.
"""

from __future__ import annotations

import operator

from interlink.core.errors import FrameError, FrameTooLargeError

WIRE_MAX_FRAME_BYTES = 65535


def _check_max_frame_bytes(value) -> int:
    value = operator.index(value)  # TypeError for floats, strings, None
    if not 1 <= value <= WIRE_MAX_FRAME_BYTES:
        raise ValueError(f"max_frame_bytes must be in 1..{WIRE_MAX_FRAME_BYTES}, got {value}")
    return value


class FrameDecoder:
    """Incremental frame decoder. ``feed`` returns complete frame bodies as ``bytes``.

    After a framing error the decoder is failed: every later ``feed`` raises ``FrameError``.
    Every ``FrameError`` it raises carries ``frames``: the frames completed in the same ``feed``
    call before the bad header (empty when the decoder had already failed), so a caller can still
    process what arrived intact.
    """

    __slots__ = ("_max_frame_bytes", "_buffer", "_failed")

    def __init__(self, max_frame_bytes: int = WIRE_MAX_FRAME_BYTES) -> None:
        self._max_frame_bytes = _check_max_frame_bytes(max_frame_bytes)
        # The unfinished frame (header and partial body); empty most of the time. A bytearray, so
        # that a frame trickled in byte by byte costs linear time, not quadratic.
        self._buffer = bytearray()
        self._failed = False

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame body accepted, in bytes (1..65535). Settable; a new value applies from the
        next ``feed`` on, to the pending frame too."""
        return self._max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, value: int) -> None:
        self._max_frame_bytes = _check_max_frame_bytes(value)

    @property
    def pending_bytes(self) -> int:
        """Bytes held for a frame that is not complete yet (header included)."""
        return len(self._buffer)

    @property
    def failed(self) -> bool:
        return self._failed

    def feed(self, data) -> list:
        if self._failed:
            error = FrameError("frame decoder already failed")
            error.frames = []
            raise error
        view = data if isinstance(data, bytes) else memoryview(data).cast("B")
        if self._buffer:
            self._buffer += view
            view = self._buffer
        frames = []
        pos = 0
        end = len(view)
        while end - pos >= 2:
            length = (view[pos] << 8) | view[pos + 1]
            if length == 0:
                self._fail(frames, FrameError("zero-length frame"))
            if length > self._max_frame_bytes:
                self._fail(
                    frames,
                    FrameTooLargeError(f"frame of {length} bytes exceeds the maximum of {self._max_frame_bytes}"),
                )
            if end - pos - 2 < length:
                break
            frames.append(bytes(view[pos + 2 : pos + 2 + length]))
            pos += 2 + length
        if view is self._buffer:
            del self._buffer[:pos]  # drop what was decoded; keeps the unfinished frame
        elif pos < end:
            self._buffer = bytearray(view[pos:end])
        return frames

    def _fail(self, frames: list, error: FrameError) -> None:
        self._failed = True
        self._buffer = bytearray()
        error.frames = frames
        raise error


def _payload_bytes(payload) -> bytes:
    """The raw bytes of a bytes-like payload. ``len()`` of a memoryview counts items, not bytes,
    and ``bytes(5)`` is five zero bytes, so neither is used on the payload directly."""
    if isinstance(payload, bytes):
        return payload
    with memoryview(payload) as view:  # TypeError for anything that is not bytes-like
        return view.tobytes()


def encode_frame(payload) -> bytes:
    """One frame: length prefix + payload."""
    body = _payload_bytes(payload)
    length = len(body)
    if not 1 <= length <= WIRE_MAX_FRAME_BYTES:
        raise ValueError(f"frame payload must be 1..{WIRE_MAX_FRAME_BYTES} bytes, got {length}")
    return length.to_bytes(2, "big") + body


def encode_frames(payloads) -> bytes:
    """Many frames written into one buffer, ready for a single transport write."""
    out = bytearray()
    for payload in payloads:
        body = _payload_bytes(payload)
        length = len(body)
        if not 1 <= length <= WIRE_MAX_FRAME_BYTES:
            raise ValueError(f"frame payload must be 1..{WIRE_MAX_FRAME_BYTES} bytes, got {length}")
        out += length.to_bytes(2, "big")
        out += body
    return bytes(out)
