"""One source floods the gateway; does everyone else still get in and get served? (issue 17's goal
for the per-source limits: docs/benchmarks.md "A flood from one source").

    python bench/source_flood.py --seconds 10 --silent 10000 --rate 5000

The gateway runs in a child process pinned to CPU 0 with ``source_limits_on_loopback = true``,
so each loopback address is a source of its own. Two phases of ``--seconds`` each, quiet then
flooded; in both, on CPU 1:

* **established sessions** from 127.0.0.4: ``--pairs`` sender/recipient devices, each sender
  keeping ``--inflight`` durable 1:1 messages unacked (closed loop: the gateway saturated), or
  ``--established-rate`` messages a second in total (open loop): messages acked per second (and
  their p99 in the open loop);
* **a well-behaved client** from 127.0.0.3: a new connection every 20 ms, handshake and token
  through to ``welcome``, then closed: connect-to-welcome latency p50/p99.

In the flooded phase an attacker process on 127.0.0.2 (plain non-blocking sockets, nice 19 so the
measuring clients on the same CPU keep theirs) first opens ``--silent`` connections and holds them
without a byte, then opens ``--rate`` new connections per second, each sending the preamble and a
real XX handshake message 1 (the gateway would answer it with a Diffie-Hellman), closed with a
reset after 100 ms. It reports what it managed; the gateway's ``/varz`` reports what it refused.

The result (JSON): both phases side by side, the ratio of established throughput flooded to
quiet (goal: at least 0.9) and the well-behaved client's p99 under the flood (goal: at most
100 ms).

    python bench/source_flood.py --refusal-cost

instead measures what one refusal costs, in this process: the gateway's admission decision
(``GatewayServer.accept`` refusing an address over its limits) and the accept-and-reset of a
queued connection (``_socket`` accept, SO_LINGER 0, close), each per call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import uvloop

import interlink.core
from interlink.core.protocol.certs import generate_static_key
from interlink.core.protocol.connection import ClientConnection
from interlink.core.protocol.noise import Suite
from interlink.core.edge.listener import reset  # a reset, no TIME_WAIT: thousands a second keep finding ports
from interlink.core.protocol.stanza import encode_stanza
from interlink.load.child import LIFTED_LIMITS, GatewayProcess, child_arguments
from interlink.load.peer import LeanPeer
from interlink.testing import DemoIssuer

AUDIENCE = "interlink-bench"
ATTACKER, GOOD_CLIENT, ESTABLISHED = "127.0.0.2", "127.0.0.3", "127.0.0.4"
GOOD_CLIENT_INTERVAL_S = 0.02
STORM_HOLD_S = 0.1  # each storm connection is reset this long after it was opened


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (all sockets)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split()[1:], values.split()[1:]))["ListenOverflows"])
    return 0


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    return sum(cpu_times(pid))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


# ----------------------------------------------------------------------------- the attacker


def handshake_opening() -> bytes:
    """What a client sends first: the preamble and a real XX message 1."""
    conn = ClientConnection(suite=int(Suite.XX_CHACHAPOLY), static_private=generate_static_key(),
                            root_public=bytes(32), token="x", device=1)
    conn.start(time.time())
    return conn.data_to_send()


def open_from(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    sock.connect_ex(("127.0.0.1", port))
    return sock


def still_open(sock: socket.socket) -> bool:
    """Whether the gateway still holds this silent connection (nothing to read, no reset, no EOF)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""  # data: open (never here)
    except BlockingIOError:
        return True
    except OSError:  # reset: refused at accept, or closed at the pre-auth deadline
        return False


