"""End to end over real TCP on 127.0.0.1: real Noise handshakes, a real OpenID issuer over HTTP,
a real LMDB environment, the gateway on uvloop, the ``interlink.Client`` SDK."""

from __future__ import annotations

import asyncio
import time

import jwt
import msgpack
import pytest

from interlink.client import Client, Suite
from interlink.config import GatewayConfig
from interlink.core.domain.auth import Provider
from interlink.core.protocol.certs import generate_root_key, generate_static_key, x25519_public
from interlink.core.errors import AuthError, CertificateError, HandshakeError, SessionClosedError
from interlink.core.protocol.framing import FrameDecoder, encode_frame
from interlink.core.protocol.stanza import encode_stanza
from interlink.gateway import Gateway
from interlink.load.peer import LeanPeer
from interlink.testing import DemoIssuer

AUD = "interlink-test"


@pytest.fixture
async def issuers():
    async with DemoIssuer() as alpha, DemoIssuer() as beta:
        yield alpha, beta


@pytest.fixture
async def gateway(issuers, tmp_path):
    alpha, beta = issuers
    config = GatewayConfig(
        port=0,
        data_dir=tmp_path,
        preauth_deadline_s=1.0,
        jwks_unknown_kid_gap_s=0.5,  # a rotated key's token waits at most this, within the deadline
        max_devices=3,
        providers=[
            Provider(id="alpha", issuer=alpha.issuer, audience=AUD, discovery=True),
            Provider(id="beta", issuer=beta.issuer, audience=AUD, discovery=True, algorithms=("ES256",)),
        ],
    )
    async with Gateway(config) as gw:
        yield gw


def alpha_gateway(alpha: DemoIssuer, tmp_path, **settings) -> Gateway:
    """A gateway serving provider 'alpha' only, with some settings changed."""
    provider = Provider(id="alpha", issuer=alpha.issuer, audience=AUD, discovery=True)
    return Gateway(GatewayConfig(port=0, data_dir=tmp_path, providers=[provider], **settings))


async def connect(gateway: Gateway, token: str, device: int = 1, **options) -> Client:
    host, port = gateway.address
    options.setdefault("root_public", gateway.root_public)
    return await Client.connect(host, port, token=token, device=device, **options)


async def refusal(gateway: Gateway, token: str, device: int = 1, **options) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await connect(gateway, token, device, **options)
    return caught.value


@pytest.mark.parametrize("suite", list(Suite))
async def test_every_suite_gets_welcome_and_pong(gateway, issuers, suite):
    alpha, _ = issuers
    client = await connect(gateway, alpha.issue("alice", audience=AUD), device=2, suite=suite, server_static=gateway.static_public)
    try:
        assert client.welcome["user"] == "alice@alpha"
        assert client.welcome["device"] == 2
        assert len(client.welcome["session"]) == 16
        assert client.welcome["pending"] == 0
        assert {"max_frame", "max_devices", "max_group", "window"} <= set(client.limits)
        assert client.limits["max_devices"] == 3
        assert await client.ping() > 0
        assert gateway.stats()["sessions"] == 1
    finally:
        await client.close()


async def test_users_of_two_providers_connect(gateway, issuers):
    alpha, beta = issuers
    alice = await connect(gateway, alpha.issue("alice", audience=AUD))
    bob = await connect(gateway, beta.issue("bob", audience=AUD, alg="ES256"), suite=Suite.XX_AESGCM)
    assert (alice.user, bob.user) == ("alice@alpha", "bob@beta")
    assert {(s["user"], s["device"]) for s in gateway.sessions()} == {("alice@alpha", 1), ("bob@beta", 1)}
    await alice.close()
    await bob.close()


async def test_ik_with_a_stale_gateway_key_falls_back_to_xx(gateway, issuers):
    alpha, _ = issuers
    stale = x25519_public(generate_static_key())
    client = await connect(gateway, alpha.issue("alice", audience=AUD), suite=Suite.IK_CHACHAPOLY, server_static=stale)
    assert client.welcome["user"] == "alice@alpha"
    await client.close()
    with pytest.raises(HandshakeError):
        await connect(gateway, alpha.issue("alice", audience=AUD), suite=Suite.IK_CHACHAPOLY, server_static=stale, ik_fallback=False)
    stats = gateway.stats()
    assert stats["close_reasons"]["handshake_failed"] == 2
    # Operators read plain strings (JSON, /varz, logs), never the enum's repr.
    assert all(type(key) is str for part in ("close_reasons", "refusals", "auth_failures") for key in stats[part])


