"""The writes of one group commit, as the domain builds them and the store fills in.

A ``WriteBatch`` holds, in the order the domain made them, three kinds of entries and the
received items to delete. The store writes them in one transaction, in that order, and records
each entry's outcome on the entry itself (the fields marked "after the commit"); the domain reads
the outcomes to answer the senders. ``GroupRecord`` and ``GroupWrite`` are the group values the
domain computes and the store keeps; ``device_key`` names one device in every table.
"""

from __future__ import annotations

import struct

_DEVICE = struct.Struct(">I")


COPIES_PER_LOAD = 64

def device_key(user: str, device: int) -> bytes:
    """One device of one user: the address in UTF-8, a zero byte, the device number (uint32
    big-endian). Addresses hold no zero byte, so device keys never prefix one another."""
    return user.encode("utf-8") + b"\x00" + _DEVICE.pack(device)


def split_device_key(dkey: bytes) -> tuple[str, int]:
    """The (user, device) a ``device_key`` names."""
    return dkey[:-5].decode("utf-8"), _DEVICE.unpack(dkey[-4:])[0]


class GroupRecord:
    """One group as stored: an immutable value (a change makes a new record)."""

    __slots__ = ("ver", "members", "admins", "meta", "member_set")

    def __init__(self, ver: int, members: tuple[str, ...], admins: tuple[str, ...], meta: bytes | None) -> None:
        self.ver = ver  #: 1 at creation, +1 per membership change
        self.members = members  #: addresses in the order they joined (the longest-standing first)
        self.admins = admins  #: addresses, a subset of ``members``, in the order they became admins
        self.meta = meta  #: opaque bytes the clients encrypt (name, picture...), or None
        self.member_set = frozenset(members)


class GroupWrite:
    """A change of one group record: written only if the stored record still has ``prior_ver``
    (0: no record), so a change computed from a state that never committed is refused instead of
    overwriting. ``record`` None deletes the group."""

    __slots__ = ("g", "prior_ver", "record")

    def __init__(self, g: bytes, prior_ver: int, record: GroupRecord | None) -> None:
        self.g = g
        self.prior_ver = prior_ver
        self.record = record


class MessageEntry:
    """A stored stanza (``msg``, ``rcpt``): deduplicated on (sender device key, ``msg_id``), then
    one copy per item, all or none against the mailbox quotas (``skip_full``: per copy)."""

    __slots__ = (
        "sender_key", "msg_id", "ts_ms", "items", "guard", "skip_full", "shared", "outbox", "fanin",
        "dup", "stored", "refused", "kept", "dropped_full",
    )

    def __init__(self, sender_key: bytes, msg_id: bytes, ts_ms: int, items: list) -> None:
        self.sender_key = sender_key
        self.msg_id = msg_id
        self.ts_ms = ts_ms  #: after the commit, when ``dup``: the ts of the copy stored first
        self.items = items  #: [(device key, build(seq, ts_ms) -> encoded dlv)]
        #: (g, ver): store nothing (``refused`` = ``"conflict"``) unless group ``g``'s stored record
        #: has ``ver`` — set on entries computed from a group change that was still committing
        self.guard: tuple[bytes, int] | None = None
        #: a group message: a copy for a full mailbox is skipped instead of refusing the message
        self.skip_full = False
        #: every item has the same ``build``, whose copies differ only in their seq (a group
        #: message's ``GroupDlv``): the store keeps what they share once
        self.shared = False
        #: a cluster's group home: [(node, seq, packed record, record)] — the copies for members of
        #: other nodes, written to the outbox with the entry (not when it is a duplicate or refused)
        self.outbox: list | None = None
        #: a cluster's member node: (home node, its incarnation, seq, after) — the outbox entry
        #: this stores; one stored before (or in this transaction) makes the entry a duplicate;
        #: ``after`` (home, incarnation, seq), when not None, must be stored first, or nothing
        #: is (``refused`` = ``"out_of_order"``)
        self.fanin: tuple | None = None
        self.dup = False  #: after the commit: stored before, nothing written now
        self.stored: list = []  #: after the commit: [(device key, seq, encoded dlv)]
        self.refused: str | None = None  #: after the commit: why nothing was stored (``mailbox_full``, ``conflict``)
        self.kept: list[int] | None = None  #: after the commit, when copies were skipped: indices of ``items`` stored
        self.dropped_full = 0  #: after the commit: copies skipped for full mailboxes

    def clear_outcome(self) -> None:
        self.dup, self.stored, self.refused, self.kept, self.dropped_full = False, [], None, None, 0


