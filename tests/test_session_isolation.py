"""What sessions share (docs/architecture.md): every piece of process-wide state a session touches
while it is served, each shown unable to carry bytes or rights from one session (or transport
message) to another.

Real parts throughout: ``ServerConnection``/``ClientConnection`` with real Noise handshakes, the
real ``GatewayServer`` and ``GatewayProtocol`` on uvloop transports, LMDB in ``tmp_path``, the demo
OpenID issuers over HTTP, ``interlink.Client`` over TCP. Where the order of two sessions' reads
matters, the test plays uvloop's part (``Edge.feed``): it copies each chunk into the server's one
read buffer, calls ``buffer_updated`` as uvloop does, then overwrites what it copied, as the next
read into that buffer would. Nothing asserts on time: "nothing more arrived" is shown by a later
stanza on the same connection (a ``pong``, a marker message) arriving first.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import socket
import sys
import threading
import time

import jwt
import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import interlink.core.domain._fanout_pure as fanout_pure
import interlink.core.protocol._framing_pure as framing_pure
from interlink.client import Client, Suite
from interlink.core.protocol import stanza
from interlink.core.domain.auth import Identity, Provider, ProviderRegistry
from interlink.core.protocol.certs import generate_static_key, x25519_public
from interlink.core.protocol.connection import (
    MAX_PREAUTH_FRAMES,
    AuthRequested,
    ClientConnection,
    ConnectionClosed,
    ServerConnection,
    StanzaReceived,
    Welcomed,
)
from interlink.core.errors import AuthError, DecryptError, ServerError
from interlink.core.protocol.framing import encode_frames
from interlink.core.edge.keyfiles import init_operator_keys
from interlink.core.protocol.noise import SUITES, NoiseSession
from interlink.core.edge.server import GatewayProtocol, GatewayServer
from interlink.testing import DEFAULTS, FakeClock, jwks_cache, limits, lmdb_store, server_settings, token_verifier
from protocol.test_connection import NOW, SETTINGS, make_client
from three_providers import AUD, config_for
from twins import twin_fixture, twin_modules

FRAME_DECODERS = [m.FrameDecoder for m in twin_modules("_framing")]
CIPHER_STATES = [m.CipherState for m in twin_modules("_cipher")]
FANOUT_TWINS = twin_modules("_fanout")
twin = twin_fixture("_fanout")  # compiled, then pure
SCRIBBLE = 0xA5  # what "the next read" leaves in the shared buffer


def _chunks(data: bytes, sizes) -> list[bytes]:
    """``data`` cut into pieces of the sizes ``sizes`` cycles through."""
    pieces, at = [], 0
    for size in itertools.cycle(sizes):
        if at >= len(data):
            return pieces
        pieces.append(data[at : at + size])
        at += size
    return pieces


def _take_turns(queues: list) -> list:
    """Round robin over ``[(target, [piece, ...]), ...]``: the order two sessions' reads interleave."""
    order = []
    while any(pieces for _, pieces in queues):
        for target, pieces in queues:
            if pieces:
                order.append((target, pieces.pop(0)))
    return order


# ----------------------------------------------------------------------------- bytes: the read path


class _Pair:
    """One client and the server's end of its connection, in memory."""

    def __init__(self, suite: int, localpart: str) -> None:
        self.localpart = localpart
        self.client = make_client(suite, token=f"token-of-{localpart}")
        self.server = ServerConnection(SETTINGS, NOW)
        self.answers: list[dict] = []  # stanzas the client got
        self.served: list = []  # events the server emitted

    def identity(self) -> Identity:
        return Identity(provider="alpha", localpart=self.localpart, device=3, expires_at=NOW + 3600)


def _exchange(pairs: list[_Pair], buffer: bytearray, sizes) -> None:
    """Move bytes both ways until none moves. Every server reads through the one shared ``buffer``,
    the pairs' chunks taking turns, and the buffer is overwritten after every read."""
    view = memoryview(buffer)
    while True:
        queues = [(pair, _chunks(pair.client.data_to_send(), sizes)) for pair in pairs]
        moved = any(pieces for _, pieces in queues)
        for pair, piece in _take_turns(queues):
            view[: len(piece)] = piece
            pair.server.receive_data(view[: len(piece)], NOW)
            view[: len(piece)] = bytes([SCRIBBLE]) * len(piece)
        for pair in pairs:
            pair.served += pair.server.events()
            out = pair.server.data_to_send()
            if out:
                moved = True
                pair.client.receive_data(out, NOW)
            pair.answers += [e.stanza for e in pair.client.events() if isinstance(e, StanzaReceived)]
        if not moved:
            return


