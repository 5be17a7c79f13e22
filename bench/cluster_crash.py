"""Crash test of a cluster (issue 18's fault goal): SIGKILL one node, or the NATS server, under
cross-node 1:1 traffic.

    python bench/cluster_crash.py --cycles 50 --kill node --seed 1
    python bench/cluster_crash.py --cycles 50 --kill nats --seed 1

Three gateway nodes (``node-a``, ``node-b``, ``node-c``), each a child process
(``interlink.load.child`` with ``--cluster-config``: its own data folder, port and ``[cluster]``
table, every node's certificate under one operator root), joined through one ``nats-server``
child on a fixed loopback port (``interlink.load.nats.LocalNats``). This process runs two demo
OpenID issuers (providers ``alpha`` and ``beta``, which accept each other's users) and the
clients: ``--users-per-node`` users of each provider homed on each node (by the cluster's own
rendezvous hashing), two devices each. Every message is a 1:1 message to a random user homed on
*another* node than its sender (so each one is relayed over NATS and acked only after that
node's commit), with one ciphertext per recipient device and an ``own`` copy for the sender's
other device (stored on the sender's node after the recipient's node acked); ids and
ciphertexts are those of ``bench/crash.py``, whose ledger and checks this reuses (its
``CrashTest``: ``receive``, ``check_delivery``, ``missing``, ``report``).

Every device runs for the whole test: it connects through a random live node (the SDK follows
``bye redirect`` to its home), resends in order and with the same ids everything it has no
``ack`` for, then sends new messages, ``--pipeline`` in flight. An ``err overloaded`` (the
recipient's node or NATS did not answer within ``cluster.request_timeout_s``) is waited out for
its ``retry_after`` and the same id sent again on the same session. A session that ends because
its node was killed is reconnected (retrying while the home is down) and everything unacked is
resent. With probability ``--offline`` a session leaves on its own after a while and the device
stays away for a moment, so backlogs and the push window (8) are crossed by kills too. As in
``bench/crash.py`` a fraction ``--forget-acks`` of acks is ignored on purpose: those messages are
resent on the device's next session and must be acked ``dup``.

Each cycle: traffic runs for a random ``--min-delay``..``--max-delay`` s (and on until a first
message of the cycle is acked and a message involving the victim is in flight: the kill always
cuts traffic that flows; none within 20 s of the last restart is a stall, an error), then the
victim gets SIGKILL — with ``--kill node`` a random node, with ``--kill nats`` the NATS server
(``mixed``: one of the two at random) — stays down for a random 0..``--max-down`` s (around the
request timeout, so that stanzas are cut both before and after their deadline), and is started
again (a node on the same port and data folder; NATS on the same port, to which the nodes
reconnect by themselves). After the last cycle: every session is closed, every device reconnects,
resends what is unacked and stops sending; then the drain runs until every expected delivery
arrived and a quiet period passed, and each device reconnects once without reading to see
``welcome.pending``.

Checks (all must be 0, else the exit status is 1) are ``bench/crash.py``'s: ``lost`` (acked and
never delivered to an addressed device), ``duplicates`` (after client dedup, or stored twice),
``order_violations`` (per sender device and recipient device, by the sender's counter; each is
also counted by what happened to the message that arrived late: ``_after_refusal``, it had been
answered ``overloaded``; ``_after_cut``, else a send of it had ended without an answer (its
session's end); ``_unexplained``, neither), ``misdelivered``, ``resend_not_dup``,
``unacked_at_end``, ``pending_after_drain`` and ``errors`` (refusals other than ``overloaded``, a
live session that ended, no answer within 15 s on a live session, a device that cannot connect to
its live home). ``cycles_with_traffic`` counts the cycles in which messages were acked before the
kill and messages involving the victim were in flight at the kill. Prints the counts as one JSON
object. ``tests/e2e/test_cluster_crash.py`` imports ``run`` with small numbers;
``make cluster-stress`` runs 50 cycles. The known gap in order (docs/reliability.md, "Cluster:
killing a node or NATS", C1) makes every run with ``--pipeline`` above 1 fail for now.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from interlink.client import Client
from interlink.core.domain.cluster import Membership
from interlink.core.errors import ConfigError, InterlinkError, ServerError, SessionClosedError
from interlink.load import child
from interlink.load.nats import LocalNats
from interlink.testing import DemoIssuer, free_ports, homed_users, keys_for_nodes


def _load_crash():
    """``bench/crash.py`` as a module, under the name ``tests/e2e/test_crash.py`` gives it."""
    name = "interlink_bench_crash"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("crash.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return module


crash = _load_crash()

NODES = ("node-a", "node-b", "node-c")
PROVIDERS = crash.PROVIDERS
AUDIENCE = crash.AUDIENCE
DEVICES_PER_USER = crash.DEVICES_PER_USER
KILL_MODES = ("node", "nats", "mixed")
CONNECT_TIMEOUT_S = crash.CONNECT_TIMEOUT_S  # one connection attempt
CONNECT_DEADLINE_S = 20.0  # failing to connect while the device's home (and NATS) are up: an error
SEND_TIMEOUT_S = crash.SEND_TIMEOUT_S  # no answer on a live session: an error (the relay answers by its deadline)
START_TIMEOUT_S = child.START_TIMEOUT_S
RESUME_TIMEOUT_S = 20.0  # nothing acked this long after a restart: a stall (an error)
START_ATTEMPTS = 3  # a node or NATS that does not start is tried again (the failure is reported)
DRAIN_TIMEOUT_S = 90.0
QUIET_S = crash.QUIET_S
WIND_DOWN_S = crash.WIND_DOWN_S


def retry_after_s(exc: ServerError) -> float:
    """The refusal's ``retry_after`` in seconds (1 s when it has none)."""
    retry_after = exc.fields.get("retry_after")
    return retry_after / 1000 if type(retry_after) is int and 0 < retry_after <= 60_000 else 1.0


