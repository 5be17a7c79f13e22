"""The cost of a cross-node 1:1 message in a cluster (issue 18): gateway CPU and added latency.

    python bench/cluster_cost.py --rate 2000 --seconds 10 --repeats 3 --cpu-a 0 --cpu-b 0 --cpu-nats 1 --cpu-load 1
    python bench/cluster_cost.py --durability async --rate 2000 5000 --seconds 10 --repeats 3

Issue 18's goal: "gateway CPU per cross-node 1:1 delivery <= 2x a same-node delivery; added
latency p50 <= 1 ms over loopback."

Two gateway nodes (``node-a``, ``node-b``), each ``python -m interlink.cli serve --config FILE`` in
a child process of its own with a ``[cluster]`` table (docs/operations.md "Running a cluster"),
joined through one ``nats-server`` child (``interlink.load.nats.LocalNats``), all on loopback; one
demo OpenID issuer (provider ``bench``) and the lean clients (``interlink.load.peer.LeanPeer``)
in this process. Every device connects straight to its user's home node (``Membership.home``:
a lean peer does not follow ``bye redirect``), and the users are chosen so that

* **same**: senders and recipients are all homed on node A: A stores, commits and delivers;
  node B idles;
* **cross**: senders are homed on node A, recipients on node B: A relays each ``msg`` over NATS
  (batched per loop turn into one NATS message), B stores it in its group commit, delivers it and
  answers; A then acks the sender.

The two phases run on the same nodes in the same run, interleaved (same, cross, same, cross...,
``--repeats`` times), so a before/after comparison comes from one run. Each run:

* **open loop** at each ``--rate`` (messages/s in total over ``--pairs`` senders, sent in bursts
  every 1-2 ms whatever the answers; latencies count from each message's intended send time, as
  in bench/gateway_load.py), 1 s of warm-up, then ``--seconds`` measured;
* **closed loop** (``--latency-seconds``, 0: skipped): ``--latency-pairs`` senders with one
  message in flight each (the next leaves on the ack), for the latency a cross-node hop adds at
  low load.

Measured over each window, from ``/proc/PID/task/*/schedstat`` (``interlink.load.procstat``) of
each child: CPU µs per delivered message on node A, on node B and summed over both nodes (a
cross-node message's work is split between the sender's and the recipient's node; in the same
phase B's share is its idle cost), nats-server's, and this process's (the clients: they must not
saturate their core); run-queue waits (a child ready but its CPU taken: the figures are skewed
when they are not near 0) and ``others_cpu_busy`` (every other process on the machine). Then the
ratio cross/same of the nodes' summed CPU per message (per repeat, from the adjacent pair of
runs, and its median), ack and delivery latency p50/p99 per phase and the p50 a cross-node hop
adds. After each window sending stops and the tail is waited for; every acked message must be
delivered exactly once (``lost``, ``duplicates``: 0), or the exit code is 1. The nodes' own
counters (asked over NATS, as ``interlink cluster status`` does) say how many relayed stanzas
one NATS message carried.

Pinning (``--cpu-a``, ``--cpu-b``, ``--cpu-nats``, ``--cpu-load``; default: none) pins each child
and this process to one CPU. Both nodes on one CPU make the cross phase's two gateways share a
core the same phase's one gateway has to itself, which costs the cross figure most one message at
a time; ``--cpu-a 0 --cpu-b 1 --cpu-nats 1 --cpu-load 0`` gives each node a core of its own beside
one other process in both phases (docs/benchmarks.md, "Where the nodes run"). The JSON report goes
to stdout, a short table to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gateway_load, beside this file

import interlink.core  # noqa: E402
from gateway_load import (  # noqa: E402  the 1:1 senders and recipients of the gateway benchmark
    Recipient, Sender, check_sessions, client_cpu_s, delivery_check, percentile_ms, wait_until,
)
from interlink.config import CLUSTER_NODE_VARIABLE, OTHER_ENV_VARIABLES, ClusterConfig, NodeAddress  # noqa: E402
from interlink.core.domain.cluster import Membership  # noqa: E402
from interlink.core.errors import ConfigError  # noqa: E402
from interlink.load.child import LIFTED_LIMITS, START_TIMEOUT_S, ChildServer  # noqa: E402
from interlink.load.nats import LocalNats  # noqa: E402
from interlink.load.peer import LeanPeer  # noqa: E402
from interlink.load.procstat import schedstat_s  # noqa: E402
from interlink.load.schedule import TIME_BYTES, start_open_loop  # noqa: E402
from interlink.testing import DemoIssuer, free_ports, homed_users, keys_for_nodes  # noqa: E402

AUDIENCE = "bench"
PROVIDER = "bench"
NODES = ("node-a", "node-b")
PHASES = {"same": ("node-a", "node-a"), "cross": ("node-a", "node-b")}  # phase -> (senders' home, recipients')
WARM_UP_S = 1.0
TAIL_TIMEOUT_S = 60.0  # after a window: how long to wait for the last acks and deliveries
QUIET_S = 0.3  # then: how long to listen for stray duplicates
PAUSE_S = 0.5  # between runs: the nodes' sweeps and commits settle
CLK_TCK = os.sysconf("SC_CLK_TCK")
CPU_GOAL_RATIO = 2.0
LATENCY_GOAL_MS = 1.0


# ----------------------------------------------------------------------------- the children


def _child_setup(cpu: int | None) -> None:
    """In the child before exec: die with this process (PR_SET_PDEATHSIG), take its CPU (or all:
    this process may be pinned already)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu} if cpu is not None else set(range(os.cpu_count() or 1)))