@pytest.mark.parametrize("suites", [(0x01, 0x01), (0x01, 0x12), (0x11, 0x02)])
@pytest.mark.parametrize("sizes", [(1,), (1, 2, 3, 5, 8, 13, 64)], ids=["byte-by-byte", "mixed-chunks"])
def test_two_sessions_read_through_one_buffer_each_get_only_their_own(suites, sizes):
    """The preamble, the handshake messages and their auth payloads, the frames split across reads,
    the transport messages held before auth and those after: all through one buffer that the other
    session's bytes overwrite after every read."""
    buffer = bytearray(64)
    pairs = [_Pair(suites[0], "ann"), _Pair(suites[1], "ben")]
    for pair in pairs:
        pair.client.start(NOW)
    _exchange(pairs, buffer, sizes)
    for number, pair in enumerate(pairs):  # pipelined before auth is decided: held by the server
        base = 100 * number
        pair.client.send_stanza({"t": "ping", "id": base + 1})
        pair.client.send_stanza({"t": "iq", "id": base + 11, "op": "block.list"})
    _exchange(pairs, buffer, sizes)
    for pair in pairs:
        requests = [e for e in pair.served if isinstance(e, AuthRequested)]
        assert [(r.token, r.client_static) for r in requests] == [
            (f"token-of-{pair.localpart}", pair.client._session.static_public)
        ]
        assert not [e for e in pair.served if isinstance(e, StanzaReceived)]  # held, not served yet
        pair.server.accept_auth(pair.identity(), {"t": "welcome", "user": f"{pair.localpart}@alpha"}, NOW)
    _exchange(pairs, buffer, sizes)
    for number, pair in enumerate(pairs):
        base = 100 * number
        pair.client.send_stanza({"t": "ping", "id": base + 2})
        pair.client.send_stanza({"t": "iq", "id": base + 12, "op": "block.list"})
    _exchange(pairs, buffer, sizes)
    for number, pair in enumerate(pairs):
        base = 100 * number
        assert pair.client.welcome["user"] == f"{pair.localpart}@alpha"
        assert pair.answers == [{"t": "pong", "id": base + 1}, {"t": "pong", "id": base + 2}]
        stanzas = [e.stanza for e in pair.served if isinstance(e, StanzaReceived)]
        assert [(s["id"], s["op"]) for s in stanzas] == [(base + 11, "block.list"), (base + 12, "block.list")]
        assert not [e for e in pair.served if isinstance(e, ConnectionClosed)]


@pytest.mark.parametrize("decoder_class", FRAME_DECODERS)
def test_frame_decoders_copy_what_they_keep_of_the_shared_buffer(decoder_class):
    """A frame split across reads is kept as a copy, and every frame handed out is its own bytes."""
    streams = {
        name: [bytes([fill]) * (1 + (i * 37) % 700) for i in range(40)]
        for name, fill in (("a", 0x11), ("b", 0x22))
    }
    decoders = {name: decoder_class(65535) for name in streams}
    got: dict = {name: [] for name in streams}
    buffer = bytearray(2048)
    view = memoryview(buffer)
    queues = [(name, _chunks(encode_frames(frames), (1, 3, 700, 2, 1500))) for name, frames in streams.items()]
    for name, piece in _take_turns(queues):
        view[: len(piece)] = piece
        frames = decoders[name].feed(view[: len(piece)])
        view[: len(piece)] = bytes([SCRIBBLE]) * len(piece)
        assert all(type(frame) is bytes for frame in frames)
        got[name] += frames
    assert got == streams
    assert all(decoder.pending_bytes == 0 for decoder in decoders.values())


@pytest.mark.parametrize("cipher_class", CIPHER_STATES)
def test_cipher_twins_hand_out_fresh_bytes_never_their_scratch(cipher_class):
    """The compiled twin writes every nonce into one module-wide scratch buffer: two sessions'
    cipher states interleaved must still each use their own counter, and what they return must
    be new bytes, unchanged by later calls and by the read buffer being reused."""
    key_a, key_b = os.urandom(32), os.urandom(32)
    sessions = [
        (cipher_class("ChaChaPoly", key_a), cipher_class("ChaChaPoly", key_a), b"a"),
        (cipher_class("AESGCM", key_b, 1000), cipher_class("AESGCM", key_b, 1000), b"b"),
    ]
    buffer = bytearray(1024)
    view = memoryview(buffer)
    kept = []
    for i in range(40):
        for send, recv, fill in sessions:
            plaintext = fill * (i + 1)
            ciphertext = send.encrypt(plaintext)
            view[: len(ciphertext)] = ciphertext
            opened = recv.decrypt(view[: len(ciphertext)])  # read from the shared buffer...
            view[: len(ciphertext)] = bytes([SCRIBBLE]) * len(ciphertext)  # ...which the next read reuses
            framed = send.encrypt_frames([plaintext, plaintext])
            assert [recv.decrypt(f) for f in framing_pure.FrameDecoder().feed(framed)] == [plaintext, plaintext]
            assert type(ciphertext) is bytes and type(opened) is bytes and type(framed) is bytes
            kept.append((opened, plaintext))
    assert all(opened == plaintext for opened, plaintext in kept)
    assert [s[0].nonce for s in sessions] == [120, 1120]


@pytest.mark.parametrize("cipher_class", CIPHER_STATES)
def test_cipher_states_on_four_threads_each_keep_their_own_nonce(cipher_class):
    """``cryptography`` releases the GIL inside its AEAD calls (measured with 51.0), so the
    compiled twin's one nonce scratch is safe only because the nonce is read before that: four
    threads encrypting at once must each still use their own counter. (The gateway itself calls
    every cipher on its loop thread; an application may run clients on other threads.)"""
    failures: list = []

    def session(cipher_name: str) -> None:
        key = os.urandom(32)
        send, recv = cipher_class(cipher_name, key), cipher_class(cipher_name, key, 0)
        for i in range(1500):
            plaintext = os.urandom(4096)
            try:
                if recv.decrypt(send.encrypt(plaintext)) != plaintext:
                    failures.append((cipher_name, i))
            except DecryptError:
                failures.append((cipher_name, i))
                recv.nonce = send.nonce  # count the next ones too

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=session, args=(name,)) for name in ("ChaChaPoly", "AESGCM") * 2]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(previous)
    assert failures == []


def test_static_keypair_cache_keeps_each_key_its_own():
    """noise.py parses a static key once and shares the parsed pair (the node's key); it is keyed
    by the private bytes and holds at most a few, so past its bound it forgets, never confuses."""
    keys = [generate_static_key() for _ in range(40)]
    for round_ in range(2):
        for key in keys:
            session = NoiseSession(SUITES[0x01], initiator=round_ == 0, static_private=key, prologue=b"IL\x01\x01")
            assert session.static_public == x25519_public(key)


