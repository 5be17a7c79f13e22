# cython: language_level=3
"""Compiled twin of ``interlink.core.protocol._stanza_pure``: one transport plaintext to its stanzas.

Same algorithm, same results, same exceptions and messages: a scan of the msgpack format bytes
finds where each top-level object ends (in C here), then exactly those bytes are decoded by a
decoder made for this call alone — ``msgpack.unpackb`` for the usual single stanza, a fresh
``msgpack.Unpacker`` for several. Nothing survives the call, so no later bytes can complete a
stanza cut short.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

import msgpack

from interlink.core.errors import StanzaError, TooManyStanzasError

INCOMPLETE = -1
RESERVED = -2
EXTENSION = -3  # msgpack would turn type -1 into a Timestamp without asking ext_hook: refused on the scan
SLICED_MAX = 4  # up to this many stanzas, one one-shot decode each; more share a streaming decoder

cdef Py_ssize_t _INCOMPLETE = -1
cdef Py_ssize_t _RESERVED = -2
cdef Py_ssize_t _EXTENSION = -3

_unpackb = msgpack.unpackb
_Unpacker = msgpack.Unpacker
_UnpackException = msgpack.UnpackException


cdef inline unsigned long long _be(const unsigned char* p, int size) noexcept nogil:
    cdef unsigned long long value = 0
    cdef int i
    for i in range(size):
        value = (value << 8) | p[i]
    return value


cdef Py_ssize_t _object_end(const unsigned char* data, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    # Objects still to skip; a container adds its entries. Every object takes at least one byte,
    # so more remaining objects than bytes left means the plaintext ends inside this one.
    cdef long long remaining = 1
    cdef unsigned char byte
    cdef unsigned long long length
    cdef int size_bytes
    while remaining:
        if pos >= end:
            return _INCOMPLETE
        byte = data[pos]
        remaining -= 1
        if byte <= 0x7F or byte >= 0xE0:  # positive and negative fixint
            pos += 1
        elif byte <= 0x8F:  # fixmap
            remaining += 2 * (byte & 0x0F)
            pos += 1
        elif byte <= 0x9F:  # fixarray
            remaining += byte & 0x0F
            pos += 1
        elif byte <= 0xBF:  # fixstr
            pos += 1 + (byte & 0x1F)
        elif byte == 0xC1:
            return _RESERVED
        elif byte == 0xC0 or byte == 0xC2 or byte == 0xC3:  # nil, false, true
            pos += 1
        elif byte <= 0xC6:  # bin 8/16/32
            size_bytes = 1 << (byte - 0xC4)
            if pos + 1 + size_bytes > end:
                return _INCOMPLETE
            length = _be(data + pos + 1, size_bytes)
            if length > <unsigned long long>(end - pos):
                return _INCOMPLETE
            pos += 1 + size_bytes + <Py_ssize_t>length
        elif byte <= 0xC9:  # ext 8/16/32
            return _EXTENSION
        elif byte <= 0xCB:  # float 32/64
            pos += 5 if byte == 0xCA else 9
        elif byte <= 0xD3:  # uint 8..64 (0xcc-0xcf), int 8..64 (0xd0-0xd3)
            pos += 1 + (1 << ((byte - 0xCC) & 3))
        elif byte <= 0xD8:  # fixext 1/2/4/8/16
            return _EXTENSION
        elif byte <= 0xDB:  # str 8/16/32
            size_bytes = 1 << (byte - 0xD9)
            if pos + 1 + size_bytes > end:
                return _INCOMPLETE
            length = _be(data + pos + 1, size_bytes)
            if length > <unsigned long long>(end - pos):
                return _INCOMPLETE
            pos += 1 + size_bytes + <Py_ssize_t>length
        else:  # array 16/32 (0xdc, 0xdd), map 16/32 (0xde, 0xdf)
            size_bytes = 2 if byte == 0xDC or byte == 0xDE else 4
            if pos + 1 + size_bytes > end:
                return _INCOMPLETE
            length = _be(data + pos + 1, size_bytes)
            if length > <unsigned long long>(end - pos):
                return _INCOMPLETE
            remaining += <long long>length * (2 if byte >= 0xDE else 1)
            pos += 1 + size_bytes
        if remaining > end - pos:
            return _INCOMPLETE
    return pos


def object_end(data, Py_ssize_t pos, Py_ssize_t end):
    """Where the msgpack object starting at ``data[pos]`` ends (exclusive), looking no further
    than ``end``; ``INCOMPLETE`` if it runs past ``end``, ``RESERVED`` if it holds byte 0xc1,
    ``EXTENSION`` if it holds an extension type (the first bad byte decides)."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if pos < 0 or end > view.len or pos > end:
            raise IndexError("object_end: pos and end must satisfy 0 <= pos <= end <= len(data)")
        return _object_end(<const unsigned char*>view.buf, pos, end)
    finally:
        PyBuffer_Release(&view)


