# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of ``interlink.core.protocol._framing_pure``: the 2-byte big-endian length-prefixed frame codec.

Same signatures, exceptions and partial-input behaviour as the pure twin (read that one first; it is
the contract). What differs is only how: the input is read through a raw pointer, every frame that
lies whole inside one ``feed`` is copied straight from the input into its ``bytes`` object, and only
a frame split across ``feed`` calls is buffered, in a body buffer that exists only while such a
frame is pending. An idle decoder holds no buffer at all.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.string cimport memcpy

import operator

WIRE_MAX_FRAME_BYTES = 65535

cdef enum:
    _WIRE_MAX = 65535
    _MIN_BODY_CAPACITY = 256  # first allocation for a split frame's body (capped at the frame's length)


def _check_max_frame_bytes(value):
    value = operator.index(value)  # TypeError for floats, strings, None
    if not 1 <= value <= _WIRE_MAX:
        raise ValueError(f"max_frame_bytes must be in 1..{WIRE_MAX_FRAME_BYTES}, got {value}")
    return value


@cython.final
@cython.auto_pickle(False)
cdef class FrameDecoder:
    """Incremental frame decoder. ``feed`` returns complete frame bodies as ``bytes``.

    After a framing error the decoder is failed: every later ``feed`` raises ``FrameError``.
    Every ``FrameError`` it raises carries ``frames``: the frames completed in the same ``feed``
    call before the bad header (empty when the decoder had already failed), so a caller can still
    process what arrived intact.
    """

    cdef Py_ssize_t _max_frame_bytes
    cdef bint _failed
    # The unfinished frame. Header: _header_len bytes seen (0, 1 or 2); the first byte sits in
    # _header0 while only one is known, the announced length in _frame_len once both are.
    cdef int _header_len
    cdef unsigned char _header0
    cdef Py_ssize_t _frame_len
    # Body bytes of the unfinished frame: allocated only while a split frame is pending, grown
    # geometrically (at most twice what arrived, never past _frame_len), freed when it completes.
    cdef char* _body
    cdef Py_ssize_t _body_len
    cdef Py_ssize_t _body_capacity

    def __init__(self, max_frame_bytes=WIRE_MAX_FRAME_BYTES):
        self._max_frame_bytes = _check_max_frame_bytes(max_frame_bytes)
        self._failed = False
        self._reset()

    def __dealloc__(self):
        PyMem_Free(self._body)

    @property
    def max_frame_bytes(self):
        """Largest frame body accepted, in bytes (1..65535). Settable; a new value applies from the
        next ``feed`` on, to the pending frame too."""
        return self._max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, value):
        self._max_frame_bytes = _check_max_frame_bytes(value)

    @property
    def pending_bytes(self):
        """Bytes held for a frame that is not complete yet (header included)."""
        return self._header_len + self._body_len

    @property
    def failed(self):
        return self._failed

    def feed(self, data):
        cdef Py_buffer view
        cdef list frames
        if self._failed:
            error = FrameError("frame decoder already failed")
            error.frames = []
            raise error
        if isinstance(data, bytes):
            return self._decode(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        if not isinstance(data, bytearray):
            # The pure twin's conversion, so that the same objects are refused the same way.
            data = memoryview(data).cast("B")
        # Holding a buffer export keeps a bytearray from being resized under the pointer.
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            frames = self._decode(<const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return frames

    cdef list _decode(self, const unsigned char* data, Py_ssize_t size):
        cdef list frames = []
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t length = 0
        cdef Py_ssize_t missing
        cdef Py_ssize_t body_len
        cdef char* body
        cdef bytes frame
        cdef char* out

        # 1. Finish the frame left unfinished by earlier calls.
        if self._header_len:
            if self._header_len == 1:
                if size == 0:
                    return frames
                self._frame_len = (self._header0 << 8) | data[0]
                self._header_len = 2
                pos = 1
            self._check_length(frames, self._frame_len)  # again: max_frame_bytes may have changed
            missing = self._frame_len - self._body_len
            if size - pos < missing:
                self._append_body(data + pos, size - pos)
                return frames
            # Take the body buffer out of self before allocating, so that nothing that runs
            # during the allocation (a GC finalizer) can free it under us.
            body = self._body
            body_len = self._body_len
            self._body = NULL
            self._reset()
            try:
                frame = PyBytes_FromStringAndSize(NULL, body_len + missing)
                out = PyBytes_AS_STRING(frame)
                if body_len:
                    memcpy(out, body, body_len)
                memcpy(out + body_len, data + pos, missing)
            finally:
                PyMem_Free(body)
            frames.append(frame)
            pos += missing

        # 2. Every frame that lies whole in the input, copied straight into its bytes object.
        while size - pos >= 2:
            length = (data[pos] << 8) | data[pos + 1]
            self._check_length(frames, length)
            if size - pos - 2 < length:
                break
            frames.append(PyBytes_FromStringAndSize(<const char*>data + pos + 2, length))
            pos += 2 + length

        # 3. Keep the start of the next frame (its header has been checked if it is complete).
        if size - pos == 1:
            self._header0 = data[pos]
            self._header_len = 1
        elif size - pos >= 2:
            self._frame_len = length
            self._header_len = 2
            self._append_body(data + pos + 2, size - pos - 2)
        return frames

    cdef int _append_body(self, const unsigned char* data, Py_ssize_t size) except -1:
        cdef Py_ssize_t needed = self._body_len + size
        cdef Py_ssize_t capacity
        cdef char* grown
        if size == 0:
            return 0
        if needed > self._body_capacity:
            capacity = max(needed, 2 * self._body_capacity, <Py_ssize_t>_MIN_BODY_CAPACITY)
            if capacity > self._frame_len:
                capacity = self._frame_len
            grown = <char*>PyMem_Realloc(self._body, capacity)
            if grown is NULL:
                raise MemoryError()
            self._body = grown
            self._body_capacity = capacity
        memcpy(self._body + self._body_len, data, size)
        self._body_len = needed
        return 0

    cdef void _reset(self) noexcept:
        """Forget the unfinished frame and free its buffer."""
        PyMem_Free(self._body)
        self._body = NULL
        self._body_len = 0
        self._body_capacity = 0
        self._header_len = 0
        self._frame_len = 0

    cdef int _check_length(self, list frames, Py_ssize_t length) except -1:
        if length == 0:
            self._fail(frames, FrameError("zero-length frame"))
        if length > self._max_frame_bytes:
            self._fail(
                frames,
                FrameTooLargeError(f"frame of {length} bytes exceeds the maximum of {self._max_frame_bytes}"),
            )
        return 0

    cdef int _fail(self, list frames, object error) except -1:
        self._failed = True
        self._reset()
        error.frames = frames
        raise error


cdef bytes _payload_bytes(object payload):
    """The raw bytes of a bytes-like payload (as the pure twin's ``_payload_bytes``)."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray):
        return PyBytes_FromStringAndSize(PyByteArray_AS_STRING(payload), PyByteArray_GET_SIZE(payload))
    with memoryview(payload) as view:  # TypeError for anything that is not bytes-like
        return view.tobytes()


cdef inline void _put_frame(char* out, const char* body, Py_ssize_t length) noexcept:
    out[0] = <char>(length >> 8)
    out[1] = <char>(length & 0xFF)
    memcpy(out + 2, body, length)


def encode_frame(payload):
    """One frame: length prefix + payload."""
    cdef bytes body = _payload_bytes(payload)
    cdef Py_ssize_t length = PyBytes_GET_SIZE(body)
    cdef bytes out
    if not 1 <= length <= _WIRE_MAX:
        raise ValueError(f"frame payload must be 1..{WIRE_MAX_FRAME_BYTES} bytes, got {length}")
    out = PyBytes_FromStringAndSize(NULL, length + 2)
    _put_frame(PyBytes_AS_STRING(out), PyBytes_AS_STRING(body), length)
    return out


def encode_frames(payloads):
    """Many frames written into one buffer, ready for a single transport write."""
    cdef list bodies = []
    cdef bytes body
    cdef bytes out
    cdef Py_ssize_t length
    cdef Py_ssize_t total = 0
    cdef char* cursor
    for payload in payloads:
        body = _payload_bytes(payload)
        length = PyBytes_GET_SIZE(body)
        if not 1 <= length <= _WIRE_MAX:
            raise ValueError(f"frame payload must be 1..{WIRE_MAX_FRAME_BYTES} bytes, got {length}")
        bodies.append(body)
        total += 2 + length
    if total == 0:
        return b""
    out = PyBytes_FromStringAndSize(NULL, total)
    cursor = PyBytes_AS_STRING(out)
    for body in bodies:
        length = PyBytes_GET_SIZE(body)
        _put_frame(cursor, PyBytes_AS_STRING(body), length)
        cursor += 2 + length
    return out


# Imported last, on purpose: importing interlink.core.errors runs interlink.core's __init__, whose
# selector imports this module back. By now FrameDecoder, encode_frame and encode_frames exist, so
# ``import interlink.ext._framing`` works even as the very first import of the process.
from interlink.core.errors import FrameError, FrameTooLargeError  # noqa: E402
