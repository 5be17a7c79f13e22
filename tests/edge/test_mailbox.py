"""The store's per-copy loops (``core/edge/_mailbox_pure.py`` and ``ext/_mailbox.pyx``): every case runs
on both twins, and hypothesis checks that they give identical results — plans, the puts and pops
they make, the counters and references they leave, the exceptions they raise — on random inputs.

Both modules come from ``tests/twins.py``, which imports the compiled one directly, so a missing
build fails this file instead of silently testing the pure twin twice. The store that uses them
is tested on real LMDB in ``tests/edge/lmdbstore/``; here ``put``/``pop`` are recorded against a
dict so the two twins can be compared call by call, and the compiled twin is held to its promise
to fail the way the pure twin does and to take the arguments it takes.
"""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from interlink.core.edge import mailbox

from twins import TWIN_IDS, twin_fixture, twin_modules

TWINS = mailbox_native, mailbox_pure = twin_modules("_mailbox")
HYPOTHESIS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MBOX = object()  # stands for the LMDB database handle: passed through to put/pop untouched
TS = struct.pack(">Q", 1_764_000_000_000)


twin = twin_fixture("_mailbox")  # the module under test: compiled, then pure


def outcome(call, *args):
    """What a call returned, or the type of what it raised."""
    try:
        return ("ok", call(*args))
    except Exception as exc:  # noqa: BLE001 - compared between the twins
        return ("raised", type(exc))


class Table:
    """An ``mbox`` table as a dict, recording the calls the loops make."""

    def __init__(self, items=None) -> None:
        self.items = dict(items or {})
        self.calls: list = []

    def put(self, key, value, db=None):
        assert db is MBOX
        self.calls.append(("put", key, value))
        self.items[key] = value
        return True

    def pop(self, key, db=None):
        assert db is MBOX
        self.calls.append(("pop", key))
        return self.items.pop(key, None)


def build(seq, ts):
    return b"copy:%d:%d" % (seq, ts)


def states_of(twin, raw: dict):
    return {dkey: twin.MailboxState(value) for dkey, value in raw.items()}


def counters(states: dict) -> dict:
    return {dkey: (s.last_seq, s.items, s.bytes) for dkey, s in states.items()}


def test_the_selector_exports_the_active_twin():
    import interlink.core

    expected = mailbox_pure if interlink.core.IMPLEMENTATION == "python" else mailbox_native
    assert mailbox.plan_copies is expected.plan_copies and mailbox.MailboxState is expected.MailboxState


def test_state_round_trip(twin):
    state = twin.MailboxState(struct.pack(">QIQ", 2**64 - 1, 7, 123))
    assert (state.last_seq, state.items, state.bytes) == (2**64 - 1, 7, 123)
    assert twin.MailboxState(state.pack()).pack() == state.pack()
    empty = twin.MailboxState()
    assert (empty.last_seq, empty.items, empty.bytes) == (0, 0, 0)
    empty.items -= 1
    with pytest.raises(struct.error):  # a negative count cannot be stored
        empty.pack()


def test_plan_refuses_or_skips_at_the_quota(twin):
    a, b = b"a\x00\x00\x00\x00\x01", b"b\x00\x00\x00\x00\x01"
    states = {a: twin.MailboxState(struct.pack(">QIQ", 10, 2, 0))}
    loaded = []

    def state_of(dkey):
        loaded.append(dkey)
        states[dkey] = twin.MailboxState()
        return states[dkey]

    items = [(a, build), (b, build), (a, build)]
    assert twin.plan_copies(items, states, state_of, 5, 3, 1 << 20, False) is None  # a would hold 4
    assert loaded == [b]
    planned, kept, dropped = twin.plan_copies(items, states, state_of, 5, 3, 1 << 20, True)
    assert planned == [(a, 11, b"copy:11:5"), (b, 1, b"copy:1:5")] and kept == [0, 1] and dropped == 1
    assert twin.plan_copies(items, states, state_of, 5, 10, 1 << 20, True) == (
        [(a, 11, b"copy:11:5"), (b, 1, b"copy:1:5"), (a, 12, b"copy:12:5")], None, 0)
    assert counters(states)[a] == (10, 2, 0)  # planning changes nothing


