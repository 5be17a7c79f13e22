"""The browser client ``bindings/web/interlink.js``, run for real under Deno (the ``deno`` test
dependency: WebCrypto X25519/Ed25519/AES-GCM and a browser-compatible WebSocket): its Noise XX
against the published vectors, its msgpack, a chat with the Python SDK over a real gateway in
both directions, the refusals of docs/protocol.md §2, what it does with a hostile gateway (a
fake one below, with a real root-signed certificate), and the web demo (``interlink.webdemo``)
that serves it. ``tests/api/web_client_driver.js`` runs the commands the tests send it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import aiohttp
import msgpack
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from interlink.client import Client
from interlink.core.protocol.certs import (
    generate_root_key,
    generate_static_key,
    issue_node_certificate,
    server_hello,
    x25519_public,
)
from interlink.core.protocol.noise import NoiseSession, make_preamble
from interlink.gateway import Gateway
from interlink.webdemo import WEB_DIR, WebDemo
from interlink.testing import until
from three_providers import AUD, config_for

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("web_client_driver.js")
NOISE_FILES = ("cacophony.txt", "snow.txt", "noise-c-basic.txt")


def deno_binary() -> str:
    """The deno executable of the ``deno`` package (PyPI) installed in this environment."""
    try:
        from deno import find_deno_bin

        return find_deno_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("deno", path=str(Path(sys.executable).parent)) or shutil.which("deno")
    if found is None:
        pytest.fail("deno not found: it is a test dependency (pip install 'deno>=2')")
    return found


class Driver:
    """web_client_driver.js under Deno: one JSON command per line in, one JSON answer per line out."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process, self.log = process, log

    async def call(self, op: str, *, ok: bool | None = True, **args) -> dict:
        self.process.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), 15)
        if not line:
            await asyncio.wait_for(self.process.wait(), 5)
            pytest.fail(f"deno exited ({self.process.returncode}): {self.log.read_text(errors='replace')}")
        answer = json.loads(line)
        assert ok is None or answer["ok"] is ok, answer
        return answer


@pytest.fixture
async def driver(tmp_path):
    log = tmp_path / "deno.log"
    env = dict(os.environ, DENO_DIR=str(tmp_path / "deno-cache"), NO_COLOR="1", DENO_NO_UPDATE_CHECK="1")
    with open(log, "wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            deno_binary(), "run", "--no-config", "--no-lock", "--allow-net=127.0.0.1", str(DRIVER),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr, cwd=ROOT, env=env,
            limit=1 << 24)  # answers carry hex of up to some 100 KB
    try:
        yield Driver(process, log)
    finally:
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest.fixture
async def gateway(issuers, tmp_path):
    async with Gateway(config_for(issuers, tmp_path, ws_port=0)) as gw:
        yield gw


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ------------------------------------------------------------------------ Noise and msgpack


async def test_noise_xx_aesgcm_sha256_matches_the_published_vectors(driver, vectors_dir):
    """The initiator's side of each file's Noise_XX_25519_AESGCM_SHA256 entry, byte for byte:
    messages 1 and 3 and its transport messages as written, message 2's payload and the
    responder's transport messages as read, the remote static key and the handshake hash."""
    checked_hashes = 0
    for filename in NOISE_FILES:
        vectors = json.loads((vectors_dir / filename).read_text(encoding="utf-8"))["vectors"]
        (vector,) = [v for v in vectors if (v.get("protocol_name") or v.get("name")) == "Noise_XX_25519_AESGCM_SHA256"]
        m = vector["messages"]
        # Handshake 1 (written), 2 (read), 3 (written); then the responder sends first (tests/vectors/README.md).
        expected = [m[0]["ciphertext"], m[1]["payload"], m[2]["ciphertext"]]
        expected += [m[i]["payload"] if (i - 3) % 2 == 0 else m[i]["ciphertext"] for i in range(3, len(m))]
        result = await driver.call("vector", vector=vector)
        assert result["outputs"] == expected, filename
        assert result["remoteStatic"] == x25519_public(bytes.fromhex(vector["resp_static"])).hex(), filename
        if "handshake_hash" in vector:
            assert result["handshakeHash"] == vector["handshake_hash"], filename
            checked_hashes += 1
    assert checked_hashes == 2  # snow gives none


