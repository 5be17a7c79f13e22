"""The LMDB environment the table families share, and what each of them writes with.

``open_environment`` makes the folder and opens the one environment of a store; each family
opens its own named databases in it. ``write_txn`` is a small write transaction of its own that
turns a full map into ``StoreFullError`` (nothing written); ``scan`` is the prefix range scan
behind every per-user and per-device list.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import lmdb

from interlink.core.errors import ConfigError, StoreFullError

MAX_DBS = 32  # named databases the environment may hold (the families open 26)


def open_environment(
    path: str | os.PathLike, *, map_size_bytes: int, sync: bool, writemap: bool
) -> tuple[Path, lmdb.Environment]:
    """The folder (created if missing; ``ConfigError`` naming ``data_dir`` if it cannot be) and
    the environment in it. ``sync`` False leaves the flush to the OS (``async`` durability).
    ``writemap`` (the ``lmdb_writemap`` setting): commits write their pages in the shared map
    instead of one ``pwrite`` each, and the data file is sized to the whole map (sparse);
    nothing in this process writes into the map outside LMDB's calls, as LMDB requires."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"data_dir: cannot create {path}: {exc.strerror}") from exc
    env = lmdb.open(str(path), map_size=map_size_bytes, max_dbs=MAX_DBS, subdir=True, sync=sync, metasync=sync, lock=True,
                    writemap=writemap)
    return path, env


def lock_data_dir(folder: str | os.PathLike) -> int:
    """An exclusive lock on ``folder/interlink.lock`` (a file descriptor: held until it is closed
    or the process ends): one gateway, or one of the cluster's data moves, per data folder at a
    time — LMDB itself lets several processes write. ``ConfigError`` naming ``data_dir`` when
    another process holds it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / "interlink.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"data_dir: cannot create {folder / 'interlink.lock'}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"data_dir: {folder} is in use by another interlink process (a running gateway, or a "
                          "cluster export/import/prune)") from None
    return fd


def store_full() -> StoreFullError:
    return StoreFullError("the gateway's storage is full; try again later")


def user_prefix(user: str) -> bytes:
    """What every key of one user starts with (addresses hold no zero byte, so it is unambiguous)."""
    return user.encode("utf-8") + b"\x00"


def scan(cursor, prefix: bytes, start: bytes | None = None, limit: int | None = None, values: bool = False):
    """Keys (or key/value pairs) under ``prefix``, in order, from ``start`` (default: the prefix)
    and at most ``limit`` of them."""
    if (limit is not None and limit <= 0) or not cursor.set_range(start or prefix):
        return
    count = 0
    for entry in cursor.iternext(keys=True, values=values):
        if not (entry[0] if values else entry).startswith(prefix):
            return
        yield entry
        count += 1
        if limit is not None and count >= limit:
            return


@contextmanager
def write_txn(env: lmdb.Environment):
    """``with write_txn(env) as txn``: commits when the block ends, aborts on an exception, and
    turns a full map into ``StoreFullError``."""
    txn = env.begin(write=True)
    try:
        yield txn
    except lmdb.MapFullError:
        txn.abort()
        raise store_full() from None
    except BaseException:
        txn.abort()
        raise
    try:
        txn.commit()
    except lmdb.MapFullError:
        raise store_full() from None
