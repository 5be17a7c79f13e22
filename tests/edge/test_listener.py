"""The gateway's own accept loop (``core/edge/listener.py``): a busy event loop still takes every
waiting connection each turn, refused ones are reset before anything is built for them, and the
address ``accept()`` returned is the one admission uses — over real sockets, against a gateway."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from interlink.config import GatewayConfig
from interlink.core.edge.listener import ACCEPTS_PER_TURN, listening_sockets
from interlink.core.domain.auth import Provider
from interlink.core.protocol.proxyheader import encode_proxy_header
from interlink.gateway import Gateway
from interlink.testing import DemoIssuer

AUD = "interlink-test"


@pytest.fixture
async def issuer():
    async with DemoIssuer() as alpha:
        yield alpha


def gateway_for(issuer, tmp_path, **settings) -> Gateway:
    provider = Provider(id="alpha", issuer=issuer.issuer, audience=AUD, discovery=True)
    return Gateway(GatewayConfig(port=0, data_dir=tmp_path, providers=[provider], **settings))


def open_many(port: int, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        sock.connect_ex(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


def test_listening_sockets_bind_every_address_and_do_not_block():
    sockets = listening_sockets("127.0.0.1", 0, 16)
    try:
        assert len(sockets) == 1 and sockets[0].getsockname()[0] == "127.0.0.1"
        assert sockets[0].getblocking() is False
        with pytest.raises(BlockingIOError):
            sockets[0].accept()
    finally:
        for sock in sockets:
            sock.close()
    with pytest.raises(OSError):  # not an address of this host: the bind fails, nothing is left open
        listening_sockets("192.0.2.1", 0, 16)


async def test_a_busy_loop_still_takes_every_waiting_connection_each_turn(issuer, tmp_path):
    """libuv alone takes one connection per loop turn; a storm would fill the kernel's queue."""
    async with gateway_for(issuer, tmp_path, max_preauth_connections=4096) as gateway:
        loop = asyncio.get_running_loop()
        turns = 0
        busy = True

        def busy_turn() -> None:  # every loop turn takes 10 ms, as under heavy load
            nonlocal turns
            turns += 1
            time.sleep(0.01)
            if busy:
                loop.call_soon(busy_turn)

        waiting = open_many(gateway.port, 300)
        loop.call_soon(busy_turn)
        while gateway._server.counters["connections_accepted"] < 300 and turns < 100:
            await asyncio.sleep(0)
        busy = False
        # One connection per turn would have needed 300 turns.
        assert gateway._server.counters["connections_accepted"] == 300 and turns < 100, turns
        for sock in waiting:
            sock.close()
    assert ACCEPTS_PER_TURN >= 300


async def test_a_refused_connection_is_reset_before_anything_is_built(issuer, tmp_path):
    async with gateway_for(issuer, tmp_path, source_limits_on_loopback=True, max_preauth_per_source=2) as gateway:
        server = gateway._server
        held = [await asyncio.open_connection(*gateway.address) for _ in range(2)]
        with pytest.raises(ConnectionResetError):  # in the connect, or the first read (a FIN would give b"")
            reader, writer = await asyncio.open_connection(*gateway.address)
            writer.write(b"IL\x01\x01")
            await writer.drain()
            await asyncio.wait_for(reader.read(), 5)
        assert server.source_refusals["preauth_per_source"] == 1 and server.close_reasons["source_limit"] == 1
        assert server.counters["connections_accepted"] == 2 and len(server.preauth) == 2  # nothing of the third
        for _, held_writer in held:
            held_writer.close()


async def test_a_proxied_connection_gone_at_once_is_still_known_to_come_from_the_proxy(issuer, tmp_path):
    """A health check that sends its PROXY header and resets at once: before the gateway had its
    own accept loop, the socket's peer address was already gone and the header was taken for
    one from an untrusted address (a bad preamble every few seconds in the close counts)."""
    async with gateway_for(issuer, tmp_path, tcp_trusted_proxies=["127.0.0.1"]) as gateway:
        server = gateway._server
        for _ in range(20):
            sock = socket.create_connection(gateway.address)
            sock.sendall(encode_proxy_header("proxy", ("203.0.113.7", 1), ("192.0.2.1", 7450)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()
        deadline = time.monotonic() + 5
        while sum(server.close_reasons.values()) < 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert "bad_preamble" not in server.close_reasons, dict(server.close_reasons)
        assert sum(server.close_reasons.values()) == 20


async def test_connections_still_opening_count_toward_max_connections(issuer, tmp_path):
    """A burst accepted in one turn: those not yet through connection_made count too."""
    async with gateway_for(issuer, tmp_path, max_connections=6, max_preauth_connections=6) as gateway:
        server = gateway._server
        burst = open_many(gateway.port, 12)
        deadline = time.monotonic() + 5
        while server.counters["connections_accepted"] + server.close_reasons["over_capacity"] < 12:
            assert time.monotonic() < deadline, (server.counters, server.close_reasons)
            await asyncio.sleep(0.01)
        assert server.counters["connections_accepted"] == 6 and len(server.connections) == 6
        assert server.close_reasons["over_capacity"] == 6 and not server.opening
        for sock in burst:
            sock.close()