async def test_msgpack_round_trips_what_the_protocol_uses(driver):
    """Decoded by interlink.js and encoded again: the same bytes as the reference msgpack."""
    value = {
        "t": "dlv", "seq": 17, "ts": 1764150000123, "c": {1: b"one", 2: b"\x00" * 300, 2**31 - 1: b""},
        "ints": [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**53, 2**63, 2**64 - 1,
                 -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63],
        "floats": [1.5, -0.25, 1e300], "flags": [True, False, None],
        "strs": ["", "é" * 40, "x" * 300, "🙂" * 20000, "\ufeffalice@alpha", "\ufeff"],  # a BOM is text: kept
        "bins": [b"", b"\xff" * 70000],
        "nested": {"list": list(range(20)), "map": {str(i): i for i in range(20)}},
    }
    packed = msgpack.packb(value, use_bin_type=True)
    assert bytes.fromhex((await driver.call("msgpack", hex=packed.hex()))["hex"]) == packed
    single = msgpack.packb({"f": 0.5}, use_single_float=True)  # float32 in, float64 out: the same value
    again = bytes.fromhex((await driver.call("msgpack", hex=single.hex()))["hex"])
    assert msgpack.unpackb(again) == {"f": 0.5} and again != single
    for broken, why in ((b"\x81\xa1t", "ends inside"), (b"\xc0\xc0", "extra bytes"), (b"\xd4\x01\x02", "not used"),
                        (b"\xa1\xff", "UTF-8")):
        assert why in (await driver.call("msgpack", ok=False, hex=broken.hex()))["error"]["message"]


# ------------------------------------------------------------------------- over a gateway


async def test_the_js_client_and_the_python_sdk_chat_both_ways(gateway, issuers, driver):
    alpha, beta, _ = issuers
    bob = await Client.connect(*gateway.address, token=beta.issue("bob", audience=AUD), device=1,
                               root_public=gateway.root_public)
    alice = (await driver.call("connect", name="alice", url=gateway.ws_url, token=alpha.issue("alice", audience=AUD),
                               device=1, rootPublic=gateway.root_public.hex()))
    assert alice["welcome"]["user"] == "alice@alpha" and alice["welcome"]["device"] == 1
    assert alice["node"] == gateway.keys.certificate.node
    assert alice["statuses"][:2] == ["connecting", "handshake"] and alice["statuses"][-1].startswith("welcome alice@alpha")
    assert gateway._server.counters["ws_upgrades"] == 1 and gateway._server.counters["sessions_opened"] == 2

    # JS -> Python: the bytes arrive exactly as sent, under the id and ts of the ack.
    text = "grüße aus dem Browser 👋".encode()
    ack = (await driver.call("send", name="alice", to="bob@beta", c={"1": text.hex()}))["ack"]
    dlv = await bob.recv(timeout_s=5)
    assert (dlv["from"], dlv["dev"], dlv["c"], dlv["id"].hex(), dlv["ts"]) == ("alice@alpha", 1, text, ack["id"], ack["ts"])
    # Twenty queued at once leave coalesced; each is acked and they arrive in order.
    texts = [f"burst {i}" for i in range(20)]
    acks = (await driver.call("burst", name="alice", to="bob@beta", texts=texts))["acks"]
    assert len({a["id"] for a in acks}) == 20
    assert [(await bob.recv(timeout_s=5))["c"].decode() for _ in texts] == texts

    # A second device of bob: sendText asks devices.get and sends one ciphertext per device.
    bob2 = await Client.connect(*gateway.address, token=beta.issue("bob", audience=AUD), device=2,
                                root_public=gateway.root_public)
    await driver.call("sendText", name="alice", to="bob@beta", text="to both of bob's devices")
    for device in (bob, bob2):
        assert (await device.recv(timeout_s=5))["c"] == b"to both of bob's devices"
    mismatch = await driver.call("send", ok=False, name="alice", to="bob@beta", c={"1": "00"})
    assert mismatch["error"]["code"] == "device_mismatch"

    # Python -> JS, from both of bob's devices; binary content intact.
    binary = bytes(range(256))
    await bob.send_message("alice@alpha", {1: "grüße zurück".encode()})
    await bob2.send_message("alice@alpha", {1: binary})
    first = (await driver.call("next", name="alice"))["dlv"]
    second = (await driver.call("next", name="alice"))["dlv"]
    assert (first["k"], first["from"], first["dev"], first["text"]) == ("msg", "bob@beta", 1, "grüße zurück")
    assert (second["from"], second["dev"], bytes.fromhex(second["c"])) == ("bob@beta", 2, binary)
    # The client confirmed them with recv by itself: alice's mailbox is empty.
    await until(lambda: gateway.mailbox_stats("alice@alpha")[1]["items"] == 0)
    assert (await driver.call("ping", name="alice"))["rtt"] >= 0
    assert (await driver.call("close", name="alice"))["bye"] is None

    # Stored while alice is away, pushed right after her next welcome.
    await bob.send_message("alice@alpha", {1: b"while you were away 1"})
    await bob.send_message("alice@alpha", {1: b"while you were away 2"})
    again = await driver.call("connect", name="alice", url=gateway.ws_url, token=alpha.issue("alice", audience=AUD),
                              device=1, rootPublic=b64url(gateway.root_public))
    assert again["welcome"]["pending"] == 2
    waited = [(await driver.call("next", name="alice"))["dlv"]["text"] for _ in range(2)]
    assert waited == ["while you were away 1", "while you were away 2"]
    await until(lambda: gateway.mailbox_stats("alice@alpha")[1]["items"] == 0)
    await driver.call("close", name="alice")
    await bob.close()
    await bob2.close()


