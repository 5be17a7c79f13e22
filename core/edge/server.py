"""The I/O edge: the asyncio/uvloop TCP server and its per-connection ``BufferedProtocol`` adapter.

Everything protocol-related happens in ``ServerConnection`` (sans-I/O); this module only moves
bytes, runs timers and calls the edge services (token verification, the store). Design notes:

* One receive buffer for the whole server: uvloop reads into it and calls ``buffer_updated``
  synchronously, so connections never own a read buffer while idle.
* One timer heap for all connections instead of a timer handle each (pre-auth deadlines, token
  expiry): an idle connection costs the protocol object, its state machine and the transport.
* Idle sessions hibernate right after ``welcome`` (the AEAD contexts, 1.6–2.5 KB of OpenSSL
  state each, two per session, are freed; the next message recreates them from the keys); the
  periodic sweeps are ``core/edge/sweeps.py``.
* Token verification may await a JWKS fetch; it runs in a task per handshake so the loop never
  blocks, and the connection only acts on the verdict if it is still open.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import heapq
import logging
import os
import time
import types
from collections.abc import Callable
from collections import Counter
from dataclasses import dataclass

from interlink.core.domain.auth import Identity, ProviderRegistry, TokenVerifier
from interlink.core.protocol.connection import (
    AuthRequested,
    ConnectionClosed,
    ServerConnection,
    ServerSettings,
    StanzaReceived,
    State,
)
from interlink.core.edge.clusterlink import ClusterLink
from interlink.core.edge.commit import CommitDriver
from interlink.core.edge.listener import Listener, listening_sockets
from interlink.core.edge.offload import SerialOffload, ThreadOffload
from interlink.core.edge.push import PushDispatcher
from interlink.core.edge.sources import SourceLimits, TrustedProxies, is_loopback, source_of
from interlink.core.edge.sweeps import Sweeps
from interlink.core.domain.dispatch import Domain
from interlink.core.errors import AuthError, CloseReason, ProxyHeaderError, StoreLimitError
from interlink.core.protocol.proxyheader import parse_proxy_header
from interlink.core.domain.blobs import BlobLimits
from interlink.core.domain.ports import BlobFiles, Store

log = logging.getLogger("interlink.server")

READ_BUFFER_BYTES = 256 * 1024
BULK_READS_PER_TURN = 1  # connections that filled a whole read buffer, read again per loop turn
BULK_PAUSE_WRITE_BYTES = 4 << 20  # blob chunk bytes waiting for the writer thread past which bulk is not read
BULK_PAUSE_S = 0.002
# While admission control throttles (core/domain/admission.py), a read takes at most this much
# from one socket: each turn then reads a little from every sender instead of a lot from a few,
# which keeps turns short, and the recv round trips that pace deliveries quick.
THROTTLED_READ_BYTES = 16 * 1024
BLOB_WORKERS = 2  # threads that sync and hash blobs (the loop never waits for a disk flush of one)
WRITE_HIGH_WATER_BYTES = 256 * 1024  # past this, stop reading from the peer until its output drains
_SOURCE_LIMITS = ("max_preauth_per_source", "handshakes_per_s_per_source", "handshake_budget_per_s")
_ROUTINE_CLOSES = frozenset({CloseReason.PEER_CLOSED, CloseReason.DRAIN, CloseReason.REPLACED, CloseReason.AUTH_EXPIRED})
_NO_CLAIMS = types.MappingProxyType({})  # shared by every open session's identity


@dataclass(slots=True)
class Limits(BlobLimits):
    """Limits announced in ``welcome`` and enforced by the gateway (each a configuration key of
    the same name, where its default is written); the blobs' are inherited from ``BlobLimits``."""

    max_frame_bytes: int
    max_devices: int
    max_group: int
    window: int
    max_connections: int
    max_preauth_connections: int  # connections still in preamble/handshake/auth
    max_preauth_per_source: int  # the same, per source address (core/edge/sources.py)
    handshakes_per_s_per_source: float  # new connections per second per source (burst: twice that)
    handshake_budget_per_s: float  # new connections per second for the gateway; quiet sources pass it
    source_limits_on_loopback: bool  # off: loopback clients (a local proxy, tests) are not limited per source
    message_rate_per_device: float  # msg + rcpt + state per second (burst: twice that)
    message_rate_per_user: float
    overload_turn_messages: int  # admission control (core/domain/admission.py)
    overload_refuse_after_s: float

    @classmethod
    def from_config(cls, config, **overrides) -> Limits:
        """The limits of a configuration (anything with attributes of the same names)."""
        return cls(**{spec.name: overrides.get(spec.name, getattr(config, spec.name)) for spec in dataclasses.fields(cls)})

    def announce(self) -> dict:
        return {
            "max_frame": self.max_frame_bytes,
            "max_devices": self.max_devices,
            "max_group": self.max_group,
            "window": self.window,
        }


