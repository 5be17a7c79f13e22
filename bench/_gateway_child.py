"""A gateway process for the load benchmarks and the crash test; prints its address.

Usage: _gateway_child.py ISSUER AUDIENCE DATA_DIR DURABILITY
           (load benchmarks: pinned to CPU 0, one provider "bench")
       _gateway_child.py --bare     (a uvloop server whose protocol keeps no state: the floor)
       _gateway_child.py --data-dir DIR --audience AUD --provider ID=ISSUER [--provider ID=ISSUER ...]
                         [--port P] [--durability sync|async] [--window N] [--cpu N]
                         [--max-mailbox-items N] [--message-rate-per-device R] [--message-rate-per-user R]
                         [--max-group N] [--max-mailbox-bytes B] [--lmdb-map-size-bytes B] [--commit-mode M]
                         [--gc-threshold N]   (bench/group_load.py)
           (crash test, ``bench/crash.py``: several providers that accept each other's users; with
           the same DIR a restarted child keeps its LMDB data and operator keys (DIR/keys, made on
           the first start); with the same --port it listens where the previous one did, retrying
           for a few seconds while the address is still in use)
Prints one JSON line {"port", "root_public", "static_public", "pid"} when listening; runs until
SIGTERM (the crash test SIGKILLs it).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import resource
import signal
import sys
from pathlib import Path

import uvloop

from interlink.config import GatewayConfig
from interlink.core.auth import Provider
from interlink.core.errors import ConfigError
from interlink.gateway import Gateway

BIND_RETRY_S = 10.0  # how long a restarted child keeps trying a port that is still in use


async def serve(issuer: str, audience: str, data_dir: Path, durability: str, commit_mode: str = "inline") -> None:
    provider = Provider(id="bench", issuer=issuer, audience=audience, discovery=True, algorithms=("EdDSA", "ES256"))
    # A load generator is one user sending as fast as it can: lift the per-user message rates
    # (they refuse by design) so the benchmark measures the gateway, not its rate limiter.
    config = GatewayConfig(
        port=0, data_dir=data_dir, durability=durability, max_devices=5, providers=[provider],
        message_rate_per_device=1e7, message_rate_per_user=1e7, max_mailbox_items=10_000_000,
        commit_mode=commit_mode,
    )
    await _run(config)


async def _run(config: GatewayConfig, freeze: bool = False) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    gateway = await _start(config)
    if freeze:
        import gc

        gc.freeze()  # what exists at start-up is never scanned again
    try:
        print(
            json.dumps(
                {
                    "port": gateway.port,
                    "root_public": gateway.root_public.hex(),
                    "static_public": gateway.static_public.hex(),
                    "pid": os.getpid(),
                }
            ),
            flush=True,
        )
        await stop.wait()
    finally:
        await gateway.stop()


async def _start(config: GatewayConfig) -> Gateway:
    """Start the gateway; a fixed port still held (a killed predecessor's) is retried briefly."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BIND_RETRY_S
    while True:
        gateway = Gateway(config)
        try:
            await gateway.start()
            return gateway
        except ConfigError as exc:
            cause = exc.__cause__
            in_use = isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE
            if not in_use or config.port == 0 or loop.time() > deadline:
                raise
        await asyncio.sleep(0.05)


def _provider_argument(text: str) -> tuple[str, str]:
    provider_id, equals, issuer = text.partition("=")
    if not equals or not provider_id or not issuer:
        raise argparse.ArgumentTypeError(f"expected ID=ISSUER, got {text!r}")
    return provider_id, issuer


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when the process that started it dies (no orphaned gateways)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main_options(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="_gateway_child.py")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--audience", required=True)
    parser.add_argument("--provider", action="append", type=_provider_argument, required=True, metavar="ID=ISSUER")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--durability", default="sync", choices=["sync", "async"])
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--max-devices", type=int, default=5)
    parser.add_argument("--max-mailbox-items", type=int, default=None)
    parser.add_argument("--message-rate-per-device", type=float, default=None)
    parser.add_argument("--message-rate-per-user", type=float, default=None)
    parser.add_argument("--cpu", type=int, default=None, help="pin the gateway to this CPU")
    # bench/group_load.py: 1,000-member groups, mailboxes of offline members, a larger LMDB map.
    parser.add_argument("--max-group", type=int, default=None)
    parser.add_argument("--max-mailbox-bytes", type=int, default=None)
    parser.add_argument("--lmdb-map-size-bytes", type=int, default=None)
    parser.add_argument("--commit-mode", default=None, choices=["inline", "thread"])
    parser.add_argument(
        "--gc-threshold", type=int, default=None,
        help="experiment: the cyclic GC's generation-0 threshold, and gc.freeze() once listening",
    )
    args = parser.parse_args(argv)
    if args.gc_threshold is not None:
        import gc

        gc.set_threshold(args.gc_threshold, *gc.get_threshold()[1:])
    _die_with_parent()
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    ids = [provider_id for provider_id, _ in args.provider]
    providers = [
        # Every provider's users accept the users of every other provider here (consent default).
        Provider(
            id=provider_id, issuer=issuer, audience=args.audience, discovery=True,
            default_accept=tuple(other for other in ids if other != provider_id),
        )
        for provider_id, issuer in args.provider
    ]
    settings = {
        name: value
        for name in (
            "window", "max_mailbox_items", "message_rate_per_device", "message_rate_per_user", "max_group",
            "max_mailbox_bytes", "lmdb_map_size_bytes", "commit_mode",
        )
        if (value := getattr(args, name)) is not None
    }
    config = GatewayConfig(
        port=args.port, data_dir=args.data_dir, durability=args.durability, max_devices=args.max_devices,
        providers=providers, **settings,
    )
    uvloop.run(_run(config, freeze=args.gc_threshold is not None))


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
    if sys.argv[1:2] and sys.argv[1].startswith("--") and sys.argv[1] != "--bare":
        main_options(sys.argv[1:])
        return
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if sys.argv[1:] == ["--bare"]:
        uvloop.run(serve_bare())
        return
    issuer, audience, data_dir, durability = sys.argv[1:5]
    commit_mode = sys.argv[5] if len(sys.argv) > 5 else "inline"
    uvloop.run(serve(issuer, audience, Path(data_dir), durability, commit_mode))


if __name__ == "__main__":
    main()