def node_config_text(node: str, *, data_dir: Path, ports: dict[str, int], nats_url: str, issuer: str,
                     durability: str, commit_mode: str, timeout_s: float) -> str:
    """One node's TOML file: the gateway benchmark's lifted limits, one provider, the [cluster] table."""
    lifted = "\n".join(f"{key} = {value!r}" for key, value in LIFTED_LIMITS.items())
    nodes = "\n".join(f'{name} = "127.0.0.1:{port}"' for name, port in ports.items())
    return f'''# bench/cluster_cost.py: node {node}
host = "127.0.0.1"
port = {ports[node]}
data_dir = "{data_dir}"
node_name = "{node}"
durability = "{durability}"
commit_mode = "{commit_mode}"
drain_timeout_s = 5.0
{lifted}

[[providers]]
id = "{PROVIDER}"
issuer = "{issuer}"
audience = "{AUDIENCE}"
discovery = true

[cluster]
node = "{node}"
version = 1
nats = ["{nats_url}"]
request_timeout_s = {float(timeout_s)}

[cluster.nodes]
{nodes}
'''


class ClusterNode(ChildServer):
    """``python -m interlink.cli serve --config FILE``: one node, its log in ``log_path``."""

    def __init__(self, node: str, config_path: Path, log_path: Path, cpu: int | None) -> None:
        self.node = node
        self.config_path = config_path
        self.log_path = log_path
        self.cpu = cpu
        self.port = 0
        self.root_public = b""

    async def start(self) -> None:
        # INTERLINK_<KEY> variables would override the file: keep only the build and test switches.
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("INTERLINK_")
               or (name in OTHER_ENV_VARIABLES and name not in (CLUSTER_NODE_VARIABLE, "INTERLINK_CONFIG"))}
        cpu = self.cpu
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "interlink.cli", "serve", "--config", str(self.config_path),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env,
                preexec_fn=lambda: _child_setup(cpu),
            )
        try:
            listening = (await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT_S)).decode()
            root = (await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT_S)).decode()
            if not listening.startswith("listening on ") or "root public key" not in root:
                raise ValueError(f"unexpected output {listening!r} {root!r}")
        except (TimeoutError, ValueError) as exc:
            await self._terminate(0)
            raise ConfigError(f"node {self.node} did not start: {exc!r}; its log ends:\n{self.log_tail()}") from None
        self.port = int(listening.split()[-1].rsplit(":", 1)[1])
        self.root_public = bytes.fromhex(root.split()[-1])

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# ----------------------------------------------------------------------------- measuring


