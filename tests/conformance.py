"""One block-device conformance suite for every frontend.

Each check takes a `dedupblk.device.BlockDevice` (the store in-process, an NBD connection, a ublk
device in a VM) that starts all zeros and is at least `MIN_SIZE` bytes, and asserts plain-disk
behaviour against a `bytearray` model. Discards and zeroes are whole units of the device's
``block_size`` attribute when it has one (a ublk device takes them in 4 KiB blocks only), else of
512-byte sectors. Frontend test modules parametrize over `CHECKS`; the VM tier runs
``python -m tests.conformance /dev/ublkbN`` (tests/vm/guest/ublk_checks.py), which prints one line
per check and exits 1 on a failure.
"""

from __future__ import annotations

import fcntl
import os
import random
import struct
import sys
import traceback
from collections.abc import Callable

from dedupblk.device import BlockDevice, Extent

PAGE = 4096
SECTOR = 512
MIN_SIZE = 1 << 20


def block_size(dev: BlockDevice) -> int:
    """The unit of the device's discards and zeroes (see the module docstring)."""
    size: int = getattr(dev, "block_size", SECTOR)
    return size


class Model:
    """The device next to a `bytearray` that says what it must hold."""

    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev
        self.image = bytearray(dev.size)

    def write(self, offset: int, data: bytes) -> None:
        self.dev.write(offset, data)
        self.image[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int, *, trim: bool = False) -> None:
        (self.dev.trim if trim else self.dev.write_zeroes)(offset, length)
        self.image[offset : offset + length] = bytes(length)

    def verify(self, offset: int = 0, length: int | None = None) -> None:
        length = self.dev.size - offset if length is None else length
        got = self.dev.read(offset, length)
        want = bytes(self.image[offset : offset + length])
        if got != want:
            first = next(i for i in range(length) if got[i] != want[i])
            raise AssertionError(
                f"byte {offset + first}: read {got[first]:#x}, expected {want[first]:#x}"
            )


def check_starts_zero(dev: BlockDevice) -> None:
    Model(dev).verify()


