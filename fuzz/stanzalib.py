"""What the two stanza harnesses share: a reading of transport plaintexts written from the msgpack
spec and PROTOCOL §4 alone, independent of the decoder under test. Needs msgpack only.
"""

from __future__ import annotations

import msgpack

_SCALARS = (type(None), bool, int, float, str, bytes)


def plain(value, timestamps: bool = False) -> bool:
    """Only msgpack's core types (what a stanza may hold): nil, bool, int, float, str, bin, array,
    map (and msgpack.Timestamp with ``timestamps``). Iterative: msgpack nests deeper than
    Python's recursion limit."""
    scalars = _SCALARS + (msgpack.Timestamp,) if timestamps else _SCALARS
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is list:
            stack.extend(item)
        elif kind is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        elif kind not in scalars:
            return False
    return True


def show(value, limit: int = 400) -> str:
    """``repr`` for a failure message, cut short."""
    try:
        text = repr(value)
    except RecursionError:  # nested deeper than repr goes
        return "<nested too deep to show>"
    return text if len(text) <= limit else text[:limit] + "…"


def _reject_ext(code: int, data: bytes):
    raise ValueError(f"ext {code}")


# fixext 4, fixext 8, and ext 8/16/32 of 12 bytes, of type -1: what msgpack reads as a Timestamp.
_TIMESTAMP_HEADS = (b"\xd6\xff", b"\xd7\xff", b"\xc7\x0c\xff", b"\xc8\x00\x0c\xff", b"\xc9\x00\x00\x00\x0c\xff")


def reference(plaintext, timestamps: bool = False) -> tuple[bool, list]:
    """(whole, maps): the top-level objects decoded one at a time by a fresh msgpack decoder;
    ``whole`` is False when the plaintext is not only whole maps of core types (``timestamps``:
    msgpack.Timestamp counts as one), and ``maps`` holds the maps before the first broken part."""
    plaintext = bytes(plaintext)
    if not plaintext:
        return True, []
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, ext_hook=_reject_ext, max_buffer_size=len(plaintext))
    unpacker.feed(plaintext)
    # The timestamp extension (-1) decodes natively, without ext_hook: look for its encodings.
    check_types = not timestamps and any(marker in plaintext for marker in _TIMESTAMP_HEADS)
    maps: list = []
    while unpacker.tell() < len(plaintext):
        try:
            obj = unpacker.unpack()
        except (msgpack.OutOfData, ValueError, TypeError, msgpack.UnpackException):
            return False, maps
        if type(obj) is not dict or (check_types and not plain(obj)):
            return False, maps
        maps.append(obj)
    return True, maps


# Byte sizes of the msgpack formats 0xc0..0xdf, from the msgpack spec: a fixed total, or (bytes of
# the length field, extra type byte, objects per unit of length for containers).
_FIXED = {0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3,
          0xD2: 5, 0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18}
_LENGTH = {0xC4: (1, 0, 0), 0xC5: (2, 0, 0), 0xC6: (4, 0, 0), 0xC7: (1, 1, 0), 0xC8: (2, 1, 0), 0xC9: (4, 1, 0),
           0xD9: (1, 0, 0), 0xDA: (2, 0, 0), 0xDB: (4, 0, 0), 0xDC: (2, 0, 1), 0xDD: (4, 0, 1), 0xDE: (2, 0, 2),
           0xDF: (4, 0, 2)}


_EXTENSIONS = frozenset({0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})  # no stanza may hold one


def whole_objects(data) -> int:
    """How many whole top-level msgpack objects ``data`` starts with, by their format alone (no
    depth limit, no UTF-8 or type checks), stopping at the first one that holds an extension type
    (the contract refuses them in any stanza): what a decoder's ``max_stanzas`` counts."""
    data = bytes(data)
    count, pos, size = 0, 0, len(data)
    while pos < size:
        pending = 1  # objects still to walk over in this top-level object
        while pending:
            if pos >= size:
                return count
            byte = data[pos]
            pending -= 1
            if byte in _EXTENSIONS:
                return count
            if byte < 0x80 or byte >= 0xE0:
                pos += 1
            elif byte < 0x90:
                pending += 2 * (byte & 0x0F)
                pos += 1
            elif byte < 0xA0:
                pending += byte & 0x0F
                pos += 1
            elif byte < 0xC0:
                pos += 1 + (byte & 0x1F)
            elif byte in _FIXED:
                pos += _FIXED[byte]
            elif byte in _LENGTH:
                width, type_byte, per_unit = _LENGTH[byte]
                if pos + 1 + width > size:
                    return count
                length = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
                pos += 1 + width
                if per_unit:
                    pending += per_unit * length
                else:
                    pos += type_byte + length
            else:  # 0xc1: never used by msgpack
                return count
        if pos > size:
            return count
        count += 1
    return count