async def test_the_js_client_refuses_a_gateway_its_pinned_root_does_not_certify(gateway, issuers, driver):
    alpha = issuers[0]
    token = alpha.issue("alice", audience=AUD)
    connect = dict(name="alice", url=gateway.ws_url, token=token, device=1)
    other_root = generate_root_key().public_key().public_bytes_raw()
    refused = (await driver.call("connect", ok=False, rootPublic=other_root.hex(), **connect))["error"]
    assert refused["code"] == "certificate" and "does not verify under the pinned root key" in refused["message"]
    # The validity window of the node certificate, on the client's clock.
    cert = gateway.keys.certificate
    root = gateway.root_public.hex()
    late = (await driver.call("connect", ok=False, rootPublic=root, nowMs=(cert.expires + 60) * 1000, **connect))["error"]
    assert late["code"] == "certificate" and "expired" in late["message"]
    early = (await driver.call("connect", ok=False, rootPublic=root, nowMs=(cert.not_before - 60) * 1000, **connect))["error"]
    assert early["code"] == "certificate" and "not valid yet" in early["message"]
    # None of them sent its credentials: no session was opened.
    assert gateway._server.counters["ws_upgrades"] == 3 and gateway._server.counters["sessions_opened"] == 0
    # The gateway's refusal of a token reaches the caller with its code (§3).
    wrong = (await driver.call("connect", ok=False, rootPublic=root,
                               **{**connect, "token": alpha.issue("alice", audience="another-gateway")}))["error"]
    assert wrong["code"] == "bad_audience"
    assert (await driver.call("connect", rootPublic=root, **connect))["welcome"]["user"] == "alice@alpha"
    await driver.call("close", name="alice")


# ----------------------------------------------------------------- against a hostile gateway


class FakeSession:
    """The server's end of one session with the fake gateway, after the handshake."""

    def __init__(self, ws, noise: NoiseSession, auth: dict) -> None:
        self.ws, self.noise, self.auth = ws, noise, auth
        self.received: list[dict] = []  # every stanza the client sent, in order

    async def send(self, *stanzas) -> None:
        """The stanzas back to back in one transport message (§4)."""
        await self.ws.send(self.noise.encrypt(b"".join(msgpack.packb(s, use_bin_type=True) for s in stanzas)))

    async def recv(self) -> list[dict]:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(self.noise.decrypt(await self.ws.recv()))
        stanzas = list(unpacker)
        self.received += stanzas
        return stanzas

    async def serve(self) -> None:
        """Answer as a gateway would: pong to ping, ack to msg; until the client closes."""
        try:
            while True:
                for stanza in await self.recv():
                    if stanza["t"] == "ping":
                        await self.send({"t": "pong", "id": stanza["id"]})
                    elif stanza["t"] == "msg":
                        await self.send({"t": "ack", "id": stanza["id"], "ts": 1764150000123})
        except ConnectionClosed:
            pass