async def test_client_refuses_a_gateway_of_another_operator(gateway, issuers):
    alpha, _ = issuers
    other_root = generate_root_key().public_key().public_bytes_raw()
    with pytest.raises(CertificateError):
        await connect(gateway, alpha.issue("alice", audience=AUD), root_public=other_root)


async def test_auth_codes_end_to_end(gateway, issuers):
    alpha, beta = issuers
    assert (await refusal(gateway, alpha.issue("a", audience=AUD, expires_in=-300))).code == "token_expired"
    assert (await refusal(gateway, alpha.issue("a", audience=AUD, not_before=time.time() + 600))).code == "auth_failed"
    assert (await refusal(gateway, alpha.issue("a", audience="elsewhere"))).code == "bad_audience"
    async with DemoIssuer() as stranger:
        assert (await refusal(gateway, stranger.issue("a", audience=AUD))).code == "unknown_issuer"
    # beta allows only ES256: an EdDSA token of beta is refused on its algorithm
    assert (await refusal(gateway, beta.issue("b", audience=AUD, alg="EdDSA"))).code == "bad_signature"
    token = alpha.issue("a", audience=AUD)
    head, body, sig = token.split(".")
    tampered = f"{head}.{body}.{sig[:-4]}{'AAAA' if sig[-4:] != 'AAAA' else 'BBBB'}"
    assert (await refusal(gateway, tampered)).code == "bad_signature"
    assert (await refusal(gateway, "x" * 9000)).code == "too_large"
    assert (await refusal(gateway, alpha.issue("a@b", audience=AUD))).code == "auth_failed"
    stats = gateway.stats()
    assert stats["auth_failures"]["token_expired"] == 1
    assert stats["close_reasons"]["auth_failed"] >= 8


async def test_key_binding(gateway, issuers):
    import base64

    alpha, _ = issuers
    static = generate_static_key()
    bound = base64.urlsafe_b64encode(x25519_public(static)).rstrip(b"=").decode()
    client = await connect(gateway, alpha.issue("kb", audience=AUD, extra_claims={"cnf": {"x25519": bound}}), static_private=static)
    await client.close()
    other = generate_static_key()
    error = await refusal(gateway, alpha.issue("kb", audience=AUD, extra_claims={"cnf": {"x25519": bound}}), static_private=other)
    assert error.code == "key_binding"


async def test_suspended_provider_is_refused_and_its_sessions_end(gateway, issuers):
    alpha, beta = issuers
    alice = await connect(gateway, alpha.issue("alice", audience=AUD))
    bob = await connect(gateway, beta.issue("bob", audience=AUD, alg="ES256"))
    assert gateway.suspend_provider("alpha") == 1
    with pytest.raises(SessionClosedError) as caught:
        await alice.recv(timeout_s=5)
    assert caught.value.reason == "suspended"
    assert (await refusal(gateway, alpha.issue("alice", audience=AUD))).code == "provider_suspended"
    assert await bob.ping() > 0  # other providers are untouched
    gateway.resume_provider("alpha")
    alice = await connect(gateway, alpha.issue("alice", audience=AUD))
    await alice.close()
    await bob.close()


async def test_unknown_kid_is_found_after_the_issuer_rotates(gateway, issuers):
    alpha, _ = issuers
    first = await connect(gateway, alpha.issue("alice", audience=AUD))  # the gateway caches alpha's keys
    await first.close()
    new_kid = alpha.rotate()
    client = await connect(gateway, alpha.issue("alice", audience=AUD, kid=new_kid), device=2)
    assert client.welcome["user"] == "alice@alpha"
    await client.close()


async def test_made_up_kid_does_not_lock_out_a_rotated_key(gateway, issuers):
    """Anyone can send a token naming a made-up kid for a provider's issuer; a key the
    provider rotates in right after must still be usable within seconds (issue 17)."""
    alpha, _ = issuers
    first = await connect(gateway, alpha.issue("alice", audience=AUD))  # the gateway caches alpha's keys
    await first.close()
    forged = alpha.issue("mallory", audience=AUD, headers={"kid": "made-up"})
    assert (await refusal(gateway, forged)).code == "bad_signature"
    fetches = alpha.jwks_requests
    new_kid = alpha.rotate()
    client = await connect(gateway, alpha.issue("alice", audience=AUD, kid=new_kid), device=2)
    assert client.welcome["user"] == "alice@alpha"
    assert alpha.jwks_requests == fetches + 1
    await client.close()