def machine_busy_s() -> float:
    """CPU seconds of every process on every core (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def user_system_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (/proc/PID/stat, 10 ms ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def activity(pid: int) -> tuple[int, int]:
    """(read/write-family system calls, voluntary context switches) of a process, all its threads:
    how often it went to the kernel for a socket or file, and how often it slept and woke up."""
    io = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/io").read_text().splitlines() if ":" in line)
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    switches += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):  # the thread just ended
            continue
    return int(io["syscr"]) + int(io["syscw"]), switches


class Probe:
    """CPU of each child and of this process, and the nodes' relay counters (asked over NATS with
    the ``hello`` request ``interlink cluster status`` uses), at the two ends of a window."""

    def __init__(self, nodes: dict[str, ClusterNode], nats: LocalNats, cluster: ClusterConfig) -> None:
        self.nodes = nodes
        self.nats = nats
        self.cluster = cluster
        self.nc = None

    async def connect(self) -> None:
        import nats

        self.nc = await nats.connect(self.nats.url, name="cluster-cost-probe", allow_reconnect=False)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()

    def cpu(self) -> dict:
        pids = {**{node: child.pid for node, child in self.nodes.items()}, "nats": self.nats.pid}
        return {"children": {name: schedstat_s(pid) for name, pid in pids.items()},
                "activity": {name: activity(pid) for name, pid in pids.items()},
                "user_system": {name: user_system_s(pid) for name, pid in pids.items()},
                "load": client_cpu_s(), "machine": machine_busy_s(), "t": time.monotonic()}

    async def counters(self) -> dict[str, dict]:
        request = msgpack.packb({"from": "cluster-cost", "m": self.cluster.digest})
        found = {}
        for node in self.nodes:
            message = await self.nc.request(f"interlink.{node}.hello", request, timeout=2.0)
            status = msgpack.unpackb(message.data, raw=False, strict_map_key=False)
            found[node] = {**status.get("relay", {}), **{f"link_{k}": v for k, v in status.get("link", {}).items()},
                           "waiting": status.get("waiting", 0)}
        return found


CHILDREN = (("node-a", "node_a"), ("node-b", "node_b"), ("nats", "nats"))


def _per(amount: int, count: int) -> float | None:
    return round(amount / count, 2) if count else None


def _share(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    user, system = after[0] - before[0], after[1] - before[1]
    return round(system / (user + system), 2) if user + system > 0 else None


def _us(seconds: float, count: int) -> float | None:
    return round(seconds / count * 1e6, 1) if count else None


def cpu_figures(before: dict, after: dict, delivered: int) -> dict:
    elapsed = after["t"] - before["t"]
    on_cpu = {name: after["children"][name][0] - before["children"][name][0] for name in after["children"]}
    waits = {name: after["children"][name][1] - before["children"][name][1] for name in after["children"]}
    nodes_cpu = sum(on_cpu[node] for node in NODES)
    load_cpu = after["load"] - before["load"]
    machine = after["machine"] - before["machine"]
    return {
        "seconds": round(elapsed, 2),
        "cpu_us_per_message": {
            "node_a": _us(on_cpu["node-a"], delivered), "node_b": _us(on_cpu["node-b"], delivered),
            "nodes": _us(nodes_cpu, delivered), "nats": _us(on_cpu["nats"], delivered), "load": _us(load_cpu, delivered),
        },
        "cpu_busy": {
            "node_a": round(on_cpu["node-a"] / elapsed, 3), "node_b": round(on_cpu["node-b"] / elapsed, 3),
            "nats": round(on_cpu["nats"] / elapsed, 3), "load": round(load_cpu / elapsed, 3),
            "others": round(max(0.0, machine - nodes_cpu - on_cpu["nats"] - load_cpu) / elapsed, 2),
        },
        "runqueue_wait_s": {"node_a": round(waits["node-a"], 3), "node_b": round(waits["node-b"], 3),
                            "nats": round(waits["nats"], 3)},
        # The kernel's share of each child's CPU (loopback TCP, LMDB writes and fsyncs, futexes).
        "system_share": {short: _share(before["user_system"][name], after["user_system"][name]) for name, short in CHILDREN},
        # Per delivered message: read/write system calls and wake-ups (voluntary context switches).
        "syscalls_per_message": {short: _per(after["activity"][name][0] - before["activity"][name][0], delivered)
                                 for name, short in CHILDREN},
        "wakeups_per_message": {short: _per(after["activity"][name][1] - before["activity"][name][1], delivered)
                                for name, short in CHILDREN},
    }


def relay_figures(before: dict[str, dict], after: dict[str, dict]) -> dict:
    """What the nodes' counters moved by in the window: relayed stanzas, NATS messages carrying them."""
    def moved(node: str, key: str) -> int:
        return after[node].get(key, 0) - before[node].get(key, 0)

    relayed = moved("node-a", "relayed") + moved("node-b", "relayed")
    batches = moved("node-a", "link_batches_out") + moved("node-b", "link_batches_out")
    answered = moved("node-a", "answered") + moved("node-b", "answered")
    answer_batches = moved("node-a", "link_answer_batches_out") + moved("node-b", "link_answer_batches_out")
    return {
        "relayed": relayed, "relay_batches": batches,
        "stanzas_per_relay_batch": round(relayed / batches, 2) if batches else None,
        "answered": answered, "answer_batches": answer_batches,
        "answers_per_batch": round(answered / answer_batches, 2) if answer_batches else None,
        "served_by_node_b": moved("node-b", "served"),
        "timeouts": moved("node-a", "timeouts") + moved("node-b", "timeouts"),
        "late_answers": moved("node-a", "late_answers") + moved("node-b", "late_answers"),
    }


