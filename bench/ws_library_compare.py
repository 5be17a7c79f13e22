"""WebSocket server libraries compared with raw TCP: idle memory per connection, CPU per message.

    .venv/bin/python bench/ws_library_compare.py [--connections 2000] [--messages 16] [--payload 100]

Why: the gateway's WebSocket listener (``core/edge/websocket.py``) drives the ``websockets``
library's sans-I/O ``ServerProtocol`` from a uvloop ``BufferedProtocol`` (one shared read buffer,
no task per connection). This measures what that design costs next to raw TCP and next to the
two usual alternatives, a ``websockets.asyncio`` server and an ``aiohttp.web`` server (a handler
task per connection). Four echo servers, all on uvloop:

``tcp``
    A ``BufferedProtocol`` reading into one shared buffer; messages carry a 2-byte big-endian
    length prefix; each complete message is cut out, re-framed and echoed (one write per read).
    The floor, and what the gateway's TCP path resembles.
``websockets-sansio``
    The same ``BufferedProtocol`` with a ``websockets.server.ServerProtocol`` per connection:
    ``receive_data``, ``events_received``, ``accept``/``send_response`` for the upgrade,
    ``send_binary`` per message, ``data_to_send`` flushed once per read. The gateway's design.
``websockets-asyncio``
    ``websockets.asyncio.server.serve``: ``async for message in ws: await ws.send(message)``.
``aiohttp``
    ``aiohttp.web``, one route: ``WebSocketResponse``, ``async for msg in ws:
    await ws.send_bytes(msg.data)``; served by ``AppRunner`` (no access log) and a ``SockSite``.

Every WebSocket server runs without compression, with a 65535-byte message limit and without
server pings (``websockets.asyncio`` pings every 20 s by default, which costs one more task per
connection; the other two send none). The websockets servers get a logger at WARNING, as the
gateway does, so per-connection INFO records cost nothing.

Each server runs in a child process pinned to CPU 0; the client runs here, pinned to CPU 1, on
uvloop, with plain ``asyncio.Protocol`` connections: for the WebSocket servers each drives a
``websockets.client.ClientProtocol`` (sans-I/O, so it masks what it sends as a client must, at
the least client cost), for ``tcp`` the length-prefix framing. For each server, one child:

1. **CPU per message**: ``--streams`` connections (16) each keep ``--messages`` messages (16) of
   ``--payload`` bytes (100) in flight, closed loop (each echo is answered with a new message).
   After 1 s of warm-up, for 5 s: the server's CPU time (``/proc/PID/task/*/schedstat``, all
   threads) over the echoes the client received, and echoes per second. The utilisations of the
   server's and the client's CPU show which side limited the rate (a server that is not saturated
   reads smaller batches, so pays a little more per message). The connections then close
   (WebSocket closing handshake); this phase also warms the server up (lazy imports, caches)
   before the memory baseline.
2. **Idle memory per connection**: the server's RSS (``VmRSS``) before and after opening
   ``--connections`` connections (2000) that each complete the WebSocket upgrade (``tcp``: just
   connect) and have one message echoed, then stay idle 3 s: (after - before) / connections.
   Kernel socket buffers are not in RSS (and are the same for all four).

The servers take turns, ``--runs`` times (3): tcp, sansio, asyncio, aiohttp, tcp, ... Printed: one
JSON document with, per server, the min and median of each figure over the runs, every run's
raw figures, and each median as a ratio to ``tcp``'s. One run of the defaults takes a little over
two minutes. Needs CPUs 0 and 1, and no other busy process on them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import uvloop
import websockets
from aiohttp import web
from websockets.asyncio.server import serve as websockets_serve
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

SERVERS = ("tcp", "websockets-sansio", "websockets-asyncio", "aiohttp")
HOST = "127.0.0.1"
SERVER_CPU, CLIENT_CPU = 0, 1
MAX_MESSAGE_BYTES = 65535
READ_BUFFER_BYTES = 256 * 1024  # the gateway's shared read buffer
BACKLOG = 4096
CONNECT_CONCURRENCY = 200  # connection attempts in flight while opening the idle connections
START_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 5.0
WARMUP_S, MEASURE_S = 1.0, 5.0
IDLE_S = 3.0
SETTLE_S = 1.0  # after the busy connections closed, before the memory baseline

QUIET_LOG = logging.getLogger("ws_library_compare.websockets")
QUIET_LOG.setLevel(logging.WARNING)


# -- the servers (run in the child process)


class TcpEcho(asyncio.BufferedProtocol):
    """Length-prefixed messages: cut each complete one out, echo it re-framed."""

    __slots__ = ("view", "transport", "pending")

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.transport = None
        self.pending = b""  # the start of a message the next read completes

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(self.view[:nbytes])  # the shared buffer is reused by the next read
        if self.pending:
            data = self.pending + data
        output = []
        offset, end = 0, len(data)
        while end - offset >= 2:
            message_end = offset + 2 + int.from_bytes(data[offset:offset + 2], "big")
            if message_end > end:
                break
            message = data[offset + 2:message_end]
            output.append(len(message).to_bytes(2, "big"))
            output.append(message)
            offset = message_end
        self.pending = data[offset:]
        if output:
            self.transport.write(b"".join(output))


class SansioWebSocketEcho(asyncio.BufferedProtocol):
    """``websockets``' sans-I/O ``ServerProtocol`` behind the shared buffer, as the gateway drives it."""

    __slots__ = ("view", "transport", "ws")

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.transport = None
        self.ws = ServerProtocol(origins=None, max_size=MAX_MESSAGE_BYTES, logger=QUIET_LOG)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        ws = self.ws
        ws.receive_data(bytes(self.view[:nbytes]))
        for event in ws.events_received():
            if type(event) is Request:
                ws.send_response(ws.accept(event))
            elif event.opcode is Opcode.BINARY and ws.state is State.OPEN:  # not once a close came in
                ws.send_binary(event.data)
            # ping, pong and close: answered by the library
        self.flush()

    def eof_received(self) -> None:
        self.ws.receive_eof()
        self.flush()

    def flush(self) -> None:
        ws, transport = self.ws, self.transport
        output = ws.data_to_send()
        if output:
            transport.write(b"".join(output))  # a b"" in it asks for EOF: the close below does that
        if (ws.close_expected() or ws.state is State.CLOSED) and not transport.is_closing():
            transport.close()