class NodeProcess(child.GatewayProcess):
    """One node: a gateway child on its own data folder and fixed port, with its ``[cluster]``
    table in ``cluster_file``; ``up`` from listening to its kill or stop. (``starts`` tells a
    session whether the process it connected to is still the one running.)"""

    def __init__(self, name: str, data_dir: Path, port: int, cluster_file: Path, issuers: dict[str, DemoIssuer], *,
                 window: int, durability: str) -> None:
        providers = {provider_id: issuer.issuer for provider_id, issuer in issuers.items()}
        super().__init__(child.child_arguments(data_dir=data_dir, audience=AUDIENCE, providers=providers, window=window,
                                               durability=durability, cluster_config=cluster_file,
                                               **child.LIFTED_LIMITS),
                         log_path=data_dir.parent / f"{name}.log")
        self.name = name
        self.port = port
        self.up = False

    async def start(self) -> None:
        self.up = False
        await super().start()
        self.up = True

    async def kill(self) -> None:
        self.up = False
        await super().kill()

    async def stop(self) -> None:
        self.up = False
        await super().stop()


def cluster_toml(node: str, ports: dict[str, int], nats_url: str, request_timeout_s: float) -> str:
    """A node's ``[cluster]`` table (docs/operations.md "Running a cluster")."""
    nodes = "\n".join(f'{name} = "127.0.0.1:{port}"' for name, port in ports.items())
    return (f'[cluster]\nnode = "{node}"\nversion = 1\nnats = ["{nats_url}"]\nrequest_timeout_s = {request_timeout_s}\n'
            f"\n[cluster.nodes]\n{nodes}\n")


