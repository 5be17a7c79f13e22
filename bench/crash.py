"""Crash test of the delivery guarantees (PROTOCOL §6): SIGKILL the gateway while clients talk.

    python bench/crash.py --cycles 100 --senders 3 --seed 1

A gateway runs in a child process (``interlink.load.child``) over one data folder (LMDB
mailboxes and the operator keys, so clients keep their pinned root across restarts) and one
port. This process runs two demo OpenID issuers (providers ``alpha`` and ``beta``, which accept
each other's users) and the clients: ``--senders`` users, alternately of ``alpha`` and ``beta``,
with two devices each; every device sends and receives. Each message is a 1:1 message to a
random other user with one ciphertext per recipient device and an ``own`` copy for the sender's
other device; its 16-byte id is unique and its ciphertexts (no plaintext) encode sender, device
and counter. Each device keeps ``--pipeline`` messages in flight.

Each kill cycle: start the child, every device connects (each stays offline for the cycle with
probability ``--offline``, so stored backlogs and the push window are crossed by kills too) and
first resends, in order and with the same id, every message it has no ``ack`` for (what a client
must do per PROTOCOL §6; ``--resend driver`` does it here with ``send_message(msg_id=...)``,
``--resend outbox`` leaves it to the SDK: one ``interlink.client.Outbox`` per device given to every
``Client.connect``), then sends new ones; after a random delay (``--min-delay`` to
``--max-delay`` seconds from the child's "listening" line) the child gets SIGKILL. A message counts
as acked only when ``send_message`` returned its ``ack`` (with the outbox: or when it left the
outbox while ``connect`` resent it; a refusal would leave it too, and then show as lost). After the last cycle the child starts once
more, every device connects, resends whatever is unacked, stops sending, and drains until
every expected delivery arrived and a quiet period passed; then each device reconnects once
without reading to see ``welcome.pending``. The gateway runs with durability ``sync`` (the
default), a push window of 8 (so backlogs cross the window), and with the message rate limits and
the mailbox quota lifted: they refuse messages by design, and this tests durability.

Checks (all must be 0, else the exit status is 1):

* ``lost``: (acked message, addressed device) pairs never delivered: every device of the
  recipient and every other device of the sender (``own``).
* ``duplicates``: a message the application would see twice after client dedup: the same
  ``Client`` handing out one (``from``, ``id``) twice, or one message stored twice in a device's
  mailbox (two different seqs: the gateway's retransmission dedup failed). The application's
  dedup memory of (``from``, ``id``) outlives connections (each new ``Client`` starts with an
  empty one); redeliveries of the same seq on a later connection are the protocol's
  at-least-once and are counted apart as ``redelivered``.
* ``order_violations``: per (sender device, recipient device), a message (first delivery)
  whose counter is not above every counter delivered before it; plus, within one connection, a
  seq not above the previous one.
* ``resend_not_dup``: with ``--resend driver``, a fraction ``--forget-acks`` of acks is ignored
  (as if the connection had dropped right after the commit), so those messages are resent on
  the next connection, to a restarted gateway; each must be answered ``dup``.
* ``misdelivered`` (unknown id, wrong device or ciphertext), ``unacked_at_end``,
  ``pending_after_drain`` and ``errors`` (refusals, timeouts, a session that ended while the
  gateway was up). A gateway that does not start, or restarts with another root key or port,
  raises instead.

Prints the counts as one JSON object. The test suite imports ``run`` with small numbers
(``tests/e2e/test_crash.py``); ``make stress`` runs 100 cycles.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from interlink.client import Client, Outbox
from interlink.core.errors import InterlinkError, ServerError, SessionClosedError
from interlink.load import child
from interlink.testing import DemoIssuer

AUDIENCE = "interlink-crash"
PROVIDERS = ("alpha", "beta")
DEVICES_PER_USER = 2
CONNECT_TIMEOUT_S = 5.0  # one connection attempt
CONNECT_DEADLINE_S = 15.0  # retrying connection attempts to a live gateway
SEND_TIMEOUT_S = 15.0  # one message's ack from a live gateway
START_TIMEOUT_S = child.START_TIMEOUT_S  # the child's "listening" line
WIND_DOWN_S = 15.0  # sessions noticing a killed gateway
DRAIN_TIMEOUT_S = 60.0  # final resends and deliveries
QUIET_S = 0.5  # nothing more may arrive after the drain
MAX_SAMPLES = 20  # problems quoted in the report
RESEND_MODES = ("driver", "outbox")


@dataclass(eq=False)
class Message:
    msg_id: bytes
    sender: str
    device: int
    counter: int
    to: str
    c: dict[int, bytes]
    own: dict[int, bytes]
    sends: int = 0
    acked: bool = False
    dup_acks: int = 0
    ack_forgotten: bool = False

    def targets(self) -> list[tuple[str, int]]:
        """Every (user, device) an acked copy of it must reach."""
        return [(self.to, d) for d in self.c] + [(self.sender, d) for d in self.own]


@dataclass(eq=False)
class Device:
    user: str  # address localpart@provider
    device: int
    rng: random.Random
    counter: int = 0
    unacked: dict = field(default_factory=dict)  # counter -> Message, in counter order
    connections: int = 0
    seen: dict = field(default_factory=dict)  # (from, id) -> seq of the first delivery (the app's dedup)
    seqs: dict = field(default_factory=lambda: collections.defaultdict(set))  # (from, id) -> seqs seen
    last_counter: dict = field(default_factory=dict)  # (from, dev) -> highest counter delivered
    client: Client | None = None  # the current session's
    outbox: Outbox = field(default_factory=Outbox)  # with --resend outbox: the SDK resends

    @property
    def name(self) -> str:
        return f"{self.user}/{self.device}"


def _payload(msg_id: bytes, sender: str, device: int, counter: int, target: str, target_device: int) -> bytes:
    # Opaque bytes to the gateway; the checker recognises them. No plaintext semantics.
    return b"crash|%s|%s|%d|%d|%s|%d" % (msg_id.hex().encode(), sender.encode(), device, counter, target.encode(), target_device)


class GatewayProcess(child.GatewayProcess):
    """The gateway child on one data folder (LMDB and operator keys) and one port, restarted after
    each SIGKILL; the providers accept each other's users. Limits that refuse messages by design
    (rate limits, mailbox quota) are lifted: this tests durability, and a refusal mid-pipeline
    would let a later message overtake a refused one."""

    def __init__(self, data_dir: Path, issuers: dict[str, DemoIssuer], *, window: int, durability: str,
                 writemap: bool = False) -> None:
        providers = {provider_id: issuer.issuer for provider_id, issuer in issuers.items()}
        super().__init__(child.child_arguments(data_dir=data_dir, audience=AUDIENCE, providers=providers, window=window,
                                               durability=durability, lmdb_writemap=writemap, **child.LIFTED_LIMITS),
                         log_path=data_dir.parent / "gateway.log")


class CrashTest:
    def __init__(
        self, *, cycles: int, senders: int, seed: int, data_dir: Path, pipeline: int, offline: float,
        min_delay: float, max_delay: float, window: int, durability: str, resend: str, forget_acks: float,
        progress: bool, writemap: bool = False,
    ) -> None:
        if senders < 2:
            raise ValueError("--senders must be at least 2 (messages go to another user)")
        self.cycles = cycles
        self.seed = seed
        self.rng = random.Random(seed)
        self.data_dir = data_dir
        self.pipeline = pipeline
        self.offline = offline
        self.min_delay, self.max_delay = min_delay, max_delay
        self.window = window
        self.durability = durability
        self.writemap = writemap
        if resend not in RESEND_MODES:
            raise ValueError(f"resend must be one of {RESEND_MODES}")
        self.resend = resend
        self.forget_acks = forget_acks if resend == "driver" else 0.0
        self.ack_rng = random.Random(f"{seed}/acks")
        self.progress = progress
        self.users = [f"u{i}@{PROVIDERS[i % len(PROVIDERS)]}" for i in range(senders)]
        self.devices = [
            Device(user, device, random.Random(f"{seed}/{user}/{device}"))
            for user in self.users
            for device in range(1, DEVICES_PER_USER + 1)
        ]
        self.messages: dict[bytes, Message] = {}
        self.stats: collections.Counter = collections.Counter()
        self.error_count = 0  # refusals, timeouts, sessions that failed: anything but a clean run
        self.samples: list[str] = []  # the first few problems of any kind, for the report
        self.producing = True
        self.closing = False  # the final drain closes the sessions itself
        self.issuers: dict[str, DemoIssuer] = {}
        self.gateway: GatewayProcess | None = None

    def fail(self, text: str) -> None:
        self.error_count += 1
        self.note(text)

    def note(self, text: str) -> None:
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(text)

    # -- connecting

    async def connect(self, device: Device, *, auto_recv: bool = True, outbox: Outbox | None = None) -> Client | None:
        """A session on the live gateway, retried while it is alive; None once it was killed.
        With ``outbox``, the SDK resends what it holds before this returns."""
        gateway = self.gateway
        localpart, _, provider = device.user.partition("@")
        deadline = time.monotonic() + CONNECT_DEADLINE_S
        while gateway.alive:
            token = self.issuers[provider].issue(localpart, audience=AUDIENCE, expires_in=3600)
            try:
                return await Client.connect(
                    "127.0.0.1", gateway.port, token=token, device=device.device, root_public=gateway.root_public,
                    timeout_s=CONNECT_TIMEOUT_S, auto_recv=auto_recv, outbox=outbox,
                )
            except (OSError, InterlinkError) as exc:
                if not gateway.alive:
                    return None
                self.stats["connect_retries"] += 1
                if time.monotonic() > deadline:
                    self.fail(f"{device.name}: cannot connect to a live gateway: {exc!r}")
                    return None
                await asyncio.sleep(0.05)
        return None

    # -- one device session

    def new_message(self, device: Device) -> Message:
        device.counter += 1
        msg_id = os.urandom(16)
        to = device.rng.choice([u for u in self.users if u != device.user])
        c = {d: _payload(msg_id, device.user, device.device, device.counter, to, d) for d in range(1, DEVICES_PER_USER + 1)}
        own = {
            d: _payload(msg_id, device.user, device.device, device.counter, device.user, d)
            for d in range(1, DEVICES_PER_USER + 1)
            if d != device.device
        }
        message = Message(msg_id, device.user, device.device, device.counter, to, c, own)
        self.messages[msg_id] = message
        device.unacked[device.counter] = message
        self.stats["messages_sent"] += 1
        return message

    async def session(self, device: Device) -> None:
        if self.resend == "outbox":
            client = await self.connect(device, outbox=device.outbox)
            if client is None:
                return
            self.settle_outbox(device, client)
        else:
            client = await self.connect(device)
            if client is None:
                return
        device.connections += 1
        device.client = client
        receiver = asyncio.create_task(self.receive(device, client))
        try:
            await self.send(device, client)
            await receiver  # ends when the connection does (a kill, or the final close)
            if self.gateway.alive and not self.closing:
                self.fail(f"{device.name}: session ended while the gateway was up: {client.close_reason}")
        finally:
            device.client = None
            receiver.cancel()
            await client.close()

    def settle_outbox(self, device: Device, client: Client) -> None:
        """After ``connect`` resent the outbox: what left it was answered. (A refusal also leaves
        it; counting that as acked is the strict side: it would then show as lost.)"""
        still = {stanza["id"] for stanza in device.outbox.pending()}
        for message in list(device.unacked.values()):
            message.sends += 1
            self.stats["resends"] += 1
            if message.msg_id not in still:
                self.mark_acked(device, message)
        if still and not client.closed:
            self.fail(f"{device.name}: {len(still)} outbox stanzas unanswered on a live connection")

    def take_ack(self, device: Device, message: Message, ack: dict) -> bool:
        """The gateway's answer ``ack`` to ``message``: checked and counted; False when it is no
        ack (a failure) or is ignored on purpose (``forget_acks``), else True: it stands."""
        if ack.get("t") != "ack" or ack.get("id") != message.msg_id:
            self.fail(f"{device.name} #{message.counter}: unexpected answer {ack!r}")
            return False
        if ack.get("dup"):
            message.dup_acks += 1
            self.stats["acks_dup"] += 1
        elif message.ack_forgotten:
            # It was acked before, so stored: a second plain ack means it was stored twice.
            self.stats["resend_not_dup"] += 1
            self.note(f"{device.name} #{message.counter}: resent after its ack and not acked dup")
        if self.producing and not message.ack_forgotten and self.ack_rng.random() < self.forget_acks:
            # As if the connection had dropped right after the gateway's commit: the ack never
            # arrives, the message is resent (same id) on the next connection, which is a new
            # gateway process: its dedup must come from the store. (Not in the final drain:
            # there is no next connection.)
            message.ack_forgotten = True
            self.stats["acks_forgotten"] += 1
            return False
        return True

    def mark_acked(self, device: Device, message: Message) -> None:
        if not message.acked:
            message.acked = True
            self.stats["messages_acked"] += 1
        device.unacked.pop(message.counter, None)

    async def send(self, device: Device, client: Client) -> None:
        """Resend every unacked message in order (same ids), then new ones while producing."""
        slots = asyncio.Semaphore(self.pipeline)
        tasks = set()

        async def send_one(message: Message) -> None:
            try:
                ack = await client.send_message(message.to, message.c, own=message.own, msg_id=message.msg_id, timeout_s=SEND_TIMEOUT_S)
            except SessionClosedError:
                return  # the gateway went away: stays unacked, resent on the next connection
            except ServerError as exc:
                self.fail(f"{device.name} #{message.counter}: refused {exc.code}: {exc}")
                return
            except TimeoutError:
                if self.gateway.alive and not client.closed:
                    self.fail(f"{device.name} #{message.counter}: no ack within {SEND_TIMEOUT_S} s")
                return
            finally:
                slots.release()
            if self.take_ack(device, message, ack):
                self.mark_acked(device, message)

        def launch(message: Message) -> None:
            message.sends += 1
            if message.sends > 1:
                self.stats["resends"] += 1
            # Tasks start in creation order and each writes its stanza before its first await:
            # the wire carries the messages in counter order.
            task = asyncio.create_task(send_one(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        # With --resend outbox the SDK already resent them while connecting.
        for message in list(device.unacked.values()) if self.resend == "driver" else ():
            await slots.acquire()
            if client.closed:
                slots.release()
                break
            launch(message)
        else:
            while self.producing:
                await slots.acquire()
                if client.closed or not self.producing:
                    slots.release()
                    break
                launch(self.new_message(device))
        if tasks:
            await asyncio.gather(*tasks)

    async def receive(self, device: Device, client: Client) -> None:
        handed: set = set()  # (from, id) this Client handed out: its own dedup must hold
        last_seq = 0
        while True:
            try:
                stanza = await client.recv()
            except SessionClosedError:
                return
            except ServerError as exc:
                self.fail(f"{device.name}: unsolicited error {exc.code}: {exc}")
                continue
            if stanza.get("t") != "dlv" or stanza.get("k") != "msg":
                self.stats["other_stanzas"] += 1
                continue
            seq = stanza["seq"]
            if seq <= last_seq:
                self.stats["order_violations"] += 1
                self.note(f"{device.name}: seq {seq} pushed after {last_seq} on one connection")
            last_seq = max(last_seq, seq)
            key = (stanza["from"], stanza["id"])
            if key in handed:
                self.stats["duplicates"] += 1
                self.note(f"{device.name}: the client handed out {key[0]} {key[1].hex()} twice")
                continue
            handed.add(key)
            seqs = device.seqs[key]
            seqs.add(seq)
            if len(seqs) == 2:
                self.stats["duplicates"] += 1
                self.note(f"{device.name}: {key[0]} {key[1].hex()} stored twice (seqs {sorted(seqs)})")
            if key in device.seen:
                self.stats["redelivered"] += 1
                continue
            device.seen[key] = seq
            self.stats["delivered"] += 1
            self.check_delivery(device, stanza)

    def check_delivery(self, device: Device, stanza: dict) -> None:
        message = self.messages.get(stanza["id"])
        if message is None or message.sender != stanza["from"] or message.device != stanza["dev"]:
            self.stats["misdelivered"] += 1
            self.note(f"{device.name}: a delivery of an unknown message {stanza['id'].hex()}")
            return
        if device.user == message.to and "to" not in stanza:
            expected = message.c.get(device.device)
        elif device.user == message.sender and stanza.get("to") == message.to:
            expected = message.own.get(device.device)
        else:
            expected = None
        if expected is None or stanza["c"] != expected:
            self.stats["misdelivered"] += 1
            self.note(f"{device.name}: message {message.counter} of {message.sender}/{message.device} misdelivered")
            return
        stream = (message.sender, message.device)
        last = self.out_of_order(device, stream, message.counter)
        if last is not None:
            self.note(f"{device.name}: #{message.counter} of {stream[0]}/{stream[1]} after #{last}")

    def out_of_order(self, device: Device, stream: tuple, counter: int) -> int | None:
        """The counter ``device`` got last on ``stream`` when ``counter`` does not come after it (an
        order violation, counted); else None, and ``counter`` is the last now."""
        last = device.last_counter.get(stream, 0)
        if counter <= last:
            self.stats["order_violations"] += 1
            return last
        device.last_counter[stream] = counter
        return None

    def check_task(self, task: asyncio.Task, where: str) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.fail(f"{where}: a session failed: {task.exception()!r}")

    # -- phases

    async def register_devices(self) -> None:
        """Every device connects once first, so each message addresses a fixed set of devices."""
        for device in self.devices:
            client = await self.connect(device)
            if client is None:
                raise RuntimeError(f"{device.name} could not register")
            await client.close()

    async def cycle(self, number: int) -> None:
        gateway = self.gateway
        await gateway.start()
        if number == 1:
            await self.register_devices()
        online = [d for d in self.devices if self.rng.random() >= self.offline]
        delay = self.rng.uniform(self.min_delay, self.max_delay)
        acked_before = self.stats["messages_acked"]
        sessions = [asyncio.create_task(self.session(d)) for d in online]
        await asyncio.sleep(delay)
        await gateway.kill()
        self.stats["kills"] += 1
        done, stuck = await asyncio.wait(sessions, timeout=WIND_DOWN_S)
        for task in stuck:
            task.cancel()
            self.fail(f"cycle {number}: a session did not notice the kill within {WIND_DOWN_S} s")
        for task in done:
            self.check_task(task, f"cycle {number}")
        if stuck:
            await asyncio.wait(stuck)
        if self.progress:
            print(
                f"cycle {number}/{self.cycles}: killed after {delay:.2f} s, {len(online)} devices online, "
                f"{self.stats['messages_acked'] - acked_before} acked, "
                f"{sum(len(d.unacked) for d in self.devices)} unacked",
                file=sys.stderr,
                flush=True,
            )

    def missing(self) -> list[tuple[Device, Message]]:
        by_name = {(d.user, d.device): d for d in self.devices}
        missing = []
        for message in self.messages.values():
            if not message.acked:
                continue
            for target in message.targets():
                device = by_name[target]
                if (message.sender, message.msg_id) not in device.seen:
                    missing.append((device, message))
        return missing

    async def end_drain(self, tasks) -> None:
        """The end of the final drain: a quiet moment for late duplicates, every client pinged
        (an answer means the gateway read every recv sent before it) and closed, the device
        ``tasks`` waited for, then each device once more without reading, to count what the
        gateway still holds for it (everything was received: nothing)."""
        self.closing = True
        await asyncio.sleep(QUIET_S)  # duplicates arriving late would show now
        for device in self.devices:
            client = device.client
            if client is not None and not client.closed:
                try:
                    await client.ping(timeout_s=SEND_TIMEOUT_S)
                except (InterlinkError, TimeoutError) as exc:
                    self.fail(f"{device.name}: no pong after the drain: {exc!r}")
                await client.close()
        done, stuck = await asyncio.wait(tasks, timeout=WIND_DOWN_S)
        for task in done:
            self.check_task(task, "final drain")
        for task in stuck:
            task.cancel()
            self.fail("final drain: a device did not stop after its client closed")
        if stuck:
            await asyncio.wait(stuck)
        for device in self.devices:
            client = await self.connect(device, auto_recv=False)
            if client is None:
                self.fail(f"{device.name}: could not reconnect after the drain")
                continue
            pending = client.welcome.get("pending", 0)
            if pending:
                self.note(f"{device.name}: {pending} items still pending after the drain")
            self.stats["pending_after_drain"] += pending
            await client.close()

    async def final_drain(self) -> None:
        self.producing = False
        await self.gateway.start()
        sessions = [asyncio.create_task(self.session(d)) for d in self.devices]
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            if not any(d.unacked for d in self.devices) and not self.missing():
                break
            for index, task in enumerate(sessions):
                if task.done():  # ended early (counted as an error): a client would reconnect
                    self.check_task(task, "final drain")
                    sessions[index] = asyncio.create_task(self.session(self.devices[index]))
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0.05)
        await self.end_drain(sessions)
        await self.gateway.stop()

    async def run(self) -> dict:
        started = time.monotonic()
        async with DemoIssuer() as alpha, DemoIssuer() as beta:
            self.issuers = {"alpha": alpha, "beta": beta}
            self.gateway = GatewayProcess(self.data_dir, self.issuers, window=self.window, durability=self.durability,
                                          writemap=self.writemap)
            try:
                for number in range(1, self.cycles + 1):
                    await self.cycle(number)
                await self.final_drain()
            finally:
                await self.gateway.kill()
        return self.report(time.monotonic() - started)

    def report(self, elapsed_s: float) -> dict:
        missing = self.missing()
        lost_messages = {m.msg_id for _, m in missing}
        for device, message in missing[:20]:
            self.note(f"lost: #{message.counter} of {message.sender}/{message.device} never reached {device.name}")
        unacked = sum(len(d.unacked) for d in self.devices)
        for device in self.devices:
            for message in list(device.unacked.values())[:5]:
                self.note(f"unacked at the end: #{message.counter} of {device.name} (sent {message.sends} times)")
        expected = sum(len(m.c) + len(m.own) for m in self.messages.values() if m.acked)
        counts = {
            "cycles": self.cycles,
            "kills": self.stats["kills"],
            "seed": self.seed,
            "resend": self.resend,
            "users": len(self.users),
            "devices": len(self.devices),
            "messages_sent": self.stats["messages_sent"],
            "messages_acked": self.stats["messages_acked"],
            "resends": self.stats["resends"],
            "acks_dup": self.stats["acks_dup"],
            "acks_forgotten": self.stats["acks_forgotten"],
            "resend_not_dup": self.stats["resend_not_dup"],
            "deliveries_expected": expected,
            "delivered": self.stats["delivered"],
            "redelivered": self.stats["redelivered"],
            "lost": len(missing),
            "lost_messages": len(lost_messages),
            "duplicates": self.stats["duplicates"],
            "order_violations": self.stats["order_violations"],
            "misdelivered": self.stats["misdelivered"],
            "unacked_at_end": unacked,
            "pending_after_drain": self.stats["pending_after_drain"],
            "connect_retries": self.stats["connect_retries"],
            "errors": self.error_count,
            "gateway_starts": self.gateway.starts if self.gateway else 0,
            "elapsed_s": round(elapsed_s, 1),
        }
        counts["ok"] = all(
            counts[name] == 0
            for name in (
                "lost", "duplicates", "order_violations", "misdelivered", "resend_not_dup", "unacked_at_end",
                "pending_after_drain", "errors",
            )
        ) and counts["kills"] == self.cycles
        counts["problems"] = self.samples
        return counts


async def run(
    *, cycles: int = 100, senders: int = 3, seed: int = 1, data_dir: Path | None = None, pipeline: int = 4,
    offline: float = 0.2, min_delay: float = 0.2, max_delay: float = 1.5, window: int = 8,
    durability: str = "sync", resend: str = "driver", forget_acks: float = 0.002, progress: bool = False,
    timeout_s: float | None = None, writemap: bool = False,
) -> dict:
    """Run the crash test and return its counts (``counts["ok"]`` tells whether it passed).

    ``data_dir``: an empty folder for the gateway's data (default: a temporary one, removed)."""
    temporary = data_dir is None
    if temporary:
        data_dir = Path(tempfile.mkdtemp(prefix="interlink-crash-"))
    test = CrashTest(
        cycles=cycles, senders=senders, seed=seed, data_dir=Path(data_dir) / "gateway", pipeline=pipeline,
        offline=offline, min_delay=min_delay, max_delay=max_delay, window=window, durability=durability,
        resend=resend, forget_acks=forget_acks, progress=progress, writemap=writemap,
    )
    if timeout_s is None:
        # Each cycle's phases are bounded; this bounds the whole run should anything else stall.
        timeout_s = 60.0 + cycles * (START_TIMEOUT_S + max_delay + WIND_DOWN_S) + DRAIN_TIMEOUT_S + START_TIMEOUT_S
    return await run_bounded(test, timeout_s, data_dir if temporary else None)


