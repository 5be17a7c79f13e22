"""Fuzz harness ``proxy``: the PROXY protocol v2 header parser (HAProxy's proxy-protocol.txt §2.2).

One input chooses (``atheris.FuzzedDataProvider``; ints from the end of the input, see
``fuzzlib.encode_ints``): the buffer type of the first prefix (each next prefix takes the next
type: bytes, bytearray, memoryview, a window into a bigger buffer), whether the harness writes the
length field itself (so that the header ends ``trailing`` bytes before the end of the stream,
which lets mutations reach complete headers and their TLVs), and ``trailing``. What is left is the
connection's byte stream. Per input:

* Every prefix of the stream (``stream[:n]`` for each n) goes to ``parse_proxy_header`` of
  ``interlink.ext._proxy`` and of ``interlink.core.protocol._proxy_pure``: both give the same
  outcome (``None``; the header's attributes; or the exception's type and message), and it is
  the outcome of a reference parser written here from the spec alone, which also says where the
  outcome is decided: ``None`` before that many bytes, the same error or header from there on.
  So an error comes at the first byte that makes the header wrong, never later, and a header is
  returned as soon as its last byte is there. Only ``ProxyHeaderError`` (code ``bad_frame``) may
  be raised.
* A header's attributes have their types: ``str`` names, ``(str, int)`` or ``bytes`` addresses,
  a tuple of ``(int, bytes)`` TLVs (copies: the window kind is a buffer with other bytes around
  the stream, which a twin reading past its end would show).
* Round trip: a TCP over IPv4/IPv6 PROXY header, or a LOCAL header of family UNSPEC, re-encoded
  from its attributes by ``encode_proxy_header`` gives back the header's bytes exactly, and both
  twins parse that to the same attributes.

The compiled twin is not instrumented (it is C); coverage comes from the pure twin and this file,
and the comparison covers the compiled code.
"""

from __future__ import annotations

import contextlib
import socket
import sys

if __name__ == "__main__":
    import atheris

    instrumenting = atheris.instrument_imports(include=["interlink"])
else:
    instrumenting = contextlib.nullcontext()

with instrumenting:
    import fuzzlib
    from interlink.core.errors import ProxyHeaderError
    from interlink.core.protocol import _proxy_pure
    from interlink.core.protocol.proxyheader import encode_proxy_header
    from interlink.ext import _proxy as _proxy_native

SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # proxy-protocol.txt §2.2
MAX_HEADER_BYTES = 4096
MAX_TRAILING = 255
TWINS = (("compiled", _proxy_native), ("pure", _proxy_pure))
# The family/transport byte: (family, transport, address block bytes), §2.2 "The 14th byte".
FAMILIES = {
    0x00: ("unspec", "unspec", 0), 0x11: ("inet", "stream", 12), 0x12: ("inet", "dgram", 12),
    0x21: ("inet6", "stream", 36), 0x22: ("inet6", "dgram", 36), 0x31: ("unix", "stream", 216),
    0x32: ("unix", "dgram", 216),
}


class Undecided(Exception):
    """The stream ends before the reference can decide."""


def _unix(field: bytes) -> bytes:
    """The documented reading of a 108-byte sun_path: up to the first NUL; an abstract name
    (leading NUL) keeps it and drops only the NUL padding at its end."""
    if field[:1] == b"\x00":
        return field.rstrip(b"\x00")
    return field.split(b"\x00", 1)[0]