async def test_device_limit(gateway, issuers):
    alpha, _ = issuers
    for device in (1, 2, 3):
        client = await connect(gateway, alpha.issue("dana", audience=AUD), device=device)
        await client.close()
    assert (await refusal(gateway, alpha.issue("dana", audience=AUD), device=4)).code == "device_limit"
    again = await connect(gateway, alpha.issue("dana", audience=AUD), device=2)  # a known device still connects
    await again.close()


async def test_second_connection_of_a_device_replaces_the_first(gateway, issuers):
    alpha, _ = issuers
    first = await connect(gateway, alpha.issue("erin", audience=AUD))
    second = await connect(gateway, alpha.issue("erin", audience=AUD))
    with pytest.raises(SessionClosedError) as caught:
        await first.recv(timeout_s=5)
    assert caught.value.reason == "replaced"
    assert await second.ping() > 0
    assert [s["device"] for s in gateway.sessions() if s["user"] == "erin@alpha"] == [1]
    await second.close()


async def test_token_expiry_while_connected(issuers, tmp_path):
    alpha, _ = issuers
    async with alpha_gateway(alpha, tmp_path, token_leeway_s=0.5) as gw:
        token = alpha.issue("fay", audience=AUD, expires_in=1)
        client = await connect(gw, token)
        # The token was accepted with 0.5 s of allowed skew; the session ends on that same line.
        with pytest.raises(SessionClosedError) as caught:
            await client.recv(timeout_s=10)
        assert caught.value.reason == "auth_expired"
        assert time.time() >= jwt.decode(token, options={"verify_signature": False})["exp"] + 0.5


async def test_drain_says_bye_drain(issuers, tmp_path):
    alpha, _ = issuers
    gw = alpha_gateway(alpha, tmp_path)
    await gw.start()
    clients = [await connect(gw, alpha.issue(f"u{i}", audience=AUD)) for i in range(5)]
    await gw.drain(timeout_s=5)
    for client in clients:
        with pytest.raises(SessionClosedError) as caught:
            await client.recv(timeout_s=5)
        assert caught.value.reason == "drain"


async def test_unknown_stanza_gets_bad_stanza_and_session_continues(gateway, issuers):
    from interlink.core.errors import ServerError

    alpha, _ = issuers
    client = await connect(gateway, alpha.issue("gus", audience=AUD))
    await client.send({"t": "no-such-thing"})
    with pytest.raises(ServerError) as caught:
        await client.recv(timeout_s=5)
    assert caught.value.code == "bad_stanza"
    with pytest.raises(ServerError) as caught:
        await client.iq("no.such.op")
    assert caught.value.code == "bad_stanza"
    assert await client.ping() > 0
    await client.close()


# --------------------------------------------------------------------- raw transport abuse


async def raw_exchange(gateway: Gateway, payload: bytes, *, wait_s: float = 3.0) -> bytes:
    """Send raw bytes, return what the gateway sent back before it closed the connection (a
    connection refused as it is accepted is reset: nothing came back)."""
    host, port = gateway.address
    received = b""
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(payload)
        await writer.drain()
        async with asyncio.timeout(wait_s):
            while chunk := await reader.read(65536):
                received += chunk
    except ConnectionResetError:
        assert received == b"", "a reset after the gateway answered"
    finally:
        if writer is not None:
            writer.close()
    return received


async def test_bad_preamble_is_closed(gateway):
    received = await raw_exchange(gateway, b"GET / HTTP/1.1\r\n\r\n")
    assert received == b""
    assert gateway.stats()["close_reasons"]["bad_preamble"] == 1


async def test_unknown_suite_is_closed(gateway):
    received = await raw_exchange(gateway, b"IL\x01\x21")
    assert received == b""
    assert gateway.stats()["close_reasons"]["unknown_suite"] == 1


