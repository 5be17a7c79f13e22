"""Group messages in a cluster (issue 18): the ack a group message's sender waits for, and what a
stopped member node does to the group.

    python bench/cluster_groups.py --messages 300 --down-seconds 10
    PYTHONPATH=/tmp/snap-old-pkg python bench/cluster_groups.py --messages 300 --down-seconds 10

Three gateway nodes (``node-a``, ``node-b``, ``node-c``), each ``python -m interlink.cli serve
--config FILE`` in a child process with a ``[cluster]`` table (``bench/cluster_cost.py``'s
``node_config_text`` and ``ClusterNode``), joined through one ``nats-server`` child
(``interlink.load.nats.LocalNats``), all on loopback; one demo OpenID issuer (provider ``bench``)
and the SDK clients (``interlink.client.Client``) in this process. Only what an operator or an
application uses is used (the config file, the CLI, the SDK), so the script runs against an
older tree too: build its extensions (``python setup.py -q build_ext --inplace`` in that tree)
and put first on ``PYTHONPATH`` a folder holding an ``interlink`` folder made of symlinks to the
tree's ``bindings/*`` plus ``core`` and ``ext`` (the package maps ``bindings/`` to ``interlink``,
``core/`` to ``interlink.core``, ``ext/`` to ``interlink.ext``; one symlink to the tree's root
would make a namespace package, which the venv's editable finder fills from the checkout it was
installed from). The node children inherit ``PYTHONPATH``. The report's ``code`` says which tree
this process ran (and any ``interlink`` module it took from elsewhere: must be none) and, per
node child, the folder its compiled modules were loaded from.

The group: two users homed on each node (``interlink.testing.homed_users``), two devices each,
every device connected through node-a (the SDK follows ``bye redirect`` to the user's home). The
sender, a node-a user's device 1, makes groups (``group.new`` with no members; one that is not
homed on node-b is left again) until one's id is homed on node-b (``Membership.home``), then adds
the five other users (``group.add``) and waits for the event on the 11 other devices. So every
message goes node-a → node-b (the home commits) → node-a and node-c (the members' nodes store
their copies).

1. **All up**: ``--messages`` group messages, one in flight (the next leaves on the ack, or
   ``--gap-ms`` after it): ack latency, and delivery latency to the member devices of each node
   (from the send).
2. **Member node down**: node-c is stopped (``--stop term``: SIGTERM, a drain as an operator's
   stop; ``kill``: SIGKILL), then the sender goes on for ``--down-seconds``, one in flight, the
   next as soon as the previous one is answered, refused or not (``retry_after`` is not waited
   out: this counts how many messages a sender gets through): acked, refused (by code; with
   ``unconfirmed``) and their latencies. Then the devices of node-a and node-b must have every
   acked message.
3. **Restart**: node-c is started again (same port and data), its users' devices reconnect; every
   acked message must reach them, in order: how long after the start the last one arrived.
4. **Resend**: what was refused stays in the sender's ``Outbox`` (the SDK keeps ``overloaded``
   for a resend with the same id); ``resend_pending`` sends it again now that node-c is back,
   and every member device must get it.

Checks (the exit status is 1 unless all are 0): ``lost`` (an acked message missing on a member
device other than the sending one), ``duplicates`` (a message stored twice for a device: two
``seq``), ``order_violations`` (on a device, a message first acked arriving after a later one),
``misdelivered`` (to the sending device, or unknown). Each sending phase also reports the CPU
busy (cores) of the nodes and nats-server, of this process, and of everything else on the
machine (``others``: the figures are skewed when it is not near 0). The JSON report goes to
stdout, a short table to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import os
import platform
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import uvloop

import interlink
import interlink.core
from interlink.client import Client, Outbox, Seen
from interlink.core.domain.cluster import Membership
from interlink.core.errors import InterlinkError, ServerError, SessionClosedError
from interlink.load.nats import LocalNats
from interlink.load.procstat import schedstat_s
from interlink.testing import DemoIssuer, free_ports, homed_users, keys_for_nodes


def _load_sibling(file_name: str):
    """A bench script beside this one, as a module (``bench/`` is no package)."""
    name = "interlink_bench_" + file_name.removesuffix(".py")
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name(file_name))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return module


cluster_cost = _load_sibling("cluster_cost.py")
percentile_ms = cluster_cost.percentile_ms  # bench/gateway_load.py's

NODES = ("node-a", "node-b", "node-c")
SENDER_NODE, HOME_NODE, DOWN_NODE = "node-a", "node-b", "node-c"
USERS_PER_NODE = 2
DEVICES_PER_USER = 2
PROVIDER, AUDIENCE = cluster_cost.PROVIDER, cluster_cost.AUDIENCE
HEADER = struct.Struct(">IQ")  # a body starts with the message's index and its send time (perf_counter_ns)
SETTLE_TIMEOUT_S = 60.0  # waiting for deliveries that must come
QUIET_S = 0.5  # then: listening for stray duplicates
GROUP_ATTEMPTS = 64


class NeverSeen(Seen):
    """The SDK drops a redelivered (from, id) by default; here every delivery is handed out, so
    that a message stored twice for a device (a second ``seq``) is seen and counted."""

    def first_time(self, key: tuple) -> bool:
        return True


class Message:
    __slots__ = ("index", "id", "phase", "send_ns", "answer_ns", "outcome", "code", "unconfirmed", "retry_after",
                 "resend")

    def __init__(self, index: int, phase: str) -> None:
        self.index = index
        self.id = os.urandom(16)
        self.phase = phase
        self.send_ns = 0
        self.answer_ns = 0
        self.outcome = ""  # acked | refused | no_answer
        self.code = None
        self.unconfirmed = False
        self.retry_after = None
        self.resend = None  # after the resend: acked | acked_dup | refused:CODE | error


class Device:
    """One member device: its session (a new one after its node's restart) and what reached it."""

    def __init__(self, user: str, device: int, node: str) -> None:
        self.user = user
        self.device = device
        self.node = node
        self.client: Client | None = None
        self.reader: asyncio.Task | None = None
        self.sessions = 0
        self.group_events = 0
        self.seqs: dict[bytes, set[int]] = collections.defaultdict(set)  # message id -> seqs it came with
        self.arrival_ns: dict[bytes, int] = {}  # message id -> its first arrival
        self.order: list[int] = []  # message indexes in first-arrival order
        self.redelivered = 0  # the same seq again (a new session): not a duplicate
        self.duplicates = 0  # another seq for a message already stored for this device
        self.errors: list[str] = []

    @property
    def name(self) -> str:
        return f"{self.user}/{self.device}"


class GroupBench:
    def __init__(self, args, nodes: dict, issuer: DemoIssuer, membership: Membership) -> None:
        self.args = args
        self.nodes = nodes
        self.issuer = issuer
        self.membership = membership
        self.users = homed_users(membership, PROVIDER, USERS_PER_NODE, prefix="member")
        self.devices = [Device(user, number, node) for node in NODES for user in self.users[node]
                        for number in range(1, DEVICES_PER_USER + 1)]
        self.sender_device = self.devices[0]  # a node-a user's device 1
        assert self.sender_device.node == SENDER_NODE and self.sender_device.device == 1
        self.by_id: dict[bytes, Message] = {}
        self.messages: list[Message] = []
        self.g = b""
        self.group_attempts = 0
        self.outbox = Outbox()
        self.unknown_deliveries = 0
        self.nats_pid = 0

    # -- the machine

    def cpu_sample(self) -> tuple[float, float, float, float]:
        """(time, every process's CPU s on every core, the live children's, this process's)."""
        pids = [self.nats_pid] + [node.pid for node in self.nodes.values() if node.alive]
        times = os.times()
        return (time.monotonic(), cluster_cost.machine_busy_s(), sum(schedstat_s(pid)[0] for pid in pids),
                times.user + times.system)

    @staticmethod
    def busy(before: tuple, after: tuple) -> dict:
        """CPU busy (cores) over a phase: the nodes and nats-server, this process (the clients), the
        rest of the machine (other people's work: the figures are skewed when it is not near 0)."""
        elapsed = after[0] - before[0]
        children, load = after[2] - before[2], after[3] - before[3]
        others = max(0.0, after[1] - before[1] - children - load)
        return {"nodes_and_nats": round(children / elapsed, 2), "load": round(load / elapsed, 2),
                "others": round(others / elapsed, 2)}

    # -- sessions

    async def connect(self, device: Device) -> None:
        """Through node-a; the SDK follows the redirect to the user's home."""
        entry = self.nodes[SENDER_NODE]
        token = self.issuer.issue(device.user.split("@")[0], audience=AUDIENCE, expires_in=24 * 3600)
        for attempt in range(1, 6):
            try:
                client = await Client.connect(
                    "127.0.0.1", entry.port, token=token, device=device.device, root_public=entry.root_public,
                    seen=NeverSeen(), outbox=self.outbox if device is self.sender_device else None, timeout_s=10.0)
                break
            except (InterlinkError, OSError) as exc:
                if attempt == 5:
                    raise
                device.errors.append(f"connect attempt {attempt}: {exc!r}")
                await asyncio.sleep(0.2 * attempt)
        if client.node_certificate.node != device.node:
            raise RuntimeError(f"{device.name} landed on {client.node_certificate.node}, not its home {device.node}")
        device.client = client
        device.sessions += 1
        device.reader = asyncio.create_task(self.read(device, client))

    async def read(self, device: Device, client: Client) -> None:
        while True:
            try:
                stanza = await client.recv()
            except SessionClosedError:
                return
            except ServerError as exc:
                device.errors.append(f"unsolicited err {exc.code}")
                continue
            now = time.perf_counter_ns()
            if stanza.get("t") != "dlv" or stanza.get("g") != self.g or not self.g:
                continue
            if stanza.get("k") == "group":
                device.group_events += 1
                continue
            message = self.by_id.get(stanza.get("id"))
            if message is None or device is self.sender_device:
                self.unknown_deliveries += 1
                continue
            seqs = device.seqs[message.id]
            seq = stanza.get("seq")
            if seq in seqs:
                device.redelivered += 1
                continue
            seqs.add(seq)
            if len(seqs) > 1:
                device.duplicates += 1
                continue
            device.arrival_ns[message.id] = now
            device.order.append(message.index)

    async def close_all(self) -> None:
        for device in self.devices:
            if device.client is not None:
                await device.client.close()
        readers = [d.reader for d in self.devices if d.reader is not None]
        if readers:
            await asyncio.wait(readers, timeout=5.0)

    def receivers(self, node: str | None = None) -> list[Device]:
        return [d for d in self.devices if d is not self.sender_device and (node is None or d.node == node)]

    async def settle(self, devices: list[Device], messages: list[Message], timeout_s: float = SETTLE_TIMEOUT_S) -> bool:
        """Until every device has every message (False: the timeout came first), then a quiet moment."""
        deadline = time.monotonic() + timeout_s
        done = False
        while time.monotonic() < deadline:
            if all(m.id in d.arrival_ns for d in devices for m in messages):
                done = True
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(QUIET_S)
        return done

    # -- the group

    async def make_group(self) -> None:
        sender = self.sender_device.client
        while True:
            self.group_attempts += 1
            g = (await sender.iq("group.new", members=[]))["g"]
            if self.membership.home(g) == HOME_NODE:
                break
            await sender.iq("group.leave", g=g)  # its last member: the group is deleted
            if self.group_attempts == GROUP_ATTEMPTS:
                raise RuntimeError(f"no group id homed on {HOME_NODE} in {GROUP_ATTEMPTS} attempts")
        self.g = g
        others = [user for node in NODES for user in self.users[node] if user != self.sender_device.user]
        await sender.iq("group.add", g=g, members=others)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while any(d.group_events < 1 for d in self.receivers()):
            if time.monotonic() > deadline:
                missing = [d.name for d in self.receivers() if d.group_events < 1]
                raise RuntimeError(f"the group event did not reach {missing}")
            await asyncio.sleep(0.01)

    # -- sending

    async def send(self, phase: str) -> Message:
        message = Message(len(self.messages), phase)
        self.messages.append(message)
        self.by_id[message.id] = message
        message.send_ns = time.perf_counter_ns()
        body = HEADER.pack(message.index, message.send_ns).ljust(self.args.payload, b"\0")
        try:
            await self.sender_device.client.send_group_message(
                self.g, body, msg_id=message.id, timeout_s=self.args.answer_timeout_s)
            message.outcome = "acked"
        except ServerError as exc:
            message.outcome, message.code = "refused", exc.code
            message.unconfirmed = bool(exc.fields.get("unconfirmed"))
            message.retry_after = exc.fields.get("retry_after")
        except TimeoutError:
            message.outcome = "no_answer"
        message.answer_ns = time.perf_counter_ns()
        return message

    # -- phases

    async def all_up(self) -> dict:
        before = self.cpu_sample()
        sent = []
        for _ in range(self.args.messages):
            sent.append(await self.send("all_up"))
            if self.args.gap_ms > 0:
                await asyncio.sleep(self.args.gap_ms / 1000)
        cpu_busy = self.busy(before, self.cpu_sample())
        acked = [m for m in sent if m.outcome == "acked"]
        settled = await self.settle(self.receivers(), acked)
        return {
            "messages": len(sent), "acked": len(acked),
            "refused": dict(collections.Counter(m.code for m in sent if m.outcome == "refused")),
            "no_answer": sum(1 for m in sent if m.outcome == "no_answer"),
            "ack_latency_ms": latencies([m.answer_ns - m.send_ns for m in acked]),
            "delivery_latency_ms": {node: latencies([d.arrival_ns[m.id] - m.send_ns for d in self.receivers(node)
                                                     for m in acked if m.id in d.arrival_ns]) for node in NODES},
            "settled": settled, "cpu_busy": cpu_busy,
        }

    async def member_node_down(self) -> dict:
        node = self.nodes[DOWN_NODE]
        began = time.perf_counter()
        if self.args.stop == "kill":
            node.proc.send_signal(signal.SIGKILL)
            await node.proc.wait()
        else:
            await node.stop()  # SIGTERM: the node drains; SIGKILL only after 15 s
        stopped_s = time.perf_counter() - began
        exit_code = node.proc.returncode
        window_began = time.perf_counter()
        before = self.cpu_sample()
        sent = []
        while time.perf_counter() - window_began < self.args.down_seconds:
            sent.append(await self.send("down"))
        window_s = time.perf_counter() - window_began
        cpu_busy = self.busy(before, self.cpu_sample())
        acked = [m for m in sent if m.outcome == "acked"]
        refused = [m for m in sent if m.outcome == "refused"]
        settled = await self.settle([d for d in self.receivers() if d.node != DOWN_NODE], acked)
        # A refusal "unconfirmed" may have been stored at the home all the same.
        refused_delivered = {n: sum(1 for d in self.receivers(n) for m in refused if m.id in d.arrival_ns)
                             for n in NODES if n != DOWN_NODE}
        return {
            "stop": "SIGKILL" if self.args.stop == "kill" else "SIGTERM", "stop_s": round(stopped_s, 2),
            "exit_code": exit_code, "window_s": round(window_s, 2),
            "sent": len(sent), "acked": len(acked), "refused": dict(collections.Counter(m.code for m in refused)),
            "refused_unconfirmed": sum(1 for m in refused if m.unconfirmed),
            "retry_after_ms": sorted({m.retry_after for m in refused if m.retry_after is not None}),
            "no_answer": sum(1 for m in sent if m.outcome == "no_answer"),
            "ack_latency_ms": latencies([m.answer_ns - m.send_ns for m in acked]),
            "refusal_latency_ms": latencies([m.answer_ns - m.send_ns for m in refused]),
            "acked_per_s": round(len(acked) / window_s, 1) if window_s else None,
            "settled_on_live_nodes": settled, "cpu_busy": cpu_busy,
            "refused_copies_delivered_on_live_nodes": refused_delivered,
            "delivery_latency_ms_live_nodes": {
                n: latencies([d.arrival_ns[m.id] - m.send_ns for d in self.receivers(n) for m in acked
                              if m.id in d.arrival_ns]) for n in NODES if n != DOWN_NODE},
        }

    async def restart(self) -> dict:
        node = self.nodes[DOWN_NODE]
        began_ns = time.perf_counter_ns()
        await node.start()
        listening_ns = time.perf_counter_ns()
        for device in self.receivers(DOWN_NODE):
            await self.connect(device)
        connected_ns = time.perf_counter_ns()
        backlog = [m for m in self.messages if m.phase == "down" and m.outcome == "acked"]
        devices = self.receivers(DOWN_NODE)
        settled = await self.settle(devices, backlog, self.args.backlog_timeout_s)
        arrivals = [d.arrival_ns[m.id] for d in devices for m in backlog if m.id in d.arrival_ns]

        def after_start(ns: int | None) -> float | None:
            return round((ns - began_ns) / 1e9, 3) if ns is not None else None

        return {
            "listening_after_s": after_start(listening_ns), "devices_connected_after_s": after_start(connected_ns),
            "backlog_messages": len(backlog), "backlog_devices": len(devices),
            "backlog_copies_arrived": len(arrivals), "backlog_settled": settled,
            "first_backlog_arrival_after_s": after_start(min(arrivals)) if arrivals else None,
            "last_backlog_arrival_after_s": after_start(max(arrivals)) if arrivals else None,
            "pid": node.pid, "code": child_code(node.pid),
        }

    async def resend(self) -> dict:
        before = list(self.outbox.pending())
        began = time.perf_counter()
        answers = await self.sender_device.client.resend_pending(timeout_s=self.args.answer_timeout_s)
        resend_s = time.perf_counter() - began
        outcomes = collections.Counter()
        for stanza, answer in zip(before, answers):
            message = self.by_id[stanza["id"]]
            if isinstance(answer, ServerError):
                message.resend = f"refused:{answer.code}"
            elif isinstance(answer, BaseException):
                message.resend = f"error:{type(answer).__name__}"
            else:
                message.resend = "acked_dup" if answer.get("dup") else "acked"
            outcomes[message.resend] += 1
        resent_acked = [m for m in self.messages if m.resend in ("acked", "acked_dup")]
        settled = await self.settle(self.receivers(), resent_acked)
        return {"pending": len(before), "resend_s": round(resend_s, 3), "outcomes": dict(outcomes),
                "left_in_outbox": len(self.outbox), "settled": settled}

    # -- the checks

    def check(self) -> dict:
        final = [m for m in self.messages if m.outcome == "acked" or m.resend in ("acked", "acked_dup")]
        lost_by_node = collections.Counter()
        for device in self.receivers():
            for message in final:
                if message.id not in device.arrival_ns:
                    lost_by_node[device.node] += 1
        order = 0
        first_acked = {m.index for m in self.messages if m.outcome == "acked"}
        for device in self.receivers():
            last = -1
            for index in device.order:
                if index not in first_acked:
                    continue  # a refused message resent later arrives after later ones
                if index < last:
                    order += 1
                last = max(last, index)
        never_acked = [m for m in self.messages if m not in final]
        return {
            "acked_messages": len(final),
            "lost": sum(lost_by_node.values()), "lost_by_node": dict(lost_by_node),
            "duplicates": sum(d.duplicates for d in self.devices),
            "redelivered_same_seq": sum(d.redelivered for d in self.devices),
            "order_violations": order,
            "misdelivered": self.unknown_deliveries,
            "never_acked": len(never_acked),
            "never_acked_but_delivered": sum(1 for d in self.receivers() for m in never_acked if m.id in d.arrival_ns),
            "device_errors": {d.name: d.errors for d in self.devices if d.errors},
        }


def latencies(values_ns: list[int]) -> dict:
    return {"n": len(values_ns), "p50": percentile_ms(values_ns, 0.50), "p99": percentile_ms(values_ns, 0.99),
            "max": round(max(values_ns) / 1e6, 2) if values_ns else None}


def child_code(pid: int) -> dict:
    """Which tree a node child runs: the folder its compiled modules came from, its PYTHONPATH."""
    ext = None
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            path = line.split(maxsplit=5)[-1] if len(line.split()) >= 6 else ""
            if "/_stanza." in path and path.endswith(".so"):
                ext = os.path.dirname(os.path.realpath(path))
                break
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    except OSError:
        environ = {}
    return {"ext_dir": ext, "pythonpath": environ.get("PYTHONPATH")}


def this_code() -> dict:
    """The tree this process imported ``interlink`` from, its commit, and any module from elsewhere."""
    package = Path(os.path.realpath(interlink.__file__)).parent  # bindings/
    tree = package.parent
    outside = sorted(name for name, module in list(sys.modules.items())
                     if name.startswith("interlink.") and getattr(module, "__file__", None)
                     and not os.path.realpath(module.__file__).startswith(str(tree) + os.sep))

    def git(*arguments: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(tree), *arguments], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"tree": str(tree), "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_changes": bool(status) if status is not None else None,
            "modules_from_elsewhere": outside, "implementation": interlink.core.IMPLEMENTATION}


