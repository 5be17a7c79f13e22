"""Group fan-out over real TCP: durable deliveries per second, gateway CPU per delivery,
delivery latency and gateway memory per group, for one large group.

    python bench/group_load.py --durability sync --members 1000 --seconds 5
    python bench/group_load.py --durability async --offline-fraction 0.5 --impls cython,pure --repeat 2

The gateway runs in a child process pinned to CPU 0 (``interlink.load.child``: per-device/per-user
message rates and the mailbox quotas lifted, ``max_group`` raised to the group size); this process (the demo OpenID issuer and every client) is pinned to CPU 1. Figures
come from the child's ``/proc`` counters: they measure the gateway alone. Each run starts a fresh
gateway child with a fresh LMDB folder; ``--impls cython,pure --repeat 2`` alternates the compiled
build and the pure twins (the child gets ``INTERLINK_PURE=1``) run by run, so both are measured
in the same session on the same machine state. Before each run the script waits (at most
``--quiet-timeout-s``) until the machine is idle, and ``others_cpu_busy`` reports what every other
process used during the window: on a shared machine a run with it well above 0 is suspect.

Load: ``--members`` users, one device each, all of them lean peers (``interlink.load.peer``: a
``ClientConnection`` on a bare protocol), members of one group. ``--senders`` of them post group
messages in a closed loop, ``--inflight`` unacked each (a new one on every ``ack``). Every online
device confirms each read's ``dlv`` with one ``recv``. ``--offline-fraction F`` closes that share of
the non-sending members' sessions after the group is made: their copies are stored (durable) but
not pushed. Each body (``--payload`` bytes) starts with its send time; every ``--latency-every``-th
member records the delivery latency of what it receives (the client shares one core with a
thousand sessions, so it is kept as cheap as possible).

Figures over the measured window (after 1 s of warm-up): messages acked per second, *durable
deliveries* (copies stored: acked messages × (members − 1)) per second, pushed deliveries per
second, gateway CPU µs per durable delivery, gateway and client CPU busy, p50/p99 delivery latency.
After the window, sending stops and every online member must have received every acked message of
the other senders exactly once (``lost``/``duplicates``, counted per member, seq order checked).

``--micro``: no sockets, no child; in this process, on a real ``LmdbStore`` (devices registered) and
``Policy``, the fan-out steps that moved to ``ext/_fanout.pyx`` for one message to ``--members``:
``plan_group`` (the per-device items and targets, with the store's device look-up and the policy's
block check per member) and one ``GroupDlv`` copy per device, for the compiled module and the pure
twin, the minimum of 30 repetitions (robust against other load on the machine).

``--store``: no sockets, no child; the store's part of a group message alone, on a real
``LmdbStore`` with ``--durability``: one commit of ``--inflight`` group messages to ``--members``
devices, then one commit of every device's ``recv``, the body stored once (items refer to it)
and whole copies (``message.shared`` off) alternating round by round: CPU µs per copy to store
and to delete, and the bytes written to storage per copy (``/proc/self/io``: the fsync's cost).

Memory: before the load, ``--rss-groups`` more groups of all ``--members`` are created by one
sender; the gateway's anonymous RSS growth divided by their number is ``gateway_rss_per_group``
(the cached record, its member set, the per-group state of the fan-out).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from interlink.core.protocol.stanza import encode_stanza
from interlink.load import child
from interlink.load.peer import LeanPeer
from interlink.load.procstat import schedstat_s, status_bytes
from interlink.testing import DemoIssuer, lmdb_store

AUDIENCE = "bench"
PROVIDER = "bench"
TIME_BYTES = 8
WARM_UP_S = 1.0
TAIL_TIMEOUT_S = 60.0
CONNECT_BATCH = 100
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- /proc


def machine_busy_s() -> float:
    """CPU seconds spent by every process on every core (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


async def wait_for_quiet(timeout_s: float) -> float:
    """Other work on this machine (other benchmarks, test runs) skews every figure: wait until
    the cores are nearly idle for a second, at most ``timeout_s``; returns the last busy reading."""
    deadline = time.monotonic() + timeout_s
    while True:
        start, started = machine_busy_s(), time.monotonic()
        await asyncio.sleep(1.0)
        busy = (machine_busy_s() - start) / (time.monotonic() - started)
        if busy < 0.15 or time.monotonic() > deadline:
            return round(busy, 2)


def client_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def percentile_ms(values_ns: list[int], fraction: float) -> float | None:
    if not values_ns:
        return None
    ordered = sorted(values_ns)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] / 1e6, 2)