def welcome(**limits) -> dict:
    return {"t": "welcome", "user": "alice@alpha", "device": 1, "session": bytes(16), "pending": 0,
            "limits": {"max_frame": 65535, "max_devices": 5, "window": 64, **limits}}


class FakeGateway:
    """A gateway that does the real handshake (NoiseSession as responder, suite 0x02, a node
    certificate signed by its own root), then lets the test's ``script`` misbehave."""

    def __init__(self, script) -> None:
        self.script = script
        self.root = generate_root_key()
        self.static = generate_static_key()
        now = int(time.time())
        self.cert = issue_node_certificate(self.root, x25519_public(self.static), "fake-node", now - 60, now + 3600)
        self.root_public = self.root.public_key().public_bytes_raw().hex()
        self.sessions: list[FakeSession] = []
        self.failures: list[BaseException] = []

    async def handler(self, ws) -> None:
        try:
            prologue = await ws.recv()
            assert prologue == make_preamble(0x02)
            noise = NoiseSession("Noise_XX_25519_AESGCM_SHA256", initiator=False, static_private=self.static,
                                 prologue=prologue)
            noise.read_message(await ws.recv())
            await ws.send(noise.write_message(server_hello(self.cert, "fake-node", int(time.time() * 1000))))
            session = FakeSession(ws, noise, msgpack.unpackb(noise.read_message(await ws.recv())))
            self.sessions.append(session)
            await self.script(session)
        except ConnectionClosed:
            pass
        except BaseException as exc:
            self.failures.append(exc)
            raise


@pytest.fixture
async def fake_gateway():
    """``await fake_gateway(script)``: a running FakeGateway (``.url``, ``.root_public``)."""
    servers = []

    async def start(script) -> FakeGateway:
        fake = FakeGateway(script)
        server = await ws_serve(fake.handler, "127.0.0.1", 0, compression=None, close_timeout=0.5, max_size=1 << 20)
        servers.append((server, fake))
        fake.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/interlink"
        return fake

    yield start
    for server, fake in servers:
        for connection in server.connections:
            connection.transport.abort()  # some scripts leave their peer hanging on purpose
        server.close()
        await server.wait_closed()
        assert not fake.failures, fake.failures


async def test_a_bye_right_after_welcome_is_never_lost(fake_gateway, driver):
    """§5: the gateway says bye and closes. connect rejects with the bye, or resolves with an open
    session that then reports the bye; it never resolves with a session already over."""

    async def bye_then_close(session: FakeSession) -> None:
        await session.send(welcome())
        await session.send({"t": "bye", "reason": "replaced"})
        await session.ws.close(1000, "replaced")

    async def bye_with_welcome(session: FakeSession) -> None:
        await session.send(welcome(), {"t": "bye", "reason": "replaced"})  # one transport message
        await session.serve()

    for script in (bye_then_close, bye_then_close, bye_then_close, bye_with_welcome):
        fake = await fake_gateway(script)
        answer = await driver.call("connect", ok=None, name="alice", url=fake.url, token="t", rootPublic=fake.root_public)
        if answer["ok"]:
            assert script is bye_then_close and answer["closedAtResolve"] is False
            info = (await driver.call("closed", name="alice"))["info"]
            assert info["bye"] == "replaced" and info["error"] is None, info
        else:
            assert answer["error"]["code"] == "bye" and "replaced" in answer["error"]["message"], answer
    # With the welcome in the same message, the bye is read before connect could resolve; the
    # client closed the socket itself, without waiting for the gateway's close.
    assert answer["ok"] is False
    await until(lambda: fake.sessions[0].ws.close_code == 1000)


