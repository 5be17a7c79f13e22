"""Cluster routing, sans-I/O (issue 18; docs/architecture.md "Cluster"): this node's sessions'
stanzas whose effect lies with a user homed on another node go there, and the stanzas other nodes
relay here are served as if their sender were connected here.

Every user has one home node (``Membership.home``), which keeps the user's devices, mailboxes,
consent, blocks and keys, and where the user's sessions live (a session opened elsewhere is
redirected before anything is stored); every group has one too, by its id. A ``msg``, ``rcpt``
or ``state`` to a user homed elsewhere, a ``devices.get`` or ``keys.get`` naming one, and every
group request and message for a group homed elsewhere, are *relayed* to that node: it runs the same
domain code for a ``RelayedSession`` (the sender's identity; its one answer goes back), commits
in its own group commit, then answers. The sender is answered only then, so an ``ack`` still
means every copy is durable, and a node that does not answer in time gets the sender ``err``
``overloaded`` with ``retry_after``, never an ``ack``. A resend is recognised where the copies
are stored: the recipient's node deduplicates on (sender device, id) as a single node does.

What the sender's own other devices get (``own`` copies, receipts' copies) is stored here, after
the recipient's node answered ``ack``: an ``err`` from there still means nothing was stored. A
device's stanzas that store such copies are settled in the order the device sent them, whatever
order the answers come back in (``_chains``), so its other devices see them in that order.

A group's home serves its requests and messages with the one-node code for the members living
there, and asks each other member's node to check its members before a ``group.new``/``group.add``
(``_Checked``); the copies for members of other nodes are outbox entries written in the home's
commit and sent until stored (``fan_out``, ``core/domain/outbox.py``, each a ``gfan`` record
sent for a ``_Delivery``); ``dir.lookup`` is asked of every node and merged (``_Gather``).

The edge moves the bytes (``core/edge/clusterlink.py``): ``take_output`` once per loop turn
(``wake`` asks for that turn), ``answered`` for each answer, ``serve`` for each
batch another node relayed, ``expire`` on a timer.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import os
import time
from collections import deque
from typing import Callable

import msgpack

from interlink.core.domain.auth import Identity
from interlink.core.domain.auth.providers import PROVIDER_ID_RE, localpart_error
from interlink.core.domain.blobs import BLOB_ID_BYTES, KIB
from interlink.core.domain.cluster import Membership
from interlink.core.errors import ErrorCode, InterlinkError, MalformedRecordError, RouteError, StanzaError
from interlink.core.domain.fanout import GroupDlv, plan_group
from interlink.core.domain.groups import GROUP_CACHE_GROUPS, GROUP_ID_BYTES, event_builder
from interlink.core.domain.outbox import FINAL, OK, RETRY_S, Outbox, outcome
from interlink.core.domain.ops import ANSWERS_PER_READ_BYTES, MAX_DIRECTORY_USERS, address_field, device_list
from interlink.core.domain.router import MAX_ADDRESS_CHARS, TYPING_STATES, check_devices, stanza_id, typing_state
from interlink.core.protocol.stanza import encode_stanza
from interlink.core.protocol.wire import MAX_DEVICE_ID, MAX_PLAINTEXT_BYTES

# Operations whose answer lies with the user they name: served at that user's home node.
RELAYED_OPS = frozenset({"devices.get", "keys.get"})
# Operations every node answers for its own users, merged by the asker's node.
GATHERED_OPS = frozenset({"dir.lookup"})
# Served at the group's home node (the hash of the group id), which has its members' nodes store
# their copies.
GROUP_OPS = frozenset({"group.new", "group.add", "group.del", "group.leave", "group.get"})
GROUP_CHANGES = frozenset({"group.new", "group.add", "group.del", "group.leave"})  # stored: a timeout is unconfirmed

RELAY_KINDS = frozenset({"msg", "rcpt", "state", "iq"})
# What another node may answer to each kind of stanza relayed to it (anything else is its bug).
ANSWER_KINDS = {"msg": ("ack", "err"), "rcpt": ("ack", "err"), "iq": ("res", "err"), "state": ("err",),
                "gfan-msg": ("ack", "err"), "gfan-event": ("res", "err")}
ERROR_CODES = frozenset(code.value for code in ErrorCode)
MIN_PLAINTEXT_BYTES = 256  # a relayed sender's frame bound is at least a configured gateway's (max_token_bytes + 512)
MAX_ERR_MSG_CHARS = 200  # an err's msg, as every answer of this gateway keeps it (a short, sanitised text)
EVENT_FIELDS = frozenset({"k", "id", "from", "dev", "g", "event", "members", "ver", "promoted", "meta"})
EVENT_KINDS = frozenset({"created", "added", "removed", "left"})
SERVED_KINDS = RELAY_KINDS | {"gfan"}  # gfan: a group's home asks a member's node to store or push
RETRY_AFTER_MS = 1000  # what a sender is told to wait after a node did not answer in time
# How long a device's later stored stanzas are refused while one refused at a timeout is not sent
# again (a client that gave it up is not held back longer): retry_after and a reconnect, with room.
RESEND_FIRST_S = 10.0
# How long the id drawn for a group.new that timed out is kept for its resend (same iq id, same
# members and meta): the group may exist at its home already, and a new id would make a second one.
GROUP_NEW_RESEND_S = 600.0
MAX_DRAWN_GROUPS = 65536  # such ids kept at once (oldest dropped first)
MAX_DRAWN_GROUPS_PER_DEVICE = 8  # ... and per device: one device cannot push out the others'
INNER_SHARE = 0.4  # of the timeout, for a group home's member checks (they must fit the sender's deadline)
ENTRY_MEMBERS_BYTES = 24 * 1024  # addresses per group fan-out entry (see _parts)
MAX_WAITING_PER_DEVICE = 1024  # a device's stanzas waiting for other nodes at once (rate_limited past it)
# ... and their bytes (a stream holds all but its first while that one waits: 1,024 full frames
# were 67 MB of one device's, a review measured): rate_limited past this, but for a device's first
MAX_WAITING_BYTES_PER_DEVICE = 4 << 20
MAX_WAITING_BYTES = 256 << 20  # ... every device's together: overloaded past it
STANZA_OVERHEAD_BYTES = 512  # what a waiting stanza takes besides its encoded map (counted for each)
MAX_HELD_PER_GROUP = 256  # stanzas for one group waiting behind its change's member checks (overloaded past it)
MAX_HELD_PER_DEVICE = 64  # ... of one device, whatever the groups
MAX_HELD = 8192  # ... in all
OUTBOX_FULL_RETRY_MS = 5000  # retry_after of a group stanza refused while a member node's outbox stream is full
OUTBOX_FULL_CLEARED = 0.9  # a full stream is logged again once it went under this part of its share
HELD_KINDS = frozenset({"msg", "state", "iq"})  # the kinds that name a group ("g")
HOMES_KEPT = 65_536  # user addresses whose home node is remembered
FANOUT_CACHE_MEMBERS = 1 << 18  # members of the groups whose split by node is remembered (_fan_out_parts)
IDENTITIES_KEPT = 65_536  # senders of relayed stanzas whose identity is remembered

log = logging.getLogger("interlink.cluster")

FORWARD, OWN, DEFERRED, GATHER = 0, 1, 2, 3  # what a pending entry waits for (see Pending)


BLOB_OPS = frozenset({"blob.read"})  # served at the node the blob id hashes to (its uploader's)


def _request_digest(fields: dict) -> bytes:
    """A group request's fields, as a short digest (what a resend must repeat)."""
    return hashlib.blake2b(msgpack.packb(fields), digest_size=16).digest()


def new_group_id() -> bytes:
    """A new group's id, drawn by its creator's node (its hash names the group's home)."""
    return os.urandom(GROUP_ID_BYTES)


def _parts(members: list) -> list[list]:
    """``members`` in lists of at most ``ENTRY_MEMBERS_BYTES`` of addresses (one outbox entry
    each: an entry, its body or event included, stays well under NATS's smallest max_payload)."""
    if 4 * sum(map(len, members)) + 3 * len(members) <= ENTRY_MEMBERS_BYTES:
        return [members]  # the usual case: one entry, counted without encoding
    parts, part, size = [], [], 0
    for member in members:
        cost = len(member.encode("utf-8")) + 3
        if part and size + cost > ENTRY_MEMBERS_BYTES:
            parts.append(part)
            part, size = [], 0
        part.append(member)
        size += cost
    parts.append(part)
    return parts


def _payload_bytes(stanza: dict) -> int:
    """What a client's stanza takes while it waits for another node, about: its encoded size —
    the whole map, as a chain keeps it (a walk of some fields let a 60 KB key or a nested list pass
    as 512 bytes: a review) — and ``STANZA_OVERHEAD_BYTES``."""
    return STANZA_OVERHEAD_BYTES + len(msgpack.packb(stanza))


def _read_cost(length: int) -> int:
    """What a relayed ``blob.read`` of ``length`` takes of its device's answers budget: 1 KiB at
    least, as its bytes are charged (a zero-length read counted nothing, and two of them left the
    count's key deleted before the second's answer came)."""
    return max(length, KIB)


def _count_down(counts: dict, key, amount: int = 1) -> None:
    """``amount`` less for ``key`` in a per-device count; the key goes at zero (no entry per idle device)."""
    left = counts[key] - amount
    if left:
        counts[key] = left
    else:
        del counts[key]


def internal_error(stanza: dict, message: str) -> bytes:
    """An encoded ``err`` ``internal`` tied to ``stanza`` (a fault of the cluster, not the client's)."""
    return encode_stanza({"t": "err", "code": "internal", "msg": message, **reference(stanza)})


