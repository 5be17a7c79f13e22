"""A gateway process for the load benchmarks: pinned to CPU 0, one provider, prints its address.

Usage: _gateway_child.py ISSUER AUDIENCE DATA_DIR DURABILITY
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


def main() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    issuer, audience, data_dir, durability = sys.argv[1:5]
    uvloop.run(serve(issuer, audience, Path(data_dir), durability))


if __name__ == "__main__":
    main()
