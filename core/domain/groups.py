"""Groups (docs/protocol.md §6 "Groups", §7 group operations): membership operations, fan-out
of group messages, group typing. What the contract leaves open is decided in docs/protocol.md,
and how it is built is in docs/architecture.md, "Groups".

A group is one ``GroupRecord`` (members in join order, admins, opaque ``meta``, ``ver``); every
change is a new record, queued with the ``dlv`` kind ``group`` items that announce it as one
control entry of the router's batch, so the record and its events commit in one transaction and
the ``res`` goes out after that commit, like an ``ack``. Each write is a compare-and-set on the
stored ``ver``: after a failed commit, what was computed from its records is refused
(``overloaded``) rather than written. Records are read through ``_dirty`` (changes not yet
settled: the truth until they are) and ``_cache`` (committed records, bounded); the fan-out plan
per record and each copy's ``dlv`` bytes come from ``fanout`` (compiled, or its pure twin).
"""

from __future__ import annotations

import hashlib
import math
import os

import msgpack

from interlink.core.domain.auth import ProviderRegistry
from interlink.core.errors import StanzaError
from interlink.core.domain.fanout import GroupDlv, plan_cached
from interlink.core.domain.fields import address_provider, excerpt, kind_of
from interlink.core.domain.ops import DEFERRED
from interlink.core.domain.policy import Policy
from interlink.core.domain.ratelimit import TokenBuckets
from interlink.core.domain.router import RouteError, Router, Session
from interlink.core.protocol.stanza import encode_stanza
from interlink.core.domain.batch import COPIES_PER_LOAD, GroupRecord, GroupWrite, device_key
from interlink.core.domain.ports import Store

GROUP_ID_BYTES = 16
MAX_META_BYTES = 4096  # group.new's 'meta' (opaque, encrypted by the clients)
GROUP_CACHE_GROUPS = 4096  # committed records kept in memory
EVENT_OVERHEAD_BYTES = 160  # room an event dlv needs beside 'members' and 'meta' (the creator's address, ...)
RES_OVERHEAD_BYTES = 96  # a group.get res's fields besides members, admins and meta
MAX_GROUP_BODY_BYTES = 16 << 10  # a group msg's 'b' (stored once, but counted in every device's quota): large content goes as a blob
# A group msg spends one rate token per COPIES_PER_LOAD copies (at least one), as it counts in
# admission control's load (core/domain/batch.py).
CHANGE_BURST, CHANGE_RATE = 20, 10.0  # membership changes per group: burst, then per second
STATE_INTERVAL_S = 1.0  # group typing: at most one state per (sender, group) per this interval
STATE_KEYS = 65_536  # (sender, group) pairs whose last state time is remembered
PLAN_CACHE_COPIES = 200_000  # device copies the cached fan-out plans may describe (about 150 bytes each)


