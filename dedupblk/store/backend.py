"""The backend: 4 KiB slots in a data file or a block device (see `dedupblk.store.format`).

Slot data is written with ``pwrite``/``pwritev`` and read with ``pread``; nothing is cached here.
Durability: `Backend.sync` is ``fdatasync``; a write that returned is in the page cache (a file) or
the device (``/dev/zram0``) and survives a kill of this process, not a power loss before `sync`.
A block device, and a preallocated file (`BACKEND_PREALLOCATED`, for swap: written in full at
create, never punched), are read and written with ``O_DIRECT`` through one page-aligned bounce
buffer allocated at open: a slot write then needs no page-cache page and dirties nothing, so a
server that must write swap pages while the machine is out of memory allocates no memory for it
and is never throttled as a dirtier. Its writes are on the device when they return.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence

from ..errors import BackendError, BackendMismatch, StoreFull, SyncFailed
from ..libc import function
from .format import (
    BACKEND_HEADER,
    BACKEND_MAGIC,
    BACKEND_PREALLOCATED,
    BACKEND_VERSION,
    FILE_MODE,
    HEADER_SLOT,
    PAGE_SIZE,
)

BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)
BLKDISCARD = 0x1277  # _IO(0x12, 119)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
IOV_MAX = 1024
# Most pages in one O_DIRECT write to a block device: Linux's BIO_MAX_VECS.  Up to that, a
# synchronous write is one bio on the kernel stack (6.12 block/fops.c, __blkdev_direct_IO_simple);
# past it, the bios after the first come from fs_bio_set, the pool swap-out bios come from too
# (docs/swap.md).
BLOCK_DIO_MAX_PAGES = 256
ZERO_CHUNK = 1 << 20  # bytes of zeros per write when preallocating
log = logging.getLogger(__name__)

SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = function(
    "sync_file_range", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
)
_fallocate = function(
    "fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64
)


def device_size(fd: int) -> int:
    """Size in bytes of an open block device or regular file."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = bytearray(8)
        fcntl.ioctl(fd, BLKGETSIZE64, buf)
        size: int = struct.unpack("<Q", buf)[0]
        return size
    return st.st_size


def runs(slots: Iterable[int]) -> list[tuple[int, int]]:
    """Slot numbers folded into (first, count) runs of consecutive slots, in order."""
    ordered = sorted(set(slots))
    return [(ordered[i], j - i) for i, j in _run_bounds(ordered)]


def _run_bounds(ordered: list[int], most: int = 0) -> Iterator[tuple[int, int]]:
    """(i, j) for each run ``ordered[i:j]`` of consecutive numbers in ``ordered`` (sorted, no
    two the same), each at most ``most`` long (0: any): ``slot - n`` is the same within a run
    and grows from one run to the next, so a bisection finds where each ends."""
    offsets = [slot - n for n, slot in enumerate(ordered)]
    i, count = 0, len(ordered)
    while i < count:
        j = bisect.bisect_right(offsets, offsets[i], i)
        if most and j - i > most:
            j = i + most
        yield i, j
        i = j


