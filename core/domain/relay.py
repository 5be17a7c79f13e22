"""Cluster routing, sans-I/O (issue 18; docs/architecture.md "Cluster"): this node's sessions'
stanzas whose effect lies with a user homed on another node go there, and the stanzas other nodes
relay here are served as if their sender were connected here.

Every user has one home node (``Membership.home``), which keeps the user's devices, mailboxes,
consent, blocks and keys, and where the user's sessions live (a session opened elsewhere is
redirected before anything is stored). A ``msg``, ``rcpt`` or ``state`` to a user homed elsewhere,
and a ``devices.get`` or ``keys.get`` naming one, are *relayed* to that node: it runs the same
domain code for a ``RelayedSession`` (the sender's identity; its one answer goes back), commits
in its own group commit, then answers. The sender is answered only then, so an ``ack`` still
means every copy is durable, and a node that does not answer in time gets the sender ``err``
``overloaded`` with ``retry_after``, never an ``ack``. A resend is recognised where the copies
are stored: the recipient's node deduplicates on (sender device, id) as a single node does.

What the sender's own other devices get (``own`` copies, receipts' copies) is stored here, after
the recipient's node answered ``ack``: an ``err`` from there still means nothing was stored. A
device's stanzas that store such copies are settled in the order the device sent them, whatever
order the answers come back in (``_chains``), so its other devices see them in that order.

The edge moves the bytes (``core/edge/clusterlink.py``): ``take_output`` once per loop turn
(``wake`` asks for that turn), ``answered`` for each answer, ``serve`` for each
batch another node relayed, ``expire`` on a timer.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import msgpack

from interlink.core.domain.auth import Identity
from interlink.core.domain.cluster import Membership
from interlink.core.errors import InterlinkError, RouteError, StanzaError
from interlink.core.domain.router import check_devices, stanza_id, typing_state
from interlink.core.protocol.stanza import encode_stanza

# Operations whose answer lies with the user they name: served at that user's home node.
RELAYED_OPS = frozenset({"devices.get", "keys.get"})
# Not served across the nodes of a cluster yet (issue 18 goes on): refused with a clear answer
# rather than answered from this node's part of the state.
CLUSTER_LATER_OPS = frozenset({"group.new", "group.add", "group.del", "group.leave", "group.get", "dir.lookup"})
RELAY_KINDS = frozenset({"msg", "rcpt", "state", "iq"})
RETRY_AFTER_MS = 1000  # what a sender is told to wait after a node did not answer in time
HOMES_KEPT = 65_536  # user addresses whose home node is remembered
IDENTITIES_KEPT = 65_536  # senders of relayed stanzas whose identity is remembered

FORWARD, OWN, DEFERRED = 0, 1, 2  # what a pending entry waits for (see Pending)


def reference(stanza: dict) -> dict:
    """The field that ties an ``err`` to its request: ``id`` for ``iq``, ``ref`` for bin16 ids."""
    request_id = stanza.get("id")
    if stanza.get("t") == "iq" and type(request_id) is int:
        return {"id": request_id}
    if type(request_id) is bytes and len(request_id) == 16:
        return {"ref": request_id}
    return {}


class RelayedSession:
    """The sender of a relayed stanza, as the recipient's home node serves it: the sender's
    identity, and its one answer (``ack``, ``res`` or ``err``) goes back to the sender's node."""

    __slots__ = ("identity", "session_key", "max_plaintext_bytes", "answered", "_relay", "_node", "_seq")
    relayed = True
    closed = False

    def __init__(self, relay: Relay, node: str, seq: int, identity: Identity, max_plaintext_bytes: int) -> None:
        self.identity = identity
        self.session_key = (identity.user, identity.device)
        self.max_plaintext_bytes = max_plaintext_bytes
        self.answered = False
        self._relay, self._node, self._seq = relay, node, seq

    def send_encoded(self, encoded: bytes) -> None:
        if not self.answered:
            self.answered = True
            self._relay.reply(self._node, self._seq, encoded)


