"""``LmdbStore``: the ``Store`` port over one LMDB environment and its table families
(mailboxes, social, keys, groups, blobs, push).

``commit(batch)`` is the group commit: one write transaction in which each entry goes to its
family's writer, in batch order (with a cluster's outbox entries and marks, ``outbox.py``), then
the confirmed outbox entries' deletion, the ``recv`` deletions, the push intents and the mailbox
counters. A full
map aborts the whole transaction (``StoreFullError``; no entry keeps an outcome). Every other
method is the family's own, bound once, and runs in a transaction of its own.
"""

from __future__ import annotations

import os

import lmdb

from interlink.core.domain.batch import MessageEntry, PrekeyTake, WriteBatch
from interlink.core.edge.lmdbstore.blobs import BlobRecords
from interlink.core.edge.lmdbstore.env import open_environment, store_full
from interlink.core.edge.lmdbstore.groups import GroupRecords
from interlink.core.edge.lmdbstore.keys import Keys
from interlink.core.edge.lmdbstore.move import NodeList
from interlink.core.edge.lmdbstore.outbox import FanoutRecords
from interlink.core.edge.lmdbstore.mailboxes import (
    CONTROL_OVERDRAFT_BYTES,
    CONTROL_OVERDRAFT_ITEMS,
    DEVICE_CACHE_USERS,
    Mailboxes,
)
from interlink.core.edge.lmdbstore.push import PushRecords
from interlink.core.edge.lmdbstore.social import Social