# ----------------------------------------------------------------------------- bytes: the encoders


def _dlv(seq: int, ts: int, sender: str, body: bytes, g: bytes) -> dict:
    """The dlv ``GroupDlv`` encodes, as a map ``encode_stanza`` would take."""
    return {"t": "dlv", "seq": seq, "k": "msg", "id": b"i" * 16, "from": sender, "dev": 1, "ts": ts, "c": body, "g": g}


def test_a_failed_encode_leaves_nothing_in_the_shared_packers(twin):
    """``encode_stanza`` and the fan-out's ``GroupDlv``/``splice`` pack with one module-wide
    ``msgpack.Packer`` each. A pack that fails half-way must not leave its first bytes in front of
    the next stanza, which may be another session's."""
    g = b"g" * 16
    for bad in ({"t": "res", "id": 1, "bad": object()}, {"t": "res", "id": 2**64}, _nested(2000)):
        with pytest.raises((TypeError, OverflowError, ValueError)):
            stanza.encode_stanza(bad)
        good = {"t": "res", "id": 7, "users": ["ann@alpha"]}
        assert stanza.encode_stanza(good) == msgpack.packb(good)
    with pytest.raises(TypeError):
        twin.GroupDlv(b"i" * 16, "ann@alpha", 1, object(), g)(1, 5)
    assert twin.GroupDlv(b"i" * 16, "ben@beta", 1, b"body", g)(3, 5) == msgpack.packb(_dlv(3, 5, "ben@beta", b"body", g))
    tail = twin.GroupDlv(b"i" * 16, "ben@beta", 1, b"body", g)(0, 5)[len(twin.DLV_HEAD) + 1 :]
    with pytest.raises(OverflowError):
        twin.splice(2**64, tail)  # both twins hand a seq past uint64 to the packer, which refuses it
    assert twin.GroupDlv(b"i" * 16, "cy@gamma", 2, b"b2", g)(9, 6) == msgpack.packb(
        {**_dlv(9, 6, "cy@gamma", b"b2", g), "dev": 2})
    assert twin.splice(300, tail) == msgpack.packb(_dlv(300, 5, "ben@beta", b"body", g))


def _nested(depth: int) -> dict:
    value: dict = {"t": "res"}
    for _ in range(depth):
        value = {"t": "res", "x": value}
    return value


def test_the_packers_encode_exactly_while_the_writer_thread_shares_them():
    """In ``commit_mode = "thread"`` the writer thread builds every ``dlv`` (``encode_stanza``,
    ``GroupDlv``) while the loop encodes answers and splices stored group copies with the same
    module-wide packers. That is safe only because msgpack's compiled ``Packer.pack`` runs from
    start to finish without letting another thread in; msgpack's pure-Python fallback would mix
    the two threads' bytes (shown failing with ``msgpack.fallback.Packer`` swapped in)."""
    g = b"g" * 16
    mismatches: list = []
    rounds = 2000

    def writer_thread() -> None:
        for i in range(rounds):
            for twin in FANOUT_TWINS:
                copy = twin.GroupDlv(b"i" * 16, "w%d@alpha" % i, 1, b"w" * (i % 90 + 1), g)(i, i)
                if copy != msgpack.packb(_dlv(i, i, "w%d@alpha" % i, b"w" * (i % 90 + 1), g)):
                    mismatches.append(("thread", i))
            dlv = {"t": "dlv", "seq": i, "k": "msg", "from": "w@alpha", "c": b"x" * (i % 70)}
            if stanza.encode_stanza(dlv) != msgpack.packb(dlv):
                mismatches.append(("thread", i))

    tail = fanout_pure.GroupDlv(b"i" * 16, "loop@alpha", 1, b"l" * 40, g)(0, 9)[len(fanout_pure.DLV_HEAD) + 1 :]
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        thread = threading.Thread(target=writer_thread)
        thread.start()
        for i in range(rounds):
            answer = {"t": "err", "code": "bad_stanza", "msg": "m" * (i % 50), "id": i}
            if stanza.encode_stanza(answer) != msgpack.packb(answer):
                mismatches.append(("loop", i))
            for twin in FANOUT_TWINS:
                if twin.splice(i * 1000, tail) != msgpack.packb(_dlv(i * 1000, 9, "loop@alpha", b"l" * 40, g)):
                    mismatches.append(("loop", i))
        thread.join()
    finally:
        sys.setswitchinterval(previous)
    assert mismatches == []


# ----------------------------------------------------------------------------- the edge, driven read by read


