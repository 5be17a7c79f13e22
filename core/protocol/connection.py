"""Per-connection protocol state machines, sans-I/O (docs/protocol.md §1–§5).

``ServerConnection`` is the gateway's side, ``ClientConnection`` the client's. Both are driven
by three inputs — ``receive_data(data, now)``, ``receive_eof(now)``, ``handle_timer(now)`` — plus
API calls, and drained with ``events()`` and ``data_to_send()``. Time is always passed in (epoch
seconds, the clock JWT ``exp`` uses), so a unit test can drive them byte by byte without a socket
or an event loop.

Server states::

    PREAMBLE -> HANDSHAKE -> [CONFIRM (IK only)] -> AUTH -> OPEN -> CLOSING -> CLOSED

Peer misbehaviour never escapes as an exception: it becomes a named close reason
(``ConnectionClosed.reason``) that operators can count.
"""

from __future__ import annotations

import enum
import functools
import os
from dataclasses import dataclass, field

import msgpack

from interlink.core.protocol.certs import NodeCertificate, server_hello, verify_server_hello
from interlink.core.errors import (
    CloseReason,
    CryptoError,
    ErrorCode,
    FrameError,
    HandshakeError,
    InterlinkError,
    LocalProtocolError,
    StanzaError,
    TooManyStanzasError,
)
from interlink.core.protocol.framing import FrameDecoder, encode_frame
from interlink.core.protocol.noise import (
    PREAMBLE_BYTES,
    SUITES,
    NoiseSession,
    UnknownSuiteError,
    make_preamble,
    parse_preamble,
)
from interlink.core.protocol.stanza import decode_stanzas, encode_stanza
from interlink.core.protocol.wire import MAX_DEVICE_ID, MAX_PLAINTEXT_BYTES, TAG_BYTES, WIRE_MAX_FRAME_BYTES

# Before ``welcome`` the first transport message must be ``welcome`` or ``err`` (docs/protocol.md
# §2), so a close before the session opens says why with one of these codes instead of ``bye``.
_PREOPEN_CLOSE_CODES = {CloseReason.DRAIN: ErrorCode.OVERLOADED, CloseReason.PROTOCOL_ERROR: ErrorCode.BAD_STANZA}
MAX_PREAUTH_FRAMES = 8  # transport messages a client may pipeline before its auth is decided...
MAX_PREAUTH_BYTES = 64 * 1024  # ...and their total plaintext
MAX_STANZAS_PER_MESSAGE = 256  # bounds the work (and the answers) one transport message can cause
MAX_AGENT_CHARS = 128


class State(enum.Enum):
    PREAMBLE = "preamble"
    HANDSHAKE = "handshake"
    CONFIRM = "confirm"  # IK: waiting for the first client transport message (replay rule)
    AUTH = "auth"  # token being verified by the edge
    OPEN = "open"
    CLOSING = "closing"  # final bytes queued; the adapter closes the socket after writing them
    CLOSED = "closed"


_CLOSING, _CLOSED = State.CLOSING, State.CLOSED


# ----------------------------------------------------------------------------- events


@dataclass(slots=True)
class AuthRequested:
    """The handshake finished; the edge must verify the token and call ``accept_auth``/``reject_auth``."""

    token: str  #: compact JWT from the client's provider
    device: int  #: device number the client claims (1..2^31-1)
    agent: str  #: client software name, for operators
    client_static: bytes  #: the client's Noise static public key (for ``cnf`` key binding)


@dataclass(slots=True)
class StanzaReceived:
    """A stanza the connection does not answer itself (everything but ``ping``)."""

    stanza: dict  #: the decoded msgpack map; ``t`` is a str


@dataclass(slots=True)
class Welcomed:
    """Client side: the gateway accepted the session."""

    welcome: dict  #: the ``welcome`` stanza


@dataclass(slots=True)
class ConnectionClosed:
    """The connection is over; after this event the adapter writes what is queued and closes."""

    reason: str  #: a ``CloseReason`` (the peer's bye reason, as it said it, on the client side)
    code: str | None = None  #: error code when an ``err`` caused the close
    message: str = ""  #: human-readable detail


# ----------------------------------------------------------------------------- shared plumbing


