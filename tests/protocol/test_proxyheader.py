"""PROXY protocol v2 headers (HAProxy's proxy-protocol.txt §2.2): every case runs on the compiled
module and on its pure twin (``tests/twins.py``), and hypothesis checks that the two agree on
random headers. The headers are written out by hand here (``header`` below), from the spec, not
by the module's own encoder; the encoder is then checked against them.
"""

from __future__ import annotations

import array
import socket
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import interlink.errors
from interlink.core import _select
from interlink.core.errors import ErrorCode, ProtocolError, ProxyHeaderError
from interlink.core.protocol import proxyheader
from interlink.core.protocol.proxyheader import encode_proxy_header

from twins import twin_fixture, twin_modules

TWINS = proxy_native, proxy_pure = twin_modules("_proxy")
HYPOTHESIS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

proxy = twin_fixture("_proxy")  # the module under test: compiled, then pure

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # the spec's bytes, not the module's constant
PROXY, LOCAL = 0x21, 0x20
TCP4, UDP4, TCP6, UDP6, UNIX_STREAM, UNIX_DGRAM, UNSPEC = 0x11, 0x12, 0x21, 0x22, 0x31, 0x32, 0x00


def header(body: bytes = b"", version_command: int = PROXY, family: int = TCP4, length: int | None = None) -> bytes:
    """The spec's layout written out: signature, ver/cmd, fam, length (big-endian), body."""
    return SIG + bytes([version_command, family]) + struct.pack("!H", len(body) if length is None else length) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    return socket.inet_pton(socket.AF_INET, src) + socket.inet_pton(socket.AF_INET, dst) + struct.pack("!HH", sport, dport)


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + struct.pack("!HH", sport, dport)


def unix(src: bytes, dst: bytes) -> bytes:
    return src.ljust(108, b"\x00") + dst.ljust(108, b"\x00")


def fields(parsed) -> tuple:
    return (parsed.command, parsed.family, parsed.transport, parsed.source, parsed.destination, parsed.tlvs,
            parsed.header_bytes)


def error_of(module, data) -> str:
    with pytest.raises(ProxyHeaderError) as caught:
        module.parse_proxy_header(data)
    assert type(caught.value) is ProxyHeaderError
    return str(caught.value)


TCP4_HEADER = header(inet("192.0.2.10", "198.51.100.7", 51234, 443))
CLIENT_BYTES = b"IL\x01\x01\x00\x20" + b"e" * 32  # what the client sends after the proxy's header


# ---------------------------------------------------------------- constants, types


def test_constants(proxy):
    assert proxy.SIGNATURE == SIG and len(proxy.SIGNATURE) == 12
    assert proxy.MAX_HEADER_BYTES == 4096


def test_the_selector_serves_the_selected_twin():
    expected = proxy_pure if _select.FORCE_PURE else proxy_native
    assert proxyheader.parse_proxy_header is expected.parse_proxy_header
    assert proxyheader.ProxyHeader is expected.ProxyHeader


def test_the_error_is_a_protocol_error_with_the_bad_frame_code():
    assert issubclass(ProxyHeaderError, ProtocolError)
    assert ProxyHeaderError("x").code == ErrorCode.BAD_FRAME == "bad_frame"
    assert interlink.errors.ProxyHeaderError is ProxyHeaderError


# ---------------------------------------------------------------- accepted headers


def test_tcp4(proxy):
    parsed = proxy.parse_proxy_header(TCP4_HEADER)
    assert fields(parsed) == ("proxy", "inet", "stream", ("192.0.2.10", 51234), ("198.51.100.7", 443), (), 28)
    assert type(parsed.source[0]) is str and type(parsed.source[1]) is int and type(parsed.header_bytes) is int


def test_tcp4_extreme_values(proxy):
    parsed = proxy.parse_proxy_header(header(inet("0.0.0.0", "255.255.255.255", 0, 65535)))
    assert (parsed.source, parsed.destination) == (("0.0.0.0", 0), ("255.255.255.255", 65535))


def test_udp4(proxy):
    parsed = proxy.parse_proxy_header(header(inet("10.1.2.3", "10.3.2.1", 53, 5353), family=UDP4))
    assert fields(parsed) == ("proxy", "inet", "dgram", ("10.1.2.3", 53), ("10.3.2.1", 5353), (), 28)


