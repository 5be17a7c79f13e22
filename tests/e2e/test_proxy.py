"""PROXY protocol v2 on the TCP listener (``tcp_trusted_proxies``; docs/operations.md "Behind a
proxy"): over real sockets, a trusted proxy's header names the client for the operator and the
per-source limits; anyone else's header is a protocol error; every malformed header is refused."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from interlink.client import Client
from interlink.core.protocol.certs import generate_static_key
from interlink.core.protocol.connection import ClientConnection
from interlink.core.protocol.noise import Suite, make_preamble
from interlink.core.protocol.proxyheader import encode_proxy_header
from interlink.gateway import Gateway
from interlink.testing import ProxyRelay, until
from three_providers import AUD, closes, config_for

CLIENT = ("203.0.113.7", 40001)


@pytest.fixture
async def proxied(issuers, tmp_path):
    """A gateway that trusts 127.0.0.1 as a proxy (and so expects a PROXY header from it)."""
    config = config_for(issuers, tmp_path, tcp_trusted_proxies=["127.0.0.0/8"], max_preauth_per_source=2,
                        preauth_deadline_s=2.0)
    async with Gateway(config) as gateway:
        yield gateway


async def session_through(relay: ProxyRelay, gateway: Gateway, issuers, user: str = "alice", device: int = 1) -> Client:
    return await Client.connect(*relay.address, token=issuers[0].issue(user, audience=AUD), device=device,
                                root_public=gateway.root_public)


async def raw_close(gateway: Gateway, data: bytes) -> bytes:
    """Send ``data`` on a new connection; what the gateway answers before it closes."""
    reader, writer = await asyncio.open_connection(*gateway.address)
    writer.write(data)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def test_tcp4_and_tcp6_headers_name_the_client(proxied, issuers):
    server = proxied._server
    six = encode_proxy_header("proxy", ("2001:db8:1:2::7", 5555), ("2001:db8::1", 7450))
    async with ProxyRelay(proxied.address, client=CLIENT) as relay4, \
            ProxyRelay(proxied.address, header=lambda peer: six) as relay6:
        alice = await session_through(relay4, proxied, issuers)
        assert [s["peer"] for s in server.session_list()] == [CLIENT]
        bob = await session_through(relay6, proxied, issuers, "bob")
        assert await alice.ping() >= 0 and await bob.ping() >= 0
        peers = sorted(s["peer"] for s in server.session_list())
        assert peers == [("2001:db8:1:2::7", 5555), CLIENT]
        await alice.close()
        await bob.close()
    assert server.proxy_counters["proxy"] == 2


async def test_local_command_is_the_proxy_itself(proxied, issuers):
    async with ProxyRelay(proxied.address, header=lambda peer: encode_proxy_header("local")) as relay:
        alice = await session_through(relay, proxied, issuers)
        assert proxied._server.session_list()[0]["peer"][0] == "127.0.0.1"
        assert proxied._server.proxy_counters["local"] == 1
        await alice.close()


async def test_tlvs_after_the_addresses_are_skipped(proxied, issuers):
    header = encode_proxy_header("proxy", CLIENT, ("192.0.2.1", 7450), tlvs=[(0x05, b"unique-id"), (0x04, b"\x00" * 40)])
    async with ProxyRelay(proxied.address, header=lambda peer: header) as relay:
        alice = await session_through(relay, proxied, issuers)
        assert proxied._server.session_list()[0]["peer"] == CLIENT
        await alice.close()


async def test_per_source_limits_apply_to_the_named_client(proxied, issuers):
    server = proxied._server
    silent = []
    for _ in range(2):  # max_preauth_per_source = 2 silent connections of the named client
        reader, writer = await asyncio.open_connection(*proxied.address)
        writer.write(encode_proxy_header("proxy", CLIENT, ("192.0.2.1", 7450)))
        silent.append((reader, writer))
    await until(lambda: len(server.forwarded) == 2)
    assert await raw_close(proxied, encode_proxy_header("proxy", CLIENT, ("192.0.2.1", 7450))) == b""
    await until(lambda: closes(proxied, "source_limit") == 1)
    assert server.source_refusals["preauth_per_source"] == 1
    # Another client behind the same proxy is not affected.
    async with ProxyRelay(proxied.address, client=("203.0.113.8", 1)) as relay:
        bob = await session_through(relay, proxied, issuers, "bob")
        assert await bob.ping() >= 0
        await bob.close()
    for _, writer in silent:
        writer.close()


@pytest.mark.parametrize("data, why", [
    (make_preamble(int(Suite.XX_CHACHAPOLY)), "no header from a trusted proxy"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 40001 7450\r\n", "version 1"),
    (encode_proxy_header("proxy", CLIENT, ("192.0.2.1", 7450))[:12] + b"\x31\x11\x00\x0c" + b"\x00" * 12, "version 3"),
    (encode_proxy_header("proxy", CLIENT, ("192.0.2.1", 7450))[:12] + b"\x21\x11\xff\xff", "oversized"),
    (encode_proxy_header("proxy", CLIENT, ("192.0.2.1", 7450))[:12] + b"\x21\x11\x00\x04" + b"\x00" * 4, "length below the addresses"),
    (encode_proxy_header("proxy", CLIENT, ("192.0.2.1", 7450))[:12] + b"\x21\x12\x00\x0c" + b"\x00" * 12, "UDP"),
    (encode_proxy_header("proxy", CLIENT, ("192.0.2.1", 7450))[:12] + b"\x21\x00\x00\x00", "PROXY with UNSPEC"),
])
async def test_malformed_headers_are_refused(proxied, data, why):
    assert await raw_close(proxied, data) == b"", why
    await until(lambda: closes(proxied, "bad_proxy_header") == 1)
    assert proxied._server.proxy_counters["refused"] == 1


async def test_a_truncated_header_runs_into_the_preauth_deadline(proxied):
    header = encode_proxy_header("proxy", CLIENT, ("192.0.2.1", 7450))
    assert await raw_close(proxied, header[:20]) == b""  # the rest never comes
    assert closes(proxied, "auth_deadline") == 1 and not proxied._server.forwarded


async def test_a_header_split_over_many_reads_and_followed_by_the_preamble(proxied, issuers):
    header = encode_proxy_header("proxy", CLIENT, ("192.0.2.1", 7450))
    reader, writer = await asyncio.open_connection(*proxied.address)
    for byte in header:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.001)
    conn = ClientConnection(suite=int(Suite.XX_CHACHAPOLY), static_private=generate_static_key(),
                            root_public=proxied.root_public, token=issuers[0].issue("alice", audience=AUD), device=1)
    conn.start(time.time())
    writer.write(conn.data_to_send())  # the preamble and handshake message 1
    answer = await asyncio.wait_for(reader.read(2), 5)
    assert len(answer) == 2  # the gateway answered the handshake: the header was taken whole
    assert proxied._server.forwarded and list(proxied._server.forwarded.values()) == [CLIENT]
    writer.close()


async def test_a_header_from_an_untrusted_address_is_a_protocol_error(issuers, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="interlink.server")
    config = config_for(issuers, tmp_path, tcp_trusted_proxies=["10.0.0.0/8"])
    async with Gateway(config) as gateway:
        assert await raw_close(gateway, encode_proxy_header("proxy", CLIENT, ("192.0.2.1", 7450))) == b""
        await until(lambda: closes(gateway, "bad_preamble") == 1)
        assert "accepted only from tcp_trusted_proxies" in caplog.text
        assert not gateway._server.forwarded