class Backend:
    """Slots of one backend file or block device, opened for the life of a store."""

    def __init__(self, path: str, *, readonly: bool) -> None:
        self.path = path
        self.readonly = readonly
        try:
            self.fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        except FileNotFoundError:
            raise BackendMismatch(f"backend {path} is missing") from None
        except OSError as exc:
            raise BackendError(f"cannot open backend {path}: {exc.strerror}") from exc
        self.is_block = stat.S_ISBLK(os.fstat(self.fd).st_mode)
        self.flags = 0  # header flags, known once `check_header` (or `create`) has run
        # O_DIRECT I/O (preallocated backends): an aligned buffer of IOV_MAX slots and its lock.
        self._bounce: mmap.mmap | None = None
        self._bounce_view: memoryview | None = None
        self._bounce_lock = threading.Lock()

    @property
    def punches(self) -> bool:
        """Whether `discard` gives space back: not in a preallocated file (see the format)."""
        return self.is_block or not self.flags & BACKEND_PREALLOCATED

    @classmethod
    def create(
        cls,
        path: str,
        capacity_bytes: int | None,
        uuid: bytes,
        *,
        preallocate: bool = False,
    ) -> Backend:
        """Create (regular file) or adopt (block device, existing file) a backend; write the header.

        A new data file is sparse; its size is fixed here and is the slot capacity. With
        ``preallocate`` a file backend is then written in full with zeros (every hole filled)
        and synced, so that no later slot write allocates a block; the header says so, and the
        file is never punched. A block device needs no preallocation and keeps its discards.
        Whose the backend is was settled before (`dedupblk.store.claims`).
        """
        if not os.path.exists(path):
            if capacity_bytes is None:
                raise BackendMismatch(f"backend {path} does not exist")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
            except OSError as exc:
                raise BackendError(f"cannot create backend {path}: {exc.strerror}") from exc
            try:
                os.ftruncate(fd, capacity_bytes)
            except OSError as exc:
                raise BackendError(f"cannot size backend {path}: {exc.strerror}") from exc
            finally:
                os.close(fd)
        backend = cls(path, readonly=False)
        try:
            if not backend.is_block and capacity_bytes is not None:
                current = device_size(backend.fd)
                if current < capacity_bytes:
                    try:
                        os.ftruncate(backend.fd, capacity_bytes)
                    except OSError as exc:
                        raise BackendError(f"cannot size {path}: {exc.strerror}") from exc
            backend.flags = BACKEND_PREALLOCATED if preallocate else 0
            backend.write_slot(HEADER_SLOT, _header_page(uuid, backend.flags))
            if preallocate and not backend.is_block:
                fill_holes(backend.fd, device_size(backend.fd), backend.path)
        except BaseException:
            backend.close()
            raise
        return backend

    def capacity_slots(self) -> int:
        return device_size(self.fd) // PAGE_SIZE

    def check_header(self, uuid: bytes) -> None:
        """Refuse a backend whose header does not name this store."""
        raw = os.pread(self.fd, BACKEND_HEADER.size, HEADER_SLOT * PAGE_SIZE)
        if len(raw) < BACKEND_HEADER.size:
            raise BackendMismatch(f"backend {self.path} is too small to be this store's")
        magic, version, found, flags = BACKEND_HEADER.unpack(raw)
        if magic != BACKEND_MAGIC:
            raise BackendMismatch(f"backend {self.path} has no dedupblk header")
        if version != BACKEND_VERSION:
            raise BackendMismatch(f"backend {self.path} has unknown format version {version}")
        if found != uuid:
            raise BackendMismatch(f"backend {self.path} belongs to another store")
        self.flags = flags
        if flags & BACKEND_PREALLOCATED or self.is_block:
            # A block device's page cache would be a second copy of a device that may itself be
            # memory (zram), and its writeback needs memory at the worst moment for a swap device.
            self._use_direct_io()

    def _use_direct_io(self) -> None:
        """Switch the open descriptor to O_DIRECT and allocate the bounce buffer. A filesystem
        without O_DIRECT keeps buffered I/O (with a warning): correct, but not swap-safe."""
        if self._bounce is not None:
            return
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError as exc:
            log.warning("backend %s: no O_DIRECT (%s): slot I/O goes through the page cache",
                        self.path, exc.strerror)  # fmt: skip
            return
        # As large as the largest write (runs are cut there): a block device's 256 pages.
        self._bounce = mmap.mmap(
            -1, (BLOCK_DIO_MAX_PAGES if self.is_block else IOV_MAX) * PAGE_SIZE
        )
        self._bounce_view = memoryview(self._bounce)

    @property
    def direct(self) -> bool:
        """Whether slot I/O bypasses the page cache (O_DIRECT through the bounce buffer)."""
        return self._bounce_view is not None

    def read_slot(self, slot: int) -> bytes:
        view = self._bounce_view
        if view is not None:
            with self._bounce_lock:
                try:
                    done = os.preadv(self.fd, [view[:PAGE_SIZE]], slot * PAGE_SIZE)
                except OSError as exc:
                    raise BackendError(f"reading slot {slot}: {exc.strerror}") from exc
                if done != PAGE_SIZE:
                    raise BackendError(f"short read of slot {slot} ({done} bytes)")
                return bytes(view[:PAGE_SIZE])
        try:
            data = os.pread(self.fd, PAGE_SIZE, slot * PAGE_SIZE)
        except OSError as exc:
            raise BackendError(f"reading slot {slot}: {exc.strerror}") from exc
        if len(data) != PAGE_SIZE:
            raise BackendError(f"short read of slot {slot} ({len(data)} bytes)")
        return data

    def write_slot(self, slot: int, data: bytes) -> None:
        self.write_slots([(slot, data)])

    def write_slots(
        self, items: Sequence[tuple[int, bytes]], *, start_writeback: bool = False
    ) -> None:
        """Write (slot, page) pairs, one ``pwritev`` per run of consecutive slots (a run is cut
        at `BLOCK_DIO_MAX_PAGES` on a block device, at `IOV_MAX` otherwise). With
        ``start_writeback``, each run written through the page cache is sent on to the disk at
        once (``sync_file_range``): the sync that must come before the commit then finds it
        done or under way."""
        ordered = sorted(items)
        slots = [slot for slot, _ in ordered]
        for i, j in _run_bounds(slots, BLOCK_DIO_MAX_PAGES if self.is_block else IOV_MAX):
            first = slots[i]
            self._write_run([data for _, data in ordered[i:j]], first)
            if start_writeback and self._bounce_view is None:
                _sync_file_range(
                    self.fd, first * PAGE_SIZE, (j - i) * PAGE_SIZE, SYNC_FILE_RANGE_WRITE
                )  # a hint: its failure leaves the sync to do all the work

    def _write_run(self, pages: list[bytes], first: int) -> None:
        """Write consecutive slots; a short write (a filesystem filling up) is continued, so that
        the call that cannot go on reports why (ENOSPC: `StoreFull`)."""
        done = 0
        total = PAGE_SIZE * len(pages)
        while done < total:
            rest: list[bytes | memoryview]
            if done:
                skip, part = divmod(done, PAGE_SIZE)
                rest = [memoryview(pages[skip])[part:], *pages[skip + 1 :]]
            else:
                rest = list(pages)
            try:
                if self._bounce_view is not None:
                    wrote = self._write_direct(rest, first * PAGE_SIZE + done)
                else:
                    wrote = os.pwritev(self.fd, rest, first * PAGE_SIZE + done)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StoreFull(f"backend {self.path} is full: {exc.strerror}") from exc
                raise BackendError(f"writing slot {first}: {exc.strerror}") from exc
            if wrote <= 0:
                raise BackendError(f"writing slot {first}: the backend took no more bytes")
            done += wrote

    def _write_direct(self, pieces: list[bytes | memoryview], offset: int) -> int:
        """One O_DIRECT write of consecutive slots (at most IOV_MAX) through the bounce buffer."""
        view = self._bounce_view
        assert view is not None
        with self._bounce_lock:
            at = 0
            for piece in pieces:
                view[at : at + len(piece)] = piece
                at += len(piece)
            return os.pwrite(self.fd, view[:at], offset)

    def discard(self, slots: Iterable[int]) -> None:
        """Give the space of dead slots back: punch holes in a file, BLKDISCARD on a device.
        Nothing in a preallocated file: reusing a punched slot would allocate a block again.

        Best effort: a backend that cannot discard keeps the space, and nothing is lost.
        """
        if not self.punches:
            return
        for first, count in runs(slots):
            offset, length = first * PAGE_SIZE, count * PAGE_SIZE
            if self.is_block:
                try:
                    fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("<QQ", offset, length))
                except OSError as exc:
                    if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                        return
                    raise BackendError(f"discarding slots at {first}: {exc.strerror}") from exc
            else:
                mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                if _fallocate(self.fd, mode, offset, length) != 0:
                    err = ctypes.get_errno()
                    if err == errno.EOPNOTSUPP:
                        return
                    raise BackendError(f"punching slots at {first}: {os.strerror(err)}")

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise SyncFailed(f"syncing backend {self.path}: {exc.strerror}") from exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._bounce is not None:
            assert self._bounce_view is not None
            self._bounce_view.release()
            self._bounce.close()
            self._bounce = self._bounce_view = None