class Peer:
    """A ``ClientConnection`` whose gateway end is a real ``GatewayProtocol`` on a uvloop transport
    (one end of a socket pair). What the client sends is read by the gateway through ``Edge.feed``;
    what the gateway writes is read from the socket."""

    def __init__(self, edge: Edge, proto: GatewayProtocol, sock: socket.socket, client: ClientConnection) -> None:
        self.edge = edge
        self.proto = proto
        self.sock = sock
        self.client = client
        self.received: list[dict] = []  # every stanza the gateway sent; {"t": "closed", ...} at the end
        self._ids = itertools.count(1000)

    def write(self, data: bytes | None = None) -> None:
        """Let the gateway read ``data`` (default: what the client has queued) in one read."""
        data = self.client.data_to_send() if data is None else data
        if data:
            self.edge.feed(self.proto, data)

    def send(self, stanza_: dict) -> None:
        self.client.send_stanza(stanza_)
        self.write()

    async def read(self, until, *, reply: bool = True) -> list[dict]:
        """Read what the gateway wrote until ``until()`` holds; returns the stanzas read meanwhile.
        ``reply``: send what the client answers (its handshake messages) as it goes."""
        start = len(self.received)
        loop = asyncio.get_running_loop()
        while not until():
            async with asyncio.timeout(10):  # a guard against a hang, not a timing assertion
                data = await loop.sock_recv(self.sock, 1 << 16)
            if not data:
                raise AssertionError(f"the gateway closed the connection; read so far: {self.received}")
            self.client.receive_data(data, self.edge.clock())
            for event in self.client.events():
                if isinstance(event, Welcomed):
                    self.received.append(event.welcome)
                elif isinstance(event, StanzaReceived):
                    self.received.append(event.stanza)
                elif isinstance(event, ConnectionClosed):
                    self.received.append({"t": "closed", "reason": event.reason, "code": event.code})
            if reply:
                self.write()
        return self.received[start:]

    def saw(self, **match) -> bool:
        return any(all(s.get(k) == v for k, v in match.items()) for s in self.received)

    async def open(self) -> dict:
        self.write()
        await self.read(lambda: self.client.welcome is not None)
        return self.client.welcome

    async def last_flight(self) -> bytes:
        """Run the handshake up to the client's last flight (XX message 3 with the auth payload, and
        whatever the client queued after it), and return it unsent."""
        self.write()
        await self.read(lambda: self.client.handshake_answered, reply=False)
        return self.client.data_to_send()

    async def request(self, stanza_: dict) -> dict:
        self.send(stanza_)
        key = "ref" if stanza_["t"] in ("msg", "rcpt") else "id"

        def answered() -> bool:
            return any(s.get("t") in ("pong", "res", "ack", "err") and s.get(key, s.get("id")) == stanza_["id"]
                       for s in self.received)

        await self.read(answered)
        return next(s for s in self.received if s.get("t") in ("pong", "res", "ack", "err")
                    and s.get(key, s.get("id")) == stanza_["id"])

    async def iq(self, op: str, **fields) -> dict:
        return await self.request({"t": "iq", "id": next(self._ids), "op": op, **fields})

    async def barrier(self) -> list[dict]:
        """Everything the gateway wrote before the answer to a fresh ``ping``."""
        ping_id = next(self._ids)
        start = len(self.received)
        self.send({"t": "ping", "id": ping_id})
        await self.read(lambda: self.saw(t="pong", id=ping_id))
        return [s for s in self.received[start:] if s != {"t": "pong", "id": ping_id}]


class Edge:
    """A real ``GatewayServer`` (LMDB store, the demo issuers' keys fetched over HTTP and cached,
    the router and operations) whose connections are real uvloop transports over socket pairs.
    The test plays uvloop's reads, so it decides how sessions' bytes interleave. The clock stands
    still unless the test moves it (rate buckets refill with it)."""

    def __init__(self, issuers, folder, *, commit_in_thread: bool = False, **limit_overrides) -> None:
        self.issuers = dict(zip(("alpha", "beta", "gamma"), issuers))
        self.clock = FakeClock(time.time())  # moves only when the test advances it
        self.registry = ProviderRegistry(config_for(issuers, folder).providers)
        self.keys = init_operator_keys(folder / "keys", "node-t")
        self.store = lmdb_store(folder / "lmdb", sync=False, map_size_bytes=1 << 27)
        self.jwks = jwks_cache()
        self.server = GatewayServer(
            settings=server_settings(static_private=self.keys.static_private, certificate=self.keys.certificate, node="node-t"),
            registry=self.registry,
            verifier=token_verifier(self.registry, self.jwks),
            store=self.store,
            limits=limits(**limit_overrides),
            idle_release_s=DEFAULTS.idle_release_s,
            mailbox_ttl_s=DEFAULTS.mailbox_ttl_s,
            slow_consumer_s=DEFAULTS.slow_consumer_s,
            commit_in_thread=commit_in_thread,
            clock=self.clock,
        )
        self.peers: list[Peer] = []

    async def start(self) -> None:
        for provider in self.registry:
            assert await self.jwks.refresh(provider)  # keys cached: authentication decides at once

    async def close(self) -> None:
        for peer in self.peers:
            peer.sock.close()
        await self.server.drain(timeout_s=2.0)
        await self.jwks.close()
        self.store.close()

    def feed(self, proto: GatewayProtocol, data: bytes) -> None:
        """One read of ``data`` into the server's shared buffer, as uvloop does it; then the bytes
        are overwritten, as the next read (of any connection) would."""
        view = self.server.read_view
        view[: len(data)] = data
        proto.buffer_updated(len(data))
        view[: len(data)] = bytes([SCRIBBLE]) * len(data)

    def feed_in_turns(self, flights: list[tuple[Peer, bytes]], sizes=(1,)) -> None:
        """The peers' bytes read in turns, ``sizes`` at a time: each read overwrites the last."""
        for peer, piece in _take_turns([(peer, _chunks(data, sizes)) for peer, data in flights]):
            self.feed(peer.proto, piece)

    def token(self, address: str, **claims) -> str:
        localpart, provider = address.split("@")
        return self.issuers[provider].issue(localpart, audience=AUD, **claims)

    async def connect(self, address: str, device: int = 1, *, token: str | None = None,
                      suite: Suite = Suite.XX_CHACHAPOLY) -> Peer:
        server_end, client_end = socket.socketpair()
        client_end.setblocking(False)
        _, proto = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: GatewayProtocol(self.server), server_end)
        client = ClientConnection(
            suite=int(suite), static_private=generate_static_key(), root_public=self.keys.root_public,
            token=token or self.token(address), device=device,
            server_static=self.keys.static_public if suite.is_ik else None,
        )
        client.start(self.clock())
        peer = Peer(self, proto, client_end, client)
        self.peers.append(peer)
        return peer

    async def session(self, address: str, device: int = 1) -> Peer:
        peer = await self.connect(address, device)
        await peer.open()
        return peer