@pytest.mark.parametrize("family, transport", [(TCP6, "stream"), (UDP6, "dgram")])
def test_inet6(proxy, family, transport):
    parsed = proxy.parse_proxy_header(header(inet6("2001:db8::1", "fe80::a:b:c:d", 1, 2), family=family))
    assert fields(parsed) == ("proxy", "inet6", transport, ("2001:db8::1", 1), ("fe80::a:b:c:d", 2), (), 52)


@pytest.mark.parametrize(
    "text",
    ["::", "::1", "1::", "::ffff:1.2.3.4", "::1.2.3.4", "::ffff:0.0.0.0", "::0.1.0.0", "1:0:0:2::3", "1:0:2:0:3:0:4:5",
     "2001:db8:0:1:1:1:1:1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "0:1:0:0:1::", "::ffff:0:1:2", "1::ffff:1.2.3.4"],
)
def test_inet6_hosts_are_written_as_inet_ntop_writes_them(proxy, text):
    packed = socket.inet_pton(socket.AF_INET6, text)
    parsed = proxy.parse_proxy_header(header(packed + packed[::-1] + b"\x00\x01\x00\x02", family=TCP6))
    assert parsed.source[0] == socket.inet_ntop(socket.AF_INET6, packed)
    assert parsed.destination[0] == socket.inet_ntop(socket.AF_INET6, packed[::-1])


@pytest.mark.parametrize("family, transport", [(UNIX_STREAM, "stream"), (UNIX_DGRAM, "dgram")])
def test_unix(proxy, family, transport):
    parsed = proxy.parse_proxy_header(header(unix(b"/run/haproxy.sock", b"/run/interlink.sock"), family=family))
    assert fields(parsed) == ("proxy", "unix", transport, b"/run/haproxy.sock", b"/run/interlink.sock", (), 232)


def test_unix_paths_stop_at_the_first_nul_and_abstract_names_keep_theirs(proxy):
    full = b"/" + b"p" * 107  # no NUL at all: the whole field
    abstract = b"\x00name\x00with-nul"  # Linux abstract namespace: leading NUL kept, the padding dropped
    parsed = proxy.parse_proxy_header(header(full + abstract.ljust(108, b"\x00"), family=UNIX_STREAM))
    assert parsed.source == full and parsed.destination == abstract
    parsed = proxy.parse_proxy_header(header(b"/a\x00junk".ljust(108, b"\x00") + bytes(108), family=UNIX_STREAM))
    assert parsed.source == b"/a" and parsed.destination == b""


def test_local_unspec(proxy):
    parsed = proxy.parse_proxy_header(header(version_command=LOCAL, family=UNSPEC))
    assert fields(parsed) == ("local", "unspec", "unspec", None, None, (), 16)


def test_local_reports_the_family_sent_but_no_addresses(proxy):
    parsed = proxy.parse_proxy_header(header(inet("1.2.3.4", "5.6.7.8", 1, 2) + tlv(0x04, b""), version_command=LOCAL))
    assert fields(parsed) == ("local", "inet", "stream", None, None, ((0x04, b""),), 31)


def test_proxy_unspec_carries_only_tlvs(proxy):
    parsed = proxy.parse_proxy_header(header(tlv(0x05, b"id-1"), family=UNSPEC))
    assert fields(parsed) == ("proxy", "unspec", "unspec", None, None, ((0x05, b"id-1"),), 23)


def test_tlvs_in_order_with_empty_and_unknown_types(proxy):
    tlvs = [(0x01, b"h2"), (0x02, b"chat.example"), (0x04, b""), (0xE0, b"\x00" * 300), (0xFF, b"x"), (0x20, b"\x01\x00\x00\x00\x00")]
    data = header(inet("1.1.1.1", "2.2.2.2", 3, 4) + b"".join(tlv(k, v) for k, v in tlvs))
    parsed = proxy.parse_proxy_header(data)
    assert parsed.tlvs == tuple(tlvs) and parsed.header_bytes == len(data)
    assert all(type(k) is int and type(v) is bytes for k, v in parsed.tlvs)


def test_largest_header(proxy):
    block = inet("1.1.1.1", "2.2.2.2", 3, 4)
    data = header(block + tlv(0xEE, b"v" * (4096 - 16 - 12 - 3)))
    assert len(data) == 4096
    parsed = proxy.parse_proxy_header(data + b"after")
    assert parsed.header_bytes == 4096 and parsed.tlvs == ((0xEE, b"v" * 4065),)


def test_trailing_client_bytes_are_left_alone(proxy):
    data = TCP4_HEADER + tlv(0x01, b"h2")  # not part of the header: length says 12
    parsed = proxy.parse_proxy_header(data + CLIENT_BYTES)
    assert parsed.header_bytes == len(TCP4_HEADER) and parsed.tlvs == ()
    assert (data + CLIENT_BYTES)[parsed.header_bytes :] == tlv(0x01, b"h2") + CLIENT_BYTES
    # Garbage after the header is the client's problem, not the header's.
    assert proxy.parse_proxy_header(TCP4_HEADER + b"\xff" * 100).header_bytes == 28


@pytest.mark.parametrize("with_tlvs", [False, True])
def test_fed_one_byte_at_a_time(proxy, with_tlvs):
    data = header(inet6("::1", "::2", 7, 8) + (tlv(1, b"h2") + tlv(0x30, b"ns") if with_tlvs else b""), family=TCP6)
    stream = data + CLIENT_BYTES
    for size in range(len(data)):
        assert proxy.parse_proxy_header(stream[:size]) is None, size
    complete = [fields(proxy.parse_proxy_header(stream[:size])) for size in range(len(data), len(stream) + 1)]
    assert complete == [complete[0]] * len(complete)
    assert complete[0][6] == len(data)
    assert complete[0][5] == (((1, b"h2"), (0x30, b"ns")) if with_tlvs else ())


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "memoryview-window", "uint16", "array"])
def test_accepts_bytes_like(proxy, kind):
    data = TCP4_HEADER + CLIENT_BYTES  # 66 bytes: a whole number of 2-byte items
    if kind == "bytearray":
        data = bytearray(data)
    elif kind == "memoryview":
        data = memoryview(data)
    elif kind == "memoryview-window":  # a window into a bigger receive buffer, as BufferedProtocol gives
        data = memoryview(bytearray(b"\xee" * 3 + data + b"\xee" * 3))[3:-3]
    elif kind == "uint16":
        data = memoryview(data).cast("H")
    elif kind == "array":
        data = array.array("H", data)
    assert fields(proxy.parse_proxy_header(data)) == fields(proxy.parse_proxy_header(TCP4_HEADER))