def attack(port: int, silent: int, rate: float, seconds: float) -> dict:
    """The flood from one address (runs in its own process; prints its figures as JSON)."""
    opening = handshake_opening()
    held = [open_from(ATTACKER, port) for _ in range(silent)]
    storm: list[tuple[float, socket.socket]] = []
    opened = sent = failed = 0
    start = time.monotonic()
    end = start + seconds
    while (now := time.monotonic()) < end:
        due = int((now - start) * rate) - opened
        for _ in range(due):
            try:
                sock = open_from(ATTACKER, port)
            except OSError:
                failed += 1
                opened += 1
                continue
            opened += 1
            try:
                sock.send(opening)
                sent += 1
            except OSError:  # refused at accept and already reset, or not connected yet
                failed += 1
            storm.append((now, sock))
        while storm and storm[0][0] < now - STORM_HOLD_S:
            reset(storm.pop(0)[1])
        time.sleep(0.001)
    alive = sum(still_open(sock) for sock in held)
    for sock in held:
        reset(sock)
    for _, sock in storm:
        reset(sock)
    return {"silent_opened": silent, "silent_still_held": alive, "storm_opened": opened,
            "storm_opened_per_s": round(opened / seconds), "storm_sends_failed": failed}


# ----------------------------------------------------------------------------- the measuring side


class Pair:
    """A sender keeping ``inflight`` messages unacked to its recipient (closed loop), or sent
    messages at a fixed rate (``open_loop``, by ``send_open_loop``); acks and their latency counted."""

    def __init__(self, recipient_user: str, payload: int, *, open_loop: bool = False) -> None:
        self.recipient_user = recipient_user
        self.payload = os.urandom(payload)
        self.open_loop = open_loop
        self.sent_at: dict[bytes, float] = {}  # open loop: message id -> send time
        self.ack_ms: list[float] = []
        self.acks = 0
        self.sender: LeanPeer | None = None
        self.recipient: LeanPeer | None = None
        self._seqs: list[int] = []

    def message(self) -> bytes:
        message_id = os.urandom(16)
        if self.open_loop:
            self.sent_at[message_id] = time.perf_counter()
        return encode_stanza({"t": "msg", "id": message_id, "to": self.recipient_user, "c": {1: self.payload}})

    def on_sender_stanza(self, stanza: dict) -> None:
        if stanza.get("t") == "ack":
            self.acks += 1
            if self.open_loop:
                sent = self.sent_at.pop(stanza["id"], None)
                if sent is not None:
                    self.ack_ms.append((time.perf_counter() - sent) * 1000)
            else:
                self.sender.queue(self.message())

    def on_recipient_stanza(self, stanza: dict) -> None:
        if stanza.get("t") == "dlv":
            self._seqs.append(stanza["seq"])

    def on_recipient_batch(self, peer: LeanPeer) -> None:
        if self._seqs:
            peer.queue(encode_stanza({"t": "recv", "seq": self._seqs}))
            self._seqs = []


async def connect(gateway: GatewayProcess, issuer: DemoIssuer, user: str, source: str, **callbacks) -> LeanPeer:
    return await LeanPeer.connect("127.0.0.1", gateway.port, token=issuer.issue(user, audience=AUDIENCE, expires_in=3600),
                                  device=1, root_public=gateway.root_public, local_addr=(source, 0), timeout_s=30,
                                  **callbacks)


async def good_client(gateway: GatewayProcess, issuer: DemoIssuer, seconds: float) -> list[float]:
    """Connect-to-welcome latencies (ms) of a client reconnecting every 20 ms."""
    latencies = []
    end = time.monotonic() + seconds
    number = 0
    while time.monotonic() < end:
        number += 1
        began = time.perf_counter()
        peer = await connect(gateway, issuer, "good", GOOD_CLIENT)
        latencies.append((time.perf_counter() - began) * 1000)
        await peer.close()
        await asyncio.sleep(GOOD_CLIENT_INTERVAL_S)
    return latencies


