"""The store's per-copy loops, pure-Python twin of ``interlink.ext._mailbox`` (the contract; read
this one first).

A group message to a thousand devices is a thousand ``mbox`` puts, and their ``recv`` a thousand
deletes; ``bench/group_load.py --store`` showed the Python around each LMDB call costing about as
much as the call. These are the loops of ``LmdbStore`` (``core/edge/lmdbstore/mailboxes.py``) that run
once per copy, with nothing of the store's policy in them:

* ``MailboxState`` — a device's counters (last seq, items and bytes stored), packed as the
  ``seqs`` table's value (``>QIQ``).
* ``plan_copies`` — each item's seq and encoded copy (``build(seq, ts)``), checked against the
  mailbox quotas: ``(planned, kept, dropped)``, or None when a mailbox is over its quota and the
  message is not ``skip_full`` (the whole message is refused).
* ``write_copies`` — the puts of planned copies, whole (``ts`` + the encoded ``dlv``) or as
  references to a shared body (``ts`` + ``SHARED_MARK`` + body id + the copy's size), and the
  counters; appends ``(device key, seq, value)`` to ``stored``.
* ``delete_items`` — a device's received items: one ``pop`` each (already gone: skipped), the
  counters, and each reference to a shared body counted in ``released`` (body key -> count).
* ``forget_item`` — the size an ``mbox`` value counted in its quota, its reference counted.

``put``/``pop`` are an LMDB write transaction's methods (py-lmdb), called as ``put(key, value,
db=mbox)`` and ``pop(key, db=mbox)``. Both twins raise the same exceptions for the same misuse
(``struct.error`` for a seq outside uint64 or a body id outside uint64; whatever ``build``,
``state_of``, ``put`` or ``pop`` raise).
"""

from __future__ import annotations

import struct

_MAILBOX_STATE = struct.Struct(">QIQ")  # last seq, items stored, bytes stored
_SEQ = struct.Struct(">Q")
_SHARED_REF = struct.Struct(">BQI")  # SHARED_MARK, body id, the copy's encoded size
_SIZE = struct.Struct(">I")
SHARED_MARK = 0xC1  # msgpack's one unused byte: never the first byte of an encoded stanza


class MailboxState:
    """A device's mailbox counters: the last seq given out (never goes back), items and bytes stored."""

    __slots__ = ("last_seq", "items", "bytes")

    def __init__(self, raw: bytes | None = None) -> None:
        if raw is None:
            self.last_seq, self.items, self.bytes = 0, 0, 0
        else:
            self.last_seq, self.items, self.bytes = _MAILBOX_STATE.unpack(raw)

    def pack(self) -> bytes:
        return _MAILBOX_STATE.pack(self.last_seq, self.items, self.bytes)


def plan_copies(items, states: dict, state_of, ts: int, max_items: int, max_bytes: int, skip_full: bool):
    """Plan the copies of one message: ``items`` is ``[(device key, build)]``; a device's state
    comes from ``states`` or, the first time, ``state_of(device key)`` (which must put it there).
    A copy that would take its mailbox over ``max_items`` or ``max_bytes`` refuses the whole
    message (None) or, with ``skip_full``, is skipped. Returns ``(planned, kept, dropped)``:
    ``[(device key, seq, encoded copy)]``; None when nothing was skipped, else the indices of the
    planned items; how many were skipped. Nothing is written and no state changes."""
    planned = []
    kept = None
    dropped = 0
    added: dict[bytes, tuple[int, int]] = {}  # what this message adds to a mailbox so far
    for index, (dkey, build) in enumerate(items):
        state = states.get(dkey)
        if state is None:
            state = state_of(dkey)
        count, size = added.get(dkey, (0, 0))
        seq = state.last_seq + count + 1
        value = build(seq, ts)
        if state.items + count + 1 > max_items or state.bytes + size + len(value) > max_bytes:
            if not skip_full:
                return None
            if kept is None:
                kept = list(range(index))
            dropped += 1
            continue
        added[dkey] = (count + 1, size + len(value))
        if kept is not None:
            kept.append(index)
        planned.append((dkey, seq, value))
    return planned, kept, dropped


def write_copies(put, mbox, planned: list, states: dict, ts_prefix: bytes, body_id: int | None, stored: list) -> None:
    """Put every planned copy into ``mbox`` — whole, or (``body_id`` not None) as a reference to
    that shared body — count it in its device's state and append it to ``stored``."""
    for dkey, seq, value in planned:
        state = states[dkey]
        state.last_seq = seq
        state.items += 1
        state.bytes += len(value)
        if body_id is None:
            item = ts_prefix + value
        else:
            item = ts_prefix + _SHARED_REF.pack(SHARED_MARK, body_id, len(value))
        put(dkey + _SEQ.pack(seq), item, db=mbox)
        stored.append((dkey, seq, value))


def delete_items(pop, mbox, dkey: bytes, seqs, state: MailboxState, released: dict) -> int:
    """Delete the device's items ``seqs`` (one already gone is skipped), take them off ``state``
    and count their references to shared bodies in ``released``; returns how many went."""
    removed = freed = 0
    for seq in seqs:
        value = pop(dkey + _SEQ.pack(seq), db=mbox)
        if value is None:
            continue
        removed += 1
        freed += forget_item(value, released)
    state.items -= removed
    state.bytes -= freed
    return removed


def forget_item(value: bytes, released: dict) -> int:
    """An ``mbox`` value on its way out: count its reference to a shared body, if it is one, in
    ``released``; returns the size its mailbox quota counted for it."""
    if value[8] == SHARED_MARK:
        body_key = value[9:17]
        released[body_key] = released.get(body_key, 0) + 1
        return _SIZE.unpack_from(value, 17)[0]
    return len(value) - 8
