"""Gateway-level benchmarks over real TCP: handshake + JWT rate and RSS per idle connection.

    python bench/gateway_load.py handshakes --seconds 10 --concurrency 32 --suite 1 --alg EdDSA
    python bench/gateway_load.py idle-rss --connections 10000

The gateway runs in a child process pinned to CPU 0 (``bench/_gateway_child.py``); this process
(the demo OpenID issuer and the clients) is pinned to CPU 1. Figures are taken from the child's
``/proc`` counters, so they measure the gateway alone:

* ``handshakes``: gateway CPU µs per completed handshake + authentication (Noise responder,
  node-certificate hello, JWT signature and claims check, session table, ``welcome``) and the
  rate that implies for one core. Devices reconnect (they are registered in a warm-up round),
  which is what a gateway sees most.
* ``idle-rss``: gateway RSS growth per authenticated idle connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import uvloop

import interlink.core
from interlink.client import Client, Suite
from interlink.issuer import DemoIssuer

HERE = Path(__file__).resolve().parent
AUDIENCE = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > cpu:
        os.sched_setaffinity(0, {cpu})


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found")


class GatewayChild:
    """The gateway in its own process, on CPU 0, configured for the issuer's provider."""

    def __init__(self, issuer: str, data_dir: Path, durability: str, *, bare: bool = False, commit_mode: str = "inline") -> None:
        self.args = [sys.executable, str(HERE / "_gateway_child.py")]
        self.args += ["--bare"] if bare else [issuer, AUDIENCE, str(data_dir), durability, commit_mode]
        self.proc: subprocess.Popen | None = None

    async def __aenter__(self):
        self.proc = await asyncio.create_subprocess_exec(*self.args, stdout=subprocess.PIPE)
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        ready = json.loads(line)
        self.port = ready["port"]
        self.root_public = bytes.fromhex(ready["root_public"])
        self.static_public = bytes.fromhex(ready["static_public"])
        return self

    async def __aexit__(self, *exc_info):
        self.proc.terminate()
        await self.proc.wait()

    @property
    def pid(self) -> int:
        return self.proc.pid


async def connect(gateway: GatewayChild, token: str, device: int, suite: Suite) -> Client:
    return await Client.connect(
        "127.0.0.1", gateway.port, token=token, device=device, root_public=gateway.root_public,
        suite=suite, server_static=gateway.static_public, timeout_s=30,
    )


async def bench_handshakes(args) -> dict:
    suite = Suite(args.suite)
    async with DemoIssuer() as issuer:
        async with GatewayChild(issuer.issuer, Path(args.data_dir), args.durability) as gateway:
            users = [f"user{i}" for i in range(args.concurrency)]
            tokens = {u: issuer.issue(u, audience=AUDIENCE, alg=args.alg, expires_in=3600) for u in users}
            # Warm-up: registers every device and fills the gateway's JWKS cache.
            for user in users:
                await (await connect(gateway, tokens[user], 1, suite)).close()
            done = 0
            deadline = time.monotonic() + args.seconds

            async def worker(user: str) -> None:
                nonlocal done
                while time.monotonic() < deadline:
                    client = await connect(gateway, tokens[user], 1, suite)
                    done += 1
                    await client.close()

            user_before, system_before = cpu_times(gateway.pid)
            started = time.monotonic()
            await asyncio.gather(*(worker(u) for u in users))
            elapsed = time.monotonic() - started
            user_after, system_after = cpu_times(gateway.pid)
            user, system = user_after - user_before, system_after - system_before
            cpu = user + system
    return {
        "benchmark": "handshake+auth",
        "suite": suite.name,
        "alg": args.alg,
        "handshakes": done,
        "wall_s": round(elapsed, 2),
        "achieved_per_s": round(done / elapsed),
        "gateway_cpu_s": round(cpu, 2),
        "gateway_user_s": round(user, 2),
        "gateway_system_s": round(system, 2),
        "gateway_cpu_us_per_handshake": round(cpu / done * 1e6, 1),
        "capacity_per_gateway_core_per_s": round(done / cpu) if cpu else None,
    }