async def send_open_loop(pairs: list[Pair], rate: float, stop: asyncio.Event) -> None:
    """``rate`` messages a second in total, every millisecond the ones due, spread over the pairs."""
    began, sent = time.monotonic(), 0
    while not stop.is_set():
        due = int((time.monotonic() - began) * rate) - sent
        for index in range(due):
            pair = pairs[(sent + index) % len(pairs)]
            pair.sender.queue(pair.message())
        sent += max(0, due)
        await asyncio.sleep(0.001)


async def phase(gateway: GatewayProcess, issuer: DemoIssuer, pairs: list[Pair], args, flooded: bool) -> dict:
    attacker = None
    if flooded:
        attacker = subprocess.Popen(
            [sys.executable, __file__, "--attacker", "--port", str(gateway.port), "--silent", str(args.silent),
             "--rate", str(args.rate), "--seconds", str(args.seconds + 2)],
            stdout=subprocess.PIPE, preexec_fn=lambda: os.nice(19))
        await asyncio.sleep(2)  # the silent connections are open, the storm is running
    for pair in pairs:
        pair.acks = 0
        pair.ack_ms = []
    stop = asyncio.Event()
    sender = asyncio.create_task(send_open_loop(pairs, args.established_rate, stop)) if args.established_rate else None
    overflows = listen_overflows()
    gateway_cpu = cpu_s(gateway.pid)
    gateway_system = cpu_times(gateway.pid)[1]
    client_cpu = cpu_s(os.getpid())
    begin = time.monotonic()
    handshake_ms = await good_client(gateway, issuer, args.seconds)
    elapsed = time.monotonic() - begin
    if sender is not None:
        stop.set()
        await sender
    acked = sum(pair.acks for pair in pairs)
    gateway_busy = (cpu_s(gateway.pid) - gateway_cpu) / elapsed
    client_busy = (cpu_s(os.getpid()) - client_cpu) / elapsed
    result = {
        "established_acks_per_s": round(acked / elapsed),
        **({"established_ack_ms_p99": round(percentile([ms for pair in pairs for ms in pair.ack_ms], 0.99), 2)}
           if args.established_rate else {}),
        "gateway_cpu_busy": round(gateway_busy, 3),
        "gateway_cpu_system_share": round((cpu_times(gateway.pid)[1] - gateway_system) / max(1e-9, gateway_busy * elapsed), 3),
        "gateway_cpu_us_per_ack": round(gateway_busy * 1e6 * elapsed / max(1, acked), 1),
        "client_cpu_busy": round(client_busy, 3),  # this process: the established clients and the good one
        "good_client_handshakes": len(handshake_ms),
        "good_client_welcome_ms_p50": round(percentile(handshake_ms, 0.5), 2),
        "good_client_welcome_ms_p99": round(percentile(handshake_ms, 0.99), 2),
        "good_client_welcome_ms_max": round(max(handshake_ms), 2),
        "listen_queue_overflows": listen_overflows() - overflows,
    }
    if attacker is not None:
        result["attacker"] = json.loads(attacker.communicate(timeout=60)[0])
    return result


async def refusal_cost(connections: int = 2000) -> dict:
    """Microseconds per refusal: the admission decision, and the kernel's accept and reset."""
    import _socket

    from interlink.config import GatewayConfig
    from interlink.core.edge.server import GatewayProtocol
    from interlink.gateway import Gateway

    with tempfile.TemporaryDirectory(prefix="interlink-refusal-") as folder:
        config = GatewayConfig(port=0, data_dir=Path(folder), source_limits_on_loopback=True,
                               max_preauth_per_source=1, handshakes_per_s_per_source=0.1)
        async with Gateway(config) as gateway:
            server, address = gateway._server, (ATTACKER, 5555)
            server.accept(GatewayProtocol, address)  # takes its one slot: every later call refuses
            calls = 100_000
            began = time.perf_counter()
            for _ in range(calls):
                server.accept(GatewayProtocol, address)
            decision_us = (time.perf_counter() - began) / calls * 1e6
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(connections)
    listener.setblocking(False)
    clients = [open_from(ATTACKER, listener.getsockname()[1]) for _ in range(connections)]
    await asyncio.sleep(0.3)  # every connection is in the accept queue
    family, kind, taken = int(listener.family), int(listener.type), 0
    began = time.perf_counter()
    while True:
        try:
            fd, _ = listener._accept()
        except BlockingIOError:
            break
        reset(_socket.socket(family, kind, 0, fd))
        taken += 1
    accept_reset_us = (time.perf_counter() - began) / max(1, taken) * 1e6
    for sock in clients:
        sock.close()
    listener.close()
    return {"benchmark": "refusal-cost", "admission_decision_us": round(decision_us, 2),
            "accept_and_reset_us": round(accept_reset_us, 2), "connections_reset": taken}


