"""The ``STORE/lock`` flock: one writer at a time, or any number of read-only openers."""

from __future__ import annotations

import fcntl
import os

from ..errors import StoreError, StoreLocked
from .format import LOCK_FILE


class StoreLock:
    """The ``STORE/lock`` flock: exclusive for a writer, shared for read-only servers."""

    def __init__(self, store_dir: str, *, exclusive: bool) -> None:
        lock_path = os.path.join(store_dir, LOCK_FILE)
        try:
            self.fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open {lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 512, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise StoreLocked(f"{store_dir} is in use by another process ({holder})") from None
        if exclusive:
            try:
                with open("/proc/self/cmdline", "rb") as proc:
                    cmdline = proc.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmdline = ""
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()}: {cmdline.strip()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
