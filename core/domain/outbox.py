"""A group home's fan-out to its members' nodes, kept until each node stored it (issue 18;
docs/architecture.md "Cluster"). Sans-I/O: ``core/domain/relay.py`` sends what ``due`` hands
out and reports each answer; the store keeps the entries (``core/edge/lmdbstore/outbox.py``).

A group message or membership change committed at the group's home carries, for every other node
with recipients, one outbox *entry* — the ``gfan`` record that node stores the copies from —
written in the same transaction, numbered per node in commit order. So once the sender is
answered, the copies for every member are durable somewhere: stored at the home, or in its outbox
until the member's node stores them.

Each member node's entries are a stream: a window of them is sent, the next window only when every
entry of this one was answered; an entry the node did not store (no answer in time, a refusal)
is sent again, with those after it, after ``RETRY_S`` — for as long as it takes (the node may be
down for hours; its entries wait on disk, at most ``MEMORY_ENTRIES`` and ``MEMORY_BYTES`` of them
in memory). The member's node stores each entry's copies with a mark of the stream's last entry
in one transaction, so an entry sent again is recognised there (``dup``). Each entry names the
one before it (``after``: the window's previous entry, or the last one the node confirmed
stored), and the member stores it only once that one is stored: however a window was cut up on
the way (split across NATS messages, one part lost or its commit failed), entries are stored in
the home's commit order and the mark never passes one that was not. A refusal that sending
again cannot change (``FINAL_REFUSALS``: the sender's provider is suspended there, the entry is
too large for that node) ends the entry: counted, logged, not sent again.
"""

from __future__ import annotations

import logging
from collections import deque

import msgpack

log = logging.getLogger("interlink.cluster")

WINDOW_ENTRIES = 128  # entries of one stream in flight at once
WINDOW_BYTES = 256 * 1024  # ... and their packed size (the link lowers it to fit a NATS message)
MEMORY_ENTRIES = 4096  # entries of one stream kept in memory; the rest are read from the store in turn
MEMORY_BYTES = 8 << 20  # ... and their packed size (unpacked they take several times that)
RETRY_S = 0.5  # after a window with an entry not stored, before it is sent again
# Sending again cannot change them: the sender's provider suspended there, an entry too large for
# that node's frames (nodes configured with other max_frame_bytes) — sent again for ever, it held
# back every entry behind it, every group's, until the home's share was full.
FINAL_REFUSALS = frozenset({"provider_suspended", "too_large"})
# Of the store's map (lmdb_map_size_bytes), what the outbox may fill, shared equally by the other
# nodes: a node unreachable for long must not fill the disk its home's own users' mailboxes need.
OUTBOX_SHARE = 0.5
# Entries of several nodes share pages, where a split can leave mostly empty ones behind (a review
# measured twice the footprints): a stream past this part of its share is full too while the
# outbox's pages take its part of the map.
OUTBOX_TABLE_LOOK = 0.25
OK, RETRY, FINAL = 0, 1, 2  # what an answer means for its entry


def outcome(answer: dict | None) -> int:
    """What a member node's answer to an entry means: stored (``ack``/``res``, a duplicate too),
    to be sent again (no answer, ``overloaded``, ``internal``...), or refused for good."""
    if answer is None:
        return RETRY
    if answer.get("t") in ("ack", "res"):
        return OK
    return FINAL if answer.get("code") in FINAL_REFUSALS else RETRY