@pytest.fixture
async def edges(issuers, tmp_path):
    made: list[Edge] = []

    async def make(**options) -> Edge:
        edge = Edge(issuers, tmp_path / f"edge{len(made)}", **options)
        made.append(edge)
        await edge.start()
        return edge

    yield make
    for edge in made:
        await edge.close()


async def test_sessions_read_in_turns_through_the_gateways_buffer_each_run_as_themselves(edges):
    """The shared read buffer of the real gateway, with what each connection keeps between reads:
    preamble bytes, split handshake messages, auth payloads, transport messages held before auth.
    Two users pipeline the same ``iq`` ids before their auth is decided, a third with a refused
    token pipelines a ``block.add``; their flights are read byte by byte in turns."""
    edge = await edges()
    for address, blocked in (("ann@alpha", "ann-blocked@alpha"), ("ben@beta", "ben-blocked@beta")):
        setup = await edge.session(address, 2)
        assert (await setup.iq("block.add", user=blocked))["t"] == "res"
    ann, ben = await edge.connect("ann@alpha"), await edge.connect("ben@beta")
    eve = await edge.connect("eve@alpha", token=edge.token("eve@alpha", expires_in=-600))
    flights = []
    for peer in (ann, ben, eve):
        flight = await peer.last_flight()
        peer.client.send_stanza({"t": "iq", "id": 1, "op": "block.list"})
        peer.client.send_stanza({"t": "iq", "id": 2, "op": "block.add", "user": "victim@alpha"})
        peer.client.send_stanza({"t": "ping", "id": 3})
        flights.append((peer, flight + peer.client.data_to_send()))
    edge.feed_in_turns(flights)
    await ann.read(lambda: ann.saw(t="pong", id=3))
    await ben.read(lambda: ben.saw(t="pong", id=3))
    await eve.read(lambda: eve.saw(t="closed"))
    for peer, user, blocked in ((ann, "ann@alpha", "ann-blocked@alpha"), (ben, "ben@beta", "ben-blocked@beta")):
        assert peer.received[0]["user"] == user
        assert [s for s in peer.received if s["t"] == "res" and s["id"] == 1] == [
            {"t": "res", "id": 1, "users": [blocked], "more": False}]
        assert edge.store.blocked(user) == sorted([blocked, "victim@alpha"])
    assert eve.received == [{"t": "closed", "reason": "auth_failed", "code": "token_expired"}]
    assert edge.store.blocked("eve@alpha") == []


async def test_a_stanza_cut_short_by_one_session_is_never_completed_by_another(edges):
    """The reported injection: mallory's transport message ends inside an ``iq`` map; victor's next
    message must not complete it (which would run ``block.list`` as victor, answered to victor)."""
    edge = await edges()
    victor = await edge.session("victor@alpha")
    await victor.iq("block.add", user="secret@alpha")
    mallory = await edge.session("mallory@alpha")
    cut_short = b"\x84" + b"".join(msgpack.packb(v) for v in ("t", "iq", "id", 4242, "op", "block.list", "x"))
    mallory.client.send_encoded(cut_short)  # one transport message holding only these bytes
    mallory.write()
    victor.send({"t": "ping", "id": 7})
    victor.send({"t": "ping", "id": 8})
    await victor.read(lambda: victor.saw(t="pong", id=8))
    assert victor.saw(t="pong", id=7)
    assert not victor.saw(id=4242)
    answers = await mallory.barrier()
    assert [s["code"] for s in answers if s["t"] == "err"] == ["bad_stanza"]


# ----------------------------------------------------------------------------- the session table


@pytest.mark.parametrize("commit_in_thread", [False, True], ids=["inline", "thread"])
async def test_a_replaced_sessions_late_commit_answer_reaches_no_other_session(edges, commit_in_thread):
    """A message is read from alice's session, then — before its commit answers — the same device
    connects again and replaces that session. The ``ack`` is owed to the connection that sent the
    message (now closed), never to the new session: the new one learns the outcome by resending
    (``ack`` ``dup``). With the writer thread the replacement happens while the commit runs."""
    edge = await edges(commit_in_thread=commit_in_thread)
    bob = await edge.session("bob@beta")
    first = await edge.session("alice@alpha")
    second = await edge.connect("alice@alpha")
    flight = await second.last_flight()
    msg_id = os.urandom(16)
    message = {"t": "msg", "id": msg_id, "to": "bob@beta", "c": {1: b"sent by the first session"}}
    first.send(message)
    if commit_in_thread:
        await asyncio.sleep(0)  # the scheduled commit starts on the writer thread
        assert edge.server.commits.running
    second.write(flight)  # authenticated at once (the key is cached): replaces the first session
    assert edge.server.sessions[("alice@alpha", 1)] is second.proto.conn
    await edge.server.commits.settle()
    await asyncio.sleep(0)  # the commit's answers are written
    await second.barrier()
    assert not [s for s in second.received if msg_id in (s.get("ref"), s.get("id"))]
    await first.read(lambda: first.saw(t="closed"))
    assert first.received[-1] == {"t": "closed", "reason": "replaced", "code": None}
    assert not [s for s in first.received if msg_id in (s.get("ref"), s.get("id"))]
    dlvs = [s for s in await bob.barrier() if s["t"] == "dlv"]
    assert [(d["from"], d["c"]) for d in dlvs] == [("alice@alpha", b"sent by the first session")]
    assert await second.request(message) == {"t": "ack", "id": msg_id, "ts": dlvs[0]["ts"], "dup": True}


