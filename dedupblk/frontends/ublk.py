"""The ublk frontend: serve a store as a kernel block device, ``/dev/ublkbN``.

ublk (Linux >= 6.0, module ``ublk_drv``) hands every request of a block device to a userspace
server over io_uring: the server keeps one ``UBLK_IO_FETCH_REQ`` command outstanding per tag
(request slot) of each hardware queue; when the block layer dispatches a request, that command
completes, the request is described in a shared descriptor array, and the server answers with
``UBLK_IO_COMMIT_AND_FETCH_REQ`` (result in, next request out).  Control commands (add, set
parameters, start, stop, delete, recovery) go to ``/dev/ublk-control`` as URING_CMDs too.

Life cycle of `serve`
---------------------
1. Harden the process (see "Swap safety"), open the store (exclusive writer lock) and refuse
   unsafe placements (`check_placement`).
2. ``ADD_DEV`` (``UBLK_F_USER_RECOVERY`` and ``_REISSUE``) then ``SET_PARAMS``: the store's size,
   4 KiB logical and physical blocks, a volatile write cache with FUA, discard and write-zeroes at
   4 KiB granularity.  With ``--recover N`` instead: check that device N has the store's size, then
   ``START_USER_RECOVERY`` (retried while the dead server's char device is still held).
3. Open ``/dev/ublkcN``; one thread per queue (`QueueRunner`) makes its own ring, maps its
   descriptor array and its per-tag buffers and submits a FETCH for every tag.
4. Once every queue thread has fetched every tag, a separate thread sends ``START_DEV`` (or
   ``END_USER_RECOVERY``): the kernel reads the partition table during it, so the queue threads
   must already be serving.  With ``--swap``: ``mkswap`` and ``swapon`` on it.  Then the block
   device's path is printed alone on a line of stdout.
5. The main thread waits in ``sigwait`` (every server thread blocks the signals it waits for).
   SIGTERM, SIGINT or SIGHUP: ``swapoff`` if the device is in /proc/swaps, ``fsync`` of the block
   device (dirty page cache is written while it can still be served), ``STOP_DEV`` while the queue
   threads keep serving; their parked commands then complete with -ENODEV and they exit; the char
   device is closed, ``DEL_DEV``, the store is flushed and closed.  Exit code 0.

Each queue pass (`QueueRunner`): one ``io_uring_enter`` submits every commit of the previous pass
and waits; then ALL ready completions are applied to the store, and requests that arrived
meanwhile join the pass (a non-blocking ``io_uring_enter`` collects them: one commit then covers
more requests, which is where a Python server's time goes); ``store.commit()`` runs once if
anything changed, ``store.flush()`` once if a FLUSH or a FUA write was among them, and only then
are the results queued for the kernel.  So when the kernel completes a write, the write is in
LMDB (it survives a crash of this server; a FLUSH or FUA makes it survive a crash of the
machine).  A fetched request is never left without an answer: every failure becomes a negative
errno in its commit, translated in one place, `errno_result`.  The store is opened without group
commit: no background thread commits on a timer, so none competes with the queue threads for the
GIL (measured: its wake-ups cost a fifth of a queue thread's time under TCG).

Crash and recovery
------------------
Devices are created with ``UBLK_F_USER_RECOVERY`` (a dead server's device is quiesced, not removed:
I/O waits) and ``UBLK_F_USER_RECOVERY_REISSUE`` (requests the dead server had taken are sent again
to the next one; block writes are idempotent, so replaying one is harmless).  ``serve --recover N``
resumes the device with a new server; `cleanup_devices` deletes devices whose server is gone.

Swap safety
-----------
A server that swaps or waits for memory reclaim on its own device deadlocks, so: ``mlockall
(MCL_CURRENT | MCL_FUTURE)``; ``prctl(PR_SET_IO_FLUSHER, 1)`` first in the main thread, before any
thread exists (the flag is inherited by new threads, including the store's committer, and by
``swapon``/``swapoff``), and again in every server thread; ``oom_score_adj`` -1000; malloc
told to keep what it gets (``mallopt``: no trimming, no per-block mmap, 16 MiB growth steps), so
freed request buffers are reused rather than faulted in again; one buffer per tag mapped at start
(the I/O path allocates only bounded, short-lived objects: one request's bytes, and the store's
4 MiB cache of slot contents); and with ``--swap`` a refusal when the store's files are on tmpfs
(which can swap to this very device) or on a ublk device.  A store on the device being served
is refused in any mode.

Swap placement
--------------
All of the above keeps *this process* out of reclaim I/O, not the kernel's work on the files
that hold the store.  With the whole machine out of memory, kswapd and every allocating task
wait on swap writes to this device, so nothing the server waits for may itself wait for memory:

- Metadata.  LMDB changes its pages in a shared writable map (``MDB_WRITEMAP``); on a disk
  filesystem those are dirty page-cache pages, and a task that dirties pages past the dirty
  limit (a fraction of the *reclaimable* memory, which is nearly nothing here) sleeps in
  ``balance_dirty_pages`` until the flusher writes them back, while the flusher's own
  allocations wait on reclaim, which waits on this device.  Measured in the guest (group
  ``swap-disk-meta`` of tests/vm/guest/ublk_checks.py, whole-machine hog): in two runs of three
  the queue thread sat in ``balance_dirty_pages`` for a minute or more, swap-outs crawling (and
  without writemap, commits ``pwrite`` into the same page cache: that hung 2 runs of 2).  So a
  swap store's directory goes on **ramfs**: no writeback at all (the filesystem has none), never
  swapped out, and it survives a crash of the server (not a reboot, which swap does not
  survive either).  tmpfs is refused: its pages can be swapped out to this very device.
- Slots.  On a **block device** (a partition, an LV, zram; not a loop device, whose I/O is its
  file's).  Slot I/O is ``O_DIRECT``, and a synchronous ``O_DIRECT`` write to a block device of up
  to 256 pages (``BIO_MAX_VECS``, where the backend cuts its writes) is one bio on the kernel
  stack, its vector kmalloc'd past 4 pages (Linux 6.12, block/fops.c): nothing from a pool the
  swap-outs use.  A file on a disk filesystem is the other way round: iomap's direct I/O (ext4,
  xfs) allocates every bio from ``fs_bio_set`` (``bio_alloc``), the very pool each swap-out bio
  comes from (mm/page_io.c, ``bio_alloc(..., GFP_NOIO)``).  Under memory pressure those swap-outs
  fall back on the pool's reserve of two, and they are held by requests queued on this device; a
  slot write then waits in ``mempool_alloc`` until a bio of that pool is freed, while most of them
  are swap-outs waiting for this very server: the suspected cause of the hangs below.  A file that
  must do anyway is created ``--preallocate`` (every block written at create, never punched: no
  block allocation, no unwritten extent to convert) on a filesystem mounted ``lazytime`` (no
  timestamp through the journal).  `check_placement` warns about a slot file on a disk filesystem
  and about a loop device.
- Writeback throttling.  ``--swap`` turns blk-wbt off on the device (see
  `_disable_writeback_throttling`): in a hang with it on, kswapd and the hog were found
  waiting in ``wbt_wait`` on swap-outs to this device.

Known limit: a userspace server still cannot draw on the kernel's emergency reserves
(``PF_MEMALLOC``).  Measured with the whole guest out of memory (tests/vm/guest/ublk_checks.py: a
768 MiB guest, a hog of 1.5 x MemAvailable, no cgroup): with the slots on a block device (group
``swap``, the test CI runs) 24 runs of 24 passed on 2026-11-28; with the slots in a preallocated
file (group ``swap-file-slots``) 56 of 59 passed on 2026-11-27/28.  Each of those hangs came within
20 s of the hog starting.  In one, the queue thread sat in ``mempool_alloc`` for two minutes with
swap-outs frozen; in the others no task of the guest printed anything (no heartbeat, no hung-task
report).  That the pool is ``fs_bio_set`` is read from the kernel's code (see Slots above), not
caught in a stack, and 24 clean runs do not prove the block-device placement never hangs: at the
slot file's rate they would come one time in 3.5 by chance.  A guest that outlives its timeout now
gets SysRq dumps of its blocked tasks and CPUs (tests/vm/harness.py).

Layouts below were checked against Linux 6.12's include/uapi/linux/ublk_cmd.h; each record is a
small dataclass with its ``struct`` format beside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import logging
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Final, Protocol, Self

from dedupblk.errors import DedupblkError, InvalidRequest, UblkError
from dedupblk.frontends.io_uring import (
    SETUP_COOP_TASKRUN,
    SETUP_DEFER_TASKRUN,
    SETUP_SINGLE_ISSUER,
    SETUP_SQE128,
    Completion,
    IoUring,
    Mapping,
)
from dedupblk.store import PAGE_SIZE, Store, open_store

log = logging.getLogger(__name__)

CONTROL_PATH: Final = "/dev/ublk-control"
SECTOR_SHIFT: Final = 9
PAGE_SHIFT: Final = 12
assert 1 << PAGE_SHIFT == PAGE_SIZE

MAX_QUEUE_DEPTH: Final = 4096  # UBLK_MAX_QUEUE_DEPTH
# Per-tag buffer: the largest request the kernel may send.  Every tag of every queue has one, all
# locked in memory, so deep queues get smaller ones (see `io_buffer_bytes`).
MAX_IO_BUF_BYTES: Final = 512 * 1024
MIN_IO_BUF_BYTES: Final = 64 * 1024
QUEUE_BUFFER_BUDGET: Final = 64 * 1024 * 1024
# Largest DISCARD / WRITE_ZEROES: one request holds the store's lock for its whole range.
MAX_DISCARD_BYTES: Final = 64 * 1024 * 1024
# How long to wait for a dead server's device to become recoverable, or for a char device
# that udev (or the previous server) still holds.
RECOVERY_WAIT_SECONDS: Final = 30.0
OPEN_WAIT_SECONDS: Final = 10.0
RETRY_INTERVAL_SECONDS: Final = 0.1

# The signals the main thread waits for.  SIGUSR1 is internal: a helper thread (queue runner or
# starter) changed state and the main thread should look.
STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
WAKE_SIGNAL: Final = signal.SIGUSR1
WAITED_SIGNALS: Final = STOP_SIGNALS | {WAKE_SIGNAL}

# prctl / mlockall / statfs constants (linux/prctl.h, sys/mman.h, linux/magic.h).
PR_SET_IO_FLUSHER: Final = 57
# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD: Final = -1
M_TOP_PAD: Final = -2
M_MMAP_MAX: Final = -4
MALLOC_TOP_PAD_BYTES: Final = 16 << 20
MCL_CURRENT: Final = 1
MCL_FUTURE: Final = 2
TMPFS_MAGIC: Final = 0x01021994
RAMFS_MAGIC: Final = 0x858458F6
# Set to a directory to profile every queue thread's serving loop (cProfile, one dump per queue).
PROFILE_ENV: Final = "DEDUPBLK_UBLK_PROFILE"


class CtrlOp(enum.IntEnum):
    """Control command codes (ioctl-encoded: ``_IOR/_IOWR('u', nr, struct ublksrv_ctrl_cmd)``)."""

    GET_DEV_INFO = 0x80207502
    ADD_DEV = 0xC0207504
    DEL_DEV = 0xC0207505
    START_DEV = 0xC0207506
    STOP_DEV = 0xC0207507
    SET_PARAMS = 0xC0207508
    GET_PARAMS = 0x80207509
    START_USER_RECOVERY = 0xC0207510
    END_USER_RECOVERY = 0xC0207511
    GET_FEATURES = 0x80207513


class IoOp(enum.IntEnum):
    """I/O command codes (``_IOWR('u', nr, struct ublksrv_io_cmd)``)."""

    FETCH_REQ = 0xC0107520
    COMMIT_AND_FETCH_REQ = 0xC0107521


class Feature(enum.IntFlag):
    """``UBLK_F_*`` device flags (the ones this server asks for or reports)."""

    URING_CMD_COMP_IN_TASK = 1 << 1
    NEED_GET_DATA = 1 << 2
    USER_RECOVERY = 1 << 3
    USER_RECOVERY_REISSUE = 1 << 4
    UNPRIVILEGED_DEV = 1 << 5
    CMD_IOCTL_ENCODE = 1 << 6
    USER_COPY = 1 << 7


class DevState(enum.IntEnum):
    """``UBLK_S_DEV_*``."""

    DEAD = 0
    LIVE = 1
    QUIESCED = 2
    FAIL_IO = 3  # 6.13+


# ublksrv_io_desc op codes (low 8 bits of op_flags) and flags.
UBLK_IO_OP_READ: Final = 0
UBLK_IO_OP_WRITE: Final = 1
UBLK_IO_OP_FLUSH: Final = 2
UBLK_IO_OP_DISCARD: Final = 3
UBLK_IO_OP_WRITE_ZEROES: Final = 5
UBLK_IO_F_FUA: Final = 1 << 13
UBLK_IO_RES_OK: Final = 0
UBLK_IO_RES_ABORT: Final = -errno.ENODEV

# ublk_param_basic.attrs and ublk_params.types.
UBLK_ATTR_VOLATILE_CACHE: Final = 1 << 2
UBLK_ATTR_FUA: Final = 1 << 3
UBLK_PARAM_TYPE_BASIC: Final = 1 << 0
UBLK_PARAM_TYPE_DISCARD: Final = 1 << 1

# The descriptor array of queue q is mapped from /dev/ublkcN at q * the size of the largest one.
UBLKSRV_CMD_BUF_OFFSET: Final = 0


def _round_up(value: int, unit: int) -> int:
    return (value + unit - 1) // unit * unit


MAX_DESC_ARRAY_BYTES: Final = _round_up(MAX_QUEUE_DEPTH * 24, PAGE_SIZE)


# -- layouts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CtrlCmd:
    """``struct ublksrv_ctrl_cmd`` (32 bytes), the payload of a control URING_CMD at SQE byte 48.

    ``addr``/``length`` name a buffer the command reads or fills; ``data`` is the one inline
    argument (the server pid for START_DEV and END_USER_RECOVERY).
    """

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<IHHQQHHI")

    dev_id: int
    queue_id: int = 0xFFFF
    length: int = 0
    addr: int = 0
    data: int = 0

    def pack(self) -> bytes:
        return self.FORMAT.pack(
            self.dev_id, self.queue_id, self.length, self.addr, self.data, 0, 0, 0
        )


@dataclass(frozen=True)
class DevInfo:
    """``struct ublksrv_ctrl_dev_info`` (64 bytes): ADD_DEV's argument and GET_DEV_INFO's answer."""

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<HHHHIIiIQQIIQQ")

    nr_hw_queues: int
    queue_depth: int
    state: int
    max_io_buf_bytes: int
    dev_id: int
    ublksrv_pid: int
    flags: int
    owner_uid: int = 0
    owner_gid: int = 0

    def pack(self) -> bytes:
        return self.FORMAT.pack(
            self.nr_hw_queues, self.queue_depth, self.state, 0, self.max_io_buf_bytes,
            self.dev_id, self.ublksrv_pid, 0, self.flags, 0, self.owner_uid, self.owner_gid, 0, 0,
        )  # fmt: skip

    @classmethod
    def unpack(cls, raw: bytes) -> DevInfo:
        (queues, depth, state, _pad0, buf, dev_id, pid, _pad1, flags, _srv_flags, uid, gid,
         _r1, _r2) = cls.FORMAT.unpack_from(raw)  # fmt: skip
        return cls(queues, depth, state, buf, dev_id, pid, flags, uid, gid)


@dataclass(frozen=True)
class Params:
    """``struct ublk_params`` (112 bytes on 6.12) with the basic and discard parts used here.

    Layout: len@0 types@4; basic@8 (attrs u32, logical_bs_shift u8, physical_bs_shift u8,
    io_opt_shift u8, io_min_shift u8, max_sectors u32, chunk_sectors u32, dev_sectors u64,
    virt_boundary_mask u64); discard@40 (discard_alignment, discard_granularity,
    max_discard_sectors, max_write_zeroes_sectors u32, max_discard_segments u16, reserved u16);
    devt@60 (char major/minor, disk major/minor u32; read-only); zoned@76 (3 u32 + 20 reserved);
    4 bytes of tail padding.
    """

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<II IBBBBIIQQ IIIIHH IIII III20x 4x")

    types: int
    attrs: int = 0
    logical_bs_shift: int = PAGE_SHIFT
    physical_bs_shift: int = PAGE_SHIFT
    io_opt_shift: int = PAGE_SHIFT
    io_min_shift: int = PAGE_SHIFT
    max_sectors: int = 0
    dev_sectors: int = 0
    discard_granularity: int = 0
    max_discard_sectors: int = 0
    max_write_zeroes_sectors: int = 0
    max_discard_segments: int = 0
    disk_major: int = 0
    disk_minor: int = 0

    def pack(self) -> bytes:
        return self.FORMAT.pack(
            self.FORMAT.size, self.types,
            self.attrs, self.logical_bs_shift, self.physical_bs_shift, self.io_opt_shift,
            self.io_min_shift, self.max_sectors, 0, self.dev_sectors, 0,
            0, self.discard_granularity, self.max_discard_sectors, self.max_write_zeroes_sectors,
            self.max_discard_segments, 0,
            0, 0, self.disk_major, self.disk_minor,
            0, 0, 0,
        )  # fmt: skip

    @classmethod
    def unpack(cls, raw: bytes) -> Params:
        (_len, types, attrs, lbs, pbs, opt, io_min, max_sectors, _chunk, dev_sectors, _vbm,
         _align, granularity, max_discard, max_wz, segments, _res,
         _cmaj, _cmin, dmaj, dmin, _z1, _z2, _z3) = cls.FORMAT.unpack_from(raw)  # fmt: skip
        return cls(types, attrs, lbs, pbs, opt, io_min, max_sectors, dev_sectors, granularity,
                   max_discard, max_wz, segments, dmaj, dmin)  # fmt: skip


# ``struct ublksrv_io_desc`` (24 bytes), read-only, tag t at t * 24 of the queue's array:
# op_flags u32 (op in the low 8 bits, UBLK_IO_F_* above), nr_sectors u32, start_sector u64
# (always 512-byte sectors), addr u64 (the buffer we gave for this tag).
IO_DESC: Final = struct.Struct("<IIQQ")
# ``struct ublksrv_io_cmd`` (16 bytes), an I/O URING_CMD's payload: q_id u16, tag u16,
# result s32 (bytes done or -errno; ignored by FETCH), addr u64 (this tag's buffer).
IO_CMD: Final = struct.Struct("<HHiQ")

assert CtrlCmd.FORMAT.size == 32
assert DevInfo.FORMAT.size == 64
assert Params.FORMAT.size == 112
assert IO_DESC.size == 24
assert IO_CMD.size == 16


# -- errors -------------------------------------------------------------------------------------


def errno_result(exc: BaseException, request: str) -> int:
    """The one place a failed request becomes its ublk result: a negative errno.

    A `DedupblkError` carries its errno.  Anything else is a bug: EIO, with the traceback logged.
    """
    if isinstance(exc, DedupblkError):
        log.warning("%s failed: %s", request, exc)
        return -(exc.errno or errno.EIO)
    log.error("%s failed unexpectedly", request, exc_info=exc)
    return -errno.EIO


def _command_error(op: CtrlOp, dev_id: int, res: int) -> UblkError:
    return UblkError(f"ublk {op.name} for device {dev_id}: {os.strerror(-res)}", errno=-res)


# -- libc helpers -------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_mlockall = _libc.mlockall
_mlockall.restype = ctypes.c_int
_mlockall.argtypes = [ctypes.c_int]
_mallopt = _libc.mallopt
_mallopt.restype = ctypes.c_int
_mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
_statfs = _libc.statfs
_statfs.restype = ctypes.c_int
_statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]


def _os_error(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def set_io_flusher() -> None:
    """Mark the calling thread as part of the I/O path: its allocations never wait for I/O
    (PF_MEMALLOC_NOIO), so reclaim cannot make it wait for its own device.  Argument 1 sets it."""
    if _prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        raise _os_error("prctl(PR_SET_IO_FLUSHER, 1)")


def filesystem_type(path: str) -> int:
    """statfs(2) f_type of the filesystem holding ``path``."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64
    if _statfs(os.fsencode(path), buf) != 0:
        raise _os_error(f"statfs {path}")
    return int(struct.unpack_from("<q", buf, 0)[0])  # f_type: the first __fsword_t