class Pending:
    """A stanza of this node's session waiting for another node (``FORWARD``: its answer goes to
    the session as it is; ``OWN``: on ``ack`` the sender's own copies are stored here first), or
    waiting behind one in its device's chain (``DEFERRED``: a local stanza storing own copies)."""

    __slots__ = ("session", "stanza", "kind", "node", "sent", "deadline", "answer", "done")

    def __init__(self, session, stanza: dict, kind: int, node: str | None, now: float, deadline: float) -> None:
        self.session = session
        self.stanza = stanza
        self.kind = kind
        self.node = node
        self.sent = now
        self.deadline = deadline
        self.answer: bytes | None = None  # the other node's encoded answer
        self.done = kind == DEFERRED  # answered (or timed out); a deferred entry waits for nothing


class _OwnCopies:
    """Stands in for the sender while its own copies are committed here, after the recipient's
    node acked: the sender then gets that node's ``ack`` — or this node's ``err``."""

    __slots__ = ("session", "identity", "session_key", "max_plaintext_bytes", "remote_answer", "router")
    relayed = False
    closed = False

    def __init__(self, session, remote_answer: bytes, router) -> None:
        self.session = session
        self.identity = session.identity
        self.session_key = session.session_key
        self.max_plaintext_bytes = session.max_plaintext_bytes
        self.remote_answer = remote_answer
        self.router = router

    def send_encoded(self, encoded: bytes) -> None:
        answer = msgpack.unpackb(encoded, raw=False)
        self.router.push_encoded(self.session, self.remote_answer if answer.get("t") == "ack" else encoded)