async def test_a_connection_closed_before_its_auth_was_decided_never_becomes_the_session(edges):
    """A connection whose very first read both completes its handshake (``AuthRequested``) and
    closes it (too much pipelined before auth) must not be opened: before the fix the cached-key
    verdict opened it anyway, sent the device's live session ``bye replaced``, and left the device
    with no session at all."""
    edge = await edges()
    live = await edge.session("alice@alpha")
    late = await edge.connect("alice@alpha")
    flight = await late.last_flight()
    for i in range(MAX_PREAUTH_FRAMES + 1):  # one transport message each: one too many
        late.client.send_stanza({"t": "ping", "id": i})
        flight += late.client.data_to_send()
    late.write(flight)  # one read: the handshake ends and the connection closes
    await late.read(lambda: late.saw(t="closed"))
    assert late.received == [{"t": "closed", "reason": "auth_failed", "code": "bad_stanza"}]
    assert edge.server.sessions[("alice@alpha", 1)] is live.proto.conn
    assert not [s for s in await live.barrier() if s["t"] in ("bye", "closed")]
    assert edge.server.counters["sessions_opened"] == 1


async def test_a_verdict_that_waited_for_a_key_fetch_opens_nothing_once_its_connection_closed(edges):
    """The same close, for a token whose key is not cached: the verdict waits for a key fetch in a
    task of its own connection, which the close cancels (or, had the fetch won the race, which
    finds the connection closed); nothing is opened and the live session stays."""
    edge = await edges()
    live = await edge.session("alice@alpha")
    edge.issuers["alpha"].rotate()  # a kid the cache has not seen: the verdict waits for a fetch
    late = await edge.connect("alice@alpha")
    flight = await late.last_flight()
    for i in range(MAX_PREAUTH_FRAMES + 1):
        late.client.send_stanza({"t": "ping", "id": i})
        flight += late.client.data_to_send()
    late.write(flight)
    assert late.proto.conn.closed and late.proto in edge.server.auth_tasks
    async with asyncio.timeout(10):
        while edge.server.auth_tasks or late.proto.conn in edge.server.connections:
            await asyncio.sleep(0)
        await edge.jwks.wait_idle()
    assert edge.server.sessions == {("alice@alpha", 1): live.proto.conn}
    assert not [s for s in await live.barrier() if s["t"] in ("bye", "closed")]
    assert edge.server.counters["sessions_opened"] == 1


async def test_a_paused_session_that_is_replaced_does_not_hold_back_the_new_one(edges):
    """``paused`` is keyed by connection: the replaced connection stopped reading (its output
    passed the high-water mark for real), the new session of the same device is served at once."""
    edge = await edges()
    bob = await edge.session("bob@beta")
    stuck = await edge.session("alice@alpha")
    big = b"x" * 60_000
    sent = 0
    while stuck.proto not in edge.server.paused:  # output the stuck client never reads: the transport pauses for real
        assert sent < 100
        await bob.request({"t": "msg", "id": os.urandom(16), "to": "alice@alpha", "c": {1: big}})
        sent += 1
    fresh = await edge.session("alice@alpha")
    assert fresh.proto not in edge.server.paused
    await bob.request({"t": "msg", "id": os.urandom(16), "to": "alice@alpha", "c": {1: b"last"}})
    await fresh.read(lambda: fresh.saw(t="dlv", c=b"last"))
    assert len([s for s in fresh.received if s["t"] == "dlv"]) == sent + 1
    stuck.sock.close()
    async with asyncio.timeout(10):
        while stuck.proto.conn in edge.server.connections:
            await asyncio.sleep(0)
    assert edge.server.paused == {}


async def test_session_identities_share_only_a_read_only_empty_claims_map(edges):
    edge = await edges()
    ann, ben = await edge.session("ann@alpha"), await edge.session("ben@beta", 4)
    first, second = ann.proto.conn.identity, ben.proto.conn.identity
    assert (first.user, first.device, second.user, second.device) == ("ann@alpha", 1, "ben@beta", 4)
    assert first.claims is second.claims and dict(first.claims) == {}
    with pytest.raises(TypeError):
        first.claims["sub"] = "ben"  # a write would show in every session's identity


# ----------------------------------------------------------------------------- rate buckets


async def test_message_buckets_are_per_device_session_and_per_user(edges):
    edge = await edges(message_rate_per_device=2.0, message_rate_per_user=3.0)  # bursts 4 and 6
    await edge.session("carol@alpha")

    async def outcomes(peer: Peer, count: int) -> list[str]:
        answers = [await peer.request({"t": "msg", "id": os.urandom(16), "to": "carol@alpha", "c": {1: b"m"}})
                   for _ in range(count)]
        return [a["t"] if a["t"] == "ack" else a["code"] for a in answers]

    alice1 = await edge.session("alice@alpha", 1)
    assert await outcomes(alice1, 5) == ["ack"] * 4 + ["rate_limited"]  # the device's burst
    alice2 = await edge.session("alice@alpha", 2)
    assert await outcomes(alice2, 3) == ["ack"] * 2 + ["rate_limited"]  # the user's burst, shared
    bob = await edge.session("bob@alpha")
    assert await outcomes(bob, 4) == ["ack"] * 4  # alice's buckets are not bob's
    edge.clock.advance(1.0)
    assert await outcomes(alice1, 1) == ["ack"]


