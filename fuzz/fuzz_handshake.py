"""Fuzz harness ``handshake``: what a gateway reads before a session opens (PROTOCOL §1–§2).

The last byte of the input (``atheris.FuzzedDataProvider``: ints come from the end) picks a mode:

* 0–9, **raw**: the rest of the input is cut into pieces (the input chooses the cuts, a few
  ``handle_timer`` ticks and an EOF among them) and fed to a fresh ``ServerConnection`` as its
  preamble and frames, under one of three ``ServerSettings`` (frame limits 65535, 9000 and 768;
  one with only suites 0x01/0x11 enabled). Nothing may be raised; the only event allowed is one
  ``ConnectionClosed`` with a named reason; a reference model written here from PROTOCOL §1–§2
  says which reason and when (bad preamble, unknown or disabled suite, a zero or oversize frame
  header, a truncated or low-order XX message 1, any IK message 1 or XX message 3 — the fuzzer
  cannot produce valid ones —, the pre-auth deadline, EOF), or that the server is still waiting;
  it writes exactly one frame (message 2, of the expected size) when it read a good XX message 1.
* 10–13, **auth payload**: ``ServerConnection._parse_auth(payload, client_static)`` returns an
  ``AuthRequested`` exactly when the payload is one msgpack map with a non-empty str ``token``,
  an int ``device`` in 1..2^31-1 and a str ``agent`` of at most 128 characters (default ""), with
  those values; otherwise a non-empty reason string; it never raises.
* 14–15, **real handshake** (XX or IK, ChaChaPoly or AESGCM): a ``ClientConnection`` and a
  ``ServerConnection`` over real keys run the whole handshake in memory, and the client's auth
  payload (XX message 3, IK message 1) is the rest of the input. The server must then emit that
  ``AuthRequested`` (and, accepted, the client gets ``welcome``), or answer ``err auth_failed``
  and close with ``auth_failed`` — which the client sees as its close reason and code.

After every input (state leaks): a fixed valid auth payload parses to its fixed event, and a fresh
``ServerConnection`` given a fixed valid preamble and XX message 1 answers exactly one message 2
of the expected size and waits. A connection is never reused after its input: the contract ends
it on every failure.

Cost: a real handshake about 0.7 ms, the fresh-connection check about 0.17 ms; instrumented, the
harness runs about 2,400 inputs a second (10^6 in about 7 minutes), real handshakes being a small
share of what the fuzzer keeps mutating (they add little coverage beyond the auth-payload mode).
"""

from __future__ import annotations

import contextlib
import sys

if __name__ == "__main__":
    import atheris

    instrumenting = atheris.instrument_imports(include=["interlink"])
else:
    instrumenting = contextlib.nullcontext()

with instrumenting:
    import msgpack
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    import fuzzkeys
    import fuzzlib
    from interlink.core.domain.auth import Identity
    from interlink.core.protocol.certs import server_hello, x25519_public
    from interlink.core.protocol.connection import (
        AuthRequested,
        ClientConnection,
        ConnectionClosed,
        ServerConnection,
        ServerSettings,
        State,
        Welcomed,
    )
    from interlink.core.errors import FrameError
    from interlink.core.protocol.framing import FrameDecoder
    from interlink.core.protocol.noise import SUITES

WIRE_MAX = 65535
DH_BYTES = 32
TAG_BYTES = 16
MAX_DEVICE = 2**31 - 1
MAX_AGENT_CHARS = 128
MAX_STEPS = 8
XX_MESSAGE3_OVERHEAD = DH_BYTES + 2 * TAG_BYTES  # s (encrypted), se, the payload's tag
IK_MESSAGE1_OVERHEAD = 2 * DH_BYTES + 2 * TAG_BYTES  # e, s (encrypted), es, ss, the payload's tag

SETTINGS = (
    fuzzkeys.SETTINGS,
    ServerSettings(
        static_private=fuzzkeys.SERVER_STATIC, certificate=fuzzkeys.CERT, node=fuzzkeys.NODE,
        max_frame_bytes=9000, preauth_deadline_s=5.0, suites=frozenset({0x01, 0x11}),
    ),
    # The smallest frame limit the configuration allows (max_token_bytes 256 + 512).
    ServerSettings(static_private=fuzzkeys.SERVER_STATIC, certificate=fuzzkeys.CERT, node=fuzzkeys.NODE, max_frame_bytes=768,
                   preauth_deadline_s=5.0),
)
_PROBE = X25519PrivateKey.from_private_bytes(b"\x07" * 32)


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(2, "big") + body


