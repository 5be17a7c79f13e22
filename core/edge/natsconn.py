"""The NATS connection a cluster node runs itself (issue 18): relayed stanzas and their answers,
the nodes' ``hello``s and ``interlink cluster status``, on an asyncio protocol with nothing
between the socket and the relay.

nats-py costs about twice the bare protocol per message (a task hop to publish, a reader task
and one per subscription to receive: ``bench/nats_floor.py``, docs/benchmarks.md "The floor under
one message at a time"), and a message at a time is what the relay's streams send. So a turn's
batches leave through ``NatsConnection.publish`` — one ``write`` in the turn that gathered them —
and arrive in ``data_received``, parsed by ``core/protocol/natswire.py`` and handed to the
subscription's callback in the same call.

What this connection does for itself, as a NATS client must:

* **The handshake, strictly in order.** The server's ``INFO`` must come alone; then TLS when the
  URL is ``tls://``, a CA is configured (``cluster.nats_ca_file``) or the server requires it —
  a server that cannot is refused, so a password never crosses in plain text where TLS was asked
  for — with a fresh reader after it; then ``CONNECT`` (the login: the URL's ``user:password``
  or token, percent-decoded, or a ``.creds`` file's user JWT and the server's nonce signed with
  its seed), the subscriptions and a ``PING``. Nothing a server sends before its ``PONG`` is
  handed on: a ``MSG`` before ``CONNECT`` is refused (no server sends one: only something in
  between), one after it is held until the ``PONG`` and handed on in order.
* ``PING``/``PONG`` both ways: a server that leaves two of ours unanswered is dropped.
* **Reconnecting** through the configured servers (in a random order per process, so nodes
  spread over them) every ``RECONNECT_WAIT_S`` plus jitter, until it is closed, its
  subscriptions restored with the connect; the ``.creds`` file read again each time (a file
  that cannot be read then keeps the last one read). It takes no server URLs from a server's
  ``INFO``: list every NATS server in ``cluster.nats``. A server whose ``max_payload`` is under
  the bound it was given is refused.
* **While away**, what is published waits (up to ``MAX_PENDING_BYTES``; nats-py's reconnect
  buffer, as the node used it, held 2 MiB) and goes out, in order, right after the next connect: a NATS blip then costs the
  relay's streams a round trip, not their deadline (dropping them made every stream in flight
  wait ``request_timeout_s``: with NATS killed after 0.3–2 s of traffic each cycle in
  ``bench/cluster_crash.py``, traffic stopped). What waited longer than ``max_wait_s`` (the cluster's request timeout: its sender was
  answered ``overloaded`` meanwhile) is dropped at the connect instead — a late ``keys.get``
  would still take prekeys nobody receives. Beyond the bound ``publish`` refuses (returns
  False): the sender's deadline answers those, and the client sends them again, in order
  (docs/architecture.md "Cluster", "Order across failures").
* **Requests**: ``new_inbox`` (``_INBOX.<inbox_prefix>.<random>``, so NATS permissions can give
  each user its own inboxes) and ``publish(..., reply=)``; a request nobody is subscribed to is
  answered by NATS with status 503 ("no responders", the reason ``CONNECT`` declares ``headers``
  when the server has them), handed to the inbox's callback as a ``None`` payload.

``connect_timeout_s`` bounds each step of a connect (TCP, the ``INFO``, TLS, the ``PONG``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import ssl
import time
from collections import Counter, deque
from urllib.parse import unquote, urlsplit

from interlink.core.errors import ConfigError, NatsProtocolError
from interlink.core.protocol import natswire

log = logging.getLogger("interlink.cluster")

PING_INTERVAL_S = 10.0  # how often this side asks the server whether it is still there
MAX_PINGS_OUT = 2  # unanswered PINGs after which the server counts as gone
RECONNECT_WAIT_S = 0.5  # between two tries of the servers after a failed one (plus up to 20 % jitter)
MAX_PENDING_BYTES = 8 * 1024 * 1024  # not yet taken by the socket, or waiting for a reconnect: beyond, publish refuses
MAX_ACCEPTED_PAYLOAD = 64 * 1024 * 1024  # what a server's INFO may announce is read up to this
NO_RESPONDERS = 503  # the status NATS answers a request with when nobody is subscribed
DEFAULT_PORT = 4222

# Connection faults that mean "try the next server" (a refused login included).
CONNECT_FAULTS = (OSError, asyncio.TimeoutError, TimeoutError, ssl.SSLError, NatsProtocolError)


class NatsServer:
    """One ``nats://`` or ``tls://`` URL of ``cluster.nats``."""

    __slots__ = ("host", "port", "tls", "user", "password")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ConfigError("cluster.nats: a NATS URL needs nats:// or tls:// and a host")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ConfigError("cluster.nats: a NATS URL has a port that is not a number") from None
        self.host, self.port, self.tls = parts.hostname, port, parts.scheme == "tls"
        self.user = unquote(parts.username) if parts.username is not None else None
        self.password = unquote(parts.password) if parts.password is not None else None

    def __repr__(self) -> str:  # never the credentials: this goes to logs
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"


