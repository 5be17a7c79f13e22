"""The ``Offload`` port on the event loop: work that must not block the loop (syncing a blob to
disk and hashing it) runs on a small thread pool; its result comes back on the loop, where the
domain acts on it and the edge writes out the sessions it answered."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
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
        server = self.server
        try:
            done(error if error is not None else future.result(), server.clock())
        except Exception:  # a bug of ours: logged and counted, and the loop goes on
            log.exception("internal error while finishing offloaded work")
            server.counters["internal_errors"] += 1
        finally:
            server.write_touched()

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