async def test_bye_ends_the_session_at_once(fake_gateway, driver):
    """§5: after bye nothing more is sent (not even the recv of a dlv in the same message), what
    waits for an answer is refused with the bye's reason, and the client closes the socket."""

    async def bye_instead_of_pong(session: FakeSession) -> None:
        await session.send(welcome())
        (ping,) = await session.recv()
        assert ping["t"] == "ping"
        await session.send({"t": "dlv", "seq": 5, "k": "msg", "id": bytes(16), "from": "bob@beta", "dev": 1,
                            "ts": 1, "c": b"x"}, {"t": "bye", "reason": "suspended"})
        with pytest.raises(ConnectionClosed) as closed:
            await session.recv()  # the client's close, and nothing before it
        assert closed.value.rcvd.code == 1000

    fake = await fake_gateway(bye_instead_of_pong)
    await driver.call("connect", name="alice", url=fake.url, token="t", rootPublic=fake.root_public, timeoutMs=3000)
    refused = (await driver.call("ping", ok=False, name="alice"))["error"]
    assert refused["code"] == "bye" and "suspended" in refused["message"]
    assert (await driver.call("send", ok=False, name="alice", to="bob@beta", c={"1": "00"}))["error"]["code"] == "closed"
    info = (await driver.call("closed", name="alice"))["info"]
    assert info["bye"] == "suspended" and info["error"] is None
    assert fake.sessions[0].received == [{"t": "ping", "id": 1}]


async def test_limits_max_frame_is_adopted_only_when_sane(fake_gateway, driver):
    """welcome's max_frame lowers what the client sends only when it is an int over the tag size;
    what it sends stays within 65,535 bytes whatever the gateway says (§1, §4)."""

    async def announce(session: FakeSession) -> None:
        await session.send(welcome(max_frame=json.loads(session.auth["token"])))
        await session.serve()

    fake = await fake_gateway(announce)
    for max_frame in ("300", 1.5, 16, 0, -1, None, [300]):  # not adopted: 65,535 holds
        await driver.call("connect", name="alice", url=fake.url, token=json.dumps(max_frame), rootPublic=fake.root_public)
        assert (await driver.call("send", name="alice", to="bob@beta", c={"1": "ab" * 1000}))["ack"]["ts"]
        await driver.call("close", name="alice")
    for max_frame, fits, too_large in ((300, 200, 300), (100_000, 65_000, 65_520)):
        await driver.call("connect", name="alice", url=fake.url, token=json.dumps(max_frame), rootPublic=fake.root_public)
        await driver.call("send", name="alice", to="bob@beta", c={"1": "ab" * fits})
        refused = await driver.call("send", ok=False, name="alice", to="bob@beta", c={"1": "ab" * too_large})
        assert refused["error"]["code"] == "too_large", max_frame
        await driver.call("close", name="alice")
    assert [len(s.received) for s in fake.sessions] == [1] * 7 + [1, 1]  # nothing refused was sent


async def test_a_transport_message_over_65535_bytes_ends_the_session(fake_gateway, driver):
    """§1: no message over 65,535 bytes, even one that decrypts; it is bad_frame, and nothing of it is delivered."""

    async def oversized(session: FakeSession) -> None:
        await session.send(welcome())
        # Only once connect has returned: sent right behind the welcome, the two could arrive in one
        # read and fail connect itself (the test failed so now and then).
        await session.recv()  # the client's ping
        await session.send({"t": "dlv", "seq": 1, "k": "msg", "id": bytes(16), "from": "bob@beta", "dev": 1,
                            "ts": 1, "c": bytes(66_000)})
        await session.serve()

    fake = await fake_gateway(oversized)
    await driver.call("connect", name="alice", url=fake.url, token="t", rootPublic=fake.root_public)
    await driver.call("ping", ok=False, name="alice")  # never answered: the session ends first
    info = (await driver.call("closed", name="alice"))["info"]
    assert info["error"]["code"] == "bad_frame" and "65535" in info["error"]["message"], info
    assert (await driver.call("next", ok=False, name="alice", timeoutMs=100))["error"]["code"] == "closed"
    assert [stanza["t"] for stanza in fake.sessions[0].received] == ["ping"]  # no recv: nothing of it delivered


