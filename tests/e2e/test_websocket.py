"""The protocol over WebSocket (``ws_port``; docs/protocol.md §1): every stanza family's happy
path once with every client on WebSocket, a browser-style client written against the contract
alone, and each way a WebSocket connection can break a rule of it."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from interlink.client import Client
from interlink.core.errors import SessionClosedError
from interlink.core.protocol.certs import generate_static_key
from interlink.core.protocol.connection import ClientConnection, StanzaReceived, Welcomed
from interlink.core.protocol.noise import Suite, make_preamble
from interlink.core.protocol.wsframes import message_to_frame, stream_to_messages
from interlink.gateway import Gateway
from interlink.testing import until
from three_providers import AUD, People, closes, config_for

# The happy paths, run again here with this module's ``people`` (every device on WebSocket).
from e2e.test_blobs import test_a_file_of_several_megabytes_goes_across_providers_and_devices  # noqa: F401
from e2e.test_groups import (  # noqa: F401
    test_membership_events_are_ordered_by_ver_and_removed_or_left_members_get_nothing_after,
    test_three_provider_group_every_device_gets_every_message_once_in_ack_order,
)
from e2e.test_keys import test_bundles_of_several_devices_and_devices_without_keys, test_put_get_count_round_trip  # noqa: F401
from e2e.test_messaging import (  # noqa: F401
    test_message_reaches_every_device_and_own_copies,
    test_offline_device_catches_up_in_order_and_recv_deletes,
    test_receipts_reach_the_sender_and_your_other_devices,
    test_retransmission_is_stored_once_and_acked_dup,
    test_typing_state_is_pushed_to_online_devices_only,
)
from e2e.test_operations import (  # noqa: F401
    test_blocked_sender_gets_a_plain_ack_and_nothing_is_delivered,
    test_consent_get_defaults_and_set_round_trip,
    test_devices_get_lists_devices_and_obeys_consent,
    test_dir_lookup_finds_only_discoverable_users_who_accept_the_asker,
    test_reports_are_numbered_stored_and_bounded,
)

PAGE_ORIGIN = "https://chat.alpha.example"


@pytest.fixture
async def gateway(issuers, tmp_path):
    async with Gateway(config_for(issuers, tmp_path, ws_port=0, ws_allowed_origins=[PAGE_ORIGIN])) as gw:
        yield gw


@pytest.fixture
def people(gateway, issuers):
    server = gateway._server
    yield People(gateway, issuers, websocket=True)
    # The imported tests really ran over WebSocket: each session they opened came through an upgrade.
    counters = server.counters
    assert 0 < counters["sessions_opened"] <= counters["ws_upgrades"]


class BrowserClient:
    """What a web page does, written from docs/protocol.md alone: a WebSocket from the page's
    origin, the preamble as the first binary message, then one Noise message per message."""

    def __init__(self, ws, conn: ClientConnection) -> None:
        self.ws, self.conn = ws, conn
        self.stanzas: list[dict] = []

    @classmethod
    async def connect(cls, gateway: Gateway, token: str, *, origin: str = PAGE_ORIGIN) -> BrowserClient:
        ws = await ws_connect(gateway.ws_url, origin=origin, compression=None)
        conn = ClientConnection(suite=int(Suite.XX_CHACHAPOLY), static_private=generate_static_key(),
                                root_public=gateway.root_public, token=token, device=1)
        client = cls(ws, conn)
        conn.start(time.time())
        await client.flush(preamble=True)
        while conn.welcome is None:
            await client.read()
        return client

    async def flush(self, *, preamble: bool = False) -> None:
        for message in stream_to_messages(self.conn.data_to_send(), preamble=preamble):
            await self.ws.send(bytes(message))

    async def read(self) -> None:
        message = await asyncio.wait_for(self.ws.recv(), 5)
        assert isinstance(message, bytes), "the gateway sends binary messages only"
        self.conn.receive_data(message_to_frame(message), time.time())
        for event in self.conn.events():
            if type(event) is StanzaReceived:
                self.stanzas.append(event.stanza)
            else:
                assert type(event) is Welcomed, event
        await self.flush()

    async def stanza(self, kind: str) -> dict:
        while not any(s["t"] == kind for s in self.stanzas):
            await self.read()
        found = next(s for s in self.stanzas if s["t"] == kind)
        self.stanzas.remove(found)
        return found


async def test_a_browser_style_client_chats_with_a_tcp_client(gateway, issuers):
    alpha, beta, _ = issuers
    page = await BrowserClient.connect(gateway, alpha.issue("alice", audience=AUD))
    bob = await Client.connect(*gateway.address, token=beta.issue("bob", audience=AUD), device=1,
                               root_public=gateway.root_public)
    assert page.conn.welcome["user"] == "alice@alpha"
    page.conn.send_stanza({"t": "msg", "id": b"m" * 16, "to": "bob@beta", "c": {1: b"from the page"}})
    await page.flush()
    assert (await page.stanza("ack"))["id"] == b"m" * 16
    dlv = await bob.recv(timeout_s=5)
    assert (dlv["from"], dlv["c"]) == ("alice@alpha", b"from the page")
    await bob.send_message("alice@alpha", {1: b"from tcp"})
    delivered = await page.stanza("dlv")
    assert (delivered["from"], delivered["c"]) == ("bob@beta", b"from tcp")
    # A WebSocket ping is answered by the gateway (keepalives through proxies that need them).
    pong = await page.ws.ping()
    await asyncio.wait_for(pong, 5)
    await page.ws.close()
    await bob.close()
    assert gateway._server.counters["ws_upgrades"] == 1


async def test_origins_path_and_non_websocket_requests_are_refused(gateway, issuers):
    token = issuers[0].issue("alice", audience=AUD)
    with pytest.raises(InvalidStatus) as refused:
        await ws_connect(gateway.ws_url, origin="https://evil.example")
    assert refused.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as refused:
        await ws_connect(gateway.ws_url.replace("/interlink", "/other"))
    assert refused.value.response.status_code == 404
    host, port = gateway.ws_address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /interlink HTTP/1.1\r\nHost: x\r\n\r\n")  # no Upgrade: not a WebSocket request
    assert (await reader.read(100)).startswith(b"HTTP/1.1 426")
    writer.close()
    assert closes(gateway, "bad_upgrade") == 3
    # The SDK says why the upgrade failed.
    with pytest.raises(SessionClosedError) as closed:
        await Client.connect(host, port, token=token, device=1, root_public=gateway.root_public, ws_path="/interlink",
                             ws_origin="https://evil.example")
    assert closed.value.reason == "bad_upgrade" and "403" in str(closed.value)
    # Apps send no Origin; the configured page origin is allowed.
    app = await Client.connect(host, port, token=token, device=1, root_public=gateway.root_public, ws_path="/interlink")
    page = await Client.connect(host, port, token=token, device=2, root_public=gateway.root_public,
                                ws_path="/interlink", ws_origin=PAGE_ORIGIN)
    assert (await app.ping()) >= 0 and (await page.ping()) >= 0
    await app.close()
    await page.close()


async def raw(gateway: Gateway):
    return await ws_connect(gateway.ws_url, compression=None, max_size=None)


async def close_code(ws) -> int:
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    return ws.close_code


async def test_broken_rules_close_with_the_documented_codes(gateway):
    ws = await raw(gateway)
    await ws.send("IL\x01\x01")  # a text message
    assert await close_code(ws) == 1003
    await until(lambda: closes(gateway, "bad_frame") == 1)

    ws = await raw(gateway)
    await ws.send(make_preamble(int(Suite.XX_CHACHAPOLY)) + b"\x00")  # the preamble must be a message of its own
    assert await close_code(ws) == 1002
    await until(lambda: closes(gateway, "bad_preamble") == 1)

    ws = await raw(gateway)
    await ws.send(make_preamble(int(Suite.XX_CHACHAPOLY)))
    await ws.send(b"")  # an empty message: the empty frame the contract refuses
    assert await close_code(ws) == 1002
    await until(lambda: closes(gateway, "bad_frame") == 2)

    ws = await raw(gateway)
    await ws.send(make_preamble(int(Suite.XX_CHACHAPOLY)))
    await ws.send([b"x" * 40_000, b"y" * 40_000])  # one message in two fragments, past the frame limit
    assert await close_code(ws) == 1009
    await until(lambda: closes(gateway, "bad_frame") == 3)


async def test_a_message_in_fragments_is_one_noise_message(gateway, issuers):
    ws = await raw(gateway)
    conn = ClientConnection(suite=int(Suite.XX_CHACHAPOLY), static_private=generate_static_key(),
                            root_public=gateway.root_public, token=issuers[0].issue("alice", audience=AUD), device=1)
    conn.start(time.time())
    messages = stream_to_messages(conn.data_to_send(), preamble=True)
    await ws.send(bytes(messages[0]))
    first = bytes(messages[1])
    await ws.send([first[:10], first[10:]])  # handshake message 1 in two fragments
    reply = await asyncio.wait_for(ws.recv(), 5)
    conn.receive_data(message_to_frame(reply), time.time())
    assert conn.certificate is not None  # the gateway answered it: the fragments were one message
    await ws.close()


async def test_drain_says_bye_then_going_away(gateway, people):
    alice = await people.connect("alice@alpha")
    await gateway.drain(timeout_s=5)
    with pytest.raises(SessionClosedError) as closed:
        await alice.recv(timeout_s=5)
    assert closed.value.reason == "drain"


async def test_x_forwarded_for_from_a_trusted_proxy_names_the_client(issuers, tmp_path):
    config = config_for(issuers, tmp_path, ws_port=0, ws_trusted_proxies=["127.0.0.1"], max_preauth_per_source=1)
    async with Gateway(config) as gateway:
        headers = {"X-Forwarded-For": "198.51.100.9, 203.0.113.5"}  # the client wrote the first, the proxy the last
        first = await ws_connect(gateway.ws_url, additional_headers=headers)
        # The same client again while its first connection is still unauthenticated: over its
        # own limit (1); another client behind the same proxy is not.
        with pytest.raises(InvalidStatus) as refused:
            await ws_connect(gateway.ws_url, additional_headers=headers)
        assert refused.value.response.status_code == 429
        other = await ws_connect(gateway.ws_url, additional_headers={"X-Forwarded-For": "203.0.113.6"})
        server = gateway._server
        assert sorted(peer[0] for peer in server.forwarded.values()) == ["203.0.113.5", "203.0.113.6"]
        assert server.source_refusals["preauth_per_source"] == 1 and server.proxy_counters["forwarded"] == 3
        await first.close()
        await other.close()
        # An authenticated session shows the client's address to the operator.
        alice = await People(gateway, issuers, websocket=True).connect("alice@alpha")
        assert [s["peer"][0] for s in server.session_list()] == ["127.0.0.1"]  # no header: the proxy itself
        await alice.close()


async def test_x_forwarded_for_from_anyone_else_is_ignored(gateway):
    ws = await ws_connect(gateway.ws_url, additional_headers={"X-Forwarded-For": "203.0.113.5"})
    assert not gateway._server.forwarded and not gateway._server.proxy_counters
    await ws.close()


async def test_the_tcp_port_names_an_http_request_in_its_close(gateway):
    reader, writer = await asyncio.open_connection(*gateway.address)
    writer.write(b"GET /interlink HTTP/1.1\r\n\r\n")
    assert await reader.read() == b""
    writer.close()
    await until(lambda: closes(gateway, "bad_preamble") == 1)


def test_the_websocket_library_is_the_one_pinned():
    major = int(websockets.__version__.split(".")[0])
    assert major >= 14, "the sans-I/O ServerProtocol API used by core/edge/websocket.py"


async def test_many_sessions_over_websocket_each_get_their_own_messages(people):
    clients = [await people.connect(f"user{i}@alpha") for i in range(20)]
    for i, client in enumerate(clients):
        await client.send_message(f"user{(i + 1) % 20}@alpha", {1: os.urandom(8) + bytes([i])})
    for i, client in enumerate(clients):
        dlv = await client.recv(timeout_s=5)
        assert dlv["from"] == f"user{(i - 1) % 20}@alpha" and dlv["c"][-1] == (i - 1) % 20
    for client in clients:
        await client.close()


def bytes_held(root) -> int:
    """Bytes of the ``bytes``/``bytearray`` objects reachable from ``root`` through instances,
    containers, generators and their frames (not through modules, classes or functions: shared)."""
    import gc
    import types

    seen, total, stack = set(), 0, [root]
    skip = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.CodeType)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, (bytes, bytearray)):
            total += len(obj)
            continue
        if isinstance(obj, (str, int, float)):
            continue
        stack.extend(gc.get_referents(obj))
    return total


async def test_an_idle_session_lets_go_of_its_last_large_message(issuers, tmp_path):
    """The library's parser keeps the last frame until the next one; the idle sweep restarts it."""
    async with Gateway(config_for(issuers, tmp_path, ws_port=0, idle_release_s=0.3)) as gateway:
        people = People(gateway, issuers, websocket=True)
        alice, bob = await people.connect("alice@alpha"), await people.connect("bob@beta")
        proto = next(p for p in gateway._server.connections.values() if p.conn.identity.user == "alice@alpha")
        await alice.send_message("bob@beta", {1: os.urandom(60_000)})
        assert len((await bob.recv(timeout_s=5))["c"]) == 60_000
        assert bytes_held(proto.ws) > 60_000
        await until(lambda: proto.parser_fresh)  # two quiet sweeps later
        assert bytes_held(proto.ws) < 4_000
        # The restarted parser reads the next frames as the old one would have, and is restarted
        # again at the next quiet spell.
        await alice.send_message("bob@beta", {1: b"after the sweep" + bytes(50_000)})
        assert (await bob.recv(timeout_s=5))["c"][:15] == b"after the sweep"
        assert bytes_held(proto.ws) > 50_000
        await until(lambda: proto.parser_fresh)
        assert bytes_held(proto.ws) < 4_000
        await alice.close()
        await bob.close()


