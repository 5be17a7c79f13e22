"""E2EE for ``interlink load --e2ee``: real Signal-protocol envelopes instead of random bytes.

Chat kinds (``DeviceCrypto``): each simulated device holds an in-memory ``DeviceState`` (never
saved, so the tool measures no disk), publishes its keys with ``keys.put`` when it first
connects, fetches its partner devices' bundles (``keys.get``) at its first send and encrypts
every message once per recipient device; a receiving device drops a redelivery by (from, id)
before decrypting, as ``E2EEClient`` does. Group kind (``GroupCrypto``): each sender hands its
sender key over pairwise sessions before the window; ``pick_verifying`` devices decrypt every
copy, the others identify a copy by its envelope's unencrypted header.

A plaintext is ``PLAINTEXT_HEADER`` bytes (intended send time, then the 16-byte message id)
followed by ``PLAINTEXT_MARKER`` repeated to the scenario's ``payload``, so a test can check the
bytes on the wire or in a mailbox do not hold it. ``DeviceState`` does no I/O, so its coroutines
are driven to completion inside synchronous callbacks (``drive``); each call's thread CPU time
is counted per operation (``E2EEStats``, ``e2ee_report``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

import msgpack

from interlink.core.errors import ConfigError, InterlinkError
from interlink.load.schedule import TIME_BYTES

__all__ = ["PLAINTEXT_HEADER", "PLAINTEXT_MARKER", "DeviceCrypto", "E2EEStats", "GroupCrypto", "drive", "e2ee_report",
           "format_e2ee", "pick_verifying"]

ID_BYTES = 16
PLAINTEXT_HEADER = TIME_BYTES + ID_BYTES
PLAINTEXT_MARKER = b"interlink-load plaintext "
SETUP_TIMEOUT_S = 30.0  # how long a device keeps trying to get its partner's bundles
REQUEST_TIMEOUT_S = 10.0
FAILURE_EXAMPLES = 5


def _e2ee_module():
    try:
        from interlink import e2ee
    except ImportError as exc:
        raise ConfigError(f"--e2ee needs the e2ee extra (pip install 'interlink[e2ee]'): {exc}") from None
    return e2ee


def drive(coro):
    """Run a coroutine that completes without suspending (``DeviceState`` does no I/O; the
    benchmarks drive a token verification with a cached key the same way)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    name = getattr(coro, "__qualname__", "a coroutine")
    coro.close()
    raise InterlinkError(f"{name} suspended: it must complete without I/O here (no event loop drives it)")


class E2EEStats:
    """Counters and CPU time of the E2EE work of one run (every device adds to it)."""

    def __init__(self) -> None:
        self.cpu_ns = collections.Counter()  # operation -> thread CPU ns
        self.count = collections.Counter()  # operation -> calls
        self.decrypt_failures = 0
        self.encrypt_failures = 0
        self.setup_failures = 0
        self.plaintext_mismatches = 0  # decrypted, but the plaintext names another message
        self.header_mismatches = 0  # group, not verifying: the envelope's header names no message sent, or another
        self.failure_examples: list[str] = []
        self.process_cpu_start_s = time.process_time()

    def note_failure(self, kind: str, why: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.failure_examples) < FAILURE_EXAMPLES:
            self.failure_examples.append(f"{kind.removesuffix('s').replace('_', ' ')}: {why}")

    @property
    def failures(self) -> int:
        return (self.decrypt_failures + self.encrypt_failures + self.setup_failures + self.plaintext_mismatches
                + self.header_mismatches)

    def timed(self, operation: str, started_ns: int) -> None:
        self.cpu_ns[operation] += time.thread_time_ns() - started_ns
        self.count[operation] += 1


