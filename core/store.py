"""Durable state: the storage interface the domain logic uses, and its LMDB implementation.

Only the device registry exists so far (the device limit is enforced at authentication);
mailboxes, consent, blocks and the directory join it as named databases of the same
environment. Writes happen in short synchronous transactions; LMDB serializes writers itself.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Protocol

import lmdb

from interlink.core.errors import AuthError, ConfigError

_DEVICE = struct.Struct(">I")


class DeviceRegistry(Protocol):
    def devices(self, user: str) -> list[int]:
        """The user's registered devices, ascending."""

    def register_device(self, user: str, device: int, max_devices: int) -> list[int]:
        """Record ``device`` for ``user`` (idempotent); ``AuthError(device_limit)`` past the limit."""


class LmdbStore:
    """One LMDB environment with named databases; this is the edge where storage I/O happens."""

    def __init__(self, path: str | os.PathLike, *, map_size_bytes: int = 1 << 30, sync: bool = True) -> None:
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"data_dir: cannot create {path}: {exc.strerror}") from exc
        self.path = path
        self._env = lmdb.open(
            str(path),
            map_size=map_size_bytes,
            max_dbs=16,
            subdir=True,
            sync=sync,
            metasync=sync,
            lock=True,
        )
        # devices: key = user address (UTF-8) + device (uint32 big-endian), value = b"" — a range
        # scan over the user's prefix lists the devices in ascending order.
        self._devices = self._env.open_db(b"devices")

    def close(self) -> None:
        self._env.close()

    @staticmethod
    def _user_prefix(user: str) -> bytes:
        return user.encode("utf-8") + b"\x00"

    def devices(self, user: str) -> list[int]:
        with self._env.begin(db=self._devices) as txn:
            return self._list_in(txn, self._user_prefix(user))

    def register_device(self, user: str, device: int, max_devices: int) -> list[int]:
        prefix = self._user_prefix(user)
        key = prefix + _DEVICE.pack(device)
        with self._env.begin(db=self._devices) as txn:
            if txn.get(key) is not None:  # the common case, a known device: no write transaction
                return self._list_in(txn, prefix)
        with self._env.begin(db=self._devices, write=True) as txn:
            if txn.get(key) is not None:  # registered concurrently
                return self._list_in(txn, prefix)
            known = self._list_in(txn, prefix)
            if len(known) >= max_devices:
                raise AuthError(
                    f"user already has {len(known)} devices (limit {max_devices}); remove one first",
                    code="device_limit",
                )
            txn.put(key, b"")
            return sorted(known + [device])

    @staticmethod
    def _list_in(txn, prefix: bytes) -> list[int]:
        found = []
        cursor = txn.cursor()
        if cursor.set_range(prefix):
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(prefix):
                    break
                found.append(_DEVICE.unpack(key[len(prefix) :])[0])
        return found