async def test_zero_length_frame_is_closed(gateway):
    received = await raw_exchange(gateway, b"IL\x01\x01\x00\x00")
    assert received == b""
    assert gateway.stats()["close_reasons"]["bad_frame"] == 1


async def test_oversize_frame_rejected_before_body(issuers, tmp_path):
    alpha, _ = issuers
    async with alpha_gateway(alpha, tmp_path, max_frame_bytes=9000, preauth_deadline_s=30) as gw:
        received = await raw_exchange(gw, b"IL\x01\x01" + (9001).to_bytes(2, "big"), wait_s=10)  # no body
        assert received == b""
        # Closed by the length check as soon as the header arrived, not by the 30 s deadline.
        assert gw.stats()["close_reasons"] == {"bad_frame": 1}


async def test_garbage_handshake_is_closed(gateway):
    received = await raw_exchange(gateway, b"IL\x01\x11" + encode_frame(bytes(range(200))))
    assert received == b""
    assert gateway.stats()["close_reasons"]["handshake_failed"] == 1


async def test_preauth_deadline_closes_a_slowloris(gateway):
    host, port = gateway.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"IL\x01")
    closed = False
    for _ in range(40):  # keep dripping one byte per 100 ms, well past the 1 s deadline
        await asyncio.sleep(0.1)
        try:
            writer.write(b"\x01")
            await writer.drain()
            data = await asyncio.wait_for(reader.read(1), 0.01)
        except TimeoutError:
            continue  # still open, nothing said: keep dripping
        except ConnectionError:
            data = b""
        assert data == b"", "the gateway answered a half-sent handshake"
        closed = True
        break
    writer.close()
    assert closed, "the gateway never closed the dripping connection"
    assert gateway.stats()["close_reasons"]["auth_deadline"] == 1  # closed by the deadline, not by a frame error


async def test_bad_tag_after_handshake_gets_err_bad_frame(gateway, issuers):
    """Complete a real handshake with the sans-I/O client over a raw socket, then corrupt a tag."""
    from interlink.core.protocol.connection import ClientConnection
    from interlink.core.protocol.stanza import decode_stanzas

    alpha, _ = issuers
    conn = ClientConnection(
        suite=0x01, static_private=generate_static_key(), root_public=gateway.root_public,
        token=alpha.issue("hal", audience=AUD), device=1,
    )
    host, port = gateway.address
    reader, writer = await asyncio.open_connection(host, port)
    conn.start(time.time())
    writer.write(conn.data_to_send())
    while conn.welcome is None:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, "gateway closed during the handshake"
        conn.receive_data(data, time.time())
        writer.write(conn.data_to_send())
    conn.send_stanza({"t": "ping", "id": 1})
    wire = bytearray(conn.data_to_send())
    wire[-1] ^= 0x80
    writer.write(bytes(wire))
    received = b""
    async with asyncio.timeout(5):
        while chunk := await reader.read(65536):
            received += chunk
    writer.close()
    frames = FrameDecoder().feed(received)
    stanzas = [s for frame in frames for s in decode_stanzas(conn._session.recv_cipher.decrypt(frame))]
    assert [(s["t"], s.get("code")) for s in stanzas] == [("err", "bad_frame")]


async def test_many_concurrent_handshakes(gateway, issuers):
    alpha, beta = issuers
    tokens = [(alpha.issue(f"user{i}", audience=AUD), Suite(list(Suite)[i % 4])) for i in range(40)]
    clients = await asyncio.gather(
        *(connect(gateway, token, suite=suite, server_static=gateway.static_public) for token, suite in tokens)
    )
    assert len({c.user for c in clients}) == 40
    assert gateway.stats()["sessions"] == 40
    await asyncio.gather(*(c.close() for c in clients))


async def test_idle_sessions_hibernate_and_wake_up(issuers, tmp_path):
    alpha, _ = issuers
    async with alpha_gateway(alpha, tmp_path, idle_release_s=0.1) as gw:
        clients = [await connect(gw, alpha.issue(f"sleepy{i}", audience=AUD), suite=suite)
                   for i, suite in enumerate((Suite.XX_CHACHAPOLY, Suite.XX_AESGCM))]
        for client in clients:  # traffic after welcome loads the cipher contexts again
            assert await client.ping() > 0
        for _ in range(50):
            await asyncio.sleep(0.05)
            if gw.stats()["counters"].get("hibernations", 0) >= 2:
                break
        assert gw.stats()["counters"]["hibernations"] >= 2
        for client in clients:  # both directions work again after the cipher contexts were freed
            assert await client.ping() > 0
            assert await client.ping() > 0
        await asyncio.gather(*(c.close() for c in clients))