def _disk_names(major: int, minor: int) -> set[str]:
    """The block device major:minor, its whole disk if it is a partition, and every device it is
    stacked on (``slaves``), by kernel name."""
    names: set[str] = set()
    todo = [os.path.realpath(f"/sys/dev/block/{major}:{minor}")]
    while todo:
        node = todo.pop()
        if not os.path.isdir(node) or os.path.basename(node) in names:
            continue
        names.add(os.path.basename(node))
        if os.path.exists(os.path.join(node, "partition")):
            todo.append(os.path.dirname(node))
        slaves = os.path.join(node, "slaves")
        if os.path.isdir(slaves):
            todo.extend(os.path.realpath(os.path.join(slaves, s)) for s in os.listdir(slaves))
    return names


def ublk_disks_under(path: str) -> set[str]:
    """Names of the ublk disks (``ublkbN``) that ``path`` lives on: the device itself for a block
    device, otherwise the device holding its filesystem (and what that is stacked on)."""
    st = os.stat(path)
    device = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
    if os.major(device) == 0:  # a virtual filesystem (tmpfs, 9p, btrfs subvolume ids...)
        return set()
    return {n for n in _disk_names(os.major(device), os.minor(device)) if n.startswith("ublkb")}


def check_placement(store: Store, *, swap: bool, serving_dev_id: int | None) -> None:
    """Refuse to serve a store whose files could need the device being served to be read.

    - Never on the ublk device being served (``--recover N`` of the device the store is on).
    - With swap: never on tmpfs (its pages can be swapped out to this device) and never on any
      ublk device (a stacked server could itself be waiting for this one).
    - With swap, warnings (not refusals) for a placement that can stall under memory pressure:
      see "Swap placement" in the module docstring.
    """
    for path in sorted({store.path, store.backend_path}):
        is_device = stat.S_ISBLK(os.stat(path).st_mode)
        if swap and not is_device and filesystem_type(path) == TMPFS_MAGIC:
            raise InvalidRequest(
                f"{path} is on tmpfs, which can be swapped out to the swap device it backs: "
                "put a swap store's directory on ramfs and its slots on a block device (or in a "
                "preallocated file on a disk)"
            )
        disks = ublk_disks_under(path)
        if serving_dev_id is not None and f"ublkb{serving_dev_id}" in disks:
            raise InvalidRequest(f"{path} lives on /dev/ublkb{serving_dev_id}, the device served")
        if swap and disks:
            raise InvalidRequest(
                f"{path} lives on ublk device(s) {', '.join(sorted(disks))}: a swap store must "
                "not depend on another userspace server"
            )
    if swap:
        _warn_swap_placement(store)


