"""The ``Offload`` port on the loop (``core/edge/offload.py``): work runs on a worker thread, its
result or exception comes back to ``done`` on the loop with the time, the sessions it answered
are written out, a failing ``done`` is counted and the loop goes on, ``settle`` waits for all.
``SerialOffload`` (the blob chunk writer) also keeps the order and batches the wake-ups."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import pytest

from interlink.core.edge.offload import SerialOffload, ThreadOffload


class Server:
    """What the offload needs of the server: a clock, counters and the write-out of touched sessions."""

    def __init__(self) -> None:
        self.counters: Counter = Counter()
        self.writes = 0

    def clock(self) -> float:
        return 123.0

    def write_touched(self) -> None:
        self.writes += 1


async def test_work_runs_off_the_loop_and_done_runs_on_it():
    server = Server()
    offload = ThreadOffload(server, workers=2)
    loop_thread = threading.get_ident()
    seen = []
    offload.submit(lambda: threading.get_ident(), lambda outcome, now: seen.append((outcome, now, threading.get_ident())))
    offload.submit(lambda: 1 / 0, lambda outcome, now: seen.append((type(outcome), now, threading.get_ident())))
    assert offload.inflight == 2
    await offload.settle()
    assert offload.inflight == 0
    worker, _, done_thread = seen[0] if type(seen[0][0]) is int else seen[1]
    assert worker != loop_thread and done_thread == loop_thread
    assert (ZeroDivisionError, 123.0, loop_thread) in seen
    assert server.writes == 2
    offload.shutdown()


async def test_a_failing_done_is_counted_and_the_rest_goes_on():
    server = Server()
    offload = ThreadOffload(server, workers=1)
    results = []

    def broken(outcome, now):
        raise RuntimeError("a bug")

    offload.submit(lambda: "a", broken)
    offload.submit(lambda: "b", lambda outcome, now: results.append(outcome))
    await offload.settle()
    assert results == ["b"]
    assert server.counters["internal_errors"] == 1 and server.writes == 2
    offload.shutdown()
    await asyncio.sleep(0)


async def test_settle_gives_up_after_its_timeout_and_shutdown_calls_nothing_more():
    server = Server()
    offload = ThreadOffload(server, workers=1)
    release = threading.Event()
    results = []
    offload.submit(lambda: release.wait(5), lambda outcome, now: results.append(outcome))
    assert await offload.settle(0.05) is False  # still running
    offload.shutdown()
    release.set()
    await asyncio.sleep(0.05)
    assert results == [] and server.writes == 0  # after shutdown, no continuation runs


async def test_the_serial_offload_keeps_the_order_and_wakes_the_loop_once_per_batch():
    server = Server()
    writer = SerialOffload(server, name="test-writer")
    loop_thread = threading.get_ident()
    release = threading.Event()
    done_order, work_threads, done_threads = [], set(), set()

    def work(i):
        def run():
            if i == 0:
                release.wait(5)  # the rest queue up behind the first
            work_threads.add(threading.get_ident())
            if i == 7:
                raise OSError("disk full")
            return i
        return run

    for i in range(20):
        writer.submit(work(i), lambda outcome, now: (done_order.append(outcome), done_threads.add(threading.get_ident())))
    assert writer.inflight == 20 and await writer.settle(0.05) is False
    release.set()
    assert await writer.settle(5) is True
    assert writer.inflight == 0
    assert [o if isinstance(o, int) else type(o) for o in done_order] == [*range(7), OSError, *range(8, 20)]
    assert len(work_threads) == 1 and loop_thread not in work_threads and done_threads == {loop_thread}
    assert 1 <= server.writes < 20  # whatever finished while the loop waited came back together
    writer.shutdown()
    await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError, match="shut down"):
        writer.submit(lambda: None, lambda outcome, now: None)