def varz(admin_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/varz", timeout=5) as response:
        return json.loads(response.read())


async def run(args) -> dict:
    admin_port = free_port()
    with tempfile.TemporaryDirectory(prefix="interlink-flood-") as folder:
        async with DemoIssuer() as issuer:
            arguments = child_arguments(
                data_dir=Path(folder) / "lmdb", audience=AUDIENCE, providers={"bench": issuer.issuer},
                durability=args.durability, cpu=0, source_limits_on_loopback=True, admin_port=admin_port,
                max_preauth_connections=4096, **LIFTED_LIMITS)
            async with GatewayProcess(arguments, log_path=Path(folder) / "gateway.log") as gateway:
                pairs = [Pair(f"r{i}@bench", args.payload, open_loop=bool(args.established_rate))
                         for i in range(args.pairs)]
                for index, pair in enumerate(pairs):
                    pair.recipient = await connect(gateway, issuer, f"r{index}", ESTABLISHED,
                                                   on_stanza=pair.on_recipient_stanza, on_batch_end=pair.on_recipient_batch)
                    pair.sender = await connect(gateway, issuer, f"s{index}", ESTABLISHED, on_stanza=pair.on_sender_stanza)
                for pair in pairs:
                    for _ in range(0 if args.established_rate else args.inflight):
                        pair.sender.queue(pair.message())
                await asyncio.sleep(1.0)  # warm-up
                quiet = await phase(gateway, issuer, pairs, args, flooded=False)
                flooded = await phase(gateway, issuer, pairs, args, flooded=True)
                refusals = varz(admin_port)["source_refusals"]
                for pair in pairs:
                    await pair.sender.close()
                    await pair.recipient.close()
    return {
        "benchmark": "source-flood",
        "seconds": args.seconds, "pairs": args.pairs, "inflight": args.inflight, "durability": args.durability,
        "established_rate": args.established_rate or "closed loop",
        "quiet": quiet, "flooded": flooded, "gateway_source_refusals": refusals,
        "established_ratio": round(flooded["established_acks_per_s"] / quiet["established_acks_per_s"], 3),
        "implementation": interlink.core.IMPLEMENTATION, "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="each phase")
    parser.add_argument("--silent", type=int, default=10_000, help="connections the attacker opens and holds silent")
    parser.add_argument("--rate", type=float, default=5000.0, help="new attacker connections per second")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--inflight", type=int, default=16, help="closed loop: unacked messages per sender")
    parser.add_argument("--established-rate", type=float, default=0.0,
                        help="open loop instead: messages/s in total over the pairs (0: closed loop)")
    parser.add_argument("--payload", type=int, default=100)
    parser.add_argument("--durability", default="sync", choices=["sync", "async"])
    parser.add_argument("--refusal-cost", action="store_true", help="measure one refusal's cost instead")
    parser.add_argument("--attacker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    if args.attacker:
        print(json.dumps(attack(args.port, args.silent, args.rate, args.seconds)), flush=True)
        return
    print(json.dumps(uvloop.run(refusal_cost() if args.refusal_cost else run(args)), indent=2))


if __name__ == "__main__":
    main()
