"""Routing of messages through durable per-device mailboxes (docs/protocol.md §6), sans-I/O.

The router keeps the session table, validates ``msg`` (1:1), ``rcpt``, ``state`` (1:1) and
``recv``, and collects the writes of one event-loop turn into one batch. It never touches the
event loop or a socket: the edge takes the batch (``take_batch``), commits it in one store
transaction, and hands the result back (``committed`` or ``failed``); only then are senders
acked and ``dlv`` pushed to the recipients' online devices, each with at most ``window``
pushed-but-unreceived items; ``recv`` deletes items and lets more flow. Every session the router
wrote to is in ``touched`` until the edge writes it out (``take_touched``). Time comes in as
``now`` (epoch seconds).

Sessions are the protocol layer's ``ServerConnection`` objects, through the small port
``Session`` below. The router never looks inside ``c``: ciphertexts are opaque bytes it stores
and forwards. Group messages and the ``group.*`` operations are decided by ``core/domain/groups.py``,
which queues its writes here with ``enqueue`` and ``enqueue_control``.
"""

from __future__ import annotations

import math

from interlink.core.domain.auth import ProviderRegistry, localpart_error
from interlink.core.errors import InterlinkError, RouteError, StanzaError
from interlink.core.domain.fields import excerpt
from interlink.core.domain.policy import Policy
from interlink.core.domain.ratelimit import TokenBuckets
from interlink.core.protocol.stanza import encode_ack, encode_dlv, encode_stanza
from interlink.core.domain.delivery import DeliveryWindows
from interlink.core.domain.batch import (
    ControlEntry,
    GroupWrite,
    MessageEntry,
    PrekeyTake,
    WriteBatch,
    device_key,
    split_device_key,
)
from interlink.core.domain.ports import PushSender, Session, Store
from interlink.core.protocol.wire import MAX_DEVICE_ID, TAG_BYTES

ID_BYTES = 16
MAX_RECV_SEQS = 1024  # seqs one ``recv`` may name
DLV_OVERHEAD_BYTES = 512  # a dlv's fields besides the ciphertext (addresses, seq, ts, ...), at most
# A membership event is stored as its dlv: its fields, and beside them "t", "seq" and "ts" (31
# bytes and a map header's growth at most): they may take what a frame holds but this.
EVENT_DLV_ENVELOPE_BYTES = 64
MAX_RECEIPT_IDS = 100  # message ids one rcpt may name
VALID_ADDRESSES_KEPT = 65_536  # recipient addresses already checked, remembered (about 100 bytes each)
MAX_ADDRESS_CHARS = 128  # a localpart (at most 64 bytes) + "@" + a provider id (at most 63 characters)
RECEIPT_KINDS = ("delivered", "read")
TYPING_STATES = ("composing", "paused")
# A cluster's member node, to a group home whose outbox entry came before the one it follows.
_OUT_OF_ORDER = {"t": "err", "code": "overloaded", "retry_after": 500,
                 "msg": "the group fan-out entry before this one is not stored here yet; send them again in order"}


class Commit:
    """One turn's batch, taken by the edge to commit, and the requests it answers afterwards."""

    __slots__ = ("batch", "waiting")

    def __init__(self, batch: WriteBatch, waiting: list) -> None:
        self.batch = batch
        # (session, entry, targets): the sender owed an answer, its batch entry, and each stored
        # item's (user, device), the session-table key.
        self.waiting = waiting


