"""Pure-Python twin of ``interlink.ext._proxy``: the PROXY protocol v2 header (HAProxy's
proxy-protocol.txt, section 2.2, the binary format; version 1, the text format, is refused).

A proxy in front of the gateway writes this header first on each connection it opens to us; the
client's own bytes follow it. Layout, every number big-endian::

    0..11   the signature  \\r\\n\\r\\n\\0\\r\\nQUIT\\n
    12      version (high nibble, 2) and command (low nibble: 0 LOCAL, 1 PROXY)
    13      address family (high nibble: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX) and transport
            (low nibble: 0 UNSPEC, 1 STREAM, 2 DGRAM); only 0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32
    14..15  length: the bytes that follow (address block, then TLVs)
    16..    the address block of the family: INET 12 bytes (source address 4, destination 4,
            source port 2, destination port 2), INET6 36 (16, 16, 2, 2), UNIX 216 (source path
            108, destination path 108), UNSPEC none; then TLVs (type u8, length u16, value) that
            fill the rest exactly.

``parse_proxy_header(data)`` reads the start of a connection's stream. It returns ``None`` while
more bytes are needed and nothing seen so far is wrong, a ``ProxyHeader`` once the header is
complete (``header_bytes`` is where the client's bytes start), and raises ``ProxyHeaderError`` at
the first byte that makes the header wrong, whatever follows: a byte off the signature (a
``PROXY ...`` text header is named as version 1), the version or command nibble, the family
byte, a length over ``MAX_HEADER_BYTES`` or under the family's address block (decided from the
16 fixed bytes alone, before any of the body), then a TLV that would not fit (decided from its
3-byte header). It reads nothing of ``data`` past the header and allocates only for the header's
own fields.

What a ``ProxyHeader`` reports:

* ``command`` ``"proxy"`` or ``"local"``; ``family`` and ``transport`` as sent (for LOCAL too).
* ``source``/``destination``: for a PROXY header of family ``inet``/``inet6``, ``(host, port)``
  with ``host`` written as ``inet_ntop`` writes it (``_ntop`` below: the ISC/glibc algorithm,
  so the string equals ``socket.inet_ntop``'s there; this layer may not import ``socket``).
  For family ``unix``, the path as ``bytes`` (like an AF_UNIX socket address, no port): the
  108-byte field up to its first NUL; a Linux abstract-namespace name (first byte NUL) keeps its
  leading NUL and loses only the NUL padding at its end. ``None`` for family ``unspec`` and for
  every LOCAL header: LOCAL means "use the connection's real endpoints" (a proxy's health
  check), so its address block is skipped unread. It must still be present: LOCAL headers are
  held to the same length and TLV rules as PROXY ones.
* ``tlvs``: ``((type, value), ...)`` in wire order, ``value`` as ``bytes``; unknown types are
  kept, none is interpreted (not even CRC32C).
* ``header_bytes``: 16 + the length field.
"""

from __future__ import annotations

from interlink.core.errors import ProxyHeaderError

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_HEADER_BYTES = 4096  # the 16 fixed bytes and the length field's value
_FIXED_BYTES = 16
_TLV_HEADER_BYTES = 3

# family/transport byte: (family, transport, address block bytes)
_FAMILIES = {
    0x00: ("unspec", "unspec", 0),
    0x11: ("inet", "stream", 12),
    0x12: ("inet", "dgram", 12),
    0x21: ("inet6", "stream", 36),
    0x22: ("inet6", "dgram", 36),
    0x31: ("unix", "stream", 216),
    0x32: ("unix", "dgram", 216),
}
_UNIX_PATH_BYTES = 108