def low_order(public: bytes) -> bool:
    """True if X25519 with this point gives the all-zero secret for every (clamped) scalar."""
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return True
    return False


# Message 2 is e, ee, s (encrypted), es and the server hello (encrypted): its size is fixed by the hello.
MESSAGE2_BYTES = DH_BYTES + (DH_BYTES + TAG_BYTES) + len(server_hello(fuzzkeys.CERT, fuzzkeys.NODE, int(fuzzkeys.NOW * 1000))) + TAG_BYTES

VALID_CLIENT_HELLO = b"IL\x01\x01" + frame(x25519_public(fuzzkeys.CLIENT_EPHEMERAL))
VALID_AUTH = msgpack.packb({"token": "header.payload.signature", "device": 7, "agent": "fuzz"}, use_bin_type=True)
EXPECTED_AUTH = AuthRequested("header.payload.signature", 7, "fuzz", fuzzkeys.CLIENT_PUBLIC)


def expected_auth(payload: bytes):
    """The contract's reading of a client auth payload (PROTOCOL §2): the fields, or None."""
    try:
        # Keys must be strings here: the payload is a map of named fields (the parser is strict too).
        fields = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception:  # whatever msgpack refuses, the payload is not a map; the parser must say so, not raise
        return None
    if type(fields) is not dict:
        return None
    token, device, agent = fields.get("token"), fields.get("device"), fields.get("agent", "")
    if type(token) is not str or not token:
        return None
    if type(device) is not int or not 1 <= device <= MAX_DEVICE:
        return None
    if type(agent) is not str or len(agent) > MAX_AGENT_CHARS:
        return None
    return token, device, agent


class ServerModel:
    """What PROTOCOL §1–§2 says a gateway does with bytes nobody holding real keys could have
    produced: the close reason (None while waiting) and how many message-2 frames it wrote."""

    def __init__(self, settings: ServerSettings, now: float) -> None:
        self.settings = settings
        self.deadline = now + settings.preauth_deadline_s
        self.phase = "preamble"  # then "XX1"/"IK1" (waiting for message 1), "XX3"
        self.buffer = b""
        self.reason = None
        self.written = 0

    def data(self, chunk: bytes) -> None:
        if self.reason is not None:
            return
        self.buffer += chunk
        if self.phase == "preamble":
            if len(self.buffer) < 4:
                return
            preamble, self.buffer = self.buffer[:4], self.buffer[4:]
            if preamble[:2] != b"IL" or preamble[2] != 0x01:
                self.reason = "bad_preamble"
                return
            if preamble[3] not in SUITES or preamble[3] not in self.settings.suites:
                self.reason = "unknown_suite"
                return
            self.phase = "IK1" if "_IK_" in SUITES[preamble[3]] else "XX1"
        while len(self.buffer) >= 2:
            length = int.from_bytes(self.buffer[:2], "big")
            if length == 0 or length > self.settings.max_frame_bytes:
                self.reason = "bad_frame"
                return
            if len(self.buffer) < 2 + length:
                return
            body, self.buffer = self.buffer[2 : 2 + length], self.buffer[2 + length :]
            if self.phase == "XX1" and length >= DH_BYTES and not low_order(body[:DH_BYTES]):
                self.written += 1
                self.phase = "XX3"
            else:
                self.reason = "handshake_failed"
                return

    def timer(self, now: float) -> None:
        if self.reason is None and now >= self.deadline:
            self.reason = "auth_deadline"

    def eof(self) -> None:
        if self.reason is None:
            self.reason = "peer_closed"


def _written_frames(server: ServerConnection, limit: int, where: str) -> list:
    """What the server wrote, as frames: whole ones, none over its own limit."""
    out = server.data_to_send()
    decoder = FrameDecoder(limit)
    try:
        frames = decoder.feed(out) if out else []
    except FrameError as exc:
        raise AssertionError(f"{where}: the server wrote a frame its own limit refuses: {exc}") from exc
    if decoder.pending_bytes:
        raise AssertionError(f"{where}: the server wrote a partial frame")
    return frames