async def test_a_huge_unknown_type_gets_a_short_answer_and_the_session_continues(gateway, issuers):
    from interlink.core.errors import ServerError

    alpha, _ = issuers
    client = await connect(gateway, alpha.issue("ivy", audience=AUD))
    await client.send({"t": "\x00" * 17000, "id": b"x" * 16})
    with pytest.raises(ServerError) as caught:
        await client.recv(timeout_s=5)
    assert caught.value.code == "bad_stanza"
    assert len(str(caught.value)) < 100
    assert caught.value.fields["ref"] == b"x" * 16
    await client.send({"t": "y", "id": b"short"})  # a ref must be 16 bytes to be echoed
    with pytest.raises(ServerError) as caught:
        await client.recv(timeout_s=5)
    assert "ref" not in caught.value.fields
    assert await client.ping() > 0
    assert gateway.stats()["counters"].get("internal_errors", 0) == 0
    await client.close()


async def test_suspension_during_a_key_fetch_is_honoured(issuers, tmp_path):
    alpha, _ = issuers
    async with alpha_gateway(alpha, tmp_path) as gw:
        alpha.set_delay(0.5)  # the gateway's first key fetch takes a while
        attempt = asyncio.ensure_future(connect(gw, alpha.issue("jay", audience=AUD)))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if alpha.discovery_requests or alpha.jwks_requests:
                break
        gw.suspend_provider("alpha")
        with pytest.raises(AuthError) as caught:
            await attempt
        assert caught.value.code == "provider_suspended"
        alpha.set_delay(0)


async def test_issuer_down_is_internal_not_a_bad_token(issuers, tmp_path):
    alpha, _ = issuers
    async with alpha_gateway(alpha, tmp_path) as gw:
        alpha.set_available(False)
        assert (await refusal(gw, alpha.issue("kim", audience=AUD))).code == "internal"
        alpha.set_available(True)


async def test_a_failure_opening_a_session_ends_that_connection_not_the_next(gateway, issuers, monkeypatch, caplog):
    from interlink.core.errors import ServerError

    alpha, _ = issuers
    server = gateway._running()
    real_push = server.router.push_stored
    calls = []

    def push_stored(conn):  # stands for a bug of ours after the welcome was queued
        calls.append(conn)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        real_push(conn)

    monkeypatch.setattr(server.router, "push_stored", push_stored)
    token = alpha.issue("lee", audience=AUD)  # a first token: checked in a task of its own
    client = await connect(gateway, token, timeout_s=5)  # its welcome is written, not left waiting
    with pytest.raises(ServerError) as caught:
        await client.recv(timeout_s=5)
    assert caught.value.code == "internal" and "could not open the session" in str(caught.value)
    with pytest.raises(SessionClosedError):
        await client.recv(timeout_s=5)
    assert gateway.stats()["counters"]["internal_errors"] == 1
    assert "internal error while opening a session" in caplog.text
    client = await connect(gateway, token)  # the device's next session opens as usual
    assert await client.ping() > 0 and len(calls) == 2
    await client.close()


async def test_preauth_connection_limit(issuers, tmp_path):
    alpha, _ = issuers
    async with alpha_gateway(alpha, tmp_path, max_preauth_connections=2) as gw:
        host, port = gw.address
        idle = [await asyncio.open_connection(host, port) for _ in range(2)]
        for _, writer in idle:
            writer.write(b"IL\x01")  # half a preamble, then silence
        received = await raw_exchange(gw, b"IL\x01\x01")
        assert received == b""
        assert gw.stats()["close_reasons"]["over_capacity"] == 1
        for _, writer in idle:
            writer.close()
        for _ in range(100):  # once they are gone, new clients are admitted again
            await asyncio.sleep(0.02)
            if gw.stats()["connections"] == 0:
                break
        client = await connect(gw, alpha.issue("lou", audience=AUD))
        await client.close()