def _warn_swap_placement(store: Store) -> None:
    """Log what in a swap store's placement can wait on memory (see "Swap placement")."""
    if filesystem_type(store.path) != RAMFS_MAGIC:
        log.warning(
            "%s (the store's metadata) is not on ramfs: under memory pressure, writing back its "
            'dirty pages can stall this swap device (see README, "Running as swap")',
            store.path,
        )
        if not _mounted_with(store.path, "lazytime"):
            log.warning("%s is not mounted lazytime: every timestamp update of the store's "
                        "metadata goes through its journal", store.path)  # fmt: skip
    slots = store.backend_path
    backing = _loop_backing_file(slots)
    if backing is not None:
        log.warning("%s (the slots) is a loop device over %s: its I/O goes through that file, "
                    "as a slot file's does (see README, \"Running as swap\")",
                    slots, backing)  # fmt: skip
    if not stat.S_ISBLK(os.stat(slots).st_mode) and filesystem_type(slots) != RAMFS_MAGIC:
        log.warning("%s (the slots) is a file on a disk filesystem: its O_DIRECT I/O takes its "
                    "bios from the pool the kernel's swap-outs take theirs from, which can run "
                    "dry with swap-outs queued on this device; put the slots on a block device "
                    "(a partition, an LV, zram)", slots)  # fmt: skip
        if not store.backend_preallocated:
            log.warning("%s (the slots) was not created with --preallocate: a slot write "
                        "can need a new file block under memory pressure", slots)  # fmt: skip
        if not _mounted_with(slots, "lazytime"):
            log.warning("%s is not mounted lazytime: a slot write's timestamp update goes "
                        "through its journal", slots)  # fmt: skip


