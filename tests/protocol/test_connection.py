"""The connection state machines driven in memory: bytes shuttled between a ClientConnection and a
ServerConnection, time passed in, no sockets and no event loop (DESIGN rule 1)."""

from __future__ import annotations

import msgpack
import pytest

from interlink.core.domain.auth import Identity
from interlink.core.protocol.certs import generate_root_key, generate_static_key, issue_node_certificate, x25519_public
from interlink.core.protocol.connection import (
    MAX_PREAUTH_FRAMES,
    AuthRequested,
    ClientConnection,
    ConnectionClosed,
    ServerConnection,
    State,
    StanzaReceived,
    Welcomed,
)
from interlink.core.errors import CloseReason, LocalProtocolError
from interlink.core.protocol.framing import FrameDecoder, encode_frame
from interlink.core.protocol.noise import SUITES
from interlink.core.protocol.stanza import decode_stanzas, encode_stanza
from interlink.testing import server_settings

NOW = 1_800_000_000.0
ROOT = generate_root_key()
ROOT_PUBLIC = ROOT.public_key().public_bytes_raw()
SERVER_STATIC = generate_static_key()
SERVER_PUBLIC = x25519_public(SERVER_STATIC)
CERT = issue_node_certificate(ROOT, SERVER_PUBLIC, "node-t", int(NOW) - 60, int(NOW) + 86400)
SETTINGS = server_settings(static_private=SERVER_STATIC, certificate=CERT, node="node-t", preauth_deadline_s=5.0)


def make_client(suite: int, **overrides) -> ClientConnection:
    options = dict(
        suite=suite,
        static_private=generate_static_key(),
        root_public=ROOT_PUBLIC,
        token="header.payload.signature",
        device=3,
        server_static=SERVER_PUBLIC if suite >= 0x11 else None,
    )
    options.update(overrides)
    return ClientConnection(**options)


def identity(expires_at: float = NOW + 3600) -> Identity:
    return Identity(
        provider="alpha",
        localpart="alice",
        device=3,
        expires_at=expires_at,
        phone_number=None,
        key_bound=False,
        claims={},
    )


def shuttle(client: ClientConnection, server: ServerConnection, now: float = NOW, *, chunk: int | None = None):
    """Move bytes both ways until neither side has anything to send; return the events of each."""
    client_events, server_events = [], []
    for _ in range(20):
        moved = False
        data = client.data_to_send()
        if data:
            moved = True
            pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
            for piece in pieces:
                server.receive_data(piece, now)
        server_events += server.events()
        data = server.data_to_send()
        if data:
            moved = True
            client.receive_data(data, now)
        client_events += client.events()
        if not moved:
            break
    return client_events, server_events


def open_session(suite: int = 0x01, **client_options):
    client = make_client(suite, **client_options)
    server = ServerConnection(SETTINGS, NOW)
    client.start(NOW)
    _, server_events = shuttle(client, server)
    requests = [e for e in server_events if isinstance(e, AuthRequested)]
    assert len(requests) == 1, server_events
    server.accept_auth(identity(), {"t": "welcome", "user": "alice@alpha", "device": 3}, NOW)
    client_events, _ = shuttle(client, server)
    assert any(isinstance(e, Welcomed) for e in client_events), client_events
    return client, server, requests[0]


def server_stanzas(raw: bytes, session) -> list:
    """Decode what the server wrote after the handshake, with the client's receive cipher."""
    stanzas = []
    for frame in FrameDecoder().feed(raw):
        stanzas += decode_stanzas(session.recv_cipher.decrypt(frame))
    return stanzas


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_suite_authenticates_and_pings(suite):
    client, server, request = open_session(suite)
    assert request.token == "header.payload.signature"
    assert request.device == 3
    assert request.client_static == client._session.static_public
    assert client.welcome["user"] == "alice@alpha"
    assert server.state is State.OPEN and client.state is State.OPEN
    client.send_stanza({"t": "ping", "id": 42})
    client_events, _ = shuttle(client, server)
    assert [e.stanza for e in client_events if isinstance(e, StanzaReceived)] == [{"t": "pong", "id": 42}]