class GatewayProtocol(asyncio.BufferedProtocol):
    """Adapter between one uvloop transport and one ``ServerConnection``: bytes in
    (``buffer_updated``), the connection's events to the server (``GatewayServer.serve``), bytes
    out (``write``) — three separate steps."""

    # Per-connection memory matters (docs/benchmarks.md): rarely-set state (a pending key fetch,
    # a paused peer) lives in the server's dicts, not in a slot every connection pays for.
    __slots__ = ("server", "conn", "transport", "active", "timer_at")
    listener = "tcp"  # which listener accepted it: its trusted proxies (the WebSocket one: "ws")

    def __init__(self, server: GatewayServer) -> None:
        self.server = server
        self.conn: ServerConnection | None = None
        self.transport: asyncio.Transport | None = None
        self.active = True  # moved bytes since the last idle sweep
        self.timer_at: float | None = None  # deadline of this connection's one entry in the timer heap

    # -- asyncio callbacks

    def connection_made(self, transport) -> None:
        # Admitted already, on accept()'s address (GatewayServer.accept, core/edge/listener.py).
        self.transport = transport
        server = self.server
        server.opening.pop(self, None)
        self.conn = ServerConnection(server.settings, server.clock())
        if server.draining:  # accepted just before the drain began: it gets no session
            self.conn.close(CloseReason.DRAIN)
            self.conn.events()
            server.forget(self)
            transport.abort()
            return
        server.connections[self.conn] = self
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
        server.counters["connections_accepted"] += 1
        server.schedule(self)

    @property
    def peer(self):
        """The client's address: the one a trusted proxy named, else the socket's peer (looked up
        on demand: most connections never need it)."""
        forwarded = self.server.forwarded.get(self)
        if forwarded is not None:
            return forwarded
        return self.transport.get_extra_info("peername") if self.transport is not None else None

    def hibernate(self) -> bool:
        """The connection has been quiet a while: shrink it (``ServerConnection.hibernate``).
        True if memory was freed."""
        return self.conn.hibernate()

    def __lt__(self, other: GatewayProtocol) -> bool:
        # Orders timer-heap entries with equal deadlines, so the heap needs no sequence numbers.
        return id(self) < id(other)

    def pause_writing(self) -> None:
        # The peer does not read what we send (the output passed the high-water mark): stop
        # reading what it sends, and stop pushing deliveries, which stay in the mailbox. Bounds
        # per-connection output memory; a peer stuck like this gets bye slow_consumer.
        server = self.server
        server.paused[self] = server.clock()
        server.router.pause(self.conn)
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        server = self.server
        server.paused.pop(self, None)
        if self.transport is not None and not self.transport.is_closing():
            server.resume_reading(self)
            server.router.resume(self.conn)
            server.serve(self)

    def get_buffer(self, sizehint: int):
        return self.server.current_read_view

    def buffer_updated(self, nbytes: int) -> None:
        self.active = True
        server = self.server
        data = server.read_view[:nbytes]
        if server.proxy_headers and self in server.proxy_headers:
            data = server.take_proxy_header(self, data)
        if data is not None:
            self.conn.receive_data(data, server.clock())
        server.serve(self)
        if nbytes == READ_BUFFER_BYTES:
            server.yield_reading(self)

    def eof_received(self):
        self.conn.receive_eof(self.server.clock())
        self.server.serve(self)
        return False  # let the transport close itself

    def connection_lost(self, exc) -> None:
        server = self.server
        conn = self.conn
        if conn is not None:
            conn.connection_lost()
            server.handle_events(self)
        auth_task = server.auth_tasks.get(self)
        if auth_task is not None:
            auth_task.cancel()  # the shared key fetch goes on; only this wait ends
        server.forget(self)
        self.transport = None

    # -- output

    def write(self) -> None:
        """Write what the connection queued; close when it is done."""
        transport = self.transport
        if transport is None:
            return
        conn = self.conn
        data = conn.data_to_send()
        if data:
            self.active = True
            transport.write(data)
        if conn.closed and not transport.is_closing():
            transport.close()  # writes what is buffered first


