"""Typed, validated gateway settings.

Every invalid value raises ``ConfigError`` whose message names the key and what is wrong, so an
operator can fix the setting without reading code. (Loading from TOML arrives with the
operator surface; the names here are the future file's keys.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from interlink.core.errors import ConfigError

DEFAULT_PORT = 7450


@dataclass
class GatewayConfig:
    """Settings of one gateway node. Units are in the names."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port (tests, demo)
    data_dir: Path = Path("interlink-data")  # LMDB environment and operator keys
    node_name: str = "node-1"
    max_frame_bytes: int = 65535
    preauth_deadline_s: float = 5.0
    max_devices: int = 5
    max_group: int = 1024
    window: int = 64
    token_leeway_s: float = 60.0
    max_token_bytes: int = 8192
    jwks_ttl_s: float = 300.0
    jwks_min_refetch_interval_s: float = 30.0
    jwks_fetch_timeout_s: float = 5.0
    drain_timeout_s: float = 10.0
    max_mailbox_items: int = 10_000  # per device; more gets mailbox_full
    max_mailbox_bytes: int = 64 << 20  # per device
    mailbox_ttl_s: float = 30 * 86400.0  # undelivered items older than this are deleted
    message_rate_per_device: float = 500.0  # msg, rcpt and state per second per device session (burst 2 s)
    message_rate_per_user: float = 1000.0  # the same over all of a user's devices
    max_connections: int = 100_000
    max_preauth_connections: int = 4096  # connections not yet authenticated (handshake floods)
    idle_release_s: float = 10.0  # sessions quiet this long (up to twice) free their cipher contexts
    slow_consumer_s: float = 30.0  # a client that reads nothing this long (checked every idle_release_s) gets bye slow_consumer
    lmdb_map_size_bytes: int = 1 << 30
    durability: str = "sync"
    commit_mode: str = "inline"  # "inline": commit on the event loop; "thread": on one writer thread
    providers: list = field(default_factory=list)  # interlink.Provider entries

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
        _require(self.drain_timeout_s > 0, "drain_timeout_s", f"must be positive, got {self.drain_timeout_s}")
        _require(self.lmdb_map_size_bytes >= 1 << 20, "lmdb_map_size_bytes", "must be at least 1 MiB")
        _require(self.commit_mode in ("inline", "thread"), "commit_mode", f"must be 'inline' or 'thread', got {self.commit_mode!r}")
        _require(self.durability in ("sync", "async"), "durability", f"must be 'sync' or 'async', got {self.durability!r}")


_NUMBER_TYPES = {int: (int,), float: (int, float)}


def _check_type(config: GatewayConfig) -> None:
    for spec in fields(config):
        if spec.name in ("data_dir", "providers"):
            continue
        expected = type(spec.default)
        value = getattr(config, spec.name)
        allowed = _NUMBER_TYPES.get(expected, (expected,))
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise ConfigError(f"{spec.name}: expected {expected.__name__}, got {type(value).__name__} {value!r}")


def _require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {problem}")