@pytest.mark.parametrize("suite", [0x01, 0x11])
def test_byte_by_byte_delivery_completes_the_handshake(suite):
    client = make_client(suite)
    server = ServerConnection(SETTINGS, NOW)
    client.start(NOW)
    _, server_events = shuttle(client, server, chunk=1)
    assert any(isinstance(e, AuthRequested) for e in server_events)


def test_bad_preamble_closes_without_output():
    server = ServerConnection(SETTINGS, NOW)
    server.receive_data(b"XL\x01\x01" + b"\x00" * 40, NOW)
    closed = [e for e in server.events() if isinstance(e, ConnectionClosed)]
    assert [c.reason for c in closed] == [CloseReason.BAD_PREAMBLE]
    assert server.data_to_send() == b""
    assert server.closed


def test_wrong_version_is_a_bad_preamble():
    server = ServerConnection(SETTINGS, NOW)
    server.receive_data(b"IL\x02\x01", NOW)
    assert [e.reason for e in server.events()] == [CloseReason.BAD_PREAMBLE]


@pytest.mark.parametrize("suite", [0x03, 0x20, 0x2F, 0xFF])
def test_unknown_suite_closes(suite):
    server = ServerConnection(SETTINGS, NOW)
    server.receive_data(b"IL\x01" + bytes([suite]), NOW)
    assert [e.reason for e in server.events()] == [CloseReason.UNKNOWN_SUITE]


def test_preamble_split_across_reads():
    client = make_client(0x01)
    client.start(NOW)
    data = client.data_to_send()
    server = ServerConnection(SETTINGS, NOW)
    for byte in data[:4]:
        server.receive_data(bytes([byte]), NOW)
    assert server.state is State.HANDSHAKE
    server.receive_data(data[4:], NOW)
    assert server.data_to_send()  # message 2


def test_garbage_handshake_closes():
    server = ServerConnection(SETTINGS, NOW)
    server.receive_data(b"IL\x01\x11" + encode_frame(b"\x01" * 100), NOW)
    closed = [e for e in server.events() if isinstance(e, ConnectionClosed)]
    assert [c.reason for c in closed] == [CloseReason.HANDSHAKE_FAILED]
    assert server.data_to_send() == b""


def test_zero_length_frame_during_handshake_closes_without_err():
    server = ServerConnection(SETTINGS, NOW)
    server.receive_data(b"IL\x01\x01\x00\x00", NOW)
    closed = [e for e in server.events() if isinstance(e, ConnectionClosed)]
    assert [(c.reason, c.code) for c in closed] == [(CloseReason.BAD_FRAME, "bad_frame")]
    assert server.data_to_send() == b""


def test_oversize_length_rejected_from_the_header_alone():
    settings = server_settings(static_private=SERVER_STATIC, certificate=CERT, node="n", max_frame_bytes=1024)
    server = ServerConnection(settings, NOW)
    server.receive_data(b"IL\x01\x01\xff\xff", NOW)  # announces 65535 bytes, sends none of them
    closed = [e for e in server.events() if isinstance(e, ConnectionClosed)]
    assert [c.reason for c in closed] == [CloseReason.BAD_FRAME]
    assert "65535" in closed[0].message


@pytest.mark.parametrize("suite", [0x01, 0x12])
def test_zero_length_frame_after_handshake_gets_err_then_close(suite):
    client, server, _ = open_session(suite)
    server.receive_data(b"\x00\x00", NOW)
    closed = [e for e in server.events() if isinstance(e, ConnectionClosed)]
    assert closed and closed[0].reason == CloseReason.BAD_FRAME
    stanzas = server_stanzas(server.data_to_send(), client._session)
    assert stanzas[-1]["t"] == "err" and stanzas[-1]["code"] == "bad_frame"


@pytest.mark.parametrize("suite", [0x02, 0x11])
def test_bad_tag_after_handshake_gets_err_then_close(suite):
    client, server, _ = open_session(suite)
    client.send_stanza({"t": "ping", "id": 1})
    wire = bytearray(client.data_to_send())
    wire[-1] ^= 0x01  # flip one tag bit
    server.receive_data(bytes(wire), NOW)
    closed = [e for e in server.events() if isinstance(e, ConnectionClosed)]
    assert [c.reason for c in closed] == [CloseReason.BAD_FRAME]
    stanzas = server_stanzas(server.data_to_send(), client._session)
    assert [s["code"] for s in stanzas if s["t"] == "err"] == ["bad_frame"]