@functools.lru_cache(maxsize=16)
def _max_plaintext(max_frame_bytes: int) -> int:
    # Cached so that every connection shares one int object (they are not small ints).
    return min(MAX_PLAINTEXT_BYTES, max_frame_bytes - TAG_BYTES)


class _Endpoint:
    """Framing, transport encryption and stanza coalescing shared by both sides."""

    __slots__ = (
        "state",
        "_decoder",
        "_session",
        "_send",
        "_recv",
        "_out",
        "_pending",
        "_events",
        "close_reason",
        "max_plaintext_bytes",
    )

    def __init__(self, max_frame_bytes: int) -> None:
        self.state = State.PREAMBLE
        self._decoder = FrameDecoder(max_frame_bytes)
        # Largest plaintext this side sends in one transport message: both sides keep to the
        # frame maximum the gateway announces (a client adopts it from ``welcome``).
        self.max_plaintext_bytes = _max_plaintext(max_frame_bytes)
        self._session: NoiseSession | None = None  # the handshake (the server drops it when done)
        self._send = None  # transport CipherStates, once the handshake is complete
        self._recv = None
        # The three queues are None while empty: an idle session (most of them) holds no lists.
        self._out: list | None = None  # wire bytes ready to send (frames, preamble)
        self._pending: list | None = None  # encoded stanzas waiting to be coalesced into transport messages
        self._events: list | None = None
        self.close_reason: str | None = None

    # -- outputs

    def events(self) -> list:
        events, self._events = self._events, None
        return events or []

    def data_to_send(self) -> bytes:
        """Everything to write now: queued frames, then the queued stanzas coalesced into as few
        transport messages as fit in a frame."""
        if self._pending:
            self._flush_stanzas()
        out, self._out = self._out, None
        if not out:
            return b""
        return b"".join(out) if len(out) > 1 else out[0]

    @property
    def closed(self) -> bool:
        # Read on every queued stanza: identity tests on module constants (``in`` on a tuple of
        # enum members costs five times more).
        state = self.state
        return state is _CLOSING or state is _CLOSED

    # -- stanza output

    def send_stanza(self, stanza: dict) -> None:
        self.send_encoded(encode_stanza(stanza))

    def send_encoded(self, encoded: bytes) -> None:
        """Queue an already-encoded stanza (fan-out serializes once, then queues per recipient)."""
        if self.closed or self._send is None:
            return
        if len(encoded) > self.max_plaintext_bytes:
            raise LocalProtocolError(f"stanza of {len(encoded)} bytes does not fit in one frame")
        if self._pending is None:
            self._pending = [encoded]
        else:
            self._pending.append(encoded)

    def _flush_stanzas(self) -> None:
        plaintexts = []
        batch: list = []
        size = 0
        limit = self.max_plaintext_bytes
        for encoded in self._pending:
            # A transport message ends where the next stanza would pass the frame size or the
            # stanza count the receiving gateway accepts (more ends the session).
            if batch and (size + len(encoded) > limit or len(batch) == MAX_STANZAS_PER_MESSAGE):
                plaintexts.append(b"".join(batch))
                batch, size = [], 0
            batch.append(encoded)
            size += len(encoded)
        if batch:
            plaintexts.append(b"".join(batch))
        self._pending = None
        self._write(self._send.encrypt_frames(plaintexts))

    def _transport_ready(self) -> None:
        """The handshake just completed: keep the two transport ciphers."""
        self._send = self._session.send_cipher
        self._recv = self._session.recv_cipher

    def _write_frame(self, payload: bytes) -> None:
        self._write(encode_frame(payload))

    def _write(self, data: bytes) -> None:
        if self._out is None:
            self._out = [data]
        else:
            self._out.append(data)

    def _emit(self, event) -> None:
        if self._events is None:
            self._events = [event]
        else:
            self._events.append(event)

    def _finish(self, reason: str, code: str | None = None, message: str = "") -> None:
        if self.closed:
            return
        self.state = State.CLOSING
        self.close_reason = reason
        self._emit(ConnectionClosed(reason, code, message))

    def _receive_frames(self, data, now: float) -> None:
        """Feed bytes to the decoder and handle every complete frame, then a framing error if
        one followed them (frames that arrived intact before it are still served)."""
        try:
            frames, error = self._decoder.feed(data), None
        except FrameError as exc:
            frames, error = exc.frames, exc
        for frame in frames:
            if self.closed:
                return
            self._receive_frame(frame, now)
        if error is not None and not self.closed:
            self._fail_frame(error)

    def _receive_frame(self, frame: bytes, now: float) -> None:
        raise NotImplementedError

    def _fail_frame(self, error: InterlinkError) -> None:
        raise NotImplementedError

    def receive_eof(self, now: float) -> None:
        if not self.closed:
            self._finish(CloseReason.PEER_CLOSED, message="peer closed the connection")
        self.state = State.CLOSED

    def connection_lost(self) -> None:
        """The socket is gone; no more output is possible."""
        if not self.closed:
            self._finish(CloseReason.PEER_CLOSED, message="connection lost")
        self.state = State.CLOSED
        self._pending = None
        self._out = None