async def run(args) -> dict:
    folder = Path(args.data_dir)
    ports = dict(zip(NODES, free_ports(len(NODES))))
    keys_for_nodes({node: folder / node / "keys" for node in NODES})
    membership = Membership(NODES, 1)
    async with DemoIssuer() as issuer, LocalNats(folder / "nats") as nats_server:
        nodes = {}
        bench = None
        try:
            for node in NODES:
                config_path = folder / f"{node}.toml"
                config_path.write_text(cluster_cost.node_config_text(
                    node, data_dir=folder / node, ports=ports, nats_url=nats_server.url, issuer=issuer.issuer,
                    durability=args.durability, commit_mode="inline", timeout_s=args.request_timeout_s))
                nodes[node] = cluster_cost.ClusterNode(node, config_path, folder / f"{node}.log", None)
                await nodes[node].start()
            children = {node: {"pid": child.pid, **child_code(child.pid)} for node, child in nodes.items()}
            for node, child in children.items():
                print(f"{node}: pid {child['pid']}, compiled modules from {child['ext_dir']}", file=sys.stderr)
            bench = GroupBench(args, nodes, issuer, membership)
            bench.nats_pid = nats_server.pid
            for device in bench.devices:
                await bench.connect(device)
            await bench.make_group()
            print(f"group {bench.g.hex()} on {HOME_NODE} ({bench.group_attempts} group.new); all up...", file=sys.stderr)
            report = {"all_up": await bench.all_up()}
            print(f"node-c down ({args.stop}) for {args.down_seconds} s...", file=sys.stderr)
            report["down"] = await bench.member_node_down()
            report["restart"] = await bench.restart()
            report["resend"] = await bench.resend()
            report["checks"] = bench.check()
        finally:
            if bench is not None:
                await bench.close_all()
            for node in reversed(list(nodes.values())):
                await node.stop()
        nats_version = nats_server.version
    checks = report["checks"]
    return {
        "benchmark": "cluster-groups",
        "code": {**this_code(), "node_children": children},
        "nodes": list(NODES), "nats_server_version": nats_version, "durability": args.durability,
        "request_timeout_s": args.request_timeout_s, "payload_bytes": args.payload, "messages": args.messages,
        "down_seconds": args.down_seconds, "stop": args.stop, "gap_ms": args.gap_ms,
        "group": {"g": bench.g.hex(), "home": membership.home(bench.g), "group_new_attempts": bench.group_attempts,
                  "members": {node: bench.users[node] for node in NODES}, "devices_per_user": DEVICES_PER_USER,
                  "sender": bench.sender_device.name},
        **report,
        "environment": {"python": platform.python_version(), "uvloop": uvloop.__version__,
                        "machine": f"{platform.machine()} {os.cpu_count()} cores"},
        "ok": checks["lost"] == 0 and checks["duplicates"] == 0 and checks["order_violations"] == 0
              and checks["misdelivered"] == 0,
    }