class Relay:
    """Which stanzas go to which node, what is waiting for an answer, and what this node owes others."""

    def __init__(self, *, membership: Membership, node: str, router, serve: Callable, timeout_s: float,
                 wake: Callable[[], None] | None = None) -> None:
        if node not in membership.nodes:
            raise ValueError(f"node {node!r} is not in the membership {list(membership.nodes)}")
        self.membership = membership
        self.node = node
        self.router = router
        self.store = router.store
        self.serve_stanza = serve  # the domain's dispatch: how a relayed stanza is served here
        self.timeout_s = timeout_s
        self.wake = wake  # asks the edge for a flush at the end of this loop turn
        self.outgoing: dict[str, list] = {}  # node -> records to relay there this turn
        self.replies: dict[str, list] = {}  # node -> [seq, encoded answer or None] owed there
        self.waiting: dict[int, Pending] = {}  # seq -> the stanza waiting for that answer
        self._deadlines: deque = deque()  # (deadline, seq), in deadline order (one timeout for all)
        self._chains: dict[tuple, deque] = {}  # session key -> its stanzas storing own copies, in order
        self._seq = 0
        self._flush_asked = False  # wake() was called and the edge has not flushed since
        self._homes: dict[str, str] = {}
        self._identities: dict[tuple, Identity] = {}
        self.counters = {"relayed": 0, "answered": 0, "timeouts": 0, "late_answers": 0, "served": 0,
                         "malformed": 0, "misrouted": 0}

    # -- where a user lives

    def home_of(self, address: str) -> str | None:
        """The node ``address`` is homed on, or None when it is this one."""
        node = self._homes.get(address)
        if node is None:
            node = self.membership.home(address)
            if len(self._homes) >= HOMES_KEPT:
                del self._homes[next(iter(self._homes))]
            self._homes[address] = node
        return None if node == self.node else node

    # -- this node's sessions

    def take(self, session, stanza: dict, now: float) -> bool:
        """Relay ``stanza`` of this node's ``session`` if its effect lies with another node's user
        (or hold it behind the device's stanzas that wait for one); False: serve it here as usual.
        Raises ``RouteError``/``StanzaError`` like the handlers, for the dispatcher to answer."""
        kind = stanza["t"]
        if kind == "iq":
            op = stanza.get("op")
            if op in CLUSTER_LATER_OPS:
                raise RouteError(f"{op} is not served across the nodes of a cluster yet", code="internal")
            user = stanza.get("user")
            if op not in RELAYED_OPS or type(user) is not str:
                return False
            node = self.home_of(user)
            if node is None:
                return False
            self._send(node, session, stanza, FORWARD, now)
            return True
        if "g" in stanza:
            raise RouteError("group messages are not served across the nodes of a cluster yet", code="internal")
        to = stanza.get("to")
        if type(to) is not str:
            return False  # the local handler answers bad_stanza
        node = self.home_of(to)
        router = self.router
        if node is None:
            # Here: only its place among the device's own copies may hold it back.
            if kind == "state" or session.session_key not in self._chains or (kind == "msg" and "own" not in stanza):
                return False
            router.charge(session, now)
            if kind == "msg":
                router.msg_parts(session, stanza)
                stanza_id(stanza, "msg")
            else:
                router.rcpt_parts(session, stanza)
            self._chain(Pending(session, stanza, DEFERRED, None, now, now))
            return True
        router.charge(session, now)
        if kind == "state":
            self._send(node, session, {"t": "state", "to": to, "s": typing_state(stanza)}, FORWARD, now)
            return True
        if kind == "msg":
            msg_id = stanza_id(stanza, "msg")
            _, _, ciphertexts, own = router.msg_parts(session, stanza)
            if own is not None:
                identity = session.identity
                check_devices(own, [d for d in self.store.devices(identity.user) if d != identity.device], "own")
            relayed = {"t": "msg", "id": msg_id, "to": to, "c": ciphertexts}
            stores_own = own is not None
        else:
            msg_id, receipt, ids, _, _ = router.rcpt_parts(session, stanza)
            relayed = {"t": "rcpt", "id": msg_id, "to": to, "kind": receipt, "ids": ids}
            identity = session.identity
            stores_own = any(d != identity.device for d in self.store.devices(identity.user))
        if stores_own or session.session_key in self._chains:
            self._chain(self._send(node, session, relayed, OWN, now, original=stanza))
        else:
            self._send(node, session, relayed, FORWARD, now)
        return True

    def _send(self, node: str, session, stanza: dict, kind: int, now: float, original: dict | None = None) -> Pending:
        self._seq += 1
        seq = self._seq
        identity = session.identity
        outgoing = self.outgoing.get(node)
        if outgoing is None:
            outgoing = self.outgoing[node] = []
            self._ask_flush()
        outgoing.append([seq, identity.provider, identity.localpart, identity.device, session.max_plaintext_bytes, stanza])
        pending = Pending(session, stanza if original is None else original, kind, node, now, now + self.timeout_s)
        self.waiting[seq] = pending
        self._deadlines.append((pending.deadline, seq))
        self.counters["relayed"] += 1
        return pending

    def _chain(self, pending: Pending) -> None:
        chain = self._chains.get(pending.session.session_key)
        if chain is None:
            chain = self._chains[pending.session.session_key] = deque()
        chain.append(pending)

    def answered(self, seq: int, answer: bytes | None, now: float) -> float | None:
        """Another node answered relayed stanza ``seq`` (None: a ``state`` it served silently).
        Returns the round trip in seconds, or None for an answer that came too late."""
        pending = self.waiting.pop(seq, None)
        if pending is None:
            self.counters["late_answers"] += 1
            return None
        self.counters["answered"] += 1
        self._settle(pending, answer, now)
        return now - pending.sent

    def expire(self, now: float) -> int:
        """Answer every stanza whose node has not answered by its deadline: ``err`` ``overloaded``
        with ``retry_after`` (nothing was acknowledged; a resend is recognised wherever its
        copies were stored). Returns how many; ``next_deadline`` says when to call again."""
        deadlines, waiting = self._deadlines, self.waiting
        expired = 0
        while deadlines and deadlines[0][0] <= now:
            _, seq = deadlines.popleft()
            pending = waiting.pop(seq, None)
            if pending is None:
                continue
            expired += 1
            answer = None
            if pending.stanza["t"] != "state":  # typing state is not answered unless refused
                answer = encode_stanza({
                    "t": "err", "code": "overloaded", "retry_after": RETRY_AFTER_MS, **reference(pending.stanza),
                    "msg": f"node {pending.node} did not answer in time; nothing was acknowledged, "
                           f"try again in {RETRY_AFTER_MS} ms",
                })
            self._settle(pending, answer, now)
        self.counters["timeouts"] += expired
        return expired

    @property
    def next_deadline(self) -> float | None:
        while self._deadlines and self._deadlines[0][1] not in self.waiting:
            self._deadlines.popleft()
        return self._deadlines[0][0] if self._deadlines else None

    def _settle(self, pending: Pending, answer: bytes | None, now: float) -> None:
        if pending.kind == FORWARD:
            if answer is not None:
                self.router.push_encoded(pending.session, answer)
            return
        pending.answer, pending.done = answer, True
        key = pending.session.session_key
        chain = self._chains.get(key)
        while chain and chain[0].done:
            head = chain.popleft()
            if head.kind == DEFERRED:
                self._serve_here(head.session, head.stanza, now, own_only=False, answer=None)
            else:
                self._serve_here(head.session, head.stanza, now, own_only=True, answer=head.answer)
        if chain is not None and not chain:
            del self._chains[key]

    def _serve_here(self, session, stanza: dict, now: float, *, own_only: bool, answer: bytes | None) -> None:
        """Store here what this node keeps of a stanza: all of a deferred local one; the sender's
        own copies of one the recipient's node acked (``answer``), then answer the sender."""
        router = self.router
        if own_only:
            if answer is None or msgpack.unpackb(answer, raw=False).get("t") != "ack":
                if answer is not None:
                    router.push_encoded(session, answer)  # refused there: nothing is stored here either
                return
            session = _OwnCopies(session, answer, router)
        try:
            if stanza["t"] == "msg":
                entry = router.route_msg(session, stanza, stanza["id"], now, own_only=own_only)
            else:
                entry = router.route_rcpt(session, stanza, now, own_only=own_only)
        except (RouteError, StanzaError) as exc:
            code = exc.code if isinstance(exc, RouteError) else "bad_stanza"
            fields = exc.fields if isinstance(exc, RouteError) else {}
            target = session.session if own_only else session
            router.answer(target, {"t": "err", "code": code, "msg": exc.message, **reference(stanza), **fields})
            return
        if own_only and entry is None:  # no own copies after all (the other devices are gone)
            router.push_encoded(session.session, answer)

    def _ask_flush(self) -> None:
        if not self._flush_asked and self.wake is not None:
            self._flush_asked = True
            self.wake()

    def take_output(self) -> tuple[dict[str, list], dict[str, list]]:
        """What to send this turn, per node: the records to relay there, and the answers owed there."""
        outgoing, replies = self.outgoing, self.replies
        self.outgoing, self.replies, self._flush_asked = {}, {}, False
        return outgoing, replies

    # -- other nodes' sessions

    def serve(self, node: str, records, now: float) -> None:
        """Serve the stanzas node ``node`` relayed: each record is [seq, provider, localpart,
        device, max plaintext bytes, stanza]; its answer is owed back (``take_output``)."""
        for record in records:
            try:
                seq, provider, localpart, device, max_plaintext, stanza = record
                if type(seq) is not int or type(stanza) is not dict or type(max_plaintext) is not int:
                    raise TypeError("a relayed record's fields have the wrong types")
                identity = self._identity(provider, localpart, device)
            except (TypeError, ValueError, InterlinkError):
                self.counters["malformed"] += 1
                continue
            session = RelayedSession(self, node, seq, identity, max_plaintext)
            self.counters["served"] += 1
            kind = stanza.get("t")
            target = stanza.get("user") if kind == "iq" else stanza.get("to")
            if kind not in RELAY_KINDS or (kind == "iq" and stanza.get("op") not in RELAYED_OPS) or "g" in stanza:
                self.counters["malformed"] += 1
                session.send_encoded(encode_stanza({"t": "err", "code": "internal", **reference(stanza),
                                                    "msg": "this stanza is not relayed between nodes"}))
                continue
            if type(target) is str and self.home_of(target) is not None:
                self.counters["misrouted"] += 1  # the nodes disagree about the membership
                session.send_encoded(encode_stanza({"t": "err", "code": "internal", **reference(stanza),
                                                    "msg": "the cluster's nodes disagree about where this user lives"}))
                continue
            self.serve_stanza(session, stanza, now)
            if not session.answered and kind == "state":
                self.reply(node, seq, None)  # served: the sender's node stops waiting

    def reply(self, node: str, seq: int, encoded: bytes | None) -> None:
        replies = self.replies.get(node)
        if replies is None:
            replies = self.replies[node] = []
            self._ask_flush()
        replies.append([seq, encoded])

    def _identity(self, provider, localpart, device) -> Identity:
        key = (provider, localpart, device)
        identity = self._identities.get(key)
        if identity is None:
            if type(provider) is not str or type(localpart) is not str or type(device) is not int:
                raise TypeError("a relayed sender is (provider, localpart, device)")
            identity = Identity(provider=provider, localpart=localpart, device=device, expires_at=float("inf"))
            if len(self._identities) >= IDENTITIES_KEPT:
                del self._identities[next(iter(self._identities))]
            self._identities[key] = identity
        return identity
