"""``interlink.Client``: the asyncio SDK a provider's client uses to talk to an Interlink gateway.

    client = await Client.connect("127.0.0.1", 7450, token=jwt, device=1, root_public=pinned_root)
    print(client.welcome["user"])
    rtt = await client.ping()
    await client.close()

Every refusal surfaces as an exception from ``interlink.errors``: ``AuthError`` (with the
contract's auth code) when the gateway refuses the token, ``CertificateError`` when the gateway
does not prove it belongs to the pinned operator, ``ServerError`` for an ``err`` stanza,
``SessionClosedError`` (with the ``bye`` reason) when the session ends.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import os
import ssl
import time

from interlink.core.protocol.certs import generate_static_key, x25519_public
from interlink.core.protocol.connection import (
    ClientConnection,
    ConnectionClosed,
    StanzaReceived,
    Welcomed,
)
from interlink.core.errors import (
    AuthError,
    CloseReason,
    HandshakeError,
    IKUnansweredError,
    InterlinkError,
    RedirectedError,
    ServerError,
    SessionClosedError,
    UpgradeRefusedError,
)
from interlink.core.protocol.noise import Suite
from interlink.core.protocol.wire import TAG_BYTES
from interlink.wstransport import WebSocketStream, websocket_uri
from websockets.exceptions import InvalidURI
from websockets.uri import parse_uri

DEFAULT_AGENT = "interlink-python/0.1"
TRANSIENT_REFUSALS = frozenset({"overloaded", "rate_limited"})  # refusals of a stored stanza to resend later
MAX_REDIRECTS = 2  # bye redirect followed at most this often per connect (a cluster needs one)
MAX_QUEUED_STANZAS = 10_000  # unread stanzas before the client gives up (recv() is not being called)
DEDUP_MEMORY = 10_000  # (from, id) pairs remembered to drop redelivered messages


BLOB_UPLOAD_PASSES = 3  # passes over the missing parts of an upload before giving up (rate limits not counted)


BLOB_MAX_WAIT_S = 10.0  # a rate_limited asking for longer (the day's allowance, too many open uploads) is raised


def _retry_after_s(exc: ServerError) -> float:
    retry_after = exc.fields.get("retry_after")
    return retry_after / 1000 if type(retry_after) is int and 0 < retry_after <= 86_400_000 else 1.0


def _wait_s(exc: ServerError) -> float:
    """How long to wait out a ``rate_limited`` blob request: its ``retry_after`` when short (the
    traffic bucket refilling); a long one (the day's allowance, the unfinished uploads) is the
    caller's to decide, so the error is raised again."""
    wait = _retry_after_s(exc)
    if wait > BLOB_MAX_WAIT_S:
        raise exc
    return wait


class _BlobSource:
    """What ``Client.upload_blob`` reads from: bytes, a path or a seekable binary file, with its
    size and SHA-256 (a file is hashed in pieces, never read whole)."""

    PIECE_BYTES = 1 << 20

    def __init__(self, source) -> None:
        self._file = None
        self._owned = False
        self._bytes = None
        self._prepared = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._bytes = bytes(source)
        elif all(hasattr(source, name) for name in ("size", "sha256", "read")):
            self._prepared = source  # its own size, SHA-256 and read(offset, length): an e2ee Attachment
        elif isinstance(source, (str, os.PathLike)):
            self._file, self._owned = open(source, "rb"), True
        elif hasattr(source, "read") and hasattr(source, "seek"):
            self._file = source
        else:
            raise TypeError(f"upload_blob needs bytes, a path or a seekable binary file, not {type(source).__name__}")

    def __enter__(self) -> _BlobSource:
        if self._prepared is not None:
            self.size, self.sha256 = self._prepared.size, self._prepared.sha256
        elif self._bytes is not None:
            self.size, self.sha256 = len(self._bytes), hashlib.sha256(self._bytes).digest()
        else:
            digest, size = hashlib.sha256(), 0
            self._file.seek(0)
            while piece := self._file.read(self.PIECE_BYTES):
                digest.update(piece)
                size += len(piece)
            self.size, self.sha256 = size, digest.digest()
        if self.size == 0:
            self.__exit__()
            raise ValueError("a blob holds at least one byte")
        return self

    def read(self, offset: int, length: int) -> bytes:
        if self._prepared is not None:
            return self._prepared.read(offset, length)
        if self._bytes is not None:
            return self._bytes[offset:offset + length]
        self._file.seek(offset)
        return self._file.read(length)

    def __exit__(self, *exc_info) -> None:
        if self._owned and self._file is not None:
            self._file.close()
            self._file = None


class BlobSink:
    """Where a download writes (``Client.download_blob``; ``interlink.e2ee`` writes an
    attachment's plaintext through one too): memory (None), a path, or a binary file. A path is
    written as a temporary file beside it, renamed over it only once the ``with`` block ends
    without an exception (an existing file there is never destroyed by a failed download, nor a
    part left under its name). ``result(size)``: the bytes, or ``size`` for a file."""

    def __init__(self, sink) -> None:
        self._parts: list | None = None
        self._file = None
        self._path = self._temporary = None
        if sink is None:
            self._parts = []
        elif isinstance(sink, (str, os.PathLike)):
            self._path = os.fspath(sink)
            folder, name = os.path.split(os.path.abspath(self._path))
            self._temporary = os.path.join(folder, f".{name}.{os.urandom(4).hex()}.part")
            self._file = open(self._temporary, "xb")
        elif hasattr(sink, "write"):
            self._file = sink
        else:
            raise TypeError(f"download_blob writes to None, a path or a binary file, not {type(sink).__name__}")

    def __enter__(self) -> BlobSink:
        return self

    def write(self, data: bytes) -> None:
        if self._parts is not None:
            self._parts.append(data)
        else:
            self._file.write(data)

    def result(self, size: int):
        return b"".join(self._parts) if self._parts is not None else size

    def __exit__(self, exc_type, *exc_info) -> None:
        if self._temporary is None:
            return
        self._file.close()
        if exc_type is None:
            os.replace(self._temporary, self._path)
        else:
            os.unlink(self._temporary)


class Outbox:
    """Stored stanzas (``msg``, ``rcpt``) sent but not acked yet — unanswered, or refused for now
    (``overloaded``, ``rate_limited``) — in sending order. Give the same outbox to every
    ``Client.connect`` of a device: after a lost connection the new session resends what was
    never acked, with the same ids, and the gateway stores each at most once; ``resend_pending``
    does the same within a session (after a refusal's ``retry_after``)."""

    def __init__(self) -> None:
        self._pending: dict[bytes, dict] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def pending(self) -> list[dict]:
        return list(self._pending.values())

    def _add(self, stanza: dict) -> None:
        self._pending[stanza["id"]] = stanza

    def _settled(self, stanza_id: bytes) -> None:
        self._pending.pop(stanza_id, None)


class Seen:
    """The (``from``, ``id``) pairs a device has already handed to its application, so that a
    redelivery — on this session or, when the same ``Seen`` is given to the next
    ``Client.connect``, on a later one — is dropped. Bounded: the oldest pairs are forgotten."""

    def __init__(self, capacity: int = DEDUP_MEMORY) -> None:
        self.capacity = capacity
        self._pairs: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._pairs)

    def first_time(self, key: tuple) -> bool:
        """Record ``key``; True if it was not seen before."""
        if key in self._pairs:
            return False
        self._pairs[key] = None
        if len(self._pairs) > self.capacity:
            self._pairs.popitem(last=False)
        return True


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def connection_made(self, transport) -> None:
        self.client._transport = transport

    def data_received(self, data: bytes) -> None:
        self.client._receive(data)

    def eof_received(self):
        self.client._conn.receive_eof(time.time())
        self.client._process()
        return False

    def connection_lost(self, exc) -> None:
        self.client._connection_lost(exc)