def test_reads_nothing_past_a_window(proxy):
    """A window that stops inside the header is incomplete, whatever the buffer holds past it."""
    buffer = bytearray(TCP4_HEADER + CLIENT_BYTES)
    for size in range(len(TCP4_HEADER)):
        assert proxy.parse_proxy_header(memoryview(buffer)[:size]) is None


def test_results_are_copies(proxy):
    buffer = bytearray(header(b"" + tlv(0x01, b"h2"), family=UNSPEC))
    parsed = proxy.parse_proxy_header(buffer)
    buffer[:] = b"\x00" * len(buffer)
    assert parsed.tlvs == ((0x01, b"h2"),)


@pytest.mark.parametrize("bad", ["text", 5, None, [1, 2]])
def test_rejects_non_bytes(proxy, bad):
    with pytest.raises(TypeError):
        proxy.parse_proxy_header(bad)


def _odd_buffers() -> dict:
    released = memoryview(TCP4_HEADER)
    released.release()
    return {
        "released": released,
        "not-contiguous": memoryview(TCP4_HEADER)[::2],
        "two-dimensional": memoryview(TCP4_HEADER).cast("B", (2, 14)),
        "doubles": memoryview(array.array("d", [1.0, 2.0])),
        "text": "text",
    }


@pytest.mark.parametrize("kind", list(_odd_buffers()))
def test_the_twins_take_or_refuse_odd_buffers_alike(kind):
    outcomes = []
    for module in TWINS:
        try:
            outcomes.append(("ok", fields(module.parse_proxy_header(_odd_buffers()[kind]))))
        except Exception as exc:  # compared between the twins, whatever it is
            outcomes.append((type(exc), str(exc)))
    assert outcomes[0] == outcomes[1]


def test_empty_input_needs_more(proxy):
    assert proxy.parse_proxy_header(b"") is None
    assert proxy.parse_proxy_header(bytearray()) is None


def test_memory_is_bounded_by_the_header_not_the_input(proxy):
    big = bytearray(TCP4_HEADER + tlv(0x01, b"h2")) + bytearray(16 * 1024 * 1024)
    big[14:16] = struct.pack("!H", 12 + 5)
    view = memoryview(big)
    proxy.parse_proxy_header(view)  # warm up (first-call allocations)
    tracemalloc.start()
    try:
        for data in (view, big):
            assert proxy.parse_proxy_header(data).tlvs == ((0x01, b"h2"),)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


# ---------------------------------------------------------------- the header object