async def websockets_echo(ws) -> None:
    async for message in ws:
        await ws.send(message)


async def aiohttp_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False, max_msg_size=MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_bytes(msg.data)
    return ws


async def start_server(kind: str, sock: socket.socket) -> None:
    """Start serving ``kind`` on the listening ``sock`` (the loop keeps the server alive)."""
    loop = asyncio.get_running_loop()
    if kind in ("tcp", "websockets-sansio"):
        view = memoryview(bytearray(READ_BUFFER_BYTES))
        protocol = TcpEcho if kind == "tcp" else SansioWebSocketEcho
        await loop.create_server(lambda: protocol(view), sock=sock, backlog=BACKLOG)
    elif kind == "websockets-asyncio":
        await websockets_serve(websockets_echo, sock=sock, backlog=BACKLOG, compression=None,
                               max_size=MAX_MESSAGE_BYTES, ping_interval=None, logger=QUIET_LOG)
    else:
        app = web.Application()
        app.router.add_get("/", aiohttp_echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock, backlog=BACKLOG).start()


async def serve_forever(kind: str, sock: socket.socket, ready) -> None:
    await start_server(kind, sock)
    ready.send(sock.getsockname()[1])
    await asyncio.Future()  # until terminated


def server_main(kind: str, ready) -> None:
    """The child process: pinned to the server CPU, serves until terminated."""
    os.sched_setaffinity(0, {SERVER_CPU})
    raise_fd_limit()
    sock = socket.create_server((HOST, 0), backlog=BACKLOG)
    uvloop.run(serve_forever(kind, sock, ready))


@contextlib.contextmanager
def server_process(kind: str):
    """Run the ``kind`` server in a fresh child process; yield its pid and port."""
    spawn = multiprocessing.get_context("spawn")
    receiver, sender = spawn.Pipe(duplex=False)
    process = spawn.Process(target=server_main, args=(kind, sender), name=f"ws-bench-{kind}", daemon=True)
    process.start()
    try:
        if not receiver.poll(START_TIMEOUT_S):
            raise RuntimeError(f"the {kind} server did not start within {START_TIMEOUT_S} s")
        yield process.pid, receiver.recv()
    finally:
        process.terminate()
        process.join()


# -- the client


