"""The project's one error root: every deliberate failure is a `DedupblkError`.

Each class carries the errno a block-device frontend reports for it and the exit code the CLI
uses; an instance may carry a more precise errno (a refused kernel command's). Each boundary
translates in one place by reading these attributes: the CLI (one line on stderr, the exit
code), the nbdkit adapter (``nbdkit.set_error``) and the ublk queue (a negative result).
Anything that is not a `DedupblkError` is a bug: frontends answer EIO and log its traceback.
"""

from __future__ import annotations

import errno as errnos
from typing import ClassVar


class DedupblkError(Exception):
    """Base of every deliberate failure."""

    errno: int = errnos.EIO
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class InvalidRequest(DedupblkError):
    """A request outside the device, a bad size, or a bad option value."""

    errno = errnos.EINVAL
    exit_code = 2


class StoreError(DedupblkError):
    """A store could not do what was asked (the store's own failures derive from it)."""


class StoreFull(StoreError):
    """The backend has no free slot for a page that needs one."""

    errno = errnos.ENOSPC


class ReadOnlyStore(StoreError):
    """A mutation on a store opened read-only."""

    errno = errnos.EROFS


class NotAStore(StoreError):
    """The path is missing, or is not a dedupblk store (a foreign or empty directory)."""

    errno = errnos.ENOENT


class StoreExists(StoreError):
    """`create` on a path that already holds a store or other files."""

    errno = errnos.EEXIST


class FormatError(StoreError):
    """The store's metadata has an unknown version or cannot be decoded."""


class BackendMismatch(StoreError):
    """The backend is missing, too small, or belongs to another store."""

    errno = errnos.ENODEV


class StoreLocked(StoreError):
    """Another process holds the store open for writing."""

    errno = errnos.EBUSY


class BackendError(StoreError):
    """The backend failed an I/O (the OSError is chained as __cause__)."""


class SyncFailed(BackendError):
    """Making data durable failed (fdatasync, msync): what reached the disk is unknown, so the
    store refuses writes until it is reopened."""


class DataLost(StoreError):
    """A page whose data was found damaged (``check --repair``): it reads as a medium error
    until it is written or trimmed."""


class UblkError(DedupblkError):
    """The ublk side failed: no driver, a control command refused, a queue that could not
    start. A refused command carries the kernel's errno."""

    errno = errnos.ENODEV


class NbdError(DedupblkError):
    """The NBD server could not start: nbdkit missing, or its socket held by another server."""


class MetricsError(DedupblkError):
    """The metrics endpoint could not be served: its address is taken or not this host's."""

    errno = errnos.EADDRINUSE


class ServedError(DedupblkError):
    """`dedupblk list` / `stop` could not do what was asked: the registry of served stores is
    not a private directory, no server serves the store, or its server did not stop in time."""