def test_write_whole_and_shared(twin):
    a = b"a\x00\x00\x00\x00\x01"
    states = {a: twin.MailboxState()}
    table, stored = Table(), []
    twin.write_copies(table.put, MBOX, [(a, 1, b"x" * 30)], states, TS, None, stored)
    twin.write_copies(table.put, MBOX, [(a, 2, b"y" * 40)], states, TS, 2**40 + 5, stored)
    assert table.calls == [
        ("put", a + struct.pack(">Q", 1), TS + b"x" * 30),
        ("put", a + struct.pack(">Q", 2), TS + bytes([0xC1]) + struct.pack(">QI", 2**40 + 5, 40)),
    ]
    assert stored == [(a, 1, b"x" * 30), (a, 2, b"y" * 40)]
    assert counters(states)[a] == (2, 2, 70)


def test_delete_counts_references_and_sizes(twin):
    a = b"a\x00\x00\x00\x00\x01"
    shared = TS + bytes([0xC1]) + struct.pack(">QI", 9, 500)
    table = Table({a + struct.pack(">Q", 1): TS + b"z" * 20, a + struct.pack(">Q", 2): shared,
                   a + struct.pack(">Q", 3): shared})
    state = twin.MailboxState(struct.pack(">QIQ", 3, 3, 1020))
    released: dict = {}
    assert twin.delete_items(table.pop, MBOX, a, [1, 2, 3, 4, 2], state, released) == 3
    assert (state.items, state.bytes) == (0, 0)
    assert released == {struct.pack(">Q", 9): 2}
    assert twin.forget_item(shared, released) == 500 and released[struct.pack(">Q", 9)] == 3


def test_odd_inputs_fail_alike():
    for twin in TWINS:
        assert outcome(twin.forget_item, b"short", {})[1] is IndexError
        assert outcome(twin.forget_item, TS + bytes([0xC1]) + b"abc", {})[1] is struct.error
        assert outcome(twin.forget_item, bytearray(TS + b"abc"), {}) == ("ok", 3)
        table = Table()
        assert outcome(twin.delete_items, table.pop, MBOX, b"k", [-1], twin.MailboxState(), {})[1] is struct.error
        assert outcome(twin.delete_items, table.pop, MBOX, b"k", [2**64], twin.MailboxState(), {})[1] is struct.error
        states = {b"k": twin.MailboxState()}
        assert outcome(twin.write_copies, table.put, MBOX, [(b"k", 1, b"v")], states, TS, -1, [])[1] is struct.error


# ---------------------------------------------------------------- the twins against each other

DKEYS = [bytes([c]) + b"\x00\x00\x00\x00\x01" for c in b"abcd"]
raw_states = st.dictionaries(
    st.sampled_from(DKEYS),
    st.tuples(st.integers(0, 2**64 - 100), st.integers(0, 50), st.integers(0, 5_000)).map(lambda t: struct.pack(">QIQ", *t)),
)


@HYPOTHESIS
@given(
    raw=raw_states,
    targets=st.lists(st.sampled_from(DKEYS), max_size=12),
    max_items=st.integers(0, 60),
    max_bytes=st.integers(0, 6_000),
    skip_full=st.booleans(),
    ts=st.integers(0, 2**40),
)
def test_plans_are_identical(raw, targets, max_items, max_bytes, skip_full, ts):
    results = []
    for twin in TWINS:
        states = states_of(twin, raw)

        def state_of(dkey, states=states, twin=twin):
            states[dkey] = twin.MailboxState()
            return states[dkey]

        result = outcome(twin.plan_copies, [(d, build) for d in targets], states, state_of, ts, max_items, max_bytes, skip_full)
        results.append((result, counters(states)))
    assert results[0] == results[1]