def test_header_is_immutable_comparable_and_printable(proxy):
    parsed = proxy.parse_proxy_header(TCP4_HEADER)
    for name in ("command", "family", "transport", "source", "destination", "tlvs", "header_bytes"):
        with pytest.raises(AttributeError):
            setattr(parsed, name, None)
    again = proxy.parse_proxy_header(bytearray(TCP4_HEADER))
    assert parsed == again and hash(parsed) == hash(again) and parsed is not again
    assert parsed != proxy.parse_proxy_header(header(inet("192.0.2.10", "198.51.100.7", 51234, 444)))
    built = proxy.ProxyHeader("proxy", "inet", "stream", ("192.0.2.10", 51234), ("198.51.100.7", 443), [], 28)
    assert built == parsed
    assert repr(parsed) == (
        "ProxyHeader(command='proxy', family='inet', transport='stream', source=('192.0.2.10', 51234), "
        "destination=('198.51.100.7', 443), tlvs=(), header_bytes=28)"
    )


def test_the_twins_print_alike():
    data = header(unix(b"/a", b"\x00b") + tlv(1, b"x"), family=UNIX_DGRAM)
    assert repr(proxy_native.parse_proxy_header(data)) == repr(proxy_pure.parse_proxy_header(data))


# ---------------------------------------------------------------- refusals, each as early as it can be


@pytest.mark.parametrize("byte", [0x00, 0x16, 0x49, 0x0A, 0xFF])  # 0x16: TLS; 0x49: our own "IL" preamble
def test_a_first_byte_off_the_signature_fails_at_once(proxy, byte):
    assert error_of(proxy, bytes([byte])) == (
        f"not a PROXY protocol v2 header: byte 0 is 0x{byte:02x}, the signature has 0x0d"
    )


@pytest.mark.parametrize("index", range(12))
def test_any_byte_off_the_signature_fails_when_it_arrives(proxy, index):
    wrong = SIG[index] ^ 0x20
    data = SIG[:index] + bytes([wrong])
    assert proxy.parse_proxy_header(SIG[:index]) is None
    message = f"not a PROXY protocol v2 header: byte {index} is 0x{wrong:02x}, the signature has 0x{SIG[index]:02x}"
    assert error_of(proxy, data) == message
    assert error_of(proxy, data + TCP4_HEADER[index + 1 :]) == message  # the rest changes nothing