def test_preauth_deadline_is_not_extended_by_trickled_bytes():
    server = ServerConnection(SETTINGS, NOW)
    client = make_client(0x01)
    client.start(NOW)
    data = client.data_to_send()
    # A slowloris client: one byte per second, never finishing message 1.
    for i, byte in enumerate(data[:-1]):
        server.receive_data(bytes([byte]), NOW + i * 0.1)
        server.handle_timer(NOW + i * 0.1)
        if server.closed:
            break
    assert not server.closed
    assert server.next_deadline() == NOW + 5.0  # the bytes moved nothing
    server.handle_timer(NOW + 5.0)
    assert [e.reason for e in server.events() if isinstance(e, ConnectionClosed)] == [CloseReason.AUTH_DEADLINE]


def test_deadline_applies_while_the_token_is_being_verified():
    client = make_client(0x01)
    server = ServerConnection(SETTINGS, NOW)
    client.start(NOW)
    shuttle(client, server)
    assert server.state is State.AUTH
    server.handle_timer(NOW + 4.9)
    assert not server.closed
    server.handle_timer(NOW + 5.0)
    assert server.closed and server.close_reason == CloseReason.AUTH_DEADLINE
    server.accept_auth(identity(), {"t": "welcome"}, NOW + 5.1)  # too late: ignored
    assert server.state is not State.OPEN


def test_token_expiry_says_bye_auth_expired():
    client, server, _ = open_session(0x01)
    server.identity = None
    server.expires_at = NOW + 10
    server.handle_timer(NOW + 9)
    assert not server.closed
    server.handle_timer(NOW + 10)
    stanzas = server_stanzas(server.data_to_send(), client._session)
    assert stanzas == [{"t": "bye", "reason": "auth_expired"}]
    assert [e.reason for e in server.events() if isinstance(e, ConnectionClosed)] == ["auth_expired"]


def test_accept_auth_uses_identity_expiry_as_next_deadline():
    client, server, _ = open_session(0x01)
    assert server.next_deadline() == NOW + 3600


def test_reject_auth_sends_the_code_and_closes():
    client = make_client(0x02)
    server = ServerConnection(SETTINGS, NOW)
    client.start(NOW)
    shuttle(client, server)
    server.reject_auth("token_expired", "token expired 30 s ago")
    client_events, _ = shuttle(client, server)
    closed = [e for e in client_events if isinstance(e, ConnectionClosed)]
    assert [(c.reason, c.code, c.message) for c in closed] == [(CloseReason.AUTH_FAILED, "token_expired", "token expired 30 s ago")]
    assert server.closed


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({"token": 5, "device": 1}),
        msgpack.packb({"token": "t", "device": 0}),
        msgpack.packb({"token": "t", "device": 2**31}),
        msgpack.packb({"token": "t", "device": True}),
        msgpack.packb({"token": "t", "device": 1, "agent": "x" * 500}),
    ],
)
def test_malformed_auth_payload_gets_auth_failed(payload):
    client = make_client(0x01)
    client._auth_payload = payload
    server = ServerConnection(SETTINGS, NOW)
    client.start(NOW)
    client_events, server_events = shuttle(client, server)
    assert not any(isinstance(e, AuthRequested) for e in server_events)
    closed = [e for e in client_events if isinstance(e, ConnectionClosed)]
    assert [(c.reason, c.code) for c in closed] == [(CloseReason.AUTH_FAILED, "auth_failed")]


def test_ik_message_one_replay_is_never_acted_on():
    client = make_client(0x11)
    client.start(NOW)
    captured = client.data_to_send()  # preamble + IK message 1, as an eavesdropper records it
    replayed = ServerConnection(SETTINGS, NOW)
    replayed.receive_data(captured, NOW)
    assert replayed.data_to_send()  # message 2 goes back to the attacker, who cannot read it
    assert not any(isinstance(e, AuthRequested) for e in replayed.events())
    assert replayed.state is State.CONFIRM
    # Without the client's keys no transport message can follow; the deadline ends it.
    replayed.receive_data(encode_frame(b"\x00" * 40), NOW + 1)
    events = replayed.events()
    assert not any(isinstance(e, AuthRequested) for e in events)
    assert [e.reason for e in events if isinstance(e, ConnectionClosed)] == [CloseReason.BAD_FRAME]


