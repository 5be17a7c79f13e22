# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of ``interlink.core.edge._mailbox_pure``: the store's per-copy loops (read the pure
twin first; it is the contract).

Same signatures, results and exceptions. (One narrowing: ``states`` must hold this module's ``MailboxState``, as the store's do; anything
else is a ``TypeError``.) What differs is only how: ``MailboxState`` is an
extension type (its counters are struct slots, not a ``__dict__`` or descriptor look-ups), each
``mbox`` key (device key + big-endian seq) and each shared-body reference is one ``bytes``
allocation filled in C, and the loops run without the interpreter between the LMDB calls.
Anything outside the fast paths (a seq that is not a non-negative ``int`` below 2**64, a value
that is not ``bytes``) goes through the same Python expressions as the pure twin, so it fails the
same way.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

cdef extern from "Python.h":
    unsigned long long PyLong_AsUnsignedLongLong(object) except? 0xFFFFFFFFFFFFFFFF  # noqa

import struct

_MAILBOX_STATE = struct.Struct(">QIQ")
_SEQ = struct.Struct(">Q")
_SHARED_REF = struct.Struct(">BQI")
_SIZE = struct.Struct(">I")
SHARED_MARK = 0xC1


cdef class MailboxState:
    """A device's mailbox counters: the last seq given out (never goes back), items and bytes stored."""

    cdef public object last_seq, items, bytes

    def __init__(self, raw=None):
        if raw is None:
            self.last_seq, self.items, self.bytes = 0, 0, 0
        else:
            self.last_seq, self.items, self.bytes = _MAILBOX_STATE.unpack(raw)

    def pack(self):
        return _MAILBOX_STATE.pack(self.last_seq, self.items, self.bytes)


cdef inline void _put_be(unsigned char *p, uint64_t v, int n):
    cdef int i
    for i in range(n):
        p[n - 1 - i] = <unsigned char> ((v >> (8 * i)) & 0xFF)


cdef object _seq_key(object dkey, object seq):
    """``dkey + _SEQ.pack(seq)`` in one allocation."""
    cdef uint64_t v
    cdef Py_ssize_t n
    cdef bytes out
    cdef unsigned char *p
    if type(dkey) is not bytes or type(seq) is not int or seq < 0:
        return dkey + _SEQ.pack(seq)
    try:
        v = PyLong_AsUnsignedLongLong(seq)
    except OverflowError:
        return dkey + _SEQ.pack(seq)  # 2**64 and over: struct.error, as in the pure twin
    n = PyBytes_GET_SIZE(dkey)
    out = PyBytes_FromStringAndSize(NULL, n + 8)
    p = <unsigned char *> PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(dkey), n)
    _put_be(p + n, v, 8)
    return out


cdef object _shared_item(object ts_prefix, object body_id, Py_ssize_t size):
    """``ts_prefix + _SHARED_REF.pack(SHARED_MARK, body_id, size)`` in one allocation."""
    cdef uint64_t v
    cdef Py_ssize_t n
    cdef bytes out
    cdef unsigned char *p
    if type(ts_prefix) is not bytes or type(body_id) is not int or body_id < 0 or size > 0xFFFFFFFF:
        return ts_prefix + _SHARED_REF.pack(SHARED_MARK, body_id, size)
    try:
        v = PyLong_AsUnsignedLongLong(body_id)
    except OverflowError:
        return ts_prefix + _SHARED_REF.pack(SHARED_MARK, body_id, size)
    n = PyBytes_GET_SIZE(ts_prefix)
    out = PyBytes_FromStringAndSize(NULL, n + 13)
    p = <unsigned char *> PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(ts_prefix), n)
    p[n] = SHARED_MARK
    _put_be(p + n + 1, v, 8)
    _put_be(p + n + 9, <uint64_t> size, 4)
    return out


def plan_copies(items, states, state_of, ts, max_items, max_bytes, skip_full):
    """Plan the copies of one message (see the pure twin)."""
    cdef list planned = []
    cdef object kept = None
    cdef Py_ssize_t dropped = 0, index = 0, count, size
    cdef dict added = {}
    cdef MailboxState state
    cdef tuple prior
    for dkey, build in items:
        found = states.get(dkey)
        if found is None:
            found = state_of(dkey)
        state = <MailboxState?> found
        prior = added.get(dkey)
        if prior is None:
            count = size = 0
        else:
            count, size = prior
        seq = state.last_seq + count + 1
        value = build(seq, ts)
        if state.items + count + 1 > max_items or state.bytes + size + len(value) > max_bytes:
            if not skip_full:
                return None
            if kept is None:
                kept = list(range(index))
            dropped += 1
            index += 1
            continue
        added[dkey] = (count + 1, size + len(value))
        if kept is not None:
            kept.append(index)
        planned.append((dkey, seq, value))
        index += 1
    return planned, kept, dropped


def write_copies(put, mbox, planned, states, ts_prefix, body_id, stored):
    """Put every planned copy, whole or as a reference to a shared body (see the pure twin)."""
    cdef MailboxState state
    for dkey, seq, value in planned:
        state = <MailboxState?> states[dkey]
        state.last_seq = seq
        state.items += 1
        state.bytes += len(value)
        if body_id is None:
            item = ts_prefix + value
        else:
            item = _shared_item(ts_prefix, body_id, len(value))
        put(_seq_key(dkey, seq), item, db=mbox)
        stored.append((dkey, seq, value))


def delete_items(pop, mbox, dkey, seqs, state, released):
    """Delete the device's items ``seqs`` and count their shared-body references (see the pure twin)."""
    cdef Py_ssize_t removed = 0
    cdef object freed = 0
    for seq in seqs:
        value = pop(_seq_key(dkey, seq), db=mbox)
        if value is None:
            continue
        removed += 1
        freed += _forget(value, released)
    state.items -= removed
    state.bytes -= freed
    return removed


def forget_item(value, released):
    """The quota size of an ``mbox`` value on its way out, its reference counted (see the pure twin)."""
    return _forget(value, released)


cdef object _forget(object value, object released):
    cdef const unsigned char *p
    cdef Py_ssize_t n
    cdef bytes body_key
    if type(value) is not bytes:
        return _forget_slow(value, released)
    n = PyBytes_GET_SIZE(value)
    if n < 9:
        return _forget_slow(value, released)  # IndexError, as in the pure twin
    p = <const unsigned char *> PyBytes_AS_STRING(value)
    if p[8] != SHARED_MARK:
        return n - 8
    if n < 21:
        return _forget_slow(value, released)  # struct.error, as in the pure twin
    body_key = PyBytes_FromStringAndSize(<const char *> p + 9, 8)
    released[body_key] = released.get(body_key, 0) + 1
    return (<long long> p[17] << 24) | (<long long> p[18] << 16) | (<long long> p[19] << 8) | p[20]


@cython.boundscheck(True)
@cython.wraparound(True)
cdef object _forget_slow(object value, object released):
    if value[8] == SHARED_MARK:
        body_key = value[9:17]
        released[body_key] = released.get(body_key, 0) + 1
        return _SIZE.unpack_from(value, 17)[0]
    return len(value) - 8