def _loop_backing_file(path: str) -> str | None:
    """The file behind ``path`` if it is a loop device, else None."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        return None
    sysfs = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/loop/backing_file"
    try:
        with open(sysfs) as backing:
            return backing.read().strip()
    except OSError:
        return None


def _mounted_with(path: str, option: str) -> bool:
    """Whether the mount holding ``path`` (the longest mount point above it) has ``option``
    among its mount or super options (mountinfo fields 6 and after the " - " separator)."""
    real, best, options = os.path.realpath(path), "", ""
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            line = line.rstrip("\n")  # noqa: PLW2901
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            under = real == point or real.startswith(point.rstrip("/") + "/")
            if under and len(point) >= len(best):
                best, options = point, f"{fields[5]},{line.split(' - ', 1)[-1]}"
    return option in options.replace(" ", ",").split(",")


def io_buffer_bytes(depth: int) -> int:
    """Per-tag buffer size for a queue of ``depth`` tags: at most `MAX_IO_BUF_BYTES`, and
    `QUEUE_BUFFER_BUDGET` per queue unless that would go below `MIN_IO_BUF_BYTES`."""
    fair = QUEUE_BUFFER_BUDGET // depth // PAGE_SIZE * PAGE_SIZE
    return max(MIN_IO_BUF_BYTES, min(MAX_IO_BUF_BYTES, fair))


def block_device_path(dev_id: int) -> str:
    return f"/dev/ublkb{dev_id}"


def char_device_path(dev_id: int) -> str:
    return f"/dev/ublkc{dev_id}"


# -- control ------------------------------------------------------------------------------------


class Control:
    """``/dev/ublk-control`` with a small SQE128 ring.  One per thread; commands are synchronous.

    Control commands run in an io_uring worker that reads and writes the buffer named in the
    command, so the buffer (one mapped page here) stays alive until the CQE has been seen.
    """

    def __init__(self) -> None:
        try:
            self.fd = os.open(CONTROL_PATH, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UblkError(
                f"{CONTROL_PATH} does not exist: this kernel has no ublk driver loaded "
                "(CONFIG_BLK_DEV_UBLK, module ublk_drv)"
            ) from None
        except OSError as exc:
            raise UblkError(f"cannot open {CONTROL_PATH}: {exc.strerror}") from exc
        try:
            self._ring = IoUring(4, flags=SETUP_SQE128)
            self._buffer = Mapping.anonymous(PAGE_SIZE)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        self._ring.close()
        self._buffer.close()
        os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def command(
        self, op: CtrlOp, dev_id: int, *, payload: bytes = b"", reply: int = 0, data: int = 0
    ) -> bytes:
        """Run one control command; return the first ``reply`` bytes of its buffer afterwards.

        Raises `UblkError` carrying the kernel's errno when the command fails.
        """
        length = max(len(payload), reply)
        view = self._buffer.view()
        view[:length] = payload.ljust(length, b"\0")
        cmd = CtrlCmd(dev_id, length=length, addr=self._buffer.address if length else 0, data=data)
        self._ring.prep_uring_cmd(self.fd, op, cmd.pack(), user_data=op)
        self._ring.submit()
        completions = self._ring.completions()
        while not completions:
            completions = self._ring.wait(1)
        (completion,) = completions
        if completion.res < 0:
            raise _command_error(op, dev_id, completion.res)
        return bytes(view[:reply])

    def features(self) -> int:
        return int.from_bytes(self.command(CtrlOp.GET_FEATURES, 0, reply=8), "little")

    def add(self, info: DevInfo) -> DevInfo:
        raw = self.command(CtrlOp.ADD_DEV, info.dev_id, payload=info.pack(), reply=64)
        return DevInfo.unpack(raw)

    def info(self, dev_id: int) -> DevInfo:
        return DevInfo.unpack(self.command(CtrlOp.GET_DEV_INFO, dev_id, reply=64))

    def set_params(self, dev_id: int, params: Params) -> None:
        self.command(CtrlOp.SET_PARAMS, dev_id, payload=params.pack())

    def params(self, dev_id: int) -> Params:
        # The kernel reads the header's len from our buffer to know how much to fill in.
        query = Params.FORMAT.size.to_bytes(4, "little") + bytes(Params.FORMAT.size - 4)
        return Params.unpack(
            self.command(CtrlOp.GET_PARAMS, dev_id, payload=query, reply=Params.FORMAT.size)
        )

    def start(self, dev_id: int, pid: int) -> None:
        self.command(CtrlOp.START_DEV, dev_id, data=pid)

    def stop(self, dev_id: int) -> None:
        self.command(CtrlOp.STOP_DEV, dev_id)

    def delete(self, dev_id: int) -> None:
        self.command(CtrlOp.DEL_DEV, dev_id)

    def start_recovery(self, dev_id: int) -> None:
        self.command(CtrlOp.START_USER_RECOVERY, dev_id)

    def end_recovery(self, dev_id: int, pid: int) -> None:
        self.command(CtrlOp.END_USER_RECOVERY, dev_id, data=pid)


# -- queues -------------------------------------------------------------------------------------


class BlockStore(Protocol):
    """What a queue asks of its store: `Store` itself, or for `serve_block_store` any object with
    these methods (``bench/minimal_ublk.py`` serves a RAM disk through them)."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None: ...

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None: ...

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None: ...

    def commit(self) -> None: ...

    def flush(self) -> None: ...


