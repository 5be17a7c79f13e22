# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of ``interlink.core.domain._fanout_pure``: a group message's per-device plan and the
per-copy ``dlv`` bytes.

Same signatures, results and exceptions as the pure twin (read that one first; it is the contract).
What differs is only how: a member's UTF-8 address is encoded once for all its devices and each
device key is one ``bytes`` allocation filled with ``memcpy``; each copy's ``dlv`` is one
allocation: the constant head, ``seq`` packed by hand (msgpack's smallest form, as the packer
chooses it) and the message's tail, encoded once. Anything outside the fast paths (a ``seq`` that is
not a non-negative ``int`` below 2**64, a device outside uint32, a member that is not exactly
``str``) goes through the same Python calls as the pure twin, so it fails the same way.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8String
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

include "_msgpack_uint.pxi"  # _uint_size, _put_uint: shared with _stanza.pyx

cdef extern from "Python.h":
    unsigned long long PyLong_AsUnsignedLongLong(object) except? 0xFFFFFFFFFFFFFFFF  # noqa
    object PyErr_Occurred()
    void PyErr_Clear()

import struct

import msgpack

_packer = msgpack.Packer(use_bin_type=True)
_DEVICE = struct.Struct(">I")

DLV_HEAD = b"\x89" + _packer.pack("t") + _packer.pack("dlv") + _packer.pack("seq")
cdef bytes _HEAD = DLV_HEAD


def device_key(user, device):
    """``user`` (UTF-8) + NUL + ``device`` (uint32 BE): ``interlink.core.domain.batch.device_key``, in C."""
    return _device_key(_prefix_of(user), device)


cdef inline bytes _prefix_of(object user):
    if type(user) is str:
        return PyUnicode_AsUTF8String(user)
    return user.encode("utf-8")  # what the pure twin does (and how it fails)


cdef bytes _device_key(bytes prefix, object device):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(prefix)
    cdef uint32_t d
    cdef bytes out
    cdef unsigned char *p
    if type(device) is int and 0 <= device <= 0xFFFFFFFF:
        d = device
        out = PyBytes_FromStringAndSize(NULL, n + 5)
        p = <unsigned char *> PyBytes_AS_STRING(out)
        memcpy(p, PyBytes_AS_STRING(prefix), n)
        p[n] = 0
        p[n + 1] = (d >> 24) & 0xFF
        p[n + 2] = (d >> 16) & 0xFF
        p[n + 3] = (d >> 8) & 0xFF
        p[n + 4] = d & 0xFF
        return out
    return prefix + b"\x00" + _DEVICE.pack(device)


cdef bytes _splice(object seq, bytes tail):
    """``DLV_HEAD + pack(seq) + tail`` in one allocation."""
    cdef Py_ssize_t n, head = PyBytes_GET_SIZE(_HEAD), size = PyBytes_GET_SIZE(tail)
    cdef uint64_t v
    cdef bytes out
    cdef char *p
    if type(seq) is not int:
        return _HEAD + _packer.pack(seq) + tail
    try:
        v = PyLong_AsUnsignedLongLong(seq)
    except OverflowError:  # negative, or 2**64 and over: the packer decides (and refuses the latter)
        return _HEAD + _packer.pack(seq) + tail
    n = _uint_size(v)
    out = PyBytes_FromStringAndSize(NULL, head + n + size)
    p = PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(_HEAD), head)
    _put_uint(<unsigned char*> p + head, v)
    memcpy(p + head + n, PyBytes_AS_STRING(tail), size)
    return out


def splice(seq, tail):
    """One copy's ``dlv`` from the shared tail (see the pure twin)."""
    if type(tail) is not bytes:
        return _HEAD + _packer.pack(seq) + tail  # what the pure twin does (and how it fails)
    return _splice(seq, tail)


cdef class GroupDlv:
    """The ``dlv`` builder of one group message: ``build(seq, ts_ms) -> bytes``."""

    cdef public object msg_id, sender, sender_device, body, g
    cdef object _ts
    cdef bytes _tail

    def __init__(self, msg_id, sender, sender_device, body, g):
        self.msg_id = msg_id
        self.sender = sender
        self.sender_device = sender_device
        self.body = body
        self.g = g
        self._ts = None
        self._tail = b""

    def __call__(self, seq, ts_ms):
        if self._ts is None or self._ts != ts_ms:
            encoded = _packer.pack({
                "k": "msg", "id": self.msg_id, "from": self.sender, "dev": self.sender_device, "ts": ts_ms,
                "c": self.body, "g": self.g,
            })
            self._ts, self._tail = ts_ms, encoded[1:]  # without its 7-entry map header
        return _splice(seq, self._tail)


def plan_group(members, sender, sender_device, devices_of, blocks, build):
    """``(items, targets)`` of one group message (see the pure twin)."""
    cdef list items = [], targets = []
    cdef bytes prefix
    cdef bint own
    for member in members:
        own = member == sender
        if not own and blocks(member, sender):
            continue
        prefix = None
        for device in devices_of(member):
            if own and not (device != sender_device):
                continue
            if prefix is None:
                prefix = _prefix_of(member)
            items.append((_device_key(prefix, device), build))
            targets.append((member, device))
    return items, targets


def plan_cached(dict rows, members, sender, sender_device, devices_of, blocked, build):
    """``(items, targets)`` of one group message through the per-record cache (see the pure twin)."""
    cdef list items = [], targets = []
    cdef bint own
    cdef tuple row, keys, member_targets
    cdef Py_ssize_t index, n
    cdef bytes prefix
    for member in members:
        own = member == sender
        if not own and member in blocked:
            continue
        devices = devices_of(member)
        row = rows.get(member)
        if row is None or (row[0] is not devices and row[0] != devices):
            prefix = _prefix_of(member)
            row = (devices, tuple([_device_key(prefix, d) for d in devices]), tuple([(member, d) for d in devices]))
            rows[member] = row
        keys = row[1]
        member_targets = row[2]
        n = len(keys)
        if own:
            for index in range(n):
                target = member_targets[index]
                if target[1] != sender_device:
                    items.append((keys[index], build))
                    targets.append(target)
        else:
            for index in range(n):
                items.append((keys[index], build))
                targets.append(member_targets[index])
    return items, targets
