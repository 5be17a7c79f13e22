"""The WebSocket listener's per-connection adapter (``ws_port``; docs/protocol.md §1).

Browsers, web and desktop apps cannot open raw TCP; they reach the gateway over WebSocket. The
same ``ServerConnection`` serves them: each binary WebSocket message carries one Noise message
(``core/protocol/wsframes.py`` converts to and from the TCP form), so every rule of the contract
holds unchanged. The WebSocket protocol itself — the HTTP upgrade, framing, masking, ping/pong,
the closing handshake — is the ``websockets`` library's sans-I/O ``ServerProtocol``, driven from
the same uvloop ``BufferedProtocol`` path as TCP: one shared read buffer, the one timer heap, the
same pause/throttle/yield handling. No task or stream per connection.

The pre-auth deadline runs from the TCP accept, so it covers the HTTP upgrade too. Behind a
trusted HTTP proxy (``ws_trusted_proxies``) the client's address is taken from
``X-Forwarded-For`` when the upgrade request arrives, and the per-source limits apply to it then
(a refused upgrade gets HTTP 429).
"""

from __future__ import annotations

import logging

import websockets.http11
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Protocol as WsProtocol
from websockets.protocol import State as WsState
from websockets.streams import StreamReader
from websockets.server import ServerProtocol

from interlink.core.edge.server import READ_BUFFER_BYTES, GatewayProtocol
from interlink.core.errors import CloseReason, LocalProtocolError
from interlink.core.protocol.connection import State
from interlink.core.protocol.noise import PREAMBLE_BYTES
from interlink.core.protocol.wire import WIRE_MAX_FRAME_BYTES
from interlink.core.protocol.wsframes import message_to_frame, stream_to_messages

log = logging.getLogger("interlink.websocket")
# The library's own per-connection messages ("connection open", each refusal) would fill an
# operator's INFO log; the gateway counts those in /metrics instead.
_library_log = logging.getLogger("interlink.websocket.library")
_library_log.setLevel(logging.WARNING)

_CONNECTING, _OPEN, _CLOSED = WsState.CONNECTING, WsState.OPEN, WsState.CLOSED
_BINARY, _CONT, _TEXT, _CLOSE = Opcode.BINARY, Opcode.CONT, Opcode.TEXT, Opcode.CLOSE
_WAITING_FOR_A_FRAME = StreamReader.at_eof.__code__  # where the library's parser waits between frames

# The library's frame parser costs microseconds per frame, and a read may hold tens of thousands
# of tiny frames (empty pings, empty fragments): bytes go to it in slices, and a connection that
# sends more control frames in one read, or more fragments in one message, than any client needs
# is closed before the rest of its read is parsed.
FEED_BYTES = 1024
MAX_CONTROL_FRAMES_PER_READ = 32
MAX_FRAGMENTS = 64
# An upgrade request's headers stay in memory until the parser is restarted (right after the
# upgrade): a browser's are a few KB; the library's defaults (128 lines of 8 KiB) would let each
# pre-auth connection pin a megabyte.
websockets.http11.MAX_NUM_HEADERS = min(websockets.http11.MAX_NUM_HEADERS, 32)
websockets.http11.MAX_LINE_LENGTH = min(websockets.http11.MAX_LINE_LENGTH, 4096)

# The WebSocket close code a connection's end is given (RFC 6455 §7.4.1; docs/protocol.md §1).
# over_capacity and source_limit never get one: their connections are reset at accept, or answered
# HTTP 429 before the upgrade.
NORMAL, GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED_DATA, POLICY_VIOLATION, INTERNAL_ERROR = (
    1000, 1001, 1002, 1003, 1008, 1011)
