"""The chat kinds of ``interlink load``: ``chat`` and ``offline-drain``.

Users alternate between providers and talk in pairs (user 2k with 2k+1), so every message crosses
providers; every device (``Device``, a ``LeanPeer`` session) sends its partner user one
ciphertext per partner device. ``chat`` sends for ``duration`` seconds, open loop at ``rate``
messages/s in total or closed loop (``inflight`` unanswered per device), and measures the time
after ``warmup``; ``offline-drain`` stores ``messages`` for registered but offline partners, then
lets them connect and take their backlog. After either, every recipient still owed a message is
drained, and ``account`` classifies every message sent.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from interlink.core.errors import ConfigError
from interlink.core.protocol.stanza import encode_stanza
from interlink.load.accounting import ACKED, REFUSED, Msg, Run, account, record_latency
from interlink.load.e2ee import DeviceCrypto, E2EEStats, e2ee_report
from interlink.load.peer import LeanPeer
from interlink.load.progress import Ticker
from interlink.load.report import gateway_info, report_head, report_tail
from interlink.load.runner import (
    CONNECT_TIMEOUT_S,
    DRAIN_TIMEOUT_S,
    TAIL_TIMEOUT_S,
    close_all,
    connect_all,
    drain_owed,
    pin_cpus,
    predrain,
    refuse_remote_kill,
    restart_gateway,
    sending_window,
    server_window,
    wait_until,
)
from interlink.load.scenario import Scenario
from interlink.load.schedule import TIME_BYTES, start_open_loop
from interlink.load.target import RemoteGateway, open_gateway

__all__ = ["Beside", "Device", "accounting_drain", "chat_window", "drive_devices", "make_devices", "run_chat"]


class Beside(Protocol):
    """Work that runs beside the chat's sending window (the media kind's blob traffic) and is
    measured over the same window: ``read()`` its counters at the window's two snapshots (the end
    of the warm-up and the end), and ``window_ended(increases, seconds)``, right after the window
    and before the chat's tail, with how much each counter grew in it: stop there."""

    def read(self) -> tuple: ...

    def window_ended(self, increases: list, seconds: float) -> None: ...


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
        self.e2ee: DeviceCrypto | None = None  # set by make_devices when the scenario has e2ee on
        self._requests: dict[int, asyncio.Future] = {}  # iq id -> its answer (res or err)
        self._request_id = 0

    @property
    def connected(self) -> bool:
        return self.peer is not None and not self.peer.closed

    async def connect(self, gateway, token: str) -> None:
        self.session_deliveries = 0
        self.peer = await LeanPeer.connect(
            gateway.host, gateway.client_port, ws_path=gateway.ws_path, token=token, device=self.number, root_public=gateway.root_public,
            server_static=gateway.static_public, on_stanza=self.on_stanza, on_batch_end=self.on_batch_end,
            timeout_s=CONNECT_TIMEOUT_S,
        )
        if self.peer.user != self.user:
            raise ConfigError(f"the gateway calls {self.user} {self.peer.user}")
        self.session_pending = self.peer.welcome.get("pending", 0)
        self.unanswered = {}
        if self.e2ee is not None and not self.e2ee.published:  # keys stay published across sessions
            await self.e2ee.publish(self)

    async def request(self, op: str, *, timeout_s: float = 10.0, **fields: Any) -> dict:
        """Send an ``iq`` on the current session; its answer (``res`` or ``err``) as it came."""
        self._request_id += 1
        request_id = self._request_id
        future = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        try:
            self.peer.queue(encode_stanza({"t": "iq", "id": request_id, "op": op, **fields}))
            async with asyncio.timeout(timeout_s):
                return await future
        finally:
            self._requests.pop(request_id, None)

    async def _set_up_sessions(self) -> None:
        """E2EE: get the partner's bundles (at the first send, as a client does), then send what
        came due meanwhile, in order, with the intended send times it had."""
        crypto = self.e2ee
        try:
            await crypto.fetch_bundles(self, self.to_user, self.to_devices)
        except ConfigError as exc:
            crypto.stats.note_failure("setup_failures", f"{self.user}/{self.number}: {exc}")
            crypto.waiting.clear()
            return
        waiting, crypto.waiting = crypto.waiting, []
        for intended_ns in waiting:
            if self.connected:  # as the open loop does: a device without a session skips its due messages
                self._transmit(intended_ns)

    async def close(self) -> None:
        crypto = self.e2ee
        if crypto is not None and crypto.setup_task is not None and not crypto.setup_task.done():
            crypto.setup_task.cancel()
            crypto.stats.note_failure("setup_failures", f"{self.user}/{self.number}: closed before its partner's keys came")
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
        if not self.run.take_budget():
            return
        crypto = self.e2ee
        if crypto is not None and not crypto.ready:
            if crypto.setup_task is None:
                crypto.setup_task = asyncio.get_running_loop().create_task(self._set_up_sessions())
            if not crypto.setup_task.done():  # done and not ready: the setup failed (counted), send nothing
                crypto.waiting.append(intended_ns)
            return
        self._transmit(intended_ns)

    def _transmit(self, intended_ns: int) -> None:
        run = self.run
        self._count += 1
        msg_id = self._prefix + self._count.to_bytes(8, "big")
        crypto = self.e2ee
        if crypto is None:
            ciphertext = intended_ns.to_bytes(TIME_BYTES, "little") + self._filler
            ciphertexts = {device: ciphertext for device in self.to_devices}
        else:
            ciphertexts = crypto.encrypt(self.to_user, self.to_devices, crypto.plaintext(intended_ns, msg_id))
            if ciphertexts is None:
                return  # counted in the E2EE failures (they fail the run); never sent, so not in the ledger
        msg = Msg(self.peer, self.to_user, self.to_devices, intended_ns)
        run.ledger[(self.user, msg_id)] = msg
        self.unanswered[msg_id] = msg
        run.sent += 1
        self.peer.queue(encode_stanza({"t": "msg", "id": msg_id, "to": self.to_user, "c": ciphertexts}))

    def fill(self) -> None:
        """Closed loop: top up to ``inflight`` unanswered messages (E2EE: waiting ones count)."""
        now_ns = time.perf_counter_ns()
        waiting = len(self.e2ee.waiting) if self.e2ee is not None else 0
        for _ in range(self.run.scenario.inflight - len(self.unanswered) - waiting):
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
                record_latency(run.ack_hist, now_ns - msg.intended_ns)
            if run.sending and not run.scenario.open_loop:
                self.send(now_ns)
        elif kind in ("res", "err") and stanza.get("id") in self._requests:
            future = self._requests[stanza["id"]]
            if not future.done():
                future.set_result(stanza)
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
        intended_ns = None
        if self.e2ee is not None:  # decrypted only once per device: repeats were dropped above, as E2EEClient does
            intended_ns = self.e2ee.decrypt(stanza.get("from"), stanza.get("dev"), stanza.get("c") or b"", stanza.get("id"))
            if intended_ns is None:
                return  # counted in the E2EE failures (they fail the run); not delivered to this device
        msg.delivered[self.number] = seq
        run.device_deliveries += 1
        if run.accounting:
            msg.drained.add(self.number)
        elif len(msg.delivered) == len(msg.to_devices):
            run.delivered += 1
            if run.record_delivery and msg.intended_ns >= run.record_from_ns:
                if intended_ns is None:  # E2EE off: the ciphertext starts with it
                    intended_ns = int.from_bytes((stanza.get("c") or b"")[:TIME_BYTES], "little")
                record_latency(run.delivery_hist, time.perf_counter_ns() - intended_ns)

    def on_batch_end(self, peer: LeanPeer) -> None:
        if self._seqs:
            peer.queue(encode_stanza({"t": "recv", "seq": self._seqs}))
            self._seqs = []


