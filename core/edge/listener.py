"""The gateway's listening sockets, accepted in a loop, each connection admitted on the address
``accept()`` returned before anything is built for it.

Why not ``loop.create_server``: libuv, under uvloop, accepts one connection per event-loop turn
since 1.45 (libuv PR #3696, "don't accept() connections in a loop"). While the loop is busy
serving sessions, a turn takes milliseconds, so a connection storm from one address fills the
kernel's accept queue however cheaply each connection is then refused, and every other client's
SYN is dropped and retried a second later (docs/benchmarks.md "A flood from one source": 1.5–4 s
handshakes for a well-behaved client). Here each time a socket is readable up to
``ACCEPTS_PER_TURN`` connections are taken; one the limits refuse (``GatewayServer.accept``) is
reset at once, before a transport or protocol exists; an admitted one gets its uvloop transport
through ``connect_accepted_socket``.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import logging
import socket
import struct

log = logging.getLogger("interlink.server")

ACCEPTS_PER_TURN = 1024  # connections taken per readiness of one socket (the rest: the next turn)
OUT_OF_FILES_PAUSE_S = 0.1  # accepting stops this long when the process has no descriptor left
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset, no TIME_WAIT
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def listening_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address ``host`` resolves to (as
    ``create_server`` makes them: SO_REUSEADDR, IPv6 sockets IPv6-only)."""
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def reset(conn) -> None:
    """Close a refused connection with a reset: nothing is written, nothing lingers."""
    with contextlib.suppress(OSError):  # the peer is already gone: the close is all there is to do
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    conn.close()


class Listener:
    """One listener's sockets (the TCP port, or the WebSocket port) and their accept loop."""

    def __init__(self, server, sockets: list[socket.socket], protocol_class) -> None:
        self.server = server
        self.sockets = sockets
        self.protocol_class = protocol_class
        self._loop = asyncio.get_running_loop()
        self._opening: set[asyncio.Task] = set()  # connections whose transport is being made

    def start(self) -> None:
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting and close the sockets. Connections already open go on; one still being
        opened is dropped (its protocol is forgotten)."""
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()
        for task in list(self._opening):
            task.cancel()

    @property
    def addresses(self) -> list[tuple]:
        return [sock.getsockname() for sock in self.sockets if sock.fileno() >= 0]

    def _accept(self, sock: socket.socket) -> None:
        server = self.server
        # socket.accept() without its Python-level socket object (its enum properties cost more
        # than the refusal): a refused connection never needs one.
        accept, family, kind = sock._accept, int(sock.family), int(sock.type)
        for _ in range(ACCEPTS_PER_TURN):
            try:
                fd, address = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES:
                    continue  # this connection's own failure (aborted, a network error): the next one
                # Out of descriptors or memory: the queue waits in the kernel meanwhile.
                log.warning("cannot accept connections: %s; trying again in %.1f s", exc.strerror, OUT_OF_FILES_PAUSE_S)
                server.counters["accept_failures"] += 1
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(OUT_OF_FILES_PAUSE_S, self._resume, sock)
                return
            try:
                proto = server.accept(self.protocol_class, address)
            except Exception:  # a bug of ours costs this connection, never the listener
                log.exception("admitting a connection from %s failed", address)
                server.counters["internal_errors"] += 1
                proto = None
            if proto is None:  # refused and counted
                reset(_socket.socket(family, kind, 0, fd))
                continue
            conn = socket.socket(family, kind, 0, fileno=fd)
            conn.setblocking(False)
            task = self._loop.create_task(self._loop.connect_accepted_socket(lambda proto=proto: proto, conn))
            self._opening.add(task)
            task.add_done_callback(lambda done, proto=proto, conn=conn: self._opened(done, proto, conn))

    def _opened(self, task: asyncio.Task, proto, conn: socket.socket) -> None:
        self._opening.discard(task)
        if task.cancelled() or task.exception() is not None:
            # No transport: the connection is gone before its protocol heard of it.
            if not task.cancelled():
                log.info("an accepted connection could not be opened: %s", task.exception())
            self.server.forget(proto)
            conn.close()

    def _resume(self, sock: socket.socket) -> None:
        if sock.fileno() >= 0:
            self._loop.add_reader(sock.fileno(), self._accept, sock)
