"""The servers the load tool and the gateway benchmarks run as child processes.

The child side: ``python -m interlink.load.child --data-dir DIR --audience AUD --provider
ID=ISSUER [--provider ...] [options]`` serves a gateway whose providers accept each other's users,
prints one JSON line ``{"port", "root_public", "static_public", "pid"}`` once listening, and runs
until SIGTERM; it dies with the process that started it. With the same ``--data-dir`` a restarted
child keeps its LMDB data and operator keys; with the same ``--port`` it listens where its
predecessor did, retrying while the address is still held. ``--cluster-config FILE`` makes it one
node of a cluster: the ``[cluster]`` table of that TOML file (docs/operations.md "Running a
cluster"), its ``node`` also the gateway's node name. ``--bare`` serves a uvloop server that
keeps no state (the floor of the memory benchmarks).

The parent side: ``ChildServer`` (start, always stop, pid, memory from ``/proc``) and
``GatewayProcess``, a gateway child that can be SIGKILLed and started again on the same data and
port; ``child_arguments`` turns keywords into the child's options.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import gc
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import uvloop

from interlink.config import GatewayConfig
from interlink.core.domain.auth import Provider
from interlink.core.errors import ConfigError
from interlink.gateway import Gateway
from interlink.load.procstat import schedstat_s, status_bytes

__all__ = ["LIFTED_BLOB_LIMITS", "LIFTED_LIMITS", "ChildServer", "GatewayProcess", "child_arguments", "main"]

START_TIMEOUT_S = 30.0  # the child's "listening" line
BIND_RETRY_S = 10.0  # how long a restarted child keeps trying a port that is still in use
# Limits that refuse messages by design (rate limits, the mailbox quota) are lifted: the load
# measures the gateway, and the crash test its durability, not its rate limiter.
LIFTED_LIMITS = {"message_rate_per_device": 1e7, "message_rate_per_user": 1e7, "max_mailbox_items": 10_000_000}
# Likewise the blob (attachment) limits a media run would otherwise hit: the per-user blob rate
# (64 MiB/s by default; a media scenario may set its own) and the bytes a user may declare a day.
LIFTED_BLOB_LIMITS = {"blob_kib_per_s_per_user": 1 << 30, "blob_daily_bytes_per_user": 1 << 50}
# The GatewayConfig keys the child takes as options (--max-group N, ...), besides the ones it needs.
SETTINGS = {
    "window": int, "max_devices": int, "max_mailbox_items": int, "message_rate_per_device": float,
    "message_rate_per_user": float, "max_group": int, "max_mailbox_bytes": int, "lmdb_map_size_bytes": int,
    "max_frame_bytes": int, "commit_mode": str, "overload_turn_messages": int, "overload_refuse_after_s": float,
    "lmdb_writemap": bool, "blob_min_free_bytes": int, "blob_kib_per_s_per_user": int, "blob_daily_bytes_per_user": int,
    "ws_port": int, "source_limits_on_loopback": bool, "max_preauth_per_source": int,
    "handshakes_per_s_per_source": float, "handshake_budget_per_s": float, "max_preauth_connections": int,
    "admin_port": int,
}


# ----------------------------------------------------------------------------- the child


def _provider_argument(text: str) -> tuple[str, str]:
    provider_id, equals, issuer = text.partition("=")
    if not equals or not provider_id or not issuer:
        raise argparse.ArgumentTypeError(f"expected ID=ISSUER, got {text!r}")
    return provider_id, issuer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m interlink.load.child", description=__doc__.splitlines()[0])
    parser.add_argument("--bare", action="store_true", help="a uvloop server that accepts and ignores: the floor")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--audience")
    parser.add_argument("--provider", action="append", type=_provider_argument, default=[], metavar="ID=ISSUER")
    parser.add_argument("--push-url", action="append", type=_provider_argument, default=[], metavar="ID=URL",
                        help="a provider's push webhook URL")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--durability", default="sync", choices=["sync", "async"])
    parser.add_argument("--cpu", type=int, default=None, help="pin the gateway to this CPU")
    parser.add_argument("--cluster-config", type=Path, default=None, metavar="FILE",
                        help="a TOML file whose [cluster] table makes this gateway one node of a cluster")
    parser.add_argument(
        "--gc-threshold", type=int, default=None,
        help="experiment: the cyclic GC's generation-0 threshold, and gc.freeze() once listening",
    )
    for name, kind in SETTINGS.items():
        if kind is bool:
            parser.add_argument("--" + name.replace("_", "-"), action="store_true", default=None)
        else:
            parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    _die_with_parent()
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a session is a socket: thousands of them
    if args.bare:
        uvloop.run(_serve_bare())
        return
    if args.data_dir is None or args.audience is None or not args.provider:
        parser.error("--data-dir, --audience and at least one --provider are needed (or --bare)")
    if args.gc_threshold is not None:
        gc.set_threshold(args.gc_threshold, *gc.get_threshold()[1:])
    ids = [provider_id for provider_id, _ in args.provider]
    push_urls = dict(args.push_url)
    providers = [
        # Every provider's users accept the users of every other provider here (consent default).
        Provider(id=provider_id, issuer=issuer, audience=args.audience, discovery=True,
                 default_accept=tuple(other for other in ids if other != provider_id),
                 push_url=push_urls.get(provider_id))
        for provider_id, issuer in args.provider
    ]
    settings = {name: value for name in SETTINGS if (value := getattr(args, name)) is not None}
    settings.setdefault("max_devices", 5)
    if args.cluster_config is not None:
        settings["cluster"] = _cluster_from_file(args.cluster_config)
        settings["node_name"] = settings["cluster"].node
    config = GatewayConfig(port=args.port, data_dir=args.data_dir, durability=args.durability, providers=providers,
                           **settings)
    uvloop.run(_serve(config, freeze=args.gc_threshold is not None))


def _cluster_from_file(path: Path):
    """The ``[cluster]`` table of the TOML file at ``path`` (``interlink.config.cluster_from_table``)."""
    import tomllib

    from interlink.config import cluster_from_table

    with open(path, "rb") as file:
        return cluster_from_table(tomllib.load(file).get("cluster"))


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when the process that started it dies (no orphaned gateways)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


async def _serve(config: GatewayConfig, freeze: bool) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    gateway = await _start(config)
    if freeze:
        gc.freeze()  # what exists at start-up is never scanned again
    try:
        ws_address = gateway.ws_address
        ready = {"port": gateway.port, "ws_port": ws_address[1] if ws_address else None,
                 "root_public": gateway.root_public.hex(),
                 "static_public": gateway.static_public.hex(), "pid": os.getpid()}
        print(json.dumps(ready), flush=True)
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


async def _serve_bare() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await loop.create_server(_BareProtocol, "127.0.0.1", 0)
    ready = {"port": server.sockets[0].getsockname()[1], "root_public": "", "static_public": "", "pid": os.getpid()}
    print(json.dumps(ready), flush=True)
    await stop.wait()


# ----------------------------------------------------------------------------- the parent


def child_arguments(*, providers: dict[str, str] | None = None, push_urls: dict[str, str] | None = None,
                    **options: object) -> list[str]:
    """The child's options from keywords: ``providers`` (id -> issuer URL) as ``--provider ID=URL``,
    ``push_urls`` (id -> webhook URL) as ``--push-url ID=URL``, ``max_group=1024`` as
    ``--max-group 1024``, ``bare=True`` as ``--bare``; None leaves one out."""
    arguments = [f"--provider={provider_id}={issuer}" for provider_id, issuer in (providers or {}).items()]
    arguments += [f"--push-url={provider_id}={url}" for provider_id, url in (push_urls or {}).items()]
    for name, value in options.items():
        option = "--" + name.replace("_", "-")
        if value is True:
            arguments.append(option)
        elif value is not None and value is not False:
            arguments += [option, str(value)]
    return arguments


class ChildServer:
    """A server run as a child process (the gateway, nats-server): an async context that starts it
    and always stops it, its pid, whether it runs, its memory from ``/proc``."""

    proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self):
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        await self._terminate(15)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def memory_bytes(self) -> tuple[int, int]:
        """(RSS, peak RSS) bytes of the child, zeros once it has ended."""
        if not self.alive:
            return 0, 0
        status = status_bytes(self.pid)
        return status.get("VmRSS", 0), status.get("VmHWM", 0)

    async def _terminate(self, timeout_s: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class GatewayProcess(ChildServer):
    """A gateway child started with ``arguments`` (``child_arguments``; the port is this object's):
    ``kill()`` SIGKILLs it, ``start()`` again restarts it on the same data and port with the same
    root key (or raises). ``cpu_s()`` sums the CPU of every child started so far (read just before
    each kill). Its stderr goes to ``log_path``; ``env`` replaces the environment."""

    def __init__(self, arguments: list[str], *, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.arguments = list(arguments)
        self.log_path = Path(log_path)
        self.env = env
        self.port = 0
        self.ws_port: int | None = None  # the WebSocket listener's, when the arguments open one
        self.root_public = b""
        self.static_public = b""
        self.starts = 0
        self.kills = 0
        self._cpu_base = (0.0, 0.0)
        self._stopping = False

    @property
    def alive(self) -> bool:
        """Running and not being stopped: a session that ends from the kill on was ended by us."""
        return not self._stopping and super().alive

    async def start(self) -> None:
        self._stopping = False
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        port = [] if "--bare" in self.arguments else ["--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            log.write(b"--- start %d\n" % (self.starts + 1))
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "interlink.load.child", *self.arguments, *port,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=self.env,
            )
        self.starts += 1
        try:
            ready = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT_S))
        except (TimeoutError, ValueError) as exc:
            await self._terminate(0)
            raise ConfigError(f"the gateway child did not start: {exc!r}; its log ends:\n{self.log_tail()}") from None
        root_public = bytes.fromhex(ready["root_public"])
        if self.root_public and root_public != self.root_public:
            await self._terminate(0)
            raise ConfigError("the restarted gateway has another operator root key: DATA_DIR/keys were not reused")
        if self.port and ready["port"] != self.port:
            await self._terminate(0)
            raise ConfigError(f"the restarted gateway listens on {ready['port']}, not {self.port}")
        self.port, self.root_public = ready["port"], root_public
        self.ws_port = ready.get("ws_port")
        self.static_public = bytes.fromhex(ready["static_public"])

    def cpu_s(self) -> tuple[float, float, float]:
        """(on CPU, run-queue wait) seconds of all the gateway children so far, and the CPU
        seconds of this (the load) process."""
        on_cpu, waiting = schedstat_s(self.pid) if self.alive else (0.0, 0.0)
        times = os.times()
        return self._cpu_base[0] + on_cpu, self._cpu_base[1] + waiting, times.user + times.system

    async def kill(self) -> None:
        """SIGKILL: no drain, no clean LMDB close, whatever was in flight is cut."""
        if not self.alive:
            return
        self._cpu_base = self.cpu_s()[:2]
        self._stopping = True
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self.kills += 1

    async def stop(self) -> None:
        self._stopping = True
        await self._terminate(15)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


if __name__ == "__main__":
    main()