CLOSE_CODES = {
    CloseReason.DRAIN: GOING_AWAY,
    CloseReason.BAD_PREAMBLE: PROTOCOL_ERROR,
    CloseReason.UNKNOWN_SUITE: PROTOCOL_ERROR,
    CloseReason.HANDSHAKE_FAILED: PROTOCOL_ERROR,
    CloseReason.BAD_FRAME: PROTOCOL_ERROR,
    CloseReason.PROTOCOL_ERROR: PROTOCOL_ERROR,
    CloseReason.AUTH_DEADLINE: POLICY_VIOLATION,
    CloseReason.SLOW_CONSUMER: POLICY_VIOLATION,
    CloseReason.INTERNAL_ERROR: INTERNAL_ERROR,
}  # every other reason (a bye the client understands, auth_failed with its err): NORMAL


class WebSocketProtocol(GatewayProtocol):
    """``GatewayProtocol`` with a WebSocket between the socket and the ``ServerConnection``."""

    __slots__ = ("ws", "fragments", "parser_fresh", "close_code")
    listener = "ws"

    def __init__(self, server) -> None:
        super().__init__(server)
        self.ws = ServerProtocol(origins=server.ws_origins, max_size=WIRE_MAX_FRAME_BYTES, logger=_library_log)
        self.fragments: list | None = None  # the parts so far of a message sent in several frames
        self.parser_fresh = False  # the parser was restarted since the last frame (hibernate)
        self.close_code: int | None = None  # set when this adapter decided how the connection ends

    # -- input

    def buffer_updated(self, nbytes: int) -> None:
        self.active = True
        server = self.server
        ws = self.ws
        data = bytes(server.read_view[:nbytes])  # the shared buffer is reused by the next read
        controls = 0
        for start in range(0, nbytes, FEED_BYTES):
            ws.receive_data(data[start : start + FEED_BYTES])
            events = ws.events_received()
            if not events:
                continue
            self.parser_fresh = False
            now = server.clock()
            for event in events:
                if type(event) is Frame:
                    if event.opcode.value >= 8:  # close, ping, pong
                        controls += 1
                    self._frame(event, now)
                elif type(event) is Request:
                    self._upgrade(event)
            if controls > MAX_CONTROL_FRAMES_PER_READ and not self.conn.closed:
                self._fail(POLICY_VIOLATION, f"more than {MAX_CONTROL_FRAMES_PER_READ} control frames in one read")
            if self.conn.closed or ws.state is not _OPEN and ws.state is not _CONNECTING:
                break  # the rest of the read is not parsed
        if ws.parser_exc is not None and not self.conn.closed:
            # A WebSocket-level violation: the library closes with its code (no err can follow).
            self.conn.fail_transport(f"WebSocket: {ws.parser_exc}")
        elif ws.handshake_exc is not None and not self.conn.closed:  # not a WebSocket upgrade at all
            server.counters["ws_upgrades_refused"] += 1
            self.conn.close(CloseReason.BAD_UPGRADE, f"WebSocket upgrade refused: {ws.handshake_exc}")
        server.serve(self)
        if nbytes == READ_BUFFER_BYTES:
            server.yield_reading(self)

    def _fail(self, code: int, message: str) -> None:
        """This adapter ends the connection: ``err bad_frame`` (after the handshake), then a close
        frame with ``code`` (written by ``write``)."""
        self.close_code = code
        self.conn.fail_transport(message)

    def hibernate(self) -> bool:
        """Also let go of what the library's parser holds between frames: its generator keeps the
        upgrade request (about 2 KB) and the last frame received, payload and all (up to 64 KB
        after a large message), until the next frame arrives. Between frames a new parser is
        the same parser; mid-frame (or if a library version parks elsewhere) nothing is done."""
        freed = self.conn.hibernate()
        if not self.parser_fresh and self._restart_parser():
            self.parser_fresh = True
            freed = True
        return freed

    def _restart_parser(self) -> bool:
        ws = self.ws
        if ws.state is not _OPEN or ws.reader.buffer or self.fragments is not None:
            return False
        # The parser is ServerProtocol.parse (until the first restart) or Protocol.parse, each
        # suspended in a chain of ``yield from``: restart only if the innermost one is the reader
        # waiting for the next frame's first byte.
        waiting = ws.parser
        while getattr(waiting, "gi_yieldfrom", None) is not None:
            waiting = waiting.gi_yieldfrom
        if getattr(waiting, "gi_code", None) is not _WAITING_FOR_A_FRAME:
            return False
        ws.parser = WsProtocol.parse(ws)  # the frame loop alone: the upgrade is done
        next(ws.parser)
        return True

    def eof_received(self):
        self.ws.receive_eof()
        return super().eof_received()

    def _upgrade(self, request: Request) -> None:
        server = self.server
        ws = self.ws
        if ws.eof_sent:
            # Bytes sent right behind the request, before its answer, broke the WebSocket rules:
            # the library parsed them in the same read and ended the connection unanswered (an
            # answer now would follow its end of stream; a refusal's raised in the library).
            server.counters["ws_upgrades_refused"] += 1
            self.conn.close(CloseReason.BAD_UPGRADE, f"WebSocket upgrade refused: what followed the request broke "
                                                     f"the WebSocket rules before it was answered ({ws.parser_exc})")
            return
        refused = server.forwarded_request(self, request.headers.get_all("X-Forwarded-For"))
        if refused is not None:
            response = ws.reject(429, "too many connections from your address; try again later\n")
        elif request.path.partition("?")[0] != server.ws_path:
            response = ws.reject(404, "not an Interlink WebSocket endpoint\n")
        else:
            response = ws.accept(request)  # checks the upgrade headers and the Origin
        ws.send_response(response)
        server.counters["ws_upgrades" if response.status_code == 101 else "ws_upgrades_refused"] += 1
        if response.status_code == 101:
            self._restart_parser()  # let go of the request's headers now, not at the first idle sweep
        else:
            reason = refused or CloseReason.BAD_UPGRADE
            self.conn.close(reason, f"WebSocket upgrade refused: {response.status_code} {response.reason_phrase}")

    def _frame(self, frame: Frame, now: float) -> None:
        opcode = frame.opcode
        if opcode is _BINARY or opcode is _CONT:
            if not frame.fin:  # a fragment; the library bounds the message's bytes to max_size
                if self.fragments is None:
                    self.fragments = [frame.data]
                elif len(self.fragments) < MAX_FRAGMENTS - 1:  # the final fragment is the last of them
                    self.fragments.append(frame.data)
                else:
                    self._fail(PROTOCOL_ERROR, f"a message in more than {MAX_FRAGMENTS} fragments")
                return
            message = frame.data
            if self.fragments is not None:
                self.fragments.append(message)
                message, self.fragments = b"".join(self.fragments), None
            self._message(message, now)
        elif opcode is _TEXT:
            self._fail(UNSUPPORTED_DATA, "a WebSocket text message (the protocol is binary messages only)")
        elif opcode is _CLOSE:
            self.conn.receive_eof(now)  # the library answers the close
        # ping and pong: answered by the library

    def _message(self, message, now: float) -> None:
        conn = self.conn
        if conn.state is State.PREAMBLE:
            if len(message) != PREAMBLE_BYTES:
                conn.close(CloseReason.BAD_PREAMBLE, f"the first message must be the {PREAMBLE_BYTES}-byte "
                                                     f"preamble, got {len(message)} bytes")
                return
            conn.receive_data(message, now)
        else:
            conn.receive_data(message_to_frame(message), now)

    # -- output

    def write(self) -> None:
        transport = self.transport
        if transport is None:
            return
        conn = self.conn
        ws = self.ws
        data = conn.data_to_send()
        if data and ws.state is _OPEN:
            self.active = True
            try:
                for message in stream_to_messages(data):
                    ws.send_binary(message)
            except LocalProtocolError:
                log.exception("unframeable output to %s", self.peer)
                conn.close(CloseReason.INTERNAL_ERROR)
        if conn.closed and ws.state is _OPEN:
            reason = conn.close_reason or ""
            ws.send_close(self.close_code or CLOSE_CODES.get(reason, NORMAL), reason)
        output = ws.data_to_send()
        if output:
            transport.write(b"".join(output))  # b"" in it asks for EOF: the close below does that
        if (conn.closed or ws.state is _CLOSED or ws.close_expected()) and not transport.is_closing():
            transport.close()