class _Pass:
    """The requests of one queue pass: every ``[tag, result]``, and those a commit or a flush must
    succeed for."""

    __slots__ = ("changed", "durable", "results")

    def __init__(self) -> None:
        self.results: list[list[int]] = []
        self.changed: list[list[int]] = []  # writes, discards, write-zeroes: need the commit
        self.durable: list[list[int]] = []  # FLUSH and FUA requests: need the flush


class QueueRunner:
    """One hardware queue: its own thread, ring, descriptor mapping and per-tag buffers.

    On 6.12 the thread whose FETCHes complete a queue's set-up owns that queue: every FETCH and
    COMMIT for it must come from that thread, which is why the ring is made inside `run`.
    """

    def __init__(
        self, store: BlockStore, char_fd: int, *, q_id: int, depth: int, buffer_bytes: int
    ) -> None:
        self.store = store
        self.char_fd = char_fd
        self.q_id = q_id
        self.depth = depth
        self.buffer_bytes = buffer_bytes
        self.settled = threading.Event()  # set once every tag is fetched, or set-up failed
        self.error: BaseException | None = None
        self.aborted = 0  # commands the driver ended with -ENODEV (queue going away)
        self.refused = 0  # commands the driver refused (their tags are dead)
        self.requests = 0  # requests answered
        self.passes = 0  # passes that answered any (one store commit at most each)
        self.thread = threading.Thread(target=self.run, name=f"ublk-queue-{q_id}", daemon=True)
        self._ring: IoUring | None = None
        self._descs: Mapping | None = None
        self._buffers: Mapping | None = None

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        try:
            set_io_flusher()
            ring = self._set_up()
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread, which reports it
            self.error = exc
            self.settled.set()
            self._tear_down()
            _wake_main_thread()
            return
        self.settled.set()
        try:
            profile_dir = os.environ.get(PROFILE_ENV)
            if profile_dir:
                _profiled(self._serve, ring, os.path.join(profile_dir, f"queue-{self.q_id}.prof"))
            else:
                self._serve(ring)
        except BaseException as exc:
            log.exception("ublk queue %d stopped on an unexpected error", self.q_id)
            self.error = exc
        finally:
            self._tear_down()
            log.info(
                "ublk queue %d: %d requests in %d passes", self.q_id, self.requests, self.passes
            )
            _wake_main_thread()

    def _set_up(self) -> IoUring:
        flags = SETUP_COOP_TASKRUN | SETUP_SINGLE_ISSUER | SETUP_DEFER_TASKRUN
        try:
            ring = IoUring(self.depth, flags=flags)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            ring = IoUring(self.depth)  # a kernel without these set-up flags
        self._ring = ring
        self._descs = Mapping.of_file(
            self.char_fd,
            _round_up(self.depth * IO_DESC.size, PAGE_SIZE),
            UBLKSRV_CMD_BUF_OFFSET + self.q_id * MAX_DESC_ARRAY_BYTES,
            writable=False,
        )
        self._buffers = Mapping.anonymous(self.depth * self.buffer_bytes)
        base = self._buffers.address
        for tag in range(self.depth):
            payload = IO_CMD.pack(self.q_id, tag, 0, base + tag * self.buffer_bytes)
            ring.prep_uring_cmd(self.char_fd, IoOp.FETCH_REQ, payload, user_data=tag)
        ring.submit()
        # A FETCH that succeeds completes only when a request arrives; one refused outright is
        # already in the CQ.  A queue missing a tag would keep START_DEV waiting forever.
        for completion in ring.completions():
            raise UblkError(
                f"ublk queue {self.q_id}: FETCH of tag {completion.user_data} refused: "
                f"{os.strerror(-completion.res) if completion.res < 0 else completion.res}"
            )
        return ring

    def _serve(self, ring: IoUring) -> None:
        """Serve until the driver has ended every command of this queue."""
        assert self._descs is not None
        assert self._buffers is not None
        descs = self._descs.buffer()
        buffers = self._buffers.view()
        base = self._buffers.address
        size = self.buffer_bytes
        views = [buffers[tag * size : (tag + 1) * size] for tag in range(self.depth)]
        outstanding = self.depth  # commands the driver holds (every FETCH of _set_up)
        prepared = 0  # commits prepared but not yet submitted
        while outstanding or prepared:
            submitted = ring.submit_and_wait(1)
            outstanding += submitted
            prepared -= submitted
            work = _Pass()
            completions = ring.completions()
            while completions:
                outstanding -= len(completions)
                tags = self._requests(completions)
                if not tags:
                    break
                self._apply(tags, descs, views, work)
                # Requests that arrived while these were applied join this pass: one commit
                # for all of them (a growing pass is cheaper per request than a new one).
                submitted = ring.get_events()  # none, unless the wait above stopped early
                outstanding += submitted
                prepared -= submitted
                completions = ring.completions()
            if not work.results:
                continue
            self.passes += 1
            self.requests += len(work.results)
            for tag, result in self._finish(work):
                payload = IO_CMD.pack(self.q_id, tag, result, base + tag * size)
                ring.prep_uring_cmd(self.char_fd, IoOp.COMMIT_AND_FETCH_REQ, payload, user_data=tag)
                prepared += 1

    def _requests(self, completions: list[Completion]) -> list[int]:
        """The tags of the completions that carry a request; count the ones that end a tag."""
        tags: list[int] = []
        for completion in completions:
            if completion.res == UBLK_IO_RES_OK:
                tags.append(completion.user_data)
            elif completion.res == UBLK_IO_RES_ABORT:
                self.aborted += 1
            else:
                self.refused += 1
                log.error(
                    "ublk queue %d tag %d: command refused by the driver (%s); tag lost",
                    self.q_id, completion.user_data,
                    os.strerror(-completion.res) if completion.res < 0 else completion.res,
                )  # fmt: skip
        return tags

    def _apply(
        self,
        tags: list[int],
        descs: ctypes.Array[ctypes.c_char],
        views: list[memoryview],
        work: _Pass,
    ) -> None:
        """Apply requests to the store (pending, not committed) and note them in ``work``."""
        store = self.store
        results, changed, durable = work.results, work.changed, work.durable
        for tag in tags:
            op_flags, nr_sectors, start_sector, _addr = IO_DESC.unpack_from(descs, tag * 24)
            op = op_flags & 0xFF
            offset = start_sector << SECTOR_SHIFT
            length = nr_sectors << SECTOR_SHIFT
            entry = [tag, 0]
            results.append(entry)
            try:
                if op == UBLK_IO_OP_WRITE:
                    _check_fits(length, self.buffer_bytes)
                    store.write(offset, views[tag][:length])
                    entry[1] = length
                    changed.append(entry)
                elif op == UBLK_IO_OP_READ:
                    _check_fits(length, self.buffer_bytes)
                    views[tag][:length] = store.read(offset, length)
                    entry[1] = length
                elif op == UBLK_IO_OP_FLUSH:
                    durable.append(entry)
                elif op == UBLK_IO_OP_DISCARD:
                    store.trim(offset, length)
                    changed.append(entry)
                elif op == UBLK_IO_OP_WRITE_ZEROES:
                    store.write_zeroes(offset, length)
                    changed.append(entry)
                else:
                    entry[1] = -errno.EOPNOTSUPP
                if op_flags & UBLK_IO_F_FUA and entry[1] >= 0:
                    durable.append(entry)
            except Exception as exc:  # noqa: BLE001 -- every failure becomes this request's errno
                entry[1] = errno_result(exc, _describe(self.q_id, tag, op, offset, length))

    def _finish(self, work: _Pass) -> list[list[int]]:
        """End a pass; return each request's ``[tag, result]``, in the order they came.

        Durability order: every request is applied, then one commit (if anything changed), then
        one flush (if a FLUSH or FUA request is among them); a failed commit or flush fails the
        requests that depended on it.  Only then do the results go to the kernel.
        """
        if work.changed:
            try:
                self.store.commit()
            except Exception as exc:  # noqa: BLE001 -- fails exactly the requests it covers
                result = errno_result(exc, f"ublk queue {self.q_id}: commit")
                for entry in work.changed:
                    entry[1] = result
        if work.durable:
            try:
                self.store.flush()
            except Exception as exc:  # noqa: BLE001 -- fails exactly the requests it covers
                result = errno_result(exc, f"ublk queue {self.q_id}: flush")
                for entry in work.durable:
                    entry[1] = result
        return work.results

    def _tear_down(self) -> None:
        """Close the ring (the kernel cancels what is still outstanding) and unmap everything."""
        for resource in (self._ring, self._descs, self._buffers):
            if resource is not None:
                try:
                    resource.close()
                except OSError:
                    log.exception("ublk queue %d: cleanup failed", self.q_id)
        self._ring = self._descs = self._buffers = None