async def test_one_address_holding_silent_connections_is_refused_per_source(issuers, tmp_path):
    """Silent connections from one address use up that address's pre-auth slots, not the
    gateway's: past them that address is refused (and counted), until one of its goes."""
    alpha, _ = issuers
    async with alpha_gateway(alpha, tmp_path, source_limits_on_loopback=True, max_preauth_per_source=3) as gw:
        host, port = gw.address
        idle = [await asyncio.open_connection(host, port) for _ in range(3)]
        for _, writer in idle:
            writer.write(b"IL\x01")  # half a preamble, then silence
        assert await raw_exchange(gw, b"IL\x01\x01") == b""  # a fourth: closed at once
        stats = gw.stats()
        assert stats["source_refusals"] == {"preauth_per_source": 1}
        assert stats["close_reasons"]["source_limit"] == 1 and stats["preauth_sources"] == 1
        idle[0][1].close()
        assert await _until(lambda: gw.stats()["connections"] == 2)
        client = await connect(gw, alpha.issue("lou", audience=AUD))  # a slot of its address is free again
        assert gw.stats()["preauth_sources"] == 1  # authenticated: it holds no pre-auth slot
        await client.close()
        for _, writer in idle[1:]:
            writer.close()


async def test_a_handshake_storm_from_one_address_is_refused_at_its_rate(issuers, tmp_path):
    alpha, _ = issuers
    async with alpha_gateway(alpha, tmp_path, source_limits_on_loopback=True, handshakes_per_s_per_source=1.0) as gw:
        clients = [await connect(gw, alpha.issue("lou", audience=AUD), device=d) for d in (1, 2)]  # the burst: 2
        with pytest.raises(HandshakeError, match="closed the connection during the handshake"):
            await connect(gw, alpha.issue("lou", audience=AUD), device=3)
        assert gw.stats()["source_refusals"] == {"handshake_rate": 1}
        for client in clients:
            await client.close()


async def test_loopback_clients_are_not_limited_per_source_unless_asked(issuers, tmp_path):
    alpha, _ = issuers
    async with alpha_gateway(alpha, tmp_path, handshakes_per_s_per_source=1.0, max_preauth_per_source=1) as gw:
        clients = [await connect(gw, alpha.issue("lou", audience=AUD), device=d) for d in (1, 2, 3)]
        assert gw.stats()["source_refusals"] == {}
        for client in clients:
            await client.close()


async def test_replayed_ik_message_gets_no_session(gateway, issuers):
    from interlink.core.protocol.connection import ClientConnection

    alpha, _ = issuers
    conn = ClientConnection(
        suite=0x11, static_private=generate_static_key(), root_public=gateway.root_public,
        token=alpha.issue("max", audience=AUD), device=1, server_static=gateway.static_public,
    )
    conn.start(time.time())
    captured = conn.data_to_send()  # preamble + IK message 1, as an eavesdropper records it
    host, port = gateway.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(captured)
    while conn.welcome is None:  # the real client completes its session
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data
        conn.receive_data(data, time.time())
        writer.write(conn.data_to_send())
    replay = await raw_exchange(gateway, captured, wait_s=5)
    frames = FrameDecoder().feed(replay)
    assert len(frames) == 1  # message 2, which only the real client could read; no welcome, no err
    assert gateway.stats()["close_reasons"]["auth_deadline"] == 1
    assert [s["user"] for s in gateway.sessions()] == ["max@alpha"]  # the real session was not replaced
    conn.send_stanza({"t": "ping", "id": 77})
    writer.write(conn.data_to_send())
    conn.receive_data(await asyncio.wait_for(reader.read(65536), 5), time.time())
    assert [e.stanza for e in conn.events() if hasattr(e, "stanza")] == [{"t": "pong", "id": 77}]
    writer.close()


# ------------------------------------------------------------------ a stanza cut short (PROTOCOL §4)


def _packed(*elements) -> bytes:
    return b"".join(msgpack.packb(e, use_bin_type=True) for e in elements)


