# Included by _stanza.pyx and _fanout.pyx (the uint64_t type is theirs to cimport): the msgpack
# encoding of an unsigned int in the fewest bytes, as msgpack's own packer writes it.

cdef inline Py_ssize_t _uint_size(uint64_t value) noexcept nogil:
    if value <= 0x7F:
        return 1
    if value <= 0xFF:
        return 2
    if value <= 0xFFFF:
        return 3
    if value <= 0xFFFFFFFFULL:
        return 5
    return 9


cdef inline unsigned char* _put_uint(unsigned char* p, uint64_t value) noexcept nogil:
    cdef int size, i
    if value <= 0x7F:
        p[0] = <unsigned char>value
        return p + 1
    if value <= 0xFF:
        p[0] = 0xCC
        size = 1
    elif value <= 0xFFFF:
        p[0] = 0xCD
        size = 2
    elif value <= 0xFFFFFFFFULL:
        p[0] = 0xCE
        size = 4
    else:
        p[0] = 0xCF
        size = 8
    for i in range(size, 0, -1):
        p[i] = <unsigned char>(value & 0xFF)
        value >>= 8
    return p + 1 + size
