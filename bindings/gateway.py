"""``interlink.Gateway``: the operator's handle on one gateway node, embeddable in any asyncio loop.

The library installs no signal handlers and configures no logging; the command-line runner does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time


from interlink.config import GatewayConfig
from interlink.core.domain.auth import Provider, ProviderRegistry, TokenVerifier
from interlink.core.protocol.connection import ServerSettings
from interlink.core.errors import ConfigError, InterlinkError
from interlink.core.edge.jwks import JwksCache
from interlink.core.edge.keyfiles import (
    ROOT_PUBLIC_FILE,
    OperatorKeys,
    ensure_push_key,
    init_operator_keys,
    load_operator_keys,
)
from interlink.core.protocol.pushsig import PushSigner
from interlink.core.edge.server import GatewayServer, Limits
from interlink.core.domain.batch import device_key
from interlink.core.edge.blobfiles import BlobFileStore
from interlink.core.edge.lmdbstore import LmdbStore
from interlink.core.edge.lmdbstore.env import lock_data_dir
from interlink.core.edge.lmdbstore.mailboxes import check_item_frames
from interlink.core.edge.lmdbstore.move import check_node_list

log = logging.getLogger("interlink.gateway")

# Settings a running gateway takes from Gateway.reload (SIGHUP); the others need a restart.
RELOADABLE = frozenset({
    "max_devices", "max_connections", "max_preauth_connections", "max_preauth_per_source",
    "handshakes_per_s_per_source", "handshake_budget_per_s", "source_limits_on_loopback", "message_rate_per_device",
    "message_rate_per_user", "max_mailbox_items", "max_mailbox_bytes", "mailbox_ttl_s", "slow_consumer_s",
    "idle_release_s", "drain_timeout_s", "overload_turn_messages", "overload_refuse_after_s",
    "blob_max_bytes", "blob_open_uploads_per_user", "blob_daily_bytes_per_user", "blob_min_free_bytes",
    "blob_kib_per_s_per_user", "blob_ttl_s", "blob_upload_ttl_s",
})


class Gateway:
    """One gateway node: ``await start()``, ``await drain()``, ``await stop()``."""

    def __init__(self, config: GatewayConfig | None = None, *, keys: OperatorKeys | None = None) -> None:
        self.config = config if config is not None else GatewayConfig()
        self._keys = keys
        self.registry = ProviderRegistry()
        for provider in self.config.providers:
            self.registry.add(provider)
        self._jwks: JwksCache | None = None
        self._store: LmdbStore | None = None
        self._lock: int | None = None  # the data folder's lock (core/edge/lmdbstore/env.py lock_data_dir)
        self._server: GatewayServer | None = None
        self._admin = None  # interlink.admin.AdminServer when admin_port >= 0
        self._draining = False
        self._drain_lock = asyncio.Lock()  # the gateway's own drain (a twin) and its owner's in turn
        self._failure: str | None = None  # why it stopped by itself (GatewayServer.stand_down)
        self._failed = asyncio.Event()
        self._failed_loop: asyncio.AbstractEventLoop | None = None  # the loop _failed was made for
        self._failure_watch: asyncio.Task | None = None

    # -- lifecycle

    async def start(self) -> None:
        if self._server is not None:
            raise InterlinkError("gateway already started")
        config = self.config
        if self._keys is None:
            self._keys = _load_or_create_keys(config)
        if self._keys.push_private is None and any(p.push_url for p in self.registry):
            self._keys = ensure_push_key(self._keys.folder)  # a key folder made before push webhooks
        push_sign = None
        if self._keys.push_private is not None:
            push_sign = PushSigner(self._keys.push_private, self._keys.push_certificate)
        self._lock = lock_data_dir(config.data_dir)  # one process per data folder (ConfigError otherwise)
        self._store = LmdbStore(
            config.data_dir / "lmdb",
            map_size_bytes=config.lmdb_map_size_bytes,
            sync=config.durability == "sync",
            writemap=config.lmdb_writemap,
            max_mailbox_items=config.max_mailbox_items,
            max_mailbox_bytes=config.max_mailbox_bytes,
        )
        try:  # items stored under a larger max_frame_bytes could never be pushed under this one
            check_item_frames(self._store.mailboxes, config.max_frame_bytes)
        except BaseException:
            await self._release()
            raise
        self._jwks = JwksCache(
            ttl_s=config.jwks_ttl_s,
            min_refetch_interval_s=config.jwks_min_refetch_interval_s,
            fetch_timeout_s=config.jwks_fetch_timeout_s,
            unknown_kid_gap_s=config.jwks_unknown_kid_gap_s,
        )
        verifier = TokenVerifier(
            self.registry, self._jwks, max_token_bytes=config.max_token_bytes, leeway_s=config.token_leeway_s
        )
        settings = ServerSettings(
            static_private=self._keys.static_private,
            certificate=self._keys.certificate,
            node=config.node_name,
            max_frame_bytes=config.max_frame_bytes,
            preauth_deadline_s=config.preauth_deadline_s,
        )
        # Every limit is a config key of the same name.
        limits = Limits.from_config(config)
        self._server = GatewayServer(
            settings=settings,
            registry=self.registry,
            verifier=verifier,
            store=self._store,
            limits=limits,
            idle_release_s=config.idle_release_s,
            mailbox_ttl_s=config.mailbox_ttl_s,
            slow_consumer_s=config.slow_consumer_s,
            commit_in_thread=config.commit_mode == "thread",
            blob_files=BlobFileStore(config.data_dir / "blobs"),
            push_sign=push_sign,
            tcp_trusted_proxies=config.tcp_trusted_proxies,
            ws_trusted_proxies=config.ws_trusted_proxies,
            ws_path=config.ws_path,
            ws_allowed_origins=config.ws_allowed_origins,
            cluster=config.cluster,
        )
        if config.cluster is not None:
            try:
                # Data of users or groups another node is home to under this list would be stranded.
                check_node_list(self._store, self._store.node_list, config.cluster.membership, config.cluster.node)
                await self._server.start_cluster(software=_software_version())
            except BaseException:
                await self._release()
                raise
        try:
            await self._server.start(config.host, config.port)
        except OSError as exc:
            await self._release()
            raise ConfigError(f"port: cannot listen on {config.host}:{config.port}: {exc.strerror}") from exc
        if config.ws_port >= 0:
            try:
                await self._server.start_websocket(config.ws_host, config.ws_port)
            except OSError as exc:
                await self.stop()
                raise ConfigError(f"ws_port: cannot listen on {config.ws_host}:{config.ws_port}: {exc.strerror}") from exc
        if config.admin_port >= 0:
            from interlink.admin import AdminServer

            self._admin = AdminServer(self, config.admin_host, config.admin_port, config.admin_token)
            try:
                await self._admin.start()
            except ConfigError:
                self._admin = None
                await self.stop()
                raise
        self._failure = None
        loop = asyncio.get_running_loop()
        if self._failed_loop is None or self._failed_loop is loop:
            self._failed.clear()  # the same event: a wait_failed() begun before a restart hears this run's
        else:  # an event waits on one loop only: an embedding program may run the gateway on another
            self._failed = asyncio.Event()
        self._failed_loop = loop
        self._failure_watch = loop.create_task(self._drain_when_failed(self._server))
        log.info("gateway %s listening on %s%s", config.node_name, self.address,
                 f" and {self.ws_url}" if config.ws_port >= 0 else "")
        expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self._keys.certificate.expires))
        log.info("node certificate of %s valid until %s", self._keys.certificate.node, expires)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop accepting connections, send ``bye drain`` to every session, wait for them to close.
        A second drain meanwhile (the gateway's own, when it stands down) waits for the first."""
        async with self._drain_lock:
            if self._server is not None:
                self._draining = True  # /readyz answers 503 from now on
                await self._server.drain(self.config.drain_timeout_s if timeout_s is None else timeout_s)
            await self._release()

    async def stop(self) -> None:
        """Drain with a short timeout and release every resource."""
        await self.drain(timeout_s=min(1.0, self.config.drain_timeout_s))

    async def _release(self) -> None:
        watch, self._failure_watch = self._failure_watch, None
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
        server, self._server = self._server, None
        if server is not None and server.cluster is not None:  # started, then failed to listen
            await server.cluster.close()
            server.cluster = None
        if self._admin is not None:
            await self._admin.stop()
            self._admin = None
        self._draining = False
        if self._jwks is not None:
            await self._jwks.close()
            self._jwks = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._lock is not None:
            os.close(self._lock)  # the data folder is free for another gateway or a data move
            self._lock = None

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def failure(self) -> str | None:
        """Why this gateway stopped (or is stopping) though nobody asked it to, or None. In a
        cluster: another process with this node id that started earlier serves it (this one was
        started while that one was cut off from NATS). The gateway drains itself then."""
        return self._failure

    async def wait_failed(self) -> str:
        """Wait until this gateway stopped by itself (``failure``), drained and released."""
        await self._failed.wait()
        return self._failure or ""

    async def _drain_when_failed(self, server: GatewayServer) -> None:
        await server.failed.wait()
        self._failure = server.failure
        log.critical("gateway stopping by itself: %s", server.failure)
        try:
            await self.drain()
        finally:
            self._failed.set()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the admin endpoint, or None when it is off."""
        return (self._admin.host, self._admin.port) if self._admin is not None else None

    # -- addresses and identity

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` actually bound (the port is chosen by the OS when configured as 0)."""
        return self._running().addresses[0][:2]

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def ws_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the WebSocket listener, or None when it is off (``ws_port = -1``)."""
        addresses = self._running().websocket_addresses
        return addresses[0][:2] if addresses else None

    @property
    def ws_url(self) -> str | None:
        """``ws://host:port/path`` of the WebSocket listener, or None when it is off."""
        address = self.ws_address
        if address is None:
            return None
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        return f"ws://{host}:{address[1]}{self.config.ws_path}"

    @property
    def keys(self) -> OperatorKeys:
        if self._keys is None:
            raise InterlinkError("gateway keys are loaded by start()")
        return self._keys

    @property
    def root_public(self) -> bytes:
        """The operator root key clients pin."""
        return self.keys.root_public

    @property
    def static_public(self) -> bytes:
        """The node's Noise static key, for clients that connect with IK."""
        return self.keys.static_public

    # -- providers at run time

    def add_provider(self, provider: Provider) -> None:
        self.registry.add(provider)

    def list_providers(self) -> list[Provider]:
        return self.registry.list()

    def suspend_provider(self, provider_id: str) -> int:
        """Suspend a provider: its users' sessions end with ``bye suspended`` at once; returns how many."""
        if self._server is None:
            self.registry.suspend(provider_id)
            return 0
        return self._server.suspend_provider(provider_id)

    def kick(self, user: str, device: int | None = None) -> int:
        """End the sessions of ``user`` (only ``device``'s, if given) with ``bye suspended``;
        returns how many ended. Their mailboxes stay, and they may connect again."""
        return self._running().end_sessions(user, device)

    def resume_provider(self, provider_id: str) -> None:
        self.registry.resume(provider_id)

    async def reload(self, config: GatewayConfig) -> dict:
        """Apply a new configuration to the running gateway: its providers (``reload_providers``)
        and the limits a running gateway can change (``RELOADABLE``). Settings that need a restart
        (addresses, data folder, durability, frame size, ...) keep their running values and are
        listed under ``restart_needed``. Returns ``{"providers", "applied", "restart_needed"}``."""
        providers = self.reload_providers(config.providers)
        running = self.config
        changed = [
            spec.name for spec in dataclasses.fields(GatewayConfig)
            if spec.name != "providers" and getattr(config, spec.name) != getattr(running, spec.name)
        ]
        applied = [name for name in changed if name in RELOADABLE]
        restart_needed = [name for name in changed if name not in RELOADABLE]
        values = {name: getattr(config, name) for name in applied}
        if self._server is not None and values:
            self._server.apply_settings(**{k: v for k, v in values.items() if k != "drain_timeout_s"})
        self.config = dataclasses.replace(running, providers=list(config.providers), **values)
        if restart_needed:
            log.warning("reload: %s take effect at the next start", ", ".join(restart_needed))
        return {"providers": providers, "applied": applied, "restart_needed": restart_needed}

    def reload_providers(self, providers: list[Provider]) -> dict[str, list[str]]:
        """Make the registered providers exactly ``providers`` (the runner calls this on SIGHUP
        with the re-read file): new ones are added, changed ones replaced, absent ones removed
        after their sessions end with ``bye suspended`` (as do the sessions of a provider now
        marked suspended). The new set is checked whole first (duplicate ids or issuers: ``ConfigError``
        and nothing changes); moving an issuer from one kept provider to another takes two reloads."""
        ProviderRegistry(providers)  # duplicate ids or issuers raise before anything is touched
        wanted = {provider.id: provider for provider in providers}
        changes: dict[str, list[str]] = {"added": [], "updated": [], "removed": []}
        for old in self.registry.list():
            if old.id not in wanted:
                self.suspend_provider(old.id)
                self.registry.remove(old.id)
                changes["removed"].append(old.id)
        for provider in providers:
            old = self.registry.get(provider.id)
            if old == provider:
                continue
            if old is None:
                self.registry.add(provider)
                changes["added"].append(provider.id)
            else:
                self.registry.replace(provider)
                changes["updated"].append(provider.id)
            if provider.suspended and (old is None or not old.suspended):
                self.suspend_provider(provider.id)
        return changes

    # -- mailboxes and reports

    def purge_expired(self) -> int:
        """Delete every undelivered item older than ``mailbox_ttl_s`` now (the background sweep
        does the same a chunk at a time); returns how many."""
        return self._running().sweeps.purge_expired(int((time.time() - self.config.mailbox_ttl_s) * 1000))

    def reports(self, after: int = 0, limit: int = 100, *, unresolved: bool = False) -> list[dict]:
        """Abuse reports users filed (``report`` operation), oldest first, numbered above ``after``:
        reporter, device, user, ids, reason, evidence (bytes the reporter chose to reveal), ts (ms),
        and ``resolution`` once resolved."""
        return [{"report": number, **record} for number, record in self._running().store.reports(after, limit, unresolved=unresolved)]

    def resolve_report(self, number: int, action: str, note: str = "") -> None:
        """Record the operator's decision on a report; ``InterlinkError`` if there is no such report."""
        if not isinstance(action, str) or not 1 <= len(action) <= 64:
            raise ConfigError("action: a short word such as 'dismissed' or 'user-suspended' (1..64 characters)")
        if not isinstance(note, str) or len(note) > 4096:
            raise ConfigError("note: at most 4096 characters")
        resolution = {"action": action, "note": note, "ts": int(time.time() * 1000)}
        if not self._running().store.resolve_report(number, resolution):
            raise InterlinkError(f"no report {number}")

    # -- observation

    def sessions(self) -> list[dict]:
        return self._running().session_list()

    def mailbox_stats(self, user: str) -> dict[int, dict]:
        """Per device of ``user``: items and bytes waiting in its mailbox, and the last seq given.
        A ``recv``'s deletion shows up to 5 ms late (it waits to share the next commit)."""
        store = self._running().store
        result = {}
        for device in store.devices(user):
            state = store.mailbox_state(device_key(user, device))
            result[device] = {"items": state.items, "bytes": state.bytes, "last_seq": state.last_seq}
        return result

    def stats(self) -> dict:
        stats = self._running().stats()
        assert self._jwks is not None
        stats["jwks"] = {provider_id: dataclasses.asdict(fetches) for provider_id, fetches in self._jwks.all_stats().items()}
        return stats

    def _running(self) -> GatewayServer:
        if self._server is None:
            raise InterlinkError("gateway is not running")
        return self._server


def _software_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("interlink")
    except metadata.PackageNotFoundError:  # run from a checkout without an install
        return "unknown"


def _load_or_create_keys(config: GatewayConfig) -> OperatorKeys:
    folder = config.data_dir / "keys"
    if not (folder / ROOT_PUBLIC_FILE).exists():
        log.warning("no operator keys under %s: generating a new root key and node certificate", folder)
        return init_operator_keys(folder, config.node_name)
    return load_operator_keys(folder)


__all__ = ["Gateway"]