def _check_events(events: list, where: str) -> list:
    for event in events:
        if not isinstance(event, ConnectionClosed):
            raise AssertionError(f"{where}: unexpected event {event!r} from bytes without real keys")
        if event.reason not in fuzzlib.CLOSE_REASONS:
            raise AssertionError(f"{where}: close reason {event.reason!r} is not a named reason")
        if event.code is not None and event.code not in fuzzlib.CONTRACT_CODES:
            raise AssertionError(f"{where}: close code {event.code!r} is not a contract code")
    return events


def _raw(fdp, where: str) -> None:
    settings = SETTINGS[fdp.ConsumeIntInRange(0, len(SETTINGS) - 1)]
    steps = []
    for _ in range(fdp.ConsumeIntInRange(1, MAX_STEPS)):
        action = fdp.ConsumeIntInRange(0, 9)
        steps.append(("data", fdp.ConsumeIntInRange(0, 0xFFFF)) if action < 8 else
                     ("timer", fdp.ConsumeIntInRange(0, 7)) if action == 8 else ("eof", 0))
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    steps.append(("data", None))  # whatever the cuts left is fed last

    now = fuzzkeys.NOW
    server = ServerConnection(settings, now)
    model = ServerModel(settings, now)
    events, written, position = [], [], 0
    for index, (action, value) in enumerate(steps):
        step = f"{where}, step {index} ({action})"
        try:
            if action == "data":
                size = len(stream) - position if value is None else value % (len(stream) - position + 1)
                chunk, position = stream[position : position + size], position + size
                model.data(chunk)
                server.receive_data(chunk, now)
            elif action == "timer":
                now += value
                model.timer(now)
                server.handle_timer(now)
            else:
                model.eof()
                server.receive_eof(now)
            events += _check_events(server.events(), step)
            written += _written_frames(server, settings.max_frame_bytes, step)
        except AssertionError:
            raise
        except Exception as exc:  # peer bytes must never raise out of the connection
            raise AssertionError(f"{step}: ServerConnection raised {type(exc).__name__}: {exc}") from exc
        reasons = [event.reason for event in events]
        if reasons != ([model.reason] if model.reason else []):
            raise AssertionError(f"{step}: close events {reasons}, the model expects {model.reason!r}")
    if len(written) != model.written or any(len(body) != MESSAGE2_BYTES for body in written):
        raise AssertionError(
            f"{where}: server wrote frames of {[len(b) for b in written]} bytes; "
            f"the model expects {model.written} message 2 of {MESSAGE2_BYTES} bytes"
        )
    if server.closed != (model.reason is not None) or server.close_reason != model.reason:
        raise AssertionError(f"{where}: server closed={server.closed} reason={server.close_reason!r}, model {model.reason!r}")


def _auth_payload(payload: bytes, where: str) -> None:
    try:
        result = ServerConnection._parse_auth(payload, fuzzkeys.CLIENT_PUBLIC)
    except Exception as exc:  # the parser answers with a reason string, it never raises
        raise AssertionError(f"{where}: _parse_auth raised {type(exc).__name__}: {exc}") from exc
    expected = expected_auth(payload)
    if expected is None:
        if type(result) is not str or not result:
            raise AssertionError(f"{where}: a malformed auth payload gave {result!r}, not a reason")
    elif result != AuthRequested(*expected, fuzzkeys.CLIENT_PUBLIC):
        raise AssertionError(f"{where}: auth payload {expected!r} gave {result!r}")


def _shuttle(client: ClientConnection, server: ServerConnection, now: float) -> tuple[list, list]:
    client_events, server_events = [], []
    for _ in range(8):
        moved = False
        data = client.data_to_send()
        if data:
            moved = True
            server.receive_data(data, now)
        server_events += server.events()
        data = server.data_to_send()
        if data:
            moved = True
            client.receive_data(data, now)
        client_events += client.events()
        if not moved:
            break
    return client_events, server_events


