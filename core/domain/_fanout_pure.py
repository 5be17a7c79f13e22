"""Group fan-out, pure-Python twin of ``interlink.ext._fanout`` (the contract; read this one first).

Two pieces of a group ``msg``'s fan-out (``core/domain/groups.py``), the ones the profile of
``bench/group_load.py`` showed on the gateway's hot path besides LMDB and the socket writes:

* ``plan_group`` — the per-device plan of one group message: an item ``(device key, build)`` and a
  target ``(user, device)`` for every device of every member but the sending device, minus the
  members who blocked the sender. ``devices_of(user)`` and ``blocks(member, sender)`` are the
  store's and the policy's look-ups; ``blocks`` is not asked about the sender itself.
* ``GroupDlv`` — ``build(seq, ts_ms)``: the encoded ``dlv`` of one copy. The message's fields are
  encoded once per ``ts_ms`` (a message has one); each copy is that tail with its own ``seq``
  spliced in front, byte-identical to ``encode_stanza`` of the whole ``dlv`` map
  ``{"t": "dlv", "seq", "k": "msg", "id", "from", "dev", "ts", "c", "g"}``.

* ``splice`` — a copy's bytes from its ``seq`` and the shared tail (what ``GroupDlv`` returns, and
  how the store makes a copy whole again from a body it keeps once).
* ``plan_cached`` — the same plan from a per-(group, ver) cache ``rows`` (a dict the caller keeps
  per record: member -> ``(devices, device keys, targets)``), so a member's keys and targets are
  made once per record, not once per message. ``devices_of(member)`` is still asked for every
  member who did not block the sender, and a row whose devices changed is made again. ``blocked``
  is the set of members who blocked the sender, looked up once per message by the caller
  (``in`` is its only use); the sender is never looked up in it.

All of them return what the pure code returns and raise what it raises (``TypeError``, ``OverflowError``
from the msgpack packer, ``struct.error`` for a device number outside uint32, ``AttributeError`` or
``UnicodeEncodeError`` for a member that is not an encodable ``str``).
"""

from __future__ import annotations

import msgpack

from interlink.core.domain.batch import device_key  # the store's key; the compiled twin has it in C

_packer = msgpack.Packer(use_bin_type=True)

# fixmap of 9 entries, "t": "dlv", "seq" — the head every group dlv starts with.
DLV_HEAD = b"\x89" + _packer.pack("t") + _packer.pack("dlv") + _packer.pack("seq")


def splice(seq: int, tail: bytes) -> bytes:
    """One copy's ``dlv`` from the fields every copy shares (``tail``, as ``GroupDlv`` encodes them
    and the store keeps them once): ``DLV_HEAD`` + the packed ``seq`` + ``tail``."""
    return DLV_HEAD + _packer.pack(seq) + tail


class GroupDlv:
    """The ``dlv`` builder of one group message: ``build(seq, ts_ms) -> bytes``."""

    __slots__ = ("_tail", "_ts", "body", "g", "msg_id", "sender", "sender_device")

    def __init__(self, msg_id: bytes, sender: str, sender_device: int, body: bytes, g: bytes) -> None:
        self.msg_id = msg_id
        self.sender = sender
        self.sender_device = sender_device
        self.body = body
        self.g = g
        self._ts = None
        self._tail = b""

    def __call__(self, seq: int, ts_ms: int) -> bytes:
        if self._ts is None or self._ts != ts_ms:
            encoded = _packer.pack({
                "k": "msg", "id": self.msg_id, "from": self.sender, "dev": self.sender_device, "ts": ts_ms,
                "c": self.body, "g": self.g,
            })
            self._ts, self._tail = ts_ms, encoded[1:]  # without its 7-entry map header
        return splice(seq, self._tail)


def plan_group(members, sender: str, sender_device: int, devices_of, blocks, build) -> tuple[list, list]:
    """``(items, targets)`` of one group message (see the module docstring)."""
    items, targets = [], []
    for member in members:
        if member == sender:
            for device in devices_of(member):
                if device != sender_device:
                    items.append((device_key(member, device), build))
                    targets.append((member, device))
        elif not blocks(member, sender):
            for device in devices_of(member):
                items.append((device_key(member, device), build))
                targets.append((member, device))
    return items, targets


def plan_cached(rows: dict, members, sender: str, sender_device: int, devices_of, blocked, build) -> tuple[list, list]:
    """``(items, targets)`` of one group message, through the per-record cache ``rows`` (see the
    module docstring): the same plan as ``plan_group`` with ``blocks(m, s) = m in blocked``."""
    items, targets = [], []
    for member in members:
        own = member == sender
        if not own and member in blocked:
            continue
        devices = devices_of(member)
        row = rows.get(member)
        if row is None or (row[0] is not devices and row[0] != devices):
            row = (devices, tuple(device_key(member, d) for d in devices), tuple((member, d) for d in devices))
            rows[member] = row
        keys, member_targets = row[1], row[2]
        if own:
            for index in range(len(keys)):
                target = member_targets[index]
                if target[1] != sender_device:
                    items.append((keys[index], build))
                    targets.append(target)
        else:
            for index in range(len(keys)):
                items.append((keys[index], build))
                targets.append(member_targets[index])
    return items, targets
