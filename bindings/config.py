"""Typed, validated gateway settings, and their TOML file.

Every invalid value raises ``ConfigError`` whose message names the key and what is wrong, so an
operator can fix the setting without reading code. The file's keys are the field names of
``GatewayConfig`` at the top level, and one ``[[providers]]`` table per provider with the
fields of ``interlink.Provider``; ``INTERLINK_<KEY>`` environment variables override top-level
keys (``INTERLINK_PORT=7451``). ``default_config_toml()`` prints every key with its default.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from interlink.core.domain.auth import DEFAULT_LEEWAY_S, Provider
from interlink.core.domain.cluster import NODE_ID_RE, Membership, redact
from interlink.core.errors import ConfigError
from interlink.core.protocol.wire import MAX_TOKEN_BYTES, WIRE_MAX_FRAME_BYTES

DEFAULT_PORT = 7450


@dataclass(frozen=True)
class NodeAddress:
    """Where clients reach one node of a cluster: what ``bye redirect`` tells them."""

    host: str
    port: int
    ws: str | None = None  #: its WebSocket URL (``wss://b.chat.example/interlink``), when it serves one


@dataclass(frozen=True)
class ClusterConfig:
    """The ``[cluster]`` table: this node, every node of the cluster and the NATS servers joining
    them (docs/operations.md "Running a cluster"). Every node must list the same nodes, addresses
    and ``version``; a node whose list differs from a running node's refuses to start."""

    node: str  #: this node's id
    nodes: Mapping[str, NodeAddress]  #: every node's id -> where clients reach it
    version: int  #: the list's version: raise it with every change of ``nodes``
    nats: tuple[str, ...]  #: NATS server URLs (nats:// or tls://)
    request_timeout_s: float = 2.0  #: a node that has not answered a relayed stanza by then: overloaded
    nats_credentials: str = ""  #: a NATS .creds file (user JWT and NKey seed) for this node
    nats_ca_file: str = ""  #: CA bundle that signed the NATS servers' TLS certificates

    @property
    def membership(self) -> Membership:
        return Membership(self.nodes, self.version)

    @property
    def digest(self) -> str:
        """What nodes compare at start: the node ids, their addresses and the version."""
        import hashlib

        text = self.membership.digest + "".join(
            f"\x00{node}\x00{address.host}\x00{address.port}\x00{address.ws or ''}"
            for node, address in sorted(self.nodes.items())
        )
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class GatewayConfig:
    """Settings of one gateway node. Units are in the names."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port (tests, demo)
    data_dir: Path = Path("interlink-data")  # LMDB environment, blob files and operator keys
    node_name: str = "node-1"
    max_frame_bytes: int = WIRE_MAX_FRAME_BYTES  # the contract's largest frame
    preauth_deadline_s: float = 5.0
    max_devices: int = 5
    max_group: int = 1024
    window: int = 64
    token_leeway_s: float = DEFAULT_LEEWAY_S  # the contract's default clock skew
    max_token_bytes: int = MAX_TOKEN_BYTES
    jwks_ttl_s: float = 300.0
    jwks_min_refetch_interval_s: float = 30.0
    jwks_fetch_timeout_s: float = 5.0
    jwks_unknown_kid_gap_s: float = 2.0
    drain_timeout_s: float = 10.0
    max_mailbox_items: int = 10_000  # per device; more gets mailbox_full
    max_mailbox_bytes: int = 64 << 20  # per device
    mailbox_ttl_s: float = 30 * 86400.0  # undelivered items older than this are deleted
    message_rate_per_device: float = 500.0  # msg, rcpt and state per second per device session (burst 2 s)
    message_rate_per_user: float = 1000.0  # the same over all of a user's devices
    max_connections: int = 100_000
    max_preauth_connections: int = 4096  # connections not yet authenticated (handshake floods)
    max_preauth_per_source: int = 256  # the same, per IPv4 address or IPv6 /64
    handshakes_per_s_per_source: float = 200.0  # new connections per second per source (burst 2 s)
    handshake_budget_per_s: float = 2000.0  # new connections per second in all; quiet sources pass it
    source_limits_on_loopback: bool = False  # apply the three above to 127.0.0.0/8 and ::1 too
    overload_turn_messages: int = 1024  # messages one loop turn commits before heavy senders are paused (0: never)
    overload_refuse_after_s: float = 0.25  # turns over that budget this long: new msg beyond it get overloaded
    blob_max_bytes: int = 100 << 20  # largest blob (attachment) a blob.new may declare
    blob_open_uploads_per_user: int = 8  # unfinished uploads per user
    blob_daily_bytes_per_user: int = 4 << 30  # bytes of blobs a user may declare per UTC day
    blob_min_free_bytes: int = 1 << 30  # blob.new is refused (overloaded) when the disk would have less free
    blob_kib_per_s_per_user: int = 64 * 1024  # KiB of blob writes and reads per second per user (burst 2 s)
    blob_ttl_s: float = 30 * 86400.0  # a ready blob is deleted this long after it was completed
    blob_upload_ttl_s: float = 86400.0  # an unfinished upload is deleted this long after blob.new
    idle_release_s: float = 10.0  # sessions quiet this long (up to twice) free their cipher contexts
    slow_consumer_s: float = 30.0  # a client that reads nothing this long (checked every idle_release_s) gets bye slow_consumer
    lmdb_map_size_bytes: int = 1 << 30
    lmdb_writemap: bool = False  # faster commits; data.mdb then as large as the map (sparse)
    durability: str = "sync"
    commit_mode: str = "inline"  # "inline": commit on the event loop; "thread": on one writer thread
    ws_host: str = "127.0.0.1"
    ws_port: int = -1  # -1: no WebSocket listener; 0: any free port
    ws_path: str = "/interlink"
    ws_allowed_origins: tuple = ()  # Origin values browsers may connect from ("*": any); clients sending none always may
    tcp_trusted_proxies: tuple = ()  # CIDRs whose connections to port start with a PROXY v2 header
    ws_trusted_proxies: tuple = ()  # CIDRs whose X-Forwarded-For is believed on ws_port
    admin_host: str = "127.0.0.1"
    admin_port: int = -1  # -1: no admin endpoint; 0: any free port
    admin_token: str = ""  # bearer token for the admin endpoint's write operations ("" = writes off)
    providers: list = field(default_factory=list)  # interlink.Provider entries
    cluster: ClusterConfig | None = None  # [cluster]: this node is one of several joined through NATS

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.validate()

    def validate(self) -> None:
        _check_type(self)
        _require(1 <= len(self.host) <= 255, "host", "must be a host name or IP address")
        _require(0 <= self.port <= 65535, "port", f"must be 0..65535, got {self.port}")
        _require(bool(self.node_name) and len(self.node_name) <= 64, "node_name", "must be 1..64 characters")
        _require(256 <= self.max_token_bytes <= 8192, "max_token_bytes", f"must be 256..8192, got {self.max_token_bytes}")
        _require(
            self.max_token_bytes + 512 <= self.max_frame_bytes <= 65535,
            "max_frame_bytes",
            f"must be {self.max_token_bytes + 512}..65535 (max_token_bytes + 512, for the auth handshake message), "
            f"got {self.max_frame_bytes}",
        )
        _require(0 < self.preauth_deadline_s <= 60, "preauth_deadline_s", f"must be in (0, 60], got {self.preauth_deadline_s}")
        _require(1 <= self.max_devices <= 64, "max_devices", f"must be 1..64, got {self.max_devices}")
        _require(2 <= self.max_group <= 65536, "max_group", f"must be 2..65536, got {self.max_group}")
        _require(1 <= self.window <= 4096, "window", f"must be 1..4096, got {self.window}")
        _require(0 <= self.token_leeway_s <= 60, "token_leeway_s", f"must be 0..60 (the contract's maximum skew), got {self.token_leeway_s}")
        _require(300 <= self.jwks_ttl_s <= 600, "jwks_ttl_s", f"must be 300..600, got {self.jwks_ttl_s}")
        _require(self.jwks_min_refetch_interval_s >= 30, "jwks_min_refetch_interval_s", f"must be at least 30, got {self.jwks_min_refetch_interval_s}")
        _require(0 < self.jwks_fetch_timeout_s <= 5, "jwks_fetch_timeout_s", f"must be in (0, 5], got {self.jwks_fetch_timeout_s}")
        _require(0.5 <= self.jwks_unknown_kid_gap_s <= 10, "jwks_unknown_kid_gap_s", f"must be 0.5..10, got {self.jwks_unknown_kid_gap_s}")
        _require(0.1 <= self.slow_consumer_s <= 3600, "slow_consumer_s", f"must be 0.1..3600, got {self.slow_consumer_s}")
        _require(0.1 <= self.idle_release_s <= 3600, "idle_release_s", f"must be 0.1..3600, got {self.idle_release_s}")
        _require(1 <= self.max_mailbox_items <= 10_000_000, "max_mailbox_items", f"must be 1..10000000, got {self.max_mailbox_items}")
        _require(1 << 16 <= self.max_mailbox_bytes <= 1 << 40, "max_mailbox_bytes", f"must be 64 KiB..1 TiB, got {self.max_mailbox_bytes}")
        _require(60 <= self.mailbox_ttl_s <= 365 * 86400, "mailbox_ttl_s", f"must be 60 s..365 days, got {self.mailbox_ttl_s}")
        _require(0.1 <= self.message_rate_per_device <= 1e7, "message_rate_per_device", f"must be 0.1..1e7, got {self.message_rate_per_device}")
        _require(0.1 <= self.message_rate_per_user <= 1e7, "message_rate_per_user", f"must be 0.1..1e7, got {self.message_rate_per_user}")
        _require(1 <= self.max_connections <= 10_000_000, "max_connections", f"must be 1..10000000, got {self.max_connections}")
        _require(
            1 <= self.max_preauth_connections <= self.max_connections,
            "max_preauth_connections",
            f"must be 1..max_connections, got {self.max_preauth_connections}",
        )
        _require(1 <= self.max_preauth_per_source <= 10_000_000, "max_preauth_per_source",
                 f"must be 1..10000000, got {self.max_preauth_per_source}")
        _require(0.1 <= self.handshakes_per_s_per_source <= 1e6, "handshakes_per_s_per_source",
                 f"must be 0.1..1000000, got {self.handshakes_per_s_per_source}")
        _require(1 <= self.handshake_budget_per_s <= 1e7, "handshake_budget_per_s",
                 f"must be 1..10000000, got {self.handshake_budget_per_s}")
        _require(
            self.overload_turn_messages == 0 or 64 <= self.overload_turn_messages <= 1_000_000, "overload_turn_messages",
            f"must be 0 (admission control off) or 64..1000000, got {self.overload_turn_messages}",
        )
        _require(0 <= self.overload_refuse_after_s <= 60, "overload_refuse_after_s", f"must be 0..60, got {self.overload_refuse_after_s}")
        _require(1 <= self.blob_max_bytes <= 1 << 40, "blob_max_bytes", f"must be 1..1 TiB, got {self.blob_max_bytes}")
        _require(1 <= self.blob_open_uploads_per_user <= 1000, "blob_open_uploads_per_user",
                 f"must be 1..1000, got {self.blob_open_uploads_per_user}")
        _require(self.blob_max_bytes <= self.blob_daily_bytes_per_user <= 1 << 50, "blob_daily_bytes_per_user",
                 f"must be blob_max_bytes..1 PiB, got {self.blob_daily_bytes_per_user}")
        _require(0 <= self.blob_min_free_bytes <= 1 << 50, "blob_min_free_bytes", f"must be 0..1 PiB, got {self.blob_min_free_bytes}")
        _require(64 <= self.blob_kib_per_s_per_user <= 1 << 30, "blob_kib_per_s_per_user",
                 f"must be 64..2^30 (at least one chunk a second), got {self.blob_kib_per_s_per_user}")
        _require(60 <= self.blob_ttl_s <= 365 * 86400, "blob_ttl_s", f"must be 60 s..365 days, got {self.blob_ttl_s}")
        _require(60 <= self.blob_upload_ttl_s <= 30 * 86400, "blob_upload_ttl_s",
                 f"must be 60 s..30 days, got {self.blob_upload_ttl_s}")
        _require(self.drain_timeout_s > 0, "drain_timeout_s", f"must be positive, got {self.drain_timeout_s}")
        _require(self.lmdb_map_size_bytes >= 1 << 20, "lmdb_map_size_bytes", "must be at least 1 MiB")
        _require(self.commit_mode in ("inline", "thread"), "commit_mode", f"must be 'inline' or 'thread', got {self.commit_mode!r}")
        _require(self.durability in ("sync", "async"), "durability", f"must be 'sync' or 'async', got {self.durability!r}")
        _require(1 <= len(self.ws_host) <= 255, "ws_host", "must be a host name or IP address")
        _require(-1 <= self.ws_port <= 65535, "ws_port", f"must be -1 (off), 0 (any free port) or 1..65535, got {self.ws_port}")
        _require(
            self.ws_path.startswith("/") and len(self.ws_path) <= 256 and self.ws_path.isprintable()
            and " " not in self.ws_path and "?" not in self.ws_path and "#" not in self.ws_path,
            "ws_path", f"must be a URL path starting with '/' (no spaces, query or fragment, at most 256 characters), got {self.ws_path!r}",
        )
        for origin in self.ws_allowed_origins:
            _require(origin == "*" or _ORIGIN.fullmatch(origin) is not None, "ws_allowed_origins",
                     f"each entry must be '*' or an origin like 'https://chat.example' (scheme://host[:port], "
                     f"lower case, no path), got {origin!r}")
        for key in ("tcp_trusted_proxies", "ws_trusted_proxies"):
            for cidr in getattr(self, key):
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    raise ConfigError(f"{key}: {cidr!r} is not an IP address or CIDR network like 10.0.0.0/8 or 2001:db8::/32") from None
        _require(1 <= len(self.admin_host) <= 255, "admin_host", "must be a host name or IP address")
        _require(-1 <= self.admin_port <= 65535, "admin_port", f"must be -1 (off), 0 (any free port) or 1..65535, got {self.admin_port}")
        _require(
            self.admin_token == "" or len(self.admin_token) >= 16, "admin_token",
            "must be empty (write operations off) or at least 16 characters",
        )


_NUMBER_TYPES = {int: (int,), float: (int, float)}
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[a-z0-9.-]+(:[0-9]{1,5})?|[a-z][a-z0-9+.-]*://\[[0-9a-f:.]+\](:[0-9]{1,5})?")
# Keys whose value is a list of strings: an array in TOML, comma-separated in the environment.
LIST_KEYS = ("ws_allowed_origins", "tcp_trusted_proxies", "ws_trusted_proxies")


def _check_type(config: GatewayConfig) -> None:
    for spec in fields(config):
        if spec.name in ("data_dir", "providers", "cluster"):
            continue
        expected = type(spec.default)
        value = getattr(config, spec.name)
        allowed = _NUMBER_TYPES.get(expected, (expected,))
        if expected is tuple:
            if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
                raise ConfigError(f"{spec.name}: expected a list of strings, got {_describe(value)}")
            setattr(config, spec.name, tuple(value))
            continue
        if (isinstance(value, bool) and expected is not bool) or not isinstance(value, allowed):
            raise ConfigError(f"{spec.name}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
        # Every number is a limit or a duration; inf would pass a one-sided range check and bound nothing.
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{spec.name}: expected a finite number, got {value!r}")


def _require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {problem}")


# One line per key for ``interlink default-config`` (a test checks that every key has one).
OPTION_HELP = {
    "host": "address to listen on; 127.0.0.1 keeps the gateway local, 0.0.0.0 or :: serves the network",
    "port": "TCP port for clients (0: any free port)",
    "data_dir": "folder of the LMDB environment (lmdb/), the blob files (blobs/) and the operator keys (keys/); created if absent",
    "node_name": "this node's name, written in its certificate",
    "max_frame_bytes": "largest frame a client may send, announced in welcome (max_token_bytes + 512 .. 65535)",
    "preauth_deadline_s": "seconds a connection has to finish the handshake and authenticate",
    "max_devices": "devices per user (device_limit past it)",
    "max_group": "members per group",
    "window": "stored items pushed to one device session before it must recv",
    "token_leeway_s": "allowed clock skew when checking exp/nbf/iat of tokens (at most 60)",
    "max_token_bytes": "tokens longer than this are refused before parsing",
    "jwks_ttl_s": "how long fetched provider keys are used before a refresh (300..600)",
    "jwks_min_refetch_interval_s": "after a failed key fetch, and between refreshes when the TTL runs out, the issuer is not asked again for this long",
    "jwks_unknown_kid_gap_s": "a token naming a key id not cached waits for the next key fetch; those fetches start at least this far apart per provider (0.5..10; keep it well below preauth_deadline_s)",
    "jwks_fetch_timeout_s": "timeout of one key fetch from a provider",
    "drain_timeout_s": "on shutdown, how long sessions get to close after bye drain",
    "max_mailbox_items": "stored items per device (mailbox_full past it)",
    "max_mailbox_bytes": "stored bytes per device (mailbox_full past it)",
    "mailbox_ttl_s": "undelivered items older than this are deleted",
    "overload_turn_messages": "messages (msg, rcpt, changes; one more per 64 copies of a group message) one event-loop "
    "turn takes into its commit before the connections that added to it stop being read until it is written; "
    "0 turns admission control off",
    "overload_refuse_after_s": "seconds of turns over overload_turn_messages after which a msg beyond a turn's budget is "
    "answered overloaded with retry_after instead of stored",
    "message_rate_per_device": "msg, rcpt and state per second per device session (burst: 2 s worth)",
    "message_rate_per_user": "the same over all of a user's devices",
    "blob_max_bytes": "largest blob (encrypted attachment) a blob.new may declare (too_large past it)",
    "blob_open_uploads_per_user": "unfinished uploads a user may have (rate_limited past it)",
    "blob_daily_bytes_per_user": "bytes of blobs a user may declare per UTC day (rate_limited past it; counted in "
    "memory, so a restart resets it)",
    "blob_min_free_bytes": "free disk space under data_dir/blobs below which blob.new is answered overloaded",
    "blob_kib_per_s_per_user": "KiB of blob.write data and blob.read lengths per second per user (burst: 2 s worth)",
    "blob_ttl_s": "ready blobs are deleted this long after their upload completed",
    "blob_upload_ttl_s": "unfinished uploads are deleted this long after blob.new",
    "max_connections": "open connections (over it new ones are closed at once)",
    "max_preauth_connections": "connections still in handshake or authentication",
    "max_preauth_per_source": "connections still in handshake or authentication from one IPv4 address or IPv6 /64",
    "handshakes_per_s_per_source": "new connections per second from one IPv4 address or IPv6 /64 (burst: 2 s worth)",
    "handshake_budget_per_s": "new connections per second for the whole gateway (burst: 2 s worth); past it only addresses with few recent attempts get in",
    "source_limits_on_loopback": "apply the per-source limits to loopback clients too (off: a proxy on the same host, tests and load tools are not limited)",
    "idle_release_s": "sessions quiet this long free their cipher contexts (memory)",
    "slow_consumer_s": "a client that reads nothing this long gets bye slow_consumer",
    "lmdb_map_size_bytes": "largest size of the LMDB environment (overloaded past it)",
    "lmdb_writemap": "true: commits write pages into LMDB's shared map (5-13 % less CPU per message), and data.mdb is "
    "sized to lmdb_map_size_bytes as a sparse file (back it up with LMDB's copy, not cp); false: one pwrite per page",
    "durability": "sync: fsync every commit (survives power loss); async: benchmarks and disposable data",
    "commit_mode": "inline: commit on the event loop (faster here); thread: on one writer thread",
    "ws_host": "address of the WebSocket listener (browsers, web and desktop apps; docs/protocol.md §1)",
    "ws_port": "its port: -1 no WebSocket listener, 0 any free port",
    "ws_path": "the URL path WebSocket clients connect to (ws://host:ws_port/interlink)",
    "ws_allowed_origins": "Origin header values of web pages allowed to connect ('*': any); clients that send no Origin "
    "(apps, servers) always may",
    "tcp_trusted_proxies": "IP addresses or CIDRs of proxies (HAProxy, nginx stream, L4 balancers) whose connections to port "
    "must begin with a PROXY protocol v2 header; the address it names is the client's (limits, logs, /connz)",
    "ws_trusted_proxies": "IP addresses or CIDRs of HTTP proxies in front of ws_port whose X-Forwarded-For is believed",
    "admin_host": "address of the admin HTTP endpoint (/healthz, /readyz, /metrics, /varz, /connz)",
    "admin_port": "its port: -1 no endpoint, 0 any free port; 7451 is the usual choice for a service",
    "admin_token": "bearer token for its write operations (empty: writes refused); better set INTERLINK_ADMIN_TOKEN",
    "providers": "the providers whose users may connect: [[providers]] tables, see below",
    "cluster": "this node is one of several joined through NATS: a [cluster] table, see below",
}

ENV_PREFIX = "INTERLINK_"
# INTERLINK_* variables that are not configuration keys (build and test switches, the file path).
OTHER_ENV_VARIABLES = frozenset({"INTERLINK_CONFIG", "INTERLINK_ADMIN_URL", "INTERLINK_PURE", "INTERLINK_REQUIRE_NATIVE",
                                 "INTERLINK_CLUSTER_NODE"})
# One file for every node of a cluster: INTERLINK_CLUSTER_NODE names this node (cluster.node).
CLUSTER_NODE_VARIABLE = "INTERLINK_CLUSTER_NODE"
CLUSTER_KEYS = ("node", "nodes", "version", "nats", "request_timeout_s", "nats_credentials", "nats_ca_file")
PROVIDER_LIST_KEYS = ("algorithms", "default_accept")


def load_config(path: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """The settings in the TOML file at ``path`` (None: the defaults), then the ``INTERLINK_<KEY>``
    variables of ``environ`` (default: the process environment) on top."""
    data: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except OSError as exc:
            raise ConfigError(f"config file {os.fspath(path)}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {os.fspath(path)}: not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:  # tomllib.load decodes the bytes before parsing
            raise ConfigError(
                f"config file {os.fspath(path)}: not valid TOML: not UTF-8 (byte {exc.start}: {exc.reason})"
            ) from None
        except RecursionError:  # tomllib descends once per nested array or inline table
            raise ConfigError(f"config file {os.fspath(path)}: not valid TOML: nested too deeply") from None
    return config_from_mapping(data, environ=os.environ if environ is None else environ)


def config_from_mapping(data: Mapping, *, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Settings from parsed TOML (a mapping of top-level keys) and environment overrides."""
    known = {spec.name: spec for spec in fields(GatewayConfig)}
    values = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{key}: unknown key{_did_you_mean(key, known)}")
        values[key] = value
    for name, raw in (environ or {}).items():
        if not name.startswith(ENV_PREFIX) or name in OTHER_ENV_VARIABLES:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in known or key in ("providers", "cluster"):
            choices = {ENV_PREFIX + k.upper(): k for k in known if k not in ("providers", "cluster")}
            raise ConfigError(f"{name}: not a configuration variable{_did_you_mean(name, choices)}")
        values[key] = _from_environment(name, raw, known[key].default)
    if "data_dir" in values:
        if not isinstance(values["data_dir"], (str, Path)) or not str(values["data_dir"]):
            raise ConfigError(f"data_dir: expected a folder path (str), got {_describe(values['data_dir'])}")
        values["data_dir"] = Path(values["data_dir"])
    values["providers"] = providers_from_tables(values.get("providers", []))
    node_override = (environ or {}).get(CLUSTER_NODE_VARIABLE)
    if "cluster" in values or node_override is not None:
        values["cluster"] = cluster_from_table(values.get("cluster"), node_override)
    return GatewayConfig(**values)


