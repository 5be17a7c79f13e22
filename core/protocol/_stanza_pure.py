"""Pure-Python twin of ``interlink.ext._stanza``: one transport plaintext to its stanzas.

A transport plaintext is one or more msgpack maps back to back (docs/protocol.md §4). Decoding keeps no
state between calls: every call first finds where each top-level msgpack object ends (a scan of
the format bytes that builds no objects), then decodes exactly those byte ranges with a
decoder made for this call alone. A map cut short can therefore never be completed by the
bytes of a later call — of the same session or of another one — and the stanzas before a broken
part are served while the broken part is answered with ``bad_stanza``.

Decoding is strict about what the contract fixes (every stanza is a map; no msgpack extension
types; valid UTF-8) and tolerant of what it leaves open (unknown keys are kept, the caller
ignores them; a stanza's ``t`` is checked by the caller).
"""

from __future__ import annotations

import msgpack

from interlink.core.errors import StanzaError, TooManyStanzasError

INCOMPLETE = -1  # the object runs past the end of the plaintext
RESERVED = -2  # the object holds the byte 0xc1, which msgpack never uses
EXTENSION = -3  # the object holds a msgpack extension type, which no stanza may (msgpack itself
                # would turn type -1 into a Timestamp without asking the decoder's ext_hook)
# Up to this many stanzas, each is decoded by its own one-shot call; more share one streaming
# decoder, whose set-up costs about as much as four one-shot calls (bench/bench_stanza.py).
SLICED_MAX = 4

# Format bytes 0xc4..0xdf: (bytes before the length, size of the length, payload bytes per unit
# of length or a fixed payload, items per unit of length for containers).
#   kind "len": header + length + length bytes of payload (bin, str, ext + its type byte)
#   kind "fix": a fixed total size
#   kind "items": header + length, then length * items_per objects
_FIXED = {0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9,
          0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}  # bin and str: bytes of their length
_EXTENSIONS = frozenset({0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})  # ext 8/16/32, fixext 1..16
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # (length bytes, objects per entry)


def object_end(data, pos: int, end: int) -> int:
    """Where the msgpack object starting at ``data[pos]`` ends (exclusive), looking no further
    than ``end``; ``INCOMPLETE`` if it runs past ``end``, ``RESERVED`` if it holds byte 0xc1,
    ``EXTENSION`` if it holds an extension type (the first bad byte decides). ``data`` is indexable by int giving ints (bytes, bytearray, memoryview of format B)."""
    remaining = 1  # objects still to skip: containers add their entries
    while remaining:
        if pos >= end:
            return INCOMPLETE
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
        elif byte in _FIXED:
            pos += _FIXED[byte]
        elif byte in _SIZED:
            size_bytes = _SIZED[byte]
            if pos + 1 + size_bytes > end:
                return INCOMPLETE
            length = int.from_bytes(data[pos + 1 : pos + 1 + size_bytes], "big")
            pos += 1 + size_bytes + length
        elif byte in _EXTENSIONS:
            return EXTENSION
        elif byte in _CONTAINERS:
            size_bytes, per_entry = _CONTAINERS[byte]
            if pos + 1 + size_bytes > end:
                return INCOMPLETE
            remaining += per_entry * int.from_bytes(data[pos + 1 : pos + 1 + size_bytes], "big")
            pos += 1 + size_bytes
        else:  # 0xc1
            return RESERVED
        if remaining > end - pos:
            return INCOMPLETE  # every object takes at least one byte
    return pos if pos <= end else INCOMPLETE


def _reject_ext(code: int, data: bytes):
    raise StanzaError(f"msgpack extension type {code} is not allowed")


def _not_a_map(obj) -> StanzaError:
    return StanzaError(f"stanza must be a msgpack map, got {type(obj).__name__}")


def _not_msgpack(exc: Exception) -> StanzaError:
    # ValueError covers invalid UTF-8 and msgpack's own FormatError/StackError/ExtraData.
    return StanzaError(f"transport message is not valid msgpack ({exc.__class__.__name__})")


_BROKEN_TAIL = {
    INCOMPLETE: "transport message ends inside a stanza",
    RESERVED: "transport message is not valid msgpack (byte 0xc1)",
    EXTENSION: "msgpack extension types are not allowed in stanzas",
}


def _fail(error: StanzaError, stanzas: list):
    error.stanzas = stanzas
    raise error


