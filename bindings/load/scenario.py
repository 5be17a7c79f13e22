"""Scenarios of ``interlink load``: a TOML file's keys (the fields of ``Scenario``), overridden by
command-line options, checked against the kind they are for.

The files ship as package data (``interlink/load/scenarios/*.toml``); ``find_scenario`` takes a
name among them or a path. A key the scenario's kind does not use (``KIND_KEYS``) is refused when
given, rather than dropped.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from interlink.core.errors import ConfigError
from interlink.load.e2ee import PLAINTEXT_HEADER as E2EE_PLAINTEXT_HEADER
from interlink.load.schedule import TIME_BYTES

__all__ = ["KINDS", "KIND_KEYS", "STRESS_KINDS", "Scenario", "find_scenario", "load_scenario", "make_scenario",
           "parse_rate"]

KINDS = ("chat", "offline-drain", "group", "churn", "handshake-storm", "malformed-mix", "media")
STRESS_KINDS = ("churn", "handshake-storm", "malformed-mix")  # run by interlink.load.stress
MAX_GROUP = 1024  # the gateway's default limits.max_group
MAX_MEDIA_CLIENTS = 1000  # media: uploaders, and downloaders, each
MAX_MEDIA_BLOB_MIB = 1024.0  # media: held in memory once; the gateway's blob_max may be lower (checked at connect)
SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"  # package data: a wheel, or bindings/load of a checkout

# The keys every kind uses (``e2ee`` too: false is what the non-chat kinds do, and true is
# refused with its own message where it is not supported), then the keys each kind uses besides.
# A key the kind ignores may not be given (in the file or as an option): it would be dropped.
COMMON_KEYS = frozenset({"name", "kind", "description", "providers", "duration", "durability", "window", "e2ee"})
KIND_KEYS = {
    "chat": frozenset({"users", "devices", "rate", "inflight", "payload", "warmup", "transport"}),
    "offline-drain": frozenset({"users", "devices", "rate", "inflight", "payload", "messages", "transport"}),
    "group": frozenset({"members", "devices", "senders", "offline", "rate", "inflight", "payload", "warmup", "e2ee_verify"}),
    "churn": frozenset({"users", "devices", "connect_rate", "keep_fraction", "churn_messages", "payload"}),
    "handshake-storm": frozenset({"users", "connect_rate", "inflight", "keep_fraction"}),
    "malformed-mix": frozenset({"users", "devices", "rate", "inflight", "payload", "warmup", "malformed_share"}),
    "media": frozenset({"users", "devices", "rate", "inflight", "payload", "warmup", "media_uploaders",
                        "media_downloaders", "media_blob_mib", "media_only", "blob_kib_per_s_per_user"}),
}


@dataclass
class Scenario:
    """One load scenario: a TOML file's keys, overridden by command-line options. A key its kind
    does not use (``KIND_KEYS``) is refused when given, rather than dropped."""

    given_keys: ClassVar[frozenset[str]] = frozenset()
    """The keys set in the file or as overrides (``make_scenario`` sets it on the instance; not a
    field, so neither a TOML key nor in the report): only these are checked against the kind."""

    name: str = "chat-1to1"
    kind: str = "chat"
    """One of ``KINDS``."""
    description: str = ""
    providers: int = 2
    """Demo OpenID providers; users alternate between them."""
    users: int = 8
    """Simulated users (rounded up to an even number: users talk in pairs)."""
    devices: int = 1
    """Devices (sessions) per user; a message carries one ciphertext per recipient device."""
    rate: float | None = None
    """Messages per second in total, open loop; None (``"max"`` in TOML) = closed loop."""
    inflight: int = 16
    """Closed loop: unanswered messages per sending device."""
    payload: int = 100
    """Ciphertext bytes per recipient device (at least 8: the intended send time); with ``e2ee``,
    plaintext bytes per message (at least 24: the send time and the message id)."""
    duration: float = 5.0
    """Seconds of sending (offline-drain: at most this long)."""
    warmup: float = 1.0
    """Seconds at the start not counted in throughput, latency and server CPU (chat)."""
    messages: int = 10_000
    """offline-drain: messages stored in total."""
    durability: str = "sync"
    """The local gateway's LMDB durability: ``sync`` or ``async``."""
    window: int | None = None
    """The local gateway's push window (None: its default)."""
    members: int = 100
    """group: members of the one group (users; 2..1024)."""
    senders: int = 2
    """group: members that post (their device 1), the first ones."""
    offline: float = 0.0
    """group: fraction of the non-sending members whose devices are offline for the whole run."""
    e2ee: bool = False
    """Chat and group kinds: real Signal-protocol envelopes (``interlink.e2ee``, see
    ``interlink.load.e2ee``; the group kind: sender keys) instead of random bytes; ``payload`` is
    then the plaintext size."""
    e2ee_verify: float = 0.1
    """group with ``e2ee``: fraction of the member devices (at least one) that decrypt every copy
    they get; the others identify each copy by its envelope header (``interlink.load.e2ee.GroupCrypto``)."""
    connect_rate: float | None = None
    """churn, handshake-storm: new sessions per second in total, open loop (connect latency counts
    from each session's intended start); None (``"max"`` in TOML) = closed loop (churn: every
    churning device cycles at once; handshake-storm: ``inflight`` handshakes under way)."""
    keep_fraction: float = 0.0
    """churn: fraction of the users whose devices stay connected all run; handshake-storm: fraction
    of the new sessions kept open until the end (the others close right after ``welcome``)."""
    churn_messages: int = 3
    """churn: 1:1 messages each churning session sends its partner (acked) before it leaves."""
    malformed_share: float = 0.0
    """malformed-mix: share of all inputs (well-formed messages + malformed inputs) that are
    malformed frames or stanzas, each checked for the answer the contract names."""
    transport: str = "tcp"
    """chat, offline-drain: how the simulated devices reach the gateway: "tcp", or "ws" (WebSocket, as web clients do)."""
    media_uploaders: int = 2
    """media: SDK clients (users of their own) uploading blobs back to back."""
    media_downloaders: int = 2
    """media: SDK clients (users of their own) downloading ready blobs back to back."""
    media_blob_mib: float = 16.0
    """media: MiB of each blob (random bytes, at most the gateway's ``limits.blob_max``)."""
    media_only: bool = False
    """media: the blobs alone, no chat traffic beside them."""
    blob_kib_per_s_per_user: int | None = None
    """media: the local gateway's blob rate per user (KiB/s of writes and reads; the gateway's
    default is 65,536); None: lifted, as the message rate limits are (``interlink.load.child``)."""

    def validate(self) -> Scenario:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"scenario {self.name!r}: {key} {what}")

        need(self.kind in KINDS, "kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        used = COMMON_KEYS | KIND_KEYS[self.kind]
        for key in sorted(self.given_keys - used):
            uses = ", ".join(sorted(used - {"name", "description"}))
            need(False, key, f"is not used by the {self.kind} kind (it uses: {uses})")
        need(1 <= self.providers <= 26, "providers", f"must be 1..26, got {self.providers}")
        need(2 <= self.users <= 100_000, "users", f"must be 2..100000, got {self.users}")
        need(1 <= self.devices <= 64, "devices", f"must be 1..64, got {self.devices}")
        need(self.rate is None or 0 < self.rate <= 10_000_000, "rate", f"must be > 0 or \"max\", got {self.rate}")
        need(1 <= self.inflight <= 10_000, "inflight", f"must be 1..10000, got {self.inflight}")
        need(TIME_BYTES <= self.payload <= 60_000, "payload", f"must be {TIME_BYTES}..60000 bytes, got {self.payload}")
        need(0 < self.duration <= 86_400, "duration", f"must be in (0, 86400] s, got {self.duration}")
        need(0 <= self.warmup < self.duration or self.kind not in ("chat", "malformed-mix", "media"), "warmup",
             "must be in [0, duration)")
        need(1 <= self.messages <= 100_000_000, "messages", f"must be 1..1e8, got {self.messages}")
        need(self.transport in ("tcp", "ws"), "transport", f"must be tcp or ws, got {self.transport!r}")
        need(self.durability in ("sync", "async"), "durability", f"must be sync or async, got {self.durability!r}")
        need(self.window is None or 1 <= self.window <= 4096, "window", f"must be 1..4096, got {self.window}")
        need(2 <= self.members <= MAX_GROUP, "members", f"must be 2..{MAX_GROUP}, got {self.members}")
        need(1 <= self.senders <= self.members, "senders", f"must be 1..members, got {self.senders}")
        need(0 <= self.offline < 1, "offline", f"must be a fraction in [0, 1), got {self.offline}")
        need(isinstance(self.e2ee, bool), "e2ee", f"must be true or false, got {self.e2ee!r}")
        need(self.connect_rate is None or 0 < self.connect_rate <= 1_000_000, "connect_rate",
             f"must be > 0 or \"max\", got {self.connect_rate}")
        need(0 <= self.keep_fraction < 1, "keep_fraction", f"must be a fraction in [0, 1), got {self.keep_fraction}")
        need(0 <= self.churn_messages <= 1000, "churn_messages", f"must be 0..1000, got {self.churn_messages}")
        need(0 <= self.malformed_share < 1, "malformed_share", f"must be a fraction in [0, 1), got {self.malformed_share}")
        need(not (self.e2ee and self.kind in ("churn", "handshake-storm", "malformed-mix")), "e2ee",
             f"is not supported by the {self.kind} kind yet")
        need(not isinstance(self.e2ee_verify, bool) and 0 < self.e2ee_verify <= 1, "e2ee_verify",
             f"must be a fraction in (0, 1], got {self.e2ee_verify}")
        need(self.e2ee or "e2ee_verify" not in self.given_keys, "e2ee_verify",
             "is used only with e2ee = true (--e2ee)")
        need(not self.e2ee or self.payload >= E2EE_PLAINTEXT_HEADER, "payload",
             f"must be at least {E2EE_PLAINTEXT_HEADER} bytes with e2ee (send time and message id), got {self.payload}")
        need(0 <= self.media_uploaders <= MAX_MEDIA_CLIENTS, "media_uploaders",
             f"must be 0..{MAX_MEDIA_CLIENTS}, got {self.media_uploaders}")
        need(0 <= self.media_downloaders <= MAX_MEDIA_CLIENTS, "media_downloaders",
             f"must be 0..{MAX_MEDIA_CLIENTS}, got {self.media_downloaders}")
        need(self.kind != "media" or self.media_uploaders + self.media_downloaders >= 1, "media_uploaders",
             "and media_downloaders are both 0: the media kind needs at least one media client")
        need(not isinstance(self.media_blob_mib, bool) and math.isfinite(self.media_blob_mib)
             and 0 < self.media_blob_mib <= MAX_MEDIA_BLOB_MIB and int(self.media_blob_mib * 2**20) >= 1,
             "media_blob_mib", f"must be in (0, {MAX_MEDIA_BLOB_MIB:g}] MiB, got {self.media_blob_mib}")
        need(isinstance(self.media_only, bool), "media_only", f"must be true or false, got {self.media_only!r}")
        need(not (self.media_only and self.e2ee), "e2ee", "has no chat to encrypt with media_only")
        need(self.blob_kib_per_s_per_user is None or 64 <= self.blob_kib_per_s_per_user <= 1 << 30,
             "blob_kib_per_s_per_user", f"must be 64..2^30 KiB/s (or left out: lifted), got {self.blob_kib_per_s_per_user}")
        self.users += self.users % 2
        if self.kind == "group":
            self.users = self.members  # the group's members are the simulated users
        return self

    @property
    def open_loop(self) -> bool:
        return self.rate is not None


def parse_rate(value: Any, key: str = "rate") -> float | None:
    """``"max"`` (closed loop) → None; a positive number → messages (``connect_rate``: sessions)
    per second."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "max"):
        return None
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number per second or \"max\", got {value!r}") from None
    if not math.isfinite(rate) or rate <= 0:
        raise ConfigError(f"{key} must be > 0 or \"max\", got {value!r}")
    return rate


def load_scenario(path: Path, **overrides: Any) -> Scenario:
    """Read a scenario file; ``overrides`` (None values ignored) replace its keys."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read scenario {path}: {exc}") from exc
    data.setdefault("name", Path(path).stem)
    return make_scenario(data, **overrides)