# ----------------------------------------------------------------------------- server side


@dataclass(slots=True)
class ServerSettings:
    """What the gateway's connections need to know; shared by every connection (one object)."""

    static_private: bytes  #: the node's X25519 static key
    certificate: NodeCertificate  #: the node certificate signed by the operator root
    node: str  #: node name announced in the server hello
    max_frame_bytes: int
    preauth_deadline_s: float
    suites: frozenset = field(default_factory=lambda: frozenset(SUITES))


class ServerConnection(_Endpoint):
    """The gateway's end of one client connection."""

    __slots__ = (
        "settings",
        "suite",
        "_deadline",
        "_auth",
        "_held",
        "identity",
        "session_key",
        "_preamble",
    )
    relayed = False  # a session of this node (the domain's port: a cluster relays others' stanzas)

    def __init__(self, settings: ServerSettings, now: float) -> None:
        super().__init__(settings.max_frame_bytes)
        self.settings = settings
        self.suite: int | None = None
        # One slot for the one deadline that matters: the pre-auth deadline until the session
        # opens, the token's expiry (or None) after.
        self._deadline: float | None = now + settings.preauth_deadline_s
        self._auth: AuthRequested | str | None = None  # IK: parsed auth payload (or why it is bad) until confirmed
        self._held: list | None = None  # transport plaintexts that arrived before auth was decided
        self.identity = None  # set by accept_auth; opaque to this layer
        self.session_key = None  # the domain's key of this session, (user, device); opaque to this layer
        self._preamble = b""  # the 4 preamble bytes as they trickle in

    @property
    def expires_at(self) -> float | None:
        """When the open session ends with ``bye auth_expired`` (None before it opens, or never)."""
        return self._deadline if self.state is State.OPEN else None

    @expires_at.setter
    def expires_at(self, value: float | None) -> None:
        if self.state is State.OPEN:
            self._deadline = value

    # -- inputs

    def receive_data(self, data, now: float) -> None:
        if self.closed:
            return
        if self.state is State.PREAMBLE:
            data = self._receive_preamble(data)
            if not data:
                return
        self._receive_frames(data, now)

    def handle_timer(self, now: float) -> None:
        """Enforce the pre-auth deadline and token expiry."""
        if self.closed:
            return
        deadline = self._deadline
        if deadline is None or now < deadline:
            return
        if self.state is not State.OPEN:
            self._finish(CloseReason.AUTH_DEADLINE, message="handshake and authentication not finished in time")
        else:
            self.close(CloseReason.AUTH_EXPIRED)

    def next_deadline(self) -> float | None:
        return None if self.closed else self._deadline

    # -- decisions from the edge

    def accept_auth(self, identity, welcome: dict, now: float, *, expires_at: float | None = None) -> None:
        """The token verified: send ``welcome`` and serve whatever the client pipelined. The
        session ends with ``bye auth_expired`` at ``expires_at`` (default: the identity's)."""
        if self.state is not State.AUTH:
            return
        self.identity = identity
        self._deadline = identity.expires_at if expires_at is None else expires_at  # the token's expiry from here on
        self.state = State.OPEN
        self._auth = None
        self.send_stanza(welcome)
        held, self._held = self._held, None
        for plaintext in held or ():
            if self.closed:
                break
            self._receive_plaintext(plaintext)
        self.handle_timer(now)

    def redirect(self, node: str, host: str, port: int, ws: str | None = None) -> None:
        """The token verified, but the user's home is another node of the cluster: say ``bye``
        ``redirect`` with its address instead of ``welcome`` (nothing was stored), then close."""
        if self.state is not State.AUTH:
            return
        bye = {"t": "bye", "reason": CloseReason.REDIRECT, "node": node, "host": host, "port": port}
        if ws is not None:
            bye["ws"] = ws
        self.send_stanza(bye)
        self._held = None
        self._finish(CloseReason.REDIRECT, message=f"home node {node}")

    def reject_auth(self, code: str, message: str) -> None:
        """The token was refused: send ``err`` with the auth code, then close."""
        if self.state is not State.AUTH:
            return
        self.send_stanza({"t": "err", "code": code, "msg": message})
        self._held = None
        self._finish(CloseReason.AUTH_FAILED, code, message)

    def close(self, reason: str, message: str = "") -> None:
        """Say ``bye`` with ``reason`` and close. Before the session is open the client is owed
        ``welcome`` or ``err`` first, so it gets an ``err`` saying why instead."""
        if self.closed:
            return
        if self.state is State.OPEN:
            self.send_stanza({"t": "bye", "reason": reason})
        elif self._send is not None:
            self.send_error(_PREOPEN_CLOSE_CODES.get(reason, ErrorCode.INTERNAL), message or f"closing: {reason}")
        self._finish(reason, message=message)

    def fail_transport(self, message: str) -> None:
        """The transport beneath the frames broke a rule of the contract (a WebSocket text
        message, say): handled like a bad frame — ``err bad_frame`` once the handshake is done,
        then the close."""
        if not self.closed:
            self._fail_frame(FrameError(message))

    def hibernate(self) -> bool:
        """Shrink an idle open session to its keys (the edge calls this after a quiet period).
        True if memory was freed."""
        send, recv = self._send, self._recv
        if self.state is not State.OPEN or not (send.loaded or recv.loaded):
            return False
        send.release()
        recv.release()
        return True

    def send_error(self, code: str, message: str, **fields) -> None:
        stanza = {"t": "err", "code": code, "msg": message}
        stanza.update(fields)
        self.send_stanza(stanza)

    # -- internals

    def _receive_preamble(self, data):
        # The preamble is exactly 4 bytes and may arrive split; it is also the Noise prologue.
        needed = PREAMBLE_BYTES - len(self._preamble)
        self._preamble += bytes(data[:needed])
        if len(self._preamble) < PREAMBLE_BYTES:
            return b""
        try:
            self.suite = parse_preamble(self._preamble)
        except HandshakeError as exc:
            reason = CloseReason.UNKNOWN_SUITE if isinstance(exc, UnknownSuiteError) else CloseReason.BAD_PREAMBLE
            self._finish(reason, message=str(exc))
            return b""
        if self.suite not in self.settings.suites:
            self._finish(CloseReason.UNKNOWN_SUITE, message=f"suite 0x{self.suite:02x} is not enabled")
            return b""
        self._session = NoiseSession(
            SUITES[self.suite],
            initiator=False,
            static_private=self.settings.static_private,
            prologue=self._preamble,
        )
        self._preamble = b""  # done with it (the empty bytes object is shared)
        self.state = State.HANDSHAKE
        return data[needed:]

    def _receive_frame(self, frame: bytes, now: float) -> None:
        session = self._session
        if self.state is State.HANDSHAKE:
            try:
                payload = session.read_message(frame)
                if not session.handshake_complete:
                    hello = server_hello(self.settings.certificate, self.settings.node, int(now * 1000))
                    self._write_frame(session.write_message(hello))
            except HandshakeError as exc:
                self._finish(CloseReason.HANDSHAKE_FAILED, message=str(exc))
                return
            if not session.handshake_complete:
                return  # XX: message 1 read and message 2 written; wait for message 3
            self._transport_ready()
            # Only the transport ciphers are needed from here on; the session object and the
            # handshake's leftovers would otherwise stay for the life of the connection.
            self._session = None
            request = self._parse_auth(payload, session.remote_static)
            if session.pattern == "XX":
                self._request_auth(request)
            else:
                # IK: message 1 carried the auth payload and message 2 is out; the payload may be a
                # replay, so act on it only once the client proves liveness with a transport message.
                self._auth = request
                self.state = State.CONFIRM
            return
        try:
            plaintext = self._recv.decrypt(frame)
        except CryptoError as exc:
            self._fail_frame(exc)
            return
        if self.state is State.OPEN:
            self._receive_plaintext(plaintext)
            return
        if self._held is None:
            self._held = []
        held_bytes = sum(map(len, self._held)) + len(plaintext)
        if len(self._held) >= MAX_PREAUTH_FRAMES or held_bytes > MAX_PREAUTH_BYTES:
            self.close(CloseReason.PROTOCOL_ERROR, "too much sent before authentication finished")
            return
        self._held.append(plaintext)
        if self.state is State.CONFIRM:
            request, self._auth = self._auth, None
            self._request_auth(request)

    def _request_auth(self, request: AuthRequested | str) -> None:
        self.state = State.AUTH
        if isinstance(request, str):
            # The auth payload itself is malformed: answer with auth_failed, then close.
            self.reject_auth("auth_failed", request)
            return
        self._auth = request
        self._emit(request)

    @staticmethod
    def _parse_auth(payload, client_static: bytes) -> AuthRequested | str:
        """The auth payload as an event, or the reason it is malformed."""
        try:
            fields = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except (ValueError, msgpack.UnpackException, TypeError):
            return "auth payload is not a msgpack map"
        if not isinstance(fields, dict):
            return "auth payload is not a msgpack map"
        token, device, agent = fields.get("token"), fields.get("device"), fields.get("agent", "")
        if not isinstance(token, str) or not token:
            return "auth payload needs 'token' (str)"
        if type(device) is not int or not 1 <= device <= MAX_DEVICE_ID:
            return "auth payload needs 'device' (int 1..2^31-1)"
        if not isinstance(agent, str) or len(agent) > MAX_AGENT_CHARS:
            return f"'agent' must be a str of at most {MAX_AGENT_CHARS} characters"
        return AuthRequested(token, device, agent, client_static)

    def _receive_plaintext(self, plaintext: bytes) -> None:
        # Each transport message is decoded on its own: a stanza cut short is answered with
        # bad_stanza here and can never be completed by a later message (DESIGN, "Decoding").
        try:
            stanzas = decode_stanzas(plaintext, MAX_STANZAS_PER_MESSAGE)
            error = None
        except TooManyStanzasError as exc:
            self.close(CloseReason.PROTOCOL_ERROR, str(exc))
            return
        except StanzaError as exc:
            stanzas, error = exc.stanzas, exc
        for stanza in stanzas:
            kind = stanza.get("t")
            if kind == "ping":
                ping_id = stanza.get("id")
                if type(ping_id) is int:
                    self.send_stanza({"t": "pong", "id": ping_id})
                else:
                    self.send_error("bad_stanza", "ping needs an int 'id'")
            elif not isinstance(kind, str):
                self.send_error("bad_stanza", "stanza has no string field 't'")
            else:
                self._emit(StanzaReceived(stanza))
        if error is not None:
            self.send_error("bad_stanza", str(error))

    def _fail_frame(self, error: InterlinkError) -> None:
        if self._send is not None:
            self.send_error("bad_frame", str(error))
        self._finish(CloseReason.BAD_FRAME, "bad_frame", str(error))



