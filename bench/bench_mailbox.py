"""Mailbox put and drain on the real LmdbStore (``core/edge/lmdbstore/``) in a temporary folder, in both
durability modes (``sync``: fsync every commit, the gateway's default; ``async``: no fsync), with
the store's per-copy loops from the compiled module and from its pure twin in the same run.

    .venv/bin/python -m pytest bench/bench_mailbox.py --benchmark-only

- ``put``: ``LmdbStore.commit`` of a ``WriteBatch`` of N 1:1 messages from one sending device
  to one recipient device (the group commit of one loop turn): the dedup insert, the dlv built
  by the router's own builder, the mailbox put, the device's counters. The batch is made
  between rounds, untimed.
- ``drain``: what a device's delivery costs the store: ``pending`` (read N items in seq order)
  and the commit that deletes them (the ``recv``). N = 64, the default window. The N items are
  stored between rounds, untimed.
- ``group put`` / ``group recv``: one group message to 1,023 devices (its body stored once, each
  device's item a reference to it), and the commit of every device's ``recv`` of its copy.
- ``read``: ``pending`` alone (no mailbox loop runs in it, so no twins).

The twins: the store binds ``MailboxState``, ``plan_copies``, ``write_copies``, ``delete_items``
and ``forget_item`` from ``interlink.core.edge.mailbox`` (the selector); each benchmark rebinds them in
``interlink.core.edge.lmdbstore.mailboxes`` to the compiled ``interlink.ext._mailbox`` or to the pure
``interlink.core.edge._mailbox_pure`` (both imported directly) for its duration. The ``sync`` figures
are mostly the disk's fsync under the temporary folder, not Interlink's CPU.
"""

from __future__ import annotations

import os

import pytest

import interlink.core.edge._mailbox_pure as mailbox_pure
import interlink.core.edge.lmdbstore.mailboxes as mailboxes_module
import interlink.ext._mailbox as mailbox_native
from interlink.core.edge import mailbox as mailbox_selector
from interlink.core.domain.batch import WriteBatch, device_key
from interlink.core.domain.fanout import GroupDlv
from interlink.core.domain.router import _dlv_builder  # the dlv builder handle_msg gives the commit
from interlink.testing import lmdb_store

CIPHERTEXT = os.urandom(200)
SENDER, RECIPIENT = device_key("alice@alpha", 1), device_key("bob@beta", 1)
TS_MS = 1_800_000_000_000
WINDOW = 64
GROUP_DEVICES = [device_key(f"m{i}@beta", 1) for i in range(1, 1024)]  # a 1,024-member group but the sender
DURABILITY = pytest.mark.parametrize("durability", ["sync", "async"])
TWINS = pytest.mark.parametrize("impl", ["cython", "pure"])
MODULES = {"cython": mailbox_native, "pure": mailbox_pure}
# Fixed rounds keep the run bounded whatever the disk does (a sync commit is milliseconds here).
ROUNDS = {"sync": 100, "async": 400}


@pytest.fixture
def store(tmp_path, request, monkeypatch):
    """An LmdbStore of the test's durability, its mailbox loops from the test's twin (if it names
    one; else the selector's)."""
    params = request.node.callspec.params
    if "impl" in params:
        twin = MODULES[params["impl"]]
        bound = [name for name in mailbox_selector.__all__ if hasattr(mailboxes_module, name)]
        assert {"plan_copies", "write_copies", "delete_items"} <= set(bound), (
            "core/edge/lmdbstore/mailboxes.py no longer binds the mailbox loops from interlink.core.edge.mailbox: update bench_mailbox.py"
        )
        for name in bound:
            monkeypatch.setattr(mailboxes_module, name, getattr(twin, name))
    store = lmdb_store(tmp_path / "lmdb", sync=params["durability"] == "sync",
                      max_mailbox_items=1 << 30, max_mailbox_bytes=1 << 40)
    yield store
    store.close()


def _info(benchmark, impl: str, durability: str, **extra) -> None:
    benchmark.extra_info.update(implementation=impl, durability=durability, **extra)


def _batch(messages: int) -> WriteBatch:
    batch = WriteBatch()
    for _ in range(messages):
        msg_id = os.urandom(16)
        build = _dlv_builder(msg_id, "alice@alpha", 1, CIPHERTEXT, None)
        batch.add_message(SENDER, msg_id, TS_MS, [(RECIPIENT, build)])
    return batch