# ----------------------------------------------------------------------------- the gateway


class GatewayChild(child.GatewayProcess):
    """The gateway in its own process on CPU 0; ``impl`` "pure" sets INTERLINK_PURE=1."""

    def __init__(self, issuer: str, data_dir: Path, args, impl: str) -> None:
        env = dict(os.environ)
        env.pop("INTERLINK_PURE", None)
        env.pop("INTERLINK_REQUIRE_NATIVE", None)
        if impl == "pure":
            env["INTERLINK_PURE"] = "1"
        else:
            env["INTERLINK_REQUIRE_NATIVE"] = "1"
        arguments = child.child_arguments(
            data_dir=data_dir, audience=AUDIENCE, providers={PROVIDER: issuer}, durability=args.durability, cpu=0,
            max_group=max(1024, args.members), max_mailbox_bytes=1 << 30, lmdb_map_size_bytes=args.map_gib << 30,
            commit_mode=args.commit_mode, gc_threshold=args.gc_threshold or None,
            lmdb_writemap=args.lmdb_writemap or None, **child.LIFTED_LIMITS,
        )
        super().__init__(arguments, log_path=data_dir / "gateway.log", env=env)


def implementation_of(pid: int) -> str:
    """What the child runs, from its environment (the child decides at import)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return "python" if b"INTERLINK_PURE=1" in environ else "cython"


# ----------------------------------------------------------------------------- the clients


class Member:
    """One member device: confirms every read's dlv with one recv; counts group messages per
    sender, checks the seq order; a sender also posts group messages in a closed loop."""

    def __init__(self, name: str, timed: bool) -> None:
        self.name = name
        self.peer: LeanPeer | None = None
        self.timed = timed
        self.record_from_ns = 1 << 63
        self.latencies_ns: list[int] = []
        self._seqs: list[int] = []
        self.last_seq = 0
        self.out_of_order = 0
        self.got: collections.Counter = collections.Counter()  # sender -> group messages received
        self.events = 0
        self.replies: dict = {}
        self.other: collections.Counter = collections.Counter()
        # sending
        self.g = b""
        self._prefix = os.urandom(8)
        self.count = 0
        self.filler = b""
        self.unacked: dict[bytes, int] = {}
        self.acked = 0
        self.refill = False
        self.errors: collections.Counter = collections.Counter()

    @property
    def received(self) -> int:
        return sum(self.got.values())

    def send(self) -> None:
        self.count += 1
        msg_id = self._prefix + self.count.to_bytes(8, "big")
        now_ns = time.perf_counter_ns()
        self.unacked[msg_id] = now_ns
        body = now_ns.to_bytes(TIME_BYTES, "little") + self.filler
        self.peer.queue(encode_stanza({"t": "msg", "id": msg_id, "g": self.g, "b": body}))

    def on_stanza(self, stanza: dict) -> None:
        kind = stanza.get("t")
        if kind == "dlv":
            seq = stanza["seq"]
            self._seqs.append(seq)
            if seq <= self.last_seq:
                self.out_of_order += 1
            self.last_seq = seq
            if stanza.get("k") != "msg":
                self.events += 1
                return
            self.got[stanza["from"]] += 1
            if self.timed:
                sent_ns = int.from_bytes(stanza["c"][:TIME_BYTES], "little")
                if sent_ns >= self.record_from_ns:
                    self.latencies_ns.append(time.perf_counter_ns() - sent_ns)
        elif kind == "ack":
            if self.unacked.pop(stanza.get("id"), None) is not None:
                self.acked += 1
                if self.refill:
                    self.send()
        elif kind == "res":
            self.replies[stanza.get("id")] = stanza
        elif kind == "err":
            self.errors[str(stanza.get("code"))] += 1
            if "id" in stanza and type(stanza["id"]) is int:
                self.replies[stanza["id"]] = stanza
            elif self.unacked.pop(stanza.get("ref"), None) is not None and self.refill:
                self.send()
        else:
            self.other[str(kind)] += 1

    def on_batch_end(self, peer: LeanPeer) -> None:
        if self._seqs:
            peer.queue(encode_stanza({"t": "recv", "seq": self._seqs}))
            self._seqs = []

    async def iq(self, iq_id: int, op: str, timeout_s: float = 60.0, **fields) -> dict:
        self.peer.queue(encode_stanza({"t": "iq", "id": iq_id, "op": op, **fields}))
        deadline = time.monotonic() + timeout_s
        while iq_id not in self.replies:
            if self.peer.closed or time.monotonic() > deadline:
                raise RuntimeError(f"{op}: no answer ({self.peer.close_reason or 'timeout'})")
            await asyncio.sleep(0.002)
        answer = self.replies.pop(iq_id)
        if answer.get("t") != "res":
            raise RuntimeError(f"{op} refused: {answer}")
        return answer


def check_sessions(members: list[Member]) -> None:
    for member in members:
        if member.peer.closed:
            raise RuntimeError(f"{member.name}: the session ended during the run: {member.peer.close_reason}")


async def wait_until(condition, members: list[Member], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        check_sessions(members)
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# ----------------------------------------------------------------------------- one run


async def one_run(args, issuer: DemoIssuer, impl: str) -> dict:
    quiet = await wait_for_quiet(args.quiet_timeout_s)
    with tempfile.TemporaryDirectory(prefix="interlink-group-bench-", dir=args.data_root) as folder:
        async with GatewayChild(issuer.issuer, Path(folder), args, impl) as gateway:
            result = await _measure(args, issuer, gateway)
    result["machine_busy_before_run"] = quiet
    return result


async def _measure(args, issuer: DemoIssuer, gateway: GatewayChild) -> dict:
    n = args.members
    members = [Member(f"m{i}@{PROVIDER}", timed=(i % args.latency_every == 0)) for i in range(n)]
    senders = members[: args.senders]
    for sender in senders:
        sender.filler = os.urandom(max(0, args.payload - TIME_BYTES))
    receivers = members[args.senders :]
    offline_count = round(args.offline_fraction * len(receivers))
    offline = receivers[len(receivers) - offline_count :] if offline_count else []
    online = [m for m in members if m not in set(offline)]

    async def connect(member: Member) -> None:
        token = issuer.issue(member.name.split("@")[0], audience=AUDIENCE, expires_in=3600)
        member.peer = await LeanPeer.connect(
            "127.0.0.1", gateway.port, token=token, device=1, root_public=gateway.root_public, timeout_s=60,
            on_stanza=member.on_stanza, on_batch_end=member.on_batch_end,
        )

    for start in range(0, n, CONNECT_BATCH):
        await asyncio.gather(*(connect(m) for m in members[start : start + CONNECT_BATCH]))
    creator = senders[0]
    others = [m.name for m in members if m is not creator]

    # The measured group; its created event reaches everyone (which also warms up what a group
    # costs once: every session's cipher context, buffers, delivery state).
    g = (await creator.iq(1, "group.new", members=others))["g"]
    for sender in senders:
        sender.g = g
    await wait_until(lambda: all(m.events >= 1 for m in members if m is not creator), members, 60)

    # Memory per group: --rss-groups more groups of all members, after the warm-up above.
    await asyncio.sleep(0.5)
    rss_before = status_bytes(gateway.pid)
    for i in range(args.rss_groups):
        await creator.iq(1000 + i, "group.new", members=others)
    await wait_until(lambda: all(m.events >= 1 + args.rss_groups for m in members if m is not creator), members, 60)
    await asyncio.sleep(0.5)
    rss_after = status_bytes(gateway.pid)
    for start in range(0, len(offline), 200):
        await asyncio.gather(*(m.peer.close() for m in offline[start : start + 200]))

    for sender in senders:
        sender.refill = True
        for _ in range(args.inflight):
            sender.send()
    await asyncio.sleep(WARM_UP_S)
    check_sessions(online)
    start_ns = time.perf_counter_ns()
    for member in online:
        member.record_from_ns = start_ns

    def snapshot() -> tuple:
        cpu, wait = schedstat_s(gateway.pid)
        return (
            sum(s.acked for s in senders), sum(m.received for m in online), cpu, wait, client_cpu_s(),
            machine_busy_s(), time.monotonic(),
        )

    before = snapshot()
    peak_rss = 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        peak_rss = max(peak_rss, status_bytes(gateway.pid)["VmRSS"])
    after = snapshot()
    check_sessions(online)
    for sender in senders:
        sender.refill = False
    drained = await wait_until(lambda: not any(s.unacked for s in senders), online, TAIL_TIMEOUT_S)

    # Every online member: every acked message of every other sender, exactly once.
    acked_by = {s.name: s.acked for s in senders}

    def expected(member: Member) -> int:
        return sum(count for name, count in acked_by.items() if name != member.name)

    complete = await wait_until(lambda: all(m.received >= expected(m) for m in online), online, TAIL_TIMEOUT_S)
    await asyncio.sleep(0.3)
    lost = sum(max(0, expected(m) - m.received) for m in online)
    duplicates = sum(max(0, m.received - expected(m)) for m in online)
    out_of_order = sum(m.out_of_order for m in online)
    errors = sum((s.errors for s in senders), collections.Counter())
    for start in range(0, len(online), 200):
        await asyncio.gather(*(m.peer.close() for m in online[start : start + 200]))

    acked, pushed, cpu, wait, client_cpu, machine, elapsed = (b - a for a, b in zip(before, after))
    durable = acked * (n - 1)
    latencies = [ns for m in online for ns in m.latencies_ns]
    per_group = (rss_after["RssAnon"] - rss_before["RssAnon"]) / args.rss_groups if args.rss_groups else None
    return {
        "implementation": implementation_of(gateway.pid),
        "durability": args.durability,
        "commit_mode": args.commit_mode,
        "gc_threshold": args.gc_threshold or None,
        "members": n,
        "offline_members": len(offline),
        "senders": args.senders,
        "inflight_per_sender": args.inflight,
        "payload_bytes": args.payload,
        "seconds": round(elapsed, 2),
        "messages_acked_per_s": round(acked / elapsed),
        "durable_deliveries_per_s": round(durable / elapsed),
        "pushed_deliveries_per_s": round(pushed / elapsed),
        "gateway_cpu_us_per_durable_delivery": round(cpu / durable * 1e6, 2) if durable else None,
        "gateway_cpu_us_per_message": round(cpu / acked * 1e6, 1) if acked else None,
        "gateway_cpu_busy": round(cpu / elapsed, 2),
        "gateway_runqueue_wait_s": round(wait, 2),
        "client_cpu_busy": round(client_cpu / elapsed, 2),
        # CPU of everything else on the machine during the window (should be near 0).
        "others_cpu_busy": round(max(0.0, machine - cpu - client_cpu) / elapsed, 2),
        "delivery_latency_ms_p50": percentile_ms(latencies, 0.50),
        "delivery_latency_ms_p99": percentile_ms(latencies, 0.99),
        "latency_samples": len(latencies),
        "gateway_rss_per_group_bytes": round(per_group) if per_group is not None else None,
        "gateway_rss_mib_after_groups": round(rss_after["VmRSS"] / 2**20, 1),
        "gateway_rss_mib_peak_in_window": round(peak_rss / 2**20, 1),
        "drained": drained and complete,
        "lost": lost,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "refusals": dict(errors),
    }


def micro(args) -> dict:
    """Per-device CPU of the fan-out steps of ``ext/_fanout.pyx`` and of the pure twin (see above)."""
    import timeit

    import interlink.core.domain._fanout_pure as pure
    import interlink.ext._fanout as native
    from interlink.core.domain.policy import Policy

    n = args.members
    members = tuple(f"m{i}@{PROVIDER}" for i in range(n))
    with tempfile.TemporaryDirectory(prefix="interlink-group-micro-", dir=args.data_root) as folder:
        store = lmdb_store(folder, sync=False)
        for member in members:
            store.register_device(member, 1, 5)
        policy = Policy(store)
        for member in members:  # warm both caches, as in a gateway that served the group before
            store.devices(member), policy.blocks(member, members[0])
        out = {"benchmark": "group-fanout-micro", "members": n}
        for name, module in (("cython", native), ("pure", pure)):
            build = module.GroupDlv(os.urandom(16), members[0], 1, os.urandom(args.payload), os.urandom(16))
            build(1, 1_764_000_000_000)

            def plan(module=module, build=build):
                return module.plan_group(members, members[0], 1, store.devices, policy.blocks, build)

            def copies(build=build):
                for seq in range(1000, 1000 + n):
                    build(seq, 1_764_000_000_000)

            plan_s = min(timeit.repeat(plan, number=1, repeat=30))
            copies_s = min(timeit.repeat(copies, number=1, repeat=30))
            out[f"{name}_plan_us_per_device"] = round(plan_s / n * 1e6, 3)
            out[f"{name}_dlv_copy_us"] = round(copies_s / n * 1e6, 3)
            out[f"{name}_fanout_us_per_device"] = round((plan_s + copies_s) / n * 1e6, 3)
        store.close()
    return out


def _write_bytes() -> int:
    """Bytes this process has caused to be written to storage so far (``/proc/self/io``)."""
    with open("/proc/self/io", encoding="ascii") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("write_bytes:"))


def store_micro(args) -> dict:
    """The store's side of a group message, body stored once against whole copies (see the
    module docstring): rounds of one commit of ``--inflight`` group messages to ``--members``
    devices, then one commit of every device's ``recv``; the two layouts alternate round by
    round on one ``LmdbStore``. CPU is this process's (``process_time``), so other load on the
    machine costs wall time, not these figures; bytes written come from ``/proc/self/io``."""
    import time

    from interlink.core.domain.batch import WriteBatch, device_key
    from interlink.core.domain.fanout import GroupDlv

    n, per_batch, rounds = args.members, args.inflight, args.store_rounds
    keys = [device_key(f"m{i}@{PROVIDER}", 1) for i in range(n)]
    sender = device_key("sender@alpha", 1)
    totals = {layout: {"store_cpu_s": 0.0, "recv_cpu_s": 0.0, "store_wall_s": 0.0, "written": 0, "copies": 0}
              for layout in ("whole", "shared")}
    with tempfile.TemporaryDirectory(prefix="interlink-store-micro-", dir=args.data_root) as folder:
        store = lmdb_store(folder, sync=args.durability == "sync", map_size_bytes=args.map_gib << 30,
                          max_mailbox_items=1 << 30, max_mailbox_bytes=1 << 40)
        seq = 0
        for round_number in range(2 * rounds + 2):
            layout = ("whole", "shared")[round_number % 2]
            batch = WriteBatch()
            for _ in range(per_batch):
                msg_id = os.urandom(16)
                build = GroupDlv(msg_id, "sender@alpha", 1, os.urandom(args.payload), b"G" * 16)
                message = batch.add_message(sender, msg_id, 1_764_000_000_000, [(key, build) for key in keys])
                message.shared = layout == "shared"
            written, wall, cpu = _write_bytes(), time.perf_counter(), time.process_time()
            store.commit(batch)
            store_cpu, store_wall = time.process_time() - cpu, time.perf_counter() - wall
            received = WriteBatch()
            for key in keys:
                received.delete(key, list(range(seq + 1, seq + per_batch + 1)))
            cpu = time.process_time()
            store.commit(received)
            recv_cpu = time.process_time() - cpu
            seq += per_batch
            if round_number < 2:
                continue  # warm-up: one round of each layout
            total = totals[layout]
            total["store_cpu_s"] += store_cpu
            total["store_wall_s"] += store_wall
            total["recv_cpu_s"] += recv_cpu
            total["written"] += _write_bytes() - written
            total["copies"] += per_batch * n
        store.close()
    out = {"benchmark": "group-store-micro", "durability": args.durability, "members": n, "messages_per_commit": per_batch,
           "payload": args.payload, "rounds": rounds}
    for layout, total in totals.items():
        copies = total["copies"]
        out[layout] = {
            "store_cpu_us_per_copy": round(total["store_cpu_s"] / copies * 1e6, 3),
            "store_wall_us_per_copy": round(total["store_wall_s"] / copies * 1e6, 3),
            "recv_cpu_us_per_copy": round(total["recv_cpu_s"] / copies * 1e6, 3),
            "bytes_written_per_copy": round(total["written"] / copies, 1),
        }
    return out


async def run_all(args) -> list[dict]:
    results = []
    async with DemoIssuer() as issuer:
        for _ in range(args.repeat):
            for impl in args.impls:
                result = await one_run(args, issuer, impl)
                print(json.dumps(result), file=sys.stderr, flush=True)
                results.append(result)
    return results


SUMMARY = (
    ("implementation", "impl"), ("durable_deliveries_per_s", "durable/s"), ("pushed_deliveries_per_s", "pushed/s"),
    ("gateway_cpu_us_per_durable_delivery", "cpu_us/dlv"), ("gateway_cpu_busy", "gw_busy"),
    ("client_cpu_busy", "cli_busy"), ("others_cpu_busy", "others"), ("delivery_latency_ms_p50", "p50_ms"), ("delivery_latency_ms_p99", "p99_ms"),
    ("gateway_rss_per_group_bytes", "rss/group"), ("lost", "lost"), ("duplicates", "dup"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--durability", default="sync", choices=["sync", "async"])
    parser.add_argument("--lmdb-writemap", action="store_true", help="open the gateway's store with LMDB's writemap")
    parser.add_argument("--commit-mode", default="inline", choices=["inline", "thread"])
    parser.add_argument("--members", type=int, default=1000, help="group members, one device each")
    parser.add_argument("--senders", type=int, default=2, help="members that post (closed loop)")
    parser.add_argument("--inflight", type=int, default=4, help="unacked group messages per sender")
    parser.add_argument("--offline-fraction", type=float, default=0.0, help="share of the non-senders offline")
    parser.add_argument("--payload", type=int, default=100, help="body bytes per group message")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--latency-every", type=int, default=10, help="every n-th member records latencies")
    parser.add_argument("--rss-groups", type=int, default=20, help="groups made to measure memory per group")
    parser.add_argument("--impls", default="cython", help="comma list of cython,pure: alternated run by run")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each implementation")
    parser.add_argument("--map-gib", type=int, default=16, help="LMDB map size (GiB)")
    parser.add_argument("--quiet-timeout-s", type=float, default=90.0,
                        help="before each run, wait (at most this long) until the machine is idle")
    parser.add_argument("--gc-threshold", type=int, default=0,
                        help="experiment: the gateway child's GC generation-0 threshold (and gc.freeze() at start)")
    parser.add_argument("--micro", action="store_true", help="in-process timing of the fan-out steps, both twins")
    parser.add_argument("--store", action="store_true",
                        help="in-process: the store's commit and recv of group copies, body stored once vs whole copies")
    parser.add_argument("--store-rounds", type=int, default=20, help="--store: rounds of each layout")
    parser.add_argument("--data-root", default=None, help="where the per-run LMDB folders go (default: /tmp)")
    args = parser.parse_args()
    args.impls = [impl.strip() for impl in args.impls.split(",") if impl.strip()]
    if not set(args.impls) <= {"cython", "pure"} or not args.impls:
        parser.error("--impls: cython and/or pure")
    if args.payload < TIME_BYTES:
        parser.error(f"--payload must be at least {TIME_BYTES}")
    if not 0 <= args.offline_fraction < 1 or not 1 <= args.senders < args.members:
        parser.error("--offline-fraction in [0, 1) and 1 <= --senders < --members")
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    if args.micro:
        print(json.dumps(micro(args), indent=2))
        return
    if args.store:
        print(json.dumps(store_micro(args), indent=2))
        return
    results = uvloop.run(run_all(args))
    print(json.dumps({
        "benchmark": "group-fanout", "runs": results, "python": platform.python_version(),
        "uvloop": uvloop.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }, indent=2))
    print(" | ".join(label for _, label in SUMMARY), file=sys.stderr)
    for result in results:
        print(" | ".join(str(result[key]) for key, _ in SUMMARY), file=sys.stderr)


if __name__ == "__main__":
    main()
