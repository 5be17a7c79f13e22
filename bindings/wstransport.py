"""Clients over WebSocket (docs/protocol.md §1): the SDK's ``Client.connect(..., ws_path=...)``
and the load tool's ``LeanPeer`` speak the protocol over WebSocket instead of raw TCP, as a
browser does, without changing how they work.

``WebSocketStream`` sits between the TCP connection and a byte-stream ``asyncio.Protocol`` (the
client's): to that protocol it is the transport. ``write`` takes the state machine's TCP-form
output (the preamble, then length-prefixed frames) and sends each Noise message as one binary
WebSocket message; each message received goes to ``data_received`` as the frame it stands for
(``core/protocol/wsframes.py``). The WebSocket protocol is the ``websockets`` library's sans-I/O
``ClientProtocol``. What is written before the gateway accepted the upgrade waits here; a
refused upgrade ends the connection with ``UpgradeRefusedError``.
"""

from __future__ import annotations

import asyncio

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State as WsState
from websockets.uri import parse_uri

from interlink.core.errors import UpgradeRefusedError
from interlink.core.protocol.wire import WIRE_MAX_FRAME_BYTES
from interlink.core.protocol.wsframes import message_to_frame, stream_to_messages


def websocket_uri(host: str, port: int, path: str, *, tls: bool = False) -> str:
    if not path.startswith("/"):
        raise ValueError(f"ws_path must start with '/', got {path!r}")
    host = f"[{host}]" if ":" in host else host
    return f"{'wss' if tls else 'ws'}://{host}:{port}{path}"


class WebSocketStream(asyncio.Protocol):
    """The TCP connection's protocol, and the transport of ``inner`` (see the module docstring).
    Use as ``loop.create_connection(lambda: WebSocketStream(inner, uri), host, port)``."""

    def __init__(self, inner: asyncio.Protocol, uri: str, *, origin: str | None = None) -> None:
        self.inner = inner
        self._fragments: list | None = None  # a message a proxy on the way split into frames
        self.ws = ClientProtocol(parse_uri(uri), origin=origin, max_size=WIRE_MAX_FRAME_BYTES)
        self.transport: asyncio.Transport | None = None
        self._waiting: list | None = []  # messages written before the upgrade was accepted
        self._preamble_due = True  # the first write starts with the preamble, a message of its own
        self._refused: UpgradeRefusedError | None = None

    # -- asyncio.Protocol: the TCP connection

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.ws.send_request(self.ws.connect())
        self._flush()
        self.inner.connection_made(self)

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        for event in ws.events_received():
            if type(event) is Frame:
                if event.opcode is Opcode.BINARY or event.opcode is Opcode.CONT:
                    # The gateway sends each message in one frame; a proxy may split it.
                    if not event.fin:
                        self._fragments = self._fragments or []
                        self._fragments.append(event.data)
                        continue
                    message = event.data
                    if self._fragments is not None:
                        self._fragments.append(message)
                        message, self._fragments = b"".join(self._fragments), None
                    self.inner.data_received(message_to_frame(message))
                elif event.opcode is Opcode.CLOSE:
                    self.inner.eof_received()
            elif type(event) is Response:
                self._upgraded()
        self._flush()

    def eof_received(self):
        self.ws.receive_eof()
        if self._refused is not None:
            return False  # connection_lost tells the inner protocol why
        return self.inner.eof_received()

    def connection_lost(self, exc) -> None:
        self.inner.connection_lost(self._refused or exc)

    def _upgraded(self) -> None:
        if self.ws.handshake_exc is not None:
            self._refused = UpgradeRefusedError(f"WebSocket upgrade refused: {self.ws.handshake_exc}")
            self._close_socket()
            return
        waiting, self._waiting = self._waiting, None
        for message in waiting:
            self.ws.send_binary(message)

    # -- asyncio.Transport, for the inner protocol

    def write(self, data) -> None:
        messages = stream_to_messages(data, preamble=self._preamble_due)
        self._preamble_due = False
        if self._waiting is not None:
            self._waiting.extend(bytes(message) for message in messages)
        elif self.ws.state is WsState.OPEN:
            for message in messages:
                self.ws.send_binary(message)
            self._flush()

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.ws.state is WsState.OPEN:
            self.ws.send_close()
            self._flush()
        self._close_socket()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def get_extra_info(self, name: str, default=None):
        return self.transport.get_extra_info(name, default) if self.transport is not None else default

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def _close_socket(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _flush(self) -> None:
        output = self.ws.data_to_send()
        if output and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(output))
