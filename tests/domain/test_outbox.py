"""A group home's fan-out streams (``core/domain/outbox.py``), sans-I/O over a real store: windows
bounded in entries and bytes, one in flight per node, sent again after ``RETRY_S`` from the first
unconfirmed entry, final refusals, the counters, the memory bound (refilled from the store, the
commit report racing the refill), the streams after a restart, ``take_acked`` and ``outcome``."""

import logging
import os

import msgpack
import pytest

from interlink.core.domain import outbox as outbox_module
from interlink.core.domain.batch import WriteBatch
from interlink.core.domain.outbox import FINAL, OK, RETRY, RETRY_S, Outbox, outcome
from interlink.testing import lmdb_store

NODES = ("node-a", "node-b", "node-c")
NOW = 1000.0
INCARNATION = b"i" * 8  # the one that wrote the entries


@pytest.fixture
def store(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", sync=False, map_size_bytes=1 << 24)
    yield store
    store.close()


@pytest.fixture
def outbox(store):
    return Outbox(store, "node-a", NODES)


def record(tag) -> list:
    return ["alpha", "alice", 1, 65000, {"t": "gfan", "k": "msg", "g": b"g" * 16, "members": ["bob@beta"],
                                         "b": str(tag).encode(), "n": INCARNATION}]


def add(outbox, node, tag, size=10) -> int:
    """An entry numbered and reported committed (kept in memory only: the store is not written)."""
    seq, _ = outbox.entry(node, record(tag))
    outbox.committed(node, seq, record(tag), size)
    return seq


def write(store, outbox, node, tags) -> list:
    """Commit one entry per tag to the store, one commit each, without reporting them."""
    written = []
    for tag in tags:
        seq, packed = outbox.entry(node, record(tag))
        batch = WriteBatch()
        entry = batch.add_control(1000, [])
        entry.outbox = [(node, seq, packed, record(tag))]
        store.commit(batch)
        assert entry.refused is None
        written.append((node, seq, packed, record(tag)))
    return written


def report(outbox, written) -> None:
    for node, seq, packed, rec in written:
        outbox.committed(node, seq, rec, len(packed))


def sent(windows) -> dict:
    return {node: [seq for seq, _, _ in window] for node, window in windows}


def answer(outbox, windows, results=None, now=NOW) -> None:
    """Answer every entry of ``windows``: OK unless ``results`` {seq: result} says otherwise."""
    for node, window in windows:
        for seq, _, _ in window:
            outbox.answered(node, seq, (results or {}).get(seq, OK), now)


def drain(outbox, now=NOW) -> list:
    """Send and confirm every window until nothing is due; the seqs sent to node-b, in order."""
    order = []
    while windows := outbox.due(now):
        order += sent(windows).get("node-b", [])
        answer(outbox, windows, now=now)
    return order


# -- outcome


@pytest.mark.parametrize("answer, result", [
    ({"t": "ack", "id": b"x"}, OK),
    ({"t": "ack", "id": b"x", "dup": True}, OK),
    ({"t": "res", "id": 0}, OK),
    ({"t": "err", "code": "provider_suspended"}, FINAL),
    ({"t": "err", "code": "bad_stanza"}, RETRY),  # a member never refuses a gfan so: a bug there, sent again
    ({"t": "err", "code": "overloaded", "retry_after": 500}, RETRY),
    ({"t": "err", "code": "internal"}, RETRY),
    ({"t": "err", "code": "storage_full"}, RETRY),
    ({"t": "err"}, RETRY),
    (None, RETRY),  # no answer in time
])
def test_outcome_of_a_member_nodes_answer(answer, result):
    assert outcome(answer) == result


# -- numbering and windows


def test_entries_are_numbered_per_node_and_packed(outbox):
    assert outbox.entry("node-b", record(1)) == (1, msgpack.packb(record(1)))
    assert outbox.entry("node-b", record(2))[0] == 2
    assert outbox.entry("node-c", record(3))[0] == 1
    assert set(outbox.streams) == {"node-b", "node-c"}  # no stream to itself
    assert outbox.due(NOW) == [] and not outbox.has_work and outbox.backlog == 0  # nothing committed


def test_a_window_holds_at_most_window_entries_and_the_next_waits_for_every_answer(outbox, monkeypatch):
    monkeypatch.setattr(outbox_module, "WINDOW_ENTRIES", 3)
    seqs = [add(outbox, "node-b", i) for i in range(7)]
    assert seqs == [1, 2, 3, 4, 5, 6, 7] and outbox.backlog == 7 and outbox.has_work
    first = outbox.due(NOW)
    assert sent(first) == {"node-b": [1, 2, 3]}
    assert [rec for _, rec, _ in first[0][1]] == [record(0), record(1), record(2)]
    assert outbox.due(NOW) == [] and outbox.due(NOW + 60) == []  # in flight
    outbox.answered("node-b", 3, OK, NOW)  # answers in any order
    outbox.answered("node-b", 1, OK, NOW)
    assert outbox.due(NOW) == [] and outbox.backlog == 6  # 3 waits behind 2
    outbox.answered("node-b", 2, OK, NOW)
    assert outbox.backlog == 4
    second = outbox.due(NOW)
    assert sent(second) == {"node-b": [4, 5, 6]}
    answer(outbox, second)
    assert sent(outbox.due(NOW)) == {"node-b": [7]}
    outbox.answered("node-b", 7, OK, NOW)
    assert outbox.due(NOW) == [] and not outbox.has_work and outbox.backlog == 0
    assert outbox.counters == {"outbox_sent": 7, "outbox_resent": 0, "outbox_stored": 7, "outbox_refused": 0}


def test_a_window_holds_at_most_window_bytes_and_a_larger_entry_goes_alone(outbox, monkeypatch):
    outbox.window_bytes = 100  # as the link sets it from NATS's max_payload
    for size in (60, 40, 40, 150, 10, 95, 10):
        add(outbox, "node-b", size, size)
    windows = []
    while window := outbox.due(NOW):
        windows.append(sent(window)["node-b"])
        answer(outbox, window)
    assert windows == [[1, 2], [3], [4], [5], [6], [7]]  # 60+40 fits exactly; 40+150 and 150+10 do not


def test_each_nodes_stream_goes_on_its_own(outbox):
    add(outbox, "node-b", 1)
    first = outbox.due(NOW)
    assert sent(first) == {"node-b": [1]}
    add(outbox, "node-c", 2)
    add(outbox, "node-b", 3)
    assert sent(outbox.due(NOW)) == {"node-c": [1]}  # node-b's window is still in flight
    answer(outbox, first, {1: RETRY})
    assert outbox.due(NOW) == []  # node-b waits RETRY_S, node-c's window is in flight
    outbox.answered("node-c", 1, OK, NOW)
    add(outbox, "node-c", 4)
    assert sent(outbox.due(NOW)) == {"node-c": [2]}
    assert sent(outbox.due(NOW + RETRY_S)) == {"node-b": [1, 2]}


# -- sending again


def test_a_window_with_an_entry_not_stored_goes_again_after_retry_s_from_that_entry(outbox, monkeypatch):
    monkeypatch.setattr(outbox_module, "WINDOW_ENTRIES", 4)
    for i in range(6):
        add(outbox, "node-b", i)
    window = outbox.due(NOW)
    assert sent(window) == {"node-b": [1, 2, 3, 4]}
    outbox.answered("node-b", 1, OK, NOW)
    outbox.answered("node-b", 2, outcome(None), NOW)  # no answer in time
    outbox.answered("node-b", 3, OK, NOW)
    assert outbox.due(NOW) == []  # 4 is still in flight
    outbox.answered("node-b", 4, OK, NOW + 1)  # the window is complete: the wait starts now
    assert outbox.take_acked() == {"node-b": 1} and outbox.backlog == 5
    assert outbox.due(NOW + 1) == [] and outbox.due(NOW + 1 + RETRY_S * 0.99) == [] and outbox.has_work
    again = outbox.due(NOW + 1 + RETRY_S)
    assert sent(again) == {"node-b": [2, 3, 4, 5]}  # 1 is done; 3 and 4, confirmed behind 2, come again
    assert [rec for _, rec, _ in again[0][1]] == [record(1), record(2), record(3), record(4)]
    assert outbox.counters == {"outbox_sent": 5, "outbox_resent": 3, "outbox_stored": 1, "outbox_refused": 0}
    answer(outbox, again, now=NOW + 2)
    assert sent(outbox.due(NOW + 2)) == {"node-b": [6]}  # no wait after a window all stored
    outbox.answered("node-b", 6, OK, NOW + 2)
    assert outbox.counters == {"outbox_sent": 6, "outbox_resent": 3, "outbox_stored": 6, "outbox_refused": 0}
    assert outbox.backlog == 0 and not outbox.has_work and outbox.take_acked() == {"node-b": 6}


def test_a_window_whose_first_entry_failed_goes_again_whole(outbox):
    for i in range(3):
        add(outbox, "node-b", i)
    window = outbox.due(NOW)
    answer(outbox, window, {1: RETRY})
    assert outbox.take_acked() == {} and outbox.backlog == 3 and outbox.counters["outbox_stored"] == 0
    again = outbox.due(NOW + RETRY_S)
    assert sent(again) == {"node-b": [1, 2, 3]}
    answer(outbox, again, {2: RETRY, 3: RETRY}, now=NOW + RETRY_S)
    assert sent(outbox.due(NOW + 2 * RETRY_S)) == {"node-b": [2, 3]}
    assert outbox.counters["outbox_resent"] == 5 and outbox.counters["outbox_sent"] == 3


def test_a_final_refusal_ends_the_entry(outbox, caplog):
    for i in range(3):
        add(outbox, "node-b", i)
    window = outbox.due(NOW)
    with caplog.at_level(logging.WARNING, logger="interlink.cluster"):
        answer(outbox, window, {2: outcome({"t": "err", "code": "provider_suspended"})})
    assert "refused group fan-out entry 2" in caplog.text
    assert outbox.counters["outbox_refused"] == 1 and outbox.counters["outbox_resent"] == 0
    assert outbox.due(NOW + 60) == [] and not outbox.has_work and outbox.backlog == 0
    assert outbox.take_acked() == {"node-b": 3}
    add(outbox, "node-b", 3)
    assert sent(outbox.due(NOW)) == {"node-b": [4]}  # the stream goes on


def test_a_refused_entry_is_not_counted_as_stored(outbox):
    """``outbox_stored`` is "entries their member node confirmed stored" (bindings/admin.py) and
    ``outbox_refused`` the entries refused for good: one entry is one or the other."""
    for i in range(2):
        add(outbox, "node-b", i)
    answer(outbox, outbox.due(NOW), {1: FINAL})
    assert (outbox.counters["outbox_stored"], outbox.counters["outbox_refused"]) == (1, 1)


def test_a_refused_entry_behind_one_not_stored_is_not_sent_again(outbox):
    """A final refusal ends the entry — "counted, logged, not sent again" (core/domain/outbox.py) —
    also when an earlier entry of its window is to be sent again."""
    for i in range(3):
        add(outbox, "node-b", i)
    answer(outbox, outbox.due(NOW), {1: RETRY, 2: FINAL, 3: RETRY})
    again = outbox.due(NOW + RETRY_S)
    assert sent(again) == {"node-b": [1, 3]}
    answer(outbox, again, now=NOW + RETRY_S)
    assert outbox.counters["outbox_refused"] == 1 and outbox.backlog == 0


# -- the memory bound, and the store


def test_entries_past_the_memory_bound_are_read_from_the_store_in_order_once(store, outbox, monkeypatch):
    monkeypatch.setattr(outbox_module, "MEMORY_ENTRIES", 3)
    monkeypatch.setattr(outbox_module, "WINDOW_ENTRIES", 2)
    report(outbox, write(store, outbox, "node-b", range(7)))
    report(outbox, write(store, outbox, "node-c", range(2)))
    assert outbox.backlog == 9
    order, tag = [], 7
    while windows := outbox.due(NOW):
        assert all(len(stream.queue) <= 3 for stream in outbox.streams.values())
        by_node = sent(windows)
        order += by_node.get("node-b", [])
        for _, window in windows:
            assert [rec for _, rec, _ in window] == [record(seq - 1) for seq, _, _ in window]
        answer(outbox, windows)
        if tag < 10:  # more commits while the stream is drained
            report(outbox, write(store, outbox, "node-b", [tag]))
            tag += 1
    assert order == list(range(1, 11))
    assert outbox.counters == {"outbox_sent": 12, "outbox_resent": 0, "outbox_stored": 12, "outbox_refused": 0}
    assert outbox.backlog == 0 and not outbox.has_work
    batch = WriteBatch()
    batch.outbox_acked.update(outbox.take_acked())
    assert batch.outbox_acked == {"node-b": 10, "node-c": 2}
    store.commit(batch)
    assert store.outbox_nodes() == {}


def test_an_entry_the_refill_read_before_its_commit_was_reported_is_sent_once(store, outbox, monkeypatch):
    monkeypatch.setattr(outbox_module, "MEMORY_ENTRIES", 3)
    monkeypatch.setattr(outbox_module, "WINDOW_ENTRIES", 2)
    report(outbox, write(store, outbox, "node-b", range(5)))  # 1-3 in memory, 4 and 5 in the store only
    first = outbox.due(NOW)
    assert sent(first) == {"node-b": [1, 2]}
    answer(outbox, first)
    second = outbox.due(NOW)  # refilled: 4 and 5
    assert sent(second) == {"node-b": [3, 4]}
    late = write(store, outbox, "node-b", [5])  # 6 is committed; the report comes after the next refill
    answer(outbox, second)
    third = outbox.due(NOW)
    assert sent(third) == {"node-b": [5, 6]} and third[0][1][1][1] == record(5)
    report(outbox, late)
    answer(outbox, third)
    assert outbox.due(NOW) == [] and not outbox.has_work and outbox.backlog == 0
    also = write(store, outbox, "node-b", [6])  # in memory again once the store is read to its end
    report(outbox, also)
    assert drain(outbox) == [7]
    assert outbox.counters["outbox_sent"] == 7 and outbox.counters["outbox_resent"] == 0
    assert outbox.backlog == 0


def test_an_entry_confirmed_before_its_commit_was_reported_leaves_no_backlog(store, outbox, monkeypatch):
    monkeypatch.setattr(outbox_module, "MEMORY_ENTRIES", 2)
    report(outbox, write(store, outbox, "node-b", range(3)))  # 3 in the store only
    late = write(store, outbox, "node-b", [3])
    assert drain(outbox) == [1, 2, 3, 4]
    report(outbox, late)  # the report of 4 comes after its answer
    assert outbox.backlog == 0 and not outbox.has_work and outbox.due(NOW) == []
    assert outbox.counters["outbox_sent"] == 4


def test_entries_past_the_memory_bound_wait_in_the_store_not_in_memory(store, outbox, monkeypatch):
    """``MEMORY_ENTRIES`` of a stream in memory (core/domain/outbox.py), whatever the window's size."""
    monkeypatch.setattr(outbox_module, "MEMORY_ENTRIES", 3)
    report(outbox, write(store, outbox, "node-b", range(6)))
    window = outbox.due(NOW)
    assert len(outbox.streams["node-b"].queue) <= 3 and len(window[0][1]) <= 3
    answer(outbox, window)
    assert drain(outbox) == [seq for seq in range(1, 7) if seq > window[0][1][-1][0]]


def test_a_new_outbox_sends_the_waiting_entries_first_and_numbers_on(store, outbox, caplog):
    report(outbox, write(store, outbox, "node-b", range(3)))
    report(outbox, write(store, outbox, "node-c", range(2)))
    stray = Outbox(store, "node-a", ("node-a", "node-x"))
    write(store, stray, "node-x", range(2))  # for a node no longer in the node list
    windows = outbox.due(NOW)
    outbox.answered("node-b", 1, OK, NOW)
    outbox.answered("node-b", 2, RETRY, NOW)
    outbox.answered("node-b", 3, OK, NOW)
    answer(outbox, [window for window in windows if window[0] == "node-c"])  # node-b stored 1; node-c both
    batch = WriteBatch()
    batch.outbox_acked.update(outbox.take_acked())
    store.commit(batch)
    assert store.outbox_nodes() == {"node-b": 2, "node-x": 2}
    with caplog.at_level(logging.WARNING, logger="interlink.cluster"):
        restarted = Outbox(store, "node-a", NODES)
    assert "2 group fan-out entries wait for node node-x" in caplog.text
    assert restarted.backlog == 2 and restarted.has_work
    assert restarted.entry("node-b", record(9))[0] == 4 and restarted.entry("node-c", record(9))[0] == 3
    newer = write(store, restarted, "node-b", [3])
    report(restarted, newer)
    windows = restarted.due(NOW)
    assert sent(windows) == {"node-b": [2, 3, 5]}  # 4 was numbered, never committed
    assert [rec for _, rec, _ in windows[0][1]] == [record(1), record(2), record(3)]
    assert restarted.counters["outbox_resent"] == 0  # this outbox never sent them
    answer(restarted, windows)
    assert restarted.backlog == 0 and not restarted.has_work and restarted.due(NOW + 60) == []
    assert restarted.take_acked() == {"node-b": 5}


def test_a_streams_waiting_bytes_are_counted_and_past_its_share_of_the_store_it_is_full(store, outbox):
    """Each stream counts what its entries committed and not confirmed take of the store at most
    (``outbox_footprint``; a final refusal ends one too); it is ``full`` from half the map shared by
    the other nodes on, until it drains. A new outbox reads what waits on disk."""
    assert outbox.max_node_bytes == int(store.usage()["map_size_bytes"] * outbox_module.OUTBOX_SHARE) // 2
    written = write(store, outbox, "node-b", range(3))
    report(outbox, written)
    sizes = [store.outbox_footprint("node-b", len(packed)) for _, _, packed, _ in written]
    assert sizes[0] >= 2 * len(written[0][2])  # what the entry takes of the map at most, not its packed bytes
    assert outbox.streams["node-b"].backlog_bytes == sum(sizes) and outbox.streams["node-c"].backlog_bytes == 0
    outbox.max_node_bytes = sum(sizes)
    assert outbox.full("node-b") and not outbox.full("node-c") and not outbox.full("node-z")
    again = Outbox(store, "node-a", NODES)  # after a restart: from the store
    assert (again.streams["node-b"].backlog, again.streams["node-b"].backlog_bytes) == (3, sum(sizes))
    [(node, window)] = outbox.due(NOW)
    outbox.answered(node, window[0][0], OK, NOW)
    outbox.answered(node, window[1][0], FINAL, NOW)
    assert outbox.streams["node-b"].backlog_bytes == sizes[2] and not outbox.full("node-b")
    outbox.answered(node, window[2][0], OK, NOW)
    assert (outbox.streams["node-b"].backlog, outbox.streams["node-b"].backlog_bytes) == (0, 0)


def test_a_stream_behind_is_full_once_the_outbox_pages_reach_its_part_of_the_map(tmp_path):
    """Entries of several nodes share pages: node-c's three 1000-byte entries wait, node-b piles up
    150-byte ones, and page splits leave mostly empty pages behind — the table reached twice the
    footprints before node-b's stream counted as full (a review's case). Past a quarter of its
    share, a stream is full too once the table's pages take the outbox's half of the map."""
    store = lmdb_store(tmp_path / "lmdb", sync=False, map_size_bytes=1 << 24)
    try:
        outbox = Outbox(store, "node-a", NODES)

        def put(node: str, size: int, count: int) -> None:
            batch = WriteBatch()
            entry = batch.add_control(1000, [])
            seqs = [outbox.entry(node, record(0))[0] for _ in range(count)]
            entry.outbox = [(node, seq, os.urandom(size), None) for seq in seqs]
            store.commit(batch)
            outbox.streams[node].on_disk = True  # read from the store when due: not kept in memory here
            for seq in seqs:
                outbox.committed(node, seq, None, size)

        put("node-c", 1000, 3)
        while not outbox.full("node-b"):
            put("node-b", 150, 8)
        table = store.outbox_table_bytes()
        assert outbox.streams["node-b"].backlog_bytes < outbox.max_node_bytes  # the footprints alone: not full
        assert outbox.max_bytes <= table <= outbox.max_bytes + 64 * 1024  # the table stopped at the outbox's part
        assert not outbox.full("node-c")  # its three entries are far from a quarter of its share
    finally:
        store.close()


def test_take_acked_hands_out_the_last_confirmed_entry_per_node_once(outbox):
    for i in range(3):
        add(outbox, "node-b", i)
        add(outbox, "node-c", i)
    assert outbox.take_acked() == {}
    windows = outbox.due(NOW)
    outbox.answered("node-b", 1, OK, NOW)
    outbox.answered("node-b", 3, OK, NOW)  # behind 2, not yet answered
    outbox.answered("node-c", 1, OK, NOW)
    outbox.answered("node-c", 2, OK, NOW)
    assert outbox.take_acked() == {"node-b": 1, "node-c": 2}
    assert outbox.take_acked() == {}
    outbox.answered("node-b", 2, OK, NOW)
    outbox.answered("node-c", 3, OK, NOW)
    assert outbox.take_acked() == {"node-b": 3, "node-c": 3}
    assert outbox.take_acked() == {} and sent(windows) == {"node-b": [1, 2, 3], "node-c": [1, 2, 3]}