class ClusterCrashTest(crash.CrashTest):
    def __init__(
        self, *, cycles: int, kill: str | Sequence[str], users_per_node: int, seed: int, data_dir: Path, pipeline: int,
        offline: float, min_delay: float, max_delay: float, max_down: float, window: int, durability: str,
        forget_acks: float, request_timeout_s: float, progress: bool,
    ) -> None:
        super().__init__(cycles=cycles, senders=2, seed=seed, data_dir=data_dir, pipeline=pipeline, offline=offline,
                         min_delay=min_delay, max_delay=max_delay, window=window, durability=durability,
                         resend="driver", forget_acks=forget_acks, progress=progress)
        if isinstance(kill, str):
            if kill not in KILL_MODES:
                raise ValueError(f"kill must be one of {KILL_MODES}")
            self.kill_mode = kill
            self.schedule = [kill if kill != "mixed" else self.rng.choice(("node", "nats")) for _ in range(cycles)]
        else:
            self.schedule = list(kill)
            if len(self.schedule) != cycles or not set(self.schedule) <= {"node", "nats"}:
                raise ValueError("a kill schedule names 'node' or 'nats' for every cycle")
            self.kill_mode = "schedule"
        self.max_down = max_down
        self.request_timeout_s = request_timeout_s
        self.membership = Membership(NODES, 1)
        homes = {provider: homed_users(self.membership, provider, users_per_node, prefix="u") for provider in PROVIDERS}
        self.users = [user for node in NODES for provider in PROVIDERS for user in homes[provider][node]]
        self.home = {user: self.membership.home(user) for user in self.users}
        self.devices = [
            crash.Device(user, device, random.Random(f"{seed}/{user}/{device}"))
            for user in self.users
            for device in range(1, DEVICES_PER_USER + 1)
        ]
        self.nodes: dict[str, NodeProcess] = {}
        self.nats: LocalNats | None = None
        self.nats_up = False
        self.nats_starts = 0
        self.root_public = b""
        self.started = time.monotonic()
        self.in_flight: dict[bytes, crash.Message] = {}  # messages waiting for their answer
        self.device_in_flight: collections.Counter = collections.Counter()
        self.refused: collections.Counter = collections.Counter()  # msg id -> overloaded answers
        self.cut: collections.Counter = collections.Counter()  # msg id -> sends whose answer never came
        self.history: dict[bytes, list] = collections.defaultdict(list)  # msg id -> (t, event)
        self.events: list[tuple[float, str]] = []  # kills and restarts
        self.cycle_log: list[dict] = []
        self.leaving: set[str] = set()  # devices whose session is being closed on purpose
        self.loops: list[asyncio.Task] = []

    # -- time and events

    def now(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def event(self, text: str) -> None:
        self.events.append((self.now(), text))

    def track(self, message: crash.Message, what: str) -> None:
        self.history[message.msg_id].append((self.now(), what))

    # -- the recipients: another node's users

    def new_message(self, device: crash.Device) -> crash.Message:
        # As crash.CrashTest.new_message, to a user homed on another node than the sender.
        to = device.rng.choice([u for u in self.users if self.home[u] != self.home[device.user]])
        return self._message_to(device, to)

    def _message_to(self, device: crash.Device, to: str) -> crash.Message:
        device.counter += 1
        msg_id = os.urandom(16)
        c = {d: crash._payload(msg_id, device.user, device.device, device.counter, to, d) for d in range(1, DEVICES_PER_USER + 1)}
        own = {d: crash._payload(msg_id, device.user, device.device, device.counter, device.user, d)
               for d in range(1, DEVICES_PER_USER + 1) if d != device.device}
        message = crash.Message(msg_id, device.user, device.device, device.counter, to, c, own)
        self.messages[msg_id] = message
        device.unacked[device.counter] = message
        self.stats["messages_sent"] += 1
        return message

    # -- connecting

    def node_alive(self, name: str) -> bool:
        node = self.nodes.get(name)
        return node is not None and node.up and node.alive

    async def connect(self, device: crash.Device, *, auto_recv: bool = True, outbox=None) -> Client | None:
        """A session at the device's home, through a random live node (the SDK follows the
        redirect); retried while the home or NATS is down. None once the test is closing."""
        localpart, _, provider = device.user.partition("@")
        home = self.home[device.user]
        failing_s = 0.0
        while auto_recv is False or not self.closing:
            live = [name for name in NODES if self.node_alive(name)]
            if not live:
                await asyncio.sleep(0.05)
                continue
            via = device.rng.choice(live)
            token = self.issuers[provider].issue(localpart, audience=AUDIENCE, expires_in=3600)
            began = time.monotonic()
            try:
                client = await Client.connect(
                    "127.0.0.1", self.nodes[via].port, token=token, device=device.device, root_public=self.root_public,
                    timeout_s=CONNECT_TIMEOUT_S, auto_recv=auto_recv,
                )
            except (OSError, InterlinkError) as exc:
                self.stats["connect_retries"] += 1
                if self.node_alive(home) and self.nats_up:
                    failing_s += time.monotonic() - began + 0.05
                    if failing_s > CONNECT_DEADLINE_S:
                        self.fail(f"{device.name}: cannot connect while its home {home} is up: {exc!r}")
                        failing_s = 0.0
                await asyncio.sleep(0.05)
                continue
            node = client.node_certificate.node
            if node != via:
                self.stats["redirects"] += 1
            if node != home:
                self.fail(f"{device.name}: a session on {node}, not its home {home}")
            return client
        return None

    # -- one device, for the whole test

    async def device_loop(self, device: crash.Device) -> None:
        while not self.closing:
            client = await self.connect(device)
            if client is None:
                return
            await self.session_on(device, client)
            if self.producing and device.name in self.leaving:
                # Left on purpose: stay away a moment (its backlog waits on its home).
                await asyncio.sleep(device.rng.uniform(0.2, 1.5))
            self.leaving.discard(device.name)

    async def session_on(self, device: crash.Device, client: Client) -> None:
        node = self.nodes[client.node_certificate.node]
        incarnation = node.starts
        device.connections += 1
        device.client = client
        receiver = asyncio.create_task(self.receive(device, client))
        leave = None
        if self.producing and device.rng.random() < self.offline:
            loop = asyncio.get_running_loop()
            leave = loop.call_later(device.rng.uniform(0.3, 2.0), self._leave, device, client)
        try:
            await self.send(device, client, node, incarnation)
            await receiver  # ends when the connection does (its node killed, a leave, the final close)
            killed = not node.alive or node.starts != incarnation
            if not killed and not self.closing and device.name not in self.leaving:
                self.fail(f"{device.name}: session ended while {node.name} was up: {client.close_reason}")
        finally:
            if leave is not None:
                leave.cancel()
            device.client = None
            receiver.cancel()
            await client.close()

    def _leave(self, device: crash.Device, client: Client) -> None:
        if not client.closed and self.producing:
            self.leaving.add(device.name)
            self.stats["sessions_left"] += 1
            asyncio.ensure_future(client.close())

    async def send(self, device: crash.Device, client: Client, node: NodeProcess, incarnation: int) -> None:
        """Resend every unacked message in order (same ids), then new ones while producing; an
        ``overloaded`` is waited out and the same id sent again on this session."""
        slots = asyncio.Semaphore(self.pipeline)
        tasks = set()
        # A device that wants its order kept sends nothing new while a refused message waits for
        # its resend (docs/protocol.md §6): the resend goes before anything sent after it.
        no_refusals = asyncio.Event()
        no_refusals.set()
        refused_now = [0]

        def node_gone() -> bool:
            return not node.alive or node.starts != incarnation

        async def send_one(message: crash.Message) -> None:
            self.in_flight[message.msg_id] = message
            self.device_in_flight[device.name] += 1
            was_refused = False
            try:
                while True:
                    try:
                        ack = await client.send_message(message.to, message.c, own=message.own, msg_id=message.msg_id,
                                                        timeout_s=SEND_TIMEOUT_S)
                        break
                    except ServerError as exc:
                        if exc.code != "overloaded":
                            self.fail(f"{device.name} #{message.counter}: refused {exc.code}: {exc}")
                            return
                        self.stats["overloaded"] += 1
                        self.refused[message.msg_id] += 1
                        if not was_refused:
                            was_refused = True
                            refused_now[0] += 1
                            no_refusals.clear()
                        self.track(message, "overloaded")
                        await asyncio.sleep(retry_after_s(exc))
                        if client.closed:
                            return  # resent on the next session
                        message.sends += 1
                        self.stats["resends"] += 1
                        self.stats["overloaded_resends"] += 1
                        self.track(message, f"resent on {node.name}")
            except SessionClosedError:
                self.cut[message.msg_id] += 1
                self.track(message, "session closed")
                return  # stays unacked: resent on the next session
            except TimeoutError:
                self.cut[message.msg_id] += 1
                if not node_gone() and not client.closed:
                    self.fail(f"{device.name} #{message.counter}: no answer within {SEND_TIMEOUT_S} s on live {node.name}")
                return
            except InterlinkError as exc:
                self.cut[message.msg_id] += 1
                if not node_gone() and not client.closed:
                    self.fail(f"{device.name} #{message.counter}: {exc!r}")
                return
            finally:
                self.in_flight.pop(message.msg_id, None)
                self.device_in_flight[device.name] -= 1
                slots.release()
                if was_refused:
                    refused_now[0] -= 1
                    if not refused_now[0]:
                        no_refusals.set()
            if ack.get("t") != "ack" or ack.get("id") != message.msg_id:
                self.fail(f"{device.name} #{message.counter}: unexpected answer {ack!r}")
                return
            self.track(message, "acked dup" if ack.get("dup") else "acked")
            if ack.get("dup"):
                message.dup_acks += 1
                self.stats["acks_dup"] += 1
            elif message.ack_forgotten:
                self.stats["resend_not_dup"] += 1
                self.note(f"{device.name} #{message.counter}: resent after its ack and not acked dup")
            if self.producing and not message.ack_forgotten and self.ack_rng.random() < self.forget_acks:
                message.ack_forgotten = True  # resent on the next session: must be acked dup
                self.stats["acks_forgotten"] += 1
                return
            self.mark_acked(device, message)

        def launch(message: crash.Message) -> None:
            message.sends += 1
            if message.sends > 1:
                self.stats["resends"] += 1
            self.track(message, f"{'resent' if message.sends > 1 else 'sent'} on {node.name}")
            # Tasks start in creation order and each writes its stanza before its first await.
            task = asyncio.create_task(send_one(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def slot_without_refusals() -> None:
            """A slot, at a moment when no refused message waits for its resend: that one goes
            before anything after it (docs/protocol.md §6)."""
            while True:
                await no_refusals.wait()
                await slots.acquire()
                if no_refusals.is_set() or client.closed:
                    return
                slots.release()  # refused while this one waited for a slot

        for message in list(device.unacked.values()):
            await slot_without_refusals()
            if client.closed:
                slots.release()
                break
            if message.msg_id in self.in_flight:  # already being resent by its own refusal's loop
                slots.release()
                continue
            launch(message)
        else:
            while self.producing:
                await slot_without_refusals()
                if client.closed or not self.producing:
                    slots.release()
                    break
                launch(self.new_message(device))
        if tasks:
            await asyncio.gather(*tasks)

    # -- the ledger: order violations, explained

    def check_delivery(self, device: crash.Device, stanza: dict) -> None:
        before = self.stats["order_violations"]
        super().check_delivery(device, stanza)
        if self.stats["order_violations"] == before:
            return
        message = self.messages[stanza["id"]]
        if self.refused[message.msg_id]:
            kind = "order_violations_after_refusal"
        elif self.cut[message.msg_id]:
            kind = "order_violations_after_cut"
        else:
            kind = "order_violations_unexplained"
        self.stats[kind] += 1
        if self.stats[kind] <= 4:
            # The message delivered late and the one delivered before it, with their histories.
            stream = (message.sender, message.device)
            last = device.last_counter.get(stream)
            earlier = next(m for m in self.messages.values() if (m.sender, m.device, m.counter) == (*stream, last))
            detail = " | ".join(f"#{m.counter} {m.msg_id.hex()[:8]} to {m.to}: "
                                + ", ".join(f"{t:.2f} {what}" for t, what in self.history[m.msg_id])
                                for m in (message, earlier))
            self.note(f"  ({kind}) at {self.now():.2f} on {device.name}: {detail}")

    # -- the processes

    async def _start(self, what: str, start) -> None:
        """``start()``, tried START_ATTEMPTS times (a port still held by the killed process)."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                await start()
                return
            except ConfigError as exc:
                self.fail(f"{what} did not start (attempt {attempt}): {str(exc)[-600:]}")
                if attempt == START_ATTEMPTS:
                    raise
                await asyncio.sleep(0.5)

    async def start_node(self, name: str) -> None:
        node = self.nodes[name]
        await self._start(name, node.start)
        if not self.root_public:
            self.root_public = node.root_public
        self.event(f"{name} up")

    async def start_nats(self) -> None:
        async def start() -> None:
            if self.nats.log_path.exists() and self.nats_starts:
                self.nats.log_path.replace(self.nats.log_path.with_suffix(f".log.{self.nats_starts}"))
            await self.nats.start()

        await self._start("nats-server", start)
        self.nats_starts += 1
        self.nats_up = True
        self.event("nats up")

    async def kill_nats(self) -> None:
        self.nats_up = False
        if self.nats.alive:
            self.nats.proc.send_signal(signal.SIGKILL)
            await self.nats.proc.wait()
        self.event("nats killed")

    async def setup(self) -> None:
        base = self.data_dir
        base.mkdir(parents=True, exist_ok=True)
        nats_port, *node_ports = free_ports(1 + len(NODES))
        ports = dict(zip(NODES, node_ports))
        self.nats = LocalNats(base / "nats", port=nats_port)
        keys_for_nodes({name: base / name / "keys" for name in NODES})
        for name in NODES:
            cluster_file = base / f"{name}.cluster.toml"
            cluster_file.write_text(cluster_toml(name, ports, self.nats.url, self.request_timeout_s), encoding="utf-8")
            self.nodes[name] = NodeProcess(name, base / name, ports[name], cluster_file, self.issuers,
                                           window=self.window, durability=self.durability)
        await self.start_nats()
        for name in NODES:
            await self.start_node(name)
        await self.register_devices()

    # -- phases

    async def cycle(self, number: int) -> None:
        victim_kind = self.schedule[number - 1]
        delay = self.rng.uniform(self.min_delay, self.max_delay)
        started = time.monotonic()
        down = self.rng.uniform(0.0, self.max_down)
        victim = self.rng.choice(NODES) if victim_kind == "node" else "nats"
        acked_before = self.stats["messages_acked"]
        overloaded_before = self.stats["overloaded"]
        await asyncio.sleep(delay)

        def involving() -> int:
            # What the kill cuts: messages waiting for an answer that involve the victim (every
            # message crosses NATS; a node: its own senders' and its recipients').
            if victim == "nats":
                return len(self.in_flight)
            return sum(1 for m in self.in_flight.values() if victim in (self.home[m.sender], self.home[m.to]))

        # Under traffic: if nothing was acked since the last restart yet (the senders' pipelines
        # still wait out the deadlines of what that kill cut), the kill waits for the first ack,
        # and for a message involving the victim to be in flight.
        resume_deadline = time.monotonic() + RESUME_TIMEOUT_S
        while (self.stats["messages_acked"] == acked_before or not involving()) and time.monotonic() < resume_deadline:
            await asyncio.sleep(0.001)
        after = time.monotonic() - started
        acked, in_flight = self.stats["messages_acked"] - acked_before, involving()
        if not acked or not in_flight:
            self.fail(f"cycle {number}: no traffic within {RESUME_TIMEOUT_S} s of the last restart "
                      f"({acked} acked, {in_flight} in flight for {victim})")
        if victim == "nats":
            await self.kill_nats()
        else:
            await self.nodes[victim].kill()
            self.event(f"{victim} killed")
        self.stats["kills"] += 1
        self.stats[f"kills_{victim_kind}"] += 1
        await asyncio.sleep(down)
        restart_began = time.monotonic()
        if victim == "nats":
            await self.start_nats()
        else:
            await self.start_node(victim)
        restart_s = time.monotonic() - restart_began
        record = {"cycle": number, "victim": victim, "after_s": round(after, 2), "down_s": round(down, 2),
                  "restart_s": round(restart_s, 2), "acked_before_kill": acked, "in_flight_at_kill": in_flight,
                  "overloaded": self.stats["overloaded"] - overloaded_before}
        self.cycle_log.append(record)
        if acked > 0 and in_flight > 0:
            self.stats["cycles_with_traffic"] += 1
        if self.progress:
            print(
                f"cycle {number}/{self.cycles}: killed {victim} after {after:.2f} s ({in_flight} in flight for it, {acked} acked "
                f"this cycle), down {down:.2f} s, restarted in {restart_s:.2f} s; {record['overloaded']} overloaded, "
                f"{sum(len(d.unacked) for d in self.devices)} unacked",
                file=sys.stderr, flush=True,
            )

    async def final_drain(self) -> None:
        self.producing = False
        for name in NODES:  # every node and NATS up (the last cycle restarted its victim already)
            if not self.node_alive(name):
                await self.start_node(name)
        if not self.nats_up:
            await self.start_nats()
        # Every device reconnects and resends what it has no ack for, as after a restart.
        for device in self.devices:
            client = device.client
            if client is not None and not client.closed:
                self.leaving.add(device.name)
                await client.close()
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        idle_since: dict[str, float] = {}
        while time.monotonic() < deadline:
            if not any(d.unacked for d in self.devices) and not self.missing():
                break
            now = time.monotonic()
            for device in self.devices:
                # Unacked with nothing in flight on a live session (an error left it): reconnect.
                if device.unacked and not self.device_in_flight[device.name] and device.client is not None:
                    since = idle_since.setdefault(device.name, now)
                    if now - since > 5.0:
                        self.fail(f"{device.name}: {len(device.unacked)} unacked and none in flight in the drain")
                        self.leaving.add(device.name)
                        await device.client.close()
                        idle_since.pop(device.name, None)
                else:
                    idle_since.pop(device.name, None)
            await asyncio.sleep(0.05)
        await self.end_drain(self.loops)

    async def run(self) -> dict:
        self.started = time.monotonic()
        async with DemoIssuer() as alpha, DemoIssuer() as beta:
            self.issuers = {"alpha": alpha, "beta": beta}
            try:
                await self.setup()
                self.loops = [asyncio.create_task(self.device_loop(d)) for d in self.devices]
                for number in range(1, self.cycles + 1):
                    await self.cycle(number)
                await self.final_drain()
            finally:
                for task in self.loops:
                    task.cancel()
                if self.loops:
                    await asyncio.wait(self.loops)
                for node in self.nodes.values():
                    await node.stop()
                if self.nats is not None:
                    await self.nats.stop()
        return self.report(time.monotonic() - self.started)

    def report(self, elapsed_s: float) -> dict:
        counts = crash.CrashTest.report(self, elapsed_s)
        problems = counts.pop("problems")
        ok = counts.pop("ok")
        for name in ("resend", "gateway_starts"):
            counts.pop(name, None)
        victims = {name: sum(1 for c in self.cycle_log if c["victim"] == name) for name in ("nats", *NODES)}
        counts.update({
            "kill": self.kill_mode,
            "kills_node": self.stats["kills_node"],
            "kills_nats": self.stats["kills_nats"],
            "kills_by_victim": victims,
            "cycles_with_traffic": self.stats["cycles_with_traffic"],
            "in_flight_at_kills": sum(c["in_flight_at_kill"] for c in self.cycle_log),
            "overloaded": self.stats["overloaded"],
            "overloaded_resends": self.stats["overloaded_resends"],
            "order_violations_after_refusal": self.stats["order_violations_after_refusal"],
            "order_violations_after_cut": self.stats["order_violations_after_cut"],
            # Neither (the seq checks of crash.CrashTest.receive included).
            "order_violations_unexplained": (counts["order_violations"] - self.stats["order_violations_after_refusal"]
                                             - self.stats["order_violations_after_cut"]),
            "redirects": self.stats["redirects"],
            "sessions_left": self.stats["sessions_left"],
            "node_starts": sum(node.starts for node in self.nodes.values()),
            "nats_starts": self.nats_starts,
            "request_timeout_s": self.request_timeout_s,
            "elapsed_s": round(elapsed_s, 1),
        })
        counts["ok"] = ok
        counts["problems"] = problems
        if not ok:
            counts["events"] = [f"{t:.2f} {what}" for t, what in self.events]
        return counts


async def run(
    *, cycles: int = 50, kill: str | Sequence[str] = "node", users_per_node: int = 1, seed: int = 1,
    data_dir: Path | None = None, pipeline: int = 4, offline: float = 0.2, min_delay: float = 0.3,
    max_delay: float = 2.0, max_down: float = 3.0, window: int = 8, durability: str = "sync",
    forget_acks: float = 0.002, request_timeout_s: float = 2.0, progress: bool = False, timeout_s: float | None = None,
) -> dict:
    """Run the cluster crash test and return its counts (``counts["ok"]`` tells whether it passed).

    ``kill``: "node", "nats", "mixed", or one of "node"/"nats" per cycle. ``data_dir``: an empty
    folder for the nodes' and NATS's data and logs (default: a temporary one, removed)."""
    temporary = data_dir is None
    if temporary:
        data_dir = Path(tempfile.mkdtemp(prefix="interlink-cluster-crash-"))
    test = ClusterCrashTest(
        cycles=cycles, kill=kill, users_per_node=users_per_node, seed=seed, data_dir=Path(data_dir) / "cluster",
        pipeline=pipeline, offline=offline, min_delay=min_delay, max_delay=max_delay, max_down=max_down, window=window,
        durability=durability, forget_acks=forget_acks, request_timeout_s=request_timeout_s, progress=progress,
    )
    if timeout_s is None:
        # Each cycle's phases are bounded; this bounds the whole run should anything else stall.
        timeout_s = (120.0 + cycles * (max_delay + max_down + START_ATTEMPTS * START_TIMEOUT_S)
                     + DRAIN_TIMEOUT_S + WIND_DOWN_S)
    try:
        async with asyncio.timeout(timeout_s):
            return await test.run()
    finally:
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50, help="SIGKILLs (default 50)")
    parser.add_argument("--kill", default="node", choices=KILL_MODES,
                        help="what each cycle kills: a random node, the NATS server, or either at random (default node)")
    parser.add_argument("--users-per-node", type=int, default=1,
                        help="users of each provider homed on each node, two devices each (default 1: 6 users)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pipeline", type=int, default=4, help="messages in flight per device (default 4)")
    parser.add_argument("--offline", type=float, default=0.2,
                        help="chance a session leaves on its own after a while (default 0.2)")
    parser.add_argument("--min-delay", type=float, default=0.3, help="earliest kill, s after the last restart (default 0.3)")
    parser.add_argument("--max-delay", type=float, default=2.0, help="latest kill, s after the last restart (default 2.0)")
    parser.add_argument("--max-down", type=float, default=3.0, help="longest time the victim stays down, s (default 3.0)")
    parser.add_argument("--request-timeout", type=float, default=2.0, help="the nodes' cluster.request_timeout_s (default 2.0)")
    parser.add_argument("--window", type=int, default=8, help="push window per device (default 8)")
    parser.add_argument("--durability", default="sync", choices=["sync", "async"])
    parser.add_argument("--forget-acks", type=float, default=0.002,
                        help="chance an ack is treated as lost: resent on the next session, must be acked dup (default 0.002)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="keep the nodes' data and logs (node-*.log, nats/) here (default: temporary)")
    parser.add_argument("--timeout", type=float, default=None, help="bound on the whole run, s (default: from --cycles)")
    parser.add_argument("--quiet", action="store_true", help="no per-cycle progress on stderr")
    args = parser.parse_args()
    if args.cycles < 1 or args.users_per_node < 1 or args.pipeline < 1 or not 0 <= args.offline < 1:
        parser.error("need --cycles >= 1, --users-per-node >= 1, --pipeline >= 1, 0 <= --offline < 1")
    if not 0 <= args.min_delay <= args.max_delay or args.max_down < 0:
        parser.error("need 0 <= --min-delay <= --max-delay and --max-down >= 0")
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
    import uvloop

    counts = uvloop.run(run(
        cycles=args.cycles, kill=args.kill, users_per_node=args.users_per_node, seed=args.seed, data_dir=args.data_dir,
        pipeline=args.pipeline, offline=args.offline, min_delay=args.min_delay, max_delay=args.max_delay,
        max_down=args.max_down, window=args.window, durability=args.durability, forget_acks=args.forget_acks,
        request_timeout_s=args.request_timeout, progress=not args.quiet, timeout_s=args.timeout,
    ))
    print(json.dumps(counts, indent=2))
    sys.exit(0 if counts["ok"] else 1)


if __name__ == "__main__":
    main()
