"""Routing of messages through durable per-device mailboxes (PROTOCOL §4–§6).

The router validates ``msg`` and ``recv`` stanzas, batches the writes of one event-loop turn into
one store transaction (group commit), and only after that commit acks the senders and pushes
``dlv`` to the recipients' devices that are online. Each online device has at most ``window``
pushed-but-unreceived items; ``recv`` deletes items and lets more flow. A device that connects
gets its stored items again from the start: delivery is at least once, clients drop duplicates
by (``from``, ``id``).

The router never looks inside ``c``: ciphertexts are opaque bytes it stores and forwards.

Group messages, group typing and the ``group.*`` operations are decided by ``core/groups.py``
(``Router.groups``); their writes go through this router's batch too: a group ``msg`` like a 1:1
one, a membership change as a *control* entry (``enqueue_control``: the group record, its event
items and the ``iq`` answer, sent after the commit like an ``ack``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from typing import TYPE_CHECKING

from interlink.core.auth import ProviderRegistry, localpart_error
from interlink.core.errors import InterlinkError, StanzaError
from interlink.core.metrics import COMMIT_BUCKETS_S, Histogram
from interlink.core.policy import Policy
from interlink.core.ratelimit import TokenBuckets
from interlink.core.stanza import encode_stanza
from interlink.core.store import GroupWrite, Store, StoredMessage, WriteBatch, device_key
from interlink.core.wire import MAX_DEVICE_ID, TAG_BYTES

if TYPE_CHECKING:
    from interlink.core.server import GatewayProtocol

log = logging.getLogger("interlink.router")

ID_BYTES = 16
MAX_RECV_SEQS = 1024  # seqs one ``recv`` may name
DLV_OVERHEAD_BYTES = 512  # a dlv's fields besides the ciphertext (addresses, seq, ts, ...), at most
MAX_RECEIPT_IDS = 100  # message ids one rcpt may name
VALID_ADDRESSES_KEPT = 65_536  # recipient addresses already checked, remembered (about 100 bytes each)
RECEIPT_KINDS = ("delivered", "read")
TYPING_STATES = ("composing", "paused")


class RouteError(InterlinkError):
    """A refused stanza: answered with ``err`` ``code`` (and ``fields``); the session continues."""

    def __init__(self, message: str, *, code: str, **fields) -> None:
        super().__init__(message, code=code)
        self.fields = fields


class Delivery:
    """Push state of one online device session that has stored items."""

    __slots__ = ("inflight", "cursor", "backlog")

    def __init__(self, backlog: bool) -> None:
        self.inflight: set[int] = set()  # seqs pushed on this connection and not yet received
        self.cursor = 0  # highest seq pushed on this connection
        self.backlog = backlog  # the store may hold items after cursor that were not pushed


class Router:
    """1:1 routing: validation, consent, group commit, acks and windowed delivery."""

    def __init__(
        self,
        *,
        store: Store,
        registry: ProviderRegistry,
        sessions: dict,
        paused: dict,
        window: int,
        max_frame_bytes: int,
        policy: Policy,
        message_rate_per_device: float = 500.0,
        message_rate_per_user: float = 1000.0,
        commit_executor: concurrent.futures.Executor | None = None,
        clock=time.time,
    ) -> None:
        self.store = store
        # None: commit inline on the loop. A single-thread executor: commit there (py-lmdb
        # releases the GIL while committing) while the loop gathers the next batch.
        self.commit_executor = commit_executor
        self._committing = False
        self._inflight: asyncio.Future | None = None  # the writer thread's running commit
        self.policy = policy
        # Stored traffic (msg, rcpt) and typing state, per device session and per user; the burst
        # is two seconds' worth.
        self.device_buckets = TokenBuckets(2 * message_rate_per_device, message_rate_per_device)
        self.user_buckets = TokenBuckets(2 * message_rate_per_user, message_rate_per_user)
        # Every dlv must fit in one frame the recipient accepts.
        self.max_ciphertext_bytes = max_frame_bytes - TAG_BYTES - DLV_OVERHEAD_BYTES
        self.registry = registry
        self.sessions = sessions  # (user, device) -> GatewayProtocol, owned by the server
        self.paused = paused  # GatewayProtocol -> since when its peer stopped reading, owned by the server
        self.window = window
        self.clock = clock
        self.deliveries: dict[GatewayProtocol, Delivery] = {}  # only sessions with stored items
        self._batch = WriteBatch()
        # Senders owed an ack, with each stored item's (user, device), the session-table key.
        self._waiting: list[tuple[GatewayProtocol, StoredMessage, list]] = []
        self._valid_addresses: dict[str, str] = {}  # address -> its provider id (syntax checked)
        self._commit_scheduled = False
        self.groups = None  # core.groups.Groups, set by the server: group msg, state and operations
        self.commit_seconds = Histogram(COMMIT_BUCKETS_S)  # group-commit latency, for /metrics
        self.counters = {
            "messages_stored": 0, "deliveries_pushed": 0, "commits": 0, "duplicates": 0, "group_changes": 0,
            "group_copies_dropped_full": 0, "group_events_dropped_full": 0,
        }

    # -- sessions

    def session_opened(self, proto: GatewayProtocol) -> int:
        """Start pushing a freshly opened session's stored items; returns how many are stored."""
        dkey = device_key(*proto.session_key)
        pending = self.store.pending_count(dkey)
        if pending:
            self.deliveries[proto] = Delivery(backlog=True)
        return pending

    def push_stored(self, proto: GatewayProtocol) -> None:
        """Push what the window allows from the store: after ``welcome``, and when a peer that
        stopped reading reads again."""
        if proto in self.deliveries:
            self._refill(proto)

    def session_closed(self, proto: GatewayProtocol) -> None:
        self.deliveries.pop(proto, None)

    # -- stanzas

    def _charge(self, proto: GatewayProtocol, tokens: int = 1) -> None:
        """Spend ``tokens`` tokens of the session's and the user's bucket, or refuse (``rate_limited``;
        the tokens spent before the refusal stay spent)."""
        now = self.clock()
        device_buckets, user_buckets = self.device_buckets, self.user_buckets
        session_key, user = proto.session_key, proto.session_key[0]
        wait_s = 0.0
        for _ in range(tokens):
            wait_s = device_buckets.take(session_key, now) or user_buckets.take(user, now)
            if wait_s:
                break
        if wait_s:
            retry_after = max(1, math.ceil(wait_s * 1000))
            raise RouteError(f"too many messages; try again in {retry_after} ms", code="rate_limited", retry_after=retry_after)

    def handle_msg(self, proto: GatewayProtocol, stanza: dict) -> None:
        self._charge(proto)
        identity = proto.conn.identity
        msg_id = _stanza_id(stanza, "msg")
        if "g" in stanza:
            if self.groups is None:
                raise RouteError("group messages are not served by this gateway", code="bad_stanza")
            self.groups.route_msg(proto, stanza, msg_id)
            return
        recipient_provider, recipient = self._recipient(stanza.get("to"))
        if recipient == identity.user:
            raise RouteError("to reach your own other devices, use 'own'", code="bad_stanza")
        ciphertexts = _device_map(stanza.get("c"), "c", self.max_ciphertext_bytes)
        own = stanza.get("own")
        own = _device_map(own, "own", self.max_ciphertext_bytes) if own is not None else None
        devices = self._reachable_devices(recipient_provider, recipient, identity, "messages")
        _check_devices(ciphertexts, devices, "c")
        sender, sender_device = identity.user, identity.device
        items, targets = [], []
        # A blocked sender is answered like any other and nothing reaches the recipient; the
        # sender's own copies are still stored (its other devices show what it sent).
        if not self.policy.blocks(recipient, sender):
            for device, ciphertext in ciphertexts.items():
                items.append((device_key(recipient, device), _dlv_builder(msg_id, sender, sender_device, ciphertext, None)))
                targets.append((recipient, device))
        if own is not None:
            others = [d for d in self.store.devices(sender) if d != sender_device]
            _check_devices(own, others, "own")
            for device, ciphertext in own.items():
                items.append((device_key(sender, device), _dlv_builder(msg_id, sender, sender_device, ciphertext, recipient)))
                targets.append((sender, device))
        self._enqueue(proto, msg_id, items, targets)

    def handle_rcpt(self, proto: GatewayProtocol, stanza: dict) -> None:
        """A receipt is stored and delivered like a message, to every device of ``to`` and (with
        ``to``) to the sender's other devices, so they can mark the messages too."""
        self._charge(proto)
        identity = proto.conn.identity
        msg_id = _stanza_id(stanza, "rcpt")
        kind = stanza.get("kind")
        if kind not in RECEIPT_KINDS:
            raise StanzaError("rcpt needs 'kind': 'delivered' or 'read'")
        ids = stanza.get("ids")
        if type(ids) is not list or not 1 <= len(ids) <= MAX_RECEIPT_IDS or not all(
            type(i) is bytes and len(i) == ID_BYTES for i in ids
        ):
            raise StanzaError(f"rcpt needs 'ids': 1..{MAX_RECEIPT_IDS} message ids of 16 bytes")
        recipient_provider, recipient = self._recipient(stanza.get("to"))
        if recipient == identity.user:
            raise RouteError("receipts go to the sender of the messages, not to yourself", code="bad_stanza")
        devices = self._reachable_devices(recipient_provider, recipient, identity, "receipts")
        sender, sender_device = identity.user, identity.device
        targets = []
        if not self.policy.blocks(recipient, sender):
            targets += [(recipient, device) for device in devices]
        recipient_targets = len(targets)
        targets += [(sender, device) for device in self.store.devices(sender) if device != sender_device]
        build = _rcpt_builder(msg_id, sender, sender_device, kind, ids, None)
        own_build = _rcpt_builder(msg_id, sender, sender_device, kind, ids, recipient)
        items = [
            (device_key(user, device), build if i < recipient_targets else own_build)
            for i, (user, device) in enumerate(targets)
        ]
        self._enqueue(proto, msg_id, items, targets)

    def handle_state(self, proto: GatewayProtocol, stanza: dict) -> None:
        """Typing state: ephemeral, never stored, pushed to the recipient's online devices."""
        self._charge(proto)
        identity = proto.conn.identity
        state = stanza.get("s")
        if state not in TYPING_STATES:
            raise StanzaError("state needs 's': 'composing' or 'paused'")
        if "g" in stanza:
            if self.groups is None:
                raise RouteError("group typing state is not served by this gateway", code="bad_stanza")
            self.groups.route_state(proto, stanza, state)
            return
        # Typing state is answered with not_opted_in or bad_stanza only (PROTOCOL §6): nobody under
        # an unregistered provider accepts the sender's provider.
        recipient_provider, recipient = self._recipient(stanza.get("to"), unknown_code="not_opted_in")
        if not self.policy.allows(recipient, recipient_provider, identity.provider):
            raise RouteError(f"{recipient} does not accept typing state from users of {identity.provider!r}", code="not_opted_in")
        if recipient == identity.user or self.policy.blocks(recipient, identity.user):
            return
        encoded = encode_stanza({"t": "state", "from": identity.user, "s": state})
        for device in self.store.devices(recipient):
            target = self.sessions.get((recipient, device))
            if target is not None and not target.conn.closed:
                target.conn.send_encoded(encoded)
                target.flush()

    def _reachable_devices(self, recipient_provider, recipient: str, identity, what: str) -> tuple[int, ...]:
        """The recipient's devices, if the recipient accepts the sender's provider (consent)."""
        if not self.policy.allows(recipient, recipient_provider, identity.provider):
            raise RouteError(f"{recipient} does not accept {what} from users of {identity.provider!r}", code="not_opted_in")
        devices = self.store.devices(recipient)
        if not devices:
            raise RouteError(f"no user {recipient} is known to this gateway", code="unknown_recipient")
        return devices

    def _enqueue(self, proto: GatewayProtocol, msg_id: bytes, items: list, targets: list) -> StoredMessage:
        """Add a stored stanza to this turn's batch; its sender is acked after the commit.
        ``targets[i]`` is the (user, device) of ``items[i]``."""
        message = self._batch.add_message(device_key(*proto.session_key), msg_id, int(self.clock() * 1000), items)
        self._waiting.append((proto, message, targets))
        self._schedule_commit()
        return message

    def enqueue_control(
        self, proto: GatewayProtocol, reply: dict, items=(), targets=(), group: GroupWrite | None = None,
        event_id: bytes = b"",
    ) -> StoredMessage:
        """Add a control entry to this turn's batch: a group write (if any) and the items that
        announce it, all in the commit's one transaction; ``reply`` (an ``iq`` ``res``) is sent
        after the commit, in order with the acks of the same batch."""
        message = self._batch.add_control(
            device_key(*proto.session_key), event_id, int(self.clock() * 1000), list(items), group
        )
        message.reply = reply
        self._waiting.append((proto, message, list(targets)))
        self._schedule_commit()
        return message

    def enqueue_prekey_take(self, proto: GatewayProtocol, reply: dict, user: str, devices) -> None:
        """A ``keys.get`` whose one-time prekeys are taken in this turn's commit (one fsync for
        every request of the turn); ``reply`` gets its ``bundles`` there and is sent after it."""
        message = self._batch.take_prekeys(device_key(*proto.session_key), int(self.clock() * 1000), user, devices, reply)
        self._waiting.append((proto, message, []))
        self._schedule_commit()

    def handle_recv(self, proto: GatewayProtocol, stanza: dict) -> None:
        seqs = stanza.get("seq")
        if type(seqs) is not list or len(seqs) > MAX_RECV_SEQS or not all(type(s) is int and s > 0 for s in seqs):
            raise StanzaError(f"recv needs 'seq': a list of at most {MAX_RECV_SEQS} positive ints")
        delivery = self.deliveries.get(proto)
        if delivery is None or not seqs:
            return
        received = [seq for seq in seqs if seq in delivery.inflight]
        if not received:
            return
        delivery.inflight.difference_update(received)
        self._batch.delete(device_key(*proto.session_key), received)
        self._schedule_commit()
        self._refill(proto)

    # -- group commit

    def _schedule_commit(self) -> None:
        if not self._commit_scheduled:
            self._commit_scheduled = True
            # Runs after every callback already queued for this loop turn: the reads that are
            # ready now all join this one transaction.
            asyncio.get_running_loop().call_soon(self.commit)

    def commit(self) -> None:
        """Write the pending batch in one transaction, then ack and push what it stored."""
        self._commit_scheduled = False
        if self._committing:
            return  # one commit at a time, in order; the running one schedules the next
        batch, waiting = self._batch, self._waiting
        if not batch:
            return
        self._batch, self._waiting = WriteBatch(), []
        if self.commit_executor is None:
            started = time.perf_counter()
            try:
                self.store.commit(batch)
            except InterlinkError as exc:
                self._failed(exc, batch, waiting)
                return
            except Exception:  # a storage fault nobody foresaw: answer every waiter, keep serving
                log.exception("commit failed")
                self._failed(InterlinkError("the gateway could not store the message"), batch, waiting)
                return
            self.commit_seconds.observe(time.perf_counter() - started)
            self._committed(waiting)
            return
        self._committing = True
        future = asyncio.get_running_loop().run_in_executor(self.commit_executor, self._timed_commit, batch)
        future.add_done_callback(lambda done: self._thread_committed(done, batch, waiting))
        self._inflight = future

    async def settle(self) -> None:
        """Commit everything still batched or in flight (drain calls this before the store closes)."""
        while self._committing or self._batch:
            if self._committing and self._inflight is not None:
                await asyncio.wait([self._inflight])
                await asyncio.sleep(0)  # let its done-callback run (acks, next batch)
            elif self._batch:
                self.commit()

    def _timed_commit(self, batch: WriteBatch) -> float:
        """The writer thread's job: the commit, and how long it took."""
        started = time.perf_counter()
        self.store.commit(batch)
        return time.perf_counter() - started

    def _thread_committed(self, done: asyncio.Future, batch: WriteBatch, waiting: list) -> None:
        self._committing = False
        error = done.exception()
        if error is None:
            self.commit_seconds.observe(done.result())  # observed on the loop, not the thread
            self._committed(waiting)
        elif isinstance(error, InterlinkError):
            self._failed(error, batch, waiting)
        else:
            log.error("commit failed", exc_info=error)
            self._failed(InterlinkError("the gateway could not store the message"), batch, waiting)
        if self._batch:
            self._schedule_commit()

    def _failed(self, exc: InterlinkError, batch: WriteBatch, waiting: list) -> None:
        log.error("commit of %d messages failed: %s", len(batch.messages), exc)
        touched: set = set()
        for proto, message, _ in waiting:
            if message.control:
                if message.group is not None and self.groups is not None:
                    self.groups.settled(message.group, False)
                self._answer(proto, touched, {"t": "err", "code": exc.code, "msg": exc.message, "id": message.reply["id"]})
                continue
            self._answer(proto, touched, {"t": "err", "code": exc.code, "msg": exc.message, "ref": message.msg_id})
        self._flush(touched)

    def _committed(self, waiting: list) -> None:
        touched: set = set()
        self.counters["commits"] += 1
        sessions = self.sessions
        for proto, message, targets in waiting:
            if message.control:
                self._control_committed(proto, message, targets, touched)
                continue
            if message.refused is not None:
                if message.refused == "conflict":  # built from a group change that failed
                    self._answer(proto, touched, {
                        "t": "err", "code": "overloaded", "ref": message.msg_id,
                        "msg": "the group changed while this message waited; nothing was stored, resend it",
                    })
                    continue
                self._answer(proto, touched, {
                    "t": "err", "code": message.refused, "ref": message.msg_id,
                    "msg": "a recipient mailbox is full; nothing was stored",
                })
                continue
            if message.kept is not None:  # a group message skipped devices whose mailbox is full
                targets = [targets[i] for i in message.kept]
            if message.dropped_full:
                self.counters["group_copies_dropped_full"] += message.dropped_full
            ack = {"t": "ack", "id": message.msg_id, "ts": message.ts_ms}
            if message.dup:
                ack["dup"] = True
                self.counters["duplicates"] += 1
            else:
                self.counters["messages_stored"] += 1
            self._answer(proto, touched, ack)
            for (_, seq, value), target in zip(message.stored, targets):
                recipient = sessions.get(target)
                if recipient is not None:
                    self._push_new(recipient, seq, value, touched)
        self._flush(touched)

    def _control_committed(self, proto: GatewayProtocol, message: StoredMessage, targets: list, touched: set) -> None:
        if message.group is not None and self.groups is not None:
            self.groups.settled(message.group, message.refused is None)
        if message.refused is not None:
            self._answer(proto, touched, {
                "t": "err", "code": "overloaded", "id": message.reply["id"],
                "msg": "the group changed while this request waited (an earlier change failed); nothing was changed, try again",
            })
            return
        if message.group is not None:
            self.counters["group_changes"] += 1
        if message.kept is not None:  # events skipped for mailboxes past the control overdraft
            targets = [targets[i] for i in message.kept]
        if message.dropped_full:
            self.counters["group_events_dropped_full"] += message.dropped_full
        self._answer(proto, touched, message.reply)
        sessions = self.sessions
        for (_, seq, value), target in zip(message.stored, targets):
            recipient = sessions.get(target)
            if recipient is not None:
                self._push_new(recipient, seq, value, touched)

    # -- delivery

    def _push_new(self, proto: GatewayProtocol, seq: int, value: bytes, touched: set) -> None:
        """Push a just-stored item to its device's online session, if the window allows."""
        delivery = self.deliveries.get(proto)
        if delivery is None:
            delivery = self.deliveries[proto] = Delivery(backlog=False)
        if delivery.backlog or len(delivery.inflight) >= self.window or proto in self.paused:
            # Older items wait in the store, or the window is full: this one waits its turn
            # there too, and recv will bring it (order per device is seq order).
            delivery.backlog = True
            return
        delivery.inflight.add(seq)
        delivery.cursor = seq
        proto.conn.send_encoded(value)  # the encoded dlv from the commit: serialized once
        self.counters["deliveries_pushed"] += 1
        touched.add(proto)

    def _refill(self, proto: GatewayProtocol) -> None:
        delivery = self.deliveries.get(proto)
        if delivery is None:
            return
        room = self.window - len(delivery.inflight)
        if room > 0 and delivery.backlog and proto not in self.paused:
            items = self.store.pending(device_key(*proto.session_key), delivery.cursor, room)
            for seq, value in items:
                delivery.inflight.add(seq)
                delivery.cursor = seq
                proto.conn.send_encoded(value)
            self.counters["deliveries_pushed"] += len(items)
            delivery.backlog = len(items) == room  # a short read reached the end of the mailbox
        if not delivery.inflight and not delivery.backlog:
            del self.deliveries[proto]  # nothing stored any more: no state for idle sessions

    # -- helpers

    def _recipient(self, to, unknown_code: str = "unknown_recipient") -> tuple:
        if type(to) is not str:
            raise StanzaError("'to' must be a user address 'localpart@provider'")
        provider_id = self._valid_addresses.get(to)
        if provider_id is None:
            localpart, at, provider_id = to.rpartition("@")
            if not at or localpart_error(localpart) is not None:
                raise StanzaError(f"'to' is not a user address: {_excerpt(to)}")
            if len(self._valid_addresses) >= VALID_ADDRESSES_KEPT:
                del self._valid_addresses[next(iter(self._valid_addresses))]
            self._valid_addresses[to] = provider_id
        provider = self.registry.get(provider_id)
        if provider is None:
            raise RouteError(f"no provider {_excerpt(provider_id)} is registered here", code=unknown_code)
        return provider, to

    @staticmethod
    def _answer(proto, touched: set, stanza: dict) -> None:
        if proto.transport is not None and not proto.conn.closed:
            proto.conn.send_stanza(stanza)
            touched.add(proto)

    @staticmethod
    def _flush(touched: set) -> None:
        for proto in touched:
            proto.flush()


def _excerpt(text: str, limit: int = 32) -> str:
    """A client-supplied string made safe to quote back: printable, at most ``limit`` characters
    (an answer must not outgrow its request)."""
    shown = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return repr(shown + ("…" if len(text) > limit else ""))


def _stanza_id(stanza: dict, kind: str) -> bytes:
    stanza_id = stanza.get("id")
    if type(stanza_id) is not bytes or len(stanza_id) != ID_BYTES:
        raise StanzaError(f"{kind} needs 'id': 16 bytes")
    return stanza_id


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


def _check_devices(given: dict, registered, name: str) -> None:
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
        stanza = {"t": "dlv", "seq": seq, "k": "msg", "id": msg_id, "from": sender, "dev": sender_device, "ts": ts_ms, "c": ciphertext}
        if to is not None:
            stanza["to"] = to
        return encode_stanza(stanza)

    return build