class Router:
    """1:1 routing: the session table, validation, consent, the batch, acks and windowed delivery."""

    def __init__(
        self,
        *,
        store: Store,
        registry: ProviderRegistry,
        policy: Policy,
        window: int,
        max_frame_bytes: int,
        message_rate_per_device: float,
        message_rate_per_user: float,
    ) -> None:
        self.store = store
        self.registry = registry
        self.policy = policy
        # Every dlv must fit in one frame the recipient accepts.
        self.max_ciphertext_bytes = max_frame_bytes - TAG_BYTES - DLV_OVERHEAD_BYTES
        self.max_event_bytes = max_frame_bytes - TAG_BYTES - EVENT_DLV_ENVELOPE_BYTES  # a group event's fields
        # Stored traffic (msg, rcpt) and typing state, per device session and per user; the burst
        # is two seconds' worth.
        self.device_buckets = TokenBuckets(2 * message_rate_per_device, message_rate_per_device)
        self.user_buckets = TokenBuckets(2 * message_rate_per_user, message_rate_per_user)
        self.sessions: dict[tuple[str, int], Session] = {}  # (user, device) -> its open session
        self.touched: set[Session] = set()  # sessions written to since the edge last wrote them out
        self._batch = WriteBatch()
        self._waiting: list[tuple[Session, MessageEntry | ControlEntry | PrekeyTake, list]] = []
        self._valid_addresses: dict[str, str] = {}  # address -> its provider id (syntax checked)
        self.counters = {
            "messages_stored": 0, "deliveries_pushed": 0, "commits": 0, "duplicates": 0, "group_changes": 0,
            "group_copies_dropped_full": 0, "group_events_dropped_full": 0, "group_states_dropped": 0,
        }
        # Windowed pushing of stored items to online sessions; it writes into the same touched
        # set and counters.
        self.delivery = DeliveryWindows(store, window, self.touched, self.counters)
        # Push (core/domain/push.py keeps these): the devices registered with push.set, and where
        # the intents a commit creates go. Empty set: routing does no push work at all.
        self.push_devices: set[tuple[str, int]] = set()
        self.push_sender: PushSender | None = None

    def set_message_rates(self, per_device: float, per_user: float) -> None:
        """New message rates (a reload); the burst stays two seconds' worth."""
        self.device_buckets.set_rate(2 * per_device, per_device)
        self.user_buckets.set_rate(2 * per_user, per_user)

    # -- sessions

    def open_session(self, session: Session) -> tuple[Session | None, int]:
        """Register an authenticated session under its ``session_key``. Returns the session it
        replaces (unregistered already; the caller closes it) and how many items wait for it."""
        key = session.session_key
        previous = self.sessions.get(key)
        if previous is session:
            previous = None
        elif previous is not None:
            self.close_session(previous)
        self.sessions[key] = session
        if key in self.push_devices:  # online: nothing is owed to it any more
            dkey = device_key(*key)
            self._batch.push_wake.discard(dkey)
            self._batch.push_cancel.add(dkey)
            if self.push_sender is not None:
                self.push_sender.cancel(dkey)
        return previous, self.delivery.opened(session)

    def close_session(self, session: Session) -> None:
        """Forget a session that ended (or was replaced); a newer session of its device stays."""
        key = session.session_key
        if key is not None and self.sessions.get(key) is session:
            del self.sessions[key]
            if key in self.push_devices:  # gone with items unreceived: owed a push (the commit checks)
                self._batch.push_wake.add(device_key(*key))  # (a cancel of this batch still applies first)
        self.delivery.closed(session)

    def push_stored(self, session: Session) -> None:
        """Push what the window allows from the store (after ``welcome``)."""
        self.delivery.refill(session)

    def pause(self, session: Session) -> None:
        """The session's peer stopped reading: push nothing more (items stay in the mailbox)."""
        self.delivery.pause(session)

    def resume(self, session: Session) -> None:
        """The peer reads again: push what waited."""
        self.delivery.resume(session)

    def take_touched(self) -> set:
        """The sessions written to since the last call; the edge writes each out once."""
        touched = self.touched.copy()  # the same set stays shared with the delivery windows
        self.touched.clear()
        return touched

    # -- stanzas

    def charge(self, session: Session, now: float, tokens: int = 1, *, here: bool = False, paid: int = 0) -> None:
        """Spend ``tokens`` tokens of the session's and the user's bucket, or refuse (``rate_limited``
        with ``retry_after``). One token: a device's token spent before its user's bucket refused
        stays spent. Several (a large group's copies, after the ``paid`` tokens the same stanza
        spent already): both buckets are asked first and a refusal spends none of them; its
        ``retry_after`` is the wait for them and the ``paid`` ones (a resend spends those again),
        and what a bucket's burst cannot hold beside the ``paid`` ones is not asked for (it could
        never be allowed). A relayed session is charged on its own node, where it lives — unless
        ``here``: a cost only this node can count (a group's copies at its home), spent from this
        node's buckets for that device and user."""
        if session.relayed and not here:
            return
        device_buckets, user_buckets = self.device_buckets, self.user_buckets
        session_key = session.session_key
        user = session_key[0]
        if tokens == 1 and not paid:
            wait_s = device_buckets.take(session_key, now) or user_buckets.take(user, now)
        else:
            device_cost = min(float(tokens), max(device_buckets.burst - paid, 0.0))
            user_cost = min(float(tokens), max(user_buckets.burst - paid, 0.0))
            if not device_buckets.wait(session_key, now, device_cost) and not user_buckets.wait(user, now, user_cost):
                device_buckets.take(session_key, now, device_cost)
                user_buckets.take(user, now, user_cost)
                wait_s = 0.0
            else:
                wait_s = max(device_buckets.wait(session_key, now, device_cost + paid),
                             user_buckets.wait(user, now, user_cost + paid))
        if wait_s:
            retry_after = max(1, math.ceil(wait_s * 1000))
            raise RouteError(f"too many messages; try again in {retry_after} ms", code="rate_limited", retry_after=retry_after)

    def route_msg(self, session: Session, stanza: dict, msg_id: bytes, now: float, *, own_only: bool = False) -> MessageEntry | None:
        """A 1:1 ``msg`` (already charged, its id checked): one ciphertext per recipient device.
        ``own_only``: the recipient's home is another node, which stored its copies already
        (``core/domain/relay.py``); store the sender's ``own`` copies only (None: there are none)."""
        identity = session.identity
        recipient_provider, recipient, ciphertexts, own = self.msg_parts(session, stanza)
        sender, sender_device = identity.user, identity.device
        items, targets = [], []
        if not own_only:
            devices = self._reachable_devices(recipient_provider, recipient, identity, "messages")
            check_devices(ciphertexts, devices, "c")
            # A blocked sender is answered like any other and nothing reaches the recipient; the
            # sender's own copies are still stored (its other devices show what it sent).
            if not self.policy.blocks(recipient, sender):
                for device, ciphertext in ciphertexts.items():
                    items.append((device_key(recipient, device), _dlv_builder(msg_id, sender, sender_device, ciphertext, None)))
                    targets.append((recipient, device))
        if own is not None:
            if session.relayed:  # a relayed sender's other devices live on its own node, which stores their copies
                raise StanzaError("a msg relayed from another node carries no 'own'")
            others = [d for d in self.store.devices(sender) if d != sender_device]
            check_devices(own, others, "own")
            for device, ciphertext in own.items():
                items.append((device_key(sender, device), _dlv_builder(msg_id, sender, sender_device, ciphertext, recipient)))
                targets.append((sender, device))
        if own_only and not items:
            return None
        return self.enqueue(session, msg_id, items, targets, now)

    def msg_parts(self, session: Session, stanza: dict) -> tuple:
        """A 1:1 ``msg``'s fields, checked as far as the sender's node can: (recipient's provider,
        recipient, ``c``, ``own`` or None)."""
        recipient_provider, recipient = self._recipient(stanza.get("to"))
        if recipient == session.identity.user:
            raise RouteError("to reach your own other devices, use 'own'", code="bad_stanza")
        ciphertexts = _device_map(stanza.get("c"), "c", self.max_ciphertext_bytes)
        own = stanza.get("own")
        own = _device_map(own, "own", self.max_ciphertext_bytes) if own is not None else None
        return recipient_provider, recipient, ciphertexts, own

    def handle_rcpt(self, session: Session, stanza: dict, now: float) -> None:
        self.charge(session, now)
        self.route_rcpt(session, stanza, now)

    def route_rcpt(self, session: Session, stanza: dict, now: float, *, own_only: bool = False) -> MessageEntry | None:
        """A receipt (already charged) is stored and delivered like a message, to every device of
        ``to`` and (with ``to``) to the sender's other devices, so they can mark the messages too.
        ``own_only``: the recipient's node stored its copies already; store the sender's (None:
        it has no other devices)."""
        identity = session.identity
        msg_id, kind, ids, recipient_provider, recipient = self.rcpt_parts(session, stanza)
        sender, sender_device = identity.user, identity.device
        targets = []
        if not own_only:
            devices = self._reachable_devices(recipient_provider, recipient, identity, "receipts")
            if not self.policy.blocks(recipient, sender):
                targets += [(recipient, device) for device in devices]
        recipient_targets = len(targets)
        if not session.relayed:  # a relayed sender's other devices live on its own node, which stores their copies
            targets += [(sender, device) for device in self.store.devices(sender) if device != sender_device]
        if own_only and not targets:
            return None
        build = _rcpt_builder(msg_id, sender, sender_device, kind, ids, None)
        own_build = _rcpt_builder(msg_id, sender, sender_device, kind, ids, recipient)
        items = [
            (device_key(user, device), build if i < recipient_targets else own_build)
            for i, (user, device) in enumerate(targets)
        ]
        return self.enqueue(session, msg_id, items, targets, now)

    def rcpt_parts(self, session: Session, stanza: dict) -> tuple:
        """A ``rcpt``'s fields, checked: (id, kind, ids, recipient's provider, recipient)."""
        msg_id = stanza_id(stanza, "rcpt")
        kind = stanza.get("kind")
        if kind not in RECEIPT_KINDS:
            raise StanzaError("rcpt needs 'kind': 'delivered' or 'read'")
        ids = stanza.get("ids")
        if type(ids) is not list or not 1 <= len(ids) <= MAX_RECEIPT_IDS or not all(
            type(i) is bytes and len(i) == ID_BYTES for i in ids
        ):
            raise StanzaError(f"rcpt needs 'ids': 1..{MAX_RECEIPT_IDS} message ids of 16 bytes")
        recipient_provider, recipient = self._recipient(stanza.get("to"))
        if recipient == session.identity.user:
            raise RouteError("receipts go to the sender of the messages, not to yourself", code="bad_stanza")
        return msg_id, kind, ids, recipient_provider, recipient

    def route_state(self, session: Session, stanza: dict, state: str) -> None:
        """1:1 typing state (already charged and checked): ephemeral, never stored, pushed to the
        recipient's online devices."""
        identity = session.identity
        # Typing state is answered with not_opted_in or bad_stanza only (docs/protocol.md §6):
        # nobody under an unregistered provider accepts the sender's provider.
        recipient_provider, recipient = self._recipient(stanza.get("to"), unknown_code="not_opted_in")
        if not self.policy.allows(recipient, recipient_provider, identity.provider):
            raise RouteError(f"{recipient} does not accept typing state from users of {identity.provider!r}", code="not_opted_in")
        if recipient == identity.user or self.policy.blocks(recipient, identity.user):
            return
        encoded = encode_stanza({"t": "state", "from": identity.user, "s": state})
        for device in self.store.devices(recipient):
            target = self.sessions.get((recipient, device))
            if target is not None:
                self.push_encoded(target, encoded)

    def _reachable_devices(self, recipient_provider, recipient: str, identity, what: str) -> tuple[int, ...]:
        """The recipient's devices, if the recipient accepts the sender's provider (consent)."""
        if not self.policy.allows(recipient, recipient_provider, identity.provider):
            raise RouteError(f"{recipient} does not accept {what} from users of {identity.provider!r}", code="not_opted_in")
        devices = self.store.devices(recipient)
        if not devices:
            raise RouteError(f"no user {recipient} is known to this gateway", code="unknown_recipient")
        return devices

    def enqueue(self, session: Session, msg_id: bytes, items: list, targets: list, now: float) -> MessageEntry:
        """Add a stored stanza to this turn's batch; its sender is acked after the commit.
        ``targets[i]`` is the (user, device) of ``items[i]``."""
        message = self._batch.add_message(device_key(*session.session_key), msg_id, int(now * 1000), items)
        self._waiting.append((session, message, targets))
        if self.push_devices:
            self._wake_offline(items, targets)
        return message

    def enqueue_control(
        self, session: Session, reply: dict, now: float, items=(), targets=(), group: GroupWrite | None = None,
    ) -> ControlEntry:
        """Add a control entry to this turn's batch: a group write (if any) and the items that
        announce it, all in the commit's one transaction; ``reply`` (an ``iq`` ``res``) is sent
        after the commit, in order with the acks of the same batch."""
        entry = self._batch.add_control(int(now * 1000), list(items), group, reply)
        self._waiting.append((session, entry, list(targets)))
        if self.push_devices:
            self._wake_offline(items, targets)
        return entry

    def attach_outbox(self, entry, entries: list) -> None:
        """A cluster's group home: ``entries`` ([(node, seq, packed, record)]) are written to the
        outbox with ``entry`` (``core/domain/outbox.py``)."""
        entry.outbox = entries
        self._batch.outboxed.append(entry)

    def forget_outbox(self, node: str, upto: int) -> None:
        """``node`` stored the outbox entries up to ``upto``: the next commit deletes them."""
        acked = self._batch.outbox_acked
        if upto > acked.get(node, 0):
            acked[node] = upto

    def _wake_offline(self, items, targets) -> None:
        """The registered devices among ``targets`` that have no session: the commit writes a
        push intent for each that holds items and owes none yet. (``items[i][0]`` is already
        ``targets[i]``'s device key.)"""
        push_devices, sessions, wake = self.push_devices, self.sessions, self._batch.push_wake
        for item, target in zip(items, targets):
            if target in push_devices and target not in sessions:
                wake.add(item[0])

    def push_answered(self, dkey: bytes, counter: int, again: bool) -> None:
        """The provider answered the push ``counter`` of ``dkey`` (or refused it for good): the
        next commit deletes its intent, and with ``again`` owes a new one if items wait."""
        self._batch.push_done.append((dkey, counter, again))

    def enqueue_prekey_take(self, session: Session, reply: dict, user: str, devices, now: float) -> None:
        """A ``keys.get`` whose one-time prekeys are taken in this turn's commit (one fsync for
        every request of the turn); ``reply`` gets the ``bundles`` the commit took and is sent
        after it."""
        self._waiting.append((session, self._batch.add_prekey_take(user, devices, reply), []))

    def handle_recv(self, session: Session, stanza: dict, now: float) -> None:
        seqs = stanza.get("seq")
        if type(seqs) is not list or len(seqs) > MAX_RECV_SEQS or not all(type(s) is int and s > 0 for s in seqs):
            raise StanzaError(f"recv needs 'seq': a list of at most {MAX_RECV_SEQS} positive ints")
        if not seqs:
            return
        received = self.delivery.received(session, seqs)
        if received:
            self._batch.delete(device_key(*session.session_key), received)
            self.delivery.refill(session)

    # -- the group commit, driven by the edge

    @property
    def has_batch(self) -> bool:
        """Writes wait for a commit."""
        return bool(self._batch)

    @property
    def pending_deletions(self) -> list[tuple[bytes, list[int]]]:
        """The received items the next commit deletes: (device key, seqs)."""
        return self._batch.deletions

    @property
    def batch_only_deletions(self) -> bool:
        """The waiting writes are ``recv`` deletions only (the edge may let them wait for company)."""
        return self._batch.only_deletions

    @property
    def pending_load(self) -> int:
        """The load of the batch waiting for the next commit (``WriteBatch.load``: admission
        control's signal)."""
        return self._batch.load

    def take_batch(self) -> Commit | None:
        """This turn's writes, for the edge to commit in one transaction (None: nothing to write)."""
        if not self._batch:
            return None
        commit = Commit(self._batch, self._waiting)
        self._batch, self._waiting = WriteBatch(), []
        return commit

    def failed(self, commit: Commit, exc: InterlinkError) -> list[tuple[GroupWrite, bool]]:
        """The commit wrote nothing: every sender gets ``err``. Returns the group writes it held,
        each with False (not written), for the groups to forget."""
        settled = []
        self._carry_push(commit.batch)
        # Received items: their sessions dropped them from the push window, so the next commit
        # deletes them (a recv's deletion often rides on a message's commit: core/edge/commit.py)
        # — once: after a second failure they stay stored and are pushed again at the next session.
        carried = commit.batch.deletions[commit.batch.carried:]
        self._batch.deletions[:0] = carried
        self._batch.carried = len(carried)
        for node, upto in commit.batch.outbox_acked.items():  # confirmed still: deleted by the next commit
            self.forget_outbox(node, upto)
        for session, entry, _ in commit.waiting:
            if type(entry) is MessageEntry:
                self.answer(session, {"t": "err", "code": exc.code, "msg": exc.message, "ref": entry.msg_id})
                continue
            if type(entry) is ControlEntry and entry.group is not None:
                settled.append((entry.group, False))
            self.answer(session, {"t": "err", "code": exc.code, "msg": exc.message, "id": entry.reply["id"]})
        return settled

    def committed(self, commit: Commit) -> list[tuple[GroupWrite, bool]]:
        """The commit is durable: answer every sender and push what was stored to the online
        devices. Returns the group writes it held, each with whether it was written."""
        settled = []
        self.counters["commits"] += 1
        sessions = self.sessions
        push_new = self.delivery.push_new
        for session, entry, targets in commit.waiting:
            if type(entry) is not MessageEntry:
                if type(entry) is PrekeyTake:
                    entry.reply["bundles"] = entry.bundles  # taken in the commit, answered after it
                    self.answer(session, entry.reply)
                    continue
                if entry.group is not None:
                    settled.append((entry.group, entry.refused is None))
                self._control_committed(session, entry, targets)
                continue
            if entry.refused is not None:
                if entry.refused == "out_of_order":  # a group home's outbox entry: it sends it again
                    self.answer(session, _OUT_OF_ORDER | {"ref": entry.msg_id})
                    continue
                if entry.refused == "conflict":  # built from a group change that failed
                    self.answer(session, {
                        "t": "err", "code": "overloaded", "ref": entry.msg_id,
                        "msg": "the group changed while this message waited; nothing was stored, resend it",
                    })
                    continue
                self.answer(session, {
                    "t": "err", "code": entry.refused, "ref": entry.msg_id,
                    "msg": "a recipient mailbox is full; nothing was stored",
                })
                continue
            if entry.kept is not None:  # a group message skipped devices whose mailbox is full
                targets = [targets[i] for i in entry.kept]
            if entry.dropped_full:
                self.counters["group_copies_dropped_full"] += entry.dropped_full
            if entry.dup:
                self.counters["duplicates"] += 1
            else:
                self.counters["messages_stored"] += 1
            self.push_encoded(session, encode_ack(entry.msg_id, entry.ts_ms, entry.dup))
            for (_, seq, value), target in zip(entry.stored, targets):
                recipient = sessions.get(target)
                if recipient is not None:
                    push_new(recipient, seq, value)
        batch = commit.batch
        if self.push_sender is not None and (batch.push_created or batch.push_existing):
            created, existing = self._offline(batch.push_created), self._offline(batch.push_existing)
            if created or existing:
                self.push_sender.owed(created, existing)
        return settled

    def _offline(self, intents: list) -> list:
        """The intents whose device has no session now (one may have connected while the commit
        was written on the writer thread: its cancel is in the next batch)."""
        sessions = self.sessions
        kept = []
        for intent in intents:
            key = split_device_key(intent[0])
            if key in sessions:
                self._batch.push_cancel.add(intent[0])
            else:
                kept.append(intent)
        return kept

    def _carry_push(self, failed: WriteBatch) -> None:
        """A commit that wrote nothing: its push changes go into the next batch, behind nothing
        that came after them (a wake is dropped if the device connected since)."""
        batch = self._batch
        batch.push_done[:0] = failed.push_done
        batch.push_cancel |= failed.push_cancel
        batch.push_wake |= failed.push_wake - batch.push_cancel

    def _control_committed(self, session: Session, entry: ControlEntry, targets: list) -> None:
        if entry.refused == "out_of_order":
            self.answer(session, _OUT_OF_ORDER | {"id": entry.reply["id"]})
            return
        if entry.refused is not None:
            self.answer(session, {
                "t": "err", "code": "overloaded", "id": entry.reply["id"],
                "msg": "the group changed while this request waited (an earlier change failed); nothing was changed, try again",
            })
            return
        if entry.group is not None:
            self.counters["group_changes"] += 1
        if entry.kept is not None:  # events skipped for mailboxes past the control overdraft
            targets = [targets[i] for i in entry.kept]
        if entry.dropped_full:
            self.counters["group_events_dropped_full"] += entry.dropped_full
        self.answer(session, entry.reply)
        sessions = self.sessions
        push_new = self.delivery.push_new
        for (_, seq, value), target in zip(entry.stored, targets):
            recipient = sessions.get(target)
            if recipient is not None:
                push_new(recipient, seq, value)

    # -- output

    def answer(self, session: Session, stanza: dict) -> int:
        """Send a stanza to a session, unless it ended meanwhile; returns its encoded size."""
        if session.closed:
            return 0
        encoded = encode_stanza(stanza)
        session.send_encoded(encoded)
        self.touched.add(session)
        return len(encoded)

    def push_encoded(self, session: Session, encoded: bytes) -> None:
        """Send an already-encoded stanza (typing state: encoded once, sent to many)."""
        if not session.closed:
            session.send_encoded(encoded)
            self.touched.add(session)

    # -- helpers

    def address_provider(self, address: str) -> str | None:
        """The provider id of ``address`` if it is a user address ``localpart@provider``, else
        None; checked once per address (remembered: every routed stanza names one)."""
        provider_id = self._valid_addresses.get(address)
        if provider_id is None:
            localpart, at, provider_id = address.rpartition("@")
            if not at or localpart_error(localpart) is not None:
                return None
            # Remember only what can be an address of a registered provider: a long made-up
            # provider part (up to a frame) would otherwise make this memory a client's to fill.
            if len(address) <= MAX_ADDRESS_CHARS:
                if len(self._valid_addresses) >= VALID_ADDRESSES_KEPT:
                    del self._valid_addresses[next(iter(self._valid_addresses))]
                self._valid_addresses[address] = provider_id
        return provider_id

    def _recipient(self, to, unknown_code: str = "unknown_recipient") -> tuple:
        if type(to) is not str:
            raise StanzaError("'to' must be a user address 'localpart@provider'")
        provider_id = self.address_provider(to)
        if provider_id is None:
            raise StanzaError(f"'to' is not a user address: {excerpt(to)}")
        provider = self.registry.get(provider_id)
        if provider is None:
            raise RouteError(f"no provider {excerpt(provider_id)} is registered here", code=unknown_code)
        return provider, to


