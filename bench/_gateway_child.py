"""A gateway process for the load benchmarks: pinned to CPU 0, one provider, prints its address.

Usage: _gateway_child.py ISSUER AUDIENCE DATA_DIR DURABILITY
       _gateway_child.py --bare     (a uvloop server whose protocol keeps no state: the floor)
Prints one JSON line {"port", "root_public", "static_public"} when listening; runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
from pathlib import Path

import uvloop

from interlink.config import GatewayConfig
from interlink.core.auth import Provider
from interlink.gateway import Gateway


async def serve(issuer: str, audience: str, data_dir: Path, durability: str) -> None:
    provider = Provider(id="bench", issuer=issuer, audience=audience, discovery=True, algorithms=("EdDSA", "ES256"))
    config = GatewayConfig(port=0, data_dir=data_dir, durability=durability, max_devices=5, providers=[provider])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Gateway(config) as gateway:
        print(
            json.dumps(
                {"port": gateway.port, "root_public": gateway.root_public.hex(), "static_public": gateway.static_public.hex()}
            ),
            flush=True,
        )
        await stop.wait()


class _BareProtocol(asyncio.BufferedProtocol):
    """Accepts and ignores: what one idle TCP connection costs uvloop and the kernel."""

    __slots__ = ("transport",)
    buffer = memoryview(bytearray(65536))

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int):
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        return None


async def serve_bare() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await loop.create_server(_BareProtocol, "127.0.0.1", 0)
    print(json.dumps({"port": server.sockets[0].getsockname()[1], "root_public": "", "static_public": ""}), flush=True)
    await stop.wait()


def main() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if sys.argv[1:] == ["--bare"]:
        uvloop.run(serve_bare())
        return
    issuer, audience, data_dir, durability = sys.argv[1:5]
    uvloop.run(serve(issuer, audience, Path(data_dir), durability))


if __name__ == "__main__":
    main()
