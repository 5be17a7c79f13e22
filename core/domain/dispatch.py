"""The gateway's rules as one sans-I/O object: what each stanza of an open session does.

``Domain`` builds the policy, the router, the groups and the operations through their
constructors and serves stanzas with ``dispatch(session, stanza, now)``. It never calls the event
loop or a socket; its only outputs are stanzas queued on sessions (each such session stays in
``router.touched`` until the edge writes it out) and the writes of the turn (``take_batch``),
which the edge commits and hands back (``committed`` or ``failed``). A unit test can drive it
with an LMDB store, fake sessions and a ``now`` of its choosing.
"""

from __future__ import annotations

import time
from collections import Counter

from interlink.core.domain.admission import Admission
from interlink.core.domain.auth import ProviderRegistry
from interlink.core.errors import InterlinkError, StanzaError
from interlink.core.domain.fields import excerpt
from interlink.core.domain.push import Push
from interlink.core.domain.blobs import BlobLimits, Blobs
from interlink.core.domain.groups import Groups
from interlink.core.domain.ops import Operations
from interlink.core.domain.policy import Policy
from interlink.core.domain.cluster import Membership
from interlink.core.domain.relay import HELD_KINDS, RELAY_KINDS, Relay, refusal
from interlink.core.domain.router import Commit, RouteError, Router, Session, stanza_id, typing_state
from interlink.core.domain.ports import BlobFiles, Offload, Store
from interlink.core.protocol.stanza import encode_stanza


