"""The data path's own NATS connection (core/edge/natsconn.py) against a real nats-server on
loopback: publishing and subscribing in order, the bounds of ``publish``, logins (password,
token; ``.creds`` files and TLS run in tests/e2e/test_cluster_security.py), a refused login, a
URL or a CA asking for TLS of a server without it, NATS's "no responders", reconnecting after the
server is killed (what was published meanwhile goes out after) and after it stops answering, and
a handler's exception costing nothing but its message; and against a scripted server on loopback
what a real one never does: a MSG before CONNECT (a man in the middle), one between CONNECT and
PONG, a refusal with messages after it, a close racing a connect."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl

import pytest

from interlink.core.edge import natsconn
from interlink.core.edge.natsconn import NatsConnection, read_credentials
from interlink.core.errors import ConfigError, NatsProtocolError
from interlink.load.nats import LocalNats
from interlink.testing import until

from e2e.test_cluster import nats_server  # noqa: F401 (a fixture)


class Inbox:
    """What a subscription received, in order."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def __call__(self, subject: str, reply: str | None, payload: bytes | None) -> None:
        self.messages.append((subject, payload))


async def connected(url: str, **options) -> NatsConnection:
    connection = NatsConnection([url], name="test", connect_timeout_s=2.0, **options)
    await connection.connect()
    return connection


async def test_messages_arrive_in_the_order_published_with_their_subjects(nats_server):
    sender, receiver = await connected(nats_server.url), await connected(nats_server.url)
    inbox = Inbox()
    receiver.subscribe(b"interlink.node-a.relay.*", inbox)
    assert await receiver.flush(2.0)  # the server has the SUB
    payloads = [os.urandom(n % 300) + b"\r\n" for n in range(1000)]
    for index, payload in enumerate(payloads):
        assert sender.publish(b"interlink.node-a.relay.node-%d" % (index % 3), payload)
    await until(lambda: len(inbox.messages) == len(payloads), timeout_s=10)
    assert inbox.messages == [(f"interlink.node-a.relay.node-{index % 3}", payload)
                              for index, payload in enumerate(payloads)]
    assert sender.max_payload == 1024 * 1024  # from the server's INFO
    assert not sender.publish(b"interlink.node-a.relay.node-b", b"x" * (sender.max_payload + 1))
    await sender.close(), await receiver.close()
    assert not sender.connected and not sender.publish(b"interlink.node-a.relay.node-b", b"after close")


async def test_an_unsubscribed_subject_delivers_nothing_more(nats_server):
    sender, receiver = await connected(nats_server.url), await connected(nats_server.url)
    inbox = Inbox()
    sid = receiver.subscribe(b"s", inbox)
    assert await receiver.flush(2.0)
    sender.publish(b"s", b"1")
    await until(lambda: inbox.messages)
    receiver.unsubscribe(sid)
    assert await receiver.flush(2.0)
    sender.publish(b"s", b"2")
    assert await sender.flush(2.0) and await receiver.flush(2.0)
    assert inbox.messages == [("s", b"1")]
    await sender.close(), await receiver.close()


async def test_what_was_on_its_way_when_a_handler_unsubscribed_is_not_handed_on(nats_server):
    """A twin standing down unsubscribes from its relay subject inside the handler of the answer
    that tells it so (``ClusterLink._stand_down``): the stanzas the server sent before it read the
    UNSUB — in the same read, most of them — must not be served by it."""
    sender, receiver = await connected(nats_server.url), await connected(nats_server.url)
    got: list[bytes] = []
    sid = 0

    def first_only(subject: str, reply: str | None, payload: bytes | None) -> None:
        got.append(payload)
        receiver.unsubscribe(sid)

    sid = receiver.subscribe(b"relay", first_only)
    after = Inbox()
    receiver.subscribe(b"after", after)
    assert await receiver.flush(2.0)
    for index in range(200):
        sender.publish(b"relay", b"%d" % index)
    sender.publish(b"after", b"the connection still serves")
    await until(lambda: after.messages, timeout_s=10)
    assert got == [b"0"] and receiver.counters["handler_errors"] == 0
    assert after.messages == [("after", b"the connection still serves")]
    await sender.close(), await receiver.close()