@pytest.mark.parametrize("data", [b"P", b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 443\r\n", b"PROXY UNKNOWN\r\n"])
def test_a_version_1_text_header_is_named(proxy, data):
    assert error_of(proxy, data) == "a PROXY protocol version 1 (text) header: only version 2 (binary) is accepted"


@pytest.mark.parametrize("byte, version", [(0x11, 1), (0x01, 0), (0x31, 3), (0xF1, 15), (0x10, 1)])
def test_a_version_other_than_2_fails_at_byte_12(proxy, byte, version):
    assert error_of(proxy, SIG + bytes([byte])) == (
        f"PROXY protocol version {version} (byte 12 is 0x{byte:02x}): only version 2 is accepted"
    )


@pytest.mark.parametrize("command", range(2, 16))
def test_a_command_other_than_local_or_proxy_fails_at_byte_12(proxy, command):
    byte = 0x20 | command
    assert error_of(proxy, SIG + bytes([byte])) == (
        f"unknown PROXY protocol v2 command {command} (byte 12 is 0x{byte:02x}): only LOCAL (0) and PROXY (1) exist"
    )


@pytest.mark.parametrize("version_command", [LOCAL, PROXY])
def test_only_the_seven_family_bytes_pass_byte_13(proxy, version_command):
    valid = {0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32}
    for byte in range(256):
        data = SIG + bytes([version_command, byte])
        if byte in valid:
            assert proxy.parse_proxy_header(data) is None
        else:
            assert error_of(proxy, data) == f"unknown PROXY protocol v2 address family and transport 0x{byte:02x} (byte 13)"


@pytest.mark.parametrize("length", [4081, 4096, 0xFFFF])
def test_an_oversized_length_fails_after_16_bytes(proxy, length):
    data = header(family=UNSPEC, length=length)
    assert len(data) == 16
    assert error_of(proxy, data) == f"PROXY protocol v2 header of {16 + length} bytes exceeds the maximum of 4096"


def test_the_largest_length_waits_for_its_body(proxy):
    assert proxy.parse_proxy_header(header(tlv(1, b""), family=UNSPEC, length=4080)) is None


@pytest.mark.parametrize(
    "family, name, block", [(TCP4, "inet", 12), (UDP4, "inet", 12), (TCP6, "inet6", 36), (UDP6, "inet6", 36),
                            (UNIX_STREAM, "unix", 216), (UNIX_DGRAM, "unix", 216)],
)
@pytest.mark.parametrize("version_command", [LOCAL, PROXY])
def test_a_length_under_the_address_block_fails_after_16_bytes(proxy, family, name, block, version_command):
    for length in (0, block - 1):
        data = header(family=family, version_command=version_command, length=length)
        assert error_of(proxy, data) == (
            f"PROXY protocol v2 length {length} is shorter than the {block}-byte address block of family {name}"
        )
    assert proxy.parse_proxy_header(header(family=family, version_command=version_command, length=block)) is None


@pytest.mark.parametrize("left", [1, 2])
def test_a_truncated_tlv_header_fails_from_the_length_alone(proxy, left):
    # 16 bytes are enough: the length leaves 1 or 2 bytes after the address block.
    data = header(family=TCP4, length=12 + left)
    assert error_of(proxy, data) == (
        f"truncated TLV at byte 28 of the PROXY protocol v2 header: {left} bytes left, a TLV header takes 3"
    )


def test_a_truncated_second_tlv_header_fails_once_the_first_is_read(proxy):
    body = tlv(0x01, b"h2") + b"\x02\x00"  # a second TLV of 2 bytes: no room for its header
    data = header(body, family=UNSPEC)
    assert proxy.parse_proxy_header(data[:16 + 2]) is None  # the first TLV's header is not all there
    message = "truncated TLV at byte 21 of the PROXY protocol v2 header: 2 bytes left, a TLV header takes 3"
    assert error_of(proxy, data[: 16 + 3]) == message  # its length is known: where the second starts too
    assert error_of(proxy, data) == message


def test_a_tlv_overrunning_the_header_fails_as_soon_as_its_header_arrives(proxy):
    body = inet("1.2.3.4", "5.6.7.8", 1, 2) + b"\x01\x00\x05" + b"abcd"  # announces 5, only 4 in the header
    data = header(body) + CLIENT_BYTES
    assert proxy.parse_proxy_header(data[:30]) is None
    message = "TLV 0x01 at byte 28 of the PROXY protocol v2 header announces 5 bytes, only 4 remain in the header"
    for size in range(31, len(data) + 1):
        assert error_of(proxy, data[:size]) == message


def test_a_tlv_overrun_after_good_ones(proxy):
    body = tlv(0x01, b"h2") + tlv(0x02, b"a") + b"\xee\xff\xff"
    message = "TLV 0xee at byte 25 of the PROXY protocol v2 header announces 65535 bytes, only 0 remain in the header"
    assert error_of(proxy, header(body, family=UNSPEC)) == message


def test_errors_do_not_depend_on_how_much_arrived(proxy):
    """Once a prefix fails, every longer input fails with the same message (the first bad byte decides)."""
    bad = header(inet("1.2.3.4", "5.6.7.8", 1, 2) + tlv(1, b"x") + b"\x02\x00\x09", length=12 + 4 + 3 + 2)
    results = []
    for size in range(len(bad) + 1):
        try:
            results.append(proxy.parse_proxy_header(bad[:size]))
        except ProxyHeaderError as exc:
            results.append(str(exc))
    first = next(i for i, r in enumerate(results) if r is not None)
    assert results[:first] == [None] * first and results[first:] == [results[first]] * (len(results) - first)
    assert first == 35  # the second TLV's 3-byte header: it announces 9 bytes where 2 remain
    assert results[first] == (
        "TLV 0x02 at byte 32 of the PROXY protocol v2 header announces 9 bytes, only 2 remain in the header")


# ---------------------------------------------------------------- encoder


def test_encoder_writes_the_spec_bytes():
    assert encode_proxy_header(source=("192.0.2.10", 51234), destination=("198.51.100.7", 443)) == TCP4_HEADER
    assert encode_proxy_header(source=("2001:db8::1", 1), destination=("fe80::a:b:c:d", 2)) == header(
        inet6("2001:db8::1", "fe80::a:b:c:d", 1, 2), family=TCP6)
    assert encode_proxy_header("local") == header(version_command=LOCAL, family=UNSPEC)
    assert encode_proxy_header("local", tlvs=[(4, b"")]) == header(tlv(4, b""), version_command=LOCAL, family=UNSPEC)
    with_tlvs = encode_proxy_header(source=("1.1.1.1", 3), destination=("2.2.2.2", 4), tlvs=[(1, b"h2"), (0x30, bytearray(b"ns"))])
    assert with_tlvs == header(inet("1.1.1.1", "2.2.2.2", 3, 4) + tlv(1, b"h2") + tlv(0x30, b"ns"))


@pytest.mark.parametrize(
    "arguments, family",
    [
        ({"source": ("1.2.3.4", 1), "destination": ("5.6.7.8", 2), "tlvs": [(1, b"h2"), (2, b"host"), (0xEE, b"")]}, "inet"),
        ({"source": ("::ffff:1.2.3.4", 65535), "destination": ("::", 0), "tlvs": [(0x20, b"\x01" * 1000)]}, "inet6"),
        ({"command": "local"}, "unspec"),
        ({"command": "local", "tlvs": [(5, b"unique-id")]}, "unspec"),
    ],
)
def test_round_trip(proxy, arguments, family):
    data = encode_proxy_header(**arguments)
    parsed = proxy.parse_proxy_header(data + CLIENT_BYTES)
    command = arguments.get("command", "proxy")
    transport = "stream" if command == "proxy" else "unspec"
    assert fields(parsed) == (command, family, transport, arguments.get("source"), arguments.get("destination"),
                              tuple(arguments.get("tlvs", ())), len(data))


@pytest.mark.parametrize(
    "arguments, error",
    [
        ({"command": "PROXY", "source": ("1.2.3.4", 1), "destination": ("1.2.3.4", 1)}, ValueError),
        ({"source": ("1.2.3.4", 1)}, ValueError),
        ({"source": ("1.2.3.4", 1), "destination": ("::1", 1)}, ValueError),
        ({"source": ("example.com", 1), "destination": ("1.2.3.4", 1)}, ValueError),
        ({"source": ("1.2.3.4", 65536), "destination": ("1.2.3.4", 1)}, ValueError),
        ({"source": ("1.2.3.4", -1), "destination": ("1.2.3.4", 1)}, ValueError),
        ({"source": ("1.2.3.4", True), "destination": ("1.2.3.4", 1)}, ValueError),
        ({"source": ("fe80::1%eth0", 1), "destination": ("fe80::2", 1)}, ValueError),
        ({"source": "1.2.3.4:1", "destination": ("1.2.3.4", 1)}, TypeError),
        ({"command": "local", "source": ("1.2.3.4", 1), "destination": ("1.2.3.4", 1)}, ValueError),
        ({"command": "local", "tlvs": [(256, b"")]}, ValueError),
        ({"command": "local", "tlvs": [(1, "text")]}, TypeError),
        ({"command": "local", "tlvs": [(1, b"x" * 4078)]}, ValueError),  # 16 + 3 + 4078 = 4097
    ],
)
def test_encoder_refuses_what_the_wire_cannot_carry(arguments, error):
    with pytest.raises(error):
        encode_proxy_header(**arguments)


def test_encoder_reaches_the_maximum_exactly():
    assert len(encode_proxy_header("local", tlvs=[(1, b"x" * 4077)])) == 4096


# ---------------------------------------------------------------- twins agree


@st.composite
def near_headers(draw):
    """Mostly well-formed headers with one part drawn freely: what the twins must agree on."""
    version_command = draw(st.sampled_from([0x20, 0x21, 0x21, 0x21]) | st.integers(0, 255))
    family = draw(st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32]) | st.integers(0, 255))
    body = draw(st.binary(max_size=300))
    length = draw(st.just(len(body)) | st.integers(0, 0xFFFF) | st.integers(max(0, len(body) - 8), len(body) + 8))
    data = header(body, version_command, family, min(length, 0xFFFF))
    cut = draw(st.integers(0, len(data)))
    return data[:cut] if draw(st.booleans()) else data + draw(st.binary(max_size=8))


def outcome(module, data):
    try:
        parsed = module.parse_proxy_header(data)
    except ProxyHeaderError as exc:
        return ("raised", str(exc))
    return ("ok", None if parsed is None else fields(parsed))


@HYPOTHESIS
@given(near_headers())
def test_the_twins_agree_on_near_headers(data):
    assert outcome(proxy_native, data) == outcome(proxy_pure, data)


@HYPOTHESIS
@given(st.binary(max_size=40).map(lambda tail: SIG + tail) | st.binary(max_size=20))
def test_the_twins_agree_on_random_bytes(data):
    assert outcome(proxy_native, data) == outcome(proxy_pure, data)