@HYPOTHESIS
@given(
    raw=raw_states,
    copies=st.lists(st.tuples(st.sampled_from(DKEYS), st.integers(0, 2**64 + 5), st.binary(min_size=1, max_size=40)),
                    max_size=10),
    body_id=st.one_of(st.none(), st.integers(-2, 2**64 + 2)),
)
def test_writes_are_identical(raw, copies, body_id):
    copies = [c for c in copies if c[0] in raw]
    results = []
    for twin in TWINS:
        states, table, stored = states_of(twin, raw), Table(), []
        result = outcome(twin.write_copies, table.put, MBOX, copies, states, TS, body_id, stored)
        results.append((result, table.calls, stored, counters(states)))
    assert results[0] == results[1]


stored_values = st.one_of(
    st.binary(min_size=9, max_size=40).filter(lambda v: v[8] != 0xC1),
    st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)).map(
        lambda t: TS + bytes([0xC1]) + struct.pack(">QI", *t)),
)


@HYPOTHESIS
@given(
    values=st.dictionaries(st.integers(0, 20), stored_values, max_size=12),
    seqs=st.lists(st.integers(0, 25), max_size=15),
    start=st.tuples(st.integers(0, 100), st.integers(0, 2**40)),
)
def test_deletes_are_identical(values, seqs, start):
    dkey = DKEYS[0]
    results = []
    for twin in TWINS:
        table = Table({dkey + struct.pack(">Q", seq): value for seq, value in values.items()})
        state = twin.MailboxState(struct.pack(">QIQ", 30, *start))
        released: dict = {}
        result = outcome(twin.delete_items, table.pop, MBOX, dkey, seqs, state, released)
        results.append((result, table.calls, table.items, released, (state.items, state.bytes)))
    assert results[0] == results[1]


# ---------------------------------------------------------------- odd arguments: the compiled twin as the pure one

# A value shorter than 9 items that is not ``bytes`` takes ``_forget_slow``, which indexes it
# (``value[8]``) with the module's boundscheck=False: a list or tuple is read past its end.
# Run in a child so that a crash fails this test instead of ending the test session.
_SHORT_SEQUENCE = """
import importlib
import sys

for name, module in zip(sys.argv[1::2], sys.argv[2::2]):
    twin = importlib.import_module(module)
    for value in ([0] * 3, (0,) * 3):
        try:
            twin.forget_item(value, {})
        except IndexError:
            print(name, type(value).__name__, "IndexError", flush=True)
        state = twin.MailboxState()
        try:
            twin.delete_items(lambda key, db: value, None, b"k", [1], state, {})
        except IndexError:
            print(name, type(value).__name__, "delete IndexError", flush=True)
"""


def test_a_short_sequence_raises_index_error_in_both_twins_not_a_crash():
    names = [arg for name, module in zip(TWIN_IDS, TWINS) for arg in (name, module.__name__)]
    done = subprocess.run([sys.executable, "-c", _SHORT_SEQUENCE, *names], capture_output=True, text=True, timeout=60)
    expected = [
        f"{name} {kind} {what}"
        for name in TWIN_IDS
        for kind in ("list", "tuple")
        for what in ("IndexError", "delete IndexError")
    ]
    assert done.returncode == 0, f"the child died (rc {done.returncode}) after: {done.stdout!r}"
    assert done.stdout.split("\n")[:-1] == expected


def test_the_compiled_twin_takes_the_argument_types_the_pure_twin_takes():
    results = {}
    for name, twin in zip(TWIN_IDS, TWINS):
        items: dict = {}
        states = {b"k": twin.MailboxState()}
        put = lambda key, value, db: items.__setitem__(bytes(key), bytes(value))  # noqa: E731
        pop = lambda key, db: items.pop(bytes(key), None)  # noqa: E731
        planned = ((b"k", 1, b"copy one"), (b"k", 2, b"copy two"))  # a tuple, not a list
        wrote = outcome(twin.write_copies, put, MBOX, planned, states, TS, None, [])
        deleted = outcome(twin.delete_items, pop, MBOX, bytearray(b"k"), [1], states[b"k"], {})  # a bytearray key
        state = states[b"k"]
        results[name] = (wrote, deleted, (state.last_seq, state.items, state.bytes), items)
    assert results["cython"] == results["pure"]
    assert results["pure"][1] == ("ok", 1)
