"""Group fan-out (``core/domain/fanout.py``): the compiled module against its pure twin, same inputs, same run.

    .venv/bin/python -m pytest bench/bench_fanout.py --benchmark-only

- ``plan_group`` / ``plan_cached``: the per-device plan of one group message (an item and a
  target per device of every member but the sending device). The device lists come from a real
  LmdbStore (its cache, as in the gateway) and the block checks from a real Policy; ``plan_cached``
  runs with its per-record rows already made (every message of a group after the first).
- ``GroupDlv``: the copies of one group message, ``build(seq, ts_ms)`` for every recipient
  device; the ``encode_stanza`` row encodes each whole dlv map instead, as the 1:1 path does.

Groups: 32 members with 2 devices each (a family or team chat) and 1,024 members with one
device each (the largest group).
"""

from __future__ import annotations

import os

import pytest

import interlink.core.domain._fanout_pure as fanout_pure
import interlink.ext._fanout as fanout_native
from interlink.core.domain.policy import Policy
from interlink.core.protocol.stanza import encode_stanza
from interlink.testing import lmdb_store

TWINS = pytest.mark.parametrize("impl", ["cython", "pure"])
MODULES = {"cython": fanout_native, "pure": fanout_pure}
SHAPES = {"32x2": (32, 2), "1024x1": (1024, 1)}  # members x devices each
GROUP_SHAPES = pytest.mark.parametrize("shape", list(SHAPES))
MSG_ID, G = os.urandom(16), os.urandom(16)
BODY = os.urandom(200)
TS_MS = 1_800_000_000_123


def _members(shape: str) -> list[str]:
    """The group's members, the sender first; half of them on another provider."""
    count, _ = SHAPES[shape]
    return [f"g{shape}-m{i}@{'alpha' if i % 2 == 0 else 'beta'}" for i in range(count)]


def _sender(shape: str) -> str:
    return _members(shape)[0]


def _copies(shape: str) -> int:
    count, devices = SHAPES[shape]
    return count * devices - 1  # every device but the sending one


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An LmdbStore with every member's devices registered, and a Policy over it (nobody blocks)."""
    store = lmdb_store(tmp_path_factory.mktemp("fanout") / "lmdb", sync=False)
    for shape, (_, devices) in SHAPES.items():
        for member in _members(shape):
            for device in range(1, devices + 1):
                store.register_device(member, device, 5)
    policy = Policy(store)
    for shape in SHAPES:
        for member in _members(shape):
            store.devices(member)  # warm the store's device cache, as a busy gateway's is
            policy.blocks(member, _sender(shape))
    yield store, policy
    store.close()


@TWINS
@GROUP_SHAPES
def test_plan_group(benchmark, world, impl, shape):
    store, policy = world
    members, sender, fanout = _members(shape), _sender(shape), MODULES[impl]
    benchmark.group = f"fan-out plan_group: {shape} (members x devices)"
    benchmark.extra_info.update(implementation=impl, members=len(members), copies=_copies(shape))
    build = fanout.GroupDlv(MSG_ID, sender, 1, BODY, G)
    items, targets = benchmark(fanout.plan_group, members, sender, 1, store.devices, policy.blocks, build)
    assert len(items) == len(targets) == _copies(shape)
    assert items[0] == (fanout.device_key(*targets[0]), build)
    assert (sender, 1) not in targets and len(set(targets)) == len(targets)


@TWINS
@GROUP_SHAPES
def test_plan_cached(benchmark, world, impl, shape):
    store, _ = world
    members, sender, fanout = _members(shape), _sender(shape), MODULES[impl]
    benchmark.group = f"fan-out plan_cached, rows made: {shape} (members x devices)"
    benchmark.extra_info.update(implementation=impl, members=len(members), copies=_copies(shape))
    build = fanout.GroupDlv(MSG_ID, sender, 1, BODY, G)
    rows: dict = {}
    blocked: set = set()
    fanout.plan_cached(rows, members, sender, 1, store.devices, blocked, build)  # the record's first message
    items, targets = benchmark(fanout.plan_cached, rows, members, sender, 1, store.devices, blocked, build)
    assert len(items) == len(targets) == _copies(shape) and (sender, 1) not in targets
    assert len(rows) == len(members)
    assert items == fanout_pure.plan_group(members, sender, 1, store.devices, lambda m, s: False, build)[0]


@pytest.mark.parametrize("impl", ["cython", "pure", "encode_stanza"])
def test_copies(benchmark, impl):
    """The dlv bytes of 1,023 copies of one group message (one per recipient device)."""
    copies = _copies("1024x1")
    benchmark.group = f"fan-out copies: {copies} dlv of one group message"
    benchmark.extra_info.update(implementation=impl, copies=copies, body_bytes=len(BODY))
    seqs = range(1, copies + 1)
    if impl == "encode_stanza":
        def run():
            return [encode_stanza({"t": "dlv", "seq": seq, "k": "msg", "id": MSG_ID, "from": "alice@alpha", "dev": 1,
                                   "ts": TS_MS, "c": BODY, "g": G}) for seq in seqs]
    else:
        build = MODULES[impl].GroupDlv(MSG_ID, "alice@alpha", 1, BODY, G)

        def run():
            return [build(seq, TS_MS) for seq in seqs]

    encoded = benchmark(run)
    assert len(encoded) == copies
    assert encoded[-1] == encode_stanza({"t": "dlv", "seq": copies, "k": "msg", "id": MSG_ID, "from": "alice@alpha",
                                         "dev": 1, "ts": TS_MS, "c": BODY, "g": G})
