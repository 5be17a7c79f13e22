"""The edge's commit driver: when the domain's batch is written, and where.

A batch is committed once per event-loop turn (``call_soon``: every read already queued for the
turn joins it), inline on the loop or on one writer thread (py-lmdb releases the GIL while
committing, so the loop gathers the next batch meanwhile). One commit runs at a time, in order.
After each, the domain answers the senders and pushes deliveries, and ``on_done`` writes out
the sessions it touched.

A batch of nothing but ``recv`` deletions waits up to ``deletions_wait_s`` for company: nobody
waits for its answer, and alone it costs a commit (an fsync) per received item when messages
come one at a time — the next stored message, a session closing or a drain takes it
along at once. Until it is written, a new session of that device may be pushed those items
again, which at-least-once delivery allows (docs/protocol.md §6, "Receiving").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Callable

from interlink.core.domain.dispatch import Domain
from interlink.core.errors import InterlinkError
from interlink.core.edge.metrics import COMMIT_BUCKETS_S, Histogram
from interlink.core.domain.router import Commit
from interlink.core.domain.ports import Store

log = logging.getLogger("interlink.commit")

# Long enough for the next message of a one-at-a-time exchange to arrive (a cross-node round
# trip is about 1 ms on loopback), short against a reconnect.
DELETIONS_WAIT_S = 0.005
# After a commit on the writer thread failed, what it carried over (push changes) is tried again
# this much later, or with the next stanza's commit: a store that keeps failing is not retried in
# a loop of failing commits (and error lines).
RETRY_AFTER_FAILURE_S = 0.5


class CommitDriver:
    """Schedules and runs the domain's group commits."""

    def __init__(
        self,
        *,
        store: Store,
        domain: Domain,
        on_done: Callable[[], None],
        executor: concurrent.futures.Executor | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.deletions_wait_s = DELETIONS_WAIT_S  # a harness that settles by loop turns sets 0
        self.store = store
        self.domain = domain
        self.on_done = on_done  # writes out the sessions the domain touched
        self.executor = executor  # None: commit inline on the loop
        self.seconds = Histogram(COMMIT_BUCKETS_S)  # group-commit latency, for /metrics
        self._scheduled: asyncio.Handle | asyncio.TimerHandle | None = None  # the next commit
        self._waiting_for_company = False  # _scheduled is the delete-only batch's timer
        self._hurry = False  # commit what waits at the next chance, deletions too
        self.failures = 0  # commits that wrote nothing (a storage fault)
        self._retry: asyncio.TimerHandle | None = None  # after a failed commit on the writer thread
        self._inflight: asyncio.Future | None = None  # the writer thread's running commit

    @property
    def running(self) -> bool:
        """A commit is being written on the writer thread."""
        return self._inflight is not None

    def schedule(self, hurry: bool = False) -> None:
        """Commit at the end of this loop turn if the domain has writes waiting (a batch of only
        deletions: after ``deletions_wait_s``, unless ``hurry`` — a session closed)."""
        if not self.domain.router.has_batch:
            return
        if hurry:
            self._hurry = True
        if self._inflight is not None:
            return  # its done-callback schedules the next one
        if self._scheduled is not None:
            if self._waiting_for_company and (self._hurry or not self.domain.router.batch_only_deletions):
                self._scheduled.cancel()
                self._waiting_for_company = False
                self._scheduled = asyncio.get_running_loop().call_soon(self.commit)
            return
        if not self._hurry and self.domain.router.batch_only_deletions:
            self._waiting_for_company = True
            self._scheduled = asyncio.get_running_loop().call_later(self.deletions_wait_s, self.commit)
        else:
            self._scheduled = asyncio.get_running_loop().call_soon(self.commit)

    def commit(self) -> None:
        """Write the pending batch in one transaction, then let the domain answer and push."""
        if self._scheduled is not None:
            self._scheduled.cancel()  # when called by settle() rather than by the handle
            self._scheduled = None
        self._waiting_for_company = False
        if self._inflight is not None:
            return  # one commit at a time, in order; the running one schedules the next
        commit = self.domain.take_batch(self.clock())
        if commit is None:
            return
        self._hurry = False
        if self.executor is None:
            started = time.perf_counter()
            try:
                self.store.commit(commit.batch)
            except Exception as exc:  # answer every waiter and keep serving, whatever the fault
                self._failed(commit, exc)
                return
            self.seconds.observe(time.perf_counter() - started)
            try:
                self.domain.committed(commit)
            finally:
                self.on_done()  # throttled connections are read again whatever went wrong
            return
        future = asyncio.get_running_loop().run_in_executor(self.executor, self._timed_commit, commit)
        future.add_done_callback(lambda done: self._thread_committed(done, commit))
        self._inflight = future

    async def settle(self) -> None:
        """Commit everything still batched or in flight (a drain calls this before the store
        closes); stops after a commit that failed: a store that fails keeps what was carried over
        for a later start (push changes), and the drain must end."""
        failures = self.failures
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        while self._inflight is not None or self.domain.router.has_batch:
            if self._inflight is not None:
                await asyncio.wait([self._inflight])
                await asyncio.sleep(0)  # let its done-callback run (answers, the next batch)
            elif self.failures > failures:
                log.error("drain: the store failed; %d received items are not deleted (pushed again at the next "
                          "session)", sum(len(seqs) for _, seqs in self.domain.router.pending_deletions))
                return
            else:
                self.commit()

    def _timed_commit(self, commit: Commit) -> float:
        """The writer thread's job: the commit, and how long it took."""
        started = time.perf_counter()
        self.store.commit(commit.batch)
        return time.perf_counter() - started

    def _thread_committed(self, done: asyncio.Future, commit: Commit) -> None:
        self._inflight = None
        error = done.exception()
        try:
            if error is None:
                self.seconds.observe(done.result())  # observed on the loop, not the thread
                try:
                    self.domain.committed(commit)
                finally:
                    self.on_done()
            else:
                self._failed(commit, error)
        finally:
            if error is None or self.domain.router.pending_load:
                self.schedule()  # what gathered while this one was written
            elif self._retry is None:  # only what the failed commit carried over: not in a loop
                self._retry = asyncio.get_running_loop().call_later(RETRY_AFTER_FAILURE_S, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self.schedule()

    def _failed(self, commit: Commit, error: BaseException) -> None:
        if not isinstance(error, InterlinkError):  # a storage fault nobody foresaw
            log.error("commit failed", exc_info=error)
            error = InterlinkError("the gateway could not store the message")
        self.failures += 1
        log.error("commit of %d entries failed: %s", len(commit.batch.entries), error)
        self.domain.failed(commit, error)
        self.on_done()
