"""A random probe of the WebSocket listener (``core/edge/websocket.py``) over real loopback TCP:
connections that send an upgrade request, then — with or without waiting for its answer, before
or after the preamble, or after a real Noise handshake and ``welcome`` — a random stream of
WebSocket frames (every opcode, reserved bits, unmasked frames, lengths that lie, fragments with
control frames between them, close frames with bad codes, raw bytes, frames cut short, messages
over the frame limit), cut into random writes, sometimes ended with an EOF.

Whatever a connection sends, the gateway must end or keep it by the rules of docs/protocol.md §1:
no bug of ours (``internal_errors``), nothing logged at ERROR (uvloop logs an exception that
escapes a read as a fatal error), and a browser-style client is served afterwards. It found that
frames breaking the rules right behind an upgrade request made the answer of a refused upgrade
raise inside the read (``test_websocket.py::test_a_broken_frame_right_behind_the_upgrade_...``).

The suite runs it for ``INTERLINK_WS_PROBE_S`` seconds (2 by default, seed 1);
``make ws-probe`` runs it longer (``WS_PROBE_SECONDS``, ``WS_PROBE_SEED``). The checks hold for
any timing, so a different interleaving on another machine can only find more.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import struct
import time

from interlink.core.protocol.certs import generate_static_key
from interlink.core.protocol.connection import ClientConnection, Welcomed
from interlink.core.protocol.noise import Suite, make_preamble
from interlink.core.protocol.wsframes import stream_to_messages
from interlink.gateway import Gateway
from e2e.test_websocket import PAGE_ORIGIN, BrowserClient
from three_providers import AUD, config_for

PROBE_S = float(os.environ.get("INTERLINK_WS_PROBE_S", "2"))
SEED = int(os.environ.get("INTERLINK_WS_PROBE_SEED", "1"))
CONCURRENT = 8  # connections probing at once
BINARY, CONT, PING, PONG, CLOSE = 2, 0, 9, 10, 8
UPGRADE = ("GET {path} HTTP/1.1\r\nHost: probe\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: " + PAGE_ORIGIN + "\r\n\r\n")
GIVE_UP = (ConnectionError, OSError, RuntimeError, asyncio.IncompleteReadError, asyncio.TimeoutError,
           asyncio.LimitOverrunError)  # the gateway ended the connection, or did not answer in time


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    """One client WebSocket frame (RFC 6455 §5.2), masked unless told otherwise."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    size, masked = len(payload), 0x80 if mask else 0
    if size < 126:
        head += bytes([masked | size])
    elif size < 65536:
        head += bytes([masked | 126]) + struct.pack(">H", size)
    else:
        head += bytes([masked | 127]) + struct.pack(">Q", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))


def random_frames(rng: random.Random) -> bytes:
    out = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.3:  # any opcode, reserved bits, unmasked, fin or not
            out.append(frame(rng.choice([0, 1, 2, 3, 7, 8, 9, 10, 11, 15]),
                             rng.randbytes(rng.choice([0, 1, 2, 5, 125, 126, 200])), fin=rng.random() < 0.6,
                             mask=rng.random() < 0.9, rsv=rng.choice([0, 0, 0, 1, 4])))
        elif kind < 0.5:  # a message in fragments, control frames between them
            parts = rng.randint(1, 70)
            for i in range(parts):
                out.append(frame(BINARY if i == 0 else CONT, rng.randbytes(rng.randint(0, 30)), fin=i == parts - 1))
                if rng.random() < 0.2:
                    out.append(frame(rng.choice([PING, PONG]), rng.randbytes(rng.randint(0, 10))))
        elif kind < 0.6:  # a close frame, its code valid or not
            code = rng.choice([1000, 1002, 999, 5000, 3000])
            out.append(frame(CLOSE, struct.pack(">H", code) + rng.randbytes(rng.randint(0, 20))))
        elif kind < 0.7:
            out.append(rng.randbytes(rng.randint(1, 40)))
        elif kind < 0.8:  # a frame cut short
            whole = frame(BINARY, rng.randbytes(rng.randint(0, 300)))
            out.append(whole[: rng.randint(1, len(whole))])
        else:  # messages up to and past the frame limit
            out.append(frame(BINARY, rng.randbytes(rng.choice([0, 1, 20, 1000, 65535, 65536, 70000]))))
    return b"".join(out)


