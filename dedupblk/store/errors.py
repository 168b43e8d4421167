"""The store's error hierarchy.

Every error a store operation raises on purpose is a `StoreError`. Each class carries the errno a
block-device frontend reports for it and the exit code the CLI uses, so each boundary (the nbdkit
adapter, the ublk queue loop, the CLI) translates errors in one place by reading these attributes.
Anything that is not a `StoreError` is a bug and frontends report it as EIO with a traceback.
"""

from __future__ import annotations

import errno
from typing import ClassVar


class StoreError(Exception):
    """Base of every deliberate store failure."""

    errno: ClassVar[int] = errno.EIO
    exit_code: ClassVar[int] = 1


class InvalidRequest(StoreError):
    """A request outside the device, a bad size, or a bad option value."""

    errno = errno.EINVAL
    exit_code = 2


class StoreFull(StoreError):
    """The backend has no free slot for a page that needs one."""

    errno = errno.ENOSPC


class ReadOnlyStore(StoreError):
    """A mutation on a store opened read-only."""

    errno = errno.EROFS


class NotAStore(StoreError):
    """The path is missing, or is not a dedupblk store (a foreign or empty directory)."""

    errno = errno.ENOENT


class StoreExists(StoreError):
    """`create` on a path that already holds a store or other files."""

    errno = errno.EEXIST


class FormatError(StoreError):
    """The store's metadata has an unknown version or cannot be decoded."""

    errno = errno.EIO


class BackendMismatch(StoreError):
    """The backend is missing, too small, or belongs to another store."""

    errno = errno.ENODEV


class StoreLocked(StoreError):
    """Another process holds the store open for writing."""

    errno = errno.EBUSY


class BackendError(StoreError):
    """The backend failed an I/O (the OSError is chained as __cause__)."""

    errno = errno.EIO