async def run_bounded(test, timeout_s: float, temporary: Path | None):
    """``test.run()``, bounded by ``timeout_s`` (a stall guard, not a timing check); the
    ``temporary`` data folder, if any, is removed after."""
    try:
        async with asyncio.timeout(timeout_s):
            return await test.run()
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100, help="SIGKILLs of the gateway (default 100)")
    parser.add_argument("--senders", type=int, default=3, help="users, two devices each, all sending (default 3)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pipeline", type=int, default=4, help="messages in flight per device (default 4)")
    parser.add_argument("--offline", type=float, default=0.2, help="chance a device sits out a cycle (default 0.2)")
    parser.add_argument("--min-delay", type=float, default=0.2, help="earliest kill, s after listening (default 0.2)")
    parser.add_argument("--max-delay", type=float, default=1.5, help="latest kill, s after listening (default 1.5)")
    parser.add_argument("--window", type=int, default=8, help="gateway push window per device (default 8)")
    parser.add_argument("--durability", default="sync", choices=["sync", "async"])
    parser.add_argument("--lmdb-writemap", action="store_true", help="the gateway's store opened with writemap")
    parser.add_argument(
        "--resend", default="driver", choices=RESEND_MODES,
        help="who resends unacked messages after a kill: this driver (default) or the SDK's Outbox",
    )
    parser.add_argument(
        "--forget-acks", type=float, default=0.002,
        help="with --resend driver: chance an ack is treated as lost, so the message is resent after the next "
        "kill and must be acked dup (default 0.002)",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the gateway's data here (default: temporary)")
    parser.add_argument("--timeout", type=float, default=None, help="bound on the whole run, s (default: from --cycles)")
    parser.add_argument("--quiet", action="store_true", help="no per-cycle progress on stderr")
    args = parser.parse_args()
    if args.cycles < 1 or args.senders < 2 or args.pipeline < 1 or not 0 <= args.offline < 1:
        parser.error("need --cycles >= 1, --senders >= 2, --pipeline >= 1, 0 <= --offline < 1")
    if not 0 <= args.min_delay <= args.max_delay:
        parser.error("need 0 <= --min-delay <= --max-delay")
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
    import uvloop

    counts = uvloop.run(
        run(
            cycles=args.cycles, senders=args.senders, seed=args.seed, data_dir=args.data_dir, pipeline=args.pipeline,
            offline=args.offline, min_delay=args.min_delay, max_delay=args.max_delay, window=args.window,
            durability=args.durability, resend=args.resend, forget_acks=args.forget_acks, progress=not args.quiet, timeout_s=args.timeout,
            writemap=args.lmdb_writemap,
        )
    )
    print(json.dumps(counts, indent=2))
    sys.exit(0 if counts["ok"] else 1)


if __name__ == "__main__":
    main()