def test_ik_acts_only_after_the_first_transport_message():
    client = make_client(0x12)
    server = ServerConnection(SETTINGS, NOW)
    client.start(NOW)
    server.receive_data(client.data_to_send(), NOW)
    assert not any(isinstance(e, AuthRequested) for e in server.events())
    client.receive_data(server.data_to_send(), NOW)  # message 2: the client answers with a ping
    server.receive_data(client.data_to_send(), NOW)
    assert any(isinstance(e, AuthRequested) for e in server.events())


def test_pipelined_stanzas_are_served_after_welcome_in_order():
    client = make_client(0x01)
    server = ServerConnection(SETTINGS, NOW)
    client.start(NOW)
    shuttle(client, server)  # handshake done, auth pending
    client.state = State.OPEN  # the application pipelines before the welcome arrives
    client.send_stanza({"t": "ping", "id": 7})
    client.send_stanza({"t": "hello", "x": 1})
    server.receive_data(client.data_to_send(), NOW)
    assert server.events() == []  # held until auth is decided
    server.accept_auth(identity(), {"t": "welcome", "user": "alice@alpha"}, NOW)
    assert [e.stanza for e in server.events()] == [{"t": "hello", "x": 1}]
    stanzas = server_stanzas(server.data_to_send(), client._session)
    assert [s["t"] for s in stanzas] == ["welcome", "pong"]


def test_too_many_messages_before_auth_closes():
    client = make_client(0x01)
    server = ServerConnection(SETTINGS, NOW)
    client.start(NOW)
    shuttle(client, server)
    cipher = client._session.send_cipher
    for i in range(MAX_PREAUTH_FRAMES + 1):
        server.receive_data(encode_frame(cipher.encrypt(encode_stanza({"t": "ping", "id": i}))), NOW)
    assert server.closed and server.close_reason == "protocol_error"


def test_malformed_stanzas_get_bad_stanza_and_the_session_continues():
    client, server, _ = open_session(0x01)
    cipher = client._session.send_cipher
    for plaintext in (b"\xc1", msgpack.packb([1]), msgpack.packb({"x": 1}), msgpack.packb({"t": "ping"})[:-1]):
        server.receive_data(encode_frame(cipher.encrypt(plaintext)), NOW)
    client.send_stanza({"t": "ping", "id": 9})
    server.receive_data(client.data_to_send(), NOW)
    assert not server.closed
    stanzas = server_stanzas(server.data_to_send(), client._session)
    assert [s.get("code") for s in stanzas[:4]] == ["bad_stanza"] * 4
    assert stanzas[4] == {"t": "pong", "id": 9}


def test_stanzas_before_a_malformed_one_are_still_served():
    client, server, _ = open_session(0x01)
    plaintext = encode_stanza({"t": "ping", "id": 1}) + b"\xc1"
    server.receive_data(encode_frame(client._session.send_cipher.encrypt(plaintext)), NOW)
    stanzas = server_stanzas(server.data_to_send(), client._session)
    assert [s["t"] for s in stanzas] == ["pong", "err"]


def send_plaintext(client: ClientConnection, server: ServerConnection, plaintext: bytes) -> None:
    """One transport message with exactly these plaintext bytes, whole stanzas or not."""
    server.receive_data(encode_frame(client._session.send_cipher.encrypt(plaintext)), NOW)


def exchange(client: ClientConnection, server: ServerConnection) -> tuple[list, list]:
    """(what the client received, what the server handed to the edge) until both are quiet."""
    client_events, server_events = shuttle(client, server)
    received = [e.stanza for e in client_events if isinstance(e, StanzaReceived)]
    return received, [e.stanza for e in server_events if isinstance(e, StanzaReceived)]


# Whole stanzas of several shapes (nested maps, lists, bin, long str), one after the other.
CUT_STANZAS = [
    {"t": "iq", "id": 4242, "op": "block.list"},
    {"t": "msg", "id": bytes(16), "to": "victor@globex", "c": {1: b"\x00" * 40, 2: b"y" * 300}},
    {"t": "iq", "id": 7, "op": "keys.put", "ik": b"k" * 32, "spk": {"id": 1, "key": b"s" * 32, "sig": b"g" * 64},
     "otpk": [{"id": 1, "key": b"o" * 32}]},
    {"t": "recv", "seq": [1, 300, 70000, 2**33]},
]