class LengthPrefixCodec:
    """The ``tcp`` server's framing."""

    __slots__ = ("pending",)
    is_open = True

    def __init__(self) -> None:
        self.pending = b""

    def opening(self) -> bytes:
        return b""

    def closing(self) -> bytes:
        return b""

    def encode(self, payload: bytes, count: int) -> bytes:
        return (len(payload).to_bytes(2, "big") + payload) * count

    def receive(self, data: bytes) -> int:
        """Take in bytes from the server; return how many messages they completed."""
        data = self.pending + data if self.pending else data
        count, offset, end = 0, 0, len(data)
        while end - offset >= 2:
            message_end = offset + 2 + int.from_bytes(data[offset:offset + 2], "big")
            if message_end > end:
                break
            count += 1
            offset = message_end
        self.pending = data[offset:]
        return count


class WebSocketCodec:
    """A WebSocket client: ``websockets``' sans-I/O ``ClientProtocol`` (it masks what it sends)."""

    __slots__ = ("ws", "is_open")

    def __init__(self, port: int) -> None:
        self.ws = ClientProtocol(parse_uri(f"ws://{HOST}:{port}/"), max_size=MAX_MESSAGE_BYTES, logger=QUIET_LOG)
        self.is_open = False

    def opening(self) -> bytes:
        self.ws.send_request(self.ws.connect())
        return b"".join(self.ws.data_to_send())

    def closing(self) -> bytes:
        self.ws.send_close()
        return b"".join(self.ws.data_to_send())

    def encode(self, payload: bytes, count: int) -> bytes:
        for _ in range(count):
            self.ws.send_binary(payload)
        return b"".join(self.ws.data_to_send())

    def receive(self, data: bytes) -> int:
        """Take in bytes from the server; return how many messages they completed."""
        ws = self.ws
        ws.receive_data(data)
        count = 0
        for event in ws.events_received():
            if type(event) is Response:
                if ws.handshake_exc is not None:
                    raise ws.handshake_exc
                self.is_open = True
            elif event.opcode is Opcode.BINARY:
                count += 1
        return count