class DeviceCrypto:
    """The E2EE side of one simulated device: its ``DeviceState`` and its partner's bundles."""

    def __init__(self, stats: E2EEStats, user: str, device: int, payload: int, partner_devices: int) -> None:
        e2ee = _e2ee_module()
        self.E2EEError = e2ee.E2EEError
        self.stats = stats
        self.state = e2ee.DeviceState.create(user, device)
        self.partner_devices = partner_devices
        self.published = False
        self.ready = False  # sessions (or bundles to start them) with every partner device
        self.bundles: dict[int, dict] = {}
        self.waiting: list[int] = []  # intended send times of messages due before ``ready``
        self.setup_task: asyncio.Task | None = None
        filler = PLAINTEXT_MARKER * (payload // len(PLAINTEXT_MARKER) + 1)
        self._filler = filler[: payload - PLAINTEXT_HEADER]

    # -- keys and sessions (network: ``device.request`` sends an iq and awaits its answer)

    async def publish(self, device: Any) -> None:
        """``keys.put``: identity key, signed prekey, one one-time prekey per partner device (each
        partner device fetches this device's bundle once)."""
        state = self.state
        otpks = state.generate_one_time_prekeys(self.partner_devices)
        answer = await device.request("keys.put", timeout_s=REQUEST_TIMEOUT_S, ik=state.identity_key, spk=state.signed_prekey(), otpk=otpks)
        if answer.get("t") != "res":
            raise ConfigError(f"keys.put of {device.user}/{device.number} was refused: {answer.get('code')} {answer.get('msg')}")
        self.published = True

    async def fetch_bundles(self, device: Any, to_user: str, to_devices: tuple[int, ...]) -> None:
        """Bundles of the partner devices this device has no session with yet (a session may
        already exist: the partner started one and its first message arrived)."""
        await self._get_bundles(device, to_user, to_devices, self.bundles)
        self.ready = True

    async def _get_bundles(self, device: Any, user: str, devices: tuple[int, ...], into: dict[int, dict]) -> None:
        """``keys.get`` of ``user`` until ``into`` holds a bundle of each of ``devices`` without a
        session (asked again while one has not published yet, or the session died under the request;
        a ``rate_limited`` answer moves the deadline by the wait it asks for)."""
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while True:
            missing = [d for d in devices if not self.state.has_session(user, d) and d not in into]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise ConfigError(f"{user} device(s) {missing} published no keys within {SETUP_TIMEOUT_S:.0f} s")
            answer = None
            if device.connected:
                try:
                    answer = await device.request("keys.get", timeout_s=REQUEST_TIMEOUT_S, user=user, devices=missing)
                except TimeoutError:
                    answer = None  # the session died under the request (a restarting gateway): ask again
            if answer is not None and answer.get("t") == "res":
                for bundle in answer.get("bundles") or ():
                    into[bundle["device"]] = bundle
                delay_s = 0.1  # if a device is still missing: registered, but not published yet
            elif answer is not None and answer.get("code") != "rate_limited":
                raise ConfigError(f"keys.get of {user} was refused: {answer.get('code')} {answer.get('msg')}")
            else:
                delay_s = min(5.0, ((answer or {}).get("retry_after") or 100) / 1000)
                if answer is not None:  # rate limited (60 users at once, then one a second): waiting is progress
                    deadline += delay_s
            if any(d not in into for d in missing):
                await asyncio.sleep(delay_s)

    # -- messages

    def plaintext(self, intended_ns: int, msg_id: bytes) -> bytes:
        return intended_ns.to_bytes(TIME_BYTES, "little") + msg_id + self._filler

    def encrypt(self, to_user: str, to_devices: tuple[int, ...], plaintext: bytes) -> dict[int, bytes] | None:
        """One envelope per recipient device; None (counted) if any of them cannot be made."""
        stats, state = self.stats, self.state
        envelopes = {}
        for device in to_devices:
            operation = "encrypt" if state.has_session(to_user, device) else "encrypt_x3dh"
            started = time.thread_time_ns()
            try:
                envelopes[device] = drive(state.encrypt(to_user, device, plaintext, bundle=self.bundles.get(device)))
            except self.E2EEError as exc:
                stats.note_failure("encrypt_failures", f"to {to_user}/{device}: {exc}")
                return None
            finally:
                stats.cpu_ns[operation] += time.thread_time_ns() - started
                stats.count[operation] += 1
        return envelopes

    def decrypt(self, sender: str, sender_device: int, envelope: bytes, msg_id: bytes) -> int | None:
        """The intended send time from the plaintext of ``envelope``; None (counted) when it does
        not decrypt or names another message than ``msg_id``."""
        stats, state = self.stats, self.state
        known = [id(record) for record in state.sessions.get((sender, sender_device), ())]
        started = time.thread_time_ns()
        try:
            plaintext = drive(state.decrypt(sender, sender_device, envelope))
        except self.E2EEError as exc:
            stats.cpu_ns["decrypt_failed"] += time.thread_time_ns() - started
            stats.count["decrypt_failed"] += 1
            stats.note_failure("decrypt_failures", f"from {sender}/{sender_device}: {exc}")
            return None
        # a session start accepted (X3DH, passive side) puts a new session first for that device
        current = state.sessions[(sender, sender_device)][0]
        operation = "decrypt" if id(current) in known else "decrypt_x3dh"
        stats.cpu_ns[operation] += time.thread_time_ns() - started
        stats.count[operation] += 1
        if plaintext[TIME_BYTES:PLAINTEXT_HEADER] != msg_id:
            stats.note_failure("plaintext_mismatches", f"from {sender}/{sender_device}: the plaintext names another message id")
            return None
        return int.from_bytes(plaintext[:TIME_BYTES], "little")


class GroupCrypto(DeviceCrypto):
    """The E2EE side of one member device of the group kind (sender keys, docs/e2ee.md §5).

    A sending device fetches the bundles of every other member device (``keys.get``), starts a
    session with each (X3DH) and hands its sender key over it (``distribution``: one envelope per
    device, sent as 1:1 messages before the measured window); in the window each group message is
    one sender-key encryption (``encrypt_group``). A *verifying* device decrypts every distribution
    and every group copy it gets. The others read the copy's envelope header (type 3: group, sender
    key id ``kid``, chain iteration ``n``; not encrypted, but bound into the AES-GCM associated data
    and the Ed25519 signature) without checking it, and look (sender, device, kid, n) up in
    ``sent``, the table the sending devices fill as they encrypt, for the message id and the
    intended send time. The id must be the one the ``dlv`` carries."""

    def __init__(self, stats: E2EEStats, user: str, device: int, payload: int, fetchers: int, *, verifying: bool,
                 sent: dict[tuple, tuple[bytes, int]]) -> None:
        super().__init__(stats, user, device, payload, fetchers)  # one one-time prekey per sending device
        self.user, self.number = user, device
        self.verifying = verifying
        self.sent = sent
        self.member_bundles: dict[str, dict[int, dict]] = {}
        e2ee = _e2ee_module()
        self._parse_envelope, self._T_GROUP = e2ee.parse_envelope, e2ee.T_GROUP

    async def fetch_member_bundles(self, device: Any, user: str, devices: tuple[int, ...]) -> None:
        await self._get_bundles(device, user, devices, self.member_bundles.setdefault(user, {}))

    def distribution(self, group: bytes, user: str, devices: tuple[int, ...]) -> dict[int, bytes] | None:
        """This device's sender key of ``group`` (as it stands now) encrypted for each of ``user``'s
        ``devices`` over the pairwise sessions (started here with X3DH); None (counted) on failure."""
        payload = msgpack.packb(self.state.own_sender_key(group).distribution(), use_bin_type=True)
        bundles = self.member_bundles.get(user, {})
        envelopes = {}
        for number in devices:
            started = time.thread_time_ns()
            try:
                envelopes[number] = drive(self.state.encrypt(user, number, payload, bundle=bundles.get(number)))
            except self.E2EEError as exc:
                self.stats.note_failure("encrypt_failures", f"sender key to {user}/{number}: {exc}")
                return None
            finally:
                self.stats.timed("distribution_encrypt", started)
        return envelopes

    def accept_distribution(self, sender: str, sender_device: int, group: bytes, envelope: bytes) -> bool:
        """Decrypt a distribution (accepting the session X3DH started) and install the sender key."""
        started = time.thread_time_ns()
        try:
            payload = msgpack.unpackb(drive(self.state.decrypt(sender, sender_device, envelope)), raw=False)
            if type(payload) is not dict or payload.get("k") != "skey" or payload.get("g") != group:
                raise self.E2EEError("the plaintext is not a sender key of this group")
            self.state.accept_sender_key(sender, sender_device, payload)
        except (self.E2EEError, ValueError) as exc:  # msgpack's errors are ValueErrors
            self.stats.timed("distribution_decrypt_failed", started)
            self.stats.note_failure("decrypt_failures", f"sender key from {sender}/{sender_device}: {exc}")
            return False
        self.stats.timed("distribution_decrypt", started)
        return True

    def encrypt_group(self, group: bytes, msg_id: bytes, intended_ns: int) -> bytes | None:
        """The ``b`` of one group message; its (kid, n) goes into ``sent``. None (counted) on failure."""
        key = self.state.own_sender_key(group)
        key_id, iteration = key.key_id, key.iteration
        started = time.thread_time_ns()
        try:
            body = key.encrypt(self.plaintext(intended_ns, msg_id))
        except self.E2EEError as exc:
            self.stats.note_failure("encrypt_failures", f"group message of {self.user}/{self.number}: {exc}")
            return None
        finally:
            self.stats.timed("group_encrypt", started)
        self.sent[(self.user, self.number, key_id, iteration)] = (msg_id, intended_ns)
        return body

    def open_copy(self, sender: str, sender_device: int, group: bytes, body: bytes, msg_id: bytes) -> int | None:
        """The intended send time of a group copy: from its plaintext (verifying device) or from
        ``sent`` by its header; None (counted) when it does not decrypt or names another message."""
        stats = self.stats
        started = time.thread_time_ns()
        if self.verifying:
            try:
                plaintext = self.state.decrypt_group(sender, sender_device, body)
            except self.E2EEError as exc:
                stats.timed("group_decrypt_failed", started)
                stats.note_failure("decrypt_failures", f"group message from {sender}/{sender_device}: {exc}")
                return None
            stats.timed("group_decrypt", started)
            if plaintext[TIME_BYTES:PLAINTEXT_HEADER] != msg_id:
                stats.note_failure("plaintext_mismatches", f"from {sender}/{sender_device}: the plaintext names another message id")
                return None
            return int.from_bytes(plaintext[:TIME_BYTES], "little")
        entry = None
        try:
            envelope = self._parse_envelope(body)
            if envelope["t"] == self._T_GROUP and envelope["g"] == group:
                entry = self.sent.get((sender, sender_device, envelope["kid"], envelope["n"]))
        except self.E2EEError:
            entry = None
        stats.timed("group_header", started)
        if entry is None or entry[0] != msg_id:
            stats.note_failure("header_mismatches", f"from {sender}/{sender_device}: the envelope header names no such message")
            return None
        return entry[1]


def pick_verifying(candidates: list, fraction: float) -> list:
    """``fraction`` of ``candidates`` (at least one), spread evenly over the list."""
    count = max(1, min(len(candidates), round(fraction * len(candidates))))
    return [candidates[i * len(candidates) // count] for i in range(count)]


def e2ee_report(stats: E2EEStats | None, messages_sent: int, group: dict | None = None) -> dict:
    """The report's ``e2ee`` section: whether it was on and, if so, the client's E2EE cost.
    ``group`` (the group kind): the verify fraction, the verifying devices and the sender key
    distributions' fates, added with the cost of each group operation."""
    if stats is None:
        return {"on": False}

    def per_op(*operations: str) -> dict:
        count = sum(stats.count[o] for o in operations)
        cpu_ns = sum(stats.cpu_ns[o] for o in operations)
        return {"count": count, "cpu_s": round(cpu_ns / 1e9, 3), "us_per_op": round(cpu_ns / count / 1e3, 1) if count else None}

    total_ns = sum(stats.cpu_ns.values())
    process_s = time.process_time() - stats.process_cpu_start_s
    section = {
        "on": True,
        "payload_means": "plaintext bytes per message (each envelope adds the Signal header and tag)",
        "encrypt": per_op("encrypt"),
        "encrypt_session_start": per_op("encrypt_x3dh"),
        "decrypt": per_op("decrypt"),
        "decrypt_session_start": per_op("decrypt_x3dh"),
        "decrypt_failed_attempts": per_op("decrypt_failed"),
        "client_cpu_s": round(total_ns / 1e9, 3),
        "client_us_per_message": round(total_ns / messages_sent / 1e3, 1) if messages_sent else None,
        "load_process_cpu_s": round(process_s, 3),
        "share_of_load_process_cpu": round(total_ns / 1e9 / process_s, 3) if process_s > 0 else None,
        "decrypt_failures": stats.decrypt_failures,
        "encrypt_failures": stats.encrypt_failures,
        "setup_failures": stats.setup_failures,
        "plaintext_mismatches": stats.plaintext_mismatches,
        "failures": stats.failures,
        "failure_examples": list(stats.failure_examples),
    }
    if group is not None:
        for chat_only in ("encrypt", "encrypt_session_start", "decrypt", "decrypt_session_start", "decrypt_failed_attempts"):
            del section[chat_only]
        section.update(group)
        section["header_mismatches"] = stats.header_mismatches
        section["group_encrypt"] = per_op("group_encrypt")
        section["group_decrypt"] = per_op("group_decrypt")  # verifying devices: every copy they got
        section["group_header_lookup"] = per_op("group_header")  # the other devices
        section["group_decrypt_failed_attempts"] = per_op("group_decrypt_failed")
        section["distribution_encrypt"] = per_op("distribution_encrypt")  # per device envelope, X3DH included
        section["distribution_decrypt"] = per_op("distribution_decrypt")  # verifying devices, X3DH accepted
        section["distribution_decrypt_failed_attempts"] = per_op("distribution_decrypt_failed")
    return section


def format_e2ee(section: dict) -> str:
    """The report's E2EE line(s)."""
    if not section.get("on"):
        return "e2ee: off (ciphertexts are random bytes)"

    def op(name: str) -> str:
        figures = section[name]
        return f"{figures['count']} x {figures['us_per_op']} µs" if figures["count"] else "0"

    if "verify_fraction" in section:  # the group kind
        return _format_group_e2ee(section, op)
    cost = (
        f"e2ee: on (interlink.e2ee, in-memory DeviceState; payload = plaintext bytes): client CPU "
        f"{section['client_us_per_message']} µs per message ({section['share_of_load_process_cpu']} of the load "
        f"process's {section['load_process_cpu_s']} s); encrypt {op('encrypt')}, session starts {op('encrypt_session_start')}; "
        f"decrypt {op('decrypt')}, sessions accepted {op('decrypt_session_start')}"
    )
    failures = (
        f"  e2ee failures: decrypt {section['decrypt_failures']}, encrypt {section['encrypt_failures']}, "
        f"setup {section['setup_failures']}, plaintext mismatch {section['plaintext_mismatches']}"
    )
    if section["failure_examples"]:
        failures += f" — e.g. {section['failure_examples'][0]}"
    return f"{cost}\n{failures}"


def _format_group_e2ee(section: dict, op: Callable[[str], str]) -> str:
    distribution = section["distribution"]
    lines = [
        (
            f"e2ee: on, sender keys (interlink.e2ee, in-memory DeviceState; payload = plaintext bytes); verify fraction "
            f"{section['verify_fraction']}: {section['verifying_devices']} of {section['devices']} devices decrypt every copy; "
            f"message ids and send times: {section['identified_by']}"
        ),
        (
            f"  client CPU: group encrypt {op('group_encrypt')}, group decrypt {op('group_decrypt')}, header lookup "
            f"{op('group_header_lookup')}; distribution (before the window) encrypt {op('distribution_encrypt')}, decrypt "
            f"{op('distribution_decrypt')}; {section['client_cpu_s']} s in all ({section['share_of_load_process_cpu']} of the "
            f"load process's {section['load_process_cpu_s']} s)"
        ),
        (
            f"  sender key distributions (1:1, not in the group figures): {distribution['messages']} messages, "
            f"{distribution['envelopes']} device envelopes: delivered {distribution['delivered']}, in mailbox "
            f"{distribution['in_mailbox']}, missing {distribution['missing']}; {section['distribution_s']} s before the window"
        ),
        (
            f"  e2ee failures: decrypt {section['decrypt_failures']}, encrypt {section['encrypt_failures']}, setup "
            f"{section['setup_failures']}, plaintext mismatch {section['plaintext_mismatches']}, header mismatch "
            f"{section['header_mismatches']}" + (f" — e.g. {section['failure_examples'][0]}" if section["failure_examples"] else "")
        ),
    ]
    return "\n".join(lines)