async def test_a_handler_that_raises_loses_only_its_own_message(nats_server, caplog):
    sender, receiver = await connected(nats_server.url), await connected(nats_server.url)
    inbox = Inbox()

    def handler(subject: str, reply: str | None, payload: bytes | None) -> None:
        if payload == b"bad":
            raise ValueError("a handler's bug")
        inbox(subject, reply, payload)

    receiver.subscribe(b"s", handler)
    assert await receiver.flush(2.0)
    with caplog.at_level(logging.ERROR, logger="interlink.cluster"):
        for payload in (b"1", b"bad", b"2"):
            sender.publish(b"s", payload)
        await until(lambda: len(inbox.messages) == 2)
    assert inbox.messages == [("s", b"1"), ("s", b"2")] and receiver.connected
    assert receiver.counters["handler_errors"] == 1 and "handling a NATS message on s failed" in caplog.text
    await sender.close(), await receiver.close()


async def test_password_and_token_logins_and_a_refused_one(tmp_path):
    nats = LocalNats(tmp_path / "nats", extra_config=(
        'authorization {\n  users = [\n    {user: "node-a", password: "pa55-a"}\n  ]\n}\n'))
    await nats.start()
    try:
        address = f"127.0.0.1:{nats.port}"
        connection = await connected(f"nats://node-a:pa55-a@{address}")
        assert await connection.flush(2.0)
        await connection.close()
        with pytest.raises(NatsProtocolError, match="refused this node: Authorization Violation"):
            await connected(f"nats://node-a:wrong@{address}")
        with pytest.raises(NatsProtocolError, match="Authorization Violation"):
            await connected(f"nats://a-token@{address}")
    finally:
        await nats.stop()
    token_server = LocalNats(tmp_path / "token", extra_config='authorization {\n  token: "s3cret"\n}\n')
    await token_server.start()
    try:
        connection = await connected(f"nats://s3cret@127.0.0.1:{token_server.port}")
        assert await connection.flush(2.0)
        await connection.close()
    finally:
        await token_server.stop()


async def test_a_tls_url_to_a_server_without_tls_is_refused(nats_server):
    with pytest.raises(NatsProtocolError, match="does not offer TLS, which this node requires of it"):
        await connected(f"tls://127.0.0.1:{nats_server.port}")


async def test_nothing_listening_is_a_connection_fault_after_the_tries(nats_server):
    port = nats_server.port
    await nats_server.stop()
    connection = NatsConnection([f"nats://127.0.0.1:{port}"], name="test", connect_timeout_s=1.0)
    with pytest.raises(OSError):
        await connection.connect(attempts=1)
    assert not connection.connected


async def test_reconnects_after_the_server_is_killed_resubscribes_and_sends_what_waited(tmp_path, monkeypatch):
    nats = LocalNats(tmp_path / "nats")
    await nats.start()
    fixed = LocalNats(tmp_path / "nats", port=nats.port)  # started again on the same port
    events: list[str] = []
    # One connection that hears itself (echo): its SUB and what it published while away go out
    # with the same connect, in that order, so nothing depends on which client reconnects first.
    connection = await connected(nats.url, on_disconnected=lambda: events.append("down"),
                                 on_reconnected=lambda: events.append("up"), echo=True)
    inbox = Inbox()
    connection.subscribe(b"s", inbox)
    assert connection.publish(b"s", b"before")
    await until(lambda: inbox.messages == [("s", b"before")])
    try:
        os.kill(nats.pid, signal.SIGKILL)
        await until(lambda: events == ["down"], timeout_s=5)
        assert connection.publish(b"s", b"while away 1") and connection.publish(b"s", b"while away 2")
        monkeypatch.setattr(natsconn, "MAX_PENDING_BYTES", 100)  # the bound on what waits: beyond, dropped
        assert not connection.publish(b"s", b"x" * 100)
        await fixed.start()
        await until(lambda: events == ["down", "up"] and connection.connected, timeout_s=10)
        assert connection.publish(b"s", b"after")
        await until(lambda: len(inbox.messages) == 4, timeout_s=5)
        assert [payload for _, payload in inbox.messages] == [b"before", b"while away 1", b"while away 2", b"after"]
    finally:
        await connection.close()
        await fixed.stop()
        await nats.stop()


async def test_what_waited_longer_than_the_request_timeout_is_dropped_at_the_connect(tmp_path):
    nats = LocalNats(tmp_path / "nats")
    await nats.start()
    again = LocalNats(tmp_path / "nats", port=nats.port)
    events: list[str] = []
    now = [100.0]  # the connection's clock, moved by hand: what counts is the age at the connect
    connection = await connected(nats.url, echo=True, max_wait_s=2.0, clock=lambda: now[0],
                                 on_disconnected=lambda: events.append("down"), on_reconnected=lambda: events.append("up"))
    inbox = Inbox()
    connection.subscribe(b"s", inbox)
    try:
        os.kill(nats.pid, signal.SIGKILL)
        await until(lambda: events == ["down"], timeout_s=5)
        assert connection.publish(b"s", b"stale")  # its sender is answered overloaded before NATS is back
        now[0] += 1.5
        assert connection.publish(b"s", b"fresh")
        now[0] += 1.0  # at the connect: 2.5 s and 1 s old
        await again.start()
        await until(lambda: events == ["down", "up"], timeout_s=10)
        assert await connection.flush(2.0)
        assert inbox.messages == [("s", b"fresh")] and connection.counters["expired_while_away"] == 1
    finally:
        await connection.close()
        await again.stop()
        await nats.stop()


