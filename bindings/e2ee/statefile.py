"""The state file on disk (docs/e2ee.md §6): ``atomic_write`` replaces it whole, ``StateLock``
keeps it to one user at a time.

``atomic_write`` writes a new temporary file beside the target (mode 0600, ``O_EXCL |
O_NOFOLLOW``: never through a symlink or into a file someone else prepared), fsyncs it, renames
it over the target and fsyncs the folder; a crash leaves the old file or the new one. Pure file
I/O: no asyncio, no network.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
from pathlib import Path

from interlink.e2ee.errors import StateLocked


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    # a new file only: never through a symlink or into a file someone else prepared
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateLock:
    """An exclusive ``fcntl.flock`` on ``<state file>.lock``, held while a client uses the state
    file: a second opener (another process, or this one) gets ``StateLocked`` instead of reusing
    keys, chain iterations and nonces the first one also uses."""

    def __init__(self, state_path: str | os.PathLike) -> None:
        path = Path(state_path)
        self.path = path.with_name(path.name + ".lock")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateLocked(f"{path} is in use by another client (lock {self.path} held)") from None
            raise
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        """True until ``release()``."""
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