class ProxyHeader:
    """A complete PROXY protocol v2 header (see the module docstring for each attribute).
    Immutable; equal to a header of the same class with the same attributes."""

    __slots__ = ("command", "family", "transport", "source", "destination", "tlvs", "header_bytes")

    def __init__(self, command, family, transport, source, destination, tlvs, header_bytes) -> None:
        set_ = object.__setattr__
        set_(self, "command", command)
        set_(self, "family", family)
        set_(self, "transport", transport)
        set_(self, "source", source)
        set_(self, "destination", destination)
        set_(self, "tlvs", tuple(tlvs))
        set_(self, "header_bytes", header_bytes)

    def __setattr__(self, name, value):
        raise AttributeError(f"attribute '{name}' of 'ProxyHeader' objects is not writable")

    def __delattr__(self, name):
        raise AttributeError(f"attribute '{name}' of 'ProxyHeader' objects is not writable")

    def _fields(self) -> tuple:
        return (self.command, self.family, self.transport, self.source, self.destination, self.tlvs,
                self.header_bytes)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self):
        return hash(self._fields())

    def __repr__(self) -> str:
        return (f"ProxyHeader(command={self.command!r}, family={self.family!r}, transport={self.transport!r}, "
                f"source={self.source!r}, destination={self.destination!r}, tlvs={self.tlvs!r}, "
                f"header_bytes={self.header_bytes!r})")


# ------------------------------------------------------------------------- errors
# The messages, word for word the compiled twin's.


def _bad_signature(index: int, byte: int) -> ProxyHeaderError:
    if index == 0 and byte == 0x50:  # "P": "PROXY TCP4 ...", the text format
        return ProxyHeaderError("a PROXY protocol version 1 (text) header: only version 2 (binary) is accepted")
    return ProxyHeaderError(
        f"not a PROXY protocol v2 header: byte {index} is 0x{byte:02x}, the signature has 0x{SIGNATURE[index]:02x}"
    )


def _bad_version_command(byte: int) -> ProxyHeaderError:
    if byte >> 4 != 2:
        return ProxyHeaderError(
            f"PROXY protocol version {byte >> 4} (byte 12 is 0x{byte:02x}): only version 2 is accepted"
        )
    return ProxyHeaderError(
        f"unknown PROXY protocol v2 command {byte & 0x0F} (byte 12 is 0x{byte:02x}): only LOCAL (0) and PROXY (1) exist"
    )


def _bad_family(byte: int) -> ProxyHeaderError:
    return ProxyHeaderError(f"unknown PROXY protocol v2 address family and transport 0x{byte:02x} (byte 13)")


def _too_long(length: int) -> ProxyHeaderError:
    return ProxyHeaderError(
        f"PROXY protocol v2 header of {_FIXED_BYTES + length} bytes exceeds the maximum of {MAX_HEADER_BYTES}"
    )


def _too_short(length: int, family: str, block: int) -> ProxyHeaderError:
    return ProxyHeaderError(
        f"PROXY protocol v2 length {length} is shorter than the {block}-byte address block of family {family}"
    )


def _truncated_tlv(offset: int, left: int) -> ProxyHeaderError:
    return ProxyHeaderError(
        f"truncated TLV at byte {offset} of the PROXY protocol v2 header: {left} bytes left, a TLV header takes 3"
    )


def _tlv_overrun(offset: int, kind: int, length: int, left: int) -> ProxyHeaderError:
    return ProxyHeaderError(
        f"TLV 0x{kind:02x} at byte {offset} of the PROXY protocol v2 header announces {length} bytes, "
        f"only {left} remain in the header"
    )


# ------------------------------------------------------------------------ addresses


def _ntop4(data, at: int) -> str:
    return f"{data[at]}.{data[at + 1]}.{data[at + 2]}.{data[at + 3]}"