def _l(figures: dict) -> str:
    return f"{figures['p50']}/{figures['p99']} ms (n {figures['n']})" if figures["n"] else "-"


def format_table(r: dict) -> str:
    code, up, down, restart, resend, checks = r["code"], r["all_up"], r["down"], r["restart"], r["resend"], r["checks"]
    lines = [
        f"cluster groups: {', '.join(r['nodes'])} + nats-server {r['nats_server_version']} on loopback; code {code['tree']} "
        f"at {code['commit']}{' + uncommitted changes' if code['uncommitted_changes'] else ''} ({code['implementation']}); "
        f"durability {r['durability']}, request_timeout_s {r['request_timeout_s']}",
        f"group on {r['group']['home']}, sender {r['group']['sender']} on {SENDER_NODE}, {USERS_PER_NODE} users x "
        f"{DEVICES_PER_USER} devices per node",
        f"all up: {up['acked']}/{up['messages']} acked, ack p50/p99 {_l(up['ack_latency_ms'])}; delivery p50/p99 "
        + ", ".join(f"{n} {_l(v)}" for n, v in up["delivery_latency_ms"].items())
        + f"; CPU busy {up['cpu_busy']}",
        f"{DOWN_NODE} down ({down['stop']}, {down['window_s']} s): sent {down['sent']}, acked {down['acked']} "
        f"(p50/p99 {_l(down['ack_latency_ms'])}), refused {down['refused'] or 0} (p50/p99 {_l(down['refusal_latency_ms'])}, "
        f"unconfirmed {down['refused_unconfirmed']}), no answer {down['no_answer']}; CPU busy {down['cpu_busy']}",
        f"restart: listening after {restart['listening_after_s']} s; backlog {restart['backlog_messages']} messages x "
        f"{restart['backlog_devices']} devices: first after {restart['first_backlog_arrival_after_s']} s, last after "
        f"{restart['last_backlog_arrival_after_s']} s",
        f"resend of what was refused: {resend['pending']} resent in {resend['resend_s']} s: {resend['outcomes'] or '-'}",
        f"exactly once: lost {checks['lost']}, duplicates {checks['duplicates']}, order violations "
        f"{checks['order_violations']}, misdelivered {checks['misdelivered']} -> {'OK' if r['ok'] else 'FAILED'}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300, help="group messages with every node up (default 300)")
    parser.add_argument("--gap-ms", type=float, default=0.0,
                        help="all up: a pause after each ack before the next message (default 0: none)")
    parser.add_argument("--down-seconds", type=float, default=10.0, help="sending while node-c is down (default 10)")
    parser.add_argument("--stop", default="term", choices=["term", "kill"],
                        help="how node-c is stopped: SIGTERM (a drain) or SIGKILL (default term)")
    parser.add_argument("--durability", default="sync", choices=["sync", "async"])
    parser.add_argument("--request-timeout-s", type=float, default=2.0, help="the nodes' cluster.request_timeout_s")
    parser.add_argument("--payload", type=int, default=100, help="body bytes per message (at least 12)")
    parser.add_argument("--answer-timeout-s", type=float, default=15.0, help="the SDK's wait for one answer")
    parser.add_argument("--backlog-timeout-s", type=float, default=60.0,
                        help="after node-c's restart: how long its devices may take to get the backlog")
    parser.add_argument("--data-dir", default=None, help="the nodes' folders and logs (default: temporary, removed)")
    args = parser.parse_args()
    if args.payload < HEADER.size or args.messages < 1 or args.down_seconds <= 0:
        parser.error(f"need --payload >= {HEADER.size}, --messages >= 1, --down-seconds > 0")
    cluster_cost.run_and_report(args, run, format_table, "interlink-cluster-groups-")


if __name__ == "__main__":
    main()