def _real_handshake(fdp, ik: bool, where: str) -> None:
    suite = (0x11, 0x12)[fdp.ConsumeIntInRange(0, 1)] if ik else (0x01, 0x02)[fdp.ConsumeIntInRange(0, 1)]
    overhead = IK_MESSAGE1_OVERHEAD if ik else XX_MESSAGE3_OVERHEAD
    payload = fdp.ConsumeBytes(WIRE_MAX - overhead)
    where = f"{where}, suite 0x{suite:02x}"
    now = fuzzkeys.NOW
    client = ClientConnection(
        suite=suite, static_private=fuzzkeys.CLIENT_STATIC, root_public=fuzzkeys.ROOT_PUBLIC,
        token="unused", device=1, server_static=fuzzkeys.SERVER_PUBLIC if ik else None,
    )
    client._auth_payload = payload  # the payload under test replaces the SDK's well-formed one
    server = ServerConnection(fuzzkeys.SETTINGS, now)
    try:
        client.start(now)
        client_events, server_events = _shuttle(client, server, now)
    except Exception as exc:  # neither side may raise on what the other sends
        raise AssertionError(f"{where}: the handshake raised {type(exc).__name__}: {exc}") from exc
    expected = expected_auth(payload)
    if expected is not None:
        request = AuthRequested(*expected, fuzzkeys.CLIENT_PUBLIC)
        if server_events != [request] or server.state is not State.AUTH or client_events or client.state is not State.AUTH:
            raise AssertionError(
                f"{where}: well-formed auth {expected!r}: server events {server_events!r} "
                f"({server.state}), client events {client_events!r} ({client.state})"[:700]
            )
        identity = Identity(provider="alpha", localpart="alice", device=expected[1], expires_at=now + 3600)
        server.accept_auth(identity, {"t": "welcome", "user": "alice@alpha", "device": expected[1]}, now)
        client_events, server_events = _shuttle(client, server, now)
        if [type(e) for e in client_events] != [Welcomed] or server_events or server.state is not State.OPEN:
            raise AssertionError(f"{where}: after accept_auth: client {client_events!r}, server {server_events!r}"[:700])
        return
    closes = [e for e in server_events if isinstance(e, ConnectionClosed)]
    if (
        len(server_events) != 1 or len(closes) != 1 or (closes[0].reason, closes[0].code) != ("auth_failed", "auth_failed")
        or not closes[0].message or not server.closed
    ):
        raise AssertionError(f"{where}: malformed auth payload: server events {server_events!r}"[:700])
    if [(e.reason, e.code) for e in client_events if isinstance(e, ConnectionClosed)] != [("auth_failed", "auth_failed")]:
        raise AssertionError(f"{where}: malformed auth payload: the client saw {client_events!r}"[:700])


def _no_leaks(where: str) -> None:
    result = ServerConnection._parse_auth(VALID_AUTH, fuzzkeys.CLIENT_PUBLIC)
    if result != EXPECTED_AUTH:
        raise AssertionError(f"{where}: afterwards the valid auth payload parsed to {result!r}")
    server = ServerConnection(fuzzkeys.SETTINGS, fuzzkeys.NOW)
    server.receive_data(VALID_CLIENT_HELLO, fuzzkeys.NOW)
    events, written = server.events(), _written_frames(server, WIRE_MAX, where)
    if events or server.state is not State.HANDSHAKE or [len(body) for body in written] != [MESSAGE2_BYTES]:
        raise AssertionError(
            f"{where}: afterwards a fresh server answered a valid message 1 with events {events!r}, "
            f"state {server.state}, frames of {[len(body) for body in written]} bytes"
        )


def check(data: bytes) -> None:
    fdp = fuzzlib.provider(data)
    mode = fdp.ConsumeIntInRange(0, 15)
    where = f"input {fuzzlib.short(data)} (mode {mode})"
    if mode < 10:
        _raw(fdp, where)
    elif mode < 14:
        _auth_payload(fdp.ConsumeBytes(fdp.remaining_bytes()), where)
    else:
        _real_handshake(fdp, mode == 15, where)
    _no_leaks(where)


_no_leaks("at import")  # the expected results hold before any input

if __name__ == "__main__":
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
