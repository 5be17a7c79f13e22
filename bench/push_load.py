"""Push webhooks per second from one gateway core: the sender (``core/edge/push.py``) against a
keep-alive HTTP receiver in another process.

    .venv/bin/python bench/push_load.py --intents 20000
    .venv/bin/python bench/push_load.py --intents 20000 --concurrency 64

This process is pinned to CPU 0 and plays the gateway's part: a real ``LmdbStore`` (``sync``
off, as the commits are not what is measured) holding ``--intents`` registered devices, each with
one item and its push intent (written by the group commit before the clock starts), and a
``PushDispatcher`` with the coalescing window at 0 that signs each body with a real push key
(``core/protocol/pushsig.py``) and POSTs it; the answered intents go back through group commits
of up to 256, as the gateway's router batches them. The receiver, pinned to CPU 1, is a minimal
HTTP/1.1 server that reads each body and answers 204 (a provider's own server verifies the
signature on its own cores; ``interlink push-receiver`` does, at a few thousand a second).

Figures: pushes per second (wall), this process's CPU seconds per push (user + system) and so
pushes per second per core, and the receiver's count (every push arrives once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import uvloop

import interlink.core
from interlink.core.domain.auth import Provider, ProviderRegistry
from interlink.core.domain.batch import WriteBatch, device_key
from interlink.core.edge.push import PushDispatcher
from interlink.testing import PushKeys, lmdb_store

ANSWERED_PER_COMMIT = 256


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > cpu:
        os.sched_setaffinity(0, {cpu})


class _Receiver(asyncio.Protocol):
    """Reads HTTP/1.1 requests with a Content-Length body; answers each 204, keep-alive."""

    count = None  # a shared multiprocessing.Value

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            length = 0
            for line in self.buffer[:head_end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            self.buffer = self.buffer[end:]
            _Receiver.count.value += 1
            self.transport.write(b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n")


def _receiver_main(port, count, ready) -> None:
    _pin(1)
    _Receiver.count = count

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(_Receiver, "127.0.0.1", 0)
        port.value = server.sockets[0].getsockname()[1]
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(serve())


async def run(args) -> dict:
    context = multiprocessing.get_context("spawn")
    port, count, ready = context.Value("i", 0), context.Value("q", 0), context.Event()
    receiver = context.Process(target=_receiver_main, args=(port, count, ready), daemon=True)
    receiver.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the receiver did not start")
        return await _measure(args, f"http://127.0.0.1:{port.value}/push", count)
    finally:
        receiver.kill()


async def _measure(args, url: str, received) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        store = lmdb_store(Path(folder) / "lmdb", sync=False, map_size_bytes=1 << 31)
        registry = ProviderRegistry([Provider(id="alpha", issuer="https://alpha.example", audience="bench",
                                              jwks_uri="https://alpha.example/jwks", push_url=url,
                                              push_concurrency=args.concurrency)])
        dkeys = [device_key(f"user{i}@alpha", 1) for i in range(args.intents)]
        created = []
        for start in range(0, len(dkeys), 1000):  # set-up, not timed: items and their intents
            batch = WriteBatch()
            for i, dkey in enumerate(dkeys[start:start + 1000], start):
                store.set_push_token(dkey, b"device-token-%d" % i)
                batch.add_message(device_key("sender@alpha", 1), i.to_bytes(16, "big"), 1_000,
                                  [(dkey, lambda seq, ts: b"x" * 100)])
                batch.push_wake.add(dkey)
            store.commit(batch)
            created += batch.push_created
        done = asyncio.Event()
        answered: list = []
        finished = [0]

        def commit_answered() -> None:
            batch = WriteBatch()
            batch.push_done.extend(answered)
            answered.clear()
            store.commit(batch)

        def on_answered(dkey, counter, again) -> None:
            answered.append((dkey, counter, again))
            finished[0] += 1
            if len(answered) >= ANSWERED_PER_COMMIT:
                commit_answered()
            if finished[0] == len(created):
                done.set()

        sender = PushDispatcher(store=store, registry=registry, answered=on_answered, forget=lambda dkey: None,
                                sign=PushKeys("bench").sign, coalesce_s=0.0)
        cpu_before, wall_before = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        sender.start()  # loads what is owed from the store, as after a restart
        await asyncio.wait_for(done.wait(), args.timeout_s)
        commit_answered()
        elapsed = time.perf_counter() - wall_before
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
        await asyncio.sleep(0.2)
        left = len(store.push_intents())
        await sender.close()
        store.close()
    pushes = len(created)
    return {
        "benchmark": "push-webhooks",
        "intents": pushes,
        "concurrency": args.concurrency,
        "seconds": round(elapsed, 3),
        "pushes_per_s": round(pushes / elapsed),
        "sender_cpu_s": round(cpu, 3),
        "sender_cpu_us_per_push": round(cpu / pushes * 1e6, 1),
        "pushes_per_s_per_core": round(pushes / cpu),
        "sender_cpu_busy": round(cpu / elapsed, 2),
        "received": received.value,
        "intents_left": left,
        "sent": sender.counters["sent"],
        "implementation": interlink.core.IMPLEMENTATION,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intents", type=int, default=20_000, help="devices owed one push each")
    parser.add_argument("--concurrency", type=int, default=16, help="the provider's push_concurrency")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args()
    _pin(0)
    print(json.dumps(uvloop.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