async def test_a_server_without_headers_is_not_asked_for_them(tmp_path):
    plain = LocalNats(tmp_path / "plain", extra_config="no_header_support: true\n")
    await plain.start()
    try:
        connection = await connected(plain.url)  # asking for headers there is refused
        assert await connection.flush(2.0)
        await connection.close()
    finally:
        await plain.stop()


async def test_a_server_that_stops_answering_is_dropped_and_found_again(nats_server, monkeypatch):
    monkeypatch.setattr(natsconn, "PING_INTERVAL_S", 0.2)
    events: list[str] = []
    connection = await connected(nats_server.url, on_disconnected=lambda: events.append("down"),
                                 on_reconnected=lambda: events.append("up"))
    os.kill(nats_server.pid, signal.SIGSTOP)  # the socket stays open; nothing answers
    try:
        await until(lambda: events == ["down"], timeout_s=5)
        assert connection.counters["stale"] == 1
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
    await until(lambda: events == ["down", "up"] and connection.connected, timeout_s=10)
    assert await connection.flush(2.0)
    await connection.close()


class ScriptedServer:
    """Something listening where a NATS server should be that writes what a test tells it (a real
    nats-server cannot be made to break the protocol, or a man in the middle be played by it):
    ``greeting`` on accept, ``on_connect`` once this side's CONNECT...PING has arrived."""

    def __init__(self, greeting: bytes, on_connect: bytes = b"", *, hold_pong: asyncio.Event | None = None) -> None:
        self.greeting, self.on_connect, self.hold_pong = greeting, on_connect, hold_pong
        self.received = b""
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc_info) -> None:
        self.server.close()

    async def _serve(self, reader, writer) -> None:
        writer.write(self.greeting)
        try:
            while b"PING\r\n" not in self.received:
                chunk = await reader.read(4096)
                if not chunk:
                    return
                self.received += chunk
            if self.hold_pong is not None:
                await self.hold_pong.wait()
            writer.write(self.on_connect)
            await reader.read(4096)  # until this side hangs up
        finally:
            writer.close()


INFO = b'INFO {"server_id":"fake","max_payload":1048576}\r\n'
FORGED = b"MSG interlink.node-a.relay.node-b 1 7\r\nforged!\r\n"


async def test_a_msg_before_the_connect_is_refused_and_never_handed_on():
    inbox = Inbox()
    for greeting in (INFO + FORGED,  # in the same segment as INFO
                     b'INFO {"server_id":"fake","tls_required":true}\r\n' + FORGED):  # before TLS would start
        async with ScriptedServer(greeting) as url:
            connection = NatsConnection([url], name="test", connect_timeout_s=2.0)
            connection.subscribe(b"interlink.node-a.relay.*", inbox)
            with pytest.raises(NatsProtocolError, match="sent msg before this node's CONNECT"):
                await connection.connect()
    assert inbox.messages == [] and not connection.connected


async def test_a_msg_between_connect_and_pong_is_held_until_the_connection_serves():
    got: list[tuple] = []

    def handler(subject: str, reply: str | None, payload: bytes | None) -> None:
        got.append((subject, payload, connection.connected))  # an answer could leave already

    async with ScriptedServer(INFO, FORGED + b"PONG\r\n") as url:
        connection = NatsConnection([url], name="test", connect_timeout_s=2.0)
        connection.subscribe(b"interlink.node-a.relay.*", handler)
        await connection.connect()
        assert got == [("interlink.node-a.relay.node-b", b"forged!", True)]
        await connection.close()


async def test_a_server_full_before_the_connect_says_why():
    async with ScriptedServer(INFO + b"-ERR 'maximum connections exceeded'\r\n") as url:
        with pytest.raises(NatsProtocolError, match="refused this node: maximum connections exceeded"):
            await NatsConnection([url], name="test", connect_timeout_s=2.0).connect()


