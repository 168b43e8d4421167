"""The ublk driver's records and codes, as Linux 6.12's include/uapi/linux/ublk_cmd.h has them.

Each record is a small dataclass with its ``struct`` format beside it (little-endian, x86-64);
the layouts are also listed in docs/ublk.md.  Nothing here does I/O.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass
from typing import ClassVar, Final

CONTROL_PATH: Final = "/dev/ublk-control"
SECTOR_SHIFT: Final = 9  # descriptors count 512-byte sectors, whatever the block size
# The page the kernel maps descriptor arrays in (x86-64's; `uring` refuses other machines).
PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT

MAX_QUEUE_DEPTH: Final = 4096  # UBLK_MAX_QUEUE_DEPTH
# UBLK_MAX_NR_QUEUES: ADD_DEV refuses more; below it, the driver gives one queue per CPU at most.
MAX_NR_QUEUES: Final = 1 << 12


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


def state_name(state: int) -> str:
    """``live``, ``quiesced``...: a device state as `dedupblk devices` prints it."""
    try:
        return DevState(state).name.lower()
    except ValueError:
        return f"unknown({state})"


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
class CtrlDevInfo:
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
    def unpack(cls, raw: bytes) -> CtrlDevInfo:
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
assert CtrlDevInfo.FORMAT.size == 64
assert Params.FORMAT.size == 112
assert IO_DESC.size == 24
assert IO_CMD.size == 16


def desc_array_bytes(depth: int) -> int:
    """Bytes of a queue's descriptor array as mapped: ``depth`` descriptors, whole pages."""
    return (depth * IO_DESC.size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


MAX_DESC_ARRAY_BYTES: Final = desc_array_bytes(MAX_QUEUE_DEPTH)


def desc_array_offset(q_id: int) -> int:
    """Where queue ``q_id``'s descriptor array is mapped from in /dev/ublkcN."""
    return UBLKSRV_CMD_BUF_OFFSET + q_id * MAX_DESC_ARRAY_BYTES


def block_device_path(dev_id: int) -> str:
    return f"/dev/ublkb{dev_id}"


def char_device_path(dev_id: int) -> str:
    return f"/dev/ublkc{dev_id}"