def cluster_from_table(table, node_override: str | None = None) -> ClusterConfig:
    """The ``[cluster]`` table as a ``ClusterConfig`` (``node_override``: this node's id from
    ``INTERLINK_CLUSTER_NODE``); a mistake names ``cluster.key``."""
    if table is None:
        raise ConfigError(f"{CLUSTER_NODE_VARIABLE}: set, but the configuration has no [cluster] table")
    if not isinstance(table, dict):
        raise ConfigError(f"cluster: expected a [cluster] table, got {_describe(table)}")
    for key in table:
        if key not in CLUSTER_KEYS:
            raise ConfigError(f"cluster.{key}: unknown key{_did_you_mean(key, CLUSTER_KEYS)}")
    values = dict(table)
    if node_override is not None:
        values["node"] = node_override
    for key in ("node", "nodes", "version", "nats"):
        if key not in values:
            raise ConfigError(f"cluster.{key}: required")
    node, version, urls = values["node"], values["version"], values["nats"]
    if not isinstance(node, str) or NODE_ID_RE.fullmatch(node) is None:
        raise ConfigError(f"cluster.node: a node id (1-63 lower-case letters, digits and '-'), got {_describe(node)}")
    if type(version) is not int or not 1 <= version < 2**63:
        raise ConfigError(f"cluster.version: expected a positive integer, got {_describe(version)}")
    if not isinstance(urls, list) or not urls or not all(isinstance(url, str) for url in urls):
        raise ConfigError(f"cluster.nats: expected a list of NATS server URLs, got {_describe(urls)}")
    for url in urls:
        if _NATS_URL.fullmatch(url) is None:
            raise ConfigError(f"cluster.nats: {redact(url)!r} is not a NATS URL like nats://10.0.0.5:4222 or "
                              "tls://user:password@nats.example:4222 (a password without '/', '@' or spaces)")
    nodes = values["nodes"]
    if not isinstance(nodes, dict) or not nodes:
        raise ConfigError(f"cluster.nodes: expected a table of node id = \"host:port\", got {_describe(nodes)}")
    addresses = {}
    for node_id, entry in nodes.items():
        where = f"cluster.nodes.{node_id}"
        if NODE_ID_RE.fullmatch(node_id) is None:
            raise ConfigError(f"{where}: a node id is 1-63 lower-case letters, digits and '-', starting with a letter or digit")
        addresses[node_id] = _node_address(where, entry)
    if node not in addresses:
        raise ConfigError(f"cluster.node: {node!r} is not one of cluster.nodes ({', '.join(sorted(addresses))})")
    timeout = values.get("request_timeout_s", 2.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0.05 <= timeout <= 60:
        raise ConfigError(f"cluster.request_timeout_s: must be 0.05..60 seconds, got {_describe(timeout)}")
    for key in ("nats_credentials", "nats_ca_file"):
        if not isinstance(values.get(key, ""), str):
            raise ConfigError(f"cluster.{key}: expected a file path (str), got {_describe(values[key])}")
    return ClusterConfig(node=node, nodes=addresses, version=version, nats=tuple(urls), request_timeout_s=float(timeout),
                         nats_credentials=values.get("nats_credentials", ""), nats_ca_file=values.get("nats_ca_file", ""))


_NATS_URL = re.compile(r"(nats|tls)://([^/@\s]+@)?[A-Za-z0-9.\-\[\]:]+(:[0-9]{1,5})?")
_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):([0-9]{1,5})")


