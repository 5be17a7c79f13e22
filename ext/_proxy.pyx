# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of ``interlink.core.protocol._proxy_pure``: the PROXY protocol v2 header.

Same API, results, exceptions and messages as the pure twin (read that one first; it is the
contract). What differs is only how: the input is read through a raw pointer, the TLVs are
walked once to validate (and to stop at the first bad one as soon as its header has arrived)
and once more to build them when the header is complete, and the addresses are written into a
stack buffer by the same ISC/glibc ``inet_ntop`` algorithm as the pure twin's ``_ntop6``
(written here rather than calling the C library's, so the twins agree on any libc).
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.string cimport memchr

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_HEADER_BYTES = 4096  # the 16 fixed bytes and the length field's value

cdef bytes _SIGNATURE = SIGNATURE
cdef const unsigned char* _SIG = <const unsigned char*>PyBytes_AS_STRING(_SIGNATURE)

cdef enum:
    _FIXED_BYTES = 16
    _MAX_HEADER_BYTES = 4096
    _TLV_HEADER_BYTES = 3
    _UNIX_PATH_BYTES = 108

cdef str _PROXY = "proxy"
cdef str _LOCAL = "local"
cdef str _UNSPEC = "unspec"
cdef str _INET = "inet"
cdef str _INET6 = "inet6"
cdef str _UNIX = "unix"
cdef str _STREAM = "stream"
cdef str _DGRAM = "dgram"


@cython.final
@cython.auto_pickle(False)
cdef class ProxyHeader:
    """A complete PROXY protocol v2 header (see the pure twin's module docstring for each
    attribute). Immutable; equal to a header of the same class with the same attributes."""

    cdef readonly object command
    cdef readonly object family
    cdef readonly object transport
    cdef readonly object source
    cdef readonly object destination
    cdef readonly tuple tlvs
    cdef readonly object header_bytes

    def __init__(self, command, family, transport, source, destination, tlvs, header_bytes):
        self.command = command
        self.family = family
        self.transport = transport
        self.source = source
        self.destination = destination
        self.tlvs = tuple(tlvs)
        self.header_bytes = header_bytes

    cdef tuple _fields(self):
        return (self.command, self.family, self.transport, self.source, self.destination, self.tlvs,
                self.header_bytes)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._fields() == (<ProxyHeader>other)._fields()

    def __hash__(self):
        return hash(self._fields())

    def __repr__(self):
        return (f"ProxyHeader(command={self.command!r}, family={self.family!r}, transport={self.transport!r}, "
                f"source={self.source!r}, destination={self.destination!r}, tlvs={self.tlvs!r}, "
                f"header_bytes={self.header_bytes!r})")


# ------------------------------------------------------------------------- errors
# The messages, word for word the pure twin's.


cdef object _bad_signature(Py_ssize_t index, int byte):
    if index == 0 and byte == 0x50:  # "P": "PROXY TCP4 ...", the text format
        return ProxyHeaderError("a PROXY protocol version 1 (text) header: only version 2 (binary) is accepted")
    return ProxyHeaderError(
        f"not a PROXY protocol v2 header: byte {index} is 0x{byte:02x}, the signature has 0x{_SIG[index]:02x}"
    )


cdef object _bad_version_command(int byte):
    if byte >> 4 != 2:
        return ProxyHeaderError(
            f"PROXY protocol version {byte >> 4} (byte 12 is 0x{byte:02x}): only version 2 is accepted"
        )
    return ProxyHeaderError(
        f"unknown PROXY protocol v2 command {byte & 0x0F} (byte 12 is 0x{byte:02x}): only LOCAL (0) and PROXY (1) exist"
    )


cdef object _bad_family(int byte):
    return ProxyHeaderError(f"unknown PROXY protocol v2 address family and transport 0x{byte:02x} (byte 13)")


cdef object _too_long(Py_ssize_t length):
    return ProxyHeaderError(
        f"PROXY protocol v2 header of {_FIXED_BYTES + length} bytes exceeds the maximum of {MAX_HEADER_BYTES}"
    )


cdef object _too_short(Py_ssize_t length, str family, Py_ssize_t block):
    return ProxyHeaderError(
        f"PROXY protocol v2 length {length} is shorter than the {block}-byte address block of family {family}"
    )


cdef object _truncated_tlv(Py_ssize_t offset, Py_ssize_t left):
    return ProxyHeaderError(
        f"truncated TLV at byte {offset} of the PROXY protocol v2 header: {left} bytes left, a TLV header takes 3"
    )


cdef object _tlv_overrun(Py_ssize_t offset, int kind, Py_ssize_t length, Py_ssize_t left):
    return ProxyHeaderError(
        f"TLV 0x{kind:02x} at byte {offset} of the PROXY protocol v2 header announces {length} bytes, "
        f"only {left} remain in the header"
    )


# ------------------------------------------------------------------------ addresses


cdef inline Py_ssize_t _block(unsigned char family) noexcept:
    """Address block bytes of a family/transport byte; -1 for an unknown one."""
    if family == 0x00:
        return 0
    if family == 0x11 or family == 0x12:
        return 12
    if family == 0x21 or family == 0x22:
        return 36
    if family == 0x31 or family == 0x32:
        return 216
    return -1


cdef inline str _family_name(unsigned char family):
    cdef unsigned char high = family >> 4
    if high == 1:
        return _INET
    if high == 2:
        return _INET6
    if high == 3:
        return _UNIX
    return _UNSPEC


cdef inline str _transport_name(unsigned char family):
    cdef unsigned char low = family & 0x0F
    if low == 1:
        return _STREAM
    if low == 2:
        return _DGRAM
    return _UNSPEC


cdef inline int _put_decimal(char* out, unsigned int value) noexcept:
    """``value`` (0..255) in decimal at ``out``; returns the characters written."""
    if value >= 100:
        out[0] = <char>(48 + value // 100)
        out[1] = <char>(48 + value // 10 % 10)
        out[2] = <char>(48 + value % 10)
        return 3
    if value >= 10:
        out[0] = <char>(48 + value // 10)
        out[1] = <char>(48 + value % 10)
        return 2
    out[0] = <char>(48 + value)
    return 1


cdef inline int _put4(char* out, const unsigned char* a) noexcept:
    cdef int n = 0
    cdef int i
    for i in range(4):
        if i:
            out[n] = c'.'
            n += 1
        n += _put_decimal(out + n, a[i])
    return n


cdef inline int _put_hex(char* out, unsigned int word) noexcept:
    """``word`` in lower-case hex without leading zeros (``%x``); returns the characters written."""
    cdef const char* digits = b"0123456789abcdef"
    cdef int shift = 12
    cdef int n = 0
    while shift > 0 and (word >> shift) == 0:
        shift -= 4
    while shift >= 0:
        out[n] = digits[(word >> shift) & 0x0F]
        n += 1
        shift -= 4
    return n


cdef str _ntop4(const unsigned char* a):
    cdef char buf[16]
    return PyUnicode_DecodeASCII(buf, _put4(buf, a), NULL)


cdef str _ntop6(const unsigned char* a):
    """``inet_ntop(AF_INET6)`` of ISC BIND, as glibc and the BSDs ship it (the pure twin's ``_ntop6``)."""
    cdef unsigned int words[8]
    cdef char buf[48]
    cdef int i
    cdef int n = 0
    cdef int best_base = -1
    cdef int best_len = 0
    cdef int cur_base = -1
    cdef int cur_len = 0
    for i in range(8):
        words[i] = (a[2 * i] << 8) | a[2 * i + 1]
        if words[i] == 0:
            if cur_base == -1:
                cur_base = i
                cur_len = 1
            else:
                cur_len += 1
            if cur_len > best_len:
                best_base = cur_base
                best_len = cur_len
        else:
            cur_base = -1
    if best_len < 2:
        best_base = -1
    for i in range(8):
        if best_base != -1 and best_base <= i < best_base + best_len:
            if i == best_base:
                buf[n] = c':'
                n += 1
            continue
        if i:
            buf[n] = c':'
            n += 1
        if i == 6 and best_base == 0 and (best_len == 6 or (best_len == 5 and words[5] == 0xFFFF)):
            n += _put4(buf + n, a + 12)
            break
        n += _put_hex(buf + n, words[i])
    if best_base != -1 and best_base + best_len == 8:
        buf[n] = c':'
        n += 1
    return PyUnicode_DecodeASCII(buf, n, NULL)


cdef bytes _unix_path(const unsigned char* a):
    cdef const unsigned char* nul
    cdef Py_ssize_t n
    if a[0] != 0:
        nul = <const unsigned char*>memchr(a, 0, _UNIX_PATH_BYTES)
        n = _UNIX_PATH_BYTES if nul is NULL else nul - a
    else:
        # A Linux abstract-namespace name starts with NUL: kept with it, without the padding (all NUL: b"").
        n = _UNIX_PATH_BYTES
        while n > 0 and a[n - 1] == 0:
            n -= 1
    return PyBytes_FromStringAndSize(<const char*>a, n)


cdef inline unsigned int _u16(const unsigned char* p) noexcept:
    return (p[0] << 8) | p[1]


# --------------------------------------------------------------------------- parse


cdef object _parse(const unsigned char* p, Py_ssize_t size):
    cdef Py_ssize_t seen = size if size < 12 else 12
    cdef Py_ssize_t i, length, end, pos, left, block, start, value_length
    cdef unsigned char version_command, family_byte
    cdef list tlvs
    cdef object source = None
    cdef object destination = None
    cdef ProxyHeader header

    # 0..11: the signature, byte by byte as far as it has arrived.
    for i in range(seen):
        if p[i] != _SIG[i]:
            raise _bad_signature(i, p[i])
    if size < 13:
        return None
    version_command = p[12]
    if version_command != 0x20 and version_command != 0x21:
        raise _bad_version_command(version_command)
    if size < 14:
        return None
    family_byte = p[13]
    block = _block(family_byte)
    if block < 0:
        raise _bad_family(family_byte)
    if size < _FIXED_BYTES:
        return None
    length = _u16(p + 14)
    if _FIXED_BYTES + length > _MAX_HEADER_BYTES:
        raise _too_long(length)
    if length < block:
        raise _too_short(length, _family_name(family_byte), block)
    end = _FIXED_BYTES + length

    # The TLVs: each one's header is checked as soon as it has arrived.
    pos = _FIXED_BYTES + block
    while pos < end:
        left = end - pos
        if left < _TLV_HEADER_BYTES:
            raise _truncated_tlv(pos, left)
        if size < pos + _TLV_HEADER_BYTES:
            return None
        value_length = _u16(p + pos + 1)
        if value_length > left - _TLV_HEADER_BYTES:
            raise _tlv_overrun(pos, p[pos], value_length, left - _TLV_HEADER_BYTES)
        pos += _TLV_HEADER_BYTES + value_length
    if size < end:
        return None

    # Complete: build it.
    header = ProxyHeader.__new__(ProxyHeader)
    pos = _FIXED_BYTES + block
    if pos == end:
        header.tlvs = ()
    else:
        tlvs = []
        while pos < end:
            start = pos + _TLV_HEADER_BYTES
            value_length = _u16(p + pos + 1)
            tlvs.append((p[pos], PyBytes_FromStringAndSize(<const char*>p + start, value_length)))
            pos = start + value_length
        header.tlvs = tuple(tlvs)
    if version_command == 0x21:
        if block == 12:
            source = (_ntop4(p + 16), _u16(p + 24))
            destination = (_ntop4(p + 20), _u16(p + 26))
        elif block == 36:
            source = (_ntop6(p + 16), _u16(p + 48))
            destination = (_ntop6(p + 32), _u16(p + 50))
        elif block == 216:
            source = _unix_path(p + 16)
            destination = _unix_path(p + 16 + _UNIX_PATH_BYTES)
    header.command = _PROXY if version_command == 0x21 else _LOCAL
    header.family = _family_name(family_byte)
    header.transport = _transport_name(family_byte)
    header.source = source
    header.destination = destination
    header.header_bytes = end
    return header


def parse_proxy_header(data):
    """The PROXY protocol v2 header at the start of ``data`` (bytes, bytearray or any buffer):
    a ``ProxyHeader``, ``None`` when more bytes are needed, or ``ProxyHeaderError``."""
    cdef Py_buffer view
    if isinstance(data, bytes):
        return _parse(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    if type(data) is memoryview:
        # A receive buffer's window: read as bytes without making a cast view first. A memoryview
        # PyBUF_SIMPLE refuses (not C-contiguous) gets the pure twin's conversion, and its error.
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        except BufferError:
            data = memoryview(data).cast("B")
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    else:
        if not isinstance(data, bytearray):
            data = memoryview(data).cast("B")  # the pure twin's conversion: the same objects refused alike
        # Holding a buffer export keeps a bytearray from being resized under the pointer.
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return _parse(<const unsigned char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


# Imported last, on purpose (as in _framing.pyx): importing interlink.core.errors runs
# interlink.core's __init__; by now everything above exists.
from interlink.core.errors import ProxyHeaderError  # noqa: E402