def make_scenario(data: dict, **overrides: Any) -> Scenario:
    known = {f.name: f for f in dataclasses.fields(Scenario)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"scenario {data.get('name', '?')!r}: unknown keys {', '.join(unknown)} (known: {', '.join(known)})")
    values = dict(data)
    values.update({key: value for key, value in overrides.items() if value is not None})
    for key in ("rate", "connect_rate"):
        if key in values:
            values[key] = parse_rate(values[key], key)
    for key, value in values.items():
        expected = known[key].type
        if key in ("rate", "connect_rate") or value is None:
            continue
        if "float" in expected and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif ("int" in expected and (type(value) is not int)) or ("str" in expected and not isinstance(value, str)):
            raise ConfigError(f"scenario {values.get('name', '?')!r}: {key} has the wrong type ({value!r})")
    scenario = Scenario(**values)
    scenario.given_keys = frozenset(values)  # defaults are not given: an unused one is harmless
    return scenario.validate()


def find_scenario(name_or_path: str) -> Path:
    """A scenario file: the path itself, or ``NAME.toml`` in the package's ``scenarios`` folder."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    path = SCENARIO_DIR / f"{name_or_path.removesuffix('.toml')}.toml"
    if path.is_file():
        return path
    known = sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
    raise ConfigError(f"no scenario {name_or_path!r} (a TOML file, or one of: {', '.join(known) or 'none found'})")
