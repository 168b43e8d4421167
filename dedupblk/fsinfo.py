"""What kind of storage a path lives on: its filesystem's type, and what a block device is.

The store asks to tell a volatile placement (RAM) from a durable one; the ublk server asks to
refuse or warn about swap placements (docs/swap.md).
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
from typing import Final

from .libc import function, os_error

TMPFS_MAGIC: Final = 0x01021994
RAMFS_MAGIC: Final = 0x858458F6
RAM_FILESYSTEMS: Final = {TMPFS_MAGIC: "tmpfs", RAMFS_MAGIC: "ramfs"}
# Block devices whose contents are memory: zram (compressed), brd (/dev/ramN).
RAM_DISK_PREFIXES: Final = ("zram", "ram")

_statfs = function("statfs", ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


def filesystem_type(path: str) -> int:
    """statfs(2) f_type of the filesystem holding ``path``."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64
    if _statfs(os.fsencode(path), buf) != 0:
        raise os_error(f"statfs {path}")
    return int(struct.unpack_from("<q", buf, 0)[0])  # f_type: the first __fsword_t


def block_device_name(path: str) -> str | None:
    """The kernel name (``zram0``, ``vdb1``) of the block device at ``path``, else None."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        return None
    node = os.path.realpath(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    return os.path.basename(node)


def in_memory(path: str) -> str | None:
    """Why ``path`` (a file, directory or block device) lives in RAM, or None if it does not
    (nor exists): on ramfs or tmpfs, or a zram or brd block device."""
    try:
        name = block_device_name(path)
        if name is not None:
            return f"{path} is {name}, a RAM disk" if name.startswith(RAM_DISK_PREFIXES) else None
        kind = RAM_FILESYSTEMS.get(filesystem_type(path))
    except OSError:
        return None
    return f"{path} is on {kind}" if kind else None