class NodeStream:
    """One member node's entries not yet confirmed, oldest first."""

    __slots__ = ("node", "queue", "queue_bytes", "assigned", "loaded", "on_disk", "in_flight", "stored", "failed",
                 "retry_at", "backlog", "backlog_bytes", "sent", "last_stored", "kicked_at")

    def __init__(self, node: str, assigned: int, backlog: int, backlog_bytes: int = 0) -> None:
        self.node = node
        self.queue: deque = deque()  # (seq, record, packed size), committed, in seq order
        self.queue_bytes = 0  # the packed sizes of ``queue``
        self.assigned = assigned  # the last seq given to an entry (committed or not)
        self.loaded = 0  # the last seq put in ``queue`` (a commit's report of one up to it is already there)
        self.on_disk = backlog > 0  # committed entries after ``loaded`` are in the store only
        self.in_flight = 0  # entries at the head of ``queue`` sent and not yet answered
        self.stored: set[int] = set()  # entries of the window in flight the node confirmed
        self.failed = False  # an entry of the window in flight was not stored
        self.retry_at = 0.0  # no window before this time
        self.backlog = backlog  # entries committed and not yet confirmed (memory and store)
        self.backlog_bytes = backlog_bytes  # ... what they take of the store at most (Store.outbox_footprint)
        self.sent = 0  # the last seq sent at least once
        # (incarnation, seq) of the last entry the node confirmed stored (this run): what the next
        # window's first entry names as the one before it (None: nothing to wait for)
        self.last_stored: tuple[bytes, int] | None = None
        self.kicked_at = -1e18  # when the node's start last sent the stream again (Relay.node_started)