# ----------------------------------------------------------------------------- the devices


class Slot:
    """A connected device whose stanzas go to the run's current ``Sender`` or ``Recipient``: the
    connections stay up for the whole benchmark, each run gets fresh counters."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.peer: LeanPeer | None = None
        self.target = None

    def on_stanza(self, stanza: dict) -> None:
        if self.target is not None:
            self.target.on_stanza(stanza)

    def on_batch_end(self, peer: LeanPeer) -> None:
        if self.target is not None and hasattr(self.target, "on_batch_end"):
            self.target.on_batch_end(peer)


class Bench:
    def __init__(self, args, probe: Probe, slots: dict[str, tuple[list[Slot], list[Slot]]]) -> None:
        self.args = args
        self.probe = probe
        self.slots = slots
        self.peers = [slot.peer for senders, recipients in slots.values() for slot in senders + recipients]

    def _parties(self, phase: str, pairs: int) -> tuple[list[Sender], list[Recipient]]:
        sender_slots, recipient_slots = self.slots[phase]
        senders, recipients = [], []
        for sender_slot, recipient_slot in zip(sender_slots[:pairs], recipient_slots[:pairs]):
            sender, recipient = Sender(recipient_slot.address, self.args.payload), Recipient()
            sender.peer, sender.user = sender_slot.peer, sender_slot.peer.user
            recipient.peer = recipient_slot.peer
            sender_slot.target, recipient_slot.target = sender, recipient
            senders.append(sender)
            recipients.append(recipient)
        return senders, recipients

    async def run(self, phase: str, load: str, rate: float | None, repeat: int) -> dict:
        """One window of one phase: open loop at ``rate``, or closed loop with one message in flight per sender."""
        args = self.args
        open_loop = load == "open"
        pairs = args.pairs if open_loop else args.latency_pairs
        seconds = args.seconds if open_loop else args.latency_seconds
        senders, recipients = self._parties(phase, pairs)

        def delivered() -> int:
            return sum(r.delivered for r in recipients)

        def acked() -> int:
            return sum(len(s.acked_ids) for s in senders)

        def sent() -> int:
            return sum(s.sent for s in senders)

        stop_open_loop = None
        if open_loop:
            stop_open_loop = start_open_loop(senders, rate, time.perf_counter_ns())
        else:
            for sender in senders:
                sender.refill = True
                sender.send(time.perf_counter_ns())
        await asyncio.sleep(WARM_UP_S)
        check_sessions(self.peers)
        window_start_ns = time.perf_counter_ns()
        for party in senders + recipients:
            party.record_from_ns = window_start_ns
        counters_before = await self.probe.counters()
        before = (sent(), acked(), delivered(), self.probe.cpu())
        await asyncio.sleep(seconds)
        after = (sent(), acked(), delivered(), self.probe.cpu())
        counters_after = await self.probe.counters()
        check_sessions(self.peers)
        if stop_open_loop is not None:
            stop_open_loop()
        for sender in senders:
            sender.refill = False
        settled = await wait_until(
            lambda: not any(s.unacked for s in senders) and delivered() >= acked(), self.peers, TAIL_TIMEOUT_S)
        await asyncio.sleep(QUIET_S)
        check = delivery_check(senders, recipients)
        for sender_slot, recipient_slot in zip(*self.slots[phase]):
            sender_slot.target = recipient_slot.target = None
        window_sent, window_acked, window_delivered = (end - start for start, end in zip(before[:3], after[:3]))
        ack_latencies = [ns for s in senders for ns in s.ack_latencies_ns]
        delivery_latencies = [ns for r in recipients for ns in r.delivery_latencies_ns]
        result = {
            "phase": phase, "load": "open loop" if open_loop else "closed loop, 1 in flight per sender",
            "rate_target_per_s": rate, "repeat": repeat, "pairs": pairs,
            "messages_sent": window_sent, "messages_acked": window_acked, "messages_delivered": window_delivered,
        }
        cpu = cpu_figures(before[3], after[3], window_delivered)
        result["delivered_per_s"] = round(window_delivered / cpu["seconds"]) if cpu["seconds"] else None
        result.update(cpu)
        result.update({
            "ack_latency_ms": {"p50": percentile_ms(ack_latencies, 0.50), "p99": percentile_ms(ack_latencies, 0.99)},
            "delivery_latency_ms": {"p50": percentile_ms(delivery_latencies, 0.50),
                                    "p99": percentile_ms(delivery_latencies, 0.99)},
            "latency_samples": len(ack_latencies),
            "relay": relay_figures(counters_before, counters_after),
            "settled": settled,
        })
        result.update(check)
        await asyncio.sleep(PAUSE_S)
        return result


async def connect_slots(args, issuer: DemoIssuer, nodes: dict[str, ClusterNode], membership: Membership
                        ) -> dict[str, tuple[list[Slot], list[Slot]]]:
    """Each phase's sender and recipient devices, each user connected straight to its home node."""
    count = max(args.pairs, args.latency_pairs)
    slots = {}
    for phase, (sender_home, recipient_home) in PHASES.items():
        senders = [Slot(a) for a in homed_users(membership, PROVIDER, count, prefix=f"{phase}-s")[sender_home]]
        recipients = [Slot(a) for a in homed_users(membership, PROVIDER, count, prefix=f"{phase}-r")[recipient_home]]
        slots[phase] = (senders, recipients)
    for phase, (senders, recipients) in slots.items():
        for slot in recipients + senders:  # recipients first: their devices exist before the first message
            node = nodes[membership.home(slot.address)]
            token = issuer.issue(slot.address.split("@")[0], audience=AUDIENCE, expires_in=24 * 3600)
            slot.peer = await LeanPeer.connect(
                "127.0.0.1", node.port, token=token, device=1, root_public=node.root_public, timeout_s=30,
                on_stanza=slot.on_stanza, on_batch_end=slot.on_batch_end)
            if slot.peer.user != slot.address:
                raise RuntimeError(f"connected as {slot.peer.user}, expected {slot.address}")
    return slots


