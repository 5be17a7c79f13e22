"""The NATS connection a cluster node's data path runs itself (issue 18): relayed stanzas and
their answers, published and received on an asyncio protocol with nothing between the socket
and the relay.

nats-py costs about twice the bare protocol per message (a task hop to publish, a reader task
and one per subscription to receive: ``bench/nats_floor.py``, docs/benchmarks.md "The floor under
one message at a time"), and a message at a time is what the relay's streams send. So the
relayed stanzas leave through ``NatsConnection.publish`` — one ``write`` in the turn that
gathered them — and arrive in ``data_received``, parsed by ``core/protocol/natswire.py`` and
handed to the subscription's callback in the same call. nats-py still carries what is rare
(hello, ``cluster status``).

What this connection does for itself, as a NATS client must: the server's ``INFO``, TLS (a
``tls://`` URL, or a server that requires it; verified against ``cluster.nats_ca_file`` or the
system's CAs), the login (a URL's ``user:password`` or token, or a ``.creds`` file: its user JWT
and the nonce signed with its seed, read again at each connect so a rotated file is used),
``PING``/``PONG`` both ways (a server that leaves two of ours unanswered is dropped), and
reconnecting through the configured servers in turn, its subscriptions restored before the
``PONG`` that ends a connect. It takes no server URLs from a server's ``INFO``: list every NATS
server in ``cluster.nats``.

While it is not connected, ``publish`` refuses (returns False) instead of buffering: what the
relay sent meanwhile is answered by its deadline and sent again by the client, in order
(docs/architecture.md "Cluster", "Order across failures").
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
import time
from collections import Counter, deque
from urllib.parse import unquote, urlsplit

from interlink.core.errors import ConfigError, NatsProtocolError
from interlink.core.protocol import natswire

log = logging.getLogger("interlink.cluster")

PING_INTERVAL_S = 10.0  # how often this side asks the server whether it is still there
MAX_PINGS_OUT = 2  # unanswered PINGs after which the server counts as gone
RECONNECT_WAIT_S = 0.5  # between two tries of the servers after a failed one
MAX_PENDING_BYTES = 8 * 1024 * 1024  # written but not yet taken by the socket: beyond, publish refuses
DEFAULT_PORT = 4222
_CREDS_SECTION = re.compile(rb"-{3,}[^\n]*BEGIN ([A-Z ]+)-{3,}\s*\n\s*(\S+)\s*\n\s*-{3,}[^\n]*END")

# Connection faults that mean "try the next server" (a refused login included).
CONNECT_FAULTS = (OSError, asyncio.TimeoutError, TimeoutError, ssl.SSLError, NatsProtocolError)


class NatsServer:
    """One ``nats://`` or ``tls://`` URL of ``cluster.nats``."""

    __slots__ = ("url", "host", "port", "tls", "user", "password")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ConfigError("cluster.nats: a NATS URL needs nats:// or tls:// and a host")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ConfigError("cluster.nats: a NATS URL has a port that is not a number") from None
        self.url, self.host, self.port, self.tls = url, parts.hostname, port, parts.scheme == "tls"
        self.user = unquote(parts.username) if parts.username is not None else None
        self.password = unquote(parts.password) if parts.password is not None else None

    def __repr__(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"


def read_credentials(path: str) -> tuple[str, bytes]:
    """A ``.creds`` file's user JWT and nkey seed (``ConfigError`` naming the setting if it has not both)."""
    try:
        with open(path, "rb") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError(f"cluster.nats_credentials: cannot read {path}: {exc.strerror or exc}") from None
    sections = {name.strip(): value for name, value in _CREDS_SECTION.findall(text)}
    jwt, seed = sections.get(b"NATS USER JWT"), sections.get(b"USER NKEY SEED")
    if not jwt or not seed:
        raise ConfigError(f"cluster.nats_credentials: {path} is not a NATS .creds file (it needs a user JWT and "
                          "a user nkey seed)")
    return jwt.decode("ascii", "replace"), seed


def _sign_nonce(seed: bytes, nonce: str) -> str:
    import nkeys  # only a node with a .creds file needs it

    key_pair = nkeys.from_seed(bytearray(seed))
    try:
        return base64.b64encode(key_pair.sign(nonce.encode())).decode()
    finally:
        key_pair.wipe()


class _Wire(asyncio.Protocol):
    """One TCP (or TLS) connection to one server: reads operations and hands them on."""

    def __init__(self, owner: NatsConnection, server: NatsServer) -> None:
        self.owner, self.server = owner, server
        self.reader = natswire.NatsReader()
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.info: asyncio.Future = loop.create_future()  # the server's first INFO
        self.ready: asyncio.Future = loop.create_future()  # the PONG after CONNECT (or -ERR: refused)
        self.pongs: deque = deque()  # per PING written after the connect: a flush's future, or None
        self.unanswered_pings = 0
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            operations = self.reader.feed(data)
        except NatsProtocolError as exc:
            self._fail(exc)
            return
        owner = self.owner
        for operation in operations:
            kind = operation[0]
            if kind == natswire.MSG:
                owner._deliver(operation[1], operation[2], operation[4])
            elif kind == natswire.PING_OP:
                self.transport.write(natswire.PONG)
            elif kind == natswire.PONG_OP:
                self._pong()
            elif kind == natswire.INFO:
                if not self.info.done():
                    self.info.set_result(operation[1])
            elif kind == natswire.ERR:
                self._error(operation[1])
            if self.lost:
                return

    def _pong(self) -> None:
        self.unanswered_pings = 0
        if not self.ready.done():
            self.ready.set_result(None)
        elif self.pongs:
            waiter = self.pongs.popleft()
            if waiter is not None and not waiter.done():
                waiter.set_result(True)

    def _error(self, text: str) -> None:
        if not self.ready.done():
            self._fail(NatsProtocolError(f"{self.server!r} refused this node: {text}"))
            return
        # After the connect the server says -ERR for what it refused and goes on (a publish its
        # permissions forbid), or says why before it closes: either way, the operator reads it.
        self.owner.counters["server_errors"] += 1
        log.warning("cluster: NATS server %r: %s", self.server, text)

    def _fail(self, exc: Exception) -> None:
        """The connection is of no further use: say why to whoever waits, and drop it."""
        established = self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None
        for future in (self.info, self.ready):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # read here: a connect that already gave up must not log it as lost
        if established and not isinstance(exc, ConnectionError):
            log.error("cluster: dropping the NATS connection to %r: %s", self.server, exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        self.lost = True
        self._fail(ConnectionError(f"{self.server!r} closed the connection" + (f": {exc}" if exc else "")))
        while self.pongs:
            waiter = self.pongs.popleft()
            if waiter is not None and not waiter.done():
                waiter.set_result(False)
        self.owner._lost(self)


class NatsConnection:
    """A NATS client connection that keeps itself connected (see the module's docstring)."""

    def __init__(self, servers: list[str], *, name: str, tls: ssl.SSLContext | None = None,
                 credentials: str | None = None, connect_timeout_s: float = 2.0, counters=None,
                 on_disconnected=None, on_reconnected=None) -> None:
        self.servers = [NatsServer(url) for url in servers]
        self.name = name
        self.tls = tls
        self.credentials = credentials
        self.connect_timeout_s = connect_timeout_s
        self.on_disconnected = on_disconnected
        self.on_reconnected = on_reconnected
        self.max_payload = natswire.DEFAULT_MAX_PAYLOAD
        # server_errors (-ERR after the connect), handler_errors (a callback raised), stale (PINGs unanswered)
        self.counters = counters if counters is not None else Counter()
        self.server: NatsServer | None = None  # the one connected to
        self._wire: _Wire | None = None
        self._subscriptions: dict[int, tuple[bytes, object]] = {}  # sid -> (subject, callback(subject, payload))
        self._next_sid = 1
        self._closing = False
        self._reconnecting: asyncio.Task | None = None
        self._pinger: asyncio.TimerHandle | None = None

    @property
    def connected(self) -> bool:
        return self._wire is not None

    # -- subscriptions and publishing

    def subscribe(self, subject: bytes, callback) -> int:
        """Call ``callback(subject, payload)`` for every message on ``subject`` (wildcards allowed),
        from this connection's reads, across reconnects. Returns the subscription's id."""
        natswire.check_subject(subject)
        sid = self._next_sid
        self._next_sid += 1
        self._subscriptions[sid] = (subject, callback)
        if self._wire is not None:
            self._wire.transport.write(natswire.sub_command(subject, sid))
        return sid

    def unsubscribe(self, sid: int) -> None:
        if self._subscriptions.pop(sid, None) is not None and self._wire is not None:
            self._wire.transport.write(natswire.unsub_command(sid))

    def publish(self, subject: bytes, payload: bytes) -> bool:
        """Write one message now; False (nothing written) while not connected, for a payload over
        the server's max_payload or while the socket has not taken ``MAX_PENDING_BYTES`` already."""
        wire = self._wire
        if wire is None or len(payload) > self.max_payload:
            return False
        transport = wire.transport
        if transport.get_write_buffer_size() > MAX_PENDING_BYTES:
            return False
        transport.write(natswire.pub_command(subject, payload))
        return True

    async def flush(self, timeout_s: float) -> bool:
        """Whether the server read everything written so far (its PONG to a PING) within ``timeout_s``."""
        wire = self._wire
        if wire is None:
            return False
        waiter = asyncio.get_running_loop().create_future()
        wire.pongs.append(waiter)
        wire.transport.write(natswire.PING)
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            return False

    def _deliver(self, subject: str, sid: int, payload: bytes) -> None:
        subscription = self._subscriptions.get(sid)
        if subscription is None:
            return  # unsubscribed while the server had it on its way
        try:
            subscription[1](subject, payload)
        except Exception:  # a handler's bug must not cost the connection (or the messages after it)
            self.counters["handler_errors"] += 1
            log.exception("cluster: handling a NATS message on %s failed", subject)

    # -- connecting

    async def connect(self, attempts: int = 0) -> None:
        """Connect to the first server that takes this node, trying each ``attempts + 1`` times
        (``RECONNECT_WAIT_S`` apart); raises the last fault (``CONNECT_FAULTS``) if none did."""
        last: BaseException | None = None
        for _ in range(attempts + 1):
            for server in self.servers:
                try:
                    await self._connect_to(server)
                    return
                except CONNECT_FAULTS as exc:
                    last = exc
                    log.debug("cluster: NATS server %r: %s", server, exc)
                await asyncio.sleep(RECONNECT_WAIT_S)
        raise last

    async def _connect_to(self, server: NatsServer) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.connect_timeout_s
        wire = _Wire(self, server)
        transport, _ = await asyncio.wait_for(loop.create_connection(lambda: wire, server.host, server.port), timeout)
        try:
            info = await asyncio.wait_for(wire.info, timeout)
            if server.tls or info.get("tls_required"):
                if not (info.get("tls_required") or info.get("tls_available")):
                    raise NatsProtocolError(f"{server!r} does not offer TLS, and the URL asks for it")
                context = self.tls or ssl.create_default_context()
                transport = await loop.start_tls(transport, wire, context, server_hostname=server.host,
                                                 ssl_handshake_timeout=timeout)
                wire.transport = transport
            max_payload = info.get("max_payload")
            if type(max_payload) is int and max_payload > 0:
                wire.reader.max_payload = max_payload
            commands = [natswire.connect_command(self._connect_fields(server, info))]
            commands += [natswire.sub_command(subject, sid) for sid, (subject, _) in self._subscriptions.items()]
            commands.append(natswire.PING)
            transport.write(b"".join(commands))
            await asyncio.wait_for(wire.ready, timeout)
        except BaseException:
            transport.abort()
            raise
        if wire.lost:
            raise ConnectionError(f"{server!r} closed the connection")
        self.max_payload = wire.reader.max_payload
        self._wire, self.server = wire, server
        self._keep_pinging()

    def _connect_fields(self, server: NatsServer, info: dict) -> dict:
        fields = {"verbose": False, "pedantic": False, "lang": "python3", "version": "interlink", "protocol": 1,
                  "name": self.name, "echo": False}
        if self.credentials:
            jwt, seed = read_credentials(self.credentials)
            fields["jwt"] = jwt
            nonce = info.get("nonce")
            if type(nonce) is str:
                fields["sig"] = _sign_nonce(seed, nonce)
        elif server.user is not None and server.password is not None:
            fields["user"], fields["pass"] = server.user, server.password
        elif server.user is not None:
            fields["auth_token"] = server.user
        return fields

    def _lost(self, wire: _Wire) -> None:
        if wire is not self._wire:
            return  # a connect that failed: its caller has the fault
        self._wire = None
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        if self._closing:
            return
        if self.on_disconnected is not None:
            self.on_disconnected()
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect(wire.server))

    async def _reconnect(self, lost: NatsServer) -> None:
        """Try the servers in turn, the one lost last, until one takes this node or it closes."""
        start = self.servers.index(lost) + 1 if lost in self.servers else 0
        order = self.servers[start:] + self.servers[:start]
        failures = 0
        while not self._closing:
            for server in order:
                try:
                    await self._connect_to(server)
                except CONNECT_FAULTS as exc:
                    failures += 1
                    (log.warning if failures == 1 else log.debug)("cluster: reconnecting to NATS at %r: %s (trying "
                                                                   "on every %.1f s)", server, exc, RECONNECT_WAIT_S)
                    await asyncio.sleep(RECONNECT_WAIT_S)
                    continue
                self._reconnecting = None
                if self.on_reconnected is not None:
                    self.on_reconnected()
                return

    def _keep_pinging(self) -> None:
        self._pinger = asyncio.get_running_loop().call_later(PING_INTERVAL_S, self._ping)

    def _ping(self) -> None:
        self._pinger = None
        wire = self._wire
        if wire is None:
            return
        if wire.unanswered_pings >= MAX_PINGS_OUT:
            self.counters["stale"] += 1
            wire._fail(NatsProtocolError(f"{wire.server!r} left {MAX_PINGS_OUT} PINGs unanswered for "
                                         f"{PING_INTERVAL_S * MAX_PINGS_OUT:.0f} s"))
            return
        wire.unanswered_pings += 1
        wire.pongs.append(None)
        wire.transport.write(natswire.PING)
        self._keep_pinging()

    async def close(self) -> None:
        """Leave the server (what is written goes out first) and stop reconnecting."""
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            self._reconnecting = None
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        wire, self._wire = self._wire, None
        if wire is not None and wire.transport is not None:
            wire.transport.close()
            started = time.monotonic()
            while not wire.lost and time.monotonic() - started < 1.0:
                await asyncio.sleep(0.005)