def _profiled(serve: Callable[[IoUring], None], ring: IoUring, dump: str) -> None:
    """Run a queue's serving loop under cProfile and write the statistics to ``dump`` (for
    bench/ublk_bench.py --profile; cProfile slows the loop several times, never set it in use)."""
    import cProfile  # noqa: PLC0415 -- only for profiling runs

    profiler = cProfile.Profile()
    try:
        profiler.runcall(serve, ring)
    finally:
        profiler.dump_stats(dump)


def _check_fits(length: int, capacity: int) -> None:
    if length > capacity:
        raise InvalidRequest(f"a {length}-byte request exceeds the {capacity}-byte tag buffer")


_OP_NAMES: Final = {
    UBLK_IO_OP_READ: "READ",
    UBLK_IO_OP_WRITE: "WRITE",
    UBLK_IO_OP_FLUSH: "FLUSH",
    UBLK_IO_OP_DISCARD: "DISCARD",
    UBLK_IO_OP_WRITE_ZEROES: "WRITE_ZEROES",
}


def _describe(q_id: int, tag: int, op: int, offset: int, length: int) -> str:
    name = _OP_NAMES.get(op, f"op {op}")
    return f"ublk queue {q_id} tag {tag}: {name} at {offset} of {length} bytes"


def _wake_main_thread() -> None:
    """Tell the main thread (waiting in sigwait) that a helper thread changed state."""
    os.kill(os.getpid(), WAKE_SIGNAL)


# -- the server ---------------------------------------------------------------------------------


@dataclass
class _Starter:
    """START_DEV / END_USER_RECOVERY, sent from its own thread: it returns only after the kernel
    has read the partition table through the queue threads."""

    dev_id: int
    recovering: bool
    done: bool = False
    error: BaseException | None = None

    def run(self) -> None:
        try:
            set_io_flusher()
            with Control() as control:
                if self.recovering:
                    control.end_recovery(self.dev_id, os.getpid())
                else:
                    control.start(self.dev_id, os.getpid())
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread, which reports it
            self.error = exc
        finally:
            self.done = True
            _wake_main_thread()