def test_a_stanza_cut_at_any_offset_is_answered_and_never_completed_by_another_session():
    """Session M sends every prefix of several stanzas as one transport message; session V, on
    another connection of the same process, then pings. V's bytes must never finish M's stanza:
    V gets exactly its pong and hands nothing to the edge; M gets the whole stanzas before the
    cut served and one bad_stanza; M's next message is read on its own."""
    m_client, m_server, _ = open_session(0x01)
    v_client, v_server, _ = open_session(0x02)
    plaintext = b"".join(encode_stanza(s) for s in CUT_STANZAS)
    ends = [len(b"".join(encode_stanza(s) for s in CUT_STANZAS[: i + 1])) for i in range(len(CUT_STANZAS))]
    for cut in range(1, len(plaintext)):
        send_plaintext(m_client, m_server, plaintext[:cut])
        whole = [s for s, end in zip(CUT_STANZAS, ends) if end <= cut]
        m_received, m_handed = exchange(m_client, m_server)
        assert m_handed == whole, cut
        assert m_received == ([] if cut in ends else [{"t": "err", "code": "bad_stanza", "msg": "transport message ends inside a stanza"}]), cut
        v_client.send_stanza({"t": "ping", "id": cut})
        assert exchange(v_client, v_server) == ([{"t": "pong", "id": cut}], []), cut
        m_client.send_stanza({"t": "ping", "id": -cut})
        assert exchange(m_client, m_server) == ([{"t": "pong", "id": -cut}], []), cut
    assert not m_server.closed and not v_server.closed


def test_a_stanza_never_spans_two_transport_messages_of_one_session():
    client, server, _ = open_session(0x01)
    cut = b"\x84" + b"".join(msgpack.packb(x) for x in ("t", "iq", "id", 4242, "op", "block.list", "x"))
    send_plaintext(client, server, cut)
    send_plaintext(client, server, encode_stanza({"t": "ping", "id": 1}))
    received, handed = exchange(client, server)
    assert handed == []  # the map was not completed by the ping into an iq
    assert [s["t"] for s in received] == ["err", "pong"] and received[1]["id"] == 1


def test_queued_stanzas_are_coalesced_into_few_transport_messages():
    client, server, _ = open_session(0x01)
    for i in range(1000):
        server.send_stanza({"t": "pong", "id": i})
    frames = FrameDecoder().feed(server.data_to_send())
    assert len(frames) == 4  # 256 stanzas per transport message at most, whatever their size
    stanzas = [s for frame in frames for s in decode_stanzas(client._session.recv_cipher.decrypt(frame))]
    assert [s["id"] for s in stanzas] == list(range(1000))
    big = b"x" * 30000
    for i in range(5):
        server.send_stanza({"t": "dlv", "c": big})
    frames = FrameDecoder().feed(server.data_to_send())
    assert len(frames) == 3  # two 30 KB stanzas per 64 KiB message
    assert all(len(f) <= 65535 for f in frames)


def test_a_client_burst_never_passes_the_stanza_count_the_gateway_accepts():
    client, server, _ = open_session(0x01)
    for i in range(1000):
        client.send_stanza({"t": "ping", "id": i})
    server.receive_data(client.data_to_send(), NOW)
    assert not server.closed
    stanzas = server_stanzas(server.data_to_send(), client._session)
    assert [s["id"] for s in stanzas] == list(range(1000))


def test_close_sends_bye_with_reason():
    client, server, _ = open_session(0x01)
    server.close("drain")
    client_events, _ = shuttle(client, server)
    assert [e.reason for e in client_events if isinstance(e, ConnectionClosed)] == ["drain"]


def test_client_refuses_a_gateway_certified_by_another_root():
    other_root = generate_root_key().public_key().public_bytes_raw()
    client = make_client(0x01, root_public=other_root)
    server = ServerConnection(SETTINGS, NOW)
    client.start(NOW)
    client_events, _ = shuttle(client, server)
    assert [e.reason for e in client_events if isinstance(e, ConnectionClosed)] == [CloseReason.HANDSHAKE_FAILED]
    assert client.failure is not None and "signature" in str(client.failure)