class Domain:
    """Routing, groups and operations over one store, driven stanza by stanza."""

    def __init__(
        self,
        *,
        store: Store,
        registry: ProviderRegistry,
        window: int,
        max_frame_bytes: int,
        max_group: int,
        message_rate_per_device: float,
        message_rate_per_user: float,
        overload_turn_messages: int,
        overload_refuse_after_s: float,
        blob_files: BlobFiles | None = None,
        offload: Offload | None = None,
        blob_writer: Offload | None = None,
        blob_limits: BlobLimits | None = None,
        membership: Membership | None = None,
        node: str | None = None,
        relay_timeout_s: float = 2.0,
        clock=time.time,
    ) -> None:
        self.store = store
        self.admission = Admission(turn_budget=overload_turn_messages, refuse_after_s=overload_refuse_after_s)
        self.policy = Policy(store)  # one instance: its cache is written through by the operations
        self.router = Router(
            store=store,
            registry=registry,
            policy=self.policy,
            window=window,
            max_frame_bytes=max_frame_bytes,
            message_rate_per_device=message_rate_per_device,
            message_rate_per_user=message_rate_per_user,
        )
        self.groups = Groups(store=store, registry=registry, policy=self.policy, router=self.router, max_group=max_group)
        # Blobs need somewhere to keep their bytes and worker threads to hash them: without
        # those (a unit test of something else), blob.* stays an unknown operation.
        self.blobs = None
        self.push = Push(store=store, registry=registry, router=self.router)
        more_handlers = {**self.groups.handlers, **self.push.handlers}
        if blob_files is not None:
            self.blobs = Blobs(store=store, files=blob_files, offload=offload, writer=blob_writer, router=self.router,
                               limits=blob_limits, max_frame_bytes=max_frame_bytes)
            more_handlers.update(self.blobs.handlers)
        self.ops = Operations(
            store=store, registry=registry, policy=self.policy, router=self.router, more_handlers=more_handlers
        )
        self._handlers = {
            "msg": self.handle_msg,
            "recv": self.router.handle_recv,
            "rcpt": self.router.handle_rcpt,
            "state": self.handle_state,
            "iq": self.ops.handle_iq,
        }
        # A cluster's node (core/domain/relay.py): stanzas for users homed on other nodes go there.
        self.relay: Relay | None = None
        if membership is not None:
            self.relay = Relay(membership=membership, node=node, router=self.router, serve=self.dispatch,
                               timeout_s=relay_timeout_s, groups=self.groups, clock=clock)
            self.groups.relay = self.relay
            if self.blobs is not None:  # a blob lives on the node its id hashes to: its uploader's
                self.blobs.new_id = self.relay.new_blob_id
                self.relay.blob_chunk_bytes = self.blobs.chunk_bytes
                self.relay.charge_blob = self.blobs.charge
        self.stanzas_in: Counter = Counter()  # by stanza type ("unknown" for the rest)
        self.refusals: Counter = Counter()  # err answers to stanzas, by code
        self._overloaded_answer = (0, b"")  # (retry_after, the encoded answer without the ref's value)

    # -- stanzas

    def dispatch(self, session: Session, stanza: dict, now: float, waited: bool = False) -> None:
        """Serve one stanza (``ping`` is answered by the connection itself). A refused stanza gets
        ``err`` and the session continues. Answers never echo client text beyond a short,
        sanitised excerpt: an answer must not outgrow its request. ``waited``: served after it
        waited for a change of its group (``Relay.hold``): admitted and counted when it came."""
        kind = stanza["t"]
        if kind == "msg" and self.admission.refusing and not waited and self._refused_overloaded(session, stanza, now):
            return
        handler = self._handlers.get(kind)
        try:
            if handler is None:
                self.stanzas_in["unknown"] += 1  # not the client's string: labels stay a fixed set
                raise StanzaError(f"unsupported stanza type {excerpt(kind)}")
            if not session.relayed and not waited:  # another node's stanza was counted there
                self.stanzas_in[kind] += 1
            if (self.relay is not None and self.relay.held and not session.relayed and kind in HELD_KINDS
                    and self.relay.hold(stanza.get("g"), session, stanza,
                                        lambda later: self.dispatch(session, stanza, later, True))):
                return  # a cluster's group home: served after the change of its group that waits for other nodes
            relay = self.relay if kind in RELAY_KINDS and not session.relayed else None
            if relay is not None and relay.take(session, stanza, now):
                return
            handler(session, stanza, now)
            if relay is not None:
                relay.served_here()  # an awaited resend served here is awaited no more
        except (RouteError, StanzaError) as exc:
            answer = refusal(exc, stanza)
            self.refusals[answer["code"]] += 1
            self.router.answer(session, answer)

    def _refused_overloaded(self, session: Session, stanza: dict, now: float) -> bool:
        """Admission control's second level: answer a ``msg`` beyond its turn's budget with
        ``err overloaded`` and ``retry_after``, before it spends a rate token (an overloaded
        gateway is not the sender's fault). The answer is pre-encoded: under overload, a refusal
        must cost a small fraction of an admitted message. False: admit it (or let the ordinary
        path answer a malformed id)."""
        msg_id = stanza.get("id")
        if type(msg_id) is not bytes or len(msg_id) != 16:
            return False
        retry_after = self.admission.refusal(self.router.pending_load, now)
        if not retry_after:
            return False
        cached_after, prefix = self._overloaded_answer
        if cached_after != retry_after:  # retry_after changes only when a turn ends
            answer = {
                "t": "err", "code": "overloaded", "msg": f"the gateway is overloaded; try again in {retry_after} ms",
                "retry_after": retry_after, "ref": bytes(16),
            }
            prefix = encode_stanza(answer)[:-16]  # "ref"'s value is last: the id is appended
            self._overloaded_answer = (retry_after, prefix)
        self.stanzas_in["msg"] += 1
        self.refusals["overloaded"] += 1
        self.router.push_encoded(session, prefix + msg_id)
        return True

    def handle_msg(self, session: Session, stanza: dict, now: float) -> None:
        self.router.charge(session, now)
        msg_id = stanza_id(stanza, "msg")
        if "g" in stanza:
            self.groups.route_msg(session, stanza, msg_id, now)
        else:
            self.router.route_msg(session, stanza, msg_id, now)

    def handle_state(self, session: Session, stanza: dict, now: float) -> None:
        self.router.charge(session, now)
        state = typing_state(stanza)
        if "g" in stanza:
            self.groups.route_state(session, stanza, state, now)
        else:
            self.router.route_state(session, stanza, state)

    # -- the group commit, driven by the edge

    def take_batch(self, now: float) -> Commit | None:
        """The turn's writes for the edge to commit (None: nothing to write); the turn's size is
        admission control's measure."""
        commit = self.router.take_batch()
        if commit is not None:
            self.admission.turn_ended(commit.batch.load, now)
        return commit

    def committed(self, commit: Commit) -> None:
        try:
            for change, written in self.router.committed(commit):
                self.groups.settled(change, written)
        finally:
            # A cluster's group home: what other nodes store now goes there — whatever went wrong
            # above, or later entries would be stored there first and these taken for duplicates.
            if commit.batch.outboxed:
                self.relay.outbox_committed(commit.batch.outboxed, self.relay.clock())

    def failed(self, commit: Commit, exc: InterlinkError) -> None:
        for change, written in self.router.failed(commit, exc):
            self.groups.settled(change, written)