# ----------------------------------------------------------------------------- client side


class ClientConnection(_Endpoint):
    """The client's end: preamble, handshake with certificate pinning, auth, then stanzas."""

    __slots__ = ("_root_public", "_auth_payload", "welcome", "certificate", "_ik_confirm_id", "failure", "bye")

    def __init__(
        self,
        *,
        suite: int,
        static_private: bytes,
        root_public: bytes,
        token: str,
        device: int,
        agent: str = "interlink-python",
        server_static: bytes | None = None,
        max_frame_bytes: int = WIRE_MAX_FRAME_BYTES,
    ) -> None:
        super().__init__(max_frame_bytes)
        if suite not in SUITES:
            raise ValueError(f"unknown suite 0x{suite:02x}")
        protocol_name = SUITES[suite]
        if "_IK_" in protocol_name and server_static is None:
            raise ValueError("IK suites need the gateway's static key (server_static)")
        self._root_public = root_public
        self._auth_payload = msgpack.packb({"token": token, "device": device, "agent": agent}, use_bin_type=True)
        self.welcome: dict | None = None
        self.certificate: NodeCertificate | None = None
        self._ik_confirm_id: int | None = None
        self.failure: HandshakeError | None = None  # why the handshake failed, for the SDK to raise
        self.bye: dict | None = None  # the gateway's bye, when it said one (a redirect's address)
        prologue = make_preamble(suite)
        self._session = NoiseSession(
            protocol_name,
            initiator=True,
            static_private=static_private,
            prologue=prologue,
            remote_static=server_static if "_IK_" in protocol_name else None,
        )
        self._write(prologue)

    @property
    def pattern(self) -> str:
        """``"XX"`` or ``"IK"``."""
        return self._session.pattern

    @property
    def handshake_answered(self) -> bool:
        """True once the gateway's handshake message (message 2) was read."""
        return self._session.messages_done >= 2

    def start(self, now: float) -> None:
        """Write the preamble and the first handshake message."""
        session = self._session
        payload = self._auth_payload if session.pattern == "IK" else b""
        self._write_frame(session.write_message(payload))
        self.state = State.HANDSHAKE

    def receive_data(self, data, now: float) -> None:
        if not self.closed:
            self._receive_frames(data, now)

    def _fail_frame(self, error: InterlinkError) -> None:
        self._finish(CloseReason.BAD_FRAME, "bad_frame", str(error))

    def close(self) -> None:
        self._finish(CloseReason.CLIENT_CLOSED)

    def _receive_frame(self, frame: bytes, now: float) -> None:
        session = self._session
        if self.state is State.HANDSHAKE:
            try:
                hello = session.read_message(frame)
                self.certificate = verify_server_hello(
                    hello, root_public=self._root_public, remote_static=session.remote_static, now=now
                )
                if session.pattern == "XX":
                    self._write_frame(session.write_message(self._auth_payload))
            except HandshakeError as exc:
                self.failure = exc
                self._finish(CloseReason.HANDSHAKE_FAILED, message=str(exc))
                return
            self._transport_ready()
            self.state = State.AUTH
            if session.pattern == "IK":
                # Prove liveness at once so the gateway may act on our (replayable) message 1.
                self._ik_confirm_id = int.from_bytes(os.urandom(4), "big")
                self.send_stanza({"t": "ping", "id": self._ik_confirm_id})
            return
        try:
            plaintext = self._recv.decrypt(frame)
            stanzas = decode_stanzas(plaintext)
        except (CryptoError, StanzaError) as exc:
            self._finish(CloseReason.BAD_FRAME, "bad_frame", f"gateway sent an unreadable message: {exc}")
            return
        for stanza in stanzas:
            self._receive_stanza(stanza)

    def _receive_stanza(self, stanza: dict) -> None:
        kind = stanza.get("t")
        if self.state is State.AUTH:
            if kind == "welcome":
                self.welcome = stanza
                self.state = State.OPEN
                self._emit(Welcomed(stanza))
            elif kind == "err":
                self._finish(CloseReason.AUTH_FAILED, str(stanza.get("code")), str(stanza.get("msg", "")))
            elif kind == "bye":
                self.bye = stanza
                self._finish(str(stanza.get("reason")), message="gateway said bye")
            else:
                self._finish(CloseReason.PROTOCOL_ERROR, message=f"expected welcome, got {kind!r}")
            return
        if kind == "pong" and self._ik_confirm_id is not None and stanza.get("id") == self._ik_confirm_id:
            self._ik_confirm_id = None
            return  # the IK liveness ping, not the application's
        if kind == "bye":
            self._finish(str(stanza.get("reason")), message="gateway said bye")
            return
        self._emit(StanzaReceived(stanza))