def _group_batch() -> WriteBatch:
    """One group message as core/domain/groups.py enqueues it: a copy per device, one GroupDlv for all."""
    msg_id = os.urandom(16)
    build = GroupDlv(msg_id, "m0@alpha", 1, CIPHERTEXT, b"\x01" * 16)
    batch = WriteBatch()
    message = batch.add_message(device_key("m0@alpha", 1), msg_id, TS_MS, [(dkey, build) for dkey in GROUP_DEVICES])
    message.skip_full = True
    message.shared = True
    return batch


@TWINS
@DURABILITY
@pytest.mark.parametrize("messages", [1, WINDOW])
def test_put(benchmark, store, impl, durability, messages):
    benchmark.group = f"mailbox put: commit of {messages} 1:1 message{'s' if messages > 1 else ''} ({durability})"
    _info(benchmark, impl, durability, messages=messages)
    batches = []

    def setup():
        batches.append(_batch(messages))
        return (batches[-1],), {}

    benchmark.pedantic(store.commit, setup=setup, rounds=ROUNDS[durability], warmup_rounds=2)
    for batch in batches:
        for message in batch.entries:
            assert len(message.stored) == 1 and not message.dup and message.refused is None
    assert store.pending_count(RECIPIENT) == messages * len(batches)


@TWINS
@DURABILITY
def test_drain(benchmark, store, impl, durability):
    benchmark.group = f"mailbox drain: pending({WINDOW}) + commit deleting them ({durability})"
    _info(benchmark, impl, durability, messages=WINDOW)
    drained = []

    def setup():
        store.commit(_batch(WINDOW))
        return (), {}

    def drain():
        items = store.pending(RECIPIENT, 0, WINDOW)
        received = WriteBatch()
        received.delete(RECIPIENT, [seq for seq, _ in items])
        store.commit(received)
        drained.append(len(items))

    benchmark.pedantic(drain, setup=setup, rounds=ROUNDS[durability], warmup_rounds=2)
    assert set(drained) == {WINDOW} and store.pending_count(RECIPIENT) == 0


@TWINS
@DURABILITY
def test_group_put(benchmark, store, impl, durability):
    benchmark.group = f"mailbox group put: 1 message, {len(GROUP_DEVICES)} copies, body stored once ({durability})"
    _info(benchmark, impl, durability, copies=len(GROUP_DEVICES))
    batches = []

    def setup():
        batches.append(_group_batch())
        return (batches[-1],), {}

    benchmark.pedantic(store.commit, setup=setup, rounds=ROUNDS[durability] // 4, warmup_rounds=1)
    (message,) = batches[-1].entries
    assert len(message.stored) == len(GROUP_DEVICES) and message.dropped_full == 0
    assert store.usage()["shared_bodies"] == len(batches)  # one body per message, not per copy
    seq = len(batches)  # every device got one copy per round
    assert store.pending(GROUP_DEVICES[-1], seq - 1) == [(seq, message.items[0][1](seq, TS_MS))]


@TWINS
@DURABILITY
def test_group_recv(benchmark, store, impl, durability):
    benchmark.group = f"mailbox group recv: {len(GROUP_DEVICES)} devices delete their copy, one commit ({durability})"
    _info(benchmark, impl, durability, copies=len(GROUP_DEVICES))
    received = []

    def setup():
        batch = _group_batch()
        store.commit(batch)
        recvs = WriteBatch()
        for dkey, seq, _ in batch.entries[0].stored:
            recvs.delete(dkey, [seq])
        received.append(recvs)
        return (recvs,), {}

    benchmark.pedantic(store.commit, setup=setup, rounds=ROUNDS[durability] // 4, warmup_rounds=1)
    assert all(store.pending_count(dkey) == 0 for dkey in GROUP_DEVICES)
    assert store.usage()["shared_bodies"] == 0  # each body went with its last reference


@pytest.mark.parametrize("durability", ["async"])
@pytest.mark.benchmark(group=f"mailbox read: pending({WINDOW}) of a 640-item mailbox")
def test_pending(benchmark, store, durability):
    """No mailbox loop runs here (a read transaction and a cursor scan): no twin to compare."""
    benchmark.extra_info.update(durability=durability, messages=WINDOW)
    store.commit(_batch(10 * WINDOW))
    items = benchmark(store.pending, RECIPIENT, 0, WINDOW)
    assert [seq for seq, _ in items] == list(range(1, WINDOW + 1))
