"""The data path's own NATS connection (core/edge/natsconn.py) against a real nats-server on
loopback: publishing and subscribing in order, the bounds of ``publish``, logins (password,
token; ``.creds`` files and TLS run in tests/e2e/test_cluster_security.py), a refused login, a
URL asking for TLS of a server without it, reconnecting after the server is killed and after it
stops answering, and a handler's exception costing nothing but its message."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from interlink.core.edge import natsconn
from interlink.core.edge.natsconn import NatsConnection, read_credentials
from interlink.core.errors import ConfigError, NatsProtocolError
from interlink.load.nats import LocalNats
from interlink.testing import until


class Inbox:
    """What a subscription received, in order."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def __call__(self, subject: str, payload: bytes) -> None:
        self.messages.append((subject, payload))


@pytest.fixture
async def server(tmp_path):
    nats = LocalNats(tmp_path / "nats")
    await nats.start()
    yield nats
    await nats.stop()


async def connected(url: str, **options) -> NatsConnection:
    connection = NatsConnection([url], name="test", connect_timeout_s=2.0, **options)
    await connection.connect()
    return connection


async def test_messages_arrive_in_the_order_published_with_their_subjects(server):
    sender, receiver = await connected(server.url), await connected(server.url)
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


async def test_an_unsubscribed_subject_delivers_nothing_more(server):
    sender, receiver = await connected(server.url), await connected(server.url)
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


async def test_a_handler_that_raises_loses_only_its_own_message(server, caplog):
    sender, receiver = await connected(server.url), await connected(server.url)
    inbox = Inbox()

    def handler(subject: str, payload: bytes) -> None:
        if payload == b"bad":
            raise ValueError("a handler's bug")
        inbox(subject, payload)

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


async def test_a_tls_url_to_a_server_without_tls_is_refused(server):
    with pytest.raises(NatsProtocolError, match="does not offer TLS, and the URL asks for it"):
        await connected(f"tls://127.0.0.1:{server.port}")


async def test_nothing_listening_is_a_connection_fault_after_the_tries(server):
    port = server.port
    await server.stop()
    connection = NatsConnection([f"nats://127.0.0.1:{port}"], name="test", connect_timeout_s=1.0)
    with pytest.raises(OSError):
        await connection.connect(attempts=1)
    assert not connection.connected


async def test_reconnects_after_the_server_is_killed_and_resubscribes(tmp_path):
    nats = LocalNats(tmp_path / "nats")
    await nats.start()
    fixed = LocalNats(tmp_path / "nats", port=nats.port)  # started again on the same port
    events: list[str] = []
    receiver = await connected(nats.url, on_disconnected=lambda: events.append("down"),
                               on_reconnected=lambda: events.append("up"))
    sender = await connected(nats.url)
    inbox = Inbox()
    receiver.subscribe(b"s", inbox)
    assert await receiver.flush(2.0)
    try:
        os.kill(nats.pid, signal.SIGKILL)
        await until(lambda: events == ["down"] and not sender.connected, timeout_s=5)
        assert not sender.publish(b"s", b"while away")  # refused, not buffered: its deadline answers it
        await fixed.start()
        await until(lambda: events == ["down", "up"] and sender.connected, timeout_s=10)
        assert await receiver.flush(2.0)  # the SUB went with the connect
        sender.publish(b"s", b"after")
        await until(lambda: inbox.messages == [("s", b"after")], timeout_s=5)
    finally:
        await sender.close(), await receiver.close()
        await fixed.stop()
        await nats.stop()


async def test_a_server_that_stops_answering_is_dropped_and_found_again(server, monkeypatch):
    monkeypatch.setattr(natsconn, "PING_INTERVAL_S", 0.2)
    events: list[str] = []
    connection = await connected(server.url, on_disconnected=lambda: events.append("down"),
                                 on_reconnected=lambda: events.append("up"))
    os.kill(server.pid, signal.SIGSTOP)  # the socket stays open; nothing answers
    try:
        await until(lambda: events == ["down"], timeout_s=5)
        assert connection.counters["stale"] == 1
    finally:
        os.kill(server.pid, signal.SIGCONT)
    await until(lambda: events == ["down", "up"] and connection.connected, timeout_s=10)
    assert await connection.flush(2.0)
    await connection.close()


def test_a_creds_file_needs_its_jwt_and_seed(tmp_path):
    path = tmp_path / "node.creds"
    path.write_text("-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.c2ln\n------END NATS USER JWT------\n\n"
                    "************************* IMPORTANT *************************\n"
                    "-----BEGIN USER NKEY SEED-----\nSUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU\n"
                    "------END USER NKEY SEED------\n")
    assert read_credentials(str(path)) == ("eyJ0eXAiOiJKV1QifQ.e30.c2ln",
                                           b"SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU")
    path.write_text("-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.c2ln\n------END NATS USER JWT------\n")
    with pytest.raises(ConfigError, match="is not a NATS .creds file"):
        read_credentials(str(path))
    with pytest.raises(ConfigError, match="cluster.nats_credentials: cannot read"):
        read_credentials(str(tmp_path / "absent.creds"))


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:4222", "nats:// or tls://"),
    ("nats://:4222", "nats:// or tls://"),
    ("nats://127.0.0.1:port", "not a number"),
])
def test_a_url_that_names_no_nats_server_is_a_config_error(url, message):
    with pytest.raises(ConfigError, match=message):
        NatsConnection([url], name="test")