def _fanin(stanza: dict, home: str) -> tuple:
    """Which outbox entry of ``home`` a gfan msg/event is, for the store: (home, incarnation, seq,
    the entry it must follow or None); ``MalformedRecordError`` when it names none."""
    entry_seq, incarnation, after = stanza.get("o"), stanza.get("n"), stanza.get("q")
    if type(entry_seq) is not int or not 0 < entry_seq < 1 << 63 or type(incarnation) is not bytes or len(incarnation) != 8:
        raise MalformedRecordError("gfan msg/event needs 'o' (its outbox seq) and 'n' (the incarnation that wrote it)")
    if after is not None:
        if (type(after) is not list or len(after) != 2 or type(after[0]) is not bytes or len(after[0]) != 8
                or type(after[1]) is not int or not 0 < after[1] < 1 << 63):
            raise MalformedRecordError("gfan 'q' names the entry before it: [incarnation, seq]")
        after = (home, after[0], after[1])
    return home, incarnation, entry_seq, after


def refusal(exc: RouteError | StanzaError, stanza: dict) -> dict:
    """The ``err`` that answers ``stanza`` refused by ``exc``: its code (``bad_stanza`` for a
    malformed stanza), message, reference and fields."""
    if isinstance(exc, RouteError):
        return {"t": "err", "code": exc.code, "msg": exc.message, **reference(stanza), **exc.fields}
    return {"t": "err", "code": "bad_stanza", "msg": exc.message, **reference(stanza)}


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

    def served_silently(self) -> None:
        """Served with no answer to send (typing state): the sender's node stops waiting."""
        if not self.answered:
            self.answered = True
            self._relay.reply(self._node, self._seq, None)


class Pending:
    """A stanza of this node's session waiting for another node (``FORWARD``: its answer goes to
    the session as it is; ``OWN``: on ``ack`` the sender's own copies are stored here first), or
    waiting behind one in its device's chain (``DEFERRED``: a local stanza storing own copies), or
    one node's part of a request several nodes answer (``GATHER``: ``session`` is the ``_Gather``,
    ``_Checked`` or ``_Delivery`` that takes their answers, through ``node_answered``)."""

    __slots__ = ("session", "stanza", "kind", "node", "sent", "answer", "acked", "done", "seq", "record",
                 "stream", "poisoned", "size")

    def __init__(self, session, stanza: dict, kind: int, node: str | None, now: float) -> None:
        self.session = session
        self.stanza = stanza
        self.kind = kind
        self.node = node
        self.sent = now  # when it left for its node (set again when a held one leaves)
        self.answer: bytes | None = None  # the other node's encoded answer
        self.acked = False  # ... and it was an ``ack``
        self.done = kind == DEFERRED  # answered (or timed out); a deferred entry waits for nothing
        self.seq = 0
        self.record: list | None = None  # what goes to the node, kept while held back (None: it left)
        self.stream: tuple | None = None  # (session key, node, group or not): one in flight per stream
        self.poisoned = False  # an earlier stanza of its device's chain timed out: refused, not stored here
        self.size = 0  # what it counts of its device's waiting bytes (``Relay._admit``; 0: not a client's)


class _StandIn:
    """What stands in for a session while another node works on its stanza: the session's
    identity, device key and frame bound, as the domain's ``Session`` port wants them."""

    __slots__ = ("session", "identity", "session_key", "max_plaintext_bytes")
    closed = False

    def __init__(self, session) -> None:
        self.session = session
        self.identity = session.identity
        self.session_key = session.session_key
        self.max_plaintext_bytes = session.max_plaintext_bytes


class _OwnCopies(_StandIn):
    """Stands in for the sender while its own copies are committed here, after the recipient's
    node acked: the sender then gets that node's ``ack`` — the message is stored — even if its
    own copies could not be (counted as ``own_copies_lost``)."""

    __slots__ = ("remote_answer", "relay")
    relayed = False

    def __init__(self, session, remote_answer: bytes, relay: Relay) -> None:
        super().__init__(session)
        self.remote_answer = remote_answer
        self.relay = relay

    def send_encoded(self, encoded: bytes) -> None:
        if msgpack.unpackb(encoded, raw=False).get("t") != "ack":
            self.relay.counters["own_copies_lost"] += 1
        self.relay.router.push_encoded(self.session, self.remote_answer)


class _Gather(_StandIn):
    """One ``dir.lookup`` asked of every node: this node's answer first (it stands in for the
    session while the local handler serves it), then each other node's; the session gets the
    users of all of them in byte order (at most ``MAX_DIRECTORY_USERS``), or the first refusal —
    ``overloaded`` when a node did not answer in time (nothing is stored by a look-up)."""

    __slots__ = ("relay", "stanza", "users", "waiting", "done")
    relayed = True  # the local handler must serve it here, not gather again

    def __init__(self, relay: Relay, session, stanza: dict) -> None:
        super().__init__(session)
        self.relay = relay
        self.stanza = stanza
        self.users: set[str] = set()
        self.waiting = 0  # other nodes still to answer
        self.done = False

    def send_encoded(self, encoded: bytes) -> None:
        """This node's own answer (from the local handler)."""
        self._take(encoded, msgpack.unpackb(encoded, raw=False), local=True)

    def node_answered(self, encoded: bytes | None, answer: dict | None, now: float) -> None:
        self.waiting -= 1
        self._take(encoded, answer, local=False)

    def _take(self, encoded: bytes | None, answer: dict | None, *, local: bool) -> None:
        if self.done:
            return
        users = answer.get("users") if answer is not None and answer.get("t") == "res" else None
        if type(users) is not list:  # a refusal (or nonsense from a node): that is the answer
            self.done = True
            self.relay.router.push_encoded(self.session, encoded if encoded is not None else internal_error(
                self.stanza, "a node answered the look-up with nothing"))
            return
        self.users.update(user for user in users if type(user) is str)
        if not local and self.waiting == 0:
            self.done = True
            merged = sorted(self.users, key=lambda user: user.encode("utf-8"))[:MAX_DIRECTORY_USERS]
            self.relay.router.answer(self.session, {"t": "res", "id": self.stanza["id"], "users": merged})


class _Silent(_StandIn):
    """The sender of group typing pushed to other nodes: their answer (none, or a refusal of
    theirs) is not the sender's business — typing is never answered unless refused where it
    was sent."""

    __slots__ = ()
    relayed = True
    closed = True  # nothing is sent to it

    def send_encoded(self, encoded: bytes) -> None:
        return None


class _Checked(_StandIn):
    """A ``group.new``/``group.add`` at the group's home while the members living on other nodes
    are checked there; then served here as relayed (``checked``: those members), answering the
    session; the first refusal from a member's node is the answer instead."""

    __slots__ = ("relay", "stanza", "checked", "waiting", "done", "paid_here")
    relayed = True  # served by the handler as checked and charged already

    def __init__(self, relay: Relay, session, stanza: dict, checked: frozenset) -> None:
        super().__init__(session)
        self.relay, self.stanza, self.checked = relay, stanza, checked
        self.waiting = 0
        self.done = False
        self.paid_here = 0 if session.relayed else 1  # its token: at _precheck here, or at its sender's node

    def node_answered(self, encoded: bytes | None, answer: dict | None, now: float) -> None:
        self.waiting -= 1
        if self.done:
            return
        if answer is None or answer.get("t") != "res":
            self.done = True
            try:
                self.relay.router.push_encoded(self.session, encoded or internal_error(self.stanza, "a node did not check"))
            finally:
                self.relay.release(self.stanza["g"])
            return
        if self.waiting == 0:
            self.run()

    def run(self) -> None:
        self.done = True
        try:
            self.relay.serve_stanza(self, self.stanza, self.relay.clock())
        except Exception:  # a bug of ours must cost this request, never the answers batch it came in
            log.exception("relay: serving a checked group request failed")
            self.relay.counters["internal_errors"] += 1
            self.relay.router.push_encoded(self.session, internal_error(self.stanza, "the gateway failed to serve this"))
        finally:
            self.relay.release(self.stanza["g"])  # what came for the group meanwhile sees the change

    def send_encoded(self, encoded: bytes) -> None:
        self.relay.router.push_encoded(self.session, encoded)


class _Delivery:
    """One outbox entry of a group's home in flight to a member's node (``core/domain/outbox.py``):
    stands in for its sender (whose identity the member's node stores the copies under) and
    reports the node's answer to the outbox."""

    __slots__ = ("relay", "node", "seq", "identity", "session_key", "max_plaintext_bytes")
    relayed = True
    closed = False

    def __init__(self, relay: Relay, node: str, seq: int, identity: Identity, max_plaintext_bytes: int) -> None:
        self.relay, self.node, self.seq = relay, node, seq
        self.identity = identity
        self.session_key = ("outbox", node)  # not an address: counted apart from every device
        self.max_plaintext_bytes = max_plaintext_bytes

    def node_answered(self, encoded: bytes | None, answer: dict | None, now: float) -> None:
        self.relay.delivered(self, answer, now)


class _Awaited:
    """A device's stored stanzas of one kind refused for a timeout and not yet sent again
    (``Relay._refuse_before_resend``)."""

    __slots__ = ("refs", "until", "resent")

    def __init__(self) -> None:
        self.refs: dict[tuple, int] = {}  # (t, id) -> its place in the device's order
        self.until = 0.0  # held until then (the last timeout + RESEND_FIRST_S)
        self.resent: dict[tuple, int] = {}  # (t, id) sent again meanwhile -> the place it had (refused again: kept)


