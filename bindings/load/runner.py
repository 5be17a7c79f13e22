"""What every kind's runner shares: connecting and closing many simulated devices, waiting on a
condition, taking the devices' backlogs, the measured sending window (open or closed loop, the
warm-up snapshot, one kill-and-restart of a local gateway) and the server's figures over it.

A device here is anything with ``connect(gateway, token)``, ``close()``, ``connected``,
``note_ended()``, ``session_pending`` and ``session_deliveries`` (``interlink.load.chat.Device``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from interlink.core.errors import ConfigError
from interlink.load.accounting import Run
from interlink.load.schedule import start_open_loop

__all__ = ["CONNECT_CONCURRENCY", "CONNECT_TIMEOUT_S", "DRAIN_TIMEOUT_S", "TAIL_TIMEOUT_S", "close_all",
           "connect_all", "drain_owed", "gather_bounded", "pin_cpus", "predrain", "refuse_remote_kill", "restart_gateway",
           "sending_window", "server_window", "take_backlogs", "wait_until"]

CONNECT_CONCURRENCY = 32
CONNECT_TIMEOUT_S = 10.0
RECONNECT_DEADLINE_S = 30.0  # after a restart: how long devices keep trying to reconnect
TAIL_TIMEOUT_S = 30.0  # after sending stops: answers and deliveries still on their way
DRAIN_TIMEOUT_S = 60.0  # accounting (and offline-drain) drains


def pin_cpus(pin: bool, target: Any = None) -> int | None:
    """With 2+ CPUs and a local server: this process on CPU 1; the CPU the server is to take (0)."""
    if pin and target is None and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})
        return 0
    return None


def refuse_remote_kill(target: Any, kill_at_s: float | None) -> None:
    if target is not None and kill_at_s is not None:
        raise ConfigError("--kill-at needs the local gateway (it SIGKILLs and restarts it)")


async def gather_bounded(coroutines: list[Coroutine], limit: int = CONNECT_CONCURRENCY) -> None:
    semaphore = asyncio.Semaphore(limit)

    async def one(coroutine):
        async with semaphore:
            return await coroutine

    await asyncio.gather(*(one(c) for c in coroutines))


async def connect_all(gateway, devices: Sequence, *, deadline_s: float = CONNECT_TIMEOUT_S) -> None:
    """Connect every device, retrying until ``deadline_s`` (a restarting gateway)."""

    async def connect(device) -> None:
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                await device.connect(gateway, gateway.token(device.localpart, device.provider_id))
                return
            except (OSError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    await gather_bounded([connect(d) for d in devices])


async def close_all(devices: Sequence) -> None:
    await asyncio.gather(*(d.close() for d in devices))


async def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def take_backlogs(gateway, devices: Sequence) -> int:
    """Connect the devices, wait until each took what waited for it (``welcome.pending``) or lost
    its session, and close them again; how many items waited."""
    await connect_all(gateway, devices)
    pending = sum(d.session_pending for d in devices)
    await wait_until(lambda: all(d.session_deliveries >= d.session_pending or not d.connected for d in devices),
                     DRAIN_TIMEOUT_S)
    await asyncio.sleep(0.1)  # the last recv leaves
    await close_all(devices)
    return pending


async def drain_owed(run: Run, gateway, owed: Sequence) -> dict:
    """After the run: take the backlogs of the devices still owed messages; their deliveries now
    count as found in a mailbox (``run.accounting``). The report's ``accounting_drain``."""
    if not owed:
        return {"devices_reconnected": 0, "pending_at_welcome": 0}
    run.accounting = True
    pending = await take_backlogs(gateway, owed)
    run.accounting = False
    return {"devices_reconnected": len(owed), "pending_at_welcome": pending}


async def predrain(run: Run, gateway, devices: Sequence) -> None:
    """A remote gateway: connect every device once and take what earlier runs left in its mailbox."""
    run.predrain = True
    try:
        await take_backlogs(gateway, devices)
    finally:
        run.predrain = False


async def restart_gateway(gateway, devices: Sequence, out: Callable[[str], None] | None, at_s: float) -> None:
    """SIGKILL the gateway, start it again on the same data and port, reconnect every device."""
    await gateway.kill()
    if out is not None:
        out(f"--- gateway SIGKILLed at {at_s:.1f}s; restarting")
    await asyncio.sleep(0.05)
    for device in devices:  # the kernel closed their sockets; make sure every peer has noticed
        if device.peer is not None and not device.peer.closed and device.peer.transport is not None:
            device.peer.transport.abort()
    await asyncio.sleep(0)
    for device in devices:
        device.note_ended()
        device.peer = None
    await gateway.start()
    await connect_all(gateway, devices, deadline_s=RECONNECT_DEADLINE_S)
    if out is not None:
        out(f"--- gateway restarted (pid {gateway.pid}); {len(devices)} devices reconnected")


def server_window(gateway, before: tuple, after: tuple, seconds: float, per: int, what: str) -> dict:
    if gateway.remote:  # its CPU and memory are not ours to read
        return {"cpu_s": None, f"cpu_us_per_{what}": None, "cpu_busy": None, "runqueue_wait_s": None,
                "load_process_cpu_busy": round((after[2] - before[2]) / seconds, 3) if seconds else None,
                "rss_bytes": None, "rss_peak_bytes": None}
    cpu = after[0] - before[0]
    rss, peak = gateway.memory_bytes()
    return {
        "cpu_s": round(cpu, 3),
        f"cpu_us_per_{what}": round(cpu / per * 1e6, 1) if per else None,
        "cpu_busy": round(cpu / seconds, 3) if seconds else None,
        "runqueue_wait_s": round(after[1] - before[1], 3),
        "load_process_cpu_busy": round((after[2] - before[2]) / seconds, 3) if seconds else None,
        "rss_bytes": rss,
        "rss_peak_bytes": peak,
    }


async def sending_window(run: Run, gateway, senders: list, counters: Callable[[], tuple], kill_at_s: float | None,
                         kill_and_restart: Callable[[float], Any]) -> tuple[tuple, tuple, Any]:
    """The measured sending phase the chat and group runners share: open loop at the scenario's
    rate or closed loop (each sender filled), ``duration`` seconds, a snapshot at the end of the
    warm-up and one at the end (``(counters(), gateway CPU, monotonic)``), and with ``kill_at_s``
    one ``await kill_and_restart(elapsed)`` (the closed loop is filled again after it). The
    open-loop timer stops however the phase ends. Returns ``(window, end, what kill_and_restart
    returned or None)``."""
    scenario = run.scenario
    stop_open_loop = start_open_loop(senders, scenario.rate) if scenario.open_loop else None
    if stop_open_loop is None:
        for device in senders:
            device.fill()

    def snapshot() -> tuple:
        return counters(), gateway.cpu_s(), time.monotonic()

    start = time.monotonic()
    window = restarted = None
    killed = kill_at_s is None
    try:
        while (elapsed := time.monotonic() - start) < scenario.duration:
            if window is None and elapsed >= scenario.warmup:
                window = snapshot()
            if not killed and elapsed >= kill_at_s:
                killed = True
                restarted = await kill_and_restart(elapsed)
                if stop_open_loop is None:
                    for device in senders:
                        device.fill()
                continue
            await asyncio.sleep(min(0.02, max(0.0, scenario.duration - elapsed)))
        end = snapshot()
    finally:
        if stop_open_loop is not None:
            stop_open_loop()
        run.sending = False
    return window or end, end, restarted