# ----------------------------------------------------------------------------- the report


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def _minus(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


def _phase_medians(runs: list[dict]) -> dict:
    return {
        "runs": len(runs),
        "delivered_per_s": _median([r["delivered_per_s"] for r in runs]),
        "cpu_us_per_message": {key: _median([r["cpu_us_per_message"][key] for r in runs])
                               for key in ("node_a", "node_b", "nodes", "nats", "load")},
        "ack_latency_ms": {q: _median([r["ack_latency_ms"][q] for r in runs]) for q in ("p50", "p99")},
        "delivery_latency_ms": {q: _median([r["delivery_latency_ms"][q] for r in runs]) for q in ("p50", "p99")},
        "stanzas_per_relay_batch": _median([r["relay"]["stanzas_per_relay_batch"] for r in runs]),
        "syscalls_per_message": {key: _median([r["syscalls_per_message"][key] for r in runs]) for _, key in CHILDREN},
        "wakeups_per_message": {key: _median([r["wakeups_per_message"][key] for r in runs]) for _, key in CHILDREN},
        "system_share": {key: _median([r["system_share"][key] for r in runs]) for _, key in CHILDREN},
    }


def _comparison(same: list[dict], cross: list[dict]) -> dict:
    """cross against same: the summed nodes' CPU ratio per repeat (adjacent runs) and its median,
    the latency a cross-node hop adds (medians' difference)."""
    ratios = []
    for s, c in zip(same, cross):
        a, b = s["cpu_us_per_message"]["nodes"], c["cpu_us_per_message"]["nodes"]
        ratios.append(round(b / a, 3) if a and b is not None else None)
    same_m, cross_m = _phase_medians(same), _phase_medians(cross)
    return {
        "same": same_m, "cross": cross_m,
        "gateway_cpu_ratio_cross_over_same": _median(ratios), "gateway_cpu_ratio_per_repeat": ratios,
        "nats_cpu_us_per_cross_message": cross_m["cpu_us_per_message"]["nats"],
        "added_ack_latency_ms": {q: _minus(cross_m["ack_latency_ms"][q], same_m["ack_latency_ms"][q]) for q in ("p50", "p99")},
        "added_delivery_latency_ms": {q: _minus(cross_m["delivery_latency_ms"][q], same_m["delivery_latency_ms"][q])
                                      for q in ("p50", "p99")},
    }


def summarize(runs: list[dict], rates: list[float]) -> dict:
    def pick(phase: str, load_open: bool, rate: float | None) -> list[dict]:
        return [r for r in runs if r["phase"] == phase and r["load"].startswith("open") == load_open
                and r["rate_target_per_s"] == rate]

    summary = {"open_loop": [{"rate_target_per_s": rate, **_comparison(pick("same", True, rate), pick("cross", True, rate))}
                             for rate in rates]}
    if any(not r["load"].startswith("open") for r in runs):
        summary["closed_loop"] = _comparison(pick("same", False, None), pick("cross", False, None))
    ratios = [entry["gateway_cpu_ratio_cross_over_same"] for entry in summary["open_loop"]]
    latency = summary.get("closed_loop")
    added = [latency["added_ack_latency_ms"]["p50"], latency["added_delivery_latency_ms"]["p50"]] if latency else []
    summary["goals"] = {
        f"gateway_cpu_cross_le_{CPU_GOAL_RATIO:g}x_same": (all(r is not None and r <= CPU_GOAL_RATIO for r in ratios)
                                                           if ratios else None),
        f"added_p50_le_{LATENCY_GOAL_MS:g}_ms": (all(a is not None and a <= LATENCY_GOAL_MS for a in added)
                                                if added else None),
    }
    return summary


def _f(value, width: int, digits: int = 1) -> str:
    if value is None:
        return "-".rjust(width)
    return f"{value:.{digits}f}".rjust(width) if isinstance(value, float) else str(value).rjust(width)


def format_table(report: dict) -> str:
    pins = report["cpu_pinned"]
    lines = [
        f"cluster cost: node-a + node-b + nats-server {report['nats_server_version']} on loopback, durability "
        f"{report['durability']}, payload {report['payload_bytes']} B, {report['environment']['implementation']}; "
        f"pinned a={pins['node_a']} b={pins['node_b']} nats={pins['nats']} load={pins['load']}",
        "phase  load    rate    dlv/s  A µs/msg  B µs/msg  A+B µs/msg  nats µs/msg  ack p50/p99 ms  dlv p50/p99 ms  "
        "batch  load/others busy  wait A/B s",
    ]
    for r in report["runs"]:
        cpu, busy, wait = r["cpu_us_per_message"], r["cpu_busy"], r["runqueue_wait_s"]
        rate = f"{r['rate_target_per_s']:g}" if r["rate_target_per_s"] else "1/snd"
        ack, dlv = r["ack_latency_ms"], r["delivery_latency_ms"]
        lines.append(
            f"{r['phase']:<6} {'open' if r['load'].startswith('open') else 'closed':<6} {rate:>6} {_f(r['delivered_per_s'], 8)} "
            f"{_f(cpu['node_a'], 9)} {_f(cpu['node_b'], 9)} {_f(cpu['nodes'], 11)} {_f(cpu['nats'], 12)} "
            f"{_f(ack['p50'], 7, 2)}/{_f(ack['p99'], 6, 2)} {_f(dlv['p50'], 8, 2)}/{_f(dlv['p99'], 6, 2)} "
            f"{_f(r['relay']['stanzas_per_relay_batch'], 6)} {busy['load']:>8.2f}/{busy['others']:<6.2f} "
            f"{wait['node_a']:>6.2f}/{wait['node_b']:.2f}"
        )
    summary = report["summary"]
    for entry in summary["open_loop"]:
        lines.append(
            f"open loop {entry['rate_target_per_s']:g} msg/s: gateway CPU (A+B) cross/same = "
            f"{entry['gateway_cpu_ratio_cross_over_same']} (per repeat {entry['gateway_cpu_ratio_per_repeat']}; "
            f"{entry['same']['cpu_us_per_message']['nodes']} -> {entry['cross']['cpu_us_per_message']['nodes']} µs), "
            f"nats-server {entry['nats_cpu_us_per_cross_message']} µs per cross message; added p50 ack "
            f"{entry['added_ack_latency_ms']['p50']} ms, delivery {entry['added_delivery_latency_ms']['p50']} ms")
    latency = summary.get("closed_loop")
    if latency:
        lines.append(
            f"closed loop ({report['latency_pairs']} sender(s), 1 in flight each): ack p50 {latency['same']['ack_latency_ms']['p50']} -> "
            f"{latency['cross']['ack_latency_ms']['p50']} ms (added {latency['added_ack_latency_ms']['p50']}, p99 "
            f"{latency['added_ack_latency_ms']['p99']}), delivery p50 {latency['same']['delivery_latency_ms']['p50']} -> "
            f"{latency['cross']['delivery_latency_ms']['p50']} ms (added {latency['added_delivery_latency_ms']['p50']}, p99 "
            f"{latency['added_delivery_latency_ms']['p99']})")
    goals = summary["goals"]
    lines.append("goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met' if v is not None else 'not measured'}"
                                       for k, v in goals.items()))
    lines.append(f"exactly once: lost {report['lost']}, duplicates {report['duplicates']}, refusals {report['refusals'] or 'none'}"
                 f" -> {'OK' if report['ok'] else 'FAILED'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


async def run(args) -> dict:
    folder = Path(args.data_dir)
    ports = dict(zip(NODES, free_ports(len(NODES))))
    if not (folder / NODES[-1] / "keys").exists():  # a --data-dir used before keeps its keys
        keys_for_nodes({node: folder / node / "keys" for node in NODES})
    membership = Membership(NODES, 1)
    async with DemoIssuer() as issuer, LocalNats(folder / "nats", cpu=args.cpu_nats) as nats_server:
        cluster = ClusterConfig(node=NODES[0], nodes={n: NodeAddress("127.0.0.1", p) for n, p in ports.items()},
                                version=1, nats=(nats_server.url,), request_timeout_s=args.request_timeout_s)
        assert cluster.membership == membership
        nodes: dict[str, ClusterNode] = {}
        try:
            for node, cpu in zip(NODES, (args.cpu_a, args.cpu_b)):
                config_path = folder / f"{node}.toml"
                config_path.write_text(node_config_text(
                    node, data_dir=folder / node, ports=ports, nats_url=nats_server.url, issuer=issuer.issuer,
                    durability=args.durability, commit_mode=args.commit_mode, timeout_s=args.request_timeout_s))
                nodes[node] = ClusterNode(node, config_path, folder / f"{node}.log", cpu)
                await nodes[node].start()
                print(f"{node}: pid {nodes[node].pid}, port {nodes[node].port}", file=sys.stderr)
            print(f"nats-server: pid {nats_server.pid}, {nats_server.url}", file=sys.stderr)
            if args.cpu_load is not None and hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, {args.cpu_load})  # after the children started: they take their own
            probe = Probe(nodes, nats_server, cluster)
            await probe.connect()
            slots = await connect_slots(args, issuer, nodes, membership)
            bench = Bench(args, probe, slots)
            runs = []
            try:
                for repeat in range(1, args.repeats + 1):
                    for rate in args.rate:
                        for phase in PHASES:
                            runs.append(await bench.run(phase, "open", rate, repeat))
                            print(format_run(runs[-1]), file=sys.stderr)
                    if args.latency_seconds > 0:
                        for phase in PHASES:
                            runs.append(await bench.run(phase, "closed", None, repeat))
                            print(format_run(runs[-1]), file=sys.stderr)
            finally:
                for peer in bench.peers:
                    await peer.close()
                await probe.close()
        finally:
            for node in reversed(list(nodes.values())):
                await node.stop()
        nats_version = nats_server.version
    report = {
        "benchmark": "cluster-cost",
        "nodes": list(NODES), "nats_server_version": nats_version, "durability": args.durability,
        "commit_mode": args.commit_mode, "payload_bytes": args.payload, "pairs": args.pairs, "rates": args.rate,
        "seconds": args.seconds, "latency_pairs": args.latency_pairs, "latency_seconds": args.latency_seconds,
        "repeats": args.repeats, "request_timeout_s": args.request_timeout_s,
        "cpu_pinned": {"node_a": args.cpu_a, "node_b": args.cpu_b, "nats": args.cpu_nats, "load": args.cpu_load},
        "phases": {"same": "senders and recipients homed on node-a", "cross": "senders on node-a, recipients on node-b"},
        "runs": runs,
        "summary": summarize(runs, args.rate),
        "lost": sum(r["lost"] for r in runs), "duplicates": sum(r["duplicates"] for r in runs),
        "refusals": dict(sum((collections.Counter(r["refusals"]) for r in runs), collections.Counter())),
        "environment": {
            "implementation": interlink.core.IMPLEMENTATION, "python": platform.python_version(),
            "uvloop": uvloop.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cores",
        },
    }
    report["ok"] = (report["lost"] == 0 and report["duplicates"] == 0 and all(r["settled"] for r in runs)
                    and all(r["messages_delivered"] > 0 for r in runs))
    return report