async def test_malformed_stanzas_are_refused_or_ignored_never_a_crash(fake_gateway, driver):
    """Fields the client uses are checked: an ack/res/pong matching no request is ignored and an
    err answering none goes to onError (as the Python SDK does), only int seqs are confirmed, a
    map where text belongs is never interpolated, and a welcome the client cannot use fails
    connect with "protocol"."""
    evil = {"toString": 1}  # a msgpack map where a str belongs: `${value}` would throw

    async def malformed(session: FakeSession) -> None:
        await session.send(welcome())
        (ping,) = await session.recv()  # the client's callbacks are set by now
        await session.send(
            {"t": "ack"}, {"t": "ack", "id": "x"}, {"t": "res", "id": evil}, {"t": "pong", "id": "1"},
            {"t": "err", "code": "bad_stanza", "ref": bytes(16)},  # answers no request of ours: onError
            {"t": "err", "code": evil, "msg": evil},  # answers nothing: onError
            {"t": "state", "from": "bob@beta", "s": "composing"},
            {"t": "dlv", "seq": "7", "k": "msg", "id": "not bin", "from": evil, "c": b"odd"},
            {"t": "dlv", "seq": 8, "k": "msg", "id": bytes(16), "from": "bob@beta", "dev": 1, "ts": 1, "c": b"ok"},
            {"t": "pong", "id": ping["id"]},
        )
        await session.serve()

    fake = await fake_gateway(malformed)
    await driver.call("connect", name="alice", url=fake.url, token="t", rootPublic=fake.root_public)
    assert (await driver.call("ping", name="alice"))["rtt"] >= 0  # still open
    assert (await driver.call("next", name="alice"))["dlv"]["c"] == b"odd".hex()  # handed out as it is
    assert (await driver.call("next", name="alice"))["dlv"]["text"] == "ok"
    events = (await driver.call("events", name="alice"))["events"]
    assert [e["kind"] for e in events] == ["error", "error", "state"], events
    assert [e["error"]["code"] for e in events[:2]] == ["bad_stanza", "protocol"]
    assert events[2] == {"kind": "state", "from": "bob@beta", "s": "composing"}
    await driver.call("close", name="alice")
    assert {"t": "recv", "seq": [8]} in fake.sessions[0].received

    firsts = [{"t": "welcome"}, {**welcome(), "user": evil}, {**welcome(), "device": "1"},
              {"t": "err", "code": evil, "msg": evil}]

    async def unusable_welcome(session: FakeSession) -> None:
        await session.send(firsts[int(session.auth["token"])])
        await session.serve()

    fake = await fake_gateway(unusable_welcome)
    for i, first in enumerate(firsts):
        refused = (await driver.call("connect", ok=False, name="alice", url=fake.url, token=str(i),
                                     rootPublic=fake.root_public))["error"]
        assert refused["name"] == "InterlinkError" and refused["code"] == "protocol", (first, refused)


async def test_close_gives_up_on_a_gateway_that_never_answers_it(driver, fake_gateway):  # the gateway goes first
    async def deaf(session: FakeSession) -> None:
        await session.send(welcome())
        session.ws.transport.pause_reading()  # never reads the close frame, never answers it
        await session.ws.wait_closed()

    fake = await fake_gateway(deaf)
    await driver.call("connect", name="alice", url=fake.url, token="t", rootPublic=fake.root_public)
    # Resolves at all (the peer never answers the close), and only after the fallback's 3 s.
    assert (await driver.call("close", name="alice"))["ms"] >= 2500


async def test_callbacks_that_throw_do_not_end_the_session(fake_gateway, driver):
    """A page's onStatus, onState, onError and onClose may throw: reported, never fatal."""

    async def chatty(session: FakeSession) -> None:
        await session.send(welcome())
        (ping,) = await session.recv()
        await session.send({"t": "state", "from": "bob@beta", "s": "composing"}, {"t": "err", "code": "bad_stanza", "msg": "?"},
                           {"t": "pong", "id": ping["id"]})
        (ping,) = await session.recv()
        await session.send({"t": "pong", "id": ping["id"]}, {"t": "bye", "reason": "drain"})
        await session.serve()

    fake = await fake_gateway(chatty)
    opened = await driver.call("connect", name="alice", url=fake.url, token="t", rootPublic=fake.root_public, throwing=True)
    assert opened["statuses"][-1].startswith("welcome alice@alpha")
    assert (await driver.call("ping", name="alice"))["rtt"] >= 0
    assert (await driver.call("ping", name="alice"))["rtt"] >= 0
    assert [e["kind"] for e in (await driver.call("events", name="alice"))["events"]] == ["state", "error"]
    assert (await driver.call("closed", name="alice"))["info"]["bye"] == "drain"
    assert "callback failed" in driver.log.read_text()  # reported on the console


# ---------------------------------------------------------------------------- the web demo