class GatewayServer:
    """Accepts connections, authenticates them and keeps the session table."""

    def __init__(
        self,
        *,
        settings: ServerSettings,
        registry: ProviderRegistry,
        verifier: TokenVerifier,
        store: Store,
        limits: Limits,
        idle_release_s: float,
        mailbox_ttl_s: float,
        slow_consumer_s: float,
        commit_in_thread: bool,
        blob_files: BlobFiles | None = None,
        push_sign: Callable[[dict], bytes] | None = None,
        tcp_trusted_proxies=(),
        ws_trusted_proxies=(),
        ws_path: str = "/interlink",
        ws_allowed_origins=(),
        cluster=None,
        clock=time.time,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.verifier = verifier
        self.store = store
        self.limits = limits
        self.clock = clock
        self.read_view = memoryview(bytearray(READ_BUFFER_BYTES))
        self._throttled_read_view = self.read_view[:THROTTLED_READ_BYTES]
        self.current_read_view = self.read_view  # the throttled view while admission control throttles
        # Every connection's state machine -> its adapter: the domain names sessions by their
        # state machine, the edge writes them out through the adapter. (Dicts used as ordered
        # sets or maps: at 10,000 entries a dict costs about a third of a set.)
        self.connections: dict[ServerConnection, GatewayProtocol] = {}
        self.preauth: dict[GatewayProtocol, str] = {}  # accepted, not yet authenticated -> its source
        self.sources = SourceLimits(**_source_limits(limits))
        self.source_refusals: Counter = Counter()  # connections refused by a source limit, by which
        # Proxies whose word on the client's address is believed, by listener; a connection from
        # one is not limited per source until that word arrives (core/edge/sources.py).
        self.trusted_proxies = {"tcp": TrustedProxies(tcp_trusted_proxies), "ws": TrustedProxies(ws_trusted_proxies)}
        self.proxy_headers: dict[GatewayProtocol, bytearray] = {}  # from a trusted proxy, PROXY v2 header not yet whole
        self.awaiting_forwarded: dict[GatewayProtocol, None] = {}  # from a trusted HTTP proxy, upgrade not yet read
        self.forwarded: dict[GatewayProtocol, tuple] = {}  # the client address a trusted proxy named
        self.proxy_counters: Counter = Counter()  # PROXY v2 headers and X-Forwarded-For: taken, local, refused
        self.ws_path = ws_path
        # websockets' origin check: the allowed Origin values, None = no Origin header (an app,
        # not a web page); no list at all = any origin.
        self.ws_origins = None if "*" in ws_allowed_origins else [None, *ws_allowed_origins]
        self._ws_server: Listener | None = None
        self.counters: Counter = Counter()
        self.close_reasons: Counter = Counter()
        self.auth_failures: Counter = Counter()
        self._server: Listener | None = None
        self._timers: list = []  # heap of (deadline, protocol); one live entry per connection
        self._timer_handle: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.auth_tasks: dict[GatewayProtocol, asyncio.Task] = {}  # connections awaiting a key fetch
        self.paused: dict[GatewayProtocol, float] = {}  # connections whose peer stopped reading, since when
        self.throttled: dict[GatewayProtocol, None] = {}  # not read until the turn's commit is written
        self.yielded: dict[GatewayProtocol, None] = {}  # filled a whole read: read again next loop turn
        self._resume_yielded_scheduled = False
        self._draining = False
        self.opening: dict[GatewayProtocol, None] = {}  # accepted, transport not yet made (count toward max_connections)
        self._all_closed = asyncio.Event()
        self.offload = ThreadOffload(self, workers=BLOB_WORKERS)  # hashing and syncing blobs
        self.blob_writer = SerialOffload(self, name="interlink-blob-writer")  # chunks into the page cache
        self.sweeps = Sweeps(
            self, idle_release_s=idle_release_s, mailbox_ttl_s=mailbox_ttl_s, slow_consumer_s=slow_consumer_s
        )
        self.domain = Domain(
            store=store,
            registry=registry,
            window=limits.window,
            max_frame_bytes=limits.max_frame_bytes,
            max_group=limits.max_group,
            message_rate_per_device=limits.message_rate_per_device,
            message_rate_per_user=limits.message_rate_per_user,
            overload_turn_messages=limits.overload_turn_messages,
            overload_refuse_after_s=limits.overload_refuse_after_s,
            blob_files=blob_files,
            offload=self.offload,
            blob_writer=self.blob_writer,
            blob_limits=limits,  # a Limits is a BlobLimits
            membership=cluster.membership if cluster is not None else None,
            node=cluster.node if cluster is not None else None,
            relay_timeout_s=cluster.request_timeout_s if cluster is not None else 2.0,
        )
        # A cluster's node (interlink.config.ClusterConfig): users homed elsewhere are redirected
        # there, and stanzas for them relayed over NATS (start_cluster).
        self.cluster_config = cluster
        self.cluster: ClusterLink | None = None
        # Set when this gateway must stop though nobody asked it to (a twin of an older process of
        # its cluster node id: ClusterLink._stand_down); whoever runs it drains it then.
        self.failure: str | None = None
        self.failed = asyncio.Event()
        self.router = self.domain.router
        self.welcome_limits = self._welcome_limits()
        self._commit_executor = (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="interlink-commit")
            if commit_in_thread else None
        )
        self.commits = CommitDriver(
            store=store, domain=self.domain, on_done=self.committed, executor=self._commit_executor, clock=clock
        )
        # Push webhooks (core/edge/push.py), when the node can sign them.
        self.push: PushDispatcher | None = None
        if push_sign is not None:
            self.push = PushDispatcher(store=store, registry=registry, answered=self._push_answered,
                                       forget=lambda dkey: self.domain.push.forget(dkey, cancel_owed=False),
                                       sign=push_sign)
            self.domain.push.attach(self.push)

    # -- lifecycle

    async def start_cluster(self, software: str) -> None:
        """Join the cluster over NATS (before the listeners open): ``ConfigError`` when NATS is
        unreachable, this node id already runs, or a running node lists other nodes."""
        self.cluster = ClusterLink(self, self.cluster_config, software=software, clock=self.clock)
        try:
            await self.cluster.start()
        except BaseException:
            self.cluster = None
            raise

    def stand_down(self, reason: str) -> None:
        """This gateway must stop (``failure``): ``interlink.gateway.Gateway`` drains it on
        ``failed`` (and ``interlink serve`` exits 1)."""
        self.failure = reason
        self.failed.set()

    def cluster_input_done(self) -> None:
        """Another node relayed stanzas or answered: commit what they brought, write out the
        sessions they answered or delivered to."""
        self.commits.schedule()
        if self.router.touched:
            self.write_touched()

    async def start(self, host: str, port: int, *, backlog: int = 1024) -> None:
        if self.domain.blobs is not None:
            removed = self.domain.blobs.remove_orphans()
            if removed:
                log.info("removed %d blob files without a record (left by a crash)", removed)
        self._server = Listener(self, listening_sockets(host, port, backlog), GatewayProtocol)
        self._server.start()
        self.sweeps.start()
        if self.push is not None:
            self.push.start()

    async def start_websocket(self, host: str, port: int, *, backlog: int = 1024) -> None:
        """Open the WebSocket listener (``core/edge/websocket.py``) beside the TCP one."""
        from interlink.core.edge.websocket import WebSocketProtocol  # only gateways with ws_port load websockets

        self._ws_server = Listener(self, listening_sockets(host, port, backlog), WebSocketProtocol)
        self._ws_server.start()

    @property
    def websocket_addresses(self) -> list[tuple]:
        return self._ws_server.addresses if self._ws_server else []

    def _push_answered(self, dkey: bytes, counter: int, again: bool) -> None:
        self.router.push_answered(dkey, counter, again)
        self.commits.schedule()

    @property
    def addresses(self) -> list[tuple]:
        return self._server.addresses if self._server else []

    async def drain(self, timeout_s: float) -> None:
        """Stop accepting, say ``bye drain`` to everyone, wait for them to go (or cut them off)."""
        for listener in (self._server, self._ws_server):
            if listener is not None:
                listener.close()
        # Read nothing more, commit what was read and answer it, then say bye: a client gets the
        # ack of everything it sent before the drain (no resend needed after reconnecting).
        self._draining = True
        self.throttled.clear()
        for proto in list(self.connections.values()):
            if proto.transport is not None and not proto.transport.is_closing():
                proto.transport.pause_reading()
        await self.commits.settle()
        if self.cluster is not None:  # what other nodes still owe an answer for, then its commit
            await self.cluster.settle(timeout_s)
            await self.commits.settle()
        for proto in list(self.connections.values()):
            proto.conn.close(CloseReason.DRAIN)
            self.serve(proto)
        await self._wait_all_closed(timeout_s)
        if self.push is not None:
            await self.push.close()  # what was answered is in the batch; the rest is sent after the restart
        await self.commits.settle()
        # A blob's verdict and checkpoints write its record: before the store closes, within the
        # drain's time (a 100 MiB hash takes a few tenths of a second); what is left over is done
        # again after the restart (the upload's next write finds its bytes and checks them).
        settled = await self.blob_writer.settle(timeout_s) and await self.offload.settle(timeout_s)
        if settled and self.domain.blobs is not None and self.domain.blobs.checkpoint_all():
            settled = await self.offload.settle(timeout_s)  # uploads go on from all they received
        if not settled:
            log.warning("%d blob syncs or checks and %d chunk writes unfinished at shutdown: they run again "
                        "after the restart", self.offload.inflight, self.blob_writer.inflight)
        for task in list(self.auth_tasks.values()):
            task.cancel()
        self._server = self._ws_server = None
        if self._timer_handle is not None:
            self._timer_handle.cancel()
            self._timer_handle = None
        self.sweeps.stop()
        if self.cluster is not None:
            # Other nodes' stanzas relayed from now on time out there (overloaded, unconfirmed); what
            # they relayed so far is committed, then answered as the link closes.
            await self.cluster.stop_serving()
            await self.commits.settle()
            await self.cluster.settle(min(timeout_s, 2 * self.cluster.config.request_timeout_s))  # fan-outs still out
            await self.commits.settle()
            await self.cluster.close()
            self.cluster = None
            await self.commits.settle()
        if self._commit_executor is not None:
            self._commit_executor.shutdown(wait=True)  # the last commit finishes before the store closes
        self.offload.shutdown()
        self.blob_writer.shutdown()

    async def _wait_all_closed(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.connections and time.monotonic() < deadline:
            self._all_closed.clear()
            try:
                await asyncio.wait_for(self._all_closed.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
        for proto in list(self.connections.values()):
            if proto.transport is not None:
                proto.transport.abort()

    def accept(self, protocol_class: type[GatewayProtocol], address) -> GatewayProtocol | None:
        """A connection was accepted from ``address``: its protocol, holding a pre-auth slot
        (of its source, unless a trusted proxy's word on the client is still to come), or None
        when a connection limit or its source's limits refuse it (counted; the caller resets it)."""
        limits = self.limits
        if (len(self.connections) + len(self.opening) >= limits.max_connections
                or len(self.preauth) >= limits.max_preauth_connections):
            self.close_reasons[CloseReason.OVER_CAPACITY] += 1
            return None
        listener = protocol_class.listener
        trusted = self.trusted_proxies[listener]
        from_proxy = bool(trusted) and address[0] in trusted
        # From a proxy the client's address comes with the first bytes (a PROXY v2 header, an
        # X-Forwarded-For), and its source's limits apply then (admit_source).
        source = ""
        if not from_proxy:
            source, refused = self._admit_address(address)
            if refused is not None:
                self.close_reasons[refused] += 1  # no connection exists to report its close
                return None
        proto = protocol_class(self)
        if from_proxy:
            if listener == "tcp":
                self.proxy_headers[proto] = bytearray()
            else:
                self.awaiting_forwarded[proto] = None
        self.preauth[proto] = source  # its pre-auth slot of that source, given back when it leaves
        self.opening[proto] = None  # until connection_made (or forget, if its transport never opens)
        return proto

    def _admit_address(self, address) -> tuple[str, CloseReason | None]:
        """The source ``address`` counts under ("" when it is not limited per source: loopback),
        and the close reason if its limits refuse a new connection (counted by limit)."""
        source = source_of(address)
        if not self.limits.source_limits_on_loopback and is_loopback(source):
            return "", None
        refused = self.sources.admit(source, time.monotonic())
        if refused is not None:
            self.source_refusals[refused] += 1
            return source, CloseReason.SOURCE_LIMIT
        return source, None

    def admit_source(self, proto: GatewayProtocol, address) -> CloseReason | None:
        """A trusted proxy's connection learnt whose it is: ``address``, the client's it named, or
        the proxy's own when it named none. The per-source limits apply to that address now
        (the close reason if they refuse it, for the caller to close with), and the connection's
        pre-auth slot moves to its source."""
        source, refused = self._admit_address(address)
        if refused is None and source:
            if proto in self.preauth:
                self.preauth[proto] = source
            else:  # closed meanwhile: nothing holds the slot just taken
                self.sources.left(source)
        return refused

    def take_proxy_header(self, proto: GatewayProtocol, data) -> bytes | None:
        """Bytes from a trusted proxy before its PROXY v2 header was whole: what follows the
        header once it is (the client's first bytes), None while it is not, or when it is refused
        (the connection is then closing)."""
        buffer = self.proxy_headers[proto]
        buffer += data
        conn = proto.conn
        try:
            header = parse_proxy_header(buffer)
        except ProxyHeaderError as exc:
            del self.proxy_headers[proto]
            self.proxy_counters["refused"] += 1
            conn.close(CloseReason.BAD_PROXY_HEADER, f"PROXY v2 header from a trusted proxy: {exc}")
            return None
        if header is None:
            return None
        del self.proxy_headers[proto]
        if header.command == "proxy":
            if header.family not in ("inet", "inet6") or header.transport != "stream":
                self.proxy_counters["refused"] += 1
                conn.close(CloseReason.BAD_PROXY_HEADER, f"PROXY v2 header for {header.family} {header.transport}: "
                                                         "only TCP over IPv4 or IPv6 is served")
                return None
            self.proxy_counters["proxy"] += 1
            self.forwarded[proto] = header.source
            refused = self.admit_source(proto, header.source)
            if refused is not None:
                conn.close(refused, "this address is over its connection limits")
                return None
        else:  # LOCAL: the proxy's own connection (a health check), limited as the proxy's own
            self.proxy_counters["local"] += 1
            refused = self.admit_source(proto, proto.transport.get_extra_info("peername"))
            if refused is not None:
                conn.close(refused, "the proxy's own address is over its connection limits")
                return None
        return bytes(buffer[header.header_bytes:])

    def forwarded_request(self, proto: GatewayProtocol, forwarded_for: list[str]) -> CloseReason | None:
        """A WebSocket upgrade request arrived: behind a trusted HTTP proxy its ``X-Forwarded-For``
        names the client (the per-source limits apply then; the close reason if they refuse)."""
        if proto not in self.awaiting_forwarded:
            return None  # not from a trusted proxy: its socket's peer is the client
        del self.awaiting_forwarded[proto]
        peer = proto.peer
        client = self.trusted_proxies["ws"].client_of(forwarded_for, peer[0])
        if client == peer[0]:
            self.proxy_counters["local"] += 1  # no client named: the proxy's own request, limited as such
            return self.admit_source(proto, peer)
        self.proxy_counters["forwarded"] += 1
        self.forwarded[proto] = (client, 0)  # X-Forwarded-For names no port
        return self.admit_source(proto, (client, 0))

    def _left_preauth(self, proto: GatewayProtocol) -> None:
        source = self.preauth.pop(proto, None)
        if source:  # "": not counted (a loopback client)
            self.sources.left(source)

    def forget(self, proto: GatewayProtocol) -> None:
        if self.forwarded or self.proxy_headers or self.awaiting_forwarded:
            self.forwarded.pop(proto, None)
            self.proxy_headers.pop(proto, None)
            self.awaiting_forwarded.pop(proto, None)
        self._left_preauth(proto)
        self.opening.pop(proto, None)
        if proto.conn is None:  # accepted, but its transport never opened (core/edge/listener.py)
            return
        self.connections.pop(proto.conn, None)
        self.paused.pop(proto, None)
        self.throttled.pop(proto, None)
        self.yielded.pop(proto, None)
        self.router.close_session(proto.conn)  # its device's newer session, if any, stays
        # Its received items' deletions (a new session would be pushed them again) and, for a
        # registered device that left with items unreceived, its push intent: at once.
        self.commits.schedule(hurry=True)
        if not self.connections:
            self._all_closed.set()
        # Timer entries of closed connections (and superseded ones) are dropped lazily when they
        # come due; rebuild the heap when they outnumber live connections so churn cannot grow it.
        if len(self._timers) > 2 * len(self.connections) + 64:
            self._timers = [
                entry for entry in self._timers
                if entry[1].timer_at == entry[0] and entry[1].transport is not None and not entry[1].conn.closed
            ]
            heapq.heapify(self._timers)

    # -- timers (one heap, one handle)

    def schedule(self, proto: GatewayProtocol) -> None:
        """Make sure the heap will wake this connection by its next deadline. A connection keeps
        one heap entry: an earlier entry that comes due re-checks the deadline and re-arms."""
        deadline = proto.conn.next_deadline()
        if deadline is None or (proto.timer_at is not None and proto.timer_at <= deadline):
            return
        self._push_timer(proto, deadline)

    def _push_timer(self, proto: GatewayProtocol, deadline: float) -> None:
        proto.timer_at = deadline
        heapq.heappush(self._timers, (deadline, proto))
        if self._timer_at is None or deadline < self._timer_at:
            self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        if self._timer_handle is not None:
            self._timer_handle.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = deadline
        self._timer_handle = loop.call_later(max(0.0, deadline - self.clock()), self._fire_timers)

    def _fire_timers(self) -> None:
        self._timer_handle = None
        self._timer_at = None
        now = self.clock()
        timers = self._timers
        while timers and timers[0][0] <= now:
            due, proto = heapq.heappop(timers)
            if proto.timer_at != due:
                continue  # superseded by an earlier entry
            proto.timer_at = None
            conn = proto.conn
            if proto.transport is None or conn.closed:
                continue
            deadline = conn.next_deadline()
            if deadline is not None and deadline <= now:
                conn.handle_timer(now)
                self.serve(proto)
                deadline = conn.next_deadline()
            if deadline is not None:
                self._push_timer(proto, deadline)
        if timers:
            self._arm(timers[0][0])  # the earliest remaining entry, whatever was armed meanwhile

    # -- authentication

    def start_auth(self, proto: GatewayProtocol, request: AuthRequested) -> None:
        # Usually the provider's key is cached: decide at once, without a task or a loop turn.
        try:
            identity = self.verifier.verify_cached(
                request.token, device=request.device, now=self.clock(), client_static=request.client_static
            )
        except Exception as exc:  # AuthError is the verdict; anything else is ours (internal)
            self._refuse(proto, exc)
            return
        if identity is not None:
            self._admit_identity(proto, identity)
            return
        task = asyncio.get_running_loop().create_task(self._authenticate(proto, request))
        self.auth_tasks[proto] = task
        task.add_done_callback(lambda _done: self.auth_tasks.pop(proto, None))

    async def _authenticate(self, proto: GatewayProtocol, request: AuthRequested) -> None:
        try:
            identity = await self.verifier.verify(
                request.token, device=request.device, now=self.clock(), client_static=request.client_static
            )
        except Exception as exc:  # AuthError is the verdict; anything else is ours (internal)
            self._refuse(proto, exc)
            return
        try:
            self._admit_identity(proto, identity)
        except Exception:  # as in handle_events; here nothing else would close the connection
            self._failed_internally(proto, "opening a session", "the gateway could not open the session; connect again")
            self.serve(proto)

    def _admit_identity(self, proto: GatewayProtocol, identity: Identity) -> None:
        """The token is good: apply what may have changed meanwhile, register the device, open."""
        if proto.conn.closed or proto.transport is None:
            # Closed while its token was checked: by a key fetch's wait, or in the very read that
            # asked for auth (too much pipelined). It must not replace the device's live session.
            return
        try:
            provider = self.registry.get(identity.provider)
            if provider is None or provider.suspended:  # suspended while the key was being fetched
                raise AuthError(f"provider {identity.provider!r} is suspended", code="provider_suspended")
            relay = self.domain.relay
            home = relay.home_of(identity.user) if relay is not None else None
            if home is not None:  # another node keeps this user: nothing is stored here
                address = self.cluster_config.nodes[home]
                self.counters["redirects"] += 1
                proto.conn.redirect(home, address.host, address.port, address.ws)
                self.serve(proto)
                return
            try:
                self.store.register_device(identity.user, identity.device, self.limits.max_devices)
            except StoreLimitError as exc:  # the store's bound is the contract's device_limit
                raise AuthError(exc.message, code="device_limit") from None
            self.store.set_phone(identity.user, identity.phone_number)  # directory: the latest verified phone
        except Exception as exc:
            self._refuse(proto, exc)
            return
        self.open_session(proto, identity)

    def _refuse(self, proto: GatewayProtocol, exc: Exception) -> None:
        if isinstance(exc, AuthError):
            code, message = exc.code, exc.message
        else:
            log.error("authentication failed internally", exc_info=exc)
            code, message = "internal", "the gateway could not verify the token; try again"
        self.auth_failures[code] += 1
        proto.conn.reject_auth(code, message)
        self.serve(proto)

    def open_session(self, proto: GatewayProtocol, identity: Identity) -> None:
        # The session keeps the identity for its whole life: drop the raw claims (about 1 KB),
        # everything routing needs is in the identity's own fields.
        identity = dataclasses.replace(identity, claims=_NO_CLAIMS)
        conn = proto.conn
        conn.session_key = (identity.user, identity.device)
        previous, pending = self.router.open_session(conn)
        if previous is not None:
            previous.close(CloseReason.REPLACED, "the same device connected again")
            previous_proto = self.connections.get(previous)
            if previous_proto is not None:
                self.serve(previous_proto)
        self._left_preauth(proto)
        welcome = {
            "t": "welcome",
            "user": identity.user,
            "device": identity.device,
            "session": os.urandom(16),
            "pending": pending,
            "limits": self.welcome_limits,
        }
        # The token was accepted with the allowed clock skew; the session ends at the same line.
        expires_at = identity.expires_at + self.verifier.leeway_s
        conn.accept_auth(identity, welcome, self.clock(), expires_at=expires_at)
        self.counters["sessions_opened"] += 1
        self.router.push_stored(conn)  # stored items follow the welcome
        self.serve(proto)
        # Most sessions go quiet right after welcome. Free the cipher contexts now, while the
        # memory can be reused by the next handshake; freed only at the idle sweep, they would
        # leave holes between long-lived allocations that the allocator cannot give back.
        proto.conn.hibernate()
        self.schedule(proto)  # token expiry

    # -- serving a connection: its events into the domain, then what is owed written out

    def serve(self, proto: GatewayProtocol) -> None:
        """After a connection received bytes or was acted on: handle its events (stanzas into the
        domain), schedule the turn's commit, write out every session the domain wrote to, then
        this connection's own output."""
        router = self.router
        load_before = router.pending_load
        self.handle_events(proto)
        load = router.pending_load
        if load != load_before and self.domain.admission.throttles(load):
            self.throttle(proto)
        self.commits.schedule()
        if self.router.touched:
            self.write_touched()
        proto.write()

    def handle_events(self, proto: GatewayProtocol) -> None:
        conn = proto.conn
        domain = self.domain
        while True:
            events = conn.events()
            if not events:
                return
            now = self.clock()  # one read's stanzas share their arrival time
            for event in events:
                try:
                    if type(event) is StanzaReceived:
                        domain.dispatch(conn, event.stanza, now)
                    elif type(event) is AuthRequested:
                        self.start_auth(proto, event)
                    elif type(event) is ConnectionClosed:
                        self.connection_closed(proto, event)
                except Exception:  # a bug of ours must cost one connection, never the loop
                    self._failed_internally(proto, f"handling {type(event).__name__}")

    def _failed_internally(self, proto: GatewayProtocol, doing: str,
                           told: str = "the gateway failed to handle a stanza") -> None:
        """A bug of ours while ``doing`` something for this connection: logged, counted, and the
        connection ends (an open session is told ``internal`` first)."""
        log.exception("internal error while %s from %s", doing, proto.peer)
        self.counters["internal_errors"] += 1
        conn = proto.conn
        if not conn.closed:
            if conn.state is State.OPEN:
                conn.send_error("internal", told)
            conn.close(CloseReason.INTERNAL_ERROR, "internal error")

    def throttle(self, proto: GatewayProtocol) -> None:
        """Admission control's first level: this connection's read brought messages into a turn
        that is over its budget; read nothing more from it until the turn's commit is written
        (its bytes wait in the socket, and TCP slows the sender)."""
        transport = proto.transport
        if proto in self.throttled or transport is None or transport.is_closing():
            return
        transport.pause_reading()
        self.throttled[proto] = None
        self.counters["reads_throttled"] += 1

    def yield_reading(self, proto: GatewayProtocol) -> None:
        """This connection filled a whole read buffer (a sender with more waiting: a blob upload,
        a burst): read nothing more from it until its turn comes round again. The event loop
        would otherwise read it again and again while its peer keeps sending (libuv reads up to
        32 times per callback), and every other connection — chat with its latency — would wait
        behind megabytes of one upload. Such connections queue, and each loop turn reads
        ``BULK_READS_PER_TURN`` of them (one buffer, 256 KiB, each), oldest first: however many
        uploads run, a turn carries at most that much bulk beside everyone else's traffic."""
        transport = proto.transport
        if transport is None or transport.is_closing() or proto in self.yielded:
            return
        transport.pause_reading()
        self.yielded[proto] = None
        if not self._resume_yielded_scheduled:
            self._resume_yielded_scheduled = True
            asyncio.get_running_loop().call_soon(self._resume_yielded)

    def _resume_yielded(self) -> None:
        self._resume_yielded_scheduled = False
        yielded = self.yielded
        blobs = self.domain.blobs
        if yielded and blobs is not None and blobs.pending_write_bytes > BULK_PAUSE_WRITE_BYTES:
            # The blob writer is behind (the disk is slow): leave the bulk in the sockets, where
            # TCP holds it back, rather than in the gateway's memory; look again shortly.
            self._resume_yielded_scheduled = True
            asyncio.get_running_loop().call_later(BULK_PAUSE_S, self._resume_yielded)
            return
        for _ in range(BULK_READS_PER_TURN):
            if not yielded:
                break
            proto = next(iter(yielded))
            del yielded[proto]
            self.resume_reading(proto)
        if yielded:  # the rest wait for the next turns
            self._resume_yielded_scheduled = True
            asyncio.get_running_loop().call_soon(self._resume_yielded)

    def committed(self) -> None:
        """A commit was written (or failed): write out what it answered, read the throttled again
        (whatever happens while writing: a connection must not stay unread for want of a commit)."""
        try:
            self.write_touched()
        finally:
            throttling = self.domain.admission.level(self.clock()) > 0
            self.current_read_view = self._throttled_read_view if throttling else self.read_view
            if self.throttled:
                throttled, self.throttled = self.throttled, {}
                for proto in throttled:
                    self.resume_reading(proto)

    def resume_reading(self, proto: GatewayProtocol) -> None:
        """Read a connection again, unless something still holds it: a drain, its peer not
        reading our output (``paused``), or admission control until the commit (``throttled``)."""
        transport = proto.transport
        if (transport is not None and not transport.is_closing() and not self._draining
                and proto not in self.paused and proto not in self.throttled and proto not in self.yielded):
            transport.resume_reading()

    def write_touched(self) -> None:
        """Write out the sessions the domain queued stanzas on (each once)."""
        connections = self.connections
        for conn in self.router.take_touched():
            proto = connections.get(conn)
            if proto is not None:
                proto.write()

    def _welcome_limits(self) -> dict:
        """The ``limits`` of ``welcome``: the configured ones, and the blobs' when blobs are served
        (worked out when the limits change, not per session)."""
        limits = self.limits.announce()
        if self.domain.blobs is not None:
            limits.update(self.domain.blobs.announce())
        return limits

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def sessions(self) -> dict:
        """(user, device) -> the open session's ``ServerConnection`` (the domain's table; read only)."""
        return self.router.sessions

    def connection_closed(self, proto: GatewayProtocol, event: ConnectionClosed) -> None:
        self.close_reasons[event.reason] += 1
        if event.reason not in _ROUTINE_CLOSES:
            log.info("connection %s closed: %s %s", proto.peer, event.reason, event.message)

    # -- operator control

    def apply_settings(self, **values) -> None:
        """Change limits while running (``Gateway.reload``): the ones a running gateway can take.
        Sessions opened from now on are told the new ``welcome`` limits."""
        limit_fields = {spec.name for spec in dataclasses.fields(Limits)}
        self.limits = dataclasses.replace(self.limits, **{k: v for k, v in values.items() if k in limit_fields})
        for name, value in values.items():
            if name in ("message_rate_per_device", "message_rate_per_user"):
                self.router.set_message_rates(self.limits.message_rate_per_device, self.limits.message_rate_per_user)
            elif name in ("overload_turn_messages", "overload_refuse_after_s"):
                self.domain.admission.configure(
                    turn_budget=self.limits.overload_turn_messages, refuse_after_s=self.limits.overload_refuse_after_s
                )
            elif name in ("max_mailbox_items", "max_mailbox_bytes"):
                setattr(self.store, name, value)
            elif name in ("mailbox_ttl_s", "slow_consumer_s", "idle_release_s"):
                setattr(self.sweeps, name, value)
            elif name in _SOURCE_LIMITS:
                self.sources.configure(**_source_limits(self.limits))
            elif name.startswith("blob_") and name in limit_fields:
                if self.domain.blobs is not None:
                    self.domain.blobs.configure(self.limits)
            elif name not in limit_fields:
                raise ValueError(f"{name} cannot change while the gateway runs")
        self.welcome_limits = self._welcome_limits()

    def end_sessions(self, user: str, device: int | None = None) -> int:
        """The operator ends a user's sessions (one device, or all of them) with ``bye suspended``;
        returns how many. The user may connect again: this is not a suspension of the account."""
        ended = 0
        for (session_user, session_device), conn in list(self.sessions.items()):
            if session_user == user and (device is None or session_device == device):
                conn.close(CloseReason.SUSPENDED, "the operator ended this session")
                self.serve(self.connections[conn])
                ended += 1
        return ended

    def suspend_provider(self, provider_id: str) -> int:
        """Mark the provider suspended and end every session of its users with ``bye suspended``."""
        self.registry.suspend(provider_id)
        ended = 0
        for proto in list(self.connections.values()):
            identity = proto.conn.identity
            if identity is not None and identity.provider == provider_id:
                proto.conn.close(CloseReason.SUSPENDED, "the provider is suspended")
                self.serve(proto)
                ended += 1
        return ended

    def session_list(self) -> list[dict]:
        """A snapshot of the open sessions: user, device, peer address, suite."""
        connections = self.connections
        return [
            {"user": user, "device": device, "peer": connections[conn].peer, "suite": conn.suite}
            for (user, device), conn in self.sessions.items()
            if conn in connections
        ]

    def stats(self) -> dict:
        return {
            "connections": len(self.connections),
            "sessions": len(self.sessions),
            "counters": {**self.counters, "stanzas_in": sum(self.domain.stanzas_in.values())},
            "stanzas_in": dict(self.domain.stanzas_in),
            "refusals": {str(code): count for code, count in self.domain.refusals.items()},
            "commit_seconds": self.commits.seconds.snapshot(),
            "store": self.store.usage(),
            "routing": dict(self.router.counters),
            "admission": {"level": self.domain.admission.level(self.clock()), "throttled_now": len(self.throttled)},
            "close_reasons": {str(reason): count for reason, count in self.close_reasons.items()},  # plain strings for operators
            "auth_failures": {str(code): count for code, count in self.auth_failures.items()},
            "blobs": self._blob_stats(),
            "push": self._push_stats(),
            "source_refusals": dict(self.source_refusals),
            "proxied": dict(self.proxy_counters),
            "preauth_sources": self.sources.sources,
            "cluster": self._cluster_stats(),
        }

    def _cluster_stats(self) -> dict:
        cluster = self.cluster
        if cluster is None:
            return {}
        relay = self.domain.relay
        return {"node": cluster.node, "relay": dict(relay.counters), "waiting": len(relay.waiting),
                "waiting_bytes": relay.waiting_bytes,
                "outbox": relay.outbox.backlogs(),
                "link": dict(cluster.counters), "round_trip_seconds": cluster.round_trips.snapshot(),
                "connected": cluster.connected}

    def _push_stats(self) -> dict:
        push = self.push
        if push is None:
            return {}
        return {"registered": len(self.router.push_devices), "queued": push.queued, **push.counters,
                "failures": dict(push.failures), "dropped": dict(push.dropped), "breakers": push.breaker_states()}

    def _blob_stats(self) -> dict:
        blobs = self.domain.blobs
        if blobs is None:
            return {}
        return {**self.store.blob_usage(), **blobs.counters, "blob_uploads_in_memory": blobs.uploads_in_memory,
                "blob_work_in_flight": self.offload.inflight, "blob_writes_in_flight": self.blob_writer.inflight}


def _source_limits(limits: Limits) -> dict:
    """The ``SourceLimits`` settings among the gateway's limits."""
    return {name: getattr(limits, name) for name in _SOURCE_LIMITS}