def check_full_pages(dev: BlockDevice) -> None:
    m = Model(dev)
    rng = random.Random(1)
    for page in (0, 1, 7, dev.size // PAGE - 1):
        m.write(page * PAGE, rng.randbytes(PAGE))
    m.verify()


def check_duplicates_read_back(dev: BlockDevice) -> None:
    m = Model(dev)
    content = random.Random(2).randbytes(PAGE)
    for page in range(0, 64, 3):
        m.write(page * PAGE, content)
    m.write(5 * PAGE, content[:-1] + b"\x00")  # a near-duplicate stays apart
    m.verify(0, 64 * PAGE)


def check_same_filled_and_zero_pages(dev: BlockDevice) -> None:
    m = Model(dev)
    m.write(0, b"\xab" * PAGE)
    m.write(PAGE, (0x0123456789ABCDEF).to_bytes(8, "little") * (PAGE // 8))
    m.write(2 * PAGE, bytes(PAGE))
    m.write(3 * PAGE, b"\xab" * (PAGE - 1) + b"\xac")
    m.verify(0, 8 * PAGE)


def check_multi_page_and_overwrite(dev: BlockDevice) -> None:
    m = Model(dev)
    rng = random.Random(3)
    m.write(16 * PAGE, rng.randbytes(32 * PAGE))
    m.write(20 * PAGE, rng.randbytes(4 * PAGE))
    m.write(18 * PAGE, bytes(2 * PAGE))
    m.verify(0, 64 * PAGE)


def check_unaligned(dev: BlockDevice) -> None:
    """Sub-page writes at sector granularity (the smallest a block device takes)."""
    m = Model(dev)
    rng = random.Random(4)
    m.write(PAGE + 512, rng.randbytes(1024))
    m.write(3 * PAGE - 512, rng.randbytes(PAGE + 1024))
    m.write(8 * PAGE + 3584, rng.randbytes(512))
    m.verify(0, 16 * PAGE)


def check_trim_and_zero(dev: BlockDevice) -> None:
    m = Model(dev)
    rng = random.Random(5)
    m.write(0, rng.randbytes(16 * PAGE))
    m.zero(2 * PAGE, 3 * PAGE, trim=True)
    m.zero(8 * PAGE, 2 * PAGE)
    m.verify(0, 16 * PAGE)
    m.write(3 * PAGE, rng.randbytes(PAGE))  # a trimmed page takes writes again
    m.verify(0, 16 * PAGE)


def check_flush_keeps_data(dev: BlockDevice) -> None:
    m = Model(dev)
    rng = random.Random(6)
    m.write(32 * PAGE, rng.randbytes(8 * PAGE))
    dev.flush()
    m.verify(32 * PAGE, 8 * PAGE)


def check_random_mix(dev: BlockDevice) -> None:
    """Random writes (duplicate, same-filled, zero, unique) at 512-byte granularity, trims and
    zeroes in the device's blocks, over the first 256 pages, then a full comparison."""
    m = Model(dev)
    rng = random.Random(7)
    span = min(dev.size, 256 * PAGE)
    unit = block_size(dev)
    hot = [rng.randbytes(PAGE) for _ in range(4)]
    for _ in range(200):
        sectors = rng.choice((1, 8, 8, 8, 16, 24))
        offset = rng.randrange(0, span // SECTOR - sectors) * SECTOR
        length = sectors * SECTOR
        action = rng.randrange(10)
        if action < 3:
            data = (rng.choice(hot) * 6)[:length]
        elif action < 5:
            data = bytes([rng.randrange(1, 256)]) * length
        elif action < 6:
            start = offset // unit * unit
            end = max(start + unit, (offset + length) // unit * unit)
            m.zero(start, end - start, trim=rng.random() < 0.5)
            continue
        else:
            data = rng.randbytes(length)
        m.write(offset, data)
    m.verify(0, span)


CHECKS: list[Callable[[BlockDevice], None]] = [
    check_starts_zero,
    check_full_pages,
    check_duplicates_read_back,
    check_same_filled_and_zero_pages,
    check_multi_page_and_overwrite,
    check_unaligned,
    check_trim_and_zero,
    check_flush_keeps_data,
    check_random_mix,
]


class FileDevice:
    """A block device node as a `BlockDevice` (buffered I/O: the page cache does the
    read-modify-write of sub-block writes), for the VM run. Every read drops the page cache
    first: the kernel forgets only the range it discarded, so a server that changed other
    blocks (a trim one page too long) would otherwise be read back from stale cached pages."""

    BLKGETSIZE64 = 0x80081272
    BLKSSZGET = 0x1268
    BLKDISCARD = 0x1277
    BLKZEROOUT = 0x127F

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        buf = bytearray(8)
        fcntl.ioctl(self.fd, self.BLKGETSIZE64, buf)
        self.size: int = struct.unpack("<Q", buf)[0]
        sector = bytearray(4)
        fcntl.ioctl(self.fd, self.BLKSSZGET, sector)
        self.block_size: int = struct.unpack("<I", sector)[0]

    def read(self, offset: int, length: int) -> bytes:
        os.fsync(self.fd)  # dirty pages cannot be dropped
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(self.fd, length, offset)

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        assert os.pwrite(self.fd, data, offset) == len(data)

    def _range_ioctl(self, request: int, offset: int, length: int) -> None:
        os.fsync(self.fd)  # the page cache must not hold dirty data over the range
        fcntl.ioctl(self.fd, request, struct.pack("<QQ", offset, length))

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._range_ioctl(self.BLKDISCARD, offset, length)

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._range_ioctl(self.BLKZEROOUT, offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return [(offset, length, False)]

    def commit(self) -> None:
        os.fsync(self.fd)

    def flush(self) -> None:
        os.fsync(self.fd)

    def reset(self) -> None:
        self.trim(0, self.size)


def main(argv: list[str]) -> int:
    """Run every check against a block device, trimming it to zeros before each."""
    dev = FileDevice(argv[0])
    failed = 0
    for check in CHECKS:
        dev.reset()
        try:
            check(dev)
        except Exception:
            failed += 1
            print(f"FAIL {check.__name__}")
            traceback.print_exc()
        else:
            print(f"PASS {check.__name__}")
    print(f"{len(CHECKS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
