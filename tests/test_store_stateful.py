"""The mailbox store against a model, driven by hypothesis: put (whole copies, or a group message
whose body is stored once and shared), recv, reconnect (read back from an arbitrary seq), expire,
quota and crash-restart (reopen the LMDB environment), on real LMDB."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from interlink.core.domain._fanout_pure import GroupDlv
from interlink.core.domain.batch import WriteBatch, device_key
from interlink.core.edge.lmdbstore import LmdbStore
from interlink.testing import lmdb_store
from store_checks import shared_body_references

DEVICES = [device_key("bob@beta", 1), device_key("bob@beta", 2), device_key("carol@beta", 1)]
SENDERS = [device_key("alice@alpha", 1), device_key("alice@alpha", 2)]
MAX_ITEMS = 6


class MailboxMachine(RuleBasedStateMachine):
    """Model: per device, an ordered dict seq -> (ts, payload); the last seq given; the dedup set."""

    @initialize()
    def open_store(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="interlink-stateful-"))
        self.store = self._open()
        self.mailboxes: dict[bytes, dict[int, tuple[int, bytes]]] = {d: {} for d in DEVICES}
        self.last_seq = {d: 0 for d in DEVICES}
        self.seen: dict[tuple[bytes, bytes], int] = {}  # (sender, id) -> ts of the first copy
        self.clock = 1_000
        self.next_id = 0

    def _open(self) -> LmdbStore:
        return lmdb_store(self.folder / "lmdb", map_size_bytes=1 << 24, max_mailbox_items=MAX_ITEMS)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    @rule(
        sender=st.sampled_from(SENDERS),
        recipients=st.lists(st.sampled_from(DEVICES), min_size=1, max_size=3, unique=True),
        resend=st.booleans(),
        advance=st.integers(0, 50),
        shared=st.booleans(),
    )
    def put(self, sender, recipients, resend, advance, shared) -> None:
        self.clock += advance
        if resend and self.seen:
            sender, msg_id = sorted(self.seen)[self.next_id % len(self.seen)]
        else:
            self.next_id += 1
            msg_id = self.next_id.to_bytes(16, "big")
        batch = WriteBatch()
        payload = b"m%d" % int.from_bytes(msg_id, "big")
        if shared:  # a group message: every copy from one GroupDlv, the body stored once
            build = GroupDlv(msg_id, "alice@alpha", 1, payload, b"G" * 16)
            message = batch.add_message(sender, msg_id, self.clock, [(d, build) for d in recipients])
            message.shared = True
        else:
            message = batch.add_message(sender, msg_id, self.clock, [(d, lambda seq, ts, p=payload: p) for d in recipients])
        self.store.commit(batch)
        if (sender, msg_id) in self.seen:
            assert message.dup and message.ts_ms == self.seen[(sender, msg_id)] and not message.stored
            return
        if any(len(self.mailboxes[d]) + 1 > MAX_ITEMS for d in recipients):
            assert message.refused == "mailbox_full" and not message.stored
            return
        assert not message.dup and message.refused is None
        self.seen[(sender, msg_id)] = self.clock
        assert [d for d, _, _ in message.stored] == recipients
        for dkey, seq, value in message.stored:
            assert seq == self.last_seq[dkey] + 1  # strictly increasing, never reused
            self.last_seq[dkey] = seq
            self.mailboxes[dkey][seq] = (self.clock, value)

    @precondition(lambda self: any(self.mailboxes.values()))
    @rule(data=st.data())
    def recv(self, data) -> None:
        dkey = data.draw(st.sampled_from([d for d in DEVICES if self.mailboxes[d]]))
        stored = sorted(self.mailboxes[dkey])
        chosen = data.draw(st.lists(st.sampled_from(stored + [max(stored) + 5]), max_size=4, unique=True))
        batch = WriteBatch()
        batch.delete(dkey, chosen)
        self.store.commit(batch)
        for seq in chosen:
            self.mailboxes[dkey].pop(seq, None)

    @rule(dkey=st.sampled_from(DEVICES), after=st.integers(0, 20), limit=st.integers(1, 10))
    def reconnect_and_read(self, dkey, after, limit) -> None:
        expected = [(seq, value) for seq, (_, value) in sorted(self.mailboxes[dkey].items()) if seq > after][:limit]
        assert self.store.pending(dkey, after, limit) == expected

    @rule(age=st.integers(0, 200), limit=st.integers(1, 5), max_devices=st.integers(1, 4))
    def expire(self, age, limit, max_devices) -> None:
        cutoff = self.clock - age
        removed = self.store.expire(cutoff, limit=limit, max_devices=max_devices)
        assert 0 <= removed <= limit
        gone = 0
        for dkey, box in self.mailboxes.items():
            left = {seq for seq, _ in self.store.pending(dkey)}
            cut = [seq for seq in sorted(box) if seq not in left]
            # Only expired items go, and only from the head of a mailbox.
            assert cut == sorted(box)[: len(cut)]
            assert all(box[seq][0] < cutoff for seq in cut)
            for seq in cut:
                del box[seq]
            gone += len(cut)
        assert gone == removed

    @rule(age=st.integers(0, 200))
    def expire_a_whole_round(self, age) -> None:
        # Two calls cover every mailbox (the first may start mid-round); the model's clock never
        # goes back, so nothing expired is left after them.
        cutoff = self.clock - age
        doomed = sum(1 for box in self.mailboxes.values() for ts, _ in box.values() if ts < cutoff)
        assert self.store.expire(cutoff) + self.store.expire(cutoff) == doomed
        for box in self.mailboxes.values():
            for seq in [seq for seq, (ts, _) in box.items() if ts < cutoff]:
                del box[seq]

    @rule()
    def crash_and_restart(self) -> None:
        # Committed state must survive the environment going away without any flush of ours.
        self.store.close()
        self.store = self._open()

    @invariant()
    def counters_match(self) -> None:
        for dkey in DEVICES:
            state = self.store.mailbox_state(dkey)
            box = self.mailboxes[dkey]
            assert state.items == len(box)
            assert state.bytes == sum(len(v) for _, v in box.values())
            assert state.last_seq == self.last_seq[dkey]
            assert [seq for seq, _ in self.store.pending(dkey)] == sorted(box)

    @invariant()
    def shared_bodies_are_counted(self) -> None:
        references, counts, bodies = shared_body_references(self.store)
        assert counts == references  # every body counts exactly the items referring to it
        assert bodies == set(references)  # no body without a reference, none missing


MailboxMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_mailbox_store_matches_its_model = MailboxMachine.TestCase