def test_client_refuses_an_expired_node_certificate():
    client = make_client(0x01)
    server = ServerConnection(SETTINGS, NOW)
    client.start(NOW)
    server.receive_data(client.data_to_send(), NOW)
    client.receive_data(server.data_to_send(), NOW + 2 * 86400)
    assert client.closed and client.close_reason == CloseReason.HANDSHAKE_FAILED


def test_hibernated_session_keeps_working():
    client, server, _ = open_session(0x02)
    assert server.hibernate() is True
    assert server.hibernate() is False  # nothing left to free
    client.send_stanza({"t": "ping", "id": 5})
    client_events, _ = shuttle(client, server)
    assert [e.stanza for e in client_events if isinstance(e, StanzaReceived)] == [{"t": "pong", "id": 5}]
    assert server.hibernate() is True


def test_too_many_stanzas_in_one_message_closes_with_protocol_error():
    client, server, _ = open_session(0x01)
    from interlink.core.protocol.connection import MAX_STANZAS_PER_MESSAGE

    plaintext = b"".join(encode_stanza({"t": "ping", "id": i}) for i in range(MAX_STANZAS_PER_MESSAGE + 1))
    server.receive_data(encode_frame(client._session.send_cipher.encrypt(plaintext)), NOW)
    stanzas = server_stanzas(server.data_to_send(), client._session)
    assert stanzas == [{"t": "bye", "reason": "protocol_error"}]  # no pong flood: nothing was served
    assert server.closed and server.close_reason == "protocol_error"


def test_answers_are_bounded_by_the_stanza_cap():
    client, server, _ = open_session(0x01)
    from interlink.core.protocol.connection import MAX_STANZAS_PER_MESSAGE

    # A message of empty maps: each is a bad stanza; the cap bounds how many answers one message buys.
    plaintext = msgpack.packb({}) * MAX_STANZAS_PER_MESSAGE
    server.receive_data(encode_frame(client._session.send_cipher.encrypt(plaintext)), NOW)
    answers = server_stanzas(server.data_to_send(), client._session)
    assert len(answers) == MAX_STANZAS_PER_MESSAGE
    assert {a["code"] for a in answers} == {"bad_stanza"}
    assert not server.closed


def test_close_before_welcome_sends_err_not_bye():
    client = make_client(0x01)
    server = ServerConnection(SETTINGS, NOW)
    client.start(NOW)
    shuttle(client, server)  # auth pending
    server.close("drain")
    client_events, _ = shuttle(client, server)
    closed = [e for e in client_events if isinstance(e, ConnectionClosed)]
    assert [(c.reason, c.code) for c in closed] == [(CloseReason.AUTH_FAILED, "overloaded")]


def test_pipelined_bytes_before_auth_are_bounded():
    client = make_client(0x01)
    server = ServerConnection(SETTINGS, NOW)
    client.start(NOW)
    shuttle(client, server)
    cipher = client._session.send_cipher
    big = encode_stanza({"t": "x", "pad": b"\0" * 40000})
    server.receive_data(encode_frame(cipher.encrypt(big)), NOW)
    assert not server.closed
    server.receive_data(encode_frame(cipher.encrypt(big)), NOW)  # 80 KB held > 64 KiB
    assert server.closed and server.close_reason == "protocol_error"


def test_output_respects_a_smaller_frame_maximum():
    settings = server_settings(static_private=SERVER_STATIC, certificate=CERT, node="n", max_frame_bytes=9000)
    client = make_client(0x01)
    server = ServerConnection(settings, NOW)
    client.start(NOW)
    shuttle(client, server)
    server.accept_auth(identity(), {"t": "welcome"}, NOW)
    for i in range(3000):
        server.send_stanza({"t": "pong", "id": i})
    frames = FrameDecoder().feed(server.data_to_send())
    assert len(frames) > 1 and max(len(f) for f in frames) <= 9000
    with pytest.raises(LocalProtocolError):
        server.send_stanza({"t": "dlv", "c": b"x" * 9000})  # a local bug, refused before any byte is sent