class Relay:
    """Which stanzas go to which node, what is waiting for an answer, and what this node owes others."""

    def __init__(self, *, membership: Membership, node: str, router, serve: Callable, timeout_s: float,
                 wake: Callable[[], None] | None = None, groups=None, clock: Callable[[], float] = time.time) -> None:
        if node not in membership.nodes:
            raise ValueError(f"node {node!r} is not in the membership {list(membership.nodes)}")
        self.membership = membership
        self.node = node
        self.router = router
        self.store = router.store
        self.serve_stanza = serve  # the domain's dispatch: how a relayed stanza is served here
        self.groups = groups  # core/domain/groups.py: group requests are checked with its rules
        self.clock = clock  # for deadlines of what a commit's answer sends on (group fan-out)
        self.timeout_s = timeout_s
        self.wake = wake  # asks the edge for a flush at the end of this loop turn
        self.outgoing: dict[str, list] = {}  # node -> records to relay there this turn
        self.replies: dict[str, list] = {}  # node -> [seq, encoded answer or None] owed there
        self.waiting: dict[int, Pending] = {}  # seq -> the stanza waiting for that answer
        self._deadlines: list = []  # heap of (deadline, seq)
        self._chains: dict[tuple, deque] = {}  # session key -> its stanzas settled in order (own copies)
        self._waiting_per_device: dict[tuple, int] = {}  # session key -> its stanzas waiting (or held)
        self._waiting_bytes_per_device: dict[tuple, int] = {}  # ... and their bytes (``_payload_bytes``)
        self.waiting_bytes = 0  # ... every device's together
        self._blob_bytes_waiting: dict[tuple, int] = {}  # session key -> bytes its blob.reads asked other nodes for
        self.blob_chunk_bytes = 0  # the largest blob.read this node's clients may ask (set with blobs)
        self.charge_blob: Callable[[str, int, float], None] | None = None  # Blobs.charge (set with blobs)
        self._streams: dict[tuple, deque] = {}  # (session key, node, group or not) -> stored stanzas: in flight, then held
        # (session key, None for 1:1 or the node of its groups) -> what it must send again first
        self._resend_first: dict[tuple, _Awaited] = {}
        self._resend_here: tuple | None = None  # (key, ref) of an awaited resend left to its handler here
        # (session key, iq id) -> (g, the request's digest, until): group.new ids that timed out
        self._drawn_groups: dict[tuple, tuple[bytes, bytes, float]] = {}
        self._drawn_per_device: dict[tuple, int] = {}  # session key -> its entries in _drawn_groups
        # g -> how to serve, in the order they came, the stanzas for group g that came while a
        # change of g homed here had its members checked on their nodes (``hold``, ``release``)
        self.held: dict[bytes, list[tuple]] = {}  # g -> [(session, stanza, serve(now))]
        self._held_per_device: dict[tuple, int] = {}  # session key -> its stanzas in held
        self._held_count = 0
        # Answers are matched by (node, seq): each run numbers from a random point, so an answer
        # meant for this node's previous run (it restarted meanwhile) never matches a new stanza.
        self._seq = int.from_bytes(os.urandom(7), "big")
        self._flush_asked = False  # wake() was called and the edge has not flushed since
        self._homes: dict[str, str] = {}
        # g -> (the members it was made for, [(node, members there)]): a group message's fan-out
        # plan, made again when the group's record (its members tuple) changes
        self._fanout_parts: dict[bytes, tuple] = {}
        self._fanout_members = 0  # the members of the records it holds, together (FANOUT_CACHE_MEMBERS at most)
        self._identities: dict[tuple, Identity] = {}
        self.counters = {"relayed": 0, "answered": 0, "timeouts": 0, "late_answers": 0, "served": 0,
                         "malformed": 0, "misrouted": 0, "refused": 0, "own_copies_lost": 0, "internal_errors": 0,
                         "held_back": 0, "refused_before_resend": 0, "bad_answers": 0,
                         "held_for_group_change": 0, "held_overflow": 0, "outbox_full": 0, "waiting_full": 0}
        # This node's group fan-out to member nodes, durable until each stored it.
        self.outbox = Outbox(self.store, node, membership.nodes)
        self.counters.update(self.outbox.counters)
        self.outbox.counters = self.counters  # one dict: stats and /metrics read it
        self._pump_asked = False  # an outbox answer may let the next window go: send it when the caller is done
        self._outbox_full_logged: set[str] = set()  # nodes whose full stream was logged (once until it is not full)

    # -- where a user lives

    def home_of(self, address: str | bytes, *, cache: bool = True) -> str | None:
        """The node ``address`` (a user, a group id, a blob id) is homed on, or None when it is this one."""
        node = self.home(address, cache=cache)
        return None if node == self.node else node

    def home(self, address: str | bytes, *, cache: bool = True) -> str:
        """The node ``address`` is homed on (remembered, unless ``cache`` is False: blob ids, each
        read a few times, would push out the users and groups)."""
        node = self._homes.get(address)
        if node is None:
            node = self.membership.home(address)
            if cache and len(address) <= MAX_ADDRESS_CHARS:  # never a longer string a client made up
                if len(self._homes) >= HOMES_KEPT:
                    del self._homes[next(iter(self._homes))]
                self._homes[address] = node
        return node

    def new_blob_id(self) -> bytes:
        """A new blob's id, drawn until it hashes to this node (about as many draws as there are
        nodes): any node then knows where a blob lives from its id alone."""
        while True:
            blob = os.urandom(BLOB_ID_BYTES)
            if self.home_of(blob, cache=False) is None:
                return blob

    # -- this node's sessions

    def take(self, session, stanza: dict, now: float) -> bool:
        """Relay ``stanza`` of this node's ``session`` if its effect lies with another node's user
        (or hold it behind the device's stanzas that wait for one); False: serve it here as usual.
        Raises ``RouteError``/``StanzaError`` like the handlers, for the dispatcher to answer."""
        self._resend_here = None
        if self._resend_first and stanza["t"] in ("msg", "rcpt"):
            resent = self._refuse_before_resend(session, stanza, now)
            taken = self._take(session, stanza, now)
            if resent is not None:
                if taken:  # taken without an error: no longer awaited
                    self._resent(*resent)
                else:  # served here: no longer awaited once its handler took it (``served_here``)
                    self._resend_here = resent
            return taken
        return self._take(session, stanza, now)

    def served_here(self) -> None:
        """The stanza ``take`` left to its handler here was served (not refused): if it was an
        awaited resend, it no longer is."""
        if self._resend_here is not None:
            self._resent(*self._resend_here)
            self._resend_here = None

    def _take(self, session, stanza: dict, now: float) -> bool:
        kind = stanza["t"]
        if kind == "iq":
            op = stanza.get("op")
            if type(op) is str and op in BLOB_OPS:
                return self._take_blob_read(session, stanza, now)
            if type(op) is not str or op not in RELAYED_OPS:
                if type(op) is str and op in GROUP_OPS:
                    return self._take_group(session, stanza, now)
                if type(op) is str and op in GATHERED_OPS and len(self.membership.nodes) > 1:
                    self._gather(session, stanza, now)
                    return True
                return False
            user = stanza.get("user")
            if type(user) is not str or len(user) > MAX_ADDRESS_CHARS:
                return False  # the local handler answers what is wrong with it
            node = self.home_of(user)
            if node is None:
                return False
            # Relayed as rebuilt from its checked fields only (nothing else of the client's map
            # travels), charged like a stored stanza, and bounded per device while it waits.
            iq_id = stanza.get("id")
            if type(iq_id) is not int:
                raise StanzaError("iq needs an int 'id'")
            address_field(stanza, "user", op)
            relayed = {"t": "iq", "id": iq_id, "op": op, "user": user}
            if op == "keys.get" and stanza.get("devices") is not None:
                relayed["devices"] = device_list(stanza["devices"], op, "'devices'")
            size = self._admit(session, stanza, now)
            self._send(node, session, relayed, FORWARD, now, size=size)
            return True
        if "g" in stanza and kind != "rcpt":  # a receipt has no group: a stray 'g' is ignored, as on one node
            return self._take_group(session, stanza, now)
        to = stanza.get("to")
        if type(to) is not str or len(to) > MAX_ADDRESS_CHARS:
            return False  # the local handler answers what is wrong with it
        node = self.home_of(to)
        router = self.router
        if node is None:
            # Here: only a stanza of the device still waiting for another node may hold it back
            # (its recipients' order is the order the device sent).
            if kind == "state" or session.session_key not in self._chains:
                return False
            size = self._admit(session, stanza, now)  # it waits here, counted as one waiting for a node
            if kind == "msg":
                router.msg_parts(session, stanza)
                stanza_id(stanza, "msg")
            else:
                router.rcpt_parts(session, stanza)
            deferred = Pending(session, stanza, DEFERRED, None, now)
            self._seq += 1
            deferred.seq = self._seq  # its place in the device's order (it waits for no answer)
            self._count_waiting(deferred, size)
            self._chain(deferred)
            return True
        size = self._admit(session, stanza, now)
        if kind == "state":
            self._send(node, session, {"t": "state", "to": to, "s": typing_state(stanza)}, FORWARD, now, size=size)
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
            self._chain(self._send(node, session, relayed, OWN, now, original=stanza, size=size))
        else:
            self._send(node, session, relayed, FORWARD, now, size=size)
        return True

    def _resend_key(self, session, stanza: dict, node: str | None) -> tuple | None:
        """Whose resends ``stanza`` is ordered with: its device's 1:1 stanzas (own copies make them
        one order wherever their recipients live), or its messages to groups living on ``node``
        (one stream, as they leave). None: not a stored stanza of a relayed kind, or malformed (its
        handler refuses it)."""
        stanza_id_ = stanza.get("id")
        if type(stanza_id_) is not bytes or len(stanza_id_) != 16:
            return None
        if stanza["t"] != "msg" or "g" not in stanza:  # a receipt has no group: a stray 'g' is ignored
            return session.session_key, None
        g = stanza["g"]  # as ``_take`` sees it: present, even nil, makes it a group message
        if type(g) is not bytes or len(g) != GROUP_ID_BYTES:
            return None
        node = node if node is not None else self.home_of(g)
        return None if node is None else (session.session_key, node)

    def _refuse_before_resend(self, session, stanza: dict, now: float) -> tuple | None:
        """While stored stanzas of this device, refused for a timeout, are not all sent again,
        refuse (``overloaded``) any of their kind (``_resend_key``) but the earliest of them: stored
        now, it could land ahead of those resends. A refused new one joins them, after them. So a
        client that resends every refused stanza in the order it first sent it gets through in that
        order (docs/protocol.md §6). Returns (key, ref) of the awaited resend it lets through."""
        key = self._resend_key(session, stanza, None)
        awaited = self._resend_first.get(key) if key is not None else None
        if awaited is None:
            return None
        if awaited.until <= now:
            del self._resend_first[key]
            return None
        refs = awaited.refs
        ref = (stanza["t"], stanza["id"])
        order = refs.get(ref)
        if order is not None and order == min(refs.values()):
            return key, ref
        self.router.charge(session, now)  # a refusal costs the device its rate, as a stored stanza would
        self.counters["refused_before_resend"] += 1
        if order is None and len(refs) < MAX_WAITING_PER_DEVICE:
            self._seq += 1
            refs[ref] = self._seq  # after everything awaited: sent after them
        raise RouteError("an earlier stanza of this device got no answer in time; resend the refused ones in the "
                         "order you sent them, then this", code="overloaded", retry_after=RETRY_AFTER_MS)

    def _resent(self, key: tuple, ref: tuple) -> None:
        """``ref`` was sent again and taken: no longer awaited, but its place in the device's order
        is kept while others are (refused again, it is awaited where it was first sent)."""
        awaited = self._resend_first.get(key)
        if awaited is not None:
            order = awaited.refs.pop(ref, None)
            if not awaited.refs:
                del self._resend_first[key]
            elif order is not None and len(awaited.resent) < MAX_WAITING_PER_DEVICE:
                awaited.resent[ref] = order

    def _await_resend(self, pending: Pending, now: float) -> None:
        """``pending``, a stored stanza of this node's session, is (or will be) refused for a
        timeout — its own, or one before it in its stream or chain: until it is sent again, the
        device's other stored stanzas of its kind are refused (``_refuse_before_resend``). Not for
        a session that is gone: its client resends everything unacked on its next one anyway.
        Only timeouts set the deadline: a client that gave a stanza up is held 10 s at most."""
        session = pending.session
        if self.router.sessions.get(session.session_key) is not session:
            return
        key = self._resend_key(session, pending.stanza, pending.node)
        if key is None:
            return
        awaited = self._resend_first.get(key)
        if awaited is None or awaited.until <= now:
            awaited = self._resend_first[key] = _Awaited()
        ref = (pending.stanza["t"], pending.stanza["id"])
        if len(awaited.refs) < MAX_WAITING_PER_DEVICE and ref not in awaited.refs:
            awaited.refs[ref] = awaited.resent.pop(ref, pending.seq)
        awaited.until = now + RESEND_FIRST_S

    def _take_blob_read(self, session, stanza: dict, now: float) -> bool:
        """A ``blob.read`` of a blob living on another node (its id's home): asked there, rebuilt
        from its fields. Charged here to the reader's blob bucket, as on one node (its node
        charges it too: a refusal here costs no round trip, and no other node's work), not to the
        message rate; bounded per device while it waits, each read counted 1 KiB at least."""
        if self.charge_blob is None:
            return False  # no blobs here: the local handler says so
        blob = stanza.get("blob")
        if type(blob) is not bytes or len(blob) != BLOB_ID_BYTES:
            return False  # the local handler answers what is wrong with it
        node = self.home_of(blob, cache=False)
        if node is None:
            return False
        iq_id = stanza.get("id")
        if type(iq_id) is not int:
            raise StanzaError("iq needs an int 'id'")
        off, length = stanza.get("off"), stanza.get("len")
        if type(off) is not int or type(length) is not int or off < 0 or not 0 <= length <= self.blob_chunk_bytes:
            return False  # the local handler answers what is wrong with it (before anything is asked)
        if self.store.blob(blob) is not None:
            return False  # a blob uploaded here before ids were drawn for their node: served here, as then
        key = session.session_key
        reading = self._blob_bytes_waiting.get(key, 0)
        if reading >= ANSWERS_PER_READ_BYTES:  # as on one node: about 1 MiB of answers on their way at once
            raise RouteError("too many requests at once; send more when the answers have arrived",
                             code="rate_limited", retry_after=10)
        size = self._admit(session, stanza, now, charge=False)
        self.charge_blob(session.identity.user, length, now)
        self._blob_bytes_waiting[key] = reading + _read_cost(length)
        self._send(node, session, {"t": "iq", "id": iq_id, "op": "blob.read", "blob": blob, "off": off, "len": length},
                   FORWARD, now, size=size)
        return True

    # -- groups: served at the group's home, copies stored by each member's home

    def _take_group(self, session, stanza: dict, now: float) -> bool:
        """A group request or message of this node's session: to the group's home node (a new
        group's id is drawn here), checked and rebuilt from its fields first."""
        kind = stanza["t"]
        if kind == "msg":
            stanza_id(stanza, "msg")
        elif kind == "state":
            typing_state(stanza)
        elif kind == "iq" and type(stanza.get("id")) is not int:
            raise StanzaError("iq needs an int 'id'")
        fields = self.groups.request_fields(stanza)
        if fields.get("op") == "group.new":
            fields["g"] = self._new_group_id(session, fields, now)
        node = self.home_of(fields["g"])
        if node is None:
            if fields.get("op") in ("group.new", "group.add"):
                self._precheck(session, fields, now, charge=True)
                return True
            return False  # here: served as on one node
        size = self._admit(session, fields, now)
        self._send(node, session, fields, FORWARD, now, size=size)
        return True

    def _new_group_id(self, session, fields: dict, now: float) -> bytes:
        """A new group's id; for the resend of a ``group.new`` that timed out here (the same iq id,
        members and meta), the id drawn for it then — its home may have created the group, and
        answers the creator's resend for it (``Groups.group_new``)."""
        drawn = self._drawn_groups.get((session.session_key, fields["id"])) if self._drawn_groups else None
        if drawn is not None and drawn[2] > now and drawn[1] == _request_digest(fields):
            return drawn[0]
        return new_group_id()

    def _remember_group_id(self, pending: Pending, now: float) -> None:
        """``pending``, a ``group.new`` relayed to the group's home, got no answer in time: keep its
        id for the resend (until it is answered, ``GROUP_NEW_RESEND_S`` at most)."""
        key = pending.session.session_key
        entry = (key, pending.stanza["id"])
        self._forget_group_id(entry)
        if self._drawn_per_device.get(key, 0) >= MAX_DRAWN_GROUPS_PER_DEVICE:
            return  # this device's earlier ones are kept; this one's resend draws a new id
        if len(self._drawn_groups) >= MAX_DRAWN_GROUPS:
            self._forget_group_id(next(iter(self._drawn_groups)))
        request = {name: value for name, value in pending.stanza.items() if name != "g"}
        self._drawn_groups[entry] = (pending.stanza["g"], _request_digest(request), now + GROUP_NEW_RESEND_S)
        self._drawn_per_device[key] = self._drawn_per_device.get(key, 0) + 1

    def _forget_group_id(self, entry: tuple) -> None:
        if self._drawn_groups.pop(entry, None) is not None:
            _count_down(self._drawn_per_device, entry[0])

    def _precheck(self, session, stanza: dict, now: float, charge: bool = False) -> None:
        """``group.new``/``group.add`` at the group's home: the members who live on other nodes are
        checked there (consent, existence) before the request is served here (``_Checked``).
        Every such request at a cluster's group home comes through here (a resend for a group
        made already excepted), so its outbox room is checked here only; a removal or a leave
        never is (a node away for long must not keep anyone in a group). ``charge``: a sender of
        this node pays its rate token once the request passed what needs no other node, as on one
        node (the checked request is then served as relayed: not charged again)."""
        members = stanza["members"]
        if stanza["op"] == "group.add":
            # What needs no other node first: a made-up group or a request of a non-admin is
            # refused here (not_found, not_admin) without asking members' nodes about anyone.
            record = self.groups.addable_record(session, stanza)
            members = [member for member in members if member not in record.member_set]
            everyone = list(record.members) + members
        else:
            everyone = [session.identity.user, *(member for member in members if member != session.identity.user)]
        self.groups.check_size(stanza["op"], len(everyone))
        self.check_outbox_room(stanza["g"], everyone)  # before any member's node is asked
        if charge:
            self.router.charge(session, now)
        remote = self._by_node(members)
        checker = _Checked(self, session, stanza, frozenset(m for members in remote.values() for m in members))
        if remote:
            self.held.setdefault(stanza["g"], [])  # what comes for the group meanwhile is served after this
        for node, members in remote.items():
            checker.waiting += 1
            self._send(node, checker, {"t": "gfan", "k": "check", "g": stanza["g"], "id": stanza["id"],
                                       "members": members}, GATHER, now, original={"t": "iq", "id": stanza["id"]})
        if not remote:
            checker.run()

    def hold(self, g, session, stanza: dict, serve: Callable[[float], None]) -> bool:
        """A stanza naming group ``g`` (its ``"g"``, any value a client sent) from a member of the
        group, while a change of ``g`` waits for its members' nodes: ``serve`` it once that change
        is served or refused (``release``), as on one node, where a message sent after a
        ``group.add`` reaches the member it added. False: not held — no such change waits, or the
        sender is not a member (refused now, as it would be then). Past the bounds ``RouteError``
        ``overloaded`` (typing state is dropped)."""
        if type(g) is not bytes or g not in self.held:
            return False
        record = self.groups.record(g)
        if record is None or session.identity.user not in record.member_set:
            return False
        waiting = self.held[g]
        key = session.session_key
        if (len(waiting) >= MAX_HELD_PER_GROUP or self._held_per_device.get(key, 0) >= MAX_HELD_PER_DEVICE
                or self._held_count >= MAX_HELD):
            self.counters["held_overflow"] += 1
            if stanza.get("t") == "state":
                if type(session) is RelayedSession:
                    session.served_silently()  # its node stops waiting
                return True
            raise RouteError("the group is changing; nothing was stored, send this again", code="overloaded",
                             retry_after=RETRY_AFTER_MS)
        waiting.append((session, stanza, serve))
        self._held_per_device[key] = self._held_per_device.get(key, 0) + 1
        self._held_count += 1
        self.counters["held_for_group_change"] += 1
        return True

    def release(self, g: bytes) -> None:
        """The change of ``g`` whose members were checked is served or refused: serve what waited
        for it, in order (a change among them holds the rest again)."""
        waiting = self.held.pop(g, None)
        if not waiting:
            return
        for session, _, _ in waiting:
            _count_down(self._held_per_device, session.session_key)
        self._held_count -= len(waiting)
        now = self.clock()
        for session, stanza, serve in waiting:
            if session.closed:
                continue  # its client resends it (it was never answered)
            try:
                serve(now)
            except Exception:  # a bug of ours must cost this stanza, never the others that waited
                log.exception("relay: serving a stanza that waited for a group change failed")
                self.counters["internal_errors"] += 1
                self.router.push_encoded(session, internal_error(stanza, "the gateway failed to serve this"))

    def _by_node(self, users) -> dict[str, list]:
        """``users`` homed on other nodes, by node."""
        by_node: dict[str, list] = {}
        for user in users:
            node = self.home_of(user)
            if node is not None:
                by_node.setdefault(node, []).append(user)
        return by_node

    def local_devices(self, user: str) -> tuple[int, ...]:
        """The user's devices if it lives here; () for a user of another node (its node stores its copies)."""
        return () if self.home_of(user) is not None else self.store.devices(user)

    def fan_out(self, entry, session, g: bytes, recipients, payload: dict) -> None:
        """A group message or event of ``session`` at the group's home: for each node of
        ``recipients`` living elsewhere, an outbox entry written with ``entry`` in its commit, sent
        there after it (``core/domain/outbox.py``) and again until that node stored it."""
        parts = self._fan_out_parts(g, recipients)
        if not parts:
            return
        identity = session.identity
        outbox = self.outbox
        entries = []
        for node, part in parts:
            record = [identity.provider, identity.localpart, identity.device, session.max_plaintext_bytes,
                      {"t": "gfan", "g": g, "members": part, **payload, "n": outbox.incarnation}]
            seq, packed = outbox.entry(node, record)
            entries.append((node, seq, packed, record))
        self.router.attach_outbox(entry, entries)

    def check_outbox_room(self, g: bytes, recipients) -> None:
        """Refuse (``overloaded``) a group message or change of ``g`` at its home that needs an
        outbox entry for a node whose waiting entries fill its share of the store (``Outbox.full``:
        a node unreachable for long) — before anything is batched: the home's disk keeps room for
        its own users, and nothing acked is dropped for it."""
        node = self.full_member_node(g, recipients)
        if node is not None:
            self.refuse_outbox_full(node)

    def full_member_node(self, g: bytes, recipients) -> str | None:
        """A node with members among ``recipients`` of group ``g`` whose stream is full (None: none)."""
        outbox = self.outbox
        for node, _ in self._fan_out_parts(g, recipients):
            if not outbox.full(node):
                if (node in self._outbox_full_logged
                        and outbox.streams[node].backlog_bytes < OUTBOX_FULL_CLEARED * outbox.max_node_bytes):
                    self._outbox_full_logged.discard(node)
                    log.warning("cluster: node %s takes its group fan-out entries again: its groups are served",
                                node)
                continue
            return node
        return None

    def refuse_outbox_full(self, node: str) -> None:
        """``overloaded``: what waits for ``node`` fills its share (counted, logged once)."""
        self.counters["outbox_full"] += 1
        if node not in self._outbox_full_logged:
            self._outbox_full_logged.add(node)
            stream = self.outbox.streams[node]
            log.error("cluster: %d group fan-out entries (%d bytes) wait for node %s, its share of this node's "
                      "store: group messages and changes with members there are refused overloaded until it "
                      "takes them", stream.backlog, stream.backlog_bytes, node)
        raise RouteError("members of this group live on a node that has been unreachable for long; try again "
                         "later", code="overloaded", retry_after=OUTBOX_FULL_RETRY_MS)

    def remote_members(self, g: bytes, recipients, sender: str) -> int:
        """How many of group ``g``'s ``recipients`` but ``sender`` live on other nodes (a copy
        there for each at least: their devices are their nodes' to know; the sender's other
        devices, if it has any, are not counted)."""
        remote = sum(len(part) for _, part in self._fan_out_parts(g, recipients))
        return remote - 1 if self.home_of(sender) is not None else remote

    def _fan_out_parts(self, g: bytes, recipients) -> list[tuple[str, list]]:
        """``recipients`` of other nodes as (node, part) — a large group's members on one node in
        several parts, each entry well under max_payload — kept per group for a record's members
        (a message's: the same tuple until the group changes)."""
        cached = self._fanout_parts.get(g)
        if cached is not None and cached[0] is recipients:
            return cached[1]
        parts = [(node, part) for node, members in self._by_node(recipients).items() for part in _parts(members)]
        if type(recipients) is tuple:
            cache = self._fanout_parts
            replaced = cache.pop(g, None)
            if replaced is not None:
                self._fanout_members -= len(replaced[0])
            # Bounded by members too: an entry keeps its record's members alive after the record
            # changed (a review: 4,096 groups of 1,024 long addresses, about 0.45 GB).
            while cache and (len(cache) >= GROUP_CACHE_GROUPS
                             or self._fanout_members + len(recipients) > FANOUT_CACHE_MEMBERS):
                self._fanout_members -= len(cache.pop(next(iter(cache)))[0])
            cache[g] = (recipients, parts)
            self._fanout_members += len(recipients)
        return parts

    def outbox_committed(self, entries, now: float) -> None:
        """A commit ended: the outbox entries of its ``entries`` that were written join their streams."""
        outbox = self.outbox
        for entry in entries:
            if entry.refused is not None or entry.dup:
                continue  # nothing stored: nor its outbox entries (a duplicate's went with the first store)
            for node, seq, packed, record in entry.outbox:
                outbox.committed(node, seq, record, len(packed))
        self._pump(now)

    def _pump(self, now: float) -> None:
        """Send every outbox window that is due."""
        self._pump_asked = False
        for node, window in self.outbox.due(now):
            for seq, record, after in window:
                provider, localpart, device, max_plaintext, stanza = record
                delivery = _Delivery(self, node, seq, self._identity(provider, localpart, device), max_plaintext)
                sent = {**stanza, "o": seq}
                if after is not None:
                    sent["q"] = list(after)  # stored only after this one: the home's order, whatever happens on the way
                self._send(node, delivery, sent, GATHER, now, original={"t": "gfan", "k": stanza["k"]})

    def delivered(self, delivery: _Delivery, answer: dict | None, now: float) -> None:
        """A member node's answer to an outbox entry (None: none in time)."""
        result = outcome(answer)
        if result != OK and result != FINAL and answer is not None and answer.get("code") != "overloaded":
            log.warning("cluster: node %s did not store group fan-out entry %d (%s: %s); sending it again",
                        delivery.node, delivery.seq, answer.get("code"), answer.get("msg"))
        outbox = self.outbox
        outbox.answered(delivery.node, delivery.seq, result, now)
        for node, upto in outbox.take_acked().items():
            self.router.forget_outbox(node, upto)
        self._pump_asked = True

    def node_started(self, node: str, now: float) -> None:
        """Node ``node`` (re)started and listens (its hello came): the outbox entries still out to
        its former process go again now, not after their deadline and ``RETRY_S`` (its members'
        backlog arrives as the node comes up; an entry it stored is recognised there)."""
        stream = self.outbox.streams.get(node)
        if stream is None or not (stream.queue or stream.on_disk) or now - stream.kicked_at < RETRY_S:
            return  # nothing waits, or it was just sent again (a hello is no one's to repeat at will)
        stream.kicked_at = now
        lost = [seq for seq, pending in self.waiting.items()
                if pending.node == node and isinstance(pending.session, _Delivery)]
        for seq in lost:
            pending = self.waiting.pop(seq)
            self._done_waiting(pending)
            pending.session.node_answered(None, None, now)
        stream.retry_at = now
        self._pump(now)

    @property
    def needs_tick(self) -> bool:
        """Deadlines or outbox retries are due some time: the edge's ticker must keep running."""
        return bool(self.waiting) or self.outbox.has_work

    def group_state(self, session, g: bytes, members, state: str, now: float) -> None:
        """Group typing state for the members living on other nodes: pushed there, not answered."""
        sender = session.identity.user
        for node, users in self._by_node(member for member in members if member != sender).items():
            self._send(node, _Silent(session), {"t": "gfan", "k": "state", "g": g, "members": users, "s": state},
                       FORWARD, now, original={"t": "state"})

    def _serve_fanout(self, session, stanza: dict, now: float, home: str) -> None:
        """What a group's home node asks of this one for members living here: store a message's or
        an event's copies (an entry of the home's outbox: answered after the commit, recognised
        when it comes again), push typing state, or check members."""
        router = self.router
        identity = session.identity
        members = stanza.get("members")
        valid = router.address_provider  # checked once per address, remembered: every group message names them
        if type(members) is not list or not all(type(m) is str and valid(m) is not None for m in members):
            raise MalformedRecordError("gfan needs 'members': a list of addresses")
        k = stanza.get("k")
        ts = stanza.get("ts")
        if k in ("msg", "event") and (type(ts) is not int or not 0 <= ts < 1 << 53):
            raise MalformedRecordError("gfan needs 'ts': the group home's time in ms")
        if k == "msg":
            body = stanza.get("b")
            if type(stanza.get("id")) is not bytes or len(stanza["id"]) != 16 or type(body) is not bytes or not body:
                raise MalformedRecordError("gfan msg needs 'id' (16 bytes) and 'b' (bin)")
            if len(body) > self.groups.max_body_bytes:  # its copies must fit a frame here
                raise RouteError(f"gfan msg 'b' of {len(body)} bytes is over this node's {self.groups.max_body_bytes}",
                                 code="too_large")  # final: sent again it never fits (outbox.FINAL_REFUSALS)
        elif k == "event":
            self._check_event(stanza.get("fields"), identity, stanza.get("g"))
        elif k == "check":
            if type(stanza.get("id")) is not int:
                raise MalformedRecordError("gfan check needs the request's int 'id'")
        elif k == "state":
            if stanza.get("s") not in TYPING_STATES:
                raise MalformedRecordError("gfan state needs 's': a typing state")
        else:
            raise MalformedRecordError("gfan 'k' is one of check, msg, event, state")
        if k == "check":
            for member in members:
                try:
                    self.groups.check_addable(member, identity)
                except RouteError as exc:
                    router.answer(session, {"t": "err", "code": exc.code, "msg": exc.message, "id": stanza["id"], **exc.fields})
                    return
            router.answer(session, {"t": "res", "id": stanza["id"]})
            return
        g = stanza["g"]
        if k == "msg":
            fanin = _fanin(stanza, home)  # before anything is queued: a malformed entry stores nothing
            build = GroupDlv(stanza["id"], identity.user, identity.device, stanza["b"], g)
            items, targets = plan_group(members, identity.user, identity.device, self.store.devices,
                                        router.policy.blocks, build)
            entry = router.enqueue(session, stanza["id"], items, targets, stanza["ts"] / 1000)
            entry.skip_full = True
            entry.shared = True
            entry.fanin = fanin
            return
        if k == "event":
            fanin = _fanin(stanza, home)
            items, targets = self.groups.event_copies(members, identity.user, identity.device,
                                                      event_builder(stanza["fields"]), self.store.devices)
            router.enqueue_control(session, {"t": "res", "id": 0}, stanza["ts"] / 1000, items, targets).fanin = fanin
            return
        self.groups.push_state(members, frozenset(members), identity.user, g, stanza["s"], self.store.devices)

    def _check_event(self, fields, identity: Identity, g) -> None:
        """A membership event's fields as a group's home builds them (``Groups._change``): they are
        stored as the ``dlv`` itself, so nothing else may be in them, and they must fit a frame."""
        if type(fields) is not dict or not set(fields) <= EVENT_FIELDS or not {"k", "id", "from", "dev", "g", "event",
                                                                               "members", "ver"} <= set(fields):
            raise MalformedRecordError("gfan event 'fields' are those of a group event")
        ok = (fields["k"] == "group" and type(fields["id"]) is bytes and len(fields["id"]) == 16
              and fields["from"] == identity.user and fields["dev"] == identity.device and fields["g"] == g
              and fields["event"] in EVENT_KINDS and type(fields["ver"]) is int and 0 < fields["ver"] < 1 << 63
              and all(type(names) is list and all(type(m) is str and len(m) <= MAX_ADDRESS_CHARS for m in names)
                      for names in (fields["members"], fields.get("promoted", [])))
              and (fields.get("meta") is None or type(fields["meta"]) is bytes))
        if not ok:
            raise MalformedRecordError("gfan event 'fields' are not those of a group event")
        size = len(msgpack.packb(fields))
        if size > self.router.max_event_bytes:  # the home checks it too: nodes with other frame sizes
            raise RouteError(f"gfan event of {size} bytes is over this node's {self.router.max_event_bytes}",
                             code="too_large")  # final: sent again it never fits (outbox.FINAL_REFUSALS)

    def _gather(self, session, stanza: dict, now: float) -> None:
        """A look-up every node answers for its own users (``dir.lookup``): served here first —
        which checks and charges it, and may refuse it — then asked of every other node; the
        session gets the merged answer once all have answered (``_Gather``)."""
        gather = _Gather(self, session, stanza)
        self.serve_stanza(gather, stanza, now)
        if gather.done:  # refused here: that is the answer
            return
        self._admit(session, stanza, now)
        relayed = {"t": "iq", "id": stanza["id"], "op": stanza["op"], "phone": stanza["phone"]}
        for node in self.membership.nodes:
            if node != self.node:
                gather.waiting += 1
                self._send(node, gather, relayed, GATHER, now)

    def _admit(self, session, stanza: dict, now: float, *, charge: bool = True) -> int:
        """Refuse ``stanza`` while its device already has ``MAX_WAITING_PER_DEVICE`` stanzas or
        ``MAX_WAITING_BYTES_PER_DEVICE`` waiting for other nodes (``rate_limited``; a device's first
        always passes), or all devices' take ``MAX_WAITING_BYTES`` (``overloaded``); then charge it
        to its device's and user's rate (as a stored one). Returns what it counts of the bytes
        (``_send``'s ``size``)."""
        key = session.session_key
        if self._waiting_per_device.get(key, 0) >= MAX_WAITING_PER_DEVICE:
            raise RouteError(f"{MAX_WAITING_PER_DEVICE} requests already wait for other nodes; "
                             f"try again in {RETRY_AFTER_MS} ms", code="rate_limited", retry_after=RETRY_AFTER_MS)
        size = _payload_bytes(stanza)
        held = self._waiting_bytes_per_device.get(key, 0)
        if held and held + size > MAX_WAITING_BYTES_PER_DEVICE:
            raise RouteError(f"{held} bytes of your stanzas already wait for other nodes; try again in "
                             f"{RETRY_AFTER_MS} ms", code="rate_limited", retry_after=RETRY_AFTER_MS)
        if self.waiting_bytes + size > MAX_WAITING_BYTES:
            self.counters["waiting_full"] += 1
            raise RouteError(f"the gateway holds as much as it may for other nodes; try again in {RETRY_AFTER_MS} ms",
                             code="overloaded", retry_after=RETRY_AFTER_MS)
        if charge:
            self.router.charge(session, now)
        return size

    def _count_waiting(self, pending: Pending, size: int) -> None:
        """``pending`` of a client's stanza waits here: counted to its device (``_done_waiting`` ends it)."""
        key = pending.session.session_key
        self._waiting_per_device[key] = self._waiting_per_device.get(key, 0) + 1
        if size:
            pending.size = size
            self._waiting_bytes_per_device[key] = self._waiting_bytes_per_device.get(key, 0) + size
            self.waiting_bytes += size

    def _send(self, node: str, session, stanza: dict, kind: int, now: float, original: dict | None = None,
              size: int = 0) -> Pending:
        """Relay ``stanza`` of ``session`` to ``node``. A stored one (``msg``, ``rcpt``) of this
        node's session waits while an earlier one of the same device to the same node has no
        answer: a node that missed one (it was restarting, NATS was) must not store the next
        before the resend of the first (``_streams``)."""
        self._seq += 1
        identity = session.identity
        pending = Pending(session, stanza if original is None else original, kind, node, now)
        pending.seq = self._seq
        pending.record = [self._seq, identity.provider, identity.localpart, identity.device,
                          session.max_plaintext_bytes, stanza]
        key = session.session_key
        self._count_waiting(pending, size)
        self.counters["relayed"] += 1
        if kind in (FORWARD, OWN) and stanza["t"] in ("msg", "rcpt"):
            # A group's messages are a stream of their own: a group node that does not answer holds
            # up that device's group traffic, not its 1:1 messages (docs/protocol.md §6 lets them cross).
            pending.stream = (key, node, "g" in stanza)
            stream = self._streams.get(pending.stream)
            if stream is not None:
                stream.append(pending)  # held until the one before it is answered
                return pending
            self._streams[pending.stream] = deque([pending])
        self._launch(pending, now)
        return pending

    def _launch(self, pending: Pending, now: float) -> None:
        outgoing = self.outgoing.get(pending.node)
        if outgoing is None:
            outgoing = self.outgoing[pending.node] = []
            self._ask_flush()
        outgoing.append(pending.record)
        pending.record = None
        # A group home's member checks must fit in the time the sender's node gives the whole request.
        inner = isinstance(pending.session, _Checked)
        pending.sent = now
        self.waiting[pending.seq] = pending
        heapq.heappush(self._deadlines, (now + self.timeout_s * (INNER_SHARE if inner else 1.0), pending.seq))

    def _stream_answered(self, pending: Pending, now: float, *, timed_out: bool) -> None:
        """The stream's head was answered: send the next one; or it timed out: the ones held
        behind it are refused, never sent (nothing of them was stored anywhere)."""
        stream = self._streams[pending.stream]
        stream.popleft()
        if not timed_out:
            if stream:
                self._launch(stream[0], now)
            else:
                del self._streams[pending.stream]
            return
        del self._streams[pending.stream]
        for held in stream:
            self._done_waiting(held)
            self._await_resend(held, now)
            refused = {"t": "err", "code": "overloaded", "retry_after": RETRY_AFTER_MS, **reference(held.stanza),
                       "msg": f"an earlier message to node {held.node} got no answer; nothing was stored, resend this after it"}
            self._settle(held, encode_stanza(refused), refused, now)

    def _done_waiting(self, pending: Pending) -> None:
        key = pending.session.session_key
        _count_down(self._waiting_per_device, key)
        if pending.size:
            self.waiting_bytes -= pending.size
            _count_down(self._waiting_bytes_per_device, key, pending.size)
        if pending.stanza.get("op") == "blob.read":
            _count_down(self._blob_bytes_waiting, key, _read_cost(pending.stanza["len"]))

    def _chain(self, pending: Pending) -> None:
        chain = self._chains.get(pending.session.session_key)
        if chain is None:
            chain = self._chains[pending.session.session_key] = deque()
        chain.append(pending)

    def answered(self, node: str, seq: int, answer: bytes | None, now: float) -> float | None:
        """Node ``node`` answered relayed stanza ``seq`` (None: a ``state`` it served silently).
        Returns the round trip in seconds, or None for an answer that came too late (or from a
        node the stanza was not relayed to: counted, ignored)."""
        pending = self.waiting.get(seq)
        if pending is None or pending.node != node:
            self.counters["late_answers" if pending is None else "misrouted"] += 1
            return None
        del self.waiting[seq]
        self._done_waiting(pending)
        self.counters["answered"] += 1
        try:
            answer, decoded = self._checked_answer(pending, answer)
            if self._drawn_groups and pending.stanza.get("op") == "group.new" and (
                    decoded is None or decoded.get("code") not in ("overloaded", "rate_limited", "internal")):
                drawn = self._drawn_groups.get(entry := (pending.session.session_key, pending.stanza["id"]))
                if drawn is not None and drawn[0] == pending.stanza.get("g"):
                    # Answered for good: a later group.new under this iq id is a new one. (A refusal
                    # for now keeps it: the resend it asks for may still find the group made.)
                    self._forget_group_id(entry)
        except Exception:  # a bug of ours: the stanza is answered internal, and what its stream holds goes on
            log.exception("relay: taking an answer from node %s failed", node)
            self.counters["internal_errors"] += 1
            answer, decoded = internal_error(pending.stanza, "the gateway failed to take this stanza's answer"), None
        if pending.stream is not None:
            self._stream_answered(pending, now, timed_out=False)
        try:
            self._settle(pending, answer, decoded, now)
        except Exception:  # a bug of ours must cost this answer, never the rest of its batch
            log.exception("relay: settling an answer from node %s failed", node)
            self.counters["internal_errors"] += 1
        if self._pump_asked:
            self._pump(now)
        return now - pending.sent

    def _checked_answer(self, pending: Pending, answer: bytes | None) -> tuple[bytes | None, dict | None]:
        """Another node's answer as this node passes it on, encoded and decoded (decoded once, here):
        one stanza answering this one (``ack``, ``res`` or ``err``, naming its id), or nothing for
        typing state. Anything else is that node's bug (or worse): counted ``bad_answers``,
        answered ``internal`` here."""
        asked = pending.stanza.get("t")
        if asked == "gfan":  # an outbox entry: a message's copies are acked, an event's answered res
            asked = f"gfan-{pending.stanza.get('k')}"
        if answer is None:
            if asked == "state":
                return None, None
            problem = "nothing"
        elif len(answer) > (MAX_PLAINTEXT_BYTES if isinstance(pending.session, _Delivery)
                            else pending.session.max_plaintext_bytes):  # what goes on to a client fits its frame
            problem = f"{len(answer)} bytes, more than its client's frame takes"
        else:
            try:
                decoded = msgpack.unpackb(answer, raw=False)  # as strictly as its readers here decode it
            except (ValueError, TypeError):
                decoded = None
            kind = decoded.get("t") if type(decoded) is dict else None
            if kind in ANSWER_KINDS.get(asked, ("ack", "res", "err")) and (
                    kind != "err" or (decoded.get("code") in ERROR_CODES and type(decoded.get("msg")) is str
                                      and len(decoded["msg"]) <= MAX_ERR_MSG_CHARS)):
                wanted = reference(pending.stanza)
                got = decoded.get("ref", decoded.get("id"))
                if not wanted:
                    # Typing state has no id, so its refusal, passed on to the client, names none (it
                    # would name another stanza); an outbox entry's answer is read here only.
                    if asked != "state" or ("ref" not in decoded and "id" not in decoded):
                        return answer, decoded
                elif type(got) is type(want := next(iter(wanted.values()))) and got == want:
                    return answer, decoded
            problem = "something that is not its answer"
        self.counters["bad_answers"] += 1
        log.warning("cluster: node %s answered with %s", pending.node, problem)
        replaced = {"t": "err", "code": "internal", "msg": f"node {pending.node} answered with {problem}",
                    **reference(pending.stanza)}
        return encode_stanza(replaced), replaced

    def expire(self, now: float, *, everything: bool = False) -> int:
        """Answer every stanza whose node has not answered by its deadline: ``err`` ``overloaded``
        with ``retry_after`` and ``unconfirmed`` (nothing was acknowledged; it may have been stored,
        and a resend is recognised wherever its copies were); with ``everything``, all that waits
        (the link is closing). Returns how many."""
        deadlines, waiting = self._deadlines, self.waiting
        expired = 0
        until = math.inf if everything else now
        while deadlines and deadlines[0][0] <= until:
            _, seq = heapq.heappop(deadlines)
            pending = waiting.pop(seq, None)
            if pending is None:
                continue
            self._done_waiting(pending)
            expired += 1
            answer = timeout_refusal = None
            if pending.stanza["t"] != "state":  # typing state is not answered unless refused
                # "unconfirmed": it may have been stored there; resend the same id (docs/protocol.md §5).
                timeout_refusal = {
                    "t": "err", "code": "overloaded", "retry_after": RETRY_AFTER_MS, **reference(pending.stanza),
                    "msg": f"node {pending.node} did not answer in time; try again in {RETRY_AFTER_MS} ms",
                }
                if pending.stream is not None:
                    self._await_resend(pending, now)
                if pending.kind == FORWARD and pending.stanza.get("op") == "group.new":
                    self._remember_group_id(pending, now)
                if pending.stanza["t"] in ("msg", "rcpt") or pending.stanza.get("op") in GROUP_CHANGES:
                    timeout_refusal["unconfirmed"] = True
                    timeout_refusal["msg"] = (f"node {pending.node} did not answer in time; nothing was acknowledged, "
                                              f"resend the same id in {RETRY_AFTER_MS} ms")
                answer = encode_stanza(timeout_refusal)
            try:
                self._settle(pending, answer, timeout_refusal, now, timed_out=True)  # its refusal first, then those held behind it
            except Exception:  # a bug of ours must cost this stanza, never the other deadlines
                log.exception("relay: answering a stanza node %s did not answer failed", pending.node)
                self.counters["internal_errors"] += 1
            if pending.stream is not None:
                self._stream_answered(pending, now, timed_out=True)
        self.counters["timeouts"] += expired
        if self._resend_first:
            for key in [key for key, awaited in self._resend_first.items() if awaited.until <= now]:
                del self._resend_first[key]
        if self._drawn_groups:
            for entry in [entry for entry, (_, _, until) in self._drawn_groups.items() if until <= now]:
                self._forget_group_id(entry)
        if everything:  # closing: what the outbox holds is sent after the next start
            self._pump_asked = False
        elif self._pump_asked or self.outbox.has_work:
            self._pump(now)  # windows answered or timed out, retries whose wait is over
        return expired

    def _settle(self, pending: Pending, answer: bytes | None, decoded: dict | None, now: float, *,
                timed_out: bool = False) -> None:
        """``pending``'s answer (``answer`` encoded, ``decoded``; None: none) reaches its session,
        stand-in or place in its device's chain."""
        if pending.kind == FORWARD:
            if answer is not None:
                self.router.push_encoded(pending.session, answer)
            return
        if pending.kind == GATHER:
            pending.session.node_answered(answer, decoded, now)
            return
        pending.answer, pending.done = answer, True
        pending.acked = decoded is not None and decoded.get("t") == "ack"
        key = pending.session.session_key
        chain = self._chains.get(key)
        if timed_out and chain:
            # Its own copies' place in the device's order is lost until it is resent: the device's
            # stanzas behind it in the chain now are refused (not stored here; resent after it).
            # Those the device sends from now on are not: they come after the resend's chance.
            for later in chain:
                if later is not pending:
                    later.poisoned = True
                    self._await_resend(later, now)  # awaited now, though refused only when it settles
        while chain and chain[0].done:
            head = chain.popleft()
            if head.kind == DEFERRED:
                self._done_waiting(head)  # (one that went to a node was counted down at its answer)
            if head.poisoned:
                self.counters["held_back"] += 1
                self.router.push_encoded(head.session, encode_stanza({
                    "t": "err", "code": "overloaded", "retry_after": RETRY_AFTER_MS, **reference(head.stanza),
                    **({"unconfirmed": True} if head.kind == OWN and head.record is None else {}),  # it left
                    "msg": "an earlier message of this device got no answer in time; resend this after it"}))
                continue
            try:
                self._serve_here(head.session, head.stanza, now, own_only=head.kind != DEFERRED, answer=head.answer,
                                 acked=head.acked)
            except Exception:  # a bug of ours must cost this stanza, never the device's later ones
                log.exception("relay: settling a stanza of %s failed", head.session.session_key)
                self.counters["internal_errors"] += 1
                self.router.push_encoded(head.session, internal_error(head.stanza, "the gateway failed to store this"))
        if chain is not None and not chain:
            del self._chains[key]

    def _serve_here(self, session, stanza: dict, now: float, *, own_only: bool, answer: bytes | None,
                    acked: bool) -> None:
        """Store here what this node keeps of a stanza: all of a deferred local one; the sender's
        own copies of one the recipient's node answered (``answer``), then answer the sender.
        Once the recipient's node acked, the sender gets that ack whatever happens to its own
        copies here (a device registered meanwhile, a full mailbox): the message is stored."""
        router = self.router
        if own_only:
            if not acked:
                if answer is not None:
                    router.push_encoded(session, answer)  # refused there: nothing is stored here either
                return
            session = _OwnCopies(session, answer, self)
        try:
            if stanza["t"] == "msg":
                entry = router.route_msg(session, stanza, stanza["id"], now, own_only=own_only)
            else:
                entry = router.route_rcpt(session, stanza, now, own_only=own_only)
        except (RouteError, StanzaError) as exc:
            if own_only:  # own copies refused here (a device registered meanwhile): the message is stored
                self.counters["own_copies_lost"] += 1
                router.push_encoded(session.session, answer)
                return
            router.answer(session, refusal(exc, stanza))
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
        device, max plaintext bytes, stanza]; its answer is owed back (``take_output``). A record
        whose sender does not live on ``node``, or whose stanza is for a user who does not live
        here, is refused: the nodes disagree about the node list (or ``node`` is not a node).
        Once one of ``node``'s outbox entries is not stored, its later ones in ``records`` are
        refused too (``overloaded``): the home sends them again after it, in order."""
        stream_broken = False
        for record in records:
            try:
                stream_broken = self._serve_record(node, record, now, stream_broken)
            except Exception:  # a bug of ours must cost this record, never the rest of the batch
                log.exception("relay: serving a record node %s relayed failed", node)
                self.counters["internal_errors"] += 1
                stream_broken = True
                if type(record) is list and record and type(record[0]) is int:
                    self.reply(node, record[0], internal_error({}, "the gateway failed to handle this stanza"))

    def _serve_record(self, node: str, record, now: float, stream_broken: bool) -> bool:
        """Serve one record of ``serve``; returns whether ``node``'s outbox stream is broken now."""
        try:
            seq, provider, localpart, device, max_plaintext, stanza = record
            if (type(seq) is not int or type(stanza) is not dict or type(max_plaintext) is not int
                    or not MIN_PLAINTEXT_BYTES <= max_plaintext <= MAX_PLAINTEXT_BYTES):
                raise TypeError("a relayed record's fields have the wrong types or values")
            identity = self._identity(provider, localpart, device)
        except (TypeError, ValueError, InterlinkError):
            self.counters["malformed"] += 1
            return True  # it may have been an outbox entry
        session = RelayedSession(self, node, seq, identity, max_plaintext)
        self.counters["served"] += 1
        return self._serve_parsed(node, session, stanza, now, stream_broken)

    def _serve_parsed(self, node: str, session: RelayedSession, stanza: dict, now: float, stream_broken: bool) -> bool:
        """``_serve_record`` once the record is read: check where the stanza belongs, serve it."""
        identity = session.identity
        kind = stanza.get("t")
        if type(kind) is not str:
            kind = None  # refused below, as any kind not relayed
        streamed = kind == "gfan" and "o" in stanza  # an outbox entry: stored in the home's order
        if streamed and stream_broken:
            session.send_encoded(encode_stanza({
                "t": "err", "code": "overloaded", "retry_after": RETRY_AFTER_MS,
                "msg": "an earlier entry of this fan-out was not stored; send this again after it"}))
            return True
        if streamed:
            stream_broken = True  # until it is served below
        op = stanza.get("op") if kind == "iq" else None
        op = op if type(op) is str else None
        gathered = op in GATHERED_OPS
        grouped = op in GROUP_OPS or (kind in ("msg", "state") and "g" in stanza)
        fanout = kind == "gfan"
        if grouped:  # at the group's home, from the sender's home
            target, origin = stanza.get("g"), identity.user
        elif fanout:  # at a member's home, from the group's home
            target, origin = None, stanza.get("g")
            if type(origin) is not bytes or len(origin) != GROUP_ID_BYTES:
                origin = b""  # homed nowhere: refused below
        else:
            target = (stanza.get("blob") if op in BLOB_OPS else stanza.get("user")) if kind == "iq" else stanza.get("to")
            origin = identity.user
        if kind not in SERVED_KINDS or (kind == "iq" and op not in RELAYED_OPS and op not in BLOB_OPS
                                        and not gathered and not grouped):
            self.counters["malformed"] += 1
            session.send_encoded(internal_error(stanza, "this stanza is not relayed between nodes"))
            return stream_broken
        members = stanza.get("members") if fanout else None
        if ((not gathered and not fanout and (type(target) not in (str, bytes) or len(target) > MAX_ADDRESS_CHARS
                                              or self.home_of(target, cache=op not in BLOB_OPS) is not None))
                or (type(origin) not in (str, bytes) or not origin or self.home(origin) != node)
                or (fanout and (type(members) is not list or any(
                    type(m) is not str or len(m) > MAX_ADDRESS_CHARS or self.home_of(m) is not None for m in members)))):
            self.counters["misrouted"] += 1  # the nodes disagree about the node list
            session.send_encoded(internal_error(stanza, "the cluster's nodes disagree about where this user lives"))
            return stream_broken
        provider = self.router.registry.get(identity.provider)
        if provider is None or provider.suspended:  # suspended here, not yet on the sender's node
            self.counters["refused"] += 1
            session.send_encoded(encode_stanza({
                "t": "err", "code": "provider_suspended", **reference(stanza),
                "msg": f"provider {identity.provider!r} is not served (suspended or removed)"}))
            return stream_broken and not streamed  # refused for good (outbox.FINAL_REFUSALS)
        try:
            if grouped and self.held and self.hold(
                    target, session, stanza, lambda later: self._serve_parsed(node, session, stanza, later, False)):
                return stream_broken  # served after the change of its group that waits for other nodes
            if fanout:
                self._serve_fanout(session, stanza, now, node)
            elif op in ("group.new", "group.add"):
                request = self._checked_group_request(stanza)
                if op == "group.new" and self.groups.record(request["g"]) is not None:
                    self.serve_stanza(session, request, now)  # a resend for a group made already: no checks
                else:
                    self._precheck(session, request, now)
            else:
                self.serve_stanza(session, stanza, now)
        except MalformedRecordError as exc:  # another node's bug (or worse): counted, not a bug of ours
            self.counters["malformed"] += 1
            session.send_encoded(internal_error(stanza, f"a malformed relayed record: {exc}"))
            return stream_broken
        except (RouteError, StanzaError) as exc:
            session.send_encoded(encode_stanza(refusal(exc, stanza)))
            return stream_broken
        except Exception:  # a bug of ours must cost this stanza, never the rest of the batch
            log.exception("relay: serving a stanza node %s relayed failed", node)
            self.counters["internal_errors"] += 1
            session.send_encoded(internal_error(stanza, "the gateway failed to handle this stanza"))
            return stream_broken
        if kind == "state" or (fanout and stanza.get("k") == "state"):
            session.served_silently()
        return stream_broken and not streamed

    def _checked_group_request(self, stanza: dict) -> dict:
        """A relayed ``group.new``/``group.add`` rebuilt from its checked fields (as the sender's
        node built it), for the member checks."""
        if type(stanza.get("id")) is not int:
            raise MalformedRecordError("a relayed group request needs its int 'id'")
        fields = self.groups.request_fields(stanza)
        g = stanza.get("g")
        if type(g) is not bytes or len(g) != GROUP_ID_BYTES:
            raise MalformedRecordError("a relayed group request needs its 16-byte 'g'")
        fields["g"] = g
        return fields

    def reply(self, node: str, seq: int, encoded: bytes | None) -> None:
        replies = self.replies.get(node)
        if replies is None:
            replies = self.replies[node] = []
            self._ask_flush()
        replies.append([seq, encoded])

    def _identity(self, provider, localpart, device) -> Identity:
        if type(provider) is not str or type(localpart) is not str or type(device) is not int:
            raise TypeError("a relayed sender is (provider id, localpart, device number)")  # True == 1: before the cache
        key = (provider, localpart, device)
        identity = self._identities.get(key)
        if identity is None:
            if (PROVIDER_ID_RE.fullmatch(provider) is None or localpart_error(localpart) is not None
                    or not 1 <= device <= MAX_DEVICE_ID):
                raise TypeError("a relayed sender is (provider id, localpart, device number), each as a client's is")
            identity = Identity(provider=provider, localpart=localpart, device=device, expires_at=float("inf"))
            if len(self._identities) >= IDENTITIES_KEPT:
                del self._identities[next(iter(self._identities))]
            self._identities[key] = identity
        return identity