def make_devices(run: Run, gateway) -> list[Device]:
    """The devices of the chat kinds; with ``e2ee`` each gets its own ``DeviceState`` (and the
    run an ``E2EEStats``, ``run.e2ee_stats``, None when off)."""
    scenario = run.scenario
    people = gateway.addresses(scenario.users)
    run.e2ee_stats = E2EEStats() if scenario.e2ee else None
    devices = []
    for index, (localpart, provider_id) in enumerate(people):
        partner = people[index ^ 1]
        for number in range(1, scenario.devices + 1):
            device = Device(run, localpart, provider_id, number, partner)
            if run.e2ee_stats is not None:
                device.e2ee = DeviceCrypto(run.e2ee_stats, device.user, number, scenario.payload, scenario.devices)
            devices.append(device)
    return devices


async def chat_window(run: Run, gateway, devices: list[Device], ticker: Ticker,
                      out: Callable[[str], None] | None, kill_at_s: float | None, beside: Beside | None = None) -> dict:
    """The chat kind's phases: connect, send for ``duration`` (measured after ``warmup``), the
    tail. ``beside``: work measured over the same window, stopped before the tail."""
    scenario = run.scenario
    await connect_all(gateway, devices)
    started_ns = time.perf_counter_ns()
    run.record_from_ns = started_ns + int(scenario.warmup * 1e9)
    run.sending = True
    ticker.phase = "chat"
    ticker.start()
    read_beside = beside.read if beside is not None else tuple
    window, end, _ = await sending_window(
        run, gateway, devices, lambda: (run.sent, run.acked, run.delivered, run.device_deliveries, *read_beside()),
        kill_at_s, lambda elapsed: restart_gateway(gateway, devices, out, elapsed))
    seconds = end[2] - window[2]
    counts = [b - a for a, b in zip(window[0], end[0])]
    if beside is not None:
        beside.window_ended(counts[4:], seconds)
        counts = counts[:4]
    server = server_window(gateway, window[1], end[1], seconds, counts[3], "delivery")
    server["cpu_us_per_message"] = round(server["cpu_s"] / counts[2] * 1e6, 1) if counts[2] and server["cpu_s"] is not None else None
    # The tail: answers and deliveries still on their way.
    ticker.phase = "tail"
    await wait_until(lambda: not any(d.unanswered for d in devices if d.connected) and all_delivered(run), TAIL_TIMEOUT_S)
    await ticker.stop()
    await close_all(devices)
    return {
        "window_s": round(seconds, 3),
        "throughput_per_s": {
            name: round(count / seconds, 1) if seconds else None
            for name, count in zip(("sent", "acked", "delivered", "device_deliveries"), counts)
        },
        "window_counts": dict(zip(("sent", "acked", "delivered", "device_deliveries"), counts)),
        "server": server,
    }