def read_credentials(path: str) -> tuple[str, bytes]:
    """A ``.creds`` file's user JWT and nkey seed: the line after each ``BEGIN`` marker
    (``ConfigError`` naming the setting if it has not both)."""
    try:
        with open(path, "rb") as file:
            lines = file.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"cluster.nats_credentials: cannot read {path}: {exc.strerror or exc}") from None
    found: dict[str, bytes] = {}
    for index, line in enumerate(lines[:-1]):
        for marker, name in ((b"BEGIN NATS USER JWT", "jwt"), (b"BEGIN USER NKEY SEED", "seed")):
            if marker in line and name not in found:
                found[name] = lines[index + 1].strip()
    if not found.get("jwt") or not found.get("seed"):
        raise ConfigError(f"cluster.nats_credentials: {path} is not a NATS .creds file (it needs a user JWT and "
                          "a user nkey seed)")
    return found["jwt"].decode("ascii", "replace"), found["seed"]


def _sign_nonce(seed: bytes, nonce: str) -> str:
    import nkeys  # only a node with a .creds file needs it

    try:
        key_pair = nkeys.from_seed(bytearray(seed))
    except Exception as exc:  # nkeys raises its own kinds for a seed it cannot read
        raise ConfigError(f"cluster.nats_credentials: the user nkey seed is not usable: {type(exc).__name__}") from None
    try:
        return base64.b64encode(key_pair.sign(nonce.encode())).decode()
    finally:
        key_pair.wipe()


# The handshake's phases (``_Wire.phase``).
_INFO, _AFTER_INFO, _LOGIN, _OPEN = "info", "after info", "login", "open"


