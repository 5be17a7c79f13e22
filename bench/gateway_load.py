"""Gateway-level benchmarks over real TCP: handshakes, durable 1:1 messages, RSS per idle connection.

    python bench/gateway_load.py handshakes --seconds 10 --concurrency 32 --suite 1 --alg EdDSA
    python bench/gateway_load.py --durability sync messages --seconds 10 --pairs 8 --inflight 16
    python bench/gateway_load.py --durability sync messages --seconds 10 --rate 8000
    python bench/gateway_load.py --durability sync offline --messages 50000 --pairs 8
    python bench/gateway_load.py --durability sync keys --seconds 5 --concurrency 32
    python bench/gateway_load.py idle-rss --connections 10000
    python bench/gateway_load.py --durability sync blobs --peers 4 --size-mib 16 --seconds 5

Global options (before the subcommand): ``--durability sync|async`` (LMDB commits, default
sync), ``--data-dir`` (default: a new temporary folder) and ``--transport tcp|ws`` (how clients
reach the gateway: raw TCP, or its WebSocket listener as web clients do; default tcp).

The gateway runs in a child process pinned to CPU 0 (``interlink.load.child``); this process
(the demo OpenID issuer and the clients) is pinned to CPU 1. Figures are taken from the child's
``/proc`` counters, so they measure the gateway alone. Nothing else should run on CPU 0 meanwhile:
``gateway_runqueue_wait_s`` (time the gateway was ready but another process had its CPU) should
stay near 0, or the figures are skewed (with ``--commit-mode thread`` the writer thread and the
loop also wait for each other there).

* ``handshakes``: gateway CPU µs per completed handshake + authentication (Noise responder,
  node-certificate hello, JWT signature and claims check, session table, ``welcome``) and the
  rate that implies for one core. Devices reconnect (they are registered in a warm-up round),
  which is what a gateway sees most.
* ``messages``: durable 1:1 messages between ``--pairs`` sender/recipient devices, driven by lean
  peers (``interlink.load.peer``: a ``ClientConnection`` on a bare protocol, no SDK ``Client``),
  so the gateway, not the client core, is the bottleneck (``client_cpu_busy`` shows the client's
  share of its core). Each recipient confirms all the ``dlv`` of one read with one ``recv``.
  Each ciphertext (``--payload`` bytes) starts with its intended send time, so the recipient
  measures the delivery latency as well as the sender the ``ack`` latency.

  - closed loop (``--rate 0``, the default): each sender keeps ``--inflight`` messages unacked
    and sends a new one on every ``ack``; the throughput is the gateway's maximum;
  - open loop (``--rate R``): R messages/s in total, spread evenly over the senders and sent in
    bursts every 1-2 ms whatever the answers; latencies count from each message's intended send
    time, so a stall shows as latency, not as a lower send rate (no coordinated omission). Run
    the closed loop first, then e.g. ``--rate max/2`` for latencies at half load. Open-loop
    arrivals batch less than a closed loop's (fewer stanzas per read and per commit), so each
    message costs the gateway more: check ``gateway_cpu_busy``, which may be near 1 already.

  After 1 s of warm-up, the figures cover ``--seconds``: gateway CPU µs per delivered message,
  its CPU busy fraction, p50/p99 latencies. Then sending stops, the tail is waited for, and every
  message acked during the whole run must have been delivered exactly once, counted by
  (sender, id): ``lost`` and ``duplicates`` must be 0.
* ``offline``: store-and-forward. The recipients connect once to register their device; then
  the senders store ``--messages`` in total for them (``--inflight`` unacked per sender), with
  gateway CPU µs per stored message; then the recipients connect and take their backlog
  (``recv`` per pushed batch), with gateway CPU µs per drained message (less what as many
  reconnects without a backlog cost, measured just before) and the drain rate. Every stored
  message must be drained exactly once.
* ``keys``: the key directory. ``--targets`` users (one device each) publish their keys
  (``keys.put``: identity key, signed prekey, ``--otpk`` one-time prekeys each); then requester
  devices (lean peers) keep ``--concurrency`` ``keys.get`` outstanding in total (closed loop,
  targets taken in turn) for ``--seconds`` after 1 s of warm-up: keys.get per second, gateway CPU
  µs per keys.get, p50/p99 latency, and how many answers carried a one-time prekey (each hand-out
  is an LMDB write transaction that deletes it: one fsync with ``--durability sync``) or none
  (the signed prekey alone: a read transaction only). ``keys.get`` is rate limited per
  requesting *user* (``core/domain/ops.py`` ``KEYS_GET_RATE``: a burst of 60, then 1/s) and the gateway
  has no setting to lift it, so the requests are spread over ``--requesters`` users, each used
  at most ``KEYS_GET_PER_REQUESTER`` times (under the burst); the window ends early, and says so,
  when that budget runs out. ``rate_limited`` answers are counted (they must be 0).
* ``idle-rss``: gateway RSS growth per authenticated idle connection.
* ``blobs``: attachments. ``--peers`` SDK clients each upload a ``--size-mib`` blob again and
  again for ``--seconds`` (``Client.upload_blob``: chunks of the announced ``blob_chunk``,
  ``blob_in_flight`` outstanding, the last answered after the gateway's sync and hash), finish
  the one under way, then download the ready blobs over and over (``download_blob``) for as
  long: MB/s each way, gateway CPU ms per MB and what one core would carry, how long after its
  last chunks a blob was ready, and the gateway's RSS before and at its peak during the uploads
  (``--peers 100 --size-mib 50``: the memory goal of 100 concurrent 50 MB uploads). With
  ``messages --media-peers N``, N such uploaders run beside the chat (its latency with media).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import uvloop

import interlink.core
from interlink.client import Client, Suite
from interlink.config import GatewayConfig
from interlink.core.errors import ServerError
from interlink.core.protocol.stanza import encode_stanza
from interlink.load import child
from interlink.load.media import BlobBytes, BlobContent
from interlink.load.peer import LeanPeer
from interlink.pushreceiver import PushReceiver
from interlink.load.procstat import schedstat_s, status_bytes
from interlink.load.schedule import TIME_BYTES, start_open_loop
from interlink.testing import DemoIssuer

AUDIENCE = "bench"
# The blob benchmarks measure the gateway, not its per-user blob limits or the free disk
LIFTED_BLOB_LIMITS = {**child.LIFTED_BLOB_LIMITS, "blob_min_free_bytes": 0}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > cpu:
        os.sched_setaffinity(0, {cpu})


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


TRANSPORT = {"ws_path": None}  # --transport ws: the WebSocket path clients open (set by main)


def rss_bytes(pid: int) -> int:
    return status_bytes(pid)["VmRSS"]


class GatewayChild(child.GatewayProcess):
    """The gateway in its own process, on CPU 0, configured for the issuer's provider (``bare``: a
    uvloop server that keeps no state instead)."""

    def __init__(
        self, issuer: str, data_dir: Path, durability: str, *, bare: bool = False, commit_mode: str = "inline",
        more_providers: dict[str, str] | None = None, push_urls: dict[str, str] | None = None, **settings,
    ) -> None:
        if bare:
            arguments = child.child_arguments(bare=True, cpu=0)
        else:
            if TRANSPORT["ws_path"] is not None:
                settings.setdefault("ws_port", 0)
            arguments = child.child_arguments(
                data_dir=data_dir, audience=AUDIENCE, providers={"bench": issuer, **(more_providers or {})},
                push_urls=push_urls, durability=durability, commit_mode=commit_mode, cpu=0, **child.LIFTED_LIMITS,
                **settings,
            )
        super().__init__(arguments, log_path=data_dir / "gateway.log")


def client_port(gateway: GatewayChild) -> int:
    """The port clients connect to: the WebSocket listener's with ``--transport ws``."""
    return gateway.ws_port if TRANSPORT["ws_path"] is not None else gateway.port