def all_delivered(run: Run) -> bool:
    """Every acked message reached every recipient device (the cheap counter check first)."""
    if run.delivered < run.acked:
        return False
    return all(len(msg.delivered) == len(msg.to_devices) for msg in run.ledger.values() if msg.state == ACKED)


async def _run_offline(run: Run, gateway, devices: list[Device], ticker: Ticker,
                       out: Callable[[str], None] | None, kill_at_s: float | None) -> dict:
    scenario = run.scenario
    senders = [d for d in devices if int(d.localpart[1:]) % 2 == 0]  # u0 -> u1, u2 -> u3, ...
    recipients = [d for d in devices if d not in senders]
    # Register the recipients' devices (a message needs one ciphertext per registered device), offline.
    await connect_all(gateway, recipients)
    await close_all(recipients)
    await connect_all(gateway, senders)
    run.record_from_ns = 0
    run.record_delivery = False  # a stored message's age at the drain is not a latency
    run.budget = scenario.messages
    run.sending = True
    ticker.phase = "store"
    ticker.start()
    before, started = gateway.cpu_s(), time.monotonic()
    stop_open_loop = start_open_loop(senders, scenario.rate) if scenario.open_loop else None
    if stop_open_loop is None:
        for device in senders:
            device.fill()
    killed = kill_at_s is None
    while run.budget > 0 and (elapsed := time.monotonic() - started) < scenario.duration:
        if not killed and elapsed >= kill_at_s:
            killed = True
            await restart_gateway(gateway, senders, out, elapsed)
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
    await wait_until(lambda: not any(d.unanswered for d in senders if d.connected), TAIL_TIMEOUT_S)
    if stop_open_loop is not None:
        stop_open_loop()
    run.sending = False
    run.budget = 0
    store_after, store_s = gateway.cpu_s(), time.monotonic() - started
    stored = run.acked
    store = server_window(gateway, before, store_after, store_s, stored, "stored_message")
    store.update(seconds=round(store_s, 3), stored=stored, stored_per_s=round(stored / store_s, 1) if store_s else None)
    await close_all(senders)
    # The drain: the recipients connect and take their backlog.
    ticker.phase = "drain"
    before, started = gateway.cpu_s(), time.monotonic()
    delivered_before = run.delivered
    await connect_all(gateway, recipients)
    pending = sum(d.session_pending for d in recipients)
    await wait_until(lambda: all_delivered(run), DRAIN_TIMEOUT_S)
    drain_after, drain_s = gateway.cpu_s(), time.monotonic() - started
    drained = run.delivered - delivered_before
    drain = server_window(gateway, before, drain_after, drain_s, drained, "drained_message")
    drain.update(seconds=round(drain_s, 3), pending_at_welcome=pending, drained=drained,
                 drained_per_s=round(drained / drain_s, 1) if drain_s else None)
    await ticker.stop()
    await close_all(recipients)
    return {
        "window_s": round(store_s + drain_s, 3),
        "throughput_per_s": {"stored": store["stored_per_s"], "drained": drain["drained_per_s"]},
        "window_counts": {"sent": run.sent, "acked": run.acked, "delivered": run.delivered},
        "server": {"store": store, "drain": drain},
    }


