"""Windowed delivery (docs/protocol.md §6, "Receiving"): what each online session has been
pushed and not yet received, sans-I/O.

Each online device session has at most ``window`` pushed-but-unreceived items. A just-stored item
is pushed at once unless older items of that device still wait in the store (``backlog``), the
window is full, or the peer stopped reading (``pause``); then ``recv`` (``received``, ``refill``)
brings it from the store, in seq order. A session with nothing stored holds no state here.
"""

from __future__ import annotations

from interlink.core.domain.batch import device_key
from interlink.core.domain.ports import MailboxStore, Session


class Delivery:
    """Push state of one online device session that has stored items."""

    __slots__ = ("inflight", "cursor", "backlog")

    def __init__(self, backlog: bool) -> None:
        self.inflight: set[int] = set()  # seqs pushed on this session and not yet received
        self.cursor = 0  # highest seq pushed on this session
        self.backlog = backlog  # the store may hold items after cursor that were not pushed


class DeliveryWindows:
    """The push window of every online session that has stored items."""

    def __init__(self, store: MailboxStore, window: int, touched: set, counters: dict) -> None:
        self.store = store
        self.window = window
        self.touched = touched  # the router's: sessions written to, for the edge to write out
        self.counters = counters  # the router's: deliveries_pushed is counted here
        self.deliveries: dict = {}  # session -> Delivery, only sessions with stored items
        self.paused: set = set()  # sessions whose peer stopped reading: nothing is pushed

    def opened(self, session) -> int:
        """A session just opened: how many items wait for it (pushed from ``refill`` on)."""
        pending = self.store.pending_count(device_key(*session.session_key))
        if pending:
            self.deliveries[session] = Delivery(backlog=True)
        return pending

    def closed(self, session) -> None:
        self.deliveries.pop(session, None)
        self.paused.discard(session)

    def pause(self, session) -> None:
        self.paused.add(session)

    def resume(self, session) -> None:
        self.paused.discard(session)
        self.refill(session)

    def received(self, session, seqs: list[int]) -> list[int]:
        """The seqs of a ``recv`` that were pushed on this session (only those may be deleted)."""
        delivery = self.deliveries.get(session)
        if delivery is None:
            return []
        received = [seq for seq in seqs if seq in delivery.inflight]
        delivery.inflight.difference_update(received)
        return received

    def push_new(self, session: Session, seq: int, value: bytes) -> None:
        """Push a just-stored item to its device's online session, if the window allows."""
        delivery = self.deliveries.get(session)
        if delivery is None:
            delivery = self.deliveries[session] = Delivery(backlog=False)
        if delivery.backlog or len(delivery.inflight) >= self.window or session in self.paused:
            # Older items wait in the store, or the window is full: this one waits its turn
            # there too, and recv will bring it (order per device is seq order).
            delivery.backlog = True
            return
        delivery.inflight.add(seq)
        delivery.cursor = seq
        session.send_encoded(value)  # the encoded dlv from the commit: serialized once
        self.counters["deliveries_pushed"] += 1
        self.touched.add(session)

    def refill(self, session: Session) -> None:
        delivery = self.deliveries.get(session)
        if delivery is None:
            return
        room = self.window - len(delivery.inflight)
        if room > 0 and delivery.backlog and session not in self.paused:
            items = self.store.pending(device_key(*session.session_key), delivery.cursor, room)
            for seq, value in items:
                delivery.inflight.add(seq)
                delivery.cursor = seq
                session.send_encoded(value)
            if items:
                self.counters["deliveries_pushed"] += len(items)
                self.touched.add(session)
            delivery.backlog = len(items) == room  # a short read reached the end of the mailbox
        if not delivery.inflight and not delivery.backlog:
            del self.deliveries[session]  # nothing stored any more: no state for idle sessions