async def test_a_flood_of_tiny_control_frames_is_cut_off_at_its_first_read(gateway):
    """Empty pings parse at microseconds each: a read of thousands would stall every session."""
    host, port = gateway.ws_address
    ws = await raw(gateway)
    ping = b"\x89\x80" + b"\x00" * 4  # an empty, masked ping
    await ws.send(make_preamble(int(Suite.XX_CHACHAPOLY)))
    ws.transport.write(ping * 20_000)  # 120 KB of pings in one write
    assert await close_code(ws) == 1008
    await until(lambda: closes(gateway, "bad_frame") == 1)


async def test_a_message_in_too_many_fragments_is_refused(gateway):
    ws = await raw(gateway)
    await ws.send(make_preamble(int(Suite.XX_CHACHAPOLY)))
    # websockets sends the pieces of an iterable as fragments and ends with an empty final one:
    await ws.send([b"x"] * 64)  # one message in 65 fragments: one more than the limit
    assert await close_code(ws) == 1002
    await until(lambda: closes(gateway, "bad_frame") == 1)
    # 64 fragments are one message like any other: taken whole as handshake message 1, which
    # one byte is not (a failed handshake, not a refused message).
    ws = await raw(gateway)
    await ws.send(make_preamble(int(Suite.XX_CHACHAPOLY)))
    await ws.send([b"x"] + [b""] * 62)  # 64 fragments, 1 byte: too short for handshake message 1
    assert await close_code(ws) == 1002
    await until(lambda: closes(gateway, "handshake_failed") == 1)
    assert closes(gateway, "bad_frame") == 1