class _Server:
    def __init__(
        self,
        store_path: str | None,  # None: `run_on` only (`serve_block_store`)
        *,
        queues: int,
        depth: int,
        dev_id: int | None,
        swap: bool,
        swap_priority: int | None,
        swap_discard: bool,
        recover: int | None,
    ) -> None:
        self.store_path = store_path
        self.queues = queues
        self.depth = depth
        self.dev_id = dev_id
        self.swap = swap
        self.swap_priority = swap_priority
        self.swap_discard = swap_discard
        self.recover = recover
        self.runners: list[QueueRunner] = []
        self.char_fd = -1
        self.starter: _Starter | None = None
        self.starter_thread: threading.Thread | None = None
        self.started = False
        self.swap_enabled = False

    # The whole life cycle; see the module docstring.
    def run(self) -> int:
        assert self.store_path is not None
        _harden_process(strict=self.swap)
        # Every pass commits its own batch before answering the kernel: no timed commits.
        with open_store(self.store_path, group_commit=False) as store:
            check_placement(store, swap=self.swap, serving_dev_id=self.recover)
            return self.run_on(store)

    def run_on(self, store: BlockStore) -> int:
        """Add (or recover) the device, serve ``store`` until a stop signal, remove it."""
        with Control() as control:
            if self.recover is None:
                info = self._add_device(control, store)
            else:
                info = self._begin_recovery(control, store)
            status = 1
            try:
                status = self._serve(store, info)
            finally:
                status = self._remove(control, info) or status
        return status

    def _add_device(self, control: Control, store: BlockStore) -> DevInfo:
        wanted = Feature.USER_RECOVERY | Feature.USER_RECOVERY_REISSUE | Feature.CMD_IOCTL_ENCODE
        offered = control.features()
        flags = int(wanted) & offered
        if not flags & Feature.USER_RECOVERY:
            log.warning("this ublk driver has no USER_RECOVERY: a crash will remove the device")
        buffer_bytes = io_buffer_bytes(self.depth)
        request = DevInfo(
            nr_hw_queues=self.queues,
            queue_depth=self.depth,
            state=0,
            max_io_buf_bytes=buffer_bytes,
            dev_id=0xFFFF_FFFF if self.dev_id is None else self.dev_id,
            ublksrv_pid=os.getpid(),  # lets `cleanup_devices` tell a never-started orphan
            flags=flags,
        )
        info = control.add(request)
        log.info(
            "added ublk device %d: %d queue(s) of depth %d, flags %#x",
            info.dev_id, info.nr_hw_queues, info.queue_depth, info.flags,
        )  # fmt: skip
        try:
            max_sectors = info.max_io_buf_bytes >> SECTOR_SHIFT
            discard_sectors = MAX_DISCARD_BYTES >> SECTOR_SHIFT
            params = Params(
                types=UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD,
                attrs=UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA,
                max_sectors=max_sectors,
                dev_sectors=store.size >> SECTOR_SHIFT,
                discard_granularity=PAGE_SIZE,
                max_discard_sectors=discard_sectors,
                max_write_zeroes_sectors=discard_sectors,
                max_discard_segments=1,
            )
            control.set_params(info.dev_id, params)
        except BaseException:
            _quietly(control.delete, info.dev_id)
            raise
        return info

    def _begin_recovery(self, control: Control, store: BlockStore) -> DevInfo:
        assert self.recover is not None
        dev_id = self.recover
        info = control.info(dev_id)
        if not info.flags & Feature.USER_RECOVERY:
            raise UblkError(f"ublk device {dev_id} was created without USER_RECOVERY")
        params = control.params(dev_id)
        if params.dev_sectors << SECTOR_SHIFT != store.size:
            raise InvalidRequest(
                f"ublk device {dev_id} has {params.dev_sectors << SECTOR_SHIFT} bytes, the store "
                f"{store.size}: not the store it was serving"
            )
        deadline = time.monotonic() + RECOVERY_WAIT_SECONDS
        while True:
            try:
                control.start_recovery(dev_id)
                break
            except UblkError as exc:
                # EBUSY until the dead server's char device is released and the driver has
                # quiesced the device.
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise UblkError(
                        f"cannot recover ublk device {dev_id} (state "
                        f"{_state_name(control.info(dev_id).state)}, server pid "
                        f"{info.ublksrv_pid}): {exc}"
                    ) from exc
                time.sleep(RETRY_INTERVAL_SECONDS)
        log.info("recovering ublk device %d", dev_id)
        return control.info(dev_id)

    def _serve(self, store: BlockStore, info: DevInfo) -> int:
        self.char_fd = _open_char_device(info.dev_id)
        self.runners = [
            QueueRunner(
                store,
                self.char_fd,
                q_id=q,
                depth=info.queue_depth,
                buffer_bytes=info.max_io_buf_bytes,
            )
            for q in range(info.nr_hw_queues)
        ]
        for runner in self.runners:
            runner.start()
        for runner in self.runners:
            runner.settled.wait()
        for runner in self.runners:
            if runner.error is not None:
                raise UblkError(f"ublk queue {runner.q_id} could not start: {runner.error}")
        self.starter = _Starter(info.dev_id, recovering=self.recover is not None)
        self.starter_thread = threading.Thread(
            target=self.starter.run, name="ublk-start", daemon=True
        )
        self.starter_thread.start()
        return self._wait_for_signals(info)

    def _wait_for_signals(self, info: DevInfo) -> int:
        path = block_device_path(info.dev_id)
        assert self.starter is not None
        while True:
            signum = signal.sigwait(WAITED_SIGNALS)
            if signum in STOP_SIGNALS:
                log.info("%s: stopping %s", signal.Signals(signum).name, path)
                if self._swap_off(path):
                    return 0
                continue
            if self.starter.done and not self.started:
                if self.starter.error is not None:
                    log.error("cannot start %s: %s", path, self.starter.error)
                    return 1
                self.started = True
                if self.swap and self.recover is None:
                    try:
                        self._swap_on(path)
                    except UblkError as exc:
                        log.error("%s", exc)  # noqa: TRY400 -- a failed tool: one line is enough
                        return 1
                # The line a caller waits for: the device is ready for its purpose.
                sys.stdout.write(path + "\n")
                sys.stdout.flush()
            dead = [r for r in self.runners if not r.thread.is_alive()]
            if dead:
                log.error(
                    "ublk queue(s) %s ended while serving %s: stopping",
                    ", ".join(str(r.q_id) for r in dead), path,
                )  # fmt: skip
                return 1

    def _swap_on(self, path: str) -> None:
        _disable_writeback_throttling(path)
        _run_tool(["mkswap", path])
        command = ["swapon"]
        if self.swap_priority is not None:
            command += ["-p", str(self.swap_priority)]
        if self.swap_discard:
            command.append("--discard")
        _run_tool([*command, path])
        self.swap_enabled = True
        log.info("swap enabled on %s", path)

    def _swap_off(self, path: str) -> bool:
        """swapoff if the device is in use as swap (by us or anyone); False if that failed."""
        if not self.started or not _is_active_swap(path):
            return True
        try:
            _run_tool(["swapoff", path])
        except UblkError as exc:
            log.error(  # noqa: TRY400 -- a failed tool: one line is enough
                "%s; still serving %s (stopping now would fail its swapped pages): send the "
                "signal again to retry", exc, path,
            )  # fmt: skip
            return False
        self.swap_enabled = False
        return True

    def _remove(self, control: Control, info: DevInfo) -> int:
        """Stop the device while the queues still serve, let them drain, then delete it.

        Returns 1 if something went wrong on the way (logged), else 0.
        """
        status = 0
        dev_id = info.dev_id
        if self.starter_thread is not None:
            # A START_DEV arriving after STOP_DEV would add a disk that nobody serves.
            self.starter_thread.join()
        if self.started:
            with contextlib.suppress(OSError):
                _sync_block_device(block_device_path(dev_id))
        if self.recover is not None and not self.started:
            if not any(runner.thread.is_alive() for runner in self.runners):
                # No queue of ours holds a command: the device stays quiesced, and another
                # --recover may try again.
                log.error("recovery of ublk device %d failed; it stays quiesced", dev_id)
                self._close_char_device()
                return 1
            # Some queue threads wait for requests that will never come: only STOP_DEV ends
            # their commands, so this failed recovery removes the device.
            log.error("recovery of ublk device %d failed; removing it", dev_id)
            status = 1
        try:
            control.stop(dev_id)
        except UblkError as exc:
            if exc.errno != errno.ENODEV:
                log.error("%s", exc)  # noqa: TRY400 -- a refused command: one line is enough
                status = 1
        self._join_runners()
        self._close_char_device()
        try:
            control.delete(dev_id)
        except UblkError as exc:
            if exc.errno != errno.ENODEV:
                log.error("%s", exc)  # noqa: TRY400 -- a refused command: one line is enough
                status = 1
        for runner in self.runners:
            if runner.error is not None or runner.refused:
                status = 1
        log.info("ublk device %d removed", dev_id)
        return status

    def _join_runners(self) -> None:
        for runner in self.runners:
            runner.thread.join()

    def _close_char_device(self) -> None:
        if self.char_fd >= 0:
            os.close(self.char_fd)
            self.char_fd = -1


def _harden_process(*, strict: bool) -> None:
    """Process-wide swap safety (module docstring).  Failures are fatal with ``strict`` (swap),
    warnings otherwise."""
    steps: list[tuple[str, Callable[[], None]]] = [
        ("prctl(PR_SET_IO_FLUSHER)", set_io_flusher),
        ("oom_score_adj -1000", _protect_from_oom_killer),
        ("mallopt", _keep_heap),
        ("mlockall", _lock_memory),
    ]
    for what, step in steps:
        try:
            step()
        except OSError as exc:
            if strict:
                raise UblkError(f"swap safety: {what} failed: {exc.strerror}") from exc
            log.warning("%s failed (%s): the device must not be used for swap", what, exc.strerror)


def _protect_from_oom_killer() -> None:
    with open("/proc/self/oom_score_adj", "w") as adj:
        adj.write("-1000\n")


def _keep_heap() -> None:
    """Make malloc keep what it got (no trimming, no mmap per large block) and grow in 16 MiB
    steps: freed request buffers are reused instead of being returned to the kernel and faulted
    in (and, under mlockall, locked) again on the next pass."""
    for param, value in (
        (M_TRIM_THRESHOLD, -1),
        (M_MMAP_MAX, 0),
        (M_TOP_PAD, MALLOC_TOP_PAD_BYTES),
    ):
        if _mallopt(param, value) != 1:  # mallopt returns 1 on success and sets no errno
            raise OSError(errno.EINVAL, f"mallopt({param}, {value}) refused")


def _lock_memory() -> None:
    if _mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        raise _os_error("mlockall")


def _open_char_device(dev_id: int) -> int:
    """Open /dev/ublkcN, waiting while udev (just after ADD_DEV) still holds or creates it."""
    path = char_device_path(dev_id)
    deadline = time.monotonic() + OPEN_WAIT_SECONDS
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOENT) or time.monotonic() > deadline:
                raise UblkError(f"cannot open {path}: {exc.strerror}") from exc
            time.sleep(RETRY_INTERVAL_SECONDS)