async def read_frame(reader) -> tuple[int, bytes]:
    """One gateway frame (never masked)."""
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack(">H", await reader.readexactly(2))[0]
    elif size == 127:
        size = struct.unpack(">Q", await reader.readexactly(8))[0]
    return first & 0x0F, await reader.readexactly(size)


async def handshake(gateway: Gateway, issuer, reader, writer, rng: random.Random) -> ClientConnection | None:
    """A real Noise handshake and ``auth`` over the upgraded connection: the session, or None."""
    conn = ClientConnection(suite=int(Suite.XX_CHACHAPOLY), static_private=generate_static_key(),
                            root_public=gateway.root_public, device=1,
                            token=issuer.issue(f"probe{rng.randint(0, 3)}", audience=AUD))
    conn.start(time.time())
    writer.write(b"".join(frame(BINARY, bytes(m)) for m in stream_to_messages(conn.data_to_send(), preamble=True)))
    for _ in range(6):
        opcode, payload = await asyncio.wait_for(read_frame(reader), 2)
        if opcode != BINARY:
            return None
        conn.receive_data(len(payload).to_bytes(2, "big") + payload, time.time())
        out = conn.data_to_send()
        if out:
            writer.write(b"".join(frame(BINARY, bytes(m)) for m in stream_to_messages(out)))
        if any(type(event) is Welcomed for event in conn.events()):
            return conn
    return None


async def probe_once(gateway: Gateway, issuer, rng: random.Random) -> None:
    reader, writer = await asyncio.open_connection(*gateway.ws_address)
    path = gateway._server.ws_path if rng.random() < 0.97 else "/elsewhere"
    writer.write(UPGRADE.format(path=path, key=base64.b64encode(os.urandom(16)).decode()).encode())
    start, wait = rng.random(), rng.random() < 0.85
    try:
        if wait and b" 101 " not in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2):
            return  # refused, as it should be for the other path
        data = b""
        if start < 0.4:
            data = frame(BINARY, make_preamble(int(Suite.XX_CHACHAPOLY)))
        elif start < 0.8 and wait:
            conn = await handshake(gateway, issuer, reader, writer, rng)
            if conn is not None and rng.random() < 0.5:  # a good stanza in two fragments, a ping between
                conn.send_stanza({"t": "ping", "id": os.urandom(16)})
                for message in stream_to_messages(conn.data_to_send()):
                    message, cut = bytes(message), rng.randint(0, len(message))
                    data += frame(BINARY, message[:cut], fin=False) + frame(PING, b"p") + frame(CONT, message[cut:])
        data += random_frames(rng)
        cuts = sorted(rng.sample(range(len(data) + 1), min(3, len(data) + 1)))
        for begin, end in zip([0, *cuts], [*cuts, len(data)]):
            writer.write(data[begin:end])
            await writer.drain()
            await asyncio.sleep(0)
        if rng.random() < 0.5:
            writer.write_eof()
        await asyncio.wait_for(reader.read(1 << 20), 0.05)
    except GIVE_UP:
        pass
    finally:
        writer.close()


async def test_random_websocket_input_never_breaks_the_listener(issuers, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    config = config_for(issuers, tmp_path, ws_port=0, ws_allowed_origins=[PAGE_ORIGIN], preauth_deadline_s=2.0)
    async with Gateway(config) as gateway:
        rng = random.Random(SEED)
        counters = gateway._server.counters
        probed, started = 0, time.monotonic()
        # Probe for PROBE_S, and on a slow machine on until a session opened (30 s at most): the
        # probe is meant to reach past the handshake too.
        while (elapsed := time.monotonic() - started) < PROBE_S or (counters["sessions_opened"] == 0 and elapsed < 30):
            await asyncio.gather(*(probe_once(gateway, issuers[0], rng) for _ in range(CONCURRENT)))
            probed += CONCURRENT
            errors = [record.getMessage()[:300] for record in caplog.records if record.levelno >= logging.ERROR]
            assert counters.get("internal_errors", 0) == 0 and not errors, (probed, errors[:3])
        assert counters["ws_upgrades"] > 0 and counters["sessions_opened"] > 0  # the probe got past the upgrade
        print(f"\nws probe: {probed} connections in {PROBE_S:g} s (seed {SEED}): {counters['ws_upgrades']} upgraded, "
              f"{counters['ws_upgrades_refused']} refused, {counters['sessions_opened']} sessions opened")
        page = await BrowserClient.connect(gateway, issuers[0].issue("alice", audience=AUD))
        assert page.conn.welcome["user"] == "alice@alpha"
        await page.ws.close()