async def connect(gateway: GatewayChild, token: str, device: int, suite: Suite) -> Client:
    return await Client.connect(
        "127.0.0.1", client_port(gateway), token=token, device=device, root_public=gateway.root_public,
        suite=suite, server_static=gateway.static_public, timeout_s=30, ws_path=TRANSPORT["ws_path"],
    )


async def bench_handshakes(args) -> dict:
    suite = Suite(args.suite)
    async with DemoIssuer() as issuer:
        async with GatewayChild(issuer.issuer, Path(args.data_dir), args.durability) as gateway:
            users = [f"user{i}" for i in range(args.concurrency)]
            tokens = {u: issuer.issue(u, audience=AUDIENCE, alg=args.alg, expires_in=3600) for u in users}
            # Warm-up: registers every device and fills the gateway's JWKS cache.
            for user in users:
                await (await connect(gateway, tokens[user], 1, suite)).close()
            done = 0
            deadline = time.monotonic() + args.seconds

            async def worker(user: str) -> None:
                nonlocal done
                while time.monotonic() < deadline:
                    # A device reconnecting presents the token it has (the gateway remembers its
                    # signature); --fresh-tokens gives every connection a token never seen before.
                    token = (issuer.issue(user, audience=AUDIENCE, alg=args.alg, expires_in=3600)
                             if args.fresh_tokens else tokens[user])
                    client = await connect(gateway, token, 1, suite)
                    done += 1
                    await client.close()

            user_before, system_before = cpu_times(gateway.pid)
            started = time.monotonic()
            await asyncio.gather(*(worker(u) for u in users))
            elapsed = time.monotonic() - started
            user_after, system_after = cpu_times(gateway.pid)
            user, system = user_after - user_before, system_after - system_before
            cpu = user + system
    return {
        "benchmark": "handshake+auth",
        "tokens": "fresh" if args.fresh_tokens else "reused",
        "suite": suite.name,
        "alg": args.alg,
        "handshakes": done,
        "wall_s": round(elapsed, 2),
        "achieved_per_s": round(done / elapsed),
        "gateway_cpu_s": round(cpu, 2),
        "gateway_user_s": round(user, 2),
        "gateway_system_s": round(system, 2),
        "gateway_cpu_us_per_handshake": round(cpu / done * 1e6, 1),
        "capacity_per_gateway_core_per_s": round(done / cpu) if cpu else None,
    }


# ----------------------------------------------------------------------------- 1:1 message load
# Lean peers (``interlink.load.peer``) instead of the SDK ``Client``: the SDK's per-message
# futures and bookkeeping cost more CPU than the gateway, and the client core saturated first.

WARM_UP_S = 1.0
TAIL_TIMEOUT_S = 60.0  # after the run: how long to wait for the last acks and deliveries
QUIET_S = 0.3  # then: how long to listen for stray duplicates


class Sender:
    """One sending device: ``msg`` stanzas to one recipient device, each ack timed.

    Closed loop (``refill``): every ack or refusal sends the next message at once, so the
    number unacked stays constant. Open loop: a timer calls ``send`` with each message's
    intended time, and latencies count from that time, not from when the timer got to it."""

    def __init__(self, to: str, payload_bytes: int) -> None:
        self.to = to
        self.peer: LeanPeer | None = None
        self.user = ""
        # Ids: random prefix (a reused --data-dir must not see them as retransmissions) + counter.
        self._id_prefix = os.urandom(8)
        self._count = 0
        self._filler = os.urandom(max(0, payload_bytes - TIME_BYTES))
        self.unacked: dict[bytes, int] = {}  # id -> intended send time (ns)
        self.acked_ids: list[bytes] = []
        self.ack_latencies_ns: list[int] = []
        self.record_from_ns = 1 << 63  # latencies of messages meant to leave before this are warm-up
        self.refill = False  # closed loop: replace each answered message with a new one
        self.remaining: int | None = None  # stop after this many more messages (None: no limit)
        self.errors: collections.Counter = collections.Counter()
        self.dup_acks = 0
        self.stray_answers = 0

    @property
    def sent(self) -> int:
        return self._count

    @property
    def connected(self) -> bool:
        return self.peer is not None and not self.peer.closed

    def send(self, intended_ns: int) -> None:
        if self.remaining is not None:
            if self.remaining <= 0:
                return
            self.remaining -= 1
        self._count += 1
        msg_id = self._id_prefix + self._count.to_bytes(8, "big")
        self.unacked[msg_id] = intended_ns
        ciphertext = intended_ns.to_bytes(TIME_BYTES, "little") + self._filler
        self.peer.queue(encode_stanza({"t": "msg", "id": msg_id, "to": self.to, "c": {1: ciphertext}}))

    def on_stanza(self, stanza: dict) -> None:
        kind = stanza.get("t")
        if kind == "ack":
            msg_id = stanza.get("id")
            intended_ns = self.unacked.pop(msg_id, None)
            if intended_ns is None:
                self.stray_answers += 1  # an ack for no message of ours
                return
            now_ns = time.perf_counter_ns()
            self.acked_ids.append(msg_id)
            if stanza.get("dup"):
                self.dup_acks += 1  # taken for a retransmission, so not stored again: an id clash
            if intended_ns >= self.record_from_ns:
                self.ack_latencies_ns.append(now_ns - intended_ns)
            if self.refill:
                self.send(now_ns)
        elif kind == "err":
            self.errors[str(stanza.get("code"))] += 1
            if self.unacked.pop(stanza.get("ref"), None) is not None and self.refill:
                self.send(time.perf_counter_ns())
        else:
            self.stray_answers += 1


class Recipient:
    """One receiving device: confirms every batch of ``dlv`` of one read with one ``recv``,
    records (sender, id) of each delivery and its latency from the intended send time."""

    def __init__(self) -> None:
        self.peer: LeanPeer | None = None
        self._seqs: list[int] = []
        self.delivered_keys: list[tuple[str, bytes]] = []  # one entry per delivery, duplicates too
        self.delivery_latencies_ns: list[int] = []
        self.record_from_ns = 1 << 63
        self.record_latency = True  # off for stored backlogs: their age is not a latency
        self.other_stanzas: collections.Counter = collections.Counter()
        self.recvs_sent = 0

    def on_stanza(self, stanza: dict) -> None:
        if stanza.get("t") != "dlv":
            kind = stanza.get("t")
            self.other_stanzas[f"err {stanza.get('code')}" if kind == "err" else str(kind)] += 1
            return
        self._seqs.append(stanza["seq"])
        self.delivered_keys.append((stanza["from"], stanza["id"]))
        if self.record_latency:
            intended_ns = int.from_bytes(stanza["c"][:TIME_BYTES], "little")
            if intended_ns >= self.record_from_ns:
                self.delivery_latencies_ns.append(time.perf_counter_ns() - intended_ns)

    def on_batch_end(self, peer: LeanPeer) -> None:
        if self._seqs:
            peer.queue(encode_stanza({"t": "recv", "seq": self._seqs}))
            self._seqs = []
            self.recvs_sent += 1

    @property
    def delivered(self) -> int:
        return len(self.delivered_keys)