def _node_address(where: str, entry) -> NodeAddress:
    ws = None
    if isinstance(entry, dict):
        unknown = set(entry) - {"address", "ws"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key (a node has 'address' and 'ws')")
        ws = entry.get("ws")
        if ws is not None and (not isinstance(ws, str) or not re.fullmatch(r"wss?://[^\s]+", ws)):
            raise ConfigError(f"{where}.ws: expected a WebSocket URL like wss://b.chat.example/interlink, got {_describe(ws)}")
        entry = entry.get("address")
    match = _HOST_PORT.fullmatch(entry) if isinstance(entry, str) else None
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ConfigError(f"{where}: expected the address clients reach it at, \"host:port\" (port 1..65535), "
                          f"got {_describe(entry)}")
    return NodeAddress(match.group(1).strip("[]"), int(match.group(2)), ws)


def providers_from_tables(entries) -> list[Provider]:
    """``Provider`` values from ``[[providers]]`` tables (or JSON objects of the same keys); a
    mistake names ``providers[i].key``."""
    if not isinstance(entries, list):
        raise ConfigError(f"providers: expected [[providers]] tables, got {_describe(entries)}")
    known = {spec.name for spec in fields(Provider)}
    providers = []
    for index, entry in enumerate(entries):
        where = f"providers[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table, got {_describe(entry)}")
        for key in entry:
            if key not in known:
                raise ConfigError(f"{where}.{key}: unknown key{_did_you_mean(key, known)}")
        for key in ("id", "issuer", "audience"):
            if key not in entry:
                raise ConfigError(f"{where}.{key}: required")
        values = dict(entry)
        for key in PROVIDER_LIST_KEYS:
            if key in values:
                if not isinstance(values[key], list) or not all(isinstance(item, str) for item in values[key]):
                    raise ConfigError(f"{where}.{key}: expected a list of strings, got {_describe(values[key])}")
                values[key] = tuple(values[key])
        for key in ("discovery", "require_key_binding", "suspended"):
            if key in values and not isinstance(values[key], bool):
                raise ConfigError(f"{where}.{key}: expected true or false, got {_describe(values[key])}")
        if "jwks" in values and not isinstance(values["jwks"], dict):
            raise ConfigError(f"{where}.jwks: expected a table (a JWK Set), got {_describe(values['jwks'])}")
        providers.append(Provider(**values))
    ids = [provider.id for provider in providers]
    for provider_id in ids:
        if ids.count(provider_id) > 1:
            raise ConfigError(f"providers: id {provider_id!r} is used by more than one provider")
    return providers


