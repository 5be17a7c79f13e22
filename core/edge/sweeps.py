"""The gateway's periodic housekeeping, on the event loop: the mailbox TTL, dedup and blob sweep (a
bounded chunk of LMDB work at a time), and the idle sweep (hibernation of quiet sessions, ``bye
slow_consumer`` for peers that stopped reading long ago, free pages given back to the system).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from typing import TYPE_CHECKING

from interlink.core.domain.blobs import EXPIRE_CHUNK as BLOB_EXPIRE_CHUNK
from interlink.core.errors import CloseReason

if TYPE_CHECKING:
    from interlink.core.edge.server import GatewayProtocol, GatewayServer

log = logging.getLogger("interlink.server")

EXPIRY_SWEEP_S = 60.0  # how often undelivered items are checked against the TTL
EXPIRE_CHUNK = 2_000  # items deleted per sweep transaction (keeps each pause short)
DEDUP_SCAN_CHUNK = 20_000  # dedup entries the dedup sweep reads per transaction (a few ms)
DEDUP_WINDOW_S = 48 * 3600.0  # a resend within this window is recognised (the contract asks >= 24 h)
TRIM_AFTER_HIBERNATIONS = 256  # a sweep that froze this many sessions gives free pages back


def _load_malloc_trim():
    # glibc keeps freed chunks in its arenas; the cipher contexts freed by hibernation are
    # scattered between live objects, so without malloc_trim they never leave the RSS.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to do


_malloc_trim = _load_malloc_trim()


def _return_free_memory() -> None:
    if _malloc_trim is not None:
        _malloc_trim(0)


class Sweeps:
    """The TTL/dedup sweep and the idle sweep of one ``GatewayServer``."""

    def __init__(self, server: GatewayServer, *, idle_release_s: float, mailbox_ttl_s: float,
                 slow_consumer_s: float) -> None:
        self.server = server
        self.idle_release_s = idle_release_s
        self.mailbox_ttl_s = mailbox_ttl_s
        self.slow_consumer_s = slow_consumer_s
        self._expiry_handle: asyncio.TimerHandle | None = None
        self._idle_handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._idle_handle = asyncio.get_running_loop().call_later(self.idle_release_s, self._idle_sweep)
        self.expire_mailboxes()

    def stop(self) -> None:
        for handle in (self._idle_handle, self._expiry_handle):
            if handle is not None:
                handle.cancel()
        self._idle_handle = self._expiry_handle = None

    def _end_slow_consumer(self, proto: GatewayProtocol) -> None:
        server = self.server
        server.counters["slow_consumers"] += 1
        proto.conn.close(CloseReason.SLOW_CONSUMER, "the client stopped reading")
        server.serve(proto)  # queues the bye behind what the peer never read...
        if proto.transport is not None:
            proto.transport.abort()  # ...and does not wait for it: the peer is not reading

    def expire_mailboxes(self) -> None:
        """Delete undelivered items past the TTL, a bounded chunk at a time, then come back."""
        server = self.server
        now = server.clock()
        try:
            removed = server.store.expire(int((now - self.mailbox_ttl_s) * 1000), limit=EXPIRE_CHUNK)
            server.store.forget_duplicates(int((now - DEDUP_WINDOW_S) * 1000), limit=DEDUP_SCAN_CHUNK)
            blobs = server.domain.blobs
            blobs_removed = blobs.sweep(now) if blobs is not None else 0
        except Exception:  # a storage fault (a full map, an lmdb.Error): log it, keep sweeping later
            log.exception("the TTL sweep failed; trying again in %.0f s", EXPIRY_SWEEP_S)
            server.counters["internal_errors"] += 1
            self._expiry_handle = asyncio.get_running_loop().call_later(EXPIRY_SWEEP_S, self.expire_mailboxes)
            return
        server.counters["items_expired"] += removed
        # The dedup sweep must read its table at least as fast as messages add to it.
        more = removed >= EXPIRE_CHUNK or server.store.dedup_unswept > 0 or blobs_removed >= BLOB_EXPIRE_CHUNK
        delay = 0.0 if more else EXPIRY_SWEEP_S  # more to do: continue soon
        self._expiry_handle = asyncio.get_running_loop().call_later(delay, self.expire_mailboxes)

    def _idle_sweep(self) -> None:
        """Hibernate sessions that moved no bytes since the previous sweep; end the sessions of
        peers that stopped reading long ago (``bye slow_consumer``)."""
        server = self.server
        hibernated = 0
        stuck_before = server.clock() - self.slow_consumer_s
        for proto in [p for p, since in server.paused.items() if since <= stuck_before]:
            self._end_slow_consumer(proto)
        for proto in server.connections.values():
            if proto.active:
                proto.active = False
            elif proto.hibernate():
                hibernated += 1
        server.counters["hibernations"] += hibernated
        if hibernated >= TRIM_AFTER_HIBERNATIONS:
            _return_free_memory()
        self._idle_handle = asyncio.get_running_loop().call_later(self.idle_release_s, self._idle_sweep)

    def purge_expired(self, cutoff_ms: int) -> int:
        """Delete every undelivered item stored before ``cutoff_ms`` now; returns how many."""
        removed, rounds_ended = 0, 0
        while rounds_ended < 2:  # the sweep may start mid-round: the end of two rounds covers all
            chunk = self.server.store.expire(cutoff_ms, limit=10_000, max_devices=1 << 62)
            removed += chunk
            if chunk < 10_000:
                rounds_ended += 1  # unbounded in devices, a short call reached the end of the table
        self.server.counters["items_expired"] += removed
        return removed