class Groups:
    """Group membership and fan-out; plugs into the router (``msg``/``state`` with ``g``) and the
    operations table (``group.*``)."""

    def __init__(
        self, *, store: Store, registry: ProviderRegistry, policy: Policy, router: Router, max_group: int,
        cache_groups: int = GROUP_CACHE_GROUPS,
    ) -> None:
        self.store = store
        self.registry = registry
        self.policy = policy
        self.router = router
        self.max_group = max_group
        self.cache_groups = cache_groups
        # A 'members' list and a created event's meta must fit one event dlv in one frame (a
        # gateway configured with small frames gets a smaller meta bound too).
        self.max_meta_bytes = min(MAX_META_BYTES, router.max_ciphertext_bytes // 4)
        self.max_members_bytes = router.max_ciphertext_bytes - EVENT_OVERHEAD_BYTES - self.max_meta_bytes
        self._dirty: dict[bytes, GroupWrite] = {}
        self._cache: dict[bytes, GroupRecord] = {}
        self.max_body_bytes = min(MAX_GROUP_BODY_BYTES, router.max_ciphertext_bytes)
        self.change_buckets = TokenBuckets(CHANGE_BURST, CHANGE_RATE)  # per group id
        self._state_sent: dict[tuple[str, bytes], float] = {}  # (sender, g) -> when its last state went out
        # g -> (record, rows): the per-record fan-out plan (member -> devices, device keys,
        # targets), made again for a new record (keyed by the record object: a refused change
        # and its replacement may share a ver) or for a member whose devices changed.
        self._plans: dict[bytes, list] = {}  # g -> [record, rows, copies]
        self._plan_copies = 0  # the sum of the cached plans' copies, kept under PLAN_CACHE_COPIES
        # A cluster's node (core/domain/relay.py): members homed on other nodes get their copies
        # from there; set by the Domain.
        self.relay = None
        self.handlers = {
            "group.new": self.group_new,
            "group.add": self.group_add,
            "group.del": self.group_del,
            "group.leave": self.group_leave,
            "group.get": self.group_get,
        }

    # -- records

    def record(self, g: bytes) -> GroupRecord | None:
        """The group as the next commit will leave it (None: no such group)."""
        change = self._dirty.get(g)
        if change is not None:
            return change.record
        record = self._cache.get(g)
        if record is None:
            record = self.store.group(g)
            if record is not None:  # unknown ids are not cached: random ids must not fill the cache
                self._remember(g, record)
        return record

    def committed(self, g: bytes) -> GroupRecord | None:
        """The group as last committed (a change still committing is not seen)."""
        record = self._cache.get(g)
        if record is None:
            record = self.store.group(g)
            if record is not None and g not in self._dirty:
                self._remember(g, record)
        return record

    def _guard(self, message, g: bytes, record: GroupRecord) -> None:
        """An entry computed from ``record`` while a change of ``g`` is committing is stored only
        if that change was (the store compares the stored ``ver``; ``conflict`` otherwise)."""
        if g in self._dirty:
            message.guard = (g, record.ver)

    def _remember(self, g: bytes, record: GroupRecord) -> None:
        cache = self._cache
        if g not in cache and len(cache) >= self.cache_groups:
            del cache[next(iter(cache))]
        cache[g] = record

    def settled(self, change: GroupWrite, ok: bool) -> None:
        """The router's commit of ``change`` ended (``ok``: written)."""
        g = change.g
        if self._dirty.get(g) is change:
            del self._dirty[g]
        if ok and change.record is not None:
            self._remember(g, change.record)
        else:
            self._cache.pop(g, None)  # deleted, or refused: read the store again

    def _member_record(self, g: bytes, user: str, what: str) -> GroupRecord:
        record = self.record(g)
        if record is None:
            raise RouteError(f"{what}: no such group", code="not_found")
        if user not in record.member_set:
            raise RouteError(f"{what}: you are not a member of this group", code="not_member")
        return record

    # -- operations

    def check_size(self, op: str, members: int) -> None:
        """``too_large`` for a ``group.new``/``group.add`` that would make a group of ``members``."""
        if members > self.max_group:
            with_you = " with you" if op == "group.new" else ""
            raise RouteError(f"{op}: the group would have {members} members{with_you} (at most {self.max_group})",
                             code="too_large")

    def group_new(self, session: Session, stanza: dict, now: float):
        identity = session.identity
        creator = identity.user
        members = self._members(stanza, "group.new", allow_empty=True)
        meta = self._meta(stanza)
        others = [member for member in members if member != creator]
        self.check_size("group.new", 1 + len(others))
        # In a cluster the id is drawn by the creator's node, which sends the request to the node
        # the id makes the group's home (relayed: the session is another node's word).
        if self.relay is None:
            g = os.urandom(GROUP_ID_BYTES)
        else:
            g = stanza.get("g") if session.relayed else None
            if type(g) is not bytes or len(g) != GROUP_ID_BYTES or self.relay.home_of(g) is not None:
                raise RouteError("group.new reached the handler without a group id of this node", code="internal")
            existing = self.record(g)
            if existing is not None:
                if existing.members[:1] == (creator,) and creator in existing.admins:
                    # The creator's resend of a group.new whose answer its node never got (it keeps
                    # the id it drew for that): answered for the group made, before any member check
                    # (consent may have changed since), nothing made twice.
                    return self._unchanged(session, now, stanza["id"], g, existing, {"g": g})
                raise RouteError("group.new: the cluster chose a group id that is taken; try again", code="overloaded")
        self.router.charge(session, now)
        for member in others:
            self.check_addable(member, identity, session)
        record = GroupRecord(1, (creator, *others), (creator,), meta)
        self._change(session, now, stanza["id"], g, 0, record, "created", list(record.members), (), {"g": g})
        return DEFERRED

    def group_add(self, session: Session, stanza: dict, now: float):
        identity = session.identity
        g = _group_id(stanza.get("g"), "group.add")
        members = self._members(stanza, "group.add", allow_empty=False)
        record = self._admin_record(g, identity.user, "group.add")
        added = [member for member in members if member not in record.member_set]
        self.check_size("group.add", len(record.members) + len(added))
        self.router.charge(session, now)
        for member in added:
            self.check_addable(member, identity, session)
        if not added:
            return self._unchanged(session, now, stanza["id"], g, record)
        new = GroupRecord(record.ver + 1, record.members + tuple(added), record.admins, record.meta)
        self._change(session, now, stanza["id"], g, record.ver, new, "added", added, ())
        return DEFERRED

    def group_del(self, session: Session, stanza: dict, now: float):
        identity = session.identity
        g = _group_id(stanza.get("g"), "group.del")
        members = self._members(stanza, "group.del", allow_empty=False)
        if identity.user in members:
            raise StanzaError("group.del: to remove yourself, use group.leave")
        record = self._admin_record(g, identity.user, "group.del")
        self.router.charge(session, now)
        removed = [member for member in members if member in record.member_set]
        if not removed:
            return self._unchanged(session, now, stanza["id"], g, record)
        gone = set(removed)
        new = GroupRecord(
            record.ver + 1,
            tuple(m for m in record.members if m not in gone),
            tuple(a for a in record.admins if a not in gone),
            record.meta,
        )
        self._change(session, now, stanza["id"], g, record.ver, new, "removed", removed, removed)
        return DEFERRED

    def group_leave(self, session: Session, stanza: dict, now: float):
        identity = session.identity
        user = identity.user
        g = _group_id(stanza.get("g"), "group.leave")
        record = self._member_record(g, user, "group.leave")
        self.router.charge(session, now)
        members = tuple(m for m in record.members if m != user)
        admins = tuple(a for a in record.admins if a != user)
        promoted = ()
        if members and not admins:
            promoted = admins = (members[0],)  # the longest-standing member
        new = GroupRecord(record.ver + 1, members, admins, record.meta) if members else None
        self._change(session, now, stanza["id"], g, record.ver, new, "left", [user], [user], promoted=promoted,
                     ver=record.ver + 1)
        return DEFERRED

    def group_get(self, session: Session, stanza: dict, now: float):
        identity = session.identity
        g = _group_id(stanza.get("g"), "group.get")
        skip = stanza.get("skip", 0)
        if type(skip) is not int or skip < 0:
            raise StanzaError("group.get: 'skip' must be an int >= 0 (members already received)")
        record = self._member_record(g, identity.user, "group.get")
        budget = session.max_plaintext_bytes - RES_OVERHEAD_BYTES - len(record.meta or b"")
        page, size = [], 0
        for member in record.members[skip:]:
            cost = 2 * len(encode_stanza(member))  # listed as a member, and maybe as an admin
            if size + cost > budget:
                break
            page.append(member)
            size += cost
        on_page = set(page)
        result = {
            "members": page,
            "admins": [a for a in record.admins if a in on_page],
            "meta": record.meta,
            "ver": record.ver,
            "more": skip + len(page) < len(record.members),
        }
        if g in self._dirty:
            # A change of this group is still being committed: answer after it, so that nothing
            # uncommitted is ever shown.
            message = self.router.enqueue_control(session, {"t": "res", "id": stanza["id"], **result}, now)
            self._guard(message, g, record)
            return DEFERRED
        return result

    # -- messages and typing

    def _charge_copies(self, session: Session, now: float, copies: int) -> None:
        """A group stanza's ``copies`` beyond its own token: one token per ``COPIES_PER_LOAD``, the
        first paid already — by its handler here (``paid_here``: a ``_Checked`` change's at
        ``_precheck``, or not at all for a relayed sender's), else at its sender's node — charged
        here for a relayed sender too (``here``: only the group's home can count them)."""
        extra = (copies + COPIES_PER_LOAD - 1) // COPIES_PER_LOAD - 1
        if extra > 0:
            self.router.charge(session, now, extra, here=True,
                               paid=getattr(session, "paid_here", 0 if session.relayed else 1))

    def _stored_before(self, session: Session, sender: str, device: int, msg_id: bytes, now: float) -> bool:
        """Whether this message is stored already (in the dedup window): then it is answered with
        its dup ack, and nothing more is done for it."""
        if not self.store.seen(device_key(sender, device), msg_id):
            return False
        self.router.enqueue(session, msg_id, [], [], now)
        return True

    def route_msg(self, session: Session, stanza: dict, msg_id: bytes, now: float) -> None:
        """A group ``msg``: fan ``b`` out to every device of every member but the sending device,
        in the router's group commit."""
        identity = session.identity
        g, body = self._message_fields(stanza)
        sender, sender_device = identity.user, identity.device
        record = self.record(g)
        if record is None or sender not in record.member_set:
            # A resend of a message already stored answers dup, whatever the membership is now.
            if self._stored_before(session, sender, sender_device, msg_id, now):
                return
            record = self._member_record(g, sender, "msg")  # raises not_found / not_member
        # The per-device plan and each copy's dlv bytes: core/domain/fanout.py (compiled, or its pure twin).
        build = GroupDlv(msg_id, sender, sender_device, body, g)
        plans = self._plans
        plan = plans.get(g)
        fresh = plan is None or plan[0] is not record
        if fresh:
            if plan is not None:
                self._plan_copies -= plans.pop(g)[2]
            plan = [record, {}, 0]
        blocked = self.policy.blocked_among(record.members, record.member_set, sender)  # one look-up per message
        items, targets = plan_cached(plan[1], record.members, sender, sender_device, self._devices_of(), blocked, build)
        if fresh and len(items) <= PLAN_CACHE_COPIES:
            plan[2] = len(items) + 1
            self._plan_copies += plan[2]
            plans[g] = plan
            while self._plan_copies > PLAN_CACHE_COPIES:
                self._plan_copies -= plans.pop(next(iter(plans)))[2]
        # One token is spent already (handle_msg, on the sender's node); the copies cost one per
        # COPIES_PER_LOAD, counted and charged here at the group's home — its members on other nodes
        # one copy each — for a sender of another node too: its node cannot count them.
        # A resend of a message already stored fans nothing out again: it gets its dup ack, not a
        # refusal its sender would meet for as long as a member node stays away (the store is
        # asked only when the message would be refused).
        copies = len(items)
        if self.relay is not None:
            full = self.relay.full_member_node(g, record.members)
            if full is not None:
                if self._stored_before(session, sender, sender_device, msg_id, now):
                    return
                self.relay.refuse_outbox_full(full)
            copies += self.relay.remote_members(g, record.members, sender)
        try:
            self._charge_copies(session, now, copies)
        except RouteError:
            if self._stored_before(session, sender, sender_device, msg_id, now):
                return
            raise
        message = self.router.enqueue(session, msg_id, items, targets, now)
        message.skip_full = True
        message.shared = True  # every copy is GroupDlv's: the store keeps the body once
        self._guard(message, g, record)
        if self.relay is not None:  # members homed on other nodes: their nodes store their copies, from this commit's outbox
            self.relay.fan_out(message, session, g, record.members, {"k": "msg", "id": msg_id, "b": body,
                                                                     "ts": message.ts_ms})

    def route_state(self, session: Session, stanza: dict, state: str, now: float) -> None:
        """Group typing state: ephemeral, pushed to the other members' online devices."""
        identity = session.identity
        sender = identity.user
        g = _group_id(stanza.get("g"), "state")
        record = self.committed(g)  # typing never reveals a change that is still committing
        if record is None:
            raise RouteError("state: no such group", code="not_found")
        if sender not in record.member_set:
            raise RouteError("state: you are not a member of this group", code="not_member")
        # Ephemeral: at most one per (sender, group) per interval; the others are dropped silently.
        key = (sender, g)
        sent = self._state_sent
        last = sent.get(key)
        if last is not None and 0.0 <= now - last < STATE_INTERVAL_S:
            return
        # Its copies cost as a message's do, a member one (its online devices are not counted):
        # past the sender's rate it is dropped, silently as typing goes (one token bought a push to
        # every member, and 22 KiB to each other node for a group of 1,024, a review measured).
        try:
            self._charge_copies(session, now, len(record.members) - 1)
        except RouteError:
            self.router.counters["group_states_dropped"] += 1
            return
        if last is None and len(sent) >= STATE_KEYS:
            self._state_sent = sent = {k: t for k, t in sent.items() if 0.0 <= now - t < STATE_INTERVAL_S}
        sent[key] = now
        self.push_state(record.members, record.member_set, sender, g, state, self._devices_of())
        if self.relay is not None:
            self.relay.group_state(session, g, record.members, state, now)

    def push_state(self, members, member_set: frozenset, sender: str, g: bytes, state: str, devices_of) -> None:
        """Group typing to the online devices of ``members`` but the sender and those who blocked
        it (``devices_of``: which devices to look at; a cluster's node, its own users')."""
        encoded = encode_stanza({"t": "state", "from": sender, "g": g, "s": state})
        router = self.router
        sessions = router.sessions
        blocked = self.policy.blocked_among(members, member_set, sender)
        for member in members:
            if member == sender or member in blocked:
                continue
            for device in devices_of(member):
                target = sessions.get((member, device))
                if target is not None:
                    router.push_encoded(target, encoded)

    def event_copies(self, recipients, actor: str, actor_device: int, build, devices_of) -> tuple[list, list]:
        """The items and targets of a membership event: every device of ``recipients`` but the
        acting device, none for a recipient who blocked the actor (nor is it told)."""
        items, targets = [], []
        blocked = self.policy.blocked_among(recipients, frozenset(recipients), actor)
        for user in recipients:
            if user in blocked:
                continue
            for device in devices_of(user):
                if user == actor and device == actor_device:
                    continue
                items.append((device_key(user, device), build))
                targets.append((user, device))
        return items, targets

    # -- a cluster's relaying (core/domain/relay.py)

    def request_fields(self, stanza: dict) -> dict:
        """A group request or message checked as far as the sender's node can (everything but
        the group's record), rebuilt from those fields only, for the group's home node."""
        kind = stanza["t"]
        if kind == "msg":
            g, body = self._message_fields(stanza)
            return {"t": "msg", "id": stanza["id"], "g": g, "b": body}
        if kind == "state":
            return {"t": "state", "g": _group_id(stanza.get("g"), "state"), "s": stanza["s"]}
        op = stanza["op"]
        fields = {"t": "iq", "id": stanza["id"], "op": op}
        if op == "group.new":
            fields["members"] = self._members(stanza, op, allow_empty=True)
            meta = self._meta(stanza)
            if meta is not None:
                fields["meta"] = meta
            return fields
        fields["g"] = _group_id(stanza.get("g"), op)
        if op in ("group.add", "group.del"):
            fields["members"] = self._members(stanza, op, allow_empty=False)
        elif op == "group.get" and "skip" in stanza:
            if type(stanza["skip"]) is not int:
                raise StanzaError("group.get: 'skip' must be an int >= 0 (members already received)")
            fields["skip"] = stanza["skip"]
        return fields

    # -- helpers

    def _devices_of(self):
        """Whose devices this node stores copies for: every user's, or in a cluster its own users'
        (another node's users get theirs from their node)."""
        return self.store.devices if self.relay is None else self.relay.local_devices

    def _message_fields(self, stanza: dict) -> tuple[bytes, bytes]:
        """A group ``msg``'s group id and body, checked."""
        g = _group_id(stanza.get("g"), "msg")
        if "to" in stanza or "c" in stanza:
            raise StanzaError("a group msg has 'g' and 'b', not 'to' or 'c'")
        body = stanza.get("b")
        if type(body) is not bytes or not body:
            raise StanzaError("a group msg needs 'b': the ciphertext for all members, non-empty bin")
        if len(body) > self.max_body_bytes:
            raise RouteError(f"a group ciphertext of {len(body)} bytes is over the {self.max_body_bytes}-byte limit "
                             "(send large content as a blob)", code="too_large")
        return g, body

    def _meta(self, stanza: dict) -> bytes | None:
        """``group.new``'s optional ``meta``, checked."""
        meta = stanza.get("meta")
        if meta is not None:
            if type(meta) is not bytes:
                raise StanzaError(f"group.new: 'meta' must be bin (got {kind_of(meta)})")
            if len(meta) > self.max_meta_bytes:
                raise RouteError(f"group.new: 'meta' of {len(meta)} bytes is over {self.max_meta_bytes}", code="too_large")
        return meta

    def addable_record(self, session: Session, stanza: dict) -> GroupRecord:
        """The checks of ``group.add`` that need no other node (the group exists, the asker is one
        of its admins): a cluster's group home makes them before asking members' nodes."""
        return self._admin_record(_group_id(stanza.get("g"), "group.add"), session.identity.user, "group.add")

    def _admin_record(self, g: bytes, user: str, what: str) -> GroupRecord:
        record = self._member_record(g, user, what)
        if user not in record.admins:
            raise RouteError(f"{what}: only the group's admins may change its members", code="not_admin")
        return record

    def _members(self, stanza: dict, op: str, *, allow_empty: bool) -> list[str]:
        members = stanza.get("members")
        if type(members) is not list:
            raise StanzaError(f"{op} needs 'members': a list of user addresses (got {kind_of(members)})")
        if not members and not allow_empty:
            raise StanzaError(f"{op}: 'members' is empty")
        if len(members) > self.max_group:
            raise RouteError(f"{op}: {len(members)} members (a group has at most {self.max_group})", code="too_large")
        seen: set[str] = set()
        size = 0
        for index, member in enumerate(members):
            if type(member) is not str:
                raise StanzaError(f"{op}: 'members[{index}]' must be a user address (got {kind_of(member)})")
            if address_provider(member) is None:
                raise StanzaError(f"{op}: 'members[{index}]' is not a user address: {excerpt(member)}")
            if member in seen:
                raise StanzaError(f"{op}: 'members' lists {excerpt(member)} twice")
            seen.add(member)
            size += len(member.encode("utf-8")) + 2
        if size > self.max_members_bytes:
            raise RouteError(
                f"{op}: 'members' takes {size} bytes (at most {self.max_members_bytes}, so that its event fits "
                "one frame); add the rest with group.add", code="too_large",
            )
        return members

    def check_addable(self, member: str, identity, session=None) -> None:
        """Consent before existence, as devices.get: the member's provider must be registered, its
        consent cover the adder's provider, and it must have a device. In a cluster a member homed
        on another node was checked there already (``session.checked``, core/domain/relay.py)."""
        if self.relay is not None and self.relay.home_of(member) is not None:
            if member not in getattr(session, "checked", ()):
                raise RouteError(f"{member} lives on another node and was not asked", code="internal")
            return
        provider = self.registry.get(member.rpartition("@")[2])
        if provider is None:
            raise RouteError(f"no provider of {member} is registered here", code="unknown_recipient", user=member)
        if not self.policy.allows(member, provider, identity.provider):
            raise RouteError(
                f"{member} does not accept group invitations from users of {identity.provider!r}",
                code="not_opted_in", user=member,
            )
        if not self.store.devices(member):
            raise RouteError(f"no user {member} is known to this gateway", code="unknown_recipient", user=member)

    def _unchanged(self, session: Session, now: float, iq_id: int, g: bytes, record: GroupRecord,
                   result: dict | None = None):
        """A request that changes nothing: its answer still waits for any change of the group that
        is being committed (so it never reports an uncommitted state)."""
        if g in self._dirty:
            message = self.router.enqueue_control(session, {"t": "res", "id": iq_id, "ver": record.ver, **(result or {})},
                                                  now)
            self._guard(message, g, record)
            return DEFERRED
        return {"ver": record.ver, **(result or {})}

    def _change(
        self, session: Session, now: float, iq_id: int, g: bytes, prior_ver: int, record: GroupRecord | None,
        event: str, concerned: list, removed, result: dict | None = None, *, promoted=(), ver: int | None = None,
    ) -> None:
        """Batch a membership change: the new record (None: delete) and the event for every
        device of every member and of ``removed``, but the acting device."""
        identity = session.identity
        actor, actor_device = identity.user, identity.device
        if prior_ver:  # a change of an existing group: at most CHANGE_RATE a second per group
            wait_s = self.change_buckets.wait(g, now, 1.0)  # taken below, once nothing else refuses it
            if wait_s:
                retry_after = max(1, math.ceil(wait_s * 1000))
                raise RouteError(
                    f"this group changes too often; try again in {retry_after} ms", code="rate_limited",
                    retry_after=retry_after,
                )
        ver = record.ver if record is not None else ver
        event_id = hashlib.blake2b(b"interlink-group-event" + g + ver.to_bytes(8, "big"), digest_size=16).digest()
        fields = {"k": "group", "id": event_id, "from": actor, "dev": actor_device, "g": g, "event": event,
                  "members": concerned, "ver": ver}
        if promoted:
            fields["promoted"] = list(promoted)
        if event == "created" and record.meta is not None:
            fields["meta"] = record.meta
        # The event is stored as a dlv of its own: it must fit a frame, where it is stored here and
        # as a member's node checks it (relay.py ``_check_event``, the same bound) — the bound on
        # 'members' leaves room for the rest by an estimate, which long addresses and the largest
        # 'meta' passed (a member node refused such a created event every time it came).
        event_bytes = len(msgpack.packb(fields))
        if event_bytes > self.router.max_event_bytes:
            raise RouteError(f"the group's '{event}' event would take {event_bytes} bytes, over the "
                             f"{self.router.max_event_bytes} a frame holds: fewer members or a smaller 'meta'",
                             code="too_large")
        recipients = list(record.members) if record is not None else []
        recipients += [user for user in removed if record is None or user not in record.member_set]
        relay = self.relay
        items, targets = self.event_copies(recipients, actor, actor_device, event_builder(fields), self._devices_of())
        # Its event's copies cost rate tokens as a message's do (one per COPIES_PER_LOAD, members
        # of other nodes one each): a change of a large group cost one token whatever it stored,
        # here and in the outbox (a review: 116 KB of outbox per token).
        self._charge_copies(session, now,
                            len(items) + (relay.remote_members(g, recipients, actor) if relay is not None else 0))
        if prior_ver:  # (a refusal above spent none of the group's tokens: one a review found spent)
            self.change_buckets.take(g, now)
        change = GroupWrite(g, prior_ver, record)
        self._dirty[g] = change
        reply = {"t": "res", "id": iq_id, "ver": ver}
        if result:
            reply.update(result)
        entry = self.router.enqueue_control(session, reply, now, items, targets, change)
        if relay is not None:  # recipients homed on other nodes: their nodes store the event, from this commit's outbox
            relay.fan_out(entry, session, g, recipients, {"k": "event", "fields": fields, "ts": entry.ts_ms})


def _group_id(value, what: str) -> bytes:
    if type(value) is not bytes or len(value) != GROUP_ID_BYTES:
        raise StanzaError(f"{what} needs 'g': the group id, 16 bytes of bin")
    return value


def event_builder(fields: dict):
    """Encodes a membership event's ``dlv`` (kind ``group``) once its seq and timestamp are known."""

    def build(seq: int, ts_ms: int) -> bytes:
        return encode_stanza({"t": "dlv", "seq": seq, **fields, "ts": ts_ms})

    return build