async def test_the_web_demo_serves_the_page_its_client_and_demo_config(tmp_path, driver):
    async with WebDemo(tmp_path / "demo", port=0) as demo, aiohttp.ClientSession() as http:
        async with http.get(demo.url) as page:
            assert page.status == 200 and page.content_type == "text/html"
            html = await page.text()
        assert all(part in html for part in ("alice@alpha", "bob@beta", "./interlink.js", "/demo-config", "Signal"))
        async with http.get(demo.url + "interlink.js") as script:
            assert script.status == 200 and script.content_type == "text/javascript"
            assert await script.read() == (WEB_DIR / "interlink.js").read_bytes()
        configs = {}
        for user in ("alice", "bob@beta"):
            async with http.get(demo.url + "demo-config", params={"user": user}) as answer:
                assert answer.status == 200 and answer.headers["Cache-Control"] == "no-store"
                configs[user.partition("@")[0]] = await answer.json()
        alice = configs["alice"]
        assert alice["wsUrl"] == demo.gateway.ws_url and alice["user"] == "alice@alpha"
        assert base64.urlsafe_b64decode(alice["rootPublic"] + "=") == demo.gateway.root_public
        for bad in ("mallory", "mallory@gamma", "a b@alpha", ""):
            async with http.get(demo.url + "demo-config", params={"user": bad}) as answer:
                assert answer.status == 400, bad
        # The page's origin may open the gateway's WebSocket; another page's may not.
        async with ws_connect(alice["wsUrl"], origin=demo.origins[0]):
            pass
        with pytest.raises(InvalidStatus):
            await ws_connect(alice["wsUrl"], origin="http://evil.example")

        # What the page does: two JS clients, one per pane, from what /demo-config gave.
        for name in ("bob", "alice"):
            config = configs[name]
            await driver.call("connect", name=name, url=config["wsUrl"], token=config["token"],
                              device=config["device"], rootPublic=config["rootPublic"])
        await driver.call("sendText", name="alice", to="bob@beta", text="hi bob, from the page")
        assert (await driver.call("next", name="bob"))["dlv"]["text"] == "hi bob, from the page"
        await driver.call("sendText", name="bob", to="alice@alpha", text="hi alice")
        got = (await driver.call("next", name="alice"))["dlv"]
        assert (got["from"], got["text"]) == ("bob@beta", "hi alice")
        for name in ("alice", "bob"):
            await driver.call("close", name=name)


async def test_python_m_interlink_webdemo_serves_until_ctrl_c(tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "interlink.webdemo", "--port", "0", "--data-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        # Its first run makes the operator keys (a warning says so), then it prints the page's URL.
        lines = []
        while not lines or ("open http" not in lines[-1] and len(lines) < 5):
            lines.append((await asyncio.wait_for(process.stdout.readline(), 30)).decode())
        url = re.search(r"open (http://127\.0\.0\.1:\d+/)", lines[-1])
        assert url, lines
        async with aiohttp.ClientSession() as http, http.get(url[1] + "demo-config?user=bob") as answer:
            assert answer.status == 200 and (await answer.json())["user"] == "bob@beta"
        process.send_signal(signal.SIGINT)
        rest = (await asyncio.wait_for(process.stdout.read(), 15)).decode()
        assert await process.wait() == 0, rest
        assert "stopped." in rest and "Traceback" not in rest
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_js_client_follows_a_cluster_redirect_to_its_home_node(issuers, tmp_path, driver):
    """A cluster node answers bye redirect with the home node's WebSocket URL; interlink.js
    connects there and gets its welcome from the home node."""
    from e2e.test_cluster import Cluster
    from interlink.load.nats import LocalNats

    nats = LocalNats(tmp_path / "nats")
    await nats.start()
    cluster = Cluster(issuers, tmp_path, nats.url, websocket=True)
    try:
        for node in cluster.nodes:
            await cluster.start(node)
        alice = cluster.users("alpha")["node-c"][0]
        away = cluster.gateways["node-a"]
        result = await driver.call("connect", name="alice", url=away.ws_url, device=1,
                                   token=cluster.issuers["alpha"].issue(alice.split("@")[0], audience=AUD),
                                   rootPublic=away.root_public.hex())
        assert result["welcome"]["user"] == alice and result["node"] == "node-c"
        assert away._server.counters["redirects"] == 1
        await driver.call("close", name="alice")
    finally:
        await cluster.stop_all()
        await nats.stop()
