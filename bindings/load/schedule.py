"""Open-loop sending: when each message is meant to leave, and the time it carries.

``OpenLoopSchedule`` spreads a rate over senders and hands out every intended send time once;
``start_open_loop`` sends them from a 1-2 ms timer. Every payload starts with its intended send
time (``TIME_BYTES``, ``perf_counter_ns`` little-endian), and latencies count from it, so a
stalled server shows as latency rather than as a slower send rate (coordinated-omission
correction).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["OPEN_LOOP_TICK_S", "TIME_BYTES", "OpenLoopSchedule", "start_open_loop"]

TIME_BYTES = 8
OPEN_LOOP_TICK_S = 0.001  # uvloop's timer resolution makes it 1-2 ms


class OpenLoopSchedule:
    """An open loop's send times: ``rate`` messages/s in total, spread evenly over ``senders``
    (staggered by a fraction of the period each). ``due(i, now_ns)`` gives sender ``i``'s messages
    due since its last call, each with its *intended* time."""

    def __init__(self, senders: int, rate: float, origin_ns: int | None = None) -> None:
        self.period_ns = senders * 1e9 / rate  # per sender
        self.origin_ns = time.perf_counter_ns() if origin_ns is None else origin_ns
        self._offsets = [self.period_ns * i / senders for i in range(senders)]
        self._counts = [0] * senders

    def due(self, index: int, now_ns: int) -> list[int]:
        base, period = self.origin_ns + self._offsets[index], self.period_ns
        count = self._counts[index]
        times = []
        intended_ns = int(base + count * period)
        while intended_ns <= now_ns:
            times.append(intended_ns)
            count += 1
            intended_ns = int(base + count * period)
        self._counts[index] = count
        return times


class Sender(Protocol):
    @property
    def connected(self) -> bool: ...

    def send(self, intended_ns: int) -> None: ...


def start_open_loop(senders: Sequence[Sender], rate: float, origin_ns: int | None = None) -> Callable[[], None]:
    """``rate`` messages/s in total over the senders (``OpenLoopSchedule``), sent in bursts every
    1-2 ms; returns the function that stops the timer. A sender that is not connected (a killed
    gateway) skips its due messages: they are never sent, so never counted."""
    loop = asyncio.get_running_loop()
    schedule = OpenLoopSchedule(len(senders), rate, origin_ns)
    timer = None

    def tick() -> None:
        nonlocal timer
        now_ns = time.perf_counter_ns()
        for index, sender in enumerate(senders):
            due = schedule.due(index, now_ns)
            if due and sender.connected:
                for intended_ns in due:
                    sender.send(intended_ns)
        timer = loop.call_later(OPEN_LOOP_TICK_S, tick)

    tick()
    return lambda: timer.cancel()