def decode_stanzas(plaintext, max_stanzas: int | None = None) -> list:
    """Split one transport plaintext into its stanzas (msgpack maps).

    Raises ``StanzaError`` (``bad_stanza``) when the bytes are not a sequence of whole msgpack
    maps; the stanzas decoded before the broken part are attached as ``exc.stanzas`` so the
    caller can still serve them, in order, before answering the error. With ``max_stanzas``, a
    plaintext holding more raises ``TooManyStanzasError`` (``exc.stanzas`` empty) as soon as the
    scan counts one more, before anything is decoded.
    """
    view = memoryview(plaintext).cast("B")
    size = len(view)
    ends = []
    pos = 0
    tail = 0  # why the scan stopped before the end, if it did
    while pos < size:
        end = object_end(view, pos, size)
        if end < 0:
            tail = end
            break
        ends.append(end)
        pos = end
        if max_stanzas is not None and len(ends) > max_stanzas:
            _fail(TooManyStanzasError(f"more than {max_stanzas} stanzas in one transport message"), [])
    stanzas: list = []
    if len(ends) <= SLICED_MAX:
        # A few stanzas, the usual case: msgpack's one-shot decoder on exactly each object's
        # bytes (it refuses a slice that holds less or more than one object).
        start = 0
        for end in ends:
            try:
                obj = msgpack.unpackb(view[start:end], raw=False, strict_map_key=False, ext_hook=_reject_ext)
                if type(obj) is not dict:
                    raise _not_a_map(obj)
            except StanzaError as exc:
                _fail(exc, stanzas)
            except (ValueError, msgpack.UnpackException, TypeError) as exc:
                _fail(_not_msgpack(exc), stanzas)
            stanzas.append(obj)
            start = end
    else:
        # Many: a streaming decoder made for this call only, fed exactly the whole objects the
        # scan found; it must find as many objects as the scan did, ending where the scan did.
        last = ends[-1]
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, ext_hook=_reject_ext, max_buffer_size=last)
        unpacker.feed(view[:last])
        try:
            for obj in unpacker:
                if type(obj) is not dict:
                    raise _not_a_map(obj)
                stanzas.append(obj)
        except StanzaError as exc:
            _fail(exc, stanzas)
        except (ValueError, msgpack.UnpackException, TypeError) as exc:
            _fail(_not_msgpack(exc), stanzas)
        if len(stanzas) != len(ends) or unpacker.tell() != last:
            _fail(StanzaError("transport message is not valid msgpack (object boundary)"), stanzas)
    if tail:
        _fail(StanzaError(_BROKEN_TAIL[tail]), stanzas)
    return stanzas



# -- the two stanzas every message makes: its ack and its dlv. The compiled twin writes their
# msgpack bytes directly (no map built); here the map is built and packed, which is what those
# bytes must equal (tests/protocol/test_stanza.py).

_packer = msgpack.Packer(use_bin_type=True)


def _uint(value: int) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a non-negative int, got {value!r}")
    if value > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"{value} does not fit in 64 bits")
    return value


def _typed(value, kind: type, name: str):
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be {kind.__name__}, not {type(value).__name__}")
    return value


def encode_ack(msg_id: bytes, ts_ms: int, dup: bool) -> bytes:
    """``{"t": "ack", "id": msg_id, "ts": ts_ms}``, and ``"dup": true`` when ``dup``."""
    ack = {"t": "ack", "id": _typed(msg_id, bytes, "msg_id"), "ts": _uint(ts_ms)}
    if dup:
        ack["dup"] = True
    return _packer.pack(ack)


def encode_dlv(seq: int, msg_id: bytes, sender: str, sender_device: int, ts_ms: int, ciphertext: bytes,
               to: str | None) -> bytes:
    """``{"t": "dlv", "seq", "k": "msg", "id", "from", "dev", "ts", "c"}``, and ``"to"`` unless None."""
    dlv = {"t": "dlv", "seq": _uint(seq), "k": "msg", "id": _typed(msg_id, bytes, "msg_id"),
           "from": _typed(sender, str, "sender"), "dev": _uint(sender_device), "ts": _uint(ts_ms),
           "c": _typed(ciphertext, bytes, "ciphertext")}
    if to is not None:
        dlv["to"] = _typed(to, str, "to")
    return _packer.pack(dlv)
