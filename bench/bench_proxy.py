"""PROXY protocol v2 header parsing: the compiled module against its pure twin, same inputs, same run.

    .venv/bin/python -m pytest bench/bench_proxy.py --benchmark-only

Compare rows within a group (``--benchmark-group-by=group``, the default): ``cython`` vs ``pure``.
Each call is one connection's first read: the header and the client's first bytes after it (a
Noise XX preamble and message 1), as a proxy in front of the gateway delivers them. The encoder
(``encode_proxy_header``) has no twin; its row is what a proxying load client pays per connection.
"""

from __future__ import annotations

import pytest

import interlink.core.protocol._proxy_pure as proxy_pure
import interlink.ext._proxy as proxy_native
from interlink.core.errors import ProxyHeaderError
from interlink.core.protocol.proxyheader import encode_proxy_header

TWINS = pytest.mark.parametrize("proxy", [proxy_native, proxy_pure], ids=["cython", "pure"])

CLIENT = b"IL\x01\x01\x00\x20" + bytes(range(32))  # preamble and XX message 1: what follows the header
TLVS = [(0x01, b"h2"), (0x02, b"chat.example"), (0x05, b"0123456789abcdef")]  # ALPN, authority, unique id
TCP4 = encode_proxy_header(source=("203.0.113.9", 51234), destination=("192.0.2.1", 7450))
TCP6_TLVS = encode_proxy_header(source=("2001:db8:85a3::8a2e:370:7334", 51234), destination=("2001:db8::1", 7450), tlvs=TLVS)
LOCAL = encode_proxy_header("local")
V1 = b"PROXY TCP4 203.0.113.9 192.0.2.1 51234 7450\r\n"


def _info(bench, proxy, **extra) -> None:
    bench.extra_info["implementation"] = "cython" if proxy is proxy_native else "pure"
    bench.extra_info.update(extra)


@TWINS
@pytest.mark.benchmark(group="parse: TCP4 header + client bytes (bytes)")
def test_parse_tcp4(bench, proxy):
    _info(bench, proxy, bytes=len(TCP4 + CLIENT))
    header = bench(proxy.parse_proxy_header, TCP4 + CLIENT)
    assert header.source == ("203.0.113.9", 51234) and header.header_bytes == len(TCP4)


@TWINS
@pytest.mark.benchmark(group="parse: TCP4 header + client bytes (memoryview of a receive buffer)")
def test_parse_tcp4_memoryview(bench, proxy):
    buffer = bytearray(65536)
    buffer[: len(TCP4 + CLIENT)] = TCP4 + CLIENT
    view = memoryview(buffer)[: len(TCP4 + CLIENT)]
    _info(bench, proxy, bytes=len(view))
    assert bench(proxy.parse_proxy_header, view).header_bytes == len(TCP4)


@TWINS
@pytest.mark.benchmark(group="parse: TCP6 header with 3 TLVs + client bytes")
def test_parse_tcp6_tlvs(bench, proxy):
    _info(bench, proxy, bytes=len(TCP6_TLVS + CLIENT), tlvs=len(TLVS))
    header = bench(proxy.parse_proxy_header, TCP6_TLVS + CLIENT)
    assert header.source == ("2001:db8:85a3::8a2e:370:7334", 51234) and header.tlvs == tuple(TLVS)


@TWINS
@pytest.mark.benchmark(group="parse: LOCAL header (health check)")
def test_parse_local(bench, proxy):
    _info(bench, proxy)
    assert bench(proxy.parse_proxy_header, LOCAL + CLIENT).command == "local"


@TWINS
@pytest.mark.benchmark(group="parse: TCP4 header split in two reads (None, then the header)")
def test_parse_split(bench, proxy):
    _info(bench, proxy)
    first, whole = TCP4[:20], TCP4 + CLIENT

    def run():
        assert proxy.parse_proxy_header(first) is None
        return proxy.parse_proxy_header(whole)

    assert bench(run).header_bytes == len(TCP4)


@TWINS
@pytest.mark.benchmark(group="parse: a version 1 text header refused")
def test_parse_v1_refused(bench, proxy):
    _info(bench, proxy)

    def run():
        try:
            proxy.parse_proxy_header(V1)
        except ProxyHeaderError as exc:
            return exc
        return None

    assert isinstance(bench(run), ProxyHeaderError)


@pytest.mark.benchmark(group="encode: TCP6 header with 3 TLVs (no twin)")
def test_encode_tcp6_tlvs(bench):
    assert bench(encode_proxy_header, "proxy", ("2001:db8:85a3::8a2e:370:7334", 51234), ("2001:db8::1", 7450), TLVS) == TCP6_TLVS