async def accounting_drain(run: Run, gateway, devices: list[Device]) -> dict:
    """Reconnect every recipient device that may still hold a message of this run in its mailbox
    and drain it: deliveries now count as ``in_mailbox``."""
    owed_users = {
        msg.to_user for msg in run.ledger.values()
        if msg.state != REFUSED and len(msg.delivered) < len(msg.to_devices)
    }
    owed = [d for d in devices if d.user in owed_users]
    return await drain_owed(run, gateway, owed)


async def drive_devices(run: Run, gateway, devices: list[Device], ticker: Ticker,
                        phases: Callable[[], Awaitable[dict]]) -> tuple[dict, dict]:
    """What a run of chat devices does around its own phases: take what earlier runs left in a
    remote gateway's mailboxes, run ``phases`` (the ticker stops however they end), then drain
    what the recipients are still owed. Returns (the phases' figures, the accounting drain)."""
    if gateway.remote:
        await predrain(run, gateway, devices)
    try:
        figures = await phases()
    finally:
        await ticker.stop()
    drain = await accounting_drain(run, gateway, devices)
    for device in devices:
        device.note_ended()
    return figures, drain


async def run_chat(scenario: Scenario, *, data_dir: Path | None = None, out: Callable[[str], None] | None = print,
                   kill_at_s: float | None = None, pin: bool = False, target: RemoteGateway | None = None) -> dict:
    """Run a ``chat`` or ``offline-drain`` scenario against a local gateway (or ``target``, a remote
    one); the report (a JSON-ready dict, ``ok`` False when any message is unexplained)."""
    scenario.validate()
    refuse_remote_kill(target, kill_at_s)
    run = Run(scenario)
    gateway_cpu = pin_cpus(pin, target)
    async with open_gateway(scenario, data_dir=data_dir, target=target, cpu=gateway_cpu) as gateway:
        devices = make_devices(run, gateway)
        ticker = Ticker(run, out)
        runner = chat_window if scenario.kind == "chat" else _run_offline
        phases, drain = await drive_devices(run, gateway, devices, ticker,
                                            lambda: runner(run, gateway, devices, ticker, out, kill_at_s))
        where = gateway_info(gateway, scenario, kill_at_s, gateway_cpu, run)
    accounting = account(run)
    accounting["accounting_drain"] = drain
    report = {
        **report_head(scenario, where),
        **phases,
        "counts": {"sent": run.sent, "acked": run.acked, "refused": run.refused, "delivered": run.delivered,
                   "device_deliveries": run.device_deliveries},
        **report_tail(run, accounting, ticker),
        "e2ee": e2ee_report(run.e2ee_stats, run.sent),
    }
    report["ok"] = report["ok"] and report["e2ee"].get("failures", 0) == 0  # a decryption failure fails the run
    return report
