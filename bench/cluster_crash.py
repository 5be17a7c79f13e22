"""Crash test of a cluster (issue 18's fault goal): SIGKILL one node, or the NATS server, under
cross-node 1:1 and group traffic.

    python bench/cluster_crash.py --cycles 50 --kill node --seed 1
    python bench/cluster_crash.py --cycles 50 --kill nats --seed 1

Three gateway nodes (``node-a``, ``node-b``, ``node-c``), each a child process
(``interlink.load.child`` with ``--cluster-config``: its own data folder, port and ``[cluster]``
table, every node's certificate under one operator root), joined through one ``nats-server``
child on a fixed loopback port (``interlink.load.nats.LocalNats``). This process runs two demo
OpenID issuers (providers ``alpha`` and ``beta``, which accept each other's users) and the
clients: ``--users-per-node`` users of each provider homed on each node (by the cluster's own
rendezvous hashing), two devices each. A 1:1 message goes to a random user homed on *another*
node than its sender (so each one is relayed over NATS and acked only after that node's
commit), with one ciphertext per recipient device and an ``own`` copy for the sender's other
device (stored on the sender's node after the recipient's node acked); ids and ciphertexts are
those of ``bench/crash.py``, whose ledger and checks this reuses (its ``CrashTest``:
``receive``, ``check_delivery``, ``missing``, ``report``).

Groups (``--groups``, default 3; 0: 1:1 traffic only): before the first kill, ``group.new`` by a
user of one node (in turn) creates groups whose members live on every node (the first has every
user; each other one, one or more users of each node, at random); a group's id, drawn by its
creator's node, names its home node, and ids are drawn again (the extra groups stay unused)
until the groups' homes are spread over the nodes (one each with 3 groups). With chance
``--group-share`` a member device's new message goes to one of its user's groups: one ciphertext
``b`` naming its id, sender device, counter and group, relayed to the group's home unless homed
on the sender's node, acked after the home's commit, which stores the copies of the home's
members and one outbox entry per other member node, streamed there until stored
(``core/domain/outbox.py``). Every device of every member except the sending one must get it
(its own other device too, as a ``dlv`` with ``g`` and no ``to``), once, with that ``b``.

Every device runs for the whole test: it connects through a random live node (the SDK follows
``bye redirect`` to its home), resends in order and with the same ids everything it has no
``ack`` for, then sends new messages, ``--pipeline`` in flight. An ``err overloaded`` (the
recipient's node, the group's home or NATS did not answer within ``cluster.request_timeout_s``)
is waited out for its ``retry_after`` and the same id sent again on the same session (group
messages too, docs/protocol.md §6). A device keeps its order per stream — its 1:1 messages, and
its messages to each group (a cluster may deliver a 1:1 and a group message in either order):
while a refused message of a stream waits for its resend, nothing of that stream is sent (a new
message goes to another stream whose refusals are settled, or waits); the refused messages of a
stream are resent in the order the device first sent them, whatever order the refusals came in
(a message sent before an earlier one's refusal was read can be refused before it); and an
unacked one is resent on a new session only once its stream has no refused message waiting. A
session that ends because its node was killed is reconnected (retrying while the home is down)
and everything unacked is resent. With probability ``--offline`` a session leaves on its own
after a while and the device stays away for a moment, so backlogs and the push window (8) are
crossed by kills too. As in ``bench/crash.py`` a fraction ``--forget-acks`` of acks is ignored
on purpose: those messages (1:1 or group) are resent on the device's next session and must be
acked ``dup``.

Each cycle: traffic runs for a random ``--min-delay``..``--max-delay`` s (and on until a first
message of the cycle is acked and a message involving the victim is in flight: the kill always
cuts traffic that flows; none within 20 s of the last restart is a stall, an error), then the
victim gets SIGKILL — with ``--kill node`` a random node, with ``--kill nats`` the NATS server
(``mixed``: one of the two at random) — stays down for a random 0..``--max-down`` s (around the
request timeout, so that stanzas are cut both before and after their deadline), and is started
again (a node on the same port and data folder; NATS on the same port, to which the nodes
reconnect by themselves). A message involves a node killed if it is its sender's home, or its
recipient's, or its group's home (a group message's copies for a killed member node wait in
its home's outbox: the drain checks they arrive). After the last cycle: every session is
closed, every device reconnects, resends what is unacked and stops sending; then the drain runs
until every expected delivery arrived and a quiet period passed, and each device reconnects
once without reading to see ``welcome.pending``.

Checks (all must be 0, else the exit status is 1) are ``bench/crash.py``'s, over 1:1 and group
messages together: ``lost`` (acked and never delivered to an addressed device: for a group
message, every device of every member but the sending one), ``duplicates`` (after client
dedup, or stored twice), ``order_violations`` (for 1:1 messages per sender device and recipient
device, for group messages per sender device, recipient device and group, by the sender's
counter, both streams apart; each is also counted by what happened to the message that arrived
late: ``_after_refusal``, it had been answered ``overloaded``; ``_after_cut``, else a send of it
had ended without an answer (its session's end); ``_unexplained``, neither), ``misdelivered``
(for a group message also: to a device it does not name, with ``to``, or another ``b``),
``resend_not_dup``, ``unacked_at_end``, ``pending_after_drain`` and ``errors`` (refusals other
than ``overloaded``, a live session that ended, no answer within 15 s on a live session, a device
that cannot connect to its live home). The ``group_`` keys give the group part: messages sent and
acked, deliveries expected and made, ``group_lost``, ``group_stored_twice`` (stored twice in a
device's mailbox; a group message handed out twice by one ``Client`` is in ``duplicates`` only)
and ``group_order_violations``. ``cycles_with_traffic`` counts the cycles in which messages were
acked before the kill and messages involving the victim were in flight at the kill
(``group_in_flight_at_kills``: how many of those were group messages). Prints the counts as one
JSON object. ``tests/e2e/test_cluster_crash.py`` imports ``run`` with small numbers;
``make cluster-stress`` runs 50 cycles.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
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


GROUP_CREATE_ATTEMPTS = 60  # group.new calls per group wanted, drawing ids until their homes are spread


@dataclass(eq=False)
class GroupMessage(crash.Message):
    """A group message in the ledger: ``to``, ``c`` and ``own`` stay empty; ``b`` is its one
    ciphertext, ``recipients`` every (user, device) it must reach: every device of every member
    but the sending one."""

    g: bytes = b""
    b: bytes = b""
    recipients: tuple = ()

    def targets(self) -> list[tuple[str, int]]:
        return list(self.recipients)


def _group_payload(msg_id: bytes, sender: str, device: int, counter: int, g: bytes) -> bytes:
    # Opaque to the gateway, like crash._payload: one ciphertext for every member device.
    return b"crash-group|%s|%s|%d|%d|%s" % (msg_id.hex().encode(), sender.encode(), device, counter, g.hex().encode())


def stream_of(message: crash.Message) -> bytes | None:
    """The stream a message's order is kept in: its group, or None for the device's 1:1 messages
    (docs/protocol.md §6: a cluster may deliver a 1:1 and a group message in either order)."""
    return message.g if isinstance(message, GroupMessage) else None


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
        forget_acks: float, request_timeout_s: float, progress: bool, groups: int = 3, group_share: float = 0.3,
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
        if groups < 0 or not 0 <= group_share <= 1:
            raise ValueError("need groups >= 0 and 0 <= group_share <= 1")
        self.group_count = groups
        self.group_share = group_share
        self.group_rng = random.Random(f"{seed}/groups")
        self.groups: dict[bytes, dict] = {}  # g -> {"index", "home", "members"}
        self.groups_of: dict[str, list[bytes]] = {user: [] for user in self.users}  # user -> its groups
        self.groups_created = 0  # group.new calls, the groups not used included

    # -- time and events

    def now(self) -> float:
        return round(time.monotonic() - self.started, 4)

    def event(self, text: str) -> None:
        self.events.append((self.now(), text))

    def track(self, message: crash.Message, what: str) -> None:
        self.history[message.msg_id].append((self.now(), what))

    # -- the recipients: another node's users

    def new_message(self, device: crash.Device) -> crash.Message:
        # As crash.CrashTest.new_message, to a user homed on another node than the sender.
        to = device.rng.choice([u for u in self.users if self.home[u] != self.home[device.user]])
        return self._message_to(device, to)

    def new_group_message(self, device: crash.Device, g: bytes) -> GroupMessage:
        """A message to group ``g`` (of which the device's user is a member): for every device of
        every member but this one."""
        device.counter += 1
        msg_id = os.urandom(16)
        recipients = tuple((user, d) for user in self.groups[g]["members"] for d in range(1, DEVICES_PER_USER + 1)
                           if (user, d) != (device.user, device.device))
        message = GroupMessage(msg_id, device.user, device.device, device.counter, "", {}, {}, g=g,
                               b=_group_payload(msg_id, device.user, device.device, device.counter, g),
                               recipients=recipients)
        self.messages[msg_id] = message
        device.unacked[device.counter] = message
        self.stats["messages_sent"] += 1
        self.stats["group_messages_sent"] += 1
        return message

    def next_message(self, device: crash.Device, is_open) -> crash.Message | None:
        """The device's next new message: to a group of its user with chance ``group_share``, else
        1:1 — to a stream ``is_open`` (no refused message of it waits for its resend), falling back
        to another open one; None when none is open."""
        groups = self.groups_of[device.user]
        if groups and device.rng.random() < self.group_share:
            choice = device.rng.choice(groups)
        else:
            choice = None
        if is_open(choice):
            return self.new_message(device) if choice is None else self.new_group_message(device, choice)
        if is_open(None):
            return self.new_message(device)
        groups = [g for g in groups if is_open(g)]
        return self.new_group_message(device, device.rng.choice(groups)) if groups else None

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
        # A device that wants its order kept sends nothing new in a stream while a refused message
        # of it waits for its resend, and resends the refused ones in the order it first sent them
        # (docs/protocol.md §6): the resends go before anything sent after them, and in the
        # device's order whatever order the refusals came in. The streams: its 1:1 messages
        # (None), and its messages to each group.
        refused_now: collections.Counter = collections.Counter()  # stream -> refused messages not yet answered
        to_resend: dict = collections.defaultdict(set)  # stream -> counters of refused messages not yet resent
        changed = [asyncio.Event()]  # set (and replaced) whenever either changes

        def notify() -> None:
            changed[0].set()
            changed[0] = asyncio.Event()

        def is_open(stream: bytes | None) -> bool:
            return not refused_now[stream]

        def node_gone() -> bool:
            return not node.alive or node.starts != incarnation

        async def send_one(message: crash.Message) -> None:
            self.in_flight[message.msg_id] = message
            self.device_in_flight[device.name] += 1
            stream = stream_of(message)
            was_refused = False
            try:
                while True:
                    try:
                        if stream is None:
                            ack = await client.send_message(message.to, message.c, own=message.own,
                                                            msg_id=message.msg_id, timeout_s=SEND_TIMEOUT_S)
                        else:
                            ack = await client.send_group_message(stream, message.b, msg_id=message.msg_id,
                                                                  timeout_s=SEND_TIMEOUT_S)
                        break
                    except ServerError as exc:
                        if exc.code != "overloaded":
                            self.fail(f"{device.name} #{message.counter}: refused {exc.code}: {exc}")
                            return
                        self.stats["overloaded"] += 1
                        if stream is not None:
                            self.stats["group_overloaded"] += 1
                        self.refused[message.msg_id] += 1
                        if not was_refused:
                            was_refused = True
                            refused_now[stream] += 1
                        to_resend[stream].add(message.counter)
                        self.track(message, f"overloaded ({str(exc)[:60]})")
                        await asyncio.sleep(retry_after_s(exc))
                        # After every refused message of its stream the device sent before it.
                        while not client.closed and min(to_resend[stream]) < message.counter:
                            await changed[0].wait()
                        to_resend[stream].discard(message.counter)
                        notify()
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
                    to_resend[stream].discard(message.counter)
                    refused_now[stream] -= 1
                    notify()
            if ack.get("t") == "ack":
                self.track(message, "acked dup" if ack.get("dup") else "acked")
            if not self.take_ack(device, message, ack):
                return
            if not message.acked and stream is not None:
                self.stats["group_messages_acked"] += 1
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

        async def slot_for(pick) -> crash.Message | None:
            """A slot and ``pick()``'s message, picked at a moment when no refused message of its
            stream waits for its resend (that one goes before anything after it: docs/protocol.md
            §6); None, with no slot held, once the session is closed."""
            while True:
                await slots.acquire()
                if client.closed:
                    slots.release()
                    return None
                message = pick()
                if message is not None:
                    return message
                slots.release()  # its stream was refused while this waited for a slot
                await changed[0].wait()

        for message in list(device.unacked.values()):
            if message.msg_id in self.in_flight:  # already being resent by its own refusal's loop
                continue
            if await slot_for(lambda: message if is_open(stream_of(message)) else None) is None:
                break
            if message.msg_id in self.in_flight:
                slots.release()
                continue
            launch(message)
        else:
            while self.producing:
                message = await slot_for(lambda: self.next_message(device, is_open) if self.producing else False)
                if message is None:
                    break
                if message is False:  # the drain began while this waited
                    slots.release()
                    break
                launch(message)
        if tasks:
            await asyncio.gather(*tasks)

    # -- the ledger: order violations, explained

    def check_delivery(self, device: crash.Device, stanza: dict) -> None:
        before = self.stats["order_violations"]
        if "g" in stanza:
            stream = self.check_group_delivery(device, stanza)
        else:
            super().check_delivery(device, stanza)
            stream = (stanza["from"], stanza["dev"])
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
            # The message delivered late, the one delivered before it, and the sender device's
            # messages between them (of any stream), with their histories (times to 0.1 ms).
            last = device.last_counter.get(stream)
            between = sorted((m for m in self.messages.values()
                              if (m.sender, m.device) == (message.sender, message.device)
                              and message.counter <= m.counter <= last), key=lambda m: m.counter)
            detail = " | ".join(f"#{m.counter} {m.msg_id.hex()[:8]} to {self.target(m)}: "
                                + ", ".join(f"{t:.4f} {what}" for t, what in self.history[m.msg_id])
                                for m in between[:8] + between[8:][-1:])
            self.note(f"  ({kind}) at {self.now():.4f} on {device.name}: {detail}")

    def check_group_delivery(self, device: crash.Device, stanza: dict) -> tuple:
        """As ``crash.CrashTest.check_delivery`` for a group message (its ``dlv`` has ``g``, no
        ``to``): to a device it names, with its ciphertext, and in order per (sender device,
        recipient device, group) — kept apart from the 1:1 order. Returns that stream's key."""
        message = self.messages.get(stanza["id"])
        stream = (stanza["from"], stanza["dev"], stanza["g"])
        if not isinstance(message, GroupMessage) or (message.sender, message.device, message.g) != stream:
            self.stats["misdelivered"] += 1
            self.note(f"{device.name}: a delivery of an unknown group message {stanza['id'].hex()}")
            return stream
        if (device.user, device.device) not in message.recipients or "to" in stanza or stanza["c"] != message.b:
            self.stats["misdelivered"] += 1
            self.note(f"{device.name}: group message {message.counter} of {message.sender}/{message.device} "
                      "misdelivered")
            return stream
        self.stats["group_delivered"] += 1
        last = self.out_of_order(device, stream, message.counter)
        if last is not None:
            self.stats["group_order_violations"] += 1
            self.note(f"{device.name}: #{message.counter} of {stream[0]}/{stream[1]} in group "
                      f"{self.group_name(stream[2])} after #{last}")
        return stream

    def group_name(self, g: bytes) -> str:
        group = self.groups.get(g)
        return f"g{group['index']} ({g.hex()[:8]}, home {group['home']})" if group else g.hex()[:8]

    def target(self, message: crash.Message) -> str:
        return f"group {self.group_name(message.g)}" if isinstance(message, GroupMessage) else message.to

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

    def answering(self, message: crash.Message) -> tuple[str, str]:
        """The nodes a message's ack depends on: its sender's, and its recipient's or its group's
        home (which acks once its commit stored the copies and the outbox entries for the other
        member nodes)."""
        if isinstance(message, GroupMessage):
            return self.home[message.sender], self.groups[message.g]["home"]
        return self.home[message.sender], self.home[message.to]

    async def create_groups(self) -> None:
        """``group_count`` groups, each with users homed on every node (the first: every user),
        created by a user of one node (in turn); their ids, drawn by the creator's node, are drawn
        again (``group.new`` once more) until the groups' homes are spread over the nodes."""
        wanted = collections.Counter(NODES[i % len(NODES)] for i in range(self.group_count))
        users_on = {node: [u for u in self.users if self.home[u] == node] for node in NODES}
        by_name = {(d.user, d.device): d for d in self.devices}
        rng = self.group_rng
        while len(self.groups) < self.group_count:
            index = len(self.groups)
            if index == 0:
                members = list(self.users)
            else:
                members = [u for node in NODES
                           for u in rng.sample(users_on[node], rng.randint(1, len(users_on[node])))]
            creator = rng.choice(users_on[NODES[index % len(NODES)]])
            if creator not in members:
                members.append(creator)
            client = await self.connect(by_name[(creator, 1)])
            try:
                while True:
                    if self.groups_created >= GROUP_CREATE_ATTEMPTS * self.group_count:
                        raise RuntimeError(f"{self.groups_created} group.new did not give homes {dict(wanted)}")
                    res = await client.iq("group.new", members=[m for m in members if m != creator],
                                          timeout_s=SEND_TIMEOUT_S)
                    self.groups_created += 1
                    g = res["g"]
                    home = self.membership.home(g)
                    if wanted[home] > 0:
                        break
            finally:
                await client.close()
            wanted[home] -= 1
            ordered = [u for u in self.users if u in members]
            self.groups[g] = {"index": index, "home": home, "members": ordered}
            for user in ordered:
                self.groups_of[user].append(g)
            self.event(f"group g{index} {g.hex()[:8]} homed on {home}, created by {creator}, members {ordered}")

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
        await self.create_groups()

    # -- phases

    async def cycle(self, number: int) -> None:
        victim_kind = self.schedule[number - 1]
        delay = self.rng.uniform(self.min_delay, self.max_delay)
        started = time.monotonic()
        down = self.rng.uniform(0.0, self.max_down)
        victim = self.rng.choice(NODES) if victim_kind == "node" else "nats"
        acked_before = self.stats["messages_acked"]
        group_acked_before = self.stats["group_messages_acked"]
        overloaded_before = self.stats["overloaded"]
        await asyncio.sleep(delay)

        def involving() -> int:
            # What the kill cuts: messages waiting for an answer that involve the victim (every
            # message crosses NATS, or waits for a group home's fan-out over it; a node: its own
            # senders' and its recipients', or the groups' homed there).
            return sum(1 for m in self.in_flight.values() if victim == "nats" or victim in self.answering(m))

        def involving_groups() -> int:
            return sum(1 for m in self.in_flight.values()
                       if isinstance(m, GroupMessage) and (victim == "nats" or victim in self.answering(m)))

        # Under traffic: if nothing was acked since the last restart yet (the senders' pipelines
        # still wait out the deadlines of what that kill cut), the kill waits for the first ack,
        # and for a message involving the victim to be in flight.
        resume_deadline = time.monotonic() + RESUME_TIMEOUT_S
        while (self.stats["messages_acked"] == acked_before or not involving()) and time.monotonic() < resume_deadline:
            await asyncio.sleep(0.001)
        after = time.monotonic() - started
        acked, in_flight, group_in_flight = self.stats["messages_acked"] - acked_before, involving(), involving_groups()
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
                  "restart_s": round(restart_s, 2), "acked_before_kill": acked,
                  "group_acked_before_kill": self.stats["group_messages_acked"] - group_acked_before,
                  "in_flight_at_kill": in_flight, "group_in_flight_at_kill": group_in_flight,
                  "overloaded": self.stats["overloaded"] - overloaded_before}
        self.cycle_log.append(record)
        if acked > 0 and in_flight > 0:
            self.stats["cycles_with_traffic"] += 1
        if self.progress:
            print(
                f"cycle {number}/{self.cycles}: killed {victim} after {after:.2f} s ({in_flight} in flight for it, {acked} acked "
                f"this cycle; groups: {group_in_flight}, {record['group_acked_before_kill']}), down {down:.2f} s, "
                f"restarted in {restart_s:.2f} s; {record['overloaded']} overloaded, "
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
        group_messages = [m for m in self.messages.values() if isinstance(m, GroupMessage)]
        group_expected = sum(len(m.recipients) for m in group_messages if m.acked)
        counts["deliveries_expected"] += group_expected
        missing = self.missing()
        group_ids = {m.msg_id for m in group_messages}
        counts.update({
            "groups": len(self.groups),
            "group_homes": {node: sum(1 for g in self.groups.values() if g["home"] == node) for node in NODES},
            "group_members": [len(g["members"]) for g in self.groups.values()],
            "groups_created": self.groups_created,
            "group_messages_sent": self.stats["group_messages_sent"],
            "group_messages_acked": self.stats["group_messages_acked"],
            "group_deliveries_expected": group_expected,
            "group_delivered": self.stats["group_delivered"],
            # Within the totals above (lost, duplicates, order_violations); here the group part.
            "group_lost": sum(1 for _, m in missing if isinstance(m, GroupMessage)),
            "group_stored_twice": sum(1 for d in self.devices for (_, msg_id), seqs in d.seqs.items()
                                      if msg_id in group_ids and len(seqs) > 1),
            "group_order_violations": self.stats["group_order_violations"],
            "group_overloaded": self.stats["group_overloaded"],
        })
        counts.update({
            "kill": self.kill_mode,
            "kills_node": self.stats["kills_node"],
            "kills_nats": self.stats["kills_nats"],
            "kills_by_victim": victims,
            "cycles_with_traffic": self.stats["cycles_with_traffic"],
            "in_flight_at_kills": sum(c["in_flight_at_kill"] for c in self.cycle_log),
            "group_in_flight_at_kills": sum(c["group_in_flight_at_kill"] for c in self.cycle_log),
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
    groups: int = 3, group_share: float = 0.3,
) -> dict:
    """Run the cluster crash test and return its counts (``counts["ok"]`` tells whether it passed).

    ``kill``: "node", "nats", "mixed", or one of "node"/"nats" per cycle. ``data_dir``: an empty
    folder for the nodes' and NATS's data and logs (default: a temporary one, removed). ``groups``:
    groups spanning the three nodes (0: 1:1 traffic only); ``group_share``: the chance a member's
    new message goes to one of its groups."""
    temporary = data_dir is None
    if temporary:
        data_dir = Path(tempfile.mkdtemp(prefix="interlink-cluster-crash-"))
    test = ClusterCrashTest(
        cycles=cycles, kill=kill, users_per_node=users_per_node, seed=seed, data_dir=Path(data_dir) / "cluster",
        pipeline=pipeline, offline=offline, min_delay=min_delay, max_delay=max_delay, max_down=max_down, window=window,
        durability=durability, forget_acks=forget_acks, request_timeout_s=request_timeout_s, progress=progress,
        groups=groups, group_share=group_share,
    )
    if timeout_s is None:
        # Each cycle's phases are bounded; this bounds the whole run should anything else stall.
        timeout_s = (120.0 + cycles * (max_delay + max_down + START_ATTEMPTS * START_TIMEOUT_S)
                     + DRAIN_TIMEOUT_S + WIND_DOWN_S)
    return await crash.run_bounded(test, timeout_s, data_dir if temporary else None)


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
    parser.add_argument("--groups", type=int, default=3,
                        help="groups with users of every node, homed on different nodes "
                        "(default 3; 0: 1:1 traffic only)")
    parser.add_argument("--group-share", type=float, default=0.3,
                        help="chance a member's new message goes to one of its groups (default 0.3)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="keep the nodes' data and logs (node-*.log, nats/) here (default: temporary)")
    parser.add_argument("--timeout", type=float, default=None, help="bound on the whole run, s (default: from --cycles)")
    parser.add_argument("--quiet", action="store_true", help="no per-cycle progress on stderr")
    args = parser.parse_args()
    if args.cycles < 1 or args.users_per_node < 1 or args.pipeline < 1 or not 0 <= args.offline < 1:
        parser.error("need --cycles >= 1, --users-per-node >= 1, --pipeline >= 1, 0 <= --offline < 1")
    if not 0 <= args.min_delay <= args.max_delay or args.max_down < 0:
        parser.error("need 0 <= --min-delay <= --max-delay and --max-down >= 0")
    if args.groups < 0 or not 0 <= args.group_share <= 1:
        parser.error("need --groups >= 0 and 0 <= --group-share <= 1")
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
    import uvloop

    counts = uvloop.run(run(
        cycles=args.cycles, kill=args.kill, users_per_node=args.users_per_node, seed=args.seed, data_dir=args.data_dir,
        pipeline=args.pipeline, offline=args.offline, min_delay=args.min_delay, max_delay=args.max_delay,
        max_down=args.max_down, window=args.window, durability=args.durability, forget_acks=args.forget_acks,
        request_timeout_s=args.request_timeout, progress=not args.quiet, timeout_s=args.timeout, groups=args.groups,
        group_share=args.group_share,
    ))
    print(json.dumps(counts, indent=2))
    sys.exit(0 if counts["ok"] else 1)


if __name__ == "__main__":
    main()
