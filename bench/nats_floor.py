"""The floor under a cross-node message's cost (issue 18): what one request and its answer cost
in CPU between two processes, over NATS — through nats-py (how ``ClusterLink`` talked until
63fb926), through ``NatsConnection`` (``core/edge/natsconn.py``, how relayed
stanzas and answers travel now) and through the bare protocol — and over a bare loopback TCP
connection, one at a time, with no gateway work around them.

``bench/cluster_cost.py``'s closed loop (one message in flight) puts every cross-node message
through one NATS round trip (node A publishes the relayed stanza, node B publishes its answer);
the difference between its cross and same rows is what the relay adds. This bench measures the
part of that difference no relay code can remove: two processes pinned like the nodes
(``--cpu-a``/``--cpu-b``), nats-server on ``--cpu-nats``, the asker sending ``--request`` bytes
and waiting for the ``--answer`` bytes before sending again, on uvloop.

CPU comes from each child's schedstat over the measured window (``interlink.load.procstat``),
kernel time included (loopback TCP's work is done in the sending and receiving syscalls).

    .venv/bin/python bench/nats_floor.py --seconds 5 --repeats 3 --cpu-a 0 --cpu-b 0 --cpu-nats 1

prints a JSON report on stdout and a table on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from interlink.load.nats import LocalNats  # noqa: E402
from interlink.load.procstat import schedstat_s  # noqa: E402

TRANSPORTS = ("nats", "natsconn", "nats-raw", "tcp")
WARM_S = 0.5


# -- the two children


async def _echo_nats(url: str, answer_bytes: int) -> None:
    import nats

    nc = await nats.connect(url)
    answer = b"a" * answer_bytes

    async def on_request(message) -> None:
        await nc.publish("floor.answer", answer)

    await nc.subscribe("floor.request", cb=on_request)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _ask_nats(url: str, request_bytes: int, seconds: float) -> None:
    import nats

    nc = await nats.connect(url)
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future] = []

    async def on_answer(message) -> None:
        waiting.pop().set_result(None)

    await nc.subscribe("floor.answer", cb=on_answer)
    await nc.flush()
    request = b"r" * request_bytes

    async def once() -> None:
        future = loop.create_future()
        waiting.append(future)
        await nc.publish("floor.request", request)
        await future

    await _timed(once, seconds)
    await nc.close()


async def _natsconn(url: str, subscribe: bytes, on_message):
    from interlink.core.edge.natsconn import NatsConnection

    connection = NatsConnection([url], name="floor")
    connection.subscribe(subscribe, lambda subject, reply, payload: on_message())
    await connection.connect()
    return connection


class _RawNats(asyncio.Protocol):
    """The NATS text protocol at its barest (CONNECT, SUB, one PING to know SUB is in, PUB, MSG;
    no keep-alive, headers or reconnects): how much of a round trip is nats-server and the
    sockets, not the client."""

    def __init__(self, on_message) -> None:
        self.on_message = on_message
        self.buffer = b""
        self.ponged = asyncio.get_running_loop().create_future()  # the server answered our PING: SUB is in

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return
            line = self.buffer[:line_end]
            if line.startswith(b"MSG "):
                size = int(line.rsplit(b" ", 1)[1])
                if len(self.buffer) < line_end + 2 + size + 2:
                    return
                self.buffer = self.buffer[line_end + 2 + size + 2:]
                self.on_message()
                continue
            if line.startswith(b"PING"):
                self.transport.write(b"PONG\r\n")
            elif line.startswith(b"PONG") and not self.ponged.done():
                self.ponged.set_result(None)
            elif line.startswith(b"-ERR") and not self.ponged.done():  # the connect's caller says why
                self.ponged.set_exception(RuntimeError(f"nats-server refused: {line.decode(errors='replace')}"))
            self.buffer = self.buffer[line_end + 2:]

    def publish(self, subject: bytes, payload: bytes) -> None:
        self.transport.write(b"PUB %s %d\r\n%s\r\n" % (subject, len(payload), payload))


async def _raw_nats(url: str, subscribe: bytes, on_message) -> _RawNats:
    host, port = url.rsplit("/", 1)[1].split(":")
    _, protocol = await asyncio.get_running_loop().create_connection(lambda: _RawNats(on_message), host, int(port))
    protocol.transport.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB %s 1\r\nPING\r\n' % subscribe)
    await asyncio.wait_for(protocol.ponged, 5)  # the server took CONNECT and SUB before our PING
    return protocol


async def _echo_bare(connect, url: str, answer_bytes: int) -> None:
    """The answering child over ``connect`` (``_natsconn`` or ``_raw_nats``)."""
    answer = b"a" * answer_bytes
    link = await connect(url, b"floor.request", lambda: link.publish(b"floor.answer", answer))
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _ask_bare(connect, url: str, request_bytes: int, seconds: float) -> None:
    """The asking child over ``connect`` (``_natsconn`` or ``_raw_nats``)."""
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future] = []
    link = await connect(url, b"floor.answer", lambda: waiting.pop().set_result(None))
    request = b"r" * request_bytes

    async def once() -> None:
        future = loop.create_future()
        waiting.append(future)
        link.publish(b"floor.request", request)
        await future

    await _timed(once, seconds)


class _Answering(asyncio.Protocol):
    def __init__(self, request_bytes: int, answer_bytes: int) -> None:
        self.request_bytes, self.answer = request_bytes, b"a" * answer_bytes
        self.buffered = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffered += len(data)
        while self.buffered >= self.request_bytes:
            self.buffered -= self.request_bytes
            self.transport.write(self.answer)


class _Asking(asyncio.Protocol):
    def __init__(self, answer_bytes: int) -> None:
        self.answer_bytes = answer_bytes
        self.buffered = 0
        self.waiting: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffered += len(data)
        if self.buffered >= self.answer_bytes:
            self.buffered -= self.answer_bytes
            self.waiting.set_result(None)


async def _echo_tcp(request_bytes: int, answer_bytes: int) -> None:
    server = await asyncio.get_running_loop().create_server(
        lambda: _Answering(request_bytes, answer_bytes), "127.0.0.1", 0)
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


async def _ask_tcp(port: int, request_bytes: int, answer_bytes: int, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    transport, asking = await loop.create_connection(lambda: _Asking(answer_bytes), "127.0.0.1", port)
    request = b"r" * request_bytes

    async def once() -> None:
        asking.waiting = loop.create_future()
        transport.write(request)
        await asking.waiting

    await _timed(once, seconds)
    transport.close()


async def _timed(once, seconds: float) -> None:
    """Warm up, then say ``start``, go on for ``seconds`` and say ``done <round trips> <seconds>``."""
    warm_until = time.monotonic() + WARM_S
    while time.monotonic() < warm_until:
        await once()
    print("start", flush=True)
    sys.stdin.readline()  # the parent has read both children's CPU
    started = time.monotonic()
    count = 0
    while time.monotonic() - started < seconds:
        await once()
        count += 1
    print("done", count, time.monotonic() - started, flush=True)


def child(args) -> None:
    import uvloop

    if args.role == "echo-nats":
        coroutine = _echo_nats(args.url, args.answer)
    elif args.role == "ask-nats":
        coroutine = _ask_nats(args.url, args.request, args.seconds)
    elif args.role.endswith(("-natsconn", "-nats-raw")):
        connect = _natsconn if args.role.endswith("-natsconn") else _raw_nats
        coroutine = (_echo_bare(connect, args.url, args.answer) if args.role.startswith("echo-")
                     else _ask_bare(connect, args.url, args.request, args.seconds))
    elif args.role == "echo-tcp":
        coroutine = _echo_tcp(args.request, args.answer)
    else:
        coroutine = _ask_tcp(args.port, args.request, args.answer, args.seconds)
    uvloop.run(coroutine)


# -- the parent


def _spawn(role: str, cpu: int | None, extra: list[str]) -> subprocess.Popen:
    preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    return subprocess.Popen([sys.executable, __file__, "--role", role, *extra], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, preexec_fn=preexec)


def _cpu(procs: dict[str, subprocess.Popen]) -> dict[str, float]:
    return {name: schedstat_s(proc.pid)[0] for name, proc in procs.items()}


def run_once(args, transport: str, url: str) -> dict:
    common = ["--request", str(args.request), "--answer", str(args.answer), "--seconds", str(args.seconds)]
    echo = _spawn(f"echo-{transport}", args.cpu_b, common + ["--url", url])
    try:
        ready = echo.stdout.readline().split()
        if not ready or ready[0] != "ready":
            raise RuntimeError(f"the echo child did not start ({echo.poll()})")
        target = ["--port", ready[1]] if transport == "tcp" else ["--url", url]
        ask = _spawn(f"ask-{transport}", args.cpu_a, common + target)
        try:
            if ask.stdout.readline().strip() != "start":
                raise RuntimeError(f"the asking child did not start ({ask.poll()})")
            procs = {"ask": ask, "echo": echo}
            before = _cpu(procs)
            ask.stdin.write("go\n")
            ask.stdin.flush()
            done = ask.stdout.readline().split()
            after = _cpu(procs)
            if not done or done[0] != "done":
                raise RuntimeError(f"the asking child did not finish ({ask.poll()})")
            count = int(done[1])
            ask.wait(timeout=10)
        finally:
            if ask.poll() is None:
                ask.kill()
    finally:
        echo.kill()
        echo.wait()
    per = {name: (after[name] - before[name]) / count * 1e6 for name in procs}
    return {"transport": transport, "round_trips": count, "per_s": round(count / float(done[2]), 1),
            "ask_us": round(per["ask"], 1), "echo_us": round(per["echo"], 1),
            "both_us": round(per["ask"] + per["echo"], 1)}


async def _with_nats(args) -> tuple[list[dict], str]:
    with tempfile.TemporaryDirectory(prefix="interlink-nats-floor-") as folder:
        server = LocalNats(Path(folder), cpu=args.cpu_nats)
        await server.start()
        try:
            runs = []
            for repeat in range(1, args.repeats + 1):
                for transport in TRANSPORTS:
                    run = await asyncio.to_thread(run_once, args, transport, server.url)
                    run["repeat"] = repeat
                    runs.append(run)
                    print(f"[{repeat}] {transport:8}: {run['per_s']:8.0f} round trips/s, CPU per round trip: "
                          f"asker {run['ask_us']:6.1f} + answerer {run['echo_us']:6.1f} = {run['both_us']:6.1f} µs",
                          file=sys.stderr)
            return runs, server.version
        finally:
            await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window of each run")
    parser.add_argument("--repeats", type=int, default=3, help="nats, natsconn, nats-raw, tcp, nats...: this many rounds")
    parser.add_argument("--request", type=int, default=300, help="request bytes (a relayed msg stanza is ~300)")
    parser.add_argument("--answer", type=int, default=60, help="answer bytes (a relayed ack is ~60)")
    for name in ("a", "b", "nats"):
        parser.add_argument(f"--cpu-{name}", type=int, default=None, help=f"pin {name} to this CPU")
    parser.add_argument("--role", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        child(args)
        return
    if args.seconds <= 0 or args.repeats < 1 or args.request < 1 or args.answer < 1:
        parser.error("--seconds, --repeats, --request and --answer must be positive")
    runs, nats_version = asyncio.run(_with_nats(args))
    summary = {}
    for transport in TRANSPORTS:
        both = sorted(run["both_us"] for run in runs if run["transport"] == transport)
        summary[transport] = {"both_us_min": both[0], "both_us_max": both[-1]}
    print(json.dumps({"nats_server": nats_version, "request_bytes": args.request, "answer_bytes": args.answer,
                      "seconds": args.seconds, "pinned": {"a": args.cpu_a, "b": args.cpu_b, "nats": args.cpu_nats},
                      "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