def _from_environment(name: str, raw: str, default):
    if isinstance(default, tuple):
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    if isinstance(default, Path) or isinstance(default, str):
        return raw
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false"):
            raise ConfigError(f"{name}: expected true or false, got {raw!r}")
        return raw.lower() == "true"
    parse = int if isinstance(default, int) else float
    try:
        return parse(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected {parse.__name__}, got {raw!r}") from None


def _describe(value) -> str:
    kinds = {str: "a string", int: "an integer", float: "a float", bool: "a boolean", list: "an array", dict: "a table"}
    return f"{kinds.get(type(value), type(value).__name__)} {value!r}"[:120]


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def default_config_toml() -> str:
    """Every key with its default and what it does, as a TOML file that loads to the defaults."""
    defaults = GatewayConfig()
    lines = [
        "# Interlink gateway configuration. Every key is optional; each is shown with its default.",
        f"# {ENV_PREFIX}<KEY> environment variables override this file ({ENV_PREFIX}PORT=7451).",
        "",
    ]
    for spec in fields(GatewayConfig):
        if spec.name in ("providers", "cluster"):
            continue
        lines.append(f"# {OPTION_HELP[spec.name]}")
        lines.append(f"{spec.name} = {_toml_value(getattr(defaults, spec.name))}")
        lines.append("")
    lines += [
        f"# {OPTION_HELP['providers']}",
        "# [[providers]]",
        '# id = "alpha"                              # users are localpart@alpha',
        '# issuer = "https://id.alpha.example"       # the iss of its tokens',
        '# audience = "interlink"                    # the aud this gateway expects',
        "# discovery = true                          # keys via {issuer}/.well-known/openid-configuration",
        '# # jwks_uri = "https://id.alpha.example/jwks.json"   # or a JWKS URL instead of discovery',
        '# algorithms = ["EdDSA", "ES256"]',
        '# default_accept = []                       # other providers its users accept by default ("*": all)',
        "# require_key_binding = false               # tokens must carry cnf.x25519 = the client's Noise key",
        '# # push_url = "https://push.alpha.example/interlink"   # push webhooks for its offline devices (https)',
        "# push_timeout_s = 5.0                      # timeout of one webhook request",
        "# push_concurrency = 16                     # webhook requests to this provider at once",
        "",
    ]
    return "\n".join(lines)


# A TOML basic string may not hold the quote, the backslash or control characters unescaped.
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_value(value) -> str:
    if isinstance(value, (str, Path)):
        text = "".join(
            _TOML_ESCAPES.get(char) or (f"\\u{ord(char):04x}" if char < " " or char == "\x7f" else char)
            for char in str(value)
        )
        return '"' + text + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return repr(value)