def stanza_id(stanza: dict, kind: str) -> bytes:
    """The 16-byte ``id`` of a ``msg`` or ``rcpt`` (``bad_stanza`` otherwise)."""
    stanza_id = stanza.get("id")
    if type(stanza_id) is not bytes or len(stanza_id) != ID_BYTES:
        raise StanzaError(f"{kind} needs 'id': 16 bytes")
    return stanza_id


def typing_state(stanza: dict) -> str:
    """The ``s`` of a ``state`` stanza (``bad_stanza`` unless composing or paused)."""
    state = stanza.get("s")
    if state not in TYPING_STATES:
        raise StanzaError("state needs 's': 'composing' or 'paused'")
    return state


def _device_map(value, name: str, max_ciphertext_bytes: int) -> dict[int, bytes]:
    if type(value) is not dict or not value:
        raise StanzaError(f"msg needs '{name}': a non-empty map of device -> ciphertext")
    for device, ciphertext in value.items():
        if type(device) is not int or not 1 <= device <= MAX_DEVICE_ID:
            raise StanzaError(f"'{name}' keys must be device numbers 1..2^31-1")
        if type(ciphertext) is not bytes or not ciphertext:
            raise StanzaError(f"'{name}' values must be non-empty bin")
        if len(ciphertext) > max_ciphertext_bytes:
            raise RouteError(
                f"a ciphertext of {len(ciphertext)} bytes is over the {max_ciphertext_bytes}-byte limit", code="too_large"
            )
    return value


