"""``LeanPeer``: the minimal client of every simulated device of ``interlink load`` and of the
gateway benchmarks in ``bench/``.

It keeps only what the wire needs, so the client is not the bottleneck (the SDK ``Client``'s
per-request futures, outbox and inbox cost more CPU than the gateway): the SDK's sans-I/O
``ClientConnection`` (same suites, framing and stanza coalescing) on a plain ``asyncio.Protocol``,
``on_stanza(stanza)`` for every stanza after ``welcome`` and ``on_batch_end(peer)`` once the
stanzas of one read were handed out (to answer them with one ``recv``; it gets the peer because
the first batch may come with ``welcome``). Stanzas go out pre-encoded (``queue``), flushed at the
end of the read that queued them or else once per loop turn, coalesced into as few transport
messages as fit.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from interlink.core.protocol.certs import generate_static_key
from interlink.core.protocol.connection import ClientConnection, ConnectionClosed, StanzaReceived, Welcomed
from interlink.core.protocol.noise import Suite
from interlink.core.protocol.wire import TAG_BYTES
from interlink.wstransport import WebSocketStream, websocket_uri
from websockets.uri import parse_uri

__all__ = ["AGENT", "LeanPeer"]

AGENT = "interlink-bench/lean"
MAX_REDIRECTS = 2  # bye redirect followed at most this often per connect (as the SDK's Client)


def _ignore_stanza(stanza: dict) -> None:
    return None


class LeanPeer(asyncio.Protocol):
    """One authenticated device session. Create it with ``await LeanPeer.connect(...)``."""

    def __init__(
        self,
        conn: ClientConnection,
        on_stanza: Callable[[dict], None],
        on_batch_end: Callable[[LeanPeer], None] | None,
    ) -> None:
        self.conn = conn
        self.on_stanza = on_stanza
        self.on_batch_end = on_batch_end
        self.welcome: dict | None = None
        self.close_reason: str | None = None  # set when the session ended, for whatever reason
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._welcomed: asyncio.Future = self._loop.create_future()
        self._lost: asyncio.Future = self._loop.create_future()
        self._in_read = False  # queued stanzas are flushed at the end of the read
        self._flush_scheduled = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        token: str,
        device: int,
        root_public: bytes,
        suite: int = Suite.XX_CHACHAPOLY,
        server_static: bytes | None = None,
        on_stanza: Callable[[dict], None] = _ignore_stanza,
        on_batch_end: Callable[[LeanPeer], None] | None = None,
        timeout_s: float = 30.0,
        ws_path: str | None = None,
        local_addr: tuple[str, int] | None = None,
    ) -> LeanPeer:
        """Connect, handshake (a fresh X25519 static key, as ``Client.connect`` makes), check the
        node certificate against ``root_public`` and wait for ``welcome``. With ``ws_path``, over
        WebSocket to ``ws://host:port/ws_path`` (``port`` being the gateway's ``ws_port``).
        ``local_addr``: the address to connect from (a benchmark's distinct loopback sources).
        A cluster's ``bye redirect`` is followed (at most ``MAX_REDIRECTS`` times, as XX)."""
        for hops in range(MAX_REDIRECTS + 1):
            conn = ClientConnection(
                suite=suite, static_private=generate_static_key(), root_public=root_public, token=token,
                device=device, agent=AGENT, server_static=server_static,
            )
            peer = cls(conn, on_stanza, on_batch_end)
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(timeout_s):
                    if ws_path is None:
                        await loop.create_connection(lambda: peer, host, port, local_addr=local_addr)
                    else:
                        uri = websocket_uri(host, port, ws_path)
                        await loop.create_connection(lambda: WebSocketStream(peer, uri), host, port, local_addr=local_addr)
                    conn.start(time.time())
                    peer.flush()
                    await peer._welcomed
            except BaseException:
                if peer.transport is not None:
                    peer.transport.abort()
                bye = conn.bye
                if hops == MAX_REDIRECTS or bye is None or bye.get("reason") != "redirect":
                    raise
                if ws_path is None:
                    host, port = bye.get("host"), bye.get("port")
                else:
                    if type(bye.get("ws")) is not str:
                        raise
                    uri = parse_uri(bye["ws"])
                    host, port, ws_path = uri.host, uri.port, uri.resource_name
                if type(host) is not str or type(port) is not int:
                    raise
                suite, server_static = Suite(suite).as_xx(), None  # another node's static key
                continue
            return peer
        raise AssertionError("unreachable: the last hop returns or raises")

    # -- sending

    def queue(self, encoded: bytes) -> None:
        """Queue one encoded stanza; it leaves with the next flush (end of read or loop turn)."""
        self.conn.send_encoded(encoded)
        if not self._in_read and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write everything queued, coalesced into as few transport messages as fit a frame."""
        self._flush_scheduled = False  # a scheduled flush that finds nothing queued is harmless
        conn = self.conn
        data = conn.data_to_send()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if data:
            transport.write(data)
        if conn.closed:
            transport.close()

    @property
    def user(self) -> str:
        return self.welcome["user"]

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    async def close(self, timeout_s: float = 5.0) -> None:
        """Close the connection (the gateway keeps what was not received for the next session)."""
        if self.transport is None:
            return
        if not self.transport.is_closing():
            self.conn.close()
            self._note_closed("client_closed")
            self.transport.close()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._lost)
        except TimeoutError:
            self.transport.abort()

    # -- asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.receive_data(data, time.time())
        self._in_read = True
        try:
            on_stanza = self.on_stanza
            for event in conn.events():
                if type(event) is StanzaReceived:
                    on_stanza(event.stanza)
                elif type(event) is Welcomed:
                    self._on_welcome(event.welcome)
                elif type(event) is ConnectionClosed:
                    self._note_closed(event.reason, event.code, event.message)
            if self.on_batch_end is not None:
                self.on_batch_end(self)
        finally:
            self._in_read = False
        self.flush()

    def eof_received(self):
        self.conn.receive_eof(time.time())
        self._note_closed("peer_closed")
        return False

    def connection_lost(self, exc) -> None:
        self.conn.connection_lost()
        self._note_closed("connection_lost", message=str(exc or ""))
        if not self._lost.done():
            self._lost.set_result(None)

    # -- internals

    def _on_welcome(self, welcome: dict) -> None:
        # Never send frames larger than the gateway announced it accepts (as the SDK does).
        limits = welcome.get("limits")
        max_frame = limits.get("max_frame") if isinstance(limits, dict) else None
        if type(max_frame) is int and TAG_BYTES < max_frame:
            self.conn.max_plaintext_bytes = min(self.conn.max_plaintext_bytes, max_frame - TAG_BYTES)
        self.welcome = welcome
        if not self._welcomed.done():
            self._welcomed.set_result(welcome)

    def _note_closed(self, reason: str, code: str | None = None, message: str = "") -> None:
        if self.close_reason is None:
            self.close_reason = f"{reason} ({code}: {message})" if code else (f"{reason}: {message}" if message else reason)
        if not self._welcomed.done():
            self._welcomed.set_exception(ConnectionError(f"session closed before welcome: {self.close_reason}"))