class Client:
    """One authenticated device session. Create it with ``await Client.connect(...)``."""

    def __init__(
        self,
        conn: ClientConnection,
        static_private: bytes,
        *,
        auto_recv: bool = True,
        outbox: Outbox | None = None,
        seen: Seen | None = None,
    ) -> None:
        self._conn = conn
        self.outbox = outbox
        self.auto_recv = auto_recv
        self._to_receive: list[int] = []  # seqs to confirm with one recv after this read
        self.seen = seen if seen is not None else Seen()  # (from, id) already handed out
        self.static_private = static_private
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._welcomed: asyncio.Future = self._loop.create_future()
        self._waiters: dict[tuple, asyncio.Future] = {}
        self._inbox: asyncio.Queue = asyncio.Queue(MAX_QUEUED_STANZAS)
        self._closed: ConnectionClosed | None = None
        self._lost = asyncio.Event()
        self._ids = itertools.count(1)

    # -- connecting

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        token: str,
        device: int,
        root_public: bytes,
        suite: Suite | int = Suite.XX_CHACHAPOLY,
        static_private: bytes | None = None,
        server_static: bytes | None = None,
        agent: str = DEFAULT_AGENT,
        timeout_s: float = 10.0,
        ik_fallback: bool = True,
        auto_recv: bool = True,
        outbox: Outbox | None = None,
        seen: Seen | None = None,
        ws_path: str | None = None,
        ws_origin: str | None = None,
        ws_ssl: ssl.SSLContext | None = None,
    ) -> Client:
        """Connect, complete the Noise handshake, check the node certificate against ``root_public``
        and authenticate. With an IK suite, a failed handshake (the gateway's static key changed)
        is retried once with XX and the same cipher, unless ``ik_fallback`` is false.

        With ``auto_recv`` (the default) every delivered item is confirmed to the gateway with
        ``recv`` as soon as it is queued for ``recv()``/iteration, and redelivered messages (same
        ``from`` and ``id``) are dropped; without it, call ``received(seqs)`` yourself.

        With an ``outbox``, everything it holds from an earlier session is resent (same ids)
        before this returns. Give every session of a device the same ``seen`` to drop
        redeliveries across reconnects too (by default a session remembers only its own).

        With ``ws_path`` (the gateway's ``ws_path``, e.g. ``"/interlink"``) the session runs over
        WebSocket to ``ws://host:port/ws_path`` (``port`` is then the gateway's ``ws_port``),
        sending ``Origin: ws_origin`` when given, as a web page would; with ``ws_ssl`` (an
        ``ssl.SSLContext``) to ``wss://`` through the operator's TLS-terminating proxy."""
        suite = Suite(suite)
        static_private = static_private or generate_static_key()
        transport = (None if ws_path is None
                     else (websocket_uri(host, port, ws_path, tls=ws_ssl is not None), ws_origin, ws_ssl))
        for hops in range(MAX_REDIRECTS + 1):
            options = (host, port, token, device, root_public, static_private, agent, timeout_s, auto_recv, outbox,
                       seen, transport)
            try:
                try:
                    client = await cls._connect_once(*options, suite, server_static)
                except IKUnansweredError:
                    if not ik_fallback:
                        raise
                    client = await cls._connect_once(*options, suite.as_xx(), None)
                break
            except RedirectedError as redirect:
                # A cluster's node that is not this user's home (docs/protocol.md §5): go there.
                # Its static key is another node's, so IK starts over as XX.
                if hops == MAX_REDIRECTS:
                    raise
                suite, server_static = suite.as_xx(), None
                if transport is None:
                    host, port = redirect.host, redirect.port
                elif redirect.ws is None:
                    raise
                else:
                    try:
                        uri = parse_uri(redirect.ws)
                    except InvalidURI:
                        raise SessionClosedError(f"the gateway redirected this session to an unusable WebSocket URL "
                                                 f"{redirect.ws[:100]!r}", reason="redirect") from None
                    host, port = uri.host, uri.port
                    transport = (redirect.ws, ws_origin, (ws_ssl or ssl.create_default_context()) if uri.secure else None)
        if outbox:
            await client.resend_pending(timeout_s=timeout_s)
        return client

    @classmethod
    async def _connect_once(
        cls, host, port, token, device, root_public, static_private, agent, timeout_s, auto_recv, outbox, seen,
        transport, suite, server_static,
    ):
        conn = ClientConnection(
            suite=int(suite),
            static_private=static_private,
            root_public=root_public,
            token=token,
            device=device,
            agent=agent,
            server_static=server_static,
        )
        client = cls(conn, static_private, auto_recv=auto_recv, outbox=outbox, seen=seen)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                await cls._open(client, loop, host, port, transport)
                conn.start(time.time())
                client._process()
                await client._welcomed
        except TimeoutError:
            client._abort()
            raise SessionClosedError(f"no welcome from {host}:{port} within {timeout_s} s", reason="timeout") from None
        except BaseException:
            client._abort()
            raise
        return client

    @staticmethod
    async def _open(client: Client, loop, host: str, port: int, transport) -> None:
        """The TCP connection (and the WebSocket around it, when ``transport`` names one)."""
        try:
            if transport is None:
                await loop.create_connection(lambda: _ClientProtocol(client), host, port)
            else:
                uri, origin, tls = transport
                await loop.create_connection(lambda: WebSocketStream(_ClientProtocol(client), uri, origin=origin),
                                             host, port, ssl=tls)
        except ConnectionResetError:
            # docs/protocol.md §5: a gateway at a connection limit, or an address over its own,
            # resets the connection as it accepts it.
            raise HandshakeError("the gateway closed the connection during the handshake: reset as it was "
                                 "accepted (a connection limit, or this address is over its own); back off and retry") from None

    # -- session facts

    @property
    def welcome(self) -> dict:
        return self._conn.welcome

    @property
    def user(self) -> str:
        return self._conn.welcome["user"]

    @property
    def device(self) -> int:
        return self._conn.welcome["device"]

    @property
    def limits(self) -> dict:
        return self._conn.welcome["limits"]

    @property
    def static_public(self) -> bytes:
        return x25519_public(self.static_private)

    @property
    def node_certificate(self):
        """The gateway's node certificate as verified during the handshake."""
        return self._conn.certificate

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def close_reason(self) -> str | None:
        return self._closed.reason if self._closed else None

    # -- sending and receiving

    async def send(self, stanza: dict) -> None:
        """Send one stanza without waiting for an answer."""
        self._check_open()
        self._conn.send_stanza(stanza)
        self._process()

    async def request(self, stanza: dict, *, timeout_s: float = 10.0) -> dict:
        """Send a stanza and wait for its answer: ``pong`` for ``ping``, ``res`` for ``iq``,
        ``ack`` for ``msg``/``rcpt``. An ``err`` answer raises ``ServerError``."""
        self._check_open()
        kind = stanza.get("t")
        if kind == "ping":
            key = ("ping", stanza["id"])
        elif kind == "iq":
            key = ("iq", stanza["id"])
        elif kind in ("msg", "rcpt"):
            key = ("ref", stanza["id"])
        else:
            raise ValueError(f"stanza type {kind!r} gets no answer; use send()")
        if key in self._waiters:
            raise ValueError(f"a request with id {key[1]!r} is already waiting")
        waiter = self._loop.create_future()
        self._waiters[key] = waiter
        try:
            self._conn.send_stanza(stanza)
            self._process()
            async with asyncio.timeout(timeout_s):
                return await waiter
        finally:
            self._waiters.pop(key, None)

    async def iq(self, op: str, *, timeout_s: float = 10.0, **fields) -> dict:
        """Run one operation (docs/protocol.md §7) and return its ``res`` stanza."""
        stanza = {"t": "iq", "id": next(self._ids), "op": op}
        stanza.update(fields)
        return await self.request(stanza, timeout_s=timeout_s)

    # -- push (docs/protocol.md §7, "Push")

    async def register_push(self, token: str, *, timeout_s: float = 10.0) -> None:
        """Ask to be woken while offline: ``token`` is what your provider's server needs to reach
        this handset; it comes back in the gateway's webhook to your provider (docs/protocol.md
        §7 "Push"). Raises ``ServerError`` ``push_unavailable`` when the gateway has no push
        endpoint for your provider."""
        await self.iq("push.set", token=token, timeout_s=timeout_s)

    async def unregister_push(self, *, timeout_s: float = 10.0) -> bool:
        """Stop being woken; True if a token was registered."""
        return (await self.iq("push.del", timeout_s=timeout_s))["removed"]

    # -- blobs (docs/protocol.md §7, "Blobs"): the bytes are the caller's ciphertext

    async def upload_blob(
        self, source, *, blob: bytes | None = None, progress=None, timeout_s: float = 60.0,
    ) -> bytes:
        """Upload ``source`` (bytes, a file path, a binary file opened for reading and seeking, or
        an object with ``size``, ``sha256`` and ``read(offset, length)`` such as
        ``interlink.e2ee.Attachment``) as a blob and return its id once the gateway says ``ready``. With ``blob`` (the id of an
        earlier, interrupted upload of the same bytes) it resumes from what the gateway has.
        A file is read twice (its SHA-256 first, then its chunks) and never held whole in memory;
        up to the announced ``blob_in_flight`` chunks are in flight at once. ``progress(sent,
        size)`` is called after each acknowledged chunk. A short ``rate_limited`` (the traffic
        bucket, ``retry_after`` up to 10 s) is waited out and the upload goes on; a long one (too
        many unfinished uploads, the day's allowance) and ``bad_hash`` (the bytes changed while
        they were read) raise ``ServerError``."""
        with _BlobSource(source) as data:
            chunk, in_flight = self._blob_limits()
            if blob is None:
                blob = (await self._rate_limited(
                    lambda: self.iq("blob.new", size=data.size, sha256=data.sha256, timeout_s=timeout_s)))["blob"]
                have = 0
            else:
                have = None  # ask the gateway
            passes = 0
            window = in_flight  # writes in flight at most (back to 1 after a rate limit, then doubling)
            pending: collections.deque = collections.deque()  # the writes in flight, oldest first
            try:
                while True:
                    if have is None:
                        answer = await self._rate_limited(
                            lambda: self.iq("blob.write", blob=blob, off=0, data=b"", timeout_s=timeout_s))
                        if answer["ready"]:
                            return blob
                        have = answer["have"]
                    if passes == BLOB_UPLOAD_PASSES:
                        raise InterlinkError(
                            f"the upload of blob {blob.hex()} is not complete after {passes} passes (the gateway has {have} bytes)")
                    answer, refused = None, None
                    for offset in range(have, data.size, chunk):
                        if len(pending) >= window:
                            answer, refused = await self._blob_written(pending, progress, data.size, answer)
                            if refused is not None:
                                break
                            window = min(in_flight, 2 * window)
                        pending.append(asyncio.ensure_future(self.iq(
                            "blob.write", blob=blob, off=offset, data=data.read(offset, chunk), timeout_s=timeout_s)))
                    # The rest of the pass's answers (after a refusal too: nothing stays in the pipe
                    # to spend the tokens waited for), in order.
                    while pending:
                        answer, refusal = await self._blob_written(pending, progress, data.size, answer)
                        if refusal is not None and (refused is None or _retry_after_s(refusal) >= _retry_after_s(refused)):
                            refused = refusal  # the longest wait asked for
                    if answer is not None and answer["ready"]:
                        return blob
                    if refused is not None:  # rate_limited: wait, then go on from what the gateway holds
                        # one write at a time until one is taken: writes further on would spend the
                        # tokens the first missing one waits for, round after round; and no asking
                        # where to go on (that spends a token too): the pass started at have
                        window = 1
                        await asyncio.sleep(_wait_s(refused))
                        if answer is not None:
                            have = max(have, answer["have"])
                        continue
                    passes += 1  # a whole pass, and still not ready
                    have = None  # nothing was left to write, or the gateway lacks a part: ask again
            finally:
                for task in pending:
                    task.cancel()

    def _blob_limits(self) -> tuple[int, int]:
        limits = self.limits
        chunk, in_flight = limits.get("blob_chunk"), limits.get("blob_in_flight")
        if type(chunk) is not int or type(in_flight) is not int:
            raise InterlinkError("this gateway does not serve blobs (no blob limits in its welcome)")
        return chunk, in_flight

    async def _rate_limited(self, request):
        """``await request()``, again after ``retry_after`` as long as it is a short
        ``rate_limited`` (``_wait_s``)."""
        while True:
            try:
                return await request()
            except ServerError as exc:
                if exc.code != "rate_limited":
                    raise
                await asyncio.sleep(_wait_s(exc))

    async def _blob_written(self, pending: collections.deque, progress, size: int, latest: dict | None):
        """The oldest write in flight answered: (the latest good answer, the ``rate_limited`` error
        if this one was refused for it). Any other error raises."""
        try:
            answer = await pending.popleft()
        except ServerError as exc:
            if exc.code != "rate_limited" or _retry_after_s(exc) > BLOB_MAX_WAIT_S:
                raise
            return latest, exc
        if progress is not None:
            progress(answer["have"] if not answer["ready"] else size, size)
        if latest is not None and latest["have"] > answer["have"] and not answer["ready"]:
            return latest, None  # answers come in order, and have never shrinks during a pass
        return answer, None

    async def download_blob(self, blob: bytes, sink=None, *, progress=None, timeout_s: float = 60.0):
        """Read the whole blob ``blob``: its bytes (``sink`` None), or written to ``sink`` (a file
        path, or a binary file opened for writing) and its size returned. Chunks are read up to
        ``blob_in_flight`` at once, in order; ``progress(received, size)`` after each;
        ``rate_limited`` is waited out. ``not_found`` (unknown, expired or unfinished) raises
        ``ServerError``."""
        chunk, in_flight = self._blob_limits()
        first = await self._rate_limited(lambda: self.iq("blob.read", blob=blob, off=0, len=chunk, timeout_s=timeout_s))
        size = first["size"]
        with BlobSink(sink) as out:
            out.write(first["data"])
            received = len(first["data"])
            if progress is not None:
                progress(received, size)
            window = in_flight  # reads in flight at most (back to 1 after a rate limit, then doubling)
            while received < size:
                pending: collections.deque = collections.deque()
                refused = None
                try:
                    for offset in itertools.chain(range(received, size, chunk), [None]):
                        if offset is not None:
                            pending.append(asyncio.ensure_future(
                                self.iq("blob.read", blob=blob, off=offset, len=chunk, timeout_s=timeout_s)))
                        while pending and (offset is None or len(pending) >= window):
                            answer = await pending.popleft()
                            data = answer["data"]
                            if answer["size"] != size or len(data) != min(chunk, size - received):
                                raise InterlinkError(
                                    f"blob {blob.hex()}: the gateway answered {len(data)} bytes of a {answer['size']}-byte "
                                    f"blob at {received}, where {min(chunk, size - received)} of {size} were due")
                            out.write(data)
                            received += len(data)
                            window = min(in_flight, 2 * window)
                            if progress is not None:
                                progress(received, size)
                except ServerError as exc:
                    if exc.code != "rate_limited":
                        raise
                    refused = exc
                finally:
                    for task in pending:
                        task.cancel()
                if refused is not None:
                    # Later reads were cut; go on from what was received (in order), one read at a
                    # time until one is taken, after the wait.
                    window = 1
                    await asyncio.sleep(_wait_s(refused))
            return out.result(size)

    async def send_message(
        self,
        to: str,
        ciphertexts: dict[int, bytes],
        *,
        own: dict[int, bytes] | None = None,
        msg_id: bytes | None = None,
        timeout_s: float = 10.0,
    ) -> dict:
        """Send a 1:1 message: one ciphertext per device of ``to`` (and, in ``own``, per other
        device of your own). Returns the ``ack`` once the gateway stored it durably; resending
        with the same ``msg_id`` after a lost connection is safe (``ack`` with ``dup``).
        ``ServerError`` says why not: ``device_mismatch`` (with ``missing``/``extra``),
        ``unknown_recipient``, ``not_opted_in``..."""
        stanza = {"t": "msg", "id": msg_id or new_message_id(), "to": to, "c": ciphertexts}
        if own:
            stanza["own"] = own
        return await self._send_stored(stanza, timeout_s)

    async def send_group_message(self, g: bytes, body: bytes, *, msg_id: bytes | None = None, timeout_s: float = 10.0) -> dict:
        """Send a group message: ``body`` is the one ciphertext for every member's device. Returns
        the ``ack``; like ``send_message``, kept in the outbox until answered."""
        return await self._send_stored({"t": "msg", "id": msg_id or new_message_id(), "g": g, "b": body}, timeout_s)

    async def _send_stored(self, stanza: dict, timeout_s: float) -> dict:
        """Send a stanza the gateway stores; keep it in the outbox until it is answered."""
        outbox = self.outbox
        if outbox is not None:
            outbox._add(stanza)
        try:
            answer = await self.request(stanza, timeout_s=timeout_s)
        except ServerError as exc:
            # A refusal for now (overloaded, rate_limited: "resend the same id later") stays in the
            # outbox for resend_pending or the next connect; in a cluster an overloaded one may even
            # have been stored (unconfirmed), which only a resend with the same id settles. Any
            # other refusal stored nothing, and resending would not help.
            if outbox is not None and exc.code not in TRANSIENT_REFUSALS:
                outbox._settled(stanza["id"])
            raise
        if outbox is not None:
            outbox._settled(stanza["id"])
        return answer

    async def resend_pending(self, *, timeout_s: float = 10.0) -> list:
        """Resend, in order and pipelined, what the outbox holds; returns the answers (``ack``
        or the ``ServerError`` of a refusal)."""
        if not self.outbox:
            return []
        return await asyncio.gather(
            *(self._send_stored(stanza, timeout_s) for stanza in self.outbox.pending()), return_exceptions=True
        )

    async def send_receipt(self, to: str, kind: str, ids: list[bytes], *, receipt_id: bytes | None = None, timeout_s: float = 10.0) -> dict:
        """Tell ``to`` that messages were ``"delivered"`` or ``"read"``; returns the ``ack``.
        The receipt also reaches your own other devices."""
        stanza = {"t": "rcpt", "id": receipt_id or new_message_id(), "to": to, "kind": kind, "ids": list(ids)}
        return await self._send_stored(stanza, timeout_s)

    async def send_state(self, to: str, state: str) -> None:
        """Typing state (``"composing"``/``"paused"``): ephemeral, not stored, no answer."""
        await self.send({"t": "state", "to": to, "s": state})

    async def received(self, seqs: list[int]) -> None:
        """Confirm delivered items (``recv``): the gateway deletes them and sends more."""
        if seqs:
            await self.send({"t": "recv", "seq": list(seqs)})

    async def ping(self, *, timeout_s: float = 10.0) -> float:
        """Round trip time of a ``ping`` in seconds."""
        started = time.perf_counter()
        await self.request({"t": "ping", "id": next(self._ids)}, timeout_s=timeout_s)
        return time.perf_counter() - started

    async def recv(self, *, timeout_s: float | None = None) -> dict:
        """The next stanza that is not an answer to a request (``dlv``, ``state``...).
        An unsolicited ``err`` raises ``ServerError``; the end of the session ``SessionClosedError``."""
        if self._inbox.empty() and self._closed is not None:
            raise self._closed_error()
        async with asyncio.timeout(timeout_s):
            item = await self._inbox.get()
        if isinstance(item, InterlinkError):
            raise item
        return item

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        try:
            return await self.recv()
        except SessionClosedError:
            raise StopAsyncIteration from None

    async def close(self) -> None:
        """Close the connection (the gateway keeps whatever is undelivered for the next session)."""
        if self._transport is not None and not self._transport.is_closing():
            self._conn.close()
            self._transport.close()
        await self.wait_closed()

    async def wait_closed(self, timeout_s: float = 5.0) -> None:
        if self._transport is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self._lost.wait()
        except TimeoutError:
            self._abort()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # -- plumbing

    def _check_open(self) -> None:
        if self._closed is not None:
            raise self._closed_error()

    def _closed_error(self) -> SessionClosedError:
        closed = self._closed
        return SessionClosedError(f"session closed: {closed.reason} {closed.message}".strip(), reason=closed.reason)

    def _receive(self, data: bytes) -> None:
        self._conn.receive_data(data, time.time())
        self._process()

    def _process(self) -> None:
        conn = self._conn
        for event in conn.events():
            if type(event) is StanzaReceived:
                self._route(event.stanza)
            elif type(event) is Welcomed:
                self._adopt_limits(event.welcome)
                if not self._welcomed.done():
                    self._welcomed.set_result(event.welcome)
            elif type(event) is ConnectionClosed:
                self._on_closed(event)
        if self._to_receive and not conn.closed:
            conn.send_stanza({"t": "recv", "seq": self._to_receive})
            self._to_receive = []
        data = conn.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)
        if conn.closed and self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _adopt_limits(self, welcome: dict) -> None:
        # Never send frames larger than the gateway announced it accepts.
        limits = welcome.get("limits")
        max_frame = limits.get("max_frame") if isinstance(limits, dict) else None
        if type(max_frame) is int and TAG_BYTES < max_frame:
            self._conn.max_plaintext_bytes = min(self._conn.max_plaintext_bytes, max_frame - TAG_BYTES)

    def _route(self, stanza: dict) -> None:
        kind = stanza.get("t")
        key = None
        if kind == "pong":
            key = ("ping", stanza.get("id"))
        elif kind == "res":
            key = ("iq", stanza.get("id"))
        elif kind == "ack":
            key = ("ref", stanza.get("id"))
        elif kind == "err":
            key = ("iq", stanza["id"]) if "id" in stanza else ("ref", stanza.get("ref"))
        if key is not None and type(key[1]) not in (int, bytes):
            key = None  # a malformed answer matches no request (and must not raise here)
        waiter = self._waiters.get(key) if key is not None else None
        if kind == "err":
            error = ServerError(str(stanza.get("msg", "")), code=str(stanza.get("code")), fields=stanza)
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
            else:
                self._deliver(error)
            return
        if waiter is not None and not waiter.done():
            waiter.set_result(stanza)
            return
        if kind == "dlv" and self.auto_recv and not self._accept_delivery(stanza):
            return
        self._deliver(stanza)

    def _accept_delivery(self, stanza: dict) -> bool:
        """Confirm a delivered item and tell whether it is new (not a redelivery)."""
        seq = stanza.get("seq")
        if type(seq) is int:
            self._to_receive.append(seq)
        key = (stanza.get("from"), stanza.get("id"))
        if type(key[0]) is not str or type(key[1]) is not bytes:
            return True  # malformed: hand it out as it is, never guess
        return self.seen.first_time(key)

    def _deliver(self, item) -> None:
        try:
            self._inbox.put_nowait(item)
        except asyncio.QueueFull:
            self._conn.close()
            self._on_closed(ConnectionClosed("client_overflow", message="client inbox full; recv() not called"))

    def _on_closed(self, event: ConnectionClosed) -> None:
        if self._closed is not None:
            return
        self._closed = event
        bye = self._conn.bye
        if event.reason == CloseReason.REDIRECT and not self._welcomed.done() and bye is not None:
            error: InterlinkError = _redirect_error(bye)
        elif event.reason == CloseReason.AUTH_FAILED:
            error = AuthError(event.message, code=event.code or "auth_failed")
        elif event.reason == CloseReason.HANDSHAKE_FAILED:
            error = self._conn.failure or HandshakeError(event.message)
        elif not self._welcomed.done() and event.reason == "peer_closed" and not self._conn.handshake_answered:
            # Closed before answering our first handshake message: with IK, what a gateway does
            # when it cannot read message 1 (its static key changed). Only then is XX worth a try.
            error = (IKUnansweredError if self._conn.pattern == "IK" else HandshakeError)(
                "the gateway closed the connection during the handshake"
            )
        else:
            error = self._closed_error()
        if not self._welcomed.done():
            self._welcomed.set_exception(error)
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(self._closed_error())
        if self._inbox.empty():
            self._deliver(self._closed_error())

    def _connection_lost(self, exc) -> None:
        if self._closed is None and isinstance(exc, UpgradeRefusedError):  # WebSocket: no session ever began
            self._on_closed(ConnectionClosed(CloseReason.BAD_UPGRADE, message=str(exc)))
        if self._closed is None:
            self._conn.connection_lost()
            self._process()
            if self._closed is None:
                self._on_closed(ConnectionClosed("connection_lost", message=str(exc or "")))
        self._lost.set()

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        if not self._welcomed.done():
            self._welcomed.cancel()


def _redirect_error(bye: dict) -> InterlinkError:
    """The ``bye redirect`` as a ``RedirectedError``, or why it cannot be followed."""
    node, host, port, ws = bye.get("node"), bye.get("host"), bye.get("port"), bye.get("ws")
    if type(host) is not str or not host or type(port) is not int or not 1 <= port <= 65535 or (
            ws is not None and type(ws) is not str):
        return SessionClosedError("the gateway redirected this session without a usable address", reason="redirect")
    return RedirectedError(f"this user's home is node {node}, at {host}:{port}", node=str(node), host=host, port=port, ws=ws)


def new_message_id() -> bytes:
    """A fresh 16-byte stanza id."""
    return os.urandom(16)