async def bench_messages(args) -> dict:
    """Durable 1:1 messages through the gateway: senders keep ``--inflight`` messages outstanding
    each, recipients confirm every delivery (automatic recv). Gateway CPU per delivered message."""
    payload = os.urandom(args.payload)
    async with DemoIssuer() as issuer:
        async with GatewayChild(issuer.issuer, Path(args.data_dir), args.durability, commit_mode=args.commit_mode) as gateway:
            def token(user: str) -> str:
                return issuer.issue(user, audience=AUDIENCE, expires_in=3600)

            recipients = [await connect(gateway, token(f"r{i}"), 1, Suite.XX_CHACHAPOLY) for i in range(args.pairs)]
            senders = [await connect(gateway, token(f"s{i}"), 1, Suite.XX_CHACHAPOLY) for i in range(args.pairs)]
            delivered = 0
            latencies: list[float] = []

            async def drain(client: Client) -> None:
                nonlocal delivered
                async for stanza in client:
                    if stanza.get("t") == "dlv":
                        delivered += 1

            drains = [asyncio.ensure_future(drain(c)) for c in recipients]

            async def send(client: Client, to: str, deadline: float) -> int:
                slots = asyncio.Semaphore(args.inflight)
                pending: set = set()
                sent = 0

                async def one() -> None:
                    started = time.perf_counter()
                    try:
                        await client.send_message(to, {1: payload}, timeout_s=60)
                        latencies.append(time.perf_counter() - started)
                    finally:
                        slots.release()

                while time.monotonic() < deadline:
                    await slots.acquire()
                    task = asyncio.ensure_future(one())
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    sent += 1
                await asyncio.gather(*pending)
                return sent

            # Warm-up, then the measured run.
            await asyncio.gather(*(send(s, f"r{i}@bench", time.monotonic() + 1.0) for i, s in enumerate(senders)))
            latencies.clear()
            delivered_before = delivered
            user_before, system_before = cpu_times(gateway.pid)
            started = time.monotonic()
            sent = sum(await asyncio.gather(
                *(send(s, f"r{i}@bench", started + args.seconds) for i, s in enumerate(senders))
            ))
            for _ in range(200):  # let the last deliveries arrive
                if delivered - delivered_before >= sent:
                    break
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - started
            user_after, system_after = cpu_times(gateway.pid)
            count = delivered - delivered_before
            for task in drains:
                task.cancel()
            for client in senders + recipients:
                await client.close()
    latencies.sort()
    cpu = (user_after - user_before) + (system_after - system_before)
    return {
        "benchmark": "messages-1to1",
        "durability": args.durability,
        "commit_mode": args.commit_mode,
        "pairs": args.pairs,
        "inflight_per_sender": args.inflight,
        "payload_bytes": args.payload,
        "messages_acked": sent,
        "messages_delivered": count,
        "delivered_per_s": round(count / elapsed),
        "gateway_cpu_s": round(cpu, 2),
        "gateway_cpu_us_per_delivered_message": round(cpu / count * 1e6, 1) if count else None,
        "ack_latency_ms_p50": round(latencies[len(latencies) // 2] * 1e3, 2) if latencies else None,
        "ack_latency_ms_p99": round(latencies[int(len(latencies) * 0.99)] * 1e3, 2) if latencies else None,
    }


async def bench_bare_rss(args) -> dict:
    """The floor: RSS per idle TCP connection to a uvloop server that keeps no state."""
    _raise_fd_limit()
    async with GatewayChild("", Path(args.data_dir), args.durability, bare=True) as server:
        await asyncio.sleep(0.5)
        baseline = rss_bytes(server.pid)
        connections = []
        for start in range(0, args.connections, 500):
            connections += await asyncio.gather(
                *(asyncio.open_connection("127.0.0.1", server.port) for _ in range(min(500, args.connections - start)))
            )
        await asyncio.sleep(2.0)
        loaded = rss_bytes(server.pid)
        for _, writer in connections:
            writer.close()
    return {
        "benchmark": "bare-rss",
        "connections": len(connections),
        "rss_per_idle_connection_bytes": round((loaded - baseline) / len(connections)),
    }


async def bench_idle_rss(args) -> dict:
    _raise_fd_limit()
    if args.bare:
        return await bench_bare_rss(args)
    async with DemoIssuer() as issuer:
        async with GatewayChild(issuer.issuer, Path(args.data_dir), args.durability) as gateway:
            token_users = [f"idle{i}" for i in range(args.connections)]
            # Touch the code paths once so lazily created objects exist before the baseline.
            warm = await connect(gateway, issuer.issue("warm", audience=AUDIENCE, expires_in=3600), 1, Suite.XX_CHACHAPOLY)
            await warm.ping()
            await asyncio.sleep(0.5)
            baseline = rss_bytes(gateway.pid)
            clients = []
            batch = 200
            for start in range(0, len(token_users), batch):
                group = token_users[start : start + batch]
                clients += await asyncio.gather(
                    *(connect(gateway, issuer.issue(u, audience=AUDIENCE, expires_in=3600), 1, Suite.XX_CHACHAPOLY) for u in group)
                )
            # Idle sessions hibernate (free their cipher contexts) 10-20 s after they go quiet
            # with the default idle_release_s; measure the steady idle state.
            await asyncio.sleep(args.settle_s)
            loaded = rss_bytes(gateway.pid)
            for client in clients[:: max(1, len(clients) // 100)]:
                await client.ping()  # they are alive and served
            per_connection = (loaded - baseline) / len(clients)
            for start in range(0, len(clients), 500):
                await asyncio.gather(*(c.close() for c in clients[start : start + 500]))
    return {
        "benchmark": "idle-rss",
        "connections": len(clients),
        "gateway_rss_baseline_mib": round(baseline / 2**20, 1),
        "gateway_rss_loaded_mib": round(loaded / 2**20, 1),
        "rss_per_idle_connection_bytes": round(per_connection),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="gateway data folder (default: a temporary one)")
    parser.add_argument("--durability", default="sync", choices=["sync", "async"])
    sub = parser.add_subparsers(dest="command", required=True)
    hs = sub.add_parser("handshakes")
    hs.add_argument("--seconds", type=float, default=10.0)
    hs.add_argument("--concurrency", type=int, default=32)
    hs.add_argument("--suite", type=lambda s: int(s, 0), default=0x01)
    hs.add_argument("--alg", default="EdDSA", choices=["EdDSA", "ES256"])
    messages = sub.add_parser("messages")
    messages.add_argument("--seconds", type=float, default=10.0)
    messages.add_argument("--pairs", type=int, default=8, help="sender/recipient pairs (one device each)")
    messages.add_argument("--inflight", type=int, default=16, help="unacked messages per sender")
    messages.add_argument("--payload", type=int, default=100, help="ciphertext bytes per message")
    messages.add_argument("--commit-mode", default="inline", choices=["inline", "thread"])
    idle = sub.add_parser("idle-rss")
    idle.add_argument("--connections", type=int, default=10000)
    idle.add_argument("--bare", action="store_true", help="measure a stateless uvloop server instead (the floor)")
    idle.add_argument("--settle-s", type=float, default=22.0, help="quiet time before measuring (default: past two idle sweeps)")
    args = parser.parse_args()
    if args.data_dir is None:
        import tempfile

        args.data_dir = tempfile.mkdtemp(prefix="interlink-bench-")
    _pin(1)
    runner = {"handshakes": bench_handshakes, "idle-rss": bench_idle_rss, "messages": bench_messages}[args.command]
    result = uvloop.run(runner(args))
    result.update(
        implementation=interlink.core.IMPLEMENTATION,
        python=platform.python_version(),
        uvloop=uvloop.__version__,
        machine=f"{platform.machine()} {os.cpu_count()} cores",
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