def _reject_ext(code, data):
    raise StanzaError(f"msgpack extension type {code} is not allowed")


cdef _not_a_map(obj):
    return StanzaError(f"stanza must be a msgpack map, got {type(obj).__name__}")


cdef _not_msgpack(exc):
    return StanzaError(f"transport message is not valid msgpack ({exc.__class__.__name__})")


cdef _fail(error, list stanzas):
    error.stanzas = stanzas
    raise error


def decode_stanzas(plaintext, max_stanzas=None):
    """Split one transport plaintext into its stanzas (msgpack maps).

    Raises ``StanzaError`` (``bad_stanza``) when the bytes are not a sequence of whole msgpack
    maps; the stanzas decoded before the broken part are attached as ``exc.stanzas`` so the
    caller can still serve them, in order, before answering the error. With ``max_stanzas``, a
    plaintext holding more raises ``TooManyStanzasError`` (``exc.stanzas`` empty) as soon as the
    scan counts one more, before anything is decoded.
    """
    cdef Py_buffer view
    cdef const unsigned char* data
    cdef Py_ssize_t size, pos = 0, end, tail = 0, count = 0, limit = -1
    cdef list ends = []
    cdef list stanzas = []
    if max_stanzas is not None:
        limit = max_stanzas
    if type(plaintext) is not bytes:
        # The pure twin's conversion, so that the same objects are refused the same way.
        plaintext = memoryview(plaintext).cast("B")
    PyObject_GetBuffer(plaintext, &view, PyBUF_SIMPLE)
    try:
        data = <const unsigned char*>view.buf
        size = view.len
        while pos < size:
            end = _object_end(data, pos, size)
            if end < 0:
                tail = end
                break
            ends.append(end)
            count += 1
            pos = end
            if limit >= 0 and count > limit:
                _fail(TooManyStanzasError(f"more than {max_stanzas} stanzas in one transport message"), [])
    finally:
        PyBuffer_Release(&view)
    if count == 1 and pos == size:
        # One stanza, the usual case: msgpack's one-shot decoder on the plaintext as it is.
        try:
            obj = _unpackb(plaintext, raw=False, strict_map_key=False, ext_hook=_reject_ext)
            if type(obj) is not dict:
                raise _not_a_map(obj)
        except StanzaError as exc:
            _fail(exc, stanzas)
        except (ValueError, _UnpackException, TypeError) as exc:
            _fail(_not_msgpack(exc), stanzas)
        return [obj]
    if count <= SLICED_MAX:
        # A few: the one-shot decoder on exactly each object's bytes (it refuses a slice that
        # holds less or more than one object).
        whole = memoryview(plaintext)
        pos = 0
        for end_obj in ends:
            try:
                obj = _unpackb(whole[pos:end_obj], raw=False, strict_map_key=False, ext_hook=_reject_ext)
                if type(obj) is not dict:
                    raise _not_a_map(obj)
            except StanzaError as exc:
                _fail(exc, stanzas)
            except (ValueError, _UnpackException, TypeError) as exc:
                _fail(_not_msgpack(exc), stanzas)
            stanzas.append(obj)
            pos = end_obj
    else:
        # Many: a streaming decoder made for this call only, fed exactly the whole objects the
        # scan found; it must find as many objects as the scan did, ending where the scan did.
        last = ends[count - 1]
        unpacker = _Unpacker(raw=False, strict_map_key=False, ext_hook=_reject_ext, max_buffer_size=last)
        unpacker.feed(memoryview(plaintext)[:last])
        try:
            for obj in unpacker:
                if type(obj) is not dict:
                    raise _not_a_map(obj)
                stanzas.append(obj)
        except StanzaError as exc:
            _fail(exc, stanzas)
        except (ValueError, _UnpackException, TypeError) as exc:
            _fail(_not_msgpack(exc), stanzas)
        if len(stanzas) != count or unpacker.tell() != last:
            _fail(StanzaError("transport message is not valid msgpack (object boundary)"), stanzas)
    if tail == _INCOMPLETE:
        _fail(StanzaError("transport message ends inside a stanza"), stanzas)
    if tail == _RESERVED:
        _fail(StanzaError("transport message is not valid msgpack (byte 0xc1)"), stanzas)
    if tail == _EXTENSION:
        _fail(StanzaError("msgpack extension types are not allowed in stanzas"), stanzas)
    return stanzas