async def connect_lean(gateway: GatewayChild, token: str, **callbacks) -> LeanPeer:
    return await LeanPeer.connect(
        "127.0.0.1", client_port(gateway), token=token, device=1, root_public=gateway.root_public, timeout_s=30,
        ws_path=TRANSPORT["ws_path"], **callbacks
    )


def client_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def gateway_cpu_s(gateway: GatewayChild) -> float:
    return schedstat_s(gateway.pid)[0]


def gateway_runqueue_wait_s(gateway: GatewayChild) -> float:
    return schedstat_s(gateway.pid)[1]


def percentile_ms(values_ns: list[int], fraction: float) -> float | None:
    if not values_ns:
        return None
    ordered = sorted(values_ns)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] / 1e6, 2)


def check_sessions(peers: list[LeanPeer]) -> None:
    """A session the gateway ended mid-run invalidates the figures: stop and say why."""
    for peer in peers:
        if peer.closed:
            raise RuntimeError(f"a session ended during the run: {peer.close_reason}")


async def wait_until(condition, peers: list[LeanPeer], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        check_sessions(peers)
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def delivery_check(senders: list[Sender], recipients: list[Recipient]) -> dict:
    """Every acked message delivered exactly once, counted by (sender, id)."""
    acked = {(sender.user, msg_id) for sender in senders for msg_id in sender.acked_ids}
    deliveries = collections.Counter(key for recipient in recipients for key in recipient.delivered_keys)
    errors = sum((sender.errors for sender in senders), collections.Counter())
    other = sum((recipient.other_stanzas for recipient in recipients), collections.Counter())
    return {
        "total_acked": len(acked),
        "total_delivered": sum(deliveries.values()),
        # How much the gateway batches its pushes (fewer, larger batches cost it less per message).
        "deliveries_per_recv": round(sum(deliveries.values()) / max(1, sum(r.recvs_sent for r in recipients)), 1),
        "lost": len(acked - deliveries.keys()),
        "duplicates": sum(count - 1 for count in deliveries.values() if count > 1),
        "delivered_not_acked": len(deliveries.keys() - acked),
        "unacked_at_end": sum(len(sender.unacked) for sender in senders),
        "dup_acks": sum(sender.dup_acks for sender in senders),
        "stray_answers_to_senders": sum(sender.stray_answers for sender in senders),
        "refusals": dict(errors),
        "other_stanzas_to_recipients": dict(other),
    }


async def bench_messages(args) -> dict:
    """Durable 1:1 messages through the gateway (pairs of lean peers, sender i -> recipient i).
    Closed loop (``--rate 0``): ``--inflight`` unacked messages per sender. Open loop: ``--rate``
    messages/s in total. Gateway CPU per delivered message over the measured window."""
    open_loop = args.rate > 0
    # The pushed provider's server: the reference receiver, told to fail (500) or hang for the window.
    # Its root key is the gateway's, known once the gateway runs: set below.
    async with DemoIssuer() as issuer, DemoIssuer() as push_issuer, PushReceiver(bytes(32)) as receiver:
        pushing = args.push_offline > 0
        push_options = {"more_providers": {"pushed": push_issuer.issuer}, "push_urls": {"pushed": receiver.url}} if pushing else {}
        if args.push_endpoint == "500":
            receiver.respond_with(500)
        elif args.push_endpoint == "hang":
            receiver.set_delay(3600.0)  # the gateway's own timeout ends each request
        overload = {
            name: value for name in ("overload_turn_messages", "overload_refuse_after_s", "window", "lmdb_writemap",
                                     "gc_threshold")
            if (value := getattr(args, name)) is not None
        }
        async with GatewayChild(
            issuer.issuer, Path(args.data_dir), args.durability, commit_mode=args.commit_mode, **LIFTED_BLOB_LIMITS,
            **push_options, **overload
        ) as gateway:
            receiver.root_public = gateway.root_public

            def token(user: str) -> str:
                return issuer.issue(user, audience=AUDIENCE, expires_in=3600)

            # Push beside the chat (--push-offline): devices of another provider, registered for
            # push and offline, receive --push-rate messages/s; that provider's webhook endpoint
            # answers as --push-endpoint says (hang, 500) for the whole window.
            push_senders: list[Sender] = []
            if pushing:
                for i in range(args.push_offline):
                    device = await Client.connect("127.0.0.1", gateway.port, device=1, root_public=gateway.root_public,
                                                  token=push_issuer.issue(f"p{i}", audience=AUDIENCE, expires_in=3600))
                    await device.register_push(f"token-{i}")
                    await device.close()
                for i in range(args.push_offline):
                    sender = Sender(f"p{i}@pushed", args.payload)
                    sender.peer = await connect_lean(gateway, token(f"q{i}"), on_stanza=sender.on_stanza)
                    push_senders.append(sender)

            # Media beside the chat (--media-peers): devices uploading blobs for the whole run,
            # by default from a process of their own (see MediaProcess).
            media: list[MediaPeer] = []
            media_process: MediaProcess | None = None
            if args.media_peers and args.media_same_process:
                prepared = BlobBytes(int(args.media_mib * 2**20)).content(0)
                for i in range(args.media_peers):
                    media.append(MediaPeer(await connect(gateway, token(f"m{i}"), 1, Suite.XX_CHACHAPOLY)))
                for peer in media:
                    peer.upload(prepared)
            elif args.media_peers:
                media_process = MediaProcess(gateway, [token(f"m{i}") for i in range(args.media_peers)], args.media_mib)
                await media_process.start()

            def uploaded_bytes() -> int:
                return media_process.bytes if media_process is not None else sum(p.bytes for p in media)

            recipients = [Recipient() for _ in range(args.pairs)]
            senders = [Sender(f"r{i}@bench", args.payload) for i in range(args.pairs)]
            for i, recipient in enumerate(recipients):
                recipient.peer = await connect_lean(
                    gateway, token(f"r{i}"), on_stanza=recipient.on_stanza, on_batch_end=recipient.on_batch_end
                )
            for i, sender in enumerate(senders):
                sender.peer = await connect_lean(gateway, token(f"s{i}"), on_stanza=sender.on_stanza)
                sender.user = sender.peer.user
            peers = [p.peer for p in recipients + senders]

            def acked() -> int:
                return sum(len(s.acked_ids) for s in senders)

            def delivered() -> int:
                return sum(r.delivered for r in recipients)

            def sent() -> int:
                return sum(s.sent for s in senders)

            # Start sending; the first WARM_UP_S are not measured.
            stop_open_loop = stop_push_loop = None
            if push_senders:
                stop_push_loop = start_open_loop(push_senders, args.push_rate, time.perf_counter_ns())
            if open_loop:
                stop_open_loop = start_open_loop(senders, args.rate, time.perf_counter_ns())
            else:
                for sender in senders:
                    sender.refill = True
                    for _ in range(args.inflight):
                        sender.send(time.perf_counter_ns())
            await asyncio.sleep(WARM_UP_S)
            check_sessions(peers)

            # The measured window: counters and CPU at both ends; latencies of the messages
            # meant to leave from its start on (those still in flight at its end included).
            window_start_ns = time.perf_counter_ns()
            for party in senders + recipients:
                party.record_from_ns = window_start_ns
            def snapshot() -> tuple:
                return (
                    sent(), acked(), delivered(), gateway_cpu_s(gateway), *cpu_times(gateway.pid),
                    gateway_runqueue_wait_s(gateway), client_cpu_s(), time.monotonic(), uploaded_bytes(),
                )

            push_requests_before = receiver.requests
            before = snapshot()
            await asyncio.sleep(args.seconds)
            after = snapshot()
            push_requests_in_window = receiver.requests - push_requests_before
            check_sessions(peers)

            # Stop sending; wait for the tail so the exactly-once check sees everything.
            if stop_open_loop is not None:
                stop_open_loop()
            if stop_push_loop is not None:
                stop_push_loop()
            for sender in senders:
                sender.refill = False
            for peer in media:  # the chat's tail matters here, not the blob's: cut the uploads
                peer.running = False
                peer.task.cancel()
            if media_process is not None:
                media_process.stop_event.set()
            await wait_until(
                lambda: not any(s.unacked for s in senders) and delivered() >= acked(), peers, TAIL_TIMEOUT_S
            )
            push_recovery_s = None
            if pushing:  # the endpoint recovers: every device owed a push gets one
                push_recovery_s = await push_recovered(receiver, args.push_offline, args.push_recovery_timeout_s)
            media_errors = collections.Counter()
            for peer in media:
                media_errors.update(peer.errors)
                await peer.client.close()
            if media_process is not None:
                media_errors.update(await media_process.stop())
            await asyncio.sleep(QUIET_S)
            check = delivery_check(senders, recipients)
            for peer in peers:
                await peer.close()

    (window_sent, window_acked, window_delivered, gateway_cpu, gateway_user, gateway_system, gateway_wait, client_cpu,
     elapsed, media_bytes) = (end - start for start, end in zip(before, after))
    ack_latencies = [ns for s in senders for ns in s.ack_latencies_ns]
    delivery_latencies = [ns for r in recipients for ns in r.delivery_latencies_ns]
    result = {
        "benchmark": "messages-1to1",
        "driver": "lean",
        "load": "open loop" if open_loop else "closed loop",
        "rate_target_per_s": args.rate if open_loop else None,
        "inflight_per_sender": None if open_loop else args.inflight,
        "durability": args.durability,
        "commit_mode": args.commit_mode,
        "gc_threshold": args.gc_threshold,
        "pairs": args.pairs,
        "payload_bytes": args.payload,
        "seconds": round(elapsed, 2),
        "messages_sent": window_sent,
        "messages_acked": window_acked,
        "messages_delivered": window_delivered,
        "sent_per_s": round(window_sent / elapsed),
        "delivered_per_s": round(window_delivered / elapsed),
        "gateway_cpu_s": round(gateway_cpu, 2),
        "gateway_cpu_us_per_delivered_message": round(gateway_cpu / window_delivered * 1e6, 1) if window_delivered else None,
        "gateway_user_s": round(gateway_user, 2),
        "gateway_system_s": round(gateway_system, 2),
        "gateway_cpu_busy": round(gateway_cpu / elapsed, 2),
        "gateway_runqueue_wait_s": round(gateway_wait, 2),
        "client_cpu_busy": round(client_cpu / elapsed, 2),
        "ack_latency_ms_p50": percentile_ms(ack_latencies, 0.50),
        "ack_latency_ms_p99": percentile_ms(ack_latencies, 0.99),
        "delivery_latency_ms_p50": percentile_ms(delivery_latencies, 0.50),
        "delivery_latency_ms_p99": percentile_ms(delivery_latencies, 0.99),
        "latency_samples": len(ack_latencies),
    }
    if pushing:
        result.update(push_offline=args.push_offline, push_rate=args.push_rate, push_endpoint=args.push_endpoint,
                      push_requests_in_window=push_requests_in_window,
                      push_messages_acked=sum(len(s.acked_ids) for s in push_senders),
                      devices_pushed=len({p["user"] for p in receiver.received}),
                      push_recovery_s=push_recovery_s)
    if args.media_peers:
        result.update(media_peers=args.media_peers, media_process="same" if args.media_same_process else "own, nice 19",
                      media_mb_per_s=round(media_bytes / 1e6 / elapsed, 1),
                      media_mb_in_window=round(media_bytes / 1e6), media_errors=dict(media_errors))
    result.update(check)
    return result


async def bench_offline(args) -> dict:
    """Store-and-forward: ``--messages`` to offline recipients (store), then the recipients come
    online and take their backlog (drain). Gateway CPU per stored and per drained message."""
    async with DemoIssuer() as issuer:
        async with GatewayChild(issuer.issuer, Path(args.data_dir), args.durability, commit_mode=args.commit_mode) as gateway:
            def token(user: str) -> str:
                return issuer.issue(user, audience=AUDIENCE, expires_in=3600)

            # Register the recipients' devices (a message needs one ciphertext per registered device).
            for i in range(args.pairs):
                await (await connect_lean(gateway, token(f"r{i}"))).close()
            senders = [Sender(f"r{i}@bench", args.payload) for i in range(args.pairs)]
            for i, sender in enumerate(senders):
                sender.peer = await connect_lean(gateway, token(f"s{i}"), on_stanza=sender.on_stanza)
                sender.user = sender.peer.user
            sender_peers = [s.peer for s in senders]

            # Phase 1, store: closed loop until each sender's share is sent and answered.
            share, extra = divmod(args.messages, args.pairs)
            for sender in senders:
                sender.record_from_ns = 0  # every store is measured
            cpu_before, wait_before, client_before = gateway_cpu_s(gateway), gateway_runqueue_wait_s(gateway), client_cpu_s()
            started = time.monotonic()
            for i, sender in enumerate(senders):
                sender.remaining = share + (i < extra)
                sender.refill = True
                for _ in range(args.inflight):
                    sender.send(time.perf_counter_ns())
            done = await wait_until(
                lambda: all(s.remaining == 0 and not s.unacked for s in senders), sender_peers, TAIL_TIMEOUT_S + args.messages / 1000
            )
            store_cpu, store_s = gateway_cpu_s(gateway) - cpu_before, time.monotonic() - started
            store_wait = gateway_runqueue_wait_s(gateway) - wait_before
            store_client_cpu = client_cpu_s() - client_before
            if not done:
                raise RuntimeError("store phase did not finish: acks missing")
            stored = sum(len(s.acked_ids) for s in senders)
            check_sessions(sender_peers)
            for peer in sender_peers:
                await peer.close()

            # The drain includes the recipients' handshakes (pushing starts at welcome): measure
            # what as many reconnects of devices with nothing pending cost, to take it out.
            sender_tokens = [token(f"s{i}") for i in range(args.pairs)]
            cpu_before = gateway_cpu_s(gateway)
            sender_peers = await asyncio.gather(*(connect_lean(gateway, t) for t in sender_tokens))
            handshakes_cpu = gateway_cpu_s(gateway) - cpu_before
            for peer in sender_peers:
                await peer.close()

            # Phase 2, drain: the recipients connect and confirm each pushed batch with one recv.
            recipients = [Recipient() for _ in range(args.pairs)]
            for recipient in recipients:
                recipient.record_latency = False
            recipient_tokens = [token(f"r{i}") for i in range(args.pairs)]
            cpu_before, wait_before, client_before = gateway_cpu_s(gateway), gateway_runqueue_wait_s(gateway), client_cpu_s()
            started = time.monotonic()
            recipient_peers = await asyncio.gather(*(
                connect_lean(gateway, t, on_stanza=r.on_stanza, on_batch_end=r.on_batch_end)
                for r, t in zip(recipients, recipient_tokens)
            ))
            for recipient, peer in zip(recipients, recipient_peers):
                recipient.peer = peer
            await wait_until(lambda: sum(r.delivered for r in recipients) >= stored, recipient_peers, TAIL_TIMEOUT_S + stored / 1000)
            drain_cpu, drain_s = gateway_cpu_s(gateway) - cpu_before, time.monotonic() - started
            drain_wait = gateway_runqueue_wait_s(gateway) - wait_before
            drain_client_cpu = client_cpu_s() - client_before
            await asyncio.sleep(QUIET_S)
            pending_at_welcome = sum(r.peer.welcome.get("pending", 0) for r in recipients)
            check = delivery_check(senders, recipients)
            for peer in recipient_peers:
                await peer.close()

    drained = check["total_delivered"]
    drain_messages_cpu = max(0.0, drain_cpu - handshakes_cpu)
    result = {
        "benchmark": "messages-offline",
        "driver": "lean",
        "durability": args.durability,
        "commit_mode": args.commit_mode,
        "pairs": args.pairs,
        "inflight_per_sender": args.inflight,
        "payload_bytes": args.payload,
        "messages_stored": stored,
        "store_s": round(store_s, 2),
        "stored_per_s": round(stored / store_s),
        "store_gateway_cpu_s": round(store_cpu, 3),
        "gateway_cpu_us_per_stored_message": round(store_cpu / stored * 1e6, 1) if stored else None,
        "store_gateway_cpu_busy": round(store_cpu / store_s, 2),
        "store_gateway_runqueue_wait_s": round(store_wait, 2),
        "store_client_cpu_busy": round(store_client_cpu / store_s, 2),
        "store_ack_latency_ms_p50": percentile_ms([ns for s in senders for ns in s.ack_latencies_ns], 0.50),
        "store_ack_latency_ms_p99": percentile_ms([ns for s in senders for ns in s.ack_latencies_ns], 0.99),
        "pending_at_welcome": pending_at_welcome,
        "messages_drained": drained,
        "drain_s": round(drain_s, 2),
        "drained_per_s": round(drained / drain_s),
        "drain_gateway_cpu_s": round(drain_cpu, 3),
        "drain_handshakes_gateway_cpu_s": round(handshakes_cpu, 3),
        "gateway_cpu_us_per_drained_message": round(drain_messages_cpu / drained * 1e6, 1) if drained else None,
        "drain_gateway_cpu_busy": round(drain_cpu / drain_s, 2),
        "drain_gateway_runqueue_wait_s": round(drain_wait, 2),
        "drain_client_cpu_busy": round(drain_client_cpu / drain_s, 2),
    }
    result.update(check)
    return result


# ----------------------------------------------------------------------------- key directory load

KEYS_GET_PER_REQUESTER = 55  # keys.get per requesting user: under the burst of ops.KEYS_GET_RATE (60)


class KeysLoad:
    """Closed-loop ``keys.get``: ``concurrency`` requests outstanding over the requester peers;
    every answer sends the next request (next target, next requester with budget left)."""

    def __init__(self, targets: list[str], per_requester: int) -> None:
        self.targets = targets
        self.per_requester = per_requester
        self.peers: list[LeanPeer] = []
        self.used: list[int] = []
        self._next_peer = 0
        self._next_target = 0
        self._next_id = 0
        self.outstanding: dict[int, int] = {}  # iq id -> send time (ns)
        self.refill = False
        self.exhausted = False  # no requester had budget left for a request
        self.record_from_ns = 1 << 63
        self.latencies_ns: list[int] = []
        self.done = 0
        self.with_otpk = 0
        self.without_otpk = 0
        self.errors: collections.Counter = collections.Counter()
        self.stray = 0

    def add_peer(self, peer: LeanPeer) -> None:
        self.peers.append(peer)
        self.used.append(0)

    def send(self) -> bool:
        count = len(self.peers)
        for _ in range(count):
            index = self._next_peer
            self._next_peer = (index + 1) % count
            if self.used[index] < self.per_requester:
                break
        else:
            self.exhausted = True
            return False
        self.used[index] += 1
        target = self.targets[self._next_target]
        self._next_target = (self._next_target + 1) % len(self.targets)
        self._next_id += 1
        self.outstanding[self._next_id] = time.perf_counter_ns()
        self.peers[index].queue(encode_stanza({"t": "iq", "id": self._next_id, "op": "keys.get", "user": target}))
        return True

    @property
    def issued(self) -> int:
        return self._next_id

    def on_stanza(self, stanza: dict) -> None:
        kind = stanza.get("t")
        if kind not in ("res", "err"):
            self.stray += 1
            return
        sent_ns = self.outstanding.pop(stanza.get("id"), None)
        if sent_ns is None:
            self.stray += 1
            return
        if kind == "res":
            now_ns = time.perf_counter_ns()
            self.done += 1
            for bundle in stanza.get("bundles", ()):
                if bundle.get("otpk") is None:
                    self.without_otpk += 1
                else:
                    self.with_otpk += 1
            if sent_ns >= self.record_from_ns:
                self.latencies_ns.append(now_ns - sent_ns)
        else:
            self.errors[str(stanza.get("code"))] += 1
        if self.refill:
            self.send()


async def lean_iq(peer: LeanPeer, replies: dict, iq_id: int, op: str, timeout_s: float = 30.0, **fields) -> dict:
    """One iq over a lean peer whose ``on_stanza`` files answers in ``replies`` by id."""
    peer.queue(encode_stanza({"t": "iq", "id": iq_id, "op": op, **fields}))
    deadline = time.monotonic() + timeout_s
    while iq_id not in replies:
        if peer.closed or time.monotonic() > deadline:
            raise RuntimeError(f"{op}: no answer ({peer.close_reason or 'timeout'})")
        await asyncio.sleep(0.002)
    answer = replies.pop(iq_id)
    if answer.get("t") != "res":
        raise RuntimeError(f"{op} refused: {answer}")
    return answer


async def bench_keys(args) -> dict:
    """keys.get per second and gateway CPU per keys.get (closed loop), after the targets published."""
    _raise_fd_limit()
    async with DemoIssuer() as issuer:
        async with GatewayChild(issuer.issuer, Path(args.data_dir), args.durability) as gateway:
            def token(user: str) -> str:
                return issuer.issue(user, audience=AUDIENCE, expires_in=3600)

            # The targets publish: identity key, signed prekey, --otpk one-time prekeys each.
            replies: dict = {}

            def file_reply(stanza: dict) -> None:
                replies[stanza.get("id")] = stanza

            targets = []
            put_cpu_before = gateway_cpu_s(gateway)
            put_started = time.monotonic()
            for i in range(args.targets):
                peer = await connect_lean(gateway, token(f"t{i}"), on_stanza=file_reply)
                stock = [{"id": n, "key": os.urandom(32)} for n in range(args.otpk)]
                spk = {"id": 1, "key": os.urandom(32), "sig": os.urandom(64)}
                res = await lean_iq(peer, replies, i + 1, "keys.put", ik=os.urandom(32), spk=spk, otpk=stock)
                if res.get("otpk_count") != args.otpk:
                    raise RuntimeError(f"keys.put stored {res.get('otpk_count')} one-time prekeys, not {args.otpk}")
                targets.append(peer.user)
                await peer.close()
            put_s = time.monotonic() - put_started
            put_cpu = gateway_cpu_s(gateway) - put_cpu_before  # includes the targets' handshakes

            # The requesters: one device of each of --requesters users (the rate limit is per user).
            load = KeysLoad(targets, KEYS_GET_PER_REQUESTER)
            requester_tokens = [token(f"q{i}") for i in range(args.requesters)]
            for start in range(0, len(requester_tokens), 100):
                peers = await asyncio.gather(*(
                    connect_lean(gateway, t, on_stanza=load.on_stanza) for t in requester_tokens[start : start + 100]
                ))
                for peer in peers:
                    load.add_peer(peer)

            # Closed loop: the first WARM_UP_S are not measured.
            load.refill = True
            for _ in range(args.concurrency):
                load.send()
            await asyncio.sleep(WARM_UP_S)
            check_sessions(load.peers)
            load.record_from_ns = time.perf_counter_ns()

            def snapshot() -> tuple:
                return (
                    load.done, load.with_otpk, load.without_otpk, gateway_cpu_s(gateway), *cpu_times(gateway.pid),
                    gateway_runqueue_wait_s(gateway), client_cpu_s(), time.monotonic(),
                )

            # Stop the window before the requesters' budget can run out (a short loop measures less).
            budget = KEYS_GET_PER_REQUESTER * len(load.peers)
            before = snapshot()
            deadline = time.monotonic() + args.seconds
            ended_early = False
            while time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                if load.issued >= budget - 2 * args.concurrency or load.exhausted:
                    ended_early = True
                    break
            after = snapshot()
            check_sessions(load.peers)
            load.refill = False
            await wait_until(lambda: not load.outstanding, load.peers, TAIL_TIMEOUT_S)
            for start in range(0, len(load.peers), 200):
                await asyncio.gather(*(peer.close() for peer in load.peers[start : start + 200]))

    done, with_otpk, without_otpk, gateway_cpu, gateway_user, gateway_system, gateway_wait, client_cpu, elapsed = (
        end - start for start, end in zip(before, after)
    )
    return {
        "benchmark": "keys.get",
        "durability": args.durability,
        "targets": args.targets,
        "otpk_per_target": args.otpk,
        "requesters": len(load.peers),
        "keys_get_per_requester_max": KEYS_GET_PER_REQUESTER,
        "concurrency": args.concurrency,
        "seconds": round(elapsed, 2),
        "ended_early_requester_budget": ended_early,
        "keys_get": done,
        "keys_get_per_s": round(done / elapsed),
        "returned_otpk": with_otpk,
        "returned_no_otpk": without_otpk,
        "gateway_cpu_s": round(gateway_cpu, 3),
        "gateway_cpu_us_per_keys_get": round(gateway_cpu / done * 1e6, 1) if done else None,
        "gateway_user_s": round(gateway_user, 2),
        "gateway_system_s": round(gateway_system, 2),
        "gateway_cpu_busy": round(gateway_cpu / elapsed, 2),
        "gateway_runqueue_wait_s": round(gateway_wait, 2),
        "client_cpu_busy": round(client_cpu / elapsed, 2),
        "latency_ms_p50": percentile_ms(load.latencies_ns, 0.50),
        "latency_ms_p99": percentile_ms(load.latencies_ns, 0.99),
        "latency_samples": len(load.latencies_ns),
        "refusals": dict(load.errors),
        "stray_answers": load.stray,
        "otpk_left_at_end": args.targets * args.otpk - load.with_otpk,  # whole run, warm-up included
        "publish_s": round(put_s, 2),
        "publish_gateway_cpu_s": round(put_cpu, 3),
    }


async def push_recovered(receiver: PushReceiver, devices: int, timeout_s: float) -> float | None:
    """The endpoint answers 204 again: seconds until every one of ``devices`` got a push (None:
    not within ``timeout_s``)."""
    receiver.reset()
    started = time.monotonic()
    while len({p["user"] for p in receiver.received}) < devices:
        if time.monotonic() - started >= timeout_s:
            return None
        await asyncio.sleep(0.1)
    return round(time.monotonic() - started, 1)


class MediaProcess:
    """The ``--media-peers`` uploaders in a process of their own, pinned beside this tool's
    clients at nice 19: other users' uploads, which must not slow the chat clients whose latency
    is measured (on this tool's loop, encrypting 64 KiB chunks delays reading the acks by up to a
    millisecond a time, and that is the tool, not the gateway)."""

    def __init__(self, gateway: GatewayChild, tokens: list[str], mib: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._bytes = context.Value("q", 0, lock=False)
        self.stop_event = context.Event()
        self._started = context.Event()
        self._results = context.Queue()
        self._process = context.Process(
            target=_media_process_main, name="interlink-bench-media",
            args=(gateway.port, gateway.root_public, gateway.static_public, tokens, mib, self._bytes,
                  self._started, self.stop_event, self._results),
        )

    @property
    def bytes(self) -> int:
        return self._bytes.value

    async def start(self) -> None:
        self._process.start()
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self._started.wait, 60):
            self._process.kill()
            raise RuntimeError("the media process did not start uploading within 60 s")

    async def stop(self) -> dict:
        """Stop the uploads; their errors by code."""
        self.stop_event.set()
        loop = asyncio.get_running_loop()
        errors = await loop.run_in_executor(None, self._results.get, True, 60)
        await loop.run_in_executor(None, self._process.join, 30)
        return errors


def _media_process_main(port, root_public, static_public, tokens, mib, counter, started, stop, results) -> None:
    os.nice(19)
    _pin(1)

    async def run() -> dict:
        clients = [await Client.connect("127.0.0.1", port, token=token, device=1, root_public=root_public,
                                        suite=Suite.XX_CHACHAPOLY, server_static=static_public, timeout_s=30)
                   for token in tokens]
        peers = [MediaPeer(client) for client in clients]
        prepared = BlobBytes(int(mib * 2**20)).content(0)
        for peer in peers:
            peer.upload(prepared)
        started.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
            counter.value = sum(peer.bytes for peer in peers)
        errors = collections.Counter()
        for peer in peers:
            peer.running = False
            peer.task.cancel()
            errors.update(peer.errors)
            await peer.client.close()
        return dict(errors)

    results.put(uvloop.run(run()))


class MediaPeer:
    """One SDK client uploading (or downloading) blobs back to back while ``running``: bytes
    acknowledged so far, and for uploads the time from the last chunk sent to ``ready``."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.running = True
        self.bytes = 0
        self.ready: list[bytes] = []
        self.ready_waits_s: list[float] = []
        self.errors: collections.Counter = collections.Counter()
        self.task: asyncio.Task | None = None

    def upload(self, prepared: BlobContent) -> None:
        async def loop() -> None:
            while self.running:
                done = [0]
                last_chunk_at = [0.0]

                def progress(sent: int, size: int) -> None:
                    self.bytes += sent - done[0]
                    done[0] = sent
                    if sent >= size - self.client.limits["blob_chunk"] * self.client.limits["blob_in_flight"]:
                        last_chunk_at[0] = last_chunk_at[0] or time.monotonic()

                try:
                    blob = await self.client.upload_blob(prepared, progress=progress)
                except ServerError as exc:
                    self.errors[exc.code] += 1
                    return
                self.ready.append(blob)
                self.ready_waits_s.append(time.monotonic() - last_chunk_at[0])

        self.task = asyncio.ensure_future(loop())

    def download(self, blob: bytes) -> None:
        peer = self

        class Counter:
            def write(self, data: bytes) -> None:
                peer.bytes += len(data)

        async def loop() -> None:
            while self.running:
                try:
                    await self.client.download_blob(blob, Counter())
                except ServerError as exc:
                    self.errors[exc.code] += 1
                    return

        self.task = asyncio.ensure_future(loop())


async def _sample_rss(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_bytes(pid))
        await asyncio.sleep(0.05)


async def bench_blobs(args) -> dict:
    """Blob upload and download throughput through one gateway core, and the gateway's memory."""
    _raise_fd_limit()
    prepared = BlobBytes(int(args.size_mib * 2**20)).content(0)  # hashed once, uploaded again and again
    async with DemoIssuer() as issuer:
        async with GatewayChild(issuer.issuer, Path(args.data_dir), args.durability, **LIFTED_BLOB_LIMITS) as gateway:
            def token(user: str) -> str:
                return issuer.issue(user, audience=AUDIENCE, expires_in=3600)

            uploaders = [MediaPeer(await connect(gateway, token(f"up{i}"), 1, Suite.XX_CHACHAPOLY))
                         for i in range(args.peers)]
            await asyncio.sleep(0.3)
            rss_before = rss_bytes(gateway.pid)
            peak, stop = [rss_before], asyncio.Event()
            sampler = asyncio.ensure_future(_sample_rss(gateway.pid, peak, stop))
            # uploads: each peer uploads the blob again and again for the window...
            cpu_before, client_before, wall_before = gateway_cpu_s(gateway), client_cpu_s(), time.monotonic()
            for uploader in uploaders:
                uploader.upload(prepared)
            await asyncio.sleep(args.seconds)
            up_cpu, up_client = gateway_cpu_s(gateway) - cpu_before, client_cpu_s() - client_before
            up_wall = time.monotonic() - wall_before
            uploaded = sum(u.bytes for u in uploaders)
            for uploader in uploaders:
                uploader.running = False  # ...then finishes the one it is uploading
            await asyncio.wait_for(asyncio.gather(*(u.task for u in uploaders)), 600)
            stop.set()
            await sampler
            blobs = [b for u in uploaders for b in u.ready]
            if not blobs:
                raise RuntimeError(f"no upload completed: {[dict(u.errors) for u in uploaders]}")
            # downloads: each peer reads a ready blob again and again for the window
            downloaders = []
            for i in range(args.peers):
                downloader = MediaPeer(await connect(gateway, token(f"down{i}"), 1, Suite.XX_CHACHAPOLY))
                downloaders.append(downloader)
            cpu_before, client_before, wall_before = gateway_cpu_s(gateway), client_cpu_s(), time.monotonic()
            for i, downloader in enumerate(downloaders):
                downloader.download(blobs[i % len(blobs)])
            await asyncio.sleep(args.seconds)
            down_cpu, down_client = gateway_cpu_s(gateway) - cpu_before, client_cpu_s() - client_before
            down_wall = time.monotonic() - wall_before
            downloaded = sum(d.bytes for d in downloaders)
            for downloader in downloaders:
                downloader.running = False
            await asyncio.wait_for(asyncio.gather(*(d.task for d in downloaders)), 600)
            errors = collections.Counter()
            for peer in uploaders + downloaders:
                errors.update(peer.errors)
                await peer.client.close()
    mb = 1e6
    waits = sorted(w for u in uploaders for w in u.ready_waits_s)
    return {
        "benchmark": "blobs",
        "peers": args.peers, "blob_mib": args.size_mib, "chunk_bytes": uploaders[0].client.limits["blob_chunk"],
        "in_flight": uploaders[0].client.limits["blob_in_flight"],
        "upload_mb_per_s": round(uploaded / mb / up_wall, 1),
        "upload_gateway_cpu_busy": round(up_cpu / up_wall, 2),
        "upload_client_cpu_busy": round(up_client / up_wall, 2),
        "upload_gateway_cpu_ms_per_mb": round(up_cpu * 1000 / (uploaded / mb), 3) if uploaded else None,
        "upload_capacity_mb_per_core_s": round((uploaded / mb) / up_cpu, 1) if up_cpu else None,
        "blobs_completed": len(blobs),
        "ready_after_last_chunks_ms_p50": round(waits[len(waits) // 2] * 1000, 1),
        "ready_after_last_chunks_ms_max": round(waits[-1] * 1000, 1),
        "download_mb_per_s": round(downloaded / mb / down_wall, 1),
        "download_gateway_cpu_busy": round(down_cpu / down_wall, 2),
        "download_client_cpu_busy": round(down_client / down_wall, 2),
        "download_gateway_cpu_ms_per_mb": round(down_cpu * 1000 / (downloaded / mb), 3) if downloaded else None,
        "download_capacity_mb_per_core_s": round((downloaded / mb) / down_cpu, 1) if down_cpu else None,
        "gateway_rss_before_mib": round(rss_before / 2**20, 1),
        "gateway_rss_peak_during_uploads_mib": round(peak[0] / 2**20, 1),
        "errors": dict(errors),
    }


async def bench_bare_rss(args) -> dict:
    """The floor: RSS per idle TCP connection to a uvloop server that keeps no state."""
    _raise_fd_limit()
    async with GatewayChild("", Path(args.data_dir), args.durability, bare=True) as server:
        await asyncio.sleep(0.5)
        baseline = rss_bytes(server.pid)
        connections = []
        for start in range(0, args.connections, 500):
            connections += await asyncio.gather(
                *(asyncio.open_connection("127.0.0.1", server.port) for _ in range(min(500, args.connections - start)))
            )
        await asyncio.sleep(2.0)
        loaded = rss_bytes(server.pid)
        for _, writer in connections:
            writer.close()
    return {
        "benchmark": "bare-rss",
        "connections": len(connections),
        "rss_per_idle_connection_bytes": round((loaded - baseline) / len(connections)),
    }


async def bench_idle_rss(args) -> dict:
    _raise_fd_limit()
    if args.bare:
        return await bench_bare_rss(args)
    async with DemoIssuer() as issuer:
        async with GatewayChild(issuer.issuer, Path(args.data_dir), args.durability) as gateway:
            token_users = [f"idle{i}" for i in range(args.connections)]
            # Touch the code paths once so lazily created objects exist before the baseline.
            warm = await connect(gateway, issuer.issue("warm", audience=AUDIENCE, expires_in=3600), 1, Suite.XX_CHACHAPOLY)
            await warm.ping()
            await asyncio.sleep(0.5)
            baseline = rss_bytes(gateway.pid)
            clients = []
            batch = 200
            for start in range(0, len(token_users), batch):
                group = token_users[start : start + batch]
                clients += await asyncio.gather(
                    *(connect(gateway, issuer.issue(u, audience=AUDIENCE, expires_in=3600), 1, Suite.XX_CHACHAPOLY) for u in group)
                )
            # Idle sessions hibernate (free their cipher contexts) 10-20 s after they go quiet
            # with the default idle_release_s; measure the steady idle state.
            await asyncio.sleep(args.settle_s)
            loaded = rss_bytes(gateway.pid)
            for client in clients[:: max(1, len(clients) // 100)]:
                await client.ping()  # they are alive and served
            per_connection = (loaded - baseline) / len(clients)
            for start in range(0, len(clients), 500):
                await asyncio.gather(*(c.close() for c in clients[start : start + 500]))
    return {
        "benchmark": "idle-rss",
        "connections": len(clients),
        "gateway_rss_baseline_mib": round(baseline / 2**20, 1),
        "gateway_rss_loaded_mib": round(loaded / 2**20, 1),
        "rss_per_idle_connection_bytes": round(per_connection),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="gateway data folder (default: a temporary one)")
    parser.add_argument("--durability", default="sync", choices=["sync", "async"])
    parser.add_argument("--transport", default="tcp", choices=["tcp", "ws"],
                        help="clients connect over TCP or over the gateway's WebSocket listener")
    sub = parser.add_subparsers(dest="command", required=True)
    hs = sub.add_parser("handshakes")
    hs.add_argument("--fresh-tokens", action="store_true",
                    help="a new token for every connection (default: each device reconnects with its token)")
    hs.add_argument("--seconds", type=float, default=10.0)
    hs.add_argument("--concurrency", type=int, default=32)
    hs.add_argument("--suite", type=lambda s: int(s, 0), default=0x01)
    hs.add_argument("--alg", default="EdDSA", choices=["EdDSA", "ES256"])
    messages = sub.add_parser("messages")
    messages.add_argument("--seconds", type=float, default=10.0)
    messages.add_argument("--pairs", type=int, default=8, help="sender/recipient pairs (one device each)")
    messages.add_argument("--inflight", type=int, default=16, help="unacked messages per sender")
    messages.add_argument("--payload", type=int, default=100, help="ciphertext bytes per message")
    messages.add_argument("--commit-mode", default="inline", choices=["inline", "thread"])
    messages.add_argument(
        "--overload-turn-messages", type=int, default=None, help="the gateway's admission budget (default: its configuration default)"
    )
    messages.add_argument("--overload-refuse-after-s", type=float, default=None)
    messages.add_argument("--lmdb-writemap", action="store_true", default=None, help="open the store with LMDB's writemap")
    messages.add_argument("--window", type=int, default=None, help="the gateway's delivery window (default: its configuration default)")
    messages.add_argument(
        "--rate", type=float, default=0.0,
        help="open loop: messages/s in total, latency from each message's intended send time (0: closed loop)",
    )
    messages.add_argument("--media-peers", type=int, default=0,
                          help="SDK clients uploading blobs all along (Client.upload_blob): chat beside media")
    messages.add_argument("--media-mib", type=float, default=64.0, help="size of each of their blobs")
    messages.add_argument("--push-offline", type=int, default=0,
                          help="devices of a second provider, registered for push and offline, that receive messages")
    messages.add_argument("--push-rate", type=float, default=500.0, help="messages/s to those devices")
    messages.add_argument("--push-endpoint", choices=["ok", "hang", "500"], default="hang",
                          help="how that provider's webhook endpoint answers during the window")
    messages.add_argument("--push-recovery-timeout-s", type=float, default=180.0,
                          help="after the window: how long to wait for a push to every device")
    messages.add_argument("--gc-threshold", type=int, default=None,
                          help="experiment: the gateway child's GC generation-0 threshold (and gc.freeze() at start)")
    messages.add_argument("--media-same-process", action="store_true",
                          help="run the uploaders on this tool's own loop (before 2026-12-06: their encryption then "
                               "delays the chat clients' reading, and the latency measured is partly the tool's)")
    offline = sub.add_parser("offline")
    offline.add_argument("--messages", type=int, default=50000, help="messages stored, then drained, in total")
    offline.add_argument("--pairs", type=int, default=8, help="sender/recipient pairs (one device each)")
    offline.add_argument("--inflight", type=int, default=16, help="unacked messages per sender while storing")
    offline.add_argument("--payload", type=int, default=100, help="ciphertext bytes per message")
    offline.add_argument("--commit-mode", default="inline", choices=["inline", "thread"])
    keys = sub.add_parser("keys")
    keys.add_argument("--seconds", type=float, default=5.0)
    keys.add_argument("--concurrency", type=int, default=32, help="keys.get outstanding in total (closed loop)")
    keys.add_argument("--targets", type=int, default=64, help="users whose keys are fetched (one device each)")
    keys.add_argument("--otpk", type=int, default=1000, help="one-time prekeys each target publishes (at most 1000)")
    keys.add_argument(
        "--requesters", type=int, default=1500,
        help=f"requesting users (keys.get is rate limited per user: each is used at most {KEYS_GET_PER_REQUESTER} times)",
    )
    blobs = sub.add_parser("blobs")
    blobs.add_argument("--seconds", type=float, default=5.0, help="each phase: uploads, then downloads")
    blobs.add_argument("--peers", type=int, default=4, help="devices uploading (then downloading) at once")
    blobs.add_argument("--size-mib", type=float, default=16.0, help="size of each blob")
    idle = sub.add_parser("idle-rss")
    idle.add_argument("--connections", type=int, default=10000)
    idle.add_argument("--bare", action="store_true", help="measure a stateless uvloop server instead (the floor)")
    idle.add_argument("--settle-s", type=float, default=22.0, help="quiet time before measuring (default: past two idle sweeps)")
    args = parser.parse_args()
    if getattr(args, "payload", TIME_BYTES) < TIME_BYTES:
        parser.error(f"--payload must be at least {TIME_BYTES} bytes (it carries the send time)")
    if args.transport == "ws" and (getattr(args, "media_peers", 0) or getattr(args, "push_offline", 0)):
        parser.error("--media-peers and --push-offline devices connect over TCP: run --transport ws without them")
    _pin(1)
    TRANSPORT["ws_path"] = GatewayConfig().ws_path if args.transport == "ws" else None
    runner = {
        "handshakes": bench_handshakes, "idle-rss": bench_idle_rss, "messages": bench_messages, "offline": bench_offline,
        "keys": bench_keys, "blobs": bench_blobs,
    }[args.command]
    if args.data_dir is None:
        # A run stores up to ~100 MB of mailboxes: a folder of our own, removed afterwards.
        with tempfile.TemporaryDirectory(prefix="interlink-bench-") as folder:
            args.data_dir = folder
            result = uvloop.run(runner(args))
    else:
        result = uvloop.run(runner(args))
    result.update(
        transport=args.transport,
        implementation=interlink.core.IMPLEMENTATION,
        python=platform.python_version(),
        uvloop=uvloop.__version__,
        machine=f"{platform.machine()} {os.cpu_count()} cores",
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
