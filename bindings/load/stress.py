"""The kinds of ``interlink load`` that stress connections rather than messages.

* ``churn``: devices connect (Noise XX and JWT auth), take what waited for them, send
  ``churn_messages`` to their partner, wait for the acks and leave, at ``connect_rate`` sessions/s
  (open loop: connect latency counts from each session's intended start) or as fast as each can
  (``"max"``); ``keep_fraction`` of the users, one of each pair, stay connected and receive live.
  Every message is accounted for as in the chat kinds.
* ``handshake-storm``: new sessions of returning devices (``inflight`` at once, or
  ``connect_rate``/s), each closed after ``welcome`` or, for ``keep_fraction`` of them, kept to the
  end: handshakes + auths per second, their latency, gateway CPU per session and what one core
  would serve at that cost (against ``HANDSHAKES_PER_S_GOAL``). Any failure fails the run.
* ``malformed-mix``: the chat traffic plus, on connections of their own, the malformed frames and
  stanzas of ``CASES`` (``malformed_share`` of all inputs), each sent alone and its answer judged
  against the one the contract (docs/protocol.md) names; a session that must survive is checked
  with a ``ping``. Any mismatch fails the run. The local gateway's frames are limited to
  ``MALFORMED_MAX_FRAME`` bytes so that an over-long frame length can be sent at all.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from interlink.core.protocol.framing import encode_frame
from interlink.core.protocol.noise import Suite, make_preamble
from interlink.core.protocol.stanza import encode_stanza
from interlink.load.accounting import ACKED, Run, account, new_histogram, percentiles_ms, record_latency
from interlink.load.chat import Device, chat_window, drive_devices, make_devices
from interlink.load.peer import LeanPeer
from interlink.load.progress import Ticker
from interlink.load.report import gateway_info, report_head, report_tail
from interlink.load.runner import (
    CONNECT_CONCURRENCY,
    CONNECT_TIMEOUT_S,
    TAIL_TIMEOUT_S,
    close_all,
    connect_all,
    pin_cpus,
    server_window,
    wait_until,
)
from interlink.load.scenario import Scenario
from interlink.load.schedule import OPEN_LOOP_TICK_S
from interlink.load.target import RemoteGateway, open_gateway

__all__ = ["CASES", "run_stress"]

HANDSHAKES_PER_S_GOAL = 3000  # the goal: XX handshakes + JWT auths per second on one gateway core
SESSION_TIMEOUT_S = 10.0  # churn: a session's acks and backlog, before it leaves anyway
STORM_MAX_CONCURRENT = 1024  # open-loop storm: handshakes under way at once (the rest wait, late)
MALFORMED_CONNECTIONS = 4  # malformed-mix: sessions (users m0..m3, in pairs) that send the bad inputs
MALFORMED_MAX_FRAME = 16384  # malformed-mix: the local gateway's frame maximum (at least 8,704)
ANSWER_TIMEOUT_S = 5.0  # malformed-mix: how long an answer (or a close) may take
DLV_ROOM_BYTES = 528  # a ciphertext over max_frame - 528 bytes is too_large (docs/protocol.md §6)


# ----------------------------------------------------------------------------- shared pieces


class StressRun(Run):
    """``Run`` plus what the connection kinds count: sessions opened and failed, their latency."""

    def __init__(self, scenario: Scenario) -> None:
        super().__init__(scenario)
        self.handshake_hist = new_histogram()  # attempt -> welcome
        self.connect_hist = new_histogram()  # intended -> welcome
        self.connects = 0  # sessions that got welcome
        self.closes = 0  # sessions we closed
        self.kept = 0
        self.connect_failures: collections.Counter = collections.Counter()  # by code or close reason

    def connected(self, attempt_ns: int, intended_ns: int) -> None:
        now_ns = time.perf_counter_ns()
        self.connects += 1
        record_latency(self.handshake_hist, now_ns - attempt_ns)
        record_latency(self.connect_hist, now_ns - intended_ns)


def close_code(reason: str | None) -> str:
    """A session's close reason as one word: the err code when an err caused the close
    (``auth_failed (token_expired: ...)`` -> ``token_expired``), else the reason itself
    (``protocol_error: gateway said bye`` -> ``protocol_error``)."""
    if not reason:
        return "open"
    head, paren, rest = reason.partition(" (")
    if paren and ":" in rest:
        return rest.split(":", 1)[0]
    return head.split(":", 1)[0].split(" ", 1)[0]


def connect_failure(exc: BaseException) -> str:
    """Why ``LeanPeer.connect`` failed, as a code for the report."""
    prefix = "session closed before welcome: "
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionError) and str(exc).startswith(prefix):
        return close_code(str(exc)[len(prefix):])
    return type(exc).__name__  # ConnectionRefusedError, ConnectionResetError, ...


class _Arrivals:
    """Open-loop arrivals: ``rate`` starts per second, each handed to ``start(intended_ns)`` as soon
    as ``ready()`` allows. Starts that cannot begin yet wait in order and keep their intended time,
    so a gateway that falls behind shows as connect latency (coordinated-omission correction)."""

    def __init__(self, rate: float, ready: Callable[[], bool], start: Callable[[int], None]) -> None:
        self.period_ns = 1e9 / rate
        self.ready = ready
        self.start = start
        self.due: collections.deque = collections.deque()
        self._count = 0
        self._origin_ns = 0
        self._timer: asyncio.TimerHandle | None = None
        self._running = False

    def begin(self) -> None:
        self._origin_ns = time.perf_counter_ns()
        self._running = True
        self._tick()

    def _tick(self) -> None:
        now_ns = time.perf_counter_ns()
        while (intended_ns := int(self._origin_ns + self._count * self.period_ns)) <= now_ns:
            self.due.append(intended_ns)
            self._count += 1
        self.poke()
        self._timer = asyncio.get_running_loop().call_later(OPEN_LOOP_TICK_S, self._tick)

    def poke(self) -> None:
        """Start what is due while there is room (call when room was freed)."""
        while self._running and self.due and self.ready():
            self.start(self.due.popleft())

    def stop(self) -> int:
        """Stop arriving; the number of due starts that never began."""
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        left = len(self.due)
        self.due.clear()
        return left


class _StressTicker(Ticker):
    """The per-second progress, with the session counters in every sample and line."""

    def _sample(self) -> dict:
        run = self.run
        sample = super()._sample()
        sample.update(connects=run.connects, connect_failures=sum(run.connect_failures.values()), kept=run.kept)
        return sample

    def _line(self, sample: dict, previous: dict) -> str:
        sessions = (
            f"connects {sample['connects']} (+{sample['connects'] - previous.get('connects', 0)})"
            + (f" failed {sample['connect_failures']}" if sample["connect_failures"] else "")
            + (f" kept {sample['kept']}" if sample["kept"] else "")
        )
        if self.run.scenario.kind == "handshake-storm":  # no messages: the sessions alone
            return f"{sample['t_s']:6.1f}s {sample['phase']:<6} {sessions}"
        return f"{super()._line(sample, previous)}  {sessions}"


def _connect_report(run: StressRun) -> dict:
    """Latency entries of the sessions (merged into the report's ``latency_ms``/``histograms``)."""
    return {"handshake": run.handshake_hist, "connect": run.connect_hist}


async def _stop_sessions(arrivals: _Arrivals | None, busy: set[asyncio.Task]) -> None:
    """Stop the open-loop arrivals (if any) and cancel the session tasks still under way, then
    wait for them to end (a no-op after a run that ended normally)."""
    if arrivals is not None:
        arrivals.stop()
    left = [task for task in busy if not task.done()]
    for task in left:
        task.cancel()
    if left:
        await asyncio.gather(*left, return_exceptions=True)


# ----------------------------------------------------------------------------- churn


async def _run_churn(run: StressRun, gateway, devices: list[Device], ticker: _StressTicker,
                     out: Callable[[str], None] | None) -> dict:
    scenario = run.scenario
    users = list(dict.fromkeys(d.user for d in devices))
    # Users pair 2k with 2k+1: keep one user of each pair (the even ones first), so that a kept
    # user's partner churns and its messages reach the kept user live. Only past half of the
    # users are both of a pair kept.
    by_pair_side = sorted(range(len(users)), key=lambda index: (index % 2, index))
    kept_users = {users[index] for index in by_pair_side[: int(scenario.keep_fraction * len(users))]}
    kept = [d for d in devices if d.user in kept_users]
    churning = [d for d in devices if d.user not in kept_users]
    # Every device connects once (a message must name its recipient's registered devices); the
    # churning ones leave again. Tokens are minted once: a device reuses its token, as apps do.
    await connect_all(gateway, devices)
    await close_all(churning)
    tokens = {d.user: gateway.token(d.localpart, d.provider_id) for d in churning}
    loop = asyncio.get_running_loop()
    busy: set[asyncio.Task] = set()

    async def session(device: Device, intended_ns: int) -> None:
        attempt_ns = time.perf_counter_ns()
        try:
            await device.connect(gateway, tokens[device.user])
        except (OSError, TimeoutError) as exc:  # ConnectionError is an OSError
            run.connect_failures[connect_failure(exc)] += 1
            return
        run.connected(attempt_ns, intended_ns)
        now_ns = time.perf_counter_ns()
        for _ in range(scenario.churn_messages):
            device.send(now_ns)
        # Leave once every message is answered (a close before the ack would leave it unexplained)
        # and the backlog of the session was taken.
        await wait_until(
            lambda: not device.connected or (not device.unanswered and device.session_deliveries >= device.session_pending),
            SESSION_TIMEOUT_S,
        )
        await device.close()
        run.closes += 1

    run.record_from_ns = time.perf_counter_ns()
    run.sending = False  # no closed-loop refill on acks: each session sends its few and leaves
    ticker.phase = "churn"
    ticker.start()
    before, started = gateway.cpu_s(), time.monotonic()
    deadline = started + scenario.duration
    not_started = 0
    arrivals: _Arrivals | None = None
    try:
        if scenario.connect_rate is not None:
            idle = collections.deque(churning)

            def start(intended_ns: int) -> None:
                device = idle.popleft()
                task = loop.create_task(session(device, intended_ns))
                busy.add(task)

                def done(finished: asyncio.Task, device: Device = device) -> None:
                    busy.discard(finished)
                    idle.append(device)
                    arrivals.poke()

                task.add_done_callback(done)

            arrivals = _Arrivals(scenario.connect_rate, lambda: bool(idle), start)
            arrivals.begin()
            await asyncio.sleep(scenario.duration)
            not_started = arrivals.stop()
        else:
            async def cycle(device: Device) -> None:
                while time.monotonic() < deadline:
                    failures = sum(run.connect_failures.values())
                    await session(device, time.perf_counter_ns())
                    if sum(run.connect_failures.values()) > failures:
                        await asyncio.sleep(0.05)  # do not spin on a refusing gateway

            busy.update(loop.create_task(cycle(device)) for device in churning)
            await asyncio.sleep(scenario.duration)
        window_s = time.monotonic() - started
        connects, after = run.connects, gateway.cpu_s()
        ticker.phase = "tail"
        if busy:
            await asyncio.gather(*busy)  # sessions under way finish (their messages are in the ledger)
    finally:
        # A cancel (Ctrl-C) or an error: no new sessions, and none left running behind us.
        await _stop_sessions(arrivals, busy)
    # The kept devices take what is still on its way to them, then everyone leaves; what waits in
    # the churning users' mailboxes is found by the accounting drain.
    await wait_until(
        lambda: all(len(m.delivered) == len(m.to_devices) for m in run.ledger.values()
                    if m.state == ACKED and m.to_user in kept_users),
        TAIL_TIMEOUT_S,
    )
    await ticker.stop()
    await close_all(kept)
    server = server_window(gateway, before, after, window_s, connects, "connect")
    return {
        "window_s": round(window_s, 3),
        "throughput_per_s": {
            "connects": round(connects / window_s, 1), "sent": round(run.sent / window_s, 1),
            "acked": round(run.acked / window_s, 1),
        },
        "window_counts": {"connects": connects, "sent": run.sent, "acked": run.acked},
        "server": server,
        "stress": {"churn": {
            "devices": len(devices), "kept_devices": len(kept), "churning_devices": len(churning),
            "connect_rate": scenario.connect_rate, "messages_per_session": scenario.churn_messages,
            "connects": run.connects, "closes": run.closes, "connect_failures": dict(run.connect_failures),
            "not_started": not_started,
        }},
        "failed_because": (
            [f"{sum(run.connect_failures.values())} connects failed ({dict(run.connect_failures)})"]
            if run.connect_failures else []
        ),
    }


# ----------------------------------------------------------------------------- handshake storm


async def _run_storm(run: StressRun, gateway, ticker: _StressTicker, out: Callable[[str], None] | None) -> dict:
    scenario = run.scenario
    identities = gateway.addresses(scenario.users)
    tokens = [gateway.token(localpart, provider_id) for localpart, provider_id in identities]

    async def open_session(index: int) -> LeanPeer:
        return await LeanPeer.connect(
            gateway.host, gateway.port, token=tokens[index], device=1, root_public=gateway.root_public,
            server_static=gateway.static_public, timeout_s=CONNECT_TIMEOUT_S,
        )

    async def register(index: int) -> None:
        peer = await open_session(index)
        await peer.close()

    # A first login writes the device record (one commit); the storm measures returning devices.
    ticker.phase = "register"
    semaphore = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def bounded(index: int) -> None:
        async with semaphore:
            await register(index)

    await asyncio.gather(*(bounded(index) for index in range(len(identities))))
    free = collections.deque(range(len(identities)))  # identities with no session open
    kept: list[LeanPeer] = []
    exhausted = 0

    async def attempt(intended_ns: int) -> None:
        nonlocal exhausted
        if not free:
            exhausted += 1  # every identity is held by a kept session: nothing left to connect with
            return
        index = free.popleft()
        attempt_ns = time.perf_counter_ns()
        try:
            peer = await open_session(index)
        except (OSError, TimeoutError) as exc:
            run.connect_failures[connect_failure(exc)] += 1
            free.append(index)
            return
        run.connected(attempt_ns, intended_ns)
        if run.kept < scenario.keep_fraction * run.connects:  # spread the kept sessions evenly
            run.kept += 1
            kept.append(peer)
            return
        await peer.close()
        run.closes += 1
        free.append(index)

    ticker.phase = "storm"
    ticker.start()
    loop = asyncio.get_running_loop()
    before, started = gateway.cpu_s(), time.monotonic()
    deadline = started + scenario.duration
    busy: set[asyncio.Task] = set()
    not_started = 0
    arrivals: _Arrivals | None = None
    try:
        if scenario.connect_rate is not None:
            def start(intended_ns: int) -> None:
                task = loop.create_task(attempt(intended_ns))
                busy.add(task)
                task.add_done_callback(lambda finished: (busy.discard(finished), arrivals.poke()))

            arrivals = _Arrivals(scenario.connect_rate, lambda: len(busy) < STORM_MAX_CONCURRENT, start)
            arrivals.begin()
            await asyncio.sleep(scenario.duration)
            not_started = arrivals.stop()
        else:
            async def worker() -> None:
                while time.monotonic() < deadline:
                    failures = sum(run.connect_failures.values())
                    await attempt(time.perf_counter_ns())
                    if not free or sum(run.connect_failures.values()) > failures:
                        await asyncio.sleep(0.05)

            busy.update(loop.create_task(worker()) for _ in range(scenario.inflight))
            await asyncio.sleep(scenario.duration)
        window_s = time.monotonic() - started
        connects, after = run.connects, gateway.cpu_s()
        ticker.phase = "tail"
        if busy:
            await asyncio.gather(*busy)
    except BaseException:
        # A cancel (Ctrl-C) or an error: stop starting sessions, then close the kept ones too.
        await _stop_sessions(arrivals, busy)
        await asyncio.gather(*(peer.close() for peer in kept), return_exceptions=True)
        raise
    await ticker.stop()
    await asyncio.gather(*(peer.close() for peer in kept))
    ended = collections.Counter(close_code(peer.close_reason) for peer in kept if peer.close_reason != "client_closed")
    server = server_window(gateway, before, after, window_s, connects, "handshake")
    per_core = round(1e6 / server["cpu_us_per_handshake"]) if server.get("cpu_us_per_handshake") else None
    failed_because = []
    if run.connect_failures:
        failed_because.append(f"{sum(run.connect_failures.values())} handshakes failed ({dict(run.connect_failures)})")
    if ended:
        failed_because.append(f"kept sessions ended by the gateway ({dict(ended)})")
    return {
        "window_s": round(window_s, 3),
        "throughput_per_s": {"handshakes": round(connects / window_s, 1)},
        "window_counts": {"handshakes": connects},
        "server": server,
        "stress": {"storm": {
            "identities": len(identities), "connect_rate": scenario.connect_rate,
            "concurrency": scenario.inflight if scenario.connect_rate is None else STORM_MAX_CONCURRENT,
            "handshakes": run.connects, "closed": run.closes, "kept": run.kept,
            "failures_by_code": dict(run.connect_failures), "kept_sessions_ended": dict(ended),
            "not_started": not_started, "identities_exhausted": exhausted,
            "goal_handshakes_per_s_per_core": HANDSHAKES_PER_S_GOAL,
            "handshakes_per_core_s": per_core,
        }},
        "failed_because": failed_because,
    }


# ----------------------------------------------------------------------------- malformed mix


@dataclass(frozen=True)
class Expect:
    """The answer the contract names for one malformed input."""

    answer: str  # "err" (an err stanza), "bye" (a bye, then the close), "silent_close" (closed, no bytes)
    code: str = ""  # the err code or the bye reason
    echo: bool = False  # the err carries the request's ref (bin16 id) or id (iq)
    closes: bool = False  # the connection must end after the answer

    def __str__(self) -> str:
        if self.answer == "silent_close":
            return "close without an answer"
        text = f"{self.answer} {self.code}" + (" echoing the id" if self.echo else "")
        return text + (", then close" if self.closes else ", session stays")


@dataclass
class Ctx:
    """What an input needs to know: its session's partner and the gateway's frame maximum."""

    partner: str
    max_frame: int
    msg_id: bytes
    iq_id: int


def _stanza(fields: dict) -> bytes:
    return encode_stanza(fields)


def _msg(ctx: Ctx, **fields) -> bytes:
    return _stanza({"t": "msg", "id": ctx.msg_id, **fields})


@dataclass(frozen=True)
class Case:
    """One kind of malformed input: ``stage`` ``"tcp"`` (raw bytes instead of a session),
    ``"auth"`` (a handshake with a bad auth payload), ``"frame"`` (raw bytes after the handshake)
    or ``"stanza"`` (a transport message with this plaintext); ``build(ctx)`` makes the bytes."""

    name: str
    stage: str
    build: Callable[[Ctx], Any]
    expect: Expect
    what: str


BAD_STANZA = Expect("err", "bad_stanza")
BAD_STANZA_ECHO = Expect("err", "bad_stanza", echo=True)
BAD_FRAME = Expect("err", "bad_frame", closes=True)

CASES: tuple[Case, ...] = (
    Case("bad_preamble", "tcp", lambda ctx: b"XL\x01\x01", Expect("silent_close"), "a preamble with other magic bytes"),
    Case("unknown_suite", "tcp", lambda ctx: make_preamble(0x01)[:3] + b"\x7f", Expect("silent_close"),
         "a suite byte the gateway does not know"),
    Case("bad_handshake", "tcp", lambda ctx: make_preamble(Suite.XX_CHACHAPOLY) + encode_frame(os.urandom(5)),
         Expect("silent_close"), "XX message 1 of 5 bytes (32 needed)"),
    Case("bad_token", "auth", lambda ctx: "not.a.jwt", Expect("err", "auth_failed", closes=True),
         "a token that is not a JWT"),
    Case("oversized_token", "auth", lambda ctx: "a" * 9000, Expect("err", "too_large", closes=True),
         "a 9,000-byte token (at most 8,192)"),
    Case("garbage_frame", "frame", lambda ctx: encode_frame(os.urandom(48)), BAD_FRAME,
         "a frame of random bytes after the handshake (its tag does not verify)"),
    Case("zero_length_frame", "frame", lambda ctx: b"\x00\x00", BAD_FRAME, "a frame length of 0"),
    Case("oversized_frame_length", "frame", lambda ctx: (ctx.max_frame + 1).to_bytes(2, "big"), BAD_FRAME,
         "a frame length past the announced max_frame (no body sent)"),
    Case("too_many_stanzas", "stanza", lambda ctx: _stanza({"t": "ping", "id": 1}) * 257,
         Expect("bye", "protocol_error", closes=True), "257 stanzas in one transport message"),
    Case("msgpack_garbage", "stanza", lambda ctx: b"\xc1\xc1\xc1", BAD_STANZA, "bytes that are not msgpack"),
    Case("not_a_map", "stanza", lambda ctx: msgpack.packb([1, 2, 3]), BAD_STANZA, "a msgpack list, not a map"),
    Case("truncated_stanza", "stanza", lambda ctx: _msg(ctx, to=ctx.partner, c={1: b"x" * 20})[:-5], BAD_STANZA,
         "a transport message that ends inside a stanza"),
    Case("no_type", "stanza", lambda ctx: _stanza({"id": 5}), BAD_STANZA, "a map without 't'"),
    Case("unknown_type", "stanza", lambda ctx: _stanza({"t": "zap", "id": ctx.msg_id}), BAD_STANZA_ECHO,
         "an unknown stanza type"),
    Case("msg_bad_id", "stanza", lambda ctx: _stanza({"t": "msg", "id": b"short", "to": ctx.partner, "c": {1: b"x"}}),
         BAD_STANZA, "a msg whose id is not 16 bytes"),
    Case("msg_missing_to", "stanza", lambda ctx: _msg(ctx, c={1: b"x"}), BAD_STANZA_ECHO, "a msg without 'to'"),
    Case("msg_missing_c", "stanza", lambda ctx: _msg(ctx, to=ctx.partner), BAD_STANZA_ECHO, "a msg without 'c'"),
    Case("msg_bad_address", "stanza", lambda ctx: _msg(ctx, to="no-at-sign", c={1: b"x"}), BAD_STANZA_ECHO,
         "a msg to something that is not an address"),
    Case("msg_bad_device", "stanza", lambda ctx: _msg(ctx, to=ctx.partner, c={0: b"x"}), BAD_STANZA_ECHO,
         "a msg with device number 0 in 'c'"),
    Case("msg_unknown_provider", "stanza", lambda ctx: _msg(ctx, to="someone@no-such-provider", c={1: b"x"}),
         Expect("err", "unknown_recipient", echo=True), "a msg to a provider that is not registered"),
    Case("msg_oversized_ciphertext", "stanza",
         lambda ctx: _msg(ctx, to=ctx.partner, c={1: bytes(ctx.max_frame - DLV_ROOM_BYTES + 1)}),
         Expect("err", "too_large", echo=True), "a ciphertext one byte over max_frame - 528"),
    Case("msg_device_mismatch", "stanza", lambda ctx: _msg(ctx, to=ctx.partner, c={99: b"x"}),
         Expect("err", "device_mismatch", echo=True), "a msg naming a device the recipient does not have"),
    Case("ping_bad_id", "stanza", lambda ctx: _stanza({"t": "ping", "id": "x"}), BAD_STANZA, "a ping with a str id"),
    Case("recv_bad_seq", "stanza", lambda ctx: _stanza({"t": "recv", "seq": "x"}), BAD_STANZA,
         "a recv whose seq is not a list"),
    Case("rcpt_bad_kind", "stanza",
         lambda ctx: _stanza({"t": "rcpt", "id": ctx.msg_id, "to": ctx.partner, "kind": "seen", "ids": [ctx.msg_id]}),
         BAD_STANZA_ECHO, "a receipt of an unknown kind"),
    Case("state_bad_s", "stanza", lambda ctx: _stanza({"t": "state", "to": ctx.partner, "s": "dancing"}), BAD_STANZA,
         "a typing state that is neither composing nor paused"),
    Case("iq_unknown_op", "stanza", lambda ctx: _stanza({"t": "iq", "id": ctx.iq_id, "op": "zap"}), BAD_STANZA_ECHO,
         "an iq with an operation the gateway does not serve"),
    Case("iq_missing_field", "stanza", lambda ctx: _stanza({"t": "iq", "id": ctx.iq_id, "op": "devices.get"}),
         BAD_STANZA_ECHO, "devices.get without 'user'"),
)


class _Tally:
    """Malformed inputs sent and how they were answered."""

    def __init__(self) -> None:
        self.sent = 0
        self.by_case: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.answers: collections.Counter = collections.Counter()  # every answer, by code
        self.mismatches: list[dict] = []  # the first few, for the report
        self.mismatch_count = 0

    def note(self, case: Case, observed: dict, problem: str | None) -> None:
        counts = self.by_case[case.name]
        counts["sent"] += 1
        self.answers[observed["answer"]] += 1
        if problem is None:
            counts["as_contract"] += 1
            return
        counts["mismatches"] += 1
        self.mismatch_count += 1
        if len(self.mismatches) < 20:
            self.mismatches.append({"case": case.name, "expected": str(case.expect), "got": observed, "problem": problem})


class MalformedWorker:
    """One session (its own user) that sends malformed inputs one at a time and judges each answer."""

    def __init__(self, gateway, localpart: str, provider_id: str, partner: str, tally: _Tally) -> None:
        self.gateway = gateway
        self.localpart = localpart
        self.provider_id = provider_id
        self.partner = partner
        self.tally = tally
        self.token = gateway.token(localpart, provider_id)
        self.peer: LeanPeer | None = None
        self.received: list[dict] = []
        self.sessions = 0
        self._ids = itertools.count(1)

    async def connect(self, token: str | None = None) -> LeanPeer:
        """A session of this worker's user (``token``: another token, for the auth cases; that
        session's stanzas are not the worker's answers)."""
        gateway = self.gateway
        peer = await LeanPeer.connect(
            gateway.host, gateway.port, token=token or self.token, device=1, root_public=gateway.root_public,
            server_static=gateway.static_public, on_stanza=self._on_stanza if token is None else _ignore,
            timeout_s=CONNECT_TIMEOUT_S,
        )
        self.sessions += 1
        return peer

    def _on_stanza(self, stanza: dict) -> None:
        self.received.append(stanza)

    async def close(self) -> None:
        if self.peer is not None:
            await self.peer.close()
            self.peer = None

    def ctx(self) -> Ctx:
        limits = self.peer.welcome.get("limits", {}) if self.peer is not None else {}
        return Ctx(partner=self.partner, max_frame=limits.get("max_frame", 65535), msg_id=os.urandom(16),
                   iq_id=next(self._ids))

    async def feed(self, case: Case) -> None:
        """Send one malformed input, wait for its answer, judge it and note it."""
        if case.stage == "tcp":
            observed = await self._raw(case.build(None))
        elif case.stage == "auth":
            observed = await self._auth(case.build(None))
        else:
            if self.peer is None or self.peer.closed:
                await self.close()
                self.peer = await self.connect()
            if case.name == "oversized_frame_length" and self.ctx().max_frame >= 65535:
                return  # a 2-byte length cannot pass a 65,535-byte maximum: nothing to send
            observed = await self._in_session(case)
        self.tally.sent += 1
        self.tally.note(case, observed, judge(case.expect, observed))

    async def _raw(self, data: bytes) -> dict:
        """Bytes on a fresh TCP connection: what came back before the gateway closed it."""
        reader, writer = await asyncio.open_connection(self.gateway.host, self.gateway.port)
        try:
            writer.write(data)
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                answer = await reader.read()  # to EOF
            closed = True
        except TimeoutError:
            answer, closed = b"", False
        except ConnectionResetError:
            answer, closed = b"", True
        finally:
            writer.transport.abort()  # the answer (or its absence) is in: nothing of ours left to send
        return {"answer": "silent_close" if closed and not answer else f"{len(answer)} bytes" if answer else "no_close",
                "closed": closed, "errs": []}

    async def _auth(self, token: str) -> dict:
        try:
            peer = await self.connect(token)
        except (OSError, TimeoutError) as exc:
            code = connect_failure(exc)
            # An auth refusal is the gateway's err: LeanPeer's close reason is "auth_failed (CODE: ...)".
            refused = isinstance(exc, ConnectionError) and "auth_failed (" in str(exc)
            return {"answer": f"err {code}" if refused else code, "closed": True,
                    "errs": [{"code": code}] if refused else []}
        await peer.close()
        return {"answer": "welcome", "closed": False, "errs": []}

    async def _in_session(self, case: Case) -> dict:
        peer = self.peer
        ctx = self.ctx()
        data = case.build(ctx)
        self.received.clear()
        if case.stage == "frame":
            peer.flush()  # nothing of ours may follow the bad bytes
            peer.transport.write(data)
        else:
            peer.queue(data)  # one transport message with exactly these plaintext bytes
        # The first answer (or the close). Pongs and errs of one read may leave in either order,
        # so the check that the session lives on is a ping sent only after the answer came.
        await wait_until(lambda: peer.closed or any(s.get("t") != "pong" for s in self.received), ANSWER_TIMEOUT_S)
        alive = False
        if not peer.closed and not case.expect.closes:
            probe = 1 << 40 | ctx.iq_id
            peer.queue(encode_stanza({"t": "ping", "id": probe}))
            alive = await wait_until(
                lambda: peer.closed or any(s.get("t") == "pong" and s.get("id") == probe for s in self.received),
                ANSWER_TIMEOUT_S,
            ) and not peer.closed
        elif case.expect.closes:
            await wait_until(lambda: peer.closed, ANSWER_TIMEOUT_S)
        answers = [s for s in self.received if s.get("t") != "pong"]
        errs = [s for s in answers if s.get("t") == "err"]
        bye = close_code(peer.close_reason) if peer.closed and "gateway said bye" in (peer.close_reason or "") else None
        echo_ok = all(
            (s.get("ref") == ctx.msg_id) if "ref" in s else (s.get("id") == ctx.iq_id) if "id" in s else False
            for s in errs
        )
        if errs:
            answer = "err " + ",".join(str(s.get("code")) for s in errs)
        elif bye:
            answer = f"bye {bye}"
        elif peer.closed:
            answer = "closed"
        else:
            answer = "none"
        others = [s.get("t") for s in answers if s.get("t") != "err"]
        if peer.closed:
            await self.close()
        return {"answer": answer, "closed": peer.closed, "alive": alive, "errs": [
            {key: (value.hex() if isinstance(value, bytes) else value) for key, value in s.items() if key != "msg"}
            for s in errs
        ], "echo_ok": echo_ok, "others": others, "bye": bye}


def _ignore(stanza: dict) -> None:
    return None


def judge(expect: Expect, observed: dict) -> str | None:
    """None when ``observed`` is the answer ``expect`` names; otherwise what differs."""
    if expect.answer == "silent_close":
        return None if observed["answer"] == "silent_close" else f"expected a close without an answer, got {observed['answer']}"
    errs = observed["errs"]
    if expect.answer == "bye":
        if errs or observed.get("bye") != expect.code:
            return f"expected bye {expect.code}, got {observed['answer']}"
        return None
    if len(errs) != 1 or errs[0].get("code") != expect.code:
        return f"expected one err {expect.code}, got {observed['answer']}"
    if observed.get("others"):
        return f"unexpected stanzas besides the err: {observed['others']}"
    if expect.echo and not observed.get("echo_ok"):
        return "the err does not echo the request's ref/id"
    if expect.code == "device_mismatch" and not (errs[0].get("extra") == [99] and errs[0].get("missing") == [1]):
        return f"device_mismatch should list missing [1] and extra [99], got {errs[0]}"
    if expect.closes and not observed["closed"]:
        return "the connection stayed open"
    if not expect.closes and not observed.get("alive"):
        return "the session did not survive (no pong after the err)"
    return None


async def _run_malformed(run: Run, gateway, devices: list[Device], ticker: Ticker, out: Callable[[str], None] | None,
                         tally: _Tally) -> dict:
    scenario = run.scenario
    people = gateway.addresses(scenario.users + MALFORMED_CONNECTIONS)[scenario.users:]
    addresses = [f"{localpart}@{provider_id}" for localpart, provider_id in people]
    workers = [
        MalformedWorker(gateway, localpart, provider_id, addresses[index ^ 1], tally)
        for index, (localpart, provider_id) in enumerate(people)
    ]
    for worker in workers:  # connected first: each is the other's registered recipient
        worker.peer = await worker.connect()
    share = scenario.malformed_share
    ratio = share / (1 - share)  # malformed inputs per well-formed message
    cases = itertools.cycle(CASES)
    stop = asyncio.Event()

    async def pace(worker: MalformedWorker) -> None:
        # Keep to the share of what the chat traffic sent; after the chat, go on until every case
        # was sent once (a short or slow run still checks them all).
        while not stop.is_set() or started < len(CASES):
            if not stop.is_set() and tally.sent >= ratio * run.sent:
                await asyncio.sleep(0.002)
                continue
            await feed(worker)

    started = 0

    async def feed(worker: MalformedWorker) -> None:
        nonlocal started
        started += 1
        await worker.feed(next(cases))

    tasks = [asyncio.get_running_loop().create_task(pace(worker)) for worker in workers] if share > 0 else []
    chat_ended = False
    try:
        phases = await chat_window(run, gateway, devices, ticker, out, None)
        chat_ended = True
    finally:
        stop.set()
        if not chat_ended:  # a cancel (Ctrl-C) or an error: no more malformed inputs either
            for task in tasks:
                task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for worker in workers:
            await worker.close()
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise failures[0]
    inputs = tally.sent + run.sent
    by_case = {
        case.name: {"what": case.what, "expected": str(case.expect), **dict(tally.by_case.get(case.name, {}))}
        for case in CASES
    }
    phases["stress"] = {"malformed": {
        "share_wanted": share, "share_sent": round(tally.sent / inputs, 4) if inputs else 0.0,
        "inputs": tally.sent, "as_contract": tally.sent - tally.mismatch_count, "mismatches": tally.mismatch_count,
        "answers_by_code": dict(tally.answers), "by_case": by_case, "connections": len(workers),
        "sessions": sum(worker.sessions for worker in workers), "first_mismatches": tally.mismatches,
    }}
    phases["failed_because"] = (
        [f"{tally.mismatch_count} malformed inputs without their contract answer"] if tally.mismatch_count else []
    )
    return phases


# ----------------------------------------------------------------------------- the run


async def run_stress(scenario: Scenario, *, data_dir: Path | None = None, out: Callable[[str], None] | None = print,
                     pin: bool = False, target: RemoteGateway | None = None) -> dict:
    """Run a ``churn``, ``handshake-storm`` or ``malformed-mix`` scenario; the report has the keys
    every kind shares plus ``stress``."""
    scenario.validate()
    run = StressRun(scenario)
    gateway_cpu = pin_cpus(pin, target)
    # malformed-mix: a frame maximum under 65,535, so that an over-long frame length exists
    max_frame = MALFORMED_MAX_FRAME if scenario.kind == "malformed-mix" else None
    async with open_gateway(scenario, data_dir=data_dir, target=target, cpu=gateway_cpu,
                            max_frame=max_frame) as gateway:
        if scenario.kind == "handshake-storm":
            ticker = _StressTicker(run, out)
            try:
                phases = await _run_storm(run, gateway, ticker, out)
            finally:
                await ticker.stop()
            drain = {"devices_reconnected": 0, "pending_at_welcome": 0}
        elif scenario.kind == "churn":
            devices = make_devices(run, gateway)
            ticker = _StressTicker(run, out)
            phases, drain = await drive_devices(run, gateway, devices, ticker,
                                                lambda: _run_churn(run, gateway, devices, ticker, out))
        else:
            devices = make_devices(run, gateway)
            ticker = Ticker(run, out)
            phases, drain = await drive_devices(run, gateway, devices, ticker,
                                                lambda: _run_malformed(run, gateway, devices, ticker, out, _Tally()))
        where = gateway_info(gateway, scenario, None, gateway_cpu, run)
        if max_frame is not None and not gateway.remote:
            where["max_frame"] = max_frame
    accounting = account(run)
    accounting["accounting_drain"] = drain
    failed_because = phases.pop("failed_because")
    report = {
        **report_head(scenario, where),
        **phases,
        "counts": {"sent": run.sent, "acked": run.acked, "refused": run.refused, "delivered": run.delivered,
                   "device_deliveries": run.device_deliveries, "connects": run.connects},
        **report_tail(run, accounting, ticker),
    }
    if scenario.kind != "malformed-mix":  # sessions opened: their handshake (and connect) latency
        for name, histogram in _connect_report(run).items():
            report["latency_ms"][name] = percentiles_ms(histogram)
            report["histograms"][name] = histogram.encode().decode("ascii")
    report["stress"]["failed_because"] = failed_because
    report["ok"] = report["ok"] and not failed_because
    return report