class ControlEntry:
    """A group change and the items announcing it, or an answer that only has to wait for the
    commit. Not deduplicated and never refused for the quotas (a change must reach every member),
    though its items count toward them: past a fixed overdraft a copy is skipped (``kept``,
    ``dropped_full``). When the ``group`` write or the ``guard`` fails (``refused`` =
    ``"conflict"``) none of the items is stored."""

    __slots__ = ("ts_ms", "items", "group", "reply", "guard", "outbox", "fanin", "dup", "stored", "refused", "kept",
                 "dropped_full")

    def __init__(self, ts_ms: int, items: list, group: GroupWrite | None, reply: dict | None) -> None:
        self.ts_ms = ts_ms
        self.items = items  #: [(device key, build(seq, ts_ms) -> encoded dlv)]
        self.group = group
        self.reply = reply  #: the ``iq`` ``res`` the domain sends once the commit is durable
        self.guard: tuple[bytes, int] | None = None  #: as ``MessageEntry.guard``
        self.outbox: list | None = None  #: as ``MessageEntry.outbox`` (written unless ``refused``)
        self.fanin: tuple | None = None  #: as ``MessageEntry.fanin``
        self.dup = False  #: after the commit: its ``fanin`` entry was stored before, nothing written now
        self.stored: list = []  #: after the commit: [(device key, seq, encoded dlv)]
        self.refused: str | None = None  #: after the commit: ``conflict`` when nothing was written
        self.kept: list[int] | None = None  #: after the commit, when copies were skipped: indices of ``items`` stored
        self.dropped_full = 0  #: after the commit: copies skipped past the overdraft

    def clear_outcome(self) -> None:
        self.dup, self.stored, self.refused, self.kept, self.dropped_full = False, [], None, None, 0


class PrekeyTake:
    """A ``keys.get`` that hands out one-time prekeys: the commit takes them (each exactly once)
    and returns the bundles in ``bundles``, which the domain puts into ``reply``."""

    __slots__ = ("user", "devices", "reply", "bundles")

    def __init__(self, user: str, devices: list[int], reply: dict) -> None:
        self.user = user
        self.devices = devices  #: ascending, each once
        self.reply = reply  #: the ``iq`` ``res`` the domain sends once the commit is durable
        self.bundles: list[dict] | None = None  #: after the commit: what was handed out

    def clear_outcome(self) -> None:
        self.bundles = None


class WriteBatch:
    """Everything one group commit writes: ``entries`` in the order they were added, the
    received items to delete, and the push intents' changes (``core/domain/push.py``)."""

    __slots__ = ("entries", "deletions", "carried", "load", "push_wake", "push_cancel", "push_done", "push_created",
                 "push_existing", "outboxed", "outbox_acked")

    def __init__(self) -> None:
        self.entries: list[MessageEntry | ControlEntry | PrekeyTake] = []
        self.deletions: list[tuple[bytes, list[int]]] = []
        self.carried = 0  # the first deletions came from a commit that failed (carried once only)
        # Admission control's measure (core/domain/admission.py): one per entry, and one more per
        # COPIES_PER_LOAD copies it stores (as a group message spends one rate token per 64
        # copies); recv deletions are a consequence of deliveries, not new work offered.
        self.load = 0
        # Push intents, written in the same transaction as the items that cause them:
        # The commit applies cancels before wakes: a device that connected and left again within
        # one batch is owed a new push, one that left and came back is owed none.
        self.push_wake: set[bytes] = set()  # device keys to wake if their mailbox holds items
        self.push_cancel: set[bytes] = set()  # device keys whose intent goes (the device connected)
        self.push_done: list[tuple[bytes, int, bool]] = []  # (device key, counter, again): a push was answered
        self.push_created: list[tuple[bytes, int]] = []  # after the commit: (device key, counter)
        self.push_existing: list[tuple[bytes, int]] = []  # after the commit: woken devices' intents already owed
        # A cluster's group home (core/domain/outbox.py): the entries with an ``outbox`` (their
        # written ones go to the member nodes after the commit), and per member node the last
        # outbox entry it confirmed (the commit deletes it and those before it).
        self.outboxed: list[MessageEntry | ControlEntry] = []
        self.outbox_acked: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.entries or self.deletions or self.push_wake or self.push_cancel or self.push_done
                    or self.outbox_acked)

    @property
    def only_deletions(self) -> bool:
        """The batch holds ``recv`` deletions and nothing else: nobody waits for its commit."""
        return not (self.entries or self.push_wake or self.push_cancel or self.push_done or self.outbox_acked)

    def add_message(self, sender_key: bytes, msg_id: bytes, ts_ms: int, items: list) -> MessageEntry:
        entry = MessageEntry(sender_key, msg_id, ts_ms, items)
        self.entries.append(entry)
        self.load += 1 + len(items) // COPIES_PER_LOAD
        return entry

    def add_control(
        self, ts_ms: int, items: list, group: GroupWrite | None = None, reply: dict | None = None
    ) -> ControlEntry:
        entry = ControlEntry(ts_ms, items, group, reply)
        self.entries.append(entry)
        self.load += 1 + len(items) // COPIES_PER_LOAD
        return entry

    def add_prekey_take(self, user: str, devices, reply: dict) -> PrekeyTake:
        entry = PrekeyTake(user, sorted(set(devices)), reply)
        self.entries.append(entry)
        self.load += 1
        return entry

    def delete(self, dkey: bytes, seqs: list[int]) -> None:
        self.deletions.append((dkey, seqs))