def _header_page(uuid: bytes, flags: int) -> bytes:
    header = BACKEND_HEADER.pack(BACKEND_MAGIC, BACKEND_VERSION, uuid, flags)
    return header + bytes(PAGE_SIZE - len(header))


def fill_holes(fd: int, end: int, what: str) -> None:
    """Write zeros into every hole of the open regular file ``fd`` below ``end`` (extending the
    file to ``end`` if it is shorter), then ``fdatasync``: afterwards every block below ``end``
    is allocated and written, so overwriting it needs no block allocation and no extent
    conversion. Data already in the file is kept. Raises `StoreFull` when the filesystem is
    full, `BackendError` on any other failure."""
    zeros = bytes(ZERO_CHUNK)
    try:
        if os.fstat(fd).st_size < end:
            os.ftruncate(fd, end)
        offset = 0
        while offset < end:
            hole = os.lseek(fd, offset, os.SEEK_HOLE)  # the file's size when there is none
            if hole >= end:
                break
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data after the hole
                    raise
                data = end
            stop = min(data, end)
            while hole < stop:
                hole += os.pwrite(fd, zeros[: min(ZERO_CHUNK, stop - hole)], hole)
            offset = stop
        if os.fstat(fd).st_blocks * 512 < end:
            # A filesystem that reports no holes yet has fewer blocks than bytes (ramfs: pages
            # are allocated on first write): write every chunk back as it reads.
            for offset in range(0, end, ZERO_CHUNK):
                chunk = os.pread(fd, min(ZERO_CHUNK, end - offset), offset)
                os.pwrite(fd, chunk, offset)
        os.fdatasync(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFull(f"no space to preallocate {what}: {exc.strerror}") from exc
        raise BackendError(f"preallocating {what}: {exc.strerror}") from exc


def sync_file(path: str) -> None:
    """fsync a file or a directory (so that the entries made in it survive a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