def _ntop6(data, at: int) -> str:
    """``inet_ntop(AF_INET6)`` of ISC BIND, as glibc and the BSDs ship it: the longest run of two
    or more zero words (the first of equal runs) becomes ``::``, words in lower-case hex without
    leading zeros, and an IPv4-compatible (``::a.b.c.d``) or IPv4-mapped (``::ffff:a.b.c.d``)
    address ends in dotted decimal."""
    words = [(data[at + 2 * i] << 8) | data[at + 2 * i + 1] for i in range(8)]
    best_base, best_len = -1, 0
    cur_base, cur_len = -1, 0
    for i, word in enumerate(words):
        if word == 0:
            if cur_base == -1:
                cur_base, cur_len = i, 1
            else:
                cur_len += 1
            if cur_len > best_len:
                best_base, best_len = cur_base, cur_len
        else:
            cur_base = -1
    if best_len < 2:
        best_base = -1
    out = []
    for i in range(8):
        if best_base != -1 and best_base <= i < best_base + best_len:
            if i == best_base:
                out.append(":")
            continue
        if i:
            out.append(":")
        if i == 6 and best_base == 0 and (best_len == 6 or (best_len == 5 and words[5] == 0xFFFF)):
            out.append(_ntop4(data, at + 12))
            break
        out.append(f"{words[i]:x}")
    if best_base != -1 and best_base + best_len == 8:
        out.append(":")
    return "".join(out)


def _unix_path(data, at: int) -> bytes:
    field = bytes(data[at : at + _UNIX_PATH_BYTES])
    if field[0] != 0:
        return field.partition(b"\x00")[0]
    # A Linux abstract-namespace name starts with NUL: kept with it, without the padding (all NUL: b"").
    return field.rstrip(b"\x00")


# --------------------------------------------------------------------------- parse


def parse_proxy_header(data):
    """The PROXY protocol v2 header at the start of ``data`` (bytes, bytearray or any buffer):
    a ``ProxyHeader``, ``None`` when more bytes are needed, or ``ProxyHeaderError``."""
    if not isinstance(data, (bytes, bytearray)):
        data = memoryview(data).cast("B")  # any contiguous buffer, read as bytes
    size = len(data)

    # 0..11: the signature, byte by byte as far as it has arrived.
    seen = size if size < 12 else 12
    if data[:seen] != SIGNATURE[:seen]:
        for index in range(seen):
            if data[index] != SIGNATURE[index]:
                raise _bad_signature(index, data[index])
    if size < 13:
        return None
    version_command = data[12]
    if version_command != 0x20 and version_command != 0x21:
        raise _bad_version_command(version_command)
    if size < 14:
        return None
    family_byte = data[13]
    known = _FAMILIES.get(family_byte)
    if known is None:
        raise _bad_family(family_byte)
    family, transport, block = known
    if size < _FIXED_BYTES:
        return None
    length = (data[14] << 8) | data[15]
    if _FIXED_BYTES + length > MAX_HEADER_BYTES:
        raise _too_long(length)
    if length < block:
        raise _too_short(length, family, block)
    end = _FIXED_BYTES + length
    complete = size >= end

    # The TLVs: each one's header is checked as soon as it has arrived.
    tlvs = []
    pos = _FIXED_BYTES + block
    while pos < end:
        left = end - pos
        if left < _TLV_HEADER_BYTES:
            raise _truncated_tlv(pos, left)
        if size < pos + _TLV_HEADER_BYTES:
            return None
        kind = data[pos]
        value_length = (data[pos + 1] << 8) | data[pos + 2]
        if value_length > left - _TLV_HEADER_BYTES:
            raise _tlv_overrun(pos, kind, value_length, left - _TLV_HEADER_BYTES)
        start = pos + _TLV_HEADER_BYTES
        pos = start + value_length
        if complete:
            tlvs.append((kind, bytes(data[start:pos])))
    if not complete:
        return None

    source = destination = None
    if version_command == 0x21:
        if family == "inet":
            source = (_ntop4(data, 16), (data[24] << 8) | data[25])
            destination = (_ntop4(data, 20), (data[26] << 8) | data[27])
        elif family == "inet6":
            source = (_ntop6(data, 16), (data[48] << 8) | data[49])
            destination = (_ntop6(data, 32), (data[50] << 8) | data[51])
        elif family == "unix":
            source = _unix_path(data, 16)
            destination = _unix_path(data, 16 + _UNIX_PATH_BYTES)
    command = "proxy" if version_command == 0x21 else "local"
    return ProxyHeader(command, family, transport, source, destination, tlvs, end)