# -- the two stanzas every message makes: its ack and its dlv, encoded without building a map.
# Byte for byte what encode_stanza (msgpack, use_bin_type) makes of the same map in the same key
# order, as the pure twin does; tests/protocol/test_stanza.py holds all three to that.

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

cdef bytes _ACK_HEAD = b"\xa1t\xa3ack\xa2id"
cdef bytes _ACK_TS = b"\xa2ts"
cdef bytes _ACK_DUP = b"\xa3dup\xc3"
cdef bytes _DLV_HEAD = b"\xa1t\xa3dlv\xa3seq"
cdef bytes _DLV_K_ID = b"\xa1k\xa3msg\xa2id"
cdef bytes _DLV_FROM = b"\xa4from"
cdef bytes _DLV_DEV = b"\xa3dev"
cdef bytes _DLV_TS = b"\xa2ts"
cdef bytes _DLV_C = b"\xa1c"
cdef bytes _DLV_TO = b"\xa2to"


cdef uint64_t _as_uint(object value) except? 0xFFFFFFFFFFFFFFFFULL:
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a non-negative int, got {value!r}")
    if value > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"{value} does not fit in 64 bits")
    return <uint64_t>value


include "_msgpack_uint.pxi"  # _uint_size, _put_uint: shared with _fanout.pyx


cdef inline int _fits(Py_ssize_t size) except -1:
    # msgpack's str and bin lengths are 32-bit; the packer refuses longer ones the same way.
    if size > 0xFFFFFFFFLL:
        raise ValueError(f"{size} bytes do not fit in one msgpack str or bin")
    return 0


cdef inline Py_ssize_t _str_head_size(Py_ssize_t size) noexcept nogil:
    return 1 if size < 32 else (2 if size <= 0xFF else (3 if size <= 0xFFFF else 5))


cdef inline Py_ssize_t _bin_head_size(Py_ssize_t size) noexcept nogil:
    return 2 if size <= 0xFF else (3 if size <= 0xFFFF else 5)


cdef inline unsigned char* _put_head(unsigned char* p, Py_ssize_t size, int is_str) noexcept nogil:
    if is_str and size < 32:
        p[0] = <unsigned char>(0xA0 | size)
        return p + 1
    if size <= 0xFF:
        p[0] = 0xD9 if is_str else 0xC4
        p[1] = <unsigned char>size
        return p + 2
    if size <= 0xFFFF:
        p[0] = 0xDA if is_str else 0xC5
        p[1] = <unsigned char>(size >> 8)
        p[2] = <unsigned char>(size & 0xFF)
        return p + 3
    p[0] = 0xDB if is_str else 0xC6
    p[1] = <unsigned char>((size >> 24) & 0xFF)
    p[2] = <unsigned char>((size >> 16) & 0xFF)
    p[3] = <unsigned char>((size >> 8) & 0xFF)
    p[4] = <unsigned char>(size & 0xFF)
    return p + 5