class Outbox:
    """Every other node's stream of this node's group fan-out."""

    def __init__(self, store, node: str, nodes) -> None:
        self.store = store
        self.incarnation: bytes = store.incarnation
        waiting = store.outbox_sizes()
        self.streams: dict[str, NodeStream] = {
            other: NodeStream(other, store.outbox_last(other), *waiting.get(other, (0, 0)))
            for other in nodes if other != node
        }
        # A stream past this is full (``full``): what would add to it is refused until it drains.
        self.max_bytes = int(store.usage()["map_size_bytes"] * OUTBOX_SHARE)
        self.max_node_bytes = self.max_bytes // max(1, len(self.streams))
        for other, (count, _) in waiting.items():
            if other not in self.streams:
                log.warning("cluster: %d group fan-out entries wait for node %s, which is not in the node list; "
                            "they are kept, not sent", count, other)
        self.acked: dict[str, int] = {}  # node -> the last entry it confirmed since the last take_acked
        self.window_bytes = WINDOW_BYTES  # the link lowers it below NATS's max_payload
        self.counters = {"outbox_sent": 0, "outbox_resent": 0, "outbox_stored": 0, "outbox_refused": 0}

    @property
    def backlog(self) -> int:
        """Entries committed and not yet confirmed by their node."""
        return sum(stream.backlog for stream in self.streams.values())

    def backlogs(self) -> dict[str, int]:
        """Each member node's entries committed and not yet confirmed (0 in steady state)."""
        return {node: stream.backlog for node, stream in self.streams.items()}

    def full(self, node: str) -> bool:
        """Whether ``node``'s entries waiting fill its share of the store (``max_node_bytes``, by
        what they take of it at most: ``Store.outbox_footprint``)."""
        stream = self.streams.get(node)
        if stream is None:
            return False
        if stream.backlog_bytes >= self.max_node_bytes:
            return True
        return (stream.backlog_bytes >= OUTBOX_TABLE_LOOK * self.max_node_bytes
                and self.store.outbox_table_bytes() >= self.max_bytes)  # looked at only for a stream that far behind

    @property
    def has_work(self) -> bool:
        """Some stream has entries to send (now or after a retry's wait)."""
        return any(stream.queue or stream.on_disk for stream in self.streams.values())

    def entry(self, node: str, record: list) -> tuple[int, bytes]:
        """Number ``record`` ([provider, localpart, device, max plaintext bytes, gfan stanza]) for
        ``node``'s stream: (seq, packed), to be written with the entry that causes it. A number
        whose commit fails is never used again (the node sees a gap, which is harmless)."""
        stream = self.streams[node]
        stream.assigned += 1
        return stream.assigned, msgpack.packb(record)

    def committed(self, node: str, seq: int, record: list, size: int) -> None:
        """Entry ``seq`` for ``node`` is durable: it joins the stream."""
        stream = self.streams[node]
        stream.backlog += 1
        stream.backlog_bytes += self.store.outbox_footprint(node, size)
        if seq <= stream.loaded:
            return  # read from the store already (its commit ended while the stream was refilled)
        if stream.on_disk or len(stream.queue) >= MEMORY_ENTRIES or stream.queue_bytes + size > MEMORY_BYTES:
            stream.on_disk = True  # read in turn, after those before it
            return
        stream.queue.append((seq, record, size))
        stream.queue_bytes += size
        stream.loaded = seq

    def due(self, now: float) -> list[tuple[str, list]]:
        """The windows to send now: [(node, [(seq, record, after), ...])] (``after``: the
        (incarnation, seq) the node must have stored before this entry, or None); each is in
        flight until every entry of it is ``answered``."""
        windows = []
        for stream in self.streams.values():
            if stream.in_flight or stream.retry_at > now or not (stream.queue or stream.on_disk):
                continue
            if stream.on_disk and len(stream.queue) < WINDOW_ENTRIES:
                self._refill(stream)
            window, size, after = [], 0, stream.last_stored
            for seq, record, entry_size in stream.queue:
                if window and (len(window) >= WINDOW_ENTRIES or size + entry_size > self.window_bytes):
                    break
                window.append((seq, record, after))
                after = (record[4]["n"], seq)
                size += entry_size
            if window:
                stream.in_flight = len(window)
                again = sum(1 for seq, _, _ in window if seq <= stream.sent)
                stream.sent = max(stream.sent, window[-1][0])
                self.counters["outbox_sent"] += len(window) - again
                self.counters["outbox_resent"] += again
                windows.append((stream.node, window))
        return windows

    def _refill(self, stream: NodeStream) -> None:
        room = MEMORY_ENTRIES - len(stream.queue)
        if room <= 0 or stream.queue_bytes >= MEMORY_BYTES:
            return
        entries = self.store.outbox_entries(stream.node, stream.loaded, room)
        for seq, packed in entries:
            if stream.queue and stream.queue_bytes + len(packed) > MEMORY_BYTES:
                return  # the rest stays on disk (on_disk still True)
            stream.queue.append((seq, msgpack.unpackb(packed, raw=False), len(packed)))
            stream.queue_bytes += len(packed)
            stream.loaded = seq
        if len(entries) < room:
            stream.on_disk = False

    def answered(self, node: str, seq: int, result: int, now: float) -> None:
        """The node's answer to entry ``seq`` of the window in flight (``OK``, ``RETRY``, ``FINAL``)."""
        stream = self.streams[node]
        stream.in_flight -= 1
        queue = stream.queue
        if result == RETRY:
            stream.failed = True
        elif result == OK:
            stream.stored.add(seq)
        else:  # refused for good: out of the stream now, wherever it stands (never sent again)
            self.counters["outbox_refused"] += 1
            log.warning("cluster: node %s refused group fan-out entry %d for good; its members there miss it",
                        node, seq)
            for index, queued in enumerate(queue):
                if queued[0] == seq:
                    del queue[index]
                    stream.queue_bytes -= queued[2]
                    stream.backlog -= 1
                    stream.backlog_bytes -= self.store.outbox_footprint(node, queued[2])
                    if index == 0:
                        self.acked[node] = seq  # nothing before it waits: its record can go
                    break
        while queue and queue[0][0] in stream.stored:  # confirmed from the head on: done
            done, record, size = queue.popleft()
            stream.stored.discard(done)
            stream.queue_bytes -= size
            stream.last_stored = (record[4]["n"], done)
            stream.backlog -= 1
            stream.backlog_bytes -= self.store.outbox_footprint(node, size)
            self.counters["outbox_stored"] += 1
            self.acked[node] = done
        if stream.in_flight == 0:
            if stream.failed:  # the rest of the window goes again, from its first unconfirmed entry
                stream.failed = False
                stream.retry_at = now + RETRY_S
            stream.stored.clear()

    def take_acked(self) -> dict[str, int]:
        """Per node, the last entry confirmed since the last call (the next commit deletes up to it)."""
        acked, self.acked = self.acked, {}
        return acked
