"""The bytes of end-to-end-encrypted attachments ("blobs"), in files under the gateway's data
dir: the embedded default store. Blob metadata (expected size and hash, readiness) lives in LMDB
and is not handled here; blob bytes never go into LMDB.

Layout: one file per blob, in 256 fan-out folders named by the first byte of the 16-byte id,
so no folder grows past a few thousand entries::

    <root>/3f/3fa9…c2.blob          (32 lowercase hex digits + ".blob", mode 0600)

Durability rules:

* ``write`` puts bytes at an offset (chunks arrive in any order, possibly twice) and is NOT
  durable: the bytes may sit in the page cache until ``sync`` or ``finish``.
* ``sync`` and ``finish`` fsync the file and then its fan-out folder, so both the bytes and the
  directory entry survive a power loss. A fan-out folder is fsynced into the root once, when
  ``write`` creates it.
* ``finish`` returns the SHA-256 of the first ``size`` bytes *after* the fsync: the caller
  marks the blob ready only when that digest matches, so a ready blob is always on disk.
* ``delete`` is not fsynced: a file that comes back after a crash has no metadata any more and
  the start-up sweep (``ids`` then ``delete``) removes it again.

No file descriptor is held between calls (a gateway may have thousands of uploads open), and
no call keeps more than one 1 MiB read buffer in memory. An object store (S3 API) may implement
the same methods; ``tests/edge/test_blobfiles.py`` is the contract both must pass.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["BlobFileStore", "BLOB_ID_SIZE"]

BLOB_ID_SIZE = 16
_SUFFIX = ".blob"
_HEX_DIGITS = frozenset("0123456789abcdef")
_READ_PIECE = 1 << 20  # 1 MiB: the one read buffer a call may hold
_FILE_MODE = 0o600  # ciphertext only, but nobody else on the host has a reason to read it
_FOLDER_MODE = 0o700
# Descriptors never leak into a child process (Python already makes them non-inheritable;
# O_CLOEXEC closes the window between open and that flag being set).
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _check_id(blob: object) -> bytes:
    """The id, checked before any path is built from it."""
    if not isinstance(blob, bytes):
        raise ValueError(f"blob id must be {BLOB_ID_SIZE} bytes, got a {type(blob).__name__}")
    if len(blob) != BLOB_ID_SIZE:
        raise ValueError(f"blob id must be {BLOB_ID_SIZE} bytes, got {len(blob)}")
    return blob


def _check_count(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got a {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _is_hex(name: str, length: int) -> bool:
    return len(name) == length and all(char in _HEX_DIGITS for char in name)


def _fsync_path(path: str | Path, flags: int) -> None:
    fd = os.open(path, flags | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: str | Path) -> None:
    # fsync on the folder makes the entries in it (a new file, a new subfolder) durable.
    _fsync_path(path, os.O_RDONLY | _DIRECTORY)


class BlobFileStore:
    """Blob bytes in files under ``root``, one file per 16-byte blob id (see the module docstring).

    Safe to call from several threads at once for different blobs (the event loop writes, a
    worker thread runs ``finish``): every call opens and closes its own descriptor.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root)
        self._root.mkdir(mode=_FOLDER_MODE, parents=True, exist_ok=True)
        # Paths are built as plain strings: a chunk write is a few microseconds of system calls,
        # and pathlib's objects cost as much again.
        self._prefix = os.fspath(self._root) + os.sep

    @property
    def root(self) -> Path:
        """The folder holding the 256 fan-out folders."""
        return self._root

    def __repr__(self) -> str:
        return f"BlobFileStore({str(self._root)!r})"

    # ------------------------------------------------------------------ paths

    def _folder(self, blob: bytes) -> str:
        return self._prefix + blob[:1].hex()

    def _path(self, blob: bytes) -> str:
        hexed = blob.hex()
        return f"{self._prefix}{hexed[:2]}{os.sep}{hexed}{_SUFFIX}"

    def path(self, blob: bytes) -> Path:
        """The file of ``blob`` (for copying it whole: a node list change moves blobs)."""
        return Path(self._path(_check_id(blob)))

    def place(self, blob: bytes, source: Path) -> None:
        """Put a copy of ``source`` in as ``blob``'s file, durably (a node list change moves it here)."""
        folder = self._folder(_check_id(blob))
        self._ensure_folder(folder)
        target = self._path(blob)
        partial = target + ".moving"
        shutil.copyfile(source, partial)
        os.chmod(partial, _FILE_MODE)
        _fsync_path(partial, os.O_RDONLY)
        os.replace(partial, target)
        _fsync_folder(folder)

    def _ensure_folder(self, folder: str) -> None:
        try:
            os.mkdir(folder, _FOLDER_MODE)
        except FileExistsError:
            return
        # At most 256 times in the store's life: make the new folder's entry in the root durable
        # now, so sync/finish only ever need to fsync the file and its own folder.
        _fsync_folder(self._root)

    # ------------------------------------------------------------------ bytes

    def write(self, blob: bytes, offset: int, data: bytes) -> None:
        """Put ``data`` at ``offset`` of the blob's file, creating it if absent. Not durable until
        ``sync`` or ``finish``; writing the same bytes at the same offset again is harmless."""
        blob = _check_id(blob)
        offset = _check_count(offset, "offset")
        view = memoryview(data).cast("B")
        path = self._path(blob)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | _CLOEXEC, _FILE_MODE)
        except FileNotFoundError:  # the fan-out folder's first blob: make the folder (rare), again
            self._ensure_folder(self._folder(blob))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | _CLOEXEC, _FILE_MODE)
        try:
            position, written_total = offset, 0
            while written_total < len(view):
                written = os.pwrite(fd, view[written_total:], position)
                if written == 0:
                    # A regular file never accepts zero bytes of a non-empty write; looping would spin.
                    raise OSError(errno.EIO, f"pwrite wrote nothing at offset {position}", path)
                written_total += written
                position += written
        finally:
            os.close(fd)

    def read(self, blob: bytes, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset``: shorter at the end of the file, ``b""`` at or
        after it. A blob with no file raises ``FileNotFoundError``."""
        blob = _check_id(blob)
        offset = _check_count(offset, "offset")
        length = _check_count(length, "length")
        fd = os.open(self._path(blob), os.O_RDONLY | _CLOEXEC)
        try:
            pieces: list[bytes] = []
            position, remaining = offset, length
            while remaining > 0:
                # Read in pieces of at most 1 MiB: pread allocates the size asked for before it
                # learns where the file ends, so a huge length must not become a huge buffer.
                piece = os.pread(fd, min(remaining, _READ_PIECE), position)
                if not piece:
                    break  # end of file
                pieces.append(piece)
                position += len(piece)
                remaining -= len(piece)
        finally:
            os.close(fd)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def sync(self, blob: bytes) -> None:
        """Make what was written so far durable: fsync the file, then its folder. No file: nothing to do."""
        blob = _check_id(blob)
        try:
            _fsync_path(self._path(blob), os.O_RDONLY)
        except FileNotFoundError:
            return  # nothing written yet, so nothing to make durable
        _fsync_folder(self._folder(blob))

    def finish(self, blob: bytes, size: int) -> bytes:
        """fsync the file and its folder, then return the SHA-256 digest (32 bytes) of its first
        ``size`` bytes (of all of it if shorter: the digest then does not match). Blocking: run it
        on a worker thread. A blob with no file raises ``FileNotFoundError``."""
        blob = _check_id(blob)
        size = _check_count(size, "size")
        digest = hashlib.sha256()
        buffer = bytearray(min(size, _READ_PIECE))
        view = memoryview(buffer)
        fd = os.open(self._path(blob), os.O_RDONLY | _CLOEXEC)
        try:
            os.fsync(fd)
            _fsync_folder(self._folder(blob))
            remaining = size
            while remaining > 0:
                # readv fills the one buffer in place (the descriptor is fresh: reading starts at 0).
                count = os.readv(fd, [view[: min(remaining, _READ_PIECE)]])
                if count == 0:
                    break  # shorter than size: hash what is there
                digest.update(view[:count])
                remaining -= count
        finally:
            os.close(fd)
        return digest.digest()

    def delete(self, blob: bytes) -> None:
        """Remove the blob's file; a blob with no file is already deleted."""
        blob = _check_id(blob)
        try:
            os.unlink(self._path(blob))
        except FileNotFoundError:
            return  # deleting twice, or a blob never written: the outcome asked for already holds

    # ------------------------------------------------------------------ the store

    def ids(self) -> Iterator[bytes]:
        """The id of every blob file present, in id order. Anything else in ``root`` (other
        names, misplaced files, folders not named by two lowercase hex digits) is skipped, so a
        sweep that deletes what it yields never touches a file the store did not name."""
        with os.scandir(self._root) as entries:
            folders = sorted(e.name for e in entries if _is_hex(e.name, 2) and e.is_dir(follow_symlinks=False))
        for folder in folders:
            try:
                with os.scandir(self._root / folder) as entries:
                    names = sorted(e.name for e in entries if e.is_file(follow_symlinks=False))
            except FileNotFoundError:
                continue  # removed since the root was listed
            for name in names:
                stem = name[: -len(_SUFFIX)]
                # A file in the wrong folder is not the file delete() would remove: skip it.
                if name.endswith(_SUFFIX) and _is_hex(stem, 2 * BLOB_ID_SIZE) and stem[:2] == folder:
                    yield bytes.fromhex(stem)

    def free_bytes(self) -> int:
        """Bytes available to the gateway on the file system holding ``root``."""
        stats = os.statvfs(self._root)
        return stats.f_bavail * stats.f_frsize

    def free_files(self) -> int:
        """Files (inodes) that can still be made on the file system holding ``root``; a file
        system without a fixed number of them (btrfs reports 0 of 0) has no such bound."""
        stats = os.statvfs(self._root)
        return stats.f_favail if stats.f_files else sys.maxsize
