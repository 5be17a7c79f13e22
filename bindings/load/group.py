"""The group kind of ``interlink load`` (``group-fanout``): one group's fan-out.

``members`` users (``devices`` each, providers alternating) join one group made by ``group.new``;
the first ``senders`` post ``{id, g, b}`` (open or closed loop) while ``offline`` of the other
members stay offline. Throughput counts durable deliveries (stored copies) and pushed ones; the
accounting classifies every (message, member device) copy, the offline devices' after they
drain. ``--kill-at`` restarts the gateway mid-fan-out and reads the group back; with ``e2ee``
each message is one sender-key envelope, the sender keys handed over before the window.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from interlink.core.errors import ConfigError
from interlink.core.protocol.stanza import encode_stanza
from interlink.load.accounting import (
    ACKED,
    REFUSED,
    SENT,
    DistributionMsg,
    GroupMsg,
    Run,
    account_group,
    distribution_accounting,
    record_latency,
)
from interlink.load.chat import Device
from interlink.load.e2ee import E2EEStats, GroupCrypto, e2ee_report, pick_verifying
from interlink.load.progress import Ticker
from interlink.load.report import gateway_info, report_head, report_tail
from interlink.load.runner import (
    CONNECT_CONCURRENCY,
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
from interlink.load.schedule import TIME_BYTES
from interlink.load.target import RemoteGateway, open_gateway

__all__ = ["GroupDevice", "run_group"]


class GroupDevice(Device):
    """One member device: posts group messages (if a sender), takes copies and events."""

    e2ee: GroupCrypto | None

    def __init__(self, run: Run, localpart: str, provider_id: str, number: int, index: int) -> None:
        super().__init__(run, localpart, provider_id, number, (localpart, provider_id))
        self.index = index  # bit of this device in GroupMsg.expected
        self.sessions = 0
        self.events = 0  # k "group" deliveries (the "created" event)
        self._iq: dict[int, asyncio.Future] = {}
        self._request_id = 1 << 20  # Device.request's ids (keys.put/get) never meet iq()'s (1, 101, ...)
        self.distributions_unanswered: dict[bytes, DistributionMsg] = {}

    async def connect(self, gateway, token: str) -> None:
        # Counted before the handshake: the stored items are pushed right after welcome and may be
        # taken before this coroutine resumes (a failed attempt only skips a number).
        self.sessions += 1
        await super().connect(gateway, token)

    async def iq(self, iq_id: int, op: str, timeout_s: float = 30.0, **fields: Any) -> dict:
        future = asyncio.get_running_loop().create_future()
        self._iq[iq_id] = future
        self.peer.queue(encode_stanza({"t": "iq", "id": iq_id, "op": op, **fields}))
        async with asyncio.timeout(timeout_s):
            return await future

    def send(self, intended_ns: int) -> None:
        run = self.run
        if not run.take_budget():
            return
        self._count += 1
        msg_id = self._prefix + self._count.to_bytes(8, "big")
        if self.e2ee is not None:
            body = self.e2ee.encrypt_group(run.group_id, msg_id, intended_ns)
            if body is None:
                return  # counted in the E2EE failures (they fail the run); never sent, so not in the ledger
        else:
            body = intended_ns.to_bytes(TIME_BYTES, "little") + self._filler
        msg = GroupMsg(self.peer, intended_ns, run.group_expected & ~(1 << self.index))
        run.ledger[(self.user, msg_id)] = msg
        self.unanswered[msg_id] = msg
        run.sent += 1
        self.peer.queue(encode_stanza({"t": "msg", "id": msg_id, "g": run.group_id, "b": body}))

    def on_stanza(self, stanza: dict) -> None:
        kind = stanza.get("t")
        if kind in ("res", "err") and "id" in stanza and "ref" not in stanza and stanza["id"] in self._iq:
            future = self._iq.pop(stanza["id"])
            if not future.done():
                future.set_result(stanza)
            return
        if kind in ("ack", "err") and self.distributions_unanswered:  # E2EE: a sender key distribution's answer
            distribution = self.distributions_unanswered.pop(stanza.get("id" if kind == "ack" else "ref"), None)
            if distribution is not None:
                distribution.state = ACKED if kind == "ack" else REFUSED
                if kind == "err":
                    distribution.code = str(stanza.get("code"))
                    self.run.errors[distribution.code] += 1
                return
        super().on_stanza(stanza)

    def _on_distribution(self, distribution: DistributionMsg, stanza: dict) -> None:
        """E2EE: a sender key for this device. A verifying device decrypts it (once: a repeat on a
        later session is dropped first, as ``E2EEClient`` does) and installs the key; the delivery
        counts whether or not it decrypts (a failure is an E2EE failure, which fails the run)."""
        run = self.run
        bit = 1 << self.index
        if stanza.get("k") != "msg" or "g" in stanza or not distribution.expected & bit:
            run.misdelivered += 1
            return
        if (distribution.delivered | distribution.drained) & bit:
            distribution.repeats += 1
            return
        if self.e2ee.verifying:
            self.e2ee.accept_distribution(stanza.get("from"), stanza.get("dev"), run.group_id, stanza.get("c") or b"")
        if run.accounting:
            distribution.drained |= bit
        else:
            distribution.delivered |= bit

    def _on_delivery(self, stanza: dict) -> None:
        run = self.run
        if stanza.get("k") == "group":
            self.events += 1
            return
        if self.e2ee is not None and (distribution := run.distributions.get((stanza.get("from"), stanza.get("id")))):
            self._on_distribution(distribution, stanza)
            return
        msg = run.ledger.get((stanza.get("from"), stanza.get("id")))
        if msg is None and run.predrain:
            run.stale += 1
            return
        bit = 1 << self.index
        if msg is None or stanza.get("k") != "msg" or stanza.get("g") != run.group_id or not msg.expected & bit:
            run.misdelivered += 1
            return
        seq = stanza.get("seq")
        first = msg.firsts.get(self.index)
        if first is not None:
            # The gateway pushes a stored item again on every new session, with its seq (at least
            # once): the same seq in a later session is a redelivery. Another seq is a second
            # stored copy, and the same one twice in one session a push the gateway never makes.
            if first[0] == seq and first[1] < self.sessions:
                run.redelivered += 1
            else:
                run.duplicates += 1
            return
        msg.firsts[self.index] = (seq, self.sessions)
        run.device_deliveries += 1
        body = stanza.get("c") or b""
        if self.e2ee is not None:  # the copy counts as delivered either way; a failure (counted) fails the run
            intended_ns = self.e2ee.open_copy(stanza.get("from"), stanza.get("dev"), run.group_id, body, stanza.get("id"))
        else:
            intended_ns = int.from_bytes(body[:TIME_BYTES], "little")
        if run.accounting:
            msg.drained |= bit
            return
        msg.delivered |= bit
        run.delivered += 1  # for the per-second line: copies delivered during the run
        if run.record_delivery and msg.intended_ns >= run.record_from_ns and intended_ns is not None:
            record_latency(run.delivery_hist, time.perf_counter_ns() - intended_ns)


def _group_all_delivered(run: Run, online_bits: int) -> bool:
    """Every acked message reached every online member device it names."""
    return all(
        (msg.expected & online_bits) & ~msg.delivered == 0 for msg in run.ledger.values() if msg.state == ACKED
    )



async def run_group(scenario: Scenario, *, data_dir: Path | None = None, out: Callable[[str], None] | None = print,
                    pin: bool = False, target: RemoteGateway | None = None, kill_at_s: float | None = None) -> dict:
    """One group of ``members`` users (``devices`` each, providers alternating), ``offline`` of the
    non-senders registered then offline; ``group.new`` by member 0; ``senders`` members post
    ``{id, g, b}`` for ``duration`` seconds (open loop at ``rate`` in total, or closed loop with
    ``inflight`` each); then the offline devices connect and drain, and every copy is classified.

    ``kill_at_s``: SIGKILL the local gateway that far into the sending, restart it on the same
    data and port, reconnect the online devices (senders included), check that the group (made
    before) is still there with every member (``group.restart``; a missing member fails the run)
    and go on sending."""
    scenario.validate()
    refuse_remote_kill(target, kill_at_s)
    run = Run(scenario)
    gateway_cpu = pin_cpus(pin, target)
    async with open_gateway(scenario, data_dir=data_dir, target=target, cpu=gateway_cpu) as gateway:
        people = gateway.addresses(scenario.members)
        devices = [
            GroupDevice(run, localpart, provider_id, number, index * scenario.devices + number - 1)
            for index, (localpart, provider_id) in enumerate(people)
            for number in range(1, scenario.devices + 1)
        ]
        run.group_expected = (1 << len(devices)) - 1
        by_user: dict[str, list[GroupDevice]] = collections.defaultdict(list)
        for device in devices:
            by_user[device.user].append(device)
        users = list(by_user)
        senders = [by_user[user][0] for user in users[: scenario.senders]]
        offline_count = round(scenario.offline * (len(users) - scenario.senders))
        offline_users = set(users[len(users) - offline_count:]) if offline_count else set()
        offline = [d for d in devices if d.user in offline_users]
        online = [d for d in devices if d.user not in offline_users]
        online_bits = sum(1 << d.index for d in online)
        run.e2ee_stats, run.distributions, verifying = _group_crypto(run, devices, senders, online, offline)
        ticker = Ticker(run, out)
        # Every member connects once (group.new wants users who connected at least once), the
        # offline ones leave; member 0 makes the group; the online devices take the event.
        if gateway.remote:
            await predrain(run, gateway, devices)
            for device in devices:
                device.events = device.sessions = 0
        await connect_all(gateway, devices)
        await close_all(offline)
        creator = devices[0]
        answer = await creator.iq(1, "group.new", members=[user for user in users if user != creator.user])
        if answer.get("t") != "res":
            raise ConfigError(f"group.new of {len(users)} members was refused: {answer}")
        run.group_id = answer["g"]
        if not await wait_until(lambda: all(d.events >= 1 for d in online if d is not creator), DRAIN_TIMEOUT_S):
            raise ConfigError("the online members did not all get the group's created event")
        distribution_s = None
        if scenario.e2ee:
            ticker.phase = "keys"
            setup_started = time.monotonic()
            await _distribute_sender_keys(run, senders, by_user, online_bits, out)
            distribution_s = round(time.monotonic() - setup_started, 3)
        run.record_from_ns = time.perf_counter_ns() + int(scenario.warmup * 1e9)
        run.sending = True
        ticker.phase = "group"
        ticker.start()
        window, end, restart = await sending_window(
            run, gateway, senders, lambda: (run.sent, run.acked, run.device_deliveries), kill_at_s,
            lambda elapsed: _restart_group(run, gateway, online, creator, users, out, elapsed))
        seconds = end[2] - window[2]
        sent, acked, pushed = (b - a for a, b in zip(window[0], end[0]))
        copies_per_message = len(devices) - 1
        stored = acked * copies_per_message  # durable deliveries: one stored copy per member device
        server = server_window(gateway, window[1], end[1], seconds, stored, "durable_delivery")
        server["cpu_us_per_pushed_delivery"] = (
            round(server["cpu_s"] / pushed * 1e6, 1) if pushed and server["cpu_s"] is not None else None)
        ticker.phase = "tail"
        await wait_until(
            lambda: not any(d.unanswered for d in senders if d.connected) and _group_all_delivered(run, online_bits),
            TAIL_TIMEOUT_S,
        )
        await ticker.stop()
        await close_all(online)
        drain = await _group_accounting_drain(run, gateway, devices)
        for device in devices:
            device.note_ended()
        where = gateway_info(gateway, scenario, kill_at_s, gateway_cpu, run)
    accounting = account_group(run)
    accounting["accounting_drain"] = drain
    if restart is not None:
        restart["acked_after"] = run.acked - restart["acked_before"]
    tail = report_tail(run, accounting, ticker)
    tail["ok"] = tail["ok"] and (restart is None or restart["group_intact"])  # the membership must survive
    e2ee = e2ee_report(run.e2ee_stats, run.sent, None if run.e2ee_stats is None else {
        "verify_fraction": scenario.e2ee_verify, "verifying_devices": len(verifying), "devices": len(devices),
        "identified_by": "verifying devices: the decrypted plaintext; the others: the envelope header (sender key "
                         "id, iteration; not verified) looked up in the senders' table",
        "distribution": distribution_accounting(run), "distribution_s": distribution_s,
    })
    if run.e2ee_stats is not None:  # a decryption failure, or a sender key that never arrived, fails the run
        tail["ok"] = tail["ok"] and e2ee["failures"] == 0 and e2ee["distribution"]["missing"] == 0
    return {
        **report_head(scenario, where),
        "group": {"members": len(users), "devices": len(devices), "offline_members": len(offline_users),
                  "offline_devices": len(offline), "senders": len(senders), "copies_per_message": copies_per_message,
                  "restart": restart},
        "window_s": round(seconds, 3),
        "throughput_per_s": {
            "sent": round(sent / seconds, 1) if seconds else None,
            "acked": round(acked / seconds, 1) if seconds else None,
            "durable_deliveries": round(stored / seconds, 1) if seconds else None,
            "pushed_deliveries": round(pushed / seconds, 1) if seconds else None,
        },
        "window_counts": {"sent": sent, "acked": acked, "durable_deliveries": stored, "pushed_deliveries": pushed},
        "server": server,
        "counts": {"sent": run.sent, "acked": run.acked, "refused": run.refused, "copies_delivered": run.delivered,
                   "device_deliveries": run.device_deliveries},
        **tail,
        "e2ee": e2ee,
    }


KEYS_GET_BURST = 60  # the gateway's keys.get allowance per user at once (core.ops.KEYS_GET_RATE), then one a second


def _group_crypto(run: Run, devices: list[GroupDevice], senders: list[GroupDevice], online: list[GroupDevice],
                  offline: list[GroupDevice]) -> tuple[E2EEStats | None, dict, list[GroupDevice]]:
    """E2EE (group kind): a ``GroupCrypto`` per device; the verifying ones (``e2ee_verify`` of
    the devices, at least one) are taken evenly from the online receivers first, then the offline
    ones (they verify in the accounting drain), then the sending devices (they get the others'
    messages only)."""
    scenario = run.scenario
    if not scenario.e2ee:
        return None, {}, []
    stats = E2EEStats()
    sent: dict[tuple, tuple[bytes, int]] = {}  # (sender, device, kid, n) -> (message id, intended send time)
    candidates = [d for d in online if d not in senders] + offline + senders
    verifying = pick_verifying(candidates, scenario.e2ee_verify)
    chosen = {id(d) for d in verifying}
    for device in devices:
        device.e2ee = GroupCrypto(stats, device.user, device.number, scenario.payload, len(senders),
                                  verifying=id(device) in chosen, sent=sent)
    return stats, {}, verifying


async def _distribute_sender_keys(run: Run, senders: list[GroupDevice], by_user: dict[str, list[GroupDevice]],
                                  online_bits: int, out: Callable[[str], None] | None) -> None:
    """E2EE, before the window: each sending device fetches the bundles of every other member
    device (``keys.get``), starts a session with each and sends its sender key as 1:1 messages, one
    per member (its own other devices in the ``own`` of the first); then waits until every
    distribution is answered and every online device has its envelopes. A failure is an E2EE
    setup failure (it fails the run).

    The gateway limits ``keys.get`` per user (``core.ops.KEYS_GET_RATE``: 60 at once, then one a
    second), as a real client meets it: beyond 60 members a sender needs about a second per
    further member here."""
    stats = run.e2ee_stats
    if out is not None:
        slow = len(by_user) - 1 - KEYS_GET_BURST
        out(f"--- e2ee: {len(senders)} sender(s) fetch {len(by_user) - 1} members' keys and distribute their sender keys"
            + (f" (keys.get is rate limited per user: ≈ {slow} s more)" if slow > 0 else ""))

    async def distribute(sender: GroupDevice) -> None:
        crypto = sender.e2ee
        targets = {user: tuple(d.number for d in its if d is not sender) for user, its in by_user.items()}
        own = targets.pop(sender.user, ())
        limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def fetch(user: str, numbers: tuple[int, ...]) -> None:
            async with limit:
                await crypto.fetch_member_bundles(sender, user, numbers)

        await asyncio.gather(*(fetch(user, numbers) for user, numbers in [*targets.items(), (sender.user, own)] if numbers))
        for position, (user, numbers) in enumerate(targets.items()):
            envelopes = crypto.distribution(run.group_id, user, numbers)
            stanza = {"t": "msg", "to": user, "c": envelopes}
            expected = sum(1 << d.index for d in by_user[user])
            if position == 0 and own:
                stanza["own"] = crypto.distribution(run.group_id, sender.user, own)
                expected |= sum(1 << d.index for d in by_user[sender.user] if d is not sender)
            if envelopes is None or stanza.get("own", {}) is None:
                continue  # counted in the E2EE failures
            sender._count += 1
            stanza["id"] = msg_id = sender._prefix + sender._count.to_bytes(8, "big")
            distribution = DistributionMsg(sender.peer, expected)
            run.distributions[(sender.user, msg_id)] = distribution
            sender.distributions_unanswered[msg_id] = distribution
            sender.peer.queue(encode_stanza(stanza))

    outcomes = await asyncio.gather(*(distribute(sender) for sender in senders), return_exceptions=True)
    for sender, outcome in zip(senders, outcomes):
        if isinstance(outcome, (ConfigError, TimeoutError)):
            stats.note_failure("setup_failures", f"{sender.user}/{sender.number}: {outcome}")
        elif isinstance(outcome, BaseException):
            raise outcome

    def arrived() -> bool:
        return all(d.state != SENT and (d.state == REFUSED or (d.expected & online_bits) & ~d.delivered == 0)
                   for d in run.distributions.values())

    if not await wait_until(arrived, DRAIN_TIMEOUT_S):
        stats.note_failure("setup_failures", f"sender key distributions not all answered and delivered within {DRAIN_TIMEOUT_S:.0f} s")
    refused = collections.Counter(d.code for d in run.distributions.values() if d.state == REFUSED)
    if refused:
        stats.note_failure("setup_failures", f"sender key distributions refused: {dict(refused)}")


async def _restart_group(run: Run, gateway, online: list[GroupDevice], creator: GroupDevice,
                         members: list[str], out: Callable[[str], None] | None, at_s: float) -> dict:
    """The group kind's ``--kill-at``: SIGKILL and restart the gateway mid-fan-out (``_restart``:
    the online devices, senders included, reconnect), then read the group back (``group.get``,
    paged) to check that the membership made before the window survived. The counters at the kill
    are kept so that the report shows the traffic after the restart; the window's throughput and
    server figures include the outage."""
    restart = {"at_s": round(at_s, 2), "sent_before": run.sent, "acked_before": run.acked}
    killed = time.monotonic()
    await restart_gateway(gateway, online, out, at_s)
    restart["outage_s"] = round(time.monotonic() - killed, 2)  # until every online device was back
    found: list[str] = []
    version, request_id = None, 100  # iq ids of their own (group.new used 1)
    while True:
        request_id += 1
        answer = await creator.iq(request_id, "group.get", g=run.group_id, skip=len(found))
        if answer.get("t") != "res":
            if out is not None:
                out(f"--- the group is gone after the restart: {answer}")
            restart.update(group_members=len(found), group_version=version, group_intact=False)
            return restart
        page = answer.get("members") or []
        found.extend(page)
        version = answer.get("ver")
        if not answer.get("more") or not page:  # an empty page that says "more" would loop forever
            break
    intact = sorted(found) == sorted(members)
    restart.update(group_members=len(found), group_version=version, group_intact=intact)
    if out is not None:
        out(f"--- group read back after the restart: {len(found)} of {len(members)} members (ver {version})"
            + ("" if intact else ": NOT the members it was made with"))
    return restart


async def _group_accounting_drain(run: Run, gateway, devices: list[GroupDevice]) -> dict:
    """Connect every device still owed a copy of a message not refused (the offline members, and
    any online device that missed one) and drain it: those copies count as ``in_mailbox``."""
    owed_bits = 0
    for msg in [*run.ledger.values(), *run.distributions.values()]:  # E2EE: the sender keys too
        if msg.state != REFUSED:
            owed_bits |= msg.expected & ~msg.delivered
    owed = [d for d in devices if owed_bits >> d.index & 1]
    return await drain_owed(run, gateway, owed)
