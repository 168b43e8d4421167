"""The store's lock: one writer at a time, or any number of read-only openers.

The ``flock`` is taken on the store directory itself, not on a file in it: a file can be unlinked
and made anew while its lock is held, which would let a second writer in; a directory holding a
store cannot be removed, and one renamed away takes its lock with it. ``STORE/lock`` only names
the holder (pid and command line) so that a refused opener can say who it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from ..errors import StoreError, StoreLocked
from .format import FILE_MODE, LOCK_FILE


class StoreLock:
    """The lock on ``store_dir``: exclusive for a writer, shared for read-only openers."""

    def __init__(self, store_dir: str, *, exclusive: bool) -> None:
        self.fd = -1
        try:
            fd = os.open(store_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"cannot open {store_dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(
                f"{store_dir} is in use by another process ({_holder(store_dir)})"
            ) from None
        if os.stat(store_dir).st_ino != os.fstat(fd).st_ino:  # replaced while we locked it
            os.close(fd)
            raise StoreLocked(f"{store_dir} was replaced while it was being opened")
        self.fd = fd
        if exclusive:
            _name_holder(store_dir)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _lock_file(store_dir: str, flags: int) -> int:
    # O_NOFOLLOW: never write through a symlink planted where the lock file should be.
    return os.open(
        os.path.join(store_dir, LOCK_FILE), flags | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE
    )


def _holder(store_dir: str) -> str:
    try:
        fd = _lock_file(store_dir, os.O_RDONLY)
    except OSError:
        return "unknown"
    try:
        return os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)


def _name_holder(store_dir: str) -> None:
    try:
        with open("/proc/self/cmdline", "rb") as proc:
            cmdline = proc.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmdline = ""
    with contextlib.suppress(OSError):  # only a courtesy to the next opener
        fd = _lock_file(store_dir, os.O_WRONLY | os.O_CREAT)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {cmdline}\n".encode(), 0)
        finally:
            os.close(fd)
