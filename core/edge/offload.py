"""The ``Offload`` port on the event loop: work that must not block the loop runs on threads;
its result comes back on the loop, where the domain acts on it and the edge writes out the
sessions it answered. ``ThreadOffload``: a small pool for slow work (syncing a blob to disk and
hashing it). ``SerialOffload``: one thread, in order, for many small pieces (a blob chunk's
write into the page cache, which ext4 may hold for tens of milliseconds on its journal)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from interlink.core.edge.server import GatewayServer

log = logging.getLogger("interlink.server")


WORKER_NICE = 19  # the workers' nice value: the loop (messages) runs first whenever it can


def _lowest_priority() -> None:
    """Run this worker thread at the lowest CPU priority: hashing a 100 MiB blob takes a tenth of
    a second of CPU, and on a core shared with the event loop it must not delay messages (the
    loop preempts it; at nice 19 it still gets a small share, so a busy loop never starves it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)  # Linux: per thread
    except (OSError, AttributeError) as exc:  # not permitted, or no per-thread priorities here
        log.warning("offload threads keep the loop's CPU priority: %s", exc)


def _finish(server: GatewayServer, done: Callable[[object, float], None], outcome: object) -> None:
    """Hand offloaded work's outcome to its continuation on the loop; a bug there is logged and
    counted, and the loop goes on."""
    try:
        done(outcome, server.clock())
    except Exception:
        log.exception("internal error while finishing offloaded work")
        server.counters["internal_errors"] += 1


class ThreadOffload:
    """Runs ``work`` on one of ``workers`` threads, then ``done(outcome, now)`` on the loop."""

    def __init__(self, server: GatewayServer, *, workers: int) -> None:
        self.server = server
        self.workers = workers
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None  # made on first use
        self._inflight: set[asyncio.Future] = set()
        self._closed = False

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def submit(self, work: Callable[[], object], done: Callable[[object, float], None]) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.workers, thread_name_prefix="interlink-offload", initializer=_lowest_priority)
        future = asyncio.get_running_loop().run_in_executor(self._executor, work)
        self._inflight.add(future)
        future.add_done_callback(lambda finished: self._finished(finished, done))

    def _finished(self, future: asyncio.Future, done: Callable[[object, float], None]) -> None:
        self._inflight.discard(future)
        if future.cancelled() or self._closed:
            return  # shut down: the store may be closed, and the work is done again after a restart
        error = future.exception()
        try:
            _finish(self.server, done, error if error is not None else future.result())
        finally:
            self.server.write_touched()

    async def settle(self, timeout_s: float | None = None) -> bool:
        """Wait for every piece of work submitted so far, and its ``done``, at most ``timeout_s``
        seconds; True when none is left."""
        deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        while self._inflight:
            left = None if deadline is None else deadline - asyncio.get_running_loop().time()
            if left is not None and left <= 0:
                return False
            await asyncio.wait(list(self._inflight), timeout=left)
            await asyncio.sleep(0)  # let the done-callbacks run
        return True

    def shutdown(self) -> None:
        """No more ``done`` calls; work not started is dropped, work running ends on its own
        (its thread is joined at exit)."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class SerialOffload:
    """Runs ``work`` on one thread in the order submitted, then each ``done(outcome, now)`` on
    the loop in the same order. Whatever finished while the loop was busy comes back in one
    wake-up (one ``call_soon_threadsafe``), not one per piece: at thousands of chunks a second,
    a future and a self-pipe write per chunk would cost the loop more than the writes save."""

    def __init__(self, server: GatewayServer, *, name: str) -> None:
        self.server = server
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # started on first use
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._finished: list = []  # (done, outcome): filled by the thread, emptied by the loop
        self._wake_pending = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.inflight = 0
        self._closed = False

    def submit(self, work: Callable[[], object], done: Callable[[object, float], None]) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name} is shut down")
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self.inflight += 1
        self._idle.clear()
        self._queue.put((work, done))

    def _run(self) -> None:
        _lowest_priority()
        while True:
            item = self._queue.get()
            if item is None or self._closed:
                return
            work, done = item
            try:
                outcome = work()
            except BaseException as exc:  # handed to ``done`` on the loop, like a result
                outcome = exc
            with self._lock:
                self._finished.append((done, outcome))
                wake = not self._wake_pending
                self._wake_pending = True
            if wake:
                try:
                    self._loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # the loop closed under us (shutdown): nobody waits any more
                    return

    def _deliver(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
            self._wake_pending = False
        server = self.server
        try:
            for done, outcome in finished:
                self.inflight -= 1
                if not self._closed:
                    _finish(server, done, outcome)
        finally:
            if self.inflight == 0:
                self._idle.set()
            server.write_touched()

    async def settle(self, timeout_s: float | None = None) -> bool:
        """Wait for everything submitted so far, and its ``done``, at most ``timeout_s``
        seconds; True when none is left."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def shutdown(self) -> None:
        """No more ``done`` calls; work not started is dropped."""
        self._closed = True
        self._queue.put(None)