async def test_a_refused_login_hands_on_nothing_sent_with_the_refusal():
    inbox = Inbox()
    async with ScriptedServer(INFO, b"-ERR 'Authorization Violation'\r\n" + FORGED + b"PONG\r\n") as url:
        connection = NatsConnection([url], name="test", connect_timeout_s=2.0)
        connection.subscribe(b"interlink.node-a.relay.*", inbox)
        with pytest.raises(NatsProtocolError, match="refused this node: Authorization Violation"):
            await connection.connect()
    assert inbox.messages == []


async def test_a_ca_file_means_tls_whatever_the_url_says(nats_server):
    """nats:// with a CA configured, to a server without TLS: refused before CONNECT, so the
    password never crosses in plain text."""
    connection = NatsConnection([f"nats://node-a:secret@127.0.0.1:{nats_server.port}"], name="test",
                                tls=ssl.create_default_context(), connect_timeout_s=2.0)
    with pytest.raises(NatsProtocolError, match="does not offer TLS"):
        await connection.connect()


async def test_closing_while_connecting_leaves_no_connection():
    release = asyncio.Event()
    server = ScriptedServer(INFO, b"PONG\r\n", hold_pong=release)
    async with server as url:
        events: list[str] = []
        connection = NatsConnection([url], name="test", connect_timeout_s=5.0,
                                    on_reconnected=lambda: events.append("up"))
        connecting = asyncio.ensure_future(connection.connect())
        await until(lambda: b"PING\r\n" in server.received, "CONNECT...PING at the server")  # the PONG is held
        closing = asyncio.ensure_future(connection.close())
        release.set()
        with pytest.raises(ConnectionError):
            await connecting
        await closing
        assert not connection.connected and events == []


async def test_a_server_under_the_payload_bound_is_refused(tmp_path):
    small = LocalNats(tmp_path / "small", extra_config="max_payload: 1000\n")
    await small.start()
    try:
        connection = NatsConnection([small.url], name="test", min_max_payload=128 * 1024)
        with pytest.raises(NatsProtocolError, match="allows messages of 1000 bytes"):
            await connection.connect()
    finally:
        await small.stop()


async def test_nobody_listening_to_a_request_is_told_by_nats(nats_server):
    connection = await connected(nats_server.url)
    inbox = Inbox()
    reply = connection.new_inbox()
    connection.subscribe(reply + b".*", inbox)
    connection.publish(b"interlink.node-z.hello", b"anyone?", reply=reply + b".0")
    await until(lambda: inbox.messages, timeout_s=5)
    assert inbox.messages == [(reply.decode() + ".0", None)]  # status 503: no responders
    await connection.close()


def test_a_creds_file_read_again_at_a_reconnect_falls_back_to_the_last_one(tmp_path, caplog):
    path = tmp_path / "node.creds"
    path.write_text(CREDS)
    connection = NatsConnection(["nats://127.0.0.1:4222"], name="test", credentials=str(path))
    first = connection._read_credentials()
    path.unlink()  # a rotation caught half-way
    with caplog.at_level(logging.WARNING, logger="interlink.cluster"):
        assert connection._read_credentials() == first
    assert "cannot read" in caplog.text and "using the one read before" in caplog.text
    with pytest.raises(ConfigError, match="cannot read"):  # never read: the start says so
        NatsConnection(["nats://127.0.0.1:4222"], name="test", credentials=str(path))._read_credentials()


CREDS = ("-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.c2ln\n------END NATS USER JWT------\n\n"
         "************************* IMPORTANT *************************\n"
         "-----BEGIN USER NKEY SEED-----\nSUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU\n"
         "------END USER NKEY SEED------\n")


def test_a_creds_file_needs_its_jwt_and_seed(tmp_path):
    path = tmp_path / "node.creds"
    path.write_text(CREDS)
    assert read_credentials(str(path)) == ("eyJ0eXAiOiJKV1QifQ.e30.c2ln",
                                           b"SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU")
    path.write_text("-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.c2ln\n------END NATS USER JWT------\n")
    with pytest.raises(ConfigError, match="is not a NATS .creds file"):
        read_credentials(str(path))
    with pytest.raises(ConfigError, match="cluster.nats_credentials: cannot read"):
        read_credentials(str(tmp_path / "absent.creds"))
    path.write_text("-" * 100_000 + "BEGIN NATS USER JWT" + "-" * 100_000)  # read line by line: no backtracking
    with pytest.raises(ConfigError, match="is not a NATS .creds file"):
        read_credentials(str(path))


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:4222", "nats:// or tls://"),
    ("nats://:4222", "nats:// or tls://"),
    ("nats://127.0.0.1:port", "not a number"),
])
def test_a_url_that_names_no_nats_server_is_a_config_error(url, message):
    with pytest.raises(ConfigError, match=message):
        NatsConnection([url], name="test")
