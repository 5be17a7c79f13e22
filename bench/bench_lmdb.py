"""The shapes of py-lmdb calls the store could use, measured before choosing one (docs/benchmarks.md,
"The LMDB calls"): what a commit's mailbox puts cost as a loop of ``txn.put``, as one
``Cursor.putmulti``, and with the environment's ``writemap`` off (one ``pwrite`` per dirty page at
commit) or on (pages written in the map; the store's choice). No fsync (``sync=False``): the CPU
side only.

    .venv/bin/python -m pytest bench/bench_lmdb.py --benchmark-only

Each round is one write transaction of ``ITEMS`` puts of 150-byte values under 32-byte keys
spread over 8 devices (one 1:1 turn of a closed loop), committed. ``fsync_floor``: one put
committed with ``sync`` — the disk's part of a lone message's latency.
"""

from __future__ import annotations

import os
import struct

import lmdb
import pytest

ITEMS = 128
DEVICES = [os.urandom(24) for _ in range(8)]
VALUE = os.urandom(150)
SEQ = struct.Struct(">Q")


class Batches:
    """Keys that go on growing, as mailbox seqs do."""

    def __init__(self) -> None:
        self.seqs = dict.fromkeys(DEVICES, 0)

    def next(self) -> list[tuple[bytes, bytes]]:
        items = []
        for i in range(ITEMS):
            dkey = DEVICES[i % len(DEVICES)]
            self.seqs[dkey] += 1
            items.append((dkey + SEQ.pack(self.seqs[dkey]), VALUE))
        return items


@pytest.fixture(params=[False, True], ids=["pwrite", "writemap"])
def env(tmp_path, request):
    environment = lmdb.open(str(tmp_path), map_size=1 << 30, max_dbs=2, sync=False, metasync=False,
                            writemap=request.param)
    yield environment, environment.open_db(b"mbox")
    environment.close()


def _count(environment, db) -> int:
    with environment.begin(db=db) as txn:
        return txn.stat(db)["entries"]


def test_put_loop(benchmark, env):
    environment, db = env
    batches = Batches()

    def commit(items):
        with environment.begin(write=True) as txn:
            put = txn.put
            for key, value in items:
                put(key, value, db=db)

    benchmark.pedantic(commit, setup=lambda: ((batches.next(),), {}), rounds=300)
    assert _count(environment, db) == sum(batches.seqs.values())  # every prepared batch was committed


def test_putmulti(benchmark, env):
    environment, db = env
    batches = Batches()

    def commit(items):
        with environment.begin(write=True) as txn, txn.cursor(db=db) as cursor:
            consumed, added = cursor.putmulti(items)
            assert added == len(items)

    benchmark.pedantic(commit, setup=lambda: ((batches.next(),), {}), rounds=300)
    assert _count(environment, db) == sum(batches.seqs.values())  # every prepared batch was committed


@pytest.mark.parametrize("writemap", [False, True], ids=["pwrite", "writemap"])
def test_fsync_floor(benchmark, tmp_path, writemap):
    """What a lone message's commit cannot go below with ``sync`` durability: one put, committed
    and flushed to the disk under the temporary folder (fdatasync, or msync with writemap)."""
    environment = lmdb.open(str(tmp_path), map_size=1 << 26, max_dbs=2, sync=True, metasync=True, writemap=writemap)
    db = environment.open_db(b"mbox")
    batches = Batches()

    def commit(key):
        with environment.begin(write=True) as txn:
            txn.put(key, VALUE, db=db)

    benchmark.pedantic(commit, setup=lambda: ((batches.next()[0][0],), {}), rounds=100)
    assert _count(environment, db) == sum(batches.seqs.values()) // ITEMS  # one key of each prepared batch
    environment.close()