def reference(stream: bytes):
    """``(at, outcome)``: the outcome of the header at the start of ``stream`` and the number of
    bytes from which it is decided (every shorter prefix gives ``None``), or ``(None, None)`` if
    the stream is a valid but unfinished start. ``outcome`` is ``("raised", message)`` or
    ``("ok", attributes)``."""
    size = len(stream)

    def need(count: int) -> None:
        if size < count:
            raise Undecided

    def refuse(at: int, message: str):
        return at, ("raised", message)

    try:
        for index, expected in enumerate(SIGNATURE):
            need(index + 1)
            if stream[index] != expected:
                if index == 0 and stream[0] == ord("P"):
                    return refuse(1, "a PROXY protocol version 1 (text) header: only version 2 (binary) is accepted")
                return refuse(index + 1, f"not a PROXY protocol v2 header: byte {index} is 0x{stream[index]:02x}, "
                                         f"the signature has 0x{expected:02x}")
        need(13)
        version, command = stream[12] >> 4, stream[12] & 0x0F
        if version != 2:
            return refuse(13, f"PROXY protocol version {version} (byte 12 is 0x{stream[12]:02x}): only version 2 is accepted")
        if command not in (0, 1):
            return refuse(13, f"unknown PROXY protocol v2 command {command} (byte 12 is 0x{stream[12]:02x}): "
                              "only LOCAL (0) and PROXY (1) exist")
        need(14)
        if stream[13] not in FAMILIES:
            return refuse(14, f"unknown PROXY protocol v2 address family and transport 0x{stream[13]:02x} (byte 13)")
        family, transport, block = FAMILIES[stream[13]]
        need(16)
        length = int.from_bytes(stream[14:16], "big")
        if 16 + length > MAX_HEADER_BYTES:
            return refuse(16, f"PROXY protocol v2 header of {16 + length} bytes exceeds the maximum of {MAX_HEADER_BYTES}")
        if length < block:
            return refuse(16, f"PROXY protocol v2 length {length} is shorter than the {block}-byte address block "
                              f"of family {family}")
        end = 16 + length
        offset, known_from = 16 + block, 16  # where the next TLV starts, and since which prefix that is known
        tlvs = []
        while offset != end:
            left = end - offset
            if left < 3:
                return refuse(known_from, f"truncated TLV at byte {offset} of the PROXY protocol v2 header: "
                                          f"{left} bytes left, a TLV header takes 3")
            need(offset + 3)
            kind, value_length = stream[offset], int.from_bytes(stream[offset + 1 : offset + 3], "big")
            if value_length > left - 3:
                return refuse(offset + 3, f"TLV 0x{kind:02x} at byte {offset} of the PROXY protocol v2 header announces "
                                          f"{value_length} bytes, only {left - 3} remain in the header")
            tlvs.append((kind, stream[offset + 3 : offset + 3 + value_length]))
            offset, known_from = offset + 3 + value_length, offset + 3
        need(end)
    except Undecided:
        return None, None

    source = destination = None
    body = stream[16:end]
    if command == 1 and family == "inet":
        source = (socket.inet_ntop(socket.AF_INET, body[0:4]), int.from_bytes(body[8:10], "big"))
        destination = (socket.inet_ntop(socket.AF_INET, body[4:8]), int.from_bytes(body[10:12], "big"))
    elif command == 1 and family == "inet6":
        source = (socket.inet_ntop(socket.AF_INET6, body[0:16]), int.from_bytes(body[32:34], "big"))
        destination = (socket.inet_ntop(socket.AF_INET6, body[16:32]), int.from_bytes(body[34:36], "big"))
    elif command == 1 and family == "unix":
        source, destination = _unix(body[0:108]), _unix(body[108:216])
    attributes = (("local", "proxy")[command], family, transport, source, destination, tuple(tlvs), end)
    return end, ("ok", attributes)


def attributes(header) -> tuple:
    return (header.command, header.family, header.transport, header.source, header.destination, header.tlvs,
            header.header_bytes)