# Transport plaintexts that end inside a stanza, as an independent client sent them: the report's
# 4-entry map whose last value is missing, a block.add waiting for the value of a key it ignores,
# a ciphertext cut short, a map16 header with its entries cut.
CUT_SHORT = {
    "iq block.list, last value missing": b"\x84" + _packed("t", "iq", "id", 4242, "op", "block.list", "x"),
    "iq block.add, ignored key's value missing": b"\x85" + _packed("t", "iq", "id", 4243, "op", "block.add", "user", "zed@alpha", "x"),
    "msg, ciphertext cut short": b"\x84" + _packed("t", "msg", "id", bytes(16), "to", "victor@beta", "c") + b"\x81\x01\xc4\xc8" + b"x" * 10,
    "map16 header, entries cut": b"\xde\x00\x03" + _packed("t", "iq", "op", "block.list"),
}


async def _until(condition, timeout_s: float = 5.0) -> bool:
    """Wait (bounded) for something the gateway should do; the caller asserts what happened."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)
    return True


async def _barrier(peer: LeanPeer, inbox: list) -> None:
    """Ping and wait for the pong, then drop it: the gateway answers a session in order, so
    everything it had to send before is in ``inbox`` now."""
    inbox_before = len(inbox)
    peer.queue(encode_stanza({"t": "ping", "id": 2**40}))
    await _until(lambda: any(s == {"t": "pong", "id": 2**40} for s in inbox[inbox_before:]))
    inbox.remove({"t": "pong", "id": 2**40})


async def _lean(gateway: Gateway, token: str, inbox: list, **options) -> LeanPeer:
    host, port = gateway.address
    return await LeanPeer.connect(host, port, token=token, device=1, root_public=gateway.root_public,
                                  on_stanza=inbox.append, **options)


@pytest.mark.parametrize("cut", list(CUT_SHORT))
async def test_a_stanza_cut_short_never_runs_as_another_user(gateway, issuers, cut):
    """User M (alpha) sends one transport message that ends inside a stanza; user V (beta), on
    another connection, then pings. The report: V's ping completed M's map, which then ran as V.
    Now M gets bad_stanza, V gets exactly its pong, V's state is untouched, and both go on."""
    alpha, beta = issuers
    m_inbox, v_inbox = [], []
    mallory = await _lean(gateway, alpha.issue("mallory", audience=AUD), m_inbox)
    victor = await _lean(gateway, beta.issue("victor", audience=AUD, alg="ES256"), v_inbox)
    try:
        victor.queue(encode_stanza({"t": "iq", "id": 1, "op": "block.add", "user": "eve@alpha"}))
        await _until(lambda: v_inbox)
        assert v_inbox.pop() == {"t": "res", "id": 1}

        mallory.queue(CUT_SHORT[cut])  # alone in its transport message: exactly these bytes
        try:
            await _until(lambda: m_inbox, timeout_s=2.0)
        except TimeoutError:
            pass  # no answer to M: the assertions below say what became of its bytes
        victor.queue(encode_stanza({"t": "ping", "id": 77}))
        await _until(lambda: v_inbox)
        await _barrier(victor, v_inbox)
        assert v_inbox == [{"t": "pong", "id": 77}], "V's ping was not answered as V's own"
        assert [(s["t"], s.get("code")) for s in m_inbox] == [("err", "bad_stanza")]

        victor.queue(encode_stanza({"t": "iq", "id": 2, "op": "block.list"}))
        mallory.queue(encode_stanza({"t": "ping", "id": 5}))
        await _until(lambda: len(v_inbox) == 2 and len(m_inbox) == 2)
        assert v_inbox[1] == {"t": "res", "id": 2, "users": ["eve@alpha"], "more": False}
        assert m_inbox[1] == {"t": "pong", "id": 5}
        assert not mallory.closed and not victor.closed
    finally:
        await mallory.close()
        await victor.close()


async def test_a_stanza_never_runs_across_two_transport_messages(gateway, issuers):
    """One session: a map cut short, then a ping in the next transport message. The ping must not
    finish the map (which would run the iq); each message is answered on its own."""
    alpha, _ = issuers
    inbox: list = []
    mallory = await _lean(gateway, alpha.issue("mallory", audience=AUD), inbox)
    try:
        mallory.queue(CUT_SHORT["iq block.list, last value missing"])
        mallory.flush()
        mallory.queue(encode_stanza({"t": "ping", "id": 9}))
        await _until(lambda: len(inbox) >= 2)
        await _barrier(mallory, inbox)
        assert [(s["t"], s.get("code"), s.get("id")) for s in inbox] == [("err", "bad_stanza", None), ("pong", None, 9)]
    finally:
        await mallory.close()
