"""Regression tests of the review of the shared-body store change (06e25bd): the compiled twin of
the store's per-copy loops (``ext/_mailbox.pyx``) must fail the way its pure twin
(``core/edge/_mailbox_pure.py``) does and take the arguments it takes, as its docstring promises.

The store itself (reference counts through recv, the TTL sweep, duplicates, skip_full, a full map,
reopening, thread commits against the sweep) held up in the review; these are the defects found.
Both twins are imported directly, like ``tests/test_mailbox.py``: a missing build fails the file.
"""

from __future__ import annotations

import struct
import subprocess
import sys

import interlink.core.edge._mailbox_pure as mailbox_pure
import interlink.ext._mailbox as mailbox_native

TWINS = {"pure": mailbox_pure, "cython": mailbox_native}
MBOX = object()  # stands for the LMDB database handle
TS = struct.pack(">Q", 1_764_000_000_000)


def outcome(call, *args):
    """What a call returned, or the type of what it raised."""
    try:
        return ("ok", call(*args))
    except Exception as exc:  # noqa: BLE001 - compared between the twins
        return ("raised", type(exc))


# A value shorter than 9 items that is not ``bytes`` takes ``_forget_slow``, which indexes it
# (``value[8]``) with the module's boundscheck=False: a list or tuple is read past its end.
# Run in a child so that a crash fails this test instead of ending the test session.
_SHORT_SEQUENCE = """
import interlink.core.edge._mailbox_pure as pure
import interlink.ext._mailbox as native

for name, twin in (("pure", pure), ("cython", native)):
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
    done = subprocess.run([sys.executable, "-c", _SHORT_SEQUENCE], capture_output=True, text=True, timeout=60)
    expected = [
        f"{name} {kind} {what}"
        for name in ("pure", "cython")
        for kind in ("list", "tuple")
        for what in ("IndexError", "delete IndexError")
    ]
    assert done.returncode == 0, f"the child died (rc {done.returncode}) after: {done.stdout!r}"
    assert done.stdout.split("\n")[:-1] == expected


def test_the_compiled_twin_takes_the_argument_types_the_pure_twin_takes():
    results = {}
    for name, twin in TWINS.items():
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