def _sync_block_device(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disable_writeback_throttling(path: str) -> None:
    """Turn the block layer's writeback throttling (blk-wbt) off for a swap device.

    wbt shrinks the number of buffered writes in flight whenever completions take longer than its
    target (2 ms on a non-rotational queue), down to one. A userspace server's latency is above
    that target, so under memory pressure reclaim's swap-outs (buffered writes, throttled; kswapd
    included) would go to the device one at a time while everything waits for memory. zram, a
    bio-based driver, has no wbt at all.
    """
    knob = f"/sys/block/{os.path.basename(path)}/queue/wbt_lat_usec"
    try:
        with open(knob, "w") as f:
            f.write("0\n")
    except FileNotFoundError:
        return  # a kernel built without CONFIG_BLK_WBT
    except OSError as exc:
        log.warning("cannot turn writeback throttling off on %s (%s)", path, exc.strerror)
        return
    log.info("writeback throttling off on %s", path)


def _is_active_swap(path: str) -> bool:
    real = os.path.realpath(path)
    try:
        with open("/proc/swaps") as swaps:
            next(swaps, None)  # header
            return any(os.path.realpath(line.split()[0]) == real for line in swaps if line.strip())
    except OSError:
        return False


def _run_tool(command: list[str]) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise UblkError(f"cannot run {command[0]}: {exc.strerror}") from exc
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise UblkError(
            f"{' '.join(command)} failed (exit {done.returncode})"
            + (f": {message[-1]}" if message else "")
        )


def _quietly(action: Callable[[int], None], dev_id: int) -> None:
    try:
        action(dev_id)
    except UblkError as exc:
        log.warning("cleanup of ublk device %d: %s", dev_id, exc)


def _state_name(state: int) -> str:
    try:
        return DevState(state).name.lower()
    except ValueError:
        return f"unknown({state})"


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Block the waited-for signals in this thread (and so in every thread it starts); drain
    any still pending on the way out so that none fires after `serve` returns."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WAITED_SIGNALS)
    try:
        yield
    finally:
        while signal.sigtimedwait(WAITED_SIGNALS, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def serve(
    store_path: str,
    *,
    queues: int = 1,
    depth: int = 64,
    dev_id: int | None = None,
    swap: bool = False,
    swap_priority: int | None = None,
    swap_discard: bool = False,
    recover: int | None = None,
) -> int:
    """Serve the store at ``store_path`` as /dev/ublkbN until SIGTERM/SIGINT/SIGHUP; exit code.

    Prints the block device's path alone on a line of stdout once the device is started (and,
    with ``swap``, swap is on).
    Raises `StoreError` (`InvalidRequest` for bad arguments or an unsafe placement, `UblkError`
    for the kernel side) if serving cannot begin.  Must run in the main thread.
    """
    _check_queues(queues, depth, dev_id)
    if (swap_priority is not None or swap_discard) and not swap:
        raise InvalidRequest("--swap-priority and --swap-discard need --swap")
    if swap_priority is not None and not -1 <= swap_priority <= 32767:
        raise InvalidRequest(f"bad swap priority {swap_priority}: -1 to 32767")
    if recover is not None and dev_id is not None and recover != dev_id:
        raise InvalidRequest("--recover names the device: do not also give a different --dev-id")
    _check_main_thread()
    server = _Server(
        store_path, queues=queues, depth=depth, dev_id=dev_id, swap=swap,
        swap_priority=swap_priority, swap_discard=swap_discard, recover=recover,
    )  # fmt: skip
    with _signals_blocked():
        return server.run()


def serve_block_store(
    store: BlockStore, *, queues: int = 1, depth: int = 64, dev_id: int | None = None
) -> int:
    """Serve any `BlockStore` as /dev/ublkbN the way `serve` serves a dedupblk store, without
    swap, recovery or placement checks; for ``bench/minimal_ublk.py``, whose RAM disk measures
    what this frontend costs on its own.  Same output, signals and exit code as `serve`."""
    _check_queues(queues, depth, dev_id)
    if store.size <= 0 or store.size % PAGE_SIZE:
        raise InvalidRequest(f"bad size {store.size}: a positive multiple of {PAGE_SIZE}")
    _check_main_thread()
    server = _Server(
        None, queues=queues, depth=depth, dev_id=dev_id, swap=False, swap_priority=None,
        swap_discard=False, recover=None,
    )  # fmt: skip
    with _signals_blocked():
        _harden_process(strict=False)
        return server.run_on(store)


def _check_queues(queues: int, depth: int, dev_id: int | None) -> None:
    if queues < 1:
        raise InvalidRequest(f"bad queue count {queues}: at least 1")
    if not 1 <= depth <= MAX_QUEUE_DEPTH:
        raise InvalidRequest(f"bad queue depth {depth}: 1 to {MAX_QUEUE_DEPTH}")
    if dev_id is not None and not 0 <= dev_id < 1 << 20:
        raise InvalidRequest(f"bad device id {dev_id}")


def _check_main_thread() -> None:
    if threading.current_thread() is not threading.main_thread():
        raise InvalidRequest("the ublk server must run in the main thread (it waits for signals)")


# -- device listing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """One ublk device as ``dedupblk devices`` shows it."""

    dev_id: int
    state: str  # dead, live, quiesced, fail_io
    queues: int
    depth: int
    max_io_buf_bytes: int
    server_pid: int  # -1 once stopped
    server_alive: bool
    flags: int
    block_device: str
    char_device: str

    @property
    def recoverable(self) -> bool:
        return bool(self.flags & Feature.USER_RECOVERY)


def _device_ids() -> list[int]:
    ids: set[int] = set()
    for directory in ("/sys/class/ublk-char", "/dev"):
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                match = re.fullmatch(r"ublkc(\d+)", name)
                if match:
                    ids.add(int(match.group(1)))
    return sorted(ids)


def _pid_alive(pid: int) -> bool:
    return pid > 0 and os.path.exists(f"/proc/{pid}")


def _device_info(info: DevInfo) -> DeviceInfo:
    return DeviceInfo(
        dev_id=info.dev_id,
        state=_state_name(info.state),
        queues=info.nr_hw_queues,
        depth=info.queue_depth,
        max_io_buf_bytes=info.max_io_buf_bytes,
        server_pid=info.ublksrv_pid,
        server_alive=_pid_alive(info.ublksrv_pid),
        flags=info.flags,
        block_device=block_device_path(info.dev_id),
        char_device=char_device_path(info.dev_id),
    )


def list_devices() -> list[DeviceInfo]:
    """Every ublk device this kernel has, served by dedupblk or not."""
    devices: list[DeviceInfo] = []
    with Control() as control:
        for dev_id in _device_ids():
            try:
                devices.append(_device_info(control.info(dev_id)))
            except UblkError as exc:
                if exc.errno != errno.ENODEV:  # deleted while we looked
                    raise
    return devices


def _char_device_held(dev_id: int) -> bool:
    """Whether a server has /dev/ublkcN open (the driver allows a single opener)."""
    try:
        fd = os.open(char_device_path(dev_id), os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False


def cleanup_devices() -> list[int]:
    """Delete the devices whose server is gone (dead pid and char device not held).

    A crashed server's device waiting for ``serve --recover`` counts as stale too: deleting it
    fails the I/O that waits on it.  Returns the ids deleted.
    """
    deleted: list[int] = []
    with Control() as control:
        for device in list_devices():
            if device.server_alive or _char_device_held(device.dev_id):
                continue
            try:
                control.delete(device.dev_id)
            except UblkError as exc:
                if exc.errno == errno.ENODEV:
                    continue
                log.error(  # noqa: TRY400 -- a refused command: one line is enough
                    "cannot delete stale ublk device %d: %s", device.dev_id, exc
                )
                continue
            log.info(
                "deleted stale ublk device %d (server pid %d)", device.dev_id, device.server_pid
            )
            deleted.append(device.dev_id)
    return deleted