def check_devices(given: dict, registered, name: str) -> None:
    """``device_mismatch`` unless ``given`` names exactly the ``registered`` devices."""
    if len(given) == len(registered):  # the usual case, without building a set
        for device in registered:
            if device not in given:
                break
        else:
            return
    registered_set = set(registered)
    if given.keys() == registered_set:
        return
    missing = sorted(registered_set - given.keys())
    extra = sorted(given.keys() - registered_set)
    if missing or extra:
        raise RouteError(
            f"'{name}' does not match the registered devices", code="device_mismatch", missing=missing, extra=extra
        )


def _rcpt_builder(msg_id: bytes, sender: str, sender_device: int, kind: str, ids: list, to: str | None):
    """Encodes a receipt's ``dlv`` once its seq and timestamp are known."""

    def build(seq: int, ts_ms: int) -> bytes:
        stanza = {"t": "dlv", "seq": seq, "k": "rcpt", "id": msg_id, "from": sender, "dev": sender_device, "ts": ts_ms, "kind": kind, "ids": ids}
        if to is not None:
            stanza["to"] = to
        return encode_stanza(stanza)

    return build


def _dlv_builder(msg_id: bytes, sender: str, sender_device: int, ciphertext: bytes, to: str | None):
    """Encodes the ``dlv`` once its seq and timestamp are known (inside the commit)."""

    def build(seq: int, ts_ms: int) -> bytes:
        return encode_dlv(seq, msg_id, sender, sender_device, ts_ms, ciphertext, to)

    return build