class LmdbStore:
    """One LMDB environment with its named databases; the edge where storage I/O happens."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        map_size_bytes: int,
        sync: bool,
        writemap: bool,
        max_mailbox_items: int,
        max_mailbox_bytes: int,
        device_cache_users: int = DEVICE_CACHE_USERS,
        control_overdraft_items: int = CONTROL_OVERDRAFT_ITEMS,
        control_overdraft_bytes: int = CONTROL_OVERDRAFT_BYTES,
    ) -> None:
        self.path, self.env = open_environment(path, map_size_bytes=map_size_bytes, sync=sync, writemap=writemap)
        self.mailboxes = mailboxes = Mailboxes(
            self.env, max_mailbox_items=max_mailbox_items, max_mailbox_bytes=max_mailbox_bytes,
            device_cache_users=device_cache_users, control_overdraft_items=control_overdraft_items,
            control_overdraft_bytes=control_overdraft_bytes,
        )
        self.social = social = Social(self.env)
        self.keys = keys = Keys(self.env)
        self.groups = groups = GroupRecords(self.env)
        # The port's methods are the families' own, bound here once: routing calls some of them
        # for every stanza, and a forwarding method would add a call to each.
        self.devices = mailboxes.devices
        self.register_device = mailboxes.register_device
        self.pending = mailboxes.pending
        self.pending_count = mailboxes.pending_count
        self.mailbox_state = mailboxes.mailbox_state
        self.usage = mailboxes.usage
        self.expire = mailboxes.expire
        self.forget_duplicates = mailboxes.forget_duplicates
        self.seen = mailboxes.seen
        self.consent = social.consent
        self.set_consent = social.set_consent
        self.reach = social.reach
        self.is_blocked = social.is_blocked
        self.add_block = social.add_block
        self.del_block = social.del_block
        self.blocked = social.blocked
        self.block_count = social.block_count
        self.blockers = social.blockers
        self.add_report = social.add_report
        self.report = social.report
        self.reports = social.reports
        self.resolve_report = social.resolve_report
        self.set_phone = social.set_phone
        self.phone = social.phone
        self.directory = social.directory
        self.put_prekeys = keys.put_prekeys
        self.read_prekeys = keys.read_prekeys
        self.take_prekeys = keys.take_prekeys
        self.prekey_count = keys.prekey_count
        self.group = groups.group
        self.push_records = push_records = PushRecords(self.env)
        self.set_push_token = push_records.set_push_token
        self.del_push_token = push_records.del_push_token
        self.push_token = push_records.push_token
        self.push_devices = push_records.push_devices
        self.push_intents = push_records.push_intents
        self.blob_records = blob_records = BlobRecords(self.env)
        self.blob = blob_records.blob
        self.create_blob = blob_records.create_blob
        self.save_blob_ranges = blob_records.save_blob_ranges
        self.unfinished_blobs = blob_records.unfinished_blobs
        self.mark_blob_ready = blob_records.mark_blob_ready
        self.expired_blobs = blob_records.expired_blobs
        self.delete_blobs = blob_records.delete_blobs
        self.blob_usage = blob_records.blob_usage
        self.fanout = fanout = FanoutRecords(self.env)
        self.incarnation = fanout.incarnation
        self.outbox_entries = fanout.outbox_entries
        self.outbox_last = fanout.outbox_last
        self.outbox_nodes = fanout.outbox_nodes
        self.outbox_sizes = fanout.outbox_sizes
        self.outbox_footprint = fanout.outbox_footprint
        self.outbox_table_bytes = fanout.outbox_table_bytes
        self.fanin_mark = fanout.fanin_mark
        self.node_list = NodeList(self.env)  # the cluster node list the data was last served under

    def close(self) -> None:
        self.env.close()

    # The quotas can change while the gateway runs (a reload); the mailboxes read them per commit.

    @property
    def max_mailbox_items(self) -> int:
        return self.mailboxes.max_mailbox_items

    @max_mailbox_items.setter
    def max_mailbox_items(self, value: int) -> None:
        self.mailboxes.max_mailbox_items = value

    @property
    def max_mailbox_bytes(self) -> int:
        return self.mailboxes.max_mailbox_bytes

    @max_mailbox_bytes.setter
    def max_mailbox_bytes(self, value: int) -> None:
        self.mailboxes.max_mailbox_bytes = value

    @property
    def dedup_unswept(self) -> int:
        return self.mailboxes.dedup_unswept

    def commit(self, batch: WriteBatch) -> None:
        mailboxes, groups, keys, fanout = self.mailboxes, self.groups, self.keys, self.fanout
        try:
            with self.env.begin(write=True) as txn:
                states: dict = {}  # device key -> MailboxState, as this transaction left it
                # Received items go first: they make room for this batch's entries under the
                # quotas (a recv's deletion may wait for the next message: core/edge/commit.py),
                # and a recv names only items an earlier commit stored.
                if batch.deletions:
                    mailboxes.delete(txn, batch.deletions, states)
                for entry in batch.entries:
                    kind = type(entry)
                    if kind is PrekeyTake:
                        entry.bundles = keys.take(txn, entry.user, entry.devices)
                        continue
                    fanin = entry.fanin
                    if fanin is not None:
                        if fanout.seen(txn, fanin):
                            entry.dup = True  # a group home's outbox entry sent again: stored before
                            continue
                        if fanin[3] is not None and not fanout.seen(txn, fanin[3]):
                            entry.refused = "out_of_order"  # the entry before it is not stored (yet)
                            continue
                    if kind is MessageEntry:
                        # A duplicate answers dup whatever the group became; else a guarded
                        # entry must match the stored record.
                        if (entry.guard is not None and not mailboxes.is_duplicate(txn, entry)
                                and not groups.has_ver(txn, entry.guard)):
                            entry.refused = "conflict"
                        else:
                            mailboxes.write_message(txn, entry, states)
                        written = not entry.dup and entry.refused is None
                    else:
                        if ((entry.guard is not None and not groups.has_ver(txn, entry.guard))
                                or (entry.group is not None and not groups.write(txn, entry.group))):
                            entry.refused = "conflict"  # computed from a change that never committed
                        else:
                            mailboxes.write_control(txn, entry, states)
                        written = entry.refused is None
                    if fanin is not None and entry.refused is None:
                        fanout.mark(txn, fanin)
                    if written and entry.outbox:
                        fanout.write(txn, entry.outbox)
                for node, upto in batch.outbox_acked.items():
                    fanout.delete_acked(txn, node, upto)
                if batch.push_wake or batch.push_cancel or batch.push_done:
                    batch.push_created, batch.push_existing = self.push_records.apply(
                        txn, batch.push_wake, batch.push_cancel, batch.push_done, lambda dkey: mailboxes.items_in(txn, dkey, states))
                mailboxes.save(txn, states)
        except lmdb.MapFullError:
            for entry in batch.entries:
                entry.clear_outcome()
            batch.push_created, batch.push_existing = [], []
            raise store_full() from None
        mailboxes.dedup_unswept += sum(1 for entry in batch.entries if type(entry) is MessageEntry and entry.stored)