class _Wire(asyncio.Protocol):
    """One TCP (or TLS) connection to one server: reads operations and hands them on."""

    def __init__(self, owner: NatsConnection, server: NatsServer) -> None:
        self.owner, self.server = owner, server
        self.reader = natswire.NatsReader(MAX_ACCEPTED_PAYLOAD)
        self.transport: asyncio.Transport | None = None
        self.phase = _INFO
        loop = asyncio.get_running_loop()
        self.info: asyncio.Future = loop.create_future()  # the server's first INFO
        self.ready: asyncio.Future = loop.create_future()  # the PONG after CONNECT (or -ERR: refused)
        self.held: list[tuple] | None = []  # messages that came before this wire was in service
        self.pongs: deque = deque()  # per PING written after the connect: a flush's future, or None
        self.unanswered_pings = 0
        self.failed = False
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            operations = self.reader.feed(data)
            for operation in operations:
                self._operation(operation)
                if self.failed:
                    return
        except NatsProtocolError as exc:
            self._fail(exc)

    def _operation(self, operation: tuple) -> None:
        kind, phase = operation[0], self.phase
        if phase == _INFO or phase == _AFTER_INFO:
            # Before CONNECT a server sends its INFO and waits (or says why it will not: -ERR);
            # anything else is not the server.
            if kind == natswire.ERR:
                raise NatsProtocolError(f"{self.server!r} refused this node: {operation[1]}")
            if kind != natswire.INFO or phase == _AFTER_INFO:
                raise NatsProtocolError(f"{self.server!r} sent {kind} before this node's CONNECT")
            self.phase = _AFTER_INFO
            self.info.set_result(operation[1])
        elif kind == natswire.MSG or kind == natswire.HMSG:
            if self.held is not None:  # after CONNECT, before the PONG (or before the wire serves)
                self.held.append(operation)
            else:
                self.owner._deliver(operation)
        elif kind == natswire.PING_OP:
            self.transport.write(natswire.PONG)
        elif kind == natswire.PONG_OP:
            self.unanswered_pings = 0
            if phase == _LOGIN:
                self.phase = _OPEN
                self.ready.set_result(None)
            elif self.pongs:
                waiter = self.pongs.popleft()
                if waiter is not None and not waiter.done():
                    waiter.set_result(True)
        elif kind == natswire.ERR:
            if phase == _LOGIN:
                raise NatsProtocolError(f"{self.server!r} refused this node: {operation[1]}")
            # In service the server says -ERR for what it refused and goes on (a publish its
            # permissions forbid), or says why before it closes: either way, the operator reads it.
            self.owner.counters["server_errors"] += 1
            log.warning("cluster: NATS server %r: %s", self.server, operation[1])
        # INFO in service (a cluster's changes) and +OK: nothing to do

    def _fail(self, exc: Exception) -> None:
        """The connection is of no further use: say why to whoever waits, and drop it."""
        in_service = self.phase == _OPEN and self.held is None
        self.failed = True
        for future in (self.info, self.ready):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # read here: a connect that already gave up must not log it as lost
        if in_service and not isinstance(exc, ConnectionError):
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
                 credentials: str | None = None, connect_timeout_s: float = 2.0, min_max_payload: int = 0,
                 max_wait_s: float | None = None, inbox_prefix: str = "", counters=None, on_disconnected=None,
                 on_reconnected=None, echo: bool = False, clock=time.monotonic) -> None:
        self.servers = [NatsServer(url) for url in servers]
        random.shuffle(self.servers)  # nodes spread over the servers, and do not all move to the same next one
        self.name = name
        self.tls = tls
        self.credentials = credentials
        self.connect_timeout_s = connect_timeout_s
        self.min_max_payload = min_max_payload
        self.max_wait_s = max_wait_s  # what was published while away and is older at the connect is dropped
        self.clock = clock  # seconds, for max_wait_s
        self.inbox_prefix = inbox_prefix.encode()
        self.on_disconnected = on_disconnected
        self.on_reconnected = on_reconnected
        self.echo = echo  # whether the server hands this connection its own messages
        self.max_payload = natswire.DEFAULT_MAX_PAYLOAD
        # server_errors (-ERR in service), handler_errors (a callback raised), stale (PINGs unanswered),
        # reconnect_failures (one per failed try), expired_while_away (published while away, dropped at the connect)
        self.counters = counters if counters is not None else Counter()
        self.server: NatsServer | None = None  # the one connected to
        self._wire: _Wire | None = None
        self._waiting: list[tuple[float, bytes]] = []  # (when, PUB) published while away, for the next connect
        self._waiting_bytes = 0
        self._subscriptions: dict[int, tuple[bytes, object]] = {}  # sid -> (subject, callback(subject, reply, payload))
        self._next_sid = 1
        self._credentials: tuple[str, bytes] | None = None  # the last .creds read
        self._closing = False
        self._reconnecting: asyncio.Task | None = None
        self._pinger: asyncio.TimerHandle | None = None

    @property
    def connected(self) -> bool:
        return self._wire is not None

    def _live(self) -> _Wire | None:
        """The wire in service, unless it failed and waits for its ``connection_lost`` (a closed
        uvloop transport raises on ``write``)."""
        wire = self._wire
        return None if wire is None or wire.failed else wire

    # -- subscriptions and publishing

    def subscribe(self, subject: bytes, callback) -> int:
        """Call ``callback(subject, reply, payload)`` for every message on ``subject`` (wildcards
        allowed), from this connection's reads, across reconnects (``payload`` None: NATS's "no
        responders" to a request whose reply subject this is). Returns the subscription's id."""
        natswire.check_subject(subject)
        sid = self._next_sid
        self._next_sid += 1
        self._subscriptions[sid] = (subject, callback)
        wire = self._live()
        if wire is not None:
            wire.transport.write(natswire.sub_command(subject, sid))
        return sid

    def unsubscribe(self, sid: int) -> None:
        wire = self._live()
        if self._subscriptions.pop(sid, None) is not None and wire is not None:
            wire.transport.write(natswire.unsub_command(sid))

    def new_inbox(self) -> bytes:
        """A reply subject of this process's own (``_INBOX.<inbox_prefix>.<random>``; subscribe ``<inbox>.*``)."""
        prefix = b"_INBOX." + self.inbox_prefix + b"." if self.inbox_prefix else b"_INBOX."
        return prefix + os.urandom(12).hex().encode()

    def publish(self, subject: bytes, payload: bytes, reply: bytes | None = None) -> bool:
        """Write one message now, or keep it for the next connect while away; False (dropped) for
        a payload over the server's max_payload, once closed, or while ``MAX_PENDING_BYTES`` wait."""
        if len(payload) > self.max_payload or self._closing:
            return False
        wire = self._live()
        if wire is None:
            command = natswire.pub_command(subject, payload, reply)
            if self._waiting_bytes + len(command) > MAX_PENDING_BYTES:
                return False
            self._waiting.append((self.clock(), command))
            self._waiting_bytes += len(command)
            return True
        transport = wire.transport
        if transport.get_write_buffer_size() > MAX_PENDING_BYTES:
            return False
        transport.write(natswire.pub_command(subject, payload, reply))
        return True

    async def flush(self, timeout_s: float) -> bool:
        """Whether the server read everything written so far (its PONG to a PING) within ``timeout_s``."""
        wire = self._live()
        if wire is None:
            return False
        waiter = asyncio.get_running_loop().create_future()
        wire.pongs.append(waiter)
        wire.transport.write(natswire.PING)
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            return False

    def _deliver(self, operation: tuple) -> None:
        subject, sid, reply, payload = operation[1:5]
        if operation[0] == natswire.HMSG and operation[5] == NO_RESPONDERS:
            payload = None
        subscription = self._subscriptions.get(sid)
        if subscription is None:
            return  # unsubscribed while the server had it on its way
        try:
            subscription[1](subject, reply, payload)
        except Exception:  # a handler's bug must not cost the connection (or the messages after it)
            self.counters["handler_errors"] += 1
            log.exception("cluster: handling a NATS message on %s failed", subject)

    # -- connecting

    async def connect(self, attempts: int = 0) -> None:
        """Connect to the first server that takes this node, trying each ``attempts + 1`` times
        (``RECONNECT_WAIT_S`` apart); raises the last fault (``CONNECT_FAULTS``; ``ConfigError``
        for a ``.creds`` file it cannot use) if none did."""
        last: BaseException | None = None
        for attempt in range(attempts + 1):
            for server in self.servers:
                if self._closing:
                    raise ConnectionError("the connection was closed while it connected")
                try:
                    await self._connect_to(server)
                    return
                except CONNECT_FAULTS as exc:
                    last = exc
                    log.debug("cluster: NATS server %r: %s", server, exc)
                if attempt < attempts or server is not self.servers[-1]:
                    await asyncio.sleep(RECONNECT_WAIT_S)
        raise last

    async def _connect_to(self, server: NatsServer) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.connect_timeout_s
        wire = _Wire(self, server)
        transport, _ = await asyncio.wait_for(loop.create_connection(lambda: wire, server.host, server.port), timeout)
        try:
            info = await asyncio.wait_for(wire.info, timeout)
            if wire.failed:  # more came with the INFO: ``ready`` holds why
                wire.ready.result()
            max_payload = info.get("max_payload")
            max_payload = max_payload if type(max_payload) is int and max_payload > 0 else natswire.DEFAULT_MAX_PAYLOAD
            if max_payload < self.min_max_payload:
                raise NatsProtocolError(f"{server!r} allows messages of {max_payload} bytes (max_payload); a cluster "
                                        f"needs at least {self.min_max_payload} (nats-server's default is 1 MB)")
            if server.tls or self.tls is not None or info.get("tls_required"):
                if not (info.get("tls_required") or info.get("tls_available")):
                    raise NatsProtocolError(f"{server!r} does not offer TLS, which this node requires of it")
                if wire.reader.buffered:
                    raise NatsProtocolError(f"{server!r} sent more than its INFO before TLS")
                context = self.tls or ssl.create_default_context()
                transport = await loop.start_tls(transport, wire, context, server_hostname=server.host,
                                                 ssl_handshake_timeout=timeout)
                wire.transport = transport
                wire.reader = natswire.NatsReader()  # nothing read in plain text survives the upgrade
                if wire.failed:
                    wire.ready.result()
            wire.reader.max_payload = min(max_payload, MAX_ACCEPTED_PAYLOAD)
            commands = [natswire.connect_command(self._connect_fields(server, info))]
            subscribed = dict(self._subscriptions)
            commands += [natswire.sub_command(subject, sid) for sid, (subject, _) in subscribed.items()]
            commands.append(natswire.PING)
            wire.phase = _LOGIN
            transport.write(b"".join(commands))
            await asyncio.wait_for(wire.ready, timeout)
            if wire.lost:
                raise ConnectionError(f"{server!r} closed the connection")
            if self._closing:
                raise ConnectionError("the connection was closed while it connected")
        except BaseException:
            transport.abort()
            raise
        self.max_payload = wire.reader.max_payload
        self._wire, self.server = wire, server
        changed = [natswire.sub_command(subject, sid) for sid, (subject, _) in self._subscriptions.items()
                   if sid not in subscribed]  # (un)subscribed while it connected
        changed += [natswire.unsub_command(sid) for sid in subscribed if sid not in self._subscriptions]
        if changed:
            transport.write(b"".join(changed))
        if self._waiting:  # published while away: after the subscriptions, in the order published
            oldest = self.clock() - self.max_wait_s if self.max_wait_s is not None else float("-inf")
            fresh = [command for when, command in self._waiting if when >= oldest]
            self.counters["expired_while_away"] += len(self._waiting) - len(fresh)
            if fresh:
                transport.write(b"".join(fresh))
            self._waiting, self._waiting_bytes = [], 0
        self._keep_pinging()
        held, wire.held = wire.held, None
        for operation in held:  # what came with the PONG, in order, now that answers can leave
            if wire.lost or self._wire is not wire:
                break
            self._deliver(operation)

    def _connect_fields(self, server: NatsServer, info: dict) -> dict:
        fields = {"verbose": False, "pedantic": False, "lang": "python3", "version": "interlink", "protocol": 1,
                  "name": self.name, "echo": self.echo}
        if info.get("headers") is True:  # a server run without header support refuses a client asking for them
            fields["headers"] = fields["no_responders"] = True
        if self.credentials:
            jwt, seed = self._read_credentials()
            fields["jwt"] = jwt
            nonce = info.get("nonce")
            if type(nonce) is str:
                fields["sig"] = _sign_nonce(seed, nonce)
        elif server.user is not None and server.password is not None:
            fields["user"], fields["pass"] = server.user, server.password
        elif server.user is not None:
            fields["auth_token"] = server.user
        return fields

    def _read_credentials(self) -> tuple[str, bytes]:
        """The ``.creds`` file, read again (a rotated file is used); the last one read if it
        cannot be now (a rotation caught half-way must not end the reconnects)."""
        try:
            self._credentials = read_credentials(self.credentials)
        except ConfigError as exc:
            if self._credentials is None:
                raise
            log.warning("%s; using the one read before", exc)
        return self._credentials

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
                except Exception as exc:  # whatever it is, the next try may work: never stop trying
                    failures += 1
                    self.counters["reconnect_failures"] += 1
                    (log.warning if failures == 1 else log.debug)("cluster: reconnecting to NATS at %r: %s (trying "
                                                                   "every %.1f s)", server, exc, RECONNECT_WAIT_S)
                    await asyncio.sleep(RECONNECT_WAIT_S * random.uniform(1.0, 1.2))
                    if self._closing:
                        return
                    continue
                self._reconnecting = None
                if self.on_reconnected is not None:
                    self.on_reconnected()
                return

    def _keep_pinging(self) -> None:
        self._pinger = asyncio.get_running_loop().call_later(PING_INTERVAL_S, self._ping)

    def _ping(self) -> None:
        self._pinger = None
        wire = self._live()
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
        self._waiting, self._waiting_bytes = [], 0
        if wire is not None and wire.transport is not None:
            wire.transport.close()
            started = time.monotonic()
            while not wire.lost and time.monotonic() - started < 1.0:
                await asyncio.sleep(0.005)
