"""The gateway a load run drives: ``LocalGateway`` (a child process of its own, with one demo
OpenID issuer per provider in this process) or ``RemoteGateway`` (``--target``: one this tool did
not start, with the users' tokens from a file). Both answer the same questions: where it
listens, its keys, a user's token, the users' addresses, and its CPU and memory (zeros when
remote: not ours to read). ``open_gateway`` gives a run the one it asked for.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from interlink.config import GatewayConfig
from interlink.core.errors import ConfigError
from interlink.load.child import LIFTED_BLOB_LIMITS, LIFTED_LIMITS, GatewayProcess, child_arguments
from interlink.load.scenario import Scenario
from interlink.testing import DemoIssuer

__all__ = ["AUDIENCE", "LocalGateway", "RemoteGateway", "open_gateway"]

AUDIENCE = "interlink-load"
DEFAULT_WS_PATH = GatewayConfig().ws_path  # what the gateway serves unless configured otherwise


class LocalGateway(GatewayProcess):
    """A gateway in a child process with one demo OpenID issuer per provider (in this process),
    users' rate limits and mailbox quota lifted, and their blob rate and daily blob bytes too
    (``blob_kib_per_s_per_user``, when given, sets the blob rate instead). ``kill()`` SIGKILLs the
    child; ``start()`` again restarts it on the same data and port. ``max_frame``, when set before
    the start, lowers the gateway's frame maximum."""

    remote = False

    def __init__(self, providers: int, data_dir: Path, *, durability: str = "sync", devices: int = 1,
                 window: int | None = None, cpu: int | None = None, map_size_bytes: int = 4 << 30,
                 blob_kib_per_s_per_user: int | None = None, transport: str = "tcp") -> None:
        self.data_dir = Path(data_dir)
        super().__init__([], log_path=self.data_dir / "gateway.log")
        self.provider_ids = [f"p{chr(ord('a') + i)}" for i in range(providers)]
        self.host = "127.0.0.1"
        self.settings = {"durability": durability, "max_devices": max(5, devices), "window": window, "cpu": cpu,
                         "lmdb_map_size_bytes": map_size_bytes, **LIFTED_LIMITS, **LIFTED_BLOB_LIMITS}
        if blob_kib_per_s_per_user is not None:
            self.settings["blob_kib_per_s_per_user"] = blob_kib_per_s_per_user
        self.ws_path = None  # devices connect over TCP; a path: over WebSocket
        if transport == "ws":
            self.settings["ws_port"] = 0
            self.ws_path = DEFAULT_WS_PATH
        self.max_frame: int | None = None
        self.issuers: dict[str, DemoIssuer] = {}

    @property
    def client_port(self) -> int:
        """The port the simulated devices connect to (the WebSocket listener's with transport ws)."""
        return self.ws_port if self.ws_path is not None else self.port

    def token(self, localpart: str, provider_id: str) -> str:
        return self.issuers[provider_id].issue(localpart, audience=AUDIENCE, expires_in=24 * 3600)

    async def start(self) -> None:
        if not self.issuers:
            for pid in self.provider_ids:
                self.issuers[pid] = await DemoIssuer().start()
        self.arguments = child_arguments(
            data_dir=self.data_dir / "lmdb", audience=AUDIENCE, max_frame_bytes=self.max_frame,
            providers={pid: issuer.issuer for pid, issuer in self.issuers.items()}, **self.settings)
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        for issuer in self.issuers.values():
            await issuer.stop()
        self.issuers = {}

    def addresses(self, users: int) -> list[tuple[str, str]]:
        """(localpart, provider id) of each simulated user: alternating providers."""
        count = len(self.provider_ids)
        return [(f"u{i}", self.provider_ids[i % count]) for i in range(users)]


class RemoteGateway:
    """A gateway at ``host:port`` that this tool did not start (``--target``): the operator's
    root public key to check its certificate against (``--root-public HEX``), and the simulated
    users' tokens from a file (``--tokens FILE``), since minting tokens for a remote gateway would
    need an issuer it trusts. The file has one user a line, ``ADDRESS TOKEN`` (``localpart@provider``
    and its JWT, whitespace between; ``#`` starts a comment); users are taken in file order and
    paired (1st with 2nd, 3rd with 4th, ...). No server CPU or memory figures: they are not ours to
    read. Before the run every device connects once and takes what earlier runs left in its
    mailbox (``stale`` in the report), so the accounting covers this run's messages only."""

    remote = True

    def __init__(self, target: str, root_public_hex: str, tokens_path: Path) -> None:
        host, sep, port = target.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--target must be host:port, got {target!r}")
        self.host, self.port = host.strip("[]"), int(port)
        self.ws_path: str | None = None  # None: TCP; with transport ws, target is the gateway's ws_port
        self.client_port = self.port
        try:
            self.root_public = bytes.fromhex(root_public_hex)
        except ValueError:
            self.root_public = b""
        if len(self.root_public) != 32:
            raise ConfigError("--root-public must be the operator's root public key: 64 hex digits")
        self.static_public = None  # XX: the gateway proves its static key with its node certificate
        self.tokens: dict[str, str] = {}
        try:
            lines = Path(tokens_path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read the tokens file: {exc}") from exc
        for number, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2 or fields[0].count("@") != 1:
                raise ConfigError(f"{tokens_path}:{number}: expected 'localpart@provider TOKEN'")
            if fields[0] in self.tokens:
                raise ConfigError(f"{tokens_path}:{number}: {fields[0]} twice")
            self.tokens[fields[0]] = fields[1]
        if len(self.tokens) < 2:
            raise ConfigError(f"{tokens_path}: at least 2 users are needed (users talk in pairs)")
        self.provider_ids = sorted({address.split("@")[1] for address in self.tokens})
        self.issuers: dict = {}

    async def __aenter__(self) -> RemoteGateway:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def token(self, localpart: str, provider_id: str) -> str:
        return self.tokens[f"{localpart}@{provider_id}"]

    def addresses(self, users: int) -> list[tuple[str, str]]:
        if users > len(self.tokens):
            raise ConfigError(f"{users} users wanted, the tokens file has {len(self.tokens)} (users are rounded up to pairs)")
        return [tuple(address.split("@")) for address in list(self.tokens)[:users]]

    def cpu_s(self) -> tuple[float, float, float]:
        times = os.times()
        return 0.0, 0.0, times.user + times.system

    def memory_bytes(self) -> tuple[int, int]:
        return 0, 0


@contextlib.asynccontextmanager
async def open_gateway(scenario: Scenario, *, data_dir: Path | None, target: RemoteGateway | None, cpu: int | None,
                       max_frame: int | None = None) -> AsyncIterator[LocalGateway | RemoteGateway]:
    """``target``, or a ``LocalGateway`` for the scenario (in ``data_dir``, else a temporary
    folder removed afterwards), started and, at the end, stopped."""
    with tempfile.TemporaryDirectory(prefix="interlink-load-") as scratch:
        folder = Path(data_dir) if data_dir is not None else Path(scratch)
        gateway = target or LocalGateway(
            scenario.providers, folder, durability=scenario.durability, devices=scenario.devices,
            window=scenario.window, cpu=cpu, blob_kib_per_s_per_user=scenario.blob_kib_per_s_per_user,
            transport=scenario.transport,
        )
        if target is not None and scenario.transport == "ws" and target.ws_path is None:
            target.ws_path = DEFAULT_WS_PATH  # --target names the gateway's ws_port
        if not gateway.remote:
            gateway.max_frame = max_frame
        async with gateway:
            yield gateway