def format_run(r: dict) -> str:
    cpu = r["cpu_us_per_message"]
    return (f"  [{r['repeat']}] {r['phase']:<5} {'open ' + format(r['rate_target_per_s'], 'g') if r['rate_target_per_s'] else 'closed'}: "
            f"{r['delivered_per_s']} msg/s, A {cpu['node_a']} + B {cpu['node_b']} = {cpu['nodes']} µs/msg, nats {cpu['nats']}, "
            f"ack p50 {r['ack_latency_ms']['p50']} ms, delivery p50 {r['delivery_latency_ms']['p50']} ms, lost {r['lost']}; "
            f"per message A/B/nats: syscalls {'/'.join(str(v) for v in r['syscalls_per_message'].values())}, "
            f"wake-ups {'/'.join(str(v) for v in r['wakeups_per_message'].values())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--durability", default="sync", choices=["sync", "async"])
    parser.add_argument("--commit-mode", default="inline", choices=["inline", "thread"])
    parser.add_argument("--rate", type=float, nargs="+", default=[2000.0],
                        help="open loop: messages/s in total (several: one pair of runs each)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window of each open-loop run")
    parser.add_argument("--pairs", type=int, default=8, help="sender/recipient pairs of the open loop (one device each)")
    parser.add_argument("--latency-seconds", type=float, default=5.0,
                        help="measured window of each closed-loop latency run (0: no latency runs)")
    parser.add_argument("--latency-pairs", type=int, default=1, help="senders of the closed loop, one message in flight each")
    parser.add_argument("--repeats", type=int, default=3, help="same, cross, same, cross...: this many pairs of runs")
    parser.add_argument("--payload", type=int, default=100, help="ciphertext bytes per message")
    parser.add_argument("--request-timeout-s", type=float, default=2.0, help="the nodes' cluster.request_timeout_s")
    for name in ("a", "b", "nats", "load"):
        what = {"a": "node A", "b": "node B", "nats": "nats-server", "load": "this process (the clients)"}[name]
        parser.add_argument(f"--cpu-{name}", type=int, default=None, help=f"pin {what} to this CPU")
    parser.add_argument("--data-dir", default=None, help="the nodes' folders (default: a temporary one, removed after)")
    args = parser.parse_args()
    if args.payload < TIME_BYTES:
        parser.error(f"--payload must be at least {TIME_BYTES} bytes (it carries the send time)")
    if any(rate <= 0 for rate in args.rate):
        parser.error("--rate must be positive (the open loop; the closed loop is --latency-seconds)")
    if args.pairs < 1 or args.latency_pairs < 1 or args.repeats < 1:
        parser.error("--pairs, --latency-pairs and --repeats must be at least 1")
    run_and_report(args, run, format_table, "interlink-cluster-cost-")


def run_and_report(args, run, format_table, prefix: str) -> None:
    """Run ``run(args)`` in ``args.data_dir`` (a temporary folder when None), print the table to
    stderr and the JSON report to stdout, exit 1 unless the report says ``ok``."""
    if args.data_dir is None:
        with tempfile.TemporaryDirectory(prefix=prefix) as folder:
            args.data_dir = folder
            report = uvloop.run(run(args))
    else:
        Path(args.data_dir).mkdir(parents=True, exist_ok=True)
        report = uvloop.run(run(args))
    print(format_table(report), file=sys.stderr)
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
