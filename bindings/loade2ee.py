"""E2EE on for ``interlink load`` (``--e2ee``, scenario key ``e2ee = true``): the chat kinds send
real Signal-protocol envelopes made with ``interlink.e2ee`` instead of random bytes.

Each simulated device holds a ``DeviceState`` in memory (never saved: ``E2EEClient`` writes its
state file with two fsyncs after every message, which would make the load tool measure its disk,
see docs/benchmarks.md). As a real client does, a device publishes its identity key, signed
prekey and one one-time prekey per partner device with ``keys.put`` when it first connects; at
its first send it fetches the bundles of its partner's devices it has no session with
(``keys.get``, which checks nothing: ``interlink.e2ee`` verifies the signed prekey), starts
sessions with X3DH and encrypts every message once per recipient device (Double Ratchet). The
receiving device drops a redelivery by (from, id) before decrypting, as ``E2EEClient`` does,
decrypts, and takes the intended send time and the message id from the plaintext.

The plaintext is ``PLAINTEXT_HEADER`` bytes (intended send time, perf_counter_ns little-endian,
then the 16-byte message id) followed by ``PLAINTEXT_MARKER`` repeated up to the scenario's
``payload`` bytes, so a test can check the bytes on the wire or in a mailbox do not hold it.

The coroutines of ``DeviceState`` never suspend (no I/O), so they are driven to completion inside
the tool's synchronous callbacks (``drive``), as ``bench/bench_e2ee.py`` does; the CPU time of
each call is measured with the thread CPU clock and reported per operation (``E2EEStats``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from interlink.core.errors import ConfigError, InterlinkError

__all__ = ["PLAINTEXT_HEADER", "PLAINTEXT_MARKER", "DeviceCrypto", "E2EEStats", "drive", "e2ee_report", "format_e2ee"]

TIME_BYTES = 8
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
        self.failure_examples: list[str] = []
        self.process_cpu_start_s = time.process_time()

    def note_failure(self, kind: str, why: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.failure_examples) < FAILURE_EXAMPLES:
            self.failure_examples.append(f"{kind.removesuffix('s').replace('_', ' ')}: {why}")

    @property
    def failures(self) -> int:
        return self.decrypt_failures + self.encrypt_failures + self.setup_failures + self.plaintext_mismatches


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
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while True:
            missing = [d for d in to_devices if not self.state.has_session(to_user, d) and d not in self.bundles]
            if not missing:
                self.ready = True
                return
            if time.monotonic() > deadline:
                raise ConfigError(f"{to_user} device(s) {missing} published no keys within {SETUP_TIMEOUT_S:.0f} s")
            answer = None
            if device.connected:
                try:
                    answer = await device.request("keys.get", timeout_s=REQUEST_TIMEOUT_S, user=to_user, devices=missing)
                except TimeoutError:
                    answer = None  # the session died under the request (a restarting gateway): ask again
            if answer is not None and answer.get("t") == "res":
                for bundle in answer.get("bundles") or ():
                    self.bundles[bundle["device"]] = bundle
                delay_s = 0.1  # if a device is still missing: registered, but not published yet
            elif answer is not None and answer.get("code") != "rate_limited":
                raise ConfigError(f"keys.get of {to_user} was refused: {answer.get('code')} {answer.get('msg')}")
            else:
                delay_s = min(5.0, ((answer or {}).get("retry_after") or 100) / 1000)
            if any(d not in self.bundles for d in missing):
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


def e2ee_report(stats: E2EEStats | None, messages_sent: int) -> dict:
    """The report's ``e2ee`` section: whether it was on and, if so, the client's E2EE cost."""
    if stats is None:
        return {"on": False}

    def per_op(*operations: str) -> dict:
        count = sum(stats.count[o] for o in operations)
        cpu_ns = sum(stats.cpu_ns[o] for o in operations)
        return {"count": count, "cpu_s": round(cpu_ns / 1e9, 3), "us_per_op": round(cpu_ns / count / 1e3, 1) if count else None}

    total_ns = sum(stats.cpu_ns.values())
    process_s = time.process_time() - stats.process_cpu_start_s
    return {
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


def format_e2ee(section: dict) -> str:
    """The report's E2EE line(s)."""
    if not section.get("on"):
        return "e2ee: off (ciphertexts are random bytes)"

    def op(name: str) -> str:
        figures = section[name]
        return f"{figures['count']} x {figures['us_per_op']} µs" if figures["count"] else "0"

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