def _check_types(header, module, where: str) -> None:
    if type(header) is not module.ProxyHeader:
        raise AssertionError(f"{where}: returned {type(header).__name__}, not the module's ProxyHeader")
    address_ok = {
        "inet": lambda a: type(a) is tuple and len(a) == 2 and type(a[0]) is str and type(a[1]) is int,
        "unix": lambda a: type(a) is bytes,
    }
    check = address_ok.get("inet" if header.family in ("inet", "inet6") else header.family)
    for address in (header.source, header.destination):
        if not (address is None if header.command == "local" or check is None else check(address)):
            raise AssertionError(f"{where}: address {address!r} of a {header.command} {header.family} header")
    if type(header.tlvs) is not tuple or any(
        type(t) is not tuple or len(t) != 2 or type(t[0]) is not int or type(t[1]) is not bytes for t in header.tlvs
    ):
        raise AssertionError(f"{where}: tlvs {header.tlvs!r} are not a tuple of (int, bytes)"[:400])
    if not all(type(v) is str for v in (header.command, header.family, header.transport)) or type(header.header_bytes) is not int:
        raise AssertionError(f"{where}: attribute types of {header!r}"[:400])


def _piece(data: bytes, kind: int):
    """The same bytes as the buffer types a transport hands over."""
    if kind == 1:
        return bytearray(data)
    if kind == 2:
        return memoryview(data)
    if kind == 3:  # a window into a bigger receive buffer (BufferedProtocol): bytes around it
        return memoryview(bytearray(b"\xee" + data + SIGNATURE))[1 : 1 + len(data)]
    return data


def _outcome(module, piece, where: str):
    result = fuzzlib.outcome(module.parse_proxy_header, piece)
    if result[0] == "raised":
        fuzzlib.check_error(result[1].error, (ProxyHeaderError,), where)
        return ("raised", result[1].kind, result[1].message)
    if result[1] is None:
        return ("ok", None)
    _check_types(result[1], module, where)
    return ("ok", attributes(result[1]))


def _check_round_trip(header: tuple, stream: bytes, where: str) -> None:
    command, family, transport, source, destination, tlvs, end = header
    if command == "proxy" and family in ("inet", "inet6") and transport == "stream":
        encoded = encode_proxy_header("proxy", source, destination, tlvs)
    elif command == "local" and family == "unspec":
        encoded = encode_proxy_header("local", None, None, tlvs)
    else:
        return  # UDP, UNIX, PROXY UNSPEC and LOCAL with a family: the encoder does not write them
    if encoded != stream[:end]:
        raise AssertionError(f"{where}: re-encoded as {fuzzlib.short(encoded)}, the header was {fuzzlib.short(stream[:end])}")
    for name, module in TWINS:
        again = _outcome(module, encoded, f"{where}: {name} re-encoded")
        if again != ("ok", header):
            raise AssertionError(f"{where}: {name} parsed the re-encoded header to {again!r}"[:600])


def decode(data: bytes) -> tuple:
    """The input's choices: (first buffer kind, trailing bytes after a harness-written length or
    None, stream)."""
    fdp = fuzzlib.provider(data)
    kind = fdp.ConsumeIntInRange(0, 3)
    trailing = fdp.ConsumeIntInRange(0, MAX_TRAILING) if fdp.ConsumeIntInRange(0, 1) else None
    return kind, trailing, fdp.ConsumeBytes(fdp.remaining_bytes())


def check(data: bytes) -> None:
    kind, trailing, stream = decode(data)
    if trailing is not None and len(stream) >= 16:
        length = min(0xFFFF, max(0, len(stream) - 16 - trailing))
        stream = stream[:14] + length.to_bytes(2, "big") + stream[16:]
    where = f"input {fuzzlib.short(data)}"

    at, final = reference(stream)
    for size in range(len(stream) + 1):
        expected = ("ok", None) if at is None or size < at else final
        if expected[0] == "raised":
            expected = ("raised", ProxyHeaderError, expected[1])
        for name, module in TWINS:
            piece = _piece(stream[:size], (kind + size) % 4)
            got = _outcome(module, piece, f"{where}, {size} bytes: {name}")
            if got != expected:
                raise AssertionError(f"{where}, {size} bytes: {name} gave {got!r}, the reference {expected!r}"[:800])
    if final is not None and final[0] == "ok":
        _check_round_trip(final[1], stream, where)


if __name__ == "__main__":
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