cdef inline unsigned char* _put_bytes(unsigned char* p, bytes data) noexcept:
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    memcpy(p, PyBytes_AS_STRING(data), size)
    return p + size


def encode_ack(bytes msg_id not None, ts_ms, dup):
    """``{"t": "ack", "id": msg_id, "ts": ts_ms}``, and ``"dup": true`` when ``dup``."""
    cdef uint64_t ts = _as_uint(ts_ms)
    cdef bint is_dup = bool(dup)
    cdef Py_ssize_t id_size = PyBytes_GET_SIZE(msg_id)
    _fits(id_size)
    cdef Py_ssize_t size = (1 + PyBytes_GET_SIZE(_ACK_HEAD) + _bin_head_size(id_size) + id_size
                            + PyBytes_GET_SIZE(_ACK_TS) + _uint_size(ts) + (PyBytes_GET_SIZE(_ACK_DUP) if is_dup else 0))
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    p[0] = 0x84 if is_dup else 0x83
    p = _put_bytes(p + 1, _ACK_HEAD)
    p = _put_bytes(_put_head(p, id_size, 0), msg_id)
    p = _put_uint(_put_bytes(p, _ACK_TS), ts)
    if is_dup:
        _put_bytes(p, _ACK_DUP)
    return out


def encode_dlv(seq, bytes msg_id not None, str sender not None, sender_device, ts_ms, bytes ciphertext not None, to):
    """``{"t": "dlv", "seq", "k": "msg", "id", "from", "dev", "ts", "c"}``, and ``"to"`` unless None."""
    cdef uint64_t seq_value = _as_uint(seq)
    cdef uint64_t device = _as_uint(sender_device)
    cdef uint64_t ts = _as_uint(ts_ms)
    cdef bytes sender_utf8 = sender.encode("utf-8")
    cdef bytes to_utf8 = None if to is None else (<str?>to).encode("utf-8")
    cdef Py_ssize_t id_size = PyBytes_GET_SIZE(msg_id)
    cdef Py_ssize_t from_size = PyBytes_GET_SIZE(sender_utf8)
    cdef Py_ssize_t c_size = PyBytes_GET_SIZE(ciphertext)
    cdef Py_ssize_t to_size = 0 if to_utf8 is None else PyBytes_GET_SIZE(to_utf8)
    _fits(id_size)
    _fits(from_size)
    _fits(c_size)
    _fits(to_size)
    cdef Py_ssize_t size = (
        1 + PyBytes_GET_SIZE(_DLV_HEAD) + _uint_size(seq_value)
        + PyBytes_GET_SIZE(_DLV_K_ID) + _bin_head_size(id_size) + id_size
        + PyBytes_GET_SIZE(_DLV_FROM) + _str_head_size(from_size) + from_size
        + PyBytes_GET_SIZE(_DLV_DEV) + _uint_size(device)
        + PyBytes_GET_SIZE(_DLV_TS) + _uint_size(ts)
        + PyBytes_GET_SIZE(_DLV_C) + _bin_head_size(c_size) + c_size
    )
    if to_utf8 is not None:
        size += PyBytes_GET_SIZE(_DLV_TO) + _str_head_size(to_size) + to_size
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    p[0] = 0x88 if to_utf8 is None else 0x89
    p = _put_uint(_put_bytes(p + 1, _DLV_HEAD), seq_value)
    p = _put_bytes(_put_head(_put_bytes(p, _DLV_K_ID), id_size, 0), msg_id)
    p = _put_bytes(_put_head(_put_bytes(p, _DLV_FROM), from_size, 1), sender_utf8)
    p = _put_uint(_put_bytes(p, _DLV_DEV), device)
    p = _put_uint(_put_bytes(p, _DLV_TS), ts)
    p = _put_bytes(_put_head(_put_bytes(p, _DLV_C), c_size, 0), ciphertext)
    if to_utf8 is not None:
        _put_bytes(_put_head(_put_bytes(p, _DLV_TO), to_size, 1), to_utf8)
    return out