class EchoClient(asyncio.Protocol):
    """One connection: sends messages and counts the echoes; in closed loop, answers each echo
    with a new message."""

    __slots__ = ("codec", "payload", "transport", "sent", "echoes", "closed_loop", "opened", "lost", "waiter")

    def __init__(self, codec, payload: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.codec = codec
        self.payload = payload
        self.transport = None
        self.sent = self.echoes = 0
        self.closed_loop = False
        self.opened = loop.create_future()  # the upgrade is done (tcp: connected)
        self.lost = loop.create_future()
        self.waiter: tuple[int, asyncio.Future] | None = None  # (echo count, future) for wait_echoes

    def connection_made(self, transport) -> None:
        self.transport = transport
        opening = self.codec.opening()
        if opening:
            transport.write(opening)
        else:
            self.opened.set_result(None)

    def data_received(self, data: bytes) -> None:
        echoes = self.codec.receive(data)
        if not self.opened.done() and self.codec.is_open:
            self.opened.set_result(None)
        if echoes:
            self.echoes += echoes
            if self.closed_loop:
                self.send(echoes)
            if self.waiter is not None and self.echoes >= self.waiter[0]:
                self.waiter[1].set_result(None)
                self.waiter = None

    def connection_lost(self, exc) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost before the upgrade: {exc}"))
        self.lost.set_result(None)

    def send(self, count: int) -> None:
        self.sent += count
        self.transport.write(self.codec.encode(self.payload, count))

    async def wait_echoes(self, count: int) -> None:
        if self.echoes < count:
            future = asyncio.get_running_loop().create_future()
            self.waiter = (count, future)
            await future

    async def close(self) -> None:
        """Stop sending, wait for the echoes in flight, then close as the protocol does (WebSocket:
        the closing handshake, after which the server ends the TCP connection)."""
        self.closed_loop = False
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await self.wait_echoes(self.sent)
            closing = self.codec.closing()
            if closing:
                self.transport.write(closing)
            else:
                self.transport.close()
            await self.lost


async def open_client(kind: str, port: int, payload: bytes, limit: asyncio.Semaphore) -> EchoClient:
    """Connect, complete the upgrade, have one message echoed."""
    codec = LengthPrefixCodec() if kind == "tcp" else WebSocketCodec(port)
    async with limit:
        _, client = await asyncio.get_running_loop().create_connection(lambda: EchoClient(codec, payload), HOST, port)
        await client.opened
        client.send(1)
        await client.wait_echoes(1)
    return client


async def open_clients(kind: str, port: int, payload: bytes, count: int) -> list[EchoClient]:
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    return await asyncio.gather(*(open_client(kind, port, payload, limit) for _ in range(count)))


async def close_clients(clients: list[EchoClient]) -> None:
    await asyncio.gather(*(client.close() for client in clients))


def cpu_seconds(pid: int) -> float:
    """CPU time of all the process's threads so far (ns precision, unlike /proc/PID/stat's ticks)."""
    return sum(int((task / "schedstat").read_text().split()[0]) for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def measure_cpu(kind: str, port: int, pid: int, args) -> dict:
    clients = await open_clients(kind, port, os.urandom(args.payload), args.streams)
    for client in clients:
        client.closed_loop = True
        client.send(args.messages)
    await asyncio.sleep(WARMUP_S)
    wall, server_cpu, client_cpu = time.monotonic(), cpu_seconds(pid), time.process_time()
    echoes = sum(client.echoes for client in clients)
    await asyncio.sleep(MEASURE_S)
    wall = time.monotonic() - wall
    server_cpu = cpu_seconds(pid) - server_cpu
    client_cpu = time.process_time() - client_cpu
    echoes = sum(client.echoes for client in clients) - echoes
    await close_clients(clients)
    return {
        "server_cpu_us_per_message": server_cpu / echoes * 1e6,
        "messages_per_s": echoes / wall,
        "server_cpu_utilization": server_cpu / wall,
        "client_cpu_utilization": client_cpu / wall,
    }


async def measure_idle_memory(kind: str, port: int, pid: int, args) -> dict:
    await asyncio.sleep(SETTLE_S)
    before = rss_bytes(pid)
    clients = await open_clients(kind, port, os.urandom(args.payload), args.connections)
    await asyncio.sleep(IDLE_S)
    after = rss_bytes(pid)
    await close_clients(clients)
    return {"idle_bytes_per_connection": (after - before) / args.connections, "rss_before_mb": before / 2**20}


async def measure(kind: str, port: int, pid: int, args) -> dict:
    return {**await measure_cpu(kind, port, pid, args), **await measure_idle_memory(kind, port, pid, args)}


# -- the run


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for figure in runs[0]:
        values = [run[figure] for run in runs]
        summary[figure] = {"min": min(values), "median": statistics.median(values)}
    summary["runs"] = runs
    return summary


def rounded(value):
    if isinstance(value, float):
        return round(value, 3 if abs(value) < 10 else 1)
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item) for item in value]
    return value


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--connections", type=int, default=2000, help="idle connections for the memory figure")
    parser.add_argument("--messages", type=int, default=16, help="messages in flight per busy connection")
    parser.add_argument("--payload", type=int, default=100, help="bytes per message")
    parser.add_argument("--streams", type=int, default=16, help="busy connections for the CPU figure")
    parser.add_argument("--runs", type=int, default=3, help="runs of each server, interleaved")
    args = parser.parse_args()
    if not 1 <= args.payload <= MAX_MESSAGE_BYTES:
        parser.error(f"--payload must be 1 to {MAX_MESSAGE_BYTES}")
    if len(os.sched_getaffinity(0) & {SERVER_CPU, CLIENT_CPU}) < 2:
        sys.exit(f"needs CPUs {SERVER_CPU} and {CLIENT_CPU}")

    os.sched_setaffinity(0, {CLIENT_CPU})
    raise_fd_limit()
    results: dict[str, list[dict]] = {kind: [] for kind in SERVERS}
    for run in range(1, args.runs + 1):
        for kind in SERVERS:
            with server_process(kind) as (pid, port):
                result = uvloop.run(measure(kind, port, pid, args))
            results[kind].append(result)
            print(f"run {run} {kind}: {json.dumps(rounded(result))}", file=sys.stderr)

    summaries = {kind: summarize(runs) for kind, runs in results.items()}
    ratio_figures = ("idle_bytes_per_connection", "server_cpu_us_per_message", "messages_per_s")
    ratios = {
        kind: {figure: summaries[kind][figure]["median"] / summaries["tcp"][figure]["median"]
               for figure in ratio_figures}
        for kind in SERVERS if kind != "tcp"
    }
    report = {
        "config": {
            "connections": args.connections, "streams": args.streams, "messages_in_flight": args.messages,
            "payload_bytes": args.payload, "runs": args.runs, "warmup_s": WARMUP_S, "measure_s": MEASURE_S,
            "idle_s": IDLE_S, "cpu": cpu_model(), "python": sys.version.split()[0],
            "websockets": websockets.__version__, "aiohttp": aiohttp.__version__, "uvloop": uvloop.__version__,
        },
        "servers": summaries,
        "median_ratio_to_tcp": ratios,
    }
    print(json.dumps(rounded(report), indent=2))


if __name__ == "__main__":
    main()