async def test_a_text_message_after_welcome_gets_err_bad_frame_then_1003(gateway, issuers):
    page = await BrowserClient.connect(gateway, issuers[0].issue("alice", audience=AUD))
    await page.ws.send("hello")
    err = await page.stanza("err")
    assert err["code"] == "bad_frame" and "text" in err["msg"]
    assert await close_code(page.ws) == 1003


async def test_an_upgrade_with_too_many_headers_or_no_http_is_refused(gateway):
    with pytest.raises(InvalidStatus) as refused:
        await ws_connect(gateway.ws_url, additional_headers={f"X-Filler-{i}": "x" for i in range(40)})
    assert refused.value.response.status_code == 431
    reader, writer = await asyncio.open_connection(*gateway.ws_address)
    writer.write(b"HELLO\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await until(lambda: closes(gateway, "bad_upgrade") == 2)
    assert gateway._server.counters["ws_upgrades_refused"] == 2


@pytest.mark.parametrize("path", ["ws_path", "/elsewhere"])
async def test_a_broken_frame_right_behind_the_upgrade_request_ends_it_unanswered_and_logs_no_error(
        gateway, issuers, caplog, path):
    """The library parses what follows a request in the same read before the request is answered;
    a frame that breaks its rules there ended the connection before the answer, and answering a
    refused upgrade then raised inside the read (uvloop logged a fatal error with its traceback,
    once per connection anyone could open)."""
    host, port = gateway.ws_address
    target = gateway._server.ws_path if path == "ws_path" else path
    reader, writer = await asyncio.open_connection(host, port)
    writer.write((f"GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {'A' * 22}==\r\nSec-WebSocket-Version: 13\r\nOrigin: {PAGE_ORIGIN}\r\n\r\n"
                  ).encode() + b"\xc2\x80" + b"\x00" * 4)  # a masked binary frame with RSV1 set: no extension agreed
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, with no answer
    writer.close()
    await until(lambda: closes(gateway, "bad_upgrade") == 1)
    assert gateway._server.counters["ws_upgrades_refused"] == 1 and gateway._server.counters["ws_upgrades"] == 0
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    page = await BrowserClient.connect(gateway, issuers[0].issue("alice", audience=AUD))  # the next one is served
    assert page.conn.welcome["user"] == "alice@alpha"
    await page.ws.close()


async def test_a_trusted_proxy_that_names_no_client_is_limited_as_itself(issuers, tmp_path):
    config = config_for(issuers, tmp_path, ws_port=0, ws_trusted_proxies=["127.0.0.1"], max_preauth_per_source=1,
                        source_limits_on_loopback=True)
    async with Gateway(config) as gateway:
        first = await ws_connect(gateway.ws_url)  # no X-Forwarded-For: the proxy's own address
        with pytest.raises(InvalidStatus) as refused:
            await ws_connect(gateway.ws_url)
        assert refused.value.response.status_code == 429
        assert gateway._server.proxy_counters["local"] == 2
        await first.close()