async def test_operation_and_group_buckets_are_per_user_and_per_group(edges):
    edge = await edges()
    alice, bob, mallory = await edge.session("alice@alpha"), await edge.session("bob@alpha"), await edge.session("mallory@alpha")

    async def codes(peer: Peer, count: int, op: str, **fields) -> list[str]:
        return [(await peer.iq(op, **fields)).get("code", "res") for _ in range(count)]

    assert await codes(alice, 31, "dir.lookup", phone="+4915112345678") == ["res"] * 30 + ["rate_limited"]
    assert await codes(bob, 1, "dir.lookup", phone="+4915112345678") == ["res"]
    report = {"user": "mallory@alpha", "ids": [], "reason": "spam"}
    assert await codes(alice, 21, "report", **report) == ["res"] * 20 + ["rate_limited"]
    assert await codes(bob, 1, "report", **report) == ["res"]
    first = (await alice.iq("group.new", members=["bob@alpha"]))["g"]
    second = (await alice.iq("group.new", members=["bob@alpha"]))["g"]
    # A non-member's attempts are refused before the group's bucket is touched.
    assert set(await codes(mallory, 25, "group.add", g=first, members=["mallory@alpha"])) == {"not_member"}
    changes = []
    for i in range(21):
        op = "group.del" if i % 2 == 0 else "group.add"
        changes.append((await alice.iq(op, g=first, members=["bob@alpha"])).get("code", "res"))
    assert changes == ["res"] * 20 + ["rate_limited"]
    assert (await alice.iq("group.del", g=second, members=["bob@alpha"]))["t"] == "res"  # another group's bucket


# ----------------------------------------------------------------------------- caches over real TCP


async def next_message(client, *, skip_group_events: bool = True) -> dict:
    """The next ``dlv`` of a message (membership events skipped)."""
    while True:
        item = await client.recv(timeout_s=10)
        if item["t"] == "dlv" and (item["k"] != "group" or not skip_group_events):
            return item


async def test_blocks_and_consent_cached_for_one_user_never_decide_for_another(people):
    alice, bob = await people.connect("alice@alpha"), await people.connect("bob@alpha")
    mallory, gus = await people.connect("mallory@alpha"), await people.connect("gus@gamma")
    await mallory.send_message("bob@alpha", {1: b"to bob, before"})  # bob's entry is cached first
    assert (await next_message(bob))["c"] == b"to bob, before"
    await alice.iq("block.add", user="mallory@alpha")
    await alice.iq("consent.set", accept=["gamma"], discoverable=False)
    assert (await mallory.send_message("alice@alpha", {1: b"blocked"}))["t"] == "ack"  # answered like any other
    await mallory.send_message("bob@alpha", {1: b"to bob, after"})
    assert (await next_message(bob))["c"] == b"to bob, after"
    await gus.send_message("alice@alpha", {1: b"gamma may reach alice"})
    with pytest.raises(ServerError) as caught:
        await gus.send_message("bob@alpha", {1: b"but not bob"})
    assert caught.value.code == "not_opted_in"
    assert (await next_message(alice))["c"] == b"gamma may reach alice"  # mallory's came first, if at all
    assert (await bob.iq("consent.get"))["accept"] == ["beta"]  # still alpha's default
    assert (await bob.iq("block.list"))["users"] == []
    for client in (alice, bob, mallory, gus):
        await client.close()


async def test_dedup_is_keyed_by_the_sending_device(people):
    """One id from three devices of two users is three messages; a resend is a duplicate only for
    the device that sent it. (Counted in the store: the SDK itself drops a second (from, id).)"""
    await (await people.connect("carol@alpha")).close()
    senders = [await people.connect("alice@alpha", 1), await people.connect("alice@alpha", 2),
               await people.connect("bob@beta", 1)]
    shared_id = os.urandom(16)
    for sender in senders:
        assert "dup" not in await sender.send_message("carol@alpha", {1: b"%d" % sender.device}, msg_id=shared_id)
    for sender in senders:
        assert (await sender.send_message("carol@alpha", {1: b"again"}, msg_id=shared_id))["dup"] is True
    carol = await people.connect("carol@alpha")
    assert carol.welcome["pending"] == 3
    for client in (carol, *senders):
        await client.close()


async def test_group_plans_hold_no_sender_state_and_follow_each_record(people):
    """Fan-out plans are cached per group record; the sending device and the members who blocked
    the sender are decided per message, so one member's message never shapes another's."""
    alice1, alice2 = await people.connect("alice@alpha", 1), await people.connect("alice@alpha", 2)
    bob, carol = await people.connect("bob@alpha"), await people.connect("carol@alpha")
    await carol.iq("block.add", user="alice@alpha")
    g = (await alice1.iq("group.new", members=["bob@alpha", "carol@alpha"]))["g"]
    other = (await bob.iq("group.new", members=["alice@alpha", "carol@alpha"]))["g"]
    await alice1.send_group_message(g, b"from alice")
    await bob.send_group_message(g, b"from bob")
    assert [(await next_message(alice2))["c"] for _ in range(2)] == [b"from alice", b"from bob"]
    assert (await next_message(alice1))["c"] == b"from bob"  # not its own
    assert (await next_message(bob))["c"] == b"from alice"  # not its own
    assert (await next_message(carol))["c"] == b"from bob"  # alice's skipped carol, bob's did not
    await alice1.iq("group.del", g=g, members=["bob@alpha"])  # a new record: a new plan
    await alice1.send_group_message(g, b"after bob left")
    await carol.send_group_message(other, b"carol in the other group")
    await alice1.send_message("bob@alpha", {1: b"marker"})
    await bob.send_group_message(other, b"bob in the other group")
    assert [(d["c"], d.get("g")) for d in [await next_message(bob) for _ in range(2)]] == [
        (b"carol in the other group", other), (b"marker", None)]
    assert [(await next_message(alice2))["c"] for _ in range(3)] == [
        b"after bob left", b"carol in the other group", b"bob in the other group"]
    assert (await next_message(carol))["c"] == b"bob in the other group"  # nothing of alice's before it
    for client in (alice1, alice2, bob, carol):
        await client.close()


async def test_one_providers_keys_never_verify_a_token_naming_another_issuer(people, issuers, gateway):
    """The key cache is per provider and the provider is the one ``iss`` names: alpha's key, cached,
    cannot sign for beta, whatever ``kid`` the token names."""
    alpha, beta, _ = issuers
    for warm in (await people.connect("alice@alpha"), await people.connect("bob@beta")):
        await warm.close()  # both providers' keys are now cached
    forged = [
        # alpha's kid: not in beta's set (a refetch of beta's keys, still not there)
        alpha.issue("eve", audience=AUD, extra_claims={"iss": beta.issuer}),
        # beta's kid: beta's cached key, which alpha's signature does not match (verify_cached)
        alpha.issue("eve", audience=AUD, extra_claims={"iss": beta.issuer}, headers={"kid": beta.default_kid()}),
    ]
    host, port = gateway.address
    for token in forged:
        with pytest.raises(AuthError) as caught:
            await Client.connect(host, port, token=token, device=1, root_public=gateway.root_public)
        assert caught.value.code == "bad_signature"
    eve = await people.connect("eve@alpha")
    assert eve.user == "eve@alpha"
    await eve.close()


def test_two_providers_with_the_same_kid_keep_their_keys_apart():
    """Inline key sets (no network): both providers publish kid ``k1``; a token is checked only
    against the key of the provider its ``iss`` names."""
    signers = {pid: Ed25519PrivateKey.generate() for pid in ("a", "b")}
    providers = [
        Provider(id=pid, issuer=f"https://{pid}.example", audience=AUD, jwks={"keys": [{
            "kty": "OKP", "crv": "Ed25519", "kid": "k1", "alg": "EdDSA",
            "x": base64.urlsafe_b64encode(key.public_key().public_bytes_raw()).rstrip(b"=").decode(),
        }]})
        for pid, key in signers.items()
    ]
    verifier = token_verifier(ProviderRegistry(providers), jwks_cache())

    def token(signer: str, issuer: str) -> str:
        claims = {"iss": f"https://{issuer}.example", "sub": "eve", "aud": AUD, "exp": time.time() + 60}
        return jwt.encode(claims, signers[signer], algorithm="EdDSA", headers={"kid": "k1"})

    assert verifier.verify_cached(token("a", "a"), device=1, now=time.time(), client_static=None).user == "eve@a"
    assert verifier.verify_cached(token("b", "b"), device=1, now=time.time(), client_static=None).user == "eve@b"
    with pytest.raises(AuthError) as caught:
        verifier.verify_cached(token("a", "b"), device=1, now=time.time(), client_static=None)
    assert caught.value.code == "bad_signature"


def test_cached_device_lists_are_shared_values_that_change_only_for_their_user(tmp_path):
    """``LmdbStore.devices`` caches each user's list and shares equal lists between users; a new
    device replaces its user's entry and never changes the shared tuple."""
    store = lmdb_store(tmp_path / "lmdb", sync=False, map_size_bytes=1 << 24)
    try:
        for user in ("ann@alpha", "ben@beta"):
            store.register_device(user, 1, 5)
            store.devices(user)  # read once: cached from now on
        assert store.devices("ann@alpha") is store.devices("ben@beta") == (1,)  # one shared tuple
        store.register_device("ann@alpha", 2, 5)
        assert (store.devices("ann@alpha"), store.devices("ben@beta")) == ((1, 2), (1,))
    finally:
        store.close()


class _StandInTransport:
    """What ``GatewayServer`` asks of a transport when it pauses and resumes reading."""

    def __init__(self) -> None:
        self.reading = True
        self.closing = False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing


class _BulkSender:
    """Stands for a connection whose read filled the whole shared buffer (an upload)."""

    def __init__(self) -> None:
        self.transport = _StandInTransport()


async def test_connections_that_fill_the_read_buffer_are_read_again_one_per_loop_turn(edges):
    """The queue of bulk senders is shared by every session: however many uploads run, a loop
    turn reads one buffer of them beside everyone else's traffic, oldest first, and a connection
    held for another reason (its peer does not read) is not resumed by its turn."""
    server = (await edges()).server
    first, second, third, stuck = (_BulkSender() for _ in range(4))
    for proto in (first, second, third, stuck):
        server.yield_reading(proto)
    server.paused[stuck] = server.clock()  # its peer stopped reading our output
    reading = lambda: [p.transport.reading for p in (first, second, third, stuck)]  # noqa: E731
    assert reading() == [False] * 4
    await asyncio.sleep(0)
    assert reading() == [True, False, False, False]
    server.yield_reading(first)  # filled the buffer again: back of the queue
    await asyncio.sleep(0)
    assert reading() == [False, True, False, False]
    third.transport.closing = True  # closed while waiting: its turn reads nothing
    await asyncio.sleep(0)
    assert reading() == [False, True, False, False]
    await asyncio.sleep(0)
    assert reading() == [False, True, False, False]  # the stuck one's turn: it stays paused
    await asyncio.sleep(0)
    assert reading() == [True, True, False, False]
    assert not server.yielded
    del server.paused[stuck]
